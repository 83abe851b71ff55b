"""Perplexity of a causal LM over evaluation windows."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .data import collate
from .lm_loss import CausalLMLoss


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    dataset,
    *,
    device: torch.device,
    batch_size: int = 1,
    loss_fn: Optional[Callable[[dict[str, torch.Tensor]], torch.Tensor]] = None,
) -> dict[str, float]:
    """Token-weighted mean negative log-likelihood over `dataset`'s targets and its exponential.

    The targets are the items' `labels` where given (-100: none; chat data: the assistant's tokens only), else
    every token after the first.

    Args:
        model: A causal LM returning `.loss` (mean over predicted tokens) when given labels.
        dataset: Items with `input_ids`, `position_ids` and optionally `labels` (e.g. `DocumentWindows`).
        device: Where to run.
        batch_size: Windows per forward pass. Default 1.
        loss_fn: Mean next-token loss of a collated batch (0-dim tensor); default: the model's own loss with
            the batch's position ids. The trainer passes its own (sequence-parallel shards, DeepSpeed).

    Returns:
        {"loss": mean NLL in nats, "ppl": exp(loss), "tokens": number of predicted tokens}
    """

    # `auto`: transformers' own loss for short windows, a fused one where full logits would not fit.
    lm_loss = CausalLMLoss(model, "auto", device)

    def model_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device) if "labels" in batch else input_ids
        return lm_loss.mean(input_ids, labels, position_ids=batch["position_ids"].to(device))

    loss_fn = loss_fn or model_loss
    was_training = model.training
    model.eval()
    # Summed on the device and read once at the end: no host synchronisation per window.
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            if "labels" in batch:
                predicted = int((batch["labels"][:, 1:] != -100).sum())
            else:
                predicted = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
            if predicted == 0:  # no target in these windows: their mean loss is undefined and weighs nothing
                continue
            total_nll += loss_fn(batch).detach().double() * predicted
            total_tokens += predicted
    finally:
        model.train(was_training)
    loss = float(total_nll) / max(total_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": total_tokens}
