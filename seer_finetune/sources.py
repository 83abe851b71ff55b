"""Reading text sources: a Hugging Face dataset name, a local .txt / .jsonl / .json / .parquet file, a directory
of them (each text file is one document), or `builtin:<name>` (a corpus shipped in the repo).

Files are read as bytes and checked before they become documents: a file with NUL bytes (a binary, UTF-16) or
with more invalid UTF-8 than `INVALID_UTF8_TOLERANCE` (another encoding) is not text, and neither is a table row
whose text field is not a string. `data.invalid_files` says whether such files and rows are left out, with a
warning naming them (`skip`), or refused in one line (`error`); what was left out is returned with the documents.
Tables are parsed here, so a malformed line is reported by file and line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
TEXT_SUFFIXES = {".txt", ".md", ".text"}
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet"}


def resolve_source(source: str) -> Path | str:
    """A local path (checked to exist) or a hub dataset name.

    `builtin:NAME` maps to the shipped corpus; anything that looks like a path (absolute, `./`, `~`, or with
    a file suffix) must exist, so a typo gives a clear error instead of a hub lookup.
    """
    if source.startswith("builtin:"):
        path = ASSETS / "corpus" / source.split(":", 1)[1]
        if not path.is_dir():
            available = ", ".join(sorted(p.name for p in (ASSETS / "corpus").iterdir()))
            raise ConfigError(f"data.source={source!r}: no such built-in corpus (available: {available})")
        return path
    path = Path(source).expanduser()
    if path.exists():
        return path
    looks_local = source.startswith(("/", "./", "../", "~")) or path.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES
    if looks_local or source.count("/") > 1:
        raise ConfigError(f"data path does not exist: {source}")
    return source


# Share of a file's bytes that may be invalid UTF-8 before the file counts as not text: a stray byte in a long
# text is read as U+FFFD, a file in another encoding (or a binary) is skipped or refused.
INVALID_UTF8_TOLERANCE = 0.001
INVALID_FILE_POLICIES = ("skip", "error")
EXAMPLES_NAMED = 20  # skipped files or rows named in warnings and summaries


@dataclass
class SkippedFile:
    """A data file left out because it is not text.

    Attributes:
        path: The file.
        reason: Why, e.g. "NUL bytes" or "invalid UTF-8: 4.2% of bytes".
        config_field: The field whose source held it (`data.source` or `data.eval_source`).
    """

    path: str
    reason: str
    config_field: str = "data.source"


@dataclass
class SourceDocuments:
    """The documents of one source and what was left out of them.

    Attributes:
        documents: The texts, in file order.
        skipped_files: Files that are not text.
        skipped_rows: How many table rows had a text field that is not a string.
        skipped_row_examples: `file:line` (or `file:row N`) of the first of those rows.
    """

    documents: list[str]
    skipped_files: list[SkippedFile]
    skipped_rows: int = 0
    skipped_row_examples: list[str] = field(default_factory=list)


class _Reader:
    """Reads the files of one source under the `data.invalid_files` policy, collecting what it leaves out."""

    def __init__(self, config_field: str, text_field: str, policy: str):
        if policy not in INVALID_FILE_POLICIES:
            raise ConfigError(f"data.invalid_files={policy!r} is not one of {', '.join(INVALID_FILE_POLICIES)}")
        self.config_field, self.text_field, self.policy = config_field, text_field, policy
        self.out = SourceDocuments([], [])

    def text_file(self, path: Path) -> str | None:
        """The file's text (newlines normalised as text mode reads them), or None when it is not text."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.config_field}: cannot read {path} ({exc.strerror or exc})") from None
        text, problem = decode_text(data)
        if text is None:
            if self.policy == "error":
                raise ConfigError(
                    f"{self.config_field}: {path} is not text ({problem}); remove it, narrow data.file_glob, or set "
                    "data.invalid_files=skip to leave such files out with a warning"
                )
            self.out.skipped_files.append(SkippedFile(str(path), problem, self.config_field))
            return None
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def rows(self, values: list, place: Callable[[int], str]) -> list[str]:
        """The non-empty strings of a text column; `place(i)` names row i in messages. Empty and null values are
        blank rows; any other value (a number, a list, a string holding NUL) is an invalid row."""
        texts = []
        for i, value in enumerate(values):
            if isinstance(value, str) and "\x00" not in value:
                if value:
                    texts.append(value)
                continue
            if value is None:
                continue
            kind = "a string holding NUL characters" if isinstance(value, str) else _article(type(value).__name__)
            if self.policy == "error":
                raise ConfigError(
                    f"{place(i)}: data.text_field {self.text_field!r} is {kind}, not a string; fix the row, or set "
                    "data.invalid_files=skip to leave such rows out with a warning"
                )
            self.out.skipped_rows += 1
            if len(self.out.skipped_row_examples) < EXAMPLES_NAMED:
                self.out.skipped_row_examples.append(f"{place(i)} ({kind})")
        return texts

    def table(self, path: Path) -> list[str]:
        """The documents of a jsonl / json / parquet file."""
        if path.suffix == ".parquet":
            return self._parquet(path)
        text = self.text_file(path)
        if text is None:
            return []
        place, values, columns = _json_records(path, text, self.text_field)
        if not columns:
            return []
        if self.text_field not in columns:
            raise ConfigError(
                f"{path}: no text field {self.text_field!r} (columns: {', '.join(sorted(columns))}); set data.text_field"
            )
        return self.rows(values, place)

    def _parquet(self, path: Path) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            if self.text_field not in names:
                raise ConfigError(f"{path}: no text field {self.text_field!r} (columns: {', '.join(names)}); set data.text_field")
            values = pq.read_table(path, columns=[self.text_field]).column(self.text_field).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        return self.rows(values, lambda i: f"{path}:row {i + 1}")


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """The text of a file's bytes, or why they are not text.

    Args:
        data: The file's bytes.

    Returns:
        `(text, None)` for UTF-8 (a few stray bytes, at most `INVALID_UTF8_TOLERANCE` of them, read as U+FFFD), or
        `(None, reason)`: "NUL bytes" (binaries, UTF-16), or "invalid UTF-8: x% of bytes" (another encoding, such
        as latin-1).
    """
    if b"\x00" in data:
        return None, "NUL bytes"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    # The bytes that are not part of valid UTF-8 are those a lenient decode drops.
    invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
    if invalid > INVALID_UTF8_TOLERANCE * len(data):
        return None, f"invalid UTF-8: {100 * invalid / len(data):.1f}% of bytes"
    return data.decode("utf-8", errors="replace"), None


def _json_records(path: Path, text: str, text_field: str) -> tuple[Callable[[int], str], list, set[str]]:
    """(a function naming record i by file and line, each record's text field value or None, every field seen) of
    a JSON-lines file, or of a JSON file holding one array (of objects, or of plain strings) or one object.

    Raises:
        ConfigError: naming the file and line of the first line that is not valid JSON, or not an object.
    """
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        place = lambda i: f"{path}:item {i + 1}"  # noqa: E731
        if all(isinstance(item, str) for item in records):
            return place, records, {text_field} if records else set()
    else:
        records, lines = [], []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if records:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                # Not JSON lines from the first record on: one (pretty-printed) object, whose own error says more.
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError as whole_exc:
                    exc = whole_exc if whole_exc.lineno > number else exc
                    raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                records, lines = [whole], [number]
                break
            lines.append(number)
        place = lambda i: f"{path}:{lines[i]}"  # noqa: E731
    columns: set[str] = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(f"{place(i)}: expected a JSON object with a {text_field!r} field, got {_article(type(record).__name__)}")
        columns.update(record)
    return place, [r.get(text_field) for r in records], columns


def read_source(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    file_glob: str = "**/*",
    invalid_files: str = "skip",
    config_field: str = "data.source",
) -> SourceDocuments:
    """Read every document of a source, leaving out (or refusing) files that are not text.

    Args:
        source: See the module docstring.
        text_field: Column with the text for tables and hub datasets. Default "text".
        split: Split of a hub dataset. Default "train".
        file_glob: Files considered inside a directory. Default all files, recursively.
        invalid_files: `skip` (leave out, with a warning naming them) or `error` (refuse in one line) files that
            are not text (`decode_text`) and table rows whose text is not a string.
        config_field: The field that named the source, for messages.

    Returns:
        The documents, and the files and rows left out (also printed as a warning).

    Raises:
        ConfigError: missing path, missing text field, a malformed table (naming file and line), a file that is
            not text under `error`, or no text at all.
    """
    resolved = resolve_source(source)
    reader = _Reader(config_field, text_field, invalid_files)
    documents = reader.out.documents
    if isinstance(resolved, str):
        import datasets

        try:
            table = datasets.load_dataset(resolved, split=split)
        except Exception as exc:  # hub errors come in many types; the user needs one line
            raise ConfigError(f"cannot load dataset {source!r} (split {split!r}): {str(exc).splitlines()[0]}") from None
        if text_field not in table.column_names:
            raise ConfigError(
                f"dataset {source!r}: no text field {text_field!r} (columns: {', '.join(table.column_names)})"
            )
        values = table[text_field]
        documents.extend(reader.rows(values, lambda i: f"{source}:row {i + 1}"))
    elif resolved.is_dir():
        # Every file is one document (source code, proofs and books alike); tables hold many documents.
        try:
            files = sorted(p for p in resolved.glob(file_glob) if p.is_file() and not p.name.startswith("."))
        except (ValueError, NotImplementedError) as exc:
            raise ConfigError(f"data.file_glob={file_glob!r}: {exc}") from None
        for path in files:
            if path.suffix in TABLE_SUFFIXES:
                documents.extend(reader.table(path))
            else:
                text = reader.text_file(path)
                if text is not None and text.strip():
                    documents.append(text)
    elif resolved.suffix in TABLE_SUFFIXES:
        documents.extend(reader.table(resolved))
    else:
        text = reader.text_file(resolved)
        if text is not None and text.strip():
            documents.append(text)
    out = reader.out
    left_out = _left_out(out)
    if not documents:
        raise ConfigError(f"data source {source!r} holds no text" + (f" (skipped {left_out})" if left_out else ""))
    if left_out:
        _warn_left_out(out, config_field)
    return out


def _left_out(out: SourceDocuments) -> str:
    """'2 files that are not text: a (NUL bytes), b (...); 3 rows ...' or ''."""
    parts = []
    if out.skipped_files:
        n = len(out.skipped_files)
        named = ", ".join(f"{s.path} ({s.reason})" for s in out.skipped_files[:3])
        parts.append(f"{n} file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not text: {named}" + (", ..." if n > 3 else ""))
    if out.skipped_rows:
        named = ", ".join(out.skipped_row_examples[:3])
        parts.append(f"{out.skipped_rows} row(s) whose text is not a string: {named}" + (", ..." if out.skipped_rows > 3 else ""))
    return "; ".join(parts)


def _warn_left_out(out: SourceDocuments, config_field: str) -> None:
    say = lambda text: print(f"[seer-finetune] warning: {text}", file=sys.stderr, flush=True)
    if out.skipped_files:
        say(
            f"{config_field}: skipped {len(out.skipped_files)} file(s) that are not text (data.invalid_files=skip; "
            "set data.invalid_files=error to refuse them):"
        )
        for skipped in out.skipped_files[:EXAMPLES_NAMED]:
            say(f"  {skipped.path}: {skipped.reason}")
        if len(out.skipped_files) > EXAMPLES_NAMED:
            say(f"  ... and {len(out.skipped_files) - EXAMPLES_NAMED} more")
    if out.skipped_rows:
        say(
            f"{config_field}: skipped {out.skipped_rows} row(s) whose data.text_field is not a string, e.g. "
            + ", ".join(out.skipped_row_examples[:5])
        )


def load_documents(
    source: str, *, text_field: str = "text", split: str = "train", file_glob: str = "**/*", invalid_files: str = "skip"
) -> list[str]:
    """Read every document of a source as a list of strings (`read_source` without the report).

    Args:
        source: See the module docstring.
        text_field: Column with the text for tables and hub datasets. Default "text".
        split: Split of a hub dataset. Default "train".
        file_glob: Files considered inside a directory. Default all files, recursively.
        invalid_files: `skip` or `error` for files that are not text (see `read_source`).

    Returns:
        The documents.

    Raises:
        ConfigError: missing path, missing text field, malformed table, or no text at all.
    """
    return read_source(source, text_field=text_field, split=split, file_glob=file_glob, invalid_files=invalid_files).documents
