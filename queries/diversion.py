"""Cross-region diversion (窜货), exactly per DOMAIN.md §3 and docs/design.md.

`judge` evaluates the rules vectorised over a `Timeline`, whichever store built it;
`find_diversions` turns its verdicts into one `DiversionFinding` per diverted unit.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from graph.model import ACTIONS, KINDS
from graph.timeline import Timeline, encode
from queries.common import iso_column, judging_context, trusted_models

SHIP, RECEIVE, OPEN, SCAN = range(len(ACTIONS))
FACTORY, DISTRIBUTOR, STORE = (KINDS.index(k) for k in ("factory", "distributor", "store"))
SEVERITIES = ("confirmed", "suspected")
VIEWS = ("responsible", "region-pair", "case", "batch", "sku", "month")


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
        is_distributor = pc.equal(parties.column("kind"), "distributor").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(is_distributor)
        self.slot = np.full(parties.num_rows, -1, np.int64)
        self.slot[rows] = np.arange(len(rows))
        self.declared: dict[str, list[str]] = {}
        self.matrix = np.zeros((len(rows), len(region_ids)), bool)
        for slot, row in enumerate(rows):
            party = parties.slice(int(row), 1).to_pylist()[0]
            roots = _territory_list(party["territory"], party["region_id"])
            self.declared[party["party_id"]] = roots
            root_rows = encode(pa.array(roots, pa.string()), region_ids)
            self.matrix[slot] = np.isin(ancestors, root_rows[root_rows >= 0]).any(axis=1)

    def contains(self, distributor: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Per pair: region inside the distributor's territory (False when either is unknown)."""
        slot = np.where(distributor >= 0, self.slot[np.maximum(distributor, 0)], -1)
        ok = (slot >= 0) & (region >= 0)
        out = np.zeros(len(distributor), bool)
        out[ok] = self.matrix[slot[ok], region[ok]]
        return out


def _territory_list(territory: str | None, home: str | None) -> list[str]:
    roots = [t.strip() for t in territory.split("|") if t.strip()] if territory else []
    return roots or ([home] if home else [])


@dataclass
class Judgement:
    """Per-row facts of a timeline and the verdicts derived from them."""

    timeline: Timeline
    parties: pa.Table
    regions: pa.Table
    action: np.ndarray
    party: np.ndarray
    holder: np.ndarray
    location: np.ndarray  # where the event happened (region row), -1 unknown
    after: np.ndarray  # where the goods are after the event
    governing: np.ndarray  # row of the governing assignment, -1 before any
    distributor: np.ndarray  # party row of the assigned distributor, -1 if none
    findings: pd.DataFrame  # unit, row (crossing), severity, exit_via (party row)
    untracked: np.ndarray  # unit positions without any assignment

    def unit_assignment(self) -> np.ndarray:
        """Per unit: the party row of its latest assignment (-1 untracked)."""
        out = np.full(self.timeline.units.num_rows, -1, np.int64)
        has = self.distributor >= 0
        out[self.timeline.unit[has]] = self.distributor[has]  # rows are in event order: last wins
        return out


@dataclass
class EventCodes:
    """Per row of an events table: action rank and the rows of its party and counterparty
    (in `parties`) and region (in `regions`), -1 where absent or unknown."""

    events: pa.Table
    action: np.ndarray
    party: np.ndarray
    counterparty: np.ndarray
    region: np.ndarray

    @classmethod
    def of(cls, events: pa.Table, parties: pa.Table, regions: pa.Table) -> EventCodes:
        party_ids = parties.column("party_id").combine_chunks()
        return cls(events, encode(events.column("action"), pa.array(ACTIONS)),
                   encode(events.column("party_id"), party_ids), encode(events.column("counterparty_id"), party_ids),
                   encode(events.column("region_id"), regions.column("region_id").combine_chunks()))


def judge(timeline: Timeline, parties: pa.Table, regions: pa.Table, *, k: int = 3,
          codes: EventCodes | None = None) -> Judgement:
    """Apply the diversion rules to every unit of `timeline`.

    `parties` must hold every party the events name; `regions` the whole region tree;
    `codes`, when given, encodes `timeline.events` against exactly these two tables.
    Units sharing a case must be judged together for the k rule to see them all.
    """
    n = len(timeline)
    party_ids = parties.column("party_id").combine_chunks()
    region_ids = regions.column("region_id").combine_chunks()
    kind = encode(parties.column("kind"), pa.array(KINDS))
    home = encode(parties.column("region_id"), region_ids)
    if codes is not None:
        action, party, counterparty, own_region = (
            column[timeline.event] for column in (codes.action, codes.party, codes.counterparty, codes.region))
    else:
        action = timeline.encoded("action", pa.array(ACTIONS))
        party = timeline.encoded("party_id", party_ids)
        counterparty = timeline.encoded("counterparty_id", party_ids)
        own_region = timeline.encoded("region_id", region_ids)

    def of(values: np.ndarray, who: np.ndarray) -> np.ndarray:
        return np.where(who >= 0, values[np.maximum(who, 0)], -1)

    party_kind, cp_kind = of(kind, party), of(kind, counterparty)
    location = np.where(own_region >= 0, own_region, of(home, party))
    is_ship = action == SHIP
    shipped_to = is_ship & (counterparty >= 0)
    after = np.where(shipped_to & (of(home, counterparty) >= 0), of(home, counterparty), location)
    holder = np.where(shipped_to, counterparty, party)

    assigns = (is_ship & (party_kind == FACTORY) & (cp_kind == DISTRIBUTOR)) | (
        (action == RECEIVE) & (party_kind == DISTRIBUTOR) & (cp_kind == FACTORY))
    assigned_to = np.where(is_ship, counterparty, party)
    pos = np.arange(n)
    start = timeline.unit_starts()
    last = np.maximum.accumulate(np.where(assigns, pos, -1)) if n else pos
    governing = np.where(last >= start, last, -1)
    distributor = np.where(governing >= 0, assigned_to[np.maximum(governing, 0)], -1)

    territories = Territories(parties, regions)
    judged = governing >= 0
    inside_after = territories.contains(distributor, after)
    outside_after = judged & (after >= 0) & ~inside_after

    other_distributor = lambda who, who_kind: (who_kind == DISTRIBUTOR) & (who != distributor)  # noqa: E731
    ship_out = is_ship & ((cp_kind == STORE) | other_distributor(counterparty, cp_kind))
    held_out = np.isin(action, (RECEIVE, OPEN)) & ((party_kind == STORE) | other_distributor(party, party_kind))
    confirmed_evidence = outside_after & (ship_out | held_out) & ~assigns

    store_inside = judged & (of(kind, holder) == STORE) & (after >= 0) & inside_after
    handled = np.cumsum(store_inside)
    g = np.maximum(governing, 0)
    handled_before = judged & ((handled - (handled[g] - store_inside[g])) > 0)
    scan_outside = (action == SCAN) & judged & (location >= 0) & ~territories.contains(distributor, location)
    consumer_evidence = scan_outside & ~handled_before

    inside_rows = judged & (after >= 0) & inside_after
    last_inside = np.maximum.accumulate(np.where(inside_rows, pos, -1)) if n else pos

    units = timeline.unit
    confirmed = _first_per_unit(units, confirmed_evidence)
    consumer = _first_per_unit(units, consumer_evidence)
    is_confirmed = np.zeros(timeline.units.num_rows, bool)
    is_confirmed[confirmed.unit.to_numpy()] = True
    consumer = consumer[~is_confirmed[consumer.unit.to_numpy()]]
    confirmed["severity"] = "confirmed"
    consumer["severity"] = _k_rule(timeline, consumer, distributor, location, k)
    findings = pd.concat([confirmed, consumer], ignore_index=True)
    crossing = findings["row"].to_numpy()
    before = last_inside[np.maximum(crossing - 1, 0)] if len(crossing) else crossing
    same_lineage = (crossing > 0) & (before >= governing[crossing]) & (before >= 0)
    findings["exit_via"] = np.where(same_lineage, holder[np.maximum(before, 0)], distributor[crossing])
    tracked = np.zeros(timeline.units.num_rows, bool)
    tracked[units[assigns]] = True
    untracked = np.flatnonzero(~tracked)
    return Judgement(timeline, parties, regions, action, party, holder, location, after, governing,
                     distributor, findings.sort_values("unit", ignore_index=True), untracked)


def _first_per_unit(units: np.ndarray, mask: np.ndarray) -> pd.DataFrame:
    rows = np.flatnonzero(mask)
    hit = units[rows]  # timeline rows are grouped by unit, in unit order
    first = np.r_[True, hit[1:] != hit[:-1]] if len(hit) else np.zeros(0, bool)
    return pd.DataFrame({"unit": hit[first], "row": rows[first]})


def _k_rule(timeline: Timeline, suspects: pd.DataFrame, distributor: np.ndarray, location: np.ndarray,
            k: int) -> np.ndarray:
    """`confirmed` where at least k units of one case, assigned to one distributor, have
    suspected crossings in one region; else `suspected`."""
    if suspects.empty:
        return np.array([], dtype=object)
    case = timeline.units.column("case").to_numpy(zero_copy_only=False)[suspects["unit"].to_numpy()]
    rows = suspects["row"].to_numpy()
    groups = pd.DataFrame({"case": case, "dist": distributor[rows], "region": location[rows]})
    size = groups.groupby(["case", "dist", "region"], dropna=False)["dist"].transform("size").to_numpy()
    return np.where(pd.notna(case) & (size >= k), "confirmed", "suspected")


def findings_of(judgement: Judgement, *, units: np.ndarray | None = None) -> list[DiversionFinding]:
    """DiversionFinding objects (with custody paths) for the judged units, by unit code."""
    tl = judgement.timeline
    frame = judgement.findings
    if units is not None:
        frame = frame[frame["unit"].isin(units)]
    if frame.empty:
        return []
    unit, row = frame["unit"].to_numpy(), frame["row"].to_numpy()
    party_ids = judgement.parties.column("party_id")
    region_ids = judgement.regions.column("region_id")
    territories = Territories(judgement.parties, judgement.regions)
    unit_rows = pa.array(unit)
    event_rows = pa.array(tl.event[row])
    columns = {
        "code": pc.take(tl.units.column("code"), unit_rows).to_pylist(),
        "sku": pc.take(tl.units.column("sku"), unit_rows).to_pylist(),
        "batch": pc.take(tl.units.column("batch"), unit_rows).to_pylist(),
        "case": pc.take(tl.units.column("case"), unit_rows).to_pylist(),
        "responsible": _names(party_ids, judgement.distributor[row]),
        "severity": frame["severity"].tolist(),
        "crossing_event_id": pc.take(tl.events.column("event_id"), event_rows).to_pylist(),
        "crossing_ts": iso_column(pc.take(tl.events.column("ts"), event_rows)),
        "crossing_party": _names(party_ids, judgement.party[row]),
        "crossing_region": _names(region_ids, judgement.after[row]),
        "exit_via": _names(party_ids, frame["exit_via"].to_numpy()),
    }
    paths = unit_paths(judgement, unit, crossing=row)
    columns["territory"] = [territories.declared.get(r, []) for r in columns["responsible"]]
    columns["path"] = [paths[u] for u in unit.tolist()]
    return sorted(trusted_models(DiversionFinding, columns), key=lambda f: f.code)


def _names(names: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> list[str | None]:
    """names[row] per row, None where the row is -1."""
    return pc.take(names, pa.array(rows, pa.int64(), mask=rows < 0)).to_pylist()


def unit_paths(judgement: Judgement, units: np.ndarray, *, crossing: np.ndarray | None = None) -> dict[int, list[Hop]]:
    """Custody paths (all effective events as hops) of the given unit positions."""
    tl = judgement.timeline
    units = np.unique(np.asarray(units, np.int64))
    first = np.searchsorted(tl.unit, units, "left")  # timeline rows are grouped by unit, in unit order
    counts = np.searchsorted(tl.unit, units, "right") - first
    rows = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    crossed = np.zeros(len(tl), bool)
    if crossing is not None:
        crossed[crossing] = True
    party_ids, kinds = judgement.parties.column("party_id"), judgement.parties.column("kind")
    region_ids = judgement.regions.column("region_id")
    events = tl.events.take(pa.array(tl.event[rows]))
    party = judgement.party[rows]
    columns = {
        "party_id": _names(party_ids, party), "kind": _names(kinds, party),
        "region_id": _names(region_ids, judgement.location[rows]), "ts": iso_column(events.column("ts")),
        "event_id": events.column("event_id").to_pylist(), "action": events.column("action").to_pylist(),
        "crossed": crossed[rows].tolist(), "code": events.column("code").to_pylist(),
        "counterparty_id": events.column("counterparty_id").to_pylist(),
        "to_region_id": _names(region_ids, judgement.after[rows]),
    }
    hops = trusted_models(Hop, columns)
    bounds = np.r_[0, np.cumsum(counts)].tolist()
    return {u: hops[bounds[i]:bounds[i + 1]] for i, u in enumerate(units.tolist())}


def judge_store(store, *, k: int = 3) -> Iterator[Judgement]:  # noqa: ANN001 - any Store
    """Judgements covering every unit the store could find diverted, one per timeline batch
    (each batch holds whole cases). Batches over one events table share one encoding."""
    codes: EventCodes | None = None
    for timeline in store.timeline_batches():
        if codes is None or codes.events is not timeline.events:
            parties, regions = judging_context(store, timeline, all_events=True)
            codes = EventCodes.of(timeline.events, parties, regions)
        yield judge(timeline, parties, regions, k=k, codes=codes)


def find_diversions(store, *, k: int = 3, severity: str | None = None,  # noqa: ANN001 - any Store
                    since: datetime | None = None) -> list[DiversionFinding]:
    """One finding per diverted unit (sorted by code), filtered by severity and crossing
    time (>= since; a time without offset is UTC)."""
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
    cutoff = None if since is None else pd.Timestamp(since)
    if cutoff is not None:
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    found: list[DiversionFinding] = []
    for judgement in judge_store(store, k=k):
        frame = judgement.findings
        keep = np.ones(len(frame), bool)
        if severity:
            keep &= (frame["severity"] == severity).to_numpy()
        if cutoff is not None and len(frame):
            ts = pc.take(judgement.timeline.events.column("ts"), pa.array(judgement.timeline.event[frame["row"].to_numpy()]))
            keep &= pc.greater_equal(ts, pa.scalar(cutoff.to_pydatetime(), ts.type)).to_numpy(zero_copy_only=False)
        found += findings_of(judgement, units=frame["unit"].to_numpy()[keep])
    return sorted(found, key=lambda f: f.code)


def diversion_view(findings: list[DiversionFinding], by: str) -> list[dict]:
    """Findings grouped `by` one of VIEWS, with unit counts, most units first (repeat
    offenders on top for `responsible`)."""
    if by not in VIEWS:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(VIEWS)}")
    if not findings:
        return []
    frame = pd.DataFrame([{
        "responsible": f.responsible, "from_territory": "|".join(f.territory), "to_region": f.crossing_region,
        "case": f.case, "batch": f.batch, "sku": f.sku, "month": f.crossing_ts[:7], "severity": f.severity,
        "crossing_event_id": f.crossing_event_id, "crossing_ts": f.crossing_ts} for f in findings])
    keys = {"responsible": ["responsible"], "region-pair": ["from_territory", "to_region"], "case": ["case"],
            "batch": ["batch"], "sku": ["sku"], "month": ["month"]}[by]
    grouped = frame.groupby(keys, dropna=False).agg(
        units=("severity", "size"),
        confirmed=("severity", lambda s: int((s == "confirmed").sum())),
        suspected=("severity", lambda s: int((s == "suspected").sum())),
        crossings=("crossing_event_id", "nunique"),
        first_ts=("crossing_ts", "min"), last_ts=("crossing_ts", "max"),
    ).reset_index()
    grouped = grouped.sort_values(["units", "crossings", *keys], ascending=[False, False, *([True] * len(keys))])
    grouped.insert(0, "rank", range(1, len(grouped) + 1))
    return [{k: (None if isinstance(v, float) and np.isnan(v) else (int(v) if isinstance(v, np.integer) else v))
             for k, v in row.items()} for row in grouped.to_dict("records")]
