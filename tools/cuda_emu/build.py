# SPDX-License-Identifier: MIT
"""Build the CUDA kernels of csrc/cuda as a CPU extension under tools/cuda_emu/shim.h (a block's
threads are user-level contexts switching at __syncthreads, one block at a time). It checks the
kernels' logic (indexing, masking, barriers, sums) on a machine without a GPU; it says nothing
about speed or device-only intrinsics.

    python tools/cuda_emu/build.py new WORK        # the working tree's csrc/cuda
    python tools/cuda_emu/build.py old <git-rev>   # the same files at a revision
    python tools/cuda_emu/compare.py               # new vs old, and vs the C++ CPU ops

The modules land in build/cuda_emu/<tag>/emu_<tag>.so (about a minute to compile each).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def emulated_source(text: str, tag: str) -> str:
    """A .cu file's text made compilable as C++ under the shim."""
    s = re.sub(r"#include <c10/cuda/[^>]*>", "", text)
    s = s.replace("TORCH_INTERNAL_ASSERT(x.is_cuda());", "")
    s = s.replace("extern __shared__ __align__(16) unsigned char bwd_smem[];",
                  "alignas(16) static unsigned char bwd_smem[1 << 16];")
    s = re.sub(r"([\w:]+(?:<[^;(){}]*?>)?)<<<(.*?)>>>\(", lambda m: f"EmuLaunch({m.group(2)})({m.group(1)}, ", s,
               flags=re.S)
    i = s.index("TORCH_LIBRARY_IMPL(autoqnn, CUDA, m)")
    j = s.index("}\n", i)
    return '#include "shim.h"\n' + s[:i] + s[j + 2:] + f'\n#include "wrap_{tag}.h"\n'


def main(argv=None) -> None:
    from torch.utils.cpp_extension import load

    tag, rev = (argv or sys.argv[1:])[:2]
    out = os.path.join(ROOT, "build", "cuda_emu", tag)
    os.makedirs(out, exist_ok=True)
    for name, t in (("quantize", "q"), ("tensor_stats", "s")):
        if rev == "WORK":
            with open(os.path.join(ROOT, "csrc", "cuda", f"{name}.cu")) as f:
                text = f.read()
        else:
            text = subprocess.check_output(["git", "-C", ROOT, "show", f"{rev}:csrc/cuda/{name}.cu"], text=True)
        with open(os.path.join(out, f"emu_{t}.cpp"), "w") as f:
            f.write(emulated_source(text, t))
    load(name=f"emu_{tag}", sources=[os.path.join(out, "emu_q.cpp"), os.path.join(out, "emu_s.cpp"),
                                     os.path.join(HERE, "bind.cpp")],
         extra_include_paths=[HERE, os.path.join(ROOT, "csrc", "include")],
         extra_cflags=["-O1", "-ffp-contract=off"], build_directory=out, verbose=False)
    print(f"built {out}/emu_{tag}.so")


if __name__ == "__main__":
    main()
