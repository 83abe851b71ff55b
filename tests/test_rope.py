"""YaRN through transformers' rope registry, checked against an independent implementation of the paper."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from seer_finetune.config import ConfigError, RopeConfig, SeerConfig
from seer_finetune.validation import validate
from seer_finetune.rope import apply_rope_scaling

from helpers import tiny_config


def yarn_reference(dim, base, factor, original, beta_fast, beta_slow, positions):
    """YaRN (Peng et al. 2023) from its equations: NTK-by-parts interpolation and the attention temperature."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelength = 2 * math.pi / inv_freq
    rotations = original / wavelength  # r(d): full turns within the original context
    # ramp gamma(r): 0 below beta_slow rotations (interpolate), 1 above beta_fast (keep)
    low = math.floor(dim * math.log(original / (beta_fast * 2 * math.pi)) / (2 * math.log(base)))
    high = math.ceil(dim * math.log(original / (beta_slow * 2 * math.pi)) / (2 * math.log(base)))
    low, high = max(low, 0), min(high, dim - 1)
    idx = torch.arange(dim // 2, dtype=torch.float64)
    ramp = ((idx - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # transformers' convention: extrapolation weight
    freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    mscale = 0.1 * math.log(factor) + 1.0
    angles = positions[:, None].double() * freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    assert rotations.numel() == dim // 2
    return emb.cos() * mscale, emb.sin() * mscale, mscale


def _configured(factor=4.0, original=256, **rope):
    cfg = SeerConfig()
    cfg.data.source, cfg.data.seq_len = "builtin:shakespeare", original * int(factor)
    cfg.model.name_or_path = "builtin:tiny_llama"
    cfg.rope = RopeConfig(type="yarn", factor=factor, original_max_position_embeddings=original, **rope)
    return validate(cfg).rope


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_cos_sin_and_attention_scaling_match_yarn(model_type):
    config = apply_rope_scaling(tiny_config(model_type, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), _configured())
    assert config.max_position_embeddings == 1024
    assert config.rope_parameters["original_max_position_embeddings"] == 256
    model = AutoModelForCausalLM.from_config(config)
    rotary = model.model.rotary_emb
    positions = torch.arange(1024)
    x = torch.zeros(1, 1024, 16)
    cos, sin = rotary(x, positions[None])
    ref_cos, ref_sin, mscale = yarn_reference(16, 10000.0, 4.0, 256, 32.0, 1.0, positions)
    assert rotary.attention_scaling == pytest.approx(mscale)
    # transformers forms angles up to ~1e3 rad in fp32 (spacing ~6e-5 there), hence 1e-4.
    torch.testing.assert_close(cos[0].double(), ref_cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin[0].double(), ref_sin, atol=1e-4, rtol=0)


def test_explicit_attention_factor_and_betas_pass_through():
    rope = _configured(beta_fast=16.0, beta_slow=2.0, attention_factor=1.3)
    config = apply_rope_scaling(tiny_config("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), rope)
    model = AutoModelForCausalLM.from_config(config)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1.3)
    positions = torch.arange(512)
    cos, _ = model.model.rotary_emb(torch.zeros(1, 512, 16), positions[None])
    ref_cos, _, _ = yarn_reference(16, 10000.0, 4.0, 256, 16.0, 2.0, positions)
    torch.testing.assert_close(cos[0].double(), ref_cos / (0.1 * math.log(4.0) + 1.0) * 1.3, atol=1e-4, rtol=0)


def test_original_length_must_match_the_model():
    with pytest.raises(ConfigError, match="trained at 256 tokens"):
        apply_rope_scaling(tiny_config("llama"), _configured(factor=4.0, original=128))


def test_other_rope_scaling_is_refused():
    config = tiny_config("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="rope_type='linear'"):
        apply_rope_scaling(config, _configured())


def test_unvalidated_rope_sections_are_completed_or_refused():
    """Callers that build a RopeConfig by hand (skipping `validate`) get the same filling and checks."""
    rope = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=256)
    config = apply_rope_scaling(tiny_config("llama"), rope)
    assert config.max_position_embeddings == 1024 and config.rope_parameters["factor"] == 4.0
    assert rope.max_position_embeddings is None  # the caller's section is left as given
    config = apply_rope_scaling(tiny_config("llama"), RopeConfig(type="yarn", original_max_position_embeddings=256, max_position_embeddings=512))
    assert config.rope_parameters["factor"] == 2.0
    with pytest.raises(ConfigError, match="original_max_position_embeddings is required"):
        apply_rope_scaling(tiny_config("llama"), RopeConfig(type="yarn", factor=4.0))
    with pytest.raises(ConfigError, match="set rope.factor or rope.max_position_embeddings"):
        apply_rope_scaling(tiny_config("llama"), RopeConfig(type="yarn", original_max_position_embeddings=256))
