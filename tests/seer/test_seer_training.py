"""The trainer extension: modes, parameter groups, metrics, and a short gate distillation that learns."""

from __future__ import annotations

import pytest
import torch

from seer_finetune.config import AttentionConfig, ModelConfig, OptimConfig, SeerConfig
from seer_finetune.seer import build_extension, seer_gates
from seer_helpers import packed_position_ids, random_ids, tiny_model, topic_ids, topic_model


def _cfg(**attention) -> SeerConfig:
    a = dict(backend="seer", block_size=16, gate_hidden_size=32)
    a.update(attention)
    return SeerConfig(
        model=ModelConfig(name_or_path="tiny"), attention=AttentionConfig(**a), optim=OptimConfig(lr=1e-4, gate_lr=3e-3)
    )


def test_modes_set_weights_freezing_and_groups():
    distill = build_extension(tiny_model("llama"), _cfg(mode="gate_distill"))
    assert distill.freeze_base and distill.lm_loss_weight == 0.0
    (group,) = distill.param_groups()
    assert group["name"] == "gates" and group["lr"] == 3e-3 and len(group["params"]) == 4
    joint = build_extension(tiny_model("llama"), _cfg(mode="joint", density=0.5))
    assert not joint.freeze_base and joint.lm_loss_weight == 1.0
    checkpointed = tiny_model("llama")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    build_extension(checkpointed, _cfg(mode="gate_distill"))
    assert not checkpointed.model.gradient_checkpointing  # frozen base: recomputation would be pure waste
    dense = build_extension(tiny_model("llama"), _cfg(mode="dense"))
    assert dense.param_groups() == [] and dense.extra_losses() == {}
    with pytest.raises(ValueError, match="backend=seer"):
        build_extension(tiny_model("llama"), _cfg(backend="sdpa"))


def test_gate_loss_falls_during_distillation():
    """Gates distilled on a tiny model with topic-structured attention: the loss on fresh batches falls."""
    model = topic_model("qwen3")
    ext = build_extension(model, _cfg(mode="gate_distill", gate_loss_scale=1.0, ground_truth_query_fraction=0.5))
    model.requires_grad_(False)
    params = ext.param_groups()[0]["params"]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(40):
        model(input_ids=topic_ids(2, 128, 16, seed=100 + step), use_cache=False)
        extra = ext.extra_losses()
        opt.zero_grad()
        extra["gate_loss"].backward()
        opt.step()
        losses.append(float(extra["gate_loss"].detach()))
    metrics = ext.metrics()
    # the model's output stays dense while distilling: no selection, so no density or recall to report
    layers = len(seer_gates(model))
    assert set(metrics) == {"seer/gate_loss", *(f"seer_gate_loss/layer_{i:02d}" for i in range(layers))}
    assert metrics["seer/gate_loss"] == pytest.approx(sum(metrics[f"seer_gate_loss/layer_{i:02d}"] for i in range(layers)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_joint_step_lm_gradient_reaches_model_only_through_sparse_attention():
    model = tiny_model("llama", sharpen=2.0)
    ext = build_extension(model, _cfg(mode="joint", density=0.5, gate_loss_scale=0.5))
    model.train()
    ids = random_ids(1, 128)
    out = model(input_ids=ids, labels=ids, position_ids=packed_position_ids([50, 78]), use_cache=False)
    extra = ext.extra_losses()
    assert set(extra) == {"gate_loss"} and extra["gate_loss"].requires_grad
    assert ext.extra_losses() == {}  # cleared after reading
    out.loss.backward(retain_graph=True)
    gates = seer_gates(model)
    # the LM loss does not reach the gates (selection is not differentiable) but reaches the model
    assert all(g.q_weight.grad is None for g in gates)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    extra["gate_loss"].backward()
    assert all(g.q_weight.grad.abs().sum() > 0 for g in gates)
    metrics = ext.metrics()
    assert abs(metrics["seer/density"] - 0.5) < 0.1
    # every layer reports its density, gate loss and recall; no selection of the same size keeps more
    for name in ("density", "gate_loss", "recall", "oracle_recall"):
        assert {f"seer_{name}/layer_{i:02d}" for i in range(len(gates))} <= set(metrics), name
    for i in range(len(gates)):
        assert 0.0 < metrics[f"seer_recall/layer_{i:02d}"] <= metrics[f"seer_oracle_recall/layer_{i:02d}"] + 1e-6 <= 1.0 + 2e-6
    # gate_loss_scale weights the returned loss, metrics report the unweighted sum
    assert float(extra["gate_loss"].detach()) == pytest.approx(0.5 * metrics["seer/gate_loss"], rel=1e-5)


def test_ground_truth_subset_and_eval_mode():
    model = tiny_model("llama")
    ext = build_extension(model, _cfg(mode="joint", density=0.5, ground_truth_query_fraction=0.25))
    model.train()
    model(input_ids=random_ids(1, 128), use_cache=False)
    assert ext.extra_losses()["gate_loss"].requires_grad
    ext.set_training(False)
    model.eval()
    with torch.no_grad():
        model(input_ids=random_ids(1, 128), use_cache=False)
    assert not ext.runtime.take_losses()[0].requires_grad
    assert "seer/gate_loss" in ext.metrics()


def test_gradient_checkpointing_recomputes_without_double_counting(monkeypatch):
    """Recomputed forwards re-run the hooks and the gates; grads and recorded metrics stay those of one pass,
    and the ground truth is computed once per layer (reused by the recomputation)."""
    import seer_kernels

    calls = []
    original = seer_kernels.attention_ground_truth
    monkeypatch.setattr(seer_kernels, "attention_ground_truth", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = random_ids(1, 96)
    grads = []
    for checkpointing in (False, True):
        calls.clear()
        model = topic_model("llama")
        torch.manual_seed(3)
        ext = build_extension(model, _cfg(mode="joint", density=0.5))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, labels=ids, use_cache=False)
        (out.loss + ext.extra_losses()["gate_loss"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert len(ext.runtime.stats) == 1  # one forward's entries, overwritten (not added) by the recompute
        assert len(calls) == 2  # one ground truth per layer, with or without recomputation
    assert grads[0].keys() == grads[1].keys() and any("seer_gate" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_gate_path_compiles_by_default_only_in_training_on_cuda():
    """`attention.compile_gate` unset: compiled for CUDA tensors while autograd records (training steps and their
    recomputation), eager on CPU and without gradients (evaluation, prefill); true / false force it."""
    from seer_finetune.compose import compose_config
    from seer_finetune.seer.gate_path import compile_gate_now

    assert compose_config(["+exp=smoke_seer"]).attention.compile_gate is None
    assert compose_config(["+exp=smoke_seer", "attention.compile_gate=false"]).attention.compile_gate is False
    cpu = torch.zeros(1)
    assert not compile_gate_now(None, cpu)
    assert compile_gate_now(True, cpu) and not compile_gate_now(False, cpu)
    if torch.cuda.is_available():
        cuda = torch.zeros(1, device="cuda")
        assert compile_gate_now(None, cuda)
        with torch.no_grad():
            assert not compile_gate_now(None, cuda) and compile_gate_now(True, cuda)


@pytest.mark.parametrize(
    "checkpointing, gate_query", [(False, "pooled"), (True, "pooled"), (False, "token_prob_max"), (True, "token_prob_max")]
)
def test_compiled_gate_path_trains_like_the_eager_one(monkeypatch, checkpointing, gate_query):
    """`compile_gate`: the gate path under torch.compile gives the eager losses, gradients (model and gates) and
    statistics, with packed documents, GQA and gradient checkpointing's recomputation; `token_prob_max` as well
    (in three chunks of query blocks, each checkpointed inside the compiled graph)."""
    from torch._dynamo.utils import counters

    from seer_finetune.seer import gate as gate_module

    # 4 heads, 16 tokens and 8 key blocks: three query blocks' logits per chunk.
    monkeypatch.setattr(gate_module, "TOKEN_CHUNK_ELEMENTS", 4 * 16 * 8 * 3)

    torch._dynamo.reset()
    counters.clear()
    ids = random_ids(1, 120)
    results = []
    for compiled in (False, True):
        model = topic_model("llama")
        torch.manual_seed(3)
        ext = build_extension(
            model,
            _cfg(mode="joint", density=0.5, compile_gate=compiled, ground_truth_query_fraction=1.0, gate_query=gate_query),
        )
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, labels=ids, position_ids=packed_position_ids([50, 70]), use_cache=False)
        gate_loss = ext.extra_losses()["gate_loss"]
        (out.loss + gate_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(out.loss.detach()), float(gate_loss.detach()), grads, ext.metrics()))
    # Compiled for real: the log-probabilities, the loss and the statistics, each one graph without breaks, for
    # all layers.
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    (lm0, gate0, grads0, metrics0), (lm1, gate1, grads1, metrics1) = results
    assert metrics0.keys() == metrics1.keys() and any("recall" in name for name in metrics0)
    for name, value in metrics0.items():
        assert metrics1[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert lm1 == pytest.approx(lm0, rel=1e-5) and gate1 == pytest.approx(gate0, rel=1e-5)
    assert grads0.keys() == grads1.keys() and any("seer_gate" in n for n in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_gate_path_keeps_static_shapes_across_lengths():
    """The compiled gate path builds a graph per sequence length, none with symbolic shapes: three lengths give
    three graphs per function (dynamo's default makes the second length symbolic and reuses that graph for the
    third; Inductor cannot compile the token-scored gate's backward that way). Each length trains like eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for compiled in (False, True):
        model = topic_model("llama")
        torch.manual_seed(3)
        ext = build_extension(
            model,
            _cfg(mode="joint", density=0.5, compile_gate=compiled, ground_truth_query_fraction=1.0,
                 gate_query="token_prob_max"),
        )
        model.train()
        for length in (64, 96, 128):
            ids = random_ids(1, length)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            gate_loss = ext.extra_losses()["gate_loss"]
            gate_loss.backward()
            losses.setdefault(length, []).append(float(gate_loss.detach()))
            model.zero_grad(set_to_none=True)
    # Three functions (log-probabilities, loss, statistics), one graph each per length.
    assert counters["stats"]["unique_graphs"] == 9 and not counters["graph_break"]
    for length, (eager, compiled) in losses.items():
        assert compiled == pytest.approx(eager, rel=1e-5), length


def test_ground_truth_rows_are_a_sorted_random_subset():
    """The query blocks that get a ground truth: about the fraction of them, sorted, distinct, in range, a new draw
    each time, and None (every row) at a fraction of 1."""
    from seer_finetune.seer.attention import _sample_query_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    draws = []
    for fraction, count in ((0.25, 9), (0.5, 18), (0.01, 1)):
        rows = _sample_query_blocks(37, fraction, torch.device(device))
        assert rows.dtype == torch.int64 and rows.device.type == device and rows.numel() == count
        assert torch.equal(rows, rows.unique()) and 0 <= int(rows.min()) and int(rows.max()) < 37
        draws.append(rows)
    assert any(not torch.equal(draws[0], _sample_query_blocks(37, 0.25, torch.device(device))) for _ in range(5))
    assert _sample_query_blocks(37, 1.0, torch.device(device)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_joint_step_synchronises_no_more_with_more_layers():
    """A joint training step (checkpointed, ground truth on half the rows, Triton kernels) reads from the device a
    fixed number of times per step, none per layer: each read stalls the host until the GPU has drained its queue.
    Counted by torch's sync debug mode for 2 and 4 layers."""
    import warnings

    counts = []
    for layers in (2, 4):
        model = tiny_model("llama", num_hidden_layers=layers).cuda()
        ext = build_extension(model, _cfg(mode="joint", density=0.5, ground_truth_query_fraction=0.5))
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = random_ids(1, 128).cuda()

        def step():
            out = model(input_ids=ids, labels=ids, use_cache=False)
            (out.loss + ext.extra_losses()["gate_loss"]).backward()

        step()  # compile the kernels, build the forward's plans
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], f"synchronising calls per step: {counts[0]} with 2 layers, {counts[1]} with 4"
