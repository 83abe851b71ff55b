"""What a training step's forwards share: selection plans of document-free layouts kept across forwards, the plain
causal mask decided without the device, one gate rotary (and one copy of its block angles) for all layers."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import causal_mask_function

from seer_finetune.seer import SeerRuntime, attach_seer_gates, seer_gates
from seer_finetune.seer.masking import seer_mask
from seer_finetune.seer.runtime import LayoutCache
from seer_helpers import packed_position_ids, random_ids, tiny_model

LENGTH, BLOCK = 96, 16  # nB = 6


def _joint_model(seed: int = 0):
    model = tiny_model("llama", max_position_embeddings=4 * LENGTH).train()
    runtime = SeerRuntime(mode="joint", density=0.5, block_size=BLOCK, budget="layer", row_mass=0.3, kernel="pytorch")
    torch.manual_seed(seed)
    attach_seer_gates(model, runtime, gate_hidden_size=8)
    return model, runtime


def _plans(runtime: SeerRuntime) -> list:
    return list(runtime.forward.plans.values())


def test_a_document_free_layout_builds_its_plan_once_across_forwards():
    model, runtime = _joint_model()
    ids = random_ids(1, LENGTH)
    model(input_ids=ids, use_cache=False)
    first = _plans(runtime)
    model(input_ids=ids, use_cache=False)
    second = _plans(runtime)
    assert len(first) == 1 and second[0] is first[0]
    # Another length is another layout: its own plan, and the first one still kept.
    model(input_ids=random_ids(1, LENGTH - BLOCK), use_cache=False)
    assert _plans(runtime)[0] is not first[0]
    model(input_ids=ids, use_cache=False)
    assert _plans(runtime)[0] is first[0]
    # Packed documents: the plan follows this forward's document ids and is never kept across forwards.
    positions = packed_position_ids([40, 56])
    model(input_ids=ids, position_ids=positions, use_cache=False)
    packed = _plans(runtime)
    model(input_ids=ids, position_ids=positions, use_cache=False)
    assert _plans(runtime)[0] is not packed[0]


def test_kept_plans_train_as_plans_built_in_every_forward():
    ids = random_ids(1, LENGTH)
    grads = []
    for keep in (True, False):
        model, runtime = _joint_model()
        if not keep:
            runtime.lasting = LayoutCache(max_entries=0)  # keeps nothing: a new plan in every forward
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss + sum(runtime.take_losses().values())
            loss.backward()
        assert len(runtime.lasting) == (2 if keep else 0)  # the layout's candidates and its plan
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for kept, rebuilt in zip(*grads):
        torch.testing.assert_close(kept, rebuilt, rtol=0, atol=0)


def test_plans_kept_under_inference_mode_stay_out_of_training():
    model, runtime = _joint_model()
    ids = random_ids(1, LENGTH)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss + sum(runtime.take_losses().values())
    loss.backward()  # would refuse to save an inference tensor for backward
    assert all(p.grad is not None for p in seer_gates(model)[0].parameters())


def test_layout_cache_drops_the_least_recently_used():
    cache = LayoutCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    assert cache.get_or_make("a", lambda: 9) == 1 and cache.get_or_make("d", lambda: 4) == 4
    assert cache.get("d") == 4 and cache.get_or_make(None, lambda: 5) == 5 and len(cache) == 2


def test_plain_causal_attention_needs_no_document_ids_and_no_device_read():
    # On the meta device nothing can be read back: a mask function that looked at ids would fail here.
    assert seer_mask(2, 64, 64, mask_function=causal_mask_function, device="meta") is None
    assert seer_mask(2, 64, 64, device="meta") is None
    # Anything else still gets its ids: padding, or a folded-in packed-sequence function.
    pad = torch.ones(2, 64, dtype=torch.long)
    pad[0, :5] = 0
    ids = seer_mask(2, 64, 64, mask_function=causal_mask_function, attention_mask=pad)
    assert ids is not None and ids.shape == (2, 64)
    with pytest.raises(RuntimeError, match="meta"):  # another function is evaluated on the device
        seer_mask(2, 64, 64, mask_function=lambda b, h, q, k: k <= q, device="meta")


def test_gates_share_one_rotary_and_one_copy_of_its_block_angles():
    model, runtime = _joint_model()
    gates = seer_gates(model)
    assert len(gates) > 1 and all(g.rotary is gates[0].rotary for g in gates)
    model(input_ids=random_ids(1, LENGTH), use_cache=False)
    cos, sin = gates[0].rotary.seer_block_angles[1]
    assert cos.shape[-2] == LENGTH // BLOCK
    assert all(g._block_rotary(LENGTH // BLOCK, cos.device)[0] is cos for g in gates)
    # The shared module holds no state of its own: the gates' state dict is what it was per gate.
    assert not any("rotary" in k for g in gates for k in g.state_dict())
