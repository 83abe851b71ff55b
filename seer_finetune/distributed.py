"""Process groups, DeepSpeed configuration and DeepSpeed-Ulysses sequence parallelism.

Launch with `deepspeed`, `torchrun` or `launch/*.sh`; every process reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment. Ranks are laid out with the sequence-parallel groups innermost: with world size 4 and degree 2,
ranks {0,1} and {2,3} each share one sequence, and ranks {0,2} / {1,3} are data-parallel peers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, SeerConfig


@dataclass
class DistributedContext:
    """Where this process sits.

    Attributes:
        rank, world_size, local_rank: Global rank, world size and rank on this node.
        sp_size, sp_rank: Sequence-parallel degree and this rank's place in its group.
        dp_size, dp_rank: Data-parallel size (world_size / sp_size) and this rank's data shard.
        sp_group: The process group sharing one sequence (None without sequence parallelism).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sp_size: int = 1
    sp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    sp_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def env_world_size() -> int:
    """Processes of the launch, from `WORLD_SIZE` (1 when not launched as a group)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_is_main() -> bool:
    """Whether this process is the launch's main one (global rank 0, from `RANK`), before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def check_parallel_layout(cfg: SeerConfig, world_size: int, num_heads: int, num_kv_heads: int) -> None:
    """Refuse impossible layouts with a clear message before any process group work."""
    sp = cfg.deepspeed.sequence_parallel_size
    if world_size % sp != 0:
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp} does not divide the world size {world_size}")
    if num_heads % sp != 0:
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % sp != 0 and sp % num_kv_heads != 0:
        raise ConfigError(
            f"deepspeed.sequence_parallel_size={sp} and the model's {num_kv_heads} key/value heads: one must divide the other"
        )
    if cfg.data.seq_len % sp != 0:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by deepspeed.sequence_parallel_size={sp}")
    if sp > 1 and cfg.data.attend_within_documents:
        raise ConfigError(
            "data.attend_within_documents with deepspeed.sequence_parallel_size > 1: Ulysses attention keeps no "
            "document masks (it rebuilds a plain causal mask for the gathered sequence)"
        )
    if sp > 1 and cfg.attention.backend == "seer" and num_kv_heads % sp != 0:
        raise ConfigError(
            f"seer gates with deepspeed.sequence_parallel_size={sp} need the model's {num_kv_heads} key/value heads "
            "to split evenly over the sequence-parallel ranks"
        )


def init_distributed(cfg: SeerConfig, device: torch.device) -> DistributedContext:
    """Start the process group (through DeepSpeed's comm layer) and build the sequence-parallel groups.

    A single process without DeepSpeed gets a trivial context and no process group.
    """
    world = env_world_size()
    if not cfg.deepspeed.enabled:
        if world > 1:
            raise ConfigError(
                f"launched with WORLD_SIZE={world} but deepspeed.enabled=false: multi-process training runs through "
                "DeepSpeed (e.g. deepspeed=zero2)"
            )
        return DistributedContext()
    import deepspeed
    import deepspeed.comm as dist

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    sp = cfg.deepspeed.sequence_parallel_size
    if world % sp != 0:
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp} does not divide the world size {world}")
    ctx = DistributedContext(rank=rank, world_size=world, local_rank=local_rank, sp_size=sp, dp_size=world // sp)
    # The same layout as DeepSpeed's sequence-parallel state, which builds the groups themselves when Ulysses
    # is registered (`ulysses.register_ulysses`).
    ctx.sp_rank, ctx.dp_rank = rank % sp, rank // sp
    return ctx


def deepspeed_config(cfg: SeerConfig, ctx: DistributedContext, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's JSON configuration, rendered from the Hydra config (no second copy of any setting)."""
    ds, t = cfg.deepspeed, cfg.trainer
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Keep gathered full parameters for the final save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.sequence_parallel_size > 1:
        # ZeRO's reduce-scatter path averages gradients over every rank, sequence-parallel ranks included;
        # its all-reduce path sums over them as Ulysses needs (each rank holds a share of one sequence's loss).
        # Measured in tests/distributed/test_deepspeed.py (gradient norms against one process).
        zero["reduce_scatter"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * ctx.dp_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Our AdamW (with its parameter groups) is used also with optimizer offload.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    return config


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over a process group, returned (no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, group=group)
    return tensor
