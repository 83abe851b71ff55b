"""Kernel-only times of every tile shape of the sparse kernels at each density, on one GPU.

The autotuner picks one tile per kernel for a given length and head count; this sweep shows whether the best
tile depends on the density (short key-block lists favour small tiles that let two programs share an SM).
Same problem as bench_attention (B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768, random per-head block
masks, diagonal kept). Block lists are built outside the timing (their own cost is timed separately). Backward
times are the whole backward (delta, dQ, dK/dV kernels) with one of dQ / dK/dV varied and the other at its
default. Also times the ground truth against cuDNN's dense forward alternately (drift between calls cancels).

    PYTHONPATH=.:kernels python benchmarks/sweep_tiles.py --json sweep.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sweep_common import BLOCK, HEADS_Q, Recorder, benchmark_inputs  # sets up sys.path
from bench_attention import causal_density_mask, rel_err

FWD_TILES = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2),
             (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 2)]
DQ_TILES = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2), (64, 64, 4, 2),
            (64, 64, 4, 3)]
DKDV_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3),
              (128, 64, 8, 2)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--gt-rounds", type=int, default=4)
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: fwd dq dkdv gt")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seer_kernels.triton_attention import (
        TileConfig, build_block_lists, sparse_attention_backward, sparse_attention_forward,
    )
    from seer_kernels.triton_ground_truth import ground_truth_forward

    args = parse_args(argv)
    dev = torch.device("cuda")
    hq, block = HEADS_Q, BLOCK
    q, k, v, dout, scale, nb = benchmark_inputs(args.seq_len, dev)
    recorder = Recorder(args.rep)
    rows, bench, record = recorder.rows, recorder.bench, recorder.record

    for d in args.densities:
        mask = causal_density_mask(1, hq, nb, d, device=dev, seed=1)
        idx, cnt = build_block_lists(mask)
        tidx, tcnt = build_block_lists(mask, transpose=True)
        record(part="list build", density=d, config="forward lists", ms=bench(lambda: build_block_lists(mask)))
        record(part="list build", density=d, config="transposed lists",
               ms=bench(lambda: build_block_lists(mask, transpose=True)))
        out0, lse0 = sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale,
                                              config=TileConfig(*FWD_TILES[0]))
        if "fwd" not in args.skip:
            for c in FWD_TILES:
                cfg = TileConfig(*c)
                try:
                    out, _ = sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, config=cfg)
                    err = rel_err(out, out0)
                    ms = bench(lambda cfg=cfg: sparse_attention_forward(
                        q, k, v, idx, cnt, block_size=block, sm_scale=scale, config=cfg))
                    record(part="fwd", density=d, config=str(c), ms=ms, err=err)
                except Exception as exc:  # a tile that does not compile is a result, not a crash
                    record(part="fwd", density=d, config=str(c), error=repr(exc)[:200])
        ref = None
        for part, tiles in (("dq", DQ_TILES), ("dkdv", DKDV_TILES)):
            if part in args.skip:
                continue
            for c in tiles:
                cq = TileConfig(*c) if part == "dq" else TileConfig(*DQ_TILES[0])
                ck = TileConfig(*c) if part == "dkdv" else TileConfig(*DKDV_TILES[0])

                def run(cq=cq, ck=ck):
                    return sparse_attention_backward(dout, q, k, v, out0, lse0, idx, cnt, tidx, tcnt, block_size=block,
                                                     sm_scale=scale, dq_config=cq, dkdv_config=ck)
                try:
                    grads = run()
                    if ref is None:
                        ref = [g.clone() for g in grads]
                    err = max(rel_err(g, r) for g, r in zip(grads, ref))
                    record(part=f"bwd, {part} varied", density=d, config=str(c), ms=bench(run), err=err)
                except Exception as exc:
                    record(part=f"bwd, {part} varied", density=d, config=str(c), error=repr(exc)[:200])
        del ref

    if "gt" not in args.skip:
        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        with torch.no_grad():
            for gblock in (64, 128):
                for rnd in range(args.gt_rounds):
                    for name, fn in (("cudnn fwd", cudnn), (f"gt bs{gblock}", lambda gblock=gblock: ground_truth_forward(
                            q, k, block_size=gblock, sm_scale=scale))):
                        record(part="gt vs cudnn", round=rnd, config=name, ms=bench(fn))

    print("\n| part | density | config | ms | err |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")[:90]
        err = f"{r['err']:.1e}" if "err" in r else ""
        print(f"| {r['part']} | {r.get('density', r.get('round', ''))} | {r['config']} | {ms} | {err} |")
    recorder.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
