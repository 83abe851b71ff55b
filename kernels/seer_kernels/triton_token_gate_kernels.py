"""Triton kernels of the fused token-scored gate (`triton_token_gate` launches them): per (query block, key
block), the max over the query block's tokens of each token's logit (or log-probability) against the pooled key
blocks, without the `[B, Hq, L, nB]` per-token logits.

One program per (query block I, batch element and query head) walks the block's tokens in sub-tiles of `ROWS`
rows (the whole block unless a wide gate's tiles would not fit in shared memory, see
`triton_token_gate_tiles.default_tiles`). Each sub-tile loads its projected query tokens once (turning them by
block I's RoPE angles when given, so the caller need not write rotated copies) and walks the key blocks 0..I (the
candidates are block-causal) in tiles of `BLOCK_J` key blocks:
- `token_logit_max`: one pass; each tile's logits `[ROWS, BLOCK_J]` are reduced over the valid tokens and
  stored;
- `token_prob_max`: a first pass computes each token's log-sum-exp over its row's candidate key blocks (online,
  as flash attention does), a second recomputes the logits and reduces `logit - lse` over the valid tokens.
A later sub-tile reads the maxima its block's earlier ones stored and keeps the larger (the program owns its
output row: no other program writes it). Every program writes its whole output row: -inf after block I (and at
non-candidates in `token_prob_max`), 0 for a query block without a valid token (at its candidates), so the
output needs no initialisation. A block of one sub-tile runs it outside any loop: a loop around it costs
registers (spilled) in every launch, not only in those of several sub-tiles.

Backward: a max passes its gradient to its winning token alone, so the forward can save, per (query block, key
block), the index of that token within the block (`SAVE_FOR_BACKWARD`), and in `token_prob_max` each token's
log-sum-exp. `_token_gate_backward_kernel` (one program per query block and (batch element, query head), as the
forward, sub-tile by sub-tile) turns the upstream gradient dS of its row into per-token gradients of the logits
(dS at the winners, minus each token's softmax times its total in `token_prob_max`), writes the gradient of its
tokens' rotated queries and adds the key blocks' gradients atomically (every query block I >= j and the query
heads of a KV group reach key block j).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import head_pointer


@triton.jit
def _key_tile(k_head, cols, row, stride_kn, feats, feat_ok):
    """Key blocks `cols` `[BLOCK_J, HIDDEN]` of one KV head; those after `row` load as zeros (the callers mask
    them)."""
    return tl.load(
        k_head + cols.to(tl.int64)[:, None] * stride_kn + feats[None, :],
        mask=(cols <= row)[:, None] & feat_ok[None, :],
        other=0.0,
    )


@triton.jit
def _key_tile_logits(q, k_head, cols, row, stride_kn, feats, feat_ok, PRECISION: tl.constexpr):
    """Logits `[ROWS, BLOCK_J]` of the query tokens `q` against key blocks `cols` (those after `row` are
    zeros: they are masked by the callers)."""
    k = _key_tile(k_head, cols, row, stride_kn, feats, feat_ok)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION)


@triton.jit
def _allowed_columns(cand_row, cols, row, PROB: tl.constexpr):
    """bool `[BLOCK_J]`: the key blocks `cols` a token of query block `row` may score (block-causal, and among
    the row's candidates in `token_prob_max`)."""
    allowed = cols <= row
    if PROB:
        allowed = allowed & (tl.load(cand_row + cols, mask=allowed, other=0) != 0)
    return allowed


@triton.jit
def _rotate_at_block(q, q_head, pos, in_block, stride_ql, feats, COS, SIN, stride_an, row, rot_dim):
    """`q [ROWS, HIDDEN]` (the tokens at `pos` of one head, loaded from `q_head`) turned by query block `row`'s
    angles in its first `rot_dim` features, rotate-half convention: feature f < rot_dim / 2 pairs with
    f + rot_dim / 2 (negated), the next rot_dim / 2 with f - rot_dim / 2; the features beyond pass through."""
    half = rot_dim // 2
    rotated = feats < rot_dim
    partner = tl.where(feats < half, feats + half, feats - half)
    sign = tl.where(feats < half, -1.0, 1.0)
    q_partner = tl.load(
        q_head + pos.to(tl.int64)[:, None] * stride_ql + partner[None, :],
        mask=in_block[:, None] & rotated[None, :],
        other=0.0,
    )
    angles = row.to(tl.int64) * stride_an + feats
    cos = tl.load(COS + angles, mask=rotated, other=1.0)
    sin = tl.load(SIN + angles, mask=rotated, other=0.0)
    return q * cos[None, :] + q_partner * (sign * sin)[None, :]


@triton.jit
def _valid_tokens(VALID, b, pos, in_block, stride_vb, HAS_VALID: tl.constexpr):
    """bool, the shape of `pos`: which tokens at `pos` (inside the block where `in_block`) are not padding."""
    if HAS_VALID:
        return in_block & (tl.load(VALID + b.to(tl.int64) * stride_vb + pos, mask=in_block, other=0) != 0)
    return in_block


@triton.jit
def _query_block(
    QT, VALID, COS, SIN, b, h, row, first,  # noqa: N803
    stride_qb, stride_qh, stride_ql, stride_vb, stride_an,
    seq_len, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    ROWS: tl.constexpr,
    HIDDEN: tl.constexpr,
):
    """Tokens `first .. first + ROWS` of query block `row` of one (batch element, query head), as forward and
    backward score them.

    Returns `(q, offs_t, pos, in_block, token_ok)`: `q [ROWS, HIDDEN]` float32 (rotated by the block's angles
    with HAS_ROPE; zeros past the block, the sequence or `hidden`), the tokens' indices within the block and
    positions `[ROWS]`, whether each row of the tile is a token of the block, and whether it is a valid one (not
    padding).
    """
    offs_t = first + tl.arange(0, ROWS)
    pos = row * block_size + offs_t
    in_block = (offs_t < block_size) & (pos < seq_len)
    # HIDDEN is the feature width rounded up to a power of two; the features beyond `hidden` load as zeros.
    feats = tl.arange(0, HIDDEN)
    feat_ok = feats < hidden
    q_head = head_pointer(QT, b, h, stride_qb, stride_qh)
    q = tl.load(
        q_head + pos.to(tl.int64)[:, None] * stride_ql + feats[None, :],
        mask=in_block[:, None] & feat_ok[None, :],
        other=0.0,
    )
    if HAS_ROPE:
        q = _rotate_at_block(q, q_head, pos, in_block, stride_ql, feats, COS, SIN, stride_an, row, rot_dim)
    token_ok = _valid_tokens(VALID, b, pos, in_block, stride_vb, HAS_VALID)
    return q, offs_t, pos, in_block, token_ok



@triton.jit
def _forward_rows(
    QT, VALID, COS, SIN, LSE, b, h, row, first, k_head, cand_row, out_row, win_row, empty,  # noqa: N803
    stride_qb, stride_qh, stride_ql, stride_kn, stride_vb, stride_an, stride_lb, stride_lh,
    seq_len, n_blocks, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PROB: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
    MERGE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Score tokens `first .. first + ROWS` of query block `row` against the row's key blocks and store, per key
    block, the max over the valid ones (`empty`: the block has none; with SAVE_FOR_BACKWARD also the winners and
    the tokens' lse). With MERGE, keep the larger of that max and what the block's earlier sub-tiles stored."""
    q, offs_t, pos, in_block, token_ok = _query_block(
        QT, VALID, COS, SIN, b, h, row, first, stride_qb, stride_qh, stride_ql, stride_vb, stride_an,
        seq_len, block_size, hidden, rot_dim, HAS_VALID, HAS_ROPE, ROWS, HIDDEN,
    )
    feats = tl.arange(0, HIDDEN)
    feat_ok = feats < hidden
    n_tiles = tl.cdiv(row + 1, BLOCK_J)
    lse = tl.zeros([ROWS], dtype=tl.float32)
    if PROB:
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        for tile in range(0, n_tiles):
            cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
            allowed = _allowed_columns(cand_row, cols, row, PROB)
            s = _key_tile_logits(q, k_head, cols, row, stride_kn, feats, feat_ok, PRECISION)
            s = tl.where(allowed[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no candidate so far keeps m = -inf; shifting by 0 keeps exp() free of NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
            m_i = m_new
        # -inf for a row without candidates; its output is -inf everywhere (the candidate mask below).
        lse = m_i + tl.log(l_i)
        if SAVE_FOR_BACKWARD:
            tl.store(head_pointer(LSE, b, h, stride_lb, stride_lh) + pos, lse, mask=in_block)

    for tile in range(0, n_tiles):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        allowed = _allowed_columns(cand_row, cols, row, PROB)
        s = _key_tile_logits(q, k_head, cols, row, stride_kn, feats, feat_ok, PRECISION)
        if PROB:
            s = s - lse[:, None]
        s = tl.where(token_ok[:, None], s, float("-inf"))
        best = tl.max(s, 0)
        # The same masked logits as the max: the saved token is the one whose value was stored.
        winner = first + tl.argmax(s, 0)
        if MERGE:
            # The maxima of the block's earlier sub-tiles (-inf before the first): a later token wins only when
            # strictly larger, so a tie keeps the first token, as argmax does within a tile.
            stored = (cols < n_blocks) & (first > 0)
            earlier = tl.load(out_row + cols, mask=stored, other=float("-inf"))
            wins = best > earlier
            best = tl.where(wins, best, earlier)
            if SAVE_FOR_BACKWARD:
                winner = tl.where(wins, winner, tl.load(win_row + cols, mask=stored, other=0))
        tl.store(out_row + cols, tl.where(allowed, tl.where(empty, 0.0, best), float("-inf")), mask=cols < n_blocks)
        if SAVE_FOR_BACKWARD:
            tl.store(win_row + cols, winner.to(tl.int32), mask=cols < n_blocks)


@triton.jit
def _token_gate_kernel(
    QT, KH, VALID, CAND, COS, SIN, OUT, WIN, LSE,  # noqa: N803
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kn,
    stride_vb,
    stride_cb, stride_ci,
    stride_an,
    stride_ob, stride_oh, stride_oi,
    stride_wb, stride_wh, stride_wi,
    stride_lb, stride_lh,
    seq_len, n_blocks, n_heads_q, group, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PROB: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the output row of query block `row` of one (batch element, query head). With
    SAVE_FOR_BACKWARD it also writes the row's winning tokens (`WIN`, int32 `[B, Hq, nB, nB]`: the index within
    the block of the token whose (log-probability) logit is the max, any value where no token wins) and, with
    PROB, the log-sum-exp of each of its tokens (`LSE`, float32 `[B, Hq, L]`). BLOCK_T: the block's tokens
    rounded up to a power of two; ROWS (dividing it): the tokens of one sub-tile."""
    # Rows with the most key blocks start first, so the short ones fill the GPU at the end.
    row = n_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

    # A block of padding alone scores 0, as a pooled query of no tokens would.
    block_offs = tl.arange(0, BLOCK_T)
    block_pos = row * block_size + block_offs
    block_ok = _valid_tokens(
        VALID, b, block_pos, (block_offs < block_size) & (block_pos < seq_len), stride_vb, HAS_VALID
    )
    empty = tl.sum(block_ok.to(tl.int32), 0) == 0

    k_head = head_pointer(KH, b, hk, stride_kb, stride_kh)
    cand_row = CAND + b.to(tl.int64) * stride_cb + row.to(tl.int64) * stride_ci
    out_row = head_pointer(OUT, b, h, stride_ob, stride_oh) + row.to(tl.int64) * stride_oi
    win_row = head_pointer(WIN, b, h, stride_wb, stride_wh) + row.to(tl.int64) * stride_wi
    if ROWS < BLOCK_T:
        for first in range(0, block_size, ROWS):
            _forward_rows(
                QT, VALID, COS, SIN, LSE, b, h, row, first, k_head, cand_row, out_row, win_row, empty,
                stride_qb, stride_qh, stride_ql, stride_kn, stride_vb, stride_an, stride_lb, stride_lh,
                seq_len, n_blocks, block_size, hidden, rot_dim,
                HAS_VALID, HAS_ROPE, PROB, SAVE_FOR_BACKWARD, True, ROWS, BLOCK_J, HIDDEN, PRECISION,
            )
    else:
        _forward_rows(
            QT, VALID, COS, SIN, LSE, b, h, row, 0, k_head, cand_row, out_row, win_row, empty,
            stride_qb, stride_qh, stride_ql, stride_kn, stride_vb, stride_an, stride_lb, stride_lh,
            seq_len, n_blocks, block_size, hidden, rot_dim,
            HAS_VALID, HAS_ROPE, PROB, SAVE_FOR_BACKWARD, False, ROWS, BLOCK_J, HIDDEN, PRECISION,
        )
    # Key blocks after the row's own are never candidates.
    for tile in range(tl.cdiv(row + 1, BLOCK_J), tl.cdiv(n_blocks, BLOCK_J)):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        tl.store(out_row + cols, tl.full([BLOCK_J], float("-inf"), dtype=tl.float32), mask=cols < n_blocks)


@triton.jit
def _winner_gradients(ds_row, win_row, cols, allowed, token_ok, offs_t):
    """float32 `[ROWS, BLOCK_J]`: the upstream gradient of the row's key blocks `cols` at the token that won
    each of them (`offs_t`: the tile's tokens' indices within the block), 0 at the other tokens, at key blocks
    that are not `allowed` (their score is a constant -inf) and in a block without valid tokens (its constant
    0)."""
    ds = tl.load(ds_row + cols, mask=allowed, other=0.0)
    winner = tl.load(win_row + cols, mask=allowed, other=-1)
    wins = (offs_t[:, None] == winner[None, :]) & token_ok[:, None] & allowed[None, :]
    return tl.where(wins, ds[None, :], 0.0)


@triton.jit
def _backward_rows(
    QT, VALID, COS, SIN, LSE, DQ, b, h, row, first, k_head, dk_head, cand_row, ds_row, win_row,  # noqa: N803
    stride_qb, stride_qh, stride_ql, stride_kn, stride_vb, stride_an, stride_lb, stride_lh,
    stride_db, stride_dh, stride_dl, stride_gn,
    seq_len, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PROB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The gradients of tokens `first .. first + ROWS` of query block `row`: their rotated queries' (written to
    DQ) and their share of the key blocks' (added atomically at `dk_head`)."""
    q, offs_t, pos, in_block, token_ok = _query_block(
        QT, VALID, COS, SIN, b, h, row, first, stride_qb, stride_qh, stride_ql, stride_vb, stride_an,
        seq_len, block_size, hidden, rot_dim, HAS_VALID, HAS_ROPE, ROWS, HIDDEN,
    )
    feats = tl.arange(0, HIDDEN)
    feat_ok = feats < hidden
    n_tiles = tl.cdiv(row + 1, BLOCK_J)
    lse = tl.zeros([ROWS], dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    if PROB:
        lse = tl.load(head_pointer(LSE, b, h, stride_lb, stride_lh) + pos, mask=token_ok, other=0.0)
        # First pass: each token's total upstream gradient r_t, which every log-probability of its row shares
        # through the log-sum-exp.
        for tile in range(0, n_tiles):
            cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
            allowed = _allowed_columns(cand_row, cols, row, PROB)
            total += tl.sum(_winner_gradients(ds_row, win_row, cols, allowed, token_ok, offs_t), 1)

    dq = tl.zeros([ROWS, HIDDEN], dtype=tl.float32)
    for tile in range(0, n_tiles):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        allowed = _allowed_columns(cand_row, cols, row, PROB)
        ds = _winner_gradients(ds_row, win_row, cols, allowed, token_ok, offs_t)
        k = _key_tile(k_head, cols, row, stride_kn, feats, feat_ok)
        if PROB:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            # Softmax of each valid token over its allowed key blocks; tl.where keeps the exp() of masked
            # entries (possibly inf) out of the product.
            p = tl.where(token_ok[:, None] & allowed[None, :], tl.exp(s - lse[:, None]), 0.0)
            ds = ds - p * total[:, None]
        dq += tl.dot(ds, k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        tl.atomic_add(
            dk_head + cols.to(tl.int64)[:, None] * stride_gn + feats[None, :],
            dk,
            mask=allowed[:, None] & feat_ok[None, :],
        )
    tl.store(
        head_pointer(DQ, b, h, stride_db, stride_dh) + pos.to(tl.int64)[:, None] * stride_dl + feats[None, :],
        dq,
        mask=in_block[:, None] & feat_ok[None, :],
    )


@triton.jit
def _token_gate_backward_kernel(
    QT, KH, VALID, CAND, COS, SIN, DS, WIN, LSE, DQ, DKH,  # noqa: N803
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kn,
    stride_vb,
    stride_cb, stride_ci,
    stride_an,
    stride_sb, stride_sh, stride_si,
    stride_lb, stride_lh,
    stride_db, stride_dh, stride_dl,
    stride_gb, stride_gh, stride_gn,
    seq_len, n_blocks, n_heads_q, group, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PROB: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the gradients that query block `row` of one (batch element, query head) gives its tokens'
    rotated queries (`DQ [B, Hq, L, hidden]`, written) and the key blocks of its KV head (`DKH [B, Hkv, nB,
    hidden]`, float32, added atomically), `ROWS` tokens at a time (their gradients are independent). `DS` and
    `WIN` share the strides `stride_s*` (`[B, Hq, nB, nB]`)."""
    row = n_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

    k_head = head_pointer(KH, b, hk, stride_kb, stride_kh)
    dk_head = head_pointer(DKH, b, hk, stride_gb, stride_gh)
    cand_row = CAND + b.to(tl.int64) * stride_cb + row.to(tl.int64) * stride_ci
    ds_row = head_pointer(DS, b, h, stride_sb, stride_sh) + row.to(tl.int64) * stride_si
    win_row = head_pointer(WIN, b, h, stride_sb, stride_sh) + row.to(tl.int64) * stride_si
    if ROWS < BLOCK_T:
        for first in range(0, block_size, ROWS):
            _backward_rows(
                QT, VALID, COS, SIN, LSE, DQ, b, h, row, first, k_head, dk_head, cand_row, ds_row, win_row,
                stride_qb, stride_qh, stride_ql, stride_kn, stride_vb, stride_an, stride_lb, stride_lh,
                stride_db, stride_dh, stride_dl, stride_gn, seq_len, block_size, hidden, rot_dim,
                HAS_VALID, HAS_ROPE, PROB, ROWS, BLOCK_J, HIDDEN, PRECISION,
            )
    else:
        _backward_rows(
            QT, VALID, COS, SIN, LSE, DQ, b, h, row, 0, k_head, dk_head, cand_row, ds_row, win_row,
            stride_qb, stride_qh, stride_ql, stride_kn, stride_vb, stride_an, stride_lb, stride_lh,
            stride_db, stride_dh, stride_dl, stride_gn, seq_len, block_size, hidden, rot_dim,
            HAS_VALID, HAS_ROPE, PROB, ROWS, BLOCK_J, HIDDEN, PRECISION,
        )
