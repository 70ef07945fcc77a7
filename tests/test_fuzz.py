"""Hostile input: property-based tests (hypothesis) over the loaders.

Random and mutated rows in every format (GBK bytes in UTF-8 files, BOMs, CRLF, NUL,
huge fields, wrong types, missing columns, truncated files), random packaging and
region trees. The invariants: a load never raises anything but a one-line
`DatasetError` for a wholly unreadable file; per table accepted + rejected + duplicates
equals the rows in the files (counted independently here); every reject has a reason,
a file and a line; what is accepted obeys the contract (packaging levels increase, the
region tree has no cycle); and the store stays loadable and queryable afterwards.
"""
from __future__ import annotations

import copy

import csv
import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph.embedded import EmbeddedStore
from graph.errors import DatasetError
from graph.model import LEVEL_RANK, TABLES
from loaders.ingest import LoadReport, load_dataset
from loaders.readers import table_of
from queries.diversion import find_diversions
from queries.influence import influencers
from tests.conftest import IN_CI, needs
from tests.worlds import channel_world, write_world

FUZZ = settings(max_examples=20, deadline=None, derandomize=IN_CI, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

WORLD = channel_world()
POOL = sorted({str(v) for rows in WORLD.values() for row in rows for v in row.values() if v is not None})
NASTY = ["", " ", "null", "None", "NaN", "inf", "-1", "1e400", "0x1F", "2024-02-30", "2024-03-01T08:00:00+08:00",
         "2024-03-01 08:00", "1709251200", "中文名", "a,b", 'a"b', "a\nb", "a\r\nb", "\ufeff", "a\x00b", "'; DROP",
         "`}) DETACH DELETE n //", "|", "||HZ||", "x" * 5000, "\U0001F600" * 300]
VALUES = st.one_of(st.sampled_from(POOL), st.sampled_from(NASTY), st.text(max_size=12),
                   st.sampled_from(["unit", "case", "box", "pallet", "scan", "ship", "receive", "open",
                                    "store", "distributor", "consumer", "share"]))
WHOLE_FILE_ERRORS = ("no header row", "header row is not UTF-8", "appears more than once in the header")
FUZZ_TABLES = ("regions", "parties", "products", "codes", "scans", "referrals", "tasks")


def columns_of(table: str) -> list[str]:
    names = list(TABLES[table].column_names) or ["store_id", "task"]
    return [*names, "note"]


@st.composite
def table_rows(draw: st.DrawFn, table: str) -> tuple[list[str], list[list[str | None]]]:
    """A header (some canonical columns dropped, unknown ones added) and rows of values."""
    header = [c for c in columns_of(table) if draw(st.booleans()) or c in TABLES[table].key]
    header += draw(st.lists(st.sampled_from(["extra", "备注", "cg_seq", "_line", "a b", "x`y"]), max_size=2, unique=True))
    header = list(dict.fromkeys(header))
    if len(header) < 2:
        header.append("note2")
    rows = draw(st.lists(st.lists(st.one_of(st.none(), VALUES), min_size=len(header), max_size=len(header)),
                         max_size=12))
    return header, rows


@st.composite
def dataset_files(draw: st.DrawFn) -> dict[str, bytes | pa.Table]:
    """One to four table files, each in a random format, with random byte-level damage."""
    files: dict[str, bytes | pa.Table] = {}
    for table in draw(st.lists(st.sampled_from(FUZZ_TABLES), min_size=1, max_size=4, unique=True)):
        header, rows = draw(table_rows(table))
        fmt = draw(st.sampled_from(["csv", "jsonl", "parquet"]))
        if fmt == "parquet":
            files[f"{table}.parquet"] = pa.table({h: pa.array([r[i] for r in rows], pa.string())
                                                  for i, h in enumerate(header)})
            continue
        if fmt == "csv":
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(header)
            writer.writerows([["" if v is None else v for v in row] for row in rows])
            data = text.getvalue().encode("utf-8", "surrogatepass")
        else:
            data = "".join(json.dumps({h: v for h, v in zip(header, row) if v is not None or draw(st.booleans())},
                                      ensure_ascii=draw(st.booleans())) + "\n" for row in rows).encode("utf-8", "surrogatepass")
        files[f"{table}.{fmt}"] = mutate(draw, data, fmt)
    return files


def mutate(draw: st.DrawFn, data: bytes, fmt: str) -> bytes:
    """Byte-level damage vendors' exports really have."""
    if draw(st.booleans()):
        data = data.replace(b"\n", b"\r\n")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    for _ in range(draw(st.integers(0, 2))):  # GBK (or plain garbage) bytes inside the text
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from(["中文".encode("gbk"), b"\xff\xfe", b"\x00", b"\xc3", b'"', b"{", b","]))
        data = data[:at] + junk + data[at:]
    if draw(st.integers(0, 3)) == 0:  # truncated mid-way
        data = data[:draw(st.integers(0, len(data)))]
    return data


def write_files(folder: Path, files: dict[str, bytes | pa.Table]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, pa.Table):
            pq.write_table(content, folder / name)
        else:
            (folder / name).write_bytes(content)


def rows_in(path: Path) -> int:
    """Data rows a file holds, counted independently of the readers."""
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if path.suffix == ".jsonl":
        return sum(1 for line in raw.split(b"\n") if line.strip())
    records = list(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline="")))
    return sum(1 for record in records[1:] if record and record != [""])


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cg-fuzz-") as tmp:
        yield Path(tmp)


def rejects_of(report: LoadReport) -> list[dict]:
    if not report.rejects_path:
        return []
    lines = Path(report.rejects_path).read_text(encoding="utf-8").split("\n")  # not splitlines: U+0085 is data
    return [json.loads(line) for line in lines if line]


def load_checked(store, folder: Path, rejects: Path) -> LoadReport | None:
    """Load `folder`; check the invariants; None when the dataset is (rightly) unreadable."""
    try:
        report = load_dataset(store, folder, rejects_dir=rejects)
    except DatasetError as exc:  # only for a file with no usable header
        message = str(exc)
        assert "\n" not in message.strip() and str(folder) in message, message
        assert any(reason in message for reason in WHOLE_FILE_ERRORS), message
        return None
    for table in report.accepted:
        read = sum(rows_in(p) for p in folder.iterdir() if table_of(p) == table)
        total = report.accepted[table] + report.rejected[table] + report.duplicates[table]
        assert total == read, (table, report.as_dict())
    records = rejects_of(report)
    assert len(records) == sum(report.rejected.values())
    for record in records:
        assert record["reason"] and record["table"] in TABLES and record["file"].startswith(str(folder))
        assert isinstance(record["line"], int) and record["line"] >= 1, record
    return report


def assert_usable(path: Path, tmp: Path) -> None:
    """The store re-opens, answers queries, and a clean dataset still loads into it."""
    store = EmbeddedStore(path)
    find_diversions(store)
    influencers(store, top=3)
    load_checked(store, write_world(channel_world(), tmp / "world"), tmp / "rejects-world")
    store = EmbeddedStore(path)
    assert store.counts()["regions"] >= len(WORLD["regions"])
    find_diversions(store)


@FUZZ
@given(files=dataset_files())
def test_fuzzed_files_never_crash_and_every_row_is_accounted_for(files):
    with scratch() as tmp:
        write_files(tmp / "data", files)
        store = EmbeddedStore(tmp / "store")
        load_checked(store, tmp / "data", tmp / "rejects")
        assert_usable(tmp / "store", tmp)


@FUZZ
@given(files=dataset_files())
def test_fuzzed_files_on_top_of_a_loaded_world(files):
    """References into stored rows, upserts and conflicts with what is already stored."""
    with scratch() as tmp:
        store = EmbeddedStore(tmp / "store")
        load_checked(store, write_world(channel_world(), tmp / "world0"), tmp / "rejects0")
        write_files(tmp / "data", files)
        load_checked(EmbeddedStore(tmp / "store"), tmp / "data", tmp / "rejects")
        assert_usable(tmp / "store", tmp)


LEVELS = list(LEVEL_RANK)


@FUZZ
@given(links=st.lists(st.tuples(st.integers(0, 14), st.sampled_from(LEVELS), st.one_of(st.none(), st.integers(0, 15))),
                      min_size=1, max_size=30))
def test_random_packaging_graphs_keep_only_a_valid_forest(links):
    """Cycles, self-parents, level inversions, duplicates and dangling parents among codes."""
    rows = [{"code": f"K{c}", "level": level, "parent_code": None if p is None else f"K{p}"} for c, level, p in links]
    with scratch() as tmp:
        store = EmbeddedStore(tmp / "store")
        report = load_checked(store, write_world({"codes": rows}, tmp / "data"), tmp / "rejects")
        codes = {r["code"]: r for r in EmbeddedStore(tmp / "store").table("codes").to_pylist()}
        assert report.accepted["codes"] == len(codes)
        for code in codes.values():
            depth, node = 0, code
            while node["parent_code"] is not None:
                parent = codes[node["parent_code"]]  # a stored parent always exists
                assert LEVEL_RANK[parent["level"]] > LEVEL_RANK[node["level"]]
                node, depth = parent, depth + 1
            assert depth < len(LEVELS)
        for record in rejects_of(report):
            assert record["reason"].split(" ")[0] in ("packaging", "level", "unknown", "conflicting"), record


@FUZZ
@given(links=st.lists(st.tuples(st.integers(0, 12), st.one_of(st.none(), st.integers(0, 13))), min_size=1, max_size=25))
def test_random_region_graphs_keep_only_a_tree(links):
    rows = [{"region_id": f"R{r}", "parent_id": None if p is None else f"R{p}"} for r, p in links]
    with scratch() as tmp:
        report = load_checked(EmbeddedStore(tmp / "store"), write_world({"regions": rows}, tmp / "data"), tmp / "rejects")
        regions = {r["region_id"]: r["parent_id"] for r in EmbeddedStore(tmp / "store").regions().to_pylist()}
        assert report.accepted["regions"] == len(regions)
        for start in regions:
            seen, region = set(), start
            while region is not None:
                assert region not in seen, f"cycle through {region}"
                seen.add(region)
                region = regions[region]


# ------------------------------------------------------------------ fixed hostile files
# Each of these once broke a load (a traceback, a whole file lost, or a Neo4j abort).


def test_parquet_timestamps_and_typed_columns_load(tmp_path):
    import datetime as dt
    import decimal

    ts = [dt.datetime(2024, 3, 1, 8, 0, 0, 123456), dt.datetime(2024, 3, 2)]
    data = write_world({k: WORLD[k] for k in ("regions", "parties", "products", "codes")}, tmp_path / "d")
    pq.write_table(pa.table({"code": ["A1", "A2"], "action": ["scan", "scan"], "party_id": ["wx-p1", "wx-p2"],
                             "ts": pa.array([int(t.replace(tzinfo=dt.UTC).timestamp() * 1e6) * 1000 + 789 for t in ts],
                                            pa.timestamp("ns")),
                             "day": pa.array([dt.date(2024, 3, 1)] * 2), "price": pa.array([decimal.Decimal("1.50")] * 2),
                             "wait": pa.array([dt.timedelta(seconds=3)] * 2), "tags": pa.array([[b"\xff"], None])}),
                   data / "scans.parquet")
    report = load_checked(EmbeddedStore(tmp_path / "s"), data, tmp_path / "r")
    assert report.accepted["scans"] == 2, rejects_of(report)
    scans = EmbeddedStore(tmp_path / "s").table("scans")
    assert scans.column("ts").to_pylist() == [t.replace(tzinfo=dt.UTC) for t in ts]
    assert scans.column("day").to_pylist() == ["2024-03-01"] * 2 and scans.column("price").to_pylist() == ["1.50"] * 2


def test_repeated_column_names_are_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "products.csv").write_text("sku,name,sku\nP1,a,P2\n")
    with pytest.raises(DatasetError, match="column 'sku' appears more than once"):
        load_dataset(EmbeddedStore(tmp_path / "s"), tmp_path / "d", rejects_dir=tmp_path / "r")
    pq.write_table(pa.Table.from_arrays([pa.array(["P1"]), pa.array(["P2"])], names=["sku", "sku"]),
                   tmp_path / "d" / "products.parquet")
    (tmp_path / "d" / "products.csv").unlink()
    with pytest.raises(DatasetError, match="products.parquet: column 'sku'"):
        load_dataset(EmbeddedStore(tmp_path / "s"), tmp_path / "d", rejects_dir=tmp_path / "r")


HOSTILE_ROWS = {
    "products.csv": ("sku,unit_price,\nP7,inf,x\nP8,1e400,y\nP9,NaN,z\nP10,2.5,\n", {"products": 1}),
    "codes.csv": ("code,level\n" + "X" * 5000 + ",unit\nOK1,unit\n", {"codes": 1}),
    "parties.jsonl": ('{"party_id": "wx-q", "kind": "consumer", "": "empty name", "a\\u0000b": "nul"}\n', {"parties": 1}),
}


@pytest.mark.parametrize("name", list(HOSTILE_ROWS))
def test_hostile_rows_load_the_same_into_both_stores(name, make_store, tmp_path):
    """Values Neo4j cannot index or store (huge keys, empty or NUL column names) and
    non-finite numbers: rejected with a reason or stored, identically on both stores."""
    text, accepted = HOSTILE_ROWS[name]
    data = write_world({k: WORLD[k] for k in ("regions",)}, tmp_path / "d")
    (data / name).write_text(text)
    report = load_checked(make_store(), data, tmp_path / "r")
    assert {t: report.accepted[t] for t in accepted} == accepted
    assert all(r["reason"] for r in rejects_of(report))


@pytest.mark.neo4j
@settings(max_examples=8, deadline=None, derandomize=IN_CI,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(files=dataset_files())
def test_fuzzed_files_load_identically_into_neo4j(files, neo4j_uri):
    from graph.neo4j_store import Neo4jStore
    from graph.settings import Settings
    from tests.conftest import _wipe_neo4j
    from tests.test_neo4j_store import assert_same_tables

    with scratch() as tmp:
        write_files(tmp / "data", files)
        embedded = EmbeddedStore(tmp / "store")
        want = load_checked(embedded, tmp / "data", tmp / "rejects-e")
        _wipe_neo4j(neo4j_uri)
        neo = Neo4jStore.connect(Settings(neo4j=neo4j_uri, neo4j_password=None, neo4j_batch_size=5))
        try:
            got = load_checked(neo, tmp / "data", tmp / "rejects-n")
            assert (got is None) == (want is None)
            if got is not None:
                assert got.as_dict() | {"rejects_path": None} == want.as_dict() | {"rejects_path": None}
                assert_same_tables(EmbeddedStore(tmp / "store"), neo)
        finally:
            neo.close()


# ------------------------------------------------------------------ EPCIS documents

EPCIS_EXAMPLES = Path(__file__).resolve().parent / "data" / "epcis-examples"
JSON_EXAMPLES = sorted(p.name for p in EPCIS_EXAMPLES.glob("*.json")) if EPCIS_EXAMPLES.is_dir() else []
XML_EXAMPLES = sorted(p.name for p in EPCIS_EXAMPLES.glob("*.xml")) if EPCIS_EXAMPLES.is_dir() else []
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False), st.text(max_size=8),
                 st.just([]), st.just({}), st.just({"@id": 1}), st.just([None, {"epc": []}]),
                 st.sampled_from(["urn:epc:id:sgtin:x", "2024-13-45T99:00:00Z", "ADD", "DELETE", "OBSERVE",
                                  "https://id.gs1.org/00/", "bizstep:shipping"])
                 ).map(copy.deepcopy)  # st.just gives one object every time: a mutation could make it contain itself


@st.composite
def broken_json(draw: st.DrawFn, document: Any) -> Any:
    """`document` with a few random nodes deleted, replaced by junk, or wrapped in lists."""
    paths: list[tuple] = []

    def walk(node: Any, path: tuple) -> None:
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            walk(child, (*path, key))

    walk(document, ())
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths[1:] or [()]))
        if not path:
            return draw(JUNK)
        parent = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            how = draw(st.sampled_from(["delete", "junk", "wrap"]))
            if how == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JUNK) if how != "wrap" else [parent[path[-1]]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return document


@needs(bool(JSON_EXAMPLES), "needs tests/data/epcis-examples")
@settings(max_examples=25, deadline=None, derandomize=IN_CI, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_broken_epcis_documents_never_crash(data):
    """Real example documents with keys deleted, values of the wrong type, lists where
    objects belong (JSON), or truncated and spliced bytes (XML): rejects with reasons or a
    one-line error naming the file, and the store stays usable."""
    name = data.draw(st.sampled_from(JSON_EXAMPLES + XML_EXAMPLES))
    raw = (EPCIS_EXAMPLES / name).read_bytes()
    if name.endswith(".json"):
        document = data.draw(broken_json(json.loads(raw)))
        raw = json.dumps(document, ensure_ascii=False).encode()
    else:
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut] + data.draw(st.sampled_from([b"", b"<", b"</epcisBody>", b"\xff", b"<x>&bogus;</x>"])) + \
            raw[cut + data.draw(st.integers(0, 200)):]
    with scratch() as tmp:
        (tmp / "data").mkdir()
        (tmp / "data" / name).write_bytes(raw)
        store = EmbeddedStore(tmp / "store")
        try:
            report = load_dataset(store, tmp / "data", rejects_dir=tmp / "rejects")
        except DatasetError as exc:
            assert "\n" not in str(exc).strip() and (name in str(exc) or "no tables" in str(exc)), str(exc)
        else:
            assert all(r["reason"] and r["file"].endswith(name) for r in rejects_of(report))
        assert_usable(tmp / "store", tmp)


@needs(bool(JSON_EXAMPLES), "needs tests/data/epcis-examples")
def test_epcis_event_with_a_huge_integer_is_a_reject_record(tmp_path):
    """A value orjson cannot write (an integer beyond 64 bits) once crashed writing rejects."""
    document = json.loads((EPCIS_EXAMPLES / "ObjectEvent.json").read_bytes())
    document["epcisBody"]["eventList"][0]["action"] = 2**70
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ObjectEvent.json").write_text(json.dumps(document))
    report = load_dataset(EmbeddedStore(tmp_path / "s"), tmp_path / "d", rejects_dir=tmp_path / "r")
    assert str(2**70) in json.dumps([r["row"] for r in rejects_of(report)])


def test_blank_lines_in_csv_are_not_rows(tmp_path):
    """pyarrow reads a blank line as a row of empty values; such lines (at the end, where
    exports often leave one, or inside) are skipped, not rejected; a row of empty fields is
    a row (rejected with its reason)."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "products.csv").write_bytes(b"sku,name\r\nP1,a\r\n\r\n")
    (data / "products_b.csv").write_bytes(b"sku,name\nP2,b\n\nP3,c\n,\n\n\n")
    (data / "regions.csv").write_bytes(b"region_id,na\rme\nR1,x\n")
    report = load_checked(EmbeddedStore(tmp_path / "s"), data, tmp_path / "r")
    assert (report.accepted["products"], report.rejected["products"]) == (3, 1)
    assert [(r["file"].endswith("products_b.csv"), r["line"]) for r in rejects_of(report) if r["table"] == "products"] == [(True, 5)]
    assert report.rejected["regions"] == 1  # a bare CR ends the header: "me" is a row of the wrong width
