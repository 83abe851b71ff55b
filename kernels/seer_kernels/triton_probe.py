"""Fused probe kernel: the ground truth (`triton_ground_truth`) restricted to r probe tokens per query block.

`seer_kernels.probe_ground_truth` pools the attention of r evenly strided tokens of each query block
(`indexing.probe_positions`) instead of all of its tokens, so it costs about r / block_size of the ground truth.
With one token per block a tile of whole query blocks would be mostly idle rows, so a program packs the probe
tokens of several consecutive query blocks into one tile: `ROWS = max(BLOCK_M, r)` rows, row t being probe token
t % r of query block t // r, and each row keeps its own causal limit (its position) and document id. The two
passes are the ground truth's (`_row_lse`, `_pool_rows`): pass 1 the online max / sum for each row's
log-sum-exp, pass 2 each row's maxima inside each key block combined with it, the max over a block's r rows taken
in registers (a reshape) and stored into the block's output row. The program also writes zeros into the key blocks
its rows cannot reach, so every entry of the output is written once; the row normalisation is an in-place
division afterwards.

Layers: `_probe_kernel`, the launcher `probe_forward` and `probe_ground_truth`, which the public op in
`seer_kernels` calls with checked inputs. The reference is `pytorch_chunked.probe_ground_truth`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexing import num_blocks
from .triton_common import LOG2E, head_pointer, input_precision, last_dim_contiguous, prepare_documents, row_pointers
from .triton_ground_truth import _first_key_blocks, _pool_rows, _row_lse
from .triton_tuning import TileConfig, host_descriptor, kernel_options, launch

# Columns of zeros one store writes (the key blocks a program's rows cannot reach).
_ZERO_WIDTH = tl.constexpr(64)


@triton.jit
def _store_zeros(out_rows, c_start, c_end, QB: tl.constexpr, WIDTH: tl.constexpr):
    """Zeros into columns [c_start, c_end) of the QB output rows (`out_rows`: pointers `[QB]`)."""
    cols = tl.arange(0, WIDTH)
    zeros = tl.zeros([QB, WIDTH], dtype=tl.float32)
    for c0 in range(c_start, c_end, WIDTH):
        tl.store(out_rows[:, None] + c0 + cols[None, :], zeros, mask=(c0 + cols < c_end)[None, :])


@triton.jit
def _probe_kernel(
    Q, K, OUT, FIRST_KB, DOC, VALID,  # noqa: N803
    scale_log2,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_ob, stride_oh, stride_or,
    seq_len, n_blocks, n_heads_q, group,
    HAS_DOCS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    R: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """One program: the R probe tokens of QB = ROWS / R consecutive query blocks of one head, as one tile of
    ROWS rows (at least BLOCK_M, so that tl.dot gets M >= 16 however few tokens a block probes)."""
    # Programs vary fastest so the programs in flight share one KV head's K in L2.
    bh = tl.program_id(1)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group
    ROWS: tl.constexpr = BLOCK_M if BLOCK_M > R else R
    QB: tl.constexpr = ROWS // R
    STRIDE: tl.constexpr = BLOCK // R
    G: tl.constexpr = BLOCK_N if BLOCK_N > BLOCK else BLOCK  # tokens per pass-2 group
    KB: tl.constexpr = 2 if BLOCK_N > BLOCK else 1  # key blocks per pass-2 group

    # The highest query blocks first: the programs with the longest key range start first.
    tile = tl.cdiv(n_blocks, QB) - 1 - tl.program_id(0)
    t = tl.arange(0, ROWS)
    # Blocks past the end repeat the last one: they compute and rewrite its values, so need no mask.
    blk = tl.minimum(tile * QB + t // R, n_blocks - 1)
    offs_m = tl.minimum(blk * BLOCK + STRIDE * (t % R + 1) - 1, seq_len - 1)
    out_blk = tl.minimum(tile * QB + tl.arange(0, QB), n_blocks - 1)
    q = tl.load(row_pointers(head_pointer(Q, b, h, stride_qb, stride_qh), offs_m, stride_ql, HEAD_DIM))
    if TMA:
        k_base = K
    else:
        k_base = head_pointer(K, b, hk, stride_kb, stride_kh)
    doc_base = b.to(tl.int64) * seq_len
    if HAS_VALID:
        # A padding probe contributes nothing: its pooled values are dropped before the max over the block.
        row_ok = tl.load(VALID + doc_base + offs_m) != 0
    else:
        row_ok = offs_m < seq_len
    if HAS_DOCS:
        doc_q = tl.load(DOC + doc_base + offs_m)
        # Key blocks before the lowest query block's first one share no document with any row: they stay 0.
        start = tl.load(FIRST_KB + b.to(tl.int64) * n_blocks + tile * QB) * BLOCK
    else:
        doc_q = offs_m
        start = 0
    # Keys up to the lowest probe are allowed for every row (no documents, no padding): the unmasked part.
    free = tl.min(offs_m, 0) + 1
    end = tl.max(offs_m, 0) + 1

    # A valid probe allows at least itself; a padding probe may allow nothing and gets +inf.
    lse = _row_lse(
        q, offs_m, doc_q, k_base, b, hk, DOC, VALID, doc_base, start, free, end, seq_len, stride_kl, scale_log2,
        HAS_DOCS or HAS_VALID, HAS_DOCS, HAS_VALID, ROWS, BLOCK_N, HEAD_DIM, PRECISION, TMA,
    )
    out_ptrs = head_pointer(OUT, b, h, stride_ob, stride_oh) + out_blk.to(tl.int64) * stride_or
    _pool_rows(
        q, lse, offs_m, row_ok, doc_q, k_base, b, hk, DOC, VALID, doc_base, out_ptrs,
        start, free, end, n_blocks, seq_len, stride_kl, scale_log2,
        HAS_DOCS or HAS_VALID, HAS_DOCS, HAS_VALID, QB, R, BLOCK, BLOCK_N, HEAD_DIM, PRECISION, TMA,
    )
    g_end = tl.cdiv(end, G)
    if HAS_DOCS or HAS_VALID:
        g_start = start // G
    else:
        g_start = 0
    # Pass 2 wrote key blocks [g_start * KB, g_end * KB) (clipped to the row); the rest of each row is zero.
    # Disjoint columns: no two threads of the program write one entry in an order that matters.
    _store_zeros(out_ptrs, 0, g_start * KB, QB, _ZERO_WIDTH)
    _store_zeros(out_ptrs, tl.minimum(g_end * KB, n_blocks), n_blocks, QB, _ZERO_WIDTH)


def probe_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    probe_tokens: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Launch the probe kernel and normalise the rows.

    Args:
        q: `[B, Hq, L, D]`; k: `[B, Hkv, L, D]` (last dim contiguous).
        block_size: tokens per block; probe_tokens: r, a divisor of block_size; sm_scale: softmax scale.
        document_ids: int32 `[B, L]` contiguous, or None.
        valid: uint8 `[B, L]` contiguous (0 for padding tokens), or None.
        out: optional float32 `[B, Hq, nB, nB]` to fill (the kernel writes every entry).
        config: explicit tile settings; `block_m` is the least number of probe rows per program.
    Returns:
        float32 `[B, Hq, nB, nB]`, rows summing to 1 (or zero without a valid probe token).
    """
    bsz, hq, seq_len, dim = q.shape
    nb = num_blocks(seq_len, block_size)
    if out is None:
        out = torch.empty(bsz, hq, nb, nb, dtype=torch.float32, device=q.device)
    if nb == 0:
        return out
    opts = kernel_options("probe", k)
    first = _first_key_blocks(document_ids, block_size) if document_ids is not None else None
    # Pointers a variant does not read get any tensor of the launch (its constexpr switch keeps them unread).
    args = (
        q, host_descriptor(k, "BLOCK_N") if opts["TMA"] else k, out,
        first if first is not None else out,
        document_ids if document_ids is not None else out,
        valid if valid is not None else out,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, nb, hq, hq // k.shape[1],
    )
    kwargs = dict(
        HAS_DOCS=document_ids is not None,
        HAS_VALID=valid is not None,
        R=probe_tokens,
        BLOCK=block_size,
        HEAD_DIM=dim,
        PRECISION=input_precision(q.dtype),
        **opts,
    )

    def grid(meta):
        return triton.cdiv(nb, max(meta["BLOCK_M"], probe_tokens) // probe_tokens), bsz * hq

    launch(_probe_kernel, "probe", block_size, seq_len, grid, args, kwargs, config)
    out.div_(out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
    return out


@torch.no_grad()
def probe_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    probe_tokens: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`seer_kernels.probe_ground_truth` on the Triton kernel; inputs are checked by that function.

    Args:
        q: `[B, Hq, L, D]`; k: `[B, Hkv, L, D]`.
        block_size: tokens per block; probe_tokens: r, a divisor of block_size; sm_scale: softmax scale.
        document_ids: optional int `[B, L]`; valid: optional bool `[B, L]`, False for padding tokens.
    Returns:
        float32 `[B, Hq, nB, nB]`, rows summing to 1 (or zero without a valid probe token).
    """
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    if valid is not None:
        # Bytes: one load per key tile beside the document ids; a device-side cast, no read back.
        valid = valid.to(device=q.device, dtype=torch.uint8).contiguous()
    return probe_forward(
        q,
        k,
        block_size=block_size,
        probe_tokens=probe_tokens,
        sm_scale=sm_scale,
        document_ids=prepare_documents(document_ids, q),
        valid=valid,
    )
