"""Needle tasks: the trial builder and the scorer as pure functions, and the eval job end to end (a model with
untrained gates at several densities, and a dense model without gates) on CPU."""

import json
import random
import re
import subprocess
import sys

import pytest

from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError
from seer_finetune.generation import load_generation_tokenizer
from seer_finetune.jobs import eval_job
from seer_finetune.needles import (
    ADJECTIVES,
    EXTRA_NEEDLES,
    INTRO,
    NOUNS,
    SNAP_WINDOW,
    TASKS,
    build_trial,
    needle_sentence,
    question,
    score_answer,
    sentence_ends,
    trial_rng,
)
from seer_finetune.passkey import wilson_interval

from generation_helpers import PLAYS
from helpers import save_tiny_model

NEEDLE = re.compile(r"A special number for (\S+) is (\d+)\.")


@pytest.fixture(scope="module")
def tokenizer():
    return load_generation_tokenizer("builtin:tiny_llama")


@pytest.fixture(scope="module")
def haystack(tokenizer):
    ids = tokenizer((PLAYS / "macbeth.txt").read_text(), add_special_tokens=False)["input_ids"]
    return ids, sentence_ends(tokenizer, ids)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_trial_places_the_first_needle_at_its_depth_and_the_answer_is_in_the_text(tokenizer, haystack, task, depth):
    ids, ends = haystack
    length = 900
    trial = build_trial(tokenizer, ids, ends, task, length, depth, random.Random(7))
    assert len(trial.prompt) + trial.max_new_tokens == length
    assert len(trial.needles) == EXTRA_NEEDLES[task] + 1
    # Every needle span decodes to its sentence; the spans do not overlap.
    spans = sorted(trial.needles)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    found = [NEEDLE.search(tokenizer.decode(trial.prompt[s:e])) for s, e in trial.needles]
    assert all(found)
    # The first needle sits at its depth of the haystack (within the snap to a sentence end).
    intro = len(tokenizer(INTRO)["input_ids"])
    needle_tokens = sum(e - s for s, e in trial.needles)
    first = trial.needles[0]
    before = first[0] - intro - sum(e - s for s, e in trial.needles if e <= first[0])
    tail = len(tokenizer(question(task, trial.keys), add_special_tokens=False)["input_ids"])
    budget = len(trial.prompt) - intro - needle_tokens - tail
    assert abs(before - depth * budget) <= SNAP_WINDOW + 2, (before, depth * budget)
    # Recover the answer from the prompt's text alone: the values of the asked keys.
    text = tokenizer.decode(trial.prompt)
    pairs = NEEDLE.findall(text)
    assert len(pairs) == len(trial.needles)
    recovered = [value for key, value in pairs if key in trial.keys]
    assert sorted(recovered) == sorted(trial.answers)
    assert text.rstrip().endswith("are" if task in ("multivalue", "multiquery") else "is")
    question_text = text[text.rindex("Question:") :]
    assert all(key in question_text for key in trial.keys)
    if task == "multikey":
        assert len({key for key, _ in pairs}) == len(pairs) and len(trial.answers) == 1
    if task == "multivalue":
        assert len(trial.keys) == 1 and len(trial.answers) == len(pairs)
    if task == "multiquery":
        assert len(trial.keys) == len(trial.answers) == len(pairs)


def test_trials_are_reproducible_and_short_corpora_are_cycled(tokenizer, haystack):
    ids, ends = haystack
    a = build_trial(tokenizer, ids, ends, "multikey", 600, 0.5, trial_rng(0, "multikey", 600, 0.5, 3))
    b = build_trial(tokenizer, ids, ends, "multikey", 600, 0.5, trial_rng(0, "multikey", 600, 0.5, 3))
    c = build_trial(tokenizer, ids, ends, "multikey", 600, 0.5, trial_rng(0, "multikey", 600, 0.5, 4))
    assert a == b and a.prompt != c.prompt
    short = ids[:150]
    cycled = build_trial(tokenizer, short, ends[:150], "single", 700, 0.3, random.Random(1))
    assert len(cycled.prompt) + cycled.max_new_tokens == 700
    with pytest.raises(ValueError, match="too short"):
        build_trial(tokenizer, ids, ends, "multiquery", 120, 0.5, random.Random(1))
    with pytest.raises(ValueError, match="must be one of"):
        build_trial(tokenizer, ids, ends, "haystack", 600, 0.5, random.Random(1))


def _straightforward_window(haystack, ends, budget, depth, extra, rng):
    """The haystack window and the needles' cuts in it, built the plain way: the whole haystack repeated until
    the window fits, the window sliced out, each cut snapped back on the repeated sentence ends.

    Args:
        haystack, ends: Token ids and their `sentence_ends`.
        budget: The window's length in tokens.
        depth: The first needle's depth.
        extra: Needles besides the first.
        rng: The trial's generator, just before it draws the window's start.
    """
    offset = rng.randrange(len(haystack))
    reps = (offset + budget) // len(haystack) + 1
    stream, stream_ends = list(haystack) * reps, list(ends) * reps

    def snap(cut):
        for j in range(cut, max(0, cut - SNAP_WINDOW), -1):
            if stream_ends[offset + j - 1]:
                return j
        return cut

    cuts = [snap(int(round(depth * budget)))] + [snap(rng.randrange(budget + 1)) for _ in range(extra)]
    return stream[offset : offset + budget], cuts


@pytest.mark.parametrize("size", [None, 1000, 150])  # the whole play; wrapped once; wrapped several times
@pytest.mark.parametrize("task", ["single", "multikey", "multiquery"])
def test_trial_haystack_is_the_window_of_the_repeated_corpus(tokenizer, haystack, size, task):
    # build_trial reads only its window of the haystack; its prompts must stay those of the plain construction
    # (same seed, same prompts): the same window, the same needle positions, in the same order.
    ids, ends = haystack
    ids, ends = ids[:size], ends[:size]
    intro = tokenizer(INTRO)["input_ids"]
    for seed in range(4):
        for depth in (0.0, 0.5, 1.0):
            trial = build_trial(tokenizer, ids, ends, task, 900, depth, random.Random(seed))
            # Replay the generator's draws before the window (keys, values) to rebuild it the plain way.
            rng = random.Random(seed)
            extra = EXTRA_NEEDLES[task]
            rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], extra + 1)
            for _ in range(extra + 1):
                rng.randrange(1_000_000, 10_000_000)
            tail = tokenizer(question(task, trial.keys), add_special_tokens=False)["input_ids"]
            budget = len(trial.prompt) - len(intro) - len(tail) - sum(e - s for s, e in trial.needles)
            window, cuts = _straightforward_window(ids, ends, budget, depth, extra, rng)
            # The prompt without its needles is intro, window, question.
            spans = sorted(trial.needles)
            kept = [t for i, t in enumerate(trial.prompt) if not any(s <= i < e for s, e in spans)]
            assert kept == intro + window + tail
            # Each needle sits at its cut of the window.
            for (start, _), cut in zip(trial.needles, cuts):
                before = sum(e - s for s, e in spans if e <= start)
                assert start - len(intro) - before == cut


def test_score_answer_needs_every_value_as_a_whole_number():
    assert score_answer(" 1234567 and 7654321.", ["1234567", "7654321"]) == (True, 1.0)
    assert score_answer(" 1234567, then 765432", ["1234567", "7654321"]) == (False, 0.5)
    # A value inside a longer number does not count.
    assert score_answer(" 91234567", ["1234567"]) == (False, 0.0)
    assert score_answer("1234567", ["1234567"]) == (True, 1.0)
    assert needle_sentence("amber-anchor", "1234567") in f"text{needle_sentence('amber-anchor', '1234567')}"


def _needle_args(tmp_path, *extra):
    return [
        "+exp=smoke_seer",
        f"trainer.output_dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "eval.model_path=null",
        "eval.lengths=[256]",
        "eval.densities=[1.0,0.5]",
        "eval.thresholds=[0.2]",
        "eval.needle_tasks=[single,multivalue]",
        "eval.needle_lengths=[320,400]",
        "eval.needle_depths=[0.0,1.0]",
        "eval.needle_trials=3",
        "eval.needle_batch_size=2",
        "data.max_eval_sequences=1",
        *extra,
    ]


def test_eval_job_runs_the_needle_tasks_at_every_setting(tmp_path):
    report = eval_job(compose_config(_needle_args(tmp_path)))
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == report
    rows = report["needles"]
    settings = {(r["setting"], r["value"]) for r in rows}
    assert settings == {("density", 1.0), ("density", 0.5), ("threshold", 0.2)}
    # per setting: 2 tasks x 2 lengths x (2 depths + the summary over depths)
    assert len(rows) == 3 * 2 * 2 * 3
    for r in rows:
        assert r["trials"] == (6 if r["depth"] == "all" else 3)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(r["hits"], r["trials"]))
        assert 0.0 <= r["value_recall"] <= 1.0 and r["accuracy"] == r["hits"] / r["trials"]
    assert {r["selection"] for r in rows} == {"dense", "gate"}
    assert len(report["results"]) == 3  # perplexity rows too
    table = (tmp_path / "out" / "eval.needles.md").read_text()
    assert "multivalue" in table and "threshold=0.2" in table and "95% CI" in table


def test_eval_scores_a_model_without_gates_as_the_dense_baseline(tmp_path):
    dense = save_tiny_model(tmp_path / "dense", "llama", max_position_embeddings=1024)
    args = _needle_args(tmp_path, f"eval.model_path={dense}", "eval.needle_tasks=[multiquery]", "eval.needle_lengths=[512]")
    report = eval_job(compose_config(args))
    assert report["gates"] == "none (dense model)" and report["block_size"] is None
    assert [(r["setting"], r["value"], r["selection"]) for r in report["results"]] == [("density", 1.0, "dense")]
    assert {(r["setting"], r["value"]) for r in report["needles"]} == {("density", 1.0)}
    assert len(report["needles"]) == 3
    with pytest.raises(ConfigError, match="eval.needle_lengths: needle length 100 is too short for the multiquery task"):
        eval_job(compose_config([*args, "eval.needle_lengths=[100]", "eval.perplexity=false"]))


def test_bad_needle_settings_are_one_line_errors(tmp_path):
    for override, message in (
        ("eval.needle_tasks=[single,haystack]", "eval.needle_tasks='haystack' is not one of"),
        ("eval.needle_depths=[0.5,1.5]", "eval.needle_depths: 1.5 must be in [0, 1]"),
        ("eval.needle_trials=0", "eval.needle_trials=0 must be > 0"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "seer_finetune", "eval", "+exp=smoke_seer", override],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
