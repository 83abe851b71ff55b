"""Turning block masks into the per-row key-block lists that the kernels walk.

A block mask is `bool [B, H, nB, nB]` (row = query block, column = key block). Kernels do not scan a whole
row of it: each program reads a dense, ascending list of the key blocks it must visit plus a count, so work is
proportional to the number of kept blocks.
"""

from __future__ import annotations

import math

import torch


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of blocks covering `seq_len` tokens (the last one may be partial)."""
    return math.ceil(seq_len / block_size)


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


def causal_block_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """Drop the entries above the diagonal (they are ignored by every op).

    Args:
        block_mask: bool `[B, H, nB, nB]`.
    Returns:
        bool `[B, H, nB, nB]`, lower-triangular.
    """
    nb = block_mask.shape[-1]
    tril = torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril_()
    return block_mask.bool() & tril


def document_block_overlap(document_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Which (query block, key block) pairs can hold a same-document pair of tokens.

    Uses the min/max document id of each block: two blocks whose id ranges do not overlap share no id, so
    the test never drops a pair that has an allowed token pair (it may keep a few that have none, which the
    token-level mask then handles).

    Args:
        document_ids: int `[B, L]`.
        block_size: tokens per block.
    Returns:
        bool `[B, nB, nB]`.
    """
    bsz, seq_len = document_ids.shape
    nb = num_blocks(seq_len, block_size)
    pad = nb * block_size - seq_len
    ids = document_ids.long()
    if pad:
        # Repeat the last id so padding never widens a block's range.
        ids = torch.cat([ids, ids[:, -1:].expand(bsz, pad)], dim=1)
    blocks = ids.view(bsz, nb, block_size)
    lo = blocks.amin(-1)  # [B, nB]
    hi = blocks.amax(-1)
    return (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])


def block_mask_to_indices(
    block_mask: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ascending lists of kept blocks, for the kernels.

    Args:
        block_mask: bool `[B, H, nB, nB]`, row = query block, column = key block; entries above the diagonal
            are ignored.
        document_ids: optional int `[B, L]`; when given (with `block_size`), block pairs that cannot share a
            document are dropped too, which saves the kernels from visiting fully masked tiles.
        block_size: tokens per block, needed with `document_ids`.
        transpose: False -> for each query block the key blocks to visit (forward, dQ);
            True -> for each key block the query blocks that visit it (dK/dV).
    Returns:
        `(indices, counts)`: int32 `[B, H, nB, nB]` with the kept block numbers first in ascending order (the
        rest is filler equal to nB and must not be read), and int32 `[B, H, nB]` with how many are kept.
    """
    mask = causal_block_mask(block_mask)
    if document_ids is not None:
        if block_size is None:
            raise ValueError("block_size is needed with document_ids")
        mask = mask & document_block_overlap(document_ids.to(mask.device), block_size)[:, None]
    if transpose:
        mask = mask.transpose(-1, -2)
    nb = mask.shape[-1]
    cols = torch.arange(nb, device=mask.device, dtype=torch.int32)
    # Kept columns keep their number, dropped ones become nB; sorting puts the kept ones first, ascending.
    keyed = torch.where(mask, cols, torch.full_like(cols, nb))
    indices = torch.sort(keyed, dim=-1).values.to(torch.int32).contiguous()
    counts = mask.sum(-1, dtype=torch.int32).contiguous()
    return indices, counts


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """Document ids `[1, L]` for sequences packed back to back, from cumulative lengths (varlen style).

    Args:
        cu_seqlens: int `[n + 1]`, `0 = c_0 < c_1 < ... < c_n`; document d holds tokens `[c_d, c_{d+1})`.
        seq_len: total length L (default `c_n`); tokens from `c_n` to L are padding, each with an id of its
            own (so a padding token attends only to itself).
    Returns:
        int64 `[1, L]`.
    """
    cu = cu_seqlens.to(torch.int64).flatten()
    if cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must start at 0 and be non-decreasing")
    total = int(cu[-1])
    length = total if seq_len is None else seq_len
    if length < total:
        raise ValueError(f"seq_len {length} is shorter than the packed documents ({total})")
    pos = torch.arange(length, device=cu.device)
    ids = torch.searchsorted(cu[1:], pos, right=True)  # document of each packed token
    n_docs = cu.numel() - 1
    ids = torch.where(pos < total, ids, n_docs + (pos - total))
    return ids[None]

