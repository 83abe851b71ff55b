"""DeepSpeed on CPU with 2 processes over gloo: ZeRO-2/3 against a single process, ZeRO-3 resume and export,
export equal to the final save, Ulysses sequence parallelism against degree 1, and the multi-node launcher as two
nodes on localhost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.metrics import read_metrics
from seer_finetune.modeling import load_trained
from seer_finetune.trainer import Trainer

from helpers import assert_same_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

BASE = [
    "+exp=smoke",
    "rope.factor=2",
    "data.seq_len=256",
    "trainer.progress_bar=false",
    "data.max_eval_sequences=2",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SEER_CACHE": str(tmp_path / "cache")}


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2, script: list[str] | None = None) -> subprocess.Popen:
    target = script or ["-m", "seer_finetune", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", *target, *args]
    return subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def _single(tmp_path: Path, args: list[str]) -> dict:
    os.environ["SEER_CACHE"] = str(tmp_path / "cache")
    try:
        return Trainer(compose_config(args)).fit()
    finally:
        os.environ.pop("SEER_CACHE")


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def _assert_same_curve(got: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=rel)


GATES_ON = [
    "attention=seer_joint",
    "attention.block_size=32",
    "attention.gate_hidden_size=32",
    "attention.ground_truth_query_fraction=1.0",
    "optim.gate_lr=1e-2",
]


@pytest.mark.parametrize("stage, peft", [(2, "lora"), (2, "full"), (3, "lora"), (3, "full")])
def test_zero_two_processes_match_one_process_with_the_same_global_batch(tmp_path, stage, peft):
    """SeerAttention gates on: joint training, block-sparse attention at density 0.5, gate loss."""
    common = [*BASE, *GATES_ON, f"peft={peft}", "trainer.max_steps=5", "trainer.save_every=0", "trainer.save_final=false"]
    proc = _torchrun(tmp_path, [*common, f"deepspeed=zero{stage}", "trainer.micro_batch_size=1", f"trainer.output_dir={tmp_path / 'ds'}"])
    _single(tmp_path, [*common, "trainer.micro_batch_size=2", f"trainer.output_dir={tmp_path / 'one'}"])
    out = _finish(proc)
    assert f"ZeRO-{stage}" in out
    ds, one = _losses(tmp_path / "ds"), _losses(tmp_path / "one")
    assert [s for s, _ in one] == [1, 2, 3, 4, 5]
    _assert_same_curve(ds, one, rel=1e-5)
    assert one[-1][1] < one[0][1]
    gate_loss = lambda d: [r["train/gate_loss"] for r in read_metrics(d) if "train/gate_loss" in r]
    assert len(gate_loss(tmp_path / "one")) == 5
    assert gate_loss(tmp_path / "ds") == pytest.approx(gate_loss(tmp_path / "one"), rel=1e-4)


def test_zero3_checkpoint_survives_sigkill_resumes_and_exports(tmp_path):
    common = [*BASE, *GATES_ON, "deepspeed=zero3", "trainer.micro_batch_size=1", "trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_before=false"]
    reference = _torchrun(tmp_path, [*common, f"trainer.output_dir={tmp_path / 'ref'}"])
    _finish(reference)

    run = tmp_path / "run"
    victim = _torchrun(tmp_path, [*common, f"trainer.output_dir={run}"])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "deepspeed" / "step_000004").is_dir():
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (run / "summary.json").exists()
    out = _finish(_torchrun(tmp_path, [*common, f"trainer.output_dir={run}"]))
    assert "resumed at step" in out
    _assert_same_curve(_losses(run), _losses(tmp_path / "ref"), rel=1e-6)

    # The newest DeepSpeed checkpoint (step 6) consolidates into a HF folder equal to the final save.
    exported = subprocess.run(
        [sys.executable, "-m", "seer_finetune", "export", *common, f"trainer.output_dir={run}", f"export.output={tmp_path / 'exported'}"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-4000:]
    ids = torch.randint(0, 2048, (1, 200))
    with torch.no_grad():
        a = load_trained(run / "final")(input_ids=ids).logits
        b = load_trained(tmp_path / "exported")(input_ids=ids).logits
        c = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)
    gates_final = load_file(str(run / "final" / "seer_gates.safetensors"))
    gates_exported = load_file(str(tmp_path / "exported" / "seer_gates.safetensors"))
    assert gates_final.keys() == gates_exported.keys() and len(gates_final) > 0
    for name, value in gates_final.items():
        torch.testing.assert_close(gates_exported[name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_export_of_the_last_deepspeed_checkpoint_equals_the_final_save(tmp_path, stage):
    """Gathered weights (the final save) and the reassembled checkpoint (export) give the same folder."""
    run = tmp_path / "run"
    common = [*BASE, *GATES_ON, f"deepspeed=zero{stage}", "trainer.micro_batch_size=1", "trainer.max_steps=2", "trainer.save_every=2",
              "trainer.eval_before=false", f"trainer.output_dir={run}"]
    _finish(_torchrun(tmp_path, common))
    exported = subprocess.run(
        [sys.executable, "-m", "seer_finetune", "export", *common, f"export.output={tmp_path / 'exported'}"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert (run / "final" / "seer_gates.safetensors").is_file() and (run / "final" / "adapter_model.safetensors").is_file()
    assert_same_folder(run / "final", tmp_path / "exported")


def test_damaged_newest_deepspeed_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    """A truncated optimizer shard in the newest tag: resume warns, moves the tag aside, restores the tag before it,
    and the run continues on the uninterrupted run's loss curve."""
    common = [*BASE, "deepspeed=zero2", "trainer.micro_batch_size=1", "optim.schedule=constant", "trainer.save_every=1",
              "trainer.eval_before=false", "trainer.save_final=false"]
    _finish(_torchrun(tmp_path, [*common, "trainer.max_steps=4", f"trainer.output_dir={tmp_path / 'ref'}"]))
    run = tmp_path / "run"
    _finish(_torchrun(tmp_path, [*common, "trainer.max_steps=3", f"trainer.output_dir={run}"]))
    root = run / "checkpoints" / "deepspeed"
    shard = root / "step_000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = _finish(_torchrun(tmp_path, [*common, "trainer.max_steps=4", f"trainer.output_dir={run}"]))
    assert "step_000003 is damaged" in out and "resuming from step_000002" in out
    assert "resumed at step 2" in out
    assert (root / "damaged" / "step_000003").is_dir()
    _assert_same_curve(_losses(run), _losses(tmp_path / "ref"), rel=1e-6)


@pytest.mark.parametrize("gates", [False, True], ids=["sdpa", "seer"])
def test_ulysses_degree2_matches_degree1_loss_curve(tmp_path, gates):
    common = [*BASE, *(GATES_ON if gates else []), "peft=full", "trainer.micro_batch_size=1", "trainer.max_steps=4", "trainer.save_every=0", "trainer.save_final=false"]
    proc = _torchrun(tmp_path, [*common, "deepspeed=zero3", "deepspeed.sequence_parallel_size=2", f"trainer.output_dir={tmp_path / 'sp2'}"])
    one = _single(tmp_path, [*common, f"trainer.output_dir={tmp_path / 'sp1'}"])
    out = _finish(proc)
    assert "data x sequence parallel = 1 x 2" in out
    _assert_same_curve(_losses(tmp_path / "sp2"), _losses(tmp_path / "sp1"), rel=1e-5)
    # Adam hides a uniform gradient scale in the losses; the clipped-norm input does not.
    norms = lambda d: [r["train/grad_norm"] for r in read_metrics(d) if "train/grad_norm" in r]
    assert norms(tmp_path / "sp2") == pytest.approx(norms(tmp_path / "sp1"), rel=1e-4)
    if gates:
        gate_loss = lambda d: [r["train/gate_loss"] for r in read_metrics(d) if "train/gate_loss" in r]
        assert len(gate_loss(tmp_path / "sp1")) == 4
        assert gate_loss(tmp_path / "sp2") == pytest.approx(gate_loss(tmp_path / "sp1"), rel=1e-4)
    sp2 = json.loads((tmp_path / "sp2" / "summary.json").read_text())
    assert sp2["eval_after"]["loss"] == pytest.approx(one["eval_after"]["loss"], rel=1e-5)


@pytest.mark.parametrize("stage, gates", [(2, True), (3, False)])
def test_ulysses_degree2_gradients_match_degree1(tmp_path, stage, gates):
    common = [*BASE, *(GATES_ON if gates else []), "peft=full", "trainer.micro_batch_size=1", f"trainer.output_dir={tmp_path / 'g'}"]
    grads_file = tmp_path / "sp2_grads.safetensors"
    script = [str(ROOT / "tests" / "distributed" / "ulysses_gradients.py"), str(grads_file)]
    proc = _torchrun(tmp_path, [*common, f"deepspeed=zero{stage}", "deepspeed.sequence_parallel_size=2"], script=script)
    os.environ["SEER_CACHE"] = str(tmp_path / "cache")
    try:
        trainer = Trainer(compose_config(common))
    finally:
        os.environ.pop("SEER_CACHE")
    loss, parts = trainer._forward_loss(trainer._next_batch())
    loss.backward()
    _finish(proc)
    sp2 = load_file(str(grads_file))
    assert float(sp2.pop("__lm_loss__")) == pytest.approx(float(parts["lm_loss"]), rel=1e-6)
    expected = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert set(sp2) == set(expected)
    assert any(".seer_gate." in name for name in expected) == gates
    for name, grad in expected.items():
        torch.testing.assert_close(sp2[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_multi_node_launcher_two_nodes_on_localhost(tmp_path):
    run = tmp_path / "run"
    args = [*BASE, "deepspeed=zero2", "trainer.micro_batch_size=1", "trainer.max_steps=3", "trainer.save_final=false", f"trainer.output_dir={run}"]
    env = {**_env(tmp_path), "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NPROC_PER_NODE": "1"}
    script = str(ROOT / "launch" / "multi_node.sh")
    nodes = [
        subprocess.Popen(["bash", script, *args], env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (1, 0)
    ]
    outs = [_finish(node) for node in nodes]
    assert "2 processes (data x sequence parallel = 2 x 1)" in outs[1]
    assert [s for s, _ in _losses(run)] == [1, 2, 3]


def test_impossible_layouts_are_clear_errors(tmp_path):
    proc = _torchrun(tmp_path, [*BASE, "deepspeed=zero2", "deepspeed.sequence_parallel_size=3", f"trainer.output_dir={tmp_path / 'x'}"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: deepspeed.sequence_parallel_size=3 does not divide the world size 2" in out
    with pytest.raises(ConfigError, match="needs deepspeed.enabled=true"):
        compose_config([*BASE, "deepspeed.sequence_parallel_size=2"])


@pytest.mark.parametrize(
    "world, heads, kv_heads, seq_len, message",
    [
        (2, 9, 3, 256, "does not divide the model's 9 attention heads"),
        (3, 4, 2, 256, "does not divide the world size 3"),
        (2, 4, 2, 255, "data.seq_len=255 is not divisible"),
    ],
)
def test_parallel_layout_checks(world, heads, kv_heads, seq_len, message):
    from seer_finetune.distributed import check_parallel_layout

    cfg = compose_config([*BASE, "deepspeed=zero3", "deepspeed.sequence_parallel_size=2"])
    cfg.data.seq_len = seq_len
    with pytest.raises(ConfigError, match=message):
        check_parallel_layout(cfg, world, heads, kv_heads)
