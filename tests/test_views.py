"""The browser views without a browser: graphs built in Python, pages, files, the viz command."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api import views
from api.app import create_app
from api.cli import main
from api.service import ApiService, DiversionFilters
from graph.embedded import EmbeddedStore
from graph.settings import Settings
from loaders.ingest import load_dataset
from queries.diversion import Hop
from queries.influence import CascadeNode
from queries.trace import FlowEdge
from tests.worlds import channel_world, write_world

EVIL = "</script><img src=x onerror=alert(1)>"
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?\s*(https?:)?//|@import""", re.I)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedStore:
    """The channel world, plus a consumer whose id is an HTML injection attempt."""
    home = tmp_path_factory.mktemp("views-world")
    tables = channel_world()
    tables["scans"].append({"event_id": "evil", "code": "O1", "action": "scan", "party_id": EVIL,
                            "ts": "2024-03-05T00:00:00Z", "region_id": "NJ"})
    store = EmbeddedStore(home / "store")
    load_dataset(store, write_world(tables, home / "world"), rejects_dir=home / "rejects")
    return store


@pytest.fixture(scope="module")
def svc(world: EmbeddedStore) -> ApiService:
    return ApiService(world)


def hop(event_id: str, action: str, party: str, ts: str, counterparty: str | None = None, crossed: bool = False) -> Hop:
    return Hop(party_id=party, kind=None, region_id=None, ts=ts, event_id=event_id, action=action, crossed=crossed,
               code="X", counterparty_id=counterparty)


def test_custody_graph_of_a_diverted_unit(svc):
    result = svc.trace("SS1")
    graph = views.custody_graph(result.path, svc.parties(["F1", "D1", "SD1", "S3"])).as_dict()
    kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
    assert kinds == {"F1": "factory", "D1": "distributor", "SD1": "sub-distributor", "S3": "store"}
    edges = {(e["from"], e["to"]): e for e in graph["edges"]}
    assert list(edges) == [("F1", "D1"), ("D1", "SD1"), ("SD1", "S3")]
    assert [pair for pair, e in edges.items() if e.get("crossed")] == [("SD1", "S3")]
    assert edges[("SD1", "S3")]["label"] == "⚠ 2024-02-04 00:00"
    assert "CROSSED" in edges[("SD1", "S3")]["title"]
    assert edges[("D1", "SD1")]["hops"] == ["s2", "s3"]  # the ship and the receive of one hand-over
    xs = [next(n["x"] for n in graph["nodes"] if n["id"] == i) for i in ("F1", "D1", "SD1", "S3")]
    assert xs == sorted(xs)  # F -> B -> sub-B -> b, left to right


def test_custody_graph_marks_an_unrecorded_hand_over():
    path = [hop("e1", "ship", "F1", "2024-01-01T00:00:00Z", "D1"), hop("e2", "ship", "D2", "2024-01-02T00:00:00Z", "S3", True)]
    edges = {(e["from"], e["to"]): e for e in views.custody_graph(path, {}).edges}
    assert edges[("D1", "D2")]["dashes"] is True and edges[("D1", "D2")]["label"] == "unrecorded"
    assert edges[("D2", "S3")]["crossed"] is True


def _fan_out(stores: int, consumers_each: int) -> list[FlowEdge]:
    edges = [FlowEdge(source="F", source_kind="factory", target="D", target_kind="distributor", units=stores * consumers_each)]
    for s in range(stores):
        edges.append(FlowEdge(source="D", source_kind="distributor", target=f"S{s}", target_kind="store", units=consumers_each))
        edges += [FlowEdge(source=f"S{s}", source_kind="store", target=f"C{s}-{c}", target_kind="consumer", units=1)
                  for c in range(consumers_each)]
    return edges


def test_flow_graph_groups_consumers_and_caps_nodes():
    grouped = views.flow_graph(_fan_out(200, 20), {}).as_dict()
    assert grouped["stats"]["nodes"] == 1 + 1 + 200 + 200 and grouped["stats"]["nodes_total"] == 2 + 200 + 4000
    assert sum(n["kind"] == "consumers" for n in grouped["nodes"]) == 200
    assert "4,000 consumers are drawn as 200 groups" in grouped["notes"][0]
    capped = views.flow_graph(_fan_out(200, 20), {}, max_nodes=100).as_dict()
    ids = {n["id"] for n in capped["nodes"]}
    assert len(ids) == 100 and {"F", "D"} <= ids
    assert all(e["from"] in ids and e["to"] in ids for e in capped["edges"])
    assert any(note.startswith("Capped: drawing the 100 busiest of 402 nodes") for note in capped["notes"])
    small = views.flow_graph(_fan_out(2, 3), {}).as_dict()
    assert small["notes"] == [] and small["stats"]["nodes"] == 2 + 2 + 6
    widths = {(e["from"], e["to"]): e["width"] for e in small["edges"]}
    assert widths[("F", "D")] > widths[("D", "S0")] > widths[("S0", "C0-0")]


def test_cascade_graph_is_a_capped_tree():
    nodes = [CascadeNode(party_id="R", kind="consumer", referrer_id=None, depth=0, ts=None, purchases=1, revenue=1.0)]
    nodes += [CascadeNode(party_id=f"c{i}", kind="consumer", referrer_id="R" if i < 5 else f"c{i % 5}", depth=1 if i < 5 else 2,
                          ts="2024-01-01T00:00:00Z", purchases=0, revenue=0.0) for i in range(30)]
    graph = views.cascade_graph(nodes, max_nodes=12).as_dict()
    assert graph["stats"]["nodes"] == 12 and graph["stats"]["nodes_total"] == 31
    assert "first 12 of 31" in graph["notes"][0]
    by_id = {n["id"]: n for n in graph["nodes"]}
    assert by_id["R"]["root"] is True
    assert all(by_id[e["to"]]["x"] > by_id[e["from"]]["x"] for e in graph["edges"])  # referrers left of referees


def test_served_pages_use_only_local_assets(world):
    client = TestClient(create_app(Settings(store=world.path)))
    for url in ("/", "/views/trace?code=A1", "/views/diversions?severity=&since=2024-03-01&until=2024-03-31",
                "/views/influencers?by=cascade_size", "/views/network?batch=B2"):
        page = client.get(url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), url
        assert not EXTERNAL.search(page.text), url
        assert set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)) == {
            "/static/vis-network.min.js", "/static/vis-network.min.css", "/static/views.js", "/static/views.css"}
    for name, kind in (("vis-network.min.js", "javascript"), ("views.css", "css")):
        assert kind in client.get(f"/static/{name}").headers["content-type"]


def test_pages_say_what_is_missing(world):
    client = TestClient(create_app(Settings(store=world.path)))
    missing = client.get("/views/trace?code=NOPE")
    assert missing.status_code == 404 and "unknown code &#39;NOPE&#39;" in missing.text
    assert client.get("/views/network?region=ATLANTIS").status_code == 404
    assert client.get("/views/diversions?since=someday").status_code == 422


def test_the_csv_link_carries_only_the_given_filters(world):
    """A submitted filter form sends every field, empty ones too: the page's CSV link must
    carry only the given filters, in a form the API accepts, and list the page's findings."""
    client = TestClient(create_app(Settings(store=world.path)))
    for query, codes in (("severity=&responsible=&region=&sku=&batch=&since=&until=", None),
                         ("severity=&responsible=&region=&sku=&batch=&since=2024-03-01&until=2024-03-01", ["J1", "J2", "K1"])):
        page = client.get(f"/views/diversions?{query}")
        assert page.status_code == 200, page.text
        href = re.search(r'class="download" href="([^"]+)"', page.text).group(1).replace("&amp;", "&")
        assert "=&" not in href + "&" and "severity" not in href, href
        download = client.get(href)
        assert download.status_code == 200, download.text
        listed = sorted(re.findall(r'<tr data-key="([^"]+)"', page.text))
        assert sorted(row.split(",")[0] for row in download.text.splitlines()[1:]) == listed
        if codes is not None:
            assert listed == codes


@pytest.mark.parametrize(("url", "status", "message"), [
    ("/views/influencers?top=1001", 422, "query parameter &#39;top&#39;"),
    ("/views/influencers?top=0", 422, "query parameter &#39;top&#39;"),
    ("/views/influencers?percent=101", 422, "query parameter &#39;percent&#39;"),
    ("/views/diversions?since=bad", 422, "since &#39;bad&#39;: not an ISO 8601"),
    ("/views/diversions?severity=bogus", 422, "&#39;confirmed&#39; or &#39;suspected&#39;"),
    ("/views/diversions?since=2024-03-02&until=2024-03-01", 422, "is after until"),
    ("/views/stores?abnormal=maybe", 422, "query parameter &#39;abnormal&#39;"),
    ("/views/trace?code=X&k=0", 422, "query parameter &#39;k&#39;"),
    ("/views/no-such-view", 404, "no such path"),
])
def test_pages_answer_bad_parameters_with_an_error_page(world, url: str, status: int, message: str):
    """Parameters the framework checks (types, ranges, allowed values) fail as a page with
    the API's status and message, not as a JSON error."""
    client = TestClient(create_app(Settings(store=world.path)))
    page = client.get(url)
    assert page.status_code == status and page.headers["content-type"].startswith("text/html"), page.text
    assert 'id="cg-error"' in page.text and message in page.text and "/views/diversions" in page.text  # the navigation


def test_an_empty_number_field_means_not_given(world):
    client = TestClient(create_app(Settings(store=world.path)))
    page = client.get("/views/influencers?by=influence&top=&percent=5&user=")  # "top" cleared to use "percent"
    assert page.status_code == 200, page.text
    assert 'name="percent" type="number" min="0.01" max="100" step="any" value="5.0"' in page.text


def test_a_date_alone_until_is_the_whole_day_in_the_viz_command(world, tmp_path: Path, capsys):
    out = tmp_path / "day.html"
    argv = ["viz", "diversions", "--since", "2024-03-01", "--until", "2024-03-01", "--store", str(world.path)]
    assert main([*argv, "--out", str(out)]) == 0
    assert sorted(re.findall(r'<tr data-key="([^"]+)"', out.read_text(encoding="utf-8"))) == ["J1", "J2", "K1"]
    capsys.readouterr()
    assert main(["viz", "diversions", "--until", "1710000000", "--store", str(world.path), "--out", str(out)]) == 1
    assert "--until '1710000000': not an ISO 8601" in capsys.readouterr().err


def test_injected_ids_are_escaped(svc):
    for page in (views.trace_page(svc, "O1"), views.diversions_page(svc, DiversionFilters())):
        assert page.status == 200
        assert EVIL not in page.html and "<img" not in page.html
        assert "\\u003c/script\\u003e" in page.html  # the data block carries it, escaped


def test_standalone_files_work_offline(svc, tmp_path: Path):
    written = views.write_views(svc.store, tmp_path, code="SS1")
    assert sorted(p.name for p in written) == ["diversions.html", "influencers.html", "network.html", "trace.html"]
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert not EXTERNAL.search(text), path.name
        assert "/static/" not in text and "vis.Network" in text and 'id="cg-data"' in text, path.name


def test_viz_command_writes_a_file_or_says_why_not(world, tmp_path: Path, capsys):
    out = tmp_path / "trace.html"
    assert main(["viz", "trace", "SS1", "--store", str(world.path), "--out", str(out)]) == 0
    assert "Trace SS1" in out.read_text(encoding="utf-8")
    assert main(["viz", "network", "--batch", "B2", "--store", str(world.path), "--out", str(tmp_path / "n.html")]) == 0
    capsys.readouterr()
    assert main(["viz", "trace", "NOPE", "--store", str(world.path), "--out", str(tmp_path / "x.html")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unknown code 'NOPE'" in error
    assert not (tmp_path / "x.html").exists()
    assert main(["viz", "diversions", "--severity", "maybe", "--store", str(world.path), "--out", str(tmp_path / "d.html")]) == 1
    assert "severity 'maybe'" in capsys.readouterr().err


def test_trace_page_examples_never_wait_for_a_judgement(world):
    svc = ApiService(world)
    assert "diverted, for example" not in views.trace_page(svc, None).html  # nothing judged yet
    svc.finding_index()
    assert "diverted, for example" in views.trace_page(svc, None).html


def test_the_server_judges_the_store_at_start_up(world):
    app = create_app(Settings(store=world.path))
    with TestClient(app):  # runs the lifespan, as uvicorn does
        deadline = time.monotonic() + 30
        while not app.state.service.findings_if_judged() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(app.state.service.findings_if_judged()) == 15  # the channel world's (O1 was diverted already)


def test_super_user_page_ranks_the_top_percent(world, tmp_path: Path, capsys):
    from queries.influence import influencers

    everyone = len(influencers(world, top=None))
    half = -(-everyone // 2)
    assert 1 < half < everyone
    client = TestClient(create_app(Settings(store=world.path)))
    page = client.get("/views/influencers?by=cascade_size&percent=50")
    assert page.status_code == 200 and page.text.count("<tr data-key=") == half
    assert client.get("/views/influencers?percent=&top=2").text.count("<tr data-key=") == 2  # an empty field: --top
    assert client.get("/views/influencers?percent=half").status_code == 422
    assert client.get("/views/influencers?percent=150").status_code == 422
    out = tmp_path / "influencers.html"
    assert main(["viz", "influencers", "--percent", "50", "--store", str(world.path), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").count("<tr data-key=") == half
    assert main(["viz", "influencers", "--percent", "0", "--store", str(world.path), "--out", str(out)]) != 0
    capsys.readouterr()
