# SPDX-License-Identifier: MIT
"""Does the batched op (all weights of a model in one call) pay? Measured, with its upper bound.

The QSS step quantizes every weight tensor of the model with the 8-candidate mixture, forward
and backward, one call per tensor. A batched op would process all of them in one launch per
pass. Its best case is what one call on the concatenation of all weights costs (same elements,
same work, one set of launches; statistics over the whole concatenation instead of per tensor,
which costs the same passes). This script times, side by side on the same weights:

* ``loop``: per tensor, statistics + mixture forward + backward (what autoqnn does today);
* ``concat``: ``torch.cat`` of the flattened weights, then one statistics + mixture forward +
  backward call (the batched op's best case, the cat included);
* ``concat-no-cat``: the same on a pre-concatenated tensor (the batched op without a copy);
* ``batched``: :func:`autoqnn.functional.quantize_mixture_batched`, the real batched op (per
  tensor statistics and mixture weights, the concatenation included).

``loop / concat-no-cat`` is the most a batched op could gain on this machine; ``loop / batched``
is what it gains.

    python bench/bench_batched.py                       # CPU, ResNet-18 and VGG-like weights
    python bench/bench_batched.py --device cuda         # GPU: launch overhead dominates here
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import autoqnn
import autoqnn.functional as AF


def resnet18_weights():
    s = [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4
    for cin, cout in ((64, 128), (128, 256), (256, 512)):
        s += [(cout, cin, 3, 3)] + [(cout, cout, 3, 3)] * 3 + [(cout, cin, 1, 1)]
    return s + [(1000, 512)]


def vgglike_weights(width=16, fc=256):
    w = width
    return [(w, 1, 3, 3), (w, w, 3, 3), (2 * w, w, 3, 3), (2 * w, 2 * w, 3, 3), (4 * w, 2 * w, 3, 3),
            (4 * w, 4 * w, 3, 3), (fc, 4 * w * 9)]


MODELS = {"resnet18": resnet18_weights(), "vgglike-w16": vgglike_weights()}


def _timeit(fn, device, rounds):
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU")
    cands = autoqnn.WEIGHT_CANDIDATES
    name = torch.cuda.get_device_name(0) if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"### Batched weights, upper bound: QSS mixture (8 candidates, 3 bits) fwd+bwd on {name}")
    print(f"torch {torch.__version__}; autoqnn {autoqnn.__version__}; backend {args.backend}\n")
    print("| weights | tensors | elements | loop ms | batched ms | concat ms | concat-no-cat ms | loop / batched "
          "| loop / concat-no-cat |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for mname in args.models:
        shapes = MODELS[mname]
        ws = [(torch.randn(s, generator=g) * 0.05).to(dev).requires_grad_() for s in shapes]
        theta = torch.zeros(len(cands), device=dev, requires_grad=True)
        thetas = torch.zeros(len(shapes), len(cands), device=dev, requires_grad=True)
        gys = [torch.randn(s, generator=g).to(dev) for s in shapes]
        flat = torch.cat([w.detach().reshape(-1) for w in ws]).requires_grad_()
        gflat = torch.cat([gy.reshape(-1) for gy in gys])

        def loop():
            m = torch.softmax(thetas, 1)  # one theta per layer, as the QSS search has
            ys = [AF.quantize_mixture(w, m[i], cands, 3, backend=args.backend) for i, w in enumerate(ws)]
            torch.autograd.backward(ys, gys)

        def concat():
            m = torch.softmax(theta, 0)
            x = torch.cat([w.reshape(-1) for w in ws])
            y = AF.quantize_mixture(x, m, cands, 3, backend=args.backend)
            torch.autograd.backward([y], [gflat])

        def concat_no_cat():
            m = torch.softmax(theta, 0)
            y = AF.quantize_mixture(flat, m, cands, 3, backend=args.backend)
            torch.autograd.backward([y], [gflat])

        def batched():
            m = torch.softmax(thetas, 1)
            ys = AF.quantize_mixture_batched(ws, m, cands, 3, backend=args.backend)
            torch.autograd.backward(ys, gys)

        t = [_timeit(f, dev, args.rounds) for f in (loop, batched, concat, concat_no_cat)]
        n = sum(math.prod(s) for s in shapes)
        print(f"| {mname} | {len(shapes)} | {n} | {t[0] * 1e3:.3f} | {t[1] * 1e3:.3f} | {t[2] * 1e3:.3f} | "
              f"{t[3] * 1e3:.3f} | {t[0] / t[1]:.2f}x | {t[0] / t[3]:.2f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
