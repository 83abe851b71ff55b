"""Chat and instruction data: the chat template's assistant tokens are the only targets, conversations are packed
whole and cut sensibly, masked positions carry no gradient, and the embedded chat experiment trains end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from seer_finetune.chat import ChatEncoder
from seer_finetune.compose import compose_config
from seer_finetune.config import ConfigError, DataConfig
from seer_finetune.data import PackedConversations, build_chat_corpus, build_data
from seer_finetune.metrics import read_metrics
from seer_finetune.packing import IGNORE_INDEX
from seer_finetune.perplexity import perplexity
from seer_finetune.trainer import Trainer

from helpers import ASSETS

CHAT = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets" / "corpus" / "shakespeare_chat" / "scenes.jsonl"
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who speaks first in Hamlet?"},
    {"role": "assistant", "content": "Bernardo: Who's there?"},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Francisco: Nay, answer me."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS)


def _targets(tokenizer, ids, mask) -> str:
    return tokenizer.decode(np.asarray(ids)[np.asarray(mask)])


def test_embedded_template_marks_only_the_answers_and_their_end_of_turn(tokenizer):
    encoder = ChatEncoder(tokenizer, max_len=4096)
    ids, mask = encoder.encode(CONVERSATION)
    eos = tokenizer.eos_token
    # The whole conversation is the template's text, tokenised once.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert _targets(tokenizer, ids, mask) == f"Bernardo: Who's there?{eos}Francisco: Nay, answer me.{eos}"
    # Every token outside the answers (headers, system and user text, the newlines after EOS) is not a target.
    outside = tokenizer.decode(np.asarray(ids)[~mask])
    assert "<|assistant|>" in outside and "Who speaks first" in outside and "Bernardo" not in outside


def test_generation_blocks_are_used_when_the_template_has_them(tokenizer, tmp_path):
    marked = AutoTokenizer.from_pretrained(ASSETS)
    marked.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ '<|assistant|>\n' }}{% generation %}"
        "{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}{%- else -%}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{%- endif -%}{%- endfor -%}"
    )
    encoder = ChatEncoder(marked, max_len=4096)
    assert encoder.generation_blocks
    ids, mask = encoder.encode(CONVERSATION)
    incremental = ChatEncoder(tokenizer, max_len=4096).encode(CONVERSATION)
    # Both rules find the same tokens on templates that render the same text.
    assert ids.tolist() == incremental[0].tolist() and mask.tolist() == incremental[1].tolist()


def test_template_that_rewrites_history_is_refused_in_one_line(tokenizer):
    odd = AutoTokenizer.from_pretrained(ASSETS)
    # The last message is rendered differently from earlier ones, so a prefix does not stay a prefix.
    odd.chat_template = "{%- for m in messages -%}{{ m['role'] + (': ' if loop.last else '= ') + m['content'] + '\n' }}{%- endfor -%}"
    with pytest.raises(ConfigError, match="generation") as err:
        ChatEncoder(odd, max_len=4096).encode(CONVERSATION)
    assert "\n" not in str(err.value)
    plain = AutoTokenizer.from_pretrained(ASSETS)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        ChatEncoder(plain, max_len=4096)


def test_long_user_turn_is_cut_in_its_middle_and_the_answer_kept(tokenizer):
    body = " ".join(f"line{i}" for i in range(3000))
    conversation = [
        {"role": "user", "content": f"INSTRUCTION: read this.\n{body}\nQUESTION: what is last?"},
        {"role": "assistant", "content": "line2999"},
    ]
    encoder = ChatEncoder(tokenizer, max_len=300)
    ids, mask = encoder.encode(conversation)
    assert len(ids) <= 300 and encoder.truncated == 1
    text = tokenizer.decode(ids)
    assert text.startswith("<|user|>\nINSTRUCTION: read this.") and "QUESTION: what is last?" in text
    assert _targets(tokenizer, ids, mask) == "line2999" + tokenizer.eos_token
    dropping = ChatEncoder(tokenizer, max_len=300, overflow="drop")
    assert dropping.encode(conversation) is None and dropping.dropped == 1
    # An answer alone longer than the sequence cannot be cut: left out and counted.
    too_long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": body}]
    assert encoder.encode(too_long) is None and encoder.dropped == 1


def _chat_rows(tmp_path: Path, rows: list[dict], name: str = "chat.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_response_fields_match_messages(tmp_path, tokenizer):
    pairs = [{"q": f"Question {i} " * 20, "a": f"Answer {i}."} for i in range(6)]
    messages = [{"messages": [{"role": "user", "content": p["q"]}, {"role": "assistant", "content": p["a"]}]} for p in pairs]
    common = dict(format="chat", seq_len=256, eval_documents=1, cache_dir=str(tmp_path / "cache"))
    by_pair = build_data(DataConfig(source=str(_chat_rows(tmp_path, pairs, "p.jsonl")), prompt_field="q", response_field="a", **common), tokenizer)
    by_messages = build_data(DataConfig(source=str(_chat_rows(tmp_path, messages, "m.jsonl")), **common), tokenizer)
    assert len(by_pair.train) == len(by_messages.train) > 0
    for a, b in zip(by_pair.train, by_messages.train):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_packing_keeps_conversations_whole_and_apart(tmp_path, tokenizer):
    rows = [json.loads(line) for line in CHAT.read_text().splitlines()[:20]]
    chat = build_chat_corpus([r["messages"] for r in rows], tokenizer, max_len=1024, cache_dir=str(tmp_path / "cache"))
    corpus, pad = chat.corpus, tokenizer.pad_token_id
    data = PackedConversations(corpus, 1024, pad_id=pad)
    assert len(data) < corpus.num_documents  # several conversations share a sequence
    seen = 0
    for item in data:
        ids, labels, positions, docs = (item[k].numpy() for k in ("input_ids", "labels", "position_ids", "document_ids"))
        for doc in np.unique(docs):
            where = np.flatnonzero(docs == doc)
            assert positions[where].tolist() == list(range(len(where)))  # positions restart per conversation
            if (ids[where] == pad).all():  # the padding after the last conversation: no target
                assert (labels[where] == IGNORE_INDEX).all()
                continue
            # The next conversation of the corpus, whole, with its own target mask.
            assert ids[where].tolist() == corpus.document(seen).tolist()
            assert (labels[where] != IGNORE_INDEX).tolist() == corpus.document_mask(seen).tolist()
            seen += 1
    assert seen == corpus.num_documents


def test_json_builder_with_data_files_reads_conversations(tmp_path, tokenizer):
    cfg = DataConfig(source="json", data_files=str(CHAT), format="chat", seq_len=1024, eval_documents=8, cache_dir=str(tmp_path / "c"))
    hub = build_data(cfg, tokenizer)
    local = build_data(DataConfig(source=str(CHAT), format="chat", seq_len=1024, eval_documents=8, cache_dir=str(tmp_path / "c")), tokenizer)
    assert len(hub.train) == len(local.train) and len(hub.eval) == len(local.eval)
    assert torch.equal(hub.train[3]["labels"], local.train[3]["labels"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.format=dialogue"], "data.format"),
        (["data.format=chat", "data.prompt_field=q"], "go together"),
        (["data.prompt_field=q", "data.response_field=a"], "need data.format=chat"),
        (["data.format=chat", "data.chat_overflow=split"], "data.chat_overflow"),
        (["data.data_files=[]"], "data.data_files"),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer"),
    ],
)
def test_bad_chat_and_source_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        compose_config(["+exp=smoke", *overrides])
    assert "\n" not in str(err.value)


def test_bad_rows_follow_invalid_files(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "hello " * 30}, {"role": "assistant", "content": "hi"}]}
    rows = [good, {"messages": "not a list"}, {"messages": [{"role": "user", "content": "no answer"}]}, good, good]
    path = _chat_rows(tmp_path, rows)
    cfg = DataConfig(source=str(path), format="chat", seq_len=256, eval_documents=1, cache_dir=str(tmp_path / "c"))
    bundle = build_data(cfg, tokenizer)
    assert bundle.summary()["skipped_rows"] == 2
    cfg.invalid_files = "error"
    with pytest.raises(ConfigError, match=r"chat.jsonl:2: .*not a list"):
        build_data(cfg, tokenizer)


def _chat_trainer(tmp_path: Path, *extra: str) -> Trainer:
    cfg = compose_config(
        ["+exp=smoke_chat", "trainer.micro_batch_size=2", "trainer.progress_bar=false", "trainer.save_every=0",
         f"trainer.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *extra]
    )
    return Trainer(cfg)


def test_masked_positions_carry_no_gradient(tmp_path):
    trainer = _chat_trainer(tmp_path)
    batch = trainer._next_batch()
    labels = batch["labels"]
    assert (labels != IGNORE_INDEX).any() and (labels == IGNORE_INDEX).float().mean() > 0.8  # long prompts, short answers
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = trainer.model.get_output_embeddings().register_forward_hook(keep_logits)
    try:
        loss = trainer._lm_loss(batch)
    finally:
        handle.remove()
    loss.backward()
    logits = captured["logits"]
    targets = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    grad = logits.grad[:, :-1]
    # No gradient reaches the model through a position whose next token is not the assistant's ...
    assert grad[~targets].abs().max().item() == 0.0 and logits.grad[:, -1].abs().max().item() == 0.0
    # ... and every assistant target contributes.
    assert (grad[targets].abs().sum(-1) > 0).all()
    # The loss is the mean cross-entropy over the assistant's tokens alone.
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][targets].double(), labels[:, 1:][targets])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # Tokens after a sequence's last answer (the newline after its EOS, padding) are inputs to masked positions
    # only: replacing them changes neither the loss nor any gradient.
    one = {k: v[:1] for k, v in batch.items()}
    edited = {k: v.clone() for k, v in one.items()}
    last_target = int(torch.nonzero(one["labels"][0] != IGNORE_INDEX).max())
    assert last_target + 1 < edited["input_ids"].shape[1]
    edited["input_ids"][0, last_target + 1 :] = (edited["input_ids"][0, last_target + 1 :] + 7) % 2048
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(trainer, one), _loss_and_grads(trainer, edited)
    assert loss_a == loss_b
    assert len(grads_a) == len(grads_b) > 0 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def _loss_and_grads(trainer: Trainer, batch) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = trainer._lm_loss(batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params if p.grad is not None]


def test_chat_perplexity_counts_only_assistant_tokens(tmp_path):
    trainer = _chat_trainer(tmp_path)
    windows = trainer.data.eval
    expected = sum(int((windows[i]["labels"][1:] != IGNORE_INDEX).sum()) for i in range(len(windows)))
    result = perplexity(trainer.model, windows, device=trainer.device, batch_size=2, loss_fn=trainer._sequence_lm_loss)
    assert result["tokens"] == expected and 0 < expected < len(windows) * windows.seq_len / 4
    assert math.isfinite(result["loss"])


@pytest.mark.slow
def test_smoke_chat_trains_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "SEER_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "seer_finetune", "train", "+exp=smoke_chat", "trainer.progress_bar=false", f"trainer.output_dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.5
    # Long user turns were cut to fit, none was left out, and the summary says so.
    assert summary["data"]["conversations_truncated"] > 0 and summary["data"]["conversations_dropped"] == 0
    train = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(train) == 30 and all(math.isfinite(x) for x in train) and np.mean(train[-5:]) < np.mean(train[:5])
    assert (run_dir / "final").is_dir()
