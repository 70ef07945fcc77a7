"""String keys matched and ordered by sorting integers (loaders/keys.py): always exact,
with strings packed into integers and with hashed strings, also when different strings
share a hash."""
from __future__ import annotations

import doctest
import multiprocessing
import random

import numpy as np
import pyarrow as pa
import pytest

from loaders import keys

ALPHABET = ["a", "b", "\x00", "é", "中", "z", "1"]  # one-, two- and three-byte characters, NUL


def random_strings(rng: random.Random, n: int, pool: list[str] | None = None, longest: int = 20) -> list[str | None]:
    """Strings of 0-`longest` characters (20: up to 60 bytes, also past keys.DENSE_BYTES),
    some null, some drawn from `pool`."""
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append(None)
        elif pool and rng.random() < 0.7:
            out.append(rng.choice(pool))
        else:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, longest))))
    return out


def check_against_python(seed: int, longest: int = 20) -> None:
    rng = random.Random(seed)
    stored = random_strings(rng, rng.randint(0, 80), longest=longest)
    asked = random_strings(rng, rng.randint(0, 80), [s for s in stored if s is not None], longest=longest + 1)
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
def test_packed_strings_match_python(seed):
    """Strings of up to 3 characters (9 bytes) pack into integers; the values asked for
    are up to a character longer and hold bytes no key has at their position."""
    check_against_python(seed, longest=3)
    stored = pa.array(random_strings(random.Random(seed), 80, longest=3), pa.string())
    assert keys.StringKeys(stored)._packing is not None


@pytest.mark.parametrize("seed", range(20))
def test_answers_do_not_depend_on_blocks(seed, monkeypatch):
    """Strings packed and values looked up in blocks of a few, many blocks on the lookup
    threads at once: the same answers as in one block."""
    monkeypatch.setattr(keys, "PACK_BLOCK", 1 + seed % 5)
    monkeypatch.setattr(keys, "BLOCK", 1 + seed % 7)
    check_against_python(seed, longest=3)
    check_against_python(seed)


def test_long_varied_strings_are_hashed():
    strings = pa.array(["".join(random.Random(i).choices(ALPHABET, k=20)) for i in range(50)])
    assert keys.StringKeys(strings)._packing is None


@pytest.mark.parametrize("seed", range(40))
def test_exact_when_every_string_shares_a_hash(seed, monkeypatch):
    monkeypatch.setattr(keys, "_mix", lambda h: h & np.uint64(3))  # four hash values for all strings
    check_against_python(seed)


@pytest.mark.parametrize("null", [False, True])
def test_many_keys_of_one_length(null):
    codes = pa.array([f"UN{i:010d}" for i in range(20_000)][::-1] + [None] * null)
    wanted = pa.array(["UN0000000007", "nope", None, "UN0000019999", "UN00000000070", "UN000000000", "UN0000090000"])
    assert keys.positions(wanted, codes).tolist() == [19_992, -1, -1, 0, -1, -1, -1]
    assert keys.sort_order(codes).tolist() == list(range(19_999, -1, -1)) + [20_000] * null
    assert keys.StringKeys(codes)._packing is not None


def test_docstring_examples():
    assert doctest.testmod(keys).failed == 0


@pytest.mark.parametrize("seed", range(10))
def test_sorted_rows_match_lexsort(seed):
    """Packed (spans that fit, steps of a common divisor) or not (spans of 2**62), the
    order is numpy's stable lexsort."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    small = rng.integers(-5, 5, n) * 1_000_000
    wide = rng.integers(-2**62, 2**62, n)
    tiny = rng.integers(0, 3, n).astype(np.int8)
    for columns in ([small], [small, tiny], [tiny, wide], [wide, small, tiny]):
        assert keys.sorted_rows(*columns).tolist() == np.lexsort(columns[::-1]).tolist()


@pytest.mark.parametrize("seed", range(30))
def test_gather_is_arrows_take(seed):
    """Fixed-width strings (the fast path), with nulls among them, sliced ones, varied
    lengths, bytes, large strings; rows repeated or not, -1 among them (a null): always
    what Arrow's take gives."""
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    width = rng.randint(1, 5)
    fixed = ["".join(rng.choice("ab1") for _ in range(width)) for _ in range(n)]
    with_nulls = [None if rng.random() < 0.3 else s for s in fixed]
    rows = np.array([rng.randrange(-1, n) if seed % 2 else rng.randrange(n) for _ in range(rng.randint(0, 2 * n))], np.int64)
    for values in (pa.array(fixed), pa.array(fixed).slice(n // 3), pa.array([s.encode() for s in fixed], pa.binary()),
                   pa.array(with_nulls), pa.array(with_nulls).slice(n // 2), pa.array([None] * n, pa.string()),
                   pa.array(fixed, pa.large_string()), pa.array(random_strings(rng, n)), pa.array(["中" * width] * n),
                   pa.array(["ab"] * (n - 1) + ["abc"])):
        at = rows[rows < len(values)]
        expected = values.take(pa.array(at, mask=at < 0))
        gathered = keys.gather(values, at)
        gathered.validate(full=True)
        assert gathered.equals(expected) and gathered.null_count == expected.null_count, values
        assert keys.gather(values, at.astype(np.int32)).to_pylist() == [values[int(i)].as_py() if i >= 0 else None for i in at]


def test_gather_of_nulls_holding_bytes():
    """A null may hold bytes (Arrow allows it): [null holding "ab", "", "cd"] is not of one
    width, whatever the lengths add up to."""
    valid = pa.array([False, True, True]).buffers()[1]
    values = pa.Array.from_buffers(pa.string(), 3, [valid, pa.py_buffer(np.array([0, 2, 2, 4], np.int32)), pa.py_buffer(b"abcd")])
    rows = np.array([2, 1, 0, -1, 1])
    assert keys.gather(values, rows).to_pylist() == ["cd", "", None, None, ""]


def test_gather_refuses_rows_out_of_range():
    for values in (pa.array(["ab", "cd"]), pa.array(["ab", None]), pa.array(["ab", "cde"])):
        with pytest.raises(IndexError):
            keys.gather(values, np.array([0, 2]))


def _look_up_in_child(values: list[str], found: multiprocessing.Queue) -> None:
    found.put(keys.positions(pa.array(values), pa.array(sorted(values))).tolist())


def test_lookups_run_in_a_forked_child():
    """A forked child has none of its parent's threads: its lookups start their own
    (an inherited executor would never run them, and the child would hang)."""
    values = [f"K{i:05d}" for i in range(999, -1, -1)]
    assert keys.positions(pa.array(values), pa.array(values)).tolist() == list(range(1000))  # the parent's threads run
    context = multiprocessing.get_context("fork")
    found = context.Queue()
    child = context.Process(target=_look_up_in_child, args=(values, found))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert found.get(timeout=5) == list(range(999, -1, -1))
