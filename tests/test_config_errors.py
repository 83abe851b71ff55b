"""One line where a traceback was: values caught by config validation before anything loads, a malformed jsonl
named by file and line, W&B online without credentials refused before the run writes anything."""

import json
import os
import subprocess

import pytest

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError, LoggerConfig
from seer_finetune.metrics import require_wandb

from helpers import run_cli


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+exp=smoke_seer", "attention.density=null", "attention.threshold=2"], r"attention.threshold=2.0 must be in \[0, 1\]"),
        (["attention=seer_distill", "attention.threshold=-0.5"], r"attention.threshold=-0.5 must be in \[0, 1\]"),
        (["+exp=smoke_seer", "attention.init_steps=-1"], "attention.init_steps=-1 must be >= 0"),
        (["+exp=smoke_seer", "attention.row_mass=1.0"], r"attention.row_mass=1.0 must be in \[0, 1\)"),
        (["+exp=smoke_seer", "attention.bound_blocks=-1"], "attention.bound_blocks=-1 must be >= 0"),
        (["+exp=smoke_seer", "attention.budget=row", "attention.row_mass=0.3"], "it needs attention.budget=layer"),
        (["attention=seer_distill", "attention.init_steps=4"], "attention.init_steps needs attention.mode=joint"),
        (["+exp=smoke_seer", "attention.gate_loss_scale=nan"], "attention.gate_loss_scale=nan must be a finite number"),
        (["+exp=smoke_seer", "eval.densities=[1.0,2]"], r"eval.densities: 2.0 must be in \(0, 1\]"),
        (["+exp=smoke_seer", "eval.thresholds=[1.5]"], r"eval.thresholds: 1.5 must be in \[0, 1\]"),
        (["+exp=smoke_seer", "eval.lengths=[0]"], "eval.lengths: 0 must be > 0"),
        (["+exp=smoke", "data.eval_seq_len=4096"], "data.eval_seq_len=4096 exceeds the YaRN target length"),
        (["+exp=smoke", "data.invalid_files=maybe"], "data.invalid_files='maybe' is not one of skip, error"),
        (["+exp=smoke", "data.file_glob="], "data.file_glob must not be empty"),
        (["+exp=smoke", "data.max_eval_sequences=-1"], "data.max_eval_sequences=-1 must be >= 0"),
        (["+exp=smoke", "optim.lr=nan"], "optim.lr=nan must be a finite number"),
        (["+exp=smoke", "optim.lr=inf"], "optim.lr=inf must be a finite number"),
        (["+exp=smoke", "optim.lr=1e39"], "optim.lr=1e\\+39 is beyond float32's range"),
        (["+exp=smoke", "optim.eps=-1"], "optim.eps=-1.0 must be >= 0"),
        (["+exp=smoke", "optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
        (["+exp=smoke", "rope.factor=nan", "rope.max_position_embeddings=null"], "rope.factor=nan must be a finite number"),
    ],
)
def test_bad_values_fail_at_compose_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "During handling" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_seer_threshold_out_of_range_stops_before_any_loading(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "+exp=smoke_seer", "attention.density=null", "attention.threshold=2", f"trainer.output_dir={run}", cwd=tmp_path)
    assert _one_error_line(result).startswith("error: attention.threshold=2.0 must be in [0, 1]")
    assert not run.exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "first"}\n{"text": "second"}\n{"text": not json}\n{"text": "fourth"}\n')
    result = run_cli("train", "+exp=smoke", f"data.source={bad}", f"trainer.output_dir={tmp_path / 'run'}", cwd=tmp_path)
    line = _one_error_line(result)
    assert f"{bad}:3:" in line and "not valid JSON" in line, line
    assert not (tmp_path / "run").exists()


def _no_wandb_credentials(tmp_path) -> dict[str, str]:
    """An environment without any W&B credentials: no key variables, an empty home, netrc and settings."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_SILENT="true")
    return env


def test_wandb_online_without_credentials_stops_before_the_run_writes_anything(tmp_path):
    env = _no_wandb_credentials(tmp_path)
    env["SEER_CACHE"] = str(tmp_path / "cache")
    run = tmp_path / "run"
    result = run_cli("train", "+exp=smoke", "logger=wandb", f"trainer.output_dir={run}", cwd=tmp_path, env=env)
    line = _one_error_line(result)
    assert "logger.wandb=online" in line and "WANDB_API_KEY" in line and "wandb login" in line, line
    assert "logger=wandb_offline" in line
    assert not run.exists()
    assert not (tmp_path / "cache").exists()


def test_wandb_credentials_are_found_without_the_network(tmp_path, monkeypatch):
    for key, value in _no_wandb_credentials(tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("WANDB_") and k not in ("WANDB_CONFIG_DIR", "WANDB_SILENT")]:
        monkeypatch.delenv(key)
    # Offline mode needs no key.
    assert require_wandb(LoggerConfig(wandb="offline")) is not None
    assert require_wandb(LoggerConfig(wandb="disabled")) is None
    with pytest.raises(ConfigError, match="logger.wandb=online needs W&B credentials"):
        require_wandb(LoggerConfig(wandb="online"))
    # A key in the environment.
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert require_wandb(LoggerConfig(wandb="online")) is not None
    monkeypatch.delenv("WANDB_API_KEY")
    # A key that `wandb login` wrote to the netrc file.
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef0123456789abcdef01234567\n")
    netrc.chmod(0o600)
    assert require_wandb(LoggerConfig(wandb="online")) is not None


def test_gate_loss_trend_passes_over_a_torn_line(tmp_path):
    from seer_finetune.seer.stages import gate_loss_trend

    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "seer/gate_loss": float(10 - i)}) for i in range(1, 5)]
    metrics.write_text("\n".join(lines) + '\n{"step": 5, "seer/ga')
    assert gate_loss_trend(metrics, window=2) == (8.5, 6.5)
