"""The HTTP API (FastAPI): JSON under /api, browser views under /views, assets under /static.

    app = create_app(Settings(store=Path("channelgraph-data")))
    # channelgraph serve --store channelgraph-data   (uvicorn on 127.0.0.1:8000)

Routers are thin: they validate parameters and ask the `ApiService` (caching over one
store). Every error has one JSON shape, mapped in `api.errors`. The app is read-only
unless the settings carry an API key; then POST /api/datasets loads rows (X-API-Key).
Another module adds its routes by appending its APIRouter to `ROUTERS`.
"""
from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query
from fastapi.responses import HTMLResponse, Response

from api import analytics_routes, views
from api.errors import BodyLimit, install_error_handlers, responses
from api.params import MAX_TEXT, TIME_HELP, BlankFormFields, Limit, Offset, PathId, Text, parse_time
from api.schemas import (
    Cascade,
    DatasetUpload,
    DiversionBy,
    DiversionGroup,
    DiversionGroups,
    FindingsPage,
    FlowResponse,
    Health,
    InfluencerRanking,
    LoadSummary,
    Metric,
    Readiness,
    Severity,
    SortKey,
    UntrackedPage,
)
from api.service import ApiService, DiversionFilters, Svc
from graph.settings import Settings
from graph.store import Store
from queries.diversion import DiversionSummary
from queries.influence import ReferralStats
from queries.trace import TraceResult

JSON = "application/json"
K = Annotated[int | None, Query(ge=1, le=1000,
                                description="Consumer scans per case that confirm a suspected diversion [default 3].")]
Percent = Annotated[float | None, Query(gt=0, le=100, description="Top P% instead of `top`.")]


async def diversion_filters(
    severity: Severity | None = None,
    responsible: Annotated[str | None, Query(max_length=MAX_TEXT, description="Responsible (assigned) distributor id.")] = None,
    region: Annotated[str | None, Query(max_length=MAX_TEXT, description="Crossings into this region or one inside it.")] = None,
    sku: Text = None,
    batch: Text = None,
    since: Annotated[str | None, Query(max_length=100, description=f"Crossings at or after this time ({TIME_HELP}).")] = None,
    until: Annotated[str | None, Query(max_length=100, description=f"Crossings at or before this time ({TIME_HELP}); "
                                                                   "a date alone includes the whole day.")] = None,
) -> DiversionFilters:
    """The findings filters shared by the JSON, CSV and grouped diversion endpoints, and the
    diversions page (which sends the same parameters)."""
    return DiversionFilters(severity=severity, responsible=responsible, region=region, sku=sku, batch=batch,
                            since=parse_time(since, "since"), until=parse_time(until, "until", end_of_day=True))


Filters = Annotated[DiversionFilters, Depends(diversion_filters)]

# ---------------------------------------------------------------- JSON API

api = APIRouter(prefix="/api", tags=["api"])


@api.get("/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    return Health(version=_version())


@api.get("/ready", response_model=Readiness, responses=responses(503), summary="Readiness: the store answers")
def ready(svc: Svc) -> Readiness:
    return Readiness(ready=True, backend=svc.backend, store=svc.store.uri, store_version=svc.version(),
                     counts=svc.counts())


@api.get("/trace/{code:path}", response_model=TraceResult, responses=responses(404, 422),
         summary="Custody path of a code (trace, 物流追溯)")
async def trace_code(code: PathId, svc: Svc, k: K = None) -> Response:
    """Events on the code and on every code it is packed in, the assigned distributor, the
    diversion finding if any, and for a case or pallet a summary of what it holds."""
    return Response(await svc.trace_json_async(code, k), media_type=JSON)


@api.get("/flow", response_model=FlowResponse, responses=responses(404, 422), summary="Aggregated flow of a batch or SKU")
def flow(svc: Svc, batch: Text = None, sku: Text = None) -> FlowResponse:
    """Hand-overs between holders (F -> B -> b -> C) of the units of a batch and/or SKU (all
    units when neither is given), weighted by units."""
    return FlowResponse(batch=batch, sku=sku, edges=svc.flow(batch=batch, sku=sku))


@api.get("/diversions", response_model=FindingsPage, responses=responses(404, 422),
         summary="Diversion findings (窜货), filtered and paginated")
async def diversions(svc: Svc, filters: Filters, k: K = None, sort: SortKey = SortKey.code, offset: Offset = 0,
                     limit: Limit = 100) -> Response:
    """One finding per diverted unit, with its custody path. `sort` is a field name, `-` for
    descending. An unknown `region` is a 404."""
    page = await svc.findings_page_json_async(filters, offset=offset, limit=limit, sort=sort.value, k=k)
    return Response(page, media_type=JSON)


@api.get("/diversions.csv", response_class=Response, responses={**responses(404, 422), 200: {"content": {"text/csv": {}},
         "description": "The findings as CSV (the path as `party > party*`, `*` marking where the goods crossed)"}},
         summary="Diversion findings as a CSV download")
def diversions_csv(svc: Svc, filters: Filters, k: K = None, sort: SortKey = SortKey.code) -> Response:
    return Response(svc.findings_csv(filters, sort.value, k), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="diversions.csv"'})


@api.get("/diversions/groups", response_model=DiversionGroups, responses=responses(404, 422),
         summary="Diversion views: findings grouped (repeat offenders, region pairs, ...)")
def diversion_groups(svc: Svc, filters: Filters, by: DiversionBy = DiversionBy.responsible, k: K = None) -> DiversionGroups:
    rows = svc.diversion_groups(filters, by.value, k)
    return DiversionGroups(by=by, total_units=sum(r["units"] for r in rows),
                           groups=[DiversionGroup(**r) for r in rows])


@api.get("/diversions/summary", response_model=DiversionSummary, responses=responses(422),
         summary="Units judged, diverted by severity, and untracked")
def diversion_summary(svc: Svc, k: K = None) -> DiversionSummary:
    """How the store's units were judged: `judged` have an assignment (a factory shipment to a
    distributor); `untracked` have none and are never judged (DOMAIN.md §3)."""
    return svc.diversion_summary(k)


@api.get("/diversions/untracked", response_model=UntrackedPage, responses=responses(422),
         summary="Untracked units: no assignment, reported but never judged")
def untracked_units(svc: Svc, offset: Offset = 0, limit: Limit = 100) -> UntrackedPage:
    """One row per unit no factory shipped to a distributor (on it or a code it is packed
    in), by code: its events, its last holder and region, its first and last event time."""
    units = svc.untracked()
    return UntrackedPage(total=len(units), offset=offset, limit=limit, items=units[offset:offset + limit])


@api.get("/influencers", response_model=InfluencerRanking, responses=responses(422),
         summary="Super users (超级用户): referrers ranked by a metric")
def influencers(svc: Svc, by: Metric = Metric.influence, top: Annotated[int, Query(ge=1, le=100_000)] = 10,
                percent: Percent = None) -> InfluencerRanking:
    items = svc.influencers(top=None if percent is not None else top, percent=percent, by=by.value)
    return InfluencerRanking(by=by, top=None if percent is not None else top, percent=percent, items=items)


@api.get("/influencers/stats", response_model=ReferralStats, summary="Referral rows: read, attributed, ignored by reason")
def referral_stats(svc: Svc) -> ReferralStats:
    """First-touch attribution of the stored referral rows: self-referrals, repeated pairs,
    referrals of an already attributed referee (late) and cycle-closing ones are ignored
    and counted (DOMAIN.md §4)."""
    return svc.referral_stats()


@api.get("/influencers/{party_id:path}/cascade", response_model=Cascade, responses=responses(404, 422),
         summary="One referrer's cascade (attribution subtree)")
def cascade(party_id: PathId, svc: Svc) -> Cascade:
    nodes = svc.cascade(party_id)
    return Cascade(party_id=party_id, size=len(nodes) - 1, depth=max(n.depth for n in nodes), nodes=nodes)


def require_api_key(svc: Svc, x_api_key: Annotated[str | None, Header(description="The server's API key.")] = None) -> None:
    svc.check_api_key(x_api_key)


@api.post("/datasets", response_model=LoadSummary, dependencies=[Depends(require_api_key)],
          responses=responses(400, 401, 403, 422), summary="Load rows (needs the API key)")
def upload(svc: Svc, body: DatasetUpload) -> LoadSummary:
    """Validate and load rows given per canonical table, like a dataset folder: bad rows are
    rejected with their reason (counted here, written to the rejects file), never dropped."""
    report = svc.load_tables({str(getattr(name, "value", name)): rows for name, rows in body.tables.items()})
    return LoadSummary(**report.as_dict())


# ---------------------------------------------------------------- browser views

pages = APIRouter(include_in_schema=False)


def _html(page: views.Page) -> HTMLResponse:
    return HTMLResponse(page.html, status_code=page.status)


@pages.get("/", response_class=HTMLResponse)
@pages.get("/views", response_class=HTMLResponse)
def index(svc: Svc) -> HTMLResponse:
    return _html(views.index_page(svc))


@pages.get("/views/trace", response_class=HTMLResponse)
def trace_view(svc: Svc, code: Text = None, k: K = None) -> HTMLResponse:
    return _html(views.trace_page(svc, code, k=k))


@pages.get("/views/diversions", response_class=HTMLResponse)
def diversions_view(svc: Svc, filters: Filters, sort: SortKey = SortKey.crossing_ts_desc, k: K = None) -> HTMLResponse:
    return _html(views.diversions_page(svc, filters, sort=sort.value, k=k))


@pages.get("/views/influencers", response_class=HTMLResponse)
def influencers_view(svc: Svc, by: Metric = Metric.influence, top: Annotated[int, Query(ge=1, le=1000)] = 20,
                     percent: Percent = None, user: Text = None) -> HTMLResponse:
    return _html(views.influencers_page(svc, by=by.value, top=top, percent=percent, user=user))


@pages.get("/views/network", response_class=HTMLResponse)
def network_view(svc: Svc, region: Text = None, sku: Text = None, batch: Text = None) -> HTMLResponse:
    return _html(views.network_page(svc, region=region, sku=sku, batch=batch))


@pages.get("/static/{name}")
def static(name: str) -> Response:
    body, media_type = views.asset(name)
    return Response(body, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})


# ---------------------------------------------------------------- the application

ROUTERS: list[APIRouter] = [api, pages, analytics_routes.router]  # another feature adds its router here


def create_app(settings: Settings | None = None, *, store: Store | None = None,
               routers: Sequence[APIRouter] = ROUTERS, cache_ttl: float = 30.0) -> FastAPI:
    """The application over `store`, or over the store `settings` names (opened now, so a
    bad store fails at start-up, and closed at shutdown). At start-up the store's findings
    are judged in the background, so the first diversion pages need not wait."""
    settings = settings or Settings()
    service = ApiService.from_settings(settings, store=store, cache_ttl=cache_ttl)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=service.warm, name="warm-findings", daemon=True).start()
        yield
        service.close()

    app = FastAPI(title="channelgraph", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,  # CDN pages
                  description="Trace codes, find cross-region diversion (窜货) and super users (超级用户) over a "
                              "brand's F -> B -> b -> C channel. Every error answers "
                              '`{"error": {"status", "code", "message"}}`.')
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(BlankFormFields)
    for router in routers:
        app.include_router(router)
    return app


@cache
def _version() -> str:
    try:
        return version("channelgraph")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
        return "0+unknown"

