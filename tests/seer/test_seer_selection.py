"""Block candidates, selection by density / threshold, realised density and the gate loss."""

from __future__ import annotations

import copy

import pytest
import torch

from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_finetune.seer.runtime import SeerSettings
from seer_finetune.seer.selection import (
    block_recall,
    row_quotas,
    block_candidates,
    forced_blocks,
    gate_log_probs,
    gate_loss,
    realised_density,
    SelectionPlan,
    tempered_log_probs,
)
from seer_helpers import packed_position_ids, random_ids, tiny_model


def _brute_candidates(doc_ids: torch.Tensor, valid: torch.Tensor, block: int) -> torch.Tensor:
    """Token-level allowed pairs (causal, same document, padding sees only itself) pooled to blocks."""
    bsz, length = doc_ids.shape
    nb = -(-length // block)
    out = torch.zeros(bsz, nb, nb, dtype=torch.bool)
    for b in range(bsz):
        for r in range(length):
            for c in range(r + 1):
                same = doc_ids[b, r] == doc_ids[b, c] and (bool(valid[b, r] and valid[b, c]) or r == c)
                if same:
                    out[b, r // block, c // block] = True
    return out


def test_candidates_equal_brute_force_with_documents_and_padding():
    length, block = 70, 8
    docs = torch.tensor([0] * 20 + [1] * 3 + [2] * 30 + [3] * 17)
    doc_ids = torch.stack([docs, torch.zeros(length, dtype=torch.long)])
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :13] = False  # left padding, with ids of their own
    doc_ids[1, :13] = torch.arange(13) + length
    got = block_candidates(length, block, doc_ids, valid)
    assert torch.equal(got, _brute_candidates(doc_ids, valid, block))
    assert torch.equal(block_candidates(length, block, batch_size=2), torch.ones(2, 9, 9, dtype=torch.bool).tril())


@pytest.mark.parametrize("nb", [32, 64, 128])
@pytest.mark.parametrize("density", [0.5, 0.1])
def test_realised_density_within_two_points(nb, density):
    """50% and 90% sparsity at several lengths, with and without packed documents."""
    block = 16
    length = nb * block - 5  # a partial last block
    torch.manual_seed(nb)
    scores = torch.randn(2, 3, nb, nb)
    cuts = sorted(torch.randperm(length - 1)[:3].add(1).tolist())
    bounds = torch.zeros(length, dtype=torch.long)
    bounds[cuts] = 1
    doc_ids = torch.stack([torch.zeros(length, dtype=torch.long), bounds.cumsum(0)])
    cand = block_candidates(length, block, doc_ids)
    mask = SelectionPlan(cand, density=density).select(scores)
    for b in range(2):
        got = float(realised_density(mask[b : b + 1], cand[b : b + 1]))
        assert abs(got - density) <= 0.02, (b, got)
    # a subset of the candidates, with the diagonal always kept
    assert not (mask & ~cand[:, None]).any()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    # rows keep about d * n of their n candidates: at most one block above their share, never below the
    # forced diagonal, and every row's shortfall is what pays for earlier forced surpluses
    n = cand.sum(-1)[:, None].expand(-1, 3, -1).double()
    kept = mask.sum(-1).double()
    assert (kept >= 1).all()
    assert (kept <= torch.clamp(torch.ceil(density * n), min=1)).all()


def test_row_quotas_follow_the_running_total():
    cand = block_candidates(10 * 4, 4)  # rows have 1..10 candidates
    quotas = row_quotas(cand, 0.5)[0]
    assert quotas.sum().item() == round(0.5 * 55)
    assert ((quotas - 0.5 * torch.arange(1, 11)).abs() < 1).all()
    # at 10% the first rows' forced diagonals exceed their share; later rows pay it back
    quotas = row_quotas(block_candidates(40 * 4, 4), 0.1)[0]
    assert (quotas >= 1).all()
    assert quotas.sum().item() == round(0.1 * 40 * 41 / 2)
    # infeasible targets keep the forced blocks only
    quotas = row_quotas(block_candidates(10 * 4, 4), 0.01, sink_blocks=1)[0]
    assert quotas.tolist() == [1] + [2] * 9


def test_density_keeps_highest_scores_and_sinks():
    nb = 12
    cand = block_candidates(nb * 4, 4)
    scores = torch.arange(nb, dtype=torch.float32).flip(0).expand(1, 1, nb, nb).clone()  # earlier blocks score higher
    mask = SelectionPlan(cand, density=0.25).select(scores)
    row = mask[0, 0, 11]  # 12 candidates -> 3 kept: the diagonal plus the two best (blocks 0 and 1)
    assert row.nonzero().flatten().tolist() == [0, 1, 11]
    scores = torch.arange(nb, dtype=torch.float32).expand(1, 1, nb, nb).clone()  # later blocks score higher
    mask = SelectionPlan(cand, density=0.25, sink_blocks=1).select(scores)
    quotas = row_quotas(cand, 0.25, sink_blocks=1)[0]
    assert mask[0, 0, :, 0].all() and mask[0, 0].diagonal().all()
    for i in range(nb):
        kept = mask[0, 0, i].nonzero().flatten().tolist()
        assert len(kept) == quotas[i]
        # besides the sink and the diagonal, the latest (highest-scoring) blocks are kept
        extra = sorted(set(kept) - {0, i})
        assert extra == list(range(i - len(extra), i))
    forced = forced_blocks(cand, sink_blocks=2)
    assert forced[0, 11].nonzero().flatten().tolist() == [0, 1, 11]


def test_threshold_selection_keeps_probable_blocks():
    torch.manual_seed(0)
    nb = 20
    cand = block_candidates(nb * 8, 8)
    scores = torch.randn(1, 2, nb, nb) * 3
    probs = gate_log_probs(scores, cand).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, nb))
    mask = SelectionPlan(cand, threshold=0.1).select(scores)
    expected = (probs >= 0.1) | torch.eye(nb, dtype=torch.bool)
    assert torch.equal(mask, expected & cand[:, None])
    with pytest.raises(ValueError, match="exactly one"):
        SelectionPlan(cand).select(scores)
    with pytest.raises(ValueError, match="density"):
        SelectionPlan(cand, density=1.5).select(scores)


def test_block_recall_against_brute_force_and_the_oracle_bound():
    """Recall is the kept share of each row's ground truth; the oracle keeps as many blocks, the largest ones."""
    torch.manual_seed(5)
    nb, rows = 12, 7
    gt = torch.rand(2, 3, rows, nb) ** 4
    gt[..., 9:] = 0.0  # blocks outside the row's candidates carry no ground truth
    gt = gt / gt.sum(-1, keepdim=True)
    mask = torch.rand(2, 3, rows, nb) < 0.3
    mask[..., 0] = True  # every row keeps at least one block (its diagonal, in the model)
    recall, oracle = block_recall(mask, gt)
    want_recall, want_oracle = [], []
    for b in range(2):
        for h in range(3):
            for r in range(rows):
                kept = [j for j in range(nb) if mask[b, h, r, j]]
                want_recall.append(sum(float(gt[b, h, r, j]) for j in kept))
                want_oracle.append(sum(sorted((float(x) for x in gt[b, h, r]), reverse=True)[: len(kept)]))
    assert float(recall) == pytest.approx(sum(want_recall) / len(want_recall), rel=1e-5)
    assert float(oracle) == pytest.approx(sum(want_oracle) / len(want_oracle), rel=1e-5)
    assert float(recall) < float(oracle) < 1.0
    # a selection of the largest blocks is its own oracle; keeping everything recalls all
    top = gt >= gt.sort(-1, descending=True).values[..., 2:3]
    assert float(block_recall(top, gt)[0]) == pytest.approx(float(block_recall(top, gt)[1]), rel=1e-6)
    assert float(block_recall(torch.ones_like(mask), gt)[0]) == pytest.approx(1.0, rel=1e-6)


def test_gate_loss_kl_and_mse():
    torch.manual_seed(1)
    nb = 6
    cand = block_candidates(nb * 4, 4)
    log_q = gate_log_probs(torch.randn(1, 1, nb, nb), cand)
    gt = gate_log_probs(torch.randn(1, 1, nb, nb), cand).exp()
    kl = gate_loss(log_q, gt, cand, kind="kl")
    brute = sum(
        float(gt[0, 0, i, j] * (gt[0, 0, i, j].log() - log_q[0, 0, i, j])) for i in range(nb) for j in range(i + 1)
    ) / nb
    assert abs(float(kl) - brute) < 1e-5
    assert float(gate_loss(log_q, log_q.exp(), cand)) == pytest.approx(0.0, abs=1e-6)
    mse = gate_loss(log_q, gt, cand, kind="mse")
    assert float(mse) == pytest.approx(float(((log_q.exp() - gt) ** 2).sum(-1).mean()), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.25, 0.5, 2.0])
def test_gate_loss_against_a_ground_truth_at_a_temperature(temperature):
    """`target_temperature=T` compares with each row's `p ** (1 / T)` renormalised (a float64 brute force), keeps
    blocks without ground truth at zero (a row with none gives no loss and no NaN), and is the plain loss at 1."""
    torch.manual_seed(2)
    nb = 6
    cand = block_candidates(nb * 4, 4)
    log_q = gate_log_probs(torch.randn(1, 2, nb, nb), cand)
    gt = gate_log_probs(torch.randn(1, 2, nb, nb) * 4, cand).exp()
    gt[0, 0, 3, 1] = 0.0  # a candidate block without attention mass
    gt[0, 1, 4] = 0.0  # a row without ground truth
    got = gate_loss(log_q, gt, cand, kind="kl", target_temperature=temperature)
    brute = 0.0
    for h in range(2):
        for i in range(nb):
            row = gt[0, h, i].double() ** (1 / temperature)
            if row.sum() == 0:
                continue
            row = row / row.sum()
            brute += sum(float(row[j] * (row[j].log() - log_q[0, h, i, j])) for j in range(i + 1) if row[j] > 0)
    assert float(got) == pytest.approx(brute / (2 * nb), rel=1e-5, abs=1e-6)
    assert float(gate_loss(log_q, gt, cand, target_temperature=1.0)) == float(gate_loss(log_q, gt, cand))


def test_gate_target_temperature_is_validated():
    from seer_finetune.compose import compose_config
    from seer_finetune.config import ConfigError

    assert compose_config(["+exp=smoke_seer", "attention.gate_target_temperature=0.5"]).attention.gate_target_temperature == 0.5
    with pytest.raises(ConfigError, match=r"attention.gate_target_temperature=0.0 must be > 0"):
        compose_config(["+exp=smoke_seer", "attention.gate_target_temperature=0"])
    with pytest.raises(ValueError, match="target_temperature=-1.0 must be > 0"):
        SeerSettings(target_temperature=-1.0)


@pytest.mark.parametrize("power", [0.5, 2.0])
def test_tempered_log_probs_against_a_float64_power(power):
    """Each row's `q ** power` renormalised (float64 brute force): the order within a row is kept, blocks outside
    the candidates stay -inf, a row without any candidate stays -inf (no NaN), and power 1 changes nothing."""
    torch.manual_seed(3)
    nb = 7
    cand = block_candidates(nb * 4, 4)
    log_q = gate_log_probs(torch.randn(2, 3, nb, nb) * 3, cand)
    log_q[1, 2, 5] = float("-inf")  # a row without candidates (e.g. all padding)
    got = tempered_log_probs(log_q, power)
    q = log_q.double().exp() ** power
    want = (q / q.sum(-1, keepdim=True)).log()
    want[1, 2, 5] = float("-inf")
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.isinf(), log_q.isinf())
    order = [torch.sort(x, dim=-1, descending=True, stable=True).indices for x in (got, log_q)]
    assert torch.equal(*order)
    torch.testing.assert_close(tempered_log_probs(log_q, 1.0), log_q, rtol=0, atol=1e-6)


def test_selection_temperature_reweighs_rows_under_the_layer_budget_only():
    """`selection_temperature` changes which rows and heads the layer budget favours, never a row budget's picks
    (the order within a row is kept), and is resolved from the config: the target temperature unless set."""
    from seer_finetune.compose import compose_config
    from seer_finetune.config import ConfigError

    model = tiny_model("llama", sharpen=4.0, max_position_embeddings=1024)
    ids = random_ids(1, 640)

    def masks(budget: str, temperature: float) -> dict[int, torch.Tensor]:
        seer = copy.deepcopy(model)
        rt = SeerRuntime(mode="joint", block_size=16, density=0.2, budget=budget, compute_loss=False,
                         selection_temperature=temperature, kernel="pytorch")
        torch.manual_seed(5)
        attach_seer_gates(seer, rt, gate_hidden_size=16)
        rt.record_block_masks = True
        with torch.no_grad():
            seer(input_ids=ids, use_cache=False)
        return {i: m.clone() for i, m in rt.block_masks.items()}

    row, row_tempered = masks("row", 1.0), masks("row", 0.25)
    assert all(torch.equal(row[i], row_tempered[i]) for i in row)
    layer, layer_tempered = masks("layer", 1.0), masks("layer", 0.25)
    assert any(not torch.equal(layer[i], layer_tempered[i]) for i in layer)
    assert all(int(layer[i].sum()) == int(layer_tempered[i].sum()) for i in layer)  # same budget, other blocks

    def resolved(*overrides: str) -> float:
        return SeerSettings.from_config(compose_config(["+exp=smoke_seer", *overrides]).attention).selection_temperature

    assert resolved() == 1.0
    assert resolved("attention.gate_target_temperature=0.5") == 1.0  # a sharpened target leaves selection alone
    assert resolved("attention.gate_target_temperature=0.5", "attention.gate_selection_temperature=0.5") == 0.5
    with pytest.raises(ConfigError, match=r"attention.gate_selection_temperature=0.0 must be > 0"):
        compose_config(["+exp=smoke_seer", "attention.gate_selection_temperature=0"])
    with pytest.raises(ValueError, match="selection_temperature=0.0 must be > 0"):
        SeerSettings(selection_temperature=0.0)


def test_model_density_per_layer_within_two_points():
    """Realised density reported by the model at L = 1024 (64 blocks of 16), with packed documents."""
    model = tiny_model("llama", max_position_embeddings=2048)
    for density in (0.5, 0.1):
        seer = copy.deepcopy(model)
        rt = SeerRuntime(mode="joint", block_size=16, density=density, compute_loss=False)
        attach_seer_gates(seer, rt, gate_hidden_size=16)
        with torch.no_grad():
            seer(input_ids=random_ids(1, 1024), position_ids=packed_position_ids([300, 724]), use_cache=False)
        stats = rt.take_stats()
        assert sorted(stats) == ["density/0", "density/1", "density_heads/0", "density_heads/1"]
        for layer in range(2):
            value, heads = stats[f"density/{layer}"], stats[f"density_heads/{layer}"]
            assert abs(value - density) <= 0.02, (density, layer, value)
            # one value per query head, averaging to the layer's density
            assert len(heads) == model.config.num_attention_heads and sum(heads) / len(heads) == pytest.approx(value, abs=1e-6)


def test_local_blocks_force_a_band_ending_at_the_diagonal():
    nb = 10
    cand = block_candidates(nb * 4, 4)
    forced = forced_blocks(cand, local_blocks=3)
    for i in range(nb):
        assert forced[0, i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
    # sink and band together; the band never reaches into an earlier packed document
    ids = torch.tensor([[0] * 16 + [1] * 24])  # documents of blocks 0-3 and 4-9
    cand_docs = block_candidates(40, 4, ids)
    forced = forced_blocks(cand_docs, sink_blocks=1, local_blocks=2)
    assert forced[0, 5].nonzero().flatten().tolist() == [4, 5]
    assert forced[0, 8].nonzero().flatten().tolist() == [4, 7, 8]
    assert forced[0, 4].nonzero().flatten().tolist() == [4]
    # quotas count the band: with later blocks scoring lowest, the kept blocks are the band plus the best
    scores = torch.arange(nb, dtype=torch.float32).flip(0).expand(1, 1, nb, nb).clone()
    mask = SelectionPlan(cand, density=0.4, local_blocks=2).select(scores)
    quotas = row_quotas(cand, 0.4, local_blocks=2)[0]
    assert quotas.sum().item() == round(0.4 * nb * (nb + 1) / 2)
    for i in range(nb):
        kept = mask[0, 0, i].nonzero().flatten().tolist()
        assert len(kept) == quotas[i] and {max(0, i - 1), i} <= set(kept)
        extra = sorted(set(kept) - {i - 1, i})
        assert extra == list(range(len(extra)))


def test_oracle_selection_ranks_by_the_true_pooled_attention():
    """`oracle=True` keeps, per layer, the blocks the model's own block-max-pooled attention ranks highest."""
    import seer_kernels
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_model("llama", sharpen=3.0, max_position_embeddings=2048)
    ids = random_ids(1, 512)
    truth = {}

    def probe(module, q, k, v, mask, **kwargs):
        truth[module.layer_idx] = seer_kernels.attention_ground_truth(q, k, block_size=16, sm_scale=kwargs.get("scaling"))
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("test_probe", probe)
    model.set_attn_implementation("test_probe")
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.set_attn_implementation("sdpa")
    cand = block_candidates(512, 16)
    # Layer 0 sees the same input sparse or dense, so its mask must be the top blocks of the dense truth.
    expected = SelectionPlan(cand, density=0.5, sink_blocks=1, local_blocks=2).select(torch.log(truth[0]))
    rt = SeerRuntime(mode="joint", block_size=16, density=0.5, sink_blocks=1, local_blocks=2, oracle=True,
                     compute_loss=False)
    rt.training, rt.record_block_masks = False, True
    attach_seer_gates(model, rt, gate_hidden_size=16)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert torch.equal(rt.block_masks[0], expected)
    # The (random) gates select differently.
    rt.configure(oracle=False)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert not torch.equal(rt.block_masks[0], expected)
    # With a gate loss recorded too, the oracle's ground truth serves it: layer 0's loss is the gate-selection one.
    losses = {}
    for oracle in (False, True):
        rt.configure(oracle=oracle, compute_loss=True)
        rt.take_stats()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        losses[oracle] = rt.take_stats()["gate_loss/0"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6) and losses[False] > 0


def _kept_mass(mask: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.exp().masked_fill(~mask, 0.0).sum()


@pytest.mark.parametrize("sink,local", [(0, 1), (1, 2)])
def test_layer_budget_keeps_the_same_count_and_the_most_mass(sink, local):
    """`budget="layer"` spends exactly the row quotas' total per batch element, keeps every forced block, and
    keeps at least the probability mass of the per-row selection (it is the best subset of that size)."""
    torch.manual_seed(0)
    length, block, heads = 300, 8, 3  # 38 blocks, the last one partial
    ids = torch.tensor([[0] * 120 + [1] * 180, [0] * 300])  # packed documents in element 0 only
    cand = block_candidates(length, block, ids)
    scores = torch.randn(2, heads, cand.shape[-1], cand.shape[-1]) * 3
    log_probs = gate_log_probs(scores, cand)
    forced = forced_blocks(cand, sink, local)[:, None].expand_as(scores)
    for density in (0.1, 0.5, 1.0):
        forced_kw = dict(density=density, sink_blocks=sink, local_blocks=local)
        by_row = SelectionPlan(cand, **forced_kw).select(scores)
        by_layer = SelectionPlan(cand, **forced_kw, budget="layer").select(scores)
        assert torch.equal(by_layer.sum(dim=(1, 2, 3)), by_row.sum(dim=(1, 2, 3)))
        assert not (by_layer & ~cand[:, None]).any() and (by_layer | ~forced).all()
        for b in range(2):
            assert _kept_mass(by_layer[b], log_probs[b]) >= _kept_mass(by_row[b], log_probs[b]) - 1e-4
        if density == 0.5:  # (at 0.1 the forced blocks fill most quotas; at 1.0 everything is kept)
            assert not torch.equal(by_layer, by_row)
    # Raw logits and log-probabilities select alike: the layer budget normalises rows itself.
    plan = SelectionPlan(cand, density=0.3, budget="layer")
    assert torch.equal(plan.select(scores), plan.select(log_probs))
    # What the model's forward passes (log-probs marked normalised, the per-forward count computed once) agrees.
    plan = SelectionPlan(cand, density=0.3, sink_blocks=sink, local_blocks=local, budget="layer")
    extra = plan.layer_extra(heads)
    assert len(extra) == 2 and extra[0] != extra[1]  # the packed element has fewer candidates
    assert torch.equal(plan.select(scores), plan.select(log_probs, normalized=True))


def test_layer_budget_moves_blocks_from_concentrated_to_spread_heads():
    nb = 16
    cand = block_candidates(nb * 4, 4)
    scores = torch.zeros(1, 2, nb, nb)
    scores[0, 0] = torch.eye(nb) * 50.0  # head 0 attends to its diagonal only; head 1 spreads evenly
    mask = SelectionPlan(cand, density=0.3, budget="layer").select(scores)
    assert torch.equal(mask[0, 0], torch.eye(nb, dtype=torch.bool))
    quotas = row_quotas(cand, 0.3)
    assert mask[0, 1].sum() == 2 * quotas.sum() - nb
    with pytest.raises(ValueError, match="budget"):
        SelectionPlan(cand, density=0.3, budget="model").select(scores)
    # Per head, the concentrated head keeps its own share (the diagonal plus its most probable others).
    by_head = SelectionPlan(cand, density=0.3, budget="head").select(scores)
    assert by_head[0, 0].sum() == by_head[0, 1].sum() == quotas.sum()


def _naive_row_mass_selection(log_probs, cand, forced, quota, row_mass, extra):
    """Row by row: the floor picks (most probable free blocks while the kept mass is below row_mass, at most
    quota minus forced), then the rest of the layer's `extra` blocks by probability across the layer."""
    bsz, heads, nq, nk = log_probs.shape
    probs = log_probs.exp().masked_fill(~cand, 0.0)
    out = forced.clone()
    for b in range(bsz):
        first = torch.zeros(heads, nq, nk, dtype=torch.bool)
        for h in range(heads):
            for i in range(nq):
                mass = float(probs[b, h, i][forced[b, h, i]].sum())
                room = max(0, int(quota[b, i]) - int(forced[b, h, i].sum()))
                free = [(float(probs[b, h, i, j]), j) for j in range(nk) if cand[b, h, i, j] and not forced[b, h, i, j]]
                for p, j in sorted(free, key=lambda t: (-t[0], t[1])):
                    if room == 0 or mass >= row_mass:
                        break
                    first[h, i, j], mass, room = True, mass + p, room - 1
        picks = first.nonzero().tolist()
        if len(picks) > extra[b]:
            picks = sorted(picks, key=lambda t: -float(probs[b, t[0], t[1], t[2]]))[: extra[b]]
        rest = [
            (float(probs[b, h, i, j]), (h, i, j))
            for h, i, j in (cand[b] & ~forced[b] & ~first).nonzero().tolist()
        ]
        rest = [t for _, t in sorted(rest, key=lambda t: -t[0])[: max(0, extra[b] - len(picks))]]
        for h, i, j in picks + rest:
            out[b, h, i, j] = True
    return out


@pytest.mark.parametrize("row_mass", [0.3, 0.6, 0.95])
def test_row_mass_floor_against_a_naive_loop(row_mass):
    """`row_mass` picks, row by row, the most probable blocks up to that share of the row's gate probability
    (capped by the row's quota), ranks them ahead of the layer's other blocks, and keeps the layer's total."""
    torch.manual_seed(0)
    docs = torch.tensor([[0] * 70 + [1] * 90, [0] * 160])
    cand = block_candidates(160, 8, docs)
    # Rows of every kind: peaked (large logit spread) and flat (small), so the floor matters.
    spread = torch.rand(2, 3, cand.shape[1], 1) * 6.0
    scores = torch.randn(2, 3, cand.shape[1], cand.shape[2]) * spread
    plain = SelectionPlan(cand, density=0.2, sink_blocks=1, local_blocks=2, budget="layer")
    plan = SelectionPlan(cand, density=0.2, sink_blocks=1, local_blocks=2, budget="layer", row_mass=row_mass)
    got = plan.select(scores)
    log_probs = gate_log_probs(scores, cand)
    ref = _naive_row_mass_selection(
        log_probs, cand[:, None].expand_as(got), plan.forced[:, None].expand_as(got), plan.quota, row_mass,
        plan.layer_extra(3),
    )
    assert torch.equal(got, ref)
    # The same number of blocks as without the floor: the density does not move.
    assert torch.equal(got.sum(dim=(1, 2, 3)), plain.select(scores).sum(dim=(1, 2, 3)))
    # Every row holds at least min(row_mass, what its quota's best blocks hold) of its gate probability.
    probs = log_probs.exp().masked_fill(~cand[:, None], 0.0)
    kept = (probs * got).sum(-1)
    best = torch.zeros_like(kept)
    for b in range(2):
        for i in range(cand.shape[1]):
            q = int(plan.quota[b, i])
            for h in range(3):
                f = plan.forced[b, i]
                free = probs[b, h, i].masked_fill(f, 0.0).sort(descending=True).values
                best[b, h, i] = probs[b, h, i][f].sum() + free[: max(0, q - int(f.sum()))].sum()
    assert (kept >= torch.minimum(best, torch.full_like(best, row_mass)) - 1e-5).all()


def test_row_mass_gives_blocks_to_a_flat_row():
    """A peaked head takes all of the layer budget without the floor; with it the flat head keeps blocks too."""
    cand = block_candidates(32 * 8, 8)  # 32 blocks
    scores = torch.zeros(1, 2, 32, 32)
    scores[0, 0] = torch.randn(32, 32) * 10.0  # peaked head
    scores[0, 1] = torch.randn(32, 32) * 0.01  # flat head
    kw = dict(density=0.2, budget="layer")
    plain = SelectionPlan(cand, **kw).select(scores)
    floored = SelectionPlan(cand, **kw, row_mass=0.5).select(scores)
    assert plain[0, 1].sum() - 32 < floored[0, 1].sum() - 32  # beyond the diagonal
    assert plain.sum() == floored.sum()
    with pytest.raises(ValueError, match="row_mass"):
        SelectionPlan(cand, **kw, row_mass=1.0)


def test_head_budget_gives_every_head_its_share_spread_by_probability():
    """`budget="head"`: each head keeps the row quotas' total (no head lends blocks to another), and within a head
    the blocks go where the gate is most probable, as the layer budget does for one head."""
    torch.manual_seed(1)
    docs = torch.tensor([[0] * 200 + [1] * 120, [0] * 320])
    cand = block_candidates(320, 8, docs)  # 40 blocks: the quotas leave room beyond the forced blocks
    scores = torch.randn(2, 3, cand.shape[1], cand.shape[2]) * torch.tensor([0.2, 2.0, 8.0])[None, :, None, None]
    kw = dict(density=0.3, sink_blocks=1, local_blocks=2)
    by_head = SelectionPlan(cand, **kw, budget="head").select(scores)
    by_row = SelectionPlan(cand, **kw, budget="row").select(scores)
    assert torch.equal(by_head.sum(dim=(2, 3)), by_row.sum(dim=(2, 3)))  # every head: its own share
    assert not (by_head & ~cand[:, None]).any()
    for h in range(3):
        one = SelectionPlan(cand, **kw, budget="layer").select(scores[:, h : h + 1])
        assert torch.equal(by_head[:, h : h + 1], one)
    # The layer budget moves blocks between these heads; the head budget does not.
    by_layer = SelectionPlan(cand, **kw, budget="layer").select(scores)
    assert not torch.equal(by_layer.sum(dim=(2, 3)), by_head.sum(dim=(2, 3)))
    # With the floor, too.
    floored = SelectionPlan(cand, **kw, budget="head", row_mass=0.4).select(scores)
    assert torch.equal(floored.sum(dim=(2, 3)), by_row.sum(dim=(2, 3)))
