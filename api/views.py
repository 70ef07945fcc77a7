"""Browser views of the flow as graphs: trace, diversions, super users, network.

Each view is one HTML page drawn with vis-network, the library pyvis ships: the API
serves it (assets under /static, taken from pyvis's installed package data and
`api/static/`), and the same page can be written as a standalone file with every script
and style inline. No CDN, no Bootstrap, nothing fetched from anywhere else.

Graphs are built here in Python (nodes shaped and coloured by kind, positions computed
by a layered or tree layout, physics off), so big graphs draw at once. At most
`MAX_NODES` nodes are drawn: consumers are grouped per seller first, then the busiest
nodes are kept, and the page says what was aggregated or left out.

Another module's pages reuse this machinery: `render("its.html", ...)` with a template that
extends base.html (its graphs go in `data["graphs"]`, drawn by views.js), and a link in `NAV`.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape

from graph.errors import ChannelgraphError, NotFound

if TYPE_CHECKING:
    from api.service import ApiService, DiversionFilters
    from graph.store import Store
    from queries.diversion import DiversionFinding, Hop
    from queries.influence import CascadeNode
    from queries.trace import FlowEdge

MAX_NODES = 2000  # drawn per graph
GROUP_CONSUMERS_ABOVE = 150  # flow graphs with more nodes draw consumers as one group per seller
MAX_FINDINGS = 1000  # listed (with their path graphs) on the diversions page
MAX_CASCADES = 10  # cascades embedded in an exported super-user page
LABEL_LIMIT = 300  # above this many edges, edges carry no text label (hover still shows it)
# The page header's links; another module with pages appends its own (href, label).
NAV: list[tuple[str, str]] = [("/views/trace", "Trace"), ("/views/diversions", "Diversions"),
                              ("/views/influencers", "Super users"), ("/views/network", "Network")]

# Shape and colour per kind; `column` orders the layered F -> B -> b -> C layout.
STYLES: dict[str, dict[str, Any]] = {
    "factory": {"shape": "box", "color": "#1f4e79", "font": "#ffffff", "column": 0, "legend": "factory (F)"},
    "distributor": {"shape": "diamond", "color": "#e67e22", "column": 1, "legend": "distributor (B)"},
    "sub-distributor": {"shape": "diamond", "color": "#f5b041", "column": 2, "legend": "sub-distributor"},
    "store": {"shape": "triangle", "color": "#27ae60", "column": 3, "legend": "store (b)"},
    "salesperson": {"shape": "star", "color": "#16a085", "column": 3, "legend": "salesperson"},
    "consumer": {"shape": "dot", "color": "#8e44ad", "column": 4, "legend": "consumer (C)"},
    "consumers": {"shape": "hexagon", "color": "#c39bd3", "column": 4, "legend": "consumers, grouped"},
    "territory": {"shape": "box", "color": "#2874a6", "font": "#ffffff", "column": 0, "legend": "territory"},
    "region": {"shape": "ellipse", "color": "#aed6f1", "column": 1, "legend": "region"},
    "unknown": {"shape": "ellipse", "color": "#95a5a6", "column": 5, "legend": "unknown party"},
}
CROSSED = "#e74c3c"

_HERE = Path(__file__).parent


# ---------------------------------------------------------------- assets


def _pyvis_lib() -> Path:
    return Path(str(resources.files("pyvis"))) / "lib" / "vis-9.1.2"


ASSETS: dict[str, tuple[Path, str]] = {
    "vis-network.min.js": (_pyvis_lib() / "vis-network.min.js", "text/javascript; charset=utf-8"),
    "vis-network.min.css": (_pyvis_lib() / "vis-network.css", "text/css; charset=utf-8"),
    "views.js": (_HERE / "static" / "views.js", "text/javascript; charset=utf-8"),
    "views.css": (_HERE / "static" / "views.css", "text/css; charset=utf-8"),
}


@cache
def asset(name: str) -> tuple[bytes, str]:
    """The bytes and media type of a static asset; NotFound for any other name."""
    if name not in ASSETS:
        raise NotFound(f"no static file {name!r}")
    path, media_type = ASSETS[name]
    return path.read_bytes(), media_type


def _inline_assets() -> dict[str, str]:
    texts = {name: asset(name)[0].decode("utf-8") for name in ASSETS}
    for name, text in texts.items():
        if "</script" in text.lower() or "</style" in text.lower():  # pragma: no cover - guards the inlining
            raise ChannelgraphError(f"{name} cannot be inlined")
    return texts


@cache
def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(_HERE / "templates")), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else (f"{v:,.2f}" if isinstance(v, float) else v)
    return env


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass
class Page:
    html: str
    status: int = 200
    error: str | None = None  # what the page says went wrong (status 404 or 422)


def render(template: str, *, title: str, data: dict, inline: bool, source: str, notes: Sequence[str] = (),
           error: str | None = None, status: int = 200, **context: Any) -> Page:
    """Render a view template. `inline=True` gives a standalone file (every asset inline)."""
    payload = {"styles": {k: {kk: vv for kk, vv in v.items() if kk != "column"} for k, v in STYLES.items()},
               "crossed": CROSSED, **data}
    text = _environment().get_template(template).render(
        title=title, inline=inline, assets=_inline_assets() if inline else None, static="/static",
        data_json=_json_for_script(payload), notes=list(notes), error=error, source=source,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), nav=NAV, styles=STYLES,
        max_nodes=MAX_NODES, **context)
    return Page(text, status, error)


# ---------------------------------------------------------------- graphs


@dataclass
class Graph:
    """vis-network data under construction: nodes by id (insertion order kept), edges."""

    nodes: dict[str, dict] = field(default_factory=dict)
    edges: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_nodes: int | None = None
    total_edges: int | None = None

    def node(self, node_id: str, kind: str | None, *, label: str | None = None, title: str = "", **extra: Any) -> dict:
        if node_id not in self.nodes:
            kind = kind if kind in STYLES else "unknown"
            self.nodes[node_id] = {"id": node_id, "label": label if label is not None else node_id, "kind": kind,
                                   "title": title or node_id, **extra}
        return self.nodes[node_id]

    def as_dict(self) -> dict:
        edges = self.edges
        if len(edges) > LABEL_LIMIT:
            edges = [{k: v for k, v in e.items() if k != "label"} for e in edges]
        for i, edge in enumerate(edges):
            edge.setdefault("id", f"e{i}")
        return {"nodes": list(self.nodes.values()), "edges": edges, "notes": self.notes,
                "stats": {"nodes": len(self.nodes), "edges": len(edges),
                          "nodes_total": self.total_nodes if self.total_nodes is not None else len(self.nodes),
                          "edges_total": self.total_edges if self.total_edges is not None else len(edges)},
                "big": len(self.nodes) > 300}


def short_label(node_id: str, limit: int = 12) -> str:
    """A label that fits under a node; the full id stays in the hover title."""
    return node_id if len(node_id) <= limit else node_id[: limit - 1] + "…"


def party_title(party_id: str, info: dict | None, kind: str | None = None) -> str:
    info = info or {}
    lines = [f"{party_id} — {info.get('kind') or kind or 'unknown party'}"]
    if info.get("name"):
        lines.append(str(info["name"]))
    if info.get("region_id"):
        lines.append(f"registered region: {info['region_id']}")
    if info.get("territory"):
        lines.append(f"territory: {info['territory'].replace('|', ', ')}")
    if info.get("upstream_id"):
        lines.append(f"upstream: {info['upstream_id']}")
    return "\n".join(lines)


def short_time(ts: str | None) -> str:
    """`2024-02-01T08:00:00Z` -> `2024-02-01 08:00` (UTC)."""
    if not ts:
        return ""
    return ts[:16].replace("T", " ")


def custody_graph(hops: Sequence[Hop], parties: dict[str, dict]) -> Graph:
    """The custody path of one unit as a graph: a node per party, an edge per hand-over
    (ship, receive, open or scan by a new holder) labelled with its time; the hop that
    crossed out of the territory is red. A gap in the record is a dashed edge."""
    graph = Graph()
    pairs: dict[tuple[str, str], dict] = {}
    holder: str | None = None

    def add(src: str, dst: str, hop: Hop | None, *, gap: bool = False) -> None:
        for who in (src, dst):
            info = parties.get(who)
            kind = (info or {}).get("kind") or (hop.kind if hop and who == hop.party_id else None)
            graph.node(who, kind, title=party_title(who, info, kind))
        edge = pairs.get((src, dst))
        if edge is None:
            edge = {"from": src, "to": dst, "label": "", "title": "", "hops": []}
            if gap:
                edge.update(dashes=True, label="unrecorded", title=f"{src} → {dst}: hand-over not recorded")
            pairs[(src, dst)] = edge
            graph.edges.append(edge)
        if hop is not None:
            edge["hops"].append(hop.event_id)
            line = (f"{hop.ts}  {hop.action} {hop.event_id} on {hop.code}: {hop.party_id or '?'}"
                    f" at {hop.region_id or '?'}" + (f" {'←' if hop.action == 'receive' else '→'} {hop.counterparty_id}" if hop.counterparty_id else "")
                    + (f" (goods now in {hop.to_region_id})" if hop.to_region_id else ""))
            if hop.crossed:
                line += "\n  ⚠ CROSSED out of the assigned territory"
                edge["crossed"] = True
            edge["title"] = (edge["title"] + "\n" + line).strip()
            if not edge["label"] or edge.get("dashes"):
                edge["label"] = short_time(hop.ts)
                edge.pop("dashes", None)
            if hop.crossed and not edge["label"].startswith("⚠"):
                edge["label"] = "⚠ " + edge["label"]

    for hop in hops:
        party, counterparty = hop.party_id, hop.counterparty_id
        if hop.action == "ship" and party and counterparty:
            if holder and holder != party:
                add(holder, party, None, gap=True)
            add(party, counterparty, hop)
            holder = counterparty
        elif party:
            source = holder if holder and holder != party else (counterparty if hop.action == "receive" else None)
            if source and source != party:
                add(source, party, hop)
            else:
                info = parties.get(party)
                graph.node(party, (info or {}).get("kind") or hop.kind, title=party_title(party, info, hop.kind))
                if hop.crossed:
                    graph.nodes[party]["crossed"] = True
            holder = party
    for edge in graph.edges:
        edge["width"] = 3 if edge.get("crossed") else 1.5
    layered(graph)
    return graph


def layered(graph: Graph, weight: dict[str, float] | None = None) -> None:
    """Positions in columns F -> B -> (sub-B) -> b -> C, ordered within a column by the
    mean position of their suppliers; a tall column wraps into a grid."""
    incoming: dict[str, list[str]] = defaultdict(list)
    for edge in graph.edges:
        incoming[edge["to"]].append(edge["from"])
    columns: dict[int, list[str]] = defaultdict(list)
    for node_id, node in graph.nodes.items():
        kind = node["kind"]
        if kind == "distributor" and incoming[node_id] and all(
                graph.nodes[s]["kind"] == "distributor" for s in incoming[node_id] if s in graph.nodes):
            kind = "sub-distributor"
            node["kind"] = kind
        columns[STYLES.get(kind, STYLES["unknown"]).get("column", 5)].append(node_id)
    weight = weight or {}
    rank: dict[str, float] = {}
    x = 0.0
    for column in sorted(columns):
        ids = columns[column]

        def place(node_id: str) -> tuple[float, float, str]:
            ups = [rank[s] for s in incoming[node_id] if s in rank]
            return (sum(ups) / len(ups) if ups else -1.0, -weight.get(node_id, 0.0), node_id)

        ids.sort(key=place)
        n = len(ids)
        rows = n if n <= 40 else math.ceil(math.sqrt(n * 2.5))
        gap_y = 90 if n <= 12 else (60 if n <= 40 else 45)
        sub_columns = math.ceil(n / rows)
        for i, node_id in enumerate(ids):
            row, sub = i % rows, i // rows
            graph.nodes[node_id]["x"] = round(x + sub * 110)
            graph.nodes[node_id]["y"] = round((row - (min(rows, n) - 1) / 2) * gap_y)
            rank[node_id] = i / max(n - 1, 1)
        x += (sub_columns - 1) * 110 + 300


def tree_layout(graph: Graph, root: str, parent: dict[str, str | None]) -> None:
    """Left-to-right tree: depth across, leaves one under another in depth-first order,
    parents centred on their children (fits a tall panel and keeps labels apart)."""
    children: dict[str, list[str]] = defaultdict(list)
    for node_id in graph.nodes:
        p = parent.get(node_id)
        if p is not None and p in graph.nodes:
            children[p].append(node_id)
    xs: dict[str, float] = {}
    depth = {root: 0}
    next_leaf = 0.0
    stack: list[tuple[str, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep cascades must not hit the recursion limit
        node_id, done = stack.pop()
        kids = children.get(node_id, [])
        if done or not kids:
            if kids:
                xs[node_id] = sum(xs[c] for c in kids) / len(kids)
            else:
                xs[node_id], next_leaf = next_leaf, next_leaf + 1
            continue
        stack.append((node_id, True))
        for child in reversed(kids):
            depth[child] = depth[node_id] + 1
            stack.append((child, False))
    for node_id, node in graph.nodes.items():
        node["x"] = depth.get(node_id, 0) * 240
        node["y"] = round(xs.get(node_id, next_leaf) * 48)


def _width(units: float, most: float) -> float:
    return round(1 + 11 * math.sqrt(units / most), 2) if most > 0 else 1


def flow_graph(edges: Sequence[FlowEdge], parties: dict[str, dict], *, max_nodes: int = MAX_NODES,
               group_above: int = GROUP_CONSUMERS_ABOVE) -> Graph:
    """The aggregated custody flow F -> B -> b -> C; edge width by units. Over `group_above`
    nodes, consumers are grouped per seller; over `max_nodes`, only the busiest are drawn."""
    kinds: dict[str, str | None] = {}
    for e in edges:
        kinds.setdefault(e.source, e.source_kind)
        kinds.setdefault(e.target, e.target_kind)
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    for e in edges:
        pairs[(e.source, e.target)] += e.units
    notes: list[str] = []
    total_nodes, total_edges = len(kinds), len(pairs)
    groups: dict[str, list[str]] = {}
    if len(kinds) > group_above:
        seller: dict[str, tuple[int, str]] = {}
        for (src, dst), units in pairs.items():
            if kinds.get(dst) == "consumer" and (dst not in seller or units > seller[dst][0]):
                seller[dst] = (units, src)
        group_of = {c: f"consumers of {s}" for c, (_, s) in seller.items()}
        for consumer, group in group_of.items():
            groups.setdefault(group, []).append(consumer)
        merged: dict[tuple[str, str], int] = defaultdict(int)
        for (src, dst), units in pairs.items():
            merged[(group_of.get(src, src), group_of.get(dst, dst))] += units
        pairs = {k: v for k, v in merged.items() if k[0] != k[1]}
        for group in groups:
            kinds[group] = "consumers"
        for consumer in group_of:
            kinds.pop(consumer, None)
        notes.append(f"Aggregated: {len(group_of):,} consumers are drawn as {len(groups):,} groups, one per seller.")
    through: dict[str, int] = defaultdict(int)
    for (src, dst), units in pairs.items():
        through[src] += units
        through[dst] += units
    if len(kinds) > max_nodes:
        keep = set(sorted(kinds, key=lambda n: (-through[n], n))[:max_nodes])
        before = len(kinds)
        pairs = {k: v for k, v in pairs.items() if k[0] in keep and k[1] in keep}
        kinds = {n: k for n, k in kinds.items() if n in keep}
        notes.append(f"Capped: drawing the {len(kinds):,} busiest of {before:,} nodes ({len(pairs):,} of "
                     f"{total_edges:,} edges); narrow by region, SKU or batch to see the rest.")
    graph = Graph(notes=notes, total_nodes=total_nodes, total_edges=total_edges)
    most = max(pairs.values(), default=0)
    for node_id, kind in kinds.items():
        if node_id in groups:
            members = groups[node_id]
            graph.node(node_id, "consumers", label=f"{len(members):,} consumer{'s' if len(members) != 1 else ''}",
                       title=f"{len(members):,} consumers supplied by {node_id[len('consumers of '):]}\n"
                             + ", ".join(sorted(members)[:12]) + (" …" if len(members) > 12 else ""),
                       value=len(members))
        else:
            graph.node(node_id, kind, label=short_label(node_id),
                       title=party_title(node_id, parties.get(node_id), kind) + f"\nunits through: {through[node_id]:,}")
    for (src, dst), units in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
        graph.edges.append({"from": src, "to": dst, "label": f"{units:,}", "units": units,
                            "title": f"{src} → {dst}: {units:,} units", "width": _width(units, most)})
    layered(graph, weight={n: float(v) for n, v in through.items()})
    return graph


def region_flow_graph(groups: Sequence[dict], names: dict[str, str], *, max_nodes: int = MAX_NODES) -> Graph:
    """Diverted units from each responsible territory to the region they crossed into;
    edge width by units. Territories on the left, destination regions on the right."""
    rows = sorted(groups, key=lambda r: (-r["units"], str(r.get("from_territory")), str(r.get("to_region"))))
    graph = Graph(total_edges=len(rows))
    sources = {str(r.get("from_territory") or "?") for r in rows}
    targets = {str(r.get("to_region") or "?") for r in rows}
    graph.total_nodes = len(sources | targets)
    kept: list[dict] = []
    seen: set[str] = set()
    for row in rows:
        ends = {str(row.get("from_territory") or "?"), str(row.get("to_region") or "?")}
        if len(seen | ends) > max_nodes:
            continue
        seen |= ends
        kept.append(row)
    if len(kept) < len(rows):
        graph.notes.append(f"Capped: drawing {len(kept):,} of {len(rows):,} region pairs (the largest), "
                           f"{len(seen):,} of {graph.total_nodes:,} regions.")
    most = max((r["units"] for r in kept), default=0)
    for row in kept:
        src, dst = str(row.get("from_territory") or "?"), str(row.get("to_region") or "?")
        label = " | ".join(names.get(p, p) for p in src.split("|"))
        graph.node(src, "territory", label=label, title=f"territory {src}: {label}")
        graph.node(dst, "region", label=names.get(dst, dst), title=f"region {dst}: {names.get(dst, dst)}")
        graph.edges.append({
            "from": src, "to": dst, "label": f"{row['units']:,} unit{'s' if row['units'] != 1 else ''}", "units": row["units"],
            "width": _width(row["units"], most), "crossed": True,
            "title": (f"{src} → {dst}: {row['units']:,} diverted units ({row['confirmed']} confirmed, "
                      f"{row['suspected']} suspected) in {row['crossings']} crossings\n"
                      f"{row['first_ts']} … {row['last_ts']}")})
    left = [n for n in graph.nodes if graph.nodes[n]["kind"] == "territory"]
    right = [n for n in graph.nodes if n not in left]
    for column, ids in enumerate((left, right)):
        for i, node_id in enumerate(ids):
            graph.nodes[node_id]["x"] = column * 500
            graph.nodes[node_id]["y"] = round((i - (len(ids) - 1) / 2) * (45 if len(ids) < 60 else 28))
    return graph


def cascade_graph(nodes: Sequence[CascadeNode], *, max_nodes: int = MAX_NODES) -> Graph:
    """A referral cascade as a tree (root first, on the left); edges labelled with the time
    of the referral in small trees."""
    graph = Graph(total_nodes=len(nodes), total_edges=max(len(nodes) - 1, 0))
    shown = list(nodes[:max_nodes])
    if len(shown) < len(nodes):
        graph.notes.append(f"Capped: drawing the first {len(shown):,} of {len(nodes):,} cascade members "
                           f"(breadth-first, so the upper levels are complete).")
    parent: dict[str, str | None] = {}
    for member in shown:
        title = (f"{member.party_id} — {member.kind or 'unknown'}\ndepth {member.depth}"
                 + (f"\nreferred by {member.referrer_id} at {member.ts}" if member.referrer_id else "\ncascade root")
                 + f"\npurchases after referral: {member.purchases}\nrevenue: {member.revenue:,.2f}")
        graph.node(member.party_id, member.kind, label=short_label(member.party_id), title=title,
                   **({"root": True} if member.depth == 0 else {}))
        parent[member.party_id] = member.referrer_id
        if member.referrer_id and member.referrer_id in graph.nodes:
            graph.edges.append({"from": member.referrer_id, "to": member.party_id,
                                "label": short_time(member.ts)[:10] if len(shown) <= 30 else "",
                                "title": f"{member.referrer_id} referred {member.party_id} at {member.ts}"})
    if shown:
        tree_layout(graph, shown[0].party_id, parent)
    return graph


# ---------------------------------------------------------------- pages


def trace_page(svc: ApiService, code: str | None, *, k: int | None = None, inline: bool = False) -> Page:
    """Search a code -> its custody graph, hops and diversion verdict."""
    title = f"Trace {code}" if code else "Trace a code"
    examples = [f.code for f in svc.findings_if_judged()[:8]]
    if not code:
        return render("trace.html", title=title, data={"view": "trace", "graphs": {}}, inline=inline,
                      source=svc.store.uri, code="", result=None, examples=examples)
    try:
        result = svc.trace(code, k)
    except NotFound as exc:
        return render("trace.html", title=title, data={"view": "trace", "graphs": {}}, inline=inline,
                      source=svc.store.uri, code=code, result=None, examples=examples, error=str(exc), status=404)
    parties = svc.parties([h.party_id for h in result.path] + [h.counterparty_id for h in result.path])
    graph = custody_graph(result.path, parties)
    notes = graph.notes
    if result.children is not None:
        notes = [*notes, f"{result.level} {code} holds {result.children.units:,} units; the graph is the path of the "
                 f"{result.level} itself (events on it and on what it is packed in)."]
    return render("trace.html", title=title, data={"view": "trace", "graphs": {"main": graph.as_dict()}},
                  inline=inline, source=svc.store.uri, code=code, result=result, examples=examples, notes=notes)


def diversions_page(svc: ApiService, filters: DiversionFilters, *, sort: str = "-crossing_ts", k: int | None = None,
                    inline: bool = False) -> Page:
    """The findings (sortable, filterable; click one for its path graph) and the
    territory-to-region flow of diverted units. Cached per store version: it embeds up to
    MAX_FINDINGS path graphs."""
    return svc.cached(lambda: _diversions_page(svc, filters, sort=sort, k=k, inline=inline),
                      "page:diversions", filters, sort, k, inline, large=True)


def csv_link(filters: DiversionFilters, *, sort: str, k: int | None) -> str:
    """The CSV download of the findings a diversions page shows: the given filters only."""
    return "/api/diversions.csv?" + urlencode({**filters.params(), "sort": sort, **({"k": k} if k else {})})


def _diversions_page(svc: ApiService, filters: DiversionFilters, *, sort: str, k: int | None, inline: bool) -> Page:
    csv_href = csv_link(filters, sort=sort, k=k)
    try:
        findings = svc.findings(filters, sort, k)
        groups = svc.diversion_groups(filters, "region-pair", k)
    except NotFound as exc:
        return render("diversions.html", title="Diversions (窜货)", data={"view": "diversions", "graphs": {}, "paths": {}},
                      inline=inline, source=svc.store.uri, findings=[], total=0, filters=filters, error=str(exc),
                      status=404, csv_href=csv_href)
    listed = findings[:MAX_FINDINGS]
    notes = []
    if len(findings) > len(listed):
        notes.append(f"Listing {len(listed):,} of {len(findings):,} findings (latest crossings first); "
                     "narrow with the filters to see the rest. The region flow graph counts all of them.")
    parties = svc.parties([p for f in listed for h in f.path for p in (h.party_id, h.counterparty_id) if p])
    paths = {f.code: custody_graph(f.path, parties).as_dict() for f in listed}
    regions = region_flow_graph(groups, _region_names(svc))
    data = {"view": "diversions", "graphs": {"regions": regions.as_dict()}, "paths": paths,
            "selected": listed[0].code if listed else None}
    return render("diversions.html", title="Diversions (窜货)", data=data, inline=inline, source=svc.store.uri,
                  findings=listed, total=len(findings), filters=filters, notes=notes + regions.notes,
                  csv_href=csv_href)


def influencers_page(svc: ApiService, *, by: str = "influence", top: int = 20, percent: float | None = None,
                     user: str | None = None, inline: bool = False) -> Page:
    """Super users: the ranking (the `top` referrers, or the top `percent`%), and a chosen
    user's referral cascade tree."""
    from queries.influence import METRICS

    ranking = svc.influencers(top=top, percent=percent, by=by)  # a percent, when given, wins
    chosen = user or (ranking[0].party_id if ranking else None)
    wanted = [chosen] if chosen else []
    if inline:  # a file cannot ask the server: embed the cascades of the ranking's top
        wanted += [i.party_id for i in ranking[:MAX_CASCADES] if i.party_id != chosen]
    cascades, notes, error, status = {}, [], None, 200
    for party in wanted:
        try:
            graph = cascade_graph(svc.cascade(party))
        except NotFound as exc:
            error, status = str(exc), 404
            continue
        cascades[party] = graph.as_dict()
        if party == chosen:
            notes += graph.notes
    if inline and len(ranking) > MAX_CASCADES:
        notes.append(f"This file holds the cascades of the top {MAX_CASCADES}; the server view shows any user's.")
    data = {"view": "influencers", "graphs": {}, "cascades": cascades, "selected": chosen if chosen in cascades else None}
    return render("influencers.html", title="Super users (超级用户)", data=data, inline=inline, source=svc.store.uri,
                  ranking=ranking, by=by, metrics=METRICS, top=top, percent=percent, user=chosen, notes=notes, error=error, status=status)


def network_page(svc: ApiService, *, region: str | None = None, sku: str | None = None, batch: str | None = None,
                 inline: bool = False) -> Page:
    """The aggregated F -> B -> b -> C flow of a region, SKU or batch (all units if none)."""
    scope = ", ".join(f"{name} {value}" for name, value in (("region", region), ("SKU", sku), ("batch", batch)) if value)
    title = f"Network of {scope}" if scope else "Network (all units)"
    try:
        edges = svc.flow(batch=batch, sku=sku)
        parties = svc.parties([p for e in edges for p in (e.source, e.target)])
        if region:
            inside = svc.regions_within(region)
            edges = [e for e in edges if (parties.get(e.source) or {}).get("region_id") in inside
                     or (parties.get(e.target) or {}).get("region_id") in inside]
            if not edges:
                raise NotFound(f"no flow touches region {region!r}" + (f" for {scope}" if scope else ""))
    except NotFound as exc:
        return render("network.html", title=title, data={"view": "network", "graphs": {}}, inline=inline,
                      source=svc.store.uri, region=region, sku=sku, batch=batch, error=str(exc), status=404)
    graph = flow_graph(edges, parties)
    return render("network.html", title=title, data={"view": "network", "graphs": {"main": graph.as_dict()}},
                  inline=inline, source=svc.store.uri, region=region, sku=sku, batch=batch, notes=graph.notes,
                  units=sum(e.units for e in edges))


def error_page(status: int, message: str, *, path: str, source: str) -> Page:
    """What a view answers when its request fails before the view could draw (a bad
    parameter, an unknown path): the status and message of the API's error, as a page."""
    title = {404: "Not found", 405: "Method not allowed", 422: "Invalid parameter"}.get(status, "Error")
    return render("error.html", title=f"{title} ({status})", data={"view": "error", "graphs": {}}, inline=False,
                  source=source, error=message, status=status, path=path)


def index_page(svc: ApiService) -> Page:
    return render("index.html", title="channelgraph", data={"view": "index", "graphs": {}}, inline=False,
                  source=svc.store.uri)


def _safe_findings(svc: ApiService) -> list[DiversionFinding]:
    try:
        return svc.findings()
    except ChannelgraphError:
        return []


def _region_names(svc: ApiService) -> dict[str, str]:
    regions = svc.store.regions()
    return {r: (n or r) for r, n in zip(regions.column("region_id").to_pylist(), regions.column("name").to_pylist())}


# ---------------------------------------------------------------- files


def write_page(page: Page, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page.html, encoding="utf-8")
    return out


def write_views(store: Store, out_dir: Path, *, k: int = 3, code: str | None = None) -> list[Path]:
    """Write the four views of `store` as standalone HTML files into `out_dir`: trace.html
    (of `code`, default the first diverted unit, else the first unit), diversions.html,
    influencers.html and network.html. Returns their paths."""
    from api.service import ApiService, DiversionFilters

    svc = ApiService(store, k=k)
    out_dir = Path(out_dir)
    if code is None:
        findings = _safe_findings(svc)
        code = findings[0].code if findings else _first_unit(store)
    pages = {
        "trace.html": trace_page(svc, code, inline=True),
        "diversions.html": diversions_page(svc, DiversionFilters(), inline=True),
        "influencers.html": influencers_page(svc, inline=True),
        "network.html": network_page(svc, inline=True),
    }
    return [write_page(page, out_dir / name) for name, page in pages.items()]


def _first_unit(store: Store) -> str | None:
    units = store.units_where() if hasattr(store, "units_where") else []  # type: ignore[attr-defined]
    return units[0] if units else None

