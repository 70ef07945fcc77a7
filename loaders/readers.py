"""Read dataset files into raw string tables.

A file is read in chunks (`read_chunks`) of at most CHUNK_ROWS rows, so a big file is
never in memory whole. Every chunk is a `RawTable`: a pyarrow Table whose data columns are
strings (null when missing or empty) plus `_file` and `_line` columns, and the reject
records of rows that could not even be split into columns. A file's column named as one
channelgraph computes (`_file`, `_line`, the table's `TableSpec.computed`) is not read, with
a warning. Nothing here judges values; that is `loaders.validate`.

Line numbers: CSV counts physical lines with the header as line 1; JSONL counts lines;
Parquet counts rows from 1.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import logging
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from graph.errors import DatasetError
from graph.model import TABLES
from loaders.keys import string_offsets

log = logging.getLogger(__name__)
csv.field_size_limit(2**31 - 1)  # the exact CSV reader takes fields as large as pyarrow does

CHUNK_ROWS = 1 << 20  # rows per chunk: bounds the memory of reading (and of validating) a big file
CSV_BLOCK_BYTES = 4 << 20  # CSV text parsed at a time (a chunk is whole blocks)
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
ANSWERS = "answers.json"  # the known answers `channelgraph generate` writes next to the data
EPCIS_SUFFIXES = (".xml", ".json", ".jsonld")
META_COLUMNS = ("_file", "_line")


@dataclass
class Reject:
    """One input row that is not loaded, and why."""

    table: str
    file: str
    line: int | None
    reason: str
    row: dict | str | None

    def as_dict(self) -> dict:
        return {"table": self.table, "file": self.file, "line": self.line,
                "reason": self.reason, "row": self.row}


@dataclass
class RawTable:
    table: str
    data: pa.Table  # string columns + _file + _line
    rejects: list[Reject] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # the file's columns named as channelgraph's own: not read


@dataclass(frozen=True)
class Source:
    table: str  # canonical table name, or "epcis"
    path: Path


def table_of(path: Path) -> str | None:
    """Canonical table a file holds, from its name (`scans.csv`, `scans_2024-01.parquet`)."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for table in TABLES:
        if stem == table or stem.startswith((table + "_", table + "-", table + ".")):
            return table
    return None


@dataclass(frozen=True)
class Skipped:
    """A file of a dataset that is not read, and why."""

    path: Path
    reason: str

    def as_dict(self) -> dict:
        return {"path": str(self.path), "reason": self.reason}


def discover(dataset: Path) -> tuple[list[Source], list[Skipped]]:
    """The readable sources of a dataset (a folder of tables/EPCIS files, or one file) and
    the other files, each skipped with a warning (naming the table a misspelt file name
    comes close to); hidden files and the answers a generated scenario keeps next to its
    data are passed over silently."""
    if not dataset.exists():
        raise DatasetError(f"{dataset}: no such file or directory")
    paths = sorted(p for p in dataset.rglob("*") if p.is_file()) if dataset.is_dir() else [dataset]
    sources, skipped = [], []
    for path in paths:
        if path.name.startswith("."):
            continue
        table = table_of(path) if path.suffix.lower() in TABLE_SUFFIXES else None
        if table:
            sources.append(Source(table, path))
        elif path.suffix.lower() in EPCIS_SUFFIXES and _looks_like_epcis(path):
            sources.append(Source("epcis", path))
        elif path.name != ANSWERS:
            skipped.append(Skipped(path, f"not a channelgraph table or EPCIS document{_hint(path)}"))
            log.warning("ignoring %s: %s", path, skipped[-1].reason)
    if not sources:
        raise DatasetError(f"{dataset}: no tables (regions, parties, products, codes, scans, referrals) or EPCIS documents found")
    return sources, skipped


def _hint(path: Path) -> str:
    """What an ignored file's name may have meant: a table in a format read, or a table's
    name (" (did you mean scans.csv?)"); "" when nothing comes close."""
    if table_of(path):
        return f" (a table is read from a {', '.join(TABLE_SUFFIXES)} file)"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    guess = difflib.get_close_matches(stem, list(TABLES), n=1)
    suffix = path.suffix.lower() if path.suffix.lower() in TABLE_SUFFIXES else ".csv"
    return f" (did you mean {guess[0]}{suffix}?)" if guess else ""


def _looks_like_epcis(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096)
    return b"EPCIS" in head or b"epcis" in head


def read_chunks(source: Source, rows: int | None = None) -> Iterator[RawTable]:
    """The rows of one table file in file order, in chunks of about `rows` rows (CHUNK_ROWS;
    at least one chunk, maybe empty). Raises DatasetError naming the file if it is
    unreadable, which may be after some chunks."""
    readers = {".csv": _csv_chunks, ".jsonl": _jsonl_chunks, ".parquet": _parquet_chunks}
    warned: set[str] = set()
    try:
        for chunk in readers[source.path.suffix.lower()](source.path, source.table, rows or CHUNK_ROWS):
            for name in chunk.ignored:
                if name not in warned:
                    warned.add(name)
                    log.warning("%s: column %r is computed by channelgraph; the file's values are ignored", source.path, name)
            yield chunk
    except DatasetError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DatasetError(f"{source.path}: cannot read {source.table} table: {exc}") from exc


def read_source(source: Source) -> RawTable:
    """Read one table file completely. Raises DatasetError if the file is unreadable."""
    chunks = list(read_chunks(source))
    data = pa.concat_tables([c.data for c in chunks], promote_options="permissive")
    return RawTable(source.table, data, [r for c in chunks for r in c.rejects])


def _finish(table: str, path: Path, columns: dict[str, pa.Array | pa.ChunkedArray], lines: pa.Array,
            rejects: list[Reject], unnamed: Collection[str] = ()) -> RawTable:
    """Values are trimmed, empty ones become null; adds the _file/_line columns (`_file`
    as a dictionary column: one copy of the path, whatever the rows). Columns may be
    chunked (CSV: one chunk per parsed block); they stay so. Columns named as one
    channelgraph computes are left out (`RawTable.ignored`), and so are the `unnamed` ones
    (CSV: a blank name in the header) where they hold no value."""
    n = len(lines)
    own = {*META_COLUMNS, *TABLES[table].computed}
    arrays = {name: _trimmed_or_null(arr) for name, arr in columns.items() if name not in own}
    for name in unnamed:
        if arrays[name].null_count == n:
            del arrays[name]
    arrays["_file"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([str(path)], pa.string()))
    arrays["_line"] = lines.cast(pa.int64())
    return RawTable(table, pa.table(arrays), rejects, [name for name in columns if name in own])


def _trimmed_or_null(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """String values without surrounding white space; empty ones null. Copies the text
    only when some value may have white space at an end."""
    if isinstance(values, pa.ChunkedArray):
        return pa.chunked_array([_trimmed_or_null(chunk) for chunk in values.chunks], pa.string())
    values = values.cast(pa.string())
    if _may_have_white_space(values):
        values = pc.utf8_trim_whitespace(values)
    if values.null_count == 0:
        present = np.diff(string_offsets(values)) > 0
        if present.all():
            return values
        present = pa.array(present)
    else:
        present = pc.and_(pc.is_valid(values), pc.greater(pc.binary_length(values), 0))
        if pc.all(present).as_py() is not False:
            return values
    if values.offset:
        return pc.if_else(present, values, pa.scalar(None, pa.string()))
    return pa.Array.from_buffers(pa.string(), len(values), [present.buffers()[1], *values.buffers()[1:]])


def _text_of(values: pa.Array) -> np.ndarray:
    """The bytes of a string or binary array's values, one after another."""
    offsets, data = string_offsets(values), values.buffers()[2]
    return np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None and len(values) else np.zeros(0, np.uint8)


def _may_have_white_space(values: pa.Array) -> bool:
    """False when no value starts or ends with a byte of a white space character (any
    byte up to space, or of a non-ASCII character)."""
    text = _text_of(values)
    if not len(text) or (text.min() > 0x20 and text.max() < 0x80):  # no such byte anywhere: the common case
        return False
    offsets = string_offsets(values)
    text = np.frombuffer(values.buffers()[2], np.uint8)
    first, last = text[np.minimum(offsets[:-1], len(text) - 1)], text[np.maximum(offsets[1:] - 1, 0)]
    edge = (first <= 0x20) | (first >= 0x80) | (last <= 0x20) | (last >= 0x80)
    return bool((edge & (offsets[1:] > offsets[:-1])).any())


# ---------------------------------------------------------------- CSV


def _csv_chunks(path: Path, table: str, rows: int) -> Iterator[RawTable]:
    """Fast pyarrow parsing while every row is one regular line; from the chunk where one
    is not (a row with too few or too many values, a blank line before the end, a line
    break inside a value) exact reading with Python's csv module, which knows each
    record's physical line. A file with nothing but line breaks (or nothing at all) is a
    table without rows or columns, as an empty JSONL file."""
    with path.open("rb") as f:
        head = f.read(CSV_BLOCK_BYTES)
    if len(head) < CSV_BLOCK_BYTES and not head.removeprefix(codecs.BOM_UTF8).strip(b"\r\n"):
        yield _finish(table, path, {}, pa.array([], pa.int64()), [])
        return
    header, unnamed = _csv_header(path)
    if not header:
        raise DatasetError(f"{path}: no header row (the first line is blank)")
    _check_unique(path, header)
    if len(head) < CSV_BLOCK_BYTES and not re.search(rb"[\r\n]", head):  # a header and no line break: no rows
        yield _finish(table, path, {name: pa.array([], pa.string()) for name in header}, pa.array([], pa.int64()), [],
                      unnamed)
        return
    # An irregular row makes pyarrow raise ArrowInvalid: no handler of invalid rows, as
    # pyarrow decodes a row's text before it calls one (which fails on bytes not UTF-8).
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(column_names=header, skip_rows=1, block_size=CSV_BLOCK_BYTES, use_threads=False),
            parse_options=pa_csv.ParseOptions(ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(header, pa.binary()),
                                                  strings_can_be_null=False, quoted_strings_can_be_null=False))
    except pa.ArrowInvalid:  # an irregular row in the first block
        yield from _csv_exact_chunks(path, table, rows, skip=0)
        return
    done = 0  # rows yielded: lines 2 .. done + 1
    batches = _with_last(reader)
    while True:
        pending, last, n, irregular = [], False, 0, False
        try:
            while n < rows and not last:
                batch, last = next(batches, (None, True))
                if batch is not None:
                    pending.append(batch)
                    n += batch.num_rows
        except pa.ArrowInvalid:
            irregular = True
        parsed = pa.Table.from_batches(pending, reader.schema)
        if last and not irregular:  # pyarrow reads a blank line as a row of empty values: those at the end are no rows
            parsed = parsed.slice(0, parsed.num_rows - _trailing_blank_lines(path, parsed))
        if irregular or _blank_or_multiline(parsed):
            log.info("%s: irregular or blank rows; reading exactly from line %d", path, done + 2)
            yield from _csv_exact_chunks(path, table, rows, skip=done)
            return
        columns, bad_rows = _decode_utf8(parsed)
        lines = pa.array(np.arange(done + 2, done + parsed.num_rows + 2, dtype=np.int64))
        rejects = []
        if bad_rows:
            keep = pa.array([i not in bad_rows for i in range(parsed.num_rows)])
            rejects = [Reject(table, str(path), done + i + 2, "invalid UTF-8 text (file must be UTF-8)",
                              _row_repr(parsed, i)) for i in sorted(bad_rows)]
            columns = {k: pc.filter(v, keep) for k, v in columns.items()}
            lines = lines.filter(keep)
        done += parsed.num_rows
        yield _finish(table, path, columns, lines, rejects, unnamed)
        if last:
            return


def _with_last(reader: pa.RecordBatchReader) -> Iterator[tuple[pa.RecordBatch, bool]]:
    """Each batch with whether it is the last (one batch read ahead)."""
    batches = iter(reader)
    batch = next(batches, None)
    while batch is not None:
        following = next(batches, None)
        yield batch, following is None
        batch = following


def _trailing_blank_lines(path: Path, parsed: pa.Table) -> int:
    """How many rows at the end of `parsed` (the last rows of the file) are blank lines."""
    if parsed.num_rows == 0 or parsed.num_columns == 0:
        return 0
    empty = _empty_rows(parsed)
    if not len(empty) or not empty[-1]:
        return 0
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        tail = f.read()
    run = re.search(rb"[\r\n]*$", tail).group()  # the line breaks ending the file
    blank = max(0, len(re.findall(rb"\r\n|\n|\r", run)) - 1)
    return min(blank, int(empty[::-1].argmin()) if not empty.all() else parsed.num_rows)


def _empty_rows(parsed: pa.Table) -> np.ndarray:
    """Which rows have only empty values (none, when some column has a value in every row:
    usually the first tells)."""
    empty = np.ones(parsed.num_rows, bool)
    for column in parsed.columns:
        lengths = np.concatenate([np.diff(string_offsets(chunk)) for chunk in column.chunks]) if column.num_chunks else np.zeros(0, np.int32)
        empty &= lengths == 0
        if not empty.any():
            return empty
    return empty


def _blank_or_multiline(parsed: pa.Table) -> bool:
    """Whether a row has only empty values (a blank line, which the exact reader skips) or
    a value holds a line break (its row spans lines)."""
    if parsed.num_rows == 0 or parsed.num_columns == 0:
        return False
    return bool(_empty_rows(parsed).any()) or any(_has_line_break(chunk) for column in parsed.columns for chunk in column.chunks)


def _has_line_break(values: pa.Array) -> bool:
    text = _text_of(values)
    if not len(text) or text.min() > ord("\r"):  # no control character at all: the common case, one pass
        return False
    return bool(((text == ord("\n")) | (text == ord("\r"))).any())


def _check_unique(path: Path, names: list[str]) -> None:
    """A file whose columns repeat a name cannot be read unambiguously."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DatasetError(f"{path}: column {name!r} appears more than once in the header")
        seen.add(name)


def _csv_header(path: Path) -> tuple[list[str], list[str]]:
    """The column names of the header row, and those given to its blank ones (`_named`)."""
    with path.open("rb") as f:
        first = f.readline()
    try:
        text = first.decode("utf-8-sig").strip("\r\n")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: the header row is not UTF-8 text (the file must be UTF-8)") from exc
    try:
        names = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as exc:
        raise DatasetError(f"{path}: unreadable header row: {exc}") from exc
    return _named(names)


def _named(names: list[str]) -> tuple[list[str], list[str]]:
    """Header names without surrounding white space, a blank one as `column_N` (N: its
    1-based place); and the names so given (`_finish` leaves such a column out where it
    holds no value: a spreadsheet's empty columns)."""
    stripped = [name.strip() for name in names]
    named = [name or f"column_{i}" for i, name in enumerate(stripped, start=1)]
    return named, [name for name, given in zip(named, stripped) if not given]


def _decode_utf8(parsed: pa.Table) -> tuple[dict[str, pa.ChunkedArray], set[int]]:
    """The binary columns as text, and the rows with text that is not UTF-8 (their values
    decoded with U+FFFD)."""
    columns: dict[str, pa.ChunkedArray] = {}
    bad: set[int] = set()
    for name in parsed.column_names:
        col = parsed.column(name)
        try:
            columns[name] = pa.chunked_array([_as_text(chunk) for chunk in col.chunks], pa.string())
        except pa.ArrowInvalid:
            values = col.to_pylist()
            for i, value in enumerate(values):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    bad.add(i)
            columns[name] = pa.array([v.decode("utf-8", errors="replace") for v in values], pa.string())
    return columns, bad


def _as_text(values: pa.Array) -> pa.Array:
    """Binary values as text: ASCII as it is, other bytes checked to be UTF-8 (ArrowInvalid
    if they are not)."""
    text = _text_of(values)
    if not len(text) or text.max() < 0x80:
        return pa.Array.from_buffers(pa.string(), len(values), values.buffers(), values.null_count, values.offset)
    return values.cast(pa.string())


def _row_repr(parsed: pa.Table, i: int) -> dict:
    return {name: parsed.column(name)[i].as_py().decode("utf-8", errors="replace")
            for name in parsed.column_names}


def _csv_exact_chunks(path: Path, table: str, rows: int, skip: int) -> Iterator[RawTable]:
    """Slow, exact CSV reading: every record with the physical line it starts on; the first
    `skip` records (already read, each one regular line) are passed over."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header, unnamed = _named(next(reader, []))
        if any(_has_surrogate(name) for name in header):  # a quoted name went on to a line that is not UTF-8
            raise DatasetError(f"{path}: the header row is not UTF-8 text (the file must be UTF-8)")
        for _ in range(skip):
            next(reader)
        start = reader.line_num + 1
        while True:
            values: dict[str, list] = {name: [] for name in header}
            lines: list[int] = []
            rejects: list[Reject] = []
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record or record == [""]:
                    continue
                if len(record) != len(header):
                    rejects.append(Reject(table, str(path), line,
                                          f"expected {len(header)} columns, got {len(record)}",
                                          _repaired(",".join(record))))
                elif any(_has_surrogate(v) for v in record):
                    rejects.append(Reject(table, str(path), line, "invalid UTF-8 text (file must be UTF-8)",
                                          {k: _repaired(v) for k, v in zip(header, record)}))
                else:
                    for name, value in zip(header, record):
                        values[name].append(value)
                    lines.append(line)
                    if len(lines) == rows:
                        break
            else:
                yield _finish(table, path, {name: pa.array(vals, pa.string()) for name, vals in values.items()},
                              pa.array(lines, pa.int64()), rejects, unnamed)
                return
            yield _finish(table, path, {name: pa.array(vals, pa.string()) for name, vals in values.items()},
                          pa.array(lines, pa.int64()), rejects, unnamed)


def _repaired(text: str) -> str:
    """Text read with surrogateescape, with undecodable bytes as U+FFFD (for reject records)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------- JSONL


def _jsonl_chunks(path: Path, table: str, rows: int) -> Iterator[RawTable]:
    """One JSON object a line; scalars become strings, nested values JSON text. A chunk
    has every key seen so far in the file as a column, in the order first seen."""
    names: list[str] = []
    with path.open("rb") as f:
        numbered = enumerate(f, start=1)
        while True:
            values: dict[str, list] = {name: [] for name in names}
            lines: list[int] = []
            rejects: list[Reject] = []
            for number, raw in numbered:
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    rejects.append(Reject(table, str(path), number, f"invalid JSON: {exc}",
                                          raw.decode("utf-8", errors="replace").rstrip("\r\n")))
                    continue
                if not isinstance(obj, dict):
                    rejects.append(Reject(table, str(path), number, "line is not a JSON object",
                                          raw.decode("utf-8", errors="replace").rstrip("\r\n")))
                    continue
                for key, value in obj.items():
                    column = values.get(key)
                    if column is None:
                        names.append(key)
                        column = values[key] = [None] * len(lines)
                    column.append(_jsonl_text(value))
                lines.append(number)
                for column in values.values():
                    if len(column) < len(lines):
                        column.append(None)
                if len(lines) == rows:
                    break
            else:
                yield _finish(table, path, {name: pa.array(vals, pa.string()) for name, vals in values.items()},
                              pa.array(lines, pa.int64()), rejects)
                return
            yield _finish(table, path, {name: pa.array(vals, pa.string()) for name, vals in values.items()},
                          pa.array(lines, pa.int64()), rejects)


def _jsonl_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- Parquet


def _parquet_chunks(path: Path, table: str, rows: int) -> Iterator[RawTable]:
    """Parquet columns of any type become strings; timestamps become ISO 8601 (naive = UTC)."""
    _check_unique(path, pq.read_schema(path).names)
    file = pq.ParquetFile(path)
    done = 0
    for batch in file.iter_batches(batch_size=rows):
        columns = {name: _to_string(batch.column(name)) for name in batch.schema.names}
        yield _finish(table, path, columns, pa.array(np.arange(done + 1, done + batch.num_rows + 1, dtype=np.int64)), [])
        done += batch.num_rows
    if not done:
        columns = {f.name: _to_string(pa.array([], f.type)) for f in file.schema_arrow}
        yield _finish(table, path, columns, pa.array([], pa.int64()), [])


def _to_string(arr: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(arr.type):  # nanoseconds are truncated, as for text times
        utc = pc.cast(arr, pa.timestamp("us", tz="UTC") if arr.type.tz else pa.timestamp("us"), safe=False)
        return pc.strftime(utc, format="%Y-%m-%dT%H:%M:%S", locale="C")  # %S has the microseconds
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return pa.array([None if v is None else v.decode("utf-8", errors="replace") for v in arr.to_pylist()], pa.string())
    if not pa.types.is_nested(arr.type):
        try:  # numbers, booleans, dates, times, decimals
            return arr.cast(pa.string())
        except pa.ArrowNotImplementedError:
            pass
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
                     for v in arr.to_pylist()], pa.string())
