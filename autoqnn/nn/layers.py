# SPDX-License-Identifier: MIT
"""Drop-in quantized twins of the expensive layers: same constructor signature and the same
``state_dict`` keys as the float module, plus ``weight_quant.*`` and ``act_quant.*`` for the
quantizer state. The weight quantizer sees the weight, the activation quantizer the layer's
input (SPEC 5.1: a quantizing vertex on each edge into an expensive vertex); biases stay float.

>>> from autoqnn.nn import QConv2d, SchemeMixture
>>> conv = QConv2d(16, 32, 3, padding=1,
...                weight_quant=SchemeMixture(kind="weight"),
...                act_quant=SchemeMixture(kind="activation"))
>>> y = conv(torch.randn(2, 16, 8, 8))
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QConv1d", "QConv2d", "QConv3d", "QConvTranspose1d", "QConvTranspose2d", "QConvTranspose3d",
    "QLinear", "QUANT_LAYERS", "FLOAT_TO_QUANT", "QuantLayerMixin", "rebind",
]


def rebind(src: nn.Module, cls: type, modules: Optional[dict] = None) -> nn.Module:
    """A ``cls`` instance sharing ``src``'s attributes, Parameters and buffers (no copy, no
    re-initialisation); ``modules`` replaces its children (default: the same children)."""
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    for k, v in src.__dict__.items():
        if k not in ("_parameters", "_buffers", "_modules"):
            out.__dict__[k] = v
    out._parameters = dict(src._parameters)
    out._buffers = dict(src._buffers)
    out._modules = dict(src._modules) if modules is None else dict(modules)
    return out


class QuantLayerMixin:
    """Holds ``weight_quant`` and ``act_quant`` (either may be None = not quantized)."""

    _float_cls: type = nn.Module
    weight_channel_dim = 0

    def _set_quantizers(self, weight_quant: Optional[nn.Module], act_quant: Optional[nn.Module]):
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        if weight_quant is not None and getattr(weight_quant, "per_channel", False):
            weight_quant.channel_dim = self.weight_channel_dim

    def _qweight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def _qinput(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    @classmethod
    def from_float(cls, mod: nn.Module, weight_quant: Optional[nn.Module] = None,
                   act_quant: Optional[nn.Module] = None):
        """The quantized twin of ``mod``, sharing its weight and bias Parameters (so optimizer
        state and parameter identity survive the swap)."""
        if not isinstance(mod, cls._float_cls) or type(mod).forward is not cls._float_cls.forward:
            raise TypeError(f"{cls.__name__}.from_float expects a {cls._float_cls.__name__} (or a subclass "
                            f"that keeps its forward), got {type(mod).__name__}")
        q = rebind(mod, cls)
        q._set_quantizers(weight_quant, act_quant)
        return q

    def to_float(self) -> nn.Module:
        """The float module with the same (unquantized) weight and bias Parameters."""
        f = rebind(self, self._float_cls,
                   {k: v for k, v in self._modules.items() if k not in ("weight_quant", "act_quant")})
        return f


def _conv_cls(base):
    class _QConv(QuantLayerMixin, base):
        _float_cls = base

        def __init__(self, *args, weight_quant: Optional[nn.Module] = None,
                     act_quant: Optional[nn.Module] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._set_quantizers(weight_quant, act_quant)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(self._qinput(input), self._qweight(), self.bias)

    _QConv.__name__ = _QConv.__qualname__ = "Q" + base.__name__
    _QConv.__doc__ = f"Quantized {base.__name__}: drop-in twin with ``weight_quant`` and ``act_quant``."
    return _QConv


QConv1d = _conv_cls(nn.Conv1d)
QConv2d = _conv_cls(nn.Conv2d)
QConv3d = _conv_cls(nn.Conv3d)


def _convt_cls(base, fn, nd):
    class _QConvT(QuantLayerMixin, base):
        _float_cls = base
        weight_channel_dim = 1  # ConvTranspose weights are [in, out/groups, ...]

        def __init__(self, *args, weight_quant: Optional[nn.Module] = None,
                     act_quant: Optional[nn.Module] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._set_quantizers(weight_quant, act_quant)

        def forward(self, input: torch.Tensor, output_size=None) -> torch.Tensor:
            if self.padding_mode != "zeros":
                raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
            output_padding = self._output_padding(
                input, output_size, self.stride, self.padding, self.kernel_size, nd, self.dilation)
            return fn(self._qinput(input), self._qweight(), self.bias, self.stride, self.padding,
                      output_padding, self.groups, self.dilation)

    _QConvT.__name__ = _QConvT.__qualname__ = "Q" + base.__name__
    _QConvT.__doc__ = f"Quantized {base.__name__}: drop-in twin with ``weight_quant`` and ``act_quant``."
    return _QConvT


QConvTranspose1d = _convt_cls(nn.ConvTranspose1d, F.conv_transpose1d, 1)
QConvTranspose2d = _convt_cls(nn.ConvTranspose2d, F.conv_transpose2d, 2)
QConvTranspose3d = _convt_cls(nn.ConvTranspose3d, F.conv_transpose3d, 3)


class QLinear(QuantLayerMixin, nn.Linear):
    """Quantized Linear: drop-in twin with ``weight_quant`` and ``act_quant``."""

    _float_cls = nn.Linear

    def __init__(self, *args, weight_quant: Optional[nn.Module] = None,
                 act_quant: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_quantizers(weight_quant, act_quant)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self._qinput(input), self._qweight(), self.bias)


QUANT_LAYERS = (QConv1d, QConv2d, QConv3d, QConvTranspose1d, QConvTranspose2d, QConvTranspose3d, QLinear)
#: float class -> quantized twin
FLOAT_TO_QUANT = {q._float_cls: q for q in QUANT_LAYERS}
