"""A hostile HTTP client: schemathesis over the OpenAPI document, Cypher injection through
every parameter, oversized and abusive requests, and the API key on writes.

Runs against the channel world on both stores (the injection and key tests) through the
FastAPI TestClient; schemathesis runs on the embedded store (it exercises the HTTP layer,
which is the same for both).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from api.app import create_app
from graph.settings import Settings
from graph.store import Store, open_store
from loaders.ingest import load_dataset
from tests.conftest import IN_CI, _wipe_neo4j
from tests.worlds import channel_world, write_world

KEY = "hostile-test-key"
INJECTIONS = [
    "A1' OR '1'='1",
    '" OR true //',
    "x'}) MATCH (n) DETACH DELETE n //",
    "`) DETACH DELETE n WITH 1 AS x MATCH (m) RETURN m //",
    "A1\" }) SET n.pwned = true //",
    "*/ MATCH (n) SET n.pwned = true /*",
    "$code",
    "{code: 'A1'}",
    "' CALL dbms.killQueries([]) //",
    "A1\\' UNION MATCH (n) RETURN n //",
    "../../etc/passwd",
    "%00A1",
]
BENIGN = "no-such-thing"


def world_store(kind: str, home: Path, request: pytest.FixtureRequest) -> tuple[Store, Settings]:
    if kind == "neo4j":
        uri = request.getfixturevalue("neo4j_uri")
        _wipe_neo4j(uri)
        settings = Settings(neo4j=uri, neo4j_password=None, store=home / "unused", api_key=KEY)
    else:
        settings = Settings(store=home / "store", api_key=KEY)
    store = open_store(settings)
    load_dataset(store, write_world(channel_world(), home / "world"), rejects_dir=home / "rejects")
    return store, settings


@pytest.fixture(scope="module", params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def hostile(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Store]]:
    """A client of an app with an API key over the channel world, and its store."""
    store, settings = world_store(request.param, tmp_path_factory.mktemp("hostile"), request)
    with TestClient(create_app(settings, store=store), raise_server_exceptions=False) as client:
        yield client, store
    store.close()


def fingerprint(store: Store) -> Any:
    """Everything a query could have changed: row counts, and on Neo4j every node, label,
    relationship and property."""
    counts = store.counts()
    if hasattr(store, "_read"):
        graph = store._read("MATCH (n) OPTIONAL MATCH (n)-[r]->() "
                            "RETURN count(DISTINCT n), count(r), sum(size(keys(n))), collect(DISTINCT labels(n))")
        return counts, json.dumps(graph, sort_keys=True, default=str)
    return counts


def operations(client: TestClient) -> list[tuple[str, str, dict]]:
    """(method, path, operation) of every documented endpoint."""
    spec = client.get("/openapi.json").json()
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def string_parameters(op: dict) -> list[tuple[str, str]]:
    """(name, in) of the path and query parameters that take free text."""
    found = []
    for param in op.get("parameters", []):
        schema = param["schema"]
        types = {s.get("type") for s in schema.get("anyOf", [schema])}
        if param["in"] in ("path", "query") and "string" in types and "format" not in str(schema) \
                and "pattern" not in str(schema) and "enum" not in str(schema):
            found.append((param["name"], param["in"]))
    return found


def call(client: TestClient, method: str, path: str, name: str, where: str, value: str):
    if where == "path":
        from urllib.parse import quote

        url = path.replace("{" + name + "}", quote(value, safe=""))
        return client.request(method, url, json={} if method == "POST" else None)
    url = path.replace("{party_id}", "C1").replace("{code}", "A1")
    return client.request(method, url, params={name: value}, json={} if method == "POST" else None)


def normalised(body: Any, value: str) -> Any:
    """`body` with every occurrence of `value` (also as its repr) replaced by a marker."""
    text = json.dumps(body, ensure_ascii=False)
    for form in (json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(repr(value), ensure_ascii=False)[1:-1]):
        text = text.replace(form, "<value>")
    return json.loads(text)


def test_cypher_injection_through_every_text_parameter_changes_nothing(hostile):
    """Each free-text parameter that reaches a query, given Cypher/SQL/path injection text,
    answers exactly as it does for a plain unknown value (same status; a 200 with the same
    body: an empty result), never a 5xx, and the store is unchanged."""
    client, store = hostile
    before = fingerprint(store)
    tried = 0
    for method, path, op in operations(client):
        for name, where in string_parameters(op):
            plain = call(client, method, path, name, where, BENIGN)
            for payload in INJECTIONS:
                got = call(client, method, path, name, where, payload)
                tried += 1
                assert got.status_code < 500, (path, name, payload, got.text)
                assert got.status_code == plain.status_code, (path, name, payload, got.text, plain.text)
                if got.status_code == 200 and "json" in got.headers["content-type"]:
                    assert normalised(got.json(), payload) == normalised(plain.json(), BENIGN), (path, name, payload)
    assert tried >= len(INJECTIONS) * 10  # codes, ids, regions, skus, batches, segments, ...
    assert fingerprint(store) == before


def test_enumerated_parameters_refuse_injection_and_unknown_names(hostile):
    """Sort keys, metrics, groupings and levels are allow-lists: anything else is a 422."""
    client, _ = hostile
    for url, name in (("/api/diversions", "sort"), ("/api/diversions/groups", "by"), ("/api/influencers", "by"),
                      ("/api/regions", "level"), ("/api/stores", "peer_level"), ("/api/consumers", "stage")):
        for payload in ("crossing_ts; DROP", "code DESC, n.pwned", "-" + INJECTIONS[2], "__class__"):
            response = client.get(url, params={name: payload})
            assert response.status_code == 422, (url, name, payload, response.text)
            assert set(response.json()) == {"error"}


def test_oversized_and_abusive_requests_are_bounded(hostile):
    client, store = hostile
    before = fingerprint(store)
    for params in ({"limit": 10**9}, {"limit": 0}, {"limit": -1}, {"offset": -5}, {"offset": 10**12},
                   {"limit": "1e9"}, {"k": 10**6}, {"region": "x" * 501}):
        assert client.get("/api/diversions", params=params).status_code == 422, params
    assert client.get("/api/influencers", params={"top": 10**9}).status_code == 422
    assert client.get("/api/consumers", params={"limit": 10**9}).status_code == 422
    page = client.get("/api/diversions", params={"offset": 9_000_000, "limit": 1000})
    assert page.status_code == 200 and page.json()["items"] == []
    huge = client.get("/api/trace/" + "A" * 60_000)
    assert huge.status_code in (404, 414, 422)
    flood = client.get("/api/flow", params=[("batch", "B1")] * 2000)
    assert flood.status_code < 500
    bad = client.post("/api/datasets", content=b"{" * 100_000, headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert bad.status_code in (400, 413, 422)
    assert fingerprint(store) == before


def test_limits_are_those_the_readme_promises(hostile):
    """limit <= 1000 and offset <= 10,000,000 on every paginated endpoint, ids in paths <= 500
    characters like text parameters; an error message quotes at most a cut id."""
    client, _ = hostile
    for path in ("/api/diversions", "/api/diversions/untracked", "/api/consumers"):
        assert client.get(path, params={"limit": 1000}).status_code == 200, path
        for params in ({"limit": 1001}, {"offset": 10_000_001}, {"offset": 10**20}):
            response = client.get(path, params=params)
            assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_parameter", (path, params)
    long_id = "x" * 20_000
    for path in (f"/api/trace/{long_id}", f"/api/consumers/{long_id}", f"/api/influencers/{long_id}/cascade"):
        response = client.get(path)
        assert response.status_code == 422 and "at most 500 characters" in response.text, path
        assert len(response.text) < 400, path
    unknown = client.get("/api/trace/" + "y" * 500)
    assert unknown.status_code == 404 and len(unknown.json()["error"]["message"]) <= 300


def test_oversized_request_bodies_are_refused_before_they_are_read(tmp_path, request):
    store, settings_ = world_store("embedded", tmp_path, request)
    before = fingerprint(store)
    limited = settings_.model_copy(update={"api_max_body_bytes": 10_000})
    rows = {"tables": {"regions": [{"region_id": f"R{i}", "name": "x" * 50} for i in range(1000)]}}
    body = json.dumps(rows).encode()
    with TestClient(create_app(limited, store=store)) as client:
        declared = client.post("/api/datasets", content=body, headers={"X-API-Key": KEY, "Content-Type": "application/json"})
        streamed = client.post("/api/datasets", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                               headers={"X-API-Key": KEY, "Content-Type": "application/json"})
        for response in (declared, streamed):
            assert response.status_code == 413 and response.json()["error"]["code"] == "too_large", response.text
        assert fingerprint(store) == before
        small = client.post("/api/datasets", json={"tables": {"regions": [{"region_id": "R1"}]}}, headers={"X-API-Key": KEY})
        assert small.status_code == 200
    store.close()


def test_every_write_needs_the_api_key(hostile):
    """Without the key (or with a wrong one) a write is refused with 401 and changes
    nothing; every other non-GET endpoint changes nothing either. With it, rows load."""
    client, store = hostile
    before = fingerprint(store)
    rows = {"tables": {"scans": [{"code": "A1", "action": "scan", "party_id": "wx-intruder", "ts": "2024-03-09T00:00:00Z"}]}}
    for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + " "}, {"X-API-Key": KEY.upper()},
                    {"Authorization": f"Bearer {KEY}"}):
        response = client.post("/api/datasets", json=rows, headers=headers)
        assert response.status_code == 401, (headers, response.text)
    for method, path, _ in operations(client):
        if method != "GET" and path != "/api/datasets":
            response = client.request(method, path.replace("{party_id}", "C1"), json={})
            assert response.status_code < 500, (method, path, response.text)
    assert fingerprint(store) == before
    loaded = client.post("/api/datasets", json=rows, headers={"X-API-Key": KEY})
    assert loaded.status_code == 200 and loaded.json()["accepted"]["scans"] == 1


def test_a_server_without_a_key_is_read_only(tmp_path, request):
    store, settings = world_store("embedded", tmp_path, request)
    with TestClient(create_app(settings.model_copy(update={"api_key": None}), store=store)) as client:
        response = client.post("/api/datasets", json={"tables": {"regions": [{"region_id": "X"}]}},
                               headers={"X-API-Key": KEY})
        assert response.status_code == 403
    store.close()


# ------------------------------------------------------------------ schemathesis


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(tmp_path, request):
    """Every documented operation, with requests schemathesis generates from the OpenAPI
    document (valid and invalid parameters and bodies) and the API key so that writes are
    exercised too: never a 5xx."""
    store, settings_ = world_store("embedded", tmp_path, request)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_, store=store))
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=6, deadline=None, derandomize=IN_CI, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def exercise(case) -> None:
            case.call_and_validate(headers={"X-API-Key": KEY}, checks=[not_a_server_error])

        try:
            exercise()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure
            failures[operation.label] = str(exc)[:2000]
    store.close()
    assert len(list(schema.get_all_operations())) >= 15
    assert not failures, json.dumps(failures, indent=1)
