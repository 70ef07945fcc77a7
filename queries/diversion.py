"""Cross-region diversion (窜货), exactly per DOMAIN.md §3 and docs/design.md.

`judge` evaluates the rules vectorised over a `Timeline`, whichever store built it;
`find_diversions` turns its verdicts into one `DiversionFinding` per diverted unit.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from graph.model import ACTIONS, KINDS
from loaders.validate import TS_TYPE
from graph.timeline import Lookup, Timeline, encode, ranges
from queries.common import R, iso, parallel_map, python_columns, take_rows, trusted_models, utc

SHIP, RECEIVE, OPEN, SCAN = range(len(ACTIONS))
FACTORY, DISTRIBUTOR, STORE = (KINDS.index(k) for k in ("factory", "distributor", "store"))
SEVERITIES = ("confirmed", "suspected")
ACTION_ROWS = Lookup(pa.array(ACTIONS))
VIEW_KEYS = {"responsible": ("responsible",), "region-pair": ("from_territory", "to_region"), "case": ("case",),
             "batch": ("batch",), "sku": ("sku",), "month": ("month",)}  # the key columns of each grouped view
VIEWS = tuple(VIEW_KEYS)
CSV_COLUMNS = ("code", "severity", "responsible", "territory", "exit_via", "crossing_event_id", "crossing_ts",
               "crossing_party", "crossing_region", "sku", "batch", "case", "path", "path_events")  # of `finding_csv_row`


class Hop(BaseModel):
    """One event of a unit's custody path (events on the unit or a code it is packed in)."""

    party_id: str | None
    kind: str | None
    region_id: str | None  # where the event happened
    ts: str
    event_id: str
    action: str
    crossed: bool  # this event took the goods out of the territory
    code: str  # the code the event was recorded on
    counterparty_id: str | None = None
    to_region_id: str | None = None  # where the goods were after the event


class DiversionFinding(BaseModel):
    code: str
    sku: str | None
    batch: str | None
    responsible: str
    territory: list[str]
    severity: str
    crossing_event_id: str
    crossing_ts: str
    crossing_party: str | None
    crossing_region: str | None
    exit_via: str | None
    case: str | None
    path: list[Hop]


class UntrackedUnit(BaseModel):
    """A unit no assignment governs (no factory -> distributor hand-over on it or on a code
    it is packed in; DOMAIN.md §3): reported, never judged."""

    code: str
    sku: str | None
    batch: str | None
    events: int  # its effective events (on it and on every code it is packed in)
    last_holder: str | None  # who held it after its last event
    last_region: str | None  # where it was after its last event
    first_ts: str | None
    last_ts: str | None


class DiversionSummary(BaseModel):
    """How the units of a store were judged (DOMAIN.md §3)."""

    units: int  # unit codes in the store
    judged: int  # units with an assignment: judged by the rules
    diverted: int  # judged units with a finding
    confirmed: int
    suspected: int
    untracked: int  # units without an assignment: reported, never judged

    @classmethod
    def count(cls, *, units: int, untracked: int, confirmed: int, suspected: int) -> DiversionSummary:
        """The summary of a store of `units` unit codes, `untracked` of them untracked."""
        return cls(units=units, judged=units - untracked, diverted=confirmed + suspected, confirmed=confirmed,
                   suspected=suspected, untracked=untracked)


class Territories:
    """Which regions each distributor may sell into: its territory regions and their
    descendants (fallback: its registered region and descendants)."""

    def __init__(self, parties: pa.Table, regions: pa.Table):
        region_ids = regions.column("region_id").combine_chunks()
        # ancestors[r] = r, its parent, grandparent, ... (-1 past the root); a cycle-free tree
        parent = encode(regions.column("parent_id"), region_ids)
        chain = [np.arange(len(region_ids))]
        while len(chain) <= len(region_ids) and (chain[-1] >= 0).any():
            chain.append(np.where(chain[-1] >= 0, parent[np.maximum(chain[-1], 0)], -1))
        ancestors = np.stack(chain, axis=1)
        rows = np.flatnonzero(pc.equal(parties.column("kind"), "distributor").to_numpy(zero_copy_only=False))
        # slot[party row] = its row in `matrix`; the last row (no distributor) and the last
        # column (no region) are all False, so -1 needs no masking (numpy wraps it to the last)
        self.slot = np.full(parties.num_rows + 1, len(rows), np.int64)
        self.slot[rows] = np.arange(len(rows))
        distributors = parties.take(pa.array(rows, pa.int64())).select(["party_id", "territory", "region_id"])
        self.declared: dict[str, list[str]] = {
            party: _territory_list(territory, home) for party, territory, home in
            zip(*(distributors.column(name).to_pylist() for name in distributors.column_names))}
        owner = np.repeat(np.arange(len(rows)), [len(roots) for roots in self.declared.values()])
        roots = [root for roots in self.declared.values() for root in roots]
        member = np.zeros((len(rows) + 1, len(region_ids) + 1), bool)
        root_rows = encode(pa.array(roots, pa.string()), region_ids)
        known = root_rows >= 0
        member[owner[known], root_rows[known]] = True
        self.matrix = np.zeros_like(member)
        self.matrix[:, :-1] = member[:, ancestors].any(axis=2)  # ancestors' -1 hits the False column

    def contains(self, distributor: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Per pair: region inside the distributor's territory (False when either is unknown).
        One flat lookup: region -1 lands on a last column too (the row before's, or for row 0
        the matrix's last cell)."""
        return self.matrix.ravel()[self.slot[distributor] * self.matrix.shape[1] + region]


def _territory_list(territory: str | None, home: str | None) -> list[str]:
    roots = [t.strip() for t in territory.split("|") if t.strip()] if territory else []
    return roots or ([home] if home else [])


class Context:
    """What the judge knows besides timelines: the parties and the region tree (judgements
    name them by row of these tables), and what follows from them alone: party kinds and
    home regions, territories, id lookups. One context serves any number of judgements;
    `judging_context` keeps one per embedded store version."""

    def __init__(self, parties: pa.Table, regions: pa.Table):
        self.parties, self.regions = parties, regions
        self.party_ids = parties.column("party_id").combine_chunks()
        self.region_ids = regions.column("region_id").combine_chunks()
        self.party_rows, self.region_rows = Lookup(self.party_ids), Lookup(self.region_ids)
        # by party row; one -1 after the last row, so that the row -1 (no party) reads -1
        self.kind = np.append(encode(parties.column("kind"), pa.array(KINDS)), -1)
        self.home = np.append(self.region_rows(parties.column("region_id")), -1)
        self.territories = Territories(parties, regions)


def judging_context(store, timeline: Timeline | None = None, *, all_events: bool = False) -> Context:  # noqa: ANN001
    """The context to judge `timeline` in. A store that keeps values per version (`cached`,
    the embedded store) builds one of every party once; a timeline that carries its parties
    and regions (Neo4j) brings its own; otherwise the parties the timeline's events name
    (or every row of `timeline.events`; every party without a timeline) and the region
    tree are read, each time."""
    cached = getattr(store, "cached", None)
    if cached is not None:
        return cached("queries.diversion.Context", lambda: Context(store.parties(), store.regions()))
    if timeline is None:
        return Context(store.parties(), store.regions())
    if timeline.parties is not None and timeline.regions is not None:
        return Context(timeline.parties, timeline.regions)
    events = timeline.events
    if all_events:
        rows = None
    elif len(timeline.event) < events.num_rows // 64:  # a few units: sort their events
        rows = pa.array(np.unique(timeline.event))
    else:  # most of the store: a mask is linear where np.unique is not
        seen = np.zeros(events.num_rows, bool)
        seen[timeline.event] = True
        rows = pa.array(np.flatnonzero(seen))
    named = [events.column(name) if rows is None else pc.take(events.column(name), rows)
             for name in ("party_id", "counterparty_id")]
    ids = pc.unique(pa.concat_arrays([pc.drop_null(column).combine_chunks() for column in named]))
    return Context(store.stored("parties", ids), store.regions())


@dataclass
class Verdicts:
    """The diverted units of a judgement, ascending: the crossing (timeline row), severity
    ("confirmed" or "suspected") and exit_via (party row)."""

    unit: np.ndarray
    row: np.ndarray
    severity: np.ndarray
    exit_via: np.ndarray

    def __len__(self) -> int:
        return len(self.unit)

    def __getitem__(self, keep: np.ndarray) -> Verdicts:
        """The verdicts at `keep` (a mask or positions)."""
        return Verdicts(self.unit[keep], self.row[keep], self.severity[keep], self.exit_via[keep])


@dataclass
class Judgement:
    """Per-row facts of a timeline and the verdicts derived from them."""

    timeline: Timeline
    context: Context
    action: np.ndarray
    party: np.ndarray
    holder: np.ndarray
    holds_store: np.ndarray  # the holder is a store
    location: np.ndarray  # where the event happened (region row), -1 unknown
    after: np.ndarray  # where the goods are after the event
    governing: np.ndarray  # row of the governing assignment, -1 before any
    distributor: np.ndarray  # party row of the assigned distributor, -1 if none
    verdicts: Verdicts
    untracked: np.ndarray  # unit positions without any assignment

    def unit_assignment(self) -> np.ndarray:
        """Per unit: the party row of its latest assignment (-1 untracked)."""
        out = np.full(self.timeline.units.num_rows, -1, np.int64)
        has = self.distributor >= 0
        out[self.timeline.unit[has]] = self.distributor[has]  # rows are in event order: last wins
        return out


# What an event can prove about goods outside the territory: nothing; always out of the
# assigned distributor's hands (a ship to a store, a store's receive or open); or out of
# them when the other distributor involved is not the assigned one.
NO_EVIDENCE, STORE_EVIDENCE, DISTRIBUTOR_EVIDENCE = 0, 1, 2


@dataclass
class EventFacts:
    """What single events say, whichever unit they apply to: one value per row of `events`
    (or per timeline row, see `of_timeline`); parties and regions are rows of the context's
    tables, -1 where absent or unknown."""

    events: pa.Table
    action: np.ndarray
    party: np.ndarray
    holder: np.ndarray  # who holds the goods after the event
    location: np.ndarray  # where the event happened
    after: np.ndarray  # where the goods are after the event
    assigns: np.ndarray  # a factory -> distributor hand-over (an assignment)
    other: np.ndarray  # who receives (ship), else the party: the assignee of an assignment
    evidence: np.ndarray  # NO_, STORE_ or DISTRIBUTOR_EVIDENCE
    holds_store: np.ndarray  # the holder after the event is a store
    by_store: np.ndarray  # the performing party is a store

    @classmethod
    def of(cls, events: pa.Table, context: Context) -> EventFacts:
        """Facts of every row of `events`."""
        return cls.of_rows(events, events, context)

    @classmethod
    def of_timeline(cls, timeline: Timeline, context: Context) -> EventFacts:
        """Facts per timeline row (cheaper than `of` when the timeline covers few events)."""
        rows = timeline.events.select(["action", "party_id", "counterparty_id", "region_id"]).take(pa.array(timeline.event))
        return cls.of_rows(timeline.events, rows, context)

    @classmethod
    def of_rows(cls, events: pa.Table, rows: pa.Table, context: Context) -> EventFacts:
        """Facts of `rows` (action, party_id, counterparty_id and region_id of events)."""
        action, party = ACTION_ROWS(rows.column("action")), context.party_rows(rows.column("party_id"))
        counterparty, own_region = context.party_rows(rows.column("counterparty_id")), context.region_rows(rows.column("region_id"))
        kind, home = context.kind, context.home  # row -1 (no party) reads -1
        party_kind, cp_kind = kind[party], kind[counterparty]
        location = np.where(own_region >= 0, own_region, home[party])
        is_ship = action == SHIP
        shipped_to = is_ship & (counterparty >= 0)
        cp_home = home[counterparty]
        holder = np.where(shipped_to, counterparty, party)
        performed = (action == RECEIVE) | (action == OPEN) | (action == SCAN)  # a store's scan: a point-of-sale one
        return cls(
            events, action=action, party=party, holder=holder, location=location,
            after=np.where(shipped_to & (cp_home >= 0), cp_home, location),
            assigns=(is_ship & (party_kind == FACTORY) & (cp_kind == DISTRIBUTOR)) | (
                (action == RECEIVE) & (party_kind == DISTRIBUTOR) & (cp_kind == FACTORY)),
            other=np.where(is_ship, counterparty, party),
            evidence=np.where((is_ship & (cp_kind == STORE)) | (performed & (party_kind == STORE)), STORE_EVIDENCE,
                              np.where((is_ship & (cp_kind == DISTRIBUTOR)) | (performed & (party_kind == DISTRIBUTOR)),
                                       DISTRIBUTOR_EVIDENCE, NO_EVIDENCE)).astype(np.int8),
            holds_store=kind[holder] == STORE, by_store=party_kind == STORE)


def judge(timeline: Timeline, context: Context, *, k: int = 3, facts: EventFacts | None = None) -> Judgement:
    """Apply the diversion rules to every unit of `timeline`.

    `context` must hold every party the events name and the whole region tree; `facts`,
    when given, are `EventFacts.of(timeline.events, context)` (shared by the batches of
    one events table). Units sharing a case must be judged together for the k rule to see
    them all.
    """
    n = len(timeline)
    if facts is None:
        facts, event = EventFacts.of_timeline(timeline, context), np.arange(n)
    else:
        event = timeline.event

    order = _assignments_first(timeline, facts.assigns[event])
    if order is not None:
        timeline = Timeline(timeline.unit[order], timeline.event[order], timeline.units, timeline.events,
                            timeline.parties, timeline.regions)
        event = event[order]

    def per_row(values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Event facts per timeline row (of `rows` only, when given)."""
        return values[event if rows is None else event[rows]]

    # per timeline row
    action, party, holder, location, after, assigns = (
        per_row(values) for values in (facts.action, facts.party, facts.holder, facts.location, facts.after, facts.assigns))
    governing = timeline.latest(assigns)
    judged = governing >= 0
    distributor = np.where(judged, per_row(facts.other, np.maximum(governing, 0)), -1)

    territories = context.territories
    inside_after = judged & (after >= 0) & territories.contains(distributor, after)
    outside_after = judged & (after >= 0) & ~inside_after
    evidence = per_row(facts.evidence)
    out_of_hands = evidence == STORE_EVIDENCE
    maybe = np.flatnonzero(outside_after & (evidence == DISTRIBUTOR_EVIDENCE))
    out_of_hands[maybe] = per_row(facts.other, maybe) != distributor[maybe]
    confirmed_evidence = outside_after & out_of_hands & ~assigns

    # a store inside handled the goods: it holds them there after the event, or it acted
    # there (a store's ship to a consumer has a consumer as the holder)
    holds_store = per_row(facts.holds_store)
    store_inside = inside_after & holds_store
    by_store = np.flatnonzero(judged & per_row(facts.by_store) & (location >= 0))
    store_inside[by_store] |= territories.contains(distributor[by_store], location[by_store])
    scans = np.flatnonzero((action == SCAN) & judged & (location >= 0) & (evidence == NO_EVIDENCE))  # a consumer's
    scans = scans[timeline.latest(store_inside, scans) < governing[scans]]  # no store inside handled it before
    consumer_evidence = np.zeros(n, bool)
    consumer_evidence[scans] = ~territories.contains(distributor[scans], location[scans])

    units = timeline.unit
    confirmed_row = timeline.first_per_unit(np.flatnonzero(confirmed_evidence))
    consumer_rows = np.flatnonzero(consumer_evidence)
    consumer_row = timeline.first_per_unit(consumer_rows)
    confirmed_unit, consumer_unit = units[confirmed_row].astype(np.int64), units[consumer_row].astype(np.int64)
    is_confirmed = np.zeros(timeline.units.num_rows, bool)
    is_confirmed[confirmed_unit] = True
    alone = ~is_confirmed[consumer_unit]
    consumer_unit, consumer_row = consumer_unit[alone], consumer_row[alone]
    by_k = np.isin(consumer_unit, _k_rule(timeline, consumer_rows, distributor, location, k))
    unit = np.concatenate((confirmed_unit, consumer_unit))  # not np.r_: 15 µs a call, per trace too
    crossing = np.concatenate((confirmed_row, consumer_row))
    severity = np.where(np.concatenate((np.ones(len(confirmed_unit), bool), by_k)), "confirmed", "suspected").astype(object)
    order = np.argsort(unit, kind="stable")
    unit, crossing, severity = unit[order], crossing[order], severity[order]
    before = timeline.latest(inside_after, np.maximum(crossing - 1, 0))
    same_lineage = (crossing > 0) & (before >= governing[crossing]) & (before >= 0)
    exit_via = np.where(same_lineage, holder[np.maximum(before, 0)], distributor[crossing])
    tracked = np.zeros(timeline.units.num_rows, bool)
    tracked[units[assigns]] = True
    return Judgement(timeline, context, action, party, holder, holds_store, location, after, governing, distributor,
                     Verdicts(unit, crossing, severity, exit_via), np.flatnonzero(~tracked))


def _assignments_first(timeline: Timeline, assigns: np.ndarray) -> np.ndarray | None:
    """The order of timeline rows that puts a unit's assignment events (`assigns`, per row)
    first among its events at the same time, or None when they are already: the goods
    are assigned before anyone hands them on at that time (a distributor's receive from
    the factory and its ship onwards, both stamped with one date)."""
    unit = timeline.unit
    late = np.flatnonzero(assigns[1:] & ~assigns[:-1] & (unit[1:] == unit[:-1])) + 1  # after another event of the unit
    if not len(late):
        return None
    ts = pc.take(timeline.events.column("ts"), pa.array(timeline.event[np.concatenate((late - 1, late))]))
    ts = ts.cast(pa.int64()).to_numpy(zero_copy_only=False)
    if not (ts[: len(late)] == ts[len(late):]).any():
        return None
    ts = pc.take(timeline.events.column("ts"), pa.array(timeline.event)).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.lexsort((~assigns, ts, unit))  # stable: the event order otherwise


def _k_rule(timeline: Timeline, rows: np.ndarray, distributor: np.ndarray, region: np.ndarray, k: int) -> np.ndarray:
    """The units confirmed by the k rule: of the consumer-evidence rows `rows` (every
    outside scan with no store inside having handled the unit before, the first of a unit
    or a later one, its finding suspected or confirmed by other evidence), those of units
    of a case of which at least k units were so scanned in one region under one
    distributor (`distributor`, `region`: per timeline row)."""
    if not len(rows):
        return np.zeros(0, np.int64)
    unit = timeline.unit[rows].astype(np.int64)
    cases = pc.take(timeline.units.column("case"), pa.array(unit)).combine_chunks()
    case = pc.fill_null(pc.dictionary_encode(cases).indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    groups = np.unique(np.stack([case, distributor[rows], region[rows]]), axis=1, return_inverse=True)[1].ravel()
    pairs = np.unique(np.stack([groups, unit]), axis=1)  # each unit once per group
    units_in_group = np.bincount(pairs[0], minlength=int(groups.max()) + 1)
    return np.unique(unit[(case >= 0) & (units_in_group[groups] >= k)])


TEXT = pa.string()
FINDING_SCHEMA = pa.schema([  # DiversionFinding's fields in order, but `path`
    ("code", TEXT), ("sku", TEXT), ("batch", TEXT), ("responsible", TEXT), ("territory", pa.list_(TEXT)),
    ("severity", TEXT), ("crossing_event_id", TEXT), ("crossing_ts", TS_TYPE), ("crossing_party", TEXT),
    ("crossing_region", TEXT), ("exit_via", TEXT), ("case", TEXT)])
HOP_SCHEMA = pa.schema([  # Hop's fields in order
    ("party_id", TEXT), ("kind", TEXT), ("region_id", TEXT), ("ts", TS_TYPE), ("event_id", TEXT), ("action", TEXT),
    ("crossed", pa.bool_()), ("code", TEXT), ("counterparty_id", TEXT), ("to_region_id", TEXT)])
UNTRACKED_SCHEMA = pa.schema([  # UntrackedUnit's fields in order
    ("code", TEXT), ("sku", TEXT), ("batch", TEXT), ("events", pa.int64()), ("last_holder", TEXT),
    ("last_region", TEXT), ("first_ts", TS_TYPE), ("last_ts", TS_TYPE)])


@dataclass
class Findings:
    """Diversion findings in columns: `table` has one row per diverted unit (FINDING_SCHEMA),
    `hops` their custody paths one after another (HOP_SCHEMA), finding i's in rows
    starts[i]:starts[i+1]. `models()` makes DiversionFinding objects of them."""

    table: pa.Table
    hops: pa.Table
    starts: np.ndarray

    def __len__(self) -> int:
        return self.table.num_rows

    @classmethod
    def of(cls, judgement: Judgement, *, units: np.ndarray | None = None) -> Findings:
        """The findings of the judged units (all, or those at the given unit positions)."""
        tl = judgement.timeline
        verdicts = judgement.verdicts
        if units is not None:
            verdicts = verdicts[np.isin(verdicts.unit, units)]
        unit, row = verdicts.unit.astype(np.int64), verdicts.row.astype(np.int64)
        party_ids, region_ids = judgement.context.party_ids, judgement.context.region_ids
        unit_rows, event_rows = pa.array(unit), pa.array(tl.event[row])
        responsible = take_rows(party_ids, judgement.distributor[row])
        declared = judgement.context.territories.declared
        table = pa.table({
            "code": pc.take(tl.units.column("code"), unit_rows),
            "sku": pc.take(tl.units.column("sku"), unit_rows),
            "batch": pc.take(tl.units.column("batch"), unit_rows),
            "responsible": responsible,
            "territory": pa.array([declared.get(r, []) for r in responsible.to_pylist()], pa.list_(TEXT)),
            "severity": pa.array(verdicts.severity, TEXT),
            "crossing_event_id": pc.take(tl.events.column("event_id"), event_rows),
            "crossing_ts": pc.take(tl.events.column("ts"), event_rows),
            "crossing_party": take_rows(party_ids, judgement.party[row]),
            "crossing_region": take_rows(region_ids, judgement.after[row]),
            "exit_via": take_rows(party_ids, verdicts.exit_via),
            "case": pc.take(tl.units.column("case"), unit_rows),
        }, schema=FINDING_SCHEMA)
        hops, counts = path_hops(judgement, unit, crossing=row)
        return cls(table, hops, _bounds(counts))

    @classmethod
    def concat(cls, parts: list[Findings]) -> Findings:
        """All findings of `parts`, sorted by code."""
        if not parts:
            return cls(FINDING_SCHEMA.empty_table(), HOP_SCHEMA.empty_table(), np.zeros(1, np.int64))
        counts = np.concatenate([np.diff(part.starts) for part in parts])
        whole = cls(pa.concat_tables([part.table for part in parts]), pa.concat_tables([part.hops for part in parts]),
                    _bounds(counts))
        return whole.take(pc.sort_indices(whole.table, [("code", "ascending")]).to_numpy())

    def take(self, rows: np.ndarray) -> Findings:
        """The findings at `rows`, in that order, with their paths."""
        counts = np.diff(self.starts)[rows]
        hop_rows = ranges(self.starts[:-1][rows], counts)
        return Findings(self.table.take(pa.array(rows, pa.int64())), self.hops.take(pa.array(hop_rows)),
                        _bounds(counts))

    def models(self) -> list[DiversionFinding]:
        hops = trusted_models(Hop, python_columns(self.hops))
        columns = python_columns(self.table)
        bounds = self.starts.tolist()
        columns["path"] = [hops[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return trusted_models(DiversionFinding, columns)


def _bounds(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive groups of `counts` rows starts, and the end."""
    return np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))


def path_hops(judgement: Judgement, units: np.ndarray, *, crossing: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:
    """Custody paths (all effective events as hops, HOP_SCHEMA) of the given unit positions
    in ascending order, one after another, and the number of hops of each."""
    tl = judgement.timeline
    units = np.unique(np.asarray(units, np.int64))
    first = np.searchsorted(tl.unit, units, "left")  # timeline rows are grouped by unit, in unit order
    counts = np.searchsorted(tl.unit, units, "right") - first
    rows = ranges(first, counts)
    crossed = np.isin(rows, crossing) if crossing is not None else np.zeros(len(rows), bool)
    party_ids, kinds = judgement.context.party_ids, judgement.context.parties.column("kind")
    region_ids = judgement.context.region_ids
    events = tl.events.select(["ts", "event_id", "action", "code", "counterparty_id"]).take(pa.array(tl.event[rows]))
    party = judgement.party[rows]
    hops = pa.table({
        "party_id": take_rows(party_ids, party), "kind": take_rows(kinds, party),
        "region_id": take_rows(region_ids, judgement.location[rows]), "ts": events.column("ts"),
        "event_id": events.column("event_id"), "action": events.column("action"), "crossed": crossed,
        "code": events.column("code"), "counterparty_id": events.column("counterparty_id"),
        "to_region_id": take_rows(region_ids, judgement.after[rows]),
    }, schema=HOP_SCHEMA)
    return hops, counts


def unit_paths(judgement: Judgement, units: np.ndarray, *, crossing: np.ndarray | None = None) -> dict[int, list[Hop]]:
    """Custody paths as Hop objects, by unit position."""
    hops, counts = path_hops(judgement, units, crossing=crossing)
    models = trusted_models(Hop, python_columns(hops))
    bounds = _bounds(counts).tolist()
    return {u: models[bounds[i]:bounds[i + 1]] for i, u in enumerate(np.unique(np.asarray(units, np.int64)).tolist())}


def batches_with_facts(store, context: Callable[[Timeline], Context]  # noqa: ANN001 - any Store
                       ) -> Iterator[tuple[Timeline, Context, EventFacts]]:
    """The store's timeline batches (each holds whole cases), each with its judging
    `context(timeline)` and the EventFacts of its events table, derived once per events
    table."""
    facts: EventFacts | None = None
    for timeline in store.timeline_batches():
        if facts is None or facts.events is not timeline.events:
            judging = context(timeline)
            facts = EventFacts.of(timeline.events, judging)
        yield timeline, judging, facts


def judged_batches(store, then: Callable[[Judgement], R], *, k: int = 3,  # noqa: ANN001 - any Store
                   workers: int = 2) -> Iterator[R]:
    """`then` of the judgements covering every unit the store could find diverted, one per
    timeline batch; judged on `workers` threads while the next batch is built."""
    batches = batches_with_facts(store, lambda timeline: judging_context(store, timeline, all_events=True))
    return parallel_map(lambda batch: then(judge(*batch[:2], k=k, facts=batch[2])), batches, workers=workers)


@dataclass
class StoreVerdicts:
    """What judging a whole store says: the findings passing the filters, the untracked
    units (UNTRACKED_SCHEMA, by code), and how many findings of each severity the store
    holds before the filters."""

    findings: Findings
    untracked: pa.Table
    confirmed: int
    suspected: int

    @classmethod
    def concat(cls, parts: list[StoreVerdicts]) -> StoreVerdicts:
        """The verdicts of all `parts` (judgements of disjoint units)."""
        untracked = pa.concat_tables([UNTRACKED_SCHEMA.empty_table(), *(part.untracked for part in parts)])
        return cls(Findings.concat([part.findings for part in parts]),
                   untracked.take(pc.sort_indices(untracked, [("code", "ascending")])),
                   sum(part.confirmed for part in parts), sum(part.suspected for part in parts))

    def untracked_units(self) -> list[UntrackedUnit]:
        return trusted_models(UntrackedUnit, python_columns(self.untracked))

    def summary(self, units: int) -> DiversionSummary:
        """The counts, for a store holding `units` unit codes."""
        return DiversionSummary.count(units=units, untracked=self.untracked.num_rows, confirmed=self.confirmed,
                                      suspected=self.suspected)


def untracked_rows(judgement: Judgement) -> pa.Table:
    """The judgement's untracked units (UNTRACKED_SCHEMA, in unit order), each with its
    number of effective events, and its holder, location and time after the last one."""
    tl = judgement.timeline
    units = judgement.untracked
    first = np.searchsorted(tl.unit, units, "left")  # timeline rows are grouped by unit, in unit order
    counts = np.searchsorted(tl.unit, units, "right") - first
    seen = counts > 0
    first, last = np.where(seen, first, -1), np.where(seen, first + counts - 1, -1)

    def at(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.full(len(rows), -1, np.int64)
        out[rows >= 0] = values[rows[rows >= 0]]
        return out

    ts, unit_rows = tl.events.column("ts"), pa.array(units, pa.int64())
    return pa.table({
        "code": pc.take(tl.units.column("code"), unit_rows),
        "sku": pc.take(tl.units.column("sku"), unit_rows),
        "batch": pc.take(tl.units.column("batch"), unit_rows),
        "events": pa.array(counts, pa.int64()),
        "last_holder": take_rows(judgement.context.party_ids, at(judgement.holder, last)),
        "last_region": take_rows(judgement.context.region_ids, at(judgement.after, last)),
        "first_ts": take_rows(ts, at(tl.event, first)),
        "last_ts": take_rows(ts, at(tl.event, last)),
    }, schema=UNTRACKED_SCHEMA)


def judge_store(store, *, k: int = 3, severity: str | None = None,  # noqa: ANN001 - any Store
                since: datetime | None = None) -> StoreVerdicts:
    """Judge every unit the store could find diverted or untracked: one finding per
    diverted unit (sorted by code) filtered by severity and crossing time (>= since; a time
    without offset is UTC), and every untracked unit."""
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
    cutoff = utc(since)

    def judged(judgement: Judgement) -> StoreVerdicts:
        verdicts = judgement.verdicts
        keep = np.ones(len(verdicts), bool)
        if severity:
            keep &= verdicts.severity == severity
        if cutoff is not None and len(verdicts):
            ts = pc.take(judgement.timeline.events.column("ts"), pa.array(judgement.timeline.event[verdicts.row]))
            keep &= pc.greater_equal(ts, pa.scalar(cutoff.to_pydatetime(), ts.type)).to_numpy(zero_copy_only=False)
        confirmed = int((verdicts.severity == "confirmed").sum())
        return StoreVerdicts(Findings.of(judgement, units=verdicts.unit[keep]), untracked_rows(judgement),
                             confirmed, len(verdicts) - confirmed)

    return StoreVerdicts.concat(list(judged_batches(store, judged, k=k)))


def detect_diversions(store, *, k: int = 3, severity: str | None = None,  # noqa: ANN001 - any Store
                      since: datetime | None = None) -> Findings:
    """One finding per diverted unit (sorted by code), in columns, filtered by severity and
    crossing time (>= since; a time without offset is UTC)."""
    return judge_store(store, k=k, severity=severity, since=since).findings


def find_diversions(store, *, k: int = 3, severity: str | None = None,  # noqa: ANN001 - any Store
                    since: datetime | None = None) -> list[DiversionFinding]:
    """`detect_diversions` as DiversionFinding objects."""
    return detect_diversions(store, k=k, severity=severity, since=since).models()


def view_columns(by: str) -> list[str]:
    """The columns of a `diversion_view` row, in order."""
    return ["rank", *VIEW_KEYS[by], "units", "confirmed", "suspected", "crossings", "first_ts", "last_ts"]


def finding_csv_row(finding: DiversionFinding) -> dict[str, str | None]:
    """A finding as one flat CSV row (CSV_COLUMNS): the territory `|`-separated, the path as
    its holders `F > B > b*` (`*`: the holder the crossing reached) and as its events with
    their times and regions, `;`-separated (`path_events`: `TS ACTION PARTY[>RECEIVER] @REGION`,
    the region the goods were in after the event, and `CROSSED` on the crossing)."""
    holders: list[str] = []
    for hop in finding.path:
        for who in (hop.party_id, hop.counterparty_id if hop.action == "ship" else None):
            if who and (not holders or holders[-1].rstrip("*") != who):
                holders.append(who)
        if hop.crossed and holders:
            holders[-1] = holders[-1].rstrip("*") + "*"
    row = {**finding.model_dump(exclude={"path"}), "territory": "|".join(finding.territory), "path": " > ".join(holders),
           "path_events": "; ".join(_hop_text(hop) for hop in finding.path)}
    return {column: row[column] for column in CSV_COLUMNS}


def _hop_text(hop: Hop) -> str:
    """`TS ACTION PARTY[>RECEIVER] @REGION [CROSSED]`: a hop of a path in a CSV cell."""
    who = f"{hop.party_id}>{hop.counterparty_id}" if hop.action == "ship" and hop.counterparty_id else hop.party_id
    where = f"@{hop.to_region_id}" if hop.to_region_id else None
    return " ".join(filter(None, (hop.ts, hop.action, who, where, "CROSSED" if hop.crossed else None)))


def diversion_view(findings: list[DiversionFinding], by: str) -> list[dict]:
    """Findings grouped `by` one of VIEWS (rows of `view_columns(by)`), with unit counts,
    most units first (repeat offenders on top for `responsible`); `month` in time order."""
    if by not in VIEWS:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(VIEWS)}")
    if not findings:
        return []
    frame = pd.DataFrame([{
        "responsible": f.responsible, "from_territory": "|".join(f.territory), "to_region": f.crossing_region,
        "case": f.case, "batch": f.batch, "sku": f.sku, "month": f.crossing_ts[:7], "severity": f.severity,
        "crossing_event_id": f.crossing_event_id, "crossing_ts": f.crossing_ts} for f in findings])
    frame["crossing_ts"] = pd.to_datetime(frame["crossing_ts"], format="ISO8601")  # by instant: as text, ":00.5Z" < ":00Z"
    keys = list(VIEW_KEYS[by])
    grouped = frame.groupby(keys, dropna=False).agg(
        units=("severity", "size"),
        confirmed=("severity", lambda s: int((s == "confirmed").sum())),
        suspected=("severity", lambda s: int((s == "suspected").sum())),
        crossings=("crossing_event_id", "nunique"),
        first_ts=("crossing_ts", "min"), last_ts=("crossing_ts", "max"),
    ).reset_index()
    if by == "month":  # over time: in time order
        grouped = grouped.sort_values(keys)
    else:
        grouped = grouped.sort_values(["units", "crossings", *keys], ascending=[False, False, *([True] * len(keys))])
    grouped.insert(0, "rank", range(1, len(grouped) + 1))
    grouped[["first_ts", "last_ts"]] = grouped[["first_ts", "last_ts"]].map(iso)
    return [{k: (None if isinstance(v, float) and np.isnan(v) else (int(v) if isinstance(v, np.integer) else v))
             for k, v in row.items()} for row in grouped.to_dict("records")]
