"""Passkey retrieval: can the model read back a number hidden at some depth of a long filler text?

The prompt is filler sentences with "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a
random depth, ending with "What is the pass key? The pass key is". Scoring is greedy and teacher-forced in one
forward pass: a trial counts as retrieved when the model's argmax at every answer position is the next answer
token. That equals greedy decoding of the answer, and needs no KV cache (which the seer path does not have).
"""

from __future__ import annotations

import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


def build_trial(tokenizer, length: int, depth: float, passkey: int) -> tuple[list[int], list[int]]:
    """Token ids of one trial: (prompt, answer), the prompt about `length - len(answer)` tokens long.

    Args:
        tokenizer: The model's tokenizer.
        length: Target total length in tokens.
        depth: Where the key goes, as a fraction of the filler (0 = start, 1 = end).
        passkey: The number to hide.
    """
    needle = tokenizer(f" The pass key is {passkey}. Remember it. {passkey} is the pass key. ", add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    answer = tokenizer(f" {passkey}", add_special_tokens=False)["input_ids"]
    filler_unit = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    budget = length - len(needle) - len(question) - len(answer)
    if budget < len(filler_unit):
        raise ValueError(f"passkey length {length} is too short for the prompt")
    filler = (filler_unit * (budget // len(filler_unit) + 1))[:budget]
    cut = int(round(depth * budget))
    # Keep the needle on a sentence boundary of the filler so it reads as text.
    while cut > 0 and cut < budget and filler[cut - 1] != filler_unit[-1]:
        cut -= 1
    prompt = filler[:cut] + needle + filler[cut:] + question
    return prompt, answer


@torch.no_grad()
def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    length: int,
    *,
    trials: int = 5,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Fraction of `trials` passkeys retrieved at prompt length `length` (depths spread evenly over 0..1).

    Returns:
        {"length", "trials", "accuracy"}.
    """
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for t in range(trials):
            depth = (t + 0.5) / trials
            prompt, answer = build_trial(tokenizer, length, depth, rng.randrange(10_000, 100_000))
            ids = torch.tensor([prompt + answer], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0]
            # Logits at position i predict token i + 1: the answer's tokens are predicted from the positions
            # just before each of them.
            start = len(prompt) - 1
            predicted = logits[start : start + len(answer)].argmax(-1).tolist()
            hits += int(predicted == answer)
    finally:
        model.train(was_training)
    return {"length": length, "trials": trials, "accuracy": hits / trials}
