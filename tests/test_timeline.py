"""Id lookups of graph/timeline.py: `Lookup` answers as `encode`, by dict or by hash join."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from graph.timeline import Lookup, encode


@pytest.mark.parametrize("seed", range(10))
def test_lookup_answers_as_encode_for_few_and_many_values(seed):
    rng = random.Random(seed)
    names = rng.sample([f"p{i}" for i in range(3000)], rng.randint(1, 2000))
    ids = pa.array(names + names[:2], pa.string())  # a repeated id: its first row
    pool = names + ["absent", "", None]
    lookup = Lookup(pa.chunked_array([ids.slice(0, 7), ids.slice(7)]))
    for n in (0, 1, 60, 5000):  # a few values go through the dict, 5000 through the hash join
        values = pa.array([rng.choice(pool) for _ in range(n)] + names[:2], pa.string())
        assert lookup(values).tolist() == encode(values, ids).tolist()
