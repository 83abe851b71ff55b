"""Text in, packed token sequences out.

Sources (`seer_finetune.sources`): a Hugging Face dataset name, a local .txt / .jsonl / .json / .parquet file, a
directory of them (each text file is one document), or `builtin:shakespeare` (the corpus shipped in the repo);
files that are not text are left out or refused (`data.invalid_files`). Documents are tokenised in parallel with the model's tokenizer, cached on disk, and packed into sequences of exactly
`seq_len` tokens with EOS after every document. Each sequence keeps its document boundaries, so attention
can be kept inside documents (position ids restart per document; a varlen kernel can read them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, DataConfig
# `load_documents` and `resolve_source` are part of this module's interface too (the eval job and benchmarks
# read documents through it).
from .sources import EXAMPLES_NAMED, SkippedFile, load_documents, read_source, resolve_source  # noqa: F401


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


@dataclass
class TokenizedCorpus:
    """All documents' tokens end to end, each followed by EOS.

    Attributes:
        tokens: int32 [N], the concatenation.
        doc_starts: int64 [n_docs + 1], offsets of each document in `tokens` (last entry = N).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray

    @property
    def num_documents(self) -> int:
        """Documents in the corpus."""
        return len(self.doc_starts) - 1

    def document(self, i: int) -> np.ndarray:
        """The token ids of document `i`: `[length]`."""
        return self.tokens[self.doc_starts[i] : self.doc_starts[i + 1]]


def _fingerprint(documents: list[str], tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(json.dumps(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), 512))))).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:24]


def build_corpus(documents: list[str], tokenizer, *, cache_dir: str | None = None, num_proc: int = 1) -> TokenizedCorpus:
    """Tokenise `documents` (or reuse the on-disk cache for the same text and tokenizer)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; packing needs one between documents")
    cache_root = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
    folder = cache_root / _fingerprint(documents, tokenizer)
    if (folder / "tokens.npy").is_file() and (folder / "doc_starts.npy").is_file():
        return TokenizedCorpus(np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "doc_starts.npy"))
    pieces = tokenize_documents(documents, tokenizer, num_proc=num_proc)
    lengths = np.array([len(p) + 1 for p in pieces], dtype=np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.empty(int(doc_starts[-1]), dtype=np.int32)
    for piece, start in zip(pieces, doc_starts[:-1]):
        tokens[start : start + len(piece)] = piece
        tokens[start + len(piece)] = eos
    # Written to a temporary folder and renamed, so a crash never leaves a half-written cache behind.
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "doc_starts.npy", doc_starts)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same corpus first
        pass
    return TokenizedCorpus(tokens, doc_starts)


class PackedSequences(torch.utils.data.Dataset):
    """Fixed-length windows over a tokenised corpus, documents packed back to back.

    Item i is a dict with `input_ids` (int64 [seq_len]), `position_ids` (int64 [seq_len], restarting at 0 at
    every document start inside the window) and `document_ids` (int32 [seq_len], 0.. per window).
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len
        self.num_sequences = len(corpus.tokens) // seq_len

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, end = index * self.seq_len, (index + 1) * self.seq_len
        ids = torch.from_numpy(np.asarray(self.corpus.tokens[start:end], dtype=np.int64))
        # Document starts that fall strictly inside this window.
        starts = self.corpus.doc_starts
        inner = starts[(starts > start) & (starts < end)] - start
        document_ids = torch.zeros(self.seq_len, dtype=torch.int32)
        if len(inner):
            document_ids[torch.from_numpy(inner)] = 1
            document_ids = document_ids.cumsum(0).to(torch.int32)
        boundaries = torch.cat([torch.zeros(1, dtype=torch.long), torch.from_numpy(inner).long()])
        segment_start = boundaries[document_ids.long()]
        position_ids = torch.arange(self.seq_len) - segment_start
        return {"input_ids": ids, "position_ids": position_ids, "document_ids": document_ids}


class DocumentWindows(torch.utils.data.Dataset):
    """Evaluation windows of `seq_len` tokens cut from inside single documents (never across them).

    Documents shorter than `seq_len` give no window; the remainder at the end of a document is dropped.
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, max_windows: int = 0):
        self.corpus, self.seq_len = corpus, seq_len
        self.windows: list[int] = []
        for i in range(corpus.num_documents):
            start, end = int(corpus.doc_starts[i]), int(corpus.doc_starts[i + 1])
            for offset in range(start, end - seq_len + 1, seq_len):
                self.windows.append(offset)
        if max_windows > 0 and len(self.windows) > max_windows:
            # Spread the kept windows over all documents rather than taking the first ones.
            keep = np.linspace(0, len(self.windows) - 1, max_windows).round().astype(int)
            self.windows = [self.windows[k] for k in keep]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.windows[index]
        ids = torch.from_numpy(np.asarray(self.corpus.tokens[start : start + self.seq_len], dtype=np.int64))
        return {
            "input_ids": ids,
            "position_ids": torch.arange(self.seq_len),
            "document_ids": torch.zeros(self.seq_len, dtype=torch.int32),
        }


@dataclass
class DataBundle:
    """A run's data: packed training sequences, evaluation windows when there are held-out documents, and what
    was left out of the sources.

    Attributes:
        train: The packed training sequences.
        eval: The evaluation windows, or None.
        skipped_files: Files of `data.source` / `data.eval_source` that are not text (`data.invalid_files=skip`).
        skipped_rows: Table rows whose text field is not a string.
        skipped_row_examples: `file:line` of the first of those rows.
    """

    train: PackedSequences
    eval: DocumentWindows | None
    skipped_files: list[SkippedFile] = field(default_factory=list)
    skipped_rows: int = 0
    skipped_row_examples: list[str] = field(default_factory=list)

    def summary(self, max_named: int = EXAMPLES_NAMED) -> dict[str, Any]:
        """What was left out, as plain JSON values for a run's summary.

        Args:
            max_named: How many skipped files and rows to name (all are counted).

        Returns:
            `{"skipped_files": count, "skipped_file_list": [{"path", "reason", "config_field"}, ...],
            "skipped_rows": count, "skipped_row_examples": ["file:line (kind)", ...]}`.
        """
        return {
            "skipped_files": len(self.skipped_files),
            "skipped_file_list": [dataclasses.asdict(s) for s in self.skipped_files[:max_named]],
            "skipped_rows": self.skipped_rows,
            "skipped_row_examples": self.skipped_row_examples[:max_named],
        }


def build_data(cfg: DataConfig, tokenizer) -> DataBundle:
    """Load, tokenise and pack the training data, and cut evaluation windows.

    Files that are not text are left out before documents are held out for evaluation, so the held-out
    document is always real text.

    Args:
        cfg: The data section.
        tokenizer: The model's tokenizer (needs an EOS token).

    Returns:
        The bundle, with what was left out of the sources (`DataBundle.summary`).

    Raises:
        ConfigError: empty data, a file that is not text under `data.invalid_files=error`, a malformed table, too
            little text for one training sequence, or no evaluation document long enough for one window.
    """
    read = dict(text_field=cfg.text_field, split=cfg.split, file_glob=cfg.file_glob, invalid_files=cfg.invalid_files)
    source = read_source(cfg.source, **read)
    documents = source.documents
    left_out = [source]
    eval_len = cfg.eval_seq_len or cfg.seq_len
    if cfg.eval_source is not None:
        held_out = read_source(cfg.eval_source, config_field="data.eval_source", **read)
        left_out.append(held_out)
        eval_documents = held_out.documents
    elif cfg.eval_documents > 0:
        if len(documents) <= cfg.eval_documents:
            raise ConfigError(
                f"data.source has {len(documents)} document(s); holding out data.eval_documents="
                f"{cfg.eval_documents} leaves none to train on (give data.eval_source or lower eval_documents)"
            )
        documents, eval_documents = documents[: -cfg.eval_documents], documents[-cfg.eval_documents :]
    else:
        eval_documents = []
    train_corpus = build_corpus(documents, tokenizer, cache_dir=cfg.cache_dir, num_proc=cfg.num_proc)
    train = PackedSequences(train_corpus, cfg.seq_len)
    if len(train) == 0:
        raise ConfigError(
            f"data.source has {len(train_corpus.tokens)} tokens, too few for one sequence of data.seq_len={cfg.seq_len}"
        )
    evaluation = None
    if eval_documents:
        eval_corpus = build_corpus(eval_documents, tokenizer, cache_dir=cfg.cache_dir, num_proc=cfg.num_proc)
        evaluation = DocumentWindows(eval_corpus, eval_len, cfg.max_eval_sequences)
        if len(evaluation) == 0:
            longest = int(np.diff(eval_corpus.doc_starts).max())
            raise ConfigError(
                f"no evaluation document reaches {eval_len} tokens (the longest has {longest}); "
                "lower data.eval_seq_len or give longer evaluation text"
            )
    return DataBundle(
        train=train,
        eval=evaluation,
        skipped_files=[f for part in left_out for f in part.skipped_files],
        skipped_rows=sum(part.skipped_rows for part in left_out),
        skipped_row_examples=[r for part in left_out for r in part.skipped_row_examples][:EXAMPLES_NAMED],
    )


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
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ConfigError(
                f"checkpoint was written for {state['size']} training sequences (seed {state['seed']}); this run has "
                f"{self.size} (seed {self.seed}): the data or trainer.seed changed, so resuming would not be exact"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items' tensors (`input_ids`, `position_ids`: `[L]` each) into a batch: `[len(items), L]`."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
