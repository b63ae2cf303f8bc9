# SPDX-License-Identifier: MIT
"""The CUDA kernels' levels-table pass (``AUTOQNN_CUDA_LEVELS``, ``csrc/cuda/quantize.cu``,
namespace ``lv``) checked on a machine without a GPU.

``tools/cuda_emu`` compiles ``csrc/cuda`` as a CPU extension under a shim that runs each block's
threads as user-level contexts (in forward, reversed and shuffled order) with poisoned shared
memory. ``compare.py --levels`` then feeds the inputs where a table can go wrong, every
candidate's steps and their float32 neighbours (found on the reference's math), and requires
the levels pass to equal the arithmetic kernels of the same build bit for bit: values, grad_x
and the gradient sums, fp32 and bf16, 2/3/4/8 bits, per tensor and per channel. On a GPU,
``tests/test_cuda_kernels.py`` checks the same on the real kernels. ``compare.py --fuzz`` runs the
randomised differential cases of the C++/Triton kernel tests on the emulated CUDA ops.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tools" / "cuda_emu"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses ucontext (Linux)"),
    pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler"),
    pytest.mark.skipif(importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None,
                       reason="torch.utils.cpp_extension.load needs ninja"),
]


def test_cuda_levels_pass_equals_the_arithmetic_kernels_emulated():
    env = dict(os.environ)
    env.pop("AUTOQNN_CUDA_LEVELS", None)
    b = subprocess.run([sys.executable, str(EMU / "build.py"), "new", "WORK"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, (b.stdout + b.stderr)[-6000:]
    r = subprocess.run([sys.executable, str(EMU / "compare.py"), "--levels", "--dtypes", "float32,bfloat16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "failures: 0" in out, out[-6000:]
    assert out.count(".. steps ") >= 150, out[-3000:]  # the step cases really ran


def test_cuda_kernels_on_random_cases_emulated():
    """The random cases of tests/fuzz_cases.py (the C++ and Triton kernels' differential test) on
    the emulated CUDA ops, each call in three thread orders: statistics, mixture, backward and
    single-scheme outputs against the reference (``compare.py --fuzz``; 1500 cases, and 300 with
    ``AUTOQNN_CUDA_LEVELS=1``, passed when it was added, 2026-12-01)."""
    pytest.importorskip("hypothesis")
    env = dict(os.environ)
    env.pop("AUTOQNN_CUDA_LEVELS", None)
    b = subprocess.run([sys.executable, str(EMU / "build.py"), "new", "WORK"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, (b.stdout + b.stderr)[-6000:]
    for levels, n in (("0", 60), ("1", 30)):  # the arithmetic output kernels, the levels-table pass
        r = subprocess.run([sys.executable, str(EMU / "compare.py"), "--fuzz", str(n)], cwd=ROOT,
                           env=dict(env, AUTOQNN_CUDA_LEVELS=levels), capture_output=True, text=True, timeout=900)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "failures: 0" in out and f".. fuzz: {n} cases, {n // 3} batched cases" in out, out[-6000:]
        assert ".. layouts: passed" in out, out[-6000:]  # channels-last and other dense layouts
