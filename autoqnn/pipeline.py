# SPDX-License-Identifier: MIT
"""QSS, QPL and the end-to-end search (SPEC 3, 4 and 5.2).

Users with their own training loop need four calls::

    qmodel = autoqnn.prepare(model, cfg, example_inputs)      # QAG + QSS mixtures (or fixed schemes)
    for epoch in range(E_s):                                  # QSS: train weights and θ on the task loss
        ...; autoqnn.on_epoch_end(qmodel, epoch, E_s)         # temperature τ(e), optional pruning
    autoqnn.fix_schemes(qmodel)                               # argmax θ -> one scheme, learnable bits
    for epoch in range(E_p):                                  # QPL: task loss + precision loss
        loss = task_loss + autoqnn.precision_loss(qmodel); ...
    plan = autoqnn.finalize(qmodel)                           # round bits, budget repair, freeze

or one call, :func:`search`, which runs Algorithm 2 (float training, QSS, QPL, round + repair,
fine-tuning, evaluation) with checkpoints, ``resume="auto"`` and DDP under ``torchrun``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import qag as _qag
from .config import QuantConfig
from .nn import Quantizer, QuantizerBase, SchemeMixture, WeightBatcher, bits_on_host, use_host_bits
from .nn import quantizers as _iter_quantizers
from .schemes import scheme_info

__all__ = [
    "SearchConfig", "SearchResult", "LayerPlan", "BudgetError", "prepare", "precision_loss",
    "on_epoch_end", "fix_schemes", "finalize", "repair_budget", "average_bits", "model_size_bytes",
    "plan_of", "search", "evaluate", "compile_model",
]

PHASES = ("float", "search", "precision", "finetune", "done")


class BudgetError(ValueError):
    """The requested bit or size budget cannot be met with the chosen schemes."""


# ----------------------------------------------------------------------------------------- config
@dataclass
class SearchConfig:
    """Every knob of the search (SPEC decisions table + trainer). Defaults are documented in the
    README; the whole object is saved with every result and checkpoint.

    Phases (Algorithm 2): ``float_epochs`` of float training (0 when the model is already
    trained), ``search_epochs`` of QSS (skipped when ``quant.mode == "fixed"``),
    ``precision_epochs`` of QPL (0: keep the search bits), then rounding and the budget repair,
    ``finetune_epochs`` with frozen schemes and bits.
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    float_epochs: int = 0
    search_epochs: int = 2
    precision_epochs: int = 2
    finetune_epochs: int = 1
    weight_target: float = 3.0  # b_t for weights (element-weighted average, SPEC 4.2)
    act_target: float = 3.0  # b_t for activations
    mu_w: float = 1.0
    mu_a: float = 1.0
    budget: str = "hard"  # "hard": repair after rounding so achieved <= target; "soft": paper
    size_budget_bytes: Optional[int] = None  # optional model-size budget, repaired like bits
    optimizer: str = "sgd"  # weights: "sgd" (momentum) or "adam"
    lr: float = 0.01
    float_lr: Optional[float] = None  # default: lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    theta_lr: float = 0.05  # Adam, θ group (no weight decay)
    bits_lr: float = 0.01  # Adam, bits group (no weight decay)
    lr_schedule: str = "cosine"  # per phase: "cosine" (to 0 over the phase) or "constant"
    temperature_per_step: bool = False  # τ evaluated per step instead of per epoch
    prune_threshold: float = 0.0  # candidate pruning: off at 0 (e.g. 0.02)
    prune_patience: int = 2
    batch_size: int = 128
    eval_batch_size: int = 512
    max_steps_per_epoch: Optional[int] = None  # cap (quick runs)
    checkpoint_dir: Optional[str] = None
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: only per epoch)
    resume: Optional[str] = None  # None, "auto" (latest in checkpoint_dir) or a path
    deterministic: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 0  # print a line every N steps (rank 0); 0: per epoch only
    # QSS: quantize all weight vertices in one batched call per step (autoqnn.nn.WeightBatcher).
    # Same results (bit-identical on CPU); off by default: on CPU it saves nothing measurable per
    # step, and the batched CUDA kernels, where it should pay, are not yet verified on a GPU
    batch_weights: bool = False
    # torch.compile the training step's forward (and with it the backward) in every training
    # phase: False, True (Inductor) or a torch.compile backend name. The quantizers trace into
    # the graph without breaks and without a recompile per step (the Gumbel noise, temperature
    # and EMA decisions are read from buffers in the graph); evaluation stays eager.
    compile: Any = False
    compile_mode: Optional[str] = None  # torch.compile(mode=...): "reduce-overhead", "max-autotune", ...
    # the model's 4-D parameters (convolution weights) in channels-last memory format in every
    # phase, so the convolutions run NHWC (cuDNN's and oneDNN's fast layout); the quantizers keep
    # the layout of what they quantize (README, robustness: memory layouts). Checkpoints and
    # exports are the same tensors (a state_dict holds values, not layouts).
    channels_last: bool = False

    def __post_init__(self):
        if isinstance(self.quant, dict):
            self.quant = QuantConfig.from_dict(self.quant)
        self.validate()

    def validate(self) -> "SearchConfig":
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"SearchConfig.quant must be a QuantConfig, got {type(self.quant).__name__}")
        self.quant.validate()
        for n in ("float_epochs", "search_epochs", "precision_epochs", "finetune_epochs"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SearchConfig.{n} must be an integer >= 0, got {v!r}")
        for n in ("weight_target", "act_target"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or not 1.0 <= float(v) <= 8.0:
                raise ValueError(f"SearchConfig.{n} must be a number of bits in [1, 8], got {v!r}")
        for n in ("mu_w", "mu_a", "momentum", "weight_decay"):
            if getattr(self, n) < 0:
                raise ValueError(f"SearchConfig.{n} must be >= 0, got {getattr(self, n)}")
        for n in ("lr", "theta_lr", "bits_lr"):
            if not getattr(self, n) > 0:
                raise ValueError(f"SearchConfig.{n} must be > 0, got {getattr(self, n)}")
        if self.budget not in ("hard", "soft"):
            raise ValueError(f"SearchConfig.budget must be 'hard' or 'soft', got {self.budget!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"SearchConfig.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"SearchConfig.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not 0.0 <= self.prune_threshold < 1.0:
            raise ValueError(f"SearchConfig.prune_threshold must be in [0, 1), got {self.prune_threshold}")
        if self.prune_patience < 1:
            raise ValueError("SearchConfig.prune_patience must be >= 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("SearchConfig.batch_size and eval_batch_size must be >= 1")
        if self.size_budget_bytes is not None and self.size_budget_bytes <= 0:
            raise ValueError("SearchConfig.size_budget_bytes must be positive")
        if not isinstance(self.batch_weights, bool):
            raise ValueError(f"SearchConfig.batch_weights must be True or False, got {self.batch_weights!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"SearchConfig.channels_last must be True or False, got {self.channels_last!r}")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(f"SearchConfig.compile must be True, False or a torch.compile backend name, "
                             f"got {self.compile!r}")
        if isinstance(self.compile, str):
            known = _compile_backends()
            if known and self.compile not in known:
                raise ValueError(f"SearchConfig.compile: unknown torch.compile backend {self.compile!r}; "
                                 f"known: {', '.join(known)}")
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"SearchConfig.compile_mode must be one of {_COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_mode is not None and self.compile not in (True, "inductor"):
            raise ValueError("SearchConfig.compile_mode applies to the Inductor backend: set compile=True")
        if self.compile and self.batch_weights:
            raise ValueError("SearchConfig.batch_weights and compile cannot be combined: the batched weight "
                             "call runs eagerly before the forward, which a compiled forward does not do")
        if self.resume not in (None, "auto") and not isinstance(self.resume, (str, os.PathLike)):
            raise ValueError("SearchConfig.resume must be None, 'auto' or a checkpoint path")
        return self

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["quant"] = self.quant.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SearchConfig option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if "quant" in d and isinstance(d["quant"], dict):
            d["quant"] = QuantConfig.from_dict(d["quant"])
        return cls(**d)


def _compile_backends() -> List[str]:
    """torch.compile backend names (debug ones such as ``aot_eager`` included); [] when torch
    cannot list them."""
    try:
        import torch._dynamo  # noqa: PLC0415

        return sorted(set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"})
    except Exception:  # noqa: BLE001 - listing is a convenience for the error message
        return []


_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, *, backend: str = "inductor", mode: Optional[str] = None,
                  fullgraph: bool = False, layout_optimization: Optional[bool] = None) -> nn.Module:
    """``torch.compile`` for a model with autoqnn quantizers (a prepared, searched or fine-tuned
    one), as ``SearchConfig(compile=...)`` uses it: the quantizers trace into the graph without
    breaks and without a recompile per step. ``mode`` is Inductor's (``"reduce-overhead"``,
    ``"max-autotune"``, ...).

    ``layout_optimization`` sets Inductor's option of that name (None: Inductor's default).
    With it, Inductor runs the convolutions channels-last (oneDNN on the CPU, conv-heavy graphs
    on a GPU). The quantizer ops are tagged ``flexible_layout`` and take those buffers as they
    are (torch >= 2.6): no copy of each quantized tensor to the contiguous layout and back.

    Learned bitwidths (QPL): the compiled module's forward first copies every learned bitwidth
    of ``model`` to the host in one transfer (:func:`autoqnn.nn.use_host_bits`), and the graph's
    kernels read those copies: one stream sync per step on a GPU instead of one in each op.
    CUDA graphs (``reduce-overhead``, ``max-autotune``) are then turned off, with a warning: a
    replay reruns the kernels with the bits they were captured with, and learned bits change.
    """
    if mode not in _COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {_COMPILE_MODES}, got {mode!r}")
    if backend != "inductor":
        if mode is not None or layout_optimization is not None:
            raise ValueError(f"compile mode and layout_optimization apply to the Inductor backend, not {backend!r}")
        return _with_host_bits(torch.compile(model, backend=backend, fullgraph=fullgraph), model)
    from torch._inductor import list_mode_options  # noqa: PLC0415

    options = dict(list_mode_options(mode)) if mode else {}
    if options.get("triton.cudagraphs") and _learns_bits(model):
        warnings.warn(f"compile_model: mode={mode!r} would capture CUDA graphs, whose replays keep the "
                      "integer bits of the capture; this model learns its bitwidths, so it is compiled "
                      "without CUDA graphs", RuntimeWarning, stacklevel=2)
        options["triton.cudagraphs"] = False
    if layout_optimization is not None:
        options["layout_optimization"] = bool(layout_optimization)
    if not options:
        return _with_host_bits(torch.compile(model, backend="inductor", fullgraph=fullgraph), model)
    return _with_host_bits(torch.compile(model, backend="inductor", fullgraph=fullgraph, options=options), model)


def _learns_bits(model: nn.Module) -> bool:
    return any(isinstance(q, Quantizer) and q.learn_bits for _, q in _iter_quantizers(model))


def _with_host_bits(compiled: nn.Module, model: nn.Module) -> nn.Module:
    """``compiled`` with :func:`autoqnn.nn.use_host_bits` hooks when ``model`` learns bitwidths."""
    if _learns_bits(model):
        use_host_bits(compiled, model)
    return compiled


def _compiled(net: nn.Module, cfg: SearchConfig) -> nn.Module:
    """``net`` under ``torch.compile`` as ``cfg.compile`` says (``net`` itself when it is off)."""
    if not cfg.compile:
        return net
    return compile_model(net, backend="inductor" if cfg.compile is True else cfg.compile, mode=cfg.compile_mode)


def _as_search_config(config) -> SearchConfig:
    if config is None:
        return SearchConfig()
    if isinstance(config, SearchConfig):
        return config
    if isinstance(config, QuantConfig):
        return SearchConfig(quant=config)
    if isinstance(config, dict):
        return SearchConfig.from_dict(config)
    raise TypeError(f"config must be a SearchConfig, QuantConfig or dict, got {type(config).__name__}")


# ----------------------------------------------------------------------------------------- model state
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def _state(model: nn.Module) -> dict:
    m = _unwrap(model)
    st = getattr(m, "_autoqnn", None)
    if st is None:
        raise ValueError("this model was not prepared by autoqnn.prepare()")
    return st


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _quantizers(model: nn.Module):
    return list(_iter_quantizers(_unwrap(model)))


def prepare(model: nn.Module, config=None, example_inputs: Any = None, *, inplace: bool = False) -> nn.Module:
    """QAG with QSS mixtures (``quant.mode == "search"``) or fixed schemes with learnable bits
    (``"fixed"`` with ``learn_bits``). ``example_inputs`` (one batch) gives execution order,
    element counts for the precision loss and the activation quantizers' first statistics.

    Raises :class:`BudgetError` when the targets cannot be met by the candidate schemes.
    """
    cfg = _as_search_config(config)
    qmodel, report = _qag.convert(model, cfg.quant, example_inputs, inplace=inplace)
    if not _quantizers(qmodel):
        raise ValueError(
            "QAG found no layer to quantize in this model (no Conv/Linear, or all excluded): "
            f"{report.to_markdown()}")
    qmodel._autoqnn = {"config": cfg, "report": report, "phase": "search" if cfg.quant.mode == "search" else "precision",
                       "tau": cfg.quant.tau0}
    if example_inputs is not None:
        _record_elements(qmodel, example_inputs)
    _check_targets_reachable(qmodel, cfg)
    return qmodel


@torch.no_grad()
def _record_elements(qmodel: nn.Module, example_inputs) -> None:
    """One forward in eval mode so every quantizer records how many elements it quantizes."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    was = qmodel.training
    # eval mode would not update EMA stats; train mode would update BN: use eval and then restore
    qmodel.eval()
    try:
        qmodel(*example_inputs)
    finally:
        qmodel.train(was)


def _scheme_bits_range(q: QuantizerBase, candidates: bool = True):
    """(min, max) bits reachable by a quantizer (over its candidates while still a mixture)."""
    if isinstance(q, SchemeMixture):
        infos = [scheme_info(s) for s in q.active_schemes]
        return min(i.min_bits for i in infos), max(i.max_bits for i in infos)
    info = scheme_info(q.scheme)
    return info.min_bits, info.max_bits


def _check_targets_reachable(qmodel: nn.Module, cfg: SearchConfig) -> None:
    if cfg.budget != "hard":
        return
    for kind, target in (("weight", cfg.weight_target), ("activation", cfg.act_target)):
        qs = [(n, q) for n, q in _quantizers(qmodel) if q.kind == kind]
        if not qs:
            continue
        lows = [_scheme_bits_range(q)[0] for _, q in qs]
        if min(lows) > target:
            names = ", ".join(sorted({s for _, q in qs for s in _schemes_of(q)}))
            raise BudgetError(
                f"{kind} target {target} bits is impossible: the {kind} candidates ({names}) need at least "
                f"{min(lows)} bits. Lower no scheme below its range; raise the target or add a lower-bit "
                "scheme (binary 1 bit, ternary/quaternary 2 bits are weight-only).")


def _schemes_of(q: QuantizerBase):
    return q.active_schemes if isinstance(q, SchemeMixture) else (q.scheme,)


# ----------------------------------------------------------------------------------------- QPL
def _bits_value(q: QuantizerBase, ste: bool = True) -> torch.Tensor:
    """The bitwidth a quantizer uses, as a differentiable scalar where bits are learned: the
    forward's clip(round(b)) with the gradient straight through to b (SPEC 4.1)."""
    if isinstance(q, Quantizer):
        if q.learn_bits:
            b = q.bits
            bi = q._rounded_bits().to(b.dtype)  # on b's device: no host read (a GPU sync)
            return b + (bi - b).detach() if ste else b
        return torch.tensor(float(q.int_bits()))
    # a mixture: the expected bits under softmax(θ) (differentiable in θ)
    bits = torch.tensor([float(b) for b in q._bits], device=q.theta.device)
    p = torch.softmax(q.theta, 0)
    return (p * bits).sum()


def average_bits(model: nn.Module, kind: str = "weight", *, differentiable: bool = False,
                 ste: bool = True) -> Optional[torch.Tensor]:
    """Element-count-weighted mean bitwidth b̄ of all ``kind`` quantizers (SPEC 4.2; activation
    elements per sample). None when the model has no such quantizer."""
    num, den = None, 0
    for name, q in _quantizers(model):
        if q.kind != kind or not q.enabled:
            continue
        if q.elements is None:
            raise RuntimeError(f"quantizer {name!r} has not run yet: run one forward pass (or give prepare() "
                               "example_inputs) before computing average bits")
        b = _bits_value(q, ste=ste) if differentiable else _bits_value(q, ste=ste).detach()
        term = b.float().cpu() * q.elements if not differentiable else b * q.elements
        num = term if num is None else num + term.to(num.device) if differentiable else num + term
        den += q.elements
    if num is None:
        return None
    return num / den


def precision_loss(model: nn.Module, weight_target: Optional[float] = None, act_target: Optional[float] = None,
                   mu_w: Optional[float] = None, mu_a: Optional[float] = None) -> torch.Tensor:
    """L = μ_W·(b̄_W − b_t^W)² + μ_A·(b̄_A − b_t^A)² (SPEC 4.2), differentiable in the learned
    bits. Targets and μ default to the prepared config's."""
    st = getattr(_unwrap(model), "_autoqnn", None)
    cfg = st["config"] if st else SearchConfig()
    wt = cfg.weight_target if weight_target is None else weight_target
    at = cfg.act_target if act_target is None else act_target
    mw = cfg.mu_w if mu_w is None else mu_w
    ma = cfg.mu_a if mu_a is None else mu_a
    loss = None
    for kind, t, mu in (("weight", wt, mw), ("activation", at, ma)):
        if mu == 0:
            continue
        b = average_bits(model, kind, differentiable=True)
        if b is None:
            continue
        term = mu * (b - float(t)) ** 2
        loss = term if loss is None else loss + term.to(loss.device)
    if loss is None:
        p = next(_unwrap(model).parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return loss


def clamp_bits_(model: nn.Module) -> None:
    """Keep every learned bitwidth inside its scheme's range (call after each optimizer step)."""
    for _, q in _quantizers(model):
        if isinstance(q, Quantizer):
            q.clamp_bits_()


# ----------------------------------------------------------------------------------------- QSS
def set_temperature(model: nn.Module, tau: float) -> None:
    for _, q in _quantizers(model):
        if isinstance(q, SchemeMixture):
            q.set_temperature(tau)
    st = getattr(_unwrap(model), "_autoqnn", None)
    if st is not None:
        st["tau"] = tau


def set_step(model: nn.Module, step: int) -> None:
    """Set every mixture's Gumbel step (the same noise on every DDP rank for the same step)."""
    for _, q in _quantizers(model):
        if isinstance(q, SchemeMixture):
            q.set_step(step)


def on_epoch_end(model: nn.Module, epoch: int, epochs: Optional[int] = None) -> dict:
    """After QSS epoch ``epoch`` (0-based) of ``epochs``: set τ for the next epoch from SPEC's
    schedule τ(e) = τ0·(1 − e/E)^γ and prune candidates if configured. Returns a log record
    (temperature, per-vertex probabilities, pruned candidates)."""
    st = _state(model)
    cfg: SearchConfig = st["config"]
    E = cfg.search_epochs if epochs is None else epochs
    tau = cfg.quant.temperature(epoch + 1, max(E, 1))
    set_temperature(model, tau)
    pruned = {}
    seen = set()
    for name, q in _quantizers(model):
        if isinstance(q, SchemeMixture) and cfg.prune_threshold > 0:
            key = id(q.theta)
            newly = q.update_pruning(cfg.prune_threshold, cfg.prune_patience)
            if newly and key not in seen:
                pruned[name] = newly
            seen.add(key)
    return {"tau": tau, "pruned": pruned, "probs": scheme_probs(model)}


def scheme_probs(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """softmax(θ) of every mixture: {quantizer name: {scheme: probability}} (Fig. 6/8)."""
    out = {}
    for name, q in _quantizers(model):
        if isinstance(q, SchemeMixture):
            out[name] = {s: float(p) for s, p in zip(q.schemes, q.probs().tolist())}
    return out


def fix_schemes(model: nn.Module, *, learn_bits: Optional[bool] = None) -> Dict[str, str]:
    """End of QSS: every mixture becomes the single quantizer of its argmax θ (SPEC 3); multi-bit
    schemes get learnable bits initialised at the search bits for QPL (``learn_bits``, default:
    whether the config has precision epochs). Returns {quantizer name: scheme}."""
    root = _unwrap(model)
    st = getattr(root, "_autoqnn", None)
    if learn_bits is None:
        learn_bits = bool(st and st["config"].precision_epochs > 0)
    chosen = {}
    for name, q in list(_quantizers(root)):
        if isinstance(q, SchemeMixture):
            nq = q.to_quantizer(learn_bits=learn_bits)
            _set_module(root, name, nq)
            chosen[name] = nq.scheme
        elif isinstance(q, Quantizer):
            chosen[name] = q.scheme
            if learn_bits and not q.learn_bits and scheme_info(q.scheme).multi_bit:
                _set_module(root, name, _requantizer(q, q.int_bits(), learn=True))
    if st is not None:
        st["phase"] = "precision"
    return chosen


def apply_schemes(model: nn.Module, schemes: Dict[str, str], *, learn_bits: bool,
                  bits: Optional[Dict[str, int]] = None) -> None:
    """Replace quantizers by single-scheme ones as recorded in a plan (used by resume/load)."""
    root = _unwrap(model)
    qs = dict(_quantizers(root))
    missing = sorted(set(schemes) - set(qs))
    if missing:
        raise ValueError(f"the plan names quantizers this model does not have: {missing[:5]}")
    for name, scheme in schemes.items():
        q = qs[name]
        info = scheme_info(scheme)
        if isinstance(q, SchemeMixture):
            if info.name not in q.schemes:
                raise ValueError(f"{name}: scheme {scheme!r} is not among its candidates {q.schemes}")
            b = q._bits[q.schemes.index(info.name)]
        else:
            b = q.int_bits()
        if bits and name in bits:
            b = int(bits[name])
        nq = Quantizer(info.name, b if info.multi_bit else None, learn_bits=learn_bits and info.multi_bit,
                       kind=q.kind, per_channel=q.per_channel, channel_dim=q.channel_dim,
                       ema_momentum=q.ema_momentum, backend=q.backend)
        nq.elements = q.elements
        nq.enabled = q.enabled
        dev = next((t.device for t in q.buffers()), torch.device("cpu"))
        nq.to(dev)
        nq.train(q.training)
        _set_module(root, name, nq)
    st = getattr(root, "_autoqnn", None)
    if st is not None:
        st["phase"] = "precision" if learn_bits else "finetune"


def _requantizer(q: Quantizer, bits: int, learn: bool) -> Quantizer:
    nq = Quantizer(q.scheme, bits if scheme_info(q.scheme).multi_bit else None,
                   learn_bits=learn and scheme_info(q.scheme).multi_bit, kind=q.kind,
                   per_channel=q.per_channel, channel_dim=q.channel_dim, ema_momentum=q.ema_momentum,
                   backend=q.backend)
    dev = q.bits.device
    nq.to(dev)
    nq.train(q.training)
    nq.elements = q.elements
    nq.enabled = q.enabled
    if q.kind == "activation" and q._ema_ok and bits == q.int_bits():
        with torch.no_grad():
            nq.ema_params.copy_(q.ema_params)
            nq.ema_bits.copy_(q.ema_bits)
            nq.ema_valid.fill_(True)
        nq._ema_ok = True
    return nq


# ----------------------------------------------------------------------------------------- plan / size
@dataclass
class LayerPlan:
    """One quantizing vertex after the search."""

    name: str  # quantizer's qualified name
    layer: str  # the layer (vertex) it belongs to
    kind: str  # weight | activation
    scheme: str
    bits: int
    elements: int  # weight elements, or activation elements per sample
    learned_bits: Optional[float] = None  # the real-valued b before rounding (QPL)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _layer_of(qname: str) -> str:
    for suffix in (".weight_quant", ".act_quant", ".in_weight_quant", ".in_act_quant"):
        if qname.endswith(suffix):
            base = qname[: -len(suffix)]
            return base + ".in_proj" if suffix.startswith(".in_") else base
    return qname


def plan_of(model: nn.Module) -> List[LayerPlan]:
    """The per-quantizer plan (scheme, integer bits, elements) of a model whose quantizers are
    single-scheme (mixtures report their current argmax)."""
    out = []
    for name, q in _quantizers(model):
        if not q.enabled:
            continue
        if isinstance(q, SchemeMixture):
            k = q.chosen_index()
            scheme, bits, learned = q.schemes[k], q._bits[k], None
        else:
            scheme, bits = q.scheme, q.int_bits()
            learned = float(q.bits.detach()) if q.learn_bits else None
        out.append(LayerPlan(name, _layer_of(name), q.kind, scheme, int(bits), int(q.elements or 0), learned))
    return out


def _plan_average(plan: Sequence[LayerPlan], kind: str) -> Optional[float]:
    rows = [p for p in plan if p.kind == kind]
    n = sum(p.elements for p in rows)
    if not rows or n == 0:
        return None
    return sum(p.bits * p.elements for p in rows) / n


def _scale_bytes(scheme: str, bits: int, channels: int = 1) -> int:
    """Bytes of scales/levels a packed weight needs (fp32 each): ResQ one α per stage, ZoomQ
    min+step, others one scale (per channel when per-channel)."""
    n = bits if scheme == "residual" else 2 if scheme == "zoom" else 1
    return 4 * n * channels


def model_size_bytes(model: nn.Module, plan: Optional[Sequence[LayerPlan]] = None) -> Dict[str, int]:
    """Storage of the model: quantized weights bit-packed at their bits (ceil(n·b/8) bytes each)
    plus their scales, every other parameter and persistent buffer at its own dtype. Returns
    ``{"quantized": bytes, "float_model": bytes, "int8": bytes}`` (int8: every quantized weight at
    8 bits)."""
    root = _unwrap(model)
    plan = plan if plan is not None else plan_of(root)
    wq_elems = {}
    total_q = 0
    int8 = 0
    for p in plan:
        if p.kind != "weight":
            continue
        total_q += math.ceil(p.elements * p.bits / 8) + _scale_bytes(p.scheme, p.bits)
        int8 += p.elements + 4
        wq_elems[p.layer] = p.elements
    float_total = 0
    quant_weight_float = 0
    for name, t in list(root.named_parameters()) + list(root.named_buffers()):
        if ".weight_quant." in name or ".act_quant." in name or "_quant." in name:
            continue  # quantizer state (θ, bits, EMA) is not part of the deployed model
        nbytes = t.numel() * t.element_size()
        float_total += nbytes
        owner = name.rsplit(".", 1)[0]
        is_qweight = (name.endswith(".weight") and owner in wq_elems) or (
            name.endswith(".in_proj_weight") and owner + ".in_proj" in wq_elems)
        if is_qweight:
            quant_weight_float += nbytes
    rest = float_total - quant_weight_float
    return {"quantized": int(total_q + rest), "float_model": int(float_total), "int8": int(int8 + rest)}


# ----------------------------------------------------------------------------------------- repair
def _weight_tensor_of(root: nn.Module, qname: str) -> Optional[torch.Tensor]:
    layer = _layer_of(qname)
    try:
        if layer.endswith(".in_proj"):
            return root.get_submodule(layer[: -len(".in_proj")]).in_proj_weight
        mod = root.get_submodule(layer)
    except AttributeError:
        mod = None
    if mod is not None and isinstance(getattr(mod, "weight", None), torch.Tensor):
        return mod.weight
    # functional vertices: FunctionalQuant(param_name=...)
    parent = root.get_submodule(qname.rpartition(".")[0]) if "." in qname else root
    pname = getattr(parent, "param_name", None)
    if pname:
        try:
            return root.get_parameter(pname)
        except AttributeError:
            return None
    return None


@torch.no_grad()
def _quant_error(q: Quantizer, x: torch.Tensor, bits: int, grad_sq: Optional[torch.Tensor]) -> float:
    from . import functional as AF

    xin = q._prep(x.detach().float())
    y = AF.quantize(xin, q.scheme, bits, per_channel=q.per_channel, backend="torch")
    err = (y - xin) ** 2
    if grad_sq is not None:
        err = err * q._prep(grad_sq.float())
    return float(err.sum())


def repair_budget(model: nn.Module, weight_target: Optional[float] = None, act_target: Optional[float] = None,
                  *, size_budget_bytes: Optional[int] = None, calib_inputs: Any = None,
                  loss_fn: Optional[Callable] = None, calib_targets: Any = None) -> List[dict]:
    """Greedy budget repair (SPEC decisions, beyond the paper): while an element-weighted average
    (or the model size) is above its target, lower by one bit the quantizer whose estimated loss
    increase per element (per byte) saved is smallest, never below its scheme's minimum.

    The loss increase of b → b−1 is estimated as Σ_i g_i²·(q_{b−1}(x)_i − q_b(x)_i)² (diagonal
    empirical Fisher, with g the gradient at the quantizer's output from one calibration batch
    when ``calib_inputs``/``calib_targets``/``loss_fn`` are given; otherwise g = 1, the
    quantization error increase). Activation quantizers need a calibration batch for their
    inputs; without one they are lowered by the plain element-count rule (largest first).
    Modifies the bits of the model's :class:`Quantizer` s in place (frozen afterwards) and returns
    the list of steps taken. Raises :class:`BudgetError` if the target cannot be met.
    """
    root = _unwrap(model)
    st = getattr(root, "_autoqnn", None)
    cfg = st["config"] if st else SearchConfig()
    wt = cfg.weight_target if weight_target is None else weight_target
    at = cfg.act_target if act_target is None else act_target
    qs = {n: q for n, q in _quantizers(root) if q.enabled}
    for n, q in qs.items():
        if not isinstance(q, Quantizer):
            raise ValueError(f"repair_budget: {n} is still a scheme mixture; call fix_schemes() first")
        if q.elements is None:
            raise RuntimeError(f"repair_budget: quantizer {n!r} has not run yet (no element count)")
    bits = {n: q.int_bits() for n, q in qs.items()}

    # inputs and output-gradients of every quantizer on one calibration batch
    acts: Dict[str, torch.Tensor] = {}
    grads: Dict[str, torch.Tensor] = {}
    if calib_inputs is not None:
        hooks = []

        def mk(name):
            def hook(mod, inp, out):
                acts[name] = inp[0].detach()
                if out.requires_grad:
                    out.register_hook(lambda g: grads.__setitem__(name, g.detach() ** 2))
            return hook

        for n, q in qs.items():
            hooks.append(q.register_forward_hook(mk(n)))
        was = root.training
        root.eval()
        try:
            with torch.enable_grad():
                ins = calib_inputs if isinstance(calib_inputs, (tuple, list)) else (calib_inputs,)
                out = root(*ins)
                if loss_fn is not None and calib_targets is not None:
                    loss_fn(out, calib_targets).backward()
        finally:
            for h in hooks:
                h.remove()
            root.train(was)
            root.zero_grad(set_to_none=True)

    def cost(n: str) -> float:
        q = qs[n]
        b = bits[n]
        x = acts.get(n)
        if x is None and q.kind == "weight":
            x = _weight_tensor_of(root, n)
        if x is None:
            return 1.0 / max(q.elements, 1)  # no data: prefer the largest tensors
        g = grads.get(n)
        e_lo = _quant_error(q, x, b - 1, g)
        e_hi = _quant_error(q, x, b, g)
        scale = 1.0 if q.kind == "weight" else 1.0 / max(x.shape[0] if x.dim() > 1 else 1, 1)
        return max(e_lo - e_hi, 0.0) * scale / max(q.elements, 1)

    steps = []

    def lowerable(kind=None):
        out = []
        for n, q in qs.items():
            if kind and q.kind != kind:
                continue
            if bits[n] - 1 >= scheme_info(q.scheme).min_bits:
                out.append(n)
        return out

    def avg(kind):
        rows = [(bits[n], q.elements) for n, q in qs.items() if q.kind == kind]
        den = sum(e for _, e in rows)
        return None if not rows or den == 0 else sum(b * e for b, e in rows) / den

    cache: Dict[tuple, float] = {}

    def cached_cost(n):
        key = (n, bits[n])
        if key not in cache:
            cache[key] = cost(n)
        return cache[key]

    for kind, target in (("weight", wt), ("activation", at)):
        while True:
            a = avg(kind)
            if a is None or a <= target + 1e-9:
                break
            cands = lowerable(kind)
            if not cands:
                raise BudgetError(f"{kind} average {a:.3f} bits cannot reach the target {target}: every {kind} "
                                  "quantizer is already at its scheme's minimum bits")
            best = min(cands, key=cached_cost)
            steps.append({"quantizer": best, "kind": kind, "from": bits[best], "to": bits[best] - 1,
                          "cost_per_element": cached_cost(best)})
            bits[best] -= 1
    if size_budget_bytes is not None:
        def size_now():
            plan = [LayerPlan(n, _layer_of(n), q.kind, q.scheme, bits[n], q.elements) for n, q in qs.items()]
            return model_size_bytes(root, plan)["quantized"]
        while size_now() > size_budget_bytes:
            cands = lowerable("weight")
            if not cands:
                raise BudgetError(f"model size {size_now()} bytes cannot reach the budget {size_budget_bytes}: "
                                  "every weight quantizer is at its minimum bits (the float parts alone take "
                                  "the rest)")
            best = min(cands, key=cached_cost)
            steps.append({"quantizer": best, "kind": "size", "from": bits[best], "to": bits[best] - 1,
                          "cost_per_element": cached_cost(best)})
            bits[best] -= 1
    # apply: frozen integer bits
    for n, q in qs.items():
        if q.learn_bits or bits[n] != q.int_bits():
            _set_module(root, n, _requantizer(q, bits[n], learn=False))
    return steps


@torch.no_grad()
def recalibrate(model: nn.Module, inputs: Any) -> None:
    """Refresh activation statistics (EMA buffers) on a batch without touching anything else:
    the model runs in eval mode with only its activation quantizers in training mode (needed
    after bits change, e.g. by the budget repair)."""
    root = _unwrap(model)
    was = root.training
    root.eval()
    acts = [q for _, q in _quantizers(root) if q.kind == "activation"]
    for q in acts:
        q.train()
    try:
        root(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    finally:
        root.train(was)


def finalize(model: nn.Module, *, calib_inputs: Any = None, calib_targets: Any = None,
             loss_fn: Optional[Callable] = None) -> List[LayerPlan]:
    """End of the search: mixtures → argmax scheme, learned bits → clip(round(b)), the budget
    repair (``budget="hard"``, optionally with a calibration batch for the loss-sensitivity
    estimate), freeze. Returns the plan. The model stays in the mode it was in."""
    root = _unwrap(model)
    st = getattr(root, "_autoqnn", None)
    cfg = st["config"] if st else SearchConfig()
    learned = {n: float(q.bits.detach()) for n, q in _quantizers(root) if isinstance(q, Quantizer) and q.learn_bits}
    if any(isinstance(q, SchemeMixture) for _, q in _quantizers(root)):
        fix_schemes(root, learn_bits=False)
    steps = []
    if cfg.budget == "hard":
        steps = repair_budget(root, cfg.weight_target, cfg.act_target, size_budget_bytes=cfg.size_budget_bytes,
                      calib_inputs=calib_inputs, calib_targets=calib_targets, loss_fn=loss_fn or F.cross_entropy)
    else:  # soft: only round and freeze
        for n, q in _quantizers(root):
            if isinstance(q, Quantizer) and q.learn_bits:
                _set_module(root, n, _requantizer(q, q.int_bits(), learn=False))
    if calib_inputs is not None:
        recalibrate(root, calib_inputs)
    if st is not None:
        st["phase"] = "finetune"
        st["repair_steps"] = steps
    plan = plan_of(root)
    for p in plan:
        p.learned_bits = learned.get(p.name)
    return plan


# ----------------------------------------------------------------------------------------- trainer
@dataclass
class SearchResult:
    """What :func:`search` returns (and writes as ``result.json`` in the checkpoint dir)."""

    model: nn.Module
    plan: List[LayerPlan]
    float_accuracy: Optional[float]
    quant_accuracy: Optional[float]
    weight_bits: Optional[float]  # achieved, element-weighted
    act_bits: Optional[float]
    weight_target: float
    act_target: float
    size: Dict[str, int]
    history: List[dict]
    config: dict
    qag: dict
    phase_seconds: Dict[str, float]
    repair_steps: List[dict] = field(default_factory=list)
    schemes_searched: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["plan"] = [p.to_dict() for p in self.plan]
        return d

    def summary(self) -> str:
        f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        return (f"float acc {f(self.float_accuracy)} | quantized acc {f(self.quant_accuracy)} | "
                f"W bits {f(self.weight_bits)} (target {self.weight_target}) | "
                f"A bits {f(self.act_bits)} (target {self.act_target}) | "
                f"size {self.size.get('quantized', 0)} B vs float {self.size.get('float_model', 0)} B")


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


class _EpochSampler(torch.utils.data.Sampler):
    """Deterministic per-(seed, epoch) order, sharded over ranks, starting at a batch offset
    (mid-epoch resume)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, shuffle: bool, rank: int, world: int,
                 start_batch: int = 0, drop_last: bool = True):
        self.n, self.bs, self.seed, self.epoch = n, batch_size, seed, epoch
        self.shuffle, self.rank, self.world, self.start = shuffle, rank, world, start_batch
        self.drop_last = drop_last

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        per_rank = len(idx) // self.world if self.drop_last or self.world > 1 else len(idx)
        idx = idx[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world > 1 else idx
        if self.drop_last:
            idx = idx[: (len(idx) // self.bs) * self.bs] if len(idx) >= self.bs else idx
        return idx[self.start * self.bs:]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self):
        return len(self._indices())


def _loader(ds, batch_size, seed, epoch, shuffle, start_batch, num_workers, drop_last=True, shard=True):
    """Batches of ``ds`` in a deterministic order; ``shard``: this rank's share of the epoch,
    else the same batches on every rank (what rank 0 of a sharded loader would see first)."""
    _, rank, world = _dist() if shard else (None, 0, 1)
    sampler = _EpochSampler(len(ds), batch_size, seed, epoch, shuffle, rank, world, start_batch, drop_last)
    # a private generator: creating the iterator must not consume the global RNG (dropout
    # streams stay identical across a mid-epoch resume)
    gen = torch.Generator().manual_seed(seed * 7 + epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       drop_last=False, generator=gen)


def _steps_per_epoch(ds, cfg: SearchConfig) -> int:
    _, _, world = _dist()
    n = len(ds) // world
    s = max(n // cfg.batch_size, 1)
    if cfg.max_steps_per_epoch:
        s = min(s, cfg.max_steps_per_epoch)
    return s


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 512, device=None,
             loss_fn: Callable = F.cross_entropy, max_batches: Optional[int] = None) -> Dict[str, float]:
    """Top-1 accuracy and mean loss of a classifier over ``data`` (a Dataset of (x, y) or an
    iterable of batches); sharded over DDP ranks and all-reduced."""
    dist, rank, world = _dist()
    device = device or next(_unwrap(model).parameters()).device
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    if isinstance(data, torch.utils.data.Dataset):
        n = len(data)
        lo, hi = (n * rank) // world, (n * (rank + 1)) // world
        shard = torch.utils.data.Subset(data, range(lo, hi))
        it = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    else:
        it = data
    try:
        for i, (x, y) in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(loss_fn(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was)
    if dist is not None:
        t = torch.stack([correct, total, loss_sum]).to(
            device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        correct, total, loss_sum = (v.cpu() for v in t)
    total_f = max(float(total), 1.0)
    return {"accuracy": float(correct) / total_f, "loss": float(loss_sum) / total_f, "samples": int(total)}


def _param_groups(model: nn.Module, cfg: SearchConfig, phase: str) -> List[dict]:
    root = _unwrap(model)
    theta_ids, bits_ids = set(), set()
    for _, q in _quantizers(root):
        if isinstance(q, SchemeMixture):
            theta_ids.add(id(q.theta))
        elif isinstance(q, Quantizer) and q.learn_bits:
            bits_ids.add(id(q.bits))
    decay, no_decay, thetas, bitss = [], [], [], []
    seen = set()
    for name, p in root.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in theta_ids:
            thetas.append(p)
        elif id(p) in bits_ids:
            bitss.append(p)
        elif p.dim() > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    lr = (cfg.float_lr or cfg.lr) if phase == "float" else cfg.lr
    groups = [{"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": "weights", "base_lr": lr},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay", "base_lr": lr}]
    extra = []
    if thetas:
        extra.append({"params": thetas, "lr": cfg.theta_lr, "weight_decay": 0.0, "name": "theta",
                      "base_lr": cfg.theta_lr})
    if bitss:
        extra.append({"params": bitss, "lr": cfg.bits_lr, "weight_decay": 0.0, "name": "bits",
                      "base_lr": cfg.bits_lr})
    return [g for g in groups if g["params"]], extra


class _Optim:
    """Weights with SGD/Adam, θ and bits with their own Adam (SPEC: own groups and lrs)."""

    def __init__(self, model, cfg: SearchConfig, phase: str):
        groups, extra = _param_groups(model, cfg, phase)
        if cfg.optimizer == "sgd":
            self.main = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        else:
            self.main = torch.optim.AdamW(groups, lr=groups[0]["lr"])
        self.arch = torch.optim.Adam(extra, betas=(0.5, 0.999)) if extra else None
        self.opts = [o for o in (self.main, self.arch) if o is not None]

    def set_lr_factor(self, f: float) -> None:
        for o in self.opts:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * (f if g["name"] in ("weights", "no_decay") else 1.0)

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self):
        for o in self.opts:
            o.step()

    def state_dict(self):
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, sd):
        if len(sd) != len(self.opts):
            raise ValueError("checkpoint optimizer state does not match this phase's optimizers")
        for o, s in zip(self.opts, sd):
            o.load_state_dict(s)


def _lr_factor(cfg: SearchConfig, epoch: int, step: int, epochs: int, steps: int) -> float:
    if cfg.lr_schedule == "constant" or epochs == 0:
        return 1.0
    t = (epoch + step / max(steps, 1)) / epochs
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir) -> Optional[Path]:
    """The newest complete checkpoint in a directory (``ckpt-*.pt``, by recorded progress)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    best, best_key = None, None
    for p in d.glob("ckpt-*.pt"):
        try:
            parts = p.stem.split("-")  # ckpt-<phaseidx>-<epoch>-<step>
            key = tuple(int(v) for v in parts[1:4])
        except ValueError:
            continue
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def _prune_checkpoints(ckpt_dir: Path, keep: int = 2) -> None:
    """Keep the ``keep`` newest checkpoints (names sort by phase, epoch, step)."""
    for old in sorted(Path(ckpt_dir).glob("ckpt-*.pt"))[:-keep]:
        try:
            old.unlink()
        except OSError:
            pass


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _log(msg: str, quiet: bool = False) -> None:
    _, rank, _ = _dist()
    if rank == 0 and not quiet:
        print(msg, flush=True)


def _example_batch(ds, n: int = 2):
    xs = [ds[i][0] for i in range(min(n, len(ds)))]
    return torch.stack(xs)


def _layout(model: nn.Module, cfg: SearchConfig) -> nn.Module:
    """With ``cfg.channels_last``, every 4-D parameter (the convolution weights) in channels-last
    memory format, in place; 5-D ones (Conv3d) and everything else keep theirs."""
    if cfg.channels_last:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


def search(model: nn.Module, train_data, val_data=None, config=None, *, loss_fn: Callable = F.cross_entropy,
           callbacks: Sequence[Callable] = (), quiet: bool = False, progress: Optional[Callable] = None) -> SearchResult:
    """Algorithm 2 end to end (SPEC 5.2): float training (optional) → QAG → QSS for
    ``search_epochs`` → fix the argmax schemes → QPL for ``precision_epochs`` → round + budget
    repair → fine-tune for ``finetune_epochs`` → evaluate.

    ``train_data``/``val_data`` are map-style datasets of ``(input, label)``; ``loss_fn(out, y)``
    is the task loss (cross-entropy by default; it must accept ``reduction="sum"`` for
    evaluation). Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in
    DDP, data and evaluation are sharded, and only rank 0 logs and writes. ``callbacks`` are
    called as ``cb(event, info)`` with events ``"step"``, ``"epoch"``, ``"phase"``.

    Checkpoints (``checkpoint_dir``) hold the full state and are written atomically every epoch
    and every ``checkpoint_every_steps``; ``resume="auto"`` continues from the latest.

    ``model`` itself is trained in place during the float phase (``float_epochs > 0``) and is
    otherwise left untouched: QAG works on a copy.
    """
    cfg = _as_search_config(config)
    if not cfg.deterministic:
        return _search(model, train_data, val_data, cfg, loss_fn=loss_fn, callbacks=callbacks, quiet=quiet,
                       progress=progress)
    # deterministic mode: torch's global flags only for the duration of the search
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        return _search(model, train_data, val_data, cfg, loss_fn=loss_fn, callbacks=callbacks, quiet=quiet,
                       progress=progress)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench


def _search(model: nn.Module, train_data, val_data, cfg, *, loss_fn: Callable, callbacks: Sequence[Callable],
            quiet: bool, progress: Optional[Callable]) -> SearchResult:
    """The implementation of :func:`search` (config already validated)."""
    dist, rank, world = _dist()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if cfg.device == "auto":
        if dist is not None and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if len(train_data) < cfg.batch_size * world:
        raise ValueError(f"train_data has {len(train_data)} samples, fewer than one batch of {cfg.batch_size} "
                         f"per process ({world} processes): lower batch_size")
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    example = _example_batch(train_data).to(device)

    # ---- resume
    ckpt = None
    if cfg.resume is not None:
        path = latest_checkpoint(ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and ckpt_dir is None:
            raise ValueError("resume='auto' needs checkpoint_dir")
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") != "autoqnn-checkpoint" or ckpt.get("version") != 1:
                raise ValueError(f"{path} is not an autoqnn checkpoint (format/version mismatch)")
            saved_cfg = SearchConfig.from_dict(json.loads(ckpt["config"]))
            if saved_cfg.quant.to_dict() != cfg.quant.to_dict():
                raise ValueError(f"resume: the checkpoint {path} was written with a different quantization "
                                 "config; resume with the same config or start a new checkpoint_dir")
            _log(f"[autoqnn] resuming from {path} (phase {ckpt['phase']}, epoch {ckpt['epoch']}, "
                 f"step {ckpt['step_in_epoch']})", quiet)

    history: List[dict] = list(ckpt["history"]) if ckpt else []
    phase_seconds: Dict[str, float] = dict(ckpt["phase_seconds"]) if ckpt else {}
    float_acc = ckpt["float_accuracy"] if ckpt else None
    searched_probs = dict(ckpt.get("searched_probs", {})) if ckpt else {}
    repair_steps = list(ckpt.get("repair_steps", [])) if ckpt else []
    start_phase = ckpt["phase"] if ckpt else ("float" if cfg.float_epochs > 0 else "search")
    float_model = _layout(model.to(device), cfg)

    # ---- the float phase
    phases = [p for p in PHASES[:-1] if PHASES.index(p) >= PHASES.index(start_phase)]
    if cfg.quant.mode == "fixed" and "search" in phases:
        phases.remove("search")

    qmodel = None
    plan_schemes = ckpt.get("schemes") if ckpt else None
    plan_bits = ckpt.get("bits") if ckpt else None

    def build_qmodel(phase):
        qm = prepare(float_model, cfg, example)
        if phase in ("precision", "finetune", "done") and plan_schemes:
            apply_schemes(qm, plan_schemes, learn_bits=phase == "precision" and cfg.precision_epochs > 0,
                          bits=plan_bits if phase != "precision" else None)
            if phase != "precision":
                for n, q in _quantizers(qm):
                    if isinstance(q, Quantizer) and q.learn_bits:
                        _set_module(qm, n, _requantizer(q, q.int_bits(), learn=False))
        elif phase in ("precision",) and cfg.quant.mode == "fixed" and cfg.precision_epochs > 0:
            fix_schemes(qm, learn_bits=True)
        return _layout(qm.to(device), cfg)

    def wrap(m):
        if dist is None:
            return m
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(m, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True)

    def emit(event, info):
        for cb in callbacks:
            cb(event, info)

    global_step = ckpt["global_step"] if ckpt else 0
    learned_bits: Dict[str, float] = {}

    def run_phase(phase: str, net: nn.Module, epochs: int, start_epoch: int, start_step: int, opt_state=None):
        batcher = WeightBatcher(net) if phase == "search" and epochs and cfg.batch_weights else None
        try:
            run_phase_body(phase, net, epochs, start_epoch, start_step, opt_state)
        finally:
            if batcher is not None:
                batcher.remove()

    def run_phase_body(phase: str, net: nn.Module, epochs: int, start_epoch: int, start_step: int, opt_state=None):
        nonlocal global_step
        if epochs == 0:
            return
        t0 = time.perf_counter()
        train_net = _compiled(wrap(net), cfg)
        opt = _Optim(net, cfg, phase)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        steps = _steps_per_epoch(train_data, cfg)
        for epoch in range(start_epoch, epochs):
            if phase == "search":
                e = epoch
                set_temperature(net, cfg.quant.temperature(e, epochs))
            first = start_step if epoch == start_epoch else 0
            loader = _loader(train_data, cfg.batch_size, cfg.seed, PHASES.index(phase) * 10_000 + epoch, True,
                             first, cfg.num_workers)
            net.train()
            tl, tc, tn, tp = 0.0, 0.0, 0, 0.0
            te = time.perf_counter()
            for i, (x, y) in enumerate(loader, start=first):
                if i >= steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                opt.set_lr_factor(_lr_factor(cfg, epoch, i, epochs, steps))
                if phase == "search":
                    set_step(net, global_step)
                    if cfg.temperature_per_step:
                        set_temperature(net, cfg.quant.temperature(epoch + i / steps, epochs))
                # QPL: the learned bits read on the host once per step, in one transfer (not in
                # every quantizer call: each read would synchronise a GPU's stream); a compiled
                # step does that itself (compile_model)
                with bits_on_host(net) if phase == "precision" and not cfg.compile else contextlib.nullcontext():
                    out = train_net(x)
                    loss = loss_fn(out, y)
                    total = loss
                    if phase == "precision":
                        lp = precision_loss(net)
                        total = loss + lp
                    opt.zero_grad()
                    total.backward()
                if phase == "precision":
                    tp += float(lp.detach())
                if not torch.isfinite(total.detach()):
                    raise FloatingPointError(f"{phase} epoch {epoch} step {i}: loss is {float(total)}; lower the "
                                             "learning rate")
                opt.step()
                if phase == "precision":
                    clamp_bits_(net)
                global_step += 1
                tl += float(loss.detach()) * y.numel()
                tc += float((out.detach().argmax(1) == y).sum()) if out.dim() == 2 else 0.0
                tn += y.numel()
                if cfg.log_every and (i + 1) % cfg.log_every == 0:
                    _log(f"  [{phase}] epoch {epoch + 1}/{epochs} step {i + 1}/{steps} loss {float(loss):.4f}", quiet)
                if progress is not None:
                    progress(phase, epoch, i + 1, steps, loss.item())
                if ckpt_dir and cfg.checkpoint_every_steps and (i + 1) % cfg.checkpoint_every_steps == 0 and i + 1 < steps:
                    save(phase, net, opt, epoch, i + 1)
                emit("step", {"phase": phase, "epoch": epoch, "step": i + 1, "global_step": global_step,
                              "loss": loss.item()})
            rec = {"phase": phase, "epoch": epoch + 1, "epochs": epochs, "global_step": global_step,
                   "train_loss": tl / max(tn, 1), "train_acc": tc / max(tn, 1), "seconds": time.perf_counter() - te}
            if phase == "search":
                info = on_epoch_end(net, epoch, epochs)
                rec["tau"] = cfg.quant.temperature(epoch, epochs)
                rec["probs"] = info["probs"]
                if info["pruned"]:
                    rec["pruned"] = info["pruned"]
            if phase == "precision":
                rec["precision_loss"] = tp / max(steps - (first if epoch == start_epoch else 0), 1)
                rec["bits"] = {n: float(q.bits.detach()) for n, q in _quantizers(net)
                               if isinstance(q, Quantizer) and q.learn_bits}
            if phase != "float":
                wb = average_bits(net, "weight")
                ab = average_bits(net, "activation")
                rec["avg_weight_bits"] = None if wb is None else float(wb)
                rec["avg_act_bits"] = None if ab is None else float(ab)
            if val_data is not None:
                with warnings.catch_warnings():
                    # QPL: the optimizer step may just have moved a learned bitwidth to a new
                    # integer, so the EMA statistics (collected at the old one) do not apply;
                    # the quantizer falls back to batch statistics, which is expected here
                    if phase == "precision":
                        warnings.filterwarnings("ignore", message=".*EMA statistics were collected at bits")
                    ev = evaluate(net, val_data, batch_size=cfg.eval_batch_size, device=device, loss_fn=loss_fn)
                rec["val_acc"], rec["val_loss"] = ev["accuracy"], ev["loss"]
            history.append(rec)
            _log(f"[autoqnn] {phase} epoch {epoch + 1}/{epochs}: loss {rec['train_loss']:.4f}"
                 + (f" val acc {rec['val_acc']:.4f}" if "val_acc" in rec else "")
                 + (f" tau {rec['tau']:.3g}" if "tau" in rec else "")
                 + (f" W {rec['avg_weight_bits']:.2f}b A {rec['avg_act_bits']:.2f}b"
                    if rec.get("avg_weight_bits") is not None and rec.get("avg_act_bits") is not None else ""), quiet)
            phase_seconds[phase] = phase_seconds.get(phase, 0.0) + (time.perf_counter() - t0)
            t0 = time.perf_counter()
            nxt = (phase, epoch + 1) if epoch + 1 < epochs else None
            if ckpt_dir and nxt:
                save(phase, net, opt, epoch + 1, 0)
            emit("epoch", rec)

    def save(phase, net, opt, epoch, step, schemes=None, bits=None):
        rng = _rng_state()
        if dist is not None:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng)
            rngs = gathered
        else:
            rngs = [rng]
        if rank != 0:
            return
        sch = schemes if schemes is not None else plan_schemes
        bts = bits if bits is not None else plan_bits
        state = {
            "format": "autoqnn-checkpoint", "version": 1, "phase": phase, "epoch": epoch, "step_in_epoch": step,
            "global_step": global_step, "model": _unwrap(net).state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None, "rng": rngs,
            "config": json.dumps(cfg.to_dict()), "history": history, "phase_seconds": phase_seconds,
            "float_accuracy": float_acc, "schemes": sch, "bits": bts, "searched_probs": searched_probs,
            "repair_steps": repair_steps, "world_size": world,
        }
        name = f"ckpt-{PHASES.index(phase)}-{epoch:04d}-{step:07d}.pt"
        _atomic_torch_save(state, ckpt_dir / name)
        _prune_checkpoints(ckpt_dir)

    def restore(net, opt_holder_phase):
        _unwrap(net).load_state_dict(ckpt["model"])
        rngs = ckpt["rng"]
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
        else:
            warnings.warn(f"checkpoint written by {len(rngs)} processes, resuming with {world}: RNG streams "
                          "restart from the seed", RuntimeWarning)

    # ------------------------------------------------------------------ run the phases
    for phase in phases:
        resuming_here = ckpt is not None and ckpt["phase"] == phase
        start_epoch = ckpt["epoch"] if resuming_here else 0
        start_step = ckpt["step_in_epoch"] if resuming_here else 0
        emit("phase", {"phase": phase})
        if phase == "float":
            if resuming_here:
                restore(float_model, phase)
            run_phase("float", float_model, cfg.float_epochs, start_epoch, start_step,
                      ckpt["optimizer"] if resuming_here else None)
            if val_data is not None and float_acc is None:
                float_acc = evaluate(float_model, val_data, batch_size=cfg.eval_batch_size, device=device,
                                     loss_fn=loss_fn)["accuracy"]
                _log(f"[autoqnn] float accuracy {float_acc:.4f}", quiet)
            if ckpt_dir:
                save("search", float_model, None, 0, 0)
            ckpt = None
            continue
        if qmodel is None:
            if float_acc is None and val_data is not None:
                float_acc = evaluate(float_model, val_data, batch_size=cfg.eval_batch_size, device=device,
                                     loss_fn=loss_fn)["accuracy"]
                _log(f"[autoqnn] float accuracy {float_acc:.4f}", quiet)
            if ckpt is not None and ckpt["phase"] == "search" and ckpt["epoch"] == 0 and ckpt["step_in_epoch"] == 0 \
                    and ckpt.get("optimizer") is None:
                float_model.load_state_dict(ckpt["model"])  # the float-phase hand-over checkpoint
                _set_rng_state(ckpt["rng"][rank]) if len(ckpt["rng"]) == world else None
                ckpt, resuming_here = None, False
                start_epoch = start_step = 0
            qmodel = build_qmodel(phase)
        if resuming_here:
            restore(qmodel, phase)
        if phase == "search":
            run_phase("search", qmodel, cfg.search_epochs, start_epoch, start_step,
                      ckpt["optimizer"] if resuming_here else None)
            searched_probs = scheme_probs(qmodel)
            plan_schemes = fix_schemes(qmodel, learn_bits=cfg.precision_epochs > 0)
            qmodel.to(device)
            ckpt = None
            if ckpt_dir:
                save("precision", qmodel, None, 0, 0)
            continue
        if phase == "precision":
            if plan_schemes is None:
                plan_schemes = {n: q.scheme for n, q in _quantizers(qmodel)}
            opt_state = ckpt["optimizer"] if resuming_here else None
            run_phase("precision", qmodel, cfg.precision_epochs, start_epoch, start_step, opt_state)
            # round + repair (a calibration batch for the sensitivity estimate; same on every rank)
            cal = _loader(train_data, min(cfg.batch_size, len(train_data)), cfg.seed, 999_999, True, 0, 0, shard=False)
            cx, cy = next(iter(cal))
            plan = finalize(qmodel, calib_inputs=cx.to(device), calib_targets=cy.to(device), loss_fn=loss_fn)
            learned_bits = {p.name: p.learned_bits for p in plan if p.learned_bits is not None}
            qmodel.to(device)
            repair_steps = list(_state(qmodel).get("repair_steps", []))
            plan_bits = {p.name: p.bits for p in plan}
            plan_schemes = {p.name: p.scheme for p in plan}
            learned = {p.name: p.learned_bits for p in plan if p.learned_bits is not None}
            history.append({"phase": "round", "learned_bits": learned, "bits": plan_bits,
                            "avg_weight_bits": _plan_average(plan, "weight"),
                            "avg_act_bits": _plan_average(plan, "activation")})
            ckpt = None
            if ckpt_dir:
                save("finetune", qmodel, None, 0, 0)
            continue
        if phase == "finetune":
            opt_state = ckpt["optimizer"] if resuming_here else None
            run_phase("finetune", qmodel, cfg.finetune_epochs, start_epoch, start_step, opt_state)
            ckpt = None

    if qmodel is None:  # resumed at "done"
        qmodel = build_qmodel("done")
        if ckpt is not None:
            restore(qmodel, "done")
    # a model that never went through finalize (e.g. precision_epochs == 0 path): make sure it is final
    if any(isinstance(q, SchemeMixture) or (isinstance(q, Quantizer) and q.learn_bits) for _, q in _quantizers(qmodel)):
        finalize(qmodel)
        qmodel.to(device)
    plan = plan_of(qmodel)
    if not learned_bits:
        for h in history:
            if h.get("phase") == "round":
                learned_bits = dict(h.get("learned_bits") or {})
    for p in plan:
        p.learned_bits = learned_bits.get(p.name)
    qmodel.eval()
    quant_acc = None
    if val_data is not None:
        quant_acc = evaluate(qmodel, val_data, batch_size=cfg.eval_batch_size, device=device, loss_fn=loss_fn)["accuracy"]
    res = SearchResult(
        model=qmodel, plan=plan, float_accuracy=float_acc, quant_accuracy=quant_acc,
        weight_bits=_plan_average(plan, "weight"), act_bits=_plan_average(plan, "activation"),
        weight_target=cfg.weight_target, act_target=cfg.act_target, size=model_size_bytes(qmodel, plan),
        history=history, config=cfg.to_dict(), qag=_state(qmodel)["report"].to_dict(),
        phase_seconds=phase_seconds, repair_steps=repair_steps, schemes_searched=searched_probs)
    if ckpt_dir and rank == 0:
        save_done = {"format": "autoqnn-checkpoint", "version": 1, "phase": "done", "epoch": 0, "step_in_epoch": 0,
                     "global_step": global_step, "model": qmodel.state_dict(), "optimizer": None,
                     "rng": [_rng_state()] * world, "config": json.dumps(cfg.to_dict()), "history": history,
                     "phase_seconds": phase_seconds, "float_accuracy": float_acc, "schemes": {p.name: p.scheme for p in plan},
                     "bits": {p.name: p.bits for p in plan}, "searched_probs": searched_probs,
                     "repair_steps": repair_steps, "world_size": world}
        _atomic_torch_save(save_done, ckpt_dir / f"ckpt-{PHASES.index('done')}-0000-0000000.pt")
        _prune_checkpoints(ckpt_dir)
        _atomic_write_text(ckpt_dir / "result.json", json.dumps(res.to_dict(), indent=2, default=str))
    emit("done", {"result": res})
    return res
