"""Browser views of stores, consumers, rebates and regions (DOMAIN.md §5).

Charts are inline SVG drawn by the templates from geometry computed here (bars, a funnel,
a heat map), so they need no script and work offline; the region flow graph is a
vis-network graph like the other views (`views.Graph`, positions computed here). Pages
are built with `views.render` and served by `api.analytics_routes`; `write_analytics_views`
writes them as standalone files (the demo's HTML output).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from api import views
from graph.errors import ChannelgraphError
from queries.consumers import SEGMENT_NAMES, STAGES, lifecycle, profile, stage_funnel
from queries.rebates import Policy, load_policy, rebates
from queries.regions import RegionReport, region_sell_through
from queries.sales import LEVELS
from queries.stores import StoreHealth, store_health

if TYPE_CHECKING:
    from api.service import ApiService
    from graph.settings import Settings

EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "docs" / "policy.example.toml"
MAX_BARS = 40  # bars per chart (the largest, plus every highlighted one)
MAX_ROWS = 500  # table rows per page
HEAT = ((253, 237, 236), (146, 43, 33))  # heat map colours, from few to most units
BAR, HOT = "#2e86c1", "#c0392b"
views.NAV.extend([("/views/stores", "Stores"), ("/views/consumers", "Consumers"), ("/views/rebates", "Rebates"),
                  ("/views/regions", "Regions")])


# ---------------------------------------------------------------- chart geometry


def bar_chart(items: Sequence[tuple[str, float]], *, title: str, unit: str = "", hot: set[str] | frozenset = frozenset(),
              label_width: int = 150, width: int = 720, bar: int = 16, ordered: bool = False) -> dict:
    """Horizontal bars, largest first (or in the given order when `ordered`); at most
    MAX_BARS, the largest, highlighted labels always kept."""
    ranked = sorted(items, key=lambda item: (-item[1], item[0]))
    kept = [i for i in ranked if i[0] in hot][:MAX_BARS]
    kept += [i for i in ranked if i[0] not in hot][: max(0, MAX_BARS - len(kept))]
    kept.sort(key=lambda item: items.index(item) if ordered else (-item[1], item[0]))
    most = max((v for _, v in kept), default=0) or 1
    plot = width - label_width - 90
    rows = [{"label": label, "value": value, "text": f"{value:,.2f}".rstrip("0").rstrip(".") + unit,
             "y": i * (bar + 6) + 4, "w": round(plot * value / most, 1), "fill": HOT if label in hot else BAR}
            for i, (label, value) in enumerate(kept)]
    note = f"the {len(kept)} largest of {len(items)}" if len(kept) < len(items) else ""
    return {"title": title, "rows": rows, "width": width, "height": len(rows) * (bar + 6) + 8, "bar": bar,
            "label_width": label_width, "note": note}


def heat_map(cells: Sequence[tuple[str, str, int]], names: dict[str, str], *, title: str, size: int = 34) -> dict:
    """A from x to matrix of counts: rows are origins, columns destinations."""
    rows = sorted({a for a, _, _ in cells})
    cols = sorted({b for _, b, _ in cells})
    most = max((n for _, _, n in cells), default=0) or 1
    left, top = 150, 110
    shaded = []
    for a, b, n in cells:
        share = math.sqrt(n / most)
        color = tuple(round(lo + (hi - lo) * share) for lo, hi in zip(*HEAT))
        shaded.append({"x": left + cols.index(b) * size, "y": top + rows.index(a) * size, "n": n,
                       "fill": "rgb({},{},{})".format(*color), "dark": share > 0.55, "from": a, "to": b})
    return {"title": title, "size": size, "left": left, "top": top, "cells": shaded,
            "rows": [{"id": r, "name": names.get(r, r), "y": top + i * size + size / 2} for i, r in enumerate(rows)],
            "cols": [{"id": c, "name": names.get(c, c), "x": left + i * size + size / 2} for i, c in enumerate(cols)],
            "width": left + len(cols) * size + 10, "height": top + len(rows) * size + 10}


def funnel(counts: dict[str, int], *, title: str, width: int = 720, step: int = 34) -> dict:
    """Stage counts as centred bars narrowing down the AARRR stages."""
    most = max(counts.values(), default=0) or 1
    rows = []
    for i, stage in enumerate(STAGES):
        w = max(2.0, round((width - 260) * counts.get(stage, 0) / most, 1))
        rows.append({"stage": stage, "n": counts.get(stage, 0), "w": w, "x": 130 + (width - 260 - w) / 2,
                     "y": i * step + 4, "share": f"{100 * counts.get(stage, 0) / most:.0f}%"})
    return {"title": title, "rows": rows, "width": width, "height": len(STAGES) * step + 8, "step": step}


def region_graph(report: RegionReport, names: dict[str, str]) -> views.Graph:
    """Regions on a circle, an edge per (from, to) pair of diverted units, wider for more."""
    graph = views.Graph()
    cells = [c for c in report.matrix if c.from_region and c.to_region]
    ids = sorted({c.from_region for c in cells} | {c.to_region for c in cells})
    most = max((c.units for c in cells), default=0)
    radius = max(220, 40 * len(ids))
    for i, region in enumerate(ids):
        angle = 2 * math.pi * i / max(len(ids), 1)
        graph.node(region, "region", label=names.get(region, region), title=f"region {region}: {names.get(region, region)}",
                   x=round(radius * math.cos(angle)), y=round(radius * math.sin(angle)))
    for c in cells:
        graph.edges.append({"from": c.from_region, "to": c.to_region, "units": c.units, "crossed": True,
                            "label": f"{c.units:,}", "width": views._width(c.units, most),
                            "title": f"{c.from_region} → {c.to_region}: {c.units:,} diverted units"})
    return graph


# ---------------------------------------------------------------- pages


def cached_store_health(svc: ApiService, *, region: str | None = None, peer_level: str = "province",
                        as_of: datetime | None = None) -> list[StoreHealth]:
    """`store_health` through the service's cache (the stores page's, the demo's report)."""
    return svc.cached(lambda: store_health(svc.store, region=region, as_of=as_of, peer_level=peer_level, k=svc.k),
                      "stores", region, peer_level, as_of.isoformat() if as_of else None)


def stores_page(svc: ApiService, *, region: str | None = None, abnormal: bool = False, peer_level: str = "province",
                as_of: datetime | None = None, inline: bool = False) -> views.Page:
    title = "Store health (动销, stock, abnormal stores)"
    context = {"region": region, "abnormal": abnormal, "peer_level": peer_level, "levels": tuple(LEVELS),
               "as_of": as_of.isoformat() if as_of else None}
    try:
        health = cached_store_health(svc, region=region, peer_level=peer_level, as_of=as_of)
    except (ValueError, ChannelgraphError) as exc:
        return views.render("stores.html", title=title, data={"view": "stores"}, inline=inline, source=svc.store.uri,
                            error=str(exc), status=422, stores=[], chart=None, **context)
    flagged = {h.store_id for h in health if h.abnormal}
    chart = bar_chart([(h.store_id, h.daily_sales) for h in health], title="Estimated daily sales (units/day); abnormal stores in red",
                      hot=flagged)
    shown = [h for h in health if h.abnormal or not abnormal][:MAX_ROWS]
    return views.render("stores.html", title=title, data={"view": "stores"}, inline=inline, source=svc.store.uri,
                        stores=shown, total=len(health), flagged=len(flagged), chart=chart, **context)


def consumers_page(svc: ApiService, *, stage: str | None = None, segment: str | None = None, consumer: str | None = None,
                   period: str = "month", inline: bool = False) -> views.Page:
    title = "Consumer lifecycle (AARRR, RFM)"
    context = {"stage": stage, "segment": segment, "consumer": consumer, "period": period, "stages": STAGES,
               "segment_names": SEGMENT_NAMES}
    try:
        table = svc.cached(lambda: lifecycle(svc.store), "consumers")
        rows = svc.cached(lambda: stage_funnel(svc.store, period=period), "funnel", period)
        one = profile(svc.store, consumer) if consumer else None
    except (ValueError, ChannelgraphError) as exc:
        status = 404 if "not stored" in str(exc) else 422
        return views.render("consumers.html", title=title, data={"view": "consumers"}, inline=inline,
                            source=svc.store.uri, error=str(exc), status=status, consumers=[], funnel=None,
                            periods=None, segments=None, profile=None, **context)
    latest = rows[-1] if rows else {}
    periods = {stage_: bar_chart([(r["period"], r[stage_]) for r in rows], title=f"{stage_}: consumers at this stage or beyond",
                                 label_width=90, width=520, bar=12, ordered=True) for stage_ in STAGES}
    counts: dict[str, int] = {}
    for c in table:
        counts[c.segment] = counts.get(c.segment, 0) + 1
    chosen = [c for c in table if (stage is None or c.stage == stage) and (segment is None or c.segment == segment)]
    return views.render("consumers.html", title=title, data={"view": "consumers"}, inline=inline, source=svc.store.uri,
                        consumers=chosen[:MAX_ROWS], total=len(chosen),
                        funnel=funnel({s: latest.get(s, 0) for s in STAGES},
                                      title=f"Funnel as of {latest.get('as_of', '-')}"),
                        periods=periods, segments=bar_chart(sorted(counts.items()), title="Consumers per RFM segment"),
                        profile=one, **context)


def rebates_page(svc: ApiService, *, policy: Policy | None, month: str | None = None, inline: bool = False) -> views.Page:
    title = "Rebates (BbC 关联返利; 窜货不返利)"
    if policy is None:
        return views.render("rebates.html", title=title, data={"view": "rebates"}, inline=inline, source=svc.store.uri,
                            error="no rebate policy is configured (set CHANNELGRAPH_REBATE_POLICY to a policy file, "
                                  "e.g. docs/policy.example.toml)", status=404, report=None, chart=None, month=month)
    try:
        report = svc.cached(lambda: rebates(svc.store, policy=policy, k=svc.k, month=month), "rebates", month, repr(policy))
    except (ValueError, ChannelgraphError) as exc:
        return views.render("rebates.html", title=title, data={"view": "rebates"}, inline=inline, source=svc.store.uri,
                            error=str(exc), status=422, report=None, chart=None, month=month)
    by_party: dict[str, float] = {}
    for t in report.totals:
        if t.party_id:
            by_party[f"{t.role}:{t.party_id}"] = by_party.get(f"{t.role}:{t.party_id}", 0.0) + t.owed
    withheld = {f"{line.role}:{line.party_id}" for line in report.withheld_lines}
    chart = bar_chart(list(by_party.items()), title=f"Owed per party ({report.currency}); parties with withheld rebates in red",
                      hot=withheld & set(by_party), label_width=190)
    return views.render("rebates.html", title=title, data={"view": "rebates"}, inline=inline, source=svc.store.uri,
                        report=report, totals=report.totals[:MAX_ROWS], withheld=report.withheld_lines[:MAX_ROWS],
                        chart=chart, month=month)


def regions_page(svc: ApiService, *, level: str = "province", period: str = "month", inline: bool = False) -> views.Page:
    title = "Regions (动销地图)"
    try:
        report = svc.cached(lambda: region_sell_through(svc.store, level=level, period=period, k=svc.k),
                            "regions", level, period)
    except (ValueError, ChannelgraphError) as exc:
        return views.render("regions.html", title=title, data={"view": "regions", "graphs": {}}, inline=inline,
                            source=svc.store.uri, error=str(exc), status=422, report=None, heat=None, latest=[],
                            level=level, levels=tuple(LEVELS), period=period)
    regions = svc.store.regions()
    names = {r: (n or r) for r, n in zip(regions.column("region_id").to_pylist(), regions.column("name").to_pylist())}
    heat = heat_map([(c.from_region or "?", c.to_region or "?", c.units) for c in report.matrix], names,
                    title=f"Diverted units, from {level} (rows) to {level} (columns)")
    latest_period = max((r.period for r in report.rows), default=None)
    latest = [r for r in report.rows if r.period == latest_period]
    graph = region_graph(report, names)
    return views.render("regions.html", title=title, data={"view": "regions", "graphs": {"flow": graph.as_dict()}},
                        inline=inline, source=svc.store.uri, report=report, heat=heat, latest=latest,
                        latest_period=latest_period, level=level, levels=tuple(LEVELS), period=period,
                        active=bar_chart([(f"{r.region_id} {names.get(r.region_id, '')}".strip(), 100 * (r.active_ratio or 0))
                                          for r in latest], title=f"Active-store ratio (动销率) in {latest_period}", unit="%",
                                         label_width=220))


def demo_policy(settings: Settings) -> Policy | None:
    """The configured rebate policy, else the example policy of a source checkout, else None."""
    path = settings.rebate_policy or EXAMPLE_POLICY
    return load_policy(path) if Path(path).exists() else None


def write_analytics_views(svc: ApiService, out_dir: Path, *, policy: Policy | None = None,
                          as_of: datetime | None = None, peer_level: str = "province") -> list[Path]:
    """Write stores.html (store health as of `as_of`, peers by `peer_level`), consumers.html,
    rebates.html (when a policy is given) and regions.html of `svc`'s store as standalone
    files into `out_dir`; returns their paths."""
    pages = {"stores.html": stores_page(svc, as_of=as_of, peer_level=peer_level, inline=True),
             "consumers.html": consumers_page(svc, inline=True),
             "regions.html": regions_page(svc, inline=True)}
    if policy is not None:
        pages["rebates.html"] = rebates_page(svc, policy=policy, inline=True)
    return [views.write_page(page, Path(out_dir) / name) for name, page in pages.items()]
