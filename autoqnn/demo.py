# SPDX-License-Identifier: MIT
"""``python -m autoqnn.demo``: a short tour of the functional API on one machine, no data needed.

1. Quantizes a convolution weight with each of the eight schemes and prints levels and SQNR.
2. Trains a tiny quantized linear model whose weight goes through the QSS soft mixture of all
   eight schemes (learnable logits θ, Gumbel noise, annealed temperature) and whose bitwidth is
   learned under a precision loss (QPL), then prints the scheme it picked and the bits it learned.

The full pipeline (QAG on real models, Fashion-MNIST, reports, export) arrives with the
``autoqnn`` command; this demo only exercises the layer the rest is built on.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from . import functional as AF
from .env import collect_env
from .schemes import SCHEMES, WEIGHT_CANDIDATES, scheme_info


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    err = (x - y).pow(2).sum().item()
    return float("inf") if err == 0 else 10 * math.log10(x.pow(2).sum().item() / err)


def tour_schemes(backend: str) -> None:
    conv = torch.nn.Conv2d(64, 128, 3)
    w = conv.weight.detach()
    print(f"\n[1] quantizing a Conv2d(64,128,3) weight ({w.numel()} elements), backend={backend!r}")
    print(f"  {'scheme':<11}{'bits':>5}{'levels':>8}{'SQNR dB':>9}{'per-chan':>10}{'ms':>8}")
    for name in SCHEMES:
        info = scheme_info(name)
        b = info.min_bits if not info.multi_bit else 3
        t0 = time.perf_counter()
        y = AF.quantize(w, name, b, backend=backend)
        ms = (time.perf_counter() - t0) * 1e3
        yc = AF.quantize(w, name, b, per_channel=True, backend=backend)
        print(
            f"  {name:<11}{b:>5}{y.unique().numel():>8}{sqnr_db(w, y):>9.2f}{sqnr_db(w, yc):>10.2f}{ms:>8.2f}"
        )


def tiny_search(steps: int, backend: str, seed: int) -> None:
    """Regression y = x·Wᵀ with a quantized W: QSS over 8 schemes, then QPL toward 2 bits."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, n = 64, 16, 2048
    w_true = torch.randn(d_out, d_in, generator=g) * torch.rand(d_out, 1, generator=g)
    x = torch.randn(n, d_in, generator=g)
    target = x @ w_true.T
    W = torch.nn.Parameter(w_true + 0.3 * torch.randn(d_out, d_in, generator=g))
    theta = torch.nn.Parameter(torch.zeros(len(WEIGHT_CANDIDATES)))
    opt = torch.optim.Adam([{"params": [W], "lr": 1e-2}, {"params": [theta], "lr": 5e-2}])
    print(f"\n[2] QSS on a {d_out}x{d_in} linear layer: 8 candidates at 3 bits, {steps} steps")
    tau0 = 5.0
    for step in range(steps):
        tau = max(tau0 * (1 - step / steps), 1e-3)
        gumbel = -torch.log(-torch.log(torch.rand(len(WEIGHT_CANDIDATES), generator=g).clamp_min(1e-20)))
        m = torch.softmax((theta + gumbel) / tau, 0)
        wq = AF.quantize_mixture(W, m, WEIGHT_CANDIDATES, 3, backend=backend)
        loss = torch.nn.functional.mse_loss(x @ wq.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(steps // 5, 1) == 0 or step == steps - 1:
            probs = torch.softmax(theta, 0)
            top = WEIGHT_CANDIDATES[int(probs.argmax())]
            print(f"  step {step:4d}  tau {tau:5.2f}  loss {loss.item():.4f}  top {top} ({probs.max().item():.2f})")
    chosen = WEIGHT_CANDIDATES[int(theta.argmax())]
    info = scheme_info(chosen)
    print(f"  chose '{chosen}' ; probabilities " + " ".join(
        f"{n[:4]}={p:.2f}" for n, p in zip(WEIGHT_CANDIDATES, torch.softmax(theta, 0).tolist())))
    if not info.multi_bit:
        chosen, info = "clip", scheme_info("clip")
        print("  (fixed-bit scheme chosen: learning bits with 'clip' instead)")
    bits = torch.nn.Parameter(torch.tensor(3.0))
    opt = torch.optim.Adam([{"params": [W], "lr": 5e-3}, {"params": [bits], "lr": 2e-2}])
    target_bits = 2.0
    print(f"  QPL: learning the bitwidth of '{chosen}' toward a target of {target_bits} bits")
    for step in range(steps):
        wq = AF.quantize(W, chosen, bits, backend=backend)
        task = torch.nn.functional.mse_loss(x @ wq.T, target)
        loss = task + (bits - target_bits) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            bits.clamp_(info.min_bits - 0.49, info.max_bits + 0.49)
    b_final = int(min(max(round(bits.item()), info.min_bits), info.max_bits))
    final = torch.nn.functional.mse_loss(x @ AF.quantize(W, chosen, b_final).T, target).item()
    print(f"  learned bits {bits.item():.2f} -> {b_final}; task loss at {b_final} bits: {final:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoqnn.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    env = collect_env()
    ext = env["extension"]
    print(f"autoqnn {env['autoqnn']} | torch {env['torch']} | _C "
          f"{'loaded' if ext.get('HAS_EXT') else 'not loaded (' + str(ext.get('LOAD_ERROR')) + ')'}")
    tour_schemes(args.backend)
    tiny_search(args.steps, args.backend, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
