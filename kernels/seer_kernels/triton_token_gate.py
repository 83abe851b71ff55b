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

Layers: `_token_gate_kernel` and its helpers, the launcher `token_gate_forward`; the public op
`seer_kernels.token_gate_block_scores` checks the inputs and calls it. Forward only: the op refuses inputs that
need a gradient (training uses the PyTorch path of the gate, which recomputes chunks in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .indexing import num_blocks
from .triton_common import head_pointer
from .triton_tuning import check_kernel_kwargs, interpreting


# `tl.dot` input precision. Three tf32 products per float32 one (high and low parts): about float32 accuracy
# (the gate is sensitive to rounding: it scores in float32) on tensor cores; "ieee" would run the dots on the
# CUDA cores, several times slower, and plain "tf32" keeps only about 3 digits of each logit. Chosen from the
# hardware's rates, not yet timed on a GPU.
DOT_PRECISION = "tf32x3"


@triton.jit
def _key_tile_logits(q, k_head, cols, row, stride_kn, feats, feat_ok, PRECISION: tl.constexpr):
    """Logits `[BLOCK_T, BLOCK_J]` of the query tokens `q` against key blocks `cols` (those after `row` load as
    zeros: they are masked by the callers)."""
    k = tl.load(
        k_head + cols.to(tl.int64)[:, None] * stride_kn + feats[None, :],
        mask=(cols <= row)[:, None] & feat_ok[None, :],
        other=0.0,
    )
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
def _token_gate_kernel(
    QT, KH, VALID, CAND, COS, SIN, OUT,  # noqa: N803
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kn,
    stride_vb,
    stride_cb, stride_ci,
    stride_an,
    stride_ob, stride_oh, stride_oi,
    seq_len, n_blocks, n_heads_q, group, block_size, hidden, rot_dim,
    HAS_VALID: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    PROB: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HIDDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the output row of query block `row` of one (batch element, query head)."""
    # Rows with the most key blocks start first, so the short ones fill the GPU at the end.
    row = n_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads_q
    h = bh % n_heads_q
    hk = h // group

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

    out_row = head_pointer(OUT, b, h, stride_ob, stride_oh) + row.to(tl.int64) * stride_oi
    for tile in range(0, n_tiles):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        allowed = _allowed_columns(cand_row, cols, row, PROB)
        s = _key_tile_logits(q, k_head, cols, row, stride_kn, feats, feat_ok, PRECISION)
        if PROB:
            s = s - lse[:, None]
        best = tl.max(tl.where(token_ok[:, None], s, float("-inf")), 0)
        best = tl.where(empty, 0.0, best)
        tl.store(out_row + cols, tl.where(allowed, best, float("-inf")), mask=cols < n_blocks)
    # Key blocks after the row's own are never candidates.
    for tile in range(n_tiles, tl.cdiv(n_blocks, BLOCK_J)):
        cols = tile * BLOCK_J + tl.arange(0, BLOCK_J)
        tl.store(out_row + cols, tl.full([BLOCK_J], float("-inf"), dtype=tl.float32), mask=cols < n_blocks)


@dataclass(frozen=True)
class TokenGateTiles:
    """Launch settings of the token-gate kernel.

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
    (A first choice: not yet tuned on a GPU.)
    """
    if interpreting():
        return TokenGateTiles(64, 4, 1)
    return TokenGateTiles(64, 8 if block_tokens * hidden > 64 * 128 else 4, 2)


def _power_of_two_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


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

    Returns:
        float32 `[B, Hq, nB, nB]`, every entry written by the kernel.
    """
    qt, kh = (t if t.stride(-1) == 1 else t.contiguous() for t in (qt, kh))
    bsz, hq, seq_len, hidden = qt.shape
    nb = num_blocks(seq_len, block_size)
    if out is None:
        out = torch.empty(bsz, hq, nb, nb, dtype=torch.float32, device=qt.device)
    if out.numel() == 0:
        return out
    block_tokens, padded_hidden = _power_of_two_at_least_16(block_size), _power_of_two_at_least_16(hidden)
    tiles = tiles or default_tiles(block_tokens, padded_hidden)
    # int8 copies: a few bytes per token (valid) and per block pair (candidates), read as 0/1 by the kernel.
    valid8 = None if valid is None else valid.to(device=qt.device, dtype=torch.int8).contiguous()
    cand8 = None if not prob or candidates is None else candidates.to(device=qt.device, dtype=torch.int8).contiguous()
    if prob and cand8 is None:
        cand8 = torch.ones(1, nb, nb, dtype=torch.int8, device=qt.device).expand(bsz, nb, nb)
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    args = (
        qt, kh, out if valid8 is None else valid8, out if cand8 is None else cand8,
        out if cos is None else cos, out if sin is None else sin, out,
        qt.stride(0), qt.stride(1), qt.stride(2),
        kh.stride(0), kh.stride(1), kh.stride(2),
        0 if valid8 is None else valid8.stride(0),
        0 if cand8 is None else cand8.stride(0), 0 if cand8 is None else cand8.stride(1),
        0 if cos is None else cos.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        seq_len, nb, hq, hq // kh.shape[1], block_size, hidden, 0 if cos is None else cos.shape[1],
    )
    kwargs = dict(
        HAS_VALID=valid8 is not None,
        HAS_ROPE=cos is not None,
        PROB=prob,
        BLOCK_T=block_tokens,
        BLOCK_J=tiles.key_blocks,
        HIDDEN=padded_hidden,
        PRECISION=precision,
    )
    check_kernel_kwargs(_token_gate_kernel, kwargs)
    _token_gate_kernel[(nb, bsz * hq)](*args, **kwargs, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
