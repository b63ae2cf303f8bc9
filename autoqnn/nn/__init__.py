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
    "bits_on_host",
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
