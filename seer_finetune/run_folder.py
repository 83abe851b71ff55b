"""A run folder as a contract: what may change when a run resumes, and what happens to a folder that holds a run.

`<output_dir>/config.json` records the configuration a run was started with, and a `history` of what changed
since (`{"step", "event", "time", "changed": {field: [old, new]}}`). Before a run loads anything,
`check_run_folder` compares the composed configuration with it:

- fields in `MUTABLE_FIELDS` may change on resume; they take effect from the resumed step (a new learning rate
  reaches the optimizer and the schedule) and the change is printed and added to the history;
- every other field (model, tokenizer, rope, peft, attention, data and seq_len, seed, batch shape, DeepSpeed
  layout, the number of processes `run.processes`, and any field this list does not name) is fixed for the
  life of a run: a change stops with one `ConfigError` line naming the fields, old -> new;
- `IGNORED_FIELDS` say how to start, not what runs, and are never compared. A field the saved config does not
  hold (written by an older version) is not compared either.

With `trainer.resume=false` a folder that holds a run is refused unless `trainer.overwrite=true`, which moves
every entry of the folder (earlier `previous_N` folders excepted) into `<output_dir>/previous_N/` before the new
run writes anything. Nothing here loads a model: the checks cost a file read.

While a run trains, its process holds an exclusive lock on the folder (`run_folder_lock`): a second run started in
the same folder stops at once with one line, instead of training beside the first and interleaving its
checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import OmegaConf

from .checkpoint import list_checkpoints
from .config import ConfigError, SeerConfig
from .metrics import dumps_json_safe

try:
    import fcntl
except ImportError:  # not POSIX: runs are not guarded against a second run in their folder
    fcntl = None

CONFIG_NAME = "config.json"
# What a run writes into its folder; any of them present means the folder holds a run.
RUN_MARKERS = ("checkpoints", "metrics.jsonl", CONFIG_NAME, "summary.json", "final")
PREVIOUS = re.compile(r"^previous_(\d+)$")
PENDING = re.compile(r"^previous_(\d+)\.partial$")

# Settings a running job can take on at a resume: the schedule and its length, optimizer hyperparameters that
# live in the optimizer's groups (re-applied after loading), cadence of evaluation, checkpoints and logs,
# where metrics go, and settings that change how, not what, is computed. Entries ending in "." are prefixes.
MUTABLE_FIELDS = (
    "trainer.max_steps",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.eval_every",
    "trainer.eval_before",
    "trainer.lm_loss",
    "trainer.log_every",
    "trainer.device",
    "trainer.progress_bar",
    "trainer.save_final",
    "trainer.max_nonfinite_steps",
    "optim.lr",
    "optim.gate_lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.min_lr_ratio",
    "optim.max_grad_norm",
    "data.cache_dir",
    "data.num_proc",
    "data.eval_seq_len",
    "data.max_eval_sequences",
    "model.gradient_checkpointing",
    "peft.merge_on_save",
    "peft.lora_compute",
    "attention.kernel",
    "logger.",
    "eval.",
    "export.",
)
# How to start, not what runs: the folder itself and the resume switches.
IGNORED_FIELDS = ("trainer.output_dir", "trainer.resume", "trainer.overwrite")


def write_json(path: Path, value: Any) -> None:
    """Write `value` as strict JSON (non-finite floats as null, `metrics.json_safe`) atomically: a kill leaves the
    old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(dumps_json_safe(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_config(cfg: SeerConfig, processes: int) -> dict[str, Any]:
    """The resolved configuration as `config.json` records it (with `run.processes`), without history."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return json.loads(dumps_json_safe({**container, "run": {"processes": processes}}))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted field names to values (lists are values), e.g. `{"optim.lr": 2e-4, ...}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def is_mutable(name: str) -> bool:
    """Whether field `name` may change when a run resumes (`MUTABLE_FIELDS`)."""
    return any(name.startswith(m) if m.endswith(".") else name == m for m in MUTABLE_FIELDS)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """Fields whose value differs between a saved and the current configuration, split by the contract.

    Args:
        saved: The run's `config.json` (its `history` is skipped).
        current: `run_config` of the configuration about to run.

    Returns:
        `(fixed, mutable)`: each `{field: [old, new]}`, in field order. Fields missing on either side are
        not compared.
    """
    old = flatten({k: v for k, v in saved.items() if k != "history"})
    new = flatten(current)
    fixed: dict[str, list] = {}
    mutable: dict[str, list] = {}
    for name, value in new.items():
        if name in IGNORED_FIELDS or name not in old or old[name] == value:
            continue
        (mutable if is_mutable(name) else fixed)[name] = [old[name], value]
    return fixed, mutable


def describe_changes(changes: dict[str, list]) -> str:
    """`optim.lr 0.0002 -> 0.0001, peft.method lora -> full` (strings bare, other values as JSON)."""
    show = lambda v: v if isinstance(v, str) else json.dumps(v)
    return ", ".join(f"{name} {show(old)} -> {show(new)}" for name, (old, new) in changes.items())


def pending_move(folder: Path) -> Optional[Path]:
    """A `previous_N.partial` folder left by an overwrite that was killed while moving the old run, if any."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if PENDING.match(p.name))
    return found[0] if found else None


def run_entries(folder: Path) -> list[str]:
    """The markers of a run (`RUN_MARKERS`) present in `folder`; empty when it holds none.

    An overwrite killed while moving (`pending_move`) counts as finished: what is left belongs to the old run.
    """
    folder = Path(folder)
    if not folder.is_dir() or pending_move(folder) is not None:
        return []
    found = []
    for name in RUN_MARKERS:
        path = folder / name
        try:
            if name == "checkpoints":
                present = path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())
            else:
                present = path.exists() and not (path.is_file() and path.stat().st_size == 0)
        except FileNotFoundError:  # moved away by the main process meanwhile (an overwrite)
            present = False
        if present:
            found.append(name)
    return found


def has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint to resume from (one-process or DeepSpeed)."""
    folder = Path(folder)
    if pending_move(folder) is not None:
        return False
    return bool(list_checkpoints(folder)) or (folder / "checkpoints" / "deepspeed" / "latest").is_file()


@dataclass
class RunStart:
    """What `check_run_folder` found about the folder a run is about to use.

    Attributes:
        folder: The run folder.
        saved: The run's `config.json` when the run continues it (resume), else None.
        changes: Mutable fields that differ from `saved`, `{field: [old, new]}`.
        move_old_run: An overwrite must move the folder's run away before anything is written.
        moved_to: Where `claim_run_folder` moved it.
    """

    folder: Path
    saved: Optional[dict[str, Any]] = None
    changes: dict[str, list] = field(default_factory=dict)
    move_old_run: bool = False
    moved_to: Optional[Path] = None


def _new_run_hint(folder: Path) -> str:
    return (
        f"to start a new run, choose a new trainer.output_dir, or add trainer.resume=false trainer.overwrite=true "
        f"to move this one into {folder / 'previous_N'} first"
    )


def read_saved_config(folder: Path) -> Optional[dict[str, Any]]:
    """The run's `config.json`, or None when there is none.

    Raises:
        ConfigError: naming the file, when it cannot be read as a JSON object.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file() or pending_move(folder) is not None:
        return None
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}): it records the run's "
            f"configuration, which a resume must check; restore it, or {_new_run_hint(Path(folder))}"
        ) from None
    return saved


def check_run_folder(cfg: SeerConfig, processes: int, also: Sequence[Path] = ()) -> RunStart:
    """Decide, before anything is loaded or written, how a run may use `trainer.output_dir`.

    Reads files only, so every process of a distributed run reaches the same decision.

    Args:
        cfg: The validated configuration about to run.
        processes: The number of processes of the run (its world size).
        also: Sub-folders that belong to the same run (a two-stage run's `gate_init`): with `resume=false`
            a run in them counts as a run in the folder.

    Returns:
        The folder's `RunStart`.

    Raises:
        ConfigError: `resume=false` in a folder that holds a run without `overwrite=true`; on resume, a change
            of a field fixed for the life of a run; a run without a checkpoint whose configuration changed
            (starting it over would replace it); an unreadable `config.json`.
    """
    t = cfg.trainer
    folder = Path(t.output_dir)
    entries = run_entries(folder)
    if not t.resume:
        entries += [f"{Path(sub).name}/{e}" for sub in also for e in run_entries(sub)]
        if entries and not t.overwrite:
            raise ConfigError(
                f"trainer.output_dir={folder} already holds a run ({', '.join(entries)}) and trainer.resume=false "
                "would start another in it; drop trainer.resume=false to resume it, choose a new "
                "trainer.output_dir, or add trainer.overwrite=true to move it into "
                f"{folder / 'previous_N'} first"
            )
        return RunStart(folder, move_old_run=bool(entries) or pending_move(folder) is not None)
    saved = read_saved_config(folder)
    if saved is None:
        return RunStart(folder)
    fixed, mutable = config_changes(saved, run_config(cfg, processes))
    if fixed:
        raise ConfigError(
            f"trainer.output_dir={folder} holds a run that cannot continue with these changes: "
            f"{describe_changes(fixed)} (fixed for the life of a run); {_new_run_hint(folder)}"
        )
    if mutable and not has_checkpoint(folder) and set(entries) - {CONFIG_NAME}:
        raise ConfigError(
            f"trainer.output_dir={folder} holds a run with no checkpoint to resume from ({', '.join(entries)}); "
            f"starting it over with changes ({describe_changes(mutable)}) would replace it; {_new_run_hint(folder)}"
        )
    return RunStart(folder, saved=saved, changes=mutable)


def _next_previous(folder: Path) -> Path:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := PREVIOUS.match(p.name) or PENDING.match(p.name))]
    return folder / f"previous_{max(numbers, default=0) + 1}"


def claim_run_folder(start: RunStart, is_main: bool) -> RunStart:
    """Carry out `start` on the main process: move the folder's old run into `previous_N/` when asked to.

    Every entry but earlier `previous_N` folders moves, by renames inside the folder, into
    `previous_N.partial`, which is renamed `previous_N` at the end; a move killed halfway is finished by the
    next run before it looks at the folder.

    Args:
        start: The decision of `check_run_folder`.
        is_main: Only the main process moves files.

    Returns:
        `start`, with `moved_to` set where a run was moved.
    """
    folder = start.folder
    if not (is_main and start.move_old_run):
        return start
    staging = pending_move(folder)
    if staging is None:
        target = _next_previous(folder)
        staging = target.with_name(target.name + ".partial")
        staging.mkdir()
    target = staging.with_name(staging.name.removesuffix(".partial"))
    for entry in sorted(folder.iterdir()):
        if entry != staging and not PREVIOUS.match(entry.name):
            os.rename(entry, staging / entry.name)
    os.rename(staging, target)
    start.moved_to = target
    return start


def finish_pending_move(folder: Path, is_main: bool) -> None:
    """Complete an overwrite that a kill interrupted (see `claim_run_folder`), on the main process."""
    if is_main and pending_move(folder) is not None:
        claim_run_folder(RunStart(Path(folder), move_old_run=True), is_main=True)


def write_run_config(start: RunStart, config: dict[str, Any], step: int, resumed: bool) -> None:
    """Write `config.json`: the configuration now in force and the run's history of starts and changes.

    Args:
        start: The folder's `RunStart` (`saved` holds the previous history when the run continues).
        config: `run_config` of the configuration now running.
        step: The step the run starts or resumes at.
        resumed: Whether a checkpoint was restored (otherwise the run starts at step 0: anew, or over again
            when the folder's run had no checkpoint and the same configuration).
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    history = list(start.saved.get("history", [])) if start.saved else []
    if not resumed:
        entry: dict[str, Any] = {"step": step, "event": "restart" if start.saved else "start", "time": now}
        if start.moved_to is not None:
            entry["previous_run"] = start.moved_to.name
        history.append(entry)
    elif start.changes:
        history.append({"step": step, "event": "resume", "time": now, "changed": start.changes})
    write_json(start.folder / CONFIG_NAME, {**config, "history": history})


@dataclass
class _HeldLock:
    """A folder lock this process holds: its directory descriptor (-1: no flock on that filesystem), how many
    `run_folder_lock` blocks hold it, and whether the lock created the folder."""

    fd: int
    holders: int
    created: bool


_held_locks: dict[str, _HeldLock] = {}  # by the folder's real path


@contextlib.contextmanager
def run_folder_lock(folder: str | Path, is_main: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run folder `folder` for the duration of the block.

    A missing folder is created for the lock, and removed again at the end if nothing was written into it.

    The lock is `flock` on the folder itself, so no file is added to it, and the kernel drops it when the process
    ends, however it ends: a killed run leaves no stale lock. Re-entrant within a process (a two-stage job holds it
    around both stages). Filesystems without `flock` support run unguarded.

    Args:
        folder: The run folder (`trainer.output_dir`).
        is_main: Only the main process of a distributed run locks; the others run the block unguarded.

    Raises:
        ConfigError: another process holds the lock (a run is already training in this folder), or the folder
            cannot be created or opened.
    """
    if fcntl is None or not is_main:
        yield
        return
    folder = Path(folder)
    key = os.path.realpath(folder)
    held = _held_locks.get(key)
    if held is None:
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot use trainer.output_dir={folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fd = -1  # no flock on this filesystem
            else:
                if created:
                    _remove_if_empty(folder)
                raise ConfigError(
                    f"trainer.output_dir={folder} is in use: another run is training in it (it holds the folder's "
                    "lock); wait for it to end, or choose another trainer.output_dir"
                ) from None
        held = _held_locks[key] = _HeldLock(fd, 0, created)
    held.holders += 1
    try:
        yield
    finally:
        held.holders -= 1
        if held.holders == 0:
            del _held_locks[key]
            if held.fd >= 0:
                os.close(held.fd)  # closing the descriptor releases the lock
            if held.created:
                # A run refused before writing anything leaves no folder behind.
                _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (the run wrote into it) or already gone
        folder.rmdir()
