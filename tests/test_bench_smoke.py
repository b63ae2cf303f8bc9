# SPDX-License-Identifier: MIT
"""The benchmark scripts run and print their tables (tiny sizes; no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_report_mixture_and_statistics_tables():
    out = _run("bench/report.py", "--min-log2", "8", "--max-log2", "9", "--no-resnet18", "--rounds", "1",
               "--no-compile", "--stats")
    rows = [line for line in out.splitlines() if line.startswith("| 2^")]
    # mixture table: eager, cpp (when built), fake_quant, copy per size; statistics: eager, op, read
    for size in ("2^8", "2^9"):
        for prov in ("eager", "fake_quant", "copy", "op", "read"):
            assert any(line.startswith(f"| {size} |") and f"| {prov} |" in line for line in rows), (size, prov, out)
    assert "### Statistics" in out and "x |" in out


def test_batched_upper_bound_table():
    out = _run("bench/bench_batched.py", "--models", "vgglike-w16", "--rounds", "1")
    (row,) = [line for line in out.splitlines() if line.startswith("| vgglike-w16 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "7" and int(cells[2]) > 0 and cells[-1].endswith("x")
    assert all(float(c) > 0 for c in cells[3:6])


def test_train_step_table_with_compiled_providers():
    # aot_eager: the compiled path (one graph per model) without Inductor's minutes of codegen
    out = _run("bench/bench_train_step.py", "--providers", "float-compiled,qss-fused,qss-compiled,qpl-compiled",
               "--rounds", "1", "--compile-backend", "aot_eager", "--batch", "4")
    assert "batch [4, 1, 28, 28]" in out
    assert "One provider after the other" in out and "Interleaved (1 rounds" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [r for r in rows if not r.startswith("| step |")]
    names = ["float", "float-compiled", "qss-fused", "qss-compiled", "qpl-compiled"]
    assert [r.split("|")[1].strip() for r in rows] == names * 2, out
    for r in rows:
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        assert float(cells[1]) > 0 and cells[2].endswith("x")
        assert cells[3].endswith("x") or (cells[0] == "float" and cells[3] == ""), r


def test_train_step_channels_last():
    out = _run("bench/bench_train_step.py", "--providers", "qss-fused", "--rounds", "1", "--batch", "4",
               "--channels-last", "--no-interleave")
    assert "batch [4, 1, 28, 28] channels-last" in out
    rows = [line for line in out.splitlines() if line.startswith("| float |") or line.startswith("| qss-fused |")]
    assert len(rows) == 2, out


def test_host_time_table():
    out = _run("bench/bench_host.py", "--calls", "3", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| AF.") or line.startswith("| SchemeMixture")]
    assert len(rows) == 4, out
    import autoqnn.functional as AF

    nprov = 3 if AF._CPP_MIXTURE is not None else 2  # registered, fast-py[, fast (C++ nodes)]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 1 + 2 * nprov - 1, row
        assert all(float(c) > 0 for c in cells[1:1 + nprov]), row
        assert all(c.endswith("x") for c in cells[1 + nprov:]), row
    ops = out.split("One op alone", 1)[1]
    op_rows = [line for line in ops.splitlines() if line.startswith("| ") and "µs" not in line]
    names = [r.strip("|").split("|")[0].strip() for r in op_rows]
    assert len(op_rows) == 5 and any(n.startswith("mixture_backward") for n in names), ops
    assert all(float(r.strip("|").split("|")[1]) > 0 for r in op_rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU meter reads /proc")
def test_memory_table_separates_the_fused_backward_from_the_reference():
    """bench_memory.py (it re-runs itself with glibc's mmap threshold fixed): the C++ mixture
    saves nothing of x's size and the reference saves its per-candidate tensors (a property of
    the implementations, measured with ~0.1x resolution at 4 MB, not a timing)."""
    from autoqnn import _ext

    provs = "eager,cpp" if _ext.HAS_EXT else "eager"
    out = _run("bench/bench_memory.py", "--log2", "20", "--providers", provs)
    if "not measurable" in out:
        pytest.skip(out.strip())
    cells = {}
    for line in out.splitlines():
        if line.startswith("| eager |") or line.startswith("| cpp |"):
            c = [v.strip() for v in line.strip("|").split("|")]
            cells[c[0]] = [float(v.rstrip("x")) for v in c[1:]]
    assert cells["eager"][2] >= 4.0, out  # 8 candidates' masks and levels
    if _ext.HAS_EXT:
        assert cells["cpp"][2] <= 1.0, out  # the target: at most one tensor the size of x


def test_division_table_on_the_interpreter():
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        import pytest

        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "bench/bench_division.py", "--device", "cpu", "--numel", "1500", "--rounds", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| provider")]
    assert [row.split("|")[1].strip() for row in rows] == ["copy", "mul", "div", "rcp"], r.stdout
    assert "bitwise equal on this input: True" in r.stdout  # div and rcp agree on ordinary values


def test_gpu_check_runs_every_step_by_default():
    """tools/gpu_check.sh (the GPU half, run on a lent machine with minutes of device time): every
    step it defines is in its default STEPS (a step missing there is silently skipped, which cost
    the 'division' step its first run), and each appears once."""
    import re

    text = (ROOT / "tools" / "gpu_check.sh").read_text()
    default = re.search(r'^STEPS=\$\{STEPS:-"([^"]*)"\}', text, re.M)
    assert default, "no default STEPS line"
    steps = default.group(1).split()
    defined = re.findall(r"^(?:if ! )?step (\w+) \d+", text, re.M)
    assert "build" in defined and "division" in defined and "host" in defined, defined
    assert sorted(set(defined)) == sorted(steps), (defined, steps)
    assert len(steps) == len(set(steps))


def _sass_count_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sass_count", ROOT / "tools" / "sass_count.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sass_count_parses_the_ordinary_path():
    """tools/sass_count.py's counting on a hand-written SASS listing: entry to the first
    unpredicated EXIT, less the slow-path call set-up (MOV + CALL)."""
    sc = _sass_count_module()
    text = """
        Function : k_x
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00 */
        /*0010*/                   MUFU.RCP R8, R3 ;                      /* 0x00 */
        /*0020*/                   FCHK P0, R0, R3 ;                      /* 0x00 */
        /*0030*/              @!P0 BRA 0x60 ;                             /* 0x00 */
        /*0040*/                   MOV R8, 0x60 ;                         /* 0x00 */
        /*0050*/                   CALL.REL.NOINC 0x90 ;                  /* 0x00 */
        /*0060*/               @P1 EXIT ;                                 /* 0x00 */
        /*0070*/                   STG.E desc[UR6][R6.64], R0 ;           /* 0x00 */
        /*0080*/                   EXIT ;                                 /* 0x00 */
        /*0090*/                   SHF.R.U32.HI R7, RZ, 0x17, R3 ;        /* 0x00 */
        /*00a0*/                   RET.REL.NODEC R8 0x0 ;                 /* 0x00 */
        Function : k_y
        /*0000*/                   EXIT ;                                 /* 0x00 */
    """
    funcs = sc.parse_sass(text)
    assert list(funcs) == ["k_x", "k_y"] and len(funcs["k_x"]) == 11
    assert sc.fast_path_length(funcs["k_x"]) == 9 - 2
    assert sc.fast_path_length(funcs["k_y"]) == 1


def test_sass_count_table():
    """With a CUDA toolkit (no GPU needed): every scheme's count is positive, the fixed-bit
    schemes cost the least, and the dividing schemes more than a division's worth above them."""
    sc = _sass_count_module()
    if not (sc._find("nvcc") and sc._find("cuobjdump")):
        pytest.skip("no nvcc/cuobjdump")
    out = _run("tools/sass_count.py")
    rows = {r.strip("|").split("|")[0].strip().split()[0]: [int(c) for c in r.strip("|").split("|")[1:]]
            for r in out.splitlines() if r.startswith("| ") and "scheme" not in r}
    assert set(rows) == set(sc.SCHEMES), out
    assert all(f > 0 and d >= f for f, d in rows.values())
    assert rows["binary"][0] < rows["ternary"][0] < rows["fixed"][0]
    assert min(rows[s][0] for s in ("quaternary", "fixed", "zoom", "clip", "pot")) >= rows["binary"][0] + 10


def _gpu_check_commands():
    """(step name, argv) of every step of tools/gpu_check.sh, with its shell variables replaced by
    what they hold on a run (``$PY`` → this interpreter) and the leading ``env``/``VAR=`` dropped."""
    import re
    import shlex

    text = (ROOT / "tools" / "gpu_check.sh").read_text().replace("\\\n", " ")
    subs = {"$PY": sys.executable, '"$(nproc)"': "2", "${REPORT_MIN_LOG2:-12}": "12", "${REPORT_MIN_LOG2}": "12"}
    out = []
    for m in re.finditer(r"^\s*(?:if ! )?step (\w+) \d+ (.*?)(?:; then)?$", text, re.M):
        cmd = m.group(2)
        for k, v in subs.items():
            cmd = cmd.replace(k, v)
        assert "$" not in cmd, f"step {m.group(1)}: a shell variable the test does not know: {cmd}"
        argv = shlex.split(cmd)
        if argv[0] == "env":
            argv = argv[1:]
            while argv and (argv[0] == "-u" or "=" in argv[0] or argv[0].isupper()):
                argv = argv[2:] if argv[0] == "-u" else argv[1:]
        out.append((m.group(1), argv))
    return out


_PARSE_ONLY = """
import argparse, runpy, sys
_parse = argparse.ArgumentParser.parse_args
def _only(self, args=None, namespace=None):
    ns = _parse(self, args, namespace)
    known = sys._getframe(1).f_globals.get("PROVIDERS")  # the script's fixed provider list, if any
    if known is not None and isinstance(getattr(ns, "providers", None), str):
        bad = sorted(set(p.strip() for p in ns.providers.split(",")) - set(known) - {""})
        if bad:
            print("UNKNOWN PROVIDERS", bad)
            raise SystemExit(3)
    print("ARGS-PARSED")
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = _only
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.path.insert(0, __import__("os").path.dirname(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_commands_parse():
    """Every command of tools/gpu_check.sh is well-formed where that can be checked without a GPU
    (a lent GPU machine has minutes; a mistyped flag or test id wastes its step): each script's
    arguments parse with the script's own parser (and name known providers, where the script has a
    fixed list), each Python file named exists, and the pytest
    steps collect their test ids."""
    import os

    cmds = _gpu_check_commands()
    names = [n for n, _ in cmds]
    assert "tests" in names and "report" in names and "compiled_step" in names, names
    checked = 0
    for name, argv in cmds:
        assert argv[0] == sys.executable, (name, argv)
        args = argv[1:]
        if args[:2] == ["-m", "pip"]:
            continue
        if args[:2] == ["-m", "pytest"]:
            ids = [a for a in args[2:] if a.startswith("tests/")]
            assert ids, (name, args)
            # TRITON_INTERPRET: the Triton case files skip themselves at import without it or a GPU
            env = dict(os.environ, TRITON_INTERPRET="1")
            r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                               cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
            assert r.returncode == 0 and " collected" in r.stdout, (name, r.stdout[-3000:] + r.stderr[-2000:])
            assert "not found" not in r.stdout + r.stderr and "ERROR" not in r.stdout, (name, r.stdout[-3000:])
            checked += 1
            continue
        if args[0] != "-m":
            assert (ROOT / args[0]).is_file(), (name, args[0])
            if "argparse" not in (ROOT / args[0]).read_text():
                assert len(args) == 1, (name, args)  # takes no arguments
                continue
        r = subprocess.run([sys.executable, "-c", _PARSE_ONLY, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "ARGS-PARSED" in r.stdout, (name, args, r.stdout[-2000:] + r.stderr[-3000:])
        checked += 1
    assert checked >= 15, checked


def test_compile_time_table():
    # aot_eager: Dynamo + AOTAutograd in fresh processes, without Inductor's code generation
    out = _run("bench/compile_time.py", "--models", "smallcnn", "--backend", "aot_eager", "--steps", "1",
               "--batch", "2")
    rows = [line for line in out.splitlines() if line.startswith("| smallcnn |")]
    assert [r.split("|")[2].strip() for r in rows] == ["float", "qss", "qss-traced-noise"], out
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0
        assert cells[3].endswith("x")
