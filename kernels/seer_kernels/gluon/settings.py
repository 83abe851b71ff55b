"""Launch settings and input scope of the Gluon kernels, importable without Gluon.

The dispatch (`seer_kernels.gluon.gluon_supported`, `pick_gluon`) and the tests read these on any machine; the
kernel modules, which need Triton's Gluon, import them too.
"""

from __future__ import annotations

import torch

ROWS = 64  # query rows per consumer warpgroup (one wgmma M): block 128 has two consumers, block 64 one
# Registers per thread of the second consumer warpgroup (the first gets what is left, the producer warp 24).
CONSUMER_REGS = 232
# The dK/dV consumers need 240: with fewer, ptxas serializes their matrix products (P^T is a register operand).
DKDV_CONSUMER_REGS = 240
# Query blocks per program, per kernel (the fastest on Hopper, see benchmarks/results/). With several, a program
# pairs long and short causal lists and its producer loads the next block's rows and first K/V tiles while the
# consumers finish the current one, instead of a new program paying its start-up (launch, first loads) and its
# output store in the open.
ITEMS_PER_PROGRAM = {"fwd": 4, "dq": 2}
# Query tiles (Q, dO, lse, delta of 64 rows) in flight per dK/dV program: four hide the producer's load latency;
# a fifth does not fit in the shared memory at block 128 and head_dim 128.
DKDV_STAGES = 4


def rows_collapse(t: torch.Tensor) -> bool:
    """Whether `t` `[B, H, L, D]` has D contiguous and (B, H, L) addressable as one row index of stride D (the
    kernels' 2-D `[B * H * L, D]` descriptors), with a 16-byte aligned base."""
    bsz, heads, seq_len, dim = t.shape
    st = t.stride()
    return (
        st[3] == 1
        and st[2] == dim
        and (heads == 1 or st[1] == seq_len * dim)
        and (bsz == 1 or st[0] == heads * seq_len * dim)
        and t.data_ptr() % 16 == 0
    )


def program_items(kind: str, items: int | None, block_size: int, head_dim: int) -> int:
    """Query blocks per program of a kernel.

    More than one only where block == head_dim: the output tile then leaves through a P / dS slot while the next
    block's rows load into the Q slot.

    Args:
        kind: 'fwd' or 'dq'.
        items: the requested count (None: `ITEMS_PER_PROGRAM[kind]`).
        block_size: tokens per block; head_dim: D.
    Returns:
        The count the kernel runs with.
    """
    items = ITEMS_PER_PROGRAM[kind] if items is None else items
    if items < 1:
        raise ValueError(f"items per program must be >= 1, got {items}")
    return items if block_size == head_dim else 1
