// SPDX-License-Identifier: MIT
// autoqnn::tensor_stats(Tensor x, bool per_channel) -> Tensor [C, 7] on CUDA.
//
// Same semantics as csrc/cpu/tensor_stats.cpp (accumulator: autoqnn/tensor_stats.h), in two
// deterministic stages on the current stream:
//   1. one block per (row, chunk of stats::kChunk elements): each thread accumulates a fixed
//      strided subset in double, then a fixed-shape shared-memory tree gives the chunk partial;
//   2. one block per row merges that row's partials the same way and writes the output row.
// No atomics, so the result is bitwise reproducible for a given shape (it may differ from the CPU
// kernel in the last bits: the summation order differs).
//
// autoqnn::scheme_params(x, bits, schemes, per_channel) -> [K, C, kNumParams] on CUDA: the same
// chain as csrc/cpu/quantize.cpp::fill_params, entirely on the device (no host synchronisation,
// a handful of launches from C++): pass 1 = the statistics above, whose finalize kernel also
// writes each row's mean, mean|x| and Ternary threshold; then each dependent pass (pass 2 = sigma
// (two-pass, as torch.std) + Ternary's masked mean + ResQ alpha_2; pass 3 = Quaternary + alpha_3;
// pass q >= 4 = alpha_q) as block partials, finalized by each row's last block in the same launch
// (one launch per pass; a ticket counter per row decides which block is last), which writes
// the values the next pass compares against; last, one thread per row writes every candidate's
// scales. Launches: one zero fill, one per pass, the scales (5 at 3 bits, against 8 for partial +
// finalize kernels, which AUTOQNN_CUDA_STATS_TWO_STAGE=1 still selects).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream without ATen/cuda/CUDAContext.h
                                  // (that one also pulls in cuBLAS/cuSPARSE/cuSOLVER headers)
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "autoqnn/memory_order.h"
#include "autoqnn/checks.h"
#include "autoqnn/dispatch.h"
#include "autoqnn/batched_rows.h"
#include "autoqnn/row_map.h"
#include "autoqnn/scheme_math.h"
#include "autoqnn/tensor_stats.h"

namespace autoqnn {
namespace {

using stats::Acc;

constexpr int kThreads = 256;  // threads per block of both stages (power of two)

// Tree reduction of one accumulator per thread (Acc or Dep: anything with merge); every thread of
// the block must call it. Fixed shape: deterministic.
template <typename A>
__device__ A block_reduce(A acc) {
  __shared__ A sh[kThreads];
  const int t = threadIdx.x;
  sh[t] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh[t].merge(sh[t + s]);
    __syncthreads();
  }
  return sh[0];
}

// Calls f(row[i]) for i = threadIdx.x, threadIdx.x + kThreads, ... < len, in that order (so a
// thread's accumulation order, hence the result, is that of the plain strided loop), issuing
// kUnroll independent loads before using any: a chunk gives each thread only
// stats::kChunk / kThreads elements, and one load in flight per thread leaves the memory system
// idle (latency-bound: ~0.8 TB/s per pass at 16M on an H200, against ~3.75 TB/s for a copy).
constexpr int kUnroll = 8;

template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_strided(const scalar_t* __restrict__ row, int64_t len, F&& f) {
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < len; i += kUnroll * kThreads) {
    scalar_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = row[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f(v[u]);
  }
  for (; i < len; i += kThreads) f(row[i]);
}

// Stage 1: block b reduces its chunk (uniform rows: chunk b % chunks_per_row of row
// b / chunks_per_row).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_partial_kernel(const scalar_t* __restrict__ x /* contiguous */, Acc* __restrict__ part /* [chunks] */,
                         RowMap m) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const int64_t b = blockIdx.x;
  const int64_t len = ch.len;
  const scalar_t* row = x + ch.start;
  Acc acc = Acc::identity();
  for_each_strided(row, len, [&](scalar_t v) { acc.add(stats::to_double(v)); });
  acc = block_reduce(acc);
  if (threadIdx.x == 0) part[b] = acc;
}

// Stage 2: block c merges the partials of row c and writes out[c, :].
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const Acc* __restrict__ part /* [C, chunks_per_row] */,
                          out_t* __restrict__ out /* [C, kCols] */, int64_t chunks_per_row) {
  const int64_t c = blockIdx.x;
  Acc acc = Acc::identity();
  for (int64_t j = threadIdx.x; j < chunks_per_row; j += kThreads) {
    acc.merge(part[c * chunks_per_row + j]);
  }
  acc = block_reduce(acc);
  if (threadIdx.x == 0) acc.store(out + c * stats::kCols);
}


// ----------------------------------------------------------------------------- scheme_params
// Per-row values the dependent passes compare against, in the compute type T (rounded where the
// reference rounds them): [C, kRowSlots] with slot 0 mean, 1 Ternary delta, 2 Quaternary step,
// 3 sigma, 3 + i ResQ alpha_i (i = 1 .. kMaxBits + 1; alpha_1 = mean|x|).
constexpr int kRowSlots = 16;
constexpr int kMaxResSteps = 8;  // ResQ at 8 bits needs alpha_1 .. alpha_9: passes up to res 8
static_assert(3 + kMaxBits[kResidual] + 1 < kRowSlots, "row slots");

// Sums of one dependent pass (csrc/cpu/quantize.cpp::DepPass): 0 sum (x - mean)^2, 1-2 Ternary
// sum|x| and count over |x| > delta, 3-4 Quaternary <x, v> and <v, v>, 5 ResQ sum |r_{res+1}|.
struct Dep {
  double v[6];
  C10_HOST_DEVICE static Dep zero() { return {{0.0, 0.0, 0.0, 0.0, 0.0, 0.0}}; }
  C10_HOST_DEVICE void merge(const Dep& o) {
    for (int i = 0; i < 6; ++i) v[i] += o.v[i];
  }
};

struct Cands {
  int32_t K;
  int32_t sid[kNumSchemes];
  int32_t bits[kNumSchemes];
  double lam[kNumSchemes];  // ClipQ / PotQ step over sigma at these bits (host constants)
  int32_t res_top;  // ResQ slots written: 0..b - 1 + res_top (1: alpha_{b+1} for the bits gradient)
};

// Pass 1 finalize: block c merges row c's partials into acc1[c] (min/max 0 without finite
// elements, as tensor_stats) and writes the row values the dependent passes need.
//
// Each statistics pass of scheme_params is one launch by default: every block publishes its chunk
// partial and takes a ticket from its row's counter; the block whose ticket completes the row
// (whichever it is) merges the row's partials in chunk order, exactly as the two-stage finalize
// kernels do (same values, bit for bit), and finalizes the row. The partials written by other
// blocks are read through L2 (ld.global.cg): they were fenced before the tickets were taken.
// AUTOQNN_CUDA_STATS_TWO_STAGE=1 selects the partial + finalize launches instead (A/B, fallback).
__device__ __forceinline__ Acc load_partial(const Acc* p) {
  return {__ldcg(&p->n), __ldcg(&p->s1), __ldcg(&p->sx), __ldcg(&p->s2),
          __ldcg(&p->mn), __ldcg(&p->mx), __ldcg(&p->ma)};
}

// Thread 0 stores this block's partial, fences it and takes a ticket; true in every thread of
// the block whose ticket is the row's last (every thread must call it).
template <typename A>
__device__ bool publish_partial(A* __restrict__ slot, const A& v, unsigned* __restrict__ ticket,
                                int64_t row_chunks) {
  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    *slot = v;
    __threadfence();
    last_block = atomicAdd(ticket, 1u) + 1u == static_cast<unsigned>(row_chunks);
  }
  __syncthreads();
  return last_block;
}

template <typename T>
__device__ void pass1_finalize_row(const Acc* __restrict__ part, const RowMap& m, int64_t c,
                                   Acc* __restrict__ acc1 /* [C] */, T* __restrict__ rp /* [C, kRowSlots] */) {
  const int64_t first = m.first(c), nch = m.chunks(c);
  Acc acc = Acc::identity();
  for (int64_t j = threadIdx.x; j < nch; j += kThreads) acc.merge(load_partial(part + first + j));
  acc = block_reduce(acc);
  if (threadIdx.x != 0) return;
  if (!(acc.n > 0.0)) acc.mn = acc.mx = acc.ma = 0.0;
  acc1[c] = acc;
  const double n = acc.n;
  const T mean = static_cast<T>(n > 0.0 ? acc.sx / n : 0.0);
  const T mean_abs = static_cast<T>(n > 0.0 ? acc.s1 / n : 0.0);
  T* r = rp + c * kRowSlots;
  r[0] = mean;
  r[1] = static_cast<T>(kTernaryDelta) * mean_abs;
  r[4] = mean_abs;  // alpha_1
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    params_pass1_finalize_kernel(const Acc* __restrict__ part, RowMap m, Acc* __restrict__ acc1 /* [C] */,
                                 T* __restrict__ rp /* [C, kRowSlots] */) {
  pass1_finalize_row(part, m, blockIdx.x, acc1, rp);
}

// Pass 1 in one launch: stats_partial_kernel's chunk partial, then the row's last block finalizes.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    params_pass1_kernel(const scalar_t* __restrict__ x, Acc* __restrict__ part, RowMap m,
                        unsigned* __restrict__ tickets /* [C] */, Acc* __restrict__ acc1, T* __restrict__ rp) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const scalar_t* row = x + ch.start;
  Acc acc = Acc::identity();
  for_each_strided(row, ch.len, [&](scalar_t v) { acc.add(stats::to_double(v)); });
  acc = block_reduce(acc);
  if (publish_partial(part + blockIdx.x, acc, tickets + ch.row, m.chunks(ch.row))) {
    pass1_finalize_row(part, m, ch.row, acc1, rp);
  }
}

__device__ __forceinline__ Dep load_partial(const Dep* p) {
  Dep d;
  for (int i = 0; i < 6; ++i) d.v[i] = __ldcg(&p->v[i]);
  return d;
}

// One dependent pass: the sums of this block's chunk, reduced over the block.
template <typename scalar_t, typename T>
__device__ Dep dep_chunk_sums(const scalar_t* __restrict__ x, const ChunkSpan& ch, const T* __restrict__ rp,
                              bool var, bool ter, bool quat, int res) {
  const int64_t c = ch.row;
  const int64_t len = ch.len;
  const scalar_t* row = x + ch.start;
  const T* r = rp + c * kRowSlots;
  const T mean = r[0], delta = r[1], s = r[2];
  Dep d = Dep::zero();
  for_each_strided(row, len, [&](scalar_t xv) {
    const T v = static_cast<T>(xv);
    const bool fin = (v - v) == T(0);
    const T a = fin ? (v < T(0) ? -v : v) : T(0);
    if (var) {
      const double dv = fin ? static_cast<double>(v - mean) : 0.0;
      d.v[0] += dv * dv;
    }
    if (ter) {
      const bool sel = a > delta;
      d.v[1] += sel ? static_cast<double>(a) : 0.0;
      d.v[2] += sel ? 1.0 : 0.0;
    }
    if (quat) {
      const T xx = fin ? v : T(0);
      const T q = detail::round_clamped(detail::safe_div(xx, s), T(-2), T(1));
      d.v[3] += static_cast<double>(xx * q);
      d.v[4] += static_cast<double>(q * q);
    }
    if (res > 0) {
      T aa = a;
      for (int j = 0; j < res; ++j) {
        const T t = aa - r[4 + j];
        aa = t < T(0) ? -t : t;
      }
      d.v[5] += fin ? static_cast<double>(aa) : 0.0;
    }
  });
  return block_reduce(d);
}

// One dependent pass: block b sums its chunk.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    params_dep_partial_kernel(const scalar_t* __restrict__ x, RowMap m, const T* __restrict__ rp, bool var,
                              bool ter, bool quat, int res, Dep* __restrict__ part) {
  const Dep d = dep_chunk_sums(x, m.chunk(blockIdx.x), rp, var, ter, quat, res);
  if (threadIdx.x == 0) part[blockIdx.x] = d;
}

// Dependent pass q finalize: block c merges row c's partials into out[c] and writes what later
// passes need (q == 2: sigma and the Quaternary step; res > 0: alpha_{res+1}).
template <typename T>
__device__ void dep_finalize_row(const Dep* __restrict__ part, const RowMap& m, int64_t c,
                                 const Acc* __restrict__ acc1, int q, int res, T* __restrict__ rp,
                                 Dep* __restrict__ out /* [C] */) {
  const int64_t first = m.first(c), nch = m.chunks(c);
  Dep d = Dep::zero();
  for (int64_t j = threadIdx.x; j < nch; j += kThreads) d.merge(load_partial(part + first + j));
  d = block_reduce(d);
  if (threadIdx.x != 0) return;
  out[c] = d;
  const double n = acc1[c].n;
  T* r = rp + c * kRowSlots;
  if (q == 2) {
    // 0 exactly when the row's finite elements are all equal (min == max), as the reference
    const bool spread = n > 1.0 && acc1[c].mx > acc1[c].mn;
    const T sigma = static_cast<T>(spread ? sqrt(d.v[0] / (n - 1.0)) : 0.0);
    r[3] = sigma;
    r[2] = static_cast<T>(kQuaternaryLambda) * sigma;
  }
  if (res > 0) r[4 + res] = static_cast<T>(n > 0.0 ? d.v[5] / n : 0.0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    params_dep_finalize_kernel(const Dep* __restrict__ part, RowMap m, const Acc* __restrict__ acc1, int q,
                               int res, T* __restrict__ rp, Dep* __restrict__ out /* [C] */) {
  dep_finalize_row(part, m, blockIdx.x, acc1, q, res, rp, out);
}

// A dependent pass in one launch: the chunk sums, then the row's last block finalizes.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    params_dep_kernel(const scalar_t* __restrict__ x, RowMap m, T* __restrict__ rp, bool var, bool ter, bool quat,
                      int res, Dep* __restrict__ part, unsigned* __restrict__ tickets /* [C] */,
                      const Acc* __restrict__ acc1, int q, Dep* __restrict__ out) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const Dep d = dep_chunk_sums(x, ch, rp, var, ter, quat, res);
  if (publish_partial(part + blockIdx.x, d, tickets + ch.row, m.chunks(ch.row))) {
    dep_finalize_row(part, m, ch.row, acc1, q, res, rp, out);
  }
}

// Every candidate's scales, one thread per row (csrc/cpu/quantize.cpp::fill_params, last loop).
// Batched ops: per-row bits and ClipQ/PotQ lambdas row_bits / row_lam [C, K] (else cs's).
template <typename T>
__global__ void params_write_kernel(const Acc* __restrict__ acc1, const T* __restrict__ rp,
                                    const Dep* __restrict__ p2, const Dep* __restrict__ p3, Cands cs,
                                    const int32_t* __restrict__ row_bits, const double* __restrict__ row_lam,
                                    int64_t C, T* __restrict__ out /* [K, C, kNumParams] */) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const Acc st = acc1[c];
  const T* r = rp + c * kRowSlots;
  const T mean_abs = r[4], delta = r[1], s_quat = r[2], sigma = r[3];
  for (int k = 0; k < cs.K; ++k) {
    T* p = out + (k * C + c) * kNumParams;
    for (int i = 0; i < kNumParams; ++i) p[i] = T(0);  // unused slots are 0 (out is not pre-zeroed)
    const int b = row_bits ? row_bits[c * cs.K + k] : cs.bits[k];
    const double lam = row_lam ? row_lam[c * cs.K + k] : cs.lam[k];
    switch (cs.sid[k]) {
      case kBinary: p[0] = mean_abs; break;
      case kTernary: {
        const double cnt = p2[c].v[2];
        p[0] = delta;
        p[1] = static_cast<T>(cnt > 0.0 ? p2[c].v[1] / cnt : 0.0);
        break;
      }
      case kQuaternary: {
        const double vv = p3[c].v[4];
        p[0] = s_quat;
        p[1] = static_cast<T>(vv > 0.0 ? p3[c].v[3] / vv : 0.0);
        break;
      }
      case kFixed: {
        const T ma = static_cast<T>(st.ma);
        int e = 0;
        frexp(static_cast<double>(ma), &e);
        p[0] = ma > T(0) ? static_cast<T>(ldexp(1.0, e + 1 - b)) : T(0);
        p[1] = ma;
        break;
      }
      case kResidual:
        for (int i = 0; i < b + cs.res_top; ++i) p[i] = r[4 + i];
        break;
      case kZoom: {
        const T mn = static_cast<T>(st.mn), mx = static_cast<T>(st.mx);
        p[0] = mn;
        p[1] = (mx - mn) / static_cast<T>(ldexp(1.0, b));
        break;
      }
      case kClip:
      case kPot: p[0] = static_cast<T>(lam) * sigma; break;
      default: break;
    }
  }
}

// AUTOQNN_CUDA_STATS_TWO_STAGE=1: scheme_params's passes as partial + finalize launches (read once).
bool two_stage_stats() {
  static const bool two = [] {
    const char* v = std::getenv("AUTOQNN_CUDA_STATS_TWO_STAGE");
    return v != nullptr && v[0] == '1';
  }();
  return two;
}

// The candidates' ids, integer bits (int_bits, shared with the CPU kernel) and ClipQ/PotQ lambdas.
Cands params_cands(const at::Tensor& bits, at::IntArrayRef schemes) {
  TORCH_CHECK_VALUE(schemes.size() <= static_cast<size_t>(kNumSchemes), "autoqnn::scheme_params: at most ",
                    kNumSchemes, " schemes per call, got ", schemes.size());
  const std::vector<int> ib = int_bits(bits, schemes);
  Cands cs{};
  cs.K = static_cast<int32_t>(schemes.size());
  cs.res_top = 1;
  for (int k = 0; k < cs.K; ++k) {
    const int64_t s = schemes[k];
    cs.sid[k] = static_cast<int32_t>(s);
    cs.bits[k] = static_cast<int32_t>(ib[k]);
    cs.lam[k] = s == kClip ? kClipLambda[cs.bits[k]] : (s == kPot ? kPotLambda[cs.bits[k]] : 0.0);
  }
  return cs;
}

// The statistics chain over the rows of m (nb = all chunks). Batched ops: per-row bits and
// lambdas row_bits / row_lam [C, K] on the device. res_alphas: the ResQ alphas to compute,
// alpha_1..alpha_{res_alphas} (res_alphas(), from the most ResQ bits of any row).
template <typename scalar_t, typename T>
void launch_scheme_params(const at::Tensor& xc, const RowMap& m, int64_t nb_, const Cands& cs, int res_alphas,
                          const int32_t* row_bits, const double* row_lam, at::Tensor& out, cudaStream_t stream) {
  bool need_sigma = false, need_ter = false, need_quat = false;
  for (int k = 0; k < cs.K; ++k) {
    const int s = cs.sid[k];
    need_sigma |= s == kQuaternary || s == kClip || s == kPot;
    need_ter |= s == kTernary;
    need_quat |= s == kQuaternary;
  }
  const int64_t C = m.R;
  const int64_t blocks = nb_;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max() && C <= std::numeric_limits<int32_t>::max(),
              "autoqnn::scheme_params: tensor too large for the CUDA kernel");
  const auto bytes = xc.options().dtype(at::kByte);
  const int last = std::max(need_quat ? 3 : 2, res_alphas);
  const bool one_launch = !two_stage_stats();
  // partials (reused by every pass), not initialised
  at::Tensor part_buf = at::empty({static_cast<int64_t>(std::max<int64_t>(blocks, 1) *
                                                        std::max(sizeof(Acc), sizeof(Dep)))},
                                  bytes);
  void* part = part_buf.mutable_data_ptr();
  // zeroed in one fill: per-row pass-1 accumulators, dependent sums, the row values rp and, for
  // the one-launch passes, a ticket counter per (pass, row). A row without chunks (an empty
  // row of the batched ops) is never finalized there: zeros are what finalizing it would write.
  const int64_t ticket_rows = one_launch ? last : 0;
  const int64_t state_bytes = C * static_cast<int64_t>(sizeof(Acc) + 3 * sizeof(Dep) + kRowSlots * sizeof(T)) +
                              ticket_rows * C * static_cast<int64_t>(sizeof(unsigned));
  at::Tensor state = at::zeros({state_bytes}, bytes);
  uint8_t* base = state.mutable_data_ptr<uint8_t>();
  Acc* acc1 = reinterpret_cast<Acc*>(base);
  Dep* p2 = reinterpret_cast<Dep*>(base + C * sizeof(Acc));
  Dep* p3 = p2 + C;
  Dep* p_later = p3 + C;  // sums of passes q >= 4 (only their alpha is used, through rp)
  T* rpp = reinterpret_cast<T*>(p_later + C);
  unsigned* tickets = reinterpret_cast<unsigned*>(rpp + C * kRowSlots);  // [last][C]: pass 1 uses row 0
  const scalar_t* xp = xc.const_data_ptr<scalar_t>();
  const unsigned nb = static_cast<unsigned>(blocks), nc = static_cast<unsigned>(C);

  if (one_launch) {
    if (nb > 0) {
      params_pass1_kernel<scalar_t, T><<<nb, kThreads, 0, stream>>>(xp, static_cast<Acc*>(part), m, tickets, acc1,
                                                                    rpp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    if (nb > 0) {
      stats_partial_kernel<scalar_t><<<nb, kThreads, 0, stream>>>(xp, static_cast<Acc*>(part), m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    params_pass1_finalize_kernel<T><<<nc, kThreads, 0, stream>>>(static_cast<Acc*>(part), m, acc1, rpp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (int q = 2; q <= last; ++q) {
    const bool res = res_alphas >= q;
    if (q == 2 && !(need_sigma || need_ter || res)) continue;
    if (q >= 3 && !res && !(q == 3 && need_quat)) continue;
    const int steps = res ? q - 1 : 0;
    TORCH_INTERNAL_ASSERT(steps <= kMaxResSteps);
    Dep* sums = q == 2 ? p2 : (q == 3 ? p3 : p_later);
    if (one_launch) {
      if (nb > 0) {
        params_dep_kernel<scalar_t, T><<<nb, kThreads, 0, stream>>>(
            xp, m, rpp, q == 2, q == 2 && need_ter, q == 3 && need_quat, steps, static_cast<Dep*>(part),
            tickets + (q - 1) * C, acc1, q, sums);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      continue;
    }
    if (nb > 0) {
      params_dep_partial_kernel<scalar_t, T><<<nb, kThreads, 0, stream>>>(
          xp, m, rpp, q == 2, q == 2 && need_ter, q == 3 && need_quat, steps, static_cast<Dep*>(part));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    params_dep_finalize_kernel<T><<<nc, kThreads, 0, stream>>>(static_cast<Dep*>(part), m, acc1, q, steps, rpp,
                                                              sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  params_write_kernel<T><<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      acc1, rpp, p2, p3, cs, row_bits, row_lam, C, out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ResQ needs alpha_1..alpha_b, and alpha_{b+1} for the bitwidth gradient only (its slot stays 0
// without); 0 without a ResQ candidate (max_bits < 0).
int res_alphas(int max_bits, bool need_bits_grad) { return max_bits < 0 ? 0 : max_bits + (need_bits_grad ? 1 : 0); }

int max_res_bits(const Cands& cs) {
  int r = -1;
  for (int k = 0; k < cs.K; ++k)
    if (cs.sid[k] == kResidual) r = std::max(r, static_cast<int>(cs.bits[k]));
  return r;
}

}  // namespace

at::Tensor tensor_stats_cuda(const at::Tensor& x, bool per_channel) {
  check_float_input(x, "tensor_stats", "x");
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = num_channels(x, per_channel);
  const int64_t N = C > 0 ? x.numel() / C : 0;
  const at::ScalarType out_dtype = stats_dtype(x.scalar_type());
  if (C == 0 || N == 0) return at::zeros({C, stats::kCols}, x.options().dtype(out_dtype));

  const at::Tensor xc = in_memory_order(x, memory_order(x, per_channel));  // a view of a dense x
  const int64_t chunks_per_row = (N + stats::kChunk - 1) / stats::kChunk;
  const int64_t blocks = C * chunks_per_row;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "autoqnn::tensor_stats: tensor too large for the CUDA kernel (", x.numel(),
              " elements)");
  at::Tensor out = at::empty({C, stats::kCols}, x.options().dtype(out_dtype));
  // Partials as raw bytes: the caching allocator aligns blocks far beyond alignof(Acc).
  at::Tensor part = at::empty({blocks * static_cast<int64_t>(sizeof(Acc))},
                              x.options().dtype(at::kByte));
  Acc* part_ptr = reinterpret_cast<Acc*>(part.mutable_data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AUTOQNN_DISPATCH_FLOATING(xc.scalar_type(), "tensor_stats_cuda", [&] {
    RowMap m;
    m.R = C;
    m.N = N;
    m.chunks_per_row = chunks_per_row;
    stats_partial_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), part_ptr, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (out_dtype == at::kDouble) {
    stats_finalize_kernel<double><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        part_ptr, out.mutable_data_ptr<double>(), chunks_per_row);
  } else {
    stats_finalize_kernel<float><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        part_ptr, out.mutable_data_ptr<float>(), chunks_per_row);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


at::Tensor scheme_params_cuda(const at::Tensor& x, const at::Tensor& bits, at::IntArrayRef schemes,
                              bool per_channel, bool need_bits_grad) {
  check_float_input(x, "scheme_params", "x");
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  Cands cs = params_cands(bits, schemes);
  const int64_t C = num_channels(x, per_channel);
  const int64_t N = C > 0 ? x.numel() / C : 0;
  const auto out_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  if (C == 0 || N == 0 || cs.K == 0)  // no element anywhere: every scale is 0
    return at::zeros({static_cast<int64_t>(schemes.size()), C, kNumParams}, out_opts);
  // every slot is written by params_write_kernel: no memset launch
  at::Tensor out = at::empty({static_cast<int64_t>(schemes.size()), C, kNumParams}, out_opts);
  const at::Tensor xc = in_memory_order(x, memory_order(x, per_channel));  // a view of a dense x
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RowMap m;
  m.R = C;
  m.N = N;
  m.chunks_per_row = (N + stats::kChunk - 1) / stats::kChunk;
  cs.res_top = need_bits_grad ? 1 : 0;
  const int na = res_alphas(max_res_bits(cs), need_bits_grad);
  AUTOQNN_DISPATCH_FLOATING(xc.scalar_type(), "scheme_params_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      launch_scheme_params<scalar_t, double>(xc, m, C * m.chunks_per_row, cs, na, nullptr, nullptr, out, stream);
    } else {
      launch_scheme_params<scalar_t, float>(xc, m, C * m.chunks_per_row, cs, na, nullptr, nullptr, out, stream);
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- batched
// Ragged rows on the device for the batched ops (csrc/cuda/quantize.cu shares it): offsets and
// chunk starts ([R + 1] each, one host-to-device copy of a pageable buffer, no stream sync).
BatchedRows batched_rows(const at::Tensor& x, at::IntArrayRef offsets, const char* op) {
  TORCH_CHECK_VALUE(!offsets.empty(), "autoqnn::", op, ": offsets must have at least one entry (0)");
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == x.numel(), "autoqnn::", op,
                    ": offsets must start at 0 and end at x.numel() = ", x.numel(), ", got ", offsets.front(),
                    " .. ", offsets.back());
  BatchedRows br;
  const int64_t R = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor host = at::empty({2 * (R + 1)}, at::TensorOptions().dtype(at::kLong));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  h[R + 1] = 0;
  for (int64_t c = 0; c <= R; ++c) {
    h[c] = offsets[c];
    if (c < R) {
      TORCH_CHECK_VALUE(offsets[c + 1] >= offsets[c], "autoqnn::", op, ": offsets must be non-decreasing, got ",
                        offsets[c], " then ", offsets[c + 1], " at row ", c);
      h[R + 2 + c] = h[R + 1 + c] + (offsets[c + 1] - offsets[c] + stats::kChunk - 1) / stats::kChunk;
    }
  }
  br.chunks = h[2 * R + 1];
  br.dev = host.to(x.device(), /*non_blocking=*/true);
  br.map.R = R;
  br.map.off = br.dev.const_data_ptr<int64_t>();
  br.map.cfirst = br.map.off + (R + 1);
  return br;
}

at::Tensor scheme_params_batched_cuda(const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& bits,
                                      at::IntArrayRef schemes, bool need_bits_grad) {
  check_float_input(x, "scheme_params_batched", "x");
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const BatchedRows br = batched_rows(xc, offsets, "scheme_params_batched");
  const int64_t R = br.map.R, K = static_cast<int64_t>(schemes.size());
  TORCH_CHECK_VALUE(K >= 1 && K <= kNumSchemes, "autoqnn::scheme_params_batched: between 1 and ", kNumSchemes,
                    " schemes per call, got ", K);
  TORCH_CHECK_VALUE(bits.dim() == 2 && bits.size(0) == R && bits.size(1) == K, "autoqnn::scheme_params_batched: ",
                    "bits must have shape [", R, ", ", K, "] (rows x schemes), got ", bits.sizes());
  // per-row integer bits and lambdas, computed on the host (bits are read there anyway)
  const std::vector<int> ib = int_bits_rows(bits, schemes);
  Cands cs{};  // ids only: bits and lambdas are per row
  cs.K = static_cast<int32_t>(K);
  for (int64_t k = 0; k < K; ++k) cs.sid[k] = static_cast<int32_t>(schemes[k]);
  cs.res_top = need_bits_grad ? 1 : 0;
  at::Tensor hb = at::empty({R * K}, at::TensorOptions().dtype(at::kInt));
  at::Tensor hl = at::empty({R * K}, at::TensorOptions().dtype(at::kDouble));
  int res_bits = -1;
  for (int64_t i = 0; i < R * K; ++i) {
    const int64_t s = schemes[i % K];
    const int b = ib[i];
    hb.mutable_data_ptr<int32_t>()[i] = b;
    hl.mutable_data_ptr<double>()[i] = s == kClip ? kClipLambda[b] : (s == kPot ? kPotLambda[b] : 0.0);
    if (s == kResidual) res_bits = std::max(res_bits, b);
  }
  const auto out_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  if (R == 0) return at::zeros({K, R, kNumParams}, out_opts);
  at::Tensor out = at::empty({K, R, kNumParams}, out_opts);  // every slot written by params_write_kernel
  const at::Tensor db = hb.to(x.device(), /*non_blocking=*/true);
  const at::Tensor dl = hl.to(x.device(), /*non_blocking=*/true);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AUTOQNN_DISPATCH_FLOATING(xc.scalar_type(), "scheme_params_batched_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    launch_scheme_params<scalar_t, T>(xc, br.map, br.chunks, cs, res_alphas(res_bits, need_bits_grad),
                                      db.const_data_ptr<int32_t>(),
                                      dl.const_data_ptr<double>(), out, stream);
  });
  return out;
}

TORCH_LIBRARY_IMPL(autoqnn, CUDA, m) {
  m.impl("tensor_stats", &tensor_stats_cuda);
  m.impl("scheme_params", &scheme_params_cuda);
  m.impl("scheme_params_batched", &scheme_params_batched_cuda);
}

}  // namespace autoqnn
