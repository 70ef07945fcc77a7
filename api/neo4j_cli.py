"""`channelgraph neo4j start|stop|status`: the local Neo4j 5.26 server for development and tests.

Each command prints one line on stdout; on failure it prints one line on stderr (no traceback)
and exits with status 1. `status` exits 0 when the server is ready, 3 when it is not running
and 4 when it runs but does not answer (so scripts can test it).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from graph import neo4j_server
from graph.errors import ChannelgraphError

neo4j_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                        help="Run the local Neo4j 5.26 server (loopback only, no auth) under --home.")

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Folder for the pid file, log and databases [default <repo>/.neo4j].",
                                              show_default=False)]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="Bolt port on 127.0.0.1.")]


def _fail(exc: Exception) -> typer.Exit:
    text = str(exc).strip()
    print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
    return typer.Exit(1)


@neo4j_app.command()
def start(home: HomeOpt = None, port: PortOpt = neo4j_server.DEFAULT_PORT,
          timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for Bolt to answer.")] = 120) -> None:
    """Build the launcher if needed, start Neo4j in the background and wait until it answers."""
    try:
        state = neo4j_server.start(home=home, port=port, timeout=timeout)
    except (ChannelgraphError, OSError) as exc:
        raise _fail(exc) from None
    print(state.describe())


@neo4j_app.command()
def stop(home: HomeOpt = None) -> None:
    """Stop Neo4j cleanly (SIGTERM, SIGKILL after a minute)."""
    try:
        stopped = neo4j_server.stop(home=home)
    except (ChannelgraphError, OSError) as exc:
        raise _fail(exc) from None
    print("Neo4j stopped" if stopped else "Neo4j was not running")


@neo4j_app.command()
def status(home: HomeOpt = None, port: PortOpt = neo4j_server.DEFAULT_PORT) -> None:
    """Say whether Neo4j runs and answers; exit 0 ready, 3 not running, 4 not answering."""
    try:
        state = neo4j_server.status(home=home, port=port)
    except (ChannelgraphError, OSError) as exc:
        raise _fail(exc) from None
    print(state.describe())
    if not state.ready:
        raise typer.Exit(4 if state.running else 3)
