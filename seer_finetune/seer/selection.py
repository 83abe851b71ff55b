"""Block candidates, gate probabilities, block selection and realised density.

Candidates are the (query block, key block) pairs that hold at least one allowed token pair: the key block is
not later than the query block and shares a document with it. Selection keeps a subset of the candidates per
query-head row; density is always measured against the candidates (the causal/document triangle), so a
target density d keeps about d of the blocks the dense attention would have visited.

Document ids follow `seer_kernels`: int `[B, L]`, a token attends to a key iff the key is not later and both
carry the same id. The ids of real tokens are non-decreasing along the sequence (documents are contiguous);
padding tokens are marked by `valid = False` and carry ids of their own (see `masking.document_ids_from_mask`).
"""

from __future__ import annotations

from typing import Optional

import torch

import seer_kernels

from .gate import num_blocks, pool_blocks

BUDGETS = ("row", "layer", "head")


def block_candidates(
    seq_len: int,
    block_size: int,
    document_ids: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
    *,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which key blocks each query block can attend to at all.

    Args:
        seq_len: Tokens in the sequence.
        block_size: Tokens per block.
        document_ids: Optional int `[B, L]`; real tokens' ids must be non-decreasing along the sequence.
        valid: Optional bool `[B, L]`, False for padding tokens (which attend only to themselves).
        batch_size: B when `document_ids` is None. Default 1.
        device: Device when `document_ids` is None. Default CPU.

    Returns:
        bool `[B, nB, nB]`: the lower block triangle (diagonal included), restricted to pairs of blocks that
        share a document among their valid tokens. The diagonal is always a candidate (a token sees itself).
    """
    nb = num_blocks(seq_len, block_size)
    if document_ids is not None:
        batch_size, device = document_ids.shape[0], document_ids.device
    eye = torch.eye(nb, dtype=torch.bool, device=device)
    below = torch.ones(nb, nb, dtype=torch.bool, device=device).tril_(-1)
    if document_ids is None and valid is None:
        return (eye | below).expand(batch_size, nb, nb).clone()
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device) if document_ids is None else document_ids.long()
    keep = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    pad = nb * block_size - seq_len
    big = torch.iinfo(torch.long).max

    def per_block(values: torch.Tensor, fill: int) -> torch.Tensor:
        # Concatenate rather than F.pad: F.pad's float fill value would not hold an int64 extreme exactly.
        tail = torch.full((batch_size, pad), fill, dtype=torch.long, device=values.device)
        return torch.cat([values.masked_fill(~keep, fill), tail], dim=1).view(batch_size, nb, block_size)

    # Per block: the smallest and largest document id among its valid tokens (empty blocks never match).
    lo = per_block(ids, big).amin(-1)
    hi = per_block(ids, -1).amax(-1)
    # With non-decreasing ids, an earlier key block j shares a document with query block i iff its last
    # document reaches i's first one.
    shared = hi[:, None, :] >= lo[:, :, None]
    return eye | (below & shared)


def gate_log_probs(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Block-causal (and document-restricted) log-softmax of gate scores over key blocks.

    Args:
        scores: `[B, H, nB, nB]` gate logits.
        candidates: bool `[B, nB, nB]` from `block_candidates`.

    Returns:
        float32 `[B, H, nB, nB]` log-probabilities, -inf outside the candidates (every row has its diagonal).
    """
    masked = scores.float().masked_fill(~candidates[:, None], float("-inf"))
    return torch.log_softmax(masked, dim=-1)


def tempered_log_probs(log_probs: torch.Tensor, power: float) -> torch.Tensor:
    """Each row of `log_probs` raised to `power` and renormalised, in log space: `log(q ** power / sum q ** power)`.

    A gate trained against a ground truth sharpened by temperature T (`gate_loss`'s `target_temperature`) learns
    `p ** (1 / T)`; raising its probabilities to the power T estimates `p` again. The order within a row is kept;
    only how rows and heads compare (the layer budget, the row mass floor, a threshold) changes.

    Args:
        log_probs: float32 `[..., nB]` log-probabilities normalised per row, -inf outside the candidates.
        power: > 0.

    Returns:
        float32 `[..., nB]`, normalised per row, -inf where `log_probs` is; a row without any candidate stays -inf.
    """
    scaled = log_probs * power
    norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    # A row of -inf only (no candidate) has a norm of -inf: keep it as it is rather than -inf - -inf = NaN.
    return torch.where(torch.isfinite(norm), scaled - norm, scaled)


def forced_blocks(candidates: torch.Tensor, sink_blocks: int = 0, local_blocks: int = 1) -> torch.Tensor:
    """Blocks kept whatever the gate says: the last `local_blocks` candidates up to the diagonal (the diagonal
    itself and the blocks right before it) and the first `sink_blocks` candidates of each row.

    Sink blocks are counted within the row's candidates, so with packed documents they are the leading blocks
    of the query's own document; local blocks never reach into an earlier document either.

    Args:
        candidates: bool `[B, nB, nB]`.
        sink_blocks: Leading candidate key blocks always kept. Default 0.
        local_blocks: Blocks ending at the diagonal always kept, diagonal included. Default 1 (the diagonal).

    Returns:
        bool `[B, nB, nB]`.
    """
    nb = candidates.shape[-1]
    ones = torch.ones(nb, nb, dtype=torch.bool, device=candidates.device)
    # Band of width local_blocks ending at the diagonal: key block j with i - local_blocks < j <= i.
    forced = (ones.tril() & ones.triu(-(max(1, local_blocks) - 1))).expand_as(candidates)
    if sink_blocks > 0:
        forced = forced | (candidates & (candidates.long().cumsum(-1) <= sink_blocks))
    return forced & candidates


def row_quotas(candidates: torch.Tensor, density: float, sink_blocks: int = 0, local_blocks: int = 1) -> torch.Tensor:
    """How many blocks each query-block row keeps for a target density d.

    Row i gets about d * n_i blocks (n_i: its candidates), at least its forced blocks (diagonal, sinks). The
    running total of kept blocks follows round(d * running candidate count) wherever that allows: rounding
    errors do not pile up, and forced blocks beyond a row's share (the short first rows of every document)
    are paid back by the rows after them. Without this, rounding each row on its own biased the density by
    +2 points at 32 blocks with four packed documents, and forced diagonals by +2.4 points at 64 blocks and
    90% sparsity.

    With K_i the kept total after row i, T_i = round(d * C_i) the target total and f_i the forced count:
    K_i = max(T_i, K_{i-1} + f_i), whose closed form is K_i = F_i + max(0, max_{j<=i} (T_j - F_j)) with
    F the running forced count; so the quotas need no loop over rows.

    Args:
        candidates: bool `[B, nB, nB]`.
        density: Target fraction in (0, 1].
        sink_blocks: Leading candidate blocks always kept (as in `forced_blocks`). Default 0.
        local_blocks: Blocks ending at the diagonal always kept (as in `forced_blocks`). Default 1.

    Returns:
        int64 `[B, nB]`.
    """
    n = candidates.sum(-1).double()
    target = torch.floor(density * n.cumsum(-1) + 0.5)
    forced = forced_blocks(candidates, sink_blocks, local_blocks).sum(-1).double().cumsum(-1)
    kept = forced + torch.cummax(target - forced, dim=-1).values.clamp_min(0.0)
    return torch.diff(kept, dim=-1, prepend=torch.zeros_like(kept[:, :1])).long()


def logit_bound_scores(
    q: torch.Tensor, k: torch.Tensor, valid: Optional[torch.Tensor], block_size: int
) -> torch.Tensor:
    """The sign-aware bound on each key block's logits for each query block's mean query.

    For the mean query `q` of block i and the per-feature max and min keys of block j, the largest `q . k` any
    key between them can reach is `sum_d max(q_d kmax_d, q_d kmin_d) = q . (kmax + kmin) / 2 + |q| . (kmax -
    kmin) / 2`. A block whose mass is one rare high logit (a needle among filler) scores high here although its
    mean key, or anything linear in its pooled keys, does not.

    Args:
        q: `[B, L, Hq, D]` queries (the gate's pre-RoPE inputs).
        k: `[B, L, Hkv, D]` keys, Hq a multiple of Hkv (grouped-query attention).
        valid: Optional bool `[B, L]`, False for padding tokens (they enter no pooled value).
        block_size: Tokens per block.

    Returns:
        float32 `[B, Hq, nB, nB]` (every pair, causal or not: the selection masks the non-candidates).
    """
    mean_q = pool_blocks(q, valid, block_size, ("avg",))  # [B, nB, Hq, D]
    k_max, k_min = pool_blocks(k, valid, block_size, ("max", "min")).chunk(2, dim=-1)  # [B, nB, Hkv, D] each
    bsz, nb, heads, dim = mean_q.shape
    # Query heads grouped by their KV head: [B, nB, Hkv, G, D].
    mean_q = mean_q.view(bsz, nb, k_max.shape[2], -1, dim)
    centre, half_range = (k_max + k_min) / 2, (k_max - k_min) / 2
    scores = torch.einsum("bikgd,bjkd->bkgij", mean_q, centre)
    scores += torch.einsum("bikgd,bjkd->bkgij", mean_q.abs(), half_range)
    return scores.reshape(bsz, heads, nb, nb)


class SelectionPlan:
    """Which blocks a layer may keep and how many: everything of a selection that does not depend on the scores.

    It depends only on the layout (sequence length, documents, padding) and the settings, so one forward builds
    it once and every layer calls `select` with its own scores.

    With `density` d, row i keeps about d * n_i of its n_i candidate blocks (`row_quotas`: at least the forced
    ones, with rounding and forced surpluses balanced over the rows), the highest-scoring ones: the per-row count
    follows the triangle, so the realised density over all candidates matches d. With `budget="layer"` the same
    total count (over heads and rows) goes instead to the blocks of highest gate probability anywhere in the
    layer: a head or row whose attention is concentrated on few blocks gives its share to those whose attention
    is spread, which keeps the most probability mass for the same density. With `threshold` t, a row keeps the
    candidates whose gate probability is at least t. With the layer (or head) budget and `row_mass` p > 0, every
    row first keeps its most probable candidates until they hold p of the row's gate probability (forced blocks
    count, and a row never takes more than its quota this way); the rest of the total goes by rank as above. It
    protects rows whose gate is flat (spread over many blocks) from losing every block beyond the forced ones to
    rows with a peaked gate. With `bound_blocks` k > 0, every row (per head) also keeps its k non-forced candidates
    of highest logit bound (`logit_bound_scores`, passed to `select`), within its quota: under the layer or head
    budget they rank ahead of every other pick, under the row budget right after the forced blocks, and with a
    threshold they are kept besides. With `probe_blocks` k > 0, every row (per head) likewise keeps its k non-forced
    candidates of highest probe score (`probe.probe_scores`: the exact attention of a few of the block's query
    tokens), in the same tier as the bound's picks. With both, a row whose room (its quota beyond its forced blocks)
    is smaller than the two lists' union takes them alternately, bound first: the bound's best, the probe's best,
    the bound's second, ...; a block on both lists counts once, at its better place (`_extra_picks`).
    `budget="head"` shares out like the layer budget within each head: every
    head keeps the row quotas' total, spread over its rows by probability (heads cannot lend blocks to each
    other). The forced blocks (`forced_blocks`: the diagonal, the `local_blocks - 1` blocks before it, and `sink_blocks`
    leading blocks) are always kept.

    Args:
        candidates: bool `[B, nB, nB]` from `block_candidates`.
        density: Target fraction of candidate blocks kept, in (0, 1].
        threshold: Minimum gate probability of a kept block, in [0, 1]. Exactly one of density and threshold.
        sink_blocks: Leading candidate blocks always kept. Default 0.
        local_blocks: Blocks ending at the diagonal always kept, diagonal included. Default 1.
        budget: With `density`: `row`, `layer` or `head` (see above). Default `row`.
        row_mass: With the layer or head budget: the share of each row's gate probability its first picks must hold
            (see above), in [0, 1); the row budget and a threshold ignore it. Default 0 (off).
        bound_blocks: Blocks of highest logit bound each row keeps (see above). Default 0 (off).
        probe_blocks: Blocks of highest probe score each row keeps (see above). Default 0 (off).
    """

    def __init__(
        self,
        candidates: torch.Tensor,
        *,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        sink_blocks: int = 0,
        local_blocks: int = 1,
        budget: str = "row",
        row_mass: float = 0.0,
        bound_blocks: int = 0,
        probe_blocks: int = 0,
    ):
        if (density is None) == (threshold is None):
            raise ValueError("a selection needs exactly one of density or threshold")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in [0, 1]")
        if density is not None and not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1]")
        if budget not in BUDGETS:
            raise ValueError(f"budget={budget!r} must be one of {', '.join(BUDGETS)}")
        if not 0.0 <= row_mass < 1.0:
            raise ValueError(f"row_mass={row_mass} must be in [0, 1)")
        if bound_blocks < 0:
            raise ValueError(f"bound_blocks={bound_blocks} must be >= 0")
        if probe_blocks < 0:
            raise ValueError(f"probe_blocks={probe_blocks} must be >= 0")
        self.row_mass, self.bound_blocks, self.probe_blocks = row_mass, bound_blocks, probe_blocks
        self.candidates = candidates
        self.density, self.threshold, self.budget = density, threshold, budget
        self.forced = forced_blocks(candidates, sink_blocks, local_blocks)
        self.quota = row_quotas(candidates, density, sink_blocks, local_blocks) if density is not None else None
        # long [B, nB]: each row's quota beyond its forced blocks, once per plan rather than in every layer.
        self.room = None if self.quota is None else (self.quota - self.forced.sum(-1)).clamp_min(0)
        self._layer_extra: dict[int, list[int]] = {}

    @classmethod
    def from_settings(cls, candidates: torch.Tensor, settings) -> "SelectionPlan":
        """The plan for a `SeerSettings` (its density or threshold, forced blocks, budget, row mass, bound and
        probe blocks)."""
        return cls(
            candidates,
            density=settings.density,
            threshold=settings.threshold,
            sink_blocks=settings.sink_blocks,
            local_blocks=settings.local_blocks,
            budget=settings.budget,
            row_mass=settings.row_mass,
            # Oracle selection is the reference a gate is measured against: the true attention alone ranks.
            bound_blocks=0 if settings.oracle else settings.bound_blocks,
            probe_blocks=0 if settings.oracle else settings.probe_blocks,
        )

    def layer_extra(self, heads: int) -> list[int]:
        """Per batch element, how many blocks the layer budget hands out beyond the forced ones for `heads`
        query heads: the row quotas' total minus the forced blocks. Read back from the device once per plan
        and head count (every layer of a forward has the same)."""
        if heads not in self._layer_extra:
            extra = (self.quota.sum(-1) - self.forced.sum(dim=(1, 2))) * heads
            self._layer_extra[heads] = [int(e) for e in extra.clamp_min(0).tolist()]
        return self._layer_extra[heads]

    @torch.no_grad()
    def select(
        self,
        scores: torch.Tensor,
        *,
        normalized: bool = False,
        bound: Optional[torch.Tensor] = None,
        probe: Optional[torch.Tensor] = None,
        kernel: str = "pytorch",
    ) -> torch.Tensor:
        """Choose the key blocks each query head attends to.

        Args:
            scores: `[B, H, nB, nB]` gate logits or log-probabilities. With a row budget only their order within
                a row matters; a threshold compares softmax probabilities over the candidates.
            normalized: `scores` are already log-probabilities normalised over each row's candidates (gate
                log-probs, or the log of the row-normalised ground truth), so the layer budget can compare them
                across rows as they are. Default False.
            bound: `[B, H, nB, nB]` logit bounds (`logit_bound_scores`); needed when the plan has `bound_blocks`.
            probe: `[B, H, nB, nB]` probe scores (`probe.probe_scores`); needed when the plan has `probe_blocks`.
            kernel: Where the layer and head budgets compute their ranking keys (`ranking_keys`): `pytorch`
                (default), `triton` (one fused kernel) or `auto` (Triton for CUDA tensors).

        Returns:
            bool `[B, H, nB, nB]`, a subset of the candidates.
        """
        # [B, 1, nB, nB]: broadcast over the heads, never materialised per head.
        cand, forced = self.candidates[:, None], self.forced[:, None]
        if self.bound_blocks > 0 and bound is None:
            raise ValueError(f"a plan with bound_blocks={self.bound_blocks} selects with the logit bounds: pass bound=")
        if self.probe_blocks > 0 and probe is None:
            raise ValueError(f"a plan with probe_blocks={self.probe_blocks} selects with the probe scores: pass probe=")
        if self.budget in ("layer", "head") and self.threshold is None:
            log_probs = scores.float() if normalized else gate_log_probs(scores, self.candidates)
            key = self.ranking_keys(log_probs, bound=bound, probe=probe, kernel=kernel)
            if self.budget == "layer":
                return _select_by_layer_budget(key, cand, forced, self.layer_extra(scores.shape[1]))
            # Per head: each (batch element, head) is a layer of one head with that head's share.
            bsz, heads = scores.shape[:2]
            per_head = lambda t: t.expand_as(scores).reshape(bsz * heads, 1, *t.shape[2:])  # noqa: E731
            extra = [e for e in self.layer_extra(1) for _ in range(heads)]
            return _select_by_layer_budget(per_head(key), per_head(cand), per_head(forced), extra).view(scores.shape)
        picks = self._extra_picks(bound, probe, cand, forced)
        if self.threshold is not None:
            probs = gate_log_probs(scores, self.candidates).exp()
            kept = (cand & (probs >= self.threshold)) | forced
            return kept if picks is None else kept | picks
        quota = self.quota[:, None, :, None]
        # Forced blocks rank first, then the bound's and probe's picks, non-candidates last; the sort then gives
        # every block its rank in the row.
        key = scores.float().masked_fill(~cand, float("-inf"))
        if picks is not None:
            key = key.masked_fill(picks, float(torch.finfo(torch.float32).max))
        key = key.masked_fill(forced, float("inf"))
        order = torch.argsort(key, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return (ranks < quota) & cand

    def ranking_keys(
        self,
        log_probs: torch.Tensor,
        *,
        bound: Optional[torch.Tensor] = None,
        probe: Optional[torch.Tensor] = None,
        kernel: str = "pytorch",
    ) -> torch.Tensor:
        """float32 `[B, H, nB, nB]`: the key by which the layer and head budgets rank the blocks.

        Forced blocks and non-candidates get -inf. The others get their log-probability, raised by 4e4 for the
        row's bound and probe picks (`_extra_picks`) and by 2e4 for its row-mass picks (`_row_mass_picks`),
        after clamping it at -1e4: log-probabilities are <= 0, so the tiers rank in that order and, within a
        tier, by probability. On Triton one fused kernel computes it (`seer_kernels.selection_ranking_keys`);
        the PyTorch code below is its reference.

        Args:
            log_probs: float32 `[B, H, nB, nB]`, rows normalised over their candidates.
            bound, probe: As for `select`.
            kernel: `pytorch` (default), `triton` or `auto` (Triton for CUDA tensors).
        """
        if self.quota is None:
            raise ValueError("ranking keys rank blocks for a budget: the plan needs a density")
        if seer_kernels.runs_on_triton(kernel, log_probs):
            return seer_kernels.selection_ranking_keys(
                log_probs, self.candidates, self.forced, self.room,
                bound=bound, bound_blocks=self.bound_blocks, probe=probe, probe_blocks=self.probe_blocks,
                row_mass=self.row_mass,
            )
        cand, forced = self.candidates[:, None], self.forced[:, None]
        key = log_probs
        if self.row_mass > 0.0:
            first = self._row_mass_picks(log_probs, cand, forced)
            key = torch.where(first, log_probs.clamp_min(-1e4) + 2e4, key)
        ahead = self._extra_picks(bound, probe, cand, forced)
        if ahead is not None:
            key = torch.where(ahead, log_probs.clamp_min(-1e4) + 4e4, key)
        return key.masked_fill(~cand | forced, float("-inf"))

    def _room(self) -> torch.Tensor:
        """long `[B, 1, nB, 1]`: each row's quota beyond its forced blocks."""
        return self.room[:, None, :, None]

    def _extra_picks(
        self, bound: Optional[torch.Tensor], probe: Optional[torch.Tensor], cand: torch.Tensor, forced: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """bool `[B, H, nB, nB]`: per row, the `bound_blocks` non-forced candidates of highest bound and the
        `probe_blocks` of highest probe score, at most the row's quota beyond its forced blocks (with a threshold,
        which has no quota: all of them); None when the plan has neither.

        Where the union does not fit that room, the two lists are taken alternately, bound first: the t-th pick
        (from 0) of list s (0: bound, 1: probe; s = 0 for the only list on) has priority `t * n + s` with n the
        lists on (smaller is better), a block on both lists the better of its two, and the row keeps its `room`
        picks of best priority. Neither list can crowd the other out."""
        lists = [(v, k) for v, k in ((bound, self.bound_blocks), (probe, self.probe_blocks)) if k > 0]
        if not lists:
            return None
        shape = torch.broadcast_shapes(*(values.shape for values, _ in lists), cand.shape)
        # Priority as a float key (higher is better, -inf: no pick), so topk orders the union.
        key = torch.full(shape, float("-inf"), device=cand.device)
        for source, (values, count) in enumerate(lists):
            ranked = values.float().masked_fill(~cand | forced, float("-inf"))
            top = ranked.topk(min(count, ranked.shape[-1]), dim=-1)
            rank = torch.arange(top.indices.shape[-1], device=key.device, dtype=key.dtype)
            priority = (-(rank * len(lists) + source)).expand_as(top.values)
            # A non-candidate in a short row's list stays no pick (-inf); a block both lists pick keeps the better.
            priority = priority.masked_fill(top.values == float("-inf"), float("-inf"))
            key.scatter_reduce_(-1, top.indices, priority, "amax")
        top = key.topk(min(sum(k for _, k in lists), key.shape[-1]), dim=-1)
        take = top.values > float("-inf")
        if self.quota is not None:
            take &= torch.arange(top.indices.shape[-1], device=key.device) < self._room()
        # topk's indices are distinct within a row, so no pick is overwritten.
        return torch.zeros(shape, dtype=torch.bool, device=key.device).scatter_(-1, top.indices, take)

    def _row_mass_picks(self, log_probs: torch.Tensor, cand: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """bool `[B, H, nB, nB]`: per row, the most probable non-forced candidates taken until the row's kept
        probability (forced blocks included) reaches `row_mass`, at most the row's quota minus its forced
        blocks."""
        probs = log_probs.exp().masked_fill(~cand, 0.0)
        forced_mass = (probs * forced).sum(-1, keepdim=True)
        free = probs.masked_fill(forced, -1.0).masked_fill(~cand, -1.0)
        ordered, order = free.sort(dim=-1, descending=True)
        before = ordered.clamp_min(0.0).cumsum(-1) - ordered.clamp_min(0.0)  # mass of the better blocks
        room = self._room()
        rank = torch.arange(ordered.shape[-1], device=ordered.device)
        take = (forced_mass + before < self.row_mass) & (rank < room) & (ordered >= 0.0)
        return torch.zeros_like(take).scatter_(-1, order, take)


def _select_by_layer_budget(key: torch.Tensor, cand: torch.Tensor, forced: torch.Tensor, extra: list[int]) -> torch.Tensor:
    """Forced blocks plus, per batch element b, the `extra[b]` other candidates of highest key across all heads
    and rows.

    Args:
        key: float32 `[B, H, nB, nB]` ranking keys (`SelectionPlan.ranking_keys`), -inf for forced blocks and
            non-candidates.
        cand, forced: bool `[B, H, nB, nB]`, or `[B, 1, nB, nB]` for every head alike.
        extra: From `SelectionPlan.layer_extra`.

    Returns:
        bool `[B, H, nB, nB]`.
    """
    bsz = key.shape[0]
    flat = key.reshape(bsz, -1)
    picked = torch.zeros_like(flat, dtype=torch.bool)
    top = max(extra)
    if top > 0:
        if all(e == top for e in extra):
            # One budget for the whole batch (always at B = 1): no order among the picks is needed.
            picked.scatter_(-1, torch.topk(flat, top, dim=-1, sorted=False).indices, True)
        else:
            # Element b keeps only its own first extra[b] picks.
            index = torch.topk(flat, top, dim=-1, sorted=True).indices
            limit = torch.tensor(extra, device=key.device)[:, None]
            picked.scatter_(-1, index, torch.arange(top, device=key.device)[None, :] < limit)
    return (picked.view(key.shape) & cand) | forced


def realised_density(block_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Fraction of candidate blocks kept, over the batch, heads and rows (a 0-dim float32 tensor).

    Args:
        block_mask: bool `[B, H, nB, nB]`.
        candidates: bool `[B, nB, nB]`.
    """
    cand = candidates[:, None].expand_as(block_mask)
    kept = (block_mask & cand).sum(dtype=torch.float32)
    return kept / cand.sum(dtype=torch.float32).clamp_min(1.0)


def density_per_head(block_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """float32 `[H]`: each head's fraction of candidate blocks kept, over the batch and rows (with a threshold or
    the layer budget heads keep different shares, which a layer mean hides).

    Args:
        block_mask: bool `[B, H, nB, nB]`.
        candidates: bool `[B, nB, nB]`.
    """
    kept = (block_mask & candidates[:, None]).sum(dim=(0, 2, 3), dtype=torch.float32)
    # Every head has the same candidates: their count, over the batch and rows.
    return kept / candidates.sum(dtype=torch.float32).clamp_min(1.0)


def block_recall(block_mask: torch.Tensor, ground_truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of the ground truth a selection keeps, and how much the best selection of the same size would.

    The ground truth is the row-normalised block-pooled attention the gate is trained on. A row's recall is the
    share of it inside the kept blocks; the oracle's recall keeps the same number of blocks in that row, the ones
    with the most ground truth. The gap between the two is what a better ranking could win at this budget.

    Args:
        block_mask: bool `[B, H, nQ, nB]`, the kept blocks of the rows the ground truth covers.
        ground_truth: float32 `[B, H, nQ, nB]`, rows summing to 1.

    Returns:
        (recall, oracle recall): 0-dim float32 tensors, means over batch, heads and rows.
    """
    gt = ground_truth.float()
    recall = (gt * block_mask).sum(-1)
    kept = block_mask.sum(-1, keepdim=True).clamp_min(1)
    best = gt.sort(dim=-1, descending=True).values.cumsum(-1).gather(-1, kept - 1).squeeze(-1)
    return recall.mean(), best.mean()


def gate_loss(
    log_probs: torch.Tensor,
    ground_truth: torch.Tensor,
    candidates: torch.Tensor,
    *,
    kind: str = "kl",
    target_temperature: float = 1.0,
) -> torch.Tensor:
    """Distance between the gate's block distribution and the ground truth, averaged over rows.

    Args:
        log_probs: `[B, H, nQ, nB]` gate log-probabilities (rows of the chosen query blocks).
        ground_truth: float32 `[B, H, nQ, nB]`, rows summing to 1 (zero outside the allowed blocks).
        candidates: bool `[B, nQ, nB]` candidate blocks of those rows.
        kind: `kl` for KL(ground truth || gate) summed over key blocks, or `mse` for the squared error of the
            probabilities summed over key blocks. Default `kl`.
        target_temperature: Compare with the ground truth sharpened (below 1) or flattened (above 1): each row's
            `p ** (1 / T)`, renormalised, so the loss weighs the blocks a top-k selection keeps more than the tail
            it drops. Zeros stay zero. Default 1.0 (the ground truth as it is).

    Returns:
        0-dim float32 tensor: the mean over batch, heads and rows.
    """
    cand = candidates[:, None].expand_as(log_probs)
    gt = ground_truth.float()
    if target_temperature != 1.0:
        # In log space relative to each row's maximum, so small probabilities raised to a large power do not
        # underflow before the renormalisation; a row of zeros (no ground truth) stays zeros.
        logs = torch.where(gt > 0, gt.clamp_min(torch.finfo(gt.dtype).tiny).log(), float("-inf"))
        logs = (logs - logs.amax(-1, keepdim=True).clamp_min(torch.finfo(gt.dtype).min)) / target_temperature
        gt = logs.softmax(-1).nan_to_num(0.0)
    if kind == "kl":
        # xlogy gives 0 where gt = 0; log q is finite on candidates and gt is 0 elsewhere.
        logq = log_probs.masked_fill(~cand, 0.0)
        per_row = (torch.xlogy(gt, gt) - gt * logq).sum(-1)
    elif kind == "mse":
        per_row = (log_probs.exp() - gt).pow(2).sum(-1)
    else:
        raise ValueError(f"gate loss kind={kind!r} must be kl or mse")
    return per_row.mean()
