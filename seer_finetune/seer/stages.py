"""Two-stage SeerAttention runs: the gate-distillation stage derived from a joint configuration.

An experiment that sets `attention.init_steps > 0` (with `mode: joint`) is run by the `train` job
(`seer_finetune.jobs`) as:

1. `gate_init`: the same configuration in `gate_distill` mode for `init_steps` steps (base frozen, only the
   gates train, the model's output stays dense), in `<output_dir>/gate_init`, from the gates of
   `attention.gates_path` when it is set (gates distilled at the native length then learn the attention of the
   YaRN-scaled model at the target length) or from fresh gates; its final save is the gates alone (the base is
   unchanged), written to `<output_dir>/gate_init/gates`;
2. the configured joint stage, starting from those gates (`attention.gates_path`).

A rerun after an interruption resumes stage 1 from its checkpoints, or skips it once its gates exist. Everything
here is a function of the configuration or of files; running the stages is the job's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..config import SeerConfig
from ..validation import gate_init_stage
from .saving import CONFIG_NAME


def needs_gate_init(cfg: SeerConfig) -> bool:
    """Whether `cfg` asks for a gate-distillation stage before its own; refuses settings that cannot work
    (`validation.gate_init_stage`, which `validation.validate` also applies).

    Args:
        cfg: The configuration of the (final) stage.

    Returns:
        True for `attention.backend=seer` with `attention.init_steps > 0`.

    Raises:
        ConfigError: for negative `init_steps`, or `init_steps` with another mode than `joint`.
    """
    return gate_init_stage(cfg.attention)


def gate_init_config(cfg: SeerConfig) -> SeerConfig:
    """The stage-1 (gate distillation) configuration derived from a joint configuration with `init_steps`."""
    a = cfg.attention
    init = copy.deepcopy(cfg)
    init.attention.mode = "gate_distill"
    init.attention.init_steps = 0
    init.trainer.max_steps = int(a.init_steps)
    init.trainer.output_dir = str(Path(cfg.trainer.output_dir) / "gate_init")
    # With the base frozen the final save is the gates alone (written to `distilled_gates_dir`).
    init.trainer.save_final = True
    return init


def distilled_gates_dir(cfg: SeerConfig) -> Path:
    """Where stage 1 of the joint configuration `cfg` leaves its gates: `<output_dir>/gate_init/gates`."""
    return Path(cfg.trainer.output_dir) / "gate_init" / "gates"


def has_gates(folder: Path) -> bool:
    """Whether `folder` holds saved gates (stage 1 finished before)."""
    return (Path(folder) / CONFIG_NAME).is_file()


def joint_config(cfg: SeerConfig, gates_dir: Path) -> SeerConfig:
    """The stage-2 configuration: `cfg` starting from the distilled gates in `gates_dir`."""
    joint = copy.deepcopy(cfg)
    joint.attention.gates_path = str(gates_dir)
    return joint


def gate_loss_trend(metrics_file: Path, window: int = 3) -> tuple[float, float] | None:
    """Mean training gate loss over the first and the last `window` logged steps of a run (None if unlogged).

    A line that is not JSON (one torn by a crash while it was written) is passed over: the trend is a report,
    and the metrics file's own reader decides what a torn line means for the run.
    """
    if not metrics_file.is_file():
        return None
    values = []
    for line in metrics_file.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = record.get("seer/gate_loss") if isinstance(record, dict) else None
        # A non-finite loss is written as null: it has no place in a trend.
        if isinstance(value, (int, float)):
            values.append(float(value))
    if not values:
        return None
    n = min(window, len(values))
    return sum(values[:n]) / n, sum(values[-n:]) / n
