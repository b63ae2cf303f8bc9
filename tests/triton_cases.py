# SPDX-License-Identifier: MIT
"""The Triton kernels (``autoqnn.triton_kernels.mixture``, ops ``autoqnn::*_triton``) against the
pure-PyTorch reference. Not collected by default (the name does not start with ``test_``):
``tests/test_triton_kernels.py`` runs this file in a subprocess, with ``TRITON_INTERPRET=1`` on
CPU (the variable must be set before triton is imported, and other test modules import it) and,
on a GPU machine, a second time on CUDA. Run it directly with::

    TRITON_INTERPRET=1 python -m pytest tests/triton_cases.py -q -p no:cacheprovider

The output pass is fed the *same* params as the reference, so levels must agree exactly in
fp32/fp64/fp16 (a bounded count of rounding-tie differences is tolerated and tallied), and to one
ulp in bf16 (the interpreter truncates float→bf16 casts, torch rounds to nearest). Gradient sums
(⟨g, q_k⟩, ⟨g, ∂q_k/∂b⟩) are compared with a tolerance relative to Σ|terms| (another summation
order).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import autoqnn  # noqa: E402
import autoqnn.functional as AF  # noqa: E402
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

if _triton.kernels is None or backends.TRITON_ERROR is not None:
    pytest.fail(f"Triton kernels unavailable: {backends.TRITON_ERROR}", pytrace=False)

OPS = torch.ops.autoqnn
SIDS = list(range(8))
WEIGHT_SIDS = [scheme_info(s).id for s in WEIGHT_CANDIDATES]
ACT_SIDS = [scheme_info(s).id for s in ACTIVATION_CANDIDATES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (shape, per_channel, non-contiguous); multi-block rows: (5125,) and (3, 5000) with the
# interpreter's BLOCK of 4096, every shape with the GPU's 1024
SHAPES = [
    ((1,), False, False),
    ((769,), False, False),
    ((5125,), False, False),
    ((16, 3, 3, 3), False, False),
    ((16, 3, 3, 3), True, False),
    ((3, 5000), True, False),
    ((8, 30), True, True),  # a transposed view (non-contiguous)
    ((0,), False, False),
    ((), False, False),
]
SHAPE_IDS = ["1", "769", "5125", "16x3x3x3", "16x3x3x3-ch", "3x5000-ch", "T8x30-ch", "0", "0d"]

# rounding-tie differences (elements on a neighbouring level), tallied over the session
TIES = {"elements": 0, "compared": 0}
MAX_TIE_FRAC = 1e-3


def _x(shape, dtype, transposed=False, special=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:
        x = torch.randn(tuple(reversed(shape)), generator=g).t()
    else:
        x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).add(0.5)
    if special and x.numel() > 20:
        idx = [3, 5, 7, 11]
        vals = [float("nan"), float("inf"), -float("inf"), 0.0]
        flat = x.reshape(-1) if not transposed else None
        if flat is not None:
            for i, v in zip(idx, vals):
                flat[i] = v
        else:
            for i, v in zip(idx, vals):
                x[i % x.shape[0], i % x.shape[1]] = v
    x = x.to(dtype).to(DEVICE)
    assert x.is_contiguous() != transposed or x.numel() <= 1
    return x


def _bits_for(sids, b):
    """The SPEC's "one int for every multi-bit candidate" with each range respected."""
    out = []
    for s in sids:
        i = scheme_info(s)
        out.append(float(min(max(b, i.min_bits), i.max_bits)))
    return torch.tensor(out)


def _assert_levels(got, exp, what=""):
    """Exact agreement (NaN == NaN) up to a bounded number of rounding ties; one ulp in bf16."""
    assert got.shape == exp.shape and got.dtype == exp.dtype, (got.shape, exp.shape, got.dtype, exp.dtype)
    g, e = got.detach().cpu().double(), exp.detach().cpu().double()
    same = (g == e) | (torch.isnan(g) & torch.isnan(e))
    if got.dtype == torch.bfloat16:
        same |= torch.isclose(g, e, rtol=2.0 ** -7, atol=0.0)  # ≤ 1 ulp (truncating casts)
    bad = int((~same).sum())
    TIES["elements"] += bad
    TIES["compared"] += g.numel()
    assert bad <= max(2, int(MAX_TIE_FRAC * g.numel())), (
        f"{what}: {bad}/{g.numel()} differ; first: got {g[~same][:5].tolist()} exp {e[~same][:5].tolist()}"
    )


def _abs_sums(x, params, bits, sids, per_channel, g, w=None):
    """Per-candidate Σ|g·q_k| and Σ|g·∂q_k/∂b| (float64): the scale of the gradient sums."""
    x2 = ref._rows(x, per_channel).double()
    g2 = g.detach().double().reshape(x2.shape).cpu()
    x2 = x2.cpu()
    p = params.detach().double().cpu()
    b_int = ref.int_bits(bits, sids)
    sq, sd = [], []
    for k, s in enumerate(sids):
        q, _, D = ref.eval_scheme(s, x2, p[k], b_int[k], need_dbits=True)
        fin = torch.isfinite(q)
        sq.append(torch.where(fin, g2 * q, 0).abs().sum())
        wk = 1.0 if w is None else abs(float(w[k]))
        sd.append(wk * (g2 * D).abs().sum())
    return torch.stack(sq), torch.stack(sd)


def _assert_sums(got, exp, scale, what=""):
    got, exp = got.detach().double().cpu(), exp.detach().double().cpu()
    assert got.shape == exp.shape, (got.shape, exp.shape)
    nan_g, nan_e = torch.isnan(got), torch.isnan(exp)
    assert torch.equal(nan_g, nan_e), f"{what}: NaN pattern {got} vs {exp}"
    tol = 1e-4 * exp.abs() + 1e-5 * scale.double() + 1e-12
    diff = (got - exp).abs()
    ok = (diff <= tol) | nan_e | (got == exp)  # equal infinities too
    assert bool(ok.all()), f"{what}: got {got.tolist()} exp {exp.tolist()} tol {tol.tolist()}"


def _mixture_case(x, sids, b, per_channel, dtype_w=torch.float32, seed=2):
    K = len(sids)
    gen = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(K, generator=gen), 0).to(dtype_w).to(DEVICE)
    bits = _bits_for(sids, b).to(DEVICE)
    params = ref.scheme_params_ref(x, bits, sids, per_channel)
    y = OPS.mixture_triton(x, params, w, bits, sids, per_channel)
    yr = ref.mixture_ref(x, params, w, bits, sids, per_channel)
    assert y.is_contiguous()
    _assert_levels(y, yr, f"mixture y {sids} b={b}")
    gy = torch.randn(x.shape, generator=gen).to(x.dtype).to(DEVICE)
    got = OPS.mixture_backward_triton(gy, x, params, w, bits, sids, per_channel, True, True)
    exp = ref.mixture_backward_ref(gy, x, params, w, bits, sids, per_channel, True, True)
    _assert_levels(got[0], exp[0], "mixture grad_x")
    assert got[1].dtype == exp[1].dtype and got[2].dtype == exp[2].dtype
    if x.numel():
        sq, sd = _abs_sums(x, params, bits, sids, per_channel, gy, w)
    else:
        sq = sd = torch.zeros(K, dtype=torch.float64)
    _assert_sums(got[1], exp[1], sq, "grad_w")
    _assert_sums(got[2], exp[2], sd, "grad_bits")
    return params, w, bits, gy


# ----------------------------------------------------------------------------- single scheme
def _quantize_cases():
    out = []
    for s in SIDS:
        i = scheme_info(s)
        for b in sorted({i.min_bits, min(max(3, i.min_bits), i.max_bits), i.max_bits}):
            out.append((s, b))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("sid,b", _quantize_cases(), ids=lambda v: str(v))
def test_quantize_matches_reference(sid, b, dtype):
    for (shape, pc, tr), sid_name in zip(SHAPES, SHAPE_IDS):
        if tr and dtype != torch.float32:
            continue
        x = _x(shape, dtype, transposed=tr)
        bits = torch.tensor([b + 0.3], device=DEVICE)  # learned-bit style input, forward uses b
        params = ref.scheme_params_ref(x, bits, [sid], pc)
        q = OPS.quantize_triton(x, params, bits, sid, pc)
        qr = ref.quantize_ref(x, params, bits, sid, pc)
        _assert_levels(q, qr, f"quantize {scheme_info(sid).name}-{b} {sid_name}")
        gy = _x(shape, dtype, transposed=tr, special=False, seed=1)
        for need_b in (True, False):
            gx, gb = OPS.quantize_backward_triton(gy, x, params, bits, sid, pc, need_b)
            gxr, gbr = ref.quantize_backward_ref(gy, x, params, bits, sid, pc, need_b)
            _assert_levels(gx, gxr, "quantize grad_x")
            assert gb.dtype == gbr.dtype and gb.shape == gbr.shape
            if need_b and x.numel():
                _, sd = _abs_sums(x, params, bits, [sid], pc, gy)
                _assert_sums(gb, gbr, sd, "quantize grad_bits")
            else:
                assert torch.equal(gb.cpu(), gbr.cpu())


# ----------------------------------------------------------------------------- mixtures
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("b", [2, 3, 8])
@pytest.mark.parametrize("sids", [WEIGHT_SIDS, ACT_SIDS], ids=["weights8", "activations5"])
def test_mixture_matches_reference(sids, b, dtype):
    for (shape, pc, tr), sid_name in zip(SHAPES, SHAPE_IDS):
        if tr and dtype != torch.float32:
            continue
        x = _x(shape, dtype, transposed=tr, special=(sid_name != "769"))
        _mixture_case(x, sids, b, pc)


@pytest.mark.parametrize(
    "sids",
    [[6], [4, 6], [6, 3, 6], [7, 0, 5, 1], [3, 2, 4, 6, 5, 7, 1, 0]],
    ids=["clip", "res+clip", "dup-clip", "mixed4", "reversed8"],
)
def test_mixture_candidate_orders(sids):
    # duplicates and any order at the op level (the functional API rejects duplicates)
    x = _x((3, 700), torch.float32)
    _mixture_case(x, sids, 4, True)
    _mixture_case(x, sids, 2, False)


@pytest.mark.parametrize("fill", [0.0, 1.5, -2.0])
def test_constant_and_zero_inputs(fill):
    # zero scales (σ = 0, max − min = 0, mean|x| = 0 for zeros): every scheme's offset
    x = torch.full((300,), fill, device=DEVICE)
    for b in (2, 3):
        _mixture_case(x, WEIGHT_SIDS, b, False)
    x = torch.full((4, 50), fill, device=DEVICE)
    x[1] = torch.linspace(-1, 1, 50)
    _mixture_case(x, WEIGHT_SIDS, 3, True)


def test_extreme_values_and_weight_dtypes():
    x = _x((2000,), torch.float32)
    x[100:110] = torch.tensor([1e30, -1e30, 3e38, -1e37, 1e-30, -1e-30, 1e-45, -1e-45, 2.0**-126, 65504.0])
    _mixture_case(x, WEIGHT_SIDS, 3, False)
    for dw in (torch.float16, torch.bfloat16, torch.float64):
        _mixture_case(_x((777,), torch.float32), ACT_SIDS, 4, False, dtype_w=dw)


def test_partial_gradients_and_no_weights_grad():
    x = _x((1500,), torch.float32)
    sids = WEIGHT_SIDS
    params, w, bits, gy = _mixture_case(x, sids, 3, False)
    full = ref.mixture_backward_ref(gy, x, params, w, bits, sids, False, True, True)
    for nw, nb in ((True, False), (False, True), (False, False)):
        got = OPS.mixture_backward_triton(gy, x, params, w, bits, sids, False, nw, nb)
        exp = ref.mixture_backward_ref(gy, x, params, w, bits, sids, False, nw, nb)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[0], full[0])
        if not nw:
            assert torch.equal(got[1], exp[1])  # zeros
        if not nb:
            assert torch.equal(got[2], exp[2])


def test_backward_is_deterministic():
    x = _x((4, 9000), torch.float32)
    gy = _x((4, 9000), torch.float32, special=False, seed=5)
    bits = _bits_for(WEIGHT_SIDS, 3)
    w = torch.softmax(torch.randn(8), 0)
    p = ref.scheme_params_ref(x, bits, WEIGHT_SIDS, True)
    a = OPS.mixture_backward_triton(gy, x, p, w, bits, WEIGHT_SIDS, True, True, True)
    b = OPS.mixture_backward_triton(gy, x, p, w, bits, WEIGHT_SIDS, True, True, True)
    for u, v in zip(a, b):
        assert torch.equal(u.nan_to_num(), v.nan_to_num())


def test_launcher_errors():
    x = _x((10,), torch.float32)
    bits = _bits_for(SIDS, 3)
    p = ref.scheme_params_ref(x, bits, SIDS, False)
    w = torch.full((8,), 0.125)
    with pytest.raises(ValueError, match="params must have shape"):
        OPS.mixture_triton(x, p[:, :, :5], w, bits, SIDS, False)
    with pytest.raises(ValueError, match="unknown scheme"):
        OPS.quantize_triton(x, p[:1], bits[:1], 11, False)
    with pytest.raises(ValueError, match="finite"):
        OPS.mixture_triton(x, p, w, torch.full((8,), float("nan")), SIDS, False)
    from autoqnn.triton_kernels import mixture as tk

    with pytest.raises(ValueError, match="outside the range"):
        tk.mixture_fwd(x, p, w, [1, 2, 2, 3, 3, 3, 3, 5], SIDS, False)
    with pytest.raises(ValueError, match="1..8 candidates"):
        tk.mixture_fwd(x, torch.zeros(9, 1, 12), torch.ones(9), [3] * 9, [3] * 9, False)


# ----------------------------------------------------------------------------- op registration
def test_opcheck_twin_ops():
    x = _x((2, 33), torch.float32, special=False)  # opcheck compares outputs without equal_nan
    bits = _bits_for(SIDS, 3)
    p = ref.scheme_params_ref(x, bits, SIDS, True)
    w = torch.softmax(torch.randn(8), 0).to(DEVICE)
    gy = _x((2, 33), torch.float32, special=False, seed=3)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    br = bits.clone().to(DEVICE).requires_grad_()
    torch.library.opcheck(OPS.mixture_triton.default, (xr, p, wr, br, SIDS, True))
    torch.library.opcheck(OPS.mixture_backward_triton.default, (gy, x, p, w, bits, SIDS, True, True, True))
    torch.library.opcheck(OPS.quantize_triton.default, (xr, p[6:7], br[6:7], 6, True))
    torch.library.opcheck(OPS.quantize_backward_triton.default, (gy, x, p[7:8], bits[7:8], 7, True, True))
    assert backends.TRITON_OPS >= {"quantize", "quantize_backward", "mixture", "mixture_backward"}
    assert backends.resolve("triton", torch.device(DEVICE), ["mixture", "mixture_backward"]) == "triton"


def test_main_op_cuda_kernel_path():
    # the function registered as the main ops' CUDA kernel when the extension has none
    x = _x((3, 400), torch.float32)
    gy = _x((3, 400), torch.float32, special=False, seed=4)
    bits = _bits_for(WEIGHT_SIDS, 3)
    w = torch.softmax(torch.randn(8), 0).to(DEVICE)
    p = ref.scheme_params_ref(x, bits, WEIGHT_SIDS, True)
    y = _triton._eager(_triton._IMPLS["mixture"])(x, p, w, bits, WEIGHT_SIDS, True)
    assert torch.equal(y.nan_to_num(), OPS.mixture_triton(x, p, w, bits, WEIGHT_SIDS, True).nan_to_num())
    g = _triton._eager(_triton._IMPLS["mixture_backward"])(gy, x, p, w, bits, WEIGHT_SIDS, True, True, True)
    e = OPS.mixture_backward_triton(gy, x, p, w, bits, WEIGHT_SIDS, True, True, True)
    for u, v in zip(g, e):
        assert torch.equal(u.nan_to_num(), v.nan_to_num())
    if torch.cuda.is_available():
        from autoqnn import kernel_choice as kc

        assert set(kc.ROUTER_INSTALLED) == set(kc.ROUTED_OPS)  # Triton alone suffices for the router
        assert backends.kernel_for("mixture", "cuda") in ("triton", "cuda")


def test_router_with_real_kernels(tmp_path, monkeypatch):
    """The auto-choice router (autoqnn.kernel_choice) sends each op to the kernel its table names:
    here on this device's tensors with a hand-written table, against the reference; and tune()
    measures both implementations."""
    from autoqnn import kernel_choice as kc

    monkeypatch.setenv(kc.ENV_PATH, str(tmp_path / "choice.json"))
    kc.reset()
    key = kc.device_key(torch.device(DEVICE))
    avail = kc.providers("mixture", DEVICE)
    assert "triton" in avail
    bwd = "cuda" if "cuda" in avail else "triton"
    x = _x((3, 400), torch.float32, special=False)
    gy = _x((3, 400), torch.float32, special=False, seed=4)
    bits = _bits_for(WEIGHT_SIDS, 3)
    w = torch.softmax(torch.randn(8), 0).to(DEVICE)
    p = ref.scheme_params_ref(x, bits, WEIGHT_SIDS, True)
    want_y = ref.mixture_ref(x, p, w, bits, WEIGHT_SIDS, True)
    want_g = ref.mixture_backward_ref(gy, x, p, w, bits, WEIGHT_SIDS, True, True, True)
    used = []
    real = kc._impl

    def spy(provider, op):
        fn = real(provider, op)
        return lambda *a: used.append((op, provider)) or fn(*a)

    monkeypatch.setattr(kc, "_impl", spy)
    # forward on Triton up to 2000 elements, backward on the C++/CUDA kernel where there is one
    kc.save_table(key, {"ops": {
        "mixture": [{"max_numel": 2000, "provider": "triton"}, {"max_numel": None, "provider": "cuda"}],
        "mixture_backward": [{"max_numel": None, "provider": bwd}],
    }})
    y = kc._router("mixture")(x, p, w, bits, WEIGHT_SIDS, True)
    g = kc._router("mixture_backward")(gy, x, p, w, bits, WEIGHT_SIDS, True, True, True)
    assert used == [("mixture", "triton"), ("mixture_backward", bwd)]
    torch.testing.assert_close(y, want_y, equal_nan=True, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g[0], want_g[0], equal_nan=True, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g[1].double(), want_g[1].double(), atol=1e-3, rtol=1e-4)
    big = _x((3, 1000), torch.float32, special=False)  # 3000 elements: the table says cuda; without it, the default
    pb = ref.scheme_params_ref(big, bits, WEIGHT_SIDS, True)
    kc._router("mixture")(big, pb, w, bits, WEIGHT_SIDS, True)
    assert used[-1] == ("mixture", "cuda" if "cuda" in avail else avail[0])
    res = kc.tune(DEVICE, sizes=[256], rounds=1, warmup=1, ops=("quantize",), write=False)
    (m,) = res["measurements"]
    assert set(m["us"]) == set(avail) and m["provider"] in avail
    kc.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_functional_end_to_end(per_channel, dtype):
    """AF.quantize_mixture / AF.quantize with backend='triton' against backend='auto' given the
    same statistics (the Triton ones: the C++ ones differ by ulps, which moves every ResQ level by
    an ulp), values and the gradients of x, weights, bits."""
    x0 = _x((6, 5, 7), dtype)
    gy = _x((6, 5, 7), dtype, special=False, seed=9)
    for cands in (WEIGHT_CANDIDATES, ACTIVATION_CANDIDATES):
        K = len(cands)
        res = []
        P = AF.scheme_params(x0, cands, 3, per_channel=per_channel, backend="triton")
        torch.testing.assert_close(P, AF.scheme_params(x0, cands, 3, per_channel=per_channel), rtol=2e-5, atol=1e-7)
        for backend in ("triton", "auto"):
            x = x0.clone().requires_grad_()
            w = torch.softmax(torch.arange(K, dtype=torch.float32), 0).to(DEVICE).requires_grad_()
            b = torch.tensor(3.4, device=DEVICE, requires_grad=True)
            y = AF.quantize_mixture(x, w, cands, b, per_channel=per_channel, backend=backend,
                                    params=None if backend == "triton" else P)
            y.backward(gy)
            res.append((y.detach(), x.grad, w.grad, b.grad))
        (y1, gx1, gw1, gb1), (y2, gx2, gw2, gb2) = res
        _assert_levels(y1, y2, f"AF mixture {len(cands)}")
        _assert_levels(gx1, gx2, "AF grad_x")
        torch.testing.assert_close(gw1, gw2, rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(gb1, gb2, rtol=1e-4, atol=1e-4)
    for scheme in ("clip", "pot", "residual"):
        res = []
        P = AF.scheme_params(x0, [scheme], 3, per_channel=per_channel, backend="triton")
        for backend in ("triton", "auto"):
            x = x0.clone().requires_grad_()
            b = torch.tensor(2.6, device=DEVICE, requires_grad=True)
            y = AF.quantize(x, scheme, b, per_channel=per_channel, backend=backend,
                            params=None if backend == "triton" else P)
            y.backward(gy)
            res.append((y.detach(), x.grad, b.grad))
        _assert_levels(res[0][0], res[1][0], f"AF quantize {scheme}")
        _assert_levels(res[0][1], res[1][1], f"AF quantize {scheme} grad_x")
        torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-4, atol=1e-4)


def test_tie_tally():
    # runs last in this file: the rounding-tie differences seen by every comparison above
    print(f"\nrounding-tie differences: {TIES['elements']} of {TIES['compared']} compared elements")
    assert TIES["elements"] <= max(2, MAX_TIE_FRAC * max(TIES["compared"], 1))


# ----------------------------------------------------------------------------- statistics passes
STATS_SHAPES = [s for s in SHAPES] + [((2, 0), True, False), ((4, 300), False, False)]
STATS_IDS = SHAPE_IDS + ["2x0-ch", "4x300"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,per_channel,transposed", STATS_SHAPES, ids=STATS_IDS)
def test_statistics_match_reference(shape, per_channel, transposed, dtype):
    """tensor_stats / scheme_params on Triton against the reference: every scheme, ResQ at 2, 3
    and 8 bits (up to 9 chained passes), NaN/±Inf excluded, empty rows and 0-d inputs."""
    x = _x(shape, dtype, transposed=transposed)
    t = OPS.tensor_stats_triton(x, per_channel)
    tr = ref.tensor_stats_ref(x, per_channel)
    assert t.dtype == tr.dtype and t.shape == tr.shape and t.device == x.device
    torch.testing.assert_close(t, tr, rtol=2e-5, atol=1e-6)
    for b in (2, 3, 8):
        bits = _bits_for(SIDS, b).to(DEVICE)
        p = OPS.scheme_params_triton(x, bits, SIDS, per_channel)
        pr = ref.scheme_params_ref(x, bits, SIDS, per_channel)
        assert p.dtype == pr.dtype and p.shape == pr.shape
        torch.testing.assert_close(p, pr, rtol=2e-5, atol=1e-7, msg=lambda m: f"bits {b}: {m}")
    # a subset of candidates runs only the passes it needs, with the same values
    sub = [scheme_info("zoom").id, scheme_info("residual").id]
    bits = torch.tensor([3.0, 4.0], device=DEVICE)
    torch.testing.assert_close(OPS.scheme_params_triton(x, bits, sub, per_channel),
                               ref.scheme_params_ref(x, bits, sub, per_channel), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("shape,per_channel", [((300,), False), ((3, 700), True)], ids=["300", "3x700-ch"])
def test_statistics_without_bits_grad(shape, per_channel):
    """need_bits_grad=False: ResQ's α_{b+1} slot is 0 (its pass is left out of the plan), every
    other slot bit-identical, and the reference's values."""
    x = _x(shape, torch.float32)
    for b in (2, 8):
        bits = _bits_for(SIDS, b).to(DEVICE)
        full = OPS.scheme_params_triton(x, bits, SIDS, per_channel, True)
        nb = OPS.scheme_params_triton(x, bits, SIDS, per_channel, False)
        keep = torch.ones_like(full, dtype=torch.bool)
        keep[4, :, b] = False
        assert not nb[4, :, b].any() and full[4, :, b].all()
        assert torch.equal(nb[keep], full[keep])
        torch.testing.assert_close(nb, ref.scheme_params_ref(x, bits, SIDS, per_channel, False), rtol=2e-5, atol=1e-7)


def test_statistics_edge_values_and_errors():
    for x in (torch.zeros(300), torch.full((300,), 2.5), torch.full((300,), float("nan")),
              torch.tensor([1e30, -1e30, 3.0] * 50)):
        x = x.to(DEVICE)
        bits = _bits_for(SIDS, 3).to(DEVICE)
        torch.testing.assert_close(OPS.scheme_params_triton(x, bits, SIDS, False),
                                   ref.scheme_params_ref(x, bits, SIDS, False), rtol=2e-5, atol=1e-7)
    with pytest.raises(TypeError, match="floating-point"):
        OPS.scheme_params_triton(torch.arange(10, device=DEVICE), _bits_for(SIDS, 3).to(DEVICE), SIDS, False)
    with pytest.raises(TypeError, match="floating-point"):
        OPS.tensor_stats_triton(torch.arange(10, device=DEVICE), False)
    x = _x((40,), torch.float32)
    clip = [scheme_info("clip").id]
    # learned bits are clipped into the scheme's range (SPEC 4.1); NaN bits are an error
    assert torch.equal(OPS.scheme_params_triton(x, torch.tensor([9.4], device=DEVICE), clip, False),
                       OPS.scheme_params_triton(x, torch.tensor([8.0], device=DEVICE), clip, False))
    with pytest.raises((ValueError, RuntimeError)):
        OPS.scheme_params_triton(x, torch.tensor([float("nan")], device=DEVICE), clip, False)


def test_statistics_constant_rows_have_zero_sigma():
    """A row of one repeated value has σ = 0 exactly (so QuaternaryQ/ClipQ/PotQ scales 0), also
    where its rounded mean is not the value (0.1 × 17 elements); per tensor and per channel."""
    sig = [scheme_info(s).id for s in ("quaternary", "clip", "pot")]
    bits = torch.tensor([2.0, 2.0, 2.0], device=DEVICE)
    for dtype in (torch.float32, torch.float64):
        for n in (17, 100, 1000):
            rows = torch.tensor([0.1, -1 / 3, 0.002, 7.3], dtype=dtype)[:, None].expand(4, n).clone()
            rows[0, 0] = float("nan")
            for pc, x in ((True, rows), (False, rows[1])):
                p = OPS.scheme_params_triton(x.to(DEVICE), bits, sig, pc)
                assert not p.any(), (dtype, n, pc, p[:, :, :2].tolist())
                assert torch.equal(p.cpu(), ref.scheme_params_ref(x, bits.cpu(), sig, pc))


def test_statistics_deterministic_and_opcheck():
    x = _x((3, 5000), torch.float32)
    bits = _bits_for(SIDS, 3).to(DEVICE)
    a = OPS.scheme_params_triton(x, bits, SIDS, True)
    assert torch.equal(a, OPS.scheme_params_triton(x, bits, SIDS, True))
    xs = _x((4, 30), torch.float32)
    torch.library.opcheck(OPS.scheme_params_triton.default, (xs, bits, SIDS, True))
    torch.library.opcheck(OPS.tensor_stats_triton.default, (xs, False))


def test_functional_triton_backend_uses_triton_statistics(monkeypatch):
    """backend="triton" computes the scales with the Triton statistics (no reference call)."""
    calls = []
    real = _triton._IMPLS["scheme_params"]
    x = _x((6, 50), torch.float32, special=False)
    w = torch.softmax(torch.randn(8), 0).to(DEVICE)
    y_auto = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3, per_channel=True, backend="torch")
    monkeypatch.setattr(ref, "scheme_params_ref", lambda *a: calls.append("ref") or (_ for _ in ()).throw(
        AssertionError("reference statistics used")))
    y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3, per_channel=True, backend="triton")
    assert not calls
    # statistics agree to rounding (ulps), which moves levels by ulps: values close, not equal
    torch.testing.assert_close(y, y_auto, rtol=1e-5, atol=1e-6)
    assert real is _triton._IMPLS["scheme_params"]


# ----------------------------------------------------------------------------- batched variant
def _ragged(dtype, seed=0):
    """Ragged rows (an empty one, one longer than the interpreter's 4096-element block, a single
    element), each with its own weights and bits (ResQ/FixedQ/ZoomQ/ClipQ bits differ per row)."""
    lens = [300, 0, 17, 5000, 1, 700]
    x = _x((sum(lens),), dtype, seed=seed)
    off = [0]
    for n in lens:
        off.append(off[-1] + n)
    g = torch.Generator().manual_seed(seed + 7)
    W = torch.softmax(torch.randn(len(lens), 8, generator=g), 1).to(DEVICE)
    B = torch.tensor([[1.0, 2, 2, b, b, b, b, min(b, 4)] for b in (3, 2, 8, 3, 5, 3)])
    return x, off, W, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_batched_ops_match_reference(dtype):
    """scheme_params_batched / mixture_batched (+backward) on Triton against the row-by-row
    reference: per-row statistics (with and without ResQ's α_{b+1}), levels, grad_x, and the
    per-row weights and bits gradients; deterministic."""
    x, off, W, B = _ragged(dtype)
    for nb in (True, False):
        p = OPS.scheme_params_batched_triton(x, off, B, SIDS, nb)
        pr = ref.scheme_params_batched_ref(x, off, B, SIDS, nb)
        assert p.shape == pr.shape and p.dtype == pr.dtype and p.device == x.device
        torch.testing.assert_close(p, pr, rtol=2e-5, atol=1e-7)
    gy = _x(x.shape, dtype, special=False, seed=9)
    y = OPS.mixture_batched_triton(x, off, pr, W, B, SIDS)
    yr = ref.mixture_batched_ref(x, off, pr, W, B, SIDS)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_levels(y, yr, f"batched y {dtype}")
    gx, gw, gb = OPS.mixture_batched_backward_triton(gy, x, off, pr, W, B, SIDS, True, True)
    gxr, gwr, gbr = ref.mixture_batched_backward_ref(gy, x, off, pr, W, B, SIDS, True, True)
    _assert_levels(gx, gxr, f"batched grad_x {dtype}")
    assert gw.shape == W.shape and gb.shape == B.shape
    torch.testing.assert_close(gw, gwr, rtol=1e-3, atol=1e-3, equal_nan=True)
    torch.testing.assert_close(gb.cpu(), gbr.cpu(), rtol=1e-3, atol=1e-3)
    assert not gw[1].any() and not gb[1].any()  # the empty row
    again = OPS.mixture_batched_backward_triton(gy, x, off, pr, W, B, SIDS, True, True)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(again, (gx, gw, gb)))
    _, gw0, gb0 = OPS.mixture_batched_backward_triton(gy, x, off, pr, W, B, SIDS, False, False)
    assert not gw0.any() and not gb0.any()


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_batched_api_equals_one_call_per_tensor(per_channel, monkeypatch):
    """quantize_mixture_batched(backend="triton") gives one call per tensor's values and
    gradients (x, mixture weights, learned bits) through the batched twins."""
    shapes = [(16, 3, 3, 3), (10,), (0,), (40, 50)]
    xs = [_x(s, torch.float32, special=False, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    theta = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    bits = torch.tensor([[1.0, 2, 2, 3, 3, 3, 3, 3], [1.0, 2, 2, 4, 4, 4, 4, 4]] * 2, device=DEVICE,
                        requires_grad=True)
    probe = [torch.randn(s, generator=torch.Generator().manual_seed(11)).to(DEVICE) for s in shapes]

    def run(batched):
        w = torch.softmax(theta, 1)
        if batched:
            ys = AF.quantize_mixture_batched(xs, w, WEIGHT_CANDIDATES, bits, per_channel=per_channel,
                                             backend="triton")
        else:
            ys = [AF.quantize_mixture(x, w[i], WEIGHT_CANDIDATES, bits[i], per_channel=per_channel, backend="triton")
                  for i, x in enumerate(xs)]
        loss = sum((y * p).sum() for y, p in zip(ys, probe))
        return ys, torch.autograd.grad(loss, xs + [theta, bits])

    calls = []
    for name in ("mixture_batched_fwd", "mixture_batched_bwd"):  # count the batched launchers' calls
        fn = getattr(_triton.kernels, name)
        monkeypatch.setattr(_triton.kernels, name,
                            lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    ys, gs = run(True)
    assert calls == ["mixture_batched_fwd", "mixture_batched_bwd"]  # one batched call each way
    ys1, gs1 = run(False)
    for a, b in zip(ys, ys1):
        assert torch.equal(a, b)
    for a, b in zip(gs, gs1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert gs[-1].abs().sum() > 0 and gs[-2].abs().sum() > 0


def test_batched_ops_opcheck_and_errors():
    x, off, W, B = _ragged(torch.float32)
    xs = x.nan_to_num(0.0, 0.0, 0.0)  # opcheck compares outputs without equal_nan
    pr = ref.scheme_params_batched_ref(xs, off, B, SIDS)
    gy = _x(x.shape, torch.float32, special=False, seed=2)
    torch.library.opcheck(OPS.scheme_params_batched_triton.default, (xs, off, B, SIDS, False))
    torch.library.opcheck(OPS.mixture_batched_triton.default, (xs.clone().requires_grad_(), off, pr,
                                                               W.clone().requires_grad_(), B, SIDS))
    torch.library.opcheck(OPS.mixture_batched_backward_triton.default, (gy, xs, off, pr, W, B, SIDS, True, True))
    with pytest.raises(ValueError, match="offsets"):
        OPS.scheme_params_batched_triton(x, off[:-1], B[:-1], SIDS)
    with pytest.raises(ValueError, match="bits must have shape"):
        OPS.scheme_params_batched_triton(x, off, B[:, :3], SIDS)
    with pytest.raises(ValueError, match="weights must have shape"):
        OPS.mixture_batched_triton(x, off, pr, W[:3], B, SIDS)
    with pytest.raises((ValueError, RuntimeError)):  # learned bits must be finite
        OPS.mixture_batched_triton(x, off, pr, W, torch.full_like(B, float("nan")), SIDS)


# ----------------------------------------------------------------------------- out-of-bounds reads
def _twin(name):
    return getattr(OPS, f"{name}_triton")


def test_kernels_read_only_their_input():
    """Inputs inside poisoned guard bands (tests/guard_band.py): results bitwise equal to clean
    copies'. Masks matter most here: the interpreter does not fault on an out-of-bounds load. On
    the interpreter a subset (about 1.5 ms per program): a tail inside a block, per-channel rows,
    a strided view, bf16, ragged batched rows; every case on a GPU."""
    import guard_band as GB  # noqa: PLC0415

    cases = [(s, pc, d) for s, pc in GB.SHAPES for d in (torch.float32, torch.bfloat16)]
    if INTERPRET:
        cases = [((769,), False, torch.float32), ((3, 130), True, torch.float32), ((1,), False, torch.bfloat16)]
    for shape, per_channel, dtype in cases:
        for sids in (GB.WEIGHT_SIDS, GB.ACT_SIDS):
            GB.check_per_tensor_ops(_twin, DEVICE, dtype, shape, per_channel, sids)
    GB.check_per_tensor_ops(_twin, DEVICE, torch.float32, (3, 130) if INTERPRET else (7, 130), True, GB.WEIGHT_SIDS,
                            strided=True)
    for dtype in (torch.float32,) if INTERPRET else (torch.float32, torch.bfloat16):
        GB.check_batched_ops(_twin, DEVICE, dtype, GB.WEIGHT_SIDS)


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("levels", ["0", "1"], ids=["arith", "levels"])
def test_twins_keep_dense_layouts(levels, monkeypatch):
    """Channels-last, permuted, transposed and sliced inputs (tests/kernel_inputs.py): the twins
    read a dense x in memory order and lay y and grad_x out like it, bit for bit equal to the
    same elements handed over contiguously in that order, on both output passes."""
    from kernel_inputs import check_op_layouts

    monkeypatch.setenv("AUTOQNN_TRITON_LEVELS", levels)
    # under the interpreter (slow, the levels pass most): the arithmetic pass on channels-last per
    # tensor and per channel, permuted, and the per-channel fallback; the levels pass on one
    only = ([0, 1, 3, 5] if levels == "0" else [1]) if INTERPRET else None
    check_op_layouts(_twin, DEVICE, only=only)
    if not INTERPRET:
        check_op_layouts(_twin, DEVICE, torch.bfloat16)


# ----------------------------------------------------------------------------- random cases
def flush_bf16_subnormals(x):
    """The interpreter converts bfloat16 subnormals to float32 wrongly (the pattern 0x0001,
    9.2e-41, becomes 0, 0x0021 becomes 3.7e-40 instead of 3.0e-39; triton 3.8), which a compiled
    kernel does exactly (a shift): the interpreted random cases flush them, the GPU run keeps them."""
    if x.dtype == torch.bfloat16:
        x.masked_fill_((x != 0) & (x.abs() < torch.finfo(torch.bfloat16).tiny), 0.0)


@pytest.mark.parametrize("levels", ["0", "1"], ids=["arith", "levels"])
def test_random_cases_match_reference(levels, monkeypatch):
    """The randomised differential cases of tests/test_kernel_fuzz.py (tests/fuzz_cases.py:
    candidate subsets and orders, per-candidate and learned bits, weights of any sign, scales
    1e-40..1e30, constant/zero/NaN/Inf rows, strided views) on the Triton ops, with the output
    kernels' arithmetic pass and with their levels-table pass (``AUTOQNN_TRITON_LEVELS=1``; float64
    keeps the arithmetic one). Fewer examples than the C++ test: the interpreter runs each
    program in Python, and on a GPU each case compiles its own kernel variants (candidates and
    bits are compile-time constants; ``tools/gpu_check.sh`` gives it a step of its own)."""
    pytest.importorskip("hypothesis")
    monkeypatch.setenv("AUTOQNN_TRITON_LEVELS", levels)
    from fuzz_cases import cases, check_ops_case
    from hypothesis import HealthCheck, given, settings

    ops = {name: getattr(OPS, name + "_triton") for name in ("scheme_params", "mixture", "mixture_backward", "quantize")}

    @settings(max_examples=(30 if levels == "0" else 8) if INTERPRET else (12 if levels == "0" else 6), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(c=cases())
    def run(c):
        check_ops_case(c, ops, DEVICE, prep=flush_bf16_subnormals if INTERPRET else None)

    run()


def test_random_batched_cases_equal_one_call_per_tensor():
    """The random batched cases of tests/fuzz_cases.py on the Triton batched ops (ragged rows
    through a program table, one output launch per distinct bits row) against one per-tensor
    Triton call per tensor: statistics, y and grad_x bit for bit, the gradient sums close."""
    pytest.importorskip("hypothesis")
    from fuzz_cases import batched_cases, check_batched_case
    from hypothesis import HealthCheck, given, settings

    names = ("scheme_params", "mixture", "mixture_backward", "scheme_params_batched", "mixture_batched",
             "mixture_batched_backward")
    ops = {name: getattr(OPS, name + "_triton") for name in names}

    @settings(max_examples=10 if INTERPRET else 6, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(c=batched_cases())
    def run(c):
        check_batched_case(c, ops, DEVICE, prep=flush_bf16_subnormals if INTERPRET else None, exact_sums=False)

    run()
