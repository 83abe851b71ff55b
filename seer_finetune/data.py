"""Documents in, training and evaluation sequences out.

Sources (`seer_finetune.sources`): a Hugging Face dataset name (with `data.hub_config` and `data.data_files`), a
local .txt / .jsonl / .json / .parquet file, a directory of them (each text file is one document), or
`builtin:<name>` (corpora shipped in the repo); files that are not text are left out or refused
(`data.invalid_files`).

`data.format: text`: documents are tokenised in parallel with the model's tokenizer, cached on disk, and packed
into sequences of exactly `seq_len` tokens with EOS after every document (`packing.PackedSequences`).
`data.format: chat`: conversations go through the tokenizer's chat template with the assistant's tokens as the only
targets (`seer_finetune.chat`), are cached the same way, and are packed whole, padded (`PackedConversations`).
Each sequence keeps its document boundaries, so attention can be kept inside documents (position ids restart per
document; a varlen kernel can read them). `data.streaming` reads the training source on the fly instead
(`seer_finetune.streaming`).

The token caches are this module's own (`SEER_CACHE`, keyed by a hash of the text, the tokenizer and, for chat,
the template and lengths): a memory-mapped array per corpus, exact and written atomically. The `datasets` library
caches what it downloads and prepares for hub sources; its `map` cache would key on its own fingerprints of the
tokenizer, which are not stable across processes for every tokenizer, so it does not serve as the token cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .chat import ChatEncoder, chat_rows
from .config import ConfigError, DataConfig
from .packing import (  # noqa: F401  (part of this module's interface)
    DocumentWindows,
    PackedConversations,
    PackedSequences,
    TokenizedCorpus,
    make_item,
)
# `load_documents` and `resolve_source` are part of this module's interface too (the eval job and benchmarks
# read documents through it).
from .sources import EXAMPLES_NAMED, RowSchema, SkippedFile, load_documents, read_source, resolve_source, text_rows, warn  # noqa: F401


def _default_cache_dir() -> Path:
    return Path(os.environ.get("SEER_CACHE", Path.home() / ".cache" / "seer-finetune")) / "data"


def tokenize_documents(documents: list[str], tokenizer, num_proc: int = 1) -> list[np.ndarray]:
    """Token ids of each document (no special tokens), in parallel when `num_proc > 1`."""
    if num_proc > 1 and len(documents) >= 2 * num_proc:
        import datasets

        table = datasets.Dataset.from_dict({"text": documents})
        table = table.map(
            lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            num_proc=num_proc,
            remove_columns=["text"],
            desc="tokenising",
        )
        return [np.asarray(ids, dtype=np.int32) for ids in table["ids"]]
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def tokenizer_fingerprint(tokenizer) -> Any:
    """A hash started with what decides a tokenizer's output (class, vocabulary, EOS, chat template)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(json.dumps(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), 512))))).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h


def _fingerprint(documents: list[str], tokenizer) -> str:
    h = tokenizer_fingerprint(tokenizer)
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:24]


def _cached(folder: Path, names: tuple[str, ...], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Arrays `names` (and `meta.json`) from the cache `folder`, or built by `build()` and written there
    atomically (a temporary folder renamed into place, so a crash never leaves a half-written cache behind)."""
    if all((folder / f"{n}.npy").is_file() for n in names) and (folder / "meta.json").is_file():
        out: dict[str, Any] = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        out["meta"] = json.loads((folder / "meta.json").read_text())
        return out
    out = build()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for n in names:
        np.save(tmp / f"{n}.npy", out[n])
    (tmp / "meta.json").write_text(json.dumps(out.get("meta", {})))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same corpus first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _concatenate(pieces: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the pieces end to end, int64 offsets with the total last)."""
    doc_starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)]).astype(np.int64)
    out = np.empty(int(doc_starts[-1]), dtype=dtype)
    for piece, start in zip(pieces, doc_starts[:-1]):
        out[start : start + len(piece)] = piece
    return out, doc_starts


def build_corpus(documents: list[str], tokenizer, *, cache_dir: str | None = None, num_proc: int = 1) -> TokenizedCorpus:
    """Tokenise text `documents`, EOS after each (or reuse the on-disk cache for the same text and tokenizer)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; packing needs one between documents")
    cache_root = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()

    def build() -> dict[str, Any]:
        pieces = [np.append(p, np.int32(eos)) for p in tokenize_documents(documents, tokenizer, num_proc=num_proc)]
        tokens, doc_starts = _concatenate(pieces, np.int32)
        return {"tokens": tokens, "doc_starts": doc_starts}

    arrays = _cached(cache_root / _fingerprint(documents, tokenizer), ("tokens", "doc_starts"), build)
    return TokenizedCorpus(arrays["tokens"], np.asarray(arrays["doc_starts"]))


@dataclass
class ChatCorpus:
    """A tokenised chat corpus and what encoding it cut or left out.

    Attributes:
        corpus: Conversations end to end, with the assistant's tokens in `loss_mask`.
        truncated: Conversations cut to fit the sequence length.
        dropped: Conversations left out (too long to cut, or nothing to train on).
    """

    corpus: TokenizedCorpus
    truncated: int = 0
    dropped: int = 0


def build_chat_corpus(
    conversations: list[list[dict]], tokenizer, *, max_len: int, overflow: str = "truncate", cache_dir: str | None = None
) -> ChatCorpus:
    """Encode conversations through the chat template (`chat.ChatEncoder`), or reuse the on-disk cache for the same
    conversations, tokenizer, template, length and overflow rule.

    Args:
        conversations: Lists of `{role, content}` messages.
        tokenizer: A fast tokenizer with a chat template.
        max_len: The longest encoding kept (`data.seq_len`, or the evaluation length).
        overflow: `truncate` or `drop` (`data.chat_overflow`).
        cache_dir: The cache's root; default `$SEER_CACHE/data`.

    Returns:
        The corpus and its counts.

    Raises:
        ConfigError: no chat template, a template that cannot mark the assistant's tokens, or no conversation left.
    """
    encoder = ChatEncoder(tokenizer, max_len, overflow)
    h = tokenizer_fingerprint(tokenizer)
    h.update(json.dumps([str(tokenizer.chat_template), max_len, overflow, "chat"]).encode())
    for conversation in conversations:
        h.update(hashlib.sha256(json.dumps(conversation, ensure_ascii=False).encode("utf-8", errors="replace")).digest())
    cache_root = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()

    def build() -> dict[str, Any]:
        encoded = [e for e in (encoder.encode(c) for c in conversations) if e is not None]
        tokens, doc_starts = _concatenate([ids for ids, _ in encoded], np.int32)
        mask, _ = _concatenate([m for _, m in encoded], bool)
        return {"tokens": tokens, "doc_starts": doc_starts, "loss_mask": mask, "meta": {"truncated": encoder.truncated, "dropped": encoder.dropped}}

    arrays = _cached(cache_root / ("chat-" + h.hexdigest()[:24]), ("tokens", "doc_starts", "loss_mask"), build)
    corpus = TokenizedCorpus(arrays["tokens"], np.asarray(arrays["doc_starts"]), arrays["loss_mask"])
    if corpus.num_documents == 0:
        raise ConfigError(
            f"no conversation is left to train on: {len(conversations)} read, all longer than {max_len} tokens with "
            "no user text to cut, or without an assistant token (data.chat_overflow, data.seq_len)"
        )
    return ChatCorpus(corpus, arrays["meta"]["truncated"], arrays["meta"]["dropped"])


def row_schema(cfg: DataConfig) -> RowSchema:
    """How a table row becomes a document under `data.format`.

    Args:
        cfg: The data section.

    Returns:
        `text_rows(data.text_field)`, or `chat.chat_rows(...)` for `format: chat`.
    """
    if cfg.format == "chat":
        return chat_rows(cfg.messages_field, cfg.prompt_field, cfg.response_field)
    return text_rows(cfg.text_field)


def read_data_source(cfg: DataConfig, source: str, config_field: str = "data.source"):
    """Read every document of `source` with the data section's settings (`sources.read_source`).

    Args:
        cfg: The data section.
        source: `cfg.source` or `cfg.eval_source`.
        config_field: The field that named it, for messages.

    Returns:
        A `sources.SourceDocuments`.
    """
    return read_source(
        source, split=cfg.split, file_glob=cfg.file_glob, invalid_files=cfg.invalid_files, config_field=config_field,
        schema=row_schema(cfg), hub_config=cfg.hub_config, data_files=cfg.data_files,
    )


def evaluation_set(cfg: DataConfig, tokenizer, documents: list, length: int):
    """Evaluation sequences of `length` tokens from held-out documents.

    Text: windows cut from inside single documents (`DocumentWindows`), every token a target. Chat: whole
    conversations packed and padded (`PackedConversations`), the assistant's tokens the only targets, so
    perplexity is measured on answers.

    Args:
        cfg: The data section (`format`, `max_eval_sequences`, `chat_overflow`, `cache_dir`, `num_proc`).
        tokenizer: The model's tokenizer.
        documents: The held-out texts or conversations.
        length: Tokens per sequence.

    Returns:
        The dataset, at most `max_eval_sequences` long (0: all), spread over all documents.

    Raises:
        ConfigError: no text document reaches `length` tokens.
    """
    if cfg.format == "chat":
        chat = build_chat_corpus(documents, tokenizer, max_len=length, overflow=cfg.chat_overflow, cache_dir=cfg.cache_dir)
        return PackedConversations(chat.corpus, length, _pad_id(tokenizer), cfg.max_eval_sequences)
    corpus = build_corpus(documents, tokenizer, cache_dir=cfg.cache_dir, num_proc=cfg.num_proc)
    windows = DocumentWindows(corpus, length, cfg.max_eval_sequences)
    if len(windows) == 0:
        longest = int(np.diff(corpus.doc_starts).max())
        raise ConfigError(
            f"no evaluation document reaches {length} tokens (the longest has {longest}); "
            "lower data.eval_seq_len or give longer evaluation text"
        )
    return windows


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


class EpochSampler:
    """Deterministic shuffled order over a dataset, resumable at any position.

    The order of epoch e is a permutation drawn from `seed + e`, so the data position (epoch, index) is all a
    checkpoint needs to continue exactly where it stopped.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        """The next `count` sequence indices, drawing a new permutation at the end of each epoch."""
        out = []
        for _ in range(count):
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """The position in the data, for a checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict`'s position; refuses one written for other data or another seed."""
        if "stream" in state:
            raise ConfigError("the checkpoint was written by a run with data.streaming=true; this run reads its data whole")
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ConfigError(
                f"checkpoint was written for {state['size']} training sequences (seed {state['seed']}); this run has "
                f"{self.size} (seed {self.seed}): the data or trainer.seed changed, so resuming would not be exact"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


class SequenceOrder:
    """In-memory training sequences in a seeded order per epoch (`EpochSampler`), resumable; the same interface as
    a stream (`streaming.StreamingSequences`).

    Args:
        dataset: The packed sequences.
        seed: The order's seed (`trainer.seed`).
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), seed)

    def next_items(self, count: int, keep: slice | None = None) -> list[dict[str, torch.Tensor]]:
        """The next `count` sequences of the order (only those in `keep` are built; the position moves by `count`)."""
        indices = self.sampler.next_indices(count)
        return [self.dataset[i] for i in (indices[keep] if keep is not None else indices)]

    def state_dict(self) -> dict[str, int]:
        """The position, for a checkpoint (`EpochSampler.state_dict`)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s position."""
        self.sampler.load_state_dict(state)


@dataclass
class DataBundle:
    """A run's data: training sequences (in memory, or a stream), evaluation sequences when there are held-out
    documents, and what was left out of the sources.

    Attributes:
        train: The packed training sequences (`PackedSequences`, `PackedConversations`), or a
            `streaming.StreamingSequences`.
        eval: The evaluation sequences (`DocumentWindows`, `PackedConversations`), or None.
        skipped_files: Files of `data.source` / `data.eval_source` that are not text (`data.invalid_files=skip`).
        skipped_rows: Table rows the schema refused.
        skipped_row_examples: `file:line` of the first of those rows.
        truncated_conversations: Chat conversations cut to fit `data.seq_len` (training and evaluation).
        dropped_conversations: Chat conversations left out (too long to cut, or nothing to train on).
        seq_len: Tokens per training sequence.
    """

    train: Any
    eval: Any
    skipped_files: list[SkippedFile] = field(default_factory=list)
    skipped_rows: int = 0
    skipped_row_examples: list[str] = field(default_factory=list)
    truncated_conversations: int = 0
    dropped_conversations: int = 0
    seq_len: int = 0

    @property
    def streaming(self) -> bool:
        """Whether the training sequences are a stream."""
        return hasattr(self.train, "left_out")

    def training_order(self, seed: int):
        """The object the trainer draws its sequences from: `next_items(count, keep)`, `state_dict()`,
        `load_state_dict(state)` (the state goes into checkpoints as the trainer's `sampler`).

        Args:
            seed: `trainer.seed`.

        Returns:
            A `SequenceOrder` over in-memory sequences, or the stream itself, started from `seed`.
        """
        if self.streaming:
            self.train.start(seed)
            return self.train
        return SequenceOrder(self.train, seed)

    def describe(self) -> str:
        """The training data in words, e.g. "240 training sequences of 1024 tokens"."""
        if self.streaming:
            return f"training sequences of {self.seq_len} tokens streamed"
        return f"{len(self.train)} training sequences of {self.seq_len} tokens"

    def summary(self, max_named: int = EXAMPLES_NAMED) -> dict[str, Any]:
        """What was left out, as plain JSON values for a run's summary.

        Args:
            max_named: How many skipped files and rows to name (all are counted).

        Returns:
            `{"skipped_files": count, "skipped_file_list": [{"path", "reason", "config_field"}, ...],
            "skipped_rows": count, "skipped_row_examples": ["file:line (problem)", ...]}`, with
            `conversations_truncated` and `conversations_dropped` for chat data. A stream adds what it left out of
            the files it has read so far.
        """
        files, rows, examples = list(self.skipped_files), self.skipped_rows, list(self.skipped_row_examples)
        truncated, dropped = self.truncated_conversations, self.dropped_conversations
        if self.streaming:
            report = self.train.left_out()
            files += report["skipped_files"]
            rows += report["skipped_rows"]
            examples += report["skipped_row_examples"]
            truncated += report["truncated"]
            dropped += report["dropped"]
        out = {
            "skipped_files": len(files),
            "skipped_file_list": [dataclasses.asdict(s) for s in files[:max_named]],
            "skipped_rows": rows,
            "skipped_row_examples": examples[:max_named],
        }
        if truncated or dropped:
            out.update(conversations_truncated=truncated, conversations_dropped=dropped)
        return out


def _hold_out(cfg: DataConfig, documents: list) -> tuple[list, list]:
    """(training documents, evaluation documents): the last `eval_documents` held out."""
    if cfg.eval_documents <= 0:
        return documents, []
    if len(documents) <= cfg.eval_documents:
        raise ConfigError(
            f"data.source has {len(documents)} document(s); holding out data.eval_documents="
            f"{cfg.eval_documents} leaves none to train on (give data.eval_source or lower eval_documents)"
        )
    return documents[: -cfg.eval_documents], documents[-cfg.eval_documents :]


def build_data(cfg: DataConfig, tokenizer) -> DataBundle:
    """Load, tokenise and pack the training data (or open its stream), and build the evaluation sequences.

    Files that are not text are left out before documents are held out for evaluation, so the held-out
    document is always real text.

    Args:
        cfg: The data section.
        tokenizer: The model's tokenizer (needs an EOS token; a chat template for `format: chat`).

    Returns:
        The bundle, with what was left out of the sources (`DataBundle.summary`).

    Raises:
        ConfigError: empty data, a file that is not text under `data.invalid_files=error`, a malformed table, too
            little text for one training sequence, no evaluation document long enough for one window, or chat
            data the tokenizer cannot render.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; packing needs one between documents")
    eval_len = cfg.eval_seq_len or cfg.seq_len
    left_out = []
    held_out = None
    if cfg.eval_source is not None:
        held_out = read_data_source(cfg, cfg.eval_source, "data.eval_source")
        left_out.append(held_out)
    if cfg.streaming:
        from .streaming import open_stream

        train, stream_held_out = open_stream(cfg, tokenizer, _pad_id(tokenizer), row_schema(cfg), hold_out=held_out is None)
        eval_documents = held_out.documents if held_out is not None else stream_held_out
        truncated = dropped = 0
    else:
        source = read_data_source(cfg, cfg.source)
        left_out.insert(0, source)
        documents = source.documents
        if held_out is not None:
            eval_documents = held_out.documents
        else:
            documents, eval_documents = _hold_out(cfg, documents)
        train, truncated, dropped = _training_sequences(cfg, tokenizer, documents)
    evaluation = evaluation_set(cfg, tokenizer, eval_documents, eval_len) if eval_documents else None
    bundle = DataBundle(
        train=train,
        eval=evaluation,
        skipped_files=[f for part in left_out for f in part.skipped_files],
        skipped_rows=sum(part.skipped_rows for part in left_out),
        skipped_row_examples=[r for part in left_out for r in part.skipped_row_examples][:EXAMPLES_NAMED],
        truncated_conversations=truncated,
        dropped_conversations=dropped,
        seq_len=cfg.seq_len,
    )
    if truncated or dropped:
        warn(
            f"data.source: {truncated} conversation(s) longer than data.seq_len={cfg.seq_len} were cut in their longest "
            f"user message and {dropped} left out (data.chat_overflow={cfg.chat_overflow})"
        )
    return bundle


def _training_sequences(cfg: DataConfig, tokenizer, documents: list) -> tuple[Any, int, int]:
    """(in-memory training sequences, conversations truncated, conversations dropped)."""
    if cfg.format == "chat":
        chat = build_chat_corpus(documents, tokenizer, max_len=cfg.seq_len, overflow=cfg.chat_overflow, cache_dir=cfg.cache_dir)
        return PackedConversations(chat.corpus, cfg.seq_len, _pad_id(tokenizer)), chat.truncated, chat.dropped
    corpus = build_corpus(documents, tokenizer, cache_dir=cfg.cache_dir, num_proc=cfg.num_proc)
    train = PackedSequences(corpus, cfg.seq_len)
    if len(train) == 0:
        raise ConfigError(f"data.source has {len(corpus.tokens)} tokens, too few for one sequence of data.seq_len={cfg.seq_len}")
    return train, 0, 0


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items' tensors (`input_ids`, `labels`, `position_ids`, `document_ids`: `[L]` each) into a batch:
    `[len(items), L]`."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
