"""Planted answers for stores, consumers and rebates (DOMAIN.md §5) in generated scenarios.

`loaders.generate` calls `plant(...)`: four extra stores, with their own pallets, cases,
units, scans, consumers and referrals, all on new codes and ids, so nothing planted
before changes. Every answer is known by construction (what was planted):

- `steady`: the same deliveries and consumer scans every week (a control);
- `stuffing`: in the trailing window, ten times the usual deliveries, sales unchanged;
- `sudden_stop`: deliveries go on, consumer scans stop when the window starts;
- `diversion_sink`: besides its own distributor's deliveries, twice as much
  shipped to it by a distributor whose territory excludes it (diversion kind a).

Weeks run from `EPOCH` (day 0); the scenario's analysis time `as_of` is the end of week
16 and the window its last 4 weeks. Each week's consumer scans take half of the units of
that week's normal cases, inside the store's district. Planted consumers (implicit ids
`oP...`) get exact lifecycle stages: one purchase (activated), two days (retained), six
units (revenue), two SKUs (related), a converted referral (referral), or only being
referred (acquired). answers.json gets `store_health` and `lifecycle` sections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from loaders import generate as gen

WEEKS, WINDOW_WEEKS, HISTORY_WEEKS = 17, 4, 8
KINDS = ("steady", "steady", "steady", "stuffing", "sudden_stop", "diversion_sink")
BULK_UNITS = 6


@dataclass
class Plants:
    regions: pa.Table
    parties: pa.Table
    referrals: pa.Table
    codes: pa.Table
    scans: pa.Table
    diverter: int  # world party index of the distributor that diverts into the sink
    diverted: list[tuple[np.ndarray, int]]  # (unit indices, crossing event number) per diverted case
    answers: dict = field(default_factory=dict)  # the store_health and lifecycle sections
    consumers: int = 0  # implicit consumers added


def plant(rng: np.random.Generator, w: gen._World, plan: gen._Plan, first_event: int) -> Plants:
    """Plan and emit the planted block (ids continue after the scenario's own)."""
    cheap = [int(i) for i in np.argsort(w.prices, kind="stable") if w.upb[i] == 0]
    pairs = [(a, b) for a in cheap for b in cheap if a < b and w.upc[a] == w.upc[b]]  # steady weeks
    sku_a, sku_b = min(pairs, key=lambda p: (w.upc[p[0]], w.prices[p[0]] + w.prices[p[1]])) if pairs else cheap[:2]
    per_week = math.ceil(12 / min(w.upc[sku_a], w.upc[sku_b]))  # cases: at least 6 consumer scans a week
    tops = [int(t) for t in w.tops if t != w.hq_outside]
    home_dist = tops[int(rng.integers(0, len(tops)))]
    inside = w.districts[w.in_territory(np.full(len(w.districts), home_dist), w.districts)]
    district = int(inside[int(rng.integers(0, len(inside)))])
    diverter = next(int(t) for t in w.tops if not w.in_territory(np.array([t]), np.array([district]))[0])
    dist_id = w.party_ids[home_dist].as_py()
    diverter_id = w.party_ids[diverter].as_py()
    city_id = w.region_ids[int(w.region_parent[district])].as_py()
    region_id = f"{city_id}-DX"  # a new district: its stores are each other's only peers
    regions = gen._rows("regions", [{"region_id": region_id, "name": "Xinkai Qu", "parent_id": city_id}])
    factory_id = w.party_ids[int(w.factories[0])].as_py()
    store_ids = [f"SX{i + 1:04d}" for i in range(len(KINDS))]
    parties = gen._rows("parties", [
        {"party_id": s, "kind": "store", "name": f"{gen._pinyin(rng)} 便利店 ({kind.replace('_', ' ')})",
         "region_id": region_id, "upstream_id": dist_id} for s, kind in zip(store_ids, KINDS)])

    as_of, window_start = WEEKS * 7 * gen.DAY, (WEEKS - WINDOW_WEEKS) * 7 * gen.DAY
    codes, scans, diverted_cases = [], [], []
    pallet, case, unit, event = len(plan.pal_sku), len(plan.case_pal), plan.n_units, first_event
    consumers: list[str] = []
    scanned: dict[str, list[tuple[str, int, str]]] = {}  # store -> (unit code, ts, sku)
    stats = {s: dict.fromkeys(("sell_in", "sell_in_window", "sell_out", "sell_out_window", "diverted_in",
                               "diverted_scans"), 0) | {"scans_by_sku": {}, "diverted_scans_by_sku": {}}
             for s in store_ids}

    def code(level: int, index: int) -> str:
        return gen.format_codes(np.array([level]), np.array([index])).to_pylist()[0]

    def ev(code_: str, action: str, party: str, counterparty: str | None, ts: int, region: str | None) -> int:
        nonlocal event
        event += 1
        scans.append({"event_id": gen._format_prefixed(b"EV", np.array([event - 1]), 10).to_pylist()[0],
                      "code": code_, "action": action, "party_id": party, "counterparty_id": counterparty,
                      "ts": gen._iso_z(ts), "region_id": region})
        return event - 1

    for store_id, kind in zip(store_ids, KINDS):
        for week in range(WEEKS):
            start = week * 7 * gen.DAY
            in_window = start + gen.DAY > window_start
            sku = sku_a if week % 2 == 0 else sku_b
            lots = [(dist_id, per_week, True)]
            if kind == "stuffing" and in_window:
                lots.append((dist_id, 9 * per_week, False))
            if kind == "diversion_sink":
                lots.append((diverter_id, 2 * per_week, True))
            for sender, n_cases, sold in lots:
                pallet_code = code(gen.PALLET, pallet)
                pallet += 1
                batch = f"BX{week:02d}-{w.skus[sku][3:]}"
                codes.append({"code": pallet_code, "level": "pallet", "sku": w.skus[sku], "batch": batch,
                              "produced_at": gen._iso_z(start - 5 * gen.DAY)})
                ev(pallet_code, "ship", factory_id, sender, start - 3 * gen.DAY, None)
                for _ in range(n_cases):
                    case_code = code(gen.CASE, case)
                    case += 1
                    codes.append({"code": case_code, "level": "case", "parent_code": pallet_code})
                    t = start + gen.DAY + int(rng.integers(0, 12 * gen.HOUR))
                    crossing = ev(case_code, "ship", sender, store_id, t, None)
                    ev(case_code, "open", store_id, None, t + gen.DAY, None)
                    unit_idx = np.arange(unit, unit + int(w.upc[sku]))
                    units = [code(gen.UNIT, i) for i in unit_idx]
                    unit += len(units)
                    codes.extend({"code": u, "level": "unit", "parent_code": case_code} for u in units)
                    diverted = sender == diverter_id
                    stat = stats[store_id]
                    stat["sell_in"] += len(units)
                    stat["sell_in_window"] += len(units) if in_window else 0
                    if diverted:
                        stat["diverted_in"] += len(units)
                        diverted_cases.append((unit_idx, crossing))
                    if not sold:
                        continue
                    for u in units[: len(units) // 2]:
                        ts = t + 2 * gen.DAY + int(rng.integers(0, 4 * gen.DAY))
                        if kind == "sudden_stop" and ts > window_start:
                            continue
                        scanned.setdefault(store_id, []).append((u, ts, w.skus[sku], diverted))
                        if ts > as_of:  # scanned, but after the analysis time
                            continue
                        stat["sell_out"] += 1
                        stat["sell_out_window"] += int(ts > window_start)
                        key = "diverted_scans_by_sku" if diverted else "scans_by_sku"
                        stat[key][w.skus[sku]] = stat[key].get(w.skus[sku], 0) + 1
                        stat["diverted_scans"] += int(diverted)

    # consumers: scripted lifecycle stages on the steady store's scans, one purchase each for the rest
    def consumer() -> str:
        consumers.append(f"oP{len(consumers) + 1:08d}")
        return consumers[-1]

    stages: dict[str, str] = {}
    referrals = []
    steady = sorted(scanned[store_ids[0]], key=lambda s: (s[1], s[0]))
    by_sku = {s: [x for x in steady if x[2] == s] for s in (w.skus[sku_a], w.skus[sku_b])}
    a_units, b_units = by_sku[w.skus[sku_a]], by_sku[w.skus[sku_b]]
    used: set[str] = set()

    def buy(who: str, item: tuple[str, int, str, bool], ts: int | None = None) -> int:
        used.add(item[0])
        when = item[1] if ts is None else ts
        ev(item[0], "scan", who, None, when, region_id)
        return when

    retained, bulk, related, referrer, referee = (consumer() for _ in range(5))
    buy(retained, a_units[0])
    buy(retained, a_units[-1])  # weeks apart: two days
    first_bulk = max(x[1] for x in a_units[2: 2 + BULK_UNITS])  # all six delivered by then
    for item in a_units[2: 2 + BULK_UNITS]:
        buy(bulk, item, first_bulk)  # six units at once
    buy(related, a_units[8])
    buy(related, b_units[0])
    t_ref = buy(referrer, a_units[9])
    referrals.append({"referrer_id": referrer, "referee_id": referee, "ts": gen._iso_z(t_ref + gen.HOUR), "channel": "share"})
    buy(referee, next(x for x in b_units if x[1] > t_ref + gen.HOUR and x[0] not in used))
    prospect, lone = consumer(), consumer()
    referrals.append({"referrer_id": lone, "referee_id": prospect, "ts": gen._iso_z(t_ref + 2 * gen.HOUR), "channel": "share"})
    stages.update({retained: "retained", bulk: "revenue", related: "related", referrer: "referral",
                   referee: "activated", prospect: "acquired"})
    buy(lone, next(x for x in a_units if x[0] not in used))
    activated = []
    for store_id in store_ids:
        for item in scanned.get(store_id, []):
            if item[0] not in used:
                who = consumer()
                buy(who, item)
                activated.append(who)
    stages.update({who: "activated" for who in activated[:50]})
    stages[lone] = "activated"

    answers = {
        "store_health": {"as_of": gen._iso_z(as_of), "window_days": 7 * WINDOW_WEEKS, "history_weeks": HISTORY_WEEKS,
                         "peer_level": "district", "stores": [{"store": s, "kind": k, **stats[s]}
                                                             for s, k in zip(store_ids, KINDS)]},
        "lifecycle": {"bulk_units": BULK_UNITS, "stages": stages},
    }
    return Plants(regions=regions, parties=parties, referrals=gen._rows("referrals", referrals), codes=gen._rows("codes", codes),
                  scans=gen._rows("scans", scans), diverter=diverter, diverted=diverted_cases, answers=answers,
                  consumers=len(consumers))
