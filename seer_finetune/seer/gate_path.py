"""The gate's work in each layer, eager or under `torch.compile` (`attention.compile_gate`): its
log-probabilities, its loss, and the statistics of the blocks it selected.

Per layer and forward the gate pools Q and K, projects, rotates and scores the blocks, log-softmaxes the scores
over the candidates and, in training, compares them with the ground truth: a few dozen small operations, each
its own kernel launch (and again in backward). At 32k tokens those launches, not their arithmetic, bound the
step. Compiled, they become a few fused kernels. The functions take the weights as arguments, so one compiled
graph serves the gates of every layer (a graph per input shape, `_compiled`).

With detached gate inputs the loss reaches the gate's own weights only, so its gradient can be taken in the
layer's forward (`gate_graph`, `loss_with_gradients`): backward then keeps the weights' gradients (the size of the
weights) instead of the loss's graph, whose float32 `[B, Hq, nB, nB]` log-probabilities and `[B, Hq, nQ, nB]`
ground truth would otherwise be kept (or, under gradient checkpointing, cached and recomputed) for every layer.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, Sequence

import torch

from .gate import AttnGate, block_scores
from .selection import block_recall, density_per_head, gate_log_probs, gate_loss


def block_log_probs(candidates: torch.Tensor, *operands: Optional[torch.Tensor], **shape) -> torch.Tensor:
    """`gate.block_scores(*operands, candidates=candidates, **shape)` log-softmaxed over the candidate blocks
    (`selection.gate_log_probs`).

    Returns:
        float32 `[B, Hq, nB, nB]`, -inf outside `candidates` (bool `[B, nB, nB]`).
    """
    return gate_log_probs(block_scores(*operands, candidates=candidates, **shape), candidates)


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """`fn` under `torch.compile`, built once per process, with static shapes: one graph per input shape (a run
    sees few: its training length and, in the same process, a gate-only stage's; evaluation runs eager). Left to
    itself, dynamo makes every shape symbolic at the second one it sees, and Inductor (torch 2.11) fails to
    compile the token-scored gate's backward with symbolic shapes."""
    return torch.compile(fn, dynamic=False)


def compile_gate_now(setting: Optional[bool], like: torch.Tensor) -> bool:
    """Whether this forward runs the compiled gate path: `setting` when given (`attention.compile_gate`), else
    (None, the default) when `like` is on CUDA and autograd is recording: training steps and their checkpoint
    recomputation, where the eager path's launches bound the step. Evaluation, prefill and CPU runs stay eager,
    so an interactive prompt never waits for a compilation."""
    if setting is not None:
        return bool(setting)
    return like.is_cuda and torch.is_grad_enabled()


def _run(fn: Callable, compiled: bool) -> Callable:
    """`fn`, or its compiled graph when `compiled`."""
    return _compiled(fn) if compiled else fn


def layer_log_probs(
    gate: AttnGate,
    q: torch.Tensor,
    k: torch.Tensor,
    valid: Optional[torch.Tensor],
    candidates: torch.Tensor,
    *,
    head_shard: tuple[int, int] = (0, 1),
    compiled: bool = False,
    kernel: str = "auto",
) -> torch.Tensor:
    """The gate's log-probabilities over key blocks for one layer's pre-RoPE `q [B, L, Hq', D]` and
    `k [B, L, Hkv', D]` (see `AttnGate.forward` for `valid` and `head_shard`).

    Args:
        compiled: Run the compiled graph (`torch.compile` of `block_log_probs`). Default False (eager).
        kernel: `attention.kernel`, for the token modes' gradient-free scores (`gate.block_scores`). Default
            `auto`.

    Returns:
        float32 `[B, Hq', nB, nB]`, -inf outside `candidates`.
    """
    q_weight, k_weight, cos, sin = gate.operands(q, k, head_shard)
    return _run(block_log_probs, compiled)(
        candidates, q, k, q_weight, k_weight, cos, sin, valid, kernel=kernel, **gate.shape_kwargs
    )


def layer_gate_loss(
    log_probs: torch.Tensor,
    ground_truth: torch.Tensor,
    candidates: torch.Tensor,
    *,
    kind: str = "kl",
    target_temperature: float = 1.0,
    compiled: bool = False,
) -> torch.Tensor:
    """`selection.gate_loss`, compiled when `compiled` (same arguments)."""
    return _run(gate_loss, compiled)(
        log_probs, ground_truth, candidates, kind=kind, target_temperature=target_temperature
    )


def selection_stats(
    block_mask: torch.Tensor,
    candidates: torch.Tensor,
    rows: Optional[torch.Tensor],
    ground_truth: Optional[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """What a layer records of its selection: `density` (kept share of the candidates, 0-dim), `density_heads`
    (per head, `[H]`) and, with a ground truth, `recall` and `oracle_recall` (`selection.block_recall`).

    Args:
        block_mask: bool `[B, H, nB, nB]`.
        candidates: bool `[B, nB, nB]`.
        rows: the query blocks the ground truth covers (None: all).
        ground_truth: optional float32 `[B, H, nQ, nB]`.
    """
    per_head = density_per_head(block_mask, candidates)
    # Every head has the same candidates, so the layer's share is the mean of the heads' (one pass, not two).
    stats = {"density": per_head.mean(), "density_heads": per_head}
    if ground_truth is not None:
        stats["recall"], stats["oracle_recall"] = block_recall(
            block_mask if rows is None else block_mask[:, :, rows], ground_truth
        )
    return stats


def layer_selection_stats(
    block_mask: torch.Tensor,
    candidates: torch.Tensor,
    rows: Optional[torch.Tensor],
    ground_truth: Optional[torch.Tensor],
    *,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """`selection_stats`, compiled when `compiled` (same arguments)."""
    return _run(selection_stats, compiled)(block_mask, candidates, rows, ground_truth)


@contextlib.contextmanager
def gate_graph(with_gradient: bool) -> Iterator[None]:
    """Where the gate path of a layer with detached inputs runs (its log-probabilities, its loss and
    `loss_with_gradients`).

    With `with_gradient`, tensors saved for the gate's backward are kept as they are, not handed to the hooks of
    an enclosing gradient checkpoint: the graph is differentiated and freed within the forward, and a
    recomputation skips it. Without, the path runs without a graph.
    """
    if not with_gradient:
        with torch.no_grad():
            yield
        return
    # Only the innermost pair of hooks applies. Identity hooks keep tensors an op saves of its own output in a
    # reference cycle until that op's backward runs; `loss_with_gradients` runs every op of the graph.
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        yield


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def loss_with_gradients(loss: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """`loss` whose gradient w.r.t. `weights` (the leaves its graph reaches, all of them) is taken now; inside
    `gate_graph(True)`.

    Args:
        loss: 0-dim float32, with a graph reaching no leaf outside `weights`.
        weights: The gate's parameters.

    Returns:
        A 0-dim tensor equal to `loss` whose backward adds `incoming * d loss / d weight` to each weight (the
        gradient autograd gives, up to the float32 rounding of applying the incoming factor last: exactly the same
        when it is a power of two, e.g. 1). Its graph keeps only those gradients.
    """
    if not loss.requires_grad:
        return loss
    weights = [w for w in weights if w.requires_grad]
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    grads = tuple(torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads))
    return _PrecomputedGradients.apply(loss.detach(), grads, *weights)


class _PrecomputedGradients(torch.autograd.Function):
    """forward(value, gradients, *weights) -> a copy of `value`; backward: each weight's gradient times the
    incoming one."""

    @staticmethod
    def forward(ctx, value, grads, *weights):
        ctx.save_for_backward(*grads)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(grad * g for g in ctx.saved_tensors))
