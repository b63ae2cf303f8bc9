# SPDX-License-Identifier: MIT
"""The ``autoqnn`` command.

``autoqnn search`` with no arguments runs the whole method on Fashion-MNIST (the full set when
the Debian package ``dataset-fashion-mnist`` or ``--data DIR`` provides it, else the subset
shipped with autoqnn): float training of a VGG-like CNN, QSS, QPL at 2/2 bits, fine-tuning,
evaluation, report with plots, packed export (+ ONNX when onnxruntime is installed).

Subcommands: ``search``, ``train-float``, ``finetune``, ``evaluate``, ``export``, ``report``,
``env``, ``tune-kernels``. Every option of the search config can come from ``--config file.json|yaml`` and
``--set key=value`` (``quant.granularity=coarse``); the config is validated and saved with the run.
Works unchanged under ``torchrun`` (only rank 0 prints and writes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["main", "RUN_DEFAULTS", "DEMO_SEARCH"]

#: run-level options (what data and model), all settable in the config file's "run" section
RUN_DEFAULTS: Dict[str, Any] = {
    "model": "vgglike-small",
    "data": None,  # None: Fashion-MNIST (full if installed, else shipped subset); a dir; "imagefolder:DIR"
    "train_limit": 10000,  # class-stratified subset of the training set (0: all)
    "val_limit": 2000,
    "image_size": 28,
    "float_checkpoint": None,  # a float state_dict to start from (then float_epochs defaults to 0)
}

#: the search config of the built-in demo (fits ~5 minutes on a 2-core CPU)
DEMO_SEARCH: Dict[str, Any] = {
    "float_epochs": 3, "search_epochs": 3, "precision_epochs": 2, "finetune_epochs": 3,
    "weight_target": 2.0, "act_target": 2.0, "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0,
    "theta_lr": 0.05, "bits_lr": 0.05, "batch_size": 128, "eval_batch_size": 500, "checkpoint_every_steps": 20,
}


class CLIError(Exception):
    """A user error: printed as one clear line, exit status 2."""


# ------------------------------------------------------------------------------------- helpers
def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0))


def _init_distributed() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)


class _Out:
    """Console output: human lines (rank 0, unless --quiet), JSON lines with --json."""

    def __init__(self, quiet: bool, json_logs: bool):
        self.quiet, self.json = quiet, json_logs
        self.rank0 = _rank() == 0

    def say(self, msg: str) -> None:
        if self.rank0 and not self.quiet and not self.json:
            print(msg, flush=True)

    def event(self, **rec) -> None:
        if self.rank0 and self.json:
            print(json.dumps(rec, default=str), flush=True)


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CLIError("--config: reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CLIError(f"--config {path}: invalid YAML: {e}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"--config {path}: invalid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CLIError(f"--config {path}: the top level must be a mapping of options")
    return d


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _apply_set(d: dict, items: List[str]) -> None:
    for it in items or []:
        if "=" not in it:
            raise CLIError(f"--set {it!r}: expected key=value (e.g. --set quant.granularity=coarse)")
        key, val = it.split("=", 1)
        cur = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise CLIError(f"--set {key}: {p} is not a section")
        cur[parts[-1]] = _parse_value(val)


def build_configs(args) -> tuple:
    """(run options, SearchConfig) from defaults, --config, flags and --set, validated."""
    from .config import QuantConfig
    from .pipeline import SearchConfig

    raw: Dict[str, Any] = {"run": dict(RUN_DEFAULTS), **json.loads(json.dumps(DEMO_SEARCH))}
    user_set_float_epochs = any(str(it).strip().startswith("float_epochs=") for it in (getattr(args, "set", None) or []))
    if getattr(args, "config", None):
        user = _load_config_file(args.config)
        user_set_float_epochs = user_set_float_epochs or "float_epochs" in user
        run_user = user.pop("run", {}) or {}
        if not isinstance(run_user, dict):
            raise CLIError("--config: 'run' must be a mapping")
        raw["run"].update(run_user)
        if "quant" in user and not isinstance(user["quant"], dict):
            raise CLIError("--config: 'quant' must be a mapping")
        raw.update(user)
    _apply_set(raw, getattr(args, "set", None))
    for flag, key in (("model", "model"), ("data", "data"), ("train_limit", "train_limit"),
                      ("val_limit", "val_limit"), ("float_checkpoint", "float_checkpoint"),
                      ("image_size", "image_size")):
        v = getattr(args, flag, None)
        if v is not None:
            raw["run"][key] = v
    for flag in ("seed", "device", "deterministic", "compile", "channels_last"):
        v = getattr(args, flag, None)
        if v not in (None, False):
            raw[flag] = v
    if getattr(args, "resume", None):
        raw["resume"] = args.resume
    run = raw.pop("run")
    unknown_run = sorted(set(run) - set(RUN_DEFAULTS))
    if unknown_run:
        raise CLIError(f"unknown run option(s): {', '.join(unknown_run)}; known: {', '.join(RUN_DEFAULTS)}")
    if run.get("float_checkpoint") and not user_set_float_epochs:
        raw["float_epochs"] = 0  # a trained float model was given: no float phase unless asked for
    q = raw.get("quant", {})
    if isinstance(q, dict) and "seed" not in q and "seed" in raw:
        q["seed"] = raw["seed"]
    raw["quant"] = q
    try:
        cfg = SearchConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CLIError(f"invalid configuration: {e}") from None
    assert isinstance(cfg.quant, QuantConfig)
    return run, cfg


def load_data(run: dict, out: _Out):
    """(train, val, description, in_channels, num_classes)."""
    from . import data as D

    spec = run.get("data")
    if spec and str(spec).startswith("imagefolder:"):
        root = str(spec).split(":", 1)[1]
        if not Path(root).is_dir():
            raise CLIError(f"--data imagefolder:{root}: no such directory")
        size = int(run.get("image_size") or 224)
        try:
            train = D.image_folder(root, "train", image_size=size)
            val = D.image_folder(root, "val", image_size=size)
        except (FileNotFoundError, ImportError) as e:
            raise CLIError(f"--data {spec}: {e}") from None
        return train, val, f"ImageFolder {root}", 3, len(train.classes)
    if spec and not Path(spec).exists():
        raise CLIError(f"--data {spec}: no such directory. Give the folder holding the Fashion-MNIST IDX files "
                       "(train-images-idx3-ubyte.gz, ...), 'imagefolder:DIR', or omit --data for the built-in data")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            src = D.fashion_mnist_source(spec)
            train = D.load_fashion_mnist("train", root=spec, limit=run.get("train_limit") or None)
            val = D.load_fashion_mnist("test", root=spec, limit=run.get("val_limit") or None)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    if src.startswith("subset"):
        out.say("[autoqnn] the full Fashion-MNIST is not installed: using the subset shipped with autoqnn "
                "(apt-get install dataset-fashion-mnist, or --data DIR, for the full set)")
    desc = f"Fashion-MNIST ({src}); {len(train)} train / {len(val)} test images used"
    return train, val, desc, 1, 10


def make_model(run: dict, in_channels: int, num_classes: int):
    from .models import build_model, load_float_checkpoint

    try:
        model = build_model(run["model"], num_classes=num_classes, in_channels=in_channels,
                            image_size=int(run.get("image_size") or 28))
    except (ValueError, ImportError, TypeError) as e:
        raise CLIError(f"--model {run['model']}: {e}") from None
    if run.get("float_checkpoint"):
        p = run["float_checkpoint"]
        if not Path(p).is_file():
            raise CLIError(f"--float-checkpoint {p}: no such file")
        try:
            load_float_checkpoint(model, p)
        except (ValueError, RuntimeError) as e:
            raise CLIError(f"--float-checkpoint {p}: {e}") from None
    return model


def _versions() -> dict:
    import platform

    import torch

    from . import __version__
    from . import _ext

    v = {"autoqnn": __version__, "torch": torch.__version__, "python": platform.python_version(),
         "extension": bool(_ext.HAS_EXT), "threads": torch.get_num_threads()}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        pass
    return v


class _Progress:
    """tqdm bars per epoch (rank 0, not --quiet/--json) with the phase's ETA."""

    def __init__(self, out: _Out):
        self.out = out
        self.bar = None
        self.key = None
        try:
            from tqdm.auto import tqdm

            self.tqdm = tqdm if out.rank0 and not out.quiet and not out.json and sys.stderr.isatty() else None
        except ImportError:  # pragma: no cover
            self.tqdm = None
        self.last = 0.0

    def __call__(self, phase, epoch, step, steps, loss):
        if self.tqdm is None:
            return
        key = (phase, epoch)
        if key != self.key:
            self.close()
            self.bar = self.tqdm(total=steps, desc=f"{phase} epoch {epoch + 1}", leave=False, unit="step")
            self.bar.update(step - 1)
            self.key = key
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _export(model, out_dir: Path, run: dict, cfg, val, out: _Out) -> dict:
    """Packed export + reload parity (+ ONNX when available); a failure is reported, not fatal."""
    import torch

    info: Dict[str, Any] = {}
    try:
        from .export import export_packed, load_quantized, parity
        from .models import build_model

        x = torch.stack([val[i][0] for i in range(min(64, len(val)))])
        path = out_dir / "model.qnn.safetensors"
        ex = export_packed(model.cpu(), path, model_config=cfg.quant,
                           extra={"model": run["model"], "image_size": run.get("image_size")})
        info = {"path": str(path), "file_bytes": ex.file_bytes, "expected_bytes": ex.expected_bytes,
                "payload_bytes": ex.payload_bytes, "header_bytes": ex.header_bytes}
        in_ch, ncls = x.shape[1], int(model(x[:1]).shape[1])
        loaded = load_quantized(path, lambda: build_model(run["model"], num_classes=ncls, in_channels=in_ch,
                                                          image_size=int(run.get("image_size") or 28)))
        model.eval()
        info["parity"] = parity(model, loaded, x)
        out.say(f"[autoqnn] exported {path.name}: {ex.file_bytes} bytes; reload parity max |diff| "
                f"{info['parity']['max_abs']:.3g}")
    except Exception as e:  # export problems must not lose the finished search
        info["error"] = f"{type(e).__name__}: {e}"
        out.say(f"[autoqnn] packed export failed: {info['error']}")
    return info


def _export_onnx(model, out_dir: Path, val, out: _Out) -> dict:
    import torch

    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return {"skipped": "onnxruntime is not installed (pip install onnx onnxruntime)"}
    try:
        from .export import export_onnx

        x = torch.stack([val[i][0] for i in range(min(8, len(val)))])
        res = export_onnx(model.cpu().eval(), out_dir / "model.onnx", x)
        ort = res.get("onnxruntime") or {}
        res = {"path": str(res.get("path")), "max_abs": ort.get("max_abs"), "mean_abs": ort.get("mean_abs"),
               "mapping": res.get("layers"), "opset": res.get("opset"), "onnx_bytes": res.get("onnx_bytes")}
        out.say(f"[autoqnn] exported model.onnx (onnxruntime parity max |diff| {res['max_abs']:.3g})")
        return res
    except Exception as e:
        out.say(f"[autoqnn] ONNX export failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------- commands
def cmd_search(args) -> int:
    import torch

    from . import pipeline as P
    from .report import write_report

    out = _Out(args.quiet, args.json)
    _init_distributed()
    run, cfg = build_configs(args)
    out_dir = Path(args.out)
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg.checkpoint_dir = str(out_dir / "checkpoints")
    if args.phase == "train-float":
        cfg.search_epochs = cfg.precision_epochs = cfg.finetune_epochs = 0
        cfg.float_epochs = cfg.float_epochs or 1
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    train, val, desc, in_ch, ncls = load_data(run, out)
    model = make_model(run, in_ch, ncls)
    if cfg.resume == "auto" and P.latest_checkpoint(cfg.checkpoint_dir) is None:
        out.say(f"[autoqnn] --resume auto: no checkpoint in {cfg.checkpoint_dir}, starting fresh")
        cfg.resume = None
    out.say(f"[autoqnn] {args.phase}: model {run['model']} on {desc}")
    out.say(f"[autoqnn] phases: float {cfg.float_epochs}, QSS {cfg.search_epochs} ({cfg.quant.granularity}), "
            f"QPL {cfg.precision_epochs}, fine-tune {cfg.finetune_epochs} epochs; targets W {cfg.weight_target} / "
            f"A {cfg.act_target} bits ({cfg.budget}); out {out_dir}")
    meta = {"model_name": run["model"], "data": desc, "run": run, "versions": _versions()}
    if _rank() == 0:
        P._atomic_write_text(out_dir / "config.json", json.dumps({"run": run, **cfg.to_dict()}, indent=2))
        P._atomic_write_text(out_dir / "run.json", json.dumps(meta, indent=2, default=str))
    if args.phase == "train-float":
        res_model, acc = _train_float_only(model, train, val, cfg, out)
        if _rank() == 0:
            P._atomic_torch_save(res_model.state_dict(), out_dir / "float.pt")
            out.say(f"[autoqnn] float accuracy {acc:.4f}; weights in {out_dir / 'float.pt'} "
                    f"(use: autoqnn search --float-checkpoint {out_dir / 'float.pt'})")
            out.event(event="done", float_accuracy=acc, path=str(out_dir / "float.pt"))
        return 0

    prog = _Progress(out)

    def cb(event, info):
        if event == "epoch":
            prog.close()
            out.event(event="epoch", **{k: v for k, v in info.items() if k not in ("probs",)})
        elif event == "phase":
            out.event(event="phase", **info)

    try:
        res = P.search(model, train, val, cfg, callbacks=[cb], quiet=out.quiet or out.json or not out.rank0,
                       progress=prog)
    except P.BudgetError as e:
        raise CLIError(f"budget impossible: {e}") from None
    finally:
        prog.close()
    if _rank() != 0:
        return 0
    result = res.to_dict()
    result.update(meta)
    result["status"] = "finished"
    result["wall_seconds"] = time.time() - t0
    result["export"] = _export(res.model, out_dir, run, cfg, val, out) if not args.no_export else {}
    result["onnx"] = _export_onnx(res.model, out_dir, val, out) if not args.no_export else {}
    P._atomic_write_text(out_dir / "result.json", json.dumps(result, indent=2, default=str))
    files = write_report(result, out_dir)
    P._atomic_torch_save(res.model.state_dict(), out_dir / "quantized_state.pt")
    out.say("")
    out.say(f"[autoqnn] done in {result['wall_seconds']:.0f} s: {res.summary()}")
    out.say(f"[autoqnn] report: {files['report.md']}")
    out.event(event="done", result=str(out_dir / "result.json"), float_accuracy=res.float_accuracy,
              quant_accuracy=res.quant_accuracy, weight_bits=res.weight_bits, act_bits=res.act_bits,
              seconds=result["wall_seconds"])
    return 0


def _train_float_only(model, train, val, cfg, out):
    """The float phase of the search (with its checkpoints and resume), stopped before QAG."""
    from . import pipeline as P

    class _Stop(Exception):
        pass

    def cb(event, info):
        if event == "phase" and info["phase"] != "float":
            raise _Stop()

    cfg.search_epochs = 0
    cfg.quant.mode = "fixed"  # nothing is searched; the quantizers are never built
    try:
        P.search(model, train, val, cfg, callbacks=[cb], quiet=out.quiet or out.json)
    except _Stop:
        pass
    device = next(model.parameters()).device
    acc = P.evaluate(model, val, batch_size=cfg.eval_batch_size, device=device)["accuracy"] if val is not None else None
    return model, acc


def _load_finished_run(run_dir: Path, out: "_Out", train_limit: Optional[int] = None):
    """(run options, SearchConfig, quantized model in its final state, train, val) of a finished
    run directory; clear errors when it is not one or has not finished."""
    import torch

    from . import pipeline as P

    if not (run_dir / "config.json").is_file():
        raise CLIError(f"{run_dir} is not an autoqnn run directory (no config.json)")
    conf = json.loads((run_dir / "config.json").read_text())
    run = conf.pop("run")
    cfg = P.SearchConfig.from_dict(conf)
    ck = P.latest_checkpoint(run_dir / "checkpoints")
    if ck is None:
        raise CLIError(f"{run_dir}/checkpoints holds no checkpoint")
    st = torch.load(ck, map_location="cpu", weights_only=True)
    if st["phase"] != "done":
        raise CLIError(f"{run_dir}: the search has not finished (phase {st['phase']}); resume it with "
                       f"`autoqnn search --out {run_dir} --resume auto`")
    data_run = run if train_limit is None else {**run, "train_limit": train_limit}
    train, val, _, in_ch, ncls = load_data(data_run, out)
    model = make_model({**run, "float_checkpoint": None}, in_ch, ncls)
    qm = P.prepare(model, cfg, torch.stack([train[0][0], train[1][0]]))
    P.apply_schemes(qm, st["schemes"], learn_bits=False, bits=st["bits"])
    qm.load_state_dict(st["model"])
    return run, cfg, qm, train, val


def cmd_finetune(args) -> int:
    """Fine-tune a finished run's quantized model (frozen schemes and bits) for more epochs."""
    import torch
    import torch.nn.functional as F

    from . import pipeline as P

    out = _Out(args.quiet, args.json)
    run_dir = Path(args.run)
    run, cfg, qm, train, val = _load_finished_run(run_dir, out)
    t0 = time.time()
    opt = torch.optim.Adam([p for p in qm.parameters() if p.requires_grad], lr=args.lr)
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    for e in range(args.epochs):
        qm.train()
        for x, y in loader:
            loss = F.cross_entropy(qm(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = P.evaluate(qm, val)["accuracy"]
        out.say(f"[autoqnn] finetune epoch {e + 1}/{args.epochs}: val acc {acc:.4f}")
        out.event(event="epoch", phase="finetune", epoch=e + 1, val_acc=acc)
    P._atomic_torch_save(qm.state_dict(), run_dir / "quantized_state.pt")
    out.say(f"[autoqnn] fine-tuned in {time.time() - t0:.0f} s; state in {run_dir / 'quantized_state.pt'} "
            f"(re-export with `autoqnn export {run_dir}` after `autoqnn finetune` writes the model)")
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from . import pipeline as P

    out = _Out(args.quiet, args.json)
    target = Path(args.target)
    if target.is_dir():
        conf_p = target / "config.json"
        if not conf_p.is_file():
            raise CLIError(f"{target} is not an autoqnn run directory (no config.json)")
        conf = json.loads(conf_p.read_text())
        run = conf.pop("run")
        packed = target / "model.qnn.safetensors"
        if not packed.is_file():
            raise CLIError(f"{target} holds no exported model (model.qnn.safetensors); run `autoqnn export {target}`")
    else:
        packed = target
        if not packed.is_file():
            raise CLIError(f"{packed}: no such file")
        run = dict(RUN_DEFAULTS)
        if args.model:
            run["model"] = args.model
    if args.data:
        run["data"] = args.data
    if args.val_limit is not None:
        run["val_limit"] = args.val_limit
    from .export import load_quantized
    from .models import build_model

    _, val, desc, in_ch, ncls = load_data({**run, "train_limit": 16}, out)
    try:
        model = load_quantized(packed, lambda: build_model(run["model"], num_classes=ncls, in_channels=in_ch,
                                                           image_size=int(run.get("image_size") or 28)))
    except Exception as e:
        raise CLIError(f"cannot load {packed}: {e}") from None
    ev = P.evaluate(model, val, batch_size=500, device=torch.device("cpu"))
    out.say(f"[autoqnn] {packed.name} on {desc}: accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f}")
    out.event(event="evaluate", **ev)
    if args.json is False and args.quiet:
        print(json.dumps(ev))
    return 0


def cmd_export(args) -> int:
    """Re-export a finished run from its final checkpoint."""
    out = _Out(args.quiet, args.json)
    run_dir = Path(args.run)
    run, cfg, qm, _, val = _load_finished_run(run_dir, out, train_limit=16)
    qm.eval()
    info = _export(qm, run_dir, run, cfg, val, out)
    if args.onnx:
        info["onnx"] = _export_onnx(qm, run_dir, val, out)
    out.event(event="export", **info)
    return 0 if "error" not in info else 1


def cmd_report(args) -> int:
    from .report import load_run, write_report

    out = _Out(args.quiet, args.json)
    try:
        result = load_run(args.run)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    files = write_report(result, args.run)
    out.say(f"[autoqnn] report rebuilt: {files['report.md']} ({len(files) - 2} plots)")
    out.event(event="report", files=files)
    return 0


def cmd_env(args) -> int:
    from .env import main as env_main

    return env_main([]) or 0


def cmd_tune_kernels(args) -> int:
    import torch

    from . import backends as autoqnn_backends
    from . import kernel_choice as kc

    out = _Out(args.quiet, args.json)
    if args.min_log2 < 0 or args.max_log2 < args.min_log2 or args.max_log2 > 30:
        raise CLIError(f"--min-log2/--max-log2 must satisfy 0 <= min <= max <= 30, got {args.min_log2}/{args.max_log2}")
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"--device {args.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("no CUDA GPU here: the kernel choice is measured on the GPU it is for "
                       "(--device cpu times the CPU kernels, for testing only)")
    sizes = [2 ** k for k in range(args.min_log2, args.max_log2 + 1, args.step)]
    try:
        res = kc.tune(dev, sizes=sizes, rounds=args.rounds, write=not args.no_write, path=args.out,
                      progress=None if args.quiet or args.json else (lambda m: print("[tune] " + m, file=sys.stderr)))
    except (ValueError, autoqnn_backends.BackendUnavailableError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        out.event(event="tune-kernels", **res)
    else:
        print(kc.format_markdown(res))
        if res.get("path"):
            print(f"\nwritten to {res['path']} (backend='auto' uses it on {res['device']})")
        elif dev.type != "cuda":
            print("\n(CPU measurements are not written: the router only chooses between GPU kernels)")
    return 0


# ------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="machine-readable JSON lines on stdout")


def _search_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or YAML file with search options (and a 'run' section)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one option, e.g. --set search_epochs=5 --set quant.granularity=coarse")
    p.add_argument("--model", help="built-in (vgglike, vgglike-small, smallcnn), a torchvision name, or "
                                   "module:callable")
    p.add_argument("--data", help="Fashion-MNIST folder (IDX files) or imagefolder:DIR (default: built-in)")
    p.add_argument("--train-limit", type=int, help="class-stratified number of training images (0: all)")
    p.add_argument("--val-limit", type=int, help="number of test images (0: all)")
    p.add_argument("--float-checkpoint", help="start from this float state_dict (weights_only load)")
    p.add_argument("--image-size", type=int, help="input size for ImageFolder data (default 224; 28 for Fashion-MNIST)")
    p.add_argument("--out", default="autoqnn-run", help="output directory (default ./autoqnn-run)")
    p.add_argument("--resume", choices=["auto"], help="continue from the latest checkpoint in OUT")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--compile", nargs="?", const=True, metavar="BACKEND",
                   help="torch.compile the training steps (default backend: inductor)")
    p.add_argument("--channels-last", action="store_true",
                   help="convolution weights in channels-last memory format (NHWC convolutions; the quantizers "
                        "keep the layout)")
    p.add_argument("--no-export", action="store_true", help="skip the packed/ONNX export")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autoqnn", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `autoqnn search` with no arguments for the built-in Fashion-MNIST search.")
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("search", help="the whole method: float training, QSS, QPL, fine-tune, report, export")
    _search_opts(p)
    p.set_defaults(fn=cmd_search, phase="search")
    p = sub.add_parser("train-float", help="float training only (writes OUT/float.pt)")
    _search_opts(p)
    p.set_defaults(fn=cmd_search, phase="train-float")
    p = sub.add_parser("finetune", help="more fine-tuning epochs for a finished run")
    p.add_argument("run")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    _common(p)
    p.set_defaults(fn=cmd_finetune)
    p = sub.add_parser("evaluate", help="accuracy of an exported model (a run dir or a .qnn.safetensors file)")
    p.add_argument("target")
    p.add_argument("--model", help="architecture (when TARGET is a file)")
    p.add_argument("--data")
    p.add_argument("--val-limit", type=int)
    _common(p)
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("export", help="(re-)export a finished run: packed safetensors (+ --onnx)")
    p.add_argument("run")
    p.add_argument("--onnx", action="store_true")
    _common(p)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("report", help="rebuild report.md/json and plots of a finished or interrupted run")
    p.add_argument("run")
    _common(p)
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("env", help="versions, extension and backend status")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("tune-kernels", help="measure the C++/CUDA and Triton kernels per op and size; "
                                            "backend='auto' then uses the faster one")
    p.add_argument("--device", default="cuda")
    p.add_argument("--min-log2", type=int, default=10, help="smallest size, 2^N elements (default 10)")
    p.add_argument("--max-log2", type=int, default=24, help="largest size, 2^N elements (default 24)")
    p.add_argument("--step", type=int, default=2, help="log2 step between sizes (default 2)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", help="table file (default: $AUTOQNN_KERNEL_CHOICE or ~/.cache/autoqnn/kernel_choice.json)")
    p.add_argument("--no-write", action="store_true", help="only print the measurements")
    _common(p)
    p.set_defaults(fn=cmd_tune_kernels)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["search"]
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except CLIError as e:
        print(f"autoqnn {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autoqnn {args.cmd}: interrupted; continue with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
