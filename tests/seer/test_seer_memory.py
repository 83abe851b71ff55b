"""What a seer training step holds for backward, against the dense baseline through the same kernels.

Memory is measured as the storages aten ops return during a step that are still alive at a point of it (a
`TorchDispatchMode`, so tensors that only autograd or a cache holds count too). The seer layer may hold, beyond
the dense one, its selection as bits, its ground-truth rows and its gate weights' gradients; bounds are derived
from the shapes. What it must not hold across layers: its log-probabilities, its ground truth or a bool block
mask per layer (all `[B, Hq, nB, nB]`-sized), nor block lists kept outside the checkpoint's reach.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import seer_kernels
from seer_finetune.seer import SeerRuntime, attach_seer_gates, attention, seer_gates
from seer_helpers import random_ids, tiny_model

# B = 1, Hq = 4, Hkv = 2 (tiny_model), L = 2048 in blocks of 16: nB = 128, ground truth on nQ = 64 rows.
LENGTH, BLOCK, FRACTION, GATE_HIDDEN = 2048, 16, 0.5, 16


class LiveStorages(TorchDispatchMode):
    """The storages aten ops allocate while active (not views of their inputs); `nbytes` sums those still alive."""

    def __init__(self):
        super().__init__()
        self._storages = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                storage = t.untyped_storage()
                self._storages.setdefault(storage, storage.nbytes())
        return out

    def nbytes(self, exclude: tuple[torch.Tensor, ...] = ()) -> int:
        skip = {id(t.untyped_storage()) for t in exclude}
        return sum(n for storage, n in list(self._storages.items()) if id(storage) not in skip)


def _step_memory(mode: str, checkpointing: bool) -> tuple[int, int, int]:
    """(bytes alive at the end of the forward, bytes alive after backward without the parameters' gradients, the
    gates' parameter bytes) of a training step made after a warm-up step (gate RoPE angles, optimizer-free)."""
    model = tiny_model("llama", max_position_embeddings=LENGTH).train()
    runtime = SeerRuntime(
        mode=mode, density=0.25, block_size=BLOCK, ground_truth_query_fraction=FRACTION, kernel="pytorch"
    )
    torch.manual_seed(0)
    attach_seer_gates(model, runtime, gate_hidden_size=GATE_HIDDEN)
    if mode == "dense":
        for gate in seer_gates(model):
            gate.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(1, LENGTH)

    def step(live: LiveStorages | None = None) -> int:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss = loss + sum(runtime.take_losses().values())
        end_of_forward = live.nbytes() if live is not None else 0
        loss.backward()
        return end_of_forward

    step()
    model.zero_grad(set_to_none=True)
    runtime.take_stats()
    with LiveStorages() as live:
        end_of_forward = step(live)
        grads = tuple(p.grad for p in model.parameters() if p.grad is not None)
        after_backward = live.nbytes(exclude=grads)
    gate_bytes = sum(p.numel() * p.element_size() for g in seer_gates(model) for p in g.parameters())
    return end_of_forward, after_backward, gate_bytes


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "not checkpointed"])
def test_seer_step_holds_its_selection_bits_beyond_the_dense_step(checkpointing):
    """A joint step against a dense one (`mode="dense"`: every candidate block through the same kernels): at the
    end of the forward and after backward, the seer step holds no more than its per-layer selection bits, rows and
    gate gradients beyond it (under checkpointing before this fix: each layer's ground truth and bool mask until
    backward, and after it the recomputed gate graphs, log-probabilities included)."""
    dense_forward, dense_after, _ = _step_memory("dense", checkpointing)
    seer_forward, seer_after, gate_bytes = _step_memory("joint", checkpointing)
    layers, heads, nb = 2, 4, math.ceil(LENGTH / BLOCK)
    nq = round(FRACTION * nb)
    bits = heads * nb * math.ceil(nb / 8)  # the selection kept for the recomputation
    # Per forward: the selection plan's forced blocks (bool [B, nB, nB]) and row quotas (int64 [B, nB]), scalars.
    plan = nb * nb + 8 * nb + 4096
    # Per layer: the selection bits, the ground truth's rows (int64), the gate's gradients, a few statistics.
    per_layer = bits + 8 * nq + 1024
    assert seer_after - dense_after <= layers * per_layer + plan, (seer_after, dense_after)
    # The gate weights' gradients (taken in the forward) wait for backward; the checkpointed seer layer holds no
    # [B, Hq, nB, nB] tensor at all, the other keeps the sparse kernel's bool block mask like the dense one.
    mask = 0 if checkpointing else heads * nb * nb
    assert seer_forward - dense_forward <= layers * (per_layer + gate_bytes + mask) + plan, (seer_forward, dense_forward)
    # What the bounds rule out: per layer the ground truth (float32 [B, Hq, nQ, nB]) alone.
    assert 4 * heads * nq * nb > per_layer + gate_bytes


@pytest.mark.parametrize("op", ["block_sparse_attention", "attention_with_ground_truth"])
@pytest.mark.parametrize("kernel", ["pytorch", "triton"])
def test_sparse_attention_keeps_its_tensors_where_checkpointing_reaches_them(op, kernel):
    """Every tensor the autograd functions need in backward goes through `save_for_backward`, which gradient
    checkpointing drops and recomputes: a tensor kept as a ctx attribute would live until the whole backward ends,
    in every layer at once."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g).to(device).requires_grad_() for h in (2, 1, 1))
    args = dict(block_size=16, kernel=kernel)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
        if op == "block_sparse_attention":
            mask = torch.ones(1, 2, 4, 4, dtype=torch.bool, device=device)
            out = seer_kernels.block_sparse_attention(q, k, v, mask, **args)
        else:
            out, _ = seer_kernels.attention_with_ground_truth(q, k, v, **args)
    node = out.grad_fn
    kept = {name: value for name, value in getattr(node, "__dict__", {}).items() if any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0])}
    assert not kept, f"{type(node).__name__} keeps {sorted(kept)} on ctx"


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_gate_gradients_taken_in_the_forward_are_autograds(monkeypatch, scale):
    """The gate loss's gradient taken in the layer's forward against autograd through the loss's graph kept until
    backward: the same bits when the incoming gradient is 1, within float32 rounding otherwise (the factor is
    applied last); the model's own gradients unchanged, with and without gradient checkpointing."""

    def gradients(graph_until_backward: bool, checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("llama", sharpen=2.0, max_position_embeddings=512).train()
        runtime = SeerRuntime(mode="joint", density=0.5, block_size=16, ground_truth_query_fraction=0.5, kernel="pytorch")
        torch.manual_seed(0)
        attach_seer_gates(model, runtime, gate_hidden_size=16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with monkeypatch.context() as m:
            if graph_until_backward:
                m.setattr(attention, "_gate_context", lambda own_graph, with_gradient: contextlib.nullcontext())
                m.setattr(attention, "loss_with_gradients", lambda loss, weights: loss)
            torch.manual_seed(1)  # the same ground-truth rows
            ids = random_ids(1, 320)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss + scale * sum(runtime.take_losses().values())).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    reference = gradients(True, False)
    assert any("seer_gate" in name for name in reference)
    for checkpointing in (False, True):
        got = gradients(False, checkpointing)
        assert got.keys() == reference.keys()
        for name, want in reference.items():
            if scale == 1.0 and not checkpointing:
                assert torch.equal(got[name], want), name
            else:
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-8, msg=name)
