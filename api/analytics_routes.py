"""HTTP routes of stores, consumers, rebates and regions (DOMAIN.md §5): JSON under /api,
pages under /views. Thin: parameters are validated here, answers come from the queries
through the service's cache (`svc.cached`), pages from `api.analytics_views`."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from api import analytics_views
from api.errors import ApiError, responses
from api.params import TIME_HELP, Limit, Offset, PathId, Text, parse_time
from api.service import ApiService, Svc
from graph.errors import ChannelgraphError, NotFound
from queries.consumers import (
    SEGMENT_NAMES,
    STAGES,
    ConsumerLifecycle,
    ConsumerProfile,
    lifecycle,
    profile,
    stage_funnel,
)
from queries.rebates import Policy, RebateReport, load_policy, policy_from, rebates
from queries.regions import RegionReport, region_sell_through
from queries.sales import LEVELS
from queries.stores import StoreHealth, store_health

router = APIRouter()
Level = Literal[tuple(LEVELS)]  # type: ignore[valid-type]  # country, province, city, district
Stage = Literal[STAGES]  # type: ignore[valid-type]
Segment = Literal[SEGMENT_NAMES]  # type: ignore[valid-type]
Period = Literal["month", "week"]
RegionPeriod = Literal["month", "week", "all"]
Month = Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}$")]
AsOf = Annotated[str | None, Query(max_length=100, description=(
    f"Analyse as known at this time ({TIME_HELP}) [default: the latest event]."))]
ConsumersAsOf = Annotated[str | None, Query(max_length=100, description=(
    f"Analyse as known at this time ({TIME_HELP}) [default: the latest purchase or referral]."))]
POLICY_EXAMPLE = {"currency": "CNY", "default": {"store": 2.0, "distributor": 1.0, "salesperson": 0.5},
                  "sku": {"SKU001": {"store": 5.0}}}


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


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def configured_policy(svc: ApiService) -> Policy | None:
    """The policy file named by the settings (CHANNELGRAPH_REBATE_POLICY), if any."""
    path = getattr(svc.settings, "rebate_policy", None) if svc.settings else None
    return load_policy(path) if path else None


# ---------------------------------------------------------------- JSON


@router.get("/api/stores", response_model=list[StoreHealth], responses=responses(404, 422), tags=["analytics"],
            summary="Store health: sell-in, sell-out, stock, days of cover, abnormal flags")
def stores(svc: Svc, region: Text = None, abnormal: bool = False,
           peer_level: Level = "province", window: Annotated[int, Query(ge=7, le=364)] = 28, as_of: AsOf = None) -> list[StoreHealth]:
    """Every store registered in `region` (or below it), abnormal ones first; `abnormal`
    keeps only flagged stores. Flags name their basis (peers, history, diversion) and reason.
    Peers are the stores of the same region at `peer_level` (country: all stores of the country)."""
    moment = parse_time(as_of, "as_of")
    return svc.cached(lambda: store_health(svc.store, region=region, abnormal_only=abnormal, as_of=moment,
                                           window_days=window, peer_level=peer_level, k=svc.k),
                      "api-stores", region, abnormal, peer_level, window, _iso(moment))


@router.get("/api/consumers", response_model=ConsumersPage, responses=responses(422), tags=["analytics"],
            summary="Consumer lifecycle: AARRR stage, next action, RFM scores and segment")
def consumers(svc: Svc, stage: Stage | None = None, segment: Segment | None = None, as_of: ConsumersAsOf = None,
              offset: Offset = 0, limit: Limit = 1000) -> ConsumersPage:
    moment = parse_time(as_of, "as_of")
    items = svc.cached(lambda: lifecycle(svc.store, stage=stage, segment=segment, as_of=moment),
                       "api-consumers", stage, segment, _iso(moment))
    return ConsumersPage(total=len(items), offset=offset, limit=limit, items=items[offset:offset + limit])


@router.get("/api/consumers/funnel", response_model=list[FunnelRow], responses=responses(422), tags=["analytics"],
            summary="Consumers per stage at the end of each month or week (a funnel per period)")
def consumer_funnel(svc: Svc, period: Period = "month", as_of: ConsumersAsOf = None) -> list[dict]:
    moment = parse_time(as_of, "as_of")
    return svc.cached(lambda: stage_funnel(svc.store, period=period, as_of=moment), "funnel", period, _iso(moment))


@router.get("/api/consumers/{party_id:path}", response_model=ConsumerProfile, responses=responses(404, 422),
            tags=["analytics"], summary="The 360° profile of one consumer")
def consumer_profile(party_id: PathId, svc: Svc) -> ConsumerProfile:
    return profile(svc.store, party_id)


@router.post("/api/rebates", response_model=RebateReport, responses=responses(422), tags=["analytics"],
             summary="Rebates per consumer scan by the given policy; withheld for diverted units")
def rebates_by_policy(svc: Svc, policy: Annotated[dict[str, Any], Body(
        description="A rebate policy as in a policy file (docs/policy.example.toml), as JSON: `currency`, `default` "
                    "amounts per scan for store, distributor and salesperson, and `sku` tables overriding them per SKU. "
                    "Amounts are numbers >= 0; unknown keys and roles are errors (422).", examples=[POLICY_EXAMPLE])],
                      month: Month = None, lines: bool = False, as_of: AsOf = None) -> RebateReport:
    try:
        rules = policy_from(policy, source="request body")
    except ChannelgraphError as exc:  # checked like a policy file, but it is a parameter of this request
        raise ApiError(422, "invalid_parameter", str(exc)) from exc
    return rebates(svc.store, policy=rules, k=svc.k, as_of=parse_time(as_of, "as_of"), month=month, lines=lines)


@router.get("/api/rebates", response_model=RebateReport, responses=responses(404, 422), tags=["analytics"],
            summary="Rebates by the server's policy file (CHANNELGRAPH_REBATE_POLICY)")
def rebates_configured(svc: Svc, month: Month = None, lines: bool = False, as_of: AsOf = None) -> RebateReport:
    rules = configured_policy(svc)
    if rules is None:
        raise NotFound("no rebate policy is configured (set CHANNELGRAPH_REBATE_POLICY); POST a policy instead")
    return rebates(svc.store, policy=rules, k=svc.k, as_of=parse_time(as_of, "as_of"), month=month, lines=lines)


@router.get("/api/regions", response_model=RegionReport, responses=responses(422), tags=["analytics"],
            summary="Sell-through per region and period (动销地图) and the region-to-region diversion matrix")
def regions(svc: Svc, level: Level = "province", period: RegionPeriod = "month",
            as_of: AsOf = None) -> RegionReport:
    """Regions at `level` (country, province, city or district); a region above it counts as itself."""
    moment = parse_time(as_of, "as_of")
    return svc.cached(lambda: region_sell_through(svc.store, level=level, period=period, k=svc.k, as_of=moment),
                      "api-regions", level, period, _iso(moment))


# ---------------------------------------------------------------- pages


def _html(page) -> HTMLResponse:
    return HTMLResponse(page.html, status_code=page.status)


@router.get("/views/stores", response_class=HTMLResponse, include_in_schema=False)
def stores_view(svc: Svc, region: Text = None, abnormal: bool = False,
                peer_level: Level = "province", as_of: AsOf = None) -> HTMLResponse:
    return _html(analytics_views.stores_page(svc, region=region, abnormal=abnormal, peer_level=peer_level,
                                             as_of=parse_time(as_of, "as_of")))


@router.get("/views/consumers", response_class=HTMLResponse, include_in_schema=False)
def consumers_view(svc: Svc, stage: Stage | None = None, segment: Segment | None = None,
                   consumer: Text = None, period: Period = "month") -> HTMLResponse:
    return _html(analytics_views.consumers_page(svc, stage=stage, segment=segment, consumer=consumer, period=period))


@router.get("/views/rebates", response_class=HTMLResponse, include_in_schema=False)
def rebates_view(svc: Svc, month: Month = None) -> HTMLResponse:
    return _html(analytics_views.rebates_page(svc, policy=configured_policy(svc), month=month))


@router.get("/views/regions", response_class=HTMLResponse, include_in_schema=False)
def regions_view(svc: Svc, level: Level = "province", period: RegionPeriod = "month") -> HTMLResponse:
    return _html(analytics_views.regions_page(svc, level=level, period=period))
