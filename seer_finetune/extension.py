"""The seam through which features beyond plain LM fine-tuning plug into the trainer.

The trainer calls these hooks and knows nothing else about what an extension does. SeerAttention's gates are
the first user (`seer_finetune.seer.build_extension`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class TrainingExtension:
    """Base class: a no-op extension. Subclasses override what they need.

    Attributes:
        lm_loss_weight: Weight of the language-model loss in the total loss (0 when only extra losses train).
        freeze_base: If True the trainer freezes every base-model parameter and applies no LoRA.
    """

    lm_loss_weight: float = 1.0
    freeze_base: bool = False

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups, each a dict with `name`, `params` and optionally `lr`."""
        return []

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Weighted loss terms gathered during the last forward pass; clears them."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Scalars to log for the last step; clears them."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to keep in a training checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the extension's part of the final model folder."""

    def set_training(self, training: bool) -> None:
        """Switch between training and evaluation behaviour (e.g. ground-truth collection)."""
