// SPDX-License-Identifier: MIT
// C++ CPU kernels of autoqnn::scheme_params, quantize(_backward) and mixture(_backward).
//
// The math is csrc/include/autoqnn/scheme_math.h (a line-by-line twin of
// autoqnn/ops/reference.py). Reductions use fixed-size chunks whose partial sums (double) are
// combined in chunk order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "autoqnn/checks.h"
#include "autoqnn/memory_order.h"
#include "autoqnn/scheme_math.h"

// Hot tile loops are compiled for baseline x86-64 (SSE2) and, dispatched at load time by the
// CPU's features (GCC/clang function multiversioning, like ATen's CPU_CAPABILITY), for AVX2 and
// AVX-512: no -march=native, so the module runs on any x86-64 and uses what the CPU has.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AUTOQNN_NO_CLONES)
#define AUTOQNN_TILE_FN __attribute__((noinline, target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define AUTOQNN_TILE_FN __attribute__((noinline))
#endif

namespace autoqnn {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per reduction chunk (fixed: determinism)
constexpr int64_t kGroup = 1 << 19;  // batched statistics: elements per group of rows (2 MB fp32)

// Rows of x (contiguous): C rows of N elements each (per tensor: C = 1; per channel: C = dim 0),
// or, for the batched ops, ragged rows: row c is x[off[c], off[c+1]).
struct Layout {
  int64_t C = 0;  // rows
  int64_t N = 0;  // elements per row (uniform layouts)
  std::vector<int64_t> off;     // ragged rows (empty: uniform)
  std::vector<int64_t> cfirst;  // ragged: index of row c's first chunk; cfirst[C] = all chunks

  bool ragged() const { return !off.empty(); }
  int64_t begin(int64_t c) const { return ragged() ? off[c] : c * N; }
  int64_t len(int64_t c) const { return ragged() ? off[c + 1] - off[c] : N; }
  static int64_t chunks_of(int64_t n) { return n > 0 ? (n + kChunk - 1) / kChunk : 0; }
  int64_t chunks(int64_t c) const { return ragged() ? cfirst[c + 1] - cfirst[c] : chunks_of(N); }
  int64_t first_chunk(int64_t c) const { return ragged() ? cfirst[c] : c * chunks_of(N); }
  int64_t total_chunks() const { return ragged() ? cfirst[C] : C * chunks_of(N); }
};

Layout layout_of(const at::Tensor& x, bool per_channel) {
  Layout L;
  L.C = (per_channel && x.dim() > 0) ? x.size(0) : 1;
  L.N = L.C > 0 ? x.numel() / L.C : 0;
  return L;
}

// Ragged rows from the batched ops' offsets: off[0] = 0, non-decreasing, off[R] = numel.
Layout ragged_layout(const at::Tensor& x, at::IntArrayRef offsets, const char* op) {
  TORCH_CHECK_VALUE(!offsets.empty(), "autoqnn::", op, ": offsets must have at least one entry (0)");
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == x.numel(), "autoqnn::", op,
                    ": offsets must start at 0 and end at x.numel() = ", x.numel(), ", got ",
                    offsets.front(), " .. ", offsets.back());
  Layout L;
  L.C = static_cast<int64_t>(offsets.size()) - 1;
  L.off.assign(offsets.begin(), offsets.end());
  L.cfirst.assign(L.C + 1, 0);
  for (int64_t c = 0; c < L.C; ++c) {
    TORCH_CHECK_VALUE(L.off[c + 1] >= L.off[c], "autoqnn::", op, ": offsets must be non-decreasing, got ",
                      L.off[c], " then ", L.off[c + 1], " at row ", c);
    L.cfirst[c + 1] = L.cfirst[c] + Layout::chunks_of(L.off[c + 1] - L.off[c]);
  }
  return L;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "autoqnn: ", name, " has dtype ",
                   t.scalar_type(), "; expected float32, float16, bfloat16 or float64");
}

at::ScalarType compute_type(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

// Runs f(row, begin, end, chunk_index) over every (row, chunk) piece in parallel; begin/end are
// offsets inside the row, chunk_index = L.first_chunk(row) + chunk number inside the row.
template <typename F>
void for_each_chunk(const Layout& L, F f) {
  const int64_t total = L.total_chunks();
  if (total == 0) return;
  at::parallel_for(0, total, 1, [&](int64_t lo, int64_t hi) {
    int64_t c = 0;
    if (L.ragged())  // the row of chunk lo; later chunks of the range walk forward from it
      c = std::upper_bound(L.cfirst.begin(), L.cfirst.end(), lo) - L.cfirst.begin() - 1;
    const int64_t per_row = Layout::chunks_of(L.N);
    for (int64_t t = lo; t < hi; ++t) {
      int64_t j;
      if (L.ragged()) {
        while (t >= L.cfirst[c + 1]) ++c;  // skips empty rows too
        j = t - L.cfirst[c];
      } else {
        c = t / per_row;
        j = t % per_row;
      }
      const int64_t b = j * kChunk, e = std::min(L.len(c), b + kChunk);
      f(c, b, e, t);
    }
  });
}

// ----------------------------------------------------------------------------- statistics
constexpr int64_t kTile = 256;  // elements per tile (fits L1 with a few temporaries)
constexpr int kLanes = 16;  // independent accumulators per tile (one AVX-512 register): vectorises w/o reassociation

// A tile of x in the compute type for a pass that reads each element once: the input itself when
// it already has that type (float32/float64), else a converted copy in `buf`.
template <typename scalar_t, typename T>
__attribute__((always_inline)) inline const T* tile_view(const scalar_t* src, T* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(src[j]);
    return buf;
  }
}

// Reduces every row of x ([C, N], contiguous) in fixed chunks and fixed tiles: tile_fn(c, xt, n,
// acc) adds a tile's contribution to acc[NACC] (double); chunks are merged per row in chunk
// order with merge(into, from). Deterministic whatever the number of threads.
template <int NACC, typename scalar_t, typename Init, typename TileFn, typename Merge>
std::vector<std::array<double, NACC>> row_reduce(const scalar_t* x, const Layout& L, Init init,
                                                 TileFn tile_fn, Merge merge) {
  using T = at::opmath_type<scalar_t>;
  std::vector<std::array<double, NACC>> part(L.total_chunks());
  for_each_chunk(L, [&](int64_t c, int64_t b, int64_t e, int64_t t) {
    std::array<double, NACC> acc = init();
    alignas(64) T xt[kTile];
    const scalar_t* xr = x + L.begin(c);
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t n = std::min(kTile, e - t0);
      tile_fn(c, tile_view<scalar_t, T>(xr + t0, xt, n), n, acc.data());
    }
    part[t] = acc;
  });
  std::vector<std::array<double, NACC>> out(L.C);
  for (int64_t c = 0; c < L.C; ++c) {
    std::array<double, NACC> a = init();
    const int64_t first = L.first_chunk(c), nch = L.chunks(c);
    for (int64_t j = 0; j < nch; ++j) merge(a, part[first + j]);
    out[c] = a;
  }
  return out;
}

template <int NACC>
auto zeros_init() {
  return [] { return std::array<double, NACC>{}; };
}

template <int NACC>
auto sum_merge() {
  return [](std::array<double, NACC>& a, const std::array<double, NACC>& b) {
    for (int s = 0; s < NACC; ++s) a[s] += b[s];
  };
}

// Sum of v[0..n) with kLanes float (or double) lanes, combined in double.
template <typename A>
__attribute__((always_inline)) inline double lane_sum(const A* v, int64_t n) {
  A lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += v[j + l];
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  for (; j < n; ++j) s += v[j];
  return s;
}

// Pass 1 per row: n, sum|x|, sum x, min, max, max|x| over finite elements.
enum { kSN = 0, kSAbs, kSSum, kSMin, kSMax, kSMaxAbs, kP1 };

template <typename T>
AUTOQNN_TILE_FN void stats_tile(const T* __restrict xt, int64_t n, double* acc) {
  // One sweep, kLanes independent lanes per statistic (the lane_sum order: lane l sums the
  // elements j = l (mod kLanes) in order, the lanes then the tail are added in double). The
  // element-wise `a < b ? a : b` of the min/max lanes is one vector min instruction; a single
  // running min would be a scalar dependency chain (GCC vectorises a min *reduction* only under
  // -ffinite-math-only). Min/max are exact in any order; non-finite elements are excluded
  // through the +-big sentinels.
  const T big = std::numeric_limits<T>::max();
  alignas(64) T sn[kLanes], sa[kLanes], sx[kLanes], lmn[kLanes], lmx[kLanes], lma[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    sn[l] = sa[l] = sx[l] = T(0);
    lmn[l] = big;
    lmx[l] = -big;
    lma[l] = T(0);
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = xt[j + l];
      const bool f = (v - v) == T(0);
      const T vf = f ? v : T(0);
      const T a = vf < T(0) ? -vf : vf;
      const T lo = f ? v : big;
      const T hi = f ? v : -big;
      sn[l] += f ? T(1) : T(0);
      sa[l] += a;
      sx[l] += vf;
      lmn[l] = lo < lmn[l] ? lo : lmn[l];
      lmx[l] = hi > lmx[l] ? hi : lmx[l];
      lma[l] = a > lma[l] ? a : lma[l];
    }
  }
  double dn = 0, da = 0, dx = 0;
  T mn = big, mx = -big, ma = T(0);
  for (int l = 0; l < kLanes; ++l) {
    dn += sn[l];
    da += sa[l];
    dx += sx[l];
    mn = std::min(mn, lmn[l]);
    mx = std::max(mx, lmx[l]);
    ma = std::max(ma, lma[l]);
  }
  for (; j < n; ++j) {
    const T v = xt[j];
    const bool f = (v - v) == T(0);
    const T vf = f ? v : T(0);
    const T a = vf < T(0) ? -vf : vf;
    dn += f ? 1.0 : 0.0;
    da += a;
    dx += vf;
    mn = std::min(mn, f ? v : big);
    mx = std::max(mx, f ? v : -big);
    ma = std::max(ma, a);
  }
  acc[kSN] += dn;
  acc[kSAbs] += da;
  acc[kSSum] += dx;
  acc[kSMin] = std::min<double>(acc[kSMin], mn);
  acc[kSMax] = std::max<double>(acc[kSMax], mx);
  acc[kSMaxAbs] = std::max<double>(acc[kSMaxAbs], ma);
}

template <typename scalar_t>
std::vector<std::array<double, kP1>> row_stats(const scalar_t* x, const Layout& L) {
  using T = at::opmath_type<scalar_t>;
  const double inf = std::numeric_limits<double>::infinity();
  auto init = [inf] { return std::array<double, kP1>{0, 0, 0, inf, -inf, 0}; };
  auto tile = [](int64_t, const T* xt, int64_t n, double* acc) { stats_tile<T>(xt, n, acc); };
  auto merge = [](std::array<double, kP1>& a, const std::array<double, kP1>& b) {
    a[kSN] += b[kSN];
    a[kSAbs] += b[kSAbs];
    a[kSSum] += b[kSSum];
    a[kSMin] = std::min(a[kSMin], b[kSMin]);
    a[kSMax] = std::max(a[kSMax], b[kSMax]);
    a[kSMaxAbs] = std::max(a[kSMaxAbs], b[kSMaxAbs]);
  };
  auto out = row_reduce<kP1, scalar_t>(x, L, init, tile, merge);
  for (auto& a : out)
    if (a[kSN] == 0) a[kSMin] = a[kSMax] = a[kSMaxAbs] = 0;
  return out;
}

// What one dependent pass computes (each needs only results of earlier passes).
template <typename T>
struct DepPass {
  bool var = false;   // sum (x - mean)^2 (double: |x| ~ 1e19 cannot overflow)   -> acc[0]
  bool ter = false;   // ternary: sum |x| and count over |x| > delta               -> acc[1], acc[2]
  bool quat = false;  // quaternary: <x, v>, <v, v>, v = clip(round(x/s), -2, 1)  -> acc[3], acc[4]
  int res = 0;        // ResQ: sum |r_{res+1}|, |r_{j+1}| = | |r_j| - alpha_j |      -> acc[5]
  T mean{}, delta{}, s{};
  const T* alpha = nullptr;
};
constexpr int kDepAcc = 6;

template <typename T>
AUTOQNN_TILE_FN void dependent_tile(const T* __restrict xt, int64_t n, const DepPass<T>& d, double* acc) {
  // Simple loops over the tile (in L1) that GCC's loop vectoriser handles, summed by lane_sum.
  // The pass's scalars are copied to locals first: read through `d`, a store into a tile array
  // could alias them and keep the loops scalar.
  const T mean = d.mean, delta = d.delta, s = d.s;
  alignas(64) T fin[kTile], a[kTile], u[kTile], v[kTile];
  alignas(64) double sq[kTile];
  for (int64_t j = 0; j < n; ++j) {
    const T x = xt[j];
    const bool f = (x - x) == T(0);
    fin[j] = f ? T(1) : T(0);
    a[j] = f ? (x < T(0) ? -x : x) : T(0);  // |x|, 0 at non-finite
  }
  if (d.var) {
    for (int64_t j = 0; j < n; ++j) {
      const double dv = fin[j] != T(0) ? static_cast<double>(xt[j] - mean) : 0.0;
      sq[j] = dv * dv;
    }
    acc[0] += lane_sum(sq, n);
  }
  if (d.ter) {
    for (int64_t j = 0; j < n; ++j) {
      const bool sel = a[j] > delta;  // a = 0 at non-finite, delta >= 0
      u[j] = sel ? a[j] : T(0);
      v[j] = sel ? T(1) : T(0);
    }
    acc[1] += lane_sum(u, n);
    acc[2] += lane_sum(v, n);
  }
  if (d.quat) {
    for (int64_t j = 0; j < n; ++j) {
      const T x = fin[j] != T(0) ? xt[j] : T(0);
      const T q = detail::round_clamped(detail::safe_div(x, s), T(-2), T(1));
      u[j] = x * q;
      v[j] = q * q;
    }
    acc[3] += lane_sum(u, n);
    acc[4] += lane_sum(v, n);
  }
  if (d.res > 0) {
    for (int jj = 0; jj < d.res; ++jj) {
      const T al = d.alpha[jj];
      for (int64_t j = 0; j < n; ++j) {
        const T t = a[j] - al;
        a[j] = t < T(0) ? -t : t;
      }
    }
    for (int64_t j = 0; j < n; ++j) a[j] = fin[j] != T(0) ? a[j] : T(0);
    acc[5] += lane_sum(a, n);
  }
}

// Integer bits of candidate k in row c: one [K] vector for every row, or [C, K] (batched ops).
struct RowBits {
  std::vector<int> v;
  int64_t K = 0;
  bool per_row = false;
  int at(int64_t c, int64_t k) const { return v[(per_row ? c * K : 0) + k]; }
};

RowBits shared_bits(const at::Tensor& bits, at::IntArrayRef schemes) {
  return {int_bits(bits, schemes), static_cast<int64_t>(schemes.size()), false};
}

RowBits batched_bits(const at::Tensor& bits, at::IntArrayRef schemes, int64_t R, const char* op) {
  const int64_t K = schemes.size();
  TORCH_CHECK_VALUE(bits.dim() == 2 && bits.size(0) == R && bits.size(1) == K, "autoqnn::", op,
                    ": bits must have shape [", R, ", ", K, "] (rows x schemes), got ", bits.sizes());
  return {int_bits_rows(bits, schemes), K, true};
}

template <typename scalar_t>
void fill_params(const scalar_t* x, const Layout& L, at::IntArrayRef schemes, const RowBits& bits, bool need_bits_grad,
                 at::opmath_type<scalar_t>* out, int64_t row0 = 0, int64_t out_C = -1) {
  // rows c of L are rows row0 + c of bits and of out ([K, out_C, kNumParams])
  if (out_C < 0) out_C = L.C;
  using T = at::opmath_type<scalar_t>;
  const int64_t K = schemes.size();
  bool need_ter = false, need_quat = false, need_sigma = false;
  int res_bits = -1;  // the most ResQ bits of any row (-1: no ResQ candidate)
  for (int64_t k = 0; k < K; ++k) {
    need_sigma |= schemes[k] == kQuaternary || schemes[k] == kClip || schemes[k] == kPot;
    need_ter |= schemes[k] == kTernary;
    need_quat |= schemes[k] == kQuaternary;
    if (schemes[k] == kResidual)
      for (int64_t c = 0; c < (bits.per_row ? L.C : 1); ++c) res_bits = std::max(res_bits, bits.at(row0 + c, k));
  }
  const auto st = row_stats<scalar_t>(x, L);
  const int64_t C = L.C;
  // Values the dependent passes compare against, rounded to T like the reference computes them.
  std::vector<T> mean(C), mean_abs(C), delta(C), sigma(C), s_quat(C);
  for (int64_t c = 0; c < C; ++c) {
    const double n = st[c][kSN];
    mean[c] = static_cast<T>(n > 0 ? st[c][kSSum] / n : 0.0);
    mean_abs[c] = static_cast<T>(n > 0 ? st[c][kSAbs] / n : 0.0);
    delta[c] = static_cast<T>(kTernaryDelta) * mean_abs[c];
  }
  // Dependent passes, fused: pass 2 = variance (two-pass, like torch.std) + ternary + ResQ
  // alpha_2; pass 3 = quaternary (needs sigma) + alpha_3; pass q >= 4 = alpha_q. ResQ needs
  // alpha_1..alpha_b, and alpha_{b+1} for the bitwidth gradient only (slot b stays 0 without).
  const int res_alphas = res_bits + (need_bits_grad ? 1 : 0);
  std::vector<std::vector<T>> ralpha(C);
  for (int64_t c = 0; c < C; ++c) ralpha[c].push_back(mean_abs[c]);
  std::vector<std::array<double, kDepAcc>> p2(C), p3(C);
  const int last = std::max(need_quat ? 3 : 2, res_alphas);
  for (int q = 2; q <= last; ++q) {
    const bool res = res_alphas >= q;
    if (q == 2 && !(need_sigma || need_ter || res)) continue;
    if (q >= 3 && !res && !(q == 3 && need_quat)) continue;
    auto r = row_reduce<kDepAcc, scalar_t>(
        x, L, zeros_init<kDepAcc>(),
        [&](int64_t c, const T* xt, int64_t n, double* acc) {
          DepPass<T> d;
          d.var = q == 2;
          d.ter = q == 2 && need_ter;
          d.quat = q == 3 && need_quat;
          d.res = res ? q - 1 : 0;
          d.mean = mean[c];
          d.delta = delta[c];
          d.s = s_quat[c];
          d.alpha = ralpha[c].data();
          dependent_tile<T>(xt, n, d, acc);
        },
        sum_merge<kDepAcc>());
    for (int64_t c = 0; c < C; ++c) {
      const double n = st[c][kSN];
      if (q == 2) {
        p2[c] = r[c];
        // 0 exactly for a row whose finite elements are all equal (its rounded mean need not be
        // their value: the sum of squares is then rounding noise), as the reference
        const bool spread = n > 1 && st[c][kSMax] > st[c][kSMin];
        sigma[c] = static_cast<T>(spread ? std::sqrt(r[c][0] / (n - 1)) : 0.0);
        s_quat[c] = static_cast<T>(kQuaternaryLambda) * sigma[c];
      }
      if (q == 3) p3[c] = r[c];
      if (res) ralpha[c].push_back(static_cast<T>(n > 0 ? r[c][5] / n : 0.0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const int b = bits.at(row0 + c, k);
      T* p = out + (k * out_C + row0 + c) * kNumParams;
      switch (schemes[k]) {
        case kBinary: p[0] = mean_abs[c]; break;
        case kTernary:
          p[0] = delta[c];
          p[1] = static_cast<T>(p2[c][2] > 0 ? p2[c][1] / p2[c][2] : 0.0);
          break;
        case kQuaternary:
          p[0] = s_quat[c];
          p[1] = static_cast<T>(p3[c][4] > 0 ? p3[c][3] / p3[c][4] : 0.0);
          break;
        case kFixed: {
          const T ma = static_cast<T>(st[c][kSMaxAbs]);
          int e = 0;
          std::frexp(ma, &e);
          p[0] = ma > T(0) ? static_cast<T>(std::ldexp(1.0, e + 1 - b)) : T(0);
          p[1] = ma;  // unused by the output pass; lets an EMA of params re-derive the step
          break;
        }
        case kResidual:
          for (int i = 0; i < b + (need_bits_grad ? 1 : 0); ++i) p[i] = ralpha[c][i];
          break;
        case kZoom: {
          const T mn = static_cast<T>(st[c][kSMin]), mx = static_cast<T>(st[c][kSMax]);
          p[0] = mn;
          p[1] = (mx - mn) / static_cast<T>(std::ldexp(1.0, b));
          break;
        }
        case kClip: p[0] = static_cast<T>(kClipLambda[b]) * sigma[c]; break;
        case kPot: p[0] = static_cast<T>(kPotLambda[b]) * sigma[c]; break;
        default: break;
      }
    }
  }
}

at::Tensor scheme_params_rows(const at::Tensor& x, const Layout& L, const RowBits& b, at::IntArrayRef schemes,
                              bool need_bits_grad) {
  const int64_t K = schemes.size();
  at::Tensor out = at::zeros({K, L.C, kNumParams}, x.options().dtype(compute_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scheme_params", [&] {
    using T = at::opmath_type<scalar_t>;
    if (!L.ragged()) {
      fill_params<scalar_t>(x.const_data_ptr<scalar_t>(), L, schemes, b, need_bits_grad, out.data_ptr<T>());
      return;
    }
    // Batched rows in groups of consecutive rows of at most kGroup elements (a bigger row is a
    // group of its own): each group's 2-9 statistics passes then re-read cache-resident data,
    // as one call per tensor does, instead of streaming the whole batch from memory per pass.
    // Each row's result does not depend on its group (rows are reduced independently).
    for (int64_t c0 = 0; c0 < L.C;) {
      int64_t c1 = c0 + 1;
      while (c1 < L.C && L.off[c1 + 1] - L.off[c0] <= kGroup) ++c1;
      Layout G;
      G.C = c1 - c0;
      G.off.resize(G.C + 1);
      G.cfirst.resize(G.C + 1);
      for (int64_t c = 0; c <= G.C; ++c) {
        G.off[c] = L.off[c0 + c] - L.off[c0];
        G.cfirst[c] = L.cfirst[c0 + c] - L.cfirst[c0];
      }
      fill_params<scalar_t>(x.const_data_ptr<scalar_t>() + L.off[c0], G, schemes, b, need_bits_grad, out.data_ptr<T>(),
                            c0, L.C);
      c0 = c1;
    }
  });
  return out;
}

at::Tensor scheme_params_impl(const at::Tensor& x_, const at::Tensor& bits, at::IntArrayRef schemes,
                              bool per_channel, bool need_bits_grad) {
  check_float(x_, "x");
  const RowBits b = shared_bits(bits, schemes);
  const at::Tensor x = in_memory_order(x_, memory_order(x_, per_channel));  // a view of a dense x
  return scheme_params_rows(x, layout_of(x, per_channel), b, schemes, need_bits_grad);
}

// ----------------------------------------------------------------------------- output pass
struct Candidates {
  std::vector<int64_t> sid;
  RowBits bits;
  std::vector<double> cb;  // bits_scale_factor per entry of bits.v
  int b(int64_t c, int64_t k) const { return bits.at(c, k); }
  double scale(int64_t c, int64_t k) const { return cb[(bits.per_row ? c * bits.K : 0) + k]; }
};

Candidates candidates(RowBits bits, at::IntArrayRef schemes) {
  Candidates cs;
  cs.sid.assign(schemes.begin(), schemes.end());
  cs.bits = std::move(bits);
  for (int b : cs.bits.v) cs.cb.push_back(bits_scale_factor(b));
  return cs;
}

// Mixture weights of candidate k in row c: [K] for every row, or [C, K] (batched ops).
struct RowWeights {
  std::vector<double> v;
  int64_t K = 0;
  bool per_row = false;
  double at(int64_t c, int64_t k) const { return v[(per_row ? c * K : 0) + k]; }
};

at::Tensor params_for(const at::Tensor& params, const at::Tensor& x, int64_t K, const Layout& L) {
  TORCH_CHECK_TYPE(at::isFloatingType(params.scalar_type()), "autoqnn: params has dtype ",
                   params.scalar_type(), "; expected a floating-point tensor");
  TORCH_CHECK_VALUE(params.dim() == 3 && params.size(0) == K && params.size(1) == L.C &&
                        params.size(2) == kNumParams,
                    "autoqnn: params must have shape [", K, ", ", L.C, ", ", kNumParams, "], got ",
                    params.sizes());
  return params.detach().to(at::kCPU, compute_type(x.scalar_type())).contiguous();
}

RowWeights host_weights(const at::Tensor& w, int64_t K) {
  TORCH_CHECK_VALUE(w.numel() == K, "autoqnn: weights must have ", K, " entries, got ", w.numel());
  return {host_doubles(w.dim() > 1 ? w.reshape({-1}) : w), K, false};
}

RowWeights batched_weights(const at::Tensor& w, int64_t R, int64_t K, const char* op) {
  check_float(w, "weights");
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == R && w.size(1) == K, "autoqnn::", op,
                    ": weights must have shape [", R, ", ", K, "] (rows x schemes), got ", w.sizes());
  return {host_doubles(w), K, true};
}

// ---- tiles: each candidate is evaluated over a tile of elements with its scheme known at compile
// time, so the loops vectorise (see scheme_math.h: no libm calls in the per-element math).

// Where a tile's values go (ACC): kStore q[j] = v; kScaled q[j] = v*w (the mixture's first
// candidate); kAccumulate q[j] = q[j] + v*w (the others). The mixture forward accumulates in the
// evaluation loop itself: the same products and sums in the same order as a separate
// y = y + q*w pass, without storing q and reading it back (one L1 store and two loads per element
// and candidate fewer).
enum { kStore = 0, kScaled = 1, kAccumulate = 2 };

template <int ACC, typename T>
__attribute__((always_inline)) inline void put(T* __restrict q, int64_t j, T v, T w) {
  if constexpr (ACC == kStore) {
    (void)w;
    q[j] = v;
  } else if constexpr (ACC == kScaled) {
    q[j] = v * w;
  } else {
    q[j] = q[j] + v * w;
  }
}

template <int SID, typename T, bool ND, int ACC = kStore>
AUTOQNN_TILE_FN void eval_tile(const T* __restrict x, int64_t n, const T* p, int b, T cb, T* __restrict q,
                      T* __restrict ste, T* __restrict d, T w = T(1)) {
  if constexpr (SID == kResidual) {
    T r[kTile], sp[kTile], rq[kTile];
    for (int64_t j = 0; j < n; ++j) {
      r[j] = x[j];
      rq[j] = T(0);
      sp[j] = T(0);
    }
    for (int i = 0; i < b; ++i) {
      const T a = p[i];
      for (int64_t j = 0; j < n; ++j) {
        const T s = r[j] > T(0) ? a : -a;
        rq[j] = rq[j] + s;
        r[j] = r[j] - s;
        sp[j] = s;
      }
    }
    const T an = p[b];
    for (int64_t j = 0; j < n; ++j) {
      const bool fin = (x[j] - x[j]) == T(0);
      put<ACC>(q, j, x[j] != x[j] ? x[j] : rq[j], w);
      if constexpr (ND) d[j] = fin ? T(0.5) * (sp[j] + (r[j] > T(0) ? an : -an)) : T(0);
    }
  } else {
    // ste is only consumed for ClipQ (the other schemes' STE is "x is finite", applied once in
    // the grad_x loop); not storing it elsewhere keeps GCC's if-conversion and vectoriser happy.
    // ClipQ's mask |x| <= (2^(b-1) - 1/2)*alpha is recomputed here rather than read from
    // Eval::ste: GCC vectorises this form and not the other (same value, NaN -> 0).
    for (int64_t j = 0; j < n; ++j) {
      const auto r = eval_sid<SID, T, ND>(x[j], p, b, cb);
      put<ACC>(q, j, r.q, w);
      if constexpr (ND) d[j] = r.d;
    }
    if constexpr (SID == kClip) {
      if (ste) {  // only the backward needs it; a separate loop so both loops vectorise
        const T edge = (T(int64_t(1) << (b - 1)) - T(0.5)) * p[0];
        for (int64_t j = 0; j < n; ++j) {
          const T ax = x[j] < T(0) ? -x[j] : x[j];
          ste[j] = ax <= edge ? T(1) : T(0);
        }
      }
    }
  }
}

// y = w*q_sid(x) (first) or y += w*q_sid(x) over a tile (the mixture forward).
template <typename T>
inline void mix_tile_rt(int64_t sid, const T* x, int64_t n, const T* p, int b, T cb, T* y, T w, bool first) {
#define AUTOQNN_MIX(S)                                                              \
  if (first)                                                                        \
    eval_tile<S, T, false, kScaled>(x, n, p, b, cb, y, nullptr, nullptr, w);        \
  else                                                                              \
    eval_tile<S, T, false, kAccumulate>(x, n, p, b, cb, y, nullptr, nullptr, w);    \
  break;
  switch (sid) {
    case kBinary: AUTOQNN_MIX(kBinary)
    case kTernary: AUTOQNN_MIX(kTernary)
    case kQuaternary: AUTOQNN_MIX(kQuaternary)
    case kFixed: AUTOQNN_MIX(kFixed)
    case kResidual: AUTOQNN_MIX(kResidual)
    case kZoom: AUTOQNN_MIX(kZoom)
    case kClip: AUTOQNN_MIX(kClip)
    default: AUTOQNN_MIX(kPot)
  }
#undef AUTOQNN_MIX
}

template <typename T, bool ND>
inline void eval_tile_rt(int64_t sid, const T* x, int64_t n, const T* p, int b, T cb, T* q, T* ste, T* d) {
  switch (sid) {
    case kBinary: eval_tile<kBinary, T, ND>(x, n, p, b, cb, q, ste, d); break;
    case kTernary: eval_tile<kTernary, T, ND>(x, n, p, b, cb, q, ste, d); break;
    case kQuaternary: eval_tile<kQuaternary, T, ND>(x, n, p, b, cb, q, ste, d); break;
    case kFixed: eval_tile<kFixed, T, ND>(x, n, p, b, cb, q, ste, d); break;
    case kResidual: eval_tile<kResidual, T, ND>(x, n, p, b, cb, q, ste, d); break;
    case kZoom: eval_tile<kZoom, T, ND>(x, n, p, b, cb, q, ste, d); break;
    case kClip: eval_tile<kClip, T, ND>(x, n, p, b, cb, q, ste, d); break;
    default: eval_tile<kPot, T, ND>(x, n, p, b, cb, q, ste, d); break;
  }
}

// sum_j a[j]*b[j] over a tile in lane_sum's order (deterministic per tile): the products (rounded
// to T; -ffp-contract=off) go straight into the lanes. Storing them to a stack buffer first, as
// this once did, put one store per element in the loop, and whenever the buffer's address
// happened to sit a multiple of 4 KiB from a's or b's (stack layout), the loads behind it
// stalled on false dependencies: the whole mixture backward measured ~10% slower after an
// unrelated change of the caller's frame.
template <typename T>
__attribute__((always_inline)) inline double tile_dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  for (; j < n; ++j) s += static_cast<T>(a[j] * b[j]);
  return s;
}

// mk = st*w (first masked candidate) or mk += st*w.
template <typename T>
AUTOQNN_TILE_FN void mask_tile(T* __restrict mk, const T* __restrict st, T w, int64_t n, bool first) {
  if (first)
    for (int64_t j = 0; j < n; ++j) mk[j] = st[j] * w;
  else
    for (int64_t j = 0; j < n; ++j) mk[j] = mk[j] + st[j] * w;
}

template <typename T>
AUTOQNN_TILE_FN double dot_tile(const T* __restrict a, const T* __restrict b, int64_t n) {
  return tile_dot(a, b, n);
}

// grad_x = g * (sum_k w_k mask_k) at finite x, 0 elsewhere, cast to the output dtype.
template <typename scalar_t, typename T>
AUTOQNN_TILE_FN void grad_x_tile(scalar_t* __restrict gx, const T* __restrict x, const T* __restrict g,
                                 const T* __restrict mk, bool any_masked, T w_identity, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T factor = any_masked ? mk[j] + w_identity : w_identity;
    const bool fin = (x[j] - x[j]) == T(0);
    gx[j] = static_cast<scalar_t>(fin ? g[j] * factor : T(0));
  }
}

// y = mixture accumulated in compute type, cast to the output dtype; and the input conversion.
template <typename scalar_t, typename T>
AUTOQNN_TILE_FN void store_tile(scalar_t* __restrict out, const T* __restrict v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(v[j]);
}

template <typename scalar_t, typename T>
AUTOQNN_TILE_FN void load_tile(T* __restrict out, const scalar_t* __restrict v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(v[j]);
}

// y = sum_k w_k q_k(x) over the rows of L (x contiguous, params checked); weights == nullptr
// means a single scheme with weight exactly 1.
at::Tensor forward_rows(const at::Tensor& x, const Layout& L, const at::Tensor& params, const RowWeights* w,
                        const Candidates& cs) {
  const int64_t K = cs.sid.size();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const T* pp = params.const_data_ptr<T>();
    std::vector<T> wt(w ? w->v.size() : 0);
    for (size_t i = 0; i < wt.size(); ++i) wt[i] = static_cast<T>(w->v[i]);
    for_each_chunk(L, [&](int64_t c, int64_t b, int64_t e, int64_t) {
      alignas(64) T xt[kTile], yt[kTile];
      const T* wr = w ? wt.data() + (w->per_row ? c * K : 0) : nullptr;
      for (int64_t t0 = b; t0 < e; t0 += kTile) {
        const int64_t n = std::min(kTile, e - t0);
        const scalar_t* xr = xp + L.begin(c) + t0;
        load_tile<scalar_t, T>(xt, xr, n);  // aligned L1 copy: read K times below
        const T* xv = xt;
        for (int64_t k = 0; k < K; ++k) {
          const T* p = pp + (k * L.C + c) * kNumParams;
          if (wr)
            mix_tile_rt<T>(cs.sid[k], xv, n, p, cs.b(c, k), T(cs.scale(c, k)), yt, wr[k], k == 0);
          else
            eval_tile_rt<T, false>(cs.sid[k], xv, n, p, cs.b(c, k), T(cs.scale(c, k)), yt, nullptr, nullptr);
        }
        store_tile<scalar_t, T>(yp + L.begin(c) + t0, yt, n);
      }
    });
  });
  return y;
}

at::Tensor forward_impl(const at::Tensor& x_, const at::Tensor& params_, const RowWeights* w,
                        const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel) {
  check_float(x_, "x");
  const std::vector<int64_t> order = memory_order(x_, per_channel);  // y laid out like a dense x
  const at::Tensor x = in_memory_order(x_, order);
  const Layout L = layout_of(x, per_channel);
  const Candidates cs = candidates(shared_bits(bits, schemes), schemes);
  const at::Tensor params = params_for(params_, x, schemes.size(), L);
  return from_memory_order(forward_rows(x, L, params, w, cs), order);
}

// Returns grad_x and fills gw/gb (double) when requested: [K] summed over every row for shared
// weights, [C, K] per row for per-row weights (batched ops).
at::Tensor backward_rows(const at::Tensor& gy, const at::Tensor& x, const Layout& L, const at::Tensor& params,
                         const RowWeights* w, const Candidates& cs, bool need_w, bool need_b,
                         std::vector<double>& gw, std::vector<double>& gb) {
  const int64_t K = cs.sid.size();
  const bool per_row = w && w->per_row;
  const int64_t out_rows = per_row ? L.C : 1;
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  gw.assign(out_rows * K, 0.0);
  gb.assign(out_rows * K, 0.0);
  if (x.numel() == 0) return gx;
  const int64_t nacc = 2 * K;
  std::vector<double> part(L.total_chunks() * nacc, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const T* pp = params.const_data_ptr<T>();
    const int64_t wrows = per_row ? L.C : 1;
    std::vector<T> wt(wrows * K, T(1));
    if (w)
      for (size_t i = 0; i < wt.size(); ++i) wt[i] = static_cast<T>(w->v[i]);
    // Sum of the identity-STE candidates' weights, in candidate order (as the reference).
    std::vector<T> w_identity(wrows, T(0));
    for (int64_t r = 0; r < wrows; ++r)
      for (int64_t k = 0; k < K; ++k)
        if (cs.sid[k] != kClip) w_identity[r] = w_identity[r] + wt[r * K + k];
    auto body = [&](auto need_d_tag) {
      constexpr bool ND = decltype(need_d_tag)::value;
      for_each_chunk(L, [&](int64_t c, int64_t b, int64_t e, int64_t t) {
        alignas(64) T xt[kTile], gt[kTile], qt[kTile], st[kTile], dt[kTile], mk[kTile];
        double* acc = part.data() + t * nacc;
        const int64_t wr = per_row ? c : 0;
        const T* wc = wt.data() + wr * K;
        for (int64_t t0 = b; t0 < e; t0 += kTile) {
          const int64_t n = std::min(kTile, e - t0);
          const scalar_t* xr = xp + L.begin(c) + t0;
          const scalar_t* gr = gp + L.begin(c) + t0;
          load_tile<scalar_t, T>(xt, xr, n);  // aligned L1 copies: read K times below
          load_tile<scalar_t, T>(gt, gr, n);
          const T* xv = xt;
          const T* gv = gt;
          bool any_masked = false;
          for (int64_t k = 0; k < K; ++k) {
            const T* p = pp + (k * L.C + c) * kNumParams;
            eval_tile_rt<T, ND>(cs.sid[k], xv, n, p, cs.b(c, k), T(cs.scale(c, k)), qt, st, dt);
            if (cs.sid[k] == kClip) {
              mask_tile<T>(mk, st, wc[k], n, !any_masked);
              any_masked = true;
            }
            if (need_w) acc[k] += dot_tile<T>(gv, qt, n);
            if constexpr (ND) acc[K + k] += dot_tile<T>(gv, dt, n);
          }
          grad_x_tile<scalar_t, T>(gxp + L.begin(c) + t0, xv, gv, mk, any_masked, w_identity[wr], n);
        }
      });
    };
    if (need_b) body(std::true_type{});
    else body(std::false_type{});
  });
  // chunk partials merged in chunk order (rows in order): deterministic
  for (int64_t c = 0; c < L.C; ++c) {
    const int64_t o = per_row ? c * K : 0;
    for (int64_t j = L.first_chunk(c), e = j + L.chunks(c); j < e; ++j)
      for (int64_t k = 0; k < K; ++k) {
        gw[o + k] += part[j * nacc + k];
        gb[o + k] += part[j * nacc + K + k];
      }
  }
  if (w)
    for (int64_t r = 0; r < out_rows; ++r)
      for (int64_t k = 0; k < K; ++k) gb[r * K + k] *= w->at(r, k);
  return gx;
}

at::Tensor backward_impl(const at::Tensor& gy_, const at::Tensor& x_, const at::Tensor& params_,
                         const RowWeights* w, const at::Tensor& bits, at::IntArrayRef schemes,
                         bool per_channel, bool need_w, bool need_b, std::vector<double>& gw,
                         std::vector<double>& gb) {
  check_float(x_, "x");
  TORCH_CHECK_VALUE(gy_.sizes() == x_.sizes(), "autoqnn: grad_y has shape ", gy_.sizes(),
                    " but x has shape ", x_.sizes());
  const std::vector<int64_t> order = memory_order(x_, per_channel);  // grad_x laid out like a dense x
  const at::Tensor x = in_memory_order(x_, order);
  const at::Tensor gy = in_memory_order(gy_.to(x.scalar_type()), order);
  const Layout L = layout_of(x, per_channel);
  const Candidates cs = candidates(shared_bits(bits, schemes), schemes);
  const at::Tensor params = params_for(params_, x, schemes.size(), L);
  return from_memory_order(backward_rows(gy, x, L, params, w, cs, need_w, need_b, gw, gb), order);
}

// v as a tensor shaped like `like`, with its dtype and device. On the host in float32/float64 it
// is written in place (one allocation); otherwise converted from a float64 tensor.
at::Tensor to_like(const std::vector<double>& v, const at::Tensor& like) {
  const at::ScalarType st = like.scalar_type();
  if (like.device().is_cpu() && (st == at::kFloat || st == at::kDouble)) {
    at::Tensor t = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
    if (st == at::kFloat) std::copy(v.begin(), v.end(), t.data_ptr<float>());
    else std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t;
  }
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(like.options()).reshape(like.sizes());
}

// ----------------------------------------------------------------------------- op entry points
at::Tensor scheme_params_cpu(const at::Tensor& x, const at::Tensor& bits, at::IntArrayRef schemes,
                             bool per_channel, bool need_bits_grad) {
  return scheme_params_impl(x, bits, schemes, per_channel, need_bits_grad);
}

at::Tensor quantize_cpu(const at::Tensor& x, const at::Tensor& params, const at::Tensor& bits,
                        int64_t scheme, bool per_channel) {
  const int64_t s[1] = {scheme};
  return forward_impl(x, params, nullptr, bits, at::IntArrayRef(s, 1), per_channel);
}

std::tuple<at::Tensor, at::Tensor> quantize_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& params, const at::Tensor& bits,
                                                         int64_t scheme, bool per_channel,
                                                         bool need_bits_grad) {
  const int64_t s[1] = {scheme};
  std::vector<double> gw, gb;
  at::Tensor gx = backward_impl(grad_y, x, params, nullptr, bits, at::IntArrayRef(s, 1), per_channel,
                                false, need_bits_grad, gw, gb);
  return {gx, to_like(gb, bits)};
}

at::Tensor mixture_cpu(const at::Tensor& x, const at::Tensor& params, const at::Tensor& weights,
                       const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel) {
  check_float(weights, "weights");
  const RowWeights w = host_weights(weights, schemes.size());
  return forward_impl(x, params, &w, bits, schemes, per_channel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& params, const at::Tensor& weights,
    const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel, bool need_weights_grad,
    bool need_bits_grad) {
  check_float(weights, "weights");
  const RowWeights w = host_weights(weights, schemes.size());
  std::vector<double> gw, gb;
  at::Tensor gx = backward_impl(grad_y, x, params, &w, bits, schemes, per_channel, need_weights_grad,
                                need_bits_grad, gw, gb);
  return {gx, to_like(gw, weights), to_like(gb, bits)};
}

// ---- batched ops: rows of a flat x given by offsets, per-row weights and bits [R, K]
struct Batched {
  at::Tensor x;  // contiguous
  Layout L;
  Candidates cs;
};

Batched batched_setup(const at::Tensor& x_, at::IntArrayRef offsets, const at::Tensor& bits,
                      at::IntArrayRef schemes, const char* op) {
  check_float(x_, "x");
  TORCH_CHECK_VALUE(!schemes.empty(), "autoqnn::", op, ": schemes must name at least one candidate");
  Batched b;
  b.x = x_.contiguous();
  b.L = ragged_layout(b.x, offsets, op);
  b.cs = candidates(batched_bits(bits, schemes, b.L.C, op), schemes);
  return b;
}

at::Tensor scheme_params_batched_cpu(const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& bits,
                                     at::IntArrayRef schemes, bool need_bits_grad) {
  const Batched b = batched_setup(x, offsets, bits, schemes, "scheme_params_batched");
  return scheme_params_rows(b.x, b.L, b.cs.bits, schemes, need_bits_grad);
}

at::Tensor mixture_batched_cpu(const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& params,
                               const at::Tensor& weights, const at::Tensor& bits, at::IntArrayRef schemes) {
  const Batched b = batched_setup(x, offsets, bits, schemes, "mixture_batched");
  const RowWeights w = batched_weights(weights, b.L.C, schemes.size(), "mixture_batched");
  return forward_rows(b.x, b.L, params_for(params, b.x, schemes.size(), b.L), &w, b.cs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_batched_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& params,
    const at::Tensor& weights, const at::Tensor& bits, at::IntArrayRef schemes, bool need_weights_grad,
    bool need_bits_grad) {
  const Batched b = batched_setup(x, offsets, bits, schemes, "mixture_batched_backward");
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "autoqnn: grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x.sizes());
  const RowWeights w = batched_weights(weights, b.L.C, schemes.size(), "mixture_batched_backward");
  const at::Tensor gy = grad_y.to(b.x.scalar_type()).contiguous();
  std::vector<double> gw, gb;
  at::Tensor gx = backward_rows(gy, b.x, b.L, params_for(params, b.x, schemes.size(), b.L), &w, b.cs,
                                need_weights_grad, need_bits_grad, gw, gb);
  return {gx, to_like(gw, weights), to_like(gb, bits)};
}

}  // namespace

TORCH_LIBRARY_IMPL(autoqnn, CPU, m) {
  m.impl("scheme_params_batched", &scheme_params_batched_cpu);
  m.impl("mixture_batched", &mixture_batched_cpu);
  m.impl("mixture_batched_backward", &mixture_batched_backward_cpu);
  m.impl("scheme_params", &scheme_params_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_backward", &quantize_backward_cpu);
  m.impl("mixture", &mixture_cpu);
  m.impl("mixture_backward", &mixture_backward_cpu);
}

}  // namespace autoqnn
