"""Gates save as their own adapter and reload onto a fresh base model (+ LoRA) with identical selections."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seer_finetune.config import AttentionConfig, ModelConfig, PeftConfig, SeerConfig
from seer_finetune.modeling import save_final
from seer_finetune.seer import SeerRuntime, build_extension, load_gates, load_seer_model, seer_gates
from seer_finetune.seer.saving import CONFIG_NAME, WEIGHTS_NAME
from seer_helpers import packed_position_ids, random_ids, tiny_model
from helpers import ASSETS, save_tiny_model


def _cfg(name: str, **attention) -> SeerConfig:
    a = dict(backend="seer", mode="joint", block_size=16, gate_hidden_size=16, density=0.5)
    a.update(attention)
    return SeerConfig(model=ModelConfig(name_or_path=name), attention=AttentionConfig(**a))


def _selections(model, runtime: SeerRuntime):
    runtime.record_block_masks = True
    runtime.configure(compute_loss=False)
    runtime.block_masks.clear()
    with torch.no_grad():
        logits = model(
            input_ids=random_ids(1, 160, seed=9), position_ids=packed_position_ids([70, 90]), use_cache=False
        ).logits
    return {i: m.clone() for i, m in runtime.block_masks.items()}, logits


def test_reloaded_gates_select_identical_blocks_on_a_fresh_base(tmp_path):
    model = tiny_model("qwen2")
    torch.manual_seed(123)  # gates get their own random init
    ext = build_extension(model, _cfg("tiny-qwen2"))
    ext.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["base_model"] == "tiny-qwen2" and meta["block_size"] == 16 and meta["gate_hidden_size"] == 16
    assert meta["q_pooling"] == ["avg"] and meta["k_pooling"] == ["max", "min"] and meta["layers"] == [0, 1]
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 64 * 1024
    masks, logits = _selections(model, ext.runtime)
    assert len(masks) == 2

    fresh = tiny_model("qwen2")
    runtime = load_gates(fresh, tmp_path, runtime=SeerRuntime(mode="joint", density=0.5))
    fresh_masks, fresh_logits = _selections(fresh, runtime)
    for layer in masks:
        assert torch.equal(masks[layer], fresh_masks[layer])
    torch.testing.assert_close(fresh_logits, logits, rtol=0, atol=0)

    # the comparison can fail: differently initialised gates select other blocks
    other = tiny_model("qwen2")
    torch.manual_seed(7)
    other_ext = build_extension(other, _cfg("tiny-qwen2"))
    other_masks, _ = _selections(other, other_ext.runtime)
    assert any(not torch.equal(masks[i], other_masks[i]) for i in masks)


def test_reloaded_gates_keep_their_trained_selection_settings(tmp_path):
    model = tiny_model("llama")
    ext = build_extension(
        model,
        _cfg("tiny-llama", sink_blocks=2, local_blocks=3, budget="layer", row_mass=0.4, gate_selection_temperature=0.5,
             bound_blocks=2),
    )
    assert (ext.runtime.settings.sink_blocks, ext.runtime.settings.local_blocks) == (2, 3)
    ext.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (meta["sink_blocks"], meta["local_blocks"], meta["budget"], meta["row_mass"]) == (2, 3, "layer", 0.4)
    assert (meta["selection_temperature"], meta["bound_blocks"]) == (0.5, 2)
    assert (meta["rope_units"], meta["rope_fraction"]) == ("tokens", 1.0)
    runtime = load_gates(tiny_model("llama"), tmp_path)  # no runtime given: the trained settings
    s = runtime.settings
    assert (s.sink_blocks, s.local_blocks, s.budget, s.row_mass, s.selection_temperature) == (2, 3, "layer", 0.4, 0.5)
    assert s.bound_blocks == 2
    runtime = load_gates(tiny_model("llama"), tmp_path, runtime=SeerRuntime(mode="joint"))  # an explicit one wins
    assert (runtime.settings.sink_blocks, runtime.settings.local_blocks) == (0, 1)


def test_gates_in_block_rope_units_reload_in_block_units(tmp_path):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512}
    model = tiny_model("llama", rope_parameters=yarn, max_position_embeddings=2048)
    ext = build_extension(model, _cfg("tiny-llama", gate_rope_units="blocks"))
    ext.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["rope_units"] == "blocks"
    fresh = tiny_model("llama", rope_parameters=yarn, max_position_embeddings=2048)
    runtime = load_gates(fresh, tmp_path, runtime=SeerRuntime(mode="joint", density=0.5))
    for saved, loaded in zip(seer_gates(model), seer_gates(fresh)):
        assert loaded.rope_units == "blocks"
        torch.testing.assert_close(loaded.rotary.inv_freq, saved.rotary.inv_freq)
    masks, _ = _selections(model, ext.runtime)
    fresh_masks, _ = _selections(fresh, runtime)
    assert masks and all(torch.equal(masks[i], fresh_masks[i]) for i in masks)


def test_mismatched_gates_are_refused(tmp_path):
    model = tiny_model("llama")
    build_extension(model, _cfg("tiny")).save_pretrained(tmp_path)
    other = tiny_model("llama")
    build_extension(other, _cfg("tiny", block_size=32))
    with pytest.raises(ValueError, match="block_size"):
        load_gates(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="no seer gates"):
        load_gates(other, tmp_path / "nowhere")
    # through the config: one readable line naming the field
    from seer_finetune.config import ConfigError

    with pytest.raises(ConfigError, match=r"attention.gates_path=.*block_size"):
        build_extension(tiny_model("llama"), _cfg("tiny", block_size=32, gates_path=str(tmp_path)))
    # Same parameters, other block positions: the scores would differ silently, so the load is refused too.
    with pytest.raises(ConfigError, match=r"rope_units='tokens' but the model's gates have 'blocks'"):
        build_extension(tiny_model("llama"), _cfg("tiny", gate_rope_units="blocks", gates_path=str(tmp_path)))


def test_gates_without_positions_save_and_reload(tmp_path):
    """`gate_rope_units=none`: no rotary in the gates, saved as such, reloaded as such, refused by RoPE gates."""
    model = tiny_model("llama")
    ext = build_extension(model, _cfg("tiny-llama", gate_rope_units="none"))
    assert all(g.rotary is None for g in seer_gates(model))
    ext.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (meta["use_rope"], meta["rope_units"]) == (False, "none")
    fresh = tiny_model("llama")
    runtime = load_gates(fresh, tmp_path, runtime=SeerRuntime(mode="joint", density=0.5))
    assert all(g.rotary is None and g.rope_units == "none" for g in seer_gates(fresh))
    masks, _ = _selections(model, ext.runtime)
    fresh_masks, _ = _selections(fresh, runtime)
    assert masks and all(torch.equal(masks[i], fresh_masks[i]) for i in masks)
    with pytest.raises(ValueError, match="rope_units='none'"):
        load_gates(build_extension(tiny_model("llama"), _cfg("tiny-llama")).model, tmp_path)


def test_gates_with_partial_rope_save_reload_and_refuse_another_fraction(tmp_path):
    """`gate_rope_fraction`: saved, reloaded with the same rotated width, and refused by gates with another one;
    files from before the field existed hold gates that rotate every feature."""
    from seer_finetune.config import ConfigError

    model = tiny_model("llama")
    ext = build_extension(model, _cfg("tiny-llama", gate_rope_units="blocks", gate_rope_fraction=0.5))
    assert all((g.rope_fraction, g.rotary_dim) == (0.5, 8) for g in seer_gates(model))
    ext.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (meta["rope_units"], meta["rope_fraction"]) == ("blocks", 0.5)
    fresh = tiny_model("llama")
    runtime = load_gates(fresh, tmp_path, runtime=SeerRuntime(mode="joint", density=0.5))
    for saved, loaded in zip(seer_gates(model), seer_gates(fresh)):
        assert (loaded.rope_units, loaded.rope_fraction, loaded.rotary_dim) == ("blocks", 0.5, 8)
        torch.testing.assert_close(loaded.rotary.inv_freq, saved.rotary.inv_freq)
    masks, _ = _selections(model, ext.runtime)
    fresh_masks, _ = _selections(fresh, runtime)
    assert masks and all(torch.equal(masks[i], fresh_masks[i]) for i in masks)
    # Same parameters, RoPE on other features: the scores would differ silently, so the load is refused.
    with pytest.raises(ConfigError, match=r"attention.gates_path=.*rope_fraction=0.5 but the model's gates have 1.0"):
        build_extension(tiny_model("llama"), _cfg("tiny-llama", gate_rope_units="blocks", gates_path=str(tmp_path)))

    meta.pop("rope_fraction")  # a file from before the fraction was saved
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    before = tiny_model("llama")
    load_gates(before, tmp_path)
    assert all((g.rope_fraction, g.rotary_dim) == (1.0, 16) for g in seer_gates(before))
    with pytest.raises(ValueError, match=r"rope_fraction=1.0 but the model's gates have 0.5"):
        load_gates(model, tmp_path)


def test_extension_state_dict_round_trip():
    model = tiny_model("mistral")
    torch.manual_seed(1)
    ext = build_extension(model, _cfg("m"))
    state = ext.state_dict()
    assert sorted(state) == sorted(f"seer_gates.layers.{i}.{n}" for i in (0, 1) for n in ("q_weight", "k_weight"))
    other = tiny_model("mistral")
    torch.manual_seed(2)
    other_ext = build_extension(other, _cfg("m"))
    assert not torch.equal(seer_gates(other)[0].q_weight, seer_gates(model)[0].q_weight)
    other_ext.load_state_dict(state)
    for a, b in zip(seer_gates(model), seer_gates(other)):
        assert torch.equal(a.q_weight, b.q_weight) and torch.equal(a.k_weight, b.k_weight)


def test_compose_base_lora_and_gates_from_a_run_folder(tmp_path):
    """A LoRA run's final folder (lead's `save_final`) + gates reloads as the same sparse model."""
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny_model(tmp_path / "base", "llama", seed=4)
    model = AutoModelForCausalLM.from_pretrained(base_dir).float()
    torch.manual_seed(5)
    cfg = _cfg(str(base_dir))
    ext = build_extension(model, cfg)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    masks, logits = _selections(peft_model, ext.runtime)
    final = save_final(
        peft_model, AutoTokenizer.from_pretrained(ASSETS), tmp_path / "final",
        model_cfg=cfg.model, peft_cfg=PeftConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]),
    )
    ext.save_pretrained(final)

    loaded, runtime = load_seer_model(final, runtime=SeerRuntime(mode="joint", density=0.5))
    assert loaded.get_base_model().config._attn_implementation == "seer"
    got_masks, got_logits = _selections(loaded, runtime)
    for layer in masks:
        assert torch.equal(masks[layer], got_masks[layer])
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)


def test_full_model_folder_excludes_gates_and_composes(tmp_path):
    """A full-model save holds no gate weights (they live in the adapter) and composes back with them."""
    from safetensors import safe_open

    model = tiny_model("qwen3")
    torch.manual_seed(11)
    ext = build_extension(model, _cfg("tiny-qwen3"))
    masks, logits = _selections(model, ext.runtime)
    model.save_pretrained(tmp_path)
    ext.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("seer_gate" in k for k in keys)
    loaded, runtime = load_seer_model(tmp_path, runtime=SeerRuntime(mode="joint", density=0.5))
    got_masks, got_logits = _selections(loaded, runtime)
    assert all(torch.equal(masks[i], got_masks[i]) for i in masks)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)


def test_eval_says_when_it_selects_otherwise_than_the_gates_trained(tmp_path, capsys):
    """`eval` of a saved run under another configuration selects with the configured settings and says which
    differ from the trained ones; the same settings say nothing."""
    from seer_finetune.seer.density_sweep import _note_other_selection

    model = tiny_model("llama")
    build_extension(model, _cfg("tiny-llama", sink_blocks=1, local_blocks=2, budget="layer", row_mass=0.3)).save_pretrained(tmp_path)
    _note_other_selection(tmp_path, SeerRuntime(mode="joint", sink_blocks=1, local_blocks=2, budget="layer", row_mass=0.3))
    assert capsys.readouterr().out == ""
    _note_other_selection(tmp_path, SeerRuntime(mode="joint", sink_blocks=1, local_blocks=2, budget="row"))
    out = capsys.readouterr().out
    assert "budget='layer' (trained) vs 'row'" in out and "row_mass=0.3 (trained) vs 0.0" in out and "sink_blocks" not in out
