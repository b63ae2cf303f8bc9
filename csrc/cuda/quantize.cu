// SPDX-License-Identifier: MIT
// CUDA kernels of autoqnn::quantize(_backward) and autoqnn::mixture(_backward).
//
// One read of x (and grad_y) per pass; every candidate is evaluated in registers with the shared
// per-element math of csrc/include/autoqnn/scheme_math.h (the twin of
// autoqnn/ops/reference.py::eval_scheme). The backward writes grad_x and, per block, the K sums
// <grad_y, q_k> and K sums <grad_y, dq_k/db> into a [blocks, 2K] buffer that is reduced on the
// host side in a fixed order (float64): no atomics, nothing of size K x N, deterministic for a
// given shape. scheme_params' CUDA kernels are in tensor_stats.cu. With AUTOQNN_CUDA_LEVELS the
// per-tensor ops take the levels-table pass instead (namespace lv below): same results, bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <cmath>
#include <vector>

#include "autoqnn/memory_order.h"
#include "autoqnn/batched_rows.h"
#include "autoqnn/checks.h"
#include "autoqnn/row_map.h"
#include "autoqnn/scheme_math.h"
#include "autoqnn/tensor_stats.h"  // stats::kChunk: the batched ops' chunks

namespace autoqnn {
namespace {

constexpr int kMaxK = kNumSchemes;  // at most one of each scheme per mixture
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // fixed cap: the grid (hence the sums) depends on N only

// Candidate description passed by value (kernel parameter space).
template <typename T>
struct Cands {
  int32_t K;
  int32_t sid[kMaxK];
  int32_t bits[kMaxK];
  T cb[kMaxK];
};

template <typename T>
Cands<T> make_cands(const at::Tensor& bits, at::IntArrayRef schemes) {
  TORCH_CHECK_VALUE(!schemes.empty() && schemes.size() <= static_cast<size_t>(kMaxK),
                    "autoqnn: between 1 and ", kMaxK, " schemes per call, got ", schemes.size());
  const std::vector<int> ib = int_bits(bits, schemes);
  Cands<T> c{};
  c.K = static_cast<int32_t>(schemes.size());
  for (int k = 0; k < c.K; ++k) {
    c.sid[k] = static_cast<int32_t>(schemes[k]);
    c.bits[k] = static_cast<int32_t>(ib[k]);
    c.cb[k] = static_cast<T>(bits_scale_factor(c.bits[k]));
  }
  return c;
}

int64_t grid_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

// The output kernels take kElems elements per thread and step, and evaluate one candidate at all
// of them before the next: the scheme switch, the candidate's bits and weight, and (per tensor)
// its params are read once per kElems elements instead of once per element, and the kElems
// evaluations are independent (instruction-level parallelism). Each element's sum over k keeps the
// candidate order, so the values are those of one element at a time.
constexpr int kElems = 4;

template <int S, typename T, bool ND, typename F>
__device__ __forceinline__ void eval_each(const T* v, const T* const* pe, int64_t koff, int b, T cb, F& f) {
#pragma unroll
  for (int e = 0; e < kElems; ++e) f(e, eval_sid<S, T, ND>(v[e], pe[e] + koff, b, cb));
}

// f(e, eval of scheme sid at v[e] with params pe[e] + koff) for e = 0 .. kElems - 1.
template <typename T, bool ND, typename F>
__device__ __forceinline__ void eval_candidate(int32_t sid, const T* v, const T* const* pe, int64_t koff, int b, T cb,
                                               F&& f) {
  switch (sid) {
    case kBinary: eval_each<kBinary, T, ND>(v, pe, koff, b, cb, f); break;
    case kTernary: eval_each<kTernary, T, ND>(v, pe, koff, b, cb, f); break;
    case kQuaternary: eval_each<kQuaternary, T, ND>(v, pe, koff, b, cb, f); break;
    case kFixed: eval_each<kFixed, T, ND>(v, pe, koff, b, cb, f); break;
    case kResidual: eval_each<kResidual, T, ND>(v, pe, koff, b, cb, f); break;
    case kZoom: eval_each<kZoom, T, ND>(v, pe, koff, b, cb, f); break;
    case kClip: eval_each<kClip, T, ND>(v, pe, koff, b, cb, f); break;
    default: eval_each<kPot, T, ND>(v, pe, koff, b, cb, f); break;
  }
}

// y[i] = sum_k w_k q_k(x[i]); w == nullptr: single scheme, weight exactly 1. UNIFORM: one row
// (C == 1), so every element reads the same params (loaded once per candidate and step).
template <typename scalar_t, typename T, bool UNIFORM>
__global__ void __launch_bounds__(kThreads)
    mixture_fwd_kernel(const scalar_t* __restrict__ x /* [C, N] */, scalar_t* __restrict__ y /* [C, N] */,
                       const T* __restrict__ params /* [K, C, kNumParams] */,
                       const T* __restrict__ w /* [K] or nullptr */, Cands<T> cs, int64_t C, int64_t N) {
  const int64_t total = C * N;
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t kstride = C * kNumParams;
  for (int64_t i0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i0 < total; i0 += kElems * G) {
    T v[kElems], acc[kElems];
    const T* pe[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * G;
      const bool in = i < total;
      v[e] = in ? static_cast<T>(x[i]) : T(0);
      pe[e] = UNIFORM ? params : params + (in ? i / N : 0) * kNumParams;
      acc[e] = T(0);
    }
#pragma unroll 1
    for (int k = 0; k < cs.K; ++k) {
      const T wk = w ? w[k] : T(1);
      eval_candidate<T, false>(cs.sid[k], v, pe, k * kstride, cs.bits[k], cs.cb[k], [&](int e, const Eval<T>& r) {
        const T term = w ? r.q * wk : r.q;
        acc[e] = k == 0 ? term : acc[e] + term;
      });
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * G;
      if (i < total) y[i] = static_cast<scalar_t>(acc[e]);
    }
  }
}

// The backward's per-thread sums live in dynamic shared memory, acc[j * kThreads + t] for thread t
// and sum j (j < K: <g, q_j>, K <= j < 2K: <g, dq_{j-K}/db>), so that the candidate loop need not
// be unrolled to keep them in registers. Bytes needed per block:
template <typename T>
size_t bwd_smem_bytes(int64_t K) {
  return static_cast<size_t>(2 * K * kThreads) * sizeof(T);
}

template <typename T>
__device__ __forceinline__ T* bwd_sums() {
  extern __shared__ __align__(16) unsigned char bwd_smem[];
  return reinterpret_cast<T*>(bwd_smem);
}

// One candidate's parameters in one row: integer bits, bits scale factor, mixture weight, and the
// offset of its params from candidate 0's.
template <typename T>
struct CandArgs {
  int b;
  T cb, w;
  int64_t koff;
};

// One backward step at kElems elements (v, g; in: inside the tensor): adds g*q_k (and g*dq_k/db)
// to this thread's sums, element by element in order, and returns in gxf[e] the grad_x factor
// sum_k w_k mask_k. arg(k) gives candidate k's CandArgs; w_identity = sum of the non-ClipQ weights.
template <typename T, bool ND, typename ArgF>
__device__ __forceinline__ void bwd_step(const Cands<T>& cs, const T* v, const T* g, const bool* in,
                                         const T* const* pe, T w_identity, ArgF arg, T* acc, T* gxf) {
  const int t = threadIdx.x;
  const int K = cs.K;
  T masked[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) masked[e] = T(0);
  bool any_masked = false;
#pragma unroll 1
  for (int k = 0; k < K; ++k) {
    const CandArgs<T> ca = arg(k);
    const bool clip = cs.sid[k] == kClip;
    T aq = acc[k * kThreads + t];
    T ad = ND ? acc[(K + k) * kThreads + t] : T(0);
    eval_candidate<T, ND>(cs.sid[k], v, pe, ca.koff, ca.b, ca.cb, [&](int e, const Eval<T>& r) {
      if (clip) {
        const T term = r.ste ? ca.w : T(0);
        masked[e] = any_masked ? masked[e] + term : term;
      }
      if (in[e]) {
        aq += g[e] * r.q;
        if (ND) ad += g[e] * r.d;
      }
    });
    any_masked = any_masked || clip;
    acc[k * kThreads + t] = aq;
    if (ND) acc[(K + k) * kThreads + t] = ad;
  }
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const T factor = any_masked ? masked[e] + w_identity : w_identity;
    const bool fin = (v[e] - v[e]) == T(0);
    gxf[e] = fin ? g[e] * factor : T(0);
  }
}

// part[blockIdx.x, j] = the block's sum j over its threads (zeros for j < K without need_w): the
// same fixed tree for every j (deterministic). Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void bwd_block_sums(T* acc, int K, bool need_w, T* __restrict__ part) {
  const int t = threadIdx.x;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s)
      for (int j = 0; j < 2 * K; ++j) acc[j * kThreads + t] += acc[j * kThreads + t + s];
    __syncthreads();
  }
  if (t < 2 * K) part[blockIdx.x * 2 * K + t] = (t < K && !need_w) ? T(0) : acc[t * kThreads];
}

// grad_x and per-block partial sums part[block, 0..K) = <g, q_k>, part[block, K..2K) = <g, d_k>.
// Launched with bwd_smem_bytes<T>(K) of dynamic shared memory; UNIFORM as in mixture_fwd_kernel.
template <typename scalar_t, typename T, bool ND, bool UNIFORM>
__global__ void __launch_bounds__(kThreads)
    mixture_bwd_kernel(const scalar_t* __restrict__ gy /* [C, N] */, const scalar_t* __restrict__ x /* [C, N] */,
                       scalar_t* __restrict__ gx /* [C, N] */, const T* __restrict__ params /* [K, C, P] */,
                       const T* __restrict__ w /* [K] or nullptr */, Cands<T> cs, int64_t C, int64_t N,
                       bool need_w, T* __restrict__ part /* [gridDim.x, 2K] */) {
  T* acc = bwd_sums<T>();
  for (int j = 0; j < 2 * cs.K; ++j) acc[j * kThreads + threadIdx.x] = T(0);
  T w_identity = T(0);
  for (int k = 0; k < cs.K; ++k)
    if (cs.sid[k] != kClip) w_identity = w_identity + (w ? w[k] : T(1));
  const int64_t total = C * N;
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t kstride = C * kNumParams;
  auto arg = [&](int k) { return CandArgs<T>{cs.bits[k], cs.cb[k], w ? w[k] : T(1), k * kstride}; };
  for (int64_t i0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i0 < total; i0 += kElems * G) {
    T v[kElems], g[kElems], gxf[kElems];
    bool in[kElems];
    const T* pe[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * G;
      in[e] = i < total;
      v[e] = in[e] ? static_cast<T>(x[i]) : T(0);
      g[e] = in[e] ? static_cast<T>(gy[i]) : T(0);
      pe[e] = UNIFORM ? params : params + (in[e] ? i / N : 0) * kNumParams;
    }
    bwd_step<T, ND>(cs, v, g, in, pe, w_identity, arg, acc, gxf);
#pragma unroll
    for (int e = 0; e < kElems; ++e)
      if (in[e]) gx[i0 + e * G] = static_cast<scalar_t>(gxf[e]);
  }
  bwd_block_sums<T>(acc, cs.K, need_w, part);
}

// ----------------------------------------------------------------------------- levels-table pass
// The same results as the kernels above, bit for bit, with one table search per element instead
// of evaluating every candidate (the arithmetic kernels are instruction-bound on a GPU; see
// triton_kernels/levels.py for the method, which this mirrors for the C++ math of
// scheme_math.h). Float math only (fp32/fp16/bf16 inputs); AUTOQNN_CUDA_LEVELS selects it.
namespace lv {

constexpr int kMaxP = 4096;  // 8 candidates at their top bits need 2048

// Candidate k's code thresholds at off[k] (ClipQ: nt[k] multiples, then its two edges); the two
// sentinels (-FLT_MAX, +Inf) at nreal - 2 and nreal - 1; +Inf padding up to P.
// The slots form sorted runs (a code's thresholds do not decrease with j): each candidate's
// thresholds, ClipQ's two edges, and the sentinels with the padding; the sort merges them.
constexpr int kMaxRuns = kMaxK + 2;
struct Plan {
  int32_t off[kMaxK];
  int32_t nt[kMaxK];
  int32_t run_start[kMaxRuns], run_len[kMaxRuns];
  int32_t nruns, nreal, P, log2P;
};

int32_t code_thresholds(int sid, int b) {
  switch (sid) {
    case kBinary: return 1;
    case kTernary: return 2;
    case kQuaternary: return 3;
    case kResidual: return (1 << (b + 1)) - 1;
    case kPot: return 1 << b;
    default: return (1 << b) - 1;  // fixed, zoom, clip
  }
}

Plan make_plan(const Cands<float>& cs) {
  Plan p{};
  int32_t off = 0;
  auto run = [&](int32_t start, int32_t len) {
    p.run_start[p.nruns] = start;
    p.run_len[p.nruns] = len;
    ++p.nruns;
  };
  for (int k = 0; k < cs.K; ++k) {
    p.off[k] = off;
    p.nt[k] = code_thresholds(cs.sid[k], cs.bits[k]);
    run(off, p.nt[k]);
    if (cs.sid[k] == kClip) run(off + p.nt[k], 2);
    off += p.nt[k] + (cs.sid[k] == kClip ? 2 : 0);
  }
  p.nreal = off + 2;
  p.P = 1;
  p.log2P = 0;
  while (p.P < p.nreal + 1) {
    p.P *= 2;
    ++p.log2P;
  }
  TORCH_CHECK(p.P <= kMaxP, "autoqnn: levels table of ", p.P, " entries exceeds ", kMaxP);
  run(off, p.P - off);  // -FLT_MAX, +Inf, then +Inf padding
  return p;
}

__device__ __forceinline__ float key_to_float(int64_t k) {  // keys ordered like the floats
  return detail::u32_as_float(static_cast<uint32_t>(k >= 0 ? k : (-(k + 1)) + 2147483648LL));
}

// Scheme SID's integer code at x (non-decreasing in x for non-NaN x), with the float operations
// of eval_sid: q, the STE mask and ResQ's dq/db are functions of it. part 1: ClipQ's zone
// against its edge (0 below, 1 inside, 2 above).
template <int SID>
__device__ __forceinline__ int32_t code_sid(float x, const float* p, int b, int part) {
  using namespace detail;
  if constexpr (SID == kBinary) {
    return x > 0.f ? 1 : 0;
  } else if constexpr (SID == kTernary) {
    const float ax = x < 0.f ? -x : x;
    return ax > p[0] ? (x > 0.f ? 2 : (x < 0.f ? 0 : 1)) : 1;
  } else if constexpr (SID == kQuaternary) {
    return static_cast<int32_t>(round_clamped(safe_div(x, p[0]), -2.f, 1.f)) + 2;
  } else if constexpr (SID == kFixed) {
    const float lim = static_cast<float>(int64_t(1) << (b - 1));
    return static_cast<int32_t>(round_clamped(safe_div(x, p[0]), -lim, lim - 1.f)) + (1 << (b - 1));
  } else if constexpr (SID == kResidual) {
    float rr = x;
    int32_t c = 0;
    for (int i = 0; i < b; ++i) {
      const float sg = sgn_le0_neg(rr);
      const float s = p[i] * sg;
      rr = rr - s;
      c = 2 * c + (sg > 0.f ? 1 : 0);
    }
    return 2 * c + (rr > 0.f ? 1 : 0);
  } else if constexpr (SID == kZoom) {
    const float top = static_cast<float>((int64_t(1) << b) - 1);
    return static_cast<int32_t>(floor_clamped_nonneg(safe_div(x - p[0], p[1]), top));
  } else if constexpr (SID == kClip) {
    const float scale = p[0];
    const float lim = static_cast<float>(int64_t(1) << (b - 1));
    if (part == 0) return static_cast<int32_t>(round_clamped(safe_div(x, scale) - 0.5f, -lim, lim - 1.f)) + (1 << (b - 1));
    const float edge = (lim - 0.5f) * scale;
    return (x >= -edge ? 1 : 0) + (x > edge ? 1 : 0);
  } else {  // pot
    const int32_t lmax = (1 << (b - 1)) - 1;
    const float u = safe_div(x, p[0]);
    const int32_t l = pot_level(u < 0.f ? -u : u, lmax);
    return u > 0.f ? lmax + 2 + l : (u < 0.f ? lmax - l : lmax + 1);
  }
}

__device__ __forceinline__ int32_t code_of(int32_t sid, float x, const float* p, int b, int part) {
  switch (sid) {
    case kBinary: return code_sid<kBinary>(x, p, b, part);
    case kTernary: return code_sid<kTernary>(x, p, b, part);
    case kQuaternary: return code_sid<kQuaternary>(x, p, b, part);
    case kFixed: return code_sid<kFixed>(x, p, b, part);
    case kResidual: return code_sid<kResidual>(x, p, b, part);
    case kZoom: return code_sid<kZoom>(x, p, b, part);
    case kClip: return code_sid<kClip>(x, p, b, part);
    default: return code_sid<kPot>(x, p, b, part);
  }
}

// min{x : code(x) > j} by bisection on the keys; -Inf when code(-Inf) > j, +Inf when no x
// has code(x) > j.
__device__ __forceinline__ float threshold(int32_t sid, const float* p, int b, int part, int32_t j) {
  int64_t lo = -0x7F800000LL - 1, hi = 0x7F800000LL;
  if (code_of(sid, key_to_float(lo), p, b, part) > j) return -std::numeric_limits<float>::infinity();
  if (code_of(sid, key_to_float(hi), p, b, part) <= j) return std::numeric_limits<float>::infinity();
  while (hi - lo > 1) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (code_of(sid, key_to_float(mid), p, b, part) > j) hi = mid;
    else lo = mid;
  }
  return key_to_float(hi);
}

// #{j < n : r[j] < key} (or <= key with LE): a bound in a sorted run
template <bool LE>
__device__ __forceinline__ int32_t count_below(const float* r, int32_t n, float key) {
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (LE ? r[mid] <= key : r[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// One block per row builds its table: (1) every slot's threshold (bisection), the sentinels and
// the padding, into shared memory; (2) a stable merge of the sorted runs, each slot's rank being
// its index in its run plus its bounds in the other runs (<= in earlier runs, < in later ones:
// a permutation), into t[row] and shared memory; (3) every segment's values at its representative
// (-Inf for segment 0, else t[i - 1]) into v[row]: Y (mixture_fwd_kernel's sum), F (bwd_step's
// grad_x factor), Q_k and D_k (eval_sid's q and dq/db), each P long. Dynamic shared memory:
// 2P floats.
__global__ void __launch_bounds__(kThreads)
    build_kernel(const float* __restrict__ params /* [K, C, kNumParams] */, const float* __restrict__ w, Cands<float> cs,
                 Plan pl, int64_t C, float* __restrict__ t /* [C, P] */, float* __restrict__ v /* [C, 2 + 2K, P] */) {
  float* u = bwd_sums<float>();
  float* srt = u + pl.P;
  const int64_t row = blockIdx.x;
  const int32_t P = pl.P;
  for (int32_t s = threadIdx.x; s < P; s += blockDim.x) {
    float val = std::numeric_limits<float>::infinity();
    if (s == pl.nreal - 2) {
      val = -std::numeric_limits<float>::max();
    } else if (s < pl.nreal - 2) {
      int k = 0;
      while (k + 1 < cs.K && s >= pl.off[k + 1]) ++k;
      const int32_t j = s - pl.off[k];
      const bool edge = j >= pl.nt[k];
      val = threshold(cs.sid[k], params + (k * C + row) * kNumParams, cs.bits[k], edge ? 1 : 0,
                      edge ? j - pl.nt[k] : j);
    }
    u[s] = val;
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < P; i += blockDim.x) {
    const float ui = u[i];
    int r = 0;
    while (i >= pl.run_start[r] + pl.run_len[r]) ++r;
    int32_t rank = i - pl.run_start[r];
    for (int q = 0; q < pl.nruns; ++q) {
      if (q == r) continue;
      const float* rq = u + pl.run_start[q];
      rank += q < r ? count_below<true>(rq, pl.run_len[q], ui) : count_below<false>(rq, pl.run_len[q], ui);
    }
    srt[rank] = ui;
    t[row * P + rank] = ui;
  }
  __syncthreads();
  float* vr = v + row * (2 + 2 * cs.K) * P;
  float w_identity = 0.f;
  for (int k = 0; k < cs.K; ++k)
    if (cs.sid[k] != kClip) w_identity = w_identity + (w ? w[k] : 1.f);
  for (int32_t i = threadIdx.x; i < P; i += blockDim.x) {
    const float x = i == 0 ? -std::numeric_limits<float>::infinity() : srt[i - 1];
    float acc = 0.f, masked = 0.f;
    bool any_masked = false;
    for (int k = 0; k < cs.K; ++k) {
      const float wk = w ? w[k] : 1.f;
      const Eval<float> r = eval_scheme<float, true>(cs.sid[k], x, params + (k * C + row) * kNumParams, cs.bits[k],
                                                     cs.cb[k]);
      const float term = w ? r.q * wk : r.q;
      acc = k == 0 ? term : acc + term;
      if (cs.sid[k] == kClip) {
        const float mt = r.ste ? wk : 0.f;
        masked = any_masked ? masked + mt : mt;
        any_masked = true;
      }
      vr[(2 + k) * P + i] = r.q;
      vr[(2 + cs.K + k) * P + i] = r.d;
    }
    vr[i] = acc;
    vr[P + i] = any_masked ? masked + w_identity : w_identity;
  }
}

// #{t[0..P-2] <= x} (branchless; NaN -> 0)
__device__ __forceinline__ int32_t segment(const float* __restrict__ tr, float x, int log2P) {
  int32_t pos = 0;
  for (int s = log2P - 1; s >= 0; --s) {
    const int32_t step = 1 << s;
    pos = tr[pos + step - 1] <= x ? pos + step : pos;
  }
  return pos;
}

// mixture_fwd_kernel's loop and stores, y from the table: kElems elements per thread and step,
// their loads issued before any search (memory-level parallelism: the pass is meant to run at
// memory speed)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* __restrict__ t,
               const float* __restrict__ v, int32_t K, int32_t P, int32_t log2P, int64_t C, int64_t N) {
  const int64_t total = C * N;
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i0 < total; i0 += kElems * G) {
    float xv[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * G;
      xv[e] = i < total ? static_cast<float>(x[i]) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * G;
      if (i >= total) continue;
      const int64_t row = C == 1 ? 0 : i / N;
      const int32_t pos = segment(t + row * P, xv[e], log2P);
      const float yv = v[row * (2 + 2 * K) * P + pos];
      y[i] = static_cast<scalar_t>(xv[e] != xv[e] ? xv[e] : yv);
    }
  }
}

// mixture_bwd_kernel's loop, sums and stores, every candidate's q (and dq/db) from the table
template <typename scalar_t, bool ND>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, scalar_t* __restrict__ gx,
               const float* __restrict__ t, const float* __restrict__ v, const float* __restrict__ params,
               Cands<float> cs, int32_t P, int32_t log2P, int64_t C, int64_t N, bool need_w,
               float* __restrict__ part) {
  float* acc = bwd_sums<float>();
  const int th = threadIdx.x;
  const int K = cs.K;
  for (int j = 0; j < 2 * K; ++j) acc[j * kThreads + th] = 0.f;
  const int64_t total = C * N;
  const int64_t G = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + th; i0 < total; i0 += kElems * G) {
    float xv[kElems], g[kElems];
    bool in[kElems];
    int32_t pos[kElems];
    int64_t row[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * G;
      in[e] = i < total;
      xv[e] = in[e] ? static_cast<float>(x[i]) : 0.f;
      g[e] = in[e] ? static_cast<float>(gy[i]) : 0.f;
      row[e] = (C == 1 || !in[e]) ? 0 : i / N;
      pos[e] = segment(t + row[e] * P, xv[e], log2P);
    }
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      float aq = acc[k * kThreads + th];
      float ad = ND ? acc[(K + k) * kThreads + th] : 0.f;
      const int32_t sid = cs.sid[k];
      const bool scaled = sid == kFixed || sid == kZoom || sid == kClip || sid == kPot;
      const int scale_at = sid == kZoom ? 1 : 0;
      const float scale0 = ND && scaled && C == 1 ? params[k * kNumParams + scale_at] : 0.f;  // one row: once
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        if (!in[e]) continue;
        const float* vr = v + row[e] * (2 + 2 * K) * P;
        const float q = vr[(2 + k) * P + pos[e]];
        const bool finite = (xv[e] - xv[e]) == 0.f;
        aq += g[e] * (xv[e] != xv[e] ? xv[e] : q);
        if (ND) {
          float d = 0.f;
          if (sid == kResidual) {
            d = vr[(2 + K + k) * P + pos[e]];
          } else if (scaled) {  // eval_sid's cb * (q - x)
            const float scale = C == 1 ? scale0 : params[(k * C + row[e]) * kNumParams + scale_at];
            if (scale >= 0.f) d = scale > 0.f ? cs.cb[k] * (q - xv[e]) : 0.f;
          }
          ad += g[e] * (finite ? d : 0.f);
        }
      }
      acc[k * kThreads + th] = aq;
      if (ND) acc[(K + k) * kThreads + th] = ad;
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (!in[e]) continue;
      const float factor = v[row[e] * (2 + 2 * K) * P + P + pos[e]];
      const bool fin = (xv[e] - xv[e]) == 0.f;
      gx[i0 + e * G] = static_cast<scalar_t>(fin ? g[e] * factor : 0.f);
    }
  }
  bwd_block_sums<float>(acc, K, need_w, part);
}

// "1": levels for every float input; "auto": for rows of at least 2^16 elements; else (default) never
bool enabled(const at::Tensor& x, int64_t C, int64_t N) {
  if (x.scalar_type() == at::kDouble) return false;
  const char* e = std::getenv("AUTOQNN_CUDA_LEVELS");
  if (!e || !*e || std::strcmp(e, "0") == 0) return false;
  if (std::strcmp(e, "1") == 0) return true;
  if (std::strcmp(e, "auto") == 0) return N >= (int64_t(1) << 16) && C >= 1;
  TORCH_CHECK_VALUE(false, "autoqnn: AUTOQNN_CUDA_LEVELS must be 0, 1 or auto, got '", e, "'");
  return false;
}

struct Tables {
  at::Tensor t, v;
  Plan pl;
};

// The row tables for float params [K, C, kNumParams] and weights (nullptr: one scheme).
Tables build(const at::Tensor& params, const float* w, const Cands<float>& cs, int64_t C, cudaStream_t stream) {
  Tables tb;
  tb.pl = make_plan(cs);
  const int32_t P = tb.pl.P;
  const auto opt = params.options().dtype(at::kFloat);
  tb.t = at::empty({C, P}, opt);
  tb.v = at::empty({C, 2 + 2 * static_cast<int64_t>(cs.K), P}, opt);
  build_kernel<<<static_cast<unsigned>(C), kThreads, 2 * P * sizeof(float), stream>>>(
      params.const_data_ptr<float>(), w, cs, tb.pl, C, tb.t.data_ptr<float>(), tb.v.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tb;
}

// The levels pass's backward into part (as mixture_bwd_kernel's); false (nothing launched) for
// float64 math, which keeps the arithmetic kernels.
template <typename scalar_t, typename T>
bool backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gx, const at::Tensor& params,
              const T* wp, const Cands<T>& cs, int64_t C, int64_t N, int64_t blocks, bool need_w, bool need_b,
              const at::Tensor& part, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    const Tables tb = build(params, wp, cs, C, stream);
    auto lk = [&](auto kernel) {
      kernel<<<blocks, kThreads, bwd_smem_bytes<float>(cs.K), stream>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
          tb.t.const_data_ptr<float>(), tb.v.const_data_ptr<float>(), params.const_data_ptr<float>(), cs, tb.pl.P,
          tb.pl.log2P, C, N, need_w, part.data_ptr<float>());
    };
    if (need_b) lk(bwd_kernel<scalar_t, true>);
    else lk(bwd_kernel<scalar_t, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

}  // namespace lv

// Writes v to element i of a float32/float64/float16/bfloat16 array (dtype given at run time).
__device__ __forceinline__ void store_as(void* p, at::ScalarType st, int64_t i, double v) {
  switch (st) {
    case at::kDouble: static_cast<double*>(p)[i] = v; break;
    case at::kHalf: static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(static_cast<float>(v)); break;
    case at::kBFloat16: static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(static_cast<float>(v)); break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// The backward's final sums in one launch (instead of a conversion, a reduction and the
// weights/bits arithmetic as separate ops): block j sums column j of part [blocks, 2K] in double,
// thread-strided then a fixed tree (deterministic), and writes gw[j] (j < K; gw may be null) or
// gb[j - K] = w[j - K] * sum (w null: 1; gb may be null) in the outputs' own dtypes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bwd_finalize_kernel(const T* __restrict__ part, int64_t blocks, int K, const T* __restrict__ w, void* gw,
                        at::ScalarType gw_t, void* gb, at::ScalarType gb_t) {
  __shared__ double sh[kThreads];
  const int j = blockIdx.x;
  const int t = threadIdx.x;
  double s = 0.0;
  for (int64_t b = t; b < blocks; b += kThreads) s += static_cast<double>(part[b * 2 * K + j]);
  sh[t] = s;
  __syncthreads();
  for (int st = kThreads / 2; st > 0; st >>= 1) {
    if (t < st) sh[t] += sh[t + st];
    __syncthreads();
  }
  if (t != 0) return;
  if (j < K) {
    if (gw) store_as(gw, gw_t, j, sh[0]);
  } else if (gb) {
    store_as(gb, gb_t, j - K, sh[0] * (w ? static_cast<double>(w[j - K]) : 1.0));
  }
}

struct Layout {
  int64_t C, N;
};

Layout layout_of(const at::Tensor& x, bool per_channel) {
  const int64_t C = num_channels(x, per_channel);
  return {C, C > 0 ? x.numel() / C : 0};
}

at::Tensor params_on(const at::Tensor& params, const at::Tensor& x, int64_t K, const Layout& L) {
  TORCH_CHECK_VALUE(params.dim() == 3 && params.size(0) == K && params.size(1) == L.C &&
                        params.size(2) == kNumParams,
                    "autoqnn: params must have shape [", K, ", ", L.C, ", ", kNumParams, "], got ",
                    params.sizes());
  return params.detach().to(x.device(), stats_dtype(x.scalar_type())).contiguous();
}

at::Tensor forward_cuda(const at::Tensor& x_, const at::Tensor& params_, const at::Tensor* weights,
                        const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel, const char* op) {
  check_float_input(x_, op, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const std::vector<int64_t> order = memory_order(x_, per_channel);  // y laid out like a dense x
  const at::Tensor x = in_memory_order(x_, order);
  const Layout L = layout_of(x, per_channel);
  const int64_t K = schemes.size();
  const at::Tensor params = params_on(params_, x, K, L);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const at::Tensor y_out = from_memory_order(y, order);
  at::Tensor w;
  if (weights) {
    check_float_input(*weights, op, "weights");
    TORCH_CHECK_VALUE(weights->numel() == K, "autoqnn: weights must have ", K, " entries");
    w = weights->detach().to(x.device(), stats_dtype(x.scalar_type())).contiguous();
  }
  if (x.numel() == 0) return y_out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (lv::enabled(x, L.C, L.N)) {  // the levels-table pass: same values
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_cuda_forward_levels", [&] {
      const Cands<float> cs = make_cands<float>(bits, schemes);
      const lv::Tables tb = lv::build(params, weights ? w.const_data_ptr<float>() : nullptr, cs, L.C, stream);
      lv::fwd_kernel<scalar_t><<<grid_for((x.numel() + kElems - 1) / kElems), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), tb.t.const_data_ptr<float>(),
          tb.v.const_data_ptr<float>(), cs.K, tb.pl.P, tb.pl.log2P, L.C, L.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return y_out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_cuda_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const Cands<T> cs = make_cands<T>(bits, schemes);
    const int64_t grid = grid_for((x.numel() + kElems - 1) / kElems);
    const T* wp = weights ? w.const_data_ptr<T>() : nullptr;
    if (L.C == 1) {
      mixture_fwd_kernel<scalar_t, T, true><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), params.const_data_ptr<T>(), wp, cs, L.C, L.N);
    } else {
      mixture_fwd_kernel<scalar_t, T, false><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), params.const_data_ptr<T>(), wp, cs, L.C, L.N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y_out;
}

// Returns (grad_x, grad_weights shaped like *weights (undefined without weights), grad_bits shaped
// like bits, on x's device: callers hand the kernels a host copy of learned bits, see
// autoqnn/ops/_schema.py). The gradients not asked for are zeros made where weights / bits live
// (no device work, and no device-to-host copy for host-side ones). grad_bits[k] = w_k <g, dq_k/db> with
// w_k in the compute type (as the reference), 1 for a single scheme.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& gy_, const at::Tensor& x_,
                                                 const at::Tensor& params_, const at::Tensor* weights,
                                                 const at::Tensor& bits, at::IntArrayRef schemes,
                                                 bool per_channel, bool need_w, bool need_b, const char* op) {
  check_float_input(x_, op, "x");
  TORCH_CHECK_VALUE(gy_.sizes() == x_.sizes(), "autoqnn: grad_y has shape ", gy_.sizes(),
                    " but x has shape ", x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const std::vector<int64_t> order = memory_order(x_, per_channel);  // grad_x laid out like a dense x
  const at::Tensor x = in_memory_order(x_, order);
  const at::Tensor gy = in_memory_order(gy_.to(x.device(), x.scalar_type()), order);
  const Layout L = layout_of(x, per_channel);
  const int64_t K = schemes.size();
  const at::Tensor params = params_on(params_, x, K, L);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const at::Tensor gx_out = from_memory_order(gx, order);
  at::Tensor w;
  if (weights) {
    check_float_input(*weights, op, "weights");
    TORCH_CHECK_VALUE(weights->numel() == K, "autoqnn: weights must have ", K, " entries");
    w = weights->detach().to(x.device(), stats_dtype(x.scalar_type())).contiguous();
  }
  const bool have_w = weights != nullptr;
  auto out_like = [&](const at::Tensor& like, bool needed) {
    return needed && x.numel() > 0 ? at::empty(like.sizes(), like.options().device(x.device()))
                                   : at::zeros(like.sizes(), like.options());
  };
  at::Tensor gw = have_w ? out_like(*weights, need_w) : at::Tensor();
  at::Tensor gb = !need_b ? at::zeros(bits.sizes(), bits.options())  // where bits live: no device work
                 : x.numel() > 0 ? at::empty(bits.sizes(), bits.options().device(x.device()))
                                 : at::zeros(bits.sizes(), bits.options().device(x.device()));
  const bool run_w = have_w && need_w, run_b = need_b;
  if (x.numel() == 0) return {gx_out, gw, gb};
  TORCH_CHECK_VALUE(!run_b || bits.is_floating_point(), "autoqnn: bits must be a floating tensor for a bits gradient");
  const int64_t blocks = grid_for((x.numel() + kElems - 1) / kElems);
  at::Tensor part = at::empty({blocks, 2 * K}, x.options().dtype(stats_dtype(x.scalar_type())));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_cuda_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const Cands<T> cs = make_cands<T>(bits, schemes);
    const T* wp = weights ? w.const_data_ptr<T>() : nullptr;
    const size_t smem = bwd_smem_bytes<T>(K);
    // the levels-table pass (float math): the same grad_x and partial sums
    if (!(lv::enabled(x, L.C, L.N) &&
          lv::backward<scalar_t, T>(gy, x, gx, params, wp, cs, L.C, L.N, blocks, need_w, need_b, part, stream))) {
      auto launch = [&](auto kernel) {
        kernel<<<blocks, kThreads, smem, stream>>>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                   gx.data_ptr<scalar_t>(), params.const_data_ptr<T>(), wp, cs, L.C,
                                                   L.N, need_w, part.data_ptr<T>());
      };
      if (need_b) {
        if (L.C == 1) launch(mixture_bwd_kernel<scalar_t, T, true, true>);
        else launch(mixture_bwd_kernel<scalar_t, T, true, false>);
      } else {
        if (L.C == 1) launch(mixture_bwd_kernel<scalar_t, T, false, true>);
        else launch(mixture_bwd_kernel<scalar_t, T, false, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (run_w || run_b) {
      bwd_finalize_kernel<T><<<static_cast<unsigned>(2 * K), kThreads, 0, stream>>>(
          part.const_data_ptr<T>(), blocks, static_cast<int>(K), wp, run_w ? gw.data_ptr() : nullptr,
          run_w ? gw.scalar_type() : at::kFloat, run_b ? gb.data_ptr() : nullptr,
          run_b ? gb.scalar_type() : at::kFloat);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // grad_weights lives where the weights do (made on x's device for the kernel); grad_bits
  // stays on x's device
  if (run_w && gw.device() != weights->device()) gw = gw.to(weights->device());
  return {gx_out, gw, gb};
}

// ----------------------------------------------------------------------------- op entry points
at::Tensor quantize_cuda(const at::Tensor& x, const at::Tensor& params, const at::Tensor& bits,
                         int64_t scheme, bool per_channel) {
  const int64_t s[1] = {scheme};
  return forward_cuda(x, params, nullptr, bits, at::IntArrayRef(s, 1), per_channel, "quantize");
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& params, const at::Tensor& bits,
                                                          int64_t scheme, bool per_channel,
                                                          bool need_bits_grad) {
  const int64_t s[1] = {scheme};
  auto [gx, gw, gb] = backward_cuda(grad_y, x, params, nullptr, bits, at::IntArrayRef(s, 1), per_channel,
                                    false, need_bits_grad, "quantize_backward");
  (void)gw;
  return {gx, gb};
}

at::Tensor mixture_cuda(const at::Tensor& x, const at::Tensor& params, const at::Tensor& weights,
                        const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel) {
  return forward_cuda(x, params, &weights, bits, schemes, per_channel, "mixture");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& params, const at::Tensor& weights,
    const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel, bool need_weights_grad,
    bool need_bits_grad) {
  return backward_cuda(grad_y, x, params, &weights, bits, schemes, per_channel, need_weights_grad, need_bits_grad,
                       "mixture_backward");
}

// ----------------------------------------------------------------------------- batched ops
// Ragged rows of a flat x (autoqnn/row_map.h), one block per chunk of stats::kChunk elements, so
// each block knows its row: per-row weights w [R, K], integer bits rb [R, K] and bits scale
// factors rcb [R, K]. The per-element math and the forward's summation order are those of the
// kernels above (the forward is bit-identical to one call per tensor).
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    mixture_batched_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                               const T* __restrict__ params /* [K, R, P] */, const T* __restrict__ w /* [R, K] */,
                               const int32_t* __restrict__ rb, const T* __restrict__ rcb, Cands<T> cs, RowMap m) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const int64_t c = ch.row;
  const T* prow = params + c * kNumParams;  // a chunk lies in one row: the same params for all
  const scalar_t* xs = x + ch.start;
  scalar_t* ys = y + ch.start;
  for (int64_t i0 = threadIdx.x; i0 < ch.len; i0 += kElems * kThreads) {
    T v[kElems], acc[kElems];
    const T* pe[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * kThreads;
      v[e] = i < ch.len ? static_cast<T>(xs[i]) : T(0);
      pe[e] = prow;
      acc[e] = T(0);
    }
#pragma unroll 1
    for (int k = 0; k < cs.K; ++k) {
      const int64_t ck = c * cs.K + k;
      const T wk = w[ck];
      eval_candidate<T, false>(cs.sid[k], v, pe, k * m.R * kNumParams, rb[ck], rcb[ck],
                               [&](int e, const Eval<T>& r) {
                                 const T term = r.q * wk;
                                 acc[e] = k == 0 ? term : acc[e] + term;
                               });
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * kThreads;
      if (i < ch.len) ys[i] = static_cast<scalar_t>(acc[e]);
    }
  }
}

// grad_x and, per block (chunk), part[block, 0..K) = <g, q_k>, part[block, K..2K) = <g, d_k>.
// Launched with bwd_smem_bytes<T>(K) of dynamic shared memory.
template <typename scalar_t, typename T, bool ND>
__global__ void __launch_bounds__(kThreads)
    mixture_batched_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                               scalar_t* __restrict__ gx, const T* __restrict__ params, const T* __restrict__ w,
                               const int32_t* __restrict__ rb, const T* __restrict__ rcb, Cands<T> cs, RowMap m,
                               bool need_w, T* __restrict__ part /* [chunks, 2K] */) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const int64_t c = ch.row;
  T* acc = bwd_sums<T>();
  for (int j = 0; j < 2 * cs.K; ++j) acc[j * kThreads + threadIdx.x] = T(0);
  T w_identity = T(0);
  for (int k = 0; k < cs.K; ++k)
    if (cs.sid[k] != kClip) w_identity = w_identity + w[c * cs.K + k];
  const T* prow = params + c * kNumParams;  // a chunk lies in one row
  const int64_t kstride = m.R * kNumParams;
  auto arg = [&](int k) {
    const int64_t ck = c * cs.K + k;
    return CandArgs<T>{rb[ck], rcb[ck], w[ck], k * kstride};
  };
  const scalar_t* xs = x + ch.start;
  const scalar_t* gs = gy + ch.start;
  scalar_t* gxs = gx + ch.start;
  for (int64_t i0 = threadIdx.x; i0 < ch.len; i0 += kElems * kThreads) {
    T v[kElems], g[kElems], gxf[kElems];
    bool in[kElems];
    const T* pe[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = i0 + e * kThreads;
      in[e] = i < ch.len;
      v[e] = in[e] ? static_cast<T>(xs[i]) : T(0);
      g[e] = in[e] ? static_cast<T>(gs[i]) : T(0);
      pe[e] = prow;
    }
    bwd_step<T, ND>(cs, v, g, in, pe, w_identity, arg, acc, gxf);
#pragma unroll
    for (int e = 0; e < kElems; ++e)
      if (in[e]) gxs[i0 + e * kThreads] = static_cast<scalar_t>(gxf[e]);
  }
  bwd_block_sums<T>(acc, cs.K, need_w, part);
}

// Per row, the chunk partials in chunk order (float64): gw[r, k] = <g, q_k>,
// gb[r, k] = w[r, k] * <g, d_k>; one thread per (row, sum).
template <typename T>
__global__ void mixture_batched_rows_kernel(const T* __restrict__ part, RowMap m, int K, const T* __restrict__ w,
                                            double* __restrict__ gw, double* __restrict__ gb) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= m.R * 2 * K) return;
  const int64_t c = i / (2 * K);
  const int j = static_cast<int>(i % (2 * K));
  double s = 0.0;
  for (int64_t t = m.first(c), e = t + m.chunks(c); t < e; ++t) s += static_cast<double>(part[t * 2 * K + j]);
  if (j < K) gw[c * K + j] = s;
  else gb[c * K + j - K] = s * static_cast<double>(w[c * K + j - K]);
}

// Checked inputs of a batched call, on the device.
struct BatchedArgs {
  BatchedRows rows;
  at::Tensor x, params, w, rb, rcb;  // x contiguous; w, rcb in the compute type; rb int32
  int64_t K = 0;
};

BatchedArgs batched_args(const at::Tensor& x_, at::IntArrayRef offsets, const at::Tensor& params,
                         const at::Tensor& weights, const at::Tensor& bits, at::IntArrayRef schemes, const char* op) {
  check_float_input(x_, op, "x");
  check_float_input(weights, op, "weights");
  BatchedArgs a;
  a.x = x_.contiguous();
  a.rows = batched_rows(a.x, offsets, op);
  const int64_t R = a.rows.map.R;
  a.K = static_cast<int64_t>(schemes.size());
  TORCH_CHECK_VALUE(a.K >= 1 && a.K <= kMaxK, "autoqnn::", op, ": between 1 and ", kMaxK, " schemes per call, got ",
                    a.K);
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == R && weights.size(1) == a.K, "autoqnn::", op,
                    ": weights must have shape [", R, ", ", a.K, "] (rows x schemes), got ", weights.sizes());
  TORCH_CHECK_VALUE(bits.dim() == 2 && bits.size(0) == R && bits.size(1) == a.K, "autoqnn::", op,
                    ": bits must have shape [", R, ", ", a.K, "] (rows x schemes), got ", bits.sizes());
  TORCH_CHECK_VALUE(params.dim() == 3 && params.size(0) == a.K && params.size(1) == R &&
                        params.size(2) == kNumParams,
                    "autoqnn: params must have shape [", a.K, ", ", R, ", ", kNumParams, "], got ", params.sizes());
  const at::ScalarType cd = stats_dtype(a.x.scalar_type());
  a.params = params.detach().to(a.x.device(), cd).contiguous();
  a.w = weights.detach().to(a.x.device(), cd).contiguous();
  const std::vector<int> ib = int_bits_rows(bits, schemes);
  at::Tensor hb = at::empty({R * a.K}, at::TensorOptions().dtype(at::kInt));
  at::Tensor hc = at::empty({R * a.K}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t i = 0; i < R * a.K; ++i) {
    hb.mutable_data_ptr<int32_t>()[i] = ib[i];
    hc.mutable_data_ptr<double>()[i] = bits_scale_factor(ib[i]);
  }
  a.rb = hb.to(a.x.device(), /*non_blocking=*/true);
  a.rcb = hc.to(cd).to(a.x.device(), /*non_blocking=*/true);
  return a;
}

template <typename T>
Cands<T> ids_only(at::IntArrayRef schemes) {
  Cands<T> c{};
  c.K = static_cast<int32_t>(schemes.size());
  for (int k = 0; k < c.K; ++k) c.sid[k] = static_cast<int32_t>(schemes[k]);
  return c;
}

at::Tensor mixture_batched_cuda(const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& params,
                                const at::Tensor& weights, const at::Tensor& bits, at::IntArrayRef schemes) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BatchedArgs a = batched_args(x, offsets, params, weights, bits, schemes, "mixture_batched");
  at::Tensor y = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  if (a.rows.chunks == 0) return y;
  TORCH_CHECK(a.rows.chunks <= std::numeric_limits<int32_t>::max(), "autoqnn::mixture_batched: too large");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "autoqnn_cuda_batched_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    mixture_batched_fwd_kernel<scalar_t, T><<<static_cast<unsigned>(a.rows.chunks), kThreads, 0, stream>>>(
        a.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a.params.const_data_ptr<T>(),
        a.w.const_data_ptr<T>(), a.rb.const_data_ptr<int32_t>(), a.rcb.const_data_ptr<T>(), ids_only<T>(schemes),
        a.rows.map);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_batched_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& params,
    const at::Tensor& weights, const at::Tensor& bits, at::IntArrayRef schemes, bool need_weights_grad,
    bool need_bits_grad) {
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "autoqnn: grad_y has shape ", grad_y.sizes(), " but x has shape ",
                    x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const BatchedArgs a = batched_args(x, offsets, params, weights, bits, schemes, "mixture_batched_backward");
  const at::Tensor gy = grad_y.to(a.x.device(), a.x.scalar_type()).contiguous();
  const int64_t R = a.rows.map.R, K = a.K;
  at::Tensor gx = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::zeros({R, K}, a.x.options().dtype(at::kDouble));
  at::Tensor gb = at::zeros({R, K}, a.x.options().dtype(at::kDouble));
  if (a.rows.chunks > 0) {
    TORCH_CHECK(a.rows.chunks <= std::numeric_limits<int32_t>::max(), "autoqnn::mixture_batched_backward: too large");
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const unsigned nb = static_cast<unsigned>(a.rows.chunks);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "autoqnn_cuda_batched_bwd", [&] {
      using T = at::opmath_type<scalar_t>;
      at::Tensor part = at::empty({a.rows.chunks, 2 * K}, a.x.options().dtype(stats_dtype(a.x.scalar_type())));
      const Cands<T> cs = ids_only<T>(schemes);
      const size_t smem = bwd_smem_bytes<T>(K);
      if (need_bits_grad) {
        mixture_batched_bwd_kernel<scalar_t, T, true><<<nb, kThreads, smem, stream>>>(
            gy.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
            a.params.const_data_ptr<T>(), a.w.const_data_ptr<T>(), a.rb.const_data_ptr<int32_t>(),
            a.rcb.const_data_ptr<T>(), cs, a.rows.map, need_weights_grad, part.data_ptr<T>());
      } else {
        mixture_batched_bwd_kernel<scalar_t, T, false><<<nb, kThreads, smem, stream>>>(
            gy.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
            a.params.const_data_ptr<T>(), a.w.const_data_ptr<T>(), a.rb.const_data_ptr<int32_t>(),
            a.rcb.const_data_ptr<T>(), cs, a.rows.map, need_weights_grad, part.data_ptr<T>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t n = R * 2 * K;
      mixture_batched_rows_kernel<T><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          part.const_data_ptr<T>(), a.rows.map, static_cast<int>(K), a.w.const_data_ptr<T>(),
          gw.data_ptr<double>(), gb.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // without the optional gradients: zeros made where weights/bits live (no device-to-host copy);
  // a requested grad_bits on x's device (see autoqnn/ops/_schema.py)
  at::Tensor gw_out = need_weights_grad ? gw.to(weights.options()) : at::zeros(weights.sizes(), weights.options());
  at::Tensor gb_out = need_bits_grad ? gb.to(bits.options().device(a.x.device())) : at::zeros(bits.sizes(), bits.options());
  return {gx, gw_out, gb_out};
}

}  // namespace

// Registered under the ops' "_cuda" names: the main ops' CUDA kernel is a router (Python,
// autoqnn/kernel_choice.py) that sends each call to these kernels or to the Triton ones,
// whichever the measured choice table says is faster for that op and size.
TORCH_LIBRARY_IMPL(autoqnn, CUDA, m) {
  m.impl("quantize_cuda", &quantize_cuda);
  m.impl("quantize_backward_cuda", &quantize_backward_cuda);
  m.impl("mixture_cuda", &mixture_cuda);
  m.impl("mixture_backward_cuda", &mixture_backward_cuda);
  m.impl("mixture_batched", &mixture_batched_cuda);
  m.impl("mixture_batched_backward", &mixture_batched_backward_cuda);
}

}  // namespace autoqnn
