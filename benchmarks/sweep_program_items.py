"""Gluon forward and dQ with 1, 2 or 4 query blocks per program, on one GPU.

With one block per program, every program pays its start-up (launch, first Q/K/V loads) and its output store in
the open; at density 0.1 a program has ~13 tiles, so that is a visible share. With several, the producer loads
the next block's rows and first K/V tiles while the consumers finish the current one. This times the kernels
alone (block lists built outside the timing; since 97fd32b the dQ kernel also computes delta, which sweep 15 ran
without) at each setting, in the order 1, 2, 4, 1 (the repeat shows
the drift within the call), and checks that outputs equal the one-block results. Same problem as
bench_attention (B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768, random per-head block masks).

    PYTHONPATH=.:kernels python benchmarks/sweep_program_items.py --json sweep.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sweep_common import BLOCK, HEADS_Q, Recorder, benchmark_inputs  # sets up sys.path
from bench_attention import causal_density_mask


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--items", type=int, nargs="+", default=[1, 2, 4, 1])
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from seer_kernels import gluon_attention as ga
    from seer_kernels import triton_attention as ta

    args = parse_args(argv)
    dev = torch.device("cuda")
    hq, block = HEADS_Q, BLOCK
    q, k, v, dout, scale, nb = benchmark_inputs(args.seq_len, dev)
    recorder = Recorder(args.rep)
    rows, bench, record = recorder.rows, recorder.bench, recorder.record

    for d in args.densities:
        mask = causal_density_mask(1, hq, nb, d, device=dev, seed=1)
        idx, cnt = ta.build_block_lists(mask)
        out0, lse0 = ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, items=1)
        delta = torch.empty_like(lse0)  # written by the dQ kernel (since 97fd32b)
        dq0 = ga.gluon_attention_dq(q, k, v, out0, dout, lse0, delta, idx, cnt, torch.empty_like(q), block_size=block,
                                    sm_scale=scale, items=1)
        for items in args.items:
            out, lse = ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, items=items)
            dq = ga.gluon_attention_dq(q, k, v, out0, dout, lse0, delta, idx, cnt, torch.empty_like(q), block_size=block,
                                       sm_scale=scale, items=items)
            same = bool(torch.equal(out, out0) and torch.equal(lse, lse0) and torch.equal(dq, dq0))
            fwd_ms = bench(lambda items=items: ga.gluon_attention_forward(
                q, k, v, idx, cnt, block_size=block, sm_scale=scale, out=out, lse=lse, items=items))
            dq_ms = bench(lambda items=items: ga.gluon_attention_dq(
                q, k, v, out0, dout, lse0, delta, idx, cnt, dq, block_size=block, sm_scale=scale, items=items))
            record(density=d, items=items, fwd_ms=fwd_ms, dq_ms=dq_ms, same_as_one_item=same)

    print("\n| density | items per program | fwd ms | dQ ms | outputs equal to 1 item |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['density']} | {r['items']} | {r['fwd_ms']:.3f} | {r['dq_ms']:.3f} | {r['same_as_one_item']} |")
    recorder.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
