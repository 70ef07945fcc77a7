"""Small named worlds with hand-checked answers, shared by tests on every store.

`channel_world()` is a two-province channel (Zhejiang: distributor D1 and its
sub-distributor SD1; Jiangsu: distributor D2) with one case per diversion rule. Its
answers (`CHANNEL_DIVERSIONS`) were worked out by hand from DOMAIN.md §3.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

Rows = list[dict]

REGIONS: Rows = [
    {"region_id": "CN", "name": "China", "parent_id": None},
    {"region_id": "ZJ", "name": "Zhejiang", "parent_id": "CN"},
    {"region_id": "HZ", "name": "Hangzhou", "parent_id": "ZJ"},
    {"region_id": "HZ-XH", "name": "Xihu", "parent_id": "HZ"},
    {"region_id": "NB", "name": "Ningbo", "parent_id": "ZJ"},
    {"region_id": "JS", "name": "Jiangsu", "parent_id": "CN"},
    {"region_id": "NJ", "name": "Nanjing", "parent_id": "JS"},
    {"region_id": "SZ", "name": "Suzhou", "parent_id": "JS"},
]

PARTIES: Rows = [
    {"party_id": "F1", "kind": "factory", "name": "Brand factory", "region_id": "HZ"},
    {"party_id": "D1", "kind": "distributor", "name": "Zhejiang distributor", "region_id": "HZ", "territory": "ZJ"},
    {"party_id": "SD1", "kind": "distributor", "name": "Ningbo sub-distributor", "region_id": "NB", "territory": "NB", "upstream_id": "D1"},
    {"party_id": "D2", "kind": "distributor", "name": "Jiangsu distributor", "region_id": "NJ", "territory": "JS"},
    {"party_id": "S1", "kind": "store", "name": "Xihu store", "region_id": "HZ-XH", "upstream_id": "D1", "lat": "30.25", "lon": "120.13"},
    {"party_id": "S3", "kind": "store", "name": "Nanjing store", "region_id": "NJ", "upstream_id": "D2"},
    {"party_id": "SP1", "kind": "salesperson", "name": "D1 sales rep", "region_id": "HZ", "upstream_id": "D1"},
    {"party_id": "C1", "kind": "consumer", "name": "Known consumer", "region_id": "HZ"},
]

PRODUCTS: Rows = [
    {"sku": "BJ500", "name": "Baijiu 500ml", "unit_price": "300"},
    {"sku": "BJ250", "name": "Baijiu 250ml", "unit_price": "120.5"},
]


def _case(case: str, units: list[str], *, sku: str = "BJ500", batch: str = "B1", parent: str | None = None) -> Rows:
    rows = [{"code": case, "level": "case", "parent_code": parent, "sku": sku, "batch": batch}]
    rows += [{"code": u, "level": "unit", "parent_code": case, "sku": None, "batch": None} for u in units]
    return rows


CODES: Rows = [
    *_case("CA", ["A1", "A2", "A3"]),  # ship to a store outside the territory
    {"code": "PB", "level": "pallet", "sku": "BJ250", "batch": "B2", "produced_at": "2024-01-05T08:00:00+08:00"},
    *_case("CB", [], sku="BJ250", batch="B2", parent="PB"),
    {"code": "BB", "level": "box", "parent_code": "CB"},
    {"code": "B1", "level": "unit", "parent_code": "BB"}, {"code": "B2", "level": "unit", "parent_code": "BB"},
    *_case("CK", ["K1", "K2", "K3", "K4"]),  # consumer scans: k reached in NJ, single in SZ
    *_case("CJ", ["J1", "J2"]),  # consumer scans: k-1 in NJ
    *_case("CT", ["T1"]),  # travel
    *_case("CR", ["R1"]),  # returned and re-shipped
    *_case("CU", ["U1"]),  # untracked
    *_case("CS", ["SS1"]),  # sub-distributor lets goods out
    *_case("CM", ["M1"]),  # missing ship: an outside store receives
    *_case("CO", ["O1"]),  # an outside store opens, nothing else recorded
    *_case("CD", ["DD1"]),  # shipped to another distributor outside
    *_case("CH", ["H1"]),  # delivered to the distributor's own region
]


def _scan(event_id: str | None, code: str, action: str, party: str, ts: str, counterparty: str | None = None,
          region: str | None = None) -> dict:
    return {"event_id": event_id, "code": code, "action": action, "party_id": party,
            "counterparty_id": counterparty, "ts": ts, "region_id": region}


SCANS: Rows = [
    # A: D1 ships a case to a Nanjing store
    _scan("a1", "CA", "ship", "F1", "2024-02-01T08:00:00+08:00", "D1"),
    _scan("a2", "CA", "receive", "D1", "2024-02-01T10:00:00+08:00", "F1"),
    _scan("a3", "CA", "ship", "D1", "2024-02-03T00:00:00Z", "S3"),
    _scan("a4", "CA", "receive", "S3", "2024-02-04T00:00:00Z", "D1"),
    _scan("a5", "A1", "scan", "wx-a1", "2024-03-01T00:00:00Z", region="NJ"),
    # B: pallet to D1, the case inside it to the Nanjing store, the box opened there
    _scan("b1", "PB", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("b2", "CB", "ship", "D1", "2024-02-05T00:00:00Z", "S3"),
    _scan("b3", "BB", "open", "S3", "2024-02-06T00:00:00Z"),
    _scan("b4", "B2", "scan", "wx-b2", "2024-02-07T00:00:00Z", region="NJ"),
    # C: consumers scan K1-K3 in Nanjing (k = 3 reached), K4 in Suzhou
    _scan("k1", "CK", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("k2", "CK", "receive", "D1", "2024-02-01T06:00:00Z", "F1"),
    _scan("k3", "K1", "scan", "wx-k1", "2024-03-01T00:00:00Z", region="NJ"),
    _scan("k4", "K2", "scan", "wx-k2", "2024-03-02T00:00:00Z", region="NJ"),
    _scan("k5", "K3", "scan", "wx-k3", "2024-03-03T00:00:00+08:00", region="NJ"),
    _scan("k6", "K4", "scan", "wx-k4", "2024-03-04T00:00:00Z", region="SZ"),
    # C': only k-1 = 2 units of CJ scanned in Nanjing
    _scan("j1", "CJ", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("j2", "J1", "scan", "wx-j1", "2024-03-01T00:00:00Z", region="NJ"),
    _scan("j3", "J2", "scan", "wx-j2", "2024-03-01T01:00:00Z", region="NJ"),
    # D: travel - sold by the Xihu store, opened in Nanjing by a traveller
    _scan("t1", "CT", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("t2", "CT", "ship", "D1", "2024-02-02T00:00:00Z", "S1"),
    _scan("t3", "CT", "open", "S1", "2024-02-03T00:00:00Z"),
    _scan("t4", "T1", "scan", "C1", "2024-03-01T00:00:00Z", region="NJ"),
    # E: returned by D1 to the factory, re-shipped to D2, sold in Nanjing
    _scan("r1", "CR", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("r2", "CR", "ship", "D1", "2024-02-10T00:00:00Z", "F1"),
    _scan("r3", "CR", "ship", "F1", "2024-02-15T00:00:00Z", "D2"),
    _scan("r4", "CR", "ship", "D2", "2024-02-16T00:00:00Z", "S3"),
    _scan("r5", "R1", "scan", "wx-r1", "2024-03-01T00:00:00Z", region="NJ"),
    # F: untracked - no factory shipment recorded
    _scan("u1", "CU", "ship", "D1", "2024-02-02T00:00:00Z", "S3"),
    _scan("u2", "U1", "scan", "wx-u1", "2024-03-01T00:00:00Z", region="NJ"),
    # G: D1 -> its Ningbo sub-distributor (inside) -> the Nanjing store
    _scan("s1", "CS", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("s2", "CS", "ship", "D1", "2024-02-02T00:00:00Z", "SD1"),
    _scan("s3", "CS", "receive", "SD1", "2024-02-03T00:00:00Z", "D1"),
    _scan("s4", "CS", "ship", "SD1", "2024-02-04T00:00:00Z", "S3"),
    # H: ship to the Nanjing store missing; the store's receive is the evidence.
    # Written with mixed offsets: m1 (01:00Z) comes before m2 (02:00Z).
    _scan("m2", "CM", "receive", "S3", "2024-02-01T02:00:00Z", "D1"),
    _scan("m1", "CM", "ship", "F1", "2024-02-01T09:00:00+08:00", "D1"),
    # I: only the outside store's open is recorded after the factory shipment
    _scan("o1", "CO", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("o2", "CO", "open", "S3", "2024-02-08T00:00:00Z"),
    # J: D1 ships to the Jiangsu distributor
    _scan("d1", "CD", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("d2", "CD", "ship", "D1", "2024-02-02T00:00:00Z", "D2"),
    # K: the distributor receives at its own registered region; a consumer scans in Hangzhou
    _scan("h1", "CH", "ship", "F1", "2024-02-01T00:00:00Z", "D1"),
    _scan("h2", "CH", "receive", "D1", "2024-02-02T00:00:00Z", "F1", region="HZ"),
    _scan("h3", "H1", "scan", "wx-h1", "2024-03-01T00:00:00Z", region="HZ-XH"),
    # noise: an exact duplicate, a duplicate without event id
    _scan("a3", "CA", "ship", "D1", "2024-02-03T00:00:00Z", "S3"),
    _scan(None, "T1", "scan", "C1", "2024-03-02T00:00:00Z", region="NJ"),
    _scan(None, "T1", "scan", "C1", "2024-03-02T00:00:00Z", region="NJ"),
]

REFERRALS: Rows = [
    {"referrer_id": "C1", "referee_id": "wx-a1", "ts": "2024-02-20T00:00:00Z", "channel": "share"},
    {"referrer_id": "wx-a1", "referee_id": "wx-k1", "ts": "2024-02-21T00:00:00Z", "channel": "share"},
    {"referrer_id": "wx-a1", "referee_id": "wx-k2", "ts": "2024-02-21T00:00:00Z", "channel": "share"},
    {"referrer_id": "wx-k1", "referee_id": "wx-k3", "ts": "2024-02-22T00:00:00Z", "channel": "share"},
    {"referrer_id": "S1", "referee_id": "C1", "ts": "2024-02-10T00:00:00Z", "channel": "store"},
    {"referrer_id": "SP1", "referee_id": "wx-k4", "ts": "2024-02-10T00:00:00Z", "channel": "salesperson"},
    {"referrer_id": "wx-k4", "referee_id": "wx-k2", "ts": "2024-02-25T00:00:00Z", "channel": "share"},  # late
    {"referrer_id": "wx-k3", "referee_id": "C1", "ts": "2024-02-26T00:00:00Z", "channel": "share"},  # late
    {"referrer_id": "wx-k3", "referee_id": "wx-a1", "ts": "2024-02-27T00:00:00Z", "channel": "share"},  # late
    {"referrer_id": "wx-j1", "referee_id": "wx-j1", "ts": "2024-02-27T00:00:00Z", "channel": "share"},  # self
    {"referrer_id": "C1", "referee_id": "wx-a1", "ts": "2024-02-28T00:00:00Z", "channel": "share"},  # duplicate pair
    {"referrer_id": "wx-j2", "referee_id": "wx-j1", "ts": "2024-02-28T00:00:00Z", "channel": "share"},
    {"referrer_id": "wx-j1", "referee_id": "wx-j2", "ts": "2024-02-28T01:00:00Z", "channel": "share"},  # cycle
]

# (code, severity, responsible, exit_via, crossing_event_id), worked out by hand
CHANNEL_DIVERSIONS = [
    ("A1", "confirmed", "D1", "D1", "a3"), ("A2", "confirmed", "D1", "D1", "a3"), ("A3", "confirmed", "D1", "D1", "a3"),
    ("B1", "confirmed", "D1", "D1", "b2"), ("B2", "confirmed", "D1", "D1", "b2"),
    ("K1", "confirmed", "D1", "D1", "k3"), ("K2", "confirmed", "D1", "D1", "k4"), ("K3", "confirmed", "D1", "D1", "k5"),
    ("K4", "suspected", "D1", "D1", "k6"),
    ("J1", "suspected", "D1", "D1", "j2"), ("J2", "suspected", "D1", "D1", "j3"),
    ("SS1", "confirmed", "D1", "SD1", "s4"),
    ("M1", "confirmed", "D1", "D1", "m2"),
    ("O1", "confirmed", "D1", "D1", "o2"),
    ("DD1", "confirmed", "D1", "D1", "d2"),
]
NOT_DIVERTED = ["T1", "R1", "U1", "H1"]
UNTRACKED = ["U1"]


def channel_world() -> dict[str, Rows]:
    """A fresh copy of the channel world's tables (callers may change it)."""
    tables = {"regions": REGIONS, "parties": PARTIES, "products": PRODUCTS, "codes": CODES,
              "scans": SCANS, "referrals": REFERRALS}
    return {name: [dict(row) for row in rows] for name, rows in tables.items()}


def add_case(tables: dict[str, Rows], case: str, units: list[str], *, shipped: str | None = None) -> None:
    """Adds case `case` holding `units` to the world's codes and, with `shipped` (an event
    id), its shipment from the factory F1 to the distributor D1 on 2024-02-01."""
    tables["codes"] += [{"code": case, "level": "case"}, *({"code": u, "level": "unit", "parent_code": case} for u in units)]
    if shipped is not None:
        tables["scans"].append({"event_id": shipped, "code": case, "action": "ship", "party_id": "F1",
                                "counterparty_id": "D1", "ts": "2024-02-01T00:00:00Z"})


def write_world(tables: dict[str, Rows], folder: Path, fmt: str = "csv") -> Path:
    """Write each table as `<name>.<fmt>` (csv, jsonl or parquet); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        columns = sorted({k for row in rows for k in row}, key=lambda c: min(list(r).index(c) if c in r else 99 for r in rows))
        table = pa.table({c: pa.array([None if r.get(c) is None else str(r[c]) for r in rows], pa.string())
                          for c in columns})
        path = folder / f"{name}.{fmt}"
        if fmt == "csv":
            pa_csv.write_csv(table, path)
        elif fmt == "parquet":
            pq.write_table(table, path)
        else:
            with path.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
    return folder


def purchases_world() -> dict[str, Rows]:
    """The channel world plus purchases at the wrong level, repeated and retracted (April
    2024, after everything else). Worked out by hand from DOMAIN.md §2 (a scan is the
    purchase signal; an event on a code applies to everything packed inside it):

    - wx-p scans case CP (BJ250, 120.5) of the Xihu store S1: it buys P1, P2 and P3 (p1);
      its scan of P1 (p2) and wx-q's of P2 (p3) are repeats and buy nothing;
    - wx-r's scan of Q1 (q1) is retracted, so wx-s's later scan (q2) buys it (BJ500, 300);
    - in the channel world itself C1 scans T1 twice (t4, then a repeat): one purchase.

    wx-p referred wx-q, wx-r and wx-s before all that: only wx-s converted (revenue 300).
    """
    tables = channel_world()
    tables["codes"] += [*_case("CP", ["P1", "P2", "P3"], sku="BJ250", batch="B9"), *_case("CQ", ["Q1"], batch="B9")]
    tables["scans"] += [
        _scan("p0", "CP", "ship", "D1", "2024-04-01T00:00:00Z", "S1"),
        _scan("p1", "CP", "scan", "wx-p", "2024-04-02T00:00:00Z", region="HZ-XH"),
        _scan("p2", "P1", "scan", "wx-p", "2024-04-03T00:00:00Z", region="HZ-XH"),
        _scan("p3", "P2", "scan", "wx-q", "2024-04-04T00:00:00Z", region="HZ-XH"),
        _scan("q1", "Q1", "scan", "wx-r", "2024-04-02T00:00:00Z", region="HZ-XH"),
        _scan("q2", "Q1", "scan", "wx-s", "2024-04-05T00:00:00Z", region="HZ-XH"),
    ]
    tables["referrals"] += [{"referrer_id": "wx-p", "referee_id": who, "ts": "2024-04-01T00:00:00Z", "channel": "share"}
                            for who in ("wx-q", "wx-r", "wx-s")]
    tables["retractions"] = [{"event_id": "q1", "declared_at": "2024-04-10T00:00:00Z", "reason": "incorrect_data"}]
    return tables
