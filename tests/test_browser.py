"""Each view in a real headless Chromium, against `channelgraph serve` on loopback.

Playwright drives Debian's /usr/bin/chromium (no browser download). Through the page's
JavaScript (`window.cg`) each test checks which nodes and edges vis-network holds and that
its canvas has ink; every request the page makes must go to 127.0.0.1 (or, for an exported
file, nowhere). Screenshots go to test-artifacts/. Without Chromium or playwright these
tests skip locally and fail in CI (CI=true).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from graph.embedded import EmbeddedStore
from loaders.ingest import load_dataset
from tests.conftest import unavailable
from tests.worlds import channel_world, write_world

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

DRAWN = """(name) => {
  const g = window.cg.networks[name];
  if (!g) return null;
  const canvas = document.querySelector('[data-graph="' + name + '"] canvas');
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 3; i < pixels.length; i += 4 * 7) if (pixels[i] > 0) ink++;
  const red = window.cg.data.crossed;
  return {nodes: g.nodes.getIds().sort(), edges: g.edges.get().map(e => [e.from, e.to]),
          red: g.edges.get().filter(e => e.color.color === red).map(e => [e.from, e.to]),
          tooltips: g.edges.get().filter(e => e.color.color === red).map(e => e.title),
          positioned: Object.keys(g.network.getPositions()).length, ink: ink};
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM} (scripts/test installs Debian's chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("browser-world")
    load_dataset(EmbeddedStore(home / "store"), write_world(channel_world(), home / "world"), rejects_dir=home / "rejects")
    return home / "store"


@pytest.fixture(scope="module")
def server(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`channelgraph serve` on a free loopback port; its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from api.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--store", str(world), "--port", str(port), "--log-level", "warning"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    yield base
    process.terminate()
    process.wait(timeout=30)


class View:
    """One open page, with every request URL and script error it produced."""

    def __init__(self, browser, url: str):  # noqa: ANN001 - a playwright Browser
        self.page = browser.new_page(viewport={"width": 1440, "height": 1000})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.goto(url)

    def goto(self, url: str) -> None:
        self.page.goto(url)
        self.wait()

    def wait(self) -> None:
        self.page.wait_for_function("window.cg && window.cg.ready", timeout=30_000)

    def drawn(self, name: str) -> dict:
        self.page.wait_for_timeout(150)  # one animation frame for vis to paint
        return self.page.evaluate(DRAWN, name)

    def finish(self, screenshot: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{screenshot}.png"), full_page=True)
        assert self.errors == []
        hosts = {urlsplit(url).hostname for url in self.requests if not url.startswith(("data:", "file:"))}
        assert hosts <= {"127.0.0.1"}, hosts
        self.page.close()


def assert_graph(drawn: dict, nodes: set[str], edges: set[tuple[str, str]], red: set[tuple[str, str]] = frozenset()) -> None:
    assert set(drawn["nodes"]) == nodes
    assert {tuple(e) for e in drawn["edges"]} == edges
    assert {tuple(e) for e in drawn["red"]} == set(red)
    assert drawn["positioned"] == len(nodes) and drawn["ink"] > 100  # vis laid out and painted them


def test_trace_view(browser, server):
    view = View(browser, f"{server}/views/trace?code=A1")
    assert_graph(view.drawn("main"), {"F1", "D1", "S3", "wx-a1"},
                 {("F1", "D1"), ("D1", "S3"), ("S3", "wx-a1")}, red={("D1", "S3")})
    assert view.page.locator("#hops tr.crossed td").first.inner_text().startswith("2024-02-03")
    hover = view.drawn("main")["tooltips"][0]  # what hovering the red edge shows
    assert "ship a3 on CA: D1" in hover and "S3" in hover and "CROSSED" in hover
    view.page.fill("input[name=code]", "SS1")  # search another code
    view.page.click("form.controls button")
    view.wait()
    assert_graph(view.drawn("main"), {"F1", "D1", "SD1", "S3"},
                 {("F1", "D1"), ("D1", "SD1"), ("SD1", "S3")}, red={("SD1", "S3")})
    view.finish("trace")


def test_diversions_view(browser, server):
    view = View(browser, f"{server}/views/diversions")
    assert_graph(view.drawn("regions"), {"ZJ", "NJ", "SZ"}, {("ZJ", "NJ"), ("ZJ", "SZ")}, red={("ZJ", "NJ"), ("ZJ", "SZ")})
    latest = view.drawn("detail")  # the latest crossing is selected first
    assert_graph(latest, {"F1", "D1", "wx-k4"}, {("F1", "D1"), ("D1", "wx-k4")}, red={("D1", "wx-k4")})
    view.page.click("#findings tr[data-key=SS1]")
    assert_graph(view.drawn("detail"), {"F1", "D1", "SD1", "S3"},
                 {("F1", "D1"), ("D1", "SD1"), ("SD1", "S3")}, red={("SD1", "S3")})
    rows = view.page.locator("#findings tbody tr:visible")
    view.page.click("#findings thead tr:first-child th:first-child")  # sort by code
    assert rows.first.get_attribute("data-key") == "A1"
    view.page.fill("#findings tr.filters th:nth-child(2) input", "suspected")
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.key)")) == ["J1", "J2", "K4"]
    view.finish("diversions")


def test_influencers_view(browser, server):
    view = View(browser, f"{server}/views/influencers?by=cascade_size")
    assert view.page.locator("#ranking tbody tr").first.get_attribute("data-key") == "S1"
    cascade = {("S1", "C1"), ("C1", "wx-a1"), ("wx-a1", "wx-k1"), ("wx-a1", "wx-k2"), ("wx-k1", "wx-k3")}
    assert_graph(view.drawn("detail"), {"S1", "C1", "wx-a1", "wx-k1", "wx-k2", "wx-k3"}, cascade)
    view.page.click("#ranking tr[data-key=C1]")  # another user's cascade, from the server
    view.wait()
    assert_graph(view.drawn("detail"), {"C1", "wx-a1", "wx-k1", "wx-k2", "wx-k3"}, cascade - {("S1", "C1")})
    options = view.page.locator("select[name=by] option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["influence", "cascade_size", "cascade_depth", "direct", "converted", "revenue"]
    view.finish("influencers")


def test_network_view(browser, server):
    flow = httpx.get(f"{server}/api/flow").json()["edges"]
    view = View(browser, f"{server}/views/network")
    assert_graph(view.drawn("main"), {p for e in flow for p in (e["source"], e["target"])},
                 {(e["source"], e["target"]) for e in flow})
    view.goto(f"{server}/views/network?batch=B2")
    assert_graph(view.drawn("main"), {"F1", "D1", "S3", "wx-b2"}, {("F1", "D1"), ("D1", "S3"), ("S3", "wx-b2")})
    view.finish("network")


def test_exported_file_works_offline(browser, world: Path, tmp_path: Path):
    from api.cli import main

    out = tmp_path / "diversions.html"
    assert main(["viz", "diversions", "--store", str(world), "--out", str(out)]) == 0
    view = View(browser, out.as_uri())
    assert_graph(view.drawn("regions"), {"ZJ", "NJ", "SZ"}, {("ZJ", "NJ"), ("ZJ", "SZ")}, red={("ZJ", "NJ"), ("ZJ", "SZ")})
    view.page.click("#findings tr[data-key=B2]")
    assert_graph(view.drawn("detail"), {"F1", "D1", "S3", "wx-b2"}, {("F1", "D1"), ("D1", "S3"), ("S3", "wx-b2")},
                 red={("D1", "S3")})
    assert all(url.startswith(("file:", "data:")) for url in view.requests), view.requests
    view.finish("diversions-file")
