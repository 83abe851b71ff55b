"""Needle-in-a-haystack retrieval by generation, in the spirit of RULER: can the model find numbers hidden in a
long text of the project's own corpora and say them back?

Four tasks; in each, needles of the form "A special number for <key> is <value>." go into a haystack cut from a
corpus, and a question after the haystack asks for the value(s) of some key(s):
- `single`: one needle, one key asked;
- `multikey`: the needle among distractor needles of other keys (and other values), its key asked;
- `multivalue`: one key with several needles (several values), all of them asked;
- `multiquery`: several keys with one needle each, all asked at once.
The first needle (the one asked about in `single`/`multikey`, the first value or key otherwise) sits at the
trial's depth (0 = start of the haystack, 1 = end, snapped back to a sentence end); the others at random depths.
Keys are two-word names, values 7-digit numbers, both drawn per trial from a seed, so every setting of one
evaluation sees the same prompts. The model answers by greedy generation with the KV cache; a trial counts as
retrieved when every expected value appears in the answer as a whole number (`score_answer`). Accuracies come
with 95% Wilson intervals (`passkey.wilson_interval`), per depth and over all depths.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .config import NEEDLE_TASKS as TASKS
from .passkey import wilson_interval

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# How many needles each task inserts besides the first: distractors, extra values or extra keys.
EXTRA_NEEDLES = {"single": 0, "multikey": 3, "multivalue": 3, "multiquery": 3}
SNAP_WINDOW = 64  # tokens searched backwards for a sentence end to put a needle after

INTRO = "Some special numbers are hidden in the text below. Remember them: a question about them follows the text.\n\n"
ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
    "mellow", "narrow", "olive", "proud", "quiet", "rusty", "silver", "tidy", "upper", "vivid", "wild", "young",
    "bold", "crisp", "damp", "early", "fuzzy", "golden", "hasty", "ivory",
)
NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel", "umbrella",
    "valley", "walnut", "yarrow", "bridge", "cellar", "desert", "ember", "forest", "glacier", "hammer", "lagoon",
)


@dataclass(frozen=True)
class NeedleTrial:
    """One retrieval prompt.

    Attributes:
        task: One of `TASKS`.
        prompt: Token ids: instruction, haystack with the needles, question.
        keys: The keys the question asks about.
        answers: The values the answer must contain.
        needles: `(start, end)` token spans of every needle in `prompt`, the first needle first.
        depth: The requested depth of the first needle (fraction of the haystack).
        max_new_tokens: Tokens enough to say every answer.
    """

    task: str
    prompt: list[int]
    keys: tuple[str, ...]
    answers: tuple[str, ...]
    needles: tuple[tuple[int, int], ...]
    depth: float
    max_new_tokens: int


def needle_sentence(key: str, value: str) -> str:
    """The text of one needle."""
    return f" A special number for {key} is {value}.\n"


def question(task: str, keys: Sequence[str]) -> str:
    """The question after the haystack, ending where the answer starts."""
    if task == "multivalue":
        return f"\n\nQuestion: what are all the special numbers for {keys[0]}? Answer: The special numbers for {keys[0]} are"
    if task == "multiquery":
        named = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return f"\n\nQuestion: what are the special numbers for {named}? Answer: The special numbers for {named} are"
    return f"\n\nQuestion: what is the special number for {keys[0]}? Answer: The special number for {keys[0]} is"


def sentence_ends(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Per token of `ids`, whether its text ends a sentence or a line (a needle reads as text after it)."""
    ends: dict[int, bool] = {}
    for t in set(ids):
        text = tokenizer.decode([t]).rstrip(" ")
        ends[t] = text.endswith((".", "!", "?", "\n"))
    return [ends[t] for t in ids]


def _snap(cut: int, ends: Sequence[bool]) -> int:
    """`cut` moved back to just after the nearest sentence end of the haystack window (within `SNAP_WINDOW`).

    Args:
        cut: A position in the window, 0 to its length.
        ends: `sentence_ends` of the window's tokens (only tokens before `cut` are read).
    """
    for j in range(cut, max(0, cut - SNAP_WINDOW), -1):
        if ends[j - 1]:
            return j
    return cut


def _cycled(seq: Sequence, start: int, length: int) -> list:
    """`length` items of `seq` from `start` on, wrapping around to its start as often as needed.

    The same items as `(list(seq) * reps)[start : start + length]` for enough `reps`, without copying all of
    `seq`: a haystack is about a million tokens and a trial reads only its window of it.

    Args:
        seq: The items (a haystack's token ids or its `sentence_ends`), at least one.
        start: The first item, in `[0, len(seq))`.
        length: How many items.
    """
    out = list(seq[start : start + length])
    while len(out) < length:
        out += seq[: length - len(out)]
    return out


def build_trial(
    tokenizer,
    haystack: Sequence[int],
    ends: Sequence[bool],
    task: str,
    length: int,
    depth: float,
    rng: random.Random,
    *,
    extra_needles: Optional[int] = None,
) -> NeedleTrial:
    """Token ids of one trial, prompt and answer together `length` tokens at most.

    Args:
        tokenizer: The model's tokenizer.
        haystack: Token ids of the corpus text the haystack is cut from (cycled when shorter than needed).
        ends: `sentence_ends(tokenizer, haystack)`.
        task: One of `TASKS`.
        length: Tokens of prompt plus answer budget (the context the trial fills).
        depth: Where the first needle goes, as a fraction of the haystack (0 = start, 1 = end).
        rng: Draws keys, values, the haystack's start and the other needles' depths.
        extra_needles: Needles besides the first (distractors, extra values or keys). Default `EXTRA_NEEDLES`.

    Returns:
        The trial.

    Raises:
        ValueError: unknown task, depth outside [0, 1], or a length too short for the needles and question.
    """
    if task not in TASKS:
        raise ValueError(f"needle task {task!r} must be one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth {depth} must be in [0, 1]")
    extra = EXTRA_NEEDLES[task] if extra_needles is None else (0 if task == "single" else int(extra_needles))
    names = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], extra + 1)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(extra + 1)]
    if task == "multivalue":
        pairs = [(names[0], v) for v in values]
        keys, answers = (names[0],), tuple(values)
    elif task == "multiquery":
        pairs = list(zip(names, values))
        keys, answers = tuple(names), tuple(values)
    else:
        pairs = list(zip(names, values))
        keys, answers = (names[0],), (values[0],)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    needle_ids = [encode(needle_sentence(k, v)) for k, v in pairs]
    intro = list(tokenizer(INTRO)["input_ids"])
    tail = encode(question(task, keys))
    # The values, and room for the words a model puts between them (keys, "and").
    max_new = len(encode(" " + ", ".join(answers) + ".")) + 8 * (len(answers) - 1) + 4
    budget = length - max_new - len(intro) - len(tail) - sum(map(len, needle_ids))
    if budget < 8 * (extra + 1):
        raise ValueError(f"needle length {length} is too short for the {task} task's needles and question")
    # The haystack window, cycled when the corpus is shorter than the window; needles snap to its sentence ends.
    offset = rng.randrange(len(haystack))
    window, window_ends = _cycled(haystack, offset, budget), _cycled(ends, offset, budget)
    cuts = [_snap(int(round(depth * budget)), window_ends)]
    for _ in range(extra):
        cuts.append(_snap(rng.randrange(budget + 1), window_ends))
    # Insert in haystack order; equal cuts keep the first needle first.
    order = sorted(range(len(cuts)), key=lambda i: (cuts[i], i))
    prompt, spans, prev = list(intro), [None] * len(cuts), 0
    for i in order:
        prompt += window[prev : cuts[i]]
        spans[i] = (len(prompt), len(prompt) + len(needle_ids[i]))
        prompt += needle_ids[i]
        prev = cuts[i]
    prompt += window[prev:] + tail
    return NeedleTrial(task, prompt, keys, answers, tuple(spans), float(depth), max_new)


def score_answer(text: str, answers: Sequence[str]) -> tuple[bool, float]:
    """Whether every expected value appears in a generated answer as a whole number, and the share that does.

    Args:
        text: The generated continuation.
        answers: The expected values (digit strings).

    Returns:
        (all found, fraction found).
    """
    found = [re.search(rf"(?<!\d){re.escape(a)}(?!\d)", text) is not None for a in answers]
    return all(found), sum(found) / len(found)


def trial_rng(seed: int, task: str, length: int, depth: float, index: int) -> random.Random:
    """The generator of one trial: the same prompts for every setting and model of an evaluation."""
    return random.Random(f"{seed}/{task}/{length}/{depth:g}/{index}")


def evaluate_needles(
    model: torch.nn.Module,
    tokenizer,
    haystack: Sequence[int],
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    trials: int = 20,
    batch_size: int = 4,
    seed: int = 0,
    on_row: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Retrieval accuracy of `model` (as it is configured: dense, or gates at some density) on every task, length
    and depth.

    Args:
        model: A causal LM (with or without gates).
        tokenizer: Its tokenizer.
        haystack: Corpus token ids the haystacks are cut from.
        tasks: Names from `TASKS`.
        lengths: Context lengths in tokens (prompt plus answer budget).
        depths: First-needle depths. Default `DEPTHS`.
        trials: Trials per task, length and depth. Default 20.
        batch_size: Prompts per generate call (left-padded). Default 4.
        seed: Seed of the trials' keys, values and haystack windows.
        on_row: Called with each depth's row as soon as it is done (progress output).

    Returns:
        Per task, length and depth: `{"task", "length", "depth", "trials", "hits", "accuracy", "ci_low",
        "ci_high", "value_recall"}`, then per task and length the same over all depths with `"depth": "all"`.
    """
    from .generation import generate_ids

    ends = sentence_ends(tokenizer, haystack)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for length in lengths:
            total_hits, total_recall, total = 0, 0.0, 0
            for depth in depths:
                built = [
                    build_trial(tokenizer, haystack, ends, task, length, depth, trial_rng(seed, task, length, depth, i))
                    for i in range(trials)
                ]
                new = generate_ids(
                    model,
                    [t.prompt for t in built],
                    pad_token_id=tokenizer.pad_token_id,
                    max_new_tokens=max(t.max_new_tokens for t in built),
                    batch_size=batch_size,
                )
                scores = [score_answer(tokenizer.decode(ids, skip_special_tokens=True), t.answers) for ids, t in zip(new, built)]
                hits = sum(hit for hit, _ in scores)
                recall = sum(share for _, share in scores)
                rows.append(_row(task, length, float(depth), trials, hits, recall))
                if on_row is not None:
                    on_row(rows[-1])
                total_hits, total_recall, total = total_hits + hits, total_recall + recall, total + trials
            rows.append(_row(task, length, "all", total, total_hits, total_recall))
    return rows


def _row(task: str, length: int, depth, trials: int, hits: int, recall: float) -> dict[str, Any]:
    low, high = wilson_interval(hits, trials)
    return {
        "task": task,
        "length": length,
        "depth": depth,
        "trials": trials,
        "hits": hits,
        "accuracy": hits / trials,
        "ci_low": low,
        "ci_high": high,
        "value_recall": recall / trials,
    }


def format_needle_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per setting, task and length: accuracy at each depth, then over all depths with its 95% interval.

    Args:
        rows: Rows of `evaluate_needles`, each with `setting` and `value` added (e.g. density 0.1).
    """
    depths = sorted({r["depth"] for r in rows if r["depth"] != "all"})
    head = f"{'setting':>16} {'task':>10} {'length':>7} " + " ".join(f"{'d=' + format(d, 'g'):>6}" for d in depths)
    head += f" {'all':>6} {'95% CI':>13} {'trials':>6}"
    lines = [head, "-" * len(head)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((f"{r['setting']}={r['value']:g}", r["task"], r["length"]), {})[r["depth"]] = r
    for (setting, task, length), by_depth in groups.items():
        cells = " ".join(f"{by_depth[d]['accuracy']:>6.2f}" if d in by_depth else f"{'-':>6}" for d in depths)
        total = by_depth.get("all")
        tail = ""
        if total:
            interval = f"[{total['ci_low']:.2f}, {total['ci_high']:.2f}]"
            tail = f" {total['accuracy']:>6.2f} {interval:>13} {total['trials']:>6}"
        lines.append(f"{setting:>16} {task:>10} {length:>7} {cells}{tail}")
    return "\n".join(lines)
