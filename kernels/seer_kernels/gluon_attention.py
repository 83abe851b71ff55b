"""Block-sparse attention forward, dQ and dK/dV for Hopper in Gluon, warp-specialized.

Why these next to the Triton kernels of `triton_attention`: in Triton the two warpgroups of a 128-row program run
in lockstep and every matrix product is waited for before the softmax that reads it, so the tensor cores and
the exponentials take turns. Here each program is split by `gl.warp_specialize` into
- a producer warp that streams tiles through shared-memory rings (TMA, full/empty mbarriers): K and V for the
  forward and dQ, Q and dO (with their lse and delta) for dK/dV;
- one or two consumer warpgroups of 64 rows (query rows; keys in dK/dV), in separate partitions: they never wait
  for each other, so one's exponentials run while the other's products are on the tensor cores.
On an H200 (B=1, 32/8 heads, head_dim 128, L=32768) the forward runs 1.12-1.16x faster than the Triton forward
(benchmarks/results/kernel_variants_h200/sweep13c). Where block == head_dim the forward and dQ take several query
blocks per program (`ITEMS_PER_PROGRAM`), pairing long causal lists with short ones, so the next block's loads
overlap the current block's last tiles and output store (another 2-5%, sweep 15). The dQ kernel also computes
delta = rowsum(O dO), which the dK/dV kernels read. With the dK/dV kernel (sweep 16) the whole backward at
d=0.1 / 1.0 takes 5.57 / 51.2 ms against 5.77 / 54.2 for the Triton kernels.

Scope: CUDA Hopper (sm_90), bf16/fp16, block 64 or 128 (one or two consumer warpgroups: at block 64 two programs
share a multiprocessor instead, except in dK/dV, whose shared memory then leaves one, so the backward uses it at
block 128 unless forced), head_dim 64 or 128, lengths that are multiples of the block, no document ids,
`[B, H, L, D]` inputs whose (batch, head, position) dims collapse into one row index.
Also only with Triton 3.6, the release they were built and tested with (Gluon's API changed after it). Anything
else (and the CPU interpreter, which cannot run Gluon) goes through the Triton kernels, which compute the same
functions; `gluon_supported` says which. `SEER_KERNELS_GLUON=0` turns these kernels off.

Notes from building them (sweeps 13, 16-19): in the forward, P reaches the second product through shared memory,
not registers: a wgmma reading its A operand from registers leaves them to ptxas's allocator once issued, and ptxas
then waits for the wgmma before the softmax reuses them. In dK/dV, which is bound by shared-memory reads (84% of
L1 throughput at d=0.1 under ncu), P^T stays in registers: naming it in the wait of its product keeps it
allocated, and at 240 registers per consumer thread ptxas does not serialize the products (at 232 it does, and
with dS^T in registers too at either count). dK/dV 1-2.5% faster, bitwise equal (sweep 19). A single partition of two warpgroups (same overlap, CTA-wide barriers)
measured no faster than Triton. A shared-memory slot read into registers (the forward's Q) goes back to the TMA
producer only after a product has consumed those registers and a proxy fence: handed back right after the load,
a row occasionally computed with the next block's Q.

Layers: `_gluon_sparse_fwd_kernel` / `_gluon_sparse_dq_kernel` / `_gluon_sparse_dkdv_kernel` (kernels, with their
partitions), and the host launchers `gluon_attention_forward` / `gluon_attention_dq` / `gluon_attention_dkdv`
(same contracts as the Triton launchers).
"""

from __future__ import annotations

import os

import torch

import triton

# Gluon is experimental and its API moves between releases (Triton 3.9 renamed or removed several of the calls
# below), so the kernels run only on the release they were built and tested with; elsewhere Triton's run.
TESTED_TRITON = "3.6."
try:
    if not triton.__version__.startswith(TESTED_TRITON):
        raise ImportError(f"the Gluon kernels are tested with Triton {TESTED_TRITON}x only, found {triton.__version__}")
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
ROWS = 64  # query rows per consumer warpgroup (one wgmma M): block 128 has two consumers, block 64 one
# Registers per thread of the second consumer warpgroup (the first gets what is left, the producer warp 24).
CONSUMER_REGS = 232
# The dK/dV consumers need 240: with fewer, ptxas serializes their matrix products (P^T is a register operand).
DKDV_CONSUMER_REGS = 240
# Query blocks per program, per kernel. With several, a program pairs long and short causal lists and its producer
# loads the next block's rows and first K/V tiles while the consumers finish the current one, instead of a new
# program paying its start-up (launch, first loads) and its output store in the open. Fastest on an H200
# (sweep 15): forward 4 (d=0.1: 1.68 ms against 1.76 with one), dQ 2 (2.47 against 2.57-2.68; 4 measured 2.58).
ITEMS_PER_PROGRAM = {"fwd": 4, "dq": 2}
# Query tiles (Q, dO, lse, delta of 64 rows) in flight per dK/dV program: four hide the producer's load latency
# (H200, backward at d=0.1 / 1.0: 5.59 / 51.5 ms with four, 6.09 / 57.4 with two, against 5.79 / 54.3 for the
# Triton kernels in the same call); a fifth does not fit in the shared memory at block 128 and head_dim 128.
DKDV_STAGES = 4


def gluon_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, document_ids: torch.Tensor | None
) -> bool:
    """Whether the Gluon kernels handle these inputs (else the Triton ones run)."""
    if gluon is None or os.environ.get("SEER_KERNELS_GLUON", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if document_ids is not None or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if block_size not in (64, 128) or q.shape[-1] not in (64, 128) or q.shape[2] % block_size:
        return False
    return all(rows_collapse(t) for t in (q, k, v))


def rows_collapse(t: torch.Tensor) -> bool:
    """`[B, H, L, D]` with D contiguous and (B, H, L) addressable as one row index of stride D."""
    bsz, heads, seq_len, dim = t.shape
    st = t.stride()
    return (
        st[3] == 1
        and st[2] == dim
        and (heads == 1 or st[1] == seq_len * dim)
        and (bsz == 1 or st[0] == heads * seq_len * dim)
        and t.data_ptr() % 16 == 0
    )


if gluon is not None:

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

    # ------------------------------------------------------------------------------------------- forward

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
                    # fence orders them before the asynchronous proxy's writes (released earlier, a row was seen
                    # to pick up the next item's Q on an H200).
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

    # ------------------------------------------------------------------------------------------------ dQ

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


    # --------------------------------------------------------------------------------------------- dK/dV

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


def _row_descriptor(t: torch.Tensor, rows: int):
    """A 2-D `[B * H * L, D]` TMA descriptor of `t` with `[rows, D]` tiles."""
    dim = t.shape[3]
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, dim], dtype)
    return TensorDescriptor(t, [t.shape[0] * t.shape[1] * t.shape[2], dim], [dim, 1], [rows, dim], layout)


def _launch_registers(block_size: int) -> dict:
    """Block 64 runs one consumer warpgroup (232 registers) and the producer (24): a 128-register launch cap
    lets two programs share a multiprocessor, whose warpgroups then overlap like block 128's two consumers."""
    return {"maxnreg": 128} if block_size == 64 else {}


def program_items(kind: str, items: int | None, block_size: int, head_dim: int) -> int:
    """Query blocks per program of kernel `kind` ('fwd' or 'dq'; `ITEMS_PER_PROGRAM[kind]` unless given): more
    than one only where block == head_dim (the output tile then leaves through a P / dS slot while the next
    block's rows load into the Q slot)."""
    items = ITEMS_PER_PROGRAM[kind] if items is None else items
    if items < 1:
        raise ValueError(f"items per program must be >= 1, got {items}")
    return items if block_size == head_dim else 1


def _check_output(t: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or not rows_collapse(t):
        raise ValueError(f"{name} must be a contiguous {tuple(like.shape)} {like.dtype} tensor for the Gluon kernels")


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
    items: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Gluon forward (contract of `triton_attention.sparse_attention_forward`, no documents).

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]`, passing `gluon_supported`.
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]` (`block_mask_to_indices`).
        out, lse: optional preallocated outputs (contiguous `[B, Hq, L, D]` like q; float32 `[B, Hq, L]`).
        items: query blocks per program (see `program_items`; default `ITEMS_PER_PROGRAM`).
    Returns:
        `(out, lse)`, lse in base 2, +inf for rows with no allowed key.
    """
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device) if lse is None else lse
    _check_output(out, q, "out")
    items = program_items("fwd", items, block_size, q.shape[-1])
    _gluon_sparse_fwd_kernel[(triton.cdiv(nb, items), bsz * hq)](
        _row_descriptor(q, ROWS), _row_descriptor(k, block_size), _row_descriptor(v, block_size),
        _row_descriptor(out, ROWS), lse, kv_indices, kv_counts,
        sm_scale * LOG2E, seq_len, nb, hq, hq // k.shape[1],
        CONSUMER_REGS=CONSUMER_REGS, ITEMS=items, num_warps=4, **_launch_registers(block_size),
    )
    return out, lse


def gluon_attention_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    dq: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    items: int | None = None,
) -> torch.Tensor:
    """Launch the Gluon dQ kernel into `dq` and `delta` (the delta and dQ parts of
    `triton_attention.sparse_attention_backward`).

    Args:
        q, out, dout, dq: `[B, Hq, L, D]` (out, dq contiguous); k, v: `[B, Hkv, L, D]`; all passing
            `gluon_supported`.
        lse: float32 `[B, Hq, L]` from the forward; delta: float32 `[B, Hq, L]`, written: rowsum(out * dout)
            (0 for query blocks that kept nothing), which the dK/dV kernels read.
        kv_indices / kv_counts: the forward's block lists.
        items: query blocks per program (see `program_items`; default `ITEMS_PER_PROGRAM`).
    Returns:
        `dq`.
    """
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    _check_output(dq, q, "dq")
    _check_output(out, q, "out")
    items = program_items("dq", items, block_size, q.shape[-1])
    _gluon_sparse_dq_kernel[(triton.cdiv(nb, items), bsz * hq)](
        _row_descriptor(q, ROWS), _row_descriptor(k, block_size), _row_descriptor(v, block_size),
        _row_descriptor(dout, ROWS), _row_descriptor(dq, ROWS), out, lse, delta, kv_indices, kv_counts,
        sm_scale * LOG2E, sm_scale, seq_len, nb, hq, hq // k.shape[1],
        CONSUMER_REGS=CONSUMER_REGS, ITEMS=items, num_warps=4, **_launch_registers(block_size),
    )
    return dq


def gluon_attention_dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_indices: torch.Tensor,
    q_counts: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Gluon dK/dV kernel into `dk`, `dv` (the dK/dV part of `triton_attention.sparse_attention_backward`).

    Args:
        q, dout: `[B, Hq, L, D]`; k, v, dk, dv: `[B, Hkv, L, D]` (dk, dv contiguous); all passing `gluon_supported`.
        lse, delta: float32 `[B, Hq, L]` (forward's base-2 lse; rowsum(out * dout)).
        q_indices / q_counts: the transposed block lists (`block_mask_to_indices(..., transpose=True)`).
        stages: query tiles in flight per program (default `DKDV_STAGES`).
    Returns:
        `(dk, dv)`.
    """
    bsz, hq, seq_len, _ = q.shape
    hkv = k.shape[1]
    nb = num_blocks(seq_len, block_size)
    _check_output(dk, k, "dk")
    _check_output(dv, v, "dv")
    group = hq // hkv
    _gluon_sparse_dkdv_kernel[(nb, bsz * hkv)](
        _row_descriptor(q, ROWS), _row_descriptor(k, ROWS), _row_descriptor(v, ROWS), _row_descriptor(dout, ROWS),
        _row_descriptor(dk, ROWS), _row_descriptor(dv, ROWS), lse, delta, q_indices, q_counts,
        sm_scale * LOG2E, sm_scale, seq_len, nb, hq, hkv, group,
        CONSUMER_REGS=DKDV_CONSUMER_REGS, NUM_WG=block_size // ROWS, GROUP_P2=triton.next_power_of_2(group),
        STAGES=stages or DKDV_STAGES, num_warps=4, **_launch_registers(block_size),
    )
    return dk, dv
