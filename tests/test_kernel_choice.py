# SPDX-License-Identifier: MIT
"""backend="auto" on GPUs: the kernel choice table, the router and ``autoqnn tune-kernels``.

The router's real GPU path needs a GPU (tests/test_ops.py runs every op through it on CUDA);
here the table logic, the routing decision and the registration are checked on CPU, with the
providers replaced by recorders where a GPU kernel would run. The same routing with the real
C++ and Triton kernels on CPU tensors runs in tests/triton_cases.py (Triton's interpreter).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import autoqnn
from autoqnn import _ext, backends
from autoqnn import kernel_choice as kc
from autoqnn.ops import _schema


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    p = tmp_path / "choice.json"
    monkeypatch.setenv(kc.ENV_PATH, str(p))
    kc.reset()
    yield p
    kc.reset()


def _entry(ops):
    return {"torch": torch.__version__, "triton": None, "autoqnn": autoqnn.__version__, "dtype": "float32", "ops": ops}


def test_default_path_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(kc.ENV_PATH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kc.default_path() == tmp_path / "autoqnn" / "kernel_choice.json"
    monkeypatch.setenv(kc.ENV_PATH, str(tmp_path / "x.json"))
    assert kc.default_path() == tmp_path / "x.json"


def test_entries_bucket_at_geometric_midpoints():
    pts = [(1024, "cuda"), (4096, "cuda"), (16384, "triton"), (65536, "triton"), (262144, "cuda")]
    assert kc._entries(pts) == [
        {"max_numel": 8192, "provider": "cuda"},
        {"max_numel": 131072, "provider": "triton"},
        {"max_numel": None, "provider": "cuda"},
    ]
    assert kc._entries([(10, "triton")]) == [{"max_numel": None, "provider": "triton"}]


def test_lookup_by_size():
    e = _entry({"mixture": [{"max_numel": 100, "provider": "triton"}, {"max_numel": None, "provider": "cuda"}]})
    assert kc.lookup(e, "mixture", 1) == "triton"
    assert kc.lookup(e, "mixture", 100) == "triton"
    assert kc.lookup(e, "mixture", 101) == "cuda"
    assert kc.lookup(e, "quantize", 5) is None  # op not listed
    assert kc.lookup(None, "mixture", 5) is None
    bounded = _entry({"mixture": [{"max_numel": 100, "provider": "triton"}]})
    assert kc.lookup(bounded, "mixture", 1000) is None  # beyond the measured range: default


def test_save_merges_devices_atomically(table_path):
    assert kc.load_table()["devices"] == {}  # no file yet
    kc.save_table("GPU A", _entry({"mixture": [{"max_numel": None, "provider": "triton"}]}))
    kc.save_table("GPU B", _entry({"quantize": [{"max_numel": None, "provider": "cuda"}]}))
    data = json.loads(table_path.read_text())
    assert set(data["devices"]) == {"GPU A", "GPU B"} and data["format"] == kc.FORMAT
    assert [p.name for p in table_path.parent.iterdir()] == [table_path.name]  # no temp file left
    kc.save_table("GPU A", _entry({"mixture": [{"max_numel": None, "provider": "cuda"}]}))
    assert kc.load_table()["devices"]["GPU A"]["ops"]["mixture"][0]["provider"] == "cuda"


@pytest.mark.parametrize(
    "bad, match",
    [
        ("not json", "cannot be read"),
        (json.dumps({"format": 99, "devices": {}}), "format"),
        (json.dumps({"format": 1, "devices": []}), "devices"),
        (json.dumps({"format": 1, "devices": {"G": {"ops": {"bogus": [{"max_numel": None, "provider": "cuda"}]}}}}),
         "unknown op 'bogus'"),
        (json.dumps({"format": 1, "devices": {"G": {"ops": {"mixture": [{"max_numel": None, "provider": "cpu"}]}}}}),
         "provider must be one of"),
        (json.dumps({"format": 1, "devices": {"G": {"ops": {"mixture": [
            {"max_numel": 10, "provider": "cuda"}, {"max_numel": 5, "provider": "triton"}]}}}}), "increasing"),
        (json.dumps({"format": 1, "devices": {"G": {"ops": {"mixture": [
            {"max_numel": None, "provider": "cuda"}, {"max_numel": 5, "provider": "triton"}]}}}}), "only the last"),
        (json.dumps({"format": 1, "devices": {"G": {"ops": {"mixture": []}}}}), "non-empty"),
    ],
)
def test_malformed_table_is_a_clear_error_and_never_breaks_a_run(table_path, bad, match, monkeypatch):
    table_path.write_text(bad)
    with pytest.raises(ValueError, match=match):
        kc.load_table()
    # choose(): one warning, then the default provider
    monkeypatch.setattr(kc, "providers", lambda op, dt="cuda": ["cuda", "triton"])
    monkeypatch.setattr(kc, "device_key", lambda d: "G")
    with pytest.warns(RuntimeWarning, match="default kernels"):
        assert kc.choose("mixture", torch.zeros(3)) == "cuda"
    # saving over a broken file replaces it
    with pytest.warns(RuntimeWarning, match="replacing"):
        kc.save_table("G", _entry({"mixture": [{"max_numel": None, "provider": "triton"}]}))
    assert kc.choose("mixture", torch.zeros(3)) == "triton"


def test_choose_follows_table_and_availability(table_path, monkeypatch):
    avail = {"v": ["cuda", "triton"]}
    monkeypatch.setattr(kc, "providers", lambda op, dt="cuda": list(avail["v"]))
    monkeypatch.setattr(kc, "device_key", lambda d: "Fake GPU")
    x_small, x_big = torch.zeros(64), torch.zeros(4096)
    assert kc.choose("mixture", x_small) == "cuda"  # no table: compiled kernel first
    kc.save_table("Fake GPU", _entry({
        "mixture": [{"max_numel": 1000, "provider": "triton"}, {"max_numel": None, "provider": "cuda"}],
        "mixture_backward": [{"max_numel": None, "provider": "triton"}],
    }))
    assert kc.choose("mixture", x_small) == "triton"
    assert kc.choose("mixture", x_big) == "cuda"
    assert kc.choose("mixture_backward", x_big) == "triton"  # forward and backward chosen apart
    assert kc.choose("quantize", x_small) == "cuda"  # op not in the table
    avail["v"] = ["cuda"]  # the table names a provider this build lacks: fall back
    assert kc.choose("mixture", x_small) == "cuda"
    avail["v"] = []
    with pytest.raises(autoqnn.BackendUnavailableError, match="no GPU kernel for autoqnn::mixture"):
        kc.choose("mixture", x_small)
    monkeypatch.setattr(kc, "device_key", lambda d: "Other GPU")  # a GPU the table does not list
    avail["v"] = ["cuda", "triton"]
    assert kc.choose("mixture", x_small) == "cuda"


def test_router_sizes_by_x_and_calls_the_chosen_kernel(table_path, monkeypatch):
    calls = []

    def fake_impl(provider, op):
        return lambda *args: calls.append((provider, op, args[1 if op.endswith("_backward") else 0].numel())) or provider

    monkeypatch.setattr(kc, "_impl", fake_impl)
    monkeypatch.setattr(kc, "providers", lambda op, dt="cuda": ["cuda", "triton"])
    monkeypatch.setattr(kc, "device_key", lambda d: "Fake GPU")
    kc.save_table("Fake GPU", _entry({
        "mixture": [{"max_numel": 100, "provider": "triton"}, {"max_numel": None, "provider": "cuda"}],
        "mixture_backward": [{"max_numel": 100, "provider": "triton"}, {"max_numel": None, "provider": "cuda"}],
    }))
    small, big = torch.zeros(10), torch.zeros(1000)
    assert kc._router("mixture")(small, None, None, None, [0], False) == "triton"
    assert kc._router("mixture")(big, None, None, None, [0], False) == "cuda"
    # backward ops are sized by x (their 2nd argument), not by grad_y
    assert kc._router("mixture_backward")(big, small, None, None, None, [0], False, True, True) == "triton"
    assert calls == [("triton", "mixture", 10), ("cuda", "mixture", 1000), ("triton", "mixture_backward", 10)]


def test_router_registration_matches_the_available_gpu_kernels():
    for op in kc.ROUTED_OPS:
        gpu = kc.providers(op, "cuda")
        assert ("cuda" in gpu) == bool(_ext.HAS_CUDA_KERNELS)
        # the main op has a CUDA kernel exactly when some GPU implementation exists: the router
        assert _schema.has_kernel(op, "CUDA") == bool(gpu)
        assert (op in kc.ROUTER_INSTALLED) == bool(gpu)
        # the C++ CUDA kernels live under <op>_cuda only (never under the main name)
        assert _schema.has_kernel(f"{op}_cuda", "CUDA") == bool(_ext.HAS_CUDA_KERNELS)
    assert kc.install_router() == kc.ROUTER_INSTALLED  # idempotent
    assert backends.kernel_for("mixture", "cuda") in ("cuda", "triton", "reference")


def test_explicit_cuda_backend_messages():
    x = torch.randn(8)
    with pytest.raises(autoqnn.BackendUnavailableError, match="needs a CUDA tensor"):
        autoqnn.quantize_mixture(x, torch.full((8,), 0.125), autoqnn.WEIGHT_CANDIDATES, 3, backend="cuda")


def test_cuda_twins_have_the_main_schemas_and_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op in kc.ROUTED_OPS:
        a = getattr(torch.ops.autoqnn, op).default._schema
        b = getattr(torch.ops.autoqnn, f"{op}_cuda").default._schema
        assert [x.type for x in a.arguments] == [x.type for x in b.arguments]
        assert [x.type for x in a.returns] == [x.type for x in b.returns]
    with FakeTensorMode():
        x = torch.empty(5, 7)
        p = torch.empty(8, 1, autoqnn.schemes.NUM_PARAMS)
        y = torch.ops.autoqnn.mixture_cuda(x, p, torch.empty(8), torch.empty(8), list(range(8)), False)
        assert y.shape == x.shape


def test_triton_twins_have_the_main_schemas():
    """The twins' schemas are written from the main ops' schema strings (triton_op infers them
    from annotations in some torch releases): same arguments and returns, ints as SymInt."""
    from autoqnn.ops import _triton

    if not _triton.ensure_registered():  # deferred on CPU-only machines without the interpreter
        pytest.skip(f"Triton twins not registered: {_triton.IMPORT_ERROR}")

    norm = lambda t: str(t).replace("SymInt", "int")  # noqa: E731
    for op in _triton.TWIN_OPS:
        a = getattr(torch.ops.autoqnn, op).default._schema
        b = getattr(torch.ops.autoqnn, f"{op}_triton").default._schema
        assert [(x.name, norm(x.type)) for x in a.arguments] == [(x.name, norm(x.type)) for x in b.arguments]
        assert [norm(x.type) for x in a.returns] == [norm(x.type) for x in b.returns]
    with pytest.raises(ValueError, match="does not take the arguments"):
        _triton.with_schema_signature(lambda x, y: x, "(Tensor x, bool per_channel) -> Tensor")
    with pytest.raises(ValueError, match="cannot parse"):
        _triton.with_schema_signature(lambda x: x, "Tensor x -> Tensor")


def test_tune_on_cpu_measures_and_does_not_write(table_path):
    res = kc.tune("cpu", sizes=[64, 256], rounds=1, warmup=0, ops=("mixture", "quantize_backward"))
    expect = ["cpp"] if _ext.HAS_EXT else []
    if not expect:
        assert res["ops"] == {}
        return
    assert [(m["op"], m["numel"]) for m in res["measurements"]] == [
        ("mixture", 64), ("mixture", 256), ("quantize_backward", 64), ("quantize_backward", 256)]
    assert all(m["us"]["cpp"] > 0 and m["provider"] == "cpp" for m in res["measurements"])
    assert res["ops"]["mixture"] == [{"max_numel": None, "provider": "cpp"}]
    assert not table_path.exists()  # CPU tables are never written
    md = kc.format_markdown(res)
    assert "| mixture | 256 |" in md and "cpp µs" in md
    with pytest.raises(ValueError, match="not routed"):
        kc.tune("cpu", sizes=[8], ops=("tensor_stats",), write=False)
    with pytest.raises(ValueError, match="positive"):
        kc.tune("cpu", sizes=[0], write=False)


def test_cli_tune_kernels(tmp_path):
    env = dict(os.environ, AUTOQNN_KERNEL_CHOICE=str(tmp_path / "c.json"))
    env.pop("TRITON_INTERPRET", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "autoqnn", "tune-kernels", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    if not torch.cuda.is_available():
        r = run()
        assert r.returncode == 2 and "no CUDA GPU here" in r.stderr
    r = run("--device", "cpu", "--min-log2", "6", "--max-log2", "8", "--rounds", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| mixture_backward | 256 |" in r.stdout and "not written" in r.stdout
    assert not (tmp_path / "c.json").exists()
    r = run("--device", "cpu", "--min-log2", "9", "--max-log2", "3")
    assert r.returncode == 2 and "--min-log2/--max-log2" in r.stderr


def test_fast_path_takes_the_router_choice_once_per_call(table_path, monkeypatch):
    """functional._node_mode: on GPUs under backend="auto" the eager fast path calls the kernel
    the router would pick, directly, when the forward and backward op agree; otherwise (they
    differ, the router is not installed, CPU, an explicit backend) it keeps the given mode."""
    import types

    import autoqnn.functional as AF

    monkeypatch.setattr(kc, "providers", lambda op, dt="cuda": ["cuda", "triton"])
    monkeypatch.setattr(kc, "device_key", lambda d: "Fake GPU")
    monkeypatch.setattr(kc, "ROUTER_INSTALLED", list(kc.ROUTED_OPS))
    kc.save_table("Fake GPU", _entry({
        "mixture": [{"max_numel": 100, "provider": "triton"}, {"max_numel": None, "provider": "cuda"}],
        "mixture_backward": [{"max_numel": None, "provider": "cuda"}],
        "quantize": [{"max_numel": None, "provider": "triton"}],
        "quantize_backward": [{"max_numel": None, "provider": "triton"}],
    }))

    def gpu(n):
        return types.SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: n)

    assert AF._node_mode("ops", gpu(1000), "m") == "cuda"  # both cuda
    assert AF._node_mode("ops", gpu(10), "m") == "ops"  # triton forward, cuda backward: the router
    assert AF._node_mode("ops", gpu(10), "q") == "triton"
    assert AF._node_mode("cuda", gpu(10), "q") == "cuda"  # an explicit backend is kept
    assert AF._node_mode("ops", torch.zeros(10), "q") == "ops"  # CPU: the dispatcher's C++ kernel
    monkeypatch.setattr(kc, "ROUTER_INSTALLED", ["mixture"])
    assert AF._node_mode("ops", gpu(1000), "m") == "ops"  # backward not routed
