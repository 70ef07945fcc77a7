"""`channelgraph viz trace|diversions|influencers|network`: a browser view as one HTML file.

The file is standalone (vis-network and the styles inline): it opens offline, from disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from api import views
from api.cli import Neo4jOpt, StoreOpt, opened, parse_time, stderr
from api.service import ApiService, DiversionFilters
from graph.errors import ChannelgraphError

viz_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")]
KOpt = Annotated[int | None, typer.Option(help="Consumer scans per case that confirm a suspected diversion.")]
Severity = Annotated[str | None, typer.Option(help="Only confirmed or only suspected findings.")]
Responsible = Annotated[str | None, typer.Option(help="Only findings of this responsible distributor.")]
Sku = Annotated[str | None, typer.Option(help="Only units of this SKU.")]
Batch = Annotated[str | None, typer.Option(help="Only units of this batch.")]
Since = Annotated[str | None, typer.Option(help="Only crossings at or after this ISO 8601 date or time.")]
Until = Annotated[str | None, typer.Option(help="Only crossings at or before this ISO 8601 date or time (a date: the whole day).")]
Region = Annotated[str | None, typer.Option(help="Only the flow into, out of and inside this region (and the regions in it).")]


def _write(page: views.Page, out: Path) -> None:
    if page.error:
        raise ChannelgraphError(page.error)
    try:
        views.write_page(page, out)
    except OSError as exc:
        raise ChannelgraphError(f"--out {out}: {exc.strerror or exc}") from exc
    stderr.print(f"wrote {out}")


@viz_app.command()
def trace(code: Annotated[str, typer.Argument(help="A pallet, case, box or unit code.")],
          out: OutOpt = Path("trace.html"), k: KOpt = None, store: StoreOpt = None, neo4j: Neo4jOpt = None) -> None:
    """The custody graph of a code, the crossing hop in red."""
    with opened(store, neo4j, k=k) as (handle, settings):
        _write(views.trace_page(ApiService(handle, k=settings.k), code, inline=True), out)


@viz_app.command()
def diversions(out: OutOpt = Path("diversions.html"), severity: Severity = None, responsible: Responsible = None,
               region: Annotated[str | None, typer.Option(help="Crossings into this region or one inside it.")] = None,
               sku: Sku = None, batch: Batch = None, since: Since = None, until: Until = None, k: KOpt = None,
               store: StoreOpt = None, neo4j: Neo4jOpt = None) -> None:
    """The findings (sortable, filterable, each with its path) and the territory-to-region flow."""
    try:
        filters = DiversionFilters(severity=severity, responsible=responsible, region=region, sku=sku, batch=batch,
                                   since=parse_time(since, "--since"), until=parse_time(until, "--until", end_of_day=True))
    except ValueError as exc:
        raise ChannelgraphError(str(exc)) from exc
    with opened(store, neo4j, k=k) as (handle, settings):
        _write(views.diversions_page(ApiService(handle, k=settings.k), filters, inline=True), out)


@viz_app.command()
def influencers(out: OutOpt = Path("influencers.html"),
                by: Annotated[str, typer.Option(help="influence, cascade_size, cascade_depth, direct, converted or revenue.")] = "influence",
                top: Annotated[int, typer.Option(min=1, help="How many referrers to rank.")] = 20,
                percent: Annotated[float | None, typer.Option(help="Rank the top P% of referrers instead of --top.")] = None,
                user: Annotated[str | None, typer.Option(help="Whose cascade to show first [default: the top one].")] = None,
                store: StoreOpt = None, neo4j: Neo4jOpt = None) -> None:
    """The super-user ranking and the cascade trees of the top users."""
    with opened(store, neo4j) as (handle, settings):
        try:
            page = views.influencers_page(ApiService(handle, k=settings.k), by=by, top=top, percent=percent, user=user, inline=True)
        except ValueError as exc:
            raise ChannelgraphError(str(exc)) from exc
        _write(page, out)


@viz_app.command()
def network(out: OutOpt = Path("network.html"), region: Region = None, sku: Sku = None, batch: Batch = None,
            store: StoreOpt = None, neo4j: Neo4jOpt = None) -> None:
    """The aggregated F -> B -> b -> C flow of a region, SKU or batch (all units if none)."""
    with opened(store, neo4j) as (handle, settings):
        _write(views.network_page(ApiService(handle, k=settings.k), region=region, sku=sku, batch=batch, inline=True), out)
