# SPDX-License-Identifier: MIT
"""Loads the compiled extension ``autoqnn._C`` (C++ CPU and, if built, CUDA kernels).

Importing ``autoqnn._C`` runs its static ``TORCH_LIBRARY_IMPL`` registrations; there is nothing
else in it. Without it every ``autoqnn::`` op runs its pure-PyTorch reference (the ``default``
kernel from :mod:`autoqnn.ops._schema`), and one ``RuntimeWarning`` per process says why.

Module globals, set once at import:

* ``HAS_EXT``: ``_C`` is loaded (its CPU kernels are registered).
* ``HAS_CUDA_KERNELS``: it also contains the CUDA kernels (compiled in; a GPU may still be absent).
* ``LOAD_ERROR``: why ``_C`` is not loaded, else ``None``.
* ``BUILD_INFO``: the contents of the generated ``autoqnn/_build_info.py`` (``TORCH_VERSION``,
  ``WITH_CUDA``, ``CUDA_VERSION``, ``CUDA_ARCHS``, ``BUILD_TYPE``), or ``None`` without one.

``AUTOQNN_DISABLE_EXT=1`` skips loading on purpose. An extension built against another torch
version is not imported at all: the check reads ``_build_info.py`` *before* the import, because
the import itself would run the registrations (undefined symbols or ABI crashes after
``pip install -U torch``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

__all__ = ["HAS_EXT", "HAS_CUDA_KERNELS", "LOAD_ERROR", "BUILD_INFO", "ext_status"]

_PKG = __name__.rpartition(".")[0] or "autoqnn"
_EXT = f"{_PKG}._C"
_BUILD_INFO_MODULE = f"{_PKG}._build_info"
_BUILD_INFO_KEYS = ("TORCH_VERSION", "WITH_CUDA", "CUDA_VERSION", "CUDA_ARCHS", "BUILD_TYPE")
_REBUILD = "rebuild with `pip install -e . --no-build-isolation`"


class LoadResult(NamedTuple):
    has_ext: bool
    has_cuda_kernels: bool
    error: str | None
    build_info: dict | None
    disabled: bool  # AUTOQNN_DISABLE_EXT was set


def _disabled_by_env() -> bool:
    return os.environ.get("AUTOQNN_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes", "on")


def read_build_info() -> dict | None:
    """``autoqnn/_build_info.py`` as a dict (written by setup.py next to the built module), or
    ``None`` when there is none (nothing was built, or ``_C`` came from a bare CMake build)."""
    if importlib.util.find_spec(_BUILD_INFO_MODULE) is None:
        return None
    mod = importlib.import_module(_BUILD_INFO_MODULE)
    return {k: getattr(mod, k, None) for k in _BUILD_INFO_KEYS}


def _load(build_info_override: dict | None = None) -> LoadResult:
    """Decide and, if all is well, import ``autoqnn._C``. No warning, no globals touched.

    ``build_info_override`` replaces the contents of ``_build_info.py`` (tests of the guard).
    """
    if _disabled_by_env():
        return LoadResult(False, False, "disabled by the environment variable AUTOQNN_DISABLE_EXT=1",
                          None, True)
    try:
        info = read_build_info() if build_info_override is None else dict(build_info_override)
    except Exception as e:  # a corrupt generated file: do not trust the module either
        return LoadResult(False, False, f"cannot read {_BUILD_INFO_MODULE} ({type(e).__name__}: "
                          f"{e}); {_REBUILD}", None, False)
    if info is not None and info.get("TORCH_VERSION") != torch.__version__:
        return LoadResult(
            False, False,
            f"{_EXT} was built against torch {info.get('TORCH_VERSION')}, running torch "
            f"{torch.__version__}; {_REBUILD}", info, False)
    try:
        importlib.import_module(_EXT)
    except ImportError as e:
        if importlib.util.find_spec(_EXT) is None:
            why = (f"{_EXT} is not built (pure-Python install, AUTOQNN_BUILD_EXT=0, or the build "
                   f"failed); to build it: pip install -e . --no-build-isolation")
        else:
            why = f"importing {_EXT} failed ({type(e).__name__}: {e}); {_REBUILD}"
        return LoadResult(False, False, why, info, False)
    except OSError as e:
        return LoadResult(False, False, f"loading {_EXT} failed (OSError: {e}); {_REBUILD}", info,
                          False)
    with_cuda = bool(info and info.get("WITH_CUDA"))
    return LoadResult(True, with_cuda, None, info, False)


_RESULT = _load()
HAS_EXT: bool = _RESULT.has_ext
HAS_CUDA_KERNELS: bool = _RESULT.has_cuda_kernels
LOAD_ERROR: str | None = _RESULT.error
BUILD_INFO: dict | None = _RESULT.build_info

if not HAS_EXT:  # module code runs once per process: exactly one warning
    warnings.warn(
        f"autoqnn: the C++/CUDA extension {_EXT} is not loaded: {LOAD_ERROR}. Every autoqnn op "
        "falls back to the pure-PyTorch reference (correct, slower).",
        RuntimeWarning,
        stacklevel=2,
    )


def ext_status() -> dict:
    """Everything known about the extension, JSON-serialisable (``python -m autoqnn.env``)."""
    spec = importlib.util.find_spec(_EXT) if not _RESULT.disabled else None
    return {
        "HAS_EXT": HAS_EXT,
        "HAS_CUDA_KERNELS": HAS_CUDA_KERNELS,
        "LOAD_ERROR": LOAD_ERROR,
        "BUILD_INFO": BUILD_INFO,
        "disabled_by_env": _RESULT.disabled,
        # whether the torch version guard could run (False: no _build_info.py next to _C)
        "version_checked": BUILD_INFO is not None,
        "module_path": getattr(spec, "origin", None),
        "running_torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        # CUDA kernels are usable only with a GPU; without one CUDA tensors cannot exist anyway
        "cuda_kernels_usable": HAS_CUDA_KERNELS and torch.cuda.is_available(),
    }
