"""The `seer` mask function: transformers' attention mask, as per-token document ids in O(L).

transformers builds a mask through `AttentionMaskInterface`: it hands the mask function a `mask_function`
(causal, with packed sequences already folded in when position ids restart) and the 2D padding mask. SDPA
would expand these into an L x L boolean tensor; the seer path needs only which document each token belongs
to. A causal mask over contiguous documents is fully described by evaluating `mask_function` at two index
pairs per token: (q, q) (does the token see itself) and (q, q - 1) (does it see its predecessor, i.e. is it in
the same document). Padding tokens and tokens that cannot see themselves get an id of their own.

The ids returned: real tokens 0, 1, ... (one per document, non-decreasing along the sequence); an isolated
(padding) token at position p gets `L + p`. `split_document_ids` recovers the padding mask from that.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def document_ids_from_mask(
    mask_function: Callable,
    batch_size: int,
    seq_len: int,
    padding_mask: Optional[torch.Tensor] = None,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-token document ids equivalent to `mask_function` & padding, without building an L x L mask.

    Args:
        mask_function: transformers' index-based mask function `(batch_idx, head_idx, q_idx, kv_idx) -> bool`
            (vectorised over broadcast index tensors), describing causal attention within contiguous documents.
        batch_size: B.
        seq_len: L (queries and keys are the same L tokens).
        padding_mask: optional bool/int `[B, >=L]`, True/1 for real tokens.
        device: Where the ids live.

    Returns:
        int64 `[B, L]`.
    """
    b = torch.arange(batch_size, device=device)[:, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    q = torch.arange(seq_len, device=device)[None, :].expand(batch_size, seq_len)
    sees_self = torch.as_tensor(mask_function(b, h, q, q), device=device).expand(batch_size, seq_len).bool()
    prev = (q - 1).clamp_min(0)
    sees_prev = torch.as_tensor(mask_function(b, h, q, prev), device=device).expand(batch_size, seq_len).bool()
    new_doc = ~sees_prev
    new_doc[:, 0] = True
    ids = new_doc.long().cumsum(-1) - 1
    isolated = ~sees_self
    if padding_mask is not None:
        isolated = isolated | ~padding_mask[:, :seq_len].to(device=device, dtype=torch.bool)
    own = torch.arange(seq_len, device=device).expand(batch_size, seq_len) + seq_len
    return torch.where(isolated, own, ids)


def split_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """The padding mask encoded in ids from `document_ids_from_mask`: bool `[B, L]`, False for isolated tokens."""
    return document_ids < document_ids.shape[-1]


def seer_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> Optional[torch.Tensor]:
    """`AttentionMaskInterface` entry for the `seer` attention: document ids instead of a dense mask.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: as transformers passes them; the seer path runs
            full-sequence forwards only (no KV cache), so q_length must equal kv_length and offsets be 0.
        mask_function: transformers' mask function (causal, packed sequences folded in).
        attention_mask: optional 2D padding mask `[B, kv_length]`.
        device: where the ids live.
        kwargs: the other arguments transformers passes (dtype, config, use_vmap, ...), unused.

    Returns:
        int64 `[B, L]` document ids, or None when every row is one unpadded document (plain causal attention).
    """
    if q_length != kv_length or q_offset or kv_offset:
        raise NotImplementedError(
            "seer attention runs full-sequence forward passes only (no KV cache): call the model with use_cache=False"
        )
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function

        mask_function = causal_mask_function
    ids = document_ids_from_mask(mask_function, batch_size, q_length, attention_mask, device=device)
    if not bool(ids.any()):
        return None
    return ids
