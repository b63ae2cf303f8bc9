# SPDX-License-Identifier: MIT
"""Run reports: ``report.md`` + ``report.json`` (per-layer table, totals, budget, accuracy,
config, versions) and PNG plots (scheme probabilities per layer over the QSS epochs — the
paper's Fig. 6/8 —, bits per layer over the QPL epochs, temperature, loss and accuracy).

:func:`write_report` builds them from a finished run's ``result.json``; :func:`load_run`
also rebuilds an interrupted run's history from its latest checkpoint (read with
``weights_only=True``: loading never executes code).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["layer_table", "totals", "write_report", "load_run", "render_markdown", "plot_history"]


def _atomic_write(path: Path, data: str) -> None:
    from .pipeline import _atomic_write_text

    _atomic_write_text(path, data)


def layer_table(result: dict) -> List[dict]:
    """One row per expensive vertex: op, weight scheme/bits, activation scheme/bits, params,
    MACs (per sample), weight and activation elements, packed weight bytes. Float vertices
    (excluded or unsupported) are listed with bits 32."""
    plan = result.get("plan") or []
    by_layer: Dict[str, dict] = {}
    for p in plan:
        row = by_layer.setdefault(p["layer"], {})
        pre = "w" if p["kind"] == "weight" else "a"
        row[pre + "_scheme"] = p["scheme"]
        row[pre + "_bits"] = p["bits"]
        row[pre + "_elements"] = p["elements"]
        if p.get("learned_bits") is not None:
            row[pre + "_learned"] = p["learned_bits"]
    rows = []
    verts = (result.get("qag") or {}).get("vertices") or []
    seen = set()
    for v in sorted(verts, key=lambda v: (v.get("order") is None, v.get("order") or 0)):
        name = v["name"]
        r = by_layer.get(name, {})
        seen.add(name)
        w_el = v.get("weight_elements") or r.get("w_elements")
        wb = r.get("w_bits")
        rows.append({
            "layer": name, "op": v.get("op_type", ""), "quantized": bool(r),
            "w_scheme": r.get("w_scheme", "float"), "w_bits": wb if wb is not None else 32,
            "w_learned": r.get("w_learned"),
            "a_scheme": r.get("a_scheme", "float"), "a_bits": r.get("a_bits", 32), "a_learned": r.get("a_learned"),
            "params": v.get("params"), "macs": v.get("macs"), "w_elements": w_el,
            "a_elements": v.get("act_elements") or r.get("a_elements"),
            "w_bytes": None if w_el is None else math.ceil(w_el * (wb if wb is not None else 32) / 8),
            "reason": v.get("reason", ""),
        })
    for name, r in by_layer.items():  # vertices the QAG report did not list (defensive)
        if name not in seen:
            rows.append({"layer": name, "op": "", "quantized": True, "w_scheme": r.get("w_scheme", "float"),
                         "w_bits": r.get("w_bits", 32), "a_scheme": r.get("a_scheme", "float"),
                         "a_bits": r.get("a_bits", 32), "params": None, "macs": None,
                         "w_elements": r.get("w_elements"), "a_elements": r.get("a_elements"),
                         "w_bytes": None if r.get("w_elements") is None else
                         math.ceil(r["w_elements"] * r.get("w_bits", 32) / 8), "reason": "",
                         "w_learned": r.get("w_learned"), "a_learned": r.get("a_learned")})
    return rows


def totals(result: dict, rows: Optional[List[dict]] = None) -> dict:
    """Model totals: element-weighted and plain average bits (quantized vertices), size in bytes
    vs float and int8, BOPs (Σ MACs·b_w·b_a, float vertices at 32×32) vs the float model."""
    rows = rows if rows is not None else layer_table(result)
    plan = result.get("plan") or []
    out: Dict[str, Any] = {}
    for kind, key in (("weight", "weight"), ("activation", "act")):
        ps = [p for p in plan if p["kind"] == kind]
        n = sum(p["elements"] for p in ps)
        out[f"{key}_bits_weighted"] = (sum(p["bits"] * p["elements"] for p in ps) / n) if n else None
        out[f"{key}_bits_plain"] = (sum(p["bits"] for p in ps) / len(ps)) if ps else None
    bops = fbops = 0
    have_macs = False
    for r in rows:
        if r.get("macs"):
            have_macs = True
            bops += r["macs"] * r["w_bits"] * r["a_bits"]
            fbops += r["macs"] * 32 * 32
    out["bops"] = bops if have_macs else None
    out["bops_float"] = fbops if have_macs else None
    out["bops_ratio"] = (fbops / bops) if have_macs and bops else None
    size = result.get("size") or {}
    out["bytes_quantized"] = size.get("quantized")
    out["bytes_float"] = size.get("float_model")
    out["bytes_int8"] = size.get("int8")
    if size.get("quantized"):
        out["compression_vs_float"] = size["float_model"] / size["quantized"]
        out["compression_vs_int8"] = size["int8"] / size["quantized"]
    out["weight_target"] = result.get("weight_target")
    out["act_target"] = result.get("act_target")
    out["float_accuracy"] = result.get("float_accuracy")
    out["quant_accuracy"] = result.get("quant_accuracy")
    return out


def _f(v, fmt="{:.4g}"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt.format(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_markdown(result: dict, plots: Optional[Dict[str, str]] = None) -> str:
    rows = layer_table(result)
    t = totals(result, rows)
    cfg = result.get("config") or {}
    lines = ["# autoqnn search report", ""]
    if result.get("status") and result["status"] != "finished":
        lines += [f"**Status: {result['status']}** (rebuilt from the latest checkpoint; totals are partial)", ""]
    acc_f, acc_q = t.get("float_accuracy"), t.get("quant_accuracy")
    lines += [
        "| | value |", "|---|---|",
        f"| float accuracy | {_f(None if acc_f is None else 100 * acc_f, '{:.2f}')}% |",
        f"| quantized accuracy | {_f(None if acc_q is None else 100 * acc_q, '{:.2f}')}% |",
        f"| weight bits (element-weighted / plain) | {_f(t['weight_bits_weighted'], '{:.3f}')} / "
        f"{_f(t['weight_bits_plain'], '{:.3f}')} (target {_f(t['weight_target'])}) |",
        f"| activation bits (element-weighted / plain) | {_f(t['act_bits_weighted'], '{:.3f}')} / "
        f"{_f(t['act_bits_plain'], '{:.3f}')} (target {_f(t['act_target'])}) |",
        f"| budget mode | {cfg.get('budget', '-')} |",
        f"| size (bytes) | {_f(t['bytes_quantized'])} vs float {_f(t['bytes_float'])} "
        f"({_f(t.get('compression_vs_float'), '{:.1f}')}x) vs int8 {_f(t['bytes_int8'])} "
        f"({_f(t.get('compression_vs_int8'), '{:.2f}')}x) |",
        f"| BOPs per sample | {_f(t['bops'])} vs float {_f(t['bops_float'])} "
        f"({_f(t.get('bops_ratio'), '{:.1f}')}x fewer) |",
    ]
    exp = result.get("export") or {}
    if exp:
        lines.append(f"| packed file | `{Path(exp.get('path', '')).name}` {_f(exp.get('file_bytes'))} bytes = "
                     f"header {_f(exp.get('header_bytes'))} + payload {_f(exp.get('payload_bytes'))} "
                     f"(the plan's size: {_f(exp.get('expected_bytes'))}) |")
        if exp.get("error"):
            lines.append(f"| packed export error | {exp['error']} |")
        if exp.get("parity"):
            lines.append(f"| export parity (max / mean abs diff) | {exp['parity'].get('max_abs', '-'):.3g} / "
                         f"{exp['parity'].get('mean_abs', '-'):.3g} |")
    if result.get("onnx"):
        o = result["onnx"]
        lines.append(f"| ONNX parity under onnxruntime (max abs diff) | {_f(o.get('max_abs'), '{:.3g}')} |")
    ps = result.get("phase_seconds") or {}
    if ps:
        lines.append("| time per phase (s) | " + ", ".join(f"{k} {v:.1f}" for k, v in ps.items()) + " |")
    lines += ["", "## Layers", "",
              "| layer | op | W scheme | W bits | A scheme | A bits | params | MACs | W elements | A elements | W bytes |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wl = f" ({r['w_learned']:.2f})" if r.get("w_learned") is not None else ""
        al = f" ({r['a_learned']:.2f})" if r.get("a_learned") is not None else ""
        lines.append(f"| {r['layer']} | {r['op']} | {r['w_scheme']} | {r['w_bits']}{wl} | {r['a_scheme']} | "
                     f"{r['a_bits']}{al} | {_f(r['params'])} | {_f(r['macs'])} | {_f(r['w_elements'])} | "
                     f"{_f(r['a_elements'])} | {_f(r['w_bytes'])} |")
    lines += ["", "Bits in parentheses: the learned real-valued bitwidth before rounding and repair. "
              "Activation elements are per sample (the layer's input)."]
    if result.get("repair_steps"):
        lines += ["", "## Budget repair", "", "| quantizer | kind | bits | est. loss increase / element |",
                  "|---|---|---|---:|"]
        for s in result["repair_steps"]:
            lines.append(f"| {s['quantizer']} | {s['kind']} | {s['from']} → {s['to']} | {s['cost_per_element']:.3g} |")
    if result.get("onnx", {}).get("mapping"):
        lines += ["", "## ONNX mapping", "", "| layer | exported as |", "|---|---|"]
        for k, v in result["onnx"]["mapping"].items():
            lines.append(f"| {k} | {v} |")
    if plots:
        lines += ["", "## Plots", ""]
        for title, rel in plots.items():
            lines.append(f"![{title}]({rel})")
    lines += ["", "## Run", "", f"- seed: {cfg.get('seed', '-')}", f"- data: {result.get('data', '-')}",
              f"- model: {result.get('model_name', '-')}", f"- versions: {json.dumps(result.get('versions', {}))}",
              "", "<details><summary>config</summary>", "", "```json", json.dumps(cfg, indent=2), "```",
              "", "</details>", ""]
    return "\n".join(lines)


def plot_history(history: List[dict], out_dir: Path, init_bits: Optional[Dict[str, float]] = None) -> Dict[str, str]:
    """PNG plots from a search history; returns {title: path relative to out_dir}. Needs
    matplotlib (Agg backend); returns {} without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is a dependency, but never fail a run for a plot
        return {}
    out_dir = Path(out_dir)
    pdir = out_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: Dict[str, str] = {}

    def save(fig, name, title):
        p = pdir / name
        tmp = pdir / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, p)
        made[title] = f"plots/{name}"

    search = [h for h in history if h.get("phase") == "search" and h.get("probs")]
    if search:
        names = list(search[-1]["probs"].keys())
        # coarse mode: many quantizers share θ, plot one per distinct curve set
        uniq, seen = [], set()
        for n in names:
            key = json.dumps([h["probs"].get(n) for h in search], sort_keys=True)
            if key not in seen:
                seen.add(key)
                uniq.append(n)
        cols = min(4, len(uniq))
        rows_ = math.ceil(len(uniq) / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(3.6 * cols, 2.5 * rows_ + 0.6), squeeze=False)
        epochs = [h["epoch"] for h in search]
        palette = plt.get_cmap("tab10")
        from .schemes import SCHEMES

        color = {s: palette(i) for i, s in enumerate(SCHEMES)}  # one colour per scheme everywhere
        for ax, n in zip(axes.flat, uniq):
            schemes = list(search[-1]["probs"][n].keys())
            bottom = [0.0] * len(search)
            for s in schemes:
                vals = [h["probs"][n].get(s, 0.0) for h in search]
                ax.bar(epochs, vals, bottom=bottom, label=s, width=0.8, color=color.get(s))
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(n, fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_xticks(epochs)
            ax.set_xlabel("QSS epoch", fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(uniq):]:
            ax.axis("off")
        from matplotlib.patches import Patch

        used = [s for s in SCHEMES if any(s in search[-1]["probs"][n] for n in uniq)]
        fig.legend([Patch(color=color[s]) for s in used], used, loc="upper center", ncol=8, fontsize=7,
                   bbox_to_anchor=(0.5, 1.0))
        fig.suptitle("scheme probabilities softmax(θ) per quantizer after each QSS epoch", y=1.04, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        save(fig, "scheme_probs.png", "scheme probabilities per layer")

        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(epochs, [h.get("tau") for h in search], marker="o")
        ax.set_xlabel("QSS epoch")
        ax.set_ylabel("temperature τ")
        ax.set_title("Gumbel-softmax temperature")
        save(fig, "temperature.png", "temperature")

    prec = [h for h in history if h.get("phase") == "precision" and h.get("bits")]
    if prec:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        cmap = plt.get_cmap("tab20")
        names = list(prec[-1]["bits"])
        for i, n in enumerate(names):
            xs = [h["epoch"] for h in prec]
            ys = [h["bits"].get(n) for h in prec]
            if init_bits is not None:  # QPL starts every learned bitwidth at the search bits
                xs, ys = [0] + xs, [init_bits.get("activation" if n.endswith("act_quant") else "weight")] + ys
            ax.plot(xs, ys, marker=".", label=n, color=cmap(i % 20),
                    linestyle="--" if n.endswith("act_quant") else "-")
        ax.set_xlabel("QPL epoch (0: start)")
        ax.set_ylabel("learned bits b")
        ax.set_xticks(sorted({0, *[h["epoch"] for h in prec]}) if init_bits is not None else [h["epoch"] for h in prec])
        ax.set_title("bitwidth per quantizer (QPL; solid: weights, dashed: activations)", fontsize=9)
        if len(names) <= 20:
            ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, "bits.png", "bits per layer")

    train = [h for h in history if "train_loss" in h]
    if train:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        xs = list(range(1, len(train) + 1))
        a1.plot(xs, [h["train_loss"] for h in train], marker=".", label="train loss")
        if any("val_loss" in h for h in train):
            a1.plot(xs, [h.get("val_loss") for h in train], marker=".", label="val loss")
        a2.plot(xs, [h.get("train_acc") for h in train], marker=".", label="train acc")
        if any("val_acc" in h for h in train):
            a2.plot(xs, [h.get("val_acc") for h in train], marker=".", label="val acc")
        # phase boundaries
        for ax in (a1, a2):
            prev = None
            for i, h in enumerate(train):
                if h["phase"] != prev:
                    ax.axvline(i + 0.5, color="grey", lw=0.5)
                    ax.text(i + 0.6, ax.get_ylim()[1], h["phase"], fontsize=7, va="top")
                    prev = h["phase"]
            ax.set_xlabel("epoch (all phases)")
            ax.legend(fontsize=7)
        a1.set_title("loss")
        a2.set_title("accuracy")
        save(fig, "curves.png", "loss and accuracy")
    return made


def load_run(run_dir) -> dict:
    """A run's result: ``result.json`` when the run finished, else a partial one rebuilt from its
    latest checkpoint (history, config, schemes/bits so far)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    res_path = run_dir / "result.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    from .pipeline import latest_checkpoint

    ck = latest_checkpoint(run_dir / "checkpoints") or latest_checkpoint(run_dir)
    if ck is None:
        raise FileNotFoundError(f"{run_dir} holds neither result.json nor a checkpoint (checkpoints/ckpt-*.pt): "
                                "nothing to report")
    import torch

    st = torch.load(ck, map_location="cpu", weights_only=True)
    cfg = json.loads(st["config"])
    plan = []
    for n, s in (st.get("schemes") or {}).items():
        plan.append({"name": n, "layer": n.rsplit(".", 1)[0], "kind": "activation" if n.endswith("act_quant")
                     else "weight", "scheme": s, "bits": (st.get("bits") or {}).get(n, cfg["quant"].get("weight_bits", 3)),
                     "elements": 0, "learned_bits": None})
    meta = {}
    if (run_dir / "run.json").is_file():
        meta = json.loads((run_dir / "run.json").read_text())
    return {"status": f"interrupted in phase {st['phase']} (epoch {st['epoch']}, step {st['step_in_epoch']})",
            "plan": plan, "history": st.get("history", []), "config": cfg, "float_accuracy": st.get("float_accuracy"),
            "quant_accuracy": None, "weight_target": cfg.get("weight_target"), "act_target": cfg.get("act_target"),
            "size": {}, "qag": meta.get("qag", {}), "phase_seconds": st.get("phase_seconds", {}),
            "repair_steps": st.get("repair_steps", []), **{k: v for k, v in meta.items() if k != "qag"}}


def write_report(result: dict, out_dir) -> Dict[str, str]:
    """Write report.json, report.md and plots/*.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    q = (result.get("config") or {}).get("quant") or {}
    init = {"weight": q.get("weight_bits"), "activation": q.get("act_bits")} if q else None
    plots = plot_history(result.get("history") or [], out_dir, init)
    rows = layer_table(result)
    rep = {"summary": totals(result, rows), "layers": rows, "plots": plots,
           **{k: v for k, v in result.items() if k not in ("qag",)}}
    _atomic_write(out_dir / "report.json", json.dumps(rep, indent=2, default=str))
    _atomic_write(out_dir / "report.md", render_markdown(result, plots))
    return {"report.md": str(out_dir / "report.md"), "report.json": str(out_dir / "report.json"),
            **{k: str(out_dir / v) for k, v in plots.items()}}
