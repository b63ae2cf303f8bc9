# SPDX-License-Identifier: MIT
"""Per-scheme value properties of the eight quantizers (SPEC 2.1-2.9, the Decisions table).

Every expected level set is rebuilt here from statistics the test computes itself in float64
(mean|x|, torch.std, min/max, its own ResQ loop...), never by calling the library's reference, so
a wrong constant, a wrong grid offset or a wrong statistic makes these tests fail.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoqnn.functional as AF
from autoqnn.schemes import SCHEMES

BACKENDS = ("auto", "torch")

# Constants written out from SPEC 2.7 / 2.8 / 2.2 / 2.3 (not imported from the library).
CLIP_LAMBDA = {2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
POT_LAMBDA = {2: 0.9, 3: 0.4, 4: 0.03}
QUAT_LAMBDA = 0.9957
TWN_DELTA = 0.7
BITS = {
    "binary": [1],
    "ternary": [2],
    "quaternary": [2],
    "fixed": list(range(2, 9)),
    "residual": list(range(2, 9)),
    "zoom": list(range(2, 9)),
    "clip": list(range(2, 9)),
    "pot": [2, 3, 4],
}
SCHEME_BITS = [(s, b) for s in BITS for b in BITS[s]]
SB_IDS = [f"{s}-{b}" for s, b in SCHEME_BITS]


def max_levels(scheme, b):
    return {"binary": 2, "ternary": 3, "quaternary": 4}.get(scheme, 2**b)


# ----------------------------------------------------------------------------- data
def _dist(name, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "normal":
        return torch.randn(n, generator=g)
    if name == "uniform":  # asymmetric range: exercises ZoomQ's offset and FixedQ's sign handling
        return torch.rand(n, generator=g) * 4.0 - 1.0
    if name == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -0.5 * torch.sign(u) * torch.log1p(-2 * u.abs())
    if name == "relu":  # ~half exact zeros: binary's x <= 0 -> -alpha rule, PotQ's zero level
        return torch.relu(torch.randn(n, generator=g))
    if name == "signed_lognormal":  # PotQ's target distribution
        s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        return s * torch.exp(torch.randn(n, generator=g))
    raise ValueError(name)


DISTS = ("normal", "uniform", "laplace", "relu", "signed_lognormal")


# ----------------------------------------------------------------------------- independent oracle
def expected(x, scheme, b):
    """(levels, y) in float64: the documented level set and the documented assignment of each
    element, computed from scratch with float64 statistics."""
    x = x.double().reshape(-1)
    ax = x.abs()
    sigma = x.std().item()  # unbiased, as SPEC 1
    if scheme == "binary":
        a = ax.mean().item()
        return torch.tensor([-a, a], dtype=torch.float64), torch.where(x > 0, a, -a)
    if scheme == "ternary":
        delta = TWN_DELTA * ax.mean().item()
        sel = ax > delta
        a = ax[sel].mean().item() if sel.any() else 0.0
        return torch.tensor([-a, 0.0, a], dtype=torch.float64), a * torch.sign(x) * sel
    if scheme == "quaternary":
        s = QUAT_LAMBDA * sigma
        v = torch.clamp(torch.round(x / s), -2, 1)
        a = ((x * v).sum() / (v * v).sum()).item()
        return a * torch.tensor([-2.0, -1.0, 0.0, 1.0], dtype=torch.float64), a * v
    if scheme == "fixed":
        e = math.floor(math.log2(ax.max().item())) - (b - 2)
        step = 2.0**e
        lim = 2 ** (b - 1)
        m = torch.clamp(torch.round(x / step), -lim, lim - 1)
        return step * torch.arange(-lim, lim, dtype=torch.float64), m * step
    if scheme == "residual":
        r = x.clone()
        y = torch.zeros_like(x)
        alphas = []
        for _ in range(b):
            a = r.abs().mean().item()
            alphas.append(a)
            s = torch.where(r > 0, a, -a)
            y += s
            r -= s
        levels = torch.zeros(1, dtype=torch.float64)
        for a in alphas:
            levels = torch.cat([levels - a, levels + a])
        return levels, y
    if scheme == "zoom":
        mn, mx = x.min().item(), x.max().item()
        step = (mx - mn) / 2**b
        k = torch.clamp(torch.floor((x - mn) / step), 0, 2**b - 1)
        return mn + step * (torch.arange(2**b, dtype=torch.float64) + 0.5), mn + step * (k + 0.5)
    if scheme == "clip":
        a = CLIP_LAMBDA[b] * sigma
        lim = 2 ** (b - 1)
        k = torch.clamp(torch.round(x / a - 0.5), -lim, lim - 1)
        return a * (torch.arange(-lim, lim, dtype=torch.float64) + 0.5), a * (k + 0.5)
    if scheme == "pot":
        a = POT_LAMBDA[b] * sigma
        lmax = 2 ** (b - 1) - 1
        mags = [0.5] + [2.0**k for k in range(1, lmax + 1)]
        lv = [-m for m in mags] + mags
        if bool((x == 0).any()):
            lv.append(0.0)
        levels = a * torch.tensor(sorted(lv), dtype=torch.float64)
        u = x / a
        l = torch.clamp(torch.round(torch.log2(u.abs())), 0, lmax)
        mag = torch.where(l == 0, 0.5, torch.exp2(l))
        return levels, a * torch.sign(u) * mag
    raise ValueError(scheme)


def _tol(levels):
    return 1e-5 * max(levels.abs().max().item(), 1e-30)


def nearest(v, levels):
    """Each value's nearest level (float64)."""
    idx = (v.double().reshape(-1, 1) - levels.reshape(1, -1)).abs().argmin(1)
    return levels[idx]


def assert_subset_of_levels(y, levels):
    u = torch.unique(y.double())
    d = (u.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(1).values
    tol = _tol(levels)
    bad = u[d > tol]
    assert bad.numel() == 0, f"values {bad[:8].tolist()} are not documented levels (tol {tol:g}); levels {levels.tolist()[:16]}"


def frac_equal(a, b, atol):
    return ((a.double() - b.double()).abs() <= atol).double().mean().item()


# ----------------------------------------------------------------------------- level sets
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme,b", SCHEME_BITS, ids=SB_IDS)
def test_output_is_subset_of_documented_levels(scheme, b, backend):
    for dist in DISTS:
        x = _dist(dist)
        y = AF.quantize(x, scheme, b, backend=backend)
        assert y.shape == x.shape and y.dtype == x.dtype
        levels, y_exp = expected(x, scheme, b)
        n_distinct = torch.unique(y).numel()
        cap = max_levels(scheme, b) + (1 if scheme == "pot" and bool((x == 0).any()) else 0)
        assert n_distinct <= cap, dist
        assert_subset_of_levels(y, levels)
        # and each element gets the documented level (allowing float32/float64 boundary ties)
        assert frac_equal(y, y_exp, _tol(levels)) >= 0.999, dist


@pytest.mark.parametrize("b", [2, 3, 4])
def test_pot_zero_level_only_for_exact_zeros(b):
    x = _dist("normal", 5000)
    y = AF.quantize(x, "pot", b)
    assert not bool((y == 0).any())  # no zero level without an exact zero
    assert torch.unique(y).numel() == 2**b  # N(0,1) reaches every level
    x[::7] = 0.0
    y = AF.quantize(x, "pot", b)
    assert bool((y[::7] == 0).all())
    assert torch.unique(y).numel() == 2**b + 1


def test_documented_examples():
    """The literal level sets quoted in SPEC 2.7/2.8 (σ units)."""
    x = _dist("normal", 50000, seed=3)
    sigma = x.double().std().item()
    cases = [
        ("clip", 3, [s * k * 0.5860 for s in (-1, 1) for k in (0.5, 1.5, 2.5, 3.5)]),
        ("pot", 2, [s * k * 0.9 for s in (-1, 1) for k in (0.5, 2)]),
        ("pot", 3, [s * k * 0.4 for s in (-1, 1) for k in (0.5, 2, 4, 8)]),
        ("pot", 4, [s * k * 0.03 for s in (-1, 1) for k in (0.5, 2, 4, 8, 16, 32, 64, 128)]),
    ]
    for scheme, b, lv in cases:
        levels = torch.tensor(sorted(lv), dtype=torch.float64) * sigma
        y = AF.quantize(x, scheme, b)
        got = torch.unique(y).double()
        assert got.numel() == levels.numel(), (scheme, b)
        torch.testing.assert_close(got, levels, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dist", ("normal", "uniform", "laplace"))
@pytest.mark.parametrize("scheme,b", [(s, b) for s, b in SCHEME_BITS if s in ("clip", "zoom", "fixed")],
                         ids=[f"{s}-{b}" for s, b in SCHEME_BITS if s in ("clip", "zoom", "fixed")])
def test_nearest_level_inside_range(scheme, b, dist):
    """clip (inside ±2^(b-1)α), zoom (everywhere) and fixed (inside its code range) pick the
    level nearest to x; outside the range they saturate to the extreme level."""
    x = _dist(dist)
    y = AF.quantize(x, scheme, b).double()
    levels, _ = expected(x, scheme, b)
    xd = x.double()
    lo, hi = levels.min().item(), levels.max().item()
    if scheme == "clip":
        half = (levels[1] - levels[0]).item() / 2
        inside = (xd >= lo - half) & (xd <= hi + half)
    elif scheme == "fixed":
        half = (levels[1] - levels[0]).item() / 2
        inside = (xd >= lo - half) & (xd < hi + half)
    else:
        inside = torch.ones_like(xd, dtype=torch.bool)
    assert inside.double().mean() > 0.5  # the check below covers most elements
    near = nearest(xd[inside], levels)
    assert frac_equal(y[inside], near, _tol(levels)) >= 0.999
    tol = _tol(levels)
    assert bool(((y[(xd > hi) & ~inside] - hi).abs() <= tol).all())
    assert bool(((y[(xd < lo) & ~inside] - lo).abs() <= tol).all())


def test_fixed_is_exact():
    """FixedQ's step is a power of two, so the float32 result equals the documented one exactly."""
    for dist in DISTS:
        x = _dist(dist)
        for b in BITS["fixed"]:
            _, y_exp = expected(x, "fixed", b)
            assert torch.equal(AF.quantize(x, "fixed", b).double(), y_exp), (dist, b)


def test_binary_nonpositive_goes_to_minus_alpha():
    x = torch.tensor([-1.0, 0.0, 0.0, 2.0, -0.0, 3.0])
    y = AF.quantize(x, "binary", 1)
    a = x.abs().mean().item()
    torch.testing.assert_close(y, torch.tensor([-a, -a, -a, a, -a, a]), rtol=1e-6, atol=0)


def test_ternary_twn_rule_small_example():
    # mean|x| = 1.0 -> Δ = 0.7; |x| > Δ for 1.0, -1.5, 2.0, -1.5 -> α = 1.5 (0.6 and below -> 0)
    x = torch.tensor([0.1, 1.0, -1.5, 2.0, -0.3, 0.6, -1.5])
    y = AF.quantize(x, "ternary", 2)
    torch.testing.assert_close(y, torch.tensor([0.0, 1.5, -1.5, 1.5, 0.0, 0.0, -1.5]), rtol=1e-6, atol=0)


def test_quaternary_is_mid_tread_not_clip2():
    """{-2,-1,0,1}·α (asymmetric, has a zero level), distinct from ClipQ-2's ±{0.5,1.5}·α."""
    x = _dist("normal")
    yq = AF.quantize(x, "quaternary", 2)
    yc = AF.quantize(x, "clip", 2)
    assert bool((yq == 0).any()) and not bool((yc == 0).any())
    u = torch.unique(yq).double()
    a = u.max().item()
    torch.testing.assert_close(u, a * torch.tensor([-2.0, -1.0, 0.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)


def test_residual_partial_sums_are_nested():
    """ResQ's α_i only depend on earlier residuals: q_{b+1} - q_b = α_{b+1}·sgn(x - q_b)."""
    x = _dist("laplace")
    prev = AF.quantize(x, "residual", 2).double()
    for b in range(3, 9):
        cur = AF.quantize(x, "residual", b).double()
        r = x.double() - prev
        a = r.abs().mean().item()
        step = torch.where(r > 0, a, -a)
        assert frac_equal(cur - prev, step, 1e-5 * a + 1e-6) >= 0.999, b
        prev = cur


# ----------------------------------------------------------------------------- re-quantization
STABLE = [(s, b) for s, b in SCHEME_BITS if s != "residual"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", ("normal", "uniform", "laplace"))
@pytest.mark.parametrize("scheme,b", STABLE, ids=[f"{s}-{b}" for s, b in STABLE])
def test_requantize_with_same_params_is_stable(scheme, b, dist, backend):
    x = _dist(dist, 5000)
    p = AF.scheme_params(x, [scheme], b)
    y = AF.quantize(x, scheme, b, params=p, backend=backend)
    # the precomputed params are x's own statistics (up to the last ulp of a reduction order)
    torch.testing.assert_close(y, AF.quantize(x, scheme, b, backend=backend), rtol=1e-6, atol=1e-7)
    if scheme == "quaternary":
        # each level v·α maps back to v iff α/s ∈ [0.75, 1.5): -2α/s must not round above -1.5
        # and ±α/s must round to ±1 (round-half-even sends -1.5 to -2)
        s, a = p[0, 0, 0].item(), p[0, 0, 1].item()
        assert 0.75 <= a / s < 1.5
    y2 = AF.quantize(y, scheme, b, params=p, backend=backend)
    assert torch.equal(y2, y)


@pytest.mark.parametrize("dist", ("normal", "uniform", "relu"))
def test_binary_and_ternary_idempotent_with_recomputed_stats(dist):
    """Guaranteed: mean|q(x)| = α (binary); for ternary α' = α and Δ' = 0.7·α·p < α."""
    x = _dist(dist)
    for scheme, b in (("binary", 1), ("ternary", 2)):
        y = AF.quantize(x, scheme, b)
        y2 = AF.quantize(y, scheme, b)
        assert torch.equal(torch.sign(y2), torch.sign(y)), scheme
        torch.testing.assert_close(y2, y, rtol=1e-5, atol=0)


@pytest.mark.parametrize("b", BITS["fixed"])
def test_fixed_idempotent_unless_negative_extreme(b):
    """FixedQ with recomputed statistics is exactly idempotent whenever no element maps to the
    code -2^(b-1): then max|q| stays in [2^E, 2^(E+1)) and the step is unchanged."""
    x = _dist("normal")
    x = torch.where(x < -2.0, -2.0, x)  # max|x| attained on the positive side
    y = AF.quantize(x, "fixed", b)
    step = 2.0 ** (math.floor(math.log2(x.abs().max().item())) - (b - 2))
    assert y.min().item() > -(2 ** (b - 1)) * step
    assert torch.equal(AF.quantize(y, "fixed", b), y)


def test_fixed_not_idempotent_when_negative_extreme_is_hit():
    """Counterexample (documents the limit of the property above): the code -2^(b-1) gives
    |q| = 2^(E+1), so re-quantizing doubles the step."""
    x = torch.tensor([-3.9, 1.0, 0.5, 2.0])
    y = AF.quantize(x, "fixed", 3)  # E = 1, step 1, codes -4..3
    assert y.tolist() == [-4.0, 1.0, 0.0, 2.0]  # 0.5 -> round-half-even 0
    y2 = AF.quantize(y, "fixed", 3)  # E = 2, step 2
    assert y2.tolist() == [-4.0, 0.0, 0.0, 2.0]


def test_zoom_not_idempotent_with_recomputed_stats():
    """ZoomQ's output range is [min + step/2, max - step/2], so the recomputed grid differs."""
    x = _dist("normal")
    y = AF.quantize(x, "zoom", 3)
    y2 = AF.quantize(y, "zoom", 3)
    step = (x.max() - x.min()).item() / 8
    step2 = (y.max() - y.min()).item() / 8
    assert step2 == pytest.approx(step * 7 / 8, rel=1e-5)
    assert not torch.equal(y2, y)


# ----------------------------------------------------------------------------- scale equivariance
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme,b", SCHEME_BITS, ids=SB_IDS)
def test_scale_equivariance_power_of_two_exact(scheme, b, backend):
    x = _dist("laplace", seed=5)
    y = AF.quantize(x, scheme, b, backend=backend)
    for c in (2.0, 0.25):
        yc = AF.quantize(x * c, scheme, b, backend=backend)
        assert torch.equal(yc, y * c), c


NON_FIXED = [(s, b) for s, b in SCHEME_BITS if s != "fixed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme,b", NON_FIXED, ids=[f"{s}-{b}" for s, b in NON_FIXED])
def test_scale_equivariance_general(scheme, b, backend):
    c = 3.7
    x = _dist("normal", seed=6)
    y = AF.quantize(x, scheme, b, backend=backend).double() * c
    yc = AF.quantize(x * c, scheme, b, backend=backend).double()
    tol = 1e-5 * y.abs().max().item()
    close = (y - yc).abs() <= tol
    n_bad = int((~close).sum())
    assert n_bad < 1e-3 * x.numel(), f"{n_bad} elements moved"


def test_fixed_not_equivariant_for_non_power_of_two():
    """Documented: FixedQ's step is 2^e, so a factor like 3.7 changes the grid (we only assert that
    the grid of q(3.7x) is a power-of-two grid, which 3.7·q(x) is not)."""
    x = _dist("normal", seed=6)
    y = AF.quantize(x, "fixed", 4) * 3.7
    yc = AF.quantize(x * 3.7, "fixed", 4)
    step_c = 2.0 ** (math.floor(math.log2((x * 3.7).abs().max().item())) - 2)
    assert torch.equal(torch.round(yc / step_c) * step_c, yc)
    assert not torch.equal(yc, y)


# ----------------------------------------------------------------------------- per channel
def _channel_weight():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(16, 3, 3, 3, generator=g)
    return w * (2.0 ** torch.arange(16, dtype=torch.float32)).reshape(16, 1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme,b", [(s, SCHEMES[s].default_bits) for s in SCHEMES] + [("clip", 8), ("pot", 4)],
                         ids=[f"{s}-{SCHEMES[s].default_bits}" for s in SCHEMES] + ["clip-8", "pot-4"])
def test_per_channel_equals_each_channel_alone(scheme, b, backend):
    w = _channel_weight()
    y = AF.quantize(w, scheme, b, per_channel=True, backend=backend)
    assert y.shape == w.shape
    for i in range(w.shape[0]):
        yi = AF.quantize(w[i], scheme, b, backend=backend)
        torch.testing.assert_close(y[i], yi, rtol=1e-6, atol=0, msg=f"channel {i}")
    # channel scales 1..2^15 apart: per-tensor statistics give a different result
    yt = AF.quantize(w, scheme, b, backend=backend)
    assert not torch.allclose(y, yt, rtol=1e-3, atol=0)
    # per-channel params have one row per channel
    p = AF.scheme_params(w, [scheme], b, per_channel=True)
    assert p.shape[:2] == (1, 16)


# ----------------------------------------------------------------------------- MSE table
def test_clip_mse_matches_spec_table():
    g = torch.Generator().manual_seed(2024)
    x = torch.randn(1_000_000, generator=g)
    table = {2: 0.1190, 3: 0.0374, 4: 0.01155, 5: 0.00350, 6: 0.00104, 7: 3.07e-4, 8: 8.97e-5}
    for b, mse in table.items():
        got = ((AF.quantize(x, "clip", b).double() - x.double()) ** 2).mean().item()
        assert got == pytest.approx(mse, rel=0.03), (b, got, mse)


# ----------------------------------------------------------------------------- mixture
ALL8 = list(SCHEMES)


def _weights(K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(K, generator=g), 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 5, 8], ids=lambda b: f"b{b}")
def test_mixture_equals_weighted_sum(bits, backend):
    schemes = [s for s in ALL8 if s != "pot" or bits <= 4]
    x = _dist("normal", 4000)
    w = _weights(len(schemes), bits)
    y = AF.quantize_mixture(x, w, schemes, bits, backend=backend)
    exp = torch.zeros_like(x, dtype=torch.float64)
    for k, s in enumerate(schemes):
        bk = SCHEMES[s].min_bits if not SCHEMES[s].multi_bit else bits
        exp += w[k].double() * AF.quantize(x, s, bk).double()
    torch.testing.assert_close(y.double(), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_per_candidate_bits(backend):
    schemes = ["binary", "ternary", "fixed", "clip", "pot"]
    bits = [1, 2, 6, 4, 2]
    x = _dist("laplace", 3000)
    w = _weights(5, 1)
    y = AF.quantize_mixture(x, w, schemes, bits, backend=backend)
    exp = sum(w[k].double() * AF.quantize(x, s, b).double() for k, (s, b) in enumerate(zip(schemes, bits)))
    torch.testing.assert_close(y.double(), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(8), ids=ALL8)
def test_mixture_one_hot_is_that_scheme(k, backend):
    x = _dist("normal", 3000)
    w = torch.zeros(8)
    w[k] = 1.0
    y = AF.quantize_mixture(x, w, ALL8, 3, backend=backend)
    s = ALL8[k]
    bk = 3 if SCHEMES[s].multi_bit else SCHEMES[s].min_bits
    assert torch.equal(y, AF.quantize(x, s, bk, backend=backend))


# ----------------------------------------------------------------------------- hypothesis
_shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).filter(lambda s: math.prod(s) >= 8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_shapes, log_scale=st.floats(-6, 6), seed=st.integers(0, 2**31 - 1), b=st.integers(2, 8),
       backend=st.sampled_from(BACKENDS))
def test_clip_levels_property(shape, log_scale, seed, b, backend):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2.0**log_scale
    y = AF.quantize(x, "clip", b, backend=backend)
    assert y.shape == x.shape
    levels, y_exp = expected(x, "clip", b)
    assert torch.unique(y).numel() <= 2**b
    assert_subset_of_levels(y, levels)
    # per element: the documented level except at a rounding tie (at most one element here)
    assert int(((y.double().reshape(-1) - y_exp).abs() > _tol(levels)).sum()) <= 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_shapes, seed=st.integers(0, 2**31 - 1), e=st.integers(-8, 8),
       sb=st.sampled_from(SCHEME_BITS), backend=st.sampled_from(BACKENDS))
def test_scale_equivariance_property(shape, seed, e, sb, backend):
    scheme, b = sb
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    c = 2.0**e
    assert torch.equal(AF.quantize(x * c, scheme, b, backend=backend), AF.quantize(x, scheme, b, backend=backend) * c)
