"""Probe scores: the exact block-pooled attention of a few query tokens per block (`attention.probe_blocks`).

The ground truth the gates learn (`seer_kernels.attention_ground_truth`) max-pools every query token's attention
probabilities over each key block and over the query block, then normalises each row. Probing computes the same
with only `probe_tokens` r of each block's tokens: r / block_size of its cost, and still exact where it looks. A
block whose mass is one rare high logit (a passkey's needle) that a probe token attends to scores high here
whatever the gate has learnt.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .gate import num_blocks

# Logits per chunk (elements, over the batch and every head): 2**27 float32 = 512 MiB, so 131072 tokens with 12
# query heads and one probe token per block take 85 query blocks per chunk and never the full [Hq, nB * r, L] map.
_CHUNK_ELEMENTS = 1 << 27


def probe_positions(
    seq_len: int, block_size: int, probe_tokens: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 `[nB, r]`: the probe tokens of each query block, evenly strided and ending at its last token.

    Block i probes `i * block_size + (block_size // r) * (t + 1) - 1` for t in `0..r-1`, clipped to the last
    token of the sequence (the last block may be partial; a clipped probe repeats the last token, which changes
    no max).

    Args:
        seq_len: Tokens in the sequence.
        block_size: Tokens per block; a multiple of `probe_tokens`.
        probe_tokens: Probe tokens per block, r in `[1, block_size]`.
        device: Where the positions live.
    """
    if not 1 <= probe_tokens <= block_size or block_size % probe_tokens:
        raise ValueError(f"probe_tokens={probe_tokens} must divide block_size={block_size}")
    stride = block_size // probe_tokens
    offsets = stride * torch.arange(1, probe_tokens + 1, device=device) - 1
    starts = torch.arange(num_blocks(seq_len, block_size), device=device) * block_size
    return (starts[:, None] + offsets[None, :]).clamp_max(seq_len - 1)


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
) -> torch.Tensor:
    """The block-max-pooled, row-normalised attention of each query block's probe tokens (`probe_positions`).

    For probe token p: its softmax attention probabilities over the keys it may attend to (key position <= p,
    the same document id, a valid key), max-pooled over each key block's tokens; then the max over the block's
    probe tokens, and each row divided by its sum over key blocks. With `probe_tokens = block_size` this is
    `seer_kernels.attention_ground_truth`, except that padding queries are skipped here (the ground truth counts
    a padding token as a query that attends to itself). A row without a valid probe token is all zeros.

    Plain PyTorch in float32, chunked over query blocks (`_CHUNK_ELEMENTS` logits at a time), with shapes fixed
    by the inputs' and no read back to the host: it can be captured in a CUDA graph.

    Args:
        query: `[B, Hq, L, D]` post-RoPE queries (the attention kernel's layout).
        key: `[B, Hkv, L, D]` post-RoPE keys, Hq a multiple of Hkv (grouped-query attention).
        block_size: Tokens per block.
        probe_tokens: Probe tokens per query block, r: divides `block_size`. Default 1 (the block's last token).
        document_ids: Optional int `[B, L]`: a token attends only to keys with its own id.
        valid: Optional bool `[B, L]`, False for padding tokens (neither probes nor keys).
        sm_scale: Softmax scale, default `1 / sqrt(D)` (as the attention kernels).

    Returns:
        float32 `[B, Hq, nB, nB]`; rows sum to 1 (or are zero), zero wherever no probe token may attend.
    """
    bsz, heads, seq_len, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    nb, r, device = num_blocks(seq_len, block_size), probe_tokens, query.device
    padded = nb * block_size
    positions = probe_positions(seq_len, block_size, r, device)  # [nB, r]
    # Keys padded to whole blocks, so each key block pools one [block_size] slice; the padding is masked below.
    keys = torch.nn.functional.pad(key.float(), (0, 0, 0, padded - seq_len)).transpose(-1, -2)  # [B, Hkv, D, Lp]
    key_pos = torch.arange(padded, device=device)
    key_ok = (key_pos < seq_len).expand(bsz, padded)
    if valid is not None:
        key_ok = key_ok & torch.nn.functional.pad(valid.bool(), (0, padded - seq_len))
    if document_ids is not None:
        # The padded keys' ids never matter (they are masked); -1 keeps them apart anyway.
        key_doc = torch.nn.functional.pad(document_ids.long(), (0, padded - seq_len), value=-1)
    out = torch.zeros(bsz, heads, nb, nb, dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMENTS // (bsz * heads * r * padded))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        # Causal: no probe of blocks b0..b1-1 sees a key past block b1-1; a fixed bound, no read of the data.
        width = b1 * block_size
        rows = positions[b0:b1].reshape(-1)  # [n * r]
        allowed = (key_pos[None, :width] <= rows[:, None]) & key_ok[:, None, :width]  # [B, n * r, width]
        if document_ids is not None:
            allowed = allowed & (document_ids[:, rows, None].long() == key_doc[:, None, :width])
        q = query[:, :, rows].float().reshape(bsz, kv_heads, -1, dim)  # the heads of a KV group stacked on rows
        logits = torch.matmul(q, keys[..., :width]).view(bsz, heads, -1, width).mul_(scale)
        logits.masked_fill_(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # -inf for a probe without any key
        # The max probability in a key block is exp(its max logit - lse): one exp per block instead of per key.
        block_max = logits.view(bsz, heads, -1, b1, block_size).amax(-1)
        probs = torch.exp(block_max - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        if valid is not None:
            probs = probs * valid[:, rows].to(probs.dtype)[:, None, :, None]
        out[:, :, b0:b1, :b1] = probs.view(bsz, heads, b1 - b0, r, b1).amax(3)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
