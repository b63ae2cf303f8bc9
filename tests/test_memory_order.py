# SPDX-License-Identifier: MIT
"""Dense layouts other than the contiguous one (channels-last activations and weights, transposed
and permuted tensors): the ops read x in its memory order without a copy and lay y and grad_x out
like x (``autoqnn.ops.reference.memory_order``), on every backend and path, with the same values
bit for bit as the same elements handed over contiguously in that order. Non-dense inputs and
per-channel layouts whose dim 0 is not outermost keep the contiguous copy and contiguous
outputs. The Triton twins are checked in ``tests/triton_cases.py``, the CUDA kernels in
``tests/test_cuda_kernels.py`` (GPU) and ``tools/cuda_emu/compare.py`` (emulated)."""
import pytest
import torch

import autoqnn.functional as AF
from autoqnn.ops import reference as ref
from autoqnn.schemes import ACTIVATION_CANDIDATES, WEIGHT_CANDIDATES, scheme_info

CL, CL3 = torch.channels_last, torch.channels_last_3d


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _layouts():
    """name -> (x, expected memory order per tensor, expected order per channel)."""
    g = _g()
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "channels_last": (r(6, 5, 4, 3).to(memory_format=CL), [0, 2, 3, 1], [0, 2, 3, 1]),
        "channels_last_3d": (r(4, 3, 2, 5, 3).to(memory_format=CL3), [0, 2, 3, 4, 1], [0, 2, 3, 4, 1]),
        # a linear weight's transpose: per channel, dim 0 is innermost -> the contiguous copy
        "transposed": (r(9, 7).t(), [1, 0], None),
        "permuted": (r(5, 3, 4).permute(2, 0, 1), [1, 2, 0], None),
        "permuted_dim0_outer": (r(5, 3, 4).permute(0, 2, 1), [0, 2, 1], [0, 2, 1]),
        # channels-last with one channel is contiguous as well: nothing to do
        "one_channel": (r(6, 1, 4, 3).to(memory_format=CL), None, None),
        "size1_dims": (r(1, 5, 1, 3).to(memory_format=CL), [0, 2, 3, 1], [0, 2, 3, 1]),
        "sliced": (r(6, 10)[:, ::2], None, None),  # not dense
        "expanded": (r(6, 1).expand(6, 4), None, None),  # overlapping
        "contiguous": (r(6, 5, 4, 3), None, None),
    }


LAYOUT_NAMES = list(_layouts())


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_memory_order_rule(name):
    x, want_pt, want_pc = _layouts()[name]
    assert ref.memory_order(x, False) == want_pt
    assert ref.memory_order(x, True) == want_pc
    for pc, order in ((False, want_pt), (True, want_pc)):
        out = ref.out_like(x, pc)
        assert out.shape == x.shape and out.dtype == x.dtype
        if order is None:
            assert out.is_contiguous()
        else:
            assert ref.in_memory_order(x, order).is_contiguous()
            # the output has x's strides wherever they matter (dims of size > 1)
            assert [s for s, n in zip(out.stride(), x.shape) if n > 1] == [
                s for s, n in zip(x.stride(), x.shape) if n > 1]


def _significant_strides(t):
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def _run(x, w, bits, cands, pc, backend, g):
    """y, grad_x, grad_w, grad_bits of the functional mixture (one scheme: quantize)."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    if len(cands) == 1:
        y = AF.quantize(x, cands[0], bits, per_channel=pc, backend=backend)
        grads = torch.autograd.grad(y, [x, bits], g)
        return y, grads[0], None, grads[1]
    y = AF.quantize_mixture(x, w, cands, bits, per_channel=pc, backend=backend)
    gx, gw, gb = torch.autograd.grad(y, [x, w, bits], g)
    return y, gx, gw, gb


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("cands", [list(WEIGHT_CANDIDATES), list(ACTIVATION_CANDIDATES), ["residual"], ["clip"]],
                         ids=["weight", "activation", "residual", "clip"])
def test_outputs_keep_the_layout_and_equal_the_memory_ordered_call(backend, per_channel, name, cands):
    x, want_pt, want_pc = _layouts()[name]
    order = want_pc if per_channel else want_pt
    K = len(cands)
    w = torch.softmax(torch.randn(K, generator=_g(1)), 0).requires_grad_()
    bits = torch.full((K,) if K > 1 else (), 3.4, requires_grad=True)
    # the incoming gradient laid out like the output, as autograd hands it over
    g = ref.from_memory_order(torch.randn(ref.in_memory_order(x, order).shape, generator=_g(2)), order)
    y, gx, gw, gb = _run(x, w, bits, cands, per_channel, backend, g)
    if order is None:
        # (the torch backend's grad_x is autograd's: its layout is autograd's choice)
        assert y.is_contiguous() and (gx.is_contiguous() or backend == "torch")
        xo, go = x.contiguous(), g.contiguous()
    else:
        assert _significant_strides(y) == _significant_strides(x)
        assert _significant_strides(gx) == _significant_strides(x)
        # the same elements, contiguous in x's memory order: identical sums, identical bits
        xo = ref.in_memory_order(x, order).contiguous()
        go = ref.in_memory_order(g, order).contiguous()
    y2, gx2, gw2, gb2 = _run(xo, w, bits, cands, per_channel, backend, go)
    if backend == "torch":  # torch's reductions of a strided [C, N] view may sum in another order
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    else:
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)  # noqa: E731
    same(ref.in_memory_order(y, order), y2)
    same(ref.in_memory_order(gx, order), gx2)
    if gw is not None:
        same(gw, gw2)
    same(gb, gb2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_and_double_precision_channels_last(dtype):
    x = torch.randn(8, 6, 5, 5, generator=_g(3)).to(dtype).to(memory_format=CL)
    x[1, 2, 3, 4] = float("nan")  # the finite count and the STE masks follow the element
    w = torch.softmax(torch.randn(8, generator=_g(4)), 0)
    y = AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3, backend="cpp")
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    y2 = AF.quantize_mixture(x.permute(0, 2, 3, 1).contiguous(), w, WEIGHT_CANDIDATES, 3, backend="cpp")
    torch.testing.assert_close(y.permute(0, 2, 3, 1), y2, rtol=0, atol=0, equal_nan=True)


def _op_args(x, pc, seed=5):
    sids = [scheme_info(s).id for s in WEIGHT_CANDIDATES]
    bits = torch.tensor([1, 2, 2, 3, 3, 3, 3, 3], dtype=torch.float32)
    params = torch.ops.autoqnn.scheme_params(x, bits, sids, pc)
    w = torch.softmax(torch.randn(8, generator=_g(seed)), 0)
    gy = torch.randn(x.shape, generator=_g(seed + 1)).to(memory_format=torch.preserve_format)
    gy = torch.empty_like(x).copy_(gy)  # laid out like x
    return sids, bits, params, w, gy


@pytest.mark.parametrize("name", ["channels_last", "permuted", "transposed", "sliced", "size1_dims"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_opcheck_and_fake_strides(name, per_channel):
    """The fake kernels give the kernels' output strides (Inductor plans its buffers from them);
    opcheck runs the C++ kernels, the default (reference) kernels through the dispatcher and the
    fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _layouts()[name][0]
    ops = torch.ops.autoqnn
    sids, bits, params, w, gy = _op_args(x, per_channel)
    pq = params[3:4]
    calls = [
        (ops.tensor_stats.default, (x, per_channel)),
        (ops.scheme_params.default, (x, bits, sids, per_channel)),
        (ops.quantize.default, (x, pq, bits[3:4], sids[3], per_channel)),
        (ops.quantize_backward.default, (gy, x, pq, bits[3:4], sids[3], per_channel, True)),
        (ops.mixture.default, (x, params, w, bits, sids, per_channel)),
        (ops.mixture_backward.default, (gy, x, params, w, bits, sids, per_channel, True, True)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)
        real = op(*args)
        with FakeTensorMode() as mode:
            fargs = tuple(mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
                          for a in args)
            fake = op(*fargs)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride(), (op, r.stride(), f.stride())
        # the reference (default) kernel lays its outputs out the same way
        dflt = getattr(ref, op.name().split("::")[1] + "_ref")(*args) if "stats" not in op.name() and \
            "params" not in op.name() else None
        if dflt is not None:
            dflt = dflt if isinstance(dflt, tuple) else (dflt,)
            for r, d in zip(real, dflt):
                assert _significant_strides(r) == _significant_strides(d)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_compiled_fullgraph_keeps_channels_last(per_channel):
    x = torch.randn(8, 6, 5, 5, generator=_g(7)).to(memory_format=CL)
    w = torch.softmax(torch.randn(8, generator=_g(8)), 0).requires_grad_()

    def f(x, w):
        return AF.quantize_mixture(x, w, WEIGHT_CANDIDATES, 3, per_channel=per_channel, backend="cpp")

    xe = x.clone(memory_format=CL).requires_grad_()
    ye = f(xe, w)
    ge = torch.autograd.grad(ye.square().sum(), [xe, w])
    xc = x.clone(memory_format=CL).requires_grad_()
    torch._dynamo.reset()
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(xc, w)
    gc = torch.autograd.grad(yc.square().sum(), [xc, w])
    assert yc.is_contiguous(memory_format=CL) and gc[0].is_contiguous(memory_format=CL)
    assert torch.equal(ye, yc)
    assert torch.equal(ge[0], gc[0]) and torch.allclose(ge[1], gc[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_batched_keeps_layouts_and_equals_per_tensor_calls(per_channel):
    g = _g(9)
    xs = [torch.randn(6, 4, 3, 3, generator=g).to(memory_format=CL),
          torch.randn(5, 7, generator=g),
          torch.randn(4, 2, 3, 3, generator=g).to(memory_format=CL),
          torch.randn(7, 5, generator=g).t()]
    xs = [x.requires_grad_() for x in xs]
    w = torch.softmax(torch.randn(len(xs), 8, generator=g), 1)
    ys = AF.quantize_mixture_batched(xs, w, WEIGHT_CANDIDATES, 3, per_channel=per_channel, group_numel=0)
    for i, (x, y) in enumerate(zip(xs, ys)):
        y1 = AF.quantize_mixture(x, w[i], WEIGHT_CANDIDATES, 3, per_channel=per_channel, backend="cpp")
        assert y.stride() == y1.stride(), i
        assert torch.equal(y, y1), i
    gb = torch.autograd.grad(sum((y * y).sum() for y in ys), xs)
    for i, x in enumerate(xs):
        x1 = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y1 = AF.quantize_mixture(x1, w[i], WEIGHT_CANDIDATES, 3, per_channel=per_channel, backend="cpp")
        (g1,) = torch.autograd.grad((y1 * y1).sum(), [x1])
        assert gb[i].stride() == g1.stride() and torch.equal(gb[i], g1), i


def test_channels_last_model_stays_channels_last():
    """A prepared channels-last conv net: every quantizer's output of a 4-D tensor keeps the
    layout (before, the first quantizer turned the whole network contiguous), and the QSS step's
    loss equals the contiguous model's (the same statistics up to summation order)."""
    from autoqnn.models import build_model
    from autoqnn.nn import quantizers
    from autoqnn.pipeline import SearchConfig, prepare

    torch.manual_seed(0)
    float_model = build_model("vgglike-small")
    x = torch.randn(4, 1, 28, 28)
    model = prepare(float_model, SearchConfig(), x[:2]).to(memory_format=CL)
    seen = []

    def hook(mod, inp, out):
        if out.dim() == 4 and inp[0].shape[1] > 1:
            seen.append((inp[0].is_contiguous(memory_format=CL), out.is_contiguous(memory_format=CL),
                         out.is_contiguous()))

    hs = [q.register_forward_hook(hook) for _, q in quantizers(model)]
    model.train()
    out = model(x.to(memory_format=CL))
    for h in hs:
        h.remove()
    assert seen, "no 4-D quantizer input"
    for inp_cl, out_cl, out_c in seen:
        assert out_cl == inp_cl  # the output keeps the input's layout
    assert any(inp_cl and not out_c for inp_cl, _, out_c in seen)  # channels-last tensors were quantized
    out.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kernels", ["cpp", "reference"])
def test_ops_on_every_layout_equal_the_memory_ordered_call(kernels, dtype):
    """Each per-tensor op on channels-last, permuted, transposed and sliced inputs (the C++ CPU
    kernels, and the reference default kernels called directly) against the same elements handed
    over contiguously in memory order, bit for bit; the CUDA and Triton kernels run the same
    check (tests/test_cuda_kernels.py, tests/triton_cases.py)."""
    from kernel_inputs import check_op_layouts

    if kernels == "cpp":
        def op(name):
            return getattr(torch.ops.autoqnn, name)
    else:
        def op(name):
            return getattr(ref, name + "_ref")
    check_op_layouts(op, "cpu", dtype)
