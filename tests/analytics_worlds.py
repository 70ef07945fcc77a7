"""A small shop world for store-health tests, with answers worked out by hand.

One distributor (DS, territory P9) and five stores in district P9-C1-D1. For 12 weeks
from 2024-01-01 each store gets one case of 6 units a week (shipped on day 7w + 1) and
consumers scan 4 of them (days 7w + 2 .. 7w + 5). SS4 is stuffed: in weeks 8-11 it also
gets 4 extra cases a week, never sold. SS5 stops selling: no scans in weeks 8-11. Seen
as of 2024-03-25 (day 84) with a 28-day window (weeks 8-11) and 8 history weeks (0-7):

- sell-in in the window: SS1-3, SS5 24 units, SS4 120 -> median 24, MAD 0, mean absolute
  deviation 19.2, z(SS4) = 96 / (1.2533 x 19.2) = 3.99: high against its peers.
- scan rate of P9: 224 scanned / 456 sold in = 0.4912; daily sales SS1-4 16 / 0.4912 / 28 =
  1.1633, SS5 0 -> z(SS5) = -3.99: low against its peers.
- SS5's history: 4 scans every week, median 4, scale max(0, 2, 1) / sqrt(4) = 1, window
  rate 0 -> z = -4: low against its own history.
- SS4: stock 168 - 48 / 0.4912 = 70.29, days of cover 70.29 / 1.1633 = 60.4, next purchase
  2024-05-24T09:36:00Z, quantity ceil(1.1633 x 28) = 33.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.worlds import Rows

START = datetime(2024, 1, 1, tzinfo=UTC)
AS_OF = "2024-03-25T00:00:00Z"
STORES = ("SS1", "SS2", "SS3", "SS4", "SS5")


def _ts(days: float) -> str:
    return (START + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def shop_world() -> dict[str, Rows]:
    """The shop world's tables (see the module docstring)."""
    regions = [{"region_id": "P9", "name": "Province nine", "parent_id": None},
               {"region_id": "P9-C1", "name": "City one", "parent_id": "P9"},
               {"region_id": "P9-C1-D1", "name": "District one", "parent_id": "P9-C1"}]
    parties = [{"party_id": "FS", "kind": "factory", "region_id": "P9-C1-D1"},
               {"party_id": "DS", "kind": "distributor", "region_id": "P9-C1-D1", "territory": "P9"}]
    parties += [{"party_id": s, "kind": "store", "region_id": "P9-C1-D1", "upstream_id": "DS"} for s in STORES]
    codes: Rows = [{"code": "PS", "level": "pallet", "sku": "SK1", "batch": "BS"}]
    scans: Rows = []
    for store in STORES:
        for week in range(12):
            extra = 4 if store == "SS4" and week >= 8 else 0
            for n in range(1 + extra):
                case = f"{store}-{week}-{n}"
                codes.append({"code": case, "level": "case", "parent_code": "PS"})
                codes += [{"code": f"{case}-{u}", "level": "unit", "parent_code": case} for u in range(6)]
                scans.append({"event_id": f"s-{case}", "code": case, "action": "ship", "party_id": "DS",
                              "counterparty_id": store, "ts": _ts(7 * week + 1)})
                if n or (store == "SS5" and week >= 8):
                    continue
                scans += [{"event_id": f"c-{case}-{u}", "code": f"{case}-{u}", "action": "scan",
                           "party_id": f"wx-{case}-{u}", "ts": _ts(7 * week + 2 + u), "region_id": "P9-C1-D1"}
                          for u in range(4)]
    scans.append({"event_id": "f-ps", "code": "PS", "action": "ship", "party_id": "FS", "counterparty_id": "DS",
                  "ts": _ts(-1)})
    return {"regions": regions, "parties": parties, "products": [{"sku": "SK1", "name": "Shop sku", "unit_price": "10"}],
            "codes": codes, "scans": scans}
