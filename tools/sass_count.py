# SPDX-License-Identifier: MIT
"""Static instruction count of each scheme's per-element math on a GPU, without a GPU.

The mixture kernels are arithmetic-bound on an H200 (bench/results/h200-2026-11-30/NOTES.md), so
the instructions one element costs per candidate are the quantity to lower. This compiles, for
each scheme, a one-element kernel around ``eval_sid`` from csrc/include/autoqnn/scheme_math.h
(the same code the CUDA kernels inline) with the project's CUDA flags (``--fmad=false``), reads
its SASS, and counts the instructions on the path an ordinary element takes: from the entry to
the first EXIT, less the call into the IEEE division's slow path (taken only for extreme
operands), less a plain copy kernel's load/store/indexing. ResQ's bit loop is unrolled by the
compiler, so its static count over-states one element's cost (it is reported, marked).

    python tools/sass_count.py                 # sm_90
    python tools/sass_count.py --arch sm_80 --keep /tmp/sass

Needs nvcc ($CUDA_HOME/bin or PATH) and cuobjdump (the toolkit's, or Triton's bundled copy).
It measures instruction counts only: not latency, not issue rate, not memory.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ["binary", "ternary", "quaternary", "fixed", "residual", "zoom", "clip", "pot"]

SOURCE = r"""
#include "autoqnn/scheme_math.h"
using namespace autoqnn;
#define K(S, ND) \
extern "C" __global__ void k_##S##_##ND(const float* __restrict__ x, float* __restrict__ y, \
    float* __restrict__ d, bool* __restrict__ m, const float* __restrict__ p, int b, float cb) { \
  int i = threadIdx.x; auto r = eval_sid<S, float, ND>(x[i], p, b, cb); \
  y[i] = r.q; m[i] = r.ste; if (ND) d[i] = r.d; }
K(0,0) K(1,0) K(2,0) K(3,0) K(4,0) K(5,0) K(6,0) K(7,0)
K(0,1) K(1,1) K(2,1) K(3,1) K(4,1) K(5,1) K(6,1) K(7,1)
extern "C" __global__ void k_base_0(const float* __restrict__ x, float* __restrict__ y,
    float* __restrict__ d, bool* __restrict__ m, const float* __restrict__ p, int b, float cb) {
  int i = threadIdx.x; y[i] = x[i]; m[i] = true; }
extern "C" __global__ void k_base_1(const float* __restrict__ x, float* __restrict__ y,
    float* __restrict__ d, bool* __restrict__ m, const float* __restrict__ p, int b, float cb) {
  int i = threadIdx.x; y[i] = x[i]; m[i] = true; d[i] = x[i]; }
"""


def _find(tool: str) -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for cand in (Path(home) / "bin" / tool, shutil.which(tool)):
        if cand and Path(cand).is_file():
            return str(cand)
    if tool == "cuobjdump":
        try:
            import triton  # noqa: PLC0415

            p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            if p.is_file():
                return str(p)
        except Exception:  # noqa: BLE001  (no triton: no bundled cuobjdump)
            pass
    return None


def parse_sass(text: str) -> dict[str, list[str]]:
    """Function name -> its instructions (opcode and operands, without predicates' spacing)."""
    funcs: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.append(m.group(1).strip())
    return funcs


def fast_path_length(ins: list[str]) -> int:
    """Instructions from the entry to the first EXIT, less the slow-path call set-up (the MOV of
    the return address and the CALL, executed only when the division's check fails)."""
    n = 0
    calls = 0
    for i in ins:
        op = i.split()[1] if i.startswith("@") else i.split()[0]
        n += 1
        if op.startswith("CALL"):
            calls += 1
        if op == "EXIT" and not i.startswith("@"):
            break
    return n - 2 * calls


def count(arch: str, keep: str | None = None) -> dict[str, tuple[int, int]]:
    nvcc, cuobjdump = _find("nvcc"), _find("cuobjdump")
    if not nvcc or not cuobjdump:
        raise FileNotFoundError(f"needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    import torch  # noqa: PLC0415  (c10 headers for scheme_math.h)

    tinc = Path(torch.__file__).parent / "include"
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="sass_count."))
    work.mkdir(parents=True, exist_ok=True)
    src, cubin = work / "schemes.cu", work / "schemes.cubin"
    src.write_text(SOURCE)
    subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", "--fmad=false", "-std=c++17",
                    f"-I{ROOT / 'csrc' / 'include'}", "-isystem", str(tinc), "-o", str(cubin), str(src)],
                   check=True, capture_output=True, text=True)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    (work / "schemes.sass").write_text(sass)
    funcs = parse_sass(sass)
    base = [fast_path_length(funcs[f"k_base_{d}"]) for d in (0, 1)]
    out = {}
    for s, name in enumerate(SCHEMES):
        out[name] = tuple(fast_path_length(funcs[f"k_{s}_{d}"]) - base[d] for d in (0, 1))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", default=None, help="folder for the .cu, .cubin and .sass (kept)")
    args = ap.parse_args(argv)
    try:
        res = count(args.arch, args.keep)
    except FileNotFoundError as e:
        print(f"sass_count: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"sass_count: {e.cmd[0]} failed:\n{e.stderr}", file=sys.stderr)
        return 1
    print(f"\n### Instructions per element and candidate, {args.arch}, --fmad=false (static, ordinary path)\n")
    print("| scheme | forward | with dq/db |")
    print("|---|---:|---:|")
    for name, (f, d) in res.items():
        mark = " (loop unrolled: over-states)" if name == "residual" else ""
        print(f"| {name}{mark} | {f} | {d} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
