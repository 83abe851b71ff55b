"""The passkey scorer: trial layout, scoring, depths, intervals, and which layers keep the needle's blocks."""

import copy

import pytest
import torch
from transformers import AutoTokenizer

from seer_finetune import passkey
from seer_finetune.passkey import build_trial, passkey_accuracy, wilson_interval
from seer_finetune.seer import SeerRuntime, attach_seer_gates

from helpers import ASSETS
from seer.seer_helpers import tiny_model


class _Echo(torch.nn.Module):
    """A 'model' whose logits at position i put all mass on token i + `shift` of its input (shift 1: a perfect
    reader)."""

    def __init__(self, vocab: int, shift: int = 1):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        # As transformers' models: a positive `logits_to_keep` keeps the last that many positions' logits.
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


def test_passkey_trial_layout_and_scoring():
    tok = AutoTokenizer.from_pretrained(ASSETS)
    trial = build_trial(tok, 600, 0.5, 54321)
    text = tok.decode(trial.prompt)
    assert "The pass key is 54321" in text and text.endswith("The pass key is")
    assert abs(len(trial.prompt) + len(trial.answer) - 600) <= 30
    assert 0.3 < text.index("54321") / len(text) < 0.7
    needle = tok.decode(trial.prompt[trial.needle[0] : trial.needle[1]])
    assert needle.strip() == "The pass key is 54321. Remember it. 54321 is the pass key."
    perfect = passkey_accuracy(_Echo(len(tok)), tok, 400, trials=20)
    assert (perfect["hits"], perfect["accuracy"], perfect["needle_kept_per_layer"]) == (20, 1.0, None)
    assert perfect["per_depth"] == {str(d): 1.0 for d in (0.1, 0.3, 0.5, 0.7, 0.9)}
    assert passkey_accuracy(_Echo(len(tok), shift=2), tok, 400, trials=3)["accuracy"] == 0.0
    with pytest.raises(ValueError):
        passkey_accuracy(_Echo(len(tok)), tok, 400, trials=0)


def test_trials_of_one_depth_are_spread_around_it(monkeypatch):
    """The trials of a depth take different drawn depths within half the depths' spacing, reproducibly; the
    keys do not depend on the draw; `depth_jitter=0` and a single depth place every trial at its depth."""
    tok = AutoTokenizer.from_pretrained(ASSETS)
    echo = _Echo(len(tok))
    spread = passkey_accuracy(echo, tok, 400, trials=20)
    drawn = spread["trial_depths"]
    assert len(drawn) == 20 and spread["trial_hits"] == [1] * 20
    for i, centre in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        mine = drawn[i::5]
        assert all(abs(d - centre) <= 0.1 + 1e-12 for d in mine), (centre, mine)
        assert len(set(mine)) == 4, mine  # four positions, not one
    assert passkey_accuracy(echo, tok, 400, trials=20)["trial_depths"] == drawn
    assert passkey_accuracy(echo, tok, 400, trials=20, seed=1)["trial_depths"] != drawn
    keys = []
    def recording(tokenizer, n, depth, key):
        keys.append(key)
        return build_trial(tokenizer, n, depth, key)

    monkeypatch.setattr(passkey, "build_trial", recording)
    fixed = passkey_accuracy(echo, tok, 400, trials=10, depth_jitter=0.0)
    assert fixed["trial_depths"] == [0.1, 0.3, 0.5, 0.7, 0.9] * 2
    passkey_accuracy(echo, tok, 400, trials=10)
    assert keys[:10] == keys[10:]  # the same keys, drawn or fixed depths
    monkeypatch.undo()
    assert passkey_accuracy(echo, tok, 400, trials=3, depths=(0.4,))["trial_depths"] == [0.4] * 3
    wide = passkey_accuracy(echo, tok, 400, trials=10, depths=(0.0, 1.0), depth_jitter=0.5)["trial_depths"]
    assert all(0.0 <= d <= 1.0 for d in wide) and len(set(wide)) > 2  # clipped to the filler
    with pytest.raises(ValueError, match="depth_jitter"):
        passkey_accuracy(echo, tok, 400, trials=2, depth_jitter=0.7)


def test_wilson_interval():
    # Known values: 0 of 20 -> [0, 0.161]; 10 of 20 -> [0.299, 0.701]; 20 of 20 -> [0.839, 1].
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    low, high = wilson_interval(4, 5)
    assert low < 0.8 < high and high - low > 0.4  # five trials say little


def test_needle_blocks_kept_per_layer():
    """With every block kept each layer keeps the needle; with the diagonal alone, a needle far from the
    question is dropped by every head of every layer."""
    tok = AutoTokenizer.from_pretrained(ASSETS)
    model = tiny_model("llama", max_position_embeddings=1024)
    results = {}
    for density in (1.0, 0.01):
        seer = copy.deepcopy(model)
        rt = SeerRuntime(mode="joint", block_size=16, density=density, compute_loss=False)
        rt.training = False
        attach_seer_gates(seer, rt, gate_hidden_size=16)
        results[density] = passkey_accuracy(seer, tok, 400, trials=5, depths=(0.1,), runtime=rt)
        assert not rt.block_masks and not rt.record_block_masks  # left as found
    assert results[1.0]["needle_kept_per_layer"] == [1.0, 1.0]
    assert results[0.01]["needle_kept_per_layer"] == [0.0, 0.0]
    # a dense runtime selects nothing, so there is nothing to report
    dense = SeerRuntime(mode="dense", block_size=16)
    seer = copy.deepcopy(model)
    attach_seer_gates(seer, dense, gate_hidden_size=16)
    assert passkey_accuracy(seer, tok, 400, trials=2, runtime=dense)["needle_kept_per_layer"] is None
