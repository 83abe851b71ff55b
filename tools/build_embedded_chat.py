"""Rebuild the embedded chat dataset (seer_finetune/assets/corpus/shakespeare_chat/scenes.jsonl).

Each conversation is a long-context exercise made from the shipped public-domain plays: the user hands over a
passage of a scene (hundreds to a few thousand tokens of the embedded tokenizer, some longer than the smoke
experiments' sequence, so truncation is exercised) and asks who speaks next; the assistant answers with the
speaker and the first line of the next speech, a short answer. Every third conversation asks once more for the
speech after that (two assistant turns); every fourth opens with a system message. The order is fixed by a seed,
play by play in file order, so the last conversations (held out for evaluation) come from the last play.

Run from the repository root: `python tools/build_embedded_chat.py`.
"""

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets"
PLAYS = ASSETS / "corpus" / "shakespeare"
OUT = ASSETS / "corpus" / "shakespeare_chat" / "scenes.jsonl"
PER_PLAY = 12
PASSAGE_CHARS = (500, 2800)
SEED = 1601
SYSTEM = "You know Shakespeare's plays by heart and answer in one line."


def _is_speaker(line: str) -> bool:
    # "Ham." or "ROSALIND." in most of the editions, "THESEUS" in one.
    return (line.endswith(".") or line.isupper()) and len(line) <= 32 and not line.startswith("[") and line[:1].isupper()


def speeches(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, speaker, first line) of every speech after the first act heading; start and end are character
    offsets of the speech's block in `text`."""
    body_start = text.find("\nACT I")
    out, position = [], max(body_start, 0)
    for block in text[position:].split("\n\n"):
        start = text.index(block, position)
        position = start + len(block)
        lines = [line.strip() for line in block.strip("\n").split("\n")]
        if len(lines) >= 2 and _is_speaker(lines[0]) and lines[1] and not lines[1].startswith("["):
            out.append((start, position, lines[0], lines[1]))
    return out


def _answer(speech: tuple[int, int, str, str]) -> str:
    return f"{speech[2].rstrip('.')}: {speech[3]}"


def conversations_of(path: Path, rng: random.Random) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    title = next(line.strip() for line in text.splitlines() if line.strip()).title()
    found = speeches(text)
    out = []
    for n in range(PER_PLAY):
        target = rng.randint(*PASSAGE_CHARS)
        first = rng.randrange(0, len(found) - 80)
        last = first
        while found[last][1] - found[first][0] < target:
            last += 1
        passage = text[found[first][0] : found[last][1]].strip("\n")
        ask = f"Here is a passage from {title}:\n\n{passage}\n\nContinue the scene: who speaks next, and what is their first line?"
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": _answer(found[last + 1])}]
        if n % 3 == 2:
            messages += [
                {"role": "user", "content": "And who speaks after that?"},
                {"role": "assistant", "content": _answer(found[last + 2])},
            ]
        if n % 4 == 3:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"messages": messages})
    return out


def main() -> None:
    rng = random.Random(SEED)
    rows = [row for path in sorted(PLAYS.glob("*.txt")) for row in conversations_of(path, rng)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {OUT}")


if __name__ == "__main__":
    main()
