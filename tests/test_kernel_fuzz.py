# SPDX-License-Identifier: MIT
"""Randomised differential test of the C++ CPU kernels against the pure-PyTorch reference.

tests/test_cpu_kernels.py walks a fixed grid (all eight candidates in id order, one bitwidth for
every multi-bit candidate, one set of mixture weights). Here hypothesis draws what that grid
keeps fixed: which candidates and in what order, a bitwidth per candidate, weights of any sign
(zeros included), the scale of the data (1e-30 to 1e30, subnormals), rows that are constant, all
zero, all NaN or all ±Inf, NaN/Inf sprinkled anywhere, non-contiguous views, per-tensor or
per-channel. The examples are derandomised (the same every run) so that CI stays reproducible.

Checked per example (``tests/fuzz_cases.py``, shared with the Triton cases), as in the grid
test: the statistics (``scheme_params``) close to the reference's, then, on the reference's
statistics, the mixture's levels equal except at rounding ties (a bounded count), its gradients
close, and every single-scheme ``quantize`` bit-identical for float32/float64. Also the batched
ops against one call per tensor, and the functional API on the C++ kernels against the
pure-PyTorch backend.
"""
import math

import pytest
import torch

from autoqnn import _ext
from autoqnn.ops import has_kernel
from autoqnn.schemes import scheme_info

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_cases import DTYPES, SCALES, batched_cases, cases, check_batched_case, check_ops_case, close_levels  # noqa: E402,E501

pytestmark = pytest.mark.skipif(
    not (_ext.HAS_EXT and has_kernel("mixture", "CPU")), reason=f"C++ CPU kernels not built: {_ext.LOAD_ERROR}"
)

OPS = torch.ops.autoqnn
CPP_OPS = {name: getattr(OPS, name) for name in ("scheme_params", "mixture", "mixture_backward", "quantize",
                                                 "scheme_params_batched", "mixture_batched", "mixture_batched_backward")}


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(c=cases())
def test_cpu_kernels_match_reference_on_random_cases(c):
    check_ops_case(c, CPP_OPS)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(c=batched_cases())
def test_cpu_batched_ops_equal_one_call_per_tensor_on_random_cases(c):
    """The batched ops (many tensors, ragged, per-tensor bits and weights, empty tensors among
    them) equal one per-tensor call per tensor, bit for bit, on the same random cases."""
    check_batched_case(c, CPP_OPS)


@st.composite
def api_cases(draw):
    names = [scheme_info(s).name for s in draw(st.permutations(range(8)))[: draw(st.integers(1, 8))]]
    learned = draw(st.booleans())
    bits = [draw(st.integers(scheme_info(n).min_bits, scheme_info(n).max_bits)) for n in names]
    if learned:
        bits = [b + draw(st.sampled_from([-0.4, 0.0, 0.3, 1.3])) for b in bits]
    shape = draw(st.sampled_from([(7,), (300,), (4, 3, 3, 3), (16, 5), (3, 1100)]))
    return dict(names=names, bits=bits, learned=learned, shape=shape, dtype=draw(st.sampled_from(DTYPES)),
                per_channel=draw(st.booleans()), transposed=draw(st.booleans()),
                scale=draw(st.sampled_from(SCALES[:5])), specials=draw(st.integers(0, 3)),
                seed=draw(st.integers(0, 2**16)))


def _api_run(c, backend):
    import autoqnn.functional as AF

    g = torch.Generator().manual_seed(c["seed"])
    x0 = torch.randn(c["shape"], generator=g, dtype=torch.float64) * c["scale"]
    flat = x0.view(-1)
    for _ in range(c["specials"]):
        flat[int(torch.randint(flat.numel(), (1,), generator=g))] = [math.nan, math.inf, -math.inf, 0.0][
            int(torch.randint(4, (1,), generator=g))]
    x = x0.to(c["dtype"])
    if c["transposed"] and x.dim() > 1:  # non-contiguous: a transposed copy, transposed back
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    x = x.detach().requires_grad_()
    logits = torch.randn(len(c["names"]), generator=g).requires_grad_()
    bits = torch.tensor(c["bits"], requires_grad=True) if c["learned"] else [int(b) for b in c["bits"]]
    gy = torch.randn(c["shape"], generator=g)
    y = AF.quantize_mixture(x, torch.softmax(logits, 0), c["names"], bits, per_channel=c["per_channel"],
                            backend=backend)
    (y.double() * gy).sum().backward()
    # the size of the sums the logits' and bits' gradients are made of (Σ|g|·|x|): their
    # rounding (two orders of summation) is relative to it, not to the gradient itself, which
    # cancels to ~0 where candidates agree (softmax's Jacobian subtracts the weighted mean)
    xf = x.detach().double()
    mag = float((gy.double().abs() * torch.where(torch.isfinite(xf), xf.abs(), 0)).sum())
    return y.detach(), x.grad, logits.grad, (bits.grad if c["learned"] else None), mag


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(c=api_cases())
def test_functional_cpp_equals_torch_backend_on_random_cases(c):
    """The functional API end to end (validation, statistics, op, C++ autograd node) on the C++
    kernels against the pure-PyTorch backend: output, grad_x, the mixture logits' gradient
    (through softmax) and learned bits' gradient."""
    a = _api_run(c, "cpp")
    b = _api_run(c, "torch")
    assert a[0].dtype == b[0].dtype == c["dtype"] and a[0].shape == b[0].shape
    # the two backends' statistics are two float sums of the same numbers (ulps apart); ResQ's
    # value is a chain of ±α_i that can cancel, so y is compared on the scale of its largest level
    fin = torch.isfinite(b[0])
    big = float(b[0][fin].abs().max()) if bool(fin.any()) else 0.0
    d = (a[0].double() - b[0].double()).abs()
    bad = ~((d <= 1e-5 * big + 1e-30) | (a[0] == b[0]) | (a[0].isnan() & b[0].isnan()))
    if c["dtype"] in (torch.float16, torch.bfloat16):
        bad &= ~torch.isclose(a[0].double(), b[0].double(), rtol=torch.finfo(c["dtype"]).eps, atol=0)
    assert int(bad.sum()) <= max(2, int(1e-3 * bad.numel())), f"y: {int(bad.sum())}/{bad.numel()} differ"
    close_levels(a[1], b[1], "grad_x")
    for name, u, v in (("grad_logits", a[2], b[2]), ("grad_bits", a[3], b[3])):
        if v is None:
            continue
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-5 * b[4] + 1e-6, equal_nan=True, msg=name)
