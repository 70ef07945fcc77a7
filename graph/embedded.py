"""The embedded store: Arrow IPC tables in a versioned folder, no server needed.

Layout of a store folder::

    CURRENT            name of the live version folder (replaced atomically)
    v000007/           one file per table: regions.arrow, parties.arrow, ...
    rejects/           reject records of each load (JSON lines)
    .lock              held while a load writes

A load writes a complete new version folder next to the live one and then swaps
`CURRENT`; a load interrupted at any point leaves the previous version live, and its
half-written folder is removed by the next load. Tables are memory-mapped when read, so
re-opening a store costs milliseconds whatever its size.

Derived columns written with each version (never loaded from input):
`codes.parent_idx` (row of the parent code, -1 for none), `codes.unit_count` (units
packed inside, 1 for a unit), `scans.code_idx` (row of the scanned code). `codes` is
sorted by `code`; `scans` by code row, time, action rank and event id.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graph.errors import StoreError
from graph.model import ACTIONS, LEVELS, TABLES
from loaders.validate import TS_TYPE, Validated

log = logging.getLogger(__name__)

MASTER_TABLES = ("regions", "products", "parties", "codes")
FACT_TABLES = ("scans", "referrals", "tasks")
_TYPES = {"str": pa.string(), "enum": pa.string(), "float": pa.float64(), "ts": TS_TYPE}


def empty_table(name: str) -> pa.Table:
    """A table with the canonical columns of `name` and no rows."""
    spec = TABLES[name]
    fields = [pa.field(c.name, _TYPES[c.type]) for c in spec.columns]
    if name == "tasks":
        fields = [pa.field("task_id", pa.string())]
    return pa.schema(fields).empty_table()


class EmbeddedStore:
    """Columnar tables on disk; see the module docstring for the layout and guarantees."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.uri = str(self.path)
        self._cache: dict[str, pa.Table] = {}
        self.version = self._live_version()

    # ------------------------------------------------------------ reading

    def _live_version(self) -> Path | None:
        current = self.path / "CURRENT"
        if not current.exists():
            return None
        version = self.path / current.read_text().strip()
        if not version.is_dir():
            raise StoreError(f"{self.path}: CURRENT names {version.name}, which is missing")
        return version

    def table(self, name: str) -> pa.Table:
        """The live table `name` (memory-mapped); an empty canonical table if never loaded."""
        if name not in self._cache:
            path = self.version / f"{name}.arrow" if self.version else None
            if path is None or not path.exists():
                self._cache[name] = empty_table(name)
            else:
                try:
                    with pa.memory_map(str(path)) as source:
                        self._cache[name] = pa.ipc.open_file(source).read_all()
                except (OSError, pa.ArrowInvalid) as exc:
                    raise StoreError(f"{path}: unreadable store table: {exc}") from exc
        return self._cache[name]

    def stored(self, table: str, keys: pa.Array) -> pa.Table:
        data = self.table(table)
        if data.num_rows == 0 or len(keys) == 0:
            return data.slice(0, 0)
        key = TABLES[table].key[0] if TABLES[table].key else "task_id"
        return data.filter(pc.is_in(data.column(key), value_set=keys))

    def regions(self) -> pa.Table:
        return self.table("regions")

    def counts(self) -> dict[str, int]:
        return {name: self.table(name).num_rows for name in TABLES}

    def rejects_dir(self) -> Path:
        return self.path / "rejects"

    def close(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------ writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "w")  # noqa: SIM115 - held for the block
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write the store: {exc.strerror or exc}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def apply(self, validated: Validated) -> None:
        """Merge validated rows into a new version and make it live atomically."""
        with self._locked():
            self.version = self._live_version()
            self._cache.clear()
            for stale in self.path.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tables = {name: self._merged(name, validated) for name in TABLES}
            tables["codes"] = _with_code_links(tables["codes"])
            tables["scans"] = _sorted_scans(tables["scans"], tables["codes"])
            self._write_version(tables)

    def _merged(self, name: str, validated: Validated) -> pa.Table:
        old = self.table(name)
        outcome = validated.tables.get(name)
        new = outcome.accepted if outcome is not None and outcome.accepted is not None else None
        if name == "parties" and validated.implicit_consumers is not None:
            implicit = validated.implicit_consumers
            taken = [old.column("party_id")] + ([new.column("party_id")] if new is not None else [])
            for column in taken:
                implicit = implicit.filter(pc.invert(pc.is_in(implicit.column("party_id"), value_set=column.combine_chunks())))
            new = implicit if new is None else pa.concat_tables([new, implicit], promote_options="permissive")
        old = old.drop_columns([c for c in ("parent_idx", "unit_count", "code_idx") if c in old.column_names])
        if new is None or new.num_rows == 0:
            return old
        if name in MASTER_TABLES and old.num_rows:
            new = _fill_from_old(new, old, TABLES[name].key[0])
            key = TABLES[name].key[0]
            old = old.filter(pc.invert(pc.is_in(old.column(key), value_set=new.column(key))))
        return pa.concat_tables([old, new], promote_options="permissive").combine_chunks()

    def _write_version(self, tables: dict[str, pa.Table]) -> None:
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        number = int(self.version.name[1:]) + 1 if self.version else 1
        final = self.path / f"v{number:06d}"
        try:
            tmp.mkdir()
            for name, table in tables.items():
                path = tmp / f"{name}.arrow"
                with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table, max_chunksize=1 << 20)
                _fsync(path)
            _fsync(tmp)
            os.rename(tmp, final)
            pointer = self.path / "CURRENT.tmp"
            pointer.write_text(final.name)
            _fsync(pointer)
            os.replace(pointer, self.path / "CURRENT")
            _fsync(self.path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{self.path}: cannot write the store ({exc.strerror or exc}); the previous version is intact") from exc
        previous, self.version = self.version, final
        self._cache.clear()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill_from_old(new: pa.Table, old: pa.Table, key: str) -> pa.Table:
    """Values an update leaves empty keep their stored value."""
    hit = pc.index_in(new.column(key), value_set=old.column(key))
    if pc.all(pc.is_null(hit)).as_py():
        return new
    columns = {}
    for name in new.column_names:
        if name in old.column_names and name != key:
            previous = pc.take(old.column(name), hit)
            columns[name] = pc.coalesce(new.column(name), previous.cast(new.schema.field(name).type))
        else:
            columns[name] = new.column(name)
    return pa.table(columns)


def _with_code_links(codes: pa.Table) -> pa.Table:
    """Sort codes by code and add parent_idx and unit_count."""
    codes = codes.take(pc.sort_indices(codes, [("code", "ascending")]))
    parent = pc.index_in(codes.column("parent_code"), value_set=codes.column("code"))
    parent_idx = parent.to_numpy(zero_copy_only=False)
    parent_idx = np.where(np.isnan(parent_idx.astype(float)), -1, parent_idx).astype(np.int32) if len(parent_idx) else np.zeros(0, np.int32)
    is_unit = pc.equal(codes.column("level"), LEVELS[0]).to_numpy(zero_copy_only=False)
    units = np.zeros(len(parent_idx), np.int64)
    units[is_unit] = 1
    walker = np.flatnonzero(is_unit)
    for _ in range(len(LEVELS)):
        walker = parent_idx[walker]
        walker = walker[walker >= 0]
        if not len(walker):
            break
        np.add.at(units, walker, 1)
    return codes.append_column("parent_idx", pa.array(parent_idx, pa.int32())).append_column(
        "unit_count", pa.array(units, pa.int64()))


def _sorted_scans(scans: pa.Table, codes: pa.Table) -> pa.Table:
    """Attach code_idx and sort by (code_idx, ts, action rank, event_id)."""
    code_idx = pc.index_in(scans.column("code"), value_set=codes.column("code")).cast(pa.int32())
    rank = pc.index_in(scans.column("action"), value_set=pa.array(ACTIONS))
    scans = scans.append_column("code_idx", code_idx).append_column("_rank", rank)
    order = pc.sort_indices(scans, [("code_idx", "ascending"), ("ts", "ascending"),
                                    ("_rank", "ascending"), ("event_id", "ascending")])
    return scans.take(order).drop_columns(["_rank"]).combine_chunks()
