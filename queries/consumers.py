"""Consumer lifecycle (DOMAIN.md §5): AARRR stage, next action, RFM, a 360° profile.

Definitions (docs/design.md, "Consumer stage"): a purchase is a unit bought, its first live
consumer `scan` (`store.purchases()`, one per unit: a scanned case buys each unit in it,
repeat and retracted scans buy nothing; the scan sell-out counts); everything is as of
`as_of` (default the latest purchase or referral), and a consumer counts from its first
purchase or referral (a registered consumer with neither: always). A consumer's stage is the
last stage of STAGES whose condition holds:

- acquired: a known consumer (every consumer party);
- activated: at least one purchase;
- retained: purchases on two or more UTC days;
- revenue: at least `bulk_units` purchases, or spend in the top `top_value` share of buyers
  (at most top_value x buyers spent as much or more);
- related: two or more SKUs;
- referral: at least one converted referral (an attributed referee, first-touch as in
  queries/influence.py, who bought at or after being referred).

RFM over buyers: recency (days since the last purchase), frequency (purchases), monetary
(spend); each scored 1-5 by quintile: score = ceil(5 x rank / buyers), the rank counted from
the worst (1) and tied values sharing their average rank, so the best buyer scores 5 however
few buyers there are; named by SEGMENTS from R and the mean of F and M.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from graph.errors import NotFound
from graph.timeline import encode
from queries.common import iso, trusted_models, utc
from queries.influence import attribute
from queries.sales import iso_times, sellers, text

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
NEVER = np.iinfo(np.int64).max  # a time after every other (microseconds)
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


PURCHASE_COLUMNS = ("ts", "code", "sku", "unit_price", "store")  # of a profile's purchases
FUNNEL_COLUMNS = ("period", "as_of", *STAGES)  # of a stage_funnel row


class ConsumerProfile(BaseModel):
    """The 360° view of one consumer."""

    party_id: str
    name: str | None
    region_id: str | None
    lifecycle: ConsumerLifecycle
    purchases: list[dict]  # PURCHASE_COLUMNS
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
    consumers, purchases, referrals = _inputs(store)
    history = _History.of(consumers, purchases, referrals)
    as_of = utc(as_of) or _latest(purchases, referrals)
    table = history.table(as_of, bulk_units=bulk_units, top_value=top_value)
    table = table[pd.Series(history.known(as_of), index=consumers.index).reindex(table.index).to_numpy()]
    if stage is not None:
        table = table[table["stage"] == stage]
    if segment is not None:
        table = table[table["segment"] == segment]
    return _models(table)


def stage_funnel(store, *, period: str = "month", as_of: datetime | str | None = None, bulk_units: int = 6,
                 top_value: float = 0.1) -> list[dict]:
    """Consumers per stage at the end of each period (`month` or `week`) up to `as_of`
    (default: the latest purchase or referral), oldest first:
    [{"period": "2024-03", "as_of": ..., "acquired": n, ...}]. A consumer counts from its
    first purchase or referral (registered consumers without either: always); each count
    is of consumers at that stage or beyond, so every row is a funnel."""
    freq = {"month": "M", "week": "W"}.get(period)
    if freq is None:
        raise ValueError(f"period {period!r}: expected month or week")
    consumers, purchases, referrals = _inputs(store)
    latest = utc(as_of) or _latest(purchases, referrals)
    if purchases.empty and referrals.empty:
        return []
    history = _History.of(consumers, purchases, referrals)
    start = min(t.min() for t in (purchases["ts"], referrals["ts"]) if t.notna().any())
    if start > latest:
        return []
    rows = []
    for label in pd.period_range(start.tz_convert(None), latest.tz_convert(None), freq=freq):
        end = min(label.end_time.tz_localize("UTC"), latest)
        reached = history.stages(end, bulk_units=bulk_units, top_value=top_value)[history.known(end)]
        rows.append({"period": str(label), "as_of": iso(end),
                     **{s: int((reached >= i).sum()) for i, s in enumerate(STAGES)}})
    return rows


def profile(store, party_id: str, *, bulk_units: int = 6, top_value: float = 0.1) -> ConsumerProfile:
    """Purchases in time order (with the store each unit came from), stores, referrals and
    tags of one consumer."""
    consumers, purchases, referrals = _inputs(store)
    if party_id not in consumers.index:
        other = store.stored("parties", pa.array([party_id], pa.string())).column("kind").to_pylist()
        raise NotFound(f"{party_id!r} is a {other[0]}, not a consumer" if other else f"consumer {party_id!r} is not stored")
    as_of = _latest(purchases, referrals)
    table = _History.of(consumers, purchases, referrals).table(as_of, bulk_units=bulk_units, top_value=top_value)
    life = _models(table.loc[[party_id]])[0]
    mine = purchases[purchases["party_id"] == party_id].sort_values(["ts", "code"], kind="stable")  # in time order
    sold = sellers(store, mine["code"].tolist())
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
    """Consumers (indexed by party_id), their purchases (with `consumer`, the row of the
    buyer in consumers) and every referral row."""
    parties = store.parties()
    consumers = parties.filter(pc.equal(parties.column("kind"), "consumer"))
    purchases = store.purchases()
    who = encode(purchases.column("party_id"), consumers.column("party_id").combine_chunks())
    purchases = purchases.append_column("consumer", pa.array(who)).filter(pa.array(who >= 0))
    return consumers.to_pandas().set_index("party_id"), purchases.to_pandas(), store.referrals().to_pandas()


def _latest(purchases: pd.DataFrame, referrals: pd.DataFrame) -> pd.Timestamp:
    times = pd.concat([purchases["ts"], referrals["ts"]])
    return times.max() if len(times) else pd.Timestamp("1970-01-01", tz="UTC")


def _micros(ts: pd.Series | pd.Timestamp) -> np.ndarray | int:
    """UTC times as integer microseconds since the epoch (NaT: the smallest int64)."""
    if isinstance(ts, pd.Timestamp):
        return int(ts.as_unit("us").asm8.view(np.int64))
    return ts.dt.as_unit("us").array.asi8


@dataclass
class _History:
    """Consumers' purchases (in time order) and converted referrals as integer positions
    of consumers, so the lifecycle as of any moment is a few bincounts over a prefix."""

    consumers: pd.DataFrame
    who: np.ndarray  # per purchase: the buyer's row in consumers
    ts: np.ndarray  # per purchase: microseconds since the epoch, ascending
    price: np.ndarray
    new_day: np.ndarray  # the buyer's first purchase of its UTC day
    new_sku: np.ndarray  # the buyer's first purchase of its SKU (none when the SKU is unknown)
    referrer: np.ndarray  # per attributed referral whose referee bought at or after it: the referrer's row (-1: not a consumer)
    converted: np.ndarray  # ... and when the referee first bought at or after it (microseconds)
    first_seen: np.ndarray  # per consumer: its first purchase or referral (microseconds; NEVER: none)

    @classmethod
    def of(cls, consumers: pd.DataFrame, purchases: pd.DataFrame, referrals: pd.DataFrame) -> _History:
        bought = purchases[purchases["ts"].notna()]
        ts = _micros(bought["ts"])
        order = np.argsort(ts, kind="stable")
        who, ts = bought["consumer"].to_numpy(np.int64)[order], ts[order]
        sku = bought["sku"].astype("category").cat.codes.to_numpy(np.int64)[order]
        new_day = ~pd.Series(who * 2**40 + ts // 86_400_000_000).duplicated().to_numpy()
        new_sku = (sku >= 0) & ~pd.Series(who * 2**20 + sku).duplicated().to_numpy()
        # the first purchase by each attributed referee at or after its referral
        edges = attribute(referrals).edges.dropna(subset=["ts"])
        edges = pd.DataFrame({"referrer": consumers.index.get_indexer(edges["referrer_id"]),
                              "referee": consumers.index.get_indexer(edges["referee_id"]), "ts": _micros(edges["ts"])})
        first = pd.merge_asof(edges.sort_values("ts", kind="stable"), pd.DataFrame({"referee": who, "ts": ts, "bought": ts}),
                              on="ts", by="referee", direction="forward").dropna(subset=["bought"])
        first_seen = np.full(len(consumers), NEVER)
        np.minimum.at(first_seen, who, ts)
        dated = referrals["ts"].notna().to_numpy()
        for column in ("referrer_id", "referee_id"):
            party = consumers.index.get_indexer(referrals[column])
            keep = (party >= 0) & dated
            np.minimum.at(first_seen, party[keep], _micros(referrals["ts"])[keep])
        return cls(consumers, who, ts, bought["unit_price"].to_numpy(float)[order], new_day, new_sku,
                   first["referrer"].to_numpy(np.int64), first["bought"].to_numpy(np.int64), first_seen)

    def known(self, as_of: pd.Timestamp) -> np.ndarray:
        """Per consumer: seen by `as_of` (a first purchase or referral by then), or a
        registered consumer with neither (always known)."""
        return (self.first_seen == NEVER) | (self.first_seen <= _micros(as_of))

    def _counts(self, as_of: pd.Timestamp) -> dict[str, np.ndarray]:
        """Per consumer: purchases, purchase_days, skus, monetary and converted_referrals up to as_of."""
        end = int(np.searchsorted(self.ts, _micros(as_of), "right"))
        n, who = len(self.consumers), self.who[:end]
        converted = self.referrer[(self.converted <= _micros(as_of)) & (self.referrer >= 0)]
        return {"purchases": np.bincount(who, minlength=n), "purchase_days": np.bincount(who[self.new_day[:end]], minlength=n),
                "skus": np.bincount(who[self.new_sku[:end]], minlength=n),
                "monetary": np.round(np.bincount(who, weights=self.price[:end], minlength=n), 2),
                "converted_referrals": np.bincount(converted, minlength=n)}

    def stages(self, as_of: pd.Timestamp, *, bulk_units: int, top_value: float,
               counts: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Per consumer, the index in STAGES of its stage as of `as_of`."""
        c = counts or self._counts(as_of)
        buyers = c["purchases"] > 0
        spend = c["monetary"][buyers]
        at_least = len(spend) - np.searchsorted(np.sort(spend), spend, "left")  # buyers who spent as much or more
        top_band = np.zeros(len(buyers), bool)
        top_band[buyers] = at_least <= top_value * len(spend)
        conditions = [np.ones(len(buyers), bool), buyers, c["purchase_days"] >= 2,
                      buyers & ((c["purchases"] >= bulk_units) | top_band), c["skus"] >= 2, c["converted_referrals"] >= 1]
        reached = np.zeros(len(buyers), np.int64)
        for i, condition in enumerate(conditions):
            reached[condition] = i
        return reached

    def table(self, as_of: pd.Timestamp, *, bulk_units: int, top_value: float) -> pd.DataFrame:
        """One row per consumer (indexed by party_id, sorted): the ConsumerLifecycle fields."""
        counts = self._counts(as_of)
        table = pd.DataFrame(counts, index=self.consumers.index)
        table["stage"] = np.array(STAGES, object)[self.stages(as_of, bulk_units=bulk_units, top_value=top_value, counts=counts)]
        table["next_action"] = table["stage"].map(NEXT_ACTION)
        end = int(np.searchsorted(self.ts, _micros(as_of), "right"))
        first, last = np.full(len(table), np.iinfo(np.int64).max), np.full(len(table), -1)
        np.minimum.at(first, self.who[:end], self.ts[:end])
        np.maximum.at(last, self.who[:end], self.ts[:end])
        buyers = table["purchases"] > 0
        first_ts, last_ts = (pd.Series(pd.to_datetime(np.where(buyers, t, np.iinfo(np.int64).min).view("datetime64[us]"),
                                                      utc=True), index=table.index) for t in (first, last))
        table["recency_days"] = ((as_of - last_ts) / pd.Timedelta(days=1)).round(2)
        for key, values in (("r", -table["recency_days"]), ("f", table["purchases"]), ("m", table["monetary"])):
            table[key] = np.nan  # for non-buyers; set by position, not by aligning the index
            table.loc[buyers, key] = _quintile(values[buyers]).to_numpy(float)
        table["segment"] = NO_PURCHASE
        r, fm = table["r"].fillna(0), (table["f"].fillna(0) + table["m"].fillna(0)) / 2
        assigned = ~buyers
        for name, rule in SEGMENTS:
            hit = rule(r, fm) & ~assigned
            table.loc[hit, "segment"] = name
            assigned |= hit
        table["first_purchase"], table["last_purchase"] = iso_times(first_ts), iso_times(last_ts)
        return table.sort_index()


def _quintile(values: pd.Series) -> pd.Series:
    """ceil(5 x rank / n), ranks from the lowest value (1), tied values sharing their
    average rank: quintiles when the values differ; the highest value scores 5."""
    if values.empty:
        return values
    return np.ceil(5 * values.rank(method="average") / len(values)).clip(1, 5).astype(int)


def _models(table: pd.DataFrame) -> list[ConsumerLifecycle]:
    """The rows of a `_History.table` as models (not re-validated: the table's columns
    already have the models' types; missing values become None)."""
    frame = table.reset_index()[list(ConsumerLifecycle.model_fields)]
    for key in ("r", "f", "m"):
        frame[key] = frame[key].astype("Int64")
    return trusted_models(ConsumerLifecycle, {name: frame[name].astype(object).where(frame[name].notna(), None).tolist()
                                              for name in frame.columns})
