"""`trainer.cuda_graphs`: what it refuses by name, the pieces it stands on (a loss that reads nothing back, gradients
zeroed in place, statistics recorded again after a replay, attention without a mask function), and on a GPU the
graphed run against the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.graphed_step import causal_only_attention
from seer_finetune.metrics import read_metrics
from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_finetune.trainer import Trainer
from helpers import tiny_config

def _tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").float().eval()


RUN = [
    "+exp=smoke",
    "data.seq_len=256",
    "data.max_eval_sequences=1",
    "trainer.max_steps=5",
    "trainer.micro_batch_size=1",
    "trainer.grad_accum_steps=2",
    "trainer.eval_before=false",
    "trainer.save_final=false",
    "trainer.progress_bar=false",
    "optim.warmup_steps=1",
]


@pytest.mark.parametrize(
    "extra, why",
    [
        (["deepspeed.enabled=true"], "DeepSpeed"),
        (["data.attend_within_documents=true"], "per-document attention"),
        (["attention.backend=eager"], "no causal-only form"),
        (["trainer.lm_loss=liger"], "Liger"),
    ],
)
def test_what_a_graph_cannot_replay_is_refused_by_name(extra, why):
    with pytest.raises(ConfigError, match=f"trainer.cuda_graphs=true: .*{why}"):
        compose_config([*RUN, "trainer.cuda_graphs=true", *extra])


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_cpu_run_asking_for_graphs_stops_before_loading_anything(tmp_path, device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto resolves to this machine's GPU: the run would train (the cpu case runs here)")
    cfg = compose_config([*RUN, "trainer.cuda_graphs=true", f"trainer.device={device}",
                          f"trainer.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="trainer.cuda_graphs=true needs a CUDA device"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_plain_engine_keeps_gradient_tensors_when_asked(tmp_path):
    trainer = Trainer(compose_config([*RUN, f"trainer.output_dir={tmp_path / 'run'}", "trainer.device=cpu"]))
    trainer.train_step()
    params = [p for g in trainer.engine.optimizer.param_groups for p in g["params"]]
    assert all(p.grad is None for p in params)  # freed after the step by default
    trainer.engine.keep_gradients = True
    loss, _ = trainer._forward_loss(trainer._next_batch())
    trainer.engine.backward(loss)
    grads = {p: p.grad for p in params if p.grad is not None}
    assert grads
    trainer.engine.step()
    for p, grad in grads.items():
        assert p.grad is grad and not grad.any()  # the same tensor, zeroed


def test_replayed_statistics_count_as_forwards_and_the_warm_up_is_dropped():
    runtime = SeerRuntime(mode="joint", density=0.5)
    runtime.begin_forward()
    runtime.record("recall/0", torch.tensor(0.2))  # an eager step before the capture: kept
    marker = runtime.stats_marker()
    for value in (0.9, 0.5):  # a warm-up forward, then the capture's
        runtime.begin_forward()
        runtime.record("recall/0", torch.tensor(value))
    captured = runtime.pop_stats_since(marker)
    assert captured["recall/0"].item() == 0.5
    for value in (0.3, 0.7):  # two replays: each fills the captured tensor, then records it again
        captured["recall/0"].fill_(value)
        runtime.add_forward_stats(captured)
    assert runtime.take_stats()["recall/0"] == pytest.approx((0.2 + 0.3 + 0.7) / 3)
    runtime.begin_forward()  # a later forward records under an id of its own
    runtime.record("recall/0", torch.tensor(1.0))
    assert runtime.take_stats()["recall/0"] == pytest.approx(1.0)



@pytest.mark.parametrize("same_keys", [True, False])
def test_statistics_average_each_key_over_the_forwards_that_recorded_it(same_keys):
    runtime = SeerRuntime(mode="joint", density=0.5)
    forwards = [
        {"recall/0": 0.25, "density_heads/0": [0.1, 0.3], "recall/1": 0.5},
        {"recall/0": 0.75, "density_heads/0": [0.3, 0.5], "recall/1": 1.0},
    ]
    if not same_keys:
        forwards.append({"recall/0": 0.5})  # e.g. a forward of other layers: recall/1 keeps its two values
    for values in forwards:
        runtime.begin_forward()
        for key, value in values.items():
            runtime.record(key, torch.tensor(value))
    stats = runtime.take_stats()
    assert stats["recall/0"] == pytest.approx(0.5)
    assert stats["recall/1"] == pytest.approx(0.75)
    assert stats["density_heads/0"] == pytest.approx([0.2, 0.4])
    assert list(stats) == ["recall/0", "density_heads/0", "recall/1"] and runtime.take_stats() == {}

@pytest.mark.parametrize("backend", ["sdpa", "seer"])
def test_causal_only_attention_builds_no_mask_and_changes_nothing(backend, monkeypatch):
    model = _tiny_model()
    if backend == "seer":
        attach_seer_gates(model, SeerRuntime(mode="joint", density=0.5, block_size=16, kernel="pytorch"),
                          gate_hidden_size=8)
    ids = torch.randint(2, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        import transformers.masking_utils as masking_utils

        def no_mask_expected(*args, **kwargs):
            raise AssertionError("transformers built a mask")

        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_mask_expected)
        with causal_only_attention(model) as name:
            assert name == f"{backend}_causal" and model.config._attn_implementation == name
            got = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.config._attn_implementation == backend


def test_causal_only_attention_refuses_an_implementation_that_needs_its_mask():
    model = _tiny_model()
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="no causal-only form"):
        with causal_only_attention(model):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["sdpa", "seer"])
def test_graphed_steps_train_as_eager_steps(tmp_path, backend):
    """Five steps of two micro-batches, the last three replayed from a graph: the same losses, gate statistics
    and weights as the eager run, up to float rounding (the seer run's ground-truth rows are random draws:
    with `ground_truth_query_fraction=1` there are none)."""
    # No random draws but the data order. Float32: the graphed step's loss (gradients in its forward, bf16 logits)
    # and causal-only attention round differently from the eager step's in bf16, and Adam turns that into weight
    # differences of a few learning rates within five steps (measured on an H100; float32 agrees to 1.4e-5).
    extra = ["trainer.device=cuda", "trainer.lm_loss=chunked", "peft.dropout=0.0", "model.dtype=float32"]
    if backend == "seer":
        extra += ["attention=seer_joint", "attention.block_size=32", "attention.gate_hidden_size=32",
                  "attention.density=0.5", "attention.ground_truth_query_fraction=1.0", "attention.init_steps=0"]
    runs = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs_{graphs}"
        cfg = compose_config([*RUN, *extra, f"trainer.cuda_graphs={str(graphs).lower()}", f"trainer.output_dir={out}"])
        trainer = Trainer(cfg)
        trainer.fit()
        assert (trainer.graphed is not None) == graphs
        if graphs:
            assert trainer.graphed.captures == 1
        weights = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[graphs] = ([r for r in read_metrics(out) if "train/loss" in r], copy.deepcopy(weights))
    (eager, eager_weights), (graphed, graphed_weights) = runs[False], runs[True]
    assert len(eager) == len(graphed) == 5
    for a, b in zip(eager, graphed):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        for key in a:
            if key.startswith("seer/recall") or key.startswith("seer/gate_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    for name, weight in eager_weights.items():
        torch.testing.assert_close(graphed_weights[name], weight, rtol=1e-3, atol=1e-5,
                                   msg=lambda detail, name=name: f"{name}: {detail}")
