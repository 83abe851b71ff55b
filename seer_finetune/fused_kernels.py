"""Fused kernels for the work outside attention: Liger-Kernel's RMSNorm, SwiGLU and RoPE (`model.fused_kernels`).

At long context the model's elementwise work (norms, the gated MLP's activation, rotary embeddings) is a large
share of a training step and of a prefill, for dense and sparse attention alike. Liger-Kernel replaces each with
one Triton kernel through its own patching entry point, which knows the modeling code of each architecture it
supports; this module only decides whether to call it and says clearly when it cannot. The kernels run on CUDA
only, so a CPU run keeps transformers' own modules.

The patch is applied to a model instance: its norm and MLP modules get Liger's forwards. Liger patches rotary
embeddings at the level of transformers' modeling module, so once a model of one type is patched in a process,
later models of that type use Liger's RoPE too (numerically the same rotation).

The fused loss is separate (`trainer.lm_loss`, `lm_loss.py`).
"""

from __future__ import annotations

import torch

from .config import FUSED_KERNEL_CHOICES, ConfigError
from .lm_loss import liger_installed


def liger_model_types() -> frozenset[str]:
    """The `config.model_type`s Liger-Kernel can patch on an instance (empty when it is not installed)."""
    if not liger_installed():
        return frozenset()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def choose_fused_kernels(setting: str, *, device_type: str, model_type: str) -> str:
    """Which fused kernels a model gets: `liger` or `none`.

    Args:
        setting: `model.fused_kernels` (`auto`, `liger` or `none`).
        device_type: Where the model runs (`cuda`, `cpu`).
        model_type: The model's `config.model_type` (e.g. `llama`, `qwen2`).

    Raises:
        ConfigError: for `liger` where it cannot run (not installed, an architecture Liger does not patch, or not
            on CUDA).
    """
    if setting not in FUSED_KERNEL_CHOICES:
        raise ConfigError(f"model.fused_kernels={setting!r}: choose one of {', '.join(FUSED_KERNEL_CHOICES)}")
    if setting == "none":
        return "none"
    why = None
    if not liger_installed():
        why = "Liger-Kernel is not installed (pip install liger-kernel)"
    elif device_type != "cuda":
        # Not even under the Triton interpreter: its RMSNorm kernel does not run there (triton 3.x).
        why = "its kernels need CUDA"
    elif model_type not in liger_model_types():
        why = f"Liger-Kernel does not patch {model_type!r} models"
    if why is None:
        return "liger"
    if setting == "liger":
        raise ConfigError(f"model.fused_kernels=liger: {why}; use model.fused_kernels=none")
    return "none"


def apply_fused_kernels(model: torch.nn.Module, setting: str, device: torch.device) -> str:
    """Give `model` Liger-Kernel's RMSNorm, SwiGLU and RoPE where `setting` asks for them (`choose_fused_kernels`).

    Call it on the transformers model itself, before peft wraps it (Liger finds the layers under
    `model.model`); LoRA layers added afterwards run inside the patched MLP forward unchanged.

    Args:
        model: A transformers causal LM.
        setting: `model.fused_kernels`.
        device: Where the model runs.

    Returns:
        `liger` or `none`: what the model runs.
    """
    model_type = getattr(model.config, "model_type", "")
    chosen = choose_fused_kernels(setting, device_type=device.type, model_type=model_type)
    if chosen == "liger":
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        # The loss kernels stay off here: the trainer computes the loss itself (`trainer.lm_loss`).
        _apply_liger_kernel_to_instance(
            model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    return chosen
