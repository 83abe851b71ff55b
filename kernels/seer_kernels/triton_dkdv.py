"""The dK/dV half of the Triton backward: the kernels and their host launcher `launch_dkdv`.

One program per (batch, KV head, key tile) walks, for each query head of its group, the query blocks that kept its
key block (the transposed lists of `indexing.block_mask_to_indices`), so dK/dV are accumulated in registers and
written once (no atomics) while K/V stay at their own head count. Tiles are computed transposed (rows: this
program's keys). The diagonal, if kept, is the first entry of a transposed list and the only one that needs the
causal mask when there are no document ids; with document ids every tile is masked.

A key block that many query blocks kept (a sink block, kept by every row) makes one such program run
group * nB steps while the rest of the GPU idles. With `split_long_columns` a work-list kernel cuts the long
lists into segments that persistent programs take from a counter; segments of one tile meet in a float32 scratch
(`_sparse_dkdv_segments_kernel`). It costs time on evenly spread masks, so it is off unless asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import num_blocks
from .triton_common import LOG2E, head_pointer, input_precision, load_rows, row_pointers
from .triton_tuning import (
    TileConfig,
    check_kernel_kwargs,
    default_config,
    host_descriptor,
    kernel_options,
    launch,
    set_descriptor_tiles,
)

# Shortest segment the work list cuts (entries of a group list); shorter lists stay whole.
MIN_SEGMENT = 16


@triton.jit
def _dkdv_step(
    dk, dv, k, v, offs_n, doc_k, q, do, lse, delta, offs_m, DOC, doc_base, seq_len, scale_log2,
    MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One visiting query tile's contribution to dK/dV, in transposed tiles (rows: this program's keys)."""
    qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    x_t = qk_t * scale_log2 - lse[None, :]
    if MASKED:
        allowed = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < seq_len)
        if HAS_DOCS:
            doc_q = tl.load(DOC + doc_base + offs_m, mask=offs_m < seq_len, other=0)
            allowed = allowed & (doc_k[:, None] == doc_q[None, :])
        x_t = tl.where(allowed, x_t, float("-inf"))
    p_t = tl.math.exp2(x_t)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _load_query_rows(q_src, do_src, desc_b, desc_h, lse_base, delta_base, offs_m, row0, seq_len, stride_ql,
                     stride_dol, EVEN_L: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                     TMA: tl.constexpr):
    """q, dO tiles and lse, delta rows of one visiting query tile.

    The last query block may be partial and shows up in off-diagonal entries too: its missing rows load as
    q = dO = lse = delta = 0, which adds exactly 0 to dK and dV (descriptors zero-fill them by themselves)."""
    if EVEN_L:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    else:
        row_ok = offs_m < seq_len
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    q = load_rows(q_src, desc_b, desc_h, row0, offs_m, stride_ql, seq_len, BLOCK_M, HEAD_DIM, TMA, not EVEN_L)
    do = load_rows(do_src, desc_b, desc_h, row0, offs_m, stride_dol, seq_len, BLOCK_M, HEAD_DIM, TMA, not EVEN_L)
    return q, do, lse, delta


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, offs_n, doc_k,
    q_src, do_src, desc_b, desc_h, lse_base, delta_base, idx_base, DOC, doc_base,
    t_start, t_end, seq_len,
    stride_ql, stride_dol, scale_log2,
    MASKED: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """dK/dV accumulation over one query head's list entries [t_start, t_end) (in query tiles)."""
    SPLIT_M: tl.constexpr = BLOCK // BLOCK_M
    offs_m0 = tl.arange(0, BLOCK_M)
    for t in range(t_start, t_end):
        m_blk = tl.load(idx_base + t // SPLIT_M)
        row0 = m_blk * BLOCK + (t % SPLIT_M) * BLOCK_M
        offs_m = row0 + offs_m0
        q, do, lse, delta = _load_query_rows(
            q_src, do_src, desc_b, desc_h, lse_base, delta_base, offs_m, row0, seq_len, stride_ql, stride_dol,
            EVEN_L, BLOCK_M, HEAD_DIM, TMA,
        )
        dk, dv = _dkdv_step(
            dk, dv, k, v, offs_n, doc_k, q, do, lse, delta, offs_m, DOC, doc_base, seq_len, scale_log2,
            MASKED, HAS_DOCS, PRECISION,
        )
    return dk, dv


@triton.jit
def _key_tile(
    K, V, DOC, b, hk, tile, seq_len,  # noqa: N803
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    HAS_DOCS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """The K, V rows (and document ids) of one dK/dV key tile; rows past the end load as zeros."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < seq_len
    k = tl.load(
        row_pointers(head_pointer(K, b, hk, stride_kb, stride_kh), offs_n, stride_kl, HEAD_DIM),
        mask=col_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        row_pointers(head_pointer(V, b, hk, stride_vb, stride_vh), offs_n, stride_vl, HEAD_DIM),
        mask=col_ok[:, None],
        other=0.0,
    )
    doc_base = b.to(tl.int64) * seq_len
    if HAS_DOCS:
        doc_k = tl.load(DOC + doc_base + offs_n, mask=col_ok, other=-2)
    else:
        doc_k = offs_n
    return offs_n, col_ok, k, v, doc_base, doc_k


@triton.jit
def _store_key_grads(
    DK, DV, dk, dv, b, hk, offs_n, col_ok,  # noqa: N803
    stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl,
    HEAD_DIM: tl.constexpr,
):
    """Write one key tile's dK, dV rows (rows past the end are masked out)."""
    tl.store(
        row_pointers(head_pointer(DK, b, hk, stride_dkb, stride_dkh), offs_n, stride_dkl, HEAD_DIM),
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        row_pointers(head_pointer(DV, b, hk, stride_dvb, stride_dvh), offs_n, stride_dvl, HEAD_DIM),
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None],
    )


@triton.jit
def _dkdv_head(
    dk, dv, k, v, offs_n, doc_k, n_blk, b, h, lo, hi,
    Q, DO, LSE, DELTA, Q_IDX, DOC, doc_base,  # noqa: N803
    stride_qb, stride_qh, stride_ql, stride_dob, stride_doh, stride_dol,
    seq_len, n_blocks, n_heads_q, scale_log2,
    HAS_DOCS: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    WHOLE_LIST: tl.constexpr,
):
    """dK/dV over entries [lo, hi) of query head h's list for key block n_blk (entries are query blocks);
    WHOLE_LIST when lo = 0 and hi is the list's length."""
    SPLIT_M: tl.constexpr = BLOCK // BLOCK_M
    bh = b * n_heads_q + h
    if TMA:
        q_src = Q
        do_src = DO
    else:
        q_src = head_pointer(Q, b, h, stride_qb, stride_qh)
        do_src = head_pointer(DO, b, h, stride_dob, stride_doh)
    lse_base = LSE + bh.to(tl.int64) * seq_len
    delta_base = DELTA + bh.to(tl.int64) * seq_len
    idx_base = Q_IDX + (bh.to(tl.int64) * n_blocks + n_blk) * n_blocks
    if HAS_DOCS:
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, offs_n, doc_k, q_src, do_src, b, h, lse_base, delta_base, idx_base, DOC, doc_base,
            lo * SPLIT_M, hi * SPLIT_M, seq_len, stride_ql, stride_dol, scale_log2,
            True, HAS_DOCS, EVEN_L, BLOCK, BLOCK_M, HEAD_DIM, PRECISION, TMA,
        )
    else:
        # The diagonal, if kept, is entry 0 of a transposed list: the only one needing the causal mask.
        first = tl.load(idx_base)
        n_diag = ((hi > 0) & (first == n_blk)).to(tl.int32)
        if WHOLE_LIST:  # lo = 0
            diag_end = n_diag
            rest_start = n_diag
        else:
            diag_end = tl.minimum(hi, n_diag)
            rest_start = tl.maximum(lo, n_diag)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, offs_n, doc_k, q_src, do_src, b, h, lse_base, delta_base, idx_base, DOC, doc_base,
            lo * SPLIT_M, diag_end * SPLIT_M, seq_len, stride_ql, stride_dol, scale_log2,
            True, HAS_DOCS, EVEN_L, BLOCK, BLOCK_M, HEAD_DIM, PRECISION, TMA,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, offs_n, doc_k, q_src, do_src, b, h, lse_base, delta_base, idx_base, DOC, doc_base,
            rest_start * SPLIT_M, hi * SPLIT_M, seq_len, stride_ql, stride_dol, scale_log2,
            False, HAS_DOCS, EVEN_L, BLOCK, BLOCK_M, HEAD_DIM, PRECISION, TMA,
        )
    return dk, dv


@triton.jit
def _sparse_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,  # noqa: N803
    Q_IDX, Q_CNT, DOC,
    scale_log2, sm_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    seq_len, n_blocks, n_heads_q, n_heads_kv, group,
    HAS_DOCS: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """dK/dV for one key tile of one KV head, summed over the query heads of its group."""
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N
    # Key tiles vary fastest (one KV head's group in flight, see the forward); early key blocks are visited by
    # the most query blocks, so they go first.
    bhk = tl.program_id(1)
    tile = tl.program_id(0)
    n_blk = tile // SPLIT_N
    b = bhk // n_heads_kv
    hk = bhk % n_heads_kv
    offs_n, col_ok, k, v, doc_base, doc_k = _key_tile(
        K, V, DOC, b, hk, tile, seq_len, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        HAS_DOCS, BLOCK_N, HEAD_DIM,
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        cnt = tl.load(Q_CNT + (b * n_heads_q + h).to(tl.int64) * n_blocks + n_blk)
        dk, dv = _dkdv_head(
            dk, dv, k, v, offs_n, doc_k, n_blk, b, h, 0, cnt,
            Q, DO, LSE, DELTA, Q_IDX, DOC, doc_base,
            stride_qb, stride_qh, stride_ql, stride_dob, stride_doh, stride_dol,
            seq_len, n_blocks, n_heads_q, scale_log2,
            HAS_DOCS, EVEN_L, BLOCK, BLOCK_M, HEAD_DIM, PRECISION, TMA, True,
        )
    _store_key_grads(
        DK, DV, dk * sm_scale, dv, b, hk, offs_n, col_ok,
        stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl, HEAD_DIM,
    )


@triton.jit
def _dkdv_work_kernel(
    Q_CNT, ITEMS, META,  # noqa: N803
    n_blocks, n_heads_q, n_heads_kv, group, n_bhk, n_programs, max_segs,
    SPLIT_N: tl.constexpr,
    MIN_SEG: tl.constexpr,
    TILES_P2: tl.constexpr,
):
    """One program: the work list of `_sparse_dkdv_segments_kernel`.

    A tile's group list (the lists of its KV head's query heads, one after the other) is cut into segments of
    SEG entries, SEG = max(MIN_SEG, total entries / programs): no item is longer than a program's fair share, and
    lists that fit stay whole. Item = ((b * Hkv + hk) * n_tiles + tile) * max_segs + segment; a tile with an
    empty list still gets one item (it writes zeros). META = [item count, work counter (0), SEG]."""
    n_tiles = n_blocks * SPLIT_N
    t = tl.arange(0, TILES_P2)
    valid = t < n_tiles
    n_blk = t // SPLIT_N
    total = 0
    for bhk in range(0, n_bhk):
        b = bhk // n_heads_kv
        hk = bhk % n_heads_kv
        for g in range(0, group):
            bh = b * n_heads_q + hk * group + g
            total += tl.sum(tl.load(Q_CNT + bh.to(tl.int64) * n_blocks + n_blk, mask=valid, other=0), 0)
    seg_len = tl.maximum((total + n_programs - 1) // n_programs, MIN_SEG)
    base = 0
    for bhk in range(0, n_bhk):
        b = bhk // n_heads_kv
        hk = bhk % n_heads_kv
        tile_total = tl.zeros([TILES_P2], dtype=tl.int32)
        for g in range(0, group):
            bh = b * n_heads_q + hk * group + g
            tile_total += tl.load(Q_CNT + bh.to(tl.int64) * n_blocks + n_blk, mask=valid, other=0)
        segs = tl.where(valid, tl.maximum((tile_total + seg_len - 1) // seg_len, 1), 0)
        first = tl.cumsum(segs, 0) - segs
        for s in range(0, tl.max(segs, 0)):
            item = (bhk * n_tiles + t) * max_segs + s
            tl.store(ITEMS + base + first + s, item, mask=valid & (s < segs))
        base += tl.sum(segs, 0)
    tl.store(META, base)
    tl.store(META + 1, 0)
    tl.store(META + 2, seg_len)


@triton.jit
def _sparse_dkdv_segments_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,  # noqa: N803
    Q_IDX, Q_CNT, DOC, ITEMS, META, DK_ACC, DV_ACC, ARRIVALS,
    scale_log2, sm_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    seq_len, n_blocks, n_heads_q, n_heads_kv, group, max_segs,
    HAS_DOCS: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    GROUP_P2: tl.constexpr,
):
    """dK/dV with long lists split: persistent programs take items of `_dkdv_work_kernel`'s list from a counter.

    A key block that many query blocks kept (an attention sink keeps a whole column) is otherwise one program
    running group * nB steps while the rest of the GPU idles. A tile whose list is one segment is written
    directly, as in `_sparse_dkdv_kernel`. The segments of a longer one add their float32 partials into
    DK_ACC / DV_ACC and count themselves in ARRIVALS; the last to arrive writes dK / dV and zeroes what it used,
    so the scratch is all zeros again when the kernel ends."""
    SPLIT_N: tl.constexpr = BLOCK // BLOCK_N
    n_tiles = n_blocks * SPLIT_N
    n_items = tl.load(META)
    seg_len = tl.load(META + 2)
    offs_d = tl.arange(0, HEAD_DIM)
    gs = tl.arange(0, GROUP_P2)
    w = tl.atomic_add(META + 1, 1)
    while w < n_items:
        # Claim the next item now: the counter's latency overlaps this item's work.
        w_next = tl.atomic_add(META + 1, 1)
        item = tl.load(ITEMS + w)
        seg = item % max_segs
        tile = (item // max_segs) % n_tiles
        bhk = item // (max_segs * n_tiles)
        n_blk = tile // SPLIT_N
        b = bhk // n_heads_kv
        hk = bhk % n_heads_kv
        first_bh = b * n_heads_q + hk * group
        cnts = tl.load(Q_CNT + (first_bh + gs).to(tl.int64) * n_blocks + n_blk, mask=gs < group, other=0)
        total = tl.sum(cnts, 0)
        n_segs = tl.maximum((total + seg_len - 1) // seg_len, 1)

        offs_n, col_ok, k, v, doc_base, doc_k = _key_tile(
            K, V, DOC, b, hk, tile, seq_len, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
            HAS_DOCS, BLOCK_N, HEAD_DIM,
        )
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # This item's entries [e0, e1) of the group list: the query heads' lists one after the other.
        e0 = seg * seg_len
        e1 = tl.minimum(total, e0 + seg_len)
        starts = tl.cumsum(cnts, 0) - cnts
        for g in range(0, group):
            start_g = tl.sum(tl.where(gs == g, starts, 0), 0)
            cnt_g = tl.sum(tl.where(gs == g, cnts, 0), 0)
            lo = tl.minimum(tl.maximum(e0 - start_g, 0), cnt_g)
            hi = tl.minimum(tl.maximum(e1 - start_g, 0), cnt_g)
            if hi > lo:
                dk, dv = _dkdv_head(
                    dk, dv, k, v, offs_n, doc_k, n_blk, b, hk * group + g, lo, hi,
                    Q, DO, LSE, DELTA, Q_IDX, DOC, doc_base,
                    stride_qb, stride_qh, stride_ql, stride_dob, stride_doh, stride_dol,
                    seq_len, n_blocks, n_heads_q, scale_log2,
                    HAS_DOCS, EVEN_L, BLOCK, BLOCK_M, HEAD_DIM, PRECISION, TMA, False,
                )
        dk = dk * sm_scale
        if n_segs == 1:
            _store_key_grads(
                DK, DV, dk, dv, b, hk, offs_n, col_ok,
                stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl, HEAD_DIM,
            )
        else:
            # Scratch: [B * Hkv * n_tiles * BLOCK_N, D] float32, tile after tile.
            acc_rows = (bhk.to(tl.int64) * n_tiles + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc_off = acc_rows[:, None] * HEAD_DIM + offs_d[None, :]
            tl.atomic_add(DK_ACC + acc_off, dk)
            tl.atomic_add(DV_ACC + acc_off, dv)
            # Every thread's partial is in before the count goes up; the counter's acq_rel orders the rest.
            tl.debug_barrier()
            arrived = tl.atomic_add(ARRIVALS + bhk.to(tl.int64) * n_tiles + tile, 1)
            if arrived == n_segs - 1:
                _store_key_grads(
                    DK, DV, tl.load(DK_ACC + acc_off, cache_modifier=".cg"),
                    tl.load(DV_ACC + acc_off, cache_modifier=".cg"), b, hk, offs_n, col_ok,
                    stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl, HEAD_DIM,
                )
                tl.store(DK_ACC + acc_off, tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32))
                tl.store(DV_ACC + acc_off, tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32))
                tl.store(ARRIVALS + bhk.to(tl.int64) * n_tiles + tile, 0)
        w = w_next



def _segment_scratch(device: torch.device, acc_numel: int, n_counters: int):
    """The zeroed `(dk_acc, dv_acc, arrivals)` scratch of one launch of the segmented kernel.

    Allocated per launch rather than kept between them: the accumulators are float32 copies of dK and dV (256 MiB
    together at 128k tokens, 2 KV heads of 128), which a kept buffer would add to every later peak of the step
    (the next layers' recomputed activations); zeroing them costs a fraction of a millisecond.
    """
    return (
        torch.zeros(acc_numel, dtype=torch.float32, device=device),
        torch.zeros(acc_numel, dtype=torch.float32, device=device),
        torch.zeros(n_counters, dtype=torch.int32, device=device),
    )


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent dK/dV kernel: two per multiprocessor (its 4-warp tiles fit two), a few in the
    interpreter (enough to exercise the shared work counter)."""
    if device.type != "cuda":
        return 3
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_indices: torch.Tensor,
    q_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    split_long_columns: bool,
    document_ids: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> None:
    """Launch the dK/dV kernel (or the work-list and segmented kernels) into `dk`, `dv`.

    Args:
        q, dout: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]` (last dims contiguous).
        dk, dv: `[B, Hkv, L, D]`, written (last dims contiguous).
        lse: float32 `[B, Hq, L]` base-2 log-sum-exp from the forward; delta: float32 `[B, Hq, L]` (rowsum(O dO)).
        q_indices: int32 `[B, Hq, nB, nB]`, q_counts: int32 `[B, Hq, nB]`: the transposed block lists.
        block_size: tokens per block; sm_scale: softmax scale.
        split_long_columns: run the work-list and segmented kernels (fixed tiles, never autotuned) instead of
            `_sparse_dkdv_kernel`.
        document_ids: int32 `[B, L]` contiguous, or None.
        config: explicit tile settings (default: autotuned on long GPU inputs, else `default_config`).
    """
    bsz, hq, seq_len, dim = q.shape
    hkv = k.shape[1]
    nb = num_blocks(seq_len, block_size)
    options = kernel_options("dkdv", q, dout)
    options.pop("SPLIT_LONG_COLUMNS", None)  # chosen by the caller, not a constexpr of the kernels
    q_in, do_in = (host_descriptor(q, "BLOCK_M"), host_descriptor(dout, "BLOCK_M")) if options["TMA"] else (q, dout)
    args = (
        q_in, k, v, do_in, dk, dv, lse, delta,
        q_indices, q_counts, document_ids if document_ids is not None else q_counts,
        sm_scale * LOG2E, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        seq_len, nb, hq, hkv, hq // hkv,
    )
    kwargs = dict(
        HAS_DOCS=document_ids is not None,
        EVEN_L=seq_len % block_size == 0,
        BLOCK=block_size,
        HEAD_DIM=dim,
        PRECISION=input_precision(q.dtype),
        **options,
    )
    if not split_long_columns:
        launch(
            _sparse_dkdv_kernel, "dkdv", block_size, seq_len,
            lambda meta: (nb * (block_size // meta["BLOCK_N"]), bsz * hkv),
            args, kwargs, config,
        )
        return
    # The work list is cut per tile, so the tiles are fixed: no autotuning.
    cfg = config or default_config("dkdv", block_size)
    group = hq // hkv
    n_tiles = nb * (block_size // cfg.block_n)
    n_bhk = bsz * hkv
    max_segs = triton.cdiv(group * nb, MIN_SEGMENT)
    n_programs = _persistent_programs(q.device)
    items = torch.empty(n_bhk * n_tiles * max_segs, dtype=torch.int32, device=q.device)
    meta = torch.empty(3, dtype=torch.int32, device=q.device)
    _dkdv_work_kernel[(1,)](
        q_counts, items, meta, nb, hq, hkv, group, n_bhk, n_programs, max_segs,
        SPLIT_N=block_size // cfg.block_n, MIN_SEG=MIN_SEGMENT, TILES_P2=triton.next_power_of_2(n_tiles), num_warps=4,
    )
    dk_acc, dv_acc, arrivals = _segment_scratch(q.device, n_tiles * cfg.block_n * dim * n_bhk, n_bhk * n_tiles)
    seg_args = args[:11] + (items, meta, dk_acc, dv_acc, arrivals) + args[11:] + (max_segs,)
    meta_tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    set_descriptor_tiles({**meta_tiles, **{str(i): a for i, a in enumerate(seg_args)}})
    seg_kwargs = {**kwargs, **meta_tiles, "GROUP_P2": triton.next_power_of_2(group)}
    check_kernel_kwargs(_sparse_dkdv_segments_kernel, seg_kwargs)
    _sparse_dkdv_segments_kernel[(n_programs,)](*seg_args, **seg_kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
