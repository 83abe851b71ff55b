"""Gluon kernels (forward, dQ, dK/dV) against the Triton ones on one GPU: same block lists, outputs compared, both
timed.

    python benchmarks/diagnostics/gluon_check.py [--json out.json] [--quick]

Each case runs `sparse_attention_forward` / `sparse_attention_backward` with `use_gluon=True` and `False`
(the backward's dQ and, at block 128 or forced, dK/dV kernels), checks the forward against the float32 reference
on two heads and the Gluon results against the Triton ones, and on the long cases times both (Triton, Gluon,
Triton again).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/diagnostics/gluon_check.py -> repository root
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "benchmarks")]

from bench_attention import causal_density_mask  # noqa: E402
from seer_kernels import block_sparse_attention  # noqa: E402
from seer_kernels.triton_backward import sparse_attention_backward  # noqa: E402
from seer_kernels.triton_block_lists import build_block_lists  # noqa: E402
from seer_kernels.triton_forward import sparse_attention_forward  # noqa: E402


def run_case(bsz, hq, hkv, seq_len, dim, density, dtype, time_it, seed=0, block=128):
    """Compare (and with `time_it`, time) the Gluon and Triton kernels on one random problem.

    Args:
        bsz, hq, hkv, seq_len, dim: batch, query heads, KV heads, length and head_dim of q [B, Hq, L, D] and
            k, v [B, Hkv, L, D].
        density: kept share of each causal row (0.0: every third row keeps nothing).
        dtype: bfloat16 or float16.
        time_it: also time forward and backward, Triton before and after Gluon.
        seed: seed of the inputs and the mask.
        block: sparsity block size.

    Returns:
        The case's record: errors against the float32 reference and between the two, `ok`, and the timings.
    """
    torch.manual_seed(seed)
    q, k, v, dout = (torch.randn(bsz, h, seq_len, dim, device="cuda", dtype=dtype) for h in (hq, hkv, hkv, hq))
    nb = seq_len // block
    mask = causal_density_mask(bsz, hq, nb, density, device="cuda", seed=seed)
    if density == 0.0:
        mask[:, :, 1::3] = False  # rows with nothing kept: zero output, lse = +inf
    idx, cnt = build_block_lists(mask)
    idx_t, cnt_t = build_block_lists(mask, transpose=True)
    scale = dim ** -0.5

    def fwd(use_gluon):
        return sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, use_gluon=use_gluon)

    def bwd(use_gluon, out, lse):
        return sparse_attention_backward(dout, q, k, v, out, lse, idx, cnt, idx_t, cnt_t, block_size=block,
                                         sm_scale=scale, use_gluon=use_gluon)

    o_t, lse_t = fwd(False)
    o_g, lse_g = fwd(True)
    g_t = bwd(False, o_t, lse_t)
    g_g = bwd(True, o_t, lse_t)
    heads = [0, hq - 1]
    rep = hq // hkv
    ref = block_sparse_attention(
        q[:, heads].float(), k[:, [h // rep for h in heads]].float(), v[:, [h // rep for h in heads]].float(),
        mask[:, heads], block_size=block, sm_scale=scale, kernel="pytorch")
    rec = dict(bsz=bsz, hq=hq, hkv=hkv, seq_len=seq_len, dim=dim, block=block, density=density,
               dtype=str(dtype).split(".")[-1],
               out_err_gluon=(o_g[:, heads].float() - ref).abs().max().item(),
               out_err_triton=(o_t[:, heads].float() - ref).abs().max().item(),
               lse_diff=(lse_g - lse_t).nan_to_num(posinf=0.0).abs().max().item(),
               lse_inf_same=bool(torch.equal(lse_g.isinf(), lse_t.isinf())),
               dq_diff=(g_g[0].float() - g_t[0].float()).abs().max().item(),
               dq_scale=g_t[0].float().abs().max().item(),
               dk_diff=(g_g[1].float() - g_t[1].float()).abs().max().item(),
               dk_scale=g_t[1].float().abs().max().item(),
               dv_diff=(g_g[2].float() - g_t[2].float()).abs().max().item(),
               dv_scale=g_t[2].float().abs().max().item())
    finite = all(bool(torch.isfinite(t).all()) for t in (o_g, *g_g))
    rec["ok"] = bool(finite and rec["out_err_gluon"] <= 2 * rec["out_err_triton"] + 1e-3
                     and rec["lse_diff"] < 1e-2 and rec["lse_inf_same"]
                     and all(rec[f"{n}_diff"] <= 2e-2 * max(rec[f"{n}_scale"], 1.0) for n in ("dq", "dk", "dv")))
    if time_it:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=100, rep=400)

        rec["fwd_ms_triton"] = bench(lambda: fwd(False))
        rec["fwd_ms_gluon"] = bench(lambda: fwd(True))
        rec["fwd_ms_triton_again"] = bench(lambda: fwd(False))
        rec["bwd_ms_triton"] = bench(lambda: bwd(False, o_t, lse_t))
        rec["bwd_ms_gluon"] = bench(lambda: bwd(True, o_t, lse_t))
        rec["bwd_ms_triton_again"] = bench(lambda: bwd(False, o_t, lse_t))
        rec["fwd_speedup"] = min(rec["fwd_ms_triton"], rec["fwd_ms_triton_again"]) / rec["fwd_ms_gluon"]
        rec["bwd_speedup"] = min(rec["bwd_ms_triton"], rec["bwd_ms_triton_again"]) / rec["bwd_ms_gluon"]
    print(json.dumps(rec), flush=True)
    return rec


def main():
    """Run the small cases at block 128 and 64 and, without `--quick`, the timed long ones; print "all ok" or
    "MISMATCH". Returns 0, or 2 without a CUDA GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every case's record here")
    parser.add_argument("--quick", action="store_true", help="small cases only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gluon_check needs a CUDA GPU", file=sys.stderr)
        return 2
    recs = []
    small = [
        (1, 4, 4, 1024, 128, 0.5, torch.bfloat16),
        (2, 8, 2, 2048, 128, 0.3, torch.bfloat16),
        (1, 4, 1, 1024, 64, 0.5, torch.float16),
        (1, 4, 4, 1024, 64, 1.0, torch.bfloat16),
        (1, 2, 2, 768, 128, 0.0, torch.bfloat16),
    ]
    for case in small:
        recs.append(run_case(*case, time_it=False))
        recs.append(run_case(*case, time_it=False, block=64))
    if not args.quick:
        for density in (0.1, 0.5, 1.0):
            recs.append(run_case(1, 32, 8, 32768, 128, density, torch.bfloat16, time_it=True))
        # block 64 at the benchmark shape and at the SmolLM2 training shape (9/3 heads, head_dim 64)
        recs.append(run_case(1, 32, 8, 32768, 128, 0.1, torch.bfloat16, time_it=True, block=64))
        recs.append(run_case(1, 9, 3, 32768, 64, 0.1, torch.bfloat16, time_it=True, block=64))
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    print("all ok" if all(r["ok"] for r in recs) else "MISMATCH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
