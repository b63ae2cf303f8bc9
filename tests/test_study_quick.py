# SPDX-License-Identifier: MIT
"""The Fashion-MNIST study script (issue #7) in its --quick CI mode: every row runs end to end
and the results table is written."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_study_quick_runs_every_row(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "study_fmnist.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    md = (tmp_path / "study_fmnist_quick.md").read_text()
    recs = [json.loads(line) for line in (tmp_path / "study_fmnist_quick.jsonl").read_text().splitlines()]
    rows = {rec["row"] for rec in recs}
    for name in ("float", "B-1/3", "T-2/3", "Q-2/3", "F-3/3", "Z-3/3", "P-3/3", "R-3/3", "C-3/3",
                 "QSS-F (layer-wise)", "QSS-C (model-wise)", "QPL C 3/3", "QPL C 2/2", "QPL C 2/2 (soft)",
                 "QSS-F picks, fine-tuned from float", "C-2/2 (uniform)", "QSS→QPL 2/2 (full)"):
        assert name in rows, name
        assert f"| {name} |" in md, name
    by = {rec["row"]: rec for rec in recs}
    # the budget guarantee holds in the QPL rows, the uniform rows have their fixed bits
    assert by["QPL C 2/2"]["weight_bits"] <= 2.0 and by["QPL C 2/2"]["act_bits"] <= 2.0
    assert by["QSS→QPL 2/2 (full)"]["weight_bits"] <= 2.0
    assert by["B-1/3"]["weight_bits"] == 1.0 and by["C-3/3"]["act_bits"] == 3.0
    # layer-wise QSS reports a scheme for every quantized layer; the classifier stays float
    layers = {p[0] for p in by["QSS-F (layer-wise)"]["plan"]}
    assert "features.0" in layers and "classifier.4" not in layers
    # the "picks" row re-trains exactly the schemes QSS-F chose
    picks = {(p[0], p[1]): p[2] for p in by["QSS-F picks, fine-tuned from float"]["plan"]}
    assert picks == {(p[0], p[1]): p[2] for p in by["QSS-F (layer-wise)"]["plan"]}
    assert "## The paper's claims" in md and "(c) Schemes QSS-F picked" in md


def test_study_jobs_run_seeds_in_parallel_and_merge(tmp_path):
    """--jobs 2: one process per seed (1 thread each on this 2-core machine), merged into one
    table; --merge of the same dirs again gives the same records; a duplicate is refused."""
    cmd = [sys.executable, str(ROOT / "bench" / "study_fmnist.py"), "--quick", "--seeds", "0", "1", "--jobs", "2",
           "--rows", "Z-3/3", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "study_fmnist_quick.jsonl").read_text().splitlines()]
    assert sorted((rec["row"], rec["seed"]) for rec in recs) == [("Z-3/3", 0), ("Z-3/3", 1), ("float", 0), ("float", 1)]
    md = (tmp_path / "study_fmnist_quick.md").read_text()
    assert "| Z-3/3 |" in md and "| 2 |" in md and "2 processes in parallel" in md
    assert (tmp_path / "study_fmnist_quick_float_seed1.pt").exists()
    jobs = sorted(str(p) for p in tmp_path.glob("job-seeds-*"))
    assert len(jobs) == 2
    out2 = tmp_path / "again"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "study_fmnist.py"), "--quick", "--rows", "Z-3/3",
                        "--merge", *jobs, "--out", str(out2)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = [json.loads(line) for line in (out2 / "study_fmnist_quick.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, recs))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "study_fmnist.py"), "--quick", "--merge", jobs[0],
                        jobs[0], "--out", str(tmp_path / "dup")], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "appears twice" in r.stderr
