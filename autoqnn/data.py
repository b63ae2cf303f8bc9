# SPDX-License-Identifier: MIT
"""Datasets and loaders: IDX files, Fashion-MNIST, ImageNet-style folders, seeded DataLoaders.

* :func:`read_idx` / :func:`write_idx`: the IDX format of (Fashion-)MNIST, plain or gzipped,
  strictly validated (a malformed file is a :class:`ValueError` naming the file and the defect),
  read with :func:`numpy.frombuffer`; nothing in a data file is ever executed.
* :func:`load_fashion_mnist`: Fashion-MNIST as a :class:`~torch.utils.data.TensorDataset`. The
  full set is searched in ``root``, ``$AUTOQNN_FMNIST`` and :data:`FASHION_MNIST_SEARCH_PATHS`
  (the Debian package ``dataset-fashion-mnist``); without it a stratified subset shipped with
  autoqnn (3000 train / 1000 test images, ``autoqnn/datasets/fashion_mnist_subset/``) is used,
  with one warning.
* :func:`image_folder`: a torchvision ``ImageFolder`` with the standard ImageNet transforms.
* :func:`make_loader` / :func:`set_epoch`: DataLoaders whose order depends only on the seed
  (and the epoch), single-process or with a ``DistributedSampler``.
"""
from __future__ import annotations

import gzip
import os
import random
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "read_idx",
    "write_idx",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SEARCH_PATHS",
    "SUBSET_DIR",
    "find_fashion_mnist",
    "fashion_mnist_source",
    "load_fashion_mnist",
    "stratified_indices",
    "image_folder",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "make_loader",
    "set_epoch",
]

PathLike = Union[str, os.PathLike]

# --------------------------------------------------------------------------- IDX format
#: IDX type code -> big-endian numpy dtype (the format stores every multi-byte value big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_ELEMENTS = 2**31
_GZIP_MAGIC = b"\x1f\x8b"


def _open_idx(path: Path):
    """Binary file object over the IDX payload: gunzipped when the name ends in .gz or the file
    starts with the gzip magic."""
    with open(path, "rb") as f:
        head = f.read(2)
    if path.name.endswith(".gz") or head == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exact(f, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at end of file)."""
    chunks, left = [], n
    while left > 0:
        b = f.read(left)
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or gzip magic: decompressed transparently) into a writable,
    native-byte-order numpy array of the stored dtype and shape.

    Raises :class:`ValueError` naming the file for: bad magic, unknown type code, zero
    dimensions, truncated header, absurd dimensions (more than 2**31 elements), truncated data,
    trailing bytes after the data, and corrupt gzip streams. :class:`FileNotFoundError` if the
    file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist")
    try:
        with _open_idx(path) as f:
            head = _read_exact(f, 4)
            if len(head) < 4:
                raise ValueError(f"IDX file {str(path)!r}: truncated header ({len(head)} bytes, "
                                 "need at least 4)")
            if head[0] != 0 or head[1] != 0:
                raise ValueError(f"IDX file {str(path)!r}: bad magic {head[:2].hex()} "
                                 "(the first two bytes must be zero); not an IDX file")
            code, ndim = head[2], head[3]
            if code not in _IDX_DTYPES:
                known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
                raise ValueError(f"IDX file {str(path)!r}: unknown data type code 0x{code:02X} "
                                 f"(known: {known})")
            if ndim == 0:
                raise ValueError(f"IDX file {str(path)!r}: zero dimensions in the header")
            raw_dims = _read_exact(f, 4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise ValueError(f"IDX file {str(path)!r}: truncated header ({ndim} dimensions "
                                 f"announced, {len(raw_dims) // 4} present)")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            count = 1
            for d in dims:
                count *= d
            if count > _MAX_ELEMENTS:
                raise ValueError(f"IDX file {str(path)!r}: absurd dimensions {dims} "
                                 f"({count} elements > 2**31)")
            dtype = _IDX_DTYPES[code]
            nbytes = count * dtype.itemsize
            data = _read_exact(f, nbytes)
            if len(data) < nbytes:
                raise ValueError(f"IDX file {str(path)!r}: truncated data ({len(data)} bytes, the "
                                 f"dimensions {dims} of type {dtype.name} need {nbytes})")
            extra = f.read(1)
            if extra:
                rest = 1 + len(f.read())
                raise ValueError(f"IDX file {str(path)!r}: {rest} trailing bytes after the "
                                 f"{nbytes} data bytes of dimensions {dims}")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"IDX file {str(path)!r}: cannot be read/decompressed ({e})") from e
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _idx_code(dtype: np.dtype) -> int:
    for code, dt in _IDX_DTYPES.items():
        if np.dtype(dtype).kind == dt.kind and np.dtype(dtype).itemsize == dt.itemsize:
            return code
    names = "uint8, int8, int16, int32, float32, float64"
    raise ValueError(f"write_idx: dtype {np.dtype(dtype)} has no IDX type code (use one of {names})")


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then ``os.replace`` it onto
    ``path``: readers see the old file or the complete new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_idx(path: PathLike, array: Any) -> None:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64; 1 to 255 dimensions) as an
    IDX file, gzipped when ``path`` ends in ``.gz`` (deterministic bytes: no name, mtime 0).
    The file is replaced atomically."""
    path = Path(path)
    arr = np.asarray(array)
    code = _idx_code(arr.dtype)
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"write_idx: {arr.ndim} dimensions; IDX stores 1 to 255")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"write_idx: dimension in {arr.shape} does not fit in 32 bits")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes()

    def write(f):
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
                g.write(header)
                g.write(payload)
        else:
            f.write(header)
            f.write(payload)

    _atomic_write(path, write)


# --------------------------------------------------------------------------- Fashion-MNIST
#: Class names, index = label.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
#: split -> (images, labels) file names, without ``.gz`` (both forms are accepted).
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: System locations searched after ``root`` and ``$AUTOQNN_FMNIST`` (Debian: dataset-fashion-mnist).
FASHION_MNIST_SEARCH_PATHS: tuple = ("/usr/share/datasets/fashion-mnist",)
#: The stratified subset shipped with the package (see its README.md).
SUBSET_DIR = Path(__file__).resolve().parent / "datasets" / "fashion_mnist_subset"
_ENV = "AUTOQNN_FMNIST"
_HOWTO = ("for the full set (60000/10000 images) install the Debian package "
          "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass --data DIR / "
          f"root=DIR / ${_ENV}=DIR with the four IDX files")


def _expected_names() -> list:
    return [n + "[.gz]" for pair in FASHION_MNIST_FILES.values() for n in pair]


def _file_in(d: Path, base: str) -> Optional[Path]:
    for name in (base + ".gz", base):
        p = d / name
        if p.is_file():
            return p
    return None


def _complete(d: Path) -> bool:
    return d.is_dir() and all(_file_in(d, n) is not None
                              for pair in FASHION_MNIST_FILES.values() for n in pair)


def _candidates(d: Path) -> list:
    """``d`` itself and the usual sub-layouts (torchvision's FashionMNIST/raw, fashion-mnist/)."""
    return [d, d / "FashionMNIST" / "raw", d / "fashion-mnist", d / "fashion_mnist"]


def find_fashion_mnist(root: Optional[PathLike] = None) -> Optional[Path]:
    """Directory holding the four Fashion-MNIST IDX files (gzipped or not).

    Searched in order: ``root`` (with its ``FashionMNIST/raw`` and ``fashion-mnist``
    subdirectories), ``$AUTOQNN_FMNIST``, :data:`FASHION_MNIST_SEARCH_PATHS`. A ``root`` or
    ``$AUTOQNN_FMNIST`` without the files raises :class:`FileNotFoundError` (an explicit location
    is never silently replaced by another); with neither given, ``None`` means not found.
    """
    explicit = [(Path(root).expanduser(), f"root {str(root)!r}")] if root is not None else []
    if root is None and os.environ.get(_ENV):
        explicit.append((Path(os.environ[_ENV]).expanduser(), f"${_ENV}={os.environ[_ENV]!r}"))
    for d, what in explicit:
        for c in _candidates(d):
            if _complete(c):
                return c
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {what}: expected the files {', '.join(_expected_names())} "
            f"in {str(d)!r} (or its FashionMNIST/raw or fashion-mnist subdirectory)")
    for s in FASHION_MNIST_SEARCH_PATHS:
        if _complete(Path(s)):
            return Path(s)
    return None


def _idx_count(path: Path) -> int:
    """First dimension of an IDX file, reading only its header."""
    with _open_idx(path) as f:
        head = _read_exact(f, 8)
    if len(head) < 8 or head[:2] != b"\0\0":
        raise ValueError(f"IDX file {str(path)!r}: bad or truncated header")
    return int(np.frombuffer(head[4:8], dtype=">u4")[0])


def fashion_mnist_source(root: Optional[PathLike] = None) -> str:
    """Which Fashion-MNIST :func:`load_fashion_mnist` uses: ``"full: DIR"`` or
    ``"subset (shipped): N train / M test"``."""
    d = find_fashion_mnist(root)
    if d is not None:
        return f"full: {d}"
    n = {s: _idx_count(_file_in(SUBSET_DIR, names[1]) or SUBSET_DIR / (names[1] + ".gz"))
         for s, names in FASHION_MNIST_FILES.items()}
    return f"subset (shipped): {n['train']} train / {n['test']} test"


def stratified_indices(labels: Any, limit: int) -> np.ndarray:
    """The first ``limit`` indices in round-robin class order (rank within class, then class):
    each class contributes its earliest samples and the counts differ by at most one while every
    class has samples left. Deterministic; returned sorted ascending."""
    labels = np.asarray(labels).reshape(-1)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if limit >= labels.size:
        return np.arange(labels.size)
    order = np.argsort(labels, kind="stable")  # grouped by class, original order within
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(labels.size) - starts  # rank of each sample within its class
    key = np.lexsort((sorted_labels, rank))  # by rank, then class
    return np.sort(order[key[:limit]])


def _load_split(d: Path, split: str) -> tuple:
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    img_path, lbl_path = _file_in(d, img_name), _file_in(d, lbl_name)
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} files {img_name}[.gz], {lbl_name}[.gz] "
                                f"missing in {str(d)!r}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST images {str(img_path)!r}: expected uint8 [N, 28, 28], "
                         f"got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"Fashion-MNIST labels {str(lbl_path)!r}: expected 1 dimension, got "
                         f"{list(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: {images.shape[0]} images in {str(img_path)!r} "
                         f"but {labels.shape[0]} labels in {str(lbl_path)!r}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)]
        raise ValueError(f"Fashion-MNIST labels {str(lbl_path)!r}: values must be 0..9, found "
                         f"{sorted(set(bad.tolist()))[:10]}")
    return images, labels


def load_fashion_mnist(split: str = "train", root: Optional[PathLike] = None,
                       limit: Optional[int] = None, normalize: bool = True,
                       source_out: Optional[list] = None) -> TensorDataset:
    """Fashion-MNIST ``split`` ("train" or "test") as ``TensorDataset(images, labels)``: images
    float32 ``[N, 1, 28, 28]`` in [0, 1] or, with ``normalize``, standardized with mean 0.2860 /
    std 0.3530; labels int64 in 0..9.

    ``limit``: a deterministic class-stratified subset of that many samples
    (:func:`stratified_indices`). Without the full set and without ``root``, the shipped subset
    is used and one warning says so. ``source_out``: a list to which the
    :func:`fashion_mnist_source` description of the data used is appended.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = find_fashion_mnist(root)
    if d is None:
        d = SUBSET_DIR
        source = fashion_mnist_source(root)
        warnings.warn(f"autoqnn: full Fashion-MNIST not found, using the {source} images shipped "
                      f"with autoqnn; {_HOWTO}", stacklevel=2)
    else:
        source = f"full: {d}"
    images, labels = _load_split(d, split)
    if limit is not None:
        idx = stratified_indices(labels, limit)
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    if normalize:
        x = x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    if source_out is not None:
        source_out.append(source)
    return TensorDataset(x, y)


# --------------------------------------------------------------------------- image folders
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMG_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_dirs(d: Path) -> list:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder(root: PathLike, split: str = "train", image_size: int = 224,
                 train_transforms: Optional[bool] = None) -> Dataset:
    """``torchvision.datasets.ImageFolder`` over ``root/split`` (or ``root`` itself when it has no
    ``split`` subdirectory and directly holds the class folders).

    ``train_transforms`` (default: ``split == "train"``): RandomResizedCrop(image_size),
    RandomHorizontalFlip, ToTensor, Normalize(ImageNet); otherwise Resize(int(image_size /
    0.875)), CenterCrop(image_size), ToTensor, Normalize(ImageNet).
    """
    try:
        from torchvision import datasets, transforms
    except Exception as e:  # not installed, or a build that does not match this torch
        raise ImportError(f"autoqnn.data.image_folder needs torchvision ({type(e).__name__}: {e}); "
                          "install a torchvision matching your torch") from e
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    d = root / split
    if not d.is_dir():
        splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
        if splits:
            raise FileNotFoundError(f"image folder {str(root)!r} has split(s) {splits} but no "
                                    f"{split!r} subdirectory")
        d = root
    classes = _class_dirs(d)
    if not classes:
        raise FileNotFoundError(f"image folder {str(d)!r} has no class subdirectories "
                                f"(expected {d}/<class>/<image>)")
    if not any(f.suffix.lower() in _IMG_EXT for c in classes for f in c.rglob("*") if f.is_file()):
        raise FileNotFoundError(f"image folder {str(d)!r}: no images ({', '.join(_IMG_EXT)}) in "
                                f"its class subdirectories {[c.name for c in classes][:10]}")
    if train_transforms is None:
        train_transforms = split == "train"
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train_transforms:
        tf = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                 transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    else:
        tf = transforms.Compose([transforms.Resize(int(image_size / 0.875)),
                                 transforms.CenterCrop(image_size), transforms.ToTensor(), norm])
    try:
        return datasets.ImageFolder(str(d), transform=tf)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image folder {str(d)!r}: {e}") from e


# --------------------------------------------------------------------------- loaders
def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from its torch seed (set from the loader's
    generator), so augmentations using them are reproducible too."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int,
                num_workers: int = 0, distributed: Optional[bool] = None,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (and the epoch given to
    :func:`set_epoch`). ``distributed`` (default: ``torch.distributed`` is initialized): each
    rank reads its shard through ``DistributedSampler(shuffle=shuffle, seed=seed)``."""
    if distributed is None:
        distributed = _dist_initialized()
    if distributed and not _dist_initialized():
        raise RuntimeError("make_loader(distributed=True) needs torch.distributed initialized "
                           "(init_process_group) first")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed), drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                        sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                        generator=generator, worker_init_fn=_seed_worker if num_workers else None)
    loader._autoqnn_seed = int(seed)  # read by set_epoch
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make ``loader``'s next pass the order of ``epoch``: ``sampler.set_epoch`` when the sampler
    has it (DistributedSampler); for a :func:`make_loader` loader otherwise, its generator is
    reseeded with ``seed + epoch`` (the same order after a resume at that epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
        return
    seed = getattr(loader, "_autoqnn_seed", None)
    gen = getattr(loader, "generator", None)
    if seed is not None and gen is not None:
        gen.manual_seed(seed + int(epoch))
