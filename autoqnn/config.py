# SPDX-License-Identifier: MIT
"""Quantization configuration: what QAG inserts and how each quantizer behaves.

Every knob has SPEC.md's documented default; :meth:`QuantConfig.to_dict` gives a JSON-able copy
saved with every result, :meth:`QuantConfig.from_dict` validates one back with clear messages.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .schemes import ACTIVATION_CANDIDATES, WEIGHT_CANDIDATES, scheme_info

__all__ = ["QuantConfig", "LayerOverride", "DEFAULT_LAYER_TYPES"]

#: Expensive vertex types quantized by default (SPEC 5.1): class names of torch.nn modules.
DEFAULT_LAYER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                       "ConvTranspose3d", "Linear")


@dataclass
class LayerOverride:
    """Per-layer settings for modules whose qualified name matches ``pattern`` (a regex, matched
    with ``re.fullmatch``; a plain name matches itself). ``None`` keeps the global value."""

    pattern: str
    exclude: bool = False
    weight_schemes: Optional[Sequence[str]] = None
    act_schemes: Optional[Sequence[str]] = None
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    quantize_activation: Optional[bool] = None

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass
class QuantConfig:
    """What :func:`autoqnn.qag.convert` builds.

    ``mode``: ``"search"`` gives every vertex a QSS :class:`~autoqnn.nn.SchemeMixture` over the
    candidate sets (SPEC 3); ``"fixed"`` gives a single :class:`~autoqnn.nn.Quantizer` with
    ``weight_schemes[0]`` / ``act_schemes[0]``. ``learn_bits`` makes the bitwidths parameters
    (QPL, SPEC 4.1).
    """

    mode: str = "search"
    weight_schemes: Sequence[str] = WEIGHT_CANDIDATES
    act_schemes: Sequence[str] = ACTIVATION_CANDIDATES
    weight_bits: int = 3
    act_bits: int = 3
    learn_bits: bool = False
    per_channel_weights: bool = False
    quantize_activations: bool = True
    granularity: str = "fine"  # "fine": one θ per vertex; "coarse": one θ for all W, one for all A
    tau0: float = 5.0
    gamma: float = 1.0
    tau_min: float = 1e-3
    eval_selection: str = "argmax"  # mixture at eval: "argmax" (the decision) or "soft"
    ema_momentum: float = 0.9
    exclude_first_last: bool = True
    layer_types: Sequence[str] = DEFAULT_LAYER_TYPES
    functional: bool = True  # also quantize F.conv*/F.linear calls
    overrides: list = field(default_factory=list)
    backend: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "QuantConfig":
        if self.mode not in ("search", "fixed"):
            raise ValueError(f"QuantConfig.mode must be 'search' or 'fixed', got {self.mode!r}")
        if self.granularity not in ("fine", "coarse"):
            raise ValueError(f"QuantConfig.granularity must be 'fine' or 'coarse', got {self.granularity!r}")
        if self.eval_selection not in ("argmax", "soft"):
            raise ValueError(f"QuantConfig.eval_selection must be 'argmax' or 'soft', got {self.eval_selection!r}")
        for name in ("weight_schemes", "act_schemes"):
            val = list(getattr(self, name))
            if not val:
                raise ValueError(f"QuantConfig.{name} must name at least one scheme")
            setattr(self, name, tuple(scheme_info(s).name for s in val))
        for s in self.act_schemes:
            if not scheme_info(s).multi_bit:
                raise ValueError(
                    f"QuantConfig.act_schemes: '{s}' is not used for activations (SPEC: binary, "
                    "ternary and quaternary are weight-only)"
                )
        for name in ("weight_bits", "act_bits"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
                raise ValueError(f"QuantConfig.{name} must be an integer in 1..8, got {b!r}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"QuantConfig.ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.tau0 <= 0 or self.tau_min <= 0 or self.gamma <= 0:
            raise ValueError("QuantConfig.tau0, tau_min and gamma must be positive")
        ovs = []
        for o in self.overrides:
            if isinstance(o, dict):
                o = LayerOverride(**o)
            if not isinstance(o, LayerOverride):
                raise TypeError(f"QuantConfig.overrides entries must be LayerOverride or dict, got {type(o).__name__}")
            try:
                re.compile(o.pattern)
            except re.error as e:
                raise ValueError(f"override pattern {o.pattern!r} is not a valid regex: {e}") from None
            ovs.append(o)
        self.overrides = ovs
        return self

    def override_for(self, name: str) -> Optional[LayerOverride]:
        """The last override matching ``name`` (later entries win), or None."""
        hit = None
        for o in self.overrides:
            if o.matches(name):
                hit = o
        return hit

    def temperature(self, epoch: float, epochs: float) -> float:
        """τ(e) = τ0·(1 − e/E)^γ floored at tau_min (SPEC 3)."""
        frac = min(max(epoch / max(epochs, 1e-12), 0.0), 1.0)
        return max(self.tau0 * (1.0 - frac) ** self.gamma, self.tau_min)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_schemes"] = list(self.weight_schemes)
        d["act_schemes"] = list(self.act_schemes)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig option(s): {', '.join(unknown)}")
        return cls(**d)
