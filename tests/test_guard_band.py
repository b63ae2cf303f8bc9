# SPDX-License-Identifier: MIT
"""No kernel reads outside its input: the C++ CPU kernels, and on a GPU the CUDA kernels and the
Triton twins, on inputs embedded in poisoned guard bands (tests/guard_band.py). Triton's
interpreter runs the same checks in tests/triton_cases.py."""
import pytest
import torch

import guard_band as GB

from autoqnn import _ext
from autoqnn.ops import _schema, has_kernel

OPS = torch.ops.autoqnn
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _main_op(name):
    return getattr(OPS, name)


def _cuda_op(name):  # the C++/CUDA kernels by their own names where the main op routes to a twin
    return getattr(OPS, f"{name}_cuda" if name in _schema.GPU_TWIN_OPS else name)


def _triton_op(name):
    return getattr(OPS, f"{name}_triton")


def _backends():
    out = [pytest.param("cpu", _main_op, marks=pytest.mark.skipif(
        not (_ext.HAS_EXT and has_kernel("mixture", "CPU")), reason=f"C++ CPU kernels not built: {_ext.LOAD_ERROR}"),
        id="cpp")]
    gpu = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    out.append(pytest.param("cuda", _cuda_op, id="cuda", marks=gpu + [pytest.mark.skipif(
        not _ext.HAS_CUDA_KERNELS, reason=f"autoqnn._C has no CUDA kernels: {_ext.LOAD_ERROR}")]))
    out.append(pytest.param("cuda", _triton_op, id="triton-cuda", marks=gpu))
    return out


def _ready(op):
    if op is _triton_op:
        from autoqnn.ops import _triton  # noqa: PLC0415

        if not _triton.ensure_registered():
            pytest.skip("Triton kernels unavailable")


@pytest.mark.parametrize("device,op", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,per_channel", GB.SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else ("ch" if v else "t"))
def test_per_tensor_ops_read_only_their_input(device, op, dtype, shape, per_channel):
    _ready(op)
    for sids in (GB.WEIGHT_SIDS, GB.ACT_SIDS):
        GB.check_per_tensor_ops(op, device, dtype, shape, per_channel, sids)


@pytest.mark.parametrize("device,op", _backends())
def test_strided_views_read_only_their_elements(device, op):
    """A strided view whose gaps hold poison: the kernels (or their wrappers' copies) must read the
    view's elements only."""
    _ready(op)
    GB.check_per_tensor_ops(op, device, torch.float32, (7, 130), True, GB.WEIGHT_SIDS, strided=True)
    GB.check_per_tensor_ops(op, device, torch.float32, (769,), False, GB.ACT_SIDS, strided=True)


@pytest.mark.parametrize("device,op", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_ops_read_only_their_rows(device, op, dtype):
    _ready(op)
    for sids in (GB.WEIGHT_SIDS, GB.ACT_SIDS):
        GB.check_batched_ops(op, device, dtype, sids)


def test_a_leak_is_caught():
    """The check itself: an op that reads one element past its input is reported."""
    def leaky(name):
        if name != "tensor_stats":
            return _main_op(name)

        def stats(x, per_channel):  # one element past the end, where the storage has one
            flat = x.reshape(-1)
            room = x.untyped_storage().nbytes() // x.element_size() - flat.storage_offset() > flat.numel()
            if per_channel or not room:
                return OPS.tensor_stats(x, per_channel)
            return OPS.tensor_stats(torch.as_strided(flat, (flat.numel() + 1,), (1,), flat.storage_offset()), False)
        return stats
    with pytest.raises(AssertionError, match="tensor_stats reads outside"):
        GB.check_per_tensor_ops(leaky, "cpu", torch.float32, (769,), False, GB.WEIGHT_SIDS)
