"""Load a dataset into a store: read, validate, write rejects, apply atomically."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from graph.errors import StoreError
from graph.model import LOAD_ORDER
from graph.store import Store
from loaders.readers import RawTable, Reject, Skipped, Source, discover, read_chunks, read_source
from loaders.validate import one_malloc_heap, validate_dataset

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class LoadReport:
    accepted: dict[str, int]
    rejected: dict[str, int]
    duplicates: dict[str, int]
    implicit_consumers: int
    rejects_path: str | None
    skipped: list[Skipped]  # the dataset's files that are not tables or EPCIS documents

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "rejected": self.rejected, "duplicates": self.duplicates,
                "implicit_consumers": self.implicit_consumers, "rejects_path": self.rejects_path,
                "skipped": [s.as_dict() for s in self.skipped]}


def _read_all(sources: list[Source], progress: Progress | None, known: Store | None) -> dict[str, list[RawTable]]:
    """Every source in memory, EPCIS documents made consistent with this load and with
    `known` (see `loaders.epcis.combine_epcis`)."""
    raw: dict[str, list[RawTable]] = {}
    epcis: list[list[RawTable]] = []
    for done, source in enumerate(sources, start=1):
        if source.table == "epcis":
            from loaders.epcis import read_epcis

            epcis.append(read_epcis(source.path))
        else:
            raw.setdefault(source.table, []).append(read_source(source))
        if progress:
            progress(f"read {source.path.name}", done, len(sources))
    if epcis:
        from loaders.epcis import combine_epcis

        for table in combine_epcis(epcis, raw, known):
            raw.setdefault(table.table, []).append(table)
    return raw


class _ReadOnDemand:
    """The tables of a dataset without EPCIS documents, each read chunk by chunk as
    validation consumes it (`pop` gives an iterator), so a table is never in memory whole."""

    def __init__(self, sources: list[Source], progress: Progress | None):
        self._sources: dict[str, list[Source]] = {}
        for source in sources:
            self._sources.setdefault(source.table, []).append(source)
        self._progress, self._done, self._total = progress, 0, len(sources)

    def __contains__(self, table: object) -> bool:
        return table in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._sources))

    def pop(self, table: str, default: list[RawTable] | None = None) -> Iterator[RawTable] | list[RawTable] | None:
        if table not in self._sources:
            return default
        return self._chunks(self._sources.pop(table))

    def _chunks(self, sources: list[Source]) -> Iterator[RawTable]:
        for source in sources:
            rows = 0
            for chunk in _read_ahead(read_chunks(source)):
                rows += chunk.data.num_rows
                if self._progress:
                    self._progress(f"load {source.path.name} ({rows:,} rows)", self._done, self._total)
                yield chunk
            self._done += 1


def _read_ahead(chunks: Iterator[RawTable]) -> Iterator[RawTable]:
    """`chunks`, the next one read by another thread while this one is validated (reading
    is mostly Arrow's work, which runs without the GIL: the second core parses)."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
        ahead = reader.submit(next, chunks, None)
        while (chunk := ahead.result()) is not None:
            ahead = reader.submit(next, chunks, None)
            yield chunk


def load_dataset(store: Store, dataset: Path, *, rejects_dir: Path, progress: Progress | None = None) -> LoadReport:
    """Load every table of `dataset` into `store`. Bad rows become reject records in a
    JSON-lines file under `rejects_dir`; the store changes all at once or not at all. Files
    that are not tables or EPCIS documents are skipped (`LoadReport.skipped`)."""
    sources, skipped = discover(Path(dataset))
    one_malloc_heap()
    with store.loading() as scratch:
        if any(source.table == "epcis" for source in sources):
            raw = _read_all(sources, progress, store)
        else:
            raw = _ReadOnDemand(sources, progress)
        read = set(raw)
        validated = validate_dataset(raw, store, spill=scratch)  # empties `raw`: each table is read as validated
        rejects = [r for outcome in validated.tables.values() for r in outcome.rejects]
        rejects_path = write_rejects(rejects, rejects_dir) if rejects else None
        del rejects
        counts = validated.counts()
        implicit = validated.implicit_consumers.num_rows if validated.implicit_consumers is not None else 0
        if progress:
            progress("write", 0, 1)
        store.apply(validated)
    tables = [t for t in LOAD_ORDER if t in read or counts["accepted"].get(t)]
    return LoadReport(
        accepted={t: counts["accepted"].get(t, 0) for t in tables},
        rejected={t: counts["rejected"].get(t, 0) for t in tables},
        duplicates={t: counts["duplicates"].get(t, 0) for t in tables},
        implicit_consumers=implicit,
        rejects_path=str(rejects_path) if rejects_path else None,
        skipped=skipped,
    )


def write_rejects(rejects: list[Reject], directory: Path) -> Path:
    """Write reject records as JSON lines; returns the file's path. StoreError if they
    cannot be written (then nothing is loaded: no row goes unaccounted for)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"load-{stamp}.jsonl"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for reject in rejects:
                f.write(_json_line(reject.as_dict()))
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise StoreError(f"{directory}: cannot write the reject records ({exc.strerror or exc}); nothing was loaded") from exc
    return path


def _json_line(record: dict) -> bytes:
    try:
        return orjson.dumps(record, default=str) + b"\n"
    except TypeError:  # what orjson refuses, e.g. an integer beyond 64 bits from a JSON document
        return json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "replace") + b"\n"
