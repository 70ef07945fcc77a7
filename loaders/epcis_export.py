"""Write a diversion finding's evidence chain as an EPCIS 2.0 JSON-LD document.

The document holds one AggregationEvent (ADD, packing) per packaging link from the unit up
to its outermost code, then one ObjectEvent per hop of the custody path: ship -> shipping,
receive -> receiving, open -> unpacking, scan -> retail_selling; the performing party is the
bizLocation, the counterparty the destination (ship) or source (receive) of type location.
channelgraph's own facts ride along as `cg:` extensions (`cg:finding` on the document;
`cg:eventId`, `cg:region`, `cg:toRegion`, `cg:crossed` on each hop). Codes and parties that
are not GS1 identifiers are written as `urn:channelgraph:code:...` / `urn:channelgraph:party:...`,
which `loaders.epcis` reads back as the plain id, so an exported chain loads again.
"""
from __future__ import annotations

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


def finding_document(finding: DiversionFinding, ancestors: list[str], *, created: datetime | None = None) -> dict[str, Any]:
    """The EPCIS 2.0 document of `finding`; `ancestors` is the unit's packaging chain,
    parent first (as `queries.trace.TraceResult.ancestors`)."""
    first = min((hop.ts for hop in finding.path), default=finding.crossing_ts)
    chain = [finding.code, *ancestors]
    packing = [{
        "type": "AggregationEvent", "eventTime": first, "eventTimeZoneOffset": "+00:00",
        "parentID": identifier("code", parent), "childEPCs": [identifier("code", child)],
        "action": "ADD", "bizStep": "packing",
    } for child, parent in zip(chain, chain[1:])]
    hops = []
    for hop in finding.path:
        event: dict[str, Any] = {
            "type": "ObjectEvent", "eventTime": hop.ts, "eventTimeZoneOffset": "+00:00",
            "epcList": [identifier("code", hop.code)], "action": "OBSERVE", "bizStep": BIZ_STEPS[hop.action],
        }
        if hop.party_id:
            event["bizLocation"] = {"id": identifier("party", hop.party_id)}
        if hop.counterparty_id and hop.action in ("ship", "receive"):
            name = "destination" if hop.action == "ship" else "source"
            event[f"{name}List"] = [{"type": "location", name: identifier("party", hop.counterparty_id)}]
        event.update({"cg:eventId": hop.event_id, "cg:region": hop.region_id, "cg:toRegion": hop.to_region_id,
                      "cg:crossed": hop.crossed})
        hops.append({k: v for k, v in event.items() if v is not None})
    summary = finding.model_dump(exclude={"path"})
    return {
        "@context": [EPCIS_CONTEXT, {"cg": OWN_URN}],
        "type": "EPCISDocument",
        "schemaVersion": "2.0",
        "creationDate": iso(created or datetime.now(timezone.utc)),
        "cg:finding": summary,
        "epcisBody": {"eventList": packing + hops},
    }
