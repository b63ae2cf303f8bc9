// SPDX-License-Identifier: MIT
// autoqnn::tensor_stats(Tensor x, bool per_channel) -> Tensor [C, 7] on CUDA.
//
// Same semantics as csrc/cpu/tensor_stats.cpp (accumulator: autoqnn/tensor_stats.h), in two
// deterministic stages on the current stream:
//   1. one block per (row, chunk of stats::kChunk elements): each thread accumulates a fixed
//      strided subset in double, then a fixed-shape shared-memory tree gives the chunk partial;
//   2. one block per row merges that row's partials the same way and writes the output row.
// No atomics, so the result is bitwise reproducible for a given shape (it may differ from the CPU
// kernel in the last bits: the summation order differs).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream without ATen/cuda/CUDAContext.h
                                  // (that one also pulls in cuBLAS/cuSPARSE/cuSOLVER headers)
#include <torch/library.h>

#include <limits>

#include "autoqnn/checks.h"
#include "autoqnn/dispatch.h"
#include "autoqnn/tensor_stats.h"

namespace autoqnn {
namespace {

using stats::Acc;

constexpr int kThreads = 256;  // threads per block of both stages (power of two)

// Tree reduction of one Acc per thread; every thread of the block must call it.
__device__ Acc block_reduce(Acc acc) {
  __shared__ Acc sh[kThreads];
  const int t = threadIdx.x;
  sh[t] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh[t].merge(sh[t + s]);
    __syncthreads();
  }
  return sh[0];
}

// Stage 1: block b reduces chunk j = b % chunks_per_row of row c = b / chunks_per_row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_partial_kernel(const scalar_t* __restrict__ x /* [C, N] contiguous */,
                         Acc* __restrict__ part /* [C, chunks_per_row] */, int64_t N,
                         int64_t chunks_per_row) {
  const int64_t b = blockIdx.x;
  const int64_t c = b / chunks_per_row;
  const int64_t begin = (b % chunks_per_row) * stats::kChunk;
  const int64_t len = N - begin < stats::kChunk ? N - begin : stats::kChunk;
  const scalar_t* row = x + c * N + begin;
  Acc acc = Acc::identity();
  for (int64_t i = threadIdx.x; i < len; i += kThreads) acc.add(stats::to_double(row[i]));
  acc = block_reduce(acc);
  if (threadIdx.x == 0) part[b] = acc;
}

// Stage 2: block c merges the partials of row c and writes out[c, :].
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const Acc* __restrict__ part /* [C, chunks_per_row] */,
                          out_t* __restrict__ out /* [C, kCols] */, int64_t chunks_per_row) {
  const int64_t c = blockIdx.x;
  Acc acc = Acc::identity();
  for (int64_t j = threadIdx.x; j < chunks_per_row; j += kThreads) {
    acc.merge(part[c * chunks_per_row + j]);
  }
  acc = block_reduce(acc);
  if (threadIdx.x == 0) acc.store(out + c * stats::kCols);
}

}  // namespace

at::Tensor tensor_stats_cuda(const at::Tensor& x, bool per_channel) {
  check_float_input(x, "tensor_stats", "x");
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = num_channels(x, per_channel);
  const int64_t N = C > 0 ? x.numel() / C : 0;
  const at::ScalarType out_dtype = stats_dtype(x.scalar_type());
  if (C == 0 || N == 0) return at::zeros({C, stats::kCols}, x.options().dtype(out_dtype));

  const at::Tensor xc = x.contiguous();
  const int64_t chunks_per_row = (N + stats::kChunk - 1) / stats::kChunk;
  const int64_t blocks = C * chunks_per_row;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "autoqnn::tensor_stats: tensor too large for the CUDA kernel (", x.numel(),
              " elements)");
  at::Tensor out = at::empty({C, stats::kCols}, x.options().dtype(out_dtype));
  // Partials as raw bytes: the caching allocator aligns blocks far beyond alignof(Acc).
  at::Tensor part = at::empty({blocks * static_cast<int64_t>(sizeof(Acc))},
                              x.options().dtype(at::kByte));
  Acc* part_ptr = reinterpret_cast<Acc*>(part.mutable_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AUTOQNN_DISPATCH_FLOATING(xc.scalar_type(), "tensor_stats_cuda", [&] {
    stats_partial_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), part_ptr, N, chunks_per_row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (out_dtype == at::kDouble) {
    stats_finalize_kernel<double><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        part_ptr, out.mutable_data_ptr<double>(), chunks_per_row);
  } else {
    stats_finalize_kernel<float><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        part_ptr, out.mutable_data_ptr<float>(), chunks_per_row);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(autoqnn, CUDA, m) { m.impl("tensor_stats", &tensor_stats_cuda); }

}  // namespace autoqnn
