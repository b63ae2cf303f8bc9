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
