"""`attention.ground_truth=probe`: in sparse training the gates learn the probe scores of every query block, the
selection's own when `probe_blocks` computed them, with no ground-truth pass; evaluation keeps the exact ground
truth."""

from __future__ import annotations

import pytest
import torch

import seer_kernels
from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.seer import SeerRuntime, SeerSettings, attach_seer_gates
from seer_helpers import random_ids, tiny_model


def _training_forward(model, rt, ids) -> tuple[dict[int, float], dict[str, float]]:
    """One training forward and the backward of its summed gate losses: per-layer losses and statistics."""
    rt.training = True
    rt.begin_forward()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, use_cache=False)
    losses = rt.take_losses()
    torch.stack(list(losses.values())).sum().backward()
    return {layer: loss.item() for layer, loss in losses.items()}, rt.take_stats()


def _seer_model(**settings):
    model = tiny_model("llama", max_position_embeddings=2048, sharpen=3.0)
    rt = SeerRuntime(mode="joint", block_size=16, density=0.3, sink_blocks=1, local_blocks=2, budget="layer",
                     **settings)
    attach_seer_gates(model, rt, gate_hidden_size=16)
    return model, rt


def test_with_every_token_a_probe_the_probe_target_is_the_exact_ground_truth():
    """With `probe_tokens = block_size` the probe scores are the exact ground truth (no padding here), so every
    layer's gate loss and recall match those of the exact target on every row; only the statistics' names
    differ."""
    model, rt = _seer_model(ground_truth_query_fraction=1.0, probe_tokens=16)
    ids = random_ids(1, 320)
    exact_losses, exact_stats = _training_forward(model, rt, ids)
    rt.configure(ground_truth="probe")
    probe_losses, probe_stats = _training_forward(model, rt, ids)
    assert exact_losses.keys() == probe_losses.keys() == {0, 1}
    for layer, loss in exact_losses.items():
        assert probe_losses[layer] == pytest.approx(loss, rel=1e-5), layer
        for name in ("recall", "oracle_recall"):
            assert probe_stats[f"probe_{name}/{layer}"] == pytest.approx(exact_stats[f"{name}/{layer}"], rel=1e-5)
            assert f"{name}/{layer}" not in probe_stats
        assert probe_stats[f"density/{layer}"] == pytest.approx(exact_stats[f"density/{layer}"])


@pytest.mark.parametrize("probe_blocks", [0, 2])
def test_the_probe_target_needs_no_ground_truth_pass(monkeypatch, probe_blocks):
    """Training: no `attention_ground_truth` call, one probe pass per layer (the selection's own when it picks
    by probe), the gates learn from it; evaluation: the exact ground truth on every row, under its usual
    names."""
    model, rt = _seer_model(ground_truth="probe", probe_blocks=probe_blocks, probe_tokens=4)
    calls = {"ground_truth": 0, "probe": 0}
    exact, probe = seer_kernels.attention_ground_truth, seer_kernels.probe_ground_truth

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(seer_kernels, "attention_ground_truth", counted("ground_truth", exact))
    monkeypatch.setattr(seer_kernels, "probe_ground_truth", counted("probe", probe))
    ids = random_ids(1, 320)
    losses, stats = _training_forward(model, rt, ids)
    assert calls == {"ground_truth": 0, "probe": 2}
    assert all(loss > 0 for loss in losses.values()) and "probe_recall/1" in stats and "recall/1" not in stats
    gates = [p for name, p in model.named_parameters() if "seer_gate" in name]
    assert gates and any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)

    calls.update(ground_truth=0, probe=0)
    rt.training = False
    rt.begin_forward()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert calls == {"ground_truth": 2, "probe": 2 if probe_blocks else 0}
    stats = rt.take_stats()
    assert "recall/1" in stats and "probe_recall/1" not in stats


def test_ground_truth_is_checked_and_reaches_the_settings():
    with pytest.raises(ConfigError, match="attention.ground_truth"):
        compose_config(["+exp=smoke_seer", "attention.ground_truth=sampled"])
    with pytest.raises(ValueError, match="ground_truth='sampled' must be one of exact, probe"):
        SeerSettings(ground_truth="sampled")
    cfg = compose_config(["+exp=smoke_seer", "attention.ground_truth=probe"])
    assert SeerSettings.from_config(cfg.attention).ground_truth == "probe"
    assert SeerSettings.from_config(compose_config(["+exp=smoke_seer"]).attention).ground_truth == "exact"


@pytest.mark.parametrize("detach", ["true", "false"])
def test_a_checkpointed_run_trains_on_the_probe_target(tmp_path, detach):
    """Through the trainer, with the gate inputs detached (the recomputation reruns the attention alone) or not
    (it rebuilds the gate loss's graph from the kept target): the steps log finite gate losses and the probe
    recall, and no recall against the attention."""
    from seer_finetune.metrics import read_metrics
    from seer_finetune.trainer import Trainer

    cfg = compose_config([
        "+exp=smoke_seer", "attention.ground_truth=probe", "attention.probe_tokens=4", "attention.init_steps=0",
        "model.gradient_checkpointing=true", f"attention.detach_gate_inputs={detach}", "data.seq_len=256",
        "data.max_eval_sequences=1", "trainer.max_steps=2", "trainer.micro_batch_size=1", "trainer.device=cpu",
        "trainer.eval_before=false", "trainer.save_final=false", "trainer.progress_bar=false",
        f"trainer.output_dir={tmp_path / 'run'}",
    ])
    Trainer(cfg).fit()
    steps = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["seer/gate_loss"] > 0 and 0 < record["seer/probe_recall"] <= 1
        assert "seer/recall" not in record
