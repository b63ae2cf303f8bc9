# SPDX-License-Identifier: MIT
"""Faults and scale: SIGKILL mid-epoch + resume="auto" reaches the same decisions as an
uninterrupted run; two processes under torchrun (gloo, CPU) end with identical schemes and bits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = str(Path(__file__).with_name("search_child.py"))


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    ref = _run([CHILD, "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "a.json")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    # 384 samples / 32 = 12 steps per epoch; search epochs are global steps 1..24, QPL 25..48
    for kill_at in (17, 31):  # mid-epoch in QSS (epoch 2) and in QPL (epoch 1)
        d = tmp_path / f"k{kill_at}"
        killed = _run([CHILD, "--ckpt", str(d), "--out", str(d) + ".json", "--kill-at", str(kill_at)])
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not Path(str(d) + ".json").exists()
        assert list(d.glob("ckpt-*.pt")), "a checkpoint was written before the kill"
        resumed = _run([CHILD, "--ckpt", str(d), "--out", str(d) + ".json", "--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        a = json.loads((tmp_path / "a.json").read_text())
        b = json.loads(Path(str(d) + ".json").read_text())
        assert a["plan"] == b["plan"]
        for name, pa in a["probs"].items():
            assert pa == pytest.approx(b["probs"][name], abs=1e-4), name
        for ra, rb in zip(a["logits"], b["logits"]):
            assert ra == pytest.approx(rb, abs=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_process_ddp_gloo_ranks_agree(tmp_path, compiled):
    """Also with SearchConfig(compile=...): the DDP-wrapped step under torch.compile (aot_eager),
    activation statistics all-reduced inside the compiled forward."""
    port = 29500 + (os.getpid() % 2000) + (2000 if compiled else 0)
    out = tmp_path / "ddp.json"
    r = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), CHILD,
              "--ckpt", str(tmp_path / "ck"), "--out", str(out), *(["--compile", "aot_eager"] if compiled else [])])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    a = json.loads(out.read_text())
    b = json.loads(Path(str(out) + ".rank1").read_text())
    assert a["plan"] == b["plan"]
    for ra, rb in zip(a["logits"], b["logits"]):
        assert ra == pytest.approx(rb, abs=1e-5)
    assert a["acc"] == b["acc"]
    assert (tmp_path / "ck" / "result.json").is_file()
