"""YaRN context extension through transformers' own `rope_type: "yarn"`.

We never reimplement the rotary maths: we write the YaRN parameters into the model config and let
transformers' rope registry compute the frequencies and the attention factor. What we add is strictness:
transformers silently takes `max_position_embeddings` as the original length when
`original_max_position_embeddings` is missing, which would make a 4x extension a no-op; here that is an error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from transformers import PretrainedConfig

from .config import ConfigError, RopeConfig
from .validation import validate_rope


def native_context_length(model_config: PretrainedConfig) -> int:
    """The context length the base model was trained at, as its config states it."""
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "yarn" and rope.get("original_max_position_embeddings"):
        return int(rope["original_max_position_embeddings"])
    return int(model_config.max_position_embeddings)


def yarn_parameters(rope_cfg: RopeConfig, model_config: PretrainedConfig) -> dict[str, Any]:
    """The `rope_parameters` dict for transformers' YaRN, checked against the model.

    Args:
        rope_cfg: Validated rope section (`type: yarn`, factor and both lengths filled in by `validate`).
        model_config: The base model's config; its rope_theta and partial rotary factor are kept.

    Returns:
        A new `rope_parameters` dict with `rope_type: "yarn"`.

    Raises:
        ConfigError: if the base model already uses another RoPE scaling, or if the stated original length
            disagrees with the length the model was trained at.
    """
    current = dict(getattr(model_config, "rope_parameters", None) or {})
    current_type = current.get("rope_type", "default")
    if current_type not in ("default", "yarn"):
        raise ConfigError(
            f"rope.type=yarn: the model already uses rope_type={current_type!r}; YaRN is applied only to "
            "models with plain RoPE"
        )
    native = native_context_length(model_config)
    original = rope_cfg.original_max_position_embeddings
    if original != native:
        raise ConfigError(
            f"rope.original_max_position_embeddings={original} but the model was trained at {native} tokens "
            f"(its config's max_position_embeddings); set rope.original_max_position_embeddings={native}"
        )
    if "rope_theta" not in current:
        raise ConfigError("rope.type=yarn: the model config has no rope_theta to extend")
    params: dict[str, Any] = {
        "rope_type": "yarn",
        "rope_theta": current["rope_theta"],
        "factor": float(rope_cfg.factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": float(rope_cfg.beta_fast),
        "beta_slow": float(rope_cfg.beta_slow),
    }
    if "partial_rotary_factor" in current:
        params["partial_rotary_factor"] = current["partial_rotary_factor"]
    if rope_cfg.attention_factor is not None:
        params["attention_factor"] = float(rope_cfg.attention_factor)
    return params


def apply_rope_scaling(model_config: PretrainedConfig, rope_cfg: RopeConfig) -> PretrainedConfig:
    """Write YaRN into `model_config` in place (no-op for `type: none`) and return it.

    The target length becomes the config's `max_position_embeddings`, so a saved model reloads with the
    extended context and the same rotary frequencies.
    """
    if rope_cfg.type == "none":
        return model_config
    # Fill in a missing factor or target length (and check them) on a copy: callers may skip `validate`.
    rope_cfg = validate_rope(dataclasses.replace(rope_cfg))
    model_config.rope_parameters = yarn_parameters(rope_cfg, model_config)
    model_config.max_position_embeddings = int(rope_cfg.max_position_embeddings)
    return model_config


def default_yarn_attention_factor(factor: float) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1, used when none is configured."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
