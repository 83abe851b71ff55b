"""The gate's rotary embeddings: the model's own rotary module rebuilt for the gate's width, applied at block
positions to the first `rotary_dim` of the gate's per-head features (partial RoPE).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

ROPE_UNITS = ("tokens", "blocks")


def gate_rotary_dim(hidden_size: int, fraction: float = 1.0) -> int:
    """How many of the gate's per-head features carry RoPE: the first `rotary_dim` of `hidden_size`.

    Features rotate in pairs (rotate-half), so the share is rounded down to an even count, and a positive share
    rotates at least one pair. The remaining `hidden_size - rotary_dim` features carry no position: their part of
    a score depends on the pooled content alone.

    Args:
        hidden_size: The gate's per-head width.
        fraction: Share of `hidden_size` to rotate, in (0, 1]. Default 1.0 (every feature of an even width).

    Returns:
        The even number of rotated features, in [2, hidden_size].

    Raises:
        ValueError: `fraction` outside (0, 1], or a width too narrow for one rotated pair.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"gate rope fraction {fraction!r} must be in (0, 1]")
    # The tolerance keeps a product that float arithmetic lands just under a whole number on that number
    # (0.58 * 100 = 57.99999999999999 would otherwise rotate 56 features, not 58).
    dims = max(2, 2 * (int(hidden_size * fraction + 1e-9) // 2))
    if dims > hidden_size:
        raise ValueError(f"gate hidden size {hidden_size} is too narrow for RoPE: it rotates features in pairs")
    return dims


def gate_rotary_embedding(
    model_config, rotary_module: nn.Module, hidden_size: int, *, block_size: int = 64, units: str = "tokens"
) -> nn.Module:
    """A rotary embedding of the model's own class and settings, sized for the gate's rotated width.

    The gate rotates pooled queries and keys at block positions (0, 1, 2, ... per block). With `units="tokens"`
    the model's scaling settings are kept as they are (as in the SeerAttention reference); they are lengths in
    tokens, so under YaRN the gate's block positions are interpolated only in dimensions whose wavelength
    exceeds the original length counted in blocks of tokens. With `units="blocks"` the lengths
    (`original_max_position_embeddings`, `max_position_embeddings`) are divided by the block size first, so the
    gate's positions are interpolated the way YaRN interpolates the model's: gates distilled at the native
    length meet, at 4x the length, the angles they were trained on (benchmarks/results/gate_rope_units.md).

    For partial RoPE pass the rotated width (`gate_rotary_dim`) as `hidden_size`: the module is then the model's
    rotary for a head of that width, so the rotated features span the model's whole frequency range (at a coarser
    spacing), and `apply_rotary` leaves the features beyond it as they are.

    Args:
        model_config: The model's config (its `rope_parameters`, YaRN included, are kept).
        rotary_module: The model's rotary embedding module (e.g. `model.model.rotary_emb`); its class is
            instantiated again on a copy of the config whose `head_dim` is `hidden_size`.
        hidden_size: The gate's rotated per-head width: its whole hidden size, or `gate_rotary_dim` of it.
        block_size: Tokens per block (used with `units="blocks"`). Default 64.
        units: `tokens` or `blocks`, see above. Default `tokens`.

    Returns:
        A module called as `rotary(x, position_ids) -> (cos, sin)`, each `[B, P, rotary_dim]`.
    """
    if units not in ROPE_UNITS:
        raise ValueError(f"gate rope units {units!r} must be one of {', '.join(ROPE_UNITS)}")
    config = copy.deepcopy(model_config)
    config.head_dim = hidden_size
    if units == "blocks":
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = max(1, int(rope["original_max_position_embeddings"]) // block_size)
            config.rope_parameters = rope
        if getattr(config, "max_position_embeddings", None):
            config.max_position_embeddings = max(1, int(config.max_position_embeddings) // block_size)
    return type(rotary_module)(config=config)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` features of `x [B, H, P, F]` (the rest pass through: partial RoPE).

    Uses the rotate-half convention of the Llama family, the one the models' own rotary modules produce.
    """
    rd = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
