#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The test suite under another torch release (the project supports torch >= 2.6; CI runs the
# pinned one of requirements-dev.txt). Makes a throwaway venv and a clean clone of HEAD, installs
# torch==VERSION with the triton it depends on, the other test requirements unpinned, builds the
# extension against that torch (CUDA kernels when nvcc matches it) and runs pytest.
#
#   bash tools/compat_check.sh 2.6.0              # whole suite (~10 min on 2 cores)
#   bash tools/compat_check.sh 2.11.0 tests/test_ops.py -k compile
#
# WORK (default /tmp/autoqnn-compat-VERSION) holds the venv (a CUDA build of torch: ~5-6 GB)
# and the clone; it is reused when present. Needs the wheels on the machine's package index.
set -euo pipefail
ver=${1:?usage: tools/compat_check.sh TORCH_VERSION [pytest args...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/autoqnn-compat-$ver}
py=python3.11
command -v "$py" >/dev/null 2>&1 || py=python3
mkdir -p "$work"
if [ ! -x "$work/venv/bin/python" ]; then
  "$py" -m venv "$work/venv"
fi
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$ver')" 2>/dev/null; then
  pip install --disable-pip-version-check -q "torch==$ver"
fi
# everything else CI installs, without the torch/torchvision/triton pins
grep -v -E '^(torch|torchvision|triton)([=<>~ ]|$)' "$repo/requirements-dev.txt" > "$work/requirements.txt"
pip install --disable-pip-version-check -q -r "$work/requirements.txt"
rm -rf "$work/src"
git clone -q "$repo" "$work/src"
cd "$work/src"
pip install --disable-pip-version-check -v -e . --no-build-isolation > "$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log"; echo "build failed (log: $work/build.log)"; exit 1; }
grep -m1 "autoqnn: building" "$work/build.log" || true
python -c "import torch, triton, autoqnn._ext as e; print('torch', torch.__version__, 'triton', triton.__version__, '_C loaded:', e.HAS_EXT)"
python -m pytest -q --benchmark-disable -p no:cacheprovider "$@"
