"""At density 1.0 the seer path is exact attention: logits and gradients equal SDPA's, for every architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_helpers import ARCHS, packed_position_ids, random_ids, tiny_model


def _padded_batch(length: int):
    """Two rows: the first left-padded by 7 tokens, the second right-padded by 11."""
    ids = random_ids(2, length)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :7] = 0
    mask[1, -11:] = 0
    return ids, mask


def _seer_copy(model, mode="joint", block_size=16, density=1.0, record_block_masks=False, **kw):
    seer = copy.deepcopy(model)
    rt = SeerRuntime(mode=mode, block_size=block_size, density=density if mode == "joint" else None, **kw)
    rt.record_block_masks = record_block_masks
    attach_seer_gates(seer, rt, gate_hidden_size=32)
    return seer, rt


@pytest.mark.parametrize("arch", ARCHS)
def test_density_one_matches_sdpa_with_padding_and_packing(arch):
    model = tiny_model(arch)
    seer, rt = _seer_copy(model)
    assert seer.config._attn_implementation == "seer"

    ids, mask = _padded_batch(150)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        out = seer(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    # every layer ran the sparse path and kept all candidate blocks
    assert sorted(rt.stats[rt.forward.forward_id]) == sorted(
        f"{name}/{i}" for name in ("density", "density_heads", "gate_loss", "recall", "oracle_recall") for i in range(2)
    )
    # every head kept every candidate block too
    assert all(rt.stats[rt.forward.forward_id][f"density_heads/{i}"].tolist() == [1.0] * model.config.num_attention_heads for i in range(2))
    # every block kept: all of the ground truth is recalled
    assert all(float(rt.stats[rt.forward.forward_id][f"recall/{i}"]) == pytest.approx(1.0, abs=1e-5) for i in range(2))
    assert all(float(rt.stats[rt.forward.forward_id][f"density/{i}"]) == 1.0 for i in range(2))

    # packed documents whose boundaries fall inside blocks (40 + 53 + 57 tokens, block 16)
    pos = packed_position_ids([40, 53, 57], batch=2)
    ids = random_ids(2, 150, seed=3)
    with torch.no_grad():
        # use_cache=False: with a cache transformers does not treat restarting positions as packing
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        out = seer(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_mode_and_block_64_match_sdpa(arch):
    """Dense mode (gates unused) and a 64-token block with a partial last block (L = 200)."""
    model = tiny_model(arch)
    ids, mask = _padded_batch(200)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    for mode, block in (("dense", 32), ("joint", 64), ("gate_distill", 64)):
        seer, rt = _seer_copy(model, mode=mode, block_size=block)
        with torch.no_grad():
            out = seer(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5, msg=f"mode {mode} block {block}")
        assert bool(rt.take_losses()) == (mode != "dense")


def test_packed_documents_never_see_each_other():
    """The second document's logits are the same packed after another document as alone."""
    model = tiny_model("qwen2")
    seer, _ = _seer_copy(model, density=1.0)
    first, second = random_ids(1, 45, seed=5), random_ids(1, 70, seed=6)
    with torch.no_grad():
        packed = seer(
            input_ids=torch.cat([first, second], 1), position_ids=packed_position_ids([45, 70]), use_cache=False
        ).logits
        alone = seer(input_ids=second, use_cache=False).logits
    torch.testing.assert_close(packed[:, 45:], alone, rtol=1e-5, atol=1e-5)
    # without restarting positions the documents do mix, so the comparison above can fail
    with torch.no_grad():
        mixed = seer(input_ids=torch.cat([first, second], 1), use_cache=False).logits
    assert (mixed[:, 45:] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_gradients_match_sdpa_at_density_one(arch):
    model = tiny_model(arch)
    model.train()
    seer, _ = _seer_copy(model)
    seer.train()
    ids, mask = _padded_batch(120)
    # Only predictions made from real positions count: a padding position's output is undefined (SDPA and
    # the seer path treat a padding query differently), so the first real token of the left-padded row,
    # which would be predicted from a padding position, is not a target either.
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 7] = -100
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    seer(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref = dict(model.named_parameters())
    compared = 0
    for name, p in seer.named_parameters():
        if "seer_gate" in name:
            continue
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared == len(ref)


def _block_masked_attention(recorded: dict, block_size: int):
    """A plain autograd attention that keeps exactly the recorded blocks (per layer), for comparison."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        bsz, hq, length, _ = query.shape
        group = hq // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        blocks = recorded[module.layer_idx]
        token_blocks = torch.arange(length) // block_size
        allowed = blocks[:, :, token_blocks][:, :, :, token_blocks]  # [B, Hq, L, L]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, :, None] == attention_mask[:, None, None, :])
        scores = (query @ k.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return (probs @ v).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sparse_logits_and_gradients_match_a_dense_masked_reference(arch):
    """At density 0.5 the model equals plain masked attention over the selected blocks, values and gradients."""
    from transformers import AttentionInterface

    from seer_finetune.seer.masking import seer_mask
    from transformers.masking_utils import AttentionMaskInterface

    model = tiny_model(arch, sharpen=2.0)
    model.train()
    seer, rt = _seer_copy(model, density=0.5, record_block_masks=True, compute_loss=False)
    seer.train()
    ids = random_ids(2, 144, seed=4)
    pos = packed_position_ids([60, 84], batch=2)
    out = seer(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    out.loss.backward()
    recorded = {i: m.clone() for i, m in rt.block_masks.items()}
    assert all(not m.all() for m in recorded.values())  # something was actually dropped

    reference = copy.deepcopy(model)
    name = "seer_test_block_masked"
    AttentionInterface.register(name, _block_masked_attention(recorded, 16))
    AttentionMaskInterface.register(name, seer_mask)
    reference.set_attn_implementation(name)
    ref = reference(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    ref_params = dict(reference.named_parameters())
    for pname, p in seer.named_parameters():
        if "seer_gate" in pname:
            assert p.grad is None  # the LM loss never reaches the gates
            continue
        torch.testing.assert_close(p.grad, ref_params[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
