"""Faults: a loader killed at any point, Neo4j stopped mid-load and mid-query, a full disk
and a read-only store folder.

Faults are injected deterministically. Killed loads run in a forked child that SIGKILLs
itself at the N-th call of one store primitive (a file-system step of the embedded store,
a Neo4j write transaction); the kill points are a seeded random sample over every call of
a clean load, always including the first and the last. Neo4j is stopped by a CLI run
(`FAULT_RUNNER`) at the N-th write or read, on a server of this module's own. The full disk
is a real 1 MB tmpfs and the read-only store a real read-only bind mount (both need root
with CAP_SYS_ADMIN, as in CI; without it those tests skip).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import graph.embedded
from graph.embedded import EmbeddedStore
from graph.neo4j_store import Neo4jStore
from graph.settings import Settings
from loaders.generate import generate_dataset
from loaders.ingest import load_dataset
from queries.diversion import find_diversions
from tests.conftest import _wipe_neo4j, unavailable
from tests.worlds import CHANNEL_DIVERSIONS, channel_world, write_world

ROOT = Path(__file__).resolve().parents[1]

# Runs `channelgraph ARGS...`; at the FAULT_AT-th call of FAULT_TARGET (a Neo4jStore
# method) it stops the Neo4j server of FAULT_HOME, then goes on.
FAULT_RUNNER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from graph.neo4j_server import stop
    from graph.neo4j_store import Neo4jStore

    calls, at = [0], int(os.environ.get("FAULT_AT", "0"))
    if os.environ.get("FAULT_TARGET"):
        original = getattr(Neo4jStore, os.environ["FAULT_TARGET"])

        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                stop(home=Path(os.environ["FAULT_HOME"]))
            return original(*args, **kwargs)

        setattr(Neo4jStore, os.environ["FAULT_TARGET"], wrapped)
    from api.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAULT_RUNNER, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, **(env or {})})


def kill_points(total: int, k: int, seed: int) -> list[int]:
    """`k` distinct call numbers in 1..total: the first, the last, and a seeded sample."""
    rest = random.Random(seed).sample(range(2, total), min(k - 2, max(total - 2, 0)))
    return sorted({1, total, *rest})


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert done.returncode != 0, done.stderr
    assert len(lines) == 1 and lines[0].startswith("channelgraph: error:"), done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def contents(path: Path) -> dict[str, list]:
    """Every stored row of an embedded store, order-independent."""
    store = EmbeddedStore(path)
    return {name: sorted(json.dumps(row, sort_keys=True, default=str) for row in store.table(name).to_pylist())
            for name in ("regions", "parties", "products", "codes", "scans", "referrals", "tasks")}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the channel world, a generated scenario whose load also updates it)."""
    tmp = tmp_path_factory.mktemp("faults-data")
    world = write_world(channel_world(), tmp / "world")
    scenario = tmp / "scenario"
    generate_dataset(scenario, scale=0.3, seed=11)
    return world, scenario


# ------------------------------------------------------------------ killed loads
# The loads run in a forked child (no interpreter start-up per run); the child SIGKILLs
# itself at the N-th call of one store primitive.


def load_killed_at(open_store: Callable[[], object], dataset: Path, target: str, at: int, rejects: Path) -> int:
    """Exit code of a forked load of `dataset` that SIGKILLs itself at call `at` of `target`."""
    def child() -> None:
        owner, name = target.rsplit(".", 1)
        module = {"os": os, "embedded": graph.embedded, "neo4j": Neo4jStore}[owner]
        original, calls = getattr(module, name), [0]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(module, name, wrapped)
        load_dataset(open_store(), dataset, rejects_dir=rejects)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    return process.exitcode


def calls_in_load(open_store: Callable[[], object], dataset: Path, target: str, rejects: Path,
                  monkeypatch: pytest.MonkeyPatch) -> int:
    """How often a clean load of `dataset` calls `target` (counted in this process)."""
    owner, name = target.rsplit(".", 1)
    module = {"os": os, "embedded": graph.embedded, "neo4j": Neo4jStore}[owner]
    original, calls = getattr(module, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, name, counted)
        load_dataset(open_store(), dataset, rejects_dir=rejects)
    return calls[0]


@pytest.fixture(scope="module")
def clean_load(datasets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded store holding one clean load of the world, then the scenario."""
    store = tmp_path_factory.mktemp("clean") / "store"
    for dataset in datasets:
        load_dataset(EmbeddedStore(store), dataset, rejects_dir=store.parent / "rejects")
    return store


@pytest.mark.slow
def test_embedded_load_killed_at_any_step_leaves_old_or_new_state(datasets, clean_load, tmp_path, monkeypatch):
    """Killed between any two file-system steps of writing a version (each fsync, the
    rename of the new version, the swap of CURRENT): the store holds either the previous
    load or the new one, never a mix; re-running the load gives exactly one clean load
    and leaves no stray folders."""
    world, scenario = datasets
    expected = contents(clean_load)
    base = tmp_path / "base"
    load_dataset(EmbeddedStore(base), world, rejects_dir=tmp_path / "rejects")
    before = contents(base)
    for target in ("embedded._fsync", "os.rename", "os.replace"):
        counted = tmp_path / f"count-{target}"
        shutil.copytree(base, counted)
        total = calls_in_load(lambda path=counted: EmbeddedStore(path), scenario, target, tmp_path / "rejects", monkeypatch)
        for n in kill_points(total, 4, seed=len(target)):
            store = tmp_path / f"store-{target}-{n}"
            shutil.copytree(base, store)
            code = load_killed_at(lambda path=store: EmbeddedStore(path), scenario, target, n, tmp_path / "rejects")
            assert code == -signal.SIGKILL
            assert contents(store) in (before, expected), f"kill at {target} #{n} left a mixed store"
            load_dataset(EmbeddedStore(store), scenario, rejects_dir=tmp_path / "rejects")
            assert contents(store) == expected
            left = sorted(p.name for p in store.iterdir())
            assert left == [".lock", "CURRENT", (store / "CURRENT").read_text()], f"{left} after a kill at {target} #{n}"


@pytest.mark.slow
@pytest.mark.neo4j
def test_neo4j_load_killed_at_any_write_resumes_to_one_clean_load(datasets, neo4j_uri, tmp_path, monkeypatch):
    """SIGKILL at a seeded sample of the load's write transactions (batch size 4, so the
    small world is dozens of transactions); the next load finishes it and the result
    equals the embedded store's clean load, with no pending work left."""
    world, _ = datasets
    rejects = tmp_path / "rejects"
    clean = EmbeddedStore(tmp_path / "clean")
    load_dataset(clean, world, rejects_dir=rejects)

    def neo4j() -> Neo4jStore:
        return Neo4jStore.connect(Settings(neo4j=neo4j_uri, neo4j_password=None, neo4j_batch_size=4))

    _wipe_neo4j(neo4j_uri)
    total = calls_in_load(neo4j, world, "neo4j._write_transaction", rejects, monkeypatch)
    for n in kill_points(total, 5, seed=8):
        _wipe_neo4j(neo4j_uri)
        assert load_killed_at(neo4j, world, "neo4j._write_transaction", n, rejects) == -signal.SIGKILL
        store = neo4j()
        try:
            load_dataset(store, world, rejects_dir=rejects)
            assert_resumed(EmbeddedStore(tmp_path / "clean"), store)
        finally:
            store.close()


def assert_resumed(clean: EmbeddedStore, store: Neo4jStore) -> None:
    """`store` holds exactly what `clean` does, with no unfinished load or pending work."""
    from tests.test_neo4j_store import assert_same_tables

    assert_same_tables(clean, store)
    assert store._read("MATCH (n:PendingLinks|PendingCount) RETURN count(n)") == [[0]]
    assert store._read("MATCH (l:Load) WHERE l.status = 'running' RETURN count(l)") == [[0]]


@pytest.fixture(scope="module")
def own_neo4j(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """A Neo4j server of this module's own (a temporary home and a free port), which the
    tests stop and start; never the shared test server."""
    import shutil
    import socket

    from graph.neo4j_server import Neo4jServerError, start, stop

    if shutil.which("java") is None:
        unavailable("needs java (and mvn) to run a Neo4j of its own")
    home = tmp_path_factory.mktemp("neo4j-faults")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        state = start(home=home, port=port, heap="512m", pagecache="128m")
    except Neo4jServerError as exc:
        unavailable(str(exc))
    try:
        yield state.uri, home, port
    finally:
        stop(home=home)  # also when a test left it stopped


@pytest.mark.slow
@pytest.mark.neo4j
def test_neo4j_stopped_mid_load_and_mid_query(own_neo4j, datasets, tmp_path):
    """The server stops in the middle of a load, and later in the middle of a query: each
    time (after the driver's retries, cut to 2 s here) one clear line and a non-zero exit.
    Once the server is back the next load completes the interrupted one: the store equals
    one clean load and answers as the embedded store does. (Queries hold no state, so
    nothing needs resuming after the second stop.)"""
    from graph.neo4j_server import start

    uri, home, port = own_neo4j
    world, _ = datasets
    clean = EmbeddedStore(tmp_path / "clean")
    load_dataset(clean, world, rejects_dir=tmp_path / "rejects")
    env = {"CHANNELGRAPH_NEO4J_BATCH_SIZE": "4", "CHANNELGRAPH_NEO4J_RETRY_SECONDS": "2", "FAULT_HOME": str(home)}

    stopped = run_cli("load", str(world), "--neo4j", uri, "--rejects", str(tmp_path / "rejects"),
                      env={**env, "FAULT_TARGET": "_write_transaction", "FAULT_AT": "6"})
    assert_one_line_error(stopped, uri, "writing failed")
    start(home=home, port=port, heap="512m", pagecache="128m")
    store = Neo4jStore.connect(Settings(neo4j=uri, neo4j_password=None))
    try:
        assert store._read("MATCH (l:Load) WHERE l.status = 'running' RETURN count(l)") == [[1]]
        load_dataset(store, world, rejects_dir=tmp_path / "rejects")
        assert_resumed(EmbeddedStore(tmp_path / "clean"), store)
        assert find_diversions(store) == find_diversions(EmbeddedStore(tmp_path / "clean"))
    finally:
        store.close()

    stopped = run_cli("diversions", "--format", "json", "--neo4j", uri, env={**env, "FAULT_TARGET": "_reading", "FAULT_AT": "2"})
    assert_one_line_error(stopped, uri, "reading failed")


# ------------------------------------------------------------------ full disk, read-only store


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        unavailable(f"cannot mount ({done.stderr.strip()}); needs root with CAP_SYS_ADMIN")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB file system (tmpfs)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_is_a_clear_error_and_keeps_the_previous_version(tiny_disk, datasets, tmp_path):
    world, scenario = datasets
    store = tiny_disk / "store"
    load_dataset(EmbeddedStore(store), world, rejects_dir=tmp_path / "rejects")
    before = contents(store)
    full = run_cli("load", str(scenario), "--store", str(store), "--rejects", str(tmp_path / "rejects"))
    assert_one_line_error(full, "No space left on device", "previous version is intact")
    assert contents(store) == before
    assert not list(store.glob(".tmp-*"))  # the partial version is cleaned up at once


def test_full_disk_while_writing_rejects_is_a_clear_error(tiny_disk, tmp_path):
    filler = tiny_disk / "filler"
    with filler.open("wb") as f:  # fill the disk
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    bad = write_world({**channel_world(), "products": [{"sku": "P1", "unit_price": "x" * 200}] * 400}, tmp_path / "bad")
    done = run_cli("load", str(bad), "--store", str(tmp_path / "store"), "--rejects", str(tiny_disk / "rejects"))
    assert_one_line_error(done, "reject", "No space left on device")
    assert not (tmp_path / "store" / "CURRENT").exists()  # nothing loaded without its reject records


def test_read_only_store_is_a_clear_error_and_keeps_the_store(datasets, tmp_path):
    """The store folder becomes a read-only bind mount of itself, so writes really fail."""
    world, scenario = datasets
    read_only = tmp_path / "ro"
    store = read_only / "store"
    load_dataset(EmbeddedStore(store), world, rejects_dir=tmp_path / "rejects")
    before = contents(store)
    _mount("--bind", str(read_only), str(read_only))
    try:
        _mount("-o", "remount,ro,bind", str(read_only))
        with pytest.raises(OSError, match="Read-only file system"):  # writes really fail here
            (store / "probe").write_text("x")
        done = run_cli("load", str(scenario), "--store", str(store), "--rejects", str(tmp_path / "rejects"))
        assert_one_line_error(done, "Read-only file system")
        assert contents(store) == before
        assert len(find_diversions(EmbeddedStore(store))) == len(CHANNEL_DIVERSIONS)  # reading still works
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
