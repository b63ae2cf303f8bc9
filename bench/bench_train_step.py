# SPDX-License-Identifier: MIT
"""Cost of the search: one QSS training step (every quantizer a mixture of all candidates,
forward + backward + optimizer step) and one QPL step (chosen schemes, learned bits, precision
loss) against one float training step, same model, batch and optimizer.

Providers: ``float`` (no quantizers), ``qss-ref`` / ``qpl-ref`` (quantizers on the pure-PyTorch
reference backend), ``qss-fused`` / ``qpl-fused`` (backend "auto": the C++ kernels on CPU, CUDA or
Triton on GPU; the forward and backward inside :func:`autoqnn.nn.bits_on_host`, as the pipeline's
QPL phase runs them); ``qpl-sync`` is ``qpl-fused`` without that block (every quantizer call reads
its learned bits on the host: a stream sync each on a GPU); ``qss-pruned2`` is the fused QSS step after candidate pruning left 2 candidates
per vertex (what pruning saves late in a search); ``qss-batched`` is ``qss-fused`` with every weight
vertex quantized in one batched call per step (:class:`autoqnn.nn.WeightBatcher`; what
``SearchConfig.batch_weights`` switches on); ``qss-levels`` (on request) is ``qss-fused`` with the GPU
output kernels' levels-table pass on long rows (``AUTOQNN_CUDA_LEVELS=auto``,
``AUTOQNN_TRITON_LEVELS=auto``; the same as ``qss-fused`` on CPU). ``float-compiled``, ``qss-compiled`` and ``qpl-compiled``
run the same steps with the model under ``torch.compile`` (Inductor; ``--compile-mode`` passes a mode
such as ``reduce-overhead``): the float model with plain ``torch.compile``, the quantized ones with
``autoqnn.compile_model`` as ``SearchConfig(compile=True)`` does (the quantizers trace into one graph). They are not in the default list (Inductor compiles for a minute or two first). Issue #5's
goal: QSS-fused <= 1.5x float on CPU, <= 1.3x on GPU.

    python bench/bench_train_step.py                 # CPU: VGG-like (width 16) on 28x28, batch 128
    python bench/bench_train_step.py --device cuda   # GPU: ResNet-18 at 224 px, batch 128
    python bench/bench_train_step.py --channels-last # the same in channels-last memory format
    python -m pytest bench/bench_train_step.py       # the same through pytest-benchmark
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import pytest
import torch
import torch.nn.functional as F

import autoqnn
from autoqnn.config import QuantConfig
from autoqnn.nn import bits_on_host
from autoqnn.pipeline import SearchConfig, fix_schemes, precision_loss, prepare

DEFAULT_PROVIDERS = ["float", "qss-ref", "qss-fused", "qss-batched", "qss-pruned2", "qpl-ref", "qpl-fused", "qpl-sync"]
#: on request: ``qss-fused`` with the GPU output kernels' levels-table pass on long rows
#: (``AUTOQNN_CUDA_LEVELS=auto``, ``AUTOQNN_TRITON_LEVELS=auto``; the same as qss-fused on CPU)
EXTRA_PROVIDERS = ["qss-levels"]
LEVELS_ENV = ("AUTOQNN_CUDA_LEVELS", "AUTOQNN_TRITON_LEVELS")
COMPILED_PROVIDERS = ["float-compiled", "qss-compiled", "qpl-compiled"]
PROVIDERS = DEFAULT_PROVIDERS + COMPILED_PROVIDERS + EXTRA_PROVIDERS
#: batch size override (main() sets it from --batch; None: 128). A tiny batch makes the step's
#: compute negligible, so on a CPU the step time is the host time a GPU step would pay.
BATCH = None
#: channels-last model and input (main() sets it from --channels-last)
CHANNELS_LAST = False
#: torch.compile(mode=..., backend=...) for the *-compiled providers (main() sets them)
COMPILE_MODE = None
COMPILE_BACKEND = "inductor"


def make_model(device: str):
    b = BATCH or 128
    if device == "cuda":
        import torchvision

        return torchvision.models.resnet18(num_classes=1000), (b, 3, 224, 224), 1000
    from autoqnn.models import build_model

    return build_model("vgglike-small"), (b, 1, 28, 28), 10


@contextlib.contextmanager
def _levels_env():
    old = {v: os.environ.get(v) for v in LEVELS_ENV}
    os.environ.update({v: "auto" for v in LEVELS_ENV})
    try:
        yield
    finally:
        for v, o in old.items():
            if o is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = o


def make_step(provider: str, device: str):
    levels = provider == "qss-levels"
    if levels:
        provider = "qss-fused"
    compiled = provider.endswith("-compiled")
    if compiled:
        provider = {"float-compiled": "float", "qss-compiled": "qss-fused", "qpl-compiled": "qpl-fused"}[provider]
    torch.manual_seed(0)
    model, shape, classes = make_model(device)
    model = model.to(device)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)
    qpl = provider.startswith("qpl")
    if provider != "float":
        backend = "torch" if provider.endswith("-ref") else None
        cfg = SearchConfig(quant=QuantConfig(backend=backend), precision_epochs=1 if qpl else 0)
        model = prepare(model, cfg, x[:2]).to(device)
        if qpl:
            fix_schemes(model, learn_bits=True)
            model.to(device)
        if provider == "qss-pruned2":  # candidate pruning late in a search: 2 candidates left per vertex
            from autoqnn.nn import SchemeMixture, quantizers

            for _, q in quantizers(model):
                if isinstance(q, SchemeMixture):
                    with torch.no_grad():
                        q.theta.copy_(torch.arange(len(q.schemes), dtype=torch.float32))
                    q.update_pruning(threshold=0.99, patience=1)  # keeps the argmax ...
                    q.active[-2] = True  # ... and one more
                    q._refresh_from_buffers()
        if provider == "qss-batched":
            from autoqnn.nn import WeightBatcher

            model._bench_batcher = WeightBatcher(model)  # kept alive with the model
    if CHANNELS_LAST:  # the conv weights and the input (activations follow the convolutions)
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    host_bits = qpl and provider != "qpl-sync"
    fwd = model
    if compiled and provider == "float":  # what a user compiles a float model with
        kw = {"mode": COMPILE_MODE} if COMPILE_MODE else {}
        fwd = torch.compile(model, backend=COMPILE_BACKEND, **kw)
    elif compiled:  # what SearchConfig(compile=...) does
        fwd = autoqnn.compile_model(model, backend=COMPILE_BACKEND, mode=COMPILE_MODE)

    graphs = compiled and COMPILE_MODE in ("reduce-overhead", "max-autotune")

    def step():
        if graphs:  # CUDA graphs: a new iteration (the last one's outputs may be overwritten)
            torch.compiler.cudagraph_mark_step_begin()
        with bits_on_host(model) if host_bits else contextlib.nullcontext(), \
                _levels_env() if levels else contextlib.nullcontext():
            loss = F.cross_entropy(fwd(x), y)
            if qpl:
                loss = loss + precision_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step, device, rounds=5, warmup=2) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def bench_train_step(benchmark, device_skip, device, provider):
    from conftest import record

    device_skip(device)
    step = make_step(provider, device)
    record(benchmark, f"train-step/{device}", provider, step, device, rounds=5, warmup=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                    help=f"comma-separated subset of {','.join(PROVIDERS)} (float is always measured; "
                         "default: all but the compiled ones)")
    ap.add_argument("--compile-mode", help="torch.compile mode for the *-compiled providers (e.g. reduce-overhead)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend for the *-compiled providers (default inductor)")
    ap.add_argument("--batch", type=int, help="batch size (default 128); e.g. 2 on a CPU measures the host "
                                               "time per step, what a host-bound GPU step pays")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and input in channels-last memory format (the quantizers keep it)")
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="skip the second, interleaved measurement")
    args = ap.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be >= 1")
    global COMPILE_MODE, COMPILE_BACKEND, BATCH, CHANNELS_LAST
    COMPILE_MODE, COMPILE_BACKEND, BATCH = args.compile_mode, args.compile_backend, args.batch
    CHANNELS_LAST = args.channels_last
    provs = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = sorted(set(provs) - set(PROVIDERS))
    if bad:
        ap.error(f"unknown provider(s) {bad}; choose from {PROVIDERS}")
    provs = ["float"] + [p for p in provs if p != "float"]
    model, shape, _ = make_model(args.device)
    print(f"\n{type(model).__name__} batch {list(shape)}{' channels-last' if CHANNELS_LAST else ''} on {args.device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, autoqnn {autoqnn.__version__})\n")
    if "float-compiled" in provs:  # measured second: the compiled rows get a ratio to it too
        provs = ["float", "float-compiled"] + [p for p in provs if p not in ("float", "float-compiled")]
    def table(title, times):
        print(f"\n{title}\n")
        print("| step | median ms | vs float | vs float-compiled |")
        print("|---|---:|---:|---:|", flush=True)

    def row(p, t, times):
        base, base_c = times.get("float"), times.get("float-compiled")
        rc = f"{t / base_c:.2f}x" if base_c is not None else ""
        print(f"| {p} | {t * 1e3:.1f} | {t / base:.2f}x | {rc} |", flush=True)

    # 1) one provider after the other, a row as soon as it is measured (a run cut short still
    #    reports what it measured); 2) every provider's step in turn, round after round, so that
    #    a machine whose speed drifts (shared CPUs) biases no provider: the ratios to trust.
    table("One provider after the other:", {})
    steps, seq = {}, {}
    for p in provs:
        steps[p] = make_step(p, args.device)
        seq[p] = time_step(steps[p], args.device, args.rounds)
        row(p, seq[p], seq)
    if args.interleave and len(steps) > 1:
        ts = {p: [] for p in provs}
        for _ in range(args.rounds):
            for p, step in steps.items():
                _sync(args.device)
                t0 = time.perf_counter()
                step()
                _sync(args.device)
                ts[p].append(time.perf_counter() - t0)
        med = {p: sorted(v)[len(v) // 2] for p, v in ts.items()}
        table(f"Interleaved ({args.rounds} rounds, each provider's step in turn):", med)
        for p in provs:
            row(p, med[p], med)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
