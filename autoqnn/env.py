# SPDX-License-Identifier: MIT
"""``python -m autoqnn.env``: what runs where (versions, extension status, kernel per op and
device). Also :func:`collect_env` for bug reports and run logs."""
from __future__ import annotations

import json
import os
import platform
import sys

import torch

from . import _ext, backends
from .ops import OPS

__all__ = ["collect_env", "format_env", "main"]


def _triton_version():
    try:
        import triton  # noqa: PLC0415

        return triton.__version__
    except Exception as e:  # ImportError, or a broken install
        return f"not importable ({type(e).__name__}: {e})"


def collect_env() -> dict:
    """A JSON-serialisable description of the environment and the kernel each op uses."""
    cuda_ok = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda_ok or _ext.HAS_CUDA_KERNELS or backends.TRITON_OPS else [])
    if "cuda" not in devices:
        devices.append("cuda")  # report what a CUDA tensor would use, even without a GPU
    from . import __version__  # noqa: PLC0415

    return {
        "autoqnn": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_ok,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else [],
        "triton": _triton_version(),
        "extension": _ext.ext_status(),
        "default_backend": backends.default_backend(),
        "triton_kernels": sorted(backends.TRITON_OPS) or backends.TRITON_ERROR,
        "kernels": {op: {d: backends.kernel_for(op, d) for d in devices} for op in OPS},
        "kernel_choice": _kernel_choice_status(cuda_ok),
        "threads": torch.get_num_threads(),
        "eager_autograd": _eager_autograd(),
        "levels_pass": {v: os.environ.get(v, "0") for v in ("AUTOQNN_CUDA_LEVELS", "AUTOQNN_TRITON_LEVELS")},
    }


def _eager_autograd() -> str:
    """Which autograd nodes the functional API's eager fast path records."""
    from . import functional as AF  # noqa: PLC0415

    if AF._CPP_MIXTURE is not None and AF._CPP_QUANTIZE is not None:
        return "C++ nodes (autoqnn._C: csrc/autograd.cpp)"
    return "Python autograd.Functions (no extension)"


def _kernel_choice_status(cuda_ok: bool) -> dict:
    from . import kernel_choice as kc  # noqa: PLC0415

    st = {"path": str(kc.default_path()), "routed_ops": list(kc.ROUTER_INSTALLED)}
    try:
        devs = kc.load_table()["devices"]
        st["devices"] = sorted(devs)
        if cuda_ok:
            st["this_gpu_measured"] = kc.device_key(torch.device("cuda")) in devs
    except ValueError as e:
        st["error"] = str(e)
    return st


def format_env(info: dict) -> str:
    ext = info["extension"]
    lines = [
        f"autoqnn      {info['autoqnn']}",
        f"python       {info['python']}  ({info['platform']})",
        f"torch        {info['torch']}  (CUDA build: {info['torch_cuda']}, GPU available: {info['cuda_available']})",
    ]
    if info["gpus"]:
        lines.append(f"gpus         {', '.join(info['gpus'])}")
    lines += [
        f"triton       {info['triton']}",
        f"autoqnn._C   {'loaded' if ext.get('HAS_EXT') else 'NOT loaded: ' + str(ext.get('LOAD_ERROR'))}",
    ]
    bi = ext.get("BUILD_INFO") or {}
    if bi:
        lines.append(
            "             built for torch {} | CUDA kernels: {} {}".format(
                bi.get("TORCH_VERSION"), bool(bi.get("WITH_CUDA")), bi.get("CUDA_ARCHS") or ""
            )
        )
    lines.append(f"backend      default {info['default_backend']!r} (set AUTOQNN_BACKEND to change)")
    lines.append(f"threads      {info['threads']}")
    lines.append(f"autograd     eager quantizer calls record {info['eager_autograd']}")
    lv = info.get("levels_pass") or {}
    lines.append("levels pass  " + ", ".join(f"{k}={v}" for k, v in lv.items())
                 + " (the output kernels' table lookup; 0 = evaluate every scheme)")
    devs = list(next(iter(info["kernels"].values())).keys())
    w = max(len(o) for o in info["kernels"])
    lines.append("")
    lines.append("kernel used by backend='auto':")
    lines.append("  " + "op".ljust(w) + "  " + "  ".join(d.ljust(10) for d in devs))
    for op, per in info["kernels"].items():
        lines.append("  " + op.ljust(w) + "  " + "  ".join(per[d].ljust(10) for d in devs))
    if not info["cuda_available"]:
        lines.append("  (no GPU here: the cuda column says what a CUDA tensor would use)")
    no_batched = [d for d in devs if any(per[d] == "reference" for op, per in info["kernels"].items()
                                         if op.endswith("_batched") or op.endswith("_batched_backward"))]
    if no_batched:
        lines.append(f"  quantize_mixture_batched on {', '.join(no_batched)}: one call per tensor (no batched kernel "
                     "built there; the batched ops' reference is only the test oracle)")
    kc = info.get("kernel_choice") or {}
    if kc.get("routed_ops"):
        if kc.get("error"):
            state = "unusable: " + kc["error"]
        elif kc.get("this_gpu_measured"):
            state = "measured for this GPU"
        else:
            state = "not measured for this GPU (run `autoqnn tune-kernels`; C++/CUDA where built)"
        lines.append(f"  GPU ops {', '.join(kc['routed_ops'])}: per op and size from {kc['path']}, {state}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect_env()
    if "--json" in argv:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_env(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
