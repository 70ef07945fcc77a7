"""EPCIS reading and loading speed, appended to bench/RESULTS.md with the machine and date.

    .venv/bin/python -m bench.epcis                 # 5,000-event documents, a scale-1 scenario as EPCIS
    .venv/bin/python -m bench.epcis --events 20000 --scale 3

`read_epcis` on documents of one-EPC shipping ObjectEvents in three forms (JSON-LD with and
without eventIDs, XML without), then a generated scenario's scans loaded as one EPCIS
document beside its other tables, against the same scans loaded from scans.csv.
Each measurement runs in a fresh process (bench.run.run_child), so peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.run import DATA, run_child, write_results

FORMS = ("json with eventIDs", "json, hashed", "xml, hashed")


def write_documents(folder: Path, events: int) -> dict[str, Path]:
    """One document per form, `events` shipping events each."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"type": "ObjectEvent", "eventTime": f"2024-03-01T08:{i // 60 % 60:02d}:{i % 60:02d}Z",
              "eventTimeZoneOffset": "+08:00", "epcList": [f"urn:epc:id:sgtin:0614141.107346.{i}"], "action": "OBSERVE",
              "bizStep": "shipping", "readPoint": {"id": "urn:epc:id:sgln:0614141.00001.0"},
              "destinationList": [{"type": "location", "destination": "urn:epc:id:sgln:0614141.00002.0"}]}
             for i in range(events)]
    head = {"@context": ["https://ref.gs1.org/standards/epcis/epcis-context.jsonld"], "type": "EPCISDocument",
            "schemaVersion": "2.0", "creationDate": "2024-03-01T00:00:00Z"}
    paths = {form: folder / name for form, name in zip(FORMS, ("ids.json", "hashed.json", "hashed.xml"))}
    with_ids = [{**item, "eventID": f"urn:uuid:00000000-0000-4000-8000-{i:012d}"} for i, item in enumerate(items)]
    paths[FORMS[0]].write_text(json.dumps({**head, "epcisBody": {"eventList": with_ids}}))
    paths[FORMS[1]].write_text(json.dumps({**head, "epcisBody": {"eventList": items}}))
    xml = "".join(
        f"<ObjectEvent><eventTime>{e['eventTime']}</eventTime><eventTimeZoneOffset>+08:00</eventTimeZoneOffset>"
        f"<epcList><epc>{e['epcList'][0]}</epc></epcList><action>OBSERVE</action><bizStep>shipping</bizStep>"
        "<readPoint><id>urn:epc:id:sgln:0614141.00001.0</id></readPoint><extension><destinationList>"
        "<destination type='location'>urn:epc:id:sgln:0614141.00002.0</destination></destinationList></extension>"
        "</ObjectEvent>" for e in items)
    paths[FORMS[2]].write_text("<epcis:EPCISDocument xmlns:epcis='urn:epcglobal:epcis:xsd:2' schemaVersion='2.0'>"
                               f"<EPCISBody><EventList>{xml}</EventList></EPCISBody></epcis:EPCISDocument>")
    return paths


def bench_read(form: str, path: Path, events: int) -> dict:
    result = run_child(f"""
        from loaders.epcis import read_epcis
        start = time.perf_counter()
        tables = read_epcis({str(path)!r})
        seconds = time.perf_counter() - start
        result = {{'seconds': round(seconds, 2), 'events_per_s': round({events} / seconds)}}
    """)
    return {"benchmark": f"read_epcis {events} events, {form}", **result}


def bench_scenario(scale: int, folder: Path) -> list[dict]:
    """A generated scenario loaded from its tables, and with its accepted scans as EPCIS."""
    shutil.rmtree(folder, ignore_errors=True)
    result = run_child(f"""
        import json
        from pathlib import Path
        from graph.embedded import EmbeddedStore
        from loaders.epcis_export import scans_document
        from loaders.generate import generate_dataset
        from loaders.ingest import load_dataset
        folder = Path({str(folder)!r})
        generate_dataset(folder / 'generated', scale={scale}, seed=1)
        start = time.perf_counter()
        tables = EmbeddedStore(folder / 'tables')
        load_dataset(tables, folder / 'generated', rejects_dir=folder / 'r1')
        tables_s = time.perf_counter() - start
        scans = tables.table('scans').select(['event_id', 'code', 'action', 'party_id', 'counterparty_id', 'ts', 'region_id'])
        (folder / 'epcis').mkdir()
        for path in (folder / 'generated').glob('*.csv'):
            if not path.name.startswith('scans'):
                (folder / 'epcis' / path.name).symlink_to(path)
        (folder / 'epcis' / 'scans.jsonld').write_text(json.dumps(scans_document(scans.to_pylist())))
        start = time.perf_counter()
        report = load_dataset(EmbeddedStore(folder / 'documents'), folder / 'epcis', rejects_dir=folder / 'r2')
        epcis_s = time.perf_counter() - start
        result = {{'scans': scans.num_rows, 'tables_s': round(tables_s, 2), 'epcis_s': round(epcis_s, 2),
                   'epcis_accepted_scans': report.accepted['scans']}}
    """)
    shutil.rmtree(folder, ignore_errors=True)
    return [{"benchmark": f"load scale {scale} from tables", "seconds": result["tables_s"], "scans": result["scans"]},
            {"benchmark": f"load scale {scale}, scans as one EPCIS document (eventIDs given)",
             "seconds": result["epcis_s"], "scans": result["epcis_accepted_scans"],
             "peak_rss_mib": result["peak_rss_mib"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    folder = DATA / "epcis"
    paths = write_documents(folder, args.events)
    rows = [bench_read(form, path, args.events) for form, path in paths.items()]
    rows += bench_scenario(args.scale, folder / "scenario")
    write_results("EPCIS documents", rows, "Hashing (no eventID) is the reference implementation's cost "
                  "(epcis-event-hash-generator; JSON-LD expansion with pyld for JSON).")


if __name__ == "__main__":
    main()
