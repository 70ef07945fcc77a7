"""The Neo4j store answers exactly as the embedded store on the same loads.

Every test loads the same folder into an `EmbeddedStore` (the reference) and a
`Neo4jStore` and compares what they hold and answer. Needs a Neo4j server (see conftest).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from graph.embedded import DERIVED_COLUMNS, EmbeddedStore
from graph.errors import StoreError
from graph.model import TABLES
from graph.neo4j_store import KIND_LABELS, PROPERTY_OF_K, Neo4jStore, _checked, _property_of
from graph.settings import Settings
from graph.timeline import EVENT_COLUMNS
from loaders.ingest import LoadReport, load_dataset
from queries.diversion import find_diversions, judge_store
from tests.worlds import channel_world, write_world

pytestmark = pytest.mark.neo4j

KEYS = {name: (spec.key[0] if spec.key else "task_id") for name, spec in TABLES.items()}
ODD_COLUMN = "note`}) DETACH DELETE n //"  # an unknown column whose name is Cypher


def _wipe(uri: str) -> None:
    from neo4j import GraphDatabase

    with GraphDatabase.driver(uri, auth=None) as driver, driver.session() as session:
        session.run("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()


@pytest.fixture
def neo4j_store(neo4j_uri: str):
    _wipe(neo4j_uri)
    store = Neo4jStore.connect(Settings(neo4j=neo4j_uri, neo4j_password=None, neo4j_batch_size=7))
    yield store
    store.close()


def rich_world() -> dict[str, list[dict]]:
    """The channel world plus unknown columns, bad rows, tasks and a retraction."""
    tables = channel_world()
    tables["parties"][0]["phone"] = "0571-1"
    tables["parties"][1][ODD_COLUMN] = "x"
    tables["parties"] += [
        {"party_id": "S9", "kind": "store", "name": "No region"},  # rejected: a store needs a region
        {"party_id": "X1", "kind": "wizard", "region_id": "HZ"},  # rejected: bad kind
        {"party_id": "S4", "kind": "store", "region_id": "SZ", "upstream_id": "NOPE"},  # unknown upstream
    ]
    tables["regions"] += [{"region_id": "LOOP1", "parent_id": "LOOP2"}, {"region_id": "LOOP2", "parent_id": "LOOP1"}]
    tables["codes"] += [
        {"code": "Z1", "level": "unit", "sku": "BJ250", "batch": "B9", "produced_at": "2024-01-02T03:04:05.123456+08:00"},
        {"code": "Z2", "level": "unit", "parent_code": "Z1"},  # level inversion
        {"code": "Z3", "level": "case", "parent_code": "GHOST"},  # unknown parent
    ]
    tables["scans"] += [
        {"event_id": "bad-ts", "code": "Z1", "action": "scan", "party_id": "C1", "ts": "yesterday"},
        {"event_id": "bad-code", "code": "NOPE", "action": "scan", "party_id": "C1", "ts": "2024-03-01T00:00:00Z"},
        {"event_id": "bad-party", "code": "Z1", "action": "ship", "party_id": "NOBODY", "ts": "2024-03-01T00:00:00Z"},
        {"event_id": "z1", "code": "Z1", "action": "scan", "party_id": "wx-z1", "ts": "2024-03-05T00:00:00.000001Z",
         "region_id": "SZ", "lat": "31.3", "device": "ios"},
    ]
    tables["referrals"] += [{"referrer_id": "wx-new", "referee_id": "C1", "ts": "2024-03-01T00:00:00Z", "channel": "bogus"}]
    tables["tasks"] = [{"store_id": "S1", "task": "display", "reward": "10"},
                       {"store_id": "S1", "task": "display", "reward": "10"},
                       {"store_id": "S3", "task": "tasting", "reward": "5"}]
    tables["retractions"] = [{"event_id": "k6", "declared_at": "2024-03-10T00:00:00Z", "reason": "incorrect_data"}]
    return tables


def _load(store, folder: Path, rejects: Path) -> tuple[LoadReport, list[dict]]:
    report = load_dataset(store, folder, rejects_dir=rejects)
    lines = Path(report.rejects_path).read_text().splitlines() if report.rejects_path else []
    return report, [json.loads(line) for line in lines]


def _same_report(a: LoadReport, b: LoadReport) -> None:
    assert (a.accepted, a.rejected, a.duplicates, a.implicit_consumers) == (
        b.accepted, b.rejected, b.duplicates, b.implicit_consumers)


def _canonical(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in DERIVED_COLUMNS if c in table.column_names])


def assert_same_tables(embedded: EmbeddedStore, neo: Neo4jStore) -> None:
    assert neo.counts() == embedded.counts()
    for name in TABLES:
        reference = _canonical(embedded.table(name))
        keys = reference.column(KEYS[name]).combine_chunks() if reference.num_rows else pa.array([], pa.string())
        keys = pa.concat_arrays([keys, pa.array(["no-such-key", None], pa.string())])
        want, got = _canonical(embedded.stored(name, keys)), neo.stored(name, keys)
        assert got.schema == want.schema, name
        assert got.to_pylist() == want.to_pylist(), name
        assert neo.stored(name, pa.array([], pa.string())).schema == got.schema
    assert neo.regions().to_pylist() == _canonical(embedded.regions()).to_pylist()
    assert neo.regions().schema == _canonical(embedded.regions()).schema


def assert_same_timelines(embedded: EmbeddedStore, neo: Neo4jStore, codes) -> None:  # noqa: ANN001
    want, got = embedded.timelines(codes), neo.timelines(codes)
    assert got.units.to_pylist() == want.units.to_pylist()
    assert np.array_equal(got.unit, want.unit)
    for column in EVENT_COLUMNS:
        assert got.event_column(column).tolist() == want.event_column(column).tolist(), column
    assert got.events.schema.field("ts").type == want.events.schema.field("ts").type


def assert_same_answers(embedded: EmbeddedStore, neo: Neo4jStore) -> None:
    assert_same_tables(embedded, neo)
    assert_same_timelines(embedded, neo, None)
    assert_same_timelines(embedded, neo, ["K2", "CK", "PB", "BB", "B1", "Z1", "nope", "A1", "A1"])
    assert_same_timelines(embedded, neo, [])
    assert neo.purchases().equals(embedded.purchases())
    for parties in (["C1", "wx-z1", "S1", "nope"], []):
        assert neo.purchases(parties).equals(embedded.purchases(parties))
    assert neo.referrals().equals(embedded.referrals())
    for code in ("PB", "CA", "A1", "nope"):
        assert neo.descendants(code).equals(embedded.descendants(code))
    for code in ("B2", "BB", "PB", "A1", "nope"):
        assert neo.lineage(code).equals(embedded.lineage(code))
    for where in ({}, {"sku": "BJ250"}, {"batch": "B1"}, {"sku": "BJ500", "batch": "B1"}, {"sku": "none"}):
        assert neo.units_where(**where) == embedded.units_where(**where)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    return write_world(rich_world(), tmp_path / "world")


def test_load_gives_the_embedded_stores_tables_and_answers(world: Path, neo4j_store: Neo4jStore, tmp_path: Path):
    embedded = EmbeddedStore(tmp_path / "embedded")
    want, want_rejects = _load(embedded, world, tmp_path / "rejects-e")
    got, got_rejects = _load(neo4j_store, world, tmp_path / "rejects-n")
    _same_report(got, want)
    assert got_rejects == want_rejects and len(got_rejects) >= 10
    assert_same_answers(embedded, neo4j_store)
    assert neo4j_store.stored("parties", pa.array(["D1"])).column(ODD_COLUMN).to_pylist() == ["x"]
    ts = neo4j_store.stored("codes", pa.array(["Z1"])).column("produced_at")[0].as_py()
    assert ts.isoformat() == "2024-01-01T19:04:05.123456+00:00"


def test_diversion_candidates_cover_every_finding(world: Path, neo4j_store: Neo4jStore, tmp_path: Path):
    embedded = EmbeddedStore(tmp_path / "embedded")
    load_dataset(embedded, world, rejects_dir=tmp_path / "r1")
    load_dataset(neo4j_store, world, rejects_dir=tmp_path / "r2")
    candidates = neo4j_store.diversion_candidates()
    diverted = {f.code for f in find_diversions(embedded)}
    assert diverted <= set(candidates)
    assert candidates == sorted(set(candidates))
    assert "H1" not in candidates and "U1" not in candidates  # stayed inside; untracked
    assert {"T1", "R1"} <= set(candidates)  # travel and reassignment are for the judge to clear
    assert [f.model_dump() for f in find_diversions(neo4j_store)] == [f.model_dump() for f in find_diversions(embedded)]
    untracked = judge_store(embedded).untracked
    assert untracked.column("code").to_pylist() == ["U1", "Z1"] and neo4j_store.untracked_candidates() == ["U1", "Z1"]
    assert judge_store(neo4j_store).untracked.equals(untracked)
    assert neo4j_store.unit_count() == embedded.unit_count() == 20


def test_reloading_changes_nothing(world: Path, neo4j_store: Neo4jStore, tmp_path: Path):
    load_dataset(neo4j_store, world, rejects_dir=tmp_path / "r1")
    counts = neo4j_store.counts()
    again = load_dataset(neo4j_store, world, rejects_dir=tmp_path / "r2")
    assert neo4j_store.counts() == counts
    # Shared validation re-accepts rows with a timestamp column other than codes
    # (retractions); the Neo4j upserts absorb them.
    assert {t: n for t, n in again.accepted.items() if t != "retractions"} == dict.fromkeys(
        ("regions", "products", "parties", "codes", "scans", "referrals", "tasks"), 0)
    assert again.duplicates["tasks"] == len(rich_world()["tasks"])
    assert again.implicit_consumers == 0
    assert again.duplicates["scans"] == sum(1 for row in rich_world()["scans"]) - 3  # all but the 3 bad rows
    assert again.duplicates["parties"] == len(channel_world()["parties"])


def test_updates_keep_stored_values_as_the_embedded_store(world: Path, neo4j_store: Neo4jStore, tmp_path: Path):
    embedded = EmbeddedStore(tmp_path / "embedded")
    for store in (embedded, neo4j_store):
        load_dataset(store, world, rejects_dir=tmp_path / "r")
    update = {
        "parties": [{"party_id": "D1", "kind": "distributor", "name": "Renamed", "region_id": "HZ", "vip": "yes"},
                    {"party_id": "C1", "kind": "store", "region_id": "NJ"},
                    {"party_id": "N1", "kind": "consumer"}],
        "codes": [{"code": "PB", "level": "pallet", "sku": None, "batch": "B2"},
                  {"code": "A9", "level": "unit", "parent_code": "CA"}],
        "products": [{"sku": "BJ500", "unit_price": None, "name": "Baijiu 0.5l"}],
        "scans": [{"event_id": "late", "code": "A9", "action": "scan", "party_id": "wx-late", "ts": "2024-04-01T00:00:00Z"}],
    }
    folder = write_world(update, tmp_path / "update")
    want, want_rejects = _load(embedded, folder, tmp_path / "u1")
    got, got_rejects = _load(neo4j_store, folder, tmp_path / "u2")
    _same_report(got, want)
    assert got_rejects == want_rejects
    assert_same_answers(embedded, neo4j_store)
    d1 = neo4j_store.stored("parties", pa.array(["D1"])).to_pylist()[0]
    assert (d1["name"], d1["territory"], d1["vip"], d1[ODD_COLUMN]) == ("Renamed", "ZJ", "yes", None)


def test_an_interrupted_load_run_again_ends_as_one_clean_load(world: Path, neo4j_store: Neo4jStore, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    embedded = EmbeddedStore(tmp_path / "embedded")
    load_dataset(embedded, world, rejects_dir=tmp_path / "r")
    calls = {"n": 0}
    real = Neo4jStore._write_transaction

    def flaky(self, work):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 12:
            raise StoreError("simulated crash")
        return real(self, work)

    monkeypatch.setattr(Neo4jStore, "_write_transaction", flaky)
    with pytest.raises(StoreError, match="simulated"):
        load_dataset(neo4j_store, world, rejects_dir=tmp_path / "r")
    monkeypatch.setattr(Neo4jStore, "_write_transaction", real)
    assert neo4j_store._read("MATCH (l:Load {status: 'running'}) RETURN count(l)")[0][0] == 1
    load_dataset(neo4j_store, world, rejects_dir=tmp_path / "r")
    assert neo4j_store._read("MATCH (l:Load) RETURN l.status ORDER BY l.number") == [["interrupted"], ["done"]]
    assert neo4j_store._read("MATCH (n) WHERE n:PendingLinks OR n:PendingCount RETURN count(n)")[0][0] == 0
    assert_same_tables(embedded, neo4j_store)
    assert neo4j_store.purchases().equals(embedded.purchases())
    assert_same_timelines(embedded, neo4j_store, None)


def test_flow_relationships_count_units_shipped(world: Path, neo4j_store: Neo4jStore, tmp_path: Path):
    load_dataset(neo4j_store, world, rejects_dir=tmp_path / "r")
    flows = dict(((a, b), n) for a, b, n in neo4j_store._read(
        "MATCH (a:Party)-[f:FLOW]->(b:Party) RETURN a.party_id, b.party_id, f.units"))
    assert flows[("F1", "D1")] == 3 + 2 + 4 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1  # CA PB CK CJ CT CR CS CM CO CD CH
    assert flows[("D1", "S3")] == 3 + 2 + 1  # CA, CB (in PB), CU
    assert flows[("F1", "D2")] == 1


def test_unreachable_server_is_one_clear_line():
    with pytest.raises(StoreError) as refused:
        Neo4jStore.connect(Settings(neo4j="bolt://127.0.0.1:1", neo4j_password=None))
    message = str(refused.value)
    assert "bolt://127.0.0.1:1" in message and "refused" in message and "\n" not in message
    with pytest.raises(StoreError) as scheme:
        Neo4jStore.connect(Settings.model_construct(neo4j="http://127.0.0.1:7474", neo4j_user="neo4j",
                                                    neo4j_password=None, neo4j_database=None, neo4j_batch_size=10))
    assert "http://127.0.0.1:7474" in str(scheme.value) and "\n" not in str(scheme.value)
    with pytest.raises(StoreError) as dns:
        Neo4jStore.connect(Settings(neo4j="neo4j://no-such-host.invalid:7687", neo4j_password=None))
    assert "no-such-host.invalid" in str(dns.value) and "\n" not in str(dns.value)


def test_routing_scheme_reaches_the_same_database(neo4j_uri: str, neo4j_store: Neo4jStore):
    routed = Neo4jStore.connect(Settings(neo4j=neo4j_uri.replace("bolt://", "neo4j://"), neo4j_password=None))
    try:
        assert routed.counts() == neo4j_store.counts()
    finally:
        routed.close()


def test_names_in_query_text_come_from_allow_lists():
    assert _checked("Store", list(KIND_LABELS.values())) == "Store"
    for bad in ("Store`) DETACH DELETE n //", "Wizard", ""):
        with pytest.raises(ValueError):
            _checked(bad, list(KIND_LABELS.values()) + [bad] * (bad == "Store`) DETACH DELETE n //"))


def test_reads_name_unknown_columns_as_the_writes_do(neo4j_store: Neo4jStore):
    """The reads map an unknown column to its property in Cypher (PROPERTY_OF_K), the
    writes in Python (_property_of): the same names."""
    for column in ("phone", "cg_seq", "cg_x_note", "", "a\x00b", "\x00", ODD_COLUMN, "中文", "Cg_ok", " cg_"):
        assert neo4j_store._read(f"WITH $k AS k RETURN {PROPERTY_OF_K}", k=column) == [[_property_of(column)]], column
