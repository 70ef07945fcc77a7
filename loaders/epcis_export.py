"""Write channelgraph events as EPCIS 2.0 JSON-LD documents (the inverse of `loaders.epcis`).

`scans_document` writes canonical scans: one AggregationEvent (ADD, packing) per packaging
link given, then one ObjectEvent per scan: ship -> shipping, receive -> receiving, open ->
unpacking, scan -> retail_selling; the party is the bizLocation, the event's region (if
any) the readPoint, the counterparty the destination (ship) or source (receive) of type
location, the scan's event_id the eventID. `finding_document` writes a diversion finding's
evidence chain that way. channelgraph's own facts ride along as `cg:` extensions. Codes,
parties, regions and events that are not GS1 identifiers are written as
`urn:channelgraph:{code,party,region,event}:...`; `loaders.epcis` reads the first three
back as the plain id, so an exported document loads again into the same graph.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from loaders.epcis import GS1_PREFIX, OWN_URN, canonical_id
from queries.common import iso
from queries.diversion import DiversionFinding

EPCIS_CONTEXT = "https://ref.gs1.org/standards/epcis/epcis-context.jsonld"
BIZ_STEPS = {"ship": "shipping", "receive": "receiving", "open": "unpacking", "scan": "retail_selling"}


def identifier(kind: str, value: str) -> str:
    """A GS1 identifier as its canonical Digital Link URI; anything else as a channelgraph URN.

    >>> identifier("code", "urn:epc:id:sscc:030001.41234567890")
    'https://id.gs1.org/00/403000112345678901'
    >>> identifier("party", "D 1")
    'urn:channelgraph:party:D%201'
    """
    canonical = canonical_id(value)
    if canonical and canonical.startswith(GS1_PREFIX):
        return canonical
    return f"{OWN_URN}{kind}:{quote(value, safe='')}"


def scans_document(scans: Iterable[dict[str, Any]], *, packaging: Iterable[tuple[str, str, Any]] = (),
                   header: dict[str, Any] | None = None, created: datetime | None = None) -> dict[str, Any]:
    """An EPCIS 2.0 document of canonical `scans` (dicts with code, action, party_id, ts and
    optionally event_id, counterparty_id, region_id, and `cg:`-prefixed extension values),
    after the `packaging` links (child, parent, time); `header` adds document-level fields."""
    packing = [{
        "type": "AggregationEvent", "eventTime": iso(ts), "eventTimeZoneOffset": "+00:00",
        "parentID": identifier("code", parent), "childEPCs": [identifier("code", child)],
        "action": "ADD", "bizStep": "packing",
    } for child, parent, ts in packaging]
    events = []
    for scan in scans:
        event: dict[str, Any] = {
            "type": "ObjectEvent", "eventTime": iso(scan["ts"]), "eventTimeZoneOffset": "+00:00",
            "eventID": f"{OWN_URN}event:{quote(scan['event_id'], safe='')}" if scan.get("event_id") else None,
            "epcList": [identifier("code", scan["code"])], "action": "OBSERVE", "bizStep": BIZ_STEPS[scan["action"]],
            "readPoint": {"id": identifier("region", scan["region_id"])} if scan.get("region_id") else None,
            "bizLocation": {"id": identifier("party", scan["party_id"])},
        }
        counterparty = scan.get("counterparty_id")
        if counterparty and scan["action"] in ("ship", "receive"):
            name = "destination" if scan["action"] == "ship" else "source"
            event[f"{name}List"] = [{"type": "location", name: identifier("party", counterparty)}]
        event.update({k: v for k, v in scan.items() if k.startswith("cg:")})
        events.append({k: v for k, v in event.items() if v is not None})
    return {
        "@context": [EPCIS_CONTEXT, {"cg": OWN_URN}],
        "type": "EPCISDocument",
        "schemaVersion": "2.0",
        "creationDate": iso(created or datetime.now(timezone.utc)),
        **(header or {}),
        "epcisBody": {"eventList": packing + events},
    }


def finding_document(finding: DiversionFinding, ancestors: list[str], *, created: datetime | None = None) -> dict[str, Any]:
    """The evidence chain of `finding` as an EPCIS 2.0 document: the unit's packaging
    (`ancestors`, parent first, as `queries.trace.TraceResult.ancestors`) and its custody
    path, with the finding as `cg:finding` and each hop's `cg:toRegion` and `cg:crossed`."""
    first = min((hop.ts for hop in finding.path), default=finding.crossing_ts)
    chain = [finding.code, *ancestors]
    hops = [{**hop.model_dump(include={"event_id", "code", "action", "party_id", "counterparty_id", "ts", "region_id"}),
             "cg:toRegion": hop.to_region_id, "cg:crossed": hop.crossed} for hop in finding.path]
    return scans_document(hops, packaging=[(child, parent, first) for child, parent in zip(chain, chain[1:])],
                          header={"cg:finding": finding.model_dump(exclude={"path"})}, created=created)
