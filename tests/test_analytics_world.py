"""Stores, consumers, rebates and regions on hand-checked worlds, on every store.

The channel world (tests/worlds.py) as of its last event, 2024-03-04: store S3 (Nanjing)
took in A1-A3, B1, B2, M1, O1, SS1 (diverted), R1 and U1; S1 (Xihu) took in T1. The
first consumer scans credited to a store: b4 (B2, S3, withheld: b2), a5 (A1, S3,
withheld: a3), r5 (R1, S3), t4 (T1, S1), u2 (U1, S3); h3, j2, j3, k3-k6 have no store.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from graph.errors import ChannelgraphError, NotFound
from loaders.ingest import load_dataset
from queries.consumers import _quintile, lifecycle, profile, stage_funnel
from queries.rebates import load_policy, policy_from, rebates
from queries.regions import region_sell_through
from queries.stores import store_health
from tests.analytics_worlds import AS_OF, shop_world
from tests.worlds import add_case, channel_world, write_world

POLICY = policy_from({"currency": "CNY", "default": {"store": 2.0, "distributor": 1.0, "salesperson": 0.5},
                      "sku": {"BJ500": {"store": 6.0, "distributor": 3.0, "salesperson": 1.0}}})


@pytest.fixture
def world_store(store, tmp_path: Path):
    load_dataset(store, write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    return store


@pytest.fixture
def shop_store(store, tmp_path: Path):
    load_dataset(store, write_world(shop_world(), tmp_path / "shop"), rejects_dir=tmp_path / "rejects")
    return store


def test_store_health_of_the_channel_world(world_store):
    health = {h.store_id: h for h in store_health(world_store, min_peers=1)}
    s3 = health["S3"]
    assert (s3.sell_in, s3.sell_in_window, s3.sell_out, s3.sell_out_window, s3.diverted_in) == (10, 2, 4, 4, 8)
    assert (s3.scan_rate, s3.daily_sales, s3.stock) == (0.4, 0.357, 0.0)  # 4/10; 4 / 0.4 / 28; 10 - 4/0.4
    assert [(f.basis, f.direction) for f in s3.flags] == [("diversion", "high")]
    assert "8 of its 10 units" in s3.flags[0].reason
    s1 = health["S1"]
    assert (s1.sell_in, s1.sell_out, s1.scan_rate, s1.abnormal) == (1, 1, 1.0, False)
    assert [h.store_id for h in store_health(world_store, region="ZJ")] == ["S1"]
    assert [h.store_id for h in store_health(world_store, abnormal_only=True)] == ["S3"]


def test_store_health_as_of_an_earlier_time(world_store):
    s3 = next(h for h in store_health(world_store, as_of="2024-02-05T12:00:00Z") if h.store_id == "S3")
    # M1, U1, A1-A3, SS1, B1, B2 taken in, all but untracked U1 diverted; b4 (the first scan) is on 02-07
    assert (s3.sell_in, s3.sell_out, s3.diverted_in) == (8, 0, 7)


def test_abnormal_stores_of_the_shop_world(shop_store):
    health = {h.store_id: h for h in store_health(shop_store, as_of=AS_OF)}
    flags = {s: [(f.basis, f.metric, f.direction, f.z) for f in h.flags] for s, h in health.items()}
    assert flags == {
        "SS1": [], "SS2": [], "SS3": [],
        "SS4": [("peers", "sell_in_window", "high", 3.99)],
        "SS5": [("peers", "daily_sales", "low", -3.99), ("history", "weekly_sell_out", "low", -4.0)],
    }
    ss4 = health["SS4"]
    assert (ss4.sell_in, ss4.sell_in_window, ss4.sell_out, ss4.scan_rate) == (168, 120, 48, 0.4912)
    assert (ss4.daily_sales, ss4.stock, ss4.days_of_cover) == (1.163, 70.3, 60.4)
    assert (ss4.next_purchase_date, ss4.next_purchase_qty) == ("2024-05-24T09:36:00Z", 33)
    assert [h.store_id for h in store_health(shop_store, as_of=AS_OF, abnormal_only=True)] == ["SS4", "SS5"]


def test_store_health_rejects_bad_options(world_store):
    for options in ({"region": "Atlantis"}, {"peer_level": "street"}, {"window_days": 10}):
        with pytest.raises(ValueError):
            store_health(world_store, **options)


def test_consumer_stages_and_next_actions(world_store):
    table = {c.party_id: c for c in lifecycle(world_store)}
    stages = {p: c.stage for p, c in table.items()}
    # C1: one unit (T1; its repeat scan buys nothing), its referee wx-a1 bought; wx-a1, wx-k1, wx-j2: converted referrals
    assert {p for p, s in stages.items() if s == "referral"} == {"C1", "wx-a1", "wx-k1", "wx-j2"}
    assert {p for p, s in stages.items() if s == "activated"} == {
        "wx-b2", "wx-h1", "wx-j1", "wx-k2", "wx-k3", "wx-k4", "wx-r1", "wx-u1"}
    assert table["wx-b2"].next_action == "repurchase"
    c1 = table["C1"]
    assert (c1.purchases, c1.purchase_days, c1.monetary, c1.converted_referrals) == (1, 1, 300.0, 1)
    # 12 buyers of one unit each. Recency: wx-b2 26 days (rank 1), C1 and 6 others 3 days (ranks 2-8, average 5:
    # ceil(5 x 5 / 12) = 3), wx-j2 2.96 days (rank 9: 4), wx-k2..k4 later (5). F: all tied (average rank 6.5: 3).
    # M: wx-b2 120.5 (rank 1: 1), the others 300 (average rank 7: 3)
    assert (c1.r, c1.f, c1.m, c1.segment) == (3, 3, 3, "loyal")
    assert [(table[p].r, table[p].f, table[p].m) for p in ("wx-b2", "wx-j2", "wx-k4")] == [(1, 3, 1), (4, 3, 3), (5, 3, 3)]
    assert table["wx-a1"].converted_referrals == 2
    assert [c.party_id for c in lifecycle(world_store, stage="referral", segment="loyal")] == ["C1", "wx-a1", "wx-j2", "wx-k1"]
    assert [c.party_id for c in lifecycle(world_store, stage="activated", segment="lost")] == ["wx-b2"]
    with pytest.raises(ValueError):
        lifecycle(world_store, stage="loyalist")


def test_rfm_scores_are_quintiles_with_ties_sharing():
    """Distinct values: quintiles; ties share their average rank; the best of a few scores 5."""
    scores = {tuple(values): _quintile(pd.Series(values, dtype=float)).tolist() for values in
              ([5, 1, 4, 2, 3], list(range(10)), [10, 20], [7, 7, 7], [1] * 100, [3], [1, 2, 2, 2, 9])}
    assert scores == {(5, 1, 4, 2, 3): [5, 1, 4, 2, 3], tuple(range(10)): [1, 1, 2, 2, 3, 3, 4, 4, 5, 5],
                      (10, 20): [3, 5], (7, 7, 7): [4, 4, 4], (1,) * 100: [3] * 100, (3,): [5],
                      (1, 2, 2, 2, 9): [1, 3, 3, 3, 5]}


def test_lifecycle_at_times_far_from_the_data(world_store):
    """Any ISO time is a valid analysis time (the API passes them through): year 1 is before
    every purchase, year 9999 after all of them."""
    # nobody was seen by then: a consumer counts from its first purchase or referral (as in the funnel)
    assert lifecycle(world_store, as_of="0001-01-01T00:00:00Z") == []
    # the end of February (the funnel's first row): the 9 consumers seen by then, wx-b2 the only buyer
    feb = lifecycle(world_store, as_of=stage_funnel(world_store, period="month")[0]["as_of"])
    assert len(feb) == 9 and [c.party_id for c in feb if c.stage != "acquired"] == ["wx-b2"]
    late, now = ({c.party_id: c.stage for c in lifecycle(world_store, as_of=t)} for t in ("9999-12-31T00:00:00Z", None))
    assert late == now and set(now.values()) != {"acquired"}


def test_stage_funnel_by_month(world_store):
    funnel = stage_funnel(world_store, period="month")
    assert [row["period"] for row in funnel] == ["2024-02", "2024-03"]
    # February: 9 consumers seen (referrals and wx-b2's scan), wx-b2 the only buyer
    assert [funnel[0][s] for s in ("acquired", "activated", "retained", "referral")] == [9, 1, 0, 0]
    assert [funnel[1][s] for s in ("acquired", "activated", "retained", "referral")] == [12, 12, 4, 4]


def test_consumer_profile(world_store):
    one = profile(world_store, "wx-a1")
    assert one.purchases == [{"ts": "2024-03-01T00:00:00Z", "code": "A1", "sku": "BJ500", "unit_price": 300.0, "store": "S3"}]
    assert one.stores == [{"store": "S3", "purchases": 1}]
    assert one.referred_by == {"referrer_id": "C1", "ts": "2024-02-20T00:00:00Z"}
    assert [(r["referee_id"], r["converted"]) for r in one.referrals] == [("wx-k1", True), ("wx-k2", True)]
    assert {"stage:referral", "referrer", "referred", "sku:BJ500"} <= set(one.tags)
    with pytest.raises(NotFound, match="'S1' is a store, not a consumer"):
        profile(world_store, "S1")
    with pytest.raises(NotFound, match="consumer 'nobody' is not stored"):
        profile(world_store, "nobody")


def test_rebates_owed_and_withheld(world_store):
    report = rebates(world_store, policy=POLICY, lines=True)
    # owed: r5 6+3, t4 6+3+1 (SP1 is D1's only salesperson), u2 6+3; D2 employs nobody: r5, u2 unassigned
    assert (report.scans, report.no_store, report.owed, report.unassigned, report.withheld) == (12, 7, 28.0, 2.0, 13.5)
    withheld = {(line.event_id, line.role): (line.party_id, line.amount, line.finding) for line in report.withheld_lines}
    assert withheld == {("b4", "store"): ("S3", 2.0, "b2"), ("b4", "distributor"): ("D2", 1.0, "b2"),
                        ("b4", "salesperson"): (None, 0.5, "b2"), ("a5", "store"): ("S3", 6.0, "a3"),
                        ("a5", "distributor"): ("D2", 3.0, "a3"), ("a5", "salesperson"): (None, 1.0, "a3")}
    totals = {(t.month, t.role, t.party_id): (t.owed, t.withheld) for t in report.totals}
    assert totals[("2024-03", "store", "S3")] == (12.0, 6.0)
    assert totals[("2024-03", "salesperson", "SP1")] == (1.0, 0.0)
    assert totals[("2024-02", "store", "S3")] == (0.0, 2.0)
    assert totals[("2024-03", "salesperson", None)] == (0.0, 1.0)  # a5 withheld; r5, u2 unassigned (not owed)
    assert len(report.lines) == 15
    march = rebates(world_store, policy=POLICY, month="2024-03")
    assert (march.scans, march.withheld, march.lines) == (11, 10.0, None)


def test_policy_files_are_checked(tmp_path: Path):
    assert load_policy(Path(__file__).parents[1] / "docs" / "policy.example.toml").amount("BJ500", "store") == 6.0
    bad = {"nonsense = [": "not valid TOML", "[default]\nstore = -1": "expected an amount >= 0",
           "[default]\nstore = nan": "expected an amount >= 0", "[sku.X]\nstore = inf": "expected an amount >= 0",
           "[default]\nmanager = 1": "role 'manager'", "rate = 1": "unknown key"}
    for i, (text, message) in enumerate(bad.items()):
        path = tmp_path / f"p{i}.toml"
        path.write_text(text)
        with pytest.raises(ChannelgraphError, match=message):
            load_policy(path)
    with pytest.raises(ChannelgraphError, match="No such file"):
        load_policy(tmp_path / "missing.toml")


def test_a_unit_passed_between_stores_of_a_region_comes_in_once(make_store, tmp_path: Path):
    """Two units shipped D1 -> S1, one passed on to S1b (both Xihu stores): two units came into
    Xihu (DOMAIN.md: scan rate = scanned units / units sold into stores of the region); S1
    took both in and passed one on, which is not its stock."""
    tables = channel_world()
    tables["parties"].append({"party_id": "S1b", "kind": "store", "region_id": "HZ-XH", "upstream_id": "D1"})
    add_case(tables, "CX", ["X1", "X2"], shipped="x0")
    tables["scans"] += [{"event_id": "x1", "code": "CX", "action": "ship", "party_id": "D1", "counterparty_id": "S1",
                         "ts": "2024-02-02T00:00:00Z"},
                        {"event_id": "x2", "code": "X2", "action": "ship", "party_id": "S1", "counterparty_id": "S1b",
                         "ts": "2024-02-03T00:00:00Z"}]
    units_in = {}
    for name, world in (("before", channel_world()), ("after", tables)):
        store = make_store()
        load_dataset(store, write_world(world, tmp_path / name), rejects_dir=tmp_path / name / "rejects")
        units_in[name] = {r.region_id: r.units_in for r in region_sell_through(store, level="district", period="all").rows}
    assert units_in["after"]["HZ-XH"] == units_in["before"]["HZ-XH"] + 2
    health = {h.store_id: h for h in store_health(store, min_peers=1)}
    assert (health["S1b"].sell_in, health["S1b"].stock) == (1, 1.0)
    # Zhejiang's stores: T1 (scanned), X1 and X2 came in, X2 twice: scan rate 1/3, not 1/4; S1 passed X2 on
    assert (health["S1"].sell_in, health["S1"].sell_out, health["S1"].scan_rate, health["S1b"].scan_rate) == (3, 1, 0.3333, 0.3333)


def test_region_sell_through_and_matrix(world_store):
    report = region_sell_through(world_store, level="province", period="month")
    rows = {(r.region_id, r.period): r for r in report.rows}
    js_feb, js_mar, zj_mar = rows[("JS", "2024-02")], rows[("JS", "2024-03")], rows[("ZJ", "2024-03")]
    assert (js_feb.units_in, js_feb.opened, js_feb.scanned, js_feb.diversions_in) == (10, 3, 1, 9)
    assert (js_mar.scanned, js_mar.active_stores, js_mar.active_ratio, js_mar.diversions_in) == (10, 1, 1.0, 6)
    assert (zj_mar.scanned, zj_mar.diversions_out, rows[("ZJ", "2024-02")].active_ratio) == (1, 6, 0.0)
    assert [(c.from_region, c.to_region, c.units) for c in report.matrix] == [("ZJ", "JS", 15)]
    cities = region_sell_through(world_store, level="city", period="all")
    assert [(c.from_region, c.to_region, c.units) for c in cities.matrix] == [("HZ", "NJ", 13), ("HZ", "SZ", 1), ("NB", "NJ", 1)]
    assert sum(r.diversions_in for r in cities.rows) == sum(r.diversions_out for r in cities.rows) == 15
    with pytest.raises(ValueError):
        region_sell_through(world_store, period="fortnight")


def test_a_stores_own_salesperson_is_credited(store, tmp_path: Path):
    world = channel_world()
    next(p for p in world["parties"] if p["party_id"] == "S3")["salesperson_id"] = "SP7"  # an unknown column, kept
    load_dataset(store, write_world(world, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    report = rebates(store, policy=POLICY)
    totals = {(t.month, t.role, t.party_id): (t.owed, t.withheld) for t in report.totals}
    assert totals[("2024-03", "salesperson", "SP7")] == (2.0, 1.0)  # r5 and u2 owed, a5 withheld
    assert report.unassigned == 0.0


def test_profile_lists_purchases_in_time_order(store, tmp_path: Path):
    scans = [{"event_id": "late", "code": "A-1", "action": "scan", "party_id": "wx-o", "ts": "2024-03-02T00:00:00Z"},
             {"event_id": "early", "code": "B-1", "action": "scan", "party_id": "wx-o", "ts": "2024-03-01T00:00:00Z"}]
    codes = [{"code": code, "level": "unit"} for code in ("A-1", "B-1")]
    load_dataset(store, write_world({"codes": codes, "scans": scans}, tmp_path / "w"), rejects_dir=tmp_path / "r")
    assert [p["code"] for p in profile(store, "wx-o").purchases] == ["B-1", "A-1"]  # not in code order
