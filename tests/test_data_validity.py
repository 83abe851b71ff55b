"""Data files that are not text, and table rows without a text string: skipped with a warning that names them,
or refused in one line (`data.invalid_files`); never trained on and never the held-out evaluation document."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from seer_finetune.config import ConfigError, DataConfig
from seer_finetune.data import build_data, load_documents

from helpers import ASSETS

PLAYS = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets" / "corpus" / "shakespeare"
BINARY = Path("/bin/ls")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS)


def _play(name: str, chars: int = 6000) -> str:
    return (PLAYS / name).read_text(encoding="utf-8")[:chars]


def _mixed_folder(root: Path) -> dict[str, str]:
    """Three real texts, then three files that are not text and sort after them (the last file of a folder is the
    held-out evaluation document)."""
    root.mkdir()
    texts = {"a_hamlet.txt": _play("hamlet.txt"), "b_lear.txt": _play("lear.txt"), "c_macbeth.txt": _play("macbeth.txt")}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    french = "Le cœur a ses raisons que la raison ne connaît point; été, à côté, déjà, où, très. " * 40
    (root / "d_latin1.txt").write_bytes(french.replace("œ", "oe").encode("latin-1"))
    (root / "e_nul.txt").write_bytes(b"looks like text\x00\x00\x00\x01\x02 but holds NUL bytes " * 50)
    shutil.copyfile(BINARY, root / "z_ls")
    return texts


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.skipif(not BINARY.is_file(), reason="needs /bin/ls as a real binary")
def test_files_that_are_not_text_are_skipped_with_a_warning_and_never_held_out(tmp_path, tokenizer, capsys):
    texts = _mixed_folder(tmp_path / "corpus")
    cfg = DataConfig(source=str(tmp_path / "corpus"), seq_len=64, eval_documents=1, cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg, tokenizer)

    # The held-out document is the last real text, not the binary that sorts last.
    eos = tokenizer.eos_token_id
    assert bundle.eval.corpus.num_documents == 1
    assert bundle.eval.corpus.document(0).tolist() == _tokens(tokenizer, texts["c_macbeth.txt"]) + [eos]
    # Training sees exactly the other real texts.
    expected = []
    for name in ("a_hamlet.txt", "b_lear.txt"):
        expected += _tokens(tokenizer, texts[name]) + [eos]
    assert np.asarray(bundle.train.corpus.tokens).tolist() == expected

    skipped = {Path(s.path).name: s.reason for s in bundle.skipped_files}
    assert set(skipped) == {"d_latin1.txt", "e_nul.txt", "z_ls"}
    assert "NUL" in skipped["e_nul.txt"] and "NUL" in skipped["z_ls"] and "UTF-8" in skipped["d_latin1.txt"]
    err = capsys.readouterr().err
    for name in skipped:
        assert name in err
    assert "data.invalid_files" in err
    summary = bundle.summary()
    assert summary["skipped_files"] == 3 and summary["skipped_rows"] == 0
    assert json.loads(json.dumps(summary)) == summary
    assert sorted(Path(f["path"]).name for f in summary["skipped_file_list"]) == sorted(skipped)


@pytest.mark.skipif(not BINARY.is_file(), reason="needs /bin/ls as a real binary")
def test_invalid_files_error_refuses_in_one_line(tmp_path, tokenizer):
    _mixed_folder(tmp_path / "corpus")
    cfg = DataConfig(source=str(tmp_path / "corpus"), seq_len=64, invalid_files="error", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as caught:
        build_data(cfg, tokenizer)
    message = str(caught.value)
    assert "\n" not in message and "d_latin1.txt" in message and "data.invalid_files" in message
    assert not (tmp_path / "cache").exists()


def test_a_stray_bad_byte_in_a_long_text_is_tolerated(tmp_path):
    text = _play("othello.txt", 20000)
    data = text.encode("utf-8")
    (tmp_path / "one.txt").write_bytes(data[:5000] + b"\xe9" + data[5000:])
    docs = load_documents(str(tmp_path))
    assert len(docs) == 1 and "\ufffd" in docs[0]
    assert docs[0].replace("\ufffd", "") == text


@pytest.mark.skipif(not BINARY.is_file(), reason="needs /bin/ls as a real binary")
def test_a_single_binary_source_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no text \(skipped 1 file that is not text: .*ls \(NUL bytes"):
        load_documents(str(BINARY))


def test_table_rows_whose_text_is_not_a_string(tmp_path, capsys):
    rows = [{"text": "alpha"}, {"text": 5}, {"text": ["x", "y"]}, {"text": None}, {"other": 1}, {"text": "beta"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_documents(str(tmp_path / "d.jsonl")) == ["alpha", "beta"]
    err = capsys.readouterr().err
    assert "2 row(s)" in err and "d.jsonl:2" in err and "d.jsonl:3" in err
    with pytest.raises(ConfigError, match=r"d.jsonl:2: data.text_field 'text' is an int, not a string"):
        load_documents(str(tmp_path / "d.jsonl"), invalid_files="error")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(ConfigError, match=r"holds no text \(skipped 3 row"):
        load_documents(str(tmp_path / "ints.parquet"))


def test_eval_source_counts_its_skipped_files(tmp_path, tokenizer):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "play.txt").write_text(_play("othello.txt"))
    (tmp_path / "eval" / "blob.bin").write_bytes(bytes(range(256)) * 8)
    cfg = DataConfig(
        source="builtin:shakespeare", eval_source=str(tmp_path / "eval"), seq_len=64, cache_dir=str(tmp_path / "cache")
    )
    bundle = build_data(cfg, tokenizer)
    assert [(s.config_field, Path(s.path).name) for s in bundle.skipped_files] == [("data.eval_source", "blob.bin")]
    assert bundle.eval.corpus.num_documents == 1


def test_json_forms_and_malformed_lines_are_named(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps([{"text": "one"}, {"text": "two", "id": 2}]))
    (tmp_path / "strings.json").write_text(json.dumps(["three", "four"]))
    (tmp_path / "object.json").write_text(json.dumps({"text": "five", "meta": {"a": 1}}, indent=2))
    (tmp_path / "crlf.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "six"}\r\n\r\n{"text": "seven\\u2028eight"}\r\n')
    assert load_documents(str(tmp_path / "array.json")) == ["one", "two"]
    assert load_documents(str(tmp_path / "strings.json")) == ["three", "four"]
    assert load_documents(str(tmp_path / "object.json")) == ["five"]
    assert load_documents(str(tmp_path / "crlf.jsonl")) == ["six", "seven\u2028eight"]

    (tmp_path / "broken.json").write_text('{\n  "text": "x",\n  "meta": {"a": 1,}\n}\n')
    with pytest.raises(ConfigError, match=r"broken.json:3: not valid JSON"):
        load_documents(str(tmp_path / "broken.json"))
    (tmp_path / "scalar.jsonl").write_text('{"text": "a"}\n"just a string"\n')
    with pytest.raises(ConfigError, match=r"scalar.jsonl:2: expected a JSON object with a 'text' field, got a str"):
        load_documents(str(tmp_path / "scalar.jsonl"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("fine text")
    (tmp_path / "folder" / "b.jsonl").write_text('{"text": "ok"}\n{"text": "torn')
    with pytest.raises(ConfigError, match=r"b.jsonl:2: not valid JSON"):
        load_documents(str(tmp_path / "folder"))


def test_an_absolute_file_glob_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ConfigError, match=r"data.file_glob='/etc/\*': Non-relative patterns are unsupported"):
        load_documents(str(tmp_path), file_glob="/etc/*")
