// SPDX-License-Identifier: MIT
// autoqnn::uniform48(Tensor seed, Tensor steps, int k) -> Tensor on CPU: int64
// [*steps.shape, k], the 48-bit integers of the Gumbel noise hash (autoqnn/noise.h) for every
// (step, candidate). One call replaces the ~75 int64 tensor ops of the reference
// (autoqnn/ops/reference.py::uniform48_ref), which Inductor would otherwise fuse at great
// compile-time cost in every quantizer of a compiled search step. The schema is declared in
// Python (autoqnn/ops/_schema.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "autoqnn/noise.h"

namespace autoqnn {

// Shared argument checks (also used by csrc/cuda/noise.cu): integer seed with one element,
// integer steps, 0 <= k <= kMaxK.
void check_uniform48_args(const at::Tensor& seed, const at::Tensor& steps, int64_t k) {
  TORCH_CHECK_TYPE(at::isIntegralType(seed.scalar_type(), /*includeBool=*/false),
                   "autoqnn::uniform48: seed must be an integer tensor, got dtype torch.",
                   c10::getDtypeNames(seed.scalar_type()).first);
  TORCH_CHECK_VALUE(seed.numel() == 1, "autoqnn::uniform48: seed must have one element, got ",
                    seed.numel());
  TORCH_CHECK_TYPE(at::isIntegralType(steps.scalar_type(), /*includeBool=*/false),
                   "autoqnn::uniform48: steps must be an integer tensor, got dtype torch.",
                   c10::getDtypeNames(steps.scalar_type()).first);
  TORCH_CHECK_VALUE(k >= 0 && k <= noise::kMaxK, "autoqnn::uniform48: k must be in [0, ",
                    noise::kMaxK, "], got ", k);
}

namespace {

at::Tensor uniform48_cpu(const at::Tensor& seed, const at::Tensor& steps, int64_t k) {
  check_uniform48_args(seed, steps, k);
  TORCH_CHECK(seed.device().is_cpu(), "autoqnn::uniform48: seed must be on steps' device (cpu), got ",
              seed.device());
  const int64_t s = seed.to(at::kLong).reshape({-1}).item<int64_t>();
  const at::Tensor t = steps.to(at::kLong).contiguous();
  auto shape = steps.sizes().vec();
  shape.push_back(k);
  at::Tensor out = at::empty(shape, steps.options().dtype(at::kLong));
  const int64_t n = t.numel();
  if (n == 0 || k == 0) return out;
  const int64_t* tp = t.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, at::internal::GRAIN_SIZE / (8 * k)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const uint64_t h = noise::step_hash(s, tp[r]);
      for (int64_t i = 0; i < k; ++i) op[r * k + i] = noise::uniform48(h, i);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(autoqnn, CPU, m) { m.impl("uniform48", &uniform48_cpu); }

}  // namespace autoqnn
