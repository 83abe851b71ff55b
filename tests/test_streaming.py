"""Streamed training data: the same sequences as in memory, bounded buffers, a checkpointed position that resumes
exactly (in process, and after a real SIGKILL of a CLI run), `datasets` builders with `data_files`, and files that
are not text under `data.invalid_files`."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from seer_finetune.config import ConfigError, DataConfig
from seer_finetune.data import build_data
from seer_finetune.metrics import read_metrics

from helpers import ASSETS, finish_train_cli, kill_when, start_train_cli

PLAYS = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets" / "corpus" / "shakespeare"
CHAT = PLAYS.parent / "shakespeare_chat" / "scenes.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _draw(order, steps: int, count: int = 2) -> list[dict]:
    return [item for _ in range(steps) for item in order.next_items(count)]


def _roundtrip(state: dict) -> dict:
    """What a checkpoint's state.json gives back."""
    return json.loads(json.dumps(state))


def test_stream_of_one_file_equals_the_packed_corpus_in_memory(tmp_path, tokenizer):
    play = tmp_path / "macbeth.txt"
    shutil.copy(PLAYS / "macbeth.txt", play)
    common = dict(source=str(play), seq_len=512, eval_documents=0, cache_dir=str(tmp_path / "c"))
    whole = build_data(DataConfig(**common), tokenizer)
    stream = build_data(DataConfig(streaming=True, shuffle_buffer=1, **common), tokenizer).training_order(seed=5)
    items = _draw(stream, len(whole.train), count=1)
    # shuffle_buffer=1 keeps the stream's order: sequence i is the in-memory sequence i, bit for bit.
    assert all(_same(items[i], whole.train[i]) for i in range(len(whole.train)))


def test_chat_stream_packs_like_memory(tmp_path, tokenizer):
    common = dict(source=str(CHAT), format="chat", seq_len=1024, eval_documents=0, cache_dir=str(tmp_path / "c"))
    whole = build_data(DataConfig(**common), tokenizer)
    stream = build_data(DataConfig(streaming=True, shuffle_buffer=1, **common), tokenizer).training_order(seed=0)
    items = _draw(stream, len(whole.train), count=1)
    assert all(_same(items[i], whole.train[i]) for i in range(len(whole.train)))


def test_stream_reads_lazily_in_a_seeded_file_order_with_a_bounded_buffer(tmp_path, tokenizer):
    cfg = DataConfig(source="builtin:shakespeare", seq_len=256, eval_documents=1, streaming=True, shuffle_buffer=8, cache_dir=str(tmp_path / "c"))
    bundle = build_data(cfg, tokenizer)
    stream = bundle.training_order(seed=3)
    first = _draw(stream, 4)
    source = stream.source
    # One block of 8 sequences of 256 tokens comes from the first file of the order: the others are not read yet.
    assert len(stream._items) == 8 and len(source._seen) <= 2 < len(source.files)
    _draw(stream, 400)
    assert len(stream._items) == 8  # the buffer never grows with what was read
    # Another seed: another order of files and of sequences in each block.
    other = build_data(cfg, tokenizer).training_order(seed=4)
    assert not all(_same(a, b) for a, b in zip(first, _draw(other, 4)))
    assert source._order(0) != source._order(1)  # a new file order every epoch
    # The held-out play is the last file, never streamed.
    assert [f.name for f in source.files] == sorted(p.name for p in PLAYS.glob("*.txt"))[:-1]
    assert bundle.eval is not None and len(bundle.eval) > 0


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_resume_from_saved_position_is_exact(tmp_path, tokenizer, fmt):
    source = "builtin:shakespeare" if fmt == "text" else str(CHAT)
    cfg = DataConfig(source=source, format=fmt, seq_len=512, eval_documents=2, streaming=True, shuffle_buffer=5, cache_dir=str(tmp_path / "c"))
    reference = _draw(build_data(cfg, tokenizer).training_order(seed=1), 23, count=3)
    for stop in (0, 1, 5, 12):
        stream = build_data(cfg, tokenizer).training_order(seed=1)
        _draw(stream, stop, count=3)
        state = _roundtrip(stream.state_dict())
        resumed = build_data(cfg, tokenizer).training_order(seed=1)
        resumed.load_state_dict(state)
        rest = _draw(resumed, 23 - stop, count=3)
        assert all(_same(a, b) for a, b in zip(rest, reference[3 * stop :])), stop
    # The state is a position, not tokens.
    assert len(json.dumps(state)) < 400


def test_checkpoint_of_another_stream_or_of_memory_is_refused(tmp_path, tokenizer):
    common = dict(source="builtin:shakespeare", seq_len=256, eval_documents=1, cache_dir=str(tmp_path / "c"))
    stream = build_data(DataConfig(streaming=True, **common), tokenizer).training_order(seed=1)
    _draw(stream, 2)
    state = _roundtrip(stream.state_dict())
    for changed, match in ((dict(shuffle_buffer=7), "shuffle_buffer"), (dict(seq_len=512), "seq_len")):
        other = build_data(DataConfig(streaming=True, **{**common, **changed}), tokenizer).training_order(seed=1)
        with pytest.raises(ConfigError, match=match):
            other.load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        build_data(DataConfig(streaming=True, **common), tokenizer).training_order(seed=2).load_state_dict(state)
    in_memory = build_data(DataConfig(**common), tokenizer).training_order(seed=1)
    with pytest.raises(ConfigError, match="streaming"):
        in_memory.load_state_dict(state)
    with pytest.raises(ConfigError, match="whole"):
        stream.load_state_dict(_roundtrip(in_memory.state_dict()))


def _rows_file(tmp_path: Path) -> Path:
    rows = []
    for play in sorted(PLAYS.glob("*.txt"))[:3]:
        text = play.read_text()
        rows += [{"text": text[k : k + 4000], "n": len(rows)} for k in range(0, len(text), 4000)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_datasets_json_builder_with_data_files_streams_and_resumes(tmp_path, tokenizer):
    path = _rows_file(tmp_path)
    common = dict(source="json", data_files=str(path), seq_len=256, eval_documents=2, cache_dir=str(tmp_path / "c"))
    whole = build_data(DataConfig(**common), tokenizer)
    streamed = build_data(DataConfig(streaming=True, shuffle_buffer=4, **common), tokenizer)
    # Held out: the last rows when read whole, the first rows of a stream (whose end is unknown).
    first_rows = [json.loads(line)["text"] for line in path.read_text().splitlines()[:2]]
    assert whole.eval is not None and streamed.eval is not None
    stream = streamed.training_order(seed=0)
    reference = _draw(stream, 30)
    assert stream.state_dict()["stream"]["start"]["doc"]["state"] is not None  # the datasets library's own position
    middle = build_data(DataConfig(streaming=True, shuffle_buffer=4, **common), tokenizer).training_order(seed=0)
    _draw(middle, 11)
    state = _roundtrip(middle.state_dict())
    resumed = build_data(DataConfig(streaming=True, shuffle_buffer=4, **common), tokenizer).training_order(seed=0)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(_draw(resumed, 19), reference[22:]))
    # The first training tokens are those of the third row: the two before it are held out.
    first_ids = tokenizer(first_rows[0], add_special_tokens=False)["input_ids"][:16]
    assert all(item["input_ids"][:16].tolist() != first_ids for item in reference)


def test_hub_settings_errors_are_one_line(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="local path") as err:
        build_data(DataConfig(source=str(CHAT), hub_config="x", seq_len=256), tokenizer)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot load dataset 'json'") as err:
        build_data(DataConfig(source="json", data_files=str(tmp_path / "missing.jsonl"), seq_len=256, streaming=True), tokenizer)
    assert "\n" not in str(err.value)


def test_streamed_files_that_are_not_text_follow_invalid_files(tmp_path, tokenizer, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("hamlet.txt", "macbeth.txt", "tempest.txt"):
        shutil.copy(PLAYS / name, folder / name)
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 64)
    cfg = DataConfig(source=str(folder), seq_len=256, eval_documents=1, streaming=True, shuffle_buffer=4, cache_dir=str(tmp_path / "c"))
    bundle = build_data(cfg, tokenizer)
    stream = bundle.training_order(seed=0)
    _draw(stream, 400)  # more than an epoch: every file has been read
    summary = bundle.summary()
    assert summary["skipped_files"] == 1 and summary["skipped_file_list"][0]["path"].endswith("blob.bin")
    assert capsys.readouterr().err.count("blob.bin") == 1  # warned once, not every epoch
    cfg.invalid_files = "error"
    # Checked before training starts, so a long run never stops halfway for it.
    with pytest.raises(ConfigError, match="blob.bin is not text"):
        build_data(cfg, tokenizer)


STREAM_ARGS = [
    "+exp=smoke_stream",
    "rope.factor=2",
    "data.seq_len=512",
    "data.shuffle_buffer=6",
    "trainer.max_steps=12",
    "trainer.save_every=2",
    "trainer.micro_batch_size=2",
    "trainer.progress_bar=false",
    "trainer.eval_before=false",
    "data.max_eval_sequences=2",
    "trainer.save_final=false",
]


@pytest.mark.slow
def test_streaming_run_killed_with_sigkill_resumes_to_the_same_losses(tmp_path):
    cache = tmp_path / "cache"
    finish_train_cli(STREAM_ARGS, tmp_path / "uninterrupted", cache)
    expected = read_metrics(tmp_path / "uninterrupted")

    run_dir = tmp_path / "killed"
    victim = start_train_cli(STREAM_ARGS, run_dir, cache)
    # Step 7 starts the third block of 6 sequences (2 per step): the kill lands inside a block, mid-stream.
    kill_when(victim, run_dir / "checkpoints" / "step_000008")
    assert not (run_dir / "summary.json").exists()
    state = json.loads((run_dir / "checkpoints" / "step_000008" / "state.json").read_text())
    assert state["trainer"]["sampler"]["stream"]["served"] == 4  # 16 sequences drawn: block 2, 4 of 6 served

    assert "resumed at step" in finish_train_cli(STREAM_ARGS, run_dir, cache)
    train_loss = lambda records: [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    got = train_loss(read_metrics(run_dir))
    assert got == train_loss(expected) and len(got) == 12
    a = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["final_loss"] == a["final_loss"]
    assert b["eval_after"]["loss"] == pytest.approx(a["eval_after"]["loss"], rel=1e-6)
