"""End-to-end training: exact resume after SIGKILL, LoRA and full fine-tuning that reload with the same logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.metrics import read_metrics
from seer_finetune.modeling import load_trained
from seer_finetune.trainer import Trainer, lr_lambda

from helpers import finish_train_cli, kill_when, save_tiny_model, start_train_cli

RESUME_ARGS = [
    "+exp=smoke",
    "rope.factor=2",
    "data.seq_len=512",
    "trainer.max_steps=12",
    "trainer.save_every=2",
    "trainer.micro_batch_size=2",
    "trainer.progress_bar=false",
    "trainer.eval_before=false",
    "data.max_eval_sequences=2",
    "trainer.save_final=false",
]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_same_final_loss(tmp_path):
    cache = tmp_path / "cache"
    finish_train_cli(RESUME_ARGS, tmp_path / "uninterrupted", cache)
    expected = read_metrics(tmp_path / "uninterrupted")

    run_dir = tmp_path / "killed"
    victim = start_train_cli(RESUME_ARGS, run_dir, cache)
    # Kill as soon as a mid-run checkpoint exists (the process may be writing the next one).
    kill_when(victim, run_dir / "checkpoints" / "step_000006")
    assert not (run_dir / "summary.json").exists()

    assert "resumed at step" in finish_train_cli(RESUME_ARGS, run_dir, cache)
    got = read_metrics(run_dir)
    train_loss = lambda records: [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    assert train_loss(got) == train_loss(expected)
    a = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["final_loss"] == a["final_loss"] and b["steps"] == a["steps"] == 12
    assert b["eval_after"]["loss"] == pytest.approx(a["eval_after"]["loss"], rel=1e-6)


def _fit(tmp_path: Path, model_dir: Path, method: str, *extra: str):
    cfg = compose_config(
        [
            f"model.name_or_path={model_dir}",
            f"peft={'full' if method == 'full' else 'longlora'}",
            "rope=yarn",
            "rope.factor=2",
            "rope.original_max_position_embeddings=256",
            "data.seq_len=512",
            "data.max_eval_sequences=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "trainer.max_steps=3",
            "trainer.save_every=0",
            "trainer.progress_bar=false",
            "trainer.device=cpu",
            f"trainer.output_dir={tmp_path / 'run'}",
            "peft.merge_on_save=true",
            *extra,
        ]
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    return trainer, summary


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fine_tune_save_and_reload_same_logits(tmp_path, model_type, method):
    model_dir = save_tiny_model(tmp_path / "base", model_type)
    trainer, summary = _fit(tmp_path, model_dir, method)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    ids = torch.randint(0, 2048, (2, 300))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    final = Path(summary["final_dir"])
    if method == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(final)
    else:
        reloaded = load_trained(final)
        merged = AutoModelForCausalLM.from_pretrained(final / "merged")
        assert merged.config.rope_parameters["rope_type"] == "yarn"
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    assert reloaded.config.rope_parameters["original_max_position_embeddings"] == 256
    assert reloaded.config.max_position_embeddings == 512
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_builtin_lora_adapter_loads_with_plain_from_pretrained(tmp_path):
    cfg = compose_config(
        ["+exp=smoke", "trainer.max_steps=2", "trainer.progress_bar=false", "data.max_eval_sequences=1",
         f"trainer.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    ids = torch.randint(0, 2048, (1, 700))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
    # transformers resolves the adapter's base (written next to it, with the YaRN config) on its own.
    reloaded = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert reloaded.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_is_an_error(tmp_path):
    cfg = compose_config(["data.seq_len=512", f"trainer.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds the model's context \(256 tokens\)"):
        Trainer(cfg)
    # without rope scaling the context is known only from the model: the message still names the field
    cfg = compose_config(["rope=none", "data.seq_len=128", "data.eval_seq_len=512", f"trainer.output_dir={tmp_path}",
                          f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match=r"data.eval_seq_len=512 exceeds the model's context"):
        Trainer(cfg)


def test_schedule_warmup_then_cosine_to_floor():
    f = lambda s: lr_lambda(s, warmup=4, total=20, schedule="cosine", min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(20) == pytest.approx(0.1) and 0.1 < f(12) < 1.0
    assert lr_lambda(12, warmup=4, total=20, schedule="linear", min_ratio=0.0) == pytest.approx(0.5)


def test_wandb_offline_and_jsonl_metrics(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(
        ["+exp=smoke", "logger=wandb_offline", "trainer.max_steps=3", "trainer.save_every=0", "trainer.progress_bar=false",
         "data.max_eval_sequences=1", "trainer.save_final=false", f"trainer.output_dir={run_dir}", f"data.cache_dir={tmp_path / 'c'}"]
    )
    Trainer(cfg).fit()
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("train/lm_loss", "train/tokens_per_s", "train/grad_norm", "train/lr/model_decay"):
        assert key in train[0]
    evals = [r for r in records if "eval/ppl" in r]
    assert [r["step"] for r in evals] == [0, 3]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_local_model_and_data_need_no_hub(tmp_path):
    """With a local model folder and local files, a run succeeds although every hub request would fail:
    offline mode is off and the hub endpoint points at a closed local port."""
    model_dir = save_tiny_model(tmp_path / "model", "llama")
    data = tmp_path / "data.jsonl"
    plays = sorted((Path(__file__).resolve().parents[1] / "seer_finetune" / "assets" / "corpus" / "shakespeare").glob("*.txt"))
    data.write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in plays[:3]))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9",
               SEER_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-m", "seer_finetune", "train", f"model.name_or_path={model_dir}", f"data.source={data}",
         "data.seq_len=256", "data.max_eval_sequences=1", "trainer.max_steps=2", "trainer.progress_bar=false",
         f"trainer.output_dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
