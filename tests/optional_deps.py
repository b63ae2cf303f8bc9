# SPDX-License-Identifier: MIT
"""Skip markers for tests that need an optional package (torchvision: ImageFolder data and the
torchvision model zoo). CI installs it; a torch build without a matching torchvision (e.g. the
CPU wheel of another torch version) skips these tests instead of failing them."""
import pytest


def _torchvision_error():
    try:
        import torchvision  # noqa: F401,PLC0415
    except Exception as e:  # not installed, or a build that does not match torch
        return f"torchvision unavailable: {type(e).__name__}: {e}"
    return None


TORCHVISION_ERROR = _torchvision_error()
needs_torchvision = pytest.mark.skipif(TORCHVISION_ERROR is not None, reason=str(TORCHVISION_ERROR))
