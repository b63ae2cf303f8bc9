# SPDX-License-Identifier: MIT
"""Host time per quantizer call: forward + backward on a tiny tensor, where the kernels take a
few µs and what remains is Python, dispatcher and autograd bookkeeping (on a GPU this is the
time the CPU needs to issue one quantizer's work). Three providers side by side in one run:
``registered`` (the ops' torch.library autograd formula, as under torch.compile), ``fast-py``
(the functional API's eager fast path with its Python autograd Functions, as in builds
without the extension) and ``fast`` (the same path with the C++ autograd nodes of
csrc/autograd.cpp, the default where the extension is built), for AF.quantize,
AF.quantize_mixture and the QSS vertices (autoqnn.nn.SchemeMixture, weight and activation).

A second table times each op alone, called below the autograd key as the fast path calls it:
the host cost of the kernels' own entry code (argument checks, conversions, allocations,
launches). On a GPU that is where unexplained host time inside an op shows up; the loop
synchronises only at its end, so a call whose kernels outlast its host work would show device
time instead (not at 64 elements).

    python bench/bench_host.py                  # CPU, 64 elements
    python bench/bench_host.py --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch

import autoqnn.functional as AF
from autoqnn import _ext
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
    nodes = (AF._CPP_QUANTIZE, AF._CPP_MIXTURE)
    provs = ("registered", "fast-py") + (("fast",) if AF._CPP_MIXTURE is not None else ())

    def use(prov):
        AF._eager_fast = slow if prov == "registered" else fast
        AF._CPP_QUANTIZE, AF._CPP_MIXTURE = nodes if prov == "fast" else (None, None)

    res = {}
    # interleaved: every round times every provider; the minimum over rounds is kept
    try:
        for name, fn in cases.items():
            for prov in provs:
                use(prov)
                for _ in range(20):
                    fn()
            for _ in range(args.rounds):
                for prov in provs:
                    use(prov)
                    t = _time_once(fn, dev, args.calls)
                    res[(name, prov)] = min(res.get((name, prov), float("inf")), t)
    finally:
        AF._eager_fast = fast
        AF._CPP_QUANTIZE, AF._CPP_MIXTURE = nodes
    ops_res = _time_ops(x.detach(), w.detach(), dev, args)
    print(f"\n### Host time per quantizer call, fwd+bwd, {args.numel} elements on {dev} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    if "fast" not in provs:
        print("(no C++ autograd nodes: the extension is not loaded; `fast` = `fast-py`)\n")
    best = provs[-1]
    print("| call | " + " | ".join(f"{p} µs" for p in provs) + " | " +
          " | ".join(f"{p} / {best}" for p in provs[:-1]) + " |")
    print("|---|" + "---:|" * (2 * len(provs) - 1))
    for name in cases:
        ts = [res[(name, p)] for p in provs]
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in ts) + " | " +
              " | ".join(f"{t / ts[-1]:.2f}x" for t in ts[:-1]) + " |")
    print(f"\n### One op alone, below autograd (the kernels' entry code), {args.numel} elements on {dev}\n")
    print("| op | µs per call |")
    print("|---|---:|")
    for name, t in ops_res.items():
        print(f"| {name} | {t:.1f} |")
    return 0


def _time_ops(x, w, dev, args):
    """µs per call of each op alone (minimum over rounds), for the 8 weight candidates at 3 bits
    (mixture) and ClipQ at 3 bits (quantize), through the op overloads the fast path uses."""
    ops = torch.ops.autoqnn
    cuda = "_cuda" if dev == "cuda" and _ext.HAS_CUDA_KERNELS else ""
    _, sids, bits, _, _ = AF._mixture_candidates(AF.WEIGHT_CANDIDATES, 3)
    (clip,), _, bits1, _, _ = AF._resolve(("clip",), 3)
    with torch._C._AutoDispatchBelowAutograd():
        p = ops.scheme_params.default(x, bits, sids, False, False)
        p1 = ops.scheme_params.default(x, bits1, [clip.id], False, False)
    gy = torch.randn_like(x)
    mix = getattr(ops, "mixture" + cuda).default
    mixb = getattr(ops, "mixture_backward" + cuda).default
    q = getattr(ops, "quantize" + cuda).default
    qb = getattr(ops, "quantize_backward" + cuda).default
    sp = ops.scheme_params.default
    cases = {
        "scheme_params (8 candidates)": lambda: sp(x, bits, sids, False, False),
        f"mixture{cuda}": lambda: mix(x, p, w, bits, sids, False),
        f"mixture_backward{cuda} (grad x, weights)": lambda: mixb(gy, x, p, w, bits, sids, False, True, False),
        f"quantize{cuda} (clip)": lambda: q(x, p1, bits1, clip.id, False),
        f"quantize_backward{cuda} (clip)": lambda: qb(gy, x, p1, bits1, clip.id, False, False),
    }
    res = {}
    with torch._C._AutoDispatchBelowAutograd():
        for name, fn in cases.items():
            for _ in range(20):
                fn()
            res[name] = min(_time_once(fn, dev, args.calls) for _ in range(args.rounds))
    return res


if __name__ == "__main__":
    raise SystemExit(main())
