"""A run folder is a contract: what a resume may change, non-finite steps, and `resume=false` in a used folder.

Every run goes through the command line's own entry point (`seer_finetune.__main__.main`), in process, on the
embedded tiny Llama; a one-line error is `error: ...` on stderr with exit code 2.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seer_finetune.__main__ import main
from seer_finetune.checkpoint import list_checkpoints, save_checkpoint
from seer_finetune.compose import compose_config
from seer_finetune.metrics import read_metrics
from seer_finetune.trainer import Trainer, lr_lambda

SMALL = [
    "rope.factor=2",
    "data.seq_len=512",
    "trainer.micro_batch_size=2",
    "trainer.progress_bar=false",
    "trainer.eval_before=false",
    "data.max_eval_sequences=1",
    "trainer.save_final=false",
]


def _args(run_dir: Path, *extra: str) -> list[str]:
    """The small settings on `+exp=smoke`, or on the experiment `extra` names."""
    exp = [] if any(e.startswith("+exp=") for e in extra) else ["+exp=smoke"]
    return [*exp, *SMALL, f"trainer.output_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}", *extra]


def _train(capsys, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m seer_finetune train` with the small settings."""
    capsys.readouterr()
    code = main(["train", *_args(run_dir, *extra)])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The one line of a refused run (library warnings aside), after checking there is exactly one."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


# -- 1. a run is a contract --------------------------------------------------------------------------------


def test_changed_learning_rate_applies_on_resume_and_is_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _train(capsys, run, "trainer.max_steps=4", "trainer.save_every=2")
    assert code == 0, err

    # The new rate reaches the optimizer's groups and the schedule as soon as the checkpoint is restored.
    trainer = Trainer(compose_config(_args(run, "trainer.max_steps=6", "trainer.save_every=2", "optim.lr=1e-4")))
    assert trainer.maybe_resume() and trainer.step == 4
    expected = 1e-4 * lr_lambda(4, warmup=5, total=6, schedule="cosine", min_ratio=0.1)
    groups = [g for g in trainer.engine.optimizer.param_groups if g["name"].startswith("model")]
    assert [g["initial_lr"] for g in groups] == [1e-4] * len(groups)
    assert [g["lr"] for g in groups] == [expected] * len(groups)
    assert trainer.engine.scheduler.base_lrs[: len(groups)] == [1e-4] * len(groups)
    del trainer

    code, out, err = _train(capsys, run, "trainer.max_steps=6", "trainer.save_every=2", "optim.lr=1e-4")
    assert code == 0, err
    assert "resumed at step 4; changed: optim.lr 0.003 -> 0.0001, trainer.max_steps 4 -> 6" in out
    step5 = [r for r in read_metrics(run) if r["step"] == 5 and "train/loss" in r][0]
    assert step5["train/lr/model_decay"] == expected
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["lr"] == 1e-4
    assert [h["event"] for h in saved["history"]] == ["start", "resume"]
    assert saved["history"][1]["step"] == 4
    assert saved["history"][1]["changed"] == {"trainer.max_steps": [4, 6], "optim.lr": [0.003, 0.0001]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("contract") / "run"
    assert main(["train", *_args(run, "trainer.max_steps=2", "trainer.save_every=2")]) == 0
    return run


@pytest.mark.parametrize(
    "change, named",
    [
        ("model.name_or_path=builtin:smollm2_135m_arch", "model.name_or_path builtin:tiny_llama -> builtin:smollm2_135m_arch"),
        ("rope.factor=8", "rope.factor 2.0 -> 8.0"),
        ("peft.r=8", "peft.r 16 -> 8"),
        ("peft=full", "peft.method lora -> full"),
    ],
)
def test_fixed_field_change_on_resume_is_one_line_before_loading(finished_run, capsys, change, named):
    before = _snapshot(finished_run)
    code, out, err = _train(capsys, finished_run, "trainer.max_steps=4", "trainer.save_every=2", change)
    line = _error_line(err)
    assert code == 2
    assert named in line and "cannot continue" in line and "trainer.output_dir" in line and "overwrite=true" in line
    assert "[seer-finetune]" not in out  # nothing was loaded
    assert _snapshot(finished_run) == before


# -- 2. non-finite steps -------------------------------------------------------------------------------------


def _all_finite(folder: Path) -> bool:
    files = list(folder.rglob("*.safetensors"))
    assert files
    return all(torch.isfinite(t.float()).all() for f in files for t in load_file(str(f)).values())


def test_diverging_run_skips_updates_then_stops_with_one_line(tmp_path, capsys):
    """At lr 1e3 the tiny model's gradient norm is NaN from step 2: five skipped updates stop the run."""
    run = tmp_path / "run"
    code, out, err = _train(capsys, run, "optim.lr=1e3", "trainer.max_steps=10", "trainer.save_every=1", "trainer.keep_checkpoints=2")
    line = _error_line(err)
    assert code == 2
    assert "training diverged" in line and "steps 2-6" in line and "step_000001" in line
    assert out.count("update skipped") == 5
    # No checkpoint was written from a skipped step, so the one before the divergence is kept, and it is finite.
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    assert _all_finite(run / "checkpoints")
    assert not (run / "summary.json").exists()
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["train/skipped_update"] == 1.0 for r in records[1:])


def test_run_that_finishes_with_skipped_updates_writes_strict_json(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _train(
        capsys, run, "optim.lr=1e3", "trainer.max_steps=4", "trainer.save_every=1",
        "trainer.save_final=true",
    )
    assert code == 0, err
    summary = _strict_json((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_updates"] == 3
    _strict_json((run / "config.json").read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    assert _all_finite(run / "checkpoints") and _all_finite(run / "final")


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from seer_finetune.trainer import TrainingDiverged

    run = tmp_path / "run"
    trainer = Trainer(compose_config(_args(run, "trainer.max_steps=2", "trainer.save_every=1")))
    trainer.train_step()
    trainer.save()
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    trainer.train_step()
    with pytest.raises(TrainingDiverged, match="weights became NaN or inf by step 2.*step_000001"):
        trainer.save()
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]


# -- 3. resume=false in a used folder --------------------------------------------------------------------------


def test_resume_false_refuses_a_used_folder_then_overwrite_keeps_the_new_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _train(capsys, run, "trainer.max_steps=6", "trainer.save_every=6")
    assert code == 0, err
    old = _snapshot(run)

    code, out, err = _train(capsys, run, "trainer.resume=false", "trainer.max_steps=4", "trainer.save_every=2")
    line = _error_line(err)
    assert code == 2 and "already holds a run" in line and "trainer.overwrite=true" in line
    assert _snapshot(run) == old

    code, out, err = _train(capsys, run, "trainer.resume=false", "trainer.overwrite=true", "trainer.max_steps=4", "trainer.save_every=2")
    assert code == 0, err
    # The old run moved whole into previous_1; rotation kept the new run's checkpoints.
    assert _snapshot(run / "previous_1") == old
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]
    new_losses = _train_losses(run)
    assert [s for s, _ in new_losses] == [1, 2, 3, 4]
    history = json.loads((run / "config.json").read_text())["history"]
    assert history == [{"step": 0, "event": "start", "time": history[0]["time"], "previous_run": "previous_1"}]

    # A plain re-run resumes the new run, not the old one, and its metrics stay the new run's alone.
    code, out, err = _train(capsys, run, "trainer.max_steps=4", "trainer.save_every=2")
    assert code == 0, err
    assert "resumed at step 4" in out
    assert _train_losses(run) == new_losses


def test_rotation_never_deletes_a_later_step(tmp_path):
    """A run that resumed from an older checkpoint rotates among the steps up to its own, leaving later ones."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, extension_state={}, trainer_state={}, keep=2)
    for step in (8, 2, 4, 6):
        save_checkpoint(tmp_path, step, **state)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000006", "step_000008"]


def test_overwrite_needs_resume_false(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path / "run", "trainer.overwrite=true")
    assert code == 2 and "trainer.overwrite=true needs trainer.resume=false" in _error_line(err)
    assert not (tmp_path / "run").exists()


def test_json_of_a_diverged_value_is_strict(tmp_path):
    from seer_finetune.run_folder import write_json

    write_json(tmp_path / "s.json", {"loss": math.nan, "eval": {"ppl": math.inf, "parts": [-math.inf, 1.0]}})
    assert _strict_json((tmp_path / "s.json").read_text()) == {"loss": None, "eval": {"ppl": None, "parts": [None, 1.0]}}


def test_two_stage_run_is_one_run_for_resume_false_and_overwrite(tmp_path, capsys):
    """A seer run with gate distillation first: its `gate_init/` belongs to the run it sits in."""
    run = tmp_path / "run"
    seer = ["+exp=smoke_seer", "attention.init_steps=2", "trainer.max_steps=2", "trainer.save_every=1"]
    code, out, err = _train(capsys, run, *seer)
    assert code == 0, err
    old = _snapshot(run)

    code, _, err = _train(capsys, run, *seer, "trainer.resume=false")
    assert code == 2 and "already holds a run" in _error_line(err) and _snapshot(run) == old
    # Distilled gates cannot take a new number of distillation steps.
    code, _, err = _train(capsys, run, *seer, "attention.init_steps=3")
    assert code == 2 and "attention.init_steps 2 -> 3" in _error_line(err) and _snapshot(run) == old

    code, out, err = _train(capsys, run, *seer, "trainer.resume=false", "trainer.overwrite=true")
    assert code == 0, err
    assert _snapshot(run / "previous_1") == old
    assert "stage 1/2: gate distillation" in out  # the new run distilled its own gates
    assert _train_losses(run / "gate_init") == _train_losses(run / "previous_1" / "gate_init")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_diverging_run_stops_on_every_process(tmp_path, stage):
    """Two processes: DeepSpeed's own overflow check (ZeRO-2) or the engine's (ZeRO-0 in fp32, which has none)
    skips the updates; both processes stop at the same step, none hangs, and the checkpoints stay finite."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = [a.replace("trainer.micro_batch_size=2", "trainer.micro_batch_size=1") for a in _args(run)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "seer_finetune",
        "train", *args, "deepspeed=zero2", f"deepspeed.zero_stage={stage}", "optim.lr=1e3", "trainer.max_steps=10",
        "trainer.save_every=1",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0
    assert out.count("error: training diverged") == 2, out[-4000:]
    assert "steps 2-6" in out and out.count("update skipped") == 5
    assert [p.name for p in (run / "checkpoints" / "deepspeed").iterdir() if p.is_dir()] == ["step_000001"]
    # ZeRO 0-2 keep the whole module in the model-state file.
    states = torch.load(run / "checkpoints" / "deepspeed" / "step_000001" / "mp_rank_00_model_states.pt", weights_only=False)
    weights = [t for t in states["module"].values() if t.is_floating_point()]
    assert weights and all(torch.isfinite(t).all() for t in weights)


def test_overwrite_killed_while_moving_is_finished_by_the_next_run(tmp_path):
    """What a kill between two renames of an overwrite leaves: part of the old run in previous_1.partial. The next
    run counts the folder as free, and finishing the move puts the old run back together in previous_1."""
    from seer_finetune.run_folder import check_run_folder, finish_pending_move, run_entries

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000006").mkdir(parents=True)
    (run / "checkpoints" / "step_000006" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "previous_1.partial").mkdir()
    (run / "previous_1.partial" / "config.json").write_text("{}")
    cfg = compose_config(_args(run, "trainer.resume=false"))
    assert run_entries(run) == [] and not check_run_folder(cfg, 1).moved_to
    finish_pending_move(run, is_main=True)
    assert sorted(p.name for p in run.iterdir()) == ["previous_1"]
    assert sorted(p.name for p in (run / "previous_1").iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]


@pytest.mark.parametrize("after_distributed_run", [False, True])
def test_leaving_skips_the_teardown_only_after_a_distributed_run(after_distributed_run):
    """`leave(code)` exits with `code`; once a distributed run has destroyed its process group it skips the
    interpreter's teardown (where comm threads could abort a finished run), after flushing what was printed."""
    import subprocess
    import sys

    program = (
        "import atexit, seer_finetune.deepspeed_engine as engine\n"
        "from seer_finetune.__main__ import leave\n"
        "atexit.register(lambda: print('teardown ran', flush=True))\n"
        f"engine._left_process_group = {after_distributed_run}\n"
        "print('work done', end='')\n"
        "leave(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and proc.stdout.startswith("work done"), proc.stderr[-2000:]
    assert ("teardown ran" in proc.stdout) != after_distributed_run


_HOLD_LOCK = """
import sys, time
from seer_finetune.run_folder import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _lock_in_another_process(folder: Path):
    """A process holding `folder`'s run lock (as a training run does); returns once it holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("exp", ["+exp=smoke", "+exp=smoke_seer"])
def test_a_second_run_in_a_folder_in_use_stops_at_once_and_touches_nothing(capsys, tmp_path, exp):
    """One-stage and two-stage (gate distillation first) runs alike; a killed holder leaves no stale lock."""
    run = tmp_path / "run"
    stages = ["attention.init_steps=1"] if "seer" in exp else []
    code, _, err = _train(capsys, run, exp, "trainer.max_steps=1", "trainer.save_every=1", *stages)
    assert code == 0, err
    before = _snapshot(run)
    holder = _lock_in_another_process(run)
    try:
        for extra in ([], ["trainer.resume=false", "trainer.overwrite=true"]):
            code, _, err = _train(capsys, run, exp, "trainer.max_steps=2", "trainer.save_every=1", *stages, *extra)
            assert code == 2 and "is in use: another run is training in it" in _error_line(err)
            assert _snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    code, _, err = _train(capsys, run, exp, "trainer.max_steps=2", "trainer.save_every=1", *stages)
    assert code == 0, err


def test_the_run_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    import subprocess
    import sys

    from seer_finetune.run_folder import run_folder_lock

    folder = tmp_path / "run"
    probe = ("import sys\nfrom seer_finetune.config import ConfigError\nfrom seer_finetune.run_folder import "
             "run_folder_lock\ntry:\n    with run_folder_lock(sys.argv[1]): print('free')\nexcept ConfigError: print('held')")

    def other_process_sees() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True).stdout.strip()

    with run_folder_lock(folder):
        with run_folder_lock(folder):
            assert other_process_sees() == "held"
        assert other_process_sees() == "held"
        with run_folder_lock(folder, is_main=False):  # non-main ranks never lock
            pass
    assert other_process_sees() == "free"
    # The lock adds no file: a folder it created is removed again when nothing was written into it, and an
    # existing one is left as it was.
    assert not folder.exists()
    folder.mkdir()
    with run_folder_lock(folder):
        assert other_process_sees() == "held"
    assert folder.is_dir() and list(folder.iterdir()) == []
