"""Training checkpoints: atomic, safetensors only, and enough state for an exact resume.

A checkpoint folder `checkpoints/step_000050/` holds
    model.safetensors        the trainable parameters (all of them for full fine-tuning)
    extension.safetensors    the extension's tensors (SeerAttention gates)
    optimizer.safetensors    every optimizer state tensor, keyed `<param index>.<name>`
    rng.safetensors          torch CPU (and CUDA) generator states
    state.json               step, scheduler, data position, optimizer scalars, python/numpy RNG
It is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the previous checkpoint or the new one, never a partial one. No pickled objects are written or read.

Before anything is restored, a checkpoint is verified from sizes and headers alone (`verify_checkpoint`). A
damaged one (a file missing, empty or truncated) is moved to `checkpoints/damaged/` with a one-line warning and
the newest intact older one is restored (`resume_from_newest_intact`); a whole one written for another model is
a configuration error. Flipped bits inside tensor data are not detected (safetensors has no checksums).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_NAME = "state.json"
DAMAGED_DIR = "damaged"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
EXTENSION_FILE = "extension.safetensors"
# Every checkpoint holds these; the extension's file only when the extension has state.
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)
# What a restore reads from state.json (the trainer's own part: `Trainer.maybe_resume`).
STATE_FIELDS = {"step": int, "trainer": dict, "scheduler": dict, "optimizer": dict, "rng": dict}
TRAINER_FIELDS = ("tokens_seen", "sampler")


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
        # state.json is written last: the sizes let a later load tell a whole file from a truncated one.
        "files": {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))},
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


def step_folders(root: Path) -> list[Path]:
    """Every `step_NNNNNN` folder under `root/checkpoints`, oldest first, with `state.json` or not."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root/checkpoints`, oldest first (temporary folders are ignored)."""
    return [p for p in step_folders(root) if (p / STATE_NAME).is_file()]


def clean_partial(root: Path) -> None:
    """Remove temporary folders a killed process left behind."""
    folder = Path(root) / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)


# -- verification ---------------------------------------------------------------------------------


class CheckpointDamaged(ConfigError):
    """A checkpoint that cannot be restored: `file` (a name inside `folder`) is missing, empty, truncated or
    unreadable, as `reason` says."""

    def __init__(self, folder: Path, file: str, reason: str):
        self.folder, self.file, self.reason = Path(folder), file, reason
        super().__init__(f"checkpoint {self.folder} is damaged: {file}: {reason}")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{name: (dtype name, shape)}` of a safetensors file, from its header alone, after checking that the header
    accounts for every byte of the file (a truncated file is found without reading its tensors).

    Raises:
        ValueError: the file is too short, its header unreadable, or its size not the one the header describes.
    """
    size = Path(path).stat().st_size
    if size < 8:
        raise ValueError(f"{size} bytes, too short to be a safetensors file")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise ValueError(f"header of {length} bytes in a file of {size} bytes (truncated)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("unreadable header (not a safetensors file, or overwritten)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"malformed header entry for {name!r}") from None
        item = _DTYPE_BYTES.get(dtype)
        if begin < 0 or end < begin or (item is not None and end - begin != item * int(np.prod(shape, dtype=np.int64))):
            raise ValueError(f"header entry for {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        data_end = max(data_end, end)
        tensors[name] = (dtype, shape)
    if 8 + length + data_end != size:
        raise ValueError(f"{size} bytes where its header describes {8 + length + data_end} (truncated or overwritten)")
    return tensors


def _read_state(folder: Path) -> dict[str, Any]:
    """state.json of `folder`, parsed and checked for the fields a restore reads."""
    path = folder / STATE_NAME
    if not path.is_file():
        raise CheckpointDamaged(folder, STATE_NAME, "missing")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointDamaged(folder, STATE_NAME, f"unreadable ({exc})") from None
    if not text.strip():
        raise CheckpointDamaged(folder, STATE_NAME, "empty")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointDamaged(folder, STATE_NAME, f"not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(folder, STATE_NAME, "not a JSON object")
    for field, kind in STATE_FIELDS.items():
        if not isinstance(state.get(field), kind):
            raise CheckpointDamaged(folder, STATE_NAME, f"no {field!r} entry")
    for section, fields in {"trainer": TRAINER_FIELDS, "optimizer": ("scalars", "param_groups"), "rng": ("python", "numpy")}.items():
        lacking = [f for f in fields if f not in state[section]]
        if lacking:
            raise CheckpointDamaged(folder, STATE_NAME, f"no {section} entry {lacking[0]!r}")
    m = STEP_DIR.match(folder.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointDamaged(folder, STATE_NAME, f"says step {state['step']}, the folder's name another")
    return state


def _expected_files(folder: Path, state: dict[str, Any], extension_state: Optional[Mapping[str, torch.Tensor]]) -> dict[str, Optional[int]]:
    """{file name: size written (None where the checkpoint predates recorded sizes)}."""
    recorded = state.get("files")
    if not isinstance(recorded, dict):  # a checkpoint that records no sizes: the extension's file is optional
        recorded = {EXTENSION_FILE: None} if extension_state or (folder / EXTENSION_FILE).is_file() else {}
    elif extension_state and EXTENSION_FILE not in recorded:
        raise _mismatch(folder, "no extension state, this run's extension has some", "attention")
    return {**{name: None for name in REQUIRED_FILES}, **recorded}


def verify_checkpoint(
    path: Path,
    *,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    extension_state: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, Any]:
    """Check checkpoint folder `path` without restoring anything (headers and sizes only).

    Args:
        path: A checkpoint folder (`checkpoints/step_NNNNNN`).
        model: When given, the saved trainable tensors' names and shapes must be this model's.
        optimizer: When given, its parameter groups and state shapes must fit the saved ones.
        extension_state: The extension's current tensors (names and shapes must match the saved ones).

    Returns:
        The checkpoint's parsed `state.json`.

    Raises:
        CheckpointDamaged: a file is missing, empty, truncated or unreadable, or state.json lacks what it needs.
        ConfigError: the checkpoint is whole but was written for another model, optimizer layout or extension.
    """
    folder = Path(path)
    state = _read_state(folder)
    headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, size in _expected_files(folder, state, extension_state).items():
        file = folder / name
        if not file.is_file():
            raise CheckpointDamaged(folder, name, "missing")
        actual = file.stat().st_size
        if size is not None and actual != size:
            raise CheckpointDamaged(folder, name, f"{actual} bytes, {size} were written" + (" (truncated)" if actual < size else ""))
        try:
            headers[name] = safetensors_header(file)
        except (OSError, ValueError) as exc:
            raise CheckpointDamaged(folder, name, str(exc)) from None
    if "torch_cpu" not in headers[RNG_FILE]:
        raise CheckpointDamaged(folder, RNG_FILE, "holds no torch_cpu generator state")
    if model is not None:
        _match_model(folder, headers[MODEL_FILE], model)
    if optimizer is not None:
        _match_optimizer(folder, headers[OPTIMIZER_FILE], state["optimizer"], optimizer)
    if extension_state:
        saved = headers.get(EXTENSION_FILE, {})
        differ = sorted(k for k in set(saved) | set(extension_state) if k not in saved or k not in extension_state or saved[k][1] != tuple(extension_state[k].shape))
        if differ:
            raise _mismatch(folder, f"{len(differ)} extension tensors differ, e.g. {differ[0]}", "attention")
    return state


def _mismatch(folder: Path, what: str, settings: str = "model or peft") -> ConfigError:
    return ConfigError(
        f"checkpoint {folder} does not match this run ({what}): the {settings} settings changed since it was "
        "written; resume with the settings it was written with, or start a new run in another trainer.output_dir"
    )


def _match_model(folder: Path, saved: dict[str, tuple[str, tuple[int, ...]]], model: torch.nn.Module) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in saved if k not in params]
    missing = [k for k, p in params.items() if p.requires_grad and k not in saved]
    reshaped = [k for k in saved if k in params and saved[k][1] != tuple(params[k].shape)]
    if unknown or missing or reshaped:
        example = (unknown or missing or reshaped)[0]
        raise _mismatch(folder, f"{len(unknown)} unknown, {len(missing)} missing, {len(reshaped)} reshaped trainable tensors, e.g. {example}")


def _match_optimizer(folder: Path, saved: dict[str, tuple[str, tuple[int, ...]]], meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    try:
        saved_sizes = [len(g["params"]) for g in meta["param_groups"]]
    except (KeyError, TypeError):
        raise CheckpointDamaged(folder, STATE_NAME, "malformed optimizer parameter groups") from None
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise _mismatch(folder, f"optimizer groups of {saved_sizes} parameters, this run's {sizes}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, (_, shape) in saved.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name:
            raise CheckpointDamaged(folder, OPTIMIZER_FILE, f"unexpected tensor name {key!r}")
        if int(index) >= len(params) or (shape and shape != tuple(params[int(index)].shape)):
            raise _mismatch(folder, f"optimizer state {key} of shape {list(shape)}")


# -- restoring ------------------------------------------------------------------------------------


def _warn(text: str) -> None:
    print(f"[seer-finetune] warning: {text}", file=sys.stderr, flush=True)


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / name))
    except Exception as exc:  # safetensors raises its own error type for unreadable data
        raise CheckpointDamaged(folder, name, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


Restored = tuple[dict[str, Any], dict[str, torch.Tensor]]


def _restore(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, extension_state: Optional[Mapping[str, torch.Tensor]]) -> Restored:
    """Verify `folder` against the model and optimizer, then restore from it (nothing is touched before the check)."""
    state = verify_checkpoint(folder, model=model, optimizer=optimizer, extension_state=extension_state)
    saved = _load_tensors(folder, MODEL_FILE)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    _restore_optimizer(optimizer, _load_tensors(folder, OPTIMIZER_FILE), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = _load_tensors(folder, RNG_FILE)
    try:
        _restore_rng(rng, state["rng"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointDamaged(folder, STATE_NAME, f"unusable rng entry ({exc})") from None
    extension = _load_tensors(folder, EXTENSION_FILE) if (folder / EXTENSION_FILE).is_file() else {}
    return state, extension


def move_aside(folder: Path) -> Path:
    """Move a damaged checkpoint folder into `checkpoints/damaged/` (kept for inspection, out of every listing);
    returns its new path."""
    folder = Path(folder)
    target_dir = folder.parent / DAMAGED_DIR
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / folder.name, 1
    while target.exists():
        n += 1
        target = target_dir / f"{folder.name}.{n}"
    os.rename(folder, target)
    return target


def _restore_newest_intact(candidates: list[Path], model, optimizer, scheduler, extension_state, warn: Callable[[str], None]) -> Restored:
    """Restore the first intact folder of `candidates` (newest first); damaged ones before it are moved aside.

    A failed restore is followed by a full restore from an older folder, which overwrites everything the
    failed one may have touched (every trainable tensor, the optimizer, the schedule, the generators)."""
    damaged: list[CheckpointDamaged] = []
    for folder in candidates:
        try:
            result = _restore(folder, model, optimizer, scheduler, extension_state)
        except CheckpointDamaged as exc:
            damaged.append(exc)
            continue
        for exc in damaged:
            target = move_aside(exc.folder)
            warn(f"checkpoint {exc.folder} is damaged ({exc.file}: {exc.reason}); moved to {target}, resuming from {folder.name}")
        return result
    listed = "; ".join(f"{e.folder.name}: {e.file}: {e.reason}" for e in damaged)
    raise ConfigError(
        f"no intact checkpoint to resume from in {candidates[0].parent} ({listed}); move that folder away to start "
        "over, or start a new run in another trainer.output_dir"
    )


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extension_state: Optional[Mapping[str, torch.Tensor]] = None,
    fallback: bool = True,
    warn: Optional[Callable[[str], None]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Verify checkpoint `path`, then restore model, optimizer, scheduler and RNG from it.

    Args:
        path: The checkpoint folder, normally the newest of `list_checkpoints`.
        model, optimizer, scheduler: What is restored (the model's trainable tensors).
        extension_state: The extension's current tensors, to check the saved ones against (optional).
        fallback: When `path` is damaged and sits in a run's `checkpoints/` folder, move it aside with a one-line
            warning and restore the newest intact checkpoint older than it instead (`state["step"]` says which).
        warn: Prints the warning (default: one line on stderr).

    Returns:
        `(state.json content, extension tensors)` of the checkpoint restored.

    Raises:
        CheckpointDamaged: `path` is damaged and no fallback applies (one line naming the file).
        ConfigError: no intact checkpoint is left (one line listing them), or the checkpoint was written for
            another model.
    """
    path = Path(path)
    m = STEP_DIR.match(path.name)
    if not (fallback and m and path.parent.name == "checkpoints"):
        return _restore(path, model, optimizer, scheduler, extension_state)
    older = [p for p in step_folders(path.parent.parent) if int(STEP_DIR.match(p.name).group(1)) < int(m.group(1))]
    return _restore_newest_intact([path, *older[::-1]], model, optimizer, scheduler, extension_state, warn or _warn)


def resume_from_newest_intact(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extension_state: Optional[Mapping[str, torch.Tensor]] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Remove a killed save's temporary folder, then restore the newest intact checkpoint of `run_dir`.

    Every `step_NNNNNN` folder counts, newest first, also one without `state.json`; damaged ones newer than the
    one restored are moved to `checkpoints/damaged/` with a one-line warning each.

    Args:
        run_dir: The run folder.
        model, optimizer, scheduler, warn: As for `load_checkpoint`.
        extension_state: The extension's current tensors (`TrainingExtension.state_dict()`), to check the saved
            ones against.

    Returns:
        `(state.json content, extension tensors)` of the checkpoint restored, or None when the run has none.

    Raises:
        ConfigError: checkpoints exist but none is intact (one line listing them), or they were written for
            another model.
    """
    clean_partial(run_dir)
    folders = step_folders(run_dir)
    if not folders:
        return None
    return _restore_newest_intact(folders[::-1], model, optimizer, scheduler, extension_state, warn or _warn)


def _check_archive(folder: Path, name: str) -> None:
    """A torch `.pt` file is a zip archive whose directory sits at its end: a truncated one cannot be opened."""
    if not (folder / name).is_file():
        raise CheckpointDamaged(folder, name, "missing")
    try:
        zipfile.ZipFile(folder / name).close()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointDamaged(folder, name, f"not a whole torch archive ({exc})") from None


def verify_deepspeed_tag(tag_dir: Path, world_size: Optional[int] = None) -> None:
    """Check a DeepSpeed tag folder (`checkpoints/deepspeed/step_NNNNNN`) without loading it: every rank's RNG
    file, the model states (ZeRO-3: one per rank) and the optimizer shards (one per rank), each whole.

    Args:
        tag_dir: The tag folder.
        world_size: The number of ranks that wrote it, when known (default: as many as there are RNG files).

    Raises:
        CheckpointDamaged: naming the first file that is missing or damaged.
    """
    folder = Path(tag_dir)
    ranks = world_size or len(list(folder.glob("rng_rank*.safetensors"))) or 1
    for rank in range(ranks):
        name = f"rng_rank{rank:05d}.safetensors"
        if not (folder / name).is_file():
            raise CheckpointDamaged(folder, name, "missing")
        try:
            if "torch_cpu" not in safetensors_header(folder / name):
                raise ValueError("holds no torch_cpu generator state")
        except (OSError, ValueError) as exc:
            raise CheckpointDamaged(folder, name, str(exc)) from None
    zero3 = not (folder / "mp_rank_00_model_states.pt").is_file() and any(folder.glob("zero_pp_rank_*_model_states.pt"))
    names = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(ranks)] if zero3 else ["mp_rank_00_model_states.pt"]
    if any(folder.glob("zero_pp_rank_*_optim_states.pt")):
        names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)]
    for name in names:
        _check_archive(folder, name)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str | None]:
    """The trained tensors of checkpoint `path`, without optimizer or RNG state (what `export` needs).

    Args:
        path: A checkpoint folder (`checkpoints/step_NNNNNN`).

    Returns:
        `(model tensors keyed by parameter name, extension tensors, the model's dtype name as training held it
        or None when the checkpoint does not record it)`.

    Raises:
        CheckpointDamaged: a file of the checkpoint is missing, truncated or unreadable (one line naming it).
    """
    path = Path(path)
    state = verify_checkpoint(path)
    extension = _load_tensors(path, EXTENSION_FILE) if (path / EXTENSION_FILE).is_file() else {}
    return _load_tensors(path, MODEL_FILE), extension, state["trainer"].get("model_dtype")
