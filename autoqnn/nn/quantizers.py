# SPDX-License-Identifier: MIT
"""Quantizer modules: the quantizing vertices QAG inserts (SPEC 5.1).

* :class:`Quantizer` - one scheme; bits fixed or learnable (QPL, SPEC 4.1).
* :class:`SchemeMixture` - the QSS vertex (SPEC 3): y = Σ_k m_k·q_k(x), m = softmax((θ + g)/τ).

Everything a search decides or needs to resume lives in parameters and buffers (θ, bits, the
temperature, the Gumbel step counter and seed, activation EMA statistics, the chosen scheme), so
it survives ``state_dict``, ``deepcopy``, DDP broadcast and ``torch.compile``. Python-side copies
of scalar buffers avoid a host read (a GPU sync) on every forward; ``load_state_dict`` refreshes
them.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import functional as AF
from ..ops.reference import frexp as ref_frexp
from ..ops.reference import uniform48_ref as ref_uniform48
from ..ops import has_kernel
from ..schemes import NUM_PARAMS, clamp_bits, resolve_bits, scheme_info

__all__ = ["Quantizer", "SchemeMixture", "QuantizerBase"]

_KINDS = ("weight", "activation")


def _fix_fixed_step(params: torch.Tensor, sids: Sequence[int], bits: Sequence[int]) -> torch.Tensor:
    """After an EMA of params, FixedQ's step must again be a power of two: re-derive it from the
    averaged max|x| kept in slot 1 (e = ⌊log2 max|x|⌋ − (b − 2), SPEC 2.4)."""
    out = params
    for k, (sid, b) in enumerate(zip(sids, bits)):
        if scheme_info(sid).name == "fixed":
            if out is params:
                out = params.clone()
            ma = out[k, :, 1]
            _, e = ref_frexp(ma)
            step = torch.ldexp(torch.ones_like(ma), (e + 1 - b).to(ma.dtype))
            out[k, :, 0] = torch.where(ma > 0, step, 0)
    return out


def _dist_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


#: steps of Gumbel noise an eager forward computes at once: the noise of step s is row
#: s % NOISE_BLOCK of the block s // NOISE_BLOCK, kept on the module's device. One computation and
#: one host-to-device copy per NOISE_BLOCK steps instead of per step.
NOISE_BLOCK = 256

def _uniform48(seed: torch.Tensor, steps: torch.Tensor, k: int) -> torch.Tensor:
    """The noise's 48-bit integers (``autoqnn::uniform48``). Traced, the op is kept (one opaque
    call) where a C++/CUDA kernel serves the device; elsewhere the reference's int64 ops are traced
    and fused by the compiler (same integers, at a cost in compile time)."""
    if torch.compiler.is_compiling() and not has_kernel("uniform48", steps.device.type.upper()):
        return ref_uniform48(seed, steps, k)
    return torch.ops.autoqnn.uniform48(seed, steps, k)


def gumbel_noise(seed: torch.Tensor, steps: torch.Tensor, k: int) -> torch.Tensor:
    """Gumbel(0, 1) noise as a pure function of (seed, step, candidate): float32 ``[*steps.shape, k]``
    on ``steps``' device.

    A counter-based generator: two 32-bit hashes of (seed, step, candidate) give a 48-bit integer n
    (``autoqnn::uniform48``, :func:`autoqnn.ops.reference.uniform48_ref`), u = (n + ½)·2^-48 in
    (0, 1) and g = -log(-log u) in float64. The eager forward (a block of steps at a time) and a
    ``torch.compile``-d forward (one step, read from the ``step`` buffer inside the graph: no
    Python counter, no recompile per step) compute the same noise, on every device and every DDP
    rank.
    """
    n = _uniform48(seed, steps, k).to(torch.float64)  # exact: < 2^48
    u01 = (n + 0.5) * (2.0 ** -48)  # in (0, 1): never 0 or 1
    return u01.log().neg().log().neg().to(torch.float32)


def _sync_params(params: torch.Tensor, sids: Sequence[int], bits: Sequence[int]) -> torch.Tensor:
    """Average activation-scheme params over DDP ranks (training): every rank then quantizes with
    the same scales and keeps the same EMA buffers (SPEC: statistics all-reduced)."""
    ws = _dist_world()
    if ws == 1:
        return params
    import torch.distributed as dist

    p = params.detach().clone()
    dist.all_reduce(p, op=dist.ReduceOp.SUM)
    p.div_(ws)
    return _fix_fixed_step(p, sids, bits)


class QuantizerBase(nn.Module):
    """Shared plumbing: kind, enable switch, per-channel option, activation EMA statistics."""

    def __init__(self, schemes: Sequence[str], kind: str, per_channel: bool, ema_momentum: float,
                 backend: Optional[str], channel_dim: int = 0):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        if per_channel and kind == "activation":
            raise ValueError("per_channel statistics are for weights only")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {ema_momentum}")
        self.kind = kind
        self.per_channel = bool(per_channel)
        self.channel_dim = int(channel_dim)
        self.ema_momentum = float(ema_momentum)
        self.backend = backend
        self.enabled = True
        self._sids = [scheme_info(s).id for s in schemes]
        #: elements this vertex quantizes (per sample for activations), set by every forward;
        #: the precision loss weights bits by it (SPEC 4.2)
        self.elements: Optional[int] = None
        K = len(self._sids)
        if kind == "activation":
            # EMA of every candidate's scales (SPEC 1: batch statistics in training, EMA at eval).
            # ResQ's last slot, α_{b+1}, is computed only when the bits are learned (only the
            # bits gradient reads it; the eval output never does): 0 for fixed bits.
            self.register_buffer("ema_params", torch.zeros(K, 1, NUM_PARAMS))
            self.register_buffer("ema_bits", torch.zeros(K))
            self.register_buffer("ema_valid", torch.zeros((), dtype=torch.bool))
            self._ema_ok = False  # python mirror of ema_valid

    # ------------------------------------------------------------------ helpers
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_from_buffers()

    def _refresh_from_buffers(self):
        if self.kind == "activation":
            self._ema_ok = bool(self.ema_valid)

    def _record(self, x: torch.Tensor) -> None:
        n = x.numel()
        if self.kind == "activation" and x.dim() > 1 and x.shape[0] > 0:
            n //= x.shape[0]
        if torch.compiler.is_compiling():
            self.elements = int(n)  # Dynamo before torch 2.7 cannot trace a write to __dict__
        else:
            self.__dict__["elements"] = int(n)  # a plain attribute: skip nn.Module.__setattr__ (per forward)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel and self.channel_dim != 0:
            return x.transpose(0, self.channel_dim)
        return x

    def _unprep(self, y: torch.Tensor) -> torch.Tensor:
        if self.per_channel and self.channel_dim != 0:
            return y.transpose(0, self.channel_dim)
        return y

    def _bits_on(self, bits, device: torch.device) -> torch.Tensor:
        """``bits`` as a float tensor on ``device``, made once per (bits, device): a fresh
        host-to-device copy every step would synchronise the GPU stream. A tensor (the rounded
        learned bits inside a compiled graph) is used as it is."""
        if isinstance(bits, torch.Tensor):
            return bits.to(device=device, dtype=torch.float32)
        if torch.compiler.is_compiling():  # a graph constant (and Dynamo < 2.7 cannot trace the cache)
            return torch.tensor([float(b) for b in bits], device=device)
        cache = self.__dict__.setdefault("_bits_dev", {})
        key = (tuple(int(b) for b in bits), str(device))
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.tensor([float(b) for b in bits], device=device)
        return t

    @torch.no_grad()
    def _update_ema(self, params: torch.Tensor, bits):
        eb = self.ema_bits
        p = params.to(self.ema_params.device, self.ema_params.dtype)
        m = self.ema_momentum
        # m·ema + (1 − m)·p as two rounded products and a sum, eager and traced alike: add(alpha=)
        # is one fused multiply-add in eager CPU kernels but a product and a sum after some
        # torch versions' decompositions (torch 2.6's aot_eager), 1 ulp apart.
        # Fast path (eager only): this module wrote ema_bits = these bits last and nothing has
        # written the buffer since (same tensor, same version counter: load_state_dict, .to() or
        # a direct copy_ change one of them), so the bits are known on the host without reading
        # the device. A module that torch.compile has traced keeps the device-side comparison for
        # good: a compiled graph may write the buffer without bumping its version counter.
        compiling = torch.compiler.is_compiling()
        if compiling:
            # Traced: every decision on the device (no Python flag to guard on, so the graph
            # compiled at the first step is the one every later step runs).
            self._ema_fast_off = True
            bits_t = self._bits_on(bits, eb.device)
            avg = self.ema_params.mul(m).add_(p.mul(1.0 - m))
            keep = self.ema_valid & (eb == bits_t).all()
            self.ema_params.copy_(torch.where(keep, avg, p))
            eb.copy_(bits_t)
            self.ema_valid.fill_(True)
            self._ema_ok = True
            return
        key = tuple(int(b) for b in bits)
        seen = None if self.__dict__.get("_ema_fast_off") else self.__dict__.get("_ema_seen")
        if self._ema_ok and seen is not None and seen[0] == key and seen[1] is eb and seen[2] == eb._version:
            self.ema_params.mul_(m).add_(p.mul(1.0 - m))
            return
        bits_t = self._bits_on(bits, eb.device)
        if not self._ema_ok:  # first batch: start the average
            self.ema_params.copy_(p)
            eb.copy_(bits_t)
            self.ema_valid.fill_(True)
            self._ema_ok = True
        else:
            # The integer bits may have changed (QPL): then restart the average. Decided on the
            # device (no host read of ema_bits, which would synchronise the GPU).
            avg = self.ema_params.mul(m).add_(p.mul(1.0 - m))
            same = (eb == bits_t).all()
            self.ema_params.copy_(torch.where(same, avg, p))
            eb.copy_(bits_t)
        self._ema_seen = (key, eb, eb._version)

    def _eval_params(self, bits, x: torch.Tensor, bits_ops=None) -> Optional[torch.Tensor]:
        """EMA params for eval, or None (batch statistics) when they do not fit these bits.
        ``bits_ops``: the same bits on the host, for the statistics op (traced, learned bits)."""
        if self.kind != "activation" or self.training or not self._ema_ok:
            return None
        if torch.compiler.is_compiling():
            # Traced: whether the EMA fits these bits is decided on the device (the eager
            # version reads ema_bits on the host), so the batch statistics are computed too.
            schemes = [scheme_info(s).name for s in self._sids]
            batch = AF.scheme_params(x.detach(), schemes, bits if bits_ops is None else bits_ops,
                                     backend=self.backend, need_bits_grad=False)
            ema = _fix_fixed_step(self.ema_params, self._sids, bits).to(batch.device, batch.dtype)
            fits = (self.ema_valid & (self.ema_bits == self._bits_on(bits, self.ema_bits.device)).all())
            return torch.where(fits.to(batch.device), ema, batch)
        if [int(b) for b in self.ema_bits.tolist()] != list(bits):
            if not getattr(self, "_warned_bits", False):
                warnings.warn(
                    f"{type(self).__name__}: EMA statistics were collected at bits "
                    f"{[int(b) for b in self.ema_bits.tolist()]}, now {list(bits)}: using batch "
                    "statistics until the next training step", RuntimeWarning, stacklevel=3)
                self._warned_bits = True
            return None
        p = _fix_fixed_step(self.ema_params, self._sids, bits)
        return p.to(x.device)


class Quantizer(QuantizerBase):
    """A single-scheme quantizing vertex.

    Args:
        scheme: one of the eight schemes (``clip``, ``pot``, ...).
        bits: integer bits (default: the scheme's default); validated against the scheme's range.
        learn_bits: make the bitwidth a parameter (float, init ``bits``; the forward uses
            ``clip(round(b), b_min, b_max)``, SPEC 4.1).
        kind: ``"weight"`` or ``"activation"`` (activations keep EMA statistics for eval).
        per_channel: weight statistics per output channel.
        channel_dim: the output-channel dim of the weight (1 for ConvTranspose).

    Example:
        >>> q = Quantizer("clip", 3, kind="activation")
        >>> y = q(torch.randn(8, 16))
    """

    def __init__(self, scheme: str = "clip", bits: Optional[int] = None, *, learn_bits: bool = False,
                 kind: str = "weight", per_channel: bool = False, channel_dim: int = 0,
                 ema_momentum: float = 0.9, backend: Optional[str] = None):
        info = scheme_info(scheme)
        super().__init__([info.name], kind, per_channel, ema_momentum, backend, channel_dim)
        (b,) = resolve_bits([info.name], bits)
        if learn_bits and not info.multi_bit:
            raise ValueError(f"scheme '{info.name}' has a fixed bitwidth ({info.bits_range}); it cannot learn bits")
        self.register_buffer("scheme_id", torch.tensor(info.id, dtype=torch.int64))
        self.learn_bits = bool(learn_bits)
        if self.learn_bits:
            self.bits = nn.Parameter(torch.tensor(float(b)))
        else:
            self.register_buffer("bits", torch.tensor(float(b)))
        self._scheme = info.name
        self._bits_int = b

    def _refresh_from_buffers(self):
        super()._refresh_from_buffers()
        self._scheme = scheme_info(int(self.scheme_id)).name
        self._bits_int = clamp_bits(self._scheme, float(self.bits.detach()))

    @property
    def scheme(self) -> str:
        return self._scheme

    def int_bits(self) -> int:
        """The integer bitwidth the forward uses (reads a learned value: a host sync on GPU,
        except inside :func:`autoqnn.nn.bits_on_host` and a forward of :func:`autoqnn.compile_model`)."""
        if self.learn_bits:
            hb = self._armed_host_bits()
            return clamp_bits(self._scheme, float(AF._bits_host(self.bits) if hb is None else hb))
        return self._bits_int

    def _armed_host_bits(self) -> Optional[torch.Tensor]:
        """The host copy of the learned bits kept by :func:`refresh_host_bits`, while armed
        (during a forward of a model compiled by :func:`autoqnn.compile_model`), else None."""
        if self.learn_bits and self.__dict__.get("_host_armed", False):
            return self.__dict__["_bits_mirror"]
        return None

    def _rounded_bits(self) -> torch.Tensor:
        """clip(round(b)) of the learned bits, on their device (NaN/±Inf kept: the ops reject them)."""
        info = scheme_info(self._scheme)
        b = self.bits.detach()
        return torch.where(torch.isfinite(b), b.round().clamp(info.min_bits, info.max_bits), b)

    @torch.no_grad()
    def clamp_bits_(self) -> None:
        """Keep a learned bitwidth inside the scheme's range (call after optimizer steps)."""
        if self.learn_bits:
            info = scheme_info(self._scheme)
            self.bits.clamp_(info.min_bits - 0.5 + 1e-3, info.max_bits + 0.5 - 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or x.numel() == 0:
            return x
        self._record(x)
        bits_arg = self.bits if self.learn_bits else self._bits_int
        host = self._armed_host_bits()  # learned bits' host copy (compile_model), or None
        xin = self._prep(x)
        params = None
        if self.kind == "activation":
            b_ops = None  # the bits the statistics op reads, when not b_int
            if self.learn_bits and torch.compiler.is_compiling():
                # traced: the integer bits stay a tensor in the graph (SPEC 4.1's clip(round(b)));
                # on the device for the EMA's decisions, the host copy (if kept) for the ops
                info = scheme_info(self._scheme)
                b_int = self.bits.detach().round().clamp(info.min_bits, info.max_bits).reshape(1)
                b_ops = None if host is None else host.reshape(1)
            else:
                b_int = [self.int_bits()]
            if self.training:
                params = AF.scheme_params(xin.detach(), [self._scheme], b_int if b_ops is None else b_ops,
                                          backend=self.backend,
                                          need_bits_grad=self.learn_bits and torch.is_grad_enabled())
                params = _sync_params(params, self._sids, b_int)
                self._update_ema(params, b_int)
            else:
                params = self._eval_params(b_int, xin, b_ops)
        y = AF.quantize(xin, self._scheme, bits_arg, per_channel=self.per_channel,
                        backend=self.backend, params=params, bits_host=host)
        return self._unprep(y)

    def extra_repr(self) -> str:
        b = f"{float(self.bits.detach()):.2f} (learned)" if self.learn_bits else str(self._bits_int)
        s = f"{self.kind}, scheme={self._scheme}, bits={b}"
        if self.per_channel:
            s += ", per_channel"
        if not self.enabled:
            s += ", disabled"
        return s


class SchemeMixture(QuantizerBase):
    """The QSS quantizing vertex (SPEC 3): y = Σ_k m_k·q_k(x), m = softmax((θ + g)/τ).

    Args:
        schemes: the K candidates (default: the 8 weight schemes or the 5 activation schemes).
        bits: one int for every multi-bit candidate (Binary/Ternary/Quaternary keep 1/2/2), or one
            per candidate.
        kind, per_channel, channel_dim, ema_momentum, backend: as in :class:`Quantizer`.
        theta: a shared logits parameter (coarse-grained QSS); default: a fresh zeros(K).
        tau: initial temperature (buffer; set it with :meth:`set_temperature`).
        eval_selection: at eval, ``"argmax"`` quantizes with the chosen scheme only, ``"soft"``
            uses softmax(θ/τ) without noise.
        seed: Gumbel noise seed; the noise of step t is a pure function of (seed, t) (:func:`gumbel_noise`), so
            every DDP rank and every member of a coarse group draws the same noise.

    Example:
        >>> mix = SchemeMixture(kind="weight")
        >>> y = mix(torch.randn(16, 3, 3, 3)); y.sum().backward()   # grads reach mix.theta
        >>> mix.chosen()
        'binary'
    """

    def __init__(self, schemes: Optional[Sequence[str]] = None, bits: Union[int, Sequence[int]] = 3, *,
                 kind: str = "weight", per_channel: bool = False, channel_dim: int = 0,
                 theta: Optional[nn.Parameter] = None, tau: float = 5.0, eval_selection: str = "argmax",
                 ema_momentum: float = 0.9, backend: Optional[str] = None, seed: int = 0):
        from ..schemes import ACTIVATION_CANDIDATES, WEIGHT_CANDIDATES

        if schemes is None:
            schemes = WEIGHT_CANDIDATES if kind == "weight" else ACTIVATION_CANDIDATES
        names = [scheme_info(s).name for s in schemes]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"schemes must be distinct and non-empty, got {names}")
        super().__init__(names, kind, per_channel, ema_momentum, backend, channel_dim)
        if eval_selection not in ("argmax", "soft"):
            raise ValueError(f"eval_selection must be 'argmax' or 'soft', got {eval_selection!r}")
        self.schemes = tuple(names)
        self._bits = resolve_bits(names, bits)
        self.register_buffer("bits", torch.tensor([float(b) for b in self._bits]))
        K = len(names)
        if theta is None:
            theta = nn.Parameter(torch.zeros(K))
        elif theta.shape != (K,):
            raise ValueError(f"shared theta must have shape [{K}], got {list(theta.shape)}")
        self.theta = theta
        self.eval_selection = eval_selection
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        # candidate pruning (off unless the trainer prunes): active candidates and, per candidate,
        # how many consecutive epochs its probability stayed below the pruning threshold
        self.register_buffer("active", torch.ones(K, dtype=torch.bool))
        self.register_buffer("below", torch.zeros(K, dtype=torch.int64))
        self._tau = float(tau)
        self._step = 0
        self._seed = int(seed)
        self._active = list(range(K))

    def _refresh_from_buffers(self):
        super()._refresh_from_buffers()
        self._tau = float(self.tau)
        self._step = int(self.step)
        self._step_stale = False
        self._seed = int(self.seed)
        self._bits = [int(b) for b in self.bits.tolist()]
        self._active = [k for k, a in enumerate(self.active.tolist()) if a]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts written before candidate pruning existed: all candidates active
        K = len(self.schemes)
        state_dict.setdefault(prefix + "active", torch.ones(K, dtype=torch.bool))
        state_dict.setdefault(prefix + "below", torch.zeros(K, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ search state
    def set_temperature(self, tau: float) -> None:
        if not tau > 0 or not math.isfinite(tau):
            raise ValueError(f"temperature must be positive and finite, got {tau}")
        self._tau = float(tau)
        self.tau.fill_(self._tau)

    def set_step(self, step: int) -> None:
        """Set the Gumbel step counter (the trainer does this so all ranks agree)."""
        self._step = int(step)
        self._step_stale = False
        self.step.fill_(self._step)

    def gumbel(self, step: Optional[int] = None) -> torch.Tensor:
        """The Gumbel noise g for a step: identical for the same (seed, step) on every process
        (a new tensor on the device of ``theta``)."""
        return self._noise(step).clone()

    def _noise(self, step: Optional[int] = None) -> torch.Tensor:
        """Eager: a read-only view of the step's row of the cached noise block."""
        if step is None:
            if self.__dict__.get("_step_stale"):  # a compiled forward advanced the step buffer
                self.__dict__["_step"] = int(self.step)
                self.__dict__["_step_stale"] = False
            s = self._step
        else:
            s = int(step)
        block, row = divmod(s, NOISE_BLOCK)
        dev = self.theta.device
        key = (self._seed, block, dev)
        cached = self.__dict__.get("_noise_block")
        if cached is None or cached[0] != key:
            steps = torch.arange(block * NOISE_BLOCK, (block + 1) * NOISE_BLOCK, dtype=torch.int64)
            g = gumbel_noise(torch.tensor(self._seed, dtype=torch.int64), steps, len(self.schemes))
            # non_blocking: a host-to-device copy without it synchronises the GPU stream
            cached = self.__dict__["_noise_block"] = (key, g.to(dev, non_blocking=True))
        return cached[1][row]

    def mixture_weights(self) -> torch.Tensor:
        """m = softmax((θ + g)/τ) with this step's noise (training) — differentiable in θ. Pruned
        candidates get weight 0 (their logits are dropped from the softmax).

        Under ``torch.compile`` the noise and τ come from the ``step``, ``seed`` and ``tau``
        buffers inside the graph (no Python counter to guard on); eagerly from their Python
        copies and the cached noise block. Both give the same noise (:func:`gumbel_noise`)."""
        if torch.compiler.is_compiling():
            g = gumbel_noise(self.seed, self.step, len(self.schemes)).to(self.theta.device)
            logits = (self.theta + g) / self.tau.to(self.theta.device)
        else:
            logits = (self.theta + self._noise()) / self._tau
        if len(self._active) < len(self.schemes):
            logits = logits.masked_fill(~self.active, float("-inf"))
        return torch.softmax(logits, 0)

    @property
    def active_schemes(self) -> tuple:
        return tuple(self.schemes[k] for k in self._active)

    @torch.no_grad()
    def update_pruning(self, threshold: float, patience: int = 1) -> list:
        """Candidate pruning (SSPS seed's idea): a candidate whose probability softmax(θ) stayed
        below ``threshold`` for ``patience`` consecutive calls (epochs) leaves the mixture for
        good; the argmax candidate is never pruned. Returns the schemes pruned by this call."""
        if threshold <= 0:
            return []
        p = self.probs()
        top = int(torch.argmax(p))
        low = (p < threshold).to(self.below.device)
        self.below.copy_(torch.where(low, self.below + 1, torch.zeros_like(self.below)))
        newly = []
        for k in list(self._active):
            if k != top and int(self.below[k]) >= patience:
                self.active[k] = False
                newly.append(self.schemes[k])
        self._active = [k for k, a in enumerate(self.active.tolist()) if a]
        return newly

    @torch.no_grad()
    def probs(self) -> torch.Tensor:
        """The sampling distribution softmax(θ) (what Fig. 6/8 of the paper plot)."""
        return torch.softmax(self.theta.detach().float(), 0)

    def chosen_index(self) -> int:
        """argmax θ over the live (unpruned) candidates."""
        th = self.theta.detach()
        if len(self._active) < len(self.schemes):
            th = th.masked_fill(~self.active.to(th.device), float("-inf"))
        return int(torch.argmax(th))

    def chosen(self) -> str:
        """The selected scheme: argmax θ (SPEC decisions)."""
        return self.schemes[self.chosen_index()]

    def to_quantizer(self, *, learn_bits: bool = False) -> Quantizer:
        """The single-scheme quantizer this vertex settles on, EMA statistics included."""
        k = self.chosen_index()
        q = Quantizer(self.schemes[k], self._bits[k], learn_bits=learn_bits and scheme_info(self.schemes[k]).multi_bit,
                      kind=self.kind, per_channel=self.per_channel, channel_dim=self.channel_dim,
                      ema_momentum=self.ema_momentum, backend=self.backend)
        q.train(self.training)
        q.to(self.theta.device)
        q.elements = self.elements
        q.enabled = self.enabled
        if self.kind == "activation" and self._ema_ok:
            with torch.no_grad():
                q.ema_params.copy_(self.ema_params[k : k + 1])
                q.ema_bits.copy_(self.ema_bits[k : k + 1])
                q.ema_valid.fill_(True)
                q._ema_ok = True
        return q

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = self.__dict__.get("_batched")
        if pending is not None and pending[0] is x:  # computed by a WeightBatcher for this forward
            self._batched = None
            return pending[1]
        if not self.enabled or x.numel() == 0:
            return x
        self._record(x)
        xin = self._prep(x)
        params = None
        if self.kind == "activation":
            if self.training:
                # fixed integer bits (QSS): ResQ's α_{b+1}, used only by a bits gradient, is skipped
                params = AF.scheme_params(xin.detach(), self.schemes, self._bits, backend=self.backend,
                                          need_bits_grad=False)
                params = _sync_params(params, self._sids, self._bits)
                self._update_ema(params, self._bits)
            else:
                params = self._eval_params(self._bits, xin)
        traced = torch.compiler.is_compiling()
        if not self.training and self.eval_selection == "argmax" and not traced:
            k = self.chosen_index()
            pk = None if params is None else params[k : k + 1]
            y = AF.quantize(xin, self.schemes[k], self._bits[k], per_channel=self.per_channel,
                            backend=self.backend, params=pk)
            return self._unprep(y)
        if self.training:
            w = self.mixture_weights()
            if traced:  # the graph advances the buffer; eager re-reads it
                self.step.add_(1)
                self._step_stale = True
            else:
                self.__dict__["_step"] = self._step + 1  # skip nn.Module.__setattr__ (per forward)
                self.step.fill_(self._step)
        else:
            logits = self.theta / (self.tau.to(self.theta.device) if traced else self._tau)
            if len(self._active) < len(self.schemes):
                logits = logits.masked_fill(~self.active, float("-inf"))
            if self.eval_selection == "argmax":
                # traced: the argmax stays on the device, as one-hot mixture weights (the K
                # candidates are evaluated; every q_k is finite or NaN where x is, so the sum
                # is exactly q_argmax)
                th = self.theta.detach()  # argmax of θ itself, as chosen_index (θ/τ could round ties)
                if len(self._active) < len(self.schemes):
                    th = th.masked_fill(~self.active, float("-inf"))
                w = torch.nn.functional.one_hot(th.argmax(), len(self.schemes)).to(logits.dtype)
            else:
                w = torch.softmax(logits, 0)
        schemes, bits = self.schemes, self._bits
        if len(self._active) < len(self.schemes):  # pruned: evaluate the live candidates only
            idx = self._active
            w = w[idx]
            schemes = tuple(self.schemes[k] for k in idx)
            bits = [self._bits[k] for k in idx]
            if params is not None:
                params = params[idx]
        y = AF.quantize_mixture(xin, w, schemes, bits, per_channel=self.per_channel,
                                backend=self.backend, params=params)
        return self._unprep(y)

    def extra_repr(self) -> str:
        probs = self.probs().tolist()
        cands = ", ".join(f"{s}:{p:.2f}" for s, p in zip(self.schemes, probs))
        s = f"{self.kind}, bits={self._bits}, tau={self._tau:.3g}, probs=[{cands}]"
        if self.per_channel:
            s += ", per_channel"
        if not self.enabled:
            s += ", disabled"
        return s
