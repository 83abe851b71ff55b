"""Fused ranking keys of the layer budget: every row's early picks and its tiers in one program per row.

The layer (or head) budget of `seer_finetune.seer.selection.SelectionPlan` ranks every non-forced candidate block
of a layer by one float key and keeps the best ones across all rows. Before that ranking, each query-block row
moves some blocks ahead of the others:
- the `ahead` tier: its `bound_blocks` blocks of highest logit bound and `probe_blocks` of highest probe score,
  the two lists taken alternately (bound first) while the row has room (its quota minus its forced blocks);
- the `first` tier: its most probable blocks until, forced blocks included, they hold `row_mass` of the row's
  gate probability, at most its room.
A block's key is its log-probability, raised by 4e4 in the `ahead` tier and by 2e4 in the `first` tier (after
clamping it at -1e4, so tiers never mix), and -inf for forced blocks and non-candidates.

In PyTorch that is three row-wise top-k or sorts, scatters and a dozen elementwise passes over `[B, H, nB, nB]`
per layer. Here a program reads a tile of whole rows once: each list is a sort of packed (value, column) keys, so a descending
sort ranks by value and breaks ties by the lower column; the `first` tier is a prefix of the sorted
probabilities (its condition only weakens along the order), found with a cumulative sum; the `ahead` tier is
built by walking the two sorted lists. The PyTorch reference is `SelectionPlan`'s own code
(`seer_finetune.seer.selection`), which this must equal.

Layers: `_ranking_keys_kernel`, its launcher `ranking_keys` (tiles from `launch_config`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT64_MIN = tl.constexpr(-(2**63))
_INT64_MAX = tl.constexpr(2**63 - 1)
# Tier offsets and the clamp that keeps tiers apart: log-probabilities are <= 0.
_AHEAD = tl.constexpr(4e4)
_FIRST = tl.constexpr(2e4)
_FLOOR = tl.constexpr(-1e4)


@triton.jit
def _order_bits(x):
    """int64 whose signed order is the order of the float32 `x` (negative floats' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _sorted_desc(values, cols, BLOCK: tl.constexpr):
    """`values` `[ROWS, BLOCK]` float32 packed with their columns and sorted descending along each row: by value,
    ties by lower column."""
    return tl.sort((_order_bits(values) << 32) | (BLOCK - 1 - cols).to(tl.int64)[None, :], dim=1, descending=True)


@triton.jit
def _value_of(packed):
    """The float32 value of packed keys (`_sorted_desc`)."""
    bits = (packed >> 32).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)


@triton.jit
def _take(ranked, t, picked, count, room, cols, BLOCK: tl.constexpr):
    """In each row, pick the t-th entry of its sorted list `ranked` when it is a real value (not -inf), not yet
    picked, and the row has room left; returns the new (picked `[ROWS, BLOCK]`, count `[ROWS]`)."""
    entry = tl.max(tl.where(cols[None, :] == t, ranked, _INT64_MIN), 1)
    # Past the end of the list (t >= BLOCK) the entry is the int64 minimum, whose value is NaN: not real.
    real = _value_of(entry) > float("-inf")
    hit = cols[None, :] == (BLOCK - 1 - (entry & 0xFFFFFFFF))[:, None]
    seen = tl.max((hit & picked).to(tl.int32), 1)
    add = real & (seen == 0) & (count < room)
    return tl.where(add[:, None], picked | hit, picked), count + add.to(tl.int32)


@triton.jit
def _ranking_keys_kernel(
    LOG_PROBS, CAND, FORCED, ROOM, BOUND, PROBE, OUT,  # noqa: N803
    n_rows, n_heads, n_blocks, row_mass,
    BOUND_BLOCKS: tl.constexpr,
    PROBE_BLOCKS: tl.constexpr,
    ROW_MASS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: ROWS consecutive rows of the flattened `[B * H * nB]` rows (row `(b * H + h) * nB + i`)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    i = rows % n_blocks
    b = rows // n_blocks // n_heads
    cols = tl.arange(0, BLOCK)
    live = (rows < n_rows)[:, None] & (cols < n_blocks)[None, :]
    at = rows[:, None] * n_blocks + cols[None, :]
    lp = tl.load(LOG_PROBS + at, mask=live, other=float("-inf"))
    shared = ((b * n_blocks + i) * n_blocks)[:, None] + cols[None, :]  # candidates and forced: alike for every head
    cand = tl.load(CAND + shared, mask=live, other=0) != 0
    forced = tl.load(FORCED + shared, mask=live, other=0) != 0
    free = cand & (forced == 0)
    room = tl.maximum(tl.load(ROOM + b * n_blocks + i, mask=rows < n_rows, other=0), 0).to(tl.int32)
    key = lp
    if ROW_MASS:
        p = tl.where(free, tl.exp(lp), -1.0)
        forced_mass = tl.sum(tl.where(cand & forced, tl.exp(lp), 0.0), 1)
        ranked = _sorted_desc(p, cols, BLOCK)
        kept = tl.maximum(_value_of(ranked), 0.0)
        before = tl.cumsum(kept, 1) - kept  # the mass of the better blocks
        take = (forced_mass[:, None] + before < row_mass) & (cols[None, :] < room[:, None])
        take &= _value_of(ranked) >= 0.0
        # The taken entries are a prefix of each row's order: the row keeps every packed key down to the last.
        last = tl.min(tl.where(take, ranked, _INT64_MAX), 1)
        own = (_order_bits(p) << 32) | (BLOCK - 1 - cols).to(tl.int64)[None, :]
        first = free & (own >= last[:, None])
        key = tl.where(first, tl.maximum(lp, _FLOOR) + _FIRST, key)
    if BOUND_BLOCKS + PROBE_BLOCKS > 0:
        picked = live & (cols < 0)[None, :]
        count = tl.zeros([ROWS], dtype=tl.int32)
        if BOUND_BLOCKS > 0:
            bound = tl.load(BOUND + at, mask=live, other=float("-inf"))
            by_bound = _sorted_desc(tl.where(free, bound, float("-inf")), cols, BLOCK)
        if PROBE_BLOCKS > 0:
            probe = tl.load(PROBE + at, mask=live, other=float("-inf"))
            by_probe = _sorted_desc(tl.where(free, probe, float("-inf")), cols, BLOCK)
        for t in tl.static_range(max(BOUND_BLOCKS, PROBE_BLOCKS)):
            if t < BOUND_BLOCKS:
                picked, count = _take(by_bound, t, picked, count, room, cols, BLOCK)
            if t < PROBE_BLOCKS:
                picked, count = _take(by_probe, t, picked, count, room, cols, BLOCK)
        key = tl.where(picked, tl.maximum(lp, _FLOOR) + _AHEAD, key)
    tl.store(OUT + at, tl.where(free, key, float("-inf")), mask=live)


def launch_config(n_blocks: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) of a launch on rows of `n_blocks` blocks: a `[ROWS, BLOCK]` tile of about 2048
    entries. Compiled ahead of time for sm_90 (`benchmarks/diagnostics/kernel_resources.py --selection`), 8
    warps need 118-204 registers and do not spill up to 4096 blocks per row; beyond, 16 warps spill less."""
    block = max(16, triton.next_power_of_2(n_blocks))
    return block, max(1, 2048 // block), 8 if block <= 4096 else 16


@torch.no_grad()
def ranking_keys(
    log_probs: torch.Tensor,
    candidates: torch.Tensor,
    forced: torch.Tensor,
    room: torch.Tensor,
    *,
    bound: torch.Tensor | None = None,
    bound_blocks: int = 0,
    probe: torch.Tensor | None = None,
    probe_blocks: int = 0,
    row_mass: float = 0.0,
) -> torch.Tensor:
    """`seer_kernels.selection_ranking_keys` (its contract and arguments) in one launch; inputs are checked there.
    Returns float32 `[B, H, nB, nB]`."""
    bsz, heads, nb, _ = log_probs.shape
    out = torch.empty(log_probs.shape, dtype=torch.float32, device=log_probs.device)
    if out.numel() == 0:
        return out

    def rows(x: torch.Tensor | None, needed: bool) -> torch.Tensor:
        # A list that is off is never read: any float32 tensor stands in for its pointer.
        return x.float().expand(bsz, heads, nb, nb).contiguous() if needed else out

    block, rows_per_program, num_warps = launch_config(nb)
    n_rows = bsz * heads * nb
    _ranking_keys_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        log_probs.float().contiguous(),
        candidates.contiguous().view(torch.uint8),
        forced.contiguous().view(torch.uint8),
        room.to(torch.int64).contiguous(),
        rows(bound, bound_blocks > 0),
        rows(probe, probe_blocks > 0),
        out,
        n_rows,
        heads,
        nb,
        float(row_mass),
        BOUND_BLOCKS=bound_blocks,
        PROBE_BLOCKS=probe_blocks,
        ROW_MASS=row_mass > 0.0,
        ROWS=rows_per_program,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out
