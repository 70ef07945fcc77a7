"""`channelgraph demo`: generate, load, analyse and report, on the embedded store."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console

from api.analytics_views import cached_store_health, demo_policy, write_analytics_views
from api.cli import to_csv
from api.params import parse_time
from api.service import ApiService
from api.views import write_views
from graph.settings import Settings
from graph.store import open_store
from loaders.generate import generate_dataset
from loaders.ingest import load_dataset
from loaders.readers import ANSWERS
from queries.diversion import diversion_view, judge_store
from queries.influence import influencers, referral_stats
from queries.trace import trace


def run_demo(*, out_dir: Path, scale: float, seed: int, settings: Settings, fmt: str = "table") -> dict:
    """Generate a scenario into `out_dir/dataset`, load it, run every analysis and print a
    short report (JSON with fmt="json"; its figures as CSV rows with fmt="csv"). Returns
    the report."""
    console = Console(stderr=fmt != "table")
    dataset = out_dir / "dataset"
    started = time.perf_counter()
    console.print(f"[bold]1/4[/] generating scale {scale} scenario (seed {seed}) into {dataset}")
    generated = generate_dataset(dataset, scale=scale, seed=seed)
    store = open_store(settings)
    try:
        console.print(f"[bold]2/4[/] loading into {store.uri}")
        loaded = load_dataset(store, dataset, rejects_dir=out_dir / "rejects")
        console.print("[bold]3/4[/] finding diversions, super users, a trace")
        verdicts = judge_store(store, k=settings.k)
        findings = verdicts.findings.models()
        summary = verdicts.summary(store.unit_count())
        offenders = diversion_view(findings, "responsible")[:5]
        top = influencers(store, top=5, by="cascade_size")
        referrals = referral_stats(store)
        example = trace(store, findings[0].code, k=settings.k) if findings else None
        answers = json.loads((dataset / ANSWERS).read_text())
        plan = answers["store_health"]  # the time and peers the scenario's store anomalies are planted for
        as_of = parse_time(plan["as_of"], "as_of")
        svc = ApiService(store, k=settings.k)
        health = cached_store_health(svc, as_of=as_of, peer_level=plan["peer_level"])  # the stores page's too
        pages = write_views(store, out_dir / "views", k=settings.k, code=example.code if example else None)
        pages += write_analytics_views(svc, out_dir / "views", policy=demo_policy(settings),
                                       as_of=as_of, peer_level=plan["peer_level"])
    finally:
        store.close()
    flagged = {h.store_id for h in health if h.abnormal}
    planted_abnormal = {s["store"] for s in plan["stores"] if s["kind"] != "steady"}
    planted = {(d["code"], d["severity"]) for d in answers.get("diversions", [])}
    found = {(f.code, f.severity) for f in findings}
    untracked, planted_untracked = set(verdicts.untracked.column("code").to_pylist()), set(answers.get("untracked", []))
    report = {
        "dataset": str(dataset), "store": str(settings.neo4j or settings.store),
        "rows_generated": generated.get("rows", {}),
        "loaded": loaded.as_dict(),
        "diverted_units": len(findings),
        "confirmed": sum(f.severity == "confirmed" for f in findings),
        "suspected": sum(f.severity == "suspected" for f in findings),
        "planted_diversions_recovered": f"{len(found & planted)}/{len(planted)}",
        "false_findings": len(found - planted),
        "units": summary.units,
        "judged_units": summary.judged,
        "untracked_units": summary.untracked,
        "planted_untracked_recovered": f"{len(untracked & planted_untracked)}/{len(planted_untracked)}",
        "stores_as_of": plan["as_of"],
        "abnormal_stores": f"{len(flagged)}/{len(health)}",
        "planted_abnormal_stores_flagged": f"{len(flagged & planted_abnormal)}/{len(planted_abnormal)}",
        "referrals": referrals.model_dump(),
        "repeat_offenders": offenders,
        "super_users": [i.model_dump() for i in top],
        "example_trace": example.model_dump() if example else None,
        "views": [str(page) for page in pages],
        "seconds": round(time.perf_counter() - started, 2),
    }
    console.print("[bold]4/4[/] report")
    if fmt == "json":
        sys.stdout.write(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n")
    elif fmt == "csv":  # the report's figures, one a row
        sys.stdout.write(to_csv([{"figure": name, "value": value} for name, value in report.items()
                                 if not isinstance(value, (dict, list))], ["figure", "value"]))
    else:
        _print_report(Console(), report)
    return report


def _print_report(console: Console, report: dict) -> None:
    loaded = report["loaded"]
    console.print(f"\n[bold]channelgraph demo[/] — {report['dataset']} -> {report['store']} in {report['seconds']} s")
    console.print(f"loaded {sum(loaded['accepted'].values()):,} rows, rejected {sum(loaded['rejected'].values()):,} "
                  f"(reasons in {loaded['rejects_path']}), duplicates {sum(loaded['duplicates'].values()):,}")
    console.print(f"diverted units: {report['diverted_units']:,} ({report['confirmed']:,} confirmed, "
                  f"{report['suspected']:,} suspected); planted diversions recovered "
                  f"{report['planted_diversions_recovered']}, false findings {report['false_findings']}")
    console.print(f"units: {report['units']:,}, {report['judged_units']:,} judged; {report['untracked_units']:,} untracked "
                  f"(no factory shipment to a distributor: never judged); planted untracked recovered "
                  f"{report['planted_untracked_recovered']}")
    console.print(f"abnormal stores as of {report['stores_as_of']}: {report['abnormal_stores']}; planted store "
                  f"anomalies flagged {report['planted_abnormal_stores_flagged']}")
    referrals = report["referrals"]
    console.print(f"referrals: {referrals['referrals']:,} read, {referrals['attributed']:,} attributed; ignored: "
                  + ", ".join(f"{reason} {n:,}" for reason, n in referrals["ignored"].items()))
    console.print("\n[bold]repeat offenders[/] (responsible distributor: diverted units)")
    for row in report["repeat_offenders"]:
        console.print(f"  {row['rank']}. {row['responsible']}: {row['units']} units in {row['crossings']} crossings")
    console.print("\n[bold]super users[/] (by cascade size)")
    for user in report["super_users"]:
        console.print(f"  {user['party_id']} ({user['kind']}): cascade {user['cascade_size']}, direct {user['direct']}, "
                      f"converted {user['converted']}, revenue {user['referred_revenue']:,.2f}")
    example = report["example_trace"]
    if example:
        console.print(f"\n[bold]trace of {example['code']}[/] (assigned to {example['assigned_distributor']})")
        for hop in example["path"]:
            mark = "  [red](crossed out of the territory)[/]" if hop["crossed"] else ""
            console.print(f"  {hop['ts']}  {hop['action']:<7} {hop['party_id']} ({hop['kind']}) at {hop['region_id']}"
                          f"{_counterparty(hop['action'], hop['counterparty_id'])}{mark}")
    console.print("\n[bold]views[/] (open in a browser; they work offline): " + ", ".join(report["views"]))


def _counterparty(action: str, counterparty: str | None) -> str:
    """' -> receiver' for a ship, ' <- sender' for a receive, '' when there is none."""
    if not counterparty:
        return ""
    return f" {'<-' if action == 'receive' else '->'} {counterparty}"
