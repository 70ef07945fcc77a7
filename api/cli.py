"""The `channelgraph` command line.

Every command takes `--store PATH` or `--neo4j URI` and `--format table|json|csv`. With
json or csv, stdout carries that document alone; progress and logs go to stderr. Exit
status 0 on success; on failure a one-line error on stderr and a non-zero status.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graph.errors import ChannelgraphError
from graph.settings import Settings
from graph.store import Store, open_store

if TYPE_CHECKING:  # the query modules are imported by the commands that use them (a fast start)
    from queries.diversion import DiversionSummary
    from queries.influence import ReferralStats

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Graph analytics for brand channels: trace codes, find cross-region diversion (窜货), rank super users.")
stderr = Console(stderr=True)
log = logging.getLogger("channelgraph")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


StoreOpt = Annotated[Path | None, typer.Option("--store", help="Embedded store folder [env CHANNELGRAPH_STORE; default ./channelgraph-data].", show_default=False)]
Neo4jOpt = Annotated[str | None, typer.Option("--neo4j", help="Neo4j URI (bolt://, neo4j://, neo4j+s://) [env CHANNELGRAPH_NEO4J]; user/password from NEO4J_USER/NEO4J_PASSWORD.", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output: table for people, json or csv for programs.")]


def settings_from(store: Path | None, neo4j: str | None, **overrides: Any) -> Settings:
    """Settings from the environment, overridden by explicit command-line options."""
    given = {k: v for k, v in {"store": store, "neo4j": neo4j, **overrides}.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ChannelgraphError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc


@contextmanager
def opened(store: Path | None, neo4j: str | None, *, writing: bool = False,
           **overrides: Any) -> Iterator[tuple[Store, Settings]]:
    """The store the options name, with the settings. Unless `writing`, an embedded store
    folder that holds no store is an error (a mistyped --store must not look like an
    empty answer)."""
    settings = settings_from(store, neo4j, **overrides)
    handle = open_store(settings)
    try:
        missing = None if writing else _missing_store(handle, settings)
        if missing:
            raise ChannelgraphError(f"{missing}; load a dataset into it first: channelgraph load DATASET --store {settings.store}")
        yield handle, settings
    finally:
        handle.close()


def _missing_store(handle: Store, settings: Settings) -> str | None:
    """`no store at PATH (the folder ...)` when the embedded store's folder holds no store yet."""
    if settings.neo4j or getattr(handle, "version", None) is not None:
        return None
    return f"no store at {settings.store} (the folder {'holds no store' if settings.store.is_dir() else 'does not exist'})"


@contextmanager
def progress_bar() -> Iterator[Any]:
    """A progress callback `(stage, done, total)` drawing on stderr when it is a terminal."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task("starting", total=1)

        def update(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=max(total, 1))

        yield update


PIPED_WIDTH = 10_000  # characters a table line may take when stdout is a file or a pipe (no terminal to fit)


def emit(data: Any, fmt: Format, *, rows: Sequence[dict] | None = None, title: str | None = None,
         columns: Sequence[str] | None = None) -> None:
    """Print `data` as JSON, or `rows` as CSV or a table (rows default to `data`).
    `columns`: the names of the rows' fields, for the CSV header when there are no rows."""
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
        return
    rows = list(rows if rows is not None else data)
    if fmt is Format.csv:
        sys.stdout.write(to_csv(rows, columns))
        return
    console = Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)  # piped: whole rows, one a line
    if not rows:
        console.print(f"{title or 'result'}: nothing found")
        return
    table = Table(title=title, show_lines=False)
    columns = list(rows[0].keys())
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as CSV (the first row's fields as columns; `columns` when there are no rows);
    nested values become JSON text."""
    names = list(rows[0].keys()) if rows else list(columns or ())
    if not names:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return out.getvalue()


def fields(model: type[BaseModel], *, without: Sequence[str] = ()) -> list[str]:
    """A model's field names in order, for `emit(columns=...)`."""
    return [name for name in model.model_fields if name not in without]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


# ---------------------------------------------------------------- commands


@app.command()
def load(
    dataset: Annotated[Path, typer.Argument(help="A dataset folder (or file): canonical tables and/or EPCIS documents.")],
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
    rejects: Annotated[Path | None, typer.Option(help="Folder for reject records [default: STORE/rejects].")] = None,
) -> None:
    """Validate and load a dataset; bad rows go to a rejects file with their reason."""
    from loaders.ingest import load_dataset

    with opened(store, neo4j, writing=True) as (handle, settings), progress_bar() as progress:
        rejects_dir = rejects or (settings.store / "rejects" if not settings.neo4j else Path("channelgraph-rejects"))
        report = load_dataset(handle, dataset, rejects_dir=rejects_dir, progress=progress)
    data = report.as_dict()
    rows = [{"table": t, "accepted": report.accepted[t], "rejected": report.rejected[t],
             "duplicates": report.duplicates[t]} for t in report.accepted]
    emit(data, format, rows=rows, title=f"loaded {dataset} into {handle.uri}")
    if format is Format.table:
        stderr.print(f"implicit consumers registered: {report.implicit_consumers}")
        for skipped in report.skipped:
            stderr.print(f"skipped {skipped.path}: {skipped.reason}", soft_wrap=True, markup=False)  # a file name is no markup
    if format is not Format.json and report.rejects_path:  # JSON names it; CSV rows have no place for it
        stderr.print(f"rejected rows and reasons: {report.rejects_path}")


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the dataset and answers.json into.")],
    scale: Annotated[float, typer.Option(help="1 = demo size (~10k scans); 1000 = ~10M scans.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    table_format: Annotated[str, typer.Option("--table-format", help="csv, jsonl, parquet or mixed.")] = "csv",
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Write a realistic scenario dataset with its known answers (answers.json)."""
    from loaders.generate import generate_dataset

    if table_format not in ("csv", "jsonl", "parquet", "mixed"):
        raise ChannelgraphError(f"--table-format {table_format!r}: expected csv, jsonl, parquet or mixed")
    if not 0 < scale < float("inf"):
        raise ChannelgraphError(f"--scale {scale:g}: expected a number above 0 (1 = ~10k scans)")
    try:
        summary = generate_dataset(out_dir, scale=scale, seed=seed, fmt=table_format)
    except OSError as exc:
        raise ChannelgraphError(f"{exc.filename or out_dir}: {exc.strerror or exc}") from exc
    rows = [{"table": t, "rows": n} for t, n in summary.get("rows", {}).items()]
    emit(summary, format, rows=rows, title=f"generated {out_dir} (scale {scale}, seed {seed})")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where the dataset, store and HTML views go.")] = Path("demo-output"),
    scale: Annotated[float, typer.Option(help="Scenario size: 1 = ~10k scans; 1000 = ~10M scans.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed of the scenario.")] = 7,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Generate a dataset, load it into the embedded store, run the analyses, write views."""
    from api.demo import run_demo

    run_demo(out_dir=out_dir, scale=scale, seed=seed,
             settings=settings_from(store or out_dir / "store", neo4j), fmt=format.value)


@app.command("trace")
def trace_command(
    code: Annotated[str | None, typer.Argument(help="A pallet, case, box or unit code.")] = None,
    batch: Annotated[str | None, typer.Option(help="Aggregated flow of every unit of this batch.")] = None,
    sku: Annotated[str | None, typer.Option(help="Aggregated flow of every unit of this SKU.")] = None,
    k: Annotated[int | None, typer.Option(help="Consumer scans per case that confirm a suspected diversion.")] = None,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Where a code went (custody path F -> B -> b -> C), or the flow of a batch/SKU."""
    from queries.diversion import Hop
    from queries.trace import FlowEdge, flow, trace

    if (code is None) == (batch is None and sku is None):
        raise ChannelgraphError("give a CODE, or --batch and/or --sku (not both)")
    with opened(store, neo4j, k=k) as (handle, settings):
        if code is not None:
            result = trace(handle, code, k=settings.k)
            data = result.model_dump()
            rows, columns = [hop.model_dump() for hop in result.path], fields(Hop)
            title = (f"{result.level} {code} (sku {result.sku}, batch {result.batch}); assigned to "
                     f"{result.assigned_distributor or 'nobody (untracked)'}"
                     + (f"; DIVERTED ({result.diversion.severity})" if result.diversion else ""))
        else:
            edges = flow(handle, batch=batch, sku=sku)
            data = [e.model_dump() for e in edges]
            rows, columns = data, fields(FlowEdge)
            title = f"flow of {'batch ' + batch if batch else ''} {'sku ' + sku if sku else ''}".strip()
    emit(data, format, rows=rows, title=title, columns=columns)


@app.command()
def diversions(
    k: Annotated[int | None, typer.Option(help="Consumer scans per case, in one outside region, that confirm a suspected diversion [default 3].")] = None,
    severity: Annotated[str | None, typer.Option(help="confirmed or suspected.")] = None,
    since: Annotated[str | None, typer.Option(help="Only crossings at or after this ISO 8601 time.")] = None,
    by: Annotated[str | None, typer.Option(help="Group: responsible, region-pair, case, batch, sku or month.")] = None,
    untracked: Annotated[bool, typer.Option("--untracked", help="List the untracked units instead (no factory shipment to a distributor: never judged).")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the document to this file instead of stdout.")] = None,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Cross-region diversion (窜货): one finding per diverted unit, grouped views, or the
    untracked units; the table ends with the counts of units judged, diverted and untracked."""
    from queries.diversion import CSV_COLUMNS, DiversionFinding, UntrackedUnit, diversion_view, finding_csv_row, judge_store, view_columns

    if untracked and (by or severity or since):
        raise ChannelgraphError("--untracked lists units that are never judged: it takes no --by, --severity or --since")
    since_ts = parse_time(since, "--since")
    with opened(store, neo4j, k=k) as (handle, settings):
        try:
            verdicts = judge_store(handle, k=settings.k, severity=severity, since=since_ts)
            view = diversion_view(verdicts.findings.models(), by) if by else None
        except ValueError as exc:
            raise ChannelgraphError(str(exc)) from exc
        footnote = _judged_line(verdicts.summary(handle.unit_count())) if format is Format.table and out is None else None
    if untracked:
        data = [u.model_dump() for u in verdicts.untracked_units()]
        rows, columns, title = data, fields(UntrackedUnit), f"{len(data)} untracked units (never judged)"
    elif view is not None:
        data, rows, columns, title = view, view, view_columns(by), f"diversions by {by}"
    else:
        findings = verdicts.findings.models()
        data = [f.model_dump() for f in findings]
        rows, columns, title = None, fields(DiversionFinding, without=("path",)), f"{len(data)} diverted units"
        if format is Format.csv:  # the rows of GET /api/diversions.csv
            rows, columns = [finding_csv_row(f) for f in findings], list(CSV_COLUMNS)
        elif format is Format.table:
            rows = [{k: v for k, v in f.items() if k != "path"} for f in data]
    if out is not None:
        with _redirect_stdout(out):
            emit(data, format if format is not Format.table else Format.json, rows=rows, title=title, columns=columns)
        stderr.print(f"wrote {title} to {out}")
        return
    emit(data, format, rows=rows, title=title, columns=columns)
    if footnote:
        Console().print(footnote, soft_wrap=True)


def _judged_line(summary: DiversionSummary) -> str:
    return (f"{summary.units:,} units: {summary.judged:,} judged, {summary.diverted:,} diverted "
            f"({summary.confirmed:,} confirmed, {summary.suspected:,} suspected); {summary.untracked:,} untracked "
            "(no factory shipment to a distributor: never judged; listed by --untracked)")


@app.command()
def influencers(
    top: Annotated[int | None, typer.Option(min=1, help="How many to list [default: 10].")] = None,
    percent: Annotated[float | None, typer.Option(help="List the top P% of referrers instead of --top.")] = None,
    by: Annotated[str | None, typer.Option(help="influence, cascade_size, cascade_depth, direct, converted or revenue [default: influence].")] = None,
    cascade: Annotated[str | None, typer.Option(help="Export the referral cascade of this party instead.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Count the referral rows instead: read, attributed, ignored by reason.")] = False,
    store: StoreOpt = None, neo4j: Neo4jOpt = None, format: FormatOpt = Format.table,
) -> None:
    """Super users (超级用户): referrers ranked by the cascades they bring in; the table ends
    with how many referrals were attributed and ignored."""
    from queries import influence

    if stats and cascade is not None:
        raise ChannelgraphError("give --stats or --cascade, not both")
    if (stats or cascade is not None) and (top, percent, by) != (None, None, None):
        raise ChannelgraphError("--top, --percent and --by rank the referrers: not with --stats or --cascade")
    top, by = top or 10, by or "influence"
    footnote = None
    with opened(store, neo4j) as (handle, _):
        try:
            if stats:
                counted = influence.referral_stats(handle)
                data, rows = counted.model_dump(), [  # named as the JSON document's keys
                    {"count_of": "referrals", "count": counted.referrals}, {"count_of": "attributed", "count": counted.attributed},
                    *({"count_of": f"ignored: {reason}", "count": n} for reason, n in counted.ignored.items())]
                columns, title = ["count_of", "count"], "referral rows and what attribution made of them"
            elif cascade is not None:
                data = rows = [n.model_dump() for n in influence.cascade(handle, cascade)]
                columns, title = fields(influence.CascadeNode), f"cascade of {cascade}: {len(data) - 1} members"
            else:
                attribution = influence.attribute(handle.referrals().to_pandas())
                ranking = influence.influencers(handle, top=top, percent=percent, by=by, attribution=attribution)
                data = rows = [i.model_dump() for i in ranking]
                columns, title = fields(influence.Influencer), f"top referrers by {by}"
                footnote = _attribution_line(attribution.stats()) if format is Format.table else None
        except ValueError as exc:
            raise ChannelgraphError(str(exc)) from exc
    emit(data, format, rows=rows, title=title, columns=columns)
    if footnote:
        Console().print(footnote, soft_wrap=True)


def _attribution_line(stats: ReferralStats) -> str:
    ignored = stats.ignored
    return (f"{stats.referrals:,} referrals: {stats.attributed:,} attributed, {sum(ignored.values()):,} ignored "
            f"({ignored['self']:,} self-referrals, {ignored['duplicate']:,} repeated pairs, {ignored['late']:,} of an "
            f"already attributed referee, {ignored['cycle']:,} closing a cycle); see --stats")


@app.command()
def serve(
    store: StoreOpt = None, neo4j: Neo4jOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on; loopback unless you mean to share it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: warning, info, debug.")] = "info",
) -> None:
    """Serve the HTTP API (/api; OpenAPI document at /openapi.json) and the browser views (/views).
    Read-only unless CHANNELGRAPH_API_KEY is set (then POST /api/datasets needs it)."""
    import uvicorn

    from api.app import create_app

    settings = settings_from(store, neo4j)
    application = create_app(settings)
    missing = _missing_store(application.state.service.store, settings)
    if missing:  # it answers once a load puts a store there; a mistyped --store must not look like empty answers
        stderr.print(f"warning: {missing} yet: the answers are empty until a dataset is loaded into it", soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        stderr.print(f"warning: listening on {host}, reachable from other machines"
                     + ("" if settings.api_key else " (read-only: no API key set)"))
    stderr.print(f"channelgraph on http://{host}:{port}/ over {application.state.service.store.uri}", soft_wrap=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level)


def parse_time(value: str | None, option: str, *, end_of_day: bool = False) -> datetime | None:
    """The ISO 8601 date or time given to `option` (None when not given), read as the API
    and the pages read it (`api.params.parse_time`); an empty or bad one is an error naming
    the option (never an empty answer)."""
    from api import params

    try:
        return params.parse_time(value, option, end_of_day=end_of_day)
    except ValueError as exc:
        raise ChannelgraphError(str(exc)) from exc


@contextmanager
def _redirect_stdout(path: Path) -> Iterator[None]:
    try:
        handle = path.open("w", encoding="utf-8")
    except OSError as exc:
        raise ChannelgraphError(f"--out {path}: {exc.strerror or exc}") from exc
    previous, sys.stdout = sys.stdout, handle
    try:
        yield
    finally:
        sys.stdout = previous
        handle.close()


def _register_subcommands() -> None:
    from api.analytics_cli import register
    from api.export_cli import export_app
    from api.viz_cli import viz_app

    register(app)  # stores, consumers, rebates, regions
    app.add_typer(viz_app, name="viz", help="Write a browser view (trace, diversions, influencers, network) as one HTML file.")
    app.add_typer(export_app, name="export", help="Export evidence in industry formats (epcis: a finding as an EPCIS 2.0 document).")
    try:
        from api.neo4j_cli import neo4j_app
    except ImportError:  # pragma: no cover - the launcher module is optional in a broken checkout
        return
    app.add_typer(neo4j_app, name="neo4j", help="Run a local Neo4j 5.26 server (needs Java 17 and Maven).")


if __name__ != "__main__":  # under `python -m api.cli`, the importable module does it (see the end)
    _register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, never a traceback (set CHANNELGRAPH_DEBUG=1 for one)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("neo4j").setLevel(logging.CRITICAL)  # its retry notices and errors of connections that die
    # mid-read (several reads run at once): a failure is reported as one line
    try:
        app(args=argv, standalone_mode=False)
    except (typer.Exit, SystemExit) as exc:
        return int(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except typer.Abort:
        stderr.print("aborted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become one line
        import click

        # a usage error (recent typer raises those of the click it bundles: TyperExceptions)
        if isinstance(exc, (click.ClickException, getattr(typer, "TyperException", click.ClickException))):
            message = " ".join(exc.format_message().split())
            if message:  # none after the help that no arguments print
                print(f"channelgraph: error: {message}", file=sys.stderr)
            return exc.exit_code
        if os.environ.get("CHANNELGRAPH_DEBUG"):
            raise
        label = "error" if isinstance(exc, ChannelgraphError) else f"internal error ({type(exc).__name__})"
        print(f"channelgraph: {label}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # run the importable api.cli: the subcommand modules import that one back
    from api.cli import main as run

    sys.exit(run())
