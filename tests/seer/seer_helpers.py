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


def topic_model(model_type: str, *, sharpen: float = 3.0, topics: int = 4, per_topic: int = 50, seed: int = 0):
    """A tiny model whose attention is predictable at block level: tokens of one topic attend to each other.

    The embeddings of a topic's `per_topic` tokens are one topic vector plus small noise, and every query
    projection equals its KV head's key projection (times `sharpen`), so attention concentrates on earlier
    tokens of the same topic. Random tiny models attend almost uniformly, which leaves a gate nothing to learn.
    """
    model = tiny_model(model_type, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        centres = torch.randn(topics, emb.shape[1], generator=g)
        for t in range(topics):
            rows = slice(2 + t * per_topic, 2 + (t + 1) * per_topic)
            emb[rows] = centres[t] + 0.3 * torch.randn(per_topic, emb.shape[1], generator=g)
        for layer in model.model.layers:
            attn = layer.self_attn
            k = attn.k_proj.weight.view(-1, attn.head_dim, attn.k_proj.weight.shape[1])
            q = k.repeat_interleave(attn.num_key_value_groups, 0).reshape(-1, k.shape[-1])
            attn.q_proj.weight.copy_(q * sharpen)
    return model


def topic_ids(batch: int, length: int, block: int, seed: int, topics: int = 4, per_topic: int = 50) -> torch.Tensor:
    """Token ids whose `block`-token blocks each draw from one random topic (see `topic_model`)."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-length // block)
    topic = torch.randint(0, topics, (batch, nb), generator=g).repeat_interleave(block, 1)[:, :length]
    return 2 + topic * per_topic + torch.randint(0, per_topic, (batch, length), generator=g)
