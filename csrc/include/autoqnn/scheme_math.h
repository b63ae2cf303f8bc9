// SPDX-License-Identifier: MIT
// Per-element math of the eight AutoQNN schemes, shared by the C++ CPU and CUDA kernels.
// It mirrors autoqnn/ops/reference.py::eval_scheme operation by operation (same rounding:
// nearbyint = round half to even in the default FP mode, like torch.round), so kernels and the
// reference agree on levels except where statistics differ in the last ulp.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace autoqnn {

enum SchemeId : int64_t {
  kBinary = 0,
  kTernary = 1,
  kQuaternary = 2,
  kFixed = 3,
  kResidual = 4,
  kZoom = 5,
  kClip = 6,
  kPot = 7,
  kNumSchemes = 8,
};

// Slots per (candidate, channel) in a params tensor [K, C, kNumParams] (schemes.NUM_PARAMS).
constexpr int kNumParams = 12;
// Number of statistics columns of tensor_stats: count, sum|x|, sum x, sum x^2, min, max, max|x|.
constexpr int kNumStats = 7;

// Bit ranges (SPEC decisions): index = scheme id.
constexpr int kMinBits[kNumSchemes] = {1, 2, 2, 2, 2, 2, 2, 2};
constexpr int kMaxBits[kNumSchemes] = {1, 2, 2, 8, 8, 8, 8, 4};

// ClipQ step/sigma and PotQ alpha/sigma; index = bits.
constexpr double kClipLambda[9] = {0, 0, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308};
constexpr double kPotLambda[5] = {0, 0, 0.9, 0.4, 0.03};
constexpr double kQuaternaryLambda = 0.9957;
constexpr double kTernaryDelta = 0.7;

inline const char* scheme_name(int64_t s) {
  switch (s) {
    case kBinary: return "binary";
    case kTernary: return "ternary";
    case kQuaternary: return "quaternary";
    case kFixed: return "fixed";
    case kResidual: return "residual";
    case kZoom: return "zoom";
    case kClip: return "clip";
    case kPot: return "pot";
    default: return "?";
  }
}

// dalpha/db / alpha = -ln2 * 2^b / (2^b - 1)  (SPEC 4.1)
inline double bits_scale_factor(int b) {
  const double p = std::ldexp(1.0, b);
  return -0.69314718055994530942 * p / (p - 1.0);
}

namespace detail {

template <typename T>
C10_HOST_DEVICE inline T clampv(T v, T lo, T hi) {
  // NaN-propagating like torch.clamp
  return v != v ? v : (v < lo ? lo : (v > hi ? hi : v));
}

template <typename T>
C10_HOST_DEVICE inline T safe_div(T a, T b) {
  return b > T(0) ? a / b : T(0);
}

template <typename T>
C10_HOST_DEVICE inline T sgn_le0_neg(T v) {  // +1 for v > 0, -1 otherwise
  return v > T(0) ? T(1) : T(-1);
}

template <typename T>
C10_HOST_DEVICE inline T sign0(T v) {  // torch.sign (0 -> 0; NaN handled by callers)
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}

// Threshold on the frexp mantissa for round(log2|u|) (see reference.py).
template <typename T>
struct SqrtHalf;
template <>
struct SqrtHalf<float> {
  C10_HOST_DEVICE static bool up(float f) { return f > 0.70710677f; }
};
template <>
struct SqrtHalf<double> {
  C10_HOST_DEVICE static bool up(double f) { return f >= 0.7071067811865476; }
};

}  // namespace detail

// Result of evaluating one candidate on one element.
template <typename T>
struct Eval {
  T q;       // quantized value
  bool ste;  // straight-through gradient passes (false at non-finite x, ClipQ outside range)
  T d;       // dq/db (only when requested)
};

// Evaluate candidate `sid` at integer bits `b` on element x with params p[0..kNumParams).
// cb = bits_scale_factor(b) (precomputed by the caller).
template <typename T, bool NEED_D>
C10_HOST_DEVICE inline Eval<T> eval_scheme(int64_t sid, T x, const T* p, int b, T cb) {
  using namespace detail;
  Eval<T> r{T(0), true, T(0)};
  const bool finite = std::isfinite(x);
  T scale = T(-1);  // > 0 for the scale schemes once set
  bool masked = false;
  switch (sid) {
    case kBinary:
      r.q = p[0] * sgn_le0_neg(x);
      break;
    case kTernary: {
      const T t = (std::fabs(x) > p[0]) ? sign0(x) : T(0);
      r.q = p[1] * t;
      break;
    }
    case kQuaternary: {
      const T v = clampv(T(std::nearbyint(safe_div(x, p[0]))), T(-2), T(1));
      r.q = p[1] * v;
      break;
    }
    case kFixed: {
      scale = p[0];
      const T lim = T(int64_t(1) << (b - 1));
      const T m = clampv(T(std::nearbyint(safe_div(x, scale))), -lim, lim - T(1));
      r.q = m * scale;
      break;
    }
    case kResidual: {
      T rr = x, q = T(0), s_prev = T(0);
      for (int i = 0; i < b; ++i) {
        const T s = p[i] * sgn_le0_neg(rr);
        q = q + s;
        rr = rr - s;
        s_prev = s;
      }
      r.q = q;
      if (NEED_D) {
        const T s_next = p[b] * sgn_le0_neg(rr);
        r.d = T(0.5) * (s_prev + s_next);
      }
      break;
    }
    case kZoom: {
      const T mn = p[0];
      scale = p[1];
      const T top = T((int64_t(1) << b) - 1);
      const T k = clampv(T(std::floor(safe_div(x - mn, scale))), T(0), top);
      r.q = mn + scale * (k + T(0.5));
      break;
    }
    case kClip: {
      scale = p[0];
      const T lim = T(int64_t(1) << (b - 1));
      const T k = clampv(T(std::nearbyint(safe_div(x, scale) - T(0.5))), -lim, lim - T(1));
      r.q = scale * (k + T(0.5));
      const T edge = (lim - T(0.5)) * scale;
      masked = true;
      r.ste = (x >= -edge) && (x <= edge);
      break;
    }
    case kPot: {
      scale = p[0];
      const T u = safe_div(x, scale);
      const T a = std::fabs(u);
      const int lmax = (1 << (b - 1)) - 1;
      int l;
      if (std::isinf(a)) {
        l = lmax;
      } else {
        int e = 0;
        const T f = std::frexp(a, &e);
        l = e - 1 + (SqrtHalf<T>::up(f) ? 1 : 0);
      }
      l = l < 0 ? 0 : (l > lmax ? lmax : l);
      const T mag = l == 0 ? T(0.5) : T(int64_t(1) << l);
      r.q = scale * sign0(u) * mag;
      break;
    }
    default:
      break;
  }
  if (x != x) r.q = x;  // NaN propagates
  if (!masked) r.ste = finite;
  if (NEED_D) {
    if (scale >= T(0)) {  // a scale scheme
      r.d = scale > T(0) ? cb * (r.q - (r.ste ? x : T(0))) : T(0);
    } else if (sid != kResidual) {
      r.d = T(0);
    }
    if (!finite) r.d = T(0);
  }
  return r;
}

}  // namespace autoqnn
