# SPDX-License-Identifier: MIT
"""The Triton kernels against the reference, on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, and other test modules import it
without, so the cases run in a subprocess. On a GPU machine the same cases also run on CUDA."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CASES = textwrap.dedent(r'''
    import torch, autoqnn, autoqnn.functional as AF
    from autoqnn import backends
    from autoqnn.ops import reference as ref
    assert backends.TRITON_ERROR is None, backends.TRITON_ERROR
    torch.manual_seed(0)
    dev = "{device}"
    def close(a, b, tol):
        a, b = a.double().cpu(), b.double().cpu()
        ok = torch.isclose(a, b, rtol=tol, atol=tol, equal_nan=True)
        bad = int((~ok).sum())
        assert bad <= max(2, a.numel() // 1000), (bad, a.numel())
    n = 0
    for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)]:
        for shape, pc in [((1,), False), ((769,), False), ((5125,), False), ((8, 3, 3, 3), True), ((0,), False)]:
            for cands, b in [(autoqnn.WEIGHT_CANDIDATES, 3), (autoqnn.ACTIVATION_CANDIDATES, 2), (["residual", "clip", "pot"], 4)]:
                x = torch.randn(shape).to(dtype).to(dev)
                if x.numel() > 20:
                    x.view(-1)[3] = float("nan"); x.view(-1)[5] = float("inf"); x.view(-1)[7] = -float("inf")
                x.requires_grad_()
                K = len(cands)
                w = torch.softmax(torch.randn(K), 0).to(dev).requires_grad_()
                bits = torch.full((K,), float(b), requires_grad=True)
                g = torch.randn(shape).to(dtype).to(dev)
                outs = []
                for backend in ("triton", "torch"):
                    y = AF.quantize_mixture(x, w, cands, bits, per_channel=pc, backend=backend)
                    gr = torch.autograd.grad(y, [x, w, bits], g, allow_unused=True)
                    outs.append((y,) + tuple(gr))
                (y1, gx1, gw1, gb1), (y2, gx2, gw2, gb2) = outs
                assert y1.dtype == dtype and y1.shape == x.shape
                close(y1, y2, tol); close(gx1, gx2, tol)
                torch.testing.assert_close(gw1.double().cpu(), gw2.double().cpu(), rtol=1e-3, atol=1e-2, equal_nan=True)
                torch.testing.assert_close(gb1.double().cpu(), gb2.double().cpu(), rtol=1e-3, atol=1e-2)
                n += 1
    # single scheme, learned bits, every scheme
    x = torch.randn(777).to(dev)
    for s in ("binary", "ternary", "quaternary", "fixed", "residual", "zoom", "clip", "pot"):
        y1 = AF.quantize(x, s, None, backend="triton"); y2 = AF.quantize(x, s, None, backend="torch")
        close(y1, y2, 1e-6)
        n += 1
    xs = torch.randn(33).to(dev); p = AF.scheme_params(xs, autoqnn.WEIGHT_CANDIDATES, 3)
    torch.library.opcheck(torch.ops.autoqnn.mixture_triton.default,
                          (xs, p.to(dev), torch.full((8,), 0.125, device=dev), torch.tensor([1., 2, 2, 3, 3, 3, 3, 3]), list(range(8)), False))
    print("TRITON_CASES_OK", n)
''')


def _run(device):
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", CASES.format(device=device)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0 and "TRITON_CASES_OK" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]


def test_triton_kernels_interpreter_cpu():
    _run("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_cuda():
    _run("cuda")
