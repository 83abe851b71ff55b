"""How gradients become optimizer steps, checkpoints and the final weights: the trainer's engine strategy.

The trainer's loop is written once against `Engine`. `PlainEngine` runs one process with torch's autograd,
AdamW and the LambdaLR schedule, and checkpoints in `checkpoint.py`'s format; `deepspeed_engine.DeepSpeedEngine`
hands the same work to DeepSpeed (ZeRO 0-3, offload, Ulysses sequence parallelism).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import clean_partial, list_checkpoints, load_checkpoint, save_checkpoint
from .config import SeerConfig
from .extensions import TrainingExtension


class Engine(ABC):
    """What the trainer needs from the machinery that applies gradients.

    Attributes:
        model: The module the trainer runs forward on (under DeepSpeed the module the engine wraps).
        layout: Words about the process layout for the run's first line ("" for one process).
    """

    model: torch.nn.Module
    layout: str = ""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (0-dim, not yet divided by the accumulation steps)."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """End an optimizer step after `grad_accum_steps` calls of `backward`.

        Returns:
            The global gradient norm before clipping (0-dim float tensor; NaN where the engine reports none).
        """

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

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def step(self) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

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
        checkpoints = list_checkpoints(run_dir) if resume else []
        if not checkpoints:
            return None
        state, extension_state = load_checkpoint(checkpoints[-1], model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if extension_state:
            extension.load_state_dict(extension_state)
        return state

    def final_model(self, extension: TrainingExtension) -> tuple[torch.nn.Module, TrainingExtension]:
        return self.model, extension
