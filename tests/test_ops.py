# SPDX-License-Identifier: MIT
"""The op layer: opcheck, torch.compile(fullgraph=True), parity of the custom-op path with the
pure-PyTorch path (values and every gradient), backend selection, nothing K×N saved."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import autoqnn
import autoqnn.functional as AF
from autoqnn import backends
from autoqnn.ops import reference as ref
from autoqnn.schemes import SCHEMES, WEIGHT_CANDIDATES, scheme_info

from conftest import devices

ALL = list(SCHEMES)


def _bits_for(name):
    i = scheme_info(name)
    return sorted({i.min_bits, i.default_bits, i.max_bits})


SHAPES = [(1,), (769,), (5125,), (16, 3, 3, 3), (7, 33)]


def _sample(shape, dtype=torch.float32, device="cpu", noncontig=False):
    x = torch.randn(*shape, dtype=torch.float32, device=device)
    if noncontig and x.dim() >= 2 and x.numel() > 0:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert not x.is_contiguous()
    return x.to(dtype)


# ----------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    g = torch.Generator().manual_seed(1)
    for shape, pc in [((33,), False), ((4, 3, 3), True), ((0,), False), ((1,), False)]:
        x = torch.randn(*shape, generator=g).to(device)
        yield x, pc


@pytest.mark.parametrize("device", devices())
def test_opcheck_all_ops(device):
    ops = torch.ops.autoqnn
    for x, pc in _opcheck_samples(device):
        sids = [scheme_info(s).id for s in WEIGHT_CANDIDATES]
        bits = torch.tensor([1, 2, 2, 3, 3, 3, 3, 3], dtype=torch.float32)
        torch.library.opcheck(ops.tensor_stats.default, (x, pc))
        torch.library.opcheck(ops.scheme_params.default, (x, bits, sids, pc))
        params = ops.scheme_params(x, bits, sids, pc)
        w = torch.softmax(torch.randn(8), 0).to(device)
        for rg in (False, True):
            xr = x.clone().requires_grad_(rg)
            wr = w.clone().requires_grad_(rg)
            br = bits.clone().requires_grad_(rg)
            torch.library.opcheck(ops.mixture.default, (xr, params, wr, br, sids, pc))
            for k, sid in enumerate(sids):
                torch.library.opcheck(
                    ops.quantize.default, (xr, params[k : k + 1], br[k : k + 1].detach().requires_grad_(rg), sid, pc)
                )
        gy = torch.randn_like(x)
        torch.library.opcheck(ops.mixture_backward.default, (gy, x, params, w, bits, sids, pc, True, True))
        torch.library.opcheck(ops.quantize_backward.default, (gy, x, params[6:7], bits[6:7], sids[6], pc, True))


# ----------------------------------------------------------------------------- parity ops vs torch
def assert_levels_close(a, b, rtol=1e-5, atol=1e-6, frac=1e-3):
    """Equal up to tolerance except a bounded number of elements on a neighbouring level: kernels
    accumulate statistics in another order (C++: double), so a scale can differ in the last ulp
    and an element sitting on a rounding tie may move by one level. Ties are rare; count them."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    ok = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    bad = int((~ok).sum())
    allowed = max(2, int(frac * a.numel()))
    assert bad <= allowed, f"{bad} of {a.numel()} elements differ (allowed {allowed}); max diff {(a - b).abs()[~ok].max()}"


def _grads(fn, x, extra):
    y = fn()
    gen = torch.Generator().manual_seed(123)
    g = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    inputs = [x] + [t for t in extra if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, inputs, g, allow_unused=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scheme", ALL)
def test_quantize_ops_match_torch_path(device, shape, scheme):
    for b in _bits_for(scheme):
        for pc in (False, True):
            x = _sample(shape, device=device, noncontig=len(shape) > 1).requires_grad_()
            bt = torch.tensor(float(b), requires_grad=True)
            y1, g1 = _grads(lambda: AF.quantize(x, scheme, bt, per_channel=pc), x, [bt])
            y2, g2 = _grads(lambda: AF.quantize(x, scheme, bt, per_channel=pc, backend="torch"), x, [bt])
            assert_levels_close(y1, y2)
            assert_levels_close(g1[0], g2[0])
            torch.testing.assert_close(g1[1], g2[1], rtol=1e-3, atol=1e-3 * (1 + g2[1].abs().item()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(0,), (3, 0)], ids=lambda s: "x".join(map(str, s)))
def test_mixture_ops_match_torch_path(device, dtype, shape):
    for cands, pc in [(WEIGHT_CANDIDATES, False), (autoqnn.ACTIVATION_CANDIDATES, False), (WEIGHT_CANDIDATES, True)]:
        K = len(cands)
        x = _sample(shape, dtype, device, noncontig=len(shape) > 1).requires_grad_()
        w = torch.softmax(torch.randn(K, device=device), 0).requires_grad_()
        bt = torch.full((K,), 3.0, requires_grad=True)
        y1, g1 = _grads(lambda: AF.quantize_mixture(x, w, cands, bt, per_channel=pc), x, [w, bt])
        y2, g2 = _grads(lambda: AF.quantize_mixture(x, w, cands, bt, per_channel=pc, backend="torch"), x, [w, bt])
        assert y1.dtype == dtype and y1.shape == x.shape
        tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
        assert_levels_close(y1, y2, **tol)
        assert_levels_close(g1[0], g2[0], **tol)
        scale = 1 + x.detach().float().nan_to_num().abs().sum().item() * 1e-3
        torch.testing.assert_close(g1[1], g2[1], rtol=1e-3, atol=1e-3 * scale)
        torch.testing.assert_close(g1[2], g2[2], rtol=1e-3, atol=1e-3 * scale)


def test_quantize_equals_mixture_with_one_hot():
    x = torch.randn(500)
    for s in ALL:
        w = torch.zeros(8)
        w[scheme_info(s).id] = 1.0
        torch.testing.assert_close(
            AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3), AF.quantize(x, s, 3 if scheme_info(s).multi_bit else None)
        )


# ----------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_ops_path_with_learned_bits():
    torch._dynamo.reset()
    x = torch.randn(64, 3, 3, 3, requires_grad=True)
    theta = torch.zeros(8, requires_grad=True)
    bits = torch.tensor(3.0, requires_grad=True)

    def f(x, theta, bits):
        w = torch.softmax(theta, 0)
        y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, bits, per_channel=True)
        z = AF.quantize(x, "pot", bits)
        return (y * y).sum() + z.sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    l1 = cf(x, theta, bits)
    g1 = torch.autograd.grad(l1, [x, theta, bits])
    l2 = f(x, theta, bits)
    g2 = torch.autograd.grad(l2, [x, theta, bits])
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_inductor_ops_and_reference():
    torch._dynamo.reset()
    x = torch.randn(1000, requires_grad=True)
    w = torch.softmax(torch.randn(5), 0).requires_grad_()

    def f_ops(x, w):
        return AF.quantize_mixture(x, w, autoqnn.ACTIVATION_CANDIDATES, 3)

    def f_ref(x, w):
        return AF.quantize_mixture(x, w, autoqnn.ACTIVATION_CANDIDATES, 3, backend="torch")

    for f in (f_ops, f_ref):
        cf = torch.compile(f, fullgraph=True)
        y1 = cf(x, w)
        y2 = f(x, w)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        g1 = torch.autograd.grad(y1.sum(), [x, w])
        g2 = torch.autograd.grad(y2.sum(), [x, w])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _frexp_inputs(dtype):
    """Every float16/bfloat16 value; for float32/float64 the special values, the subnormal and
    normal boundaries, powers of two with their neighbours and random bit patterns."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    fi = torch.finfo(dtype)
    ib = torch.int64 if dtype == torch.float64 else torch.int32
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(torch.iinfo(ib).min, torch.iinfo(ib).max, (200_000,), generator=g, dtype=torch.int64)
    lo, hi = (-1074, 1024) if dtype == torch.float64 else (-149, 128)
    pw = torch.tensor([2.0**e for e in range(lo, hi)], dtype=torch.float64).to(dtype)
    pw = pw[pw != 0]
    base = torch.cat([pw, torch.nextafter(pw, torch.zeros_like(pw)), torch.nextafter(pw, torch.full_like(pw, fi.max)),
                      torch.tensor([0.0, fi.tiny, fi.smallest_normal, fi.max, fi.eps, 0.70710677, 0.7071067811865476,
                                    float("inf"), float("nan")], dtype=dtype),
                      rand.to(ib).view(dtype)])
    return torch.cat([base, -base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_frexp_from_bits_equals_torch_frexp(dtype):
    # the traced frexp of the reference (autoqnn.ops.reference.frexp) computes it from the bits
    a = _frexp_inputs(dtype)
    f0, e0 = torch.frexp(a)
    f1, e1 = ref._frexp_bits(a)
    assert f1.dtype == f0.dtype and e1.dtype == e0.dtype == torch.int32
    finite = torch.isfinite(a)
    assert torch.equal(e1[finite], e0[finite])
    assert torch.equal(f1[finite], f0[finite])
    assert torch.equal(torch.signbit(f1[finite]), torch.signbit(f0[finite]))  # -0.0 stays -0.0
    # frexp(±Inf), frexp(NaN): (a, 0)
    assert torch.equal(e1[~finite], torch.zeros_like(e1[~finite]))
    assert torch.equal(f1[~finite].isnan(), a[~finite].isnan())
    assert torch.equal(f1[torch.isinf(a)], a[torch.isinf(a)])


def test_frexp_traced_by_inductor_equals_eager():
    torch._dynamo.reset()
    a = _frexp_inputs(torch.float32)[:5000]
    f, e = torch.compile(ref.frexp, fullgraph=True)(a)
    f0, e0 = torch.frexp(a)
    fin = torch.isfinite(a)
    assert torch.equal(f[fin], f0[fin]) and torch.equal(e[fin], e0[fin])


@pytest.mark.parametrize("cands", ["weight", "activation"])
def test_inductor_compiles_the_reference_of_every_candidate(cands):
    # every scheme's reference formula under Inductor (PotQ and FixedQ take frexp exponents)
    torch._dynamo.reset()
    schemes = WEIGHT_CANDIDATES if cands == "weight" else autoqnn.ACTIVATION_CANDIDATES
    x = torch.randn(777) * 3
    if cands == "activation":
        x = x.relu()
    w = torch.softmax(torch.randn(len(schemes)), 0)

    def f(x, w):
        return AF.quantize_mixture(x, w, schemes, 4, backend="torch")

    # Inductor sums the statistics in another order: equal up to rounding (a wrong exponent
    # would be a factor of 2)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w), f(x, w), rtol=1e-5, atol=1e-5)


# the eager fast path's autograd nodes: C++ (csrc/autograd.cpp, with the extension) and the
# Python Functions (without it); "registered" is the ops' torch.library formula
EAGER_NODES = (["cpp"] if AF._CPP_MIXTURE is not None else []) + ["python"]


def _use_node(monkeypatch, node):
    if node == "registered":
        monkeypatch.setattr(AF, "_eager_fast", lambda *a: False)
    elif node == "python":
        monkeypatch.setattr(AF, "_CPP_QUANTIZE", None)
        monkeypatch.setattr(AF, "_CPP_MIXTURE", None)


def _node_kind(y):
    name = y.grad_fn.name()
    if "autoqnn::MixtureBackward" in name or "autoqnn::QuantizeBackward" in name:
        return "cpp"
    if type(y.grad_fn).__name__ in ("_MixtureFnBackward", "_QuantizeFnBackward"):
        return "python"
    return "registered"


# ----------------------------------------------------------------------------- memory
def test_mixture_backward_saves_no_KxN_tensor():
    x = torch.randn(4096, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, torch.tensor(3.0, requires_grad=True))
    total = sum(t.numel() for t in saved)
    # x itself (N) plus params/weights/bits (a few dozen numbers); the naive loop keeps 8×N.
    assert total <= x.numel() + 8 * 12 + 16, [tuple(t.shape) for t in saved]
    assert max(t.numel() for t in saved) == x.numel()
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("node", EAGER_NODES + ["registered"])
def test_mixture_backward_saves_no_KxN_tensor_on_every_autograd_path(node, monkeypatch):
    _use_node(monkeypatch, node)
    test_mixture_backward_saves_no_KxN_tensor()


# ----------------------------------------------------------------------------- eager fast path
def _fast_vs_registered(monkeypatch, fn):
    """fn() -> (outputs, leaves): values and gradients through AF's eager fast path (its C++
    node and its Python Function) and through the ops' registered autograd formula must be
    identical, including which gradients are None."""
    res = []
    for node in EAGER_NODES + ["registered"]:
        _use_node(monkeypatch, node)
        torch.manual_seed(5)
        y, leaves = fn()
        assert _node_kind(y) == node, y.grad_fn.name()
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, gy, allow_unused=True)
        res.append((y.detach(), grads))
        monkeypatch.undo()
    y2, g2 = res[-1]
    for y1, g1 in res[:-1]:
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        for a, b in zip(g1, g2):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_eager_fast_path_matches_the_registered_formula(monkeypatch, per_channel):
    def mixture():
        x = torch.randn(6, 5, 3, requires_grad=True)
        w = torch.softmax(torch.randn(8), 0).requires_grad_()
        b = torch.tensor(3.4, requires_grad=True)
        return AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, per_channel=per_channel), [x, w, b]

    def mixture_fixed_bits():
        x = torch.randn(6, 40, requires_grad=True)
        w = torch.softmax(torch.randn(5), 0).requires_grad_()
        return AF.quantize_mixture(x, w, AF.ACTIVATION_CANDIDATES, 4, per_channel=per_channel), [x, w]

    def single():
        x = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(2.6, dtype=torch.float64, requires_grad=True)
        return AF.quantize(x, "residual", b, per_channel=per_channel), [x, b]

    for fn in (mixture, mixture_fixed_bits, single):
        _fast_vs_registered(monkeypatch, fn)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [64, 5125, 1 << 20])
def test_cuda_auto_fast_path_calls_the_routed_kernel_directly(monkeypatch, n):
    """On a GPU under backend="auto" the fast path's node calls the kernel the router picks
    (functional._node_mode): the same values and gradients as the registered formula (which goes
    through the router op by op) and as that backend named explicitly."""
    torch.manual_seed(0)
    x = torch.randn(n, device="cuda", requires_grad=True)
    w = torch.softmax(torch.randn(8, device="cuda"), 0).requires_grad_()
    b = torch.tensor(3.3, device="cuda", requires_grad=True)
    gy = torch.randn(n, device="cuda")
    mode = AF._node_mode("ops", x, "m")
    calls = {"registered": lambda: AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b)}
    for node in EAGER_NODES:
        calls[node] = calls["registered"]
    if mode != "ops":
        calls["explicit"] = lambda: AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, backend=mode)
    res = {}
    for name, call in calls.items():
        _use_node(monkeypatch, name)
        y = call()
        assert _node_kind(y) == (name if name != "explicit" else EAGER_NODES[0])
        res[name] = (y.detach(), torch.autograd.grad(y, [x, w, b], gy))
        monkeypatch.undo()
    y0, g0 = res["registered"]
    for name, (y1, g1) in res.items():
        torch.testing.assert_close(y1, y0, rtol=0, atol=0, msg=name)
        for a, c in zip(g1, g0):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6, msg=name)


def test_eager_fast_path_steps_aside_for_compile_functorch_and_modes():
    x = torch.randn(50)
    w = torch.softmax(torch.randn(8), 0)
    assert AF._eager_fast(x, w)
    assert not AF._eager_fast(x, torch.nn.Parameter(w).data.as_subclass(_Sub))
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not AF._eager_fast(x, w)
        y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3)  # the registered formula runs
    torch.testing.assert_close(y, AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3), rtol=0, atol=0)
    # inside a torch.func transform the fast path steps aside too (its Function has no functorch rule)
    seen = []

    def f(t):
        seen.append(AF._eager_fast(t))
        return t.sum()

    torch.func.grad(f)(x)
    assert seen == [False]


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("node", EAGER_NODES)
def test_eager_fast_path_is_once_differentiable(monkeypatch, node):
    """A second derivative through a quantizer raises when it is reached (never silently drops
    the quantizer's term), and a create_graph backward itself works: its first-order gradients
    equal the plain backward's."""
    _use_node(monkeypatch, node)
    x = torch.randn(40, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    b = torch.tensor(3.0, requires_grad=True)
    for call in (lambda: AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b),
                 lambda: AF.quantize(x, "clip", b)):
        y = call()
        assert _node_kind(y) == node
        gx, gb = torch.autograd.grad(y.pow(2).sum(), [x, b], create_graph=True)
        rx, rb = torch.autograd.grad(call().pow(2).sum(), [x, b])
        torch.testing.assert_close(gx, rx, rtol=0, atol=0)
        torch.testing.assert_close(gb, rb, rtol=0, atol=0)
        assert gx.requires_grad and gb.requires_grad
        # a sum of a differentiable term and the quantizer's: the error, not a partial result
        with pytest.raises(RuntimeError, match="differentiate twice"):
            (gx.sum() + x.pow(2).sum()).backward()
        with pytest.raises(RuntimeError, match="differentiate twice"):
            gb.backward()
        x.grad = b.grad = None
        # without create_graph, no error node at all
        gx = torch.autograd.grad(call().sum(), x)[0]
        assert not gx.requires_grad


@pytest.mark.parametrize("node", EAGER_NODES)
def test_eager_nodes_keep_autograd_bookkeeping(monkeypatch, node):
    """retain_graph, the freed-graph error, the in-place modification check on saved inputs and
    tensor hooks behave as for any autograd node."""
    _use_node(monkeypatch, node)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    x = torch.randn(100, requires_grad=True)
    y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3)
    assert _node_kind(y) == node
    y.sum().backward(retain_graph=True)
    g1 = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * g1, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    xx = torch.randn(100, requires_grad=True) * 1
    y = AF.quantize(xx, "clip", 3)
    with torch.no_grad():
        xx.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    x.grad = None
    y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3)
    y.register_hook(lambda g: g * 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * g1, rtol=0, atol=0)


@pytest.mark.parametrize("node", EAGER_NODES + ["registered"])
def test_eager_nodes_run_under_compiled_autograd(monkeypatch, node):
    """A graph recorded in eager mode (the fast path's node, or the registered formula)
    back-propagates under compiled autograd too, to the same gradients, learned bits included."""
    ca = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(ca, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    _use_node(monkeypatch, node)
    torch.manual_seed(7)
    x = torch.randn(64, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    b = torch.tensor(3.2, requires_grad=True)
    y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b)
    assert _node_kind(y) == node
    ref_grads = torch.autograd.grad(y.pow(2).sum(), [x, w, b], retain_graph=True)
    torch._dynamo.reset()
    with ca._enable(torch.compile(backend="eager")):
        y.pow(2).sum().backward()
    torch._dynamo.reset()
    for t, g in zip((x, w, b), ref_grads):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


def test_cpp_autograd_node_rejects_an_unknown_mode():
    if AF._CPP_MIXTURE is None:
        pytest.skip("the C++ autograd nodes need the extension")
    x = torch.randn(10, requires_grad=True)
    _, sids, bt, bh, _ = AF._resolve(WEIGHT_CANDIDATES, 3)
    p = AF.scheme_params(x, WEIGHT_CANDIDATES, 3)
    w = torch.full((8,), 0.125)
    with pytest.raises(ValueError, match="mode must be"):
        AF._CPP_MIXTURE(x, p, w, bt, bh, sids, False, 7, 0)
    with pytest.raises(ValueError, match="mode must be"):
        AF._CPP_QUANTIZE(x, p[:1], bt[:1], bh[:1], sids[0], False, -1, 0)
    with pytest.raises(ValueError, match="params_mode must be"):
        AF._CPP_MIXTURE(x, None, w, bt, bh, sids, False, 0, 1)


# ----------------------------------------------------------------------------- backends / env
def test_backend_resolution_messages():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="bogus"):
        AF.quantize(x, "clip", 3, backend="bogus")
    with pytest.raises(autoqnn.BackendUnavailableError, match="cuda"):
        AF.quantize(x, "clip", 3, backend="cuda")
    with pytest.raises(autoqnn.BackendUnavailableError, match="triton"):
        AF.quantize(x, "clip", 3, backend="triton")
    assert backends.kernel_for("mixture", "cpu") in ("cpp", "reference")


def test_backend_env_default(monkeypatch):
    monkeypatch.setenv("AUTOQNN_BACKEND", "torch")
    assert backends.default_backend() == "torch"
    monkeypatch.setenv("AUTOQNN_BACKEND", "nope")
    with pytest.raises(ValueError, match="AUTOQNN_BACKEND"):
        AF.quantize(torch.randn(4), "clip", 3)


def test_cpp_backend_is_honest():
    x = torch.randn(100)
    from autoqnn import _ext

    if not _ext.HAS_EXT:
        with pytest.raises(autoqnn.BackendUnavailableError):
            AF.quantize(x, "clip", 3, backend="cpp")
        return
    missing = [o for o in ("scheme_params", "quantize", "quantize_backward") if not autoqnn.ops.has_kernel(o, "CPU")]
    if missing:
        with pytest.raises(autoqnn.BackendUnavailableError, match=missing[0]):
            AF.quantize(x, "clip", 3, backend="cpp")
    else:
        torch.testing.assert_close(AF.quantize(x, "clip", 3, backend="cpp"), AF.quantize(x, "clip", 3, backend="torch"))


def test_env_report_runs():
    env = dict(os.environ, AUTOQNN_TRITON_LEVELS="auto")
    env.pop("AUTOQNN_CUDA_LEVELS", None)
    out = subprocess.run([sys.executable, "-m", "autoqnn.env"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "AUTOQNN_CUDA_LEVELS=0, AUTOQNN_TRITON_LEVELS=auto" in out.stdout  # the levels-pass switches
    for op in autoqnn.ops.OPS:
        assert op in out.stdout
    assert "torch" in out.stdout and "autoqnn._C" in out.stdout
    node = "C++ nodes" if AF._CPP_MIXTURE is not None else "Python autograd.Functions"
    assert f"eager quantizer calls record {node}" in out.stdout


def test_reference_params_shape_and_dtype():
    x = torch.randn(5, 7, dtype=torch.float64)
    p = AF.scheme_params(x, WEIGHT_CANDIDATES, 3, per_channel=True)
    assert p.shape == (8, 5, ref.NUM_PARAMS if hasattr(ref, "NUM_PARAMS") else 12) and p.dtype == torch.float64
    s = AF.tensor_stats(x.float())
    assert s.shape == (1, 7)
    torch.testing.assert_close(s[0, 0], torch.tensor(35.0))


@pytest.mark.parametrize("node", EAGER_NODES)
def test_statistics_skip_alpha_b1_only_without_a_bits_gradient(monkeypatch, node):
    """The functional API asks scheme_params for ResQ's α_{b+1} (one more statistics pass) only
    when the bits receive a gradient; the bits gradient it then gives is the reference's. (The
    Python path's calls are spied on; the C++ entry's through the profiler's recorded inputs.)"""
    _use_node(monkeypatch, node)
    seen = []
    if node == "python":
        orig = AF._params_op

        def spy(mode):
            op = orig(mode)

            def call(*args):
                seen.append(args[4])
                return op(*args)

            return call

        monkeypatch.setattr(AF, "_params_op", spy)
        record = contextlib.nullcontext
    else:
        from torch.profiler import profile

        @contextlib.contextmanager
        def record():
            with profile(record_shapes=True) as prof:
                yield
            for e in prof.events():
                if e.name == "autoqnn::scheme_params":
                    inputs = getattr(e, "concrete_inputs", None)
                    if not inputs or len(inputs) < 5 or not isinstance(inputs[4], bool):
                        pytest.skip("this torch's profiler does not record the op's bool inputs")
                    seen.append(inputs[4])
    x = torch.randn(3000, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    with record():
        AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3)  # integer bits
        AF.quantize(x, "residual", 3)
    assert seen == [False, False]
    bits = torch.tensor(3.0, requires_grad=True)
    seen.clear()
    with record():
        y = AF.quantize(x, "residual", bits)
        with torch.no_grad():
            AF.quantize(x, "residual", bits)
    assert seen == [True, False]
    gy = torch.randn(3000)
    (gb,) = torch.autograd.grad(y, [bits], gy)
    y_ref = AF.quantize(x, "residual", bits, backend="torch")
    (gb_ref,) = torch.autograd.grad(y_ref, [bits], gy)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-5)
    assert float(gb) != 0.0


@pytest.mark.parametrize("node", EAGER_NODES)
def test_eager_fast_path_without_grad_records_no_node(monkeypatch, node):
    """Under no_grad, inference_mode, or when no input requires grad, the fast path calls the op
    alone: the same values as with autograd recording, and no graph node."""
    _use_node(monkeypatch, node)
    torch.manual_seed(6)
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    b = torch.tensor(3.0, requires_grad=True)
    for fn in (lambda x_, w_, b_: AF.quantize_mixture(x_, w_, WEIGHT_CANDIDATES, b_, per_channel=True),
               lambda x_, w_, b_: AF.quantize(x_, "zoom", b_)):
        y = fn(x, w, b)
        assert y.grad_fn is not None
        with torch.no_grad():
            y0 = fn(x, w, b)
        y1 = fn(x.detach(), w.detach(), b.detach())
        with torch.inference_mode():  # inference tensors skip the Autograd keys altogether
            xi, wi, bi = x.detach().clone(), w.detach().clone(), b.detach().clone()
            y2 = fn(xi, wi, bi)
            y3 = fn(x, w, b)
        assert y2.is_inference()
        for z in (y0, y1, y2, y3):
            assert z.grad_fn is None and not z.requires_grad
            torch.testing.assert_close(z, y.detach(), rtol=0, atol=0, equal_nan=True)
        # one input requiring grad is enough to record the node
        assert _node_kind(fn(x.detach(), w.detach(), b)) == node
