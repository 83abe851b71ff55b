#!/usr/bin/env bash
# One GPU session for the attention kernels: benchmark (with its bf16-vs-fp32 check) then the kernel tests on
# CUDA. Writes logs and JSON to ${OUT:-benchmarks/results/latest}. Usage: bash benchmarks/gpu_session.sh [bench args]
set -u -o pipefail
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONPATH=.:kernels${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-420}" python benchmarks/bench_attention.py --json "$OUT/attention_h200.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: $?"
XDIST=""
if ls .whl/pytest_xdist-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest_xdist-*.whl .whl/execnet-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site && XDIST="-n 8"
fi
timeout "${TEST_TIMEOUT:-170}" python -m pytest tests/kernels -q $XDIST -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: $?"
