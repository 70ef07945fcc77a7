"""An independent reference ("oracle") for the answers of DOMAIN.md §3, §4 and §5.

Written straight from the specification (`../shared/DOMAIN.md` §2-§5; `docs/design.md`
only where DOMAIN.md is silent: the order of events at equal times, the order referral
rows are taken in, the formulas and thresholds of §5) in plain dicts and loops. It shares no code with `loaders/` or
`queries/`: it reads the dataset folder itself, keeps the rows the contract allows, and
answers per unit by walking its events one by one. Slow on purpose; for small datasets.

    data = read_dataset(folder)
    diversions(data)        # {unit code: finding dict}, the `diversions --format json` fields
    untracked(data)         # {unit code: row}, the `diversions --untracked --format json` fields
    trace(data, code)       # the `trace CODE --format json` fields
    influencers(data)       # {party_id: metrics}, the `influencers --format json` fields
    referral_stats(data)    # the `influencers --stats --format json` document
    store_health(data)      # {store id: health}, the `stores --format json` fields
    rebates(data, policy)   # the `rebates --lines --format json` document
    regions(data)           # the `regions --format json` document
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import networkx as nx
import pyarrow.parquet as pq

TABLES = ("regions", "parties", "products", "codes", "scans", "referrals")
KINDS = ("factory", "distributor", "store", "consumer", "salesperson")
LEVELS = ("unit", "box", "case", "pallet")  # lowest first
ACTIONS = ("ship", "receive", "open", "scan")  # also the order of events at one time
CHANNELS = ("share", "store", "salesperson")
REQUIRED = {
    "regions": ("region_id",), "parties": ("party_id", "kind"), "products": ("sku",),
    "codes": ("code", "level"), "scans": ("code", "action", "party_id", "ts"),
    "referrals": ("referrer_id", "referee_id", "ts"),
}


# ---------------------------------------------------------------- reading


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _rows_of(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [{k: _text(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [{k: _text(v) for k, v in json.loads(line).items()} for line in f if line.strip()]
    if path.suffix == ".parquet":
        return [{k: _text(v) for k, v in row.items()} for row in pq.read_table(path).to_pylist()]
    return []


def parse_ts(text: str | None) -> datetime | None:
    """ISO 8601 to an aware UTC datetime (a time without offset is UTC); None if bad."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def iso(moment: datetime) -> str:
    """`2024-03-01T08:00:00Z` (microseconds only when non-zero), as the CLI prints times."""
    plain = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return plain.isoformat(timespec="microseconds" if plain.microsecond else "seconds") + "Z"


@dataclass
class Dataset:
    """The rows of one load that the contract accepts, with what was rejected."""

    regions: dict[str, str | None] = field(default_factory=dict)  # region -> parent
    region_names: dict[str, str | None] = field(default_factory=dict)
    parties: dict[str, dict] = field(default_factory=dict)
    prices: dict[str, float | None] = field(default_factory=dict)  # sku -> unit_price
    codes: dict[str, dict] = field(default_factory=dict)
    scans: list[dict] = field(default_factory=list)  # unique events, ts parsed
    referrals: list[dict] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # table -> rows
    duplicates: Counter = field(default_factory=Counter)
    implicit_consumers: int = 0

    def __post_init__(self) -> None:
        self._on_code: dict[str, list[dict]] | None = None

    # ------------------------------------------------------------ the world

    def parent(self, code: str) -> str | None:
        return self.codes[code]["parent_code"]

    def lineage(self, code: str) -> list[str]:
        """The code and every code it is packed in, innermost first."""
        chain = [code]
        while self.parent(chain[-1]) is not None:
            chain.append(self.parent(chain[-1]))
        return chain

    def inherited(self, code: str, column: str) -> str | None:
        """A code's own value of `column`, else the nearest packed-in code's."""
        for c in self.lineage(code):
            if self.codes[c].get(column) is not None:
                return self.codes[c][column]
        return None

    def case_of(self, code: str) -> str | None:
        return next((c for c in self.lineage(code) if self.codes[c]["level"] == "case"), None)

    def effective_events(self, code: str) -> list[dict]:
        """Events on the code and on every code it is packed in, in event order."""
        if self._on_code is None:
            self._on_code = defaultdict(list)
            for event in self.scans:
                self._on_code[event["code"]].append(event)
        events = [e for c in self.lineage(code) for e in self._on_code.get(c, [])]
        # at one time, assignments first: the goods are the distributor's before it hands them on
        return sorted(events, key=lambda e: (e["ts"], assignee(self, e) is None, ACTIONS.index(e["action"]), e["event_id"]))

    def kind(self, party: str | None) -> str | None:
        return self.parties[party]["kind"] if party in self.parties else None

    def home(self, party: str | None) -> str | None:
        return self.parties[party].get("region_id") if party in self.parties else None

    def territory(self, distributor: str) -> list[str]:
        declared = self.parties[distributor].get("territory")
        roots = [r.strip() for r in declared.split("|") if r.strip()] if declared else []
        return roots or [self.home(distributor)]

    def inside(self, distributor: str, region: str) -> bool:
        roots = set(self.territory(distributor))
        while region is not None:
            if region in roots:
                return True
            region = self.regions.get(region)
        return False


def read_dataset(folder: Path) -> Dataset:
    """Read and validate every table file of `folder` (`scans.csv`, `scans_2.jsonl`, ...)."""
    raw: dict[str, list[dict]] = {t: [] for t in TABLES}
    for path in sorted(Path(folder).iterdir()):
        stem = path.name[: -len(path.suffix)]
        table = next((t for t in TABLES if stem == t or stem.startswith(t + "_")), None)
        if table:
            raw[table] += _rows_of(path)
    data = Dataset()
    for table in TABLES:
        rows = []
        for row in raw[table]:
            if any(row.get(c) is None for c in REQUIRED[table]):
                data.rejected[table] += 1
            else:
                rows.append(row)
        raw[table] = rows
    _regions(data, raw["regions"])
    _products(data, raw["products"])
    _parties(data, raw["parties"])
    _codes(data, raw["codes"])
    implicit: dict[str, tuple] = {}
    _referrals(data, raw["referrals"], implicit)
    _scans(data, raw["scans"], implicit)
    for party, (_, region) in implicit.items():
        data.parties[party] = {"party_id": party, "kind": "consumer", "region_id": region}
    data.implicit_consumers = len(implicit)
    return data


def _unique(data: Dataset, table: str, rows: list[dict], key: str) -> list[dict]:
    """First row of each key; identical repeats are duplicates, differing ones rejected."""
    seen: dict[str, dict] = {}
    for row in rows:
        if row[key] not in seen:
            seen[row[key]] = row
        elif seen[row[key]] == row:
            data.duplicates[table] += 1
        else:
            data.rejected[table] += 1
    return list(seen.values())


def _regions(data: Dataset, rows: list[dict]) -> None:
    unique = _unique(data, "regions", rows, "region_id")
    rows = {r["region_id"]: r.get("parent_id") for r in unique}
    while True:  # a parent must exist, and no region may be its own ancestor
        bad = set()
        for region in rows:
            seen, at = {region}, rows[region]
            while at is not None and at in rows and at not in seen:
                seen.add(at)
                at = rows[at]
            if at is not None:  # unknown parent, or a cycle
                bad.add(region)
        if not bad:
            break
        for region in bad:
            del rows[region]
            data.rejected["regions"] += 1
    data.regions = rows
    data.region_names = {r["region_id"]: r.get("name") for r in unique if r["region_id"] in rows}


def _products(data: Dataset, rows: list[dict]) -> None:
    for row in _unique(data, "products", rows, "sku"):
        price = row.get("unit_price")
        try:
            value = float(price) if price is not None else None
        except ValueError:
            value = -1.0
        if value is not None and not (0 <= value < float("inf")):
            data.rejected["products"] += 1
            continue
        data.prices[row["sku"]] = value


def _parties(data: Dataset, rows: list[dict]) -> None:
    good = []
    for row in rows:
        region, kind = row.get("region_id"), row["kind"]
        territory = [t.strip() for t in (row.get("territory") or "").split("|") if t.strip()]
        if (kind not in KINDS or (kind in ("distributor", "store") and region is None)
                or (region is not None and region not in data.regions)
                or any(t not in data.regions for t in territory)):
            data.rejected["parties"] += 1
        else:
            good.append(row)
    parties = {r["party_id"]: r for r in _unique(data, "parties", good, "party_id")}
    while True:
        bad = [p for p, r in parties.items() if r.get("upstream_id") is not None and r["upstream_id"] not in parties]
        if not bad:
            break
        for p in bad:
            del parties[p]
            data.rejected["parties"] += 1
    data.parties = parties


def _codes(data: Dataset, rows: list[dict]) -> None:
    good = []
    for row in rows:
        if row["level"] not in LEVELS:
            data.rejected["codes"] += 1
        else:
            good.append(row)
    codes = {r["code"]: r for r in _unique(data, "codes", good, "code")}
    for row in codes.values():
        row.setdefault("parent_code", None)
    while True:  # a parent must exist and be of a higher level (so no cycle either)
        bad = [c for c, r in codes.items() if r["parent_code"] is not None and (
            r["parent_code"] not in codes
            or LEVELS.index(codes[r["parent_code"]]["level"]) <= LEVELS.index(r["level"]))]
        if not bad:
            break
        for c in bad:
            del codes[c]
            data.rejected["codes"] += 1
    data.codes = codes


def _register(implicit: dict[str, tuple], party: str, ts: datetime, region: str | None) -> None:
    """An unknown id that a scan or referral names becomes a consumer; its region from
    its earliest scan that names one."""
    seen = implicit.get(party)
    if seen is None:
        implicit[party] = (ts if region else None, region)
    elif region and (seen[0] is None or ts < seen[0]):
        implicit[party] = (ts, region)


def _referrals(data: Dataset, rows: list[dict], implicit: dict[str, tuple]) -> None:
    seen = set()
    for row in rows:
        ts = parse_ts(row["ts"])
        channel, code = row.get("channel"), row.get("code")
        if ts is None or (channel is not None and channel not in CHANNELS) or (code is not None and code not in data.codes):
            data.rejected["referrals"] += 1
            continue
        key = (row["referrer_id"], row["referee_id"], ts, channel, code)
        if key in seen:
            data.duplicates["referrals"] += 1
            continue
        seen.add(key)
        for party in (row["referrer_id"], row["referee_id"]):
            if party not in data.parties:
                _register(implicit, party, ts, None)
        data.referrals.append({**row, "ts": ts})


def _scans(data: Dataset, rows: list[dict], implicit: dict[str, tuple]) -> None:
    seen = set()
    for row in rows:
        ts, action, party = parse_ts(row["ts"]), row["action"], row["party_id"]
        counterparty, region = row.get("counterparty_id"), row.get("region_id")
        if (ts is None or action not in ACTIONS or row["code"] not in data.codes
                or (party not in data.parties and action != "scan")
                or (counterparty is not None and counterparty not in data.parties)
                or (region is not None and region not in data.regions)):
            data.rejected["scans"] += 1
            continue
        event_id = row.get("event_id") or "content:" + json.dumps(
            [row["code"], action, party, counterparty, row["ts"], region])
        if event_id in seen:
            data.duplicates["scans"] += 1
            continue
        seen.add(event_id)
        if party not in data.parties:
            _register(implicit, party, ts, region)
        data.scans.append({"event_id": event_id, "code": row["code"], "action": action, "party_id": party,
                           "counterparty_id": counterparty, "ts": ts, "region_id": region})


# ---------------------------------------------------------------- diversion (§3)


def assignee(data: Dataset, event: dict) -> str | None:
    """The distributor an event assigns the goods to: a factory's ship to a distributor,
    or a distributor's receive from a factory."""
    party, other = event["party_id"], event["counterparty_id"]
    if event["action"] == "ship" and data.kind(party) == "factory" and data.kind(other) == "distributor":
        return other
    if event["action"] == "receive" and data.kind(party) == "distributor" and data.kind(other) == "factory":
        return party
    return None


def location(data: Dataset, event: dict) -> str | None:
    """Where the event happened: its region, else the performing party's."""
    return event["region_id"] or data.home(event["party_id"])


def location_after(data: Dataset, event: dict) -> str | None:
    """Where the goods are after the event: a ship's receiver's registered region."""
    if event["action"] == "ship" and event["counterparty_id"] is not None:
        return data.home(event["counterparty_id"]) or location(data, event)
    return location(data, event)


def holder_after(event: dict) -> str:
    return event["counterparty_id"] if event["action"] == "ship" and event["counterparty_id"] else event["party_id"]


def _out_of_hands(data: Dataset, event: dict, assigned: str) -> bool:
    """A ship to, a receive, open or scan by a store or a distributor other than the
    assigned one."""
    if event["action"] == "ship":
        who = event["counterparty_id"]
    elif event["action"] in ("receive", "open", "scan"):  # a store's scan: a point-of-sale one
        who = event["party_id"]
    else:
        return False
    return data.kind(who) == "store" or (data.kind(who) == "distributor" and who != assigned)


def _store_inside(data: Dataset, event: dict, assigned: str) -> bool:
    """A store inside the territory handled the goods: a store performed the event, or
    received the shipment, inside the territory."""
    if data.kind(event["party_id"]) == "store":
        where = location(data, event)
    elif event["action"] == "ship" and data.kind(event["counterparty_id"]) == "store":
        where = location_after(data, event)
    else:
        return False
    return where is not None and data.inside(assigned, where)


@dataclass
class UnitVerdict:
    unit: str
    events: list[dict]
    assigned: list[str | None]  # per event: the governing assignment
    untracked: bool
    crossing: int | None = None  # index into events
    severity: str | None = None
    exit_via: str | None = None
    outside_scans: list[tuple[str, str]] = field(default_factory=list)  # (assigned, region) of each consumer evidence


def judge_unit(data: Dataset, unit: str) -> UnitVerdict:
    """One unit's events walked in order: its first confirmed evidence, else its first
    consumer evidence (suspected until the k rule looks at its case)."""
    events = data.effective_events(unit)
    verdict = UnitVerdict(unit, events, [], untracked=True)
    assigned, store_seen, last_inside = None, False, None
    confirmed = consumer = None
    for i, event in enumerate(events):
        newly = assignee(data, event)
        if newly is not None:
            assigned, store_seen, last_inside, verdict.untracked = newly, False, None, False
        verdict.assigned.append(assigned)
        if assigned is None:
            continue
        after = location_after(data, event)
        inside = after is not None and data.inside(assigned, after)
        if (newly is None and confirmed is None and after is not None and not inside
                and _out_of_hands(data, event, assigned)):
            confirmed = (i, last_inside or assigned)
        where = location(data, event)
        consumers = data.kind(event["party_id"]) not in ("store", "distributor")
        if event["action"] == "scan" and consumers and not store_seen and where is not None and not data.inside(assigned, where):
            verdict.outside_scans.append((assigned, where))
            if consumer is None:
                consumer = (i, last_inside or assigned)
        store_seen = store_seen or _store_inside(data, event, assigned)
        if inside:
            last_inside = holder_after(event)
    if confirmed is not None:
        (verdict.crossing, verdict.exit_via), verdict.severity = confirmed, "confirmed"
    elif consumer is not None:
        (verdict.crossing, verdict.exit_via), verdict.severity = consumer, "suspected"
    return verdict


def judge_all(data: Dataset, k: int = 3) -> dict[str, UnitVerdict]:
    """Verdicts of every unit, the k rule applied: when k units of one case were scanned
    outside the territory (consumer evidence, under the same distributor) in one region,
    a suspected one among them is confirmed."""
    verdicts = {code: judge_unit(data, code) for code, row in data.codes.items() if row["level"] == "unit"}
    groups: dict[tuple, set[str]] = defaultdict(set)
    for v in verdicts.values():
        case = data.case_of(v.unit)
        for assigned, region in v.outside_scans if case is not None else []:
            groups[case, assigned, region].add(v.unit)
    for group in groups.values():
        if len(group) >= k:
            for unit in group:
                if verdicts[unit].severity == "suspected":
                    verdicts[unit].severity = "confirmed"
    return verdicts


def hop(data: Dataset, event: dict, crossed: bool) -> dict:
    return {"party_id": event["party_id"], "kind": data.kind(event["party_id"]), "region_id": location(data, event),
            "ts": iso(event["ts"]), "event_id": event["event_id"], "action": event["action"], "crossed": crossed}


def finding(data: Dataset, v: UnitVerdict) -> dict:
    crossing = v.events[v.crossing]
    responsible = v.assigned[v.crossing]
    return {
        "code": v.unit, "sku": data.inherited(v.unit, "sku"), "batch": data.inherited(v.unit, "batch"),
        "responsible": responsible, "territory": data.territory(responsible), "severity": v.severity,
        "crossing_event_id": crossing["event_id"], "crossing_ts": iso(crossing["ts"]),
        "crossing_party": crossing["party_id"], "crossing_region": location_after(data, crossing),
        "exit_via": v.exit_via,
        "path": [hop(data, e, i == v.crossing) for i, e in enumerate(v.events)],
    }


def diversions(data: Dataset, k: int = 3) -> dict[str, dict]:
    """One finding per diverted unit, by code."""
    return {code: finding(data, v) for code, v in judge_all(data, k).items() if v.severity}


def untracked(data: Dataset) -> dict[str, dict]:
    """Every unit with no assignment (reported, never judged), by code: how many events
    apply to it, who held it and where it was after the last one, the first and last time."""
    out = {}
    for code, v in judge_all(data).items():
        if v.untracked:
            first, last = (v.events[0], v.events[-1]) if v.events else (None, None)
            out[code] = {
                "code": code, "sku": data.inherited(code, "sku"), "batch": data.inherited(code, "batch"),
                "events": len(v.events), "last_holder": holder_after(last) if last else None,
                "last_region": location_after(data, last) if last else None,
                "first_ts": iso(first["ts"]) if first else None, "last_ts": iso(last["ts"]) if last else None}
    return out


def trace(data: Dataset, code: str, k: int = 3, verdicts: dict[str, UnitVerdict] | None = None) -> dict:
    """The trace of one code: its custody path (events on it and its ancestors), the
    distributor its latest assignment names, its finding (a case or pallet judged as one
    unit: confirmed when a unit it holds is confirmed at the same crossing, as the k rule
    may confirm them) and, for a case or pallet, what it holds. `verdicts`:
    `judge_all(data, k)` when already at hand."""
    verdicts = judge_all(data, k) if verdicts is None else verdicts
    v = verdicts[code] if code in verdicts else judge_unit(data, code)
    if code not in verdicts and v.severity == "suspected":
        crossing = v.events[v.crossing]["event_id"]
        held = [verdicts[c] for c in data.codes if c in verdicts and code in data.lineage(c)[1:]]
        if any(u.severity == "confirmed" and u.events[u.crossing]["event_id"] == crossing for u in held):
            v.severity = "confirmed"
    out = {
        "code": code, "level": data.codes[code]["level"], "sku": data.inherited(code, "sku"),
        "batch": data.inherited(code, "batch"), "ancestors": data.lineage(code)[1:],
        "assigned_distributor": next((a for a in reversed(v.assigned) if a), None), "untracked": v.untracked,
        "path": [hop(data, e, i == v.crossing) for i, e in enumerate(v.events)],
        "diversion": finding(data, v) if v.severity else None,
    }
    if code not in verdicts:
        inside = [c for c in data.codes if code in data.lineage(c)[1:]]
        units = [verdicts[c] for c in inside if c in verdicts]
        out["children"] = {
            "by_level": dict(Counter(data.codes[c]["level"] for c in inside)), "units": len(units),
            "diverted_units": sum(1 for u in units if u.severity),
            "confirmed": sum(1 for u in units if u.severity == "confirmed"),
            "suspected": sum(1 for u in units if u.severity == "suspected"),
            "untracked_units": sum(1 for u in units if u.untracked)}
    return out


# ---------------------------------------------------------------- influence (§4)


@dataclass
class Attribution:
    parent: dict[str, str]  # referee -> its first-touch referrer
    referred_at: dict[str, datetime]
    ignored: Counter


def attribute(data: Dataset) -> Attribution:
    """First-touch attribution, rows in (ts, referrer, referee) order; self-referrals,
    repeated pairs, referees already attributed and cycle-closing rows ignored."""
    parent: dict[str, str] = {}
    referred_at: dict[str, datetime] = {}
    ignored: Counter = Counter()
    pairs = set()
    for row in sorted(data.referrals, key=lambda r: (r["ts"], r["referrer_id"], r["referee_id"])):
        a, b = row["referrer_id"], row["referee_id"]
        if a == b:
            ignored["self"] += 1
            continue
        if (a, b) in pairs:
            ignored["duplicate"] += 1
            continue
        pairs.add((a, b))
        if b in parent:
            ignored["late"] += 1
            continue
        up = a
        while up in parent and up != b:
            up = parent[up]
        if up == b:
            ignored["cycle"] += 1
            continue
        parent[b], referred_at[b] = a, row["ts"]
    return Attribution(parent, referred_at, ignored)


def purchases(data: Dataset) -> dict[str, list[tuple[datetime, float]]]:
    """Per party: (time, unit_price) of each unit it bought. A `scan` is the purchase
    signal and an event applies to everything packed inside its code, so a unit is bought
    by the first `scan` among its effective events (a scanned case: each unit in it; a
    repeat scan of a unit buys nothing). This oracle reads no EPCIS: nothing is retracted."""
    out: dict[str, list] = defaultdict(list)
    for code, row in data.codes.items():
        if row["level"] != "unit":
            continue
        scan = next((e for e in data.effective_events(code) if e["action"] == "scan"), None)
        if scan is not None:
            out[scan["party_id"]].append((scan["ts"], data.prices.get(data.inherited(code, "sku")) or 0.0))
    return out


def influencers(data: Dataset) -> dict[str, dict]:
    """Every referrer with an attributed referee: direct, converted, cascade size and
    depth, referred revenue, PageRank influence (credit flows referee -> referrer)."""
    attribution = attribute(data)
    parent, referred_at = attribution.parent, attribution.referred_at
    bought = purchases(data)
    children: dict[str, list[str]] = defaultdict(list)
    for child, up in parent.items():
        children[up].append(child)

    def after_referral(member: str) -> list[float]:
        return [price for ts, price in bought.get(member, []) if ts >= referred_at[member]]

    graph = nx.DiGraph()
    graph.add_edges_from((child, up) for child, up in parent.items())
    rank = nx.pagerank(graph, alpha=0.85) if graph.number_of_edges() else {}
    out = {}
    for referrer in children:
        cascade, depth, frontier = [], 0, children[referrer]
        while frontier:
            depth += 1
            cascade += frontier
            frontier = [c for member in frontier for c in children.get(member, [])]
        out[referrer] = {
            "party_id": referrer, "kind": data.kind(referrer), "direct": len(children[referrer]),
            "converted": sum(1 for c in children[referrer] if after_referral(c)),
            "cascade_size": len(cascade), "cascade_depth": depth,
            "referred_revenue": round(sum(sum(after_referral(m)) for m in cascade), 2),
            "influence": rank[referrer],
        }
    return out


def referral_stats(data: Dataset) -> dict:
    """Referral rows read, attributed, and ignored by reason."""
    attribution = attribute(data)
    return {"referrals": len(data.referrals), "attributed": len(attribution.parent),
            "ignored": {reason: attribution.ignored[reason] for reason in ("self", "duplicate", "late", "cycle")}}


# ---------------------------------------------------------------- stores, rebates, regions (§5)
# DOMAIN.md §5 leaves the numbers open; they follow docs/design.md "Stores, consumers,
# rebates, regions": facts as of `as_of` (later events dropped before judging), sell-in
# once per (unit, store) when the store first handles the unit, sell-out a unit's first
# consumer scan credited to the store that handled it last before.

LEVEL_DEPTH = {"country": 0, "province": 1, "city": 2, "district": 3}
ROLES = ("store", "distributor", "salesperson")


@dataclass
class Sales:
    """The facts every §5 analysis reads, as plain lists of dicts."""

    as_of: datetime
    verdicts: dict[str, UnitVerdict]
    sell_in: list[dict]  # unit, store, ts, diverted
    sell_out: list[dict]  # unit, sku, event, consumer, ts, region, store, finding, severity
    opened: list[dict]  # unit, ts, region


def as_known_at(data: Dataset, as_of: datetime | None) -> Dataset:
    """The dataset without the events after `as_of`."""
    if as_of is None:
        return data
    return replace(data, scans=[e for e in data.scans if e["ts"] <= as_of])


def handler(data: Dataset, event: dict) -> str | None:
    """The store that handles the goods in a ship, receive or open: the store holding them
    after it, else the store performing it (a store's ship to a consumer, DOMAIN.md §5:
    "the store that handled the unit last")."""
    if event["action"] == "scan":
        return None
    return next((p for p in (holder_after(event), event["party_id"]) if data.kind(p) == "store"), None)


def sales(data: Dataset, k: int = 3, as_of: datetime | None = None) -> Sales:
    """Sell-in, sell-out and first opens of every unit, walking its events in order."""
    data = as_known_at(data, as_of)
    verdicts = judge_all(data, k)
    facts = Sales(as_of or max(e["ts"] for e in data.scans), verdicts, [], [], [])
    for unit, v in verdicts.items():
        crossed = v.crossing if v.severity else len(v.events)  # events from here on are diverted
        held, last_store, scanned, opened = set(), None, False, False
        for i, event in enumerate(v.events):
            store = handler(data, event)
            if store is not None:
                last_store = store
                if store not in held:
                    held.add(store)
                    facts.sell_in.append({"unit": unit, "store": store, "ts": event["ts"], "diverted": i >= crossed})
            if event["action"] == "open" and not opened:
                opened = True
                facts.opened.append({"unit": unit, "ts": event["ts"], "region": location(data, event)})
            if event["action"] == "scan" and not scanned:
                scanned = True
                withheld = i >= crossed
                facts.sell_out.append({
                    "unit": unit, "sku": data.inherited(unit, "sku"), "event": event["event_id"],
                    "consumer": event["party_id"], "ts": event["ts"], "region": location(data, event),
                    "store": last_store, "finding": v.events[v.crossing]["event_id"] if withheld else None,
                    "severity": v.severity if withheld else None})
    return facts


def ancestor_at(data: Dataset, region: str | None, level: str) -> str | None:
    """The region's ancestor at `level` (itself when it is at or above that level)."""
    chain = []
    while region is not None:
        chain.append(region)
        region = data.regions.get(region)
    chain.reverse()  # the root first: chain[depth]
    return chain[min(LEVEL_DEPTH[level], len(chain) - 1)] if chain else None


def robust_z(values: list[float]) -> list[float]:
    """Modified z-scores: 0.6745 (x - median) / MAD; MAD 0: (x - median) / (1.2533 mean
    absolute deviation); all 0 when every value is the median."""
    median = statistics.median(values)
    mad = statistics.median(abs(x - median) for x in values)
    if mad > 0:
        return [0.6745 * (x - median) / mad for x in values]
    mean_ad = statistics.fmean(abs(x - median) for x in values)
    return [(x - median) / (1.2533 * mean_ad) if mean_ad > 0 else 0.0 for x in values]


def store_health(data: Dataset, *, as_of: datetime | None = None, window_days: int = 28, peer_level: str = "province",
                 history_weeks: int = 8, k: int = 3) -> dict[str, dict]:
    """Per registered store, the `stores --format json` fields (flags without their reason
    text), z threshold 3.5, at least 4 peers that ever sold."""
    facts = sales(data, k, as_of)
    day = timedelta(days=1)
    start = facts.as_of - window_days * day
    history_start = start - history_weeks * 7 * day
    out = {}
    last_sell_in = {s["unit"]: s for s in facts.sell_in}  # sell_in is in event order per unit
    for store, party in data.parties.items():
        if party["kind"] != "store":
            continue
        sold_in = [s for s in facts.sell_in if s["store"] == store]
        passed_on = sum(1 for s in sold_in if s is not last_sell_in[s["unit"]])  # another store took the unit later
        sold = [s for s in facts.sell_out if s["store"] == store]
        weekly = [sum(1 for s in sold if history_start + w * 7 * day < s["ts"] <= history_start + (w + 1) * 7 * day)
                  for w in range(history_weeks)]
        out[store] = {
            "store_id": store, "name": party.get("name"), "region_id": party.get("region_id"),
            "peer_region": ancestor_at(data, party.get("region_id"), peer_level), "distributor": party.get("upstream_id"),
            "sell_in": len(sold_in), "sell_in_window": sum(1 for s in sold_in if s["ts"] > start),
            "sell_out": len(sold), "sell_out_window": sum(1 for s in sold if s["ts"] > start),
            "diverted_in": sum(1 for s in sold_in if s["diverted"]), "passed_on": passed_on, "weekly": weekly, "flags": []}
    for peers in _groups(out.values(), "peer_region").values():
        members = {s["store_id"] for s in peers}
        sold_in = len({s["unit"] for s in facts.sell_in if s["store"] in members})  # units that came into the region's stores
        sold_out = sum(s["sell_out"] for s in peers)
        rate = min(sold_out / sold_in, 1.0) if sold_in else 0.0
        for s in peers:
            s["scan_rate"] = rate or None  # no scan in the region: no rate to estimate with
            daily = s["sell_out_window"] / (rate or 1.0) / window_days
            stock = max(s["sell_in"] - s["passed_on"] - s["sell_out"] / (rate or 1.0), 0.0)
            cover = round(stock / daily, 1) if daily > 0 else None
            s.update(daily_sales=daily, stock=stock, days_of_cover=cover,
                     next_purchase_date=iso(facts.as_of + cover * day) if cover is not None else None,
                     next_purchase_qty=math.ceil(daily * window_days - 1e-9))
    for peers in _groups(out.values(), "peer_region").values():
        sellers = [s for s in peers if s["sell_out"] > 0]
        if len(sellers) < 4:
            continue
        for metric in ("daily_sales", "sell_in_window"):
            values = [float(s[metric]) for s in sellers]
            for s, z in zip(sellers, robust_z(values)):
                if abs(z) >= 3.5:
                    s["flags"].append(_flag("peers", metric, s[metric], statistics.median(values), z))
    weeks = window_days / 7
    for s in out.values():
        if history_weeks and all(s["weekly"]):
            median = statistics.median(s["weekly"])
            spread = max(1.4826 * statistics.median(abs(w - median) for w in s["weekly"]), math.sqrt(median), 1.0)
            current = s["sell_out_window"] / weeks
            z = (current - median) / (spread / math.sqrt(weeks))
            if abs(z) >= 3.5:
                s["flags"].append(_flag("history", "weekly_sell_out", current, median, z))
        if s["diverted_in"] >= 3 and s["diverted_in"] / s["sell_in"] >= 0.5:
            s["flags"].append({"basis": "diversion", "metric": "diverted_share", "direction": "high",
                               "value": round(s["diverted_in"] / s["sell_in"], 3), "baseline": 0.5, "z": None})
        del s["weekly"], s["passed_on"]
        s.update(daily_sales=round(s["daily_sales"], 3), stock=round(s["stock"], 1), abnormal=bool(s["flags"]),
                 scan_rate=None if s["scan_rate"] is None else round(s["scan_rate"], 4))
    return out


def _groups(rows, key: str) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return groups


def _flag(basis: str, metric: str, value: float, baseline: float, z: float) -> dict:
    return {"basis": basis, "metric": metric, "direction": "high" if z > 0 else "low", "value": round(value, 3),
            "baseline": round(baseline, 3), "z": round(z, 2)}


def rebates(data: Dataset, policy: dict, *, month: str | None = None, as_of: datetime | None = None,
            k: int = 3) -> dict:
    """The `rebates --lines --format json` document for a policy
    `{"default": {role: amount}, "sku": {sku: {role: amount}}}`: per first consumer scan
    credited to a store and per role, the policy amount owed to the store, its
    `upstream_id` and its salesperson (its `salesperson_id`, else the distributor's only
    salesperson); withheld when the unit's crossing came at or before the scan. A scan that
    a party other than a consumer performed (a store's own scan) earns nothing."""
    facts = sales(data, k, as_of)
    scans = [s for s in facts.sell_out if month is None or s["ts"].strftime("%Y-%m") == month]
    employed = defaultdict(list)
    for party, row in data.parties.items():
        if row["kind"] == "salesperson" and row.get("upstream_id"):
            employed[row["upstream_id"]].append(party)
    lines = []
    def by_consumer(scan: dict) -> bool:
        return data.parties[scan["consumer"]]["kind"] == "consumer"

    for s in sorted((s for s in scans if s["store"] and by_consumer(s)), key=lambda s: (s["ts"], s["event"])):
        store = data.parties[s["store"]]
        distributor = store.get("upstream_id")
        only = employed[distributor] if distributor and len(employed[distributor]) == 1 else [None]
        for role, party in zip(ROLES, (s["store"], distributor, store.get("salesperson_id") or only[0])):
            amount = policy.get("sku", {}).get(s["sku"], {}).get(role, policy.get("default", {}).get(role, 0.0))
            status = "withheld" if s["finding"] else "owed" if party else "unassigned"
            lines.append({"event_id": s["event"], "ts": iso(s["ts"]), "month": s["ts"].strftime("%Y-%m"), "code": s["unit"],
                          "sku": s["sku"], "consumer": s["consumer"], "role": role, "party_id": party,
                          "amount": float(amount), "status": status, "finding": s["finding"], "severity": s["severity"]})
    totals = defaultdict(lambda: {"scans": 0, "owed": 0.0, "withheld": 0.0, "unassigned": 0.0})
    for line in lines:
        total = totals[line["month"], line["role"], line["party_id"]]
        total["scans"] += 1
        total[line["status"]] += line["amount"]
    return {
        "currency": policy.get("currency", "CNY"), "scans": len(scans), "no_store": sum(1 for s in scans if not s["store"]),
        "not_consumer": sum(1 for s in scans if s["store"] and not by_consumer(s)),
        **{status: round(sum(x["amount"] for x in lines if x["status"] == status), 2)
           for status in ("owed", "withheld", "unassigned")},
        "totals": [{"month": m, "role": r, "party_id": p, "scans": t["scans"],
                    **{status: round(t[status], 2) for status in ("owed", "withheld", "unassigned")}}
                   for (m, r, p), t in sorted(totals.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))],
        "withheld_lines": [x for x in lines if x["status"] == "withheld"], "lines": lines}


def period_of(moment: datetime, period: str) -> str:
    """`2024-03` (month), `2024-02-26/2024-03-03` (week, Monday to Sunday) or `all`."""
    if period == "month":
        return moment.strftime("%Y-%m")
    if period == "week":
        monday = moment.date() - timedelta(days=moment.weekday())
        return f"{monday}/{monday + timedelta(days=6)}"
    return "all"


def regions(data: Dataset, *, level: str = "province", period: str = "month", as_of: datetime | None = None,
            k: int = 3) -> dict:
    """The `regions --format json` document: per region at `level` and period, units in
    (each unit's first sell-in into a store registered there), units first opened and first scanned there
    (the event's location), registered and active stores (a sell-out in the period),
    diversions in (the crossing's location after) and out (exit_via's registered region),
    both at the crossing's time; every region with a store or a count, for every period
    with a count. The matrix: diverted units per (exit_via's region, crossing region)."""
    facts = sales(data, k, as_of)
    up = lambda region: ancestor_at(data, region, level)  # noqa: E731
    findings = [(v.events[v.crossing], v.exit_via) for v in facts.verdicts.values() if v.severity]
    came_in: dict[tuple, datetime] = {}  # (unit, region) -> its first sell-in there (sell_in is in event order per unit)
    for s in facts.sell_in:
        came_in.setdefault((s["unit"], up(data.home(s["store"]))), s["ts"])
    counted = {  # name -> [(region, time)]
        "units_in": [(region, ts) for (_, region), ts in came_in.items()],
        "opened": [(up(o["region"]), o["ts"]) for o in facts.opened],
        "scanned": [(up(s["region"]), s["ts"]) for s in facts.sell_out],
        "diversions_in": [(up(location_after(data, e)), e["ts"]) for e, _ in findings],
        "diversions_out": [(up(data.home(via)), e["ts"]) for e, via in findings],
    }
    counts = {name: Counter((r, period_of(t, period)) for r, t in pairs if r is not None) for name, pairs in counted.items()}
    stores = Counter(up(p["region_id"]) for p in data.parties.values() if p["kind"] == "store")
    active = Counter((up(data.home(store)), when) for store, when in
                     {(s["store"], period_of(s["ts"], period)) for s in facts.sell_out if s["store"]})
    cells = set().union(*counts.values(), active)
    shown = sorted({r for r, _ in cells} | {r for r in stores if r is not None})
    rows = [{"region_id": r, "name": data.region_names[r], "period": p, **{name: counts[name][r, p] for name in counted},
             "stores": stores[r], "active_stores": active[r, p],
             "active_ratio": round(active[r, p] / stores[r], 4) if stores[r] else None}
            for p in sorted({p for _, p in cells}) for r in shown]
    pairs = Counter((up(data.home(via)), up(location_after(data, e))) for e, via in findings)
    matrix = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0][0] or "?", kv[0][1] or "?"))
    return {"level": level, "period": period, "rows": rows,
            "matrix": [{"from_region": a, "to_region": b, "units": n} for (a, b), n in matrix]}
