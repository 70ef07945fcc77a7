"""Small helpers shared by the analyses."""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from graph.timeline import Timeline


def iso(value: object) -> str | None:
    """A UTC instant as ISO 8601 with `Z` (microseconds only when non-zero)."""
    if value is None or (not isinstance(value, datetime) and pd.isna(value)):
        return None
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    moment = ts.to_pydatetime().astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds") + "Z"


def judging_context(store, timeline: Timeline) -> tuple[pa.Table, pa.Table]:  # noqa: ANN001 - any Store
    """The parties named by the timeline's events, and the whole region tree."""
    events = timeline.events
    ids = pc.unique(pa.concat_arrays([
        pc.drop_null(events.column("party_id").combine_chunks()),
        pc.drop_null(events.column("counterparty_id").combine_chunks()),
    ])) if events.num_rows else pa.array([], pa.string())
    return store.stored("parties", ids), store.regions()
