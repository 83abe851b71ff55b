"""Fault injection on a two-stage seer run: SIGKILL during steps, during a save and at the stage change, a
truncated newest checkpoint, then one more run to the end. The result must be the uninterrupted run's, bit for
bit: the same per-step losses of both stages and the same final tensors."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seer_finetune.metrics import read_metrics

from helpers import finish_train_cli, start_train_cli

# smoke_seer's shapes (steps of about 0.5 s in stage 1 and 1 s in stage 2 on CI's CPUs, long enough to be hit),
# fewer steps, a checkpoint after every step.
ARGS = [
    "+exp=smoke_seer",
    "data.max_eval_sequences=1",
    "attention.init_steps=6",
    "trainer.max_steps=8",
    "trainer.save_every=1",
    "trainer.keep_checkpoints=3",
    "trainer.eval_before=false",
    "trainer.progress_bar=false",
]


def _start(run_dir: Path, cache: Path):
    return start_train_cli(ARGS, run_dir, cache)


def _finish(run_dir: Path, cache: Path) -> str:
    return finish_train_cli(ARGS, run_dir, cache)


def _kill_when(process: subprocess.Popen, ready, what: str, delay: float = 0.0, timeout: float = 600.0) -> None:
    """SIGKILL `process` `delay` seconds after `ready()` holds (polled every millisecond: a save lasts a few)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {process.stdout.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _steps_logged(path: Path) -> int:
    return len([r for r in read_metrics(path.parent) if "train/loss" in r]) if path.is_file() else 0


def _saving(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith(".tmp_step_") for p in folder.iterdir())


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    out = []
    for stage, folder in (("gate_init", run_dir / "gate_init"), ("joint", run_dir)):
        out += [(stage, r["step"], r["train/loss"]) for r in read_metrics(folder) if "train/loss" in r]
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            found[f"{path.relative_to(folder)}:{name}"] = tensor
    return found


@pytest.mark.slow
def test_killed_and_damaged_seer_run_finishes_as_the_uninterrupted_one(tmp_path):
    cache = tmp_path / "cache"
    # The uninterrupted run trains beside the interrupted ones, with a token cache of its own (the two never write
    # one cache at once) and its output in a file (a pipe nobody reads until the end would stop it when full).
    reference_log = tmp_path / "reference.log"
    with reference_log.open("w") as log:
        reference = start_train_cli(ARGS, tmp_path / "reference", tmp_path / "reference_cache", output=log)

    run = tmp_path / "faulty"
    stage1 = run / "gate_init"
    rng = random.Random(0)
    # 1. during the steps of stage 1, at a random moment after a random number of them
    steps = rng.randint(1, 3)
    ready = lambda: _steps_logged(stage1 / "metrics.jsonl") >= steps
    _kill_when(_start(run, cache), ready, "stage 1 steps", delay=rng.uniform(0.0, 0.3))
    assert not (stage1 / "gates").exists()
    # 2. during a save of stage 1: its temporary checkpoint folder exists
    _kill_when(_start(run, cache), lambda: _saving(stage1 / "checkpoints"), "a stage-1 save")
    # 3. at the stage change: stage 1's gates are being written or were just written, stage 2 has not logged
    gates = stage1 / "gates"
    changing = lambda: gates.with_name("gates.tmp").exists() or (gates / "seer_gates.json").is_file()
    _kill_when(_start(run, cache), changing, "the stage change")
    assert _steps_logged(run / "metrics.jsonl") == 0
    # 4. during the steps of stage 2, at a random moment after its second checkpoint
    ready = lambda: (run / "checkpoints" / "step_000002").is_dir()
    _kill_when(_start(run, cache), ready, "stage 2's second checkpoint", delay=rng.uniform(0.0, 0.3))
    assert not (run / "summary.json").exists()
    # 5. during a save of stage 2
    _kill_when(_start(run, cache), lambda: _saving(run / "checkpoints"), "a stage-2 save")
    # 6. the newest checkpoint is damaged (a disk that lost the end of a file)
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    out = _finish(run, cache)
    assert f"{newest.name} is damaged" in out
    assert reference.wait(timeout=900) == 0, reference_log.read_text()[-6000:]
    expected_losses = _losses(tmp_path / "reference")
    assert [s for s, _, _ in expected_losses] == ["gate_init"] * 6 + ["joint"] * 8
    assert _losses(run) == expected_losses
    reference_final, final = _tensors(tmp_path / "reference" / "final"), _tensors(run / "final")
    assert reference_final.keys() == final.keys() and reference_final
    for name, tensor in reference_final.items():
        assert torch.equal(final[name], tensor), name
