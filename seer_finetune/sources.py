"""Reading sources: a Hugging Face dataset name (with a configuration name and `data_files`, or a `datasets`
builder such as `json` with `data_files`), a local .txt / .jsonl / .json / .parquet file, a directory of them (each
text file is one document), or `builtin:<name>` (a corpus shipped in the repo).

A table row becomes a document through a `RowSchema`: a text column (`text_rows`), or a conversation
(`seer_finetune.chat.chat_rows`). Files are read as bytes and checked before they become documents: a file with
NUL bytes (a binary, UTF-16) or with more invalid UTF-8 than `INVALID_UTF8_TOLERANCE` (another encoding) is not
text, and neither is a table row that the schema refuses (a text field that is not a string). `data.invalid_files`
says whether such files and rows are left out, with a warning naming them (`skip`), or refused in one line
(`error`); what was left out is returned with the documents. Tables are parsed here, so a malformed line is
reported by file and line. `FileReader` reads one file at a time, for sources that are streamed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
        documents: The documents (texts, or conversations under a chat schema), in file order.
        skipped_files: Files that are not text.
        skipped_rows: How many table rows the schema refused (a text field that is not a string, ...).
        skipped_row_examples: `file:line` (or `file:row N`) of the first of those rows, with the problem.
    """

    documents: list
    skipped_files: list[SkippedFile]
    skipped_rows: int = 0
    skipped_row_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RowSchema:
    """What a table row holds and how it becomes a document.

    Attributes:
        fields: Columns a table must have; the first is named in messages.
        convert: A row (dict) -> `(document, None)`, `(None, None)` for a blank row, or `(None, problem)` for a row
            to leave out or refuse, the problem phrased like "data.text_field 'text' is an int, not a string".
        what: The columns' description in a missing-column message, e.g. "text field".
        hint: The setting that names them, e.g. "set data.text_field".
        invalid_rows: How refused rows are described in warnings, e.g. "whose text is not a string".
        optional: Columns read when present.
        strings: Whether a JSON array of plain strings holds documents.
        text_files: Whether a plain text file is one document (else it is left out like a file that is not text).
    """

    fields: tuple[str, ...]
    convert: Callable[[dict], tuple[Any, str | None]]
    what: str
    hint: str
    invalid_rows: str
    optional: tuple[str, ...] = ()
    strings: bool = False
    text_files: bool = True

    @property
    def columns(self) -> list[str]:
        """The columns to read: required ones, then optional ones."""
        return [*self.fields, *(c for c in self.optional if c not in self.fields)]

    def missing(self, where: str, columns) -> ConfigError | None:
        """The error for a table (named `where`) whose `columns` lack a required field, or None."""
        absent = [f for f in self.fields if f not in columns]
        if not absent:
            return None
        return ConfigError(
            f"{where}: no {self.what} {', '.join(map(repr, absent))} (columns: {', '.join(sorted(map(str, columns)))}); {self.hint}"
        )


def text_rows(text_field: str = "text") -> RowSchema:
    """Rows whose `text_field` holds a document: strings are documents, empty and null values blank rows, any other
    value (a number, a list, a string holding NUL) an invalid row.

    Args:
        text_field: The column. Default "text".

    Returns:
        The schema.
    """

    def convert(row: dict) -> tuple[Any, str | None]:
        value = row.get(text_field)
        if isinstance(value, str) and "\x00" not in value:
            return (value or None), None
        if value is None:
            return None, None
        kind = "a string holding NUL characters" if isinstance(value, str) else _article(type(value).__name__)
        return None, f"data.text_field {text_field!r} is {kind}, not a string"

    return RowSchema((text_field,), convert, "text field", "set data.text_field", "whose text is not a string", strings=True)


class FileReader:
    """Reads the files of one source under the `data.invalid_files` policy, collecting what it leaves out.

    Args:
        config_field: The field that named the source, for messages.
        schema: How table rows become documents.
        policy: `skip` or `error` (`data.invalid_files`).
    """

    def __init__(self, config_field: str, schema: RowSchema, policy: str):
        if policy not in INVALID_FILE_POLICIES:
            raise ConfigError(f"data.invalid_files={policy!r} is not one of {', '.join(INVALID_FILE_POLICIES)}")
        self.config_field, self.schema, self.policy = config_field, schema, policy
        self.out = SourceDocuments([], [])

    def _not_text(self, path: Path, problem: str) -> None:
        if self.policy == "error":
            raise ConfigError(
                f"{self.config_field}: {path} is not text ({problem}); remove it, narrow data.file_glob, or set "
                "data.invalid_files=skip to leave such files out with a warning"
            )
        self.out.skipped_files.append(SkippedFile(str(path), problem, self.config_field))

    def text_file(self, path: Path) -> str | None:
        """The file's text (newlines normalised as text mode reads them), or None when it is not text."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.config_field}: cannot read {path} ({exc.strerror or exc})") from None
        text, problem = decode_text(data)
        if text is None:
            self._not_text(path, problem)
            return None
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def rows(self, records, place: Callable[[int], str]) -> list:
        """The documents of table rows (dicts) under the schema; `place(i)` names row i in messages. Blank rows
        give nothing; a row the schema refuses is left out or refused."""
        documents = []
        for i, record in enumerate(records):
            document, problem = self.schema.convert(record)
            if problem is None:
                if document is not None:
                    documents.append(document)
                continue
            if self.policy == "error":
                raise ConfigError(f"{place(i)}: {problem}; fix the row, or set data.invalid_files=skip to leave such rows out with a warning")
            self.out.skipped_rows += 1
            if len(self.out.skipped_row_examples) < EXAMPLES_NAMED:
                self.out.skipped_row_examples.append(f"{place(i)} ({problem})")
        return documents

    def table(self, path: Path) -> list:
        """The documents of a jsonl / json / parquet file."""
        if path.suffix == ".parquet":
            return self._parquet(path)
        text = self.text_file(path)
        if text is None:
            return []
        place, records, columns = _json_records(path, text, self.schema)
        if not columns:
            return []
        missing = self.schema.missing(str(path), columns)
        if missing is not None:
            raise missing
        return self.rows(records, place)

    def _parquet(self, path: Path) -> list:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            missing = self.schema.missing(str(path), names)
            if missing is not None:
                raise missing
            columns = [c for c in self.schema.columns if c in names]
            records = pq.read_table(path, columns=columns).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        return self.rows(records, lambda i: f"{path}:row {i + 1}")

    def file_documents(self, path: Path) -> list:
        """The documents of one file of a source: a table's rows, or a text file as one document (when the schema
        takes text files; otherwise it is left out or refused like a file that is not text)."""
        if path.suffix in TABLE_SUFFIXES:
            return self.table(path)
        if not self.schema.text_files:
            self._not_text(path, f"not a table of {self.schema.what} rows (.jsonl, .json or .parquet)")
            return []
        text = self.text_file(path)
        return [text] if text is not None and text.strip() else []

    def hub_rows(self, table, name: str) -> list:
        """The documents of a loaded (not streamed) hub dataset `table`, named `name` in messages."""
        missing = self.schema.missing(f"dataset {name!r}", table.column_names)
        if missing is not None:
            raise missing
        columns = [c for c in self.schema.columns if c in table.column_names]
        return self.rows(table.select_columns(columns).to_list(), lambda i: f"{name}:row {i + 1}")


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


def _json_records(path: Path, text: str, schema: RowSchema) -> tuple[Callable[[int], str], list[dict], set[str]]:
    """(a function naming record i by file and line, the records, every field seen) of a JSON-lines file, or of a
    JSON file holding one array (of objects, or of plain strings when the schema takes them) or one object.

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
        if schema.strings and all(isinstance(item, str) for item in records):
            name = schema.fields[0]
            return place, [{name: item} for item in records], {name} if records else set()
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
            raise ConfigError(
                f"{place(i)}: expected a JSON object with a {schema.fields[0]!r} field, got {_article(type(record).__name__)}"
            )
        columns.update(record)
    return place, records, columns


def source_files(folder: Path, file_glob: str) -> list[Path]:
    """The files of a directory source, sorted, hidden files left out.

    Args:
        folder: The directory.
        file_glob: Pattern of the files considered (`data.file_glob`).

    Returns:
        The files.

    Raises:
        ConfigError: a pattern pathlib refuses (an absolute one, say).
    """
    try:
        return sorted(p for p in folder.glob(file_glob) if p.is_file() and not p.name.startswith("."))
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError(f"data.file_glob={file_glob!r}: {exc}") from None


def load_hub(
    source: str,
    *,
    split: str = "train",
    hub_config: str | None = None,
    data_files: Any = None,
    streaming: bool = False,
    config_field: str = "data.source",
):
    """A hub dataset or a `datasets` builder (`json`, `parquet`, `csv`, `text` with `data_files`), loaded or
    streamed by the `datasets` library (which caches downloads and prepared tables).

    Args:
        source: The dataset's name, or a builder's.
        split: The split. Default "train".
        hub_config: The configuration name, or None.
        data_files: One path or pattern, a list of them, or None.
        streaming: Return an `IterableDataset` read on the fly.
        config_field: The field that named the source, for messages.

    Returns:
        A `datasets.Dataset`, or a `datasets.IterableDataset` when streaming.

    Raises:
        ConfigError: one line with the library's first line of its error.
    """
    import datasets

    files = list(data_files) if isinstance(data_files, (list, tuple)) else data_files
    try:
        return datasets.load_dataset(source, name=hub_config, split=split, data_files=files, streaming=streaming)
    except Exception as exc:  # hub errors come in many types; the user needs one line
        what = f"split {split!r}" + (f", config {hub_config!r}" if hub_config else "") + (f", data_files {files!r}" if files else "")
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise ConfigError(f"{config_field}: cannot load dataset {source!r} ({what}): {lines[0]}") from None


def check_local_source(resolved: Path | str, source: str, hub_config: str | None, data_files: Any, config_field: str) -> None:
    """Refuse hub-only settings for a local path.

    Raises:
        ConfigError: `data.hub_config` or `data.data_files` given with a local file or folder.
    """
    if isinstance(resolved, Path) and (hub_config is not None or data_files is not None):
        raise ConfigError(
            f"{config_field}={source!r} is a local path; data.hub_config and data.data_files apply to hub datasets and "
            "to datasets builders (e.g. data.source=json data.data_files=PATH)"
        )


def read_source(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    file_glob: str = "**/*",
    invalid_files: str = "skip",
    config_field: str = "data.source",
    schema: RowSchema | None = None,
    hub_config: str | None = None,
    data_files: Any = None,
) -> SourceDocuments:
    """Read every document of a source, leaving out (or refusing) files that are not text.

    Args:
        source: See the module docstring.
        text_field: Column with the text for tables and hub datasets, when no `schema` is given. Default "text".
        split: Split of a hub dataset. Default "train".
        file_glob: Files considered inside a directory. Default all files, recursively.
        invalid_files: `skip` (leave out, with a warning naming them) or `error` (refuse in one line) files that
            are not text (`decode_text`) and table rows the schema refuses.
        config_field: The field that named the source, for messages.
        schema: How table rows become documents; default `text_rows(text_field)`.
        hub_config: Configuration name of a hub dataset.
        data_files: Files of a hub dataset or `datasets` builder.

    Returns:
        The documents, and the files and rows left out (also printed as a warning).

    Raises:
        ConfigError: missing path, missing field, a malformed table (naming file and line), a file that is not
            text under `error`, hub settings for a local path, or no documents at all.
    """
    schema = schema or text_rows(text_field)
    resolved = resolve_source(source)
    check_local_source(resolved, source, hub_config, data_files, config_field)
    reader = FileReader(config_field, schema, invalid_files)
    documents = reader.out.documents
    if isinstance(resolved, str):
        table = load_hub(resolved, split=split, hub_config=hub_config, data_files=data_files, config_field=config_field)
        documents.extend(reader.hub_rows(table, source))
    elif resolved.is_dir():
        # Every file is one document (source code, proofs and books alike); tables hold many documents.
        for path in source_files(resolved, file_glob):
            documents.extend(reader.file_documents(path))
    else:
        documents.extend(reader.file_documents(resolved))
    out = reader.out
    left_out = describe_left_out(out, schema)
    if not documents:
        what = "text" if schema.text_files else f"{schema.what} rows"
        raise ConfigError(f"data source {source!r} holds no {what}" + (f" (skipped {left_out})" if left_out else ""))
    if left_out:
        warn_left_out(out, config_field, schema)
    return out


def describe_left_out(out: SourceDocuments, schema: RowSchema) -> str:
    """'2 files that are not text: a (NUL bytes), b (...); 3 rows ...' or ''."""
    parts = []
    if out.skipped_files:
        n = len(out.skipped_files)
        named = ", ".join(f"{s.path} ({s.reason})" for s in out.skipped_files[:3])
        parts.append(f"{n} file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not text: {named}" + (", ..." if n > 3 else ""))
    if out.skipped_rows:
        named = ", ".join(out.skipped_row_examples[:3])
        parts.append(f"{out.skipped_rows} row(s) {schema.invalid_rows}: {named}" + (", ..." if out.skipped_rows > 3 else ""))
    return "; ".join(parts)


def warn(text: str) -> None:
    """Print one warning line to stderr."""
    print(f"[seer-finetune] warning: {text}", file=sys.stderr, flush=True)


def warn_left_out(out: SourceDocuments, config_field: str, schema: RowSchema) -> None:
    """Warn about the files and rows of a source that were left out, naming the first ones."""
    if out.skipped_files:
        warn(
            f"{config_field}: skipped {len(out.skipped_files)} file(s) that are not text (data.invalid_files=skip; "
            "set data.invalid_files=error to refuse them):"
        )
        for skipped in out.skipped_files[:EXAMPLES_NAMED]:
            warn(f"  {skipped.path}: {skipped.reason}")
        if len(out.skipped_files) > EXAMPLES_NAMED:
            warn(f"  ... and {len(out.skipped_files) - EXAMPLES_NAMED} more")
    if out.skipped_rows:
        warn(f"{config_field}: skipped {out.skipped_rows} row(s) {schema.invalid_rows}, e.g. " + ", ".join(out.skipped_row_examples[:5]))


def load_documents(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    file_glob: str = "**/*",
    invalid_files: str = "skip",
    hub_config: str | None = None,
    data_files: Any = None,
) -> list[str]:
    """Read every document of a source as a list of strings (`read_source` without the report).

    Args:
        source: See the module docstring.
        text_field: Column with the text for tables and hub datasets. Default "text".
        split: Split of a hub dataset. Default "train".
        file_glob: Files considered inside a directory. Default all files, recursively.
        invalid_files: `skip` or `error` for files that are not text (see `read_source`).
        hub_config: Configuration name of a hub dataset.
        data_files: Files of a hub dataset or `datasets` builder.

    Returns:
        The documents.

    Raises:
        ConfigError: missing path, missing text field, malformed table, or no text at all.
    """
    return read_source(
        source, text_field=text_field, split=split, file_glob=file_glob, invalid_files=invalid_files,
        hub_config=hub_config, data_files=data_files,
    ).documents
