#!/usr/bin/env bash
# dK/dV segments on the H200: backward with and without SEGMENTS, at the training-step shape (SmolLM2-135M
# heads, transformers layout, block 64) with and without a sink column, and at bench_attention's shape.
export PYTHONPATH=.:kernels PYTHONUNBUFFERED=1
V="tma_host tma_host+segments"
for sink in 0 1; do
  timeout 60 python3 benchmarks/explore_attention_variants.py --heads 9 --kv-heads 3 --head-dim 64 --block 64 \
    --densities 0.1 --skip fwd gt --hf-layout --sink-blocks $sink --only $V --json "$OUT/segments_smollm_sink$sink.json" | grep "^| bwd"
done
timeout 120 python3 benchmarks/explore_attention_variants.py --densities 1.0 0.5 0.1 --skip fwd gt --only $V \
  --json "$OUT/segments_bench_shape.json" | grep "^| bwd"
