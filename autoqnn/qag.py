# SPDX-License-Identifier: MIT
"""QAG (SPEC 5.1, Algorithm 1): give every expensive vertex of any PyTorch model quantizing
vertices on its weight and its input activation.

Two mechanisms, so nothing is skipped silently:

* **Module swap** — every ``nn.Conv*`` / ``nn.ConvTranspose*`` / ``nn.Linear`` (by class name,
  ``config.layer_types``) becomes its :mod:`autoqnn.nn` twin sharing the same Parameters. This
  reaches every module whatever the model's control flow (fx-traceable or not), and a module
  called twice keeps one set of quantizers (weight sharing).
* **Functional calls** — ``F.conv*`` / ``F.conv_transpose*`` / ``F.linear`` calls whose weight is
  a model Parameter are intercepted at run time by a ``TorchFunctionMode`` active during the
  model's forward. That also reaches calls torch.fx cannot see (data-dependent control flow, or
  functions wrapped as fx leaves, e.g. torchvision's Swin attention, which applies its Linear
  modules' weights with ``F.linear``; ``nn.MultiheadAttention``'s packed input projection). Call
  sites are discovered by running ``example_inputs`` once; without them a torch.fx trace finds
  the call sites of traceable models, and otherwise the report says they could not be looked for.

The :class:`QAGReport` lists every expensive vertex: quantized or not and why, weight and
per-sample activation element counts (what the precision loss weights by), parameters, MACs.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import QuantConfig
from .nn import FLOAT_TO_QUANT, QUANT_LAYERS, QMultiheadAttention, Quantizer, QuantizerBase, SchemeMixture, quantizers
from .nn.attention import supports as _mha_supports
from .schemes import scheme_info

__all__ = ["convert", "QAGReport", "VertexInfo", "QAGError", "FUNCTIONAL_OPS"]


class QAGError(RuntimeError):
    """``convert(..., strict=True)`` found an expensive vertex left in float."""


#: functional expensive ops -> (name, is_transposed_conv)
FUNCTIONAL_OPS = {
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d", F.linear: "linear",
}
_PARAMETRIC_OTHERS = (nn.RNNBase, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)


@dataclass
class VertexInfo:
    name: str
    kind: str  # "module" | "functional"
    op_type: str
    quantized: bool
    reason: str = ""
    weight_elements: Optional[int] = None
    act_elements: Optional[int] = None  # per sample (input numel / batch)
    params: Optional[int] = None
    macs: Optional[int] = None  # per sample
    weight_quant: str = ""
    act_quant: str = ""
    order: Optional[int] = None  # execution order (with example_inputs) or definition order

    @property
    def configured_exclusion(self) -> bool:
        return not self.quantized and self.reason.startswith(("excluded:",))


@dataclass
class QAGReport:
    vertices: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)  # [{"name", "type", "reason"}]
    notes: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        """Quantized / (expensive − configured exclusions); 1.0 when nothing is eligible."""
        eligible = [v for v in self.vertices if not v.configured_exclusion]
        return 1.0 if not eligible else sum(v.quantized for v in eligible) / len(eligible)

    def quantized_names(self) -> list:
        return [v.name for v in self.vertices if v.quantized]

    def float_names(self) -> list:
        return [v.name for v in self.vertices if not v.quantized]

    def to_dict(self) -> dict:
        return {
            "coverage": self.coverage,
            "vertices": [asdict(v) for v in self.vertices],
            "unsupported": list(self.unsupported),
            "notes": list(self.notes),
            "config": self.config,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def to_markdown(self) -> str:
        rows = ["| # | vertex | kind | op | quantized | weight q | act q | W elems | A elems/sample | params | MACs/sample | reason |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, v in enumerate(self.vertices):
            f = lambda n: "-" if n is None else f"{n:,}"  # noqa: E731
            rows.append(f"| {i} | {v.name} | {v.kind} | {v.op_type} | {'yes' if v.quantized else 'no'} | "
                        f"{v.weight_quant or '-'} | {v.act_quant or '-'} | {f(v.weight_elements)} | "
                        f"{f(v.act_elements)} | {f(v.params)} | {f(v.macs)} | {v.reason} |")
        out = [f"QAG: {sum(v.quantized for v in self.vertices)} of {len(self.vertices)} expensive vertices "
               f"quantized (coverage of eligible vertices {100 * self.coverage:.1f}%)", ""] + rows
        if self.unsupported:
            out += ["", "Left float (no quantized twin yet):"]
            out += [f"- {u['name']} ({u['type']}): {u['reason']}" for u in self.unsupported]
        if self.notes:
            out += [""] + [f"Note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_markdown()


# ----------------------------------------------------------------------------- quantizer factory
class _Factory:
    def __init__(self, config: QuantConfig):
        self.c = config
        self.shared = {}
        self.count = 0

    def make(self, kind: str, name: str, override, per_channel_dim: int = 0) -> Optional[nn.Module]:
        c = self.c
        if kind == "activation":
            if not c.quantize_activations or (override and override.quantize_activation is False):
                return None
            schemes = list(override.act_schemes) if override and override.act_schemes else list(c.act_schemes)
            bits = override.act_bits if override and override.act_bits else c.act_bits
            per_channel = False
        else:
            schemes = list(override.weight_schemes) if override and override.weight_schemes else list(c.weight_schemes)
            bits = override.weight_bits if override and override.weight_bits else c.weight_bits
            per_channel = c.per_channel_weights
        seed = c.seed * 7919 + self.count
        self.count += 1
        if c.mode == "fixed" or len(schemes) == 1:
            s = scheme_info(schemes[0])
            b = bits if s.multi_bit else s.min_bits
            return Quantizer(s.name, b, learn_bits=c.learn_bits and s.multi_bit, kind=kind,
                             per_channel=per_channel, channel_dim=per_channel_dim,
                             ema_momentum=c.ema_momentum, backend=c.backend)
        theta = None
        if c.granularity == "coarse":
            key = (kind, tuple(schemes))
            if key not in self.shared:
                self.shared[key] = (nn.Parameter(torch.zeros(len(schemes))), seed)
            theta, seed = self.shared[key]
        return SchemeMixture(schemes, bits, kind=kind, per_channel=per_channel, channel_dim=per_channel_dim,
                             theta=theta, tau=c.tau0, eval_selection=c.eval_selection,
                             ema_momentum=c.ema_momentum, backend=c.backend, seed=seed)


def _describe(q) -> str:
    if q is None:
        return ""
    if isinstance(q, SchemeMixture):
        return "mix(" + ",".join(scheme_info(s).letter for s in q.schemes) + f")@{max(q._bits)}"
    if isinstance(q, Quantizer):
        return f"{scheme_info(q.scheme).letter}-{q.int_bits()}" + ("*" if q.learn_bits else "")
    return type(q).__name__


# ----------------------------------------------------------------------------- functional vertices
class FunctionalQuant(nn.Module):
    """The quantizers of one functional call site (keyed by its weight Parameter)."""

    def __init__(self, param_name: str, op: str, weight_quant, act_quant):
        super().__init__()
        self.param_name = param_name
        self.op = op
        self.weight_quant = weight_quant
        self.act_quant = act_quant

    def extra_repr(self):
        return f"param={self.param_name}, op={self.op}"


def _call_args(func, args, kwargs):
    """(input, weight) positions of a functional expensive call."""
    names = ("input", "weight")
    vals = list(args[:2]) + [None] * max(0, 2 - len(args))
    for i, n in enumerate(names):
        if vals[i] is None and n in kwargs:
            vals[i] = kwargs[n]
    return vals[0], vals[1]


def _replace_call_args(args, kwargs, x, w):
    args = list(args)
    kwargs = dict(kwargs)
    for i, (n, v) in enumerate((("input", x), ("weight", w))):
        if len(args) > i:
            args[i] = v
        else:
            kwargs[n] = v
    return tuple(args), kwargs


class _InterceptMode(TorchFunctionMode):
    """Quantizes functional expensive calls whose weight is a known Parameter."""

    def __init__(self, table: dict, record: Optional[list] = None, events: Optional[list] = None):
        super().__init__()
        self.table = table  # id(param) -> module with weight_quant/act_quant (or None = leave float)
        self.record = record  # discovery: list of (op, input, weight, output, event index)
        self.events = events  # discovery: shared execution-order sequence with the module hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = FUNCTIONAL_OPS.get(func)
        if op is None:
            return func(*args, **kwargs)
        x, w = _call_args(func, args, kwargs)
        if self.record is not None:
            idx = len(self.events) if self.events is not None else len(self.record)
            if self.events is not None:
                self.events.append(("fn", op))
            out = func(*args, **kwargs)
            self.record.append((op, x, w, out, idx))
            return out
        holder = self.table.get(id(w)) if isinstance(w, nn.Parameter) else None
        if holder is not None:
            wq = w if holder.weight_quant is None else _weight_q(holder, w, op)
            xq = x if holder.act_quant is None else holder.act_quant(x)
            args, kwargs = _replace_call_args(args, kwargs, xq, wq)
        return func(*args, **kwargs)


def _weight_q(holder, w, op):
    q = holder.weight_quant
    if op.startswith("conv_transpose") and getattr(q, "per_channel", False):
        q.channel_dim = 1
    return q(w)


def _intercept_table(root: nn.Module) -> dict:
    """id(weight Parameter) -> holder (module with weight_quant/act_quant), from the plain dict
    ``root._qag_fn_map`` {param name: ("functional", key) | ("module", module name)}."""
    out = {}
    fq = getattr(root, "_qag_functional", None)
    for pname, (where, key) in getattr(root, "_qag_fn_map", {}).items():
        try:
            w = root.get_parameter(pname)
            holder = fq[key] if where == "functional" else root.get_submodule(key)
        except (AttributeError, KeyError):
            continue
        out[id(w)] = holder
    return out


def _qag_pre_hook(mod, args):
    if mod.__dict__.get("_qag_discovering"):
        return  # convert() is looking at the raw calls: do not quantize them
    mode = _InterceptMode(_intercept_table(mod))
    mode.__enter__()
    mod.__dict__.setdefault("_qag_mode_stack", []).append(mode)


def _qag_post_hook(mod, args, out):
    stack = mod.__dict__.get("_qag_mode_stack")
    if stack:
        stack.pop().__exit__(None, None, None)


def _install_intercept(model: nn.Module) -> None:
    """Activate the interception mode for the duration of model.forward. Module-level hook
    functions (no closures): deepcopy, pickling and state_dict keep working."""
    if getattr(model, "_qag_intercept_installed", False):
        return
    model.register_forward_pre_hook(_qag_pre_hook)
    try:
        model.register_forward_hook(_qag_post_hook, always_call=True)
    except TypeError:  # torch < 2.0
        model.register_forward_hook(_qag_post_hook)
    model._qag_intercept_installed = True


# ----------------------------------------------------------------------------- helpers
def _is_expensive_module(m: nn.Module, types: tuple) -> bool:
    return isinstance(m, QUANT_LAYERS) or type(m).__name__ in types or (
        type(m) in FLOAT_TO_QUANT and type(m).__name__ in types)


def _float_type(m: nn.Module) -> Optional[type]:
    """The float class a module is or derives from (subclasses like MHA's out_proj count)."""
    if isinstance(m, QUANT_LAYERS):
        return m._float_cls
    for cls in FLOAT_TO_QUANT:
        if isinstance(m, cls):
            return cls
    return None


def _macs(op: str, w: torch.Tensor, x_shape, out_shape) -> Optional[int]:
    """Multiply-accumulates per sample of one expensive call."""
    if x_shape is None or out_shape is None or len(x_shape) == 0:
        return None
    batch = x_shape[0] if len(x_shape) > 1 else 1
    if op == "linear":
        return int(torch.Size(out_shape).numel() // max(batch, 1)) * int(w.shape[1])
    if op.startswith("conv_transpose"):  # every input element feeds w[0].numel() outputs
        return int(torch.Size(x_shape).numel() // max(batch, 1)) * int(w[0].numel())
    return int(torch.Size(out_shape).numel() // max(batch, 1)) * int(w[0].numel())


def _act_elements(x_shape) -> Optional[int]:
    if x_shape is None or len(x_shape) == 0:
        return None
    batch = x_shape[0] if len(x_shape) > 1 else 1
    return int(torch.Size(x_shape).numel() // max(batch, 1))


_OP_NAMES = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d", nn.Linear: "linear",
             nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
             nn.ConvTranspose3d: "conv_transpose3d"}


def _op_of_module(m) -> str:
    return _OP_NAMES.get(_float_type(m), type(m).__name__.lower())


def _set_child(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every reference to ``old`` among all modules' children (shared modules too)."""
    for m in model.modules():
        for k, v in list(m._modules.items()):
            if v is old:
                m._modules[k] = new


def _discover(model, example_inputs, expensive_mods):
    """Run example_inputs once: execution order and shapes of modules, functional call sites."""
    order, shapes = {}, {}
    events = []  # one sequence for module entries and functional calls: execution order
    hooks = []

    def mk_pre(name):
        def pre(mod, inp):
            if name not in order:
                order[name] = len(events)
            events.append(("module", name))
        return pre

    def mk_post(name):
        def post(mod, inp, out):
            x = inp[0] if inp else None
            if name not in shapes and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                shapes[name] = (tuple(x.shape), tuple(out.shape))
        return post

    for name, m in expensive_mods:
        hooks.append(m.register_forward_pre_hook(mk_pre(name)))
        hooks.append(m.register_forward_hook(mk_post(name)))
    record = []
    was_training = model.training
    model.eval()
    model.__dict__["_qag_discovering"] = True
    try:
        with torch.no_grad(), _InterceptMode({}, record=record, events=events):
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.__dict__.pop("_qag_discovering", None)
        model.train(was_training)
    return order, shapes, record


def _fx_functional_params(model) -> Optional[list]:
    """Parameter names used as weights of functional expensive calls, found by torch.fx (None when
    the model does not trace)."""
    try:
        import torch.fx as fx

        class _T(fx.Tracer):
            def is_leaf_module(self, m, qn):
                return _float_type(m) is not None or isinstance(m, (QuantizerBase,) + QUANT_LAYERS) or super().is_leaf_module(m, qn)

        graph = _T().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "not traceable"
        return None
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in FUNCTIONAL_OPS:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if getattr(w, "op", None) == "get_attr":
                found.append((FUNCTIONAL_OPS[node.target], w.target))
    return found


# ----------------------------------------------------------------------------- convert
def convert(model: nn.Module, config: Optional[QuantConfig] = None, example_inputs: Any = None, *,
            strict: bool = False, inplace: bool = False):
    """Insert quantizing vertices into ``model`` (SPEC 5.1). Returns ``(model, report)``.

    Args:
        model: any ``nn.Module``.
        config: :class:`~autoqnn.config.QuantConfig` (default: QSS mixtures, 3 bits, first and
            last expensive layers left float).
        example_inputs: a tuple of inputs (or one tensor) for one forward pass: gives execution
            order (first/last), activation sizes and MACs, and discovers functional calls.
        strict: raise :class:`QAGError` if an expensive vertex stays float for any reason other
            than a configured exclusion.
        inplace: modify ``model`` itself instead of a deep copy.
    """
    config = config or QuantConfig()
    config.validate()
    if not inplace:
        model = copy.deepcopy(model)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    types = tuple(config.layer_types)
    report = QAGReport(config=config.to_dict())
    factory = _Factory(config)

    # 0. nn.MultiheadAttention applies its projection weights inside F.multi_head_attention_forward:
    # swap it for QMultiheadAttention (in_proj + out_proj quantized) where supported
    mha_in = {}  # "<mha>.in_proj" -> (QMultiheadAttention, reason)
    if "Linear" in types:
        for name, m in list(model.named_modules()):
            if not isinstance(m, nn.MultiheadAttention):
                continue
            vname = f"{name}.in_proj" if name else "in_proj"
            if isinstance(m, QMultiheadAttention):
                mha_in[vname] = (m, "" if m.in_weight_quant is not None or m.in_act_quant is not None
                                 else "excluded: converted earlier without quantizers")
                continue
            why = _mha_supports(m)
            if why:
                mha_in[vname] = (m, f"MultiheadAttention: {why}")
                continue
            ov_in = config.override_for(vname)
            oname = f"{name}.out_proj" if name else "out_proj"
            ov_out = config.override_for(oname)
            ex_in = bool(ov_in and ov_in.exclude)
            ex_out = bool(ov_out and ov_out.exclude)
            q = QMultiheadAttention.from_float(
                m,
                None if ex_in else factory.make("weight", vname, ov_in),
                None if ex_in else factory.make("activation", vname, ov_in),
                None if ex_out else factory.make("weight", oname, ov_out),
                None if ex_out else factory.make("activation", oname, ov_out))
            if m is model:
                model = q
            else:
                _set_child(model, m, q)
            mha_in[vname] = (q, f"excluded: override {ov_in.pattern!r}" if ex_in else "")

    # existing functional table (idempotence: a converted model already has one)
    fq_root = getattr(model, "_qag_functional", None)
    already_intercepting = isinstance(fq_root, nn.ModuleDict)

    # 1. expensive modules (deduplicated: a shared module is one vertex), definition order
    expensive = []
    seen = set()
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        if isinstance(m, QUANT_LAYERS) or (_float_type(m) is not None and _float_type(m).__name__ in types):
            expensive.append((name, m))
            seen.add(id(m))
        elif isinstance(m, _PARAMETRIC_OTHERS) and any(p.requires_grad for p in m.parameters(recurse=False)):
            report.unsupported.append({"name": name, "type": type(m).__name__,
                                       "reason": "no quantized twin yet: left float"})
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    owner = {}  # id(weight param) -> (module name, module)
    for name, m in expensive:
        if getattr(m, "weight", None) is not None:
            owner[id(m.weight)] = (name, m)

    # 2. execution order, shapes, functional call sites
    order, shapes, record = {}, {}, []
    if example_inputs is not None:
        order, shapes, record = _discover(model, example_inputs, expensive)
    fn_sites = {}  # param name -> dict(op, weight, x_shape, out_shape, order)
    called_modules = set(order)
    # weights of every float Conv/Linear-like module, selected by layer_types or not: their own
    # calls are the module's business (swapped, or deliberately left float), not functional vertices
    any_owner = {id(m.weight) for m in model.modules()
                 if _float_type(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor)}
    if example_inputs is not None and config.functional:
        for op, x, w, out, ev in record:
            if not isinstance(w, nn.Parameter):
                continue  # a computed weight (known gap: see tests/test_qag.py xfail)
            if id(w) in any_owner and id(w) not in owner:
                continue  # a module type outside config.layer_types: left float on purpose
            if id(w) in owner and owner[id(w)][0] in called_modules and type(owner[id(w)][1]).forward is not nn.Module.forward:
                # the owning module's own forward made this call (already covered by the swap),
                # unless the module itself was never called as a module
                mod_name = owner[id(w)][0]
                if mod_name in order:
                    continue
            pname = param_names.get(id(w))
            if pname is None or pname in fn_sites:
                continue
            fn_sites[pname] = {"op": op, "weight": w, "x": tuple(x.shape) if isinstance(x, torch.Tensor) else None,
                               "out": tuple(out.shape) if isinstance(out, torch.Tensor) else None,
                               "order": ev}
    elif config.functional:
        found = _fx_functional_params(model)
        if found is None:
            report.notes.append("functional conv/linear calls were not looked for: the model does not trace "
                                "with torch.fx and no example_inputs were given")
        else:
            params = dict(model.named_parameters(remove_duplicate=True))
            for op, pname in found:
                if pname in params and pname not in fn_sites and id(params[pname]) not in owner:
                    fn_sites[pname] = {"op": op, "weight": params[pname], "x": None, "out": None, "order": None}
    # modules whose weight is only used functionally (never called as modules), e.g. Swin's qkv
    if example_inputs is not None:
        for pname, site in list(fn_sites.items()):
            if id(site["weight"]) in owner:
                site["owner"] = owner[id(site["weight"])][0]

    # 3. vertices in execution (or definition) order
    verts = []
    for di, (name, m) in enumerate(expensive):
        verts.append(("module", name, m, order.get(name, None), di))
    for pname, site in fn_sites.items():
        if "owner" in site:
            continue  # handled as its module (quantized through interception below)
        verts.append(("functional", pname, site, site["order"], len(expensive) + len(verts)))
    if order:
        verts.sort(key=lambda v: (v[3] is None, v[3] if v[3] is not None else v[4]))
    first_last = set()
    if config.exclude_first_last and verts:
        executed = [v for v in verts if v[3] is not None] or verts
        first_last = {executed[0][1]: "first", executed[-1][1]: "last"}

    # 4. build quantizers, swap modules
    param_name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    fn_map = dict(getattr(model, "_qag_fn_map", {}))  # param name -> ("functional"|"module", key)
    new_fq = {}  # key -> FunctionalQuant
    for kind, name, obj, ordi, _ in verts:
        ov = config.override_for(name)
        reason = ""
        if name in first_last:
            reason = f"excluded: {first_last[name]} expensive layer (exclude_first_last)"
        if ov and ov.exclude:
            reason = f"excluded: override {ov.pattern!r}"
        if kind == "module":
            m = obj
            op = _op_of_module(m)
            w = m.weight
            x_shape, out_shape = shapes.get(name, (None, None))
            site = next((st for st in fn_sites.values() if st.get("owner") == name), None)
            if out_shape is None and site is not None:
                x_shape, out_shape = site["x"], site["out"]
            wq_desc = aq_desc = ""
            if isinstance(m, QUANT_LAYERS):  # already converted: idempotent
                quantized = m.weight_quant is not None or m.act_quant is not None
                if not quantized and not reason:
                    reason = "excluded: converted earlier without quantizers"
                wq_desc, aq_desc = _describe(m.weight_quant), _describe(m.act_quant)
            elif _key(name) in (getattr(model, "_qag_functional", None) or {}):
                quantized = True  # a subclass quantized through interception earlier
                fq = model._qag_functional[_key(name)]
                wq_desc, aq_desc = _describe(fq.weight_quant), _describe(fq.act_quant)
            elif reason:
                quantized = False
            else:
                qcls = FLOAT_TO_QUANT[_float_type(m)]
                wq = factory.make("weight", name, ov, qcls.weight_channel_dim)
                aq = factory.make("activation", name, ov)
                pname = param_name_of.get(id(w))
                if type(m).forward is _float_type(m).forward:
                    q = qcls.from_float(m, wq, aq)
                    if m is model:
                        model = q
                    else:
                        _set_child(model, m, q)
                    if example_inputs is not None and name not in order and pname is not None:
                        # never called as a module: its weight is used by functional calls only
                        # (e.g. torchvision Swin's qkv/proj): route them through its quantizers
                        fn_map[pname] = ("module", name)
                else:
                    # a subclass with its own behaviour (e.g. MultiheadAttention's out_proj, whose
                    # weight MHA applies with F.linear): keep it, quantize the calls on its weight
                    fq = FunctionalQuant(name, op, wq, aq)
                    new_fq[_key(name)] = fq
                    if pname is not None:
                        fn_map[pname] = ("functional", _key(name))
                quantized = True
                wq_desc, aq_desc = _describe(wq), _describe(aq)
            v = VertexInfo(name=name, kind="module", op_type=_float_type(m).__name__, quantized=quantized,
                           reason=reason, weight_elements=int(w.numel()),
                           params=sum(int(p.numel()) for p in m.parameters(recurse=False)), order=ordi,
                           act_elements=_act_elements(x_shape), macs=_macs(op, w, x_shape, out_shape),
                           weight_quant=wq_desc, act_quant=aq_desc)
        else:
            site = obj
            w = site["weight"]
            existing = getattr(model, "_qag_functional", None)
            fq = existing[_key(name)] if existing is not None and _key(name) in existing else None
            quantized = fq is not None or not reason
            if fq is None and quantized:
                cd = 1 if site["op"].startswith("conv_transpose") else 0
                fq = FunctionalQuant(name, site["op"], factory.make("weight", name, ov, cd),
                                     factory.make("activation", name, ov))
                new_fq[_key(name)] = fq
                fn_map[name] = ("functional", _key(name))
            v = VertexInfo(name=name, kind="functional", op_type=site["op"], quantized=quantized, reason=reason,
                           weight_elements=int(w.numel()), params=int(w.numel()), order=ordi,
                           act_elements=_act_elements(site["x"]), macs=_macs(site["op"], w, site["x"], site["out"]),
                           weight_quant=_describe(fq.weight_quant) if fq else "",
                           act_quant=_describe(fq.act_quant) if fq else "")
        report.vertices.append(v)

    for vname, (m, reason) in mha_in.items():
        ws = [w for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight) if w is not None]
        quantized = isinstance(m, QMultiheadAttention) and (m.in_weight_quant is not None or m.in_act_quant is not None)
        E = m.embed_dim
        n_w = sum(int(w.numel()) for w in ws)
        report.vertices.append(VertexInfo(
            name=vname, kind="module", op_type="Linear", quantized=quantized, reason="" if quantized else reason,
            weight_elements=n_w,
            params=n_w + (int(m.in_proj_bias.numel()) if m.in_proj_bias is not None else 0),
            weight_quant=_describe(getattr(m, "in_weight_quant", None)),
            act_quant=_describe(getattr(m, "in_act_quant", None)), macs=None, act_elements=None))
        out_v = next((v for v in report.vertices if v.name == vname[: -len("in_proj")] + "out_proj"), None)
        if out_v is not None and out_v.act_elements is not None and E:
            # self-attention: the projections see the same L·E elements per sample
            report.vertices[-1].act_elements = out_v.act_elements
            report.vertices[-1].macs = out_v.act_elements * 3 * E

    # 5. functional interception: holders in a ModuleDict on the root (state_dict carries them),
    # the param -> holder map as a plain dict, module-level hooks
    if new_fq:
        if not isinstance(getattr(model, "_qag_functional", None), nn.ModuleDict):
            model._qag_functional = nn.ModuleDict()
        for k, fq in new_fq.items():
            model._qag_functional[k] = fq
    if fn_map:
        model._qag_fn_map = fn_map
        _install_intercept(model)

    if strict:
        bad = [v for v in report.vertices if not v.quantized and not v.configured_exclusion]
        if bad:
            raise QAGError("QAG left expensive vertices float: " + ", ".join(f"{v.name} ({v.reason})" for v in bad))
    for n in report.notes:
        warnings.warn(f"autoqnn.qag: {n}", RuntimeWarning, stacklevel=2)
    return model, report


def _key(name: str) -> str:
    return name.replace(".", "__")


def quantizer_count(model: nn.Module) -> int:
    return sum(1 for _ in quantizers(model))
