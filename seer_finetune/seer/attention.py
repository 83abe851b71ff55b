"""The `seer` attention function and its registration with transformers.

Two of transformers' registries carry it, so no modeling file is copied or patched:
- `AttentionInterface.register("seer", ...)`: every attention module of a model whose attention implementation
  is `seer` calls `seer_attention_forward` with its post-RoPE q, k, v;
- `AttentionMaskInterface.register("seer", ...)`: the model's mask becomes per-token document ids
  (`masking.seer_mask`) instead of an L x L tensor.

One call per layer and forward, in steps:
1. inputs: check the call; take the pre-RoPE q/k the gate's hooks captured (`attach.py`), regrouped like the
   attention inputs under sequence parallelism;
2. gate scores: the gate's block logits, log-softmaxed over the candidate blocks (`gate_path`: eager, or one
   compiled graph with `compile_gate`);
3. selection: the forward's `SelectionPlan` (built by its first layer, shared by all) turns the gate's scores
   (or, for the oracle, the true pooled attention) into a block mask;
4. kernel: block-sparse attention over the kept blocks, or dense attention with its ground truth when only the
   gates learn;
5. loss: the ground truth on a sample of query blocks (or, with `ground_truth: probe` in sparse training, the
   probe scores of every query block), the gate loss and, for a sparse output, the recall of the kept blocks
   against the best blocks of the same count, recorded in the runtime.

Gate inputs are detached from the model's graph by default (`detach_gate_inputs`, as in the SeerAttention paper):
the gate loss then trains only the gates and cannot pull the model's Q/K towards easier-to-predict attention. The
LM loss reaches the model only through the (block-sparse) attention output; selection runs under no_grad.

While a profiler runs, each step's work is a range named `seer.<step>` (`STAGES`), so the GPU time of a layer's
gate, selection, probe, attention, ground truth and loss can be told apart (`benchmarks/bench_training_step.py`).

Under gradient checkpointing a layer runs twice: its first pass, and a recomputation in backward that must save
the same tensors for backward. With detached gate inputs, steps 2 and 5 save nothing for the model's backward
(the gate loss's gradient is taken in the first pass, `gate_path.loss_with_gradients`), so the recomputation runs
step 4 alone over the first pass's blocks; otherwise it runs every step again, reusing the first pass's blocks
and ground truth, and its loss is dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

import seer_kernels

from .decode import attend_to_cache
from .gate import AttnGate, num_blocks
from .gate_path import (
    compile_gate_now, gate_graph, layer_gate_loss, layer_log_probs, layer_selection_stats, loss_with_gradients,
)
from .masking import padding_layout, seer_mask, split_document_ids
from .probe import probe_scores
from .runtime import SeerRuntime, SeerSettings
from .selection import SelectionPlan, block_candidates, logit_bound_scores, tempered_log_probs

ATTN_NAME = "seer"
# The profiler ranges of `_stage`, in the order a layer runs them.
STAGES = ("gate", "bound", "probe", "oracle", "select", "attention", "ground_truth", "gate_loss", "stats")


def _stage(name: str):
    """The profiler range `seer.<name>` while a profiler runs; nothing otherwise (a range costs several
    microseconds of host time, and a layer has up to nine)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"seer.{name}")
    return contextlib.nullcontext()


def register_seer() -> None:
    """Register the `seer` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, seer_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, seer_mask)


@dataclass(frozen=True)
class Layout:
    """What a forward's candidate blocks depend on; every layer of one forward sees the same.

    Attributes:
        seq_len: Tokens per sequence.
        batch_size: Sequences.
        documents: `id()` of the forward's document-ids tensor (one tensor for all layers), None without one.
        device: Where the attention runs.
    """

    seq_len: int
    batch_size: int
    documents: Optional[int]
    device: torch.device


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
        module: The attention module; must carry `seer_gate` (see `attach.attach_seer_gates`).
        query: post-RoPE `[B, Hq, L, D]`.
        key, value: `[B, Hkv, L, D]`; with a filled KV cache `[B, Hkv, kv, D]` with kv > L, the cache after its
            update (then the queries attend densely to it: `decode.attend_to_cache`).
        attention_mask: document ids `[B, L]` from `seer_mask`, or None (one unpadded document per row); with a
            filled cache transformers' SDPA mask `[B, 1, L, kv]` or None.
        scaling: softmax scale (the module's `scaling`).
        dropout: attention dropout; must be 0 (the block-sparse kernels have none).
        kwargs: other arguments from the modeling code; a non-null `sliding_window` is refused.

    Returns:
        (`[B, L, Hq, D]` attention output, None): attention weights are never materialised.
    """
    gate = _gate_of(module)
    if key.shape[2] != query.shape[2]:
        # A KV cache holds more keys than this call has queries: a decode step (see decode.py).
        return attend_to_cache(module, gate, query, key, value, attention_mask, scaling, dropout, kwargs)
    _check_call(query, key, attention_mask, dropout, kwargs)
    rt: SeerRuntime = gate.runtime
    s = rt.settings
    doc_ids = attention_mask
    valid = split_document_ids(doc_ids) if doc_ids is not None else None
    layout = Layout(query.shape[2], query.shape[0], None if doc_ids is None else id(doc_ids), query.device)
    # Padding before real tokens (left-padded generation) moves behind them, so each prompt gets the blocks it
    # has alone; the output goes back to the original order at the end.
    order, any_padding = _padding(rt, layout, valid)
    if not any_padding:
        valid = None  # every token is real: the gates pool whole blocks without a mask
    if order is not None:
        query, key, value = (_reorder(x, order, dim=2) for x in (query, key, value))
        doc_ids, valid = doc_ids.gather(1, order), valid.gather(1, order)
    candidates = _candidates(rt, layout, doc_ids, valid)
    kernel_args = dict(block_size=s.block_size, document_ids=doc_ids, sm_scale=scaling, kernel=s.kernel)

    if not rt.runs_gates:
        # Exact attention over every candidate block: the dense baseline through the same kernels.
        gate.seer_captured.clear()
        mask = candidates[:, None].expand(query.shape[0], query.shape[1], -1, -1)
        with _stage("attention"):
            out = seer_kernels.block_sparse_attention(query, key, value, mask, **kernel_args)
        return _restore(out, order).transpose(1, 2).contiguous(), None

    q_pre, k_pre, head_shard = _gate_inputs(gate, query)
    compiled = compile_gate_now(s.compile_gate, query)
    if order is not None:
        q_pre, k_pre = _reorder(q_pre, order, dim=1), _reorder(k_pre, order, dim=1)
    layer, state = gate.layer_idx, rt.forward
    # Gradient checkpointing runs a layer a second time during backward: reuse what the first pass chose.
    recomputing = layer in state.passes
    # Detached gate inputs (the default): the gate's graph reaches its own weights only, so its loss's gradient is
    # taken in this forward and nothing of the gate is saved for the model's backward (gate_path.gate_graph).
    own_graph = not (q_pre.requires_grad or k_pre.requires_grad)
    if recomputing and own_graph:
        with _stage("attention"):
            out = _attend_again(rt, layer, query, key, value, kernel_args)
        return _restore(out, order).transpose(1, 2).contiguous(), None
    if rt.keeps_graph:
        state.passes.add(layer)
    loss_graph = rt.keeps_graph and s.compute_loss
    with _gate_context(own_graph, loss_graph), _stage("gate"):
        log_probs = layer_log_probs(
            gate, q_pre, k_pre, valid, candidates, head_shard=head_shard, compiled=compiled, kernel=s.kernel
        )
    rows = state.rows.get(layer) if recomputing else None
    # The gate learns the probe scores of every query block (`ground_truth: probe`): no sample of rows.
    probe_target = s.ground_truth == "probe" and rt.training and rt.sparse
    if s.compute_loss and rt.training and not recomputing and not probe_target:
        nb = num_blocks(layout.seq_len, s.block_size)
        rows = _sample_query_blocks(nb, s.ground_truth_query_fraction, query.device)
        if rt.keeps_graph:
            state.rows[layer] = rows

    block_mask = None
    if rt.sparse:
        block_mask, oracle_truth, probe = _select(
            rt, layer, layout, candidates, log_probs, query, key, kernel_args, bound_inputs=(q_pre, k_pre, valid)
        )
        # A sink block is a column every row keeps: its dK/dV work is cut into segments (one long program else).
        with _stage("attention"):
            out = seer_kernels.block_sparse_attention(
                query, key, value, block_mask, split_long_columns=s.sink_blocks > 0, **kernel_args
            )
        ground_truth = None
        if s.compute_loss:
            with _stage("ground_truth"):
                if probe_target:
                    ground_truth = _probe_ground_truth(
                        rt, layer, probe, query, key, valid, kernel_args, keep=not own_graph
                    )
                else:
                    rows, ground_truth = _sparse_ground_truth(
                        rt, layer, query, key, rows, oracle_truth, kernel_args, keep=not own_graph
                    )
    else:
        # Dense output (gate distillation): the ground truth comes from the same fused forward.
        with _stage("attention"):
            out, ground_truth = seer_kernels.attention_with_ground_truth(
                query, key, value, query_blocks=rows, **kernel_args
            )

    if ground_truth is not None:
        with _gate_context(own_graph, loss_graph), _stage("gate_loss"):
            cand_rows = candidates if rows is None else candidates[:, rows]
            lp_rows = log_probs if rows is None else log_probs[:, :, rows]
            loss = layer_gate_loss(
                lp_rows, ground_truth, cand_rows, kind=s.loss_kind, target_temperature=s.target_temperature,
                compiled=compiled,
            )
            if own_graph and loss_graph:
                loss = loss_with_gradients(loss, list(gate.parameters()))
        # A recomputation (gate inputs not detached) rebuilds the loss's graph for the checkpoint's saved tensors
        # only: the first pass's loss is the one backward runs through, and keeping this one would keep its graph.
        if not recomputing:
            rt.record_loss(layer, loss)
    # A checkpoint recomputation would only overwrite the first pass's statistics with the same values.
    if block_mask is not None and rt.record_stats and not recomputing:
        with _stage("stats"):
            stats = layer_selection_stats(block_mask, candidates, rows, ground_truth, compiled=compiled)
        for name, value in stats.items():
            # Recall against probe scores is not recall against the attention: it gets a name of its own.
            name = f"probe_{name}" if probe_target and name.endswith("recall") else name
            rt.record(f"{name}/{layer}", value)
    return _restore(out, order).transpose(1, 2).contiguous(), None


def _gate_context(own_graph: bool, with_gradient: bool):
    """Where the gate path runs: `gate_path.gate_graph` when its graph reaches the gate's weights only; else as
    the model's own ops (the loss's graph reaches the model's Q/K, so it stays in the model's graph and
    checkpoint)."""
    return gate_graph(with_gradient) if own_graph else contextlib.nullcontext()


def _attend_again(
    rt: SeerRuntime, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_args: dict
) -> torch.Tensor:
    """A checkpoint recomputation's attention output `[B, Hq, L, D]` when the gate saved nothing for backward:
    the same kernel call as the first pass (the checkpoint expects the tensors it saved), over its blocks."""
    s, state = rt.settings, rt.forward
    if rt.sparse:
        block_mask = state.block_mask(layer)
        if rt.record_block_masks:
            rt.block_masks[layer] = block_mask
        return seer_kernels.block_sparse_attention(
            query, key, value, block_mask, split_long_columns=s.sink_blocks > 0, **kernel_args
        )
    rows = state.rows.get(layer)
    return seer_kernels.attention_with_ground_truth(query, key, value, query_blocks=rows, **kernel_args)[0]


def _reorder(x: torch.Tensor, order: torch.Tensor, *, dim: int) -> torch.Tensor:
    """`x` with its token axis `dim` (1 or 2; batch first) permuted per row by `order [B, L]`."""
    shape = [order.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = order.shape[1]
    return x.gather(dim, order.view(shape).expand_as(x))


def _restore(out: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """The attention output `[B, H, L, D]` back in the original token order (undoing `_reorder`)."""
    if order is None:
        return out
    return _reorder(out, torch.argsort(order, dim=-1), dim=2)


# -- step 1: inputs ------------------------------------------------------------------------------------------


def _gate_of(module: nn.Module) -> AttnGate:
    gate: Optional[AttnGate] = getattr(module, "seer_gate", None)
    if gate is None:
        raise RuntimeError(f"{type(module).__name__} has no seer_gate: attach gates with attach_seer_gates(model, ...)")
    return gate


def _check_call(query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float, kwargs: dict) -> None:
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("seer attention does not support sliding-window layers")
    if dropout:
        raise NotImplementedError("seer attention has no attention dropout: set the model's attention_dropout to 0")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"seer attention expects document ids [B, L] as its mask, got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and attention_mask.shape[-1] != query.shape[2]:
        raise NotImplementedError(
            f"seer attention got document ids for {attention_mask.shape[-1]} tokens but attends over {query.shape[2]}"
            " (sequence parallelism with padding or packed documents is not supported)"
        )


def _gate_inputs(gate: AttnGate, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The pre-RoPE q `[B, L, Hq', D]` and k `[B, L, Hkv', D]` the gate's hooks captured for this call, and the
    head shard `(index, count)` they hold (all heads, or this rank's heads under Ulysses sequence parallelism)."""
    q_pre, k_pre = gate.seer_captured.pop("q", None), gate.seer_captured.pop("k", None)
    if q_pre is None or k_pre is None:
        raise RuntimeError(
            f"the gate of layer {gate.layer_idx} received no pre-RoPE q/k: its capture hooks did not run"
        )
    seq_len, heads = query.shape[2], query.shape[1]
    head_shard = (0, 1)
    if q_pre.shape[1] != seq_len:
        # The projections saw this rank's token shard of every head; attention runs on whole sequences of a
        # head shard. The Ulysses adapter moves the gate's inputs the same way.
        from ..ulysses import gate_inputs_for_head_shard

        q_pre, k_pre, head_shard = gate_inputs_for_head_shard(q_pre, k_pre, seq_len)
    if q_pre.shape[1] != seq_len or q_pre.shape[2] != heads:
        raise RuntimeError(
            f"seer gates need the pre-RoPE q of all {seq_len} tokens and {heads} heads, got "
            f"{tuple(q_pre.shape[1:3])} (tokens, heads)"
        )
    return q_pre, k_pre, head_shard


def _lasting_key(kind: str, layout: Layout, *more) -> Optional[tuple]:
    """The `rt.lasting` key of a value of `layout` that every forward would make again, or None (not kept) for a
    layout with documents, whose values follow each forward's document ids. Values made under inference mode are
    kept apart: they cannot be saved for a later training forward's backward."""
    if layout.documents is not None:
        return None
    return (kind, layout, *more, torch.is_inference_mode_enabled())


def _candidates(rt: SeerRuntime, layout: Layout, doc_ids, valid) -> torch.Tensor:
    """bool `[B, nB, nB]` candidate blocks of this forward's layout (computed by its first layer; without
    documents, kept across forwards in `rt.lasting`)."""
    found = rt.forward.candidates.get(layout)
    if found is None:
        found = rt.forward.candidates[layout] = rt.lasting.get_or_make(
            _lasting_key("candidates", layout, rt.settings.block_size),
            lambda: block_candidates(
                layout.seq_len, rt.settings.block_size, doc_ids, valid, batch_size=layout.batch_size,
                device=layout.device,
            ),
        )
    return found


def _padding(rt: SeerRuntime, layout: Layout, valid: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], bool]:
    """`masking.padding_layout` of this forward (the compaction order, and whether any token is padding), decided
    by its first layer: one read from the device per forward, not per layer. Kept beside the forward's
    candidates, under a key of its own."""
    if valid is None:
        return None, False
    key = ("padding", layout)
    if key not in rt.forward.candidates:
        rt.forward.candidates[key] = padding_layout(valid)
    return rt.forward.candidates[key]


def _sample_query_blocks(nb: int, fraction: float, device: torch.device) -> Optional[torch.Tensor]:
    """A random sorted subset of about `fraction * nb` query blocks, int64 `[count]` (None for all).

    Drawn on the device: `torch.randperm` on CUDA draws fewer than 30,000 values on the CPU and copies them over,
    and a copy from pageable host memory waits for the stream, i.e. one host synchronisation per layer.
    """
    if fraction >= 1.0:
        return None
    count = max(1, int(round(fraction * nb)))
    return torch.rand(nb, device=device).topk(count, sorted=False).indices.sort().values


# -- step 3: selection --------------------------------------------------------------------------------------


def _select(
    rt: SeerRuntime,
    layer: int,
    layout: Layout,
    candidates: torch.Tensor,
    log_probs: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_args: dict,
    *,
    bound_inputs: tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(bool `[B, Hq, nB, nB]` block mask, the oracle's ground truth of every row when it ranked the blocks, the
    probe scores when `probe_blocks` computed them).

    `bound_inputs`: the gate's pre-RoPE q, k and the valid tokens, for `settings.bound_blocks`'s logit bounds;
    `settings.probe_blocks`' probe scores read the attention's own post-RoPE `query` `[B, Hq, L, D]` and `key`
    `[B, Hkv, L, D]`, with the valid tokens and `kernel_args`' document ids, softmax scale and kernel."""
    state, s = rt.forward, rt.settings
    if layer in s.oracle_layers and not s.oracle:
        s = dataclasses.replace(s, oracle=True)
    oracle_truth = probe = None
    block_mask = state.block_mask(layer)
    if block_mask is None:
        plan = state.plans.get((layout, s))
        if plan is None:
            # A layout without documents has the same plan at every step: built (and its budget read from the
            # device) once, not per forward.
            plan = state.plans[(layout, s)] = rt.lasting.get_or_make(
                _lasting_key("plan", layout, s), lambda: SelectionPlan.from_settings(candidates, s)
            )
        if s.oracle:
            # Rank by the true pooled attention: log(0) = -inf only ever ranks a block last.
            with _stage("oracle"):
                oracle_truth = seer_kernels.attention_ground_truth(query.detach(), key.detach(), **kernel_args)
            scores = torch.log(oracle_truth)
        else:
            scores = log_probs.detach()
            if s.selection_temperature != 1.0:
                scores = tempered_log_probs(scores, s.selection_temperature)
        bound = None
        if plan.bound_blocks > 0:
            with torch.no_grad(), _stage("bound"):
                bound = logit_bound_scores(*bound_inputs, s.block_size)
        if plan.probe_blocks > 0:
            with _stage("probe"):
                probe = _probe(s, query, key, bound_inputs[2], kernel_args)
        with _stage("select"):
            # Gate log-probs and the log of the row-normalised ground truth are both normalised per row.
            # The fused ranking kernel is opt-in (`kernel: triton`) until the training step has timed it on a GPU.
            ranking = "triton" if s.kernel == "triton" else "pytorch"
            block_mask = plan.select(scores, normalized=True, bound=bound, probe=probe, kernel=ranking)
            if rt.keeps_graph:
                state.keep_block_mask(layer, block_mask)
    if rt.record_block_masks:
        rt.block_masks[layer] = block_mask
    return block_mask, oracle_truth, probe


def _probe(
    s: SeerSettings, query: torch.Tensor, key: torch.Tensor, valid: Optional[torch.Tensor], kernel_args: dict
) -> torch.Tensor:
    """float32 `[B, Hq, nB, nB]`: the probe scores of every query block (`probe.probe_scores`) from the
    attention's post-RoPE `query` `[B, Hq, L, D]` and `key` `[B, Hkv, L, D]`, with `kernel_args`' document ids,
    softmax scale and kernel."""
    return probe_scores(
        query.detach(), key.detach(), block_size=s.block_size, probe_tokens=s.probe_tokens,
        document_ids=kernel_args["document_ids"], valid=valid, sm_scale=kernel_args["sm_scale"],
        kernel=kernel_args["kernel"],
    )


# -- step 5: ground truth for the loss ----------------------------------------------------------------------


def _sparse_ground_truth(
    rt: SeerRuntime,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    rows: Optional[torch.Tensor],
    oracle_truth: Optional[torch.Tensor],
    kernel_args: dict,
    *,
    keep: bool,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(query rows, float32 `[B, Hq, nQ, nB]` ground truth) for the gate loss of a sparse forward.

    The sparse kernel does not produce the dense attention map, so the ground truth is its own pass. With `keep`
    (a loss whose graph a gradient checkpoint recomputes: gate inputs not detached) the recomputation reuses the
    first pass's rows and values instead of paying twice; they are then held until the backward.
    """
    cached = rt.forward.ground_truth.get(layer)
    if cached is not None:
        return cached
    if oracle_truth is not None:
        # The oracle already computed every row of it.
        return rows, (oracle_truth if rows is None else oracle_truth[:, :, rows])
    truth = seer_kernels.attention_ground_truth(query.detach(), key.detach(), query_blocks=rows, **kernel_args)
    if keep and rt.keeps_graph:
        rt.forward.ground_truth[layer] = (rows, truth)
    return rows, truth


def _probe_ground_truth(
    rt: SeerRuntime,
    layer: int,
    probe: Optional[torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    valid: Optional[torch.Tensor],
    kernel_args: dict,
    *,
    keep: bool,
) -> torch.Tensor:
    """float32 `[B, Hq, nB, nB]`: the gate loss's target under `ground_truth: probe`, the probe scores of every
    query block: the selection's own (`probe`) when `probe_blocks` computed them, else computed here. Kept for
    a checkpoint's recomputation under the same condition as `_sparse_ground_truth`'s."""
    cached = rt.forward.ground_truth.get(layer)
    if cached is not None:
        return cached[1]
    truth = probe if probe is not None else _probe(rt.settings, query, key, valid, kernel_args)
    if keep and rt.keeps_graph:
        rt.forward.ground_truth[layer] = (None, truth)
    return truth

