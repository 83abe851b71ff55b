"""Token sequences of a fixed length, documents packed back to back with their boundaries kept.

Every item is a dict of `[seq_len]` tensors:
- `input_ids` (int64);
- `labels` (int64): the target of each position before the model's shift, -100 where no loss is taken (text:
  the input ids themselves; chat: the assistant's tokens only; padding: -100);
- `position_ids` (int64): restarting at 0 at every document start inside the sequence (and at its first token);
- `document_ids` (int32): 0, 1, ... per document inside the sequence; padding gets an id of its own.

Text (`PackedSequences`) is one stream of tokens (EOS after every document) cut every `seq_len` tokens, so a long
document continues in the next sequence. Conversations (`PackedConversations`) are never split: each sequence
holds whole conversations, in order, and is padded after the last one that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class TokenizedCorpus:
    """All documents' tokens end to end.

    Attributes:
        tokens: int32 [N], the concatenation (text: each document followed by EOS).
        doc_starts: int64 [n_docs + 1], offsets of each document in `tokens` (last entry = N).
        loss_mask: bool [N] marking the target tokens (chat: the assistant's), or None when every token is one.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    loss_mask: Optional[np.ndarray] = None

    @property
    def num_documents(self) -> int:
        """Documents in the corpus."""
        return len(self.doc_starts) - 1

    def document(self, i: int) -> np.ndarray:
        """The token ids of document `i`: `[length]`."""
        return self.tokens[self.doc_starts[i] : self.doc_starts[i + 1]]

    def document_mask(self, i: int) -> Optional[np.ndarray]:
        """The target mask of document `i`, or None when every token is a target."""
        return None if self.loss_mask is None else self.loss_mask[self.doc_starts[i] : self.doc_starts[i + 1]]


def make_item(pieces: list[tuple[np.ndarray, Optional[np.ndarray]]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One sequence from consecutive pieces, each the tokens of one document (or of the part of one that falls in
    this sequence), padded to `seq_len`.

    Args:
        pieces: `(token ids, target mask or None)` per document, in order; at most `seq_len` tokens in all.
        seq_len: The sequence length.
        pad_id: The id that fills the rest.

    Returns:
        The item (see the module docstring).
    """
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    documents = np.zeros(seq_len, dtype=np.int32)
    at = 0
    for number, (piece, mask) in enumerate(pieces):
        end = at + len(piece)
        ids[at:end] = piece
        labels[at:end] = piece if mask is None else np.where(mask, piece, IGNORE_INDEX)
        positions[at:end] = np.arange(len(piece))
        documents[at:end] = number
        at = end
    if at < seq_len:
        positions[at:] = np.arange(seq_len - at)
        documents[at:] = len(pieces)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "document_ids": torch.from_numpy(documents),
    }


class PackedSequences(torch.utils.data.Dataset):
    """Fixed-length windows over a tokenised text corpus, documents packed back to back (the remainder at the end
    of the corpus is dropped). Every token is a target."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len
        self.num_sequences = len(corpus.tokens) // seq_len

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, end = index * self.seq_len, (index + 1) * self.seq_len
        starts = self.corpus.doc_starts
        # Document starts that fall strictly inside this window cut it into pieces.
        cuts = [start, *(int(s) for s in starts[(starts > start) & (starts < end)]), end]
        tokens = self.corpus.tokens
        pieces = [(np.asarray(tokens[a:b]), None) for a, b in zip(cuts[:-1], cuts[1:])]
        return make_item(pieces, self.seq_len, pad_id=0)


class DocumentWindows(torch.utils.data.Dataset):
    """Evaluation windows of `seq_len` tokens cut from inside single text documents (never across them).

    Documents shorter than `seq_len` give no window; the remainder at the end of a document is dropped.
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, max_windows: int = 0):
        self.corpus, self.seq_len = corpus, seq_len
        self.windows: list[int] = []
        for i in range(corpus.num_documents):
            start, end = int(corpus.doc_starts[i]), int(corpus.doc_starts[i + 1])
            for offset in range(start, end - seq_len + 1, seq_len):
                self.windows.append(offset)
        self.windows = spread(self.windows, max_windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.windows[index]
        return make_item([(np.asarray(self.corpus.tokens[start : start + self.seq_len]), None)], self.seq_len, pad_id=0)


def spread(items: list, keep: int) -> list:
    """At most `keep` of `items` (0: all), spread evenly over them rather than the first ones."""
    if keep <= 0 or len(items) <= keep:
        return items
    chosen = np.linspace(0, len(items) - 1, keep).round().astype(int)
    return [items[k] for k in chosen]


def greedy_groups(lengths: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """`(first, end)` document ranges, in order, each as many whole documents as fit in `seq_len` tokens.

    Args:
        lengths: Each document's length (none longer than `seq_len`).
        seq_len: The sequence length.

    Returns:
        The ranges, covering every document.
    """
    groups, first, used = [], 0, 0
    for i, n in enumerate(int(x) for x in lengths):
        if used + n > seq_len and i > first:
            groups.append((first, i))
            first, used = i, 0
        used += n
    if len(lengths):
        groups.append((first, len(lengths)))
    return groups


class PackedConversations(torch.utils.data.Dataset):
    """Sequences of whole conversations (a chat corpus, each conversation at most `seq_len` tokens), packed in
    order and padded; only the masked (assistant) tokens are targets.

    Args:
        corpus: A corpus with a `loss_mask`.
        seq_len: The sequence length.
        pad_id: The padding token.
        max_sequences: Keep at most this many sequences, spread over all (0: all); for evaluation.
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, pad_id: int, max_sequences: int = 0):
        self.corpus, self.seq_len, self.pad_id = corpus, seq_len, pad_id
        self.groups = spread(greedy_groups(np.diff(corpus.doc_starts), seq_len), max_sequences)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        first, end = self.groups[index]
        pieces = [(np.asarray(self.corpus.document(i)), self.corpus.document_mask(i)) for i in range(first, end)]
        return make_item(pieces, self.seq_len, self.pad_id)
