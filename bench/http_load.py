"""HTTP load test: N concurrent clients for S seconds against `channelgraph serve` on loopback.

    .venv/bin/pip install -e '.[bench]'                                   # the aiohttp client
    .venv/bin/python -m bench.http_load                                   # 50 clients x 30 s, scale 1, embedded
    .venv/bin/python -m bench.http_load --clients 100 --seconds 60 --neo4j bolt://127.0.0.1:7687

Generates (or reuses) a scenario under bench/.data, loads it into a fresh embedded store (and
into the Neo4j at --neo4j, which it does not wipe: loads are idempotent), starts the server in a
subprocess and runs each endpoint in turn: `trace` asks for units drawn from a working set
of --codes random unit codes (a code's first request computes its trace, later ones hit the
server's cache; both are reported), `trace-cold` never asks for the same code twice (every
request runs the trace query), `diversions` pages through the findings 50 at a time with and
without a severity filter (judged once per store version, before timing starts).
Reports requests/s, p50/p99 latency and errors per endpoint and store, and replaces its own
section of bench/RESULTS.md (other sections stay).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from bench.run import DATA, RESULTS, ROOT, dataset, machine

SECTION = "## HTTP load (bench/http_load.py)"
TARGET = "Target (issue 5), embedded store: trace >= 1,000 requests/s with p99 < 50 ms at 50 clients; zero errors."


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    cold: list[float] = field(default_factory=list)  # first request of a trace code
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(store_args: list[str]) -> Iterator[tuple[str, int]]:
    """`channelgraph serve` in a subprocess on a free loopback port; yields its base URL and pid."""
    port = free_port()
    command = [sys.executable, "-c", "import sys; from api.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", *store_args, "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


async def hammer(base: str, make_url: Callable[[random.Random], str], *, clients: int, seconds: float,
                 cold_prefix: str | None = None) -> tuple[Tally, float]:
    """`clients` coroutines, each on its own keep-alive connection, requesting `make_url(rng)`
    back to back for `seconds`. (aiohttp: httpx's async pool costs 3-11 ms of client CPU per
    request at this concurrency, aiohttp about 0.4 ms, so the client does not set the pace.)"""
    import aiohttp

    tally = Tally()
    seen: set[str] = set()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        deadline = time.perf_counter() + seconds

        async def one(worker: int) -> None:
            rng = random.Random(worker)
            while time.perf_counter() < deadline:
                try:
                    url = make_url(rng)
                except StopIteration:  # a finite list of URLs is done
                    return
                first = cold_prefix is not None and url not in seen
                seen.add(url)
                started = time.perf_counter()
                try:
                    async with client.get(url) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
                elapsed = time.perf_counter() - started
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                if status != 200:
                    tally.errors += 1
                else:
                    (tally.cold if first else tally.latencies).append(elapsed)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        return tally, time.perf_counter() - started


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(np.array(values) * 1000, q):.1f}" if values else ""


def run_store(label: str, store_args: list[str], codes: list[str], others: list[str], pages: int,
              args: argparse.Namespace) -> list[dict]:
    rows = []
    with server(store_args) as (base, pid):
        started = time.perf_counter()
        total = httpx.get(f"{base}/api/diversions?limit=1", timeout=600).json()["total"]
        judge_s = time.perf_counter() - started
        page_count = max(1, min(pages, -(-total // 50)))
        fresh = iter(others)
        endpoints: dict[str, Callable[[random.Random], str]] = {
            "trace": lambda rng: f"/api/trace/{rng.choice(codes)}",
            "trace-cold": lambda rng: f"/api/trace/{next(fresh)}",
            "diversions": lambda rng: (f"/api/diversions?limit=50&offset={50 * rng.randrange(page_count)}"
                                       + rng.choice(("", "&severity=confirmed", "&severity=suspected"))),
        }
        for name in args.endpoints.split(","):
            warm = None
            if name == "trace":  # compute the working set's traces first (reported as cold), then time cached ones
                first = iter(codes)
                warm, _ = asyncio.run(hammer(base, lambda rng: f"/api/trace/{next(first)}", clients=args.clients,
                                             seconds=3600, cold_prefix="/api/trace/"))
            cpu_before = cpu_seconds(pid)
            tally, wall = asyncio.run(hammer(base, endpoints[name], clients=args.clients, seconds=args.seconds,
                                             cold_prefix="/api/trace/" if name == "trace-cold" else None))
            if warm is not None:
                tally.cold, tally.errors = warm.cold, tally.errors + warm.errors
            server_cpu = cpu_seconds(pid) - cpu_before
            done = len(tally.latencies) + (len(tally.cold) if warm is None else 0)
            everything = tally.latencies + (tally.cold if warm is None else [])
            rows.append({
                "store": label, "endpoint": name, "clients": args.clients, "seconds": round(wall, 1),
                "requests": done + tally.errors, "requests_per_s": round((done + tally.errors) / wall),
                "p50_ms": ms(everything, 50), "p99_ms": ms(everything, 99), "errors": tally.errors,
                "server_cpu_ms_per_request": round(1000 * server_cpu / max(done + tally.errors, 1), 2),
                "cold_requests": len(tally.cold) or "", "cold_p50_ms": ms(tally.cold, 50), "cold_p99_ms": ms(tally.cold, 99),
                "note": {"trace": f"a working set of {len(codes)} codes, computed first (cold columns)",
                         "trace-cold": "every request a new code",
                         "diversions": f"pages of 50 of {total} findings (judged once, {judge_s:.1f} s)"}[name],
            })
            print(rows[-1], file=sys.stderr)
    return rows


def write_section(rows: list[dict], context: str) -> None:
    """Replace (or append) this benchmark's section of bench/RESULTS.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    columns = list(rows[0])
    lines = [f"{SECTION} — {stamp}", "", f"Machine: {machine()}", "", context, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
             *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows), "", TARGET, ""]
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}.*?(?=^## |\Z)", re.S | re.M)
    section = "\n".join(lines) + "\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    print(section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="scenario scale (1 = ~10k scans)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30, help="duration per endpoint and store")
    parser.add_argument("--endpoints", default="trace,trace-cold,diversions",
                        help="comma-separated: trace (a working set of codes), trace-cold (a new code each time), diversions")
    parser.add_argument("--codes", type=int, default=200, help="working set of unit codes the trace clients ask for")
    parser.add_argument("--pages", type=int, default=20, help="finding pages (of 50) the diversion clients ask for")
    parser.add_argument("--neo4j", help="also load into and serve from this Neo4j (not wiped)")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit("bench.http_load needs aiohttp: .venv/bin/pip install -e '.[bench]'") from None

    from graph.embedded import EmbeddedStore
    from graph.settings import Settings
    from graph.store import open_store
    from loaders.ingest import load_dataset

    load_before = os.getloadavg()[0]
    folder = dataset(args.scale)
    store_path = DATA / f"http-store-scale{args.scale}"
    subprocess.run(["rm", "-rf", str(store_path)], check=True)
    load_dataset(EmbeddedStore(store_path), folder, rejects_dir=store_path / "rejects")
    units = EmbeddedStore(store_path).units_where()
    shuffled = random.Random(1).sample(units, len(units))
    codes, others = shuffled[:args.codes], shuffled[args.codes:]
    targets = [("embedded", ["--store", str(store_path)])]
    if args.neo4j:
        neo4j = open_store(Settings(neo4j=args.neo4j))
        try:
            load_dataset(neo4j, folder, rejects_dir=DATA / "http-neo4j-rejects")
        finally:
            neo4j.close()
        targets.append(("neo4j", ["--neo4j", args.neo4j]))
    rows = [row for label, store_args in targets for row in run_store(label, store_args, codes, others, args.pages, args)]
    context = (f"Scenario scale {args.scale} ({len(units):,} units); uvicorn (1 process) and the aiohttp clients "
               f"(1 process) share the machine. Each endpoint runs {args.seconds:g} s at {args.clients} clients; "
               "latency is measured by the client. `cold` = a trace computed by the request (not cached yet). "
               "`server_cpu_ms_per_request` (the server process's CPU time / requests) depends little on other load. "
               f"Machine load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
               "(other engineers' jobs share the 2 cores).")
    if args.no_write:
        print(rows)
    else:
        write_section(rows, context)


if __name__ == "__main__":
    main()
