# SPDX-License-Identifier: MIT
"""Triton output pass of the AutoQNN quantizers: one scheme (``quantize``) or the QSS mixture
y = Σ_k w_k·q_k(x) (``mixture``), forward and backward, with exactly the semantics of
:func:`autoqnn.ops.reference.mixture_ref` / :func:`~autoqnn.ops.reference.mixture_backward_ref`
(and ``quantize_ref`` / ``quantize_backward_ref``).

Layout: ``x`` is viewed as ``[C, N]`` (C = channels with ``per_channel``, else 1), contiguous (the op layer,
``autoqnn/ops/_triton.py``, hands a channels-last or permuted x over in memory order, see
``reference.memory_order``).
A 1-D grid of ``C·cdiv(N, BLOCK)`` programs; program ``pid`` handles row ``pid // NBLK``, block
``pid % NBLK`` (a 1-D grid has no 65535 limit on either factor).

Specialisation: the candidate scheme ids ``S0..S7`` (−1 = absent) and their integer bits
``B0..B7`` are ``tl.constexpr``, so every combination compiles its own straight-line kernel
(ResQ's loop over the bits is unrolled). The per-(candidate, row) scales are read from the
``params`` tensor ``[K, C, NUM_PARAMS]`` and the mixture weights from their device tensor: the
launch itself never reads a tensor on the host (the callers read ``bits`` to pick the kernel,
as the reference and the C++ kernels do).

Per-element math mirrors ``csrc/include/autoqnn/scheme_math.h`` (and so the reference):

* compute dtype float32 (fp16/bf16/fp32 input) or float64 (float64 input, supported natively:
  float64 division, a 1.5·2^52 rounding constant and the float64 bit pattern for PotQ);
* division only where the reference divides, unconditional on a safe denominator then a select
  (``_safe_div``), with ``tl.div_rn`` (IEEE round to nearest) in float32;
* round half to even without libdevice: clamp to the integer bounds first, then
  ``(c + 1.5·2^23) − 1.5·2^23`` (exact for |c| < 2^22);
* ZoomQ's floor: clamp to [0, 2^b − 1] then truncate to int (NaN → 0, replaced by NaN later);
* PotQ's level from the float bit pattern (mantissa > 0x3504f3 rounds up, as the reference's
  frexp test), its magnitude 2^l (½ for l = 0) built from exponent bits;
* launched with ``enable_fp_fusion=False``: every product and sum is rounded on its own, as in
  the reference (Triton otherwise contracts ``y + q·w`` and ``min + step·(k + ½)`` into FMAs,
  which moves levels by an ulp).

Backward: one pass over ``x`` and ``grad_y`` gives grad_x = grad_y·(Σ_k w_k·ste_k) (0 at
non-finite x) and, per program, the partial sums ⟨grad_y, q_k⟩ and ⟨grad_y, ∂q_k/∂b⟩ written to a
``[num_programs, 2K]`` buffer that the host reduces with ``torch.sum`` (fixed order, no atomics:
deterministic). Nothing of size K×N is materialised.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "NUM_PARAMS",
    "MAX_CANDIDATES",
    "mixture_fwd",
    "mixture_bwd",
    "quantize_fwd",
    "quantize_bwd",
    "mixture_batched_fwd",
    "mixture_batched_bwd",
    "program_table",
]

NUM_PARAMS = 12  # autoqnn.schemes.NUM_PARAMS (literal: this module does not import autoqnn)
MAX_CANDIDATES = 8
# Bit ranges per scheme id (SPEC decisions; autoqnn.schemes): the launchers check the ints.
_MIN_BITS = (1, 2, 2, 2, 2, 2, 2, 2)
_MAX_BITS = (1, 2, 2, 8, 8, 8, 8, 4)


def _interpret_enabled() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton: the environment variable is the switch
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


#: True when ``@triton.jit`` produced interpreter functions (``TRITON_INTERPRET=1`` when this
#: module was imported): the kernels then run on CPU tensors through NumPy.
INTERPRET = _interpret_enabled()


def _triton_version() -> tuple:
    parts = []
    for tok in triton.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in tok if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


#: Triton before 3.6 compiles ``tl.div_rn`` through libdevice with flush-to-zero forced on
#: (``div.rn.ftz.f32``): a subnormal operand or quotient becomes 0, which changes PotQ's sign of a
#: subnormal x and divides by 0 for a subnormal scale. There the kernels divide with the PTX
#: instruction ``div.rn.f32`` itself (NVIDIA only; the interpreter divides exactly anyway).
_ASM_DIV = tl.constexpr(not INTERPRET and _triton_version() < (3, 6) and torch.version.hip is None)


# ----------------------------------------------------------------------------- per-element math
@triton.jit
def _div_rn_f32(a, b):
    """IEEE float32 a / b, round to nearest, subnormals kept."""
    if _ASM_DIV:
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.div_rn(a, b)


@triton.jit
def _safe_div(a, b, IS64: tl.constexpr):
    """a / b where b > 0, else 0 (``b`` a per-row scalar). Division first, select after."""
    ok = b > 0
    den = tl.where(ok, b, 1.0) + tl.zeros_like(a)
    if IS64:
        v = a / den  # float64 division is IEEE round-to-nearest
    else:
        v = _div_rn_f32(a, den)  # `/` in float32 is an approximate division on GPUs
    return tl.where(ok, v, 0.0)


@triton.jit
def _round_clamped(u, lo, hi, IS64: tl.constexpr):
    """round(clamp(u, lo, hi)) half to even (integer bounds, |bounds| < 2^21); NaN passes."""
    c = tl.where(u < lo, lo, tl.where(u > hi, hi, u))
    if IS64:
        r = (c + 6755399441055744.0) - 6755399441055744.0  # 1.5·2^52
    else:
        r = (c + 12582912.0) - 12582912.0  # 1.5·2^23
    return r


@triton.jit
def _floor_clamped_nonneg(v, top):
    """floor(clamp(v, 0, top)) for top < 2^22; NaN → 0."""
    c = tl.where(v > 0, v, 0.0)
    c = tl.where(c < top, c, top)
    return c.to(tl.int32).to(v.dtype)


@triton.jit
def _sgn(v):
    """+1 for v > 0, −1 otherwise (the paper's binarisation rule)."""
    return tl.where(v > 0, 1.0, -1.0)


@triton.jit
def _sign0(v):
    """torch.sign for non-NaN v (NaN outputs are replaced by the caller)."""
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def _pot_level(a, LMAX: tl.constexpr, IS64: tl.constexpr):
    """l = clip(round(log2 a), 0, LMAX) (int32) from the bit pattern of a ≥ 0; Inf/NaN → LMAX
    (the reference's frexp test, exactly). Non-decreasing in a (the levels kernels rely on it)."""
    if IS64:
        bits = a.to(tl.int64, bitcast=True)
        e = ((bits >> 52) & 0x7FF).to(tl.int32)
        m = bits & 0xFFFFFFFFFFFFF
        lv = e - 1023 + (m >= 0x6A09E667F3BCD).to(tl.int32)
        lv = tl.where(e == 2047, LMAX, lv)
    else:
        bits = a.to(tl.int32, bitcast=True)
        e = (bits >> 23) & 0xFF
        m = bits & 0x7FFFFF
        lv = e - 127 + (m > 0x3504F3).to(tl.int32)
        lv = tl.where(e == 255, LMAX, lv)
    return tl.minimum(tl.maximum(lv, 0), LMAX)


@triton.jit
def _pot_magnitude(a, LMAX: tl.constexpr, IS64: tl.constexpr):
    """2^l (½ for l = 0) with l = ``_pot_level(a)``, built from exponent bits."""
    lv = _pot_level(a, LMAX, IS64)
    if IS64:
        eb = tl.where(lv == 0, 1022, lv + 1023).to(tl.int64)
        mag = (eb << 52).to(tl.float64, bitcast=True)
    else:
        eb = tl.where(lv == 0, 126, lv + 127)
        mag = (eb << 23).to(tl.float32, bitcast=True)
    return mag


@triton.jit
def _eval(x, fin, pp, SID: tl.constexpr, B: tl.constexpr, CB: tl.constexpr,
          IS64: tl.constexpr, NEED_D: tl.constexpr):
    """One candidate on a block: ``(q, keep, d)`` as ``reference.eval_scheme``.

    ``pp`` points at params[k, row, 0]; ``fin`` = isfinite(x); ``keep`` is ClipQ's STE mask
    (``fin`` for the other schemes, unused); ``d`` = ∂q/∂b (zeros unless ``NEED_D``); ``CB`` =
    −ln2·2^b/(2^b − 1).
    """
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    zero = tl.zeros_like(x)
    keep = fin
    d = zero
    if SID == 0:  # binary
        q = tl.load(pp) * _sgn(x)
    elif SID == 1:  # ternary
        t = tl.where(tl.abs(x) > tl.load(pp), _sign0(x), 0.0)
        q = tl.load(pp + 1) * t
    elif SID == 2:  # quaternary
        v = _round_clamped(_safe_div(x, tl.load(pp), IS64), -2.0, 1.0, IS64)
        q = tl.load(pp + 1) * v
    elif SID == 3:  # fixed
        scale = tl.load(pp)
        LIM: tl.constexpr = float(2 ** (B - 1))
        m = _round_clamped(_safe_div(x, scale, IS64), -LIM, LIM - 1.0, IS64)
        q = m * scale
        if NEED_D:
            d = tl.where(scale > 0, tl.full([], CB, CD) * (q - x), 0.0)
    elif SID == 4:  # residual: B greedy binarisations (unrolled)
        r = x
        q = zero
        s_prev = zero
        for i in tl.static_range(B):
            s = tl.load(pp + i) * _sgn(r)
            q = q + s
            r = r - s
            s_prev = s
        if NEED_D:
            d = 0.5 * (s_prev + tl.load(pp + B) * _sgn(r))
    elif SID == 5:  # zoom
        mn = tl.load(pp)
        scale = tl.load(pp + 1)
        TOP: tl.constexpr = float(2 ** B - 1)
        k = _floor_clamped_nonneg(_safe_div(x - mn, scale, IS64), TOP)
        q = mn + scale * (k + 0.5)
        if NEED_D:
            d = tl.where(scale > 0, tl.full([], CB, CD) * (q - x), 0.0)
    elif SID == 6:  # clip (masked STE)
        scale = tl.load(pp)
        LIM: tl.constexpr = float(2 ** (B - 1))
        k = _round_clamped(_safe_div(x, scale, IS64) - 0.5, -LIM, LIM - 1.0, IS64)
        q = scale * (k + 0.5)
        edge = (LIM - 0.5) * scale
        keep = (x >= -edge) & (x <= edge)
        if NEED_D:
            d = tl.where(scale > 0, tl.full([], CB, CD) * (q - x), 0.0)
    else:  # pot
        scale = tl.load(pp)
        u = _safe_div(x, scale, IS64)
        mag = _pot_magnitude(tl.abs(u), 2 ** (B - 1) - 1, IS64)
        q = scale * _sign0(u) * mag
        if NEED_D:
            d = tl.where(scale > 0, tl.full([], CB, CD) * (q - x), 0.0)
    q = tl.where(x != x, x, q)  # NaN propagates
    if NEED_D:
        d = tl.where(fin, d, 0.0)
    return q, keep, d


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _block_of(pid, N, NBLK, tab_ptr, ROFF, RAGGED: tl.constexpr, BLOCK: tl.constexpr):
    """(row, absolute element offsets, in-bounds mask) of program ``pid``. Uniform rows: row
    ``pid // NBLK`` of ``[C, N]``, block ``pid % NBLK``. Ragged rows (the batched ops): the int64
    table ``tab`` holds (row, first element) per program at ``2·pid`` and (end element, first
    program, programs) per row at ``ROFF + 3·row`` (``stats.program_table``)."""
    if RAGGED:
        row = tl.load(tab_ptr + 2 * pid)
        start = tl.load(tab_ptr + 2 * pid + 1)
        end = tl.load(tab_ptr + ROFF + 3 * row)
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < end
    else:
        row = pid // NBLK
        blk = pid - row * NBLK
        rel = blk * BLOCK + tl.arange(0, BLOCK)
        inb = rel < N
        offs = row.to(tl.int64) * N + rel
    return row, offs, inb


@triton.jit
def _fwd_term(x, fin, p_ptr, w_ptr, K_IDX: tl.constexpr, C, row, SID: tl.constexpr,
              B: tl.constexpr, HAS_W: tl.constexpr, IS64: tl.constexpr):
    pp = p_ptr + (K_IDX * C + row).to(tl.int64) * 12  # params[K_IDX, row, :]
    q, keep, d = _eval(x, fin, pp, SID, B, 0.0, IS64, False)
    if HAS_W:
        q = q * tl.load(w_ptr + K_IDX)
    return q


@triton.jit
def _mixture_fwd_kernel(
    x_ptr,  # [C, N] contiguous, x's dtype (ragged: [numel], the rows one after another)
    p_ptr,  # [K, C, NUM_PARAMS] compute dtype
    w_ptr,  # [K] compute dtype (not read without HAS_W); ragged: [C, K], row stride K_W
    y_ptr,  # like x
    N, C, NBLK, K_W,
    tab_ptr, ROFF,  # ragged rows only (_block_of)
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    HAS_W: tl.constexpr, RAGGED: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = Σ_k w_k·q_k(x). RAGGED (the batched op): rows of their own lengths, params and
    weights (row ``row`` of ``[C, K]``); the rows of one launch share their integer bits."""
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    pid = tl.program_id(0)
    row, offs, inb = _block_of(pid, N, NBLK, tab_ptr, ROFF, RAGGED, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(CD)
    fin = tl.abs(x) < float("inf")
    y = _fwd_chain(x, fin, p_ptr, w_ptr + row * K_W, C, row, S0, S1, S2, S3, S4, S5, S6, S7,
                   B0, B1, B2, B3, B4, B5, B6, B7, HAS_W, IS64)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _fwd_chain(x, fin, p_ptr, w_ptr, C, row,
               S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
               S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
               B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
               B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
               HAS_W: tl.constexpr, IS64: tl.constexpr):
    """Σ_k w_k·q_k(x) over the present candidates (S_k ≥ 0), in the reference's accumulation
    order: y = q_0·w_0, then y = y + q_k·w_k."""
    y = _fwd_term(x, fin, p_ptr, w_ptr, 0, C, row, S0, B0, HAS_W, IS64)
    if S1 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 1, C, row, S1, B1, HAS_W, IS64)
    if S2 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 2, C, row, S2, B2, HAS_W, IS64)
    if S3 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 3, C, row, S3, B3, HAS_W, IS64)
    if S4 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 4, C, row, S4, B4, HAS_W, IS64)
    if S5 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 5, C, row, S5, B5, HAS_W, IS64)
    if S6 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 6, C, row, S6, B6, HAS_W, IS64)
    if S7 >= 0:
        y = y + _fwd_term(x, fin, p_ptr, w_ptr, 7, C, row, S7, B7, HAS_W, IS64)
    return y


@triton.jit
def _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, part_ptr, K_IDX: tl.constexpr, C, row,
              SID: tl.constexpr, B: tl.constexpr, CB: tl.constexpr, K: tl.constexpr,
              HAS_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
              IS64: tl.constexpr):
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    pp = p_ptr + (K_IDX * C + row).to(tl.int64) * 12  # params[K_IDX, row, :]
    q, keep, d = _eval(x, fin, pp, SID, B, CB, IS64, NEED_B)
    if HAS_W:
        w = tl.load(w_ptr + K_IDX)
    else:
        w = tl.full([], 1.0, CD)
    if SID == 6:  # masked STE: Σ over the masked candidates, in candidate order
        gmask = gmask + tl.where(keep, w, 0.0)
    else:  # identity STE: Σ w_k as the reference does it (Python floats = float64), in order
        wsum = wsum + w.to(tl.float64)
    if NEED_W:
        tl.store(part_ptr + K_IDX, tl.sum(tl.where(inb, g * q, 0.0), axis=0))
    if NEED_B:
        tl.store(part_ptr + K + K_IDX, tl.sum(tl.where(inb, g * d, 0.0), axis=0))
    return gmask, wsum


@triton.jit
def _mixture_bwd_kernel(
    g_ptr,  # [C, N] contiguous, grad_y's dtype (ragged: [numel])
    x_ptr,  # like g
    p_ptr,  # [K, C, NUM_PARAMS] compute dtype
    w_ptr,  # [K] compute dtype (not read without HAS_W); ragged: [C, K], row stride K_W
    gx_ptr,  # like x
    part_ptr,  # [programs, 2K] compute dtype: per program ⟨g, q_k⟩ (col k), ⟨g, d_k⟩ (col K + k)
    N, C, NBLK, K_W,
    tab_ptr, ROFF,  # ragged rows only (_block_of)
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    CB0: tl.constexpr, CB1: tl.constexpr, CB2: tl.constexpr, CB3: tl.constexpr,
    CB4: tl.constexpr, CB5: tl.constexpr, CB6: tl.constexpr, CB7: tl.constexpr,
    K: tl.constexpr, HAS_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    RAGGED: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr,
):
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    pid = tl.program_id(0)
    row, offs, inb = _block_of(pid, N, NBLK, tab_ptr, ROFF, RAGGED, BLOCK)
    w_ptr = w_ptr + row * K_W
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(CD)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(CD)
    fin = tl.abs(x) < float("inf")
    pp = part_ptr + pid.to(tl.int64) * (2 * K)
    gmask = tl.zeros_like(x)
    wsum = tl.full([], 0.0, tl.float64)
    gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 0, C, row, S0, B0,
                            CB0, K, HAS_W, NEED_W, NEED_B, IS64)
    if S1 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 1, C, row, S1, B1,
                                CB1, K, HAS_W, NEED_W, NEED_B, IS64)
    if S2 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 2, C, row, S2, B2,
                                CB2, K, HAS_W, NEED_W, NEED_B, IS64)
    if S3 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 3, C, row, S3, B3,
                                CB3, K, HAS_W, NEED_W, NEED_B, IS64)
    if S4 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 4, C, row, S4, B4,
                                CB4, K, HAS_W, NEED_W, NEED_B, IS64)
    if S5 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 5, C, row, S5, B5,
                                CB5, K, HAS_W, NEED_W, NEED_B, IS64)
    if S6 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 6, C, row, S6, B6,
                                CB6, K, HAS_W, NEED_W, NEED_B, IS64)
    if S7 >= 0:
        gmask, wsum = _bwd_term(gmask, wsum, x, fin, g, inb, p_ptr, w_ptr, pp, 7, C, row, S7, B7,
                                CB7, K, HAS_W, NEED_W, NEED_B, IS64)
    factor = gmask + wsum.to(CD)  # the reference's `gmask + wsum_identity`
    gx = tl.where(fin, g * factor, 0.0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- host launchers
def _bits_scale_factor(b: int) -> float:
    """−ln2·2^b/(2^b − 1) (SPEC 4.1; autoqnn.schemes.bits_scale_factor)."""
    p = 2.0 ** b
    return -math.log(2.0) * p / (p - 1.0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_geometry(N: int):
    """(BLOCK, NBLK, num_warps): big blocks in the interpreter (its cost is per program)."""
    cap, lowest = (4096, 16) if INTERPRET else (1024, 128)
    block = min(cap, max(lowest, triton.next_power_of_2(max(N, 1))))
    return block, triton.cdiv(N, block), 4


def _check_args(x, params, schemes, bits_int, per_channel):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    K = len(schemes)
    if not 1 <= K <= MAX_CANDIDATES:
        raise ValueError(f"the Triton kernels take 1..{MAX_CANDIDATES} candidates, got {K}")
    if len(bits_int) != K:
        raise ValueError(f"bits has {len(bits_int)} entries for {K} schemes")
    for s, b in zip(schemes, bits_int):
        if not 0 <= int(s) < len(_MIN_BITS):
            raise ValueError(f"unknown scheme id {s}; valid ids are 0..{len(_MIN_BITS) - 1}")
        if not _MIN_BITS[int(s)] <= int(b) <= _MAX_BITS[int(s)]:
            raise ValueError(f"bits={b} is outside the range of scheme id {s}")
    C = int(x.shape[0]) if (per_channel and x.dim() > 0) else 1
    if params.dim() != 3 or tuple(params.shape) != (K, C, NUM_PARAMS):
        raise ValueError(
            f"params must have shape [{K}, {C}, {NUM_PARAMS}] for this input, got {list(params.shape)}"
        )
    N = x.numel() // C if C else 0
    return K, C, N


def _constexprs(schemes: Sequence[int], bits_int: Sequence[int], with_cb: bool) -> dict:
    K = len(schemes)
    kw = {}
    for k in range(MAX_CANDIDATES):
        kw[f"S{k}"] = int(schemes[k]) if k < K else -1
        kw[f"B{k}"] = int(bits_int[k]) if k < K else 1
        if with_cb:
            kw[f"CB{k}"] = _bits_scale_factor(int(bits_int[k])) if k < K else 0.0
    return kw


def _wrap(kernel):
    """``torch.library.wrap_triton(kernel)`` (traceable inside a ``triton_op``); the bare kernel
    on a torch without it."""
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None:
        return kernel
    try:
        return wrap(kernel)
    except RuntimeError as e:  # torch 2.6 refuses the interpreter's kernels (TRITON_INTERPRET=1)
        if "triton.jit" not in str(e):
            raise
        return kernel


def mixture_fwd(
    x: torch.Tensor,
    params: torch.Tensor,
    weights: Optional[torch.Tensor],
    bits_int: Sequence[int],
    schemes: Sequence[int],
    per_channel: bool,
) -> torch.Tensor:
    """y = Σ_k w_k·q_k(x) in x's dtype, contiguous (``weights=None``: one scheme, y = q(x))."""
    K, C, N = _check_args(x, params, schemes, bits_int, per_channel)
    if weights is None and K != 1:
        raise ValueError("weights may only be omitted for a single scheme")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    cd = _compute_dtype(x.dtype)
    x2 = x.detach().contiguous()
    p = params.detach().to(device=x.device, dtype=cd).contiguous()
    w = p if weights is None else weights.detach().to(device=x.device, dtype=cd).reshape(-1).contiguous()
    block, nblk, warps = _launch_geometry(N)
    _wrap(_mixture_fwd_kernel)[(C * nblk,)](
        x2, p, w, y, N, C, nblk, 0, x2, 0,
        **_constexprs(schemes, bits_int, with_cb=False),
        HAS_W=weights is not None, RAGGED=False, IS64=cd == torch.float64, BLOCK=block,
        num_warps=warps, enable_fp_fusion=False,
    )
    return y


def mixture_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    params: torch.Tensor,
    weights: Optional[torch.Tensor],
    bits_int: Sequence[int],
    schemes: Sequence[int],
    per_channel: bool,
    need_weights_grad: bool = True,
    need_bits_grad: bool = True,
):
    """``(grad_x, grad_w, grad_bits)`` of :func:`mixture_fwd`.

    grad_x has x's dtype and shape (contiguous); grad_w = ⟨grad_y, q_k⟩ and grad_bits =
    w_k·⟨grad_y, ∂q_k/∂b⟩ are ``[K]`` tensors in the compute dtype (float32; float64 for float64
    x), ``None`` when not requested (grad_w is always ``None`` without weights); the caller casts
    them to the dtype and shape of its weights/bits.
    """
    K, C, N = _check_args(x, params, schemes, bits_int, per_channel)
    if weights is None and K != 1:
        raise ValueError("weights may only be omitted for a single scheme")
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"grad_y has shape {list(grad_y.shape)}, x has {list(x.shape)}")
    need_w = bool(need_weights_grad) and weights is not None
    need_b = bool(need_bits_grad)
    cd = _compute_dtype(x.dtype)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return (gx, torch.zeros(K, dtype=cd, device=x.device) if need_w else None,
                torch.zeros(K, dtype=cd, device=x.device) if need_b else None)
    x2 = x.detach().contiguous()
    g2 = grad_y.detach().to(x.device).contiguous()
    p = params.detach().to(device=x.device, dtype=cd).contiguous()
    w = p if weights is None else weights.detach().to(device=x.device, dtype=cd).reshape(-1).contiguous()
    block, nblk, warps = _launch_geometry(N)
    nprog = C * nblk
    part = torch.empty((nprog if (need_w or need_b) else 1, 2 * K), dtype=cd, device=x.device)
    _wrap(_mixture_bwd_kernel)[(nprog,)](
        g2, x2, p, w, gx, part, N, C, nblk, 0, x2, 0,
        **_constexprs(schemes, bits_int, with_cb=True),
        K=K, HAS_W=weights is not None, NEED_W=need_w, NEED_B=need_b, RAGGED=False,
        IS64=cd == torch.float64, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
    )
    # deterministic reduction over the programs (fixed shape and order, no atomics)
    gw = part[:, :K].sum(0) if need_w else None
    gb = None
    if need_b:
        gb = part[:, K:].sum(0)
        if weights is not None:
            gb = gb * w
    return gx, gw, gb


def program_table(offsets, block: int, device, rows=None) -> tuple:
    """The ragged-row program table of :func:`_block_of` for rows ``offsets[r]..offsets[r+1]``
    cut into blocks of ``block`` elements: ``(tab int64 tensor, programs, ROFF, most programs of
    one row)``; ``rows``: only these rows get programs (the rest get none). Built on the host
    from the Python ints (one small host-to-device copy)."""
    off = [int(o) for o in offsets]
    R = len(off) - 1
    chosen = set(range(R)) if rows is None else {int(r) for r in rows}
    progs, per_row = [], []
    for r in range(R):
        n = triton.cdiv(off[r + 1] - off[r], block) if r in chosen else 0
        per_row += [off[r + 1], len(progs) // 2, n]
        for j in range(n):
            progs += [r, off[r] + j * block]
    P = len(progs) // 2
    most = max(per_row[2::3], default=0)
    tab = torch.tensor(progs + per_row, dtype=torch.int64).to(device)
    return tab, P, 2 * P, most


def _check_batched(x, offsets, params, weights, bits_rows, schemes):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    K, R = len(schemes), len(offsets) - 1
    if not 1 <= K <= MAX_CANDIDATES:
        raise ValueError(f"the Triton kernels take 1..{MAX_CANDIDATES} candidates, got {K}")
    if tuple(params.shape) != (K, R, NUM_PARAMS):
        raise ValueError(f"params must have shape [{K}, {R}, {NUM_PARAMS}], got {list(params.shape)}")
    if tuple(weights.shape) != (R, K):
        raise ValueError(f"weights must have shape [{R}, {K}], got {list(weights.shape)}")
    if len(bits_rows) != R:
        raise ValueError(f"bits_rows has {len(bits_rows)} rows for {R}")
    probe = x.new_empty(0)
    for row in {tuple(int(b) for b in r) for r in bits_rows}:  # ids and bit ranges, once per distinct row
        _check_args(probe, params[:, :1], schemes, row, False)
    return K, R


def _bits_groups(bits_rows, offsets):
    """Rows grouped by their integer bits (kernels are specialised on them), non-empty rows only,
    groups in order of first appearance."""
    groups: dict = {}
    for r, row in enumerate(bits_rows):
        if int(offsets[r + 1]) > int(offsets[r]):
            groups.setdefault(tuple(int(b) for b in row), []).append(r)
    return groups


@functools.lru_cache(maxsize=256)
def _group_plan(offsets: tuple, block: int, rows: tuple, device: str):
    """A bits group's program table, and for its row sums the ``[rows, most]`` program indices
    (padding -> the extra zero row ``programs``) and the rows as a tensor. Cached: a model's
    weights keep their offsets every step, so the host loop and the copies run once."""
    tab, nprog, roff, most = program_table(offsets, block, device, rows)
    idx, first = [], 0
    for r in rows:
        n = triton.cdiv(offsets[r + 1] - offsets[r], block)
        idx.append(list(range(first, first + n)) + [nprog] * (most - n))
        first += n
    gi = torch.tensor(idx, dtype=torch.int64).to(device)
    return tab, nprog, roff, gi, torch.tensor(rows, dtype=torch.int64).to(device)


def _batched_launch_inputs(x, offsets, params, weights, R):
    """(compute dtype, flat x, params and weights in the compute dtype, BLOCK, warps): one BLOCK
    for every row, from the longest."""
    cd = _compute_dtype(x.dtype)
    x1 = x.detach().contiguous().reshape(-1)
    p = params.detach().to(device=x.device, dtype=cd).contiguous()
    w = weights.detach().to(device=x.device, dtype=cd).contiguous()
    block, _, warps = _launch_geometry(max(int(offsets[r + 1]) - int(offsets[r]) for r in range(R)))
    return cd, x1, p, w, block, warps


def mixture_batched_fwd(x, offsets, params, weights, bits_rows, schemes) -> torch.Tensor:
    """The batched forward: ``x`` flat, row r = ``x[offsets[r]:offsets[r+1]]`` with params
    ``[:, r]``, weights ``[r]`` and integer bits ``bits_rows[r]``. One launch per distinct bits
    row (one in a QSS search, where every tensor has the same bits)."""
    K, R = _check_batched(x, offsets, params, weights, bits_rows, schemes)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0 or R == 0:
        return y
    cd, x1, p, w, block, warps = _batched_launch_inputs(x, offsets, params, weights, R)
    for bits, rows in _bits_groups(bits_rows, offsets).items():
        tab, nprog, roff, _, _ = _group_plan(tuple(int(o) for o in offsets), block, tuple(rows), str(x.device))
        _wrap(_mixture_fwd_kernel)[(nprog,)](
            x1, p, w, y, 0, R, 1, K, tab, roff, **_constexprs(schemes, bits, with_cb=False),
            HAS_W=True, RAGGED=True, IS64=cd == torch.float64, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
        )
    return y


def mixture_batched_bwd(grad_y, x, offsets, params, weights, bits_rows, schemes,
                        need_weights_grad: bool = True, need_bits_grad: bool = True):
    """``(grad_x, grad_w [R, K], grad_bits [R, K])`` of :func:`mixture_batched_fwd`; the row sums
    in the compute dtype (``None`` when not requested), reduced over each row's programs in a
    fixed order (deterministic)."""
    K, R = _check_batched(x, offsets, params, weights, bits_rows, schemes)
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"grad_y has shape {list(grad_y.shape)}, x has {list(x.shape)}")
    need_w, need_b = bool(need_weights_grad), bool(need_bits_grad)
    cd = _compute_dtype(x.dtype)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sums = torch.zeros((R, 2 * K), dtype=cd, device=x.device)
    if x.numel() > 0 and R > 0:
        cd, x1, p, w, block, warps = _batched_launch_inputs(x, offsets, params, weights, R)
        g1 = grad_y.detach().to(x.device).contiguous().reshape(-1)
        for bits, rows in _bits_groups(bits_rows, offsets).items():
            tab, nprog, roff, gi, rows_t = _group_plan(tuple(int(o) for o in offsets), block, tuple(rows),
                                                       str(x.device))
            part = torch.zeros((nprog + 1, 2 * K), dtype=cd, device=x.device)  # last row: padding
            _wrap(_mixture_bwd_kernel)[(nprog,)](
                g1, x1, p, w, gx, part, 0, R, 1, K, tab, roff, **_constexprs(schemes, bits, with_cb=True),
                K=K, HAS_W=True, NEED_W=need_w, NEED_B=need_b, RAGGED=True, IS64=cd == torch.float64,
                BLOCK=block, num_warps=warps, enable_fp_fusion=False,
            )
            # each row's programs are consecutive: gathered into [rows, most] (padding -> the zero
            # row) and summed in program order
            sums[rows_t] = part[gi].sum(1)
    gw = sums[:, :K] if need_w else None
    gb = None
    if need_b:
        gb = sums[:, K:] * weights.detach().to(device=x.device, dtype=cd)
    return gx, gw, gb


def quantize_fwd(x, params, bit: int, scheme: int, per_channel: bool) -> torch.Tensor:
    """q(x) for one scheme (``params`` ``[1, C, NUM_PARAMS]``)."""
    return mixture_fwd(x, params, None, [int(bit)], [int(scheme)], per_channel)


def quantize_bwd(grad_y, x, params, bit: int, scheme: int, per_channel: bool,
                 need_bits_grad: bool = True):
    """``(grad_x, grad_bits)`` for one scheme: grad_x = mask·grad_y; grad_bits is ``[1]`` in the
    compute dtype, or ``None`` when not requested."""
    gx, _, gb = mixture_bwd(grad_y, x, params, None, [int(bit)], [int(scheme)], per_channel,
                            False, need_bits_grad)
    return gx, gb
