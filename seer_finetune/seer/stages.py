"""Two-stage SeerAttention runs in one command: gate distillation, then joint training from those gates.

The trainer runs one stage per call. An experiment that sets `attention.init_steps > 0` (with `mode: joint`
and no `gates_path`) is expanded here into:

1. `gate_init`: the same configuration in `gate_distill` mode for `init_steps` steps (base frozen, only the
   gates train, the model's output stays dense), in `<output_dir>/gate_init`; its gates are written to
   `<output_dir>/gate_init/gates` (the base model is not copied: it is unchanged);
2. the configured joint stage, starting from those gates (`attention.gates_path`).

A rerun after an interruption resumes stage 1 from its checkpoints, or skips it once its gates exist.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, SeerConfig
from .saving import CONFIG_NAME


def gate_init_config(cfg: SeerConfig) -> SeerConfig:
    """The stage-1 (gate distillation) configuration derived from a joint configuration with `init_steps`."""
    a = cfg.attention
    init = copy.deepcopy(cfg)
    init.attention.mode = "gate_distill"
    init.attention.init_steps = 0
    init.trainer.max_steps = int(a.init_steps)
    init.trainer.output_dir = str(Path(cfg.trainer.output_dir) / "gate_init")
    # The frozen base needs no final copy; the gates are saved on their own (see run_stages).
    init.trainer.save_final = False
    return init


def gate_loss_trend(metrics_file: Path, window: int = 3) -> tuple[float, float] | None:
    """Mean training gate loss over the first and the last `window` logged steps of a run (None if unlogged)."""
    if not metrics_file.is_file():
        return None
    values = []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "train/seer/gate_loss" in record:
            values.append(float(record["train/seer/gate_loss"]))
    if not values:
        return None
    n = min(window, len(values))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def run_stages(cfg: SeerConfig) -> dict[str, Any]:
    """Train `cfg`, preceded by a gate-distillation stage when `attention.init_steps > 0`.

    Args:
        cfg: The validated configuration of the (final) joint stage.

    Returns:
        The final stage's summary; with two stages it holds `gate_init` (stage 1's summary, or "reused").
    """
    from ..trainer import Trainer, train

    a = cfg.attention
    if a.init_steps < 0:
        raise ConfigError(f"attention.init_steps={a.init_steps} must be >= 0")
    if a.backend != "seer" or a.init_steps == 0:
        return train(cfg)
    if a.mode != "joint":
        raise ConfigError(f"attention.init_steps needs attention.mode=joint (got {a.mode}): it distils gates before joint training")
    if a.gates_path:
        raise ConfigError("attention.init_steps and attention.gates_path both set: the gates would come from two places")
    init = gate_init_config(cfg)
    gates_dir = Path(init.trainer.output_dir) / "gates"
    stage1: Any = "reused"
    if not (gates_dir / CONFIG_NAME).is_file():
        print(f"[seer-finetune] stage 1/2: gate distillation, {a.init_steps} steps -> {gates_dir}", flush=True)
        trainer = Trainer(init)
        stage1 = trainer.fit()
        if getattr(getattr(trainer, "ctx", None), "is_main", True):
            trainer.extension.save_pretrained(gates_dir)
            trend = gate_loss_trend(Path(init.trainer.output_dir) / "metrics.jsonl")
            if trend is not None:
                print(f"[seer-finetune] stage 1/2: gate loss {trend[0]:.5g} (first steps) -> {trend[1]:.5g} (last steps)", flush=True)
    else:
        print(f"[seer-finetune] stage 1/2: reusing the distilled gates in {gates_dir}", flush=True)
    joint = copy.deepcopy(cfg)
    joint.attention.gates_path = str(gates_dir)
    print(f"[seer-finetune] stage 2/2: joint training from {gates_dir}", flush=True)
    summary = train(joint)
    summary["gate_init"] = stage1
    return summary
