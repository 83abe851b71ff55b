"""The sparse attention backward: which kernels compute delta, dQ and dK/dV, in what order.

Triton: the delta pass, then dQ (`triton_dq`), then dK/dV (`triton_dkdv`, optionally with long columns split).
On Hopper the warp-specialized Gluon kernels take the parts they support and are faster on
(`gluon.pick_gluon`); the Gluon dQ kernel computes delta itself, since it holds dO's tiles already. Both sides
compute the same functions, so any mix gives the same gradients.
"""

from __future__ import annotations

import torch

from . import gluon
from .triton_common import last_dim_contiguous
from .triton_dkdv import launch_dkdv
from .triton_dq import launch_delta, launch_dq
from .triton_tuning import KERNEL_OPTIONS, TileConfig


def sparse_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    q_indices: torch.Tensor,
    q_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    dq_config: TileConfig | None = None,
    dkdv_config: TileConfig | None = None,
    split_long_columns: bool | None = None,
    use_gluon: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (delta, dQ, dK/dV).

    Args:
        dout: `[B, Hq, L, D]`; q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]` (last dims contiguous).
        out, lse: `[B, Hq, L, D]` and float32 `[B, Hq, L]` as returned by `sparse_attention_forward`.
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]`: per query block, the key blocks;
            q_indices / q_counts: the same shapes, transposed lists (per key block, the query blocks).
        block_size: tokens per block; sm_scale: softmax scale.
        document_ids: int32 `[B, L]` contiguous, or None.
        grads: optional preallocated `(dq, dk, dv)`.
        dq_config, dkdv_config: explicit tile settings of the Triton dQ / dK/dV kernels.
        split_long_columns: cut long dK/dV columns into segments (None: `KERNEL_OPTIONS["dkdv"]`, off).
        use_gluon: compute dQ and dK/dV with the warp-specialized Gluon kernels (None: where `gluon.pick_gluon` finds
            them supported and faster, with `dq_config` / `dkdv_config` unset; dK/dV not with long columns split).
    Returns:
        `(dq, dk, dv)` in the inputs' dtypes: `[B, Hq, L, D]`, `[B, Hkv, L, D]`, `[B, Hkv, L, D]`.
    """
    bsz, hq, seq_len, _ = q.shape
    dout = last_dim_contiguous(dout)
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    delta = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device)
    if split_long_columns is None:
        split_long_columns = bool(KERNEL_OPTIONS["dkdv"].get("SPLIT_LONG_COLUMNS", 0))
    gluon_dq = gluon.pick_gluon(use_gluon, dq_config, q, k, v, block_size, document_ids, dq, dout, out, kind="dq")
    gluon_dkdv = not split_long_columns and gluon.pick_gluon(
        use_gluon, dkdv_config, q, k, v, block_size, document_ids, dk, dv, dout, kind="dkdv"
    )

    if gluon_dq:
        gluon.gluon_attention_dq(
            q, k, v, out, dout, lse, delta, kv_indices, kv_counts, dq, block_size=block_size, sm_scale=sm_scale
        )
    else:
        launch_delta(out, dout, delta)
        launch_dq(
            q, k, v, dout, dq, lse, delta, kv_indices, kv_counts,
            block_size=block_size, sm_scale=sm_scale, document_ids=document_ids, config=dq_config,
        )

    if gluon_dkdv:
        gluon.gluon_attention_dkdv(
            q, k, v, dout, lse, delta, q_indices, q_counts, dk, dv, block_size=block_size, sm_scale=sm_scale
        )
    else:
        launch_dkdv(
            q, k, v, dout, dk, dv, lse, delta, q_indices, q_counts,
            block_size=block_size, sm_scale=sm_scale, split_long_columns=split_long_columns,
            document_ids=document_ids, config=dkdv_config,
        )
    return dq, dk, dv
