"""Loading text from every supported source, packing with EOS and document boundaries, and data errors."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from seer_finetune.config import ConfigError, DataConfig
from seer_finetune.data import DocumentWindows, EpochSampler, PackedSequences, build_corpus, build_data, load_documents

from helpers import ASSETS


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS)


def test_directory_of_text_files_is_one_document_each(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub" / "b.ml").write_text("let x = 1")
    (tmp_path / ".hidden").write_text("skip me")
    assert load_documents(str(tmp_path)) == ["first document", "let x = 1"]


def test_jsonl_and_parquet_with_text_field(tmp_path):
    rows = [{"body": "alpha"}, {"body": "beta"}, {"body": ""}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_documents(str(tmp_path / "d.jsonl"), text_field="body") == ["alpha", "beta"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["gamma", "delta"]}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), text_field="body") == ["gamma", "delta"]
    with pytest.raises(ConfigError, match="no text field 'text'"):
        load_documents(str(tmp_path / "d.jsonl"))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError, match="data path does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no text"):
        load_documents(str(tmp_path / "blank.txt"))


def test_packing_puts_eos_between_documents_and_restarts_positions(tmp_path, tokenizer):
    docs = ["To be, or not to be.", "Friends, Romans, countrymen.", "Now is the winter of our discontent."]
    corpus = build_corpus(docs, tokenizer, cache_dir=str(tmp_path))
    eos = tokenizer.eos_token_id
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]
    assert list(np.diff(corpus.doc_starts)) == lengths
    assert all(corpus.tokens[s - 1] == eos for s in corpus.doc_starts[1:])
    seq_len = 16
    packed = PackedSequences(corpus, seq_len)
    assert len(packed) == sum(lengths) // seq_len
    flat = torch.cat([packed[i]["input_ids"] for i in range(len(packed))])
    assert flat.tolist() == corpus.tokens[: len(flat)].tolist()
    for i in range(len(packed)):
        item = packed[i]
        start = i * seq_len
        for t in range(seq_len):
            doc = int(np.searchsorted(corpus.doc_starts, start + t, side="right") - 1)
            first_doc = int(np.searchsorted(corpus.doc_starts, start, side="right") - 1)
            assert int(item["document_ids"][t]) == doc - first_doc
            expected_pos = start + t - max(int(corpus.doc_starts[doc]), start)
            assert int(item["position_ids"][t]) == expected_pos


def test_cache_is_reused_and_keyed_by_text(tmp_path, tokenizer):
    a = build_corpus(["some text here"], tokenizer, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    b = build_corpus(["some text here"], tokenizer, cache_dir=str(tmp_path))
    assert np.array_equal(a.tokens, b.tokens) and len(list(tmp_path.iterdir())) == 1
    build_corpus(["other text"], tokenizer, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2


def test_parallel_tokenisation_matches_serial(tmp_path, tokenizer):
    docs = [f"document number {i} " * (i + 1) for i in range(8)]
    serial = build_corpus(docs, tokenizer, cache_dir=str(tmp_path / "a"), num_proc=1)
    parallel = build_corpus(docs, tokenizer, cache_dir=str(tmp_path / "b"), num_proc=2)
    assert np.array_equal(serial.tokens, parallel.tokens)


def test_too_little_text_and_short_eval_documents(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("just a few words")
    cfg = DataConfig(source=str(tmp_path / "train.txt"), seq_len=512, eval_documents=0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="too few for one sequence of data.seq_len=512"):
        build_data(cfg, tokenizer)
    (tmp_path / "eval.txt").write_text("short")
    cfg = DataConfig(source="builtin:shakespeare", eval_source=str(tmp_path / "eval.txt"), seq_len=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="no evaluation document reaches 64 tokens"):
        build_data(cfg, tokenizer)


def test_held_out_document_never_in_training(tmp_path, tokenizer):
    cfg = DataConfig(source="builtin:shakespeare", seq_len=256, eval_documents=1, max_eval_sequences=3, cache_dir=str(tmp_path))
    bundle = build_data(cfg, tokenizer)
    assert isinstance(bundle.eval, DocumentWindows) and len(bundle.eval) == 3
    train_text = bundle.train.corpus.tokens
    window = bundle.eval[0]["input_ids"].numpy()
    # the held-out play's first window does not occur in the training stream
    hits = np.flatnonzero(train_text[: len(train_text) - 32] == window[0])
    assert not any(np.array_equal(train_text[h : h + 32], window[:32]) for h in hits)


def test_sampler_resumes_mid_epoch():
    a = EpochSampler(10, seed=3)
    first = a.next_indices(7)
    state = a.state_dict()
    rest = a.next_indices(9)
    b = EpochSampler(10, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(9) == rest
    assert sorted(first + rest[:3]) == list(range(10))
    c = EpochSampler(11, seed=3)
    with pytest.raises(ConfigError, match="resuming would not be exact"):
        c.load_state_dict(state)
