# SPDX-License-Identifier: MIT
"""Build of autoqnn: this file decides *what* to build and *where* the module goes;
CMakeLists.txt knows *how* (vLLM-style driver, see /work/shared conventions C4).

    pip install -e . --no-build-isolation     # compile against the torch already installed

Environment variables (all optional):

  AUTOQNN_BUILD_EXT=0     no extension at all: a pure-Python install (every op runs its reference)
  AUTOQNN_CUDA=auto|1|0   CUDA kernels (csrc/cuda/*.cu). auto (default): when torch is a CUDA build
                          and a CUDA toolkit is found whose major version matches torch's; 1: the
                          same, but fail loudly instead of building CPU-only; 0: CPU kernels only.
                          A visible GPU is never needed to compile.
  CUDA_HOME               the toolkit (must contain bin/nvcc); default /usr/local/cuda
  TORCH_CUDA_ARCH_LIST    CUDA archs, default "8.0;9.0" (sm_80, sm_90); ';', ',' or ' ' separate;
                          "9.0+PTX" adds PTX for forward compatibility; "native" = this box's GPUs
  MAX_JOBS                parallel compile jobs (default: number of CPUs)
  DEBUG=1                 -O0 -g (CMAKE_BUILD_TYPE=Debug); default Release (-O3)
  CMAKE_ARGS              extra arguments for the CMake configure step

The CMake build tree is build/cmake-<variant>-<type>/ (kept between builds: incremental rebuilds;
delete build/ to start over). The build writes autoqnn/_build_info.py next to the module: the
exact torch it was compiled against, read by autoqnn/_ext.py before loading autoqnn._C.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUILD_INFO = "_build_info.py"
DEFAULT_ARCHS = "8.0;9.0"


def _env_flag(name: str, default: str) -> str:
    return (os.environ.get(name) or default).strip().lower()


BUILD_EXT = _env_flag("AUTOQNN_BUILD_EXT", "1") not in ("0", "false", "off", "no")


class CMakeExtension(Extension):
    """An extension whose sources CMake finds by itself (csrc/)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


# --------------------------------------------------------------------------- build configuration
def _torch():
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CUDA_HOME guess noise
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        sys.exit(
            f"autoqnn: building _C needs torch importable at build time ({e}). Install torch, then "
            "build against it with `pip install -e . --no-build-isolation`, or set "
            "AUTOQNN_BUILD_EXT=0 for a pure-Python install."
        )
    return torch, cpp_extension


def _cuda_home() -> tuple[str | None, str]:
    """The toolkit root ($CUDA_HOME if set, else /usr/local/cuda) or None and why not."""
    root = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    src = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "default"
    if os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return root, ""
    return None, f"no CUDA toolkit: {root} ({src}) has no bin/nvcc"


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    if not m:
        raise RuntimeError(f"autoqnn: cannot parse `{nvcc} --version`:\n{out}")
    return m.group(1)


def _parse_archs(spec: str) -> tuple[list[str], list[str]]:
    """TORCH_CUDA_ARCH_LIST -> (CMAKE_CUDA_ARCHITECTURES entries, labels): "8.0" -> "80-real"
    (SASS only, like torch), "9.0+PTX" -> "90" (SASS + PTX), "9.0a" -> "90a-real"."""
    cmake, labels = [], []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        if tok.lower() == "native":
            return ["native"], ["native"]
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", tok, flags=re.IGNORECASE)
        if not m:
            sys.exit(f"autoqnn: TORCH_CUDA_ARCH_LIST entry {tok!r} not understood "
                     "(expected e.g. '8.0;9.0' or '8.0 9.0+PTX')")
        num = m.group(1) + m.group(2) + m.group(3).lower()
        cmake.append(num if m.group(4) else f"{num}-real")
        labels.append(f"sm_{num}" + ("+PTX" if m.group(4) else ""))
    if not cmake:
        sys.exit("autoqnn: TORCH_CUDA_ARCH_LIST is empty")
    return cmake, labels


def build_config() -> dict:
    """What to build, decided from torch, the toolkit and the env switches (see module doc)."""
    torch, cpp_extension = _torch()
    mode = _env_flag("AUTOQNN_CUDA", "auto")
    if mode not in ("auto", "1", "0"):
        sys.exit(f"autoqnn: AUTOQNN_CUDA={mode!r}; expected auto, 1 or 0")
    cfg = {
        "torch": torch.__version__,
        "include_dirs": cpp_extension.include_paths(),
        "library_dirs": cpp_extension.library_paths(),
        "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cuda": False, "cuda_home": None, "cuda_version": None, "archs": [], "arch_labels": [],
        "note": "",
        "build_type": "Debug" if _env_flag("DEBUG", "0") in ("1", "true", "on", "yes") else "Release",
    }
    why_not = ""
    if mode == "0":
        why_not = "AUTOQNN_CUDA=0"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU build"
    else:
        home, why_not = _cuda_home()
        if home:
            ver = _nvcc_version(os.path.join(home, "bin", "nvcc"))
            if ver.split(".")[0] != torch.version.cuda.split(".")[0]:
                why_not = f"toolkit {home} is CUDA {ver}, torch was built with CUDA {torch.version.cuda}"
            else:
                cfg.update(cuda=True, cuda_home=home, cuda_version=ver)
    if cfg["cuda"]:
        cfg["archs"], cfg["arch_labels"] = _parse_archs(
            os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    elif mode == "1":
        sys.exit(f"autoqnn: AUTOQNN_CUDA=1 but the CUDA kernels cannot be built: {why_not}. "
                 "Set CUDA_HOME to a toolkit matching torch, or use AUTOQNN_CUDA=0/auto.")
    elif mode == "auto":
        cfg["note"] = f" (no CUDA kernels: {why_not})"
    return cfg


def _cmake_bin() -> str:
    try:  # the cmake package from pip (works without an activated venv)
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            sys.exit("autoqnn: cmake (>= 3.26) not found; pip install cmake ninja")
        return found


def _ninja_bin() -> str | None:
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


# --------------------------------------------------------------------------- commands
class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the exact path setuptools expects."""

    def build_extension(self, ext: Extension) -> None:
        cfg = build_config()
        variant = "cpu+cuda" if cfg["cuda"] else "cpu"
        archs = f" ({','.join(cfg['arch_labels'])})" if cfg["cuda"] else ""
        print(f"autoqnn: building _C variant={variant}{archs} torch={cfg['torch']}{cfg['note']}",
              flush=True)

        so_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        so_path.parent.mkdir(parents=True, exist_ok=True)
        bdir = ROOT / "build" / f"cmake-{variant}-{cfg['build_type'].lower()}"
        ninja = _ninja_bin()
        generator = "Ninja" if ninja else "Unix Makefiles"
        cache = bdir / "CMakeCache.txt"
        if cache.exists() and f"CMAKE_GENERATOR:INTERNAL={generator}\n" not in cache.read_text():
            shutil.rmtree(bdir)  # a tree configured with another generator cannot be reused
        bdir.mkdir(parents=True, exist_ok=True)

        args = [
            "-G", generator,
            f"-DCMAKE_BUILD_TYPE={cfg['build_type']}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DAUTOQNN_WITH_CUDA={'ON' if cfg['cuda'] else 'OFF'}",
            f"-DAUTOQNN_OUTPUT_DIR={so_path.parent}",
            f"-DAUTOQNN_OUTPUT_NAME={so_path.name}",
            f"-DAUTOQNN_TORCH_INCLUDE_DIRS={';'.join(cfg['include_dirs'])}",
            f"-DAUTOQNN_TORCH_LIBRARY_DIRS={';'.join(cfg['library_dirs'])}",
            f"-DAUTOQNN_TORCH_CXX11_ABI={cfg['cxx11_abi']}",
        ]
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if cfg["cuda"]:
            args += [
                f"-DCMAKE_CUDA_COMPILER={os.path.join(cfg['cuda_home'], 'bin', 'nvcc')}",
                f"-DCUDAToolkit_ROOT={cfg['cuda_home']}",
                f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(cfg['archs'])}",
            ]
        launcher = shutil.which("ccache") or shutil.which("sccache")
        if launcher:
            args += [f"-DCMAKE_{lang}_COMPILER_LAUNCHER={launcher}" for lang in ("CXX", "CUDA")]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        cmake = _cmake_bin()
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(bdir), *args])
        subprocess.check_call([cmake, "--build", str(bdir), "--config", cfg["build_type"],
                               "-j", jobs])
        if not so_path.is_file():
            sys.exit(f"autoqnn: CMake did not produce {so_path}")
        self._write_build_info(so_path.parent, cfg)

    @staticmethod
    def _write_build_info(out_dir: Path, cfg: dict) -> None:
        (out_dir / BUILD_INFO).write_text(
            "# Generated by setup.py when autoqnn._C was built; do not edit (not in git).\n"
            "# autoqnn/_ext.py reads it before importing _C (torch version guard).\n"
            f"TORCH_VERSION = {cfg['torch']!r}\n"
            f"WITH_CUDA = {cfg['cuda']!r}\n"
            f"CUDA_VERSION = {cfg['cuda_version']!r}\n"
            f"CUDA_ARCHS = {cfg['arch_labels']!r}\n"
            f"BUILD_TYPE = {cfg['build_type']!r}\n"
        )

    def copy_extensions_to_source(self) -> None:
        # Editable/in-place builds copy only the module to the source tree; its build info too.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, regular = self._get_inplace_equivalent(build_py, ext)
            src = Path(regular).parent / BUILD_INFO
            if src.is_file():
                self.copy_file(str(src), str(Path(inplace).parent / BUILD_INFO), level=self.verbose)


class BuildPy(build_py):
    """Never copies autoqnn/_build_info.py from the source tree (it belongs to the module that
    build_ext produces), and says when the extension is skipped."""

    def find_package_modules(self, package, package_dir):
        mods = super().find_package_modules(package, package_dir)
        return [m for m in mods if not (package == "autoqnn" and m[1] == BUILD_INFO[:-3])]

    def run(self):
        if not BUILD_EXT:
            removed = []
            if getattr(self, "editable_mode", False):  # stale in-place module of an earlier build
                for f in glob.glob(str(ROOT / "autoqnn" / "_C*.so")) + [str(ROOT / "autoqnn" / BUILD_INFO)]:
                    if os.path.exists(f):
                        os.remove(f)
                        removed.append(os.path.relpath(f, ROOT))
            extra = f"; removed stale {', '.join(removed)}" if removed else ""
            print(f"autoqnn: building _C skipped (AUTOQNN_BUILD_EXT=0){extra}", flush=True)
        super().run()


packages = find_packages(include=["autoqnn", "autoqnn.*"])
# triton_kernels/ is installed as autoqnn.triton_kernels, never as a top-level package (OpenAI's
# Triton ships a distribution named triton_kernels); its subpackages follow the mapping below.
packages += ["autoqnn.triton_kernels"] + [
    "autoqnn.triton_kernels." + p for p in find_packages(where="triton_kernels")
]

setup(
    packages=sorted(set(packages)),
    package_dir={"autoqnn.triton_kernels": "triton_kernels"},
    package_data={"autoqnn": ["datasets/fashion_mnist_subset/*"]},
    ext_modules=[CMakeExtension("autoqnn._C")] if BUILD_EXT else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    zip_safe=False,
)
