# SPDX-License-Identifier: MIT
"""Triton implementations of the quantize/mixture ops (``triton_kernels/mixture.py``).

Registers twin ops ``autoqnn::<op>_triton`` with the same schemas, fakes and autograd formula as
the main ops (``backend="triton"`` calls them), and, when the extension has no CUDA kernels,
the Triton launchers as the CUDA kernels of the main ops (``backend="auto"`` on a GPU). They run
wherever Triton can: on a CUDA GPU, or on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported; slow, for tests). Float64 inputs use the
reference (the kernels compute in fp32). Importing this module never fails: without triton,
``autoqnn.backends.TRITON_ERROR`` says why.
"""
from __future__ import annotations

import os

import torch

from .. import _ext, backends
from ..schemes import bits_scale_factor
from . import _schema
from . import reference as ref

_TWINS = ("quantize", "quantize_backward", "mixture", "mixture_backward")

try:  # pragma: no cover - exercised where triton is installed
    import triton  # noqa: F401

    from ..triton_kernels import mixture as tk

    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001
    tk = None
    _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


def _ints(bits, schemes):
    return ref.int_bits(bits, schemes)


def _quantize(x, params, bits, scheme, per_channel):
    if x.dtype == torch.float64:
        return ref.quantize_ref(x, params, bits, scheme, per_channel)
    return tk.mixture_fwd(x, params[:1], None, _ints(bits, [scheme]), [scheme], per_channel)


def _quantize_backward(grad_y, x, params, bits, scheme, per_channel, need_bits_grad):
    if x.dtype == torch.float64:
        return ref.quantize_backward_ref(grad_y, x, params, bits, scheme, per_channel, need_bits_grad)
    b = _ints(bits, [scheme])
    gx, sums = tk.mixture_bwd(grad_y, x, params[:1], None, b, [scheme], per_channel, need_bits_grad,
                              [bits_scale_factor(v) for v in b])
    gb = sums[1:2] if need_bits_grad else torch.zeros(1, dtype=torch.float64, device=sums.device)
    return gx, gb.to(bits.dtype).to(bits.device).reshape(bits.shape)


def _mixture(x, params, weights, bits, schemes, per_channel):
    if x.dtype == torch.float64:
        return ref.mixture_ref(x, params, weights, bits, schemes, per_channel)
    return tk.mixture_fwd(x, params, weights, _ints(bits, schemes), list(schemes), per_channel)


def _mixture_backward(grad_y, x, params, weights, bits, schemes, per_channel, need_weights_grad, need_bits_grad):
    if x.dtype == torch.float64:
        return ref.mixture_backward_ref(grad_y, x, params, weights, bits, schemes, per_channel,
                                        need_weights_grad, need_bits_grad)
    K = len(schemes)
    b = _ints(bits, schemes)
    gx, sums = tk.mixture_bwd(grad_y, x, params, weights, b, list(schemes), per_channel, need_bits_grad,
                              [bits_scale_factor(v) for v in b])
    w = weights.detach().to(sums.device, torch.float64).reshape(K)
    gw = sums[:K] if need_weights_grad else torch.zeros_like(sums[:K])
    gb = sums[K:] * w if need_bits_grad else torch.zeros_like(sums[K:])
    return (gx, gw.to(weights.dtype).to(weights.device).reshape(weights.shape),
            gb.to(bits.dtype).to(bits.device).reshape(bits.shape))


_IMPLS = {"quantize": _quantize, "quantize_backward": _quantize_backward,
          "mixture": _mixture, "mixture_backward": _mixture_backward}


def _register_twins():
    lib = _schema._lib
    for op in _TWINS:
        name = op + "_triton"
        lib.define(name + _schema.SCHEMAS[op])
        lib.impl(name, _IMPLS[op], "CompositeExplicitAutograd")
        fake = {"quantize": _schema._quantize_fake, "quantize_backward": _schema._quantize_backward_fake,
                "mixture": _schema._mixture_fake, "mixture_backward": _schema._mixture_backward_fake}[op]
        torch.library.register_fake(_schema.qualname(name), fake, lib=lib)
    _schema.register_autograd_for("quantize_triton", "quantize_backward_triton", kind="quantize")
    _schema.register_autograd_for("mixture_triton", "mixture_backward_triton", kind="mixture")


def _available_reason():
    if tk is None:
        return _IMPORT_ERROR
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"


if tk is not None:
    _register_twins()
    backends.TRITON_OPS.update(_TWINS)
    # GPU "auto": use Triton only where the extension brought no CUDA kernel
    if not _ext.HAS_CUDA_KERNELS:
        for op in _TWINS:
            if not _schema.has_kernel(op, "CUDA"):
                torch.library.register_kernel(_schema.qualname(op), "cuda", _IMPLS[op], lib=_schema._lib)
backends.TRITON_ERROR = _available_reason()
