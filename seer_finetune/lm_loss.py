"""The next-token loss of a causal LM, with or without its full logits.

transformers' own loss projects every position onto the vocabulary and upcasts the result to float32: one
131072-token sequence over a 151936-token vocabulary is 77 GB of float32 logits before a single gradient. The
fused losses never hold more than a slice of them:

- `liger`: Liger-Kernel's fused linear cross entropy (Triton; chunks of rows, the gradients of the hidden states
  and of the head computed in the same pass). It needs the head as a plain weight (an `nn.Linear`, or peft's
  trainable copy of one), the weight whole on this process (not ZeRO-3), and CUDA (on the CPU it runs only under
  the Triton interpreter, which the tests use).
- `chunked`: PyTorch alone, any device, any head module (LoRA on the head, ZeRO-3's gathered weights): the head
  and the cross entropy run on chunks of rows under activation checkpointing, so one chunk's logits exist at a
  time, in the forward and again in the backward.
- the capturable loss of `trainer.cuda_graphs` (`capturable=True`): with a plain linear head it computes each
  chunk's gradients in the forward, as Liger does, but reads nothing back from the device (Liger reads the target
  count and compares the incoming gradient on the host), so one CUDA graph holds it; `chunked_loss_sum` with
  every row otherwise.

Both take the hidden states from the model's own forward (`output_hidden_states`, with `logits_to_keep=1` so the
model projects one position only): transformers' modeling code, peft and DeepSpeed run exactly as for the
full-logits loss. `trainer.lm_loss=auto` keeps transformers' loss while a micro-batch's logits are small
(`FUSED_ABOVE_LOGITS`) and picks a fused one above: Liger on CUDA where it applies, else the chunked one.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import seer_kernels

from .config import ConfigError

IGNORE_INDEX = -100
# Above this many logits per forward (1 GiB in float32) `auto` avoids materialising them.
FUSED_ABOVE_LOGITS = 2**28
# The chunked loss's slice: rows per chunk = this many logits / vocabulary size (1 GiB in float32).
CHUNK_LOGITS = 2**28


def liger_installed() -> bool:
    """Whether Liger-Kernel can be imported (checked without importing it)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_lm_loss(
    setting: str,
    *,
    device_type: str,
    logits: int,
    liger_usable: bool,
    softcapped: bool = False,
) -> str:
    """The loss a forward runs: `setting` itself, or for `auto` the one that fits this forward.

    Args:
        setting: `trainer.lm_loss`.
        device_type: `cuda` or `cpu`.
        logits: Tokens of the forward times the vocabulary size.
        liger_usable: Liger-Kernel is installed and the model's head is a plain weight whole on this process.
        softcapped: The model caps its final logits (`final_logit_softcapping`), which only transformers'
            loss applies.

    Returns:
        `full_logits`, `chunked` or `liger`.
    """
    if setting != "auto":
        return setting
    if softcapped or logits <= FUSED_ABOVE_LOGITS:
        return "full_logits"
    return "liger" if liger_usable and device_type == "cuda" else "chunked"


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that projects hidden states onto the vocabulary (`lm_head` for Llama and Qwen2), peft-wrapped
    or not.

    Raises:
        ConfigError: when the model has none.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ConfigError(
            f"trainer.lm_loss: {type(inner).__name__} has no output head (lm_head) to compute the loss from its "
            "hidden states; train a causal LM, or set trainer.lm_loss=full_logits"
        )
    return head


def linear_weights(head: torch.nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight, bias) when `head` computes exactly `x @ weight.T + bias`: an `nn.Linear`, or peft's wrapper of a
    trainable copy of one (`modules_to_save`, tied to the input embeddings or not). None for anything else (LoRA
    on the head: its output is not one weight's)."""
    inner = head
    if hasattr(inner, "modules_to_save") and hasattr(inner, "original_module"):
        active = [] if inner.disable_adapters else list(inner.active_adapters)
        inner = inner.modules_to_save[active[0]] if len(active) == 1 else inner.original_module if not active else None
    if type(inner) is torch.nn.Linear:
        return inner.weight, inner.bias
    return None


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position i's target is label i + 1 (-100 after the last): the shift transformers' loss makes."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class CausalLMLoss:
    """The run's next-token loss over a model built by `assembly.build_model`.

    Args:
        model: The model the trainer runs forward on (peft-wrapped or not).
        setting: `trainer.lm_loss`.
        device: Where it runs.
        zero3: Parameters are partitioned by DeepSpeed ZeRO-3 (the head's weight is not whole outside its
            forward, so Liger cannot read it).
        chunk_logits: Logits per chunk of the chunked loss (rows = this / vocabulary size).
        capturable: Read nothing back from the device, so that a CUDA graph can capture the loss
            (`trainer.cuda_graphs`): `auto` never picks Liger (which reads the target count back); the fused loss
            projects every row, those without a target included, instead of finding the targeted rows (text data
            has a target on every row but the last), with its gradients computed in the forward
            (`linear_cross_entropy_sum`) where the head is one linear weight. Default False.

    Raises:
        ConfigError: for a model without an output head under a fused setting, or `liger` where it cannot run.
    """

    def __init__(self, model: torch.nn.Module, setting: str, device: torch.device, *, zero3: bool = False,
                 chunk_logits: int = CHUNK_LOGITS, capturable: bool = False):
        self.model, self.setting, self.device = model, setting, device
        self.capturable = capturable
        self.chunk_logits = chunk_logits
        inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        config = getattr(inner, "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        self.softcapped = getattr(config, "final_logit_softcapping", None) is not None
        self.head = None if setting == "full_logits" else self._head_or_none(model, setting)
        self.liger_usable = (
            self.head is not None and not zero3 and not capturable and liger_installed()
            and linear_weights(self.head) is not None
        )
        if setting in ("chunked", "liger") and self.softcapped:
            raise ConfigError(f"trainer.lm_loss={setting}: the model caps its final logits, which only "
                              "trainer.lm_loss=full_logits applies")
        if setting == "liger":
            self._check_liger(zero3)

    @staticmethod
    def _head_or_none(model: torch.nn.Module, setting: str) -> Optional[torch.nn.Module]:
        """The output head for a fused loss; None under `auto` where a fused loss cannot run (no head, or a
        forward without `logits_to_keep`)."""
        try:
            head = output_head(model)
            inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
            if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
                raise ConfigError(
                    f"trainer.lm_loss={setting}: {type(inner).__name__}.forward takes no logits_to_keep, so it would "
                    "project every position anyway; set trainer.lm_loss=full_logits"
                )
            return head
        except ConfigError:
            if setting == "auto":
                return None
            raise

    def _check_liger(self, zero3: bool) -> None:
        why = None
        if not liger_installed():
            why = "Liger-Kernel is not installed (pip install liger-kernel)"
        elif zero3:
            why = "under ZeRO-3 the head's weight is partitioned"
        elif linear_weights(self.head) is None:
            why = f"the output head is a {type(self.head).__name__}, not one linear weight (LoRA on the head?)"
        elif self.device.type != "cuda" and not _triton_interpreted():
            why = "it needs CUDA (on the CPU only the Triton interpreter runs it, TRITON_INTERPRET=1)"
        if why:
            raise ConfigError(f"trainer.lm_loss=liger: {why}; use trainer.lm_loss=chunked")

    def kind(self, tokens: int) -> str:
        """The loss a forward of `tokens` tokens runs (`choose_lm_loss`)."""
        if self.setting == "auto" and self.head is None:
            return "full_logits"
        return choose_lm_loss(self.setting, device_type=self.device.type, logits=tokens * self.vocab_size,
                              liger_usable=self.liger_usable, softcapped=self.softcapped)

    def mean(self, input_ids: torch.Tensor, labels: torch.Tensor, **forward: Any) -> torch.Tensor:
        """Mean next-token loss over the targets of `labels` (unshifted, as transformers takes them; -100: none).

        Args:
            input_ids: int64 [B, L].
            labels: int64 [B, L]: position i + 1's label is position i's target.
            **forward: More inputs of the model (`position_ids`, ...).

        Returns:
            A 0-dim tensor: transformers' own loss for `full_logits`, else the fused sum over the target count.
        """
        kind = self.kind(input_ids.numel())
        if kind == "full_logits":
            return self.model(input_ids=input_ids, labels=labels, use_cache=False, **forward).loss
        targets = next_token_targets(labels)
        return self.summed(kind, targets, input_ids=input_ids, **forward) / (targets != IGNORE_INDEX).sum()

    def summed(self, kind: str, targets: torch.Tensor, **forward: Any) -> torch.Tensor:
        """The summed cross entropy over `targets` (already shifted; -100: none) from one forward of the model.

        Args:
            kind: `chunked` or `liger` (`kind()`).
            targets: int64 [B, L], the target of each position.
            **forward: The model's inputs (`input_ids`, `position_ids`, ...).

        Returns:
            A float32 0-dim tensor (a sum: divide by the target count for the mean).
        """
        out = self.model(**forward, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        if kind == "liger":
            return liger_loss_sum(self.head, hidden, targets)
        rows = max(1, self.chunk_logits // max(1, self.vocab_size))
        linear = linear_weights(self.head) if self.capturable else None
        if linear is not None:
            return linear_cross_entropy_sum(hidden, *linear, targets, rows=rows)
        return chunked_loss_sum(self.head, hidden, targets, rows=rows, every_row=self.capturable)


def _target_rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `hidden` [..., H] that have a target, as [N, H], and their targets [N]."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    goals = targets.reshape(-1).to(flat.device)
    keep = (goals != IGNORE_INDEX).nonzero().squeeze(1)
    return flat.index_select(0, keep), goals.index_select(0, keep)


def _chunk_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The upcast is transformers' own (its loss upcasts the logits before the cross entropy).
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_loss_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, rows: int, every_row: bool = False
) -> torch.Tensor:
    """Summed cross entropy of `head(hidden)` against `targets`, `rows` rows at a time.

    Only the rows with a target are projected (chat data: the assistant's tokens), unless `every_row`. Each chunk
    runs under activation checkpointing: its logits are freed after the forward and recomputed in its backward, so
    at most one chunk's logits (and their gradient) exist at any time.

    Args:
        head: The output head module (called as in the model's forward).
        hidden: [..., H] final hidden states.
        targets: int64 [...], -100 where there is no target.
        rows: Rows per chunk.
        every_row: Project every row and let the cross entropy skip those without a target, instead of selecting
            the targeted rows (a `nonzero`, which reads their count back from the device). Default False.

    Returns:
        A float32 0-dim tensor, connected to the graph even without targets.
    """
    if every_row:
        flat, goals = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    else:
        flat, goals = _target_rows(hidden, targets)
    if flat.shape[0] == 0:
        return flat.float().sum()
    recompute = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = None
    for start in range(0, flat.shape[0], rows):
        part, goal = flat[start:start + rows], goals[start:start + rows]
        term = checkpoint(_chunk_sum, head, part, goal, use_reentrant=False) if recompute else _chunk_sum(head, part, goal)
        total = term if total is None else total + term
    return total


def liger_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of the linear `head` over `hidden` through Liger-Kernel's fused linear cross entropy.

    The head's gradient accumulates in float32 over the chunks (the bf16 one would round at every chunk).

    Args:
        head: An output head `linear_weights` accepts.
        hidden: [..., H] final hidden states.
        targets: int64 [...], -100 where there is no target.

    Returns:
        A float32 0-dim tensor.
    """
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    weight, bias = linear_weights(head)
    fused = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32 if weight.requires_grad else None,
    )
    flat, goals = _target_rows(hidden, targets)
    if flat.shape[0] == 0:
        return flat.float().sum()
    return fused(weight, flat, goals, bias).float()


class _LinearCrossEntropyGradInForward(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T + bias`, its gradients computed chunk by chunk in the forward.

    Each chunk's logits are made, turned into the loss and into their own gradient (softmax minus the one-hot
    target) in place (`seer_kernels.cross_entropy_with_grad`: one Triton kernel on CUDA), and multiplied out into
    the gradients of the hidden states, weight and bias; then they are freed. The backward only scales those by
    the incoming gradient, on the device. Against the checkpointed chunks this saves the recomputed projection and
    cross entropy, and it reads nothing back from the device.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        # hidden [N, H], weight [V, H], bias [V] or None, targets int64 [N] (-100: no target). Grad mode is off
        # inside forward; needs_input_grad says what the caller's graph asks for (nothing under no_grad).
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 accumulation over the chunks (bf16 would round at every chunk)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            part = hidden[start:start + rows].to(weight.dtype)
            logits = F.linear(part, weight, bias)  # [R, V]
            # Each row's loss in float32 (transformers' loss upcasts too); with gradients, the logits become their
            # own gradient, softmax minus the one-hot target, zero on rows without one.
            total += seer_kernels.cross_entropy_with_grad(
                logits, targets[start:start + rows], ignore_index=IGNORE_INDEX, write_grad=need_h or need_w or need_b
            ).sum()
            if need_b:
                grad_b += logits.sum(0, dtype=torch.float32)
            if need_h:
                grad_h[start:start + rows] = logits @ weight
            if need_w:
                grad_w += logits.t() @ part
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dtype_h, dtype_w, dtype_b = ctx.dtypes
        scaled = [None if g is None else (g * grad_total).to(d) for g, d in ((grad_h, dtype_h), (grad_w, dtype_w),
                                                                           (grad_b, dtype_b))]
        return scaled[0], scaled[1], scaled[2], None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, *, rows: int
) -> torch.Tensor:
    """Summed cross entropy of `hidden @ weight.T + bias` against `targets`, with every row projected and nothing
    read back from the device: the capturable loss of `trainer.cuda_graphs`.

    The gradients of `hidden`, `weight` and `bias` are computed in the forward, `rows` rows at a time, and held
    until the backward scales them: one chunk's logits exist at a time (in the weight's dtype; off CUDA the PyTorch
    reference adds a float32 copy), and the hidden states' gradient and a float32 copy of the weight's (when it
    trains) for the step.

    Args:
        hidden: [..., H] final hidden states.
        weight: [V, H] the head's weight.
        bias: [V] or None.
        targets: int64 [...], -100 where there is no target.
        rows: Rows per chunk.

    Returns:
        A float32 0-dim tensor.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    goals = targets.reshape(-1).to(flat.device)
    return _LinearCrossEntropyGradInForward.apply(flat, weight, bias, goals, rows)
