"""The next-token loss without full logits (`seer_finetune/lm_loss.py`, `trainer.lm_loss`).

Against transformers' own loss on tiny random models with a 50k vocabulary: the same loss and every gradient
(LoRA, embeddings tied and untied, norms, full fine-tuning), with -100 targets; the logits it holds are a chunk's,
never the sequence's; which loss `auto` picks; one-line errors; the trainer with each loss, with gradient
checkpointing through a seer joint run, under Ulysses sequence parallelism, and the 128k experiment's recipe on
a tiny Qwen2.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError, PeftConfig
from seer_finetune.lm_loss import (
    FUSED_ABOVE_LOGITS, CausalLMLoss, choose_lm_loss, chunked_loss_sum, linear_cross_entropy_sum, linear_weights,
    next_token_targets,
)
from seer_finetune.metrics import read_metrics
from seer_finetune.modeling import apply_peft
from seer_finetune.trainer import Trainer

from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50_000
CPU = torch.device("cpu")


def _model(tied: bool, peft: PeftConfig, *, model_type: str = "llama", checkpointing: bool = False) -> torch.nn.Module:
    """A tiny random causal LM with a large vocabulary, trained as `peft` says; LoRA's B matrices are random so
    that every adapter weight gets a gradient."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, vocab_size=VOCAB, hidden_size=64, tie_word_embeddings=tied), dtype=torch.float32
    )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_peft(model, peft)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.train()


def _batch(batch: int = 2, length: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with chat-like holes (-100: no target), including a row's first tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, 20:31] = -100
    return ids, labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain(model, ids, labels):
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _fused(model, kind, ids, labels, *, rows: int, capturable: bool = False):
    lm = CausalLMLoss(model, kind, CPU, chunk_logits=rows * VOCAB, capturable=capturable)
    targets = next_token_targets(labels)
    loss = lm.summed(kind, targets, input_ids=ids) / (targets != -100).sum()
    loss.backward()
    return loss.detach(), _grads(model)


SETUPS = {
    "lora_embeddings_norms_tied": (True, PeftConfig(trainable_embeddings=True, trainable_norms=True), False),
    "lora_embeddings_norms_untied": (False, PeftConfig(trainable_embeddings=True, trainable_norms=True), False),
    "lora_frozen_tied_head_checkpointed": (True, PeftConfig(), True),
    "full_untied": (False, PeftConfig(method="full"), False),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_chunked_loss_equals_transformers_loss_and_gradients(setup):
    tied, peft, checkpointing = SETUPS[setup]
    reference = _model(tied, peft, checkpointing=checkpointing)
    ours = copy.deepcopy(reference)
    ids, labels = _batch()
    loss, grads = _plain(reference, ids, labels)
    # 13 rows a chunk: uneven chunks, the last one short
    got, got_grads = _fused(ours, "chunked", ids, labels, rows=13)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == got_grads.keys() and len(grads) > 4
    names = " ".join(grads)
    assert ("embed_tokens" in names) == (peft.trainable_embeddings or peft.method == "full")
    assert ("lm_head" in names) == (not tied and (peft.trainable_embeddings or peft.method == "full"))
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("setup", ["lora_embeddings_norms_tied", "lora_frozen_tied_head_checkpointed"])
def test_capturable_chunked_loss_projects_every_row_and_gives_the_same_loss(setup, monkeypatch):
    """`capturable` (CUDA graphs): no row selection (a `nonzero`, read back from the device); the rows without a
    target are projected and skipped by the cross entropy, for the same loss and gradients."""
    import seer_finetune.lm_loss as lm_loss

    tied, peft, checkpointing = SETUPS[setup]
    reference = _model(tied, peft, checkpointing=checkpointing)
    ours = copy.deepcopy(reference)
    ids, labels = _batch()
    loss, grads = _plain(reference, ids, labels)

    def no_selection(*args):
        raise AssertionError("the capturable loss selected the targeted rows")

    monkeypatch.setattr(lm_loss, "_target_rows", no_selection)
    got, got_grads = _fused(ours, "chunked", ids, labels, rows=13, capturable=True)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == got_grads.keys() and len(grads) > 4
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Where auto would take Liger, a capturable loss takes the chunked one.
    assert not CausalLMLoss(ours, "auto", CPU, capturable=True).liger_usable


@pytest.mark.parametrize("setup", ["full_untied", "lora_frozen_tied_head_checkpointed"])
def test_capturable_loss_takes_its_gradients_in_the_forward(setup, monkeypatch):
    """With a linear head the capturable loss computes the gradients in its forward: no chunk is recomputed
    under checkpointing, and the loss and every gradient are transformers' (head trained, or frozen)."""
    import seer_finetune.lm_loss as lm_loss

    tied, peft, checkpointing = SETUPS[setup]
    reference = _model(tied, peft, checkpointing=checkpointing)
    ours = copy.deepcopy(reference)
    ids, labels = _batch()
    loss, grads = _plain(reference, ids, labels)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the capturable loss ran a checkpointed chunk")

    monkeypatch.setattr(lm_loss, "checkpoint", no_recompute)
    got, got_grads = _fused(ours, "chunked", ids, labels, rows=13, capturable=True)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == got_grads.keys() and len(grads) > 4
    assert ("lm_head" in " ".join(grads)) == (setup == "full_untied")
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_over_every_row_equals_the_targeted_rows(monkeypatch):
    """The capturable loss's fallback for a head that is not one linear weight (LoRA on the head): every row
    projected, those without a target skipped by the cross entropy, no row selection; the same sum and gradients
    as the targeted rows alone."""
    import seer_finetune.lm_loss as lm_loss

    g = torch.Generator().manual_seed(5)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 300))  # not one linear weight
    hidden = torch.randn(2, 11, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (2, 11), generator=g)
    targets[0, :4] = -100
    want = chunked_loss_sum(head, hidden, targets, rows=5)
    want_grads = torch.autograd.grad(want, [hidden, *head.parameters()])

    def no_selection(*args):
        raise AssertionError("every_row selected the targeted rows")

    monkeypatch.setattr(lm_loss, "_target_rows", no_selection)
    got = chunked_loss_sum(head, hidden, targets, rows=5, every_row=True)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _reference_sum(hidden, weight, bias, targets):
    return torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight, bias).float(), targets, reduction="sum", ignore_index=-100
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_sum_against_pytorch(dtype):
    """Values and the gradients of hidden states, weight and bias, with rows without a target, uneven chunks and a
    scaled incoming gradient; bfloat16 within twice PyTorch's own bfloat16 error against float32."""
    g = torch.Generator().manual_seed(3)
    n, h, v = 37, 24, 1000
    base = [torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 4, torch.randn(v, generator=g)]
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[0, 5, 6, 36]] = -100

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in base]
        (fn(*leaves, targets) * 3.0).backward()
        return [fn(*leaves, targets).detach().float()] + [t.grad.float() for t in leaves]

    ours = lambda hs, w, b, t: linear_cross_entropy_sum(hs, w, b, t, rows=10)  # noqa: E731
    exact = run(_reference_sum, torch.float64)
    got = run(ours, dtype)
    if dtype == torch.float32:
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return
    theirs = run(_reference_sum, dtype)
    for a, b, e in zip(got, theirs, exact):
        ours_err = (a.double() - e).abs().max()
        torch_err = (b.double() - e).abs().max()
        assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


def test_linear_cross_entropy_sum_without_gradients_holds_none():
    """Evaluation: under no_grad only the loss is computed, equal to PyTorch's."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(300, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (2, 9), generator=g)
    targets[1, -1] = -100
    with torch.no_grad():
        got = linear_cross_entropy_sum(hidden, weight, None, targets, rows=4)
        want = _reference_sum(hidden.reshape(-1, 16), weight, None, targets.reshape(-1))
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setup", ["lora_embeddings_norms_tied", "full_untied"])
def test_liger_loss_equals_transformers_loss_and_gradients(setup):
    """Liger-Kernel's Triton kernels run on the CPU under the Triton interpreter (tests/conftest.py)."""
    tied, peft, checkpointing = SETUPS[setup]
    reference = _model(tied, peft, checkpointing=checkpointing)
    ours = copy.deepcopy(reference)
    ids, labels = _batch(length=24)
    loss, grads = _plain(reference, ids, labels)
    got, got_grads = _fused(ours, "liger", ids, labels, rows=8)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == got_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _largest_logits(model, kind: str, ids, labels, rows: int) -> tuple[int, int]:
    """(most rows of any output of the head, largest tensor autograd keeps from forward to backward, in elements)
    over one forward and backward."""
    head_rows, saved = [0], [0]

    def on_head(module, args, out):
        head_rows[0] = max(head_rows[0], out.reshape(-1, out.shape[-1]).shape[0])

    def pack(t):
        saved[0] = max(saved[0], t.numel())
        return t

    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(on_head)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if kind == "full_logits":
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            else:
                lm = CausalLMLoss(model, kind, CPU, chunk_logits=rows * VOCAB)
                targets = next_token_targets(labels)
                loss = lm.summed(kind, targets, input_ids=ids) / (targets != -100).sum()
        loss.backward()
    finally:
        handle.remove()
    return head_rows[0], saved[0]


def test_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    """The head projects at most one chunk of rows at a time, in the forward and in the backward's
    recomputation, and nothing of [tokens, vocabulary] is kept for the backward; transformers' loss does both."""
    model = _model(True, PeftConfig(trainable_embeddings=True, trainable_norms=True))
    ids, labels = _batch(batch=2, length=200)
    tokens = ids.numel()
    head_rows, saved = _largest_logits(model, "chunked", ids, labels, rows=16)
    assert head_rows == 16
    # the biggest kept tensor is the tied embedding's weight (vocabulary x hidden), far below the logits
    assert saved <= VOCAB * 64 < tokens * VOCAB // 4
    head_rows, saved = _largest_logits(model, "full_logits", ids, labels, rows=16)
    assert head_rows == tokens and saved >= tokens * VOCAB


def test_auto_picks_full_logits_below_the_threshold_and_liger_on_cuda_only():
    small, large = FUSED_ABOVE_LOGITS, FUSED_ABOVE_LOGITS + 1
    assert choose_lm_loss("auto", device_type="cuda", logits=small, liger_usable=True) == "full_logits"
    assert choose_lm_loss("auto", device_type="cuda", logits=large, liger_usable=True) == "liger"
    assert choose_lm_loss("auto", device_type="cuda", logits=large, liger_usable=False) == "chunked"
    assert choose_lm_loss("auto", device_type="cpu", logits=large, liger_usable=True) == "chunked"
    assert choose_lm_loss("auto", device_type="cuda", logits=large, liger_usable=True, softcapped=True) == "full_logits"
    # one 128k sequence of Qwen2.5's vocabulary
    assert choose_lm_loss("auto", device_type="cuda", logits=131072 * 151936, liger_usable=True) == "liger"
    for setting in ("full_logits", "chunked", "liger"):
        assert choose_lm_loss(setting, device_type="cpu", logits=small, liger_usable=False) == setting


def test_model_without_head_and_liger_where_it_cannot_run_are_one_line_errors():
    headless = AutoModel.from_config(tiny_config("llama"))
    with pytest.raises(ConfigError, match=r"LlamaModel has no output head \(lm_head\).*trainer.lm_loss=full_logits"):
        CausalLMLoss(headless, "chunked", CPU)
    assert CausalLMLoss(headless, "auto", CPU).kind(10**9) == "full_logits"
    # LoRA on the head: its output is not one weight's, so only the chunked loss (which calls the module) applies
    lora_head = _model(False, PeftConfig(target_modules=["q_proj", "lm_head"]))
    assert linear_weights(lora_head.get_base_model().get_output_embeddings()) is None
    with pytest.raises(ConfigError, match="not one linear weight.*trainer.lm_loss=chunked"):
        CausalLMLoss(lora_head, "liger", CPU)
    assert CausalLMLoss(lora_head, "auto", CPU).liger_usable is False
    ids, labels = _batch(length=16)
    reference = copy.deepcopy(lora_head)
    loss, grads = _plain(reference, ids, labels)
    got, got_grads = _fused(lora_head, "chunked", ids, labels, rows=5)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    assert any("lm_head.lora" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="trainer.lm_loss=liger reads the head's whole weight"):
        compose_config(["+exp=smoke", "trainer.lm_loss=liger", "deepspeed=zero3"])
    with pytest.raises(ConfigError, match="trainer.lm_loss"):
        compose_config(["+exp=smoke", "trainer.lm_loss=fused"])


def _smoke(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "+exp=smoke", "data.seq_len=256", "rope.factor=1", "rope=none", "trainer.micro_batch_size=2",
        "trainer.progress_bar=false", "trainer.save_every=0", "trainer.plots=false", "data.max_eval_sequences=2",
        f"data.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={tmp_path / name}", *extra,
    ]


def test_trainer_trains_the_same_with_each_loss(tmp_path):
    """Three steps of the smoke recipe (LoRA + tied embeddings + norms): the loss curve, gradient norms and the
    evaluation agree between transformers' loss and the chunked one (three chunks per sequence)."""
    summaries, curves = {}, {}
    for kind in ("full_logits", "chunked"):
        trainer = Trainer(compose_config(_smoke(tmp_path, kind, f"trainer.lm_loss={kind}", "trainer.max_steps=3")))
        trainer.lm_loss.chunk_logits = 100 * trainer.lm_loss.vocab_size
        summaries[kind] = trainer.fit()
        curves[kind] = [(r["train/lm_loss"], r["train/grad_norm"]) for r in read_metrics(tmp_path / kind) if "train/lm_loss" in r]
    assert len(curves["chunked"]) == 3
    for (loss, norm), (ref_loss, ref_norm) in zip(curves["chunked"], curves["full_logits"]):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)
    assert summaries["chunked"]["eval_after"]["loss"] == pytest.approx(summaries["full_logits"]["eval_after"]["loss"], rel=1e-5)


def test_gradient_checkpointing_in_a_seer_joint_run_changes_nothing(tmp_path):
    """A joint seer step through the trainer (LoRA + embeddings + norms, gates, chunked loss): checkpointed
    decoder layers give the losses and every gradient of the run without checkpointing. The recomputation
    re-runs the gates' Q/K hooks: the gate loss is counted once and the recorded statistics are one pass's."""
    seer = ["attention=seer_joint", "attention.block_size=32", "attention.gate_hidden_size=32", "attention.density=0.5",
            "data.attend_within_documents=true", "trainer.lm_loss=chunked", "trainer.micro_batch_size=1"]
    results = []
    for on in (False, True):
        trainer = Trainer(compose_config(_smoke(tmp_path, f"ckpt_{on}", *seer, f"model.gradient_checkpointing={on}")))
        trainer.lm_loss.chunk_logits = 64 * trainer.lm_loss.vocab_size
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == on
        loss, parts = trainer._forward_loss(trainer._next_batch())
        loss.backward()
        stats = dict(trainer.extension.runtime.stats)
        results.append(({k: float(v) for k, v in parts.items()}, _grads(trainer.model), stats, trainer.extension.metrics()))
    (parts, grads, stats, metrics), (parts_c, grads_c, stats_c, metrics_c) = results
    assert set(parts) == {"lm_loss", "gate_loss"}
    for key in parts:
        assert parts_c[key] == pytest.approx(parts[key], rel=1e-6)
    assert grads.keys() == grads_c.keys() and any("seer_gate" in n for n in grads) and any("lora" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert stats.keys() == stats_c.keys()
    assert metrics_c.keys() == metrics.keys()
    for key, value in metrics.items():
        if isinstance(value, float):
            assert metrics_c[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_yarn128k_sparsity90_recipe_trains_a_tiny_qwen2_on_cpu(tmp_path):
    """`+exp=yarn128k_sparsity90` as it is (blocks of 128, LoRA + norms, checkpointed layers, layer budget, the
    chunked loss), shrunk to the embedded Qwen2-shaped model (12 query / 2 KV heads of 128) at 4 x 256 tokens."""
    cfg = compose_config([
        "+exp=yarn128k_sparsity90", "model=tiny_qwen2", "model.gradient_checkpointing=true", "data=embedded_shakespeare",
        "rope.original_max_position_embeddings=256", "data.seq_len=1024", "data.max_eval_sequences=1",
        "attention.gates_path=null", "trainer.max_steps=2", "trainer.lm_loss=chunked", "trainer.device=cpu",
        "trainer.progress_bar=false", "trainer.plots=false", "trainer.eval_before=false",
        f"data.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={tmp_path / 'run'}",
    ])
    assert (cfg.attention.block_size, cfg.attention.density, cfg.rope.factor) == (128, 0.1, 4.0)
    assert cfg.peft.trainable_norms and not cfg.peft.trainable_embeddings
    trainer = Trainer(cfg)
    trainer.lm_loss.chunk_logits = 256 * trainer.lm_loss.vocab_size
    attn = trainer.model.get_base_model().config
    assert (attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim) == (12, 2, 128)
    summary = trainer.fit()
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    records = [r for r in read_metrics(tmp_path / "run") if "train/lm_loss" in r]
    assert len(records) == 2 and all(r["train/gate_loss"] > 0 for r in records)
    assert summary["eval_after"]["ppl"] > 1 and "ppl_dense" in summary["eval_after"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ulysses_shards_with_the_chunked_loss_match_one_process(tmp_path):
    """Two sequence-parallel ranks under ZeRO-3, each with the chunked loss of its shard over the whole
    sequence's target count: the LM loss and every gradient of one process with transformers' loss."""
    common = ["+exp=smoke", "rope.factor=2", "data.seq_len=256", "data.max_eval_sequences=2", "optim.lr=1e-3",
              "optim.warmup_steps=0", "peft=full", "trainer.micro_batch_size=1", "trainer.progress_bar=false",
              f"data.cache_dir={tmp_path / 'cache'}", f"trainer.output_dir={tmp_path / 'sp'}"]
    out = tmp_path / "sp2.safetensors"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "tests" / "distributed" / "ulysses_gradients.py"), str(out), *common,
           "deepspeed=zero3", "deepspeed.sequence_parallel_size=2", "trainer.lm_loss=chunked"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    trainer = Trainer(compose_config([*common, "trainer.lm_loss=full_logits"]))
    loss, parts = trainer._forward_loss(trainer._next_batch())
    loss.backward()
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-6000:]
    sp2 = load_file(str(out))
    assert float(sp2.pop("__lm_loss__")) == pytest.approx(float(parts["lm_loss"]), rel=1e-6)
    expected = _grads(trainer.model)
    assert set(sp2) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(sp2[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_losses_on_cuda_in_bf16_match_and_hold_a_fraction_of_the_memory():
    """bf16 on the GPU, Qwen2.5's vocabulary, 8192 tokens, LoRA + tied trainable embeddings + norms: Liger and the
    chunked loss give transformers' loss and gradients (to bf16 rounding) at under half its peak memory."""
    cuda = torch.device("cuda")
    vocab = 151_936
    torch.manual_seed(0)
    config = tiny_config("qwen2", vocab_size=vocab, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(cuda)
    model = apply_peft(model, PeftConfig(trainable_embeddings=True, trainable_norms=True)).train()
    ids = torch.randint(2, vocab, (1, 8192), device=cuda)
    results = {}
    for kind in ("full_logits", "chunked", "liger"):
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(cuda)
        before = torch.cuda.memory_allocated(cuda)
        lm = CausalLMLoss(model, kind, cuda)
        assert lm.kind(ids.numel()) == kind
        loss = lm.mean(ids, ids)
        loss.backward()
        torch.cuda.synchronize(cuda)
        results[kind] = (float(loss), torch.cuda.max_memory_allocated(cuda) - before, _grads(model))
    assert CausalLMLoss(model, "auto", cuda).kind(ids.numel()) == "liger"
    loss, peak, grads = results["full_logits"]
    for kind in ("chunked", "liger"):
        got, got_peak, got_grads = results[kind]
        assert got == pytest.approx(loss, rel=2e-3), kind
        assert got_peak < peak / 2, (kind, got_peak, peak)
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            diff = (got_grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
            assert diff < 3e-2, (kind, name, float(diff))
