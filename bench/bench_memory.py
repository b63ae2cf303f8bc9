# SPDX-License-Identifier: MIT
"""Extra memory of the QSS mixture step (8 weight candidates at 3 bits, forward + backward
w.r.t. x and the mixture weights), per provider, in units of x's size. The issue's target: the
backward needs at most one extra tensor the size of x.

    python bench/bench_memory.py                      # CPU, 2^22 elements (fp32)
    python bench/bench_memory.py --device cuda        # GPU, 2^24 elements
    python bench/bench_memory.py --log2 20 --providers eager,cpp

Two numbers per provider, both beyond what the step must produce:

* **saved**: memory still held between forward and backward, beyond y (what autograd saved
  that was not alive before: the reference's per-candidate masks and levels, ...);
* **backward peak**: the backward's peak above its start, beyond grad_x (temporaries).

Their sum is the extra memory for backward; ``x`` itself (the layer's weight or input) is alive
anyway and not counted. On CUDA the caching allocator's counters measure it exactly. On a CPU
the process's resident set does (``/proc/self/statm``; the peak from ``VmHWM``, reset through
``/proc/self/clear_refs``): the script runs itself with glibc's mmap threshold fixed at 64 KiB,
so every tensor above that is its own mapping, returned to the system when freed. CPU
numbers are good to about 0.1x of a 16 MB tensor; where ``/proc`` cannot be used they are n/a.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import autoqnn
import autoqnn.functional as AF
from autoqnn import _ext, backends

_ENV = "MALLOC_MMAP_THRESHOLD_"


# ----------------------------------------------------------------------------- meters
class _CudaMeter:
    def __init__(self, device):
        self.device = device

    def now(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


class _ProcMeter:
    """Resident set size and its high-water mark (Linux)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def usable() -> str | None:
        if os.environ.get(_ENV) is None:
            return f"${_ENV} is not set (glibc would keep freed tensors mapped)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            with open("/proc/self/statm") as f:
                f.read()
        except OSError as e:
            return f"/proc cannot measure the resident set here ({e})"
        return None

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status")


# ----------------------------------------------------------------------------- providers
_COMPILED: dict = {}


def providers_for(device: str) -> list[str]:
    """Ours first and torch.compile last (its compilation is the slow part of a run)."""
    out = []
    if device == "cpu":
        if _ext.HAS_EXT:
            out.append("cpp")
    else:
        if _ext.HAS_CUDA_KERNELS:
            out.append("cuda")
        if backends.TRITON_ERROR is None:
            out.append("triton")
        out.append("auto")
    return out + ["fake_quant", "eager", "compiled"]


def make_step(provider: str, x: torch.Tensor, theta: torch.Tensor):
    """f() -> (y, leaves): the forward; the caller runs the backward."""
    cands = autoqnn.WEIGHT_CANDIDATES
    if provider == "fake_quant":  # ONE scheme, torch's own op: a yardstick
        scale = float(x.detach().float().std()) * 0.586 + 1e-12
        return lambda: (torch.fake_quantize_per_tensor_affine(x, scale, 0, -4, 3), [x])
    backend = "torch" if provider in ("eager", "compiled") else provider

    def f(x_, w_):
        return AF.quantize_mixture(x_, w_, cands, 3, backend=backend)

    if provider == "compiled":
        f = _COMPILED.setdefault("f", torch.compile(f))
    return lambda: (f(x, torch.softmax(theta, 0)), [x, theta])


def measure(provider: str, n: int, device: str, meter, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, generator=g).to(device).requires_grad_()
    theta = torch.zeros(len(autoqnn.WEIGHT_CANDIDATES), device=device, requires_grad=True)
    gy = torch.randn(n, generator=g).to(device)
    fwd = make_step(provider, x, theta)
    for _ in range(2):  # warm-up: compilation, kernel caches, the allocator's first pages
        y, leaves = fwd()
        torch.autograd.grad(y, leaves, gy)
        del y
    m0 = meter.now()
    y, leaves = fwd()
    m1 = meter.now()
    saved = m1 - m0 - y.numel() * y.element_size()
    meter.reset_peak()
    m2 = meter.now()
    grads = torch.autograd.grad(y, leaves, gy)
    peak = meter.peak()
    transient = peak - m2 - grads[0].numel() * grads[0].element_size()
    xb = x.numel() * x.element_size()
    return {"provider": provider, "numel": n, "saved": max(saved, 0) / xb,
            "bwd_peak": max(transient, 0) / xb, "extra": (max(saved, 0) + max(transient, 0)) / xb}


def header(device, n) -> list[str]:
    return [f"### Extra memory of the mixture step's backward, {n} fp32 elements on {device} "
            f"(torch {torch.__version__}), in units of x's size",
            "",
            "| provider | saved between fwd and bwd | backward peak beyond grad_x | extra (target <= 1) |",
            "|---|---:|---:|---:|"]


def row(r) -> str:
    if "error" in r:
        return f"| {r['provider']} | n/a | n/a | {r['error']} |"
    return f"| {r['provider']} | {r['saved']:.2f}x | {r['bwd_peak']:.2f}x | {r['extra']:.2f}x |"


def run(device: str, log2: int, providers=None, echo: bool = False) -> tuple[list, str]:
    """(rows, Markdown table); with ``echo`` each line is printed as soon as it is known (a
    run cut short by a time limit still shows the providers it measured)."""
    n = 1 << log2
    if device == "cuda":
        meter = _CudaMeter(torch.device("cuda"))
    else:
        why = _ProcMeter.usable()
        if why is not None:
            msg = f"CPU memory not measurable: {why}"
            if echo:
                print(msg, flush=True)
            return [], msg
        meter = _ProcMeter()
    lines = header(device, n)
    if echo:
        print("\n".join(lines), flush=True)
    rows = []
    for p in providers or providers_for(device):
        try:
            rows.append(measure(p, n, device, meter))
        except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others
            rows.append({"provider": p, "error": f"{type(e).__name__}: {e}"[:120]})
        lines.append(row(rows[-1]))
        if echo:
            print(lines[-1], flush=True)
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--log2", type=int, default=None, help="log2 of the element count (cpu 22, cuda 24)")
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get(_ENV) is None and sys.platform.startswith("linux"):
        # freed tensors must go back to the system for the resident set to measure them
        env = dict(os.environ, **{_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]), env)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    log2 = args.log2 if args.log2 is not None else (24 if args.device == "cuda" else 22)
    provs = args.providers.split(",") if args.providers else None
    rows, _ = run(args.device, log2, provs, echo=True)
    return 0 if rows else 1


def bench_memory_cpu():
    """Under pytest: the CPU table at 2^20 elements (printed with -s). The resident set is only
    exact with the mmap threshold fixed, so without it the table says n/a."""
    rows, text = run("cpu", 20)
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
