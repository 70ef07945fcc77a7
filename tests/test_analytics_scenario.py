"""A generated scenario scores the analyses: the planted stores, consumer stages and rebate
counts of answers.json (loaders/plant_analytics.py) are recovered, on every store."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from graph.settings import Settings
from graph.store import open_store
from loaders.generate import generate_dataset
from loaders.ingest import load_dataset
from queries.consumers import lifecycle
from queries.rebates import load_policy, rebates
from queries.regions import region_sell_through
from queries.sales import CACHED_FACTS, FACT_FRAMES, sales_facts
from queries.stores import store_health
from tests.conftest import _wipe_neo4j
from tests.worlds import channel_world, write_world

EXPECTED_FLAGS = {"steady": set(), "stuffing": {("peers", "sell_in_window", "high")},
                  "sudden_stop": {("history", "weekly_sell_out", "low")},
                  "diversion_sink": {("diversion", "diverted_share", "high")}}
POLICY = load_policy(Path(__file__).parents[1] / "docs" / "policy.example.toml")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("analytics-scenario")
    generate_dataset(folder, scale=0.2, seed=1)
    return folder


@pytest.fixture(scope="module", params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def scenario(request, dataset: Path, tmp_path_factory):
    if request.param == "neo4j":
        uri = request.getfixturevalue("neo4j_uri")
        _wipe_neo4j(uri)
        store = open_store(Settings(neo4j=uri, neo4j_password=None))
    else:
        store = open_store(Settings(store=tmp_path_factory.mktemp("store") / "store"))
    load_dataset(store, dataset, rejects_dir=tmp_path_factory.mktemp("rejects"))
    yield store, json.loads((dataset / "answers.json").read_text())
    store.close()


def test_planted_stores_are_measured_and_flagged(scenario):
    store, answers = scenario
    plan = answers["store_health"]
    health = {h.store_id: h for h in store_health(store, as_of=plan["as_of"], window_days=plan["window_days"],
                                                  history_weeks=plan["history_weeks"], peer_level=plan["peer_level"])}
    for planted in plan["stores"]:
        got = health[planted["store"]]
        for key in ("sell_in", "sell_in_window", "sell_out", "sell_out_window", "diverted_in"):
            assert getattr(got, key) == planted[key], (planted["kind"], key)
        flags = {(f.basis, f.metric, f.direction) for f in got.flags}
        expected = EXPECTED_FLAGS[planted["kind"]]
        assert expected <= flags and (flags or not expected), (planted["kind"], flags)
        if planted["kind"] == "steady":
            assert not flags
    # every store flagged as a diversion sink took in goods that answers.json lists as diverted
    planted_diversions = {d["code"] for d in answers["diversions"]}
    facts = sales_facts(store, as_of=plan["as_of"])
    for h in health.values():
        if any(f.basis == "diversion" for f in h.flags):
            mine = facts.sell_in[(facts.sell_in["store"] == h.store_id) & facts.sell_in["diverted"]]
            assert set(mine["code"]) <= planted_diversions


def test_planted_consumer_stages(scenario):
    store, answers = scenario
    planted = answers["lifecycle"]["stages"]
    got = {c.party_id: c.stage for c in lifecycle(store, bulk_units=answers["lifecycle"]["bulk_units"])}
    assert {p: got[p] for p in planted} == planted


def test_rebates_of_the_planted_stores(scenario):
    store, answers = scenario
    plan = answers["store_health"]
    report = rebates(store, policy=POLICY, as_of=plan["as_of"])
    owed = {(t.role, t.party_id): 0.0 for t in report.totals}
    withheld = dict(owed)
    for t in report.totals:
        owed[(t.role, t.party_id)] += t.owed
        withheld[(t.role, t.party_id)] += t.withheld
    for planted in plan["stores"]:
        want_owed = sum(n * POLICY.amount(sku, "store") for sku, n in planted["scans_by_sku"].items())
        want_withheld = sum(n * POLICY.amount(sku, "store") for sku, n in planted["diverted_scans_by_sku"].items())
        key = ("store", planted["store"])
        assert (round(owed[key], 2), round(withheld[key], 2)) == (round(want_owed, 2), round(want_withheld, 2))
    sink = next(p for p in plan["stores"] if p["kind"] == "diversion_sink")
    lines = [line for line in report.withheld_lines if line.role == "store" and line.party_id == sink["store"]]
    assert len(lines) == sink["diverted_scans"] and all(line.severity == "confirmed" for line in lines)


def test_regions_account_for_every_diversion_and_sale(scenario):
    store, answers = scenario
    report = region_sell_through(store, level="province", period="month")
    diverted = len(answers["diversions"])
    assert sum(r.diversions_in for r in report.rows) == sum(r.diversions_out for r in report.rows) == diverted
    assert sum(cell.units for cell in report.matrix) == diverted
    facts = sales_facts(store)
    assert sum(r.units_in for r in report.rows) == len(facts.sell_in)
    assert sum(r.scanned for r in report.rows) == facts.sell_out["region_id"].notna().sum()
    assert all(r.active_stores <= r.stores for r in report.rows)


def test_every_store_builds_the_same_sales_facts(scenario, dataset: Path, tmp_path: Path):
    """Neo4j aggregates sell-in, sell-out and opens in Cypher; they match the embedded
    store's, row for row, as do the findings, with and without an analysis time."""
    store, answers = scenario
    embedded = open_store(Settings(store=tmp_path / "store"))
    load_dataset(embedded, dataset, rejects_dir=tmp_path / "rejects")
    for as_of in (None, answers["store_health"]["as_of"]):
        mine, reference = sales_facts(store, as_of=as_of), sales_facts(embedded, as_of=as_of)
        assert mine.as_of == reference.as_of
        for name in ("sell_in", "sell_out", "opened", "findings"):
            got, want = getattr(mine, name), getattr(reference, name)
            columns = list(want.columns)
            assert list(got.columns) == columns, name
            ordered = [frame.astype(str).sort_values(columns, ignore_index=True) for frame in (got, want)]
            assert ordered[0].equals(ordered[1]), name


def test_small_batches_give_the_same_facts(dataset: Path, tmp_path: Path, monkeypatch):
    """The embedded store's facts are built batch by batch (whole packages each)."""
    from graph.embedded import EmbeddedStore

    store = open_store(Settings(store=tmp_path / "store"))
    load_dataset(store, dataset, rejects_dir=tmp_path / "rejects")
    whole = sales_facts(store)
    shutil.rmtree(store.version / "derived")  # the facts cache: build them again
    batches = EmbeddedStore.timeline_batches
    monkeypatch.setattr(EmbeddedStore, "timeline_batches", lambda self: batches(self, max_units=500))
    assert len(list(store.timeline_batches())) > 5
    small = sales_facts(store)
    for name in ("sell_in", "sell_out", "opened", "findings"):
        got, want = getattr(small, name), getattr(whole, name)
        assert got.astype(str).sort_values(list(got.columns), ignore_index=True).equals(
            want.astype(str).sort_values(list(want.columns), ignore_index=True)), name


def _facts_equal(got, want) -> None:
    assert got.as_of == want.as_of
    for name in FACT_FRAMES:
        pd.testing.assert_frame_equal(getattr(got, name), getattr(want, name), obj=name)


def test_cached_facts_equal_built_ones_and_a_load_invalidates_them(tmp_path: Path, monkeypatch):
    """The embedded store's facts are cached per store version, analysis time and k: a
    second analysis reads them (the timelines are not touched), a new load makes a new
    version whose facts see the new events."""
    from graph.embedded import EmbeddedStore

    path = tmp_path / "store"
    load_dataset(EmbeddedStore(path), write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    built = {as_of: sales_facts(EmbeddedStore(path), as_of=as_of) for as_of in (None, "2024-02-05T12:00:00Z")}
    built_k2 = sales_facts(EmbeddedStore(path), k=2)
    store = EmbeddedStore(path)
    assert len(list((store.version / "derived").iterdir())) == 3
    with monkeypatch.context() as patched:
        _forbid_rebuilds(patched)
        for as_of, facts in built.items():
            _facts_equal(sales_facts(store, as_of=as_of), facts)
        _facts_equal(sales_facts(store, k=2), built_k2)
    assert "A2" not in set(built[None].sell_out["code"])
    more = [{"event_id": "n1", "code": "A2", "action": "scan", "party_id": "wx-new", "ts": "2024-03-05T00:00:00Z",
             "region_id": "NJ"}]
    load_dataset(store, write_world({"scans": more}, tmp_path / "more"), rejects_dir=tmp_path / "rejects")
    after = sales_facts(store)
    assert after.sell_out.set_index("code").loc["A2", ["consumer", "store"]].tolist() == ["wx-new", "S3"]
    assert len(after.sell_out) == len(built[None].sell_out) + 1
    shutil.rmtree(store.version / "derived")
    _facts_equal(sales_facts(EmbeddedStore(path)), after)


def _forbid_rebuilds(monkeypatch) -> None:
    from graph.embedded import EmbeddedStore

    def rebuilt(self):
        raise AssertionError("facts rebuilt, not read from the cache")
    monkeypatch.setattr(EmbeddedStore, "timeline_batches", rebuilt)


def test_the_facts_cache_keeps_its_newest_entries(tmp_path: Path, monkeypatch):
    from graph.embedded import EmbeddedStore

    path = tmp_path / "store"
    load_dataset(EmbeddedStore(path), write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    times = [None, *(f"2024-02-{day:02d}T00:00:00Z" for day in range(2, 2 + CACHED_FACTS))]
    for as_of in times:
        sales_facts(EmbeddedStore(path), as_of=as_of)
    assert len(list((EmbeddedStore(path).version / "derived").iterdir())) == CACHED_FACTS
    _forbid_rebuilds(monkeypatch)
    for as_of in times[1:]:
        sales_facts(EmbeddedStore(path), as_of=as_of)
    with pytest.raises(AssertionError, match="rebuilt"):
        sales_facts(EmbeddedStore(path), as_of=times[0])


def test_a_damaged_facts_cache_is_rebuilt(tmp_path: Path):
    """A cache entry cut short, or missing a file, is never used: the facts are built again
    (and cached again)."""
    from graph.embedded import EmbeddedStore

    path = tmp_path / "store"
    load_dataset(EmbeddedStore(path), write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    want = sales_facts(EmbeddedStore(path))
    (entry,) = (EmbeddedStore(path).version / "derived").iterdir()
    damages = [lambda: (entry / "sell_out.arrow").write_bytes((entry / "sell_out.arrow").read_bytes()[:300]),
               lambda: (entry / "findings.arrow").unlink(), lambda: (entry / "manifest.json").write_text("{")]
    for damage in damages:
        damage()
        _facts_equal(sales_facts(EmbeddedStore(path)), want)
        assert sorted(p.name for p in entry.iterdir()) == sorted([*(f"{n}.arrow" for n in FACT_FRAMES), "manifest.json"])
        _facts_equal(sales_facts(EmbeddedStore(path)), want)


def test_a_read_only_store_answers_without_caching(tmp_path: Path):
    """The store folder becomes a read-only bind mount of itself (needs root, as in CI)."""
    from graph.embedded import EmbeddedStore
    from tests.test_faults import _mount

    read_only = tmp_path / "ro"
    path = read_only / "store"
    load_dataset(EmbeddedStore(path), write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    _mount("--bind", str(read_only), str(read_only))
    try:
        _mount("-o", "remount,ro,bind", str(read_only))
        facts = sales_facts(EmbeddedStore(path))
        assert not (EmbeddedStore(path).version / "derived").exists()
        assert [h.store_id for h in store_health(EmbeddedStore(path), abnormal_only=True)] == ["S3"]
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
    _facts_equal(sales_facts(EmbeddedStore(path)), facts)  # writable again: built and cached the same
