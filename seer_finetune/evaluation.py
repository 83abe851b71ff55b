"""Perplexity of a causal LM over evaluation windows."""

from __future__ import annotations

import math

import torch

from .data import collate


@torch.no_grad()
def perplexity(model: torch.nn.Module, dataset, *, device: torch.device, batch_size: int = 1) -> dict[str, float]:
    """Token-weighted mean negative log-likelihood over `dataset` and its exponential.

    Args:
        model: A causal LM returning `.loss` (mean over predicted tokens) when given labels.
        dataset: Items with `input_ids` and `position_ids` (e.g. `DocumentWindows`).
        device: Where to run.
        batch_size: Windows per forward pass. Default 1.

    Returns:
        {"loss": mean NLL in nats, "ppl": exp(loss), "tokens": number of predicted tokens}
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            input_ids = batch["input_ids"].to(device)
            out = model(input_ids=input_ids, position_ids=batch["position_ids"].to(device), labels=input_ids, use_cache=False)
            predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)
            total_nll += float(out.loss) * predicted
            total_tokens += predicted
    finally:
        model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": total_tokens}
