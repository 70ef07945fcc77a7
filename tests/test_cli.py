"""The CLI contract of issues 2 and 4: command and option names, the documents' fields,
stdout carrying only the document with --format json/csv, exit status and one-line
errors on bad input (embedded store, the hand-checked channel world)."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import main
from tests.worlds import channel_world, write_world

ROOT = Path(__file__).resolve().parents[1]
FINDING = {"code", "sku", "batch", "responsible", "territory", "severity", "crossing_event_id", "crossing_ts",
           "crossing_party", "crossing_region", "exit_via", "path"}
HOP = {"party_id", "kind", "region_id", "ts", "event_id", "action", "crossed"}
TRACE = {"code", "level", "sku", "batch", "ancestors", "assigned_distributor", "path", "events"}
INFLUENCER = {"party_id", "kind", "direct", "converted", "cascade_size", "cascade_depth", "referred_revenue", "influence"}


def channelgraph(*argv: str) -> subprocess.CompletedProcess:
    """The installed CLI in a process of its own."""
    return subprocess.run([sys.executable, "-m", "api.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(the store, the load document) of the channel world loaded by the CLI process."""
    home = tmp_path_factory.mktemp("cli")
    done = channelgraph("load", str(write_world(channel_world(), home / "world")), "--store", str(home / "store"),
                        "--format", "json")
    assert done.returncode == 0, done.stderr
    return home / "store", json.loads(done.stdout)  # stdout is the document alone


def test_load_document(world):
    _, report = world
    assert {"accepted", "rejected", "duplicates", "rejects_path"} <= set(report)
    assert report["duplicates"]["scans"] == 2  # the world repeats two scans
    assert report["accepted"]["scans"] == len(channel_world()["scans"]) - 2 and not any(report["rejected"].values())


def test_documents_alone_on_stdout_with_the_issue_fields(world):
    store, _ = world
    done = channelgraph("diversions", "--store", str(store), "--format", "json")
    findings = json.loads(done.stdout)
    assert done.returncode == 0 and findings and all(FINDING <= set(f) for f in findings)
    assert all(HOP <= set(hop) for f in findings for hop in f["path"])
    done = channelgraph("diversions", "--store", str(store), "--severity", "suspected", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert done.returncode == 0 and sorted(r["code"] for r in rows) == ["J1", "J2", "K4"]
    done = channelgraph("trace", "K1", "--store", str(store), "--k", "4", "--format", "json")
    traced = json.loads(done.stdout)
    assert TRACE <= set(traced) and traced["diversion"]["severity"] == "suspected"
    done = channelgraph("influencers", "--store", str(store), "--top", "2", "--by", "cascade_size", "--format", "json")
    assert done.returncode == 0 and [set(i) for i in json.loads(done.stdout)] == [INFLUENCER] * 2


@pytest.mark.parametrize(("argv", "message", "status"), [
    (["trace", "NOPE"], "unknown code 'NOPE'", 1),
    (["diversions", "--severity", "maybe"], "severity 'maybe'", 1),
    (["diversions", "--by", "colour"], "--by 'colour'", 1),
    (["diversions", "--since", "yesterday"], "--since 'yesterday'", 1),
    (["diversions", "--k", "0"], "k", 1),
    (["trace", "K1", "--k", "-1"], "k", 1),
    (["influencers", "--top", "-1"], "--top", 2),
    (["influencers", "--by", "fame"], "--by 'fame'", 1),
    (["influencers", "--percent", "0"], "--percent", 1),
    (["diversions", "--format", "xml"], "--format", 2),
    (["disperse"], "No such command 'disperse'", 2),
    (["load"], "dataset", 2),
])
def test_bad_input_is_a_one_line_error(world, capsys, argv: list[str], message: str, status: int):
    store, _ = world
    code, out, err = run(capsys, *argv, "--store", str(store))
    assert (code, out) == (status, "")
    assert err.count("\n") == 1 and err.startswith("channelgraph: error:") and message in err, err


def test_bad_k_in_the_environment_is_a_one_line_error(world, capsys, monkeypatch):
    monkeypatch.setenv("CHANNELGRAPH_K", "0")
    code, out, err = run(capsys, "diversions", "--store", str(world[0]), "--format", "json")
    assert (code, out) == (1, "") and err.startswith("channelgraph: error: bad setting k")
