"""What the HTTP API and the HTML views ask of a store, with caching.

`ApiService` wraps one store and answers with the pure query functions of `queries/`.
Expensive answers are memoised per *data version*, looked at most once a second: the
embedded store's live version (the service re-opens the store when the folder's CURRENT
changes) or the Neo4j store's latest load (`data_version()`), so a load by another process
is noticed within a second. A store without either is cached for `cache_ttl` seconds. A load
through this service invalidates at once.

The whole-store diversion judgement runs once per store version and k; filters,
pagination, sorting, CSV and grouped views are served from the cached findings. Each
finding is serialised to JSON once, so a page of findings is a join of bytes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
from anyio import to_thread
from fastapi import Depends, Request

from graph.errors import DatasetError, NotFound
from graph.model import TABLES
from graph.settings import Settings
from graph.store import Store, open_store
from queries import influence
from queries.diversion import (CSV_COLUMNS, SEVERITIES, DiversionFinding, DiversionSummary, UntrackedUnit, diversion_view,
                               finding_csv_row, judge_store)
from queries.trace import FlowEdge, TraceResult, flow, trace

log = logging.getLogger(__name__)

T = TypeVar("T")
SORTS = ("code", "-code", "crossing_ts", "-crossing_ts", "responsible", "-responsible", "severity", "-severity",
         "crossing_region", "-crossing_region", "sku", "-sku", "batch", "-batch")


# ---------------------------------------------------------------- memo


class Memo:
    """A thread-safe LRU memo with single flight: concurrent misses of one key compute once.
    Entries older than `ttl` seconds (when given per call) are recomputed."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._gates: dict[Hashable, threading.Lock] = {}

    def peek(self, key: Hashable, ttl: float | None = None) -> Any:
        """The fresh cached value of `key`, or the `_MISSING` sentinel."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None or (ttl is not None and time.monotonic() - hit[0] > ttl):
                return _MISSING
            self._data.move_to_end(key)
            return hit[1]

    def get(self, key: Hashable, compute: Callable[[], T], ttl: float | None = None) -> T:
        value = self.peek(key, ttl)
        if value is not _MISSING:
            return value
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
        try:
            with gate:
                value = self.peek(key, ttl)
                if value is not _MISSING:
                    return value
                value = compute()
                with self._lock:
                    self._data[key] = (time.monotonic(), value)
                    self._data.move_to_end(key)
                    while len(self._data) > self.maxsize:
                        self._data.popitem(last=False)
            return value
        finally:  # also when compute raised (an unknown code must not leave a gate behind)
            with self._lock:
                self._gates.pop(key, None)

    async def aget(self, key: Hashable, compute: Callable[[], T], ttl: float | None = None) -> T:
        """`get` for the event loop: a hit answers at once, a miss computes in a worker thread."""
        value = self.peek(key, ttl)
        if value is not _MISSING:
            return value
        return await to_thread.run_sync(self.get, key, compute, ttl)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_MISSING: Any = object()


# ---------------------------------------------------------------- findings


@dataclass(frozen=True)
class DiversionFilters:
    """Which findings to keep. `region` keeps crossings into that region or any region
    inside it; `since`/`until` bound the crossing time (inclusive, naive = UTC)."""

    severity: str | None = None
    responsible: str | None = None
    region: str | None = None
    sku: str | None = None
    batch: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.severity is not None and self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r}: expected one of {', '.join(SEVERITIES)}")
        if self.since and self.until and _utc(self.since) > _utc(self.until):
            raise ValueError(f"since {self.since.isoformat()} is after until {self.until.isoformat()}")

    def params(self) -> dict[str, str]:
        """The given filters as query parameters of the diversions API (times in ISO 8601)."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in vars(self).items() if v is not None}

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.params().items()) or "none"


def _utc(moment: datetime) -> np.datetime64:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return np.datetime64(moment, "us")


@dataclass
class FindingIndex:
    """All findings of one store version and k, with columns for fast filtering, and the
    store's untracked units."""

    findings: list[DiversionFinding]
    json: list[bytes]
    columns: dict[str, np.ndarray]
    ts: np.ndarray
    untracked: list[UntrackedUnit]
    _orders: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(cls, findings: list[DiversionFinding], untracked: list[UntrackedUnit]) -> FindingIndex:
        names = ("code", "severity", "responsible", "crossing_region", "sku", "batch")
        columns = {n: np.array([getattr(f, n) or "" for f in findings], dtype=object) for n in names}
        ts = np.array([f.crossing_ts.rstrip("Z") for f in findings], dtype="datetime64[us]")
        return cls(findings, [orjson.dumps(f.model_dump()) for f in findings], columns, ts, untracked)

    def select(self, filters: DiversionFilters, regions: set[str] | None, sort: str = "code") -> np.ndarray:
        """Positions of the findings that pass `filters`, in `sort` order."""
        keep = np.ones(len(self.findings), bool)
        for name in ("severity", "responsible", "sku", "batch"):
            value = getattr(filters, name)
            if value is not None:
                keep &= self.columns[name] == value
        if regions is not None:
            keep &= np.isin(self.columns["crossing_region"], list(regions))
        if filters.since is not None:
            keep &= self.ts >= _utc(filters.since)
        if filters.until is not None:
            keep &= self.ts <= _utc(filters.until)
        order = self._order(sort)
        return order[keep[order]]

    def _order(self, sort: str) -> np.ndarray:
        if sort not in self._orders:
            name = sort.lstrip("-")
            values = self.ts if name == "crossing_ts" else self.columns[name].astype(str)
            order = np.lexsort((self.columns["code"].astype(str), values))
            self._orders[sort] = order[::-1].copy() if sort.startswith("-") else order
        return self._orders[sort]


# ---------------------------------------------------------------- the service


class ApiService:
    """Cached answers over one store; safe to share between threads."""

    def __init__(self, store: Store, *, k: int = 3, api_key: str | None = None, cache_ttl: float = 30.0,
                 settings: Settings | None = None, owns_store: bool = False, trace_cache: int = 8192):
        self._store = store
        self.k = k
        self.api_key = api_key
        self.cache_ttl = cache_ttl
        self.settings = settings
        self.owns_store = owns_store
        self.generation = 0
        self.traces = Memo(trace_cache)
        self.results = Memo(512)
        self.pages = Memo(16)
        self._write_lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._version_at = -1.0
        self._data_version: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, store: Store | None = None, cache_ttl: float = 30.0) -> ApiService:
        """A service over `store`, or over the store `settings` names (then owned and closed)."""
        return cls(store if store is not None else open_store(settings), k=settings.k,
                   api_key=settings.api_key.get_secret_value() if settings.api_key else None,
                   cache_ttl=cache_ttl, settings=settings, owns_store=store is None)

    # ------------------------------------------------------------ store and versions

    @property
    def store(self) -> Store:
        """The live store; an embedded store is re-opened when another process loaded a new
        version (checked at most once a second). If that version cannot be opened, the
        checking request fails (StoreError, 503) and the last good version keeps answering."""
        store = self._store
        if _is_embedded(store) and time.monotonic() - self._checked_at > 1.0:
            self._checked_at = time.monotonic()
            live = _current_version_name(store)
            if live != (store.version.name if store.version else None):  # type: ignore[attr-defined]
                from graph.embedded import EmbeddedStore

                log.info("store %s changed to version %s; re-opened", store.uri, live)
                self._store = store = EmbeddedStore(store.path)  # type: ignore[attr-defined]
        return store

    @property
    def uri(self) -> str:
        """The store's folder or URI (without looking for a newer version)."""
        return self._store.uri

    @property
    def backend(self) -> str:
        return "embedded" if _is_embedded(self._store) else "neo4j"

    def version(self) -> str | None:
        """The data version: the embedded store's live version, or the token of the Neo4j
        store's latest load (asked at most once a second)."""
        store = self.store
        if _is_embedded(store):
            return store.version.name if store.version else None  # type: ignore[attr-defined]
        if hasattr(store, "data_version") and time.monotonic() - self._version_at > 1.0:
            self._version_at = time.monotonic()
            self._data_version = store.data_version()
        return self._data_version

    def _key(self, *parts: Hashable) -> tuple[tuple, float | None]:
        """Cache key under the current data version, and the TTL that applies to it."""
        if _is_embedded(self.store) or hasattr(self._store, "data_version"):
            return (self.version(), self.generation, *parts), None
        return ("ttl", self.generation, *parts), self.cache_ttl

    def cached(self, compute: Callable[[], T], *key: Hashable, large: bool = False) -> T:
        """`compute()`, remembered under `key` for the current store version (or the TTL).
        `large` answers (whole pages, megabytes) go to a small memo of their own."""
        versioned, ttl = self._key(*key)
        return (self.pages if large else self.results).get(versioned, compute, ttl)

    def invalidate(self) -> None:
        self.generation += 1
        self.traces.clear()
        self.results.clear()
        self.pages.clear()

    def close(self) -> None:
        if self.owns_store:
            self._store.close()

    # ------------------------------------------------------------ trace and flow

    def trace(self, code: str, k: int | None = None) -> TraceResult:
        key, ttl = self._key("trace", code, k or self.k)
        return self.traces.get(key, lambda: self._traced(code, k or self.k), ttl)[0]

    async def trace_json_async(self, code: str, k: int | None = None) -> bytes:
        """The trace as JSON, for the event loop: at once when cached, else computed in a worker thread."""
        key, ttl = self._key("trace", code, k or self.k)
        entry = await self.traces.aget(key, lambda: self._traced(code, k or self.k), ttl)
        return entry[1]

    def _traced(self, code: str, k: int) -> tuple[TraceResult, bytes]:
        result = trace(self.store, code, k=k)
        return result, orjson.dumps(result.model_dump())

    def flow(self, *, batch: str | None = None, sku: str | None = None) -> list[FlowEdge]:
        key, ttl = self._key("flow", batch, sku)
        return self.results.get(key, lambda: flow(self.store, batch=batch, sku=sku), ttl)

    # ------------------------------------------------------------ diversions

    def finding_index(self, k: int | None = None) -> FindingIndex:
        """Every finding of the store, judged once per store version and k."""
        k = k or self.k
        key, ttl = self._key("findings", k)

        def judge() -> FindingIndex:
            started = time.perf_counter()
            verdicts = judge_store(self.store, k=k)
            index = FindingIndex.build(verdicts.findings.models(), verdicts.untracked_units())
            log.info("judged %s: %d findings, %d untracked units in %.2f s", self.store.uri, len(index.findings),
                     len(index.untracked), time.perf_counter() - started)
            return index

        return self.results.get(key, judge, ttl)

    def findings_if_judged(self) -> list[DiversionFinding]:
        """The store's findings if they are already judged (and cached), else none: for
        pages that merely show examples and must not wait for a judgement."""
        key, ttl = self._key("findings", self.k)
        index = self.results.peek(key, ttl)
        return [] if index is _MISSING else index.findings

    def warm(self) -> None:
        """Judge the store now (the server calls this in the background at start-up)."""
        try:
            self.finding_index()
        except Exception:  # noqa: BLE001 - a request will meet the same error and report it
            log.warning("warming the findings of %s failed", self._store.uri, exc_info=True)

    def selected(self, filters: DiversionFilters, sort: str = "code", k: int | None = None) -> tuple[FindingIndex, np.ndarray]:
        """The finding index and the positions of the findings passing `filters`."""
        if sort not in SORTS:
            raise ValueError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
        index = self.finding_index(k)
        key, ttl = self._key("select", k or self.k, filters, sort)
        regions = self.regions_within(filters.region) if filters.region else None
        return index, self.results.get(key, lambda: index.select(filters, regions, sort), ttl)

    def findings(self, filters: DiversionFilters = DiversionFilters(), sort: str = "code",  # noqa: B008 - frozen
                 k: int | None = None) -> list[DiversionFinding]:
        index, rows = self.selected(filters, sort, k)
        return [index.findings[i] for i in rows]

    def findings_page_json(self, filters: DiversionFilters, *, offset: int, limit: int, sort: str = "code",
                           k: int | None = None) -> bytes:
        """A `FindingsPage` document, assembled from pre-serialised findings."""
        index, rows = self.selected(filters, sort, k)
        items = b",".join(index.json[i] for i in rows[offset:offset + limit])
        return b'{"total":%d,"offset":%d,"limit":%d,"items":[%b]}' % (len(rows), offset, limit, items)

    async def findings_page_json_async(self, filters: DiversionFilters, *, offset: int, limit: int, sort: str = "code",
                                       k: int | None = None) -> bytes:
        """`findings_page_json` for the event loop: at once when the selection is cached, else
        in a worker thread (judging a store takes seconds)."""
        def page() -> bytes:
            return self.findings_page_json(filters, offset=offset, limit=limit, sort=sort, k=k)

        index_key, ttl = self._key("findings", k or self.k)
        select_key, _ = self._key("select", k or self.k, filters, sort)
        if self.results.peek(index_key, ttl) is not _MISSING and self.results.peek(select_key, ttl) is not _MISSING:
            return page()
        return await to_thread.run_sync(page)

    def findings_csv(self, filters: DiversionFilters, sort: str = "code", k: int | None = None) -> str:
        """The findings as CSV (`finding_csv_row`)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(finding_csv_row(finding) for finding in self.findings(filters, sort, k))
        return out.getvalue()

    def diversion_summary(self, k: int | None = None) -> DiversionSummary:
        """The store's units judged, diverted by severity, and untracked (DOMAIN.md §3)."""
        index = self.finding_index(k)
        key, ttl = self._key("unit-count")
        confirmed = int((index.columns["severity"] == "confirmed").sum())
        return DiversionSummary.count(units=self.results.get(key, self.store.unit_count, ttl),
                                      untracked=len(index.untracked), confirmed=confirmed,
                                      suspected=len(index.findings) - confirmed)

    def untracked(self, k: int | None = None) -> list[UntrackedUnit]:
        """The store's untracked units, by code (judged with the findings)."""
        return self.finding_index(k).untracked

    def diversion_groups(self, filters: DiversionFilters, by: str, k: int | None = None) -> list[dict]:
        key, ttl = self._key("groups", k or self.k, filters, by)
        return self.results.get(key, lambda: diversion_view(self.findings(filters, k=k), by), ttl)

    # ------------------------------------------------------------ influence

    def influencers(self, *, top: int | None = 10, percent: float | None = None,
                    by: str = "influence") -> list[influence.Influencer]:
        key, ttl = self._key("influencers", top, percent, by)
        return self.results.get(key, lambda: influence.influencers(self.store, top=top, percent=percent, by=by), ttl)

    def referral_stats(self) -> influence.ReferralStats:
        key, ttl = self._key("referral-stats")
        return self.results.get(key, lambda: influence.referral_stats(self.store), ttl)

    def cascade(self, party_id: str) -> list[influence.CascadeNode]:
        key, ttl = self._key("cascade", party_id)
        return self.results.get(key, lambda: influence.cascade(self.store, party_id), ttl)

    # ------------------------------------------------------------ parties and regions

    def parties(self, ids: Sequence[str]) -> dict[str, dict]:
        """Stored party rows by id (unknown ids left out)."""
        wanted = sorted({i for i in ids if i})
        if not wanted:
            return {}
        rows = self.store.stored("parties", pa.array(wanted, pa.string())).to_pylist()
        return {row["party_id"]: row for row in rows}

    def regions_within(self, region: str) -> set[str]:
        """`region` and every region inside it; NotFound for an unknown region."""
        key, ttl = self._key("region-tree")
        children: dict[str, list[str]] = self.results.get(key, self._region_children, ttl)
        if region not in children:
            raise NotFound(f"unknown region {region!r}")
        found, frontier = {region}, [region]
        while frontier:
            frontier = [c for r in frontier for c in children.get(r, ()) if c not in found]
            found.update(frontier)
        return found

    def _region_children(self) -> dict[str, list[str]]:
        regions = self.store.regions()
        ids = regions.column("region_id").to_pylist()
        children: dict[str, list[str]] = {r: [] for r in ids}
        for region, parent in zip(ids, regions.column("parent_id").to_pylist()):
            if parent in children and parent != region:
                children[parent].append(region)
        return children

    # ------------------------------------------------------------ health and writes

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def check_api_key(self, given: str | None) -> None:
        """Writes need the API key of the settings; without one the service is read-only."""
        import secrets

        from api.errors import ApiError

        if not self.api_key:
            raise ApiError(403, "read_only", "this server is read-only: writes need an API key "
                           "(set CHANNELGRAPH_API_KEY when starting it)")
        if not given or not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (send it in the X-API-Key header)")

    def load_tables(self, tables: dict[str, list[dict[str, Any]]]):  # noqa: ANN201 - LoadReport
        """Load rows given as JSON objects per canonical table, like a dataset folder. No
        rows at all is a DatasetError; its messages never name the server's temporary folder."""
        from loaders.ingest import load_dataset

        given = {name: rows for name, rows in tables.items() if rows}
        if not given:
            raise DatasetError(f"no rows given: send {{\"tables\": {{\"scans\": [{{...}}, ...], ...}}}} with rows for "
                               f"one or more of {', '.join(TABLES)}")
        with self._write_lock, tempfile.TemporaryDirectory(prefix="channelgraph-upload-") as tmp:
            folder = Path(tmp)
            for name, rows in given.items():
                with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as out:
                    for row in rows:
                        out.write(json.dumps({k: _text(v) for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
            store = self._store
            try:
                if _is_embedded(store):
                    from graph.embedded import EmbeddedStore

                    writer = EmbeddedStore(store.path)  # type: ignore[attr-defined]
                    report = load_dataset(writer, folder, rejects_dir=writer.rejects_dir())
                    self._store = EmbeddedStore(store.path)  # type: ignore[attr-defined]  # readers keep the old one
                else:
                    rejects = (self.settings.store if self.settings else Path("channelgraph-data")) / "rejects"
                    report = load_dataset(store, folder, rejects_dir=rejects)
            except DatasetError as exc:  # "/tmp/channelgraph-upload-x/scans.jsonl: ..." -> "upload/scans.jsonl: ..."
                raise DatasetError(str(exc).replace(str(folder), "upload")) from None
            self.invalidate()
        return report


async def current_service(request: Request) -> ApiService:
    """The application's service (a FastAPI dependency; see `Svc`)."""
    return request.app.state.service


Svc = Annotated[ApiService, Depends(current_service)]  # what a route takes to reach the store


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value if isinstance(value, str) else str(value)


def _is_embedded(store: object) -> bool:
    return hasattr(store, "version") and hasattr(store, "path")


def _current_version_name(store: Any) -> str | None:
    try:
        return (Path(store.path) / "CURRENT").read_text().strip() or None
    except OSError:
        return None
