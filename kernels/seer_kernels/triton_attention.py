"""Block-sparse flash attention in Triton: forward and backward, native GQA, document masks.

Layers, from the bottom: `@triton.jit` kernels (`_sparse_fwd_kernel`, `_bwd_delta_kernel`, `_sparse_dq_kernel`,
`_sparse_dkdv_kernel`), host launchers (`sparse_attention_forward`, `sparse_attention_backward`), the
autograd function `BlockSparseAttention`, and the public `block_sparse_attention`. On Hopper the launchers hand
the inputs the warp-specialized Gluon kernels support (`gluon_attention`) to them instead (`pick_gluon`).

Work is driven by lists of blocks (see `indexing.block_mask_to_indices`):
- forward and dQ: one program per (batch, query head, query tile) walks the key blocks of its query block;
- dK/dV: one program per (batch, KV head, key tile) walks, for each query head of its group, the query blocks
  that kept this key block, so dK/dV are accumulated in registers and written once (no atomics) while K/V stay
  at their own head count.
Scores are kept in base 2 (`qk * sm_scale * log2(e)`) so the softmax uses exp2; the saved log-sum-exp is in
the same units.

Masking. Without document ids only the diagonal block needs the token-level mask: a causal list of query block
i holds key blocks <= i, and the one partial block (the last) can only be the diagonal of the last row. Lists
are ascending, so the diagonal is the last entry of a forward/dQ list and the first of a dK/dV list; the
kernels run the other entries in an unmasked loop and the diagonal in a masked one (no branch in the hot loop);
forward and dQ mask their last entry whether or not it is the diagonal (one load less before the loop).
With document ids every tile is masked.

Tiles. In the interpreter a tile is a whole block. On a GPU, inputs of at least `AUTOTUNE_MIN_LEN` tokens pick
their tile shape with Triton's autotuner among a few candidates (once per length, head count and flags;
`SEER_KERNELS_AUTOTUNE=0` turns this off), shorter ones take the first candidate. Grids put tiles on the fastest
axis so the programs in flight share one KV head, whose K/V then stay in L2 however scattered the kept blocks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import gluon_attention
from .indexing import block_mask_to_indices, document_block_overlap, num_blocks

LOG2E = 1.4426950408889634
# Below this length the problem is too small for tuning to pay (and tests would compile every candidate).
AUTOTUNE_MIN_LEN = 4096


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning(seq_len: int) -> bool:
    """Whether launches of this length pick their tiles by Triton's autotuner (GPU only)."""
    if interpreting() or os.environ.get("SEER_KERNELS_AUTOTUNE", "1") == "0":
        return False
    return seq_len >= AUTOTUNE_MIN_LEN


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch settings of one kernel. `block_m` and `block_n` divide the sparsity block."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidates per kernel for (block 128 | block 64); the first is also the untuned default (the autotuner's pick
# on an H200 at L=32768, see benchmarks/results/). Chosen around the shapes that wgmma likes on Hopper: 64 rows
# per warpgroup, 64/128-wide key tiles.
_CANDIDATES = {
    "fwd": {
        128: [
            TileConfig(128, 128, 8, 3), TileConfig(128, 128, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3),
            TileConfig(64, 128, 4, 3),
        ],
        64: [TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 4), TileConfig(64, 32, 4, 3)],
    },
    "dq": {
        128: [TileConfig(128, 128, 8, 2), TileConfig(64, 128, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(128, 64, 8, 2)],
        64: [TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 3)],
    },
    # 4-warp 64 x 64 tiles let two programs share an SM: one's softmax overlaps the other's matmuls.
    "dkdv": {
        128: [TileConfig(64, 64, 4, 2), TileConfig(64, 128, 8, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 128, 8, 3)],
        64: [TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(32, 64, 4, 2)],
    },
    # The ground-truth kernel takes whole query blocks (block_m = block, see KERNEL_OPTIONS["gt"]["ROWS"]); only
    # the key tile varies, up to two key blocks wide.
    "gt": {
        128: [TileConfig(128, 128, 4, 2), TileConfig(128, 128, 8, 2), TileConfig(128, 128, 8, 3), TileConfig(128, 64, 4, 2)],
        64: [TileConfig(64, 128, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 128, 8, 2), TileConfig(64, 128, 4, 3)],
    },
}


def candidates(kind: str, block: int) -> list[TileConfig]:
    """Tile candidates for `kind` in ('fwd', 'dq', 'dkdv', 'gt'), clamped to small blocks (tests)."""
    table = _CANDIDATES[kind]
    cands = table.get(block) or [TileConfig(min(64, block), min(64, block), 4, 2)]
    widest = 2 * block if kind == "gt" else block  # a ground-truth key tile may span two key blocks
    out = []
    for c in cands:
        clamped = TileConfig(min(c.block_m, block), min(c.block_n, widest), c.num_warps, c.num_stages)
        if clamped not in out:
            out.append(clamped)
    return out


def default_config(kind: str, block: int) -> TileConfig:
    """The untuned choice: whole blocks in the interpreter (fewest steps), else the first candidate."""
    if interpreting():
        return TileConfig(block, block, 4, 1)
    return candidates(kind, block)[0]


# Kernel variants (constexpr switches), per kind. The defaults are what measured fastest on an H200
# (benchmarks/explore_attention_variants.py); every variant computes the same function and is tested.
# - TMA: the tiles streamed in the loops come through host-made tensor descriptors (TMA copies on Hopper; 1) or
#   pointer loads (0). Descriptors made inside the kernels measured no better and were dropped.
# - SEGMENTS (dkdv): persistent dK/dV programs over a work list that cuts long key-block lists into segments
#   (`_sparse_dkdv_segments_kernel`), so a column kept by every row (a sink block) does not become one long program.
# - ROWS (gt): rows per ground-truth program: max(1, ROWS // block) query blocks share one tile, so block 64 runs
#   on the 128-row tiles that wgmma likes (16.3 ms against 17.5 with one 64-row block per program, sweep 9).
KERNEL_OPTIONS: dict[str, dict[str, int]] = {
    "fwd": {"TMA": 1},
    "dq": {"TMA": 1},
    "dkdv": {"TMA": 1, "SEGMENTS": 0},
    "gt": {"TMA": 1, "ROWS": 128},
}


def _descriptor_ok(t: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base and strides (the last dim contiguous)."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1])


def kernel_options(kind: str, *streamed: torch.Tensor) -> dict[str, int]:
    """The constexpr switches for a launch of `kind` whose loops stream `streamed` tensors; descriptors fall back
    to pointer loads for tensors TMA cannot address."""
    opts = dict(KERNEL_OPTIONS[kind])
    if opts.get("TMA") and not all(_descriptor_ok(t) for t in streamed):
        opts["TMA"] = 0
    return opts


def host_descriptor(t: torch.Tensor, rows_key: str):
    """A `[B, H, L, D]` TMA descriptor of `t` whose tile is `[1, 1, meta[rows_key], D]` (set per launch config)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    desc = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[-1]])
    desc.seer_rows_key = rows_key
    return desc


def _set_descriptor_tiles(nargs: dict) -> None:
    """Autotuner pre-hook (and explicit-config step): size each host descriptor's tile for the config."""
    for value in nargs.values():
        key = getattr(value, "seer_rows_key", None)
        if key is not None:
            value.block_shape = [1, 1, nargs[key], value.shape[-1]]


_TUNERS: dict = {}
# Float32 dK/dV accumulators and arrival counters of the segmented dK/dV kernel, per (device, stream): all zeros
# between launches (the kernel restores them), grown when a larger problem comes.
_SEGMENT_SCRATCH: dict = {}
# Shortest segment the work list cuts (entries of a group list); shorter lists stay whole.
MIN_SEGMENT = 16


def _segment_scratch(device: torch.device, acc_numel: int, n_counters: int):
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _SEGMENT_SCRATCH.get(key)
    if buf is None or buf[0].numel() < acc_numel or buf[2].numel() < n_counters:
        buf = (
            torch.zeros(acc_numel, dtype=torch.float32, device=device),
            torch.zeros(acc_numel, dtype=torch.float32, device=device),
            torch.zeros(n_counters, dtype=torch.int32, device=device),
        )
        _SEGMENT_SCRATCH[key] = buf
    return buf


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent dK/dV kernel: two per multiprocessor (its 4-warp tiles fit two), a few in the
    interpreter (enough to exercise the shared work counter)."""
    if device.type != "cuda":
        return 3
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _tuning_bench(kernel_call, quantiles):
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=50, rep=300, quantiles=quantiles)


def check_kernel_kwargs(kernel, kwargs: dict) -> None:
    """Unknown keyword arguments: the GPU launcher rejects them but the interpreter ignores them, so CPU tests
    check here."""
    unknown = set(kwargs) - set(kernel.arg_names)
    if unknown:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        raise TypeError(f"{name} got unknown arguments {sorted(unknown)}")


def launch(kernel, kind: str, block: int, seq_len: int, grid, args: tuple, kwargs: dict, config=None):
    """Launch `kernel` with an explicit config, or through a per (kernel, block) autotuner on long inputs.

    `grid` maps the tile meta-parameters (`BLOCK_M`, `BLOCK_N`) to the launch grid. The tuners key on the
    sizes and flags that change the best tile, so a new length or head count is tuned once.
    """
    names = ("BLOCK_N",) if kind == "gt" else ("BLOCK_M", "BLOCK_N")
    check_kernel_kwargs(kernel, {**kwargs, **{n: 0 for n in names}})
    if config is None and autotuning(seq_len):
        key = (kind, block, tuple(sorted((n, v) for n, v in kwargs.items() if isinstance(v, (bool, int)))))
        tuner = _TUNERS.get(key)
        if tuner is None:
            configs = [
                triton.Config(
                    {n: v for n, v in zip(("BLOCK_M", "BLOCK_N"), (c.block_m, c.block_n)) if n in names},
                    num_warps=c.num_warps,
                    num_stages=c.num_stages,
                    pre_hook=_set_descriptor_tiles,
                )
                for c in candidates(kind, block)
            ]
            keys = ["seq_len", "n_heads_q", "HAS_DOCS", "HEAD_DIM"] + (["HAS_LSE"] if kind == "gt" else [])
            # Longer timing than Triton's default (25 ms warm-up, 100 ms): candidates a few percent apart
            # were otherwise picked by noise on 20 ms kernels.
            tuner = triton.autotune(configs=configs, key=keys, do_bench=_tuning_bench)(kernel)
            _TUNERS[key] = tuner
        tuner[grid](*args, **kwargs)
        return
    cfg = config or default_config(kind, block)
    meta = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    _set_descriptor_tiles({**meta, **{str(i): a for i, a in enumerate(args)}})
    kernel[grid(meta)](
        *args, **kwargs, **{n: meta[n] for n in names}, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )


def tuned_choices() -> dict[str, str]:
    """What the autotuners picked so far, as `{"kind bs<block> <flags>": str(config)}` (for benchmark reports)."""
    out = {}
    for (kind, block, flags), tuner in _TUNERS.items():
        name = f"{kind} bs{block} " + ",".join(f"{n}={v}" for n, v in flags if n not in ("BLOCK", "HEAD_DIM"))
        out[name] = str(getattr(tuner, "best_config", None))
    return out


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _head(X, b, h, stride_b, stride_h):  # noqa: N803
    """Pointer to head h of batch element b of a `[B, H, ...]` tensor (64-bit offsets: large tensors)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _row_ptrs(head, offs, stride_l, HEAD_DIM: tl.constexpr):
    """Pointers `[len(offs), HEAD_DIM]` to rows `offs` of one head (`_head`)."""
    return head + offs[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_rows(src, desc_b, desc_h, row0, offs, stride, seq_len,
               ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """`[ROWS, HEAD_DIM]` tile (rows `offs` = row0 + arange) of one head of Q/K/V/dO.

    `src` is a pointer to the head (TMA 0) or a host-made descriptor of the whole `[B, H, L, D]` tensor (TMA 1).
    Descriptors load rows past the end as zeros; pointer loads do so when CHECK_ROWS."""
    if TMA:
        tile = src.load([desc_b, desc_h, row0, 0]).reshape([ROWS, HEAD_DIM])
    elif CHECK_ROWS:
        tile = tl.load(_row_ptrs(src, offs, stride, HEAD_DIM), mask=(offs < seq_len)[:, None], other=0.0)
    else:
        tile = tl.load(_row_ptrs(src, offs, stride, HEAD_DIM))
    return tile


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
        k = _load_rows(k_base, desc_b, desc_h, row0, offs_n, stride_kl, seq_len, BLOCK_N, HEAD_DIM, TMA,
                       MASKED and not EVEN_L)
        v = _load_rows(v_base, desc_b, desc_h, row0, offs_n, stride_vl, seq_len, BLOCK_N, HEAD_DIM, TMA,
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
    q_ptrs = _row_ptrs(_head(Q, b, h, stride_qb, stride_qh), offs_m, stride_ql, HEAD_DIM)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = _head(K, b, hk, stride_kb, stride_kh)
        v_base = _head(V, b, hk, stride_vb, stride_vh)
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
    o_ptrs = _row_ptrs(_head(O, b, h, stride_ob, stride_oh), offs_m, stride_ol, HEAD_DIM)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


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
        _row_ptrs(_head(O, b, h, stride_ob, stride_oh), offs_m, stride_ol, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        _row_ptrs(_head(DO, b, h, stride_db, stride_dh), offs_m, stride_dl, HEAD_DIM),
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
        k = _load_rows(k_base, desc_b, desc_h, row0, offs_n, stride_kl, seq_len, BLOCK_N, HEAD_DIM, TMA,
                       MASKED and not EVEN_L)
        v = _load_rows(v_base, desc_b, desc_h, row0, offs_n, stride_vl, seq_len, BLOCK_N, HEAD_DIM, TMA,
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
        _row_ptrs(_head(Q, b, h, stride_qb, stride_qh), offs_m, stride_ql, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        _row_ptrs(_head(DO, b, h, stride_dob, stride_doh), offs_m, stride_dol, HEAD_DIM),
        mask=row_ok[:, None],
        other=0.0,
    )
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = _head(K, b, hk, stride_kb, stride_kh)
        v_base = _head(V, b, hk, stride_vb, stride_vh)
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
        _row_ptrs(_head(DQ, b, h, stride_dqb, stride_dqh), offs_m, stride_dql, HEAD_DIM),
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


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
    q = _load_rows(q_src, desc_b, desc_h, row0, offs_m, stride_ql, seq_len, BLOCK_M, HEAD_DIM, TMA, not EVEN_L)
    do = _load_rows(do_src, desc_b, desc_h, row0, offs_m, stride_dol, seq_len, BLOCK_M, HEAD_DIM, TMA, not EVEN_L)
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
        _row_ptrs(_head(K, b, hk, stride_kb, stride_kh), offs_n, stride_kl, HEAD_DIM),
        mask=col_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        _row_ptrs(_head(V, b, hk, stride_vb, stride_vh), offs_n, stride_vl, HEAD_DIM),
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
    tl.store(
        _row_ptrs(_head(DK, b, hk, stride_dkb, stride_dkh), offs_n, stride_dkl, HEAD_DIM),
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        _row_ptrs(_head(DV, b, hk, stride_dvb, stride_dvh), offs_n, stride_dvl, HEAD_DIM),
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
        q_src = _head(Q, b, h, stride_qb, stride_qh)
        do_src = _head(DO, b, h, stride_dob, stride_doh)
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
    so the scratch is all zeros again when the kernel ends (it is reused across calls without a memset)."""
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


@triton.jit
def _block_lists_kernel(
    MASK, OVERLAP, IDX, CNT,  # noqa: N803
    stride_mb, stride_mh, stride_mi, stride_mj,
    n_blocks, n_heads,
    HAS_OVERLAP: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    NB_POW2: tl.constexpr,
):
    """One row of `block_mask_to_indices` per program: a prefix sum places the kept blocks first, ascending,
    and the filler (n_blocks) after them. One launch instead of the masking/sorting ops of the torch path."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    j = tl.arange(0, NB_POW2)
    valid = j < n_blocks
    base = _head(MASK, b, h, stride_mb, stride_mh)
    ov_base = OVERLAP + b.to(tl.int64) * n_blocks * n_blocks
    if TRANSPOSE:
        # Row i lists the query blocks j >= i that kept key block i.
        live = valid & (j >= i)
        keep = tl.load(base + j * stride_mi + i * stride_mj, mask=live, other=0) != 0
        if HAS_OVERLAP:
            keep = keep & (tl.load(ov_base + j * n_blocks + i, mask=live, other=0) != 0)
    else:
        live = valid & (j <= i)
        keep = tl.load(base + i * stride_mi + j * stride_mj, mask=live, other=0) != 0
        if HAS_OVERLAP:
            keep = keep & (tl.load(ov_base + i * n_blocks + j, mask=live, other=0) != 0)
    kept = keep.to(tl.int32)
    incl = tl.cumsum(kept, 0)
    cnt = tl.sum(kept, 0)
    # Kept block j goes to slot (kept before it); a dropped one to cnt + (dropped before it).
    pos = tl.where(keep, incl - 1, cnt + j - incl)
    row = bh.to(tl.int64) * n_blocks + i
    tl.store(IDX + row * n_blocks + pos, tl.where(keep, j, n_blocks), mask=valid)
    tl.store(CNT + row, cnt)


# --------------------------------------------------------------------------------------------- launchers


def build_block_lists(
    block_mask: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    block_size: int | None = None,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`indexing.block_mask_to_indices` in one Triton launch (same arguments and results).

    Used on CUDA, where the torch path's handful of small ops and its sort are a visible share of a sparse
    forward; elsewhere (and in the interpreter unless called directly) the torch path is used.
    """
    bsz, heads, nb, _ = block_mask.shape
    mask = block_mask if block_mask.dtype == torch.uint8 else block_mask.to(torch.bool).view(torch.uint8)
    overlap = None
    if document_ids is not None:
        if block_size is None:
            raise ValueError("block_size is needed with document_ids")
        overlap = document_block_overlap(document_ids, block_size).view(torch.uint8).contiguous()
    idx = torch.empty(bsz, heads, nb, nb, dtype=torch.int32, device=mask.device)
    cnt = torch.empty(bsz, heads, nb, dtype=torch.int32, device=mask.device)
    _block_lists_kernel[(nb, bsz * heads)](
        mask, overlap if overlap is not None else mask, idx, cnt,
        mask.stride(0), mask.stride(1), mask.stride(2), mask.stride(3),
        nb, heads,
        HAS_OVERLAP=overlap is not None,
        TRANSPOSE=transpose,
        NB_POW2=triton.next_power_of_2(nb),
        num_warps=4 if nb <= 1024 else 8,
    )
    return idx, cnt


def block_lists(block_mask, *, document_ids=None, block_size=None, transpose=False):
    """Block lists for the kernels: the Triton builder on CUDA, the torch one otherwise."""
    fn = build_block_lists if block_mask.is_cuda else block_mask_to_indices
    return fn(block_mask, document_ids=document_ids, block_size=block_size, transpose=transpose)



def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (tf32 would lose ~3 digits); bf16/fp16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, block_size: int) -> None:
    """Shape/dtype checks shared by the Triton ops."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, L, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 16, got {dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two block_size >= 16, got {block_size}")
    dtypes = {q.dtype, k.dtype} | ({v.dtype} if v is not None else set())
    if len(dtypes) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {dtypes}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def prepare_documents(document_ids: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """int32 contiguous `[B, L]` on q's device (or None)."""
    if document_ids is None:
        return None
    if document_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"document_ids must be {(q.shape[0], q.shape[2])}, got {tuple(document_ids.shape)}")
    return document_ids.to(device=q.device, dtype=torch.int32).contiguous()


def pick_gluon(use_gluon, config, q, k, v, block_size, document_ids, *outputs, kind: str = "fwd") -> bool:
    """Whether a launch of `kind` ('fwd', 'dq' or 'dkdv') goes to the Gluon kernels: forced by `use_gluon`, else
    when they support the inputs, the given outputs are contiguous, no Triton tile config was asked for and they
    measured faster there."""
    if use_gluon is False:
        return False
    supported = gluon_attention.gluon_supported(q, k, v, block_size, document_ids) and all(
        t is None or gluon_attention.rows_collapse(t) for t in outputs
    )
    if use_gluon and not supported:
        reason = gluon_attention.GLUON_IMPORT_ERROR or "inputs outside its scope (see gluon_attention)"
        raise ValueError(f"the Gluon kernels cannot run here: {reason}")
    # Unforced, only at head_dim 128, where they measured faster (at head_dim 64 they were 6-10% slower, sweep 13e);
    # dK/dV only at block 128 (at block 64 its shared memory leaves one program per multiprocessor).
    faster = q.shape[-1] == 128 and (kind != "dkdv" or block_size == 128)
    return supported and (bool(use_gluon) or (config is None and faster))


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
    """Launch the forward kernel.

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]` (last dim contiguous).
        kv_indices: int32 `[B, Hq, nB, nB]`, kv_counts: int32 `[B, Hq, nB]` from `block_mask_to_indices`.
        document_ids: int32 `[B, L]` contiguous, or None.
        out, lse: optional preallocated outputs (`[B, Hq, L, D]` in q's dtype, float32 `[B, Hq, L]`).
        config: explicit tile settings (default: autotuned on long GPU inputs, else `default_config`).
        use_gluon: run the warp-specialized Gluon forward (`gluon_attention`); None: when it supports the inputs
            (Hopper, block 64/128, no documents, ...), head_dim is 128 and no Triton `config` is given.
    Returns:
        `(out, lse)`: lse is the base-2 log-sum-exp of the scaled scores, +inf for rows with no allowed key.
    """
    bsz, hq, seq_len, dim = q.shape
    nb = num_blocks(seq_len, block_size)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device)
    if pick_gluon(use_gluon, config, q, k, v, block_size, document_ids, out):
        return gluon_attention.gluon_attention_forward(
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
        PRECISION=_precision(q.dtype),
        **opts,
    )
    launch(
        _sparse_fwd_kernel, "fwd", block_size, seq_len,
        lambda meta: (nb * (block_size // meta["BLOCK_M"]), bsz * hq),
        args, kwargs, config,
    )
    return out, lse


def sparse_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    q_indices: torch.Tensor,
    q_counts: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    dq_config: TileConfig | None = None,
    dkdv_config: TileConfig | None = None,
    dkdv_segments: bool | None = None,
    use_gluon: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (delta, dQ, dK/dV).

    Args:
        dout: `[B, Hq, L, D]`; q, k, v, out, lse as saved by the forward.
        kv_indices/kv_counts: per query block key-block lists; q_indices/q_counts: the transposed lists.
        grads: optional preallocated `(dq, dk, dv)`.
        dkdv_segments: use the segmented dK/dV kernel (None: `KERNEL_OPTIONS["dkdv"]["SEGMENTS"]`).
        use_gluon: compute dQ and dK/dV with the warp-specialized Gluon kernels (None: where `pick_gluon` finds them
            supported and faster, with `dq_config` / `dkdv_config` unset; dK/dV not with `dkdv_segments`).
    Returns:
        `(dq, dk, dv)` in the inputs' dtypes.
    """
    bsz, hq, seq_len, dim = q.shape
    hkv = k.shape[1]
    nb = num_blocks(seq_len, block_size)
    dout = _last_dim_contiguous(dout)
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    delta = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device)
    dkdv_options = kernel_options("dkdv", q, dout)
    segments = dkdv_options.pop("SEGMENTS", 0)
    if dkdv_segments is not None:
        segments = dkdv_segments
    gluon_dq = pick_gluon(use_gluon, dq_config, q, k, v, block_size, document_ids, dq, dout, out, kind="dq")
    gluon_dkdv = not segments and pick_gluon(
        use_gluon, dkdv_config, q, k, v, block_size, document_ids, dk, dv, dout, kind="dkdv"
    )
    docs = document_ids if document_ids is not None else kv_counts
    common = dict(
        HAS_DOCS=document_ids is not None,
        EVEN_L=seq_len % block_size == 0,
        BLOCK=block_size,
        HEAD_DIM=dim,
        PRECISION=_precision(q.dtype),
    )

    # delta and dQ. The Gluon dQ kernel computes delta itself (it holds dO's tiles already); else a pass over O and
    # dO does, before the Triton dQ kernel.
    if gluon_dq:
        gluon_attention.gluon_attention_dq(
            q, k, v, out, dout, lse, delta, kv_indices, kv_counts, dq, block_size=block_size, sm_scale=sm_scale
        )
    else:
        delta_rows = 64
        _bwd_delta_kernel[(bsz * hq, triton.cdiv(seq_len, delta_rows))](
            out, dout, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            seq_len, hq,
            BLOCK_M=delta_rows,
            HEAD_DIM=dim,
        )
        dq_options = kernel_options("dq", k, v)
        k_in, v_in = (host_descriptor(k, "BLOCK_N"), host_descriptor(v, "BLOCK_N")) if dq_options["TMA"] else (k, v)
        dq_args = (
            q, k_in, v_in, dout, dq, lse, delta,
            kv_indices, kv_counts, docs,
            sm_scale * LOG2E, sm_scale,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            seq_len, nb, hq, hq // hkv,
        )
        launch(
            _sparse_dq_kernel, "dq", block_size, seq_len,
            lambda meta: (nb * (block_size // meta["BLOCK_M"]), bsz * hq),
            dq_args, {**common, **dq_options}, dq_config,
        )

    # dK/dV.
    if gluon_dkdv:
        gluon_attention.gluon_attention_dkdv(
            q, k, v, dout, lse, delta, q_indices, q_counts, dk, dv, block_size=block_size, sm_scale=sm_scale
        )
        return dq, dk, dv
    q_in, do_in = (host_descriptor(q, "BLOCK_M"), host_descriptor(dout, "BLOCK_M")) if dkdv_options["TMA"] else (q, dout)
    dkdv_args = (
        q_in, k, v, do_in, dk, dv, lse, delta,
        q_indices, q_counts, docs,
        sm_scale * LOG2E, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        seq_len, nb, hq, hkv, hq // hkv,
    )
    dkdv_kwargs = {**common, **dkdv_options}
    if not segments:
        launch(
            _sparse_dkdv_kernel, "dkdv", block_size, seq_len,
            lambda meta: (nb * (block_size // meta["BLOCK_N"]), bsz * hkv),
            dkdv_args, dkdv_kwargs, dkdv_config,
        )
        return dq, dk, dv
    # Segmented dK/dV: its tiles are fixed (the work list is cut per tile), no autotuning.
    cfg = dkdv_config or default_config("dkdv", block_size)
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
    seg_args = dkdv_args[:11] + (items, meta, dk_acc, dv_acc, arrivals) + dkdv_args[11:] + (max_segs,)
    meta_tiles = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    _set_descriptor_tiles({**meta_tiles, **{str(i): a for i, a in enumerate(seg_args)}})
    seg_kwargs = {**dkdv_kwargs, **meta_tiles, "GROUP_P2": triton.next_power_of_2(group)}
    check_kernel_kwargs(_sparse_dkdv_segments_kernel, seg_kwargs)
    _sparse_dkdv_segments_kernel[(n_programs,)](*seg_args, **seg_kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------- autograd


class BlockSparseAttention(torch.autograd.Function):
    """Autograd wrapper: the forward saves (out, lse) and the block lists; the backward recomputes."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, document_ids, sm_scale, split_long_columns=None):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        docs = prepare_documents(document_ids, q)
        kv_idx, kv_cnt = block_lists(block_mask, document_ids=docs, block_size=block_size)
        out, lse = sparse_attention_forward(
            q, k, v, kv_idx, kv_cnt, block_size=block_size, sm_scale=sm_scale, document_ids=docs
        )
        ctx.save_for_backward(q, k, v, out, lse, block_mask, docs)
        ctx.lists = (kv_idx, kv_cnt)
        ctx.block_size = block_size
        ctx.sm_scale = sm_scale
        ctx.split_long_columns = split_long_columns
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, block_mask, docs = ctx.saved_tensors
        kv_idx, kv_cnt = ctx.lists
        q_idx, q_cnt = block_lists(block_mask, document_ids=docs, block_size=ctx.block_size, transpose=True)
        dq, dk, dv = sparse_attention_backward(
            dout, q, k, v, out, lse, kv_idx, kv_cnt, q_idx, q_cnt,
            block_size=ctx.block_size, sm_scale=ctx.sm_scale, document_ids=docs,
            dkdv_segments=ctx.split_long_columns,
        )
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    document_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
    split_long_columns: bool | None = None,
) -> torch.Tensor:
    """Triton block-sparse attention (see `seer_kernels.block_sparse_attention` for the contract).

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]`; block_mask: bool `[B, Hq, nB, nB]`.
        document_ids: optional int `[B, L]`.
    Returns:
        `[B, Hq, L, D]`.
    """
    check_inputs(q, k, v, block_size)
    nb = num_blocks(q.shape[2], block_size)
    if block_mask.shape != (q.shape[0], q.shape[1], nb, nb):
        raise ValueError(f"block_mask must be {(q.shape[0], q.shape[1], nb, nb)}, got {tuple(block_mask.shape)}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return BlockSparseAttention.apply(
        q, k, v, block_mask.to(q.device), block_size, document_ids, scale, split_long_columns
    )
