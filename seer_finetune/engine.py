"""How gradients become optimizer steps, checkpoints and the final weights: the trainer's engine strategy, with
the optimizer and learning-rate schedule it steps (`build_optimizer`, `lr_lambda`).

The trainer's loop is written once against `Engine`. `PlainEngine` runs one process with torch's autograd,
AdamW and the LambdaLR schedule, and checkpoints in `checkpoint.py`'s format; `deepspeed_engine.DeepSpeedEngine`
hands the same work to DeepSpeed (ZeRO 0-3, offload, Ulysses sequence parallelism).

Both skip the update of a step whose loss or gradient norm is not finite: no parameter, optimizer state or
schedule position changes, the gradients are dropped, and `step` says so. The schedule then stays where it was,
as DeepSpeed's own overflow handling leaves it, so both engines count positions in applied updates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import clean_partial, resume_from_newest_intact, save_checkpoint
from .config import SeerConfig
from .extensions import TrainingExtension


class Engine(ABC):
    """What the trainer needs from the machinery that applies gradients.

    Attributes:
        model: The module the trainer runs forward on (under DeepSpeed the module the engine wraps).
        scheduler: The LambdaLR schedule over the optimizer's groups (the trainer re-applies configured
            learning rates through it after a resume).
        layout: Words about the process layout for the run's first line ("" for one process).
        loss_scaling: Updates are also skipped by a dynamic loss scale (DeepSpeed fp16): a skipped update with a
            finite loss is the scale calibrating, not a sign of divergence.
    """

    model: torch.nn.Module
    scheduler: torch.optim.lr_scheduler.LambdaLR
    layout: str = ""
    loss_scaling: bool = False

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (0-dim, not yet divided by the accumulation steps)."""

    @abstractmethod
    def step(self) -> tuple[torch.Tensor, bool]:
        """End an optimizer step after `grad_accum_steps` calls of `backward`.

        A micro-batch loss or a gradient norm that is NaN or inf skips the update: parameters, optimizer state
        and schedule stay as they were and the gradients are dropped. Every process reaches the same decision.

        Returns:
            `(grad_norm, applied)`: the global gradient norm before clipping (0-dim float tensor; NaN where the
            engine reports none, inf where DeepSpeed found an overflow) and whether the update was applied.
        """

    @abstractmethod
    def weights_finite(self) -> bool:
        """Whether every trainable parameter is finite (collective under DeepSpeed: the same answer everywhere)."""

    @abstractmethod
    def learning_rates(self) -> dict[str, float]:
        """`{"lr/<group name>": lr}` for the named parameter groups, as the next step will use them."""

    @abstractmethod
    def last_lr(self) -> float:
        """The first parameter group's learning rate after the last scheduler step (progress bar)."""

    @abstractmethod
    def save_checkpoint(self, run_dir: Path, step: int, trainer_state: dict[str, Any], extension: TrainingExtension, keep: int) -> Path:
        """Write checkpoint `step` under `run_dir/checkpoints`, keeping the newest `keep`; returns its folder.

        Collective under DeepSpeed: every rank calls it.
        """

    @abstractmethod
    def load_checkpoint(self, run_dir: Path, extension: TrainingExtension, resume: bool) -> Optional[dict[str, Any]]:
        """Restore the newest complete checkpoint of `run_dir` when `resume` is set.

        Returns:
            `{"step": int, "trainer": trainer state}`, or None when nothing was restored.
        """

    @abstractmethod
    def final_model(self, extension: TrainingExtension) -> Optional[tuple[torch.nn.Module, TrainingExtension]]:
        """The trained model whole on this process, with its extension, for the final save.

        Collective under DeepSpeed (weights are gathered); None on the ranks that do not write.
        """

    def close(self) -> None:
        """Release what the engine holds (process groups); the last call of a run."""


# Optimizer group settings a resume takes from the configuration rather than from the checkpoint.
GROUP_SETTINGS = ("weight_decay", "betas", "eps")


# Parameters whose name holds one of these take no weight decay (besides every parameter of fewer than 2 dims).
NO_DECAY_HINTS = ("bias", "norm", "embed")


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    After warmup this is transformers' cosine-with-floor, linear and constant schedule
    (`get_cosine_with_min_lr_schedule_with_warmup` and its kin; tests/test_dashboards.py compares them step by
    step). It is kept rather than taken from there for two differences: warmup's first step already trains at
    1/warmup of the peak (transformers' starts at 0, so the first update is lost), and the linear decay ends at
    `min_ratio` (transformers' ends at 0). It is a plain function of the step, so a resumed run and one with a
    changed peak rate (`engine.restore_configured_settings`) get exactly the values an uninterrupted run gets.

    Args:
        step: The optimizer step.
        warmup: Steps of linear warmup from 0.
        total: The run's optimizer steps.
        schedule: `cosine`, `linear` or `constant` after warmup.
        min_ratio: The multiplier reached at `total` (cosine and linear).

    Returns:
        The multiplier in [0, 1].
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, extension: TrainingExtension, cfg: SeerConfig, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (no decay on biases, norms, embeddings) and the extension's groups.

    Args:
        model: The model built by `assembly.build_model`.
        extension: Its extension; its groups keep their own learning rate (default `optim.gate_lr`).
        cfg: The run configuration (`optim` section).
        fused: PyTorch's fused AdamW (one kernel per device and dtype instead of a dozen per group, and an update
            the device can skip by itself: `PlainEngine.step`), as Hugging Face Trainer's default `adamw_torch_fused`.
            Default False (PyTorch's choice, `foreach` on CUDA).

    Returns:
        The optimizer, its groups named `model_decay`, `model_no_decay` and the extension's names.
    """
    ext_groups = extension.param_groups()
    ext_ids = {id(p) for g in ext_groups for p in g["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in ext_ids:
            continue
        (no_decay if p.ndim < 2 or any(h in name.lower() for h in NO_DECAY_HINTS) else decay).append(p)
    o = cfg.optim
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"name": "model_decay", "params": decay, "lr": o.lr, "weight_decay": o.weight_decay})
    if no_decay:
        groups.append({"name": "model_no_decay", "params": no_decay, "lr": o.lr, "weight_decay": 0.0})
    for g in ext_groups:
        groups.append({"weight_decay": 0.0, **g, "lr": g.get("lr", o.gate_lr if o.gate_lr is not None else o.lr)})
    if not any(g["params"] for g in groups):
        raise RuntimeError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True if fused else None)


def configured_settings(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[dict[str, Any]]:
    """Each group's configured peak learning rate and `GROUP_SETTINGS`, taken before a checkpoint overwrites them.

    Args:
        scheduler: The run's schedule, as built from the configuration (not yet loaded).

    Returns:
        One dict per parameter group, in group order.
    """
    return [{"initial_lr": g["initial_lr"], **{k: g[k] for k in GROUP_SETTINGS}} for g in scheduler.optimizer.param_groups]


def restore_configured_settings(scheduler: torch.optim.lr_scheduler.LambdaLR, settings: Sequence[dict[str, Any]]) -> None:
    """Put `configured_settings` back after a checkpoint was loaded, so changed settings apply on resume.

    The peak rates go into the groups' `initial_lr` and the schedule's `base_lrs`, and each group's current rate
    becomes the peak times the schedule's multiplier at the restored position (the schedule's function comes
    from the configuration, so a changed warmup, schedule or max_steps applies too). A value the checkpoint
    already holds is left untouched, which keeps an unchanged resume bit for bit the same.

    Args:
        scheduler: The run's schedule, after its state and its optimizer's were loaded.
        settings: What `configured_settings` returned before loading.
    """
    groups = scheduler.optimizer.param_groups
    for index, (group, wanted) in enumerate(zip(groups, settings)):
        for key in GROUP_SETTINGS:
            if group[key] != wanted[key]:
                group[key] = wanted[key]
        group["initial_lr"] = scheduler.base_lrs[index] = wanted["initial_lr"]
        lr = wanted["initial_lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)
        if group["lr"] != lr:
            group["lr"] = lr
    scheduler._last_lr = [g["lr"] for g in groups]


class PlainEngine(Engine):
    """One process: `loss.backward()`, gradient clipping, AdamW and the LambdaLR schedule.

    Args:
        model: The model built by `assembly.build_model`.
        optimizer: Its optimizer (named parameter groups).
        scheduler: The learning-rate schedule over `optimizer`.
        cfg: The run configuration (accumulation steps, clipping).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: SeerConfig):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_accum_steps = cfg.trainer.grad_accum_steps
        self.max_grad_norm = cfg.optim.max_grad_norm
        self._loss_finite: Optional[torch.Tensor] = None  # over this step's micro-batches so far
        # Gradients zeroed in place after each step instead of freed: a CUDA graph replays its backward into the
        # same tensors (`graphed_step.GraphedForwardBackward` sets it).
        self.keep_gradients = False

    def backward(self, loss: torch.Tensor) -> None:
        self.note_loss(loss)
        self.scaled_backward(loss)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Count a micro-batch's loss into the step's finiteness check (on the device; read at `step`)."""
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def scaled_backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's share of the step's loss."""
        (loss / self.grad_accum_steps).backward()

    def step(self) -> tuple[torch.Tensor, bool]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        finite = torch.isfinite(grad_norm)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite
        self._loss_finite = None
        skips_on_device = all(g.get("fused") for g in self.optimizer.param_groups)
        if skips_on_device:
            # The fused kernel skips the update itself where `found_inf` is 1 (and leaves the step count), so the
            # update is queued before anything is read back: the host's wait for the device ends after it, not
            # before its launches. A checkpoint from before `fused` steps after the read-back instead.
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        applied = bool(finite)
        if applied:
            if not skips_on_device:
                self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.keep_gradients)
        return grad_norm, applied

    def weights_finite(self) -> bool:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g}

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, run_dir: Path, step: int, trainer_state: dict[str, Any], extension: TrainingExtension, keep: int) -> Path:
        return save_checkpoint(
            run_dir,
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extension_state=extension.state_dict(),
            trainer_state=trainer_state,
            keep=keep,
        )

    def load_checkpoint(self, run_dir: Path, extension: TrainingExtension, resume: bool) -> Optional[dict[str, Any]]:
        clean_partial(run_dir)
        if not resume:
            return None
        # The newest checkpoint that passes verification; damaged newer ones are moved aside with a warning.
        restored = resume_from_newest_intact(
            run_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            extension_state=extension.state_dict(),
        )
        if restored is None:
            return None
        state, extension_state = restored
        if extension_state:
            extension.load_state_dict(extension_state)
        return state

    def final_model(self, extension: TrainingExtension) -> tuple[torch.nn.Module, TrainingExtension]:
        return self.model, extension
