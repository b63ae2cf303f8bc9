# SPDX-License-Identifier: MIT
"""Inputs shared by the C++ CPU and CUDA kernel tests (tests/test_cpu_kernels.py,
tests/test_cuda_kernels.py)."""
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
