"""The final model folder of a run, written the same way by the trainer (with or without DeepSpeed) and by
`export`, so both give the same files for the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import SeerConfig
from .extensions import TrainingExtension
from .modeling import save_final


def save_final_model(
    model: torch.nn.Module, extension: TrainingExtension, tokenizer, cfg: SeerConfig, out_dir: str | Path
) -> Path:
    """Write a run's trained model into `out_dir` (replaced whole, renamed into place once complete).

    With a frozen base only the extension trained (gate distillation): the base is unchanged, so the folder
    holds just the extension's files (SeerAttention gates, naming the base model in their config). Otherwise
    it is the Hugging Face folder of `modeling.save_final` (full model, or LoRA adapter with its base) plus the
    extension's files.

    Args:
        model: The trained model, whole on this process (under DeepSpeed: a plain copy holding the gathered
            weights), built by `assembly.build_model`.
        extension: The extension attached to `model`.
        tokenizer: The run's tokenizer.
        cfg: The run configuration (model and peft sections).
        out_dir: The folder to write.

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    if not extension.freeze_base:
        return save_final(model, tokenizer, out_dir, model_cfg=cfg.model, peft_cfg=cfg.peft, write_extra=extension.save_pretrained)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extension.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
