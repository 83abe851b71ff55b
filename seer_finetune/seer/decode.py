"""Attention to a KV cache on the seer path: decode steps, and tokens appended to a filled cache.

transformers' attention modules update the cache before calling the attention function, so the function
receives the new queries `[B, Hq, q, D]` and every cached key/value `[B, Hkv, kv, D]` (kv > q). The prefill
that fills an empty cache has q == kv and runs the gates and the block-sparse kernels (`attention.py`); what
comes after it attends densely to the cache here, through transformers' own SDPA attention (GQA, the padding
mask of left-padded batches, lower-right causal alignment for several new tokens). Decode reads every cached
key once per token, which is memory-bound: dense decode is the baseline the issue asks for. A gate-selected
decode (each new token reading only the cache blocks its gate picks) is not built.

Queries shorter than the cache run on SDPA's flash, memory-efficient or math backends, never cuDNN's: PyTorch
builds a cuDNN graph per shape, so every decode step (one more cached key each time) paid a new graph, about
100 ms on an H100 (9 tokens/s for a 135M model at any length). Dense models generate the same way through the
`sdpa_cached` attention (`generation.use_cached_sdpa`); a prompt's prefill keeps PyTorch's own choice.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..generation import cache_sdpa_backends
from .gate import AttnGate


def attend_to_cache(
    module: nn.Module,
    gate: AttnGate,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float],
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Dense attention of new tokens to the whole cache.

    Args:
        module: The attention module (its `num_key_value_groups` tells SDPA the GQA ratio).
        gate: The module's gate; the q/k its hooks captured for these tokens are dropped (decode does not use
            them), so nothing of this call is left for the next prefill.
        query: post-RoPE `[B, Hq, q, D]`, the new tokens.
        key, value: `[B, Hkv, kv, D]`, the cache after the update (kv > q: the new tokens are its last q).
        attention_mask: boolean `[B, 1, q, kv]` from `masking.seer_mask` (transformers' SDPA mask: causal and
            padding), or None when every cached key is visible (one new token, no padding).
        scaling: softmax scale.
        dropout: must be 0.
        kwargs: the modeling code's other arguments; a non-null `sliding_window` is refused.

    Returns:
        (`[B, q, Hq, D]` attention output, None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gate.seer_captured.clear()
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("seer attention does not support sliding-window layers")
    if dropout:
        raise NotImplementedError("seer attention has no attention dropout: set the model's attention_dropout to 0")
    if key.shape[2] < query.shape[2]:
        raise ValueError(f"seer attention got {query.shape[2]} queries but only {key.shape[2]} keys")
    if attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            "seer attention with a filled KV cache expects transformers' [B, 1, q, kv] mask (from seer_mask), got "
            f"shape {tuple(attention_mask.shape)}"
        )
    with cache_sdpa_backends():
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling)
    return out, None
