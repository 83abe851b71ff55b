"""The fused ranking-key kernel (`seer_kernels.selection_ranking_keys`, `triton_selection`) against its PyTorch
reference, `SelectionPlan.ranking_keys(kernel="pytorch")`, and whole selections on either kernel. On CPU through
Triton's interpreter; awkward shapes: block counts that are not powers of two, packed documents and padding (rows
with few candidates and no room), lists that overlap in one head of two, every combination of the early picks."""

from __future__ import annotations

import pytest
import torch

import seer_kernels
from seer_finetune.seer.selection import SelectionPlan, block_candidates, gate_log_probs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 8
# (bound_blocks, probe_blocks, row_mass): each early pick alone, together (the 90% default's 1 / 16 / 0.3), none.
PICKS = [(0, 0, 0.0), (1, 16, 0.3), (2, 0, 0.0), (0, 3, 0.0), (0, 0, 0.5), (3, 2, 0.2)]


def _problem(nb: int, *, docs: bool, heads: int = 2, seed: int = 0):
    """Candidates `[2, nB, nB]` (with `docs`: row 0 holds two packed documents, row 1 ends in padding), and
    log-probabilities, logit bounds and probe scores `[2, heads, nB, nB]`; the first head's probe scores equal
    its bounds, so the two lists pick the same blocks there."""
    length = nb * BLOCK - 3  # a partial last block
    g = torch.Generator().manual_seed(seed)
    if docs:
        ids = torch.zeros(2, length, dtype=torch.long)
        ids[0, length // 3 :] = 1
        valid = torch.ones(2, length, dtype=torch.bool)
        valid[1, length - 2 * BLOCK - 5 :] = False
        ids[1, ~valid[1]] = torch.arange(1, int((~valid[1]).sum()) + 1)
        cand = block_candidates(length, BLOCK, ids, valid)
    else:
        cand = block_candidates(length, BLOCK, batch_size=2)
    scores = torch.randn(2, heads, nb, nb, generator=g) * 3
    bound, probe = torch.randn(2, heads, nb, nb, generator=g), torch.rand(2, heads, nb, nb, generator=g)
    probe[:, 0] = bound[:, 0]
    return cand, gate_log_probs(scores, cand), bound, probe


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize(
    "nb,docs,picks",
    [(21, i % 2 == 1, picks) for i, picks in enumerate(PICKS)] + [(43, True, PICKS[1])],
)
def test_ranking_keys_equal_the_pytorch_reference(nb, docs, picks):
    bound_blocks, probe_blocks, row_mass = picks
    cand, log_probs, bound, probe = _problem(nb, docs=docs)
    plan = SelectionPlan(
        cand, density=0.4, sink_blocks=1, budget="layer", bound_blocks=bound_blocks, probe_blocks=probe_blocks,
        row_mass=row_mass,
    )
    expected = plan.ranking_keys(log_probs, bound=bound, probe=probe, kernel="pytorch")
    on_device = SelectionPlan(
        cand.to(DEVICE), density=0.4, sink_blocks=1, budget="layer", bound_blocks=bound_blocks,
        probe_blocks=probe_blocks, row_mass=row_mass,
    )
    lp, b, p = _to(DEVICE, log_probs, bound, probe)
    got = on_device.ranking_keys(lp, bound=b, probe=p, kernel="triton").cpu()
    assert torch.equal(got, expected)
    # The early picks did act: some keys are raised into a tier (or none can be, with every pick off).
    raised = (expected > 1e4).sum()
    assert (raised > 0) == (bound_blocks + probe_blocks > 0 or row_mass > 0)


@pytest.mark.parametrize("budget,docs", [("layer", True), ("head", False)])
def test_selection_on_the_kernel_equals_the_pytorch_selection(budget, docs):
    """The 90% default's picks (bound 1, probe 16, row mass 0.3) under the shared budgets: the same block mask."""
    cand, log_probs, bound, probe = _problem(43, docs=docs, seed=1)
    kw = dict(density=0.1, sink_blocks=1, budget=budget, bound_blocks=1, probe_blocks=16, row_mass=0.3)
    expected = SelectionPlan(cand, **kw).select(log_probs, normalized=True, bound=bound, probe=probe)
    lp, b, p, c = _to(DEVICE, log_probs, bound, probe, cand)
    got = SelectionPlan(c, **kw).select(lp, normalized=True, bound=b, probe=p, kernel="triton").cpu()
    assert torch.equal(got, expected)
    assert expected.sum() > 0


def test_the_kernel_writes_every_entry():
    """Rows with no room (padding, the first rows) and columns past the last block included: no entry is left as
    torch.empty gave it (NaN-filled here)."""
    cand, log_probs, bound, probe = _problem(37, docs=True)
    lp, b, p, c = _to(DEVICE, log_probs, bound, probe, cand)
    plan = SelectionPlan(c, density=0.1, sink_blocks=1, budget="layer", bound_blocks=1, probe_blocks=4, row_mass=0.3)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    torch.empty = nan_empty
    try:
        got = plan.ranking_keys(lp, bound=b, probe=p, kernel="triton")
    finally:
        torch.empty = empty
    assert not got.isnan().any()
    assert torch.isinf(got[~(c & ~plan.forced)[:, None].expand_as(got)]).all()


def test_bad_inputs_are_one_line_errors():
    cand, log_probs, bound, probe = _problem(37, docs=False)
    lp, b, c = _to(DEVICE, log_probs, bound, cand)
    room = torch.zeros(2, 37, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="log_probs must be"):
        seer_kernels.selection_ranking_keys(lp[0], c, c, room)
    with pytest.raises(ValueError, match="candidates must be bool"):
        seer_kernels.selection_ranking_keys(lp, c.float(), c, room)
    with pytest.raises(ValueError, match="probe_blocks=2 needs probe"):
        seer_kernels.selection_ranking_keys(lp, c, c, room, bound=b, bound_blocks=1, probe_blocks=2)
    with pytest.raises(ValueError, match="row_mass"):
        seer_kernels.selection_ranking_keys(lp, c, c, room, row_mass=1.0)
    with pytest.raises(ValueError, match="needs a density"):
        SelectionPlan(c, threshold=0.1).ranking_keys(lp, kernel="triton")
