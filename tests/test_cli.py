"""The CLI contract of issues 2 and 4: command and option names, the documents' fields,
stdout carrying only the document with --format json/csv, exit status and one-line
errors on bad input (embedded store, the hand-checked channel world); a folder without
a store is an error, not an empty answer; an empty CSV still has its header."""
from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
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
    assert {"accepted", "rejected", "duplicates", "rejects_path", "skipped"} <= set(report) and report["skipped"] == []
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


def test_findings_csv_is_the_api_download(world, capsys):
    """`diversions --format csv` and GET /api/diversions.csv are one CSV (territory `|`-separated, the path as holders)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from graph.settings import Settings

    store, _ = world
    code, out, _ = run(capsys, "diversions", "--store", str(store), "--format", "csv")
    download = TestClient(create_app(Settings(store=store))).get("/api/diversions.csv").text
    assert code == 0 and out == download and " > " in out


@pytest.mark.parametrize(("argv", "message", "status"), [
    (["trace", "NOPE"], "unknown code 'NOPE'", 1),
    (["diversions", "--severity", "maybe"], "severity 'maybe'", 1),
    (["diversions", "--by", "colour"], "--by 'colour'", 1),
    (["diversions", "--since", "yesterday"], "--since 'yesterday'", 1),
    (["diversions", "--since", ""], "--since ''", 1),
    (["diversions", "--k", "0"], "k", 1),
    (["trace", "K1", "--k", "-1"], "k", 1),
    (["influencers", "--top", "-1"], "--top", 2),
    (["influencers", "--by", "fame"], "--by 'fame'", 1),
    (["influencers", "--percent", "0"], "--percent", 1),
    (["diversions", "--format", "xml"], "--format", 2),
    (["disperse"], "No such command 'disperse'", 2),
    (["load"], "dataset", 2),
    (["diversions", "--untracked", "--by", "sku"], "--untracked", 1),
    (["diversions", "--untracked", "--severity", "confirmed"], "--untracked", 1),
    (["influencers", "--stats", "--cascade", "C1"], "--stats", 1),
    (["influencers", "--cascade", "C1", "--top", "3"], "--top, --percent and --by", 1),
    (["influencers", "--stats", "--by", "influence"], "not with --stats or --cascade", 1),
    (["generate", "never-written", "--scale", "0"], "--scale 0", 1),
    (["generate", "never-written", "--scale", "-1"], "--scale -1", 1),
    (["generate", "/proc/no-such-folder/data"], "/proc/no-such-folder: No such file", 1),
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


POLICY = str(ROOT / "docs" / "policy.example.toml")
READS = [["trace", "A1"], ["trace", "--batch", "B1"], ["diversions"], ["diversions", "--untracked"],
         ["diversions", "--by", "sku"], ["influencers"], ["influencers", "--stats"], ["influencers", "--cascade", "C1"],
         ["stores"], ["consumers"], ["rebates", "--policy", POLICY], ["regions"], ["export", "epcis", "A1"],
         ["viz", "diversions"]]


@pytest.mark.parametrize("argv", READS, ids=" ".join)
def test_reading_a_folder_without_a_store_is_a_one_line_error(tmp_path, capsys, monkeypatch, argv: list[str]):
    monkeypatch.chdir(tmp_path)  # where viz would write its page
    for folder, what in ((tmp_path / "typo", "does not exist"), (tmp_path, "holds no store")):
        code, out, err = run(capsys, *argv, "--store", str(folder))
        assert (code, out) == (1, ""), err
        assert err.count("\n") == 1 and err.startswith(f"channelgraph: error: no store at {folder} (the folder {what})"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no store folder made


def test_serve_warns_of_a_folder_without_a_store(tmp_path):
    """`serve` may start before the first load (it answers once one happens), but a mistyped
    --store is said on stderr before the server starts, not left to look like empty answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--store", str(tmp_path / "typo"),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = []
        for line in server.stderr:
            lines.append(line)
            if line.startswith("channelgraph on"):
                break
    finally:
        server.terminate()
        server.wait(timeout=30)
    said = " ".join(" ".join(lines).split())
    assert f"warning: no store at {tmp_path / 'typo'} (the folder does not exist)" in said, said


def test_the_default_store_folder_is_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHANNELGRAPH_STORE", raising=False)
    code, out, err = run(capsys, "diversions", "--format", "json")
    assert (code, out) == (1, "") and "no store at channelgraph-data (the folder does not exist)" in err


def header(capsys, *argv: str) -> tuple[list[str], int]:
    """The CSV header `channelgraph ARGV --format csv` prints, and its number of data rows."""
    code, out, err = run(capsys, *argv, "--format", "csv")
    assert code == 0, err
    lines = out.splitlines()
    return next(csv.reader(lines[:1])) if lines else [], len(lines) - 1


@pytest.mark.parametrize(("some", "none"), [
    (["diversions"], ["diversions", "--since", "2999-01-01"]),
    (["diversions", "--by", "responsible"], ["diversions", "--by", "responsible", "--since", "2999-01-01"]),
    (["diversions", "--by", "region-pair"], ["diversions", "--by", "region-pair", "--severity", "suspected", "--since", "2999-01-01"]),
    (["stores"], ["stores", "--region", "SZ"]),
    (["consumers"], ["consumers", "--stage", "acquired", "--segment", "champions"]),  # no purchase: a prospect
    (["rebates", "--policy", POLICY], ["rebates", "--policy", POLICY, "--month", "1999-01"]),
    (["rebates", "--policy", POLICY, "--lines"], ["rebates", "--policy", POLICY, "--lines", "--month", "1999-01"]),
    (["regions", "--matrix"], ["regions", "--matrix", "--as-of", "2024-02-01"]),
], ids=lambda argv: " ".join(argv))
def test_an_empty_csv_has_the_header_of_a_full_one(world, capsys, some: list[str], none: list[str]):
    store, _ = world
    want, rows = header(capsys, *some, "--store", str(store))
    assert rows > 0 and want
    assert header(capsys, *none, "--store", str(store)) == (want, 0)


def test_quiet_stores_print_the_headers_of_the_channel_world(world, tmp_path, capsys):
    """Stores without untracked units, referrals, hand-overs of a batch, events of a unit
    or sales: the empty CSVs have the channel world's headers."""
    tables = channel_world()
    tables["codes"] = [c for c in tables["codes"] if c["code"] not in ("CU", "U1")] + [
        {"code": "N1", "level": "unit", "sku": "BJ500", "batch": "B9"}]
    tables["scans"] = [s for s in tables["scans"] if s["code"] not in ("CU", "U1")] + [
        {"event_id": "n1", "code": "N1", "action": "receive", "party_id": "D1", "counterparty_id": "F1",
         "ts": "2024-02-01T00:00:00Z"}]  # assigned, so not untracked
    del tables["referrals"]
    quiet = tmp_path / "quiet"
    assert run(capsys, "load", str(write_world(tables, tmp_path / "world")), "--store", str(quiet))[0] == 0
    tables["codes"].append({"code": "N2", "level": "unit", "sku": "BJ500", "batch": "B9"})
    unscanned = tmp_path / "unscanned"
    assert run(capsys, "load", str(write_world(tables, tmp_path / "world2")), "--store", str(unscanned))[0] == 0
    del tables["scans"]
    unsold = tmp_path / "unsold"
    assert run(capsys, "load", str(write_world(tables, tmp_path / "world3")), "--store", str(unsold))[0] == 0
    for some, none, store in (
            (["diversions", "--untracked"], ["diversions", "--untracked"], quiet),
            (["influencers"], ["influencers"], quiet),
            (["influencers", "--by", "direct"], ["influencers", "--by", "direct"], quiet),
            (["trace", "--batch", "B1"], ["trace", "--batch", "B9"], unsold),
            (["trace", "A1"], ["trace", "N2"], unscanned),
            (["consumers", "--profile", "C1"], ["consumers", "--profile", "C1"], unsold),
            (["consumers", "--funnel", "month"], ["consumers", "--funnel", "month"], unsold)):
        want, rows = header(capsys, *some, "--store", str(world[0]))
        assert rows > 0 and want
        assert header(capsys, *none, "--store", str(store)) == (want, 0), none


def test_the_tables_end_with_what_was_counted(world, capsys):
    store, _ = world
    code, out, _ = run(capsys, "diversions", "--store", str(store), "--severity", "suspected")
    assert code == 0 and out.splitlines()[-1] == (
        "19 units: 18 judged, 15 diverted (12 confirmed, 3 suspected); 1 untracked (no factory shipment to a "
        "distributor: never judged; listed by --untracked)")
    code, out, _ = run(capsys, "influencers", "--store", str(store))
    assert code == 0 and out.splitlines()[-1] == (
        "13 referrals: 7 attributed, 6 ignored (1 self-referrals, 1 repeated pairs, 3 of an already attributed "
        "referee, 1 closing a cycle); see --stats")
    code, out, _ = run(capsys, "diversions", "--store", str(store), "--untracked", "--format", "json")
    assert code == 0 and json.loads(out) == [{
        "code": "U1", "sku": "BJ500", "batch": "B1", "events": 2, "last_holder": "wx-u1", "last_region": "NJ",
        "first_ts": "2024-02-02T00:00:00Z", "last_ts": "2024-03-01T00:00:00Z"}]


def test_demo_recovers_the_planted_answers_and_writes_offline_views(tmp_path):
    """The README's main job, small: every planted diversion and untracked unit found, no
    false finding, the views written with nothing loaded from outside, and the example
    trace printed with each hand-over's direction (receive: <- the sender)."""
    done = channelgraph("demo", "--out-dir", str(tmp_path / "json"), "--scale", "0.3", "--seed", "3", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    found, planted = map(int, report["planted_diversions_recovered"].split("/"))
    assert found == planted > 0 and report["false_findings"] == 0
    assert report["diverted_units"] == report["confirmed"] + report["suspected"] == planted
    found, planted = map(int, report["planted_untracked_recovered"].split("/"))
    assert found == planted == report["untracked_units"]
    assert report["judged_units"] == report["units"] - report["untracked_units"]
    found, planted = map(int, report["planted_abnormal_stores_flagged"].split("/"))
    assert found == planted > 0  # as of the time the scenario plants them for
    pages = [Path(p) for p in report["views"]]
    assert {p.name for p in pages} >= {"trace.html", "diversions.html", "influencers.html", "stores.html"}
    for page in pages:
        html = page.read_text()
        assert "src=\"http" not in html and "href=\"http" not in html, page

    table = channelgraph("demo", "--out-dir", str(tmp_path / "table"), "--scale", "0.3", "--seed", "3")
    assert table.returncode == 0, table.stderr
    figures = channelgraph("demo", "--out-dir", str(tmp_path / "csv"), "--scale", "0.3", "--seed", "3", "--format", "csv")
    rows = {row["figure"]: row["value"] for row in csv.DictReader(io.StringIO(figures.stdout))}
    assert rows["planted_diversions_recovered"] == report["planted_diversions_recovered"] and "views" not in rows
    example = report["example_trace"]
    assert any(hop["action"] == "receive" and hop["counterparty_id"] for hop in example["path"])
    for hop in example["path"]:
        if hop["counterparty_id"]:
            arrow = "<-" if hop["action"] == "receive" else "->"
            assert f"{arrow} {hop['counterparty_id']}" in table.stdout.replace("\n", " ")


def test_help_says_what_the_options_default_to(capsys):
    """Bracketed help text (the env variable, the default) is printed, not taken for markup."""
    def said(text: str) -> str:  # wrapped anywhere, hyphens included
        return "".join(text.split())

    code, out, _ = run(capsys, "load", "--help")
    assert code == 0 and said("[env CHANNELGRAPH_STORE; default ./channelgraph-data]") in said(out)
    assert said("[default: STORE/rejects]") in said(out)
    code, out, _ = run(capsys, "stores", "--help")
    assert code == 0 and said("[default: the latest event]") in said(out)


def readme_commands() -> list[str]:
    """The command lines of the README's CLI block that answer and exit (not demo, neo4j, serve)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The CLI", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("channelgraph ")
            and line.split()[1] not in ("demo", "neo4j", "serve")]


def test_every_readme_command_answers_on_the_readme_scenario(tmp_path, capsys, monkeypatch):
    """A new user runs the README's CLI block as written, in a folder of their own (the
    default store, `docs/` of the checkout), CODE and PARTY_ID from the scenario's answers:
    each command exits 0 and finds something."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHANNELGRAPH_STORE", raising=False)
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    commands = readme_commands()
    assert commands[0].startswith("channelgraph generate data/") and len(commands) >= 15
    answers = None
    for line in commands:
        if answers is None and not line.startswith("channelgraph generate"):
            answers = json.loads((tmp_path / "data" / "answers.json").read_text())
            code = answers["diversions"][0]["code"]
            party = answers["super_users"][0]["party_id"]
        argv = line.split()[1:]
        if answers is not None:
            argv = [code if a == "CODE" else party if a == "PARTY_ID" else a for a in argv]
        status, out, err = run(capsys, *argv)
        assert status == 0, f"{line}: {err}"
        assert "--out" in argv or (out.strip() and "nothing found" not in out and out.strip() != "[]"), f"{line}: {out}"


def test_every_option_says_what_it_does():
    import typer

    from api.cli import app

    def commands(command, path: str) -> Iterator[tuple[str, object]]:  # noqa: ANN001 - a click command (typer's own click)
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")

    bare = [f"{path} {param.opts[0]}" for path, command in commands(typer.main.get_command(app), "channelgraph")
            for param in command.params if param.param_type_name == "option" and not param.help]
    assert bare == []


def test_load_warns_of_a_misspelt_table_file_but_not_of_the_answers(tmp_path):
    """A generated folder's answers.json is no data and no warning; a file named like a table
    with a typo is ignored with a warning that names the table it comes close to."""
    data = write_world(channel_world(), tmp_path / "world")
    (data / "answers.json").write_text("{}")
    (data / "scans.csv").rename(data / "scnas.csv")
    done = channelgraph("load", str(data), "--store", str(tmp_path / "store"), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert "scnas.csv" in done.stderr and "did you mean scans.csv?" in done.stderr
    assert "answers.json" not in done.stderr
    assert json.loads(done.stdout)["accepted"].get("scans", 0) == 0


def test_load_reads_table_files_whatever_the_case_of_their_extension(tmp_path):
    """scans.CSV is the scans table; referrals.txt is no format read: a warning says which
    are. With --format csv the rejects file is named on stderr."""
    tables = channel_world()
    tables["scans"].append({"event_id": "bad", "code": "NO-SUCH-CODE", "action": "scan", "party_id": "C1",
                            "ts": "2024-03-01T00:00:00Z"})
    data = write_world(tables, tmp_path / "world")
    (data / "scans.csv").rename(data / "scans.CSV")
    (data / "referrals.csv").rename(data / "referrals.txt")
    done = channelgraph("load", str(data), "--store", str(tmp_path / "store"), "--format", "csv")
    assert done.returncode == 0, done.stderr
    loaded = {row["table"]: int(row["accepted"]) for row in csv.DictReader(io.StringIO(done.stdout))}
    rejected = {row["table"]: int(row["rejected"]) for row in csv.DictReader(io.StringIO(done.stdout))}
    assert loaded["scans"] > 0 and rejected["scans"] == 1 and loaded.get("referrals", 0) == 0
    assert "referrals.txt" in done.stderr and "a table is read from a .csv, .jsonl, .parquet file" in done.stderr
    assert "rejected rows and reasons:" in done.stderr


def test_a_table_written_to_a_pipe_keeps_each_row_on_one_line(world):
    """Piped or redirected, a table is not folded to a terminal's 80 columns."""
    store, _ = world
    findings = json.loads(channelgraph("diversions", "--store", str(store), "--format", "json").stdout)
    table = channelgraph("diversions", "--store", str(store))
    rows = [line for line in table.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == len(findings) > 0
    assert sorted(row.split("│")[1].strip() for row in rows) == sorted(f["code"] for f in findings)
