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
#include <cmath>
#include <vector>

#include "autoqnn/checks.h"
#include "autoqnn/scheme_math.h"

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
    T masked = T(0);
    bool any_masked = false;
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k >= cs.K) break;
      const T* p = params + (k * C + c) * kNumParams;
      const Eval<T> r = eval_scheme<T, ND>(cs.sid[k], v, p, cs.bits[k], cs.cb[k]);
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
    gx[i] = static_cast<scalar_t>(fin ? g * factor : T(0));
  }
  // Block reduction of the 2K sums, one value at a time, fixed tree (deterministic).
  __shared__ T sh[kThreads];
  for (int j = 0; j < 2 * cs.K; ++j) {
    T val = j < cs.K ? acc_q[j] : acc_d[j - cs.K];
    if (j < cs.K && !need_w) val = T(0);
    sh[threadIdx.x] = val;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x * 2 * cs.K + j] = sh[0];
    __syncthreads();
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

}  // namespace

// Registered under the ops' "_cuda" names: the main ops' CUDA kernel is a router (Python,
// autoqnn/kernel_choice.py) that sends each call to these kernels or to the Triton ones,
// whichever the measured choice table says is faster for that op and size.
TORCH_LIBRARY_IMPL(autoqnn, CUDA, m) {
  m.impl("quantize_cuda", &quantize_cuda);
  m.impl("quantize_backward_cuda", &quantize_backward_cuda);
  m.impl("mixture_cuda", &mixture_cuda);
  m.impl("mixture_backward_cuda", &mixture_backward_cuda);
}

}  // namespace autoqnn
