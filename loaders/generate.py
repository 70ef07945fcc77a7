"""Scenario generator: a realistic canonical dataset plus the answers planted in it.

`generate_dataset(out_dir, scale=1, seed=0, fmt="csv")` writes the six tables of
DOMAIN.md §2 (regions, parties, products, codes, scans, referrals) and `answers.json`:
what the loader must accept and reject, which units are diverted (with severity,
responsible distributor, exit_via and crossing event), travel, reassigned and untracked
units, the top 10 super users and the referral noise. Every answer is known by
construction (what was planted, following the rules of docs/design.md), never by
running a detector.

Scale 1 is about 10,000 scan rows; scale 1000 about ten million, produced and written
in chunks of pallets so memory stays bounded. The same (scale, seed, fmt) gives
byte-identical files, and the data itself does not depend on `fmt`.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     summary = generate_dataset(Path(d), scale=0.05, seed=1)
>>> summary["rows"]["scans"] > 1000
True
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from loaders.readers import ANSWERS

log = logging.getLogger(__name__)

TABLES = ("regions", "parties", "products", "codes", "scans", "referrals")
FORMATS = ("csv", "jsonl", "parquet")
K = 3
HOUR, DAY = 3_600, 86_400
EPOCH_UNIX = 1_704_067_200  # 2024-01-01T00:00:00Z: generated times are seconds after it
SCANS_PER_SCALE = 10_000
CHUNK_UNITS = 250_000
PLANT_EVENTS = 9_000_000_000  # event numbers of the planted stores (loaders/plant_analytics.py)

ACTIONS = ("ship", "receive", "open", "scan")
SHIP, RECEIVE, OPEN, SCAN = range(4)
LEVELS = ("unit", "box", "case", "pallet")
UNIT, BOX, CASE, PALLET = range(4)
CODE_PREFIX = np.frombuffer(b"UNBXCSPL", np.uint8).reshape(4, 2)
CODE_DIGITS = 10
KIND_NAMES = ("factory", "distributor", "store", "consumer", "salesperson")
FACTORY, DISTRIBUTOR, STORE, CONSUMER, SALESPERSON, IMPLICIT = range(6)

# case scenarios; pallet scenarios
NORMAL, KA, KB, KC, KD, KE, KG_SUSP, KG_CONF, KH, REASSIGN = range(10)
P_NORMAL, P_DIVERTED, P_UNTRACKED = range(3)
KIND_LETTER = {KA: "a", KB: "b", KC: "c", KD: "d", KE: "e", KG_SUSP: "g", KG_CONF: "g", KH: "h"}
DIVERSION_KINDS = "abcdefgh"

STRING_SCHEMAS = {
    "regions": ("region_id", "name", "parent_id"),
    "parties": ("party_id", "kind", "name", "region_id", "territory", "upstream_id", "lat", "lon", "salesperson_id"),
    "products": ("sku", "name", "unit_price"),
    "codes": ("code", "level", "parent_code", "sku", "batch", "produced_at"),
    "scans": ("event_id", "code", "action", "party_id", "counterparty_id", "ts", "region_id",
              "lat", "lon"),
    "referrals": ("referrer_id", "referee_id", "ts", "channel", "code"),
}
FLOAT_COLUMNS = {"lat", "lon", "unit_price"}
SCHEMAS = {t: pa.schema([(c, pa.float64() if c in FLOAT_COLUMNS else pa.string()) for c in cols])
           for t, cols in STRING_SCHEMAS.items()}

_SYLLABLES = (
    "an bai bao bei bin chang cheng chun da dong feng fu gang gu guang hai han he hong hua "
    "huai jia jiang jin jing kai kang lan le li lin ling long lu mei nan ning ping qi qing "
    "quan rui shan shang shen shui song tai tian wan wei wu xi xia xin xing yang yi yong yuan "
    "yun ze zhang zhao zhen zhong zhou").split()
_SURNAMES = "Wang Li Zhang Liu Chen Yang Zhao Huang Zhou Wu Xu Sun Hu Zhu Gao Lin He Guo Ma Luo".split()
_SHOP_WORDS = ("烟酒店", "便利店", "超市", "酒行", "商行", "Store", "Mart")
_BRANDS = ("Jiuxiang", "Qingquan", "Hongyun", "Baijin", "Longshan")
_VARIANTS = ("52° 500ml", "53° 500ml", "42° 450ml", "Classic 500ml", "Gift Box 2x500ml",
             "Lager 330ml", "Premium 750ml", "Soy Sauce 1L", "Yogurt 200g", "Tea 500ml",
             "Vinegar 500ml", "Milk 250ml", "Mini 100ml", "Banquet 1L", "Reserve 700ml")


# ---------------------------------------------------------------- small helpers


def _pinyin(rng: np.random.Generator, n: int = 2) -> str:
    return "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), n)).capitalize()


def _uniform_int(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    return rng.integers(lo, hi, n)


def _fixed_strings(buf: np.ndarray) -> pa.Array:
    """A string array from an (n, width) uint8 matrix of ASCII characters."""
    n, width = buf.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(buf).tobytes())
    ).cast(pa.string())


def _digits(buf: np.ndarray, start: int, values: np.ndarray) -> None:
    v = values.astype(np.int64).copy()
    for j in range(buf.shape[1] - 1, start - 1, -1):
        buf[:, j] = 48 + v % 10
        v //= 10


def format_codes(level: np.ndarray, idx: np.ndarray) -> pa.Array:
    """Code strings (`UN0000000042`, `CS...`, `BX...`, `PL...`) for (level, index) pairs."""
    n = len(idx)
    buf = np.empty((n, 2 + CODE_DIGITS), np.uint8)
    buf[:, :2] = CODE_PREFIX[np.broadcast_to(np.asarray(level), (n,))]
    _digits(buf, 2, idx)
    return _fixed_strings(buf)


def _format_prefixed(prefix: bytes, idx: np.ndarray, width: int) -> pa.Array:
    buf = np.empty((len(idx), len(prefix) + width), np.uint8)
    buf[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    _digits(buf, len(prefix), idx)
    return _fixed_strings(buf)


def _format_ts(rng: np.random.Generator, ts: np.ndarray) -> pa.Array:
    """ISO 8601 in mixed forms: +08:00 local time (50%), Z (30%), no offset = UTC (20%)."""
    form = rng.choice(3, size=len(ts), p=[0.5, 0.3, 0.2])
    shifted = ts.astype(np.int64) + EPOCH_UNIX + np.where(form == 0, 8 * HOUR, 0)
    text = pc.strftime(pa.array(shifted).cast(pa.timestamp("s")), format="%Y-%m-%dT%H:%M:%S")
    suffix = pa.array(["+08:00", "Z", ""]).take(pa.array(form))
    return pc.binary_join_element_wise(text, suffix, "")


def _iso_z(ts: int) -> str:
    return str(np.datetime64(int(ts) + EPOCH_UNIX, "s")) + "Z"


def _take(values: pa.Array, idx: np.ndarray) -> pa.Array:
    """values[idx], null where idx < 0."""
    idx = np.asarray(idx, np.int64)
    return values.take(pa.array(np.where(idx < 0, 0, idx), mask=idx < 0))


def _csr(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items grouped by key: (order, start, count) so group k is order[start[k]:start[k]+count[k]]."""
    order = np.argsort(keys, kind="stable")
    count = np.bincount(keys, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return order, start, count


def _pick_grouped(rng, group: tuple, keys: np.ndarray) -> np.ndarray:
    """One random item of each key's group (-1 where the group is empty)."""
    order, start, count = group
    cnt = count[keys]
    pos = start[keys] + (rng.random(len(keys)) * cnt).astype(np.int64)
    return np.where(cnt > 0, order[np.minimum(pos, len(order) - 1)], -1)


def _choice(rng: np.random.Generator, items) -> int:
    return int(items[rng.integers(0, len(items))])


# ---------------------------------------------------------------- the world


@dataclass
class _World:
    region_ids: pa.Array
    region_names: list[str]
    region_parent: np.ndarray
    region_lat: np.ndarray
    region_lon: np.ndarray
    districts: np.ndarray  # region indices of districts, contiguous per city
    city_first: np.ndarray  # per region (cities): first district position in `districts`
    city_ndistricts: np.ndarray
    party_ids: pa.Array  # registered parties, then implicit consumers
    kind: np.ndarray
    region: np.ndarray  # registered region (-1: implicit consumer)
    upstream: np.ndarray
    names: list[str]
    territory: list[str | None]
    lat: np.ndarray
    lon: np.ndarray
    n_registered: int
    factories: np.ndarray
    tops: np.ndarray
    subs: np.ndarray
    stores: np.ndarray
    consumers: np.ndarray  # registered and implicit
    implicit: np.ndarray
    dist_row: np.ndarray  # party -> row of terr (-1 if not a distributor)
    terr: np.ndarray  # bool [distributor row, region]
    own_stores: tuple  # csr by contracted party
    subs_of: tuple  # csr by parent distributor
    pool: tuple  # consumers csr by home region
    outside_stores: dict[int, np.ndarray]
    outside_dists: dict[int, np.ndarray]
    outside_districts: dict[int, np.ndarray]
    hq_outside: int
    skus: list[str]
    sku_names: list[str]
    prices: np.ndarray
    upc: np.ndarray  # units per case
    upb: np.ndarray  # units per box (0: no boxes)
    used_implicit: np.ndarray  # bool per implicit consumer: appears in an accepted row

    def pick_consumers(self, rng: np.random.Generator, regions: np.ndarray) -> np.ndarray:
        got = _pick_grouped(rng, self.pool, regions)
        fallback = self.consumers[rng.integers(0, len(self.consumers), len(regions))]
        chosen = np.where(got >= 0, got, fallback)
        self.mark_used(chosen)
        return chosen

    def mark_used(self, parties: np.ndarray) -> None:
        imp = parties[parties >= self.n_registered] - self.n_registered
        self.used_implicit[imp] = True

    def in_territory(self, dist: np.ndarray, regions: np.ndarray) -> np.ndarray:
        return self.terr[self.dist_row[dist], regions]


def _build_regions(rng: np.random.Generator, scale: float):
    n_prov = int(min(31, 10 + round(3 * math.log2(max(scale, 1.0)))))
    ids, names, parent, level, lat, lon = ["CN"], ["Zhongguo"], [-1], [0], [35.0], [105.0]

    def add(rid, name, par, lev, la, lo):
        ids.append(rid)
        names.append(name)
        parent.append(par)
        level.append(lev)
        lat.append(round(la, 4))
        lon.append(round(lo, 4))
        return len(ids) - 1

    for p in range(1, n_prov + 1):
        plat, plon = rng.uniform(22, 45), rng.uniform(100, 122)
        pi = add(f"CN-P{p:02d}", _pinyin(rng) + " Sheng", 0, 1, plat, plon)
        for c in range(1, int(rng.integers(3, 7)) + 1):
            clat, clon = plat + rng.uniform(-1.5, 1.5), plon + rng.uniform(-1.5, 1.5)
            ci = add(f"{ids[pi]}-C{c:02d}", _pinyin(rng) + " Shi", pi, 2, clat, clon)
            for d in range(1, int(rng.integers(2, 5)) + 1):
                add(f"{ids[ci]}-D{d}", _pinyin(rng) + " Qu", ci, 3,
                    clat + rng.uniform(-0.1, 0.1), clon + rng.uniform(-0.1, 0.1))
    return ids, names, np.array(parent), np.array(level), np.array(lat), np.array(lon)


def _build_world(rng: np.random.Generator, scale: float) -> _World:
    rids, rnames, rparent, rlevel, rlat, rlon = _build_regions(rng, scale)
    n_reg = len(rids)
    districts = np.flatnonzero(rlevel == 3)
    city_first = np.full(n_reg, -1)
    city_n = np.zeros(n_reg, np.int64)
    for pos, d in enumerate(districts):
        c = rparent[d]
        if city_first[c] < 0:
            city_first[c] = pos
        city_n[c] += 1
    # ancestors (self, parent, grandparent, great-grandparent) for territory membership
    anc = [np.arange(n_reg)]
    for _ in range(3):
        prev = anc[-1]
        anc.append(np.where(prev >= 0, rparent[np.maximum(prev, 0)], -1))
    provinces = np.flatnonzero(rlevel == 1)
    children = {r: np.flatnonzero(rparent == r) for r in range(n_reg)}

    # territory units: whole provinces or single cities; one province is left to nobody
    prov_order = rng.permutation(provinces)
    reserved = int(prov_order[0])
    units: list[int] = []
    for p in prov_order[1:]:
        if rng.random() < 0.35:
            units.append(int(p))
        else:
            units.extend(int(c) for c in children[p])
    units = [units[i] for i in rng.permutation(len(units))]
    n_top = int(min(max(5, round(6 * scale ** 0.35)), len(units) // 2))
    top_units: list[list[int]] = []
    pos = 0
    for _ in range(n_top):
        take = int(rng.integers(1, 4))
        top_units.append(units[pos: pos + take])
        pos += take

    def district_set(unit_list: list[int]) -> np.ndarray:
        mask = np.zeros(n_reg, bool)
        mask[unit_list] = True
        inside = np.zeros(n_reg, bool)
        for a in anc:
            inside |= np.where(a >= 0, mask[np.maximum(a, 0)], False)
        return inside

    # sub-distributors: a city of a province unit, or a district of a city unit
    sub_parent: list[int] = []  # index into top list
    sub_units: list[list[int]] = []
    for t in range(n_top):
        if rng.random() < 0.5 or (t == 0):
            for _ in range(int(rng.integers(1, 3))):
                u = top_units[t][int(rng.integers(0, len(top_units[t])))]
                sub_parent.append(t)
                sub_units.append([_choice(rng, children[u])])
    n_sub = len(sub_units)
    dist_units = top_units + sub_units
    terr = np.stack([district_set(u) for u in dist_units])
    terr_districts = [districts[terr[i, districts]] for i in range(len(dist_units))]

    n_fac = int(rng.integers(1, 3))
    n_store = int(max(3 * n_top + n_sub, round(48 * scale ** 0.65)))
    n_cons = int(max(200, round(400 * scale ** 0.8)))
    n_imp = int(max(400, round(800 * scale ** 0.85)))

    kinds: list[int] = []
    regions: list[int] = []
    upstream: list[int] = []
    names: list[str] = []
    territory: list[str | None] = []

    def party(kind, region, up=-1, name="", terr_ids=None):
        kinds.append(kind)
        regions.append(region)
        upstream.append(up)
        names.append(name)
        territory.append(terr_ids)
        return len(kinds) - 1

    factories = [party(FACTORY, _choice(rng, districts), name=f"{_pinyin(rng)} Brewery No.{i + 1}")
                 for i in range(n_fac)]
    tops = []
    for t in range(n_top):
        home = _choice(rng, terr_districts[t])
        if t == n_top - 1:  # head office outside its own territory (a negative case)
            home = _choice(rng, districts[anc[2][districts] == reserved])
        tops.append(party(DISTRIBUTOR, home, name=f"{_pinyin(rng)} Trading Co.",
                          terr_ids="|".join(rids[u] for u in top_units[t])))
    subs = [party(DISTRIBUTOR, _choice(rng, terr_districts[n_top + s]), tops[sub_parent[s]],
                  f"{_pinyin(rng)} Wines & Spirits", "|".join(rids[u] for u in sub_units[s]))
            for s in range(n_sub)]
    for t in range(n_top):
        for _ in range(2):
            party(SALESPERSON, regions[tops[t]], tops[t],
                  f"{_SURNAMES[int(rng.integers(0, len(_SURNAMES)))]} {_pinyin(rng, 1)}")
    dists = tops + subs
    owners = list(range(len(dists))) + [t for t in range(n_top)]  # every top: 2, every sub: 1
    weights = np.array([3.0] * n_top + [1.0] * n_sub)
    owners += list(rng.choice(len(dists), n_store - len(owners), p=weights / weights.sum()))
    stores = []
    for i, o in enumerate(owners):
        stores.append(party(STORE, _choice(rng, terr_districts[o]), dists[o],
                            f"{_pinyin(rng)} {_SHOP_WORDS[int(rng.integers(0, len(_SHOP_WORDS)))]}"
                            f" #{i + 1}"))
    store_regions = np.array([regions[s] for s in stores])
    cons = [party(CONSUMER, -1, name=f"{_SURNAMES[int(rng.integers(0, len(_SURNAMES)))]} "
                  f"{_pinyin(rng, 1)}") for _ in range(n_cons)]
    n_registered = len(kinds)
    implicit = np.arange(n_registered, n_registered + n_imp)
    consumers = np.concatenate([np.array(cons, np.int64), implicit])
    # consumer home districts: mostly where stores are
    home = np.where(rng.random(len(consumers)) < 0.85,
                    store_regions[rng.integers(0, len(stores), len(consumers))],
                    districts[rng.integers(0, len(districts), len(consumers))])
    for c, h in zip(cons, home[: len(cons)]):
        regions[c] = int(h)

    region = np.array(regions + [-1] * n_imp, np.int64)
    kind = np.array(kinds + [IMPLICIT] * n_imp, np.int8)
    n_parties = len(kind)
    dist_row = np.full(n_parties, -1)
    dist_row[dists] = np.arange(len(dists))

    prefix = {FACTORY: "F", DISTRIBUTOR: "D", STORE: "S", CONSUMER: "CU", SALESPERSON: "SP"}
    width = {FACTORY: 2, DISTRIBUTOR: 3, STORE: 5, CONSUMER: 7, SALESPERSON: 4}
    counters = dict.fromkeys(prefix, 0)
    reg_ids = []
    for k in kinds:
        counters[k] += 1
        reg_ids.append(f"{prefix[k]}{counters[k]:0{width[k]}d}")
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                             np.uint8)
    buf = np.empty((n_imp, 28), np.uint8)
    buf[:, :2] = np.frombuffer(b"oX", np.uint8)
    buf[:, 2:] = alphabet[rng.integers(0, 64, (n_imp, 26))]
    party_ids = pa.concat_arrays([pa.array(reg_ids, pa.string()), _fixed_strings(buf)])
    assert len(pc.unique(party_ids)) == n_parties

    lat = np.full(n_parties, np.nan)
    lon = np.full(n_parties, np.nan)
    located = np.flatnonzero((kind != CONSUMER) & (kind != IMPLICIT))
    lat[located] = np.round(np.array(rlat)[region[located]] + rng.normal(0, 0.02, len(located)), 5)
    lon[located] = np.round(np.array(rlon)[region[located]] + rng.normal(0, 0.02, len(located)), 5)

    tops_a, subs_a, stores_a = np.array(tops), np.array(subs, np.int64), np.array(stores)
    store_owner_key = np.array([upstream[s] for s in stores])
    own = _csr(store_owner_key, n_parties)
    own = (stores_a[own[0]], own[1], own[2])
    sub_key = np.array([upstream[s] for s in subs], np.int64)
    subs_of = _csr(sub_key, n_parties)
    subs_of = (subs_a[subs_of[0]], subs_of[1], subs_of[2])
    pool = _csr(home, n_reg)
    pool = (consumers[pool[0]], pool[1], pool[2])

    dists_a = np.array(dists)
    outside_stores, outside_dists, outside_districts = {}, {}, {}
    for t in tops:
        row = dist_row[t]
        outside_stores[t] = stores_a[~terr[row, store_regions]]
        cand = dists_a[(dists_a != t) & ~terr[row, region[dists_a]]]
        outside_dists[t] = cand[np.array([upstream[d] != t for d in cand], bool)]
        outside_districts[t] = districts[~terr[row, districts]]

    n_sku = int(min(20, 8 + round(2 * math.log2(max(scale, 1.0)))))
    skus, sku_names, prices, upc, upb = [], [], [], [], []
    for i in range(n_sku):
        skus.append(f"SKU{i + 1:03d}")
        sku_names.append(f"{_BRANDS[i % len(_BRANDS)]} {_VARIANTS[i % len(_VARIANTS)]}")
        prices.append(float(rng.choice([38, 68, 128, 268, 499, 899, 1499])))
        if i % 3 == 1:
            b = int(rng.choice([2, 6]))
            upb.append(b)
            upc.append(b * int(rng.choice([3, 4])))
        else:
            upb.append(0)
            upc.append(int(rng.choice([6, 12, 12, 24])))

    return _World(
        region_ids=pa.array(rids, pa.string()), region_names=rnames, region_parent=rparent,
        region_lat=np.array(rlat), region_lon=np.array(rlon), districts=districts,
        city_first=city_first, city_ndistricts=city_n, party_ids=party_ids, kind=kind,
        region=region, upstream=np.array(upstream + [-1] * n_imp), names=names,
        territory=territory, lat=lat, lon=lon, n_registered=n_registered,
        factories=np.array(factories), tops=tops_a, subs=subs_a, stores=stores_a,
        consumers=consumers, implicit=implicit, dist_row=dist_row, terr=terr,
        own_stores=own, subs_of=subs_of, pool=pool, outside_stores=outside_stores,
        outside_dists=outside_dists, outside_districts=outside_districts,
        hq_outside=tops[-1], skus=skus, sku_names=sku_names, prices=np.array(prices),
        upc=np.array(upc), upb=np.array(upb), used_implicit=np.zeros(n_imp, bool))


# ---------------------------------------------------------------- packaging and scenarios


@dataclass
class _Plan:
    pal_sku: np.ndarray
    pal_dist: np.ndarray
    pal_fac: np.ndarray
    pal_t0: np.ndarray
    pal_kind: np.ndarray
    pal_case_ship: np.ndarray  # factory shipped the cases one by one, not the pallet
    pal_case0: np.ndarray
    pal_ncases: np.ndarray
    case_pal: np.ndarray
    case_kind: np.ndarray
    case_unit0: np.ndarray
    case_nunits: np.ndarray
    case_box0: np.ndarray
    case_nboxes: np.ndarray
    n_units: int
    n_boxes: int


def _build_plan(rng: np.random.Generator, w: _World, scale: float) -> _Plan:
    target = SCANS_PER_SCALE * scale
    n_sku = len(w.skus)
    skus, cpps, est = [], [], 0.0
    while est < target:
        skus.append(rng.integers(0, n_sku, 1024))
        cpps.append(rng.integers(8, 17, 1024))
        est += float((0.45 * w.upc[skus[-1]] * cpps[-1] + 3.2 * cpps[-1] + 2).sum())
    pal_sku, cpp = np.concatenate(skus), np.concatenate(cpps)
    cum = np.cumsum(0.45 * w.upc[pal_sku] * cpp + 3.2 * cpp + 2)
    n_keep = max(30, int(np.searchsorted(cum, target)) + 1)
    pal_sku, cpp = pal_sku[:n_keep], cpp[:n_keep]
    n_pal = len(pal_sku)
    pal_kind = np.full(n_pal, P_NORMAL, np.int8)
    special = rng.permutation(n_pal)
    n_unt = max(1, round(0.002 * n_pal))
    n_div = max(2, round(0.006 * n_pal))
    pal_kind[special[:n_unt]] = P_UNTRACKED
    pal_kind[special[n_unt: n_unt + n_div]] = P_DIVERTED
    cpp[pal_kind == P_UNTRACKED] = 2
    weights = w.own_stores[2][w.tops].astype(float) + 1
    for t_i, t in enumerate(w.tops):  # sub-distributors' stores count for their parent
        subs = w.subs_of[0][w.subs_of[1][t]: w.subs_of[1][t] + w.subs_of[2][t]]
        weights[t_i] += w.own_stores[2][subs].sum()
    pal_dist = w.tops[rng.choice(len(w.tops), n_pal, p=weights / weights.sum())]
    pal_fac = w.factories[rng.integers(0, len(w.factories), n_pal)]
    pal_t0 = rng.integers(0, 75 * DAY, n_pal) // 60 * 60
    pal_case_ship = (rng.random(n_pal) < 0.1) & (pal_kind == P_NORMAL)

    case_pal = np.repeat(np.arange(n_pal), cpp)
    pal_case0 = np.concatenate([[0], np.cumsum(cpp)[:-1]])
    case_sku = pal_sku[case_pal]
    case_nunits = w.upc[case_sku]
    case_nboxes = np.where(w.upb[case_sku] > 0, case_nunits // np.maximum(w.upb[case_sku], 1), 0)
    case_unit0 = np.concatenate([[0], np.cumsum(case_nunits)[:-1]])
    case_box0 = np.concatenate([[0], np.cumsum(case_nboxes)[:-1]])

    n_cases = len(case_pal)
    case_kind = np.zeros(n_cases, np.int8)
    free = pal_kind[case_pal] == P_NORMAL

    def plant(kind: int, rate: float, minimum: int, extra: np.ndarray | None = None) -> None:
        cand = np.flatnonzero(free if extra is None else free & extra)
        n = min(len(cand), max(minimum, round(rate * n_cases)))
        chosen = rng.choice(cand, n, replace=False)
        case_kind[chosen] = kind
        free[chosen] = False

    has_sub = w.subs_of[2][pal_dist[case_pal]] > 0
    plant(KE, 0.002, 2, has_sub)
    plant(KH, 0.002, 2, w.upb[case_sku] > 0)
    for kind in (KA, KB, KC, KD):
        plant(kind, 0.002, 2)
    plant(KG_SUSP, 0.003, 3)
    plant(KG_CONF, 0.003, 3)
    plant(REASSIGN, 0.003, 2)
    return _Plan(pal_sku, pal_dist, pal_fac, pal_t0, pal_kind, pal_case_ship, pal_case0, cpp,
                 case_pal, case_kind, case_unit0, case_nunits, case_box0, case_nboxes,
                 int(case_nunits.sum()), int(case_nboxes.sum()))


# ---------------------------------------------------------------- events


class _Events:
    """Columnar event buffer; event ids are handed out in creation order."""

    COLUMNS = ("level", "code", "action", "party", "cp", "ts", "region", "quiet")

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id
        self.parts: dict[str, list] = {c: [] for c in self.COLUMNS + ("id",)}
        self.ones: dict[str, list] = {c: [] for c in self.COLUMNS + ("id",)}

    def add(self, level, code, action, party, cp, ts, region, quiet=False) -> np.ndarray:
        code = np.asarray(code, np.int64)
        n = len(code)
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        for name, v in zip(self.COLUMNS, (level, code, action, party, cp, ts, region, quiet)):
            self.parts[name].append(np.broadcast_to(np.asarray(v), (n,)))
        self.parts["id"].append(ids)
        return ids

    def one(self, level, code, action, party, cp, ts, region) -> int:
        eid = self.next_id
        self.next_id += 1
        for name, v in zip(self.COLUMNS, (level, code, action, party, cp, ts, region, False)):
            self.ones[name].append(v)
        self.ones["id"].append(eid)
        return eid

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self.COLUMNS + ("id",):
            dtype = bool if name == "quiet" else np.int64
            parts = [p.astype(dtype) for p in self.parts[name]]
            parts.append(np.array(self.ones[name], dtype))
            out[name] = np.concatenate(parts)
        return out


@dataclass
class _Answers:
    div: list  # tuples of arrays (unit, kind, severity, responsible, exit_via, crossing)
    travel: list
    reassigned: list
    untracked: list

    def diverted(self, units, kind: str, severity: int, resp, exit_via, crossing) -> None:
        units = np.asarray(units, np.int64)
        n = len(units)
        self.div.append(tuple(np.broadcast_to(np.asarray(v, np.int64), (n,)).copy() for v in (
            units, DIVERSION_KINDS.index(kind), severity, resp, exit_via, crossing)))


@dataclass
class _Stage:
    """Per case of a chunk: where and from when consumers scan its units."""

    district: np.ndarray
    t0: np.ndarray
    p: np.ndarray
    travel_ok: np.ndarray
    resp: np.ndarray

    def set(self, local: int, district: int, t0: int) -> None:
        self.district[local] = district
        self.t0[local] = t0


def _units_of(plan: _Plan, case: int) -> np.ndarray:
    return np.arange(plan.case_unit0[case], plan.case_unit0[case] + plan.case_nunits[case])


def _chunk_events(rng, w: _World, plan: _Plan, p0: int, p1: int, ev: _Events, ans: _Answers) -> None:
    """All events of pallets [p0, p1) and everything packed in them."""
    c0 = int(plan.pal_case0[p0])
    c1 = int(plan.pal_case0[p1 - 1] + plan.pal_ncases[p1 - 1])
    nc = c1 - c0
    stage = _Stage(np.full(nc, -1), np.zeros(nc, np.int64), rng.uniform(0.3, 0.6, nc),
                   np.zeros(nc, bool), plan.pal_dist[plan.case_pal[c0:c1]])
    reg = w.region
    pals = np.arange(p0, p1)
    kinds = plan.pal_kind[pals]

    # factory -> distributor (assignment), distributor receives (sometimes not recorded)
    by_pallet = pals[(kinds != P_UNTRACKED) & ~plan.pal_case_ship[pals]]
    fac, dist, t0 = plan.pal_fac[by_pallet], plan.pal_dist[by_pallet], plan.pal_t0[by_pallet]
    ev.add(PALLET, by_pallet, SHIP, fac, dist, t0, reg[fac])
    got = rng.random(len(by_pallet)) < 0.88
    ev.add(PALLET, by_pallet[got], RECEIVE, dist[got], fac[got],
           t0[got] + _uniform_int(rng, 4 * HOUR, 48 * HOUR, int(got.sum())), reg[dist[got]])
    by_case = np.flatnonzero(plan.pal_case_ship[plan.case_pal[c0:c1]]) + c0
    cp = plan.case_pal[by_case]
    fac, dist, t0 = plan.pal_fac[cp], plan.pal_dist[cp], plan.pal_t0[cp]
    ev.add(CASE, by_case, SHIP, fac, dist, t0 + _uniform_int(rng, 0, 2 * HOUR, len(cp)), reg[fac])
    got = rng.random(len(by_case)) < 0.88
    ev.add(CASE, by_case[got], RECEIVE, dist[got], fac[got],
           t0[got] + _uniform_int(rng, 4 * HOUR, 48 * HOUR, int(got.sum())), reg[dist[got]])

    avail = plan.pal_t0[plan.case_pal[c0:c1]] + 2 * DAY  # the distributor holds the goods

    # normal cases: distributor -> own store (or -> sub-distributor -> its store) -> open
    normal = np.flatnonzero((plan.case_kind[c0:c1] == NORMAL)
                            & (plan.pal_kind[plan.case_pal[c0:c1]] == P_NORMAL))
    B = stage.resp[normal]
    sd = _pick_grouped(rng, w.subs_of, B)
    sd_store = _pick_grouped(rng, w.own_stores, np.maximum(sd, 0))
    via = (sd >= 0) & (sd_store >= 0) & (rng.random(len(normal)) < 0.3)
    direct_store = _pick_grouped(rng, w.own_stores, B)
    first = np.where(via, sd, direct_store)
    store = np.where(via, sd_store, direct_store)
    t1 = avail[normal] + _uniform_int(rng, DAY, 20 * DAY, len(normal))
    codes = normal + c0
    ev.add(CASE, codes, SHIP, B, first, t1, reg[B])
    got = rng.random(len(normal)) < 0.85
    ev.add(CASE, codes[got], RECEIVE, first[got], B[got],
           t1[got] + _uniform_int(rng, 2 * HOUR, 30 * HOUR, int(got.sum())), reg[first[got]])
    t2 = t1 + _uniform_int(rng, 2 * DAY, 8 * DAY, len(normal))
    v = np.flatnonzero(via)
    ev.add(CASE, codes[v], SHIP, sd[v], store[v], t2[v], reg[sd[v]])
    v = v[rng.random(len(v)) < 0.85]
    ev.add(CASE, codes[v], RECEIVE, store[v], sd[v],
           t2[v] + _uniform_int(rng, 2 * HOUR, 30 * HOUR, len(v)), reg[store[v]])
    t_open = np.where(via, t2, t1) + _uniform_int(rng, 36 * HOUR, 12 * DAY, len(normal))
    got = rng.random(len(normal)) < 0.95
    ev.add(CASE, codes[got], OPEN, store[got], -1, t_open[got], reg[store[got]])
    stage.district[normal] = reg[store]
    stage.t0[normal] = t_open
    stage.travel_ok[normal] = True

    def deliver(case: int, sender: int, store_: int, t: int, ship: bool = True) -> None:
        """sender ships (if `ship`) the case to store_ at t; the store receives and opens it."""
        if ship:
            ev.one(CASE, case, SHIP, sender, store_, t, reg[sender])
        if rng.random() < 0.85:
            ev.one(CASE, case, RECEIVE, store_, sender, t + int(rng.integers(2 * HOUR, 30 * HOUR)),
                   reg[store_])
        t_o = t + int(rng.integers(36 * HOUR, 10 * DAY))
        if rng.random() < 0.95:
            ev.one(CASE, case, OPEN, store_, -1, t_o, reg[store_])
        stage.set(case - c0, reg[store_], t_o)

    def onward(case: int, holder: int, t: int) -> None:
        """A distributor that got the case ships it on to one of its own stores."""
        s = _pick_grouped(rng, w.own_stores, np.array([holder]))[0]
        if s >= 0:
            deliver(case, holder, int(s), t + int(rng.integers(2 * DAY, 8 * DAY)))

    def receive_maybe(code_level: int, code: int, receiver: int, sender: int, t: int) -> None:
        if rng.random() < 0.85:
            ev.one(code_level, code, RECEIVE, receiver, sender,
                   t + int(rng.integers(4 * HOUR, 30 * HOUR)), reg[receiver])

    # planted cases
    for local in np.flatnonzero(plan.case_kind[c0:c1] != NORMAL):
        case, kind = int(local + c0), int(plan.case_kind[local + c0])
        b = int(stage.resp[local])
        t = int(avail[local] + rng.integers(DAY, 15 * DAY))
        units = _units_of(plan, case)
        if kind in (KA, KH):
            s = _choice(rng, w.outside_stores[b])
            cross = ev.one(CASE, case, SHIP, b, s, t, reg[b])
            deliver(case, b, s, t, ship=False)
            ans.diverted(units, KIND_LETTER[kind], 0, b, b, cross)
        elif kind == KB:
            d = _choice(rng, w.outside_dists[b])
            cross = ev.one(CASE, case, SHIP, b, d, t, reg[b])
            receive_maybe(CASE, case, d, b, t)
            onward(case, d, t + DAY)
            ans.diverted(units, "b", 0, b, b, cross)
        elif kind == KC:
            s = _choice(rng, w.outside_stores[b])
            cross = ev.one(CASE, case, RECEIVE, s, b, t, reg[s])
            t_o = t + int(rng.integers(DAY, 10 * DAY))
            ev.one(CASE, case, OPEN, s, -1, t_o, reg[s])
            stage.set(local, reg[s], t_o)
            ans.diverted(units, "c", 0, b, b, cross)
        elif kind == KD:
            s = _choice(rng, w.outside_stores[b])
            cross = ev.one(CASE, case, OPEN, s, -1, t, reg[s])
            stage.set(local, reg[s], t)
            ans.diverted(units, "d", 0, b, b, cross)
        elif kind == KE:
            sd_ = int(_pick_grouped(rng, w.subs_of, np.array([b]))[0])
            ev.one(CASE, case, SHIP, b, sd_, t, reg[b])
            receive_maybe(CASE, case, sd_, b, t)
            s = _choice(rng, w.outside_stores[b])
            t2_ = t + int(rng.integers(2 * DAY, 8 * DAY))
            cross = ev.one(CASE, case, SHIP, sd_, s, t2_, reg[sd_])
            deliver(case, sd_, s, t2_, ship=False)
            ans.diverted(units, "e", 0, b, sd_, cross)
        elif kind in (KG_SUSP, KG_CONF):
            r = _choice(rng, w.outside_districts[b])
            m = K - 1 if kind == KG_SUSP else min(len(units), K + int(rng.integers(0, 3)))
            chosen = np.sort(rng.choice(units, m, replace=False))
            cons = w.pick_consumers(rng, np.full(m, r))
            ts = t + _uniform_int(rng, 0, 40 * DAY, m)
            for u, c_, ts_ in zip(chosen, cons, ts):
                cross = ev.one(UNIT, int(u), SCAN, int(c_), -1, int(ts_), r)
                ans.diverted([u], "g", 1 if kind == KG_SUSP else 0, b, b, cross)
        elif kind == REASSIGN:
            f = int(plan.pal_fac[plan.case_pal[case]])
            ev.one(CASE, case, SHIP, b, f, t, reg[b])
            if rng.random() < 0.5:
                ev.one(CASE, case, RECEIVE, f, b, t + int(rng.integers(DAY, 3 * DAY)), reg[f])
            b2 = _choice(rng, w.tops[w.tops != b])
            t2_ = t + int(rng.integers(4 * DAY, 10 * DAY))
            ev.one(CASE, case, SHIP, f, b2, t2_, reg[f])
            receive_maybe(CASE, case, b2, f, t2_)
            onward(case, b2, t2_ + DAY)
            stage.resp[local] = b2
            ans.reassigned.append(units)

    # pallets diverted as a whole (kind f)
    for p in pals[kinds == P_DIVERTED]:
        b = int(plan.pal_dist[p])
        t = int(plan.pal_t0[p] + 2 * DAY + rng.integers(DAY, 10 * DAY))
        cases = np.arange(plan.pal_case0[p], plan.pal_case0[p] + plan.pal_ncases[p])
        to_store = rng.random() < 0.5
        target = _choice(rng, w.outside_stores[b] if to_store else w.outside_dists[b])
        cross = ev.one(PALLET, int(p), SHIP, b, target, t, reg[b])
        receive_maybe(PALLET, int(p), target, b, t)
        for case in cases:
            if to_store:
                t_o = t + int(rng.integers(2 * DAY, 20 * DAY))
                ev.one(CASE, int(case), OPEN, target, -1, t_o, reg[target])
                stage.set(int(case) - c0, reg[target], t_o)
            else:
                onward(int(case), target, t + DAY)
        ans.diverted(np.arange(plan.case_unit0[cases[0]],
                               plan.case_unit0[cases[-1]] + plan.case_nunits[cases[-1]]),
                     "f", 0, b, b, cross)

    # untracked pallets: never shipped by a factory, every unit scanned somewhere
    for p in pals[kinds == P_UNTRACKED]:
        cases = np.arange(plan.pal_case0[p], plan.pal_case0[p] + plan.pal_ncases[p])
        units = np.arange(plan.case_unit0[cases[0]],
                          plan.case_unit0[cases[-1]] + plan.case_nunits[cases[-1]])
        where = w.districts[rng.integers(0, len(w.districts), len(units))]
        ev.add(UNIT, units, SCAN, w.pick_consumers(rng, where), -1,
               plan.pal_t0[p] + _uniform_int(rng, 5 * DAY, 90 * DAY, len(units)), where)
        ans.untracked.append(units)

    _consumer_scans(rng, w, plan, c0, stage, ev, ans)


def _consumer_scans(rng, w: _World, plan: _Plan, c0: int, stage: _Stage, ev: _Events,
                    ans: _Answers) -> None:
    """Consumers scan a fraction of the units of each case that reached a store."""
    local = np.flatnonzero(stage.district >= 0)
    n_u = plan.case_nunits[local + c0]
    rep = np.repeat(np.arange(len(local)), n_u)
    first = np.concatenate([[0], np.cumsum(n_u)[:-1]])
    units = np.repeat(plan.case_unit0[local + c0], n_u) + np.arange(len(rep)) - np.repeat(first, n_u)
    keep = rng.random(len(rep)) < stage.p[local][rep]
    units, rep = units[keep], local[rep[keep]]
    home = stage.district[rep]
    cons = w.pick_consumers(rng, home)
    region = home.copy()
    r = rng.random(len(rep))
    trav = stage.travel_ok[rep] & (r < 0.03)
    region[trav] = w.districts[rng.integers(0, len(w.districts), int(trav.sum()))]
    near = ~trav & (r >= 0.03) & (r < 0.13)
    city = w.region_parent[home[near]]
    region[near] = w.districts[w.city_first[city]
                               + (rng.random(int(near.sum())) * w.city_ndistricts[city]).astype(np.int64)]
    is_travel = trav & ~w.in_territory(stage.resp[rep], region)
    ts = stage.t0[rep] + _uniform_int(rng, 3 * HOUR, 45 * DAY, len(rep))
    ev.add(UNIT, units, SCAN, cons, -1, ts, region, quiet=stage.travel_ok[rep] & ~is_travel)
    ans.travel.append(units[is_travel])


# ---------------------------------------------------------------- tables


def _scan_table(rng, w: _World, a: dict[str, np.ndarray]) -> pa.Table:
    n = len(a["id"])
    party_region = w.region[a["party"]]
    blank_region = (a["region"] == party_region) & (party_region >= 0) & (rng.random(n) < 0.2)
    region = np.where(blank_region, -1, a["region"])
    blank_id = a["quiet"] & (rng.random(n) < 0.05)
    event_id = _format_prefixed(b"EV", a["id"], 10)
    event_id = pc.if_else(pa.array(blank_id), pa.scalar(None, pa.string()), event_id)
    located = ((a["action"] == SCAN) & (rng.random(n) < 0.7)) | (
        (a["action"] == OPEN) & (rng.random(n) < 0.3))
    lat = np.round(w.region_lat[a["region"]] + rng.normal(0, 0.03, n), 5)
    lon = np.round(w.region_lon[a["region"]] + rng.normal(0, 0.03, n), 5)
    return pa.table({
        "event_id": event_id,
        "code": format_codes(a["level"], a["code"]),
        "action": pa.array(ACTIONS).take(pa.array(a["action"])),
        "party_id": _take(w.party_ids, a["party"]),
        "counterparty_id": _take(w.party_ids, a["cp"]),
        "ts": _format_ts(rng, a["ts"]),
        "region_id": _take(w.region_ids, region),
        "lat": pa.array(lat, mask=~located),
        "lon": pa.array(lon, mask=~located),
    }, schema=SCHEMAS["scans"])


def _code_table(w: _World, plan: _Plan, p0: int, p1: int, batches: pa.Array,
                produced: pa.Array) -> pa.Table:
    pals = np.arange(p0, p1)
    c0 = int(plan.pal_case0[p0])
    c1 = int(plan.pal_case0[p1 - 1] + plan.pal_ncases[p1 - 1])
    cases = np.arange(c0, c1)
    b0 = int(plan.case_box0[c0])
    b1 = int(plan.case_box0[c1 - 1] + plan.case_nboxes[c1 - 1])
    u0 = int(plan.case_unit0[c0])
    u1 = int(plan.case_unit0[c1 - 1] + plan.case_nunits[c1 - 1])
    box_case = np.repeat(cases, plan.case_nboxes[c0:c1])
    unit_case = np.repeat(cases, plan.case_nunits[c0:c1])
    units = np.arange(u0, u1)
    upb = w.upb[plan.pal_sku[plan.case_pal[unit_case]]]
    pos = units - plan.case_unit0[unit_case]
    unit_box = np.where(upb > 0, plan.case_box0[unit_case] + pos // np.maximum(upb, 1), -1)
    level = np.concatenate([np.full(len(pals), PALLET), np.full(len(cases), CASE),
                            np.full(b1 - b0, BOX), np.full(len(units), UNIT)])
    idx = np.concatenate([pals, cases, np.arange(b0, b1), units])
    parent_level = np.concatenate([np.full(len(pals), -1), np.full(len(cases), PALLET),
                                   np.full(b1 - b0, CASE), np.where(unit_box >= 0, BOX, CASE)])
    parent_idx = np.concatenate([np.zeros(len(pals), np.int64), plan.case_pal[c0:c1], box_case,
                                 np.where(unit_box >= 0, unit_box, unit_case)])
    pallet = np.concatenate([pals, plan.case_pal[c0:c1], plan.case_pal[box_case],
                             plan.case_pal[unit_case]])
    parent = format_codes(np.maximum(parent_level, 0), parent_idx)
    parent = pc.if_else(pa.array(parent_level < 0), pa.scalar(None, pa.string()), parent)
    return pa.table({
        "code": format_codes(level, idx),
        "level": pa.array(LEVELS).take(pa.array(level)),
        "parent_code": parent,
        "sku": pa.array(w.skus).take(pa.array(plan.pal_sku[pallet])),
        "batch": batches.take(pa.array(pallet)),
        "produced_at": produced.take(pa.array(pallet)),
    }, schema=SCHEMAS["codes"])


def _rows(table: str, rows: list[dict]) -> pa.Table:
    cols = STRING_SCHEMAS[table]
    return pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=SCHEMAS[table])


def _regions_table(w: _World, n_bad: int) -> tuple[pa.Table, dict]:
    parent = _take(w.region_ids, w.region_parent)
    good = pa.table({"region_id": w.region_ids, "name": pa.array(w.region_names),
                     "parent_id": parent}, schema=SCHEMAS["regions"])
    bad = []
    for i in range(n_bad):
        bad.append({"region_id": None, "name": f"Unnamed district {i + 1}", "parent_id": "CN"})
        bad.append({"region_id": f"CN-X{i + 1:02d}", "name": f"Orphan {i + 1}",
                    "parent_id": f"CN-P9{i}"})
    reasons = {"missing_required": n_bad, "unknown_region": n_bad}
    return pa.concat_tables([good, _rows("regions", bad)]), reasons


def _parties_table(w: _World, n_bad: int) -> tuple[pa.Table, dict]:
    n = w.n_registered
    good = pa.table({
        "party_id": w.party_ids.slice(0, n),
        "kind": pa.array(KIND_NAMES).take(pa.array(w.kind[:n])),
        "name": pa.array(w.names),
        "region_id": _take(w.region_ids, w.region[:n]),
        "territory": pa.array(w.territory, pa.string()),
        "upstream_id": _take(w.party_ids, w.upstream[:n]),
        "lat": pa.array(w.lat[:n], mask=np.isnan(w.lat[:n])),
        "lon": pa.array(w.lon[:n], mask=np.isnan(w.lon[:n])),
        "salesperson_id": _take(w.party_ids, _store_salespeople(w.kind[:n], w.upstream[:n])),
    }, schema=SCHEMAS["parties"])
    top = w.party_ids[int(w.tops[0])].as_py()
    bad = []
    for i in range(n_bad):
        bad.append({"party_id": None, "kind": "store", "name": f"Nameless shop {i}",
                    "region_id": w.region_ids[int(w.districts[0])].as_py(), "upstream_id": top})
        bad.append({"party_id": f"W{i + 1:03d}", "kind": "wholesaler", "name": "Grey Market Ltd"})
        bad.append({"party_id": f"S-GHOST-{i + 1:02d}", "kind": "store", "name": "Ghost shop",
                    "region_id": f"CN-P9{i}-C01-D1", "upstream_id": top})
    reasons = {"missing_required": n_bad, "bad_enum": n_bad, "unknown_region": n_bad}
    return pa.concat_tables([good, _rows("parties", bad)]), reasons


def _store_salespeople(kind: np.ndarray, upstream: np.ndarray) -> np.ndarray:
    """Per party, the salesperson serving it (-1 none): a store's is one of those its
    distributor employs, taken in turn by the distributor's stores (a distributor without
    salespeople leaves its stores without one)."""
    out = np.full(len(kind), -1, np.int64)
    staff: dict[int, list[int]] = {}
    for p in np.flatnonzero(kind == SALESPERSON):
        staff.setdefault(int(upstream[p]), []).append(int(p))
    served: dict[int, int] = {}
    for p in np.flatnonzero(kind == STORE):
        team = staff.get(int(upstream[p]))
        if team:
            served[int(upstream[p])] = turn = served.get(int(upstream[p]), -1) + 1
            out[p] = team[turn % len(team)]
    return out


def _products_table(w: _World, n_bad: int) -> tuple[pa.Table, dict]:
    good = pa.table({"sku": pa.array(w.skus), "name": pa.array(w.sku_names),
                     "unit_price": pa.array(w.prices)}, schema=SCHEMAS["products"])
    bad = [{"sku": None, "name": f"Unlabelled sample {i + 1}", "unit_price": 9.9}
           for i in range(n_bad)]
    return pa.concat_tables([good, _rows("products", bad)]), {"missing_required": n_bad}


def _bad_codes(plan: _Plan, w: _World, n_bad: int) -> tuple[pa.Table, dict]:
    base = 9_000_000_000
    rows = []
    sku = w.skus[0]
    for i in range(n_bad):
        x, y = format_codes(np.array([BOX, BOX]), np.array([base + 2 * i, base + 2 * i + 1])).to_pylist()
        rows.append({"code": x, "level": "box", "parent_code": y, "sku": sku, "batch": "CYCLE"})
        rows.append({"code": y, "level": "box", "parent_code": x, "sku": sku, "batch": "CYCLE"})
        inv = format_codes(np.array([CASE]), np.array([base + i])).to_pylist()[0]
        unit = format_codes(np.array([UNIT]), np.array([i])).to_pylist()[0]
        rows.append({"code": inv, "level": "case", "parent_code": unit, "sku": sku})
        rows.append({"code": f"CR{base + i}", "level": "crate", "sku": sku})
        rows.append({"code": None, "level": "unit", "sku": sku})
    reasons = {"cycle": 2 * n_bad, "level": n_bad, "bad_enum": n_bad, "missing_required": n_bad}
    return _rows("codes", rows), reasons


def _bad_scans(rng, w: _World, plan: _Plan, n_bad: int, first_id: int) -> tuple[pa.Table, dict]:
    normal_cases = np.flatnonzero((plan.case_kind == NORMAL)
                                  & (plan.pal_kind[plan.case_pal] == P_NORMAL))[:n_bad]
    rows = []
    registered = w.consumers[: len(w.consumers) - len(w.implicit)]
    eid = first_id
    for i, case in enumerate(normal_cases):
        case = int(case)
        unit = format_codes(np.array([UNIT]), np.array([plan.case_unit0[case]])).to_pylist()[0]
        case_code = format_codes(np.array([CASE]), np.array([case])).to_pylist()[0]
        b = int(plan.pal_dist[plan.case_pal[case]])
        inside = w.region_ids[int(w.region[b])].as_py()
        who = w.party_ids[int(registered[i % len(registered)])].as_py()
        ts = _iso_z(int(plan.pal_t0[plan.case_pal[case]]) + 30 * DAY)
        common = {"code": unit, "action": "scan", "party_id": who, "ts": ts, "region_id": inside}
        variants = [
            ("unknown_code", {"code": f"UN{99_000_000_000 + i}"}),
            ("unknown_party", {"code": case_code, "action": "open", "party_id": f"S-NOBODY-{i + 1:02d}"}),
            ("bad_timestamp", {"ts": ("2024-13-45T25:61:00", "yesterday")[i % 2]}),
            ("bad_enum", {"action": "sell"}),
            ("missing_required", {"code": None}),
            ("unknown_region", {"region_id": f"CN-P9{i}-C99-D9"}),
        ]
        for _, change in variants:
            rows.append({**common, **change, "event_id": f"EVBAD{eid:07d}"})
            eid += 1
    names = ("unknown_code", "unknown_party", "bad_timestamp", "bad_enum", "missing_required",
             "unknown_region")
    return _rows("scans", rows), dict.fromkeys(names, len(normal_cases))


# ---------------------------------------------------------------- referrals


def _referrals(rng, w: _World, plan: _Plan, scale: float, noise: bool, n_bad: int):
    """Attribution forest with 11 planted super users, then noise; answers by construction."""
    order = rng.permutation(w.consumers)
    ptr = 0
    edges: list[tuple[int, int, int, str]] = []  # referrer, referee, ts, channel (parent first)
    tree_of: dict[int, int] = {}

    def link(parent: int, ts: int, channel: str = "share") -> int:
        nonlocal ptr
        child = int(order[ptr])
        ptr += 1
        edges.append((parent, child, ts, channel))
        tree_of[child] = tree_of[parent]
        return child

    def new_root(party: int | None = None) -> int:
        nonlocal ptr
        if party is None:
            party = int(order[ptr])
            ptr += 1
        tree_of[party] = party
        return party

    base = max(12, round(12 * math.sqrt(max(scale, 0.01))))
    step = max(2, base // 6)
    for i in range(11):  # super users: many small branches (no branch reaches 4 descendants)
        root = new_root()
        t_root = int(rng.integers(3 * DAY, 25 * DAY))
        left = base + step * (10 - i)
        while left > 0:
            size = min(left, int(rng.integers(1, 5)))
            child = link(root, t_root + int(rng.integers(0, 30 * DAY)))
            t_c, chain, prev = edges[-1][2], rng.random() < 0.5, child
            for _ in range(size - 1):
                prev = link(prev if chain else child, t_c + int(rng.integers(6 * HOUR, 5 * DAY)))
                t_c = edges[-1][2]
            left -= size
    n_ord = min(max(30, round(60 * scale ** 0.8)), (len(order) - ptr) // 8)
    ordinary: list[tuple[int, int, int]] = []  # root, its latest referee, that referral's ts
    for _ in range(n_ord):
        root = new_root()
        members, times = [root], [int(rng.integers(5 * DAY, 60 * DAY))]
        for _ in range(int(rng.integers(1, 6))):
            j = int(rng.integers(0, len(members)))
            members.append(link(members[j], times[j] + int(rng.integers(6 * HOUR, 6 * DAY))))
            times.append(edges[-1][2])
        last = int(np.argmax(times[1:])) + 1
        ordinary.append((root, members[last], times[last]))
    store_refs = w.stores[rng.random(len(w.stores)) < 0.2]
    sales = np.flatnonzero(w.kind == SALESPERSON)
    for who, channel in [(s, "store") for s in store_refs] + [(s, "salesperson") for s in sales]:
        if len(order) - ptr < 8:
            break
        new_root(int(who))
        t_r = int(rng.integers(5 * DAY, 60 * DAY))
        for _ in range(int(rng.integers(1, 5))):
            link(int(who), t_r + int(rng.integers(0, 20 * DAY)), channel)

    # metrics of the forest: walk edges child-first
    direct: dict[int, int] = {}
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    for parent, child, _, _ in reversed(edges):
        direct[parent] = direct.get(parent, 0) + 1
        size[parent] = size.get(parent, 0) + size.get(child, 0) + 1
        depth[parent] = max(depth.get(parent, 0), depth.get(child, 0) + 1)
    ranked = sorted(size, key=lambda p: (-size[p], p))
    top = [size[p] for p in ranked[:12]]
    assert all(a > b for a, b in zip(top, top[1:])), top
    super_users = [{"party_id": w.party_ids[p].as_py(), "cascade_size": size[p],
                    "direct": direct[p], "cascade_depth": depth[p]} for p in ranked[:10]]

    # noise, each kind unambiguous under the design.md order (self, duplicate, late, cycle)
    rows = list(edges)
    n_noise = (2 + int(math.log10(max(scale, 1.0)))) if noise else 0
    pick = rng.permutation(len(edges))
    referees = [e[1] for e in edges]
    for _ in range(n_noise):  # self-referral of an attributed consumer
        x = referees[int(rng.integers(0, len(referees)))]
        rows.append((x, x, int(rng.integers(5 * DAY, 60 * DAY)), "share"))
    for j in pick[:n_noise]:  # the same pair again, later
        r, e, t, ch = edges[j]
        rows.append((r, e, t + int(rng.integers(HOUR, 10 * DAY)), ch))
    cyc = rng.choice(len(ordinary), 2 * n_noise, replace=False) if n_noise else []
    for j, k in zip(pick[n_noise: 2 * n_noise], cyc[:n_noise]):  # a second, later referrer
        _, e, t, _ = edges[j]
        other = ordinary[int(k)][0]
        if tree_of[other] == tree_of[e]:
            other = ordinary[int(cyc[-1])][0]
        rows.append((other, e, t + int(rng.integers(DAY, 10 * DAY)), "share"))
    for k in cyc[n_noise:]:  # a descendant "refers" its (unattributed) root
        root, x, t = ordinary[int(k)]
        rows.append((x, root, t + int(rng.integers(DAY, 5 * DAY)), "share"))
    noise_counts = dict.fromkeys(("self", "duplicate", "late", "cycle"), n_noise)

    n = len(rows)
    referrer = np.array([r[0] for r in rows], np.int64)
    referee = np.array([r[1] for r in rows], np.int64)
    w.mark_used(referrer)
    w.mark_used(referee)
    has_code = np.array([r[3] == "share" for r in rows]) & (rng.random(n) < 0.3)
    code_idx = np.where(has_code, rng.integers(0, plan.n_units, n), -1)
    table = pa.table({
        "referrer_id": _take(w.party_ids, referrer),
        "referee_id": _take(w.party_ids, referee),
        "ts": _format_ts(rng, np.array([r[2] for r in rows], np.int64)),
        "channel": pa.array([r[3] for r in rows]),
        "code": pc.if_else(pa.array(code_idx < 0), pa.scalar(None, pa.string()),
                           format_codes(UNIT, np.maximum(code_idx, 0))),
    }, schema=SCHEMAS["referrals"])
    a, b = (w.party_ids[referees[i]].as_py() for i in range(2))
    bad = []
    for i in range(n_bad):
        bad.append({"referrer_id": a, "referee_id": None, "ts": "2024-02-01T10:00:00Z",
                    "channel": "share"})
        bad.append({"referrer_id": b, "referee_id": a,
                    "ts": ("not-a-time", "2024-02-30T10:00:00")[i % 2], "channel": "share"})
        bad.append({"referrer_id": b, "referee_id": a, "ts": "2024-02-02T10:00:00+08:00",
                    "channel": "email"})
    reasons = {"missing_required": n_bad, "bad_timestamp": n_bad, "bad_enum": n_bad}
    table = pa.concat_tables([table, _rows("referrals", bad)])
    table = table.take(pa.array(rng.permutation(table.num_rows)))
    return table, super_users, noise_counts, reasons


# ---------------------------------------------------------------- writing


class _Writer:
    """Streams pyarrow tables to `<table>.csv|jsonl|parquet`."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        self.path, self.fmt, self.schema, self.rows = path, fmt, schema, 0
        if fmt == "csv":
            self._w = pa_csv.CSVWriter(str(path), schema)
        elif fmt == "parquet":
            self._w = pq.ParquetWriter(str(path), schema)
        else:
            self._f = path.open("w", encoding="utf-8", newline="\n")

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.cast(self.schema)
        self.rows += table.num_rows
        if self.fmt == "jsonl":
            table.to_pandas().to_json(self._f, orient="records", lines=True, force_ascii=False)
        else:
            self._w.write_table(table)

    def close(self) -> None:
        if self.fmt == "jsonl":
            self._f.close()
        else:
            self._w.close()


def _table_formats(fmt: str, seed: int) -> dict[str, str]:
    if fmt in FORMATS:
        return dict.fromkeys(TABLES, fmt)
    if fmt != "mixed":
        raise ValueError(f"fmt must be one of {FORMATS + ('mixed',)}, not {fmt!r}")
    pick = np.random.default_rng([seed, 20240301]).integers(0, len(FORMATS), len(TABLES))
    return {t: FORMATS[i] for t, i in zip(TABLES, pick)}


def _noisy(rng, table: pa.Table, n_clean: int) -> tuple[pa.Table, int]:
    """Append exact duplicates of some rows (of the first n_clean) and shuffle."""
    blank = np.asarray(table.column("event_id").is_null()) if "event_id" in table.column_names \
        else np.zeros(table.num_rows, bool)
    r = rng.random(n_clean)
    dup = np.flatnonzero((r < 0.004) | (blank[:n_clean] & (r < 0.15)))
    order = np.concatenate([np.arange(table.num_rows), dup])
    return table.take(pa.array(rng.permutation(order))), len(dup)


def generate_dataset(out_dir: Path, *, scale: float = 1.0, seed: int = 0, fmt: str = "csv",
                     noise: bool = True, progress: Callable[[int], None] | None = None) -> dict:
    """Write a canonical dataset with planted answers into out_dir; return a summary.

    fmt: csv | jsonl | parquet | mixed (each table's format drawn from the seed). Files of
    the six tables left in out_dir by an earlier run, in any format, are removed first.
    noise=False leaves out bad rows, duplicate scan rows and referral noise (the planted
    situations, missing receives, blank values and mixed time forms remain).
    progress, when given, is called after each chunk with the scan rows written so far.

    answers.json (and the returned summary) hold: rows written per table, bad_rows and
    bad_reasons (expected reject classes), duplicates (exact repeats of an earlier row),
    expected_accepted = rows - bad_rows - duplicates, implicit_consumers (distinct
    unregistered ids in accepted scans/referrals), one `diversions` item per diverted
    unit (code, severity, responsible, exit_via, crossing_event_id, kind a-h), the
    travel / reassigned / untracked unit codes, the top 10 super users by cascade size
    and the counts of each kind of ignored referral.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in TABLES:
        for f in FORMATS:
            (out_dir / f"{t}.{f}").unlink(missing_ok=True)
    formats = _table_formats(fmt, seed)
    rng = np.random.default_rng(seed)
    n_bad = (2 + int(math.log10(max(scale, 1.0)))) if noise else 0

    world = _build_world(rng, scale)
    plan = _build_plan(rng, world, scale)
    log.info("generating %d pallets, %d cases, %d units", len(plan.pal_sku), len(plan.case_pal),
             plan.n_units)
    rows: dict[str, int] = {}
    bad: dict[str, dict[str, int]] = {}
    dups = dict.fromkeys(TABLES, 0)

    def write_whole(name: str, table: pa.Table) -> None:
        w = _Writer(out_dir / f"{name}.{formats[name]}", formats[name], SCHEMAS[name])
        w.write(table)
        w.close()
        rows[name] = w.rows

    from loaders.plant_analytics import plant  # its own seeded stream: the rest is unchanged

    plants = plant(np.random.default_rng([seed, 6]), world, plan, PLANT_EVENTS)
    for name, builder in (("regions", _regions_table), ("parties", _parties_table),
                          ("products", _products_table)):
        table, reasons = builder(world, n_bad)
        extra = {"regions": plants.regions, "parties": plants.parties}.get(name)
        write_whole(name, table if extra is None else pa.concat_tables([table, extra]))
        bad[name] = reasons

    ref_table, super_users, ref_noise, bad["referrals"] = _referrals(rng, world, plan, scale,
                                                                     noise, n_bad)
    write_whole("referrals", pa.concat_tables([ref_table, plants.referrals]))

    # codes and scans, chunk by chunk
    batches, produced = [], []
    for p in range(len(plan.pal_sku)):
        made = int(plan.pal_t0[p]) - int(rng.integers(DAY, 10 * DAY))
        day = np.datetime64(made + EPOCH_UNIX, "s").astype("datetime64[D]")
        batches.append(f"B{str(day).replace('-', '')[2:]}-{world.skus[plan.pal_sku[p]][3:]}"
                       f"{p % 3 + 1}")
        produced.append(_iso_z(made // HOUR * HOUR))
    batches_a, produced_a = pa.array(batches), pa.array(produced)
    codes_w = _Writer(out_dir / f"codes.{formats['codes']}", formats["codes"], SCHEMAS["codes"])
    scans_w = _Writer(out_dir / f"scans.{formats['scans']}", formats["scans"], SCHEMAS["scans"])
    answers = _Answers([], [], [], [])
    next_id = 1
    carry: pa.Table | None = None
    bad_scans, bad["scans"] = _bad_scans(rng, world, plan, n_bad, 1)
    bad_codes, bad["codes"] = _bad_codes(plan, world, n_bad)
    cum_units = plan.case_unit0[plan.pal_case0] + 0
    bounds = [0]
    while bounds[-1] < len(plan.pal_sku):
        nxt = int(np.searchsorted(cum_units, cum_units[bounds[-1]] + CHUNK_UNITS, side="right"))
        bounds.append(max(nxt, bounds[-1] + 1))
    for i, (p0, p1) in enumerate(zip(bounds, bounds[1:])):
        codes = _code_table(world, plan, p0, p1, batches_a, produced_a)
        if i == 0:
            codes = pa.concat_tables([codes, bad_codes])
        codes_w.write(codes.take(pa.array(rng.permutation(codes.num_rows))))
        ev = _Events(next_id)
        _chunk_events(rng, world, plan, p0, p1, ev, answers)
        next_id = ev.next_id
        scans = _scan_table(rng, world, ev.arrays())
        n_clean = scans.num_rows
        if i == 0:
            scans = pa.concat_tables([scans, bad_scans])
        if noise:
            scans, n_dup = _noisy(rng, scans, n_clean)
            dups["scans"] += n_dup
        else:
            scans = scans.take(pa.array(rng.permutation(scans.num_rows)))
        half = scans.num_rows // 2
        out = scans.slice(0, half) if carry is None else pa.concat_tables([carry, scans.slice(0, half)])
        scans_w.write(out.take(pa.array(rng.permutation(out.num_rows))))
        carry = scans.slice(half)
        if progress:
            progress(scans_w.rows)
    if carry is not None:
        scans_w.write(carry)
    codes_w.write(plants.codes)
    scans_w.write(plants.scans)
    for units, crossing in plants.diverted:
        answers.diverted(units, "a", 0, plants.diverter, plants.diverter, crossing)
    codes_w.close()
    scans_w.close()
    rows["codes"], rows["scans"] = codes_w.rows, scans_w.rows
    if progress:
        progress(scans_w.rows)

    bad_rows = {t: sum(bad.get(t, {}).values()) if noise else 0 for t in TABLES}
    bad_detail = {t: (bad.get(t, {}) if noise else {}) for t in TABLES}
    summary = {
        "scale": scale, "seed": seed, "fmt": fmt, "k": K,
        "formats": formats,
        "rows": {t: rows[t] for t in TABLES},
        "bad_rows": bad_rows,
        "bad_reasons": bad_detail,
        "duplicates": dups,
        "expected_accepted": {t: rows[t] - bad_rows[t] - dups[t] for t in TABLES},
        "implicit_consumers": int(world.used_implicit.sum()) + plants.consumers,
        **plants.answers,
    }
    counts = _write_answers(out_dir / ANSWERS, summary, world, answers, super_users,
                            ref_noise)
    return {**summary, "out_dir": str(out_dir), **counts}


def _write_answers(path: Path, head: dict, w: _World, ans: _Answers, super_users: list,
                   ref_noise: dict) -> dict:
    """Stream answers.json (the diversion list can be large at big scales)."""
    def cat(parts):
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    div = [np.concatenate([p[i] for p in ans.div]) if ans.div else np.zeros(0, np.int64)
           for i in range(6)]
    order = np.argsort(div[0], kind="stable")
    div = [d[order] for d in div]
    assert len(np.unique(div[0])) == len(div[0]), "a unit was planted twice"
    travel, reassigned, untracked = cat(ans.travel), cat(ans.reassigned), cat(ans.untracked)
    with path.open("w", encoding="utf-8") as f:
        f.write("{\n")
        for key, value in head.items():
            f.write(f"{json.dumps(key)}: {json.dumps(value)},\n")
        f.write('"diversions": [')
        step = 100_000
        for s in range(0, len(div[0]), step):
            codes = format_codes(UNIT, div[0][s: s + step]).to_pylist()
            resp = _take(w.party_ids, div[3][s: s + step]).to_pylist()
            exit_via = _take(w.party_ids, div[4][s: s + step]).to_pylist()
            cross = _format_prefixed(b"EV", div[5][s: s + step], 10).to_pylist()
            for j, code in enumerate(codes):
                item = {"code": code, "severity": ("confirmed", "suspected")[div[2][s + j]],
                        "responsible": resp[j], "exit_via": exit_via[j],
                        "crossing_event_id": cross[j], "kind": DIVERSION_KINDS[div[1][s + j]]}
                f.write(("\n  " if s + j == 0 else ",\n  ") + json.dumps(item))
        f.write("\n],\n")
        for key, units in (("travel", travel), ("reassigned", reassigned), ("untracked", untracked)):
            f.write(f'"{key}": ')
            f.write(json.dumps(format_codes(UNIT, units).to_pylist() if len(units) else []))
            f.write(",\n")
        f.write(f'"super_users": {json.dumps(super_users)},\n')
        f.write(f'"referral_noise": {json.dumps(ref_noise)}\n}}\n')
    kinds = np.bincount(div[1], minlength=len(DIVERSION_KINDS))
    return {"diversions": int(len(div[0])), "diversions_by_kind": {
        k: int(n) for k, n in zip(DIVERSION_KINDS, kinds)}, "travel": int(len(travel)),
        "reassigned": int(len(reassigned)), "untracked": int(len(untracked))}
