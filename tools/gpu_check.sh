#!/usr/bin/env bash
# The GPU half of the kernels issue, as one short script for a lent GPU machine (no network):
# build the CUDA extension against the machine's torch, run the CUDA/Triton tests, measure the
# kernel choice table and the benchmark tables. Every step has its own time limit and its log
# goes to $OUT (default ./gpu-check), so a slow step cannot eat the others' time.
#
#   OUT=/tmp/out bash tools/gpu_check.sh                          # every step (~15 min at most)
#   STEPS="build env tests" bash tools/gpu_check.sh                # the first half (< 10 min)
#   STEPS="build tune report batched train_step" bash ...          # the second (build is a no-op
#                                                                  # when the machine is still warm)
set -uo pipefail
STEPS=${STEPS:-"build env tests tune report batched train_step"}
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step build 240 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 pip install -e . --no-build-isolation --no-deps
step env 60 python -m autoqnn.env
step tests 300 python -m pytest -q --benchmark-disable -x tests/test_ops.py tests/test_ext_loading.py \
  tests/test_triton_kernels.py tests/test_kernel_choice.py tests/test_robustness.py -p no:cacheprovider
step tune 60 env AUTOQNN_KERNEL_CHOICE="$OUT/kernel_choice.json" python -m autoqnn tune-kernels --max-log2 24
step report 150 env AUTOQNN_KERNEL_CHOICE="$OUT/kernel_choice.json" python bench/report.py --device cuda \
  --max-log2 24 --rounds 5 --stats
step batched 60 env AUTOQNN_KERNEL_CHOICE="$OUT/kernel_choice.json" python bench/bench_batched.py --device cuda
step train_step 120 python bench/bench_train_step.py --device cuda
cat "$OUT/summary.txt"
