"""String keys matched and ordered by sorting integers (loaders/keys.py): always exact,
also when different strings share a hash."""
from __future__ import annotations

import doctest
import random

import numpy as np
import pyarrow as pa
import pytest

from loaders import keys

ALPHABET = ["a", "b", "\x00", "é", "中", "z", "1"]  # one-, two- and three-byte characters, NUL


def random_strings(rng: random.Random, n: int, pool: list[str] | None = None) -> list[str | None]:
    """Strings of 0-20 characters (up to 60 bytes: also past keys.DENSE_BYTES), some null,
    some drawn from `pool`."""
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append(None)
        elif pool and rng.random() < 0.7:
            out.append(rng.choice(pool))
        else:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20))))
    return out


def check_against_python(seed: int) -> None:
    rng = random.Random(seed)
    stored = random_strings(rng, rng.randint(0, 80))
    asked = random_strings(rng, rng.randint(0, 80), [s for s in stored if s is not None])
    k, v = pa.array(stored, pa.string()), pa.array(asked, pa.string())
    assert keys.positions(v, k).tolist() == [stored.index(s) if s is not None and s in stored else -1 for s in asked]
    assert keys.positions(v.slice(3), k.slice(2)).tolist() == [
        stored[2:].index(s) if s is not None and s in stored[2:] else -1 for s in asked[3:]]
    assert keys.first_rows(v).tolist() == [asked.index(s) if s is not None else -1 for s in asked]
    by_bytes = sorted((s for s in stored if s is not None), key=lambda s: s.encode())
    assert [stored[i] for i in keys.sort_order(k)] == by_bytes + [None] * stored.count(None)


@pytest.mark.parametrize("seed", range(40))
def test_positions_first_rows_and_order_match_python(seed):
    check_against_python(seed)


@pytest.mark.parametrize("seed", range(40))
def test_exact_when_every_string_shares_a_hash(seed, monkeypatch):
    monkeypatch.setattr(keys, "_mix", lambda h: h & np.uint64(3))  # four hash values for all strings
    check_against_python(seed)


def test_many_keys_of_one_length():
    codes = pa.array([f"UN{i:010d}" for i in range(20_000)][::-1])
    wanted = pa.array(["UN0000000007", "nope", None, "UN0000019999"])
    assert keys.positions(wanted, codes).tolist() == [19_992, -1, -1, 0]
    assert keys.sort_order(codes).tolist() == list(range(19_999, -1, -1))


def test_docstring_examples():
    assert doctest.testmod(keys).failed == 0
