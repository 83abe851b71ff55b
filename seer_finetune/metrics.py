"""Where metrics go: a plain `metrics.jsonl` in the run folder (always) and W&B (online, offline or off).

Both get the same names and values. A name is `<section>/<metric>`; W&B lays out its panels by the section
(the part before the first `/`), so every section is one group of panels:

- `train/...`: the step's `loss`, `lm_loss`, extension losses (`gate_loss`, weighted as in the loss),
  `grad_norm`, `tokens_per_s`, `step_time_s`, `lr/<parameter group>`, `skipped_update`, `peak_memory_gib`;
- `eval/...`: `loss`, `ppl` as the model trains (a seer run: at its density or threshold), and for a sparse
  run `loss_dense`, `ppl_dense` (every block) and `sparsity_cost` (ppl / ppl_dense - 1); an extension's overview
  of the evaluation rows under `eval/<extension>/...` (`eval/seer/recall`);
- an extension's overview of the training steps, e.g. `seer/gate_loss`, `seer/recall`, `seer/density`;
- one section per per-layer kind, `<kind>/layer_NN`, e.g. `seer_recall/layer_03`, and for evaluations
  `eval_<kind>/layer_NN` (see `eval_key`): thirty layers of one kind fill a section of their own, which W&B
  can fold away, instead of crowding the overview.

A value that is a list of numbers (one per head, say) is a distribution: a list in metrics.jsonl, a histogram in
W&B. Every record carries `step`; W&B plots every section against it (`define_metric`).

Every line written is strict JSON (a non-finite number becomes null; `dumps_json_safe` does the same for other
files of a run, such as summary.json). A line cut short by a crash, power loss or a full disk is dropped, with a
one-line warning naming the file, wherever the file is read: on resume the file is rewritten without it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .config import ConfigError, LoggerConfig


STEP_KEY = "step"
# W&B keeps the lowest value of these in the run's summary beside the last one.
LOWEST_KEPT = ("train/loss", "train/lm_loss", "eval/loss", "eval/ppl", "eval/ppl_dense")
HISTOGRAM_BINS = 32


def layer_key(section: str, layer: int) -> str:
    """The name of one layer's value of a per-layer kind, e.g. `layer_key("seer_recall", 3)` ->
    `seer_recall/layer_03` (each kind its own dashboard section).

    Args:
        section: The kind's section, prefixed by the extension's name (`seer_recall`).
        layer: The layer index.

    Returns:
        `<section>/layer_NN`.
    """
    return f"{section}/layer_{layer:02d}"


def split_layer_key(key: str) -> tuple[str, int] | None:
    """(section, layer) of a name made by `layer_key`, or None for any other name."""
    section, _, rest = key.partition("/")
    if not rest.startswith("layer_") or not rest[len("layer_") :].isdigit():
        return None
    return section, int(rest[len("layer_") :])


def eval_key(name: str) -> str:
    """The logged name of an evaluation result.

    The trainer's own results (`ppl`) and an extension's overview (`seer/recall`) go into the `eval` section
    (`eval/ppl`, `eval/seer/recall`); a per-layer kind gets an evaluation section of its own
    (`seer_recall/layer_03` -> `eval_seer_recall/layer_03`), so its panels sit apart from training's.

    Args:
        name: A key of `Trainer.evaluate`'s result.

    Returns:
        The name in metrics.jsonl and W&B.
    """
    return f"eval_{name}" if split_layer_key(name) else f"eval/{name}"


def is_distribution(value: Any) -> bool:
    """Whether a metric value is a list of numbers (logged as a histogram in W&B)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def require_wandb(cfg: LoggerConfig):
    """Import wandb for `logger.wandb` online/offline and, online, check that W&B credentials are configured; else
    raise a one-line ConfigError saying how to proceed.

    Called before any data or model is loaded and before the run folder is created, so a missing or broken wandb
    install (wandb 0.31 imports OpenTelemetry, for one) or a missing API key fails a run in seconds and leaves
    nothing behind, rather than after tokenising and loading. Credentials are looked up where wandb itself looks,
    without the network: `WANDB_API_KEY` (or `WANDB_IDENTITY_TOKEN_FILE`), the netrc file `wandb login` writes,
    and wandb's settings. Whether the key is accepted is known only once the server answers. Offline mode needs no
    key.

    Args:
        cfg: The logger section.

    Returns:
        The wandb module, or None when W&B is off.

    Raises:
        ConfigError: wandb cannot be imported, or `online` without credentials (or with a malformed key).
    """
    if cfg.wandb == "disabled":
        return None
    try:
        import wandb
    except Exception as exc:  # ImportError, or whatever a broken install raises while importing
        raise ConfigError(
            f"logger.wandb={cfg.wandb} needs the wandb package, which failed to import ({type(exc).__name__}: "
            f"{exc}); install it (pip install wandb) or log to metrics.jsonl only with logger=jsonl"
        ) from exc
    if cfg.wandb != "online":
        return wandb

    def configured_key() -> bool:
        """Whether wandb would find credentials without asking; its own lookup where the release has one."""
        import netrc
        import os
        from urllib.parse import urlsplit

        try:
            from wandb.sdk import wandb_setup
            from wandb.sdk.lib import wbauth

            host = wandb_setup.singleton().settings.base_url
            lookup = wbauth.authenticate_session
        except (ImportError, AttributeError):
            lookup = None
        if lookup is not None:
            try:
                return lookup(host=host, source="seer-finetune", prompt=False, update_session=False) is not None
            except unusable:
                raise
            except Exception:  # private API of another release: look where wandb has always looked
                pass
        if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
            return True
        try:
            entries = netrc.netrc(os.environ.get("NETRC") or None)
        except (OSError, netrc.NetrcParseError):
            return False
        hosts = {urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc, "api.wandb.ai"}
        return any((entries.authenticators(h) or (None, None, None))[2] for h in hosts)

    # A key in an invalid format, or two kinds of credentials set at once.
    unusable = getattr(getattr(wandb, "errors", None), "AuthenticationError", None) or ()
    way_out = (
        "run `wandb login` or set WANDB_API_KEY, or log without an account: logger=wandb_offline (sync later with "
        "`wandb sync`) or logger=jsonl"
    )
    try:
        found = configured_key()
    except unusable as exc:
        raise ConfigError(f"logger.wandb=online: W&B credentials are unusable ({str(exc).strip().splitlines()[0]}); {way_out}") from None
    if not found:
        raise ConfigError(f"logger.wandb=online needs W&B credentials and none are configured; {way_out}")
    return wandb


class MetricsLogger:
    """Append-only JSONL metrics plus optional W&B.

    On resume the JSONL file is cut back to the resumed step, so an interrupted and resumed run has the same
    lines as an uninterrupted one.

    Args:
        run_dir: The run folder; `metrics.jsonl` is written there.
        cfg: The logger section.
        run_config: The whole resolved configuration, recorded with the W&B run.
        resume_step: Drop JSONL lines with `step` greater than this (None: start a new file).
        enabled: False on non-zero ranks of a distributed run.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_config: dict[str, Any], *, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            repair_metrics(run_dir, resume_step)
        self._wandb = require_wandb(cfg)
        self._sections: set[str] = set()
        if self._wandb is not None:
            self.wandb_run = self._wandb.init(
                project=cfg.project,
                name=cfg.run_name or Path(run_dir).name,
                mode=cfg.wandb,
                dir=str(cfg.wandb_dir or run_dir),
                config=run_config,
                resume="allow",
                id=_stable_run_id(run_dir) if resume_step is not None else None,
            )
            # `step` is the x axis of every section (`_section`), not a chart of its own.
            self.wandb_run.define_metric(STEP_KEY, hidden=True)
            for key in LOWEST_KEPT:
                self.wandb_run.define_metric(key, summary="last,min")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one record `{"step": step, **metrics}` (tensors and numpy scalars as numbers; lists of numbers
        as lists, and as histograms in W&B)."""
        if not self.enabled:
            return
        record = {STEP_KEY: step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(dumps_json_safe(record) + "\n")
        if self.wandb_run is not None:
            for key in record:
                self._section(key)
            # W&B shows NaN and inf as such; only the JSONL file needs strict JSON.
            values = {k: self._histogram(v) if is_distribution(v) else v for k, v in record.items()}
            self.wandb_run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def _section(self, key: str) -> None:
        """Plot a new section's metrics against `step` (W&B takes a glob suffix per section)."""
        section, slash, _ = key.partition("/")
        if slash and section not in self._sections:
            self._sections.add(section)
            self.wandb_run.define_metric(f"{section}/*", step_metric=STEP_KEY)

    def _histogram(self, values: list[float]):
        finite = [float(v) for v in values if math.isfinite(v)]
        return self._wandb.Histogram(finite, num_bins=HISTOGRAM_BINS) if finite else None

    def summary(self, values: dict[str, Any]) -> None:
        """Set the W&B run's summary values (the JSONL file has summary.json beside it)."""
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = _plain(v)

    def close(self) -> None:
        """Finish the W&B run, if any."""
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(value: Any) -> Any:
    """A tensor's or numpy scalar's Python number (other values as they are)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def json_safe(value: Any) -> Any:
    """`value` with only what strict JSON holds: non-finite floats as None, 0-dim tensors and numpy scalars as
    numbers, tuples as lists, paths and other objects as strings, mapping keys as strings.

    Args:
        value: Any nesting of dicts, lists, tuples, numbers, strings, tensors and numpy values.

    Returns:
        The converted copy.
    """
    value = _plain(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    return str(value)


def dumps_json_safe(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `json_safe(value)`: always valid JSON (NaN and infinities as null), for summary.json,
    config.json and metrics lines.

    Args:
        value: What to serialise.
        **kwargs: Passed to `json.dumps` (e.g. `indent=2`).

    Returns:
        The JSON text.
    """
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def _warn(text: str) -> None:
    print(f"[seer-finetune] warning: {text}", file=sys.stderr, flush=True)


def _read_lines(path: Path, warn: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every complete record of a JSONL file; lines that are not one are named in a warning."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    kept, bad = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step", 0), (int, float)):
            kept.append((line, record))
        else:
            bad.append(number)
    if bad:
        which = f"line {bad[0]} is" if len(bad) == 1 else f"lines {', '.join(map(str, bad))} are"
        warn(f"{path}: {which} not a complete JSON record (a write cut short by a crash or a full disk); dropped")
    return kept


def repair_metrics(run_dir: Path, resume_step: int, *, warn: Optional[Callable[[str], None]] = None) -> None:
    """Cut `metrics.jsonl` back to the records of steps up to `resume_step`, dropping lines cut short.

    The file is replaced whole (written beside it, then renamed), so a crash here leaves the old or the new file.

    Args:
        run_dir: The run folder.
        resume_step: The step the run resumes from; later records are removed (they will be logged again).
        warn: Prints the warning about dropped lines (default: one line on stderr).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line, record in _read_lines(path, warn or _warn) if record.get("step", 0) <= resume_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stable_run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def read_metrics(run_dir: Path, *, warn: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """All complete records of a run's metrics.jsonl (the file is only read: a running job may be appending).

    Args:
        run_dir: The run folder.
        warn: Prints a warning naming lines that are not complete records (default: one line on stderr).

    Returns:
        The records in file order.
    """
    return [record for _, record in _read_lines(Path(run_dir) / "metrics.jsonl", warn or _warn)]
