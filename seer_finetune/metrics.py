"""Where metrics go: a plain `metrics.jsonl` in the run folder (always) and W&B (online, offline or off)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import ConfigError, LoggerConfig


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
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        wandb = require_wandb(cfg)
        if wandb is not None:
            self.wandb_run = wandb.init(
                project=cfg.project,
                name=cfg.run_name or Path(run_dir).name,
                mode=cfg.wandb,
                dir=str(cfg.wandb_dir or run_dir),
                config=run_config,
                resume="allow",
                id=_stable_run_id(run_dir) if resume_step is not None else None,
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one record `{"step": step, **metrics}` (tensors and numpy scalars as numbers)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

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
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _stable_run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
