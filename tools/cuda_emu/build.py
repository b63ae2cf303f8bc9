# SPDX-License-Identifier: MIT
"""Build the CUDA kernels of csrc/cuda as a CPU extension under tools/cuda_emu/shim.h (a block's
threads are user-level contexts switching at __syncthreads, one block at a time). It checks the
kernels' logic (indexing, masking, barriers, sums) on a machine without a GPU; it says nothing
about speed or device-only intrinsics.

    python tools/cuda_emu/build.py new WORK        # the working tree's csrc/cuda
    python tools/cuda_emu/build.py old <git-rev>   # the same files at a revision
    python tools/cuda_emu/compare.py               # new vs old, and vs the C++ CPU ops

``--asan`` (after the revision) builds with AddressSanitizer; compare.py must then run with the
runtime preloaded (before libstdc++, whose exceptions it intercepts), as printed:
``LD_PRELOAD="<libasan.so> <libstdc++.so>" ASAN_OPTIONS=detect_leaks=0 python tools/cuda_emu/compare.py``.

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
                  "unsigned char* bwd_smem = g_dyn_smem.get();")
    # static shared arrays: filled with 0xFF by the first thread of each block to reach them
    s = re.sub(r"(__shared__\s+[\w:<>]+\s+(\w+)\[[^\]]+\];)", r"\1 emu_shared_poison(\2, sizeof(\2));", s)
    assert "extern __shared__" not in s, "a dynamic shared array build.py does not know"
    s = re.sub(r"([\w:]+(?:<[^;(){}]*?>)?)<<<(.*?)>>>\(", lambda m: f"EmuLaunch({m.group(2)})({m.group(1)}, ", s,
               flags=re.S)
    i = s.index("TORCH_LIBRARY_IMPL(autoqnn, CUDA, m)")
    j = s.index("}\n", i)
    return '#include "shim.h"\n' + s[:i] + s[j + 2:] + f'\n#include "wrap_{tag}.h"\n'


def main(argv=None) -> None:
    from torch.utils.cpp_extension import load

    argv = list(argv or sys.argv[1:])
    asan = "--asan" in argv
    if asan:
        argv.remove("--asan")
        preload = asan_preload()
        if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # load() imports the module it built
            os.execvpe(sys.executable, [sys.executable, __file__, *argv, "--asan"],
                       dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0"))
    tag, rev = argv[:2]
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
         extra_cflags=["-O1", "-ffp-contract=off"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []),
         extra_ldflags=["-fsanitize=address"] if asan else [], build_directory=out, verbose=False)
    print(f"built {out}/emu_{tag}.so" + (" with AddressSanitizer" if asan else ""))
    if asan:
        print(f'run compare.py as: LD_PRELOAD="{asan_preload()}" ASAN_OPTIONS=detect_leaks=0 '
              "python tools/cuda_emu/compare.py")


def asan_preload() -> str:
    libs = [subprocess.check_output(["c++", f"-print-file-name={n}"], text=True).strip()
            for n in ("libasan.so", "libstdc++.so")]
    return " ".join(libs)


if __name__ == "__main__":
    main()
