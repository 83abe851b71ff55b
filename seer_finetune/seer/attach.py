"""Attaching gates to a loaded transformers model: one `AttnGate` per attention module, fed by forward hooks.

Nothing of the model's code is copied or patched. Forward hooks on each attention module's `q_proj`/`k_proj` (or
`q_norm`/`k_norm` where the architecture normalises per head, e.g. Qwen3) hand the gate the pre-RoPE queries and
keys. A forward pre-hook on the attention module re-attaches them if the projections were replaced after
attaching (e.g. wrapped by LoRA), so the gate always sees what the attention sees. A forward pre-hook on the
base model starts each forward's shared state (`SeerRuntime.begin_forward`). The model then runs
`attn_implementation="seer"` (`attention.register_seer`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import ATTN_NAME, register_seer
from .gate import POOLINGS, AttnGate, check_gate_query
from .gate_rope import gate_rotary_dim, gate_rotary_embedding
from .runtime import SeerRuntime


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder: those with q_proj, k_proj, v_proj, a layer index and head_dim."""
    found = []
    for module in model.modules():
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "layer_idx", "head_dim")):
            found.append(module)
    return found


def rotary_module(model: nn.Module) -> Optional[nn.Module]:
    """The model's rotary embedding module (the one holding `inv_freq`), or None."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            return module
    return None


def _capture_sources(attn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are the pre-RoPE q and k (per-head norms when the architecture has them)."""
    q_src = attn.q_norm if isinstance(getattr(attn, "q_norm", None), nn.Module) else attn.q_proj
    k_src = attn.k_norm if isinstance(getattr(attn, "k_norm", None), nn.Module) else attn.k_proj
    return q_src, k_src


def _install_capture_hooks(attn: nn.Module) -> None:
    """(Re-)register the q/k capture hooks on the attention module's current projection modules."""
    gate: AttnGate = attn.seer_gate
    q_src, k_src = _capture_sources(attn)
    if gate.seer_hook_targets == (id(q_src), id(k_src)):
        return
    for handle in gate.seer_hook_handles:
        handle.remove()
    head_dim = attn.head_dim

    def capture(name):
        def hook(_module, _inputs, output):
            x = output.detach() if gate.runtime.settings.detach_gate_inputs else output
            # A copy, not a view: a fused RoPE may rotate the projection's output in place before attention runs
            # (Liger's does, on CUDA), and the gate must see the values before RoPE. The copy lives until the
            # layer's gate has pooled it.
            # [B, L, H * D] (projection) or [B, L, H, D] (per-head norm) -> [B, L, H, D]
            gate.seer_captured[name] = x.reshape(x.shape[0], x.shape[1], -1, head_dim).clone()

        return hook

    gate.seer_hook_handles = [q_src.register_forward_hook(capture("q")), k_src.register_forward_hook(capture("k"))]
    gate.seer_hook_targets = (id(q_src), id(k_src))


def _check_model_config(config) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(
            f"seer attention needs full-attention layers only; this model has {sorted(set(layer_types))}"
        )
    if not layer_types and getattr(config, "sliding_window", None) is not None:
        raise NotImplementedError(
            f"seer attention does not support sliding-window attention (config.sliding_window={config.sliding_window})"
        )
    if getattr(config, "attention_dropout", 0.0):
        raise NotImplementedError("seer attention has no attention dropout: set config.attention_dropout=0")


def attach_seer_gates(
    model: nn.Module,
    runtime: SeerRuntime,
    *,
    gate_hidden_size: int = 128,
    q_pooling: tuple[str, ...] = ("avg",),
    k_pooling: tuple[str, ...] = ("max", "min"),
    use_rope: bool = True,
    rope_units: str = "tokens",
    rope_fraction: float = 1.0,
    gate_query: str = "pooled",
    weight_init: str = "uniform",
) -> list[AttnGate]:
    """Give every attention module of a loaded causal LM a gate and switch it to the `seer` attention.

    Args:
        model: A transformers causal LM (Llama, Mistral without sliding window, Qwen2, Qwen3, ...), optionally
            wrapped by peft.
        runtime: Shared settings and state (mode, block size, density, ...); kept as `gate.runtime` on every gate.
        gate_hidden_size: Per-head gate width. Default 128.
        q_pooling, k_pooling: Block poolings. Defaults avg / max+min.
        use_rope: Apply the model's rotary embedding at block positions inside the gate. Default True.
        rope_units: `tokens` (the model's rotary settings as they are), `blocks` (lengths divided by the block
            size, see `gate_rope.gate_rotary_embedding`) or `none` (no positional encoding, as `use_rope=False`).
            Default `tokens`.
        rope_fraction: Share of the gate's per-head features that carry RoPE, in (0, 1] (`gate_rope.gate_rotary_dim`
            rounds it to an even count); the rest score pooled content alone. Must be 1.0 without RoPE. Default
            1.0 (every feature).
        gate_query: How the gates score query blocks: `pooled`, `token_logit_max` or `token_prob_max`
            (`gate.block_scores`); the token modes need `q_pooling` at its default. Default `pooled`.
        weight_init: `uniform` (nn.Linear's) or `logit_bound` (`AttnGate.init_logit_bound`: the gate starts as
            the sign-aware bound on each block's logits). Default `uniform`.

    Returns:
        The gates in layer order (they are also `module.seer_gate` of each attention module).
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = base.config
    _check_model_config(config)
    attns = attention_modules(base)
    if not attns:
        raise ValueError(f"{type(base).__name__} has no attention modules with q_proj/k_proj/v_proj to attach gates to")
    for name, pools in (("q_pooling", q_pooling), ("k_pooling", k_pooling)):
        if not pools or any(p not in POOLINGS for p in pools):
            raise ValueError(f"{name}={list(pools)} must name one or more of {', '.join(POOLINGS)}")
    check_gate_query(gate_query, q_pooling)
    if weight_init not in ("uniform", "logit_bound"):
        raise ValueError(f"weight_init={weight_init!r} must be uniform or logit_bound")
    register_seer()
    use_rope = use_rope and rope_units != "none"
    rope_units = rope_units if use_rope else "none"
    if not use_rope and rope_fraction != 1.0:
        raise ValueError(f"rope_fraction={rope_fraction} needs RoPE in the gate, but its rope units are 'none'")
    # Checked before any gate is built, so a bad fraction or a too narrow gate fails with nothing attached.
    rotary_dim = gate_rotary_dim(gate_hidden_size, rope_fraction) if use_rope else 0
    rotary = rotary_module(base) if use_rope else None
    if use_rope and rotary is None:
        raise ValueError(f"{type(base).__name__} has no rotary_emb module to build the gate's block RoPE from")
    block_size = runtime.settings.block_size
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    gates = []
    # One gate rotary per device, shared by its layers' gates: it holds no parameters, and its block angles are
    # then computed and kept once for all of them (`AttnGate._block_rotary`).
    gate_rotaries: dict[torch.device, nn.Module] = {}
    for attn in attns:
        device = attn.q_proj.weight.device if hasattr(attn.q_proj, "weight") else next(attn.parameters()).device
        if rotary is not None and device not in gate_rotaries:
            gate_rotaries[device] = gate_rotary_embedding(
                config, rotary, rotary_dim, block_size=block_size, units=rope_units
            ).to(device)
        gate = AttnGate(
            num_heads,
            num_kv_heads,
            attn.head_dim,
            block_size=block_size,
            hidden_size=gate_hidden_size,
            q_pooling=q_pooling,
            k_pooling=k_pooling,
            rotary=gate_rotaries.get(device),
            layer_idx=int(attn.layer_idx),
            gate_query=gate_query,
        ).to(device)
        if weight_init == "logit_bound":
            gate.init_logit_bound(rotary_dim)
        # Saved in seer_gates.json: the rotary holds no parameters, so only these say how it was built.
        gate.rope_units, gate.rope_fraction = rope_units, float(rope_fraction)
        # Plain attributes (not parameters/buffers): runtime state that is neither trained nor saved.
        gate.runtime = runtime
        gate.seer_captured = {}
        gate.seer_hook_handles = []
        gate.seer_hook_targets = None
        if hasattr(attn, "seer_gate"):
            for handle in attn.seer_gate.seer_hook_handles:
                handle.remove()
            attn.seer_gate_prehook.remove()
        attn.seer_gate = gate
        _install_capture_hooks(attn)
        attn.seer_gate_prehook = attn.register_forward_pre_hook(lambda m, _args: _install_capture_hooks(m))
        gates.append(gate)
    # The gates are saved as their own adapter (`saving.save_gates`); keep them out of the model's own
    # save_pretrained so a saved model folder stays loadable as a plain transformers model.
    gate_keys = {name for name, _ in base.named_parameters() if ".seer_gate." in name}
    base._keys_to_ignore_on_save = set(getattr(base, "_keys_to_ignore_on_save", None) or ()) | gate_keys
    if getattr(base, "seer_forward_prehook", None) is not None:
        base.seer_forward_prehook.remove()
    # The hook finds the runtime through the module (not a closure), so a deep copy of the model starts the
    # forwards of its own copied runtime.
    base.seer_runtime = runtime
    base.seer_forward_prehook = base.register_forward_pre_hook(_begin_forward)
    base.set_attn_implementation(ATTN_NAME)
    return gates


def _begin_forward(module: nn.Module, _args) -> None:
    module.seer_runtime.begin_forward()


def seer_gates(model: nn.Module) -> list[AttnGate]:
    """The gates attached to `model`, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, AttnGate)), key=lambda g: g.layer_idx)
