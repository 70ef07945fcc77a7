"""The HTTP API over the hand-checked channel world, on every store (FastAPI TestClient)."""
from __future__ import annotations

import csv
import io
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from graph.embedded import EmbeddedStore
from graph.settings import Settings
from graph.store import open_store
from loaders.ingest import load_dataset
from tests.conftest import _wipe_neo4j
from tests.worlds import CHANNEL_DIVERSIONS, UNTRACKED, channel_world, write_world

DIVERTED = sorted(code for code, *_ in CHANNEL_DIVERSIONS)
KEY = "s3cret-key"


@pytest.fixture
def world(store, tmp_path: Path):
    """A fresh store of each kind holding the channel world (for tests that write)."""
    load_dataset(store, write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    return store


@pytest.fixture(scope="module", params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def shared_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One store of each kind holding the channel world, loaded once for the read-only tests."""
    home = tmp_path_factory.mktemp("api-world")
    folder = write_world(channel_world(), home / "world")
    if request.param == "neo4j":
        uri = request.getfixturevalue("neo4j_uri")
        settings = Settings(neo4j=uri, neo4j_password=None, store=home / "unused")
    else:
        settings = Settings(store=home / "store")

    def load() -> dict[str, int]:
        if settings.neo4j:
            _wipe_neo4j(settings.neo4j)
        load_dataset(store, folder, rejects_dir=home / "rejects")
        return store.counts()

    store = open_store(settings)
    state = {"store": store, "load": load, "counts": load(), "client": TestClient(create_app(settings, store=store))}
    yield state
    store.close()


@pytest.fixture
def client(shared_world: dict) -> TestClient:
    """A client of the shared world; reloaded first if a writing test changed that store."""
    if shared_world["store"].counts() != shared_world["counts"]:
        shared_world["counts"] = shared_world["load"]()
        shared_world["client"].app.state.service.invalidate()
    return shared_world["client"]


def error_of(response, status: int) -> str:
    """The message of an error answer, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "code", "message"}
    assert body["error"]["status"] == status
    return body["error"]["message"]


def test_health_and_readiness(client, shared_world):
    assert client.get("/api/health").json()["status"] == "ok"
    ready = client.get("/api/ready").json()
    assert ready["ready"] is True
    assert ready["backend"] == ("embedded" if isinstance(shared_world["store"], EmbeddedStore) else "neo4j")
    assert ready["counts"] == shared_world["counts"] and ready["counts"]["scans"] > 0


def test_trace_of_a_unit_explains_its_diversion(client):
    body = client.get("/api/trace/SS1").json()
    assert body["assigned_distributor"] == "D1"
    assert [h["event_id"] for h in body["path"]] == ["s1", "s2", "s3", "s4"]
    assert [h["event_id"] for h in body["path"] if h["crossed"]] == ["s4"]
    assert body["diversion"]["exit_via"] == "SD1" and body["diversion"]["crossing_region"] == "NJ"


def test_trace_of_a_case_summarises_its_units(client):
    body = client.get("/api/trace/CK").json()
    assert body["level"] == "case"
    assert body["children"]["units"] == 4
    assert (body["children"]["confirmed"], body["children"]["suspected"]) == (3, 1)


def test_trace_k_changes_the_verdict(client):
    assert client.get("/api/trace/J1").json()["diversion"]["severity"] == "suspected"
    assert client.get("/api/trace/J1", params={"k": 2}).json()["diversion"]["severity"] == "confirmed"


def test_trace_errors_name_the_problem(client):
    assert "'NOPE-1'" in error_of(client.get("/api/trace/NOPE-1"), 404)
    assert "'k'" in error_of(client.get("/api/trace/A1", params={"k": 0}), 422)
    assert "'k'" in error_of(client.get("/api/trace/A1", params={"k": "many"}), 422)


def test_flow_of_a_batch(client):
    body = client.get("/api/flow", params={"batch": "B2"}).json()
    edges = {(e["source"], e["target"]): e["units"] for e in body["edges"]}
    assert edges == {("F1", "D1"): 2, ("D1", "S3"): 2, ("S3", "wx-b2"): 1}
    assert "'ZZ'" in error_of(client.get("/api/flow", params={"batch": "ZZ"}), 404)


def test_diversions_list_filters_and_pages(client):
    every = client.get("/api/diversions", params={"limit": 1000}).json()
    assert every["total"] == len(DIVERTED) and [f["code"] for f in every["items"]] == DIVERTED

    def codes(**params) -> list[str]:
        return [f["code"] for f in client.get("/api/diversions", params={"limit": 1000, **params}).json()["items"]]

    assert codes(severity="suspected") == ["J1", "J2", "K4"]
    assert codes(region="SZ") == ["K4"]
    assert len(codes(region="JS")) == len(DIVERTED)  # a province holds its cities
    assert codes(sku="BJ250") == codes(batch="B2") == ["B1", "B2"]
    assert codes(responsible="D2") == []
    assert codes(since="2024-03-01T00:30:00Z") == ["J2", "K2", "K3", "K4"]
    assert codes(since="2024-03-01T00:30:00", until="2024-03-02T00:00:00Z") == ["J2", "K2"]
    assert codes(k=2, severity="suspected") == ["K4"]
    again = client.get("/api/diversions", params={"limit": 1000})  # answered from the cache this time
    assert again.status_code == 200 and again.json() == every
    page = client.get("/api/diversions", params={"offset": 2, "limit": 3, "sort": "-code"}).json()
    assert (page["total"], page["offset"], page["limit"]) == (len(DIVERTED), 2, 3)
    assert [f["code"] for f in page["items"]] == sorted(DIVERTED, reverse=True)[2:5]
    latest = codes(sort="-crossing_ts")
    assert latest[0] == "K4" and set(latest) == set(DIVERTED)


LIST, CSV, GROUPS = "/api/diversions", "/api/diversions.csv", "/api/diversions/groups"


def test_a_date_alone_until_means_the_whole_day(client):
    """`until=2024-03-01` includes that day's crossings in the JSON, the CSV, the groups and
    the page alike (J1 and K1 at 00:00, J2 at 01:00; K2 on the 2nd is out)."""
    day = {"since": "2024-03-01", "until": "2024-03-01"}
    assert sorted(f["code"] for f in client.get(LIST, params=day).json()["items"]) == ["J1", "J2", "K1"]
    assert sorted(line.split(",")[0] for line in client.get(CSV, params=day).text.splitlines()[1:]) == ["J1", "J2", "K1"]
    assert client.get(GROUPS, params=day).json()["total_units"] == 3
    page = client.get("/views/diversions", params=day).text
    assert sorted(re.findall(r'<tr data-key="([^"]+)"', page)) == ["J1", "J2", "K1"]
    assert client.get(LIST, params={"until": "2024-03-01T00:00:00Z"}).json()["total"] == 11  # a time is that instant
    described = client.get("/openapi.json").json()["paths"][LIST]["get"]["parameters"]
    until = next(p for p in described if p["name"] == "until")
    assert "a date alone includes the whole day" in until["description"] and "ISO 8601" in until["description"]


@pytest.mark.parametrize(("params", "status", "names", "paths"), [
    ({"severity": "maybe"}, 422, "'severity'", (LIST, CSV, GROUPS)),
    ({"since": "yesterday"}, 422, "since 'yesterday'", (LIST, CSV, GROUPS)),
    ({"since": "1710000000"}, 422, "since '1710000000': not an ISO 8601", (LIST, CSV, GROUPS)),  # no Unix times
    ({"until": "2024-02-30"}, 422, "until '2024-02-30'", (LIST, CSV, GROUPS)),
    ({"since": "2024-03-02", "until": "2024-03-01"}, 422, "after until", (LIST, CSV, GROUPS)),
    ({"k": -1}, 422, "'k'", (LIST, CSV, GROUPS)),
    ({"region": "ATLANTIS"}, 404, "'ATLANTIS'", (LIST, CSV, GROUPS)),
    ({"sort": "colour"}, 422, "'sort'", (LIST, CSV)),
    ({"limit": 0}, 422, "'limit'", (LIST,)),
    ({"limit": 1001}, 422, "'limit'", (LIST,)),
    ({"offset": -1}, 422, "'offset'", (LIST,)),
])
def test_diversions_bad_parameters(client, params, status, names, paths):
    for path in paths:
        assert names in error_of(client.get(path, params=params), status)


def test_diversions_csv_download(client):
    response = client.get("/api/diversions.csv", params={"severity": "confirmed"})
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert sorted(r["code"] for r in rows) == sorted(c for c, s, *_ in CHANNEL_DIVERSIONS if s == "confirmed")
    ss1 = next(r for r in rows if r["code"] == "SS1")
    assert (ss1["exit_via"], ss1["territory"], ss1["path"]) == ("SD1", "ZJ", "F1 > D1 > SD1 > S3*")
    assert ss1["path_events"].split("; ")[-1] == "2024-02-04T00:00:00Z ship SD1>S3 @NJ CROSSED"
    empty = client.get("/api/diversions.csv", params={"responsible": "D2"}).text
    assert empty.splitlines() == [empty.splitlines()[0]] and empty.startswith("code,severity")


def test_diversion_groups(client):
    pairs = client.get("/api/diversions/groups", params={"by": "region-pair"}).json()
    assert [(g["from_territory"], g["to_region"], g["units"]) for g in pairs["groups"]] == [("ZJ", "NJ", 14), ("ZJ", "SZ", 1)]
    assert pairs["total_units"] == len(DIVERTED)
    offenders = client.get("/api/diversions/groups", params={"severity": "suspected"}).json()
    assert [(g["rank"], g["responsible"], g["units"]) for g in offenders["groups"]] == [(1, "D1", 3)]
    assert "'by'" in error_of(client.get("/api/diversions/groups", params={"by": "colour"}), 422)


def test_influencers_and_cascades(client):
    top = client.get("/api/influencers", params={"by": "cascade_size", "top": 2}).json()
    assert [(i["party_id"], i["cascade_size"], i["cascade_depth"]) for i in top["items"]] == [("S1", 5, 4), ("C1", 4, 3)]
    share = client.get("/api/influencers", params={"by": "direct", "percent": 100}).json()
    assert share["top"] is None and len(share["items"]) > 2
    tree = client.get("/api/influencers/C1/cascade").json()
    assert (tree["size"], tree["depth"]) == (4, 3)
    assert [n["party_id"] for n in tree["nodes"]][0] == "C1"
    assert {n["party_id"]: n["referrer_id"] for n in tree["nodes"]}["wx-k3"] == "wx-k1"
    assert "'nobody'" in error_of(client.get("/api/influencers/nobody/cascade"), 404)
    assert "'by'" in error_of(client.get("/api/influencers", params={"by": "fame"}), 422)
    assert "'top'" in error_of(client.get("/api/influencers", params={"top": 0}), 422)
    assert "'percent'" in error_of(client.get("/api/influencers", params={"percent": 101}), 422)


def test_routing_errors_share_the_shape(client):
    assert "/api/nothing" in error_of(client.get("/api/nothing"), 404)
    assert "POST" in error_of(client.post("/api/diversions"), 405)
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


def test_the_views_start_page_links_every_view(client):
    """`/` and `/views` (the README's address of the views) are the start page; it links
    every view of the navigation, the analytics views too."""
    page = client.get("/views")
    assert page.status_code == 200 and page.text == client.get("/").text
    cards = page.text.split('<ul class="cards">', 1)[1].split("</ul>", 1)[0]
    for view in ("trace", "diversions", "influencers", "network", "stores", "consumers", "rebates", "regions"):
        assert f'href="/views/{view}"' in cards, view


def test_server_is_read_only_without_an_api_key(client):
    rows = {"tables": {"scans": [{"code": "H1", "action": "scan", "party_id": "wx-new", "ts": "2024-04-01T00:00:00Z"}]}}
    assert "read-only" in error_of(client.post("/api/datasets", json=rows), 403)


def test_upload_needs_the_key_and_changes_answers(world, tmp_path: Path):
    client = TestClient(create_app(Settings(store=tmp_path / "rejects-home", api_key=KEY), store=world))
    assert client.get("/api/trace/H1").json()["diversion"] is None
    scan = {"code": "H1", "action": "scan", "party_id": "wx-far", "ts": "2024-04-01T00:00:00Z", "region_id": "NJ"}
    rows = {"tables": {"scans": [scan, {**scan, "code": "NO-SUCH-CODE"}]}}
    assert "API key" in error_of(client.post("/api/datasets", json=rows), 401)
    assert "API key" in error_of(client.post("/api/datasets", json=rows, headers={"X-API-Key": "wrong"}), 401)
    assert "'tables'" in error_of(client.post("/api/datasets", json={"rows": []}, headers={"X-API-Key": KEY}), 422)
    loaded = client.post("/api/datasets", json=rows, headers={"X-API-Key": KEY}).json()
    assert (loaded["accepted"]["scans"], loaded["rejected"]["scans"]) == (1, 1)
    assert loaded["implicit_consumers"] == 1 and loaded["rejects_path"]
    # H1 was only scanned inside the territory; a scan in Nanjing with no store inside is suspected
    assert client.get("/api/trace/H1").json()["diversion"]["severity"] == "suspected"
    assert client.get("/api/diversions").json()["total"] == len(DIVERTED) + 1
    link = "https://id.gs1.org/01/09506000134352/21/7"  # a GS1 Digital Link: a code with slashes
    rows = {"tables": {"codes": [{"code": link, "level": "unit", "parent_code": "CH"}]}}
    assert client.post("/api/datasets", json=rows, headers={"X-API-Key": KEY}).json()["accepted"]["codes"] == 1
    assert client.get(f"/api/trace/{link}").json()["ancestors"] == ["CH"]


def test_ids_with_slashes_are_addressed_in_paths(world, tmp_path: Path):
    """A party id may be a URI (a GS1 Digital Link): URL-encoded or not, it reaches the
    consumer profile and the cascade, as codes reach the trace."""
    from urllib.parse import quote

    client = TestClient(create_app(Settings(store=tmp_path / "rejects-home", api_key=KEY), store=world))
    consumer = "https://id.gs1.org/414/0399999999991"
    rows = {"tables": {"scans": [{"code": "H1", "action": "scan", "party_id": consumer, "ts": "2024-03-03T00:00:00Z",
                                  "region_id": "HZ"}],
                       "referrals": [{"referrer_id": consumer, "referee_id": "wx-c1", "ts": "2024-03-03T01:00:00Z",
                                      "channel": "share"}]}}
    assert client.post("/api/datasets", json=rows, headers={"X-API-Key": KEY}).status_code == 200
    for party in (quote(consumer, safe=""), consumer):
        assert client.get(f"/api/consumers/{party}").json()["party_id"] == consumer
        assert client.get(f"/api/influencers/{party}/cascade").json()["party_id"] == consumer
    assert "'a/b'" in error_of(client.get("/api/influencers/a%2Fb/cascade"), 404)  # not "no such path"
    assert "'a/b'" in error_of(client.get("/api/consumers/a%2Fb"), 404)


def test_an_upload_without_rows_says_so_without_server_paths(world, tmp_path: Path):
    client = TestClient(create_app(Settings(store=tmp_path / "rejects-home", api_key=KEY), store=world))
    for body in ({"tables": {}}, {"tables": {"scans": []}}):
        message = error_of(client.post("/api/datasets", json=body, headers={"X-API-Key": KEY}), 400)
        assert message.startswith("no rows given") and '"tables"' in message
        assert "/tmp" not in message and "channelgraph-upload" not in message


def test_a_load_by_another_process_is_noticed(world, tmp_path: Path):
    client = TestClient(create_app(Settings(store=tmp_path / "unused"), store=world))
    assert client.get("/api/diversions").json()["total"] == len(DIVERTED)
    before = client.get("/api/ready").json()["store_version"]
    other = (EmbeddedStore(world.path) if isinstance(world, EmbeddedStore)  # another handle, as another process has
             else open_store(Settings(neo4j=world.uri, neo4j_password=None)))
    extra = {"scans": [{"event_id": "x1", "code": "CH", "action": "ship", "party_id": "D1", "counterparty_id": "S3",
                        "ts": "2024-02-20T00:00:00Z"}]}
    load_dataset(other, write_world(extra, tmp_path / "extra"), rejects_dir=tmp_path / "rejects")
    other.close()
    time.sleep(1.1)  # the service looks at the data version at most once a second
    assert client.get("/api/diversions").json()["total"] == len(DIVERTED) + 1
    assert client.get("/api/ready").json()["store_version"] not in (before, None)


def test_openapi_documents_every_endpoint_and_error(client):
    document = client.get("/openapi.json").json()
    operations = {(path, method): op for path, item in document["paths"].items() for method, op in item.items()}
    assert {p for p, _ in operations} >= {  # other features add their routers too
        "/api/health", "/api/ready", "/api/trace/{code}", "/api/flow", "/api/diversions", "/api/diversions.csv",
        "/api/diversions/groups", "/api/diversions/summary", "/api/diversions/untracked", "/api/influencers",
        "/api/influencers/stats", "/api/influencers/{party_id}/cascade", "/api/datasets"}
    for (path, _), op in operations.items():
        ok = op["responses"]["200"]["content"]
        assert "$ref" in str(ok) or "text/csv" in ok, path
        for status, answer in op["responses"].items():
            if status.startswith(("4", "5")):
                assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), (path, status)
    models = set(document["components"]["schemas"])
    assert {"ErrorResponse", "TraceResult", "FindingsPage", "DiversionGroups", "Cascade"} <= models


def test_units_judged_diverted_and_untracked(client):
    units = sum(1 for code in channel_world()["codes"] if code["level"] == "unit")
    for k, upgraded in ((None, 0), (2, 2)):  # at k = 2, J1 and J2 (two units of CJ in Nanjing) are confirmed
        severities = Counter(severity for _, severity, *_ in CHANNEL_DIVERSIONS)
        summary = client.get("/api/diversions/summary", params={"k": k} if k else {}).json()
        assert summary == {"units": units, "judged": units - len(UNTRACKED), "diverted": len(CHANNEL_DIVERSIONS),
                           "confirmed": severities["confirmed"] + upgraded,
                           "suspected": severities["suspected"] - upgraded, "untracked": len(UNTRACKED)}
    page = client.get("/api/diversions/untracked", params={"limit": 1}).json()
    assert page == {"total": 1, "offset": 0, "limit": 1, "items": [{
        "code": "U1", "sku": "BJ500", "batch": "B1", "events": 2, "last_holder": "wx-u1", "last_region": "NJ",
        "first_ts": "2024-02-02T00:00:00Z", "last_ts": "2024-03-01T00:00:00Z"}]}
    assert client.get("/api/diversions/untracked", params={"offset": 1}).json()["items"] == []
    assert "limit" in error_of(client.get("/api/diversions/untracked", params={"limit": 0}), 422)
    assert "k" in error_of(client.get("/api/diversions/summary", params={"k": 0}), 422)


def test_referral_stats(client):
    # 7 referees attributed; ignored: wx-k2, C1 and wx-a1 referred again (late), wx-j1 by
    # itself, C1 -> wx-a1 twice, wx-j1 -> wx-j2 closing wx-j2 -> wx-j1
    assert client.get("/api/influencers/stats").json() == {
        "referrals": len(channel_world()["referrals"]), "attributed": 7,
        "ignored": {"self": 1, "duplicate": 1, "late": 3, "cycle": 1}}


def test_an_empty_store_is_served(tmp_path: Path):
    """`serve` over a folder nothing was loaded into (yet): empty answers, not errors."""
    client = TestClient(create_app(Settings(store=tmp_path / "new")))
    assert client.get("/api/ready").json()["counts"]["scans"] == 0
    assert client.get("/api/diversions/summary").json() == dict.fromkeys(
        ("units", "judged", "diverted", "confirmed", "suspected", "untracked"), 0)
    assert client.get("/api/diversions/untracked").json()["items"] == []
    assert client.get("/api/influencers/stats").json() == {
        "referrals": 0, "attributed": 0, "ignored": {"self": 0, "duplicate": 0, "late": 0, "cycle": 0}}


def test_an_unreadable_store_answers_503(tmp_path: Path):
    folder = tmp_path / "store"
    load_dataset(EmbeddedStore(folder), write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    client = TestClient(create_app(Settings(store=folder)))
    assert client.get("/api/ready").json()["ready"] is True
    (folder / "CURRENT").write_text("v999999")  # the live version vanished
    time.sleep(1.1)
    assert "v999999" in error_of(client.get("/api/ready"), 503)
    assert client.get("/api/trace/A1").status_code == 200  # the last good version answers until the next check
