"""The embedded store: Arrow IPC tables in a versioned folder, no server needed.

Layout of a store folder::

    CURRENT            name of the live version folder (replaced atomically)
    v000007/           one folder per table: regions/, parties/, ...
    v000007/scans/     one Arrow IPC file per column: 0.arrow, 1.arrow, ... (in column order)
    v000007/derived/   caches of analyses of that version (queries/sales.py), rebuilt when missing
    rejects/           reject records of each load (JSON lines)
    .lock              held while a load validates and writes

A load (`loading`, then `apply`) writes a complete new version folder next to the live
one and then swaps `CURRENT`; a load interrupted at any point leaves the previous version
live, and the folders it leaves behind (half-written or superseded) are removed by the
next load. A table is written column by column, so writing one never needs the whole
table in memory. Tables are memory-mapped when read, so re-opening a store costs
milliseconds whatever its size. (Versions written before column files hold one file per
table, `scans.arrow`; they are read as well.)

Derived columns written with each version (`graph.model` TableSpec.computed: never
loaded from input): `codes.parent_idx` (row of the parent code, -1 for none),
`codes.unit_count` (units packed inside, 1 for a unit), `scans.code_idx` (row of the
scanned code), `scans.event_order` (rank of the event by time, action rank, event id) and
`scans.retracted` (an errorDeclaration names the event). `codes` is sorted by `code`;
`scans` by code row, then event order.
"""
from __future__ import annotations

import bisect
import fcntl
import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graph.errors import StoreError
from graph.model import ACTIONS, LEVELS, TABLES
from graph.timeline import Lookup, Timeline, encode, ranges
from loaders.direct_io import DirectFile
from loaders.keys import StringKeys, gather, positions, sorted_rows
from loaders.validate import TYPES, AcceptedRows, Validated, release_memory

log = logging.getLogger(__name__)

MASTER_TABLES = ("regions", "products", "parties", "codes", "epcis_events", "retractions")
DERIVED_FIELDS = (pa.field("parent_idx", pa.int32()), pa.field("unit_count", pa.int64()), pa.field("code_idx", pa.int32()),
                  pa.field("event_order", pa.int64()), pa.field("retracted", pa.bool_()))
DERIVED_COLUMNS = tuple(field.name for field in DERIVED_FIELDS)
DERIVED_OF = {name: TABLES[name].computed for name in ("codes", "scans")}  # (tasks' task_id comes with the accepted rows)
WRITERS = 2  # columns of a new version computed and written at a time (`_write_column`)
_FEW = 256  # up to this many keys are looked up one by one instead of by a hash join
_LEVEL_RANKS = Lookup(pa.array(LEVELS))


def empty_table(name: str) -> pa.Table:
    """A table with the canonical columns of `name` (and the derived columns a version
    holds, so a never-loaded store answers queries) and no rows."""
    spec = TABLES[name]
    fields = [pa.field(c.name, TYPES[c.type]) for c in spec.columns]
    if name == "tasks":
        fields = [pa.field("task_id", pa.string())]
    return pa.schema(fields + [field for field in DERIVED_FIELDS if field.name in DERIVED_OF.get(name, ())]).empty_table()


class EmbeddedStore:
    """Columnar tables on disk; see the module docstring for the layout and guarantees."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.uri = str(self.path)
        self._cache: dict[str, Any] = {}  # tables, and arrays and indexes derived from them
        self.version = self._live_version()
        self._new: Path | None = None  # the folder of the version a load is writing
        self._writer: ThreadPoolExecutor | None = None  # computes and writes its columns (`_write_column`)
        self._writing: deque[Future] = deque()  # the columns being computed and written, oldest first

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
            self._cache[name] = _read_table(self.version, name) if self.version else empty_table(name)
        return self._cache[name]

    def stored(self, table: str, keys: pa.Array) -> pa.Table:
        """The stored rows whose key is among `keys` (which may repeat, or be null: a null
        matches nothing); nothing is copied when the table is empty."""
        data = self.table(table)
        if data.num_rows == 0 or len(keys) == 0:
            return data.slice(0, 0)
        key = TABLES[table].key[0] if TABLES[table].key else "task_id"
        if len(keys) > _FEW or table not in MASTER_TABLES:
            return data.filter(pa.array(positions(data.column(key), keys) >= 0))
        wanted = pc.drop_null(keys).to_pylist()
        if table == "codes":
            rows = self.code_rows(wanted)
        else:
            index = self.cached(f"_index:{table}", lambda: {k: i for i, k in enumerate(data.column(key).to_pylist())})
            rows = np.array([index.get(k, -1) for k in wanted], np.int64)
        return data.take(pa.array(np.unique(rows[rows >= 0])))

    def regions(self) -> pa.Table:
        return self.table("regions")

    def parties(self) -> pa.Table:
        """All stored parties (canonical columns, then unknown columns)."""
        return self.table("parties")

    def timelines(self, units: Sequence[str] | None = None) -> Timeline:
        """Timelines of the given codes (any level; unknown ones are left out), or of every
        unit when `units` is None. Cost grows with the units asked for, not the store."""
        if units is None:
            return self._timeline(np.flatnonzero(self._levels(None) == 0))
        rows = self.code_rows(units)
        return self._timeline(np.unique(rows[rows >= 0]))

    def timeline_batches(self, max_units: int = 250_000) -> Iterator[Timeline]:
        """Timelines of every unit in batches of about `max_units`, each holding whole
        top-level packages (pallets, or cases not on a pallet), so a rule that looks across
        a case sees all of it. Bounds memory on big stores; batches this small keep their
        per-row arrays (tens of MB) in memory the allocator reuses instead of fresh zeroed
        pages, so all of the store is judged faster than in a few big batches."""
        units = np.flatnonzero(self._levels(None) == 0)
        parent = self._numpy("codes", "parent_idx")
        top = units.copy()
        climbing = np.arange(len(units))  # units whose top so far is packed in something
        for _ in range(len(LEVELS)):
            up = parent[top[climbing]]
            climbing, up = climbing[up >= 0], up[up >= 0]
            top[climbing] = up
        order = np.argsort(top, kind="stable")
        units, top = units[order], top[order]
        start = 0
        while start < len(units):
            end = min(start + max_units, len(units))
            while end < len(units) and top[end] == top[end - 1]:
                end += 1
            yield self._timeline(np.sort(units[start:end]))
            start = end

    def _timeline(self, unit_rows: np.ndarray) -> Timeline:
        """Timelines of the units at these code rows (ascending)."""
        codes, scans = self.table("codes"), self.table("scans")
        parent = self._numpy("codes", "parent_idx")
        # the scans of code row r are rows starts[r]:starts[r+1] (scans are sorted by code row)
        starts = self.cached("_scan_starts", lambda: np.r_[0, np.cumsum(np.bincount(
            pc.drop_null(scans.column("code_idx")).to_numpy(), minlength=codes.num_rows))])
        unit_parts, event_parts = [], []
        positions, ancestor = np.arange(len(unit_rows), dtype=np.int32), unit_rows.copy()
        case = np.full(len(unit_rows), -1, np.int64)
        lineage = [unit_rows]
        for _ in range(len(LEVELS)):
            first = starts[ancestor]
            n = starts[ancestor + 1] - first
            unit_parts.append(np.repeat(positions, n))
            event_parts.append(ranges(first, n))
            up = parent[ancestor]
            keep = up >= 0
            positions, ancestor = positions[keep], up[keep]
            if not len(ancestor):
                break
            is_case = (self._levels(ancestor) == LEVELS.index("case")) & (case[positions] < 0)
            case[positions[is_case]] = ancestor[is_case]
            full = np.full(len(unit_rows), -1, np.int64)
            full[positions] = ancestor
            lineage.append(full)
        unit = np.concatenate(unit_parts) if unit_parts else np.zeros(0, np.int32)
        event = np.concatenate(event_parts) if event_parts else np.zeros(0, np.int64)
        retracted = self._numpy("scans", "retracted")
        if self.cached("_any_retracted", lambda: bool(retracted.any())):
            live = ~retracted[event]
            unit, event = unit[live], event[live]
        order = self._numpy("scans", "event_order")
        rows = np.argsort(unit * np.int64(max(scans.num_rows, 1)) + order[event], kind="stable")
        unit_table = pa.table({
            "code": pc.take(codes.column("code"), pa.array(unit_rows)),
            "case": pc.take(codes.column("code"), pa.array(case, mask=case < 0)),
            "sku": _inherited(codes.column("sku"), lineage, self._numpy_valid("codes", "sku")),
            "batch": _inherited(codes.column("batch"), lineage, self._numpy_valid("codes", "batch")),
        })
        return Timeline(unit[rows], event[rows], unit_table, scans)

    def code_rows(self, codes: Sequence[str]) -> np.ndarray:
        """Rows of `codes` in the codes table, -1 for unknown ones. A few codes are found
        by binary search (the table is sorted by code), many by one hash join."""
        column = self.table("codes").column("code")
        if len(codes) <= _FEW:
            index = self.cached("_code_search", lambda: _SortedStrings(column))
            return np.array([index.find(code) for code in codes], np.int64)
        wanted = pa.array(list(codes), pa.string())
        hit = pc.fill_null(pc.index_in(column, value_set=wanted), -1).to_numpy(zero_copy_only=False)
        found = hit >= 0
        rows = np.full(len(wanted), -1, np.int64)
        rows[hit[found]] = np.flatnonzero(found)
        return rows

    def _levels(self, rows: np.ndarray | None) -> np.ndarray:
        """Packaging rank (index in LEVELS) of the given code rows, or of every code."""
        level = self.table("codes").column("level")
        if rows is None:
            return self.cached("_levels", lambda: encode(level, pa.array(LEVELS)))
        if "_levels" in self._cache:
            return self._cache["_levels"][rows]
        return _LEVEL_RANKS(pc.take(level, pa.array(rows)))

    def _numpy(self, table: str, column: str) -> np.ndarray:
        """A derived numeric column of the live version as one numpy array (cached)."""
        return self.cached(f"_np:{table}.{column}",
                           lambda: self.table(table).column(column).to_numpy())

    def _numpy_valid(self, table: str, column: str) -> np.ndarray:
        """Which rows of a live column are not null, as one numpy array (cached)."""
        return self.cached(f"_valid:{table}.{column}",
                           lambda: self.table(table).column(column).is_valid().to_numpy(zero_copy_only=False))

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, kept under `key` while this object reads the same version (a load
        forgets it): for values derived from the live tables, here and in the analyses."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def lineage(self, code: str) -> pa.Table:
        """`code` and every code it is packed in, parent before grandparent: code, level,
        parent_code (no rows for an unknown code)."""
        parent = self._numpy("codes", "parent_idx")
        rows = [row for row in self.code_rows([code]) if row >= 0]
        while rows and parent[rows[-1]] >= 0 and len(rows) <= len(LEVELS):
            rows.append(parent[rows[-1]])
        return self.table("codes").select(["code", "level", "parent_code"]).take(pa.array(rows, pa.int64()))

    def descendants(self, code: str) -> pa.Table:
        """Every code packed (directly or not) inside `code`: code, level, parent_code."""
        codes = self.table("codes")
        starts, order = self.cached("_children", lambda: _children_index(self._numpy("codes", "parent_idx")))
        frontier = self.code_rows([code])
        frontier = frontier[frontier >= 0]
        found = []
        for _ in range(len(LEVELS)):
            frontier = np.concatenate([order[starts[r]:starts[r + 1]] for r in frontier]) if len(frontier) else frontier
            if not len(frontier):
                break
            found.append(frontier)
        rows = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
        return codes.select(["code", "level", "parent_code"]).take(pa.array(rows))

    def units_where(self, *, batch: str | None = None, sku: str | None = None) -> list[str]:
        """Unit codes of a batch and/or SKU (inherited from packed-in codes); all if neither."""
        codes = self.table("codes")
        keep = pc.equal(codes.column("level"), LEVELS[0])
        for name, value in (("batch", batch), ("sku", sku)):
            if value is not None:
                keep = pc.and_(keep, pc.fill_null(pc.equal(_inherited_of(codes, name), value), False))
        return codes.column("code").filter(keep).to_pylist()

    def referrals(self) -> pa.Table:
        """All referral rows (referral_id, referrer_id, referee_id, ts, channel, code)."""
        return self.table("referrals").select([c.name for c in TABLES["referrals"].columns])

    def purchases(self, parties: Sequence[str] | None = None) -> pa.Table:
        """`Store.purchases`: every unit's purchase computed once per version (cached), then
        those of `parties`."""
        bought = self.cached("_purchases", self._purchases)
        if parties is None:
            return bought
        return bought.filter(pc.is_in(bought.column("party_id"), value_set=pa.array(list(parties), pa.string())))

    def _purchases(self) -> pa.Table:
        """Every unit's purchase: the first live scan of each code, handed down the
        packaging (a code takes its parent's when that comes first), kept for the units."""
        codes, scans = self.table("codes"), self.table("scans")
        code_idx = scans.column("code_idx")
        live = pc.and_(pc.equal(scans.column("action"), "scan"), code_idx.is_valid()).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(live & ~self._numpy("scans", "retracted"))
        code = pc.take(code_idx, pa.array(rows, pa.int64())).to_numpy(zero_copy_only=False)
        firsts = np.r_[True, code[1:] != code[:-1]][:len(code)]
        rows, code = rows[firsts], code[firsts]  # each code's first live scan (scans are sorted by code row, then event order)
        never = np.iinfo(np.int64).max
        order = self._numpy("scans", "event_order")
        first = np.full(codes.num_rows, never)  # per code: the event order of the first live scan that applies to it
        first[code] = order[rows]
        parent = self._numpy("codes", "parent_idx")
        for _ in range(len(LEVELS) - 1):  # inherited from the parent, whose first takes its own parent's
            first = np.minimum(first, np.where(parent >= 0, first[np.maximum(parent, 0)], never))
        units = np.flatnonzero((first < never) & (self._levels(None) == LEVELS.index("unit")))
        row_of = np.empty(len(order), np.int64)  # event order -> scan row (the order is a permutation)
        row_of[order] = np.arange(len(order))
        scan = row_of[first[units]]
        sku = _inherited_of(codes, "sku", units)
        products = self.table("products")
        product = encode(sku, products.column("sku").combine_chunks())
        price = pc.take(products.column("unit_price"), pa.array(product, mask=product < 0))
        at = pa.array(scan)
        return pa.table({
            "party_id": pc.take(scans.column("party_id"), at), "ts": pc.take(scans.column("ts"), at),
            "code": pc.take(codes.column("code"), pa.array(units)), "sku": sku, "unit_price": pc.fill_null(price, 0.0),
        })

    def counts(self) -> dict[str, int]:
        return {name: self.table(name).num_rows for name in TABLES}

    def unit_count(self) -> int:
        return int(np.count_nonzero(self._levels(None) == LEVELS.index("unit")))

    def rejects_dir(self) -> Path:
        return self.path / "rejects"

    def close(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------ writing

    @contextmanager
    def loading(self) -> Iterator[Path]:
        """Held for a whole load (validation, then `apply`): the store is locked, so the load
        validates against the version it replaces; yields the scratch folder for the rows
        validation sets aside, inside the folder of the new version. Anything the load
        leaves behind is removed at the end (or, if the process dies, by the next load)."""
        with self._locked():
            self.version = self._live_version()
            self._cache.clear()
            for stale in [*self.path.glob(".tmp-*"), *self.path.glob("v[0-9]*")]:  # left by a killed load
                if stale != self.version:
                    shutil.rmtree(stale, ignore_errors=True)
            self._new = self.path / f".tmp-{uuid.uuid4().hex}"
            try:
                self._new.mkdir()
                with ThreadPoolExecutor(WRITERS, thread_name_prefix="store-writer") as self._writer:
                    yield self._new / "spill"
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot write the store ({exc.strerror or exc}); the previous version is intact") from exc
            finally:
                shutil.rmtree(self._new, ignore_errors=True)  # no column is being written: `_writer` was shut down
                self._new, self._writer = None, None
                self._writing.clear()

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
        """Merge validated rows into a new version and make it live atomically (inside
        `loading`, or in a load of its own). Takes the accepted rows out of `validated` as
        it writes them, column by column."""
        if self._new is None:
            with self.loading():
                return self.apply(validated)
        if not validated.changes_anything():
            return
        number = int(self.version.name[1:]) + 1 if self.version else 1
        final = self.path / f"v{number:06d}"
        retractions = self._merged("retractions", validated)
        self._write_scans(validated, [self._write_codes(validated)], retractions)
        release_memory()
        for name in TABLES:
            if name not in ("codes", "scans"):
                self._write_table(name, retractions if name == "retractions" else self._merged(name, validated))
        self._written()
        shutil.rmtree(self._new / "spill", ignore_errors=True)  # all read: a version folder holds tables only
        for folder in self._new.iterdir():  # on disk before the version is (each file was synced once written)
            _fsync(folder)
        _fsync(self._new)
        os.rename(self._new, final)
        pointer = self.path / "CURRENT.tmp"
        pointer.write_text(final.name)
        _fsync(pointer)
        os.replace(pointer, self.path / "CURRENT")
        _fsync(self.path)
        previous, self.version = self.version, final
        self._cache.clear()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def _live(self, name: str) -> pa.Table:
        """The live table without its derived columns (another table's column of such a
        name is an unknown input column: kept)."""
        table = self.table(name)
        return table.drop_columns([c for c in DERIVED_OF.get(name, ()) if c in table.column_names])

    def _merged(self, name: str, validated: Validated) -> pa.Table:
        """A small table of the new version: the live rows and the accepted ones (master
        tables: an accepted row replaces the stored row of its key, keeping the stored
        values it leaves empty)."""
        old = self._live(name)
        accepted = validated.pop_accepted(name)
        new = accepted.to_table() if accepted is not None else None
        if name == "parties" and validated.implicit_consumers is not None:
            implicit = validated.implicit_consumers
            taken = [old.column("party_id")] + ([new.column("party_id")] if new is not None else [])
            for column in taken:
                implicit = implicit.filter(pa.array(positions(implicit.column("party_id"), column) < 0))
            new = implicit if new is None else pa.concat_tables([new, implicit], promote_options="permissive")
        if new is None or new.num_rows == 0:
            return old
        if name in MASTER_TABLES and old.num_rows:
            new = _fill_from_old(new, old, TABLES[name].key[0])
            key = TABLES[name].key[0]
            old = old.filter(pa.array(positions(old.column(key), new.column(key)) < 0))
        return pa.concat_tables([old, new], promote_options="permissive")

    def _write_codes(self, validated: Validated) -> _CodeRows:
        """Writes the codes of the new version (sorted by code, with parent_idx and
        unit_count) column by column; returns where codes are in them."""
        old, new = self._live("codes"), _nonempty(validated.pop_accepted("codes")) or AcceptedRows.of(empty_table("codes").select(["code"]))
        if not old.num_rows and new.order is not None:  # a first load: validation ordered the codes and linked their parents
            order, rows = new.order, _CodeRows(new.order, 0, lambda: StringKeys(new.column("code")))
        else:
            new_code = new.column("code")
            at = positions(new_code, old.column("code")) if old.num_rows else np.full(new.num_rows, -1)
            kept = positions(old.column("code"), new_code) < 0 if old.num_rows and new.num_rows else np.ones(old.num_rows, bool)
            index = StringKeys(_concat([_kept(old.column("code"), kept), new_code]))
            del new_code
            order = index.order()
            rows = _CodeRows(order, int(kept.sum()), lambda: index)

        def column(name: str) -> pa.Array:
            """Column `name` of the merged rows, in code order."""
            field = (old.schema if name in old.column_names else new.schema).field(name)
            if not old.num_rows:  # the accepted rows alone
                return new.take(name, order) if name in new.column_names else pa.nulls(len(order), field.type)
            stored = _kept(old.column(name), kept) if name in old.column_names else None
            added = new.column(name) if name in new.column_names else None
            if added is not None and stored is not None and name != "code" and (at >= 0).any():  # values left empty keep the stored ones
                added = pc.coalesce(added, _one_array(old.column(name)).take(pa.array(at, mask=at < 0)).cast(added.type))
            return gather(_concat([stored if stored is not None else pa.nulls(int(kept.sum()), field.type),
                            added if added is not None else pa.nulls(new.num_rows, field.type)]), order)

        found: dict[str, np.ndarray] = {}  # from the values written: is_unit (level), parent_idx (parent_code)

        def level() -> pa.Array:
            values = column("level")
            found["is_unit"] = pc.equal(values, LEVELS[0]).to_numpy(zero_copy_only=False)
            return values

        def parent_code() -> pa.Array:
            values = column("parent_code")
            found["parent_idx"] = rows.find(values)
            return values

        found_by = {"level": level, "parent_code": parent_code}
        names = list(dict.fromkeys([*old.column_names, *new.column_names]))
        links = new.links.get("parent_code") if not old.num_rows else None
        for i, name in enumerate(names):
            if name == "parent_code" and links is not None and "code" in names[:i]:
                # every parent is an accepted code (-1: none): its code, read in order (the codes are sorted)
                parent_idx = found["parent_idx"] = rows.of_links(links[order])
                self._write_column("codes", i, name, partial(gather, self._new_column("codes", "code"), parent_idx))
            else:
                self._write_column("codes", i, name, found_by.get(name, partial(column, name)))
        self._written()
        parent_idx = found["parent_idx"].astype(np.int32, copy=False)
        units = _unit_counts(found["is_unit"], parent_idx)
        self._write_column("codes", len(names), "parent_idx", partial(pa.array, parent_idx, pa.int32()))
        self._write_column("codes", len(names) + 1, "unit_count", partial(pa.array, units, pa.int64()))
        return rows

    def _write_scans(self, validated: Validated, code_rows: list[_CodeRows], retractions: pa.Table) -> None:
        """Writes the scans of the new version column by column, with code_idx (the row of
        the code), event_order (global rank by ts, action rank, event_id) and retracted (an
        errorDeclaration names the event), sorted by (code_idx, event_order). Takes the
        codes' rows out of `code_rows` (their memory goes once they are used)."""
        old, new = self._live("scans"), _nonempty(validated.pop_accepted("scans")) or AcceptedRows.of(empty_table("scans").select(["event_id"]))

        def merged(name: str, rows: np.ndarray | None = None) -> pa.Array:
            """Column `name` of the live rows then the accepted ones (taken at `rows`)."""
            field = (old.schema if name in old.column_names else new.schema).field(name)
            if not old.num_rows and rows is not None:  # the accepted rows alone
                return new.take(name, rows) if name in new.column_names else pa.nulls(len(rows), field.type)
            values = _concat([_one_array(old.column(name)) if name in old.column_names else pa.nulls(old.num_rows, field.type),
                              new.column(name) if name in new.column_names else pa.nulls(new.num_rows, field.type)])
            return values if rows is None else gather(values, rows)

        codes, links = code_rows.pop(), new.links.pop("code", None) if not old.num_rows else None
        if links is not None and (links >= 0).all():  # every scan names a code of this load: its column is not read
            code_idx = codes.of_links(links).astype(np.int32, copy=False)
        else:
            code_idx = codes.find(merged("code")).astype(np.int32, copy=False)
        del codes, links
        event_ids = merged("event_id")
        event_order, by_time = _event_order(merged("ts"), merged("action"), event_ids)
        retracted = pc.is_in(event_ids, value_set=retractions.column("event_id"))
        del event_ids
        # (code row, event order) packed in one integer: one value sort, no argsort
        packed = np.where(code_idx >= 0, code_idx, np.iinfo(np.int32).max).astype(np.int64)
        packed <<= 32
        packed |= event_order
        packed.sort()
        packed &= 0xFFFFFFFF  # the event orders, in (code row, event order) order
        order_rows = by_time[packed]
        order = pa.array(order_rows)
        del packed, by_time
        names = list(dict.fromkeys([*old.column_names, *new.column_names]))
        for i, name in enumerate(names):
            if name == "code" and (code_idx >= 0).all():  # the code of each scan's code row: read in order (sorted by code_idx)
                self._write_column("scans", i, name, partial(gather, self._new_column("codes", "code"), code_idx[order_rows]))
            else:
                self._write_column("scans", i, name, partial(merged, name, order_rows))
        self._write_column("scans", len(names), "code_idx", lambda: pa.array(code_idx, mask=code_idx < 0).take(order))
        self._write_column("scans", len(names) + 1, "event_order", lambda: pa.array(event_order).take(order))
        self._write_column("scans", len(names) + 2, "retracted", partial(retracted.take, order))

    def _new_column(self, table: str, name: str) -> pa.Array:
        """A column already written into the new version (memory-mapped)."""
        self._written()
        return _one_array(_read_table(self._new, table).column(name))

    def _write_table(self, name: str, table: pa.Table) -> None:
        for i, (field, values) in enumerate(zip(table.schema, table.columns)):
            self._write_column(name, i, field.name, partial(_one_array, values))

    def _write_column(self, table: str, i: int, name: str, values: Callable[[], pa.Array | pa.ChunkedArray]) -> None:
        """Computes column `i` of `table` (`values()`) and writes it in the new version (one
        batch: takes by row stay O(rows)) on a writer thread, while the main thread goes on:
        at most WRITERS columns are being computed and written at a time, so in memory."""
        folder = self._new / table
        folder.mkdir(exist_ok=True)
        while len(self._writing) >= WRITERS:
            self._written_oldest()
        self._writing.append(self._writer.submit(lambda: _write_column_file(folder / f"{i}.arrow", name, _one_array(values()))))

    def _written(self) -> None:
        """Waits until every column being written is on file (raises the first error)."""
        while self._writing:
            self._written_oldest()

    def _written_oldest(self) -> None:
        self._writing.popleft().result()
        release_memory()


def _write_column_file(path: Path, name: str, values: pa.Array) -> None:
    """An Arrow IPC file of one column, written past the page cache (`DirectFile`) and
    synced to disk; it runs on a writer thread while the next column is computed."""
    schema = pa.schema([pa.field(name, values.type)])
    with pa.PythonFile(DirectFile(path), mode="w") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([values], schema=schema))
    _fsync(path)


def _read_table(version: Path, name: str) -> pa.Table:
    """Table `name` of a version folder (memory-mapped), empty if the version has none."""
    folder, legacy = version / name, version / f"{name}.arrow"
    try:
        if folder.is_dir():
            parts = []
            for path in sorted(folder.glob("*.arrow"), key=lambda p: int(p.stem)):
                with pa.memory_map(str(path)) as source:
                    parts.append(pa.ipc.open_file(source).read_all())
            return pa.Table.from_arrays([part.column(0) for part in parts], schema=pa.schema([part.schema.field(0) for part in parts]))
        if legacy.exists():
            with pa.memory_map(str(legacy)) as source:
                table = pa.ipc.open_file(source).read_all()
            return table if table.num_rows == 0 or table.column(0).num_chunks == 1 else table.combine_chunks()
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        raise StoreError(f"{folder}: unreadable store table: {exc}") from exc
    return empty_table(name)


def _nonempty(accepted: AcceptedRows | None) -> AcceptedRows | None:
    """`accepted` if it has rows (no rows: none of its columns are added either)."""
    return accepted if accepted is not None and accepted.num_rows else None


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.Array):
        return values
    chunks = [c for c in values.chunks if len(c)]
    return chunks[0] if len(chunks) == 1 else values.combine_chunks()


def _concat(arrays: list[pa.Array]) -> pa.Array:
    """The arrays one after another (no copy when all but one are empty)."""
    full = [a for a in arrays if len(a)]
    return full[0] if len(full) == 1 else pa.concat_arrays([a.cast(arrays[0].type) for a in arrays])


def _kept(values: pa.ChunkedArray, keep: np.ndarray) -> pa.Array:
    values = _one_array(values)
    return values if keep.all() else values.filter(pa.array(keep))


def _unit_counts(is_unit: np.ndarray, parent_idx: np.ndarray) -> np.ndarray:
    """Units packed inside each code (1 for a unit)."""
    units = is_unit.astype(np.int64)
    walker = np.flatnonzero(is_unit)
    for _ in range(len(LEVELS)):
        walker = parent_idx[walker]
        walker = walker[walker >= 0]
        if not len(walker):
            break
        np.add.at(units, walker, 1)  # in place: no array of counts per level
    return units


def _event_order(ts: pa.Array, action: pa.Array, event_id: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each event's rank by ts, action rank, event_id; and the events in that order."""
    n = len(ts)
    rank = pc.index_in(action, value_set=pa.array(ACTIONS)).to_numpy(zero_copy_only=False)
    when = ts.cast(pa.int64()).to_numpy(zero_copy_only=False)
    by_time = sorted_rows(when, rank)
    tied = np.zeros(n, bool)  # events at the same time and action rank: ordered by event_id
    when_sorted, rank_sorted = when[by_time], rank[by_time]
    same = (when_sorted[1:] == when_sorted[:-1]) & (rank_sorted[1:] == rank_sorted[:-1])
    del when_sorted, rank_sorted
    tied[1:] |= same
    tied[:-1] |= same
    if tied.any():
        rows = by_time[tied]
        by_id = pc.sort_indices(pa.table({"when": when[rows], "rank": rank[rows], "id": event_id.take(pa.array(rows))}),
                                [("when", "ascending"), ("rank", "ascending"), ("id", "ascending")]).to_numpy()
        by_time[tied] = rows[by_id]
    event_order = np.empty(n, np.int64)
    event_order[by_time] = np.arange(n, dtype=np.int64)
    return event_order, by_time


class _CodeRows:
    """Where codes are in the new version's codes table: `row_of` is the place of each
    merged code (the live ones kept, then the accepted ones, from `accepted_at` on), then
    -1 (so row_of[-1], for a code not found, is -1). A code is found by the accepted code
    validation linked it to, else in an index of the merged codes (`index()`, built when
    first needed)."""

    def __init__(self, order: np.ndarray, accepted_at: int, index: Callable[[], StringKeys]):
        self.row_of = np.empty(len(order) + 1, np.int32 if len(order) < 2**31 else np.int64)
        self.row_of[order] = np.arange(len(order), dtype=self.row_of.dtype)
        self.row_of[-1] = -1
        self.accepted_at, self._index, self._built = accepted_at, index, None

    def find(self, values: pa.Array) -> np.ndarray:
        """The row of each value (-1: none), looked up in the index."""
        self._built = self._built or self._index()
        return self.row_of[self._built.positions(values)]

    def of_links(self, links: np.ndarray) -> np.ndarray:
        """The row of each accepted code validation linked (-1: none)."""
        return self.row_of[self.accepted_at:][links]


class _SortedStrings:
    """Binary search over a string column sorted by byte order (Arrow's sort order), on
    its raw UTF-8 buffers: a lookup costs about 24 byte-string compares, no Arrow scalars."""

    def __init__(self, column: pa.ChunkedArray):
        array = column.combine_chunks().cast(pa.large_string())  # one buffer, 64-bit offsets
        _, offsets, data = array.buffers()
        base = array.offset
        self.offsets = np.frombuffer(offsets, np.int64)[base:base + len(array) + 1]
        self.data = memoryview(data) if data is not None else memoryview(b"")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]])

    def find(self, key: str) -> int:
        """Row of `key`, or -1 (also for None)."""
        if key is None:
            return -1
        wanted = key.encode("utf-8")
        i = bisect.bisect_left(self, wanted)
        return i if i < len(self) and self[i] == wanted else -1


def _children_index(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR of children: rows of the children of code row r are order[starts[r]:starts[r+1]]."""
    order = np.argsort(parent, kind="stable")
    return np.searchsorted(parent[order], np.arange(len(parent) + 1)), order


def _inherited(column: pa.ChunkedArray, lineage: list[np.ndarray], present: np.ndarray | None = None) -> pa.Array:
    """Per unit, the value of `column` on the unit or else its nearest ancestor.
    `present`: the column's validity as a numpy array, when the caller has it."""
    if present is None:
        present = column.is_valid().to_numpy(zero_copy_only=False)
    source = np.full(len(lineage[0]), -1, np.int64)
    for rows in lineage:  # nearest first
        found = (source < 0) & (rows >= 0)
        found[found] = present[rows[found]]
        source[found] = rows[found]
    return pc.take(column, pa.array(source, mask=source < 0))


def _inherited_of(codes: pa.Table, column: str, rows: np.ndarray | None = None) -> pa.Array:
    """`column` of the codes at `rows` (of every code if None), inherited from the nearest
    ancestor when missing."""
    parent = codes.column("parent_idx").to_numpy()
    rows = np.arange(codes.num_rows) if rows is None else rows
    lineage = [rows]
    for _ in range(len(LEVELS) - 1):
        rows = np.where(rows >= 0, parent[np.maximum(rows, 0)], -1)
        lineage.append(rows)
    return _inherited(codes.column(column), lineage)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill_from_old(new: pa.Table, old: pa.Table, key: str) -> pa.Table:
    """Values an update leaves empty keep their stored value."""
    at = positions(new.column(key), old.column(key))
    if not (at >= 0).any():
        return new
    hit = pa.array(at, mask=at < 0)
    columns = {}
    for name in new.column_names:
        if name in old.column_names and name != key:
            previous = pc.take(old.column(name), hit)
            columns[name] = pc.coalesce(new.column(name), previous.cast(new.schema.field(name).type))
        else:
            columns[name] = new.column(name)
    return pa.table(columns)


