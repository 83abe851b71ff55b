"""Dashboards: sectioned metric names in metrics.jsonl and W&B (read back with wandb's own reader), periodic
evaluation sparse vs dense, per-head density, PNG plots, and the library pieces (schedule, seeding)."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_config
from seer_finetune.compose import compose_config
from seer_finetune.config import AttentionConfig, ConfigError, ModelConfig, SeerConfig
from seer_finetune.jobs import train_job
from seer_finetune.metrics import eval_key, layer_key, read_metrics, split_layer_key
from seer_finetune.plots import write_plots
from seer_finetune.trainer import Trainer, lr_lambda, seed_everything

LAYERS = 4  # builtin:tiny_llama
HEADS = 4
PLOTS = ["loss.png", "eval_ppl.png", "gate_recall.png", "density.png", "gate_loss.png"]
# Every logged name: `step`, a key of the train/eval/seer sections, or one layer of a per-layer kind.
NAME = re.compile(r"^(step|(train|eval|seer)/[a-z0-9_]+(/[a-z0-9_]+)?|(eval_)?seer_[a-z_]+/layer_\d\d)$")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _wandb_records(run_dir: Path) -> list[dict]:
    """The records of the run's offline W&B transaction log, decoded by wandb's own reader (`wandb leet inspect`)."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("ground_truth", ["probe", "exact"])
def test_recipe_90_percent_logs_gate_recall_gate_loss_and_eval_curve(tmp_path, ground_truth):
    """`+exp=yarn32k_sparsity90` (its attention, LoRA and optimizer settings) on the embedded tiny model, logged to
    W&B offline: per-layer gate recall and gate loss at every step and an evaluation curve (sparse and dense) are
    in the .wandb file and in metrics.jsonl, with the same finite values, under sectioned names. The recipe's gates
    learn the probe scores, so its training recall is against them (`probe_recall`); with the exact ground truth it
    is `recall`. Evaluation reports the recall against the exact attention either way."""
    run = tmp_path / "run"
    recall = "probe_recall" if ground_truth == "probe" else "recall"
    cfg = compose_config([
        "+exp=yarn32k_sparsity90", f"attention.ground_truth={ground_truth}", "model=tiny_llama", "data=embedded_shakespeare",
        "rope.original_max_position_embeddings=256", "data.seq_len=1024", "data.max_eval_sequences=2",
        "attention.gates_path=null", "trainer.grad_accum_steps=1", "trainer.max_steps=4", "trainer.eval_every=2",
        "trainer.save_every=2", "trainer.device=cpu", "trainer.progress_bar=false", "trainer.save_final=false",
        "logger=wandb_offline", f"trainer.output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}",
    ])
    assert (cfg.attention.density, cfg.attention.budget, cfg.peft.trainable_embeddings) == (0.1, "layer", True)
    summary = train_job(cfg)
    assert summary["steps"] == 4 and sorted(Path(p).name for p in summary["plots"]) == sorted(PLOTS)

    records = read_metrics(run)
    assert all(NAME.match(key) for r in records for key in r), sorted({k for r in records for k in r if not NAME.match(k)})
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/ppl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    kinds = (recall, recall.replace("recall", "oracle_recall"), "gate_loss", "density")
    per_step = [f"seer_{kind}/layer_{i:02d}" for kind in kinds for i in range(LAYERS)]
    for r in train:
        assert all(_finite(r[key]) for key in per_step + [f"seer/{recall}", "seer/gate_loss", "train/gate_loss"]), r
        for i in range(LAYERS):
            assert 0.0 < r[f"seer_{kinds[0]}/layer_{i:02d}"] <= r[f"seer_{kinds[1]}/layer_{i:02d}"] + 1e-6 <= 1.0 + 2e-6
            heads = r[f"seer_density_heads/layer_{i:02d}"]
            assert len(heads) == HEADS and sum(heads) / HEADS == pytest.approx(r[f"seer_density/layer_{i:02d}"], abs=1e-6)
        assert r["seer/gate_loss"] == pytest.approx(sum(r[f"seer_gate_loss/layer_{i:02d}"] for i in range(LAYERS)))
    for r in evals:
        assert all(_finite(r[k]) for k in ("eval/ppl", "eval/ppl_dense", "eval/sparsity_cost", "eval/seer/recall"))
        assert r["eval/sparsity_cost"] == pytest.approx(r["eval/ppl"] / r["eval/ppl_dense"] - 1.0)
        assert all(_finite(r[f"eval_seer_recall/layer_{i:02d}"]) for i in range(LAYERS))
    # the dense perplexity moves with training: the cost of sparsity is a curve, not one number
    assert evals[-1]["eval/ppl_dense"] < evals[0]["eval/ppl_dense"]

    wandb = _wandb_records(run)
    history = {rec["history"]["item"]["step"]: rec["history"]["item"] for rec in wandb if rec["type"] == "history"}
    assert sorted(history) == [0, 1, 2, 3, 4]
    for r in records:
        row = history[r["step"]]
        for key, value in r.items():
            if _finite(value):
                assert row[key] == pytest.approx(value, rel=1e-12), key
    assert row["seer_density_heads/layer_00._type"] == "histogram"
    # every section is plotted against `step`, which is not a chart of its own
    metrics = {rec["metric"].get("glob_name") or rec["metric"].get("name"): rec["metric"] for rec in wandb if rec["type"] == "metric"}
    for section in ("train/*", "eval/*", "seer/*", f"seer_{recall}/*", "seer_gate_loss/*", "eval_seer_recall/*"):
        assert metrics[section]["step_metric"] == "step", section
    assert metrics["step"]["options"].get("hidden")

    for name in PLOTS:
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((run / "plots").glob("*.tmp"))


def _smoke_seer(tmp_path: Path, run: str, *extra: str) -> SeerConfig:
    return compose_config([
        "+exp=smoke_seer", "attention.init_steps=2", "trainer.max_steps=4", "trainer.save_every=0",
        "data.max_eval_sequences=1", "trainer.progress_bar=false", "trainer.save_final=false", "trainer.plots=false",
        f"trainer.output_dir={tmp_path / run}", f"data.cache_dir={tmp_path / 'cache'}", *extra,
    ])


@pytest.mark.slow
def test_periodic_evaluation_in_both_seer_stages_leaves_training_unchanged(tmp_path):
    """smoke_seer evaluates every `eval_every` steps in both stages, sparse and dense (the distillation stage
    measures its gates at the trained density); evaluating at any cadence leaves every training loss as it was."""
    cfg = _smoke_seer(tmp_path, "evaluated", "trainer.eval_every=2")
    assert compose_config(["+exp=smoke_seer"]).trainer.eval_every > 0
    train_job(cfg)
    train_job(_smoke_seer(tmp_path, "plain", "trainer.eval_every=0", "trainer.eval_before=false"))
    for stage, eval_steps in (("gate_init", [0, 2]), ("", [0, 2, 4])):
        evaluated, plain = read_metrics(tmp_path / "evaluated" / stage), read_metrics(tmp_path / "plain" / stage)
        evals = [r for r in evaluated if "eval/ppl" in r]
        assert [r["step"] for r in evals] == eval_steps, stage
        assert all(_finite(r["eval/ppl_dense"]) and _finite(r["eval/seer/recall"]) for r in evals), stage
        assert not any("eval/ppl" in r for r in plain[:-1])
        losses = lambda records: [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
        assert losses(evaluated) == losses(plain) and len(losses(plain)) in (2, 4), stage


@pytest.mark.slow
def test_dense_run_plots_and_a_finished_run_redraws_them(tmp_path, monkeypatch, capsys):
    """A dense run has perplexity but no dense variant and no gate plots; re-running a finished run draws its
    plots again; without matplotlib one warning line and no plots."""
    run = tmp_path / "run"
    args = ["+exp=smoke", "rope.factor=2", "data.seq_len=512", "trainer.max_steps=2", "trainer.eval_every=1", "trainer.save_every=2",
            "data.max_eval_sequences=1", "trainer.progress_bar=false", "trainer.save_final=false",
            f"trainer.output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    summary = Trainer(compose_config(args)).fit()
    assert [Path(p).name for p in summary["plots"]] == ["loss.png", "eval_ppl.png"]
    records = read_metrics(run)
    assert [r["step"] for r in records if "eval/ppl" in r] == [0, 1, 2]
    assert not any(key.startswith(("seer", "eval/ppl_dense")) for r in records for key in r)
    for png in (run / "plots").iterdir():
        png.unlink()
    capsys.readouterr()
    again = Trainer(compose_config(args)).fit()
    assert "resumed at step 2" in capsys.readouterr().out
    assert again["steps"] == 2 and sorted(p.name for p in (run / "plots").iterdir()) == ["eval_ppl.png", "loss.png"]

    # What an environment without matplotlib gives: ImportError on import (loaded modules hidden for the call).
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    warnings = []
    assert write_plots(run, warn=warnings.append) == []
    assert len(warnings) == 1 and "matplotlib is not installed" in warnings[0] and "\n" not in warnings[0]


def test_per_head_density_under_a_threshold():
    """With a threshold heads keep different shares: each layer logs one density per head (their mean is the
    layer's density) and the spread over all heads as 10th/90th percentiles."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").float()
    from seer_finetune.seer import build_extension

    cfg = SeerConfig(model=ModelConfig(name_or_path="tiny"),
                     attention=AttentionConfig(backend="seer", mode="joint", block_size=16, gate_hidden_size=32, threshold=0.1))
    ext = build_extension(model, cfg)
    model.train()
    for seed in (1, 2):
        model(input_ids=torch.randint(2, 2000, (1, 256), generator=torch.Generator().manual_seed(seed)), use_cache=False)
    metrics = ext.metrics()
    heads = [metrics[f"seer_density_heads/layer_{i:02d}"] for i in range(2)]
    assert all(len(h) == 4 for h in heads) and max(map(max, heads)) > min(map(min, heads))
    for i, h in enumerate(heads):
        assert sum(h) / 4 == pytest.approx(metrics[f"seer_density/layer_{i:02d}"], abs=1e-6)
    everything = sorted(v for h in heads for v in h)
    assert everything[0] <= metrics["seer/density_heads_p10"] < metrics["seer/density_heads_p90"] <= everything[-1]
    assert ext.metrics() == {}  # taken


@pytest.mark.slow
def test_threshold_run_records_the_spread_of_density_over_heads(tmp_path):
    """A joint run with a threshold (density varies by head and layer) logs, at every training step and every
    evaluation (after two distillation steps), each layer's per-head densities (their mean is the layer's density)
    and the 10th/90th percentiles over all heads; the density plot draws them."""
    run = tmp_path / "run"
    cfg = _smoke_seer(tmp_path, "run", "attention.density=null", "attention.threshold=0.05",
                      "trainer.max_steps=2", "trainer.eval_every=1", "trainer.plots=true")
    summary = train_job(cfg)
    assert "density.png" in [Path(p).name for p in summary["plots"]]
    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/ppl" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    spread = 0.0
    for r, prefix in [(r, "") for r in train] + [(r, "eval_") for r in evals]:
        overview = "seer/" if not prefix else "eval/seer/"
        low, high = r[f"{overview}density_heads_p10"], r[f"{overview}density_heads_p90"]
        assert _finite(low) and _finite(high) and 0.0 <= low <= high <= 1.0, r
        everything = []
        for i in range(LAYERS):
            heads = r[f"{prefix}seer_density_heads/layer_{i:02d}"]
            assert len(heads) == HEADS and all(_finite(h) and 0.0 <= h <= 1.0 for h in heads)
            assert sum(heads) / HEADS == pytest.approx(r[f"{prefix}seer_density/layer_{i:02d}"], abs=1e-6)
            everything += heads
        assert min(everything) <= low <= high <= max(everything)
        spread = max(spread, high - low)
        # a threshold is sparse: the evaluation also measures dense perplexity
        assert prefix == "" or _finite(r["eval/ppl_dense"])
    assert spread > 0.0  # heads do keep different shares under a threshold


def test_names_of_evaluation_results():
    assert layer_key("seer_recall", 3) == "seer_recall/layer_03" and split_layer_key("seer_recall/layer_03") == ("seer_recall", 3)
    assert split_layer_key("seer/recall") is None and split_layer_key("train/lr/layer_x") is None
    assert [eval_key(k) for k in ("ppl", "ppl_dense", "seer/recall", "seer_recall/layer_03")] == [
        "eval/ppl", "eval/ppl_dense", "eval/seer/recall", "eval_seer_recall/layer_03"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_after_warmup_is_transformers_and_warmup_starts_above_zero(schedule):
    """Step by step against transformers' schedules: after warmup the same values; during warmup ours trains
    from the first step (transformers' first step has learning rate 0). The linear decay ends at min_ratio,
    which transformers' cannot (its linear schedule ends at 0): compared with min_ratio 0."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup, total = 5, 40
    min_ratio = 0.0 if schedule == "linear" else 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = {
        "cosine": lambda: get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio),
        "linear": lambda: get_linear_schedule_with_warmup(optimizer, warmup, total),
        "constant": lambda: get_constant_schedule_with_warmup(optimizer, warmup),
    }[schedule]().lr_lambdas[0]
    ours = lambda step: lr_lambda(step, warmup=warmup, total=total, schedule=schedule, min_ratio=min_ratio)
    for step in range(warmup, total + 1):
        assert ours(step) == pytest.approx(theirs(step), rel=1e-12, abs=1e-15), step
    assert [ours(s) for s in range(warmup)] == [(s + 1) / warmup for s in range(warmup)]
    assert theirs(0) == 0.0 < ours(0)


def test_seeding_is_transformers_set_seed_with_the_same_streams():
    """`seed_everything` (transformers.set_seed) draws what seeding random, NumPy and torch by hand draws;
    seeds outside NumPy's range are refused before any work."""
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    for seed in (0, 1234, 2**32 - 1):
        seed_everything(seed)
        ours = draws()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        assert ours == draws()
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=r"trainer.seed=.* must be in \[0, 2\*\*32\)"):
            compose_config([f"trainer.seed={seed}"])


def test_gate_recall_plot_shows_the_training_recall_of_a_probe_target_run():
    from matplotlib.figure import Figure

    from seer_finetune.plots import plot_gate_recall

    records = [
        {"step": step, "seer_probe_recall/layer_00": 0.8, "seer_probe_oracle_recall/layer_00": 0.9,
         "seer/probe_recall": 0.8, "seer/probe_oracle_recall": 0.9}
        for step in (1, 2)
    ]
    figure = plot_gate_recall(Figure, records)
    labels = {line.get_label() for ax in figure.axes for line in ax.get_lines()}
    assert {"gates, last training steps, against the probe scores", "gates (training, against the probe scores)",
            "oracle (training, against the probe scores)"} <= labels
