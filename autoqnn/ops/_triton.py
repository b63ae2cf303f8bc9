# SPDX-License-Identifier: MIT
"""Registers the Triton implementations of the output-pass ops (``autoqnn.triton_kernels``).

1. Twin ops ``autoqnn::quantize_triton``, ``quantize_backward_triton``, ``mixture_triton`` and
   ``mixture_backward_triton`` made with ``torch.library.triton_op`` (torch >= 2.6): the schemas,
   semantics and fakes of the main ops (:mod:`._schema`), and for the forward twins the same
   autograd formula with the backward calling the ``_triton`` backward twin. ``backend="triton"``
   calls them. They run on CUDA tensors, and on CPU tensors only through Triton's interpreter
   (``TRITON_INTERPRET=1`` set before triton is imported); anything else raises
   :class:`~autoqnn.backends.BackendUnavailableError`.

   The kernels are specialised on the integer bits (``tl.constexpr``), read from the ``bits``
   tensor on the host, so the bodies cannot be traced with fake tensors: the twins keep their
   own fake kernels and are *not* decomposed under ``FunctionalTensorMode`` (AOTAutograd and
   Inductor see one opaque custom op, as for the main ops, instead of failing on a
   data-dependent read).
2. ``backend="auto"`` on GPUs: the main ops' CUDA kernel is the router of
   :mod:`autoqnn.kernel_choice`, which calls these launchers or the C++/CUDA kernels
   (``autoqnn::<op>_cuda``), whichever the measured choice table says is faster.
3. :data:`autoqnn.backends.TRITON_OPS` and :data:`~autoqnn.backends.TRITON_ERROR` are updated.

``scheme_params`` (and ``tensor_stats``) have no Triton kernel yet: with ``backend="triton"``
they run through the dispatcher (C++/CUDA kernel or the reference, any device).

Nothing here may break ``import autoqnn``: every failure only sets ``TRITON_ERROR``.
"""
from __future__ import annotations

import functools

import torch

from .. import backends
from . import _schema
from . import reference as ref

__all__ = ["TWIN_OPS", "AVAILABLE", "IMPORT_ERROR", "twin_name"]

#: ops with a Triton twin ``autoqnn::<op>_triton``
TWIN_OPS = ("quantize", "quantize_backward", "mixture", "mixture_backward")
#: why the Triton kernels could not be loaded or registered (None when they were)
IMPORT_ERROR: str | None = None
#: the twin ops are registered
AVAILABLE = False

kernels = None
try:
    import triton  # noqa: F401
except ModuleNotFoundError:
    IMPORT_ERROR = "triton is not installed (install the 'triton' extra)"
except Exception as e:  # pragma: no cover - broken installation
    IMPORT_ERROR = f"triton cannot be imported ({type(e).__name__}: {e})"
else:
    try:
        from ..triton_kernels import mixture as kernels
    except Exception as e:  # pragma: no cover - broken installation
        IMPORT_ERROR = f"autoqnn.triton_kernels cannot be imported ({type(e).__name__}: {e})"
        kernels = None


def twin_name(op: str) -> str:
    return f"{op}_triton"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cuda" or (x.device.type == "cpu" and kernels.INTERPRET):
        return
    raise backends.BackendUnavailableError(
        "backend='triton' runs on CUDA tensors (or on CPU through Triton's interpreter: "
        f"TRITON_INTERPRET=1 set before triton is imported), got a {x.device.type} tensor"
    )


# ----------------------------------------------------------------------------- implementations
# The reference kernels' argument checks and output dtypes/shapes.
def _quantize_impl(x, params, bits, scheme, per_channel):
    _check_device(x)
    ref._check_params(x, params, 1, per_channel)
    (b,) = ref.int_bits(bits, [scheme])
    return kernels.quantize_fwd(x, params, b, int(scheme), per_channel)


def _quantize_backward_impl(grad_y, x, params, bits, scheme, per_channel, need_bits_grad):
    _check_device(x)
    ref._check_params(x, params, 1, per_channel)
    (b,) = ref.int_bits(bits, [scheme])
    gx, gb = kernels.quantize_bwd(grad_y, x, params, b, int(scheme), per_channel, need_bits_grad)
    gb = torch.zeros_like(bits) if gb is None else gb.to(bits.device, bits.dtype).reshape(bits.shape)
    return gx, gb


def _mixture_impl(x, params, weights, bits, schemes, per_channel):
    _check_device(x)
    schemes = [int(s) for s in schemes]
    ref._check_params(x, params, len(schemes), per_channel)
    b_int = ref.int_bits(bits, schemes)
    return kernels.mixture_fwd(x, params, weights, b_int, schemes, per_channel)


def _mixture_backward_impl(
    grad_y, x, params, weights, bits, schemes, per_channel, need_weights_grad, need_bits_grad
):
    _check_device(x)
    schemes = [int(s) for s in schemes]
    K = len(schemes)
    ref._check_params(x, params, K, per_channel)
    b_int = ref.int_bits(bits, schemes)
    gx, gw, gb = kernels.mixture_bwd(
        grad_y, x, params, weights, b_int, schemes, per_channel, need_weights_grad, need_bits_grad
    )
    if gw is None:
        gw = torch.zeros(K, dtype=weights.dtype, device=weights.device)
    gw = gw.to(weights.device, weights.dtype).reshape(weights.shape)
    if gb is None:
        gb = torch.zeros(K, dtype=bits.dtype, device=bits.device)
    gb = gb.to(bits.device, bits.dtype).reshape(bits.shape)
    return gx, gw, gb


_IMPLS = {
    "quantize": _quantize_impl,
    "quantize_backward": _quantize_backward_impl,
    "mixture": _mixture_impl,
    "mixture_backward": _mixture_backward_impl,
}
_FAKES = {
    "quantize": _schema._quantize_fake,
    "quantize_backward": _schema._quantize_backward_fake,
    "mixture": _schema._mixture_fake,
    "mixture_backward": _schema._mixture_backward_fake,
}


# ----------------------------------------------------------------------------- autograd (twins)
# The formula of autoqnn.ops._schema, the backward calling the `_triton` backward twin.
def _quantize_triton_bwd(ctx, grad_y):
    return _schema._quantize_bwd(ctx, grad_y, bwd_op=torch.ops.autoqnn.quantize_backward_triton)


def _mixture_triton_bwd(ctx, grad_y):
    return _schema._mixture_bwd(ctx, grad_y, bwd_op=torch.ops.autoqnn.mixture_backward_triton)


_AUTOGRAD = {
    "quantize": (_quantize_triton_bwd, _schema._quantize_setup),
    "mixture": (_mixture_triton_bwd, _schema._mixture_setup),
}


def _opaque_under_functionalization(mode, func, types, args, kwargs):
    # keep the twin as one custom op in AOTAutograd graphs (see the module docstring)
    return mode.__torch_dispatch__(func, types, args, kwargs)


def _define_twins() -> dict:
    from torch._subclasses.functional_tensor import FunctionalTensorMode  # noqa: PLC0415

    defs = {}
    for op in TWIN_OPS:
        name = _schema.qualname(twin_name(op))
        d = torch.library.triton_op(name, mutates_args=(), schema=_schema.SCHEMAS[op])(_IMPLS[op])
        d.register_fake(_FAKES[op])  # replaces triton_op's default (the body itself)
        d.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)
        if op in _AUTOGRAD:
            bwd, setup = _AUTOGRAD[op]
            d.register_autograd(bwd, setup_context=setup)
        defs[op] = d
    return defs


def _eager(fn):
    """``fn`` with ``wrap_triton`` calls launching the kernel directly (as inside a triton_op's
    eager body) instead of through the tracing higher-order op: the main ops' CUDA kernels are
    opaque to torch.compile anyway."""
    try:
        from torch._library.triton import set_wrap_triton_enabled  # noqa: PLC0415
    except ImportError:  # pragma: no cover - private API moved: the HOP path also works
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with set_wrap_triton_enabled(False):
            return fn(*args, **kwargs)

    return run


_TWINS: dict = {}


def _register() -> None:
    global AVAILABLE, IMPORT_ERROR, _TWINS
    if kernels is None:
        return
    if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
        IMPORT_ERROR = f"torch {torch.__version__} has no torch.library.triton_op (needs >= 2.6)"
        return
    try:
        _TWINS = _define_twins()
    except Exception as e:  # pragma: no cover - API drift
        IMPORT_ERROR = f"registering the Triton ops failed ({type(e).__name__}: {e})"
        return
    AVAILABLE = True
    backends.TRITON_OPS.update(TWIN_OPS)
    # the main ops' CUDA kernel is the router of autoqnn.kernel_choice (installed by autoqnn)


def _availability_error() -> str | None:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if not AVAILABLE:  # pragma: no cover
        return "the Triton ops are not registered"
    if kernels.INTERPRET:
        return None
    try:
        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on CPU through the interpreter)"
    return None


try:
    _register()
except Exception as e:  # pragma: no cover - never break `import autoqnn`
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
backends.TRITON_ERROR = _availability_error()
