"""Where a LoRA layer's two products run, and what they keep for backward (`peft.lora_compute`).

Over a bfloat16 model peft keeps the adapters' weights in float32 and casts each LoRA layer's input to float32:
both products, the scaling and the sum with the base layer's output then run in float32, and `lora_A` saves
the float32 copy of its input for backward. At 32k tokens on SmolLM2-135M that float32 traffic (casts, products
without tensor cores, float32 sums and casts back) is a sizeable share of the step's work outside attention, in
dense and sparse runs alike; at 128k on Qwen2.5-1.5B the saved copies take 3 GiB. The modes:

- `model_dtype` (default): both products in the model's dtype, from the float32 weights cast on the way
  (`r x width` elements, negligible), as bfloat16 autocast runs peft's layer under Hugging Face Trainer (axolotl,
  LLaMA-Factory). The weights, their gradients and the optimizer state stay float32; no float32 activation is
  made. The scaling goes into `lora_B`'s cast weight and the sum with the base layer's output into the second
  product, in place (`ScaledSumVariant`): peft would run a multiply and an add over the layer's
  whole output, forward and again in a checkpoint's recomputation. The sum is then rounded once instead of
  twice: within a bfloat16 rounding of peft's autocast values, not equal to them.
- `float32`: peft's float32 products and gradients, but `lora_A` saves its input in the model's dtype and casts
  it again in backward.
- `peft`: peft's layer as it is.
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


class ModelDtypeLinear(nn.Linear):
    """A bias-free `nn.Linear` whose product runs in its input's dtype: `F.linear(x, weight.to(x.dtype))`.

    The weight's gradient is taken in that dtype and cast back to the weight's, as under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class _AddProductInPlace(torch.autograd.Function):
    """`out += h @ weight` in place, as one product: `out` `[..., n]` contiguous, `h` `[..., r]`, `weight`
    `[r, n]`. The base layer's output is `out`; its backward does not need it, so the product reads it and writes
    the sum over it (an out-of-place addmm would copy it first)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # [N, n]
        grad_h = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_h = (rows @ weight.t()).view(h.shape)
        if ctx.needs_input_grad[2]:
            # As nn.Linear's weight gradient (grad^T @ input), transposed: one product over every token.
            grad_weight = (rows.t() @ h.reshape(-1, h.shape[-1])).t()
        return grad, grad_h, grad_weight


class ScaledSumVariant:
    """A peft LoRA variant (`lora_variant[adapter]`) that adds the adapter to the base output in one product:
    `result + scaling * lora_B(lora_A(dropout(x)))` as `result += h @ (scaling * B).T` (`_AddProductInPlace`),
    in `result`'s dtype. A forward hook on the base layer itself would see the sum; hooks on the LoRA layer (the
    gates' capture hooks) see what they always saw.

    Vanilla LoRA otherwise: merging and unmerging add and remove peft's own delta weight. peft consults a
    layer's variants in its forward and merges; the variant is not saved (adapters save as plain LoRA)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        """Nothing to initialise: the adapter's weights are vanilla LoRA's."""

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def supports_lora_conversion() -> bool:
        return True

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        h = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x)).to(result.dtype)  # [..., r]
        weight = (module.lora_B[active_adapter].weight * module.scaling[active_adapter]).to(result.dtype).t()
        if not result.is_contiguous() or (result.is_leaf and result.requires_grad):
            return result + h @ weight
        return _AddProductInPlace.apply(result, h, weight)


_SUM = ScaledSumVariant()

# Per mode, the class of `lora_A` and of `lora_B`, and whether peft casts the input to the weights' dtype.
_LAYOUT = {
    "model_dtype": (ModelDtypeLinear, ModelDtypeLinear, False),
    "float32": (CastInputLinear, nn.Linear, False),
    "peft": (nn.Linear, nn.Linear, True),
}
_OURS = (nn.Linear, CastInputLinear, ModelDtypeLinear)


def _as(linear: nn.Linear, cls: type) -> nn.Linear:
    """`linear` as a `cls` sharing its weight (itself when it already is one)."""
    if type(linear) is cls:
        return linear
    replacement = cls(linear.in_features, linear.out_features, bias=False, device="meta")
    replacement.weight = linear.weight
    replacement.train(linear.training)
    return replacement


def set_lora_compute(model: nn.Module, mode: str) -> int:
    """Make every plain LoRA linear layer of a peft model run its products as `mode` says (see the module).

    Layers left as peft made them: LoRA variants (DoRA and the like run their own forward), adapters with a
    bias or of another kind, and, for `float32`, layers with LoRA dropout (it would act on the uncast input).
    The parameters, their names and the state dict do not change; calling again with another mode switches.

    Args:
        model: a peft model (or any module holding peft LoRA layers).
        mode: `model_dtype`, `float32` or `peft`.

    Returns:
        The number of layers set to `mode`.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    if mode not in _LAYOUT:
        raise ValueError(f"lora_compute={mode!r} must be one of {', '.join(_LAYOUT)}")
    a_cls, b_cls, cast_input = _LAYOUT[mode]
    changed = 0
    for layer in model.modules():
        variants = getattr(layer, "lora_variant", {})
        if not isinstance(layer, LoraLinear) or any(v is not _SUM for v in variants.values()):
            continue
        plain = all(
            type(layer.lora_A[name]) in _OURS and layer.lora_A[name].bias is None
            and type(layer.lora_B[name]) in _OURS and layer.lora_B[name].bias is None
            and (mode != "float32" or isinstance(layer.lora_dropout[name], nn.Identity))
            for name in layer.lora_A
        )
        if not plain:
            continue
        for name in list(layer.lora_A):
            layer.lora_A[name] = _as(layer.lora_A[name], a_cls)
            layer.lora_B[name] = _as(layer.lora_B[name], b_cls)
            if mode == "model_dtype":
                layer.lora_variant[name] = _SUM
            else:
                layer.lora_variant.pop(name, None)
        layer.cast_input_dtype_enabled = cast_input
        changed += 1
    return changed
