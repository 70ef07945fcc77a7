"""Trace, diversion and influence on the hand-checked channel world, on every store."""
from __future__ import annotations

from pathlib import Path

import pytest

from graph.errors import NotFound
from loaders.ingest import load_dataset
from queries.diversion import DiversionFinding, diversion_view, find_diversions, judge_store
from queries.influence import attribute, cascade, influencers, referral_stats
from queries.trace import flow, trace
from tests.worlds import CHANNEL_DIVERSIONS, NOT_DIVERTED, UNTRACKED, add_case, channel_world, write_world


@pytest.fixture
def world_store(store, tmp_path: Path):
    load_dataset(store, write_world(channel_world(), tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    return store


def test_diversion_findings_match_hand_checked_answers(world_store):
    findings = find_diversions(world_store)
    got = [(f.code, f.severity, f.responsible, f.exit_via, f.crossing_event_id) for f in findings]
    assert got == sorted(CHANNEL_DIVERSIONS)
    assert not {f.code for f in findings} & set(NOT_DIVERTED)


def test_finding_explains_the_crossing(world_store):
    finding = next(f for f in find_diversions(world_store) if f.code == "SS1")
    assert finding.territory == ["ZJ"]
    assert finding.crossing_region == "NJ"
    crossed = [hop for hop in finding.path if hop.crossed]
    assert [(h.event_id, h.party_id, h.counterparty_id) for h in crossed] == [("s4", "SD1", "S3")]
    assert [h.event_id for h in finding.path] == ["s1", "s2", "s3", "s4"]


def test_k_rule_is_configurable(world_store):
    by_code = {f.code: f.severity for f in find_diversions(world_store, k=2)}
    assert by_code["J1"] == by_code["J2"] == "confirmed"  # two units of CJ in Nanjing
    assert by_code["K4"] == "suspected"
    by_code = {f.code: f.severity for f in find_diversions(world_store, k=4)}
    assert by_code["K1"] == "suspected"


def test_severity_and_since_filters(world_store):
    suspected = find_diversions(world_store, severity="suspected")
    assert sorted(f.code for f in suspected) == ["J1", "J2", "K4"]
    from datetime import datetime

    late = find_diversions(world_store, since=datetime(2024, 3, 1, 0, 30))
    assert sorted(f.code for f in late) == ["J2", "K2", "K3", "K4"]
    with pytest.raises(ValueError):
        find_diversions(world_store, severity="maybe")


def test_a_store_inside_that_ships_a_unit_on_has_handled_it(store, tmp_path: Path):
    """DOMAIN.md §3: a consumer scan outside after a store inside handled the unit is
    travel. The Xihu store ships a bottle to a consumer (its receive is missing): the
    store handled it inside, so the consumer's scan in Nanjing is travel; the same scan
    without the store's ship is a suspected diversion."""
    tables = channel_world()
    add_case(tables, "CX", ["X1", "X2"], shipped="x1")
    tables["scans"] += [
        {"event_id": "x2", "code": "X1", "action": "ship", "party_id": "S1", "counterparty_id": "C1", "ts": "2024-02-03T00:00:00Z"},
        {"event_id": "x3", "code": "X1", "action": "scan", "party_id": "wx-x1", "ts": "2024-02-04T00:00:00Z", "region_id": "NJ"},
        {"event_id": "x4", "code": "X2", "action": "scan", "party_id": "wx-x2", "ts": "2024-02-04T00:00:00Z", "region_id": "NJ"},
    ]
    load_dataset(store, write_world(tables, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    by_code = {f.code: f for f in find_diversions(store)}
    assert "X1" not in by_code
    assert (by_code["X2"].severity, by_code["X2"].crossing_event_id) == ("suspected", "x4")
    assert trace(store, "X1").diversion is None


def test_untracked_units_are_listed_with_their_last_whereabouts(store, tmp_path: Path):
    """DOMAIN.md §3: a unit with no assignment is reported, never judged. U1 (shipped by a
    distributor only), N1 (no event at all) and O1 (its factory shipment retracted by an
    EPCIS errorDeclaration) are untracked; the rest of the world is judged as before."""
    tables = channel_world()
    tables["codes"].append({"code": "N1", "level": "unit", "sku": "BJ250"})
    tables["retractions"] = [{"event_id": "o1", "declared_at": "2024-03-10T00:00:00Z", "reason": "incorrect_data"}]
    load_dataset(store, write_world(tables, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    verdicts = judge_store(store)
    assert [u.model_dump() for u in verdicts.untracked_units()] == [
        {"code": "N1", "sku": "BJ250", "batch": None, "events": 0, "last_holder": None, "last_region": None,
         "first_ts": None, "last_ts": None},
        {"code": "O1", "sku": "BJ500", "batch": "B1", "events": 1, "last_holder": "S3", "last_region": "NJ",
         "first_ts": "2024-02-08T00:00:00Z", "last_ts": "2024-02-08T00:00:00Z"},
        {"code": "U1", "sku": "BJ500", "batch": "B1", "events": 2, "last_holder": "wx-u1", "last_region": "NJ",
         "first_ts": "2024-02-02T00:00:00Z", "last_ts": "2024-03-01T00:00:00Z"}]
    diverted = [f for f in CHANNEL_DIVERSIONS if f[0] != "O1"]
    assert [f.code for f in verdicts.findings.models()] == sorted(code for code, *_ in diverted)
    units = sum(1 for code in tables["codes"] if code["level"] == "unit")
    assert store.unit_count() == units
    assert verdicts.summary(units).model_dump() == {
        "units": units, "judged": units - 3, "diverted": len(diverted), "confirmed": len(diverted) - 3,
        "suspected": 3, "untracked": 3}
    assert judge_store(store, severity="suspected").untracked.equals(verdicts.untracked)  # filters are for findings


def test_the_view_over_time_is_in_time_order():
    """Months in time order, whatever their unit counts (ranks follow that order)."""
    def finding(code: str, ts: str) -> DiversionFinding:
        return DiversionFinding(code=code, sku="S", batch="B", responsible="D1", territory=["ZJ"], severity="confirmed",
                                crossing_event_id=code, crossing_ts=ts, crossing_party="D1", crossing_region="NJ",
                                exit_via="D1", case=None, path=[])

    findings = [finding("a", "2024-03-01T00:00:00Z"), finding("b", "2024-03-02T00:00:00Z"), finding("c", "2024-01-05T00:00:00Z")]
    assert [(r["rank"], r["month"], r["units"]) for r in diversion_view(findings, "month")] == [(1, "2024-01", 1), (2, "2024-03", 2)]


def test_views_rank_repeat_offenders(world_store):
    findings = find_diversions(world_store)
    by_responsible = diversion_view(findings, "responsible")
    assert [(r["responsible"], r["units"]) for r in by_responsible] == [("D1", 15)]
    pairs = {(r["from_territory"], r["to_region"]): r["units"] for r in diversion_view(findings, "region-pair")}
    assert pairs == {("ZJ", "NJ"): 14, ("ZJ", "SZ"): 1}
    cases = {r["case"]: r["units"] for r in diversion_view(findings, "case")}
    assert cases["CA"] == 3 and cases["CK"] == 4 and cases["CB"] == 2
    assert {r["sku"]: r["units"] for r in diversion_view(findings, "sku")} == {"BJ500": 13, "BJ250": 2}


def test_views_span_crossings_in_time_order(store, tmp_path: Path):
    """DOMAIN.md §3 views over time: first_ts is the earliest crossing of a group. V2's
    scan (00:00:00Z) comes before V1's (00:00:00.25Z), whatever their text says."""
    tables = channel_world()
    add_case(tables, "CV", ["V1", "V2"], shipped="v0")
    tables["scans"] += [
        {"event_id": "v1", "code": "V1", "action": "scan", "party_id": "wx-v1", "ts": "2024-03-05T00:00:00.25Z", "region_id": "NJ"},
        {"event_id": "v2", "code": "V2", "action": "scan", "party_id": "wx-v2", "ts": "2024-03-05T00:00:00Z", "region_id": "NJ"},
    ]
    load_dataset(store, write_world(tables, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    row = next(r for r in diversion_view(find_diversions(store), "case") if r["case"] == "CV")
    assert (row["units"], row["first_ts"], row["last_ts"]) == (2, "2024-03-05T00:00:00Z", "2024-03-05T00:00:00.250000Z")


def test_trace_unit_through_three_packaging_levels(world_store):
    result = trace(world_store, "B2")
    assert result.ancestors == ["BB", "CB", "PB"]
    assert (result.sku, result.batch) == ("BJ250", "B2")
    assert result.assigned_distributor == "D1"
    assert [h.event_id for h in result.path] == ["b1", "b2", "b3", "b4"]
    assert [h.crossed for h in result.path] == [False, True, False, False]
    assert result.diversion is not None and result.diversion.crossing_event_id == "b2"


def test_trace_orders_mixed_offsets_by_instant(world_store):
    result = trace(world_store, "M1")
    assert [h.event_id for h in result.path] == ["m1", "m2"]
    assert result.path[0].ts == "2024-02-01T01:00:00Z"


def test_trace_reassignment_and_untracked(world_store):
    assert trace(world_store, "R1").assigned_distributor == "D2"
    assert trace(world_store, "R1").diversion is None
    untracked = trace(world_store, UNTRACKED[0])
    assert untracked.untracked and untracked.assigned_distributor is None and untracked.diversion is None


def test_trace_case_summarises_children(world_store):
    result = trace(world_store, "CK")
    assert result.level == "case"
    assert result.children.units == 4
    assert (result.children.confirmed, result.children.suspected) == (3, 1)
    assert trace(world_store, "PB").children.by_level == {"case": 1, "box": 1, "unit": 2}


def test_trace_of_a_box_counts_its_units_as_the_diversions_do(store, tmp_path: Path):
    """DOMAIN.md §3: a suspected scan is confirmed when k units of the same case are scanned
    outside in one region. Case CQ: box QX (Q1, Q2) and box QY (Q3), all three scanned in
    Nanjing: confirmed, so QX holds 2 confirmed units. Case CW: box WX (W1, W2) scanned whole
    in Nanjing: two units, below k = 3 (the box is no unit), so both stay suspected."""
    tables = channel_world()
    tables["codes"] += [{"code": "CQ", "level": "case"}, {"code": "QX", "level": "box", "parent_code": "CQ"},
                        {"code": "QY", "level": "box", "parent_code": "CQ"}, {"code": "CW", "level": "case"},
                        {"code": "WX", "level": "box", "parent_code": "CW"}]
    tables["codes"] += [{"code": unit, "level": "unit", "parent_code": box}
                        for unit, box in (("Q1", "QX"), ("Q2", "QX"), ("Q3", "QY"), ("W1", "WX"), ("W2", "WX"))]
    tables["scans"] += [
        {"event_id": "q0", "code": "CQ", "action": "ship", "party_id": "F1", "counterparty_id": "D1", "ts": "2024-02-01T00:00:00Z"},
        *({"event_id": f"q{i}", "code": f"Q{i}", "action": "scan", "party_id": f"wx-q{i}", "ts": "2024-03-01T00:00:00Z",
           "region_id": "NJ"} for i in (1, 2, 3)),
        {"event_id": "w0", "code": "CW", "action": "ship", "party_id": "F1", "counterparty_id": "D1", "ts": "2024-02-01T00:00:00Z"},
        {"event_id": "w1", "code": "WX", "action": "scan", "party_id": "wx-w", "ts": "2024-03-01T00:00:00Z", "region_id": "NJ"},
    ]
    load_dataset(store, write_world(tables, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    severity = {f.code: f.severity for f in find_diversions(store)}
    assert [severity[c] for c in ("Q1", "Q2", "Q3", "W1", "W2")] == ["confirmed"] * 3 + ["suspected"] * 2
    held = trace(store, "QX").children
    assert (held.units, held.confirmed, held.suspected) == (2, 2, 0)
    held = trace(store, "WX").children
    assert (held.units, held.confirmed, held.suspected) == (2, 0, 2)
    assert trace(store, "W1").diversion.severity == "suspected"


def test_trace_of_a_case_counts_the_untracked_units_it_holds(store, tmp_path: Path):
    """The case ZZ sorts after its units: Z1 was shipped by the factory to D1 on its own,
    Z2 never was (and neither was the case), so ZZ holds one untracked unit of two."""
    tables = channel_world()
    add_case(tables, "ZZ", ["Z1", "Z2"])
    tables["scans"].append({"event_id": "z1", "code": "Z1", "action": "ship", "party_id": "F1", "counterparty_id": "D1",
                            "ts": "2024-02-01T00:00:00Z"})
    load_dataset(store, write_world(tables, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    result = trace(store, "ZZ")
    assert result.untracked and result.assigned_distributor is None
    assert (result.children.units, result.children.untracked_units) == (2, 1)


def test_trace_unknown_code(world_store):
    with pytest.raises(NotFound, match="NOPE"):
        trace(world_store, "NOPE")


def test_flow_of_a_batch(world_store):
    edges = {(e.source, e.target): e.units for e in flow(world_store, batch="B2")}
    assert edges == {("F1", "D1"): 2, ("D1", "S3"): 2, ("S3", "wx-b2"): 1}
    with pytest.raises(NotFound):
        flow(world_store, sku="NOSUCH")


def test_flow_follows_each_hand_over_whatever_was_recorded(store, tmp_path: Path):
    """A receive names its sender (the factory's ship is missing), and a store's open
    stamped before everything else moves nothing out of a party that never held the case."""
    tables = channel_world()
    tables["codes"] += [{"code": "CF", "level": "case", "batch": "BF"},
                        {"code": "FU1", "level": "unit", "parent_code": "CF", "batch": "BF"},
                        {"code": "FU2", "level": "unit", "parent_code": "CF", "batch": "BF"}]
    tables["scans"] += [
        {"event_id": "f0", "code": "FU2", "action": "open", "party_id": "S3", "ts": "2024-01-01T00:00:00Z"},
        {"event_id": "f1", "code": "CF", "action": "receive", "party_id": "D1", "counterparty_id": "F1", "ts": "2024-02-01T00:00:00Z"},
        {"event_id": "f2", "code": "CF", "action": "ship", "party_id": "D1", "counterparty_id": "S3", "ts": "2024-02-02T00:00:00Z"},
        {"event_id": "f3", "code": "FU1", "action": "scan", "party_id": "wx-f1", "ts": "2024-02-05T00:00:00Z"},
    ]
    load_dataset(store, write_world(tables, tmp_path / "world"), rejects_dir=tmp_path / "rejects")
    edges = {(e.source, e.target): e.units for e in flow(store, batch="BF")}
    assert edges == {("F1", "D1"): 2, ("D1", "S3"): 2, ("S3", "wx-f1"): 1}


def test_first_touch_attribution_counts_ignored_referrals(world_store):
    attribution = attribute(world_store.referrals().to_pandas())
    assert dict(attribution.ignored) == {"self": 1, "duplicate": 1, "late": 3, "cycle": 1}
    assert referral_stats(world_store).model_dump() == {
        "referrals": 13, "attributed": 7, "ignored": {"self": 1, "duplicate": 1, "late": 3, "cycle": 1}}
    assert attribution.forest.has_edge("wx-j2", "wx-j1") and not attribution.forest.has_edge("wx-j1", "wx-j2")


def test_influencer_metrics(world_store):
    ranked = {i.party_id: i for i in influencers(world_store, top=None, by="cascade_size")}
    s1 = ranked["S1"]
    assert (s1.direct, s1.converted, s1.cascade_size, s1.cascade_depth) == (1, 1, 5, 4)
    assert s1.referred_revenue == 1500.0  # C1's T1 (its repeat scan buys nothing), wx-a1's A1, K1, K2, K3
    assert (ranked["C1"].cascade_size, ranked["C1"].referred_revenue) == (4, 1200.0)
    assert (ranked["wx-a1"].direct, ranked["wx-a1"].converted, ranked["wx-a1"].cascade_size) == (2, 2, 3)
    assert ranked["SP1"].kind == "salesperson"
    assert [i.party_id for i in influencers(world_store, top=2, by="cascade_size")] == ["S1", "C1"]
    # depth: S1 -> C1 -> wx-a1 -> its referees: 4, 3, 2 (DOMAIN.md: a chosen metric, cascade depth among them)
    assert [(i.party_id, i.cascade_depth) for i in influencers(world_store, top=3, by="cascade_depth")] == [
        ("S1", 4), ("C1", 3), ("wx-a1", 2)]
    by_influence = influencers(world_store, top=None)
    assert by_influence[0].influence >= by_influence[-1].influence
    assert len(influencers(world_store, percent=50, by="revenue")) == 3  # 6 referrers


def test_documents_list_fields_in_model_order(world_store):
    """JSON and CSV columns follow the models' field order (the CLI contract's order)."""
    influencer = influencers(world_store, top=1)[0]
    assert list(influencer.model_dump()) == list(type(influencer).model_fields)
    finding = find_diversions(world_store)[0]
    assert list(finding.model_dump()) == list(type(finding).model_fields)
    assert list(finding.model_dump()["path"][0]) == list(type(finding.path[0]).model_fields)


def test_cascade_export(world_store):
    nodes = cascade(world_store, "C1")
    assert [(n.party_id, n.depth, n.referrer_id) for n in nodes] == [
        ("C1", 0, None), ("wx-a1", 1, "C1"), ("wx-k1", 2, "wx-a1"), ("wx-k2", 2, "wx-a1"), ("wx-k3", 3, "wx-k1")]
    assert [n.party_id for n in cascade(world_store, "wx-k3")] == ["wx-k3"]
    with pytest.raises(NotFound):
        cascade(world_store, "nobody")
