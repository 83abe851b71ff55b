"""Gluon helpers shared by the forward and dQ kernels: layouts, masks, the K/V rings and their producer loads.

Both kernels walk one query block's key-block list per item with a producer warp streaming K and V through
two-slot shared-memory rings (full/empty mbarriers) and one or two consumer warpgroups of 64 query rows. The
helpers keep their leading underscore: they are internal to this package's kernels.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from .settings import ROWS

WG_ROWS = gl.constexpr(ROWS)


@gluon.constexpr_function
def _wgmma_layout(cols):
    """Register layout of a `[64, cols]` wgmma accumulator on one warpgroup (the consumers' tiles)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, cols, 16])

@gluon.jit
def _causal_mask(x, offs_m, n_blk, seq_len, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):  # noqa: N803
    """-inf where key block n_blk's keys come after the row's query or past the end of the sequence."""
    offs_n = n_blk * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
    return gl.where(allowed, x, float("-inf"))


@gluon.jit
def _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_full, k_empty, v_full, v_empty, idx, cnt, kv_row, base,
                  V_LAGS: gl.constexpr):
    """Producer: K and V of each list entry j into ring slot g % 2, g = base + j the program's running tile
    count, once the consumers freed that slot. V_LAGS: step j loads K_j and V_{j-1} (the forward uses V one
    tile after K); else K_j and V_j."""
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    TILE_BYTES: gl.constexpr = k_desc.block_type.nbytes
    n_prev = gl.load(idx)
    for j in range(0, cnt + V_LAGS):
        if j < cnt:
            n_blk = gl.load(idx + j)
            g = base + j
            # The slot's previous tile (g - 2) must have been released by every consumer warpgroup.
            mbarrier.wait(k_empty.index(g % 2), ((g // 2) - 1) & 1, pred=g >= 2)
            mbarrier.expect(k_full.index(g % 2), TILE_BYTES)
            tma.async_copy_global_to_shared(k_desc, [kv_row + n_blk * BLOCK_N, 0], k_full.index(g % 2),
                                            k_smem.index(g % 2))
        else:
            n_blk = n_prev
        jv = j - V_LAGS
        if jv >= 0:
            n_v = n_prev if V_LAGS else n_blk
            gv = base + jv
            mbarrier.wait(v_empty.index(gv % 2), ((gv // 2) - 1) & 1, pred=gv >= 2)
            mbarrier.expect(v_full.index(gv % 2), TILE_BYTES)
            tma.async_copy_global_to_shared(v_desc, [kv_row + n_v * BLOCK_N, 0], v_full.index(gv % 2),
                                            v_smem.index(gv % 2))
        n_prev = n_blk

@gluon.jit
def _item_rows(KV_IDX, KV_CNT, item, seq_len, n_blocks, n_heads_q, group,  # noqa: N803
               BLOCK_N: gl.constexpr, ITEMS: gl.constexpr):
    """Query block `item` of this program (of ITEMS), its first rows in the `[B * H * L, D]` views of Q and
    K/V, its lse/delta row offset, its key-block list and count, and whether it exists.

    One block per program: the last blocks (longest causal lists) go first, as in the Triton kernels. Several:
    program t takes entries t * ITEMS + i of the order last, first, second last, second, ... so each pairs a
    long list with a short one and all programs have about the same work."""
    bh = gl.program_id(1)
    if ITEMS == 1:
        m_blk = gl.num_programs(0) - 1 - gl.program_id(0)
        valid = m_blk >= 0
    else:
        k = gl.program_id(0) * ITEMS + item
        m_blk = gl.where(k % 2 == 0, n_blocks - 1 - k // 2, k // 2)
        valid = k < n_blocks
        m_blk = gl.where(valid, m_blk, 0)
    hk = (bh % n_heads_q) // group
    q_row = bh * seq_len + m_blk * BLOCK_N
    kv_row = ((bh // n_heads_q) * (n_heads_q // group) + hk) * seq_len
    list_row = bh.to(gl.int64) * n_blocks + m_blk
    cnt = gl.where(valid, gl.load(KV_CNT + list_row), 0)
    return m_blk, q_row, kv_row, bh.to(gl.int64) * seq_len, cnt, KV_IDX + list_row * n_blocks, valid

@gluon.jit
def _kv_rings(k_desc, v_desc, NUM_WG: gl.constexpr):  # noqa: N803
    """Two-slot K and V rings with their full/empty mbarriers (empty: one arrival per consumer warpgroup),
    and the full/empty mbarriers of the query tiles (one phase per item of the program)."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=NUM_WG)
    for slot in gl.static_range(2):
        mbarrier.init(k_full.index(slot), count=1)
        mbarrier.init(v_full.index(slot), count=1)
        mbarrier.init(k_empty.index(slot), count=NUM_WG)
        mbarrier.init(v_empty.index(slot), count=NUM_WG)
    fence_async_shared()
    return k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty


@gluon.jit
def _load_query_tiles(descs, smems, q_bar, q_empty, item, cnt, q_row):
    """Producer: the item's query-side tiles (`descs` into `smems`, one `[64, D]` tile per consumer warpgroup)
    once the consumers are done with the previous item's; the phase completes without a load when the item
    has nothing to compute."""
    NUM_WG: gl.constexpr = smems[0].shape[0]
    mbarrier.wait(q_empty, (item - 1) & 1, pred=item > 0)
    mbarrier.expect(q_bar, len(descs) * NUM_WG * descs[0].block_type.nbytes, pred=cnt > 0)
    for t in gl.static_range(len(descs)):
        for wg in gl.static_range(NUM_WG):
            tma.async_copy_global_to_shared(descs[t], [q_row + wg * WG_ROWS, 0], q_bar, smems[t].index(wg),
                                            pred=cnt > 0)
    mbarrier.arrive(q_bar, count=1, pred=cnt == 0)
