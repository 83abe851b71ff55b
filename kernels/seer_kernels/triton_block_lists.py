"""Block lists on the GPU: `indexing.block_mask_to_indices` in one Triton launch.

The kernels walk, per row of the block mask, a dense ascending list of kept blocks plus a count. The torch path
builds those lists with a handful of small ops and a sort, a visible share of a sparse forward on a GPU; here one
program per row places the kept blocks with a prefix sum instead. `block_lists` picks the builder by device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import block_mask_to_indices, document_block_overlap
from .triton_common import head_pointer


@triton.jit
def _block_lists_kernel(
    MASK, OVERLAP, IDX, CNT,  # noqa: N803
    stride_mb, stride_mh, stride_mi, stride_mj,
    n_blocks, n_heads,
    HAS_OVERLAP: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    NB_POW2: tl.constexpr,
):
    """One row of `block_mask_to_indices` per program: a prefix sum places the kept blocks first, ascending,
    and the filler (n_blocks) after them. One launch instead of the masking/sorting ops of the torch path."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    j = tl.arange(0, NB_POW2)
    valid = j < n_blocks
    base = head_pointer(MASK, b, h, stride_mb, stride_mh)
    ov_base = OVERLAP + b.to(tl.int64) * n_blocks * n_blocks
    if TRANSPOSE:
        # Row i lists the query blocks j >= i that kept key block i.
        live = valid & (j >= i)
        keep = tl.load(base + j * stride_mi + i * stride_mj, mask=live, other=0) != 0
        if HAS_OVERLAP:
            keep = keep & (tl.load(ov_base + j * n_blocks + i, mask=live, other=0) != 0)
    else:
        live = valid & (j <= i)
        keep = tl.load(base + i * stride_mi + j * stride_mj, mask=live, other=0) != 0
        if HAS_OVERLAP:
            keep = keep & (tl.load(ov_base + i * n_blocks + j, mask=live, other=0) != 0)
    kept = keep.to(tl.int32)
    incl = tl.cumsum(kept, 0)
    cnt = tl.sum(kept, 0)
    # Kept block j goes to slot (kept before it); a dropped one to cnt + (dropped before it).
    pos = tl.where(keep, incl - 1, cnt + j - incl)
    row = bh.to(tl.int64) * n_blocks + i
    tl.store(IDX + row * n_blocks + pos, tl.where(keep, j, n_blocks), mask=valid)
    tl.store(CNT + row, cnt)


def build_block_lists(
    block_mask: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`indexing.block_mask_to_indices` in one Triton launch (same arguments and results).

    Used on CUDA (see `block_lists`); elsewhere, and in the interpreter unless called directly, the torch path is.

    Args:
        block_mask: bool (or uint8) `[B, H, nB, nB]`, row = query block, column = key block.
        document_ids: optional int `[B, L]` (with `block_size`): block pairs that cannot share a document are
            dropped too.
        block_size: tokens per block, needed with `document_ids`.
        transpose: False -> per query block the key blocks; True -> per key block the query blocks.
    Returns:
        `(indices, counts)`: int32 `[B, H, nB, nB]` (kept blocks first, ascending, then filler nB) and int32
        `[B, H, nB]`.
    """
    bsz, heads, nb, _ = block_mask.shape
    mask = block_mask if block_mask.dtype == torch.uint8 else block_mask.to(torch.bool).view(torch.uint8)
    overlap = None
    if document_ids is not None:
        if block_size is None:
            raise ValueError("block_size is needed with document_ids")
        overlap = document_block_overlap(document_ids, block_size).view(torch.uint8).contiguous()
    idx = torch.empty(bsz, heads, nb, nb, dtype=torch.int32, device=mask.device)
    cnt = torch.empty(bsz, heads, nb, dtype=torch.int32, device=mask.device)
    _block_lists_kernel[(nb, bsz * heads)](
        mask, overlap if overlap is not None else mask, idx, cnt,
        mask.stride(0), mask.stride(1), mask.stride(2), mask.stride(3),
        nb, heads,
        HAS_OVERLAP=overlap is not None,
        TRANSPOSE=transpose,
        NB_POW2=triton.next_power_of_2(nb),
        num_warps=4 if nb <= 1024 else 8,
    )
    return idx, cnt


def block_lists(
    block_mask: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists for the kernels: the Triton builder on CUDA, the torch one otherwise.

    Args and returns as `build_block_lists`.
    """
    fn = build_block_lists if block_mask.is_cuda else block_mask_to_indices
    return fn(block_mask, document_ids=document_ids, block_size=block_size, transpose=transpose)

