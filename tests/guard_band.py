# SPDX-License-Identifier: MIT
"""Out-of-bounds read checks for every kernel family (C++ CPU, CUDA, Triton), shared by
tests/test_guard_band.py and tests/triton_cases.py.

Each input (x, grad_y, the batched flat buffer) is placed inside a larger buffer whose guard
bands, before and after it (and in the gaps of a strided view), hold a poison value: NaN or a huge
finite number. A kernel that reads one element outside its tensor, say an unmasked tail of a block
or a row offset off by one, folds the poison into a statistic or a gradient sum and its result
changes. Every op is run on the guarded input and on a clean copy of it; the results must be
bitwise identical. The inputs themselves are finite, so any NaN in a result of the guarded run is
a leak. Triton's interpreter and CUDA do not fault on such reads, so this is how they are caught.
"""
from __future__ import annotations

import torch

from autoqnn.schemes import ACTIVATION_CANDIDATES, WEIGHT_CANDIDATES, scheme_info

WEIGHT_SIDS = [scheme_info(s).id for s in WEIGHT_CANDIDATES]
ACT_SIDS = [scheme_info(s).id for s in ACTIVATION_CANDIDATES]
# a guard band wider than any kernel's block (Triton's interpreter uses 4096-element blocks)
PAD = 8192
# (shape, per_channel): tails that end inside a block and a thread's kElems group, one row,
# per-channel rows of awkward length
SHAPES = [((1,), False), ((769,), False), ((5125,), False), ((7, 130), True), ((6, 3, 3, 3), True)]
BATCH_SIZES = [5, 0, 4100, 33, 1]


def poisons(dtype):
    """NaN and a finite value huge enough to change any sum, min or max it is folded into."""
    return [float("nan"), float(torch.finfo(dtype).max) / 8]


def guarded(x: torch.Tensor, fill: float, strided: bool = False) -> torch.Tensor:
    """``x``'s values in a view of a larger buffer filled with ``fill`` around it: contiguous with
    a storage offset of ``PAD`` elements, or (``strided``) every other element, the gaps poisoned."""
    n = x.numel()
    step = 2 if strided else 1
    buf = torch.full((2 * PAD + step * max(n, 1),), fill, dtype=x.dtype, device=x.device)
    view = buf[PAD:PAD + step * n:step]
    view.copy_(x.reshape(-1))
    return view.view(x.shape) if not strided else view.as_strided(x.shape, _strides(x.shape, step), view.storage_offset())


def _strides(shape, step):
    out, s = [], step
    for d in reversed(shape):
        out.append(s)
        s *= d
    return tuple(reversed(out))


def same(a, b) -> bool:
    """Bitwise equal results (NaN where the other has NaN)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def _finite(r) -> bool:
    if isinstance(r, (tuple, list)):
        return all(_finite(u) for u in r)
    return not r.is_floating_point() or bool(torch.isfinite(r).all()) or r.numel() == 0


def _expect(name, got, exp, where):
    assert same(got, exp), f"{name} reads outside its input ({where}): results differ from the clean run"


def _bits(sids, b=3.0):
    return torch.tensor([min(b, 4.0) if s == scheme_info("pot").id else b for s in sids])


def check_per_tensor_ops(op, device, dtype, shape, per_channel, sids, strided=False):
    """Every per-tensor op (``op(name)`` resolves a name to the op under test) on guarded inputs
    against the same call on clean copies."""
    g = torch.Generator().manual_seed(len(shape) * 31 + len(sids))
    x = (torch.randn(shape, generator=g) * 1.5).to(dtype).to(device)
    gy = torch.randn(shape, generator=g).to(dtype).to(device)
    K = len(sids)
    bits = _bits(sids).to(device)
    w = torch.softmax(torch.randn(K, generator=g), 0).to(device)
    clean = {
        "tensor_stats": op("tensor_stats")(x, per_channel),
        "scheme_params": op("scheme_params")(x, bits, sids, per_channel, True),
    }
    P = clean["scheme_params"]
    clean["mixture"] = op("mixture")(x, P, w, bits, sids, per_channel)
    clean["mixture_backward"] = op("mixture_backward")(gy, x, P, w, bits, sids, per_channel, True, True)
    P1 = P[:1].contiguous()
    clean["quantize"] = op("quantize")(x, P1, bits[:1], sids[0], per_channel)
    clean["quantize_backward"] = op("quantize_backward")(gy, x, P1, bits[:1], sids[0], per_channel, True)
    assert _finite(list(clean.values())), "clean run not finite: the leak check needs finite results"
    for fill in poisons(dtype):
        xg, gyg = guarded(x, fill, strided), guarded(gy, fill, strided)
        where = f"{dtype} {tuple(shape)} per_channel={per_channel} K={K} poison={fill:g} strided={strided}"
        _expect("tensor_stats", op("tensor_stats")(xg, per_channel), clean["tensor_stats"], where)
        _expect("scheme_params", op("scheme_params")(xg, bits, sids, per_channel, True), P, where)
        _expect("mixture", op("mixture")(xg, P, w, bits, sids, per_channel), clean["mixture"], where)
        _expect("mixture_backward", op("mixture_backward")(gyg, xg, P, w, bits, sids, per_channel, True, True),
                clean["mixture_backward"], where)
        _expect("quantize", op("quantize")(xg, P1, bits[:1], sids[0], per_channel), clean["quantize"], where)
        _expect("quantize_backward", op("quantize_backward")(gyg, xg, P1, bits[:1], sids[0], per_channel, True),
                clean["quantize_backward"], where)


def check_batched_ops(op, device, dtype, sids):
    """The batched ops on a guarded flat buffer of ragged rows (one empty) against clean copies."""
    off = [0]
    for n in BATCH_SIZES:
        off.append(off[-1] + n)
    g = torch.Generator().manual_seed(7 + len(sids))
    x = (torch.randn(off[-1], generator=g) * 1.5).to(dtype).to(device)
    gy = torch.randn(off[-1], generator=g).to(dtype).to(device)
    R, K = len(BATCH_SIZES), len(sids)
    bits = _bits(sids).repeat(R, 1).to(device)
    w = torch.softmax(torch.randn(R, K, generator=g), 1).to(device)
    P = op("scheme_params_batched")(x, off, bits, sids, True)
    y = op("mixture_batched")(x, off, P, w, bits, sids)
    b = op("mixture_batched_backward")(gy, x, off, P, w, bits, sids, True, True)
    assert _finite([P, y, b]), "clean run not finite: the leak check needs finite results"
    for fill in poisons(dtype):
        xg, gyg = guarded(x, fill), guarded(gy, fill)
        where = f"batched {dtype} K={K} poison={fill:g}"
        _expect("scheme_params_batched", op("scheme_params_batched")(xg, off, bits, sids, True), P, where)
        _expect("mixture_batched", op("mixture_batched")(xg, off, P, w, bits, sids), y, where)
        _expect("mixture_batched_backward",
                op("mixture_batched_backward")(gyg, xg, off, P, w, bits, sids, True, True), b, where)
