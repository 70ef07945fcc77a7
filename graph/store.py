"""The store interface and its factory. Only `graph.neo4j_store` imports `neo4j`."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from graph.settings import Settings
    from graph.timeline import Timeline
    from loaders.validate import Validated


class Store(Protocol):
    """A place channelgraph loads into and queries. Both backends give identical answers."""

    uri: str

    def stored(self, table: str, keys: pa.Array) -> pa.Table:
        """Stored rows (typed canonical columns) of `table` whose key is in `keys` (keys may
        repeat, and be null: a null matches nothing)."""

    def regions(self) -> pa.Table:
        """All stored regions."""

    def parties(self) -> pa.Table:
        """All stored parties (canonical columns, then unknown columns)."""

    def loading(self) -> AbstractContextManager[Path]:
        """Held for a whole load (validation, then `apply`): yields a scratch folder for the
        rows validation sets aside, removed afterwards."""

    def apply(self, validated: Validated) -> None:
        """Merge validated rows atomically: all of them become visible, or none do."""

    def timelines(self, units: Sequence[str] | None = None) -> Timeline:
        """Timelines (graph/timeline.py) of the given codes, or of every unit."""

    def timeline_batches(self) -> Iterator[Timeline]:
        """Timelines covering every unit the diversion judge could find diverted or
        untracked, in batches that each hold whole cases."""

    def purchases(self, parties: Sequence[str] | None = None) -> pa.Table:
        """One row per unit bought, by unit code: party_id, ts, code (the unit), sku
        (inherited from the nearest packed-in code that has one), unit_price (0 if unknown).
        A unit is bought by its first live (not retracted) `scan` among its effective
        events, in event order (docs/design.md): a scan of a case buys each unit inside,
        a repeat scan buys nothing. `parties`: only the units whose buyer is one of them."""

    def unit_count(self) -> int:
        """Unit-level codes held."""

    def counts(self) -> dict[str, int]:
        """Rows held per table."""

    def close(self) -> None: ...


def open_store(settings: Settings) -> Store:
    """The Neo4j store when `settings.neo4j` is set, else the embedded store."""
    if settings.neo4j:
        from graph.neo4j_store import Neo4jStore

        return Neo4jStore.connect(settings)
    from graph.embedded import EmbeddedStore

    return EmbeddedStore(settings.store)
