"""LoRA without peft's float32 copy of every adapted layer's input.

peft keeps LoRA weights in float32 over a bfloat16 model and casts each LoRA layer's input to float32 before
its `lora_A` projection. That projection saves the float32 copy for backward, although the base layer already
saves the same input in the model's dtype. At 128k tokens on Qwen2.5-1.5B that is four copies of
`[131072, 1536]` float32 (3 GiB) held by the layer being recomputed, in dense and sparse runs alike.

`save_lora_inputs_in_model_dtype` turns peft's cast off in the LoRA layers and gives their `lora_A` a projection
that casts in forward, saves the input as it came, and casts again in backward. The values and gradients are
those of peft's own path (the same casts and products); only the memory differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Input elements per product when the weight gradient is accumulated over a long input: bounds the float32
# copy made in backward to 128 MiB (SmolLM2 at 32k: one product; Qwen2.5-1.5B at 128k: six).
_BACKWARD_CHUNK_ELEMENTS = 2**25


class _CastLinearFunction(torch.autograd.Function):
    """`F.linear(x.to(weight.dtype), weight)` that saves `x` in its own dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # peft's path: the product in the weight's dtype, then the cast's backward back to x's dtype.
            grad_x = (grad_out @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows_out = grad_out.reshape(-1, grad_out.shape[-1])  # [N, r]
            rows_in = x.reshape(-1, x.shape[-1])  # [N, in]
            chunk = max(1, _BACKWARD_CHUNK_ELEMENTS // rows_in.shape[1])
            if rows_in.shape[0] <= chunk:
                grad_weight = rows_out.t() @ rows_in.to(weight.dtype)
            else:
                grad_weight = torch.zeros_like(weight)
                for start in range(0, rows_in.shape[0], chunk):
                    stop = start + chunk
                    grad_weight.addmm_(rows_out[start:stop].t(), rows_in[start:stop].to(weight.dtype))
        return grad_x, grad_weight


class CastInputLinear(nn.Linear):
    """A bias-free `nn.Linear` that accepts an input of another dtype and saves it uncast for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x.to(self.weight.dtype), self.weight)
        return _CastLinearFunction.apply(x, self.weight)


def save_lora_inputs_in_model_dtype(model: nn.Module) -> int:
    """Give every plain LoRA linear layer of a peft model a `lora_A` that saves its input uncast.

    Layers left as peft made them: those with LoRA dropout (it would act on the uncast input), a `lora_A` with
    a bias or of another kind, or a LoRA variant (DoRA and the like run their own forward).

    Args:
        model: a peft model (or any module holding peft LoRA layers).

    Returns:
        The number of layers changed.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLinear) or getattr(layer, "lora_variant", None):
            continue
        plain = all(
            type(layer.lora_A[name]) in (nn.Linear, CastInputLinear)
            and layer.lora_A[name].bias is None
            and isinstance(layer.lora_dropout[name], nn.Identity)
            for name in layer.lora_A
        )
        if not plain:
            continue
        for name, linear in list(layer.lora_A.items()):
            if isinstance(linear, CastInputLinear):
                continue
            replacement = CastInputLinear(linear.in_features, linear.out_features, bias=False, device="meta")
            replacement.weight = linear.weight
            replacement.train(linear.training)
            layer.lora_A[name] = replacement
        layer.cast_input_dtype_enabled = False
        changed += 1
    return changed
