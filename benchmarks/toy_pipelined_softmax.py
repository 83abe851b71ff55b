"""Experiment (session 6): can plain Triton overlap a forward's softmax with its matrix products on Hopper?

A standalone forward loop (8192 programs x 128 rows, random key blocks, head_dim 128) in variants:
0 the plain loop; 1 the next tile's scores issued before this tile's softmax; 2 the same plus a synchronous
16-column dot at the top of the loop, so Triton's pipeliner keeps those scores in flight (it otherwise waits for
every dot whose result is used in the loop); 3 variant 2 unrolled twice (compiles only); 5 the causal mask of the
last entry behind a branch in the one loop; 6 an unmasked loop plus a one-entry masked loop (the seer kernel's shape).

Finding (benchmarks/results/kernel_variants_h200/sweep13_toy_overlap.log): variant 2 compiles to the intended
schedule but ptxas serializes every wgmma (C7514: the loop-carried scores are read by moves before their wait),
and it runs 8% slower than variant 0; 5 and 6 are within noise of 0. What worked instead is the Gluon forward
(`seer_kernels/gluon_attention.py`), where the waits and the warp roles are written by hand.

The variants are written out in full, not through shared helpers, on purpose: they are the exact code that was
timed, and factoring them changes what ptxas makes of them (register counts moved by up to 30 when tried).

    python benchmarks/toy_pipelined_softmax.py gpu     # time variants on a GPU
    python benchmarks/toy_pipelined_softmax.py 2       # compile variant 2 for sm_90 here, print its resources
"""
import os, sys, warnings
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget

@triton.jit
def kern(Q, K, V, O, IDX, cnt_ptr, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, MANUAL: tl.constexpr):
    pid = tl.program_id(0)
    Q += pid * BLOCK_M * D
    O += pid * BLOCK_M * D
    IDX += pid * 512
    offs_m = tl.arange(0, BLOCK_M)
    q = tl.load(Q + offs_m[:, None] * D + tl.arange(0, D)[None, :])
    cnt = tl.load(cnt_ptr + pid)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if MANUAL == 1:
        n0 = tl.load(IDX)
        k0 = K.load([0, 0, n0 * BLOCK_N, 0]).reshape([BLOCK_N, D])
        qk = tl.dot(q, tl.trans(k0))
        for t in range(0, cnt):
            n_blk = tl.load(IDX + t)
            n_nxt = tl.load(IDX + t + 1)
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            kn = K.load([0, 0, n_nxt * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk_next = tl.dot(q, tl.trans(kn))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
            p = tl.math.exp2(qk * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
            qk = qk_next
    elif MANUAL == 2:
        n0 = tl.load(IDX)
        k0 = K.load([0, 0, n0 * BLOCK_N, 0]).reshape([BLOCK_N, D])
        qk = tl.dot(q, tl.trans(k0))
        sync_a = tl.load(Q + offs_m[:, None] * D + tl.arange(0, 16)[None, :])
        sync_b = tl.load(Q + tl.arange(0, 16)[:, None] * D + tl.arange(0, 16)[None, :])
        sync = tl.zeros([BLOCK_M, 16], tl.float32)
        for t in range(0, cnt):
            sync = tl.dot(sync_a, sync_b, sync)
            n_blk = tl.load(IDX + t)
            n_nxt = tl.load(IDX + t + 1)
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            kn = K.load([0, 0, n_nxt * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk_next = tl.dot(q, tl.trans(kn))
            m_new = tl.maximum(tl.maximum(m_i, tl.max(qk, 1) * scale), tl.max(sync, 1) * 0.0 + float('-inf'))
            p = tl.math.exp2(qk * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
            qk = qk_next
    elif MANUAL == 3:
        n0 = tl.load(IDX)
        k0 = K.load([0, 0, n0 * BLOCK_N, 0]).reshape([BLOCK_N, D])
        qk_a = tl.dot(q, tl.trans(k0))
        zero_a = tl.load(Q + offs_m[:, None] * D + tl.arange(0, 16)[None, :])
        zero_b = tl.load(Q + tl.arange(0, 16)[:, None] * D + tl.arange(0, 16)[None, :])
        for t in range(0, cnt, 2):
            sync = tl.dot(zero_a, zero_b * t.to(tl.bfloat16))
            n_blk = tl.load(IDX + t)
            n_nxt = tl.load(IDX + t + 1)
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            kn = K.load([0, 0, n_nxt * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk_b = tl.dot(q, tl.trans(kn))
            m_new = tl.maximum(tl.maximum(m_i, tl.max(qk_a, 1) * scale), tl.max(sync, 1) * 0.0 + float('-inf'))
            p = tl.math.exp2(qk_a * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
            sync2 = tl.dot(zero_a, zero_b * n_blk.to(tl.bfloat16))
            n_nxt2 = tl.load(IDX + t + 2)
            v2 = V.load([0, 0, n_nxt * BLOCK_N, 0]).reshape([BLOCK_N, D])
            kn2 = K.load([0, 0, n_nxt2 * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk_a = tl.dot(q, tl.trans(kn2))
            m_new = tl.maximum(tl.maximum(m_i, tl.max(qk_b, 1) * scale), tl.max(sync2, 1) * 0.0 + float('-inf'))
            p = tl.math.exp2(qk_b * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v2, acc * alpha[:, None])
            m_i = m_new
    elif MANUAL == 5:
        # mask of the last entry inside the one pipelined loop, behind a uniform branch
        for t in range(0, cnt):
            n_blk = tl.load(IDX + t)
            k = K.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk = tl.dot(q, tl.trans(k))
            if t == cnt - 1:
                qk = tl.where(offs_m[:, None] >= tl.arange(0, BLOCK_N)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
            p = tl.math.exp2(qk * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
    elif MANUAL == 6:
        # as the seer kernel: unmasked loop, then a one-entry masked loop
        for t in range(0, cnt - 1):
            n_blk = tl.load(IDX + t)
            k = K.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
            p = tl.math.exp2(qk * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
        for t in range(cnt - 1, cnt):
            n_blk = tl.load(IDX + t)
            k = K.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk = tl.dot(q, tl.trans(k))
            qk = tl.where(offs_m[:, None] >= tl.arange(0, BLOCK_N)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
    else:
        for t in range(0, cnt):
            n_blk = tl.load(IDX + t)
            k = K.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            v = V.load([0, 0, n_blk * BLOCK_N, 0]).reshape([BLOCK_N, D])
            qk = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
            p = tl.math.exp2(qk * scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * D + tl.arange(0, D)[None, :], acc.to(tl.bfloat16))


def run_gpu():
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    torch.manual_seed(0)
    L, D, B = 32768, 128, 128
    n_prog = 8192
    res = []
    for steps in (13, 128):
        q = torch.randn(n_prog * B, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 1, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 1, L, D, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(0, L // B, (n_prog, 512), device="cuda", dtype=torch.int32)
        cnt = torch.full((n_prog,), steps, device="cuda", dtype=torch.int32)
        kd = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, B, D])
        vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, B, D])
        # reference for program 0..3
        ref = []
        for p in range(4):
            ks = k[0, 0].view(L // B, B, D)[idx[p, :steps].long()].reshape(-1, D).float()
            vs = v[0, 0].view(L // B, B, D)[idx[p, :steps].long()].reshape(-1, D).float()
            s = q[p * B:(p + 1) * B].float() @ ks.T * 0.125
            ref.append(torch.softmax(s, -1) @ vs)
        ref = torch.cat(ref)
        for manual, stages in ((0, 2), (5, 2), (6, 2), (5, 3), (6, 3)):
            o = torch.empty_like(q)
            fn = lambda: kern[(n_prog,)](q, kd, vd, o, idx, cnt, 0.125 * 1.4426950408889634, BLOCK_M=B, BLOCK_N=B, D=D, MANUAL=manual, num_warps=8, num_stages=stages)
            try:
                fn(); torch.cuda.synchronize()
                err = (o[:4 * B].float() - ref).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=100, rep=400)
            except Exception as e:
                err, ms = str(e)[:80], float("nan")
            flops = 4 * n_prog * steps * B * B * D
            res.append((steps, manual, stages, ms, flops / ms / 1e9, err))
            print(f"steps {steps:4d} manual {manual} stages {stages}: {ms:.3f} ms  {flops/ms/1e9:.0f} TFLOP/s  err {err}", flush=True)

if sys.argv[1] == "gpu":
    run_gpu(); sys.exit(0)
manual = int(sys.argv[1]); stages = int(sys.argv[2]) if len(sys.argv) > 2 else 3
desc = "tensordesc<bf16[1,1,128,128]>"
sig = {"Q": "*bf16", "K": desc, "V": desc, "O": "*bf16", "IDX": "*i32", "cnt_ptr": "*i32", "scale": "fp32",
       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D": "constexpr", "MANUAL": "constexpr"}
src = triton.compiler.ASTSource(fn=kern, signature=sig, constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "D": 128, "MANUAL": manual},
                                attrs={(0,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]})
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": stages})
import pathlib
import subprocess
import tempfile

bindir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
with tempfile.TemporaryDirectory() as tmp:
    cubin = pathlib.Path(tmp) / "kernel.cubin"
    cubin.write_bytes(c.asm["cubin"])
    usage = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
print(usage, "shared", c.metadata.shared)
