# SPDX-License-Identifier: MIT
"""``backend="auto"`` on GPUs: per op and tensor size, the faster of the two GPU kernels.

The output-pass ops (``quantize``, ``quantize_backward``, ``mixture``, ``mixture_backward``) have
two GPU implementations: the C++/CUDA kernels (``autoqnn::<op>_cuda``, ``csrc/cuda``) and the
Triton kernels (``autoqnn::<op>_triton``, ``triton_kernels/``). The main op's CUDA kernel is a
router installed here: each call goes to the implementation that a *choice table* names for that
op, that GPU and that tensor size, independently for the forward and the backward op.

The table is measured on the machine, never guessed:

    autoqnn tune-kernels                    # times both kernels per op at 2^10..2^24 elements
                                            # and writes the table (see default_path())

Without a table (or for a GPU it does not list) the C++/CUDA kernel is used where it is built,
else Triton. ``$AUTOQNN_KERNEL_CHOICE`` names another table file. A missing, unreadable or
malformed file never breaks a run: it falls back to that default with one warning.

File format (JSON, ``format`` 1)::

    {"format": 1, "devices": {"NVIDIA H200": {
        "torch": "2.11.0", "triton": "3.6.0", "autoqnn": "0.1.0", "dtype": "float32",
        "ops": {"mixture": [{"max_numel": 262144, "provider": "cuda"},
                            {"max_numel": null, "provider": "triton"}], ...},
        "measurements": [{"op": "mixture", "numel": 1024, "us": {"cuda": 9.1, "triton": 12.0},
                          "provider": "cuda"}, ...]}}}

An op's entries are ordered by ``max_numel``; a call with ``n`` elements takes the first entry
with ``n <= max_numel`` (``null`` = no upper bound).
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import _ext, backends
from .ops import _schema

__all__ = [
    "FORMAT",
    "ROUTED_OPS",
    "default_path",
    "device_key",
    "providers",
    "choose",
    "load_table",
    "save_table",
    "reset",
    "tune",
    "format_markdown",
    "install_router",
]

FORMAT = 1
ENV_PATH = "AUTOQNN_KERNEL_CHOICE"
ROUTED_OPS = _schema.GPU_TWIN_OPS
#: preference when no measurement decides (compiled code first)
DEFAULT_ORDER = ("cuda", "triton")

_table: Optional[dict] = None  # {"format", "devices": {...}} once loaded
_providers_cache: Dict[tuple, List[str]] = {}
_table_source: Optional[str] = None
_device_names: Dict[int, str] = {}


# ----------------------------------------------------------------------------- the table file
def default_path() -> Path:
    """``$AUTOQNN_KERNEL_CHOICE``, else ``$XDG_CACHE_HOME/autoqnn/kernel_choice.json`` (or
    ``~/.cache/...``)."""
    env = os.environ.get(ENV_PATH)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoqnn" / "kernel_choice.json"


def _validate(data, source: str) -> dict:
    def bad(why):
        return ValueError(f"kernel choice table {source}: {why}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"expected a JSON object with \"format\": {FORMAT}")
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise bad("\"devices\" must be an object {device name: table}")
    for dev, tab in devices.items():
        ops = tab.get("ops") if isinstance(tab, dict) else None
        if not isinstance(ops, dict):
            raise bad(f"device {dev!r} has no \"ops\" object")
        for op, entries in ops.items():
            if op not in ROUTED_OPS:
                raise bad(f"device {dev!r}: unknown op {op!r} (routed ops: {', '.join(ROUTED_OPS)})")
            if not isinstance(entries, list) or not entries:
                raise bad(f"device {dev!r}, op {op!r}: expected a non-empty list of entries")
            last = -1
            for i, e in enumerate(entries):
                if not isinstance(e, dict) or e.get("provider") not in DEFAULT_ORDER:
                    raise bad(f"device {dev!r}, op {op!r}, entry {i}: provider must be one of {DEFAULT_ORDER}")
                m = e.get("max_numel")
                if m is None:
                    if i != len(entries) - 1:
                        raise bad(f"device {dev!r}, op {op!r}: only the last entry may have max_numel null")
                elif not isinstance(m, int) or isinstance(m, bool) or m <= last:
                    raise bad(f"device {dev!r}, op {op!r}: max_numel must be increasing integers")
                else:
                    last = m
    return data


def load_table(path=None) -> dict:
    """Read and validate a table file (``ValueError`` naming the problem; ``{}`` devices when the
    file does not exist)."""
    p = Path(path) if path is not None else default_path()
    if not p.exists():
        return {"format": FORMAT, "devices": {}}
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"kernel choice table {p}: cannot be read ({type(e).__name__}: {e})") from e
    return _validate(data, str(p))


def save_table(device: str, entry: dict, path=None) -> Path:
    """Write ``entry`` as the table of ``device`` (other devices' tables in the file are kept),
    atomically."""
    p = Path(path) if path is not None else default_path()
    try:
        data = load_table(p)
    except ValueError as e:  # a broken file is replaced, not merged
        warnings.warn(f"{e}; replacing it", RuntimeWarning, stacklevel=2)
        data = {"format": FORMAT, "devices": {}}
    data["devices"][device] = entry
    _validate(data, str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    reset()
    return p


def reset() -> None:
    """Forget the loaded table (the next call reads the file again)."""
    global _table, _table_source
    _table = None
    _table_source = None
    _providers_cache.clear()


def _current_table() -> dict:
    global _table, _table_source
    if _table is None:
        try:
            _table = load_table()
            _table_source = str(default_path())
        except ValueError as e:
            warnings.warn(f"{e}; backend='auto' uses the default kernels", RuntimeWarning, stacklevel=3)
            _table = {"format": FORMAT, "devices": {}}
            _table_source = None
    return _table


# ----------------------------------------------------------------------------- choosing
def device_key(device: torch.device) -> str:
    """The table's key for a device: the GPU's name (``"NVIDIA H200"``), ``"cpu"`` on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name = _device_names.get(idx)
    if name is None:
        name = _device_names[idx] = torch.cuda.get_device_name(idx)
    return name


def _triton_usable_on(device_type: str) -> bool:
    try:
        from .ops import _triton  # noqa: PLC0415
    except Exception:  # pragma: no cover
        return False
    if not _triton.AVAILABLE:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and bool(_triton.kernels.INTERPRET)


def providers(op: str, device_type: str = "cuda") -> List[str]:
    """The implementations of ``op`` that can run on ``device_type``, default order first
    (``cuda``/``triton`` on GPUs; ``cpp`` and, under Triton's interpreter, ``triton`` on CPU,
    where only :func:`tune`'s own tests use the choice)."""
    hit = _providers_cache.get((op, device_type))
    if hit is not None:
        return list(hit)
    out = []
    if device_type == "cuda":
        if _ext.HAS_CUDA_KERNELS and _schema.has_kernel(f"{op}_cuda", "CUDA"):
            out.append("cuda")
    elif device_type == "cpu":
        if _ext.HAS_EXT and _schema.has_kernel(op, "CPU"):
            out.append("cpp")
    if op in ROUTED_OPS and _triton_usable_on(device_type):
        out.append("triton")
    _providers_cache[(op, device_type)] = out
    return list(out)


def lookup(table_entry: Optional[dict], op: str, numel: int) -> Optional[str]:
    """The provider a device's table names for ``op`` at ``numel`` elements (None: not listed)."""
    if not table_entry:
        return None
    for e in table_entry.get("ops", {}).get(op, []):
        m = e.get("max_numel")
        if m is None or numel <= m:
            return e["provider"]
    return None


def choose(op: str, x: torch.Tensor) -> str:
    """The provider ``backend="auto"`` uses for ``op`` on ``x`` (``"cuda"`` or ``"triton"`` on
    GPUs): the table's choice when it lists this device and that provider is available here,
    else the first available in :data:`DEFAULT_ORDER`. Raises ``BackendUnavailableError`` when
    neither exists."""
    avail = providers(op, x.device.type)
    if not avail:
        raise backends.BackendUnavailableError(f"no GPU kernel for autoqnn::{op} on {x.device}")
    numel = x.numel()
    if isinstance(numel, int):  # a symbolic size (dynamic shapes) keeps the default
        entry = _current_table()["devices"].get(device_key(x.device))
        p = lookup(entry, op, numel)
        if p in avail:
            return p
    return avail[0]


@functools.lru_cache(maxsize=None)
def _impl(provider: str, op: str) -> Callable:
    if provider == "triton":
        from .ops import _triton  # noqa: PLC0415

        return _triton._eager(_triton._IMPLS[op])
    if provider == "cuda":
        return getattr(torch.ops.autoqnn, f"{op}_cuda").default
    if provider == "cpp":
        return getattr(torch.ops.autoqnn, op).default
    raise ValueError(f"unknown provider {provider!r}")


def _router(op: str) -> Callable:
    xi = 1 if op.endswith("_backward") else 0  # backward ops: (grad_y, x, ...)

    def route(*args):
        return _impl(choose(op, args[xi]), op)(*args)

    route.__name__ = f"{op}_auto_gpu"
    return route


ROUTER_INSTALLED: List[str] = []
_router_lib = None


def install_router() -> List[str]:
    """Register the router as the CUDA kernel of every routed op that has at least one GPU
    implementation here (idempotent). Returns the ops routed."""
    global _router_lib
    if ROUTER_INSTALLED:
        return ROUTER_INSTALLED
    ops = [op for op in ROUTED_OPS if providers(op, "cuda")]
    if not ops:
        return ROUTER_INSTALLED
    _router_lib = torch.library.Library(_schema.LIB_NAME, "FRAGMENT")
    for op in ops:
        if _schema.has_kernel(op, "CUDA"):  # someone registered one already: never override
            continue
        torch.library.register_kernel(_schema.qualname(op), "cuda", _router(op), lib=_router_lib)
        ROUTER_INSTALLED.append(op)
    return ROUTER_INSTALLED


# ----------------------------------------------------------------------------- measuring
def _inputs(op: str, numel: int, device: torch.device, dtype: torch.dtype, generator=None):
    """Representative arguments: the 8 weight candidates at 3 bits for the mixture ops, ClipQ
    at 3 bits for the single-scheme ops; per-tensor statistics; a fixed seed."""
    from .schemes import WEIGHT_CANDIDATES, resolve_bits, scheme_info  # noqa: PLC0415
    from .ops import reference as ref  # noqa: PLC0415

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(numel, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(numel, generator=g).to(device=device, dtype=dtype)
    if op.startswith("mixture"):
        sids = [scheme_info(s).id for s in WEIGHT_CANDIDATES]
    else:
        sids = [scheme_info("clip").id]
    bits = torch.tensor(resolve_bits(sids, 3), dtype=torch.float32, device=device)
    params = ref.scheme_params_ref(x, bits, sids, False)
    w = torch.softmax(torch.randn(len(sids), generator=g), 0).to(device)
    if op == "mixture":
        return (x, params, w, bits, sids, False)
    if op == "mixture_backward":
        return (gy, x, params, w, bits, sids, False, True, True)
    if op == "quantize":
        return (x, params, bits, sids[0], False)
    return (gy, x, params, bits, sids[0], False, True)


def _time(fn: Callable[[], object], device: torch.device, rounds: int, warmup: int) -> float:
    """Median seconds of ``fn`` (CUDA events on GPUs, ``perf_counter`` on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        ts = []
        for _ in range(rounds):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _entries(points: Sequence[tuple]) -> List[dict]:
    """Size buckets from measured (numel, provider) points: a boundary at the geometric mean of
    neighbouring sizes whose winners differ; equal neighbours merge."""
    points = sorted(points)
    out: List[dict] = []
    for i, (n, prov) in enumerate(points):
        if i + 1 < len(points) and points[i + 1][1] == prov:
            continue
        if i + 1 < len(points):
            out.append({"max_numel": int(math.sqrt(n * points[i + 1][0])), "provider": prov})
        else:
            out.append({"max_numel": None, "provider": prov})
    return out


def tune(
    device="cuda",
    *,
    ops: Iterable[str] = ROUTED_OPS,
    sizes: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float32,
    rounds: int = 20,
    warmup: int = 3,
    write: bool = True,
    path=None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Time every available implementation of each op at each size on ``device`` and return
    the device's table (``{"ops": ..., "measurements": ...}``); with ``write`` also store it
    (:func:`save_table`). On CPU the candidates are ``cpp`` and, under Triton's interpreter,
    ``triton`` (useful to test this machinery; the router only acts on GPUs, and a CPU table is
    never written)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise backends.BackendUnavailableError("tune-kernels on cuda needs a CUDA GPU")
    if sizes is None:
        sizes = [2 ** k for k in range(10, 25, 2)]
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive element counts, got {sizes}")
    if rounds < 1 or warmup < 0:
        raise ValueError("rounds must be >= 1 and warmup >= 0")
    table: Dict[str, list] = {}
    meas: List[dict] = []
    for op in ops:
        if op not in ROUTED_OPS:
            raise ValueError(f"op {op!r} is not routed (routed ops: {', '.join(ROUTED_OPS)})")
        provs = [p for p in providers(op, device.type) if device.type != "cuda" or p in DEFAULT_ORDER]
        if not provs:
            continue
        points = []
        for n in sizes:
            args = _inputs(op, n, device, dtype)
            us = {}
            for p in provs:
                fn = _impl(p, op)
                us[p] = _time(lambda: fn(*args), device, rounds, warmup) * 1e6
            win = min(us, key=us.get)
            points.append((n, win))
            meas.append({"op": op, "numel": n, "us": {k: round(v, 2) for k, v in us.items()}, "provider": win})
            if progress is not None:
                progress(f"{op} n={n}: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items()) + f" -> {win}")
        table[op] = _entries(points)
    try:
        import triton  # noqa: PLC0415

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    from . import __version__  # noqa: PLC0415

    key = device_key(device)
    entry = {"torch": torch.__version__, "triton": tv, "autoqnn": __version__, "dtype": str(dtype).replace("torch.", ""),
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "ops": table, "measurements": meas}
    if write and device.type == "cuda" and table:
        entry["path"] = str(save_table(key, {k: v for k, v in entry.items() if k != "path"}, path))
    return {"device": key, **entry}


def format_markdown(result: dict) -> str:
    """The measurements of :func:`tune` as a Markdown table (one row per op and size)."""
    meas = result.get("measurements", [])
    provs = sorted({p for m in meas for p in m["us"]})
    lines = [f"Kernel choice for {result.get('device')} ({result.get('dtype')}, torch {result.get('torch')}, "
             f"triton {result.get('triton')}):", "",
             "| op | elements | " + " | ".join(f"{p} µs" for p in provs) + " | chosen | speed-up |",
             "|---|---:|" + "---:|" * len(provs) + "---|---:|"]
    for m in meas:
        t = m["us"]
        best = t[m["provider"]]
        other = max(v for v in t.values())
        lines.append(f"| {m['op']} | {m['numel']} | " + " | ".join(f"{t[p]:.1f}" if p in t else "-" for p in provs)
                     + f" | {m['provider']} | {other / best:.2f}× |")
    return "\n".join(lines)
