"""`attention.probe_blocks`: the exact block-pooled attention of a few query tokens per block (`probe_scores`),
and the blocks each row keeps by it ahead of the gate's picks, beside the logit bound's."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import seer_kernels
from seer_finetune.compose import compose_config
from seer_finetune.config import AttentionConfig, ConfigError, ModelConfig, SeerConfig
from seer_finetune.seer import SeerRuntime, SeerSettings, attach_seer_gates, build_extension, load_gates
from seer_finetune.seer.probe import probe_positions, probe_scores
from seer_finetune.seer.saving import CONFIG_NAME
from seer_finetune.seer.selection import SelectionPlan, block_candidates
from seer_helpers import random_ids, tiny_model
from seer_kernels import pytorch_chunked

BLOCK, LENGTH, HEADS, KV_HEADS, DIM, SCALE = 16, 200, 6, 2, 8, 0.3


def _inputs(padding_from: int):
    """q `[2, Hq, L, D]`, k `[2, Hkv, L, D]`, document ids as `masking` writes them and the valid tokens: row 0 two
    packed documents (90 + 110 tokens), row 1 one document padded from `padding_from` on (padding tokens carry
    ids of their own, `L + p`)."""
    torch.manual_seed(0)
    q, k = 2.0 * torch.randn(2, HEADS, LENGTH, DIM), torch.randn(2, KV_HEADS, LENGTH, DIM)
    ids = torch.zeros(2, LENGTH, dtype=torch.long)
    ids[0, 90:] = 1
    ids[1, padding_from:] = torch.arange(padding_from, LENGTH) + LENGTH
    return q, k, ids, ids < LENGTH


def _naive_probe(q, k, ids, valid, block, probes, scale=SCALE):
    """The whole `[L, L]` softmax attention per row and head, its probe rows max-pooled over key blocks and over
    the block's valid probes, each row normalised (zeros without a valid probe); written entry by entry."""
    bsz, heads, length, dim = q.shape
    nb = -(-length // block)
    pos = torch.arange(length)
    expected = torch.full((bsz, heads, nb, nb), float("nan"))
    for b in range(bsz):
        allowed = (pos[None, :] <= pos[:, None]) & (ids[b, None, :] == ids[b, :, None]) & valid[b, None, :]
        for h in range(heads):
            logits = (q[b, h] @ k[b, h // (heads // k.shape[1])].T) * scale
            attn = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # [L, L]
            for i in range(nb):
                rows = {min(length - 1, i * block + (block // probes) * (t + 1) - 1) for t in range(probes)}
                rows = [p for p in sorted(rows) if valid[b, p]]
                for j in range(nb):
                    keys = attn[rows][:, j * block : (j + 1) * block] if rows else torch.zeros(1, 1)
                    expected[b, h, i, j] = keys.max()
                total = expected[b, h, i].sum()
                expected[b, h, i] = expected[b, h, i] / total if total > 0 else 0.0
    assert not expected.isnan().any()
    return expected


def test_probe_positions_are_evenly_strided_ending_at_each_block_and_clipped():
    assert probe_positions(40, 16, 1).tolist() == [[15], [31], [39]]
    assert probe_positions(40, 16, 4).tolist() == [[3, 7, 11, 15], [19, 23, 27, 31], [35, 39, 39, 39]]
    with pytest.raises(ValueError, match="probe_tokens=3 must divide block_size=16"):
        probe_positions(40, 16, 3)


@pytest.mark.parametrize("chunked", [False, True])
def test_every_token_a_probe_is_the_ground_truth(monkeypatch, chunked):
    """With r = block_size the probe is `seer_kernels.attention_ground_truth` (a partial last block, GQA ratio 3,
    two packed documents, trailing padding), except the padding-only rows: all zeros, where the ground truth counts
    each padding token as a query attending to itself; also when the logits come in chunks of a few blocks."""
    if chunked:
        monkeypatch.setattr(pytorch_chunked, "_PROBE_CHUNK_ELEMENTS", 2 * HEADS * BLOCK * 13 * BLOCK * 3)
    q, k, ids, valid = _inputs(padding_from=160)  # blocks 10-12 of row 1 are padding only
    got = probe_scores(q, k, block_size=BLOCK, probe_tokens=BLOCK, document_ids=ids, valid=valid, sm_scale=SCALE)
    truth = seer_kernels.attention_ground_truth(
        q, k, block_size=BLOCK, document_ids=ids, sm_scale=SCALE, kernel="pytorch"
    )
    assert got.shape == truth.shape == (2, HEADS, 13, 13) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], truth[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :, :10], truth[1, :, :10], rtol=1e-5, atol=1e-5)
    assert not got[1, :, 10:].any()
    torch.testing.assert_close(got.sum(-1)[0], torch.ones(HEADS, 13))


@pytest.mark.parametrize("probes, padding_from", [(1, 170), (2, 170), (4, 183), (BLOCK, 170)])
def test_probe_scores_against_the_full_attention(monkeypatch, probes, padding_from):
    """r = 1, 2, 4 and 16 probe tokens against the full softmax attention's probe rows, with padding that starts
    inside a block (its probes that are padding are skipped), in chunks of two query blocks."""
    monkeypatch.setattr(pytorch_chunked, "_PROBE_CHUNK_ELEMENTS", 2 * HEADS * probes * 13 * BLOCK * 2)
    q, k, ids, valid = _inputs(padding_from)
    got = probe_scores(q, k, block_size=BLOCK, probe_tokens=probes, document_ids=ids, valid=valid, sm_scale=SCALE)
    torch.testing.assert_close(got, _naive_probe(q, k, ids, valid, BLOCK, probes), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_probe_scores_default_scale_and_no_documents(monkeypatch, chunked):
    """Without document ids or padding: causal attention alone, at the kernels' default scale 1 / sqrt(D); in
    chunks of two query blocks too, where only each chunk's own key blocks are masked."""
    if chunked:
        monkeypatch.setattr(pytorch_chunked, "_PROBE_CHUNK_ELEMENTS", 2 * HEADS * 2 * 13 * BLOCK * 2)
    q, k, _, _ = _inputs(LENGTH)
    got = probe_scores(q, k, block_size=BLOCK, probe_tokens=2)
    everything = torch.ones(2, LENGTH, dtype=torch.bool)
    expected = _naive_probe(q, k, torch.zeros(2, LENGTH), everything, BLOCK, 2, scale=1.0 / math.sqrt(DIM))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_probe_scores_passes_the_kernel_choice():
    """`kernel` reaches `seer_kernels.probe_ground_truth`: the Triton kernel refuses this head_dim of 8 (the
    kernel's own results are checked in tests/kernels/test_probe_kernel.py), the PyTorch one computes it."""
    q, k, _, _ = _inputs(LENGTH)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16"):
        probe_scores(q, k, block_size=BLOCK, kernel="triton")
    on_pytorch = probe_scores(q, k, block_size=BLOCK, kernel="pytorch")
    torch.testing.assert_close(on_pytorch, probe_scores(q, k, block_size=BLOCK))


def _interleaved(bound_row, probe_row, allowed, bound_blocks, probe_blocks, room):
    """The rule written out: the bound's top list and the probe's top list (non-forced candidates), taken
    alternately bound first, a block on both lists once, the first `room` of them."""
    def top(values, count):
        order = sorted((j for j in range(len(values)) if allowed[j]), key=lambda j: -float(values[j]))
        return order[:count]

    bound_list, probe_list = top(bound_row, bound_blocks), top(probe_row, probe_blocks)
    merged = []
    for t in range(max(bound_blocks, probe_blocks)):
        for lst in (bound_list, probe_list):
            if t < len(lst) and lst[t] not in merged:
                merged.append(lst[t])
    return merged[:room]


@pytest.mark.parametrize("density", [0.2, 0.4])
@pytest.mark.parametrize("counts", [(2, 2), (1, 3), (3, 0), (0, 3)])
def test_bound_and_probe_picks_share_the_room_alternately(density, counts):
    """Both lists on: a row whose room (quota beyond its forced blocks) is smaller than their union keeps exactly
    the interleaved rule's first `room` picks and nothing of the gate; a row with more room keeps the whole union
    and the gate's best after it. Half the heads get probe scores equal to the bounds (the lists overlap)."""
    bound_blocks, probe_blocks = counts
    nb, heads = 32, 4
    cand = block_candidates(nb * 8, 8)
    torch.manual_seed(1)
    scores, bound, probe = torch.randn(1, heads, nb, nb), torch.randn(1, heads, nb, nb), torch.randn(1, heads, nb, nb)
    probe[:, :2] = bound[:, :2]
    plan = SelectionPlan(cand, density=density, sink_blocks=1, bound_blocks=bound_blocks, probe_blocks=probe_blocks)
    got = plan.select(scores, bound=bound, probe=probe)
    assert torch.equal(got.sum(-1), plan.quota[:, None].expand(1, heads, nb))
    tight = roomy = 0
    for h in range(heads):
        for i in range(nb):
            allowed = cand[0, i] & ~plan.forced[0, i]
            room = int(plan.quota[0, i] - plan.forced[0, i].sum())
            union = _interleaved(bound[0, h, i], probe[0, h, i], allowed, bound_blocks, probe_blocks, nb)
            picks = _interleaved(bound[0, h, i], probe[0, h, i], allowed, bound_blocks, probe_blocks, room)
            kept = got[0, h, i] & allowed
            assert kept[picks].all() and torch.equal(got[0, h, i] & plan.forced[0, i], plan.forced[0, i])
            if len(union) > room:
                tight += room > 0
                assert sorted(kept.nonzero()[:, 0].tolist()) == sorted(picks)
            elif room > len(union):
                roomy += 1
                rest = scores[0, h, i].masked_fill(~allowed, float("-inf"))
                rest[union] = float("-inf")
                expected = torch.zeros(nb, dtype=torch.bool)
                expected[union] = True
                expected[rest.topk(room - len(union)).indices] = True
                assert torch.equal(kept, expected)
    assert tight > 5 and roomy > 5
    # With a threshold (no quota) every pick of both lists is kept, besides what the threshold keeps.
    loose = SelectionPlan(cand, threshold=1.0, bound_blocks=bound_blocks, probe_blocks=probe_blocks)
    kept = loose.select(scores, bound=bound, probe=probe) & ~loose.forced[:, None]
    for h in range(heads):
        for i in (5, 17, 31):
            allowed = cand[0, i] & ~loose.forced[0, i]
            union = _interleaved(bound[0, h, i], probe[0, h, i], allowed, bound_blocks, probe_blocks, nb)
            assert sorted(kept[0, h, i].nonzero()[:, 0].tolist()) == sorted(union)


@pytest.mark.parametrize("budget", ["layer", "head"])
def test_bound_and_probe_picks_under_the_shared_budgets_stay_within_each_rows_room(budget):
    """Under the layer and head budgets the union is kept as under the row budget (the same picks, ahead of
    every other block), and the layer's total is unchanged."""
    nb, heads = 32, 4
    cand = block_candidates(nb * 8, 8)
    torch.manual_seed(2)
    scores, bound, probe = torch.randn(1, heads, nb, nb), torch.randn(1, heads, nb, nb), torch.randn(1, heads, nb, nb)
    kw = dict(density=0.3, sink_blocks=1, bound_blocks=2, probe_blocks=2)
    plan = SelectionPlan(cand, budget=budget, row_mass=0.2, **kw)
    got = plan.select(scores, bound=bound, probe=probe)
    row_plan = SelectionPlan(cand, **kw)
    picks = row_plan._extra_picks(bound, probe, cand[:, None], row_plan.forced[:, None])
    assert picks.sum() > 100 and (picks.sum(-1) <= row_plan._room()[..., 0]).all()
    assert not (picks & ~got).any()
    assert got.sum() == SelectionPlan(cand, budget=budget, density=0.3, sink_blocks=1).select(scores).sum()


def test_settings_check_the_probe_fields_and_the_oracle_ignores_them():
    with pytest.raises(ValueError, match="probe_blocks=-1 must be >= 0"):
        SeerSettings(probe_blocks=-1)
    for tokens in (0, 3, 128):
        with pytest.raises(ValueError, match=f"probe_tokens={tokens} must be in"):
            SeerSettings(block_size=64, probe_tokens=tokens)
    cand = block_candidates(128, 16)
    s = SeerSettings(mode="joint", block_size=16, density=0.5, bound_blocks=1, probe_blocks=2, probe_tokens=4)
    assert SelectionPlan.from_settings(cand, s).probe_blocks == 2
    oracle = SelectionPlan.from_settings(cand, dataclasses.replace(s, oracle=True))
    assert (oracle.bound_blocks, oracle.probe_blocks) == (0, 0)


def test_probe_blocks_in_the_model_rank_by_the_attention_and_leave_the_oracle_alone(monkeypatch):
    """In a forward, each row of layer 0 keeps its non-forced candidate of highest probe score over the
    attention's own post-RoPE q and k (as its kernel receives them), at the same density as without; oracle
    selection ignores the setting."""
    model = tiny_model("llama", max_position_embeddings=2048)
    ids = random_ids(1, 512)
    seen = []
    kernel = seer_kernels.block_sparse_attention

    def recording(query, key, value, block_mask, **kw):
        seen.append((query.detach().clone(), key.detach().clone(), kw["sm_scale"]))
        return kernel(query, key, value, block_mask, **kw)

    monkeypatch.setattr(seer_kernels, "block_sparse_attention", recording)
    rt = SeerRuntime(
        mode="joint", block_size=16, density=0.3, sink_blocks=1, local_blocks=2, budget="layer", compute_loss=False
    )
    rt.training, rt.record_block_masks = False, True
    attach_seer_gates(model, rt, gate_hidden_size=16)
    masks = {}
    for probe_blocks, oracle in ((0, False), (1, False), (0, True), (1, True)):
        rt.configure(probe_blocks=probe_blocks, probe_tokens=4, oracle=oracle)
        seen.clear()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        masks[probe_blocks, oracle] = {layer: m.clone() for layer, m in rt.block_masks.items()}
        if (probe_blocks, oracle) == (1, False):
            query, key, scale = seen[0]
    cand = block_candidates(512, 16)
    plan = SelectionPlan(cand, density=0.3, sink_blocks=1, local_blocks=2, budget="layer", probe_blocks=1)
    probe = probe_scores(query, key, block_size=16, probe_tokens=4, sm_scale=scale)
    top = probe.masked_fill(~cand[:, None] | plan.forced[:, None], float("-inf"))
    best = top.argmax(-1)  # [1, H, nB]
    rows = (top.amax(-1) > float("-inf")) & (plan.quota[:, None] > plan.forced.sum(-1)[:, None])
    kept = masks[1, False][0].gather(-1, best[..., None])[..., 0]
    assert kept[rows].all() and rows.sum() > 20
    for layer in masks[0, False]:
        assert masks[1, False][layer].sum() == masks[0, False][layer].sum()
        assert torch.equal(masks[1, True][layer], masks[0, True][layer])
    assert not torch.equal(masks[1, False][0], masks[0, False][0])


def test_probe_blocks_with_padding_in_the_model_keep_candidates_only():
    """A padded batch through the probe path (the valid tokens and the document ids reach `probe_scores`): masks
    are subsets of the candidates, at the density of the same forward without probes."""
    model = tiny_model("llama", max_position_embeddings=2048)
    ids = random_ids(2, 256)
    mask = torch.ones(2, 256, dtype=torch.long)
    mask[1, 200:] = 0
    rt = SeerRuntime(mode="joint", block_size=16, density=0.4, budget="row", compute_loss=False)
    rt.training, rt.record_block_masks = False, True
    attach_seer_gates(model, rt, gate_hidden_size=16)
    sums = []
    for probe_blocks in (0, 2):
        rt.configure(probe_blocks=probe_blocks, probe_tokens=2)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.isfinite(out).all()
        sums.append([m.sum() for m in rt.block_masks.values()])
    assert sums[0] == sums[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["attention.probe_blocks=-1"], "attention.probe_blocks=-1 must be >= 0"),
        (["attention.probe_tokens=0"], r"attention.probe_tokens=0 must be in \[1, attention.block_size=32\]"),
        (["attention.probe_tokens=64"], r"attention.probe_tokens=64 must be in \[1, attention.block_size=32\]"),
        (["attention.probe_tokens=3"], "attention.probe_tokens=3 must be in .* and divide it"),
    ],
)
def test_bad_probe_values_fail_at_compose_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["+exp=smoke_seer", *overrides])


def test_composed_probe_fields_reach_the_settings():
    cfg = compose_config(["+exp=smoke_seer", "attention.probe_blocks=2", "attention.probe_tokens=4"])
    s = SeerSettings.from_config(cfg.attention)
    assert (s.probe_blocks, s.probe_tokens) == (2, 4)
    default = SeerSettings.from_config(compose_config(["+exp=smoke_seer"]).attention)
    assert (default.probe_blocks, default.probe_tokens) == (0, 1)


def test_saved_gates_keep_the_probe_fields_and_older_files_load_without_them(tmp_path):
    attention = AttentionConfig(
        backend="seer", mode="joint", block_size=16, gate_hidden_size=16, density=0.5, probe_blocks=2, probe_tokens=16
    )
    cfg = SeerConfig(model=ModelConfig(name_or_path="tiny-llama"), attention=attention)
    ext = build_extension(tiny_model("llama"), cfg)
    ext.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (meta["probe_blocks"], meta["probe_tokens"]) == (2, 16)
    s = load_gates(tiny_model("llama"), tmp_path).settings
    assert (s.block_size, s.probe_blocks, s.probe_tokens) == (16, 2, 16)
    for name in ("probe_blocks", "probe_tokens"):
        del meta[name]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    s = load_gates(tiny_model("llama"), tmp_path).settings
    assert (s.probe_blocks, s.probe_tokens) == (0, 1)
