# SPDX-License-Identifier: MIT
"""Host time per quantizer call: forward + backward on a tiny tensor, where the kernels take a
few µs and what remains is Python, dispatcher and autograd bookkeeping (on a GPU this is the
time the CPU needs to issue one quantizer's work). Two providers side by side in one run:
``registered`` (the ops' torch.library autograd formula, as under torch.compile) and ``fast``
(the functional API's eager fast path), for AF.quantize, AF.quantize_mixture and the QSS
vertices (autoqnn.nn.SchemeMixture, weight and activation).

    python bench/bench_host.py                  # CPU, 64 elements
    python bench/bench_host.py --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch

import autoqnn.functional as AF
from autoqnn.nn import SchemeMixture


def _time_once(fn, device, calls):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    x = torch.randn(args.numel, device=dev, requires_grad=True)
    w = torch.softmax(torch.randn(8, device=dev), 0).requires_grad_()
    mw = SchemeMixture(kind="weight").to(dev)
    ma = SchemeMixture(kind="activation").to(dev)
    cases = {
        "AF.quantize (clip, 3 bits)": lambda: AF.quantize(x, "clip", 3).sum().backward(),
        "AF.quantize_mixture (8 candidates)": lambda: AF.quantize_mixture(x, w, AF.WEIGHT_CANDIDATES, 3).sum().backward(),
        "SchemeMixture weight": lambda: mw(x).sum().backward(),
        "SchemeMixture activation": lambda: ma(x).sum().backward(),
    }
    fast = AF._eager_fast
    slow = lambda *a: False  # noqa: E731
    res = {}
    # interleaved: every round times both providers; the minimum over rounds is kept
    try:
        for name, fn in cases.items():
            for prov in ("registered", "fast"):
                AF._eager_fast = fast if prov == "fast" else slow
                for _ in range(20):
                    fn()
            for _ in range(args.rounds):
                for prov in ("registered", "fast"):
                    AF._eager_fast = fast if prov == "fast" else slow
                    t = _time_once(fn, dev, args.calls)
                    res[(name, prov)] = min(res.get((name, prov), float("inf")), t)
    finally:
        AF._eager_fast = fast
    print(f"\n### Host time per quantizer call, fwd+bwd, {args.numel} elements on {dev} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| call | registered µs | fast µs | registered / fast |")
    print("|---|---:|---:|---:|")
    for name in cases:
        r, f = res[(name, "registered")], res[(name, "fast")]
        print(f"| {name} | {r:.1f} | {f:.1f} | {r / f:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
