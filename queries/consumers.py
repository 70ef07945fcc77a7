"""Consumer lifecycle (DOMAIN.md §5): AARRR stage, next action, RFM, a 360° profile.

Definitions (docs/design.md, "Consumer lifecycle"): a purchase is a consumer `scan`
(`store.purchases()`, one per scan event); everything is as of `as_of` (default the
latest purchase or referral). A consumer's stage is the last stage of STAGES whose
condition holds:

- acquired: a known consumer (every consumer party);
- activated: at least one purchase;
- retained: purchases on two or more UTC days;
- revenue: at least `bulk_units` purchases, or spend in the top `top_value` share of buyers
  (at most top_value x buyers spent as much or more);
- related: two or more SKUs;
- referral: at least one converted referral (an attributed referee, first-touch as in
  queries/influence.py, who bought at or after being referred).

RFM over buyers: recency (days since the last purchase), frequency (purchases), monetary
(spend); each scored 1-5 by quintile (score = 1 + floor(5 x share of buyers strictly worse)),
named by SEGMENTS from R and the mean of F and M.
"""
from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from graph.errors import NotFound
from queries.common import iso
from queries.influence import attribute
from queries.sales import iso_times, sales_facts, text, utc

STAGES = ("acquired", "activated", "retained", "revenue", "related", "referral")
NEXT_ACTION = {"acquired": "first purchase", "activated": "repurchase", "retained": "bulk purchase",
               "revenue": "related product", "related": "referral", "referral": "reward and keep referring"}
# (segment, rule on R and FM = (F + M) / 2), first match wins; buyers only
SEGMENTS = (
    ("champions", lambda r, fm: (r >= 4) & (fm >= 4)),
    ("loyal", lambda r, fm: (r >= 3) & (fm >= 3)),
    ("promising", lambda r, fm: r >= 3),
    ("at_risk", lambda r, fm: fm >= 3),
    ("hibernating", lambda r, fm: r >= 2),
    ("lost", lambda r, fm: r >= 1),
)
NO_PURCHASE = "prospect"
SEGMENT_NAMES = tuple(name for name, _ in SEGMENTS) + (NO_PURCHASE,)


class ConsumerLifecycle(BaseModel):
    party_id: str
    stage: str
    next_action: str
    purchases: int
    purchase_days: int
    skus: int
    monetary: float
    converted_referrals: int
    first_purchase: str | None
    last_purchase: str | None
    recency_days: float | None
    r: int | None
    f: int | None
    m: int | None
    segment: str


class ConsumerProfile(BaseModel):
    """The 360° view of one consumer."""

    party_id: str
    name: str | None
    region_id: str | None
    lifecycle: ConsumerLifecycle
    purchases: list[dict]  # ts, code, sku, unit_price, store, region_id
    stores: list[dict]  # store, purchases (units it sold to this consumer)
    referred_by: dict | None  # referrer_id, ts (the attributed referrer)
    referrals: list[dict]  # referee_id, ts, converted
    tags: list[str]


def lifecycle(store, *, stage: str | None = None, segment: str | None = None,
              as_of: datetime | str | None = None, bulk_units: int = 6, top_value: float = 0.1) -> list[ConsumerLifecycle]:
    """Stage, next action and RFM of every consumer (filtered by stage and segment), by id."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    if segment is not None and segment not in SEGMENT_NAMES:
        raise ValueError(f"segment {segment!r}: expected one of {', '.join(SEGMENT_NAMES)}")
    inputs = _inputs(store)
    consumers, purchases, referrals = inputs
    table = _lifecycle(consumers, purchases, _edges(referrals), as_of=utc(as_of) or _latest(purchases, referrals),
                       bulk_units=bulk_units, top_value=top_value)
    if stage is not None:
        table = table[table["stage"] == stage]
    if segment is not None:
        table = table[table["segment"] == segment]
    return _models(table)


def stage_funnel(store, *, period: str = "month", bulk_units: int = 6, top_value: float = 0.1) -> list[dict]:
    """Consumers per stage at the end of each period (`month` or `week`), oldest first:
    [{"period": "2024-03", "as_of": ..., "acquired": n, ...}]. A consumer counts from its
    first purchase or referral (registered consumers without either: always); each count
    is of consumers at that stage or beyond, so every row is a funnel."""
    freq = {"month": "M", "week": "W"}.get(period)
    if freq is None:
        raise ValueError(f"period {period!r}: expected month or week")
    consumers, purchases, referrals = _inputs(store)
    latest = _latest(purchases, referrals)
    seen = pd.concat([purchases[["party_id", "ts"]], referrals[["referrer_id", "ts"]].rename(columns={"referrer_id": "party_id"}),
                      referrals[["referee_id", "ts"]].rename(columns={"referee_id": "party_id"})])
    if seen.empty:
        return []
    first_seen = seen.groupby("party_id")["ts"].min().reindex(consumers.index)
    edges = _edges(referrals)
    rows = []
    for label in pd.period_range(seen["ts"].min().tz_convert(None), latest.tz_convert(None), freq=freq):
        end = min(label.end_time.tz_localize("UTC"), latest)
        known = consumers[first_seen.isna() | (first_seen <= end)]
        table = _lifecycle(known, purchases, edges, as_of=end, bulk_units=bulk_units, top_value=top_value)
        reached = table["stage"].map(STAGES.index)
        rows.append({"period": str(label), "as_of": iso(end),
                     **{s: int((reached >= i).sum()) for i, s in enumerate(STAGES)}})
    return rows


def profile(store, party_id: str, *, bulk_units: int = 6, top_value: float = 0.1) -> ConsumerProfile:
    """Purchases (with the store each unit came from), stores, referrals and tags of one consumer."""
    consumers, purchases, referrals = _inputs(store)
    if party_id not in consumers.index:
        raise NotFound(f"consumer {party_id!r} is not stored")
    as_of = _latest(purchases, referrals)
    life = _models(_lifecycle(consumers, purchases, _edges(referrals), as_of=as_of, bulk_units=bulk_units,
                              top_value=top_value).loc[[party_id]])[0]
    sold = sales_facts(store).sell_out.set_index("code")["store"]
    mine = purchases[purchases["party_id"] == party_id].copy()
    mine["store"] = mine["code"].map(sold)
    bought = [{"ts": iso(r.ts), "code": r.code, "sku": r.sku, "unit_price": float(r.unit_price),
               "store": None if pd.isna(r.store) else r.store} for r in mine.itertuples()]
    per_store = mine.dropna(subset=["store"]).groupby("store").size().sort_values(ascending=False)
    forest = attribute(referrals).forest
    referred_by = next(({"referrer_id": p, "ts": iso(forest.edges[p, party_id]["ts"])}
                        for p in forest.predecessors(party_id)), None) if party_id in forest else None
    made = []
    if party_id in forest:
        for child in sorted(forest.successors(party_id)):
            ts = forest.edges[party_id, child]["ts"]
            converted = bool(((purchases["party_id"] == child) & (purchases["ts"] >= ts)).any())
            made.append({"referee_id": child, "ts": iso(ts), "converted": converted})
    info = consumers.loc[party_id]
    tags = [f"stage:{life.stage}", f"segment:{life.segment}"]
    tags += [f"sku:{s}" for s in sorted(mine["sku"].dropna().unique())]
    if made:
        tags.append("referrer")
    if referred_by:
        tags.append("referred")
    return ConsumerProfile(party_id=party_id, name=text(info.get("name")), region_id=text(info.get("region_id")),
                           lifecycle=life, purchases=bought,
                           stores=[{"store": s, "purchases": int(n)} for s, n in per_store.items()],
                           referred_by=referred_by, referrals=made, tags=tags)


# ---------------------------------------------------------------- the computation


def _inputs(store) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    parties = store.parties().to_pandas()
    consumers = parties[parties["kind"] == "consumer"].set_index("party_id")
    purchases = store.purchases().to_pandas()
    purchases = purchases[purchases["party_id"].isin(consumers.index)]
    return consumers, purchases, store.referrals().to_pandas()


def _latest(purchases: pd.DataFrame, referrals: pd.DataFrame) -> pd.Timestamp:
    times = pd.concat([purchases["ts"], referrals["ts"]])
    return times.max() if len(times) else pd.Timestamp("1970-01-01", tz="UTC")


def _edges(referrals: pd.DataFrame) -> pd.DataFrame:
    """The first-touch attribution edges (referrer, referee, ts). Attribution only looks
    back, so the edges known at any time are these with ts up to it."""
    forest = attribute(referrals).forest
    return pd.DataFrame([(u, v, ts) for u, v, ts in forest.edges(data="ts")], columns=["referrer", "referee", "ts"])


def _lifecycle(consumers: pd.DataFrame, purchases: pd.DataFrame, edges: pd.DataFrame, *, as_of: pd.Timestamp,
               bulk_units: int, top_value: float) -> pd.DataFrame:
    """One row per consumer (indexed by party_id): the ConsumerLifecycle fields."""
    bought = purchases[purchases["ts"] <= as_of]
    per = bought.groupby("party_id").agg(purchases=("ts", "size"), skus=("sku", "nunique"),
                                         monetary=("unit_price", "sum"), first=("ts", "min"), last=("ts", "max"))
    days = bought.assign(day=bought["ts"].dt.floor("D")).drop_duplicates(["party_id", "day"])
    per["purchase_days"] = days.groupby("party_id").size()
    table = per.reindex(consumers.index)
    for column in ("purchases", "purchase_days", "skus"):
        table[column] = table[column].fillna(0).astype(int)
    table["monetary"] = table["monetary"].fillna(0.0).round(2)

    edges = edges[edges["ts"] <= as_of]
    first_after = edges.merge(bought[["party_id", "ts"]].rename(columns={"party_id": "referee", "ts": "bought"}), on="referee")
    converted = first_after[first_after["bought"] >= first_after["ts"]].drop_duplicates(["referrer", "referee"])
    table["converted_referrals"] = converted.groupby("referrer").size().reindex(table.index, fill_value=0).astype(int)

    buyers = table["purchases"] > 0
    spend = table.loc[buyers, "monetary"]
    top_band = (spend.rank(method="max", ascending=False) <= top_value * len(spend)).reindex(table.index, fill_value=False)
    conditions = [
        pd.Series(True, index=table.index), buyers, table["purchase_days"] >= 2,
        buyers & ((table["purchases"] >= bulk_units) | top_band),
        table["skus"] >= 2, table["converted_referrals"] >= 1,
    ]
    reached = np.zeros(len(table), int)
    for i, condition in enumerate(conditions):
        reached = np.where(condition.to_numpy(bool), i, reached)
    table["stage"] = [STAGES[i] for i in reached]
    table["next_action"] = table["stage"].map(NEXT_ACTION)

    table["recency_days"] = ((as_of - table["last"]) / pd.Timedelta(days=1)).round(2)
    table["r"] = _quintile(-table.loc[buyers, "recency_days"])
    table["f"] = _quintile(table.loc[buyers, "purchases"])
    table["m"] = _quintile(table.loc[buyers, "monetary"])
    table["segment"] = NO_PURCHASE
    r, fm = table["r"].fillna(0), (table["f"].fillna(0) + table["m"].fillna(0)) / 2
    assigned = ~buyers
    for name, rule in SEGMENTS:
        hit = rule(r, fm) & ~assigned
        table.loc[hit, "segment"] = name
        assigned |= hit
    table["first_purchase"], table["last_purchase"] = iso_times(table["first"]), iso_times(table["last"])
    return table.drop(columns=["first", "last"]).sort_index()


def _quintile(values: pd.Series) -> pd.Series:
    """1 + floor(5 x share of values strictly lower), so ties share a score."""
    if values.empty:
        return values
    worse = values.rank(method="min") - 1
    return (1 + np.floor(5 * worse / len(values))).astype(int)


def _models(table: pd.DataFrame) -> list[ConsumerLifecycle]:
    """The rows of a `_lifecycle` table as models (built without re-validation: the table's
    columns already have the models' types; missing values become None)."""
    frame = table.reset_index()[list(ConsumerLifecycle.model_fields)]
    for key in ("r", "f", "m"):
        frame[key] = frame[key].astype("Int64")
    frame = frame.astype(object).where(frame.notna(), None)
    return [ConsumerLifecycle.model_construct(**row) for row in frame.to_dict("records")]
