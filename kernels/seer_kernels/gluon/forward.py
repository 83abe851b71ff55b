"""Block-sparse attention forward for Hopper in Gluon, warp-specialized.

In Triton the two warpgroups of a 128-row program run in lockstep and every matrix product is waited for before
the softmax that reads it, so the tensor cores and the exponentials take turns. Here each program is split by
`gl.warp_specialize` into a producer warp that streams Q once and K, V tile by tile (TMA into shared-memory
rings), and one or two consumer warpgroups of 64 query rows in separate partitions: they never wait for each
other, and each issues the score product of tile j before the P V product of tile j - 1 and waits only for the
scores before its softmax, so one's exponentials run while products are on the tensor cores.

P reaches the second product through shared memory, not registers: a wgmma reading its A operand from registers
leaves them to ptxas's allocator once issued, and ptxas then waits for the wgmma before the softmax reuses them.
A shared-memory slot read into registers (Q) goes back to the TMA producer only after a product has consumed
those registers and a proxy fence: handed back right after the load, a row can compute with the next block's Q.

Where block == head_dim a program takes several query blocks (`settings.ITEMS_PER_PROGRAM`), pairing long causal
lists with short ones, so the next block's loads overlap the current block's last tiles and output store.
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
def _scores_to_probs(s, m_i, l_i, offs_m, n_blk, seq_len, scale_log2, masked,
                     BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax step on one score tile (raw q.k): probabilities in base 2 against the new running max,
    the new max and sum, and the factor that rescales what was accumulated before."""
    if masked:
        s = _causal_mask(s, offs_m, n_blk, seq_len, BLOCK_N, s_layout)
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
    # A row with nothing allowed so far has m_new = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * scale_log2 - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_new, alpha


@gluon.jit
def _fwd_consumer(o_desc, LSE, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, p_smem, q_bar, q_empty, k_full,  # noqa: N803
                  k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2,
                  ITEMS: gl.constexpr, WG: gl.constexpr):
    """Rows [64 WG, 64 WG + 64) of each query block of the program. Tile j: scores S_j, then P_{j-1} V_{j-1};
    only S_j is waited for before the softmax of tile j, so that product overlaps the exponentials."""
    dtype: gl.constexpr = k_smem.dtype
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    # The output tile leaves through a free P slot when it has P's shape (then the Q slot can already take the
    # next item's rows), else through the Q slot (one item per program).
    OUT_IN_P: gl.constexpr = BLOCK_N == HEAD_DIM
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)  # [64, BLOCK_N] scores
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)  # [64, HEAD_DIM] outputs / gradients
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_init = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout)
    my_q = q_smem.index(WG)
    base = 0  # tiles this program consumed before the current item: ring slot and phase of each tile
    for item in range(ITEMS):
        m_blk, q_row, kv_row, lse_row, cnt, idx, valid = _item_rows(
            KV_IDX, KV_CNT, item, seq_len, n_blocks, n_heads_q, group, BLOCK_N, ITEMS)
        offs_m = m_blk * BLOCK_N + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=row_s)
        m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([WG_ROWS], gl.float32, layout=row_s)
        acc = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        # The last entry is the only one masked (the diagonal, when kept, is last).
        n_last = gl.load(idx + cnt - 1, mask=cnt > 0, other=0)
        mbarrier.wait(q_bar, item & 1)
        if cnt > 0:
            # Q is the register operand of every score product: read from shared memory once.
            q_op = my_q.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
            mbarrier.wait(k_full.index(base % 2), (base // 2) & 1)
            s_tok = warpgroup_mma(q_op, k_smem.index(base % 2).permute((1, 0)), s_init, use_acc=False,
                                  is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(base % 2), count=1)
            if OUT_IN_P:
                # Hand the Q slot back for the next item's rows (TMA) only now: the product above consumed
                # every warp's registers, so the shared-memory reads that filled them are complete, and the
                # fence orders them before the asynchronous proxy's writes (released earlier, a row could
                # pick up the next item's Q).
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(q_empty, count=1)
            p, m_i, l_i, alpha = _scores_to_probs(s, m_i, l_i, offs_m, n_last, seq_len, scale_log2, cnt == 1,
                                                  BLOCK_N, s_layout)
            # The previous item's output may still be leaving through this P slot.
            tma.store_wait(0)
            gl.thread_barrier()
            p_smem.index(WG * 2 + base % 2).store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # partition-wide: this warpgroup's P_0 is written
            for j in range(1, cnt):
                g = base + j
                slot = g % 2
                prev = 1 - slot
                mbarrier.wait(k_full.index(slot), (g // 2) & 1)
                s_tok = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_full.index(prev), ((g - 1) // 2) & 1)
                acc_tok = warpgroup_mma(p_smem.index(WG * 2 + prev), v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])
                mbarrier.arrive(k_empty.index(slot), count=1)
                p, m_i, l_i, alpha = _scores_to_probs(s, m_i, l_i, offs_m, n_last, seq_len, scale_log2,
                                                      j == cnt - 1, BLOCK_N, s_layout)
                p_smem.index(WG * 2 + slot).store(p.to(dtype))
                fence_async_shared()
                acc = warpgroup_mma_wait(0, deps=[acc_tok])
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                gl.thread_barrier()  # P_j is written before its product is issued
            g_last = base + cnt - 1
            mbarrier.wait(v_full.index(g_last % 2), (g_last // 2) & 1)
            acc_tok = warpgroup_mma(p_smem.index(WG * 2 + g_last % 2), v_smem.index(g_last % 2), acc,
                                    is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            mbarrier.arrive(v_empty.index(g_last % 2), count=1)
        elif OUT_IN_P:
            mbarrier.arrive(q_empty, count=1)
        empty = l_i == 0.0
        out = acc / gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)[:, None]
        # +inf for an empty row makes every recomputed probability of that row 0 in the backward.
        lse = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))
        base += cnt
        if valid:
            if OUT_IN_P:
                # Both P slots are free now; the next item writes its first P into this one after the store.
                out_smem = p_smem.index(WG * 2 + base % 2)
                tma.store_wait(0)
                gl.thread_barrier()
            else:  # this warpgroup's Q rows went to registers at the start: their buffer takes the output
                out_smem = my_q
            out_smem.store(out.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(o_desc, [q_row + WG * WG_ROWS, 0], out_smem)
            gl.store(LSE + lse_row + offs_m, lse)
    tma.store_wait(0)

@gluon.jit
def _fwd_consumer_0(o_desc, LSE, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, p_smem, q_bar, q_empty, k_full,  # noqa: N803
                    k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2, ITEMS: gl.constexpr):
    _fwd_consumer(o_desc, LSE, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, p_smem, q_bar, q_empty, k_full, k_empty,
                  v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2, ITEMS, 0)

@gluon.jit
def _fwd_consumer_1(o_desc, LSE, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, p_smem, q_bar, q_empty, k_full,  # noqa: N803
                    k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2, ITEMS: gl.constexpr):
    _fwd_consumer(o_desc, LSE, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, p_smem, q_bar, q_empty, k_full, k_empty,
                  v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2, ITEMS, 1)


@gluon.jit
def _fwd_producer(q_desc, k_desc, v_desc, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, q_bar, q_empty, k_full,  # noqa: N803
                  k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, ITEMS: gl.constexpr):
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    base = 0
    for item in range(ITEMS):
        m_blk, q_row, kv_row, lse_row, cnt, idx, valid = _item_rows(
            KV_IDX, KV_CNT, item, seq_len, n_blocks, n_heads_q, group, BLOCK_N, ITEMS)
        _load_query_tiles((q_desc,), (q_smem,), q_bar, q_empty, item, cnt, q_row)
        _load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_full, k_empty, v_full, v_empty, idx, cnt, kv_row, base,
                      1)
        base += cnt

@gluon.jit
def _gluon_sparse_fwd_kernel(
    q_desc, k_desc, v_desc, o_desc, LSE, KV_IDX, KV_CNT,  # noqa: N803
    scale_log2, seq_len, n_blocks, n_heads_q, group,
    CONSUMER_REGS: gl.constexpr,
    ITEMS: gl.constexpr,
):
    dtype: gl.constexpr = k_desc.dtype
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    NUM_WG: gl.constexpr = BLOCK_N // WG_ROWS
    gl.static_assert(ITEMS == 1 or BLOCK_N == HEAD_DIM, "several items per program need block == head_dim")
    q_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, HEAD_DIM], q_desc.layout)
    # Two P slots per consumer warpgroup: P_j is written while P_{j-1} V_{j-1} still reads the other.
    p_smem = gl.allocate_shared_memory(dtype, [2 * NUM_WG, WG_ROWS, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([WG_ROWS, BLOCK_N], dtype))
    k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty = _kv_rings(k_desc, v_desc, NUM_WG)
    consumer_args = (o_desc, LSE, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, p_smem, q_bar, q_empty, k_full, k_empty,
                     v_full, v_empty, seq_len, n_blocks, n_heads_q, group, scale_log2, ITEMS)
    producer_args = (q_desc, k_desc, v_desc, KV_IDX, KV_CNT, q_smem, k_smem, v_smem, q_bar, q_empty, k_full,
                     k_empty, v_full, v_empty, seq_len, n_blocks, n_heads_q, group, ITEMS)
    if NUM_WG == 2:
        gl.warp_specialize([(_fwd_consumer_0, consumer_args), (_fwd_consumer_1, consumer_args),
                            (_fwd_producer, producer_args)], [4, 1], [CONSUMER_REGS, 24])
    else:  # block 64: one consumer warpgroup; two programs share a multiprocessor instead
        gl.warp_specialize([(_fwd_consumer_0, consumer_args), (_fwd_producer, producer_args)], [1], [24])
