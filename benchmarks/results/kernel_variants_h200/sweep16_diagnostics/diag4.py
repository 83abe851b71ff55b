import sys, math, torch
sys.path[:0] = ["kernels", "benchmarks"]
from bench_attention import causal_density_mask
from seer_kernels import triton_attention as ta
from seer_kernels import gluon_attention as ga

def ref_lse(q, k, mask, block, scale):
    B, H, L, D = q.shape; rep = H // k.shape[1]
    kk = k.repeat_interleave(rep, 1).float()
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    tok = mask.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :L, :L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~(tok & causal), float("-inf"))
    return torch.logsumexp(s, -1) / math.log(2)

cases = [(1, 4, 4, 1024, 128, 0.5), (2, 8, 2, 2048, 128, 0.3)]
for rnd in range(25):
    for (bsz, hq, hkv, L, dim, d) in cases:
        for block in (128, 64):
            torch.manual_seed(rnd)
            q, k, v = (torch.randn(bsz, h, L, dim, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
            mask = causal_density_mask(bsz, hq, L // block, d, device="cuda", seed=rnd)
            idx, cnt = ta.build_block_lists(mask)
            scale = dim ** -0.5
            want = ref_lse(q, k, mask, block, scale)
            for name, g in (("triton", False), ("gluon", True)):
                o, l = ta.sparse_attention_forward(q, k, v, idx, cnt, block_size=block, sm_scale=scale, use_gluon=g)
                torch.cuda.synchronize()
                e = (l - want).nan_to_num(posinf=0.0).abs()
                if e.max() > 1e-2:
                    bad = (e > 1e-2).nonzero()
                    rows = bad[:, 2]
                    print("round", rnd, (bsz, hq, hkv, L, dim, d, block), name, "WRONG: entries", bad.shape[0],
                          "first", bad[:2].tolist(), "blocks", sorted(set((rows // block).tolist()))[:10],
                          "heads", sorted(set(bad[:, 1].tolist())), flush=True)
print("done", ga.ITEMS_PER_PROGRAM)
