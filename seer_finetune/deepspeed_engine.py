"""DeepSpeed specifics of the trainer: Ulysses registration, checkpoints, gathering weights for the final save.

DeepSpeed's own checkpoint format (one model-state file plus one optimizer shard per rank, written by
`engine.save_checkpoint`) is used under DeepSpeed, because ZeRO partitions optimizer states across ranks and only
DeepSpeed knows how to re-partition them. Per-rank RNG states are added beside them as safetensors. The
`latest` pointer is written last, so a run killed while saving resumes from the previous complete checkpoint.
`python -m seer_finetune export` turns such a checkpoint into a plain Hugging Face folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, SeerConfig
from .distributed import DistributedContext

DS_DIR = "deepspeed"


def register_ulysses(model: torch.nn.Module, cfg: SeerConfig):
    """Wrap the model's attention implementation in DeepSpeed-Ulysses all-to-alls; returns DeepSpeed's mpu.

    Each rank holds L / P tokens of every sequence; before attention an all-to-all gives it all L tokens of
    H / P heads, so attention (and SeerAttention's gates, ground truth and block-sparse kernels, which work per
    head) run unchanged on full sequences; a second all-to-all returns the output to the token shards.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = model.config
    implementation = config._attn_implementation
    if implementation == "eager":
        raise ConfigError("Ulysses sequence parallelism needs attention.backend=sdpa or seer, not eager")
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=implementation,
        sequence_parallel_size=cfg.deepspeed.sequence_parallel_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        seq_length=cfg.data.seq_len,
        seq_length_is_variable=True,
    )


def _root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / DS_DIR


def save_deepspeed_checkpoint(engine, run_dir: Path, step: int, trainer_state: dict[str, Any], ctx: DistributedContext, keep: int) -> Path:
    """Collective: every rank writes its shard of checkpoint `step_NNNNNN`; rank 0 prunes old ones."""
    import deepspeed.comm as dist

    root = _root(run_dir)
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
        tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load_deepspeed_checkpoint(engine, run_dir: Path, ctx: DistributedContext) -> dict[str, Any] | None:
    """Collective: restore the newest complete checkpoint; None when there is none."""
    root = _root(run_dir)
    if not (root / "latest").is_file():
        return None
    path, client = engine.load_checkpoint(str(root))
    if path is None:
        return None
    rng_file = Path(path) / f"rng_rank{ctx.rank:05d}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
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


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy gathered parameters into a plain model built the same way; every trainable tensor must be there."""
    own = model.state_dict()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and k not in state]
    if missing:
        raise RuntimeError(f"gathered weights lack {len(missing)} trainable tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            if name in own:
                own[name].copy_(value.to(own[name].dtype))


def checkpoint_state_dict(checkpoint_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights reassembled from a DeepSpeed checkpoint folder (any ZeRO stage), on CPU, no process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def export_checkpoint(cfg: SeerConfig) -> Path:
    """Consolidate a DeepSpeed checkpoint (ZeRO 0-3, any number of ranks) into a Hugging Face folder.

    The model is rebuilt from `cfg` exactly as training built it (rope scaling, gates, LoRA), on the CPU and
    without a process group; the reassembled fp32 weights are loaded into it and written by the same final
    save as a single-process run.
    """
    from .modeling import load_tokenizer, save_final
    from .trainer import build_model

    run_dir = Path(cfg.trainer.output_dir)
    source = Path(cfg.export.checkpoint) if cfg.export.checkpoint else _root(run_dir)
    tag = None
    if (source / "latest").is_file() or not source.exists():
        root = source
    else:  # a tag folder inside the checkpoint root
        root, tag = source.parent, source.name
    if not (root / "latest").is_file() and tag is None:
        raise ConfigError(f"no DeepSpeed checkpoint at {source} (expected a folder with a 'latest' file)")
    state = checkpoint_state_dict(root, tag)
    model, extension = build_model(cfg, torch.device("cpu"))
    load_full_state(model, state)
    out = Path(cfg.export.output) if cfg.export.output else run_dir / "exported"
    final = save_final(model, load_tokenizer(cfg.model), out, model_cfg=cfg.model, peft_cfg=cfg.peft)
    extension.save_pretrained(final)
    return final
