"""BbC linked rebates (关联返利) by a policy file, withheld for diverted units (窜货不返利).

Definitions (docs/design.md, "Rebates"): each unit's first consumer scan (a sell-out,
queries/sales.py) earns, per role, the policy amount for its SKU:

- store: the store that handled the unit last before the scan;
- distributor: that store's contracted distributor (its `upstream_id`);
- salesperson: the store's `salesperson_id` column when it has one, else the
  distributor's salesperson when it employs exactly one, else nobody (`unassigned`).

A scan of a unit with a diversion finding (confirmed or suspected) whose crossing came at
or before the scan is `withheld` for every role, with the finding's crossing event. A
scan of a unit no store handled earns nothing (`no_store`, counted, never dropped).

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

import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from graph.errors import ChannelgraphError
from queries.sales import iso_times, sales_facts, text

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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ChannelgraphError(f"{source}: [{where}] {role} = {value!r}: expected an amount >= 0")
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


class RebateReport(BaseModel):
    currency: str
    scans: int  # first consumer scans considered
    no_store: int  # of them, scans of units no store handled (no rebate)
    owed: float
    withheld: float
    unassigned: float
    totals: list[RebateTotal]  # per month, role and party
    withheld_lines: list[RebateLine]  # every withheld line, with the finding behind it
    lines: list[RebateLine] | None = None  # every line, when asked for


def rebates(store, *, policy: Policy, k: int = 3, as_of: datetime | str | None = None,
            month: str | None = None, lines: bool = False) -> RebateReport:
    """Totals and withheld lines of the rebates of every consumer scan (of one `YYYY-MM`
    month if given); every line too with `lines=True`."""
    facts = sales_facts(store, k=k, as_of=as_of)
    sales = facts.sell_out.copy()
    sales["month"] = sales["ts"].dt.strftime("%Y-%m")
    if month is not None:
        sales = sales[sales["month"] == month]
    credited = sales[sales["store"].notna()].reset_index(drop=True)
    stores = facts.parties.reindex(credited["store"]).reset_index(drop=True)
    distributor = stores["upstream_id"]
    skus = credited["sku"].dropna().unique()
    parts = []
    for role, who in (("store", credited["store"]), ("distributor", distributor),
                      ("salesperson", _salespeople(facts.parties, stores, distributor))):
        part = credited[["event_id", "ts", "month", "code", "sku", "consumer", "finding", "severity"]].copy()
        part["role"] = role
        part["party_id"] = who.astype(object).where(who.notna(), None).to_numpy(object)
        part["amount"] = part["sku"].map({sku: policy.amount(sku, role) for sku in skus}).fillna(policy.amount(None, role))
        part["status"] = "owed"
        part.loc[part["party_id"].isna(), "status"] = "unassigned"
        part.loc[part["finding"].notna(), "status"] = "withheld"
        part["order"] = ROLES.index(role)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True).sort_values(["ts", "event_id", "order"], ignore_index=True)
    frame["key"] = frame["party_id"].fillna("")
    for status in STATUSES:
        frame[status] = frame["amount"].where(frame["status"] == status, 0.0)
    grouped = frame.groupby(["month", "role", "key"], sort=True).agg(
        party_id=("party_id", "first"), scans=("event_id", "size"), owed=("owed", "sum"), withheld=("withheld", "sum"))
    totals = [RebateTotal(month=month_, role=role, party_id=text(row.party_id), scans=int(row.scans),
                          owed=round(float(row.owed), 2), withheld=round(float(row.withheld), 2))
              for (month_, role, _), row in zip(grouped.index, grouped.itertuples())]
    return RebateReport(currency=policy.currency, scans=len(sales), no_store=int(sales["store"].isna().sum()),
                        **{status: round(float(frame[status].sum()), 2) for status in STATUSES}, totals=totals,
                        withheld_lines=_lines(frame[frame["status"] == "withheld"]),
                        lines=_lines(frame) if lines else None)


def _lines(frame: pd.DataFrame) -> list[RebateLine]:
    """Rows of the lines frame as models (built without re-validation; missing values None)."""
    lines = frame.assign(ts=iso_times(frame["ts"]))[list(RebateLine.model_fields)]
    lines = lines.astype(object).where(lines.notna(), None)
    return [RebateLine.model_construct(**row) for row in lines.to_dict("records")]


def _salespeople(parties: pd.DataFrame, stores: pd.DataFrame, distributor: pd.Series) -> pd.Series:
    """Per credited scan: the store's salesperson_id, else its distributor's only salesperson."""
    sales = parties[parties["kind"] == "salesperson"]
    counts = sales.groupby("upstream_id").size()
    only = {d: p for p, d in sales["upstream_id"].items() if counts.get(d) == 1}
    fallback = distributor.map(only)
    return stores["salesperson_id"].fillna(fallback) if "salesperson_id" in stores else fallback
