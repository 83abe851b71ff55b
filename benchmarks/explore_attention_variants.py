"""Kernel-only times of the attention kernel variants (triton_attention.KERNEL_OPTIONS) on one GPU.

Chooses the defaults of `KERNEL_OPTIONS` and the first tile candidates; not a target measurement (that is
bench_attention.py). Same problem as bench_attention: B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768,
random per-head block masks with the diagonal kept. Block lists are built outside the timing. Each variant's
results are compared with the base variant's on the same inputs (relative L2 error), so a variant that
computes something else shows up next to its time.

    PYTHONPATH=.:kernels python benchmarks/explore_attention_variants.py --json variants.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_attention import causal_density_mask, rel_err  # noqa: E402

# name -> (option overrides per kind, configs to try): fwd configs, (dq, dkdv) config pairs, gt configs.
# The tables as of the last sweep, without the variants dropped since (in-kernel descriptors, delta fused into dQ,
# one masked loop, flattened GQA loop, warp specialization); earlier sweeps' tables are in their JSON files.
FWD_VARIANTS = {
    "pointers": ({"TMA": 0}, [(128, 128, 8, 3)]),
    "tma_host": ({"TMA": 1}, [(128, 128, 8, 3), (128, 128, 8, 2)]),
}
DQ0, DK0 = (128, 128, 8, 2), (64, 64, 4, 2)
BWD_VARIANTS = {
    "pointers": ({"TMA": 0}, {"TMA": 0}, [(DQ0, (64, 128, 8, 2))]),
    "tma_host": ({"TMA": 1}, {"TMA": 1}, [(DQ0, DK0), (DQ0, (64, 128, 8, 2)), ((64, 128, 4, 2), DK0)]),
    "tma_host+segments": ({"TMA": 1}, {"TMA": 1, "SEGMENTS": 1}, [(DQ0, DK0)]),
}
GT_VARIANTS = {
    "pointers": ({"TMA": 0}, {64: [(64, 64, 4, 3)], 128: [(128, 128, 8, 3)]}),
    "tma_host": ({"TMA": 1, "ROWS": 128}, {64: [(64, 128, 4, 2), (64, 64, 4, 2)], 128: [(128, 128, 4, 2)]}),
    "tma_host+rows64": ({"TMA": 1, "ROWS": 64}, {64: [(64, 64, 4, 2)], 128: []}),
}
# Block-64 tables (the gate's default block; tiles cannot exceed the block).
FWD_VARIANTS_64 = {
    "pointers": ({"TMA": 0}, [(64, 64, 4, 3)]),
    "tma_host": ({"TMA": 1}, [(64, 64, 4, 3), (64, 64, 4, 4)]),
}
BWD_VARIANTS_64 = {
    "pointers": ({"TMA": 0}, {"TMA": 0}, [((64, 64, 4, 2), (64, 64, 4, 2)), ((64, 64, 4, 2), (32, 64, 4, 3))]),
    "tma_host": ({"TMA": 1}, {"TMA": 1}, [((64, 64, 4, 2), (64, 64, 4, 2)), ((64, 64, 4, 2), (32, 64, 4, 3))]),
    "dq tma_host, dkdv pointers": ({"TMA": 1}, {"TMA": 0}, [((64, 64, 4, 2), (64, 64, 4, 2))]),
    "tma_host+segments": ({"TMA": 1}, {"TMA": 1, "SEGMENTS": 1}, [((64, 64, 4, 2), (64, 64, 4, 2))]),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: fwd bwd gt")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run through the Triton interpreter (small shapes)")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--sink-blocks", type=int, default=0,
                   help="also keep the first N key blocks in every row (seer_joint's sink): long dK/dV lists")
    p.add_argument("--hf-layout", action="store_true",
                   help="q, k, v as transformers hands them over: [B, L, H, D] storage viewed as [B, H, L, D]")
    p.add_argument("--gt-query-fraction", type=float, default=1.0,
                   help="ground truth for a random sorted subset of the query blocks (seer_joint uses 0.5)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def set_options(kind: str, overrides: dict) -> None:
    from seer_kernels import triton_attention

    base = {"fwd": {"TMA": 0}, "dq": {"TMA": 0}, "dkdv": {"TMA": 0, "SEGMENTS": 0}, "gt": {"TMA": 0, "ROWS": 128}}[kind]
    triton_attention.KERNEL_OPTIONS[kind] = {**base, **overrides}


def main(argv=None) -> int:
    import triton
    import triton.testing

    from seer_kernels import block_mask_to_indices
    from seer_kernels.triton_attention import TileConfig, sparse_attention_backward, sparse_attention_forward
    from seer_kernels.triton_ground_truth import ground_truth_forward

    args = parse_args(argv)
    dev = torch.device(args.device)
    L, hq, hkv, dim, block = args.seq_len, args.heads, args.kv_heads, args.head_dim, args.block
    gen = torch.Generator(device=dev).manual_seed(0)
    if args.hf_layout:
        q, k, v, dout = (torch.randn(1, L, h, dim, device=dev, generator=gen).to(torch.bfloat16).transpose(1, 2)
                         for h in (hq, hkv, hkv, hq))
    else:
        q, k, v, dout = (torch.randn(1, h, L, dim, device=dev, generator=gen).to(torch.bfloat16)
                         for h in (hq, hkv, hkv, hq))
    scale = 1.0 / math.sqrt(dim)
    nb = math.ceil(L / block)
    rows: list[dict] = []

    def bench(fn) -> float:
        if dev.type != "cuda":  # the interpreter: one run, only to exercise the script
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))

    def record(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    for d in args.densities:
        mask = causal_density_mask(1, hq, nb, d, device=dev, seed=1)
        if args.sink_blocks:
            mask[..., : args.sink_blocks] = True
            mask &= torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
        idx, cnt = block_mask_to_indices(mask)
        tidx, tcnt = block_mask_to_indices(mask, transpose=True)
        out0, lse0 = sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale)
        if "fwd" not in args.skip:
            for name, (opts, cfgs) in (FWD_VARIANTS_64 if block == 64 else FWD_VARIANTS).items():
                if args.only is not None and name not in args.only:
                    continue
                set_options("fwd", opts)
                for c in cfgs:
                    cfg = TileConfig(*c)
                    try:
                        out, lse = sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, config=cfg)
                        err = rel_err(out, out0)
                        ms = bench(lambda cfg=cfg: sparse_attention_forward(
                            q, k, v, idx, cnt, block_size=block, sm_scale=scale, config=cfg))
                        record(part="fwd", density=d, variant=name, config=str(c), ms=ms, err_vs_base=err)
                    except Exception as exc:  # a variant that does not compile is a result, not a crash
                        record(part="fwd", density=d, variant=name, config=str(c), error=repr(exc)[:300])
            # The public call (block lists built inside, as bench_attention times it) against the kernel alone,
            # both with the host-descriptor forward: what list building and Python add.
            from seer_kernels import block_sparse_attention

            set_options("fwd", {"TMA": 1})
            with torch.no_grad():
                ms = bench(lambda: block_sparse_attention(q, k, v, mask, block_size=block, backend="triton"))
            record(part="fwd public call", density=d, variant="tma_host", config="autotuned", ms=ms)
            ms = bench(lambda: block_mask_to_indices(mask))
            record(part="torch list build", density=d, variant="-", config="-", ms=ms)
            from seer_kernels.triton_attention import build_block_lists
            ms = bench(lambda: build_block_lists(mask))
            record(part="triton list build", density=d, variant="-", config="-", ms=ms)
            set_options("fwd", {})
        if "bwd" not in args.skip:
            ref = None
            for name, (dq_opts, dk_opts, pairs) in (BWD_VARIANTS_64 if block == 64 else BWD_VARIANTS).items():
                if args.only is not None and name not in args.only:
                    continue
                set_options("dq", dq_opts)
                set_options("dkdv", dk_opts)
                for cq, ck in pairs:
                    cfgq, cfgk = TileConfig(*cq), TileConfig(*ck)

                    def run(cfgq=cfgq, cfgk=cfgk):
                        return sparse_attention_backward(
                            dout, q, k, v, out0, lse0, idx, cnt, tidx, tcnt, block_size=block, sm_scale=scale,
                            dq_config=cfgq, dkdv_config=cfgk)
                    try:
                        grads = run()
                        if ref is None:
                            ref = [g.clone() for g in grads]
                        err = max(rel_err(g, r) for g, r in zip(grads, ref))
                        ms = bench(run)
                        record(part="bwd", density=d, variant=name, config=f"dq{cq} dkdv{ck}", ms=ms, err_vs_base=err)
                    except Exception as exc:
                        record(part="bwd", density=d, variant=name, config=f"dq{cq} dkdv{ck}", error=repr(exc)[:300])
            set_options("dq", {})
            set_options("dkdv", {})
    if "gt" not in args.skip:
        for gblock in (64, 128):
            ref = None
            n_q = math.ceil(L / gblock)
            q_blocks = None
            if args.gt_query_fraction < 1.0:
                count = max(1, round(args.gt_query_fraction * n_q))
                q_blocks = torch.randperm(n_q, device=dev, generator=gen)[:count].sort().values
            for name, (opts, cfgs) in GT_VARIANTS.items():
                if args.only is not None and name not in args.only:
                    continue
                set_options("gt", opts)
                for c in cfgs[gblock]:
                    cfg = TileConfig(*c)
                    try:
                        gt = ground_truth_forward(q, k, block_size=gblock, sm_scale=scale, config=cfg, query_blocks=q_blocks)
                        if ref is None:
                            ref = gt.clone()
                        err = float((gt - ref).abs().max())
                        ms = bench(lambda cfg=cfg, gblock=gblock, q_blocks=q_blocks: ground_truth_forward(
                            q, k, block_size=gblock, sm_scale=scale, config=cfg, query_blocks=q_blocks))
                        record(part=f"gt bs{gblock}", variant=name, config=str(c), ms=ms, max_abs_vs_base=err)
                    except Exception as exc:
                        record(part=f"gt bs{gblock}", variant=name, config=str(c), error=repr(exc)[:300])
            set_options("gt", {})

    print("\n| part | density | variant | config | ms | err vs base |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = r.get("err_vs_base", r.get("max_abs_vs_base"))
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")[:90]
        print(f"| {r['part']} | {r.get('density', '')} | {r['variant']} | {r['config']} | {ms} | "
              f"{'' if err is None else f'{err:.1e}'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "triton": triton.__version__,
                                         "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
