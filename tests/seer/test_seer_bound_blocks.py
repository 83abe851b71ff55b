"""`attention.bound_blocks`: the logit bound of a block's mean query against its keys' max and min, and the
blocks each row keeps by it ahead of the gate's picks (with `attention.probe_blocks`' picks, which share that
tier, in the needle test)."""

from __future__ import annotations

import pytest
import torch

from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_finetune.seer.selection import SelectionPlan, block_candidates, logit_bound_scores
from seer_helpers import random_ids, tiny_model


def test_logit_bound_scores_against_a_naive_loop():
    """The bound of each block's mean query against each block's max and min keys, with grouped heads, a partial
    last block and padding; and it is an upper bound on the mean query's logit with every key of the block."""
    torch.manual_seed(0)
    block, length, heads, kv_heads, dim = 8, 37, 6, 2, 5
    q, k = torch.randn(2, length, heads, dim), torch.randn(2, length, kv_heads, dim)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    got = logit_bound_scores(q, k, valid, block)
    nb = -(-length // block)
    assert got.shape == (2, heads, nb, nb)
    for b in range(2):
        for h in range(heads):
            for i in range(nb):
                rows = [t for t in range(i * block, min(length, (i + 1) * block)) if valid[b, t]]
                mean = q[b, rows, h].mean(0) if rows else torch.zeros(dim)
                for j in range(nb):
                    cols = [t for t in range(j * block, min(length, (j + 1) * block)) if valid[b, t]]
                    keys = k[b, cols, h // (heads // kv_heads)] if cols else torch.zeros(1, dim)
                    hi, lo = keys.max(0).values, keys.min(0).values
                    expected = torch.maximum(mean * hi, mean * lo).sum()
                    assert got[b, h, i, j] == pytest.approx(expected.item(), abs=1e-5)
                    assert got[b, h, i, j] >= (keys @ mean).max() - 1e-5


@pytest.mark.parametrize("source", ["bound", "probe"])
@pytest.mark.parametrize("budget", ["row", "layer", "head", "threshold"])
def test_extra_picks_keep_the_needle_the_gate_ranks_last(budget, source):
    """A block the gate ranks last in every row but the logit bound (`bound_blocks`) or the probe scores
    (`probe_blocks`, probabilities) rank first is kept by every row that may take it; the density stays the same,
    and only candidates are kept."""
    torch.manual_seed(0)
    nb, heads, needle = 32, 3, 4
    cand = block_candidates(nb * 8, 8)
    scores = torch.randn(1, heads, nb, nb)
    scores[..., needle] = -30.0
    if source == "bound":
        extra = torch.randn(1, heads, nb, nb)
        extra[..., needle] = 30.0
    else:
        extra = torch.rand(1, heads, nb, nb) * 0.5
        extra[..., needle] = 1.0
    kw = dict(threshold=0.05) if budget == "threshold" else dict(density=0.5, budget=budget)
    if budget in ("layer", "head"):
        kw["row_mass"] = 0.3
    plain = SelectionPlan(cand, sink_blocks=1, local_blocks=2, **kw)
    plan = SelectionPlan(cand, sink_blocks=1, local_blocks=2, **{f"{source}_blocks": 1}, **kw)
    without, with_extra = plain.select(scores), plan.select(scores, **{source: extra})
    # Rows past the forced band around it (sink 0, local i-1 and i) with room beyond their forced blocks.
    rows = [i for i in range(needle + 2, nb) if budget == "threshold" or plan.quota[0, i] > plan.forced[0, i].sum()]
    assert len(rows) > 10
    assert not without[0, :, rows, needle].any()
    assert with_extra[0, :, rows, needle].all()
    assert not (with_extra & ~cand[:, None]).any()
    if budget == "threshold":
        # Those rows keep what the threshold keeps, and the needle besides.
        needle_column = (torch.arange(nb) == needle).expand(1, heads, len(rows), nb)
        assert torch.equal(with_extra[:, :, rows], without[:, :, rows] | needle_column)
    else:
        assert torch.equal(with_extra.sum(dim=(1, 2, 3)), without.sum(dim=(1, 2, 3)))
    if budget == "row":
        # Each row: forced blocks, the needle, then the gate's best up to the quota.
        for i in rows:
            for h in range(heads):
                rest = scores[0, h, i].masked_fill(~cand[0, i] | plan.forced[0, i], float("-inf"))
                rest[needle] = float("-inf")
                best = rest.topk(int(plan.quota[0, i] - plan.forced[0, i].sum()) - 1).indices
                expected = plan.forced[0, i].clone()
                expected[needle] = True
                expected[best] = True
                assert torch.equal(with_extra[0, h, i], expected)
        if source == "probe":
            # The same tier as the bound's picks: with the probe scores passed as the bound, the same selection.
            bound_plan = SelectionPlan(cand, sink_blocks=1, local_blocks=2, bound_blocks=1, **kw)
            assert torch.equal(with_extra, bound_plan.select(scores, bound=extra))
    message = "bound_blocks" if source == "bound" else "probe_blocks=1 selects with the probe scores: pass probe="
    with pytest.raises(ValueError, match=message):
        plan.select(scores)
    message = "bound_blocks" if source == "bound" else "probe_blocks=-1 must be >= 0"
    with pytest.raises(ValueError, match=message):
        SelectionPlan(cand, density=0.25, **{f"{source}_blocks": -1})


def test_bound_blocks_in_the_model_rank_by_the_gate_inputs_and_leave_the_oracle_alone():
    """In a forward, each row of layer 0 keeps its non-forced candidate of highest bound over the layer's pre-RoPE
    q and k projections, at the same density as without; oracle selection ignores the setting."""
    model = tiny_model("llama", max_position_embeddings=2048)
    ids = random_ids(1, 512)
    attn = model.model.layers[0].self_attn
    captured = {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    kw = dict(mode="joint", block_size=16, density=0.3, sink_blocks=1, local_blocks=2, budget="layer", compute_loss=False)
    rt = SeerRuntime(**kw)
    rt.training, rt.record_block_masks = False, True
    attach_seer_gates(model, rt, gate_hidden_size=16)
    masks = {}
    for bound_blocks, oracle in ((0, False), (1, False), (0, True), (1, True)):
        rt.configure(bound_blocks=bound_blocks, oracle=oracle)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        masks[bound_blocks, oracle] = {layer: m.clone() for layer, m in rt.block_masks.items()}
    for hook in hooks:
        hook.remove()
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    q = captured["q"].view(1, 512, cfg.num_attention_heads, dim)
    k = captured["k"].view(1, 512, cfg.num_key_value_heads, dim)
    cand = block_candidates(512, 16)
    plan = SelectionPlan(cand, density=0.3, sink_blocks=1, local_blocks=2, budget="layer", bound_blocks=1)
    top = logit_bound_scores(q, k, None, 16).masked_fill(~cand[:, None] | plan.forced[:, None], float("-inf"))
    best = top.argmax(-1)  # [1, H, nB]
    rows = (top.amax(-1) > float("-inf")) & (plan.quota[:, None] > plan.forced.sum(-1)[:, None])
    kept = masks[1, False][0].gather(-1, best[..., None])[..., 0]
    assert kept[rows].all() and rows.sum() > 20
    for layer in masks[0, False]:
        assert masks[1, False][layer].sum() == masks[0, False][layer].sum()
        assert torch.equal(masks[1, True][layer], masks[0, True][layer])
    assert not torch.equal(masks[1, False][0], masks[0, False][0])
