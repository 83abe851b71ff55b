"""Sparse attention forward in Triton: the kernel and its host launcher `sparse_attention_forward`.

One program per (batch, query head, query tile) walks the ascending list of key blocks its query block kept (see
`indexing.block_mask_to_indices`) with an online softmax; GQA is native (query head h reads KV head
h // group, K/V are never repeated). Grids put tiles on the fastest axis so that the programs in flight share one
KV head, whose K/V then stay in L2 however scattered the kept blocks.

Masking. Without document ids only the diagonal block needs the token-level mask: a causal list of query block
i holds key blocks <= i, and the one partial block (the last) can only be the diagonal of the last row. Lists are
ascending, so the diagonal is the last entry; the kernel runs the other entries in an unmasked loop and the last
one in a masked loop whether or not it is the diagonal (no branch in the hot loop, one load less before it).
With document ids every tile is masked.

On Hopper the launcher hands the inputs the warp-specialized Gluon forward supports to it instead
(`gluon.pick_gluon`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gluon
from .indexing import num_blocks
from .triton_common import LOG2E, head_pointer, input_precision, load_rows, row_pointers
from .triton_tuning import TileConfig, host_descriptor, kernel_options, launch


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, offs_m, doc_q,
    k_base, v_base, desc_b, desc_h, idx_base, DOC, doc_base,
    t_start, t_end, m_blk, seq_len,
    stride_kl, stride_vl, scale_log2,
    MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Online-softmax accumulation over list entries [t_start, t_end) (in key tiles); K/V come through
    `_load_rows`."""
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)
    for t in range(t_start, t_end):
        n_blk = tl.load(idx_base + t // SPLIT_N)
        row0 = n_blk * BLOCK + (t % SPLIT_N) * BLOCK_N
        offs_n = row0 + offs_n0
        k = load_rows(k_base, desc_b, desc_h, row0, offs_n, stride_kl, seq_len, BLOCK_N, HEAD_DIM, TMA,
                       MASKED and not EVEN_L)
        v = load_rows(v_base, desc_b, desc_h, row0, offs_n, stride_vl, seq_len, BLOCK_N, HEAD_DIM, TMA,
                       MASKED and not EVEN_L)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            qk = qk * scale_log2
            allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
            if HAS_DOCS:
                doc_k = tl.load(DOC + doc_base + offs_n, mask=offs_n < seq_len, other=0)
                allowed = allowed & (doc_q[:, None] == doc_k[None, :])
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing allowed yet has m_new = -inf: subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            x = qk - m_use[:, None]
        else:
            # Every entry is allowed, so the row max is finite; the scale folds into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_use = m_new
            x = qk * scale_log2 - m_use[:, None]
        p = tl.math.exp2(x)
        l_ij = tl.sum(p, 1)
        p_lo = p.to(v.dtype)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + l_ij
        acc = tl.dot(p_lo, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE,  # noqa: N803 (pointer arguments)
    KV_IDX, KV_CNT, DOC,
    scale_log2,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    seq_len, n_blocks, n_heads_q, group,
    HAS_DOCS: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """One program: BLOCK_M query rows of one head, grid `(nB * BLOCK // BLOCK_M, B * Hq)`; writes their output
    rows and base-2 log-sum-exps."""
    SPLIT_M: tl.constexpr = BLOCK // BLOCK_M
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N
    # Tiles vary fastest so the programs in flight share one KV head (its K/V stay in L2 even when the kept
    # blocks are scattered); within a head the last query tiles, which have the most key blocks under a causal
    # mask, go first so the tail of the grid is made of short programs.
    bh = tl.program_id(1)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    m_blk = tile // SPLIT_M
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq_len
    q_ptrs = row_pointers(head_pointer(Q, b, h, stride_qb, stride_qh), offs_m, stride_ql, HEAD_DIM)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = head_pointer(K, b, hk, stride_kb, stride_kh)
        v_base = head_pointer(V, b, hk, stride_vb, stride_vh)
    doc_base = b.to(tl.int64) * seq_len
    if HAS_DOCS:
        doc_q = tl.load(DOC + doc_base + offs_m, mask=row_ok, other=-1)
    else:
        doc_q = offs_m

    row = bh.to(tl.int64) * n_blocks + m_blk
    cnt = tl.load(KV_CNT + row)
    idx_base = KV_IDX + row * n_blocks

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_DOCS:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, offs_m, doc_q, k_base, v_base, b, hk, idx_base, DOC, doc_base,
            0, cnt * SPLIT_N, m_blk, seq_len, stride_kl, stride_vl, scale_log2,
            True, HAS_DOCS, EVEN_L, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
    else:
        # The last entry (the diagonal, when kept) goes through the masked loop whatever its block: masking a
        # block below the diagonal changes nothing, and the loop need not wait for a load of its block number.
        n_off = tl.maximum(cnt - 1, 0)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, offs_m, doc_q, k_base, v_base, b, hk, idx_base, DOC, doc_base,
            0, n_off * SPLIT_N, m_blk, seq_len, stride_kl, stride_vl, scale_log2,
            False, HAS_DOCS, EVEN_L, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, offs_m, doc_q, k_base, v_base, b, hk, idx_base, DOC, doc_base,
            n_off * SPLIT_N, cnt * SPLIT_N, m_blk, seq_len, stride_kl, stride_vl, scale_log2,
            True, HAS_DOCS, EVEN_L, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # +inf for an empty row makes every recomputed probability of that row 0 in the backward.
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = row_pointers(head_pointer(O, b, h, stride_ob, stride_oh), offs_m, stride_ol, HEAD_DIM)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


def sparse_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: TileConfig | None = None,
    use_gluon: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (or the Gluon forward, see `use_gluon`).

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]` (last dim contiguous).
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]` from `block_mask_to_indices`.
        block_size: tokens per block (a power of two >= 16).
        sm_scale: softmax scale.
        document_ids: int32 `[B, L]` contiguous, or None.
        out, lse: optional preallocated outputs (`[B, Hq, L, D]` in q's dtype, float32 `[B, Hq, L]`).
        config: explicit tile settings (default: autotuned on long GPU inputs, else `default_config`).
        use_gluon: run the warp-specialized Gluon forward (`seer_kernels.gluon`); None: when it supports the
            inputs (Hopper, block 64/128, no documents, ...), head_dim is 128 and no Triton `config` is given.
    Returns:
        `(out, lse)`: lse is the base-2 log-sum-exp of the scaled scores, +inf for rows with no allowed key.
    """
    bsz, hq, seq_len, dim = q.shape
    nb = num_blocks(seq_len, block_size)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device)
    if gluon.pick_gluon(use_gluon, config, q, k, v, block_size, document_ids, out):
        return gluon.gluon_attention_forward(
            q, k, v, kv_indices, kv_counts, block_size=block_size, sm_scale=sm_scale, out=out, lse=lse
        )
    opts = kernel_options("fwd", k, v)
    k_in, v_in = (host_descriptor(k, "BLOCK_N"), host_descriptor(v, "BLOCK_N")) if opts["TMA"] else (k, v)
    args = (
        q, k_in, v_in, out, lse,
        kv_indices, kv_counts, document_ids if document_ids is not None else kv_counts,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, nb, hq, hq // k.shape[1],
    )
    kwargs = dict(
        HAS_DOCS=document_ids is not None,
        EVEN_L=seq_len % block_size == 0,
        BLOCK=block_size,
        HEAD_DIM=dim,
        PRECISION=input_precision(q.dtype),
        **opts,
    )
    launch(
        _sparse_fwd_kernel, "fwd", block_size, seq_len,
        lambda meta: (nb * (block_size // meta["BLOCK_M"]), bsz * hq),
        args, kwargs, config,
    )
    return out, lse

