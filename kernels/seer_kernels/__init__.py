"""Attention ops for SeerAttention: block-sparse attention and the block-max-pooled ground truth.

Layout follows transformers: `q [B, Hq, L, D]`, `k, v [B, Hkv, L, D]` with `Hq % Hkv == 0` (GQA; K/V are never
repeated in memory). `nB = ceil(L / block_size)`. `document_ids [B, L]` (int, optional): a query attends to a
key iff the key is not later and both carry the same id (packed sequences; padding gets an id of its own).

Each op has two backends: `"reference"` (pure PyTorch, `seer_kernels.naive`) and `"triton"`; `"auto"` picks
Triton for CUDA tensors and the reference otherwise. Within `"triton"`, Hopper GPUs at head_dim 128 run the
sparse forward and dQ as warp-specialized Gluon kernels (`gluon_attention`; `SEER_KERNELS_GLUON=0` turns them off).
"""

from __future__ import annotations

import torch

from . import naive
from .indexing import block_mask_to_indices, causal_block_mask, document_ids_from_cu_seqlens, num_blocks

__all__ = [
    "attention_ground_truth",
    "attention_with_ground_truth",
    "block_mask_to_indices",
    "block_sparse_attention",
    "causal_block_mask",
    "document_ids_from_cu_seqlens",
    "num_blocks",
]

_BACKENDS = ("auto", "reference", "triton")


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return q.is_cuda
    return backend == "triton"


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
    split_long_columns: bool | None = None,
) -> torch.Tensor:
    """Exact causal attention restricted to the kept (query block, key block) pairs, with backward.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        v: `[B, Hkv, L, D]`.
        block_mask: bool `[B, Hq, nB, nB]`, row = query block, column = key block; entries above the diagonal
            are ignored. Inside kept blocks the token-level causal and document masks still apply.
        block_size: tokens per block (64 or 128 for the Triton kernels).
        document_ids: optional int `[B, L]`; keys of another document are masked.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        backend: `"auto"`, `"reference"` or `"triton"`.
        split_long_columns: Triton backward only: cut the dK/dV work of key blocks kept by many query blocks
            into segments spread over the GPU (worth it when a few columns are long, e.g. a sink block every row
            keeps; it costs time on evenly spread masks). None: `triton_attention.KERNEL_OPTIONS` decides (off).
    Returns:
        `[B, Hq, L, D]` in q's dtype. A query row with no allowed key gives zeros.
    """
    if _use_triton(backend, q):
        from .triton_attention import block_sparse_attention as impl

        return impl(
            q, k, v, block_mask, block_size=block_size, document_ids=document_ids, sm_scale=sm_scale,
            split_long_columns=split_long_columns,
        )
    return naive.block_sparse_attention(q, k, v, block_mask, block_size=block_size, document_ids=document_ids,
                                        sm_scale=sm_scale)


def attention_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    query_blocks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-max-pooled, row-normalised attention probabilities (the gate's training target). No gradient.

    For query block i and key block j: the max over rows r of block i and keys c of block j of the row's real
    (causal, document-masked) attention probability softmax_r(c); each row of the result is then divided by
    its sum over j. Keys that are not allowed contribute 0.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        block_size: tokens per block.
        document_ids: optional int `[B, L]`.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        query_blocks: optional int64 `[nQ]`, the query blocks to compute (None: all, `nQ = nB`).
        backend: `"auto"`, `"reference"` or `"triton"`.
    Returns:
        float32 `[B, Hq, nQ, nB]`; row n belongs to query block `query_blocks[n]`.
    """
    if _use_triton(backend, q):
        from .triton_ground_truth import attention_ground_truth as impl
    else:
        impl = naive.attention_ground_truth
    return impl(
        q, k, block_size=block_size, document_ids=document_ids, sm_scale=sm_scale, query_blocks=query_blocks
    )


def attention_with_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    query_blocks: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention output and its ground truth from one forward.

    Args:
        q: `[B, Hq, L, D]`.
        k: `[B, Hkv, L, D]`, `Hq % Hkv == 0`.
        v: `[B, Hkv, L, D]`.
        block_size: tokens per block of the ground truth.
        document_ids: optional int `[B, L]`.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        query_blocks: optional int64 `[nQ]` for the ground truth (None: all query blocks).
        backend: `"auto"`, `"reference"` or `"triton"`.
    Returns:
        `(out, ground_truth)`: `out [B, Hq, L, D]` in q's dtype (differentiable w.r.t. q, k, v) and float32
        `ground_truth [B, Hq, nQ, nB]` as in `attention_ground_truth` (no gradient).
    """
    if _use_triton(backend, q):
        from .triton_ground_truth import attention_with_ground_truth as impl
    else:
        impl = naive.attention_with_ground_truth
    return impl(
        q,
        k,
        v,
        block_size=block_size,
        document_ids=document_ids,
        sm_scale=sm_scale,
        query_blocks=query_blocks,
    )
