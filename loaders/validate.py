"""Validate raw string tables against the data contract (DOMAIN.md §2).

`validate_dataset` is the one code path every store uses: it turns raw rows into typed
accepted tables, reject records (row, file, line, reason) and duplicate counts. It never
raises on a bad row. References are checked against the rows of this load and against
what the store already holds (`Known`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from graph.model import LEVEL_RANK, LOAD_ORDER, TABLES, TableSpec
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
        """The stored rows (typed canonical columns) whose key is in `keys`."""

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

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            "accepted": {t: (o.accepted.num_rows if o.accepted is not None else 0) for t, o in self.tables.items()},
            "rejected": {t: len(o.rejects) for t, o in self.tables.items()},
            "duplicates": {t: o.duplicates for t, o in self.tables.items()},
        }


class _Rows:
    """A raw table under validation: its columns and the first failing reason per row."""

    def __init__(self, spec: TableSpec, raw: pa.Table):
        self.spec = spec
        self.raw = raw
        self.n = raw.num_rows
        self.reason = np.full(self.n, None, dtype=object)

    def col(self, name: str) -> pa.Array:
        if name in self.raw.column_names:
            return self.raw.column(name).combine_chunks()
        return pa.nulls(self.n, pa.string())

    def np(self, name: str) -> np.ndarray:
        return self.col(name).to_numpy(zero_copy_only=False)

    @property
    def ok(self) -> np.ndarray:
        return pd.isna(self.reason) if self.n else np.zeros(0, bool)

    def fail(self, mask: np.ndarray | pa.Array, reason: str | np.ndarray) -> None:
        """Reject rows in `mask` that have no reason yet. `reason` may be per row."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.to_numpy(zero_copy_only=False)
        mask = np.asarray(mask, dtype=bool) & self.ok
        if mask.any():
            self.reason[mask] = reason[mask] if isinstance(reason, np.ndarray) else reason

    def fail_values(self, mask: np.ndarray, template: str, column: str) -> None:
        """Reject rows in `mask` with `template` formatted with the row's `column` value."""
        mask = np.asarray(mask, dtype=bool) & self.ok
        if mask.any():
            rows = np.flatnonzero(mask)
            texts = np.full(self.n, None, dtype=object)
            texts[rows] = [template.format(v) for v in pc.take(self.col(column), pa.array(rows)).to_pylist()]
            self.fail(mask, texts)

    def rejects(self) -> list[Reject]:
        bad = np.flatnonzero(~self.ok)
        if not len(bad):
            return []
        rows = self.raw.take(pa.array(bad)).to_pylist()
        return [Reject(self.spec.name, row.pop("_file"), row.pop("_line"), self.reason[i],
                       {k: v for k, v in row.items() if v is not None})
                for i, row in zip(bad, rows)]


def _parse_ts(values: pa.Array) -> pa.Array:
    """ISO 8601 with or without offset (no offset = UTC) -> timestamp[us, UTC]; bad -> null."""
    series = pd.Series(pd.arrays.ArrowStringArray(values)) if len(values) else pd.Series([], dtype=object)
    parsed = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
    return pa.array(parsed.astype("datetime64[us, UTC]"), type=TS_TYPE, from_pandas=True)


def _parse_float(values: pa.Array) -> pa.Array:
    """Decimal text -> float64; bad, NaN and infinite values -> null."""
    parsed = pd.to_numeric(pd.Series(values.to_numpy(zero_copy_only=False)), errors="coerce")
    return pa.array(parsed.where(np.isfinite(parsed.astype(float))), pa.float64(), from_pandas=True)


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


def _equal_rows(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    same = np.ones(len(a), bool)
    for name in a.columns:
        x, y = a[name].to_numpy(), b[name].to_numpy()
        same &= (pd.isna(x) & pd.isna(y)) | (x == y)
    return same


class _TableValidation:
    """Shared steps: typing, de-duplication by key, and comparison with stored rows."""

    def __init__(self, name: str, raws: list[RawTable], known: Known):
        self.spec = TABLES[name]
        self.known = known
        data = pa.concat_tables([r.data for r in raws], promote_options="permissive") if raws else None
        self.pre_rejects = [rej for r in raws for rej in r.rejects]
        self.rows = _Rows(self.spec, data if data is not None else pa.table({"_file": pa.array([], pa.string()), "_line": pa.array([], pa.int64())}))
        self.typed = _typed_columns(self.rows)
        self.extras = _extras(self.rows)
        self.duplicate = np.zeros(self.rows.n, bool)

    def key(self) -> pa.Array:
        return self.typed[self.spec.key[0]]

    def dedupe_input(self, *, conflicts_rejected: bool) -> None:
        """Rows repeating an earlier valid row's key: identical ones are duplicates; others
        are rejected (`conflicts_rejected`) or also counted as duplicates (event ids)."""
        name = self.spec.key[0]
        keys = pd.Series(pd.arrays.ArrowStringArray(self.key().cast(pa.string()))).where(self.rows.ok)
        dup_key = (keys.duplicated() & keys.notna()).to_numpy()
        if not dup_key.any():
            return
        idx = np.flatnonzero(dup_key)
        if not conflicts_rejected:
            self.duplicate[idx] = True
            return
        frame = self._frame()
        first = frame[self.rows.ok & ~dup_key].set_index(name, drop=False)
        candidates = frame.iloc[idx].reset_index(drop=True)
        same = _equal_rows(candidates, first.reindex(candidates[name]).reset_index(drop=True))
        self.duplicate[idx[same]] = True
        conflict = np.zeros(self.rows.n, bool)
        conflict[idx[~same]] = True
        self.rows.fail_values(conflict, f"conflicting duplicate {name} {{!r}} (an earlier row has other values)", name)

    def _frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: pd.Series(arr.to_numpy(zero_copy_only=False))
                             for name, arr in self.typed.items()})

    def compare_with_store(self) -> np.ndarray:
        """Marks rows identical to the stored row as duplicates; returns mask of stored keys."""
        live = self.rows.ok & ~self.duplicate
        keys = self.key()
        stored = self.known.stored(self.spec.name, pc.filter(keys, pa.array(live)))
        in_store = np.zeros(self.rows.n, bool)
        if stored.num_rows == 0:
            return in_store
        in_store = pc.is_in(keys, value_set=stored.column(self.spec.key[0])).to_numpy(zero_copy_only=False) & live
        idx = np.flatnonzero(in_store)
        frame = self._frame().iloc[idx].reset_index(drop=True)
        stored_df = stored.select(list(frame.columns)).to_pandas().set_index(self.spec.key[0], drop=False)
        same = _equal_rows(frame, stored_df.reindex(frame[self.spec.key[0]]).reset_index(drop=True)[frame.columns])
        self.duplicate[idx[same]] = True
        return in_store

    def outcome(self) -> TableOutcome:
        keep = self.rows.ok & ~self.duplicate
        columns = {**self.typed, **self.extras}
        accepted = pa.table(columns) if self.rows.n else None
        if accepted is not None and not keep.all():
            accepted = accepted.filter(pa.array(keep))
        return TableOutcome(accepted=accepted, rejects=self.pre_rejects + self.rows.rejects(),
                            duplicates=int((self.rows.ok & self.duplicate).sum()),
                            read=self.rows.n + len(self.pre_rejects))


def validate_dataset(raw: dict[str, list[RawTable]], known: Known) -> Validated:
    """Validate every table of a load, in reference order, against this load and `known`."""
    out: dict[str, TableOutcome] = {}
    regions = _validate_regions(raw.get("regions", []), known)
    out["regions"] = regions
    out["products"] = _validate_simple("products", raw.get("products", []), known)
    region_ids = _all_keys(known.regions().column("region_id"), regions.accepted, "region_id")
    parties = _validate_parties(raw.get("parties", []), known, region_ids)
    out["parties"] = parties
    codes = _validate_codes(raw.get("codes", []), known)
    out["codes"] = codes
    scans, implicit_scan = _validate_events("scans", raw.get("scans", []), known, region_ids, parties, codes)
    out["scans"] = scans
    referrals, implicit_ref = _validate_events("referrals", raw.get("referrals", []), known, region_ids, parties, codes)
    out["referrals"] = referrals
    out["tasks"] = _validate_tasks(raw.get("tasks", []))
    for name in ("epcis_events", "retractions"):
        if name in raw:
            out[name] = _validate_simple(name, raw[name], known)
    implicit = _implicit_consumers([implicit_scan, implicit_ref])
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
        text = " -> ".join([*cycle, cycle[0]])
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


def _validate_codes(raws: list[RawTable], known: Known) -> TableOutcome:
    v = _TableValidation("codes", raws, known)
    rows = v.rows
    v.dedupe_input(conflicts_rejected=True)
    codes = v.typed["code"]
    parent = v.typed["parent_code"]
    level_rank = pc.index_in(v.typed["level"], value_set=pa.array(list(LEVEL_RANK))).to_numpy(zero_copy_only=False)
    has_parent = pc.is_valid(parent).to_numpy(zero_copy_only=False)
    stored_parents = known.stored("codes", pc.unique(pc.drop_null(parent)))
    stored_code = stored_parents.column("code").combine_chunks().cast(pa.string())
    stored_rank = pc.index_in(stored_parents.column("level"), value_set=pa.array(list(LEVEL_RANK))).to_numpy(zero_copy_only=False)
    while True:  # rejecting a code makes its children's parent unknown
        live = rows.ok & ~v.duplicate
        pool = pa.concat_arrays([pc.filter(codes, pa.array(live)), stored_code])
        pos = pc.index_in(parent, value_set=pool).to_numpy(zero_copy_only=False)
        unknown = has_parent & rows.ok & pd.isna(pos)
        if unknown.any():
            rows.fail_values(unknown, "unknown parent_code {!r}", "parent_code")
            continue
        live_idx = np.flatnonzero(live)
        pool_rank = np.concatenate([level_rank[live_idx], stored_rank]).astype(float)
        parent_rank = np.full(rows.n, np.nan)
        linked = has_parent & rows.ok
        parent_rank[linked] = pool_rank[pos[linked].astype(int)]
        inverted = linked & (parent_rank <= level_rank)
        if not inverted.any():
            break
        cycles = _packaging_cycles(codes, parent, inverted)
        if cycles:
            names = rows.np("code")
            texts = np.array([f"packaging cycle: {cycles.get(c, '')}" for c in names], dtype=object)
            rows.fail(inverted & np.isin(names, list(cycles)), texts)
        levels = rows.np("level")
        texts = np.full(rows.n, None, dtype=object)
        for i in np.flatnonzero(inverted & rows.ok):
            texts[i] = (f"level inversion: {levels[i]} packed in a code of level "
                        f"{list(LEVEL_RANK)[int(parent_rank[i])]} ({parent[i].as_py()!r}); "
                        "a parent must be a higher level")
        rows.fail(inverted, texts)
    _check_immutable_codes(v)
    return v.outcome()


def _packaging_cycles(codes: pa.Array, parent: pa.Array, suspicious: np.ndarray) -> dict[str, str]:
    """Codes on a parent_code cycle among the suspicious (non-increasing level) links."""
    graph = nx.DiGraph()
    c = codes.to_numpy(zero_copy_only=False)
    p = parent.to_numpy(zero_copy_only=False)
    graph.add_edges_from(zip(c[suspicious], p[suspicious]))
    found: dict[str, str] = {}
    for cycle in nx.simple_cycles(graph):
        text = " -> ".join([*cycle, cycle[0]])
        for node in cycle:
            found.setdefault(node, text)
    return found


def _check_immutable_codes(v: _TableValidation) -> None:
    """A stored code keeps its level and parent; an input may only fill in missing values."""
    live = v.rows.ok & ~v.duplicate
    keys = v.key()
    stored = v.known.stored("codes", pc.filter(keys, pa.array(live)))
    if stored.num_rows == 0:
        return
    in_store = pc.is_in(keys, value_set=stored.column("code")).to_numpy(zero_copy_only=False) & live
    idx = np.flatnonzero(in_store)
    frame = v._frame().iloc[idx].reset_index(drop=True)
    old = stored.to_pandas().set_index("code", drop=False).reindex(frame["code"]).reset_index(drop=True)
    conflict = np.zeros(len(idx), bool)
    same = np.ones(len(idx), bool)
    for name in ("level", "parent_code", "sku", "batch"):
        a, b = frame[name].to_numpy(), old[name].to_numpy()
        conflict |= pd.notna(a) & pd.notna(b) & (a != b)
        same &= (pd.isna(a) & pd.isna(b)) | (a == b)
    mask = np.zeros(v.rows.n, bool)
    mask[idx[conflict]] = True
    v.rows.fail_values(mask, "code {!r} is already stored with another level, parent, sku or batch", "code")
    v.duplicate[idx[same & ~conflict]] = True


def _validate_events(name: str, raws: list[RawTable], known: Known, region_ids: pa.Array,
                     parties: TableOutcome, codes: TableOutcome) -> tuple[TableOutcome, pd.DataFrame]:
    """Scans and referrals: references, implicit consumers, ids and de-duplication."""
    v = _TableValidation(name, raws, known)
    rows, typed = v.rows, v.typed
    new_parties = parties.accepted.column("party_id").combine_chunks() if parties.accepted is not None else pa.array([], pa.string())
    new_codes = codes.accepted.column("code").combine_chunks() if codes.accepted is not None else pa.array([], pa.string())

    def known_party(values: pa.Array) -> np.ndarray:
        present = pc.is_valid(values).to_numpy(zero_copy_only=False)
        stored = known.stored("parties", pc.unique(pc.drop_null(values))).column("party_id").combine_chunks()
        pool = pa.concat_arrays([new_parties.cast(pa.string()), stored.cast(pa.string())])
        return present & pc.is_in(values, value_set=pool).to_numpy(zero_copy_only=False)

    code = typed["code"]
    has_code = pc.is_valid(code).to_numpy(zero_copy_only=False)
    stored_codes = known.stored("codes", pc.unique(pc.drop_null(code))).column("code").combine_chunks()
    code_pool = pa.concat_arrays([new_codes.cast(pa.string()), stored_codes.cast(pa.string())])
    rows.fail_values(has_code & ~pc.is_in(code, value_set=code_pool).to_numpy(zero_copy_only=False),
                     "unknown code {!r}", "code")
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
        v.duplicate |= live & pc.is_in(typed[id_col], value_set=stored_ids.combine_chunks()).to_numpy(zero_copy_only=False)
    live = rows.ok & ~v.duplicate
    implicit = []
    for c in implicit_cols:
        mask = implicit_mask[c] & live
        if mask.any():
            frame = pd.DataFrame({"party_id": pc.filter(typed[c], pa.array(mask)).to_numpy(zero_copy_only=False),
                                  "ts": pc.filter(typed["ts"], pa.array(mask)).to_pandas()})
            frame["region_id"] = (pc.filter(region, pa.array(mask)).to_numpy(zero_copy_only=False)
                                  if region is not None and c == "party_id" else None)
            implicit.append(frame)
    return v.outcome(), (pd.concat(implicit) if implicit else pd.DataFrame(columns=["party_id", "ts", "region_id"]))


def _implicit_consumers(frames: list[pd.DataFrame]) -> pa.Table | None:
    """One consumer per unknown id; its region from its earliest scan that names one."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    all_rows = pd.concat(frames).sort_values(["party_id", "ts"], kind="stable")
    with_region = all_rows.dropna(subset=["region_id"]).drop_duplicates("party_id")
    ids = all_rows.drop_duplicates("party_id")[["party_id"]]
    merged = ids.merge(with_region[["party_id", "region_id"]], on="party_id", how="left")
    n = len(merged)
    spec = TABLES["parties"]
    columns = {c.name: pa.nulls(n, pa.float64() if c.type == "float" else pa.string()) for c in spec.columns}
    columns["party_id"] = pa.array(merged["party_id"], pa.string())
    columns["kind"] = pa.array(["consumer"] * n, pa.string())
    columns["region_id"] = pa.array(merged["region_id"].astype(object).where(merged["region_id"].notna(), None), pa.string())
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

