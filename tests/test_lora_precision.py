"""Where LoRA products run (`seer_finetune/lora_precision.py`, `peft.lora_compute`).

`model_dtype`: a LoRA layer gives peft's gradients under bfloat16 autocast bit for bit and its output within one
bfloat16 rounding (the sum is rounded once, in place in one product), and makes no float32 activation; a whole
model trains close to peft's float32 products. `float32`: the same loss and gradients
as peft's path with no float32 copy of an adapted layer's input saved. The configuration picks the mode; ZeRO-3
and the layers each mode cannot take keep peft's path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from helpers import tiny_config
from seer_finetune.config import ConfigError, PeftConfig
from seer_finetune.lora_precision import (
    CastInputLinear,
    ModelDtypeLinear,
    _CastLinearFunction,
    set_lora_compute,
)
from seer_finetune.modeling import apply_peft

SEQ = 48


def _model(peft: PeftConfig, mode: str, model_type: str = "llama"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.bfloat16)
    model = apply_peft(model, peft)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters a gradient path through A
            torch.nn.init.normal_(p, std=0.02)
    set_lora_compute(model, mode)
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


def _across_models(test):
    """Parametrise `test` over llama and qwen2, LoRA alone and with trainable embeddings and norms (LongLoRA)."""
    pefts = [PeftConfig(), PeftConfig(trainable_embeddings=True, trainable_norms=True)]
    test = pytest.mark.parametrize("peft", pefts, ids=["lora", "longlora"])(test)
    return pytest.mark.parametrize("model_type", ["llama", "qwen2"])(test)


class _Float32Outputs(TorchDispatchMode):
    """Records the shape of every float32 tensor an op returns with at least `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _lora_layer(mode: str):
    """The q_proj LoRA layer of a tiny bfloat16 llama (width 64, rank 8), set to `mode`."""
    model = _model(PeftConfig(), "peft")
    layer = copy.deepcopy(model.base_model.model.model.layers[0].self_attn.q_proj)
    set_lora_compute(layer, mode)
    return layer


def _layer_step(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    weights = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return out, x.grad, [w.grad for w in weights]


def test_model_dtype_layer_is_pefts_layer_under_bfloat16_autocast():
    """The gradients are peft's under autocast bit for bit (the scaling, 2 here, is exact in either place). The
    output sums base and adapter in one rounding instead of two: within a bfloat16 rounding of the float32 sum of
    the same pieces, and nearer it than peft's output overall."""
    torch.manual_seed(2)
    x = torch.randn(3, 37, 64, dtype=torch.bfloat16)
    grad_out = torch.randn(3, 37, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _layer_step(_lora_layer("peft"), x, grad_out)
    layer = _lora_layer("model_dtype")
    got = _layer_step(layer, x, grad_out)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[2])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The float32 sum of the same bfloat16 pieces: the base output and the adapter's product.
    with torch.no_grad():
        h = layer.lora_A["default"](x)
        exact = layer.base_layer(x).float() + 2 * (h.float() @ layer.lora_B["default"].weight.bfloat16().float().t())
    ours, pefts = (got[0].float() - exact).abs(), (want[0].float() - exact).abs()
    assert ours.max() <= exact.abs().max() * 2**-8 and ours.sum() <= pefts.sum()


@pytest.mark.parametrize("mode,float32_activations", [("model_dtype", False), ("float32", True), ("peft", True)])
def test_model_dtype_makes_no_float32_activation(mode, float32_activations):
    tokens, rank = 3 * 37, 8
    torch.manual_seed(3)
    x = torch.randn(3, 37, 64, dtype=torch.bfloat16)
    layer = _lora_layer(mode)
    # Activations are [tokens, rank] or larger; the weights and their gradients ([8, 64], [64, 8]) are smaller.
    with _Float32Outputs(tokens * rank) as seen:
        _layer_step(layer, x, torch.randn_like(x))
    assert bool(seen.seen) == float32_activations, seen.seen


@_across_models
def test_model_dtype_trains_close_to_float32_products(model_type, peft):
    ids = torch.randint(2, 2048, (2, SEQ))
    ref_loss, ref_grads, _ = _run(_model(peft, "peft", model_type), ids)
    loss, grads, _ = _run(_model(peft, "model_dtype", model_type), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert grads[name].dtype == ref.dtype, name
        if "lora_" in name:
            # bfloat16 products: a relative error of a few 2**-8 over the whole tensor.
            err = (grads[name].float() - ref.float()).norm() / ref.float().norm()
            assert err < 3e-2, (name, err)


@_across_models
def test_float32_same_loss_and_gradients_without_float32_input_copies(model_type, peft):
    ids = torch.randint(2, 2048, (2, SEQ))
    stock_loss, stock_grads, stock_bytes = _run(_model(peft, "peft", model_type), ids)
    ours_loss, ours_grads, ours_bytes = _run(_model(peft, "float32", model_type), ids)

    torch.testing.assert_close(ours_loss, stock_loss, rtol=0, atol=0)
    assert ours_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Per decoder layer peft saves four float32 copies (q, k, v of the normed hidden states, o of the attention
    # output); the new path saves at most the two bfloat16 inputs themselves, q, k and v sharing one (the
    # attention output may be saved by attention already).
    tokens, width, layers = 2 * SEQ, 64, 2
    assert stock_bytes - ours_bytes >= layers * tokens * width * (4 * 4 - 2 * 2)


def test_float32_leaves_layers_with_dropout_as_peft_made_them():
    model = _model(PeftConfig(dropout=0.1), "float32")
    assert not any(isinstance(m, CastInputLinear) for m in model.modules())
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())
    # In the model's dtype, dropout acts on the bfloat16 input as autocast's products would see it.
    assert set_lora_compute(model, "model_dtype") > 0


def test_model_dtype_adds_the_adapter_inside_its_second_product():
    """No elementwise pass over the layer's output: the scaling and the sum run in the adapter's second product.
    Merging adds peft's own delta weight, so the merged layer gives what the adapter gives (bfloat16 weights)."""
    layer = _lora_layer("model_dtype")
    x = torch.randn(3, 37, 64, dtype=torch.bfloat16)
    seen = []

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == x.numel():
                seen.append(func.__name__.split(".")[0])
            return out

    with torch.no_grad(), _Ops():
        out = layer(x)
    assert "addmm_" in seen and not {"add", "mul", "copy_"} & set(seen), seen
    with torch.no_grad():
        layer.merge()
        merged = layer.base_layer(x)
        layer.unmerge()
    torch.testing.assert_close(merged, out, rtol=2e-2, atol=2e-2)
    assert layer.lora_variant and set_lora_compute(layer, "peft") == 1 and not layer.lora_variant


def test_modes_switch_back_and_keep_the_state_dict():
    model = _model(PeftConfig(), "model_dtype")
    keys = list(model.state_dict())
    assert sum(isinstance(m, ModelDtypeLinear) for m in model.modules()) == 2 * 2 * 4  # A and B, 2 layers x 4
    set_lora_compute(model, "float32")
    assert not any(isinstance(m, ModelDtypeLinear) for m in model.modules())
    assert sum(isinstance(m, CastInputLinear) for m in model.modules()) == 2 * 4
    set_lora_compute(model, "peft")
    assert not any(isinstance(m, (CastInputLinear, ModelDtypeLinear)) for m in model.modules())
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="lora_compute='bf16' must be one of model_dtype, float32, peft"):
        set_lora_compute(model, "bf16")


def test_configuration_chooses_the_mode():
    from seer_finetune.assembly import build_model
    from seer_finetune.compose import compose_config

    def count(overrides, cls):
        cfg = compose_config(["+exp=smoke", "model.dtype=bfloat16", *overrides])
        model, _ = build_model(cfg, torch.device("cpu"))
        return sum(isinstance(m, cls) for m in model.modules())

    assert count([], ModelDtypeLinear) > 0
    assert count(["peft.lora_compute=float32"], CastInputLinear) > 0
    assert count(["peft.lora_compute=peft"], (CastInputLinear, ModelDtypeLinear)) == 0
    zero = ["deepspeed.enabled=true", "deepspeed.zero_stage"]
    assert count([*zero[:1], f"{zero[1]}=3"], (CastInputLinear, ModelDtypeLinear)) == 0
    assert count([*zero[:1], f"{zero[1]}=2"], ModelDtypeLinear) > 0
    with pytest.raises(ConfigError, match="peft.lora_compute='bf16' is not one of model_dtype, float32, peft"):
        compose_config(["+exp=smoke", "peft.lora_compute=bf16"])


def test_weight_gradient_chunks_match_one_product(monkeypatch):
    import seer_finetune.lora_precision as lora_precision

    torch.manual_seed(0)
    x = torch.randn(3, 37, 24, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(8, 24, requires_grad=True)
    grad_out = torch.randn(3, 37, 8)
    expected = torch.autograd.grad(torch.nn.functional.linear(x.float(), weight), (x, weight), grad_out)
    monkeypatch.setattr(lora_precision, "_BACKWARD_CHUNK_ELEMENTS", 16 * 24)  # 111 rows: seven chunks, the last short
    got = torch.autograd.grad(_CastLinearFunction.apply(x, weight), (x, weight), grad_out)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
