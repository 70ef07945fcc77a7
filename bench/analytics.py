"""Stores, consumers, rebates and regions on the embedded store, appended to bench/RESULTS.md.

    .venv/bin/python -m bench.analytics --scales 10          # or: python -m bench.run --only analytics
    .venv/bin/python -m bench.analytics --scales 1000        # the target: each analysis < 30 s

Each analysis runs twice, each time in a fresh process (bench.run.run_child) on the
scenario's loaded store (loaded first if missing), so its peak memory is its own:

- *cold*: the store's sales facts cache is removed first, so the time includes building the
  sales facts (every unit's timeline and the diversion judgement) and writing the cache;
- *warm*: right after, with the facts cache the cold run wrote (queries/sales.py).

Consumers and the funnel read purchases and referrals, not the sales facts. `cpu_s`
(process CPU time) says more than wall time on a busy machine. The store-health row also
scores the planted stores of answers.json (loaders/plant_analytics.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.run import bench_load, dataset, run_child, store_of, write_results

ANALYSES = {
    "sales facts": "sales_facts(store)",
    "stores": "store_health(store)",
    "consumers": "lifecycle(store)",
    "consumer funnel (month)": "stage_funnel(store)",
    "rebates": "rebates(store, policy=load_policy('docs/policy.example.toml'))",
    "regions (province, month)": "region_sell_through(store)",
}


def bench_analytics(scale: int) -> list[dict]:
    """Two rows per analysis at `scale`: cold (facts built in the process) and warm (facts cached)."""
    store = store_of(scale)
    if not (store / "CURRENT").exists():
        bench_load(scale)
    derived = store / (store / "CURRENT").read_text().strip() / "derived"
    rows = []
    for name, call in ANALYSES.items():
        shutil.rmtree(derived, ignore_errors=True)
        for facts in ("cold", "warm"):
            rows.append({"benchmark": f"{name}, scale {scale}", "facts": facts, **_timed(store, call)})
    if "store_health" in json.loads((dataset(scale) / "answers.json").read_text()):  # planted stores (newer datasets)
        rows.append({"benchmark": f"planted store flags, scale {scale}", **_planted(scale)})
    return rows


def _timed(store: Path, call: str) -> dict:
    return run_child(f"""
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from queries.consumers import lifecycle, stage_funnel
        from queries.rebates import load_policy, rebates
        from queries.regions import region_sell_through
        from queries.sales import sales_facts
        from queries.stores import store_health
        store = EmbeddedStore(Path({str(store)!r}))
        t, cpu = time.perf_counter(), time.process_time()
        out = {call}
        result = {{'seconds': round(time.perf_counter() - t, 2), 'cpu_s': round(time.process_time() - cpu, 2)}}
    """)


def _planted(scale: int) -> dict:
    return run_child(f"""
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from queries.stores import store_health
        answers = json.loads((Path({str(dataset(scale))!r}) / 'answers.json').read_text())['store_health']
        t = time.perf_counter()
        health = {{h.store_id: h for h in store_health(EmbeddedStore(Path({str(store_of(scale))!r})), as_of=answers['as_of'],
                   window_days=answers['window_days'], history_weeks=answers['history_weeks'], peer_level=answers['peer_level'])}}
        want = {{'stuffing': 'peers', 'sudden_stop': 'history', 'diversion_sink': 'diversion'}}
        found = sum(any(f.basis == want[p['kind']] for f in health[p['store']].flags) for p in answers['stores'] if p['kind'] in want)
        quiet = sum(not health[p['store']].flags for p in answers['stores'] if p['kind'] == 'steady')
        result = {{'seconds': round(time.perf_counter() - t, 2), 'planted_found': f'{{found}}/3', 'steady_unflagged': f'{{quiet}}/3',
                   'stores': len(health), 'flagged': sum(h.abnormal for h in health.values())}}
    """)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="10")
    args = parser.parse_args()
    rows = [row for scale in (int(s) for s in args.scales.split(",")) for row in bench_analytics(scale)]
    write_results("Stores, consumers, rebates and regions (embedded store)", rows,
                  "Target: each analysis at scale 1000 < 30 s. cold: the time includes building the sales facts from "
                  "the store (and writing their cache); warm: the facts are read from the cache the cold run wrote. "
                  "Consumers and the funnel do not use the sales facts.")


if __name__ == "__main__":
    main()
