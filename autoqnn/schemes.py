# SPDX-License-Identifier: MIT
"""The eight AutoQNN quantizing schemes: names, ids, bit ranges and constants.

Everything here is data and validation; the math lives in :mod:`autoqnn.ops.reference`
(the oracle) and in the kernels. The constants are SPEC.md's decisions table:

=============  ======  ========  =====================================================
scheme         id      bits      rule (per tensor, or per output channel)
=============  ======  ========  =====================================================
``binary``     0       1         y = α·sgn(x), α = mean|x|, x ≤ 0 → −1
``ternary``    1       2         TWN: Δ = 0.7·mean|x|, α = mean|x| over |x| > Δ
``quaternary`` 2       2         v = clip(round(x/s), −2, 1), s = 0.9957σ, α = ⟨x,v⟩/⟨v,v⟩
``fixed``      3       2..8      step 2^(⌊log2 max|x|⌋ − (b − 2)), clipped b-bit code
``residual``   4       2..8      b greedy residual binarisations, α_i = mean|r_i|
``zoom``       5       2..8      2^b bin mid-points of [min x, max x]
``clip``       6       2..8      mid-rise, step λ_b·σ, clipped STE
``pot``        7       2..4      powers of two ±{½, 2, 4, …}·λ^P_b·σ
=============  ======  ========  =====================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

__all__ = [
    "SCHEMES",
    "SchemeInfo",
    "WEIGHT_CANDIDATES",
    "ACTIVATION_CANDIDATES",
    "CLIPQ_LAMBDA",
    "POTQ_LAMBDA",
    "NUM_PARAMS",
    "scheme_id",
    "scheme_info",
    "scheme_name",
    "resolve_bits",
    "clamp_bits",
    "bits_scale_factor",
]

#: ClipQ step/σ (MSE-optimal uniform mid-rise step for N(0,1)), SPEC 2.7; index = bits.
CLIPQ_LAMBDA = {2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
#: Quaternary's grid step is ClipQ's 2-bit λ (SPEC 2.3).
QUATERNARY_LAMBDA = 0.9957
#: Ternary threshold factor (TWN), SPEC 2.2.
TERNARY_DELTA = 0.7
#: PotQ α/σ, the author's constants (SPEC 2.8); index = bits.
POTQ_LAMBDA = {2: 0.9, 3: 0.4, 4: 0.03}
#: Number of per-channel parameter slots in a ``scheme_params`` tensor ([K, C, NUM_PARAMS]).
#: ResQ needs b + 1 ≤ 9 of them (α_1..α_{b+1}; the last one feeds the bitwidth gradient).
NUM_PARAMS = 12


@dataclass(frozen=True)
class SchemeInfo:
    name: str
    id: int
    min_bits: int
    max_bits: int
    default_bits: int
    letter: str  # the paper's one-letter tag (B, T, Q, F, R, Z, C, P)
    identity_ste: bool  # False only for ClipQ (masked STE)

    @property
    def multi_bit(self) -> bool:
        return self.max_bits > self.min_bits

    @property
    def bits_range(self) -> str:
        if self.min_bits == self.max_bits:
            return str(self.min_bits)
        return f"{self.min_bits}..{self.max_bits}"


_INFOS = (
    SchemeInfo("binary", 0, 1, 1, 1, "B", True),
    SchemeInfo("ternary", 1, 2, 2, 2, "T", True),
    SchemeInfo("quaternary", 2, 2, 2, 2, "Q", True),
    SchemeInfo("fixed", 3, 2, 8, 3, "F", True),
    SchemeInfo("residual", 4, 2, 8, 3, "R", True),
    SchemeInfo("zoom", 5, 2, 8, 3, "Z", True),
    SchemeInfo("clip", 6, 2, 8, 3, "C", False),
    SchemeInfo("pot", 7, 2, 4, 3, "P", True),
)

#: name -> SchemeInfo, in id order.
SCHEMES = {s.name: s for s in _INFOS}
_BY_ID = {s.id: s for s in _INFOS}
_ALIASES = {
    "b": "binary", "t": "ternary", "q": "quaternary", "f": "fixed", "r": "residual",
    "z": "zoom", "c": "clip", "p": "pot",
    "fixedq": "fixed", "resq": "residual", "zoomq": "zoom", "clipq": "clip", "potq": "pot",
}

#: Default candidate sets (SPEC decisions): all 8 for weights, the multi-bit 5 for activations.
WEIGHT_CANDIDATES = tuple(s.name for s in _INFOS)
ACTIVATION_CANDIDATES = ("fixed", "residual", "zoom", "clip", "pot")


def scheme_info(scheme: Union[str, int, SchemeInfo]) -> SchemeInfo:
    """Look a scheme up by API name, paper letter/alias (``"C"``, ``"clipq"``) or id."""
    if isinstance(scheme, SchemeInfo):
        return scheme
    if isinstance(scheme, bool):
        raise TypeError(f"scheme must be a name or an id, got {scheme!r}")
    if isinstance(scheme, int):
        try:
            return _BY_ID[scheme]
        except KeyError:
            raise ValueError(f"unknown scheme id {scheme}; valid ids are 0..{len(_INFOS) - 1}") from None
    if isinstance(scheme, str):
        key = scheme.strip().lower()
        key = _ALIASES.get(key, key)
        try:
            return SCHEMES[key]
        except KeyError:
            raise ValueError(
                f"unknown scheme {scheme!r}; valid schemes are {', '.join(SCHEMES)}"
            ) from None
    raise TypeError(f"scheme must be a name or an id, got {type(scheme).__name__}")


def scheme_id(scheme) -> int:
    return scheme_info(scheme).id


def scheme_name(scheme) -> str:
    return scheme_info(scheme).name


def _check_int_bits(info: SchemeInfo, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or isinstance(bits, float) and (
        not math.isfinite(bits) or bits != int(bits)
    ):
        raise ValueError(
            f"bits for scheme '{info.name}' must be an integer in {info.bits_range}, got {bits!r}"
        )
    b = int(bits)
    if not info.min_bits <= b <= info.max_bits:
        raise ValueError(
            f"bits={b} is outside the range of scheme '{info.name}' ({info.bits_range} bits)"
        )
    return b


def resolve_bits(schemes: Sequence, bits) -> list[int]:
    """Integer bits per candidate, validated strictly (never a silent clamp).

    ``bits`` may be ``None`` (each scheme's default), one integer (applied to every multi-bit
    scheme; Binary/Ternary/Quaternary keep their fixed 1/2/2 bits, as in SPEC 3) or one integer
    per scheme. Raises ``ValueError`` naming the scheme and its range.
    """
    infos = [scheme_info(s) for s in schemes]
    if bits is None:
        return [i.default_bits for i in infos]
    if isinstance(bits, bool):
        raise ValueError(
            f"bits must be an integer, got {bits!r}; ranges: "
            + ", ".join(f"'{i.name}' {i.bits_range}" for i in infos)
        )
    if isinstance(bits, (int, float)):
        out = []
        for i in infos:
            if i.multi_bit or len(infos) == 1:
                out.append(_check_int_bits(i, bits))
            else:
                out.append(i.min_bits)
        return out
    bits = list(bits)
    if len(bits) != len(infos):
        raise ValueError(f"got {len(bits)} bit values for {len(infos)} schemes")
    return [_check_int_bits(i, b) for i, b in zip(infos, bits)]


def clamp_bits(scheme, b: float) -> int:
    """The integer bitwidth a learned real ``b`` means in the forward (SPEC 4.1):
    ``clip(round(b), b_min, b_max)``, rounding half to even like ``torch.round``."""
    info = scheme_info(scheme)
    if not math.isfinite(b):
        raise ValueError(f"learned bits for scheme '{info.name}' must be finite, got {b}")
    return int(min(max(round(b), info.min_bits), info.max_bits))


def bits_scale_factor(b: int) -> float:
    """∂α/∂b · 1/α = −ln2·2^b/(2^b − 1) (SPEC 4.1)."""
    p = 2.0 ** b
    return -math.log(2.0) * p / (p - 1.0)


def names(schemes: Iterable) -> list[str]:
    return [scheme_name(s) for s in schemes]
