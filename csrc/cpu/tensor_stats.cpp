// SPDX-License-Identifier: MIT
// autoqnn::tensor_stats(Tensor x, bool per_channel) -> Tensor [C, 7] on CPU.
//
// Per row (channel = dim 0 with per_channel, else the whole tensor): count of finite elements,
// sum|x|, sum x, sum x^2, min, max, max|x| over finite elements (see autoqnn/tensor_stats.h for the
// accumulator and autoqnn/ops/reference.py::tensor_stats_ref for the oracle). Output float64 for
// float64 input, float32 otherwise. The schema is declared in Python (autoqnn/ops/_schema.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "autoqnn/memory_order.h"
#include "autoqnn/checks.h"
#include "autoqnn/dispatch.h"
#include "autoqnn/tensor_stats.h"

namespace autoqnn {
namespace {

using stats::Acc;

// Independent accumulators per chunk: breaks the add-latency chain and lets the compiler
// vectorise; merged in lane order, so still deterministic.
constexpr int64_t kLanes = 8;

template <typename scalar_t>
Acc chunk_stats(const scalar_t* x /* [len] */, int64_t len) {
  Acc lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = Acc::identity();
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l].add(stats::to_double(x[i + l]));
  }
  for (int64_t l = 0; i + l < len; ++l) lane[l].add(stats::to_double(x[i + l]));
  for (int64_t l = 1; l < kLanes; ++l) lane[0].merge(lane[l]);
  return lane[0];
}

template <typename scalar_t, typename out_t>
void tensor_stats_kernel(const scalar_t* x /* [C, N] contiguous */, out_t* out /* [C, kCols] */,
                         int64_t C, int64_t N) {
  const int64_t per_row = (N + stats::kChunk - 1) / stats::kChunk;
  std::vector<Acc> part(static_cast<size_t>(C * per_row));  // [C, per_row] chunk partials
  // Chunks are independent tasks; ~32k elements per task before threads are worth it.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / stats::kChunk);
  at::parallel_for(0, C * per_row, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t c = t / per_row;
      const int64_t begin = (t % per_row) * stats::kChunk;
      part[t] = chunk_stats(x + c * N + begin, std::min(stats::kChunk, N - begin));
    }
  });
  for (int64_t c = 0; c < C; ++c) {  // chunk order: independent of the thread count
    Acc acc = part[c * per_row];
    for (int64_t j = 1; j < per_row; ++j) acc.merge(part[c * per_row + j]);
    acc.store(out + c * stats::kCols);
  }
}

}  // namespace

at::Tensor tensor_stats_cpu(const at::Tensor& x, bool per_channel) {
  check_float_input(x, "tensor_stats", "x");
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  const int64_t C = num_channels(x, per_channel);
  const int64_t N = C > 0 ? x.numel() / C : 0;
  at::Tensor out = at::zeros({C, stats::kCols}, x.options().dtype(stats_dtype(x.scalar_type())));
  if (C == 0 || N == 0) return out;  // empty: zeros [C, 7]
  const at::Tensor xc = in_memory_order(x, memory_order(x, per_channel));  // a view of a dense x
  AUTOQNN_DISPATCH_FLOATING(xc.scalar_type(), "tensor_stats_cpu", [&] {
    if (out.scalar_type() == at::kDouble) {
      tensor_stats_kernel(xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<double>(), C, N);
    } else {
      tensor_stats_kernel(xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), C, N);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(autoqnn, CPU, m) { m.impl("tensor_stats", &tensor_stats_cpu); }

}  // namespace autoqnn
