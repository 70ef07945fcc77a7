"""Adversarial datasets for the oracle comparison, written from DOMAIN.md's wording.

`edge_world()` holds one case per situation DOMAIN.md §2-§3 names (events at the wrong
level, a receive without a ship, a reassignment mid-chain, a store of another distributor
inside the territory, a sub-distributor, a ship to a consumer, a distributor without a
territory, an event's region against its party's, equal times, mixed offsets, unknown
consumer ids, k-1 and k scans, a pallet shipped out, ...). Each case's units are
independent of every other case's, so the oracle and the product can be compared unit by
unit. `referral_world()` does the same for §4.
"""
from __future__ import annotations

from tests.worlds import Rows

REGIONS: Rows = [
    {"region_id": "CN", "name": "China", "parent_id": None},
    {"region_id": "ZJ", "name": "Zhejiang", "parent_id": "CN"},
    {"region_id": "HZ", "name": "Hangzhou", "parent_id": "ZJ"},
    {"region_id": "HZ-XH", "name": "Xihu", "parent_id": "HZ"},
    {"region_id": "HZ-BJ", "name": "Binjiang", "parent_id": "HZ"},
    {"region_id": "NB", "name": "Ningbo", "parent_id": "ZJ"},
    {"region_id": "JS", "name": "Jiangsu", "parent_id": "CN"},
    {"region_id": "NJ", "name": "Nanjing", "parent_id": "JS"},
    {"region_id": "NJ-GL", "name": "Gulou", "parent_id": "NJ"},
    {"region_id": "SZ", "name": "Suzhou", "parent_id": "JS"},
]

PARTIES: Rows = [
    {"party_id": "F1", "kind": "factory", "region_id": "HZ"},
    {"party_id": "F2", "kind": "factory"},  # a factory without a region
    {"party_id": "D1", "kind": "distributor", "region_id": "HZ-XH", "territory": "ZJ"},  # province-level territory
    {"party_id": "D2", "kind": "distributor", "region_id": "NJ", "territory": "JS"},
    {"party_id": "D3", "kind": "distributor", "region_id": "HZ"},  # no territory: Hangzhou and below
    {"party_id": "D4", "kind": "distributor", "region_id": "NB", "territory": " NB | HZ-BJ "},  # two roots, blanks
    {"party_id": "SD1", "kind": "distributor", "region_id": "NB", "territory": "NB", "upstream_id": "D1"},
    {"party_id": "S1", "kind": "store", "region_id": "HZ-XH", "upstream_id": "D1"},
    {"party_id": "S2", "kind": "store", "region_id": "NB", "upstream_id": "SD1"},
    {"party_id": "S3", "kind": "store", "region_id": "NJ-GL", "upstream_id": "D2"},
    {"party_id": "S4", "kind": "store", "region_id": "HZ-BJ", "upstream_id": "D2"},  # D2's store inside ZJ
    {"party_id": "S5", "kind": "store", "region_id": "SZ", "upstream_id": "D2"},
    {"party_id": "SP1", "kind": "salesperson", "region_id": "HZ", "upstream_id": "D1"},
    {"party_id": "C-HZ", "kind": "consumer", "region_id": "HZ"},
    {"party_id": "C-NJ", "kind": "consumer", "region_id": "NJ"},
    {"party_id": "C-X", "kind": "consumer"},  # a known consumer without a region
]

PRODUCTS: Rows = [
    {"sku": "BJ", "name": "Baijiu 500ml", "unit_price": "300"},
    {"sku": "WN", "name": "Wine 750ml", "unit_price": "88.8"},
    {"sku": "NP", "name": "No price"},
]


def _case(case: str, n: int, *, parent: str | None = None, sku: str | None = "BJ", batch: str | None = "B1") -> Rows:
    """A case `case` holding units `case-1` .. `case-n`."""
    rows = [{"code": case, "level": "case", "parent_code": parent, "sku": sku, "batch": batch}]
    return rows + [{"code": f"{case}-{i}", "level": "unit", "parent_code": case} for i in range(1, n + 1)]


def _ev(event_id: str | None, code: str, action: str, party: str, ts: str, counterparty: str | None = None,
        region: str | None = None) -> dict:
    return {"event_id": event_id, "code": code, "action": action, "party_id": party,
            "counterparty_id": counterparty, "ts": ts, "region_id": region}


def T(day: int, hour: int = 0) -> str:  # noqa: N802 - a short time literal
    return f"2024-03-{day:02d}T{hour:02d}:00:00Z"


CODES: Rows = [
    *_case("WL", 3),  # a consumer scan recorded on a case (wrong level)
    *_case("WO", 2),  # a store's open recorded on a unit, another unit untouched
    *_case("RN", 1),  # an outside store's receive with no ship
    *_case("MF", 2),  # no factory ship: the distributor's receive from the factory assigns
    *_case("RA", 1),  # returned and re-shipped to D2, sold in Jiangsu
    *_case("RB", 1),  # re-shipped to D2 without a return, then sold in Zhejiang
    *_case("RC", 1),  # diverted under D1, then returned and re-shipped to D2
    *_case("OS", 1),  # a store of D2 inside D1's territory
    *_case("SB", 2),  # a sub-distributor ships out of the territory
    *_case("SI", 1),  # a sub-distributor receives inside; a consumer scans inside
    *_case("SC", 1),  # shipped to a consumer; the consumer scans outside
    *_case("SD", 1),  # shipped to another distributor outside
    *_case("SE", 1),  # another distributor receives outside, no ship recorded
    *_case("NT", 1),  # D3 (no territory) ships to Ningbo
    *_case("NU", 1),  # D3 (no territory) ships inside Hangzhou
    *_case("TB", 1),  # D4: territory with two roots and blanks
    *_case("ER", 1),  # an inside store opens at an event region outside
    *_case("EI", 1),  # a consumer registered outside scans at an event region inside
    *_case("EO", 1),  # a consumer registered inside scans at an event region outside
    *_case("EQ", 1),  # equal times: the factory ship and an outside store's open
    *_case("EU", 1),  # equal times: an inside store's receive and an outside scan
    *_case("MO", 1),  # mixed offsets: the inside store comes first in time, not in text
    *_case("MP", 1),  # mixed offsets: the outside scan comes first in time, not in text
    *_case("UC", 3),  # unknown consumer ids register consumers (region from the scan)
    *_case("UN", 1),  # an unknown consumer without a region: location unknown
    *_case("K3", 4),  # 3 of 4 units scanned in one outside region: confirmed
    *_case("K2", 3),  # k-1 units scanned in one outside region: suspected
    *_case("KD", 3),  # 3 units scanned outside, in two regions: suspected
    *_case("KC", 3),  # 3 units scanned in NJ, one already confirmed by a store there: the other two confirmed
    *_case("KL", 3),  # KL-1 scanned in Suzhou first, then in NJ with KL-2 and KL-3: all three confirmed
    {"code": "PX", "level": "pallet", "sku": "WN", "batch": "B9"},  # a pallet shipped out
    *_case("PXA", 2, parent="PX", sku=None, batch=None),
    {"code": "PXB", "level": "case", "parent_code": "PX"},
    {"code": "PXB-X", "level": "box", "parent_code": "PXB"},
    {"code": "PXB-1", "level": "unit", "parent_code": "PXB-X"},
    {"code": "PXB-2", "level": "unit", "parent_code": "PXB-X"},
    {"code": "PL", "level": "pallet", "sku": "BJ"},  # units packed straight into a pallet
    {"code": "PL-1", "level": "unit", "parent_code": "PL"},
    {"code": "PL-2", "level": "unit", "parent_code": "PL"},
    {"code": "PL-3", "level": "unit", "parent_code": "PL"},
    *_case("UT", 2),  # untracked: never shipped by a factory
    *_case("FS", 1),  # the factory ships to a store outside, no distributor involved
    *_case("TR", 1),  # travel: sold inside, scanned outside
    *_case("TS", 1),  # an inside store ships to a consumer (no receive), scanned outside
    *_case("DO", 1),  # the assigned distributor opens the case outside; a consumer scans there
    *_case("BA", 1),  # events before the assignment are not judged
    *_case("SU", 1),  # a suspected scan first, then an outside store's receive
    *_case("DU", 1),  # duplicated and late rows
    *_case("NI", 1),  # rows without event_id
    *_case("AT", 1),  # reassigned to D2 at the very time D1 ships it to Jiangsu
    *_case("NP", 1, sku="NP"),  # a sku without a price
    *_case("AR", 1),  # dated like a delivery note: D1's receive from the factory and its ship out, one time
    *_case("AE", 1),  # one time: the factory ship to D1 (its id sorts last) and D1's ship out
    *_case("PS", 1),  # an outside store's own (point-of-sale) scan
    *_case("PD", 1),  # another distributor's scan outside
    *_case("PI", 1),  # an inside store's own scan, then a consumer's scan outside: travel
]

SCANS: Rows = [
    # WL: the consumer's scan is recorded on the case
    _ev("wl1", "WL", "ship", "F1", T(1), "D1"), _ev("wl2", "WL", "scan", "C-NJ", T(5), region="NJ"),
    # WO: an outside store's open on one unit
    _ev("wo1", "WO", "ship", "F1", T(1), "D1"), _ev("wo2", "WO-1", "open", "S3", T(4)),
    # RN: an outside store receives from D1, no ship recorded
    _ev("rn1", "RN", "ship", "F1", T(1), "D1"), _ev("rn2", "RN", "receive", "S3", T(3), "D1"),
    # MF: no factory ship; D1's receive from F1 assigns, then D1 ships to Suzhou
    _ev("mf1", "MF", "receive", "D1", T(1), "F1"), _ev("mf2", "MF", "ship", "D1", T(2), "S5"),
    # RA: D1 returns to F1, F1 re-ships to D2, D2 sells in Jiangsu
    _ev("ra1", "RA", "ship", "F1", T(1), "D1"), _ev("ra2", "RA", "ship", "D1", T(2), "F1"),
    _ev("ra3", "RA", "ship", "F1", T(3), "D2"), _ev("ra4", "RA", "ship", "D2", T(4), "S3"),
    _ev("ra5", "RA-1", "scan", "C-NJ", T(6), region="NJ"),
    # RB: F1 re-ships to D2 (no return), D2 ships to a Zhejiang store
    _ev("rb1", "RB", "ship", "F1", T(1), "D1"), _ev("rb2", "RB", "ship", "F1", T(3), "D2"),
    _ev("rb3", "RB", "ship", "D2", T(4), "S1"),
    # RC: D1 diverts to Nanjing, the store returns it, F1 re-ships to D2
    _ev("rc1", "RC", "ship", "F1", T(1), "D1"), _ev("rc2", "RC", "ship", "D1", T(2), "S3"),
    _ev("rc3", "RC", "ship", "S3", T(3), "F1"), _ev("rc4", "RC", "ship", "F1", T(4), "D2"),
    # OS: D1 ships to D2's store in Binjiang (inside ZJ); the consumer scans in Nanjing
    _ev("os1", "OS", "ship", "F1", T(1), "D1"), _ev("os2", "OS", "ship", "D1", T(2), "S4"),
    _ev("os3", "OS-1", "scan", "C-NJ", T(6), region="NJ"),
    # SB: D1 -> SD1 (Ningbo, inside) -> Suzhou store
    _ev("sb1", "SB", "ship", "F1", T(1), "D1"), _ev("sb2", "SB", "ship", "D1", T(2), "SD1"),
    _ev("sb3", "SB", "receive", "SD1", T(3), "D1"), _ev("sb4", "SB", "ship", "SD1", T(4), "S5"),
    # SI: SD1 receives (no ship recorded), sells to its Ningbo store; consumer in Ningbo
    _ev("si1", "SI", "ship", "F1", T(1), "D1"), _ev("si2", "SI", "receive", "SD1", T(2), "D1"),
    _ev("si3", "SI", "ship", "SD1", T(3), "S2"), _ev("si4", "SI-1", "scan", "C-HZ", T(5), region="NB"),
    # SC: D1 ships to a Nanjing consumer, who scans
    _ev("sc1", "SC", "ship", "F1", T(1), "D1"), _ev("sc2", "SC", "ship", "D1", T(2), "C-NJ"),
    _ev("sc3", "SC-1", "scan", "C-NJ", T(3)),
    # SD: D1 ships to D2
    _ev("sd1", "SD", "ship", "F1", T(1), "D1"), _ev("sd2", "SD", "ship", "D1", T(2), "D2"),
    # SE: D2 receives from D1 in Nanjing, no ship recorded
    _ev("se1", "SE", "ship", "F1", T(1), "D1"), _ev("se2", "SE", "receive", "D2", T(3), "D1"),
    # NT / NU: D3 has no territory (its registered Hangzhou and below)
    _ev("nt1", "NT", "ship", "F1", T(1), "D3"), _ev("nt2", "NT", "ship", "D3", T(2), "S2"),
    _ev("nu1", "NU", "ship", "F1", T(1), "D3"), _ev("nu2", "NU", "ship", "D3", T(2), "S1"),
    _ev("nu3", "NU-1", "scan", "C-HZ", T(5), region="HZ-XH"),
    # TB: D4 (NB | HZ-BJ) ships to Binjiang (inside), then the store opens it in Xihu (outside)
    _ev("tb1", "TB", "ship", "F1", T(1), "D4"), _ev("tb2", "TB", "ship", "D4", T(2), "S4"),
    _ev("tb3", "TB", "open", "S1", T(3)),
    # ER: D1's own store opens the case at a Nanjing event region
    _ev("er1", "ER", "ship", "F1", T(1), "D1"), _ev("er2", "ER", "open", "S1", T(3), region="NJ"),
    # EI: a Nanjing consumer scans in Hangzhou (event region inside)
    _ev("ei1", "EI", "ship", "F1", T(1), "D1"), _ev("ei2", "EI-1", "scan", "C-NJ", T(3), region="HZ"),
    # EO: a Hangzhou consumer scans in Nanjing (event region outside)
    _ev("eo1", "EO", "ship", "F1", T(1), "D1"), _ev("eo2", "EO-1", "scan", "C-HZ", T(3), region="NJ"),
    # EQ: the factory ship and an outside store's open at the same time
    _ev("eq1", "EQ", "ship", "F1", T(1), "D1"), _ev("eq0", "EQ", "open", "S3", T(1)),
    # EU: an inside store's receive and an outside scan at the same time
    _ev("eu1", "EU", "ship", "F1", T(1), "D1"), _ev("eu9", "EU", "receive", "S1", T(3), "D1"),
    _ev("eu2", "EU-1", "scan", "C-NJ", T(3), region="NJ"),
    # MO: the store's receive is at 01:00Z (written +08:00), the scan at 02:00Z
    _ev("mo1", "MO", "ship", "F1", T(1), "D1"), _ev("mo2", "MO", "receive", "S1", "2024-03-03T09:00:00+08:00", "D1"),
    _ev("mo3", "MO-1", "scan", "C-NJ", "2024-03-03T02:00:00", region="NJ"),
    # MP: the scan is at 00:30Z (written +08:00), the store's receive at 01:00Z
    _ev("mp1", "MP", "ship", "F1", T(1), "D1"), _ev("mp2", "MP", "receive", "S1", "2024-03-03T01:00:00Z", "D1"),
    _ev("mp3", "MP-1", "scan", "C-NJ", "2024-03-03T08:30:00+08:00", region="NJ"),
    # UC: three unknown consumer ids scan in Suzhou (one without a region after its first scan)
    _ev("uc1", "UC", "ship", "F1", T(1), "D1"),
    _ev("uc2", "UC-1", "scan", "wx-new-1", T(5), region="SZ"), _ev("uc3", "UC-2", "scan", "wx-new-2", T(5), region="SZ"),
    _ev("uc4", "UC-3", "scan", "wx-new-1", T(6)),
    # UN: an unknown consumer without any region
    _ev("un1", "UN", "ship", "F1", T(1), "D1"), _ev("un2", "UN-1", "scan", "wx-nowhere", T(5)),
    # K3 / K2 / KD / KC: the k rule
    _ev("k31", "K3", "ship", "F1", T(1), "D1"),
    *[_ev(f"k3{i + 1}", f"K3-{i}", "scan", f"wx-k3{i}", T(5, i), region="NJ-GL") for i in (1, 2, 3)],
    _ev("k2a", "K2", "ship", "F1", T(1), "D1"),
    *[_ev(f"k2{i + 1}", f"K2-{i}", "scan", f"wx-k2{i}", T(5, i), region="NJ") for i in (1, 2)],
    _ev("kda", "KD", "ship", "F1", T(1), "D1"),
    _ev("kd2", "KD-1", "scan", "C-NJ", T(5), region="NJ"), _ev("kd3", "KD-2", "scan", "C-NJ", T(6), region="NJ"),
    _ev("kd4", "KD-3", "scan", "C-NJ", T(7), region="NJ-GL"),
    _ev("kca", "KC", "ship", "F1", T(1), "D1"), _ev("kcb", "KC-3", "open", "S3", T(2)),
    *[_ev(f"kc{i}", f"KC-{i}", "scan", "C-NJ", T(5, i), region="NJ") for i in (1, 2, 3)],
    _ev("kla", "KL", "ship", "F1", T(1), "D1"), _ev("kl0", "KL-1", "scan", "C-NJ", T(4), region="SZ"),
    *[_ev(f"kl{i}", f"KL-{i}", "scan", "C-NJ", T(5, i), region="NJ") for i in (1, 2, 3)],
    # PX: the whole pallet goes to a Suzhou store
    _ev("px1", "PX", "ship", "F1", T(1), "D1"), _ev("px2", "PX", "ship", "D1", T(2), "S5"),
    _ev("px3", "PXB-X", "open", "S5", T(3)),
    # PL: units straight in a pallet, scanned in Nanjing by three consumers
    _ev("pl0", "PL", "ship", "F1", T(1), "D1"),
    *[_ev(f"pl{i}", f"PL-{i}", "scan", f"wx-pl{i}", T(5, i), region="NJ") for i in (1, 2, 3)],
    # UT: no factory shipment ever; an outside store and a consumer
    _ev("ut1", "UT", "ship", "D1", T(2), "S3"), _ev("ut2", "UT-1", "scan", "C-NJ", T(3), region="NJ"),
    # FS: the factory itself ships to an outside store after assigning to D1
    _ev("fs1", "FS", "ship", "F1", T(1), "D1"), _ev("fs2", "FS", "ship", "F1", T(2), "S3"),
    # TR: travel
    _ev("tr1", "TR", "ship", "F1", T(1), "D1"), _ev("tr2", "TR", "ship", "D1", T(2), "S1"),
    _ev("tr3", "TR", "open", "S1", T(3)), _ev("tr4", "TR-1", "scan", "C-HZ", T(6), region="NJ"),
    # TS: the inside store S1 ships to a Nanjing consumer (its receive is missing)
    _ev("ts1", "TS", "ship", "F1", T(1), "D1"), _ev("ts2", "TS-1", "ship", "S1", T(3), "C-NJ"),
    _ev("ts3", "TS-1", "scan", "C-NJ", T(4), region="NJ"),
    # DO: D1 opens the case in Nanjing; a consumer scans there
    _ev("do1", "DO", "ship", "F1", T(1), "D1"), _ev("do2", "DO", "open", "D1", T(2), region="NJ"),
    _ev("do3", "DO-1", "scan", "C-NJ", T(3), region="NJ"),
    # BA: an outside store opened it before the factory shipped it; then sold inside
    _ev("ba0", "BA", "open", "S3", T(1)), _ev("ba1", "BA", "ship", "F1", T(2), "D1"),
    _ev("ba2", "BA", "ship", "D1", T(3), "S1"),
    # SU: a suspected scan, then an outside store's receive confirms
    _ev("su1", "SU", "ship", "F1", T(1), "D1"), _ev("su2", "SU-1", "scan", "C-NJ", T(3), region="SZ"),
    _ev("su3", "SU", "receive", "S3", T(4), "D1"),
    # DU: a late row, a duplicate (same event_id, same content), a repeat with another id
    _ev("du3", "DU", "ship", "D1", T(4), "S5"), _ev("du1", "DU", "ship", "F1", T(1), "D1"),
    _ev("du3", "DU", "ship", "D1", T(4), "S5"), _ev("du2", "DU", "ship", "D1", T(3), "S5"),
    # NI: no event ids
    _ev(None, "NI", "ship", "F1", T(1), "D1"), _ev(None, "NI", "ship", "D1", T(2), "S3"),
    # AT: at one instant F1 re-ships to D2 and D1 ships to a Jiangsu store
    _ev("at1", "AT", "ship", "F1", T(1), "D1"), _ev("at3", "AT", "ship", "D1", T(3), "S5"),
    _ev("at2", "AT", "ship", "F1", T(3), "D2"),
    # NP: no price
    _ev("np1", "NP", "ship", "F1", T(1), "D1"), _ev("np2", "NP-1", "scan", "C-HZ", T(3), region="HZ"),
    # AR, AE: an assignment governs the events at its own time (the goods are D1's before D1 ships them on)
    _ev("ar1", "AR", "receive", "D1", T(2), "F1"), _ev("ar2", "AR", "ship", "D1", T(2), "S3"),
    _ev("zz-ae1", "AE", "ship", "F1", T(2), "D1"), _ev("ae2", "AE", "ship", "D1", T(2), "S5"),
    # PS, PD, PI: scans by stores and distributors are theirs, not consumers'
    _ev("ps1", "PS", "ship", "F1", T(1), "D1"), _ev("ps2", "PS-1", "scan", "S3", T(3)),
    _ev("pd1", "PD", "ship", "F1", T(1), "D1"), _ev("pd2", "PD-1", "scan", "D2", T(3)),
    _ev("pi1", "PI", "ship", "F1", T(1), "D1"), _ev("pi2", "PI-1", "scan", "S1", T(3)),
    _ev("pi3", "PI-1", "scan", "C-NJ", T(4), region="NJ"),
]

# rows the contract rejects, one reason each
BAD_SCANS: Rows = [
    _ev("bad1", "NOPE", "ship", "F1", T(1), "D1"),  # unknown code
    _ev("bad2", "TR", "ship", "X9", T(1), "D1"),  # unknown party (not a scan)
    _ev("bad3", "TR", "ship", "D1", T(1), "X9"),  # unknown counterparty
    _ev("bad4", "TR", "receive", "wx-stranger", T(1), "D1"),  # an unknown id may only scan
    _ev("bad5", "TR", "sell", "D1", T(1), "S1"),  # bad action
    _ev("bad6", "TR", "open", "S1", "2024-02-30T00:00:00Z"),  # bad time
    _ev("bad7", "TR", "open", "S1", T(1), region="MARS"),  # unknown region
    {"event_id": "bad8", "code": "TR", "action": "open", "ts": T(1)},  # no party
]


def edge_world() -> dict[str, Rows]:
    return {"regions": REGIONS, "parties": PARTIES, "products": PRODUCTS, "codes": CODES,
            "scans": SCANS + BAD_SCANS}


REFERRALS: Rows = [
    {"referrer_id": "A", "referee_id": "B", "ts": T(1)},
    {"referrer_id": "B", "referee_id": "A", "ts": T(2)},  # would close a cycle
    {"referrer_id": "A", "referee_id": "A", "ts": T(2)},  # self
    {"referrer_id": "A", "referee_id": "B", "ts": T(3)},  # duplicate pair
    {"referrer_id": "B", "referee_id": "C", "ts": T(2), "channel": "share"},
    {"referrer_id": "C", "referee_id": "A", "ts": T(4)},  # a longer cycle
    {"referrer_id": "S1", "referee_id": "D", "ts": T(2), "channel": "store"},  # a store refers
    {"referrer_id": "SP1", "referee_id": "D", "ts": T(3), "channel": "salesperson"},  # late: D is S1's
    # first touch decided by the instant: E's 02:00Z (written +08:00) beats F's 03:00Z
    {"referrer_id": "F", "referee_id": "E", "ts": "2024-03-05T03:00:00Z"},
    {"referrer_id": "G", "referee_id": "E", "ts": "2024-03-05T10:00:00+08:00"},
    # equal times: the smaller referrer id wins
    {"referrer_id": "H2", "referee_id": "I", "ts": T(6)},
    {"referrer_id": "H1", "referee_id": "I", "ts": T(6)},
    {"referrer_id": "SP1", "referee_id": "J", "ts": T(2), "channel": "salesperson"},
    {"referrer_id": "J", "referee_id": "K", "ts": T(3)},
    {"referrer_id": "K", "referee_id": "L", "ts": T(4)},
    {"referrer_id": "C-HZ", "referee_id": "M", "ts": T(4), "code": "TR-1"},
    {"referrer_id": "A", "referee_id": "N", "ts": "not a time"},  # rejected
    {"referrer_id": "A", "referee_id": "N", "ts": T(4), "channel": "tv"},  # rejected
    {"referrer_id": "A", "referee_id": "N", "ts": T(4), "code": "NOPE"},  # rejected: unknown code
]

REFERRAL_SCANS: Rows = [
    _ev("rf0", "RF", "ship", "F1", T(1), "D1"),
    _ev("rf1", "RF-1", "scan", "B", T(1)),  # before B's referral: not converted by it
    _ev("rf2", "RF-2", "scan", "C", T(2)),  # at the very time of C's referral
    _ev("rf3", "RF-3", "scan", "C", T(9)),
    _ev("rf4", "RFW", "scan", "D", T(5)),  # a case scanned: a purchase of each of its 2 units
    _ev("rf5", "RF-4", "scan", "L", T(8), region="NJ"),
    _ev("rf6", "RF-5", "scan", "K", T(1)),  # before K's referral
    _ev("rf7", "RF-6", "scan", "K", T(9)),
    _ev("rf8", "RF-6", "scan", "K", T(10)),  # the same unit scanned again: no purchase
    _ev("rf9", "RF-7", "scan", "E", T(9)),
    _ev("rfa", "NPX-1", "scan", "M", T(9)),  # no price
]


def referral_world() -> dict[str, Rows]:
    codes = [*_case("RF", 7, sku="WN"), *_case("RFW", 2), *_case("NPX", 1, sku="NP"), *_case("TR", 1)]
    return {"regions": REGIONS, "parties": PARTIES, "products": PRODUCTS, "codes": codes,
            "scans": REFERRAL_SCANS, "referrals": REFERRALS}


SALES_PARTIES: Rows = [
    *PARTIES,
    {"party_id": "SP2", "kind": "salesperson", "upstream_id": "D2"},  # D2 employs two: neither is credited
    {"party_id": "SP3", "kind": "salesperson", "upstream_id": "D2"},
    {"party_id": "S6", "kind": "store", "region_id": "SZ"},  # no contracted distributor
    {"party_id": "S7", "kind": "store", "region_id": "HZ", "upstream_id": "D1", "salesperson_id": "SP3"},  # city level
    {"party_id": "S8", "kind": "store", "region_id": "NB", "upstream_id": "SD1"},  # never sells
]

SALES_CODES: Rows = [
    *_case("HA", 3),  # sold by S1; a unit scanned twice; a unit scanned in April
    *_case("HB", 1),  # S1 passes it on to S4 (D2's store inside Zhejiang), which sells it
    *_case("HC", 1),  # S1 returns it to D1 before the consumer scans it
    *_case("HD", 1),  # S1 ships it straight to a consumer (home delivery), who scans it
    *_case("HE", 2),  # the consumer's scan is recorded on the case (wrong level)
    *_case("HF", 2),  # diverted to a Nanjing store, then scanned: withheld
    *_case("HG", 2),  # one unit scanned inside, then the case is diverted and the other scanned
    *_case("HH", 1),  # a suspected scan, no store
    *_case("HI", 1, sku="WN"),  # untracked, sold by a store
    *_case("HJ", 1),  # a store without a distributor
    *_case("HK", 1, sku="WN"),  # a store with its own salesperson
    *_case("HL", 2),  # mixed offsets across the month boundary
    *_case("HM", 1),  # opened by the distributor at an event region
    *_case("HN", 1, sku=None),  # no SKU: the default amounts
    *_case("HO", 1),  # a store itself performs the `scan`
    *_case("HR", 1),  # a store scans a unit of its own stock (a point-of-sale scan): a sell-out, no rebate
    *_case("HQ", 1),  # scanned by a consumer with no region
]


def S(day: int, hour: int = 0) -> str:  # noqa: N802 - a short time literal
    return f"2024-04-{day:02d}T{hour:02d}:00:00Z"


SALES_SCANS: Rows = [
    _ev("ha1", "HA", "ship", "F1", T(1), "D1"), _ev("ha2", "HA", "ship", "D1", T(2), "S1"),
    _ev("ha3", "HA-1", "scan", "C-HZ", T(3), region="HZ-XH"), _ev("ha4", "HA-1", "scan", "wx-h1", T(4), region="NJ"),
    _ev("ha5", "HA-2", "scan", "wx-h2", S(2), region="HZ-XH"),
    _ev("hb1", "HB", "ship", "F1", T(1), "D1"), _ev("hb2", "HB", "ship", "D1", T(2), "S1"),
    _ev("hb3", "HB", "ship", "S1", T(3), "S4"), _ev("hb4", "HB-1", "scan", "wx-h3", T(5), region="HZ-BJ"),
    _ev("hc1", "HC", "ship", "F1", T(1), "D1"), _ev("hc2", "HC", "receive", "S1", T(2), "D1"),
    _ev("hc3", "HC", "ship", "S1", T(3), "D1"), _ev("hc4", "HC-1", "scan", "wx-h4", T(5), region="HZ"),
    _ev("hd1", "HD", "ship", "F1", T(1), "D1"), _ev("hd2", "HD-1", "ship", "S1", T(3), "C-HZ"),
    _ev("hd3", "HD-1", "scan", "C-HZ", T(4)),
    _ev("he1", "HE", "ship", "F1", T(1), "D1"), _ev("he2", "HE", "ship", "D1", T(2), "S2"),
    _ev("he3", "HE", "scan", "wx-h5", T(5), region="NB"),
    _ev("hf1", "HF", "ship", "F1", T(1), "D1"), _ev("hf2", "HF", "ship", "D1", T(2), "S3"),
    _ev("hf3", "HF-1", "scan", "wx-h6", T(4), region="NJ-GL"), _ev("hf4", "HF-2", "scan", "wx-h7", S(1), region="NJ-GL"),
    _ev("hg1", "HG", "ship", "F1", T(1), "D1"), _ev("hg2", "HG", "ship", "D1", T(2), "S1"),
    _ev("hg3", "HG-1", "scan", "wx-h8", T(3), region="HZ-XH"), _ev("hg4", "HG", "ship", "S1", T(6), "S5"),
    _ev("hg5", "HG-2", "scan", "wx-h9", T(8), region="SZ"),
    _ev("hh1", "HH", "ship", "F1", T(1), "D1"), _ev("hh2", "HH-1", "scan", "C-NJ", T(5), region="NJ"),
    _ev("hi1", "HI", "ship", "D2", T(2), "S3"), _ev("hi2", "HI-1", "scan", "wx-h10", T(3), region="NJ-GL"),
    _ev("hj1", "HJ", "ship", "F1", T(1), "D2"), _ev("hj2", "HJ", "ship", "D2", T(2), "S6"),
    _ev("hj3", "HJ-1", "scan", "wx-h11", T(4), region="SZ"),
    _ev("hk1", "HK", "ship", "F1", T(1), "D1"), _ev("hk2", "HK", "ship", "D1", T(2), "S7"),
    _ev("hk3", "HK-1", "scan", "wx-h12", T(4), region="HZ"),
    _ev("hl1", "HL", "ship", "F1", T(1), "D1"), _ev("hl2", "HL", "ship", "D1", T(2), "S1"),
    _ev("hl3", "HL-1", "scan", "wx-h13", "2024-03-31T23:30:00-02:00", region="HZ-XH"),  # 04-01T01:30Z: April
    _ev("hl4", "HL-2", "scan", "wx-h14", "2024-04-01T07:00:00+08:00", region="HZ-XH"),  # 03-31T23:00Z: March
    _ev("hm1", "HM", "ship", "F1", T(1), "D1"), _ev("hm2", "HM", "open", "D1", T(3), region="NB"),
    _ev("hm3", "HM", "ship", "D1", T(4), "S2"),
    _ev("hn1", "HN", "ship", "F1", T(1), "D1"), _ev("hn2", "HN", "ship", "D1", T(2), "S7"),
    _ev("hn3", "HN-1", "scan", "wx-h15", T(6), region="HZ"),
    _ev("ho1", "HO", "ship", "F1", T(1), "D1"), _ev("ho2", "HO-1", "scan", "S1", T(4)),
    _ev("hr1", "HR", "ship", "F1", T(1), "D1"), _ev("hr2", "HR", "ship", "D1", T(2), "S1"),
    _ev("hr3", "HR-1", "scan", "S1", T(4)),
    _ev("hq1", "HQ", "ship", "F1", T(1), "D1"), _ev("hq2", "HQ", "ship", "D1", T(2), "S1"),
    _ev("hq3", "HQ-1", "scan", "wx-nowhere", T(7)),
]


def sales_world() -> dict[str, Rows]:
    """Situations of DOMAIN.md §5 (sell-in, sell-out, rebates, regions), one case each."""
    return {"regions": REGIONS, "parties": SALES_PARTIES, "products": PRODUCTS, "codes": SALES_CODES,
            "scans": SALES_SCANS}
