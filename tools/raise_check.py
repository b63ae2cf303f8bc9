# SPDX-License-Identifier: MIT
"""Do errors raised inside the C++/CUDA kernels reach Python as exceptions on this machine?

Each case runs in its own interpreter (a crash must not take the others down) and prints its
exit status; on a GPU machine, the first case that crashes is re-run under cuda-gdb for a native
backtrace. Used by tools/gpu_check.sh (a lent GPU machine once segfaulted on such a raise).

    python tools/raise_check.py
"""
import os
import shutil
import subprocess
import sys

PRE = "import torch, autoqnn, warnings; warnings.simplefilter('ignore'); OPS = torch.ops.autoqnn\n"
CASES = {  # the first case is the one that crashed on torch 2.11 (H200 machine, 2026-11-30)
    "cpu-scheme_params-nan-bits (ValueError)": "OPS.scheme_params(torch.randn(10), torch.tensor([float('nan')]), [6], False)",
    "cpu-tensor_stats-int (TypeError)": "OPS.tensor_stats(torch.arange(5), False)",
    "cpu-torch-own-error (RuntimeError)": "torch.randn(3) @ torch.randn(4)",
    "cuda-scheme_params-nan-bits (ValueError)": "OPS.scheme_params(torch.randn(10, device='cuda'), torch.tensor([float('nan')]), [6], False)",
}


def run(body, env=None):
    code = PRE + f"try:\n    {body}\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:120])\nelse:\n    print('no error')\n"
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                       timeout=120, env=env)
    return r.returncode, (r.stdout.strip().splitlines() or [""])[-1], code


def main():
    import torch

    crashed = None
    for name, body in CASES.items():
        if name.startswith("cuda") and not torch.cuda.is_available():
            continue
        rc, last, code = run(body)
        print(f"{name}: rc={rc} {last}", flush=True)
        if rc != 0 and crashed is None:
            crashed = code
            rc2, last2, _ = run(body, env={**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1"})
            print(f"   with TORCH_SHOW_CPP_STACKTRACES=1: rc={rc2} {last2}", flush=True)
    gdb = shutil.which("cuda-gdb")
    if crashed and gdb:
        print("---- cuda-gdb backtrace of the first crash", flush=True)
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c", crashed],
                           capture_output=True, text=True, timeout=150)
        lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("#") or "signal" in l.lower()]
        print("\n".join(lines[-60:]))


if __name__ == "__main__":
    main()
