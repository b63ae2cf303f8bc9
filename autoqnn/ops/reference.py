# SPDX-License-Identifier: MIT
"""Pure-PyTorch reference kernels: the oracle every fused kernel is tested against, and the
``default`` (CompositeExplicitAutograd) kernel of every ``autoqnn::`` op.

Conventions shared by all kernels (C++, CUDA, Triton must match them):

* ``x`` is viewed as ``[C, N]``: ``C`` = ``x.shape[0]`` with ``per_channel`` (weights,
  output-channel statistics) else 1. A 0-d tensor is always per tensor.
* Compute dtype ``cd`` is float64 for float64 input, float32 otherwise (fp16/bf16 are upcast).
* Statistics are taken over the *finite* elements only (NaN and ±Inf excluded). σ is the
  unbiased standard deviation (0 with fewer than two finite elements).
* ``params`` is a ``[K, C, NUM_PARAMS]`` tensor in ``cd`` with each candidate's scale(s); the
  output pass only reads ``x`` and ``params`` (SPEC 2, KERNELS.md "output pass").
* Bits are a float tensor ``[K]``; the forward uses ``clip(round(b), b_min, b_max)``
  (:func:`autoqnn.schemes.clamp_bits`). Binary/Ternary/Quaternary ignore it (1/2/2 bits).
* Output values: NaN stays NaN, ±Inf saturates to the extreme level, a zero scale gives the
  scheme's offset (0, or ``min`` for ZoomQ).
* STE: ∂y/∂x = 1, except ClipQ: 1 inside [−(2^{b−1}−½)α, (2^{b−1}−½)α], 0 outside; the
  gradient is 0 at non-finite x (those elements carry no information).
* Bitwidth derivative D = ∂y/∂b (SPEC 4.1): for the scale schemes (fixed, zoom, clip, pot)
  ``D = c_b·(y − x)`` with ``c_b = −ln2·2^b/(2^b−1)`` (= ∂y/∂α·∂α/∂b with the STE ∂Φ/∂u = 1 on
  every element, ClipQ's clipped ones included); for ResQ, which has
  no single scale, the centred difference ``D = (q_{b+1} − q_{b−1})/2 = (s_b + s_{b+1})/2`` with
  ``s_i = α_i·sgn(r_i)``; 0 for the fixed-bit schemes, for non-finite x and where the scale is 0.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..schemes import (
    CLIPQ_LAMBDA,
    NUM_PARAMS,
    POTQ_LAMBDA,
    QUATERNARY_LAMBDA,
    TERNARY_DELTA,
    bits_scale_factor,
    clamp_bits,
    scheme_info,
)

__all__ = [
    "compute_dtype",
    "num_channels",
    "tensor_stats_ref",
    "scheme_params_ref",
    "quantize_ref",
    "quantize_backward_ref",
    "mixture_ref",
    "mixture_backward_ref",
    "eval_scheme",
    "params_rows",
    "int_bits",
    "scheme_params_batched_ref",
    "mixture_batched_ref",
    "mixture_batched_backward_ref",
    "uniform48_ref",
]

# PotQ rounds log2|u| to the nearest integer: with frexp(|u|) = (f, E), f ∈ [0.5, 1),
# round(log2|u|) = E − 1 + [f ≥ √½]. √½ is irrational, so these thresholds make the test
# exact: float32(√½) < √½ (use >), float64(√½) > √½ (use ≥).
_SQRT_HALF_F32 = 0.70710677
_SQRT_HALF_F64 = 0.7071067811865476

STAT_COLUMNS = ("count", "sum_abs", "sum", "sum_sq", "min", "max", "max_abs")


def frexp(a: torch.Tensor):
    """``torch.frexp(a)`` (mantissa, int32 exponent), also under ``torch.compile``: traced, it is
    computed from the float's bits instead, with the same results for every value (0, ±Inf
    and NaN give (a, 0) as frexp does). Inductor in torch 2.6 takes frexp's exponent for a float
    in vectorized CPU code, and any arithmetic on it then fails to compile."""
    if not torch.compiler.is_compiling():
        return torch.frexp(a)
    return _frexp_bits(a)


def _frexp_bits(a: torch.Tensor):
    if a.dtype == torch.float64:
        ib, mbits, emask, bias, k, tiny_below = torch.int64, 52, 0x7FF, 1022, 54, 2.0**-1022
        w = a
    else:  # float32 (float16/bfloat16 values are exact in it)
        ib, mbits, emask, bias, k, tiny_below = torch.int32, 23, 0xFF, 126, 24, 2.0**-126
        w = a.float()
    special = (w == 0) | ~torch.isfinite(w)
    tiny = (w.abs() < tiny_below) & ~special  # subnormal: scaled into the normal range first
    s = torch.where(tiny, w * 2.0**k, w)
    bits = s.view(ib)
    e = ((bits >> mbits) & emask) - bias - torch.where(tiny, k, 0).to(ib)
    f = ((bits & ~(emask << mbits)) | (bias << mbits)).view(w.dtype)  # sign kept, exponent of [0.5, 1)
    f = torch.where(special, w, f).to(a.dtype)
    e = torch.where(special, torch.zeros_like(e), e).to(torch.int32)
    return f, e


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_channels(x: torch.Tensor, per_channel: bool) -> int:
    return int(x.shape[0]) if (per_channel and x.dim() > 0) else 1


def memory_order(x: torch.Tensor, per_channel: bool) -> Optional[list[int]]:
    """x's dims from outermost to innermost in memory when x is dense in a layout other than the
    contiguous one (channels-last activations and weights, a transposed matrix), else None.

    ``x.permute(order)`` is then contiguous: the ops read x in that order without a copy and lay
    their outputs out like x (:func:`from_memory_order`), so a channels-last model stays
    channels-last. Per channel, dim 0 stays first (each channel's elements stay one contiguous
    row); a layout where it is not outermost gets None. Dims of equal stride (size-1 dims) keep
    their index order. None also for contiguous, 0-/1-d and non-dense tensors: the ops read a
    contiguous copy and write contiguous outputs. The twin of ``csrc/include/autoqnn/
    memory_order.h``; the fake kernels use this one, so every kernel's output strides agree.
    """
    if x.dim() < 2 or x.is_contiguous():
        return None
    dims = sorted(range(1 if per_channel else 0, x.dim()), key=lambda d: -x.stride(d))  # stable
    order = [0, *dims] if per_channel else dims
    return order if x.permute(order).is_contiguous() else None


def in_memory_order(t: torch.Tensor, order: Optional[list[int]]) -> torch.Tensor:
    """``t`` with its dims permuted to ``order`` (:func:`memory_order` of x): contiguous, without a
    copy, when t is laid out like x."""
    return t if order is None else t.permute(order)


def from_memory_order(t: torch.Tensor, order: Optional[list[int]]) -> torch.Tensor:
    """A result computed in memory order (dims permuted) as a tensor of x's dims and layout."""
    if order is None:
        return t
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return t.permute(inv)


def out_like(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """An uninitialised tensor of x's shape and dtype with the ops' output layout: x's when
    :func:`memory_order` gives an order, contiguous otherwise (what the fake kernels return)."""
    order = memory_order(x, per_channel)
    return from_memory_order(torch.empty_like(in_memory_order(x, order), memory_format=torch.contiguous_format),
                             order)


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """x as a contiguous [C, N] tensor in the compute dtype, its elements in memory order
    (:func:`memory_order`; a copy only where needed)."""
    C = num_channels(x, per_channel)
    n = x.numel() // C if C else 0
    x = in_memory_order(x, memory_order(x, per_channel))
    return x.detach().to(compute_dtype(x.dtype)).contiguous().reshape(C, n)


def _out(y2: torch.Tensor, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A [C, N] result of :func:`_rows`'s order as a tensor of x's shape, dtype and layout."""
    order = memory_order(x, per_channel)
    return from_memory_order(y2.reshape(in_memory_order(x, order).shape).to(x.dtype), order)


def _grad_rows(grad_y: torch.Tensor, x: torch.Tensor, per_channel: bool, like: torch.Tensor) -> torch.Tensor:
    """grad_y in the order of :func:`_rows` (x's memory order), shaped and typed like ``like``."""
    g = in_memory_order(grad_y, memory_order(x, per_channel))
    return g.detach().to(like.dtype).reshape(like.shape)


def int_bits(bits: torch.Tensor, schemes: Sequence[int]) -> list[int]:
    """Forward integer bits per candidate from the float bits tensor (SPEC 4.1)."""
    vals = bits.detach().reshape(-1).tolist()
    if len(vals) != len(schemes):
        raise ValueError(f"bits has {len(vals)} entries for {len(schemes)} schemes")
    return [clamp_bits(s, v) for s, v in zip(schemes, vals)]


# ----------------------------------------------------------------------------- statistics
def _stats_rows(x2: torch.Tensor):
    """Per-row statistics over finite elements of a [C, N] tensor."""
    cd = x2.dtype
    fin = torch.isfinite(x2)
    xf = torch.where(fin, x2, 0)
    n = fin.sum(1).to(cd)
    if x2.shape[1] == 0:
        z = torch.zeros(x2.shape[0], dtype=cd, device=x2.device)
        return fin, xf, n, z, z, z, z, z, z
    big = torch.finfo(cd).max
    mn = torch.where(n > 0, torch.where(fin, x2, big).amin(1), 0)
    mx = torch.where(n > 0, torch.where(fin, x2, -big).amax(1), 0)
    ax = xf.abs()
    return fin, xf, n, ax.sum(1), xf.sum(1), (xf * xf).sum(1), mn, mx, ax.amax(1)


def tensor_stats_ref(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``[C, 7]``: count of finite, Σ|x|, Σx, Σx², min, max, max|x| (finite elements only)."""
    _, _, n, s1, sx, s2, mn, mx, ma = _stats_rows(_rows(x, per_channel))
    return torch.stack([n, s1, sx, s2, mn, mx, ma], 1)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, 1), 0)


def _sgn(v: torch.Tensor) -> torch.Tensor:
    """+1 for v > 0, −1 otherwise (the paper's binarisation rule; NaN handled by callers)."""
    return torch.where(v > 0, 1.0, -1.0).to(v.dtype)


def scheme_params_ref(
    x: torch.Tensor, bits: torch.Tensor, schemes: Sequence[int], per_channel: bool, need_bits_grad: bool = True
) -> torch.Tensor:
    """Per-candidate, per-channel scales: ``[K, C, NUM_PARAMS]`` in the compute dtype.

    Slots: binary α; ternary (Δ, α); quaternary (s, α); fixed (step 2^e, max|x|); residual α_1..α_{b+1};
    zoom (min, step); clip α; pot α. ResQ's α_{b+1} only feeds the bitwidth gradient: it is 0
    when ``need_bits_grad`` is False (the kernels then skip its statistics pass).
    """
    return params_rows(_rows(x, per_channel), int_bits(bits, schemes), schemes, need_bits_grad)


def params_rows(
    x2: torch.Tensor, b_int: Sequence[int], schemes: Sequence[int], need_bits_grad: bool = True
) -> torch.Tensor:
    """:func:`scheme_params_ref` on an already-flattened ``[C, N]`` compute-dtype tensor with
    integer bits (traceable by ``torch.compile``: no host reads)."""
    cd = x2.dtype
    C = x2.shape[0]
    out = torch.zeros(len(schemes), C, NUM_PARAMS, dtype=cd, device=x2.device)
    fin, xf, n, s1, sx, s2, mn, mx, ma = _stats_rows(x2)
    ax = xf.abs()  # |x| with non-finite -> 0 (excluded through `fin` / n)
    mean_abs = _safe_div(s1, n)
    mean = _safe_div(sx, n)
    # Σ(x − mean)² accumulated in float64 (as the C++ kernel does): in float32 it overflows for
    # finite |x| ≳ 1e19; σ itself is then representable again.
    dev = torch.where(fin, x2 - mean[:, None], 0).double()
    # σ = 0 exactly when the finite elements are all equal (min == max): the rounded mean of a
    # constant row need not equal its value, and Σ(x − mean)² would then be rounding noise
    # (QuaternaryQ's step λσ would be a tiny positive number instead of 0).
    spread = (n > 1) & (mx > mn)
    var = torch.where(spread, (dev * dev).sum(1) / torch.clamp(n.double() - 1, min=1), 0)
    sigma = var.sqrt().to(cd)
    for k, (sid, b) in enumerate(zip(schemes, b_int)):
        name = scheme_info(sid).name
        p = out[k]
        if fill_pass1_params(p, name, b, mean_abs=mean_abs, max_abs=ma, mn=mn, mx=mx, sigma=sigma):
            continue
        if name == "ternary":
            delta = TERNARY_DELTA * mean_abs
            sel = fin & (ax > delta[:, None])
            p[:, 0] = delta
            p[:, 1] = _safe_div(torch.where(sel, ax, 0).sum(1), sel.sum(1).to(cd))
        elif name == "quaternary":
            s = QUATERNARY_LAMBDA * sigma
            v = torch.clamp(torch.round(_safe_div(xf, s[:, None])), -2, 1)
            v = torch.where(fin, v, 0)
            p[:, 0] = s
            p[:, 1] = _safe_div((xf * v).sum(1), (v * v).sum(1))
        elif name == "residual":
            a = ax
            for i in range(b + 1 if need_bits_grad else b):
                alpha = _safe_div(a.sum(1), n)
                p[:, i] = alpha
                a = torch.where(fin, (a - alpha[:, None]).abs(), 0)
        else:  # pragma: no cover - schemes are validated upstream
            raise AssertionError(name)
    return out


def fill_pass1_params(p, name, b, *, mean_abs, max_abs, mn, mx, sigma) -> bool:
    """Fill ``p`` ([C, NUM_PARAMS]) for the schemes whose scales follow from pass-1 statistics
    and σ alone (binary, fixed, zoom, clip, pot); False for the others (ternary, quaternary,
    residual need dependent passes). Shared by the reference and the Triton statistics."""
    if name == "binary":
        p[:, 0] = mean_abs
    elif name == "fixed":
        _, e = frexp(max_abs)  # max_abs = f·2^e, f in [0.5, 1): floor(log2 max_abs) = e − 1
        step = torch.ldexp(torch.ones_like(max_abs), (e + 1 - b).to(max_abs.dtype))
        p[:, 0] = torch.where(max_abs > 0, step, 0)
        p[:, 1] = max_abs  # not used by the output pass: lets an EMA of params re-derive the step
    elif name == "zoom":
        p[:, 0] = mn
        p[:, 1] = (mx - mn) / (2.0 ** b)
    elif name == "clip":
        p[:, 0] = CLIPQ_LAMBDA[b] * sigma
    elif name == "pot":
        p[:, 0] = POTQ_LAMBDA[b] * sigma
    else:
        return False
    return True


# ----------------------------------------------------------------------------- output pass
def eval_scheme(
    sid: int, x2: torch.Tensor, p: torch.Tensor, b: int, need_dbits: bool = False
):
    """Evaluate one candidate on ``x2`` ([C, N], compute dtype) with params ``p`` ([C, P]).

    Returns ``(q, mask, D)``: the quantized values, the STE mask (``None`` = identity) and
    ∂q/∂b (``None`` unless ``need_dbits``).
    """
    name = scheme_info(sid).name
    col = lambda j: p[:, j : j + 1]  # noqa: E731  [C, 1], broadcasts over N
    nan = torch.isnan(x2)
    mask = None
    D = None
    scale = None
    if name == "binary":
        q = col(0) * _sgn(x2)
    elif name == "ternary":
        t = torch.where(x2.abs() > col(0), torch.sign(x2), 0)
        q = col(1) * t
    elif name == "quaternary":
        v = torch.clamp(torch.round(_safe_div(x2, col(0))), -2, 1)
        q = col(1) * v
    elif name == "fixed":
        scale = col(0)
        lim = 2 ** (b - 1)
        m = torch.clamp(torch.round(_safe_div(x2, scale)), -lim, lim - 1)
        q = m * scale
    elif name == "residual":
        r = x2
        q = torch.zeros_like(x2)
        s_prev = None
        for i in range(b):
            s = col(i) * _sgn(r)
            q = q + s
            r = r - s
            s_prev = s
        if need_dbits:
            s_next = col(b) * _sgn(r)
            D = 0.5 * (s_prev + s_next)
    elif name == "zoom":
        mn, scale = col(0), col(1)
        k = torch.clamp(torch.floor(_safe_div(x2 - mn, scale)), 0, 2**b - 1)
        q = mn + scale * (k + 0.5)
    elif name == "clip":
        scale = col(0)
        lim = 2 ** (b - 1)
        k = torch.clamp(torch.round(_safe_div(x2, scale) - 0.5), -lim, lim - 1)
        q = scale * (k + 0.5)
        edge = (lim - 0.5) * scale
        mask = (x2 >= -edge) & (x2 <= edge)
    elif name == "pot":
        scale = col(0)
        u = _safe_div(x2, scale)
        a = u.abs()
        f, e = frexp(a)
        thr = _SQRT_HALF_F64 if x2.dtype == torch.float64 else _SQRT_HALF_F32
        up = (f >= thr) if x2.dtype == torch.float64 else (f > thr)
        lmax = 2 ** (b - 1) - 1
        lv = (e - 1 + up.to(e.dtype)).to(x2.dtype)
        lv = torch.where(torch.isinf(a), float(lmax), lv)
        lv = torch.clamp(lv, 0, lmax)
        mag = torch.where(lv == 0, 0.5, torch.exp2(lv))
        q = scale * torch.sign(u) * mag
    else:  # pragma: no cover
        raise AssertionError(name)
    q = torch.where(nan, x2, q)
    if need_dbits and D is None:
        if scale is not None:
            # ∂y/∂α·α = Φ(u)·α − u·α·∂Φ/∂u = q − x with the STE ∂Φ/∂u = 1 on every element (SPEC
            # 4.1 [SEED]), ClipQ's clipped elements included: its x-gradient mask is not applied
            # here. The LSQ-style alternative (the clip level outside the range) gives ClipQ the
            # wrong sign against finite differences at the table's α (tests/test_bits_grad.py).
            D = torch.where(scale > 0, bits_scale_factor(b) * (q - x2), 0)
        else:
            D = torch.zeros_like(x2)
    if D is not None:
        D = torch.where(torch.isfinite(x2), D, 0)
    return q, mask, D


def _check_params(x, params, K, per_channel):
    C = num_channels(x, per_channel)
    if params.dim() != 3 or params.shape[0] != K or params.shape[1] != C:
        raise ValueError(
            f"params must have shape [{K}, {C}, {NUM_PARAMS}] for this input, got {list(params.shape)}"
        )


def mixture_ref(
    x: torch.Tensor,
    params: torch.Tensor,
    weights: torch.Tensor,
    bits: torch.Tensor,
    schemes: Sequence[int],
    per_channel: bool,
) -> torch.Tensor:
    """y = Σ_k w_k·q_k(x) (SPEC 3), in x's dtype."""
    K = len(schemes)
    _check_params(x, params, K, per_channel)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    b_int = int_bits(bits, schemes)
    x2 = _rows(x, per_channel)
    p = params.to(x2.dtype)
    w = weights.detach().to(x2.dtype).reshape(-1).tolist()
    y = None
    for k in range(K):
        q, _, _ = eval_scheme(schemes[k], x2, p[k], b_int[k])
        q = q * w[k]
        y = q if y is None else y + q
    return _out(y, x, per_channel)


def mixture_backward_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    params: torch.Tensor,
    weights: torch.Tensor,
    bits: torch.Tensor,
    schemes: Sequence[int],
    per_channel: bool,
    need_weights_grad: bool = True,
    need_bits_grad: bool = True,
):
    """(grad_x, grad_weights, grad_bits) of :func:`mixture_ref`.

    grad_x = grad_y·Σ_k w_k·mask_k; grad_w[k] = ⟨grad_y, q_k(x)⟩;
    grad_bits[k] = w_k·⟨grad_y, ∂q_k/∂b⟩.
    """
    K = len(schemes)
    _check_params(x, params, K, per_channel)
    gw = torch.zeros(K, dtype=weights.dtype, device=weights.device)
    # grad_bits: on x's device when asked for, else zeros where bits live (see _schema)
    gb = torch.zeros(K, dtype=bits.dtype, device=x.device if need_bits_grad else bits.device)
    if x.numel() == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format), gw, gb
    b_int = int_bits(bits, schemes)
    x2 = _rows(x, per_channel)
    cd = x2.dtype
    g2 = _grad_rows(grad_y, x, per_channel, x2)
    p = params.to(cd)
    wl = weights.detach().to(cd).reshape(-1).tolist()
    gmask = None  # Σ_k w_k·mask_k, as [C, N] or scalar
    wsum_identity = 0.0
    gw_l, gb_l = [], []
    for k in range(K):
        q, mask, D = eval_scheme(schemes[k], x2, p[k], b_int[k], need_dbits=need_bits_grad)
        if mask is None:
            wsum_identity += wl[k]
        else:
            term = mask.to(cd) * wl[k]
            gmask = term if gmask is None else gmask + term
        if need_weights_grad:
            gw_l.append((g2 * q).sum())
        if need_bits_grad:
            gb_l.append(wl[k] * (g2 * D).sum())
    factor = wsum_identity if gmask is None else gmask + wsum_identity
    gx = _out(torch.where(torch.isfinite(x2), g2 * factor, 0), x, per_channel)
    if need_weights_grad:
        gw = torch.stack(gw_l).to(weights.dtype).reshape(weights.shape)
    if need_bits_grad:
        gb = torch.stack(gb_l).to(bits.dtype).reshape(bits.shape)
    return gx, gw, gb


def quantize_ref(
    x: torch.Tensor, params: torch.Tensor, bits: torch.Tensor, scheme: int, per_channel: bool
) -> torch.Tensor:
    """q(x) for one scheme; ``params`` is ``[1, C, NUM_PARAMS]``, ``bits`` is ``[1]``."""
    _check_params(x, params, 1, per_channel)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    (b,) = int_bits(bits, [scheme])
    x2 = _rows(x, per_channel)
    q, _, _ = eval_scheme(scheme, x2, params[0].to(x2.dtype), b)
    return _out(q, x, per_channel)


def quantize_backward_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    params: torch.Tensor,
    bits: torch.Tensor,
    scheme: int,
    per_channel: bool,
    need_bits_grad: bool = True,
):
    """(grad_x, grad_bits): grad_x = mask·grad_y, grad_bits = ⟨grad_y, ∂q/∂b⟩."""
    _check_params(x, params, 1, per_channel)
    gb = torch.zeros_like(bits, device=x.device if need_bits_grad else bits.device)  # see _schema
    if x.numel() == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format), gb
    (b,) = int_bits(bits, [scheme])
    x2 = _rows(x, per_channel)
    g2 = _grad_rows(grad_y, x, per_channel, x2)
    _, mask, D = eval_scheme(scheme, x2, params[0].to(x2.dtype), b, need_dbits=need_bits_grad)
    keep = torch.isfinite(x2) if mask is None else mask
    gx = torch.where(keep, g2, 0)
    if need_bits_grad:
        gb = (g2 * D).sum().to(bits.dtype).reshape(bits.shape)
    return _out(gx, x, per_channel), gb



# ----------------------------------------------------------------------------- batched ops
# Many tensors in one call (e.g. every weight of a model): ``x`` is their flat concatenation and
# ``offsets`` ([R + 1] ints, 0 .. numel) cut it into R rows, each quantized on its own: its own
# statistics, mixture weights ``weights[r]`` and bits ``bits[r]`` ([R, K] both). A per-channel
# tensor contributes one row per channel. These references loop over the rows with the per-tensor
# references above (the oracle of the batched kernels, and their fallback).
def check_offsets(x: torch.Tensor, offsets: Sequence[int], op: str = "batched op") -> list[int]:
    off = [int(o) for o in offsets]
    if not off or off[0] != 0 or off[-1] != x.numel():
        raise ValueError(
            f"autoqnn::{op}: offsets must start at 0 and end at x.numel() = {x.numel()}, got "
            f"{off[:1]} .. {off[-1:]}"
        )
    for r in range(len(off) - 1):
        if off[r + 1] < off[r]:
            raise ValueError(f"autoqnn::{op}: offsets must be non-decreasing, got {off[r]} then {off[r + 1]} at row {r}")
    return off


def _check_rows(t: torch.Tensor, R: int, K: int, name: str, op: str) -> None:
    if t.dim() != 2 or t.shape[0] != R or t.shape[1] != K:
        raise ValueError(f"autoqnn::{op}: {name} must have shape [{R}, {K}] (rows x schemes), got {list(t.shape)}")


def _check_batched(x, offsets, params, weights, bits, schemes, op: str) -> list[int]:
    """The offsets, and weights/bits [R, K] and params [K, R, P] shapes, of a batched output-pass op."""
    off = check_offsets(x, offsets, op)
    R, K = len(off) - 1, len(schemes)
    _check_rows(weights, R, K, "weights", op)
    _check_rows(bits, R, K, "bits", op)
    if params.dim() != 3 or params.shape[0] != K or params.shape[1] != R:
        raise ValueError(f"autoqnn::{op}: params must have shape [{K}, {R}, {NUM_PARAMS}], got {list(params.shape)}")
    return off


def scheme_params_batched_ref(
    x: torch.Tensor, offsets: Sequence[int], bits: torch.Tensor, schemes: Sequence[int], need_bits_grad: bool = True
) -> torch.Tensor:
    """``[K, R, NUM_PARAMS]``: row r's scales, as :func:`scheme_params_ref` of that row alone."""
    off = check_offsets(x, offsets, "scheme_params_batched")
    R, K = len(off) - 1, len(schemes)
    _check_rows(bits, R, K, "bits", "scheme_params_batched")
    xf = x.detach().reshape(-1)
    cd = compute_dtype(x.dtype)
    if R == 0:
        return torch.zeros((K, 0, NUM_PARAMS), dtype=cd, device=x.device)
    rows = [scheme_params_ref(xf[off[r]:off[r + 1]], bits[r], schemes, False, need_bits_grad) for r in range(R)]
    return torch.cat(rows, 1)


def mixture_batched_ref(
    x: torch.Tensor,
    offsets: Sequence[int],
    params: torch.Tensor,
    weights: torch.Tensor,
    bits: torch.Tensor,
    schemes: Sequence[int],
) -> torch.Tensor:
    """y = Σ_k weights[r, k]·q_k(x) on every row r, in x's shape and dtype."""
    off = _check_batched(x, offsets, params, weights, bits, schemes, "mixture_batched")
    R = len(off) - 1
    xf = x.detach().reshape(-1)
    y = torch.empty_like(xf, memory_format=torch.contiguous_format)
    for r in range(R):
        if off[r + 1] > off[r]:
            y[off[r]:off[r + 1]] = mixture_ref(
                xf[off[r]:off[r + 1]], params[:, r:r + 1], weights[r], bits[r], schemes, False
            )
    return y.reshape(x.shape)


def mixture_batched_backward_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    offsets: Sequence[int],
    params: torch.Tensor,
    weights: torch.Tensor,
    bits: torch.Tensor,
    schemes: Sequence[int],
    need_weights_grad: bool = True,
    need_bits_grad: bool = True,
):
    """(grad_x, grad_weights [R, K], grad_bits [R, K]) of :func:`mixture_batched_ref`, row by row
    as :func:`mixture_backward_ref`."""
    off = _check_batched(x, offsets, params, weights, bits, schemes, "mixture_batched_backward")
    R = len(off) - 1
    if grad_y.shape != x.shape:
        raise ValueError(f"autoqnn: grad_y has shape {list(grad_y.shape)} but x has shape {list(x.shape)}")
    xf = x.detach().reshape(-1)
    gf = grad_y.detach().reshape(-1)
    gx = torch.zeros_like(xf, memory_format=torch.contiguous_format)
    gw = torch.zeros_like(weights, memory_format=torch.contiguous_format)
    gb = torch.zeros_like(bits, memory_format=torch.contiguous_format,
                          device=x.device if need_bits_grad else bits.device)  # see _schema
    for r in range(R):
        if off[r + 1] == off[r]:
            continue
        sl = slice(off[r], off[r + 1])
        gx[sl], gw[r], gb[r] = mixture_backward_ref(
            gf[sl], xf[sl], params[:, r:r + 1], weights[r], bits[r], schemes, False,
            need_weights_grad, need_bits_grad,
        )
    return gx.reshape(x.shape), gw, gb


# ----------------------------------------------------------------------------- noise
# The counter-based hash of the Gumbel noise (QSS), also in C++/CUDA: csrc/include/autoqnn/noise.h.
_M32 = 0xFFFFFFFF
#: the largest number of candidates ``uniform48`` takes (keeps every int64 intermediate < 2^63)
UNIFORM48_MAX_K = 1 << 20


def _mix32(v: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift / multiply rounds) on int64 tensors holding values
    in [0, 2^32); every product stays below 2^59, so int64 never overflows."""
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & _M32
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & _M32
    return v ^ (v >> 16)


def check_uniform48_args(seed: torch.Tensor, steps: torch.Tensor, k: int) -> None:
    """The argument checks of ``autoqnn::uniform48`` (the C++ kernels make the same)."""
    for name, t in (("seed", seed), ("steps", steps)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"autoqnn::uniform48: {name} must be an integer tensor, got dtype {t.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"autoqnn::uniform48: seed must have one element, got {seed.numel()}")
    if not 0 <= k <= UNIFORM48_MAX_K:
        raise ValueError(f"autoqnn::uniform48: k must be in [0, {UNIFORM48_MAX_K}], got {k}")


def uniform48_ref(seed: torch.Tensor, steps: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[*steps.shape, k]`` on ``steps``' device: for every step t and candidate i a 48-bit
    integer n in [0, 2^48), uniformly distributed, a pure function of (seed, t, i).

    Two 32-bit hashes of (seed, step) give the step's state h; candidate i takes the top 24 bits
    of two more hashes, ``mix32(h ^ mix32(j + C))`` for j = 2i and 2i + 1. ``seed`` is an integer
    tensor with one element on any device; ``steps`` any integer tensor (the two's-complement bits
    of negative values are hashed).
    """
    check_uniform48_args(seed, steps, k)
    seed = seed.reshape(()).to(device=steps.device, dtype=torch.int64)
    t = steps.to(torch.int64)
    h = _mix32(((seed >> 32) & _M32) ^ 0x3C6EF372)
    h = _mix32(h ^ (seed & _M32))
    h = _mix32(h ^ ((t >> 32) & _M32) ^ 0x7F4A7C15)
    h = _mix32(h ^ (t & _M32)).unsqueeze(-1)
    j = torch.arange(2 * k, device=steps.device, dtype=torch.int64)
    u = _mix32(h ^ _mix32(j + 0x2545F491)) >> 8  # [..., 2k], 24 bits each
    return u[..., 0::2] * (1 << 24) + u[..., 1::2]
