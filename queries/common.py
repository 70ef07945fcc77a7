"""Small helpers shared by the analyses."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
R = TypeVar("R")


def utc(moment: datetime | str | None) -> pd.Timestamp | None:
    """A moment as a UTC pandas Timestamp (a time without offset is UTC)."""
    if moment is None:
        return None
    ts = pd.Timestamp(moment)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def iso(value: object) -> str | None:
    """A UTC instant as ISO 8601 with `Z` (microseconds only when non-zero)."""
    if value is None or (not isinstance(value, datetime) and pd.isna(value)):
        return None
    if type(value) is datetime:  # a plain datetime (as Arrow gives them) needs no pandas
        moment = value.astimezone(timezone.utc).replace(tzinfo=None) if value.utcoffset() is not None else value
    else:
        moment = utc(value).to_pydatetime().astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds") + "Z"


def iso_column(values: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """`iso` of every UTC timestamp in `values`, vectorised."""
    text = pc.strftime(values, format="%Y-%m-%dT%H:%M:%SZ")  # %S carries the fraction: 05.000000Z
    return pc.replace_substring_regex(text, pattern=r"\.0+Z$", replacement="Z").to_pylist()


def python_columns(table: pa.Table) -> dict[str, list]:
    """A table's columns as Python lists, timestamps as ISO 8601 text (`iso`)."""
    return {name: iso_column(column) if pa.types.is_timestamp(column.type) else column.to_pylist()
            for name, column in zip(table.column_names, table.columns)}


def take_rows(values: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> pa.Array:
    """values[rows], null where a row is negative."""
    rows = np.asarray(rows, np.int64)
    return pc.take(values, pa.array(rows, mask=rows < 0))


def trusted_models(model: type[M], columns: dict[str, list]) -> list[M]:
    """Instances of `model` from equally long column lists of already valid values, one per
    row. Like `model_construct` (no validation), minus its per-field bookkeeping, which
    dominates when building millions of custody-path hops. Every field must be given."""
    names = tuple(columns)
    missing = set(model.model_fields) - set(names)
    if missing:
        raise ValueError(f"{model.__name__}: no column for {sorted(missing)}")
    fields_set = set(names)
    out = []
    for values in zip(*columns.values()):
        instance = model.__new__(model)
        object.__setattr__(instance, "__dict__", dict(zip(names, values)))
        object.__setattr__(instance, "__pydantic_fields_set__", fields_set)
        object.__setattr__(instance, "__pydantic_extra__", None)
        object.__setattr__(instance, "__pydantic_private__", None)
        out.append(instance)
    return out


def parallel_map(work: Callable[[T], R], items: Iterable[T], *, workers: int = 2) -> Iterator[R]:
    """`work` of each item, in order, on `workers` threads while the caller's thread
    produces the next item; at most `workers` items wait or run at a time, so memory
    stays bounded. Pays off for work that releases the GIL (numpy, Arrow)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
