"""Shared builders for the SeerAttention tests: tiny random models of each supported architecture."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_config

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(model_type: str, *, seed: int = 0, sharpen: float = 1.0, **overrides):
    """A tiny random causal LM on SDPA, in eval mode and float32.

    Args:
        model_type: llama | mistral | qwen2 | qwen3.
        seed: Seed of the random weights.
        sharpen: Multiplies the q/k projections so attention is peaked (random tiny models attend almost
            uniformly, which gives the gates nothing to learn).
        overrides: Config fields (e.g. rope_parameters for YaRN).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    if sharpen != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(sharpen)
    return model.float().eval()


def packed_position_ids(lengths: list[int], batch: int = 1) -> torch.Tensor:
    """Position ids restarting at every document: `[batch, sum(lengths)]`."""
    return torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1).clone()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 2000, (batch, length), generator=g)
