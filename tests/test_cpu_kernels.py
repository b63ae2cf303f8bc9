# SPDX-License-Identifier: MIT
"""The C++ CPU kernels against the pure-PyTorch reference, op by op: every scheme, dtype and
awkward shape; bitwise determinism across thread counts; errors raised by the kernels."""
import pytest
import torch

from guard_band import same as _same  # bitwise, NaN where NaN
from kernel_inputs import bits8 as _bits
from kernel_inputs import check_params_without_bits_grad, sample

from autoqnn import _ext
from autoqnn.ops import has_kernel
from autoqnn.ops import reference as ref
from autoqnn.schemes import WEIGHT_CANDIDATES, scheme_info

pytestmark = pytest.mark.skipif(
    not (_ext.HAS_EXT and has_kernel("mixture", "CPU")), reason=f"C++ CPU kernels not built: {_ext.LOAD_ERROR}"
)

OPS = torch.ops.autoqnn
SIDS = list(range(8))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# sizes straddle the kernels' tile (256) and chunk (16384) boundaries
SHAPES = [(1,), (2,), (255,), (257,), (769,), (5125,), (16385,), (16, 3, 3, 3), (3, 7000), (0,), (4, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1,), (769,), (16385,), (3, 7000), (0,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_scheme_params_without_bits_grad(dtype, shape, per_channel):
    """need_bits_grad=False: ResQ's α_{b+1} slot is 0 (its statistics pass is skipped), every
    other slot bit-identical, for ResQ at 2, 3 and 8 bits and alone or with the other schemes."""
    x = sample(shape, dtype)
    for b in (2, 3, 8):
        bits = _bits(b)
        for sids, bb in ((SIDS, bits), ([4], bits[4:5]), ([4, 2], bits[[4, 2]])):
            check_params_without_bits_grad(
                lambda x_, g: OPS.scheme_params(x_, bb, sids, per_channel, g), x, bb, sids,
                ref_fn=lambda g: ref.scheme_params_ref(x, bb, sids, per_channel, g))


def _close_levels(a, b, frac=1e-3):
    a, b = a.double(), b.double()
    ok = torch.isclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True)
    bad = int((~ok).sum())
    assert bad <= max(2, int(frac * a.numel())), f"{bad}/{a.numel()} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_cpu_kernels_match_reference(dtype, shape, per_channel):
    x = sample(shape, dtype)
    gy = sample(shape, dtype, special=False, seed=1)
    w = torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(2)), 0)
    for b in (2, 3, 8):
        bits = _bits(b)
        p_cpp = OPS.scheme_params(x, bits, SIDS, per_channel)
        p_ref = ref.scheme_params_ref(x, bits, SIDS, per_channel)
        assert p_cpp.dtype == p_ref.dtype and p_cpp.shape == p_ref.shape
        torch.testing.assert_close(p_cpp, p_ref, rtol=2e-5, atol=1e-7)
        # the output pass on identical params: levels identical (exact), grads close
        y = OPS.mixture(x, p_ref, w, bits, SIDS, per_channel)
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
        _close_levels(y, ref.mixture_ref(x, p_ref, w, bits, SIDS, per_channel))
        got = OPS.mixture_backward(gy, x, p_ref, w, bits, SIDS, per_channel, True, True)
        exp = ref.mixture_backward_ref(gy, x, p_ref, w, bits, SIDS, per_channel, True, True)
        _close_levels(got[0], exp[0])
        torch.testing.assert_close(got[1], exp[1], rtol=1e-3, atol=1e-3, equal_nan=True)  # NaN x -> NaN q
        torch.testing.assert_close(got[2], exp[2], rtol=1e-3, atol=1e-3)
        for k in SIDS:
            pk, bk = p_ref[k : k + 1], bits[k : k + 1]
            q = OPS.quantize(x, pk, bk, k, per_channel)
            qr = ref.quantize_ref(x, pk, bk, k, per_channel)
            if dtype in (torch.float32, torch.float64):  # same params, same math: bit-identical
                assert torch.equal(q.nan_to_num(), qr.nan_to_num()), scheme_info(k).name
            else:
                _close_levels(q, qr)
            gx, gb = OPS.quantize_backward(gy, x, pk, bk, k, per_channel, True)
            gxr, gbr = ref.quantize_backward_ref(gy, x, pk, bk, k, per_channel, True)
            _close_levels(gx, gxr)
            torch.testing.assert_close(gb, gbr, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_cpu_kernels_deterministic_across_threads(per_channel):
    x = sample((8, 40000), torch.float32)
    gy = sample((8, 40000), torch.float32, special=False, seed=3)
    w = torch.softmax(torch.randn(8), 0)
    bits = _bits(3)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            p = OPS.scheme_params(x, bits, SIDS, per_channel)
            y = OPS.mixture(x, p, w, bits, SIDS, per_channel)
            g = OPS.mixture_backward(gy, x, p, w, bits, SIDS, per_channel, True, True)
            outs.append((p, y) + tuple(g))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_cpu_kernel_errors():
    x = torch.randn(10)
    p = ref.scheme_params_ref(x, _bits(3), SIDS, False)
    with pytest.raises(TypeError, match="Int"):
        OPS.mixture(torch.arange(10, dtype=torch.int32), p, torch.ones(8) / 8, _bits(3), SIDS, False)
    with pytest.raises(ValueError, match="finite"):
        OPS.scheme_params(x, torch.full((8,), float("nan")), SIDS, False)
    with pytest.raises(ValueError, match="params must have shape"):
        OPS.mixture(x, p[:, :, :5], torch.ones(8) / 8, _bits(3), SIDS, False)
    with pytest.raises(ValueError, match="unknown scheme"):
        OPS.quantize(x, p[:1], _bits(3)[:1], 11, False)


def test_learned_bits_are_clipped_by_the_kernel():
    x = torch.randn(1000)
    sid = scheme_info("clip").id
    hi = OPS.scheme_params(x, torch.tensor([9.4]), [sid], False)
    assert torch.equal(hi, OPS.scheme_params(x, torch.tensor([8.0]), [sid], False))
    lo = OPS.scheme_params(x, torch.tensor([1.2]), [sid], False)
    assert torch.equal(lo, OPS.scheme_params(x, torch.tensor([2.0]), [sid], False))
    assert WEIGHT_CANDIDATES[sid] == "clip"


def _layouts(t):
    """``t`` (1-D) as the same values in other layouts and dtypes: a strided view, float64,
    float16 (exact for small integers and these weights' rounding is compared below), and an
    expanded 0-d tensor when every entry is equal."""
    big = torch.zeros(2 * t.numel(), dtype=t.dtype)
    big[::2] = t
    out = {"strided": big[::2], "float64": t.double(), "float16": t.half()}
    if bool((t == t[0]).all()):
        out["expanded"] = t[:1].reshape(()).expand(t.numel())
    return out


def test_bits_and_weights_are_read_in_any_layout_and_dtype():
    """The kernels read bits and mixture weights on the host in place (float32/float64, any
    strides) or after one conversion (other dtypes): the same values, whatever the layout, and
    the weights'/bits' gradients come back in their own dtype and shape."""
    x = sample((769,), torch.float32)
    gy = sample((769,), torch.float32, special=False, seed=1)
    w = torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(2)), 0)
    bits = _bits(3)
    p = OPS.scheme_params(x, bits, SIDS, False)
    y0 = OPS.mixture(x, p, w, bits, SIDS, False)
    gx0, gw0, gb0 = OPS.mixture_backward(gy, x, p, w, bits, SIDS, False, True, True)
    for name, bl in _layouts(bits).items():
        assert _same(OPS.scheme_params(x, bl, SIDS, False), p), name
        assert _same(OPS.mixture(x, p, w, bl, SIDS, False), y0), name
        gx, gw, gb = OPS.mixture_backward(gy, x, p, w, bl, SIDS, False, True, True)
        assert _same(gx, gx0) and _same(gw, gw0), name
        assert gb.dtype == bl.dtype and gb.shape == bl.shape, name
        if bl.dtype == torch.float16:
            torch.testing.assert_close(gb, gb0.half(), rtol=1e-3, atol=0)
        else:  # summed in float64, rounded once to the bits' dtype
            assert _same(gb.float(), gb0), name
    for name, wl in _layouts(w).items():
        wv = wl.to(torch.float32)  # the kernels use the weights in the compute type (float32)
        assert _same(OPS.mixture(x, p, wl, bits, SIDS, False), OPS.mixture(x, p, wv, bits, SIDS, False)), name
        gx, gw, gb = OPS.mixture_backward(gy, x, p, wl, bits, SIDS, False, True, True)
        _, gwv, gbv = OPS.mixture_backward(gy, x, p, wv.contiguous(), bits, SIDS, False, True, True)
        assert gw.dtype == wl.dtype and gw.shape == wl.shape, name
        assert _same(gw, gwv.to(wl.dtype)) and _same(gb, gbv), name
    # a lazily negated view (torch's neg bit; the dispatcher's Negative fallback resolves it
    # before the kernel, and the kernels' in-place read would not be fooled either)
    neg = torch._neg_view(-bits)
    assert neg.is_neg() and _same(OPS.mixture(x, p, w, neg, SIDS, False), y0)
    # an integer bits tensor is converted (the functional API passes floats; the op accepts it)
    assert _same(OPS.mixture(x, p, w, bits.long(), SIDS, False), y0)
    # a 0-d bits tensor for one scheme, and a [1, 1] one
    sid = scheme_info("clip").id
    p1 = OPS.scheme_params(x, bits[sid:sid + 1], [sid], False)
    y1 = OPS.quantize(x, p1, bits[sid:sid + 1], sid, False)
    for b1 in (bits[sid].reshape(()), bits[sid].reshape(1, 1)):
        assert _same(OPS.quantize(x, p1, b1, sid, False), y1)
        _, gb = OPS.quantize_backward(gy, x, p1, b1, sid, False, True)
        assert gb.shape == b1.shape and gb.dtype == b1.dtype
