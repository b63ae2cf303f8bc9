# SPDX-License-Identifier: MIT
"""Levels-table output pass of the mixture (Triton): the same results as
:func:`autoqnn.triton_kernels.mixture.mixture_fwd` / ``mixture_bwd``, bit for bit, with one
table search per element instead of evaluating every candidate scheme.

Why: on a GPU the arithmetic output kernels are instruction-bound (about 230 instructions per
element for the eight candidates), far from the memory bandwidth the issue asks for. Every
candidate's q_k(x), its STE mask and ResQ's ∂q/∂b are step functions of x, so the mixture is one
too. Per row, with a sorted table T of every candidate's steps, the element's segment
``i = #{t ∈ T[0..P−2] : t ≤ x}`` (a branchless binary search, log2 P loads of a table that stays
in L1) picks precomputed values: y = Y[i], the grad_x factor F[i], q_k = Q_k[i] and ResQ's D_k[i].
The scale schemes' ∂q/∂b = cb·(q − x) is recomputed from q and x.

How the table is made exact (one launch for the tables of all rows, one program per row, then
the output pass):

1. **Steps**: each scheme has an integer *code* that is non-decreasing in x
   and computed with exactly the float operations of ``mixture._eval`` (FixedQ's rounded
   multiple, ZoomQ's floor, ClipQ's multiple and its zone against the clip edge, PotQ's signed
   level, ResQ's sign bits in order, which are lexicographically monotone even where ResQ's
   value is not). Threshold j of a code c is ``min{x : c(x) > j}``, found by bisection over
   the float32 order (32 halvings between −Inf and +Inf). Between two consecutive thresholds
   of all the codes, every code is constant, so every tabulated quantity is.
   Codes that no x reaches give duplicate thresholds, i.e. empty segments: harmless.
   Two sentinels are added: −FLT_MAX (so that −Inf has a segment of its own) and +Inf (so has
   +Inf); the table is padded to a power of two P with +Inf.
2. **Sort**: the slots form sorted runs (a code's thresholds do not decrease with j); a stable
   merge ranks each slot by its index in its run plus binary-searched bounds in the other runs
   (O(P·runs·log P)), scattered: deterministic.
3. **Values**: every segment's representative (its lower threshold; −Inf
   for segment 0) goes through the arithmetic kernels' own functions (``_fwd_chain``, ``_eval``),
   so a looked-up value is the value the arithmetic kernel computes for any x of the segment.
4. **Lookup** (the output pass itself): forward or backward over x.

The backward's per-program partial sums use the arithmetic kernel's BLOCK and the same
per-element terms, so even ⟨g, q_k⟩ and ⟨g, ∂q_k/∂b⟩ are the same bit for bit.

Scope: float32, float16 and bfloat16 inputs (float32 math), per tensor or per channel (one table
per row). float64 inputs keep the arithmetic kernels (``eligible``). Which path a call takes is
decided by :func:`choose` (``AUTOQNN_TRITON_LEVELS``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .mixture import (
    MAX_CANDIDATES,
    _block_of,
    _check_args,
    _compute_dtype,
    _constexprs,
    _eval,
    _floor_clamped_nonneg,
    _fwd_chain,
    _launch_geometry,
    _pot_level,
    _round_clamped,
    _safe_div,
    _sgn,
    _wrap,
)

__all__ = ["ENV", "choose", "eligible", "plan", "build_tables", "mixture_fwd_levels", "mixture_bwd_levels"]

ENV = "AUTOQNN_TRITON_LEVELS"
#: with ``AUTOQNN_TRITON_LEVELS=auto``: the least elements per row for the levels path (the table
#: costs three small launches and O(P²) comparisons per row; it pays only on long rows)
AUTO_MIN_ROW = 1 << 16

_KEY_POS_INF = tl.constexpr(0x7F800000)  # float32 bit patterns as keys ordered like the floats
_KEY_NEG_INF = tl.constexpr(-0x7F800000 - 1)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


# ----------------------------------------------------------------------------- codes
@triton.jit
def _key_to_f32(k):
    """int64 key → float32 (keys ≥ 0: the bit pattern; −1 − k: the pattern of −value)."""
    b = tl.where(k >= 0, k, (-(k + 1)) + 2147483648)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _code(x, pp, SID: tl.constexpr, B: tl.constexpr, PART: tl.constexpr):
    """The integer code of one scheme (int32, non-decreasing in x for non-NaN x), with the float
    operations of ``mixture._eval``: q, the STE mask and ResQ's ∂q/∂b are functions of it.
    ``PART`` 1 is ClipQ's zone against its clip edge (0 below, 1 inside, 2 above)."""
    if SID == 0:  # binary: sgn(x)
        c = (x > 0).to(tl.int32)
    elif SID == 1:  # ternary: |x| > Δ ? sign(x) : 0
        t = tl.where(x > 0, 2, tl.where(x < 0, 0, 1))
        c = tl.where(tl.abs(x) > tl.load(pp), t, 1)
    elif SID == 2:  # quaternary
        v = _round_clamped(_safe_div(x, tl.load(pp), False), -2.0, 1.0, False)
        c = v.to(tl.int32) + 2
    elif SID == 3:  # fixed
        LIM: tl.constexpr = float(2 ** (B - 1))
        m = _round_clamped(_safe_div(x, tl.load(pp), False), -LIM, LIM - 1.0, False)
        c = m.to(tl.int32) + 2 ** (B - 1)
    elif SID == 4:  # residual: the signs in order, then the sign of the last residual
        r = x
        c = tl.zeros(x.shape, tl.int32)
        for i in tl.static_range(B):
            sg = _sgn(r)
            s = tl.load(pp + i) * sg
            r = r - s
            c = c * 2 + (sg > 0).to(tl.int32)
        c = c * 2 + (r > 0).to(tl.int32)
    elif SID == 5:  # zoom
        TOP: tl.constexpr = float(2 ** B - 1)
        k = _floor_clamped_nonneg(_safe_div(x - tl.load(pp), tl.load(pp + 1), False), TOP)
        c = k.to(tl.int32)
    elif SID == 6:  # clip
        scale = tl.load(pp)
        LIM: tl.constexpr = float(2 ** (B - 1))
        if PART == 0:
            k = _round_clamped(_safe_div(x, scale, False) - 0.5, -LIM, LIM - 1.0, False)
            c = k.to(tl.int32) + 2 ** (B - 1)
        else:
            edge = (LIM - 0.5) * scale
            c = (x >= -edge).to(tl.int32) + (x > edge).to(tl.int32)
    else:  # pot: sign of u = x/scale, then its level (mirrored below zero)
        LMAX: tl.constexpr = 2 ** (B - 1) - 1
        u = _safe_div(x, tl.load(pp), False)
        lv = _pot_level(tl.abs(u), LMAX, False)
        c = tl.where(u > 0, LMAX + 2 + lv, tl.where(u < 0, LMAX - lv, LMAX + 1))
    return c


@triton.jit
def _group_thresholds(u_row, pp, SID: tl.constexpr, B: tl.constexpr, PART: tl.constexpr,
                      OFF: tl.constexpr, NT: tl.constexpr, NTP: tl.constexpr):
    """Thresholds t_j = min{x : c(x) > j}, j < NT, into ``u_row[OFF + j]``: −Inf when c(−Inf) > j,
    +Inf when no x has c(x) > j, else by bisection on the keys (c(lo) ≤ j < c(hi))."""
    j = tl.arange(0, NTP)
    ok = j < NT
    lo = tl.full([NTP], _KEY_NEG_INF, tl.int64)
    hi = tl.full([NTP], _KEY_POS_INF, tl.int64)
    below = _code(_key_to_f32(lo), pp, SID, B, PART) > j
    none = _code(_key_to_f32(hi), pp, SID, B, PART) <= j
    for _ in range(32):  # hi − lo < 2^32
        mid = lo + ((hi - lo) >> 1)
        up = _code(_key_to_f32(mid), pp, SID, B, PART) > j
        hi = tl.where(up, mid, hi)
        lo = tl.where(up, lo, mid)
    t = _key_to_f32(hi)
    t = tl.where(below, float("-inf"), tl.where(none, float("inf"), t))
    tl.store(u_row + OFF + j, t, mask=ok)


@triton.jit
def _cand_thresholds(u_row, p_ptr, K_IDX: tl.constexpr, C, row, SID: tl.constexpr, B: tl.constexpr,
                     OFF: tl.constexpr, NT: tl.constexpr, NTP: tl.constexpr):
    pp = p_ptr + (K_IDX * C + row).to(tl.int64) * 12  # params[K_IDX, row, :]
    _group_thresholds(u_row, pp, SID, B, 0, OFF, NT, NTP)
    if SID == 6:  # ClipQ's mask edges: two more thresholds after the multiples'
        _group_thresholds(u_row, pp, SID, B, 1, OFF + NT, 2, 2)


@triton.jit
def _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, K_IDX: tl.constexpr, C, row,
              SID: tl.constexpr, B: tl.constexpr, CB: tl.constexpr, K: tl.constexpr,
              HAS_W: tl.constexpr, P: tl.constexpr, i):
    pp = p_ptr + (K_IDX * C + row).to(tl.int64) * 12
    q, keep, d = _eval(rep, fin, pp, SID, B, CB, False, True)
    if HAS_W:
        w = tl.load(w_ptr + K_IDX)
    else:
        w = tl.full([], 1.0, tl.float32)
    if SID == 6:  # as mixture._bwd_term
        gmask = gmask + tl.where(keep, w, 0.0)
    else:
        wsum = wsum + w.to(tl.float64)
    tl.store(v_row + (2 + K_IDX) * P + i, q, mask=ok)
    tl.store(v_row + (2 + K + K_IDX) * P + i, d, mask=ok)
    return gmask, wsum


@triton.jit
def _run_rank(ui, i, u_row, START: tl.constexpr, LEN: tl.constexpr, LOG2P: tl.constexpr):
    """One sorted run's share of the merged rank of slots ``i`` (values ``ui``): the run's values
    <= u_i for slots after the run, < u_i for slots before it, the slot's index within the run for
    its own slots (a stable merge: ties in run order, a permutation)."""
    le = tl.zeros(i.shape, tl.int32)
    lt = tl.zeros(i.shape, tl.int32)
    for s in tl.static_range(LOG2P):
        c_le = le + (1 << (LOG2P - 1 - s))
        c_lt = lt + (1 << (LOG2P - 1 - s))
        v_le = tl.load(u_row + START + c_le - 1, mask=c_le <= LEN, other=float("inf"))
        v_lt = tl.load(u_row + START + c_lt - 1, mask=c_lt <= LEN, other=float("inf"))
        le = tl.where((c_le <= LEN) & (v_le <= ui), c_le, le)
        lt = tl.where((c_lt <= LEN) & (v_lt < ui), c_lt, lt)
    return tl.where(i >= START + LEN, le, tl.where(i < START, lt, i - START))


@triton.jit
def _cand_rank(ui, i, u_row, SID: tl.constexpr, OFF: tl.constexpr, NT: tl.constexpr, LOG2P: tl.constexpr):
    r = _run_rank(ui, i, u_row, OFF, NT, LOG2P)
    if SID == 6:  # ClipQ's two edges: a run of their own
        r += _run_rank(ui, i, u_row, OFF + NT, 2, LOG2P)
    return r


@triton.jit
def _levels_build_kernel(
    p_ptr,  # [K, C, NUM_PARAMS] float32
    w_ptr,  # [K] float32 (not read without HAS_W)
    u_ptr,  # [C, P] float32 scratch: the thresholds in slot order
    t_ptr,  # [C, P] float32: the sorted thresholds
    v_ptr,  # [C, 2 + 2K, P] float32: Y, F, Q_0..Q_{K−1}, D_0..D_{K−1}
    C,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
    B4: tl.constexpr, B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr,
    CB0: tl.constexpr, CB1: tl.constexpr, CB2: tl.constexpr, CB3: tl.constexpr,
    CB4: tl.constexpr, CB5: tl.constexpr, CB6: tl.constexpr, CB7: tl.constexpr,
    O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr,
    O4: tl.constexpr, O5: tl.constexpr, O6: tl.constexpr, O7: tl.constexpr,
    N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
    N4: tl.constexpr, N5: tl.constexpr, N6: tl.constexpr, N7: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
    T4: tl.constexpr, T5: tl.constexpr, T6: tl.constexpr, T7: tl.constexpr,
    K: tl.constexpr, HAS_W: tl.constexpr, NREAL: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr,
):
    """One program per row: (1) every candidate's thresholds, the sentinels and the +Inf
    padding, in slot order; (2) a stable merge of the sorted runs (each candidate's thresholds,
    ClipQ's edges, the sentinels with the padding) into ``t``; (3) each segment's values at its
    representative: −Inf for segment 0, else its lower threshold."""
    row = tl.program_id(0)
    u_row = u_ptr + row.to(tl.int64) * P
    _cand_thresholds(u_row, p_ptr, 0, C, row, S0, B0, O0, N0, T0)
    if S1 >= 0:
        _cand_thresholds(u_row, p_ptr, 1, C, row, S1, B1, O1, N1, T1)
    if S2 >= 0:
        _cand_thresholds(u_row, p_ptr, 2, C, row, S2, B2, O2, N2, T2)
    if S3 >= 0:
        _cand_thresholds(u_row, p_ptr, 3, C, row, S3, B3, O3, N3, T3)
    if S4 >= 0:
        _cand_thresholds(u_row, p_ptr, 4, C, row, S4, B4, O4, N4, T4)
    if S5 >= 0:
        _cand_thresholds(u_row, p_ptr, 5, C, row, S5, B5, O5, N5, T5)
    if S6 >= 0:
        _cand_thresholds(u_row, p_ptr, 6, C, row, S6, B6, O6, N6, T6)
    if S7 >= 0:
        _cand_thresholds(u_row, p_ptr, 7, C, row, S7, B7, O7, N7, T7)
    i = tl.arange(0, P)
    tl.store(u_row + i, tl.where(i == NREAL - 2, -_FLT_MAX, float("inf")), mask=i >= NREAL - 2)
    tl.debug_barrier()  # the slots are written by other threads of this program
    ui = tl.load(u_row + i)
    rank = _run_rank(ui, i, u_row, NREAL - 2, P - (NREAL - 2), LOG2P)
    rank += _cand_rank(ui, i, u_row, S0, O0, N0, LOG2P)
    if S1 >= 0:
        rank += _cand_rank(ui, i, u_row, S1, O1, N1, LOG2P)
    if S2 >= 0:
        rank += _cand_rank(ui, i, u_row, S2, O2, N2, LOG2P)
    if S3 >= 0:
        rank += _cand_rank(ui, i, u_row, S3, O3, N3, LOG2P)
    if S4 >= 0:
        rank += _cand_rank(ui, i, u_row, S4, O4, N4, LOG2P)
    if S5 >= 0:
        rank += _cand_rank(ui, i, u_row, S5, O5, N5, LOG2P)
    if S6 >= 0:
        rank += _cand_rank(ui, i, u_row, S6, O6, N6, LOG2P)
    if S7 >= 0:
        rank += _cand_rank(ui, i, u_row, S7, O7, N7, LOG2P)
    t_row = t_ptr + row.to(tl.int64) * P
    tl.store(t_row + rank, ui)
    tl.debug_barrier()
    ok = i < P
    rep = tl.load(t_row + i - 1, mask=i > 0, other=float("-inf"))
    fin = tl.abs(rep) < float("inf")
    v_row = v_ptr + row.to(tl.int64) * ((2 + 2 * K) * P)
    y = _fwd_chain(rep, fin, p_ptr, w_ptr, C, row, S0, S1, S2, S3, S4, S5, S6, S7,
                   B0, B1, B2, B3, B4, B5, B6, B7, HAS_W, False)
    tl.store(v_row + i, y)
    gmask = tl.zeros_like(rep)
    wsum = tl.full([], 0.0, tl.float64)
    gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 0, C, row, S0, B0, CB0, K, HAS_W, P, i)
    if S1 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 1, C, row, S1, B1, CB1, K, HAS_W, P, i)
    if S2 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 2, C, row, S2, B2, CB2, K, HAS_W, P, i)
    if S3 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 3, C, row, S3, B3, CB3, K, HAS_W, P, i)
    if S4 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 4, C, row, S4, B4, CB4, K, HAS_W, P, i)
    if S5 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 5, C, row, S5, B5, CB5, K, HAS_W, P, i)
    if S6 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 6, C, row, S6, B6, CB6, K, HAS_W, P, i)
    if S7 >= 0:
        gmask, wsum = _val_term(gmask, wsum, rep, fin, ok, p_ptr, w_ptr, v_row, 7, C, row, S7, B7, CB7, K, HAS_W, P, i)
    tl.store(v_row + P + i, gmask + wsum.to(tl.float32))  # mixture._mixture_bwd_kernel's factor


# ----------------------------------------------------------------------------- lookup kernels
@triton.jit
def _segment(t_row, x, LOG2P: tl.constexpr):
    """#{t ∈ t_row[0..P−2] : t ≤ x} for sorted t (branchless; NaN x → 0)."""
    pos = tl.zeros(x.shape, tl.int32)
    for s in tl.static_range(LOG2P):
        t = tl.load(t_row + pos + ((1 << (LOG2P - 1 - s)) - 1))
        pos = tl.where(t <= x, pos + (1 << (LOG2P - 1 - s)), pos)
    return pos


@triton.jit
def _levels_fwd_kernel(x_ptr, t_ptr, v_ptr, y_ptr, N, NBLK, K: tl.constexpr, P: tl.constexpr,
                       LOG2P: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row, offs, inb = _block_of(pid, N, NBLK, x_ptr, 0, False, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    pos = _segment(t_ptr + row.to(tl.int64) * P, x, LOG2P)
    y = tl.load(v_ptr + row.to(tl.int64) * ((2 + 2 * K) * P) + pos)
    y = tl.where(x != x, x, y)  # NaN propagates
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, part_ptr, K_IDX: tl.constexpr, C, row,
               SID: tl.constexpr, CB: tl.constexpr, K: tl.constexpr, NEED_W: tl.constexpr,
               NEED_B: tl.constexpr, P: tl.constexpr):
    q = tl.load(v_row + (2 + K_IDX) * P + pos)
    if NEED_B:
        if SID == 4:  # ResQ: ∂q/∂b is a step function too
            d = tl.load(v_row + (2 + K + K_IDX) * P + pos)
        elif SID >= 3:  # the scale schemes: cb·(q − x), as mixture._eval
            pp = p_ptr + (K_IDX * C + row).to(tl.int64) * 12
            if SID == 5:
                scale = tl.load(pp + 1)
            else:
                scale = tl.load(pp)
            d = tl.where(scale > 0, tl.full([], CB, tl.float32) * (q - x), 0.0)
        else:
            d = tl.zeros_like(x)
        d = tl.where(fin, d, 0.0)
        tl.store(part_ptr + K + K_IDX, tl.sum(tl.where(inb, g * d, 0.0), axis=0))
    if NEED_W:
        q = tl.where(x != x, x, q)
        tl.store(part_ptr + K_IDX, tl.sum(tl.where(inb, g * q, 0.0), axis=0))


@triton.jit
def _levels_bwd_kernel(
    g_ptr, x_ptr, t_ptr, v_ptr, p_ptr, gx_ptr, part_ptr, N, C, NBLK,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
    CB0: tl.constexpr, CB1: tl.constexpr, CB2: tl.constexpr, CB3: tl.constexpr,
    CB4: tl.constexpr, CB5: tl.constexpr, CB6: tl.constexpr, CB7: tl.constexpr,
    K: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, P: tl.constexpr,
    LOG2P: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row, offs, inb = _block_of(pid, N, NBLK, x_ptr, 0, False, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    fin = tl.abs(x) < float("inf")
    pos = _segment(t_ptr + row.to(tl.int64) * P, x, LOG2P)
    v_row = v_ptr + row.to(tl.int64) * ((2 + 2 * K) * P)
    factor = tl.load(v_row + P + pos)
    gx = tl.where(fin, g * factor, 0.0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=inb)
    if NEED_W or NEED_B:
        pp = part_ptr + pid.to(tl.int64) * (2 * K)
        _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 0, C, row, S0, CB0, K, NEED_W, NEED_B, P)
        if S1 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 1, C, row, S1, CB1, K, NEED_W, NEED_B, P)
        if S2 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 2, C, row, S2, CB2, K, NEED_W, NEED_B, P)
        if S3 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 3, C, row, S3, CB3, K, NEED_W, NEED_B, P)
        if S4 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 4, C, row, S4, CB4, K, NEED_W, NEED_B, P)
        if S5 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 5, C, row, S5, CB5, K, NEED_W, NEED_B, P)
        if S6 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 6, C, row, S6, CB6, K, NEED_W, NEED_B, P)
        if S7 >= 0:
            _lbwd_term(x, fin, g, inb, pos, v_row, p_ptr, pp, 7, C, row, S7, CB7, K, NEED_W, NEED_B, P)


# ----------------------------------------------------------------------------- host side
def _thresholds_of(sid: int, b: int) -> tuple:
    """(NT, NTP): one scheme's code thresholds and their power-of-two block (ClipQ's two edge
    thresholds come on top of NT)."""
    nt = {0: 1, 1: 2, 2: 3, 3: 2 ** b - 1, 4: 2 ** (b + 1) - 1, 5: 2 ** b - 1, 6: 2 ** b - 1,
          7: 2 ** b}[sid]
    return nt, max(2, triton.next_power_of_2(nt))


def plan(schemes: Sequence[int], bits_int: Sequence[int]) -> dict:
    """Table layout for these candidates at these integer bits: per candidate its threshold offset
    and count, the real threshold count (with the two sentinels) and P (a power of two with room
    for one +Inf pad at least)."""
    kw, off = {}, 0
    for k in range(MAX_CANDIDATES):
        if k < len(schemes):
            nt, ntp = _thresholds_of(int(schemes[k]), int(bits_int[k]))
            kw[f"O{k}"], kw[f"N{k}"], kw[f"T{k}"] = off, nt, ntp
            off += nt + (2 if int(schemes[k]) == 6 else 0)
        else:
            kw[f"O{k}"], kw[f"N{k}"], kw[f"T{k}"] = 0, 1, 2
    nreal = off + 2
    return {"consts": kw, "NREAL": nreal, "P": triton.next_power_of_2(nreal + 1)}


def eligible(x: torch.Tensor) -> bool:
    """The levels kernels take float32/float16/bfloat16 inputs (float32 math)."""
    return _compute_dtype(x.dtype) == torch.float32


def choose(x: torch.Tensor, C: int, method: Optional[str] = None) -> bool:
    """Whether a call takes the levels path. ``method``: ``"levels"`` (an error for an input that
    is not :func:`eligible`) or ``"arith"``; ``None`` reads ``AUTOQNN_TRITON_LEVELS``: ``0``
    (default: the arithmetic kernels), ``1`` (levels for every eligible input, the arithmetic
    kernels for the rest) or ``auto`` (levels for eligible inputs whose rows have at least
    ``AUTO_MIN_ROW`` elements)."""
    if method is None:
        env = os.environ.get(ENV, "0").strip().lower()
        if env in ("", "0", "off", "false", "no"):
            return False
        if env in ("1", "on", "true", "yes"):
            return eligible(x)
        if env == "auto":
            return eligible(x) and x.numel() // max(int(C), 1) >= AUTO_MIN_ROW
        raise ValueError(f"{ENV} must be 0, 1 or auto, got {env!r}")
    if method == "arith":
        return False
    if method != "levels":
        raise ValueError(f"method must be 'levels' or 'arith', got {method!r}")
    if not eligible(x):
        raise ValueError(f"the levels kernels take float32/float16/bfloat16 inputs, got {x.dtype}")
    return True


def build_tables(params: torch.Tensor, weights: Optional[torch.Tensor], bits_int: Sequence[int],
                 schemes: Sequence[int], C: int, device) -> tuple:
    """``(T [C, P], V [C, 2 + 2K, P], P)`` for float32 ``params`` ``[K, C, NUM_PARAMS]`` and
    ``weights`` ``[K]`` (``None``: one scheme, unweighted) on ``device``."""
    K = len(schemes)
    pl = plan(schemes, bits_int)
    P = pl["P"]
    p = params.detach().to(device=device, dtype=torch.float32).contiguous()
    w = p if weights is None else weights.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    u = torch.empty((C, P), dtype=torch.float32, device=device)
    t = torch.empty((C, P), dtype=torch.float32, device=device)
    v = torch.empty((C, 2 + 2 * K, P), dtype=torch.float32, device=device)
    _wrap(_levels_build_kernel)[(C,)](
        p, w, u, t, v, C, **_constexprs(schemes, bits_int, with_cb=True), **pl["consts"], K=K,
        HAS_W=weights is not None, NREAL=pl["NREAL"], P=P, LOG2P=P.bit_length() - 1,
        num_warps=4 if P <= 256 else 8, enable_fp_fusion=False,
    )
    return t, v, P


def mixture_fwd_levels(x, params, weights, bits_int, schemes, per_channel) -> torch.Tensor:
    """:func:`mixture.mixture_fwd` through the levels table (same arguments, same result)."""
    K, C, N = _check_args(x, params, schemes, bits_int, per_channel)
    if weights is None and K != 1:
        raise ValueError("weights may only be omitted for a single scheme")
    if not eligible(x):
        raise ValueError(f"the levels kernels take float32/float16/bfloat16 inputs, got {x.dtype}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    t, v, P = build_tables(params, weights, bits_int, schemes, C, x.device)
    x2 = x.detach().contiguous()
    block, nblk, warps = _launch_geometry(N)
    _wrap(_levels_fwd_kernel)[(C * nblk,)](x2, t, v, y, N, nblk, K=K, P=P, LOG2P=P.bit_length() - 1,
                                           BLOCK=block, num_warps=warps)
    return y


def mixture_bwd_levels(grad_y, x, params, weights, bits_int, schemes, per_channel,
                       need_weights_grad: bool = True, need_bits_grad: bool = True):
    """:func:`mixture.mixture_bwd` through the levels table (same arguments, same results)."""
    K, C, N = _check_args(x, params, schemes, bits_int, per_channel)
    if weights is None and K != 1:
        raise ValueError("weights may only be omitted for a single scheme")
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"grad_y has shape {list(grad_y.shape)}, x has {list(x.shape)}")
    if not eligible(x):
        raise ValueError(f"the levels kernels take float32/float16/bfloat16 inputs, got {x.dtype}")
    need_w = bool(need_weights_grad) and weights is not None
    need_b = bool(need_bits_grad)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        z = torch.zeros(K, dtype=torch.float32, device=x.device)
        return gx, z if need_w else None, z.clone() if need_b else None
    t, v, P = build_tables(params, weights, bits_int, schemes, C, x.device)
    x2 = x.detach().contiguous()
    g2 = grad_y.detach().to(x.device).contiguous()
    p = params.detach().to(device=x.device, dtype=torch.float32).contiguous()
    block, nblk, warps = _launch_geometry(N)
    nprog = C * nblk
    part = torch.empty((nprog if (need_w or need_b) else 1, 2 * K), dtype=torch.float32, device=x.device)
    sk = _constexprs(schemes, bits_int, with_cb=True)
    _wrap(_levels_bwd_kernel)[(nprog,)](
        g2, x2, t, v, p, gx, part, N, C, nblk,
        **{k: v_ for k, v_ in sk.items() if not k.startswith("B")},
        K=K, NEED_W=need_w, NEED_B=need_b, P=P, LOG2P=P.bit_length() - 1, BLOCK=block,
        num_warps=warps, enable_fp_fusion=False,
    )
    gw = part[:, :K].sum(0) if need_w else None
    gb = None
    if need_b:
        gb = part[:, K:].sum(0)
        if weights is not None:
            gb = gb * weights.detach().to(device=x.device, dtype=torch.float32).reshape(-1)
    return gx, gw, gb
