"""`gate_query`: the token modes score every query token against the pooled key blocks and take the max over
each query block's tokens. Checked against a plain per-block loop in float64 (forward and gradients), on a
partial last block, GQA, left padding, packed documents, several chunks, with and without (partial) RoPE; then
the memory autograd keeps, the refusals, compiled training, a short run and saving."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seer_finetune.compose import compose_config
from seer_finetune.config import AttentionConfig, ConfigError, ModelConfig, SeerConfig
from seer_finetune.seer import AttnGate, SeerRuntime, attach_seer_gates, build_extension, load_gates, seer_gates
from seer_finetune.seer import gate as gate_module
from seer_finetune.seer.gate import block_scores
from seer_finetune.seer.saving import CONFIG_NAME
from seer_finetune.seer.selection import block_candidates, gate_log_probs
from seer_helpers import packed_position_ids, random_ids, tiny_model

TOKEN_MODES = ("token_logit_max", "token_prob_max")
CUDA = torch.cuda.is_available()
# Where the kernel-setting test runs its model: the Triton kernels take CPU tensors only in the interpreter.
DEVICE = "cuda" if CUDA else "cpu"
# Awkward shapes: 75 tokens in blocks of 16 (the fifth block has 11), 6 query heads on 2 KV heads.
B, L, HQ, HKV, D, T, HIDDEN = 2, 75, 6, 2, 8, 16, 12
NB = math.ceil(L / T)
K_POOLING = ("max", "min")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half on the first `cos.shape[-1]` features of `x`, written out; the others pass through."""
    rd = cos.shape[-1]
    half = rd // 2
    x1, x2 = x[..., :half], x[..., half:rd]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, x[..., rd:]), -1)


def reference_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates, mode):
    """The token modes by definition, in float64, one batch row and one block at a time.

    Key block j: its valid tokens pooled (max, min; zeros without one), projected, rotated at j. Token i of
    query block I: projected, rotated at I, dotted with every key block over sqrt(hidden) (`token_prob_max`:
    then log-softmaxed over the candidates of I). Block score: the max over the valid tokens of I; a block
    without valid tokens scores 0 (at its candidates, for `token_prob_max`); -inf after block I.
    """
    q, k, q_weight, k_weight = (t.double() for t in (q, k, q_weight, k_weight))
    cos, sin = (None, None) if cos is None else (cos.double()[0], sin.double()[0])
    seq_len, group = q.shape[1], HQ // HKV
    nb = math.ceil(seq_len / T)
    out = torch.full((B, HQ, nb, nb), float("nan"), dtype=torch.float64)
    for b in range(B):
        tokens_of = [
            [t for t in range(blk * T, min(seq_len, (blk + 1) * T)) if valid is None or valid[b, t]]
            for blk in range(nb)
        ]
        keys = []
        for idx in tokens_of:
            x = k[b, idx]  # [n, Hkv, D]
            pooled = torch.cat([x.amax(0), x.amin(0)], -1) if idx else torch.zeros(HKV, 2 * D, dtype=torch.float64)
            keys.append(torch.einsum("hf,hfo->ho", pooled, k_weight))
        kh = torch.stack(keys, 1)  # [Hkv, nB, hidden]
        if cos is not None:
            kh = _rope(kh, cos, sin)
        kh = kh.repeat_interleave(group, 0)  # query head h reads KV head h // group
        for blk, idx in enumerate(tokens_of):
            allowed = candidates[b, blk]
            if not idx:
                out[b, :, blk] = 0.0 if mode == "token_logit_max" else torch.where(allowed, 0.0, float("-inf"))
                continue
            qt = torch.einsum("thd,hdo->hto", q[b, idx], q_weight)  # [Hq, n, hidden]
            if cos is not None:
                qt = _rope(qt, cos[blk], sin[blk])
            logits = torch.einsum("hto,hjo->htj", qt, kh) / math.sqrt(HIDDEN)
            if mode == "token_prob_max":
                logits = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            out[b, :, blk] = logits.amax(1)
    # Key blocks after a query block's own are never candidates: -inf in both modes.
    return out.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))


def _angles(rotary_dim: int, nb: int = NB) -> tuple[torch.Tensor, torch.Tensor]:
    """Block RoPE angles `[1, nb, rotary_dim]` as the models' rotary modules make them (halves repeated)."""
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(nb).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[None]
    return emb.cos(), emb.sin()


def _inputs(padding: bool, seq_len: int = L, seed: int = 0):
    """q, k, weights (leaves with gradients), valid (left padding on row 1: its first block is padding alone)
    and the candidates (two packed documents on row 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, seq_len, HQ, D, generator=g).requires_grad_()
    k = torch.randn(B, seq_len, HKV, D, generator=g).requires_grad_()
    q_weight = (torch.randn(HQ, D, HIDDEN, generator=g) / math.sqrt(D)).requires_grad_()
    k_weight = (torch.randn(HKV, 2 * D, HIDDEN, generator=g) / math.sqrt(2 * D)).requires_grad_()
    valid = None
    if padding:
        valid = torch.ones(B, seq_len, dtype=torch.bool)
        valid[1, :21] = False
    documents = torch.zeros(B, seq_len, dtype=torch.long)
    documents[0, 40:] = 1
    candidates = block_candidates(seq_len, T, documents, valid)
    return q, k, q_weight, k_weight, valid, candidates


def _weighted_sum(scores: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """A loss reading every finite score with its own weight (the -inf of non-candidates left out)."""
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed)).to(scores.dtype)
    return (torch.where(torch.isfinite(scores), scores, 0.0) * weights).sum()


@pytest.mark.parametrize("blocks_per_chunk", [1, 2, None])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("rotary_dim", [0, HIDDEN, 4])
@pytest.mark.parametrize("seq_len", [L, 80])
@pytest.mark.parametrize("mode", TOKEN_MODES)
def test_token_modes_match_the_definition_forward_and_backward(
    monkeypatch, mode, seq_len, rotary_dim, padding, blocks_per_chunk
):
    """75 tokens end with a partial block, 80 fill 5 blocks (without padding, no token mask at all)."""
    nb = math.ceil(seq_len / T)
    chunks = []
    if blocks_per_chunk is not None:
        monkeypatch.setattr(gate_module, "TOKEN_CHUNK_ELEMENTS", B * HQ * T * nb * blocks_per_chunk)
    original = gate_module._token_chunk_scores

    def counted(q, valid, q_weight, kh, *args, **kwargs):
        chunks.append((q.shape[1], kh.shape[2]))
        return original(q, valid, q_weight, kh, *args, **kwargs)

    monkeypatch.setattr(gate_module, "_token_chunk_scores", counted)
    q, k, q_weight, k_weight, valid, candidates = _inputs(padding, seq_len)
    cos, sin = _angles(rotary_dim, nb) if rotary_dim else (None, None)
    shape = dict(block_size=T, q_pooling=("avg",), k_pooling=K_POOLING, hidden_size=HIDDEN, gate_query=mode)

    got = block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape)
    want = reference_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates, mode)
    assert got.dtype == torch.float32 and got.shape == (B, HQ, nb, nb)
    # Tokens per chunk: the last chunk ends with the last (maybe partial) block.
    per_chunk = T * (blocks_per_chunk or nb)
    # ... and scores the key blocks up to its last query block only.
    starts = range(0, seq_len, per_chunk)
    assert chunks == [(min(per_chunk, seq_len - s), math.ceil(min(seq_len, s + per_chunk) / T)) for s in starts]
    assert not torch.isnan(got).any()
    if mode == "token_prob_max":
        assert torch.equal(torch.isinf(got), ~candidates[:, None].expand_as(got))
    else:
        assert torch.equal(torch.isinf(got), torch.ones(nb, nb, dtype=torch.bool).triu(1).expand_as(got))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if padding:
        assert (got[1, :, 0, :1] == 0).all()  # the block of padding alone

    leaves = (q, k, q_weight, k_weight)
    grads = torch.autograd.grad(_weighted_sum(got), leaves)
    want_grads = torch.autograd.grad(_weighted_sum(want), leaves)
    for name, g, w in zip(("q", "k", "q_weight", "k_weight"), grads, want_grads):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if padding:
        assert (grads[0][1, :21] == 0).all()  # padding tokens never win a max

    with torch.no_grad():  # no recomputation without gradients: the same values
        assert torch.equal(block_scores(q, k, q_weight, k_weight, cos, sin, valid, candidates=candidates, **shape), got)


def test_token_logit_max_of_blocks_of_equal_tokens_is_the_pooled_score():
    """When every token of a block is the block's average, each token scores what the pooled query scores: the
    token modes rotate a token by its block's angles, as the pooled query is rotated."""
    q, k, q_weight, k_weight, _, _ = _inputs(padding=False)
    per_block = torch.randn(B, NB, HQ, D, generator=torch.Generator().manual_seed(3))
    q = per_block.repeat_interleave(T, 1)[:, :L]
    cos, sin = _angles(8)
    shape = dict(block_size=T, q_pooling=("avg",), k_pooling=K_POOLING, hidden_size=HIDDEN)
    with torch.no_grad():
        pooled = block_scores(q, k, q_weight, k_weight, cos, sin, None, **shape)
        tokens = block_scores(q, k, q_weight, k_weight, cos, sin, None, gate_query="token_logit_max", **shape)
        causal = torch.ones(NB, NB, dtype=torch.bool).tril()
        torch.testing.assert_close(tokens[..., causal], pooled[..., causal], rtol=1e-6, atol=1e-6)
        assert torch.isinf(tokens[..., ~causal]).all()
        # ... and tokens that differ from their block's average raise that block's maxima: a token's score is
        # linear in the token, so of two tokens moved by +d and -d one scores above the average in every head.
        d = 3 * torch.randn(HQ, D, generator=torch.Generator().manual_seed(4))
        q[0, 3] += d
        q[0, 4] -= d
        raised = block_scores(q, k, q_weight, k_weight, cos, sin, None, gate_query="token_logit_max", **shape)
    assert (raised[0, :, 0, 0] > tokens[0, :, 0, 0]).all()
    assert torch.equal(raised[0, :, 0, 1:], tokens[0, :, 0, 1:])
    assert torch.equal(raised[:, :, 1:], tokens[:, :, 1:])


@pytest.mark.parametrize("mode", TOKEN_MODES)
def test_token_scores_give_finite_log_probs_and_gradients_with_a_block_of_padding(mode):
    q, k, q_weight, k_weight, valid, candidates = _inputs(padding=True)
    shape = dict(block_size=T, q_pooling=("avg",), k_pooling=K_POOLING, hidden_size=HIDDEN, gate_query=mode)
    scores = block_scores(q, k, q_weight, k_weight, *_angles(HIDDEN), valid, candidates=candidates, **shape)
    log_probs = gate_log_probs(scores, candidates)
    assert not torch.isnan(log_probs).any()
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(B, HQ, NB))
    grads = torch.autograd.grad(_weighted_sum(log_probs), (q, k, q_weight, k_weight))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("recompute", [True, False])
def test_backward_keeps_no_per_token_logits(monkeypatch, recompute):
    """Autograd keeps the chunks' inputs, not their per-token logits or projected queries: everything it saves
    adds up to less than a quarter of the logits `[B, Hq, L, nB]`. Without the recomputation
    (`recompute=False`, the checkpoint replaced by a plain call) `token_prob_max` keeps far more: the check can
    fail."""
    seq_len, block, hidden = 512, 8, 16
    nb = seq_len // block
    monkeypatch.setattr(gate_module, "TOKEN_CHUNK_ELEMENTS", B * HQ * block * nb * 4)
    if not recompute:
        monkeypatch.setattr(gate_module, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    q = torch.randn(B, seq_len, HQ, 4, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, seq_len, HKV, 4, dtype=torch.bfloat16, requires_grad=True)
    q_weight = torch.randn(HQ, 4, hidden, requires_grad=True)
    k_weight = torch.randn(HKV, 8, hidden, requires_grad=True)
    saved = {}

    def pack(tensor):
        saved[(tensor.data_ptr(), tensor.dtype)] = tensor.numel() * tensor.element_size()
        return tensor

    shape = dict(
        block_size=block, q_pooling=("avg",), k_pooling=("max", "min"), hidden_size=hidden, gate_query="token_prob_max"
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        scores = block_scores(q, k, q_weight, k_weight, None, None, None, **shape)
    logits_bytes = B * HQ * seq_len * nb * 4
    if recompute:
        assert sum(saved.values()) < logits_bytes / 4
        _weighted_sum(scores).backward()
        assert q_weight.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    else:
        assert sum(saved.values()) > logits_bytes


def test_token_modes_refuse_a_query_pooling_and_unknown_modes():
    gate = AttnGate(6, 2, 8, block_size=16, hidden_size=12, gate_query="token_prob_max")
    assert gate.q_weight.shape == (6, 8, 12) and "query=token_prob_max" in repr(gate)
    with pytest.raises(ValueError, match=r"q_pooling=\['avg', 'max'\] has nothing to pool"):
        AttnGate(6, 2, 8, q_pooling=("avg", "max"), gate_query="token_logit_max")
    with pytest.raises(ValueError, match="gate_query='tokens' must be one of pooled, token_logit_max, token_prob_max"):
        AttnGate(6, 2, 8, gate_query="tokens")
    with pytest.raises(ValueError, match="has nothing to pool"):
        attach_seer_gates(
            tiny_model("llama"), SeerRuntime(mode="gate_distill"), q_pooling=("max",), gate_query="token_prob_max"
        )
    refused = r"attention.gate_query=token_prob_max scores each token's own query, so attention.q_pooling=\['max'\]"
    with pytest.raises(ConfigError, match=refused):
        compose_config(["attention=seer_joint", "attention.gate_query=token_prob_max", "attention.q_pooling=[max]"])
    with pytest.raises(ConfigError, match="attention.gate_query='tokens' is not one of"):
        compose_config(["attention=seer_joint", "attention.gate_query=tokens"])
    cfg = compose_config(["attention=seer_joint", "attention.gate_query=token_logit_max"])
    assert cfg.attention.gate_query == "token_logit_max"


def _cfg(**attention) -> SeerConfig:
    a = dict(
        backend="seer", mode="joint", block_size=16, gate_hidden_size=16, density=0.5, ground_truth_query_fraction=1.0
    )
    a.update(attention)
    return SeerConfig(model=ModelConfig(name_or_path="tiny-llama"), attention=AttentionConfig(**a))


def test_joint_training_steps_in_token_prob_max_learn_and_select(monkeypatch):
    """Two joint steps of a tiny Llama with token_prob_max gates (packed documents, several chunks): finite
    losses, gate gradients, the density asked for, and gates that move."""
    monkeypatch.setattr(gate_module, "TOKEN_CHUNK_ELEMENTS", 4 * 16 * 8)
    model = tiny_model("llama", sharpen=2.0)
    ext = build_extension(model, _cfg(gate_query="token_prob_max"))
    assert all(g.gate_query == "token_prob_max" for g in seer_gates(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = seer_gates(model)[0].q_weight.detach().clone()
    model.train()
    ids = random_ids(1, 120)
    for _ in range(2):
        out = model(input_ids=ids, labels=ids, position_ids=packed_position_ids([50, 70]), use_cache=False)
        gate_loss = ext.extra_losses()["gate_loss"]
        opt.zero_grad()
        (out.loss + gate_loss).backward()
        assert torch.isfinite(out.loss) and torch.isfinite(gate_loss)
        assert all(g.q_weight.grad.abs().sum() > 0 and torch.isfinite(g.q_weight.grad).all() for g in seer_gates(model))
        opt.step()
    metrics = ext.metrics()
    assert abs(metrics["seer/density"] - 0.5) < 0.1 and 0 < metrics["seer_recall/layer_00"] <= 1
    assert not torch.equal(seer_gates(model)[0].q_weight, before)


@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
def test_attention_kernel_setting_decides_where_gradient_free_token_scores_run(monkeypatch, kernel):
    """`attention.kernel` reaches the gates: a gradient-free forward of a tiny Llama scores its token gates on
    the fused kernel with `triton` (on CPU through the interpreter, on a GPU on CUDA tensors) and never with
    `pytorch`."""
    import seer_kernels

    calls = []
    original = seer_kernels.token_gate_block_scores

    def counted(*args, **kwargs):
        calls.append(kwargs["kernel"])
        return original(*args, **kwargs)

    monkeypatch.setattr(seer_kernels, "token_gate_block_scores", counted)
    model = tiny_model("llama").to(DEVICE)
    ext = build_extension(model, _cfg(gate_query="token_logit_max", kernel=kernel))
    ext.runtime.configure(compute_loss=False)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=random_ids(1, 72).to(DEVICE), use_cache=False)
    assert torch.isfinite(out.logits).all()
    layers = len(seer_gates(model))
    assert calls == (["triton"] * layers if kernel == "triton" else [])


def _selections(model, runtime: SeerRuntime) -> dict[int, torch.Tensor]:
    runtime.record_block_masks = True
    runtime.configure(compute_loss=False)
    runtime.block_masks.clear()
    with torch.no_grad():
        model(input_ids=random_ids(1, 160, seed=9), position_ids=packed_position_ids([70, 90]), use_cache=False)
    return {i: m.clone() for i, m in runtime.block_masks.items()}


def test_gates_save_and_reload_in_their_query_mode_and_refuse_another(tmp_path):
    model = tiny_model("llama")
    torch.manual_seed(4)
    ext = build_extension(model, _cfg(gate_query="token_prob_max"))
    ext.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["gate_query"] == "token_prob_max"
    fresh = tiny_model("llama")
    runtime = load_gates(fresh, tmp_path, runtime=SeerRuntime(mode="joint", density=0.5))
    assert all(g.gate_query == "token_prob_max" for g in seer_gates(fresh))
    masks, fresh_masks = _selections(model, ext.runtime), _selections(fresh, runtime)
    assert masks and all(torch.equal(masks[i], fresh_masks[i]) for i in masks)
    # The same weights scoring pooled queries select other blocks: a mismatch would pass silently.
    pooled = tiny_model("llama")
    pooled_ext = build_extension(pooled, _cfg())
    pooled_ext.load_state_dict(ext.state_dict())
    assert any(not torch.equal(masks[i], m) for i, m in _selections(pooled, pooled_ext.runtime).items())
    refused = r"attention.gates_path=.*gate_query='token_prob_max' but the model's gates have 'pooled'"
    with pytest.raises(ConfigError, match=refused):
        build_extension(tiny_model("llama"), _cfg(gates_path=str(tmp_path)))

    meta.pop("gate_query")  # a file from before the field was saved holds pooled gates
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    before = tiny_model("llama")
    load_gates(before, tmp_path)
    assert all(g.gate_query == "pooled" for g in seer_gates(before))
    with pytest.raises(ValueError, match="gate_query='pooled' but the model's gates have 'token_prob_max'"):
        load_gates(model, tmp_path)


def test_train_and_eval_jobs_run_token_prob_max_gates(tmp_path):
    """Through the `train` and `eval` jobs (config -> gates -> saved folder -> reloaded gates): a short joint run
    of smoke_seer with `attention.gate_query=token_prob_max` saves its gates in that mode and evaluates with them."""
    from seer_finetune.jobs import eval_job, train_job

    cfg = compose_config(
        [
            "+exp=smoke_seer",
            f"trainer.output_dir={tmp_path}",
            "attention.gate_query=token_prob_max",
            "attention.init_steps=0",
            "attention.sink_blocks=0",
            "attention.local_blocks=1",
            "data.seq_len=256",
            "data.max_eval_sequences=1",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=1",
            "trainer.save_every=0",
            "trainer.eval_every=0",
            "trainer.eval_before=false",
            "trainer.progress_bar=false",
            "eval.lengths=[256]",
            "eval.densities=[1.0,0.5]",
            f"eval.model_path={tmp_path / 'final'}",
        ]
    )
    summary = train_job(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert 0 < summary["eval_after"]["seer/recall"] <= summary["eval_after"]["seer/oracle_recall"] + 1e-6
    assert json.loads((tmp_path / "final" / CONFIG_NAME).read_text())["gate_query"] == "token_prob_max"
    rows = eval_job(cfg)["results"]
    assert [r["value"] for r in rows] == [1.0, 0.5] and all(math.isfinite(r["ppl"]) for r in rows)
    assert abs(rows[1]["realised_density"] - 0.5) < 0.05
