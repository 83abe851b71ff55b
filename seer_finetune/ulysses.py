"""DeepSpeed-Ulysses sequence parallelism: wrapping the model's attention, and the seer gates' inputs.

Under Ulysses each rank holds L / P tokens of every sequence; before attention an all-to-all gives it all L
tokens of H / P heads, so attention (and SeerAttention's gates, ground truth and block-sparse kernels, which
work per head) run unchanged on full sequences; a second all-to-all returns the output to the token shards.
The gates' inputs are captured earlier, at the projections, where the rank still holds its token shard of every
head: the same all-to-all regroups them.
"""

from __future__ import annotations

import torch

from .config import ConfigError, SeerConfig


def register_ulysses(model: torch.nn.Module, cfg: SeerConfig):
    """Wrap the model's attention implementation in DeepSpeed-Ulysses all-to-alls.

    Args:
        model: The model (peft-wrapped or not) whose attention implementation is wrapped.
        cfg: The run configuration (sequence-parallel degree, micro-batch size, sequence length).

    Returns:
        DeepSpeed's mpu (the sequence-parallel groups), for `deepspeed.initialize`.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = model.config
    implementation = config._attn_implementation
    if implementation == "eager":
        raise ConfigError("Ulysses sequence parallelism needs attention.backend=sdpa or seer, not eager")
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=implementation,
        sequence_parallel_size=cfg.deepspeed.sequence_parallel_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        seq_length=cfg.data.seq_len,
        seq_length_is_variable=True,
    )


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
