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
