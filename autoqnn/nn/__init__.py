# SPDX-License-Identifier: MIT
"""``autoqnn.nn``: quantizer modules and drop-in quantized layers."""
from __future__ import annotations

from typing import Iterator, Tuple

from torch import nn

from .. import functional as _AF

from .layers import (  # noqa: F401
    FLOAT_TO_QUANT,
    QUANT_LAYERS,
    QConv1d,
    QConv2d,
    QConv3d,
    QConvTranspose1d,
    QConvTranspose2d,
    QConvTranspose3d,
    QLinear,
    QuantLayerMixin,
)
from .attention import QMultiheadAttention  # noqa: F401
from .quantizers import Quantizer, QuantizerBase, SchemeMixture  # noqa: F401
from .batching import WeightBatcher  # noqa: F401

__all__ = [
    "Quantizer", "SchemeMixture", "QuantizerBase", "QConv1d", "QConv2d", "QConv3d",
    "QConvTranspose1d", "QConvTranspose2d", "QConvTranspose3d", "QLinear", "QUANT_LAYERS",
    "FLOAT_TO_QUANT", "QuantLayerMixin", "QMultiheadAttention", "quantizers", "set_quant_enabled", "WeightBatcher",
    "bits_on_host", "refresh_host_bits", "use_host_bits",
]


def quantizers(model: nn.Module) -> Iterator[Tuple[str, QuantizerBase]]:
    """Every quantizing vertex of a model, with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizerBase):
            yield name, m


def set_quant_enabled(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every quantizer on or off (off: the converted model computes the float model)."""
    for _, q in quantizers(model):
        q.enabled = bool(enabled)
    return model


def bits_on_host(model: nn.Module):
    """:func:`autoqnn.functional.bits_on_host` for every learned bitwidth of ``model`` (the QPL
    phase): inside the block, its quantizers read the bits from host copies taken at entry in
    one transfer, so a training step on a GPU does not synchronise the stream once or more per
    quantizer. Use it around forward and backward, not around the optimizer step::

        with autoqnn.nn.bits_on_host(model):
            loss_fn(model(x), y).backward()
        opt.step()
    """
    return _AF.bits_on_host(*[q.bits for _, q in quantizers(model) if isinstance(q, Quantizer) and q.learn_bits])


def _learned_bit_quantizers(model: nn.Module) -> list:
    return [q for _, q in quantizers(model) if isinstance(q, Quantizer) and q.learn_bits]


def refresh_host_bits(model: nn.Module) -> int:
    """Give every learned bitwidth of ``model`` a host copy of its ``clip(round(b))``, read in
    one device-to-host transfer per device (one stream sync), and return how many there are.

    The copies are what a model compiled by :func:`autoqnn.compile_model` quantizes with: its
    forward calls this first, so the graph's ops read the bits on the host instead of
    synchronising the GPU stream in each of them. A copy whose value did not change is left
    as it is (the same tensor, unmodified: a backward still to come keeps what it saved)."""
    qs = _learned_bit_quantizers(model)
    _refresh(qs)
    return len(qs)


def _refresh(qs: list) -> None:
    import torch  # noqa: PLC0415

    by_device: dict = {}
    for q in qs:
        by_device.setdefault(q.bits.device, []).append(q)
    with torch.no_grad():
        for group in by_device.values():
            # integers (or NaN/±Inf): exact in float64, whatever the bits' dtype
            vals = torch.stack([q._rounded_bits().reshape(-1).double() for q in group]).to("cpu")
            for q, v in zip(group, vals.tolist()):
                cur = q.__dict__.get("_bits_mirror")
                if cur is None or cur.shape != q.bits.shape or cur.dtype != q.bits.dtype:
                    q.__dict__["_bits_mirror"] = torch.tensor(v[0], dtype=q.bits.dtype).reshape(q.bits.shape)
                elif cur.item() != v[0]:  # NaN never equals: written again (the ops reject it)
                    cur.fill_(v[0])


def use_host_bits(compiled: nn.Module, model: nn.Module):
    """Hooks on ``compiled`` (``torch.compile(model)`` or any module that runs ``model``):
    before each forward, refresh the host copies of ``model``'s learned bitwidths
    (:func:`refresh_host_bits`) and arm them; after it (also when it raises), disarm them.
    While armed, those quantizers hand the kernels the host copies (``bits_host``), eagerly and
    in a traced graph, which then takes them as inputs. Disarmed, they read the device bits as
    before (a graph traced disarmed is a different graph: Dynamo guards on the flag). The
    quantizers are the learned-bits ones of ``model`` now; one added later (``fix_schemes``
    after this call) is never armed and reads its device bits. Returns the two hook handles.

    The hooks run outside the compiled region (they are ``compiled``'s, not ``model``'s)."""
    qs = _learned_bit_quantizers(model)

    def arm(_mod, _args):
        _refresh(qs)
        for q in qs:
            q.__dict__["_host_armed"] = True

    def disarm(_mod, _args, _out):
        for q in qs:
            q.__dict__["_host_armed"] = False

    return (compiled.register_forward_pre_hook(arm),
            compiled.register_forward_hook(disarm, always_call=True))
