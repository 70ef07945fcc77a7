"""Store (b) health (DOMAIN.md §5): sell-in, sell-out, stock, cover, abnormal flags.

Definitions (docs/design.md, "Store health"): facts as of `as_of` (default the latest
event); the trailing window is `window_days` long; a store's peers are the stores
registered in the same region at `peer_level`. Abnormal, in both directions:

- *peers*: modified z-score (0.6745 (x - median) / MAD; when MAD is 0,
  (x - median) / (1.2533 mean absolute deviation)) of the window's estimated daily sales
  and of the window's sell-in among the peers (at least `min_peers` stores with sales);
  flagged when |z| >= `z_threshold`.
- *history*: the window's weekly sell-out against the store's weekly sell-out in the
  `history_weeks` weeks before the window: z = (x - median) / (max(1.4826 MAD, sqrt(median), 1)
  / sqrt(window weeks)), the window's rate being a mean over its weeks;
  judged only for stores with sell-out in every one of those weeks (established stores).
- *diversion*: at least `sink_share` of the store's sell-in (and at least 3 units) is
  diverted goods: a diversion sink.
"""
from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from queries.common import iso
from queries.sales import LEVELS, SalesFacts, sales_facts, text

DAY = pd.Timedelta(days=1)


class StoreFlag(BaseModel):
    basis: str  # peers | history | diversion
    metric: str  # daily_sales | sell_in_window | weekly_sell_out | diverted_share
    direction: str  # high | low
    value: float
    baseline: float  # the peers' or own median; the threshold share for diversion
    z: float | None
    reason: str


class StoreHealth(BaseModel):
    store_id: str
    name: str | None
    region_id: str | None
    peer_region: str | None
    distributor: str | None
    sell_in: int  # units taken in, up to as_of
    sell_in_window: int
    sell_out: int  # units first scanned by consumers after this store handled them last
    sell_out_window: int
    scan_rate: float | None  # scanned / sold in, over the stores of the peer region
    daily_sales: float  # estimated: window sell-out / scan rate / window days
    stock: float  # estimated: sell-in - sell-out / scan rate (never below 0)
    days_of_cover: float | None
    next_purchase_date: str | None
    next_purchase_qty: int
    diverted_in: int
    abnormal: bool
    flags: list[StoreFlag]


def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-scores of `values` (Iglewicz-Hoaglin; mean-absolute-deviation fallback).

    >>> robust_z(np.array([10.0, 11, 9, 10, 40])).round(2).tolist()
    [0.0, 0.67, -0.67, 0.0, 20.24]
    """
    if not len(values):
        return values.astype(float)
    deviation = values - np.median(values)
    mad = np.median(np.abs(deviation))
    if mad > 0:
        return 0.6745 * deviation / mad
    mean_ad = np.mean(np.abs(deviation))
    return deviation / (1.2533 * mean_ad) if mean_ad > 0 else np.zeros(len(values))


def store_health(store, *, region: str | None = None, abnormal_only: bool = False,
                 as_of: datetime | str | None = None, window_days: int = 28, history_weeks: int = 8,
                 peer_level: str = "province", z_threshold: float = 3.5, min_peers: int = 4,
                 sink_share: float = 0.5, k: int = 3) -> list[StoreHealth]:
    """Health of every registered store (or those registered in `region` or below it),
    abnormal ones first, then by store id."""
    if peer_level not in LEVELS:
        raise ValueError(f"peer level {peer_level!r}: expected one of {', '.join(LEVELS)}")
    if window_days < 7 or window_days % 7:
        raise ValueError(f"window {window_days} days: expected a positive multiple of 7")
    facts = sales_facts(store, k=k, as_of=as_of)
    if region is not None and region not in facts.regions.index:
        raise ValueError(f"region {region!r} is not stored")
    return health_of(facts, region=region, abnormal_only=abnormal_only, window_days=window_days,
                     history_weeks=history_weeks, peer_level=peer_level, z_threshold=z_threshold,
                     min_peers=min_peers, sink_share=sink_share)


def health_of(facts: SalesFacts, *, region: str | None, abnormal_only: bool, window_days: int,
              history_weeks: int, peer_level: str, z_threshold: float, min_peers: int,
              sink_share: float) -> list[StoreHealth]:
    """`store_health` on facts already built."""
    stores = facts.stores()
    frame = pd.DataFrame(index=stores.index)
    frame["region_id"] = stores["region_id"]
    frame["peer_region"] = facts.ancestor(stores["region_id"], peer_level)
    window_start = facts.as_of - window_days * DAY
    history_start = window_start - history_weeks * 7 * DAY
    sin, sout = facts.sell_in, facts.sell_out
    frame["sell_in"] = _per_store(sin["store"], frame.index)
    frame["sell_in_window"] = _per_store(sin["store"], frame.index, sin["ts"] > window_start)
    frame["diverted_in"] = _per_store(sin["store"], frame.index, sin["diverted"])
    # sell_in is in event order per unit: a unit's row followed by another store's is one this store passed on
    frame["passed_on"] = _per_store(sin["store"], frame.index, sin["code"].duplicated(keep="last").to_numpy())
    frame["sell_out"] = _per_store(sout["store"], frame.index)
    frame["sell_out_window"] = _per_store(sout["store"], frame.index, sout["ts"] > window_start)

    # the scan rate of a peer region: its stores' sell-out / the units that came into them (each once)
    peer_of_row = frame["peer_region"].reindex(sin["store"].astype(object)).to_numpy()
    came_in = pd.DataFrame({"code": sin["code"].to_numpy(), "peer": peer_of_row}).drop_duplicates().groupby("peer").size()
    per_region = (frame.groupby("peer_region")["sell_out"].sum() / came_in).clip(upper=1.0)
    rate = pd.Series(per_region.reindex(frame["peer_region"]).to_numpy(), index=frame.index)
    frame["scan_rate"] = rate.where(rate > 0)
    effective = frame["scan_rate"].fillna(1.0)
    frame["daily_sales"] = frame["sell_out_window"] / effective / window_days
    frame["stock"] = (frame["sell_in"] - frame["passed_on"] - frame["sell_out"] / effective).clip(lower=0.0)
    frame["days_of_cover"] = (frame["stock"] / frame["daily_sales"]).where(frame["daily_sales"] > 0)

    flags: dict[str, list[StoreFlag]] = {s: [] for s in frame.index}
    for metric in ("daily_sales", "sell_in_window"):
        for _, group in frame[frame["sell_out"] > 0].groupby("peer_region"):
            if len(group) < min_peers:
                continue
            values = group[metric].to_numpy(float)
            median = float(np.median(values))
            for store_id, value, z in zip(group.index, values, robust_z(values)):
                if abs(z) >= z_threshold:
                    direction = "high" if z > 0 else "low"
                    flags[store_id].append(StoreFlag(
                        basis="peers", metric=metric, direction=direction, value=round(value, 3), baseline=round(median, 3),
                        z=round(float(z), 2), reason=f"{metric.replace('_', ' ')} {value:.2f} far {'above' if z > 0 else 'below'} "
                        f"its {len(group)} peers in {group['peer_region'].iloc[0]} (median {median:.2f}, z {z:+.1f})"))
    weeks = window_days / 7
    in_history = (sout["ts"] > history_start) & (sout["ts"] <= window_start)
    week_of = ((sout["ts"] - history_start) // (7 * DAY)).where(in_history, -1).to_numpy(np.int64)
    weekly = np.stack([_per_store(sout["store"], frame.index, week_of == week).to_numpy(float)
                       for week in range(history_weeks)], axis=1) if history_weeks else np.zeros((len(frame), 0))
    established = weekly.all(axis=1) if history_weeks else np.zeros(len(frame), bool)  # sold every week
    median = np.median(weekly[established], axis=1)
    spread = np.maximum(np.maximum(1.4826 * np.median(np.abs(weekly[established] - median[:, None]), axis=1), np.sqrt(median)), 1.0)
    current = frame["sell_out_window"].to_numpy(float)[established] / weeks
    z = (current - median) / (spread / math.sqrt(weeks))
    for store_id, value, baseline, score in zip(frame.index[established], current, median, z):
        if abs(score) >= z_threshold:
            flags[store_id].append(StoreFlag(
                basis="history", metric="weekly_sell_out", direction="high" if score > 0 else "low", value=round(value, 3),
                baseline=float(baseline), z=round(score, 2), reason=f"weekly sell-out {value:.1f} far "
                f"{'above' if score > 0 else 'below'} its own last {history_weeks} weeks (median {baseline:.1f}, z {score:+.1f})"))
    share = frame["diverted_in"] / frame["sell_in"].where(frame["sell_in"] > 0)
    for store_id in frame.index[(share >= sink_share) & (frame["diverted_in"] >= 3)]:
        flags[store_id].append(StoreFlag(
            basis="diversion", metric="diverted_share", direction="high", value=round(float(share[store_id]), 3),
            baseline=sink_share, z=None, reason=f"diversion sink: {int(frame.at[store_id, 'diverted_in'])} of its "
            f"{int(frame.at[store_id, 'sell_in'])} units taken in were diverted from other territories"))

    if region is not None:
        frame = frame[facts.under(frame["region_id"], region)]
    if abnormal_only:
        frame = frame[np.array([bool(flags[s]) for s in frame.index], bool)]
    info = stores.reindex(frame.index)
    cover = [None if pd.isna(days) else round(float(days), 1) for days in frame["days_of_cover"]]
    out = [StoreHealth(
        store_id=store_id, name=text(name), region_id=text(region_id), peer_region=text(peer), distributor=text(upstream),
        sell_in=int(sell_in), sell_in_window=int(sell_in_window), sell_out=int(sell_out), sell_out_window=int(sell_out_window),
        scan_rate=None if pd.isna(rate) else round(float(rate), 4), daily_sales=round(float(daily), 3),
        stock=round(float(stock), 1), days_of_cover=days,
        next_purchase_date=None if days is None else iso(facts.as_of + (days * DAY).round("s")),  # tenths of days
        next_purchase_qty=math.ceil(float(daily) * window_days - 1e-9), diverted_in=int(diverted),
        abnormal=bool(flags[store_id]), flags=flags[store_id])
        for store_id, name, region_id, peer, upstream, sell_in, sell_in_window, sell_out, sell_out_window, rate, daily, stock,
        days, diverted in zip(
            frame.index, info["name"], frame["region_id"], frame["peer_region"], info["upstream_id"], frame["sell_in"],
            frame["sell_in_window"], frame["sell_out"], frame["sell_out_window"], frame["scan_rate"], frame["daily_sales"],
            frame["stock"], cover, frame["diverted_in"])]
    return sorted(out, key=lambda s: (not s.abnormal, s.store_id))


def _per_store(column: pd.Series, stores: pd.Index, where: pd.Series | np.ndarray | None = None) -> pd.Series:
    """Rows (where `where` holds) per store of a categorical store column, for each of `stores`."""
    codes = column.cat.codes.to_numpy()
    keep = codes >= 0 if where is None else (codes >= 0) & np.asarray(where, bool)
    counts = np.bincount(codes[keep], minlength=len(column.cat.categories))
    return pd.Series(counts, index=column.cat.categories).reindex(stores, fill_value=0)
