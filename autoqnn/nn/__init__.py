# SPDX-License-Identifier: MIT
"""``autoqnn.nn``: quantizer modules and drop-in quantized layers."""
from __future__ import annotations

from typing import Iterator, Tuple

from torch import nn

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
