"""The `stores`, `consumers`, `rebates` and `regions` CLI commands and HTTP endpoints over
the hand-checked channel world (embedded store; the queries behind them run on both
stores in test_analytics_world.py): documents, one-line errors, one error shape."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.cli import main
from graph.embedded import EmbeddedStore
from graph.settings import Settings
from loaders.ingest import load_dataset
from tests.worlds import channel_world, write_world

POLICY = Path(__file__).resolve().parents[1] / "docs" / "policy.example.toml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("analytics-interfaces")
    load_dataset(EmbeddedStore(home / "store"), write_world(channel_world(), home / "world"), rejects_dir=home / "rejects")
    return home / "store"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_documents(world: Path, capsys):
    code, out, _ = run(capsys, "stores", "--store", str(world), "--abnormal", "--format", "json")
    assert code == 0 and [s["store_id"] for s in json.loads(out)] == ["S3"]
    code, out, _ = run(capsys, "consumers", "--store", str(world), "--stage", "referral", "--format", "csv")
    assert code == 0 and [line.split(",")[0] for line in out.splitlines()[1:]] == ["C1", "wx-a1", "wx-j2", "wx-k1"]
    code, out, _ = run(capsys, "consumers", "--store", str(world), "--funnel", "month", "--format", "json")
    assert [row["activated"] for row in json.loads(out)] == [1, 12]
    code, out, _ = run(capsys, "consumers", "--store", str(world), "--funnel", "month", "--as-of", "2024-02-29T23:59:59Z",
                       "--format", "json")
    assert [(row["period"], row["activated"]) for row in json.loads(out)] == [("2024-02", 1)]  # no later month
    code, out, _ = run(capsys, "consumers", "--store", str(world), "--profile", "wx-a1", "--format", "json")
    assert json.loads(out)["lifecycle"]["stage"] == "referral"
    code, out, err = run(capsys, "rebates", "--store", str(world), "--policy", str(POLICY), "--format", "json")
    report = json.loads(out)
    assert (report["owed"], report["withheld"], len(report["withheld_lines"]), report["lines"]) == (28.0, 13.5, 6, None)
    assert report["unscanned_skus"] == ["SKU001"] and "[sku.SKU001]" in err  # the example's SKU001 is not in this world
    code, out, _ = run(capsys, "rebates", "--store", str(world), "--policy", str(POLICY), "--lines", "--format", "csv")
    assert len(out.splitlines()) == 1 + 15
    code, out, _ = run(capsys, "regions", "--store", str(world), "--level", "city", "--matrix", "--format", "json")
    assert json.loads(out)[0] == {"from_region": "HZ", "to_region": "NJ", "units": 13}  # the matrix alone, as in CSV
    code, out, _ = run(capsys, "stores", "--store", str(world))  # a table for people
    assert code == 0 and "2 stores (1 abnormal)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["stores", "--region", "Atlantis"], "region 'Atlantis' is not stored"),
    (["stores", "--window", "10"], "multiple of 7"),
    (["consumers", "--stage", "fans"], "stage 'fans'"),
    (["consumers", "--profile", "S1"], "'S1' is a store, not a consumer"),
    (["consumers", "--profile", "nobody"], "consumer 'nobody' is not stored"),
    (["regions", "--period", "decade"], "period 'decade'"),
    (["rebates", "--policy", "no-such-policy.toml"], "policy no-such-policy.toml"),
    (["rebates", "--policy", str(POLICY), "--month", "2024-3"], "month '2024-3'"),
    (["stores", "--as-of", ""], "--as-of ''"),
    (["consumers", "--funnel", "month", "--stage", "retained"], "--stage"),
    (["consumers", "--profile", "C1", "--segment", "loyal"], "--segment"),
    (["consumers", "--profile", "C1", "--funnel", "month"], "--funnel"),
    (["consumers", "--as-of", "2024-13-01"], "--as-of '2024-13-01'"),
])
def test_cli_errors_are_one_line(world: Path, capsys, argv: list[str], message: str):
    code, out, err = run(capsys, *argv, "--store", str(world))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def client(world: Path) -> TestClient:
    return TestClient(create_app(Settings(store=world, rebate_policy=POLICY)))


def test_api_documents(client: TestClient):
    stores = client.get("/api/stores", params={"abnormal": "true"}).json()
    assert [(s["store_id"], s["flags"][0]["basis"]) for s in stores] == [("S3", "diversion")]
    page = client.get("/api/consumers", params={"stage": "activated", "limit": 3}).json()
    assert (page["total"], len(page["items"])) == (8, 3)
    assert client.get("/api/consumers/funnel").json()[-1]["referral"] == 4
    assert [row["period"] for row in client.get("/api/consumers/funnel", params={"as_of": "2024-02-29"}).json()] == ["2024-02"]
    assert client.get("/api/consumers/C1").json()["lifecycle"]["segment"] == "loyal"  # one unit, 3 days before the last scan (R, F, M 3)
    assert client.get("/api/rebates", params={"month": "2024-02"}).json()["withheld"] == 3.5  # b4: 2 + 1 + 0.5
    posted = client.post("/api/rebates", json={"default": {"store": 1.0}}).json()
    assert (posted["owed"], posted["withheld"]) == (3.0, 2.0)  # r5, t4, u2 owed; b4, a5 withheld
    regions = client.get("/api/regions", params={"level": "province", "period": "all"}).json()
    assert [(r["region_id"], r["diversions_in"], r["diversions_out"]) for r in regions["rows"]] == [("JS", 15, 0), ("ZJ", 0, 15)]


@pytest.mark.parametrize(("method", "url", "body", "status"), [
    ("get", "/api/stores?peer_level=street", None, 422),
    ("get", "/api/stores?region=Atlantis", None, 422),
    ("get", "/api/consumers?stage=fans", None, 422),
    ("get", "/api/consumers/nobody", None, 404),
    ("get", "/api/regions?level=town", None, 422),
    ("get", "/api/rebates?month=March", None, 422),
    ("post", "/api/rebates", {"default": {"boss": 1.0}}, 422),
    ("post", "/api/rebates", {"default": {"store": -1.0}}, 422),
    ("post", "/api/rebates", {"defualt": {"store": 1.0}}, 422),  # a typo is not an empty policy
])
def test_api_errors_have_one_shape(client: TestClient, method: str, url: str, body: dict | None, status: int):
    response = client.request(method, url, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["status"] == status and error["message"]


@pytest.mark.parametrize(("body", "message"), [
    (b'{"currency": "CNY", "default": {"store": true}}', "request body: [default] store = True: expected an amount >= 0"),
    (b'{"default": {"store": "2"}}', "request body: [default] store = '2': expected an amount >= 0"),
    (b'{"default": {"store": -1}}', "request body: [default] store = -1: expected an amount >= 0"),
    (b'{"default": {"store": NaN}}', "request body: [default] store = nan"),
    (b'{"default": {"store": Infinity}}', "request body: [default] store = inf"),
    (b'{"sku": {"SKU001": {"boss": 1}}}', "request body: [sku.SKU001] role 'boss': expected one of store"),
    (b'{"sku": []}', "request body: [sku] must hold one table per SKU"),
    (b'{"defualt": {"store": 1}}', "request body: unknown key(s) defualt"),
    (b'{"currency": 1}', "request body: currency must be a string"),
    (b'["store", 1]', "request body: Input should be a valid dictionary"),
    (b"store = 1", "request body: not valid JSON"),
])
def test_a_posted_policy_is_checked_like_a_policy_file(client: TestClient, body: bytes, message: str):
    """The JSON policy goes through the CLI's check (policy_from): booleans are no amounts,
    and every bad policy is a 422 invalid_parameter naming the request body."""
    response = client.post("/api/rebates", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_parameter" and error["message"].startswith(message), error


def test_consumer_pages_refuse_unknown_stages_and_segments(client: TestClient):
    for query, allowed in (("segment=Champions", "&#39;champions&#39;, &#39;loyal&#39;"), ("segment=bogus", "&#39;lost&#39;"),
                           ("stage=bogus", "&#39;acquired&#39;, &#39;activated&#39;")):
        page = client.get(f"/views/consumers?{query}")
        assert page.status_code == 422 and page.headers["content-type"].startswith("text/html"), query
        assert allowed in page.text, query
        assert client.get(f"/api/consumers?{query}").status_code == 422, query
    assert client.get("/views/consumers?segment=&stage=").status_code == 200  # the form's "any"


def test_country_is_a_level_everywhere(client: TestClient, capsys):
    """A region tree's top level is a country: regions at country level, and all stores of a
    country as peers, in the API, the pages, the OpenAPI document and the CLI's help."""
    regions = client.get("/api/regions", params={"level": "country", "period": "all"}).json()
    assert [(r["region_id"], r["diversions_in"], r["diversions_out"]) for r in regions["rows"]] == [("CN", 15, 15)]
    stores = client.get("/api/stores", params={"peer_level": "country"}).json()
    assert {s["peer_region"] for s in stores} == {"CN"}
    for path, name in (("/api/regions", "level"), ("/api/stores", "peer_level")):
        parameter = next(p for p in client.get("/openapi.json").json()["paths"][path]["get"]["parameters"] if p["name"] == name)
        assert parameter["schema"]["enum"] == ["country", "province", "city", "district"], parameter
    for url in ("/views/regions?level=country", "/views/stores?peer_level=country"):
        page = client.get(url)
        assert page.status_code == 200 and "<option selected>country</option>" in page.text, url
    for command in ("regions", "stores"):
        assert main([command, "--help"]) == 0
        assert "country, province, city or district" in " ".join(capsys.readouterr().out.split()), command


def test_rebates_without_a_configured_policy(world: Path):
    bare = TestClient(create_app(Settings(store=world)))
    assert bare.get("/api/rebates").status_code == 404
    assert bare.get("/views/rebates").status_code == 404
