"""Read GS1 EPCIS documents into the canonical raw tables (DOMAIN.md §2, last paragraph).

`read_epcis(path)` reads one EPCIS 2.0 JSON/JSON-LD or XML, or EPCIS 1.2 XML document
(EPCISDocument or EPCISQueryDocument) and returns `RawTable`s for `codes`, `scans`,
`epcis_events` and `retractions`; `combine_epcis` then merges what the documents of one
load say about the same code and maps locations to parties and regions. Mapping:

- every valid event is kept whole in `epcis_events` (its JSON form in `document`);
- every EPC an event names becomes a `codes` row: level from the packaging the documents
  show (a code that holds nothing is a unit, one that holds units a case, one that holds
  cases, or any SSCC, a pallet), `sku` = the GTIN, `batch` = the ILMD lot number and
  `produced_at` = the time of the commissioning event;
- AggregationEvent ADD/OBSERVE -> `parent_code` of each child; DELETE -> `open` of the parent;
- ObjectEvent (and the parent of an AggregationEvent) with bizStep shipping -> `ship`,
  receiving -> `receive`, unpacking -> `open`, retail_selling/consuming -> `scan`; the
  performing party is the bizLocation (else the readPoint), the counterparty the first
  destination (ship) or source (receive) of type location, possessing_party, owning_party,
  the region the one the readPoint (else the bizLocation) names, if any;
- an errorDeclaration -> `retractions` rows for the event and every scan derived from it.

Identifiers (EPC URNs, GS1 Digital Link URIs on any host, JSON-LD CURIEs) are written as
canonical GS1 Digital Link URIs (`https://id.gs1.org/01/{GTIN}/21/{serial}`, `/00/{SSCC}`,
`/414/{GLN}[/254/{ext}]`); vocabulary (bizStep, disposition, types, reasons) as the bare CBV
word. Event ids: the document's eventID, else the CBV 2.0 event hash computed by the
reference implementation `epcis-event-hash-generator`; for the few events that package cannot
hash, a SHA-256 over this module's own format-independent normal form (prefix `cg:sha-256;`).
A scan derived from event E on code C has event_id `E#C`. Invalid events become reject
records (file, line of the event, reason); the rest of the document still loads.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
from epcis_event_hash_generator import hash_generator, json_to_py, xml_to_py
from epcis_event_hash_generator.dl_normaliser import normaliser as dl_normaliser
from lxml import etree
from pyld import jsonld

from graph.errors import DatasetError
from graph.model import LEVELS
from loaders.readers import RawTable, Reject

if TYPE_CHECKING:
    from graph.store import Store

log = logging.getLogger(__name__)

EVENT_TYPES = ("ObjectEvent", "AggregationEvent", "TransactionEvent", "TransformationEvent", "AssociationEvent")
EPCIS_ACTIONS = ("ADD", "OBSERVE", "DELETE")
HANDOVER = {"shipping": "ship", "receiving": "receive", "unpacking": "open",
            "retail_selling": "scan", "consuming": "scan"}
PARTY_TYPES = ("location", "possessing_party", "owning_party")  # counterparty preference
EPC_LISTS = ("epcList", "childEPCs", "inputEPCList", "outputEPCList")
OUTPUT_TABLES = {
    "codes": ("code", "level", "parent_code", "sku", "batch", "produced_at"),
    "scans": ("event_id", "code", "action", "party_id", "counterparty_id", "ts", "region_id", "epcis_event_id",
              "biz_step", "disposition", "read_point", "biz_location", "biz_transactions"),
    "epcis_events": ("event_id", "event_type", "biz_step", "action", "event_time", "disposition",
                     "read_point", "biz_location", "document"),
    "retractions": ("event_id", "declared_at", "reason", "corrective_event_ids"),
}
_VOCAB = re.compile(r"^(?:urn:epcglobal:cbv:(?:bizstep|disp|btt|sdt|er):"
                    r"|(?:https?://ref\.gs1\.org/cbv/|https?://gs1\.org/voc/|cbv:|gs1:)(?:BizStep|Disp|BTT|SDT|ER)-)(.+)$")
_OFFSET = re.compile(r"^[+-](?:0\d|1[0-4]):[0-5]\d$")
_GTIN = re.compile(r"^https://id\.gs1\.org/01/(\d{14})")
_SSCC = re.compile(r"^https://id\.gs1\.org/00/")
_GLN_EXT = re.compile(r"^(https://id\.gs1\.org/414/\d{13})/254/.+$")
GS1_PREFIX = "https://id.gs1.org/"
OWN_URN = "urn:channelgraph:"  # codes, parties, regions, events that are not GS1 identifiers, as exports write them
_OWN = re.compile(r"^urn:channelgraph:(?:code|party|region):(.+)$")
_HASH_CURIES = {"gs1:": "https://gs1.org/voc/", "cbv:": "https://ref.gs1.org/cbv/"}
_EPCIS_CONTEXT = "e532647e8eb371379b8b0e8602d8981c8566bc60f7351f22c76a5bc865962008.jsonld"
# XML list containers and the element each item is written as.
_XML_LISTS = {"epcList": "epc", "childEPCs": "epc", "inputEPCList": "epc", "outputEPCList": "epc",
              "quantityList": "quantityElement", "childQuantityList": "quantityElement",
              "inputQuantityList": "quantityElement", "outputQuantityList": "quantityElement",
              "bizTransactionList": "bizTransaction", "sourceList": "source", "destinationList": "destination",
              "sensorElementList": "sensorElement", "correctiveEventIDs": "correctiveEventID"}
_XML_TYPED = ("bizTransaction", "source", "destination")  # <source type="t">value</source>


# ---------------------------------------------------------------- identifiers and vocabulary


def canonical_id(value: Any) -> str | None:
    """One spelling per identifier: EPC URNs and Digital Link URIs become the canonical GS1
    Digital Link URI, a bare 13-digit GLN its `/414/` URI, channelgraph's own URNs (written by
    `channelgraph export epcis`) the plain id; anything else is kept, trimmed.

    >>> canonical_id("urn:epc:id:sgtin:030001.0012345.11")
    'https://id.gs1.org/01/00300010123455/21/11'
    >>> canonical_id("https://example.com/01/00300010123455/21/11")
    'https://id.gs1.org/01/00300010123455/21/11'
    """
    return None if value is None else _canonical(str(value).strip())


@lru_cache(maxsize=1 << 16)  # locations and codes repeat across events
def _canonical(text: str) -> str | None:
    if not text:
        return None
    if re.fullmatch(r"\d{13}", text):
        return f"{GS1_PREFIX}414/{text}"
    own = _OWN.match(text)
    if own:
        return unquote(own.group(1))
    return dl_normaliser(text) or text


def vocabulary(value: Any) -> str | None:
    """A CBV term (bizStep, disposition, business transaction, source/destination type, error
    reason) as its bare word, whether written bare, as URN, Web URI or CURIE; others kept.

    >>> [vocabulary(v) for v in ("shipping", "urn:epcglobal:cbv:bizstep:shipping",
    ...                          "https://ref.gs1.org/cbv/BizStep-shipping", "cbv:BizStep-shipping")]
    ['shipping', 'shipping', 'shipping', 'shipping']
    """
    if value is None:
        return None
    text = str(value).strip()
    match = _VOCAB.match(text)
    return match.group(1) if match else (text or None)


# ---------------------------------------------------------------- parsed events


@dataclass
class _Event:
    """One EPCIS event in a format-independent form, plus what is needed to hash it."""

    body: dict[str, Any]  # the event as JSON-LD-shaped data (XML converted)
    line: int | None
    prefixes: dict[str, str] = field(default_factory=dict)  # JSON-LD context / XML namespace prefixes
    context: Any = None  # the JSON-LD @context of a JSON document
    xml: str | None = None  # an XML event as text (the hash generator reads that, not `body`)

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def ident(self, value: Any) -> str | None:
        return canonical_id(self.expand(value))

    def term(self, value: Any) -> str | None:
        return vocabulary(self.expand(value))

    def expand(self, value: Any) -> Any:
        """A CURIE whose prefix the document's context defines, written out in full."""
        if isinstance(value, str) and ":" in value:
            prefix, rest = value.split(":", 1)
            if prefix in self.prefixes and not rest.startswith("//"):
                return self.prefixes[prefix] + rest
        return value

    def location(self, name: str) -> str | None:
        place = self.get(name)
        return self.ident(place.get("id")) if isinstance(place, dict) else self.ident(place)

    def epcs(self, name: str) -> list[str]:
        values = self.get(name) or []
        return [c for c in (self.ident(v) for v in (values if isinstance(values, list) else [values])) if c]

    def typed(self, name: str, item: str) -> list[tuple[str | None, str]]:
        """(type, identifier) pairs of a source/destination/bizTransaction list, in order."""
        values = self.get(name) or []
        out = []
        for entry in values if isinstance(values, list) else [values]:
            if isinstance(entry, dict) and entry.get(item) is not None:
                value = self.ident(entry[item]) if item != "bizTransaction" else str(entry[item]).strip()
                out.append((self.term(entry.get("type")), value))
        return out

    def problems(self) -> list[str]:
        """Why this event breaks the EPCIS contract (empty when it does not)."""
        kind = self.get("type")
        if kind not in EVENT_TYPES:
            return [f"unknown event type {kind!r}: expected one of {', '.join(EVENT_TYPES)}"]
        required = ["eventTime", "eventTimeZoneOffset"] + (["action"] if kind != "TransformationEvent" else [])
        missing = [name for name in required if self.get(name) in (None, "")]
        if kind == "AggregationEvent" and self.get("action") in ("ADD", "DELETE") and not self.get("parentID"):
            missing.append("parentID (required for ADD and DELETE)")
        out = [f"{kind} is missing required field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"] if missing else []
        action = self.get("action")
        if action not in (None, "") and action not in EPCIS_ACTIONS:
            out.append(f"bad action {action!r}: expected one of {', '.join(EPCIS_ACTIONS)}")
        if self.get("eventTime") not in (None, "") and _parse_time(self.get("eventTime")) is None:
            out.append(f"bad eventTime {self.get('eventTime')!r}: not an ISO 8601 date-time")
        offset = self.get("eventTimeZoneOffset")
        if offset not in (None, "") and not _OFFSET.match(str(offset)):
            out.append(f"bad eventTimeZoneOffset {offset!r}: expected +hh:mm or -hh:mm")
        return out


def _utc(value: Any) -> Any:
    """An EPCIS time as one ISO 8601 UTC spelling (unparseable values are left for validation)."""
    moment = _parse_time(value) if value is not None else None
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if moment else value


def _parse_time(value: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else None  # EPCIS times always carry an offset


# ---------------------------------------------------------------- JSON / JSON-LD


def _json_events(path: Path, text: str) -> list[_Event] | None:
    """The events of a JSON(-LD) EPCIS document, or None when it is not one (e.g. a query)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("epcisBody"), dict):
        return None
    body = doc["epcisBody"]
    if "queryResults" in body:
        events = _dig(body, "queryResults", "resultsBody", "eventList")
    elif "event" in body:
        events = [body["event"]]
    else:
        events = body.get("eventList")
    events = [] if events is None else events
    if not isinstance(events, list):
        raise DatasetError(f"{path}: the eventList of epcisBody is not a list")
    context = doc.get("@context")
    prefixes = {k: v for c in (context if isinstance(context, list) else [context])
                if isinstance(c, dict) for k, v in c.items() if isinstance(v, str)}
    lines = _json_event_lines(text, len(events))
    out = []
    for event, line in zip(events, lines):
        if not isinstance(event, dict):
            event = {"type": None, "value": event}
        out.append(_Event(event, line, prefixes, context))
    return out


def _dig(node: Any, *keys: str) -> Any:
    """node[k1][k2]..., or None where a level is missing or not an object."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _curies_expanded(value: Any) -> Any:
    """String values with a gs1:/cbv: CURIE written out, as the hash generator's XML reader
    does itself and its JSON reader (1.9.3) forgets: without this, a JSON event and its XML
    twin with e.g. a sensorReport component `cbv:Comp-northing` would hash differently."""
    if isinstance(value, dict):
        return {k: _curies_expanded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_curies_expanded(v) for v in value]
    if isinstance(value, str):
        for prefix, uri in _HASH_CURIES.items():
            if value.startswith(prefix):
                return uri + value[len(prefix):]
    return value


def _json_event_lines(text: str, count: int) -> list[int | None]:
    """Line on which each event of the (first) eventList starts."""
    match = re.search(r'"eventList"\s*:\s*\[', text) or re.search(r'"event"\s*:\s*(?=\{)', text)
    if not match:
        return [None] * count
    decoder = json.JSONDecoder()
    pos, line, counted, lines = match.end(), 1, 0, []
    for _ in range(count):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the key matched somewhere else: no line numbers
            return [None] * count
    return lines


# ---------------------------------------------------------------- XML


_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _xml_events(path: Path, data: bytes) -> list[_Event] | None:
    """The events of an XML EPCIS 1.2/2.0 document, or None when it has no EventList."""
    try:
        root = etree.fromstring(data, _XML_PARSER)
    except etree.XMLSyntaxError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid XML: {exc.msg}") from exc
    if root.getroottree().docinfo.doctype:
        raise DatasetError(f"{path}: XML with a DOCTYPE is refused (EPCIS needs none; entities are unsafe)")
    event_list = next(root.iter("EventList"), None)
    if event_list is None:
        return None
    out = []
    for element in _xml_event_elements(event_list):
        body = {"type": etree.QName(element).localname, **_xml_dict(element)}
        prefixes = {p: ns for p, ns in element.nsmap.items() if p}
        out.append(_Event(body, element.sourceline, prefixes,
                          xml=etree.tostring(element, encoding="unicode", with_tail=False)))
    return out


def _xml_event_elements(parent: etree._Element) -> Iterator[etree._Element]:
    """Events of an EventList; EPCIS 1.2 wraps newer event types in <extension>."""
    for child in parent:
        if not isinstance(child.tag, str):
            continue
        if etree.QName(child).localname == "extension":
            yield from _xml_event_elements(child)
        else:
            yield child


def _xml_name(element: etree._Element, name: str) -> str:
    qname = etree.QName(name)
    if qname.namespace is None:
        return qname.localname
    prefix = next((p for p, ns in element.nsmap.items() if ns == qname.namespace and p), None)
    return f"{prefix}:{qname.localname}" if prefix else f"{qname.namespace}{qname.localname}"


def _xml_dict(element: etree._Element) -> dict[str, Any]:
    """An XML element as JSON-LD-shaped data: attributes and children become keys, repeated
    children lists, EPCIS list containers lists, 1.2 <extension>/<baseExtension> unwrapped."""
    values: dict[str, list[Any]] = {}
    for name, value in element.attrib.items():
        values.setdefault(_xml_name(element, name), []).append(value)
    for child in element:
        if not isinstance(child.tag, str):
            continue
        name = _xml_name(child, child.tag)
        if name in ("extension", "baseExtension"):
            for key, value in _xml_dict(child).items():
                values.setdefault(key, []).append(value)
        elif name in _XML_LISTS:
            values.setdefault(name, []).append([_xml_value(c) for c in child if isinstance(c.tag, str)])
        else:
            values.setdefault(name, []).append(_xml_value(child))
    return {k: v[0] if len(v) == 1 else v for k, v in values.items()}


def _xml_value(element: etree._Element) -> Any:
    name = etree.QName(element).localname
    text = (element.text or "").strip()
    if name in _XML_TYPED:
        return {**({"type": element.get("type")} if element.get("type") else {}), name: text}
    if len(element) or element.attrib:
        return _xml_dict(element)
    return text


# ---------------------------------------------------------------- event ids


def _loader(url: str, options: dict | None = None) -> dict:
    """JSON-LD document loader that never goes online: the EPCIS context ships with the
    hash generator; any other remote context is unavailable (the event gets our own hash)."""
    if url.endswith("/epcis-context.jsonld"):
        data = json.loads(importlib.resources.files("epcis_event_hash_generator").joinpath(_EPCIS_CONTEXT).read_text())
        return {"contentType": "application/ld+json", "contextUrl": None, "documentUrl": url, "document": data}
    raise jsonld.JsonLdError(f"remote context {url} is not available offline", "jsonld.LoadDocumentError",
                             code="loading document failed")


jsonld.set_document_loader(_loader)


class _HashGeneratorNoise(logging.Filter):
    """The hash generator logs every event it cannot hash at ERROR on the root logger (and
    we fall back to our own hash): those records are dropped, whatever thread logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "epcis_event_hash_generator" not in record.pathname


logging.getLogger().addFilter(_HashGeneratorNoise())


def _event_ids(events: list[_Event]) -> list[str]:
    """Each event's id: its eventID, else the CBV 2.0 event hash, else our own content hash."""
    given = [e.get("eventID").strip() if isinstance(e.get("eventID"), str) and e.get("eventID").strip() else None
             for e in events]
    todo = [e for e, i in zip(events, given) if i is None]
    hashed = iter(_cbv_hashes(todo))
    return [i or next(hashed) or _own_hash(e) for e, i in zip(events, given)]


def _cbv_hashes(events: list[_Event]) -> list[str | None]:
    """The reference implementation's hash of each event (None where it fails). The events
    are converted in one batch (the JSON-LD expansion is the slow part), else one by one."""
    if not events:
        return []
    try:
        parsed = _hash_model(events)
    except Exception:  # noqa: BLE001 - the reference implementation fails on some valid events
        parsed = []
    if len(parsed) != len(events):
        parsed = [_hash_model_or_none(e) for e in events]
    return [_hash_or_none(p) for p in parsed]


def _hash_model(events: list[_Event]) -> list[Any]:
    """The hash generator's own model of the events (all from one document)."""
    if events[0].xml is not None:
        xml = "".join(e.xml or "" for e in events)
        return xml_to_py.event_list_from_epcis_document_str(
            f"<EPCISDocument><EPCISBody><EventList>{xml}</EventList></EPCISBody></EPCISDocument>")[2]
    doc = {"@context": events[0].context, "type": "EPCISDocument",
           "epcisBody": {"eventList": [_curies_expanded(e.body) for e in events]}}
    return json_to_py.event_list_from_epcis_document_json(json.loads(json.dumps(doc)))[2]


def _hash_model_or_none(event: _Event) -> Any:
    try:
        parsed = _hash_model([event])
    except Exception:  # noqa: BLE001
        return None
    return parsed[0] if len(parsed) == 1 else None


def _hash_or_none(parsed: Any) -> str | None:
    if parsed is None:
        return None
    try:
        hashes = hash_generator.epcis_hashes_from_events(("EventList", "", [parsed]))
    except Exception:  # noqa: BLE001
        return None
    return hashes[0] if len(hashes) == 1 else None


def _own_hash(event: _Event) -> str:
    return "cg:sha-256;" + hashlib.sha256(json.dumps(_normal_form(event), sort_keys=True).encode()).hexdigest()


def _normal_form(event: _Event) -> dict[str, Any]:
    """The standard fields of an event, spelled one way and with unordered lists sorted."""
    moment = _parse_time(event.get("eventTime"))
    form: dict[str, Any] = {
        "type": event.get("type"), "eventTime": moment.timestamp() if moment else None,
        "action": event.get("action"), "bizStep": event.term(event.get("bizStep")),
        "disposition": event.term(event.get("disposition")), "parentID": event.ident(event.get("parentID")),
        "readPoint": event.location("readPoint"), "bizLocation": event.location("bizLocation"),
        "transformationID": event.get("transformationID"),
        "bizTransactions": sorted(map(str, event.typed("bizTransactionList", "bizTransaction"))),
        "sources": sorted(map(str, event.typed("sourceList", "source"))),
        "destinations": sorted(map(str, event.typed("destinationList", "destination"))),
    }
    for name in EPC_LISTS:
        form[name] = sorted(event.epcs(name))
    return form


# ---------------------------------------------------------------- reading


def read_epcis(path: Path) -> list[RawTable]:
    """The canonical raw tables one EPCIS document holds (see the module docstring).
    Raises DatasetError when the file is not well-formed JSON/XML; a JSON file that is not
    an EPCIS document (e.g. a SimpleEventQuery) is logged and yields nothing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if path.suffix.lower() == ".xml":
        events = _xml_events(path, data)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not UTF-8 text: {exc}") from exc
        events = _json_events(path, text)
    if events is None:
        log.warning("ignoring %s: not an EPCIS document with events (a query or other JSON)", path)
        return []
    return _tables(path, events)


def _tables(path: Path, events: list[_Event]) -> list[RawTable]:
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in OUTPUT_TABLES}
    rejects: list[Reject] = []
    valid = []
    for event in events:
        problems = event.problems()
        if problems:
            rejects.append(Reject("epcis_events", str(path), event.line, "; ".join(problems), event.body))
        else:
            valid.append(event)
    codes = _Codes()
    for event, event_id in zip(valid, _event_ids(valid)):
        where = {"_line": event.line}
        codes.add(event, where)
        biz_step = event.term(event.get("bizStep"))
        place = {"disposition": event.term(event.get("disposition")), "read_point": event.location("readPoint"),
                 "biz_location": event.location("bizLocation"), **where}
        rows["epcis_events"].append({
            "event_id": event_id, "event_type": event.get("type"), "biz_step": biz_step,
            "action": event.get("action"), "event_time": _utc(event.get("eventTime")),
            "document": json.dumps({**event.body, "eventID": event_id}, ensure_ascii=False, sort_keys=True), **place})
        transactions = _joined(f"{t}:{v}" if t else v for t, v in event.typed("bizTransactionList", "bizTransaction"))
        scans = [{"event_id": f"{event_id}#{code}", "code": code, "action": action,
                  "party_id": place["biz_location"] or place["read_point"],
                  "counterparty_id": _counterparty(event, action), "ts": _utc(event.get("eventTime")),
                  "epcis_event_id": event_id, "biz_step": biz_step, "biz_transactions": transactions, **place}
                 for code, action in _handovers(event, biz_step)]
        rows["scans"] += scans
        error = event.get("errorDeclaration")
        if isinstance(error, dict):
            retracted = {"declared_at": _utc(error.get("declarationTime")), "reason": event.term(error.get("reason")),
                         "corrective_event_ids": _joined(_as_list(error.get("correctiveEventIDs"))), **where}
            rows["retractions"] += [{"event_id": i, **retracted} for i in [event_id] + [s["event_id"] for s in scans]]
    rows["codes"] = codes.rows()
    return [_raw(name, path, rows[name], rejects if name == "epcis_events" else []) for name in OUTPUT_TABLES]


def _handovers(event: _Event, biz_step: str | None) -> list[tuple[str, str]]:
    """(code, action) of the scans an event stands for."""
    kind, action = event.get("type"), event.get("action")
    if kind == "ObjectEvent" and biz_step in HANDOVER:
        return [(code, HANDOVER[biz_step]) for code in event.epcs("epcList")]
    if kind == "AggregationEvent":
        parent = event.ident(event.get("parentID"))
        mapped = HANDOVER.get(biz_step or "") or ("open" if action == "DELETE" else None)
        if parent and mapped:
            return [(parent, mapped)]
    return []


def _counterparty(event: _Event, action: str) -> str | None:
    listed = {"ship": ("destinationList", "destination"), "receive": ("sourceList", "source")}.get(action)
    if not listed:
        return None
    pairs = event.typed(*listed)
    for wanted in PARTY_TYPES:
        for kind, value in pairs:
            if kind == wanted:
                return value
    return None


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _joined(values: Iterable[Any]) -> str | None:
    return "|".join(str(v) for v in values) or None


class _Codes:
    """What one document says about each code: packaging, GTIN, lot, commissioning time."""

    def __init__(self) -> None:
        self.facts: dict[str, dict[str, Any]] = {}
        self.children: dict[str, set[str]] = {}

    def _fact(self, code: str, where: dict) -> dict[str, Any]:
        return self.facts.setdefault(code, {"code": code, "parent_code": None, "batch": None,
                                            "produced_at": None, "_parent_time": None, **where})

    def add(self, event: _Event, where: dict) -> None:
        for name in EPC_LISTS:
            for code in event.epcs(name):
                self._fact(code, where)
        if event.get("type") == "ObjectEvent" and event.term(event.get("bizStep")) == "commissioning":
            lot = _lot(event.get("ilmd"))
            for code in event.epcs("epcList"):
                fact = self._fact(code, where)
                fact["produced_at"] = fact["produced_at"] or _utc(event.get("eventTime"))
                fact["batch"] = fact["batch"] or lot
        parent = event.ident(event.get("parentID"))
        if event.get("type") == "AggregationEvent" and parent:
            self._fact(parent, where)
            moment = _parse_time(event.get("eventTime"))
            for child in event.epcs("childEPCs"):
                self.children.setdefault(parent, set()).add(child)
                fact = self._fact(child, where)
                if event.get("action") != "DELETE" and (fact["_parent_time"] is None or moment >= fact["_parent_time"]):
                    fact["parent_code"], fact["_parent_time"] = parent, moment

    def _height(self, code: str, seen: frozenset[str] = frozenset()) -> int:
        inside = self.children.get(code, set()) - seen - {code}
        return 1 + max(self._height(c, seen | {code}) for c in inside) if inside else 0

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for code, fact in self.facts.items():
            height = self._height(code)
            level = "pallet" if _SSCC.match(code) or height >= 2 else "case" if height == 1 else "unit"
            gtin = _GTIN.match(code)
            out.append({**{k: v for k, v in fact.items() if k != "_parent_time"}, "level": level,
                        "sku": gtin.group(1) if gtin else None})
        return out


def _lot(ilmd: Any) -> str | None:
    """The lot number of an ILMD block, whatever namespace prefix it is written with."""
    if not isinstance(ilmd, dict):
        return None
    for key, value in ilmd.items():
        if re.split(r"[:#/}]", key)[-1] == "lotNumber" and isinstance(value, (str, int)):
            return str(value).strip() or None
    return None


def _raw(table: str, path: Path, rows: list[dict[str, Any]], rejects: list[Reject]) -> RawTable:
    columns = {name: pa.array([_text(r.get(name)) for r in rows], pa.string()) for name in OUTPUT_TABLES[table]}
    columns["_file"] = pa.array([str(path)] * len(rows), pa.string())
    columns["_line"] = pa.array([r.get("_line") for r in rows], pa.int64())
    return RawTable(table, pa.table(columns), rejects)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.strip() or None


# ---------------------------------------------------------------- several documents


def combine_epcis(documents: list[list[RawTable]], raw: dict[str, list[RawTable]], known: Store | None) -> list[RawTable]:
    """The raw tables of the EPCIS `documents` of one load, made consistent with each other,
    with the load's other tables (`raw`) and with the store (`known`):

    - one `codes` row per code: the highest packaging level any document shows (the stored
      level for a stored code: a document that only observes a code cannot tell a case from
      a unit), other values from the first document that gives them; none for a code a
      `codes` table of this load defines;
    - each party location (bizLocation, else readPoint; source, destination) replaced by
      the party whose id it is or whose `gln`/`sgln` column names it (`|`-separated, any
      spelling of the GLN/SGLN), in this load's or the stored parties;
    - `region_id` = the region the readPoint, else the bizLocation, names the same way in
      the regions tables (else none: the party's region applies).
    A location with a /254/ extension that nothing names falls back to its site.
    """
    by_table: dict[str, list[RawTable]] = {}
    for tables in documents:
        for table in tables:
            by_table.setdefault(table.table, []).append(table)
    out = [table for name, tables in by_table.items() if name not in ("codes", "scans", "epcis_events")
           for table in tables]
    out += _same_documents(by_table.get("epcis_events", []))
    if "codes" in by_table:
        out.append(_merged_codes(by_table["codes"], raw.get("codes", []), known))
    parties = [t.data for t in raw.get("parties", [])] + ([known.parties()] if known is not None else [])
    regions = [t.data for t in raw.get("regions", [])] + ([known.regions()] if known is not None else [])
    party_of, region_of = _aliases(parties, "party_id"), _aliases(regions, "region_id")
    for table in by_table.get("scans", []):
        data = table.data
        columns = {name: data.column(name).to_pylist() for name in ("party_id", "counterparty_id", "read_point", "biz_location")}
        resolved = {
            "party_id": [_named(v, party_of) or v for v in columns["party_id"]],
            "counterparty_id": [_named(v, party_of) or v for v in columns["counterparty_id"]],
            "region_id": [_named(r, region_of) or _named(b, region_of)
                          for r, b in zip(columns["read_point"], columns["biz_location"])],
        }
        for name, values in resolved.items():
            data = data.set_column(data.column_names.index(name), name, pa.array(values, pa.string()))
        out.append(RawTable("scans", data, table.rejects))
    return out


def _same_documents(tables: list[RawTable]) -> list[RawTable]:
    """The same event in several documents (XML and JSON, say) keeps the first document's
    `document` and `event_time` text, so it counts as a duplicate rather than a conflict."""
    first: dict[str, tuple[str, str]] = {}
    out = []
    for table in tables:
        data = table.data
        ids = data.column("event_id").to_pylist()
        kept = [first.setdefault(i, (d, t)) for i, d, t in
                zip(ids, data.column("document").to_pylist(), data.column("event_time").to_pylist())]
        for n, name in enumerate(("document", "event_time")):
            data = data.set_column(data.column_names.index(name), name, pa.array([k[n] for k in kept], pa.string()))
        out.append(RawTable(table.table, data, table.rejects))
    return out


def _merged_codes(tables: list[RawTable], loaded: list[RawTable], known: Store | None) -> RawTable:
    rank = {level: i for i, level in enumerate(LEVELS)}
    merged: dict[str, dict[str, Any]] = {}
    rejects = [r for t in tables for r in t.rejects]
    for row in (r for t in tables for r in t.data.to_pylist()):
        seen = merged.get(row["code"])
        if seen is None:
            merged[row["code"]] = row
            continue
        if rank[row["level"]] > rank[seen["level"]]:
            seen["level"] = row["level"]
        for name in ("parent_code", "sku", "batch", "produced_at"):
            seen[name] = seen[name] if seen[name] is not None else row[name]
    for table in loaded:
        for code in table.data.column("code").to_pylist() if "code" in table.data.column_names else []:
            merged.pop(code, None)
    if known is not None:
        stored = known.stored("codes", pa.array(list(merged), pa.string()))
        for code, level in zip(stored.column("code").to_pylist(), stored.column("level").to_pylist()):
            merged[code]["level"] = level
    rows = list(merged.values())
    columns = {name: pa.array([r[name] for r in rows], pa.string()) for name in OUTPUT_TABLES["codes"] + ("_file",)}
    columns["_line"] = pa.array([r["_line"] for r in rows], pa.int64())
    return RawTable("codes", pa.table(columns), rejects)


def _aliases(tables: list[pa.Table], key: str) -> dict[str, str]:
    """Location -> the `key` of the row that names it: by its own id, or in its `gln`/`sgln`
    column (`|`-separated, any spelling). The first row naming a location wins."""
    aliases: dict[str, str] = {}
    for data in tables:
        if key not in data.column_names:
            continue
        ids = data.column(key).to_pylist()
        for name in ids:
            if name:
                aliases.setdefault(name, name)
        for column in ("gln", "sgln"):
            if column in data.column_names:
                for row_id, names in zip(ids, data.column(column).to_pylist()):
                    for name in (names or "").split("|"):
                        if row_id and name.strip():
                            aliases.setdefault(canonical_id(name), row_id)
    return aliases


def _named(location: str | None, aliases: dict[str, str]) -> str | None:
    """What `aliases` calls `location` (a /254/ sub-location: what it calls the site), or None."""
    if location is None:
        return None
    if location in aliases:
        return aliases[location]
    site = _GLN_EXT.match(location)
    return aliases.get(site.group(1)) if site else None
