"""Fused token-scored gate: per (query block, key block), the max over the query block's tokens of each token's
logit (or log-probability) against the pooled key blocks, without the `[B, Hq, L, nB]` per-token logits.

One program per (query block I, batch element and query head) loads the block's projected query tokens once
(turning them by block I's RoPE angles when given, so the caller need not write rotated copies) and walks the key blocks 0..I (the candidates are block-causal) in tiles of `BLOCK_J` key blocks:
- `token_logit_max`: one pass; each tile's logits `[BLOCK_T, BLOCK_J]` are reduced over the valid tokens and
  stored;
- `token_prob_max`: a first pass computes each token's log-sum-exp over its row's candidate key blocks (online,
  as flash attention does), a second recomputes the logits and reduces `logit - lse` over the valid tokens.
Every program writes its whole output row: -inf after block I (and at non-candidates in `token_prob_max`), 0 for
a query block without a valid token (at its candidates), so the output needs no initialisation.

Backward: a max passes its gradient to its winning token alone, so the forward can save, per (query block, key
block), the index of that token within the block (`SAVE_FOR_BACKWARD`), and in `token_prob_max` each token's
log-sum-exp. `_token_gate_backward_kernel` (one program per query block and (batch element, query head), as the
forward) turns the upstream gradient dS of its row into per-token gradients of the logits (dS at the winners,
minus each token's softmax times its total in `token_prob_max`), writes the gradient of its tokens' rotated
queries and adds the key blocks' gradients atomically (every query block I >= j and the query heads of a KV group
reach key block j). The launcher `token_gate_backward` then turns the query gradient back by each block's angles.

Layers: `_token_gate_kernel`, `_token_gate_backward_kernel` and their helpers; the launchers
`token_gate_forward`, `token_gate_backward`; `TokenGateScores` (autograd); the public op
`seer_kernels.token_gate_block_scores` checks the inputs and calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .indexing import num_blocks
from .pytorch_chunked import rotate_by_block
from .triton_common import head_pointer
from .triton_tuning import check_kernel_kwargs, interpreting


# `tl.dot` input precision. Three tf32 products per float32 one (high and low parts): about float32 accuracy
# (the gate is sensitive to rounding: it scores in float32) on tensor cores; "ieee" would run the dots on the
# CUDA cores, several times slower, and plain "tf32" keeps only about 3 digits of each logit. Chosen from the
# hardware's rates, not yet timed on a GPU.
DOT_PRECISION = "tf32x3"


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
    """Logits `[BLOCK_T, BLOCK_J]` of the query tokens `q` against key blocks `cols` (those after `row` are
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
    """`q [BLOCK_T, HIDDEN]` (the tokens at `pos` of one head, loaded from `q_head`) turned by query block `row`'s
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
def _query_block(
    QT, VALID, COS, SIN, b, h, row,  # noqa: N803
    stride_qb, stride_qh, stride_ql, stride_vb, stride_an,
    seq_len, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HIDDEN: tl.constexpr,
):
    """The tokens of query block `row` of one (batch element, query head), as forward and backward score them.

    Returns `(q, pos, in_block, token_ok)`: `q [BLOCK_T, HIDDEN]` float32 (rotated by the block's angles with
    HAS_ROPE; zeros past the block, the sequence or `hidden`), the tokens' positions `[BLOCK_T]`, whether each
    row of the tile is a token of the block, and whether it is a valid one (not padding).
    """
    offs_t = tl.arange(0, BLOCK_T)
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
    token_ok = in_block
    if HAS_VALID:
        token_ok = token_ok & (tl.load(VALID + b.to(tl.int64) * stride_vb + pos, mask=in_block, other=0) != 0)
    return q, pos, in_block, token_ok


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
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the output row of query block `row` of one (batch element, query head). With
    SAVE_FOR_BACKWARD it also writes the row's winning tokens (`WIN`, int32 `[B, Hq, nB, nB]`: the index within
    the block of the token whose (log-probability) logit is the max, any value where no token wins) and, with
    PROB, the log-sum-exp of each of its tokens (`LSE`, float32 `[B, Hq, L]`)."""
    # Rows with the most key blocks start first, so the short ones fill the GPU at the end.
    row = n_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

    q, pos, in_block, token_ok = _query_block(
        QT, VALID, COS, SIN, b, h, row, stride_qb, stride_qh, stride_ql, stride_vb, stride_an,
        seq_len, block_size, hidden, rot_dim, HAS_VALID, HAS_ROPE, BLOCK_T, HIDDEN,
    )
    feats = tl.arange(0, HIDDEN)
    feat_ok = feats < hidden
    # A block of padding alone scores 0, as a pooled query of no tokens would.
    empty = tl.sum(token_ok.to(tl.int32), 0) == 0

    k_head = head_pointer(KH, b, hk, stride_kb, stride_kh)
    cand_row = CAND + b.to(tl.int64) * stride_cb + row.to(tl.int64) * stride_ci
    n_tiles = tl.cdiv(row + 1, BLOCK_J)
    lse = tl.zeros([BLOCK_T], dtype=tl.float32)
    if PROB:
        m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
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

    out_row = head_pointer(OUT, b, h, stride_ob, stride_oh) + row.to(tl.int64) * stride_oi
    win_row = head_pointer(WIN, b, h, stride_wb, stride_wh) + row.to(tl.int64) * stride_wi
    for tile in range(0, n_tiles):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        allowed = _allowed_columns(cand_row, cols, row, PROB)
        s = _key_tile_logits(q, k_head, cols, row, stride_kn, feats, feat_ok, PRECISION)
        if PROB:
            s = s - lse[:, None]
        s = tl.where(token_ok[:, None], s, float("-inf"))
        best = tl.where(empty, 0.0, tl.max(s, 0))
        tl.store(out_row + cols, tl.where(allowed, best, float("-inf")), mask=cols < n_blocks)
        if SAVE_FOR_BACKWARD:
            # The same masked logits as the max: the saved token is the one whose value was stored.
            tl.store(win_row + cols, tl.argmax(s, 0).to(tl.int32), mask=cols < n_blocks)
    # Key blocks after the row's own are never candidates.
    for tile in range(n_tiles, tl.cdiv(n_blocks, BLOCK_J)):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        tl.store(out_row + cols, tl.full([BLOCK_J], float("-inf"), dtype=tl.float32), mask=cols < n_blocks)


@triton.jit
def _winner_gradients(ds_row, win_row, cols, allowed, token_ok, offs_t):
    """float32 `[BLOCK_T, BLOCK_J]`: the upstream gradient of the row's key blocks `cols` at the token that won
    each of them, 0 at the other tokens, at key blocks that are not `allowed` (their score is a constant -inf) and
    in a block without valid tokens (its constant 0)."""
    ds = tl.load(ds_row + cols, mask=allowed, other=0.0)
    winner = tl.load(win_row + cols, mask=allowed, other=-1)
    wins = (offs_t[:, None] == winner[None, :]) & token_ok[:, None] & allowed[None, :]
    return tl.where(wins, ds[None, :], 0.0)


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
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the gradients that query block `row` of one (batch element, query head) gives its tokens'
    rotated queries (`DQ [B, Hq, L, hidden]`, written) and the key blocks of its KV head (`DKH [B, Hkv, nB,
    hidden]`, float32, added atomically). `DS` and `WIN` share the strides `stride_s*` (`[B, Hq, nB, nB]`)."""
    row = n_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

    q, pos, in_block, token_ok = _query_block(
        QT, VALID, COS, SIN, b, h, row, stride_qb, stride_qh, stride_ql, stride_vb, stride_an,
        seq_len, block_size, hidden, rot_dim, HAS_VALID, HAS_ROPE, BLOCK_T, HIDDEN,
    )
    offs_t = tl.arange(0, BLOCK_T)
    feats = tl.arange(0, HIDDEN)
    feat_ok = feats < hidden
    k_head = head_pointer(KH, b, hk, stride_kb, stride_kh)
    dk_head = head_pointer(DKH, b, hk, stride_gb, stride_gh)
    cand_row = CAND + b.to(tl.int64) * stride_cb + row.to(tl.int64) * stride_ci
    ds_row = head_pointer(DS, b, h, stride_sb, stride_sh) + row.to(tl.int64) * stride_si
    win_row = head_pointer(WIN, b, h, stride_sb, stride_sh) + row.to(tl.int64) * stride_si
    n_tiles = tl.cdiv(row + 1, BLOCK_J)

    lse = tl.zeros([BLOCK_T], dtype=tl.float32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    if PROB:
        lse = tl.load(head_pointer(LSE, b, h, stride_lb, stride_lh) + pos, mask=token_ok, other=0.0)
        # First pass: each token's total upstream gradient r_t, which every log-probability of its row shares
        # through the log-sum-exp.
        for tile in range(0, n_tiles):
            cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
            allowed = _allowed_columns(cand_row, cols, row, PROB)
            total += tl.sum(_winner_gradients(ds_row, win_row, cols, allowed, token_ok, offs_t), 1)

    dq = tl.zeros([BLOCK_T, HIDDEN], dtype=tl.float32)
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


@dataclass(frozen=True)
class TokenGateTiles:
    """Launch settings of the token-gate kernels.

    Attributes:
        key_blocks: key blocks per tile (`BLOCK_J`, a power of two; >= 16 on a GPU, where `tl.dot` needs it).
        num_warps, num_stages: Triton launch settings.
    """

    key_blocks: int
    num_warps: int
    num_stages: int


def default_tiles(block_tokens: int, hidden: int) -> TokenGateTiles:
    """The tiles of a launch whose query tile has `block_tokens` rows and `hidden` (padded) features.

    The interpreter takes wide key tiles (fewest interpreted steps). On a GPU, 64 key blocks per tile; a query
    tile of more than 64 x 128 floats gets 8 warps, so the registers holding it stay within a thread's budget.
    (A first choice: not yet tuned on a GPU, for the forward nor the backward.)
    """
    if interpreting():
        return TokenGateTiles(64, 4, 1)
    return TokenGateTiles(64, 8 if block_tokens * hidden > 64 * 128 else 4, 2)


def _power_of_two_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@dataclass(frozen=True)
class _LaunchInputs:
    """The inputs of a token-gate launch as the kernels read them (`_prepare`)."""

    qt: torch.Tensor
    kh: torch.Tensor
    valid8: torch.Tensor | None
    cand8: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    n_blocks: int
    block_tokens: int
    padded_hidden: int
    tiles: TokenGateTiles


def _prepare(qt, kh, valid, candidates, cos, sin, *, block_size: int, prob: bool, tiles) -> _LaunchInputs:
    """Unit last strides, int8 masks, the padded tile sizes and the tiles (`default_tiles` unless given)."""
    qt, kh = (t if t.stride(-1) == 1 else t.contiguous() for t in (qt, kh))
    bsz, _, seq_len, hidden = qt.shape
    nb = num_blocks(seq_len, block_size)
    block_tokens, padded_hidden = _power_of_two_at_least_16(block_size), _power_of_two_at_least_16(hidden)
    # int8 copies: a few bytes per token (valid) and per block pair (candidates), read as 0/1 by the kernels.
    valid8 = None if valid is None else valid.to(device=qt.device, dtype=torch.int8).contiguous()
    cand8 = None if not prob or candidates is None else candidates.to(device=qt.device, dtype=torch.int8).contiguous()
    if prob and cand8 is None:
        cand8 = torch.ones(1, nb, nb, dtype=torch.int8, device=qt.device).expand(bsz, nb, nb)
    if cos is not None:
        cos, sin = cos.detach().contiguous(), sin.detach().contiguous()
    return _LaunchInputs(
        qt, kh, valid8, cand8, cos, sin, nb, block_tokens, padded_hidden,
        tiles or default_tiles(block_tokens, padded_hidden),
    )


def _shared_args(inputs: _LaunchInputs, stand_in: torch.Tensor) -> tuple:
    """`(pointers, strides)`: the first pointer arguments of both kernels, QT, KH, VALID, CAND, COS, SIN
    (`stand_in` for the absent ones, never read), and their strides, the first stride arguments."""
    qt, kh, valid8, cand8, cos, sin = inputs.qt, inputs.kh, inputs.valid8, inputs.cand8, inputs.cos, inputs.sin
    return (
        qt, kh, stand_in if valid8 is None else valid8, stand_in if cand8 is None else cand8,
        stand_in if cos is None else cos, stand_in if sin is None else sin,
    ), (
        qt.stride(0), qt.stride(1), qt.stride(2),
        kh.stride(0), kh.stride(1), kh.stride(2),
        0 if valid8 is None else valid8.stride(0),
        0 if cand8 is None else cand8.stride(0), 0 if cand8 is None else cand8.stride(1),
        0 if cos is None else cos.stride(0),
    )


def _constexprs(inputs: _LaunchInputs, prob: bool, precision: str) -> dict:
    """The constexpr arguments both kernels take."""
    return dict(
        HAS_VALID=inputs.valid8 is not None, HAS_ROPE=inputs.cos is not None, PROB=prob,
        BLOCK_T=inputs.block_tokens, BLOCK_J=inputs.tiles.key_blocks, HIDDEN=inputs.padded_hidden, PRECISION=precision,
    )


def _sizes(inputs: _LaunchInputs, block_size: int) -> tuple:
    """The size arguments both kernels take last."""
    _, hq, seq_len, hidden = inputs.qt.shape
    rot_dim = 0 if inputs.cos is None else inputs.cos.shape[1]
    return seq_len, inputs.n_blocks, hq, hq // inputs.kh.shape[1], block_size, hidden, rot_dim


@torch.compiler.disable
def token_gate_forward(
    qt: torch.Tensor,
    kh: torch.Tensor,
    valid: torch.Tensor | None,
    candidates: torch.Tensor | None,
    *,
    block_size: int,
    prob: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    precision: str = DOT_PRECISION,
    tiles: TokenGateTiles | None = None,
    out: torch.Tensor | None = None,
    winners: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the token-gate kernel; inputs are checked by `seer_kernels.token_gate_block_scores`.

    Kept out of `torch.compile` graphs (a compiled gate breaks its graph here and launches the kernel eagerly).

    Args:
        qt: float32 `[B, Hq, L, hidden]`, last dim contiguous (other strides free).
        kh: float32 `[B, Hkv, nB, hidden]`, `Hq % Hkv == 0`.
        valid: bool `[B, L]` or None (every token valid).
        candidates: bool `[B, nB, nB]` (read with `prob`), or None (the block-causal triangle).
        cos, sin: optional float32 `[nB, rotary_dim]`: the kernel turns each token's query by its block's angles
            (`qt` then holds unrotated queries).
        block_size: tokens per block (any positive size: the query tile is padded to a power of two >= 16).
        prob: True for `token_prob_max`, False for `token_logit_max`.
        precision: `tl.dot` input precision: `tf32x3` (default, `DOT_PRECISION`), `ieee` or `tf32`.
        tiles: launch settings (default: `default_tiles`).
        out: optional float32 `[B, Hq, nB, nB]` to write into (any contents: the kernel writes every entry).
        winners: optional int32 `[B, Hq, nB, nB]` (contiguous) to save, for the backward, the index within query
            block I of the token that wins each (I, j <= I) (any value where no token wins).
        lse: float32 `[B, Hq, L]` (contiguous), required with `winners` and `prob`: each token's log-sum-exp over
            its block's candidates (-inf for a block without candidates).

    Returns:
        float32 `[B, Hq, nB, nB]`, every entry written by the kernel.
    """
    inputs = _prepare(qt, kh, valid, candidates, cos, sin, block_size=block_size, prob=prob, tiles=tiles)
    bsz, hq = inputs.qt.shape[:2]
    nb = inputs.n_blocks
    if out is None:
        out = torch.empty(bsz, hq, nb, nb, dtype=torch.float32, device=qt.device)
    if out.numel() == 0:
        return out
    save = winners is not None
    if save and prob and lse is None:
        raise ValueError("token_gate_forward saves the tokens' lse with winners in prob mode: pass lse")
    pointers, strides = _shared_args(inputs, out)
    saved = (winners if save else out, lse if save and prob else out)
    saved_strides = (
        (winners.stride(0), winners.stride(1), winners.stride(2)) if save else (0, 0, 0),
        (lse.stride(0), lse.stride(1)) if save and prob else (0, 0),
    )
    kwargs = dict(_constexprs(inputs, prob, precision), SAVE_FOR_BACKWARD=save)
    check_kernel_kwargs(_token_gate_kernel, kwargs)
    _token_gate_kernel[(nb, bsz * hq)](
        *pointers, out, *saved, *strides,
        out.stride(0), out.stride(1), out.stride(2), *saved_strides[0], *saved_strides[1],
        *_sizes(inputs, block_size),
        **kwargs, num_warps=inputs.tiles.num_warps, num_stages=inputs.tiles.num_stages,
    )
    return out


@torch.compiler.disable
def token_gate_backward(
    grad: torch.Tensor,
    qt: torch.Tensor,
    kh: torch.Tensor,
    valid: torch.Tensor | None,
    candidates: torch.Tensor | None,
    winners: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    block_size: int,
    prob: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    precision: str = DOT_PRECISION,
    tiles: TokenGateTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the token-gate backward kernel: the gradients of the scores' `qt` and `kh` given theirs.

    Args:
        grad: `[B, Hq, nB, nB]`, the upstream gradient of the scores (read at the finite entries only: the -inf
            ones, and the 0 of a block without valid tokens, are constants).
        qt, kh, valid, candidates, cos, sin, block_size, prob, precision, tiles: as given to `token_gate_forward`.
        winners, lse: what `token_gate_forward` saved (`lse` None unless `prob`).

    Returns:
        `(dqt, dkh)`: float32 `[B, Hq, L, hidden]` and float32 `[B, Hkv, nB, hidden]`.
    """
    inputs = _prepare(qt, kh, valid, candidates, cos, sin, block_size=block_size, prob=prob, tiles=tiles)
    bsz, hq, seq_len, hidden = inputs.qt.shape
    nb = inputs.n_blocks
    grad = grad.to(torch.float32).contiguous()
    winners = winners.contiguous()
    dq_rot = torch.empty(bsz, hq, seq_len, hidden, dtype=torch.float32, device=qt.device)
    # Every query block I >= j (and every query head of the KV group) adds to key block j: a zeroed float32 sum.
    dkh = torch.zeros(inputs.kh.shape, dtype=torch.float32, device=qt.device)
    if dq_rot.numel() == 0:
        return dq_rot, dkh
    pointers, strides = _shared_args(inputs, grad)
    kwargs = _constexprs(inputs, prob, precision)
    check_kernel_kwargs(_token_gate_backward_kernel, kwargs)
    _token_gate_backward_kernel[(nb, bsz * hq)](
        *pointers, grad, winners, grad if lse is None else lse, dq_rot, dkh, *strides,
        grad.stride(0), grad.stride(1), grad.stride(2),
        0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
        dq_rot.stride(0), dq_rot.stride(1), dq_rot.stride(2),
        dkh.stride(0), dkh.stride(1), dkh.stride(2),
        *_sizes(inputs, block_size),
        **kwargs, num_warps=inputs.tiles.num_warps, num_stages=inputs.tiles.num_stages,
    )
    if inputs.cos is None:
        return dq_rot, dkh
    # The forward turned each token's query by its block's angles; its gradient turns back (the transpose).
    return rotate_by_block(dq_rot, inputs.cos, -inputs.sin, block_size), dkh


class TokenGateScores(torch.autograd.Function):
    """The token-gate scores with a gradient for `qt` and `kh` (none for valid, candidates, cos and sin).

    Forward saves, besides its inputs, the winning token of each (query block, key block) (int32, nB * nB per
    query head) and in `token_prob_max` each token's log-sum-exp (one float per token and query head); backward
    recomputes each query block's logits against the key tiles from them.
    """

    @staticmethod
    def forward(ctx, qt, kh, valid, candidates, cos, sin, block_size: int, prob: bool):
        bsz, hq, seq_len, _ = qt.shape
        nb = kh.shape[2]
        winners = torch.empty(bsz, hq, nb, nb, dtype=torch.int32, device=qt.device)
        lse = torch.empty(bsz, hq, seq_len, dtype=torch.float32, device=qt.device) if prob else None
        scores = token_gate_forward(
            qt, kh, valid, candidates, block_size=block_size, prob=prob, cos=cos, sin=sin, winners=winners, lse=lse
        )
        ctx.save_for_backward(qt, kh, valid, candidates, cos, sin, winners, lse)
        ctx.block_size, ctx.prob = block_size, prob
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        qt, kh, valid, candidates, cos, sin, winners, lse = ctx.saved_tensors
        dqt, dkh = token_gate_backward(
            grad, qt, kh, valid, candidates, winners, lse, block_size=ctx.block_size, prob=ctx.prob, cos=cos, sin=sin
        )
        return (
            dqt if ctx.needs_input_grad[0] else None,
            dkh.to(kh.dtype) if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None,
        )


@torch.compiler.disable
def differentiable_token_gate_scores(
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
    """`TokenGateScores` (arguments as `token_gate_forward`'s); kept out of `torch.compile` graphs, which run the
    autograd function eagerly here."""
    return TokenGateScores.apply(qt, kh, valid, candidates, cos, sin, block_size, prob)
