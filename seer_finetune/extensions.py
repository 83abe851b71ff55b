"""The seam through which features beyond plain LM fine-tuning plug into the trainer, and their registry.

The trainer calls the `TrainingExtension` hooks and knows nothing else about what an extension does. Which
extension a run gets follows from `attention.backend`: a plug-in registers a factory for its backend with
`register_extension`, and `build_extension` looks it up. The built-in plug-ins are named here as module paths
and imported on their first lookup, so importing the core never imports a plug-in package (the plug-in imports
the core to subclass `TrainingExtension`; a static import back would make the two depend on each other).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError, SeerConfig


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

    def begin_graph_records(self) -> Any:
        """A marker of what `metrics` holds now, before a CUDA graph's warm-up and capture
        (`graphed_step.GraphedForwardBackward`)."""
        return None

    def end_graph_records(self, marker: Any) -> Any:
        """Take out what the forwards since `marker` recorded for `metrics` (a warm-up's, a capture's) and return
        the last forward's records (the capture's, whose tensors each replay fills), with anything the captured
        kernels read that a later forward could free: the graph holds the result as long as it lives."""
        return None

    def replay_graph_records(self, records: Any) -> None:
        """Record `records` (from `end_graph_records`) again, as one more forward's: after each replay."""


ExtensionFactory = Callable[[torch.nn.Module, SeerConfig], TrainingExtension]

# transformers' own attention implementations: plain fine-tuning, no extension.
PLAIN_BACKENDS = ("sdpa", "eager")
# Plug-ins shipped with the package: backend -> module that registers its factory when imported.
BUILTIN_PLUGINS = {"seer": "seer_finetune.seer.plugin"}

_factories: dict[str, ExtensionFactory] = {}


def register_extension(attention_backend: str, factory: ExtensionFactory) -> None:
    """Make `build_extension` call `factory(model, cfg)` for runs with `attention.backend == attention_backend`.

    Args:
        attention_backend: The `attention.backend` value the factory serves.
        factory: Attaches whatever the backend needs to a loaded model and returns its `TrainingExtension`.
    """
    _factories[attention_backend] = factory


def build_extension(model: torch.nn.Module, cfg: SeerConfig) -> TrainingExtension:
    """The extension for `cfg.attention.backend`, attached to `model` (before LoRA wrapping).

    Args:
        model: The loaded causal LM.
        cfg: The run configuration.

    Returns:
        A no-op `TrainingExtension` for `sdpa` and `eager`, else what the backend's registered factory returns.

    Raises:
        ConfigError: when no factory is registered for the backend.
    """
    backend = cfg.attention.backend
    if backend in PLAIN_BACKENDS:
        return TrainingExtension()
    if backend not in _factories and backend in BUILTIN_PLUGINS:
        importlib.import_module(BUILTIN_PLUGINS[backend])
    factory = _factories.get(backend)
    if factory is None:
        known = sorted({*PLAIN_BACKENDS, *BUILTIN_PLUGINS, *_factories})
        raise ConfigError(f"attention.backend={backend!r} has no registered extension (available: {', '.join(known)})")
    return factory(model, cfg)
