#!/usr/bin/env bash
""":"
# This file is read by two programs, on purpose:
#  - bash runs the launcher part (up to `exit`): `bash launch/multi_node.sh [overrides...]`
#  - the DeepSpeed launcher runs the Python part below on every rank: `deepspeed launch/multi_node.sh [...]`
#    (Python sees the launcher part as a string literal).
#
# Launcher part. Two ways to start a multi-node run:
#  1. With passwordless ssh and a hostfile (`hostname slots=N` per line): run once, on the first node:
#       HOSTFILE=hostfile bash launch/multi_node.sh +exp=yarn32k_sparsity90 deepspeed=zero3
#  2. Without ssh: start it on every node yourself, same arguments, each with its own NODE_RANK:
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 bash launch/multi_node.sh +exp=...   # node 0
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 bash launch/multi_node.sh +exp=...   # node 1
# Variables: HOSTFILE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (29500), NPROC_PER_NODE (GPUs per node;
# default: all visible). Arguments are Hydra overrides for `python -m seer_finetune train`; a DeepSpeed
# config group is needed (deepspeed=zero2, zero3, zero3_offload, ...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${MASTER_PORT:-29500}"
if [ -n "${NODE_RANK:-}" ]; then
  : "${NNODES:?set NNODES (number of nodes) with NODE_RANK}"
  : "${MASTER_ADDR:?set MASTER_ADDR (address of node 0) with NODE_RANK}"
  slots="${NPROC_PER_NODE:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
  # --no_ssh only needs the shape of the job: NNODES entries of `slots` processes (names are never contacted).
  hostfile="$(mktemp)"
  trap 'rm -f "$hostfile"' EXIT
  for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$slots" >> "$hostfile"; done
  deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
    --master_port "$port" --no_local_rank "$here/multi_node.sh" "$@"
  exit $?
fi
: "${HOSTFILE:?set HOSTFILE (ssh launch) or NODE_RANK, NNODES and MASTER_ADDR (no ssh); see the top of this file}"
exec deepspeed --hostfile "$HOSTFILE" --master_port "$port" --no_local_rank "$here/multi_node.sh" "$@"
exit
":"""
# Per-rank part: the DeepSpeed launcher has set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
import sys

from seer_finetune.__main__ import leave, main

overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
leave(main(["train", *overrides]))
