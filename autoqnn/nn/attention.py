# SPDX-License-Identifier: MIT
"""``QMultiheadAttention``: a drop-in for ``nn.MultiheadAttention`` whose input projection and
output projection are quantized vertices (SPEC 5.1: Linear layers are expensive vertices).

``nn.MultiheadAttention`` applies ``in_proj_weight`` and ``out_proj.weight`` inside
``F.multi_head_attention_forward`` (and, in eval, a fused native kernel), so swapping Linear
modules never reaches them. This twin computes the same function in plain PyTorch ops: the input
projection with a quantized ``in_proj_weight`` on quantized query/key/value, scaled dot-product
attention, and ``out_proj`` as a :class:`~autoqnn.nn.QLinear`. Same constructor, same
``state_dict`` keys (plus ``in_weight_quant.*``, ``in_act_quant.*``, ``out_proj.*_quant.*``).

Supported: packed projections (kdim == vdim == embed_dim), no ``add_bias_kv``, no
``add_zero_attn``; :func:`supports` says whether a module qualifies (QAG reports the others).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QLinear, rebind

__all__ = ["QMultiheadAttention", "supports"]


def supports(mha: nn.MultiheadAttention) -> Optional[str]:
    """None when ``mha`` can be converted, else the reason it cannot."""
    if not mha._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim/vdim != embed_dim) are not supported yet"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv is not supported yet"
    if mha.add_zero_attn:
        return "add_zero_attn is not supported yet"
    return None


class QMultiheadAttention(nn.MultiheadAttention):
    def __init__(self, *args, in_weight_quant: Optional[nn.Module] = None,
                 in_act_quant: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        why = supports(self)
        if why:
            raise ValueError(f"QMultiheadAttention: {why}")
        self.in_weight_quant = in_weight_quant
        self.in_act_quant = in_act_quant
        if not isinstance(self.out_proj, QLinear):
            self.out_proj = QLinear.from_float(_as_linear(self.out_proj))

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, in_weight_quant=None, in_act_quant=None,
                   out_weight_quant=None, out_act_quant=None) -> "QMultiheadAttention":
        """The quantized twin of ``mha`` sharing its Parameters."""
        why = supports(mha)
        if why:
            raise ValueError(f"QMultiheadAttention.from_float: {why}")
        q = rebind(mha, cls)
        q.in_weight_quant = in_weight_quant
        q.in_act_quant = in_act_quant
        q.out_proj = QLinear.from_float(_as_linear(mha.out_proj), out_weight_quant, out_act_quant)
        return q

    def to_float(self) -> nn.MultiheadAttention:
        out = self.out_proj
        lin = rebind(out, nn.modules.linear.NonDynamicallyQuantizableLinear, {})
        f = rebind(self, nn.MultiheadAttention, {"out_proj": lin})
        for k in ("in_weight_quant", "in_act_quant"):
            f.__dict__.pop(k, None)
        return f

    def _q_in(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.in_act_quant is None else self.in_act_quant(t)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value)) if query.dim() == 3 else (query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, B, E = query.shape
        S = key.shape[0]
        H = self.num_heads
        d = E // H
        w = self.in_proj_weight if self.in_weight_quant is None else self.in_weight_quant(self.in_proj_weight)
        b = self.in_proj_bias
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        xq = self._q_in(query)
        xk = xq if key is query else self._q_in(key)
        xv = xk if value is key else (xq if value is query else self._q_in(value))
        q = F.linear(xq, wq, bq)
        k = F.linear(xk, wk, bk)
        v = F.linear(xv, wv, bv)
        # [L, B, E] -> [B, H, L, d]
        q = q.reshape(L, B, H, d).permute(1, 2, 0, 3)
        k = k.reshape(S, B, H, d).permute(1, 2, 0, 3)
        v = v.reshape(S, B, H, d).permute(1, 2, 0, 3)
        mask = _merge_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / (d ** 0.5)
            if is_causal and mask is None:
                mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, -1)
            attn_d = F.dropout(attn, dropout) if dropout > 0 else attn
            out = attn_d @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=bool(is_causal and mask is None))
            attn = None
        out = self.out_proj(out.permute(0, 2, 1, 3).reshape(B, L, E))  # batch first: per-sample stats
        if attn is not None:
            attn = attn.mean(1) if average_attn_weights else attn
        if unbatched:
            out = out.squeeze(0)
            attn = attn.squeeze(0) if attn is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, attn


def _as_linear(m: nn.Module) -> nn.Linear:
    """MHA's out_proj is a ``NonDynamicallyQuantizableLinear``: view it as a plain Linear."""
    if type(m) is nn.Linear or isinstance(m, QLinear):
        return m
    lin = rebind(m, nn.Linear, {})
    return lin


def _merge_masks(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """One additive float mask broadcastable to [B, H, L, S] (None when there is none)."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        else:
            m = m.to(dtype)
        if m.dim() == 3:  # [B*H, L, S]
            m = m.reshape(B, H, L, S)
        mask = m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        else:
            k = k.to(dtype)
        k = k.reshape(B, 1, 1, S)
        mask = k if mask is None else mask + k
    return mask
