// SPDX-License-Identifier: MIT
// Argument checks shared by the host functions of the C++/CUDA kernels. User errors use
// TORCH_CHECK* (they reach Python as RuntimeError / TypeError with this message); device or
// layout invariants the dispatcher already guarantees use TORCH_INTERNAL_ASSERT.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "autoqnn/scheme_math.h"

namespace autoqnn {

// Input dtypes every kernel accepts.
inline bool is_kernel_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

// TypeError naming the dtype, e.g. "autoqnn::tensor_stats: x has dtype torch.int64; ...".
inline void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), "autoqnn::", op, ": ", name,
                   " has dtype torch.", c10::getDtypeNames(t.scalar_type()).first,
                   "; expected float32, float16, bfloat16 or float64");
}

// Statistics (and every accumulation) are float64 for float64 inputs, float32 otherwise.
inline at::ScalarType stats_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows of per-channel statistics: channels = dim 0; 0-d tensors are per-tensor (one row).
inline int64_t num_channels(const at::Tensor& x, bool per_channel) {
  return (per_channel && x.dim() > 0) ? x.size(0) : 1;
}

// Forward integer bits of one candidate: clip(round(b), b_min, b_max) (SPEC 4.1), round half to
// even; ValueError for an unknown scheme or a non-finite learned bitwidth.
inline int int_bit(double b, int64_t s) {
  TORCH_CHECK_VALUE(s >= 0 && s < kNumSchemes, "autoqnn: unknown scheme id ", s);
  TORCH_CHECK_VALUE(std::isfinite(b), "autoqnn: learned bits for scheme '", scheme_name(s),
                    "' must be finite, got ", b);
  double r = std::nearbyint(b);
  r = std::min<double>(std::max<double>(r, kMinBits[s]), kMaxBits[s]);
  return static_cast<int>(r);
}

// The values of a small real tensor (bits, mixture weights) as doubles on the host, in row-major
// order. A CPU float32/float64 tensor of at most 2 dims is read in place through its strides (an
// expanded 0-d bits tensor is common): no conversion, no allocation, which is most of these
// ops' host time on a small tensor. Anything else takes one conversion (for a device tensor, a
// device-to-host copy).
inline std::vector<double> host_doubles(const at::Tensor& t) {
  const int64_t n = t.numel();
  std::vector<double> out(static_cast<size_t>(n));
  if (n == 0) return out;
  const at::ScalarType st = t.scalar_type();
  // (a lazy negation or zero tensor is not plain memory: those take the conversion)
  if (t.device().is_cpu() && t.dim() <= 2 && (st == at::kFloat || st == at::kDouble) && !t.is_neg() &&
      !t._is_zerotensor()) {
    const int64_t rows = t.dim() == 2 ? t.size(0) : 1;
    const int64_t cols = t.dim() == 0 ? 1 : t.size(t.dim() - 1);
    const int64_t rs = t.dim() == 2 ? t.stride(0) : 0;
    const int64_t cs = t.dim() == 0 ? 0 : t.stride(t.dim() - 1);
    auto read = [&](const auto* p) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = static_cast<double>(p[r * rs + c * cs]);
    };
    if (st == at::kFloat) read(t.const_data_ptr<float>());
    else read(t.const_data_ptr<double>());
    return out;
  }
  const at::Tensor h = t.detach().to(at::kCPU, at::kDouble).contiguous();
  std::copy(h.const_data_ptr<double>(), h.const_data_ptr<double>() + n, out.begin());
  return out;
}

// int_bit of every candidate; ValueError for a bits/schemes length mismatch. bits are tiny
// ([K]) and usually on the host (host_doubles reads them in place). Shared by the CPU and CUDA
// kernels.
inline std::vector<int> int_bits(const at::Tensor& bits, at::IntArrayRef schemes) {
  TORCH_CHECK_VALUE(bits.numel() == static_cast<int64_t>(schemes.size()), "autoqnn: bits has ",
                    bits.numel(), " entries for ", schemes.size(), " schemes");
  const std::vector<double> bv = host_doubles(bits.dim() > 1 ? bits.reshape({-1}) : bits);
  std::vector<int> out(schemes.size());
  for (size_t k = 0; k < schemes.size(); ++k) out[k] = int_bit(bv[k], schemes[k]);
  return out;
}

// Batched ops: bits [R, K] (one row of candidates' bits per row of x) -> R*K integers, row-major.
inline std::vector<int> int_bits_rows(const at::Tensor& bits, at::IntArrayRef schemes) {
  const int64_t K = static_cast<int64_t>(schemes.size());
  TORCH_CHECK_VALUE(bits.dim() == 2 && bits.size(1) == K, "autoqnn: bits must have shape [rows, ", K,
                    "], got ", bits.sizes());
  const std::vector<double> bv = host_doubles(bits);
  std::vector<int> out(bv.size());
  for (size_t i = 0; i < bv.size(); ++i) out[i] = int_bit(bv[i], schemes[i % K]);
  return out;
}

}  // namespace autoqnn
