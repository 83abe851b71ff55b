"""Checkpoints are verified before anything is restored: a damaged newest one (truncated weights or optimizer
state, an empty state.json, a missing RNG file) is moved aside with a one-line warning naming the file, the
newest intact one is restored, and the run ends bit for bit as an uninterrupted one. A torn last line of
metrics.jsonl is dropped with a warning; every metrics line is valid JSON."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seer_finetune import checkpoint
from seer_finetune.checkpoint import list_checkpoints, load_checkpoint, load_weights, save_checkpoint
from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError, LoggerConfig
from seer_finetune.metrics import MetricsLogger, read_metrics
from seer_finetune.trainer import Trainer

from helpers import assert_same_folder

RUN_ARGS = [
    "+exp=smoke",
    "data.seq_len=256",
    "data.max_eval_sequences=1",
    "trainer.max_steps=4",
    "trainer.save_every=1",
    "trainer.keep_checkpoints=10",
    "trainer.micro_batch_size=1",
    "trainer.eval_before=false",
    "trainer.progress_bar=false",
    "optim.warmup_steps=1",
]


def _args(run_dir: Path, cache: Path) -> list[str]:
    return [*RUN_ARGS, f"trainer.output_dir={run_dir}", f"data.cache_dir={cache}"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run with a checkpoint at every step, kept as a pristine copy. Every case below rebuilds
    the run folder at the same path from it (so the configuration is the run's own), as a kill right after the
    save of step 3 leaves it, then damages that newest checkpoint."""
    root = tmp_path_factory.mktemp("integrity")
    run_dir, cache = root / "run", root / "cache"
    Trainer(compose_config(_args(run_dir, cache))).fit()
    pristine = root / "pristine"
    shutil.copytree(run_dir, pristine)
    return run_dir, cache, pristine


def _killed_after_step_3(reference) -> Path:
    run_dir, _, pristine = reference
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(pristine, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    return run_dir


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "model.safetensors": lambda folder: _truncate(folder / "model.safetensors"),
    "optimizer.safetensors": lambda folder: _truncate(folder / "optimizer.safetensors", 0.9),
    "state.json": lambda folder: (folder / "state.json").write_text(""),
    "rng.safetensors": lambda folder: (folder / "rng.safetensors").unlink(),
}


@pytest.mark.parametrize("damaged_file", list(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_and_the_run_ends_bit_identical(reference, damaged_file, capsys):
    run_dir, cache, pristine = reference
    _killed_after_step_3(reference)
    newest = run_dir / "checkpoints" / "step_000003"
    DAMAGE[damaged_file](newest)
    capsys.readouterr()
    summary = Trainer(compose_config(_args(run_dir, cache))).fit()
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "damaged" in line]
    assert len(warnings) == 1, captured.err
    assert str(newest) in warnings[0] and damaged_file in warnings[0] and "step_000002" in warnings[0]
    assert "resumed at step 2" in captured.out
    moved = run_dir / "checkpoints" / "damaged" / "step_000003"
    assert moved.is_dir() and not newest.with_name("step_000003.tmp").exists()
    # Steps 3 and 4 were trained again from step 2: the same losses, checkpoints and final folder, bit for bit.
    assert _losses(run_dir) == _losses(pristine) and len(_losses(run_dir)) == 4
    assert summary["final_loss"] == json.loads((pristine / "summary.json").read_text())["final_loss"]
    assert_same_folder(pristine / "final", run_dir / "final")
    for step in ("step_000003", "step_000004"):
        for name in ("model.safetensors", "optimizer.safetensors"):
            a, b = load_file(str(pristine / "checkpoints" / step / name)), load_file(str(run_dir / "checkpoints" / step / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{step}/{name}"


def test_no_intact_checkpoint_is_one_line(reference):
    run_dir, cache, _ = reference
    _killed_after_step_3(reference)
    for folder in list_checkpoints(run_dir):
        (folder / "state.json").write_text("{")
    result = subprocess.run(
        [sys.executable, "-m", "seer_finetune", "train", *_args(run_dir, cache)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # (Libraries may print their own warnings before it.)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: no intact checkpoint to resume from in") and "step_000003: state.json" in errors[0]
    # Nothing was moved or rewritten: the user decides.
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000001", "step_000002", "step_000003"]
    assert not (run_dir / "summary.json").exists()


def test_export_names_the_damaged_file(reference):
    run_dir, _, _ = reference
    _killed_after_step_3(reference)
    newest = run_dir / "checkpoints" / "step_000003"
    _truncate(newest / "model.safetensors", 0.99)
    with pytest.raises(checkpoint.CheckpointDamaged, match=r"step_000003 is damaged: model.safetensors: .*truncated"):
        load_weights(newest)
    model, extension, dtype = load_weights(run_dir / "checkpoints" / "step_000002")
    assert model and dtype == "float32"


# -- the checks themselves, on a small model ----------------------------------------------------------


def _small(seed: int = 0, width: int = 3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(root: Path, step: int, model, optimizer, scheduler, extension=None) -> Path:
    return save_checkpoint(
        root, step, model=model, optimizer=optimizer, scheduler=scheduler, extension_state=extension or {},
        trainer_state={"tokens_seen": step, "sampler": {"epoch": 0}}, keep=10,
    )


def test_truncation_anywhere_is_found_from_the_header(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(3, 5), "b": torch.arange(7)}, str(path))
    assert checkpoint.safetensors_header(path) == {"a": ("F32", (3, 5)), "b": ("I64", (7,))}
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            checkpoint.safetensors_header(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="header describes"):
        checkpoint.safetensors_header(path)


def test_intact_checkpoint_restores_exactly_and_other_shapes_are_a_config_error(tmp_path):
    model, optimizer, scheduler = _small()
    folder = _save(tmp_path, 1, model, optimizer, scheduler, {"gates.w": torch.ones(2)})
    state = checkpoint.verify_checkpoint(folder, model=model, optimizer=optimizer, extension_state={"gates.w": torch.zeros(2)})
    assert state["step"] == 1 and set(state["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "extension.safetensors"}
    fresh, fresh_opt, fresh_sched = _small(seed=1)
    restored, extension = load_checkpoint(folder, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert restored["step"] == 1 and torch.equal(extension["gates.w"], torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    wide, wide_opt, wide_sched = _small(width=5)
    before = [p.detach().clone() for p in wide.parameters()]
    with pytest.raises(ConfigError, match=r"does not match this run .*reshaped.*start a new run"):
        load_checkpoint(folder, model=wide, optimizer=wide_opt, scheduler=wide_sched)
    assert all(torch.equal(a, b) for a, b in zip(before, wide.parameters())), "nothing is restored before the check"
    with pytest.raises(ConfigError, match="extension tensors differ"):
        checkpoint.verify_checkpoint(folder, model=model, extension_state={"gates.w": torch.zeros(3)})


def test_resume_walks_back_over_every_damaged_checkpoint(tmp_path):
    model, optimizer, scheduler = _small()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_000004" / "state.json").unlink()  # no longer listed, still examined
    _truncate(checkpoints / "step_000003" / "rng.safetensors")
    (checkpoints / ".tmp_step_000005_123").mkdir()
    warnings: list[str] = []
    state, _ = checkpoint.resume_from_newest_intact(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, warn=warnings.append)
    assert state["step"] == 2 and len(warnings) == 2
    assert "step_000004 is damaged (state.json: missing)" in warnings[0]
    assert "step_000003 is damaged (rng.safetensors:" in warnings[1]
    assert sorted(p.name for p in (checkpoints / "damaged").iterdir()) == ["step_000003", "step_000004"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["damaged", "step_000001", "step_000002"]
    assert checkpoint.resume_from_newest_intact(tmp_path / "elsewhere", model=model, optimizer=optimizer, scheduler=scheduler) is None


# -- metrics.jsonl ------------------------------------------------------------------------------------


def _strict(line: str):
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in {line!r}"))


def test_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LoggerConfig(), {})
    for step in (1, 2, 3):
        logger.log({"train/loss": 1.0 / step}, step=step)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "train/lo')  # power lost mid-write
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert str(path) in capsys.readouterr().err
    resumed = MetricsLogger(tmp_path, LoggerConfig(), {}, resume_step=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "line 4" in err[0]
    resumed.log({"train/loss": 0.25}, step=3)
    assert [_strict(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert read_metrics(tmp_path)[-1]["train/loss"] == 0.25 and capsys.readouterr().err == ""


def test_metrics_lines_and_summaries_are_strict_json(tmp_path):
    logger = MetricsLogger(tmp_path, LoggerConfig(), {})
    logger.log({"train/loss": float("nan"), "train/grad_norm": torch.tensor(float("inf")), "n": torch.tensor(3)}, step=1)
    record = _strict((tmp_path / "metrics.jsonl").read_text())
    assert record == {"step": 1, "train/loss": None, "train/grad_norm": None, "n": 3}
    from seer_finetune.metrics import dumps_json_safe

    text = dumps_json_safe({"final_loss": float("nan"), "eval": {"ppl": [math.inf, 2.5]}, "dir": tmp_path, "t": (1, 2)}, indent=2)
    assert _strict(text) == {"final_loss": None, "eval": {"ppl": [None, 2.5]}, "dir": str(tmp_path), "t": [1, 2]}


def test_trainer_resumes_over_a_torn_metrics_line(reference, capsys):
    run_dir, cache, pristine = reference
    _killed_after_step_3(reference)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    # The kill came while step 4's record was being written, after step 3's checkpoint.
    metrics.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    capsys.readouterr()
    Trainer(compose_config(_args(run_dir, cache))).fit()
    err = capsys.readouterr().err
    assert f"{metrics}: line 4 is not a complete JSON record" in err
    assert _losses(run_dir) == _losses(pristine)
    assert_same_folder(pristine / "final", run_dir / "final")


@pytest.mark.slow
def test_deepspeed_tag_folder_written_by_a_real_run_is_verified(tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ds"
    args = ["+exp=smoke", "rope.factor=2", "data.seq_len=256", "data.max_eval_sequences=1", "deepspeed=zero2",
            "trainer.micro_batch_size=1", "trainer.max_steps=1", "trainer.save_every=1", "trainer.eval_before=false",
            "trainer.save_final=false", "trainer.progress_bar=false", f"trainer.output_dir={run_dir}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SEER_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "seer_finetune", "train", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    tag = run_dir / "checkpoints" / "deepspeed" / "step_000001"
    checkpoint.verify_deepspeed_tag(tag, world_size=2)
    checkpoint.verify_deepspeed_tag(tag)
    pristine = tmp_path / "pristine"
    shutil.copytree(tag, pristine)
    damage = {
        "mp_rank_00_model_states.pt": lambda f: _truncate(f, 0.999),
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": lambda f: f.unlink(),
        "rng_rank00001.safetensors": lambda f: _truncate(f, 0.5),
    }
    for name, spoil in damage.items():
        shutil.rmtree(tag)
        shutil.copytree(pristine, tag)
        spoil(tag / name)
        with pytest.raises(checkpoint.CheckpointDamaged, match=f"step_000001 is damaged: {name}"):
            checkpoint.verify_deepspeed_tag(tag, world_size=2)
    (tag / "rng_rank00001.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointDamaged, match="rng_rank00001.safetensors: missing"):
        checkpoint.verify_deepspeed_tag(tag, world_size=2)
