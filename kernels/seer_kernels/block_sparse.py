"""The autograd function of block-sparse attention on the GPU kernels (Triton, with Gluon where it applies).

The forward builds the per-query-block key lists, runs the sparse forward and keeps its output and base-2
log-sum-exp; the backward builds both lists again from the saved block mask (per query block the key blocks, and
transposed, per key block the query blocks) and recomputes the probabilities from the saved log-sum-exp (no L x L
state).

Everything the backward reads goes through `save_for_backward`: gradient checkpointing drops those tensors after
the forward and recomputes them, while a tensor kept as a `ctx` attribute would stay alive with the graph until
the whole backward ends (int32 lists of `[B, Hq, nB, nB]`, four times the bool mask, in every layer at once).
"""

from __future__ import annotations

import torch

from .triton_backward import sparse_attention_backward
from .triton_block_lists import block_lists
from .triton_common import last_dim_contiguous, prepare_documents
from .triton_forward import sparse_attention_forward


class BlockSparseAttention(torch.autograd.Function):
    """`seer_kernels.block_sparse_attention` on the GPU kernels; inputs are checked by that function.

    forward(q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]`, block_mask bool `[B, Hq, nB, nB]` on q's device,
    block_size, document_ids int `[B, L]` or None, sm_scale float, split_long_columns bool or None)
    -> `[B, Hq, L, D]` in q's dtype; backward gives dq, dk, dv.
    """

    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, document_ids, sm_scale, split_long_columns=None):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        docs = prepare_documents(document_ids, q)
        kv_idx, kv_cnt = block_lists(block_mask, document_ids=docs, block_size=block_size)
        out, lse = sparse_attention_forward(
            q, k, v, kv_idx, kv_cnt, block_size=block_size, sm_scale=sm_scale, document_ids=docs
        )
        ctx.save_for_backward(q, k, v, out, lse, block_mask, docs)
        ctx.block_size = block_size
        ctx.sm_scale = sm_scale
        ctx.split_long_columns = split_long_columns
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, block_mask, docs = ctx.saved_tensors
        kv_idx, kv_cnt = block_lists(block_mask, document_ids=docs, block_size=ctx.block_size)
        q_idx, q_cnt = block_lists(block_mask, document_ids=docs, block_size=ctx.block_size, transpose=True)
        dq, dk, dv = sparse_attention_backward(
            dout, q, k, v, out, lse, kv_idx, kv_cnt, q_idx, q_cnt,
            block_size=ctx.block_size, sm_scale=ctx.sm_scale, document_ids=docs,
            split_long_columns=ctx.split_long_columns,
        )
        return dq, dk, dv, None, None, None, None, None
