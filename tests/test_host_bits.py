# SPDX-License-Identifier: MIT
"""Learned bits are read on the host once per call, or once per training step inside
``bits_on_host`` (functional.py, "learned bits"): on a GPU each read of a device tensor
synchronises the stream. On the CPU the bits need no copy, so the CPU tests pretend they do
(``_on_host`` patched to say no) and count the reads; the CUDA test checks the real thing with
torch's sync debug mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoqnn.functional as AF
import autoqnn.nn as qnn
from autoqnn import _ext
from autoqnn.functional import WEIGHT_CANDIDATES
from autoqnn.nn import QLinear, Quantizer
from autoqnn.ops import _schema
from autoqnn.pipeline import precision_loss

# torch.ops.autoqnn.* default to the C++ kernels where built, else the reference
BACKENDS = ["torch", "auto"] + (["cpp"] if _ext.HAS_EXT else [])


@pytest.fixture
def reads(monkeypatch):
    """Pretend CPU bits live on a device; count the host reads of bits."""
    n = []
    real = AF._read_bits_host
    monkeypatch.setattr(AF, "_on_host", lambda t: False)
    monkeypatch.setattr(AF, "_read_bits_host", lambda b: n.append(1) or real(b))
    return n


def _calls(backend):
    return (
        lambda x, w, b: AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, per_channel=True, backend=backend),
        lambda x, w, b: AF.quantize(x, "residual", b, backend=backend),
        lambda x, w, b: AF.quantize(x, "pot", b, backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_read_per_call_and_none_inside_bits_on_host(reads, backend):
    torch.manual_seed(0)
    x = torch.randn(6, 41, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    b = torch.tensor(3.4, requires_grad=True)
    gy = torch.randn(6, 41)
    for fn in _calls(backend):
        del reads[:]
        y = fn(x, w, b)
        g = torch.autograd.grad(y, [x, b], gy)
        assert len(reads) == 1  # check, statistics, forward and backward share one copy
        with AF.bits_on_host(b, w) as n:
            assert n == 2
            del reads[:]
            y2 = fn(x, w, b)
            g2 = torch.autograd.grad(y2, [x, b], gy)
            assert reads == []
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        for a, c in zip(g2, g):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
        assert float(g2[1]) != 0.0
        del reads[:]
        fn(x, w, b)
        assert len(reads) == 1  # the block's copies are gone after it


def test_ops_get_the_host_copy_not_the_learned_tensor(reads, monkeypatch):
    """Every op call of a training step (statistics, forward, backward) receives the host copy
    (detached) rather than the learned tensor, which would cost the op its own read. (The
    Python autograd Functions' op calls, spied on; the C++ nodes' calls are not visible from
    Python: the next test checks them by their values.)"""
    monkeypatch.setattr(AF, "_CPP_QUANTIZE", None)
    monkeypatch.setattr(AF, "_CPP_MIXTURE", None)
    seen = []
    real_pair, real_params = AF._op_pair, AF._params_op

    def spy(op, i):
        def call(*args):
            seen.append(args[i])
            return op(*args)
        return call

    monkeypatch.setattr(AF, "_op_pair", lambda kind, mode: tuple(
        spy(op, 3 if kind == "m" else 2) if j == 0 else spy(op, 4 if kind == "m" else 3)
        for j, op in enumerate(real_pair(kind, mode))))
    monkeypatch.setattr(AF, "_params_op", lambda mode: spy(real_params(mode), 1))
    x = torch.randn(64, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    b = torch.tensor(3.0, requires_grad=True)
    AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b).sum().backward()
    AF.quantize(x, "zoom", b).sum().backward()
    assert len(seen) == 6 and b.grad is not None
    assert all(t is not b and not t.requires_grad for t in seen)


def _node_kind(y):
    """Which eager autograd node made ``y``: the C++ one, the Python Function, or another."""
    if "autoqnn::" in y.grad_fn.name():
        return "cpp"
    return "python" if type(y.grad_fn).__name__ in ("_MixtureFnBackward", "_QuantizeFnBackward") else "other"


@pytest.mark.parametrize("node", ["cpp", "python"])
def test_forward_and_backward_ops_compute_with_the_host_copy(monkeypatch, node):
    """The ops of both autograd nodes (C++ and Python) read the host copy, forward and
    backward: a host copy that says 4 bits while the learned tensor holds 3.0 gives exactly
    the 4-bit values and gradients (for x and the mixture weights), with the gradient in the
    learned tensor."""
    if node == "cpp" and AF._CPP_MIXTURE is None:
        pytest.skip("the C++ autograd nodes need the extension")
    if node == "python":
        monkeypatch.setattr(AF, "_CPP_QUANTIZE", None)
        monkeypatch.setattr(AF, "_CPP_MIXTURE", None)
    monkeypatch.setattr(AF, "_on_host", lambda t: False)
    monkeypatch.setattr(AF, "_read_bits_host", lambda b: b.detach().to("cpu") + 1)
    torch.manual_seed(3)
    x = torch.randn(300, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    gy = torch.randn(300)
    for call in (lambda b: AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b),
                 lambda b: AF.quantize(x, "zoom", b)):
        b = torch.tensor(3.0, requires_grad=True)
        y = call(b)
        assert _node_kind(y) == node
        g = torch.autograd.grad(y, [x, w, b], gy, allow_unused=True)
        y4 = call(4)
        g4 = torch.autograd.grad(y4, [x, w], gy, allow_unused=True)
        torch.testing.assert_close(y, y4, rtol=0, atol=0)
        assert not torch.equal(y, call(3))  # the test can tell 3 from 4 bits
        torch.testing.assert_close(g[0], g4[0], rtol=0, atol=0)
        assert (g[1] is None) == (g4[1] is None)
        if g4[1] is not None:
            torch.testing.assert_close(g[1], g4[1], rtol=0, atol=0)
        assert g[2] is not None and g[2].shape == b.shape


def test_host_copy_gives_the_same_values_and_gradients_as_the_device_tensor(reads):
    """The ops see the host copy, the gradient reaches the original tensor (in its dtype and
    shape, for 0-d, [K] and float64 bits), equal to the reference's."""
    torch.manual_seed(1)
    x = torch.randn(300, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    for b in (torch.tensor(4.2, requires_grad=True),
              torch.tensor([3.0, 2.0, 2.0, 4.0, 3.0, 5.0, 3.6, 2.0], requires_grad=True),
              torch.tensor(3.0, dtype=torch.float64, requires_grad=True)):
        gy = torch.randn(300)
        y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b)
        gx, gw, gb = torch.autograd.grad(y, [x, w, b], gy)
        yr = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, backend="torch")
        rx, rw, rb = torch.autograd.grad(yr, [x, w, b], gy)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-5)
        assert gb.dtype == b.dtype and gb.shape == b.shape


def test_bits_changed_inside_the_block_are_read_again(reads):
    torch.manual_seed(2)
    x = torch.randn(500)
    b = torch.tensor(3.0, requires_grad=True)
    with AF.bits_on_host(b):
        y3 = AF.quantize(x, "clip", b)
        assert reads == []
        with torch.no_grad():
            b.fill_(5.0)  # in place: the version counter moves, the copy is stale
        y5 = AF.quantize(x, "clip", b)
        assert len(reads) == 1
    torch.testing.assert_close(y3, AF.quantize(x, "clip", 3))
    torch.testing.assert_close(y5, AF.quantize(x, "clip", 5))
    assert len(torch.unique(y5)) > len(torch.unique(y3))


def test_bits_on_host_nests_and_rejects_non_tensors(reads):
    a = torch.tensor(3.0, requires_grad=True)
    c = torch.tensor(4.0, requires_grad=True)
    x = torch.randn(100)
    with AF.bits_on_host(a):
        with AF.bits_on_host(c):
            AF.quantize(x, "clip", a)
            AF.quantize(x, "clip", c)
            assert reads == []
        AF.quantize(x, "clip", a)
        assert reads == []
        AF.quantize(x, "clip", c)  # the inner block's copy ended with it
        assert len(reads) == 1
    with AF.bits_on_host(torch.empty((), device="meta"), torch.tensor(2.0).requires_grad_()) as n:
        assert n == 1  # the CPU one (treated as a device tensor here); meta has nothing to copy
    with pytest.raises(TypeError, match="argument 1 is a float"):
        with AF.bits_on_host(a, 3.0):
            pass


def test_non_finite_learned_bits_still_raise_from_the_host_copy(reads):
    b = torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(ValueError, match="must be finite"):
        AF.quantize(torch.randn(10), "clip", b)
    with AF.bits_on_host(b):
        with pytest.raises(ValueError, match="must be finite"):
            AF.quantize_mixture(torch.randn(10), torch.full((8,), 0.125), WEIGHT_CANDIDATES, b)
    assert len(reads) == 1


class _QPLNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = QLinear(12, 16, weight_quant=Quantizer("pot", 3, learn_bits=True),
                           act_quant=Quantizer("clip", 4, kind="activation", learn_bits=True))
        self.fc2 = QLinear(16, 5, weight_quant=Quantizer("residual", 3, learn_bits=True),
                           act_quant=Quantizer("fixed", 4, kind="activation", learn_bits=True))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_model_step_inside_nn_bits_on_host_reads_no_bits(reads):
    """A QPL training step of a model inside autoqnn.nn.bits_on_host: no per-quantizer read (the
    activation quantizers' and the precision loss's integer bits included), the same loss and
    gradients as outside."""
    torch.manual_seed(3)
    m = _QPLNet()
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))

    def step():
        m.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss = loss + precision_loss(m, 2.0, 2.0, 1.0, 1.0)  # reads every quantizer's integer bits
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    m(x)  # the precision loss needs each quantizer's element count
    del reads[:]
    l0, g0 = step()
    assert len(reads) >= 4  # at least one per quantizer
    del reads[:]
    with qnn.bits_on_host(m) as n:
        assert n == 4
        l1, g1 = step()
    assert reads == []
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert len(g1) == len(g0)
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert all(float(q.bits.grad) != 0 for _, q in qnn.quantizers(m))


def test_backward_ops_return_grad_bits_on_x_device():
    """The ops' contract (autoqnn/ops/_schema.py): a requested grad_bits on x's device, in bits'
    dtype and shape. Checked through the fake kernels with x on 'meta' and bits on the CPU."""
    x = torch.empty(10, device="meta")
    b = torch.tensor([3.0, 3.0], dtype=torch.float64)
    params = torch.empty(2, 1, 12, device="meta")
    gx, gw, gb = _schema._mixture_backward_fake(x, x, params, torch.empty(2, device="meta"), b, [3, 4], False,
                                                True, True)
    assert gb.device.type == "meta" and gb.dtype == b.dtype and gb.shape == b.shape
    gx, gb = _schema._quantize_backward_fake(x, x, params[:1], b[:1], 3, False, True)
    assert gb.device.type == "meta" and gb.shape == (1,)
    gx, gw, gb = _schema._mixture_batched_backward_fake(x, x, [0, 10], params[:, :1], torch.empty(1, 2, device="meta"),
                                                        b.reshape(1, 2), [3, 4], True, True)
    assert gb.device.type == "meta" and gb.shape == (1, 2)
    # not asked for: zeros where the bits live (no device work for host-side integer bits)
    assert _schema._quantize_backward_fake(x, x, params[:1], b[:1], 3, False, False)[1].device.type == "cpu"
    assert _schema._mixture_backward_fake(x, x, params, torch.empty(2, device="meta"), b, [3, 4], False,
                                          True, False)[2].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_cuda_learned_bits_step_inside_bits_on_host_does_not_sync(backend):
    """On a GPU: forward and backward with learned CUDA bits inside bits_on_host, with the
    statistics given (the params argument), under torch's sync debug mode set to error."""
    from autoqnn import backends

    x = torch.randn(4096, device="cuda", requires_grad=True)
    w = torch.softmax(torch.randn(8, device="cuda"), 0).requires_grad_()
    b = torch.tensor(3.3, device="cuda", requires_grad=True)
    try:
        params = AF.scheme_params(x.detach(), WEIGHT_CANDIDATES, 3, backend=backend if backend != "cuda" else None)
        AF.quantize_mixture(x.detach(), w.detach(), WEIGHT_CANDIDATES, 3, backend=backend, params=params)
    except backends.BackendUnavailableError as e:
        pytest.skip(str(e))
    y_ref = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, backend=backend, params=params)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, w, b])
    torch.cuda.synchronize()
    with AF.bits_on_host(b):
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, backend=backend, params=params)
            g = torch.autograd.grad(y.square().sum(), [x, w, b])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert g[2].device == b.device
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c)


# ----------------------------------------------------------------------------- bits_host=
def _bits_host_calls(backend):
    return (
        lambda x, w, b, h: AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, b, per_channel=True, backend=backend,
                                               bits_host=h),
        lambda x, w, b, h: AF.quantize(x, "residual", b, backend=backend, bits_host=h),
    )


# traced with every backend but "torch", whose formulation reads learned bits as Python ints (a
# graph break; README's torch.compile section)
_TRACED = [b for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend,compiled", [(b, False) for b in BACKENDS] + [(b, True) for b in _TRACED],
                         ids=[f"eager-{b}" for b in BACKENDS] + [f"compiled-{b}" for b in _TRACED])
def test_bits_host_argument_reads_no_bits_and_matches(reads, backend, compiled):
    """quantize/quantize_mixture(bits_host=): the kernels read the given host copy (no read of
    the learned tensor, also inside torch.compile, where the graph takes the copy as an input),
    with the same values and gradients as without it."""
    torch.manual_seed(0)
    x = torch.randn(6, 41, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_()
    b = torch.tensor(3.4, requires_grad=True)
    h = torch.tensor(3.0)  # clip(round(3.4)): the same integer bits
    gy = torch.randn(6, 41)
    for fn in _bits_host_calls(backend):
        y0 = fn(x, w, b, None)
        g0 = torch.autograd.grad(y0, [x, w, b], gy, allow_unused=True)
        f = torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn
        del reads[:]
        y = f(x, w, b, h)
        g = torch.autograd.grad(y, [x, w, b], gy, allow_unused=True)
        assert reads == []
        torch.testing.assert_close(y, y0, rtol=0, atol=0)
        for a, c in zip(g, g0):
            if c is None:
                assert a is None
            else:
                torch.testing.assert_close(a, c, rtol=0, atol=0)
        # the copy is what the kernels use: stale values quantize with those bits
        y5 = f(x, w, b, torch.tensor(5.0))
        torch.testing.assert_close(y5, fn(x, w, torch.tensor(5.0), None), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_bits_host_in_any_dtype_gives_the_same_gradient(dtype):
    """A host copy in another dtype (integers are exact in each) quantizes alike and leaves the
    bitwidth gradient in the learned bits' precision."""
    torch.manual_seed(0)
    x = torch.randn(50, requires_grad=True)
    b = torch.tensor(3.2, requires_grad=True)
    y0 = AF.quantize(x, "clip", b)
    g0 = torch.autograd.grad(y0.square().sum(), [x, b])
    y = AF.quantize(x, "clip", b, bits_host=torch.tensor(3, dtype=dtype))
    g = torch.autograd.grad(y.square().sum(), [x, b])
    assert torch.equal(y, y0)
    assert torch.equal(g[0], g0[0]) and torch.equal(g[1], g0[1])
    assert g[1].dtype == b.dtype


def test_bits_host_argument_is_validated():
    x = torch.randn(10)
    b = torch.tensor(3.0, requires_grad=True)
    with pytest.raises(TypeError, match="learned"):
        AF.quantize(x, "clip", 3, bits_host=torch.tensor(3.0))
    with pytest.raises(TypeError, match="bits_host must be a tensor"):
        AF.quantize(x, "clip", b, bits_host=3.0)
    with pytest.raises(ValueError, match="CPU tensor"):
        AF.quantize(x, "clip", b, bits_host=torch.tensor(3.0, device="meta"))
    with pytest.raises(ValueError, match="shape"):
        AF.quantize(x, "clip", b, bits_host=torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="finite"):
        AF.quantize(x, "clip", b, bits_host=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="shape"):
        AF.quantize_mixture(x, torch.full((2,), 0.5), ["clip", "pot"], torch.tensor([3.0, 3.0]),
                            bits_host=torch.tensor(3.0))
