#!/usr/bin/env bash
# One call on a 2-GPU H200 machine (device tool, kind nvidia-h200-x2), from the repository root:
#   1. the 32k joint training step, seer density 0.1 vs dense YaRN, on GPU 0 (issue 4);
#   2. ZeRO-3 over both GPUs: 1B-class Llama at 32k with yarn32k_sparsity90, and 64k with/without Ulysses (issue 5).
# Results land in $OUT (JSON, logs); the wheels in .whl/ supply what the GPU image lacks.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/kernels:/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SEER_CACHE=/tmp/seer-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_training_step.py --out "$OUT/training_step_32k.json" 2>&1 | grep -v Warning | tee "$OUT/training_step_32k.log" | tail -8
python3 benchmarks/bench_scale_out.py --out "$OUT/scale" --gpus 2 --steps 3 "$@" 2>&1 | tail -8
