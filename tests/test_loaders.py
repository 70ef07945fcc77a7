"""Loading: validation rules, formats, duplicates, idempotence and atomicity."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from graph.embedded import EmbeddedStore
from graph.errors import DatasetError
from loaders.ingest import load_dataset
from tests.worlds import channel_world, write_world


def load(store, folder: Path, tmp_path: Path):
    return load_dataset(store, folder, rejects_dir=tmp_path / "rejects")


def rejects_of(report) -> list[dict]:
    if not report.rejects_path:
        return []
    return [json.loads(line) for line in Path(report.rejects_path).read_text().splitlines()]


BAD_ROWS = [
    ("regions", {"region_id": None, "name": "nameless"}, "missing required value: region_id"),
    ("regions", {"region_id": "X1", "parent_id": "NOWHERE"}, "unknown parent region 'NOWHERE'"),
    ("regions", {"region_id": "CN", "name": "Other China", "parent_id": None}, "conflicting duplicate region_id"),
    ("products", {"sku": "P9", "unit_price": "cheap"}, "bad number in unit_price"),
    ("products", {"sku": "P8", "unit_price": "-1"}, "unit_price must not be negative"),
    ("parties", {"party_id": "X", "kind": "wholesaler", "region_id": "HZ"}, "bad kind 'wholesaler'"),
    ("parties", {"party_id": "S9", "kind": "store", "upstream_id": "D1"}, "a store needs region_id"),
    ("parties", {"party_id": "S8", "kind": "store", "region_id": "MARS"}, "unknown region 'MARS'"),
    ("parties", {"party_id": "D9", "kind": "distributor", "region_id": "HZ", "territory": "ZJ|MOON"}, "unknown territory region 'MOON'"),
    ("parties", {"party_id": "S7", "kind": "store", "region_id": "HZ", "upstream_id": "GHOST"}, "unknown upstream party 'GHOST'"),
    ("parties", {"party_id": None, "kind": "store", "region_id": "HZ"}, "missing required value: party_id"),
    ("codes", {"code": "Z1", "level": "crate"}, "bad level 'crate'"),
    ("codes", {"code": "Z2", "level": "unit", "parent_code": "NOPE"}, "unknown parent_code 'NOPE'"),
    ("codes", {"code": "Z3", "level": "pallet", "parent_code": "CA"}, "level inversion"),
    ("codes", {"code": "Z4", "level": "case", "parent_code": "CA"}, "level inversion"),
    ("codes", {"code": "Z5", "level": "unit", "produced_at": "yesterday"}, "bad timestamp in produced_at"),
    ("scans", {"event_id": "x1", "code": "NOCODE", "action": "ship", "party_id": "F1", "ts": "2024-01-01"}, "unknown code 'NOCODE'"),
    ("scans", {"event_id": "x2", "code": "CA", "action": "teleport", "party_id": "F1", "ts": "2024-01-01"}, "bad action 'teleport'"),
    ("scans", {"event_id": "x3", "code": "CA", "action": "ship", "party_id": "NOBODY", "ts": "2024-01-01"}, "unknown party 'NOBODY'"),
    ("scans", {"event_id": "x4", "code": "CA", "action": "ship", "party_id": "F1", "counterparty_id": "NOBODY", "ts": "2024-01-01"}, "unknown counterparty 'NOBODY'"),
    ("scans", {"event_id": "x5", "code": "CA", "action": "ship", "party_id": "F1", "ts": "2024-02-30T10:00:00"}, "bad timestamp in ts"),
    ("scans", {"event_id": "x6", "code": "CA", "action": "open", "party_id": "S1", "ts": None}, "missing required value: ts"),
    ("scans", {"event_id": "x7", "code": "A1", "action": "scan", "party_id": "wx-new", "ts": "2024-01-01", "region_id": "ATLANTIS"}, "unknown region 'ATLANTIS'"),
    ("referrals", {"referrer_id": "C1", "referee_id": None, "ts": "2024-01-01"}, "missing required value: referee_id"),
    ("referrals", {"referrer_id": "C1", "referee_id": "wx-z", "ts": "2024-01-01", "channel": "tv"}, "bad channel 'tv'"),
    ("referrals", {"referrer_id": "C1", "referee_id": "wx-z", "ts": "2024-01-01", "code": "NOCODE"}, "unknown code 'NOCODE'"),
]


@pytest.mark.parametrize(("table", "row", "reason"), BAD_ROWS, ids=[f"{t}-{r}" for t, _, r in BAD_ROWS])
def test_each_rule_rejects_the_row_that_breaks_it(tmp_path, table, row, reason):
    world = channel_world()
    world[table] = [*world[table], row]
    store = EmbeddedStore(tmp_path / "store")
    report = load(store, write_world(world, tmp_path / "data"), tmp_path)
    rejects = rejects_of(report)
    assert report.rejected[table] == 1, rejects
    assert sum(report.rejected.values()) == 1
    (reject,) = rejects
    assert reason in reject["reason"]
    assert reject["file"].endswith(f"{table}.csv")
    assert reject["line"] == len(world[table]) + 1  # the header is line 1
    assert reject["table"] == table


def test_times_read_fast_as_the_reference_parser_reads_them():
    """The fast path of times (numpy and Arrow) gives what pandas gives value by value:
    offsets, Z, no offset, fractions, leap days, Feb 30, 24:00, :60, years near the edges
    of its range, other forms; chunks with and without a value that Arrow refuses."""
    from loaders.validate import _parse_ts, _parse_ts_exact

    rng = np.random.default_rng(5)
    n = 40_000
    year = rng.choice([1600, 1677, 1678, 1900, 2000, 2024, 2100, 2261, 2262, 2300], n)
    month, day = rng.integers(1, 13, n), np.where(rng.random(n) < 0.02, rng.integers(29, 33, n), rng.integers(1, 29, n))
    hour, minute, second = rng.integers(0, 25, n), rng.integers(0, 60, n), rng.integers(0, 61, n)
    tails = rng.choice(["", "Z", "+05:30", "-09:30", "-00:00", "+0530", "+05", ".25", ".999999Z", ".1234567Z", "+24:00", " ", "z", "x"], n)
    values = [f"{y:04d}-{m:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{t}"
              for y, m, d, h, mi, s, t in zip(year, month, day, hour, minute, second, tails)]
    values += ["2024-04-01 09:49:46", "2024-04-01", "20240401T094946Z", "2024-04-01T09:49", "", "garbage", None,
               "\u00e92024-04-01T09:49:46", "2024-04-01T09:49:\u00e96", "2024-04-01T09:49:46\u00e9", "+2024-04-01T09:49:46"]
    at, with_times = 0, 0
    while at < len(values):
        size = int(rng.integers(1, 300))
        chunk = pa.array(values[at:at + size], pa.string())
        at += size
        parsed = _parse_ts(chunk)
        assert parsed.equals(_parse_ts_exact(chunk)), chunk
        with_times += parsed.null_count < len(chunk)
    assert with_times > 50


def test_decimal_comma_and_a_time_beside_nanoseconds_are_times():
    """ISO 8601 writes a fraction of a second after a comma or a point; a valid time is a
    time whatever the other values of its chunk (here one with nanoseconds); RFC 3339 lets
    `t` and `z` be lower case."""
    from loaders.validate import _parse_ts

    values = ["2024-02-01T08:00:00,5+08:00", "20240201T080000,25Z", "2024-02-01 08:00:00,123456789",
              "0001-01-01T00:00:00Z", "2024-02-01T08:00:00.123456789Z", "2024-02-01t08:00:00z", "2024-02-01t08:00:00+08:00"]
    assert [t and t.isoformat() for t in _parse_ts(pa.array(values)).to_pylist()] == [
        "2024-02-01T00:00:00.500000+00:00", "2024-02-01T08:00:00.250000+00:00", "2024-02-01T08:00:00.123456+00:00",
        "0001-01-01T00:00:00+00:00", "2024-02-01T08:00:00.123456+00:00", "2024-02-01T08:00:00+00:00",
        "2024-02-01T00:00:00+00:00"]


def test_packaging_cycle_and_orphans_of_rejected_codes(tmp_path):
    world = channel_world()
    world["codes"] += [{"code": "Y1", "level": "case", "parent_code": "Y2"}, {"code": "Y2", "level": "case", "parent_code": "Y1"},
                       {"code": "Y3", "level": "unit", "parent_code": "Y1"}]
    report = load(EmbeddedStore(tmp_path / "s"), write_world(world, tmp_path / "d"), tmp_path)
    reasons = {r["row"]["code"]: r["reason"] for r in rejects_of(report)}
    assert reasons["Y1"].startswith("packaging cycle") and reasons["Y2"].startswith("packaging cycle")
    assert reasons["Y3"] == "unknown parent_code 'Y1'"


def test_region_cycle_rejected(tmp_path):
    world = channel_world()
    world["regions"] += [{"region_id": "L1", "parent_id": "L2"}, {"region_id": "L2", "parent_id": "L1"}]
    report = load(EmbeddedStore(tmp_path / "s"), write_world(world, tmp_path / "d"), tmp_path)
    assert sorted(r["reason"] for r in rejects_of(report))[0].startswith("region tree cycle")
    assert report.rejected["regions"] == 2


def _contents(store: EmbeddedStore) -> dict[str, list]:
    out = {}
    for name in ("regions", "parties", "products", "codes", "scans", "referrals"):
        table = store.table(name)
        keep = [c for c in table.column_names if c not in ("parent_idx", "unit_count", "code_idx", "event_order")]
        rows = table.select(sorted(keep)).to_pylist()
        out[name] = sorted(rows, key=lambda r: json.dumps(r, default=str, sort_keys=True))
    return out


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_format_loads_the_same_data(tmp_path, fmt):
    reference = EmbeddedStore(tmp_path / "ref")
    ref_report = load(reference, write_world(channel_world(), tmp_path / "csv"), tmp_path)
    store = EmbeddedStore(tmp_path / fmt)
    report = load(store, write_world(channel_world(), tmp_path / f"data-{fmt}", fmt), tmp_path)
    assert report.accepted == ref_report.accepted
    assert report.duplicates == {**ref_report.duplicates} and report.duplicates["scans"] == 2
    assert _contents(store) == _contents(reference)


def test_counts_duplicates_and_implicit_consumers(tmp_path):
    store = EmbeddedStore(tmp_path / "s")
    world = channel_world()
    report = load(store, write_world(world, tmp_path / "d"), tmp_path)
    assert report.accepted["scans"] == len(world["scans"]) - 2
    assert report.duplicates["scans"] == 2
    assert report.rejected == {t: 0 for t in report.accepted}
    wx = {r["party_id"] for r in world["scans"] if r["party_id"].startswith("wx-")}
    assert report.implicit_consumers == len(wx)
    consumers = store.stored("parties", pa.array(["wx-k1", "wx-h1"])).to_pylist()
    assert {(c["party_id"], c["kind"], c["region_id"]) for c in consumers} == {("wx-k1", "consumer", "NJ"), ("wx-h1", "consumer", "HZ-XH")}


def test_reload_is_idempotent(tmp_path):
    store = EmbeddedStore(tmp_path / "s")
    data = write_world(channel_world(), tmp_path / "d")
    first = load(store, data, tmp_path)
    before = _contents(store)
    second = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert _contents(EmbeddedStore(tmp_path / "s")) == before
    assert sum(second.accepted.values()) == 0 and second.implicit_consumers == 0
    for table, n in first.accepted.items():
        assert second.duplicates[table] == n + first.duplicates[table]


def test_incremental_load_and_updates(tmp_path):
    world = channel_world()
    store = EmbeddedStore(tmp_path / "s")
    load(store, write_world({k: world[k] for k in ("regions", "parties", "products", "codes")}, tmp_path / "master"), tmp_path)
    report = load(store, write_world({"scans": world["scans"]}, tmp_path / "scans"), tmp_path)
    assert report.rejected["scans"] == 0 and report.accepted["scans"] == len(world["scans"]) - 2
    moved = [{"party_id": "S1", "kind": "store", "region_id": "NB"}]
    load(store, write_world({"parties": moved}, tmp_path / "update"), tmp_path)
    s1 = EmbeddedStore(tmp_path / "s").stored("parties", pa.array(["S1"])).to_pylist()[0]
    assert (s1["region_id"], s1["name"], s1["upstream_id"]) == ("NB", "Xihu store", "D1")  # missing values kept


def test_update_is_a_duplicate_only_when_it_changes_nothing(tmp_path):
    """DOMAIN.md §2: unknown columns are kept, and a second folder updates the first. A row
    that only fills in a value (an unknown column, a code's produced_at) is an update; a
    row that only leaves stored values empty changes nothing, also when loaded again."""
    store = EmbeddedStore(tmp_path / "s")
    load(store, write_world(channel_world(), tmp_path / "d"), tmp_path)
    update = {"parties": [{"party_id": "F1", "kind": "factory", "name": "Brand factory", "region_id": "HZ", "phone": "0571"},
                          {"party_id": "D1", "kind": "distributor", "region_id": "HZ"}],
              "codes": [{"code": "A1", "level": "unit", "produced_at": "2024-01-02T08:00:00+08:00", "color": "red"},
                        {"code": "A2", "level": "unit"}]}
    data = write_world(update, tmp_path / "update")
    first = load(store, data, tmp_path)
    assert (first.accepted, first.duplicates) == ({"parties": 1, "codes": 1}, {"parties": 1, "codes": 1})
    again = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert (again.accepted, again.duplicates) == ({"parties": 0, "codes": 0}, {"parties": 2, "codes": 2})
    stored = EmbeddedStore(tmp_path / "s")
    f1, d1 = sorted(stored.stored("parties", pa.array(["F1", "D1"])).to_pylist(), key=lambda p: p["party_id"] != "F1")
    assert (f1["phone"], d1["name"], d1["territory"]) == ("0571", "Zhejiang distributor", "ZJ")
    a1 = stored.stored("codes", pa.array(["A1"])).to_pylist()[0]
    assert (a1["color"], a1["produced_at"].isoformat(), a1["parent_code"]) == ("red", "2024-01-02T00:00:00+00:00", "CA")


def test_csv_irregular_rows_bom_crlf_and_bad_utf8(tmp_path):
    data = tmp_path / "d"
    write_world(channel_world(), data)
    raw = (data / "regions.csv").read_bytes().replace(b"\n", b"\r\n")
    raw = b"\xef\xbb\xbf" + raw + b'"X1","too","many","cols"\r\n' + b'"X2","\xd6\xd0\xce\xc4","CN"\r\n'
    (data / "regions.csv").write_bytes(raw)
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    rejects = rejects_of(report)
    n = len(channel_world()["regions"])
    assert report.accepted["regions"] == n
    assert [(r["line"], r["reason"][:20]) for r in rejects] == [(n + 2, "expected 3 columns, "), (n + 3, "invalid UTF-8 text (")]


def test_csv_value_with_a_line_break_keeps_physical_line_numbers(tmp_path):
    data = tmp_path / "d"
    write_world(channel_world(), data)
    with (data / "products.csv").open("a", encoding="utf-8") as f:
        f.write('"P5","Gift box\nof two",5\n"P6","Box",cheap\n')
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    (reject,) = rejects_of(report)
    assert (reject["line"], reject["row"]["sku"]) == (len(channel_world()["products"]) + 4, "P6")  # P5 takes two lines
    assert EmbeddedStore(tmp_path / "s").stored("products", pa.array(["P5"])).column("name").to_pylist() == ["Gift box\nof two"]


def test_header_spanning_lines_that_are_not_utf8_is_a_clear_error(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "regions.csv").write_bytes(b'region_id,"name\n\xff\xfe",parent_id\nA,B,C\n')
    with pytest.raises(DatasetError, match="regions.csv: the header row is not UTF-8"):
        load(EmbeddedStore(tmp_path / "s"), data, tmp_path)


def test_header_without_rows_or_line_break_is_an_empty_table(tmp_path):
    data = write_world({"regions": channel_world()["regions"]}, tmp_path / "d")
    (data / "products.csv").write_text("sku,name,unit_price")
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert (report.accepted["products"], report.rejected["products"]) == (0, 0)


def test_task_rows_without_values_are_one_task(tmp_path):
    data = write_world({"regions": channel_world()["regions"]}, tmp_path / "d")
    (data / "tasks.jsonl").write_text("{}\n{}\n")
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert (report.accepted["tasks"], report.duplicates["tasks"]) == (1, 1)


def test_tasks_loaded_again_are_duplicates(tmp_path):
    """A task is its content: loading its file again, or with its columns in another order
    beside a file with other columns, stores nothing new."""
    data = write_world({"tasks": [{"store_id": "S1", "task": "display"}, {"store_id": "S3", "task": "tasting"},
                                  {"store_id": "S1", "task": "display"}]}, tmp_path / "d")
    store = EmbeddedStore(tmp_path / "s")
    first = load(store, data, tmp_path)
    assert (first.accepted["tasks"], first.duplicates["tasks"]) == (2, 1)
    for _ in range(2):
        again = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
        assert (again.accepted["tasks"], again.duplicates["tasks"]) == (0, 3)
    (data / "tasks.csv").write_text("task,store_id\ndisplay,S1\n")
    (data / "tasks_2.csv").write_text("store_id,task,reward\nS9,tasting,5\n")
    later = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert (later.accepted["tasks"], later.duplicates["tasks"]) == (1, 1)
    assert EmbeddedStore(tmp_path / "s").table("tasks").num_rows == 3


def test_columns_channelgraph_computes_are_ignored_with_a_warning(tmp_path, caplog):
    """An input column named as one channelgraph computes (a store's derived column, a
    task's id, a reader's `_file`/`_line`) is not loaded, with a warning naming the file
    and the column; the store stays queryable and loads again. Another table's column of
    such a name is an unknown column like any other, kept by later loads."""
    from queries.diversion import judge_store

    world = channel_world()
    for row in world["codes"]:
        row.update(parent_idx="7", unit_count="x")
    for row in world["scans"]:
        row.update(code_idx="1", event_order="2", retracted="true")
    world["regions"][0]["_line"] = "99"
    world["products"][0]["unit_count"] = "6"
    world["tasks"] = [{"task": "display", "task_id": "T1"}, {"task": "display", "task_id": "T2"}]
    data = write_world(world, tmp_path / "d")
    store = EmbeddedStore(tmp_path / "s")
    with caplog.at_level("WARNING", logger="loaders.readers"):
        report = load(store, data, tmp_path)
    warned = {(Path(r.args[0]).name, r.args[1]) for r in caplog.records if "computed by channelgraph" in r.getMessage()}
    assert warned == {("codes.csv", "parent_idx"), ("codes.csv", "unit_count"), ("scans.csv", "code_idx"),
                      ("scans.csv", "event_order"), ("scans.csv", "retracted"), ("regions.csv", "_line"),
                      ("tasks.csv", "task_id")}
    assert (report.accepted["tasks"], report.duplicates["tasks"], sum(report.rejected.values())) == (1, 1, 0)
    store = EmbeddedStore(tmp_path / "s")
    assert store.table("codes").column("parent_idx").type == pa.int32()
    assert not store.table("scans").column("retracted").to_numpy().any()
    assert len(judge_store(store).findings) == len(judge_store(EmbeddedStore(_loaded_world(tmp_path))).findings)
    load(store, write_world({"regions": [{"region_id": "WZ", "parent_id": "ZJ"}]}, tmp_path / "more"), tmp_path)
    store = EmbeddedStore(tmp_path / "s")
    assert store.stored("products", pa.array([world["products"][0]["sku"]])).column("unit_count").to_pylist() == ["6"]
    again = load(store, data, tmp_path)
    assert sum(again.accepted.values()) == 0


def _loaded_world(tmp_path: Path) -> Path:
    """A store of the channel world as it is (a reference)."""
    load(EmbeddedStore(tmp_path / "reference"), write_world(channel_world(), tmp_path / "world"), tmp_path)
    return tmp_path / "reference"


@pytest.mark.parametrize("irregular", [False, True], ids=["fast", "exact"])
def test_blank_header_names_lose_nothing(tmp_path, irregular):
    """A spreadsheet's blank header cells: a column without values is no column, one with
    values is kept as `column_N` (N: its place in the header); by the fast and the exact
    CSV reader alike."""
    data = write_world({k: channel_world()[k] for k in ("regions", "parties", "codes")}, tmp_path / "d")
    rows = "E1,A1,scan,wx-1,2024-02-06T00:00:00Z,,\nE2,A2,scan,wx-2,2024-02-06T00:00:00Z,,kept\n"
    (data / "scans.csv").write_text("event_id,code,action,party_id,ts,, \n" + rows + ("E3,too,few\n" if irregular else ""))
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert (report.accepted["scans"], report.rejected["scans"]) == (2, int(irregular))
    scans = EmbeddedStore(tmp_path / "s").table("scans")
    assert "column_6" not in scans.column_names
    assert sorted(zip(scans.column("event_id").to_pylist(), scans.column("column_7").to_pylist())) == [
        ("E1", None), ("E2", "kept")]


def test_empty_files_are_tables_without_rows(tmp_path):
    """A file with no bytes (CSV: or nothing but a byte-order mark and white space) is a
    table without rows in every format that has one; a CSV whose first line is blank
    before rows has no header, a clear error naming it."""
    data = write_world({"regions": channel_world()["regions"]}, tmp_path / "d")
    (data / "products.csv").write_bytes(b"")
    (data / "codes.csv").write_bytes(b"\xef\xbb\xbf\r\n")
    (data / "referrals.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"code": pa.array([], pa.string())}), data / "scans.parquet")
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert {t: (report.accepted[t], report.rejected[t]) for t in ("products", "codes", "scans", "referrals")} == dict.fromkeys(
        ("products", "codes", "scans", "referrals"), (0, 0))
    (data / "products.csv").write_text("\nsku,name\nP1,a\n")
    with pytest.raises(DatasetError, match="products.csv: no header row"):
        load(EmbeddedStore(tmp_path / "s"), data, tmp_path)


def test_csv_row_irregular_and_not_utf8_is_rejected_quietly(tmp_path, monkeypatch):
    """No "Exception ignored" report: pyarrow cannot hand such a row to a handler."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    data = write_world({k: channel_world()[k] for k in ("regions", "parties", "codes")}, tmp_path / "d")
    (data / "scans.csv").write_bytes(b"event_id,code,action,party_id,ts\nE9,A1,scan,wx-9,2024-02-06T00:00:00Z\n\xa1\xa2,x\n")
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert [(r["line"], r["reason"], r["row"]) for r in rejects_of(report)] == [(3, "expected 5 columns, got 2", "\ufffd\ufffd,x")]
    assert report.accepted["scans"] == 1 and not unraisable


def test_files_that_are_not_tables_are_reported_skipped(tmp_path):
    data = write_world({"regions": channel_world()["regions"]}, tmp_path / "d")
    (data / "myscans.csv").write_text("code\n")
    (data / "scans.csv.gz").write_bytes(b"")
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path).as_dict()
    assert [(Path(s["path"]).name, s["reason"]) for s in report["skipped"]] == [
        ("myscans.csv", "not a channelgraph table or EPCIS document (did you mean scans.csv?)"),
        ("scans.csv.gz", "not a channelgraph table or EPCIS document (a table is read from a .csv, .jsonl, .parquet file)")]


def test_chunks_change_nothing(tmp_path, monkeypatch):
    """A load read in chunks of a few rows (duplicates, implicit consumers and rejects
    across chunks and files; files of one table with their columns in other orders) gives
    the same report, reject records and stored rows as one read in one chunk per file."""
    import loaders.readers
    from loaders.generate import generate_dataset

    data = tmp_path / "d"
    generate_dataset(data, scale=0.3, seed=3, fmt="mixed")
    scans = pa_csv.read_csv(data / "scans.csv", convert_options=pa_csv.ConvertOptions(strings_can_be_null=True)) \
        if (data / "scans.csv").exists() else pa.Table.from_pylist([json.loads(line) for line in (data / "scans.jsonl").read_text().splitlines()])
    for path in data.glob("scans.*"):
        path.unlink()
    half = scans.num_rows // 2
    write_world({"scans": scans.slice(0, half + 40).to_pylist()}, tmp_path / "a", "jsonl")
    reordered = scans.slice(half).select(list(reversed(scans.column_names))).append_column("note", pa.array(["n"] * (scans.num_rows - half)))
    pa_csv.write_csv(reordered, data / "scans_2.csv")
    (tmp_path / "a" / "scans.jsonl").rename(data / "scans_1.jsonl")

    def loaded(name: str) -> tuple[dict, list[dict], dict]:
        report = load_dataset(EmbeddedStore(tmp_path / name), data, rejects_dir=tmp_path / f"rejects-{name}")
        rejects = [{**r, "file": Path(r["file"]).name} for r in rejects_of(report)]
        return {**report.as_dict(), "rejects_path": None}, rejects, _contents(EmbeddedStore(tmp_path / name))

    whole = loaded("whole")
    monkeypatch.setattr(loaders.readers, "CHUNK_ROWS", 97)
    monkeypatch.setattr(loaders.readers, "CSV_BLOCK_BYTES", 4096)
    chunked = loaded("chunked")
    assert chunked == whole
    assert whole[0]["duplicates"]["scans"] > 40 and whole[0]["implicit_consumers"] and whole[1]


def test_values_are_trimmed_and_empty_ones_missing(tmp_path):
    data = tmp_path / "d"
    write_world(channel_world(), data)
    with (data / "products.csv").open("a", encoding="utf-8") as f:
        f.write('"  P5 ","\u3000Gift box\u3000",""\n"P4","\t",7\n')
    store = EmbeddedStore(tmp_path / "s")
    report = load(store, data, tmp_path)
    assert report.rejected["products"] == 0
    rows = {r["sku"]: r for r in store.stored("products", pa.array(["P5", "P4"])).to_pylist()}
    assert (rows["P5"]["name"], rows["P5"]["unit_price"]) == ("Gift box", None)
    assert (rows["P4"]["name"], rows["P4"]["unit_price"]) == (None, 7.0)


def test_jsonl_bad_lines_are_rejected_with_line_numbers(tmp_path):
    data = write_world(channel_world(), tmp_path / "d", "jsonl")
    with (data / "products.jsonl").open("a") as f:
        f.write('{"sku": "P7", "unit_price": 3\n["not", "an", "object"]\n\n{"sku": "P6", "unit_price": 7}\n')
    report = load(EmbeddedStore(tmp_path / "s"), data, tmp_path)
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects_of(report)] == [(3, "invalid JSON"), (4, "line is not a JSON object")]
    assert report.accepted["products"] == 3


def test_unreadable_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load(EmbeddedStore(tmp_path / "s"), tmp_path / "missing", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no tables"):
        load(EmbeddedStore(tmp_path / "s"), empty, tmp_path)
    (empty / "scans.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="scans.parquet"):
        load(EmbeddedStore(tmp_path / "s"), empty, tmp_path)
    assert not (tmp_path / "s" / "CURRENT").exists()


def test_missing_required_column_rejects_every_row(tmp_path):
    world = channel_world()
    world["products"] = [{"name": p["name"], "unit_price": p["unit_price"]} for p in world["products"]]
    world = {"regions": world["regions"], "products": world["products"]}
    report = load(EmbeddedStore(tmp_path / "s"), write_world(world, tmp_path / "d"), tmp_path)
    assert report.rejected["products"] == 2
    assert {r["reason"] for r in rejects_of(report)} == {"missing required column: sku"}


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "api.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1], **kwargs)


@pytest.mark.slow
def test_interrupted_load_leaves_previous_state_and_rerun_equals_clean_load(tmp_path):
    from loaders.generate import generate_dataset

    world = write_world(channel_world(), tmp_path / "world")
    data = tmp_path / "data"
    generate_dataset(data, scale=3, seed=5)
    clean = tmp_path / "clean"
    for dataset in (world, data):
        assert _cli("load", str(dataset), "--store", str(clean)).wait() == 0
    expected = _contents(EmbeddedStore(clean))

    store = tmp_path / "store"
    assert _cli("load", str(world), "--store", str(store)).wait() == 0
    before = _contents(EmbeddedStore(store))
    seen = []
    for delay in (0.3, 0.8, 1.3, 1.8, 2.5, 3.5, 5.0):
        process = _cli("load", str(data), "--store", str(store))
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        after = _contents(EmbeddedStore(store))
        assert after == before or after == expected  # never a half-written store
        seen.append(after == before)
        if after == expected:
            break
    assert seen[0]  # the first kill landed before the new version was made live
    assert _cli("load", str(data), "--store", str(store)).wait() == 0
    assert _contents(EmbeddedStore(store)) == expected
    assert not list(store.glob(".tmp-*"))


# Consumers registered by this load (DOMAIN.md §2): a scan or referral registers an unknown
# id; every other reference may name it, wherever it is in the load.
LATE_CONSUMER_SCANS = [
    {"event_id": "q1", "code": "CT", "action": "ship", "party_id": "S1", "counterparty_id": "wx-late", "ts": "2024-02-04T00:00:00Z"},
    {"event_id": "q2", "code": "CT", "action": "ship", "party_id": "wx-late", "counterparty_id": "S1", "ts": "2024-03-05T00:00:00Z"},
    {"event_id": "q3", "code": "CT", "action": "receive", "party_id": "S1", "counterparty_id": "wx-late", "ts": "2024-03-06T00:00:00Z"},
    {"event_id": "q4", "code": "CT", "action": "ship", "party_id": "S1", "counterparty_id": "wx-a1", "ts": "2024-03-07T00:00:00Z"},
    {"event_id": "q5", "code": "CT", "action": "ship", "party_id": "S1", "counterparty_id": "wx-referee", "ts": "2024-03-08T00:00:00Z"},
    {"event_id": "q6", "code": "CT", "action": "ship", "party_id": "S1", "counterparty_id": "wx-nobody", "ts": "2024-03-09T00:00:00Z"},
    {"event_id": "q7", "code": "CT", "action": "open", "party_id": "wx-ghost", "ts": "2024-03-09T00:00:00Z"},
    # a scan naming an unregistered counterparty registers nobody; two such scans naming
    # each other register nobody either; one naming a registered consumer registers its own
    {"event_id": "q8", "code": "T1", "action": "scan", "party_id": "wx-p", "counterparty_id": "wx-q", "ts": "2024-03-10T00:00:00Z"},
    {"event_id": "q9", "code": "T1", "action": "scan", "party_id": "wx-q", "counterparty_id": "wx-p", "ts": "2024-03-10T00:00:00Z"},
    {"event_id": "q10", "code": "T1", "action": "scan", "party_id": "wx-r", "counterparty_id": "wx-late", "ts": "2024-03-11T00:00:00Z", "region_id": "SZ"},
    {"event_id": "q11", "code": "T1", "action": "open", "party_id": "wx-r", "ts": "2024-03-12T00:00:00Z", "region_id": "NJ"},
    # wx-late's scan comes last in the file
    {"event_id": "q12", "code": "T1", "action": "scan", "party_id": "wx-late", "ts": "2024-03-04T00:00:00Z", "region_id": "NJ"},
]
LATE_CONSUMER_REJECTS = {
    "q6": "unknown counterparty 'wx-nobody'",
    "q7": "unknown party 'wx-ghost' (only a consumer scan may introduce a new party)",
    "q8": "unknown counterparty 'wx-q'", "q9": "unknown counterparty 'wx-p'",
}


def _late_consumer_world(order: list[int]) -> dict[str, list[dict]]:
    world = channel_world()
    world["scans"] += [LATE_CONSUMER_SCANS[i] for i in order]
    world["referrals"].append({"referrer_id": "wx-a1", "referee_id": "wx-referee", "ts": "2024-02-28T00:00:00Z"})
    return world


def _loaded(store, report) -> tuple[dict, list, list, list]:
    """What a load of the late-consumer world left: the report's counts, its rejects (by
    row, without file and line), the consumers and the accepted q-events."""
    rejects = sorted((r["row"].get("event_id"), r["reason"]) for r in rejects_of(report))
    consumers = store.parties().filter(pc.equal(store.parties().column("kind"), "consumer"))
    consumers = sorted(consumers.select(["party_id", "region_id"]).to_pylist(), key=lambda r: r["party_id"])
    ids = pa.array([r["event_id"] for r in LATE_CONSUMER_SCANS])
    scans = store.stored("scans", ids).select(["event_id", "action", "party_id", "counterparty_id"])
    counts = {k: v for k, v in report.as_dict().items() if k != "rejects_path"}
    return counts, rejects, consumers, sorted(scans.to_pylist(), key=lambda r: r["event_id"])


def test_counterparty_registered_later_in_the_load_is_accepted(store, tmp_path):
    report = load(store, write_world(_late_consumer_world(list(range(len(LATE_CONSUMER_SCANS)))), tmp_path / "d"), tmp_path)
    counts, rejects, consumers, scans = _loaded(store, report)
    assert rejects == sorted(LATE_CONSUMER_REJECTS.items())
    assert {r["event_id"] for r in scans} == {r["event_id"] for r in LATE_CONSUMER_SCANS} - set(LATE_CONSUMER_REJECTS)
    by_id = {c["party_id"]: c["region_id"] for c in consumers}
    assert [c["party_id"] for c in consumers].count("wx-late") == 1
    assert (by_id["wx-late"], by_id["wx-r"], by_id["wx-referee"]) == ("NJ", "SZ", None)  # regions from scans only
    assert not {"wx-nobody", "wx-ghost", "wx-p", "wx-q"} & set(by_id)
    wx = {r["party_id"] for r in channel_world()["scans"] if r["party_id"].startswith("wx-")}
    assert counts["implicit_consumers"] == len(wx) + 3  # wx-late, wx-r, wx-referee


def test_rows_in_any_order_load_the_same(make_store, tmp_path):
    n = len(LATE_CONSUMER_SCANS)
    results = []
    for seed, order in enumerate([list(range(n)), list(reversed(range(n))),
                                  *(list(np.random.default_rng(s).permutation(n)) for s in range(3))]):
        store = make_store()
        report = load(store, write_world(_late_consumer_world(order), tmp_path / f"d{seed}"), tmp_path / f"r{seed}")
        results.append(_loaded(store, report))
    assert all(result == results[0] for result in results[1:])
    assert results[0][1] == sorted(LATE_CONSUMER_REJECTS.items())


def test_counterparty_registered_by_an_earlier_load(store, tmp_path):
    world = _late_consumer_world(list(range(len(LATE_CONSUMER_SCANS))))
    later = [r for r in world["scans"] if r["event_id"] in {f"q{i}" for i in range(1, 12)}]
    first = [r for r in world["scans"] if r not in later]  # with wx-late's scan (and wx-referee's referral)
    load(store, write_world({**world, "scans": first}, tmp_path / "a"), tmp_path / "ra")
    report = load(store, write_world({"scans": later}, tmp_path / "b"), tmp_path / "rb")
    _, rejects, consumers, scans = _loaded(store, report)
    assert rejects == sorted(LATE_CONSUMER_REJECTS.items())
    assert {r["event_id"] for r in scans} == {r["event_id"] for r in LATE_CONSUMER_SCANS} - set(LATE_CONSUMER_REJECTS)
    assert [c["party_id"] for c in consumers].count("wx-late") == 1


def _random_chunk(rng: np.random.Generator, n: int) -> tuple[pa.Table, pa.Table | None]:
    """A chunk as validation adds it: typed columns where typing changed the values (times,
    numbers), raw text columns (some absent, some with nulls or empty strings, some sliced
    or in pieces), and `_file`/`_line` when the raw rows are kept."""
    def text(k: int) -> pa.Array:
        values = [None if rng.random() < 0.2 else "".join(rng.choice(list("ab中"), rng.integers(0, 4))) for _ in range(k + 2)]
        return pa.array(values, pa.string()).slice(1, k)  # sliced: offsets do not start at 0
    times = [None if rng.random() < 0.3 else int(v) for v in rng.integers(0, 10**12, n)]
    typed = {"t": pa.array(times if rng.random() < 0.8 else [None] * n, pa.timestamp("us", tz="UTC"))}  # always typed
    if rng.random() < 0.6:
        typed["f"] = pa.array(rng.random(n)).slice(0, n)
    if rng.random() < 0.3:
        typed["b"] = pa.array(rng.random(n) < 0.5)
    if rng.random() < 0.3:
        return pa.table(typed), None
    raw = {name: (pa.chunked_array([text(n // 2), text(n - n // 2)]) if rng.random() < 0.5 else text(n))
           for name in ("a", "t", "x") if rng.random() < 0.7}
    raw["_file"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([f"f{rng.integers(3)}.csv"]))
    raw["_line"] = pa.array(rng.integers(2, 10**6, n))
    return pa.table(typed), pa.table(raw)


@pytest.mark.parametrize("seed", range(12))
def test_spilled_chunks_read_back_as_kept_in_memory(seed, tmp_path):
    """A big table's rows go to spill files one chunk after another and are read back a
    column at a time, a chunk at a time or a few raw rows at a time: always the values
    added (typed where typed, raw otherwise, nulls where a chunk lacked the column)."""
    from loaders.validate import _Chunks
    rng = np.random.default_rng(seed)
    types = {"a": pa.string(), "x": pa.string(), "t": pa.timestamp("us", tz="UTC"), "f": pa.float64(), "b": pa.bool_()}
    chunks = [_random_chunk(rng, int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 7)))]
    kept = [_Chunks(None), _Chunks(tmp_path / "spill")]
    for typed, raw in chunks:
        for c in kept:
            c.add(typed.num_rows, typed, raw)
    for c in kept:
        c.flush()

    def value(typed: pa.Table, raw: pa.Table | None, name: str) -> list:
        for table in (typed, raw):
            if table is not None and name in table.column_names:
                return table.column(name).to_pylist()
        return [None] * typed.num_rows

    for c in kept:
        for name, type_ in types.items():
            want = [v for typed, raw in chunks for v in value(typed, raw, name)]
            assert c.column(name, type_).to_pylist() == want, (name, c.folder)
            for i, (typed, raw) in enumerate(chunks):
                assert c.part(i, name, type_).to_pylist() == value(typed, raw, name)
        raw_rows = np.array([row for i, (typed, raw) in enumerate(chunks) if raw is not None
                             for row in range(c.starts[i], c.starts[i + 1]) if rng.random() < 0.5], np.int64)
        names = list(c.names)
        want = [{name: value(None, raw, name)[row - c.starts[i]] if name in raw.column_names else None for name in names}
                for row in raw_rows for i, (typed, raw) in [(np.searchsorted(c.starts, row, "right") - 1, chunks[np.searchsorted(c.starts, row, "right") - 1])]]
        assert [{name: r.get(name) for name in names} for r in c.raw_rows(raw_rows)] == want


def test_a_column_over_the_text_limit_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch, capsys):
    """A spilled string column holds at most MAX_COLUMN_TEXT bytes in one load (Arrow's
    32-bit offsets; 2 GiB): beyond it the load stops with a one-line error naming the
    table and column, and the store keeps what it held."""
    import loaders.validate
    from api.cli import main
    store = EmbeddedStore(tmp_path / "s")
    load(store, write_world(channel_world(), tmp_path / "first"), tmp_path)
    before = _contents(EmbeddedStore(tmp_path / "s"))
    world = channel_world()
    world["codes"] = world["codes"] + [{"code": f"EXTRA{i:04d}", "level": "unit", "sku": "P1"} for i in range(50)]
    monkeypatch.setattr(loaders.validate, "MAX_COLUMN_TEXT", 200)
    assert main(["load", str(write_world(world, tmp_path / "second")), "--store", str(tmp_path / "s")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("channelgraph: error: codes: column code holds over 2 GiB of text in one load"), error
    assert "\n" not in error
    assert _contents(EmbeddedStore(tmp_path / "s")) == before


def test_events_of_a_rejected_party_are_rejected_for_it(tmp_path):
    """A store whose parties row is rejected (a bad lat) is no new consumer when it scans,
    nor a consumer to ship to: its events are rejected, saying why."""
    world = channel_world()
    world["parties"] = [{**p, "lat": "north"} if p["party_id"] == "S3" else p for p in world["parties"]]
    world["scans"] += [{"event_id": "s3-own", "code": "O1", "action": "scan", "party_id": "S3", "ts": "2024-03-09T00:00:00Z"}]
    world["referrals"] += [{"referrer_id": "S3", "referee_id": "wx-new", "ts": "2024-03-09T00:00:00Z", "channel": "store"}]
    store = EmbeddedStore(tmp_path / "s")
    report = load(store, write_world(world, tmp_path / "d"), tmp_path)
    reasons = {(r["table"], r["row"].get("event_id") or r["row"].get("referrer_id")): r["reason"] for r in rejects_of(report)}
    naming_s3 = [s["event_id"] for s in world["scans"] if "S3" in (s["party_id"], s.get("counterparty_id"))]
    assert len(naming_s3) >= 3
    for event in naming_s3:
        assert "names a party whose parties row was rejected" in reasons[("scans", event)], event
    assert "referrer_id 'S3' names a party whose parties row was rejected" == reasons[("referrals", "S3")]
    assert report.rejected["scans"] == len(naming_s3) and report.rejected["parties"] == 1
    assert store.stored("parties", pa.array(["S3"])).num_rows == 0  # not registered as a consumer
