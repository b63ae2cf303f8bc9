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

import torch
import triton
import triton.language as tl

from .mixture import _launch_geometry, _round_clamped, _safe_div, _wrap

__all__ = ["row_stats", "dependent_sums", "ROW_SLOTS", "NUM_STATS", "NUM_DEP"]

NUM_STATS = 7  # n, Σ|x|, Σx, Σx², min, max, max|x|
NUM_DEP = 6  # Σ(x−mean)², ternary Σ|x|, ternary count, quaternary Σx·v, Σv², residual Σ|r_q|
ROW_SLOTS = 16  # per-row inputs of a dependent pass: mean, delta, s_quat, alpha_1..alpha_9, (pad)
MAX_RES_STEPS = 8  # ResQ b <= 8: alpha_{b+1} needs b chain steps


@triton.jit
def _load_block(x_ptr, N, NBLK, IS64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (pid, row, x, finite mask, x with non-finite -> 0, |that|)."""
    CD: tl.constexpr = tl.float64 if IS64 else tl.float32
    pid = tl.program_id(0)
    row = pid // NBLK
    blk = pid - row * NBLK
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    x = tl.load(x_ptr + row.to(tl.int64) * N + offs, mask=inb, other=0.0).to(CD)
    fin = inb & (tl.abs(x) < float("inf"))
    xf = tl.where(fin, x, 0.0)
    return pid, row, x, fin, xf, tl.abs(xf)


@triton.jit
def _stats_kernel(
    x_ptr,  # [C, N] contiguous, x's dtype
    part_ptr,  # [C * NBLK, 7] float64
    N, NBLK,
    IS64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, row, x, fin, xf, ax = _load_block(x_ptr, N, NBLK, IS64, BLOCK)
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
    VAR: tl.constexpr, TER: tl.constexpr, QUAT: tl.constexpr, RES: tl.constexpr,
    IS64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, row, x, fin, xf, ax = _load_block(x_ptr, N, NBLK, IS64, BLOCK)
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
        x2, part, N, nblk, IS64=x.dtype == torch.float64, BLOCK=block, num_warps=warps,
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
        x2, rp, part, N, nblk, VAR=bool(var), TER=bool(ter), QUAT=bool(quat), RES=int(res_steps),
        IS64=cd == torch.float64, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
    )
    return part.view(C, nblk, NUM_DEP).sum(1)
