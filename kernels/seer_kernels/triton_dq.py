"""The dQ half of the Triton backward: the delta pass and the dQ kernel, with their host launchers.

delta_r = sum_d O_rd dO_rd is the row term of the softmax Jacobian (dS = P (dP - delta)); one small pass over O
and dO computes it for the dQ and dK/dV kernels. The dQ kernel mirrors the forward: one program per (batch,
query head, query tile) walks the key blocks its query block kept, recomputes P from the forward's base-2
log-sum-exp and accumulates dQ = sum dS K in registers. As in the forward, only the last list entry goes
through the masked loop when there are no document ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import num_blocks
from .triton_common import LOG2E, head_pointer, input_precision, load_rows, row_pointers
from .triton_tuning import TileConfig, host_descriptor, kernel_options, launch

# Rows per program of the delta pass.
DELTA_ROWS = 64


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,  # noqa: N803
    stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    seq_len, n_heads_q,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """delta_r = sum_d O_rd dO_rd, the row term of the softmax Jacobian."""
    bh = tl.program_id(0)
    b = bh // n_heads_q
    h = bh % n_heads_q
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq_len
    o = tl.load(
        row_pointers(head_pointer(O, b, h, stride_ob, stride_oh), offs_m, stride_ol, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        row_pointers(head_pointer(DO, b, h, stride_db, stride_dh), offs_m, stride_dl, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, offs_m, doc_q,
    k_base, v_base, desc_b, desc_h, idx_base, DOC, doc_base,
    t_start, t_end, seq_len,
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
    """dQ accumulation over list entries [t_start, t_end) (in key tiles); K/V come through `_load_rows`."""
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
        x = qk * scale_log2 - lse[:, None]
        if MASKED:
            allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
            if HAS_DOCS:
                doc_k = tl.load(DOC + doc_base + offs_n, mask=offs_n < seq_len, other=0)
                allowed = allowed & (doc_q[:, None] == doc_k[None, :])
            x = tl.where(allowed, x, float("-inf"))
        p = tl.math.exp2(x)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _sparse_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,  # noqa: N803
    KV_IDX, KV_CNT, DOC,
    scale_log2, sm_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dqb, stride_dqh, stride_dql,
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
    """One program: dQ of BLOCK_M query rows of one head, grid `(nB * BLOCK // BLOCK_M, B * Hq)`, last query
    tiles first as in the forward."""
    SPLIT_M: tl.constexpr = BLOCK // BLOCK_M
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N
    bh = tl.program_id(1)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    m_blk = tile // SPLIT_M
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq_len
    q = tl.load(
        row_pointers(head_pointer(Q, b, h, stride_qb, stride_qh), offs_m, stride_ql, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        row_pointers(head_pointer(DO, b, h, stride_dob, stride_doh), offs_m, stride_dol, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
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
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_DOCS:
        dq = _dq_tiles(
            dq, q, do, lse, delta, offs_m, doc_q, k_base, v_base, b, hk, idx_base, DOC, doc_base,
            0, cnt * SPLIT_N, seq_len, stride_kl, stride_vl, scale_log2,
            True, HAS_DOCS, EVEN_L, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
    else:
        # The last entry (the diagonal, when kept) goes through the masked loop whatever its block: masking a
        # block below the diagonal changes nothing, and the loop need not wait for a load of its block number.
        n_off = tl.maximum(cnt - 1, 0)
        dq = _dq_tiles(
            dq, q, do, lse, delta, offs_m, doc_q, k_base, v_base, b, hk, idx_base, DOC, doc_base,
            0, n_off * SPLIT_N, seq_len, stride_kl, stride_vl, scale_log2,
            False, HAS_DOCS, EVEN_L, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
        dq = _dq_tiles(
            dq, q, do, lse, delta, offs_m, doc_q, k_base, v_base, b, hk, idx_base, DOC, doc_base,
            n_off * SPLIT_N, cnt * SPLIT_N, seq_len, stride_kl, stride_vl, scale_log2,
            True, HAS_DOCS, EVEN_L, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
        )
    dq = dq * sm_scale
    tl.store(
        row_pointers(head_pointer(DQ, b, h, stride_dqb, stride_dqh), offs_m, stride_dql, HEAD_DIM),
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )



def launch_delta(out: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor) -> None:
    """Write delta = rowsum(out * dout).

    Args:
        out, dout: `[B, Hq, L, D]` (last dim contiguous): the forward's output and its gradient.
        delta: float32 `[B, Hq, L]` contiguous, written.
    """
    bsz, hq, seq_len, dim = out.shape
    _bwd_delta_kernel[(bsz * hq, triton.cdiv(seq_len, DELTA_ROWS))](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        seq_len, hq,
        BLOCK_M=DELTA_ROWS,
        HEAD_DIM=dim,
    )


def launch_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dq: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> None:
    """Launch the dQ kernel into `dq`.

    Args:
        q, dout: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]` (last dims contiguous).
        dq: `[B, Hq, L, D]`, written (last dim contiguous).
        lse: float32 `[B, Hq, L]` base-2 log-sum-exp from the forward; delta: float32 `[B, Hq, L]` (`launch_delta`).
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]`: the forward's block lists.
        block_size: tokens per block; sm_scale: softmax scale.
        document_ids: int32 `[B, L]` contiguous, or None.
        config: explicit tile settings (default: autotuned on long GPU inputs, else `default_config`).
    """
    bsz, hq, seq_len, dim = q.shape
    nb = num_blocks(seq_len, block_size)
    options = kernel_options("dq", k, v)
    k_in, v_in = (host_descriptor(k, "BLOCK_N"), host_descriptor(v, "BLOCK_N")) if options["TMA"] else (k, v)
    args = (
        q, k_in, v_in, dout, dq, lse, delta,
        kv_indices, kv_counts, document_ids if document_ids is not None else kv_counts,
        sm_scale * LOG2E, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        seq_len, nb, hq, hq // k.shape[1],
    )
    kwargs = dict(
        HAS_DOCS=document_ids is not None,
        EVEN_L=seq_len % block_size == 0,
        BLOCK=block_size,
        HEAD_DIM=dim,
        PRECISION=input_precision(q.dtype),
        **options,
    )
    launch(
        _sparse_dq_kernel, "dq", block_size, seq_len,
        lambda meta: (nb * (block_size // meta["BLOCK_M"]), bsz * hq),
        args, kwargs, config,
    )
