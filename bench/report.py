# SPDX-License-Identifier: MIT
"""Markdown table of the QSS mixture step (8 weight candidates at 3 bits, forward + backward
w.r.t. x and the mixture weights) for every provider on the same inputs.

    python bench/report.py                     # CPU: 2^12..2^22 + ResNet-18 weight shapes
    python bench/report.py --device cuda       # GPU: 2^12..2^26 + ResNet-18 weights and
                                               # activations at batch 128, GB/s vs copy
    python bench/report.py --max-log2 24 --resnet18-acts --rounds 5
    python bench/report.py --device cuda --stats   # + scheme_params alone (Triton statistics)

Providers: ``eager`` (pure-PyTorch reference: the naive 8-quantizer loop), ``compiled``
(``torch.compile`` of it), ``cpp`` (CPU) / ``cuda`` and ``triton`` (GPU) autoqnn kernels,
``cuda-levels`` / ``triton-levels`` on request (``--providers``: the same ops with
``AUTOQNN_CUDA_LEVELS=1`` / ``AUTOQNN_TRITON_LEVELS=1``, the levels-table output pass), ``auto`` on GPUs (the default backend: per op and size the faster of the two, from the table
``autoqnn tune-kernels`` measured; run that first, the header says which table was used),
``fake_quant`` (``torch.fake_quantize_per_tensor_affine`` fwd+bwd: ONE scheme with a given
scale, a yardstick, not a competitor) and ``copy`` (read x + write y, read g + write gx: the
bandwidth ceiling). GB/s counts 28 bytes per fp32 element for forward + backward with exact
statistics (KERNELS.md).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import autoqnn
import autoqnn.functional as AF
from autoqnn import backends

BYTES_PER_ELEM = 28

RESNET18_WEIGHTS = {
    "r18.conv1.w": (64, 3, 7, 7),
    "r18.layer1.w": (64, 64, 3, 3),
    "r18.layer2.w": (128, 128, 3, 3),
    "r18.layer3.w": (256, 256, 3, 3),
    "r18.layer4.w": (512, 512, 3, 3),
    "r18.fc.w": (1000, 512),
}
RESNET18_ACTS_B128 = {
    "r18.conv1.in": (128, 3, 224, 224),
    "r18.layer1.act": (128, 64, 56, 56),
    "r18.layer2.act": (128, 128, 28, 28),
    "r18.layer3.act": (128, 256, 14, 14),
    "r18.layer4.act": (128, 512, 7, 7),
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, rounds, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        try:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except Exception:  # noqa: BLE001 - fall back to events
            pass
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


_COMPILED = {}


def make_step(provider, x, theta, gy):
    cands = autoqnn.WEIGHT_CANDIDATES
    if provider == "copy":
        y = torch.empty_like(x)
        gx = torch.empty_like(x)

        def step():
            y.copy_(x)
            gx.copy_(gy)

        return step
    if provider == "fake_quant":
        xs = x.detach().requires_grad_()
        scale = float(x.detach().float().std()) * 0.586 + 1e-12

        def step():
            y = torch.fake_quantize_per_tensor_affine(xs, scale, 0, -4, 3)
            torch.autograd.grad(y, [xs], gy)

        return step
    backend = {"eager": "torch", "compiled": "torch", "triton-levels": "triton", "cuda-levels": "cuda"}.get(
        provider, provider)

    def f(x, w):
        return AF.quantize_mixture(x, w, cands, 3, backend=backend)

    if provider == "compiled":
        f = _COMPILED.setdefault("f", torch.compile(f))

    def step():
        w = torch.softmax(theta, 0)
        torch.autograd.grad(f(x, w), [x, theta], gy)

    if provider.endswith("-levels"):  # the ops through their levels-table output pass
        plain = step
        var = "AUTOQNN_TRITON_LEVELS" if provider == "triton-levels" else "AUTOQNN_CUDA_LEVELS"

        def step():
            old = os.environ.get(var)
            os.environ[var] = "1"
            try:
                plain()
            finally:
                if old is None:
                    os.environ.pop(var)
                else:
                    os.environ[var] = old

    return step


def make_stats_step(provider, x):
    """scheme_params of the 8 weight candidates at 3 bits (per tensor): every statistic the
    mixture needs (pass 1 + the dependent passes)."""
    from autoqnn.ops import reference as ref
    from autoqnn.schemes import resolve_bits, scheme_info

    sids = [scheme_info(s).id for s in autoqnn.WEIGHT_CANDIDATES]
    ints = resolve_bits(sids, 3)
    bits = torch.tensor(ints, dtype=torch.float32, device=x.device)
    if provider == "read":  # one read of x: the floor of any statistics pass
        return lambda: x.sum()
    if provider == "eager":
        return lambda: ref.scheme_params_ref(x, bits, sids, False)
    if provider == "compiled":
        f = _COMPILED.setdefault("stats", torch.compile(ref.params_rows))
        return lambda: f(x.reshape(1, -1), ints, sids)
    if provider == "triton":
        return lambda: torch.ops.autoqnn.scheme_params_triton(x, bits, sids, False)
    return lambda: torch.ops.autoqnn.scheme_params(x, bits, sids, False)  # "op": the dispatcher's kernel


def stats_table(device, shapes, rounds, compile_=True):
    provs = ["eager", "compiled", "op"] if compile_ else ["eager", "op"]
    if device == "cuda" and "scheme_params" in backends.TRITON_OPS:
        provs.append("triton")
    provs.append("read")
    op_kernel = backends.kernel_for("scheme_params", device)
    print(f"\n### Statistics: scheme_params of the 8 weight candidates at 3 bits, per tensor "
          f"(`op` = the dispatcher's kernel here: {op_kernel}; `read` = x.sum(), one read)\n")
    cols = ["shape", "elements", "provider", "ms", "vs eager", "vs compiled", "passes of x (time / read)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    g = torch.Generator().manual_seed(1)
    for name, shape in shapes.items():
        n = math.prod(shape)
        x = torch.randn(shape, generator=g).to(device)
        res = {}
        for p in provs:
            try:
                res[p] = time_fn(make_stats_step(p, x), device, rounds)
            except Exception as e:  # noqa: BLE001
                print(f"<!-- {p} failed on {name}: {type(e).__name__}: {e} -->", file=sys.stderr)
        for p, t in res.items():
            e = f"{res['eager'] / t:.2f}x" if "eager" in res else "-"
            c = f"{res['compiled'] / t:.2f}x" if "compiled" in res else "-"
            r = f"{t / res['read']:.1f}" if "read" in res else "-"
            print(f"| {name} | {n} | {p} | {t * 1e3:.3f} | {e} | {c} | {r} |")
        sys.stdout.flush()


def providers_for(device):
    out = ["eager", "compiled"]
    for p in (["cpp"] if device == "cpu" else ["cuda", "triton"]):
        try:
            backends.resolve(p, torch.device(device), AF._needs(p, "mixture", "mixture_backward"))
            out.append(p)
        except autoqnn.BackendUnavailableError as e:
            print(f"<!-- {p} unavailable: {e} -->", file=sys.stderr)
    if device == "cuda":
        out.append("auto")  # the router: per op and size, the kernel the choice table names
    return out + ["fake_quant", "copy"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--min-log2", type=int, default=12)
    ap.add_argument("--max-log2", type=int, default=None, help="default 22 on CPU, 26 on GPU")
    ap.add_argument("--eager-max-log2", type=int, default=22, help="skip eager/compiled above this size")
    ap.add_argument("--resnet18-acts", action="store_true", help="also ResNet-18 activations at batch 128")
    ap.add_argument("--no-resnet18", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stats", action="store_true", help="also the statistics table (scheme_params alone)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (smoke runs)")
    ap.add_argument("--stats-only", action="store_true", help="only the statistics table")
    ap.add_argument("--providers", default=None, help="comma-separated subset of the mixture table's providers")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU")
    max_log2 = args.max_log2 if args.max_log2 is not None else (22 if device == "cpu" else 26)
    shapes = {f"2^{k}": (2**k,) for k in range(args.min_log2, max_log2 + 1)}
    if not args.no_resnet18:
        shapes.update(RESNET18_WEIGHTS)
    if args.resnet18_acts or (device == "cuda" and not args.no_resnet18):
        shapes.update(RESNET18_ACTS_B128)
    if args.stats_only:
        stats_table(device, shapes, args.rounds, compile_=not args.no_compile)
        return
    provs = [p for p in providers_for(device) if not (args.no_compile and p == "compiled")]
    default = list(provs)
    for p in ("cuda", "triton"):  # on request only (--providers): the ops' levels-table output pass
        if p in provs:
            provs.insert(provs.index(p) + 1, f"{p}-levels")
    if args.providers:
        wanted = args.providers.split(",")
        unknown = sorted(set(wanted) - set(provs))
        if unknown:
            sys.exit(f"unknown or unavailable providers {unknown}; available: {provs}")
        provs = [p for p in provs if p in wanted]
    else:
        provs = [p for p in default]
    dev = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"### QSS mixture step (8 candidates, 3 bits, fp32, fwd+bwd) on {dev}")
    print(f"torch {torch.__version__}; autoqnn {autoqnn.__version__}")
    if device == "cuda":
        from autoqnn import kernel_choice as kc

        tab = kc._current_table()["devices"].get(kc.device_key(torch.device("cuda")))
        print(f"auto: kernel choice table {kc.default_path()}" + ("" if tab else " (none for this GPU: "
              "run `autoqnn tune-kernels` first; auto = C++/CUDA where built)"))
    print()
    cols = ["shape", "elements", "provider", "ms", "vs eager", "vs compiled", "GB/s", "% of copy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        n = math.prod(shape)
        x = torch.randn(shape, generator=g).to(device).requires_grad_()
        theta = torch.randn(8, generator=g).to(device).requires_grad_()
        gy = torch.randn(shape, generator=g).to(device)
        res = {}
        for p in provs:
            if p in ("eager", "compiled") and n > 2**args.eager_max_log2:
                continue
            try:
                res[p] = time_fn(make_step(p, x, theta, gy), device, args.rounds)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"<!-- {p} failed on {name}: {type(e).__name__}: {e} -->", file=sys.stderr)
        copy_bw = 16 * n / res["copy"] / 1e9 if "copy" in res else None
        for p, t in res.items():
            e = f"{res['eager'] / t:.2f}x" if "eager" in res else "-"
            c = f"{res['compiled'] / t:.2f}x" if "compiled" in res else "-"
            gbs = (16 if p == "copy" else BYTES_PER_ELEM) * n / t / 1e9
            pct = f"{100 * gbs / copy_bw:.0f}%" if copy_bw and device == "cuda" else "-"
            print(f"| {name} | {n} | {p} | {t * 1e3:.3f} | {e} | {c} | {gbs:.1f} | {pct} |")
        sys.stdout.flush()
    if args.stats:
        stats_table(device, shapes, args.rounds, compile_=not args.no_compile)


if __name__ == "__main__":
    main()
