# SPDX-License-Identifier: MIT
"""autoqnn.data (IDX, Fashion-MNIST, ImageFolder, loaders) and autoqnn.models."""
import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from optional_deps import needs_torchvision
import torch
from torch import nn

from autoqnn import data
from autoqnn.data import (FASHION_MNIST_CLASSES, find_fashion_mnist, fashion_mnist_source,
                          image_folder, load_fashion_mnist, make_loader, read_idx, set_epoch,
                          stratified_indices, write_idx)
from autoqnn.models import (MODEL_NAMES, SmallCNN, VGGLike, build_model, load_float_checkpoint)

FULL = Path("/usr/share/datasets/fashion-mnist")
HAVE_FULL = data._complete(FULL)


# --------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 2, 1, 3)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, dtype, shape, gz):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        a = (rng.standard_normal(shape) * 1e3).astype(dtype)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    raw = p.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == gz
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == shape
    np.testing.assert_array_equal(a, b)
    b.flat[0] = 0  # writable
    # big-endian on disk, as the format says
    plain = gzip.decompress(raw) if gz else raw
    assert plain[3] == len(shape)
    assert int.from_bytes(plain[4:8], "big") == shape[0]
    assert plain[4 + 4 * len(shape):] == np.asarray(a, dtype=np.dtype(dtype).newbyteorder(">")).tobytes()


def test_idx_gzip_by_magic_and_known_file(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "x.gz", a)
    os.replace(tmp_path / "x.gz", tmp_path / "x.bin")  # gzip without the .gz name
    np.testing.assert_array_equal(read_idx(tmp_path / "x.bin"), a)
    # a hand-made file: 0x0B short, 2 dims (2, 2), big-endian
    (tmp_path / "h").write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 2])
                                 + b"\x00\x01\xff\xfe\x01\x00\x80\x00")
    np.testing.assert_array_equal(read_idx(tmp_path / "h"), [[1, -2], [256, -32768]])


def _hdr(code=0x08, dims=(2, 3)):
    return bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("content,msg", [
    (b"\x00", "truncated header"),
    (b"", "truncated header"),
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
    (_hdr(code=0x0A) + b"\0" * 6, "unknown data type code 0x0A"),
    (bytes([0, 0, 8, 0]), "zero dimensions"),
    (_hdr(dims=(2, 3))[:9], "truncated header"),
    (_hdr(dims=(2, 3)) + b"\0" * 5, "truncated data"),
    (_hdr(code=0x0C, dims=(2, 3)) + b"\0" * 23, "truncated data"),
    (_hdr(dims=(2, 3)) + b"\0" * 7, "trailing bytes"),
    (_hdr(dims=(65536, 65536)), "absurd dimensions"),
    (_hdr(dims=(2**32 - 1, 2**32 - 1, 2)), "absurd dimensions"),
])
def test_idx_malformed(tmp_path, content, msg, gz):
    p = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
    p.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(ValueError, match=msg) as ei:
        read_idx(p)
    assert str(p) in str(ei.value)


def test_idx_corrupt_gzip_and_missing(tmp_path):
    good = gzip.compress(_hdr() + b"\0" * 6)
    p = tmp_path / "c.gz"
    p.write_bytes(good[:-10])  # stream cut short
    with pytest.raises(ValueError, match="c.gz"):
        read_idx(p)
    p.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ValueError, match="c.gz"):
        read_idx(p)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


def test_write_idx_atomic_and_rejects(tmp_path):
    p = tmp_path / "sub" / "a.idx.gz"
    write_idx(p, np.zeros((4, 4), np.uint8))
    write_idx(p, np.ones((2,), np.float32))  # replace
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.idx.gz"]
    np.testing.assert_array_equal(read_idx(p), [1, 1])
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "b.idx", np.zeros(3, np.uint16))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "b.idx", np.float32(1.0))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sub"]  # nothing left behind

    # a failure while writing leaves the old file intact and no temporary
    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        data._atomic_write(p, failing)
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.idx.gz"]
    np.testing.assert_array_equal(read_idx(p), [1, 1])
    # deterministic gzip bytes
    write_idx(tmp_path / "c.gz", np.arange(9, dtype=np.int16))
    write_idx(tmp_path / "d.gz", np.arange(9, dtype=np.int16))
    assert (tmp_path / "c.gz").read_bytes() == (tmp_path / "d.gz").read_bytes()


# --------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture
def subset_only(monkeypatch):
    """No full set anywhere: the loader must use the shipped subset."""
    monkeypatch.delenv("AUTOQNN_FMNIST", raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SEARCH_PATHS", ())


def test_classes():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_shipped_subset_files():
    d = data.SUBSET_DIR
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["LICENSE", "README.md", "train-images-idx3-ubyte.gz",
                            "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                            "t10k-labels-idx1-ubyte.gz"])
    assert sum(p.stat().st_size for p in d.iterdir()) < 3_000_000
    lic = (d / "LICENSE").read_text()
    assert "Zalando SE" in lic and "Permission is hereby granted" in lic


@pytest.mark.parametrize("split,n", [("train", 3000), ("test", 1000)])
def test_subset_loads(subset_only, split, n):
    assert find_fashion_mnist() is None
    src = []
    with pytest.warns(UserWarning, match="dataset-fashion-mnist") as rec:
        ds = load_fashion_mnist(split, source_out=src)
    assert len([w for w in rec if "Fashion-MNIST" in str(w.message)]) == 1
    assert src == ["subset (shipped): 3000 train / 1000 test"]
    assert fashion_mnist_source() == src[0]
    x, y = ds.tensors
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
    # the dataset statistics hold on the subset too
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    with pytest.warns(UserWarning):
        raw = load_fashion_mnist(split, normalize=False).tensors[0]
    assert raw.min() >= 0 and raw.max() <= 1 and raw.max() == 1
    torch.testing.assert_close((raw - 0.2860) / 0.3530, x)


def test_subset_limit_stratified(subset_only):
    with pytest.warns(UserWarning):
        full = load_fashion_mnist("train", normalize=False)
        part = load_fashion_mnist("train", limit=45, normalize=False)
        again = load_fashion_mnist("train", limit=45, normalize=False)
    counts = torch.bincount(part.tensors[1], minlength=10).tolist()
    assert sum(counts) == 45 and max(counts) - min(counts) <= 1
    assert torch.equal(part.tensors[0], again.tensors[0])
    # the earliest samples of each class, in their original order
    idx = stratified_indices(full.tensors[1].numpy(), 45)
    assert list(idx) == sorted(idx)
    torch.testing.assert_close(part.tensors[0], full.tensors[0][torch.from_numpy(idx)])
    y = full.tensors[1].numpy()
    for c in range(10):
        mine = idx[y[idx] == c]
        np.testing.assert_array_equal(mine, np.flatnonzero(y == c)[:len(mine)])


def test_stratified_indices_properties():
    y = np.array([0] * 50 + [1] * 3 + [2] * 20)
    np.random.default_rng(1).shuffle(y)
    idx = stratified_indices(y, 30)
    c = np.bincount(y[idx], minlength=3)
    assert c.tolist() == [14, 3, 13]  # class 1 runs out; the others share the rest evenly
    assert len(stratified_indices(y, 1000)) == len(y)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            stratified_indices(y, bad)


def test_user_root_missing_raises(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as ei:
        load_fashion_mnist("train", root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg
    monkeypatch.setenv("AUTOQNN_FMNIST", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="AUTOQNN_FMNIST"):
        find_fashion_mnist()


def _fake_fmnist(d, n_train=20, n_test=10, gz=True, labels=None):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img, lbl = data.FASHION_MNIST_FILES[split]
        ext = ".gz" if gz else ""
        write_idx(d / (img + ext), rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        write_idx(d / (lbl + ext), (np.arange(n) % 10 if labels is None else labels).astype(np.uint8))


@pytest.mark.parametrize("gz", [True, False])
def test_user_root_env_and_layouts(tmp_path, monkeypatch, gz):
    _fake_fmnist(tmp_path, gz=gz)
    src = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_fashion_mnist("test", root=tmp_path, source_out=src)
    assert len(ds) == 10 and src == [f"full: {tmp_path}"]
    # torchvision's layout under the root, and the environment variable
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _fake_fmnist(raw, n_train=30, gz=gz)
    assert find_fashion_mnist(tmp_path / "tv") == raw
    monkeypatch.setenv("AUTOQNN_FMNIST", str(raw))
    assert len(load_fashion_mnist("train")) == 30
    assert fashion_mnist_source() == f"full: {raw}"
    assert find_fashion_mnist(tmp_path) == tmp_path  # an explicit root wins over the env


def test_bad_labels_and_counts(tmp_path):
    _fake_fmnist(tmp_path, labels=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12] * 2))
    with pytest.raises(ValueError, match=r"0\.\.9.*12"):
        load_fashion_mnist("train", root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match="20 images.*19 labels"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


@pytest.mark.skipif(not HAVE_FULL, reason="full Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_full_set(monkeypatch):
    monkeypatch.delenv("AUTOQNN_FMNIST", raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SEARCH_PATHS", (str(FULL),))
    assert fashion_mnist_source() == f"full: {FULL}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = load_fashion_mnist("train", normalize=False)
        te = load_fashion_mnist("test", limit=1000)
    assert tr.tensors[0].shape == (60000, 1, 28, 28) and len(tr) == 60000
    assert torch.bincount(tr.tensors[1]).tolist() == [6000] * 10
    assert abs(tr.tensors[0].mean().item() - 0.2860) < 1e-3
    assert abs(tr.tensors[0].std().item() - 0.3530) < 1e-3
    assert torch.bincount(te.tensors[1]).tolist() == [100] * 10
    # the shipped subset is exactly the first 100 per class of the full test set
    sub = data._load_split(data.SUBSET_DIR, "test")[0]
    full = data._load_split(FULL, "test")
    np.testing.assert_array_equal(sub, full[0][stratified_indices(full[1], 1000)])


# --------------------------------------------------------------------------- ImageFolder
def _png_tree(root, splits=("train", "val"), classes=("a", "b"), n=2, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            d = root / s / c if s else root / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


@pytest.mark.parametrize("split,train_tf", [("train", None), ("val", None), ("val", True),
                                            ("train", False)])
@needs_torchvision
def test_image_folder(tmp_path, split, train_tf):
    _png_tree(tmp_path)
    ds = image_folder(tmp_path, split, image_size=24, train_transforms=train_tf)
    assert ds.classes == ["a", "b"] and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 1
    names = [type(t).__name__ for t in ds.transform.transforms]
    is_train = split == "train" if train_tf is None else train_tf
    if is_train:
        assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    else:
        assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
        assert ds.transform.transforms[0].size == int(24 / 0.875)


@needs_torchvision
def test_image_folder_flat_and_errors(tmp_path):
    _png_tree(tmp_path / "flat", splits=(None,), classes=("x", "y", "z"), n=1)
    ds = image_folder(tmp_path / "flat", "val", image_size=16)
    assert ds.classes == ["x", "y", "z"] and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class"):
        image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "c").mkdir(parents=True)
    (tmp_path / "noimg" / "c" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder(tmp_path / "noimg")
    _png_tree(tmp_path / "split", splits=("train",), n=1)
    with pytest.raises(FileNotFoundError, match="'val'"):
        image_folder(tmp_path / "split", "val")


# --------------------------------------------------------------------------- loaders
def _order(loader):
    return torch.cat([b[1] for b in loader]).tolist()


def test_make_loader_determinism():
    ds = torch.utils.data.TensorDataset(torch.randn(50, 3), torch.arange(50))
    a = make_loader(ds, 8, shuffle=True, seed=3)
    b = make_loader(ds, 8, shuffle=True, seed=3)
    c = make_loader(ds, 8, shuffle=True, seed=4)
    oa, ob, oc = _order(a), _order(b), _order(c)
    assert oa == ob and sorted(oa) == list(range(50)) and oa != oc
    assert _order(make_loader(ds, 8, shuffle=False, seed=3)) == list(range(50))
    assert len(list(make_loader(ds, 8, shuffle=False, seed=0, drop_last=True))) == 6
    # epochs differ, and set_epoch reproduces an epoch's order regardless of history
    e1 = _order(a)
    assert e1 != oa
    set_epoch(b, 5)
    e5 = _order(b)
    set_epoch(a, 5)
    assert _order(a) == e5
    with pytest.raises(RuntimeError, match="distributed"):
        make_loader(ds, 8, shuffle=True, seed=0, distributed=True)


def test_make_loader_distributed_sampler(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = torch.utils.data.TensorDataset(torch.arange(20))
        ld = make_loader(ds, 4, shuffle=True, seed=7)
        from torch.utils.data.distributed import DistributedSampler

        assert isinstance(ld.sampler, DistributedSampler) and ld.sampler.seed == 7
        o0 = _order_single(ld)
        set_epoch(ld, 1)
        assert ld.sampler.epoch == 1 and _order_single(ld) != o0
        set_epoch(ld, 0)
        assert _order_single(ld) == o0
        assert not isinstance(make_loader(ds, 4, True, 7, distributed=False).sampler,
                              DistributedSampler)
    finally:
        dist.destroy_process_group()


def _order_single(loader):
    return torch.cat([b[0] for b in loader]).tolist()


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builtin_models(name):
    m = build_model(name).eval()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m3 = build_model(name, num_classes=7, in_channels=3, image_size=32).eval()
    assert m3(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_vgglike_structure():
    m = VGGLike()
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
               and c.bias is not None for c in convs)
    kinds = [type(l).__name__ for l in m.features]
    assert kinds[:7] == ["Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d",
                         "MaxPool2d"]
    assert kinds.count("MaxPool2d") == 3
    assert m.flatten_features == 256 * 3 * 3
    lin = [l for l in m.classifier if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(2304, 1024), (1024, 10)]
    assert any(isinstance(l, nn.Dropout) and l.p == 0.5 for l in m.classifier)
    assert VGGLike(image_size=32).flatten_features == 256 * 4 * 4
    assert VGGLike(image_size=32)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    small = build_model("vgglike-small")
    assert [c.out_channels for c in small.features if isinstance(c, nn.Conv2d)] == \
        [16, 16, 32, 32, 64, 64]
    assert small.classifier[1].out_features == 256 and small.flatten_features == 64 * 9
    assert build_model("VGG7", width=8, fc=32).classifier[1].in_features == 32 * 9
    with pytest.raises(ValueError, match="too small"):
        VGGLike(image_size=7)


def test_smallcnn_size():
    n = sum(p.numel() for p in SmallCNN().parameters())
    assert 10_000 < n < 100_000
    assert SmallCNN()(torch.randn(1, 1, 16, 16)).shape == (1, 10)


@needs_torchvision
def test_torchvision_models():
    m = build_model("resnet18", num_classes=5, in_channels=3).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="3-channel"):
        build_model("resnet18", in_channels=1)
    with pytest.raises(ValueError, match="never downloaded"):
        build_model("resnet18", in_channels=3, weights="DEFAULT")


def test_callable_models():
    assert isinstance(build_model("torch.nn:Identity"), nn.Identity)
    lin = build_model("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(lin, nn.Linear) and lin.out_features == 2
    assert isinstance(build_model("autoqnn.models:SmallCNN", num_classes=4), SmallCNN)
    for bad, msg in [("no_such_module_xyz:f", "cannot import"), ("torch.nn:NoSuchThing", "no attribute"),
                     ("math:pi", "not callable"), ("torch:zeros", "not a torch.nn.Module"),
                     (":x", "form"), ("torch.nn:", "form")]:
        with pytest.raises(ValueError, match=msg):
            build_model(bad, **({"size": (1,)} if bad == "torch:zeros" else {}))


def test_unknown_model():
    with pytest.raises(ValueError) as ei:
        build_model("not-a-model")
    msg = str(ei.value)
    assert all(n in msg for n in MODEL_NAMES) and "module:callable" in msg


def test_load_float_checkpoint(tmp_path):
    src = build_model("smallcnn")
    dst = build_model("smallcnn")
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}},
               tmp_path / "ddp.pt")
    x = torch.randn(2, 1, 28, 28)
    for f in ("sd.pt", "wrapped.pt", "ddp.pt"):
        fresh = build_model("smallcnn")
        assert load_float_checkpoint(fresh, tmp_path / f) is fresh
        torch.testing.assert_close(fresh(x), src(x))
    # strict: missing, unexpected and mis-shaped entries are all reported
    sd = src.state_dict()
    sd.pop("classifier.3.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing keys.*classifier.3.bias.*unexpected keys.*extra.weight"):
        load_float_checkpoint(dst, tmp_path / "bad.pt")
    torch.save(build_model("smallcnn", num_classes=3).state_dict(), tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="shape mismatches.*classifier.3.weight"):
        load_float_checkpoint(dst, tmp_path / "shape.pt")
    # no pickled objects beyond tensors and containers
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_float_checkpoint(dst, tmp_path / "module.pt")
    with pytest.raises(FileNotFoundError):
        load_float_checkpoint(dst, tmp_path / "none.pt")


def test_without_torchvision_the_errors_say_so(tmp_path, monkeypatch):
    """Where torchvision cannot be imported, ImageFolder data and torchvision model names fail
    with a message naming torchvision (not an obscure import error deep inside)."""
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    (tmp_path / "c").mkdir()
    with pytest.raises(ImportError, match="needs torchvision"):
        image_folder(tmp_path, "val", image_size=16)
    # a torchvision build that does not match torch fails at import with another error type
    monkeypatch.setitem(sys.modules, "torchvision", _BrokenModule("torchvision"))
    with pytest.raises(ImportError, match="needs torchvision .RuntimeError: operator torchvision::nms"):
        image_folder(tmp_path, "val", image_size=16)
    with pytest.raises(ValueError, match="torchvision unavailable: RuntimeError"):
        build_model("resnet18", num_classes=5, in_channels=3)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ValueError, match="torchvision unavailable: (ModuleNotFound|Import)Error"):
        build_model("resnet18", num_classes=5, in_channels=3)


class _BrokenModule:
    """Stands for a package whose import fails midway (attribute access raises)."""

    def __init__(self, name):
        self.__name__ = name

    def __getattr__(self, attr):
        raise RuntimeError("operator torchvision::nms does not exist")
