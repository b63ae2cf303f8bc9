# SPDX-License-Identifier: MIT
"""Backend selection: which kernel runs an op, and what ``backend=`` means.

* ``"auto"`` (default, or ``$AUTOQNN_BACKEND``): call the ``autoqnn::`` op and let the dispatcher
  pick the kernel registered for the tensor's device: C++ on CPU; on GPUs a router that sends
  each op to the C++/CUDA or the Triton kernel, whichever the measured table of
  :mod:`autoqnn.kernel_choice` says is faster for that op and size (``autoqnn tune-kernels``);
  the pure-PyTorch reference where no kernel exists. Never raises for lack of a kernel.
* ``"torch"``: the pure-PyTorch formulation, no custom op at all (traceable and fusable by
  ``torch.compile``; the "compiled reference" of the benchmarks).
* ``"cpp"`` / ``"cuda"`` / ``"triton"``: that implementation or a :class:`BackendUnavailableError`
  saying why not (not built, wrong device, op not implemented there).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from . import _ext
from .ops import _schema

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")

#: ops for which a Triton implementation has been registered (filled by ``autoqnn.ops._triton``).
TRITON_OPS: set[str] = set()
#: ops whose CUDA kernel is a Triton launcher (statistics ops without a C++/CUDA kernel).
TRITON_CUDA_KERNELS: set[str] = set()
#: why Triton kernels are not available (None when they are).
TRITON_ERROR: str | None = "no Triton kernels are registered yet (see the fused-kernels issue)"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def default_backend() -> str:
    b = os.environ.get("AUTOQNN_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"AUTOQNN_BACKEND={b!r} is not one of {', '.join(BACKENDS)}")
    return b


def check_backend_name(backend: str | None) -> str:
    if backend is None:
        return default_backend()
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend.lower()


def kernel_for(op: str, device_type: str, numel: int = 1 << 20) -> str:
    """Name of the implementation ``"auto"`` uses for ``op`` on a device type (on GPUs: for a
    tensor of ``numel`` elements on the current device, per the kernel choice table)."""
    if device_type == "cpu":
        return "cpp" if _ext.HAS_EXT and _schema.has_kernel(op, "CPU") else "reference"
    if device_type == "cuda":
        from . import kernel_choice  # noqa: PLC0415

        if op in kernel_choice.ROUTED_OPS:
            avail = kernel_choice.providers(op, "cuda")
            if not avail:
                return "reference"
            if len(avail) > 1 and torch.cuda.is_available():
                entry = kernel_choice._current_table()["devices"].get(kernel_choice.device_key(torch.device("cuda")))
                p = kernel_choice.lookup(entry, op, numel)
                return p if p in avail else avail[0]
            return avail[0]
        if _ext.HAS_CUDA_KERNELS and _schema.has_kernel(op, "CUDA") and op not in TRITON_CUDA_KERNELS:
            return "cuda"
        return "triton" if op in TRITON_CUDA_KERNELS else "reference"
    return "reference"


def resolve(backend: str | None, device: torch.device, ops: Iterable[str]) -> str:
    """Map a requested backend to an execution mode: ``"ops"`` (the dispatcher), ``"torch"``,
    ``"cuda"`` (the ``autoqnn::<op>_cuda`` kernels) or ``"triton"``.

    Raises :class:`BackendUnavailableError` with the reason for an unavailable explicit backend.
    """
    b = check_backend_name(backend)
    if b == "auto":
        return "ops"
    if b == "torch":
        return "torch"
    ops = list(ops)
    dev = device.type
    if b == "cpp":
        if dev != "cpu":
            raise BackendUnavailableError(f"backend='cpp' runs on CPU tensors, got a {dev} tensor")
        if not _ext.HAS_EXT:
            raise BackendUnavailableError(f"backend='cpp' is unavailable: {_ext.LOAD_ERROR}")
        missing = [o for o in ops if not _schema.has_kernel(o, "CPU")]
        if missing:
            raise BackendUnavailableError(
                f"backend='cpp': the C++ extension has no CPU kernel for {', '.join(missing)}"
            )
        return "ops"
    if b == "cuda":
        if dev != "cuda":
            raise BackendUnavailableError(f"backend='cuda' needs a CUDA tensor, got a {dev} tensor")
        if not _ext.HAS_CUDA_KERNELS:
            why = _ext.LOAD_ERROR or "the extension was built without CUDA kernels"
            raise BackendUnavailableError(f"backend='cuda' is unavailable: {why}")
        # the C++/CUDA kernels of the routed ops are registered as autoqnn::<op>_cuda
        names = [f"{o}_cuda" if o in _schema.GPU_TWIN_OPS else o for o in ops]
        missing = [o for o, n in zip(ops, names) if not _schema.has_kernel(n, "CUDA")]
        if missing:
            raise BackendUnavailableError(
                f"backend='cuda': the extension has no CUDA kernel for {', '.join(missing)}"
            )
        return "cuda"
    # triton
    if TRITON_ERROR is not None:
        raise BackendUnavailableError(f"backend='triton' is unavailable: {TRITON_ERROR}")
    missing = [o for o in ops if o not in TRITON_OPS]
    if missing:
        raise BackendUnavailableError(f"backend='triton' has no kernel for {', '.join(missing)}")
    return "triton"
