"""The attention ops in chunked pure PyTorch: the CPU implementation, and the reference the kernels are tested against.

Everything is computed in float32 in chunks of query blocks: one chunk holds `[B, Hq, rows, keys]` scores,
so memory stays O(L * chunk) instead of a full L x L map per head. GQA is handled by folding the query heads
of one KV group into the row dimension of a matmul against the group's single K/V, so K/V are never repeated.
The sparse attention has its own backward that recomputes the probabilities chunk by chunk from the saved
log-sum-exp (the flash-attention recipe), so nothing of size L x L is kept for autograd either.

The public ops in `seer_kernels` check the inputs and resolve the defaults, then call `ChunkedBlockSparseAttention`,
`ground_truth`, `attention_with_ground_truth` or `probe_ground_truth` here. (The deliberately naive oracle of the
tests, with full L x L maps and repeated K/V, is `tests/kernels/_oracle.py`.)
"""

from __future__ import annotations

import torch

from .indexing import causal_block_mask, num_blocks, probe_positions

# Scores per chunk (elements). 2**24 floats = 64 MiB: large enough to keep matmuls efficient, small enough to
# leave memory for the model.
_CHUNK_ELEMENTS = 1 << 24
# Probe logits per chunk (elements, over the batch and every head): 2**27 float32 = 512 MiB, so 131072 tokens
# with 12 query heads and one probe token per block take 85 query blocks per chunk and never the full
# [Hq, nB * r, L] map.
_PROBE_CHUNK_ELEMENTS = 1 << 27


def _rows_per_chunk(bsz: int, heads: int, seq_len: int, block_size: int) -> int:
    """How many query blocks one chunk takes (at least one)."""
    per_block = bsz * heads * block_size * seq_len
    return max(1, _CHUNK_ELEMENTS // max(1, per_block))


def _token_mask(
    rows: torch.Tensor,
    keys: int,
    document_ids: torch.Tensor | None,
    bsz: int,
) -> torch.Tensor:
    """Causal + document mask for query positions `rows` against keys `0..keys-1`.

    Args:
        rows: int64 `[R]` query positions.
        keys: number of leading keys.
        document_ids: int `[B, L]` or None.
    Returns:
        bool `[B, 1, R, keys]` (broadcasts over heads).
    """
    cols = torch.arange(keys, device=rows.device)
    allowed = cols[None, :] <= rows[:, None]  # [R, keys]
    allowed = allowed[None, None].expand(bsz, 1, -1, -1)
    if document_ids is not None:
        doc_q = document_ids[:, rows]  # [B, R]
        doc_k = document_ids[:, :keys]  # [B, keys]
        allowed = allowed & (doc_q[:, :, None] == doc_k[:, None, :])[:, None]
    return allowed


def _group_rows(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """`[B, Hq, R, D]` -> `[B, Hkv, G * R, D]`: the query heads of one KV group stacked along rows."""
    bsz, hq, rows, dim = x.shape
    return x.reshape(bsz, hkv, (hq // hkv) * rows, dim)


def _ungroup_rows(x: torch.Tensor, hq: int) -> torch.Tensor:
    """Inverse of `_group_rows` for `[B, Hkv, G * R, X]`."""
    bsz, hkv, grows, last = x.shape
    return x.reshape(bsz, hq, grows // (hq // hkv), last)


def _chunk_scores(
    q_chunk: torch.Tensor, k: torch.Tensor, keys: int, sm_scale: float
) -> torch.Tensor:
    """Scaled scores `[B, Hq, R, keys]` (float32) of a query chunk `[B, Hq, R, D]` against `k[:, :, :keys]`."""
    hq, hkv = q_chunk.shape[1], k.shape[1]
    kk = k[:, :, :keys].float()
    s = torch.matmul(_group_rows(q_chunk.float(), hkv), kk.transpose(-1, -2))  # [B, Hkv, G*R, keys]
    return _ungroup_rows(s, hq) * sm_scale


def _expand_block_mask(
    block_mask_rows: torch.Tensor, rows: torch.Tensor, r0: int, keys: int, block_size: int
) -> torch.Tensor:
    """Token-level view of block-mask rows: `[B, H, nq, nB]` -> bool `[B, H, R, keys]`.

    `rows` are absolute positions and `r0` the first position of the first block in `block_mask_rows`.
    """
    local_block = torch.div(rows - r0, block_size, rounding_mode="floor")
    key_block = torch.div(torch.arange(keys, device=rows.device), block_size, rounding_mode="floor")
    return block_mask_rows[:, :, local_block][:, :, :, key_block]


class ChunkedBlockSparseAttention(torch.autograd.Function):
    """Exact block-sparse attention with a chunked, recomputing backward.

    forward(q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]`, block_mask bool `[B, Hq, nB, nB]`, block_size,
    document_ids int `[B, L]` or None, sm_scale float) -> `[B, Hq, L, D]` in q's dtype; backward gives dq, dk, dv.
    """

    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, document_ids, sm_scale):
        bsz, hq, seq_len, dim = q.shape
        mask = causal_block_mask(block_mask)
        nb = num_blocks(seq_len, block_size)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=q.device)
        step = _rows_per_chunk(bsz, hq, seq_len, block_size)
        for b0 in range(0, nb, step):
            b1 = min(nb, b0 + step)
            r0, r1 = b0 * block_size, min(seq_len, b1 * block_size)
            rows = torch.arange(r0, r1, device=q.device)
            keys = r1  # causal: nothing after the chunk's last row is needed
            allowed = _token_mask(rows, keys, document_ids, bsz) & _expand_block_mask(
                mask[:, :, b0:b1], rows, r0, keys, block_size
            )
            s = _chunk_scores(q[:, :, r0:r1], k, keys, sm_scale).masked_fill(~allowed, float("-inf"))
            row_lse = torch.logsumexp(s, dim=-1)  # [B, Hq, R]; -inf for a row with no allowed key
            p = torch.exp(s - _finite(row_lse)[..., None])
            o = torch.matmul(_group_rows(p, k.shape[1]), v[:, :, :keys].float())
            out[:, :, r0:r1] = _ungroup_rows(o, hq)
            lse[:, :, r0:r1] = row_lse
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, mask, out, lse, document_ids)
        ctx.block_size = block_size
        ctx.sm_scale = sm_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, out, lse, document_ids = ctx.saved_tensors
        block_size, sm_scale = ctx.block_size, ctx.sm_scale
        bsz, hq, seq_len, dim = q.shape
        hkv = k.shape[1]
        nb = num_blocks(seq_len, block_size)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        dout = dout.float()
        # delta_r = sum_d dO_rd O_rd = sum_c P_rc dP_rc, the softmax Jacobian's row term.
        delta = (dout * out.float()).sum(-1)  # [B, Hq, L]
        step = _rows_per_chunk(bsz, hq, seq_len, block_size)
        for b0 in range(0, nb, step):
            b1 = min(nb, b0 + step)
            r0, r1 = b0 * block_size, min(seq_len, b1 * block_size)
            rows = torch.arange(r0, r1, device=q.device)
            keys = r1
            allowed = _token_mask(rows, keys, document_ids, bsz) & _expand_block_mask(
                mask[:, :, b0:b1], rows, r0, keys, block_size
            )
            s = _chunk_scores(q[:, :, r0:r1], k, keys, sm_scale).masked_fill(~allowed, float("-inf"))
            p = torch.exp(s - _finite(lse[:, :, r0:r1])[..., None])  # [B, Hq, R, keys]
            p_g = _group_rows(p, hkv)  # [B, Hkv, G*R, keys]
            do_g = _group_rows(dout[:, :, r0:r1], hkv)  # [B, Hkv, G*R, D]
            dv[:, :, :keys] += torch.matmul(p_g.transpose(-1, -2), do_g)
            dp = _ungroup_rows(torch.matmul(do_g, v[:, :, :keys].float().transpose(-1, -2)), hq)
            ds = p * (dp - delta[:, :, r0:r1, None]) * sm_scale  # gradient w.r.t. the raw q.k products
            ds_g = _group_rows(ds, hkv)
            dq[:, :, r0:r1] = _ungroup_rows(torch.matmul(ds_g, k[:, :, :keys].float()), hq)
            dk[:, :, :keys] += torch.matmul(ds_g.transpose(-1, -2), _group_rows(q[:, :, r0:r1].float(), hkv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (rows with no allowed key) by 0 so that exp(-inf - x) gives 0 instead of NaN."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


@torch.no_grad()
def ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    query_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`seer_kernels.attention_ground_truth` in chunked PyTorch; inputs are checked by that function.

    Args:
        q: `[B, Hq, L, D]`; k: `[B, Hkv, L, D]`.
        block_size: tokens per block; sm_scale: softmax scale.
        document_ids: optional int `[B, L]`.
        query_blocks: optional int64 `[nQ]` (None: all blocks).
    Returns:
        float32 `[B, Hq, nQ, nB]`, rows summing to 1.
    """
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    if query_blocks is None:
        query_blocks = torch.arange(nb, device=q.device)
    query_blocks = query_blocks.to(device=q.device, dtype=torch.int64)
    nq = query_blocks.numel()
    out = torch.zeros(bsz, hq, nq, nb, dtype=torch.float32, device=q.device)
    offs = torch.arange(block_size, device=q.device)
    step = _rows_per_chunk(bsz, hq, seq_len, block_size)
    for c0 in range(0, nq, step):
        blocks = query_blocks[c0 : c0 + step]  # [n]
        n = blocks.numel()
        rows = (blocks[:, None] * block_size + offs[None, :]).reshape(-1)  # [n * bs], some maybe >= L
        valid = rows < seq_len
        rows_c = rows.clamp(max=seq_len - 1)
        keys = int(rows_c.max().item()) + 1
        kb = num_blocks(keys, block_size)
        s = _chunk_scores(q[:, :, rows_c], k, keys, sm_scale)
        allowed = _token_mask(rows_c, keys, document_ids, bsz)
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))  # every real row allows itself
        p = p * valid[None, None, :, None]  # rows past the end belong to no block
        p = torch.nn.functional.pad(p, (0, kb * block_size - keys))
        pooled = p.view(bsz, hq, n, block_size, kb, block_size).amax(dim=(3, 5))  # [B, Hq, n, kb]
        out[:, :, c0 : c0 + n, :kb] = pooled
    return out / out.sum(-1, keepdim=True)


def attention_with_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    sm_scale: float,
    document_ids: torch.Tensor | None = None,
    query_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`seer_kernels.attention_with_ground_truth` in chunked PyTorch; inputs are checked by that function.

    Args:
        q: `[B, Hq, L, D]`; k, v: `[B, Hkv, L, D]`.
        block_size: tokens per block; sm_scale: softmax scale.
        document_ids: optional int `[B, L]`.
        query_blocks: optional int64 `[nQ]` for the map (None: all blocks).
    Returns:
        `(out [B, Hq, L, D]` in q's dtype, differentiable; float32 map `[B, Hq, nQ, nB])`.
    """
    bsz, hq, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    full = torch.ones(bsz, hq, nb, nb, dtype=torch.bool, device=q.device)
    out = ChunkedBlockSparseAttention.apply(q, k, v, full, block_size, document_ids, sm_scale)
    gt = ground_truth(
        q.detach(),
        k.detach(),
        block_size=block_size,
        document_ids=document_ids,
        sm_scale=sm_scale,
        query_blocks=query_blocks,
    )
    return out, gt


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
    """`seer_kernels.probe_ground_truth` in chunked PyTorch; inputs are checked by that function.

    Chunks of query blocks (`_PROBE_CHUNK_ELEMENTS` logits at a time) with shapes fixed by the inputs' and no
    read back to the host, so it can be captured in a CUDA graph.

    Args:
        q: `[B, Hq, L, D]`; k: `[B, Hkv, L, D]`.
        block_size: tokens per block; probe_tokens: r, divides block_size; sm_scale: softmax scale.
        document_ids: optional int `[B, L]`; valid: optional bool `[B, L]`, False for padding tokens.
    Returns:
        float32 `[B, Hq, nB, nB]`, rows summing to 1 (or zero without a valid probe token).
    """
    bsz, heads, seq_len, dim = q.shape
    kv_heads = k.shape[1]
    nb, r, device = num_blocks(seq_len, block_size), probe_tokens, q.device
    padded = nb * block_size
    positions = probe_positions(seq_len, block_size, r, device)  # [nB, r]
    # Keys padded to whole blocks, so each key block pools one [block_size] slice; the padding is masked below.
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, padded - seq_len)).transpose(-1, -2)  # [B, Hkv, D, Lp]
    key_pos = torch.arange(padded, device=device)
    key_ok = (key_pos < seq_len).expand(bsz, padded)
    if valid is not None:
        key_ok = key_ok & torch.nn.functional.pad(valid.bool(), (0, padded - seq_len))
    if document_ids is not None:
        # The padded keys' ids never matter (they are masked); -1 keeps them apart anyway.
        key_doc = torch.nn.functional.pad(document_ids.long(), (0, padded - seq_len), value=-1)
    out = torch.zeros(bsz, heads, nb, nb, dtype=torch.float32, device=device)
    step = max(1, _PROBE_CHUNK_ELEMENTS // (bsz * heads * r * padded))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        # Causal: no probe of blocks b0..b1-1 sees a key past block b1-1; a fixed bound, no read of the data.
        width = b1 * block_size
        # Without documents or padding every probe of the chunk may see the keys before its first block: only the
        # chunk's own key blocks [lo, width) need the causal mask.
        lo = 0 if document_ids is not None or valid is not None else b0 * block_size
        rows = positions[b0:b1].reshape(-1)  # [n * r]
        allowed = (key_pos[None, lo:width] <= rows[:, None]) & key_ok[:, None, lo:width]  # [B, n * r, width - lo]
        if document_ids is not None:
            allowed = allowed & (document_ids[:, rows, None].long() == key_doc[:, None, lo:width])
        # The scale goes on the queries (n * r rows) rather than on the logits (n * r * width).
        rows_q = (q[:, :, rows].float() * sm_scale).reshape(bsz, kv_heads, -1, dim)  # a KV group's heads stacked
        logits = torch.matmul(rows_q, keys[..., :width]).view(bsz, heads, -1, width)
        logits[..., lo:].masked_fill_(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # -inf for a probe without any key
        # The max probability in a key block is exp(its max logit - lse): one exp per block instead of per key.
        block_max = logits.view(bsz, heads, -1, b1, block_size).amax(-1)
        probs = torch.exp(block_max - _finite(lse))
        if valid is not None:
            probs = probs * valid[:, rows].to(probs.dtype)[:, None, :, None]
        out[:, :, b0:b1, :b1] = probs.view(bsz, heads, b1 - b0, r, b1).amax(3)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def token_gate_scores(
    qt: torch.Tensor,
    kh: torch.Tensor,
    valid: torch.Tensor | None,
    candidates: torch.Tensor | None,
    *,
    block_size: int,
    prob: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """`seer_kernels.token_gate_block_scores` in chunked PyTorch; inputs are checked by that function.

    A chunk of query blocks holds its tokens' logits `[B, Hq, n, block_size, keys]` against the key blocks up to
    its last query block (within `_CHUNK_ELEMENTS`); the query heads of a KV group share one matmul.

    Args:
        qt: float32 `[B, Hq, L, hidden]`; kh: float32 `[B, Hkv, nB, hidden]`.
        valid: bool `[B, L]` or None; candidates: bool `[B, nB, nB]` or None (the block-causal triangle).
        block_size: tokens per block; prob: True for `token_prob_max`, False for `token_logit_max`.
        cos, sin: float32 `[nB, rotary_dim]` or None: each token's query is first turned by its block's angles.
    Returns:
        float32 `[B, Hq, nB, nB]`.
    """
    bsz, hq, seq_len, hidden = qt.shape
    hkv, nb = kh.shape[1], kh.shape[2]
    out = torch.full((bsz, hq, nb, nb), float("-inf"), dtype=torch.float32, device=qt.device)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=qt.device).tril_()
    step = max(1, _CHUNK_ELEMENTS // max(1, bsz * hq * block_size * nb))
    for first in range(0, nb, step):
        last = min(nb, first + step)
        t0, t1 = first * block_size, min(seq_len, last * block_size)
        n, pad = last - first, (last - first) * block_size - (t1 - t0)
        # The sequence's partial last block is filled with excluded tokens, so the chunk reshapes to whole blocks.
        q_chunk = qt[:, :, t0:t1].float()
        if cos is not None:
            q_chunk = rotate_by_block(q_chunk, cos[first:last], sin[first:last], block_size)
        q_chunk = torch.nn.functional.pad(q_chunk, (0, 0, 0, pad))
        keep = torch.ones(bsz, t1 - t0, dtype=torch.bool, device=qt.device) if valid is None else valid[:, t0:t1]
        keep = torch.nn.functional.pad(keep, (0, pad), value=False).view(bsz, 1, n, block_size, 1)
        logits = torch.matmul(_group_rows(q_chunk, hkv), kh[:, :, :last].float().transpose(-1, -2))
        logits = _ungroup_rows(logits, hq).view(bsz, hq, n, block_size, last)
        allowed = causal[first:last, :last].expand(bsz, n, last)
        if prob and candidates is not None:
            allowed = allowed & candidates[:, first:last, :last].bool()
        allowed = allowed[:, None]  # [B, 1, n, last]
        if prob:
            logits = logits.masked_fill(~allowed[:, :, :, None], float("-inf")).log_softmax(dim=-1)
        best = logits.masked_fill(~keep, float("-inf")).amax(dim=3)
        best = best.masked_fill(~keep.any(dim=3), 0.0)  # a block of padding alone scores 0
        out[:, :, first:last, :last] = best.masked_fill(~allowed, float("-inf"))
    return out


def rotate_by_block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_size: int) -> torch.Tensor:
    """`x [B, H, T, F]` with token t turned by the angles of its block t // block_size (`cos`, `sin`
    `[nB, R]`) in its first R features, rotate-half convention; the rest pass through. `-sin` turns back: the
    rotation's transpose (its halves are equal, so sin commutes with rotate-half)."""
    rd, half = cos.shape[-1], cos.shape[-1] // 2
    block_of = torch.arange(x.shape[2], device=x.device) // block_size
    cos_t, sin_t = cos[block_of], sin[block_of]  # [T, R]: each token's block angles
    rot = x[..., :rd]
    partner = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos_t + partner * sin_t, x[..., rd:]), dim=-1)


def cross_entropy_with_grad(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool
) -> torch.Tensor:
    """`seer_kernels.cross_entropy_with_grad` in PyTorch: float32 math, the gradient written back into `logits` in
    its dtype; the reference of `triton_cross_entropy`."""
    valid = targets != ignore_index
    index = targets.clamp(min=0).unsqueeze(1)
    work = logits.float()
    lse = torch.logsumexp(work, dim=-1)
    losses = torch.where(valid, lse - work.gather(1, index).squeeze(1), 0.0)
    if write_grad:
        grad = work.sub_(lse.unsqueeze(1)).exp_()
        grad.scatter_add_(1, index, torch.full_like(lse, -1.0).unsqueeze(1))
        logits.copy_(grad.mul_(valid.unsqueeze(1)))
    return losses
