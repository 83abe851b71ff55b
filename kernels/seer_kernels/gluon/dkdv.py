"""Block-sparse attention dK/dV for Hopper in Gluon, warp-specialized.

One program per (key block, KV head): a producer warp loads the block's K and V once, then streams the 64-row
query tiles of every query block that kept it, for each query head of the group (Q and dO by TMA, lse and delta
into shared memory), through a ring of `settings.DKDV_STAGES` slots. Each consumer warpgroup holds 64 keys and
computes transposed tiles (rows: keys): S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q issued
after the next tile's S^T and dP^T, so that they run under its exponentials.

The kernel is bound by shared-memory reads, so P^T stays in registers as the A operand of its product: naming it
in the wait of that product keeps it allocated, and at 240 registers per consumer thread
(`settings.DKDV_CONSUMER_REGS`) ptxas does not serialize the products (with fewer it does, and with dS^T in
registers too at either count). dS^T goes through shared memory.
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

from .common import WG_ROWS, _wgmma_layout


@gluon.jit
def _pick(vec, offs, i):
    """Element i of a small vector (`offs` its indices), in every thread."""
    return gl.sum(gl.where(offs == i, vec, 0), 0)

@gluon.jit
def _transposed_grads(st, dpt, lse_slot, delta_slot, sub, offs_k, offs_q0, scale_log2, s_layout: gl.constexpr):
    """P^T and dS^T = P^T (dP^T - delta) of one step from S^T, dP^T and the query rows' lse and delta (`[64]` in
    shared memory); causal mask when the step is the diagonal block's query tile `sub` (-1: not the diagonal)."""
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    lse = lse_slot.load(col_s)
    delta = delta_slot.load(col_s)
    x = st * scale_log2 - lse[None, :]
    if sub >= 0:
        offs_q = offs_q0 + sub * offs_k.shape[0]
        x = gl.where(offs_k[:, None] <= offs_q[None, :], x, float("-inf"))
    pt = gl.exp2(x)
    return pt, pt * (dpt - delta[None, :])

@gluon.jit
def _dkdv_consumer(dk_desc, dv_desc, k_smem, v_smem, qt_smem, dot_smem, lse_smem, delta_smem, cnt_smem,
                   first_smem, dst_smem, kv_bar, full, empty, n_blk, kv_row, scale_log2, sm_scale,
                   WG: gl.constexpr):
    """dK/dV of keys [64 WG, 64 WG + 64) of the key block, summed over every 64-row query tile that kept it
    (the group's query heads one after the other). Per tile, in transposed form (rows: keys): S^T = K Q^T and
    dP^T = V dO^T, P^T and dS^T; then dV += P^T dO and dK += dS^T Q, issued after the next tile's S^T and
    dP^T so that they run under its exponentials. Tiles whose entries are all masked for these keys (the
    diagonal block's query rows before them) are skipped."""
    dtype: gl.constexpr = k_smem.dtype
    HEAD_DIM: gl.constexpr = k_smem.shape[2]
    NUM_WG: gl.constexpr = k_smem.shape[0]
    BLOCK: gl.constexpr = NUM_WG * WG_ROWS
    SUB: gl.constexpr = NUM_WG  # 64-row query tiles per query block (as many as 64-key parts of a key block)
    NS: gl.constexpr = qt_smem.shape[0]
    s_layout: gl.constexpr = _wgmma_layout(WG_ROWS)  # [64 keys, 64 queries] transposed scores
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)  # [64, HEAD_DIM] outputs / gradients
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    g_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    # Per query head of the group: its list's length and whether it starts with the diagonal block, the only
    # one that needs the causal mask (the producer put both in shared memory before K/V arrived).
    mbarrier.wait(kv_bar, 0)
    cnts = cnt_smem.load(g_layout)
    firsts = first_smem.load(g_layout)
    heads = gl.arange(0, cnt_smem.shape[0], layout=g_layout)
    offs_k = n_blk * BLOCK + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=row_s)
    offs_q0 = n_blk * BLOCK + gl.arange(0, WG_ROWS, layout=col_s)
    s_init = gl.zeros([WG_ROWS, WG_ROWS], gl.float32, layout=s_layout)
    dk = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    dv = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    my_k = k_smem.index(WG)
    my_v = v_smem.index(WG)
    # P^T stays in registers as the A operand of dV += P^T dO (no shared-memory round trip: the kernel is bound
    # by shared-memory reads); dS^T goes through shared memory (both in registers, ptxas serializes the
    # products). Both start as zeros, so the first step's "previous" products add nothing (they read that step's
    # own dO and Q, finite values) and the loop needs no peeled step.
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pt_op = gl.zeros([WG_ROWS, WG_ROWS], dtype, layout=a_layout)
    my_dst = dst_smem.index(WG)
    my_dst.store(gl.zeros([WG_ROWS, WG_ROWS], dtype, layout=s_layout))
    fence_async_shared()
    gl.thread_barrier()
    t = 0  # ring steps so far: one per 64-row query tile of each list entry, the heads one after the other
    prev = 0  # the slot whose P^T and dS^T wait for their dV and dK products
    pending = 0  # whether there is such a slot yet
    for g in range(0, cnt_smem.shape[0]):
        t_head = t
        t_end = t + _pick(cnts, heads, g) * SUB
        diagonal = _pick(firsts, heads, g) == n_blk
        if diagonal:
            # The diagonal's query tiles before this warpgroup's keys have every entry masked: the warpgroup
            # only hands their slots back (once full, so that its arrival cannot count towards the slot's
            # previous use). For the second warpgroup, the first 64 rows of each diagonal block.
            for _ in gl.static_range(WG):
                mbarrier.wait(full.index(t % NS), (t // NS) & 1)
                mbarrier.arrive(empty.index(t % NS), count=1)
                t += 1
        diag_end = gl.where(diagonal, t_head + SUB, t_head)
        for step in range(t, t_end):
            slot = step % NS
            mbarrier.wait(full.index(slot), (step // NS) & 1)
            st_tok = warpgroup_mma(my_k, qt_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                   is_async=True)
            dpt_tok = warpgroup_mma(my_v, dot_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                    is_async=True)
            # The previous step's dV += P^T dO and dK += dS^T Q go after this step's products: waiting for all
            # but these two completes S^T and dP^T while they run under the arithmetic below.
            src = gl.where(pending != 0, prev, slot)
            dv_tok = warpgroup_mma(pt_op, dot_smem.index(src), dv, is_async=True)
            dk_tok = warpgroup_mma(my_dst, qt_smem.index(src), dk, is_async=True)
            st, dpt = warpgroup_mma_wait(2, deps=[st_tok, dpt_tok])
            sub = gl.where(step < diag_end, step - t_head, -1)
            pt, dst = _transposed_grads(st, dpt, lse_smem.index(slot), delta_smem.index(slot), sub, offs_k,
                                        offs_q0, scale_log2, s_layout)
            # The operand registers are named in the wait so that they stay untouched until their products end.
            dv, dk, pt_op = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, pt_op])
            mbarrier.arrive(empty.index(prev), count=1, pred=pending != 0)
            pt_op = gl.convert_layout(pt.to(dtype), a_layout)
            my_dst.store(dst.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # dS^T is written before its product is issued
            prev = slot
            pending = 1
        t = t_end
    if pending != 0:
        dv_tok = warpgroup_mma(pt_op, dot_smem.index(prev), dv, is_async=True)
        dk_tok = warpgroup_mma(my_dst, qt_smem.index(prev), dk, is_async=True)
        dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, pt_op])[:2]
        mbarrier.arrive(empty.index(prev), count=1)
    # K and V of these keys are no longer read: their buffers take dK and dV.
    my_k.store((dk * sm_scale).to(dtype))
    my_v.store(dv.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(dk_desc, [kv_row + n_blk * BLOCK + WG * WG_ROWS, 0], my_k)
    tma.async_copy_shared_to_global(dv_desc, [kv_row + n_blk * BLOCK + WG * WG_ROWS, 0], my_v)
    tma.store_wait(0)

@gluon.jit
def _dkdv_consumer_0(dk_desc, dv_desc, k_smem, v_smem, qt_smem, dot_smem, lse_smem, delta_smem, cnt_smem,
                     first_smem, dst_smem, kv_bar, full, empty, n_blk, kv_row, scale_log2, sm_scale):
    _dkdv_consumer(dk_desc, dv_desc, k_smem, v_smem, qt_smem, dot_smem, lse_smem, delta_smem, cnt_smem, first_smem,
                   dst_smem, kv_bar, full, empty, n_blk, kv_row, scale_log2, sm_scale, 0)

@gluon.jit
def _dkdv_consumer_1(dk_desc, dv_desc, k_smem, v_smem, qt_smem, dot_smem, lse_smem, delta_smem, cnt_smem,
                     first_smem, dst_smem, kv_bar, full, empty, n_blk, kv_row, scale_log2, sm_scale):
    _dkdv_consumer(dk_desc, dv_desc, k_smem, v_smem, qt_smem, dot_smem, lse_smem, delta_smem, cnt_smem, first_smem,
                   dst_smem, kv_bar, full, empty, n_blk, kv_row, scale_log2, sm_scale, 1)

@gluon.jit
def _dkdv_producer(k_desc, v_desc, q_desc, do_desc, LSE, DELTA, Q_CNT, Q_IDX, k_smem, v_smem, qt_smem,  # noqa: N803
                   dot_smem, lse_smem, delta_smem, cnt_smem, first_smem, kv_bar, full, empty, n_blk, bh0, kv_row,
                   seq_len, n_blocks, group):
    """The group's list lengths and first entries (into `cnt_smem`, `first_smem`) and K/V of the key block once,
    then per visited 64-row query tile its Q and dO rows (TMA) and its lse and delta (loaded and written to
    shared memory here) into ring slot t % NS."""
    NUM_WG: gl.constexpr = k_smem.shape[0]
    BLOCK: gl.constexpr = NUM_WG * WG_ROWS
    SUB: gl.constexpr = BLOCK // WG_ROWS
    NS: gl.constexpr = qt_smem.shape[0]
    stat_layout: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    gs = gl.arange(0, cnt_smem.shape[0], layout=gl.BlockedLayout([1], [32], [1], [0]))
    rows = (bh0 + gs).to(gl.int64) * n_blocks + n_blk
    cnts = gl.load(Q_CNT + rows, mask=gs < group, other=0)
    cnt_smem.store(cnts)
    first_smem.store(gl.load(Q_IDX + rows * n_blocks, mask=cnts > 0, other=-1))
    # The arrival of this expect publishes the two rows above to the consumers with K/V.
    mbarrier.expect(kv_bar, 2 * NUM_WG * k_desc.block_type.nbytes)
    for wg in gl.static_range(NUM_WG):
        tma.async_copy_global_to_shared(k_desc, [kv_row + n_blk * BLOCK + wg * WG_ROWS, 0], kv_bar,
                                        k_smem.index(wg))
        tma.async_copy_global_to_shared(v_desc, [kv_row + n_blk * BLOCK + wg * WG_ROWS, 0], kv_bar,
                                        v_smem.index(wg))
    offs = gl.arange(0, WG_ROWS, layout=stat_layout)
    t = 0
    for g in range(0, group):
        bh = bh0 + g
        list_row = bh.to(gl.int64) * n_blocks + n_blk
        cnt = gl.load(Q_CNT + list_row)
        for e in range(0, cnt * SUB):
            m_blk = gl.load(Q_IDX + list_row * n_blocks + e // SUB)
            row = bh.to(gl.int64) * seq_len + m_blk * BLOCK + (e % SUB) * WG_ROWS
            slot = t % NS
            mbarrier.wait(empty.index(slot), ((t // NS) - 1) & 1, pred=t >= NS)
            lse_smem.index(slot).store(gl.load(LSE + row + offs))
            delta_smem.index(slot).store(gl.load(DELTA + row + offs))
            mbarrier.expect(full.index(slot), 2 * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [row.to(gl.int32), 0], full.index(slot),
                                            qt_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [row.to(gl.int32), 0], full.index(slot),
                                            dot_smem.index(slot))
            t += 1

@gluon.jit
def _gluon_sparse_dkdv_kernel(
    q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, Q_IDX, Q_CNT,  # noqa: N803
    scale_log2, sm_scale, seq_len, n_blocks, n_heads_q, n_heads_kv, group,
    CONSUMER_REGS: gl.constexpr,
    NUM_WG: gl.constexpr,
    GROUP_P2: gl.constexpr,
    STAGES: gl.constexpr,
):
    """dK/dV of one key block (NUM_WG * 64 keys) of one KV head; all descriptors have `[64, D]` tiles."""
    dtype: gl.constexpr = k_desc.dtype
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    n_blk = gl.program_id(0)
    bhk = gl.program_id(1)
    bh0 = (bhk // n_heads_kv) * n_heads_q + (bhk % n_heads_kv) * group
    kv_row = bhk * seq_len
    tile_layout: gl.constexpr = q_desc.layout
    k_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, HEAD_DIM], tile_layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, HEAD_DIM], tile_layout)
    qt_smem = gl.allocate_shared_memory(dtype, [STAGES, WG_ROWS, HEAD_DIM], tile_layout)
    dot_smem = gl.allocate_shared_memory(dtype, [STAGES, WG_ROWS, HEAD_DIM], tile_layout)
    vector: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, WG_ROWS], vector)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, WG_ROWS], vector)
    # List lengths and first entries of the group's query heads (GROUP_P2 >= group, padded with 0 / -1).
    cnt_smem = gl.allocate_shared_memory(gl.int32, [GROUP_P2], vector)
    first_smem = gl.allocate_shared_memory(gl.int32, [GROUP_P2], vector)
    square: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_ROWS, WG_ROWS], dtype)
    dst_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_ROWS, WG_ROWS], square)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for slot in gl.static_range(STAGES):
        mbarrier.init(full.index(slot), count=1)
        mbarrier.init(empty.index(slot), count=NUM_WG)
    fence_async_shared()
    consumer_args = (dk_desc, dv_desc, k_smem, v_smem, qt_smem, dot_smem, lse_smem, delta_smem, cnt_smem,
                     first_smem, dst_smem, kv_bar, full, empty, n_blk, kv_row, scale_log2, sm_scale)
    producer_args = (k_desc, v_desc, q_desc, do_desc, LSE, DELTA, Q_CNT, Q_IDX, k_smem, v_smem, qt_smem,
                     dot_smem, lse_smem, delta_smem, cnt_smem, first_smem, kv_bar, full, empty, n_blk, bh0, kv_row,
                     seq_len, n_blocks, group)
    if NUM_WG == 2:
        gl.warp_specialize([(_dkdv_consumer_0, consumer_args), (_dkdv_consumer_1, consumer_args),
                            (_dkdv_producer, producer_args)], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_dkdv_consumer_0, consumer_args), (_dkdv_producer, producer_args)], [1], [24])
