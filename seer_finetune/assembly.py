"""Model assembly: the one recipe that turns a configuration into a trainable model and its extension.

Training, the plain copy that receives gathered DeepSpeed weights for the final save, and `export` all build
through `build_model`, so a checkpoint's tensors always land in a model of the same structure and names.
"""

from __future__ import annotations

import torch

from .config import SeerConfig
from .validation import check_sequence_lengths
from .extensions import PLAIN_BACKENDS, TrainingExtension, build_extension
from .lora_precision import set_lora_compute
from .modeling import apply_peft, load_model


def build_model(cfg: SeerConfig, device: torch.device) -> tuple[torch.nn.Module, TrainingExtension]:
    """Load the model with its rope scaling, attach the attention extension, then freeze the base or apply peft.

    Args:
        cfg: The validated run configuration.
        device: Where the model is built.

    Returns:
        `(model, extension)`: the model (peft-wrapped for LoRA) with exactly the trainable parameters the run
        trains (the extension's parameter groups included), and the extension attached to it.

    Raises:
        ConfigError: when a sequence length exceeds the model's (extended) context.
    """
    # A plug-in backend starts from SDPA and switches the attention itself when it attaches.
    attn = cfg.attention.backend if cfg.attention.backend in PLAIN_BACKENDS else "sdpa"
    model = load_model(cfg.model, cfg.rope, device=device, attn_implementation=attn, seed=cfg.trainer.seed)
    context = model.config.max_position_embeddings
    check_sequence_lengths(
        cfg.data, context, f"the model's context ({context} tokens)",
        "extend it with rope=yarn (see +exp=smoke) or shorten the sequences",
    )
    extension = build_extension(model, cfg)
    if extension.freeze_base:
        model.requires_grad_(False)
    else:
        model = apply_peft(model, cfg.peft)
        # ZeRO-3 gathers and releases parameters around module calls; a projection that saves its weight for
        # backward would outlive the gather, so those runs keep peft's own path.
        zero3 = cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3
        if cfg.peft.method == "lora" and not zero3:
            set_lora_compute(model, cfg.peft.lora_compute)
    for group in extension.param_groups():
        for p in group["params"]:
            p.requires_grad_(True)
    return model, extension


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy weights (gathered from DeepSpeed, or read from a checkpoint) into a model built by `build_model`.

    Args:
        model: The freshly built model.
        state: Tensors keyed as in `model.state_dict()`; every trainable parameter must be there, tensors
            the model lacks are ignored. Values are cast to the model's dtype.

    Raises:
        RuntimeError: naming trainable tensors that `state` lacks.
    """
    own = model.state_dict()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and k not in state]
    if missing:
        raise RuntimeError(f"the weights lack {len(missing)} trainable tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            if name in own:
                own[name].copy_(value.to(own[name].dtype))
