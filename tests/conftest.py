# SPDX-License-Identifier: MIT
import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselected by default)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """``AUTOQNN_TEST_SHARD=i/n`` keeps every n-th collected test from the i-th on (the rest are
    deselected): ``tests/test_triton_kernels.py`` runs the interpreted Triton cases as n processes
    side by side, one per core."""
    shard = os.environ.get("AUTOQNN_TEST_SHARD")
    if not shard:
        return
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise pytest.UsageError(f"AUTOQNN_TEST_SHARD must be 'i/n' with 0 <= i < n, got {shard!r}")
    keep = items[i::n]
    kept = set(map(id, keep))
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
    items[:] = keep


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices():
    """CPU plus CUDA when a GPU is visible (never queried at import time of test modules
    beyond this call); ``AUTOQNN_TEST_DEVICE`` restricts the list."""
    forced = os.environ.get("AUTOQNN_TEST_DEVICE")
    if forced:
        return [d.strip() for d in forced.split(",") if d.strip()]
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
