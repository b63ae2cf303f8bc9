// SPDX-License-Identifier: MIT
// CUDA kernels of autoqnn::quantize(_backward) and autoqnn::mixture(_backward).
//
// One read of x (and grad_y) per pass; every candidate is evaluated in registers with the shared
// per-element math of csrc/include/autoqnn/scheme_math.h (the twin of
// autoqnn/ops/reference.py::eval_scheme). The backward writes grad_x and, per block, the K sums
// <grad_y, q_k> and K sums <grad_y, dq_k/db> into a [blocks, 2K] buffer that is reduced on the
// host side in a fixed order (float64): no atomics, nothing of size K x N, deterministic for a
// given shape. scheme_params stays on the pure-PyTorch reference on CUDA for now.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <vector>

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

// part[blockIdx.x, 0..K) = the block's sums of acc_q (zeros without need_w), [K..2K) of acc_d:
// one value at a time, fixed tree (deterministic). Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void block_sums(const T* acc_q, const T* acc_d, int K, bool need_w, T* __restrict__ part) {
  __shared__ T sh[kThreads];
  for (int j = 0; j < 2 * K; ++j) {
    T val = j < K ? acc_q[j] : acc_d[j - K];
    if (j < K && !need_w) val = T(0);
    sh[threadIdx.x] = val;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x * 2 * K + j] = sh[0];
    __syncthreads();
  }
}

// One element of the mixture backward: adds g*q_k (and g*dq_k/db) to the accumulators and returns
// grad_x = g * sum_k w_k mask_k (0 at non-finite x). p = candidate 0's params of the element's row,
// pstride the distance to the next candidate's; w == nullptr: every weight is exactly 1.
template <typename T, bool ND>
__device__ __forceinline__ T bwd_element(T v, T g, const T* p, int64_t pstride, const Cands<T>& cs,
                                         const int32_t* bits, const T* cb, const T* w, T w_identity, T* acc_q,
                                         T* acc_d) {
  T masked = T(0);
  bool any_masked = false;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    if (k >= cs.K) break;
    const Eval<T> r = eval_scheme<T, ND>(cs.sid[k], v, p + k * pstride, bits[k], cb[k]);
    if (cs.sid[k] == kClip) {
      const T term = r.ste ? (w ? w[k] : T(1)) : T(0);
      masked = any_masked ? masked + term : term;
      any_masked = true;
    }
    acc_q[k] += g * r.q;
    if (ND) acc_d[k] += g * r.d;
  }
  const T factor = any_masked ? masked + w_identity : w_identity;
  const bool fin = (v - v) == T(0);
  return fin ? g * factor : T(0);
}

// y[i] = sum_k w_k q_k(x[i]); w == nullptr: single scheme, weight exactly 1.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    mixture_fwd_kernel(const scalar_t* __restrict__ x /* [C, N] */, scalar_t* __restrict__ y /* [C, N] */,
                       const T* __restrict__ params /* [K, C, kNumParams] */,
                       const T* __restrict__ w /* [K] or nullptr */, Cands<T> cs, int64_t C, int64_t N) {
  const int64_t total = C * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = C == 1 ? 0 : i / N;  // skips a 64-bit division per element per tensor
    const T v = static_cast<T>(x[i]);
    T acc = T(0);
    for (int k = 0; k < cs.K; ++k) {
      const T* p = params + (k * C + c) * kNumParams;
      const Eval<T> r = eval_scheme<T, false>(cs.sid[k], v, p, cs.bits[k], cs.cb[k]);
      const T term = w ? r.q * w[k] : r.q;
      acc = k == 0 ? term : acc + term;
    }
    y[i] = static_cast<scalar_t>(acc);
  }
}

// grad_x and per-block partial sums part[block, 0..K) = <g, q_k>, part[block, K..2K) = <g, d_k>.
template <typename scalar_t, typename T, bool ND>
__global__ void __launch_bounds__(kThreads)
    mixture_bwd_kernel(const scalar_t* __restrict__ gy /* [C, N] */, const scalar_t* __restrict__ x /* [C, N] */,
                       scalar_t* __restrict__ gx /* [C, N] */, const T* __restrict__ params /* [K, C, P] */,
                       const T* __restrict__ w /* [K] or nullptr */, Cands<T> cs, int64_t C, int64_t N,
                       bool need_w, T* __restrict__ part /* [gridDim.x, 2K] */) {
  T acc_q[kMaxK], acc_d[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) acc_q[k] = acc_d[k] = T(0);
  T w_identity = T(0);
  for (int k = 0; k < cs.K; ++k)
    if (cs.sid[k] != kClip) w_identity = w_identity + (w ? w[k] : T(1));
  const int64_t total = C * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = C == 1 ? 0 : i / N;  // skips a 64-bit division per element per tensor
    const T v = static_cast<T>(x[i]);
    const T g = static_cast<T>(gy[i]);
    gx[i] = static_cast<scalar_t>(
        bwd_element<T, ND>(v, g, params + c * kNumParams, C * kNumParams, cs, cs.bits, cs.cb, w, w_identity, acc_q, acc_d));
  }
  block_sums<T>(acc_q, acc_d, cs.K, need_w, part);
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
  const at::Tensor x = x_.contiguous();
  const Layout L = layout_of(x, per_channel);
  const int64_t K = schemes.size();
  const at::Tensor params = params_on(params_, x, K, L);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor w;
  if (weights) {
    check_float_input(*weights, op, "weights");
    TORCH_CHECK_VALUE(weights->numel() == K, "autoqnn: weights must have ", K, " entries");
    w = weights->detach().to(x.device(), stats_dtype(x.scalar_type())).contiguous();
  }
  if (x.numel() == 0) return y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_cuda_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const Cands<T> cs = make_cands<T>(bits, schemes);
    mixture_fwd_kernel<scalar_t, T><<<grid_for(x.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), params.const_data_ptr<T>(),
        weights ? w.const_data_ptr<T>() : nullptr, cs, L.C, L.N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// Returns (grad_x, sums [2K] float64 on x's device).
std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& gy_, const at::Tensor& x_,
                                                 const at::Tensor& params_, const at::Tensor* weights,
                                                 const at::Tensor& bits, at::IntArrayRef schemes,
                                                 bool per_channel, bool need_w, bool need_b, const char* op) {
  check_float_input(x_, op, "x");
  TORCH_CHECK_VALUE(gy_.sizes() == x_.sizes(), "autoqnn: grad_y has shape ", gy_.sizes(),
                    " but x has shape ", x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor gy = gy_.to(x.device(), x.scalar_type()).contiguous();
  const Layout L = layout_of(x, per_channel);
  const int64_t K = schemes.size();
  const at::Tensor params = params_on(params_, x, K, L);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor w;
  if (weights) {
    check_float_input(*weights, op, "weights");
    TORCH_CHECK_VALUE(weights->numel() == K, "autoqnn: weights must have ", K, " entries");
    w = weights->detach().to(x.device(), stats_dtype(x.scalar_type())).contiguous();
  }
  if (x.numel() == 0) return {gx, at::zeros({2 * K}, x.options().dtype(at::kDouble))};
  const int64_t blocks = grid_for(x.numel());
  at::Tensor part = at::empty({blocks, 2 * K}, x.options().dtype(stats_dtype(x.scalar_type())));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autoqnn_cuda_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const Cands<T> cs = make_cands<T>(bits, schemes);
    const T* wp = weights ? w.const_data_ptr<T>() : nullptr;
    if (need_b) {
      mixture_bwd_kernel<scalar_t, T, true><<<blocks, kThreads, 0, stream>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
          params.const_data_ptr<T>(), wp, cs, L.C, L.N, need_w, part.data_ptr<T>());
    } else {
      mixture_bwd_kernel<scalar_t, T, false><<<blocks, kThreads, 0, stream>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
          params.const_data_ptr<T>(), wp, cs, L.C, L.N, need_w, part.data_ptr<T>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, part.to(at::kDouble).sum(0)};
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
  auto [gx, sums] = backward_cuda(grad_y, x, params, nullptr, bits, at::IntArrayRef(s, 1), per_channel,
                                  false, need_bits_grad, "quantize_backward");
  // Without a bits gradient the zeros are made where bits live: no device-to-host copy (a sync
  // per backward call) for the usual host-side integer bits.
  if (!need_bits_grad) return {gx, at::zeros(bits.sizes(), bits.options())};
  return {gx, sums.slice(0, 1, 2).to(bits.options()).reshape(bits.sizes())};
}

at::Tensor mixture_cuda(const at::Tensor& x, const at::Tensor& params, const at::Tensor& weights,
                        const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel) {
  return forward_cuda(x, params, &weights, bits, schemes, per_channel, "mixture");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& params, const at::Tensor& weights,
    const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel, bool need_weights_grad,
    bool need_bits_grad) {
  const int64_t K = schemes.size();
  auto [gx, sums] = backward_cuda(grad_y, x, params, &weights, bits, schemes, per_channel,
                                  need_weights_grad, need_bits_grad, "mixture_backward");
  at::Tensor gw = sums.slice(0, 0, K).to(weights.options()).reshape(weights.sizes());
  if (!need_bits_grad) return {gx, gw, at::zeros(bits.sizes(), bits.options())};  // no sync (above)
  // grad_bits[k] = w_k * <g, d_k>
  at::Tensor gb = sums.slice(0, K, 2 * K) * weights.detach().to(sums.device(), at::kDouble).reshape({K});
  return {gx, gw, gb.to(bits.options()).reshape(bits.sizes())};
}

// ----------------------------------------------------------------------------- batched ops
// Ragged rows of a flat x (autoqnn/row_map.h), one block per chunk of stats::kChunk elements, so
// each block knows its row: per-row weights w [R, K], integer bits rb [R, K] and bits scale
// factors rcb [R, K]. The per-element math and the forward's summation order are those of the
// kernels above (the forward is bit-identical to one call per tensor).
template <typename T>
struct RowCands {  // candidate k of one row, in registers
  int32_t bits[kMaxK];
  T cb[kMaxK], w[kMaxK];
};

template <typename T>
__device__ inline RowCands<T> row_cands(int K, int64_t c, const int32_t* rb, const T* rcb, const T* w) {
  RowCands<T> r;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const bool on = k < K;
    r.bits[k] = on ? rb[c * K + k] : 0;
    r.cb[k] = on ? rcb[c * K + k] : T(0);
    r.w[k] = on ? w[c * K + k] : T(0);
  }
  return r;
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    mixture_batched_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                               const T* __restrict__ params /* [K, R, P] */, const T* __restrict__ w /* [R, K] */,
                               const int32_t* __restrict__ rb, const T* __restrict__ rcb, Cands<T> cs, RowMap m) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const int64_t c = ch.row;
  const RowCands<T> rc = row_cands<T>(cs.K, c, rb, rcb, w);
  for (int64_t i = threadIdx.x; i < ch.len; i += kThreads) {
    const T v = static_cast<T>(x[ch.start + i]);
    T acc = T(0);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k >= cs.K) break;
      const T* p = params + (k * m.R + c) * kNumParams;
      const Eval<T> r = eval_scheme<T, false>(cs.sid[k], v, p, rc.bits[k], rc.cb[k]);
      const T term = r.q * rc.w[k];
      acc = k == 0 ? term : acc + term;
    }
    y[ch.start + i] = static_cast<scalar_t>(acc);
  }
}

// grad_x and, per block (chunk), part[block, 0..K) = <g, q_k>, part[block, K..2K) = <g, d_k>.
template <typename scalar_t, typename T, bool ND>
__global__ void __launch_bounds__(kThreads)
    mixture_batched_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                               scalar_t* __restrict__ gx, const T* __restrict__ params, const T* __restrict__ w,
                               const int32_t* __restrict__ rb, const T* __restrict__ rcb, Cands<T> cs, RowMap m,
                               bool need_w, T* __restrict__ part /* [chunks, 2K] */) {
  const ChunkSpan ch = m.chunk(blockIdx.x);
  const int64_t c = ch.row;
  const RowCands<T> rc = row_cands<T>(cs.K, c, rb, rcb, w);
  T acc_q[kMaxK], acc_d[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) acc_q[k] = acc_d[k] = T(0);
  T w_identity = T(0);
  for (int k = 0; k < cs.K; ++k)
    if (cs.sid[k] != kClip) w_identity = w_identity + rc.w[k];
  for (int64_t i = threadIdx.x; i < ch.len; i += kThreads) {
    const T v = static_cast<T>(x[ch.start + i]);
    const T g = static_cast<T>(gy[ch.start + i]);
    gx[ch.start + i] = static_cast<scalar_t>(bwd_element<T, ND>(
        v, g, params + c * kNumParams, m.R * kNumParams, cs, rc.bits, rc.cb, rc.w, w_identity, acc_q, acc_d));
  }
  block_sums<T>(acc_q, acc_d, cs.K, need_w, part);
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
      if (need_bits_grad) {
        mixture_batched_bwd_kernel<scalar_t, T, true><<<nb, kThreads, 0, stream>>>(
            gy.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
            a.params.const_data_ptr<T>(), a.w.const_data_ptr<T>(), a.rb.const_data_ptr<int32_t>(),
            a.rcb.const_data_ptr<T>(), cs, a.rows.map, need_weights_grad, part.data_ptr<T>());
      } else {
        mixture_batched_bwd_kernel<scalar_t, T, false><<<nb, kThreads, 0, stream>>>(
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
  // without the optional gradients: zeros made where weights/bits live (no device-to-host copy)
  at::Tensor gw_out = need_weights_grad ? gw.to(weights.options()) : at::zeros(weights.sizes(), weights.options());
  at::Tensor gb_out = need_bits_grad ? gb.to(bits.options()) : at::zeros(bits.sizes(), bits.options());
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
