# SPDX-License-Identifier: MIT
"""Loading of the extension ``autoqnn._C`` (``autoqnn/_ext.py``) and its ``tensor_stats`` kernel.

The loader tests run in subprocesses (the extension can be imported only once per process); the
kernel tests compare ``autoqnn::tensor_stats`` on CPU (and on CUDA when there is a GPU) against
the pure-PyTorch reference below and skip with the load reason when ``_C`` is not loaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoqnn import _ext

ROOT = Path(__file__).resolve().parents[1]
FALLBACK_MSG = "falls back to the pure-PyTorch reference"


# ----------------------------------------------------------------------------- helpers
def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("AUTOQNN_DISABLE_EXT", "PYTHONWARNINGS")}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"subprocess failed:\n{r.stdout}\n{r.stderr}"
    return r


def _last_json(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


def _built() -> bool:
    return importlib.util.find_spec("autoqnn._build_info") is not None


def _ensure_schema() -> None:
    """Make sure ``autoqnn::tensor_stats`` is declared (``import autoqnn`` normally did it)."""
    if hasattr(torch.ops.autoqnn, "tensor_stats"):
        return
    try:  # pragma: no cover - only without autoqnn.ops
        torch.library.define("autoqnn::tensor_stats", "(Tensor x, bool per_channel) -> Tensor")
    except RuntimeError:
        pass


def tensor_stats_ref(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The oracle: ``[C, 7]`` count of finite, Σ|x|, Σx, Σx², min, max, max|x| over finite
    elements, zeros for rows without any; float64 for float64 input, else float32."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[0] if (per_channel and x.dim() > 0) else 1
    x2 = x.detach().to(cd).reshape(C, x.numel() // C if C else 0)
    fin = torch.isfinite(x2)
    xf = torch.where(fin, x2, 0)
    n = fin.sum(1).to(cd)
    big = torch.finfo(cd).max
    z = torch.zeros(C, dtype=cd, device=x.device)
    mn = torch.where(fin, x2, big).amin(1) if x2.shape[1] else z
    mx = torch.where(fin, x2, -big).amax(1) if x2.shape[1] else z
    mn = torch.where(n > 0, mn, 0)
    mx = torch.where(n > 0, mx, 0)
    ma = xf.abs().amax(1) if x2.shape[1] else z
    return torch.stack([n, xf.abs().sum(1), xf.sum(1), (xf * xf).sum(1), mn, mx, ma], 1)


requires_ext = pytest.mark.skipif(
    not _ext.HAS_EXT, reason=f"autoqnn._C is not loaded: {_ext.LOAD_ERROR}"
)


# ----------------------------------------------------------------------------- (a) disable switch
def test_disable_env_var_gives_reference_path():
    r = _run(
        "import json, sys, torch, autoqnn._ext as e\n"
        "import autoqnn  # schemas + reference kernels\n"
        "s = torch.ops.autoqnn.tensor_stats(torch.tensor([1.0, -2.0, float('nan')]), False)\n"
        "st = e.ext_status()\n"
        "st['imported'] = 'autoqnn._C' in sys.modules\n"
        "st['stats'] = s.tolist()\n"
        "import autoqnn.functional as AF\n"
        "x = torch.randn(50, requires_grad=True); w = torch.full((8,), 0.125, requires_grad=True)\n"
        "y = AF.quantize_mixture(x, w, AF.WEIGHT_CANDIDATES, 3); y.sum().backward()\n"
        "st['node'] = type(y.grad_fn).__name__\n"
        "st['cpp_nodes'] = [AF._CPP_QUANTIZE is None, AF._CPP_MIXTURE is None]\n"
        "st['grads'] = [x.grad is not None, w.grad is not None]\n"
        "print(json.dumps(st))\n",
        AUTOQNN_DISABLE_EXT="1",
    )
    st = _last_json(r)
    assert st["HAS_EXT"] is False and st["HAS_CUDA_KERNELS"] is False
    assert st["disabled_by_env"] is True
    assert "AUTOQNN_DISABLE_EXT" in st["LOAD_ERROR"]
    assert st["imported"] is False
    assert st["stats"] == [[2.0, 3.0, -1.0, 5.0, -2.0, 1.0, 2.0]]
    # no C++ autograd nodes without the extension: the fast path records its Python Function
    assert st["cpp_nodes"] == [True, True] and st["node"] == "_MixtureFnBackward" and st["grads"] == [True, True]
    # exactly one warning per process, saying why and what happens instead
    assert r.stderr.count(FALLBACK_MSG) == 1, r.stderr
    assert "AUTOQNN_DISABLE_EXT" in r.stderr


# ----------------------------------------------------------------------------- (b) version guard
def test_version_guard_refuses_other_torch():
    # Import with the extension disabled (so _C is not loaded yet), then run the loader by hand
    # with a build info claiming another torch: it must refuse before importing _C.
    r = _run(
        "import json, os, sys, autoqnn._ext as e\n"
        "del os.environ['AUTOQNN_DISABLE_EXT']\n"
        "info = {'TORCH_VERSION': '1.2.3+fake', 'WITH_CUDA': False, 'CUDA_VERSION': None,\n"
        "        'CUDA_ARCHS': [], 'BUILD_TYPE': 'Release'}\n"
        "res = e._load(build_info_override=info)\n"
        "print(json.dumps({'has_ext': res.has_ext, 'cuda': res.has_cuda_kernels,\n"
        "                  'error': res.error, 'imported': 'autoqnn._C' in sys.modules}))\n",
        AUTOQNN_DISABLE_EXT="1",
    )
    res = _last_json(r)
    assert res["has_ext"] is False and res["cuda"] is False
    assert res["imported"] is False
    assert "1.2.3+fake" in res["error"] and torch.__version__ in res["error"]
    assert "pip install -e . --no-build-isolation" in res["error"]


def test_fresh_process_status_is_consistent():
    # Whatever the build state, a fresh process reports consistently.
    r = _run("import json, autoqnn._ext as e; print(json.dumps(e.ext_status()))")
    st = _last_json(r)
    assert st["running_torch"] == torch.__version__
    if st["HAS_EXT"]:
        assert st["LOAD_ERROR"] is None and r.stderr.count(FALLBACK_MSG) == 0
    else:
        assert st["LOAD_ERROR"] and r.stderr.count(FALLBACK_MSG) == 1


def test_triton_kernels_is_a_subpackage(tmp_path):
    # Outside the source tree: only what the installation provides is importable.
    code = (
        "import importlib.util, json\n"
        "try:\n"
        "    import autoqnn.triton_kernels as t\n"
        "except ModuleNotFoundError as e:\n"
        "    print(json.dumps({'missing': str(e)})); raise SystemExit\n"
        "top = importlib.util.find_spec('triton_kernels')\n"
        "print(json.dumps({'file': t.__file__, 'top': top and top.origin}))\n"
    )
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = _last_json(r)
    if "missing" in res:
        if "'autoqnn'" in res["missing"]:
            pytest.skip("autoqnn is not installed (run from the source tree)")
        pytest.fail(f"autoqnn is installed but autoqnn.triton_kernels is not: {res['missing']}")
    assert res["file"].endswith("__init__.py")
    # our triton_kernels/ folder must never be importable as a top-level package
    assert not (res["top"] and Path(res["top"]).resolve().is_relative_to(ROOT)), res


# ----------------------------------------------------------------------------- (c) built => loaded
@pytest.mark.skipif(not _built(), reason="no autoqnn/_build_info.py: the extension is not built "
                    "(pip install -e . --no-build-isolation)")
@pytest.mark.skipif(os.environ.get("AUTOQNN_DISABLE_EXT", "") not in ("", "0"),
                    reason="AUTOQNN_DISABLE_EXT is set")
def test_built_extension_is_loaded_and_registered():
    assert _ext.HAS_EXT, _ext.LOAD_ERROR
    assert _ext.LOAD_ERROR is None
    assert _ext.BUILD_INFO["TORCH_VERSION"] == torch.__version__
    assert _ext.HAS_CUDA_KERNELS == bool(_ext.BUILD_INFO["WITH_CUDA"])
    _ensure_schema()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("autoqnn::tensor_stats", "CPU")
    from autoqnn.ops import _triton

    # the C++ CUDA kernel, or Triton's launcher where the build has no CUDA kernels
    assert has("autoqnn::tensor_stats", "CUDA") == (_ext.HAS_CUDA_KERNELS or "tensor_stats" in _triton.CUDA_REGISTERED)
    assert ("tensor_stats" in _triton.CUDA_REGISTERED) == (not _ext.HAS_CUDA_KERNELS and _triton.AVAILABLE)
    # scheme_params: the C++/CUDA kernel where built, else the Triton launcher
    assert has("autoqnn::scheme_params", "CUDA") == (_ext.HAS_CUDA_KERNELS or "scheme_params" in _triton.CUDA_REGISTERED)
    assert ("scheme_params" in _triton.CUDA_REGISTERED) == (not _ext.HAS_CUDA_KERNELS and _triton.AVAILABLE)
    # the batched ops likewise
    for op in ("scheme_params_batched", "mixture_batched", "mixture_batched_backward"):
        assert has(f"autoqnn::{op}", "CUDA") == (_ext.HAS_CUDA_KERNELS or op in _triton.CUDA_REGISTERED)
        assert (op in _triton.CUDA_REGISTERED) == (not _ext.HAS_CUDA_KERNELS and _triton.AVAILABLE)
    st = _ext.ext_status()
    assert st["HAS_EXT"] and st["version_checked"] and st["module_path"].endswith(".so")


# ----------------------------------------------------------------------------- (d) kernel vs reference
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NAN, INF = float("nan"), float("inf")


SHAPES = {"0d": (), "empty": (0,), "one": (1,), "n769": (769,), "n5125": (5125,),
          "rows_empty": (3, 0), "conv": (64, 3, 3, 3), "multi_chunk": (3, 9000)}
CASES = [*SHAPES, "transpose", "step_slice"]
VARIANTS = ["plain", "nonfinite", "all_zero", "nonfinite_row"]


def _sample(case: str, variant: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    if case == "transpose":
        x = (torch.randn(40, 33) * 3).to(device, dtype).t()  # (33, 40), non-contiguous
    elif case == "step_slice":
        x = (torch.randn(50, 70) * 3).to(device, dtype)[::3, 1::2]  # (17, 35), non-contiguous
    else:
        x = (torch.randn(SHAPES[case]) * 3).to(device, dtype)
    if variant == "plain" or x.numel() == 0:
        return x
    if variant == "all_zero":
        return x.zero_()
    pattern = torch.tensor([NAN, INF, -INF], device=device, dtype=dtype)
    if variant == "nonfinite":  # ~15% NaN/+Inf/-Inf scattered, at least one
        mask = torch.rand(x.shape, device=device) < 0.15
        mask.view(-1)[0] = True
        return x.masked_scatter_(mask, pattern.repeat(x.numel() // 3 + 1))
    # nonfinite_row: row 0 (or the whole 0-d tensor) holds only NaN/+-Inf
    row = x if x.dim() == 0 else x[0]
    row.copy_(pattern.repeat(row.numel() // 3 + 1)[: row.numel()].reshape(row.shape))
    return x


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape)
    assert torch.isfinite(out).all()
    out, ref = out.cpu(), ref.cpu()
    exact = [0, 4, 5, 6]  # count, min, max, max|x|
    torch.testing.assert_close(out[:, exact], ref[:, exact], rtol=0, atol=0)
    rtol = 1e-12 if ref.dtype == torch.float64 else 1e-5
    # sums: relative to the row's Σ|x| (Σx may cancel to ~0) and to Σx² for the squares
    for col, scale in ((1, ref[:, 1]), (2, ref[:, 1]), (3, ref[:, 3])):
        tol = rtol * (scale.abs() + 1e-30)
        bad = (out[:, col] - ref[:, col]).abs() > tol
        assert not bad.any(), f"column {col}: {out[bad, col]} vs {ref[bad, col]}"


@requires_ext
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES)
def test_cpu_kernel_matches_reference(case, dtype, per_channel):
    _ensure_schema()
    for variant in VARIANTS:
        x = _sample(case, variant, dtype)
        out = torch.ops.autoqnn.tensor_stats(x, per_channel)
        _assert_matches(out, tensor_stats_ref(x, per_channel))


@requires_ext
def test_cpu_kernel_is_really_cpp():
    _ensure_schema()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("autoqnn::tensor_stats", "CPU")


@requires_ext
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_kernel_independent_of_threads(dtype, per_channel):
    _ensure_schema()
    x = (torch.randn(4, 100_003) * 5).to(dtype)  # ~100 chunks: really split over threads
    x[1, ::97] = NAN
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.autoqnn.tensor_stats(x, per_channel)
        torch.set_num_threads(2)
        two = torch.ops.autoqnn.tensor_stats(x, per_channel)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    _assert_matches(two, tensor_stats_ref(x, per_channel))


# ----------------------------------------------------------------------------- (e) errors
@requires_ext
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_non_float_dtype_raises_naming_it(dtype):
    _ensure_schema()
    x = torch.ones(5, dtype=dtype)
    with pytest.raises((TypeError, RuntimeError), match=str(dtype)):
        torch.ops.autoqnn.tensor_stats(x, False)


# ----------------------------------------------------------------------------- (f) opcheck
@requires_ext
@pytest.mark.parametrize(
    "x, per_channel",
    [
        (torch.randn(4, 5), True),
        (torch.randn(4, 5), False),
        (torch.randn(7, dtype=torch.float16), False),
        (torch.randn(6, 5, dtype=torch.float64).t(), True),
        (torch.randn(3, 0), True),
    ],
    ids=["fp32-channel", "fp32-tensor", "fp16", "fp64-noncontig", "empty-rows"],
)
def test_opcheck(x, per_channel):
    _ensure_schema()
    torch.library.opcheck(torch.ops.autoqnn.tensor_stats.default, (x, per_channel))


# ----------------------------------------------------------------------------- CUDA (GPU only)
@pytest.mark.cuda
@pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS, reason="autoqnn._C has no CUDA kernels")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_kernel_matches_reference(dtype, per_channel):
    _ensure_schema()
    for case in CASES:
        for variant in VARIANTS:
            x = _sample(case, variant, dtype, "cuda")
            out = torch.ops.autoqnn.tensor_stats(x, per_channel)
            assert out.device.type == "cuda"
            _assert_matches(out, tensor_stats_ref(x, per_channel))
            assert torch.equal(out, torch.ops.autoqnn.tensor_stats(x, per_channel))  # determinism
    x = torch.randn(4, 5, device="cuda")
    torch.library.opcheck(torch.ops.autoqnn.tensor_stats.default, (x, True))
