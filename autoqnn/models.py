# SPDX-License-Identifier: MIT
"""Models for experiments: the paper's VGG7-64 (:class:`VGGLike`), a tiny :class:`SmallCNN`,
torchvision classifiers and user callables by name (:func:`build_model`), and loading float
checkpoints safely (:func:`load_float_checkpoint`: tensors only, never pickled code).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

__all__ = ["VGGLike", "SmallCNN", "build_model", "MODEL_NAMES", "load_float_checkpoint"]

PathLike = Union[str, os.PathLike]
IntOrPair = Union[int, tuple]

#: Built-in names accepted by :func:`build_model` (besides torchvision names and "module:callable").
MODEL_NAMES = ("vgglike", "vgg7", "vgglike-small", "smallcnn")


def _pair(size: IntOrPair, what: str) -> tuple:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be an int or a pair of ints, got {size!r}")


class VGGLike(nn.Module):
    """The paper's VGG7-64 for small images: 64C3-64C3-MP2-128C3-128C3-MP2-256C3-256C3-MP2-
    FC1024-Dropout-FC10 at ``width=64``. Every conv is 3x3, stride 1, padding 1, with bias, then
    ReLU, then BatchNorm2d; max pooling 2x2 floors (28 -> 14 -> 7 -> 3), so the flatten size is
    ``4*width * (image_size//8)**2`` (256*3*3 for 28x28). ``width`` scales the channels
    (w, w, 2w, 2w, 4w, 4w), ``fc`` the hidden fully connected layer (followed by ReLU, Dropout).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 64,
                 image_size: IntOrPair = 28, fc: int = 1024, dropout: float = 0.5):
        super().__init__()
        h, w = _pair(image_size, "VGGLike image_size")
        for _ in range(3):
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"VGGLike: image_size {image_size!r} is too small for three 2x2 "
                             "poolings (need at least 8)")
        if width < 1 or fc < 1:
            raise ValueError(f"VGGLike: width and fc must be positive, got {width}, {fc}")
        chans = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list = []
        c_in = in_channels
        for i, c in enumerate(chans):
            layers += [nn.Conv2d(c_in, c, 3, stride=1, padding=1, bias=True), nn.ReLU(inplace=True),
                       nn.BatchNorm2d(c)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.flatten_features = chans[-1] * h * w
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(self.flatten_features, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A tiny CNN for tests and demos (~38k parameters): conv 3x3 in->16, ReLU, MP2, conv 3x3
    16->32, ReLU, MP2, adaptive average pool to 4x4, FC 512->64, ReLU, FC 64->num_classes.
    Any input size of at least 4x4 works."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((4, 4)),
        )
        self.classifier = nn.Sequential(nn.Flatten(1), nn.Linear(32 * 4 * 4, 64),
                                        nn.ReLU(inplace=True), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _from_callable(spec: str, kwargs: dict) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"model {spec!r}: the form is 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {mod_name!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"model {spec!r}: {mod_name!r} has no attribute {attr!r}") from e
    if not callable(obj):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable ({type(obj).__name__})")
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: calling it returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


_TV_ERROR: list = []  # why torchvision could not be imported (set by _torchvision_models)


def _torchvision_models():
    try:
        import torchvision.models as tvm
    except Exception as e:  # not installed, or a build that does not match this torch
        _TV_ERROR[:] = [f"{type(e).__name__}: {e}"]
        return None, ()
    try:
        return tvm, tuple(tvm.list_models(module=tvm))
    except Exception:  # pragma: no cover - very old torchvision
        return tvm, ()


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                **kwargs: Any) -> nn.Module:
    """A float model by name.

    * ``"vgglike"`` / ``"vgg7"``: :class:`VGGLike` (``**kwargs``: width, fc, dropout);
      ``"vgglike-small"``: VGGLike with width 16, fc 256; ``"smallcnn"``: :class:`SmallCNN`.
    * a torchvision classification architecture (``"resnet18"``, ``"mobilenet_v2"``, ...):
      ``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)``;
      random initialisation, nothing is ever downloaded (load weights with
      :func:`load_float_checkpoint`); needs ``in_channels == 3``.
    * ``"package.module:callable"``: imported and called with ``**kwargs`` only (pass
      num_classes etc. in ``kwargs`` if the callable wants them); must return an ``nn.Module``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if ":" in name:
        return _from_callable(name, kwargs)
    key = name.lower()
    if key in ("vgglike", "vgg7"):
        return VGGLike(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                       **kwargs)
    if key == "vgglike-small":
        opts = {"width": 16, "fc": 256, **kwargs}
        return VGGLike(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                       **opts)
    if key == "smallcnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, **kwargs)
    tvm, tv_names = _torchvision_models()
    if key in tv_names:
        if in_channels != 3:
            raise ValueError(f"model {name!r} is a torchvision architecture built for 3-channel "
                             f"images, but in_channels={in_channels}; use a 3-channel (RGB) "
                             "dataset, or a built-in model (" + ", ".join(MODEL_NAMES) + ")")
        if kwargs.get("weights") is not None or kwargs.get("pretrained"):
            raise ValueError(f"model {name!r}: pretrained weights are never downloaded; build "
                             "with weights=None and load a local file with load_float_checkpoint")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}
        return tvm.get_model(key, weights=None, num_classes=num_classes, **kwargs)
    tv_hint = ("any torchvision classification model name (e.g. resnet18)" if tvm is not None
               else f"torchvision model names (torchvision unavailable: {_TV_ERROR[0] if _TV_ERROR else '?'})")
    raise ValueError(f"unknown model {name!r}: use a built-in name ({', '.join(MODEL_NAMES)}), "
                     f"{tv_hint}, or 'package.module:callable'")


def _strip_module_prefix(sd: dict, model_keys: set) -> dict:
    """DistributedDataParallel checkpoints prefix every key with ``module.``."""
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.")
                                                                   for k in model_keys):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_float_checkpoint(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a float state dict into ``model`` (strict) and return ``model``.

    ``path``: a ``torch.save`` file read with ``weights_only=True`` (tensors and plain
    containers only, no code), or ``.safetensors`` (needs the ``safetensors`` package). The file
    may hold the state dict itself or a dict with a ``"model"`` or ``"state_dict"`` entry;
    ``module.`` prefixes of DistributedDataParallel are removed. Missing, unexpected or
    wrongly shaped entries raise :class:`ValueError` listing them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"checkpoint {str(path)!r}: reading .safetensors needs the "
                              "safetensors package") from e
        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {str(path)!r} cannot be loaded as tensors only "
                             f"(weights_only=True): {e}") from e
    if isinstance(obj, Mapping):
        for k in ("model", "state_dict"):
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state "
                         "dict (or a dict with a 'model' / 'state_dict' entry)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint {str(path)!r}: entries that are not tensors: "
                         f"{not_tensors[:10]}")
    own = model.state_dict()
    sd = _strip_module_prefix(dict(obj), set(own))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def some(xs: list) -> str:
            more = f" ... ({len(xs)} in all)" if len(xs) > 20 else ""
            return ", ".join(map(str, xs[:20])) + more

        parts = []
        if missing:
            parts.append(f"missing keys [{some(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{some(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatches [{some(shapes)}]")
        raise ValueError(f"checkpoint {str(path)!r} does not match {type(model).__name__}: "
                         + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model
