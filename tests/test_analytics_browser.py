"""The stores, consumers, rebates and regions views in headless Chromium: served by
`channelgraph serve` over the channel world, and as exported standalone files (the demo's
HTML output). Charts are inline SVG; the region flow graph is drawn by vis-network."""
from __future__ import annotations

from pathlib import Path

import pytest

from api.analytics_views import HOT, write_analytics_views
from api.service import ApiService
from graph.embedded import EmbeddedStore
from queries.rebates import load_policy
from tests.test_browser import View, assert_graph, browser, server, world  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.browser
POLICY = Path(__file__).resolve().parents[1] / "docs" / "policy.example.toml"


def _bars(view: View, chart: str) -> dict[str, str]:
    return dict(view.page.locator(f"#{chart} g.bar").evaluate_all(
        "gs => gs.map(g => [g.dataset.label, g.querySelector('rect').getAttribute('fill')])"))


def test_stores_view(browser, server):  # noqa: F811
    view = View(browser, f"{server}/views/stores")
    assert _bars(view, "chart-sales") == {"S3": HOT, "S1": "#2e86c1"}  # S3, the diversion sink, in red
    assert "diversion sink" in view.page.locator("#stores tr[data-key=S3]").inner_text()
    view.page.check("input[name=abnormal]")
    view.page.click("form.controls button")
    view.wait()
    assert view.page.locator("#stores tbody tr").evaluate_all("rows => rows.map(r => r.dataset.key)") == ["S3"]
    view.finish("stores")


def test_consumers_view(browser, server):  # noqa: F811
    view = View(browser, f"{server}/views/consumers?consumer=wx-a1")
    counts = dict(view.page.locator("#chart-funnel g.stage").evaluate_all(
        "gs => gs.map(g => [g.dataset.stage, Number(g.dataset.count)])"))
    assert counts == {"acquired": 12, "activated": 12, "retained": 4, "revenue": 4, "related": 4, "referral": 4}
    assert list(_bars(view, "chart-period-activated")) == ["2024-02", "2024-03"]
    assert "referral" in view.page.locator("#profile h2").inner_text()
    assert view.page.locator("#consumers tbody tr").count() == 12
    view.finish("consumers")


def test_regions_view(browser, server):  # noqa: F811
    view = View(browser, f"{server}/views/regions")
    cells = view.page.locator("#chart-heat g.cell").evaluate_all(
        "gs => gs.map(g => [g.dataset.from, g.dataset.to, Number(g.dataset.units)])")
    assert cells == [["ZJ", "JS", 15]]
    assert_graph(view.drawn("flow"), {"ZJ", "JS"}, {("ZJ", "JS")}, red={("ZJ", "JS")})
    view.page.select_option("select[name=level]", "city")
    view.page.click("form.controls button")
    view.wait()
    assert view.page.locator("#chart-heat g.cell").count() == 3  # HZ -> NJ, HZ -> SZ, NB -> NJ
    assert_graph(view.drawn("flow"), {"HZ", "NB", "NJ", "SZ"}, {("HZ", "NJ"), ("HZ", "SZ"), ("NB", "NJ")},
                 red={("HZ", "NJ"), ("HZ", "SZ"), ("NB", "NJ")})
    view.finish("regions")


def test_rebates_view_says_when_no_policy_is_configured(browser, server):  # noqa: F811
    view = View(browser, f"{server}/views/rebates")
    assert "CHANNELGRAPH_REBATE_POLICY" in view.page.locator("#cg-error").inner_text()
    view.finish("rebates-unconfigured")


def test_exported_analytics_files_work_offline(browser, world: Path, tmp_path: Path):  # noqa: F811
    paths = write_analytics_views(ApiService(EmbeddedStore(world)), tmp_path, policy=load_policy(POLICY))
    assert sorted(p.name for p in paths) == ["consumers.html", "rebates.html", "regions.html", "stores.html"]
    for path in paths:
        view = View(browser, path.as_uri())
        assert view.page.locator("figure.chart svg").count() >= 1
        if path.name == "rebates.html":
            assert "withheld 13.50" in view.page.locator("#rebate-summary").inner_text()
            assert view.page.locator("#withheld tbody tr").count() == 6
        if path.name == "regions.html":
            assert_graph(view.drawn("flow"), {"ZJ", "JS"}, {("ZJ", "JS")}, red={("ZJ", "JS")})
        view.finish(f"exported-{path.stem}")
        assert all(url.startswith(("file:", "data:")) for url in view.requests)
