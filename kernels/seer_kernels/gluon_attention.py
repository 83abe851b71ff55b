"""Block-sparse attention forward for Hopper in Gluon: the softmax of one key tile runs while the tensor cores
multiply the previous tile's probabilities by V.

Why a second forward next to `triton_attention._sparse_fwd_kernel`: Triton's compiler waits for every score
matmul before the softmax that reads it, and puts no other matmul in flight meanwhile, so per key tile the
tensor cores and the softmax take turns (about 450-480 TFLOP/s at head_dim 128 on an H200). Gluon states the
waits by hand: tile j's scores are waited for with tile j-1's P V product still running (`warpgroup_mma_wait(1)`),
so the exponentials of tile j overlap that product.

Scope: CUDA Hopper (sm_90), bf16/fp16, head_dim 64 or 128, block 64 or 128, lengths that are multiples of the
block, no document ids, inputs whose (batch, head, position) dims collapse into one row index. Anything else
(and the CPU interpreter, which cannot run Gluon) goes through the Triton forward, which computes the same
function; `gluon_forward_supported` says which.

Layers: `_gluon_sparse_fwd_kernel` (kernel), `gluon_attention_forward` (host launcher with the same contract as
`triton_attention.sparse_attention_forward`).
"""

from __future__ import annotations

import os

import torch

try:  # Gluon is experimental: absent from older Triton, and its API moves between releases.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    GLUON_IMPORT_ERROR: str | None = None
except Exception as err:  # pragma: no cover - depends on the installed Triton
    gluon = None
    GLUON_IMPORT_ERROR = f"{type(err).__name__}: {err}"

from .indexing import num_blocks

LOG2E = 1.4426950408889634


def gluon_forward_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, document_ids: torch.Tensor | None
) -> bool:
    """Whether `gluon_attention_forward` handles these inputs (else use the Triton forward).

    `SEER_KERNELS_GLUON=0` turns the Gluon forward off.
    """
    if gluon is None or os.environ.get("SEER_KERNELS_GLUON", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if document_ids is not None or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-1] not in (64, 128) or block_size not in (64, 128) or q.shape[2] % block_size:
        return False
    return all(_rows_collapse(t) for t in (q, k, v))


def _rows_collapse(t: torch.Tensor) -> bool:
    """`[B, H, L, D]` with D contiguous and (B, H, L) addressable as one row index of stride D."""
    bsz, heads, seq_len, dim = t.shape
    st = t.stride()
    return st[3] == 1 and st[2] == dim and (heads == 1 or st[1] == seq_len * dim) and (
        bsz == 1 or st[0] == heads * seq_len * dim
    ) and t.data_ptr() % 16 == 0


if gluon is not None:

    @gluon.jit
    def _scores_to_probs(s, m_i, l_i, offs_m, n_blk, seq_len, scale_log2, masked,
                         BLOCK: gl.constexpr, s_layout: gl.constexpr):
        """Online-softmax step on one `[BLOCK, BLOCK]` score tile (raw q.k): probabilities in base 2 against the
        new running max, the new max and sum, and the factor that rescales what was accumulated before."""
        if masked:
            offs_n = n_blk * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
            allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < seq_len)
            s = gl.where(allowed, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
        # A row with nothing allowed so far has m_new = -inf: subtract 0 instead so exp2 gives 0, not NaN.
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * scale_log2 - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _issue_tile(desc, bar, smem, row, pred, NBYTES: gl.constexpr):
        mbarrier.expect(bar, NBYTES, pred=pred)
        tma.async_copy_global_to_shared(desc, [row, 0], bar, smem, pred=pred)

    @gluon.jit
    def _gluon_sparse_fwd_kernel(
        q_desc, k_desc, v_desc, o_desc, LSE, KV_IDX, KV_CNT,  # noqa: N803
        scale_log2, seq_len, n_blocks, n_heads_q, group,
        BLOCK: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        Q_IN_REGISTERS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = q_desc.dtype
        # Scores [BLOCK, BLOCK] and output [BLOCK, HEAD_DIM] accumulate in wgmma layouts (16 rows per warp, so
        # each warpgroup owns 64 rows). P goes through shared memory: a wgmma reading P from registers leaves
        # those registers to the allocator once issued, and ptxas then waits for it before the softmax reuses
        # them, which serializes exactly what should overlap.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        TILE_BYTES: gl.constexpr = BLOCK * HEAD_DIM * 2

        # Query blocks vary fastest and the last (longest causal lists) go first, as in the Triton forward.
        bh = gl.program_id(1)
        m_blk = gl.num_programs(0) - 1 - gl.program_id(0)
        b = bh // n_heads_q
        hk = (bh % n_heads_q) // group
        q_row = bh * seq_len + m_blk * BLOCK
        kv_row = (b * (n_heads_q // group) + hk) * seq_len
        list_row = bh.to(gl.int64) * n_blocks + m_blk
        cnt = gl.load(KV_CNT + list_row)
        idx = KV_IDX + list_row * n_blocks

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], q_desc.layout)
        # Two slots each for K and V: slot j % 2 holds tile j; K_{j+2} and V_{j+1} are loaded once tile j is done.
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], v_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, BLOCK], gl.NVMMASharedLayout.get_default_for(
            [BLOCK, BLOCK], dtype))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for slot0 in gl.static_range(2):
            mbarrier.init(k_bars.index(slot0), count=1)
            mbarrier.init(v_bars.index(slot0), count=1)
        fence_async_shared()

        n0 = gl.load(idx, mask=cnt > 0, other=0)
        n1 = gl.load(idx + 1, mask=cnt > 1, other=0)
        n2 = gl.load(idx + 2, mask=cnt > 2, other=0)
        _issue_tile(q_desc, q_bar, q_smem, q_row, cnt > 0, TILE_BYTES)
        _issue_tile(k_desc, k_bars.index(0), k_smem.index(0), kv_row + n0 * BLOCK, cnt > 0, TILE_BYTES)
        _issue_tile(v_desc, v_bars.index(0), v_smem.index(0), kv_row + n0 * BLOCK, cnt > 0, TILE_BYTES)
        _issue_tile(k_desc, k_bars.index(1), k_smem.index(1), kv_row + n1 * BLOCK, cnt > 1, TILE_BYTES)

        offs_m = m_blk * BLOCK + gl.arange(0, BLOCK, layout=row_s)
        m_i = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
        s_init = gl.zeros([BLOCK, BLOCK], gl.float32, layout=s_layout)
        if cnt > 0:
            # Tile 0: scores and probabilities (the last list entry, the diagonal when kept, is masked).
            mbarrier.wait(q_bar, 0)
            if Q_IN_REGISTERS:
                # Q as the register operand of every score product: one shared-memory read instead of one per tile.
                q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
            else:
                q_op = q_smem
            mbarrier.wait(k_bars.index(0), 0)
            s_tok = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            p, m_i, l_i, alpha = _scores_to_probs(s, m_i, l_i, offs_m, n0, seq_len, scale_log2, cnt == 1,
                                                  BLOCK, s_layout)
            p_smem.index(0).store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # P_0 is written; every warpgroup is done with K_0: its slot takes K_2
            _issue_tile(k_desc, k_bars.index(0), k_smem.index(0), kv_row + n2 * BLOCK, cnt > 2, TILE_BYTES)
            _issue_tile(v_desc, v_bars.index(1), v_smem.index(1), kv_row + n1 * BLOCK, cnt > 1, TILE_BYTES)
            n_cur = n1
            n_next = n2
            n_after = gl.load(idx + 3, mask=cnt > 3, other=0)
            for j in range(1, cnt):
                slot = j % 2
                prev = 1 - slot
                # Scores of tile j, then P_{j-1} V_{j-1}; wait for the scores only, so that product runs on
                # the tensor cores while the exponentials of tile j are computed.
                mbarrier.wait(k_bars.index(slot), (j // 2) & 1)
                s_tok = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_bars.index(prev), ((j - 1) // 2) & 1)
                acc_tok = warpgroup_mma(p_smem.index(prev), v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])
                p, m_i, l_i, alpha = _scores_to_probs(s, m_i, l_i, offs_m, n_cur, seq_len, scale_log2,
                                                      j == cnt - 1, BLOCK, s_layout)
                p_smem.index(slot).store(p.to(dtype))
                fence_async_shared()
                acc = warpgroup_mma_wait(0, deps=[acc_tok])
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                gl.thread_barrier()  # P_j is written; K_j, V_{j-1} and P_{j-1} are free in every warpgroup
                _issue_tile(k_desc, k_bars.index(slot), k_smem.index(slot), kv_row + n_after * BLOCK, j + 2 < cnt,
                            TILE_BYTES)
                _issue_tile(v_desc, v_bars.index(prev), v_smem.index(prev), kv_row + n_next * BLOCK, j + 1 < cnt,
                            TILE_BYTES)
                # Block numbers are read a tile ahead of their use, so no warp waits on a load here.
                n_far = gl.load(idx + j + 3, mask=j + 3 < cnt, other=0)
                n_cur = n_next
                n_next = n_after
                n_after = n_far
            last = (cnt - 1) % 2
            mbarrier.wait(v_bars.index(last), ((cnt - 1) // 2) & 1)
            acc_tok = warpgroup_mma(p_smem.index(last), v_smem.index(last), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])

        empty = l_i == 0.0
        out = acc / gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)[:, None]
        # +inf for an empty row makes every recomputed probability of that row 0 in the backward.
        lse = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))
        gl.thread_barrier()  # every warpgroup's last score product has read Q: its buffer takes the output
        q_smem.store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
        gl.store(LSE + bh.to(gl.int64) * seq_len + offs_m, lse)
        tma.store_wait(0)
        mbarrier.invalidate(q_bar)
        for slot0 in gl.static_range(2):
            mbarrier.invalidate(k_bars.index(slot0))
            mbarrier.invalidate(v_bars.index(slot0))


    # ------------------------------------------------------------------ warp-specialized variant
    # One producer warp streams K and V through two-slot rings (full/empty mbarriers); two consumer
    # warpgroups, each owning 64 query rows, run in separate partitions, so they never wait for each other
    # and one's exponentials naturally overlap the other's matrix products.

    @gluon.jit
    def _ws_consumer(q_desc, o_desc, LSE, q_smem, k_smem, v_smem, p_smem, q_bar, k_full, k_empty, v_full, v_empty,
                     idx, cnt, q_row, lse_row, m_blk, seq_len, scale_log2, WG: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        BLOCK: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        ROWS: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_m = m_blk * BLOCK + WG * ROWS + gl.arange(0, ROWS, layout=row_s)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        s_init = gl.zeros([ROWS, BLOCK], gl.float32, layout=s_layout)
        my_q = q_smem.index(WG)
        # Block number of the last entry: the only one masked (the diagonal when it is kept).
        n_last = gl.load(idx + cnt - 1, mask=cnt > 0, other=0)
        if cnt > 0:
            mbarrier.wait(q_bar, 0)
            q_op = my_q.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
            mbarrier.wait(k_full.index(0), 0)
            s_tok = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(0), count=1)
            p, m_i, l_i, alpha = _scores_to_probs(s, m_i, l_i, offs_m, n_last, seq_len, scale_log2, cnt == 1,
                                                  BLOCK, s_layout)
            p_smem.index(WG * 2).store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            for j in range(1, cnt):
                slot = j % 2
                prev = 1 - slot
                mbarrier.wait(k_full.index(slot), (j // 2) & 1)
                s_tok = warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), s_init, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_full.index(prev), ((j - 1) // 2) & 1)
                acc_tok = warpgroup_mma(p_smem.index(WG * 2 + prev), v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_tok])
                mbarrier.arrive(k_empty.index(slot), count=1)
                p, m_i, l_i, alpha = _scores_to_probs(s, m_i, l_i, offs_m, n_last, seq_len, scale_log2,
                                                      j == cnt - 1, BLOCK, s_layout)
                p_smem.index(WG * 2 + slot).store(p.to(dtype))
                fence_async_shared()
                acc = warpgroup_mma_wait(0, deps=[acc_tok])
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                gl.thread_barrier()  # this warpgroup's P_j is complete before its product is issued
            last = (cnt - 1) % 2
            mbarrier.wait(v_full.index(last), ((cnt - 1) // 2) & 1)
            acc_tok = warpgroup_mma(p_smem.index(WG * 2 + last), v_smem.index(last), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            mbarrier.arrive(v_empty.index(last), count=1)
        empty = l_i == 0.0
        out = acc / gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)[:, None]
        lse = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))
        # This warpgroup's Q rows went to registers at the start: their buffer takes the output.
        my_q.store(out.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(o_desc, [q_row + WG * ROWS, 0], my_q)
        gl.store(LSE + lse_row + offs_m, lse)
        tma.store_wait(0)

    @gluon.jit
    def _ws_consumer_0(q_desc, o_desc, LSE, q_smem, k_smem, v_smem, p_smem, q_bar, k_full, k_empty, v_full,  # noqa: N803
                       v_empty, idx, cnt, q_row, lse_row, m_blk, seq_len, scale_log2):
        _ws_consumer(q_desc, o_desc, LSE, q_smem, k_smem, v_smem, p_smem, q_bar, k_full, k_empty, v_full, v_empty, idx, cnt, q_row, lse_row, m_blk, seq_len, scale_log2, 0)

    @gluon.jit
    def _ws_consumer_1(q_desc, o_desc, LSE, q_smem, k_smem, v_smem, p_smem, q_bar, k_full, k_empty, v_full,  # noqa: N803
                       v_empty, idx, cnt, q_row, lse_row, m_blk, seq_len, scale_log2):
        _ws_consumer(q_desc, o_desc, LSE, q_smem, k_smem, v_smem, p_smem, q_bar, k_full, k_empty, v_full, v_empty, idx, cnt, q_row, lse_row, m_blk, seq_len, scale_log2, 1)

    @gluon.jit
    def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty,
                     idx, cnt, q_row, kv_row):
        BLOCK: gl.constexpr = k_smem.shape[1]
        TILE_BYTES: gl.constexpr = k_desc.block_type.nbytes
        mbarrier.expect(q_bar, TILE_BYTES, pred=cnt > 0)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0), pred=cnt > 0)
        tma.async_copy_global_to_shared(q_desc, [q_row + 64, 0], q_bar, q_smem.index(1), pred=cnt > 0)
        n_prev = gl.load(idx)
        # Step j loads K_j and V_{j-1}: keys run one tile ahead of values, as the consumers use them.
        for j in range(0, cnt + 1):
            if j < cnt:
                n_blk = gl.load(idx + j)
                slot = j % 2
                mbarrier.wait(k_empty.index(slot), ((j // 2) - 1) & 1, pred=j >= 2)
                mbarrier.expect(k_full.index(slot), TILE_BYTES)
                tma.async_copy_global_to_shared(k_desc, [kv_row + n_blk * BLOCK, 0], k_full.index(slot),
                                                k_smem.index(slot))
            else:
                n_blk = n_prev
            if j >= 1:
                vslot = (j - 1) % 2
                mbarrier.wait(v_empty.index(vslot), (((j - 1) // 2) - 1) & 1, pred=j >= 3)
                mbarrier.expect(v_full.index(vslot), TILE_BYTES)
                tma.async_copy_global_to_shared(v_desc, [kv_row + n_prev * BLOCK, 0], v_full.index(vslot),
                                                v_smem.index(vslot))
            n_prev = n_blk

    @gluon.jit
    def _gluon_ws_fwd_kernel(
        q_desc, k_desc, v_desc, o_desc, LSE, KV_IDX, KV_CNT,  # noqa: N803
        scale_log2, seq_len, n_blocks, n_heads_q, group,
        BLOCK: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = k_desc.dtype
        bh = gl.program_id(1)
        m_blk = gl.num_programs(0) - 1 - gl.program_id(0)
        b = bh // n_heads_q
        hk = (bh % n_heads_q) // group
        q_row = bh * seq_len + m_blk * BLOCK
        kv_row = (b * (n_heads_q // group) + hk) * seq_len
        list_row = bh.to(gl.int64) * n_blocks + m_blk
        cnt = gl.load(KV_CNT + list_row)
        idx = KV_IDX + list_row * n_blocks
        lse_row = bh.to(gl.int64) * seq_len

        q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], v_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [4, 64, BLOCK], gl.NVMMASharedLayout.get_default_for(
            [64, BLOCK], dtype))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for slot0 in gl.static_range(2):
            mbarrier.init(k_full.index(slot0), count=1)
            mbarrier.init(v_full.index(slot0), count=1)
            mbarrier.init(k_empty.index(slot0), count=2)  # one arrival per consumer warpgroup
            mbarrier.init(v_empty.index(slot0), count=2)
        fence_async_shared()
        consumer_args = (q_desc, o_desc, LSE, q_smem, k_smem, v_smem, p_smem, q_bar, k_full, k_empty, v_full,
                         v_empty, idx, cnt, q_row, lse_row, m_blk, seq_len, scale_log2)
        gl.warp_specialize([
            (_ws_consumer_0, consumer_args),
            (_ws_consumer_1, consumer_args),
            (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full,
                            v_empty, idx, cnt, q_row, kv_row)),
        ], [4, 1], [CONSUMER_REGS, 24])


def _row_descriptor(t: torch.Tensor, block: int):
    """A 2-D `[B * H * L, D]` TMA descriptor of `t` with `[block, D]` tiles."""
    rows = t.shape[0] * t.shape[1] * t.shape[2]
    dim = t.shape[3]
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block, dim], dtype)
    return TensorDescriptor(t, [rows, dim], [dim, 1], [block, dim], layout)


def gluon_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    variant: str = "ws",
    consumer_regs: int = 232,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Gluon forward (same contract as `triton_attention.sparse_attention_forward`, no documents).

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]`, each passing `gluon_forward_supported`.
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]` (`block_mask_to_indices`).
        out, lse: optional preallocated outputs (`[B, Hq, L, D]` like q, contiguous; float32 `[B, Hq, L]`).
    Returns:
        `(out, lse)`, lse in base 2, +inf for rows with no allowed key.
    """
    bsz, hq, seq_len, dim = q.shape
    nb = num_blocks(seq_len, block_size)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device)
    if not _rows_collapse(out):
        raise ValueError("out must be contiguous for the Gluon forward")
    if variant == "ws" and block_size == 128:
        q_d, o_d = _row_descriptor(q, 64), _row_descriptor(out, 64)
        k_d, v_d = _row_descriptor(k, block_size), _row_descriptor(v, block_size)
        _gluon_ws_fwd_kernel[(nb, bsz * hq)](
            q_d, k_d, v_d, o_d, lse, kv_indices, kv_counts,
            sm_scale * LOG2E, seq_len, nb, hq, hq // k.shape[1],
            BLOCK=block_size, HEAD_DIM=dim, CONSUMER_REGS=consumer_regs, num_warps=4,
        )
    else:
        descs = [_row_descriptor(t, block_size) for t in (q, k, v, out)]
        _gluon_sparse_fwd_kernel[(nb, bsz * hq)](
            *descs, lse, kv_indices, kv_counts,
            sm_scale * LOG2E, seq_len, nb, hq, hq // k.shape[1],
            BLOCK=block_size, HEAD_DIM=dim, Q_IN_REGISTERS=variant != "simple", num_warps=block_size // 16,
        )
    return out, lse
