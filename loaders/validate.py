"""Validate raw string tables against the data contract (DOMAIN.md §2).

`validate_dataset` is the one code path every store uses: it turns raw rows into typed
accepted rows, reject records (row, file, line, reason) and duplicate counts. It never
raises on a bad row. References are checked against the rows of this load and against
what the store already holds (`Known`).

Tables arrive in chunks (`loaders.readers`). The rules a row meets on its own (required
values, enums, numbers, times, and references to the tables validated before it) are
checked chunk by chunk; the rules across rows (duplicates, parents, cycles, what the
store holds) then run on whole columns, read when a rule needs them. Rows are numbered
across the chunks of a table. With a spill folder, the chunks of the big tables (codes,
scans, referrals) are written there as they are checked instead of kept in memory, and
the store reads the accepted rows back column by column (`AcceptedRows`).
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from graph.errors import DatasetError
from graph.model import LEVEL_RANK, LOAD_ORDER, TABLES, TableSpec
from loaders.direct_io import DirectFile
from loaders.keys import StringKeys, ThreadPool, gather, positions, sort_order, sorted_rows, string_array, string_offsets
from loaders.readers import META_COLUMNS, RawTable, Reject

log = logging.getLogger(__name__)

TS_TYPE = pa.timestamp("us", tz="UTC")
TYPES = {"str": pa.string(), "enum": pa.string(), "float": pa.float64(), "ts": TS_TYPE}  # typed column of each Column.type
MAX_PACKAGING_DEPTH = len(LEVEL_RANK)
# Identifiers (keys and the columns that refer to them) are indexed by Neo4j, whose index
# entries are limited to about 8 kB; 1024 characters is at most 4 kB of UTF-8.
MAX_ID_LENGTH = 1024
ID_COLUMNS = frozenset({"region_id", "parent_id", "party_id", "upstream_id", "sku", "code", "parent_code",
                        "event_id", "counterparty_id", "referral_id", "referrer_id", "referee_id"})
SPILLED = ("codes", "scans", "referrals")  # tables that can be big: their chunks go to the spill folder
MAX_COLUMN_TEXT = 2**31 - 1  # bytes of text a spilled string column holds (Arrow's 32-bit offsets)


class Known(Protocol):
    """What a store already holds, as far as validation needs it."""

    def stored(self, table: str, keys: pa.Array) -> pa.Table:
        """The stored rows (typed canonical columns) whose key is in `keys` (keys may repeat,
        and be null: a null matches nothing)."""

    def regions(self) -> pa.Table:
        """All stored regions."""


@dataclass
class TableOutcome:
    accepted: AcceptedRows | None = None  # typed rows to write (new or changed)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: int = 0
    read: int = 0


@dataclass
class Validated:
    tables: dict[str, TableOutcome]
    implicit_consumers: pa.Table | None = None  # party rows registered by scans/referrals

    def changes_anything(self) -> bool:
        """True when applying this would add or change a stored row."""
        return (self.implicit_consumers is not None and self.implicit_consumers.num_rows > 0) or any(
            o.accepted is not None and o.accepted.num_rows > 0 for o in self.tables.values())

    def pop_accepted(self, table: str) -> AcceptedRows | None:
        """Hands over the accepted rows of `table` and forgets them here, so a store that
        writes table by table holds one copy of each at a time."""
        outcome = self.tables.get(table)
        if outcome is None:
            return None
        accepted, outcome.accepted = outcome.accepted, None
        return accepted

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            "accepted": {t: (o.accepted.num_rows if o.accepted is not None else 0) for t, o in self.tables.items()},
            "rejected": {t: len(o.rejects) for t, o in self.tables.items()},
            "duplicates": {t: o.duplicates for t, o in self.tables.items()},
        }


# ---------------------------------------------------------------- rows and where they are kept


_SPILLER = ThreadPool(1, "spill")  # writes chunks to files while the next chunk is validated


class _Chunks:
    """The rows of a table under validation, added chunk by chunk and read back column by
    column: each chunk's typed columns, and (when the rows may still be rejected later,
    which needs their raw values) its raw columns with `_file` and `_line`. A raw column
    whose typed column is the same array is kept once, among the columns. In memory, or
    (with a folder) written to files on a background thread, one chunk at a time: the
    columns to `_ColumnFiles`, each chunk's other raw columns to an Arrow IPC file."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.starts = [0]  # row number of each chunk's first row, then the number of rows
        self.names: dict[str, None] = {}  # raw column names, in the order first seen
        self.raw: list[pa.Table | Path | None] = []  # each chunk's raw columns not among the columns
        self._pieces: dict[str, list[tuple[int, pa.ChunkedArray]]] = {}  # in memory: (first row, values) of each column
        self._files = _ColumnFiles(folder) if folder is not None else None
        self._writing: Future | None = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def n(self) -> int:
        return self.starts[-1]

    def add(self, n: int, typed: pa.Table, raw: pa.Table | None) -> None:
        """Adds a chunk of `n` rows: `typed` columns, and `raw` ones where `typed` has none.
        With a folder, it is written to files in the background once the chunk added
        before is (`flush`), so at most two are in memory."""
        start = self.n
        self.starts.append(start + n)
        columns = {name: raw.column(name) for name in raw.column_names if name not in META_COLUMNS} if raw is not None else {}
        columns.update(zip(typed.column_names, typed.columns))
        kept = None
        if raw is not None:
            self.names.update(dict.fromkeys(raw.column_names))
            kept = raw.select([name for name in raw.column_names if name in META_COLUMNS or name in typed.column_names])
        self.raw.append(kept)
        if self._files is None:
            for name, values in columns.items():
                self._pieces.setdefault(name, []).append((start, values))
            return
        self.flush()
        self._writing = _SPILLER.executor.submit(self._spill, len(self.raw) - 1, start, columns)

    def flush(self) -> None:
        """Waits until every chunk added is on file (raises the error of a failed write)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _spill(self, number: int, start: int, columns: dict[str, pa.ChunkedArray]) -> None:
        """Writes chunk `number` (its first row `start`) to files; then holds the path of its
        raw file instead of its raw table."""
        for name, values in columns.items():
            self._files.append(name, values, start)
        if self.raw[number] is not None:
            path = self.folder / f"{number:05d}.raw.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self.raw[number].schema) as writer:
                writer.write_table(self.raw[number])
            self.raw[number] = path

    def column(self, name: str, type_: pa.DataType) -> pa.ChunkedArray:
        """The column `name` over all chunks (nulls in chunks without it)."""
        return self._rows(name, type_, 0, self.n)

    def part(self, i: int, name: str, type_: pa.DataType) -> pa.ChunkedArray:
        """The column `name` of chunk i (nulls if it has none)."""
        return self._rows(name, type_, self.starts[i], self.starts[i + 1])

    def _rows(self, name: str, type_: pa.DataType, start: int, stop: int) -> pa.ChunkedArray:
        """Rows start..stop-1 of column `name`, as `type_` (nulls where no chunk gave it)."""
        if self._files is not None:
            parts = self._files.rows(name, start, stop) or [pa.nulls(stop - start, type_)]
        else:
            parts, row = [], start
            for first, values in self._pieces.get(name, []):
                low, high = max(first, start), min(first + len(values), stop)
                if low < high:
                    parts += [pa.nulls(low - row, type_)] if low > row else []
                    parts += values.slice(low - first, high - low).chunks
                    row = high
            parts += [pa.nulls(stop - row, type_)] if row < stop else []
        return pa.chunked_array([p if p.type == type_ else p.cast(type_) for p in parts], type_)

    def raw_rows(self, rows: np.ndarray) -> list[dict]:
        """The raw rows at `rows` (ascending; of chunks with raw columns) as dicts of every
        raw column, `_file` and `_line`."""
        out: list[dict] = []
        chunk_of = np.searchsorted(self.starts, rows, "right") - 1
        for chunk in np.unique(chunk_of):
            local = pa.array(rows[chunk_of == chunk] - self.starts[chunk])
            table = _read_table(self.raw[chunk]).take(local)
            for name in self.names:  # the raw values kept among the columns: strings (a typed column has its raw values in `raw`)
                if name not in table.column_names:
                    values = self.part(int(chunk), name, pa.string()) if self._stored_type(name) == pa.string() else None
                    table = table.append_column(name, values.take(local) if values is not None else pa.nulls(len(local), pa.string()))
            out += table.to_pylist()
        return out

    def _stored_type(self, name: str) -> pa.DataType | None:
        if self._files is not None:
            return self._files.types.get(name)
        pieces = self._pieces.get(name)
        return pieces[0][1].type if pieces else None


class _ColumnFiles:
    """Columns appended to chunk by chunk and read back whole, each column in files of its
    own: its values (strings: their bytes, with their end offsets in a second file) and,
    once a chunk has nulls, one byte a row saying which are valid. A column read back is
    one Arrow array over the memory-mapped files: no copy is made of its values, as
    concatenating chunks would (for 16.5M codes, 250 MB a column)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.number: dict[str, int] = {}  # file number of each column
        self.types: dict[str, pa.DataType] = {}
        self.appended: dict[str, int] = {}  # rows appended
        self.bytes: dict[str, int] = {}  # string bytes appended
        self.valid: dict[str, int] = {}  # rows whose validity is on file

    def append(self, name: str, values: pa.Array | pa.ChunkedArray, start: int) -> None:
        """Appends `values` as the rows of column `name` from row `start` (rows it skipped
        before are null)."""
        if name not in self.number:
            self.number[name], self.types[name] = len(self.number), values.type
            self.appended[name] = self.bytes[name] = self.valid[name] = 0
            if _is_string(values.type):
                self._write(name, "offsets", np.zeros(1, np.int32))
        if values.type != self.types[name]:
            values = values.cast(self.types[name])
        if start > self.appended[name]:
            self._append(name, pa.nulls(start - self.appended[name], self.types[name]))
        for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
            self._append(name, chunk)

    def _append(self, name: str, values: pa.Array) -> None:
        n, type_ = len(values), self.types[name]
        if not n:
            return
        if values.null_count:
            if self.valid[name] < self.appended[name]:
                self._write(name, "valid", np.ones(self.appended[name] - self.valid[name], np.uint8))
            self._write(name, "valid", pc.is_valid(values).to_numpy(zero_copy_only=False).view(np.uint8))
            self.valid[name] = self.appended[name] + n
        if _is_string(type_):
            offsets = string_offsets(values)
            first, last = int(offsets[0]), int(offsets[-1])
            if self.bytes[name] + last - first > MAX_COLUMN_TEXT:
                raise DatasetError(f"{self.folder.name}: column {name} holds over 2 GiB of text in one load; "
                                   "load the table's files in several loads")
            self._write(name, "offsets", offsets[1:] - np.int32(first - self.bytes[name]))
            if last > first:
                self._write(name, "data", memoryview(values.buffers()[2])[first:last])
            self.bytes[name] += last - first
        elif pa.types.is_boolean(type_):
            self._write(name, "data", values.fill_null(False).to_numpy(zero_copy_only=False).view(np.uint8))
        elif type_ != pa.null():
            width = type_.bit_width // 8
            self._write(name, "data", memoryview(values.buffers()[1])[values.offset * width:(values.offset + n) * width])
        self.appended[name] += n

    def _write(self, name: str, kind: str, data: np.ndarray | memoryview) -> None:
        with DirectFile(self._path(name, kind), append=True) as f:
            f.write(data)

    def _path(self, name: str, kind: str) -> Path:
        return self.folder / f"{self.number[name]}.{kind}"

    def rows(self, name: str, start: int, stop: int) -> list[pa.Array] | None:
        """Rows start..stop-1 of column `name` over the memory-mapped files, in parts (rows
        after the last appended are null); None if no chunk had the column."""
        if name not in self.number:
            return None
        type_ = self.types[name]
        end = max(start, min(stop, self.appended[name]))
        length = end - start
        validity, nulls = None, 0
        if self.valid[name] > start and length:
            valid = np.frombuffer(self._read(name, "valid", start, min(end, self.valid[name]) - start), np.uint8)
            if len(valid) < length:
                valid = np.concatenate([valid, np.ones(length - len(valid), np.uint8)])
            nulls = length - int(np.count_nonzero(valid))
            validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
        if not length or type_ == pa.null():
            values = pa.nulls(length, type_)
        elif _is_string(type_):
            offsets = self._read(name, "offsets", start * 4, (length + 1) * 4)
            values = pa.Array.from_buffers(type_, length, [validity, offsets, self._read(name, "data", 0, self.bytes[name])], nulls)
        elif pa.types.is_boolean(type_):
            bits = np.packbits(np.frombuffer(self._read(name, "data", start, length), np.uint8), bitorder="little")
            values = pa.Array.from_buffers(type_, length, [validity, pa.py_buffer(bits)], nulls)
        else:
            width = type_.bit_width // 8
            values = pa.Array.from_buffers(type_, length, [validity, self._read(name, "data", start * width, length * width)], nulls)
        return [values] + ([pa.nulls(stop - end, type_)] if end < stop else [])

    def _read(self, name: str, kind: str, offset: int, size: int) -> pa.Buffer:
        """`size` bytes of a column's file from `offset` (memory-mapped: no copy)."""
        if not size:
            return pa.py_buffer(b"")
        with pa.memory_map(str(self._path(name, kind))) as source:
            return source.read_buffer().slice(offset, size)


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_binary(type_)


def _read_table(part: pa.Table | Path) -> pa.Table:
    """A chunk's table (from a file: memory-mapped, no column read until used)."""
    if isinstance(part, pa.Table):
        return part
    with pa.memory_map(str(part)) as source:
        return pa.ipc.open_file(source).read_all()


class AcceptedRows:
    """The accepted rows of a validated table, column by column (a big table's are read
    from the spill folder only when asked for). What validation found out on the way is
    handed on, so a store need not find it again:

    - `order`: the rows in the order of their key (codes: bytewise);
    - `links[column]`: for a column naming rows of a table of this load (a code's
      parent_code, a scan's code), the accepted row of that table it names, or -1 when it
      names none of them (nothing, or a row already stored).
    """

    def __init__(self, chunks: _Chunks, keep: np.ndarray, schema: pa.Schema):
        self._chunks, self.schema = chunks, schema
        self._rows = (np.flatnonzero(keep).astype(np.int32 if len(keep) < 2**31 else np.int64)  # the rows kept, None: all
                      if not keep.all() else None)
        self.num_rows = int(keep.sum())
        self.order: np.ndarray | None = None
        self.links: dict[str, np.ndarray] = {}
        self._taken: tuple[np.ndarray, np.ndarray] | None = None  # the last `rows` taken, as rows of all the chunks
        self._taking = threading.Lock()  # guards `_taken`

    @classmethod
    def of(cls, table: pa.Table) -> AcceptedRows:
        """Rows already typed and accepted (tasks)."""
        chunks = _Chunks(None)
        chunks.add(table.num_rows, table, None)
        return cls(chunks, np.ones(table.num_rows, bool), table.schema)

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def column(self, name: str) -> pa.Array:
        """Column `name` of every accepted row, as one array."""
        values = _combined(self._chunks.column(name, self.schema.field(name).type))
        return values if self._rows is None else values.take(pa.array(self._rows))

    def take(self, name: str, rows: np.ndarray) -> pa.Array:
        """Column `name` of the accepted rows at `rows` (a copy of those values only).
        Columns taken at the same `rows` (the same array), one after another or at once on
        several threads, share the work of finding those rows."""
        with self._taking:
            if self._taken is None or self._taken[0] is not rows:
                self._taken = (rows, rows if self._rows is None else self._rows[rows])
            found = self._taken[1]
        return gather(_combined(self._chunks.column(name, self.schema.field(name).type)), found)

    def to_table(self) -> pa.Table:
        """All accepted rows in memory (fine for small tables; big ones: column by column)."""
        return pa.Table.from_arrays([self.column(name) for name in self.schema.names], schema=self.schema)


def _combined(values: pa.ChunkedArray) -> pa.Array:
    chunks = [c for c in values.chunks if len(c)]
    return chunks[0] if len(chunks) == 1 else values.combine_chunks()


# ---------------------------------------------------------------- verdicts


class _Verdicts:
    """Which rows are still valid (`ok`) and the first failing reason of each rejected row."""

    def __init__(self, n: int):
        self.ok = np.ones(n, bool)
        self.failed: list[tuple[np.ndarray, str | list[str]]] = []  # (rows, one reason or one per row)

    def fail(self, mask: np.ndarray | pa.Array | pa.ChunkedArray, reason: str | Callable[[np.ndarray], list[str]]) -> None:
        """Reject the rows in `mask` that have no reason yet: `reason`, or `reason(rows)`,
        one per row."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else mask.to_numpy()
        rows = np.flatnonzero(np.asarray(mask, dtype=bool) & self.ok)
        if len(rows):
            self.ok[rows] = False
            self.failed.append((rows, reason if isinstance(reason, str) else reason(rows)))

    def fail_values(self, mask: np.ndarray, template: str, column: str) -> None:
        """Reject rows in `mask` with `template` formatted with the row's raw `column` value."""
        self.fail(mask, lambda rows: [template.format(v) for v in self.values(column, rows)])

    def values(self, column: str, rows: np.ndarray) -> list:
        raise NotImplementedError


class _Rows(_Verdicts):
    """A chunk of raw rows under validation."""

    def __init__(self, spec: TableSpec, raw: pa.Table):
        super().__init__(raw.num_rows)
        self.spec = spec
        self.raw = raw
        self.n = raw.num_rows
        self.held = np.zeros(raw.num_rows, bool)
        self._columns: dict[str, pa.Array] = {}

    def hold(self, mask: np.ndarray) -> None:
        """Leave the rows in `mask` that have no reason yet undecided until the whole table
        is read: not ok meanwhile (`_TableValidation.accept_held`, `reject_held` decide)."""
        mask = np.asarray(mask, bool) & self.ok
        self.held |= mask
        self.ok[mask] = False

    def col(self, name: str) -> pa.Array | pa.ChunkedArray:
        """The raw column `name` (nulls if the chunk has none): the same array every time."""
        if name not in self._columns:
            self._columns[name] = self.raw.column(name) if name in self.raw.column_names else pa.nulls(self.n, pa.string())
        return self._columns[name]

    def values(self, column: str, rows: np.ndarray) -> list:
        return pc.take(self.col(column), pa.array(rows)).to_pylist()


def _parse_ts(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """ISO 8601 with or without offset (no offset = UTC) -> timestamp[us, UTC]; bad -> null.
    A column that repeats its values (production hours, say) is parsed value by value."""
    if len(values) > 65_536 and pc.count_distinct(values.slice(0, 8192)).as_py() < 4096:
        encoded = pc.dictionary_encode(values)  # few distinct values: a small, fast hash table
        if isinstance(encoded, pa.ChunkedArray):  # its chunks share one dictionary: only their indices are combined
            encoded = encoded.unify_dictionaries().combine_chunks()
        return _parse_ts(encoded.dictionary).take(encoded.indices)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return pa.concat_arrays([_parse_ts_fast(chunk) for chunk in chunks]) if chunks else pa.array([], TS_TYPE)


_TS_HEAD = 19  # bytes of YYYY-MM-DDTHH:MM:SS, and where its separators are:
_TS_SEPARATORS = {4: ord("-"), 7: ord("-"), 10: ord("T"), 13: ord(":"), 16: ord(":")}
# pandas reads a time as nanoseconds when some value in the same call has a finer
# fraction than microseconds: only years inside that range read the same in any company
_TS_YEARS = [int.from_bytes(year, "big") for year in (b"1678", b"2261")]
_EPOCH_2000_US = 946_684_800 * 1_000_000


def _parse_ts_fast(values: pa.StringArray) -> pa.Array:
    """`_parse_ts_exact` of `values`, sooner: a value that starts YYYY-MM-DDTHH:MM:SS
    (years 1678-2261) and goes on with a suffix (offset, fraction, or none) is that time as Arrow reads it
    (strictly: no Feb 30 or 24:00) shifted by the suffix as `_parse_ts_exact` reads it
    after 2000-01-01T00:00:00, when that is a whole number of microseconds. Other values
    are parsed by `_parse_ts_exact`, and so is the whole array if Arrow refuses a time."""
    binary = values.cast(pa.binary())
    rows = np.flatnonzero(pc.greater_equal(pc.fill_null(pc.binary_length(binary), 0), _TS_HEAD).to_numpy(zero_copy_only=False))
    candidates = binary if len(rows) == len(values) else binary.take(pa.array(rows))
    heads = pc.binary_slice(candidates, 0, _TS_HEAD)
    start = heads.buffers()[1] and int(np.frombuffer(heads.buffers()[1], np.int32, 1, heads.offset * 4)[0])
    matrix = np.frombuffer(heads.buffers()[2] or b"", np.uint8, _TS_HEAD * len(heads), start).reshape(-1, _TS_HEAD)
    year = np.ascontiguousarray(matrix[:, :4]).view(">u4")[:, 0]  # its text, compared as a number
    ok = (year >= _TS_YEARS[0]) & (year <= _TS_YEARS[1])
    for place, separator in _TS_SEPARATORS.items():
        ok &= matrix[:, place] == separator
    tails = pc.dictionary_encode(pc.binary_slice(candidates, _TS_HEAD, 2**31 - 1))
    shift = _ts_shifts(tails.dictionary.to_pylist())[tails.indices.to_numpy(zero_copy_only=False)]
    ok &= shift != _NO_SHIFT
    try:
        heads = heads if ok.all() else heads.filter(pa.array(ok))
        times = heads.cast(pa.string()).cast(pa.timestamp("us")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        return _parse_ts_exact(values)
    micros = np.zeros(len(values), np.int64)
    micros[rows[ok]] = times + shift[ok]
    done = np.zeros(len(values), bool)
    done[rows[ok]] = True
    rest = np.flatnonzero(~done & pc.is_valid(values).to_numpy(zero_copy_only=False))
    if len(rest):
        exact = _parse_ts_exact(values.take(pa.array(rest)))
        micros[rest] = exact.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        done[rest] = exact.is_valid().to_numpy(zero_copy_only=False)
    return pa.array(micros, TS_TYPE, mask=~done)


_NO_SHIFT = np.iinfo(np.int64).min


def _ts_shifts(suffixes: list[bytes]) -> np.ndarray:
    """Per suffix of a time: its shift in microseconds as `_parse_ts_exact` reads it
    after 2000-01-01T00:00:00 (an offset: minus it; a fraction: plus it); _NO_SHIFT if
    that is not a time or not a whole number of microseconds."""
    series = pd.Series(["2000-01-01T00:00:00" + s.decode("utf-8", "replace") for s in suffixes], dtype=object)
    parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce").astype("datetime64[ns, UTC]")
    nanos = parsed.astype("int64").to_numpy() - _EPOCH_2000_US * 1000
    good = parsed.notna().to_numpy() & (nanos % 1000 == 0)
    return np.where(good, nanos // 1000, _NO_SHIFT)


# the seconds of a time and its fraction (a decimal point or comma, ISO 8601's preferred
# sign): pandas reads only the point, and every time of a call in nanoseconds when one
# fraction is finer than microseconds (then the years outside 1678-2262 of the others fail)
_TS_FRACTION = r"^(\d{4}-?\d{2}-?\d{2}[T ]\d{2}(?::?\d{2}){2})[.,](\d{1,6})\d*"


def _parse_ts_exact(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The reference parser of times (pandas, value by value): any ISO 8601 form pandas
    reads, a fraction of a second after a point or a comma, cut to microseconds; `t` and
    `z` as `T` and `Z` (RFC 3339)."""
    values = pc.replace_substring_regex(pc.utf8_upper(values), _TS_FRACTION, r"\1.\2")
    # pandas reads the chunks as they are (combining them first would copy the text)
    series = pd.Series(pd.arrays.ArrowStringArray(values)) if len(values) else pd.Series([], dtype=object)
    parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
    return pa.array(parsed.astype("datetime64[us, UTC]"), type=TS_TYPE, from_pandas=True)


def _parse_float(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Decimal text -> float64; bad, NaN and infinite values -> null."""
    try:
        parsed = values.cast(pa.float64())
    except pa.ArrowInvalid:  # some value is not a number: pandas decides, value by value
        numbers = pd.to_numeric(pd.Series(values.to_numpy(zero_copy_only=False)), errors="coerce")
        parsed = pa.array(numbers.astype(float), pa.float64(), from_pandas=True)
    return pc.if_else(pc.is_finite(parsed), parsed, None)


def _typed_columns(rows: _Rows) -> dict[str, pa.Array]:
    """Check required values, enums, numbers and times; returns the typed columns (a
    column missing from the chunk is all nulls here; a table without it anywhere is
    `_TableValidation`'s to reject)."""
    typed: dict[str, pa.Array] = {}
    for column in rows.spec.columns:
        values = rows.col(column.name)
        present = pc.is_valid(values).to_numpy(zero_copy_only=False)
        if column.required:
            rows.fail(~present, f"missing required value: {column.name}")
        if column.name in ID_COLUMNS:
            too_long = pc.fill_null(pc.greater(pc.binary_length(values), MAX_ID_LENGTH), False)
            if pc.any(too_long).as_py():  # bytes > characters: only then count characters
                too_long = pc.fill_null(pc.greater(pc.utf8_length(values), MAX_ID_LENGTH), False)
                rows.fail(too_long, f"{column.name} longer than {MAX_ID_LENGTH} characters")
        if column.type == "enum":
            allowed = pc.is_in(values, value_set=pa.array(column.values)).to_numpy(zero_copy_only=False)
            rows.fail_values(present & ~allowed,
                             f"bad {column.name} {{!r}}: expected one of {', '.join(column.values)}",
                             column.name)
            typed[column.name] = values
        elif column.type == "ts":
            parsed = _parse_ts(values)
            rows.fail_values(present & pc.is_null(parsed).to_numpy(zero_copy_only=False),
                             f"bad timestamp in {column.name}: {{!r}}", column.name)
            typed[column.name] = parsed
        elif column.type == "float":
            parsed = _parse_float(values)
            rows.fail_values(present & pc.is_null(parsed).to_numpy(zero_copy_only=False),
                             f"bad number in {column.name}: {{!r}}", column.name)
            typed[column.name] = parsed
        else:
            typed[column.name] = values
    return typed


def _with_content_ids(ids: pa.Array, columns: dict[str, pa.Array], names: tuple[str, ...], prefix: str) -> pa.Array:
    """`ids`, with a stable id derived from the row's content where it is missing."""
    missing = pc.is_null(ids).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(missing)
    if not len(rows):
        return ids
    taken = pa.array(rows)
    frame = pd.DataFrame({name: pd.Series(pd.arrays.ArrowStringArray(pc.take(columns[name], taken).cast(pa.string())))
                          for name in names})
    hashed = pa.array(pd.util.hash_pandas_object(frame, index=False).to_numpy(), pa.uint64())
    derived = pc.binary_join_element_wise(prefix, hashed.cast(pa.string()), "")  # prefix and the hash in decimal
    return pc.replace_with_mask(string_array(ids), pa.array(missing), derived)


def _same_values(a: Callable[[str], pa.ChunkedArray | pa.Array], rows_a: np.ndarray,
                 b: Callable[[str], pa.ChunkedArray | pa.Array], rows_b: np.ndarray, names: list[str]) -> np.ndarray:
    """Per pair, whether row rows_a[i] of columns `a(name)` and row rows_b[i] of columns
    `b(name)` hold the same values (both missing counts as the same) in every column of
    `names`."""
    same = np.ones(len(rows_a), bool)
    if not len(rows_a):
        return same
    ia, ib = pa.array(rows_a), pa.array(rows_b)
    for name in names:
        x = pc.take(a(name), ia)
        y = pc.take(b(name), ib)
        if y.type != x.type:
            y = y.cast(x.type)
        equal = pc.fill_null(pc.equal(x, y), False)
        both_missing = pc.and_(pc.is_null(x), pc.is_null(y))
        same &= pc.or_(equal, both_missing).to_numpy(zero_copy_only=False)
    return same


# ---------------------------------------------------------------- one table


class _TableValidation(_Verdicts):
    """One table's validation over all its chunks: typing and `check` (the table's rules
    of a row on its own) chunk by chunk as the chunks arrive, then the rules across rows:
    de-duplication by key and comparison with stored rows (rows numbered across chunks).
    Rows that `check` holds (their verdict needs the whole table) keep their raw values
    (spilled with the chunks) until `accept_held` or `reject_held` decides them."""

    def __init__(self, name: str, chunks: Iterable[RawTable], known: Known, *, spill: Path | None = None,
                 check: Callable[[_Rows, dict[str, pa.Array]], None] | None = None, late_rejects: bool = True):
        """`late_rejects`: whether the rules across rows can reject a row (else a chunk's
        rejects are recorded at once, and its raw values are let go)."""
        self.spec = TABLES[name]
        self.known = known
        self.chunks = _Chunks(spill / name if spill is not None else None)
        self._held = _Chunks(spill / name / "held" if spill is not None else None)  # raw values of the held rows
        held: list[np.ndarray] = []
        self.pre_rejects: list[Reject] = []
        self._early: list[tuple[int, Reject]] = []  # (row, reject) recorded with their chunk
        failed, oks, present = [], [], set()
        try:
            for raw in chunks:
                rows = _Rows(self.spec, raw.data)
                typed = _typed_columns(rows)
                if check is not None:
                    check(rows, typed)
                start = self.chunks.n
                present.update(raw.data.column_names)
                self.pre_rejects += raw.rejects
                oks.append(rows.ok)
                if rows.held.any():
                    found = np.flatnonzero(rows.held)
                    held.append(found + start)
                    self._held.add(len(found), pa.table({"row": found + start}), raw.data.take(pa.array(found)))
                # A table without a required column rejects every row once it is read (below).
                late = late_rejects or any(c.required and c.name not in raw.data.column_names for c in self.spec.columns)
                if late:
                    failed += [(found + start, reason) for found, reason in rows.failed]
                    differing = {k: v for k, v in typed.items() if v is not rows.col(k)}
                    self.chunks.add(rows.n, pa.table(differing), raw.data)
                else:  # the chunk's raw columns are let go (`add` records the names of those it keeps)
                    self.chunks.names.update(dict.fromkeys(raw.data.column_names))
                    self._early += self._records(rows.failed, lambda found, raw=raw.data: raw.take(pa.array(found)).to_pylist(), start)
                    extras = {name: rows.col(name) for name in raw.data.column_names
                              if name not in self.spec.column_names and name not in META_COLUMNS}
                    self.chunks.add(rows.n, pa.table({**typed, **extras}), None)
        finally:  # every chunk on file (or the load failing) before the rules across rows
            self.chunks.flush()
            self._held.flush()
        super().__init__(self.chunks.n)
        self.ok = np.concatenate(oks) if oks else self.ok
        self.failed = failed
        self._held_rows = np.concatenate(held) if held else np.zeros(0, np.int64)  # every held row, ascending
        self.undecided = self._held_rows  # the held rows not decided yet
        missing = [c.name for c in self.spec.columns if c.required and c.name not in present]
        if missing and self.chunks.n:  # the table has no such column at all: every row fails so
            self.ok[:] = False
            self.failed = [(np.arange(self.chunks.n), f"missing required column: {missing[0]}")]
            self._early = []
            self.undecided = self._held_rows[:0]
        extras = [name for name in self.chunks.names if name not in self.spec.column_names and name not in META_COLUMNS]
        self.schema = pa.schema([pa.field(c.name, TYPES[c.type]) for c in self.spec.columns]
                                + [pa.field(name, pa.string()) for name in extras])
        self.duplicate = np.zeros(self.chunks.n, bool)
        self._index: StringKeys | None = None

    @property
    def n(self) -> int:
        return self.chunks.n

    def column(self, name: str) -> pa.ChunkedArray:
        """The typed column `name` of every row."""
        return self.chunks.column(name, self.schema.field(name).type)

    def part(self, i: int, name: str) -> pa.ChunkedArray:
        """The typed column `name` of the rows of chunk i."""
        return self.chunks.part(i, name, self.schema.field(name).type)

    def array(self, name: str) -> pa.Array:
        """The typed column `name` of every row, as one array."""
        return _combined(self.column(name))

    def values(self, column: str, rows: np.ndarray) -> list:
        return pc.take(self.column(column), pa.array(rows)).to_pylist()

    def key(self) -> pa.Array:
        return self.array(self.spec.key[0])

    def index(self) -> StringKeys:
        """The key column prepared for lookups."""
        if self._index is None:
            self._index = StringKeys(self.key())
        return self._index

    def dedupe_input(self, *, conflicts_rejected: bool) -> None:
        """Rows repeating an earlier valid row's key: identical ones are duplicates; others
        are rejected (`conflicts_rejected`) or also counted as duplicates (event ids)."""
        name = self.spec.key[0]
        first = self.index().first_rows(among=self.ok)
        idx = np.flatnonzero((first >= 0) & (first != np.arange(self.n)))
        if not len(idx):
            return
        if not conflicts_rejected:
            self.duplicate[idx] = True
            return
        canonical = list(self.spec.column_names)
        same = _same_values(self.column, idx, self.column, first[idx], canonical)
        self.duplicate[idx[same]] = True
        conflict = np.zeros(self.n, bool)
        conflict[idx[~same]] = True
        self.fail_values(conflict, f"conflicting duplicate {name} {{!r}} (an earlier row has other values)", name)

    def accept_held(self, accept: np.ndarray) -> None:
        """The undecided rows where `accept` (one per undecided row) is true are valid."""
        self.ok[self.undecided[accept]] = True
        self.undecided = self.undecided[~accept]

    def reject_held(self, reasons: list[str]) -> None:
        """Rejects every undecided row, with its reason (one per undecided row)."""
        at = np.searchsorted(self._held_rows, self.undecided)  # their rows among the held ones
        self._early += [(int(self._held_rows[i]), reject)
                        for i, reject in self._records([(at, reasons)], self._held.raw_rows)]
        self.undecided = self.undecided[:0]

    def stored_rows(self) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """(live rows whose key is stored, their rows in `stored`, stored): the stored rows
        with the keys of the live input rows."""
        live = self.ok & ~self.duplicate
        stored = self.known.stored(self.spec.name, self.key())  # (with the keys of rows not live: they do not match below)
        if stored.num_rows == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), stored
        rows = self.index().positions(stored.column(self.spec.key[0]), among=live)  # live keys are unique
        found = np.flatnonzero(rows >= 0)
        found = found[np.argsort(rows[found], kind="stable")]
        first = np.ones(len(found), bool)  # the first stored row of a key, should one repeat
        first[1:] = rows[found][1:] != rows[found][:-1]
        return rows[found][first], found[first], stored

    def compare_with_store(self) -> None:
        """Marks rows that change nothing stored as duplicates (`leaves_unchanged`)."""
        rows, at, stored = self.stored_rows()
        self.duplicate[rows[self.leaves_unchanged(rows, stored, at)]] = True

    def leaves_unchanged(self, rows: np.ndarray, stored: pa.Table, at: np.ndarray) -> np.ndarray:
        """Per row rows[i], whether writing it over stored row at[i] changes nothing: each of
        its values, in every column it has (unknown ones too), is empty (an update keeps the
        stored value it leaves empty) or the stored value."""
        same, rows, at = np.ones(len(rows), bool), pa.array(rows), pa.array(at)
        for name in self.schema.names:
            new = pc.take(self.column(name), rows)
            old = pc.take(stored.column(name), at).cast(new.type) if name in stored.column_names else None
            kept = pc.is_null(new) if old is None else pc.or_kleene(pc.is_null(new), pc.equal(new, old))
            same &= pc.fill_null(kept, False).to_numpy(zero_copy_only=False)
        return same

    def rejects(self) -> list[Reject]:
        """The reject records: the readers' first, then the rows' in row order."""
        late = self._records(self.failed, self.chunks.raw_rows)
        return self.pre_rejects + [reject for _, reject in sorted(self._early + late, key=lambda pair: pair[0])]

    def _records(self, failed: list[tuple[np.ndarray, str | list[str]]], raw_rows: Callable[[np.ndarray], list[dict]],
                 start: int = 0) -> list[tuple[int, Reject]]:
        """(row + start, reject record) of the failed rows; `raw_rows(rows)` gives their raw
        rows (ascending rows)."""
        if not failed:
            return []
        bad = np.concatenate([rows for rows, _ in failed])
        reasons = [r for rows, reason in failed for r in ([reason] * len(rows) if isinstance(reason, str) else reason)]
        order = np.argsort(bad, kind="stable")
        names = [name for name in self.chunks.names if name not in META_COLUMNS]  # in the order first seen
        return [(int(bad[i]) + start, Reject(self.spec.name, row["_file"], row["_line"], reasons[i],
                                             {k: row[k] for k in names if row.get(k) is not None}))
                for i, row in zip(order, raw_rows(bad[order]))]

    def outcome(self) -> TableOutcome:
        """The accepted rows, the rejects and the counts; ends the validation."""
        keep = self.ok & ~self.duplicate
        accepted = AcceptedRows(self.chunks, keep, self.schema) if self.n else None
        self._index = None
        return TableOutcome(accepted=accepted, rejects=self.rejects(), duplicates=int((self.ok & self.duplicate).sum()),
                            read=self.n + len(self.pre_rejects))


# ---------------------------------------------------------------- the dataset


def one_malloc_heap() -> None:
    """Has glibc's malloc give threads that need a heap from now on the one it has
    (M_ARENA_MAX = 1), as numpy's allocations go through it: by default each thread
    allocating while another does gets a heap of its own, which keeps the memory freed in
    it, and with a load's lookup and writer threads that held 100-200 MB more at the peak
    of a 10M-scan load. Called when a load starts (not at import: a server's request
    threads keep their heaps). Nothing off glibc."""
    _glibc_malloc("mallopt", -8, 1)  # M_ARENA_MAX


def release_memory() -> None:
    """Hands the memory the allocators kept for reuse back to the system: Arrow's pool, and
    the free pages inside glibc's heap (malloc_trim), where numpy's arrays under 32 MB live.
    Called between the phases of a load, so that memory one phase freed does not stay
    resident while the next one allocates other memory (Arrow's and numpy's allocators do
    not share it). At scale 1000 the trim lowers the peak from 1788-1828 MiB to 1603-1640."""
    pa.default_memory_pool().release_unused()
    _glibc_malloc("malloc_trim", 0)


def _glibc_malloc(function: str, *args: int) -> None:
    """Calls glibc's malloc tuning `function` (nothing where the C library is not glibc)."""
    call = getattr(_c_library(), function, None)
    if call is not None:
        call(*args)


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """The process's C library (None where it cannot be loaded)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def validate_dataset(raw: dict[str, Iterable[RawTable]], known: Known, *, spill: Path | None = None) -> Validated:
    """Validate every table of a load, in reference order, against this load and `known`.
    `raw` holds each table's chunks (lists, or iterators that read them); each table's are
    taken out (`raw.pop`) and consumed as it is validated. The chunks of the big tables
    (SPILLED) go to `spill` if given, else stay in memory."""
    out: dict[str, TableOutcome] = {}
    regions = _validate_regions(raw.pop("regions", []), known)
    out["regions"] = regions
    out["products"] = _validate_simple("products", raw.pop("products", []), known)
    region_ids = _all_keys(known.regions().column("region_id"), regions.accepted, "region_id")
    parties = _validate_parties(raw.pop("parties", []), known, region_ids)
    out["parties"] = parties
    new_parties = parties.accepted.column("party_id") if parties.accepted is not None else pa.array([], pa.string())
    refused_parties = _refused_ids(parties, new_parties, known)
    out["codes"], loaded_code = _validate_codes(raw.pop("codes", []), known, spill)
    release_memory()
    out["referrals"], implicit_ref = _validate_events("referrals", raw.pop("referrals", []), known, region_ids,
                                                      new_parties, refused_parties, loaded_code, spill, [])
    handed_over = [loaded_code]  # the scans are the last to look codes up: they let the index go
    del loaded_code
    out["scans"], implicit_scan = _validate_events("scans", raw.pop("scans", []), known, region_ids, new_parties,
                                                   refused_parties, handed_over.pop(), spill, implicit_ref)
    release_memory()
    out["tasks"] = _validate_tasks(raw.pop("tasks", []), known)
    for name in ("epcis_events", "retractions"):
        if name in raw:
            out[name] = _validate_simple(name, raw.pop(name), known)
    implicit = _implicit_consumers(implicit_scan + implicit_ref)
    return Validated({t: out[t] for t in LOAD_ORDER if t in out}, implicit)


def _refused_ids(parties: TableOutcome, accepted: pa.Array, known: Known) -> pa.Array:
    """The ids of rejected parties rows that no accepted row or stored party has: events
    naming them are rejected for that reason (a rejected store's scan registering it as a
    new consumer would hide the mistake)."""
    ids = pa.array({r.row.get("party_id") for r in parties.rejects if isinstance(r.row, dict)} - {None}, pa.string())
    stored = known.stored("parties", ids).column("party_id").combine_chunks()
    existing = pa.concat_arrays([accepted.cast(pa.string()), stored.cast(pa.string())])
    return ids.filter(pc.invert(pc.is_in(ids, value_set=existing)))


def _all_keys(stored: pa.Array | pa.ChunkedArray, accepted: AcceptedRows | None, key: str) -> pa.Array:
    parts = [stored.combine_chunks() if isinstance(stored, pa.ChunkedArray) else stored]
    if accepted is not None and accepted.num_rows:
        parts.append(accepted.column(key))
    return pa.concat_arrays([p.cast(pa.string()) for p in parts]) if parts else pa.array([], pa.string())


def _validate_simple(name: str, chunks: Iterable[RawTable], known: Known) -> TableOutcome:
    def check(rows: _Rows, typed: dict[str, pa.Array]) -> None:
        if name == "products":
            rows.fail(pc.fill_null(pc.less(typed["unit_price"], 0), False), "unit_price must not be negative")

    v = _TableValidation(name, chunks, known, check=check)
    v.dedupe_input(conflicts_rejected=True)
    v.compare_with_store()
    return v.outcome()


def _validate_regions(chunks: Iterable[RawTable], known: Known) -> TableOutcome:
    v = _TableValidation("regions", chunks, known)
    v.dedupe_input(conflicts_rejected=True)
    stored = known.regions().to_pandas()
    ids = v.array("region_id").to_numpy(zero_copy_only=False)
    parents = v.array("parent_id").to_numpy(zero_copy_only=False)
    has_parent = pd.notna(parents)

    def reject_orphans() -> None:
        while True:  # a rejected region makes its children's parent unknown
            live = v.ok & ~v.duplicate
            known_ids = set(stored["region_id"]) | set(ids[live])
            unknown = has_parent & ~np.isin(parents, list(known_ids)) & v.ok
            if not unknown.any():
                return
            v.fail_values(unknown, "unknown parent region {!r}", "parent_id")

    reject_orphans()
    live = v.ok & ~v.duplicate
    tree = nx.DiGraph()
    tree.add_edges_from(zip(stored["region_id"], stored["parent_id"]))
    tree.remove_edges_from([(a, b) for a, b in zip(ids[live], parents[live])])
    tree.add_edges_from((a, b) for a, b, h in zip(ids[live], parents[live], has_parent[live]) if h)
    tree.remove_nodes_from([n for n in list(tree) if pd.isna(n)])
    in_cycle: dict[str, str] = {}
    for cycle in nx.simple_cycles(tree):
        text = _cycle_text(cycle)
        for node in cycle:
            in_cycle[node] = text
    if in_cycle:
        mask = np.array([i in in_cycle for i in ids], bool) & live
        v.fail(mask, lambda rows: [f"region tree cycle: {in_cycle[ids[i]]}" for i in rows])
        reject_orphans()
    v.compare_with_store()
    return v.outcome()


def _validate_parties(chunks: Iterable[RawTable], known: Known, region_ids: pa.Array) -> TableOutcome:
    known_regions = set(region_ids.to_pylist())

    def check(rows: _Rows, typed: dict[str, pa.Array]) -> None:
        kind = typed["kind"].to_numpy(zero_copy_only=False)
        region = typed["region_id"]
        needs_region = np.isin(kind, ["distributor", "store"])
        rows.fail(needs_region & pc.is_null(region).to_numpy(zero_copy_only=False),
                  lambda found: [f"a {k} needs region_id" for k in kind[found]])
        bad_region = pc.is_valid(region).to_numpy(zero_copy_only=False) & ~pc.is_in(region, value_set=region_ids).to_numpy(zero_copy_only=False)
        rows.fail_values(bad_region, "unknown region {!r}", "region_id")
        territory = typed["territory"].to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(pd.notna(territory) & rows.ok):
            missing = [r for r in (t.strip() for t in territory[i].split("|")) if r and r not in known_regions]
            if missing:
                rows.fail(np.arange(rows.n) == i, f"unknown territory region {missing[0]!r}")

    v = _TableValidation("parties", chunks, known, check=check)
    v.dedupe_input(conflicts_rejected=True)
    ids = v.array("party_id").to_numpy(zero_copy_only=False)
    upstream = v.array("upstream_id")
    has_up = pc.is_valid(upstream).to_numpy(zero_copy_only=False)
    while True:
        live = v.ok & ~v.duplicate
        stored_up = known.stored("parties", pc.filter(upstream, pa.array(has_up & live))).column("party_id")
        pool = pa.concat_arrays([pa.array(ids[live], pa.string()), stored_up.combine_chunks().cast(pa.string())])
        unknown = has_up & v.ok & ~pc.is_in(upstream, value_set=pool).to_numpy(zero_copy_only=False)
        if not unknown.any():
            break
        v.fail_values(unknown, "unknown upstream party {!r}", "upstream_id")
    v.compare_with_store()
    return v.outcome()


def _validate_codes(chunks: Iterable[RawTable], known: Known, spill: Path | None) -> tuple[TableOutcome, Callable[[pa.Array], tuple[np.ndarray, np.ndarray]]]:
    """The outcome, and a lookup of values among the codes of this load: (whether each is
    one, its row among the accepted codes or -1)."""
    v = _TableValidation("codes", chunks, known, spill=spill)
    v.dedupe_input(conflicts_rejected=True)
    parent = v.array("parent_code")
    level_rank = _level_ranks(v.array("level"))
    has_parent = pc.is_valid(parent).to_numpy(zero_copy_only=False)
    stored_parents = known.stored("codes", parent)
    # A parent is the first valid input row with its code (later ones are duplicates or
    # rejected), else the stored code. Rejecting a row only ever removes parents.
    parent_row = v.index().positions(parent, among=v.ok).astype(np.int32 if v.n < 2**31 else np.int64)
    stored_at = positions(parent, stored_parents.column("code")) if stored_parents.num_rows else None
    stored_rank = _level_ranks(stored_parents.column("level"))
    del parent
    while True:
        live = v.ok & ~v.duplicate
        in_load = (parent_row >= 0) & live[np.maximum(parent_row, 0)]
        unknown = has_parent & v.ok & ~in_load
        if stored_at is not None:
            unknown &= stored_at < 0
        if unknown.any():
            v.fail_values(unknown, "unknown parent_code {!r}", "parent_code")
            continue
        linked = has_parent & v.ok
        parent_rank = np.where(in_load, level_rank[np.maximum(parent_row, 0)],
                               stored_rank[np.maximum(stored_at, 0)] if stored_at is not None else -1)
        inverted = linked & (parent_rank <= level_rank)
        if not inverted.any():
            break
        suspicious = np.flatnonzero(inverted)
        codes, parents = v.values("code", suspicious), v.values("parent_code", suspicious)
        cycles = _packaging_cycles(codes, parents)
        if cycles:
            on_cycle = np.zeros(v.n, bool)
            on_cycle[suspicious[[c in cycles for c in codes]]] = True
            v.fail(on_cycle, lambda rows: [f"packaging cycle: {cycles[c]}" for c in v.values("code", rows)])
        v.fail(inverted, lambda rows: [
            f"level inversion: {level} packed in a code of level {list(LEVEL_RANK)[int(parent_rank[i])]} ({parent!r}); "
            "a parent must be a higher level"
            for i, level, parent in zip(rows, v.values("level", rows), v.values("parent_code", rows))])
    del stored_at, level_rank, has_parent
    _check_immutable_codes(v)
    keep = v.ok & ~v.duplicate
    accepted_row = np.full(v.n + 1, -1, parent_row.dtype)  # and a last -1, for the rows not found (-1)
    accepted_row[:-1][keep] = np.arange(int(keep.sum()), dtype=accepted_row.dtype)
    valid_codes = v.index().within(v.ok.copy())  # valid rows: accepted, or the same as a stored or earlier row
    outcome = v.outcome()  # lets the index of every row go
    if outcome.accepted is not None:
        by_code = valid_codes.order()
        outcome.accepted.order = accepted_row[by_code[keep[by_code]]]
        del by_code
        outcome.accepted.links["parent_code"] = accepted_row[parent_row[keep]]
    del parent_row

    def lookup(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        found = valid_codes.positions(values)
        return found >= 0, accepted_row[found]

    return outcome, lookup


def _level_ranks(levels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each level's packaging rank (index in LEVELS), -1 for none."""
    return pc.fill_null(pc.index_in(levels, value_set=pa.array(list(LEVEL_RANK))), -1).to_numpy(zero_copy_only=False).astype(np.int8)


def _packaging_cycles(codes: list[str], parents: list[str]) -> dict[str, str]:
    """Codes on a parent_code cycle among these (suspicious: non-increasing level) links."""
    graph = nx.DiGraph()
    graph.add_edges_from(zip(codes, parents))
    found: dict[str, str] = {}
    for cycle in nx.simple_cycles(graph):
        text = _cycle_text(cycle)
        for node in cycle:
            found.setdefault(node, text)
    return found


def _cycle_text(cycle: list[str]) -> str:
    """`a -> b -> a`, starting at the smallest id (networkx starts anywhere)."""
    start = cycle.index(min(cycle))
    cycle = cycle[start:] + cycle[:start]
    return " -> ".join([*cycle, cycle[0]])


def _check_immutable_codes(v: _TableValidation) -> None:
    """A stored code keeps its level and parent; an input may only fill in missing values."""
    rows, at, stored = v.stored_rows()
    if not len(rows):
        return
    conflict = np.zeros(len(rows), bool)
    for name in ("level", "parent_code", "sku", "batch"):
        a = pc.take(v.column(name), pa.array(rows))
        b = pc.take(stored.column(name), pa.array(at)).cast(a.type)
        conflict |= pc.fill_null(pc.not_equal(a, b), False).to_numpy(zero_copy_only=False)  # both given, and different
    mask = np.zeros(v.n, bool)
    mask[rows[conflict]] = True
    v.fail_values(mask, "code {!r} is already stored with another level, parent, sku or batch", "code")
    v.duplicate[rows[v.leaves_unchanged(rows, stored, at) & ~conflict]] = True


def _validate_events(name: str, chunks: Iterable[RawTable], known: Known, region_ids: pa.Array, new_parties: pa.Array,
                     refused_parties: pa.Array, loaded_code: Callable[[pa.Array], tuple[np.ndarray, np.ndarray]],
                     spill: Path | None, registered: list[pa.Table]) -> tuple[TableOutcome, list[pa.Table]]:
    """Scans and referrals: references, implicit consumers, ids and de-duplication. Returns
    the outcome (scans: with the accepted code each names, `links["code"]`) and, per
    column that may name a new consumer, its earliest rows (`_earliest_regions`).

    Only a consumer `scan` and a referral register an unknown id. Any other reference
    (the performer of a ship, receive or open, a counterparty) may name a party of the
    parties table, the store, this load's earlier tables (`registered`: the consumers they
    register) or this table: a row naming an id nobody registered so far is held until the
    table is read, then accepted once a row accepted meanwhile registers it (a held scan
    accepted so registers in turn: another round, de-duplicating again), else rejected.
    A row naming a party whose parties row was rejected (`refused_parties`) is rejected
    for that: it registers nothing."""
    party_cols = ("party_id", "counterparty_id") if name == "scans" else ("referrer_id", "referee_id")
    if name == "scans":
        implicit_cols = ["party_id"]
        id_col, id_fields, prefix = "event_id", ("code", "action", "party_id", "counterparty_id", "ts", "region_id"), "h"
    else:
        implicit_cols = ["referrer_id", "referee_id"]
        id_col, id_fields, prefix = "referral_id", ("referrer_id", "referee_id", "ts", "channel", "code"), "r"
    candidates: dict[str, list[np.ndarray]] = {c: [] for c in implicit_cols}  # per chunk: rows that may name a new consumer
    code_links: list[np.ndarray] = []  # per chunk: the accepted code each row names

    def known_party(values: pa.Array, consumers: tuple[pa.Array, ...] = ()) -> np.ndarray:
        """Whether each value names a party of the parties table, the store or `consumers`."""
        present = pc.is_valid(values).to_numpy(zero_copy_only=False)
        stored = known.stored("parties", values).column("party_id").combine_chunks()
        pool = pa.concat_arrays([new_parties.cast(pa.string()), stored.cast(pa.string()), *consumers])
        return present & pc.is_in(values, value_set=pool).to_numpy(zero_copy_only=False)

    def check(rows: _Rows, typed: dict[str, pa.Array]) -> None:
        code = typed["code"]
        has_code = pc.is_valid(code).to_numpy(zero_copy_only=False)
        stored_codes = known.stored("codes", code).column("code")
        in_load, accepted = loaded_code(code)
        code_links.append(accepted)
        unknown = has_code & ~in_load
        if unknown.any() and len(stored_codes):
            unknown &= positions(code, stored_codes) < 0
        rows.fail_values(unknown, "unknown code {!r}", "code")
        region = typed.get("region_id")
        if region is not None:
            bad_region = pc.is_valid(region).to_numpy(zero_copy_only=False) & ~pc.is_in(region, value_set=region_ids).to_numpy(zero_copy_only=False)
            rows.fail_values(bad_region, "unknown region {!r}", "region_id")
        unknown = {c: pc.is_valid(typed[c]).to_numpy(zero_copy_only=False) & ~known_party(typed[c]) for c in party_cols}
        for c, mask in unknown.items():  # among the unknown ids, those of rejected parties rows
            at = np.flatnonzero(mask)
            if len(at) and len(refused_parties):
                refused = np.zeros(rows.n, bool)
                refused[at] = pc.is_in(typed[c].take(pa.array(at)), value_set=refused_parties).to_numpy(zero_copy_only=False)
                rows.fail_values(refused, f"{c} {{!r}} names a party whose parties row was rejected", c)
        if name == "scans":
            is_scan = pc.fill_null(pc.equal(typed["action"], "scan"), False).to_numpy(zero_copy_only=False)
            rows.hold((unknown["party_id"] & ~is_scan) | unknown["counterparty_id"])
            candidates["party_id"].append(is_scan & unknown["party_id"])  # registers when the row is live
        else:
            for c in implicit_cols:
                candidates[c].append(rows.ok & unknown[c])
        typed[id_col] = _with_content_ids(typed[id_col], typed, id_fields, prefix)

    v = _TableValidation(name, chunks, known, spill=spill if name in SPILLED else None, check=check, late_rejects=False)
    del check, loaded_code  # may hold the last reference to the index of every loaded code
    stored_ids = known.stored(name, v.key()).column(id_col)

    def live_rows() -> np.ndarray:
        """Valid rows that are not duplicates (of an earlier valid row or a stored one)."""
        v.duplicate[:] = False
        v.dedupe_input(conflicts_rejected=False)
        if len(stored_ids):
            stored_rows = v.index().positions(stored_ids, among=v.ok & ~v.duplicate)  # the live row of each stored id
            v.duplicate[stored_rows[stored_rows >= 0]] = True
        return v.ok & ~v.duplicate

    def implicit_of(live: np.ndarray) -> list[pa.Table]:
        implicit = []
        for c in implicit_cols:
            mask = np.concatenate(candidates[c]) & live if candidates[c] else np.zeros(0, bool)
            parts = []  # chunk by chunk: a chunk's columns in memory at a time
            for i, (start, end) in enumerate(zip(v.chunks.starts, v.chunks.starts[1:])):
                rows = pa.array(np.flatnonzero(mask[start:end]))
                if len(rows):
                    parts.append(_earliest_regions(pa.table({
                        "party_id": v.part(i, c).take(rows), "ts": v.part(i, "ts").take(rows),
                        "region_id": v.part(i, "region_id").take(rows) if name == "scans" and c == "party_id"
                        else pa.nulls(len(rows), pa.string()),
                        "row": pc.add(rows, start).cast(pa.int64())})))
            if parts:
                implicit.append(_earliest_regions(pa.concat_tables(parts)))
        return implicit

    live = live_rows()
    implicit = implicit_of(live)
    while len(v.undecided):  # held rows, accepted in rounds as the scans accepted register consumers
        consumers = tuple(f.column("party_id").combine_chunks().cast(pa.string()) for f in [*registered, *implicit])
        held = pa.array(v.undecided)
        party, counterparty, action = (pc.take(v.column(c), held) for c in ("party_id", "counterparty_id", "action"))
        party_ok = known_party(party, consumers) | pc.fill_null(pc.equal(action, "scan"), False).to_numpy(zero_copy_only=False)
        counterparty_ok = known_party(counterparty, consumers) | pc.is_null(counterparty).to_numpy(zero_copy_only=False)
        accept = party_ok & counterparty_ok
        if not accept.any():
            v.reject_held([f"unknown party {p!r} (only a consumer scan may introduce a new party)" if not p_ok
                           else f"unknown counterparty {c!r}"
                           for p, p_ok, c in zip(party.to_pylist(), party_ok, counterparty.to_pylist())])
            break
        v.accept_held(accept)
        live = live_rows()
        implicit = implicit_of(live)
    outcome = v.outcome()
    if name == "scans" and outcome.accepted is not None:
        outcome.accepted.links["code"] = np.concatenate(code_links)[live]
    return outcome, implicit


def _earliest_regions(rows: pa.Table) -> pa.Table:
    """One row per party_id of `rows` (party_id, ts, region_id, row; `row` orders rows read
    at the same time): its earliest row that names a region, by ts then row, else a row
    without region. Applied again to such results it gives the same as to all their rows."""
    rows = rows.combine_chunks()
    row = rows.column("row").to_numpy()
    if (np.diff(row) < 0).any():  # in row order, so that ties in what follows keep it
        rows = rows.take(pa.array(sorted_rows(row)))
    encoded = pc.dictionary_encode(rows.column("party_id")).chunk(0)
    party = encoded.indices.to_numpy(zero_copy_only=False)
    ts = rows.column("ts").cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    order = np.flatnonzero(rows.column("region_id").is_valid().to_numpy(zero_copy_only=False))
    order = order[sorted_rows(party[order], ts[order])]
    starts = np.ones(len(order), bool)
    starts[1:] = party[order][1:] != party[order][:-1]
    chosen = np.full(len(encoded.dictionary), -1, np.int64)
    chosen[party[order[starts]]] = order[starts]
    any_row = np.zeros(len(encoded.dictionary), np.int64)  # for a party without region, any of its rows will do
    any_row[party] = np.arange(len(party))
    return rows.take(pa.array(np.where(chosen >= 0, chosen, any_row)))


def _implicit_consumers(frames: list[pa.Table]) -> pa.Table | None:
    """One consumer per unknown id, in id order; its region from its earliest scan that
    names one (at equal times, the first such row read: scans before referrers before
    referees). `frames` are `_earliest_regions` results in that order."""
    if not frames:
        return None
    rows = pa.concat_tables([frame.set_column(3, "row", pa.array(frame.column("row").to_numpy() + (i << 40)))
                             for i, frame in enumerate(frames)])
    rows = _earliest_regions(rows)
    rows = rows.take(pa.array(sort_order(rows.column("party_id"))))
    n = rows.num_rows
    spec = TABLES["parties"]
    columns = {c.name: pa.nulls(n, TYPES[c.type]) for c in spec.columns}
    columns["party_id"] = rows.column("party_id").combine_chunks()
    columns["kind"] = pa.array(["consumer"] * n, pa.string())
    columns["region_id"] = rows.column("region_id").combine_chunks()
    return pa.table(columns)


def _validate_tasks(chunks: Iterable[RawTable], known: Known) -> TableOutcome:
    """Free-form programme rows: kept as strings, identified by their content (`task_id`:
    a hash of the row's values by column name, whatever the order of the columns or the
    other columns of its file). A row whose content came before, in this load or stored, is
    a duplicate."""
    raws = list(chunks)
    if not raws:
        return TableOutcome()
    data = pa.concat_tables([r.data for r in raws], promote_options="permissive")
    payload = data.drop_columns([c for c in META_COLUMNS if c in data.column_names])
    contents = [json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False, sort_keys=True)
                for row in payload.to_pylist()]
    ids = pa.array([f"t{h}" for h in pd.util.hash_array(np.array(contents, object))], pa.string())
    new = np.zeros(len(ids), bool)
    new[np.unique(ids.to_numpy(zero_copy_only=False), return_index=True)[1]] = True  # the first row of each content
    stored = known.stored("tasks", ids.filter(new)).column("task_id")
    new &= ~pc.is_in(ids, value_set=stored.combine_chunks().cast(pa.string())).to_numpy(zero_copy_only=False)
    accepted = payload.filter(new).append_column("task_id", ids.filter(new))
    return TableOutcome(accepted=AcceptedRows.of(accepted), rejects=[r for raw in raws for r in raw.rejects],
                        duplicates=int((~new).sum()), read=data.num_rows)
