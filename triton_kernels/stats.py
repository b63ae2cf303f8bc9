# SPDX-License-Identifier: MIT
"""Triton statistics passes of the AutoQNN quantizers (KERNELS.md "Which statistics each scheme
needs"): the reductions behind ``autoqnn::tensor_stats`` and ``autoqnn::scheme_params``.

Layout and grid as in :mod:`.mixture`: ``x`` viewed as ``[C, N]`` (C = channels with
``per_channel``, else 1), contiguous; program ``pid`` reduces row ``pid // NBLK``, block
``pid % NBLK``, and writes its partial results to a ``[C·NBLK, S]`` float64 buffer that the host
reduces over the blocks in a fixed order (``torch.sum``/``amin``/``amax``: deterministic, no
atomics). Non-finite elements are excluded everywhere (robustness policy).

* :func:`row_stats` (pass 1, one read): count of finite, Σ|x|, Σx, Σx², min, max, max|x|.
* :func:`dependent_sums` (pass q ≥ 2, one read each, needing earlier passes' per-row values):
  Σ(x − mean)² (σ, two-pass like ``torch.std``), Ternary's Σ|x| and count over |x| > Δ,
  Quaternary's Σx·v and Σv² with v = clamp(round(x/s), −2, 1), and ResQ's Σ|r_q| where
  |r_1| = |x| and |r_{i+1}| = | |r_i| − α_i | (the chain is recomputed from x in registers, so
  nothing but x is read).

Element math is done in the compute dtype (float32; float64 for float64 inputs) exactly as the
reference and the C++ kernels do (differences, products, comparisons); only the accumulation is
in float64. The per-row values a pass compares against come in a small ``[C, 16]`` tensor
(mean, Δ, s, α_1..α_9) in the compute dtype. This module does not import autoqnn: the scheme
logic that chains the passes lives in ``autoqnn/ops/_triton.py``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .mixture import _block_of, _launch_geometry, _round_clamped, _safe_div, _wrap, program_table

__all__ = ["row_stats", "dependent_sums", "scheme_params_chain", "scheme_params_chain_batched", "program_table", "ROW_SLOTS", "NUM_STATS", "NUM_DEP"]

NUM_STATS = 7  # n, Σ|x|, Σx, Σx², min, max, max|x|
NUM_DEP = 6  # Σ(x−mean)², ternary Σ|x|, ternary count, quaternary Σx·v, Σv², residual Σ|r_q|
ROW_SLOTS = 16  # per-row inputs of a dependent pass: mean, delta, s_quat, alpha_1..alpha_9, (pad)
MAX_RES_STEPS = 8  # ResQ b <= 8: alpha_{b+1} needs b chain steps


@triton.jit
def _load_block(x_ptr, N, NBLK, tab_ptr, ROFF, RAGGED: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (pid, row, x, finite mask, x with non-finite -> 0, |that|)."""
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    pid = tl.program_id(0)
    row, offs, inb = _block_of(pid, N, NBLK, tab_ptr, ROFF, RAGGED, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(CD)
    fin = inb & (tl.abs(x) < float("inf"))
    xf = tl.where(fin, x, 0.0)
    return pid, row, x, fin, xf, tl.abs(xf)


@triton.jit
def _stats_kernel(
    x_ptr,  # [C, N] contiguous, x's dtype
    part_ptr,  # [C * NBLK, 7] float64
    N, NBLK,
    tab_ptr, ROFF,  # ragged rows only (see _block_of)
    RAGGED: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, row, x, fin, xf, ax = _load_block(x_ptr, N, NBLK, tab_ptr, ROFF, RAGGED, IS64, BLOCK)
    xd = xf.to(tl.float64)
    out = part_ptr + pid.to(tl.int64) * 7
    tl.store(out + 0, tl.sum(fin.to(tl.float64), axis=0))
    tl.store(out + 1, tl.sum(ax.to(tl.float64), axis=0))
    tl.store(out + 2, tl.sum(xd, axis=0))
    tl.store(out + 3, tl.sum(xd * xd, axis=0))
    tl.store(out + 4, tl.min(tl.where(fin, x, float("inf")), axis=0).to(tl.float64))
    tl.store(out + 5, tl.max(tl.where(fin, x, -float("inf")), axis=0).to(tl.float64))
    tl.store(out + 6, tl.max(ax, axis=0).to(tl.float64))


@triton.jit
def _dep_kernel(
    x_ptr,  # [C, N] contiguous, x's dtype
    rp_ptr,  # [C, 16] compute dtype: mean, delta, s_quat, alpha_1..alpha_9
    part_ptr,  # [C * NBLK, 6] float64
    N, NBLK,
    tab_ptr, ROFF,  # ragged rows only (see _block_of)
    VAR: tl.constexpr, TER: tl.constexpr, QUAT: tl.constexpr, RES: tl.constexpr,
    RAGGED: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, row, x, fin, xf, ax = _load_block(x_ptr, N, NBLK, tab_ptr, ROFF, RAGGED, IS64, BLOCK)
    rp = rp_ptr + row.to(tl.int64) * 16
    out = part_ptr + pid.to(tl.int64) * 6
    if VAR:
        mean = tl.load(rp + 0)
        dv = tl.where(fin, (x - mean).to(tl.float64), 0.0)  # difference in the compute dtype
        tl.store(out + 0, tl.sum(dv * dv, axis=0))
    if TER:
        delta = tl.load(rp + 1)
        sel = fin & (ax > delta)
        tl.store(out + 1, tl.sum(tl.where(sel, ax, 0.0).to(tl.float64), axis=0))
        tl.store(out + 2, tl.sum(sel.to(tl.float64), axis=0))
    if QUAT:
        s = tl.load(rp + 2)
        v = _round_clamped(_safe_div(xf, s, IS64), -2.0, 1.0, IS64)
        v = tl.where(fin, v, 0.0)
        tl.store(out + 3, tl.sum((xf * v).to(tl.float64), axis=0))
        tl.store(out + 4, tl.sum((v * v).to(tl.float64), axis=0))
    if RES > 0:
        a = ax
        for i in tl.static_range(RES):
            a = tl.abs(a - tl.load(rp + 3 + i))
        a = tl.where(fin, a, 0.0)
        tl.store(out + 5, tl.sum(a.to(tl.float64), axis=0))


def _rows(x: torch.Tensor, per_channel: bool):
    C = int(x.shape[0]) if (per_channel and x.dim() > 0) else 1
    N = x.numel() // C if C else 0
    return x.detach().contiguous().reshape(C, N), C, N


def row_stats(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``[C, 7]`` float64: count of finite, Σ|x|, Σx, Σx², min, max, max|x| over the finite
    elements of each row (min/max/max|x| are 0 for a row without finite elements)."""
    x2, C, N = _rows(x, per_channel)
    if C == 0 or N == 0:
        return torch.zeros((C, NUM_STATS), dtype=torch.float64, device=x.device)
    block, nblk, warps = _launch_geometry(N)
    part = torch.empty((C * nblk, NUM_STATS), dtype=torch.float64, device=x.device)
    _wrap(_stats_kernel)[(C * nblk,)](
        x2, part, N, nblk, part, 0, RAGGED=False, IS64=x.dtype == torch.float64, BLOCK=block, num_warps=warps,
        enable_fp_fusion=False,
    )
    p = part.view(C, nblk, NUM_STATS)
    s = p[:, :, :4].sum(1)
    has = s[:, 0:1] > 0
    ext = torch.stack([p[:, :, 4].amin(1), p[:, :, 5].amax(1), p[:, :, 6].amax(1)], 1)
    return torch.cat([s, torch.where(has, ext, torch.zeros_like(ext))], 1)


def dependent_sums(
    x: torch.Tensor, per_channel: bool, row_params: torch.Tensor, *, var: bool, ter: bool, quat: bool,
    res_steps: int,
) -> torch.Tensor:
    """``[C, 6]`` float64 sums of one dependent pass (see the module docstring); ``row_params``
    is ``[C, 16]`` in the compute dtype. Slots not requested are 0."""
    x2, C, N = _rows(x, per_channel)
    if not 0 <= res_steps <= MAX_RES_STEPS:
        raise ValueError(f"res_steps must be in 0..{MAX_RES_STEPS}, got {res_steps}")
    if C == 0 or N == 0:
        return torch.zeros((C, NUM_DEP), dtype=torch.float64, device=x.device)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if tuple(row_params.shape) != (C, ROW_SLOTS):
        raise ValueError(f"row_params must be [{C}, {ROW_SLOTS}], got {list(row_params.shape)}")
    rp = row_params.detach().to(device=x.device, dtype=cd).contiguous()
    block, nblk, warps = _launch_geometry(N)
    part = torch.zeros((C * nblk, NUM_DEP), dtype=torch.float64, device=x.device)
    _wrap(_dep_kernel)[(C * nblk,)](
        x2, rp, part, N, nblk, part, 0, VAR=bool(var), TER=bool(ter), QUAT=bool(quat), RES=int(res_steps),
        RAGGED=False, IS64=cd == torch.float64, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
    )
    return part.view(C, nblk, NUM_DEP).sum(1)


# ----------------------------------------------------------------------------- on-device chain
# scheme_params entirely on the device (the structure of csrc/cuda/tensor_stats.cu): each pass's
# block partials are merged per row by a finalize program (one per row, fixed order: deterministic)
# that also writes the values the next pass compares against; a last program per row writes
# every candidate's scales. A handful of launches and no host synchronisation, instead of the
# ~250 small torch ops of chaining the passes on the host.
NUM_ST = 8  # per-row pass-1 results: n, Σ|x|, Σx, Σx², min, max, max|x| (min/max 0 if n = 0), pad
_CONSTS = 2  # float64 constants: Ternary's Δ/mean|x|, Quaternary's step/σ


@triton.jit
def _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, S: tl.constexpr, col: tl.constexpr, OP: tl.constexpr,
                RB: tl.constexpr, NIT: tl.constexpr, RAGGED: tl.constexpr):
    """Column ``col`` of this row's NBLK partials merged in a fixed order (OP 0 sum, 1 min, 2 max);
    NIT = cdiv(NBLK, RB) iterations (a constexpr: Triton 3.6's interpreter cannot take a
    run-time loop bound)."""
    if RAGGED:  # this row's programs: cnt of them from the first (see _block_of)
        first = tl.load(tab_ptr + ROFF + 3 * row + 1)
        cnt = tl.load(tab_ptr + ROFF + 3 * row + 2)
    else:
        first = row.to(tl.int64) * NBLK
        cnt = NBLK
    base = part_ptr + first * S
    if OP == 0:
        acc = tl.zeros([RB], dtype=tl.float64)
    elif OP == 1:
        acc = tl.full([RB], float("inf"), tl.float64)
    else:
        acc = tl.full([RB], -float("inf"), tl.float64)
    for it in range(NIT):
        offs = it * RB + tl.arange(0, RB)
        m = offs < cnt
        if OP == 0:
            acc += tl.load(base + offs * S + col, mask=m, other=0.0)
        elif OP == 1:
            acc = tl.minimum(acc, tl.load(base + offs * S + col, mask=m, other=float("inf")))
        else:
            acc = tl.maximum(acc, tl.load(base + offs * S + col, mask=m, other=-float("inf")))
    if OP == 0:
        return tl.sum(acc, axis=0)
    elif OP == 1:
        return tl.min(acc, axis=0)
    else:
        return tl.max(acc, axis=0)


@triton.jit
def _p1_finalize_kernel(
    part_ptr,  # [C * NBLK, 7] float64 (pass 1 partials)
    st_ptr,  # [C, 8] float64 out
    rp_ptr,  # [C, 16] compute dtype out: 0 mean, 1 delta, 3 alpha_1 = mean|x|
    consts_ptr,  # [2] float64
    NBLK,
    tab_ptr, ROFF,  # ragged rows only (see _block_of)
    IS64: tl.constexpr, RB: tl.constexpr, NIT: tl.constexpr, RAGGED: tl.constexpr,
):
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    row = tl.program_id(0)
    n = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 0, 0, RB, NIT, RAGGED)
    s1 = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 1, 0, RB, NIT, RAGGED)
    sx = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 2, 0, RB, NIT, RAGGED)
    s2 = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 3, 0, RB, NIT, RAGGED)
    mn = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 4, 1, RB, NIT, RAGGED)
    mx = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 5, 2, RB, NIT, RAGGED)
    ma = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 7, 6, 2, RB, NIT, RAGGED)
    has = n > 0
    st = st_ptr + row.to(tl.int64) * 8
    tl.store(st + 0, n)
    tl.store(st + 1, s1)
    tl.store(st + 2, sx)
    tl.store(st + 3, s2)
    tl.store(st + 4, tl.where(has, mn, 0.0))
    tl.store(st + 5, tl.where(has, mx, 0.0))
    tl.store(st + 6, tl.where(has, ma, 0.0))
    nn = tl.where(has, n, 1.0)
    mean = tl.where(has, sx / nn, 0.0).to(CD)
    mean_abs = tl.where(has, s1 / nn, 0.0).to(CD)
    rp = rp_ptr + row.to(tl.int64) * 16
    tl.store(rp + 0, mean)
    tl.store(rp + 1, tl.load(consts_ptr + 0).to(CD) * mean_abs)
    tl.store(rp + 3, mean_abs)


@triton.jit
def _dep_finalize_kernel(
    part_ptr,  # [C * NBLK, 6] float64 (this pass's partials)
    st_ptr,  # [C, 8] float64 (pass 1)
    rp_ptr,  # [C, 16] compute dtype (updated: s_quat at 2, alpha_Q at 2 + Q)
    sig_ptr,  # [C] compute dtype (sigma, written by pass 2)
    sums_ptr,  # [C, 6] float64 out (this pass's sums)
    consts_ptr,  # [2] float64
    NBLK,
    tab_ptr, ROFF,  # ragged rows only (see _block_of)
    Q: tl.constexpr, RES: tl.constexpr, IS64: tl.constexpr, RB: tl.constexpr, NIT: tl.constexpr,
    RAGGED: tl.constexpr,
):
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    row = tl.program_id(0)
    out = sums_ptr + row.to(tl.int64) * 6
    s0 = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 6, 0, 0, RB, NIT, RAGGED)
    tl.store(out + 0, s0)
    tl.store(out + 1, _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 6, 1, 0, RB, NIT, RAGGED))
    tl.store(out + 2, _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 6, 2, 0, RB, NIT, RAGGED))
    tl.store(out + 3, _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 6, 3, 0, RB, NIT, RAGGED))
    tl.store(out + 4, _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 6, 4, 0, RB, NIT, RAGGED))
    s5 = _merge_rows(part_ptr, row, NBLK, tab_ptr, ROFF, 6, 5, 0, RB, NIT, RAGGED)
    tl.store(out + 5, s5)
    st = st_ptr + row.to(tl.int64) * 8
    n = tl.load(st)
    rp = rp_ptr + row.to(tl.int64) * 16
    if Q == 2:
        # 0 exactly when the row's finite elements are all equal (min == max), as the reference
        spread = (n > 1) & (tl.load(st + 5) > tl.load(st + 4))
        var = tl.where(spread, s0 / tl.maximum(n - 1, 1.0), 0.0)
        sigma = tl.sqrt(var).to(CD)  # float64: sqrt.rn (PTX has no approximate f64 sqrt)
        tl.store(sig_ptr + row, sigma)
        tl.store(rp + 2, tl.load(consts_ptr + 1).to(CD) * sigma)
    if RES > 0:
        tl.store(rp + 2 + Q, tl.where(n > 0, s5 / tl.where(n > 0, n, 1.0), 0.0).to(CD))


@triton.jit
def _pow2(k):
    """2^k as float64 for integer k (int32 tensor), exact down to the subnormals (two factors,
    each a normal power of two built from its exponent bits)."""
    k1 = k // 2
    k2 = k - k1
    a = ((k1 + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    b = ((k2 + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return a * b


@triton.jit
def _params_kernel(
    st_ptr, rp_ptr, sig_ptr, p2_ptr, p3_ptr,  # per-row results of the passes
    sid_ptr, bits_ptr, lam_ptr,  # [K] int32; bits int32 and lams float64 (ClipQ/PotQ step/sigma): [K] or [C, K]
    out_ptr,  # [K, C, 12] compute dtype
    C,
    BSTRIDE,  # 0: one bits/lams row for every row; K: per-row bits and lams [C, K] (batched ops)
    RES_TOP,  # ResQ slots written: 0..b - 1 + RES_TOP (1: alpha_{b+1}, for the bitwidth gradient)
    K: tl.constexpr, IS64: tl.constexpr,  # K a constexpr: Triton 3.6's interpreter needs constant loop bounds
):
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    row = tl.program_id(0)
    r64 = row.to(tl.int64)
    st = st_ptr + r64 * 8
    rp = rp_ptr + r64 * 16
    slot = tl.arange(0, 16)
    alphas = tl.load(rp + 3 + slot, mask=slot < 13, other=0.0)  # slot i: alpha_{i+1}
    mean_abs = tl.load(rp + 3)
    delta = tl.load(rp + 1)
    s_quat = tl.load(rp + 2)
    sigma = tl.load(sig_ptr + row)
    ma = tl.load(st + 6).to(CD)
    mn = tl.load(st + 4).to(CD)
    mx = tl.load(st + 5).to(CD)
    cnt = tl.load(p2_ptr + r64 * 6 + 2)
    ter = tl.where(cnt > 0, tl.load(p2_ptr + r64 * 6 + 1) / tl.where(cnt > 0, cnt, 1.0), 0.0).to(CD)
    vv = tl.load(p3_ptr + r64 * 6 + 4)
    quat = tl.where(vv > 0, tl.load(p3_ptr + r64 * 6 + 3) / tl.where(vv > 0, vv, 1.0), 0.0).to(CD)
    # frexp exponent of max|x| (max|x| = f * 2^e, f in [0.5, 1)) from its float64 bits; float64
    # subnormals are scaled into the normal range first
    ma64 = ma.to(tl.float64)
    sub = ma64 < 2.2250738585072014e-308
    m2 = tl.where(sub, ma64 * 18446744073709551616.0, ma64)
    e = ((m2.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022 - tl.where(sub, 64, 0)
    for k in range(K):
        sid = tl.load(sid_ptr + k)
        b = tl.load(bits_ptr + r64 * BSTRIDE + k)
        lam = tl.load(lam_ptr + r64 * BSTRIDE + k).to(CD)
        fixed_step = tl.where(ma > 0, _pow2(e + 1 - b).to(CD), 0.0)
        zoom_step = (mx - mn) * _pow2(-b).to(CD)  # exact: / 2^b (a float32 `/` is approximate on GPUs)
        v0 = tl.where(sid == 0, mean_abs, 0.0)
        v0 = tl.where(sid == 1, delta, v0)
        v0 = tl.where(sid == 2, s_quat, v0)
        v0 = tl.where(sid == 3, fixed_step, v0)
        v0 = tl.where(sid == 4, mean_abs, v0)
        v0 = tl.where(sid == 5, mn, v0)
        v0 = tl.where((sid == 6) | (sid == 7), lam * sigma, v0)
        v1 = tl.where(sid == 1, ter, 0.0)
        v1 = tl.where(sid == 2, quat, v1)
        v1 = tl.where(sid == 3, ma, v1)
        v1 = tl.where(sid == 5, zoom_step, v1)
        vals = tl.where(slot == 0, v0, tl.where(slot == 1, v1, 0.0)).to(CD)
        vals = tl.where((sid == 4) & (slot < b + RES_TOP), alphas.to(CD), vals)
        tl.store(out_ptr + (k * C + r64) * 12 + slot, vals, mask=slot < 12)


_SMALL: dict = {}


def _small_tensor(values, dtype, device) -> torch.Tensor:
    """A tiny constant tensor on ``device``, made once per (values, dtype, device): building it
    per call would be a blocking host-to-device copy (a stream synchronisation) every call."""
    key = (values, dtype, str(device))
    t = _SMALL.get(key)
    if t is None:
        if len(_SMALL) > 4096:  # bounded: the keys are candidate sets and bits, few in practice
            _SMALL.clear()
        t = _SMALL[key] = torch.tensor(values, dtype=dtype).to(device)
    return t


def _chain(x2, C, N, nblk, block, warps, tab, roff, ragged, nit_blocks, sids, meta_bits, lam, bstride,
           consts, plan, res_top, nprog) -> torch.Tensor:
    """The statistics chain of :func:`scheme_params_chain` over uniform (``ragged`` False: ``x2``
    ``[C, N]``, ``nblk`` programs per row) or ragged rows (``tab``/``roff`` of
    :func:`program_table`, ``nit_blocks`` = most programs of one row)."""
    cd = torch.float64 if x2.dtype == torch.float64 else torch.float32
    K = len(sids)
    dev = x2.device
    is64 = x2.dtype == torch.float64
    rb = min(1024, triton.next_power_of_2(max(nit_blocks, 16)))
    nit = max(1, triton.cdiv(nit_blocks, rb))
    f64 = dict(dtype=torch.float64, device=dev)
    c64 = _small_tensor(tuple(float(c) for c in consts), torch.float64, dev)
    part = torch.empty((max(nprog, 1), NUM_STATS), **f64)
    st = torch.empty((C, NUM_ST), **f64)
    rp = torch.zeros((C, ROW_SLOTS), dtype=cd, device=dev)
    sig = torch.zeros((C,), dtype=cd, device=dev)
    sums = torch.zeros((3, C, NUM_DEP), **f64)  # pass 2, pass 3, later passes
    geo = dict(RAGGED=ragged, IS64=is64, enable_fp_fusion=False)
    if nprog > 0:
        _wrap(_stats_kernel)[(nprog,)](x2, part, N, nblk, tab, roff, BLOCK=block, num_warps=warps, **geo)
    _wrap(_p1_finalize_kernel)[(C,)](part, st, rp, c64, nblk, tab, roff, RB=rb, NIT=nit, **geo)
    dpart = torch.empty((max(nprog, 1), NUM_DEP), **f64)
    for q, var, ter, quat, res in plan:
        if nprog > 0:
            _wrap(_dep_kernel)[(nprog,)](
                x2, rp, dpart, N, nblk, tab, roff, VAR=bool(var), TER=bool(ter), QUAT=bool(quat), RES=int(res),
                BLOCK=block, num_warps=warps, **geo,
            )
        _wrap(_dep_finalize_kernel)[(C,)](dpart, st, rp, sig, sums[min(q, 4) - 2], c64, nblk, tab, roff, Q=int(q),
                                          RES=int(res), RB=rb, NIT=nit, **geo)
    out = torch.zeros((K, C, 12), dtype=cd, device=dev)
    sid_t = _small_tensor(tuple(map(int, sids)), torch.int32, dev)
    _wrap(_params_kernel)[(C,)](st, rp, sig, sums[0], sums[1], sid_t, meta_bits, lam, out, C, int(bstride),
                                int(res_top), K=K, IS64=is64, enable_fp_fusion=False)
    return out


def scheme_params_chain(x: torch.Tensor, per_channel: bool, sids, bits, lams, consts, plan,
                        res_top: int = 1) -> torch.Tensor:
    """Every candidate's scales ``[K, C, 12]`` in the compute dtype, computed on the device.

    ``sids``/``bits``: the candidates' scheme ids and integer bits; ``lams``: per candidate the
    ClipQ/PotQ step over σ at its bits (0 for the others); ``consts``: (Ternary Δ/mean|x|,
    Quaternary step/σ); ``plan``: the dependent passes as ``(q, var, ter, quat, res_steps)``
    tuples, chained like the C++ kernel; ``res_top``: 1 to write ResQ's α_{b+1} (the plan then
    computes it), 0 to leave that slot 0. Passing these in keeps the scheme tables in autoqnn."""
    x2, C, N = _rows(x, per_channel)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    K = len(sids)
    dev = x.device
    if C == 0 or N == 0 or K == 0:
        return torch.zeros((K, C, 12), dtype=cd, device=dev)
    block, nblk, warps = _launch_geometry(N)
    meta_bits = _small_tensor(tuple(map(int, bits)), torch.int32, dev)
    lam = _small_tensor(tuple(float(v) for v in lams), torch.float64, dev)
    return _chain(x2, C, N, nblk, block, warps, x2, 0, False, nblk, sids, meta_bits, lam, 0, consts, plan,
                  res_top, C * nblk)


@functools.lru_cache(maxsize=256)
def _table(offsets: tuple, block: int, device: str):
    """:func:`program_table`, cached (a model's weights keep their offsets every step)."""
    return program_table(offsets, block, device)


def scheme_params_chain_batched(x: torch.Tensor, offsets, sids, bits_rows, lams_rows, consts, plan,
                                res_top: int = 1) -> torch.Tensor:
    """:func:`scheme_params_chain` for the batched op: ``x`` flat, row r = ``x[offsets[r] :
    offsets[r+1]]`` with its own integer bits and lams (``bits_rows``/``lams_rows``: R lists of
    K); ``plan`` covers the most any row needs. Returns ``[K, R, 12]``; each row's values are
    those of :func:`scheme_params_chain` on that row alone with the same block size."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    K, R = len(sids), len(offsets) - 1
    dev = x.device
    if R == 0 or K == 0:
        return torch.zeros((K, max(R, 0), 12), dtype=cd, device=dev)
    x1 = x.detach().contiguous().reshape(-1)
    longest = max(int(offsets[r + 1]) - int(offsets[r]) for r in range(R))
    block, _, warps = _launch_geometry(longest)
    tab, nprog, roff, most = _table(tuple(int(o) for o in offsets), block, str(dev))
    meta_bits = _small_tensor(tuple(int(b) for row in bits_rows for b in row), torch.int32, dev)
    lam = _small_tensor(tuple(float(v) for row in lams_rows for v in row), torch.float64, dev)
    return _chain(x1, R, 0, 1, block, warps, tab, roff, True, most, sids, meta_bits, lam, K, consts, plan,
                  res_top, nprog)
