"""Block-sparse attention dQ for Hopper in Gluon, warp-specialized like the forward (`forward.py`).

A producer warp streams the query block's Q and dO once and K, V tile by tile; each consumer warpgroup of 64 query
rows computes S = q K^T and dP = dO V^T, dS = P (dP - delta), and issues dQ += dS K without waiting for it, so it
completes under the next tile's products. The consumers also compute delta = rowsum(O dO) (O from global memory,
dO from its tile) and write it for the dK/dV kernel, in place of a separate pass over O and dO.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .common import (
    WG_ROWS,
    _causal_mask,
    _item_rows,
    _kv_rings,
    _load_kv_ring,
    _load_query_tiles,
    _wgmma_layout,
)


@gluon.jit
def _scores_to_ds(s, dp, lse, delta, offs_m, n_blk, seq_len, scale_log2, masked,
                  BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """dS = P (dP - delta) of one tile, P recomputed from the raw scores and the forward's base-2 lse."""
    x = s * scale_log2 - lse[:, None]
    if masked:
        x = _causal_mask(x, offs_m, n_blk, seq_len, BLOCK_N, s_layout)
    return gl.exp2(x) * (dp - delta[:, None])

@gluon.jit
def _dq_consumer(dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, ds_smem,  # noqa: N803
                 q_bar, q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group,
                 scale_log2, sm_scale, ITEMS: gl.constexpr, WG: gl.constexpr):
    """dQ of rows [64 WG, 64 WG + 64) of each query block of the program: per tile S = q K^T and dP = dO V^T,
    dS = P (dP - delta), then dQ += dS K issued without waiting (it completes under the next tile's
    products). The rows' delta = rowsum(O dO) is computed here (O from global memory, dO from its tile) and
    written to DELTA for the dK/dV kernel, in place of a separate pass over O and dO."""
    dtype: gl.constexpr = k_smem.dtype
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    # dQ leaves through the dS slot when it has dS's shape (then the q/dO slots can already take the next
    # item's rows once the last S and dP are computed), else through the q slot (one item per program).
    OUT_IN_DS: gl.constexpr = BLOCK_N == HEAD_DIM
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)  # [64, BLOCK_N] scores
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)  # [64, HEAD_DIM] outputs / gradients
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_init = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout)
    my_q = q_smem.index(WG)
    my_do = do_smem.index(WG)
    my_ds = ds_smem.index(WG)
    # [64, HEAD_DIM] tiles of O and dO for delta: 16-byte vectors along the head dimension.
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    tile_rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, rows_layout))
    tile_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    base = 0  # tiles this program consumed before the current item: ring slot and phase of each tile
    for item in range(ITEMS):
        m_blk, q_row, kv_row, lse_row, cnt, idx, valid = _item_rows(
            KV_IDX, KV_CNT, item, seq_len, n_blocks, n_heads_q, group, BLOCK_N, ITEMS)
        offs_m = m_blk * BLOCK_N + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=row_s)
        lse = gl.load(LSE + lse_row + offs_m)
        o_rows = (q_row + WG * WG_ROWS + tile_rows).to(gl.int64) * HEAD_DIM
        o_tile = gl.load(O + o_rows[:, None] + tile_cols[None, :])
        dq = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        n_last = gl.load(idx + cnt - 1, mask=cnt > 0, other=0)
        mbarrier.wait(q_bar, item & 1)
        # An item with nothing kept loads no dO (and its rows are in no dK/dV list): delta 0.
        do_tile = my_do.load(rows_layout)
        delta = gl.sum(o_tile.to(gl.float32) * do_tile.to(gl.float32), axis=1)
        delta = gl.where(cnt > 0, gl.convert_layout(delta, row_s), 0.0)
        # These reads of dO come before the producer's next TMA write into its slot (released below).
        fence_async_shared()
        if valid:
            gl.store(DELTA + lse_row + offs_m, delta)
        if cnt > 0:
            # Tile 0 (peeled: no dQ product in flight yet).
            mbarrier.wait(k_full.index(base % 2), (base // 2) & 1)
            mbarrier.wait(v_full.index(base % 2), (base // 2) & 1)
            s_tok = warpgroup_mma(my_q, k_smem.index(base % 2).permute((1, 0)), s_init, use_acc=False,
                                  is_async=True)
            dp_tok = warpgroup_mma(my_do, v_smem.index(base % 2).permute((1, 0)), s_init, use_acc=False,
                                   is_async=True)
            s, dp = warpgroup_mma_wait(0, deps=[s_tok, dp_tok])
            mbarrier.arrive(v_empty.index(base % 2), count=1)
            # The last tile's S and dP are done: the q/dO slots can take the next item's rows.
            if OUT_IN_DS:
                mbarrier.arrive(q_empty, count=1, pred=cnt == 1)
            ds = _scores_to_ds(s, dp, lse, delta, offs_m, n_last, seq_len, scale_log2, cnt == 1, BLOCK_N,
                               s_layout)
            # The previous item's dQ may still be leaving through this dS slot.
            tma.store_wait(0)
            gl.thread_barrier()
            my_ds.store(ds.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # dS_0 is written before its product is issued
            for j in range(1, cnt):
                g = base + j
                slot = g % 2
                prev = 1 - slot
                mbarrier.wait(k_full.index(slot), (g // 2) & 1)
                mbarrier.wait(v_full.index(slot), (g // 2) & 1)
                s_tok = warpgroup_mma(my_q, k_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                      is_async=True)
                dp_tok = warpgroup_mma(my_do, v_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                       is_async=True)
                # dQ += dS_{j-1} K_{j-1} goes last: waiting for all but one group completes S_j and dP_j
                # while it runs under the dS_j arithmetic.
                dq_tok = warpgroup_mma(my_ds, k_smem.index(prev), dq, is_async=True)
                s, dp = warpgroup_mma_wait(1, deps=[s_tok, dp_tok])
                mbarrier.arrive(v_empty.index(slot), count=1)
                if OUT_IN_DS:
                    mbarrier.arrive(q_empty, count=1, pred=j == cnt - 1)
                ds = _scores_to_ds(s, dp, lse, delta, offs_m, n_last, seq_len, scale_log2, j == cnt - 1,
                                   BLOCK_N, s_layout)
                dq = warpgroup_mma_wait(0, deps=[dq_tok])
                mbarrier.arrive(k_empty.index(prev), count=1)
                my_ds.store(ds.to(dtype))
                fence_async_shared()
                gl.thread_barrier()  # dS_j is written before its product is issued
            g_last = base + cnt - 1
            dq_tok = warpgroup_mma(my_ds, k_smem.index(g_last % 2), dq, is_async=True)
            dq = warpgroup_mma_wait(0, deps=[dq_tok])
            mbarrier.arrive(k_empty.index(g_last % 2), count=1)
        elif OUT_IN_DS:
            mbarrier.arrive(q_empty, count=1)
        base += cnt
        if valid:
            if OUT_IN_DS:
                out_smem = my_ds  # its last product has completed
                tma.store_wait(0)
                gl.thread_barrier()
            else:  # this warpgroup's q rows are no longer read: their buffer takes dQ
                out_smem = my_q
            out_smem.store((dq * sm_scale).to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(dq_desc, [q_row + WG * WG_ROWS, 0], out_smem)
    tma.store_wait(0)

@gluon.jit
def _dq_consumer_0(dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, ds_smem,  # noqa: N803
                   q_bar, q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group,
                   scale_log2, sm_scale, ITEMS: gl.constexpr):
    _dq_consumer(dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, ds_smem, q_bar,
                 q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2,
                 sm_scale, ITEMS, 0)

@gluon.jit
def _dq_consumer_1(dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, ds_smem,  # noqa: N803
                   q_bar, q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group,
                   scale_log2, sm_scale, ITEMS: gl.constexpr):
    _dq_consumer(dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, ds_smem, q_bar,
                 q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2,
                 sm_scale, ITEMS, 1)

@gluon.jit
def _dq_producer(q_desc, do_desc, k_desc, v_desc, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, q_bar,  # noqa: N803
                 q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group,
                 ITEMS: gl.constexpr):
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    base = 0
    for item in range(ITEMS):
        m_blk, q_row, kv_row, lse_row, cnt, idx, valid = _item_rows(
            KV_IDX, KV_CNT, item, seq_len, n_blocks, n_heads_q, group, BLOCK_N, ITEMS)
        _load_query_tiles((q_desc, do_desc), (q_smem, do_smem), q_bar, q_empty, item, cnt, q_row)
        _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_full, k_empty, v_full, v_empty, idx, cnt, kv_row, base,
                      0)
        base += cnt

@gluon.jit
def _gluon_sparse_dq_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT,  # noqa: N803
    scale_log2, sm_scale, seq_len, n_blocks, n_heads_q, group,
    CONSUMER_REGS: gl.constexpr,
    ITEMS: gl.constexpr,
):
    dtype: gl.constexpr = k_desc.dtype
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    NUM_WG: gl.constexpr = BLOCK_N // WG_ROWS
    gl.static_assert(ITEMS == 1 or BLOCK_N == HEAD_DIM, "several items per program need block == head_dim")
    q_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, HEAD_DIM], q_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, BLOCK_N],
                                        gl.NVMMASharedLayout.get_default_for([WG_ROWS, BLOCK_N], dtype))
    k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty = _kv_rings(k_desc, v_desc, NUM_WG)
    consumer_args = (dq_desc, O, LSE, DELTA, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, ds_smem, q_bar,
                     q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2,
                     sm_scale, ITEMS)
    producer_args = (q_desc, do_desc, k_desc, v_desc, KV_IDX, KV_CNT, q_smem, do_smem, k_smem, v_smem, q_bar,
                     q_empty, k_full, k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, ITEMS)
    if NUM_WG == 2:
        gl.warp_specialize([(_dq_consumer_0, consumer_args), (_dq_consumer_1, consumer_args),
                            (_dq_producer, producer_args)], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_dq_consumer_0, consumer_args), (_dq_producer, producer_args)], [1], [24])
