// SPDX-License-Identifier: MIT
// The eager fast path in C++: autoqnn::_quantize_autograd and autoqnn::_mixture_autograd
// (schemas in autoqnn/ops/_schema.py; kernels registered here for the Autograd alias key and, so
// that inference tensors reach them, CompositeExplicitAutograd). autoqnn/functional.py calls them
// in plain eager mode; everything else (torch.compile, torch.func, dispatch modes, subclasses)
// keeps the registered ops and their torch.library formulas.
//
// One call does what functional.py's Python path does in several: the statistics when no params
// are given (scheme_params, or scheme_params_triton; ResQ's alpha_{b+1} only when the bits get a
// gradient), then the forward op of the chosen family ("mode": 0 = the dispatcher's
// autoqnn::<op>, 1 = autoqnn::<op>_cuda, 2 = autoqnn::<op>_triton) below the autograd key with the
// host copy of the bits (bits_h). When x, weights or bits need a gradient the call is recorded as
// a torch::autograd::Function node whose backward is the registered formula
// (_schema._quantize_bwd/_mixture_bwd); the gradient goes to `bits`, moved to bits' device.
// Nothing of size K x N is saved: x, params, weights, bits_h. Like @once_differentiable, a
// backward run with create_graph=True returns gradients whose grad_fn raises when differentiated
// (torch's DelayedError), instead of silently wrong zeros.
//
// Why: a Python torch.autograd.Function and the Python glue around two op calls cost more host
// time per call than the kernels take on weight-sized tensors; on a GPU that host time is what a
// QSS step of ~40 quantizers waits for (bench/bench_host.py measures the three paths).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

namespace autoqnn {  // named (not anonymous): grad_fn.name() shows autoqnn::MixtureBackward
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kModes = 3;
constexpr const char* kSuffix[kModes] = {"", "_cuda", "_triton"};

int64_t check_mode(int64_t mode, const char* op) {
  TORCH_CHECK_VALUE(mode >= 0 && mode < kModes, "autoqnn::", op, ": mode must be 0 (ops), 1 (cuda) or 2 (triton), got ",
                    mode);
  return mode;
}

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Sig>();
}

// One (forward, backward) pair of op handles per mode, looked up on first use (the Triton twins
// exist only where Triton is installed; asking for them elsewhere throws, and the next call
// tries again).
template <class Fwd, class Bwd>
struct OpPair {
  c10::TypedOperatorHandle<Fwd> fwd;
  c10::TypedOperatorHandle<Bwd> bwd;
};

template <class Fwd, class Bwd>
OpPair<Fwd, Bwd> load_pair(const char* base, int64_t mode) {
  const std::string ns = std::string("autoqnn::") + base;
  return {find_op<Fwd>(ns + kSuffix[mode]), find_op<Bwd>(ns + "_backward" + kSuffix[mode])};
}

template <class Fwd, class Bwd, const char* Base>
const OpPair<Fwd, Bwd>& pair_for(int64_t mode) {
  switch (mode) {  // function-local statics: thread-safe, retried after a throw
    case 0: {
      static const OpPair<Fwd, Bwd> p = load_pair<Fwd, Bwd>(Base, 0);
      return p;
    }
    case 1: {
      static const OpPair<Fwd, Bwd> p = load_pair<Fwd, Bwd>(Base, 1);
      return p;
    }
    default: {
      static const OpPair<Fwd, Bwd> p = load_pair<Fwd, Bwd>(Base, 2);
      return p;
    }
  }
}

// The statistics op of a family: autoqnn::scheme_params (the dispatcher: C++ on CPU and CUDA) or,
// for backend="triton", autoqnn::scheme_params_triton.
using PFn = Tensor(const Tensor&, const Tensor&, at::IntArrayRef, bool, bool);

const c10::TypedOperatorHandle<PFn>& params_op(bool triton) {
  if (triton) {
    static const auto op = find_op<PFn>("autoqnn::scheme_params_triton");
    return op;
  }
  static const auto op = find_op<PFn>("autoqnn::scheme_params");
  return op;
}

// params as given, or the statistics of x (below autograd: nothing to record) at the host bits.
// ResQ's alpha_{b+1} is computed only when the bits will get a gradient (as functional._bits_grad).
Tensor params_or_stats(const std::optional<Tensor>& params, const Tensor& x, const Tensor& bits,
                       const Tensor& bits_h, at::IntArrayRef schemes, bool per_channel, int64_t params_mode) {
  if (params.has_value() && params->defined()) return *params;
  TORCH_CHECK_VALUE(params_mode == 0 || params_mode == 2, "autoqnn: params_mode must be 0 (ops) or 2 (triton), got ",
                    params_mode);
  const bool need_bits_grad = bits.requires_grad() && at::GradMode::is_enabled();
  at::AutoDispatchBelowAutograd below;
  return params_op(params_mode == 2).call(x, bits_h, schemes, per_channel, need_bits_grad);
}

bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return true;
  return false;
}

// @once_differentiable: with create_graph=True and a grad_output that requires grad, the
// gradients get a grad_fn that raises when reached (DelayedError), as in Python.
variable_list once_differentiable(variable_list out, const variable_list& grad_outputs) {
  if (!at::GradMode::is_enabled()) return out;
  bool any = false;
  for (const auto& g : grad_outputs) any = any || (g.defined() && g.requires_grad());
  if (!any) return out;
  variable_list fake;
  fake.reserve(out.size());
  for (auto& o : out) {
    if (o.defined()) {
      Tensor v = o.detach();
      v.set_requires_grad(true);
      fake.push_back(std::move(v));
    } else {
      fake.emplace_back();
    }
  }
  torch::autograd::DelayedError err(
      "trying to differentiate twice a function that was marked with @once_differentiable "
      "(autoqnn's quantizers have no second derivative)",
      static_cast<int64_t>(fake.size()));
  return err.apply(std::move(fake));
}

// What both nodes' backward needs besides the saved tensors.
void save_call(AutogradContext* ctx, bool per_channel, int64_t mode, const Tensor& bits) {
  ctx->saved_data["per_channel"] = per_channel;
  ctx->saved_data["mode"] = mode;
  ctx->saved_data["bits_device"] = bits.device();
}

Tensor to_device(Tensor g, const c10::Device& device) {
  return g.device() == device ? g : g.to(device);
}

}  // namespace

// Compiled autograd before torch 2.7 refuses a C++ node that is not marked traceable; from 2.7 on
// it calls an untraceable node as an opaque function, which is what these nodes want (their
// backward is one op call). Tracing them is also correct on 2.6: the backward only calls ops
// through the dispatcher, which have fake kernels.
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 7
constexpr bool kTraceableNodes = true;
#else
constexpr bool kTraceableNodes = false;
#endif

// The nodes are named types (grad_fn.name() is "torch::autograd::CppNode<autoqnn::MixtureBackward>").
// ---------------------------------------------------------------- quantize
using QFwd = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, bool);
using QBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool,
                                        bool);

constexpr char kQuantize[] = "quantize";
const auto& quantize_ops = pair_for<QFwd, QBwd, kQuantize>;

struct QuantizeBackward : public torch::autograd::Function<QuantizeBackward> {
  static constexpr bool is_traceable = kTraceableNodes;
  // forward inputs: x(0) params(1) bits(2) bits_h(3) scheme per_channel mode
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& params, const Tensor& bits,
                        const Tensor& bits_h, int64_t scheme, bool per_channel, int64_t mode) {
    const auto& ops = quantize_ops(mode);
    Tensor y;
    {
      at::AutoDispatchBelowAutograd below;
      y = ops.fwd.call(x, params, bits_h, scheme, per_channel);
    }
    ctx->save_for_backward({x, params, bits_h});
    ctx->saved_data["scheme"] = scheme;
    save_call(ctx, per_channel, mode, bits);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_b = ctx->needs_input_grad(2);
    const auto& ops = quantize_ops(mode);
    Tensor gx, gb;
    {
      at::AutoDispatchBelowAutograd below;
      std::tie(gx, gb) = ops.bwd.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["scheme"].toInt(),
                                      ctx->saved_data["per_channel"].toBool(), need_b);
    }
    variable_list out(7);
    if (need_x) out[0] = gx;
    if (need_b) out[2] = to_device(gb, ctx->saved_data["bits_device"].toDevice());
    return once_differentiable(std::move(out), grads);
  }
};

Tensor quantize_autograd(const Tensor& x, const std::optional<Tensor>& params_, const Tensor& bits,
                         const Tensor& bits_h, int64_t scheme, bool per_channel, int64_t mode, int64_t params_mode) {
  check_mode(mode, "_quantize_autograd");
  const int64_t s[1] = {scheme};
  const Tensor params = params_or_stats(params_, x, bits, bits_h, at::IntArrayRef(s, 1), per_channel, params_mode);
  if (!any_requires_grad({&x, &bits})) {  // eval / no_grad / inference mode: the op alone
    at::AutoDispatchBelowAutograd below;
    return quantize_ops(mode).fwd.call(x, params, bits_h, scheme, per_channel);
  }
  return QuantizeBackward::apply(x, params, bits, bits_h, scheme, per_channel, mode);
}

// ---------------------------------------------------------------- mixture
using MFwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef, bool);
using MBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, at::IntArrayRef, bool, bool, bool);

constexpr char kMixture[] = "mixture";
const auto& mixture_ops = pair_for<MFwd, MBwd, kMixture>;

struct MixtureBackward : public torch::autograd::Function<MixtureBackward> {
  static constexpr bool is_traceable = kTraceableNodes;
  // forward inputs: x(0) params(1) weights(2) bits(3) bits_h(4) schemes per_channel mode
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& params, const Tensor& weights,
                        const Tensor& bits, const Tensor& bits_h, at::IntArrayRef schemes, bool per_channel,
                        int64_t mode) {
    const auto& ops = mixture_ops(mode);
    Tensor y;
    {
      at::AutoDispatchBelowAutograd below;
      y = ops.fwd.call(x, params, weights, bits_h, schemes, per_channel);
    }
    ctx->save_for_backward({x, params, weights, bits_h});
    ctx->saved_data["schemes"] = schemes.vec();
    save_call(ctx, per_channel, mode, bits);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(2);
    const bool need_b = ctx->needs_input_grad(3);
    const auto& ops = mixture_ops(mode);
    const auto schemes = ctx->saved_data["schemes"].toIntVector();
    Tensor gx, gw, gb;
    {
      at::AutoDispatchBelowAutograd below;
      std::tie(gx, gw, gb) = ops.bwd.call(grads[0], saved[0], saved[1], saved[2], saved[3], schemes,
                                          ctx->saved_data["per_channel"].toBool(), need_w, need_b);
    }
    variable_list out(8);
    if (need_x) out[0] = gx;
    if (need_w) out[2] = gw;
    if (need_b) out[3] = to_device(gb, ctx->saved_data["bits_device"].toDevice());
    return once_differentiable(std::move(out), grads);
  }
};

Tensor mixture_autograd(const Tensor& x, const std::optional<Tensor>& params_, const Tensor& weights,
                        const Tensor& bits, const Tensor& bits_h, at::IntArrayRef schemes, bool per_channel,
                        int64_t mode, int64_t params_mode) {
  check_mode(mode, "_mixture_autograd");
  const Tensor params = params_or_stats(params_, x, bits, bits_h, schemes, per_channel, params_mode);
  if (!any_requires_grad({&x, &weights, &bits})) {  // eval / no_grad / inference mode: the op alone
    at::AutoDispatchBelowAutograd below;
    return mixture_ops(mode).fwd.call(x, params, weights, bits_h, schemes, per_channel);
  }
  return MixtureBackward::apply(x, params, weights, bits, bits_h, schemes, per_channel, mode);
}

}  // namespace autoqnn

TORCH_LIBRARY_IMPL(autoqnn, Autograd, m) {
  m.impl("_quantize_autograd", &autoqnn::quantize_autograd);
  m.impl("_mixture_autograd", &autoqnn::mixture_autograd);
}

// Where the Autograd keys are excluded (torch.inference_mode) the call lands on a backend key: the
// same entry, which then takes its no-grad branch.
TORCH_LIBRARY_IMPL(autoqnn, CompositeExplicitAutograd, m) {
  m.impl("_quantize_autograd", &autoqnn::quantize_autograd);
  m.impl("_mixture_autograd", &autoqnn::mixture_autograd);
}
