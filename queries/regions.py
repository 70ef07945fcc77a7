"""Regional sell-through (动销地图, DOMAIN.md §5) and the region-to-region diversion matrix.

Definitions (docs/design.md, "Regions"): regions are grouped at `level` (each region
counts toward its ancestor at that level; a region above the level counts as itself);
per region and period (`month`, `week` or `all`):

- units_in: store sell-in (queries/sales.py) into stores registered in the region;
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

import pandas as pd
from pydantic import BaseModel

from queries.sales import LEVELS, sales_facts, text

PERIODS = {"month": "M", "week": "W", "all": None}


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
    stores = facts.stores()
    store_region = facts.ancestor(stores["region_id"], level)

    def label(ts: pd.Series) -> pd.Series:
        if PERIODS[period] is None:
            return pd.Series("all", index=ts.index, dtype=object)
        return ts.dt.tz_convert(None).dt.to_period(PERIODS[period]).astype(str)

    def per(frame: pd.DataFrame, region: pd.Series, name: str) -> pd.Series:
        keyed = pd.DataFrame({"region_id": region.to_numpy(object), "period": label(frame["ts"]).to_numpy(object)})
        return keyed.dropna().groupby(["region_id", "period"]).size().rename(name)

    sin, sout, f = facts.sell_in, facts.sell_out, facts.findings
    active = pd.DataFrame({"region_id": sout["store"].map(store_region).to_numpy(object),
                           "period": label(sout["ts"]).to_numpy(object), "store": sout["store"].to_numpy(object)})
    counts = pd.concat([
        per(sin, sin["store"].map(store_region), "units_in"),
        per(facts.opened, facts.ancestor(facts.opened["region_id"], level), "opened"),
        per(sout, facts.ancestor(sout["region_id"], level), "scanned"),
        active.dropna().groupby(["region_id", "period"])["store"].nunique().rename("active_stores"),
        per(f, facts.ancestor(f["to_region"], level), "diversions_in"),
        per(f, facts.ancestor(f["from_region"], level), "diversions_out"),
    ], axis=1)
    registered = store_region.value_counts()
    periods = counts.index.get_level_values("period").unique() if len(counts) else []
    regions = registered.index.union(counts.index.get_level_values("region_id").unique() if len(counts) else [])
    full = pd.MultiIndex.from_product([regions, periods], names=["region_id", "period"])
    counts = counts.reindex(full).fillna(0).astype(int).sort_index()
    rows = []
    for (region_id, period_label), row in counts.iterrows():
        n = int(registered.get(region_id, 0))
        rows.append(RegionPeriod(
            region_id=region_id, name=text(facts.regions["name"].get(region_id)), period=period_label,
            units_in=row["units_in"], opened=row["opened"], scanned=row["scanned"], stores=n,
            active_stores=row["active_stores"], active_ratio=round(row["active_stores"] / n, 4) if n else None,
            diversions_in=row["diversions_in"], diversions_out=row["diversions_out"]))
    rows.sort(key=lambda r: (r.period, r.region_id))
    pairs = pd.DataFrame({"from_region": facts.ancestor(f["from_region"], level).to_numpy(object),
                          "to_region": facts.ancestor(f["to_region"], level).to_numpy(object)})
    matrix = pairs.fillna("?").groupby(["from_region", "to_region"]).size().sort_values(ascending=False, kind="stable")
    return RegionReport(level=level, period=period, rows=rows, matrix=[
        DiversionCell(from_region=None if a == "?" else a, to_region=None if b == "?" else b, units=int(n))
        for (a, b), n in matrix.items()])
