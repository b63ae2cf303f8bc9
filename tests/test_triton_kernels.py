# SPDX-License-Identifier: MIT
"""Runs the Triton kernel cases (``tests/triton_cases.py``) in a subprocess.

``TRITON_INTERPRET=1`` only works when set before triton is imported, and other test modules of
the same session import triton (through ``autoqnn``) without it, so the cases run in a fresh
interpreter: on CPU through Triton's interpreter everywhere (so CI always exercises the kernels),
and on CUDA as well when a GPU is visible.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = HERE / "triton_cases.py"
LEVELS_CASES = HERE / "triton_levels_cases.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def _check(cmd, rc: int, out: str) -> None:
    # keep the failure report readable: drop torch's debug trace lines
    out = "\n".join(line for line in out.splitlines() if not line.startswith("DEBUG "))
    assert rc == 0, f"{' '.join(cmd)} failed (rc={rc}):\n{out[-20000:]}"
    assert " passed" in out and " failed" not in out, out[-5000:]


def _run_cases(interpret: bool, cases=(CASES,), shards: int = 1) -> None:
    """pytest on the case files in fresh interpreters; ``shards`` > 1 splits the cases over that
    many processes run side by side (``AUTOQNN_TEST_SHARD``, tests/conftest.py), one thread each."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", *map(str, cases), "-q", "-p", "no:cacheprovider", "-rfE"]
    if shards <= 1:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        _check(cmd, r.returncode, r.stdout + "\n" + r.stderr)
        return
    procs = []
    for i in range(shards):
        env_i = dict(env, AUTOQNN_TEST_SHARD=f"{i}/{shards}", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_i, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=1200)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        _check(cmd + [f"(shard {i}/{shards})"], p.returncode, out)


def _cpu_shards() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def test_triton_kernels_interpreter():
    """Every case on CPU through Triton's interpreter (no GPU needed): the arithmetic kernels
    (``triton_cases.py``) and the levels-table output pass against them bit for bit
    (``triton_levels_cases.py``), split over up to 4 processes, one per core (the interpreter
    runs one Python thread; these cases are about half of CI's time)."""
    _run_cases(interpret=True, cases=(CASES, LEVELS_CASES), shards=_cpu_shards())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_cuda():
    """Every case compiled for and run on the GPU."""
    _run_cases(interpret=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_levels_cuda():
    """The levels-table output pass equals the arithmetic kernels bit for bit, compiled for and
    run on the GPU."""
    _run_cases(interpret=False, cases=(LEVELS_CASES,))


# Compiles the kernels for a real GPU (sm_90) without one: the interpreter checks neither Triton's
# typing rules nor the generated code. Also checks the properties the exact-levels claim rests on:
# IEEE division in float32 and no FMA contraction.
_COMPILE = textwrap.dedent(r"""
    import json, sys
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(json.dumps({"skip": f"triton.compile API: {e}"})); sys.exit(0)
    from autoqnn.triton_kernels import mixture as M
    assert not M.INTERPRET
    res = {}
    def build(fn, sig, consts, tag):
        sig = dict(sig)
        for k in consts:
            sig[k] = "constexpr"
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        except TypeError:
            try:  # triton < 3.3 names them constants
                src = ASTSource(fn=fn, signature=sig, constants=consts)
            except TypeError as e:
                print(json.dumps({"skip": f"ASTSource API: {e}"})); sys.exit(0)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        res[tag] = {"fma": ptx.count("fma."), "div_rn_f32": ptx.count("div.rn.f32"),
                    "div_approx": ptx.count("div.full.f32") + ptx.count("div.approx.f32"),
                    "atom": ptx.count("atom."), "ftz": ptx.count(".ftz")}
    cases = [
        (list(range(8)), [1, 2, 2, 3, 3, 3, 3, 3], "fp32", False),
        ([3, 4, 5, 6, 7], [8, 8, 8, 8, 4], "bf16", False),
        ([3, 4, 5, 6, 7], [2, 2, 2, 2, 2], "fp16", False),
        (list(range(8)), [1, 2, 2, 5, 5, 5, 5, 4], "fp64", True),
        ([6], [3], "fp32", False),
    ]
    for sids, bits, xdt, is64 in cases:
        cd = "fp64" if is64 else "fp32"
        xs = "*" + xdt
        geo = {"N": "i32", "C": "i32", "NBLK": "i32", "K_W": "i32", "tab_ptr": "*i64", "ROFF": "i64"}
        # per tensor (with and without weights), and the batched op's ragged rows
        for with_w, rag in ((True, False), (False, False), (True, True)) if len(sids) == 1 else ((True, False), (True, True)):
            tag = f"{xdt}-{len(sids)}-{with_w}" + ("-ragged" if rag else "")
            kw = M._constexprs(sids, bits, False)
            kw.update(HAS_W=with_w, RAGGED=rag, IS64=is64, BLOCK=1024)
            build(M._mixture_fwd_kernel, {"x_ptr": xs, "p_ptr": "*" + cd, "w_ptr": "*" + cd,
                  "y_ptr": xs, **geo}, kw, f"fwd-{tag}")
            kw = M._constexprs(sids, bits, True)
            kw.update(K=len(sids), HAS_W=with_w, NEED_W=with_w, NEED_B=True, RAGGED=rag, IS64=is64, BLOCK=1024)
            build(M._mixture_bwd_kernel, {"g_ptr": xs, "x_ptr": xs, "p_ptr": "*" + cd, "w_ptr": "*" + cd,
                  "gx_ptr": xs, "part_ptr": "*" + cd, **geo}, kw, f"bwd-{tag}")
    from autoqnn.triton_kernels import stats as S
    for is64, rag in ((False, False), (True, False), (False, True)):
        cd = "*fp64" if is64 else "*fp32"
        t = ("fp64" if is64 else "fp32") + ("-ragged" if rag else "")
        tab = {"tab_ptr": "*i64", "ROFF": "i64"}
        build(S._stats_kernel, {"x_ptr": cd, "part_ptr": "*fp64", "N": "i32", "NBLK": "i32", **tab},
              {"RAGGED": rag, "IS64": is64, "BLOCK": 1024}, f"stats-pass1-{t}")
        build(S._dep_kernel, {"x_ptr": cd, "rp_ptr": cd, "part_ptr": "*fp64", "N": "i32", "NBLK": "i32", **tab},
              {"VAR": True, "TER": True, "QUAT": True, "RES": 3, "RAGGED": rag, "IS64": is64, "BLOCK": 1024},
              f"stats-dep-{t}")
        build(S._p1_finalize_kernel, {"part_ptr": "*fp64", "st_ptr": "*fp64", "rp_ptr": cd,
              "consts_ptr": "*fp64", "NBLK": "i32", **tab}, {"IS64": is64, "RB": 256, "NIT": 3, "RAGGED": rag},
              f"stats-fin1-{t}")
        build(S._dep_finalize_kernel, {"part_ptr": "*fp64", "st_ptr": "*fp64", "rp_ptr": cd, "sig_ptr": cd,
              "sums_ptr": "*fp64", "consts_ptr": "*fp64", "NBLK": "i32", **tab},
              {"Q": 2, "RES": 1, "IS64": is64, "RB": 256, "NIT": 3, "RAGGED": rag}, f"stats-findep-{t}")
        build(S._params_kernel, {"st_ptr": "*fp64", "rp_ptr": cd, "sig_ptr": cd, "p2_ptr": "*fp64",
              "p3_ptr": "*fp64", "sid_ptr": "*i32", "bits_ptr": "*i32", "lam_ptr": "*fp64", "out_ptr": cd,
              "C": "i32", "BSTRIDE": "i32", "RES_TOP": "i32"}, {"K": 8, "IS64": is64}, f"stats-params-{t}")
    from autoqnn.triton_kernels import levels as L
    for sids, bits, xdt in (([0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 2, 3, 3, 3, 3, 3], "fp32"),
                            ([3, 4, 5, 6, 7], [8, 8, 8, 8, 4], "bf16"), ([6], [3], "fp16")):
        K, tag = len(sids), f"levels-{xdt}-{len(sids)}"
        pl = L.plan(sids, bits)
        P = pl["P"]
        build(L._levels_build_kernel, {"p_ptr": "*fp32", "w_ptr": "*fp32", "u_ptr": "*fp32", "t_ptr": "*fp32",
              "v_ptr": "*fp32", "C": "i32"}, {**M._constexprs(sids, bits, True), **pl["consts"], "K": K,
              "HAS_W": K > 1, "NREAL": pl["NREAL"], "P": P, "LOG2P": P.bit_length() - 1}, f"{tag}-build")
        build(L._levels_fwd_kernel, {"x_ptr": "*" + xdt, "t_ptr": "*fp32", "v_ptr": "*fp32", "y_ptr": "*" + xdt,
              "N": "i32", "NBLK": "i32"}, {"K": K, "P": P, "LOG2P": P.bit_length() - 1, "BLOCK": 1024},
              f"{tag}-lookup-fwd")
        cb = {k: v for k, v in M._constexprs(sids, bits, True).items() if not k.startswith("B")}
        build(L._levels_bwd_kernel, {"g_ptr": "*" + xdt, "x_ptr": "*" + xdt, "t_ptr": "*fp32", "v_ptr": "*fp32",
              "p_ptr": "*fp32", "gx_ptr": "*" + xdt, "part_ptr": "*fp32", "N": "i32", "C": "i32", "NBLK": "i32"},
              {**cb, "K": K, "NEED_W": K > 1, "NEED_B": True, "P": P, "LOG2P": P.bit_length() - 1,
               "BLOCK": 1024}, f"{tag}-lookup-bwd")
    print(json.dumps({"ok": res}))
""")


def test_kernels_compile_for_gpu():
    """The kernels (mixture and statistics) compile to sm_90 PTX/cubin (no GPU needed: Triton's
    bundled ptxas)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    for tag, st in res["ok"].items():
        assert st["fma"] == 0, (tag, st)  # enable_fp_fusion=False: products rounded on their own
        assert st["div_approx"] == 0, (tag, st)  # IEEE division only
        assert st["atom"] == 0, (tag, st)  # deterministic partial sums
        assert st["ftz"] == 0, (tag, st)  # subnormals kept (triton < 3.6's div_rn flushed them)
        if "fp64" not in tag and not tag.startswith(("stats-", "levels-")) or tag.endswith("-build"):
            assert st["div_rn_f32"] > 0, (tag, st)


def test_import_without_triton():
    """``import autoqnn`` works when triton cannot be imported; backend='triton' says why."""
    code = textwrap.dedent("""
        import sys, json
        sys.modules["triton"] = None  # makes `import triton` raise ModuleNotFoundError
        import torch, autoqnn, autoqnn.functional as AF
        from autoqnn import backends
        try:
            AF.quantize(torch.randn(10), "clip", 3, backend="triton")
            err = None
        except autoqnn.BackendUnavailableError as e:
            err = str(e)
        y = AF.quantize(torch.randn(10), "clip", 3)
        print(json.dumps({"error": backends.TRITON_ERROR, "ops": sorted(backends.TRITON_OPS),
                          "raised": err}))
    """)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "triton is not installed" in res["error"], res
    assert res["ops"] == [] and res["raised"] and "triton is not installed" in res["raised"], res
