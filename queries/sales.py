"""Sales facts: what each store took in, which consumer scans it sold, what was diverted.

Stores, consumers, rebates and regions (DOMAIN.md §5) all read one `SalesFacts`. The
embedded store's are built from every unit's timeline and the diversion judgement
(`queries.diversion.judge`); a store with `sales_rows` (Neo4j) aggregates the sales in the
database and has only its diversion candidates judged here. Both give the same rows (the
tests compare them). Definitions (docs/design.md):

- *sell-in*: one row per (unit, store) the first time the store handles the unit (the
  holder after a `ship` to it, its own `receive`/`open`, or its own `ship` onwards, e.g.
  to a consumer); `diverted` when that event is at or after the unit's diversion crossing.
- *sell-out*: one row per unit, its first consumer `scan` (later scans of the same unit
  are repeats); credited to the store that handled the unit last before the scan.
- *opened*: one row per unit, its first `open` by anyone.

Party, region, SKU and severity columns are categorical (pandas codes, not strings; the
embedded store's categories in the order of the parties and regions tables). The
embedded store's facts are cached on disk per store version (`derived/` inside the live
version folder; a load makes a new version, so a load never sees stale facts).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from graph import embedded
from graph import timeline as timeline_module
from graph.embedded import EmbeddedStore
from graph.model import ACTIONS
from graph.timeline import Timeline, encode
from queries import diversion
from queries.common import iso_column, parallel_map, take_rows, utc
from queries.diversion import Context, EventFacts, Judgement, batches_with_facts, judge, judging_context

log = logging.getLogger(__name__)

SHIP, RECEIVE, OPEN, SCAN = range(len(ACTIONS))
LEVELS = {"country": 0, "province": 1, "city": 2, "district": 3}  # depth in the region tree
FACT_FRAMES = ("sell_in", "sell_out", "opened", "findings")
CACHED_FACTS = 4  # facts cache entries kept per store version (one per k and as_of asked for; the newest)
CATEGORICAL = {"sku", "store", "consumer", "region_id", "severity", "party", "responsible", "exit_via",
               "from_region", "to_region"}  # columns of the fact frames


@dataclass
class SalesFacts:
    """Frames shared by the analyses of DOMAIN.md §5 (ids are strings, None if unknown)."""

    parties: pd.DataFrame  # indexed by party_id: kind, name, region_id, upstream_id, ...
    regions: pd.DataFrame  # indexed by region_id: name, parent_id, depth
    sell_in: pd.DataFrame  # code, sku, store, ts, diverted
    sell_out: pd.DataFrame  # event_id, code, sku, unit_price, consumer, ts, region_id, store, finding, severity
    opened: pd.DataFrame  # code, party, ts, region_id
    findings: pd.DataFrame  # code, responsible, exit_via, from_region, to_region, severity, crossing_event_id, ts
    as_of: pd.Timestamp  # the time the facts describe (latest event kept)

    def ancestor(self, region_ids: pd.Series, level: str) -> pd.Series:
        """Each region's ancestor at `level` (itself when it is at or above that level)."""
        if level not in LEVELS:
            raise ValueError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
        depth = LEVELS[level]
        parent = self.regions["parent_id"]
        current = pd.Series(self.regions.index, index=self.regions.index, dtype=object)  # each stored region's
        for _ in range(int(self.regions["depth"].max()) if len(self.regions) else 0):
            up = current.map(parent)
            current = current.where(~(current.map(self.regions["depth"]) > depth) | up.isna(), up)
        return region_ids.map(current)

    def under(self, region_ids: pd.Series, root: str) -> pd.Series:
        """Per region id: it is `root` or lies below it."""
        inside = pd.Series(False, index=region_ids.index)
        current = region_ids.astype(object)
        for _ in range(int(self.regions["depth"].max()) + 1 if len(self.regions) else 1):
            inside |= current == root
            current = current.map(self.regions["parent_id"])
        return inside

    def stores(self) -> pd.DataFrame:
        return self.parties[self.parties["kind"] == "store"]


def text(value: object) -> str | None:
    """A frame cell as a string, None when missing."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def iso_times(times: pd.Series) -> list[str | None]:
    """UTC times as ISO 8601 with `Z` (microseconds only when non-zero), None when missing;
    vectorised `queries.common.iso`."""
    return iso_column(pa.array(times.dt.as_unit("us"), from_pandas=True))


def sales_facts(store, *, k: int = 3, as_of: datetime | str | None = None) -> SalesFacts:
    """The facts of every unit as known at `as_of` (events after it are ignored; default:
    the latest event). The embedded store's are read from its facts cache when present."""
    context = judging_context(store)
    cutoff = utc(as_of)
    if hasattr(store, "sales_rows"):
        frames = _facts_in_database(store, context, k=k, cutoff=cutoff)
    else:
        frames = _cached_facts(store, k=k, cutoff=cutoff,
                               build=lambda: _facts_of_every_unit(store, context, k=k, cutoff=cutoff))
    sell_in, sell_out, opened, findings, latest = frames
    parties = context.parties.to_pandas().set_index("party_id")
    parties = parties.astype({c: object for c in parties.columns if parties[c].dtype != float})
    regions = context.regions.to_pandas().set_index("region_id")
    regions["depth"] = _depths(regions["parent_id"])
    return SalesFacts(parties, regions, *(_categorical(frame) for frame in (sell_in, sell_out, opened, findings)),
                      cutoff or latest or pd.Timestamp("1970-01-01", tz="UTC"))


def sellers(store, codes: Sequence[str]) -> dict[str, str | None]:  # noqa: ANN001 - any Store
    """The store credited with the sell-out of each of these units that a consumer scanned
    (None: no store held it before), as `sales_facts(store).sell_out` credits it, from
    the timelines of these units alone (what one consumer's profile needs)."""
    timeline = store.timelines(list(codes))
    j = judge(timeline, judging_context(store, timeline))
    rows, seller = _sell_outs(j, _handlers(j))
    stores = take_rows(j.context.party_ids, seller)
    return dict(zip(take_rows(timeline.units.column("code"), timeline.unit[rows]).to_pylist(), stores.to_pylist()))


def _handlers(j: Judgement) -> np.ndarray:
    """Per timeline row, the store handling the goods (party row, -1 none): the store
    holding them after the event, else the store performing it (a store's ship to a
    consumer); a scan is a sale, not handling."""
    by_store = j.context.kind[j.party] == diversion.STORE
    handler = np.where(j.holds_store, j.holder, np.where(by_store, j.party, -1))
    return np.where(j.action != SCAN, handler, -1)


def _sell_outs(j: Judgement, handler: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sell-outs of a judgement: each unit's first consumer scan (timeline rows) and
    the store credited with it, the last to handle the unit before (`_handlers`; -1 none)."""
    rows = j.timeline.first_per_unit(np.flatnonzero(j.action == SCAN))
    last = j.timeline.latest(handler >= 0, rows)
    return rows, np.where(last >= 0, handler[np.maximum(last, 0)], -1)


def _categorical(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its party, region, SKU and severity columns categorical."""
    return frame.astype({c: "category" for c in frame.columns if c in CATEGORICAL and frame[c].dtype != "category"})


def _facts_of_every_unit(store, context: Context, *, k: int, cutoff: pd.Timestamp | None) -> tuple:
    """The facts from every unit's timeline (the embedded store) as Arrow tables, batch by
    batch (memory stays bounded; the k rule sees whole cases), two batches at a time;
    batches over one events table share one `EventFacts`."""
    batches = batches_with_facts(store, lambda _: context)
    parts = list(parallel_map(lambda batch: _facts_of(store, *batch[:2], k=k, cutoff=cutoff, facts=batch[2]), batches))
    if not parts:
        parts = [_facts_of(store, store.timelines([]), context, k=k, cutoff=cutoff)]
    latest = [part[4] for part in parts if part[4] is not None]
    return (*parallel_map(_concat, [[part[i] for part in parts] for i in range(4)]), max(latest) if latest else None)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Tables of one schema one after another (plain columns not copied: one chunk each),
    each dictionary column as one array over only the values it uses (`_used_only`)."""
    table = pa.concat_tables(tables)
    return pa.table({name: _used_only(column) if pa.types.is_dictionary(column.type) else column
                     for name, column in zip(table.column_names, table.columns)})


def _used_only(column: pa.ChunkedArray) -> pa.DictionaryArray:
    """A dictionary column as one array whose dictionary holds only the values used, in
    dictionary order (chunks over different dictionaries are united first: the first
    chunk's values, then those new in later ones)."""
    if any(not chunk.dictionary.equals(column.chunk(0).dictionary) for chunk in column.chunks[1:]):
        column = pa.table({"column": column}).unify_dictionaries().column(0)
    dictionary = column.chunk(0).dictionary
    rows = pa.chunked_array([chunk.indices for chunk in column.chunks], column.type.index_type)
    rows = pc.fill_null(rows, -1).to_numpy()
    used = np.zeros(len(dictionary) + 1, bool)
    used[rows] = True  # -1 (null) marks the extra last slot
    position = np.cumsum(used, dtype=np.int32) - 1
    position[-1] = -1
    indices = position[rows]
    return pa.DictionaryArray.from_arrays(pa.array(indices, mask=indices < 0), dictionary.filter(pa.array(used[:-1])))


def _frames(*facts) -> tuple:
    """The fact tables as DataFrames (strings stay arrow-backed, dictionaries become
    categorical; a block per column, so columns need not be copied together), then the
    latest event time."""
    *tables, latest = facts
    return (*(table.to_pandas(split_blocks=True) for table in tables), latest)


# ---------------------------------------------------------------- the facts cache


def _cached_facts(store, *, k: int, cutoff: pd.Timestamp | None, build: Callable[[], tuple]) -> tuple:
    """`_frames` of build() (the fact tables and the latest event time), or of the tables
    cached in the store's live version folder under a key of (k, cutoff, the code that
    builds facts); built tables are cached while they become frames. An unreadable or
    incomplete cache entry is rebuilt; a store that cannot be written is simply not cached."""
    folder = _cache_folder(store, k=k, cutoff=cutoff)
    if folder is None:
        return _frames(*build())
    if folder.exists():
        try:
            return _frames(*_read_facts(folder))
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            log.warning("sales facts cache %s is unreadable (%s); rebuilding it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    facts = build()
    with ThreadPoolExecutor(max_workers=1) as pool:
        written = pool.submit(_write_facts, folder, facts)
        frames = _frames(*facts)
        try:
            written.result()
        except OSError as exc:
            log.info("sales facts not cached in %s: %s", folder, exc.strerror or exc)
    return frames


def _cache_folder(store, *, k: int, cutoff: pd.Timestamp | None) -> Path | None:
    """Where the facts of (k, cutoff) are cached for the store's live version (None: not
    an embedded store, or nothing loaded)."""
    if not isinstance(store, EmbeddedStore) or store.version is None:
        return None
    key = f"{k}|{cutoff.isoformat() if cutoff is not None else 'latest'}|{_code_digest()}"
    return store.version / "derived" / f"sales-facts-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


@functools.cache
def _code_digest() -> str:
    """A digest of the source of every module that decides the facts, so facts cached by
    other code are never read."""
    digest = hashlib.sha256()
    for source in (__file__, diversion.__file__, timeline_module.__file__, embedded.__file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _write_facts(folder: Path, facts: tuple) -> None:
    """Write the fact tables as Arrow IPC files into a new folder, then rename it into place
    (a reader sees a complete entry or none). The version folder must exist: a load may
    remove it at any time, and the cache must not bring it back."""
    derived = folder.parent
    derived.mkdir(exist_ok=True)
    tmp = derived / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for name, table in zip(FACT_FRAMES, facts):
            with pa.OSFile(str(tmp / f"{name}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        latest = facts[4]
        (tmp / "manifest.json").write_text(json.dumps({
            "latest": latest.isoformat() if latest is not None else None,
            "rows": {name: table.num_rows for name, table in zip(FACT_FRAMES, facts)}}))
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _evict(derived, keep=CACHED_FACTS)


def _evict(derived: Path, *, keep: int) -> None:
    """Remove all but the `keep` newest cache entries (other processes may be removing them too)."""
    entries = []
    for entry in derived.glob("sales-facts-*"):
        try:
            entries.append((entry.stat().st_mtime_ns, entry))
        except FileNotFoundError:
            continue
    for _, entry in sorted(entries)[:-keep]:
        shutil.rmtree(entry, ignore_errors=True)


def _read_facts(folder: Path) -> tuple:
    """The fact tables of a cache folder; ValueError (or an Arrow/OS error) when incomplete."""
    manifest = json.loads((folder / "manifest.json").read_text())
    tables = []
    for name in FACT_FRAMES:
        with pa.memory_map(str(folder / f"{name}.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        if table.num_rows != manifest["rows"][name]:
            raise ValueError(f"{name}: {table.num_rows} rows, the manifest says {manifest['rows'][name]}")
        tables.append(table)
    latest = manifest["latest"]
    return (*tables, pd.Timestamp(latest) if latest is not None else None)


def _facts_in_database(store, context: Context, *, k: int, cutoff: pd.Timestamp | None) -> tuple:
    """The facts from rows the store aggregates itself (`sales_rows`, Neo4j: Cypher), with the
    diversion findings judged on the store's candidate units only."""
    rows = store.sales_rows(until=cutoff.to_pydatetime() if cutoff is not None else None)
    candidates = store.timelines(store.diversion_candidates())
    findings = _concat([_facts_of(store, candidates, context, k=k, cutoff=cutoff)[3]]).to_pandas()
    crossing = findings.set_index("code")
    sell_in = rows["sell_in"].to_pandas().sort_values(["code", "ts", "rank", "event_id"], ignore_index=True)
    diverted = _at_or_after(sell_in["ts"], sell_in["rank"], sell_in["event_id"], crossing.reindex(sell_in["code"]))
    sell_in = sell_in[["code", "sku", "store", "ts"]].assign(diverted=diverted)
    sell_out = rows["sell_out"].to_pandas().sort_values("code", ignore_index=True)
    cross = crossing.reindex(sell_out["code"])
    after = _at_or_after(sell_out["ts"], pd.Series(SCAN, index=sell_out.index), sell_out["event_id"], cross)
    products = store.stored("products", pc.unique(pc.drop_null(rows["sell_out"].column("sku"))))
    prices = products.to_pandas().set_index("sku")["unit_price"]
    sell_out.insert(3, "unit_price", sell_out["sku"].map(prices).fillna(0.0).astype(float))
    sell_out["finding"] = cross["crossing_event_id"].where(after, None).to_numpy()
    sell_out["severity"] = cross["severity"].where(after, None).to_numpy()
    opened = rows["opened"].to_pandas().sort_values("code", ignore_index=True)
    latest = rows["latest"].column("ts")[0].as_py() if rows["latest"].num_rows else None
    return sell_in, sell_out, opened, findings, pd.Timestamp(latest) if latest is not None else None


def _at_or_after(ts: pd.Series, rank: pd.Series, event_id: pd.Series, crossing: pd.DataFrame) -> np.ndarray:
    """Per row: its event is at or after the crossing in event order (False without one)."""
    same = (ts == crossing["ts"].to_numpy()) & (rank.to_numpy() == crossing["crossing_rank"].to_numpy())
    later = (ts > crossing["ts"].to_numpy()) | ((ts == crossing["ts"].to_numpy()) & (rank.to_numpy() > crossing["crossing_rank"].to_numpy()))
    return np.asarray((later | (same & (event_id >= crossing["crossing_event_id"].to_numpy()))).fillna(False), bool)


def _facts_of(store, timeline: Timeline, context: Context, *, k: int,
              cutoff: pd.Timestamp | None, facts: EventFacts | None = None) -> tuple:
    """sell_in, sell_out, opened and findings (Arrow tables, for `_concat`) of the units of
    one timeline, and its latest event time (`facts`: of the timeline's events table, see
    `judge`)."""
    ts = timeline.events.column("ts").to_numpy()[timeline.event]  # per row, datetime64[us] (UTC)
    if cutoff is not None:
        keep = ts <= cutoff.asm8.astype("datetime64[us]")  # rounded down: ts <= cutoff
        timeline = Timeline(timeline.unit[keep], timeline.event[keep], timeline.units, timeline.events)
        ts = ts[keep]
    latest = pd.Timestamp(ts.max()).tz_localize("UTC") if len(ts) else None
    j = judge(timeline, context, k=k, facts=facts)
    timeline = j.timeline  # its rows, as the judge ordered them
    party_ids, region_ids = context.party_ids, context.region_ids
    codes = timeline.units.column("code")
    skus = pc.dictionary_encode(timeline.units.column("sku").combine_chunks())
    sku_of = pc.fill_null(skus.indices, -1).to_numpy(zero_copy_only=False)  # per unit, its SKU's position
    event_ids, times = timeline.events.column("event_id"), timeline.events.column("ts")
    unit = timeline.unit

    def at(rows: np.ndarray, values: pa.ChunkedArray) -> pa.Array:
        """values of the events of timeline rows (null where row < 0)."""
        return take_rows(values, np.where(rows >= 0, timeline.event[np.maximum(rows, 0)], -1))

    def party(rows: np.ndarray) -> pa.DictionaryArray:
        return _keyed(party_ids, rows)

    def sku(units: np.ndarray) -> pa.DictionaryArray:
        return _keyed(skus.dictionary, sku_of[units])

    handler = _handlers(j)
    crossing = np.full(timeline.units.num_rows, len(timeline), np.int64)
    crossing[j.verdicts.unit] = j.verdicts.row
    severity = np.full(timeline.units.num_rows, -1, np.int64)
    severity[j.verdicts.unit] = j.verdicts.severity == "suspected"
    severities = pa.array(["confirmed", "suspected"])

    def diverted(rows: np.ndarray) -> np.ndarray:
        """Per timeline row: at or after its unit's crossing."""
        return rows >= crossing[unit[rows]]

    rows = np.flatnonzero(handler >= 0)
    unit_holder = unit[rows].astype(np.int64) * (len(party_ids) + 1) + handler[rows]
    again = np.diff(unit_holder, prepend=-1) == 0  # the store of the row before (cheap; most repeats)
    rows, unit_holder = rows[~again], unit_holder[~again]
    rows = rows[~pd.Series(unit_holder).duplicated().to_numpy()]
    sell_in = _table(code=take_rows(codes, unit[rows]), sku=sku(unit[rows]), store=party(handler[rows]),
                     ts=at(rows, times), diverted=diverted(rows))

    rows, seller = _sell_outs(j, handler)
    sold = sku(unit[rows])
    products = store.stored("products", skus.dictionary)
    price_of = take_rows(products.column("unit_price"), encode(skus.dictionary, products.column("sku").combine_chunks()))
    price = pc.fill_null(take_rows(price_of, sku_of[unit[rows]]), 0.0)
    sell_out = _table(
        event_id=at(rows, event_ids), code=take_rows(codes, unit[rows]), sku=sold, unit_price=price,
        consumer=party(j.party[rows]), ts=at(rows, times), region_id=_keyed(region_ids, j.location[rows]),
        store=party(seller),
        finding=at(np.where(diverted(rows), crossing[unit[rows]], -1), event_ids),
        severity=_keyed(severities, np.where(diverted(rows), severity[unit[rows]], -1)))

    rows = timeline.first_per_unit(np.flatnonzero(j.action == OPEN))
    opened = _table(code=take_rows(codes, unit[rows]), party=party(j.party[rows]), ts=at(rows, times),
                    region_id=_keyed(region_ids, j.location[rows]))

    verdicts = j.verdicts
    rows = verdicts.row.astype(np.int64)
    exit_via = verdicts.exit_via.astype(np.int64)
    findings = _table(
        code=take_rows(codes, verdicts.unit), responsible=party(j.distributor[rows]),
        exit_via=party(exit_via), from_region=_keyed(region_ids, context.home[exit_via]),
        to_region=_keyed(region_ids, j.after[rows]), severity=_keyed(severities, severity[verdicts.unit]),
        crossing_event_id=at(rows, event_ids), ts=at(rows, times), crossing_rank=j.action[rows])
    return sell_in, sell_out, opened, findings, latest


def _keyed(dictionary: pa.Array, rows: np.ndarray) -> pa.DictionaryArray:
    """dictionary[rows] as a dictionary array over all of `dictionary`, null where a row is
    negative (`_concat` keeps only the values used)."""
    rows = np.asarray(rows, np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(rows, mask=rows < 0), dictionary)


def _table(**columns: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Table:
    """A table of Arrow and numpy columns, strings as large_string (as pandas holds them, so
    `_frames` copies none)."""
    def arrow(value: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Array | pa.ChunkedArray:
        value = value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value)
        return value.cast(pa.large_string()) if value.type == pa.string() else value

    return pa.table({name: arrow(value) for name, value in columns.items()})


def _depths(parent: pd.Series) -> pd.Series:
    """Depth of each region in the tree (roots 0; a parent not stored counts as no parent)."""
    depth = pd.Series(0, index=parent.index)
    current = parent.where(parent.isin(parent.index))
    for _ in range(len(parent)):
        known = current.notna()
        if not known.any():
            break
        depth[known] += 1
        current = current[known].map(parent).reindex(parent.index)
        current = current.where(current.isin(parent.index))
    return depth
