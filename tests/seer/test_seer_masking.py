"""The `seer` mask function: document ids equivalent to transformers' own dense masks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from seer_finetune.seer import register_seer
from seer_finetune.seer.masking import compaction_order, document_ids_from_mask, seer_mask, split_document_ids
from seer_helpers import packed_position_ids, tiny_model
from helpers import tiny_config


def _dense_from_ids(ids: torch.Tensor) -> torch.Tensor:
    length = ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal & (ids[:, :, None] == ids[:, None, :])


def _masks(attention_mask=None, position_ids=None, length=40, batch=2):
    """(SDPA's dense bool mask [B, L, L], the seer document ids) for the same inputs."""
    register_seer()
    config = tiny_config("llama")
    embeds = torch.zeros(batch, length, 8)
    config._attn_implementation = "sdpa"
    dense = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None,
        position_ids=position_ids, allow_is_causal_skip=False,
    )[:, 0]
    seer_config = copy.deepcopy(config)
    seer_config._attn_implementation = "seer"
    ids = create_causal_mask(
        config=seer_config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    return dense, ids


@pytest.mark.parametrize("case", ["left_and_right_padding", "packed", "hole_in_padding_mask"])
def test_document_ids_reproduce_sdpa_masks(case):
    length = 40
    mask, pos = None, None
    if case == "packed":
        pos = torch.stack([packed_position_ids([10, 17, 13])[0], packed_position_ids([1, 39])[0]])
    else:
        mask = torch.ones(2, length, dtype=torch.long)
        mask[0, :6] = 0
        mask[1, -9:] = 0
        if case == "hole_in_padding_mask":
            mask[1, 12:15] = 0
    dense, ids = _masks(mask, pos, length)
    assert ids.shape == (2, length) and ids.dtype == torch.long
    valid = split_document_ids(ids)
    rows = valid if mask is None else mask.bool()
    assert torch.equal(valid, rows)
    # on every real query row the allowed keys are the same (padding rows are undefined in both)
    assert torch.equal(_dense_from_ids(ids)[rows], dense[rows])
    if case == "packed":
        assert ids[0].tolist() == [0] * 10 + [1] * 17 + [2] * 13


def test_plain_causal_gives_no_ids_and_a_decode_step_reads_the_cache():
    register_seer()
    _, ids = _masks(length=16)
    assert ids is None  # a single unpadded document: plain causal attention
    ids = document_ids_from_mask(lambda b, h, q, k: k <= q, 1, 5)
    assert ids.tolist() == [[0, 0, 0, 0, 0]]
    # Queries over a filled cache get transformers' SDPA mask (causal with an offset, padding), not ids.
    pad = torch.tensor([[False, True, True, True]])
    mask = seer_mask(1, 2, 4, q_offset=2, attention_mask=pad, allow_is_causal_skip=False)
    assert mask.shape == (1, 1, 2, 4)
    assert mask[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
    model = tiny_model("llama")
    from seer_finetune.seer import SeerRuntime, attach_seer_gates

    attach_seer_gates(model, SeerRuntime(mode="dense", block_size=16), gate_hidden_size=8)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
        step = model(input_ids=torch.tensor([[8]]), cache=out.past_key_values, use_cache=True).logits[0, -1]
        whole = model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False).logits[0, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)


def test_sliding_window_models_are_refused():
    from transformers import AutoModelForCausalLM

    from seer_finetune.seer import SeerRuntime, attach_seer_gates

    model = AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=32))
    with pytest.raises(NotImplementedError, match="sliding"):
        attach_seer_gates(model, SeerRuntime(), gate_hidden_size=8)
    from seer_finetune.config import AttentionConfig, ConfigError, ModelConfig, SeerConfig
    from seer_finetune.seer import build_extension

    cfg = SeerConfig(model=ModelConfig(name_or_path="m"), attention=AttentionConfig(backend="seer"))
    with pytest.raises(ConfigError, match="attention.backend=seer: .*sliding"):
        build_extension(model, cfg)


def test_compaction_order_moves_padding_behind_the_real_tokens():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, False, False], [True, False, True, True, False]])
    order = compaction_order(valid)
    assert order.tolist() == [[2, 3, 4, 0, 1], [0, 1, 2, 3, 4], [0, 2, 3, 1, 4]]
    assert valid.gather(1, order).tolist() == [[True] * 3 + [False] * 2, [True] * 3 + [False] * 2, [True] * 3 + [False] * 2]
    # Nothing to move: right padding only, or none.
    assert compaction_order(valid[1:2]) is None and compaction_order(torch.ones(2, 4, dtype=torch.bool)) is None
    assert compaction_order(None) is None
