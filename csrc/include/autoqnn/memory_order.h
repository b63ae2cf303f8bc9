// SPDX-License-Identifier: MIT
// Dense layouts other than the contiguous one (channels-last activations and weights, a
// transposed matrix): the ops read x in its memory order, without a copy, and lay their outputs
// out the same way, so a channels-last model stays channels-last through its quantizers. The
// twin of autoqnn/ops/reference.py::memory_order; the fake kernels use that one, so the output
// strides of every kernel and of the fakes agree.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace autoqnn {

// x's dims from outermost to innermost in memory when x is dense in a layout other than the
// contiguous one: x.permute(order) is then contiguous. Per channel, dim 0 stays first (each
// channel's elements stay one contiguous row); a layout where it is not outermost gets no order.
// Dims of equal stride (size-1 dims) keep their index order (a stable sort, as the Python twin).
// Empty: x is contiguous, has fewer than 2 dims, or is not dense (the ops then read a contiguous
// copy and write contiguous outputs).
inline std::vector<int64_t> memory_order(const at::Tensor& x, bool per_channel) {
  if (x.dim() < 2 || x.is_contiguous()) return {};
  std::vector<int64_t> order(static_cast<size_t>(x.dim()));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin() + (per_channel ? 1 : 0), order.end(),
                   [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  if (!x.permute(order).is_contiguous()) return {};
  return order;
}

// t's elements in the memory order of x (memory_order(x, ...)) as a contiguous tensor: a view
// when t is laid out like x, a copy otherwise.
inline at::Tensor in_memory_order(const at::Tensor& t, const std::vector<int64_t>& order) {
  return (order.empty() ? t : t.permute(order)).contiguous();
}

// A result computed in memory order (contiguous, dims permuted) as a tensor of x's dims: a view
// with x's layout.
inline at::Tensor from_memory_order(const at::Tensor& t, const std::vector<int64_t>& order) {
  if (order.empty()) return t;
  std::vector<int64_t> inv(order.size());
  for (size_t i = 0; i < order.size(); ++i) inv[static_cast<size_t>(order[i])] = static_cast<int64_t>(i);
  return t.permute(inv);
}

}  // namespace autoqnn
