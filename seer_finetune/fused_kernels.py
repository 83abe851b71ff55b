"""Fused kernels for the work outside attention: Liger-Kernel's RMSNorm, SwiGLU and RoPE (`model.fused_kernels`).

At long context the model's elementwise work (norms, the gated MLP's activation, rotary embeddings) is a large
share of a training step and of a prefill, for dense and sparse attention alike. Liger-Kernel replaces each with
one Triton kernel through its own patching entry point, which knows the modeling code of each architecture it
supports; this module only decides whether to call it and says clearly when it cannot. The kernels run on CUDA
only, so a CPU run keeps transformers' own modules.

The patch is applied to a model instance: its norm and MLP modules get Liger's forwards (their types stay
transformers'). Liger's entry point also rebinds names in transformers' modeling module of the model's type: the
norm and MLP classes, which would make every later model of that type in the process construct Liger's modules
(a CPU model's, whose Triton kernels fail there, or one asked to run `none`), and the RoPE function, through
which the patched instance's attention rotates. `apply_fused_kernels` restores the classes and keeps Liger's
RoPE for CUDA tensors only: later CUDA models of that type rotate with it too (numerically the same rotation),
CPU ones with transformers' own.

The fused loss is separate (`trainer.lm_loss`, `lm_loss.py`).
"""

from __future__ import annotations

import functools
import sys
import types

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
    `model.model`); LoRA layers added afterwards run inside the patched MLP forward unchanged. What Liger rebinds
    in the model type's modeling module is confined to this model and CUDA tensors (see the module docstring).

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

        modeling = sys.modules[type(model).__module__]
        before = dict(vars(modeling))
        # The loss kernels stay off here: the trainer computes the loss itself (`trainer.lm_loss`).
        _apply_liger_kernel_to_instance(
            model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
        _confine_module_patches(modeling, before)
    return chosen


def _confine_module_patches(modeling: types.ModuleType, before: dict) -> None:
    """Undo what Liger rebound in `modeling` (given its names `before`) beyond the instance: classes get their
    originals back; functions (the RoPE) run Liger's version on CUDA tensors and the original otherwise."""
    for name, value in list(vars(modeling).items()):
        old = before.get(name, value)
        if value is old:
            continue
        if isinstance(old, type):
            setattr(modeling, name, old)
        elif isinstance(value, types.FunctionType):
            setattr(modeling, name, _on_cuda_only(value, getattr(old, "seer_original", old)))


def _on_cuda_only(liger_fn, original):
    """`liger_fn` for calls whose first argument is a CUDA tensor, `original` for the others."""

    @functools.wraps(original)
    def dispatch(x, *args, **kwargs):
        return (liger_fn if getattr(x, "is_cuda", False) else original)(x, *args, **kwargs)

    dispatch.seer_original = original
    return dispatch
