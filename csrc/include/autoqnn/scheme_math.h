// SPDX-License-Identifier: MIT
// Per-element math of the eight AutoQNN schemes, shared by the C++ CPU and CUDA kernels.
// It mirrors autoqnn/ops/reference.py::eval_scheme operation by operation (same rounding:
// nearbyint = round half to even in the default FP mode, like torch.round), so kernels and the
// reference agree on levels except where statistics differ in the last ulp.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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

// a / b where b > 0, else 0. The division is unconditional (the select comes after), so loops
// stay if-convertible and vectorise under the default -ftrapping-math.
template <typename T>
C10_HOST_DEVICE inline T safe_div(T a, T b) {
  const bool ok = b > T(0);
  const T v = a / (ok ? b : T(1));
  return ok ? v : T(0);
}

template <typename T>
C10_HOST_DEVICE inline T sgn_le0_neg(T v) {  // +1 for v > 0, -1 otherwise
  return v > T(0) ? T(1) : T(-1);
}

template <typename T>
C10_HOST_DEVICE inline T sign0(T v) {  // torch.sign (0 -> 0; NaN handled by callers)
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}

// round(clamp(u, lo, hi)) half to even, for integer lo/hi with |lo|, |hi| < 2^21: the clamp comes
// first (equivalent for integer bounds), then the classic add/subtract of 1.5*2^(mantissa bits),
// which rounds half to even in the default FP mode, exactly like nearbyint/torch.round, and
// vectorises with plain SSE2. NaN passes through (all comparisons are false).
template <typename T>
struct RoundMagic;
template <>
struct RoundMagic<float> {
  static constexpr float value = 12582912.0f;  // 1.5 * 2^23
};
template <>
struct RoundMagic<double> {
  static constexpr double value = 6755399441055744.0;  // 1.5 * 2^52
};

template <typename T>
C10_HOST_DEVICE inline T round_clamped(T u, T lo, T hi) {
  const T c = u < lo ? lo : (u > hi ? hi : u);
  const T m = RoundMagic<T>::value;
  return (c + m) - m;
}

// floor(clamp(v, 0, top)) for top < 2^22; NaN -> 0 (its output is replaced by NaN anyway).
// floor = nearest integer r, minus one where r overshoots: exact, and vectorises (unlike an
// int conversion, which GCC's AVX2 code turns into a slow scalar loop).
template <typename T>
C10_HOST_DEVICE inline T floor_clamped_nonneg(T v, T top) {
  T c = v > T(0) ? v : T(0);
  c = c < top ? c : top;
  const T m = RoundMagic<T>::value;
  const T r = (c + m) - m;
  return r > c ? r - T(1) : r;
}

// PotQ level exponent: clip(round(log2 a), 0, lmax) for a = |u| >= 0, exactly as the reference's
// frexp test (round up iff the frexp mantissa f satisfies f > float32(sqrt(1/2)), resp.
// f >= float64(sqrt(1/2))), done on the bit pattern so it vectorises. Inf/NaN -> lmax.
C10_HOST_DEVICE inline int32_t pot_level(float a, int32_t lmax) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(a);
#else
  uint32_t u;
  std::memcpy(&u, &a, sizeof(u));
#endif
  const int32_t e = static_cast<int32_t>((u >> 23) & 0xffu);
  const int32_t m = static_cast<int32_t>(u & 0x7fffffu);
  int32_t l = e - 127 + (m > 0x3504f3 ? 1 : 0);
  l = e == 255 ? lmax : l;
  l = l < 0 ? 0 : l;
  return l > lmax ? lmax : l;
}

C10_HOST_DEVICE inline int32_t pot_level(double a, int32_t lmax) {
#if defined(__CUDA_ARCH__)
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(a));
#else
  uint64_t u;
  std::memcpy(&u, &a, sizeof(u));
#endif
  const int32_t e = static_cast<int32_t>((u >> 52) & 0x7ffu);
  const uint64_t m = u & 0xfffffffffffffull;
  int32_t l = e - 1023 + (m >= 0x6a09e667f3bcdull ? 1 : 0);
  l = e == 2047 ? lmax : l;
  l = l < 0 ? 0 : l;
  return l > lmax ? lmax : l;
}

// The float with bit pattern u.
C10_HOST_DEVICE inline float u32_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// 2^l for 1 <= l < 127 built from the exponent bits (a constant shift, so it vectorises), and 1/2
// for l == 0 (PotQ replaces the level 1 by 1/2).
C10_HOST_DEVICE inline float pot_magnitude_f(int32_t l) {
  return u32_as_float(static_cast<uint32_t>(l == 0 ? 126 : l + 127) << 23);
}

C10_HOST_DEVICE inline double pot_magnitude_d(int32_t l) {
  const uint64_t u = static_cast<uint64_t>(l == 0 ? 1022 : l + 1023) << 52;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

template <typename T>
C10_HOST_DEVICE inline T pot_magnitude(int32_t l);
template <>
C10_HOST_DEVICE inline float pot_magnitude<float>(int32_t l) { return pot_magnitude_f(l); }
template <>
C10_HOST_DEVICE inline double pot_magnitude<double>(int32_t l) { return pot_magnitude_d(l); }

}  // namespace detail

// Result of evaluating one candidate on one element.
template <typename T>
struct Eval {
  T q;       // quantized value
  bool ste;  // straight-through gradient passes (false at non-finite x, ClipQ outside range)
  T d;       // dq/db (only when requested)
};

// Evaluate candidate SID at integer bits `b` on element x with params p[0..kNumParams).
// cb = bits_scale_factor(b) (precomputed by the caller). ResQ loops over b here; the CPU kernel
// has a tile version of it that vectorises across elements.
template <int SID, typename T, bool NEED_D>
C10_HOST_DEVICE inline Eval<T> eval_sid(T x, const T* p, int b, T cb) {
  using namespace detail;
  Eval<T> r{T(0), true, T(0)};
  const bool finite = (x - x) == T(0);  // false for NaN and +-Inf
  T scale = T(-1);                       // >= 0 for the scale schemes
  bool masked = false;
  if constexpr (SID == kBinary) {
    r.q = p[0] * sgn_le0_neg(x);
  } else if constexpr (SID == kTernary) {
    const T ax = x < T(0) ? -x : x;
    r.q = p[1] * (ax > p[0] ? sign0(x) : T(0));
  } else if constexpr (SID == kQuaternary) {
    r.q = p[1] * round_clamped(safe_div(x, p[0]), T(-2), T(1));
  } else if constexpr (SID == kFixed) {
    scale = p[0];
    const T lim = T(int64_t(1) << (b - 1));
    r.q = round_clamped(safe_div(x, scale), -lim, lim - T(1)) * scale;
  } else if constexpr (SID == kResidual) {
    T rr = x, q = T(0), s_prev = T(0);
    for (int i = 0; i < b; ++i) {
      const T s = p[i] * sgn_le0_neg(rr);
      q = q + s;
      rr = rr - s;
      s_prev = s;
    }
    r.q = q;
    if (NEED_D) r.d = T(0.5) * (s_prev + p[b] * sgn_le0_neg(rr));
  } else if constexpr (SID == kZoom) {
    const T mn = p[0];
    scale = p[1];
    const T top = T((int64_t(1) << b) - 1);
    r.q = mn + scale * (floor_clamped_nonneg(safe_div(x - mn, scale), top) + T(0.5));
  } else if constexpr (SID == kClip) {
    scale = p[0];
    const T lim = T(int64_t(1) << (b - 1));
    r.q = scale * (round_clamped(safe_div(x, scale) - T(0.5), -lim, lim - T(1)) + T(0.5));
    const T edge = (lim - T(0.5)) * scale;
    masked = true;
    const T ax = x < T(0) ? -x : x;
    r.ste = ax <= edge;  // one comparison (NaN -> false): keeps the loop branch-free
  } else if constexpr (SID == kPot) {
    scale = p[0];
    const T u = safe_div(x, scale);
    const T a = u < T(0) ? -u : u;
    const int32_t l = pot_level(a, (1 << (b - 1)) - 1);
    r.q = scale * sign0(u) * pot_magnitude<T>(l);
  }
  if (x != x) r.q = x;  // NaN propagates
  if (!masked) r.ste = finite;
  if (NEED_D) {
    // STE dPhi/du = 1 on every element (ClipQ's clipped ones too): d = cb * (q - x).
    if (scale >= T(0)) r.d = scale > T(0) ? cb * (r.q - x) : T(0);
    if (!finite) r.d = T(0);
  }
  return r;
}

// Runtime-dispatched version (one switch per element: fine on GPU, used by scalar code).
template <typename T, bool NEED_D>
C10_HOST_DEVICE inline Eval<T> eval_scheme(int64_t sid, T x, const T* p, int b, T cb) {
  switch (sid) {
    case kBinary: return eval_sid<kBinary, T, NEED_D>(x, p, b, cb);
    case kTernary: return eval_sid<kTernary, T, NEED_D>(x, p, b, cb);
    case kQuaternary: return eval_sid<kQuaternary, T, NEED_D>(x, p, b, cb);
    case kFixed: return eval_sid<kFixed, T, NEED_D>(x, p, b, cb);
    case kResidual: return eval_sid<kResidual, T, NEED_D>(x, p, b, cb);
    case kZoom: return eval_sid<kZoom, T, NEED_D>(x, p, b, cb);
    case kClip: return eval_sid<kClip, T, NEED_D>(x, p, b, cb);
    default: return eval_sid<kPot, T, NEED_D>(x, p, b, cb);
  }
}

}  // namespace autoqnn
