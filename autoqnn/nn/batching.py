# SPDX-License-Identifier: MIT
"""Batched weight quantization for the QSS search: every weight vertex of a model in one
:func:`autoqnn.functional.quantize_mixture_batched` call per forward instead of one call each.

>>> from autoqnn.nn import WeightBatcher
>>> batcher = WeightBatcher(qmodel)      # a forward pre-hook on qmodel
>>> loss = loss_fn(qmodel(x), y)         # weights quantized in one batched call
>>> batcher.remove()

Values and gradients are those of the per-layer path: the same Gumbel noise, step counter and
mixture weights per vertex, and the batched kernels are bit-identical per tensor (C++ CPU;
see tests/test_batched.py). Only vertices that would run the full mixture are batched: weight
:class:`~autoqnn.nn.SchemeMixture` modules in training mode, enabled, without pruned candidates;
vertices with the same candidates, bits, per-channel setting, backend, dtype and device form one
call. Only the quantized layers of :mod:`autoqnn.nn.layers` (QConv*, QLinear), which hand their
own ``weight`` to the vertex, are batched. Everything else (eval mode, fixed quantizers,
functional-call vertices, attention, torch.compile tracing) takes the per-layer path unchanged.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .. import functional as AF
from .layers import QUANT_LAYERS, QuantLayerMixin
from .quantizers import SchemeMixture

__all__ = ["WeightBatcher"]


class WeightBatcher:
    """Forward pre-hook on ``model`` that quantizes the weights of its QSS weight vertices in
    batched calls; each vertex's own forward then returns its precomputed result (matched by the
    identity of the weight tensor it is given). A forward hook drops results a forward did not
    use (a layer skipped by control flow), so nothing stale survives to the next forward."""

    def __init__(self, model: nn.Module, *, min_group: int = 2):
        self.model = model
        self.min_group = int(min_group)
        self.calls = 0  # batched calls made (for tests and reports)
        self._pending: List[SchemeMixture] = []
        self._handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # ------------------------------------------------------------------ hooks
    def _groups(self) -> Dict[tuple, List[Tuple[SchemeMixture, torch.Tensor]]]:
        groups: Dict[tuple, List[Tuple[SchemeMixture, torch.Tensor]]] = {}
        for layer in self.model.modules():
            # layers whose forward quantizes self.weight itself (functional-call holders and
            # attention pass other tensors: left to the per-layer path)
            if not isinstance(layer, QUANT_LAYERS) or type(layer)._qweight is not QuantLayerMixin._qweight:
                continue
            q = layer.weight_quant
            if not (isinstance(q, SchemeMixture) and q.kind == "weight" and q.enabled and q.training):
                continue
            if len(q._active) < len(q.schemes):  # pruned: the per-layer path evaluates live ones only
                continue
            w = getattr(layer, "weight", None)
            if not isinstance(w, torch.Tensor) or w.numel() == 0 or not w.is_floating_point():
                continue
            key = (q.schemes, tuple(q._bits), q.per_channel, q.backend, w.dtype, w.device)
            groups.setdefault(key, []).append((q, w))
        # a vertex shared by several layers sees several weights per forward: per-layer path
        seen: Dict[int, int] = {}
        for items in groups.values():
            for q, _ in items:
                seen[id(q)] = seen.get(id(q), 0) + 1
        return {k: [(q, w) for q, w in items if seen[id(q)] == 1] for k, items in groups.items()}

    def _pre(self, module, args):
        self._drop()
        if not module.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        for (schemes, bits, per_channel, backend, _, _), items in self._groups().items():
            if len(items) < self.min_group:
                continue
            xs = [q._prep(w) for q, w in items]
            # what SchemeMixture.forward does per vertex: mixture weights with this step's noise
            mw = torch.stack([q.mixture_weights() for q, _ in items])
            ys = AF.quantize_mixture_batched(xs, mw, schemes, list(bits), per_channel=per_channel, backend=backend)
            self.calls += 1
            for (q, w), y in zip(items, ys):
                q._step += 1
                q.step.fill_(q._step)
                q._record(w)
                q._batched = (w, q._unprep(y))
                self._pending.append(q)

    def _post(self, module, args, output):
        self._drop()

    def _drop(self) -> None:
        for q in self._pending:
            q._batched = None
        self._pending = []
