# SPDX-License-Identifier: MIT
"""The QSS step (all candidate schemes of a tensor, forward and backward) and the QPL step
(one scheme with a learned bitwidth), provider by provider on the same inputs:

* ``eager``    - the pure-PyTorch reference (the naive K-quantizer loop a user writes today);
* ``compiled`` - ``torch.compile`` of that reference (Inductor fuses it);
* ``cpp``      - autoqnn's C++ CPU kernels (CPU only);
* ``cuda`` / ``triton`` - autoqnn's GPU kernels (GPU only);
* ``auto``     - the default backend on GPUs: per op and size the kernel ``autoqnn tune-kernels``
  measured to be faster (C++/CUDA where built when no table exists).

``python -m pytest bench/bench_mixture.py -q`` prints pytest-benchmark's tables and, at the end,
one ratio table (see bench/conftest.py). KERNELS.md's bar, on this project's 2-core machine:
8-candidate mixture on 4M fp32 elements, forward + backward w.r.t. x and the mixture weights:
eager 321 ms, torch.compile 79 ms.
"""
import pytest
import torch

import autoqnn
import autoqnn.functional as AF
from autoqnn import backends

from conftest import record

SHAPES = {
    "flat4M": (4_000_000,),
    "conv512x512x3x3": (512, 512, 3, 3),
    "act32x64x56x56": (32, 64, 56, 56),
}
CPU_PROVIDERS = ["eager", "compiled", "cpp"]
GPU_PROVIDERS = ["eager", "compiled", "cuda", "triton", "auto"]
CASES = [("cpu", p) for p in CPU_PROVIDERS] + [("cuda", p) for p in GPU_PROVIDERS]

_COMPILED = {}


def _fn(provider, kind):
    """A callable (x, w, bits) -> y for the provider, compiled once per (provider, kind)."""
    backend = {"eager": "torch", "compiled": "torch"}.get(provider, provider)
    if kind == "qss":
        def f(x, w, bits):
            return AF.quantize_mixture(x, w, autoqnn.WEIGHT_CANDIDATES, bits, backend=backend)
    else:
        def f(x, w, bits):
            return AF.quantize(x, "clip", bits, backend=backend)
    if provider == "compiled":
        key = kind
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(f)
        return _COMPILED[key]
    return f


def _available(device, provider):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if provider in ("cpp", "cuda", "triton"):
        try:
            backends.resolve(provider, torch.device(device), AF._needs(provider, "mixture", "mixture_backward"))
        except autoqnn.BackendUnavailableError as e:
            pytest.skip(str(e))


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("device,provider", CASES, ids=[f"{d}-{p}" for d, p in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_qss_mixture(benchmark, mode, device, provider, shape):
    """8 weight candidates at 3 bits (Binary/Ternary/Quaternary at 1/2/2), softmax weights."""
    _available(device, provider)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES[shape], generator=g).to(device).requires_grad_(mode != "fwd")
    theta = torch.randn(8, generator=g).to(device).requires_grad_(mode != "fwd")
    f = _fn(provider, "qss")
    bits = 3

    gy = torch.randn(SHAPES[shape], generator=g).to(device)

    def step():
        w = torch.softmax(theta, 0)
        if mode == "fwd":
            with torch.no_grad():
                f(x, w, bits)
        else:
            torch.autograd.grad(f(x, w, bits), [x, theta], gy)

    record(benchmark, f"qss-{mode}-{shape}-{device}", provider, step, device)


@pytest.mark.parametrize("device,provider", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def bench_qpl_clip_learned_bits(benchmark, device, provider):
    """ClipQ with a learned bitwidth on 4M elements: forward + backward w.r.t. x and bits."""
    _available(device, provider)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4_000_000, generator=g).to(device).requires_grad_()
    bits = torch.tensor(3.0, requires_grad=True)
    f = _fn(provider, "qpl")

    gy = torch.randn(x.shape, generator=g).to(device)

    def step():
        torch.autograd.grad(f(x, None, bits), [x, bits], gy)

    record(benchmark, f"qpl-clip-fwd+bwd-flat4M-{device}", provider, step, device)
