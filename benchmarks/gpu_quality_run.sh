#!/usr/bin/env bash
# The issue-6 pipeline on the GPU machine, after benchmarks/pack_quality_inputs.sh's parts (here re-split as
# /tmp/qi/g0, g1, ...) and the wheels (installed to /tmp/site) came over in earlier calls. Unpacks and converts
# the model once, runs benchmarks/bench_quality.py into /tmp/qo (a rerun reuses finished runs and evaluations,
# so a pipeline cut by the call's time limit resumes in the next call), then packs everything but weights,
# caches and staged data into $OUT/quality.tgz.
#   bash benchmarks/gpu_quality_run.sh [bench_quality.py args, e.g. --override attention.budget=layer]
set -u -o pipefail
qi=/tmp/qi
if [ ! -d "$qi/hf" ]; then
  cat "$qi"/g? | xz -d | tar x -C "$qi" && PYTHONPATH=/tmp/site python3 "$qi/gguf_to_hf.py" "$qi"/*.gguf "$qi/hf" || exit 1
fi
export PYTHONPATH=$PWD:$PWD/kernels:/tmp/site SEER_KERNELS_AUTOTUNE=0 WANDB_MODE=offline PYTHONUNBUFFERED=1
mkdir -p /tmp/qo
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout "${QUALITY_TIMEOUT:-520}" python3 benchmarks/bench_quality.py --model "$qi/hf" --corpora "$qi" --out /tmp/qo "$@" 2>&1 \
  | grep -v -i "warn" | tee -a /tmp/qo/log.txt
echo "bench_quality exit: ${PIPESTATUS[0]}"
tar czf "${OUT:-.}/quality.tgz" -C /tmp --exclude='qo/runs/*/final' --exclude='qo/runs/*/checkpoint*' \
  --exclude='qo/cache' --exclude='qo/data' qo
