"""The whole seer model path on the Triton kernels (`kernel="triton"`) against SDPA and the PyTorch reference.

On CUDA at realistic block sizes; on CPU the same tests run through the Triton interpreter at sizes it affords.
The bf16 step needs a GPU (the interpreter computes bf16 dots wrongly).
"""

from __future__ import annotations

import copy

import pytest
import torch

from seer_finetune.seer import SeerRuntime, attach_seer_gates
from seer_helpers import packed_position_ids, random_ids, tiny_model

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (block sizes, sequence length of the SDPA check, lengths of the packed documents of the gradient check)
SIZES = dict(blocks=(64, 128), length=1000, docs=[700, 1348]) if CUDA else dict(blocks=(32,), length=200, docs=[70, 90])
MODEL_SIZES = dict(head_dim=64, max_position_embeddings=8192) if CUDA else {}


def _pair(arch: str, block: int, dtype=torch.float32, **runtime):
    model = tiny_model(arch, sharpen=2.0, **MODEL_SIZES).to(DEVICE, dtype)
    seer = copy.deepcopy(model)
    rt = SeerRuntime(block_size=block, kernel="triton", **runtime)
    torch.manual_seed(0)
    attach_seer_gates(seer, rt, gate_hidden_size=64 if CUDA else 16)
    return model, seer, rt


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("block", SIZES["blocks"])
def test_triton_density_one_matches_sdpa(arch, block):
    model, seer, rt = _pair(arch, block, mode="joint", density=1.0)
    n = SIZES["length"]
    ids = random_ids(2, n).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    mask[1, -90:] = 0
    pos = packed_position_ids([n * 3 // 10, n * 4 // 10, n - n * 7 // 10], batch=2).to(DEVICE)
    with torch.no_grad():
        for kwargs, rows in (({"attention_mask": mask}, mask.bool()), ({"position_ids": pos}, torch.ones_like(mask, dtype=torch.bool))):
            ref = model(input_ids=ids, use_cache=False, **kwargs).logits
            out = seer(input_ids=ids, use_cache=False, **kwargs).logits
            torch.testing.assert_close(out[rows], ref[rows], rtol=2e-3, atol=2e-3)
    assert rt.take_stats()  # the gates ran


def test_triton_sparse_matches_reference_backend_values_and_gradients():
    _, seer, rt = _pair("llama", SIZES["blocks"][0], mode="joint", density=0.5, compute_loss=True)
    seer.train()
    ref_model = copy.deepcopy(seer)
    ref_model.get_submodule("model.layers.0.self_attn").seer_gate.runtime.configure(kernel="pytorch")
    ids = random_ids(1, sum(SIZES["docs"])).to(DEVICE)
    pos = packed_position_ids(SIZES["docs"]).to(DEVICE)
    results = []
    for m in (seer, ref_model):
        runtime = m.get_submodule("model.layers.0.self_attn").seer_gate.runtime
        out = m(input_ids=ids, labels=ids, position_ids=pos, use_cache=False)
        gate = torch.stack(list(runtime.take_losses().values())).sum()
        (out.loss + gate).backward()
        results.append((out.logits.detach(), float(gate.detach()), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (lt, gt_, grads_t), (lr, gr, grads_r) = results
    assert ref_model.get_submodule("model.layers.0.self_attn").seer_gate.runtime.settings.kernel == "pytorch"
    assert grads_t.keys() == grads_r.keys() and any(".seer_gate." in n for n in grads_t)
    if CUDA:  # Triton's float32 dots run in tf32 on the GPU
        torch.testing.assert_close(lt, lr, rtol=2e-3, atol=2e-3)
        assert gt_ == pytest.approx(gr, rel=1e-3, abs=1e-5)
        for name in grads_t:
            scale = grads_r[name].abs().max().clamp_min(1e-6)
            assert (grads_t[name] - grads_r[name]).abs().max() / scale < 2e-2, name
    else:  # the interpreter computes in full float32
        torch.testing.assert_close(lt, lr, rtol=1e-4, atol=1e-4)
        assert gt_ == pytest.approx(gr, rel=1e-4, abs=1e-6)
        for name in grads_t:
            torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 Triton dots need a GPU: the interpreter computes them wrongly")
def test_bf16_joint_step_density_on_gpu():
    _, seer, rt = _pair("qwen3", 64, dtype=torch.bfloat16, mode="joint", density=0.1)
    seer.train()
    ids = random_ids(2, 4096).to(DEVICE)
    out = seer(input_ids=ids, labels=ids, use_cache=False)
    gate = torch.stack(list(rt.take_losses().values())).sum()
    (out.loss + gate).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(gate)
    densities = [v for k, v in rt.take_stats().items() if k.startswith("density/")]
    assert densities and all(abs(d - 0.1) <= 0.02 for d in densities)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in seer.named_parameters() if "seer_gate" in n)


def test_fused_selection_chooses_the_blocks_of_the_pytorch_selection():
    """With `kernel="triton"` the layer budget ranks through the fused kernel (`selection_ranking_keys`): every
    layer keeps the blocks the PyTorch ranking keeps, on packed documents, with probe picks and the row-mass tier
    (whose effect on the keys `tests/kernels/test_selection_kernel.py` checks; here the probe picks change the
    selection)."""
    select = dict(mode="joint", density=0.3, sink_blocks=1, budget="layer", row_mass=0.3, probe_blocks=2,
                  probe_tokens=4)
    _, seer, rt = _pair("llama", SIZES["blocks"][0], **select)
    reference = copy.deepcopy(seer)
    ref_rt = reference.get_submodule("model.layers.0.self_attn").seer_gate.runtime
    ref_rt.configure(kernel="pytorch")
    rt.record_block_masks = ref_rt.record_block_masks = True
    docs = [1300, 1400] if CUDA else [300, 400]  # long enough that the budget goes beyond the forced blocks
    ids = random_ids(1, sum(docs)).to(DEVICE)
    pos = packed_position_ids(docs).to(DEVICE)
    with torch.no_grad():
        out = seer(input_ids=ids, position_ids=pos, use_cache=False).logits
        ref = reference(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert rt.block_masks.keys() == ref_rt.block_masks.keys() and rt.block_masks
    for layer, mask in rt.block_masks.items():
        assert torch.equal(mask, ref_rt.block_masks[layer]), layer
        assert 0 < mask.sum() < mask.numel() / 2
    torch.testing.assert_close(out, ref, rtol=2e-3 if CUDA else 1e-4, atol=2e-3 if CUDA else 1e-4)
