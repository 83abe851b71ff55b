"""Training data read, tokenised and packed on the fly (`data.streaming: true`), in bounded memory, resumable
exactly.

Documents come in a deterministic order:
- a local file or folder (`FileDocuments`): the files (sorted, `data.file_glob`) in a permutation drawn from the
  seed for every epoch, each file's rows in order. A position is (epoch, file in that order, row). Files that are
  not text are checked when read: under `data.invalid_files=skip` each is left out with a warning the first time,
  under `error` every file is checked before training starts, so a run never stops halfway for it.
- a hub dataset or `datasets` builder (`HubDocuments`): `load_dataset(..., streaming=True)` in the dataset's own
  order every epoch; a position is (epoch, the `IterableDataset.state_dict()` before the row).
Text documents are tokenised with EOS after each and cut into sequences of `data.seq_len` tokens across document
boundaries, as in memory; conversations are encoded through the chat template and packed whole, padded
(`seer_finetune.packing`). Sequences are drawn `data.shuffle_buffer` at a time and served in a permutation drawn
from (seed, block number).

What a checkpoint holds (the trainer's `sampler`): the position where the current block's first sequence starts
(a document position and a token offset into it), the block number and how many of its sequences were served.
A resume re-reads the block from there, so it is exact and the state is a few numbers, not tokens. Memory holds
one block of sequences and the documents being packed (a single document is read whole: the largest file bounds
the memory, not the corpus).

Held out for evaluation (without `data.eval_source`): the last `data.eval_documents` documents of a local source
(as in memory), or the first ones of a hub stream (whose end is unknown); they are read whole and never streamed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .chat import ChatEncoder
from .config import ConfigError, DataConfig
from .packing import make_item
from .sources import FileReader, RowSchema, check_local_source, load_hub, resolve_source, source_files, warn


def _copy(state: Any) -> Any:
    return json.loads(json.dumps(state))


class FileDocuments:
    """The documents of a local source's files in a seeded order of files per epoch.

    Args:
        files: The files, sorted.
        reader: Reads a file under the schema and `data.invalid_files`; what it leaves out is reported once.
        limits: File index -> rows of it that train (the rest are held out for evaluation).
        root: The source's folder (or file): files are fingerprinted by their path under it, so a run folder and
            corpus moved together still resume.
    """

    def __init__(self, files: list[Path], reader: FileReader, limits: dict[int, int], root: Path):
        self.files, self.reader, self.limits, self.root = files, reader, limits, root
        self.seed = 0
        self._fingerprint: str | None = None
        # Files read once already: what they leave out was reported then (and those held out partly for evaluation).
        self._seen: set[int] = set(limits)
        self._quiet = FileReader(reader.config_field, reader.schema, reader.policy)

    def fingerprint(self) -> str:
        """A hash of the file names, sizes and held-out rows, taken once: a resume over changed files is refused."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for path in self.files:
                name = path.relative_to(self.root).as_posix() if path != self.root else path.name
                h.update(f"{name}\0{path.stat().st_size if path.exists() else -1}\n".encode())
            h.update(json.dumps(sorted(self.limits.items())).encode())
            self._fingerprint = h.hexdigest()[:24]
        return self._fingerprint

    def first_position(self) -> dict[str, int]:
        """The position of the first document of epoch 0."""
        return {"epoch": 0, "file": 0, "row": 0}

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.files), generator=g).tolist()

    def _read(self, index: int) -> list:
        """The training documents of file `index`; left-out files and rows are reported on the first read."""
        first = index not in self._seen
        reader = self.reader if first else self._quiet
        before = len(reader.out.skipped_files), reader.out.skipped_rows
        documents = reader.file_documents(self.files[index])
        if first:
            self._seen.add(index)
            for skipped in reader.out.skipped_files[before[0] :]:
                warn(f"{reader.config_field}: skipped {skipped.path} ({skipped.reason}; data.invalid_files=skip)")
            if reader.out.skipped_rows > before[1]:
                warn(f"{reader.config_field}: skipped {reader.out.skipped_rows - before[1]} row(s) of {self.files[index]} {reader.schema.invalid_rows}")
        return documents[: self.limits[index]] if index in self.limits else documents

    def documents(self, position: dict[str, int]) -> Iterator[tuple[dict[str, int], Any]]:
        """`(position, document)` from `position` on, epoch after epoch.

        Raises:
            ConfigError: a whole epoch without a document.
        """
        epoch, first_file, first_row = position["epoch"], position["file"], position["row"]
        while True:
            whole_epoch, found = first_file == 0 and first_row == 0, False
            order = self._order(epoch)
            for k in range(first_file, len(order)):
                docs = self._read(order[k])
                for r in range(first_row if k == first_file else 0, len(docs)):
                    found = True
                    yield {"epoch": epoch, "file": k, "row": r}, docs[r]
            if whole_epoch and not found:
                raise ConfigError(f"{self.reader.config_field}: the streamed source holds no {self._what()}")
            epoch, first_file, first_row = epoch + 1, 0, 0

    def _what(self) -> str:
        return "text" if self.reader.schema.text_files else f"{self.reader.schema.what} rows"


class HubDocuments:
    """The documents of a streamed hub dataset, in its own order every epoch.

    Args:
        open_dataset: Returns a fresh `IterableDataset` (held-out rows already skipped).
        reader: Converts rows under the schema and `data.invalid_files`.
        name: The source, for messages and the fingerprint.
    """

    def __init__(self, open_dataset: Callable[[], Any], reader: FileReader, name: str):
        self.open_dataset, self.reader, self.name = open_dataset, reader, name
        self.seed = 0

    def fingerprint(self) -> str:
        """The source's name and settings (a streamed dataset has no cheap content hash)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:24]

    def first_position(self) -> dict[str, Any]:
        """The position of the first row of epoch 0."""
        return {"epoch": 0, "state": None}

    def documents(self, position: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Any]]:
        """`(position, document)` from `position` on, epoch after epoch.

        Raises:
            ConfigError: a whole epoch without a document.
        """
        epoch, state = position["epoch"], position["state"]
        while True:
            dataset = self.open_dataset()
            whole_epoch, found = state is None, False
            if state is not None:
                dataset.load_state_dict(_copy(state))
            counting = epoch == 0
            reader = self.reader if counting else FileReader(self.reader.config_field, self.reader.schema, self.reader.policy)
            for number, row in enumerate(dataset, start=1):
                for document in reader.rows([row], lambda _: f"{self.name}:row {number}"):
                    found = True
                    yield {"epoch": epoch, "state": state}, document
                # The state after this row is the position of the next one.
                state = _copy(dataset.state_dict())
            if whole_epoch and not found:
                raise ConfigError(f"{self.reader.config_field}: the streamed dataset {self.name!r} holds no documents")
            epoch, state = epoch + 1, None


class StreamingSequences:
    """Packed training sequences from a document stream, served in shuffled blocks (see the module docstring).

    Args:
        source: `FileDocuments` or `HubDocuments`.
        seq_len: Tokens per sequence.
        block: Sequences shuffled together (`data.shuffle_buffer`).
        tokenizer: The model's tokenizer (text: ids plus EOS per document).
        encoder: A `chat.ChatEncoder` for conversations, or None for text.
        pad_id: The padding token (conversations).
    """

    def __init__(self, source, seq_len: int, block: int, tokenizer, encoder: ChatEncoder | None, pad_id: int):
        self.source, self.seq_len, self.block, self.tokenizer, self.encoder, self.pad_id = source, seq_len, block, tokenizer, encoder, pad_id
        self.seed = 0
        self.truncated = self.dropped = 0
        self._items: list[dict[str, torch.Tensor]] = []
        self._order: list[int] = []
        self._block_index, self._served, self._block_start = 0, 0, None
        self._sequences: Iterator | None = None
        # (start, block, served) to open at the next draw: a resume replaces it before anything is read.
        self._pending: tuple[dict, int, int] | None = None

    # -- documents to sequences -------------------------------------------------------------------

    def _encode(self, position: dict, document) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(ids, target mask or None) of a document; None for a conversation left out. Conversations cut or left out
        are counted in the first epoch only (later epochs meet the same ones)."""
        if self.encoder is None:
            ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
            return np.asarray([*ids, self.tokenizer.eos_token_id], dtype=np.int32), None
        counts = self.encoder.truncated, self.encoder.dropped
        encoded = self.encoder.encode(document)
        if position["epoch"] == 0:
            self.truncated += self.encoder.truncated - counts[0]
            self.dropped += self.encoder.dropped - counts[1]
        return encoded

    def _text_sequences(self, start: dict) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        documents = self.source.documents(start["doc"])
        position, document = next(documents)
        ids, offset = self._encode(position, document)[0], start["offset"]
        while True:
            while offset >= len(ids):
                position, document = next(documents)
                ids, offset = self._encode(position, document)[0], 0
            sequence_start, pieces, need = {"doc": position, "offset": offset}, [], self.seq_len
            while need > 0:
                if offset >= len(ids):
                    position, document = next(documents)
                    ids, offset = self._encode(position, document)[0], 0
                take = min(need, len(ids) - offset)
                pieces.append((ids[offset : offset + take], None))
                offset, need = offset + take, need - take
            yield sequence_start, make_item(pieces, self.seq_len, self.pad_id)

    def _chat_sequences(self, start: dict) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        documents = self.source.documents(start["doc"])
        pending, last_kept_epoch = None, start["doc"]["epoch"]
        while True:
            group, used, sequence_start = [], 0, None
            while True:
                if pending is None:
                    position, document = next(documents)
                    encoded = self._encode(position, document)
                    if encoded is None:
                        if position["epoch"] > last_kept_epoch + 1:
                            raise ConfigError(
                                f"no conversation of the stream fits data.seq_len={self.seq_len} (see data.chat_overflow)"
                            )
                        continue
                    pending, last_kept_epoch = (position, encoded), position["epoch"]
                position, encoded = pending
                if group and used + len(encoded[0]) > self.seq_len:
                    break
                if not group:
                    sequence_start = {"doc": position, "offset": 0}
                group.append(encoded)
                used, pending = used + len(encoded[0]), None
            yield sequence_start, make_item(group, self.seq_len, self.pad_id)

    # -- blocks -----------------------------------------------------------------------------------

    def _open(self) -> None:
        start, block_index, served = self._pending
        self._pending = None
        self._sequences = (self._chat_sequences if self.encoder is not None else self._text_sequences)(start)
        self._fill(block_index)
        self._served = served

    def _fill(self, block_index: int) -> None:
        entries = [next(self._sequences) for _ in range(self.block)]
        self._block_start = _copy(entries[0][0])
        self._items = [item for _, item in entries]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + block_index)
        self._order = torch.randperm(self.block, generator=g).tolist()
        self._block_index, self._served = block_index, 0

    def start(self, seed: int) -> None:
        """Start at the beginning of the stream, with `seed` for the order of files and of each block.

        Args:
            seed: `trainer.seed`.
        """
        self.seed = self.source.seed = seed
        self._pending = ({"doc": self.source.first_position(), "offset": 0}, 0, 0)

    def next_items(self, count: int, keep: slice | None = None) -> list[dict[str, torch.Tensor]]:
        """The next `count` sequences (those in `keep` returned; the stream moves by `count`)."""
        if self._pending is not None:
            self._open()
        out = []
        for _ in range(count):
            if self._served >= self.block:
                self._fill(self._block_index + 1)
            out.append(self._items[self._order[self._served]])
            self._served += 1
        return out[keep] if keep is not None else out

    def _identity(self) -> dict[str, Any]:
        return {
            "source": self.source.fingerprint(),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shuffle_buffer": self.block,
            "format": "chat" if self.encoder is not None else "text",
        }

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, for a checkpoint: `{"stream": {block, start, served, ...identity}}`."""
        if self._pending is not None:
            start, block_index, served = self._pending
        else:
            start, block_index, served = self._block_start, self._block_index, self._served
        return {"stream": {"block": block_index, "start": _copy(start), "served": served, **self._identity()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly from `state_dict`'s position (re-reading the current block from its start).

        Raises:
            ConfigError: a checkpoint of a run that did not stream, or of another stream (other files, seed,
                lengths or shuffle buffer).
        """
        if "stream" not in state:
            raise ConfigError("the checkpoint was written by a run that read its data whole; this run streams it (data.streaming)")
        saved = state["stream"]
        changed = [k for k, v in self._identity().items() if saved.get(k) != v]
        if changed:
            raise ConfigError(
                f"the checkpoint's data stream differs from this run's in {', '.join(changed)} (the source's files "
                "changed, or the settings): resuming would not be exact"
            )
        self._pending = (_copy(saved["start"]), saved["block"], saved["served"])

    def left_out(self) -> dict[str, Any]:
        """What the stream left out so far: files and rows (first reads only), conversations cut or dropped
        (first epoch only)."""
        out = self.source.reader.out
        return {
            "skipped_files": list(out.skipped_files),
            "skipped_rows": out.skipped_rows,
            "skipped_row_examples": list(out.skipped_row_examples),
            "truncated": self.truncated,
            "dropped": self.dropped,
        }


def _hold_out_files(files: list[Path], reader: FileReader, count: int) -> tuple[list, dict[int, int], int]:
    """(the last `count` documents of the files, rows kept per file for training, files that train): files that
    are not text are passed over, so the held-out documents are real ones."""
    held: list = []
    for index in range(len(files) - 1, -1, -1):
        documents = reader.file_documents(files[index])
        need = count - len(held)
        if len(documents) > need:
            return documents[len(documents) - need :] + held, {index: len(documents) - need}, index + 1
        held = documents + held
        if len(held) == count:
            return held, {}, index
    raise ConfigError(
        f"data.source has {len(held)} document(s); holding out data.eval_documents={count} leaves none to train on "
        "(give data.eval_source or lower eval_documents)"
    )


def open_stream(cfg: DataConfig, tokenizer, pad_id: int, schema: RowSchema, hold_out: bool) -> tuple[StreamingSequences, list]:
    """The training stream of `cfg.source`, and the documents held out of it for evaluation.

    Args:
        cfg: The data section (`streaming: true`).
        tokenizer: The model's tokenizer.
        pad_id: The padding token.
        schema: How table rows become documents (`data.format`).
        hold_out: Hold out `cfg.eval_documents` documents (no `data.eval_source`).

    Returns:
        `(stream, held-out documents)`; the stream starts when the trainer calls `start(seed)`.

    Raises:
        ConfigError: missing path, no documents, a file that is not text under `data.invalid_files=error`.
    """
    encoder = ChatEncoder(tokenizer, cfg.seq_len, cfg.chat_overflow) if cfg.format == "chat" else None
    resolved = resolve_source(cfg.source)
    check_local_source(resolved, cfg.source, cfg.hub_config, cfg.data_files, "data.source")
    reader = FileReader("data.source", schema, cfg.invalid_files)
    held: list = []
    count = cfg.eval_documents if hold_out else 0
    if isinstance(resolved, Path):
        files = source_files(resolved, cfg.file_glob) if resolved.is_dir() else [resolved]
        if cfg.invalid_files == "error":
            for path in files:
                reader.file_documents(path)
        limits: dict[int, int] = {}
        if count > 0:
            held, limits, training = _hold_out_files(files, reader, count)
            files = files[:training]
            for skipped in reader.out.skipped_files:
                warn(f"data.source: skipped {skipped.path} ({skipped.reason}; data.invalid_files=skip)")
        if not files:
            raise ConfigError(f"data source {cfg.source!r} holds no files (data.file_glob={cfg.file_glob!r})")
        source = FileDocuments(files, reader, limits, resolved)
    else:
        settings = dict(split=cfg.split, hub_config=cfg.hub_config, data_files=cfg.data_files, streaming=True)
        skip = 0
        if count > 0:
            for row in load_hub(resolved, **settings):
                skip += 1
                held += reader.rows([row], lambda _: f"{resolved}:row {skip}")
                if len(held) == count:
                    break
            if len(held) < count:
                raise ConfigError(f"data.source {resolved!r} has fewer than data.eval_documents={count} documents to hold out")

        def open_dataset():
            dataset = load_hub(resolved, **settings)
            return dataset.skip(skip) if skip else dataset

        name = json.dumps([resolved, cfg.hub_config, cfg.split, cfg.data_files, skip])
        source = HubDocuments(open_dataset, reader, name)
    return StreamingSequences(source, cfg.seq_len, cfg.shuffle_buffer, tokenizer, encoder, pad_id), held
