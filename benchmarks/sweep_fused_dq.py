"""Backward with dQ fused into the dK/dV kernel against the two-kernel backward, on one GPU.

The two-kernel backward recomputes the scores and dP in a dQ kernel (7 matrix products per visited tile pair);
the fused one adds each tile's dS K into a float32 dQ accumulator from the dK/dV kernel (5 products, plus the
accumulator's zeroing, reduce-adds and final conversion). This times the whole backward (delta, dQ, dK/dV; block
lists built outside the timing) of both, over the fused kernel's tile shapes and its two ways of adding dQ (TMA
bulk reduce-add, element atomics), and checks every gradient against the two-kernel one. Same problem as
bench_attention (B=1, 32/8 heads, head_dim 128, bf16, causal, L=32768, random per-head block masks).

    PYTHONPATH=.:kernels python benchmarks/sweep_fused_dq.py --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_attention import causal_density_mask, rel_err  # noqa: E402

FUSED_TILES = [(64, 64, 4, 2), (64, 64, 4, 1), (32, 64, 4, 2), (64, 128, 8, 2), (64, 128, 8, 1)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--tiles", type=str, nargs="*", default=None, help="fused tiles as BMxBNxWARPSxSTAGES")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import triton
    import triton.testing

    from seer_kernels import triton_attention as ta
    from seer_kernels.triton_attention import TileConfig, build_block_lists, sparse_attention_backward

    args = parse_args(argv)
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles] if args.tiles else FUSED_TILES
    dev = torch.device("cuda")
    L, hq, hkv, dim, block = args.seq_len, 32, 8, 128, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, L, dim, device=dev, generator=gen).to(torch.bfloat16) for h in (hq, hkv, hkv, hq))
    scale = 1.0 / math.sqrt(dim)
    nb = math.ceil(L / block)
    rows: list[dict] = []

    def bench(fn) -> float:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=50, rep=args.rep, return_mode="median"))

    def record(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    acc = torch.empty(q.shape, dtype=torch.float32, device=dev)
    dq16 = torch.empty_like(q)
    record(part="dq accumulator", density="-", variant="zero float32 [B,Hq,L,D]", ms=bench(acc.zero_))
    record(part="dq accumulator", density="-", variant="copy to bf16", ms=bench(lambda: dq16.copy_(acc)))

    dkdv_opts = dict(ta.KERNEL_OPTIONS["dkdv"])
    for d in args.densities:
        mask = causal_density_mask(1, hq, nb, d, device=dev, seed=1)
        idx, cnt = build_block_lists(mask)
        tidx, tcnt = build_block_lists(mask, transpose=True)
        out, lse = ta.sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale)

        def backward(**kw):
            return sparse_attention_backward(dout, q, k, v, out, lse, idx, cnt, tidx, tcnt, block_size=block,
                                             sm_scale=scale, **kw)

        ref = [g.clone() for g in backward(fused_dq=False, use_gluon=False)]
        variants = [("two kernels: Triton dQ + dK/dV", dict(fused_dq=False, use_gluon=False), None),
                    ("two kernels: Gluon dQ + Triton dK/dV", dict(fused_dq=False), None)]
        for c in tiles:
            for tma in (1, 0):
                name = f"fused dQ {c[0]}x{c[1]} w{c[2]} s{c[3]}, " + ("TMA reduce-add" if tma else "atomics")
                variants.append((name, dict(fused_dq=True, dkdv_config=TileConfig(*c)), tma))
        for name, kw, tma in variants:
            ta.KERNEL_OPTIONS["dkdv"] = {**dkdv_opts, **({"TMA": tma} if tma is not None else {})}
            try:
                grads = backward(**kw)
                errs = {f"err_d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref)}
                record(part="bwd", density=d, variant=name, ms=bench(lambda kw=kw: backward(**kw)), **errs)
            except Exception as exc:  # a variant that does not compile is a result, not a crash
                record(part="bwd", density=d, variant=name, error=repr(exc)[:300])
            finally:
                ta.KERNEL_OPTIONS["dkdv"] = dict(dkdv_opts)

    print("\n| density | variant | bwd ms | err dq / dk / dv |")
    print("|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")[:90]
        err = " / ".join(f"{r[f'err_d{n}']:.1e}" for n in "qkv") if "err_dq" in r else ""
        print(f"| {r['density']} | {r['variant']} | {ms} | {err} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "triton": triton.__version__,
                                         "device": torch.cuda.get_device_name()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
