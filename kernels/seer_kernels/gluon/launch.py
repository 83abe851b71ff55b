"""Host launchers of the Gluon kernels: `gluon_attention_forward`, `gluon_attention_dq`, `gluon_attention_dkdv`.

Same contracts as the Triton launchers they stand in for (`triton_forward.sparse_attention_forward`, the dQ and
dK/dV parts of `triton_backward.sparse_attention_backward`), for inputs that pass `gluon_supported`. The kernels
address Q/K/V and the outputs as 2-D `[B * H * L, D]` row tensors through TMA descriptors.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..indexing import num_blocks
from ..triton_common import LOG2E
from .dkdv import _gluon_sparse_dkdv_kernel
from .dq import _gluon_sparse_dq_kernel
from .forward import _gluon_sparse_fwd_kernel
from .settings import CONSUMER_REGS, DKDV_CONSUMER_REGS, DKDV_STAGES, ROWS, program_items, rows_collapse


def _row_descriptor(t: torch.Tensor, rows: int):
    """A 2-D `[B * H * L, D]` TMA descriptor of `t` with `[rows, D]` tiles."""
    dim = t.shape[3]
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, dim], dtype)
    return TensorDescriptor(t, [t.shape[0] * t.shape[1] * t.shape[2], dim], [dim, 1], [rows, dim], layout)


def _launch_registers(block_size: int) -> dict:
    """Block 64 runs one consumer warpgroup (232 registers) and the producer (24): a 128-register launch cap
    lets two programs share a multiprocessor, whose warpgroups then overlap like block 128's two consumers."""
    return {"maxnreg": 128} if block_size == 64 else {}


def _check_output(t: torch.Tensor, like: torch.Tensor, name: str) -> None:
    """Outputs are written through row descriptors: same shape and dtype as `like`, rows collapsible."""
    if t.shape != like.shape or t.dtype != like.dtype or not rows_collapse(t):
        raise ValueError(f"{name} must be a contiguous {tuple(like.shape)} {like.dtype} tensor for the Gluon kernels")


def gluon_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    items: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Gluon forward (contract of `triton_forward.sparse_attention_forward`, no documents).

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]`, passing `gluon_supported`.
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]` (`block_mask_to_indices`).
        block_size: tokens per block (64 or 128); sm_scale: softmax scale.
        out, lse: optional preallocated outputs (contiguous `[B, Hq, L, D]` like q; float32 `[B, Hq, L]`).
        items: query blocks per program (see `program_items`; default `ITEMS_PER_PROGRAM`).
    Returns:
        `(out, lse)`, lse in base 2, +inf for rows with no allowed key.
    """
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device) if lse is None else lse
    _check_output(out, q, "out")
    items = program_items("fwd", items, block_size, q.shape[-1])
    _gluon_sparse_fwd_kernel[(triton.cdiv(nb, items), bsz * hq)](
        _row_descriptor(q, ROWS), _row_descriptor(k, block_size), _row_descriptor(v, block_size),
        _row_descriptor(out, ROWS), lse, kv_indices, kv_counts,
        sm_scale * LOG2E, seq_len, nb, hq, hq // k.shape[1],
        CONSUMER_REGS=CONSUMER_REGS, ITEMS=items, num_warps=4, **_launch_registers(block_size),
    )
    return out, lse


def gluon_attention_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    dq: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    items: int | None = None,
) -> torch.Tensor:
    """Launch the Gluon dQ kernel into `dq` and `delta` (the delta and dQ parts of
    `triton_backward.sparse_attention_backward`).

    Args:
        q, out, dout, dq: `[B, Hq, L, D]` (out, dq contiguous); k, v: `[B, Hkv, L, D]`; all passing
            `gluon_supported`.
        lse: float32 `[B, Hq, L]` from the forward; delta: float32 `[B, Hq, L]`, written: rowsum(out * dout)
            (0 for query blocks that kept nothing), which the dK/dV kernels read.
        kv_indices / kv_counts: the forward's block lists.
        block_size: tokens per block (64 or 128); sm_scale: softmax scale.
        items: query blocks per program (see `program_items`; default `ITEMS_PER_PROGRAM`).
    Returns:
        `dq`.
    """
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    _check_output(dq, q, "dq")
    _check_output(out, q, "out")
    items = program_items("dq", items, block_size, q.shape[-1])
    _gluon_sparse_dq_kernel[(triton.cdiv(nb, items), bsz * hq)](
        _row_descriptor(q, ROWS), _row_descriptor(k, block_size), _row_descriptor(v, block_size),
        _row_descriptor(dout, ROWS), _row_descriptor(dq, ROWS), out, lse, delta, kv_indices, kv_counts,
        sm_scale * LOG2E, sm_scale, seq_len, nb, hq, hq // k.shape[1],
        CONSUMER_REGS=CONSUMER_REGS, ITEMS=items, num_warps=4, **_launch_registers(block_size),
    )
    return dq


def gluon_attention_dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_indices: torch.Tensor,
    q_counts: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Gluon dK/dV kernel into `dk`, `dv` (the dK/dV part of `triton_backward.sparse_attention_backward`).

    Args:
        q, dout: `[B, Hq, L, D]`; k, v, dk, dv: `[B, Hkv, L, D]` (dk, dv contiguous); all passing `gluon_supported`.
        lse, delta: float32 `[B, Hq, L]` (forward's base-2 lse; rowsum(out * dout)).
        q_indices / q_counts: the transposed block lists (`block_mask_to_indices(..., transpose=True)`).
        block_size: tokens per block (64 or 128); sm_scale: softmax scale.
        stages: query tiles in flight per program (default `DKDV_STAGES`).
    Returns:
        `(dk, dv)`.
    """
    bsz, hq, seq_len, _ = q.shape
    hkv = k.shape[1]
    nb = num_blocks(seq_len, block_size)
    _check_output(dk, k, "dk")
    _check_output(dv, v, "dv")
    group = hq // hkv
    _gluon_sparse_dkdv_kernel[(nb, bsz * hkv)](
        _row_descriptor(q, ROWS), _row_descriptor(k, ROWS), _row_descriptor(v, ROWS), _row_descriptor(dout, ROWS),
        _row_descriptor(dk, ROWS), _row_descriptor(dv, ROWS), lse, delta, q_indices, q_counts,
        sm_scale * LOG2E, sm_scale, seq_len, nb, hq, hkv, group,
        CONSUMER_REGS=DKDV_CONSUMER_REGS, NUM_WG=block_size // ROWS, GROUP_P2=triton.next_power_of_2(group),
        STAGES=stages or DKDV_STAGES, num_warps=4, **_launch_registers(block_size),
    )
    return dk, dv
