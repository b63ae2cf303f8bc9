# SPDX-License-Identifier: MIT
"""The robustness policy (README "Robustness policy", autoqnn/ops/reference.py docstring):
empty, constant, NaN/±Inf, wrong dtypes, fp16/bf16, non-contiguous inputs, bits validation and
explicit backends."""
import math

import pytest
import torch

import autoqnn
import autoqnn.functional as AF
from autoqnn.ops import reference as ref
from autoqnn.schemes import SCHEMES

from test_schemes import expected

BACKENDS = ("auto", "torch")
ALL8 = list(SCHEMES)
# every scheme at its smallest and largest bitwidth
EDGE_BITS = sorted({(s, b) for s, i in SCHEMES.items() for b in (i.min_bits, i.max_bits)},
                   key=lambda t: (SCHEMES[t[0]].id, t[1]))
EB_IDS = [f"{s}-{b}" for s, b in EDGE_BITS]
ALL_BITS = [(s, b) for s, i in SCHEMES.items() for b in range(i.min_bits, i.max_bits + 1)]
AB_IDS = [f"{s}-{b}" for s, b in ALL_BITS]


def _randn(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype)


def assert_mostly_equal(a, b, frac=1e-3, rtol=1e-6):
    """a == b up to the last ulp of the scale (two reduction orders of the same statistic), with at
    most ``frac`` of the elements on a neighbouring level (a decision-boundary tie); NaN == NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    fin = ~torch.isnan(a)
    a, b = a[fin], b[fin]
    tol = rtol * max(b.abs().max().item() if b.numel() else 0.0, 1e-30)
    n_bad = int(((a - b).abs() > tol).sum())
    assert n_bad <= frac * a.numel(), f"{n_bad} of {a.numel()} elements differ"


def _mix_bits(schemes, b=3):
    return [b if SCHEMES[s].multi_bit else SCHEMES[s].min_bits for s in schemes]


# ----------------------------------------------------------------------------- empty
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=["0", "3x0", "0x4x2"])
def test_empty_passes_through(shape, per_channel, backend):
    for scheme in ALL8:
        b = SCHEMES[scheme].default_bits
        for dtype in (torch.float32, torch.float16):
            x = torch.empty(shape, dtype=dtype).requires_grad_()
            bits = torch.tensor(float(b), requires_grad=True)
            y = AF.quantize(x, scheme, bits, per_channel=per_channel, backend=backend)
            assert y.shape == x.shape and y.dtype == dtype, scheme
            y.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
            assert bits.grad is not None and float(bits.grad) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=["0", "3x0", "0x4x2"])
def test_empty_mixture(shape, per_channel, backend):
    x = torch.empty(shape).requires_grad_()
    w = torch.full((8,), 1 / 8, requires_grad=True)
    bits = torch.full((8,), 3.0, requires_grad=True)
    y = AF.quantize_mixture(x, w, ALL8, bits, per_channel=per_channel, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(bits.grad, torch.zeros(8))


# ----------------------------------------------------------------------------- constant
def _constant_expectation(scheme, b, c):
    """σ = 0 for a constant tensor: clip/pot/quaternary have scale 0 -> 0; ZoomQ has step 0 and
    returns its offset min = c; binary/ternary/residual have α_1 = |c| -> c; FixedQ keeps its
    power-of-two step (from max|x| = |c|) and rounds c onto the b-bit grid."""
    if scheme in ("clip", "pot", "quaternary"):
        return 0.0
    if scheme in ("zoom", "binary", "ternary", "residual"):
        return c
    if c == 0:
        return 0.0
    step = 2.0 ** (math.floor(math.log2(abs(c))) - (b - 2))
    lim = 2 ** (b - 1)
    m = min(max(round(c / step), -lim), lim - 1)  # Python round is half-to-even like torch
    return m * step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [0.0, 3.0, -2.5], ids=["zero", "c3", "c-2.5"])
@pytest.mark.parametrize("scheme,b", ALL_BITS, ids=AB_IDS)
def test_constant_tensor(scheme, b, c, backend):
    for n in (1, 257):
        x = torch.full((n,), c, requires_grad=True)
        bits = torch.tensor(float(b), requires_grad=True)
        y = AF.quantize(x, scheme, bits, backend=backend)
        assert bool(torch.isfinite(y).all())
        exp = _constant_expectation(scheme, b, c)
        assert torch.equal(y.detach(), torch.full((n,), exp)), (n, y[:3].tolist(), exp)
        g = torch.linspace(-1, 1, n)
        (g * y).sum().backward()
        assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(bits.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_constant_rows_have_zero_sigma_whatever_the_rounding_of_their_mean(dtype, backend):
    """σ is 0 exactly for a row whose finite elements are all equal, also where the rounded mean
    of the row is not its value (0.1 × 17 elements, ...): the sum of squared deviations is then
    rounding noise, and a QuaternaryQ step of λ·noise reproduced the constant (v = 1 everywhere)
    instead of giving 0 like every other constant. Per tensor and per channel (one constant per
    row, NaN/Inf beside them), and the three σ schemes in one mixture."""
    consts = [0.1, -1 / 3, 0.002, 7.3, -1234.567, 1e-3 / 3]
    for n in (3, 17, 100, 1000, 5000):
        for c in consts:
            x = torch.full((n,), c, dtype=dtype)
            for scheme in ("quaternary", "clip", "pot"):
                y = AF.quantize(x, scheme, 2, backend=backend)
                assert torch.equal(y, torch.zeros_like(x)), (scheme, n, c, y[:3].tolist())
        rows = torch.tensor(consts, dtype=dtype)[:, None].expand(len(consts), n).clone()
        rows[0, 0], rows[1, -1] = float("nan"), float("inf")
        for scheme in ("quaternary", "clip", "pot"):
            y = AF.quantize(rows, scheme, 2, per_channel=True, backend=backend)
            fin = torch.isfinite(rows)
            assert torch.equal(y[fin], torch.zeros_like(y[fin])), (scheme, n)
        w = torch.tensor([0.5, 0.25, 0.25])
        y = AF.quantize_mixture(rows, w, ["quaternary", "clip", "pot"], [2, 2, 2], per_channel=True, backend=backend)
        assert torch.equal(y[fin], torch.zeros_like(y[fin])), n


def test_constant_fixed_examples():
    """Spot values of the FixedQ constant rule (max|x| = |c| sets the step)."""
    assert AF.quantize(torch.full((4,), 3.0), "fixed", 2).tolist() == [2.0] * 4  # step 2, code 2 -> clip 1
    assert AF.quantize(torch.full((4,), -2.5), "fixed", 3).tolist() == [-2.0] * 4  # step 1, round-half-even
    assert AF.quantize(torch.full((4,), -2.5), "fixed", 4).tolist() == [-2.5] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_mixture(backend):
    x = torch.full((50,), -2.5, requires_grad=True)
    w = torch.full((8,), 1 / 8, requires_grad=True)
    bits = torch.full((8,), 3.0, requires_grad=True)
    y = AF.quantize_mixture(x, w, ALL8, bits, backend=backend)
    exp = sum(_constant_expectation(s, b, -2.5) for s, b in zip(ALL8, _mix_bits(ALL8))) / 8
    torch.testing.assert_close(y.detach(), torch.full((50,), exp), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    for t in (x.grad, w.grad, bits.grad):
        assert bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------- NaN / Inf
def _with_nonfinite(kind, n=5000, seed=1):
    x = _randn(n, seed)
    idx_nan = torch.arange(3, n, 37)
    idx_pinf = torch.arange(5, n, 41)
    idx_ninf = torch.arange(7, n, 43)
    if kind in ("nan", "all"):
        x[idx_nan] = float("nan")
    if kind in ("inf", "all"):
        x[idx_pinf] = float("inf")
        x[idx_ninf] = float("-inf")
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nan", "inf", "all"])
@pytest.mark.parametrize("scheme,b", EDGE_BITS, ids=EB_IDS)
def test_nonfinite_values(scheme, b, kind, backend):
    x = _with_nonfinite(kind)
    fin = torch.isfinite(x)
    xf = x[fin]
    y = AF.quantize(x, scheme, b, backend=backend)
    # NaN exactly where x is NaN
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    # statistics ignore non-finite elements
    p = AF.scheme_params(x, [scheme], b)
    pf = AF.scheme_params(xf, [scheme], b)
    torch.testing.assert_close(p, pf, rtol=1e-6, atol=1e-7)
    # finite elements: as quantizing them alone (same params -> identical values)
    yp = AF.quantize(x, scheme, b, params=p, backend=backend)
    assert torch.equal(torch.isnan(yp), torch.isnan(x))
    assert torch.equal(yp[fin], AF.quantize(xf, scheme, b, params=p, backend=backend))
    assert_mostly_equal(y, yp)  # p is the "auto" statistics: the same up to an ulp
    assert_mostly_equal(y[fin], AF.quantize(xf, scheme, b, backend=backend))
    # ±Inf saturates to the extreme documented levels (from the finite elements' statistics)
    levels, _ = expected(xf, scheme, b)
    tol = 1e-5 * levels.abs().max().item()
    pinf, ninf = x == float("inf"), x == float("-inf")
    if kind != "nan":
        assert bool(((y[pinf].double() - levels.max()).abs() <= tol).all())
        assert bool(((y[ninf].double() - levels.min()).abs() <= tol).all())
        assert bool(torch.isfinite(y[pinf | ninf]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nan", "inf", "all"])
@pytest.mark.parametrize("scheme,b", EDGE_BITS, ids=EB_IDS)
def test_nonfinite_gradients(scheme, b, kind, backend):
    x0 = _with_nonfinite(kind)
    fin = torch.isfinite(x0)
    g = _randn(x0.numel(), 9)
    x = x0.clone().requires_grad_()
    bits = torch.tensor(float(b), requires_grad=True)
    y = AF.quantize(x, scheme, bits, backend=backend)
    (g * y).sum().backward()
    assert bool((x.grad[~fin] == 0).all())
    assert bool(torch.isfinite(x.grad).all())
    assert bool(torch.isfinite(bits.grad))
    # the non-finite elements add nothing to ∂L/∂b: same as the finite elements alone
    xf = x0[fin].clone().requires_grad_()
    bf = torch.tensor(float(b), requires_grad=True)
    (g[fin] * AF.quantize(xf, scheme, bf, backend=backend)).sum().backward()
    scale = float((g[fin].abs() * x0[fin].abs()).sum())
    assert abs(float(bits.grad) - float(bf.grad)) <= 1e-5 * scale
    torch.testing.assert_close(x.grad[fin], xf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_mixture(kind, backend):
    x0 = _with_nonfinite(kind, n=3000)
    fin = torch.isfinite(x0)
    x = x0.clone().requires_grad_()
    w = torch.softmax(_randn(8, 4), 0).requires_grad_()
    bits = torch.full((8,), 3.0, requires_grad=True)
    y = AF.quantize_mixture(x, w, ALL8, bits, backend=backend)
    assert torch.equal(torch.isnan(y), torch.isnan(x0))
    if kind == "inf":
        assert bool(torch.isfinite(y).all())
    g = _randn(x0.numel(), 2)
    (g * y).sum().backward()
    assert bool((x.grad[~fin] == 0).all()) and bool(torch.isfinite(x.grad).all())
    assert bool(torch.isfinite(bits.grad).all())
    if kind == "inf":  # q_k(±Inf) is finite, so ⟨g, q_k⟩ is too
        assert bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_schemes_handle_large_finite_values(backend):
    """Σ(x − mean)² must not overflow for finite |x| ~ 1e19 (float32 accumulation would: ClipQ then
    gave +inf everywhere, PotQ NaN, Quaternary zeros). Regression test."""
    x = _randn(1000, 21)
    c = 2.0**64  # ~1.8e19: every element and every level is a normal float32
    for scheme in ("clip", "pot", "quaternary"):
        b = SCHEMES[scheme].default_bits
        y = AF.quantize(x * c, scheme, b, backend=backend)
        assert bool(torch.isfinite(y).all()), scheme
        assert torch.equal(y, AF.quantize(x, scheme, b, backend=backend) * c), scheme


def test_single_finite_element_has_zero_sigma():
    """σ over the finite elements is 0 with fewer than two of them: σ-based schemes give 0."""
    x = torch.tensor([float("nan"), 2.0, float("inf")])
    for scheme in ("clip", "pot", "quaternary"):
        y = AF.quantize(x, scheme, 2)
        assert torch.isnan(y[0]) and y[1].item() == 0.0 and y[2].item() == 0.0, scheme


# ----------------------------------------------------------------------------- dtypes
BAD_DTYPES = [torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_bad_dtype_raises_typeerror(dtype):
    name = str(dtype).replace("torch.", "")
    x = torch.ones(10, dtype=dtype)
    calls = [
        lambda: AF.quantize(x, "clip", 3),
        lambda: AF.quantize(x, "clip", 3, backend="torch"),
        lambda: AF.quantize_mixture(x, torch.full((2,), 0.5), ["clip", "pot"], 3),
        lambda: AF.scheme_params(x, ["clip"], 3),
        lambda: AF.tensor_stats(x),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=name):
            call()
    # the mixture weights get the same check
    xf = torch.randn(10)
    for backend in BACKENDS:
        with pytest.raises(TypeError, match=rf"weights.*{name}"):
            AF.quantize_mixture(xf, torch.ones(2, dtype=dtype), ["clip", "pot"], 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scheme,b", EDGE_BITS, ids=EB_IDS)
def test_low_precision_computed_in_fp32(scheme, b, dtype, backend):
    x = (_randn(6000, 3) * 3).to(dtype)
    y = AF.quantize(x, scheme, b, backend=backend)
    assert y.dtype == dtype
    ref = AF.quantize(x.float(), scheme, b, backend=backend).to(dtype)
    assert int((y != ref).sum()) <= 0.001 * x.numel()
    # the statistics are fp32 ones: params of the fp16 input == params of its fp32 upcast
    p = AF.scheme_params(x, [scheme], b)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, AF.scheme_params(x.float(), [scheme], b), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_mixture_and_grad(dtype, backend):
    x = (_randn(3000, 5)).to(dtype).requires_grad_()
    w = torch.softmax(_randn(8, 6), 0).requires_grad_()
    bits = torch.full((8,), 3.0, requires_grad=True)
    y = AF.quantize_mixture(x, w, ALL8, bits, backend=backend)
    assert y.dtype == dtype
    ref = AF.quantize_mixture(x.detach().float(), w.detach(), ALL8, 3, backend=backend).to(dtype)
    assert int((y != ref).sum()) <= 0.001 * x.numel()
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert bool(torch.isfinite(x.grad.float()).all()) and bool(torch.isfinite(bits.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_stays_float64(backend):
    x = _randn(2000, 7, torch.float64)
    for scheme in ALL8:
        y = AF.quantize(x, scheme, SCHEMES[scheme].default_bits, backend=backend)
        assert y.dtype == torch.float64
    assert AF.scheme_params(x, ALL8, 3).dtype == torch.float64
    # float64 statistics: ClipQ-3's α is 0.586·σ to float64 precision
    a = AF.scheme_params(x, ["clip"], 3)[0, 0, 0].item()
    assert a == pytest.approx(0.5860 * x.std().item(), rel=1e-13)


# ----------------------------------------------------------------------------- non-contiguous
def _noncontig_cases():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 60, generator=g)
    return {
        "transpose": base.t(),
        "step_slice": base[::3, 1::2],
        "expanded": torch.randn(1, 50, generator=g).expand(40, 50),
        "permuted4d": torch.randn(4, 5, 6, 3, generator=g).permute(3, 0, 2, 1),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("case", list(_noncontig_cases()))
def test_noncontiguous_equals_contiguous(case, per_channel, backend):
    x = _noncontig_cases()[case]
    assert not x.is_contiguous()
    xc = x.contiguous()
    for scheme in ALL8:
        b = SCHEMES[scheme].default_bits
        y = AF.quantize(x, scheme, b, per_channel=per_channel, backend=backend)
        # laid out like x where x is dense in memory order (tests/test_memory_order.py), else contiguous
        want = ref.out_like(x, per_channel)
        assert [s for s, n in zip(y.stride(), y.shape) if n > 1] == [
            s for s, n in zip(want.stride(), want.shape) if n > 1]
        # equal up to the reduction order of a strided row (an ulp of the scale)
        assert_mostly_equal(y, AF.quantize(xc, scheme, b, per_channel=per_channel, backend=backend))
    w = torch.softmax(_randn(8, 1), 0)
    ym = AF.quantize_mixture(x, w, ALL8, 3, per_channel=per_channel, backend=backend)
    assert_mostly_equal(ym, AF.quantize_mixture(xc, w, ALL8, 3, per_channel=per_channel, backend=backend))


def test_output_contiguous_for_transposed_per_channel():
    """A dense non-contiguous input that already has the [C, N] shape (a transposed 2-D weight with
    per_channel=True) must not hand its strides on to the output (regression test)."""
    x = _randn(40 * 60, 4).reshape(40, 60).t()
    assert not x.is_contiguous()
    w = torch.full((2,), 0.5)
    for backend in BACKENDS:
        y = AF.quantize(x, "clip", 3, per_channel=True, backend=backend)
        ym = AF.quantize_mixture(x, w, ["clip", "pot"], 3, per_channel=True, backend=backend)
        assert y.is_contiguous() and ym.is_contiguous(), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_gradients(backend):
    x = _randn(30 * 20, 2).reshape(20, 30).t().detach().requires_grad_()  # non-contiguous leaf
    assert not x.is_contiguous()
    xc = x.detach().contiguous().requires_grad_()
    g = _randn(600, 3).reshape(30, 20)
    for t in (x, xc):
        (g * AF.quantize(t, "clip", 2, backend=backend)).sum().backward()
    assert torch.equal(x.grad, xc.grad)
    assert bool((x.grad == 0).any()) and bool((x.grad == g).any())  # the ClipQ mask is in play


# ----------------------------------------------------------------------------- bits validation
@pytest.mark.parametrize(
    "scheme,bits,rng",
    [("pot", 5, "2..4"), ("pot", 1, "2..4"), ("clip", 1, "2..8"), ("clip", 9, "2..8"), ("binary", 2, "1"),
     ("ternary", 3, "2"), ("quaternary", 1, "2"), ("zoom", 0, "2..8"), ("residual", -3, "2..8"),
     ("fixed", 2.5, "2..8"), ("clip", float("nan"), "2..8"), ("clip", float("inf"), "2..8"),
     ("clip", True, "2..8")],
    ids=["pot5", "pot1", "clip1", "clip9", "binary2", "ternary3", "quaternary1", "zoom0", "residual-3",
         "fixed2.5", "clip_nan", "clip_inf", "clip_bool"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bits_out_of_range(scheme, bits, rng, backend):
    x = _randn(100)
    with pytest.raises(ValueError) as ei:
        AF.quantize(x, scheme, bits, backend=backend)
    msg = str(ei.value)
    assert scheme in msg and rng in msg, msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_bits_validation(backend):
    x = _randn(100)
    w = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match=r"pot.*2\.\.4"):
        AF.quantize_mixture(x, w, ["clip", "pot"], 5, backend=backend)  # one int for every multi-bit
    with pytest.raises(ValueError, match=r"pot.*2\.\.4"):
        AF.quantize_mixture(x, w, ["clip", "pot"], [3, 6], backend=backend)
    with pytest.raises(ValueError, match=r"clip.*2\.\.8"):
        AF.quantize_mixture(x, w, ["clip", "pot"], [9, 3], backend=backend)
    with pytest.raises(ValueError):
        AF.quantize_mixture(x, w, ["clip", "pot"], [3, 3, 3], backend=backend)
    # binary/ternary/quaternary keep 1/2/2 bits under one shared int
    y = AF.quantize_mixture(x, w, ["binary", "clip"], 3, backend=backend)
    exp = 0.5 * AF.quantize(x, "binary", 1, backend=backend) + 0.5 * AF.quantize(x, "clip", 3, backend=backend)
    torch.testing.assert_close(y, exp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_scheme_lists_valid_names(backend):
    x = _randn(10)
    with pytest.raises(ValueError) as ei:
        AF.quantize(x, "bogusq", 3, backend=backend)
    for name in ALL8:
        assert name in str(ei.value)
    with pytest.raises(ValueError, match="binary"):
        AF.quantize_mixture(x, torch.full((2,), 0.5), ["clip", "nope"], 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_mixture_weights_and_schemes(backend):
    x = _randn(10)
    for w in (torch.full((3,), 1 / 3), torch.full((1,), 1.0), torch.full((2, 1), 0.5), torch.full((1, 2), 0.5)):
        with pytest.raises(ValueError, match="weights"):
            AF.quantize_mixture(x, w, ["clip", "pot"], 3, backend=backend)
    with pytest.raises(ValueError, match="duplicates"):
        AF.quantize_mixture(x, torch.full((2,), 0.5), ["clip", "C"], 3, backend=backend)
    with pytest.raises(ValueError):
        AF.quantize_mixture(x, torch.ones(0), [], 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "scheme,learned,eff",
    [("clip", 9.4, 8), ("clip", 1.2, 2), ("clip", 3.4, 3), ("clip", 3.6, 4), ("clip", 2.5, 2), ("clip", 100.0, 8),
     ("pot", 5.7, 4), ("pot", 0.2, 2), ("pot", -4.0, 2), ("zoom", 8.6, 8), ("residual", 1.0, 2),
     ("fixed", 12.0, 8), ("binary", 5.0, 1), ("ternary", 7.0, 2)],
    ids=lambda v: str(v),
)
def test_learned_bits_are_clipped(scheme, learned, eff, backend):
    """SPEC 4.1: the forward uses clip(round(b), b_min, b_max) for a learned (tensor) bitwidth."""
    x = _randn(3000, 12)
    bits = torch.tensor(learned, requires_grad=True)
    y = AF.quantize(x, scheme, bits, backend=backend)
    assert torch.equal(y, AF.quantize(x, scheme, eff, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_bits_mixture_clipped_per_candidate(backend):
    x = _randn(2000, 13)
    schemes = ["clip", "pot", "zoom"]
    w = torch.tensor([0.2, 0.3, 0.5])
    bits = torch.tensor([9.3, 5.1, 1.4], requires_grad=True)
    y = AF.quantize_mixture(x, w, schemes, bits, backend=backend)
    exp = AF.quantize_mixture(x, w, schemes, [8, 4, 2], backend=backend)
    assert torch.equal(y, exp)
    # a 0-d learned bitwidth is shared by every candidate, clipped into each one's range
    y0 = AF.quantize_mixture(x, w, schemes, torch.tensor(6.2), backend=backend)
    assert torch.equal(y0, AF.quantize_mixture(x, w, schemes, [6, 4, 6], backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_learned_bits_raise(bad, backend):
    x = _randn(100)
    with pytest.raises(ValueError, match="clip"):
        AF.quantize(x, "clip", torch.tensor(bad), backend=backend)
    with pytest.raises(ValueError):
        AF.quantize_mixture(x, torch.full((2,), 0.5), ["zoom", "pot"], torch.tensor([3.0, bad]), backend=backend)


def test_bits_tensor_shape_and_dtype():
    x = _randn(100)
    with pytest.raises(ValueError):
        AF.quantize_mixture(x, torch.full((2,), 0.5), ["zoom", "pot"], torch.full((3,), 3.0))
    with pytest.raises(TypeError):
        AF.quantize(x, "clip", torch.tensor(True))
    with pytest.raises(TypeError):
        AF.quantize(x, "clip", torch.tensor(3 + 0j))
    # an integer bits tensor is a valid (non-learned) bitwidth
    assert torch.equal(AF.quantize(x, "clip", torch.tensor(5)), AF.quantize(x, "clip", 5))


def test_cached_resolution_keeps_validating():
    """The functional API caches (schemes, int bits) resolutions: a cached valid key must not
    let an equal-comparing invalid one through (True == 1, [3, True] == [3, 1]), and the shared
    bits tensor must not pick up a gradient or change between calls."""
    x = _randn(100)
    w = torch.full((2,), 0.5)
    y1 = AF.quantize(x, "binary", 1)
    with pytest.raises(ValueError, match="binary"):
        AF.quantize(x, "binary", True)
    AF.quantize_mixture(x, w, ["clip", "pot"], [3, 2])
    with pytest.raises(ValueError):
        AF.quantize_mixture(x, w, ["clip", "pot"], [3, True])
    # 3.0 validates like 3 and shares its entry; 3.5 never reaches the cache
    assert torch.equal(AF.quantize(x, "clip", 3.0), AF.quantize(x, "clip", 3))
    with pytest.raises(ValueError, match="clip"):
        AF.quantize(x, "clip", 3.5)
    # the same entry twice, the second call after a backward through the first
    xr = x.clone().requires_grad_()
    AF.quantize_mixture(xr, w, ("clip", "pot"), [3, 2]).sum().backward()
    infos, sids, bt, bh, ints = AF._resolve(("clip", "pot"), [3, 2])
    assert bt.tolist() == [3.0, 2.0] and not bt.requires_grad and bt.grad is None and ints == [3, 2]
    assert bh is bt  # integer bits: the cached CPU tensor is what the kernels read
    assert AF._resolve(["clip", "pot"], (3, 2))[2] is bt  # lists and tuples share the entry
    assert torch.equal(AF.quantize(x, "binary", 1), y1)
    # generators are read once, cached or not; SchemeInfo objects take the uncached path
    from autoqnn.schemes import scheme_info

    assert AF._resolve((s for s in ("clip", "pot")), [3, 2])[1] == sids
    assert AF._resolve((scheme_info(s) for s in ("clip", "pot")), [3, 2])[1] == sids


# ----------------------------------------------------------------------------- backends
def test_unavailable_backends_raise():
    x = _randn(100)
    w = torch.full((2,), 0.5)
    for call in (
        lambda be: AF.quantize(x, "clip", 3, backend=be),
        lambda be: AF.quantize_mixture(x, w, ["clip", "pot"], 3, backend=be),
    ):
        with pytest.raises(autoqnn.BackendUnavailableError, match=r"triton.{3,}") as ei:
            call("triton")
        assert len(str(ei.value)) > len("backend='triton'") + 5  # carries a reason
        with pytest.raises(autoqnn.BackendUnavailableError, match="cuda") as ei:
            call("cuda")  # a CPU tensor
        assert "cpu" in str(ei.value).lower()
        with pytest.raises(ValueError, match="bogus"):
            call("bogus")
    assert issubclass(autoqnn.BackendUnavailableError, RuntimeError)
