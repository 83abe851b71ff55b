"""What the gates of one model share: frozen settings, the train/eval switch, per-forward state and records.

Three lifetimes, three objects:
- `SeerSettings` (frozen): how attention runs and what it records, derived from `AttentionConfig`. It is never
  edited in place; `SeerRuntime.configure` / `SeerRuntime.using` swap in a validated copy (the `eval` job does
  this per density).
- `ForwardState`: what one forward of the model computes once and every layer (and gradient checkpointing's
  recomputation) reuses: the selection plan of each layout, per layer the selected blocks (as bits) and the
  ground truth's rows (the ground truth itself only where the recomputation rebuilds the gate loss's graph).
  A new one starts at every forward of the model, in one place (`SeerRuntime.begin_forward`).
- records: the per-layer gate losses of the last forward (taken by the trainer for backward) and scalar
  statistics per forward (averaged when the trainer logs them).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from ..config import GROUND_TRUTHS
from .selection import BUDGETS, SelectionPlan

MODES = ("dense", "gate_distill", "joint")
LOSS_KINDS = ("kl", "mse")
KERNELS = ("auto", "pytorch", "triton")


@dataclass(frozen=True)
class SeerSettings:
    """How the seer attention of every layer runs.

    Attributes:
        mode: `dense` (gates unused), `gate_distill` (dense output, gate loss) or `joint` (sparse output, gate loss).
        block_size: Tokens per block. Default 64.
        density: Target fraction of candidate blocks kept (sparse output).
        threshold: Alternative to density: minimum gate probability of a kept block.
        sink_blocks: Leading candidate blocks always kept. Default 0.
        local_blocks: Blocks ending at the diagonal always kept (1: the diagonal only). Default 1.
        budget: With a density: `row` (each query-block row keeps its share), `layer` (the layer's total
            share goes to its most probable blocks across heads and rows) or `head` (likewise within each head);
            see `selection.SelectionPlan`.
        row_mass: With the layer or head budget: each row first keeps its most probable blocks up to this share of its
            gate probability (at most its quota); 0 turns it off, the row budget and a threshold ignore it. See `selection.SelectionPlan`.
        bound_blocks: Per row and head, key blocks of highest logit bound kept ahead of the gate's picks, within
            the same density (`selection.logit_bound_scores`); oracle selection ignores it. 0 (default): off.
        probe_blocks: Per row and head, key blocks of highest probe score (the exact attention of `probe_tokens`
            of the row's query tokens, `probe.probe_scores`) kept ahead of the gate's picks beside the bound's,
            within the same density; oracle selection ignores it. 0 (default): off.
        probe_tokens: Probe tokens per query block; divides `block_size`. Default 1 (the block's last token).
        loss_kind: `kl` or `mse`.
        target_temperature: The gate loss compares with the ground truth at this temperature (`selection.gate_loss`).
        selection_temperature: Selection compares the gate's probabilities raised to this power, renormalised
            per row (`selection.tempered_log_probs`); 1.0 (default) as they are. Equal to `target_temperature`,
            it undoes the sharpening the gate learnt, so the budget is shared out by estimated attention mass.
        ground_truth_query_fraction: Fraction of query blocks (random each forward) that get a ground truth
            while training. In evaluation every row gets one.
        ground_truth: `exact` (default) or `probe`: in sparse training the gate learns the probe scores of every
            query block instead of the exact ground truth of a sample (`config.AttentionConfig.ground_truth`).
        kernel: `seer_kernels` implementation: `auto`, `pytorch` or `triton`.
        detach_gate_inputs: Detach the captured pre-RoPE Q/K before the gate, so the gate loss trains only the
            gates.
        compute_loss: Compute the ground truth and the gate loss (off to measure sparse perplexity alone).
        compile_gate: Run each layer's gate path (pooling to log-probabilities, the gate loss, the selection's
            statistics) as graphs compiled by `torch.compile` (`gate_path`): fewer, fused launches. None
            (default): in training on CUDA only (`gate_path.compile_gate_now`).
        oracle: Select blocks by each layer's true block-pooled attention instead of the gate's scores: what a
            perfect gate would reach at the same density or threshold (an evaluation bound; it costs a
            ground-truth pass per layer).
        oracle_layers: Layers that select by the true attention while the others keep their gates (with `oracle`
            off): which layers a gate's loss comes from. Empty (default): none.
    """

    mode: str = "dense"
    block_size: int = 64
    density: Optional[float] = None
    threshold: Optional[float] = None
    sink_blocks: int = 0
    local_blocks: int = 1
    budget: str = "row"
    row_mass: float = 0.0
    bound_blocks: int = 0
    probe_blocks: int = 0
    probe_tokens: int = 1
    loss_kind: str = "kl"
    target_temperature: float = 1.0
    selection_temperature: float = 1.0
    ground_truth_query_fraction: float = 1.0
    ground_truth: str = "exact"
    kernel: str = "auto"
    detach_gate_inputs: bool = True
    compute_loss: bool = True
    compile_gate: Optional[bool] = None
    oracle: bool = False
    oracle_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def one_of(name: str, value, allowed) -> None:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {', '.join(allowed)}")

        one_of("mode", self.mode, MODES)
        one_of("budget", self.budget, BUDGETS)
        one_of("loss_kind", self.loss_kind, LOSS_KINDS)
        one_of("kernel", self.kernel, KERNELS)
        one_of("ground_truth", self.ground_truth, GROUND_TRUTHS)
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be positive")
        if self.density is not None and self.threshold is not None:
            raise ValueError("give a density or a threshold, not both")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1]")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1]")
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise ValueError(f"sink_blocks={self.sink_blocks} must be >= 0 and local_blocks={self.local_blocks} >= 1")
        if not 0.0 <= self.row_mass < 1.0:
            raise ValueError(f"row_mass={self.row_mass} must be in [0, 1)")
        if self.bound_blocks < 0:
            raise ValueError(f"bound_blocks={self.bound_blocks} must be >= 0")
        if self.probe_blocks < 0:
            raise ValueError(f"probe_blocks={self.probe_blocks} must be >= 0")
        if not 1 <= self.probe_tokens <= self.block_size or self.block_size % self.probe_tokens:
            raise ValueError(
                f"probe_tokens={self.probe_tokens} must be in [1, block_size={self.block_size}] and divide it"
            )
        if not self.target_temperature > 0.0:
            raise ValueError(f"target_temperature={self.target_temperature} must be > 0")
        if not self.selection_temperature > 0.0:
            raise ValueError(f"selection_temperature={self.selection_temperature} must be > 0")
        # A tuple whatever sequence was given: settings are hashed (they key the selection plans).
        object.__setattr__(self, "oracle_layers", tuple(self.oracle_layers))
        if any(not isinstance(layer, int) or layer < 0 for layer in self.oracle_layers):
            raise ValueError(f"oracle_layers={self.oracle_layers} must be layer indices >= 0")
        if not 0.0 < self.ground_truth_query_fraction <= 1.0:
            raise ValueError(f"ground_truth_query_fraction={self.ground_truth_query_fraction} must be in (0, 1]")

    @classmethod
    def from_config(cls, attention) -> "SeerSettings":
        """The settings of an `AttentionConfig` section (its seer fields)."""
        a = attention
        return cls(
            mode=a.mode,
            block_size=int(a.block_size),
            density=a.density,
            threshold=a.threshold,
            sink_blocks=int(a.sink_blocks),
            local_blocks=int(a.local_blocks),
            budget=a.budget,
            row_mass=float(a.row_mass),
            bound_blocks=int(a.bound_blocks),
            probe_blocks=int(a.probe_blocks),
            probe_tokens=int(a.probe_tokens),
            loss_kind=a.gate_loss,
            target_temperature=float(a.gate_target_temperature),
            selection_temperature=float(a.gate_selection_temperature),
            ground_truth_query_fraction=float(a.ground_truth_query_fraction),
            ground_truth=a.ground_truth,
            kernel=a.kernel,
            detach_gate_inputs=bool(a.detach_gate_inputs),
            compile_gate=None if a.compile_gate is None else bool(a.compile_gate),
        )


@dataclass
class ForwardState:
    """Values of one forward of the model, shared by its layers and by checkpoint recomputation.

    What is kept per layer lives from the layer's first pass to the end of the backward, in every layer at once,
    so it is kept small: the selected blocks as bits, the ground truth only where the recomputation rebuilds the
    gate loss.

    Attributes:
        forward_id: Counts the model's forwards; keys the statistics so a recomputation overwrites its own.
        candidates: `attention.Layout` -> bool `[B, nB, nB]` candidate blocks, computed by the first layer (per
            layer they would be dozens of small launches); `("padding", layout)` -> the forward's
            `masking.padding_layout`.
        plans: (layout, settings) -> `SelectionPlan` (forced blocks, quotas) shared by every layer likewise.
        passes: Layers whose first pass ran in this forward with a graph: a second call is gradient
            checkpointing's recomputation.
        rows: layer -> the query blocks (int64 `[nQ]`, or None for all) of the first pass's ground truth.
        block_masks: layer -> (uint8 `[B, H, nB, ceil(nB / 8)]` bits, nB): the blocks selected in the first pass
            (`keep_block_mask` / `block_mask`; the selection is a no-grad function of the same inputs, so the
            recomputation reuses it).
        ground_truth: layer -> (query rows or None, ground truth) of the first pass, for a recomputation that
            rebuilds the gate loss's graph (gate inputs not detached).
    """

    forward_id: int = 0
    candidates: dict[Any, Any] = field(default_factory=dict)
    plans: dict[tuple[Any, SeerSettings], SelectionPlan] = field(default_factory=dict)
    passes: set[int] = field(default_factory=set)
    rows: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)
    block_masks: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    ground_truth: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def keep_block_mask(self, layer: int, block_mask: torch.Tensor) -> None:
        """Keep a layer's bool `[B, H, nB, nB]` selection as bits (an eighth of its bytes)."""
        self.block_masks[layer] = (pack_bits(block_mask), block_mask.shape[-1])

    def block_mask(self, layer: int) -> Optional[torch.Tensor]:
        """The bool `[B, H, nB, nB]` selection kept for `layer`, or None."""
        kept = self.block_masks.get(layer)
        return None if kept is None else unpack_bits(*kept)


def _bit_shifts(device: torch.device) -> torch.Tensor:
    # Made on the device (no host-to-device copy in every layer).
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool `[..., n]` -> uint8 `[..., ceil(n / 8)]`, eight entries of the last axis per byte (lowest bit first)."""
    pad = -mask.shape[-1] % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    return (bits << _bit_shifts(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 `[..., ceil(n / 8)]` -> bool `[..., n]` (contiguous)."""
    mask = ((packed[..., None] >> _bit_shifts(packed.device)) & 1).bool().reshape(*packed.shape[:-1], -1)
    return mask if mask.shape[-1] == n else mask[..., :n].contiguous()


class LayoutCache:
    """Values that depend only on a layout without documents or padding (plain causal attention) and the
    settings, kept across forwards: such a layout's candidate blocks and selection plan are the same at every
    training step, so they are built once, and the plan's budget read back from the device once, not per forward.

    Args:
        max_entries: How many values are kept, the most recently used first out last (an evaluation at other
            lengths adds a few). Default 8.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._values: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def get(self, key: Any) -> Any:
        """The value kept under `key` (hashable), or None."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> Any:
        """Keep `value` under `key`, dropping the least recently used beyond `max_entries`; returns `value`."""
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.max_entries:
            self._values.popitem(last=False)
        return value

    def get_or_make(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value kept under `key`, made by `make()` and kept if there is none; `key` None keeps nothing."""
        if key is None:
            return make()
        value = self.get(key)
        return self.put(key, make()) if value is None else value

    def __len__(self) -> int:
        return len(self._values)


class SeerRuntime:
    """Shared by all gates of one model (`gate.runtime`): settings, the train/eval switch, per-forward state and
    records.

    Args:
        settings: Initial settings. Default `SeerSettings()` (dense).
        changes: Fields of `SeerSettings` to change from `settings`, e.g. `SeerRuntime(mode="joint", density=0.5)`.

    Attributes:
        training: The trainer's mode: ground truth on a query subset and gate losses with gradient. In
            evaluation the gate loss is still recorded, without gradient, on every row.
        record_block_masks: Keep each layer's last block mask in `block_masks` (for inspection and tests).
        record_stats: Keep per-forward statistics (densities, recall, gate losses) for `take_stats`. On by default
            (training and `eval` read them); generation turns it off, since nothing takes them there and they
            would pile up with every prompt.
        block_masks: layer -> bool `[B, Hq, nB, nB]` of the last sparse forward, when recorded.
        forward: The current `ForwardState`.
        lasting: `LayoutCache` of the candidates and selection plans of layouts without documents, across forwards.
    """

    def __init__(self, settings: Optional[SeerSettings] = None, **changes):
        base = settings if settings is not None else SeerSettings()
        self._settings = dataclasses.replace(base, **changes) if changes else base
        self.training = True
        self.record_block_masks = False
        self.record_stats = True
        self.block_masks: dict[int, torch.Tensor] = {}
        self.forward = ForwardState()
        self.lasting = LayoutCache()
        self._losses: dict[int, torch.Tensor] = {}
        self._stats: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def settings(self) -> SeerSettings:
        return self._settings

    def configure(self, **changes) -> SeerSettings:
        """Replace settings fields (validated together); returns the new settings."""
        self._settings = dataclasses.replace(self._settings, **changes)
        return self._settings

    @contextlib.contextmanager
    def using(self, **changes) -> Iterator[SeerSettings]:
        """Run a block with some settings changed, restoring the previous settings afterwards."""
        saved = self._settings
        try:
            yield self.configure(**changes)
        finally:
            self._settings = saved

    @property
    def sparse(self) -> bool:
        """True when the attention output comes from the selected blocks.

        Always in `joint`; in `gate_distill` only outside training (to measure how the distilled gates would
        do); never without a density or threshold.
        """
        s = self._settings
        if s.density is None and s.threshold is None:
            return False
        return s.mode == "joint" or (s.mode == "gate_distill" and not self.training)

    @property
    def runs_gates(self) -> bool:
        """Whether a forward needs the gates at all (a sparse selection or a gate loss)."""
        return self._settings.mode != "dense" and (self.sparse or self._settings.compute_loss)

    @property
    def keeps_graph(self) -> bool:
        """Whether this forward's gate losses keep their graph and its selections are kept for recomputation."""
        return self.training and torch.is_grad_enabled()

    def begin_forward(self) -> None:
        """Start a new forward of the model: the previous forward's shared values are dropped."""
        self.forward = ForwardState(forward_id=self.forward.forward_id + 1)

    # -- records -----------------------------------------------------------------------------------------

    def record_loss(self, layer: int, loss: torch.Tensor) -> None:
        """Keep a layer's gate loss of this forward (with its graph while training) and its detached value."""
        self._losses[layer] = loss if self.keeps_graph else loss.detach()
        self.record(f"gate_loss/{layer}", loss)

    def record(self, key: str, value: torch.Tensor) -> None:
        """Keep a detached scalar (or a vector of a fixed length per key, e.g. one value per head) of the current
        forward for `take_stats` (nothing while `record_stats` is off)."""
        if not self.record_stats:
            return
        self._stats.setdefault(self.forward.forward_id, {})[key] = value.detach().float()

    @property
    def stats(self) -> dict[int, dict[str, torch.Tensor]]:
        """forward id -> {"gate_loss/<layer>", "density/<layer>", ...: detached 0-dim tensors; "density_heads/<layer>":
        one value per head} since `take_stats`."""
        return self._stats

    def take_losses(self) -> dict[int, torch.Tensor]:
        """The per-layer gate losses of the last forward; clears them."""
        losses, self._losses = self._losses, {}
        return losses

    def stats_marker(self) -> int:
        """The id of the latest forward with recorded statistics (0 for none): what `pop_stats_since` counts
        from."""
        return max(self._stats, default=0)

    def pop_stats_since(self, marker: int) -> dict[str, torch.Tensor]:
        """Take out the statistics of the forwards recorded after `marker` (`stats_marker`) and return the last
        one's (key -> tensor): a CUDA graph's capture, whose tensors each replay overwrites."""
        later = sorted(fid for fid in self._stats if fid > marker)
        taken = [self._stats.pop(fid) for fid in later]
        return taken[-1] if taken else {}

    def add_forward_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Record `stats` as one more forward's (copies, taken now): a replayed graph's forward, whose recording
        code does not run again."""
        if not self.record_stats or not stats:
            return
        # It counts as a forward: the next one's statistics go under a later id.
        self.forward.forward_id = max(max(self._stats, default=0), self.forward.forward_id) + 1
        self._stats[self.forward.forward_id] = {key: value.clone() for key, value in stats.items()}

    def take_stats(self) -> dict[str, float | list[float]]:
        """Each recorded key averaged over the forwards since the last call; clears them.

        Returns:
            key -> the mean of a scalar statistic (a float), or the element-wise mean of a vector one, such as
            per-head densities (a list of floats).
        """
        entries = list(self._stats.values())
        self._stats = {}
        if not entries:
            return {}
        # Keys in order of first appearance; a key absent from some forwards is averaged over those that have it.
        shapes = {key: value.shape for entry in entries for key, value in entry.items()}
        like = next(iter(entries[0].values()))
        # One row per forward, every key's values side by side: a handful of launches however many layers there
        # are, and one transfer (a float() per key would synchronise with the device once per layer).
        rows = torch.stack([
            torch.cat([entry[key].reshape(-1) if key in entry else like.new_zeros(shape.numel())
                       for key, shape in shapes.items()])
            for entry in entries
        ])
        sums = rows.sum(0).tolist()
        out: dict[str, float | list[float]] = {}
        start = 0
        for key, shape in shapes.items():
            count = sum(key in entry for entry in entries)
            means = [value / count for value in sums[start : start + shape.numel()]]
            out[key] = means[0] if len(shape) == 0 else means
            start += shape.numel()
        return out
