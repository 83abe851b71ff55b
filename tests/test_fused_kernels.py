"""`model.fused_kernels`: which models get Liger-Kernel's RMSNorm, SwiGLU and RoPE, the errors where they cannot
run, that the patch stays on its model (Liger also rebinds names in transformers' modeling module), and (on CUDA)
that a patched model computes what the plain one does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from seer_finetune.assembly import build_model
from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError, PeftConfig
from seer_finetune.fused_kernels import apply_fused_kernels, choose_fused_kernels
from seer_finetune.modeling import apply_peft, base_model

from helpers import tiny_config


def _liger_modules(model: torch.nn.Module) -> list[str]:
    """The modules running Liger's code: Liger's types, or transformers' with a forward Liger bound on the
    instance (what patching a model instance does; the types stay transformers')."""
    def liger(obj) -> bool:
        return getattr(obj, "__module__", "").startswith("liger_kernel")

    return [name for name, m in model.named_modules() if liger(type(m)) or liger(m.__dict__.get("forward"))]


def test_auto_picks_liger_on_cuda_for_architectures_it_patches_and_nothing_elsewhere():
    assert choose_fused_kernels("auto", device_type="cuda", model_type="llama") == "liger"
    assert choose_fused_kernels("auto", device_type="cuda", model_type="qwen2") == "liger"
    assert choose_fused_kernels("auto", device_type="cuda", model_type="gpt2") == "none"
    assert choose_fused_kernels("auto", device_type="cpu", model_type="llama") == "none"
    assert choose_fused_kernels("liger", device_type="cuda", model_type="llama") == "liger"
    for device_type in ("cpu", "cuda"):
        assert choose_fused_kernels("none", device_type=device_type, model_type="llama") == "none"


def test_liger_where_it_cannot_run_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"model.fused_kernels=liger: its kernels need CUDA; use model.fused_kernels=none"):
        choose_fused_kernels("liger", device_type="cpu", model_type="llama")
    with pytest.raises(ConfigError, match=r"does not patch 'gpt2' models"):
        choose_fused_kernels("liger", device_type="cuda", model_type="gpt2")
    with pytest.raises(ConfigError, match=r"model.fused_kernels='fast'"):
        choose_fused_kernels("fast", device_type="cuda", model_type="llama")


def test_the_field_is_validated_when_composing():
    assert compose_config(["+exp=smoke"]).model.fused_kernels == "auto"
    with pytest.raises(ConfigError, match=r"model.fused_kernels='fast' is not one of auto, liger, none"):
        compose_config(["+exp=smoke", "model.fused_kernels=fast"])


def test_a_cpu_run_keeps_transformers_modules_and_refuses_liger():
    cpu = torch.device("cpu")
    model, _ = build_model(compose_config(["+exp=smoke"]), cpu)
    plain = base_model(model)
    assert plain.seer_fused_kernels == "none"
    assert _liger_modules(plain) == []
    with pytest.raises(ConfigError, match=r"model.fused_kernels=liger: its kernels need CUDA"):
        build_model(compose_config(["+exp=smoke", "model.fused_kernels=liger"]), cpu)


@pytest.fixture
def llama_modeling_restored():
    """transformers' Llama modeling module, its names restored after the test (Liger's patch rebinds some)."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield modeling_llama
    for name in set(vars(modeling_llama)) - set(saved):
        delattr(modeling_llama, name)
    for name, value in saved.items():
        setattr(modeling_llama, name, value)


def test_the_liger_patch_stays_on_its_model(llama_modeling_restored):
    """Liger's entry point also rebinds the modeling module's norm and MLP classes (every Llama built later
    would run Liger's Triton kernels, on CPU too, where they fail) and its RoPE function. After
    `apply_fused_kernels` (asked for CUDA; nothing runs here) the model runs Liger's norm and MLP forwards, a Llama
    built afterwards has transformers' own modules and, on CPU tensors, transformers' RoPE: its forward gives the
    logits of a Llama built before the patch."""
    modeling = llama_modeling_restored
    original_rope = modeling.apply_rotary_pos_emb
    torch.manual_seed(0)
    before = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    patched = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert apply_fused_kernels(patched, "liger", torch.device("cuda")) == "liger"
    layers = len(patched.model.layers)
    assert len(_liger_modules(patched)) == 3 * layers + 1  # each layer's two norms and MLP, and the final norm
    torch.manual_seed(0)
    later = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    assert _liger_modules(later) == []
    assert modeling.LlamaRMSNorm is type(later.model.norm) and modeling.LlamaMLP is type(later.model.layers[0].mlp)
    ids = torch.randint(2, 2000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(later(input_ids=ids).logits, before(input_ids=ids).logits)
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    for got, want in zip(modeling.apply_rotary_pos_emb(q, k, cos, sin), original_rope(q, k, cos, sin)):
        assert torch.equal(got, want)
    # A second patched model does not stack the dispatch.
    apply_fused_kernels(AutoModelForCausalLM.from_config(tiny_config("llama")), "liger", torch.device("cuda"))
    assert modeling.apply_rotary_pos_emb.seer_original is original_rope


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_liger_model_computes_the_plain_models_loss_and_gradients_on_cuda(model_type):
    """bf16, LoRA + trainable norms, 512 tokens: the patched model's loss and LoRA/norm gradients match the plain
    model's to bf16 rounding (both against a float32 reference, within twice the plain model's error). A failure
    names every parameter off, with both errors, and the three losses."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    config = tiny_config(model_type, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(cuda)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    fused = copy.deepcopy(plain)
    peft = PeftConfig(trainable_norms=True)
    ids = torch.randint(2, config.vocab_size, (2, 512), device=cuda)
    results = {}
    # Liger patches RoPE for the whole modeling module, so the unpatched copies run first.
    for name, model in (("reference", reference), ("plain", plain), ("fused", fused)):
        if name == "fused":
            assert apply_fused_kernels(fused, "liger", cuda) == "liger"
            assert _liger_modules(fused), "no module runs Liger's code"
        torch.manual_seed(1)  # the same LoRA initialisation in every copy
        results[name] = _loss_and_grads(apply_peft(model, peft).train(), ids)
    ref_loss, ref_grads = results["reference"]
    plain_loss, plain_grads = results["plain"]
    fused_loss, fused_grads = results["fused"]
    losses = f"losses: reference {ref_loss:.6f}, plain {plain_loss:.6f}, fused {fused_loss:.6f}"
    assert abs(fused_loss - ref_loss) <= 2 * abs(plain_loss - ref_loss) + 1e-3, losses
    assert fused_grads.keys() == ref_grads.keys() and fused_grads, (
        f"parameters with a gradient: fused only {sorted(fused_grads.keys() - ref_grads.keys())}, reference only "
        f"{sorted(ref_grads.keys() - fused_grads.keys())}"
    )
    off = []
    for name, grad in ref_grads.items():
        plain_err = (plain_grads[name] - grad).abs().max().item()
        fused_err = (fused_grads[name] - grad).abs().max().item()
        scale = grad.abs().max().item()
        if fused_err > 2 * plain_err + 1e-3 * scale:
            off.append(f"{name}: fused error {fused_err:.3e}, plain error {plain_err:.3e}, max |grad| {scale:.3e}")
    assert not off, f"{len(off)} of {len(ref_grads)} gradients off ({losses}):\n" + "\n".join(off)
