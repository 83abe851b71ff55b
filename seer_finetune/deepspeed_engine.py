"""The DeepSpeed engine: ZeRO 0-3, CPU offload and DeepSpeed-Ulysses sequence parallelism behind `engine.Engine`.

DeepSpeed's own checkpoint format (one model-state file plus one optimizer shard per rank, written by
`engine.save_checkpoint`) is used under DeepSpeed, because ZeRO partitions optimizer states across ranks and only
DeepSpeed knows how to re-partition them. Per-rank RNG states are added beside them as safetensors. The
`latest` pointer is written last, so a run killed while saving resumes from the previous complete checkpoint.
`python -m seer_finetune export` turns such a checkpoint into the run's final folder (`checkpoint_state_dict`).

A step with a non-finite gradient is skipped by DeepSpeed's own overflow check under ZeRO 1-3 (and bf16); under
ZeRO-0 in fp32, which has none, the engine drops the gradients itself and flags the step as an overflow, so
DeepSpeed leaves the schedule and counts it in `skipped_steps` the same way.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .assembly import build_model, load_full_state
from .checkpoint import CheckpointDamaged, verify_deepspeed_tag
from .config import ConfigError, SeerConfig
from .distributed import DistributedContext, all_reduce_sum, check_parallel_layout, deepspeed_config
from .engine import Engine
from .extensions import TrainingExtension
from .modeling import base_model
from .ulysses import register_ulysses

DS_DIR = "deepspeed"

# Set once this process has destroyed its process group at the end of a run (`DeepSpeedEngine.close`).
_left_process_group = False


def left_process_group() -> bool:
    """Whether this process finished a distributed run and destroyed its process group (see `__main__`)."""
    return _left_process_group


def checkpoint_root(run_dir: Path) -> Path:
    """The folder of a run's DeepSpeed checkpoints (`latest` and one `step_NNNNNN` tag folder each)."""
    return Path(run_dir) / "checkpoints" / DS_DIR


def save_deepspeed_checkpoint(engine, run_dir: Path, step: int, trainer_state: dict[str, Any], ctx: DistributedContext, keep: int) -> Path:
    """Collective: every rank writes its shard of checkpoint `step_NNNNNN`; rank 0 prunes old ones."""
    import deepspeed.comm as dist

    root = checkpoint_root(run_dir)
    tag = f"step_{step:06d}"
    # RNG states first, so `latest` (written by save_checkpoint at its end) never names a tag without them.
    (root / tag).mkdir(parents=True, exist_ok=True)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(root / tag / f"rng_rank{ctx.rank:05d}.safetensors"))
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "trainer": json.dumps(trainer_state)})
    dist.barrier()
    if ctx.is_main:
        # As for one-process checkpoints: rotate among the steps up to this one, never a later one.
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name <= tag)
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load_deepspeed_checkpoint(engine, run_dir: Path, ctx: DistributedContext) -> dict[str, Any] | None:
    """Collective: restore the newest intact checkpoint; None when there is none.

    Tags up to the one `latest` names are tried newest first and each is verified
    (`checkpoint.verify_deepspeed_tag`: every rank's files present and whole) before DeepSpeed reads it. Every rank reads the same folder, so every rank takes the same
    tag. Damaged newer tags are moved to `damaged/` by rank 0, with a one-line warning each.

    Raises:
        ConfigError: tags exist but none is intact (one line listing them).
    """
    import deepspeed.comm as dist

    root = checkpoint_root(run_dir)
    if not (root / "latest").is_file():
        return None
    # `latest` is written last: tags after the one it names are saves a kill interrupted, not checkpoints.
    latest = (root / "latest").read_text().strip()
    tags = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name <= latest), reverse=True
    )
    chosen, damaged = None, []
    for tag in tags:
        try:
            verify_deepspeed_tag(tag, world_size=ctx.world_size)
        except CheckpointDamaged as exc:
            damaged.append((tag, exc))
            continue
        chosen = tag
        break
    if chosen is None:
        if damaged:
            raise ConfigError("no intact DeepSpeed checkpoint to resume from: " + "; ".join(str(e) for _, e in damaged))
        return None
    dist.barrier()  # every rank has read the folders before any of them moves
    if damaged and ctx.is_main:
        aside = root / "damaged"
        aside.mkdir(exist_ok=True)
        for tag, exc in damaged:
            shutil.rmtree(aside / tag.name, ignore_errors=True)
            tag.rename(aside / tag.name)
            print(f"[seer-finetune] warning: {exc}; moved to {aside / tag.name}, resuming from {chosen.name}",
                  file=sys.stderr, flush=True)
    dist.barrier()
    path, client = engine.load_checkpoint(str(root), tag=chosen.name)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {chosen}")
    # (DeepSpeed returns the path of the model-states file; the RNG files sit beside it in the tag folder.)
    rng = load_file(str(chosen / f"rng_rank{ctx.rank:05d}.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return {"step": client["step"], "trainer": json.loads(client["trainer"])}


def consolidated_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Collective: full (unpartitioned) parameters of the engine's module, returned on rank 0 (CPU copies)."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu().clone() for k, v in (state or {}).items()}
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def checkpoint_state_dict(checkpoint_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights reassembled from a DeepSpeed checkpoint folder (any ZeRO stage), on CPU, no process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def _skipping_step(optimizer: torch.optim.Optimizer):
    """`optimizer.step`, made to do nothing while `optimizer.overflow` is set (DeepSpeed calls it regardless)."""
    step = optimizer.step

    def guarded(*args, **kwargs):
        if optimizer.overflow:
            return None
        return step(*args, **kwargs)

    return guarded


class DeepSpeedEngine(Engine):
    """The trainer's optimizer, schedule and model handed to `deepspeed.initialize`.

    Args:
        model: The model built by `assembly.build_model`; the trainer keeps running forward on it.
        optimizer: Its optimizer (named parameter groups), wrapped by DeepSpeed.
        scheduler: The learning-rate schedule, stepped by DeepSpeed at each accumulation boundary.
        cfg: The run configuration (`deepspeed` section, batch sizes, clipping).
        ctx: This process's place; its sequence-parallel group is filled in here under Ulysses.

    Raises:
        ConfigError: for a process layout the model's heads or the sequence length cannot split into.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: SeerConfig, ctx: DistributedContext):
        import deepspeed

        text = base_model(model).config.get_text_config()
        check_parallel_layout(cfg, ctx.world_size, text.num_attention_heads, text.num_key_value_heads)
        mpu = None
        if ctx.sp_size > 1:
            mpu = register_ulysses(model, cfg)
            ctx.sp_group = mpu.get_sequence_parallel_group()
            assert mpu.get_sequence_parallel_rank() == ctx.sp_rank
        dtype = next(model.parameters()).dtype
        self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, ctx, dtype),
            mpu=mpu,
        )
        self.model = model
        self.cfg = cfg
        self.ctx = ctx
        # ZeRO-0 in fp32 hands our optimizer to DeepSpeed as it is, with no overflow check of its own.
        self._guard_here = self.ds_engine.optimizer is optimizer
        if self._guard_here:
            optimizer.overflow = False
            optimizer.step = _skipping_step(optimizer)
        self._loss_finite: Optional[torch.Tensor] = None
        self._skipped_seen = self.ds_engine.skipped_steps
        # fp16's dynamic loss scale skips steps whose scaled gradients overflow while it calibrates.
        self.loss_scaling = bool(self.ds_engine.fp16_enabled())
        self.layout = (
            f", {ctx.world_size} processes (data x sequence parallel = {ctx.dp_size} x {ctx.sp_size}), "
            f"ZeRO-{cfg.deepspeed.zero_stage}"
        )

    def backward(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        boundary = self.ds_engine.is_gradient_accumulation_boundary()
        self.ds_engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if boundary and self._guard_here:
            self._skip_nonfinite_update()
        # DeepSpeed counts micro-batches in `step`, and steps optimizer and scheduler only at the boundary.
        self.ds_engine.step()

    def _skip_nonfinite_update(self) -> None:
        """ZeRO-0 fp32: for a step whose loss or gradients are not finite on any process, zero the gradients
        (DeepSpeed still clips them) and flag the optimizer the way DeepSpeed's own optimizers report an overflow
        (`overflow`): its step does nothing, and DeepSpeed leaves the schedule and counts the step as skipped."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        ok = ok & self._loss_finite.to(ok.device)
        bad = (~ok).to(torch.float32).reshape(1).to(self._flag_device())
        all_reduce_sum(bad, None)
        overflow = bool(bad.item() > 0)
        if overflow:
            for g in grads:
                g.zero_()
        self.ds_engine.optimizer.overflow = overflow

    def _flag_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def step(self) -> tuple[torch.Tensor, bool]:
        self._loss_finite = None
        skipped = self.ds_engine.skipped_steps
        applied = skipped == self._skipped_seen
        self._skipped_seen = skipped
        grad_norm = self.ds_engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = float("nan") if applied else float("inf")
        return torch.tensor(float(grad_norm), dtype=torch.float64), applied

    def weights_finite(self) -> bool:
        # Under ZeRO-3 each process holds a partition of every parameter (`ds_tensor`); the verdict is summed.
        flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all() for p in self.model.parameters() if p.requires_grad]
        bad = (~torch.stack(flags).all()).to(torch.float32).reshape(1).to(self._flag_device())
        all_reduce_sum(bad, None)
        return bool(bad.item() == 0)

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g}

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, run_dir: Path, step: int, trainer_state: dict[str, Any], extension: TrainingExtension, keep: int) -> Path:
        # The extension's parameters are the module's, inside DeepSpeed's model states.
        return save_deepspeed_checkpoint(self.ds_engine, run_dir, step, trainer_state, self.ctx, keep=keep)

    def load_checkpoint(self, run_dir: Path, extension: TrainingExtension, resume: bool) -> Optional[dict[str, Any]]:
        state = load_deepspeed_checkpoint(self.ds_engine, run_dir, self.ctx) if resume else None
        self._skipped_seen = self.ds_engine.skipped_steps
        return state

    def final_model(self, extension: TrainingExtension) -> Optional[tuple[torch.nn.Module, TrainingExtension]]:
        """Gathers the full weights (collective) into a plain copy built on the CPU by rank 0."""
        state = consolidated_state_dict(self.ds_engine, self.cfg.deepspeed.zero_stage)
        if not self.ctx.is_main:
            return None
        model, plain_extension = build_model(self.cfg, torch.device("cpu"))
        load_full_state(model, state)
        return model, plain_extension

    def close(self) -> None:
        if self.ctx.distributed:
            # Every rank leaves together: a rank exiting while rank 0 still writes tears down the comm layer.
            torch.distributed.barrier()
            self.ds_engine.destroy()
            torch.distributed.destroy_process_group()
            global _left_process_group
            _left_process_group = True
