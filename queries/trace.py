"""Trace (物流追溯): where a code went, and the aggregated flow of a batch or SKU."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from graph.errors import NotFound
from graph.model import LEVEL_RANK, LEVELS
from graph.timeline import EVENT_COLUMNS
from queries.common import python_columns
from queries.diversion import (RECEIVE, SHIP, DiversionFinding, EventFacts, Findings, Hop, Judgement, judge, judging_context,
                               unit_paths)


class ChildrenSummary(BaseModel):
    """What a case or pallet holds, and how much of it was diverted."""

    by_level: dict[str, int]
    units: int
    diverted_units: int
    confirmed: int
    suspected: int
    untracked_units: int


class TraceResult(BaseModel):
    code: str
    level: str
    sku: str | None
    batch: str | None
    ancestors: list[str]  # parent first
    assigned_distributor: str | None
    untracked: bool
    path: list[Hop]
    events: list[dict]
    diversion: DiversionFinding | None = None
    children: ChildrenSummary | None = None


class FlowEdge(BaseModel):
    source: str
    source_kind: str | None
    target: str
    target_kind: str | None
    units: int


def trace(store, code: str, *, k: int = 3) -> TraceResult:  # noqa: ANN001 - any Store
    """The custody path of `code`: events on it and on every code it is packed in, the
    assigned distributor, its diversion finding if any; for a case, box or pallet, a
    summary of the units it holds. Raises NotFound for an unknown code."""
    lineage = store.lineage(code)
    if not lineage.num_rows:
        raise NotFound(f"unknown code {code!r}")
    level, ancestors = lineage.column("level")[0].as_py(), lineage.slice(1)
    descendants = store.descendants(code) if level != LEVELS[0] else None
    units = [code] if descendants is None else _unit_codes(descendants)  # the units whose verdicts count
    judgement = _judged(store, units, k)
    if LEVEL_RANK[level] < LEVEL_RANK["case"] and (judgement.verdicts.severity == "suspected").any():
        # the k rule looks at the whole case: it may confirm these
        judgement = _judged(store, units + _case_mates(store, units, ancestors), k)
    # a case, box or pallet is judged on its own: packed in a case, it is no unit of it for the k rule
    own = judgement if descendants is None else _judged(store, [code], k)
    timeline, context = own.timeline, own.context
    me = timeline.units.column("code").to_pylist().index(code)
    mine = own.verdicts.unit == me
    finding = Findings.of(own, units=np.array([me])).models()[0] if mine.any() else None
    path = finding.path if finding else unit_paths(own, np.array([me]))[me]
    assigned = int(own.unit_assignment()[me])
    columns = python_columns(timeline.events.select(list(EVENT_COLUMNS)).take(pa.array(timeline.event[timeline.unit == me])))
    events = [dict(zip(columns, row)) for row in zip(*columns.values())]
    result = TraceResult(
        code=code, level=level, sku=timeline.units.column("sku")[me].as_py(),
        batch=timeline.units.column("batch")[me].as_py(), ancestors=ancestors.column("code").to_pylist(),
        assigned_distributor=context.party_ids[assigned].as_py() if assigned >= 0 else None,
        untracked=bool((own.untracked == me).any()), path=path, events=events, diversion=finding)
    if descendants is not None:
        held = np.flatnonzero(pc.is_in(judgement.timeline.units.column("code"), pa.array(units, pa.string())))
        verdicts = judgement.verdicts[np.isin(judgement.verdicts.unit, held)]
        if finding is not None and finding.severity == "suspected":  # as its units crossing with it (the k rule)
            crossed_at = pc.take(judgement.timeline.events.column("event_id"), pa.array(judgement.timeline.event[verdicts.row]))
            same = pc.fill_null(pc.equal(crossed_at, finding.crossing_event_id), False).to_numpy(zero_copy_only=False)
            if (same & (verdicts.severity == "confirmed")).any():
                finding.severity = "confirmed"
        result.children = ChildrenSummary(
            by_level=dict(Counter(descendants.column("level").to_pylist())), units=len(held),
            diverted_units=len(verdicts), confirmed=int((verdicts.severity == "confirmed").sum()),
            suspected=int((verdicts.severity == "suspected").sum()),
            untracked_units=int(np.isin(judgement.untracked, held).sum()))
    return result


def _judged(store, codes: list[str], k: int) -> Judgement:  # noqa: ANN001
    """The judgement of these codes' timelines."""
    timeline = store.timelines(codes)
    return judge(timeline, judging_context(store, timeline), k=k)


def _unit_codes(codes: pa.Table) -> list[str]:
    """The unit-level codes among `codes` (code and level columns)."""
    return [c for c, level in zip(codes.column("code").to_pylist(), codes.column("level").to_pylist())
            if level == LEVELS[0]]


def _case_mates(store, units: list[str], ancestors: pa.Table) -> list[str]:  # noqa: ANN001
    """The other units packed in the case that `units` are packed in (its `ancestors`;
    none without a case)."""
    cases = [c for c, level in zip(ancestors.column("code").to_pylist(), ancestors.column("level").to_pylist())
             if level == "case"]
    if not cases:
        return []
    known = set(units)
    return [c for c in _unit_codes(store.descendants(cases[0])) if c not in known]


def flow(store, *, batch: str | None = None, sku: str | None = None) -> list[FlowEdge]:  # noqa: ANN001
    """Aggregated custody flow between parties (F -> B -> b -> C) of the units of a batch
    and/or SKU (all units when neither is given), weighted by the number of units that
    moved along each edge. A `ship` moves goods from its party to its counterparty, a
    `receive` from its counterparty to its party; an `open` or `scan` (or a receive naming
    no sender) moves them from the unit's previous holder to its party."""
    units = store.units_where(batch=batch, sku=sku)
    if not units:
        what = " and ".join(f"{k} {v!r}" for k, v in (("batch", batch), ("sku", sku)) if v)
        raise NotFound(f"no units for {what}" if what else "the store holds no units")
    timeline = store.timelines(units)
    context = judging_context(store, timeline)
    facts = EventFacts.of_timeline(timeline, context)
    counterparty = context.party_rows(timeline.events.column("counterparty_id").take(pa.array(timeline.event)))
    unit, action, party = timeline.unit, facts.action, facts.party
    previous = np.concatenate([[-1], facts.holder[:-1]])
    previous[np.concatenate([[True], unit[1:] != unit[:-1]])] = -1
    named = (action == RECEIVE) & (counterparty >= 0)
    implicit = ~named & (action != SHIP)
    source = np.concatenate([party[action == SHIP], counterparty[named], previous[implicit]])
    target = np.concatenate([counterparty[action == SHIP], party[named], party[implicit]])
    moved = np.concatenate([unit[action == SHIP], unit[named], unit[implicit]])
    keep = (source >= 0) & (target >= 0) & (source != target)
    edges = pd.DataFrame({"source": source[keep], "target": target[keep], "unit": moved[keep]})
    counts = edges.drop_duplicates().groupby(["source", "target"]).size().reset_index(name="units")
    ids, kinds = context.party_ids, context.parties.column("kind")
    sources, targets = pa.array(counts["source"].to_numpy(np.int64)), pa.array(counts["target"].to_numpy(np.int64))
    out = [FlowEdge(source=s, source_kind=sk, target=t, target_kind=tk, units=int(n)) for s, sk, t, tk, n in zip(
        ids.take(sources).to_pylist(), kinds.take(sources).to_pylist(), ids.take(targets).to_pylist(),
        kinds.take(targets).to_pylist(), counts["units"].tolist())]
    return sorted(out, key=lambda e: (-e.units, e.source, e.target))
