"""The whole seer model path on the Triton kernels, on CPU through the Triton interpreter.

The CUDA twin of this test is `test_seer_gpu.py::test_triton_sparse_matches_reference_backend_values_and_gradients`;
here the same comparison (Triton backend against the PyTorch reference: logits, gate loss and every gradient,
with packed documents) runs at a size the interpreter can afford.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_helpers import packed_position_ids, random_ids, tiny_model

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU twin of a CUDA test: runs where the Triton interpreter is on"
)


def test_triton_backend_through_the_model_matches_the_reference():
    model = tiny_model("llama", sharpen=2.0)
    rt = SeerRuntime(block_size=32, mode="joint", density=0.5, kernel="triton", compute_loss=True)
    torch.manual_seed(0)
    attach_seer_gates(model, rt, gate_hidden_size=16)
    model.train()
    reference = copy.deepcopy(model)
    reference.get_submodule("model.layers.0.self_attn").seer_gate.runtime.kernel = "reference"
    ids = random_ids(1, 160)
    pos = packed_position_ids([70, 90])
    results = []
    for m in (model, reference):
        runtime = m.get_submodule("model.layers.0.self_attn").seer_gate.runtime
        out = m(input_ids=ids, labels=ids, position_ids=pos, use_cache=False)
        gate = torch.stack(list(runtime.take_losses().values())).sum()
        (out.loss + gate).backward()
        results.append((out.logits.detach(), float(gate.detach()), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (logits_t, gate_t, grads_t), (logits_r, gate_r, grads_r) = results
    assert model.get_submodule("model.layers.0.self_attn").seer_gate.runtime.kernel == "triton"
    torch.testing.assert_close(logits_t, logits_r, rtol=1e-4, atol=1e-4)
    assert gate_t == pytest.approx(gate_r, rel=1e-4, abs=1e-6)
    assert grads_t.keys() == grads_r.keys() and any(".seer_gate." in n for n in grads_t)
    for name in grads_t:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-3, atol=1e-5, msg=name)
