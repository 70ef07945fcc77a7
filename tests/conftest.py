"""Shared fixtures: a `store` parametrised over the embedded store and a real Neo4j.

Neo4j tests need a server at $CHANNELGRAPH_TEST_NEO4J (default bolt://127.0.0.1:7687),
started by scripts/test. Without one they skip locally and fail in CI (CI=true).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graph.settings import Settings
from graph.store import Store, open_store

NEO4J_URI = os.environ.get("CHANNELGRAPH_TEST_NEO4J", "bolt://127.0.0.1:7687")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def neo4j_available() -> str | None:
    """None when the test Neo4j answers `RETURN 1`, else the reason it does not."""
    from neo4j import GraphDatabase

    try:
        with GraphDatabase.driver(NEO4J_URI, auth=None) as driver:
            driver.verify_connectivity()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable(reason: str) -> None:
    """A test's real dependency is missing: fail in CI (CI=true), skip locally."""
    (pytest.fail if IN_CI else pytest.skip)(reason)


def needs(available: bool, reason: str) -> pytest.MarkDecorator:
    """Mark a test whose real dependency may be missing: skipped locally when it is, always
    run in CI (CI=true), where the missing dependency makes it fail."""
    return pytest.mark.skipif(not available and not IN_CI, reason=reason)


@pytest.fixture(scope="session")
def neo4j_uri() -> str:
    reason = neo4j_available()
    if reason:
        unavailable(f"Neo4j not reachable at {NEO4J_URI} ({reason}); run scripts/test")
    return NEO4J_URI


def _wipe_neo4j(uri: str) -> None:
    from neo4j import GraphDatabase

    with GraphDatabase.driver(uri, auth=None) as driver, driver.session() as session:
        session.run("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()


@pytest.fixture(params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory of empty stores of one kind; each call gives a fresh, empty store."""
    opened: list[Store] = []
    if request.param == "neo4j":
        uri = request.getfixturevalue("neo4j_uri")

        def factory() -> Store:
            _wipe_neo4j(uri)
            store = open_store(Settings(neo4j=uri, neo4j_password=None))
            opened.append(store)
            return store
    else:
        counter = iter(range(1_000_000))

        def factory() -> Store:
            store = open_store(Settings(store=tmp_path / f"store-{next(counter)}"))
            opened.append(store)
            return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    """One fresh, empty store of each kind."""
    return make_store()
