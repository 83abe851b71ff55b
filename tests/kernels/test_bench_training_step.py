"""The training-step benchmark's variants compose and validate on CPU for both shapes (its runs need CUDA), and
the Qwen2.5-1.5B-shaped built-in architecture is that model's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_training_step as bench  # noqa: E402

from seer_finetune.compose import compose_config  # noqa: E402
from seer_finetune.modeling import ASSETS  # noqa: E402


@pytest.mark.parametrize("shape", sorted(bench.SHAPES))
def test_every_variant_composes_with_the_shapes_model_and_length(shape, tmp_path):
    model, length, _, _ = bench.SHAPES[shape]
    variants = bench.variants(shape)
    assert next(iter(variants)).startswith("dense")
    for name, extra in variants.items():
        cfg = compose_config([*extra, "model.fused_kernels=none", *bench.overrides(shape, length, tmp_path)])
        assert cfg.model.name_or_path == model and cfg.data.seq_len == length, name
        assert cfg.rope.type == "yarn" and cfg.rope.max_position_embeddings >= length, name
        assert cfg.model.gradient_checkpointing and cfg.peft.method == "lora", name
        if name.startswith("seer"):
            assert (cfg.attention.backend, cfg.attention.mode) == ("seer", "joint") and cfg.attention.density == pytest.approx(0.1), name
            assert cfg.attention.gates_path is None and cfg.attention.init_steps == 0, name
        else:
            assert cfg.attention.backend == "sdpa", name


def test_qwen_architecture_matches_qwen2_5_1_5b():
    config = AutoConfig.from_pretrained(ASSETS / "qwen2_5_1_5b_arch")
    shape = (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
             config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size)
    assert shape == ("qwen2", 28, 1536, 8960, 12, 2, 128, 151936)
    assert config.max_position_embeddings == 32768 and config.tie_word_embeddings and not config.use_sliding_window


def test_stage_split_names_the_seer_steps_a_layer_ran(tmp_path):
    """On CPU the split reads host time, but the ranges are the ones a GPU profile splits kernel time by: every
    step the 90% experiment's selection runs in training shows up, in a layer's order, once per layer (the
    attention again in the checkpoint's recomputation)."""
    from seer_finetune.modeling import base_model
    from seer_finetune.trainer import Trainer

    cfg = compose_config([
        "+exp=smoke_seer", "model.gradient_checkpointing=true", "attention.density=0.25", "attention.bound_blocks=1", "attention.probe_blocks=2",
        "attention.init_steps=0", "data.seq_len=256", "data.max_eval_sequences=1", "trainer.device=cpu",
        "trainer.eval_before=false", "trainer.save_final=false", "trainer.progress_bar=false",
        "trainer.micro_batch_size=1", "trainer.grad_accum_steps=1", f"trainer.output_dir={tmp_path / 'run'}",
    ])
    assert cfg.model.gradient_checkpointing
    trainer = Trainer(cfg)
    trainer.train_step()
    split = bench.stage_split(trainer)
    layers = base_model(trainer.model).config.num_hidden_layers
    assert list(split) == ["gate", "bound", "probe", "select", "attention", "ground_truth", "gate_loss", "stats"]
    assert all(v["ms"] > 0 for v in split.values())
    assert {k: v["calls"] for k, v in split.items()} == {**dict.fromkeys(split, layers), "attention": 2 * layers}
