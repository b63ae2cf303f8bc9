// SPDX-License-Identifier: MIT
// The accumulator of autoqnn::tensor_stats, shared by the CPU and CUDA kernels (host + device).
//
// Columns (kCols = 7): count of finite elements, sum|x|, sum x, sum x^2, min, max, max|x|, all over
// FINITE elements only (NaN and +-Inf are skipped); min/max are 0 for a row without finite
// elements. Accumulation is in double whatever the input dtype. A row is reduced in fixed chunks
// of kChunk elements whose partials are merged in chunk order, so results do not depend on the
// number of threads (CPU) or on scheduling (CUDA).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace autoqnn {
namespace stats {

constexpr int kCols = 7;
constexpr int64_t kChunk = 4096;  // elements per chunk (fixed: determinism)
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kMax = std::numeric_limits<double>::max();

// Plain aggregate (no constructors) so that it can live in CUDA __shared__ memory.
struct Acc {
  double n, s1, sx, s2, mn, mx, ma;

  C10_HOST_DEVICE static Acc identity() { return {0.0, 0.0, 0.0, 0.0, kInf, -kInf, 0.0}; }

  // Branch-free: a non-finite v counts as 0 in the sums and is neutral for min/max.
  C10_HOST_DEVICE void add(double v) {
    const bool fin = fabs(v) <= kMax;  // false for NaN and +-Inf
    const double d = fin ? v : 0.0;
    const double a = fabs(d);
    n += fin ? 1.0 : 0.0;
    s1 += a;
    sx += d;
    s2 += d * d;
    const double lo = fin ? v : kInf;
    const double hi = fin ? v : -kInf;
    mn = lo < mn ? lo : mn;
    mx = hi > mx ? hi : mx;
    ma = a > ma ? a : ma;
  }

  C10_HOST_DEVICE void merge(const Acc& o) {
    n += o.n;
    s1 += o.s1;
    sx += o.sx;
    s2 += o.s2;
    mn = o.mn < mn ? o.mn : mn;
    mx = o.mx > mx ? o.mx : mx;
    ma = o.ma > ma ? o.ma : ma;
  }

  // Writes one output row (kCols values); min/max of a row without finite elements are 0.
  template <typename out_t>
  C10_HOST_DEVICE void store(out_t* dst /* [kCols] */) const {
    const bool any = n > 0.0;
    dst[0] = static_cast<out_t>(n);
    dst[1] = static_cast<out_t>(s1);
    dst[2] = static_cast<out_t>(sx);
    dst[3] = static_cast<out_t>(s2);
    dst[4] = static_cast<out_t>(any ? mn : 0.0);
    dst[5] = static_cast<out_t>(any ? mx : 0.0);
    dst[6] = static_cast<out_t>(ma);
  }
};

// Element -> double (c10::Half / c10::BFloat16 go through float, exactly).
template <typename scalar_t>
C10_HOST_DEVICE inline double to_double(scalar_t v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
C10_HOST_DEVICE inline double to_double<double>(double v) {
  return v;
}

}  // namespace stats
}  // namespace autoqnn
