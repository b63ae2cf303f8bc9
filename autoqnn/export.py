# SPDX-License-Identifier: MIT
"""Export of finalized AutoQNN models: a bit-packed safetensors file, its loader, and ONNX.

A *finalized* model is one returned by :func:`autoqnn.qag.convert` whose quantizing vertices are
all single-scheme :class:`~autoqnn.nn.Quantizer` modules (a QSS search is over and its
:class:`~autoqnn.nn.SchemeMixture` vertices were replaced by their chosen scheme), with activation
quantizers that hold EMA statistics (run a calibration or training batch first).

Packed format (``FORMAT_NAME`` version ``FORMAT_VERSION``), one safetensors file:

* ``metadata["plan"]``: a JSON plan: format and version, autoqnn/torch versions, the
  :class:`~autoqnn.config.QuantConfig` used (so :func:`load_quantized` converts the float
  architecture the same way), and per quantizing vertex: name, op, parameter, shape, dtype, weight
  scheme/bits/per_channel/channel_dim, code layout, the tensors holding its codes and scales, and
  the activation scheme/bits with its frozen EMA parameters.
* ``metadata["payload_sha256"]``: SHA-256 over the plan and every tensor (corruption check).
* ``weight/<param>/codes``: the weight's integer codes, ``b`` bits per element, packed
  little-endian (element ``i`` occupies stream bits ``[i·b, (i+1)·b)``, element bit 0 first;
  stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``; the last byte is zero-padded). Elements are
  in row-major order of ``weight.transpose(0, channel_dim)`` for per-channel weights with
  ``channel_dim != 0`` (the quantizer's own ``[C, N]`` view), else of ``weight``.
* ``weight/<param>/<scale>``: the per-tensor (``[1]``) or per-channel (``[C]``) scales of
  :data:`SCALE_NAMES` (ResQ: ``alpha`` is ``[C, b]``), in the quantizer's compute dtype.
* ``float/<state_dict key>``: every other parameter and buffer (biases, BatchNorm, layers left
  float), as stored in the model (same dtype).

Codes per scheme (each reproduces ``Quantizer(weight)`` bit for bit; SPEC 2):

=============  =====  ===============================================================
scheme         bits   code → value
=============  =====  ===============================================================
binary         1      c ∈ {0, 1}: α·(2c − 1)   (c = 1 for w > 0)
ternary        2      c = t + 1, t ∈ {−1, 0, 1}: α·t
quaternary     2      c = v + 2, v ∈ {−2..1}: α·v
fixed          b      m in b-bit two's complement: m·step (step = 2^e)
residual       b      bit i = sign of residual stage i (1: +): Σ_i α_i·(±1), in stage order
zoom           b      k ∈ 0..2^b−1: min + step·(k + ½)
clip           b      c = k + 2^(b−1): α·(k + ½)
pot            b      bit b−1 = sign (1: −), low b−1 bits = level l: ±α·(½ if l = 0 else 2^l);
                      exact zeros (PotQ maps x = 0 to 0) are marked in a 1-bit ``zero_mask``
=============  =====  ===============================================================

Loading never unpickles anything: the file is read with ``safetensors.safe_open`` and the plan
with ``json``. In the loaded model each quantized weight Parameter holds its dequantized value and
its weight quantizer is *disabled* (``enabled = False``): re-quantizing would recompute the
statistics from the dequantized values and change them. Activation quantizers carry the frozen
EMA parameters. Call ``autoqnn.nn.set_quant_enabled(model, True)`` before training it further.

ONNX (:func:`export_onnx`): weights become constant dequantized tensors; each activation quantizer
becomes a small exportable subgraph that reproduces it exactly on finite inputs:

* FixedQ (per tensor, power-of-two step) → ``QuantizeLinear``/``DequantizeLinear`` (int8, zero
  point 0, scale = step; a ``Clip`` to the b-bit range when b < 8): exact, since the step is a
  power of two and both round half to even.
* ClipQ is mid-rise (levels α·(k + ½)) and ZoomQ's levels min + step·(k + ½) have a non-integer
  offset, so Q/DQ cannot represent them exactly: plain ``Div``/``Sub``, ``Round``/``Floor``,
  ``Clip``, ``Add``, ``Mul`` in the reference's order of operations.
* PotQ: ``Div``, ``Abs``, comparisons against the exact float thresholds of round(log2|u|),
  ``Where`` for the level, ``Sign``, ``Mul``. ResQ: ``Greater``/``Where``/``Add``/``Sub`` per stage.

Every subgraph passes NaN through (``IsNaN``/``Where``), like the quantizer.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import backends
from . import functional as AF
from .config import QuantConfig
from .nn import QUANT_LAYERS, QMultiheadAttention, Quantizer, QuantizerBase, SchemeMixture
from .nn.quantizers import _fix_fixed_step
from .ops import reference as ref
from .schemes import NUM_PARAMS, resolve_bits, scheme_info

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SCALE_NAMES",
    "ExportError",
    "PackedFormatError",
    "ExportInfo",
    "PackedWeight",
    "pack_bits",
    "unpack_bits",
    "pack_weight",
    "dequantize_weight",
    "export_packed",
    "load_quantized",
    "parity",
    "export_onnx",
    "onnx_replica",
    "ExportableActQuant",
    "CODE_LAYOUT",
    "BIT_ORDER",
]

FORMAT_NAME = "autoqnn.packed"
FORMAT_VERSION = 1

#: Scale tensors stored per scheme (besides the codes): ``[C]`` each, ResQ's ``alpha`` ``[C, b]``.
SCALE_NAMES = {
    "binary": ("alpha",),
    "ternary": ("alpha",),
    "quaternary": ("alpha",),
    "fixed": ("step",),
    "residual": ("alpha",),
    "zoom": ("min", "step"),
    "clip": ("alpha",),
    "pot": ("alpha",),
}

#: Human-readable code layouts, written into the plan.
CODE_LAYOUT = {
    "binary": "c in {0,1} (1: w > 0); value = alpha * (2c - 1)",
    "ternary": "c = t + 1, t in {-1,0,1}; value = alpha * t",
    "quaternary": "c = v + 2, v in {-2..1}; value = alpha * v",
    "fixed": "m as b-bit two's complement; value = m * step",
    "residual": "bit i (LSB first) = sign of residual stage i (1: +); value = sum_i alpha[:, i] * (+-1) "
                "accumulated in stage order starting from 0",
    "zoom": "k in 0..2^b-1; value = min + step * (k + 0.5)",
    "clip": "c = k + 2^(b-1), k in -2^(b-1)..2^(b-1)-1; value = alpha * (k + 0.5)",
    "pot": "bit b-1 = sign (1: negative), bits 0..b-2 = level l; value = (alpha * (+-1)) * "
           "(0.5 if l == 0 else 2^l); zero_mask (1 bit per element, optional) marks exact zeros",
}
BIT_ORDER = ("little-endian: element i occupies stream bits [i*b, (i+1)*b), element bit 0 first; "
             "stream bit j is bit (j % 8) of byte j // 8; the last byte is zero-padded")

_CHUNK = 8 * 16384  # elements per packing chunk (a multiple of 8: every chunk starts on a byte)
# PotQ: round(log2 a) >= j  <=>  a > float32(sqrt(1/2)) * 2^j (float32; >= with the float64 value).
_SQRT_HALF_F32 = ref._SQRT_HALF_F32
_SQRT_HALF_F64 = ref._SQRT_HALF_F64


def _autoqnn_version() -> str:
    """Read lazily: ``autoqnn/__init__`` may import modules that import this one."""
    import autoqnn

    return str(getattr(autoqnn, "__version__", "unknown"))


class ExportError(ValueError):
    """The model cannot be exported as it is (not finalized, no EMA statistics, non-finite ...)."""


class PackedFormatError(ValueError):
    """A packed file is not valid: wrong format or version, truncated, corrupted or inconsistent."""


# ============================================================================ bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into a uint8 tensor of ``ceil(n·bits/8)`` bytes.

    Little-endian bit order (see :data:`BIT_ORDER`); the last byte's unused bits are 0.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    c = codes.detach().reshape(-1).to("cpu", torch.int64)
    n = c.numel()
    if n and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits, got "
                         f"[{int(c.min())}, {int(c.max())}]")
    out = torch.empty((n * bits + 7) // 8, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    w8 = torch.arange(8, dtype=torch.int64)
    for start in range(0, n, _CHUNK):
        part = c[start : start + _CHUNK]
        stream = ((part[:, None] >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.reshape(-1, 8) << w8).sum(1).to(torch.uint8)
        b0 = start * bits // 8
        out[b0 : b0 + packed.numel()] = packed
    return out


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` int64 codes. Raises ``ValueError`` when the byte count
    is not ``ceil(n·bits/8)`` or the padding bits are not zero (a corrupted tensor)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed codes must be a 1-d uint8 tensor, got {data.dtype} {list(data.shape)}")
    need = (n * bits + 7) // 8
    if data.numel() != need:
        raise ValueError(f"packed codes hold {data.numel()} bytes, expected {need} for {n} elements at {bits} bits")
    d = data.to("cpu", torch.int64)
    out = torch.empty(n, dtype=torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    w8 = torch.arange(8, dtype=torch.int64)
    for start in range(0, n, _CHUNK):
        cnt = min(_CHUNK, n - start)
        b0, b1 = start * bits // 8, ((start + cnt) * bits + 7) // 8
        stream = ((d[b0:b1, None] >> w8) & 1).reshape(-1)
        out[start : start + cnt] = (stream[: cnt * bits].reshape(cnt, bits) << shifts).sum(1)
    tail = n * bits % 8
    if tail and int(d[-1]) >> tail:
        raise ValueError("packed codes have non-zero padding bits (corrupted data)")
    return out


# ============================================================================ weight codes
@dataclass
class PackedWeight:
    """One quantized weight: packed codes, scales and what is needed to dequantize it."""

    scheme: str
    bits: int  # bits per code
    shape: tuple
    dtype: torch.dtype  # the weight's dtype (the dequantized tensor's)
    per_channel: bool
    channel_dim: int
    codes: torch.Tensor  # uint8, ceil(numel·bits/8)
    scales: dict  # name -> tensor in the compute dtype (see SCALE_NAMES), maybe "zero_mask" (uint8)

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def channels(self) -> int:
        return int(self.shape[self.channel_dim]) if self.per_channel and len(self.shape) else 1

    @property
    def transposed(self) -> bool:
        return self.per_channel and self.channel_dim != 0

    def nbytes(self) -> dict:
        scale = sum(t.numel() * t.element_size() for t in self.scales.values())
        return {"codes": self.codes.numel(), "scales": scale, "total": self.codes.numel() + scale}


def _prep(w: torch.Tensor, per_channel: bool, channel_dim: int) -> torch.Tensor:
    return w.transpose(0, channel_dim) if per_channel and channel_dim != 0 else w


def _code_bits(scheme: str, bits: int) -> int:
    info = scheme_info(scheme)
    return info.min_bits if not info.multi_bit else bits


def _codes_rows(name: str, x2: torch.Tensor, p: torch.Tensor, b: int):
    """Integer codes ``[C, N]`` of ``x2`` under one scheme with params ``p`` ([C, NUM_PARAMS]);
    the index computations of :func:`autoqnn.ops.reference.eval_scheme`, op for op. Returns
    ``(codes, scales, zero_mask)``."""
    col = lambda j: p[:, j : j + 1]  # noqa: E731
    zero = None
    if name == "binary":
        codes = (x2 > 0).to(torch.int64)
        scales = {"alpha": p[:, 0]}
    elif name == "ternary":
        t = torch.where(x2.abs() > col(0), torch.sign(x2), 0)
        codes = (t + 1).to(torch.int64)
        scales = {"alpha": p[:, 1]}
    elif name == "quaternary":
        v = torch.clamp(torch.round(ref._safe_div(x2, col(0))), -2, 1)
        codes = (v + 2).to(torch.int64)
        scales = {"alpha": p[:, 1]}
    elif name == "fixed":
        lim = 2 ** (b - 1)
        m = torch.clamp(torch.round(ref._safe_div(x2, col(0))), -lim, lim - 1).to(torch.int64)
        codes = torch.remainder(m, 2**b)
        scales = {"step": p[:, 0]}
    elif name == "residual":
        r = x2
        codes = torch.zeros(x2.shape, dtype=torch.int64, device=x2.device)
        for i in range(b):
            sg = ref._sgn(r)
            codes |= (sg > 0).to(torch.int64) << i
            r = r - col(i) * sg
        scales = {"alpha": p[:, :b].contiguous()}
    elif name == "zoom":
        k = torch.clamp(torch.floor(ref._safe_div(x2 - col(0), col(1))), 0, 2**b - 1)
        codes = k.to(torch.int64)
        scales = {"min": p[:, 0], "step": p[:, 1]}
    elif name == "clip":
        lim = 2 ** (b - 1)
        k = torch.clamp(torch.round(ref._safe_div(x2, col(0)) - 0.5), -lim, lim - 1)
        codes = (k + lim).to(torch.int64)
        scales = {"alpha": p[:, 0]}
    elif name == "pot":
        u = ref._safe_div(x2, col(0))
        a = u.abs()
        f, e = torch.frexp(a)
        f64 = x2.dtype == torch.float64
        up = (f >= _SQRT_HALF_F64) if f64 else (f > _SQRT_HALF_F32)
        lmax = 2 ** (b - 1) - 1
        lv = torch.clamp(e.to(torch.int64) - 1 + up.to(torch.int64), 0, lmax)
        codes = ((u < 0).to(torch.int64) << (b - 1)) | lv
        zero = (u == 0) & (col(0) != 0)
        scales = {"alpha": p[:, 0]}
    else:  # pragma: no cover - validated upstream
        raise AssertionError(name)
    return codes, scales, zero


def _values_rows(name: str, codes: torch.Tensor, s: dict, b: int, cd: torch.dtype) -> torch.Tensor:
    """The dequantized ``[C, N]`` values of ``codes`` (the value computations of eval_scheme)."""
    col = lambda t: t.to(cd).reshape(-1, 1)  # noqa: E731
    if name == "binary":
        return col(s["alpha"]) * torch.where(codes == 1, 1.0, -1.0).to(cd)
    if name == "ternary":
        if codes.numel() and int(codes.max()) > 2:
            raise PackedFormatError("ternary codes must be 0, 1 or 2 (corrupted data)")
        return col(s["alpha"]) * (codes - 1).to(cd)
    if name == "quaternary":
        return col(s["alpha"]) * (codes - 2).to(cd)
    if name == "fixed":
        m = torch.where(codes >= 2 ** (b - 1), codes - 2**b, codes)
        return m.to(cd) * col(s["step"])
    if name == "residual":
        alpha = s["alpha"].to(cd)
        q = torch.zeros(codes.shape, dtype=cd, device=codes.device)
        for i in range(b):
            sg = torch.where((codes >> i) & 1 == 1, 1.0, -1.0).to(cd)
            q = q + alpha[:, i : i + 1] * sg
        return q
    if name == "zoom":
        return col(s["min"]) + col(s["step"]) * (codes.to(cd) + 0.5)
    if name == "clip":
        return col(s["alpha"]) * ((codes - 2 ** (b - 1)).to(cd) + 0.5)
    if name == "pot":
        lv = (codes & (2 ** (b - 1) - 1)).to(cd)
        sg = torch.where((codes >> (b - 1)) & 1 == 1, -1.0, 1.0).to(cd)
        mag = torch.where(lv == 0, 0.5, torch.exp2(lv))
        q = col(s["alpha"]) * sg * mag
        zm = s.get("zero_mask")
        if zm is not None:
            q = torch.where(zm, torch.zeros((), dtype=cd), q)
        return q
    raise AssertionError(name)  # pragma: no cover


def _weight_params(xin: torch.Tensor, sid: int, b: int, per_channel: bool, backend: Optional[str]) -> torch.Tensor:
    """The ``[C, NUM_PARAMS]`` statistics :func:`autoqnn.functional.quantize` uses for ``xin`` with
    this backend: the reference's ``params_rows`` on the pure-PyTorch path, else the
    ``autoqnn::scheme_params`` op (:func:`autoqnn.functional.scheme_params`). The two agree to
    rounding, not bit for bit, so the codes follow the path the quantizer takes."""
    mode = backends.resolve(backend, xin.device, AF._needs(backend, "quantize", "quantize_backward"))
    if mode == "torch":
        cd = ref.compute_dtype(xin.dtype)
        C = ref.num_channels(xin, per_channel)
        # as functional._torch_impl: the elements in memory order (a channels-last weight's sums)
        xo = ref.in_memory_order(xin, ref.memory_order(xin, per_channel))
        x2 = xo.detach().to(cd).reshape(C, xin.numel() // C)
        return ref.params_rows(x2, [b], [sid])[0]
    return AF.scheme_params(xin, [sid], [b], per_channel=per_channel, backend=backend)[0]


def pack_weight(w: torch.Tensor, scheme: str, bits: Optional[int] = None, *, per_channel: bool = False,
                channel_dim: int = 0, name: str = "weight", backend: Optional[str] = None) -> PackedWeight:
    """Quantize ``w`` like ``Quantizer(scheme, bits, per_channel=..., channel_dim=...,
    backend=backend)`` does on the CPU and return its packed codes and scales
    (:func:`dequantize_weight` inverts it bit-exactly).

    The statistics are those the quantizer computes (:func:`autoqnn.functional.scheme_params`,
    or the reference's on the pure-PyTorch backend). Raises :class:`ExportError` naming ``name``
    for a non-finite weight.
    """
    info = scheme_info(scheme)
    (b,) = resolve_bits([info.name], bits)
    AF.check_input(w, name)
    wd = w.detach().to("cpu")
    if not bool(torch.isfinite(wd).all()):
        bad = int((~torch.isfinite(wd)).sum())
        raise ExportError(f"{name}: the weight has {bad} non-finite value(s) (NaN/Inf); a quantized export "
                          "needs finite weights")
    if per_channel and wd.dim() == 0:
        raise ExportError(f"{name}: per_channel needs a weight with at least one dimension")
    xin = _prep(wd, per_channel, channel_dim)
    cd = ref.compute_dtype(wd.dtype)
    C = ref.num_channels(xin, per_channel)
    n = xin.numel() // C if C else 0
    x2 = xin.to(cd).contiguous().reshape(C, n)
    if xin.numel():
        p = _weight_params(xin, info.id, b, per_channel, backend).to(cd)
    else:
        p = torch.zeros(C, NUM_PARAMS, dtype=cd)
    codes, scales, zero = _codes_rows(info.name, x2, p, b)
    cb = _code_bits(info.name, b)
    scales = {k: _dense(v.to(cd)) for k, v in scales.items()}
    if zero is not None and bool(zero.any()):
        scales["zero_mask"] = pack_bits(zero.reshape(-1).to(torch.int64), 1)
    return PackedWeight(info.name, cb, tuple(wd.shape), wd.dtype, bool(per_channel), int(channel_dim),
                        pack_bits(codes, cb), scales)


def dequantize_weight(pw: PackedWeight) -> torch.Tensor:
    """The dequantized weight (``pw.dtype``, CPU) of a :class:`PackedWeight`."""
    info = scheme_info(pw.scheme)
    b = pw.bits
    cd = ref.compute_dtype(pw.dtype)
    n = pw.numel
    C = pw.channels
    try:
        codes = unpack_bits(pw.codes, b, n)
    except ValueError as e:
        raise PackedFormatError(str(e)) from None
    N = n // C if C else 0
    codes = codes.reshape(C, N)
    s = dict(pw.scales)
    if "zero_mask" in s:
        try:
            s["zero_mask"] = unpack_bits(s["zero_mask"], 1, n).reshape(C, N).bool()
        except ValueError as e:
            raise PackedFormatError(f"zero_mask: {e}") from None
    q = _values_rows(info.name, codes, s, b, cd)
    pshape = list(pw.shape)
    if pw.transposed:
        pshape[0], pshape[pw.channel_dim] = pshape[pw.channel_dim], pshape[0]
    q = q.reshape(pshape)
    if pw.transposed:
        q = q.transpose(0, pw.channel_dim)
    return q.to(pw.dtype).contiguous()


# ============================================================================ model walk
@dataclass
class _Site:
    """A quantizing vertex: the module holding its quantizers and the weight it quantizes."""

    name: str  # the vertex name (as in QAGReport)
    kind: str  # "module" | "mha" | "functional"
    op: str
    param: str  # qualified name of the weight Parameter
    holder: nn.Module
    w_attr: str
    a_attr: str

    @property
    def wq(self):
        return getattr(self.holder, self.w_attr, None)

    @property
    def aq(self):
        return getattr(self.holder, self.a_attr, None)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _find_sites(model: nn.Module) -> list:
    from .qag import _op_of_module

    sites = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            sites.append(_Site(name, "module", _op_of_module(m), _join(name, "weight"), m,
                               "weight_quant", "act_quant"))
        elif isinstance(m, QMultiheadAttention):
            sites.append(_Site(_join(name, "in_proj"), "mha", "linear", _join(name, "in_proj_weight"), m,
                               "in_weight_quant", "in_act_quant"))
    fq = getattr(model, "_qag_functional", None)
    for pname, (where, key) in getattr(model, "_qag_fn_map", {}).items():
        if where != "functional" or fq is None or key not in fq:
            continue
        h = fq[key]
        sites.append(_Site(h.param_name, "functional", h.op, pname, h, "weight_quant", "act_quant"))
    return sites


def _check_finalized(model: nn.Module, sites: list) -> None:
    attached = set()
    for s in sites:
        for q in (s.wq, s.aq):
            if q is not None:
                attached.add(id(q))
    for qname, q in model.named_modules():
        if isinstance(q, SchemeMixture):
            raise ExportError(f"'{qname}' is a SchemeMixture (a QSS search vertex): finalize the model first "
                              "(replace every mixture by SchemeMixture.to_quantizer())")
        if isinstance(q, QuantizerBase) and id(q) not in attached:
            raise ExportError(f"quantizer '{qname}' is not attached to an expensive vertex this exporter knows "
                              "(Conv/ConvTranspose/Linear, MultiheadAttention in_proj, functional call)")


def _param_names(model: nn.Module) -> dict:
    """id(Parameter) -> every qualified name it has (tied parameters have several)."""
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(n)
    return out


def _quantizer_prefixes(model: nn.Module) -> list:
    return [n + "." for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantizerBase)]


# ============================================================================ export
@dataclass
class ExportInfo:
    """What :func:`export_packed` wrote. ``expected_bytes`` is computed from the plan (Σ packed
    codes ``ceil(n·b/8)`` + scales + float tensors) and equals ``payload_bytes``;
    ``file_bytes == header_bytes + payload_bytes`` (header = 8-byte length + JSON metadata)."""

    path: str
    file_bytes: int
    header_bytes: int
    payload_bytes: int
    expected_bytes: int
    code_bytes: int
    scale_bytes: int
    float_bytes: int
    float32_bytes: int  # the same tensors with every quantized weight stored as fp32
    layers: dict = field(default_factory=dict)  # vertex -> {scheme, bits, numel, codes, scales, total, ...}
    parity: Optional[dict] = None

    @property
    def compression(self) -> float:
        """``float32_bytes / file_bytes``."""
        return self.float32_bytes / self.file_bytes if self.file_bytes else float("nan")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compression"] = self.compression
        return d

    def summary(self) -> str:
        rows = [f"{self.path}: {self.file_bytes:,} bytes (header {self.header_bytes:,}, payload "
                f"{self.payload_bytes:,} = expected {self.expected_bytes:,}: codes {self.code_bytes:,}, "
                f"scales {self.scale_bytes:,}, float tensors {self.float_bytes:,}); fp32 equivalent "
                f"{self.float32_bytes:,} bytes ({self.compression:.2f}x)", "",
                "| layer | weight | act | elements | code bytes | scale bytes |", "|---|---|---|---|---|---|"]
        for name, L in self.layers.items():
            rows.append(f"| {name} | {L.get('weight') or '-'} | {L.get('activation') or '-'} | "
                        f"{L.get('numel', 0):,} | {L.get('codes', 0):,} | {L.get('scales', 0):,} |")
        if self.parity:
            rows += ["", f"parity: max |diff| {self.parity['max_abs']:.3g}, "
                         f"mean |diff| {self.parity['mean_abs']:.3g}"]
        return "\n".join(rows)


def _config_dict(model_config) -> tuple:
    """(QuantConfig dict or None, float vertex names known from a report)."""
    from .qag import QAGReport

    if model_config is None:
        return None, []
    if isinstance(model_config, QAGReport):
        return dict(model_config.config), list(model_config.float_names())
    if isinstance(model_config, QuantConfig):
        return model_config.to_dict(), []
    if isinstance(model_config, dict):
        return QuantConfig.from_dict(dict(model_config)).to_dict(), []
    raise TypeError("model_config must be a QuantConfig, its dict, a QAGReport or None, got "
                    f"{type(model_config).__name__}")


def _jsonable_config(d: Optional[dict]) -> Optional[dict]:
    if d is None:
        return None
    d = dict(d)
    d["overrides"] = [dataclasses.asdict(o) if dataclasses.is_dataclass(o) else dict(o)
                      for o in d.get("overrides", [])]
    for o in d["overrides"]:
        for k in ("weight_schemes", "act_schemes"):
            if o.get(k) is not None:
                o[k] = list(o[k])
    return d


def _float_vertices(model: nn.Module, types: Sequence[str]) -> list:
    """Expensive module vertices left float (what a converter must leave float again)."""
    from .qag import _float_type

    out = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            if m.weight_quant is None and m.act_quant is None:
                out.append(name)
        elif isinstance(m, QMultiheadAttention):
            if m.in_weight_quant is None and m.in_act_quant is None:
                out.append(_join(name, "in_proj"))
        elif _float_type(m) is not None and _float_type(m).__name__ in types:
            out.append(name)
    return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A fresh CPU copy with canonical strides (size-1 dims of a slice keep odd strides under
    ``contiguous()``, which safetensors and ``view(uint8)`` reject)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return _dense(t.reshape(-1)).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _digest(plan_json: str, tensors: dict) -> str:
    """SHA-256 over the plan and every tensor (key, dtype, shape, bytes), in key order."""
    h = hashlib.sha256(plan_json.encode("utf-8"))
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"\0{k}\0{t.dtype}\0{list(t.shape)}\0".encode("utf-8"))
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _act_plan(site: _Site, aq) -> dict:
    if not isinstance(aq, Quantizer) or aq.kind != "activation":
        raise ExportError(f"layer '{site.name}': the activation quantizer is a {type(aq).__name__} of kind "
                          f"{getattr(aq, 'kind', '?')!r}, expected an activation Quantizer")
    if not aq.enabled:
        raise ExportError(f"layer '{site.name}': the activation quantizer is disabled; enable it "
                          "(autoqnn.nn.set_quant_enabled) before exporting")
    b = aq.int_bits()
    if not bool(aq.ema_valid):
        raise ExportError(f"layer '{site.name}': the activation quantizer has no EMA statistics (ema_valid is "
                          "False): run a calibration/training batch first (a few forwards in train mode)")
    if [int(x) for x in aq.ema_bits.tolist()] != [b]:
        raise ExportError(f"layer '{site.name}': the activation EMA statistics were collected at "
                          f"{int(aq.ema_bits[0])} bits but the quantizer now uses {b}: run a calibration/"
                          "training batch first")
    row = aq.ema_params.detach().to("cpu", torch.float64).reshape(-1).tolist()
    if not all(math.isfinite(v) for v in row):
        raise ExportError(f"layer '{site.name}': the activation EMA parameters are not finite: {row}")
    return {"scheme": aq.scheme, "bits": b, "params": row, "params_dtype": _dtype_name(aq.ema_params.dtype),
            "ema_momentum": aq.ema_momentum, "learn_bits": bool(aq.learn_bits)}


def _collect(model: nn.Module, model_config, extra) -> tuple:
    """Validate a finalized model and build (plan, tensors, per-layer info, float32 bytes)."""
    sites = _find_sites(model)
    _check_finalized(model, sites)
    cfg, report_float = _config_dict(model_config)
    types = tuple(cfg["layer_types"]) if cfg else QuantConfig().layer_types
    pnames = _param_names(model)
    by_param = {}
    layers, tensors, info_layers = [], {}, {}
    quantized_ids = set()
    float32_bytes = 0
    for s in sites:
        wq, aq = s.wq, s.aq
        if wq is None and aq is None:
            continue
        try:
            w = model.get_parameter(s.param)
        except AttributeError:
            raise ExportError(f"layer '{s.name}': its weight '{s.param}' is not a Parameter of the model") from None
        entry = {"name": s.name, "kind": s.kind, "op": s.op, "param": s.param, "shape": list(w.shape),
                 "dtype": _dtype_name(w.dtype), "weight": None, "activation": None}
        linfo = {"numel": int(w.numel()), "codes": 0, "scales": 0, "total": 0, "weight": "", "activation": ""}
        if wq is not None:
            if not isinstance(wq, Quantizer) or wq.kind != "weight":
                raise ExportError(f"layer '{s.name}': the weight quantizer is a {type(wq).__name__} of kind "
                                  f"{getattr(wq, 'kind', '?')!r}, expected a weight Quantizer")
            if not wq.enabled:
                raise ExportError(f"layer '{s.name}': the weight quantizer is disabled; enable it "
                                  "(autoqnn.nn.set_quant_enabled) before exporting")
            if id(w) in by_param:
                raise ExportError(f"layers '{by_param[id(w)]}' and '{s.name}' both quantize the parameter "
                                  f"'{s.param}': a packed export stores one dequantized weight per parameter")
            by_param[id(w)] = s.name
            b = wq.int_bits()
            pw = pack_weight(w, wq.scheme, b, per_channel=wq.per_channel, channel_dim=wq.channel_dim,
                             name=f"layer '{s.name}' ({s.param})",
                             backend=wq.backend if w.device.type == "cpu" else None)
            deq = dequantize_weight(pw)
            with torch.no_grad():
                target = wq(w).detach()
            if not torch.equal(deq, target.to("cpu")):
                diff = float((deq.double() - target.to("cpu").double()).abs().max())
                msg = (f"layer '{s.name}': the packed codes do not reproduce the weight quantizer's output "
                       f"(max |diff| {diff:.3g}, backend {wq.backend or 'auto'} on {w.device})")
                if w.device.type == "cpu":
                    raise ExportError(msg)
                warnings.warn(msg + ": the file holds the CPU reference values", RuntimeWarning, stacklevel=3)
            key = f"weight/{s.param}"
            tmap = {"codes": f"{key}/codes"}
            tensors[f"{key}/codes"] = pw.codes
            for k, t in pw.scales.items():
                tmap[k] = f"{key}/{k}"
                tensors[f"{key}/{k}"] = t
            nb = pw.nbytes()
            entry["weight"] = {"scheme": pw.scheme, "bits": b, "code_bits": pw.bits, "per_channel": pw.per_channel,
                               "channel_dim": pw.channel_dim, "channels": pw.channels, "numel": pw.numel,
                               "transposed": pw.transposed, "code_layout": CODE_LAYOUT[pw.scheme],
                               "learn_bits": bool(wq.learn_bits), "tensors": tmap}
            linfo.update(codes=nb["codes"], scales=nb["scales"], total=nb["total"],
                         weight=f"{scheme_info(pw.scheme).letter}-{b}" + (" per-channel" if pw.per_channel else ""))
            quantized_ids.add(id(w))
            float32_bytes += w.numel() * 4
        if aq is not None:
            entry["activation"] = _act_plan(s, aq)
            linfo["activation"] = f"{scheme_info(aq.scheme).letter}-{aq.int_bits()}"
        layers.append(entry)
        info_layers[s.name] = linfo

    # every other tensor of the state_dict: stored as is (aliases of one tensor stored once)
    qkeys = {n for pid in quantized_ids for n in pnames.get(pid, [])}
    qprefixes = _quantizer_prefixes(model)
    floats, aliases, seen = {}, {}, {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k in qkeys or any(k.startswith(p) for p in qprefixes):
            continue
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"state_dict entry '{k}' is not a tensor ({type(v).__name__}); it cannot be stored")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ExportError(f"float tensor '{k}' has non-finite values (NaN/Inf)")
        ident = (v.device, v.dtype, v.data_ptr(), tuple(v.shape), tuple(v.stride())) if v.numel() else None
        if ident is not None and ident in seen:
            aliases[k] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = k
        tkey = f"float/{k}"
        tensors[tkey] = _dense(v)
        floats[k] = {"tensor": tkey, "dtype": _dtype_name(v.dtype), "shape": list(v.shape)}
        float32_bytes += v.numel() * v.element_size()
    float_vertices = sorted(set(_float_vertices(model, types)) | set(report_float))
    if extra is not None:
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ExportError(f"extra must be JSON-serialisable: {e}") from None
    plan = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "autoqnn_version": _autoqnn_version(),
        "torch_version": torch.__version__.split("+")[0],
        "bit_order": BIT_ORDER,
        "quant_config": _jsonable_config(cfg),
        "layers": layers,
        "float_vertices": float_vertices,
        "float_tensors": floats,
        "aliases": aliases,
        "extra": extra,
    }
    return plan, tensors, info_layers, float32_bytes


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file next to ``path``, fsync, then ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        pass


def export_packed(model: nn.Module, path: Union[str, os.PathLike], *, model_config=None, extra: Optional[dict] = None,
                  check_inputs: Any = None, model_builder: Optional[Callable[[], nn.Module]] = None) -> ExportInfo:
    """Write a finalized model as one bit-packed safetensors file (format in the module docstring).

    Args:
        model: a finalized model (see the module docstring).
        path: the file to write (e.g. ``model.qnn.safetensors``); written atomically.
        model_config: the :class:`~autoqnn.config.QuantConfig` (or its dict, or the
            :class:`~autoqnn.qag.QAGReport`) the model was converted with; stored so
            :func:`load_quantized` converts the float architecture the same way. A report also
            tells which functional call sites were left float.
        extra: JSON-serialisable user data stored in the plan.
        check_inputs: inputs for a parity check of the written file: the file is read back and
            applied to a copy of ``model`` (or loaded with :func:`load_quantized` when
            ``model_builder`` is given), and :func:`parity` with ``model`` goes into
            ``ExportInfo.parity``.

    Raises:
        ExportError: the model is not finalized, an activation quantizer has no EMA statistics,
            a weight is not finite, ... (nothing is written).
    """
    path = os.fspath(path)
    from safetensors.torch import save_file

    plan, tensors, info_layers, float32_bytes = _collect(model, model_config, extra)
    plan_json = json.dumps(plan, allow_nan=False, sort_keys=False)
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "plan": plan_json,
            "payload_sha256": _digest(plan_json, tensors)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    code_bytes = sum(t.numel() for k, t in tensors.items() if k.startswith("weight/") and k.endswith("/codes"))
    float_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("float/"))
    scale_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                      if k.startswith("weight/") and not k.endswith("/codes"))
    expected = _expected_bytes(plan)
    file_bytes = os.path.getsize(path)
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    info = ExportInfo(path=path, file_bytes=file_bytes, header_bytes=header, payload_bytes=file_bytes - header,
                      expected_bytes=expected, code_bytes=code_bytes, scale_bytes=scale_bytes,
                      float_bytes=float_bytes, float32_bytes=float32_bytes, layers=info_layers)
    if check_inputs is not None:
        if model_builder is not None:
            other = load_quantized(path, model_builder, example_inputs=check_inputs)
        else:
            other = copy.deepcopy(model)
            _, t2, p2 = _read(path)
            _apply_plan(other, p2, t2)
        info.parity = parity(model, other, check_inputs)
    return info


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _expected_bytes(plan: dict) -> int:
    """Σ ceil(n·b/8) + scales (+ PotQ zero masks) + float tensors, from the plan alone."""
    total = 0
    for L in plan["layers"]:
        w = L.get("weight")
        if not w:
            continue
        n, C, b = int(w["numel"]), int(w["channels"]), int(w["code_bits"])
        esize = ref.compute_dtype(_DTYPES[L["dtype"]]).itemsize
        total += (n * b + 7) // 8
        for k in w["tensors"]:
            if k == "zero_mask":
                total += (n + 7) // 8
            elif k != "codes":
                total += C * (b if w["scheme"] == "residual" else 1) * esize
    for f in plan["float_tensors"].values():
        total += math.prod(f["shape"]) * _dtype(f["dtype"]).itemsize
    return total


# ============================================================================ load
def _fail(path, msg):
    raise PackedFormatError(f"{path}: {msg}")


def _read(path: str) -> tuple:
    """(metadata, tensors, plan) of a packed file, validated (format, version, size, checksum)."""
    from safetensors import safe_open

    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, f"not an autoqnn packed file: only {size} bytes (truncated?)")
        n = int.from_bytes(head, "little")
        pickle_like = head[:2] == b"PK" or head[:1] == b"\x80"
        hint = (" (it looks like a zip/pickle file, e.g. from torch.save: this loader never unpickles)"
                if pickle_like else "")
        if n <= 0 or 8 + n > size or n > 100_000_000:
            _fail(path, f"truncated or corrupted: the header claims {n} bytes but the file has {size}{hint}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        _fail(path, f"corrupted header (not JSON: {e}){hint}")
    if not isinstance(header, dict):
        _fail(path, "corrupted header (not a JSON object)")
    try:
        payload = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        _fail(path, "corrupted header (a tensor entry without valid data_offsets)")
    if 8 + n + payload != size:
        _fail(path, f"truncated or corrupted: header + tensors need {8 + n + payload} bytes, the file has {size}")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        _fail(path, "corrupted header (__metadata__ is not an object)")
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        _fail(path, f"not an autoqnn packed file (format {fmt!r}, expected {FORMAT_NAME!r})")
    ver = meta.get("format_version")
    if ver != str(FORMAT_VERSION):
        _fail(path, f"unsupported {FORMAT_NAME} format version {ver!r}; this autoqnn ({_autoqnn_version()}) reads "
                    f"version {FORMAT_VERSION}")
    plan_json = meta.get("plan")
    if not isinstance(plan_json, str):
        _fail(path, "the metadata has no plan")
    try:
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        _fail(path, f"truncated or corrupted safetensors data: {e}")
    if meta.get("payload_sha256") != _digest(plan_json, tensors):
        _fail(path, "checksum mismatch: the plan or tensor data were modified or corrupted")
    try:
        plan = json.loads(plan_json)
    except ValueError as e:
        _fail(path, f"corrupted plan (not JSON): {e}")
    if not isinstance(plan, dict):
        _fail(path, "corrupted plan (not a JSON object)")
    _validate_plan(path, plan, tensors)
    return meta, tensors, plan


def _validate_plan(path, plan, tensors) -> None:
    def need(d, k, typ, where):
        ok = isinstance(d, dict) and k in d and isinstance(d[k], typ) and not (typ is int and isinstance(d[k], bool))
        if not ok:
            _fail(path, f"plan: {where}.{k} is missing or not {getattr(typ, '__name__', typ)}")
        return d[k]

    if plan.get("format") != FORMAT_NAME or plan.get("version") != FORMAT_VERSION:
        _fail(path, f"plan format/version {plan.get('format')!r}/{plan.get('version')!r} does not match "
                    f"{FORMAT_NAME!r}/{FORMAT_VERSION}")
    layers = need(plan, "layers", list, "plan")
    need(plan, "float_tensors", dict, "plan")
    need(plan, "float_vertices", list, "plan")
    need(plan, "aliases", dict, "plan")
    if not isinstance(plan.get("quant_config"), (dict, type(None))):
        _fail(path, "plan: quant_config must be an object or null")
    names = set()
    for i, L in enumerate(layers):
        where = f"layers[{i}]"
        name = need(L, "name", str, where)
        if name in names:
            _fail(path, f"plan: layer '{name}' appears twice")
        names.add(name)
        need(L, "param", str, where)
        shape = need(L, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            _fail(path, f"plan: layer '{name}' has an invalid shape {shape}")
        if need(L, "dtype", str, where) not in _DTYPES:
            _fail(path, f"plan: layer '{name}' has unknown dtype {L['dtype']!r}")
        w, a = L.get("weight"), L.get("activation")
        if w is not None:
            sch = need(w, "scheme", str, where + ".weight")
            try:
                info = scheme_info(sch)
            except ValueError as e:
                _fail(path, f"plan: layer '{name}': {e}")
            b = need(w, "bits", int, where + ".weight")
            cb = need(w, "code_bits", int, where + ".weight")
            if not info.min_bits <= b <= info.max_bits or cb != _code_bits(sch, b):
                _fail(path, f"plan: layer '{name}': bits {b} invalid for scheme '{sch}'")
            n = need(w, "numel", int, where + ".weight")
            if n != math.prod(shape):
                _fail(path, f"plan: layer '{name}': numel {n} does not match shape {shape}")
            pc = need(w, "per_channel", bool, where + ".weight")
            cdim = need(w, "channel_dim", int, where + ".weight")
            if pc and not 0 <= cdim < max(len(shape), 1):
                _fail(path, f"plan: layer '{name}': channel_dim {cdim} out of range for shape {shape}")
            C = shape[cdim] if pc and shape else 1
            if need(w, "channels", int, where + ".weight") != C:
                _fail(path, f"plan: layer '{name}': channels does not match the shape")
            tm = need(w, "tensors", dict, where + ".weight")
            cd = ref.compute_dtype(_DTYPES[L["dtype"]])
            want = {"codes": (torch.uint8, [(n * cb + 7) // 8])}
            for k in SCALE_NAMES[info.name]:
                want[k] = (cd, [C, b] if info.name == "residual" else [C])
            if "zero_mask" in tm and info.name == "pot":
                want["zero_mask"] = (torch.uint8, [(n + 7) // 8])
            if set(tm) != set(want):
                _fail(path, f"plan: layer '{name}': weight tensors {sorted(tm)}, expected {sorted(want)}")
            for k, (dt, shp) in want.items():
                t = tensors.get(tm[k])
                if t is None:
                    _fail(path, f"layer '{name}': tensor '{tm[k]}' is missing from the file")
                if t.dtype != dt or list(t.shape) != shp:
                    _fail(path, f"layer '{name}': tensor '{tm[k]}' is {t.dtype} {list(t.shape)}, expected {dt} {shp}")
        if a is not None:
            sch = need(a, "scheme", str, where + ".activation")
            try:
                info = scheme_info(sch)
            except ValueError as e:
                _fail(path, f"plan: layer '{name}': {e}")
            b = need(a, "bits", int, where + ".activation")
            if not info.multi_bit or not info.min_bits <= b <= info.max_bits:
                _fail(path, f"plan: layer '{name}': activation scheme '{sch}' at {b} bits is invalid")
            p = need(a, "params", list, where + ".activation")
            if len(p) != NUM_PARAMS or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
                _fail(path, f"plan: layer '{name}': activation params must be {NUM_PARAMS} finite numbers")
    for k, f in plan["float_tensors"].items():
        tk = need(f, "tensor", str, f"float_tensors[{k!r}]")
        t = tensors.get(tk)
        if t is None:
            _fail(path, f"float tensor '{k}' ('{tk}') is missing from the file")
        try:
            dt = _dtype(need(f, "dtype", str, f"float_tensors[{k!r}]"))
        except ValueError as e:
            _fail(path, f"float tensor '{k}': {e}")
        if t.dtype != dt or list(t.shape) != need(f, "shape", list, f"float_tensors[{k!r}]"):
            _fail(path, f"float tensor '{k}' is {t.dtype} {list(t.shape)} in the file, the plan says {f['dtype']} "
                        f"{f['shape']}")


def _load_config(path, plan) -> QuantConfig:
    """The fixed-mode config that reproduces the plan's vertices (explicit per-layer overrides)."""
    from .config import LayerOverride

    base = dict(plan.get("quant_config") or {})
    base.pop("overrides", None)
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    d = {k: v for k, v in base.items() if k in known}
    d.update(mode="fixed", learn_bits=False, exclude_first_last=False, quantize_activations=True)
    d["per_channel_weights"] = any(bool(L["weight"] and L["weight"]["per_channel"]) for L in plan["layers"])
    ovs = [LayerOverride(pattern=re.escape(v), exclude=True) for v in plan["float_vertices"]]
    for L in plan["layers"]:
        w, a = L.get("weight"), L.get("activation")
        ovs.append(LayerOverride(
            pattern=re.escape(L["name"]),
            weight_schemes=(w["scheme"],) if w else None, weight_bits=w["bits"] if w else None,
            act_schemes=(a["scheme"],) if a else None, act_bits=a["bits"] if a else None,
            quantize_activation=a is not None))
    d["overrides"] = ovs
    try:
        return QuantConfig(**d)
    except (TypeError, ValueError) as e:
        _fail(path, f"the stored QuantConfig is invalid: {e}")


def _apply_plan(model: nn.Module, plan: dict, tensors: dict, path: str = "<file>") -> None:
    """Put the file's weights, float tensors and activation statistics into a converted model."""
    sites = {s.name: s for s in _find_sites(model)}
    planned = {L["name"]: L for L in plan["layers"]}
    qparam_keys = set()
    pnames = _param_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, L in planned.items():
        s = sites.get(name)
        if s is None:
            _fail(path, f"layer '{name}' of the file is not a quantizing vertex of the model built by model_builder "
                        "(a different architecture? functional call sites need example_inputs=...)")
        if s.param != L["param"]:
            _fail(path, f"layer '{name}': the file's weight is '{L['param']}', the model's is '{s.param}'")
        w_param = params.get(s.param)
        if w_param is None or list(w_param.shape) != list(L["shape"]):
            got = None if w_param is None else list(w_param.shape)
            _fail(path, f"layer '{name}': weight shape {got} in the model, {L['shape']} in the file")
        W, A = L.get("weight"), L.get("activation")
        if W is not None:
            wq = s.wq
            if not isinstance(wq, Quantizer) or wq.scheme != W["scheme"] or wq.int_bits() != W["bits"]:
                _fail(path, f"layer '{name}': the converted model's weight quantizer ({wq!r}) does not match "
                            f"the file ({W['scheme']}-{W['bits']})")
            tm = W["tensors"]
            pw = PackedWeight(W["scheme"], W["code_bits"], tuple(L["shape"]), _DTYPES[L["dtype"]], W["per_channel"],
                              W["channel_dim"], tensors[tm["codes"]],
                              {k: tensors[v] for k, v in tm.items() if k != "codes"})
            deq = dequantize_weight(pw)
            if w_param.dtype != deq.dtype:
                _fail(path, f"layer '{name}': the model's weight is {w_param.dtype}, the file's {deq.dtype}")
            with torch.no_grad():
                w_param.copy_(deq)
            wq.per_channel = W["per_channel"]
            wq.channel_dim = W["channel_dim"]
            wq.enabled = False  # the Parameter holds the quantized values (see the module docstring)
            qparam_keys.update(pnames.get(id(w_param), []))
        elif s.wq is not None:
            setattr(s.holder, s.w_attr, None)
        if A is not None:
            aq = s.aq
            if not isinstance(aq, Quantizer) or aq.scheme != A["scheme"] or aq.int_bits() != A["bits"]:
                _fail(path, f"layer '{name}': the converted model's activation quantizer ({aq!r}) does not "
                            f"match the file ({A['scheme']}-{A['bits']})")
            with torch.no_grad():
                aq.ema_params.copy_(torch.tensor(A["params"], dtype=torch.float64).reshape(aq.ema_params.shape))
                aq.ema_bits.fill_(float(A["bits"]))
                aq.ema_valid.fill_(True)
            aq.ema_momentum = float(A.get("ema_momentum", aq.ema_momentum))
            aq._refresh_from_buffers()
        elif s.aq is not None:
            setattr(s.holder, s.a_attr, None)
    # vertices the converter made that the file leaves float: only where the file has their weight
    floats = plan["float_tensors"]
    for name, s in sites.items():
        if name in planned or (s.wq is None and s.aq is None):
            continue
        if name in plan["float_vertices"] or s.param in floats:
            setattr(s.holder, s.w_attr, None)
            setattr(s.holder, s.a_attr, None)
            continue
        _fail(path, f"the model has a quantizing vertex '{name}' that the file does not describe (a missing "
                    "layer entry: the file was modified, or model_builder builds a different architecture)")
    # float tensors
    state = model.state_dict(keep_vars=True)
    aliases = plan.get("aliases", {})
    sd = {}
    for k in list(floats) + list(aliases):
        src = floats[k] if k in floats else floats.get(aliases[k])
        if src is None:
            _fail(path, f"alias '{k}' points to a tensor the file does not have")
        src = src["tensor"]
        if k not in state:
            _fail(path, f"the file has tensor '{k}' but the model built by model_builder has no such entry")
        t = tensors[src]
        if tuple(t.shape) != tuple(state[k].shape) or t.dtype != state[k].dtype:
            _fail(path, f"tensor '{k}': {t.dtype} {list(t.shape)} in the file, {state[k].dtype} "
                        f"{list(state[k].shape)} in the model")
        sd[k] = t
    qprefixes = _quantizer_prefixes(model)
    missing = [k for k in state
               if k not in sd and k not in qparam_keys and not any(k.startswith(p) for p in qprefixes)]
    if missing:
        _fail(path, f"the file has no value for {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    model.load_state_dict(sd, strict=False)


def load_quantized(path: Union[str, os.PathLike], model_builder: Callable[[], nn.Module], *,
                   example_inputs: Any = None) -> nn.Module:
    """Rebuild a model written by :func:`export_packed`.

    ``model_builder()`` returns the float architecture; it is converted with
    :func:`autoqnn.qag.convert` in fixed mode with the file's per-layer schemes and bits, then
    receives the dequantized weights, the float tensors and the activation EMA parameters. The
    model comes back in eval mode and computes what the exported model computed.

    Args:
        example_inputs: passed to ``convert``; needed when functional call sites are quantized in
            a model torch.fx cannot trace.

    Raises:
        PackedFormatError: wrong format or version, truncated or corrupted file, or a file that
            does not fit the architecture.
    """
    from .qag import convert

    path = os.fspath(path)
    _, tensors, plan = _read(path)
    model = model_builder()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_builder must return an nn.Module, got {type(model).__name__}")
    cfg = _load_config(path, plan)
    model, _ = convert(model, cfg, example_inputs, inplace=True)
    _apply_plan(model, plan, tensors, path)
    return model.eval()


# ============================================================================ parity
def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _compare(a: list, b: list) -> dict:
    if len(a) != len(b):
        raise ValueError(f"the models return {len(a)} and {len(b)} tensors")
    tot, n, mx, eq = 0.0, 0, 0.0, True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {list(x.shape)} vs {list(y.shape)}")
        x = x.detach().to("cpu", torch.float64)
        y = y.detach().to("cpu", torch.float64)
        eq = eq and torch.equal(x, y)
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = torch.where(both_nan, 0.0, (x - y).abs())
        d = torch.where(torch.isnan(d), math.inf, d)
        if d.numel():
            mx = max(mx, float(d.max()))
            tot += float(d.sum())
            n += d.numel()
    return {"max_abs": mx, "mean_abs": tot / n if n else 0.0, "numel": n, "equal": bool(eq)}


def parity(model_a: nn.Module, model_b: nn.Module, inputs) -> dict:
    """``{max_abs, mean_abs, numel, equal}`` between two models' outputs on ``inputs`` (a tensor
    or a tuple). Both run in eval mode under ``no_grad`` (their modes are restored after)."""
    args = _as_tuple(inputs)
    modes = [(m, m.training) for m in (model_a, model_b)]
    try:
        with torch.no_grad():
            model_a.eval()
            model_b.eval()
            oa = _flatten(model_a(*args))
            ob = _flatten(model_b(*args))
    finally:
        for m, t in modes:
            m.train(t)
    return _compare(oa, ob)


# ============================================================================ ONNX
class ExportableActQuant(nn.Module):
    """A frozen activation quantizer (eval, EMA parameters) written with ONNX-exportable ops; it
    computes exactly what the :class:`~autoqnn.nn.Quantizer` computes at eval (finite inputs; NaN
    passes through as in the quantizer). ``mode`` is ``"qdq"`` (FixedQ as QuantizeLinear/
    DequantizeLinear) or ``"plain-ops"``."""

    def __init__(self, scheme: str, bits: int, params: torch.Tensor, cd: torch.dtype = torch.float32):
        super().__init__()
        info = scheme_info(scheme)
        self.scheme, self.bits, self.cd = info.name, int(bits), cd
        p = params.detach().to("cpu", cd).reshape(-1)
        self.p = [float(v) for v in p.tolist()]
        b = self.bits
        self.const = None
        scale = self.p[1] if info.name == "zoom" else self.p[0]
        if info.name in ("fixed", "zoom", "clip", "pot") and not scale > 0:
            # a zero scale: the reference's safe division gives u = 0 everywhere
            self.const = self.p[0] if info.name == "zoom" else 0.0
        self.mode = "plain-ops"
        if self.const is None and info.name == "fixed" and cd == torch.float32:
            m, e = math.frexp(scale)
            if m == 0.5 and -125 <= e - 1 <= 120:  # a normal power of two with an exact reciprocal
                self.mode = "qdq"
        for i, v in enumerate(self.p):
            self.register_buffer(f"p{i}", torch.tensor(v, dtype=cd), persistent=False)
        if info.name == "residual":
            for i in range(b):
                self.register_buffer(f"n{i}", torch.tensor(-self.p[i], dtype=cd), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.scheme}-{self.bits}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x if x.dtype == self.cd else x.to(self.cd)
        b, name = self.bits, self.scheme
        lim = 2 ** (b - 1)
        if self.const is not None:
            q = torch.zeros_like(xc) + self.const
        elif name == "fixed" and self.mode == "qdq":
            step = self.p[0]
            if not torch.onnx.is_in_onnx_export():
                # saturates the same; torch 2.6's kernel maps |x/step| past int64 (1e30) to -128
                xc = torch.clamp(xc, -129 * step, 128 * step)
            q = torch.fake_quantize_per_tensor_affine(xc, step, 0, -128, 127)
            if b < 8:
                q = torch.clamp(q, -lim * step, (lim - 1) * step)
        elif name == "fixed":
            q = torch.clamp(torch.round(xc / self.p0), -lim, lim - 1) * self.p0
        elif name == "clip":
            k = torch.clamp(torch.round(xc / self.p0 - 0.5), -lim, lim - 1)
            q = self.p0 * (k + 0.5)
        elif name == "zoom":
            k = torch.clamp(torch.floor((xc - self.p0) / self.p1), 0, 2**b - 1)
            q = self.p0 + self.p1 * (k + 0.5)
        elif name == "pot":
            u = xc / self.p0
            a = u.abs()
            mag = torch.full_like(a, 0.5)
            f64 = self.cd == torch.float64
            for j in range(1, lim):
                thr = (_SQRT_HALF_F64 if f64 else _SQRT_HALF_F32) * 2.0**j
                hit = (a >= thr) if f64 else (a > thr)
                mag = torch.where(hit, torch.full_like(a, 2.0**j), mag)
            q = self.p0 * torch.sign(u) * mag
        elif name == "residual":
            r = xc
            q = None
            for i in range(b):
                s = torch.where(r > 0, getattr(self, f"p{i}"), getattr(self, f"n{i}"))
                q = s if q is None else q + s
                r = r - s
        else:  # pragma: no cover - activations use the 5 multi-bit schemes
            raise AssertionError(name)
        q = torch.where(torch.isnan(xc), xc, q)
        return q if q.dtype == x.dtype else q.to(x.dtype)


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"export_onnx needs the 'onnx' and 'onnxruntime' packages ({e}); install them with "
                          "`pip install onnx onnxruntime` or `pip install autoqnn[export]`") from None
    return onnx, onnxruntime


def onnx_replica(model: nn.Module) -> tuple:
    """(an eval copy of ``model`` whose quantized weights hold their dequantized values, without
    weight quantizers, and whose activation quantizers are :class:`ExportableActQuant`; the
    mapping ``{layer: {"weight": "const-weight" | "float", "activation": "qdq" | "plain-ops" |
    "none"}}``)."""
    plan, tensors, _, _ = _collect(model, None, None)
    m = copy.deepcopy(model)
    _apply_plan(m, plan, tensors)
    sites = {s.name: s for s in _find_sites(m)}
    mapping = {}
    for L in plan["layers"]:
        s = sites[L["name"]]
        entry = {"weight": "float", "activation": "none"}
        if L["weight"] is not None:
            setattr(s.holder, s.w_attr, None)  # the Parameter already holds the dequantized values
            entry["weight"] = "const-weight"
        A = L["activation"]
        if A is not None:
            aq = s.aq
            p = _fix_fixed_step(aq.ema_params.detach().to("cpu"), aq._sids, [A["bits"]])[0, 0]
            dev = aq.ema_params.device
            new = ExportableActQuant(A["scheme"], A["bits"], p, ref.compute_dtype(_dtype(L["dtype"]))).to(dev)
            setattr(s.holder, s.a_attr, new)
            entry["activation"] = new.mode
        mapping[L["name"]] = entry
    return m.eval(), mapping


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], example_inputs, *, opset: int = 17,
                check: bool = True, atol: float = 1e-4, dynamic_batch: bool = False) -> dict:
    """Export a finalized model to ONNX (weights as constant dequantized tensors, activation
    quantizers as exact Q/DQ or plain-op subgraphs; see the module docstring).

    With ``check`` the file is run under onnxruntime (CPUExecutionProvider) on ``example_inputs``
    and compared with ``model`` (eval): a max |diff| above ``atol`` raises :class:`ExportError`
    and nothing is written. The file is written atomically.

    Returns:
        ``{"path", "opset", "layers": {layer: {"weight": "const-weight" | "float",
        "activation": "qdq" | "plain-ops" | "none"}}, "torch_replica": parity of the exportable
        replica with the model, "onnxruntime": parity of onnxruntime with the model (or None),
        "onnx_bytes"}``.
    """
    onnx, ort = _require_onnx()
    path = os.fspath(path)
    args = _as_tuple(example_inputs)
    replica, mapping = onnx_replica(model)
    result = {"path": path, "opset": int(opset), "layers": mapping, "onnxruntime": None}
    result["torch_replica"] = parity(model, replica, args)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref_out = _flatten(model(*args))
    finally:
        model.train(was)
    in_names = [f"input_{i}" for i in range(len(args))]
    out_names = [f"output_{i}" for i in range(len(ref_out))]
    kw = dict(opset_version=int(opset), input_names=in_names, output_names=out_names, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kw["dynamo"] = False
    if dynamic_batch:
        kw["dynamic_axes"] = {n: {0: "batch"} for n in in_names + out_names}

    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(replica, args, tmp, **kw)
        onnx.checker.check_model(tmp)
        if check:
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            feeds = {n: a.detach().to("cpu").numpy() for n, a in zip(in_names, args)}
            outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
            result["onnxruntime"] = _compare(ref_out, outs)
            result["onnxruntime"]["version"] = ort.__version__
            if not result["onnxruntime"]["max_abs"] <= atol:
                raise ExportError(f"onnxruntime output differs from the model: max |diff| "
                                  f"{result['onnxruntime']['max_abs']:.3g} > atol {atol}")

    _atomic_write(path, write)
    result["onnx_bytes"] = os.path.getsize(path)
    return result
