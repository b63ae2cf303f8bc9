# SPDX-License-Identifier: MIT
"""Probe of the levels-table formulation of the output kernels (issue 3's GPU bandwidth target),
which the levels pass now implements (``triton_kernels/levels.py``, ``csrc/cuda/quantize.cu``
namespace ``lv``; ``AUTOQNN_*_LEVELS``). Its :func:`steps` is also the step-point oracle of
``tools/cuda_emu/compare.py`` and ``tests/test_cuda_kernels.py``.

Every candidate's q_k(x) is a step function of x, so the mixture's y = Σ_k w_k·q_k(x) is one
too: a sorted table of thresholds T (the union of the candidates' steps) and a table of values Y
give y = Y[#{t in T : t <= x}], one search instead of evaluating eight schemes per element.

This script measures whether that is exact and how big the tables get. For each candidate it
finds the steps of the reference's own per-element math (``reference.eval_scheme``, float32) by
bisection on the order of float32 values: between two keys where q differs, halve until they
are neighbours. It then compares the table lookup with the reference's mixture
(``reference.mixture_ref``) bit for bit. The points are the tensor itself, random values, every
threshold and its neighbours, and ±Inf. Bisection finds a step only where q differs at the two
ends of an interval, so a function that goes up and comes back inside one interval hides its
steps. ResQ is such a function when α_2 > α_1, which is why the probe also seeds the search with a
dense grid.

    python tools/levels_probe.py [--bits 2 3 4 8] [--n 4096] [--seeds 5]

Prints, per bits: the steps per candidate, the merged table size and the mismatches (0 means the
lookup reproduces the reference exactly on every point tried).
"""
from __future__ import annotations

import argparse

import torch

from autoqnn.ops import reference as ref
from autoqnn.schemes import scheme_info

F32_NEG_INF_KEY = -(0x7F800000) - 1  # keys: float32 bit patterns mapped to a monotone int64 order


def to_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys ordered like the floats (-0 and +0 adjacent; NaN not allowed)."""
    i = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(i < 0, -(i & 0x7FFFFFFF) - 1, i)


def from_key(k: torch.Tensor) -> torch.Tensor:
    i = torch.where(k < 0, (-(k + 1)) | (-(2**31)), k)
    return i.to(torch.int32).view(torch.float32)


def q_of(sid: int, p: torch.Tensor, b: int, x: torch.Tensor) -> torch.Tensor:
    q, _, _ = ref.eval_scheme(sid, x.reshape(1, -1), p.reshape(1, -1), b)
    return q.reshape(-1)


def steps(sid: int, p: torch.Tensor, b: int, seeds: torch.Tensor) -> torch.Tensor:
    """Sorted float32 thresholds t (q(t) != q(prev float)) found by bisection between the sorted
    seed points (keys) wherever q differs."""
    keys = torch.unique(torch.cat([to_key(seeds), torch.tensor([to_key(torch.tensor([-float("inf")]))[0],
                                                                to_key(torch.tensor([float("inf")]))[0]])]))
    qs = q_of(sid, p, b, from_key(keys))
    lo, hi = keys[:-1], keys[1:]
    diff = qs[:-1] != qs[1:]
    lo, hi = lo[diff], hi[diff]
    while True:
        gap = hi - lo > 1
        if not bool(gap.any()):
            break
        mid = torch.where(gap, (lo + hi) // 2, lo)
        qlo = q_of(sid, p, b, from_key(lo))
        qmid = q_of(sid, p, b, from_key(mid))
        qhi = q_of(sid, p, b, from_key(hi))
        # keep every half whose ends differ (both, when q goes up and back: a non-monotone step)
        left = gap & (qlo != qmid)
        right = gap & (qmid != qhi)
        done = ~gap
        lo = torch.cat([lo[done], lo[left], mid[right]])
        hi = torch.cat([hi[done], mid[left], hi[right]])
    return torch.unique(from_key(hi))


def probe(bits: int, n: int, seed: int, weight_sids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * (0.5 + seed)
    if seed % 2:
        x = x.abs() ** 1.5 * torch.sign(x)  # heavier tails: ResQ's alphas need not decrease
    sids = weight_sids or list(range(8))
    b_int = [min(max(bits, scheme_info(s).min_bits), scheme_info(s).max_bits) for s in sids]
    bt = torch.tensor(b_int, dtype=torch.float32)
    params = ref.scheme_params_ref(x, bt, sids, False)[:, 0]  # [K, P]
    w = torch.softmax(torch.randn(len(sids), generator=g), 0)
    grid = torch.linspace(-8, 8, 20001) * float(x.abs().max())
    seeds_ = torch.cat([x, grid])
    per = {}
    ts = []
    for k, s in enumerate(sids):
        t = steps(s, params[k], b_int[k], seeds_)
        per[scheme_info(s).name] = int(t.numel())
        ts.append(t)
    T = torch.unique(torch.cat(ts))  # sorted thresholds of the mixture
    # segment values: y at each threshold (segment idx >= 1) and below the first (idx 0)
    reps = torch.cat([torch.tensor([-float("inf")]), T])
    Y = ref.mixture_ref(reps, params.unsqueeze(1), w, bt, sids, False)
    # points: the data, random values, every threshold and its neighbours, infinities
    pts = torch.cat([x, torch.randn(20000, generator=g) * float(x.abs().max()), T,
                     torch.nextafter(T, torch.tensor(-float("inf"))), torch.nextafter(T, torch.tensor(float("inf"))),
                     torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    idx = torch.searchsorted(T, pts, right=True)
    got = Y[idx]
    want = ref.mixture_ref(pts, params.unsqueeze(1), w, bt, sids, False)
    bad = int((got.view(torch.int32) != want.view(torch.int32)).sum())
    return per, int(T.numel()), bad, int(pts.numel())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    print("| bits | seed | steps per candidate | merged table | points | mismatches |")
    print("|---:|---:|---|---:|---:|---:|")
    for b in args.bits:
        for s in range(args.seeds):
            per, m, bad, npts = probe(b, args.n, s)
            cands = " ".join(f"{k}:{v}" for k, v in per.items())
            print(f"| {b} | {s} | {cands} | {m} | {npts} | {bad} |", flush=True)


if __name__ == "__main__":
    main()
