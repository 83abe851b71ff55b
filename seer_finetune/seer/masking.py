"""The `seer` mask function: transformers' attention mask, as per-token document ids in O(L).

transformers builds a mask through `AttentionMaskInterface`: it hands the mask function a `mask_function`
(causal, with packed sequences already folded in when position ids restart) and the 2D padding mask. SDPA
would expand these into an L x L boolean tensor; the seer path needs only which document each token belongs
to. A causal mask over contiguous documents is fully described by evaluating `mask_function` at two index
pairs per token: (q, q) (does the token see itself) and (q, q - 1) (does it see its predecessor, i.e. is it in
the same document). Padding tokens and tokens that cannot see themselves get an id of their own.

The ids returned: real tokens 0, 1, ... (one per document, non-decreasing along the sequence); an isolated
(padding) token at position p gets `L + p`. `split_document_ids` recovers the padding mask from that.

With a KV cache (generation), a forward whose queries are fewer than its keys (a decode step, or tokens
appended to a filled cache) attends densely to the cache (`decode.py`); its mask is then transformers' own
SDPA mask `[B, 1, q, kv]` (or None where SDPA's own causal flag suffices), built by `transformers.masking_utils.
sdpa_mask`. The prefill that fills an empty cache has as many queries as keys and gets document ids as above.
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


def compaction_order(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per row, the token order that puts the real tokens first (in their order) and padding after them.

    Left padding (batched generation) shifts a prompt's tokens against the block grid, so a left-padded prompt
    would get other blocks, other gate scores and another selection than the same prompt alone. Attending in
    the compacted order gives every prompt the blocks it has alone: its real tokens start at block 0, and the
    padding (each token attending only to itself) comes after them, where no real query can see it.

    Args:
        valid: bool `[B, L]`, False for padding tokens (from `split_document_ids`), or None.

    Returns:
        int64 `[B, L]` (position in the original row of the token that goes to each place), or None when no
        padding token comes before a real one (nothing to move).
    """
    return padding_layout(valid)[0]


def padding_layout(valid: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], bool]:
    """`compaction_order(valid)`, and whether any token is padding, from one read of the device.

    Attention reads this once per forward: without padding the gates pool whole blocks without a mask.

    Args:
        valid: bool `[B, L]`, False for padding tokens (from `split_document_ids`), or None.

    Returns:
        (the compaction order or None, as `compaction_order`; True when some token is padding).
    """
    if valid is None:
        return None, False
    # A padding token before a real one: somewhere a False is followed (not necessarily directly) by a True.
    later_real = valid.flip(-1).cummax(-1).values.flip(-1)
    padded = ~valid
    any_padding, padding_first = torch.stack([padded.any(), (later_real & padded).any()]).tolist()
    if not padding_first:
        return None, bool(any_padding)
    return torch.argsort(padded.to(torch.int8), dim=-1, stable=True), True


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
        batch_size, q_length, kv_length, q_offset, kv_offset: as transformers passes them. A full-sequence
            forward (no cache, or the prefill of an empty one) has q_length == kv_length and no offsets.
        mask_function: transformers' mask function (causal, packed sequences folded in).
        attention_mask: optional 2D padding mask `[B, kv_length]`.
        device: where the ids live.
        kwargs: the other arguments transformers passes (dtype, config, use_vmap, allow_is_causal_skip, ...).

    Returns:
        Full-sequence forward: int64 `[B, L]` document ids, or None when every row is one unpadded document (plain
        causal attention). Queries attending to a cache: transformers' boolean SDPA mask `[B, 1, q_length,
        kv_length]`, or None where none is needed.
    """
    if q_length != kv_length or kv_offset or (not isinstance(q_offset, torch.Tensor) and q_offset):
        from transformers.masking_utils import causal_mask_function, sdpa_mask

        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function if mask_function is not None else causal_mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=bool(kwargs.get("allow_is_causal_skip", True)),
            device=device,
        )
    from transformers.masking_utils import causal_mask_function

    if mask_function is None:
        mask_function = causal_mask_function
    if attention_mask is None and mask_function is causal_mask_function:
        # transformers passes its plain causal function when nothing else (packed sequences, padding, an overlay)
        # applies: one unpadded document per row, known without building ids or reading them back.
        return None
    ids = document_ids_from_mask(mask_function, batch_size, q_length, attention_mask, device=device)
    if not bool(ids.any()):
        return None
    return ids
