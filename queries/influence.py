"""Referral influence (超级用户), exactly per DOMAIN.md §4 and docs/design.md.

Attribution is first-touch: referral rows are taken in (ts, referrer_id, referee_id)
order and a referee keeps its earliest referrer. Self-referrals, repeated pairs, later
referrals of an attributed referee and referrals that would close a cycle are ignored
and counted. Metrics are computed over the resulting attribution forest; a purchase is a
unit bought (`store.purchases()`: its first live consumer scan), so converted and referred
revenue count each unit once, for the consumer who scanned it first.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse
import scipy.sparse.csgraph
from pydantic import BaseModel

from graph.errors import NotFound
from queries.common import iso, trusted_models

METRICS = ("influence", "cascade_size", "cascade_depth", "direct", "converted", "revenue")
IGNORED = ("self", "duplicate", "late", "cycle")  # why a referral row is not attributed


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


class ReferralStats(BaseModel):
    """What first-touch attribution made of the stored referral rows:
    referrals = attributed + the sum of ignored."""

    referrals: int  # referral rows read
    attributed: int  # rows that attribute their referee (one per attributed referee)
    ignored: dict[str, int]  # rows not attributed, by reason (IGNORED, zeros included)


@dataclass
class Attribution:
    """The attributed referrals (each referee's first-touch referrer) and the ignored rows."""

    edges: pd.DataFrame  # referrer_id, referee_id, ts (UTC), in attribution order
    ignored: Counter = field(default_factory=Counter)  # by reason, one of IGNORED
    rows: int = 0  # referral rows read

    def stats(self) -> ReferralStats:
        return ReferralStats(referrals=self.rows, attributed=len(self.edges),
                             ignored={reason: self.ignored[reason] for reason in IGNORED})

    @cached_property
    def forest(self) -> nx.DiGraph:
        """The attribution forest: edges referrer -> referee with attribute ts."""
        forest = nx.DiGraph()
        forest.add_edges_from((u, v, {"ts": t}) for u, v, t in self.edges.itertuples(index=False))
        return forest


def attribute(referrals: pd.DataFrame) -> Attribution:
    """First-touch attribution of referral rows (referrer_id, referee_id, ts).

    Vectorised where no cycle can arise: if giving every referee its first candidate
    referrer makes no cycle within a group of connected referrals, the rows-in-order
    rule accepts exactly those first candidates there. Groups where a cycle appears are
    replayed row by row."""
    ordered = referrals.sort_values(["ts", "referrer_id", "referee_id"], kind="stable")
    referrer = ordered["referrer_id"].astype(object).to_numpy()
    referee = ordered["referee_id"].astype(object).to_numpy()
    ids, names = pd.factorize(np.r_[referrer, referee])
    source, target = ids[:len(referrer)], ids[len(referrer):]
    ignored: Counter = Counter()
    is_self = source == target
    ignored["self"] += int(is_self.sum())
    repeated = pd.DataFrame({"a": source, "b": target}).duplicated().to_numpy() & ~is_self
    ignored["duplicate"] += int(repeated.sum())
    candidates = np.flatnonzero(~is_self & ~repeated)
    first = candidates[~pd.Series(target[candidates]).duplicated().to_numpy()]
    replay = _in_cyclic_groups(source[candidates], target[candidates], source[first], target[first], len(names))
    replayed = candidates[replay]
    clean = first[~np.isin(first, replayed)]
    late = len(candidates) - len(replayed) - len(clean)
    parent: dict[int, int] = {}
    kept = []
    for i, up, down in zip(replayed.tolist(), source[replayed].tolist(), target[replayed].tolist()):
        if down in parent:
            late += 1
        elif _descends_from(up, down, parent):
            ignored["cycle"] += 1
        else:
            parent[down] = up
            kept.append(i)
    if late:
        ignored["late"] += late
    accepted = np.sort(np.r_[clean, np.array(kept, np.int64)])
    edges = pd.DataFrame({"referrer_id": referrer[accepted], "referee_id": referee[accepted],
                          "ts": pd.to_datetime(ordered["ts"].iloc[accepted], utc=True).reset_index(drop=True)})
    return Attribution(edges, ignored, len(referrals))


def _descends_from(node: int, ancestor: int, parent: dict[int, int]) -> bool:
    while node in parent:
        node = parent[node]
        if node == ancestor:
            return True
    return False


def _in_cyclic_groups(source: np.ndarray, target: np.ndarray, first_source: np.ndarray, first_target: np.ndarray,
                      n: int) -> np.ndarray:
    """Per candidate referral (source -> target): whether its connected group of candidate
    referrals holds a cycle once each referee takes its first candidate referrer."""
    if not len(source):
        return np.zeros(0, bool)
    parent = np.full(n, -1)
    parent[first_target] = first_source
    ancestor = parent.copy()  # after k doublings: the ancestor 2**k up, -1 past a root
    for _ in range(int(np.ceil(np.log2(n))) + 1):
        ancestor = np.where(ancestor >= 0, ancestor[np.maximum(ancestor, 0)], -1)
    cyclic = ancestor >= 0  # on a cycle, or below one
    graph = scipy.sparse.coo_array((np.ones(len(source)), (source, target)), shape=(n, n))
    _, group = scipy.sparse.csgraph.connected_components(graph, directed=False)
    bad = np.zeros(group.max() + 1, bool)
    bad[group[cyclic]] = True
    return bad[group[target]]


def pagerank(sources: np.ndarray, targets: np.ndarray, n: int, *, alpha: float = 0.85, tol: float = 1.0e-6,
             max_iter: int = 100) -> np.ndarray:
    """PageRank of nodes 0..n-1 over unweighted edges sources[i] -> targets[i]: the power
    iteration of `networkx.pagerank` (uniform start and teleport, dangling nodes spread
    uniformly, stop when the L1 change is below n * tol) on a scipy sparse matrix, without
    building a networkx graph first."""
    out_degree = np.bincount(sources, minlength=n).astype(float)
    weights = 1.0 / out_degree[sources]
    transition = scipy.sparse.csr_array((weights, (sources, targets)), shape=(n, n))
    dangling = out_degree == 0
    x = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        previous = x
        x = alpha * (x @ transition + x[dangling].sum() / n) + (1 - alpha) / n
        if np.abs(x - previous).sum() < n * tol:
            return x
    raise nx.PowerIterationFailedConvergence(max_iter)


def influencers(store, *, top: int | None = 10, percent: float | None = None,  # noqa: ANN001 - any Store
                by: str = "influence", attribution: Attribution | None = None) -> list[Influencer]:
    """Referrers ranked by `by` (one of METRICS; ties: larger cascade, then party_id), the
    top N or the top `percent`%. `attribution`: `attribute` of the store's referrals, when
    the caller has it (and wants its `stats()` too)."""
    if by not in METRICS:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(METRICS)}")
    if percent is not None and not 0 < percent <= 100:
        raise ValueError(f"--percent {percent}: expected a number in (0, 100]")
    table = referrer_metrics(store, attribution)
    key = {"revenue": "referred_revenue"}.get(by, by)
    name_rank = pd.factorize(table["party_id"], sort=True)[0]
    order = np.lexsort((name_rank, -table["cascade_size"].to_numpy(), -table[key].to_numpy()))
    if percent is not None:
        order = order[: max(1, int(np.ceil(len(order) * percent / 100)))]
    elif top is not None:
        order = order[:top]
    chosen = table.iloc[order]
    ids = chosen["party_id"].tolist()
    kinds = _kinds(store, ids)
    return trusted_models(Influencer, {name: [kinds.get(i) for i in ids] if name == "kind" else chosen[name].tolist()
                                       for name in Influencer.model_fields})


def referral_stats(store) -> ReferralStats:  # noqa: ANN001 - any Store
    """How many referral rows the store holds, how many are attributed, and how many are
    ignored for each reason (DOMAIN.md §4)."""
    return attribute(store.referrals().to_pandas()).stats()


def referrer_metrics(store, attribution: Attribution | None = None) -> pd.DataFrame:  # noqa: ANN001 - any Store
    """Metrics of every referrer in the attribution forest (the Influencer fields but
    `kind`), computed level by level from the leaves up (vectorised). `attribution`: the
    store's, when the caller has it."""
    edges = (attribution or attribute(store.referrals().to_pandas())).edges
    if edges.empty:
        return pd.DataFrame({name: pd.Series(dtype=object if name == "party_id" else float)
                             for name in Influencer.model_fields if name != "kind"})
    codes, nodes = pd.factorize(pd.concat([edges["referrer_id"], edges["referee_id"]], ignore_index=True))
    n, up, down = len(nodes), codes[:len(edges)], codes[len(edges):]
    parent = np.full(n, -1)
    parent[down] = up
    purchases = store.purchases(list(nodes)).to_pandas()  # the forest's members' only
    member = pd.Index(nodes).get_indexer(purchases["party_id"])
    referred_at = np.full(n, np.datetime64("NaT"), "datetime64[us]")
    referred_at[down] = edges["ts"].dt.tz_localize(None).to_numpy("datetime64[us]")
    bought = (member >= 0) & (purchases["ts"].dt.tz_localize(None).to_numpy("datetime64[us]") >= referred_at[np.maximum(member, 0)])
    own_revenue = np.bincount(member[bought], weights=purchases["unit_price"].to_numpy(float)[bought], minlength=n)
    converted = np.bincount(member[bought], minlength=n) > 0
    level = np.zeros(n, np.int64)  # distance from the root of each node's tree
    ancestor = parent.copy()
    while (ancestor >= 0).any():
        level += ancestor >= 0
        ancestor = np.where(ancestor >= 0, parent[np.maximum(ancestor, 0)], -1)
    size, height, revenue = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
    for depth in range(int(level.max()), 0, -1):
        child = np.flatnonzero(level == depth)
        np.add.at(size, parent[child], size[child] + 1)
        np.maximum.at(height, parent[child], height[child] + 1)
        np.add.at(revenue, parent[child], revenue[child] + own_revenue[child])
    direct = np.bincount(up, minlength=n)
    converted_direct = np.bincount(up, weights=converted[down], minlength=n).astype(np.int64)
    rank = pagerank(down, up, n)  # credit flows from referee to referrer
    rows = np.flatnonzero(size > 0)
    return pd.DataFrame({
        "party_id": np.asarray(nodes[rows], object), "direct": direct[rows], "converted": converted_direct[rows],
        "cascade_size": size[rows], "cascade_depth": height[rows], "referred_revenue": np.round(revenue[rows], 2),
        "influence": np.round(rank[rows], 8)})


def cascade(store, party_id: str) -> list[CascadeNode]:  # noqa: ANN001 - any Store
    """The attribution subtree of one referrer, root first (breadth-first)."""
    attribution = attribute(store.referrals().to_pandas())
    forest = attribution.forest
    if party_id not in forest:
        raise NotFound(f"party {party_id!r} takes part in no attributed referral")
    lengths = nx.single_source_shortest_path_length(forest, party_id)
    purchases = store.purchases(list(lengths)).to_pandas()  # the cascade's members' only
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

