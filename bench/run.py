"""Benchmarks of the embedded store, written to bench/RESULTS.md with the machine and date.

    .venv/bin/python -m bench.run                      # everything (scale 100 and 1000)
    .venv/bin/python -m bench.run --only load --scales 100
    .venv/bin/python -m bench.run --only neo4j-load,neo4j-queries --scales 10,100 --neo4j bolt://127.0.0.1:7687

Each measurement runs in a fresh Python process so peak memory (ru_maxrss) is its own.
Generated datasets are cached under bench/.data (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / ".data"
RESULTS = ROOT / "bench" / "RESULTS.md"
SEED = 1


# The floor of a query: reading a table's column files from disk (not memory-mapped).
READ_COLUMNS = """
import pyarrow as pa
def read_columns(folder):
    return [pa.ipc.open_file(pa.OSFile(str(path))).read_all() for path in sorted(folder.glob('*.arrow'))]
"""


def run_child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object as its last line.
    Adds the child's peak resident memory (MiB)."""
    prelude = "import json, resource, time, sys\n" + READ_COLUMNS
    epilogue = "\nresult['peak_rss_mib'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)\nprint(json.dumps(result))\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dataset(scale: int) -> Path:
    folder = DATA / f"scale{scale}-seed{SEED}"
    if not (folder / "answers.json").exists():
        print(f"generating scale {scale} ...", file=sys.stderr)
        run_child(f"""
            from pathlib import Path
            from loaders.generate import generate_dataset
            t = time.perf_counter()
            generate_dataset(Path({str(folder)!r}), scale={scale}, seed={SEED})
            result = {{'seconds': time.perf_counter() - t}}
        """)
    return folder


def store_of(scale: int) -> Path:
    return DATA / f"store-scale{scale}"


def bench_load(scale: int) -> dict:
    folder, store = dataset(scale), store_of(scale)
    subprocess.run(["rm", "-rf", str(store)], check=True)
    result = run_child(f"""
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from loaders.ingest import load_dataset
        t, cpu, kernel = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        report = load_dataset(EmbeddedStore(Path({str(store)!r})), Path({str(folder)!r}), rejects_dir=Path({str(store)!r}) / 'rejects')
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel
        rows = sum(report.accepted.values()) + sum(report.rejected.values()) + sum(report.duplicates.values())
        scans = report.accepted['scans'] + report.rejected['scans'] + report.duplicates['scans']
        result = {{'seconds': round(seconds, 2), 'cpu_s': round(cpu, 2), 'kernel_cpu_s': round(kernel, 2),
                   'scan_rows': scans, 'all_rows': rows,
                   'scan_rows_per_s': round(scans / seconds), 'all_rows_per_s': round(rows / seconds)}}
    """)
    result["bytes_per_scan_row"] = round(result["peak_rss_mib"] * 2**20 / result["scan_rows"])
    return result


def bench_diversion(scale: int) -> dict:
    store = store_of(scale)
    return run_child(f"""
        import numpy as np, pyarrow as pa
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from queries.diversion import detect_diversions
        path = Path({str(store)!r})
        version = path / (path / 'CURRENT').read_text().strip()
        t = time.perf_counter()
        scans = read_columns(version / 'scans')
        floor = time.perf_counter() - t
        del scans
        t, cpu = time.perf_counter(), time.process_time()
        findings = detect_diversions(EmbeddedStore(path))
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        t = time.perf_counter()
        findings.models()
        as_objects = time.perf_counter() - t
        answers = json.loads((Path({str(dataset(scale))!r}) / 'answers.json').read_text())
        want = {{d['code'] for d in answers['diversions']}}
        got = set(findings.table.column('code').to_pylist())
        result = {{'seconds': round(seconds, 2), 'cpu_s': round(cpu, 2), 'floor_read_scans_s': round(floor, 2),
                   'ratio_to_floor': round(seconds / floor, 1), 'as_objects_s': round(as_objects, 2), 'findings': len(findings),
                   'precision': round(len(got & want) / max(len(got), 1), 4), 'recall': round(len(got & want) / max(len(want), 1), 4)}}
    """)


def bench_trace(scale: int, samples: int = 2000) -> dict:
    store = store_of(scale)
    return run_child(f"""
        import numpy as np
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from queries.trace import trace
        t = time.perf_counter()
        store = EmbeddedStore(Path({str(store)!r}))
        codes = store.table('codes')
        opened = time.perf_counter() - t
        units = np.flatnonzero((codes.column('level').to_numpy(zero_copy_only=False) == 'unit'))
        rng = np.random.default_rng(0)
        picked = codes.column('code').take(rng.choice(units, {samples})).to_pylist()
        t, cpu = time.perf_counter(), time.process_time()
        trace(store, picked[0])  # the first call builds the store's indexes and judging context
        first, first_cpu = time.perf_counter() - t, time.process_time() - cpu
        times, cpus = [], []
        for code in picked:
            t, cpu = time.perf_counter(), time.process_time()
            trace(store, code)
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - cpu)
        ms, cpu_ms = np.array(times) * 1000, np.array(cpus) * 1000
        result = {{'open_ms': round(opened * 1000, 1), 'first_ms': round(first * 1000), 'first_cpu_ms': round(first_cpu * 1000),
                   'median_ms': round(float(np.median(ms)), 2), 'p95_ms': round(float(np.percentile(ms, 95)), 2),
                   'cpu_median_ms': round(float(np.median(cpu_ms)), 2), 'cpu_p95_ms': round(float(np.percentile(cpu_ms, 95)), 2),
                   'samples': {samples}}}
    """)


def bench_influence(edges: int = 1_000_000) -> dict:
    folder, store = DATA / f"referrals-{edges}", DATA / f"store-referrals-{edges}"
    if not (folder / "referrals.parquet").exists():
        run_child(f"""
            import numpy as np, pyarrow as pa, pyarrow.parquet as pq
            from pathlib import Path
            rng = np.random.default_rng(1)
            n = {edges}
            referee = np.arange(1, n + 1)
            referrer = (rng.random(n) ** 3 * referee).astype(np.int64)  # a forest with heavy roots
            ts = 1_700_000_000 + referee * 10
            folder = Path({str(folder)!r}); folder.mkdir(parents=True, exist_ok=True)
            ids = lambda a: pa.array(np.char.add('c', a.astype(str)))
            pq.write_table(pa.table({{'referrer_id': ids(referrer), 'referee_id': ids(referee),
                'ts': pa.array(ts * 1_000_000, pa.timestamp('us', tz='UTC')), 'channel': pa.array(['share'] * n)}}),
                folder / 'referrals.parquet')
            result = {{}}
        """)
    if not (store / "CURRENT").exists():
        run_child(f"""
            from pathlib import Path
            from graph.embedded import EmbeddedStore
            from loaders.ingest import load_dataset
            load_dataset(EmbeddedStore(Path({str(store)!r})), Path({str(folder)!r}), rejects_dir=Path('/tmp'))
            result = {{}}
        """)
    return run_child(f"""
        from pathlib import Path
        import pyarrow as pa
        from graph.embedded import EmbeddedStore
        from queries.influence import influencers
        path = Path({str(store)!r})
        version = path / (path / 'CURRENT').read_text().strip()
        t = time.perf_counter()
        read_columns(version / 'referrals')
        floor = time.perf_counter() - t
        t = time.perf_counter()
        top = influencers(EmbeddedStore(path), top=10)
        seconds = time.perf_counter() - t
        result = {{'edges': {edges}, 'seconds': round(seconds, 2), 'floor_read_referrals_s': round(floor, 3),
                   'ratio_to_floor': round(seconds / max(floor, 1e-6), 1), 'top_cascade': top[0].cascade_size}}
    """)


def bench_neo4j_load(scale: int, uri: str, batch: int) -> dict:
    """Load the scale's dataset into an emptied Neo4j database over Bolt (relationships are
    deleted before nodes: detaching a dense node at once can exceed the transaction memory)."""
    folder = dataset(scale)
    return run_child(f"""
        from pathlib import Path
        from neo4j import GraphDatabase
        from graph.neo4j_store import Neo4jStore
        from graph.settings import Settings
        from loaders.ingest import load_dataset
        with GraphDatabase.driver({uri!r}) as driver, driver.session() as session:
            session.run("MATCH ()-[r]->() CALL (r) {{ DELETE r }} IN TRANSACTIONS OF 10000 ROWS").consume()
            session.run("MATCH (n) CALL (n) {{ DELETE n }} IN TRANSACTIONS OF 10000 ROWS").consume()
        store = Neo4jStore.connect(Settings(neo4j={uri!r}, neo4j_batch_size={batch}))
        writing, apply = [0.0], store.apply

        def timed_apply(validated):
            started = time.perf_counter()
            apply(validated)
            writing[0] += time.perf_counter() - started
        store.apply = timed_apply
        t = time.perf_counter()
        report = load_dataset(store, Path({str(folder)!r}), rejects_dir=Path('/tmp/cg-bench-rejects'))
        seconds = time.perf_counter() - t
        store.close()
        scans = report.accepted['scans'] + report.rejected['scans'] + report.duplicates['scans']
        rows = sum(report.accepted.values()) + sum(report.rejected.values()) + sum(report.duplicates.values())
        result = {{'seconds': round(seconds, 1), 'batch_size': {batch}, 'writers': store.writers, 'scan_rows': scans, 'all_rows': rows,
                   'scan_rows_per_s': round(scans / seconds), 'all_rows_per_s': round(rows / seconds),
                   'write_s': round(writing[0], 1), 'scan_rows_per_write_s': round(scans / writing[0])}}
    """)


def bench_queries(scale: int, uri: str | None, samples: int = 200) -> dict:
    """Trace latency, full diversion detection, influencers and the analyses on one store
    (Neo4j when `uri`, else the embedded store of `bench_load`, its facts cache removed
    first: its first analysis builds the sales facts, the next ones read them), for the
    side-by-side table of both stores. Wall and process CPU seconds (for Neo4j the client's
    CPU only) of each."""
    store = store_of(scale)
    opener = f"Neo4jStore.connect(Settings(neo4j={uri!r}))" if uri else f"EmbeddedStore(Path({str(store)!r}))"
    if not uri:
        shutil.rmtree(store / (store / "CURRENT").read_text().strip() / "derived", ignore_errors=True)
    return run_child(f"""
        import os
        import numpy as np
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from graph.neo4j_store import Neo4jStore
        from graph.settings import Settings
        from queries.consumers import lifecycle
        from queries.diversion import find_diversions
        from queries.influence import influencers
        from queries.rebates import load_policy, rebates
        from queries.regions import region_sell_through
        from queries.sales import sales_facts
        from queries.stores import store_health
        from queries.trace import trace
        store = {opener}
        units = EmbeddedStore(Path({str(store)!r})).units_where()
        picked = [units[i] for i in np.random.default_rng(0).choice(len(units), {samples})]
        trace(store, picked[0])
        times, cpus = [], []
        for code in picked:
            t, cpu = time.perf_counter(), time.process_time()
            trace(store, code)
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - cpu)
        ms = np.array(times) * 1000
        result = {{'trace_median_ms': round(float(np.median(ms)), 2), 'trace_p95_ms': round(float(np.percentile(ms, 95)), 2),
                   'trace_cpu_median_ms': round(float(np.median(cpus)) * 1000, 2)}}
        policy = load_policy('docs/policy.example.toml')
        for name, call in (('diversions', lambda: find_diversions(store)), ('influencers', lambda: influencers(store, top=10)),
                           ('sales_facts', lambda: sales_facts(store)), ('stores', lambda: store_health(store)),
                           ('consumers', lambda: lifecycle(store)), ('rebates', lambda: rebates(store, policy=policy)),
                           ('regions', lambda: region_sell_through(store))):
            t, cpu = time.perf_counter(), time.process_time()
            out = call()
            result[name + '_s'] = round(time.perf_counter() - t, 2)
            result[name + '_cpu_s'] = round(time.process_time() - cpu, 2)
            if name == 'diversions':
                result['findings'] = len(out)
        result['load_average'] = ' '.join(f'{{x:.1f}}' for x in os.getloadavg())
    """)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; load average when written: {load}")


def write_results(title: str, rows: list[dict], notes: str = "") -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"\n## {title} — {stamp}\n", f"Machine: {machine()}\n", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by `python -m bench.run` (and the other scripts in bench/).\n")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="100,1000")
    parser.add_argument("--only", default="load,diversion,trace,influence",
                        help="comma-separated: load, diversion, trace, influence, neo4j-load, neo4j-queries")
    parser.add_argument("--neo4j", help="Bolt URI of an EMPTY-ABLE Neo4j (neo4j-load wipes it)")
    parser.add_argument("--batch", type=int, default=10_000, help="Neo4j load batch size")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    only = set(args.only.split(","))
    rows = []
    for scale in scales:
        if "load" in only:
            rows.append({"benchmark": f"load scale {scale}", **bench_load(scale)})
        if "diversion" in only:
            rows.append({"benchmark": f"diversions scale {scale}", **bench_diversion(scale)})
        if "trace" in only:
            rows.append({"benchmark": f"trace scale {scale}", **bench_trace(scale)})
    if "influence" in only:
        rows.append({"benchmark": "influencers 1M referral edges", **bench_influence()})
    if "analytics" in only:  # stores, consumers, rebates, regions: bench/analytics.py
        from bench.analytics import bench_analytics

        rows += [row for scale in scales for row in bench_analytics(scale)]
    neo4j_rows = []
    for scale in scales:
        if "neo4j-load" in only:
            neo4j_rows.append({"benchmark": f"Neo4j load scale {scale}", **bench_neo4j_load(scale, args.neo4j, args.batch)})
        if "neo4j-queries" in only:
            if not (store_of(scale) / "CURRENT").exists():
                bench_load(scale)
            neo4j_rows.append({"benchmark": f"queries scale {scale}, embedded", **bench_queries(scale, None)})
            neo4j_rows.append({"benchmark": f"queries scale {scale}, Neo4j", **bench_queries(scale, args.neo4j)})
    if neo4j_rows:
        write_results("Neo4j store (and the same queries on the embedded store)", neo4j_rows,
                      "Target: Neo4j load >= 50,000 scan rows/s over Bolt. Neo4j: local 5.26 launcher on the "
                      "same machine as the client. `seconds` is the whole load (reading, validation, "
                      "writing); `write_s` the Neo4j writes alone (Neo4jStore.apply). Queries: wall `_s` and "
                      "the client process's CPU `_cpu_s` (Neo4j's server CPU is not in it); the embedded "
                      "store's first analysis (sales_facts) builds its facts cache, the later ones read it.")
    if not rows:
        return
    write_results("Embedded store", rows, "Targets: load >= 300,000 scan rows/s and < 200 bytes RSS per scan row; "
                  "diversions at scale 1000 < 30 s and < 8 GiB; trace median < 5 ms; influencers on 1M edges < 10 s. "
                  "`cpu_s`: the load's CPU time, `kernel_cpu_s` the part of it in the kernel (mostly clearing the "
                  "pages of freshly allocated memory, which varies from run to run on a virtual machine).")


if __name__ == "__main__":
    main()
