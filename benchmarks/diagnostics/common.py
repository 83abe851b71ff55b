"""What the kernel diagnostics share: bench_attention's problem on the GPU and a recorder that times and prints rows.

Imported first by `power_check.py` and `profile_step.py` (run as `python benchmarks/diagnostics/<script>.py`): it
puts the repository root, `kernels/` and `benchmarks/` on `sys.path`, so that `seer_finetune`, `seer_kernels` and
`bench_attention` import from a checkout without installing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/diagnostics/common.py -> repository root
for _p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# bench_attention's problem: B=1, 32 query / 8 KV heads, head_dim 128, block 128.
HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 32, 8, 128, 128


def benchmark_inputs(seq_len: int, device: torch.device):
    """bf16 `(q, k, v, dout)` of the benchmark's shape (seeded), the softmax scale and the number of blocks."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, h, seq_len, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
        for h in (HEADS_Q, HEADS_KV, HEADS_KV, HEADS_Q)
    )
    return q, k, v, dout, 1.0 / math.sqrt(HEAD_DIM), math.ceil(seq_len / BLOCK)


def forward_backward_step(op, q, k, v, dout):
    """A callable that runs `op(q, k, v).backward(dout)` on leaf copies of q, k, v and drops their gradients, as
    bench_attention times forward+backward."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        op(*leaves).backward(dout)
        for t in leaves:
            t.grad = None

    return step


def public_op(mask: torch.Tensor):
    """`(q, k, v) -> out` of the public sparse op with `mask` at the benchmark's block, on the kernels."""
    import seer_kernels as sk

    return lambda q, k, v: sk.block_sparse_attention(q, k, v, mask, block_size=BLOCK, kernel="triton")


def kernel_inputs(q, k, v, mask, scale):
    """What the kernels take when timed alone: the forward and transposed block lists of `mask` and the
    forward's `(out, lse)`, as `(idx, cnt, tidx, tcnt, out, lse)`."""
    from seer_kernels.triton_block_lists import build_block_lists
    from seer_kernels.triton_forward import sparse_attention_forward

    idx, cnt = build_block_lists(mask)
    tidx, tcnt = build_block_lists(mask, transpose=True)
    out, lse = sparse_attention_forward(q, k, v, idx, cnt, block_size=BLOCK, sm_scale=scale)
    return idx, cnt, tidx, tcnt, out, lse


class Recorder:
    """Times callables (median of `triton.testing.do_bench` after one warm call) and keeps printed rows."""

    def __init__(self, rep_ms: int, warmup_ms: int = 50):
        self.rep_ms = rep_ms
        self.warmup_ms = warmup_ms
        self.rows: list[dict] = []

    def bench(self, fn) -> float:
        import triton.testing

        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))

    def record(self, **kw) -> None:
        self.rows.append(kw)
        print(json.dumps(kw), flush=True)

    def write_json(self, path: Path | None) -> None:
        """The rows with the torch / Triton versions and the GPU's name (nothing when `path` is None)."""
        if path is None:
            return
        import triton

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": self.rows, "torch": torch.__version__, "triton": triton.__version__,
                                    "device": torch.cuda.get_device_name()}, indent=1))
