# SPDX-License-Identifier: MIT
"""What the first compiled training step costs: Dynamo + AOTAutograd + Inductor's code
generation, for a float model and for the same model prepared for the scheme search (QSS, every
quantizer a mixture of all candidates, compiled with ``autoqnn.compile_model`` as
``SearchConfig(compile=True)`` does), then the steady step time.

Each (model, provider) runs in its own process with an empty Inductor cache directory and the
FX-graph cache off, so nothing compiled by an earlier run is reused. Providers:

* ``float``: ``torch.compile(model)``;
* ``qss``: the prepared model; the Gumbel noise's integer hash is one ``autoqnn::uniform48`` call
  per quantizer where a C++/CUDA kernel serves the device;
* ``qss-traced-noise``: the same with the hash traced as the reference's int64 tensor ops (what
  every device without a kernel gets, and what all did before the op existed).

    python bench/compile_time.py                        # test-sized net and ResNet-18 on CPU
    python bench/compile_time.py --models resnet18 --device cuda
    python bench/compile_time.py --backend aot_eager    # Dynamo + AOTAutograd only (fast)

Prints a Markdown table. No timing is asserted anywhere (the machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROVIDERS = ["float", "qss", "qss-traced-noise"]
#: name -> (input shape without the batch, classes)
MODELS = {"smallcnn": ((1, 28, 28), 10), "vgglike-small": ((1, 28, 28), 10), "resnet18": ((3, 64, 64), 10)}


def _child(model_name: str, provider: str, device: str, batch: int, backend: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    import autoqnn
    from autoqnn.config import QuantConfig
    from autoqnn.models import build_model
    from autoqnn.pipeline import SearchConfig, prepare

    shape, classes = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=classes, in_channels=shape[0], image_size=shape[1]).to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if provider == "float":
        fwd = torch.compile(model, backend=backend)
    else:
        if provider == "qss-traced-noise":
            import importlib

            # the quantizers' check "does a kernel serve this device?" answers no
            importlib.import_module("autoqnn.nn.quantizers").has_kernel = lambda op, key: False
        model = prepare(model, SearchConfig(quant=QuantConfig()), x[:2]).to(device)
        fwd = autoqnn.compile_model(model, backend=backend)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"first_s": first, "step_ms": 1000 * min(times) if times else float("nan")}


def measure(model_name, provider, device, batch, backend, steps) -> dict:
    """One fresh process: an empty Inductor cache, no FX-graph cache."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="autoqnn-inductor-") as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
        args = [sys.executable, os.path.abspath(__file__), "--child", model_name, provider, device,
                str(batch), backend, str(steps)]
        r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{model_name}/{provider} failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        m, p, d, b, be, s = sys.argv[2:8]
        print(json.dumps(_child(m, p, d, int(b), be, int(s))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smallcnn,resnet18", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--steps", type=int, default=5, help="steady steps timed after the first (best kept)")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    providers = [p for p in a.providers.split(",") if p]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for p in providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; choose from {PROVIDERS}")
    print(f"### First compiled training step ({a.backend}, {a.device}, batch {a.batch}, empty caches)\n")
    print("| model | provider | first step (s) | ratio to float | steady step (ms) |")
    print("|---|---|---:|---:|---:|")
    for m in models:
        base = None
        for p in providers:
            r = measure(m, p, a.device, a.batch, a.backend, a.steps)
            if p == "float":
                base = r["first_s"]
            ratio = f"{r['first_s'] / base:.2f}x" if base else "-"
            print(f"| {m} | {p} | {r['first_s']:.1f} | {ratio} | {r['step_ms']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
