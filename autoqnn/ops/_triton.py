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

``tensor_stats`` and ``scheme_params`` have Triton twins too (``triton_kernels/stats.py``: one
pass of all pass-1 reductions, then the dependent passes), without autograd (statistics carry no
gradient); where the extension brought no CUDA kernel for them, their Triton launcher is their
CUDA kernel. The batched variant's three ops have twins as well (``..._batched_triton``: ragged
rows through a program table, one output launch per distinct bits row), used by
``quantize_mixture_batched(..., backend="triton")``.

Nothing here may break ``import autoqnn``: every failure only sets ``TRITON_ERROR``.
"""
from __future__ import annotations

import functools
import re
import typing

import torch

from .. import backends
from ..schemes import CLIPQ_LAMBDA, POTQ_LAMBDA, QUATERNARY_LAMBDA, TERNARY_DELTA, scheme_info
from . import _schema
from . import reference as ref

__all__ = ["TWIN_OPS", "AVAILABLE", "IMPORT_ERROR", "twin_name", "ensure_registered"]

#: ops with a Triton twin ``autoqnn::<op>_triton``
TWIN_OPS = ("tensor_stats", "scheme_params", "quantize", "quantize_backward", "mixture", "mixture_backward",
            "scheme_params_batched", "mixture_batched", "mixture_batched_backward")
#: the statistics ops (no autograd): their Triton launcher is the main op's CUDA kernel where the
#: extension brought none
STATS_OPS = ("tensor_stats", "scheme_params")
#: ops whose Triton launcher becomes the main op's CUDA kernel where the extension brought none:
#: the statistics and the batched variant (whose autograd formula, in _schema, calls the main
#: backward op, so it then runs the Triton backward too)
CUDA_FALLBACK_OPS = STATS_OPS + _schema.BATCHED_OPS
#: why the Triton kernels could not be loaded or registered (None when they were)
IMPORT_ERROR: str | None = None
#: the twin ops are registered
AVAILABLE = False

kernels = None
levels_kernels = None
try:
    import triton  # noqa: F401
except ModuleNotFoundError:
    IMPORT_ERROR = "triton is not installed (install the 'triton' extra)"
except Exception as e:  # pragma: no cover - broken installation
    IMPORT_ERROR = f"triton cannot be imported ({type(e).__name__}: {e})"
else:
    try:
        from ..triton_kernels import mixture as kernels
        from ..triton_kernels import stats as stats_kernels
        from ..triton_kernels import levels as levels_kernels
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
def _check_float(x):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"autoqnn: x has dtype {x.dtype}; the statistics need a floating-point tensor")


def _tensor_stats_impl(x, per_channel):
    _check_device(x)
    _check_float(x)
    cd = ref.compute_dtype(x.dtype)
    x = ref.in_memory_order(x, ref.memory_order(x, per_channel))  # a dense x without a copy
    return stats_kernels.row_stats(x, per_channel).to(cd)


def _stats_plan(schemes, b_rows, need_bits_grad):
    """The dependent passes ``(q, var, ter, quat, res_steps)`` the candidates need, chained like
    the C++ kernel (``csrc/cpu/quantize.cpp::fill_params``): pass 2 = σ + Ternary + ResQ α_2,
    pass 3 = Quaternary + α_3, pass q ≥ 4 = α_q; and per row the ClipQ/PotQ λ at its bits.
    ``b_rows``: integer bits per row (one row for the per-tensor op). The scheme tables are
    decided here, not in ``triton_kernels``."""
    names = [scheme_info(s).name for s in schemes]
    need_sigma = any(n in ("quaternary", "clip", "pot") for n in names)
    need_ter = "ternary" in names
    need_quat = "quaternary" in names
    # ResQ alphas to compute: alpha_1..alpha_{b+1} (alpha_{b+1} feeds only the bitwidth gradient)
    res_bits = max([b for row in b_rows for n, b in zip(names, row) if n == "residual"], default=-1)
    res_alphas = res_bits + int(bool(need_bits_grad))
    plan = []
    for q in range(2, max(3 if need_quat else 2, res_alphas) + 1):
        res = res_alphas >= q
        if q == 2 and not (need_sigma or need_ter or res):
            continue
        if q >= 3 and not res and not (q == 3 and need_quat):
            continue
        plan.append((q, q == 2, q == 2 and need_ter, q == 3 and need_quat, q - 1 if res else 0))
    lams = [[CLIPQ_LAMBDA[b] if n == "clip" else POTQ_LAMBDA[b] if n == "pot" else 0.0
             for n, b in zip(names, row)] for row in b_rows]
    return tuple(plan), lams


def _scheme_params_impl(x, bits, schemes, per_channel, need_bits_grad=True):
    """Every candidate's scales, on the device (``triton_kernels.stats.scheme_params_chain``):
    pass 1, then the dependent passes of :func:`_stats_plan`; per-row values rounded to the
    compute dtype where the reference rounds them."""
    _check_device(x)
    _check_float(x)
    schemes = [int(s) for s in schemes]
    b_int = ref.int_bits(bits, schemes)
    plan, (lams,) = _stats_plan(schemes, [b_int], need_bits_grad)
    x = ref.in_memory_order(x, ref.memory_order(x, per_channel))  # a dense x without a copy
    return stats_kernels.scheme_params_chain(
        x, per_channel, schemes, b_int, lams, (TERNARY_DELTA, QUATERNARY_LAMBDA), plan,
        res_top=int(bool(need_bits_grad)))


def _rows_int_bits(bits, schemes):
    """Integer bits per row of a checked ``[R, K]`` bits tensor (one host read)."""
    host = bits.detach().to("cpu", torch.float64)
    return [ref.int_bits(host[r], schemes) for r in range(host.shape[0])]


def _scheme_params_batched_impl(x, offsets, bits, schemes, need_bits_grad=True):
    """``[K, R, P]``: each ragged row's scales (``stats.scheme_params_chain_batched``): one
    statistics chain over every row, with per-row bits."""
    _check_device(x)
    _check_float(x)
    schemes = [int(s) for s in schemes]
    off = ref.check_offsets(x, offsets, "scheme_params_batched")
    ref._check_rows(bits, len(off) - 1, len(schemes), "bits", "scheme_params_batched")
    b_rows = _rows_int_bits(bits, schemes)
    plan, lams = _stats_plan(schemes, b_rows, need_bits_grad)
    return stats_kernels.scheme_params_chain_batched(
        x, off, schemes, b_rows, lams, (TERNARY_DELTA, QUATERNARY_LAMBDA), plan,
        res_top=int(bool(need_bits_grad)))


def _mixture_batched_impl(x, offsets, params, weights, bits, schemes):
    _check_device(x)
    schemes = [int(s) for s in schemes]
    off = ref._check_batched(x, offsets, params, weights, bits, schemes, "mixture_batched")
    b_rows = _rows_int_bits(bits, schemes)
    return kernels.mixture_batched_fwd(x, off, params, weights, b_rows, schemes)


def _mixture_batched_backward_impl(grad_y, x, offsets, params, weights, bits, schemes, need_weights_grad,
                                   need_bits_grad):
    _check_device(x)
    schemes = [int(s) for s in schemes]
    off = ref._check_batched(x, offsets, params, weights, bits, schemes, "mixture_batched_backward")
    b_rows = _rows_int_bits(bits, schemes)
    gx, gw, gb = kernels.mixture_batched_bwd(grad_y, x, off, params, weights, b_rows, schemes,
                                             need_weights_grad, need_bits_grad)
    gw = torch.zeros_like(weights) if gw is None else gw.to(weights.device, weights.dtype)
    # grad_bits on x's device (see _schema)
    gb = torch.zeros_like(bits) if gb is None else gb.to(x.device, bits.dtype)
    return gx, gw.contiguous(), gb.contiguous()


def _use_levels(x, per_channel) -> bool:
    """The levels-table output pass (``triton_kernels/levels.py``) instead of the arithmetic one,
    as ``AUTOQNN_TRITON_LEVELS`` says (default: never); the results are the same bit for bit."""
    if levels_kernels is None:
        return False
    C = int(x.shape[0]) if (per_channel and x.dim() > 0) else 1
    return levels_kernels.choose(x, C)


def _quantize_impl(x, params, bits, scheme, per_channel):
    _check_device(x)
    ref._check_params(x, params, 1, per_channel)
    (b,) = ref.int_bits(bits, [scheme])
    order = ref.memory_order(x, per_channel)  # y laid out like a dense x (see _schema)
    x = ref.in_memory_order(x, order)
    if _use_levels(x, per_channel):
        y = levels_kernels.mixture_fwd_levels(x, params, None, [b], [int(scheme)], per_channel)
    else:
        y = kernels.quantize_fwd(x, params, b, int(scheme), per_channel)
    return ref.from_memory_order(y, order)


def _quantize_backward_impl(grad_y, x, params, bits, scheme, per_channel, need_bits_grad):
    _check_device(x)
    ref._check_params(x, params, 1, per_channel)
    (b,) = ref.int_bits(bits, [scheme])
    order = ref.memory_order(x, per_channel)  # grad_x laid out like a dense x (see _schema)
    x, grad_y = ref.in_memory_order(x, order), ref.in_memory_order(grad_y, order)
    if _use_levels(x, per_channel):
        gx, _, gb = levels_kernels.mixture_bwd_levels(grad_y, x, params, None, [b], [int(scheme)], per_channel,
                                                      False, need_bits_grad)
    else:
        gx, gb = kernels.quantize_bwd(grad_y, x, params, b, int(scheme), per_channel, need_bits_grad)
    gx = ref.from_memory_order(gx, order)
    # grad_bits on x's device (see _schema)
    gb = torch.zeros_like(bits) if gb is None else gb.to(x.device, bits.dtype).reshape(bits.shape)
    return gx, gb


def _mixture_impl(x, params, weights, bits, schemes, per_channel):
    _check_device(x)
    schemes = [int(s) for s in schemes]
    ref._check_params(x, params, len(schemes), per_channel)
    b_int = ref.int_bits(bits, schemes)
    order = ref.memory_order(x, per_channel)  # y laid out like a dense x (see _schema)
    x = ref.in_memory_order(x, order)
    if _use_levels(x, per_channel):
        y = levels_kernels.mixture_fwd_levels(x, params, weights, b_int, schemes, per_channel)
    else:
        y = kernels.mixture_fwd(x, params, weights, b_int, schemes, per_channel)
    return ref.from_memory_order(y, order)


def _mixture_backward_impl(
    grad_y, x, params, weights, bits, schemes, per_channel, need_weights_grad, need_bits_grad
):
    _check_device(x)
    schemes = [int(s) for s in schemes]
    K = len(schemes)
    ref._check_params(x, params, K, per_channel)
    b_int = ref.int_bits(bits, schemes)
    order = ref.memory_order(x, per_channel)  # grad_x laid out like a dense x (see _schema)
    x, grad_y = ref.in_memory_order(x, order), ref.in_memory_order(grad_y, order)
    bwd = levels_kernels.mixture_bwd_levels if _use_levels(x, per_channel) else kernels.mixture_bwd
    gx, gw, gb = bwd(grad_y, x, params, weights, b_int, schemes, per_channel, need_weights_grad, need_bits_grad)
    gx = ref.from_memory_order(gx, order)
    if gw is None:
        gw = torch.zeros(K, dtype=weights.dtype, device=weights.device)
    gw = gw.to(weights.device, weights.dtype).reshape(weights.shape)
    if gb is None:  # not asked for: zeros where bits live; else on x's device (see _schema)
        gb = torch.zeros(K, dtype=bits.dtype, device=bits.device)
    gb = gb.to(x.device, bits.dtype).reshape(bits.shape)
    return gx, gw, gb


_IMPLS = {
    "tensor_stats": _tensor_stats_impl,
    "scheme_params": _scheme_params_impl,
    "quantize": _quantize_impl,
    "quantize_backward": _quantize_backward_impl,
    "mixture": _mixture_impl,
    "mixture_backward": _mixture_backward_impl,
    "scheme_params_batched": _scheme_params_batched_impl,
    "mixture_batched": _mixture_batched_impl,
    "mixture_batched_backward": _mixture_batched_backward_impl,
}
_FAKES = {
    "tensor_stats": _schema._tensor_stats_fake,
    "scheme_params": _schema._scheme_params_fake,
    "quantize": _schema._quantize_fake,
    "quantize_backward": _schema._quantize_backward_fake,
    "mixture": _schema._mixture_fake,
    "mixture_backward": _schema._mixture_backward_fake,
    "scheme_params_batched": _schema._scheme_params_batched_fake,
    "mixture_batched": _schema._mixture_batched_fake,
    "mixture_batched_backward": _schema._mixture_batched_backward_fake,
}


# ----------------------------------------------------------------------------- autograd (twins)
# The formula of autoqnn.ops._schema, the backward calling the `_triton` backward twin.
def _quantize_triton_bwd(ctx, grad_y):
    return _schema._quantize_bwd(ctx, grad_y, bwd_op=torch.ops.autoqnn.quantize_backward_triton)


def _mixture_triton_bwd(ctx, grad_y):
    return _schema._mixture_bwd(ctx, grad_y, bwd_op=torch.ops.autoqnn.mixture_backward_triton)


def _mixture_batched_triton_bwd(ctx, grad_y):
    return _schema._mixture_batched_bwd(ctx, grad_y, bwd_op=torch.ops.autoqnn.mixture_batched_backward_triton)


_AUTOGRAD = {
    "quantize": (_quantize_triton_bwd, _schema._quantize_setup),
    "mixture": (_mixture_triton_bwd, _schema._mixture_setup),
    "mixture_batched": (_mixture_batched_triton_bwd, _schema._mixture_batched_setup),
}


def _opaque_under_functionalization(mode, func, types, args, kwargs):
    # keep the twin as one custom op in AOTAutograd graphs (see the module docstring)
    return mode.__torch_dispatch__(func, types, args, kwargs)


# typing.List, not list[int]: torch 2.6's infer_schema knows only the typing spellings
_SCHEMA_TYPES = {"Tensor": torch.Tensor, "bool": bool, "int": int, "float": float, "int[]": typing.List[int]}


def with_schema_signature(fn, schema: str):
    """``fn`` given the typed signature that ``schema`` spells ("(Tensor x, int[] s) -> Tensor").

    ``triton_op`` infers its schema from the function's annotations in every torch from 2.6 (its
    ``schema=`` argument is ignored by some releases and missing from others), and the impls here
    are unannotated because their arguments are the schema's: the signature is written from the
    one schema string of ``_schema.SCHEMAS``, so the twin's schema cannot drift from the main op's."""
    import inspect  # noqa: PLC0415

    m = re.fullmatch(r"\((.*)\) -> (.*)", schema.strip())
    if m is None:
        raise ValueError(f"autoqnn: cannot parse the op schema {schema!r}")
    params = []
    for arg in m.group(1).split(","):
        typ, name = arg.strip().rsplit(" ", 1)
        default = inspect.Parameter.empty
        if "=" in name:  # a defaulted argument: "bool need_bits_grad=True"
            name, text = name.split("=", 1)
            defaults = {"True": True, "False": False, "None": None}
            default = defaults[text] if text in defaults else int(text)
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=_SCHEMA_TYPES[typ]))
    ret = m.group(2).strip()
    if ret.startswith("("):
        ret_t = tuple[tuple(_SCHEMA_TYPES[t.strip()] for t in ret[1:-1].split(","))]
    else:
        ret_t = _SCHEMA_TYPES[ret]
    sig = inspect.Signature(params, return_annotation=ret_t)
    have = [p.name for p in inspect.signature(fn).parameters.values()]
    if have != [p.name for p in params]:
        raise ValueError(f"autoqnn: {fn.__name__}{tuple(have)} does not take the arguments of {schema!r}")

    @functools.wraps(fn)
    def typed(*args, **kwargs):
        return fn(*args, **kwargs)

    typed.__signature__ = sig
    typed.__annotations__ = {**{p.name: p.annotation for p in params}, "return": ret_t}
    return typed


def _define_twins() -> dict:
    from torch._subclasses.functional_tensor import FunctionalTensorMode  # noqa: PLC0415

    defs = {}
    for op in TWIN_OPS:
        name = _schema.qualname(twin_name(op))
        impl = with_schema_signature(_IMPLS[op], _schema.SCHEMAS[op])
        d = torch.library.triton_op(name, mutates_args=())(impl)
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
_lib = None
#: statistics ops whose CUDA kernel is the Triton launcher (registered here)
CUDA_REGISTERED: list[str] = []


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
    # the output-pass ops' CUDA kernel is the router of autoqnn.kernel_choice (installed by
    # autoqnn); the statistics ops get the Triton launcher where the extension has no CUDA kernel
    global _lib
    _lib = torch.library.Library(_schema.LIB_NAME, "FRAGMENT")
    for op in CUDA_FALLBACK_OPS:
        if _schema.has_kernel(op, "CUDA"):
            continue  # a compiled CUDA kernel is never overridden
        try:
            torch.library.register_kernel(_schema.qualname(op), "cuda", _eager(_IMPLS[op]), lib=_lib)
            CUDA_REGISTERED.append(op)
            backends.TRITON_CUDA_KERNELS.add(op)
        except Exception:  # pragma: no cover - GPUs keep the reference then
            pass


def _availability_error() -> str | None:
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if not kernels.INTERPRET and not _has_gpu():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on CPU through the interpreter)"
    if not AVAILABLE:  # pragma: no cover
        return "the Triton ops are not registered"
    return None


def _has_gpu() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def ensure_registered() -> bool:
    """Register the twin ops now if that was deferred (see below); True when they are."""
    global IMPORT_ERROR
    if not AVAILABLE and IMPORT_ERROR is None and kernels is not None:
        try:
            _register()
        except Exception as e:  # pragma: no cover
            IMPORT_ERROR = f"{type(e).__name__}: {e}"
        backends.TRITON_ERROR = _availability_error()
    return AVAILABLE


# Registration is deferred where no Triton kernel can run (no GPU, no interpreter): recent torch's
# triton_op imports torch._inductor to scan each twin's body (~1.5 s of `import autoqnn` on a
# CPU-only machine, paid by every CLI call). ensure_registered() registers them on demand.
try:
    if kernels is not None and (kernels.INTERPRET or _has_gpu()):
        _register()
except Exception as e:  # pragma: no cover - never break `import autoqnn`
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
backends.TRITON_ERROR = _availability_error()
