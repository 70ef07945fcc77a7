"""The local Neo4j server manager (graph/neo4j_server.py) against a real JVM.

The `neo4j` tests build neo4j-server/ with Maven if needed (first time: ~125 MB of jars) and
start a JVM (about 10 s), so they are slow; they use a temporary home and a free port.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from graph.neo4j_server import ServerStatus, start, status, stop
from tests.conftest import needs

needs_jdk = needs(shutil.which("java") is not None and shutil.which("mvn") is not None, "needs java and mvn on PATH")
linux_only = needs(sys.platform.startswith("linux"), "reads /proc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state owned by ``pid`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            # /proc prints each 32-bit word of the address in host (little-endian) byte order
            raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found.add((str(ip), int(hex_port, 16)))
    return found


def test_status_of_a_new_home_is_not_running(tmp_path: Path) -> None:
    state = status(home=tmp_path, port=17999)
    assert state == ServerStatus(running=False, pid=None, uri="bolt://127.0.0.1:17999", ready=False,
                                 home=tmp_path.resolve(), log_file=tmp_path.resolve() / "neo4j.log")
    assert stop(home=tmp_path) is False


def test_a_stale_pid_file_is_never_signalled(tmp_path: Path) -> None:
    (tmp_path / "neo4j.pid").write_text(f"{os.getpid()}\n")  # a live process that is not the server
    assert status(home=tmp_path).running is False
    assert stop(home=tmp_path) is False  # and this test process is still alive to see it
    assert not (tmp_path / "neo4j.pid").exists()


@pytest.mark.neo4j
@pytest.mark.slow
@needs_jdk
@linux_only
def test_start_query_and_stop_a_real_server(tmp_path: Path) -> None:
    from neo4j import GraphDatabase

    home, port = tmp_path / "neo4j", free_port()
    state = start(home=home, port=port, timeout=180)
    pid = state.pid
    try:
        assert state.running and state.ready and pid is not None
        assert state.uri == f"bolt://127.0.0.1:{port}"
        assert (home / "neo4j.pid").read_text().strip() == str(pid)
        assert start(home=home, port=port).pid == pid  # idempotent

        listeners = listening_addresses(pid)
        assert ("127.0.0.1", port) in listeners
        assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listeners), listeners  # no HTTP, no 0.0.0.0

        with GraphDatabase.driver(state.uri, auth=None) as driver:
            records, _, _ = driver.execute_query("RETURN 1 AS one")
            assert records[0]["one"] == 1
            for _ in range(2):
                driver.execute_query("CREATE CONSTRAINT party_id IF NOT EXISTS FOR (p:Party) REQUIRE p.id IS UNIQUE")
            rows = [{"id": f"P{i}", "region": "R1" if i % 2 else "R2"} for i in range(100)]
            for _ in range(2):  # MERGE twice: still 100 nodes
                driver.execute_query("UNWIND $rows AS row MERGE (p:Party {id: row.id}) SET p.region = row.region",
                                     rows=rows)
            records, _, _ = driver.execute_query("MATCH (p:Party) RETURN count(p) AS n")
            assert records[0]["n"] == 100
            records, _, _ = driver.execute_query("MATCH (p:Party {id: $id}) RETURN p.region AS region", id="P7")
            assert records[0]["region"] == "R1"
            records, _, _ = driver.execute_query("CALL dbms.components() YIELD versions, edition RETURN versions, edition")
            assert records[0]["versions"][0].startswith("5.26.") and records[0]["edition"] == "community"
    finally:
        stopped = stop(home=home)

    assert stopped
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (home / "neo4j.pid").exists()
    assert status(home=home, port=port).running is False
    assert "STOPPED" in (home / "neo4j.log").read_text()  # the shutdown hook ran: a clean stop
