"""End to end through the `train` and `eval` jobs: smoke_seer's two stages (distil, then joint), then the
density sweep."""

from __future__ import annotations

import json

import pytest
import torch

from seer_finetune.assembly import build_model
from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.jobs import eval_job, train_job
from seer_finetune.seer.stages import distilled_gates_dir, gate_init_config


def _smoke(tmp_path, *extra):
    return compose_config(
        [
            "+exp=smoke_seer",
            f"trainer.output_dir={tmp_path}",
            "data.seq_len=256",
            "data.max_eval_sequences=1",
            "attention.init_steps=3",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=1",
            "trainer.save_every=0",
            "trainer.eval_before=false",
            "trainer.progress_bar=false",
            "eval.lengths=[256]",
            # The paper's diagonal-only selection: at 8 blocks, seer_joint's sink and two local blocks would
            # force 21 of the 36 causal blocks, more than the 50% this test trains at.
            "attention.sink_blocks=0",
            "attention.local_blocks=1",
            f"eval.model_path={tmp_path / 'final'}",
            *extra,
        ]
    )


@pytest.mark.slow
def test_smoke_seer_runs_both_stages_then_eval(tmp_path, capsys):
    cfg = _smoke(tmp_path)
    init = gate_init_config(cfg)
    assert init.attention.mode == "gate_distill" and init.trainer.max_steps == 3 and init.trainer.save_final
    assert distilled_gates_dir(cfg) == tmp_path / "gate_init" / "gates"

    summary = train_job(cfg)
    assert "gate loss" in capsys.readouterr().out
    assert summary["steps"] == 2 and summary["gate_init"]["steps"] == 3
    # stage 1's final save is the distilled gates alone: the frozen base is not copied
    assert sorted(p.name for p in (tmp_path / "gate_init" / "gates").iterdir()) == ["seer_gates.json", "seer_gates.safetensors"]
    assert summary["gate_init"]["final_dir"] == str(tmp_path / "gate_init" / "gates")
    stage1 = [json.loads(line) for line in (tmp_path / "gate_init" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stage1 if "train/gate_loss" in r] == [1, 2, 3]
    assert all(r["train/lm_loss"] > 0 and r["train/loss"] == r["train/gate_loss"] for r in stage1 if "train/gate_loss" in r)
    stage2 = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    joint_steps = [r for r in stage2 if "seer/density" in r]
    assert len(joint_steps) == 2 and all(abs(r["seer/density"] - 0.5) < 0.05 for r in joint_steps)
    gates = json.loads((tmp_path / "final" / "seer_gates.json").read_text())
    assert gates["base_model"] == "builtin:tiny_llama" and gates["block_size"] == 32

    # the run's own (jointly trained) gates win over attention.gates_path, where training started from
    cfg.attention.gates_path = str(tmp_path / "gate_init" / "gates")
    report = eval_job(cfg)
    cfg.attention.gates_path = None
    assert report["gates"] == str(tmp_path / "final") and report["gates_trained"]
    assert (report["sink_blocks"], report["local_blocks"], report["budget"]) == (0, 1, "layer")
    printed = capsys.readouterr().out
    rows = report["results"]
    assert [(r["setting"], r["value"]) for r in rows] == [("density", 1.0), ("density", 0.5), ("density", 0.1)]
    assert rows[0]["realised_density"] == 1.0 and abs(rows[1]["realised_density"] - 0.5) < 0.05
    # 8 blocks of 32: the diagonal alone is 8 / 36 of the causal blocks, the floor for any density
    assert rows[2]["realised_density"] == pytest.approx(8 / 36, abs=1e-6)
    assert all(r["ppl"] > 1 for r in rows)
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == rows
    assert "density=0.1" in printed and "ppl" in printed
    assert [r["selection"] for r in rows] == ["dense", "gate", "gate"]
    # recall of the ground truth per layer for the sparse settings, never above the best of the same size
    assert rows[0]["recall"] is None and rows[0]["recall_per_layer"] is None
    for r in rows[1:]:
        assert len(r["recall_per_layer"]) == len(r["oracle_recall_per_layer"]) == len(gates["layers"])
        assert all(0 < g <= o + 1e-6 <= 1 + 2e-6 for g, o in zip(r["recall_per_layer"], r["oracle_recall_per_layer"]))
    assert rows[1]["recall"] > rows[2]["recall"]  # more blocks kept, more recalled

    # eval.oracle adds each sparse setting once more with blocks ranked by the true pooled attention
    cfg.eval.oracle, cfg.eval.densities = True, [1.0, 0.5]
    # Per-row shares here: at 8 blocks, the layer budget's 10 free blocks per head are exactly the off-diagonal
    # blocks of rows 1-4 (the most probable ones, rows having so few candidates) for the gate and oracle alike.
    cfg.attention.budget = "row"
    oracle_rows = eval_job(cfg)["results"]
    cfg.eval.oracle, cfg.eval.densities, cfg.attention.budget = False, [1.0, 0.5, 0.1], "layer"
    assert [(r["value"], r["selection"]) for r in oracle_rows] == [(1.0, "dense"), (0.5, "gate"), (0.5, "oracle")]
    # The same gates under per-row shares keep other blocks than under the layer budget above.
    assert oracle_rows[1]["realised_density"] == pytest.approx(rows[1]["realised_density"])
    assert oracle_rows[1]["ppl"] != pytest.approx(rows[1]["ppl"])
    assert abs(oracle_rows[2]["realised_density"] - 0.5) < 0.05 and oracle_rows[2]["ppl"] != oracle_rows[1]["ppl"]
    # ranking by the ground truth recalls more of it than the gates do (all of it but what forced blocks displace)
    assert oracle_rows[1]["recall"] < oracle_rows[2]["recall"] <= oracle_rows[2]["oracle_recall"] + 1e-6
    assert "oracle" in capsys.readouterr().out

    # a rerun reuses the distilled gates instead of distilling again
    train_job(cfg)
    assert "reusing the distilled gates" in capsys.readouterr().out


def test_stage_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="mode=joint"):
        train_job(_smoke(tmp_path, "attention.mode=gate_distill"))
    with pytest.raises(ConfigError, match="gates_path"):
        train_job(_smoke(tmp_path, "attention.gates_path=/nowhere"))
    with pytest.raises(ConfigError, match="init_steps=-1 must be >= 0"):
        train_job(_smoke(tmp_path, "attention.init_steps=-1"))


@pytest.mark.slow
def test_gate_stage_continues_from_given_gates(tmp_path):
    """init_steps with gates_path: stage 1 distils the given gates further (at the joint run's own length and
    RoPE), it does not start from fresh ones."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source"
    train_job(_smoke(source, "attention.init_steps=0", "attention.mode=gate_distill", "trainer.max_steps=1"))
    # Shift every saved gate weight far from anything one optimizer step could reach from a fresh gate.
    given = {k: v + 0.5 for k, v in load_file(source / "final" / "seer_gates.safetensors").items()}
    save_file(given, source / "final" / "seer_gates.safetensors")

    run = tmp_path / "run"
    gate_lr = 1e-3
    summary = train_job(_smoke(run, f"attention.gates_path={source / 'final'}", "attention.init_steps=1",
                               f"optim.gate_lr={gate_lr}"))
    assert summary["gate_init"]["steps"] == 1
    distilled = load_file(distilled_gates_dir(_smoke(run)) / "seer_gates.safetensors")
    assert distilled.keys() == given.keys()
    # One AdamW step moves each weight by at most the learning rate (plus its weight decay share).
    for k, v in given.items():
        assert (distilled[k] - v).abs().max().item() <= 2 * gate_lr, k


def _decoder_outputs_require_grad(model, cfg) -> list[bool]:
    """Whether each decoder layer's output requires grad in one training forward of `model`."""
    seen: list[bool] = []
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).requires_grad))
             for m in layers]
    model.train()
    model(input_ids=torch.randint(0, 100, (1, cfg.data.seq_len), generator=torch.Generator().manual_seed(0)))
    for hook in hooks:
        hook.remove()
    return seen


def test_gate_distillation_keeps_nothing_of_the_frozen_base_for_backward(tmp_path):
    """`model.gradient_checkpointing=true` (SmolLM2's and Qwen's default) hooks the embeddings so that their output
    requires grad. Gate distillation freezes the base and switches checkpointing off; with the hook left on, every
    activation of the base would be kept and backpropagated through. The gates must still get their gradients."""
    cfg = _smoke(tmp_path, "model.gradient_checkpointing=true")
    init = gate_init_config(cfg)
    model, extension = build_model(init, torch.device("cpu"))
    seen = _decoder_outputs_require_grad(model, init)
    assert seen and not any(seen)
    loss = sum(extension.extra_losses().values())
    loss.backward()
    grads = [p.grad for p in extension.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    # LoRA under checkpointing still needs the hook: the joint stage's hidden states require grad.
    joint, _ = build_model(cfg, torch.device("cpu"))
    seen = _decoder_outputs_require_grad(joint, cfg)
    assert seen and all(seen)
