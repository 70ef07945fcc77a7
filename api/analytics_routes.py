"""HTTP routes of stores, consumers, rebates and regions (DOMAIN.md §5): JSON under /api,
pages under /views. Thin: parameters are validated here, answers come from the queries
through the service's cache (`svc.cached`), pages from `api.analytics_views`."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from api import analytics_views
from api.errors import responses
from api.service import ApiService, Svc
from graph.errors import NotFound
from queries.consumers import (
    STAGES,
    ConsumerLifecycle,
    ConsumerProfile,
    lifecycle,
    profile,
    stage_funnel,
)
from queries.rebates import Policy, RebateReport, load_policy, policy_from, rebates
from queries.regions import RegionReport, region_sell_through
from queries.stores import StoreHealth, store_health

router = APIRouter()
Level = Literal["province", "city", "district"]
AsOf = Annotated[datetime | None, Query(description="Analyse as known at this time (ISO 8601; no offset = UTC) [default: the latest event].")]
ConsumersAsOf = Annotated[datetime | None, Query(
    description="Analyse as known at this time (ISO 8601; no offset = UTC) [default: the latest purchase or referral].")]


class ConsumersPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[ConsumerLifecycle]


class FunnelRow(BaseModel):
    period: str
    as_of: str
    acquired: int
    activated: int
    retained: int
    revenue: int
    related: int
    referral: int


class PolicyBody(BaseModel):
    """A rebate policy, as in a policy file: amounts per scan per role, per SKU (no other keys)."""

    model_config = ConfigDict(extra="forbid")

    currency: str = "CNY"
    default: dict[str, float] = Field(default_factory=dict, examples=[{"store": 2.0, "distributor": 1.0, "salesperson": 0.5}])
    sku: dict[str, dict[str, float]] = Field(default_factory=dict, examples=[{"SKU001": {"store": 5.0}}])


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def configured_policy(svc: ApiService) -> Policy | None:
    """The policy file named by the settings (CHANNELGRAPH_REBATE_POLICY), if any."""
    path = getattr(svc.settings, "rebate_policy", None) if svc.settings else None
    return load_policy(path) if path else None


# ---------------------------------------------------------------- JSON


@router.get("/api/stores", response_model=list[StoreHealth], responses=responses(404, 422), tags=["analytics"],
            summary="Store health: sell-in, sell-out, stock, days of cover, abnormal flags")
def stores(svc: Svc, region: Annotated[str | None, Query(max_length=500)] = None, abnormal: bool = False,
           peer_level: Level = "province", window: Annotated[int, Query(ge=7, le=364)] = 28, as_of: AsOf = None) -> list[StoreHealth]:
    """Every store registered in `region` (or below it), abnormal ones first; `abnormal`
    keeps only flagged stores. Flags name their basis (peers, history, diversion) and reason."""
    return svc.cached(lambda: store_health(svc.store, region=region, abnormal_only=abnormal, as_of=as_of,
                                           window_days=window, peer_level=peer_level, k=svc.k),
                      "api-stores", region, abnormal, peer_level, window, _iso(as_of))


@router.get("/api/consumers", response_model=ConsumersPage, responses=responses(422), tags=["analytics"],
            summary="Consumer lifecycle: AARRR stage, next action, RFM scores and segment")
def consumers(svc: Svc, stage: Literal[STAGES] | None = None,  # type: ignore[valid-type]
              segment: Annotated[str | None, Query(max_length=50)] = None, as_of: ConsumersAsOf = None,
              offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> ConsumersPage:
    items = svc.cached(lambda: lifecycle(svc.store, stage=stage, segment=segment, as_of=as_of),
                       "api-consumers", stage, segment, _iso(as_of))
    return ConsumersPage(total=len(items), offset=offset, limit=limit, items=items[offset:offset + limit])


@router.get("/api/consumers/funnel", response_model=list[FunnelRow], responses=responses(422), tags=["analytics"],
            summary="Consumers per stage at the end of each month or week (a funnel per period)")
def consumer_funnel(svc: Svc, period: Literal["month", "week"] = "month") -> list[dict]:
    return svc.cached(lambda: stage_funnel(svc.store, period=period), "funnel", period)


@router.get("/api/consumers/{party_id}", response_model=ConsumerProfile, responses=responses(404), tags=["analytics"],
            summary="The 360° profile of one consumer")
def consumer_profile(party_id: str, svc: Svc) -> ConsumerProfile:
    return profile(svc.store, party_id)


@router.post("/api/rebates", response_model=RebateReport, responses=responses(400, 422), tags=["analytics"],
             summary="Rebates per consumer scan by the given policy; withheld for diverted units")
def rebates_by_policy(svc: Svc, policy: PolicyBody, month: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}$")] = None,
                      lines: bool = False, as_of: AsOf = None) -> RebateReport:
    rules = policy_from(policy.model_dump(), source="policy")
    return rebates(svc.store, policy=rules, k=svc.k, as_of=as_of, month=month, lines=lines)


@router.get("/api/rebates", response_model=RebateReport, responses=responses(404, 422), tags=["analytics"],
            summary="Rebates by the server's policy file (CHANNELGRAPH_REBATE_POLICY)")
def rebates_configured(svc: Svc, month: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}$")] = None,
                       lines: bool = False, as_of: AsOf = None) -> RebateReport:
    rules = configured_policy(svc)
    if rules is None:
        raise NotFound("no rebate policy is configured (set CHANNELGRAPH_REBATE_POLICY); POST a policy instead")
    return rebates(svc.store, policy=rules, k=svc.k, as_of=as_of, month=month, lines=lines)


@router.get("/api/regions", response_model=RegionReport, responses=responses(422), tags=["analytics"],
            summary="Sell-through per region and period (动销地图) and the region-to-region diversion matrix")
def regions(svc: Svc, level: Level = "province", period: Literal["month", "week", "all"] = "month",
            as_of: AsOf = None) -> RegionReport:
    return svc.cached(lambda: region_sell_through(svc.store, level=level, period=period, k=svc.k, as_of=as_of),
                      "api-regions", level, period, _iso(as_of))


# ---------------------------------------------------------------- pages


def _blank(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


def _html(page) -> HTMLResponse:
    return HTMLResponse(page.html, status_code=page.status)


@router.get("/views/stores", response_class=HTMLResponse, include_in_schema=False)
def stores_view(svc: Svc, region: str | None = None, abnormal: bool = False, peer_level: str = "province",
                as_of: str | None = None) -> HTMLResponse:
    return _html(analytics_views.stores_page(svc, region=_blank(region), abnormal=abnormal,
                                             peer_level=peer_level, as_of=_blank(as_of)))


@router.get("/views/consumers", response_class=HTMLResponse, include_in_schema=False)
def consumers_view(svc: Svc, stage: str | None = None, segment: str | None = None, consumer: str | None = None,
                   period: str = "month") -> HTMLResponse:
    return _html(analytics_views.consumers_page(svc, stage=_blank(stage), segment=_blank(segment),
                                                consumer=_blank(consumer), period=period))


@router.get("/views/rebates", response_class=HTMLResponse, include_in_schema=False)
def rebates_view(svc: Svc, month: str | None = None) -> HTMLResponse:
    return _html(analytics_views.rebates_page(svc, policy=configured_policy(svc), month=_blank(month)))


@router.get("/views/regions", response_class=HTMLResponse, include_in_schema=False)
def regions_view(svc: Svc, level: str = "province", period: str = "month") -> HTMLResponse:
    return _html(analytics_views.regions_page(svc, level=level, period=period))
