# SPDX-License-Identifier: MIT
"""The one place where every ``autoqnn::`` op is declared: schema, fake kernel, the
pure-PyTorch ``default`` kernel and the autograd formula shared by every backend.

Kernels for specific devices are registered elsewhere by dispatch key and win over the
``default`` (CompositeExplicitAutograd) reference: the C++ CPU kernels and the CUDA kernels from
``autoqnn._C`` (``TORCH_LIBRARY_IMPL`` blocks in ``csrc/``), the Triton kernels from
``autoqnn.ops._triton``. The four output-pass ops (:data:`GPU_TWIN_OPS`) have two GPU kernels:
the C++ ones are registered as ``autoqnn::<op>_cuda`` (declared here with the same schema, fake
and autograd), the Triton ones as ``autoqnn::<op>_triton``, and the main op's CUDA kernel is the
router of :mod:`autoqnn.kernel_choice`. Schemas live in Python so the ops exist even without the extension.

Ops (bits is a float tensor ``[K]``, the forward uses ``clip(round(bits), b_min, b_max)``):

``tensor_stats(x, per_channel) -> [C, 7]``
    count of finite, Σ|x|, Σx, Σx², min, max, max|x| over finite elements (pass 1).
``scheme_params(x, bits, schemes, per_channel, need_bits_grad=True) -> [K, C, NUM_PARAMS]``
    every candidate's scales (pass 1 plus the dependent passes). Not differentiable
    (statistics carry no gradient, SPEC 1). ResQ's last slot, α_{b+1}, feeds only the bitwidth
    gradient: with ``need_bits_grad=False`` it is 0 and its statistics pass (one read of x) is
    skipped; every other slot is unchanged.
``quantize(x, params, bits, scheme, per_channel) -> y`` and ``quantize_backward``
    one scheme: y = q(x); backward gives (mask·grad_y, ⟨grad_y, ∂q/∂b⟩).
``mixture(x, params, weights, bits, schemes, per_channel) -> y`` and ``mixture_backward``
    y = Σ_k w_k·q_k(x); backward gives (grad_y·Σ_k w_k·mask_k, ⟨grad_y, q_k⟩_k,
    (w_k·⟨grad_y, ∂q_k/∂b⟩)_k) without saving anything of size K×N.
``scheme_params_batched``, ``mixture_batched`` and ``mixture_batched_backward``
    the batched variant: many tensors in one call (every weight of a model). ``x`` is their
    flat concatenation, ``offsets`` (``int[R + 1]``, 0 .. numel) cuts it into R rows, each with
    its own statistics, weights ``[R, K]`` and bits ``[R, K]``; params are ``[K, R, P]``.

The per-tensor output-pass ops lay y and grad_x out like x when x is dense in another layout than
the contiguous one (channels-last; per channel only with dim 0 outermost), contiguous otherwise
(:func:`.reference.memory_order`): a channels-last model stays channels-last, and x is read
without a copy.

Every kernel reads ``bits`` on the host (the integer bits set up each candidate's levels before
a launch): a host tensor costs nothing there, a device tensor is copied (a stream sync on a
GPU). So the backward ops return a requested grad_bits (``bits``' shape and dtype) on ``x``'s
device, not on ``bits``' device: a caller that hands the kernels a host copy of device bits gets
the gradient where the bits live without another copy. The autograd formulas below move it to
``bits``' device when the two differ. A grad_bits not asked for (``need_bits_grad=False``) is
zeros where ``bits`` live (no device work for the usual host-side integer bits).
"""
from __future__ import annotations

import torch

from ..schemes import NUM_PARAMS
from . import reference as ref

LIB_NAME = "autoqnn"

# Using a FRAGMENT keeps the C++ side free to register implementations (TORCH_LIBRARY_IMPL)
# before or after these definitions.
_lib = torch.library.Library(LIB_NAME, "FRAGMENT")

SCHEMAS = {
    "tensor_stats": "(Tensor x, bool per_channel) -> Tensor",
    "scheme_params": (
        "(Tensor x, Tensor bits, int[] schemes, bool per_channel, bool need_bits_grad=True) -> Tensor"
    ),
    "quantize": "(Tensor x, Tensor params, Tensor bits, int scheme, bool per_channel) -> Tensor",
    "quantize_backward": (
        "(Tensor grad_y, Tensor x, Tensor params, Tensor bits, int scheme, bool per_channel, "
        "bool need_bits_grad) -> (Tensor, Tensor)"
    ),
    "mixture": (
        "(Tensor x, Tensor params, Tensor weights, Tensor bits, int[] schemes, "
        "bool per_channel) -> Tensor"
    ),
    "mixture_backward": (
        "(Tensor grad_y, Tensor x, Tensor params, Tensor weights, Tensor bits, int[] schemes, "
        "bool per_channel, bool need_weights_grad, bool need_bits_grad) -> (Tensor, Tensor, Tensor)"
    ),
    "scheme_params_batched": (
        "(Tensor x, int[] offsets, Tensor bits, int[] schemes, bool need_bits_grad=True) -> Tensor"
    ),
    "mixture_batched": (
        "(Tensor x, int[] offsets, Tensor params, Tensor weights, Tensor bits, int[] schemes) -> Tensor"
    ),
    "mixture_batched_backward": (
        "(Tensor grad_y, Tensor x, int[] offsets, Tensor params, Tensor weights, Tensor bits, "
        "int[] schemes, bool need_weights_grad, bool need_bits_grad) -> (Tensor, Tensor, Tensor)"
    ),
}

OPS = tuple(SCHEMAS)
#: the batched variant's ops
BATCHED_OPS = ("scheme_params_batched", "mixture_batched", "mixture_batched_backward")

#: ops with two GPU implementations: ``autoqnn::<op>_cuda`` (the C++/CUDA kernel of
#: ``csrc/cuda``) and ``autoqnn::<op>_triton`` (:mod:`autoqnn.ops._triton`). The main op's CUDA
#: kernel routes each call to one of them (:mod:`autoqnn.kernel_choice`).
GPU_TWIN_OPS = ("quantize", "quantize_backward", "mixture", "mixture_backward")


def qualname(op: str) -> str:
    return f"{LIB_NAME}::{op}"


#: ops that read x in any layout and lay their x-shaped outputs out like it (see above): tagged
#: ``flexible_layout``, so Inductor hands them its buffers as they are (a channels-last
#: convolution's output, say) instead of a copy in the layout seen at trace time, and plans
#: their outputs from the fake kernels. The batched ops take a flat x and keep Inductor's default.
FLEXIBLE_LAYOUT_OPS = ("tensor_stats", "scheme_params") + GPU_TWIN_OPS
_FLEXIBLE = getattr(torch.Tag, "flexible_layout", None)


def _tags(name: str) -> tuple:
    return (_FLEXIBLE,) if _FLEXIBLE is not None and name in FLEXIBLE_LAYOUT_OPS else ()


for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema, tags=_tags(_name))
for _name in GPU_TWIN_OPS:  # the C++ CUDA kernels' own names (no default kernel: CUDA only)
    _lib.define(f"{_name}_cuda" + SCHEMAS[_name], tags=_tags(_name))


#: the eager fast path in C++ (csrc/autograd.cpp; kernels for the Autograd key and, for
#: inference mode, CompositeExplicitAutograd; none without the extension): the statistics when
#: ``params`` is None (``params_mode`` 0 = ``autoqnn::scheme_params``, 2 = ``scheme_params_triton``),
#: then the forward op of a family called below autograd, recorded as a C++ node with the
#: registered formula as backward when x, weights or bits need a gradient. ``bits_h`` is the host
#: copy of ``bits`` that the ops read; ``mode`` picks the op family: 0 = ``autoqnn::<op>``,
#: 1 = ``<op>_cuda``, 2 = ``<op>_triton``. Private: not part of :data:`OPS` (no fake kernel:
#: never traced, see functional._eager_fast).
AUTOGRAD_NODE_SCHEMAS = {
    "_quantize_autograd": (
        "(Tensor x, Tensor? params, Tensor bits, Tensor bits_h, int scheme, bool per_channel, int mode, "
        "int params_mode) -> Tensor"
    ),
    "_mixture_autograd": (
        "(Tensor x, Tensor? params, Tensor weights, Tensor bits, Tensor bits_h, int[] schemes, "
        "bool per_channel, int mode, int params_mode) -> Tensor"
    ),
}
for _name, _schema in AUTOGRAD_NODE_SCHEMAS.items():
    _lib.define(_name + _schema)

#: the integer hash of the search's Gumbel noise (not a quantizer op: no gradient, no layouts):
#: ``uniform48(seed, steps, k)`` -> int64 ``[*steps.shape, k]``, 48-bit integers, a pure function
#: of (seed, step, candidate) (:func:`.reference.uniform48_ref`; C++/CUDA kernels in
#: ``csrc/*/noise.*``). One opaque call per quantizer in a compiled step instead of ~75 traced
#: int64 ops, which cost Inductor seconds of compile time per quantizer.
NOISE_SCHEMAS = {"uniform48": "(Tensor seed, Tensor steps, int k) -> Tensor"}
for _name, _schema in NOISE_SCHEMAS.items():
    _lib.define(_name + _schema)


def _op(name: str):
    return getattr(torch.ops.autoqnn, name).default


# ----------------------------------------------------------------------------- default kernels
_DEFAULT_KERNELS = {
    "tensor_stats": ref.tensor_stats_ref,
    "scheme_params": ref.scheme_params_ref,
    "quantize": ref.quantize_ref,
    "quantize_backward": ref.quantize_backward_ref,
    "mixture": ref.mixture_ref,
    "mixture_backward": ref.mixture_backward_ref,
    "scheme_params_batched": ref.scheme_params_batched_ref,
    "mixture_batched": ref.mixture_batched_ref,
    "mixture_batched_backward": ref.mixture_batched_backward_ref,
}
for _name, _fn in _DEFAULT_KERNELS.items():
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
_lib.impl("uniform48", ref.uniform48_ref, "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------- fake kernels
def _channels(x: torch.Tensor, per_channel: bool):
    return x.shape[0] if (per_channel and x.dim() > 0) else 1


@torch.library.register_fake(qualname("tensor_stats"), lib=_lib)
def _tensor_stats_fake(x, per_channel):
    return x.new_empty((_channels(x, per_channel), 7), dtype=ref.compute_dtype(x.dtype))


@torch.library.register_fake(qualname("scheme_params"), lib=_lib)
def _scheme_params_fake(x, bits, schemes, per_channel, need_bits_grad=True):
    torch._check(bits.numel() == len(schemes), lambda: "bits must have one entry per scheme")
    return x.new_empty(
        (len(schemes), _channels(x, per_channel), NUM_PARAMS), dtype=ref.compute_dtype(x.dtype)
    )


@torch.library.register_fake(qualname("quantize"), lib=_lib)
def _quantize_fake(x, params, bits, scheme, per_channel):
    torch._check(params.dim() == 3 and params.shape[0] == 1, lambda: "params must be [1, C, P]")
    return ref.out_like(x, per_channel)


@torch.library.register_fake(qualname("quantize_backward"), lib=_lib)
def _quantize_backward_fake(grad_y, x, params, bits, scheme, per_channel, need_bits_grad):
    return (ref.out_like(x, per_channel),
            torch.empty_like(bits, device=x.device if need_bits_grad else bits.device))


@torch.library.register_fake(qualname("mixture"), lib=_lib)
def _mixture_fake(x, params, weights, bits, schemes, per_channel):
    K = len(schemes)
    torch._check(params.dim() == 3 and params.shape[0] == K, lambda: "params must be [K, C, P]")
    torch._check(weights.numel() == K, lambda: "weights must have one entry per scheme")
    return ref.out_like(x, per_channel)


@torch.library.register_fake(qualname("mixture_backward"), lib=_lib)
def _mixture_backward_fake(
    grad_y, x, params, weights, bits, schemes, per_channel, need_weights_grad, need_bits_grad
):
    return (
        ref.out_like(x, per_channel),
        torch.empty_like(weights),
        torch.empty_like(bits, device=x.device if need_bits_grad else bits.device),
    )


@torch.library.register_fake(qualname("uniform48"), lib=_lib)
def _uniform48_fake(seed, steps, k):
    ref.check_uniform48_args(seed, steps, k)
    return steps.new_empty((*steps.shape, k), dtype=torch.int64)


@torch.library.register_fake(qualname("scheme_params_batched"), lib=_lib)
def _scheme_params_batched_fake(x, offsets, bits, schemes, need_bits_grad=True):
    R = len(offsets) - 1
    torch._check(R >= 0, lambda: "offsets must have at least one entry")
    return x.new_empty((len(schemes), R, NUM_PARAMS), dtype=ref.compute_dtype(x.dtype))


@torch.library.register_fake(qualname("mixture_batched"), lib=_lib)
def _mixture_batched_fake(x, offsets, params, weights, bits, schemes):
    K, R = len(schemes), len(offsets) - 1
    torch._check(params.dim() == 3 and params.shape[0] == K and params.shape[1] == R,
                 lambda: "params must be [K, R, P]")
    torch._check(weights.dim() == 2 and weights.shape[0] == R and weights.shape[1] == K,
                 lambda: "weights must be [R, K]")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(qualname("mixture_batched_backward"), lib=_lib)
def _mixture_batched_backward_fake(grad_y, x, offsets, params, weights, bits, schemes, need_w, need_b):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weights, memory_format=torch.contiguous_format),
        torch.empty_like(bits, memory_format=torch.contiguous_format, device=x.device if need_b else bits.device),
    )


# ----------------------------------------------------------------------------- autograd
# One formula for every backend; backward calls the registered backward op, so each device's
# fastest kernel runs there too and AOTAutograd can trace it. Nothing of size K×N is saved:
# only x (already alive as the layer's input/weight), params, weights and bits.
def _quantize_setup(ctx, inputs, output):
    x, params, bits, scheme, per_channel = inputs
    ctx.save_for_backward(x, params, bits)
    ctx.scheme = scheme
    ctx.per_channel = per_channel


def _to_device(g, device):
    """A gradient moved to its input's device (the backward ops make grad_bits on x's)."""
    return g if device is None or g.device == device else g.to(device)


def _quantize_bwd(ctx, grad_y, bwd_op=None, bits_device=None):
    x, params, bits = ctx.saved_tensors
    need_bits = bool(ctx.needs_input_grad[2])
    gx, gb = (bwd_op or _op("quantize_backward"))(
        grad_y, x, params, bits, ctx.scheme, ctx.per_channel, need_bits
    )
    return (
        gx if ctx.needs_input_grad[0] else None,
        None,
        _to_device(gb, bits_device or bits.device) if need_bits else None,
        None,
        None,
    )


def _mixture_setup(ctx, inputs, output):
    x, params, weights, bits, schemes, per_channel = inputs
    ctx.save_for_backward(x, params, weights, bits)
    ctx.schemes = schemes
    ctx.per_channel = per_channel


def _mixture_bwd(ctx, grad_y, bwd_op=None, bits_device=None):
    x, params, weights, bits = ctx.saved_tensors
    need_w = bool(ctx.needs_input_grad[2])
    need_b = bool(ctx.needs_input_grad[3])
    gx, gw, gb = (bwd_op or _op("mixture_backward"))(
        grad_y, x, params, weights, bits, ctx.schemes, ctx.per_channel, need_w, need_b
    )
    return (
        gx if ctx.needs_input_grad[0] else None,
        None,
        gw if need_w else None,
        _to_device(gb, bits_device or bits.device) if need_b else None,
        None,
        None,
    )


def register_autograd_for(fwd: str, bwd: str, kind: str) -> None:
    """Attach the shared autograd formula to a forward op whose backward op is ``bwd`` (the
    Triton twins reuse it)."""
    bwd_op = lambda: _op(bwd)  # noqa: E731  (resolved at backward time)
    if kind == "quantize":
        def backward(ctx, grad_y):
            return _quantize_bwd(ctx, grad_y, bwd_op())

        torch.library.register_autograd(qualname(fwd), backward, setup_context=_quantize_setup, lib=_lib)
    else:
        def backward(ctx, grad_y):
            return _mixture_bwd(ctx, grad_y, bwd_op())

        torch.library.register_autograd(qualname(fwd), backward, setup_context=_mixture_setup, lib=_lib)


def _mixture_batched_setup(ctx, inputs, output):
    x, offsets, params, weights, bits, schemes = inputs
    ctx.save_for_backward(x, params, weights, bits)
    ctx.offsets = offsets
    ctx.schemes = schemes


def _mixture_batched_bwd(ctx, grad_y, bwd_op=None):
    x, params, weights, bits = ctx.saved_tensors
    need_w = bool(ctx.needs_input_grad[3])
    need_b = bool(ctx.needs_input_grad[4])
    gx, gw, gb = (bwd_op or _op("mixture_batched_backward"))(
        grad_y, x, ctx.offsets, params, weights, bits, ctx.schemes, need_w, need_b
    )
    return (
        gx if ctx.needs_input_grad[0] else None,
        None,
        None,
        gw if need_w else None,
        _to_device(gb, bits.device) if need_b else None,
        None,
    )


torch.library.register_autograd(
    qualname("mixture_batched"), _mixture_batched_bwd, setup_context=_mixture_batched_setup, lib=_lib
)
register_autograd_for("quantize", "quantize_backward", kind="quantize")
register_autograd_for("mixture", "mixture_backward", kind="mixture")

_FAKE_KERNELS = {
    "quantize": _quantize_fake,
    "quantize_backward": _quantize_backward_fake,
    "mixture": _mixture_fake,
    "mixture_backward": _mixture_backward_fake,
}
for _name in GPU_TWIN_OPS:
    torch.library.register_fake(qualname(f"{_name}_cuda"), _FAKE_KERNELS[_name], lib=_lib)
register_autograd_for("quantize_cuda", "quantize_backward_cuda", kind="quantize")
register_autograd_for("mixture_cuda", "mixture_backward_cuda", kind="mixture")


def _constant_under_trace(fn):
    """``fn`` called at trace time and its result kept as a constant of the graph (Dynamo cannot
    trace the dispatcher query; the kernels registered do not change between steps)."""
    deco = getattr(torch.compiler, "assume_constant_result", None)
    return deco(fn) if deco is not None else fn


@_constant_under_trace
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``autoqnn::op`` has a kernel registered directly for ``dispatch_key``
    (``"CPU"``/``"CUDA"``), i.e. one that beats the ``default`` reference there."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), dispatch_key))
    except Exception:  # pragma: no cover - private API changed
        return False
