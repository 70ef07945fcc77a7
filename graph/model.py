"""The canonical data contract (DOMAIN.md §2): tables, columns, enums, key columns.

Every table is a set of typed columns; `required` columns must be present and non-empty
in each row. Columns not listed here are kept as string properties, except those named as
a column channelgraph computes for the table (`computed`): an input column of such a name
is not loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("factory", "distributor", "store", "consumer", "salesperson")
LEVELS = ("unit", "box", "case", "pallet")  # index = packaging rank; a parent ranks higher
ACTIONS = ("ship", "receive", "open", "scan")  # index = tie-break rank at equal times
CHANNELS = ("share", "store", "salesperson")

LEVEL_RANK = {name: rank for rank, name in enumerate(LEVELS)}
ACTION_RANK = {name: rank for rank, name in enumerate(ACTIONS)}


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "str"  # str | float | ts | enum
    required: bool = False
    values: tuple[str, ...] = ()  # allowed values of an enum column


@dataclass(frozen=True)
class TableSpec:
    name: str
    key: tuple[str, ...]  # identity of a row; () = whole-row content
    columns: tuple[Column, ...] = field(default=())
    computed: tuple[str, ...] = ()  # columns channelgraph derives and stores with the rows

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("regions", ("region_id",), (
            Column("region_id", required=True), Column("name"), Column("parent_id"))),
        TableSpec("products", ("sku",), (
            Column("sku", required=True), Column("name"), Column("unit_price", "float"))),
        TableSpec("parties", ("party_id",), (
            Column("party_id", required=True), Column("kind", "enum", True, KINDS),
            Column("name"), Column("region_id"), Column("territory"), Column("upstream_id"),
            Column("lat", "float"), Column("lon", "float"))),
        TableSpec("codes", ("code",), (
            Column("code", required=True), Column("level", "enum", True, LEVELS),
            Column("parent_code"), Column("sku"), Column("batch"),
            Column("produced_at", "ts")), computed=("parent_idx", "unit_count")),
        TableSpec("scans", ("event_id",), (
            Column("event_id"), Column("code", required=True),
            Column("action", "enum", True, ACTIONS), Column("party_id", required=True),
            Column("counterparty_id"), Column("ts", "ts", True), Column("region_id"),
            Column("lat", "float"), Column("lon", "float")), computed=("code_idx", "event_order", "retracted")),
        TableSpec("referrals", ("referral_id",), (
            Column("referral_id"), Column("referrer_id", required=True),
            Column("referee_id", required=True), Column("ts", "ts", True),
            Column("channel", "enum", False, CHANNELS), Column("code"))),
        TableSpec("tasks", (), (), computed=("task_id",)),  # task_id: a hash of the row's content
        # EPCIS events that are not hand-overs (commissioning, transactions,
        # transformations, sensor reports...): kept whole, never judged.
        TableSpec("epcis_events", ("event_id",), (
            Column("event_id", required=True), Column("event_type", required=True),
            Column("biz_step"), Column("action"), Column("event_time", "ts"), Column("document"))),
        # An EPCIS errorDeclaration: the named event stays stored but no analysis uses it.
        TableSpec("retractions", ("event_id",), (
            Column("event_id", required=True), Column("declared_at", "ts"), Column("reason"),
            Column("corrective_event_ids"))),
    )
}

# Load order: a table may only reference tables loaded before it.
LOAD_ORDER = ("regions", "products", "parties", "codes", "scans", "referrals", "tasks",
              "epcis_events", "retractions")
