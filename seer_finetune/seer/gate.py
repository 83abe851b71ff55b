"""`AttnGate`: the small per-layer network that predicts which key blocks each query block needs.

The gate reads the attention layer's pre-RoPE queries and keys, pools them over blocks of `block_size` tokens
(queries with avg by default, keys with max and min), projects each head's pooled features to
`gate_hidden_size`, applies the model's own rotary embedding at block positions (so YaRN or any other
`rope_type` of the base model carries over) to the first `rotary_dim` of those features (all of them by default;
the rest then score content alone, as in partial rotary embeddings), and scores every (query block, key block)
pair. GQA: one key projection per KV head, one query projection per query head; query head h reads KV head
h // group as in transformers' `repeat_kv`.

`gate_query` says how query blocks are scored. `pooled` (default) scores each pooled query block against each
key block. The token modes score every query token against the pooled key blocks and take, per (query block,
key block), the max over the block's tokens, as the oracle (the attention map max-pooled to blocks) does: one
token that attends to a far block (a question token to a needle) is then not averaged away by the other tokens
of its block. `token_logit_max` takes the max of the raw token logits, `token_prob_max` the max of each token's
log-probabilities over its candidate key blocks. The per-token logits (`[B, Hq, L, nB]`, 13 GB at 128k tokens
with 12 heads) are never held whole: with gradients, or off CUDA, they are computed in chunks of query blocks and
recomputed in backward; without gradients on CUDA the fused kernel `seer_kernels.token_gate_block_scores` scores
them tile by tile, and with gradients too when `kernel="triton"` is asked for explicitly (`auto` keeps the
chunked path in training: the kernel's backward holds every layer's projected queries, see `_token_block_scores`).

Gate weights are kept in float32 whatever the model's dtype: they are tiny, and the gate's softmax over a few
hundred blocks is sensitive to bf16 rounding.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import seer_kernels

from .gate_rope import apply_rotary

# `abs_avg`: the magnitude of each feature's block mean. With a query's `avg` beside it and keys pooled by `max`
# and `min`, the gate's bilinear score can express the bound on a block's logits that a sign-aware max gives,
# `q . (kmax + kmin) / 2 + |q| . (kmax - kmin) / 2` (Quest), which no score linear in the query features can.
POOLINGS = ("avg", "max", "min", "abs_avg")
GATE_QUERIES = ("pooled", "token_logit_max", "token_prob_max")
# Most float32 elements of per-token logits one chunk of query blocks holds (2**26: 256 MB). Read at each call.
TOKEN_CHUNK_ELEMENTS = 2**26


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks covering `seq_len` tokens; the last one may be partial."""
    return math.ceil(seq_len / block_size)


def pool_blocks(x: torch.Tensor, valid: Optional[torch.Tensor], block_size: int, poolings: Sequence[str]) -> torch.Tensor:
    """Pool token features over blocks, ignoring tokens outside the sequence and padding tokens.

    Reductions read `x` in its own dtype and accumulate in float32; no float32 copy of `x` is made (at 128k
    tokens a layer's queries are hundreds of MB).

    Args:
        x: `[B, L, H, D]` token features.
        valid: optional bool `[B, L]`, False for padding tokens (they do not enter any pooled value).
            None: every token is valid (whole blocks are reduced without a mask).
        block_size: Tokens per block; the last block may be partial.
        poolings: Names from avg|max|min|abs_avg; their results are concatenated along the feature axis.

    Returns:
        float32 `[B, nB, H, D * len(poolings)]`. A block without valid tokens pools to zeros.
    """
    unknown = [name for name in poolings if name not in POOLINGS]
    if unknown or not poolings:
        raise ValueError(f"unknown pooling {unknown[0] if unknown else None!r}: use one of {', '.join(POOLINGS)}")
    if valid is None:
        return _pool_unmasked(x, block_size, poolings)
    bsz, seq_len, heads, dim = x.shape
    nb = num_blocks(seq_len, block_size)
    pad = nb * block_size - seq_len
    keep = valid.bool()
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        keep = torch.nn.functional.pad(keep, (0, pad), value=False)
    x = x.view(bsz, nb, block_size, heads, dim)
    keep = keep.view(bsz, nb, block_size, 1, 1)
    count = keep.sum(2)  # [B, nB, 1, 1]
    empty = count == 0
    pooled, mean = [], None
    for name in poolings:
        if name in ("avg", "abs_avg"):
            if mean is None:  # one pass over x for both
                # Multiplying by 0/1 is exact in any dtype; the sum accumulates in float32.
                mean = (x * keep).sum(2, dtype=torch.float32) / count.clamp_min(1)
            pooled.append(mean.abs() if name == "abs_avg" else mean)
        elif name == "max":
            pooled.append(x.masked_fill(~keep, float("-inf")).amax(2).float().masked_fill(empty, 0.0))
        else:
            pooled.append(x.masked_fill(~keep, float("inf")).amin(2).float().masked_fill(empty, 0.0))
    return torch.cat(pooled, dim=-1)


def _pool_unmasked(x: torch.Tensor, block_size: int, poolings: Sequence[str]) -> torch.Tensor:
    """`pool_blocks` with every token valid: one reduction per pooling over the whole blocks (a view of `x`),
    and one over the partial last block if there is one."""
    bsz, seq_len, heads, dim = x.shape
    whole = seq_len // block_size
    parts = []
    if whole:
        parts.append(x[:, : whole * block_size].reshape(bsz, whole, block_size, heads, dim))
    if whole * block_size < seq_len:
        parts.append(x[:, whole * block_size :].unsqueeze(1))  # [B, 1, L mod block, H, D]
    pooled = []
    for blocks in parts:
        reduced = _reduce_blocks(blocks, poolings)
        pooled.append(reduced[0] if len(reduced) == 1 else torch.cat(reduced, dim=-1))
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)


def _reduce_blocks(blocks: torch.Tensor, poolings: Sequence[str]) -> list[torch.Tensor]:
    """float32 `[B, n, H, D]` per name of `poolings`: that pooling of `blocks [B, n, T, H, D]` over its token
    axis (`avg` and `abs_avg` share one mean)."""
    reduced, mean = [], None
    for name in poolings:
        if name in ("avg", "abs_avg"):
            if mean is None:
                mean = blocks.mean(2, dtype=torch.float32)
            reduced.append(mean.abs() if name == "abs_avg" else mean)
        else:
            # The extreme of values in x's dtype is one of them: converting after the reduction is exact.
            reduced.append((blocks.amax(2) if name == "max" else blocks.amin(2)).float())
    return reduced


def check_gate_query(gate_query: str, q_pooling: Sequence[str]) -> None:
    """Refuse an unknown `gate_query`, and a token mode with a `q_pooling` other than the default `("avg",)`:
    token modes read each token's own query, so a query pooling has nothing to pool, and one that asked for more
    features (avg and max) would widen `q_weight` beyond the single query it reads."""
    if gate_query not in GATE_QUERIES:
        raise ValueError(f"gate_query={gate_query!r} must be one of {', '.join(GATE_QUERIES)}")
    if gate_query != "pooled" and tuple(q_pooling) != ("avg",):
        raise ValueError(
            f"gate_query={gate_query} scores each token's own query, so q_pooling={list(q_pooling)} has nothing to "
            "pool: leave q_pooling at its default [avg]"
        )


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    *,
    block_size: int,
    q_pooling: Sequence[str],
    k_pooling: Sequence[str],
    hidden_size: int,
    gate_query: str = "pooled",
    candidates: Optional[torch.Tensor] = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """A gate's unnormalised block scores as a function of its inputs and weights (`AttnGate.forward`).

    Weights and angles are arguments rather than module attributes, so one compiled graph of this function
    serves the gates of every layer (`gate_path`).

    Args:
        q: pre-RoPE queries `[B, L, Hq, D]`.
        k: pre-RoPE keys `[B, L, Hkv, D]` (`Hq % Hkv == 0`; query head h reads KV head h // (Hq / Hkv)).
        q_weight: float32 `[Hq, D * len(q_pooling), hidden_size]` (`[Hq, D, hidden_size]` in the token modes).
        k_weight: float32 `[Hkv, D * len(k_pooling), hidden_size]`.
        cos, sin: float32 `[1, nB, rotary_dim]` block RoPE angles, or None for no RoPE.
        valid: optional bool `[B, L]`, False for padding tokens (excluded from pooling and from the token maxima).
        block_size: Tokens per block.
        q_pooling, k_pooling: Poolings of queries and keys (`pool_blocks`).
        hidden_size: Per-head projection width.
        gate_query: How query blocks are scored, one of `GATE_QUERIES` (see the module docstring). Default
            `pooled`.
        candidates: bool `[B, nB, nB]`, the key blocks each query block may attend to (`selection.block_candidates`);
            `token_prob_max` normalises each token's logits over its block's row. None: the block-causal triangle.
            The other modes ignore it.
        kernel: Where the token modes score (`attention.kernel`): without gradients, `auto` (default) on the
            fused Triton kernel for CUDA tensors, `triton` on the kernel always, `pytorch` never (the chunked
            path); with gradients, on the kernel (forward and backward) only for an explicit `triton`.

    Returns:
        float32 `[B, Hq, nB, nB]` (row = query block, column = key block). The token modes give -inf after each
        row's own block (never a candidate); in `token_prob_max` the scores are log-probabilities, -inf outside
        the candidates.
    """
    check_gate_query(gate_query, q_pooling)
    bsz, seq_len, num_heads = q.shape[:3]
    num_kv_heads = k.shape[2]
    nb = num_blocks(seq_len, block_size)
    kp = pool_blocks(k, valid, block_size, k_pooling)  # [B, nB, Hkv, Fk]
    kh = torch.einsum("bnhf,hfo->bhno", kp, k_weight)
    if cos is not None:
        kh = apply_rotary(kh, cos, sin)
    if gate_query != "pooled":
        if gate_query == "token_prob_max" and candidates is None:
            candidates = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril().expand(bsz, nb, nb)
        return _token_block_scores(
            q, kh, q_weight, cos, sin, valid, candidates, block_size=block_size, hidden_size=hidden_size,
            gate_query=gate_query, kernel=kernel,
        )
    qp = pool_blocks(q, valid, block_size, q_pooling)  # [B, nB, Hq, Fq]
    qh = torch.einsum("bnhf,hfo->bhno", qp, q_weight)
    if cos is not None:
        qh = apply_rotary(qh, cos, sin)
    # The 1/sqrt(hidden) scale goes on the queries ([B, H, nB, hidden]), not on the nB x nB scores.
    group = num_heads // num_kv_heads
    qh = (qh * (1.0 / math.sqrt(hidden_size))).view(bsz, num_kv_heads, group, nb, hidden_size)
    scores = torch.matmul(qh, kh[:, :, None].transpose(-1, -2))
    return scores.reshape(bsz, num_heads, nb, nb)


def _token_block_scores(
    q: torch.Tensor,
    kh: torch.Tensor,
    q_weight: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    candidates: Optional[torch.Tensor],
    *,
    block_size: int,
    hidden_size: int,
    gate_query: str,
    kernel: str = "auto",
) -> torch.Tensor:
    """`block_scores` of the token modes, over chunks of query blocks (`_token_chunk_scores`).

    A chunk holds as many query blocks as keep its per-token logits within `TOKEN_CHUNK_ELEMENTS`. With
    gradients, each chunk runs under a (non-reentrant) checkpoint: backward keeps only its inputs (views of `q`,
    the weights, the projected keys) and recomputes the rest, where it would otherwise keep the chunk's float32
    projected queries (Hq * hidden floats per token and layer) or, for `token_prob_max`, its logits. Without
    gradients on CUDA, the fused Triton kernel (`seer_kernels.token_gate_block_scores`) scores all tokens at once
    instead, from their projected, unrotated queries (float32 `[B, Hq, L, hidden]`, the only per-token tensor it
    needs: it applies the block RoPE itself). With gradients the kernel runs only for `kernel="triton"`: its
    backward then keeps those projected queries per layer (what the checkpointed chunks recompute instead), plus
    the winning token of each block pair. That is faster (1.18x the dense step at 32k on the SmolLM2 shape against
    1.41x chunked) but holds float32 `[B, Hq, L, hidden]` per layer until the backward: 9.4 GiB peak against 3.8
    GiB there, and over 20 GiB at 128k on the Qwen2.5-1.5B shape. So `auto` stays on the chunked path in training.

    Args:
        kh: the projected, rotated key blocks `[B, Hkv, nB, hidden]`.
        candidates: bool `[B, nB, nB]` (`token_prob_max`) or None.
        Others as in `block_scores`.

    Returns:
        float32 `[B, Hq, nB, nB]`.
    """
    bsz, seq_len, num_heads = q.shape[:3]
    nb = kh.shape[2]
    blocks_per_chunk = max(1, TOKEN_CHUNK_ELEMENTS // (bsz * num_heads * block_size * nb))
    chunk_scores = functools.partial(
        _token_chunk_scores, block_size=block_size, hidden_size=hidden_size, gate_query=gate_query
    )
    recompute = torch.is_grad_enabled() and (q.requires_grad or q_weight.requires_grad or kh.requires_grad)
    # Training takes the fused kernel's backward on an explicit opt-in alone (see the docstring).
    if _runs_fused_kernel(q, kernel) and (not recompute or kernel == "triton"):
        # The fused kernel never holds the per-token logits, and it turns each token by its block's angles
        # itself, so the only per-token tensor is one projection (the scale folded into the weights).
        qt = torch.einsum("bthd,hdo->bhto", q.float(), q_weight * (1.0 / math.sqrt(hidden_size)))
        return seer_kernels.token_gate_block_scores(
            qt, kh, valid, candidates, block_size=block_size, mode=gate_query,
            cos=None if cos is None else cos[0], sin=None if sin is None else sin[0], kernel="triton",
        )
    rows = []
    for first in range(0, nb, blocks_per_chunk):
        last = min(nb, first + blocks_per_chunk)
        tokens = slice(first * block_size, min(seq_len, last * block_size))
        # Candidates are block-causal, so the chunk's rows score key blocks up to its last query block only: at
        # long lengths that halves the per-token logits.
        inputs = (
            q[:, tokens],
            None if valid is None else valid[:, tokens],
            q_weight,
            kh[:, :, :last],
            None if cos is None else cos[:, first:last],
            None if sin is None else sin[:, first:last],
            None if candidates is None else candidates[:, first:last, :last],
        )
        chunk = checkpoint(chunk_scores, *inputs, use_reentrant=False) if recompute else chunk_scores(*inputs)
        rows.append(torch.nn.functional.pad(chunk, (0, nb - last), value=float("-inf")) if last < nb else chunk)
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)


def _runs_fused_kernel(q: torch.Tensor, kernel: str) -> bool:
    """Whether gradient-free token-mode scores of queries `q` run on the fused Triton kernel (`block_scores`'s
    `kernel`: on CUDA for `auto`)."""
    if kernel not in seer_kernels.KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {', '.join(seer_kernels.KERNELS)}")
    return kernel == "triton" or (kernel == "auto" and q.is_cuda)


def _token_chunk_scores(
    q: torch.Tensor,
    valid: Optional[torch.Tensor],
    q_weight: torch.Tensor,
    kh: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    candidates: Optional[torch.Tensor],
    *,
    block_size: int,
    hidden_size: int,
    gate_query: str,
) -> torch.Tensor:
    """Token-mode scores of `n` consecutive query blocks.

    Args:
        q: pre-RoPE queries of the chunk's tokens `[B, T, Hq, D]`, T <= n * block_size (the sequence's last
            block may be partial).
        valid: optional bool `[B, T]`.
        q_weight: float32 `[Hq, D, hidden]`.
        kh: projected, rotated key blocks `[B, Hkv, nK, hidden]` up to the chunk's last query block (nK: the
            index of that block + 1).
        cos, sin: `[1, n, rotary_dim]` angles of the chunk's query blocks, or None.
        candidates: the chunk's rows of the candidates, bool `[B, n, nK]`, or None (`token_logit_max`).

    Returns:
        float32 `[B, Hq, n, nK]`, -inf after each row's own block.
    """
    bsz, num_tokens, num_heads, _ = q.shape
    num_kv_heads, nb = kh.shape[1], kh.shape[2]
    n = num_blocks(num_tokens, block_size)
    pad = n * block_size - num_tokens
    keep = valid
    if pad:
        # Fill the partial last block with excluded tokens, so the chunk reshapes to whole blocks.
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad))
        if keep is None:
            keep = torch.ones(bsz, num_tokens, dtype=torch.bool, device=q.device)
        keep = torch.nn.functional.pad(keep, (0, pad), value=False)
    qh = _token_queries(q, q_weight, cos, sin, block_size=block_size, hidden_size=hidden_size)
    qh = qh.reshape(bsz, num_kv_heads, num_heads // num_kv_heads, n * block_size, hidden_size)
    logits = torch.matmul(qh, kh[:, :, None].transpose(-1, -2)).view(bsz, num_heads, n, block_size, nb)
    if gate_query == "token_prob_max":
        logits = logits.masked_fill(~candidates[:, None, :, None], float("-inf")).log_softmax(dim=-1)
    if keep is not None:
        keep = keep.view(bsz, 1, n, block_size, 1)
        logits = logits.masked_fill(~keep, float("-inf"))
    # max's backward keeps the winning token's index alone, not the logits.
    scores = logits.max(dim=3).values
    if keep is not None:
        # A block of padding alone scores 0, as a pooled query of no tokens does: finite, so its softmax over the
        # candidates stays a distribution.
        scores = scores.masked_fill(~keep.any(dim=3), 0.0)
    if gate_query == "token_prob_max":
        return scores.masked_fill(~candidates[:, None], float("-inf"))
    # Key blocks after a row's own are never candidates: -inf, as the chunks after the last query block get.
    first = nb - n
    future = torch.ones(n, nb, dtype=torch.bool, device=scores.device).triu_(first + 1)
    return scores.masked_fill(future, float("-inf"))


def _token_queries(
    q: torch.Tensor, q_weight: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], *,
    block_size: int, hidden_size: int,
) -> torch.Tensor:
    """float32 `[B, Hq, n, block_size, hidden]`: the tokens' queries as the token modes score them (projected,
    rotated at their block's angles `cos`, `sin` `[1, n, rotary_dim]` or None, scaled by 1/sqrt(hidden)), from
    pre-RoPE queries of whole blocks `q [B, n * block_size, Hq, D]`."""
    bsz, num_tokens, num_heads, _ = q.shape
    n = num_tokens // block_size
    qh = torch.einsum("bthd,hdo->bhto", q.float(), q_weight).reshape(bsz, num_heads, n, block_size, hidden_size)
    if cos is not None:
        # Every token of query block I turns by block I's angles, as its pooled query would.
        qh = apply_rotary(qh, cos[:, :, None], sin[:, :, None])
    return qh * (1.0 / math.sqrt(hidden_size))


class AttnGate(nn.Module):
    """Block-level attention predictor for one attention layer.

    Args:
        num_heads: Query heads of the layer.
        num_kv_heads: Key/value heads (GQA: `num_heads % num_kv_heads == 0`).
        head_dim: Per-head width of the layer's queries and keys.
        block_size: Tokens per block. Default 64.
        hidden_size: Per-head projection width. Default 128.
        q_pooling: Poolings of queries over a block. Default ("avg",).
        k_pooling: Poolings of keys over a block. Default ("max", "min").
        rotary: Optional rotary module from `gate_rotary_embedding` (None: no positional encoding). It rotates
            the first features of its own width; the others keep no position.
        layer_idx: The layer this gate belongs to (for metrics and saving).
        gate_query: How query blocks are scored, one of `GATE_QUERIES` (module docstring). The token modes need
            `q_pooling` at its default (`check_gate_query`). Default `pooled`.

    Attributes:
        rope_units, rope_fraction: How `rotary` was built (`tokens` and 1.0 unless the caller says otherwise,
            `none` without a rotary); `attach.attach_seer_gates` sets them, and saving records them so gates
            reload with the positions they were trained on.

    Parameters:
        q_weight: `[num_heads, head_dim * len(q_pooling), hidden_size]` (`[num_heads, head_dim, hidden_size]` in the
            token modes, which read each token's query).
        k_weight: `[num_kv_heads, head_dim * len(k_pooling), hidden_size]`.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        hidden_size: int = 128,
        q_pooling: Sequence[str] = ("avg",),
        k_pooling: Sequence[str] = ("max", "min"),
        rotary: Optional[nn.Module] = None,
        layer_idx: int = 0,
        gate_query: str = "pooled",
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        for name, pools in (("q_pooling", q_pooling), ("k_pooling", k_pooling)):
            if not pools or any(p not in POOLINGS for p in pools):
                raise ValueError(f"{name}={list(pools)} must name one or more of {', '.join(POOLINGS)}")
        check_gate_query(gate_query, q_pooling)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.hidden_size = block_size, hidden_size
        self.q_pooling, self.k_pooling = tuple(q_pooling), tuple(k_pooling)
        self.gate_query = gate_query
        self.layer_idx = layer_idx
        q_features = head_dim * len(self.q_pooling) if gate_query == "pooled" else head_dim
        self.q_weight = nn.Parameter(torch.empty(num_heads, q_features, hidden_size))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(self.k_pooling), hidden_size))
        self.rotary = rotary
        self.rope_units = "tokens" if rotary is not None else "none"
        self.rope_fraction = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default scale: uniform in +-1/sqrt(fan_in), per head."""
        for w in (self.q_weight, self.k_weight):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    @torch.no_grad()
    def init_logit_bound(self, rotary_dim: int) -> None:
        """Start from the sign-aware bound on each block's logits: with queries pooled by `avg` and `abs_avg`
        and keys by `max` and `min`, the score of a (query block, key block) pair becomes
        `(q . (kmax + kmin) / 2 + |q| . (kmax - kmin) / 2) / sqrt(head_dim)` (q: the block's mean pre-RoPE query),
        the attention's own logit scale, carried by the first `2 * head_dim` features after the `rotary_dim`
        rotated ones. The queries' weights of every other feature start at zero (those features add nothing until
        they learn); the keys' keep their random start.

        Raises:
            ValueError: for a token-scored gate, poolings without those four, or fewer than `2 * head_dim`
                unrotated features.
        """
        d, r = self.head_dim, rotary_dim
        missing = [p for p in ("avg", "abs_avg") if p not in self.q_pooling] + [
            p for p in ("max", "min") if p not in self.k_pooling
        ]
        if self.gate_query != "pooled" or missing:
            raise ValueError(
                "the logit-bound initialisation needs a pooled gate with q_pooling holding avg and abs_avg and "
                f"k_pooling holding max and min (gate_query={self.gate_query}, q_pooling={list(self.q_pooling)}, "
                f"k_pooling={list(self.k_pooling)})"
            )
        if self.hidden_size - r < 2 * d:
            raise ValueError(
                f"the logit-bound initialisation needs 2 * head_dim = {2 * d} gate features without RoPE; "
                f"gate_hidden_size={self.hidden_size} leaves {self.hidden_size - r}: raise it or lower "
                "gate_rope_fraction"
            )
        eye = torch.eye(d, device=self.q_weight.device)
        avg, absavg = (self.q_pooling.index(p) * d for p in ("avg", "abs_avg"))
        kmax, kmin = (self.k_pooling.index(p) * d for p in ("max", "min"))
        # The forward divides scores by sqrt(hidden); the attention's logits carry 1 / sqrt(head_dim).
        scale = math.sqrt(self.hidden_size / d)
        self.q_weight.zero_()
        self.q_weight[:, avg : avg + d, r : r + d] = eye * scale
        self.q_weight[:, absavg : absavg + d, r + d : r + 2 * d] = eye * scale
        self.k_weight[:, :, r : r + 2 * d] = 0.0
        self.k_weight[:, kmax : kmax + d, r : r + d] = eye / 2
        self.k_weight[:, kmin : kmin + d, r : r + d] = eye / 2
        self.k_weight[:, kmax : kmax + d, r + d : r + 2 * d] = eye / 2
        self.k_weight[:, kmin : kmin + d, r + d : r + 2 * d] = -eye / 2

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        head_shard: tuple[int, int] = (0, 1),
        candidates: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Unnormalised block scores.

        Args:
            q: pre-RoPE queries `[B, L, num_heads, head_dim]`.
            k: pre-RoPE keys `[B, L, num_kv_heads, head_dim]`.
            valid: optional bool `[B, L]`, False for padding tokens (excluded from pooling).
            head_shard: `(index, count)`: `q`/`k` hold shard `index` of `count` equal contiguous shards of the
                heads (sequence parallelism gives each rank whole sequences of a head shard). Default all heads.
            candidates: optional bool `[B, nB, nB]` candidate key blocks, which `token_prob_max` normalises over
                (see `block_scores`; None: the block-causal triangle).

        Returns:
            float32 `[B, num_heads / count, nB, nB]` logits (row = query block, column = key block); masking to the
            causal/document candidates and the softmax are the caller's (see `selection.gate_log_probs`).
        """
        q_weight, k_weight, cos, sin = self.operands(q, k, head_shard)
        return block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **self.shape_kwargs)

    def operands(
        self, q: torch.Tensor, k: torch.Tensor, head_shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """What `block_scores` takes besides the inputs: this shard's query and key weights (float32), and the
        block RoPE angles (None, None without a rotary). Checks the inputs' head counts against the shard."""
        index, count = head_shard
        num_heads, num_kv_heads = self.num_heads // count, self.num_kv_heads // count
        if q.shape[2] != num_heads or k.shape[2] != num_kv_heads or self.num_kv_heads % count:
            raise ValueError(
                f"gate of layer {self.layer_idx} expects {num_heads} query / {num_kv_heads} key heads "
                f"(shard {index} of {count}), got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        q_weight = self.q_weight[index * num_heads : (index + 1) * num_heads].float()
        k_weight = self.k_weight[index * num_kv_heads : (index + 1) * num_kv_heads].float()
        if self.rotary is None:
            return q_weight, k_weight, None, None
        cos, sin = self._block_rotary(num_blocks(q.shape[1], self.block_size), q.device)
        return q_weight, k_weight, cos, sin

    @property
    def shape_kwargs(self) -> dict:
        """The keyword arguments of `block_scores` that describe this gate."""
        return dict(
            block_size=self.block_size,
            q_pooling=self.q_pooling,
            k_pooling=self.k_pooling,
            hidden_size=self.hidden_size,
            gate_query=self.gate_query,
        )

    @property
    def rotary_dim(self) -> int:
        """Features per head that carry RoPE (0 without a rotary): the rotary's width, two per frequency."""
        return 0 if self.rotary is None else 2 * self.rotary.inv_freq.numel()

    def _block_rotary(self, nb: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos, sin) `[1, nB, rotary_dim]` at block positions 0..nB-1, from the gate's rotary module.

        Every forward at a length asks for the same angles, so they are kept on the rotary module for the last
        (length, device, inference mode) asked: the gates of a model's layers share one rotary
        (`attach_seer_gates`), so one copy serves all of them. A rotary whose angles depend on what it saw before
        (`dynamic` rope types) is asked every time.
        """
        # Angles made under inference mode cannot be saved for a later training forward's backward.
        key = (nb, device, torch.is_inference_mode_enabled())
        cached = getattr(self.rotary, "seer_block_angles", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        # The rotary module returns its angles in the dtype of this (empty) tensor: float32, as the gate runs.
        like = torch.empty(0, device=device, dtype=torch.float32)
        cos, sin = self.rotary(like, torch.arange(nb, device=device)[None])
        angles = (cos.float(), sin.float())
        if "dynamic" not in str(getattr(self.rotary, "rope_type", "")):
            self.rotary.seer_block_angles = (key, angles)
        return angles

    def extra_repr(self) -> str:
        rope = "none" if self.rotary is None else f"{self.rope_units}, rope_dims={self.rotary_dim}/{self.hidden_size}"
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"block={self.block_size}, hidden={self.hidden_size}, q_pool={list(self.q_pooling)}, "
            f"k_pool={list(self.k_pooling)}, query={self.gate_query}, rope={rope}"
        )
