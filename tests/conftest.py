# SPDX-License-Identifier: MIT
import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselected by default)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


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
