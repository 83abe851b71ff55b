"""The `seer` attention function, its registration with transformers, and attaching gates to a loaded model.

Nothing of the model's code is copied or patched. Three public extension points carry everything:
- `AttentionInterface.register("seer", ...)`: every attention module of a model whose attention
  implementation is `seer` calls `seer_attention_forward` with its post-RoPE q, k, v;
- `AttentionMaskInterface.register("seer", ...)`: the model's mask becomes per-token document ids
  (`masking.seer_mask`) instead of an L x L tensor;
- forward hooks on each attention module's `q_proj`/`k_proj` (or `q_norm`/`k_norm` where the architecture
  normalises per head, e.g. Qwen3) hand the gate the pre-RoPE queries and keys. A forward pre-hook on the
  attention module re-attaches them if the projections were replaced after attaching (e.g. wrapped by LoRA),
  so the gate always sees what the attention sees.

Gate inputs are detached from the model's graph by default (`detach_gate_inputs`, as in the SeerAttention
paper): the gate loss then trains only the gates and cannot pull the model's Q/K towards easier-to-predict
attention. The LM loss reaches the model only through the (block-sparse) attention output; block selection
runs under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

import seer_kernels

from .gate import AttnGate, gate_rotary_embedding, num_blocks
from .masking import seer_mask, split_document_ids
from .selection import (
    block_candidates,
    forced_blocks,
    gate_log_probs,
    gate_loss,
    layer_extra_blocks,
    realised_density,
    row_quotas,
    select_blocks,
)

ATTN_NAME = "seer"
MODES = ("dense", "gate_distill", "joint")


@dataclass
class SeerRuntime:
    """Settings and per-forward records shared by all gates of one model.

    Attributes:
        mode: `dense` (gates unused), `gate_distill` (dense output, gate loss) or `joint` (sparse output, gate loss).
        block_size: Tokens per block.
        density: Target fraction of candidate blocks kept (sparse output).
        threshold: Alternative to density: minimum gate probability of a kept block.
        sink_blocks: Leading candidate blocks always kept.
        local_blocks: Blocks ending at the diagonal always kept (1: the diagonal only).
        budget: With a density: `row` (each query-block row keeps its share) or `layer` (the layer's total
            share goes to its most probable blocks across heads and rows); see `select_blocks`.
        loss_kind: `kl` or `mse`.
        ground_truth_query_fraction: Fraction of query blocks (random each forward) that get a ground truth
            while training.
        kernel: `seer_kernels` backend: `auto`, `reference` or `triton`.
        detach_gate_inputs: Detach the captured pre-RoPE Q/K before the gate.
        training: Whether the extension is in training mode (ground truth on a query subset; loss recorded
            with gradient). In evaluation the gate loss is still recorded, without gradient, on every row.
        compute_loss: Compute the ground truth and the gate loss (off for pure evaluation of sparse perplexity).
        oracle: Select blocks by each layer's true block-pooled attention instead of the gate's scores: what a
            perfect gate would reach at the same density or threshold (an evaluation upper bound; it costs a
            ground-truth pass per layer).
        record_block_masks: Keep each layer's last block mask in `block_masks` (for inspection and tests).
        losses: layer index -> gate loss of the last forward (0-dim tensors, with gradient while training).
        stats: forward id -> {"gate_loss/<layer>", "density/<layer>": detached 0-dim tensors}. Keyed by forward
            so that a gradient-checkpointing recomputation overwrites its forward's entries instead of adding.
        block_masks: layer index -> bool `[B, Hq, nB, nB]` of the last sparse forward (when recorded).
        ground_truth_cache: layer index -> (forward id, query rows, ground truth) of the last training forward
            in sparse mode, reused when gradient checkpointing recomputes the layer. (Autograd keeps that
            tensor for the gate loss anyway when nothing is recomputed.)
        forward_id: Incremented by a pre-hook at every forward of the model.
        per_forward: Values every layer of one forward shares (candidate, forced blocks, row quotas), computed by the
            first layer and cleared at the next forward: per layer they would be dozens of small launches.
    """

    mode: str = "dense"
    block_size: int = 64
    density: Optional[float] = None
    threshold: Optional[float] = None
    sink_blocks: int = 0
    local_blocks: int = 1
    budget: str = "row"
    loss_kind: str = "kl"
    ground_truth_query_fraction: float = 1.0
    kernel: str = "auto"
    detach_gate_inputs: bool = True
    training: bool = True
    compute_loss: bool = True
    oracle: bool = False
    record_block_masks: bool = False
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    block_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    ground_truth_cache: dict[int, tuple[int, Optional[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    forward_id: int = 0
    per_forward: dict[tuple, Any] = field(default_factory=dict)

    def shared(self, key: tuple, compute):
        """`compute()` once per forward for `key`; later layers (and checkpoint recomputation) reuse it."""
        if key not in self.per_forward:
            self.per_forward[key] = compute()
        return self.per_forward[key]

    @property
    def sparse(self) -> bool:
        """True when the attention output comes from the gate-selected blocks.

        Always in `joint`; in `gate_distill` only outside training (to measure how the distilled gates would
        do) and only when a density or threshold is set.
        """
        if self.density is None and self.threshold is None:
            return False
        return self.mode == "joint" or (self.mode == "gate_distill" and not self.training)

    def record(self, key: str, value: torch.Tensor) -> None:
        """Keep a detached scalar of the current forward for `metrics`-style averaging."""
        self.stats.setdefault(self.forward_id, {})[key] = value.detach().float()

    def take_losses(self) -> dict[int, torch.Tensor]:
        """The per-layer gate losses of the last forward; clears them."""
        losses, self.losses = self.losses, {}
        return losses

    def take_stats(self) -> dict[str, float]:
        """Each recorded key averaged over the forwards since the last call; clears them."""
        sums: dict[str, list[torch.Tensor]] = {}
        for entry in self.stats.values():
            for key, value in entry.items():
                sums.setdefault(key, []).append(value)
        self.stats = {}
        if not sums:
            return {}
        # One transfer for all keys (a float() per key would synchronise with the device once per layer).
        means = torch.stack([torch.stack(values).mean() for values in sums.values()]).tolist()
        return dict(zip(sums, means))


def register_seer() -> None:
    """Register the `seer` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, seer_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, seer_mask)


def _query_blocks(nb: int, fraction: float, device: torch.device) -> Optional[torch.Tensor]:
    """A random sorted subset of about `fraction * nb` query blocks (None for all)."""
    if fraction >= 1.0:
        return None
    count = max(1, int(round(fraction * nb)))
    return torch.randperm(nb, device=device)[:count].sort().values


def seer_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for `attn_implementation="seer"`.

    Args:
        module: The attention module; must carry `seer_gate` (see `attach_seer_gates`).
        query: post-RoPE `[B, Hq, L, D]`.
        key, value: `[B, Hkv, L, D]`.
        attention_mask: document ids `[B, L]` from `seer_mask`, or None (one unpadded document per row).
        scaling: softmax scale (the module's `scaling`).
        dropout: attention dropout; must be 0 (the block-sparse kernels have none).
        kwargs: other arguments from the modeling code; a non-null `sliding_window` is refused.

    Returns:
        (`[B, L, Hq, D]` attention output, None): attention weights are never materialised.
    """
    gate: Optional[AttnGate] = getattr(module, "seer_gate", None)
    if gate is None:
        raise RuntimeError(f"{type(module).__name__} has no seer_gate: attach gates with attach_seer_gates(model, ...)")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("seer attention does not support sliding-window layers")
    if dropout:
        raise NotImplementedError("seer attention has no attention dropout: set the model's attention_dropout to 0")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"seer attention expects document ids [B, L] as its mask, got shape {tuple(attention_mask.shape)}")
    if attention_mask is not None and attention_mask.shape[-1] != query.shape[2]:
        raise NotImplementedError(
            f"seer attention got document ids for {attention_mask.shape[-1]} tokens but attends over {query.shape[2]}"
            " (sequence parallelism with padding or packed documents is not supported)"
        )
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("seer attention runs full-sequence forward passes only: call with use_cache=False")
    rt: SeerRuntime = gate.runtime
    q_pre, k_pre = gate.seer_captured.pop("q", None), gate.seer_captured.pop("k", None)
    bsz, _, seq_len, _ = query.shape
    head_shard = (0, 1)
    if q_pre is not None and q_pre.shape[1] != seq_len:
        q_pre, k_pre, head_shard = _sequence_parallel_gate_inputs(q_pre, k_pre, seq_len)
    doc_ids = attention_mask
    valid = split_document_ids(doc_ids) if doc_ids is not None else None
    # The document ids are one tensor for all layers of a forward, so its identity keys the shared values.
    layout = (seq_len, bsz, rt.block_size, None if doc_ids is None else id(doc_ids), query.device)
    candidates = rt.shared(
        ("candidates", *layout),
        lambda: block_candidates(seq_len, rt.block_size, doc_ids, valid, batch_size=bsz, device=query.device),
    )
    common = dict(block_size=rt.block_size, document_ids=doc_ids, sm_scale=scaling, backend=rt.kernel)

    if rt.mode == "dense" or not (rt.sparse or rt.compute_loss):
        # Exact attention over every candidate block: the dense baseline through the same kernels.
        mask = candidates[:, None].expand(bsz, query.shape[1], -1, -1)
        out = seer_kernels.block_sparse_attention(query, key, value, mask, **common)
        return out.transpose(1, 2).contiguous(), None
    if q_pre is None or k_pre is None:
        raise RuntimeError(f"the gate of layer {gate.layer_idx} received no pre-RoPE q/k: its capture hooks did not run")
    if q_pre.shape[1] != seq_len or q_pre.shape[2] != query.shape[1]:
        raise RuntimeError(
            f"seer gates need the pre-RoPE q of all {seq_len} tokens and {query.shape[1]} heads, got "
            f"{tuple(q_pre.shape[1:3])} (tokens, heads)"
        )

    log_probs = gate_log_probs(gate(q_pre, k_pre, valid, head_shard=head_shard), candidates)
    ground_truth = None
    oracle_truth = None
    rows = None
    recomputing = ("block_mask", gate.layer_idx) in rt.per_forward  # gradient checkpointing's second pass
    if rt.compute_loss and rt.training and not recomputing:
        rows = _query_blocks(num_blocks(seq_len, rt.block_size), rt.ground_truth_query_fraction, query.device)
    if rt.sparse:
        if recomputing:
            # The selection is a no-grad function of the same inputs: reuse it instead of selecting again.
            block_mask = rt.per_forward[("block_mask", gate.layer_idx)]
        else:
            quota = None
            if rt.density is not None:
                quota = rt.shared(
                    ("quota", *layout, rt.density, rt.sink_blocks, rt.local_blocks),
                    lambda: row_quotas(candidates, rt.density, rt.sink_blocks, rt.local_blocks),
                )
            if rt.oracle:
                # Rank by the true pooled attention: log(0) = -inf only ever ranks a block last.
                oracle_truth = seer_kernels.attention_ground_truth(query.detach(), key.detach(), **common)
                selection_scores = torch.log(oracle_truth)
            else:
                selection_scores = log_probs.detach()
            forced = rt.shared(
                ("forced", *layout, rt.sink_blocks, rt.local_blocks),
                lambda: forced_blocks(candidates, rt.sink_blocks, rt.local_blocks),
            )
            layer_extra = None
            if rt.density is not None and rt.budget == "layer":
                layer_extra = rt.shared(
                    ("layer_extra", *layout, rt.density, rt.sink_blocks, rt.local_blocks, query.shape[1]),
                    lambda: layer_extra_blocks(quota, forced, query.shape[1]),
                )
            block_mask = select_blocks(
                selection_scores,
                candidates,
                density=rt.density,
                threshold=rt.threshold,
                sink_blocks=rt.sink_blocks,
                local_blocks=rt.local_blocks,
                quota=quota,
                forced=forced,
                budget=rt.budget,
                layer_extra=layer_extra,
                # Gate log-probs and the log of the row-normalised ground truth are both normalised per row.
                normalized=True,
            )
            rt.record(f"density/{gate.layer_idx}", realised_density(block_mask, candidates))
            if rt.training and torch.is_grad_enabled():
                rt.per_forward[("block_mask", gate.layer_idx)] = block_mask
        if rt.record_block_masks:
            rt.block_masks[gate.layer_idx] = block_mask
        # A sink block is a column every row keeps: its dK/dV work is cut into segments (one long program else).
        out = seer_kernels.block_sparse_attention(
            query, key, value, block_mask, split_long_columns=rt.sink_blocks > 0, **common
        )
        if rt.compute_loss:
            cached = rt.ground_truth_cache.get(gate.layer_idx)
            if cached is not None and cached[0] == rt.forward_id:
                # Gradient checkpointing recomputes this layer during backward: reuse the ground truth (and its
                # rows) of the original forward instead of paying for it twice.
                _, rows, ground_truth = cached
            elif oracle_truth is not None:
                # The oracle already computed every row of it.
                ground_truth = oracle_truth if rows is None else oracle_truth[:, :, rows]
            else:
                ground_truth = seer_kernels.attention_ground_truth(query.detach(), key.detach(), query_blocks=rows, **common)
                if rt.training and torch.is_grad_enabled():
                    rt.ground_truth_cache[gate.layer_idx] = (rt.forward_id, rows, ground_truth)
    else:
        # Dense output (gate distillation): the ground truth comes from the same fused forward.
        out, ground_truth = seer_kernels.attention_with_ground_truth(query, key, value, query_blocks=rows, **common)
    if ground_truth is not None:
        cand_rows = candidates if rows is None else candidates[:, rows]
        lp_rows = log_probs if rows is None else log_probs[:, :, rows]
        loss = gate_loss(lp_rows, ground_truth, cand_rows, kind=rt.loss_kind)
        rt.losses[gate.layer_idx] = loss if (rt.training and torch.is_grad_enabled()) else loss.detach()
        rt.record(f"gate_loss/{gate.layer_idx}", loss)
    return out.transpose(1, 2).contiguous(), None


def _sequence_parallel_gate_inputs(
    q_pre: torch.Tensor, k_pre: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Under DeepSpeed-Ulysses, move the gate's inputs the way the attention inputs were moved.

    The projections (where the capture hooks sit) saw this rank's token shard of every head, `[B, L/P, H, D]`,
    while attention runs on whole sequences of a head shard. The same all-to-all (scatter heads, gather tokens)
    gives the gate `[B, L, H/P, D]` of exactly the heads this rank attends with.

    Returns:
        (q `[B, L, Hq/P, D]`, k `[B, L, Hkv/P, D]`, (sequence-parallel rank, degree)).
    """
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    from deepspeed.sequence.layer import _SeqAllToAll

    group = sp_state.get_sequence_parallel_group()
    degree, rank = sp_state.get_sequence_parallel_world_size(), sp_state.get_sequence_parallel_rank()
    if q_pre.shape[1] * degree != seq_len or k_pre.shape[2] % degree:
        raise RuntimeError(
            f"seer gates under sequence parallelism: captured {q_pre.shape[1]} tokens x {k_pre.shape[2]} key heads "
            f"cannot be regrouped into {seq_len} tokens over degree {degree}"
        )
    # [B, L/P, H, D] -> [B, L, H/P, D]: scatter dim 2 (heads), gather dim 1 (tokens), batch dim 0.
    q = _SeqAllToAll.apply(group, q_pre.contiguous(), 2, 1, 0)
    k = _SeqAllToAll.apply(group, k_pre.contiguous(), 2, 1, 0)
    return q, k, (rank, degree)


# -- attaching gates ---------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder: those with q_proj, k_proj and a layer index."""
    found = []
    for module in model.modules():
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "layer_idx", "head_dim")):
            found.append(module)
    return found


def _rotary_module(model: nn.Module) -> Optional[nn.Module]:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            return module
    return None


def _capture_sources(attn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are the pre-RoPE q and k (per-head norms when the architecture has them)."""
    q_src = attn.q_norm if isinstance(getattr(attn, "q_norm", None), nn.Module) else attn.q_proj
    k_src = attn.k_norm if isinstance(getattr(attn, "k_norm", None), nn.Module) else attn.k_proj
    return q_src, k_src


def _install_capture_hooks(attn: nn.Module) -> None:
    """(Re-)register the q/k capture hooks on the attention module's current projection modules."""
    gate: AttnGate = attn.seer_gate
    q_src, k_src = _capture_sources(attn)
    if gate.seer_hook_targets == (id(q_src), id(k_src)):
        return
    for handle in gate.seer_hook_handles:
        handle.remove()
    head_dim = attn.head_dim

    def capture(name):
        def hook(_module, _inputs, output):
            x = output.detach() if gate.runtime.detach_gate_inputs else output
            gate.seer_captured[name] = x.reshape(x.shape[0], x.shape[1], -1, head_dim)

        return hook

    gate.seer_hook_handles = [q_src.register_forward_hook(capture("q")), k_src.register_forward_hook(capture("k"))]
    gate.seer_hook_targets = (id(q_src), id(k_src))


def _check_model_config(config) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(
            f"seer attention needs full-attention layers only; this model has {sorted(set(layer_types))}"
        )
    if not layer_types and getattr(config, "sliding_window", None) is not None:
        raise NotImplementedError(
            f"seer attention does not support sliding-window attention (config.sliding_window={config.sliding_window})"
        )
    if getattr(config, "attention_dropout", 0.0):
        raise NotImplementedError("seer attention has no attention dropout: set config.attention_dropout=0")


def attach_seer_gates(
    model: nn.Module,
    runtime: SeerRuntime,
    *,
    gate_hidden_size: int = 128,
    q_pooling: tuple[str, ...] = ("avg",),
    k_pooling: tuple[str, ...] = ("max", "min"),
    use_rope: bool = True,
    rope_units: str = "tokens",
) -> list[AttnGate]:
    """Give every attention module of a loaded causal LM a gate and switch it to the `seer` attention.

    Args:
        model: A transformers causal LM (Llama, Mistral without sliding window, Qwen2, Qwen3, ...), optionally
            wrapped by peft.
        runtime: Shared settings (mode, block size, density, ...); kept as `gate.runtime` on every gate.
        gate_hidden_size: Per-head gate width. Default 128.
        q_pooling, k_pooling: Block poolings. Defaults avg / max+min.
        use_rope: Apply the model's rotary embedding at block positions inside the gate. Default True.
        rope_units: `tokens` (the model's rotary settings as they are) or `blocks` (lengths divided by the block
            size, see `gate.gate_rotary_embedding`). Default `tokens`.

    Returns:
        The gates in layer order (they are also `module.seer_gate` of each attention module).
    """
    from .gate import POOLINGS

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = base.config
    _check_model_config(config)
    attns = _attention_modules(base)
    if not attns:
        raise ValueError(f"{type(base).__name__} has no attention modules with q_proj/k_proj/v_proj to attach gates to")
    if runtime.mode not in MODES:
        raise ValueError(f"mode={runtime.mode!r} must be one of {', '.join(MODES)}")
    for name, pools in (("q_pooling", q_pooling), ("k_pooling", k_pooling)):
        if not pools or any(p not in POOLINGS for p in pools):
            raise ValueError(f"{name}={list(pools)} must name one or more of {', '.join(POOLINGS)}")
    register_seer()
    rotary = _rotary_module(base) if use_rope else None
    if use_rope and rotary is None:
        raise ValueError(f"{type(base).__name__} has no rotary_emb module to build the gate's block RoPE from")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    gates = []
    for attn in attns:
        device = attn.q_proj.weight.device if hasattr(attn.q_proj, "weight") else next(attn.parameters()).device
        gate = AttnGate(
            num_heads,
            num_kv_heads,
            attn.head_dim,
            block_size=runtime.block_size,
            hidden_size=gate_hidden_size,
            q_pooling=q_pooling,
            k_pooling=k_pooling,
            rotary=(
                gate_rotary_embedding(config, rotary, gate_hidden_size, block_size=runtime.block_size, units=rope_units)
                if rotary is not None
                else None
            ),
            layer_idx=int(attn.layer_idx),
        ).to(device)
        gate.rope_units = rope_units  # saved in seer_gates.json; the rotary holds no parameters
        # Plain attributes (not parameters/buffers): runtime state that is neither trained nor saved.
        gate.runtime = runtime
        gate.seer_captured = {}
        gate.seer_hook_handles = []
        gate.seer_hook_targets = None
        if hasattr(attn, "seer_gate"):
            for handle in attn.seer_gate.seer_hook_handles:
                handle.remove()
            attn.seer_gate_prehook.remove()
        attn.seer_gate = gate
        _install_capture_hooks(attn)
        attn.seer_gate_prehook = attn.register_forward_pre_hook(lambda m, _args: _install_capture_hooks(m))
        gates.append(gate)
    # The gates are saved as their own adapter (`saving.save_gates`); keep them out of the model's own
    # save_pretrained so a saved model folder stays loadable as a plain transformers model.
    gate_keys = {name for name, _ in base.named_parameters() if ".seer_gate." in name}
    base._keys_to_ignore_on_save = set(getattr(base, "_keys_to_ignore_on_save", None) or ()) | gate_keys
    if getattr(base, "seer_forward_prehook", None) is not None:
        base.seer_forward_prehook.remove()
    base.seer_forward_prehook = base.register_forward_pre_hook(lambda _m, _args: _next_forward(runtime))
    base.set_attn_implementation(ATTN_NAME)
    return gates


def _next_forward(runtime: SeerRuntime) -> None:
    runtime.forward_id += 1
    runtime.ground_truth_cache.clear()
    runtime.per_forward.clear()


def seer_gates(model: nn.Module) -> list[AttnGate]:
    """The gates attached to `model`, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, AttnGate)), key=lambda g: g.layer_idx)
