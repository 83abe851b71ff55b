"""Probe scores: the exact block-pooled attention of a few query tokens per block (`attention.probe_blocks`).

The ground truth the gates learn (`seer_kernels.attention_ground_truth`) max-pools every query token's attention
probabilities over each key block and over the query block, then normalises each row. Probing computes the same
with only `probe_tokens` r of each block's tokens: r / block_size of its cost, and still exact where it looks. A
block whose mass is one rare high logit (a passkey's needle) that a probe token attends to scores high here
whatever the gate has learnt.
"""

from __future__ import annotations

from typing import Optional

import torch

import seer_kernels
from seer_kernels import probe_positions

__all__ = ["probe_positions", "probe_scores"]


@torch.no_grad()
def probe_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block_size: int,
    probe_tokens: int = 1,
    document_ids: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """The block-max-pooled, row-normalised attention of each query block's probe tokens (`probe_positions`).

    For probe token p: its softmax attention probabilities over the keys it may attend to (key position <= p,
    the same document id, a valid key), max-pooled over each key block's tokens; then the max over the block's
    probe tokens, and each row divided by its sum over key blocks. With `probe_tokens = block_size` this is
    `seer_kernels.attention_ground_truth`, except that padding queries are skipped here (the ground truth counts
    a padding token as a query that attends to itself). A row without a valid probe token is all zeros.

    `seer_kernels.probe_ground_truth`: a fused Triton kernel on CUDA, chunked PyTorch elsewhere (or with
    `kernel="pytorch"`); neither reads back to the host, so it can be captured in a CUDA graph.

    Args:
        query: `[B, Hq, L, D]` post-RoPE queries (the attention kernel's layout).
        key: `[B, Hkv, L, D]` post-RoPE keys, Hq a multiple of Hkv (grouped-query attention).
        block_size: Tokens per block.
        probe_tokens: Probe tokens per query block, r: divides `block_size`. Default 1 (the block's last token).
        document_ids: Optional int `[B, L]`: a token attends only to keys with its own id.
        valid: Optional bool `[B, L]`, False for padding tokens (neither probes nor keys).
        sm_scale: Softmax scale, default `1 / sqrt(D)` (as the attention kernels).
        kernel: `"auto"`, `"pytorch"` or `"triton"` (`seer_kernels.KERNELS`).

    Returns:
        float32 `[B, Hq, nB, nB]`; rows sum to 1 (or are zero), zero wherever no probe token may attend.
    """
    return seer_kernels.probe_ground_truth(
        query, key, block_size=block_size, probe_tokens=probe_tokens, document_ids=document_ids,
        valid=None if valid is None else valid.bool(), sm_scale=sm_scale, kernel=kernel,
    )
