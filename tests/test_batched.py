# SPDX-License-Identifier: MIT
"""The batched variant: ``autoqnn::scheme_params_batched`` / ``mixture_batched`` /
``mixture_batched_backward`` and :func:`autoqnn.functional.quantize_mixture_batched`.

The batched C++ kernel runs each row with the per-tensor kernel's chunking, tiles and
accumulation order, so its values and gradients are *bit-identical* to one
``quantize_mixture`` call per tensor; that is the strongest oracle and most tests use it. The
ops are also checked against their pure-PyTorch references (row-by-row loops), with opcheck and
``torch.compile(fullgraph=True)``."""
import pytest
import torch

from kernel_inputs import check_params_without_bits_grad, sample

import autoqnn.functional as AF
from autoqnn import _ext, backends
from autoqnn.ops import has_kernel
from autoqnn.ops import reference as ref
from autoqnn.schemes import NUM_PARAMS, WEIGHT_CANDIDATES

OPS = torch.ops.autoqnn
C8 = WEIGHT_CANDIDATES
SIDS = list(range(8))
HAVE_CPP = _ext.HAS_EXT and has_kernel("mixture_batched", "CPU")
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason=f"C++ CPU kernels not built: {_ext.LOAD_ERROR}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# weights of a small conv net, odd sizes across the kernels' tile (256) / chunk (16384)
# boundaries, an empty tensor and a single element
SHAPES = [(16, 3, 3, 3), (7,), (0,), (5, 769), (3, 16385), (1,), (2, 0)]


def _inputs(dtype, seed=0, shapes=SHAPES):
    xs = [sample(s, dtype, special=(i % 2 == 0), seed=seed + i) for i, s in enumerate(shapes)]
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.softmax(torch.randn(len(shapes), 8, generator=g), 1)
    return xs, W


def _run(fn, xs, W, B, gys):
    """Outputs and the gradients of xs, W and B (B may be None) for grad outputs gys."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    W = W.detach().clone().requires_grad_()
    B = None if B is None else B.detach().clone().requires_grad_()
    ys = fn(xs, W, B)
    torch.autograd.backward(ys, gys)
    return ys, [x.grad for x in xs], W.grad, None if B is None else B.grad


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits_kind", ["int", "per-tensor-ints", "learned"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_batched_equals_one_call_per_tensor(dtype, bits_kind, per_channel):
    xs, W = _inputs(dtype)
    S = len(xs)
    per_tensor = [[1, 2, 2, b, b, b, b, min(b, 4)] for b in (2, 3, 8, 5, 4, 6, 7)][:S]
    B = None
    if bits_kind == "learned":
        B = torch.tensor([[1.0, 2, 2, 3.4, 2.6, 5.1, 9.0, 3.2]] * S) + torch.linspace(0, 1.2, S)[:, None]
    gys = [sample(x.shape, dtype, special=False, seed=50 + i) for i, x in enumerate(xs)]

    def bits_of(i, B):
        return {"int": 3, "per-tensor-ints": per_tensor[i], "learned": None if B is None else B[i]}[bits_kind]

    def batched(xs, W, B):
        bits = {"int": 3, "per-tensor-ints": [torch.tensor(p) for p in per_tensor], "learned": B}[bits_kind]
        return AF.quantize_mixture_batched(xs, W, C8, bits, per_channel=per_channel)

    def looped(xs, W, B):
        return [AF.quantize_mixture(x, W[i], C8, bits_of(i, B), per_channel=per_channel) for i, x in enumerate(xs)]

    got = _run(batched, xs, W, B, gys)
    exp = _run(looped, xs, W, B, gys)
    for y, e in zip(got[0], exp[0]):
        assert _equal(y, e)
    for g, e in zip(got[1], exp[1]):
        assert _equal(g, e)
    if not per_channel:  # the same sums in the same order
        assert _equal(got[2], exp[2])  # NaN x gives NaN <g, q_k>, in both
        if B is not None:
            assert _equal(got[3], exp[3])
    else:  # per-row sums [R, K] are added over a tensor's channels by autograd: float rounding
        torch.testing.assert_close(got[2], exp[2], rtol=1e-5, atol=1e-5, equal_nan=True)
        if B is not None:
            torch.testing.assert_close(got[3], exp[3], rtol=1e-5, atol=1e-5)
    if B is not None:
        assert got[3].abs().sum() > 0  # the learned bits do receive a gradient


def _ragged(dtype, seed=0):
    """A flat x of ragged rows, empty and one-element rows included, NaN/Inf inside."""
    lens = [27, 0, 1, 769, 300, 16385, 2, 0, 5125]
    x = sample((sum(lens),), dtype, seed=seed)
    x[30:330] = 0.25  # row 4 constant
    off = [0]
    for n in lens:
        off.append(off[-1] + n)
    R = len(lens)
    g = torch.Generator().manual_seed(seed + 7)
    W = torch.softmax(torch.randn(R, 8, generator=g), 1)
    B = torch.tensor([[1.0, 2, 2, b, b, b, b, min(b, 4)] for b in (3, 2, 8, 4, 5, 6, 2, 7, 3)])
    return x, off, W, B


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_ops_match_reference(dtype):
    x, off, W, B = _ragged(dtype)
    gy = sample(x.shape, dtype, special=False, seed=9)
    p = OPS.scheme_params_batched(x, off, B, SIDS)
    pr = ref.scheme_params_batched_ref(x, off, B, SIDS)
    assert p.shape == pr.shape == (8, len(off) - 1, NUM_PARAMS) and p.dtype == pr.dtype
    torch.testing.assert_close(p, pr, rtol=2e-5, atol=1e-7)
    # each row's params are exactly the per-tensor kernel's on that row alone
    for r in range(len(off) - 1):
        pt = OPS.scheme_params(x[off[r]:off[r + 1]], B[r], SIDS, False)
        assert torch.equal(p[:, r:r + 1], pt)
    y = OPS.mixture_batched(x, off, pr, W, B, SIDS)
    yr = ref.mixture_batched_ref(x, off, pr, W, B, SIDS)
    assert y.dtype == dtype and y.shape == x.shape
    ok = torch.isclose(y.double(), yr.double(), rtol=1e-5, atol=1e-7, equal_nan=True)
    assert int((~ok).sum()) <= 2
    gx, gw, gb = OPS.mixture_batched_backward(gy, x, off, pr, W, B, SIDS, True, True)
    gxr, gwr, gbr = ref.mixture_batched_backward_ref(gy, x, off, pr, W, B, SIDS, True, True)
    assert gw.shape == gb.shape == (len(off) - 1, 8)
    ok = torch.isclose(gx.double(), gxr.double(), rtol=1e-5, atol=1e-7, equal_nan=True)
    assert int((~ok).sum()) <= 2
    torch.testing.assert_close(gw, gwr, rtol=1e-3, atol=1e-3, equal_nan=True)  # NaN x -> NaN q
    torch.testing.assert_close(gb, gbr, rtol=1e-3, atol=1e-3)
    assert torch.all(gw[[1, 7]] == 0) and torch.all(gb[[1, 7]] == 0)  # empty rows
    # without the optional gradients: zeros, grad_x unchanged
    gx2, gw2, gb2 = OPS.mixture_batched_backward(gy, x, off, pr, W, B, SIDS, False, False)
    assert torch.equal(gx2.nan_to_num(), gx.nan_to_num()) and not gw2.any() and not gb2.any()


@needs_cpp
def test_batched_ops_deterministic_across_threads():
    x, off, W, B = _ragged(torch.float32)
    gy = sample(x.shape, torch.float32, special=False, seed=3)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            p = OPS.scheme_params_batched(x, off, B, SIDS)
            y = OPS.mixture_batched(x, off, p, W, B, SIDS)
            outs.append((p, y) + tuple(OPS.mixture_batched_backward(gy, x, off, p, W, B, SIDS, True, True)))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_opcheck_batched_ops():
    x, off, W, B = _ragged(torch.float32)
    # finite values (opcheck compares outputs without equal_nan); few rows: opcheck runs a lot
    x, off = x[: off[5]].nan_to_num(0.0, 0.0, 0.0), off[:6]
    W, B = W[:5].contiguous(), B[:5].contiguous()
    torch.library.opcheck(OPS.scheme_params_batched.default, (x, off, B, SIDS))
    p = OPS.scheme_params_batched(x, off, B, SIDS)
    for rg in (False, True):
        args = (x.clone().requires_grad_(rg), off, p, W.clone().requires_grad_(rg), B.clone().requires_grad_(rg), SIDS)
        torch.library.opcheck(OPS.mixture_batched.default, args)
    gy = torch.randn_like(x)
    torch.library.opcheck(OPS.mixture_batched_backward.default, (gy, x, off, p, W, B, SIDS, True, True))
    # a single empty row and no rows at all
    e = torch.zeros(0)
    torch.library.opcheck(OPS.scheme_params_batched.default, (e, [0, 0], B[:1], SIDS))
    torch.library.opcheck(OPS.scheme_params_batched.default, (e, [0], B[:0], SIDS))


def test_batched_compiles_fullgraph():
    xs, W = _inputs(torch.float32, shapes=[(8, 3, 3, 3), (40,), (6, 50)])

    def f(xs, W):
        return AF.quantize_mixture_batched(xs, W, C8, 3)

    eager = f(xs, W)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(xs, W)
    for a, b in zip(eager, compiled):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_batched_backend_torch_and_loop_fallbacks_agree():
    xs, W = _inputs(torch.float32, shapes=[(8, 3, 3, 3), (40,), (6, 50)])
    a = AF.quantize_mixture_batched(xs, W, C8, 3, backend="torch")
    b = [AF.quantize_mixture(x, W[i], C8, 3, backend="torch") for i, x in enumerate(xs)]
    for u, v in zip(a, b):
        assert torch.equal(u.nan_to_num(), v.nan_to_num())
    with pytest.raises(backends.BackendUnavailableError, match="needs a CUDA tensor"):
        # 'cuda' on a CPU tensor says why; so does 'cpp' on a non-CPU device (not testable here)
        AF.quantize_mixture_batched(xs, W, C8, 3, backend="cuda")


def test_batched_argument_errors():
    xs, W = _inputs(torch.float32, shapes=[(8, 3), (40,)])
    with pytest.raises(TypeError, match="sequence"):
        AF.quantize_mixture_batched(xs[0], W, C8, 3)
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        AF.quantize_mixture_batched([xs[0], torch.arange(4)], W, C8, 3)
    with pytest.raises(ValueError, match=r"xs\[1\].*one dtype"):
        AF.quantize_mixture_batched([xs[0], xs[1].double()], W, C8, 3)
    with pytest.raises(ValueError, match=r"weights must have shape \[2, 8\]"):
        AF.quantize_mixture_batched(xs, W[:, :3], C8, 3)
    with pytest.raises(ValueError, match="3 entries for 2 tensors"):
        AF.quantize_mixture_batched(xs, [W[0]] * 3, C8, 3)
    with pytest.raises(ValueError, match="duplicates"):
        AF.quantize_mixture_batched(xs, W[:, :2], ["clip", "C"], 3)
    with pytest.raises(ValueError, match=r"pot.*2\.\.4"):
        AF.quantize_mixture_batched(xs, W, C8, 6)
    with pytest.raises(ValueError, match="one per tensor"):
        AF.quantize_mixture_batched(xs, W, C8, [torch.tensor(3.0)] * 3)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        AF.quantize_mixture_batched(xs, W, C8, torch.full((3, 8), 3.0))
    with pytest.raises(ValueError, match="finite"):
        AF.quantize_mixture_batched(xs, W, C8, [torch.tensor(3.0), torch.tensor(float("nan"))])
    with pytest.raises(ValueError, match="per_channel"):
        AF.quantize_mixture_batched([torch.tensor(1.0)], W[:1], C8, 3, per_channel=True)
    assert AF.quantize_mixture_batched([], torch.zeros(0, 8), C8, 3) == []


@needs_cpp
def test_batched_op_errors_name_the_problem():
    x, off, W, B = _ragged(torch.float32)
    p = ref.scheme_params_batched_ref(x, off, B, SIDS)
    with pytest.raises(ValueError, match="end at x.numel"):
        OPS.scheme_params_batched(x, off[:-1], B[:-1], SIDS)
    with pytest.raises(ValueError, match="non-decreasing"):
        OPS.scheme_params_batched(x, [0, 50, 40, x.numel()], B[:3], SIDS)
    with pytest.raises(ValueError, match=r"bits must have shape \[9, 8\]"):
        OPS.scheme_params_batched(x, off, B[:, :3], SIDS)
    with pytest.raises(ValueError, match=r"weights must have shape \[9, 8\]"):
        OPS.mixture_batched(x, off, p, W[:4], B, SIDS)
    with pytest.raises(ValueError, match="params must have shape"):
        OPS.mixture_batched(x, off, p[:, :4], W, B, SIDS)
    with pytest.raises(TypeError, match="dtype"):
        OPS.mixture_batched(x.int(), off, p, W, B, SIDS)
    with pytest.raises(ValueError, match="grad_y"):
        OPS.mixture_batched_backward(x[:5], x, off, p, W, B, SIDS, True, True)


def test_batched_does_not_save_k_by_n():
    """Like the per-tensor mixture: the autograd graph keeps x (the flat concatenation), params,
    weights and bits, nothing of size K x N."""
    xs, W = _inputs(torch.float32, shapes=[(64, 3, 3, 3), (4000,)])
    xs = [x.requires_grad_() for x in xs]
    n = sum(x.numel() for x in xs)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = AF.quantize_mixture_batched(xs, W.requires_grad_(), C8, 3)
    torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    assert max(saved) <= n and sum(s for s in saved if s >= n) <= n, saved


@needs_cpp
@pytest.mark.parametrize("group_numel", [1, 600, 20000, 0])
def test_batched_groups_give_the_same_results(group_numel):
    """Groups of consecutive tensors (CPU default 2^20 elements; 1 = one tensor per call; 0 = one
    call for everything) change only how many calls run, not a single bit of the results."""
    xs, W = _inputs(torch.float32, seed=4)
    gys = [sample(x.shape, torch.float32, special=False, seed=70 + i) for i, x in enumerate(xs)]
    B = torch.full((len(xs), 8), 3.0)

    def batched(xs, W, B):
        return AF.quantize_mixture_batched(xs, W, C8, B, group_numel=group_numel)

    def looped(xs, W, B):
        return [AF.quantize_mixture(x, W[i], C8, B[i]) for i, x in enumerate(xs)]

    got, exp = _run(batched, xs, W, B, gys), _run(looped, xs, W, B, gys)
    for a, b in zip(got[0] + got[1] + [got[2], got[3]], exp[0] + exp[1] + [exp[2], exp[3]]):
        assert _equal(a, b)


# ----------------------------------------------------------------------------- CUDA (GPU only)
def _batched_without_bits_grad(device):
    """need_bits_grad=False on the batched statistics: ResQ's α_{b+1} slot is 0 in every row,
    including rows with fewer ResQ bits than the batch's most (whose α_{b+1} the chain computes
    anyway for a longer row), and each row equals the per-tensor kernel's row."""
    x, off, _, B = _ragged(torch.float32)
    x = x.to(device)
    _, nb = check_params_without_bits_grad(
        lambda x_, g: OPS.scheme_params_batched(x_, off, B, SIDS, g), x, B, SIDS,
        ref_fn=lambda g: ref.scheme_params_batched_ref(x, off, B, SIDS, g))
    for r in range(len(off) - 1):
        assert torch.equal(nb[:, r:r + 1], OPS.scheme_params(x[off[r]:off[r + 1]], B[r], SIDS, False, False))


@needs_cpp
def test_batched_params_without_bits_grad():
    _batched_without_bits_grad("cpu")


HAVE_CUDA = torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS and has_kernel("mixture_batched", "CUDA")
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU and autoqnn._C built with CUDA kernels")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_cuda_matches_reference_and_per_tensor_kernels(dtype):
    x, off, W, B = _ragged(dtype)
    x, W = x.cuda(), W.cuda()
    gy = sample(x.shape, dtype, special=False, seed=9).cuda()
    for bits in (B, B.cuda()):  # bits on the host (the API's integer bits) or on the device
        p = OPS.scheme_params_batched(x, off, bits, SIDS)
        pr = ref.scheme_params_batched_ref(x, off, bits, SIDS)
        assert p.device.type == "cuda" and p.shape == pr.shape and p.dtype == pr.dtype
        torch.testing.assert_close(p, pr, rtol=2e-5, atol=1e-7)
        assert torch.equal(p, OPS.scheme_params_batched(x, off, bits, SIDS))  # deterministic
        for r in range(len(off) - 1):  # the same chunks, merged in the same order, as per tensor
            assert torch.equal(p[:, r:r + 1], OPS.scheme_params(x[off[r]:off[r + 1]], B[r], SIDS, False))
        y = OPS.mixture_batched(x, off, pr, W, bits, SIDS)
        yr = ref.mixture_batched_ref(x, off, pr, W, bits, SIDS)
        ok = torch.isclose(y.double(), yr.double(), rtol=1e-5, atol=1e-7, equal_nan=True)
        assert int((~ok).sum()) <= 2
        for r in range(len(off) - 1):
            sl = slice(off[r], off[r + 1])
            exp = OPS.mixture_cuda(x[sl], pr[:, r:r + 1], W[r], B[r], SIDS, False)
            assert torch.equal(y[sl].nan_to_num(), exp.nan_to_num())
        gx, gw, gb = OPS.mixture_batched_backward(gy, x, off, pr, W, bits, SIDS, True, True)
        gxr, gwr, gbr = ref.mixture_batched_backward_ref(gy, x, off, pr, W, bits, SIDS, True, True)
        ok = torch.isclose(gx.double(), gxr.double(), rtol=1e-5, atol=1e-7, equal_nan=True)
        assert int((~ok).sum()) <= 2
        torch.testing.assert_close(gw, gwr, rtol=1e-3, atol=1e-3, equal_nan=True)
        torch.testing.assert_close(gb.cpu(), gbr.cpu(), rtol=1e-3, atol=1e-3)
        again = OPS.mixture_batched_backward(gy, x, off, pr, W, bits, SIDS, True, True)
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(again, (gx, gw, gb)))
        _, gw0, gb0 = OPS.mixture_batched_backward(gy, x, off, pr, W, bits, SIDS, False, False)
        assert not gw0.any() and not gb0.any()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_batched_cuda_api_equals_one_call_per_tensor(per_channel):
    xs, W = _inputs(torch.float32)
    xs, W = [x.cuda() for x in xs], W.cuda()
    B = (torch.tensor([[1.0, 2, 2, 3.4, 2.6, 5.1, 9.0, 3.2]] * len(xs)) + torch.linspace(0, 1.2, len(xs))[:, None]).cuda()
    gys = [sample(x.shape, torch.float32, special=False, seed=50 + i).cuda() for i, x in enumerate(xs)]

    def batched(xs, W, B):
        return AF.quantize_mixture_batched(xs, W, C8, B, per_channel=per_channel)

    def looped(xs, W, B):
        return [AF.quantize_mixture(x, W[i], C8, B[i], per_channel=per_channel, backend="cuda")
                for i, x in enumerate(xs)]

    got, exp = _run(batched, xs, W, B, gys), _run(looped, xs, W, B, gys)
    for a, b in zip(got[0] + got[1], exp[0] + exp[1]):
        assert _equal(a, b)
    # block sums reduced in another order than the per-tensor kernel's grid: close, not equal
    torch.testing.assert_close(got[2], exp[2], rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(got[3], exp[3], rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.cuda
def test_batched_cuda_params_without_bits_grad():
    _batched_without_bits_grad("cuda")


@needs_cuda
@pytest.mark.cuda
def test_batched_cuda_opcheck():
    x, off, W, B = _ragged(torch.float32)
    x, off = x[: off[5]].nan_to_num(0.0, 0.0, 0.0).cuda(), off[:6]
    W, B = W[:5].contiguous().cuda(), B[:5].contiguous().cuda()
    torch.library.opcheck(OPS.scheme_params_batched.default, (x, off, B, SIDS))
    p = OPS.scheme_params_batched(x, off, B, SIDS)
    args = (x.clone().requires_grad_(), off, p, W.clone().requires_grad_(), B.clone().requires_grad_(), SIDS)
    torch.library.opcheck(OPS.mixture_batched.default, args)
    torch.library.opcheck(OPS.mixture_batched_backward.default, (torch.randn_like(x), x, off, p, W, B, SIDS, True, True))


# ----------------------------------------------------------------------------- WeightBatcher
def _qss_model(seed=0, per_channel=False, exclude_first_last=False):
    import autoqnn
    from autoqnn.models import build_model

    torch.manual_seed(seed)
    m = build_model("vgglike", num_classes=10, in_channels=1, image_size=28)
    cfg = autoqnn.SearchConfig(quant=autoqnn.QuantConfig(per_channel_weights=per_channel,
                                                          exclude_first_last=exclude_first_last))
    return autoqnn.prepare(m, cfg, torch.randn(2, 1, 28, 28))


def _train_steps(qm, batcher, steps=3):
    from autoqnn.nn import WeightBatcher

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(6)  # dropout
    b = WeightBatcher(qm) if batcher else None
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    outs = []
    for _ in range(steps):
        x = torch.randn(8, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        out = qm(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        outs.append((out.detach().clone(), {n: p.grad.clone() for n, p in qm.named_parameters() if p.grad is not None}))
        opt.step()
    if b is not None:
        assert b.calls == steps  # one batched call per forward (one group: same candidates and bits)
        b.remove()
    return outs


@needs_cpp
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_weight_batcher_trains_exactly_like_the_per_layer_path(per_channel):
    """Three SGD steps of a QSS model with and without the batcher: the same outputs and the same
    gradients of every weight and θ (bitwise per tensor; per channel, θ's gradient sums its rows
    in another order), the same Gumbel step counters afterwards."""
    a, b = _qss_model(per_channel=per_channel), _qss_model(per_channel=per_channel)
    ra, rb = _train_steps(a, False), _train_steps(b, True)
    for (oa, ga), (ob, gb) in zip(ra, rb):
        if per_channel:
            torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(oa, ob)
        assert ga.keys() == gb.keys() and any(".theta" in n for n in ga)
        for n in ga:
            if per_channel:
                torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(ga[n], gb[n]), n
    sa = {n: int(q.step) for n, q in a.named_modules() if hasattr(q, "step") and isinstance(q.step, torch.Tensor)}
    sb = {n: int(q.step) for n, q in b.named_modules() if hasattr(q, "step") and isinstance(q.step, torch.Tensor)}
    assert sa == sb and max(sa.values()) == 3


@needs_cpp
def test_weight_batcher_leaves_eval_pruned_and_removed_alone():
    from autoqnn.nn import SchemeMixture, WeightBatcher

    qm = _qss_model()
    x = torch.randn(4, 1, 28, 28)
    wqs = [m for n, m in qm.named_modules() if isinstance(m, SchemeMixture) and m.kind == "weight"]
    assert len(wqs) >= 3
    with WeightBatcher(qm) as b:
        qm.eval()
        with torch.no_grad():
            qm(x)
        assert b.calls == 0  # eval: the per-layer argmax path
        qm.train()
        # prune a candidate of one vertex: it leaves the batch, the others still batch
        wqs[0].active[3] = False
        wqs[0]._active = [k for k in range(8) if k != 3]
        qm(x).sum().backward()
        assert b.calls == 1
        assert all(getattr(q, "_batched", None) is None for q in wqs)  # nothing left pending
    qm(x)
    assert b.calls == 1  # removed: no more batched calls


@needs_cpp
def test_weight_batcher_skips_a_vertex_shared_by_two_layers():
    """One SchemeMixture serving two layers sees two weights per forward: it stays on the
    per-layer path (its step counter advances once per call, as without the batcher)."""
    from autoqnn.nn import QLinear, SchemeMixture, WeightBatcher

    shared = SchemeMixture(kind="weight")
    net = torch.nn.Sequential(QLinear(6, 6, weight_quant=shared), QLinear(6, 6, weight_quant=shared),
                              QLinear(6, 6, weight_quant=SchemeMixture(kind="weight")),
                              QLinear(6, 3, weight_quant=SchemeMixture(kind="weight")))
    net.train()
    with WeightBatcher(net) as b:
        net(torch.randn(2, 6)).sum().backward()
        assert b.calls == 1  # the two unshared vertices
    assert int(shared.step) == 2 and int(net[2].weight_quant.step) == 1


@needs_cpp
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_batched_noncontiguous_and_zero_inputs(per_channel):
    """Transposed / sliced tensors, an all-zero and a constant tensor: the same as one call per
    tensor (outputs keep each input's shape; gradients reach the original tensors)."""
    base = sample((12, 40), torch.float32, seed=8)
    xs = [base.t(), base[:, ::3], torch.zeros(6, 5), torch.full((4, 9), 0.3), sample((5, 2, 3), torch.float32)[:, 1]]
    assert not xs[0].is_contiguous() and not xs[1].is_contiguous()
    W = torch.softmax(torch.randn(len(xs), 8, generator=torch.Generator().manual_seed(1)), 1)
    gys = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]

    def batched(xs, W, B):
        return AF.quantize_mixture_batched(xs, W, C8, 4, per_channel=per_channel)

    def looped(xs, W, B):
        return [AF.quantize_mixture(x, W[i], C8, 4, per_channel=per_channel) for i, x in enumerate(xs)]

    got, exp = _run(batched, xs, W, None, gys), _run(looped, xs, W, None, gys)
    for a, b, x in zip(got[0], exp[0], xs):
        assert a.shape == x.shape and _equal(a, b)
    for a, b in zip(got[1], exp[1]):
        assert _equal(a, b)
    assert not got[0][2].any()  # all-zero input quantizes to zeros
    torch.testing.assert_close(got[2], exp[2], rtol=1e-5, atol=1e-6, equal_nan=True)
