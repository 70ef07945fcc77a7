"""Regional sell-through (动销地图, DOMAIN.md §5) and the region-to-region diversion matrix.

Definitions (docs/design.md, "Regions"): regions are grouped at `level` (each region
counts toward its ancestor at that level; a region above the level counts as itself);
per region and period (`month`, `week` or `all`):

- units_in: units first sold into a store registered in the region (store sell-in,
  queries/sales.py; a unit a store passes on to another store of the region counts once);
- opened: units first opened in the region (the open's location);
- scanned: units first scanned by a consumer in the region (the scan's location);
- stores / active_stores / active_ratio: stores registered there, those with at least one
  sell-out in the period, and their share (动销率);
- diversions_in: diverted units whose crossing left the goods in the region;
- diversions_out: diverted units whose `exit_via` party is registered in the region.

The matrix counts diverted units per (from region, to region) pair, by the same rules.
"""
from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from queries.common import trusted_models
from queries.sales import LEVELS, sales_facts, text

PERIODS = {"month": "M", "week": "W", "all": None}
NAT = np.iinfo(np.int64).min  # a missing period ordinal


class RegionPeriod(BaseModel):
    region_id: str
    name: str | None
    period: str
    units_in: int
    opened: int
    scanned: int
    stores: int
    active_stores: int
    active_ratio: float | None
    diversions_in: int
    diversions_out: int


class DiversionCell(BaseModel):
    from_region: str | None
    to_region: str | None
    units: int


class RegionReport(BaseModel):
    level: str
    period: str
    rows: list[RegionPeriod]  # by period, then region
    matrix: list[DiversionCell]  # most units first


def region_sell_through(store, *, level: str = "province", period: str = "month", k: int = 3,
                        as_of: datetime | str | None = None) -> RegionReport:
    """Sell-through per region and period, and the diversion matrix between regions."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
    if period not in PERIODS:
        raise ValueError(f"period {period!r}: expected one of {', '.join(PERIODS)}")
    facts = sales_facts(store, k=k, as_of=as_of)
    up = facts.ancestor(pd.Series(facts.regions.index, index=facts.regions.index), level)
    regions = pd.Index(up.dropna().unique()).sort_values()  # every region a count can fall in

    def region(ids: pd.Series) -> np.ndarray:
        """Per row, the position in `regions` of its region's ancestor at `level` (-1: none)."""
        ids = ids.astype("category")
        per_category = regions.get_indexer(up.reindex(ids.cat.categories))
        return np.where(ids.cat.codes >= 0, np.append(per_category, -1)[ids.cat.codes], -1)

    stores = facts.stores()
    store_region = pd.Series(region(stores["region_id"]), index=stores.index)

    def by_store(column: pd.Series) -> np.ndarray:
        ids = column.astype("category")
        per_category = np.append(store_region.reindex(ids.cat.categories).fillna(-1).to_numpy(np.int64), -1)
        return per_category[ids.cat.codes]

    sin, sout, f = facts.sell_in, facts.sell_out, facts.findings
    period_of, labels = _periods([sin["ts"], facts.opened["ts"], sout["ts"], f["ts"]], period)
    period_of = [period_of[i] for i in (0, 1, 2, 2, 3, 3)]  # sell-in, opened, scanned, active, diversions in, out
    into = by_store(sin["store"])
    first_into = ~pd.DataFrame({"code": sin["code"].to_numpy(), "region": into}).duplicated().to_numpy()  # in event order per code
    keys = [("units_in", np.where(first_into, into, -1)), ("opened", region(facts.opened["region_id"])),
            ("scanned", region(sout["region_id"])), ("active_stores", by_store(sout["store"])),
            ("diversions_in", region(f["to_region"])), ("diversions_out", region(f["from_region"]))]
    n_regions, n_periods = len(regions), len(labels)
    counts, seen = {}, np.zeros((n_regions, n_periods), bool)
    for (name, where), when in zip(keys, period_of):
        keep = (where >= 0) & (when >= 0)
        if name == "active_stores":  # distinct stores with a sell-out
            sellers = sout["store"].astype("category").cat
            seller, n_sellers = sellers.codes.to_numpy(np.int64), max(len(sellers.categories), 1)
            cells = pd.unique((where[keep] * n_periods + when[keep]) * n_sellers + seller[keep]) // n_sellers
            where, when = cells // n_periods, cells % n_periods
        else:
            where, when = where[keep], when[keep]
        grid = np.bincount(where * n_periods + when, minlength=n_regions * n_periods).reshape(n_regions, n_periods)
        counts[name] = grid
        seen |= grid > 0  # cells any count falls in
    registered = np.bincount(store_region[store_region >= 0], minlength=n_regions)
    shown = (registered > 0) | seen.any(axis=1)
    used = seen.any(axis=0)
    region_rows, period_cols = np.flatnonzero(shown), np.flatnonzero(used)
    r, c = (a.ravel() for a in np.meshgrid(region_rows, period_cols, indexing="ij"))
    order = np.lexsort((regions.to_numpy(object)[r], labels[c]))
    r, c = r[order], c[order]
    names = facts.regions["name"].reindex(regions)
    n = registered[r]
    active = counts["active_stores"][r, c]
    rows = trusted_models(RegionPeriod, {
        "region_id": regions.to_numpy(object)[r].tolist(), "name": [text(v) for v in names.to_numpy(object)[r]],
        "period": labels[c].tolist(), **{name: counts[name][r, c].tolist() for name, _ in keys if name != "active_stores"},
        "stores": n.tolist(), "active_stores": active.tolist(),
        "active_ratio": [ratio if s else None for ratio, s in zip(np.round(active / np.maximum(n, 1), 4).tolist(), n.tolist())]})
    pairs = pd.DataFrame({"from_region": facts.ancestor(f["from_region"], level).to_numpy(object),
                          "to_region": facts.ancestor(f["to_region"], level).to_numpy(object)})
    matrix = pairs.fillna("?").groupby(["from_region", "to_region"]).size().sort_values(ascending=False, kind="stable")
    return RegionReport(level=level, period=period, rows=rows, matrix=[
        DiversionCell(from_region=None if a == "?" else a, to_region=None if b == "?" else b, units=int(n))
        for (a, b), n in matrix.items()])


def _periods(times: list[pd.Series], period: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Per time column, each row's period as a position in the labels (-1 for no time), and
    the labels of the periods that occur (`all`: one)."""
    if PERIODS[period] is None:
        return [np.zeros(len(t), np.int64) for t in times], np.array(["all"], object)
    ordinals = [t.dt.tz_convert(None).dt.to_period(PERIODS[period]).array.asi8 for t in times]
    occurring = np.unique(np.concatenate([pd.unique(o[o != NAT]) for o in ordinals]))
    labels = pd.PeriodIndex.from_ordinals(occurring, freq=PERIODS[period]).astype(str).to_numpy(object)
    return [np.where(o != NAT, np.searchsorted(occurring, o), -1) for o in ordinals], labels
