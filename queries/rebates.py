"""BbC linked rebates (关联返利) by a policy file, withheld for diverted units (窜货不返利).

Definitions (docs/design.md, "Rebates"): each unit's first consumer scan (a sell-out,
queries/sales.py) earns, per role, the policy amount for its SKU:

- store: the store that handled the unit last before the scan;
- distributor: that store's contracted distributor (its `upstream_id`);
- salesperson: the store's `salesperson_id` column when it has one, else the
  distributor's salesperson when it employs exactly one, else nobody (`unassigned`).

A scan of a unit with a diversion finding (confirmed or suspected) whose crossing came at
or before the scan is `withheld` for every role, with the finding's crossing event. A
scan of a unit no store handled earns nothing (`no_store`, counted, never dropped), and
neither does a scan that a store, distributor, salesperson or factory performed itself (a
store's point-of-sale scan, EPCIS `retail_selling`, is a sell-out but no consumer scan:
`not_consumer`, counted) - else a store would earn rebates by scanning its own stock.

A policy file (TOML; see docs/policy.example.toml)::

    currency = "CNY"
    [default]               # amount per scan per role
    store = 2.0
    distributor = 1.0
    salesperson = 0.5
    [sku.SKU001]            # per-SKU amounts replace the default for the roles given
    store = 5.0
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from graph.errors import ChannelgraphError
from queries.common import trusted_models
from queries.sales import iso_times, sales_facts

ROLES = ("store", "distributor", "salesperson")
STATUSES = ("owed", "withheld", "unassigned")


@dataclass(frozen=True)
class Policy:
    """Rebate amounts per scan: `default[role]`, overridden per SKU by `sku[sku][role]`."""

    currency: str = "CNY"
    default: dict[str, float] = field(default_factory=dict)
    sku: dict[str, dict[str, float]] = field(default_factory=dict)

    def amount(self, sku: str | None, role: str) -> float:
        return self.sku.get(sku or "", {}).get(role, self.default.get(role, 0.0))


def load_policy(path: Path | str) -> Policy:
    """Read and check a policy file; a ChannelgraphError naming the file and the problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ChannelgraphError(f"policy {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ChannelgraphError(f"policy {path}: not valid TOML: {exc}") from exc
    return policy_from(raw, source=str(path))


def policy_from(raw: dict, *, source: str = "policy") -> Policy:
    """A Policy from parsed TOML; unknown keys, unknown roles and negative amounts are errors."""
    unknown = set(raw) - {"currency", "default", "sku"}
    if unknown:
        raise ChannelgraphError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected currency, default, sku")

    def amounts(table: object, where: str) -> dict[str, float]:
        if not isinstance(table, dict):
            raise ChannelgraphError(f"{source}: [{where}] must be a table of role = amount")
        out = {}
        for role, value in table.items():
            if role not in ROLES:
                raise ChannelgraphError(f"{source}: [{where}] role {role!r}: expected one of {', '.join(ROLES)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ChannelgraphError(f"{source}: [{where}] {role} = {value!r}: expected an amount >= 0 (a finite number)")
            out[role] = float(value)
        return out

    skus = raw.get("sku", {})
    if not isinstance(skus, dict):
        raise ChannelgraphError(f"{source}: [sku] must hold one table per SKU")
    currency = raw.get("currency", "CNY")
    if not isinstance(currency, str):
        raise ChannelgraphError(f"{source}: currency must be a string")
    return Policy(currency=currency, default=amounts(raw.get("default", {}), "default"),
                  sku={sku: amounts(t, f"sku.{sku}") for sku, t in skus.items()})


class RebateLine(BaseModel):
    event_id: str
    ts: str
    month: str
    code: str
    sku: str | None
    consumer: str | None
    role: str
    party_id: str | None
    amount: float
    status: str  # owed | withheld | unassigned
    finding: str | None  # crossing event of the diversion that withheld it
    severity: str | None


class RebateTotal(BaseModel):
    month: str
    role: str
    party_id: str | None
    scans: int
    owed: float
    withheld: float
    unassigned: float = 0.0  # the role's amount with nobody to owe it to (party_id empty)


class RebateReport(BaseModel):
    currency: str
    scans: int  # first consumer scans considered
    no_store: int  # of them, scans of units no store handled (no rebate)
    not_consumer: int = 0  # of them, scans of stocked units that a party other than a consumer performed (no rebate)
    owed: float
    withheld: float
    unassigned: float
    totals: list[RebateTotal]  # per month, role and party
    withheld_lines: list[RebateLine]  # every withheld line, with the finding behind it
    lines: list[RebateLine] | None = None  # every line, when asked for
    unscanned_skus: list[str] = []  # SKUs the policy names that no consumer scan in the store has (misspelt?)


def rebates(store, *, policy: Policy, k: int = 3, as_of: datetime | str | None = None,
            month: str | None = None, lines: bool = False) -> RebateReport:
    """Totals and withheld lines of the rebates of every consumer scan (of one `YYYY-MM`
    month if given; any other spelling is a ValueError); every line too with `lines=True`."""
    if month is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
        raise ValueError(f"month {month!r}: expected YYYY-MM, e.g. 2024-03")
    facts = sales_facts(store, k=k, as_of=as_of)
    sales = facts.sell_out  # not copied: the credited scans are `rows` of it
    months = (sales["ts"].dt.year * 12 + sales["ts"].dt.month - 1).to_numpy(np.int64)  # since year 0
    considered = _label(months) == month if month is not None else np.ones(len(sales), bool)
    has_store = sales["store"].notna().to_numpy()
    by_consumer = sales["consumer"].map(facts.parties["kind"]).eq("consumer").to_numpy()
    rows = np.flatnonzero(considered & has_store & by_consumer)
    months, withheld = months[rows], sales["finding"].notna().to_numpy()[rows]
    skus, sku = sales["sku"].cat.categories, sales["sku"].cat.codes.to_numpy()[rows]
    shares = []
    for role, party_of_store in _credited(facts.parties, sales["store"].cat.categories).items():
        position, ids = pd.factorize(party_of_store)
        amounts = np.array([policy.amount(name, role) for name in skus] + [policy.amount(None, role)])
        party = position[sales["store"].cat.codes.to_numpy()[rows]]
        shares.append(_Share(role, party, np.append(np.asarray(ids, object), None),
                             amounts[np.where(sku >= 0, sku, len(skus))],
                             np.where(withheld, STATUSES.index("withheld"), np.where(party < 0, STATUSES.index("unassigned"), 0))))
    totals = []
    for share in shares:
        frame = pd.DataFrame({"month": months, "party": share.party, **{name: share.amount_if(name) for name in STATUSES}})
        per = frame.groupby(["month", "party"], sort=False).agg(
            scans=("owed", "size"), **{name: (name, "sum") for name in STATUSES}).reset_index()
        totals.append(per.assign(month=_label(per["month"].to_numpy()), role=share.role, party_id=share.ids[per["party"]]))
    table = pd.concat(totals, ignore_index=True)
    table = table.assign(key=table["party_id"].fillna("")).sort_values(["month", "role", "key"], ignore_index=True)

    def lines_of(picked: np.ndarray) -> list[RebateLine]:
        """The lines of the credited scans at `picked`, in time order."""
        scans = sales.iloc[rows[picked]]
        order = pc.sort_indices(pa.table({"ts": pa.array(scans["ts"]), "event_id": pa.array(scans["event_id"])}),
                                sort_keys=[("ts", "ascending"), ("event_id", "ascending")]).to_numpy()  # a stable sort
        return _lines(scans.iloc[order], picked[order], months, shares)

    return RebateReport(
        currency=policy.currency, scans=int(considered.sum()), no_store=int((considered & ~has_store).sum()),
        not_consumer=int((considered & has_store & ~by_consumer).sum()),
        **{name: round(sum(float(s.amount_if(name).sum()) for s in shares), 2) for name in STATUSES},
        totals=trusted_models(RebateTotal, {
            "month": table["month"].tolist(), "role": table["role"].tolist(),
            "party_id": table["party_id"].astype(object).where(table["party_id"].notna(), None).tolist(),
            "scans": table["scans"].tolist(), **{name: [round(value, 2) for value in table[name].tolist()]
                                                 for name in STATUSES}}),
        withheld_lines=lines_of(np.flatnonzero(withheld)),
        lines=lines_of(np.arange(len(rows))) if lines else None,
        unscanned_skus=sorted(set(policy.sku) - set(sales["sku"].dropna())))


@dataclass
class _Share:
    """One role's rebate per credited scan."""

    role: str
    party: np.ndarray  # per scan: the credited party's position in `ids`, -1 for nobody
    ids: np.ndarray  # party ids, then None (position -1)
    amount: np.ndarray  # per scan
    status: np.ndarray  # per scan: index in STATUSES

    def amount_if(self, status: str) -> np.ndarray:
        """Per scan, the amount when the scan's line has `status`, else 0."""
        return np.where(self.status == STATUSES.index(status), self.amount, 0.0)


def _credited(parties: pd.DataFrame, stores: pd.Index) -> dict[str, pd.Series]:
    """Per role, the party credited for a scan each of `stores` sold: the store, its contracted
    distributor, and the store's salesperson_id, else its distributor's only salesperson."""
    info = parties.reindex(stores)
    distributor = info["upstream_id"]
    sales = parties[parties["kind"] == "salesperson"]
    counts = sales.groupby("upstream_id").size()
    only = {d: p for p, d in sales["upstream_id"].items() if counts.get(d) == 1}
    salesperson = distributor.map(only)
    if "salesperson_id" in info:
        salesperson = info["salesperson_id"].fillna(salesperson)
    return {"store": pd.Series(stores, index=stores, dtype=object), "distributor": distributor, "salesperson": salesperson}


def _label(months: np.ndarray) -> np.ndarray:
    """`YYYY-MM` of months counted from year 0."""
    unique, inverse = np.unique(months, return_inverse=True)
    return np.array([f"{m // 12:04d}-{m % 12 + 1:02d}" for m in unique.tolist()], object)[inverse]


def _lines(scans: pd.DataFrame, rows: np.ndarray, months: np.ndarray, shares: list[_Share]) -> list[RebateLine]:
    """The lines of the credited scans at `rows` (their sell-outs `scans`): each scan's
    roles in ROLES order."""

    def per_scan(values: pd.Series | list) -> list:
        if isinstance(values, pd.Series):
            values = values.astype(object).where(values.notna(), None)
        return np.repeat(np.asarray(values, object), len(shares)).tolist()

    def per_role(values: list[np.ndarray]) -> list:
        return np.stack([np.asarray(v, object) for v in values], axis=1).ravel().tolist() if len(rows) else []

    statuses = np.array(STATUSES, object)
    return trusted_models(RebateLine, {
        "event_id": per_scan(scans["event_id"]), "ts": per_scan(iso_times(scans["ts"])), "month": per_scan(_label(months[rows])),
        "code": per_scan(scans["code"]), "sku": per_scan(scans["sku"]), "consumer": per_scan(scans["consumer"]),
        "role": per_role([np.full(len(rows), s.role, object) for s in shares]),
        "party_id": per_role([s.ids[s.party[rows]] for s in shares]), "amount": per_role([s.amount[rows] for s in shares]),
        "status": per_role([statuses[s.status[rows]] for s in shares]),
        "finding": per_scan(scans["finding"]), "severity": per_scan(scans["severity"])})
