# SPDX-License-Identifier: MIT
"""The levels-table output pass (``autoqnn.triton_kernels.levels``) against the arithmetic Triton
kernels (``triton_kernels.mixture``), which ``tests/triton_cases.py`` checks against the reference.

The claim is exactness: the same y, grad_x and even per-program gradient sums, bit for bit (NaN
where NaN). The hardest inputs are the table's own thresholds and their float32 neighbours, where
a threshold one ulp off shows; they are in every case. Like ``triton_cases.py`` this file is run
by ``tests/test_triton_kernels.py`` in a subprocess (``TRITON_INTERPRET=1`` on CPU; again on CUDA
when a GPU is visible)::

    TRITON_INTERPRET=1 python -m pytest tests/triton_levels_cases.py -q -p no:cacheprovider
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import autoqnn  # noqa: E402,F401
from autoqnn import backends  # noqa: E402
from autoqnn.ops import _triton  # noqa: E402
from autoqnn.ops import reference as ref  # noqa: E402
from autoqnn.schemes import ACTIVATION_CANDIDATES, WEIGHT_CANDIDATES, scheme_info  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

if _triton.kernels is None or _triton.levels_kernels is None or backends.TRITON_ERROR is not None:
    pytest.fail(f"Triton kernels unavailable: {backends.TRITON_ERROR}", pytrace=False)

M = _triton.kernels
L = _triton.levels_kernels
OPS = torch.ops.autoqnn
WEIGHT_SIDS = [scheme_info(s).id for s in WEIGHT_CANDIDATES]
ACT_SIDS = [scheme_info(s).id for s in ACTIVATION_CANDIDATES]
NEG_INF, POS_INF = torch.tensor(-float("inf")), torch.tensor(float("inf"))


def _bits(sids, b):
    return [min(max(b, scheme_info(s).min_bits), scheme_info(s).max_bits) for s in sids]


def _data(n, seed, heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * (0.5 + seed % 3)
    if heavy:  # heavier tails: ResQ's scales need not decrease, its value is then not monotone
        x = x.abs() ** 1.5 * torch.sign(x)
    return x


def _with_thresholds(x, params, w, b_int, sids, per_channel, seed=0):
    """x with its first elements replaced by the table's finite thresholds and both float32
    neighbours of each, plus ±0, ±Inf, NaN and a denormal (each row: its own thresholds)."""
    C = params.shape[1]
    T, _, _ = L.build_tables(params, w, b_int, sids, C, DEVICE)
    rows = x.reshape(C, -1).clone() if per_channel else x.reshape(1, -1).clone()
    g = torch.Generator().manual_seed(seed)
    for r in range(rows.shape[0]):
        t = T[r].cpu()
        t = t[torch.isfinite(t)]
        pts = torch.cat([t, torch.nextafter(t, NEG_INF), torch.nextafter(t, POS_INF),
                         torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-42])])
        pts = pts[torch.randperm(pts.numel(), generator=g)][: rows.shape[1]]
        rows[r, : pts.numel()] = pts.to(rows.dtype)
    return rows.reshape(x.shape)


def _same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    an, bn = torch.isnan(a), torch.isnan(b)
    bad = (a != b) & ~(an & bn)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())}/{a.numel()} differ; first at {bad.nonzero()[:3].tolist()}: "
        f"{a[bad][:3].tolist()} vs {b[bad][:3].tolist()}"
    )


def _compare(x, params, w, b_int, sids, per_channel, seed=1, need_w=True, need_b=True):
    """Levels against arithmetic: forward, backward (grad_x and the gradient sums)."""
    y0 = M.mixture_fwd(x, params, w, b_int, sids, per_channel)
    y1 = L.mixture_fwd_levels(x, params, w, b_int, sids, per_channel)
    _same(y1, y0, f"y {sids} bits={b_int}")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype).to(x.device)
    a = M.mixture_bwd(g, x, params, w, b_int, sids, per_channel, need_w, need_b)
    b = L.mixture_bwd_levels(g, x, params, w, b_int, sids, per_channel, need_w, need_b)
    for name, u, v in zip(("grad_x", "grad_w", "grad_bits"), b, a):
        _same(u, v, f"{name} {sids} bits={b_int}")
    return y1


def _case(sids, bits, shape, per_channel, dtype, seed=0, heavy=False, weighted=True):
    n = 1
    for s in shape:
        n *= s
    x = _data(n, seed, heavy).reshape(shape)
    b_int = _bits(sids, bits)
    bt = torch.tensor(b_int, dtype=torch.float32)
    params = ref.scheme_params_ref(x, bt, sids, per_channel).to(DEVICE)
    gen = torch.Generator().manual_seed(seed + 7)
    w = torch.softmax(torch.randn(len(sids), generator=gen), 0).to(DEVICE) if weighted else None
    x = _with_thresholds(x, params, w, b_int, sids, per_channel, seed).to(dtype).to(DEVICE)
    _compare(x, params, w, b_int, sids, per_channel, seed + 1)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sids", [list(range(8)), WEIGHT_SIDS, ACT_SIDS], ids=["all8", "weights", "acts"])
def test_mixture_equals_arithmetic(sids, bits):
    _case(sids, bits, (5125,), False, torch.float32, seed=bits)
    _case(sids, bits, (3000,), False, torch.float32, seed=bits + 1, heavy=True)


@pytest.mark.parametrize("sid", range(8))
def test_single_scheme_equals_arithmetic(sid):
    info = scheme_info(sid)
    for b in sorted({info.min_bits, min(max(3, info.min_bits), info.max_bits), info.max_bits}):
        _case([sid], b, (2000,), False, torch.float32, seed=sid + b, weighted=False)
        _case([sid], b, (2000,), False, torch.float32, seed=sid + b + 1, heavy=True, weighted=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs(dtype):
    _case(list(range(8)), 3, (4097,), False, dtype, seed=3)
    _case(WEIGHT_SIDS, 4, (3, 2, 3, 3), True, dtype, seed=4)


# the interpreter pays per program and the table costs a few programs per row: few rows here
@pytest.mark.parametrize("shape", [(3, 2000), (4, 3, 3, 3), (2, 1)], ids=["3x2000", "4x3x3x3", "2x1"])
def test_per_channel_rows_have_their_own_tables(shape):
    _case(list(range(8)), 3, shape, True, torch.float32, seed=5)
    if shape[0] <= 3:
        _case([3, 4, 5, 6, 7], 8, shape, True, torch.float32, seed=6, heavy=True)


def test_non_monotone_resq_and_degenerate_scales():
    """Hand-made params: ResQ with growing scales (its value jumps down at 0), zero scales (a
    constant or all-zero tensor), a zero-width ZoomQ and a huge ClipQ scale."""
    sids = [3, 4, 5, 6, 7]
    b_int = [3, 3, 3, 3, 3]
    p = torch.zeros(5, 2, 12)
    p[1, 0, :4] = torch.tensor([0.1, 0.5, 0.2, 0.7])  # ResQ α_1 < α_2: not monotone
    p[0, 0, 0], p[2, 0, 0], p[2, 0, 1], p[3, 0, 0], p[4, 0, 0] = 0.25, -1.0, 0.3, 1e30, 0.125
    p[2, 1, 0] = 2.0  # row 1: every scale 0, ZoomQ's min 2 and scale 0
    w = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    x = _data(4000, 9).reshape(2, 2000)
    x = _with_thresholds(x, p, w, b_int, sids, True)
    _compare(x.to(DEVICE), p.to(DEVICE), w.to(DEVICE), b_int, sids, True)
    for fill in (0.0, 1.5):  # constant tensors with their own statistics
        xc = torch.full((777,), fill)
        pc = ref.scheme_params_ref(xc, torch.tensor([3.0] * 5), sids, False)
        _compare(xc.to(DEVICE), pc.to(DEVICE), w.to(DEVICE), b_int, sids, False)


def test_partial_gradients_and_empty_inputs():
    sids, b_int = ACT_SIDS, _bits(ACT_SIDS, 3)
    x = _data(3000, 2)
    params = ref.scheme_params_ref(x, torch.tensor(b_int, dtype=torch.float32), sids, False).to(DEVICE)
    w = torch.full((len(sids),), 1.0 / len(sids), device=DEVICE)
    x = x.to(DEVICE)
    for need_w, need_b in ((True, False), (False, True), (False, False)):
        _compare(x, params, w, b_int, sids, False, need_w=need_w, need_b=need_b)
    e = torch.empty(0, device=DEVICE)
    assert L.mixture_fwd_levels(e, params, w, b_int, sids, False).shape == (0,)
    gx, gw, gb = L.mixture_bwd_levels(e, e, params, w, b_int, sids, False)
    assert gx.shape == (0,) and gw.tolist() == [0.0] * len(sids) and gb.tolist() == [0.0] * len(sids)
    s = torch.tensor(0.7, device=DEVICE)  # 0-d
    _same(L.mixture_fwd_levels(s, params, w, b_int, sids, False), M.mixture_fwd(s, params, w, b_int, sids, False), "0-d")


# ----------------------------------------------------------------------------- the table itself
def test_table_layout():
    """Sorted thresholds with both sentinels and at least two +Inf at the end (the search never
    reads the last slot; +Inf's segment must have +Inf as its representative)."""
    for bits, expect_p in ((2, 32), (3, 64), (4, 128), (8, 2048)):
        sids = list(range(8))
        b_int = _bits(sids, bits)
        pl = L.plan(sids, b_int)
        assert pl["P"] == expect_p and pl["NREAL"] + 1 <= pl["P"] < 2 * (pl["NREAL"] + 1)
        x = _data(3000, bits)
        params = ref.scheme_params_ref(x, torch.tensor(b_int, dtype=torch.float32), sids, False).to(DEVICE)
        T, V, P = L.build_tables(params, None if len(sids) == 1 else torch.ones(8, device=DEVICE) / 8,
                                 b_int, sids, 1, DEVICE)
        T = T[0].cpu()
        assert P == expect_p and V.shape == (1, 2 + 2 * len(sids), P)
        assert bool((T[1:] >= T[:-1]).all())
        assert T[-1] == float("inf") and T[-2] == float("inf")
        assert bool((T == -3.4028234663852886e38).any())
        assert not bool(torch.isnan(T).any())


def test_a_dropped_threshold_is_caught(monkeypatch):
    """The comparison can fail: with one FixedQ threshold left out of the table (its slot becomes
    a +Inf pad), elements above it get the level below it."""
    sids, b_int = [3], [3]
    real_plan = L.plan

    def short_plan(s, b):
        pl = real_plan(s, b)
        pl["consts"] = dict(pl["consts"], N0=pl["consts"]["N0"] - 1)  # the top threshold is never found
        return pl

    x = _data(2000, 1)
    params = ref.scheme_params_ref(x, torch.tensor([3.0]), sids, False).to(DEVICE)
    x = _with_thresholds(x, params, None, b_int, sids, False).to(DEVICE)
    monkeypatch.setattr(L, "plan", short_plan)
    with pytest.raises(AssertionError, match="differ"):
        _compare(x, params, None, b_int, sids, False)


# ----------------------------------------------------------------------------- the ops' switch
def test_env_switch_routes_the_ops(monkeypatch):
    sids, b_int = WEIGHT_SIDS, _bits(WEIGHT_SIDS, 3)
    x = _data(3000, 4).to(DEVICE)
    bits = torch.tensor([float(b) for b in b_int], device=DEVICE)
    params = ref.scheme_params_ref(x, bits, sids, False)
    w = torch.softmax(torch.arange(len(sids), dtype=torch.float32), 0).to(DEVICE)
    g = torch.randn_like(x)
    calls = []
    real_fwd, real_bwd = L.mixture_fwd_levels, L.mixture_bwd_levels
    monkeypatch.setattr(L, "mixture_fwd_levels", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))
    monkeypatch.setattr(L, "mixture_bwd_levels", lambda *a, **k: calls.append("bwd") or real_bwd(*a, **k))

    def run():
        y = OPS.mixture_triton(x, params, w, bits, sids, False)
        gs = OPS.mixture_backward_triton(g, x, params, w, bits, sids, False, True, True)
        q = OPS.quantize_triton(x, params[3:4], bits[3:4], sids[3], False)
        gq = OPS.quantize_backward_triton(g, x, params[3:4], bits[3:4], sids[3], False, True)
        return (y, *gs, q, *gq)

    monkeypatch.setenv(L.ENV, "0")
    base = run()
    assert calls == []
    monkeypatch.setenv(L.ENV, "1")
    got = run()
    assert calls == ["fwd", "bwd", "fwd", "bwd"]
    for i, (a, b) in enumerate(zip(got, base)):
        _same(a, b, f"output {i}")
    calls.clear()
    monkeypatch.setenv(L.ENV, "auto")  # rows shorter than AUTO_MIN_ROW: arithmetic
    run()
    assert calls == []
    monkeypatch.setattr(L, "AUTO_MIN_ROW", 1000)
    run()
    assert calls == ["fwd", "bwd", "fwd", "bwd"]
    calls.clear()
    monkeypatch.setenv(L.ENV, "1")  # float64 is not eligible: arithmetic, no error
    x64, p64 = x.double(), params.double()
    OPS.mixture_triton(x64, p64, w.double(), bits, sids, False)
    assert calls == []
    monkeypatch.setenv(L.ENV, "maybe")
    with pytest.raises(ValueError, match="AUTOQNN_TRITON_LEVELS"):
        OPS.mixture_triton(x, params, w, bits, sids, False)


def test_opcheck_and_compile_on_the_levels_path(monkeypatch):
    monkeypatch.setenv(L.ENV, "1")
    sids, b_int = ACT_SIDS, _bits(ACT_SIDS, 2)
    x = _data(1500, 8).to(DEVICE)
    bits = torch.tensor([float(b) for b in b_int], device=DEVICE)
    params = ref.scheme_params_ref(x, bits, sids, False)
    w = torch.softmax(torch.arange(len(sids), dtype=torch.float32), 0).to(DEVICE)
    torch.library.opcheck(OPS.mixture_triton, (x, params, w, bits, sids, False))
    g = torch.randn_like(x)
    torch.library.opcheck(OPS.mixture_backward_triton, (g, x, params, w, bits, sids, False, True, True))
    if INTERPRET:
        return  # Inductor compiles Triton for a GPU; the interpreter path is eager only
    f = torch.compile(lambda a: OPS.mixture_triton(a, params, w, bits, sids, False), fullgraph=True)
    _same(f(x), M.mixture_fwd(x, params, w, b_int, sids, False), "compiled levels forward")


def test_errors_name_the_argument():
    x = _data(100, 0)
    params = ref.scheme_params_ref(x, torch.tensor([3.0]), [3], False)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        L.mixture_fwd_levels(x.double().to(DEVICE), params.double().to(DEVICE), None, [3], [3], False)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        L.choose(x.double(), 1, method="levels")
    with pytest.raises(ValueError, match="method"):
        L.choose(x, 1, method="fast")
    with pytest.raises(ValueError, match="params must have shape"):
        L.mixture_fwd_levels(x.to(DEVICE), params[:, :, :5].to(DEVICE), None, [3], [3], False)
    with pytest.raises(ValueError, match="outside the range"):
        L.mixture_fwd_levels(x.to(DEVICE), params.to(DEVICE), None, [9], [3], False)
    with pytest.raises(ValueError, match="grad_y has shape"):
        L.mixture_bwd_levels(x[:5].to(DEVICE), x.to(DEVICE), params.to(DEVICE), None, [3], [3], False)
