"""Purchases (docs/design.md "Consumer stage"): each unit's first live consumer scan, on
the hand-checked purchases world (tests/worlds.py) and a generated scenario, on every
store; and what consumers and influence make of them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from loaders.generate import generate_dataset
from loaders.ingest import load_dataset
from queries.consumers import lifecycle, profile
from queries.influence import cascade, influencers
from queries.sales import sales_facts
from tests.worlds import purchases_world, write_world

CHANNEL = [  # (code, party_id, ts, sku, unit_price) of the channel world's purchases: one per unit scanned
    ("A1", "wx-a1", "2024-03-01T00:00:00Z", "BJ500", 300.0), ("B2", "wx-b2", "2024-02-07T00:00:00Z", "BJ250", 120.5),
    ("H1", "wx-h1", "2024-03-01T00:00:00Z", "BJ500", 300.0), ("J1", "wx-j1", "2024-03-01T00:00:00Z", "BJ500", 300.0),
    ("J2", "wx-j2", "2024-03-01T01:00:00Z", "BJ500", 300.0), ("K1", "wx-k1", "2024-03-01T00:00:00Z", "BJ500", 300.0),
    ("K2", "wx-k2", "2024-03-02T00:00:00Z", "BJ500", 300.0), ("K3", "wx-k3", "2024-03-02T16:00:00Z", "BJ500", 300.0),
    ("K4", "wx-k4", "2024-03-04T00:00:00Z", "BJ500", 300.0), ("R1", "wx-r1", "2024-03-01T00:00:00Z", "BJ500", 300.0),
    ("T1", "C1", "2024-03-01T00:00:00Z", "BJ500", 300.0), ("U1", "wx-u1", "2024-03-01T00:00:00Z", "BJ500", 300.0),
]
APRIL = [
    ("P1", "wx-p", "2024-04-02T00:00:00Z", "BJ250", 120.5), ("P2", "wx-p", "2024-04-02T00:00:00Z", "BJ250", 120.5),
    ("P3", "wx-p", "2024-04-02T00:00:00Z", "BJ250", 120.5), ("Q1", "wx-s", "2024-04-05T00:00:00Z", "BJ500", 300.0),
]


def rows(table) -> list[tuple]:  # noqa: ANN001 - a purchases table
    frame = table.to_pandas()
    return [(r.code, r.party_id, r.ts.strftime("%Y-%m-%dT%H:%M:%SZ"), r.sku, r.unit_price) for r in frame.itertuples()]


@pytest.fixture
def world(store, tmp_path: Path):
    load_dataset(store, write_world(purchases_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    return store


def test_a_purchase_is_each_units_first_live_scan(world):
    """A case scanned buys each unit in it at the unit's price; a repeat scan (by the same
    or another consumer) buys nothing; a retracted scan buys nothing, the next one does."""
    assert rows(world.purchases()) == sorted(CHANNEL + APRIL)
    assert rows(world.purchases(["wx-p", "wx-q", "wx-r", "nobody"])) == APRIL[:3]
    assert rows(world.purchases(["wx-s", "C1"])) == [APRIL[3], CHANNEL[10]]
    assert world.purchases([]).num_rows == 0


def test_purchases_are_the_sell_out_scans(world):
    assert_purchases_are_sell_out(world)


def test_consumer_stages_count_units_bought(world):
    table = {c.party_id: c for c in lifecycle(world)}
    p = table["wx-p"]  # three units on one day (one case scan), one converted referee (wx-s)
    assert (p.purchases, p.purchase_days, p.skus, p.monetary, p.converted_referrals, p.stage) == (3, 1, 1, 361.5, 1, "referral")
    assert {who: table[who].stage for who in ("wx-q", "wx-r", "wx-s")} == {
        "wx-q": "acquired", "wx-r": "acquired", "wx-s": "activated"}  # a repeat and a retracted scan buy nothing
    c1 = table["C1"]  # t4 and its repeat: one purchase
    assert (c1.purchases, c1.purchase_days, c1.monetary) == (1, 1, 300.0)
    mine = profile(world, "wx-p")
    assert [(b["code"], b["unit_price"], b["store"]) for b in mine.purchases] == [
        ("P1", 120.5, "S1"), ("P2", 120.5, "S1"), ("P3", 120.5, "S1")]
    assert mine.stores == [{"store": "S1", "purchases": 3}]
    assert [(r["referee_id"], r["converted"]) for r in mine.referrals] == [("wx-q", False), ("wx-r", False), ("wx-s", True)]


def test_influencers_convert_on_units_bought(world):
    ranked = {i.party_id: i for i in influencers(world, top=None)}
    p = ranked["wx-p"]
    assert (p.direct, p.converted, p.cascade_size, p.referred_revenue) == (3, 1, 3, 300.0)
    assert ranked["S1"].referred_revenue == 1500.0  # C1's T1 once (300), wx-a1, wx-k1, wx-k2, wx-k3
    assert [(n.party_id, n.purchases, n.revenue) for n in cascade(world, "wx-p")] == [
        ("wx-p", 3, 361.5), ("wx-q", 0, 0.0), ("wx-r", 0, 0.0), ("wx-s", 1, 300.0)]


def assert_purchases_are_sell_out(store) -> None:  # noqa: ANN001 - any Store
    """Every purchase is its unit's sell-out scan: same unit, consumer, time, sku and price."""
    sold = sales_facts(store).sell_out
    want = pd.DataFrame({"code": sold["code"].astype(str), "party_id": sold["consumer"].astype(str),
                         "ts": sold["ts"], "sku": sold["sku"].astype(object), "unit_price": sold["unit_price"]})
    got = store.purchases().to_pandas()
    got["sku"] = got["sku"].astype(object)
    assert len(got) == len(want) > 0
    assert got.reset_index(drop=True).equals(want.sort_values("code", ignore_index=True)[list(got.columns)])


@pytest.fixture(scope="module")
def scenario_folder(tmp_path_factory) -> Path:
    """A generated scenario with scans repeated and at the wrong level: an hour after each
    of 300 consumer scans, another consumer scans the same unit and the first consumer the
    code it is packed in (buying the units inside that no one scanned before)."""
    folder = tmp_path_factory.mktemp("purchases-scenario")
    generate_dataset(folder, scale=0.2, seed=5, fmt="csv", noise=False)
    scans = pd.read_csv(folder / "scans.csv", dtype=str)
    codes = pd.read_csv(folder / "codes.csv", dtype=str).set_index("code")
    consumer = scans[(scans["action"] == "scan")].drop_duplicates("code").head(300)
    later = (pd.to_datetime(consumer["ts"], utc=True, format="ISO8601") + pd.Timedelta(hours=1)).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    again = consumer.assign(event_id="RE" + consumer["event_id"].fillna(consumer["code"]), ts=later,
                            party_id=consumer["party_id"].shift(1).fillna(consumer["party_id"].iloc[-1]))
    on_case = consumer.assign(event_id="RC" + consumer["event_id"].fillna(consumer["code"]),
                              code=consumer["code"].map(codes["parent_code"]), ts=later)
    pd.concat([scans, again, on_case.dropna(subset=["code"])]).to_csv(folder / "scans.csv", index=False)
    return folder


def test_purchases_of_a_generated_scenario_are_the_sell_out_scans(store, scenario_folder: Path, tmp_path: Path):
    load_dataset(store, scenario_folder, rejects_dir=tmp_path / "rejects")
    assert_purchases_are_sell_out(store)
    every = store.purchases()  # and those of some parties are theirs among every party's
    some = pa.array(sorted(set(every.column("party_id").to_pylist()))[::7] + ["nobody"])
    assert store.purchases(some.to_pylist()).equals(every.filter(pc.is_in(every.column("party_id"), value_set=some)))
