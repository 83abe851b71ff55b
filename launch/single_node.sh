#!/usr/bin/env bash
# One node, NPROC_PER_NODE processes (default: one per visible GPU), through the DeepSpeed launcher:
#   bash launch/single_node.sh +exp=yarn32k_sparsity90 deepspeed=zero3
# Arguments are Hydra overrides for `python -m seer_finetune train`.
set -euo pipefail
nproc="${NPROC_PER_NODE:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module seer_finetune train "$@"
