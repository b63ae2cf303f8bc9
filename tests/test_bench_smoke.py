# SPDX-License-Identifier: MIT
"""The benchmark scripts run and print their tables (tiny sizes; no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

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


def test_host_time_table():
    out = _run("bench/bench_host.py", "--calls", "3", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| AF.") or line.startswith("| SchemeMixture")]
    assert len(rows) == 4, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x")
    ops = out.split("One op alone", 1)[1]
    op_rows = [line for line in ops.splitlines() if line.startswith("| ") and "µs" not in line]
    names = [r.strip("|").split("|")[0].strip() for r in op_rows]
    assert len(op_rows) == 5 and any(n.startswith("mixture_backward") for n in names), ops
    assert all(float(r.strip("|").split("|")[1]) > 0 for r in op_rows)


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
