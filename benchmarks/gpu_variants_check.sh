#!/usr/bin/env bash
# One GPU call: kernel-only times of the KERNEL_OPTIONS variants named in $VARIANTS (explore_attention_variants.py)
# and the kernel tests on CUDA. Usage: VARIANTS="tma_host tma_host+rows64" bash benchmarks/gpu_variants_check.sh
set -u -o pipefail
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/kernels:/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# shellcheck disable=SC2086
timeout "${SWEEP_TIMEOUT:-330}" python3 benchmarks/explore_attention_variants.py --only $VARIANTS --json "$OUT/variants.json" \
  > "$OUT/variants.log" 2>&1
echo "variants exit: $?"
grep "^|" "$OUT/variants.log"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest tests/kernels -q -n 8 -p no:cacheprovider -k "${TESTS:-variants}" \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit: $?"
tail -4 "$OUT/pytest_gpu.log"
