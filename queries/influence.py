"""Referral influence (超级用户), exactly per DOMAIN.md §4 and docs/design.md.

Attribution is first-touch: referral rows are taken in (ts, referrer_id, referee_id)
order and a referee keeps its earliest referrer. Self-referrals, repeated pairs, later
referrals of an attributed referee and referrals that would close a cycle are ignored
and counted. Metrics are computed over the resulting attribution forest.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from graph.errors import NotFound
from queries.common import iso

METRICS = ("influence", "cascade_size", "direct", "converted", "revenue")


class Influencer(BaseModel):
    party_id: str
    kind: str | None
    direct: int
    converted: int
    cascade_size: int
    cascade_depth: int
    referred_revenue: float
    influence: float


class CascadeNode(BaseModel):
    party_id: str
    kind: str | None
    referrer_id: str | None
    depth: int
    ts: str | None  # when this member was referred
    purchases: int
    revenue: float


@dataclass
class Attribution:
    """The attribution forest (referee -> its attributed referrer) and the ignored rows."""

    forest: nx.DiGraph  # edges referrer -> referee, attribute ts
    ignored: Counter = field(default_factory=Counter)  # self / duplicate / late / cycle


def attribute(referrals: pd.DataFrame) -> Attribution:
    """First-touch attribution of referral rows (referrer_id, referee_id, ts)."""
    forest = nx.DiGraph()
    ignored: Counter = Counter()
    seen_pairs: set[tuple[str, str]] = set()
    parent: dict[str, str] = {}
    ordered = referrals.sort_values(["ts", "referrer_id", "referee_id"], kind="stable")
    for referrer, referee, ts in zip(ordered["referrer_id"], ordered["referee_id"], ordered["ts"]):
        if referrer == referee:
            ignored["self"] += 1
            continue
        if (referrer, referee) in seen_pairs:
            ignored["duplicate"] += 1
            continue
        seen_pairs.add((referrer, referee))
        if referee in parent:
            ignored["late"] += 1
            continue
        if _descends_from(referrer, referee, parent):
            ignored["cycle"] += 1
            continue
        parent[referee] = referrer
        forest.add_edge(referrer, referee, ts=ts)
    return Attribution(forest, ignored)


def _descends_from(node: str, ancestor: str, parent: dict[str, str]) -> bool:
    while node in parent:
        node = parent[node]
        if node == ancestor:
            return True
    return False


def influencers(store, *, top: int | None = 10, percent: float | None = None,  # noqa: ANN001 - any Store
                by: str = "influence") -> list[Influencer]:
    """Referrers ranked by `by` (one of METRICS), the top N or the top `percent`%."""
    if by not in METRICS:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(METRICS)}")
    if percent is not None and not 0 < percent <= 100:
        raise ValueError(f"--percent {percent}: expected a number in (0, 100]")
    table = referrer_metrics(store)
    key = {"revenue": "referred_revenue"}.get(by, by)
    table.sort(key=lambda r: (-getattr(r, key), -r.cascade_size, r.party_id))
    if percent is not None:
        return table[: max(1, int(np.ceil(len(table) * percent / 100)))] if table else []
    return table[:top] if top is not None else table


def referrer_metrics(store) -> list[Influencer]:  # noqa: ANN001 - any Store
    """Metrics of every referrer in the attribution forest (one bottom-up pass)."""
    forest = attribute(store.referrals().to_pandas()).forest
    if forest.number_of_edges() == 0:
        return []
    referred_at = {v: ts for _, v, ts in forest.edges(data="ts")}
    purchases = store.purchases().to_pandas()
    purchases = purchases[purchases["party_id"].isin(referred_at.keys())]
    bought = purchases[purchases["ts"] >= purchases["party_id"].map(referred_at)]
    own_revenue = bought.groupby("party_id")["unit_price"].sum().to_dict()
    converted_ids = set(bought["party_id"])
    size: dict[str, int] = {}
    depth: dict[str, int] = {}
    revenue: dict[str, float] = {}
    for node in reversed(list(nx.topological_sort(forest))):
        children = list(forest.successors(node))
        size[node] = sum(size[c] + 1 for c in children)
        depth[node] = max((depth[c] + 1 for c in children), default=0)
        revenue[node] = sum(revenue[c] + own_revenue.get(c, 0.0) for c in children)
    rank = nx.pagerank(forest.reverse(copy=False), alpha=0.85)
    kinds = _kinds(store, [n for n in forest if size[n]])
    return [Influencer(party_id=node, kind=kinds.get(node), direct=forest.out_degree(node),
                       converted=sum(c in converted_ids for c in forest.successors(node)),
                       cascade_size=size[node], cascade_depth=depth[node],
                       referred_revenue=round(revenue[node], 2), influence=round(rank.get(node, 0.0), 8))
            for node in forest if size[node]]


def cascade(store, party_id: str) -> list[CascadeNode]:  # noqa: ANN001 - any Store
    """The attribution subtree of one referrer, root first (breadth-first)."""
    attribution = attribute(store.referrals().to_pandas())
    forest = attribution.forest
    if party_id not in forest:
        raise NotFound(f"party {party_id!r} takes part in no attributed referral")
    purchases = store.purchases().to_pandas()
    lengths = nx.single_source_shortest_path_length(forest, party_id)
    kinds = _kinds(store, list(lengths))
    referred_at = {v: ts for _, v, ts in forest.edges(data="ts")}
    nodes = []
    for member, depth in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        mine = purchases[purchases["party_id"] == member]
        if member != party_id:
            mine = mine[mine["ts"] >= referred_at[member]]
        preds = list(forest.predecessors(member)) if member != party_id else []
        nodes.append(CascadeNode(
            party_id=member, kind=kinds.get(member), referrer_id=preds[0] if preds else None, depth=depth,
            ts=iso(referred_at.get(member)) if member != party_id else None,
            purchases=len(mine), revenue=round(float(mine["unit_price"].sum()), 2)))
    return nodes


def _kinds(store, ids: list[str]) -> dict[str, str]:  # noqa: ANN001
    rows = store.stored("parties", pa.array(ids, pa.string()))
    return dict(zip(rows.column("party_id").to_pylist(), rows.column("kind").to_pylist()))

