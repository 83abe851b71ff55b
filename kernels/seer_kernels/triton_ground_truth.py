"""Fused ground-truth kernel: the block-max-pooled attention map without an L x L/block scratch buffer.

For row r and key block j the pooled value is exp(m_rj - lse_r), with m_rj the largest score of row r inside
block j; the entry for query block i is the max of that over the rows of block i. So one program per
(batch, query head, query block) -- or per few query blocks, for small blocks, see
`triton_tuning.KERNEL_OPTIONS["gt"]["ROWS"]` -- does:
- pass 1 (skipped when the caller already has the row log-sum-exps): QK^T with the online max/sum only, no PV;
- pass 2: QK^T again, the row maxima inside each key block combined with the now-known lse in registers, and
  the max over the block's rows written straight into the pooled map.
Memory is the pooled map `[B, Hq, nQ, nB]` itself; the row normalisation is an in-place division afterwards.

Layers: `_ground_truth_kernel`, the launcher `ground_truth_forward`, the autograd function
`AttentionWithGroundTruth` (dense output with backward, plus the map from the forward's log-sum-exp) and
`ground_truth` (the map alone); the public ops in `seer_kernels` check the inputs and call the last two. The
probe kernel (`triton_probe`) runs the same two passes (`_row_lse`, `_pool_rows`) on a few rows per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import document_block_overlap, num_blocks
from .triton_backward import sparse_attention_backward
from .triton_block_lists import block_lists
from .triton_common import (
    LOG2E,
    head_pointer,
    input_precision,
    last_dim_contiguous,
    load_rows,
    prepare_documents,
    row_pointers,
)
from .triton_forward import sparse_attention_forward
from .triton_tuning import TileConfig, host_descriptor, kernel_options, launch


@triton.jit
def _tile_scores(
    q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, row0, seq_len, stride_kl,
    MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Unscaled scores `[rows, BLOCK_N]` of the query rows against keys row0.. (K through `load_rows`); when
    MASKED, -inf where the causal/document mask, a padding key (VALID false, when HAS_VALID) or the end of the
    sequence forbids the pair."""
    offs_n = row0 + tl.arange(0, BLOCK_N)
    k = load_rows(k_base, desc_b, desc_h, row0, offs_n, stride_kl, seq_len, BLOCK_N, HEAD_DIM, TMA, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
        if HAS_DOCS:
            doc_k = tl.load(DOC + doc_base + offs_n, mask=offs_n < seq_len, other=0)
            allowed = allowed & (doc_q[:, None] == doc_k[None, :])
        if HAS_VALID:
            allowed = allowed & (tl.load(VALID + doc_base + offs_n, mask=offs_n < seq_len, other=0) != 0)[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
    return qk


@triton.jit
def _lse_tiles(
    m_i, l_i, q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base,
    t_start, t_end, seq_len, stride_kl, scale_log2,
    MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Pass 1: online max / sum of exp2 over key tiles [t_start, t_end); no P V. K comes through `load_rows`."""
    for t in range(t_start, t_end):
        qk = _tile_scores(q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, t * BLOCK_N, seq_len,
                          stride_kl, MASKED, HAS_DOCS, HAS_VALID, BLOCK_N, HEAD_DIM, PRECISION, TMA)
        if MASKED:
            qk = qk * scale_log2
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            x = qk - m_use[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_use = m_new
            x = qk * scale_log2 - m_use[:, None]
        l_ij = tl.sum(tl.math.exp2(x), 1)
        l_i = l_i * tl.math.exp2(m_i - m_use) + l_ij
        m_i = m_new
    return m_i, l_i


@triton.jit
def _flush_pooled(row_max, lse, row_ok, out_rows, j0, n_valid,
                  QB: tl.constexpr, QROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Per-row block maxima `[QB * QROWS, CHUNK]` of key blocks j0.. -> pooled values, the max over each output
    row's QROWS consecutive tile rows, stored into the QB output rows (`out_rows`: pointers `[QB]`) for the first
    n_valid blocks."""
    vals = tl.where(row_ok[:, None], tl.math.exp2(row_max - lse[:, None]), 0.0)
    pooled = tl.max(tl.reshape(vals, [QB, QROWS, CHUNK]), 1)
    cols = tl.arange(0, CHUNK)
    tl.store(out_rows[:, None] + j0 + cols[None, :], pooled, mask=(cols < n_valid)[None, :])


@triton.jit
def _pool_blocks(
    q, lse, offs_m, row_ok, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, out_rows,
    g_start, g_end, n_blocks, seq_len, stride_kl, scale_log2,
    MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    QB: tl.constexpr,
    QROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Pass 2: pooled values of the key blocks in groups [g_start, g_end), written to the output rows: the tile's
    QB * QROWS rows are QB output rows of QROWS rows each (a query block's rows, or its probe tokens).

    A group is what one step reads: one key block in BLOCK // BLOCK_N tiles, or two key blocks in one tile of
    BLOCK_N = 2 * BLOCK. The max over rows crosses warps (shared memory and a barrier), so it is not done per
    group: the per-row maxima of CHUNK consecutive key blocks are collected in registers and reduced together.
    """
    KB: tl.constexpr = 2 if BLOCK_N > BLOCK else 1  # key blocks per group
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N if BLOCK_N < BLOCK else 1  # tiles per group
    ROWS: tl.constexpr = QB * QROWS
    CHUNK: tl.constexpr = 16
    slots = tl.arange(0, CHUNK)
    row_max = tl.full([ROWS, CHUNK], float("-inf"), dtype=tl.float32)
    for g in range(g_start, g_end):
        slot = ((g - g_start) * KB) % CHUNK
        if KB == 2:
            qk = _tile_scores(q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, g * BLOCK_N, seq_len,
                              stride_kl, MASKED, HAS_DOCS, HAS_VALID, BLOCK_N, HEAD_DIM, PRECISION, TMA)
            # [ROWS, 2]: the row maxima of the tile's two key blocks.
            best0, best1 = tl.split(tl.max(tl.reshape(qk, [ROWS, 2, BLOCK]), 2))
            # The scale is positive, so it commutes with the max: one multiply per row instead of per score.
            row_max = tl.where(slots[None, :] == slot, (best0 * scale_log2)[:, None], row_max)
            row_max = tl.where(slots[None, :] == slot + 1, (best1 * scale_log2)[:, None], row_max)
        else:
            best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
            for s in tl.static_range(SPLIT_N):
                qk = _tile_scores(q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base,
                                  g * BLOCK + s * BLOCK_N, seq_len, stride_kl, MASKED, HAS_DOCS, HAS_VALID, BLOCK_N,
                                  HEAD_DIM, PRECISION, TMA)
                best = tl.maximum(best, tl.max(qk, 1))
            row_max = tl.where(slots[None, :] == slot, (best * scale_log2)[:, None], row_max)
        if slot + KB == CHUNK:
            j0 = (g + 1) * KB - CHUNK
            _flush_pooled(row_max, lse, row_ok, out_rows, j0, tl.minimum(n_blocks - j0, CHUNK), QB, QROWS, CHUNK)
    n_left = ((g_end - g_start) * KB) % CHUNK
    if n_left > 0:
        j0 = g_end * KB - n_left
        _flush_pooled(row_max, lse, row_ok, out_rows, j0, tl.minimum(n_blocks - j0, n_left), QB, QROWS, CHUNK)


@triton.jit
def _row_lse(
    q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, start, free, end, seq_len, stride_kl, scale_log2,
    ALL_MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Pass 1 over a tile's rows: each row's log2-sum-exp2 of its allowed keys, below `end`. With ALL_MASKED
    (documents or padding) every key tile from `start` is masked; otherwise the keys before `free` are allowed for
    every row and read without a mask. A row that allows no key gets +inf, so that exp2(best - lse) stays 0
    instead of NaN before it is dropped."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if ALL_MASKED:
        m_i, l_i = _lse_tiles(
            m_i, l_i, q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base,
            start // BLOCK_N, tl.cdiv(end, BLOCK_N), seq_len, stride_kl, scale_log2,
            True, HAS_DOCS, HAS_VALID, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
    else:
        m_i, l_i = _lse_tiles(
            m_i, l_i, q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base,
            0, free // BLOCK_N, seq_len, stride_kl, scale_log2,
            False, HAS_DOCS, HAS_VALID, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
        m_i, l_i = _lse_tiles(
            m_i, l_i, q, offs_m, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base,
            free // BLOCK_N, tl.cdiv(end, BLOCK_N), seq_len, stride_kl, scale_log2,
            True, HAS_DOCS, HAS_VALID, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
    return tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))


@triton.jit
def _pool_rows(
    q, lse, offs_m, row_ok, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, out_rows,
    start, free, end, n_blocks, seq_len, stride_kl, scale_log2,
    ALL_MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    QB: tl.constexpr,
    QROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Pass 2 over a tile's rows (`_pool_blocks`) for the key groups below `end`, split as `_row_lse` splits its
    key tiles: from `start`, masked, with ALL_MASKED; otherwise unmasked before `free` and masked after."""
    G: tl.constexpr = BLOCK_N if BLOCK_N > BLOCK else BLOCK  # tokens per pass-2 group
    if ALL_MASKED:
        _pool_blocks(
            q, lse, offs_m, row_ok, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, out_rows,
            start // G, tl.cdiv(end, G), n_blocks, seq_len, stride_kl, scale_log2,
            True, HAS_DOCS, HAS_VALID, QB, QROWS, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
    else:
        _pool_blocks(
            q, lse, offs_m, row_ok, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, out_rows,
            0, free // G, n_blocks, seq_len, stride_kl, scale_log2,
            False, HAS_DOCS, HAS_VALID, QB, QROWS, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
        _pool_blocks(
            q, lse, offs_m, row_ok, doc_q, k_base, desc_b, desc_h, DOC, VALID, doc_base, out_rows,
            free // G, tl.cdiv(end, G), n_blocks, seq_len, stride_kl, scale_log2,
            True, HAS_DOCS, HAS_VALID, QB, QROWS, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )


@triton.jit
def _ground_truth_kernel(
    Q, K, LSE, OUT,  # noqa: N803
    Q_BLOCKS, OUT_ROWS, FIRST_KB, DOC,
    scale_log2,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_ob, stride_oh, stride_or,
    seq_len, n_blocks, n_heads_q, group,
    HAS_DOCS: tl.constexpr,
    HAS_LSE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """One program: QB query blocks (consecutive entries of the descending Q_BLOCKS list) of one head, as one
    tile of QB * BLOCK rows, so that small blocks still make wgmma-sized tiles. Each query block's pooled row
    goes to its own output row (OUT_ROWS)."""
    # Programs vary fastest so the programs in flight share one KV head's K in L2.
    bh = tl.program_id(1)
    p = tl.program_id(0)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group
    ROWS: tl.constexpr = QB * BLOCK

    sub = tl.arange(0, QB)
    m_blks = tl.load(Q_BLOCKS + p * QB + sub)  # descending: the first is the highest
    out_rows = tl.load(OUT_ROWS + p * QB + sub)
    m_hi = tl.max(m_blks, 0)
    m_lo = tl.min(m_blks, 0)
    r = tl.arange(0, ROWS)
    # Row r belongs to query block m_blks[r // BLOCK].
    if QB == 1:
        offs_m = m_hi * BLOCK + r
    elif QB == 2:
        offs_m = tl.where(r < BLOCK, m_hi, m_lo) * BLOCK + r % BLOCK
    else:
        offs_m = tl.sum(tl.where((r // BLOCK)[:, None] == sub[None, :], m_blks[None, :], 0), 1) * BLOCK + r % BLOCK
    row_ok = offs_m < seq_len
    q = tl.load(
        row_pointers(head_pointer(Q, b, h, stride_qb, stride_qh), offs_m, stride_ql, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    if TMA:
        k_base = K
    else:
        k_base = head_pointer(K, b, hk, stride_kb, stride_kh)
    doc_base = b.to(tl.int64) * seq_len
    if HAS_DOCS:
        doc_q = tl.load(DOC + doc_base + offs_m, mask=row_ok, other=-1)
        # Key blocks before the lowest query block's first one share no document with any row: they stay 0.
        start = tl.load(FIRST_KB + b.to(tl.int64) * n_blocks + m_lo) * BLOCK
    else:
        doc_q = offs_m
        start = 0
    # Keys before the lowest query block are allowed for every row (no docs): the unmasked part.
    free = m_lo * BLOCK
    end = (m_hi + 1) * BLOCK

    if HAS_LSE:
        lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    else:
        # Every real row allows at least itself; rows past the end (no key only with document ids) get +inf.
        lse = _row_lse(
            q, offs_m, doc_q, k_base, b, hk, DOC, DOC, doc_base, start, free, end, seq_len, stride_kl, scale_log2,
            HAS_DOCS, HAS_DOCS, False, ROWS, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )

    out_ptrs = head_pointer(OUT, b, h, stride_ob, stride_oh) + out_rows.to(tl.int64) * stride_or
    _pool_rows(
        q, lse, offs_m, row_ok, doc_q, k_base, b, hk, DOC, DOC, doc_base, out_ptrs,
        start, free, end, n_blocks, seq_len, stride_kl, scale_log2,
        HAS_DOCS, HAS_DOCS, False, QB, BLOCK, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
    )

def _first_key_blocks(docs: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 `[B, nB]`: for each query block, the first key block that can share a document with it."""
    overlap = document_block_overlap(docs, block_size)  # [B, nB, nB], the diagonal is always True
    return overlap.int().argmax(-1).to(torch.int32).contiguous()


def ground_truth_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    query_blocks: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Launch the ground-truth kernel and normalise the rows.

    Args:
        q: `[B, Hq, L, D]`; k: `[B, Hkv, L, D]` (last dim contiguous).
        document_ids: int32 `[B, L]` contiguous, or None.
        query_blocks: int64 `[nQ]` (None: all blocks).
        lse: optional float32 `[B, Hq, L]` base-2 row log-sum-exps from `sparse_attention_forward` with all
            causal blocks; when given, pass 1 is skipped.
        out: optional float32 `[B, Hq, nQ, nB]` to fill (entries the kernel does not reach are zeroed here).
    Returns:
        float32 `[B, Hq, nQ, nB]`, rows summing to 1.
    """
    bsz, hq, seq_len, dim = q.shape
    nb = num_blocks(seq_len, block_size)
    if query_blocks is None:
        query_blocks = torch.arange(nb, device=q.device)
    query_blocks = query_blocks.to(device=q.device, dtype=torch.int64)
    if query_blocks.numel():
        in_range = (query_blocks.min() >= 0) & (query_blocks.max() < nb)
        if query_blocks.is_cuda:
            # Checked on the device: a host-side check would stall the stream once per layer and step.
            torch._assert_async(in_range, f"query_blocks must lie in [0, {nb})")
        elif not bool(in_range):
            raise ValueError(f"query_blocks must lie in [0, {nb})")
    nq = query_blocks.numel()
    if out is None:
        out = torch.empty(bsz, hq, nq, nb, dtype=torch.float32, device=q.device)
    out.zero_()
    if nq == 0:
        return out
    # Longest rows first (a causal row i costs i + 1 key blocks); each program takes QB consecutive entries
    # (padded by repeating the last: the repeat rewrites the same values) and knows their output rows.
    opts = kernel_options("gt", k)
    qb = max(1, opts.pop("ROWS") // block_size)
    order = torch.argsort(query_blocks, descending=True)
    n_programs = triton.cdiv(nq, qb)
    pad = n_programs * qb - nq
    if pad:
        order = torch.cat([order, order[-1:].expand(pad)])
    blocks_sorted = query_blocks[order].to(torch.int32).contiguous()
    out_rows = order.to(torch.int32).contiguous()
    first = _first_key_blocks(document_ids, block_size) if document_ids is not None else out_rows
    args = (
        q, host_descriptor(k, "BLOCK_N") if opts["TMA"] else k, lse if lse is not None else out, out,
        blocks_sorted, out_rows, first, document_ids if document_ids is not None else out_rows,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, nb, hq, hq // k.shape[1],
    )
    kwargs = dict(
        HAS_DOCS=document_ids is not None,
        HAS_LSE=lse is not None,
        BLOCK=block_size,
        QB=qb,
        HEAD_DIM=dim,
        PRECISION=input_precision(q.dtype),
        **opts,
    )
    launch(_ground_truth_kernel, "gt", block_size, seq_len, lambda meta: (n_programs, bsz * hq), args, kwargs, config)
    out.div_(out.sum(-1, keepdim=True))
    return out


def _all_blocks(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool `[B, Hq, nB, nB]` of ones for queries `q [B, Hq, L, D]`: every causal block (the lists drop the rest)."""
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    return torch.ones(bsz, hq, nb, nb, dtype=torch.bool, device=q.device)


class AttentionWithGroundTruth(torch.autograd.Function):
    """`seer_kernels.attention_with_ground_truth` on the GPU kernels; inputs are checked by that function.

    Dense causal attention (all causal blocks) whose forward also yields the pooled map from its lse:
    forward(q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]`, block_size, document_ids int `[B, L]` or None, sm_scale float,
    query_blocks int64 `[nQ]` or None) -> (out `[B, Hq, L, D]`, float32 map `[B, Hq, nQ, nB]`, no gradient).
    """

    @staticmethod
    def forward(ctx, q, k, v, block_size, document_ids, sm_scale, query_blocks):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        docs = prepare_documents(document_ids, q)
        kv_idx, kv_cnt = block_lists(_all_blocks(q, block_size), document_ids=docs, block_size=block_size)
        out, lse = sparse_attention_forward(
            q, k, v, kv_idx, kv_cnt, block_size=block_size, sm_scale=sm_scale, document_ids=docs
        )
        gt = ground_truth_forward(
            q, k, block_size=block_size, sm_scale=sm_scale, document_ids=docs, query_blocks=query_blocks, lse=lse
        )
        ctx.mark_non_differentiable(gt)
        # The block lists are rebuilt in backward rather than kept on ctx, where gradient checkpointing could not
        # drop them (see block_sparse.py).
        ctx.save_for_backward(q, k, v, out, lse, docs)
        ctx.block_size = block_size
        ctx.sm_scale = sm_scale
        return out, gt

    @staticmethod
    def backward(ctx, dout, _dgt):
        q, k, v, out, lse, docs = ctx.saved_tensors
        full = _all_blocks(q, ctx.block_size)
        kv_idx, kv_cnt = block_lists(full, document_ids=docs, block_size=ctx.block_size)
        q_idx, q_cnt = block_lists(full, document_ids=docs, block_size=ctx.block_size, transpose=True)
        dq, dk, dv = sparse_attention_backward(
            dout, q, k, v, out, lse, kv_idx, kv_cnt, q_idx, q_cnt,
            block_size=ctx.block_size, sm_scale=ctx.sm_scale, document_ids=docs,
        )
        return dq, dk, dv, None, None, None, None


@torch.no_grad()
def ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    query_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`seer_kernels.attention_ground_truth` on the Triton kernel; inputs are checked by that function.

    Args:
        q: `[B, Hq, L, D]`; k: `[B, Hkv, L, D]`.
        block_size: tokens per block; sm_scale: softmax scale.
        document_ids: optional int `[B, L]`.
        query_blocks: optional int64 `[nQ]` (None: all blocks).
    Returns:
        float32 `[B, Hq, nQ, nB]`, rows summing to 1.
    """
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    return ground_truth_forward(
        q,
        k,
        block_size=block_size,
        sm_scale=sm_scale,
        document_ids=prepare_documents(document_ids, q),
        query_blocks=query_blocks,
    )
