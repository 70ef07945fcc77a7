"""Validate raw string tables against the data contract (DOMAIN.md §2).

`validate_dataset` is the one code path every store uses: it turns raw rows into typed
accepted tables, reject records (row, file, line, reason) and duplicate counts. It never
raises on a bad row. References are checked against the rows of this load and against
what the store already holds (`Known`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from graph.model import LEVEL_RANK, LOAD_ORDER, TABLES, TableSpec
from loaders.keys import StringKeys, first_rows, positions, sort_order, string_array
from loaders.readers import META_COLUMNS, RawTable, Reject

log = logging.getLogger(__name__)

TS_TYPE = pa.timestamp("us", tz="UTC")
MAX_PACKAGING_DEPTH = len(LEVEL_RANK)
# Identifiers (keys and the columns that refer to them) are indexed by Neo4j, whose index
# entries are limited to about 8 kB; 1024 characters is at most 4 kB of UTF-8.
MAX_ID_LENGTH = 1024
ID_COLUMNS = frozenset({"region_id", "parent_id", "party_id", "upstream_id", "sku", "code", "parent_code",
                        "event_id", "counterparty_id", "referral_id", "referrer_id", "referee_id"})


class Known(Protocol):
    """What a store already holds, as far as validation needs it."""

    def stored(self, table: str, keys: pa.Array) -> pa.Table:
        """The stored rows (typed canonical columns) whose key is in `keys` (keys may repeat)."""

    def regions(self) -> pa.Table:
        """All stored regions."""


@dataclass
class TableOutcome:
    accepted: pa.Table | None = None  # typed rows to write (new or changed)
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

    def pop_accepted(self, table: str) -> pa.Table | None:
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


class _Rows:
    """A raw table under validation: its columns, which rows are still valid (`ok`) and
    the first failing reason of each rejected row."""

    def __init__(self, spec: TableSpec, raw: pa.Table):
        self.spec = spec
        self.raw = raw
        self.n = raw.num_rows
        self.ok = np.ones(self.n, bool)
        self._failed: list[tuple[np.ndarray, str | list[str]]] = []  # (rows, one reason or one per row)

    def col(self, name: str) -> pa.Array:
        if name in self.raw.column_names:
            return string_array(self.raw.column(name))
        return pa.nulls(self.n, pa.string())

    def np(self, name: str) -> np.ndarray:
        return self.col(name).to_numpy(zero_copy_only=False)

    def fail(self, mask: np.ndarray | pa.Array, reason: str | np.ndarray) -> None:
        """Reject rows in `mask` that have no reason yet. `reason` may be per row."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(np.asarray(mask, dtype=bool) & self.ok)
        if len(rows):
            self.ok[rows] = False
            self._failed.append((rows, list(reason[rows]) if isinstance(reason, np.ndarray) else reason))

    def fail_values(self, mask: np.ndarray, template: str, column: str) -> None:
        """Reject rows in `mask` with `template` formatted with the row's `column` value."""
        rows = np.flatnonzero(np.asarray(mask, dtype=bool) & self.ok)
        if len(rows):
            self.ok[rows] = False
            values = pc.take(self.col(column), pa.array(rows)).to_pylist()
            self._failed.append((rows, [template.format(v) for v in values]))

    def rejects(self) -> list[Reject]:
        if not self._failed:
            return []
        bad = np.concatenate([rows for rows, _ in self._failed])
        reasons = [r for rows, reason in self._failed for r in ([reason] * len(rows) if isinstance(reason, str) else reason)]
        order = np.argsort(bad, kind="stable")
        rows = self.raw.take(pa.array(bad[order])).to_pylist()
        return [Reject(self.spec.name, row.pop("_file"), row.pop("_line"), reasons[i],
                       {k: v for k, v in row.items() if v is not None})
                for i, row in zip(order, rows)]


def _parse_ts(values: pa.Array) -> pa.Array:
    """ISO 8601 with or without offset (no offset = UTC) -> timestamp[us, UTC]; bad -> null.
    A column that repeats its values (production hours, say) is parsed value by value."""
    if len(values) > 65_536 and pc.count_distinct(values.slice(0, 8192)).as_py() < 4096:
        encoded = pc.dictionary_encode(values)  # few distinct values: a small, fast hash table
        return _parse_ts(encoded.dictionary).take(encoded.indices)
    series = pd.Series(pd.arrays.ArrowStringArray(values)) if len(values) else pd.Series([], dtype=object)
    parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
    return pa.array(parsed.astype("datetime64[us, UTC]"), type=TS_TYPE, from_pandas=True)


def _parse_float(values: pa.Array) -> pa.Array:
    """Decimal text -> float64; bad, NaN and infinite values -> null."""
    try:
        parsed = values.cast(pa.float64())
    except pa.ArrowInvalid:  # some value is not a number: pandas decides, value by value
        numbers = pd.to_numeric(pd.Series(values.to_numpy(zero_copy_only=False)), errors="coerce")
        parsed = pa.array(numbers.astype(float), pa.float64(), from_pandas=True)
    return pc.if_else(pc.is_finite(parsed), parsed, None)


def _typed_columns(rows: _Rows) -> dict[str, pa.Array]:
    """Check required values, enums, numbers and times; returns the typed columns."""
    typed: dict[str, pa.Array] = {}
    for column in rows.spec.columns:
        if column.required and column.name not in rows.raw.column_names:
            rows.fail(np.ones(rows.n, bool), f"missing required column: {column.name}")
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


def _extras(rows: _Rows) -> dict[str, pa.Array]:
    known = set(rows.spec.column_names) | set(META_COLUMNS)
    return {name: rows.col(name) for name in rows.raw.column_names if name not in known}


def _with_content_ids(ids: pa.Array, columns: dict[str, pa.Array], names: tuple[str, ...], prefix: str) -> pa.Array:
    """`ids`, with a stable id derived from the row's content where it is missing."""
    missing = pc.is_null(ids)
    rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    if not len(rows):
        return ids
    taken = pa.array(rows)
    frame = pd.DataFrame({name: pd.Series(pd.arrays.ArrowStringArray(pc.take(columns[name], taken).cast(pa.string())))
                          for name in names})
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    derived = np.full(len(ids), None, dtype=object)
    derived[rows] = [f"{prefix}{h}" for h in hashed]
    return pc.coalesce(ids, pa.array(derived, pa.string()))


def _same_values(a: dict[str, pa.Array], rows_a: np.ndarray, b: pa.Table | dict[str, pa.Array],
                 rows_b: np.ndarray, names: list[str]) -> np.ndarray:
    """Per pair, whether row rows_a[i] of `a` and row rows_b[i] of `b` hold the same values
    (both missing counts as the same) in every column of `names`."""
    same = np.ones(len(rows_a), bool)
    if not len(rows_a):
        return same
    ia, ib = pa.array(rows_a), pa.array(rows_b)
    for name in names:
        x = pc.take(a[name], ia)
        y = pc.take(b[name], ib)
        if y.type != x.type:
            y = y.cast(x.type)
        equal = pc.fill_null(pc.equal(x, y), False)
        both_missing = pc.and_(pc.is_null(x), pc.is_null(y))
        same &= pc.or_(equal, both_missing).to_numpy(zero_copy_only=False)
    return same


class _TableValidation:
    """Shared steps: typing, de-duplication by key, and comparison with stored rows."""

    def __init__(self, name: str, raws: list[RawTable], known: Known):
        """Takes the tables out of `raws` (so their memory goes with this validation's)."""
        self.spec = TABLES[name]
        self.known = known
        data = _concat_raw([r.data for r in raws]) if raws else None
        self.pre_rejects = [rej for r in raws for rej in r.rejects]
        raws.clear()
        self.rows = _Rows(self.spec, data if data is not None else pa.table({"_file": pa.array([], pa.string()), "_line": pa.array([], pa.int64())}))
        self.typed = _typed_columns(self.rows)
        self.extras = _extras(self.rows)
        self.duplicate = np.zeros(self.rows.n, bool)
        self._index: StringKeys | None = None

    def key(self) -> pa.Array:
        return self.typed[self.spec.key[0]]

    def index(self) -> StringKeys:
        """The key column prepared for lookups (rebuilt if the key column was replaced)."""
        if self._index is None or self._index.keys is not string_array(self.key()):
            self._index = StringKeys(self.key())
        return self._index

    def dedupe_input(self, *, conflicts_rejected: bool) -> None:
        """Rows repeating an earlier valid row's key: identical ones are duplicates; others
        are rejected (`conflicts_rejected`) or also counted as duplicates (event ids)."""
        name = self.spec.key[0]
        first = self.index().first_rows(among=self.rows.ok)
        idx = np.flatnonzero((first >= 0) & (first != np.arange(self.rows.n)))
        if not len(idx):
            return
        if not conflicts_rejected:
            self.duplicate[idx] = True
            return
        same = _same_values(self.typed, idx, self.typed, first[idx], list(self.typed))
        self.duplicate[idx[same]] = True
        conflict = np.zeros(self.rows.n, bool)
        conflict[idx[~same]] = True
        self.rows.fail_values(conflict, f"conflicting duplicate {name} {{!r}} (an earlier row has other values)", name)

    def stored_rows(self) -> tuple[np.ndarray, np.ndarray, pa.Table]:
        """(live rows whose key is stored, their rows in `stored`, stored): the stored rows
        with the keys of the live input rows."""
        live = self.rows.ok & ~self.duplicate
        stored = self.known.stored(self.spec.name, pc.filter(self.key(), pa.array(live)))
        if stored.num_rows == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), stored
        rows = self.index().positions(stored.column(self.spec.key[0]), among=live)  # live keys are unique
        found = np.flatnonzero(rows >= 0)
        found = found[np.argsort(rows[found], kind="stable")]
        first = np.ones(len(found), bool)  # the first stored row of a key, should one repeat
        first[1:] = rows[found][1:] != rows[found][:-1]
        return rows[found][first], found[first], stored

    def compare_with_store(self) -> None:
        """Marks rows identical to the stored row as duplicates."""
        rows, at, stored = self.stored_rows()
        same = _same_values(self.typed, rows, stored, at, list(self.typed))
        self.duplicate[rows[same]] = True

    def outcome(self) -> TableOutcome:
        """The accepted rows, the rejects and the counts; ends the validation. Each raw
        column is let go once its accepted rows are copied, so the raw and the accepted
        rows are never both held whole."""
        keep = self.rows.ok & ~self.duplicate
        rejects = self.pre_rejects + self.rows.rejects()
        n, duplicates = self.rows.n, int((self.rows.ok & self.duplicate).sum())
        columns = {**self.typed, **self.extras}
        self.rows.raw, self.typed, self.extras, self._index = None, {}, {}, None
        accepted = None
        if n:
            mask = None if keep.all() else pa.array(keep)
            names, filtered = list(columns), []
            for name in names:
                column = columns.pop(name)
                filtered.append(column if mask is None else column.filter(mask))
            accepted = pa.table(dict(zip(names, filtered)))
        return TableOutcome(accepted=accepted, rejects=rejects, duplicates=duplicates, read=n + len(self.pre_rejects))


def _concat_raw(tables: list[pa.Table]) -> pa.Table:
    """Raw tables of one canonical table as one (`_file` as one dictionary column)."""
    tables = [t.set_column(t.schema.get_field_index("_file"), "_file", pc.dictionary_encode(t.column("_file")))
              if not pa.types.is_dictionary(t.schema.field("_file").type) else t for t in tables]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    return table.unify_dictionaries().combine_chunks()


def validate_dataset(raw: dict[str, list[RawTable]], known: Known) -> Validated:
    """Validate every table of a load, in reference order, against this load and `known`.
    Takes each table's raw rows out of `raw` (`raw.pop`) as it validates them, so they can
    be freed (and a lazy mapping can read each table only then)."""
    out: dict[str, TableOutcome] = {}
    regions = _validate_regions(raw.pop("regions", []), known)
    out["regions"] = regions
    out["products"] = _validate_simple("products", raw.pop("products", []), known)
    region_ids = _all_keys(known.regions().column("region_id"), regions.accepted, "region_id")
    parties = _validate_parties(raw.pop("parties", []), known, region_ids)
    out["parties"] = parties
    out["codes"], loaded_code = _validate_codes(raw.pop("codes", []), known)
    out["referrals"], implicit_ref = _validate_events("referrals", raw.pop("referrals", []), known, region_ids, parties, loaded_code)
    handed_over = [loaded_code]  # the scans are the last to look codes up: they let the index go
    del loaded_code
    out["scans"], implicit_scan = _validate_events("scans", raw.pop("scans", []), known, region_ids, parties, handed_over.pop())
    out["tasks"] = _validate_tasks(raw.pop("tasks", []))
    for name in ("epcis_events", "retractions"):
        if name in raw:
            out[name] = _validate_simple(name, raw.pop(name), known)
    implicit = _implicit_consumers(implicit_scan + implicit_ref)
    return Validated({t: out[t] for t in LOAD_ORDER if t in out}, implicit)


def _all_keys(stored: pa.Array | pa.ChunkedArray, accepted: pa.Table | None, key: str) -> pa.Array:
    parts = [stored.combine_chunks() if isinstance(stored, pa.ChunkedArray) else stored]
    if accepted is not None and accepted.num_rows:
        parts.append(accepted.column(key).combine_chunks())
    return pa.concat_arrays([p.cast(pa.string()) for p in parts]) if parts else pa.array([], pa.string())


def _validate_simple(name: str, raws: list[RawTable], known: Known) -> TableOutcome:
    v = _TableValidation(name, raws, known)
    if name == "products":
        price = v.typed["unit_price"]
        v.rows.fail(pc.fill_null(pc.less(price, 0), False), "unit_price must not be negative")
    v.dedupe_input(conflicts_rejected=True)
    v.compare_with_store()
    return v.outcome()


def _validate_regions(raws: list[RawTable], known: Known) -> TableOutcome:
    v = _TableValidation("regions", raws, known)
    v.dedupe_input(conflicts_rejected=True)
    stored = known.regions().to_pandas()
    ids = v.rows.np("region_id")
    parents = v.typed["parent_id"].to_numpy(zero_copy_only=False)
    has_parent = pd.notna(parents)

    def reject_orphans() -> None:
        while True:  # a rejected region makes its children's parent unknown
            live = v.rows.ok & ~v.duplicate
            known_ids = set(stored["region_id"]) | set(ids[live])
            unknown = has_parent & ~np.isin(parents, list(known_ids)) & v.rows.ok
            if not unknown.any():
                return
            v.rows.fail_values(unknown, "unknown parent region {!r}", "parent_id")

    reject_orphans()
    live = v.rows.ok & ~v.duplicate
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
        mask = np.array([i in in_cycle for i in ids]) & live
        texts = np.array([f"region tree cycle: {in_cycle.get(i, '')}" for i in ids], dtype=object)
        v.rows.fail(mask, texts)
        reject_orphans()
    v.compare_with_store()
    return v.outcome()


def _validate_parties(raws: list[RawTable], known: Known, region_ids: pa.Array) -> TableOutcome:
    v = _TableValidation("parties", raws, known)
    rows = v.rows
    kind = v.typed["kind"].to_numpy(zero_copy_only=False)
    region = v.typed["region_id"]
    needs_region = np.isin(kind, ["distributor", "store"])
    rows.fail(needs_region & pc.is_null(region).to_numpy(zero_copy_only=False),
              np.array([f"a {k} needs region_id" for k in kind], dtype=object) if rows.n else "")
    bad_region = pc.is_valid(region).to_numpy(zero_copy_only=False) & ~pc.is_in(region, value_set=region_ids).to_numpy(zero_copy_only=False)
    rows.fail_values(bad_region, "unknown region {!r}", "region_id")
    territory = v.typed["territory"]
    known_regions = set(region_ids.to_pylist())
    terr = territory.to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(pd.notna(terr) & rows.ok):
        missing = [r for r in (t.strip() for t in terr[i].split("|")) if r and r not in known_regions]
        if missing:
            rows.fail(np.arange(rows.n) == i, f"unknown territory region {missing[0]!r}")
    v.dedupe_input(conflicts_rejected=True)
    ids = rows.np("party_id")
    upstream = v.typed["upstream_id"]
    has_up = pc.is_valid(upstream).to_numpy(zero_copy_only=False)
    while True:
        live = rows.ok & ~v.duplicate
        stored_up = known.stored("parties", pc.filter(upstream, pa.array(has_up & live))).column("party_id")
        pool = pa.concat_arrays([pa.array(ids[live], pa.string()), stored_up.combine_chunks().cast(pa.string())])
        unknown = has_up & rows.ok & ~pc.is_in(upstream, value_set=pool).to_numpy(zero_copy_only=False)
        if not unknown.any():
            break
        rows.fail_values(unknown, "unknown upstream party {!r}", "upstream_id")
    v.compare_with_store()
    return v.outcome()


def _validate_codes(raws: list[RawTable], known: Known) -> tuple[TableOutcome, Callable[[pa.Array], np.ndarray]]:
    """The outcome, and a test of whether values are codes of this load."""
    v = _TableValidation("codes", raws, known)
    rows = v.rows
    v.dedupe_input(conflicts_rejected=True)
    codes = v.typed["code"]
    parent = v.typed["parent_code"]
    ranks = pa.array(list(LEVEL_RANK))
    level_rank = pc.fill_null(pc.index_in(v.typed["level"], value_set=ranks), -1).to_numpy(zero_copy_only=False)
    has_parent = pc.is_valid(parent).to_numpy(zero_copy_only=False)
    stored_parents = known.stored("codes", pc.drop_null(parent))
    stored_rank = pc.index_in(stored_parents.column("level"), value_set=ranks).to_numpy(zero_copy_only=False)
    # A parent is the first valid input row with its code (later ones are duplicates or
    # rejected), else the stored code. Rejecting a row only ever removes parents.
    parent_row = v.index().positions(parent, among=rows.ok)
    stored_at = positions(parent, stored_parents.column("code"))
    while True:
        live = rows.ok & ~v.duplicate
        in_load = (parent_row >= 0) & live[np.maximum(parent_row, 0)]
        unknown = has_parent & rows.ok & ~in_load & (stored_at < 0)
        if unknown.any():
            rows.fail_values(unknown, "unknown parent_code {!r}", "parent_code")
            continue
        linked = has_parent & rows.ok
        parent_rank = np.where(in_load, level_rank[np.maximum(parent_row, 0)],
                               stored_rank[np.maximum(stored_at, 0)] if len(stored_rank) else -1)
        inverted = linked & (parent_rank <= level_rank)
        if not inverted.any():
            break
        cycles = _packaging_cycles(codes, parent, inverted)
        if cycles:
            on_cycle = inverted & pc.is_in(codes, value_set=pa.array(list(cycles), pa.string())).to_numpy(zero_copy_only=False)
            texts = np.full(rows.n, None, dtype=object)
            for i, code in zip(np.flatnonzero(on_cycle), codes.take(pa.array(np.flatnonzero(on_cycle))).to_pylist()):
                texts[i] = f"packaging cycle: {cycles[code]}"
            rows.fail(on_cycle, texts)
        texts = np.full(rows.n, None, dtype=object)
        for i in np.flatnonzero(inverted & rows.ok):
            texts[i] = (f"level inversion: {v.typed['level'][i].as_py()} packed in a code of level "
                        f"{list(LEVEL_RANK)[int(parent_rank[i])]} ({parent[i].as_py()!r}); "
                        "a parent must be a higher level")
        rows.fail(inverted, texts)
    _check_immutable_codes(v)
    index, valid = v.index(), rows.ok.copy()  # valid rows: accepted, or the same as a stored or earlier row
    return v.outcome(), lambda values: index.positions(values, among=valid) >= 0


def _packaging_cycles(codes: pa.Array, parent: pa.Array, suspicious: np.ndarray) -> dict[str, str]:
    """Codes on a parent_code cycle among the suspicious (non-increasing level) links."""
    graph = nx.DiGraph()
    taken = pa.array(np.flatnonzero(suspicious))
    graph.add_edges_from(zip(codes.take(taken).to_pylist(), parent.take(taken).to_pylist()))
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
    same = np.ones(len(rows), bool)
    for name in ("level", "parent_code", "sku", "batch"):
        a = pc.take(v.typed[name], pa.array(rows))
        b = pc.take(stored.column(name), pa.array(at)).cast(a.type)
        equal = pc.fill_null(pc.equal(a, b), False).to_numpy(zero_copy_only=False)
        both = (pc.is_valid(a).to_numpy(zero_copy_only=False), pc.is_valid(b).to_numpy(zero_copy_only=False))
        conflict |= both[0] & both[1] & ~equal
        same &= (~both[0] & ~both[1]) | equal
    mask = np.zeros(v.rows.n, bool)
    mask[rows[conflict]] = True
    v.rows.fail_values(mask, "code {!r} is already stored with another level, parent, sku or batch", "code")
    v.duplicate[rows[same & ~conflict]] = True


def _validate_events(name: str, raws: list[RawTable], known: Known, region_ids: pa.Array,
                     parties: TableOutcome, loaded_code: Callable[[pa.Array], np.ndarray]) -> tuple[TableOutcome, list[pa.Table]]:
    """Scans and referrals: references, implicit consumers, ids and de-duplication."""
    v = _TableValidation(name, raws, known)
    rows, typed = v.rows, v.typed
    new_parties = parties.accepted.column("party_id").combine_chunks() if parties.accepted is not None else pa.array([], pa.string())

    def known_party(values: pa.Array) -> np.ndarray:
        present = pc.is_valid(values).to_numpy(zero_copy_only=False)
        stored = known.stored("parties", pc.unique(pc.drop_null(values))).column("party_id").combine_chunks()
        pool = pa.concat_arrays([new_parties.cast(pa.string()), stored.cast(pa.string())])
        return present & pc.is_in(values, value_set=pool).to_numpy(zero_copy_only=False)

    code = typed["code"]
    has_code = pc.is_valid(code).to_numpy(zero_copy_only=False)
    stored_codes = known.stored("codes", pc.drop_null(code)).column("code")
    rows.fail_values(has_code & ~loaded_code(code) & (positions(code, stored_codes) < 0), "unknown code {!r}", "code")
    del loaded_code  # may hold the last reference to the index of every loaded code
    region = typed.get("region_id")
    if region is not None:
        bad_region = pc.is_valid(region).to_numpy(zero_copy_only=False) & ~pc.is_in(region, value_set=region_ids).to_numpy(zero_copy_only=False)
        rows.fail_values(bad_region, "unknown region {!r}", "region_id")
    implicit_cols: list[str]
    if name == "scans":
        party_known = known_party(typed["party_id"])
        is_scan = pc.fill_null(pc.equal(typed["action"], "scan"), False).to_numpy(zero_copy_only=False)
        present = pc.is_valid(typed["party_id"]).to_numpy(zero_copy_only=False)
        rows.fail_values(present & ~party_known & ~is_scan,
                         "unknown party {!r} (only a consumer scan may introduce a new party)", "party_id")
        cp = typed["counterparty_id"]
        rows.fail_values(pc.is_valid(cp).to_numpy(zero_copy_only=False) & ~known_party(cp),
                         "unknown counterparty {!r}", "counterparty_id")
        implicit_cols = ["party_id"]
        id_col, id_fields, prefix = "event_id", ("code", "action", "party_id", "counterparty_id", "ts", "region_id"), "h"
        implicit_mask = {"party_id": rows.ok & present & ~party_known}
    else:
        implicit_cols = ["referrer_id", "referee_id"]
        implicit_mask = {c: rows.ok & pc.is_valid(typed[c]).to_numpy(zero_copy_only=False) & ~known_party(typed[c])
                         for c in implicit_cols}
        id_col, id_fields, prefix = "referral_id", ("referrer_id", "referee_id", "ts", "channel", "code"), "r"
    typed[id_col] = _with_content_ids(typed[id_col], typed, id_fields, prefix)
    v.dedupe_input(conflicts_rejected=False)
    live = rows.ok & ~v.duplicate
    stored_ids = known.stored(name, pc.filter(typed[id_col], pa.array(live))).column(id_col)
    if len(stored_ids):
        stored_rows = v.index().positions(stored_ids, among=live)  # the live row of each stored id
        v.duplicate[stored_rows[stored_rows >= 0]] = True
    live = rows.ok & ~v.duplicate
    implicit = []
    for c in implicit_cols:
        mask = pa.array(implicit_mask[c] & live)
        if pc.any(mask).as_py():
            implicit.append(pa.table({
                "party_id": pc.filter(typed[c], mask), "ts": pc.filter(typed["ts"], mask),
                "region_id": pc.filter(region, mask) if region is not None and c == "party_id"
                else pa.nulls(pc.sum(mask).as_py(), pa.string())}))
    return v.outcome(), implicit


def _implicit_consumers(frames: list[pa.Table]) -> pa.Table | None:
    """One consumer per unknown id, in id order; its region from its earliest scan that
    names one (at equal times, the first such row read)."""
    if not frames:
        return None
    rows = pa.concat_tables(frames).combine_chunks()
    ids = rows.column("party_id")
    first = first_rows(ids)  # a party's rows are identified by its first row
    ts = rows.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
    has_region = rows.column("region_id").is_valid().to_numpy(zero_copy_only=False)
    order = np.lexsort((np.arange(len(first)), ts, first))  # by party, time, then row
    order = order[has_region[order]]
    starts = np.ones(len(order), bool)
    starts[1:] = first[order][1:] != first[order][:-1]
    region_row = np.full(len(first), -1, np.int64)
    region_row[first[order[starts]]] = order[starts]
    parties = np.flatnonzero(first == np.arange(len(first)))
    parties = parties[sort_order(ids.take(pa.array(parties)))]
    n = len(parties)
    spec = TABLES["parties"]
    columns = {c.name: pa.nulls(n, pa.float64() if c.type == "float" else pa.string()) for c in spec.columns}
    columns["party_id"] = ids.take(pa.array(parties))
    columns["kind"] = pa.array(["consumer"] * n, pa.string())
    region = region_row[parties]
    columns["region_id"] = rows.column("region_id").take(pa.array(region, mask=region < 0))
    return pa.table(columns)


def _validate_tasks(raws: list[RawTable]) -> TableOutcome:
    """Free-form programme rows: kept as strings, de-duplicated by content."""
    if not raws:
        return TableOutcome()
    data = pa.concat_tables([r.data for r in raws], promote_options="permissive")
    payload = data.drop_columns([c for c in META_COLUMNS if c in data.column_names])
    frame = payload.to_pandas()
    dup = frame.duplicated().to_numpy() if len(frame.columns) else np.zeros(len(frame), bool)
    key = pd.util.hash_pandas_object(frame, index=False).astype(str) if len(frame.columns) else pd.Series([], dtype=str)
    accepted = payload.filter(pa.array(~dup)).append_column("task_id", pa.array(("t" + key[~dup]).tolist(), pa.string()))
    return TableOutcome(accepted=accepted, rejects=[r for raw in raws for r in raw.rejects],
                        duplicates=int(dup.sum()), read=data.num_rows)

