# SPDX-License-Identifier: MIT
"""Inputs and checks shared by the kernel tests of every family (tests/test_cpu_kernels.py,
tests/test_cuda_kernels.py, tests/test_memory_order.py, tests/triton_cases.py)."""
import torch


def bits8(b):
    """Bits of the 8 weight candidates in id order at bitwidth ``b`` (PotQ capped at 4)."""
    return torch.tensor([1, 2, 2, b, b, b, b, min(b, 4)], dtype=torch.float32)


def sample(shape, dtype, special=True, seed=0):
    """Random values of varied scale; with ``special``, NaN, ±Inf and 0 at fixed positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).add(0.5)
    if special and x.numel() > 20:
        flat = x.view(-1)
        flat[3], flat[5], flat[7], flat[11] = float("nan"), float("inf"), -float("inf"), 0.0
    return x.to(dtype)


def check_params_without_bits_grad(op, x, bits, sids, *lead, ref_fn):
    """``op(x, *lead, bits, sids[, per_channel], need_bits_grad=False)`` against the same call with
    the gradient slot: ResQ's slot b (α_{b+1}, which feeds only the bitwidth gradient) is 0 and
    every other slot is bit-identical; and against the reference ``ref_fn(need_bits_grad)``.
    ``bits`` is ``[K]`` or ``[R, K]`` (batched rows, params ``[K, R, P]``)."""
    full = op(x, True)
    nb = op(x, False)
    assert nb.shape == full.shape and nb.dtype == full.dtype
    b2 = bits.reshape(-1, len(sids)) if bits.dim() == 2 else bits.reshape(1, -1).expand(full.shape[1], -1)
    keep = torch.ones_like(full, dtype=torch.bool)
    for k, s in enumerate(sids):
        if s == 4:  # residual
            for r in range(full.shape[1]):
                b = int(min(max(round(float(b2[r, k])), 2), 8))
                keep[k, r, b] = False
                assert float(nb[k, r, b]) == 0.0, f"row {r}: slot {b} (alpha_(b+1)) not 0"
    assert torch.equal(nb[keep].nan_to_num(), full[keep].nan_to_num())
    exp = ref_fn(False)
    torch.testing.assert_close(nb.cpu(), exp.cpu(), rtol=2e-5, atol=1e-7)
    return full, nb


def layout_cases(device, dtype=torch.float32):
    """(name, x, per_channel) in dense layouts other than the contiguous one, and two that keep
    the contiguous copy (a per-channel layout whose dim 0 is innermost, a non-dense slice); 4-D
    ones with NaN/Inf (the masks and counts must follow the element, not its index)."""
    g = torch.Generator().manual_seed(11)

    def r(*s):
        return (torch.randn(*s, generator=g) * 2).to(dtype)

    cl = r(6, 5, 7, 9)
    cl[1, 2, 3, 4], cl[2, 3, 4, 5] = float("nan"), float("inf")
    cl = cl.to(memory_format=torch.channels_last)
    cases = [("channels_last", cl, False), ("channels_last", cl, True),
             ("channels_last_3d", r(3, 4, 2, 5, 6).to(memory_format=torch.channels_last_3d), True),
             ("permuted", r(40, 3, 11).permute(2, 0, 1), False),
             ("permuted_dim0_outer", r(7, 30, 3).permute(0, 2, 1), True),
             ("transposed_per_channel", r(33, 7).t(), True),
             ("sliced", r(9, 70)[:, ::2], False)]
    return [(n, x.to(device), pc) for n, x, pc in cases]


def check_op_layouts(op, device, dtype=torch.float32, sids=(0, 1, 2, 3, 4, 5, 6, 7), only=None):
    """The per-tensor ops (``op(name)``: tensor_stats, scheme_params, quantize(_backward),
    mixture(_backward)) on :func:`layout_cases`: statistics, y, grad_x and the gradient sums bit
    for bit equal to the same elements handed over contiguously in x's memory order, and y and
    grad_x with the fake kernels' strides (``reference.out_like``: x's for a dense x, contiguous
    otherwise). ``only``: the indices of the layout cases to run (all by default)."""
    from autoqnn.ops import reference as ref

    sids = list(sids)
    K = len(sids)
    bits = bits8(3)[sids] if K == 8 else torch.full((K,), 3.0)
    w = torch.softmax(torch.randn(K, generator=torch.Generator().manual_seed(12)), 0).to(device)

    def same(a, b, what):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), what

    def layout(t, x, pc, what):
        want = ref.out_like(x, pc)
        assert [s for s, n in zip(t.stride(), t.shape) if n > 1] == \
            [s for s, n in zip(want.stride(), want.shape) if n > 1], (what, t.stride(), want.stride())

    cases = layout_cases(device, dtype)
    for name, x, pc in (cases if only is None else [cases[i] for i in only]):
        order = ref.memory_order(x, pc)
        xo = ref.in_memory_order(x, order).contiguous()
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(13)).to(device, dtype)
        gy = ref.out_like(x, pc).copy_(gy)  # laid out like y, as autograd hands it over
        go = ref.in_memory_order(gy, order).contiguous()
        tag = f"{name} per_channel={pc} {dtype}"
        same(op("tensor_stats")(x, pc), op("tensor_stats")(xo, pc), "tensor_stats " + tag)
        P = op("scheme_params")(x, bits, sids, pc)
        same(P, op("scheme_params")(xo, bits, sids, pc), "scheme_params " + tag)
        y = op("mixture")(x, P, w, bits, sids, pc)
        layout(y, x, pc, "mixture " + tag)
        same(ref.in_memory_order(y, order), op("mixture")(xo, P, w, bits, sids, pc), "mixture " + tag)
        got = op("mixture_backward")(gy, x, P, w, bits, sids, pc, True, True)
        exp = op("mixture_backward")(go, xo, P, w, bits, sids, pc, True, True)
        layout(got[0], x, pc, "mixture_backward " + tag)
        same(ref.in_memory_order(got[0], order), exp[0], "mixture_backward grad_x " + tag)
        same(got[1], exp[1], "mixture_backward grad_w " + tag)
        same(got[2], exp[2], "mixture_backward grad_bits " + tag)
        k = K - 1
        yq = op("quantize")(x, P[k:k + 1], bits[k:k + 1], sids[k], pc)
        layout(yq, x, pc, "quantize " + tag)
        same(ref.in_memory_order(yq, order), op("quantize")(xo, P[k:k + 1], bits[k:k + 1], sids[k], pc),
             "quantize " + tag)
        gq = op("quantize_backward")(gy, x, P[k:k + 1], bits[k:k + 1], sids[k], pc, True)
        eq = op("quantize_backward")(go, xo, P[k:k + 1], bits[k:k + 1], sids[k], pc, True)
        layout(gq[0], x, pc, "quantize_backward " + tag)
        same(ref.in_memory_order(gq[0], order), eq[0], "quantize_backward grad_x " + tag)
        same(gq[1], eq[1], "quantize_backward grad_bits " + tag)
