"""Launchers of the fused token-scored gate's Triton kernels (`triton_token_gate_kernels`, which describes them)
and their autograd function.

Layers: `token_gate_forward` and `token_gate_backward` launch the kernels with the tiles of
`triton_token_gate_tiles.default_tiles` (unless given); `TokenGateScores` (autograd) saves what the forward
wrote for the backward; the public op `seer_kernels.token_gate_block_scores` checks the inputs and calls them. The
launcher `token_gate_backward` turns the kernel's query gradient (w.r.t. the rotated queries) back by each block's
angles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch.autograd.function import once_differentiable

from .indexing import num_blocks
from .pytorch_chunked import rotate_by_block
from .triton_token_gate_kernels import _token_gate_backward_kernel, _token_gate_kernel
from .triton_token_gate_tiles import TokenGateTiles, default_tiles
from .triton_tuning import check_kernel_kwargs

# `tl.dot` input precision. Three tf32 products per float32 one (high and low parts): about float32 accuracy
# (the gate is sensitive to rounding: it scores in float32) on tensor cores; "ieee" would run the dots on the
# CUDA cores, several times slower, and plain "tf32" keeps only about 3 digits of each logit. Chosen from the
# hardware's rates, not yet timed on a GPU.
DOT_PRECISION = "tf32x3"


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
    rows: int


def _prepare(
    qt, kh, valid, candidates, cos, sin, *, block_size: int, prob: bool, tiles, backward: bool = False
) -> _LaunchInputs:
    """Unit last strides, int8 masks, the padded tile sizes and the tiles (`default_tiles` for the forward or the
    `backward` kernel, unless given) with their query rows per sub-tile."""
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
    tiles = tiles or default_tiles(block_tokens, padded_hidden, backward=backward)
    rows = min(block_tokens, tiles.query_rows or block_tokens)
    return _LaunchInputs(qt, kh, valid8, cand8, cos, sin, nb, block_tokens, padded_hidden, tiles, rows)


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
        BLOCK_T=inputs.block_tokens, ROWS=inputs.rows, BLOCK_J=inputs.tiles.key_blocks, HIDDEN=inputs.padded_hidden,
        PRECISION=precision,
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
        tiles: launch settings (default: `default_tiles` of the forward kernel).
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
        qt, kh, valid, candidates, cos, sin, block_size, prob, precision: as given to `token_gate_forward`.
        tiles: launch settings (default: `default_tiles` of the backward kernel).
        winners, lse: what `token_gate_forward` saved (`lse` None unless `prob`).

    Returns:
        `(dqt, dkh)`: float32 `[B, Hq, L, hidden]` and float32 `[B, Hkv, nB, hidden]`.
    """
    inputs = _prepare(
        qt, kh, valid, candidates, cos, sin, block_size=block_size, prob=prob, tiles=tiles, backward=True
    )
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
