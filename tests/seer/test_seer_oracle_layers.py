"""`SeerSettings.oracle_layers`: the named layers select by the true attention, the others keep their gates (an
evaluation diagnostic: which layers a gate's loss comes from)."""

from __future__ import annotations

import pytest
import torch

from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_helpers import random_ids, tiny_model


def test_oracle_layers_rank_by_the_truth_in_those_layers_only():
    model = tiny_model("llama", max_position_embeddings=2048)
    ids = random_ids(1, 512)
    rt = SeerRuntime(mode="joint", block_size=16, density=0.3, sink_blocks=1, local_blocks=2, budget="layer",
                     bound_blocks=1, compute_loss=False)
    rt.training, rt.record_block_masks = False, True
    attach_seer_gates(model, rt, gate_hidden_size=16)

    def masks(**changes):
        rt.configure(**changes)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        return {layer: m.clone() for layer, m in rt.block_masks.items()}

    gate, truth = masks(oracle=False, oracle_layers=()), masks(oracle=True, oracle_layers=())
    last = max(gate)
    assert last >= 1 and not torch.equal(gate[0], truth[0])
    # Layer 0 sees the same input in every run: with the oracle there it selects as the all-oracle run does.
    first = masks(oracle=False, oracle_layers=(0,))
    assert torch.equal(first[0], truth[0])
    # With the oracle in the last layer only, every layer before it selects as the gates do, and the last does not.
    late = masks(oracle=False, oracle_layers=(last,))
    assert all(torch.equal(late[layer], gate[layer]) for layer in range(last))
    assert not torch.equal(late[last], gate[last])
    # Every layer named is the all-oracle run.
    every = masks(oracle=False, oracle_layers=tuple(range(last + 1)))
    assert all(torch.equal(every[layer], truth[layer]) for layer in truth)


def test_oracle_layers_must_be_layer_indices_and_become_a_tuple():
    with pytest.raises(ValueError, match="oracle_layers"):
        SeerRuntime(mode="joint", density=0.5, oracle_layers=(-1,))
    rt = SeerRuntime(mode="joint", density=0.5, oracle_layers=[2, 3])
    assert rt.settings.oracle_layers == (2, 3) and hash(rt.settings)
