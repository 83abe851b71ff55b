"""AttnGate: pooling, GQA layout, block RoPE from the model's own rotary settings, and input detaching."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from seer_finetune.seer import AttnGate, SeerRuntime, attach_seer_gates, seer_gates
from seer_finetune.seer.gate import pool_blocks
from seer_finetune.seer.gate_rope import apply_rotary, gate_rotary_dim, gate_rotary_embedding
from seer_helpers import random_ids, tiny_model


def test_pooling_matches_brute_force_with_partial_block_and_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 23, 3, 4)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :10] = False  # block 0 of row 1 is all padding, block 1 partly
    got = pool_blocks(x, valid, 8, ("avg", "max", "min", "abs_avg"))
    assert got.shape == (2, 3, 3, 16)
    for b in range(2):
        for blk in range(3):
            idx = [t for t in range(blk * 8, min(23, blk * 8 + 8)) if valid[b, t]]
            if not idx:
                assert (got[b, blk] == 0).all()
                continue
            chunk = x[b, idx]
            want = torch.cat([chunk.mean(0), chunk.amax(0), chunk.amin(0), chunk.mean(0).abs()], dim=-1)
            torch.testing.assert_close(got[b, blk], want)
    with pytest.raises(ValueError, match="pooling"):
        pool_blocks(x, None, 8, ("median",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [24, 23, 5])
def test_pooling_without_padding_reduces_whole_blocks_as_the_masked_path_does(dtype, seq_len):
    """`valid=None` takes the unmasked reductions (whole blocks, then the partial last one): the same float32
    values as the masked path with every token valid, for bf16 inputs too (accumulated in float32)."""
    torch.manual_seed(2)
    x = torch.randn(2, seq_len, 3, 4).to(dtype)
    everyone = torch.ones(2, seq_len, dtype=torch.bool)
    for poolings in (("avg",), ("max", "min"), ("avg", "max", "min"), ("abs_avg", "avg")):
        got = pool_blocks(x, None, 8, poolings)
        assert got.dtype == torch.float32 and got.shape == (2, -(-seq_len // 8), 3, 4 * len(poolings))
        torch.testing.assert_close(got, pool_blocks(x, everyone, 8, poolings), rtol=1e-6, atol=1e-6)
    # Against the float32 brute force: the average of bf16 values is not rounded back to bf16.
    want = torch.stack([x[:, b : b + 8].float().mean(1) for b in range(0, seq_len, 8)], dim=1)
    torch.testing.assert_close(pool_blocks(x, None, 8, ("avg",)), want, rtol=1e-6, atol=1e-6)


def test_absolute_mean_lets_the_gate_score_the_sign_aware_logit_bound():
    """Queries pooled by avg and abs_avg, keys by max and min: with hand-set weights (no RoPE, hidden = 2 * D)
    the gate's score of every block pair is the bound `q.(kmax + kmin)/2 + |q|.(kmax - kmin)/2` on the block's
    logits for the block's mean query q, over pre-scaled features; a bound every key of the block respects and one
    of them reaches per feature."""
    torch.manual_seed(4)
    d, hidden, block = 4, 8, 4
    gate = AttnGate(2, 1, d, block_size=block, hidden_size=hidden, q_pooling=("avg", "abs_avg"), k_pooling=("max", "min"))
    eye = torch.eye(d)
    with torch.no_grad():
        # Query features [q; |q|] -> [q; |q|]; key features [kmax; kmin] -> [(kmax + kmin)/2; (kmax - kmin)/2].
        gate.q_weight.copy_(torch.block_diag(eye, eye).expand(2, -1, -1) * math.sqrt(hidden))
        gate.k_weight.copy_(torch.cat([torch.cat([eye, eye], 1), torch.cat([eye, -eye], 1)], 0)[None] / 2)
    q, k = torch.randn(1, 14, 2, d), torch.randn(1, 14, 1, d)
    scores = gate(q, k)
    qm = pool_blocks(q, None, block, ("avg",))[0]  # [nB, Hq, D]
    for h in range(2):
        for i in range(qm.shape[0]):
            for j in range(qm.shape[0]):
                keys = k[0, j * block : (j + 1) * block, 0]
                bound = torch.maximum(qm[i, h] * keys.amax(0), qm[i, h] * keys.amin(0)).sum()
                torch.testing.assert_close(scores[0, h, i, j], bound, rtol=1e-5, atol=1e-5)
                assert bool((keys @ qm[i, h] <= bound + 1e-5).all())


def test_logit_bound_initialisation_starts_the_gate_at_the_bound_on_its_unrotated_features():
    """`attention.gate_weight_init=logit_bound` on a model's gates with half their width rotated: every score is
    the sign-aware bound on the block's pre-RoPE logits at the attention's scale (the rotated half contributes
    nothing yet); settings that cannot hold the bound are refused with a config error naming the fix."""
    from seer_finetune.compose import compose_config
    from seer_finetune.config import AttentionConfig, ConfigError, ModelConfig, SeerConfig
    from seer_finetune.seer import build_extension

    def cfg(**attention):
        a = dict(backend="seer", mode="gate_distill", block_size=4, q_pooling=["avg", "abs_avg"], gate_hidden_size=64,
                 gate_rope_fraction=0.5, gate_weight_init="logit_bound")
        a.update(attention)
        return SeerConfig(model=ModelConfig(name_or_path="tiny"), attention=AttentionConfig(**a))

    model = tiny_model("qwen2")
    build_extension(model, cfg())
    gate = seer_gates(model)[1]
    d, heads, kv = gate.head_dim, gate.num_heads, gate.num_kv_heads
    assert 2 * d <= 32  # the unrotated half holds the bound
    torch.manual_seed(5)
    q, k = torch.randn(1, 18, heads, d), torch.randn(1, 18, kv, d)
    scores = gate(q, k)
    qm = pool_blocks(q, None, 4, ("avg",))[0]
    for h in range(heads):
        for i in range(qm.shape[0]):
            for j in range(qm.shape[0]):
                keys = k[0, j * 4 : (j + 1) * 4, h // (heads // kv)]
                bound = torch.maximum(qm[i, h] * keys.amax(0), qm[i, h] * keys.amin(0)).sum() / math.sqrt(d)
                torch.testing.assert_close(scores[0, h, i, j], bound, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="q_pooling holding avg and abs_avg"):
        build_extension(tiny_model("qwen2"), cfg(q_pooling=["avg"]))
    with pytest.raises(ConfigError, match="raise it or lower gate_rope_fraction"):
        build_extension(tiny_model("qwen2"), cfg(gate_hidden_size=16))
    with pytest.raises(ConfigError, match="gate_weight_init"):
        compose_config(["+exp=smoke_seer", "attention.gate_weight_init=zeros"])


def test_scores_follow_gqa_layout():
    """Query head h is scored against KV head h // group, as transformers' repeat_kv pairs them."""
    torch.manual_seed(1)
    gate = AttnGate(6, 2, 4, block_size=4, hidden_size=8, q_pooling=("avg",), k_pooling=("max",))
    q, k = torch.randn(1, 16, 6, 4), torch.randn(1, 16, 2, 4)
    scores = gate(q, k)
    assert scores.shape == (1, 6, 4, 4)
    qp = pool_blocks(q, None, 4, ("avg",))
    kp = pool_blocks(k, None, 4, ("max",))
    for h in range(6):
        qh = qp[0, :, h] @ gate.q_weight[h]
        kh = kp[0, :, h // 3] @ gate.k_weight[h // 3]
        torch.testing.assert_close(scores[0, h], qh @ kh.T / math.sqrt(8))
    with pytest.raises(ValueError, match="multiple"):
        AttnGate(5, 2, 4)


def test_block_rope_uses_the_models_yarn_settings():
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama", rope_parameters=yarn, max_position_embeddings=256)
    attach_seer_gates(model, SeerRuntime(mode="gate_distill", block_size=16), gate_hidden_size=32)
    gate = seer_gates(model)[0]
    assert type(gate.rotary) is type(model.model.rotary_emb)
    assert gate.rotary.rope_type == "yarn"
    reference_config = model.config.__class__(**{**model.config.to_dict(), "head_dim": 32})
    want_freq, want_scale = ROPE_INIT_FUNCTIONS["yarn"](reference_config, "cpu")
    torch.testing.assert_close(gate.rotary.inv_freq, want_freq)
    assert gate.rotary.attention_scaling == pytest.approx(want_scale)
    default_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
    assert not torch.allclose(gate.rotary.inv_freq, default_freq)
    # RoPE at block positions: gate scores depend only on the block distance for constant pooled inputs
    q = torch.randn(1, 1, 1, 32).expand(1, 1, 6, 32)
    cos, sin = gate.rotary(q, torch.arange(6)[None])
    rq, rk = apply_rotary(q, cos, sin), apply_rotary(q, cos, sin)
    s = (rq @ rk.transpose(-1, -2))[0, 0]
    torch.testing.assert_close(s[3, 1], s[5, 3])
    torch.testing.assert_close(s[2, 2], s[4, 4])


def test_block_units_interpolate_the_gates_positions_like_yarn_does_the_models():
    """rope_units=blocks: YaRN's lengths count blocks, so every dimension whose wavelength exceeds the original
    length in blocks is interpolated by the factor; in token units those dimensions are left (partly) alone."""
    theta, hidden, block = 100000.0, 128, 64
    yarn = {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0, "original_max_position_embeddings": 8192}
    model = tiny_model("llama", rope_parameters=yarn, max_position_embeddings=32768)
    plain = 1.0 / (theta ** (torch.arange(0, hidden, 2).float() / hidden))
    wavelength = 2 * math.pi / plain  # in block positions
    freqs = {}
    for units in ("tokens", "blocks"):
        seer = tiny_model("llama", rope_parameters=yarn, max_position_embeddings=32768)
        attach_seer_gates(seer, SeerRuntime(mode="gate_distill", block_size=block), gate_hidden_size=hidden, rope_units=units)
        gate = seer_gates(seer)[0]
        assert gate.rope_units == units and gate.rotary.rope_type == "yarn"
        freqs[units] = gate.rotary.inv_freq
    original_blocks = 8192 // block
    interpolated = wavelength > original_blocks  # beyond YaRN's slow boundary (beta_slow = 1) in block units
    assert interpolated.sum() >= 10
    torch.testing.assert_close(freqs["blocks"][interpolated], plain[interpolated] / 4.0)
    torch.testing.assert_close(freqs["tokens"][wavelength < 8192 / 32], plain[wavelength < 8192 / 32])
    # the dimensions with wavelengths between 128 and 8192 blocks: interpolated in block units only
    band = interpolated & (wavelength < 8192 / 32)
    assert band.any() and (freqs["tokens"][band] > 2 * freqs["blocks"][band]).all()
    # the model's own rotary is untouched
    assert model.config.rope_parameters["original_max_position_embeddings"] == 8192
    with pytest.raises(ValueError, match="rope units"):
        attach_seer_gates(tiny_model("llama"), SeerRuntime(mode="gate_distill"), rope_units="octaves")


def _yarn_model():
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    return tiny_model("llama", rope_parameters=yarn, max_position_embeddings=256)


@pytest.mark.parametrize(
    "hidden, fraction, dims",
    [(32, 1.0, 32), (32, 0.5, 16), (32, 0.3, 8), (32, 0.01, 2), (10, 0.7, 6), (15, 1.0, 14), (100, 0.58, 58)],
)
def test_rotated_width_is_the_share_rounded_down_to_pairs(hidden, fraction, dims):
    assert gate_rotary_dim(hidden, fraction) == dims


@pytest.mark.parametrize(
    "hidden, fraction, message",
    [(32, 0.0, "fraction"), (32, 1.5, "fraction"), (32, float("nan"), "fraction"), (1, 1.0, "too narrow")],
)
def test_rotated_width_refuses_bad_shares(hidden, fraction, message):
    with pytest.raises(ValueError, match=message):
        gate_rotary_dim(hidden, fraction)


def test_rope_fraction_one_is_the_full_width_rotary_bit_for_bit():
    """Fraction 1.0 builds exactly the gate of a rotary over the whole hidden width (the construction without a
    fraction), so its scores are identical."""
    model = _yarn_model()
    attach_seer_gates(model, SeerRuntime(mode="gate_distill", block_size=16), gate_hidden_size=32, rope_units="blocks")
    gate = seer_gates(model)[0]
    assert (gate.rope_fraction, gate.rotary_dim) == (1.0, 32) and "rope=blocks, rope_dims=32/32" in repr(gate)
    full = gate_rotary_embedding(model.config, model.model.rotary_emb, 32, block_size=16, units="blocks")
    reference = AttnGate(4, 2, 16, block_size=16, hidden_size=32, rotary=full)
    reference.load_state_dict(gate.state_dict())
    torch.manual_seed(0)
    q, k = torch.randn(2, 100, 4, 16), torch.randn(2, 100, 2, 16)
    assert torch.equal(gate(q, k), reference(q, k))


def test_block_angles_are_computed_once_per_length_and_rotary_module():
    """The gate asks its rotary module for the block angles once per length (and device, and module): a
    second forward reuses them with identical scores, another length or a replaced module asks again."""
    model = _yarn_model()
    attach_seer_gates(model, SeerRuntime(mode="gate_distill", block_size=16), gate_hidden_size=32, rope_units="blocks")
    gate = seer_gates(model)[0]
    calls = []
    gate.rotary.register_forward_hook(lambda _m, args, _out: calls.append(args[1].shape[-1]))
    torch.manual_seed(0)
    q, k = torch.randn(1, 100, 4, 16), torch.randn(1, 100, 2, 16)
    first = gate(q, k)
    assert torch.equal(gate(q, k), first) and calls == [7]
    gate(q[:, :40], k[:, :40])
    assert calls == [7, 3]
    gate.rotary = gate_rotary_embedding(model.config, model.model.rotary_emb, 32, block_size=16, units="blocks")
    assert torch.equal(gate(q, k), first)  # the same settings give the same angles, asked of the new module


def test_partial_rope_rotates_the_first_dims_at_their_width_and_leaves_the_rest_position_free():
    hidden, block, nb = 32, 16, 6
    model = _yarn_model()
    runtime = SeerRuntime(mode="gate_distill", block_size=block)
    attach_seer_gates(model, runtime, gate_hidden_size=hidden, rope_fraction=0.3)
    gate = seer_gates(model)[0]
    rd = gate.rotary_dim
    assert (rd, gate.rope_fraction) == (8, 0.3) and "rope_dims=8/32" in repr(gate)
    # The rotated dims: the model's own rotary class and settings (YaRN) for a head of width rd.
    narrow = type(model.model.rotary_emb)(config=model.config.__class__(**{**model.config.to_dict(), "head_dim": rd}))
    assert gate.rotary.rope_type == "yarn"
    torch.testing.assert_close(gate.rotary.inv_freq, narrow.inv_freq)

    torch.manual_seed(0)
    q, k = torch.randn(1, nb * block, 4, 16), torch.randn(1, nb * block, 2, 16)
    qh = torch.einsum("bnhf,hfo->bhno", pool_blocks(q, None, block, gate.q_pooling), gate.q_weight)
    kh = torch.einsum("bnhf,hfo->bhno", pool_blocks(k, None, block, gate.k_pooling), gate.k_weight)
    cos, sin = narrow(qh, torch.arange(nb)[None])
    c, s = cos[:, None, :, : rd // 2], sin[:, None, :, : rd // 2]

    def rope(x):  # rotate-half on the first rd features, written out; the rest as they are
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 : rd]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., rd:]), dim=-1)

    want = rope(qh) @ rope(kh).repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(hidden)
    with torch.no_grad():
        torch.testing.assert_close(gate(q, k), want)

    def part(features, q, k):
        """The gate's scores from `features` of its hidden width alone (its other query weights zeroed)."""
        only = AttnGate(4, 2, 16, block_size=block, hidden_size=hidden, rotary=gate.rotary)
        weights = gate.state_dict()
        q_weight = torch.zeros_like(weights["q_weight"])
        q_weight[..., features] = weights["q_weight"][..., features]
        only.load_state_dict({"q_weight": q_weight, "k_weight": weights["k_weight"]})
        with torch.no_grad():
            return only(q, k)

    # Move the key blocks to other positions: scores from the unrotated dims follow the content alone, those
    # from the rotated dims change with the positions.
    perm = torch.tensor([3, 5, 0, 4, 1, 2])
    moved = k.view(1, nb, block, 2, 16)[:, perm].reshape_as(k)
    content, positional = slice(rd, None), slice(0, rd)
    torch.testing.assert_close(part(content, q, moved), part(content, q, k)[..., perm])
    assert not torch.allclose(part(positional, q, moved), part(positional, q, k)[..., perm], atol=1e-3)


def test_rope_fraction_needs_rope():
    with pytest.raises(ValueError, match="rope_fraction=0.5 needs RoPE"):
        attach_seer_gates(tiny_model("llama"), SeerRuntime(mode="gate_distill"), rope_units="none", rope_fraction=0.5)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        attach_seer_gates(tiny_model("llama"), SeerRuntime(mode="gate_distill"), rope_fraction=0.0)


def _gate_loss_grads(arch: str, detach: bool):
    model = tiny_model(arch, sharpen=3.0)
    model.train()
    rt = SeerRuntime(mode="gate_distill", block_size=16, detach_gate_inputs=detach)
    attach_seer_gates(model, rt, gate_hidden_size=16)
    model(input_ids=random_ids(1, 96), use_cache=False)
    losses = rt.take_losses()
    assert sorted(losses) == [0, 1]
    torch.stack(list(losses.values())).sum().backward()
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_detached_gate_inputs_stop_gradients_at_the_gate(arch):
    attn = _gate_loss_grads(arch, detach=True).model.layers[1].self_attn
    assert attn.seer_gate.q_weight.grad is not None and attn.seer_gate.q_weight.grad.abs().sum() > 0
    assert attn.q_proj.weight.grad is None and attn.k_proj.weight.grad is None

    attn = _gate_loss_grads(arch, detach=False).model.layers[1].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad.abs().sum() > 0
    if arch == "qwen3":  # the hooks sit on the per-head norms, which the gate's inputs therefore pass through
        assert attn.q_norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detach", [True, False])
def test_captured_inputs_keep_their_values_when_rope_rotates_in_place(detach):
    """A fused RoPE may rotate the projections' outputs in place after the capture hooks ran (Liger's kernel does,
    on CUDA): the gate still gets the pre-RoPE values."""
    model = tiny_model("llama")
    attach_seer_gates(model, SeerRuntime(mode="gate_distill", block_size=16, detach_gate_inputs=detach), gate_hidden_size=16)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 32, model.config.hidden_size)
    for name, proj in (("q", attn.q_proj), ("k", attn.k_proj)):
        out = proj(x)
        before = out.detach().clone()
        with torch.no_grad():
            out.mul_(-3.0)  # what an in-place rotation does to the projection's output storage
        captured = attn.seer_gate.seer_captured.pop(name)
        torch.testing.assert_close(captured.reshape(before.shape), before, rtol=0, atol=0)


def test_hooks_follow_lora_wrapping():
    """Gates attached before LoRA still see the LoRA-adapted queries."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    rt = SeerRuntime(mode="gate_distill", block_size=16, detach_gate_inputs=False)
    attach_seer_gates(model, rt, gate_hidden_size=16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model(input_ids=random_ids(1, 64), use_cache=False)
    torch.stack(list(rt.take_losses().values())).sum().backward()
    lora_b = [p for n, p in model.named_parameters() if "q_proj.lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_settings_are_frozen_and_validated_and_changes_are_scoped():
    from dataclasses import FrozenInstanceError

    from seer_finetune.seer import SeerSettings

    rt = SeerRuntime(mode="joint", density=0.5)
    with pytest.raises(FrozenInstanceError):
        rt.settings.density = 0.1
    for bad in (dict(mode="sparse"), dict(density=1.5), dict(threshold=-0.1), dict(budget="model"),
                dict(kernel="reference"), dict(density=0.5, threshold=0.1), dict(local_blocks=0)):
        with pytest.raises(ValueError):
            SeerSettings(**bad)
    with rt.using(density=None, threshold=0.2, oracle=True) as inside:
        assert inside is rt.settings
        assert (rt.settings.density, rt.settings.threshold, rt.settings.oracle) == (None, 0.2, True)
    assert (rt.settings.density, rt.settings.threshold, rt.settings.oracle) == (0.5, None, False)
    with pytest.raises(ValueError):  # an invalid change leaves the settings as they were
        rt.configure(density=2.0)
    assert rt.settings.density == 0.5


def test_a_deep_copied_model_starts_forwards_of_its_own_runtime():
    """Each forward of the model starts a fresh per-forward state of the runtime its gates use, also for a copy."""
    import copy

    model = tiny_model("llama")
    rt = SeerRuntime(mode="joint", block_size=16, density=0.5)
    attach_seer_gates(model, rt, gate_hidden_size=16)
    clone = copy.deepcopy(model)
    clone_rt = seer_gates(clone)[0].runtime
    assert clone_rt is not rt and all(g.runtime is clone_rt for g in seer_gates(clone))
    ids = torch.randint(2, 200, (1, 64))
    with torch.no_grad():
        for _ in range(2):
            clone(input_ids=ids, use_cache=False)
    assert (clone_rt.forward.forward_id, rt.forward.forward_id) == (2, 0)
    assert sorted(clone_rt.stats) == [1, 2]
