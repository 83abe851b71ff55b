"""Gluon forward against the Triton forward on one GPU: same lists, outputs compared, both timed.

    python benchmarks/gluon_forward_check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "benchmarks")]

from bench_attention import causal_density_mask  # noqa: E402
from seer_kernels import gluon_attention as ga  # noqa: E402
from seer_kernels import triton_attention as ta  # noqa: E402


def run_case(bsz, hq, hkv, seq_len, dim, block, density, dtype, time_it, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(bsz, hq, seq_len, dim, device="cuda", dtype=dtype)
    k = torch.randn(bsz, hkv, seq_len, dim, device="cuda", dtype=dtype)
    v = torch.randn(bsz, hkv, seq_len, dim, device="cuda", dtype=dtype)
    nb = seq_len // block
    mask = causal_density_mask(bsz, hq, nb, density, device="cuda", seed=seed)
    idx, cnt = ta.build_block_lists(mask)
    scale = dim ** -0.5
    assert ga.gluon_forward_supported(q, k, v, block, None), "inputs not supported by the Gluon forward"
    o_t, lse_t = ta.sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale)
    o_g, lse_g = ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, variant="ws")
    o_r, lse_r = ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, variant="simple_qreg")
    torch.cuda.synchronize()
    # float32 reference of a few heads through the naive op
    from seer_kernels.naive import block_sparse_attention as naive_block_sparse_attention
    heads = [0, hq - 1]
    rep = hq // hkv
    ref = naive_block_sparse_attention(
        q[:, heads].float(), k[:, [h // rep for h in heads]].float(), v[:, [h // rep for h in heads]].float(),
        mask[:, heads], block_size=block, sm_scale=scale)
    err_g = (o_g[:, heads].float() - ref).abs().max().item()
    err_t = (o_t[:, heads].float() - ref).abs().max().item()
    err_r = (o_r[:, heads].float() - ref).abs().max().item()
    lse_diff = max((lse_g - lse_t).abs().max().item(), (lse_r - lse_t).abs().max().item())
    rec = dict(bsz=bsz, hq=hq, hkv=hkv, seq_len=seq_len, dim=dim, block=block, density=density,
               dtype=str(dtype).split(".")[-1], err_gluon_ws=err_g, err_gluon_qreg=err_r, err_triton=err_t, lse_diff=lse_diff,
               ok=bool(max(err_g, err_r) <= 2 * err_t + 1e-3 and lse_diff < 1e-2))
    if time_it:
        import triton.testing
        fn_t = lambda: ta.sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, out=o_t, lse=lse_t)
        fn_g = lambda: ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, out=o_g, lse=lse_g,
                                                  variant="ws")
        rec["ms_triton"] = triton.testing.do_bench(fn_t, warmup=100, rep=400)
        rec["ms_gluon_ws"] = triton.testing.do_bench(fn_g, warmup=100, rep=400)
        fn_r = lambda: ga.gluon_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, out=o_r, lse=lse_r,
                                                  variant="simple_qreg")
        rec["ms_gluon_qreg"] = triton.testing.do_bench(fn_r, warmup=100, rep=400)
        rec["ms_triton_again"] = triton.testing.do_bench(fn_t, warmup=100, rep=400)
        best_t = min(rec["ms_triton"], rec["ms_triton_again"])
        rec["speedup_ws"] = best_t / rec["ms_gluon_ws"]
        rec["speedup_qreg"] = best_t / rec["ms_gluon_qreg"]
    print(json.dumps(rec), flush=True)
    return rec


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    recs = []
    small = [
        (1, 4, 4, 1024, 128, 128, 0.5, torch.bfloat16),
        (2, 8, 2, 2048, 128, 128, 0.3, torch.bfloat16),
        (1, 4, 1, 1024, 64, 64, 0.5, torch.float16),
        (1, 4, 4, 1024, 64, 128, 1.0, torch.bfloat16),
        (1, 4, 2, 1024, 128, 64, 0.2, torch.bfloat16),
        (1, 2, 2, 256, 128, 128, 0.0, torch.bfloat16),
    ]
    for case in small:
        recs.append(run_case(*case, time_it=False))
    if not args.quick:
        for density in (0.1, 0.5, 1.0):
            recs.append(run_case(1, 32, 8, 32768, 128, 128, density, torch.bfloat16, time_it=True))
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    print("all ok" if all(r["ok"] for r in recs) else "MISMATCH")


if __name__ == "__main__":
    main()
