"""LoRA layers that keep their input in the model's dtype for backward (`seer_finetune/lora_inputs.py`).

Against peft's own path on the same bfloat16 model: the same loss and the same gradient for every trainable
tensor, no float32 copy of an adapted layer's input among the tensors saved for backward, and the layers that
must keep peft's path (dropout, ZeRO-3, the option off) keep it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_config
from seer_finetune.config import PeftConfig
from seer_finetune.lora_inputs import (
    CastInputLinear,
    _CastLinearFunction,
    save_lora_inputs_in_model_dtype,
)
from seer_finetune.modeling import apply_peft

SEQ = 48


def _model(peft: PeftConfig, lower_memory: bool, model_type: str = "llama"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.bfloat16)
    model = apply_peft(model, peft)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters a gradient path through A
            torch.nn.init.normal_(p, std=0.02)
    if lower_memory:
        save_lora_inputs_in_model_dtype(model)
    return model.train()


def _run(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes of the distinct storages saved for backward, on one forward/backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(storages.values())


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("peft", [PeftConfig(), PeftConfig(trainable_embeddings=True, trainable_norms=True)],
                         ids=["lora", "longlora"])
def test_same_loss_and_gradients_without_float32_input_copies(model_type, peft):
    ids = torch.randint(2, 2048, (2, SEQ))
    stock_loss, stock_grads, stock_bytes = _run(_model(peft, False, model_type), ids)
    ours_loss, ours_grads, ours_bytes = _run(_model(peft, True, model_type), ids)

    torch.testing.assert_close(ours_loss, stock_loss, rtol=0, atol=0)
    assert ours_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Per decoder layer peft saves four float32 copies (q, k, v of the normed hidden states, o of the attention
    # output); the new path saves at most the two bfloat16 inputs themselves, q, k and v sharing one (the
    # attention output may be saved by attention already).
    tokens, width, layers = 2 * SEQ, 64, 2
    assert stock_bytes - ours_bytes >= layers * tokens * width * (4 * 4 - 2 * 2)


def test_layers_with_dropout_keep_pefts_path():
    model = _model(PeftConfig(dropout=0.1), True)
    assert not any(isinstance(m, CastInputLinear) for m in model.modules())
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())


def test_option_and_zero3_choose_the_path():
    from seer_finetune.compose import compose_config
    from seer_finetune.assembly import build_model

    def count(overrides):
        cfg = compose_config(["+exp=smoke", "model.dtype=bfloat16", *overrides])
        model, _ = build_model(cfg, torch.device("cpu"))
        return sum(isinstance(m, CastInputLinear) for m in model.modules())

    assert count([]) > 0
    assert count(["peft.fp32_input_copies=true"]) == 0
    assert count(["deepspeed.enabled=true", "deepspeed.zero_stage=3"]) == 0
    assert count(["deepspeed.enabled=true", "deepspeed.zero_stage=2"]) > 0


def test_weight_gradient_chunks_match_one_product(monkeypatch):
    import seer_finetune.lora_inputs as lora_inputs

    torch.manual_seed(0)
    x = torch.randn(3, 37, 24, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(8, 24, requires_grad=True)
    grad_out = torch.randn(3, 37, 8)
    expected = torch.autograd.grad(torch.nn.functional.linear(x.float(), weight), (x, weight), grad_out)
    monkeypatch.setattr(lora_inputs, "_BACKWARD_CHUNK_ELEMENTS", 16 * 24)  # 111 rows: seven chunks, the last short
    got = torch.autograd.grad(_CastLinearFunction.apply(x, weight), (x, weight), grad_out)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_adapter_state_dict_keys_unchanged():
    stock = _model(PeftConfig(), False).state_dict().keys()
    ours = _model(PeftConfig(), True).state_dict().keys()
    assert list(ours) == list(stock)
