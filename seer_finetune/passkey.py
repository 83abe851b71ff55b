"""Passkey retrieval: can the model read back a number hidden at some depth of a long filler text?

The prompt is filler sentences with "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a
given depth, ending with "What is the pass key? The pass key is". Scoring is greedy and teacher-forced in one
forward pass: a trial counts as retrieved when the model's argmax at every answer position is the next answer
token. That equals greedy decoding of the answer.

A handful of trials cannot tell two models apart (5 trials resolve nothing finer than 0.2), so trials are spread
over several needle depths and the accuracy comes with a Wilson score interval. The trials of one depth are not
placed at one position: the filler repeats, so trials at the same position differ only in the key's digits and
succeed or fail together (20 trials over 5 fixed depths would be about 5 observations, and the interval would
claim more than they show). Each trial's depth is drawn around its depth, within half the spacing of the depths,
which also moves the needle across the attention's block boundaries. For a model with seer gates, each
trial can also record, per layer, whether the block selection at the question kept a key block of the needle:
where retrieval fails, that says which layers dropped it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Trial:
    """One passkey prompt.

    Attributes:
        prompt: Token ids up to and including the question.
        answer: Token ids of the passkey the model should continue with.
        needle: `(start, end)` token positions of the inserted needle sentence within `prompt`.
    """

    prompt: list[int]
    answer: list[int]
    needle: tuple[int, int]


def build_trial(tokenizer, length: int, depth: float, passkey: int) -> Trial:
    """Token ids of one trial, the prompt about `length - len(answer)` tokens long.

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
    return Trial(prompt=prompt, answer=answer, needle=(cut, cut + len(needle)))


def wilson_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default), sound also at 0 or `trials` hits.

    Args:
        hits: Successes.
        trials: Attempts (> 0).
        z: Standard-normal quantile of the interval's confidence. Default 1.96 (95%).

    Returns:
        (low, high) bounds in [0, 1].
    """
    p = hits / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _needle_kept(runtime, trial: Trial) -> dict[int, float]:
    """Per layer, the share of heads whose block selection for the question's last query block keeps a key
    block that holds part of the needle (from the masks the runtime recorded in the last forward)."""
    block = runtime.settings.block_size
    row = (len(trial.prompt) - 1) // block
    needle_blocks = slice(trial.needle[0] // block, (trial.needle[1] - 1) // block + 1)
    return {
        layer: float(mask[0, :, row, needle_blocks].any(-1).float().mean())
        for layer, mask in sorted(runtime.block_masks.items())
    }


@torch.no_grad()
def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    length: int,
    *,
    trials: int = 20,
    depths: Sequence[float] = DEPTHS,
    depth_jitter: Optional[float] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    runtime=None,
) -> dict:
    """Passkeys retrieved at prompt length `length`, over `trials` trials spread round-robin over `depths`.

    Args:
        model: A causal LM (with or without seer gates).
        tokenizer: Its tokenizer.
        length: Prompt length in tokens (answer included).
        trials: Number of trials (each a fresh random passkey). Default 20.
        depths: Needle depths as fractions of the filler. Default 0.1, 0.3, 0.5, 0.7, 0.9.
        depth_jitter: Each trial's depth is its depth plus a uniform draw in [-depth_jitter, depth_jitter],
            clipped to [0, 1]. Default None: half the smallest gap between `depths` (0.1 for the default depths,
            which then cover the whole filler), 0 for a single depth. 0 places every trial of a depth at one
            position.
        device: Where the model runs.
        seed: Seed of the passkeys and of the depths' draws.
        runtime: The model's `SeerRuntime`, to record per layer whether the sparse selection at the question kept
            a block of the needle (only for sparse settings). Default None.

    Returns:
        {"length", "trials", "hits", "accuracy", "ci_low", "ci_high" (95% Wilson), "per_depth": {depth: accuracy},
        "trial_depths": [each trial's drawn depth], "trial_hits": [1 or 0 per trial],
        "needle_kept_per_layer": [share of heads per layer, averaged over trials] or None}.
    """
    if trials < 1 or not depths:
        raise ValueError("passkey needs at least one trial and one depth")
    centres = sorted({float(d) for d in depths})
    if depth_jitter is None:
        depth_jitter = min((b - a for a, b in zip(centres, centres[1:])), default=0.0) / 2
    if not 0.0 <= depth_jitter <= 0.5:
        raise ValueError(f"depth_jitter must lie in [0, 0.5], got {depth_jitter}")
    rng = random.Random(seed)
    # Depths from a generator of their own, so that the keys stay those of `seed` whatever the jitter.
    depth_rng = random.Random(f"passkey depths {seed}")
    was_training = model.training
    model.eval()
    hits, per_depth = 0, {float(d): [0, 0] for d in depths}
    trial_depths: list[float] = []
    trial_hits: list[int] = []
    kept: dict[int, list[float]] = {}
    record = runtime is not None and runtime.sparse
    if record:
        saved_record = runtime.record_block_masks
        runtime.record_block_masks = True
    try:
        for t in range(trials):
            depth = float(depths[t % len(depths)])
            drawn = min(1.0, max(0.0, depth + depth_rng.uniform(-depth_jitter, depth_jitter)))
            trial = build_trial(tokenizer, length, drawn, rng.randrange(10_000, 100_000))
            ids = torch.tensor([trial.prompt + trial.answer], device=device)
            # Logits at position i predict token i + 1: the answer's tokens are predicted from the positions
            # just before each of them, the last len(answer) + 1 positions (only those are projected, so a long
            # prompt never builds [length, vocabulary] logits).
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(trial.answer) + 1).logits[0]
            predicted = logits[: len(trial.answer)].argmax(-1).tolist()
            hit = int(predicted == trial.answer)
            hits += hit
            trial_depths.append(drawn)
            trial_hits.append(hit)
            per_depth[depth][0] += hit
            per_depth[depth][1] += 1
            if record:
                for layer, share in _needle_kept(runtime, trial).items():
                    kept.setdefault(layer, []).append(share)
    finally:
        model.train(was_training)
        if record:
            runtime.record_block_masks = saved_record
            runtime.block_masks.clear()
    low, high = wilson_interval(hits, trials)
    needle: Optional[list[float]] = [sum(v) / len(v) for _, v in sorted(kept.items())] if kept else None
    return {
        "length": length,
        "trials": trials,
        "hits": hits,
        "accuracy": hits / trials,
        "ci_low": low,
        "ci_high": high,
        "per_depth": {str(d): h / n for d, (h, n) in per_depth.items() if n},
        "trial_depths": trial_depths,
        "trial_hits": trial_hits,
        "needle_kept_per_layer": needle,
    }
