# SPDX-License-Identifier: MIT
"""Functional API: the differentiable quantizers everything else is built on.

>>> import torch, autoqnn.functional as AF
>>> w = torch.randn(64, 3, 3, 3, requires_grad=True)
>>> y = AF.quantize(w, "clip", 3)                       # 8 levels ±{0.5..3.5}·0.586σ
>>> b = torch.tensor(3.0, requires_grad=True)
>>> y = AF.quantize(w, "pot", b)                        # learnable bitwidth (QPL, SPEC 4.1)
>>> m = torch.softmax(torch.zeros(8), 0).requires_grad_()
>>> y = AF.quantize_mixture(w, m, AF.WEIGHT_CANDIDATES, 3)   # QSS soft mixture (SPEC 3)

See README "Robustness policy" for NaN/Inf, empty, constant and low-precision inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import contextlib
import functools
import math
import threading

import torch

from . import backends, kernel_choice
from .ops import _schema  # noqa: F401  (defines the ops)
from .ops import reference as ref
from .schemes import (
    ACTIVATION_CANDIDATES,
    NUM_PARAMS,
    WEIGHT_CANDIDATES,
    resolve_bits,
    scheme_info,
)

__all__ = [
    "quantize",
    "quantize_mixture",
    "quantize_mixture_batched",
    "scheme_params",
    "tensor_stats",
    "bits_on_host",
    "WEIGHT_CANDIDATES",
    "ACTIVATION_CANDIDATES",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BitsArg = Union[None, int, Sequence[int], torch.Tensor]


def check_input(x, argname: str = "x") -> None:
    """Raise ``TypeError`` for anything but a floating-point tensor (the robustness policy)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{argname} has dtype {x.dtype}; autoqnn quantizes floating-point tensors "
            "(float32, float16, bfloat16, float64)"
        )


def _check_per_channel(x: torch.Tensor, per_channel: bool) -> None:
    if per_channel and x.dim() == 0:
        raise ValueError("per_channel=True needs a tensor with at least one dimension (dim 0 = channels)")


def _check_finite_bits(bt: torch.Tensor, infos) -> None:
    """Learned bits must be finite: checked here, before any kernel, so the error is the same
    ValueError on every backend and torch version (the kernels check too, but an error raised
    inside the C++ extension crashed the process under one GPU machine's torch 2.11; see the
    README's robustness section). Costs one tiny device-to-host read for bits on a GPU, which
    the kernels' own integer rounding needs anyway; skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or bt.numel() == 0:
        return
    for info, v in zip(infos, bt.detach().reshape(-1).tolist()):
        if not math.isfinite(v):
            raise ValueError(f"autoqnn: learned bits for scheme '{info.name}' must be finite, got {v}")


def _bits_tensor(bits: BitsArg, infos, check_finite: bool = True) -> tuple[torch.Tensor, Optional[list[int]]]:
    """(float bits tensor [K], validated integer bits or None when they are learned values)."""
    K = len(infos)
    if isinstance(bits, torch.Tensor):
        if bits.is_complex() or bits.dtype == torch.bool:
            raise TypeError(f"bits has dtype {bits.dtype}; pass an int or a real-valued tensor")
        if not bits.is_floating_point():
            bits = bits.to(torch.float32)
        if bits.numel() == 1 and bits.dim() <= 1:
            bt = bits.reshape(1).expand(K) if K > 1 else bits.reshape(1)
        elif bits.dim() == 1 and bits.numel() == K:
            bt = bits
        else:
            raise ValueError(
                f"bits tensor must be 0-d or have shape [{K}] (one per scheme), got {list(bits.shape)}"
            )
        if check_finite:
            _check_finite_bits(bt, infos)
        return bt, None
    ints = resolve_bits([i.id for i in infos], bits)
    return torch.tensor(ints, dtype=torch.float32), ints


# ----------------------------------------------------------------------------- learned bits
# The kernels need the integer bits on the host (to set up each candidate's levels before the
# launch). Learned bits are a device tensor on GPUs, and each host read of one synchronises the
# stream. A call reads them once (one copy serves the finiteness check, the statistics, the
# forward and the backward op); inside ``bits_on_host`` not even that: the block's copies,
# read in one transfer per device at its start, serve every call.
_HOST = threading.local()


def _on_host(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` without a copy (tests pretend otherwise on CPUs)."""
    return t.device.type == "cpu"


def _read_bits_host(bits: torch.Tensor) -> torch.Tensor:
    """``bits``' values as a CPU tensor (a device-to-host copy, i.e. a stream sync on a GPU)."""
    return bits.detach().to("cpu")


def _bits_host(bits: torch.Tensor) -> torch.Tensor:
    """``bits``' values on the host: the tensor itself on the CPU, the copy ``bits_on_host``
    took of it (if unchanged since: same version counter), else one read."""
    if _on_host(bits) or torch.compiler.is_compiling():  # traced: no host-side cache
        return bits.detach()
    snap = getattr(_HOST, "snap", None)
    if snap:
        e = snap.get(id(bits))
        if e is not None and e[0] is bits and e[1] == bits._version:
            return e[2]
    return _read_bits_host(bits)


def _check_bits_host(bits_host, bits) -> None:
    """``bits_host`` (see :func:`quantize`): a real CPU tensor with ``bits``' number of values,
    given only with learned (tensor) bits."""
    if not isinstance(bits, torch.Tensor):
        raise TypeError("bits_host is a host copy of learned (tensor) bits; bits is not a tensor")
    if not isinstance(bits_host, torch.Tensor):
        raise TypeError(f"bits_host must be a tensor, got {type(bits_host).__name__}")
    if bits_host.device.type != "cpu":
        raise ValueError(f"bits_host must be a CPU tensor (the host copy the kernels read), got one on "
                         f"{bits_host.device}")
    if bits_host.numel() != bits.numel() or bits_host.dim() != bits.dim():
        raise ValueError(f"bits_host has shape {list(bits_host.shape)}, bits has {list(bits.shape)}")


def _learned_bits(bits: torch.Tensor, infos, bits_host: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the [K] float bits tensor that receives the gradient, the same values as a CPU tensor
    that the ops read: ``bits_host`` when the caller keeps one). Checked finite on the host
    copy: no extra read."""
    bt, _ = _bits_tensor(bits, infos, check_finite=False)
    if bits_host is not None:
        # in the learned bits' dtype: the backward ops return grad_bits in the dtype of the bits
        # they read (a bf16 copy would round the gradient)
        bh, _ = _bits_tensor(bits_host.detach().to(bt.dtype), infos, check_finite=not torch.compiler.is_compiling())
        return bt, bh
    if torch.compiler.is_compiling():  # traced: the graph's ops read the bits themselves
        return bt, bt
    if _on_host(bt):
        _check_finite_bits(bt, infos)
        # detached: the ops' copy is not a second differentiable input (compiled autograd failed
        # to add the None gradient of that duplicate edge to the real one)
        return bt, bt.detach()
    bh, _ = _bits_tensor(_bits_host(bits), infos)
    return bt, bh


@contextlib.contextmanager
def bits_on_host(*tensors: torch.Tensor):
    """Within the block, quantizer calls with these learned-bits tensors read their values
    from host copies taken here, one transfer per device for all of them, instead of reading
    the device tensor (a GPU stream sync) in every call.

    Meant for a training step (forward and backward) between optimizer steps:

    >>> with AF.bits_on_host(*learned_bits):       # or autoqnn.nn.bits_on_host(model)
    ...     loss = loss_fn(model(x), y); loss.backward()
    >>> opt.step()

    A tensor changed in place inside the block (its version counter moves) is read again on
    its next use; a change through ``.data`` is not seen (it bypasses the version counter), so
    do not change bits that way inside the block. Blocks nest; the copies are per thread.
    CPU tensors need no copy and are left out, as are meta, complex and inference tensors.
    The block's value is the number of tensors copied.
    """
    snap = getattr(_HOST, "snap", None)
    prev = dict(snap) if snap else {}
    cur = dict(prev)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bits_on_host: argument {i} is a {type(t).__name__}, not a tensor")
        if _on_host(t) or t.device.type == "meta" or t.is_complex() or t.is_inference():
            continue  # nothing to copy (or nothing to read: meta has no values)
        by_device.setdefault(t.device, {})[id(t)] = t
    for ts in by_device.values():
        ts = list(ts.values())
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts]).to("cpu")
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            cur[id(t)] = (t, t._version, part.to(t.dtype).reshape(t.shape))
    _HOST.snap = cur
    try:
        yield sum(len(v) for v in by_device.values())
    finally:
        _HOST.snap = prev


def _hashable_bits(bits):
    """``bits`` as a cache key (a 1-tuple holding None, a number or a tuple of numbers), or None
    when it cannot be one (tensors, other sequences, booleans, which must keep failing
    validation but compare equal to 0/1). 3 and 3.0 share a key: they validate the same."""
    if bits is None or (isinstance(bits, (int, float)) and not isinstance(bits, bool)):
        return (bits,)
    if isinstance(bits, (list, tuple)) and (
        _PLAIN_NUMBER_TYPES.issuperset(map(type, bits))  # the common case, checked at C speed
        or all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bits)
    ):
        return (tuple(bits),)
    return None


_PLAIN_NUMBER_TYPES = frozenset((int, float))


@functools.lru_cache(maxsize=512)
def _resolve_cached(schemes: tuple, bits_key: tuple):
    infos = tuple(scheme_info(s) for s in schemes)
    bits = bits_key[0]
    bits_t, ints = _bits_tensor(list(bits) if isinstance(bits, tuple) else bits, infos)
    return infos, tuple(i.id for i in infos), bits_t, tuple(ints)


# exact types (bool is an int subclass, and str/int subclasses could hash like other values)
_CACHEABLE_SCHEME_TYPES = frozenset((str, int))


def _resolve(schemes, bits: BitsArg, bits_host: Optional[torch.Tensor] = None):
    """(scheme infos, ids, float bits tensor [K], the same values as a CPU tensor for the ops
    (see :func:`_learned_bits`; the tensor itself for integer bits), integer bits or None
    when they are learned values). ``bits_host``: the caller's host copy of learned bits
    (:func:`quantize`). Training loops call
    the functional API with the same schemes and integer bits thousands of times: those
    resolutions are cached (host time per call matters on GPUs, where the kernels are short).
    The cached bits tensor is shared read-only by every call that hits the entry."""
    if bits_host is not None:
        _check_bits_host(bits_host, bits)
    if not isinstance(schemes, (str, bytes)):
        schemes = tuple(schemes)  # once: a generator can be read only once
    # torch.compile traces the uncached path (Dynamo warns about lru_cache and would trace
    # through it anyway; before torch 2.7 it cannot trace frozenset.issuperset); the
    # resolution then happens once per compiled graph.
    key = None if torch.compiler.is_compiling() else _hashable_bits(bits)
    # Scheme names and ids only: bool is an int that scheme_info must keep rejecting.
    if (key is not None and isinstance(schemes, tuple)
            and _CACHEABLE_SCHEME_TYPES.issuperset(map(type, schemes))):
        infos, sids, bits_t, ints = _resolve_cached(schemes, key)
        return list(infos), list(sids), bits_t, bits_t, list(ints)
    infos = [scheme_info(s) for s in schemes]
    if isinstance(bits, torch.Tensor):
        bits_t, bits_h = _learned_bits(bits, infos, bits_host)
        return infos, [i.id for i in infos], bits_t, bits_h, None
    bits_t, ints = _bits_tensor(bits, infos)
    return infos, [i.id for i in infos], bits_t, bits_t, ints


def _mixture_candidates(schemes, bits: BitsArg, bits_host: Optional[torch.Tensor] = None):
    """:func:`_resolve` for a mixture: at least one candidate, no duplicates."""
    if isinstance(schemes, (str, bytes)):
        raise TypeError(f"schemes must be a sequence of scheme names, got the string {schemes!r}")
    infos, sids, bits_t, bits_h, ints = _resolve(schemes, bits, bits_host)
    if not infos:
        raise ValueError("schemes must name at least one candidate")
    if len(set(sids)) != len(infos):
        raise ValueError(f"schemes contains duplicates: {[i.name for i in infos]}")
    return infos, sids, bits_t, bits_h, ints


def _check_params_arg(params, x, K, per_channel):
    C = ref.num_channels(x, per_channel)
    if not isinstance(params, torch.Tensor) or params.shape != (K, C, NUM_PARAMS):
        got = list(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise ValueError(f"params must be a tensor of shape [{K}, {C}, {NUM_PARAMS}], got {got}")
    if params.dtype != ref.compute_dtype(x.dtype):
        params = params.to(ref.compute_dtype(x.dtype))
    return params.to(x.device)


def _torch_impl(x, weights, bits_t, ints, sids, per_channel, params):
    """Pure-PyTorch STE formulation: same values and gradients as the ops' registered autograd
    (the values are exactly q; the gradient-only terms are exactly zero)."""
    if ints is None:
        ints = ref.int_bits(bits_t, sids)
    cd = ref.compute_dtype(x.dtype)
    C = ref.num_channels(x, per_channel)
    n = x.numel() // C if C else 0
    order = ref.memory_order(x, per_channel)  # y laid out like a dense x, as from the ops
    xo = ref.in_memory_order(x, order)
    x2 = xo.to(cd).reshape(C, n)
    xd = x2.detach()
    p = ref.params_rows(xd, ints, sids) if params is None else params.to(cd)
    xs = torch.where(torch.isfinite(xd), x2, 0)
    ste = xs - xs.detach()
    learn_bits = bits_t.requires_grad
    y = None
    for k, (sid, b) in enumerate(zip(sids, ints)):
        q, mask, D = ref.eval_scheme(sid, xd, p[k], b, need_dbits=learn_bits)
        yk = q + (ste if mask is None else ste * mask)
        if learn_bits:
            bk = bits_t[k].to(cd)
            yk = yk + (bk - bk.detach()) * D
        if weights is not None:
            yk = yk * weights[k].to(cd)
        y = yk if y is None else y + yk
    return ref.from_memory_order(y.reshape(xo.shape).to(x.dtype).contiguous(), order)


def _needs(backend, *ops):
    """Ops an explicit backend must implement. scheme_params has no C++/CUDA kernel: with
    backend="cuda" it runs through the dispatcher (Triton's statistics where Triton is
    installed, else the reference)."""
    return ("scheme_params",) + ops if backends.check_backend_name(backend) in ("cpp", "triton") else ops


def _params_op(mode):
    return torch.ops.autoqnn.scheme_params_triton if mode == "triton" else torch.ops.autoqnn.scheme_params


def _bits_grad(bits_t: torch.Tensor) -> bool:
    """Whether this call's bits receive a gradient: only then does ResQ need α_{b+1} (one more
    statistics pass over x; the scheme_params ops skip it otherwise)."""
    return bool(bits_t.requires_grad and torch.is_grad_enabled())


# ----------------------------------------------------------------------------- eager fast path
# The ops' autograd formulas are registered with torch.library (so that torch.compile, opcheck and
# torch.func see them). In plain eager mode the same formulas run through a plain autograd.Function
# that calls the ops below the autograd key: the library's wrapper costs ~3x the kernels' own host
# time on a small tensor (measured on CPU: fwd+bwd of an 8-candidate mixture 236-302 us through the
# wrapper, 142 us through the Function). Values, gradients and saved tensors are the same.
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_DISPATCH_STACK = getattr(torch._C, "_len_torch_dispatch_stack", None)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_fast(*tensors) -> bool:
    """Plain tensors in plain eager mode: no torch.compile tracing, no torch.func transform, no
    TorchDispatchMode, no tensor subclass. Anything else takes the registered formula."""
    if _FUNCTORCH_ACTIVE is None or _DISPATCH_STACK is None or torch.compiler.is_compiling():
        return False
    if _FUNCTORCH_ACTIVE() or _DISPATCH_STACK() != 0:
        return False
    return all(type(t) in _PLAIN for t in tensors)


_OP_PAIRS: dict = {}


def _op_pair(kind: str, mode: str):
    """(forward, backward) op overloads of a kind ("q" or "m") and mode ("ops", "cuda" or "triton"),
    looked up once (the overload, not the packet: one Python frame less per call)."""
    pair = _OP_PAIRS.get((kind, mode))
    if pair is None:
        ns = torch.ops.autoqnn
        base = "quantize" if kind == "q" else "mixture"
        suffix = {"cuda": "_cuda", "triton": "_triton"}.get(mode, "")
        pair = (getattr(ns, base + suffix).default, getattr(ns, base + "_backward" + suffix).default)
        _OP_PAIRS[(kind, mode)] = pair
    return pair


def _wants_grad(*tensors) -> bool:
    """Whether autograd must record this call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _below_autograd(op):
    """``op`` called below the autograd key (the fast path's Functions do the autograd)."""
    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


class _QuantizeFn(torch.autograd.Function):
    """quantize with the backward formula of the registered op (_schema._quantize_bwd). The ops
    read ``bits_h``, the host copy of ``bits`` (no stream sync); ``bits`` gets the gradient."""

    @staticmethod
    def forward(ctx, x, params, bits, scheme, per_channel, mode, bits_h):
        fwd, bwd = _op_pair("q", mode)
        y = _below_autograd(fwd)(x, params, bits_h, scheme, per_channel)
        ctx.save_for_backward(x, params, bits_h)
        ctx.scheme, ctx.per_channel, ctx.bwd, ctx.bits_device = scheme, per_channel, bwd, bits.device
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        return _schema._quantize_bwd(ctx, gy, _below_autograd(ctx.bwd), ctx.bits_device) + (None, None)


class _MixtureFn(torch.autograd.Function):
    """mixture with the backward formula of the registered op (_schema._mixture_bwd); bits as
    in :class:`_QuantizeFn`."""

    @staticmethod
    def forward(ctx, x, params, weights, bits, schemes, per_channel, mode, bits_h):
        fwd, bwd = _op_pair("m", mode)
        y = _below_autograd(fwd)(x, params, weights, bits_h, schemes, per_channel)
        ctx.save_for_backward(x, params, weights, bits_h)
        ctx.schemes, ctx.per_channel, ctx.bwd, ctx.bits_device = schemes, per_channel, bwd, bits.device
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        return _schema._mixture_bwd(ctx, gy, _below_autograd(ctx.bwd), ctx.bits_device) + (None, None)


def _ops_for(kind: str, mode: str):
    """(forward, backward) op overloads as :func:`_op_pair`, without its cache (traceable)."""
    ns = torch.ops.autoqnn
    base = "quantize" if kind == "q" else "mixture"
    suffix = {"cuda": "_cuda", "triton": "_triton"}.get(mode, "")
    return getattr(ns, base + suffix).default, getattr(ns, base + "_backward" + suffix).default


class _HostBitsQuantizeFn(torch.autograd.Function):
    """quantize whose ops read ``bits_h``, the caller's host copy of learned ``bits``
    (``bits_host=``); ``bits`` gets the gradient. The form torch.compile traces: the graph then
    takes the host copy as an input, and no op in it reads the device bits (a GPU stream sync
    per op otherwise)."""

    @staticmethod
    def forward(x, params, bits, bits_h, scheme, per_channel, mode):
        return _ops_for("q", mode)[0](x, params, bits_h, scheme, per_channel)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, params, bits, bits_h, scheme, per_channel, mode = inputs
        ctx.save_for_backward(x, params, bits_h)
        ctx.scheme, ctx.per_channel, ctx.mode, ctx.bits_device = scheme, per_channel, mode, bits.device

    @staticmethod
    def backward(ctx, gy):
        return _schema._quantize_bwd(ctx, gy, _ops_for("q", ctx.mode)[1], ctx.bits_device) + (None, None)


class _HostBitsMixtureFn(torch.autograd.Function):
    """mixture with host-copy bits, as :class:`_HostBitsQuantizeFn`."""

    @staticmethod
    def forward(x, params, weights, bits, bits_h, schemes, per_channel, mode):
        return _ops_for("m", mode)[0](x, params, weights, bits_h, schemes, per_channel)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, params, weights, bits, bits_h, schemes, per_channel, mode = inputs
        ctx.save_for_backward(x, params, weights, bits_h)
        ctx.schemes, ctx.per_channel, ctx.mode, ctx.bits_device = schemes, per_channel, mode, bits.device

    @staticmethod
    def backward(ctx, gy):
        return _schema._mixture_bwd(ctx, gy, _ops_for("m", ctx.mode)[1], ctx.bits_device) + (None, None)


# Where the extension is loaded, the fast path is one call into C++ (csrc/autograd.cpp): the
# statistics (unless params are given), the forward op below autograd and, when something needs
# a gradient, the same node as the Functions above as a C++ torch::autograd::Function. The
# Python Functions' bookkeeping was most of a small tensor's host time (bench_host.py: fwd+bwd
# of an 8-candidate mixture on 64 elements 242.5 -> 174.5 µs on a 2-core CPU). The Functions
# above stay for builds without the extension (and as the tests' second opinion).
_MODE_ID = {"ops": 0, "cuda": 1, "triton": 2}


def _cpp_node(name: str):
    """The C++ autograd entry ``autoqnn::<name>``, or None where the extension does not provide it."""
    return getattr(torch.ops.autoqnn, name).default if _schema.has_kernel(name, "Autograd") else None


_CPP_QUANTIZE = _cpp_node("_quantize_autograd")
_CPP_MIXTURE = _cpp_node("_mixture_autograd")


_ROUTED_PAIRS = {"q": ("quantize", "quantize_backward"), "m": ("mixture", "mixture_backward")}


def _node_mode(mode: str, x: torch.Tensor, kind: str) -> str:
    """The op family the fast path's node calls. On GPUs under ``backend="auto"`` ("ops"), each
    routed op call goes through the Python router of :mod:`autoqnn.kernel_choice`; when the
    router's table picks the same kernel for this tensor's forward and backward op, the choice
    is made here once and the node calls that kernel (``autoqnn::<op>_cuda``/``_triton``)
    directly: the same kernels, without two trips through Python per quantizer and step."""
    if mode != "ops" or x.device.type != "cuda":
        return mode
    fwd, bwd = _ROUTED_PAIRS[kind]
    routed = kernel_choice.ROUTER_INSTALLED
    if fwd not in routed or bwd not in routed:
        return mode
    p = kernel_choice.choose(fwd, x)
    return p if p in ("cuda", "triton") and kernel_choice.choose(bwd, x) == p else mode


def quantize(
    x: torch.Tensor,
    scheme: str,
    bits: BitsArg = None,
    *,
    per_channel: bool = False,
    backend: Optional[str] = None,
    params: Optional[torch.Tensor] = None,
    bits_host: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantize ``x`` with one scheme; differentiable (straight-through estimator).

    Args:
        x: floating tensor (fp32/fp16/bf16/fp64), any shape, contiguous or not.
        scheme: ``binary``, ``ternary``, ``quaternary``, ``fixed``, ``residual``, ``zoom``,
            ``clip`` or ``pot`` (or the paper's letter B/T/Q/F/R/Z/C/P).
        bits: an int inside the scheme's range (``ValueError`` otherwise), ``None`` for the
            scheme's default, or a 0-d float tensor (a learned bitwidth, SPEC 4.1: the forward
            uses ``clip(round(bits), b_min, b_max)`` and ``bits`` receives ∂L/∂b).
        per_channel: statistics per slice of dim 0 (output channels of a weight).
        backend: ``auto`` (default or ``$AUTOQNN_BACKEND``), ``torch``, ``cpp``, ``cuda``,
            ``triton``; an unavailable explicit backend raises ``BackendUnavailableError``.
        params: precomputed scales ``[1, C, NUM_PARAMS]`` (e.g. EMA statistics of an activation
            quantizer at eval time) instead of the statistics of ``x``.
        bits_host: with learned (tensor) ``bits`` on a GPU, a CPU tensor of their shape holding
            values with the same ``clip(round(·))`` (the caller keeps it current). The kernels
            read it instead of the device tensor, which costs a stream sync per read; ``bits``
            still receives the gradient. Inside ``torch.compile`` this is the only way to keep
            the sync out of the graph (:func:`autoqnn.nn.refresh_host_bits` keeps such copies
            for a model's quantizers). Stale values quantize with the wrong bits: nothing checks.

    Returns:
        A tensor of ``x``'s shape and dtype, laid out like ``x`` when ``x`` is dense (e.g.
        channels-last; per channel only where dim 0 is outermost in memory), else contiguous.
    """
    check_input(x)
    _check_per_channel(x, per_channel)
    (info,), _, bits_t, bits_h, ints = _resolve((scheme,), bits, bits_host)
    if params is not None:
        params = _check_params_arg(params, x, 1, per_channel)
    backend = backends.check_backend_name(backend)  # $AUTOQNN_BACKEND read once
    mode = backends.resolve(backend, x.device, _needs(backend, "quantize", "quantize_backward"))
    if mode == "torch":
        return _torch_impl(x, None, bits_t, ints or ref.int_bits(bits_h, [info.id]), [info.id], per_channel, params)
    if _CPP_QUANTIZE is not None and (_eager_fast(x, bits_t) if params is None else _eager_fast(x, params, bits_t)):
        # statistics, forward op and (when needed) the autograd node in one call into C++
        return _CPP_QUANTIZE(x, params, bits_t, bits_h, info.id, per_channel, _MODE_ID[_node_mode(mode, x, "q")],
                             2 if mode == "triton" else 0)
    if params is None:
        params = _params_op(mode)(x.detach(), bits_h.detach(), [info.id], per_channel, _bits_grad(bits_t))
    if _eager_fast(x, params, bits_t):  # without the extension: the same in Python
        node = _node_mode(mode, x, "q")
        if not _wants_grad(x, bits_t):  # eval / no_grad: the op alone, no autograd node
            return _below_autograd(_op_pair("q", node)[0])(x, params, bits_h, info.id, per_channel)
        return _QuantizeFn.apply(x, params, bits_t, info.id, per_channel, node, bits_h)
    if bits_host is not None:  # traced (or a tensor subclass): the ops read the host copy
        if _wants_grad(bits_t):
            return _HostBitsQuantizeFn.apply(x, params, bits_t, bits_h, info.id, per_channel, mode)
        return _ops_for("q", mode)[0](x, params, bits_h, info.id, per_channel)
    if mode == "triton":
        return torch.ops.autoqnn.quantize_triton(x, params, bits_t, info.id, per_channel)
    if mode == "cuda":
        return torch.ops.autoqnn.quantize_cuda(x, params, bits_t, info.id, per_channel)
    return torch.ops.autoqnn.quantize(x, params, bits_t, info.id, per_channel)


def quantize_mixture(
    x: torch.Tensor,
    weights: torch.Tensor,
    schemes: Sequence[str],
    bits: BitsArg = None,
    *,
    per_channel: bool = False,
    backend: Optional[str] = None,
    params: Optional[torch.Tensor] = None,
    bits_host: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The QSS soft mixture ``Σ_k weights[k]·q_k(x)`` (SPEC 3), differentiable in ``x``
    (Σ_k w_k·STE_k), ``weights`` (⟨∂L/∂y, q_k(x)⟩) and ``bits``.

    Args:
        x: floating tensor.
        weights: ``[K]`` mixture weights, typically ``softmax((θ + g)/τ)``.
        schemes: the K candidate scheme names.
        bits: ``None`` (defaults), one int (every multi-bit candidate; Binary/Ternary/
            Quaternary keep 1/2/2 bits), one int per candidate, or a float tensor, 0-d or
            ``[K]`` (learned bits, clipped into each scheme's range in the forward).
        per_channel, backend, params, bits_host: as in :func:`quantize` (params is
            ``[K, C, NUM_PARAMS]``; bits_host has learned ``bits``' shape).
    """
    check_input(x)
    check_input(weights, "weights")
    infos, sids, bits_t, bits_h, ints = _mixture_candidates(schemes, bits, bits_host)
    K = len(infos)
    if weights.numel() != K or weights.dim() > 1:
        raise ValueError(f"weights must have shape [{K}] (one per scheme), got {list(weights.shape)}")
    if weights.dim() != 1:
        weights = weights.reshape(K)
    _check_per_channel(x, per_channel)
    if params is not None:
        params = _check_params_arg(params, x, K, per_channel)
    backend = backends.check_backend_name(backend)  # $AUTOQNN_BACKEND read once
    mode = backends.resolve(backend, x.device, _needs(backend, "mixture", "mixture_backward"))
    if mode == "torch":
        return _torch_impl(x, weights, bits_t, ints or ref.int_bits(bits_h, sids), sids, per_channel, params)
    if _CPP_MIXTURE is not None and (
            _eager_fast(x, weights, bits_t) if params is None else _eager_fast(x, params, weights, bits_t)):
        # statistics, forward op and (when needed) the autograd node in one call into C++
        return _CPP_MIXTURE(x, params, weights, bits_t, bits_h, sids, per_channel,
                            _MODE_ID[_node_mode(mode, x, "m")], 2 if mode == "triton" else 0)
    if params is None:
        params = _params_op(mode)(x.detach(), bits_h.detach(), sids, per_channel, _bits_grad(bits_t))
    if _eager_fast(x, params, weights, bits_t):  # without the extension: the same in Python
        node = _node_mode(mode, x, "m")
        if not _wants_grad(x, weights, bits_t):  # eval / no_grad: the op alone, no autograd node
            return _below_autograd(_op_pair("m", node)[0])(x, params, weights, bits_h, sids, per_channel)
        return _MixtureFn.apply(x, params, weights, bits_t, sids, per_channel, node, bits_h)
    if bits_host is not None:  # traced (or a tensor subclass): the ops read the host copy
        if _wants_grad(bits_t):
            return _HostBitsMixtureFn.apply(x, params, weights, bits_t, bits_h, sids, per_channel, mode)
        return _ops_for("m", mode)[0](x, params, weights, bits_h, sids, per_channel)
    if mode == "triton":
        return torch.ops.autoqnn.mixture_triton(x, params, weights, bits_t, sids, per_channel)
    if mode == "cuda":
        return torch.ops.autoqnn.mixture_cuda(x, params, weights, bits_t, sids, per_channel)
    return torch.ops.autoqnn.mixture(x, params, weights, bits_t, sids, per_channel)


def _plain_number(b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool)


# Device types with native kernels for every batched op (read once: the extension is loaded
# before this module, and torch.compile cannot trace the dispatcher query).
_BATCHED_KERNELS = {
    dev: all(_schema.has_kernel(o, key) for o in _schema.BATCHED_OPS) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def _batched_backend(backend, device) -> str:
    """``"ops"`` (the batched ops' native kernel) or ``"loop"`` (one quantize_mixture call per
    tensor) for :func:`quantize_mixture_batched`."""
    b = backends.check_backend_name(backend)
    if b == "torch":  # the reference has no batched formulation: per tensor
        return "loop"
    if b == "triton":  # the Triton batched twins (raises where Triton cannot run)
        backends.resolve("triton", device, list(_schema.BATCHED_OPS))
        return "triton"
    dev = device.type
    have = _BATCHED_KERNELS.get(dev, False)
    if b == "auto":
        return "ops" if have else "loop"
    if b == "cpp" and dev != "cpu":
        raise backends.BackendUnavailableError(f"backend='cpp' runs on CPU tensors, got a {dev} tensor")
    if b == "cuda" and dev != "cuda":
        raise backends.BackendUnavailableError(f"backend='cuda' needs a CUDA tensor, got a {dev} tensor")
    if not have:
        raise backends.BackendUnavailableError(
            f"backend={b!r}: the extension has no batched kernel for {dev} tensors"
        )
    return "ops"


def quantize_mixture_batched(
    xs: Sequence[torch.Tensor],
    weights: Union[torch.Tensor, Sequence[torch.Tensor]],
    schemes: Sequence[str],
    bits: Union[BitsArg, Sequence[BitsArg]] = None,
    *,
    per_channel: bool = False,
    backend: Optional[str] = None,
    group_numel: Optional[int] = None,
) -> list[torch.Tensor]:
    """:func:`quantize_mixture` of many tensors at once (e.g. every weight of a model): the same
    values and gradients as one call per tensor, in a few kernel launches instead of a few per
    tensor (launch and host overhead dominate weight-sized tensors on GPUs).

    Args:
        xs: S floating tensors of one dtype and device, any shapes (empty ones allowed).
        weights: ``[S, K]`` mixture weights (row s for ``xs[s]``) or a sequence of S ``[K]``
            tensors.
        schemes: the K candidates, shared by every tensor.
        bits: what :func:`quantize_mixture` takes (None, an int, K ints, a 0-d or ``[K]``
            tensor), shared by every tensor; or per tensor: a ``[S, K]`` tensor, or a list of S
            such values of which at least one is not a plain number (a list of plain numbers is
            always the K per-candidate ints). Learned float tensors receive their gradients.
        per_channel: statistics per slice of dim 0 of each tensor.
        backend: ``auto`` uses the batched C++ (CPU) / CUDA kernels where they are built and
            one call per tensor elsewhere; ``cpp`` / ``cuda`` / ``triton`` insist on that
            family's batched kernels; ``torch`` runs one call per tensor on the reference.
        group_numel: consecutive tensors are batched in groups of at most this many elements
            (a bigger tensor is a group of its own); ``0`` puts everything in one call. Default:
            2^20 on CPU (see ``_CPU_GROUP_NUMEL``), one call on GPUs.

    Returns:
        The S quantized tensors, each with its input's shape and dtype.
    """
    if isinstance(xs, torch.Tensor):
        raise TypeError("xs must be a sequence of tensors; for one tensor use quantize_mixture")
    xs = list(xs)
    S = len(xs)
    for i, x in enumerate(xs):
        check_input(x, f"xs[{i}]")
        _check_per_channel(x, per_channel)
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(
                f"xs[{i}] is {x.dtype} on {x.device} but xs[0] is {xs[0].dtype} on {xs[0].device}; "
                "the batched call needs one dtype and device"
            )
    infos, sids, _, _, _ = _mixture_candidates(schemes, None)
    K = len(infos)
    if isinstance(weights, torch.Tensor):
        check_input(weights, "weights")
        if weights.shape != (S, K):
            raise ValueError(f"weights must have shape [{S}, {K}] (tensors x schemes), got {list(weights.shape)}")
        wl = list(weights.unbind(0)) if S else []
    else:
        wl = list(weights)
        if len(wl) != S:
            raise ValueError(f"weights has {len(wl)} entries for {S} tensors")
        for i, w in enumerate(wl):
            check_input(w, f"weights[{i}]")
            if w.numel() != K or w.dim() > 1:
                raise ValueError(f"weights[{i}] must have shape [{K}] (one per scheme), got {list(w.shape)}")
        wl = [w.reshape(K) for w in wl]
    if isinstance(bits, torch.Tensor) and bits.dim() == 2:  # [S, K]: per tensor and candidate
        if bits.shape != (S, K):
            raise ValueError(f"a 2-d bits tensor must have shape [{S}, {K}] (tensors x schemes), got {list(bits.shape)}")
        bl = list(bits.unbind(0))
    elif isinstance(bits, (list, tuple)) and any(not _plain_number(b) for b in bits):
        if len(bits) != S:  # per tensor: a list of S quantize_mixture bits values
            raise ValueError(f"per-tensor bits must have {S} entries (one per tensor), got {len(bits)}")
        bl = list(bits)
    else:  # shared by every tensor
        bl = [bits] * S
    if S == 0:
        return []
    mode = _batched_backend(backend, xs[0].device)
    if mode == "loop":
        return [
            quantize_mixture(x, w, schemes, b, per_channel=per_channel, backend=backend)
            for x, w, b in zip(xs, wl, bl)
        ]
    if group_numel is None:
        group_numel = _CPU_GROUP_NUMEL if xs[0].device.type == "cpu" else 0
    if group_numel <= 0:
        groups = [range(S)]
    else:  # consecutive tensors, at most group_numel elements per group (a bigger one alone)
        groups, start, total = [], 0, 0
        for i, x in enumerate(xs):
            if i > start and total + x.numel() > group_numel:
                groups.append(range(start, i))
                start, total = i, 0
            total += x.numel()
        groups.append(range(start, S))
    out: list[torch.Tensor] = []
    for g in groups:
        out += _mixture_batched_call([xs[i] for i in g], [wl[i] for i in g], [bl[i] for i in g], schemes, sids,
                                     per_channel, mode)
    return out


#: CPU: tensors per batched call grouped up to this many elements. One call over a whole
#: ResNet-18 (47 MB of fp32 weights) was 1.6x *slower* than one call per tensor on a 2-core
#: machine: >32 MB buffers are fresh mmaps (page faults on every call) and the statistics passes
#: stream from memory; small groups keep the launch savings without either cost.
_CPU_GROUP_NUMEL = 1 << 20


def _mixture_batched_call(xs, wl, bl, schemes, sids, per_channel, mode="ops"):
    S = len(xs)
    dev = xs[0].device
    infos = [scheme_info(i) for i in sids]
    # bits per tensor; learned ones are checked for finiteness once below (one host read for
    # the whole batch instead of one per tensor)
    bts = [_resolve(schemes, b)[2] if not isinstance(b, torch.Tensor) else _bits_tensor(b, infos, False)[0]
           for b in bl]
    rows = [ref.num_channels(x, per_channel) for x in xs]
    offsets = [0]
    for x, C in zip(xs, rows):
        n = x.numel() // C if C else 0
        base = offsets[-1]
        offsets += [base + n * (j + 1) for j in range(C)]
    bts = [b if b.is_floating_point() else b.to(torch.float32) for b in bts]
    if any(b.device != bts[0].device for b in bts):
        bts = [b.to(dev) for b in bts]
    # integer bits stay on the host (the kernels read bits there): no host-to-device copy
    bits_rows = torch.stack(bts) if S > 1 else bts[0].reshape(1, -1)
    if any(isinstance(b, torch.Tensor) for b in bl) and not torch.compiler.is_compiling():
        for i, row in enumerate(bits_rows.detach().tolist()):
            for info, v in zip(infos, row):
                if not math.isfinite(v):
                    raise ValueError(f"autoqnn: learned bits of xs[{i}] for scheme '{info.name}' must be finite, got {v}")
    w_rows = torch.stack(wl) if S > 1 else wl[0].reshape(1, -1)
    if w_rows.device != dev:
        w_rows = w_rows.to(dev)
    if per_channel:  # one row per channel: each tensor's weights and bits repeated (differentiable)
        w_rows = torch.cat([w_rows[i:i + 1].expand(C, -1) for i, C in enumerate(rows)])
        bits_rows = torch.cat([bits_rows[i:i + 1].expand(C, -1) for i, C in enumerate(rows)])
    # each tensor's elements in memory order (a channels-last weight flattens without a copy and
    # comes back channels-last, as from the per-tensor ops)
    orders = [ref.memory_order(x, per_channel) for x in xs]
    xos = [ref.in_memory_order(x, o) for x, o in zip(xs, orders)]
    flat = torch.cat([x.reshape(-1) for x in xos]) if S > 1 else xos[0].reshape(-1)
    ops = torch.ops.autoqnn
    params_op, mix_op = ((ops.scheme_params_batched_triton, ops.mixture_batched_triton) if mode == "triton"
                         else (ops.scheme_params_batched, ops.mixture_batched))
    params = params_op(flat.detach(), offsets, bits_rows.detach(), sids, _bits_grad(bits_rows))
    y = mix_op(flat, offsets, params, w_rows, bits_rows, sids)
    if S == 1:
        return [ref.from_memory_order(y.reshape(xos[0].shape), orders[0])]
    return [ref.from_memory_order(part.reshape(x.shape), o)
            for part, x, o in zip(y.split([x.numel() for x in xos]), xos, orders)]


def scheme_params(
    x: torch.Tensor, schemes: Sequence[str], bits: BitsArg = None, *, per_channel: bool = False,
    backend: Optional[str] = None, need_bits_grad: bool = True,
) -> torch.Tensor:
    """Every candidate's scales ``[K, C, NUM_PARAMS]`` (see :mod:`autoqnn.ops.reference`).
    ``backend="triton"`` computes them with the Triton statistics passes; every other backend
    uses the ``autoqnn::scheme_params`` op (C++ on CPU, Triton or the reference on GPUs).
    ``need_bits_grad=False`` leaves ResQ's α_{b+1} (used only by the bitwidth gradient) at 0
    and skips its statistics pass."""
    check_input(x)
    _check_per_channel(x, per_channel)
    if isinstance(schemes, (str, bytes)):
        raise TypeError(f"schemes must be a sequence of scheme names, got the string {schemes!r}")
    _, sids, _, bits_h, _ = _resolve(schemes, bits)
    mode = "triton" if backends.check_backend_name(backend) == "triton" else "ops"
    if mode == "triton":
        backends.resolve("triton", x.device, ["scheme_params"])
    return _params_op(mode)(x.detach(), bits_h.detach(), sids, per_channel, bool(need_bits_grad))


def tensor_stats(x: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``[C, 7]`` statistics over finite elements: count, Σ|x|, Σx, Σx², min, max, max|x|."""
    check_input(x)
    _check_per_channel(x, per_channel)
    return torch.ops.autoqnn.tensor_stats(x.detach(), per_channel)
