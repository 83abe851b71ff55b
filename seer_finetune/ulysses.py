"""DeepSpeed-Ulysses sequence parallelism for the seer attention: the gate's inputs follow the attention's.

Under Ulysses each rank holds L / P tokens of every sequence; before attention an all-to-all gives it all L
tokens of H / P heads, so attention (and the gates, ground truth and block-sparse kernels, which work per head)
run unchanged on full sequences. The gate's inputs are captured earlier, at the projections, where the rank
still holds its token shard of every head: the same all-to-all regroups them.
"""

from __future__ import annotations

import torch


def gate_inputs_for_head_shard(
    q_pre: torch.Tensor, k_pre: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Move the gate's captured inputs the way the attention inputs were moved.

    Args:
        q_pre: This rank's token shard of every query head, `[B, L/P, Hq, D]`.
        k_pre: The same for the keys, `[B, L/P, Hkv, D]`.
        seq_len: L, the full sequence length attention runs over.

    Returns:
        (q `[B, L, Hq/P, D]`, k `[B, L, Hkv/P, D]`, (sequence-parallel rank, degree)): whole sequences of exactly
        the heads this rank attends with.
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
