"""`channelgraph export epcis CODE`: a diverted unit's evidence chain as an EPCIS 2.0 document."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from api.cli import Neo4jOpt, StoreOpt, opened, stderr
from graph.errors import ChannelgraphError

export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@export_app.command()
def epcis(code: Annotated[str, typer.Argument(help="A diverted unit code.")],
          out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the document here instead of stdout.")] = None,
          k: Annotated[int | None, typer.Option(help="Consumer scans per case that confirm a suspected diversion.")] = None,
          store: StoreOpt = None, neo4j: Neo4jOpt = None) -> None:
    """The diversion finding of CODE and its custody path as EPCIS 2.0 JSON-LD (GS1 identifiers
    as Digital Link URIs, channelgraph's own facts as cg: extensions)."""
    from loaders.epcis_export import finding_document
    from queries.trace import trace

    with opened(store, neo4j, k=k) as (handle, settings):
        result = trace(handle, code, k=settings.k)
    if result.diversion is None:
        raise ChannelgraphError(f"{code} has no diversion finding" + (" (untracked)" if result.untracked else ""))
    text = json.dumps(finding_document(result.diversion, result.ancestors), ensure_ascii=False, indent=2)
    if out is None:
        print(text)
        return
    try:
        out.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise ChannelgraphError(f"--out {out}: {exc.strerror or exc}") from exc
    stderr.print(f"wrote the evidence chain of {code} ({result.diversion.severity}) to {out}")
