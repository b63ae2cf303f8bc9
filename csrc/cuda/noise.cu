// SPDX-License-Identifier: MIT
// autoqnn::uniform48(Tensor seed, Tensor steps, int k) -> Tensor on CUDA: the same integers as
// csrc/cpu/noise.cpp (shared hash: autoqnn/noise.h), one thread per (step, candidate), on the
// current stream. seed may live on the host (read as a launch argument) or on steps' device (read
// by every thread: no host synchronisation, so a compiled step can keep its counters on the GPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "autoqnn/noise.h"

namespace autoqnn {

void check_uniform48_args(const at::Tensor& seed, const at::Tensor& steps, int64_t k);  // noise.cpp

namespace {

__global__ void uniform48_kernel(const int64_t* __restrict__ seed_ptr, int64_t seed_val,
                                 const int64_t* __restrict__ steps, int64_t n, int64_t k,
                                 int64_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * k) return;
  const int64_t r = idx / k, i = idx - r * k;
  const int64_t s = seed_ptr ? *seed_ptr : seed_val;
  out[idx] = noise::uniform48(noise::step_hash(s, steps[r]), i);
}

at::Tensor uniform48_cuda(const at::Tensor& seed, const at::Tensor& steps, int64_t k) {
  check_uniform48_args(seed, steps, k);
  TORCH_CHECK(steps.is_cuda(), "autoqnn::uniform48: steps must be on a CUDA device when seed is (got ",
              steps.device(), ")");
  TORCH_CHECK(seed.is_cpu() || seed.device() == steps.device(),
              "autoqnn::uniform48: seed must be on the host or on steps' device ", steps.device(),
              ", got ", seed.device());
  const c10::cuda::CUDAGuard guard(steps.device());
  const at::Tensor t = steps.to(at::kLong).contiguous();
  auto shape = steps.sizes().vec();
  shape.push_back(k);
  at::Tensor out = at::empty(shape, steps.options().dtype(at::kLong));
  const int64_t total = t.numel() * k;
  if (total == 0) return out;
  at::Tensor seed_dev;
  int64_t seed_val = 0;
  if (seed.is_cpu()) {
    seed_val = seed.to(at::kLong).reshape({-1}).item<int64_t>();
  } else {
    seed_dev = seed.to(at::kLong).reshape({-1}).contiguous();
  }
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "autoqnn::uniform48: too many outputs (", total, ")");
  uniform48_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seed_dev.defined() ? seed_dev.const_data_ptr<int64_t>() : nullptr, seed_val,
      t.const_data_ptr<int64_t>(), t.numel(), k, out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(autoqnn, CUDA, m) { m.impl("uniform48", &uniform48_cuda); }

}  // namespace autoqnn
