"""CLI commands `stores`, `consumers`, `rebates` and `regions` (DOMAIN.md §5), registered
on the `channelgraph` app by `api.cli`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from api.cli import Format, FormatOpt, Neo4jOpt, StoreOpt, emit, fields, opened, parse_time, stderr
from graph.errors import ChannelgraphError

TABLE_COLUMNS = ("store_id", "region_id", "sell_in", "sell_out", "daily_sales", "stock", "days_of_cover", "flags")
AsOfOpt = Annotated[str | None, typer.Option("--as-of", help="Analyse as known at this ISO 8601 time [default: the latest event].")]
ConsumersAsOfOpt = Annotated[str | None, typer.Option(
    "--as-of", help="Analyse as known at this ISO 8601 time [default: the latest purchase or referral].")]


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Bad option values (ValueError from a query) become one-line errors."""
    try:
        yield
    except ValueError as exc:
        raise ChannelgraphError(str(exc)) from exc


def stores(
    region: Annotated[str | None, typer.Option(help="Only stores registered in this region or below it.")] = None,
    abnormal: Annotated[bool, typer.Option("--abnormal", help="Only stores flagged abnormal.")] = False,
    window: Annotated[int, typer.Option(help="Trailing window in days (a multiple of 7).")] = 28,
    peer_level: Annotated[str, typer.Option(help="Peers are the stores of the same region at this level: country, province, city or district.")] = "province",
    as_of: AsOfOpt = None,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Store (b) health: sell-in, sell-out, stock, days of cover, next purchase, abnormal flags."""
    from queries.stores import StoreHealth, store_health

    with opened(store, neo4j) as (handle, settings), _clear_errors():
        health = store_health(handle, region=region, abnormal_only=abnormal, as_of=parse_time(as_of, "--as-of"), window_days=window,
                              peer_level=peer_level, k=settings.k)
    data = [h.model_dump() for h in health]
    shown = TABLE_COLUMNS if format is Format.table else fields(StoreHealth)
    rows = [{**{k: h[k] for k in shown if k != "flags"}, "flags": "; ".join(f["reason"] for f in h["flags"])}
            for h in data]
    emit(data, format, rows=rows, title=f"{len(data)} stores ({sum(h.abnormal for h in health)} abnormal)", columns=shown)


def consumers(
    stage: Annotated[str | None, typer.Option(help="Only this AARRR stage: acquired, activated, retained, revenue, related, referral.")] = None,
    segment: Annotated[str | None, typer.Option(help="Only this RFM segment: champions, loyal, promising, at_risk, hibernating, lost, prospect.")] = None,
    profile: Annotated[str | None, typer.Option(help="The 360° profile of this consumer instead.")] = None,
    funnel: Annotated[str | None, typer.Option(help="Stage counts at the end of each month or week instead.")] = None,
    as_of: ConsumersAsOfOpt = None,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Consumer lifecycle: AARRR stage and next action, RFM scores and segment."""
    from queries import consumers as lifecycle

    if profile is not None and funnel is not None:
        raise ChannelgraphError("give --profile or --funnel, not both")
    if (profile is not None or funnel is not None) and (stage or segment):
        raise ChannelgraphError("--stage and --segment filter the list of consumers: not with --profile or --funnel")
    with opened(store, neo4j) as (handle, _), _clear_errors():
        if profile is not None:
            one = lifecycle.profile(handle, profile)
            data = one.model_dump()
            rows, columns = one.purchases, lifecycle.PURCHASE_COLUMNS
            title = f"{profile}: {one.lifecycle.stage}, {one.lifecycle.segment}; tags {', '.join(one.tags)}"
        elif funnel is not None:
            data = rows = lifecycle.stage_funnel(handle, period=funnel, as_of=parse_time(as_of, "--as-of"))
            columns, title = lifecycle.FUNNEL_COLUMNS, f"consumers per stage, by {funnel}"
        else:
            data = rows = [c.model_dump() for c in lifecycle.lifecycle(handle, stage=stage, segment=segment, as_of=parse_time(as_of, "--as-of"))]
            columns, title = fields(lifecycle.ConsumerLifecycle), f"{len(data)} consumers"
    emit(data, format, rows=rows, title=title, columns=columns)


def rebates(
    policy: Annotated[Path, typer.Option(help="Rebate policy (TOML): amount per scan per role, per SKU; see docs/policy.example.toml.")],
    month: Annotated[str | None, typer.Option(help="Only scans of this month (YYYY-MM).")] = None,
    lines: Annotated[bool, typer.Option("--lines", help="List every rebate line (one per scan and role) instead of totals.")] = False,
    as_of: AsOfOpt = None,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """BbC rebates per consumer scan for store, distributor and salesperson; withheld for diverted units."""
    from queries.rebates import RebateLine, RebateTotal, load_policy
    from queries.rebates import rebates as rebate_report

    rules = load_policy(policy)
    with opened(store, neo4j) as (handle, settings), _clear_errors():
        report = rebate_report(handle, policy=rules, k=settings.k, as_of=parse_time(as_of, "--as-of"), month=month, lines=lines)
    data = report.model_dump()
    rows = data["lines"] if lines else data["totals"]
    emit(data, format, rows=rows, columns=fields(RebateLine if lines else RebateTotal), title=(f"rebates ({report.currency}): owed {report.owed:,.2f}, withheld {report.withheld:,.2f} "
                                         f"({len(report.withheld_lines)} lines), unassigned {report.unassigned:,.2f}; "
                                         f"{report.scans} scans, {report.no_store} without a store, {report.not_consumer} not by a consumer"))
    if report.unscanned_skus:
        stderr.print(f"warning: no consumer scan in the store has the SKU(s) of the policy's [sku.{', sku.'.join(report.unscanned_skus)}]"
                     " tables (misspelt?)", soft_wrap=True, markup=False)


def regions(
    level: Annotated[str, typer.Option(help="country, province, city or district.")] = "province",
    period: Annotated[str, typer.Option(help="month, week or all.")] = "month",
    matrix: Annotated[bool, typer.Option("--matrix", help="The region-to-region diversion matrix instead.")] = False,
    as_of: AsOfOpt = None,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Regional sell-through (动销地图): units in, opened, scanned, active-store ratio, diversions in and out."""
    from queries.regions import DiversionCell, RegionPeriod, region_sell_through

    with opened(store, neo4j) as (handle, settings), _clear_errors():
        report = region_sell_through(handle, level=level, period=period, k=settings.k, as_of=parse_time(as_of, "--as-of"))
    data = report.model_dump()
    rows = data["matrix"] if matrix else data["rows"]
    emit(rows if matrix else data, format, rows=rows, columns=fields(DiversionCell if matrix else RegionPeriod), title=f"diverted units between regions ({level})" if matrix else f"sell-through by {level} and {period}")


def register(app: typer.Typer) -> None:
    for command in (stores, consumers, rebates, regions):
        app.command()(command)
