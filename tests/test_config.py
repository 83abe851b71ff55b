"""Composition, type checking and value validation of the Hydra configuration."""

import pytest

from seer_finetune.compose import available, compose_config
from seer_finetune.config import ConfigError

from helpers import run_cli


def test_every_experiment_composes():
    names = available("exp")
    assert "smoke" in names and "yarn32k_dense" in names
    for name in names:
        cfg = compose_config([f"+exp={name}"])
        assert cfg.data.seq_len > 0


def test_smoke_is_a_4x_yarn_extension():
    cfg = compose_config(["+exp=smoke"])
    assert cfg.rope.type == "yarn"
    assert cfg.rope.factor == 4.0
    assert cfg.rope.max_position_embeddings == 4 * cfg.rope.original_max_position_embeddings == cfg.data.seq_len


def test_yarn32k_dense_extends_8k_to_32k():
    cfg = compose_config(["+exp=yarn32k_dense"])
    assert (cfg.rope.original_max_position_embeddings, cfg.rope.max_position_embeddings) == (8192, 32768)


def test_override_reaches_the_dataclass():
    cfg = compose_config(["+exp=smoke", "trainer.max_steps=7", "optim.lr=0.5"])
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+exp=nope"], "unknown experiment 'nope'"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["trainer.no_such_field=1"], "no_such_field"),
        (["+exp=smoke", "rope.factor=3", "rope.max_position_embeddings=1024"], "disagrees with the lengths"),
        (["+exp=smoke", "rope.original_max_position_embeddings=null"], "original_max_position_embeddings is required"),
        (["+exp=smoke", "data.seq_len=4096"], "exceeds the YaRN target length"),
        (["attention=nope"], "unknown attention option 'nope'"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["deepspeed.offload_optimizer=true"], "needs DeepSpeed"),
        (["attention.density=1.5"], "attention.density"),
        (["attention=seer_joint", "attention.local_blocks=0"], "attention.local_blocks=0 must be > 0"),
        (["attention=seer_joint", "attention.gate_rope_units=octaves"], "attention.gate_rope_units='octaves' is not one of"),
        (["attention=seer_joint", "attention.gate_rope_fraction=0"], r"attention.gate_rope_fraction=0.0 must be in \(0, 1\]"),
        (["attention=seer_joint", "attention.gate_rope_fraction=1.5"], r"attention.gate_rope_fraction=1.5 must be in \(0, 1\]"),
        (
            ["attention=seer_joint", "attention.gate_rope_units=none", "attention.gate_rope_fraction=0.5"],
            "attention.gate_rope_fraction=0.5 splits the gate's RoPE, but attention.gate_rope_units=none",
        ),
        (["attention=seer_joint", "attention.sink_blocks=-1"], "attention.sink_blocks=-1 must be >= 0"),
        (["attention=seer_joint", "attention.budget=model"], "attention.budget='model' is not one of"),
    ],
)
def test_bad_values_fail_at_compose_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_a_broken_wandb_install_fails_the_run_at_once_in_one_line(tmp_path):
    """A wandb that cannot be imported (as wandb 0.31 without OpenTelemetry) stops `train` before any data or
    model is loaded, with one line naming the way out."""
    import os

    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'opentelemetry'\", name='opentelemetry')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("train", "+exp=smoke", "logger=wandb_offline", f"trainer.output_dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "logger.wandb=offline needs the wandb package" in errors[0], result.stderr
    assert "logger=jsonl" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["+exp=nope"], "error: unknown experiment 'nope' (available:"),
        (["trainer.max_steps=abc"], "error: trainer.max_steps: Value 'abc' of type 'str' could not be converted"),
        (["+exp=smoke", "rope.factor=2", "rope.max_position_embeddings=1024"], "error: rope.factor=2.0 disagrees"),
        (["+exp=smoke", "data.source=/nonexistent/corpus.txt"], "error: data path does not exist: /nonexistent/corpus.txt"),
        (["+exp=smoke", "model.name_or_path=/nonexistent/model"], "error: model path does not exist: /nonexistent/model"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    result = run_cli("train", *args, f"trainer.output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_cli_empty_data_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    result = run_cli("train", "+exp=smoke", f"data.source={empty}", f"trainer.output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: data source '{empty}' holds no text" in result.stderr


def test_cli_unknown_command_and_help(tmp_path):
    assert run_cli("fly", cwd=tmp_path).returncode == 2
    shown = run_cli("--help", cwd=tmp_path)
    assert shown.returncode == 0 and "train" in shown.stdout


def test_print_config_from_another_directory(tmp_path):
    result = run_cli("train", "+exp=smoke", "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "original_max_position_embeddings: 256" in result.stdout


def test_cli_bench_names_and_cpu_refusal(tmp_path):
    unknown = run_cli("bench", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: unknown benchmark 'nope' (available: attention, training-step, scale-out, quality, prefill)"
    if not __import__("torch").cuda.is_available():
        attention = run_cli("bench", "attention", cwd=tmp_path)
        assert attention.returncode == 2 and "needs a CUDA GPU" in attention.stderr
