"""What every Triton attention kernel shares: head and row addressing, tile loads, and the host-side conventions.

Tensors are `[B, H, L, D]` with the last dim contiguous (other strides free); heads are addressed with 64-bit
offsets so that large tensors stay in range. Scores are kept in base 2 (`qk * sm_scale * log2(e)`) so the softmax
uses exp2; the saved log-sum-exp is in the same units.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def input_precision(dtype: torch.dtype) -> str:
    """The `tl.dot` input precision for inputs of `dtype`.

    float32 inputs get true float32 products (tf32 would lose ~3 digits); bf16/fp16 ignore the setting.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x`, or a contiguous copy when its last dim is strided (the kernels need unit stride there)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def prepare_documents(document_ids: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """Document ids as the kernels read them.

    Args:
        document_ids: int `[B, L]` or None.
        q: the query tensor (gives the device).
    Returns:
        int32 contiguous `[B, L]` on q's device, or None.
    """
    if document_ids is None:
        return None
    return document_ids.to(device=q.device, dtype=torch.int32).contiguous()


@triton.jit
def head_pointer(X, b, h, stride_b, stride_h):  # noqa: N803
    """Pointer to head h of batch element b of a `[B, H, ...]` tensor (64-bit offsets: large tensors)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def row_pointers(head, offs, stride_l, HEAD_DIM: tl.constexpr):
    """Pointers `[len(offs), HEAD_DIM]` to rows `offs` of one head (`head_pointer`)."""
    return head + offs[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def load_rows(src, desc_b, desc_h, row0, offs, stride, seq_len,
              ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """`[ROWS, HEAD_DIM]` tile (rows `offs` = row0 + arange) of one head of Q/K/V/dO.

    `src` is a pointer to the head (TMA 0) or a host-made descriptor of the whole `[B, H, L, D]` tensor (TMA 1).
    Descriptors load rows past the end as zeros; pointer loads do so when CHECK_ROWS."""
    if TMA:
        tile = src.load([desc_b, desc_h, row0, 0]).reshape([ROWS, HEAD_DIM])
    elif CHECK_ROWS:
        tile = tl.load(row_pointers(src, offs, stride, HEAD_DIM), mask=(offs < seq_len)[:, None], other=0.0)
    else:
        tile = tl.load(row_pointers(src, offs, stride, HEAD_DIM))
    return tile
