"""Response and request models of the HTTP API that the query modules do not already
define (those come from `queries/`: TraceResult, FlowEdge, DiversionFinding, DiversionSummary,
UntrackedUnit, Influencer, ReferralStats, CascadeNode)."""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

from graph.model import TABLES
from queries.diversion import DiversionFinding, UntrackedUnit
from queries.influence import CascadeNode, Influencer
from queries.trace import FlowEdge

Severity = Literal["confirmed", "suspected"]
TableName = Enum("TableName", {name: name for name in TABLES}, type=str)  # type: ignore[misc]


class DiversionBy(str, Enum):
    responsible = "responsible"
    region_pair = "region-pair"
    case = "case"
    batch = "batch"
    sku = "sku"
    month = "month"


class Metric(str, Enum):
    influence = "influence"
    cascade_size = "cascade_size"
    cascade_depth = "cascade_depth"
    direct = "direct"
    converted = "converted"
    revenue = "revenue"


class SortKey(str, Enum):
    code = "code"
    code_desc = "-code"
    crossing_ts = "crossing_ts"
    crossing_ts_desc = "-crossing_ts"
    responsible = "responsible"
    responsible_desc = "-responsible"
    severity = "severity"
    severity_desc = "-severity"
    crossing_region = "crossing_region"
    crossing_region_desc = "-crossing_region"
    sku = "sku"
    sku_desc = "-sku"
    batch = "batch"
    batch_desc = "-batch"


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str = Field(description="channelgraph version")


class Readiness(BaseModel):
    ready: bool
    backend: Literal["embedded", "neo4j"]
    store: str = Field(description="Store folder or Neo4j URI")
    store_version: str | None = Field(description="Data version: the embedded store's live version, "
                                                   "or the Neo4j store's latest load")
    counts: dict[str, int] = Field(description="Rows held per table")


class FlowResponse(BaseModel):
    batch: str | None
    sku: str | None
    edges: list[FlowEdge] = Field(description="One edge per change of holder, weighted by units; most units first")


class FindingsPage(BaseModel):
    total: int = Field(description="Findings passing the filters, before pagination")
    offset: int
    limit: int
    items: list[DiversionFinding]


class UntrackedPage(BaseModel):
    total: int = Field(description="Untracked units in the store, before pagination")
    offset: int
    limit: int
    items: list[UntrackedUnit] = Field(description="By code")


class DiversionGroup(BaseModel):
    """One row of a grouped diversion view; only the key columns of the grouping are set."""

    rank: int
    responsible: str | None = None
    from_territory: str | None = None
    to_region: str | None = None
    case: str | None = None
    batch: str | None = None
    sku: str | None = None
    month: str | None = None
    units: int
    confirmed: int
    suspected: int
    crossings: int
    first_ts: str
    last_ts: str


class DiversionGroups(BaseModel):
    by: DiversionBy
    total_units: int
    groups: list[DiversionGroup]


class InfluencerRanking(BaseModel):
    by: Metric
    top: int | None
    percent: float | None
    items: list[Influencer]


class Cascade(BaseModel):
    party_id: str
    size: int = Field(description="Members of the cascade, the root excluded")
    depth: int
    nodes: list[CascadeNode] = Field(description="Root first, breadth-first")


class DatasetUpload(BaseModel):
    """Rows per canonical table, as JSON objects with the dataset's column names."""

    tables: dict[TableName, list[dict[str, Any]]] = Field(  # type: ignore[valid-type]
        examples=[{"scans": [{"code": "A1", "action": "scan", "party_id": "wx-1", "ts": "2024-03-01T00:00:00Z"}]}])


class LoadSummary(BaseModel):
    accepted: dict[str, int]
    rejected: dict[str, int]
    duplicates: dict[str, int]
    implicit_consumers: int
    rejects_path: str | None
