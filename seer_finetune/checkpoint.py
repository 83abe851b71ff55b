"""Training checkpoints: atomic, safetensors only, and enough state for an exact resume.

A checkpoint folder `checkpoints/step_000050/` holds
    model.safetensors        the trainable parameters (all of them for full fine-tuning)
    extension.safetensors    the extension's tensors (SeerAttention gates)
    optimizer.safetensors    every optimizer state tensor, keyed `<param index>.<name>`
    rng.safetensors          torch CPU (and CUDA) generator states
    state.json               step, scheduler, data position, optimizer scalars, python/numpy RNG
It is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the previous checkpoint or the new one, never a partial one. No pickled objects are written or read.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_NAME = "state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared or non-contiguous storage: give it clean CPU copies.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what a checkpoint must hold besides the optimizer."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    return obj


def _tupled(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tupled(x) for x in obj)
    return obj


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extension_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically under `root/checkpoints/` and prune old ones (keep the newest `keep`
    of the steps up to `step`; later steps are left alone)."""
    folder = Path(root) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:06d}"
    tmp = folder / f".tmp_step_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(trainable_state(model), tmp / "model.safetensors")
    if extension_state:
        _save_tensors(extension_state, tmp / "extension.safetensors")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = _rng_state()
    _save_tensors(rng_tensors, tmp / "rng.safetensors")
    state = {
        "step": step,
        "trainer": trainer_state,
        "scheduler": scheduler.state_dict(),
        "optimizer": opt_meta,
        "rng": rng_meta,
    }
    with open(tmp / STATE_NAME, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    # Rotation keeps the newest `keep` checkpoints up to this step. A later step on disk (left when a resume had
    # to start from an older checkpoint) is never deleted in favour of older ones: this run rewrites it in turn.
    rotated = [p for p in list_checkpoints(root) if int(STEP_DIR.match(p.name).group(1)) <= step]
    for old in rotated[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root/checkpoints`, oldest first (temporary folders are ignored)."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def clean_partial(root: Path) -> None:
    """Remove temporary folders a killed process left behind."""
    folder = Path(root) / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model, optimizer, scheduler and RNG from `path`; return (trainer state, extension tensors)."""
    path = Path(path)
    saved = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    unknown = [k for k in saved if k not in params]
    missing = [k for k, p in params.items() if p.requires_grad and k not in saved]
    if unknown or missing:
        raise RuntimeError(
            f"checkpoint {path} does not match this model ({len(unknown)} unknown, {len(missing)} missing trainable "
            "tensors): the model or peft settings changed since it was written"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    state = json.loads((path / STATE_NAME).read_text())
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    ext_path = path / "extension.safetensors"
    extension = load_file(str(ext_path)) if ext_path.is_file() else {}
    return state, extension


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str | None]:
    """The trained tensors of checkpoint `path`, without optimizer or RNG state (what `export` needs).

    Args:
        path: A checkpoint folder (`checkpoints/step_NNNNNN`).

    Returns:
        `(model tensors keyed by parameter name, extension tensors, the model's dtype name as training held it
        or None when the checkpoint does not record it)`.
    """
    path = Path(path)
    state = json.loads((path / STATE_NAME).read_text())
    ext_path = path / "extension.safetensors"
    extension = load_file(str(ext_path)) if ext_path.is_file() else {}
    return load_file(str(path / "model.safetensors")), extension, state["trainer"].get("model_dtype")
