"""The gate's work in each layer, eager or under `torch.compile` (`attention.compile_gate`): its
log-probabilities, its loss, and the statistics of the blocks it selected.

Per layer and forward the gate pools Q and K, projects, rotates and scores the blocks, log-softmaxes the scores
over the candidates and, in training, compares them with the ground truth: a few dozen small operations, each
its own kernel launch (and again in backward and in checkpoint recomputation). At 32k tokens those launches,
not their arithmetic, bound the step. Compiled, they become a few fused kernels. The functions take the weights
as arguments, so one compiled graph serves the gates of every layer (a graph per input shape).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

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
    """`fn` under `torch.compile`, built once per process."""
    return torch.compile(fn)


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
