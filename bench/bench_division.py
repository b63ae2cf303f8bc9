# SPDX-License-Identifier: MIT
"""Is the IEEE division a bottleneck of the candidates' math on a GPU, and is the exact
reciprocal form a drop-in for it there? One run, providers side by side, same input:

- ``mul``: five scaled roundings per element with x*s (no division): the arithmetic floor;
- ``div``: the same with x/s (IEEE ``div.rn.f32``, ``tl.div_rn``, as the mixture kernels compute it);
- ``rcp``: the same with the reciprocal form r = RN(1/s), q0 = x*r, q = fma(fma(-q0, s, x), r, q0)
  (q0 where it overflows), which tools/exact_reciprocal_div.c found bitwise equal to x/s on CPU
  for every float x away from remainder underflow;

plus ``copy`` (the bandwidth ceiling). Five divisions per element is what the eight weight
candidates do per pass (QuaternaryQ, FixedQ, ZoomQ, ClipQ, PotQ). With ``--exhaustive`` on a GPU
it also compares ``div`` and ``rcp`` bit for bit over every float32 x for a few divisors and
counts the mismatches in and outside the normal range.

    python bench/bench_division.py --device cuda [--exhaustive]
    TRITON_INTERPRET=1 python bench/bench_division.py --numel 4096   # smoke run on CPU (no timing claims)
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import triton
import triton.language as tl

PROVIDERS = ("copy", "mul", "div", "rcp")
_MODE = {"mul": 0, "div": 1, "rcp": 2}
NDIV = 5


@triton.jit
def _quot(x, s, r, MODE: tl.constexpr):
    if MODE == 0:
        q = x * s
    elif MODE == 1:
        q = tl.div_rn(x, s)  # `/` is an approximate division in float32 on GPUs
    else:
        q0 = x * r
        q = tl.fma(tl.fma(-q0, s, x), r, q0)
        q = tl.where(tl.abs(q0) <= 3.4028234663852886e38, q, q0)
    return q


@triton.jit
def _scaled_rounds_kernel(x_ptr, y_ptr, s_ptr, N, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(5):
        s = tl.load(s_ptr + k)
        r = tl.load(s_ptr + 5 + k)
        q = _quot(x, s, r, MODE)
        c = tl.minimum(tl.maximum(q, -4.0), 3.0)
        rnd = (c + 12582912.0) - 12582912.0  # round half to even (no FMA contraction: see launch)
        acc += rnd * s
    tl.store(y_ptr + offs, acc, mask=m)


@triton.jit
def _quotient_kernel(x_ptr, q_ptr, s, r, N, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=1.0)
    tl.store(q_ptr + offs, _quot(x, s, r, MODE), mask=m)


def scales(device):
    s = torch.tensor([0.586, 0.0680035, 3.0, 47.1488, 0.151706], dtype=torch.float32)
    return torch.cat([s, 1.0 / s]).to(device)


def run(provider, x, y, s, block=1024):
    if provider == "copy":
        y.copy_(x)
        return
    grid = (triton.cdiv(x.numel(), block),)
    _scaled_rounds_kernel[grid](x, y, s, x.numel(), MODE=_MODE[provider], BLOCK=block, enable_fp_fusion=False)


def time_it(fn, device, rounds):
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def exhaustive(device, divisors=(0.586, 0.1, 3.0, 1e-30, 47.1488, 7.2681)):
    """div vs rcp over every float32 bit pattern: mismatches in the normal range (|x| and |x/s| in
    [1e-30, 1e30]) and outside it."""
    rows = []
    chunk = 1 << 28
    for sv in divisors:
        s32 = torch.tensor(sv, dtype=torch.float32)
        s, r = s32.item(), (1.0 / s32).item()  # float32 values: r = RN(1/s)
        normal = other = 0
        for lo in range(-(1 << 31), 1 << 31, chunk):
            x = torch.arange(lo, lo + chunk, dtype=torch.int32, device=device).view(torch.float32)
            qd, qr = torch.empty_like(x), torch.empty_like(x)
            grid = (triton.cdiv(chunk, 1024),)
            _quotient_kernel[grid](x, qd, s, r, chunk, MODE=1, BLOCK=1024, enable_fp_fusion=False)
            _quotient_kernel[grid](x, qr, s, r, chunk, MODE=2, BLOCK=1024, enable_fp_fusion=False)
            bad = (qd.view(torch.int32) != qr.view(torch.int32)) & torch.isfinite(x)
            inside = (x.abs() >= 1e-30) & (qd.abs() >= 1e-30) & (qd.abs() <= 1e30)
            normal += int((bad & inside).sum())
            other += int((bad & ~inside).sum())
        rows.append((sv, normal, other))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exhaustive", action="store_true", help="div vs rcp over every float32 (GPU)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU set TRITON_INTERPRET=1 (smoke run only)")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.numel, generator=g) * 2).to(dev)
    s = scales(dev)
    outs = {}
    res = {}
    for p in PROVIDERS:
        y = torch.empty_like(x)
        run(p, x, y, s)
        outs[p] = y
        res[p] = time_it(lambda p=p, y=y: run(p, x, y, s), dev, args.rounds)
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU (Triton interpreter: no timing claims)"
    print(f"\n### {NDIV} scaled roundings per element, {args.numel} fp32 elements on {name}\n")
    print("| provider | µs | ns/element | vs div | GB/s (8 B/element) |")
    print("|---|---:|---:|---:|---:|")
    for p in PROVIDERS:
        t = res[p]
        print(f"| {p} | {t * 1e6:.1f} | {t / args.numel * 1e9:.3f} | {res['div'] / t:.2f}x | "
              f"{8 * args.numel / t / 1e9:.0f} |")
    same = torch.equal(outs["div"], outs["rcp"])
    print(f"\ndiv and rcp outputs bitwise equal on this input: {same}"
          + (" (the interpreter may not fuse tl.fma)" if dev == "cpu" else ""))
    if args.exhaustive and dev == "cuda":
        print("\n| divisor | mismatches, normal range | mismatches, outside |\n|---:|---:|---:|")
        for sv, n, o in exhaustive(dev):
            print(f"| {sv:g} | {n} | {o} |")
    return 0 if (same or dev == "cpu") else 1


if __name__ == "__main__":
    raise SystemExit(main())
