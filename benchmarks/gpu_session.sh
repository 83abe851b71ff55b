#!/usr/bin/env bash
# One GPU session for the attention kernels: benchmark (with its bf16-vs-fp32 check), then the kernel tests and
# the seer attention path's tests on CUDA. Writes logs and JSON to ${OUT:-benchmarks/results/latest}.
# The wheels in .whl/ (../shared/device/wheels.sh) supply what the GPU image lacks (hydra for the seer tests,
# pytest-xdist). Usage: bash benchmarks/gpu_session.sh [bench_attention args]
set -u -o pipefail
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
XDIST=""
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site && ls .whl/pytest_xdist-*.whl >/dev/null 2>&1 && XDIST="-n 8"
fi
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_attention.py --json "$OUT/attention_h200.json" "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: $?"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/kernels tests/seer/test_seer_triton.py -q $XDIST -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: $?"
