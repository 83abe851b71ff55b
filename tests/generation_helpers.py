"""Trained models for the generation, export and needle tests: a short `+exp=smoke_seer` run (gate distillation,
then joint LoRA + block-sparse training with a merged copy), and prompts cut from the shipped plays."""

from __future__ import annotations

from pathlib import Path

from seer_finetune.compose import compose_config
from seer_finetune.jobs import train_job

PLAYS = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets" / "corpus" / "shakespeare"

SMOKE_SEER_SHORT = [
    "+exp=smoke_seer",
    "attention.init_steps=2",
    "trainer.max_steps=3",
    "trainer.save_every=3",
    "trainer.micro_batch_size=1",
    "trainer.eval_before=false",
    "trainer.eval_every=0",
    "trainer.progress_bar=false",
    "data.max_eval_sequences=1",
    "peft.merge_on_save=true",
]


def train_smoke_seer(run: Path, cache: Path, *extra: str) -> Path:
    """Train the short smoke_seer run into `run`; returns its `final` folder (LoRA adapter over the built-in
    base, gates, and `merged/` with the gates beside the merged weights)."""
    train_job(compose_config([*SMOKE_SEER_SHORT, f"trainer.output_dir={run}", f"data.cache_dir={cache}", *extra]))
    return run / "final"


def play_prompts(tokenizer, lengths: list[int], *, play: str = "hamlet.txt") -> list[str]:
    """Prompts of about `lengths` tokens each, cut from different places of a shipped play."""
    text = (PLAYS / play).read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out, start = [], 0
    for n in lengths:
        out.append(tokenizer.decode(ids[start : start + n]))
        start += n + 97
    return out
