"""String keys (codes, event ids, party ids) matched and ordered by sorting integers.

Arrow's and pandas' hash tables take about a microsecond a row on big string columns on
the 2-core machines we run on; sorting 64-bit integers is many times faster. Each string
becomes its length and its bytes as big-endian 64-bit words, and a 64-bit hash of those.
Rows are grouped by one sort of (hash, row) packed into one integer; every match found so
is then checked word for word (byte for byte), and strings that merely share a hash are
decided by Arrow's exact kernels. So every function here is exact; only its speed
depends on the hash.

>>> positions(pa.array(["b", "x", None, "a"]), pa.array(["a", "b", "a"])).tolist()
[1, -1, -1, 0]
>>> first_rows(pa.array(["a", "b", "a", None])).tolist()
[0, 1, 0, -1]
>>> sort_order(pa.array(["b", "ab", None, "a"])).tolist()
[3, 1, 0, 2]
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DENSE_BYTES = 32  # bytes of each string kept as words; longer strings are compared as strings
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_KEEP = np.array([0] + [((1 << (8 * k)) - 1) << (64 - 8 * k) for k in range(1, 9)], np.uint64)  # first k bytes


def string_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`values` as one plain string array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    return values if pa.types.is_string(values.type) else values.cast(pa.string())


class _Encoded:
    """A string array as integers: byte lengths, validity, the first DENSE_BYTES bytes
    as big-endian words (zero past the end) and a 64-bit hash of all its bytes."""

    def __init__(self, values: pa.Array):
        self.values = values
        n = len(values)
        self.valid = np.ones(n, bool) if values.null_count == 0 else pc.is_valid(values).to_numpy(zero_copy_only=False)
        offsets = np.frombuffer(values.buffers()[1], np.int32, n + 1, values.offset * 4).astype(np.int64)
        data = values.buffers()[2]
        raw = np.frombuffer(data, np.uint8) if data is not None and n else np.zeros(0, np.uint8)
        self.lengths = np.where(self.valid, offsets[1:] - offsets[:-1], 0)
        longest = int(self.lengths.max()) if n else 0
        width = -(-min(longest, DENSE_BYTES) // 8) * 8
        padded = np.zeros(len(raw) + max(width, 8), np.uint8)
        padded[: len(raw)] = raw
        starts = np.minimum(offsets[:-1], len(raw))
        self.words = []
        if width:  # each row's first `width` bytes, zero past its end, as big-endian words
            matrix = np.lib.stride_tricks.as_strided(padded, (len(raw) + 1, width), (1, 1))[starts].view(">u8")
            for j in range(width // 8):
                word = matrix[:, j].astype(np.uint64)
                left = self.lengths - 8 * j
                if left.min() < 8:
                    word &= _KEEP[np.clip(left, 0, 8)]
                self.words.append(word)
        self.long = np.flatnonzero(self.lengths > DENSE_BYTES)
        h = self.lengths.astype(np.uint64) * _MULTIPLIER
        for word in self.words:
            h = _mix(h ^ word)
        rows, at = self.long, DENSE_BYTES
        eights = np.ndarray((len(raw) + 1,), ">u8", padded, 0, (1,))  # 8 bytes from every byte offset
        while len(rows):
            h[rows] = _mix(h[rows] ^ self._word(eights, starts[rows], self.lengths[rows] - at, at))
            at += 8
            rows = rows[self.lengths[rows] > at]
        self.hash = _mix(h)

    @staticmethod
    def _word(eights: np.ndarray, starts: np.ndarray, left: np.ndarray, at: int) -> np.ndarray:
        """The 8 bytes at `starts + at`, of which `left` (1..) belong to the string."""
        return eights[starts + at].astype(np.uint64) & _KEEP[np.minimum(left, 8)]

    def same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether the strings at rows `a` and rows `b` are equal (pairwise)."""
        equal = self.lengths[a] == self.lengths[b]
        for word in self.words:
            equal &= word[a] == word[b]
        long = np.flatnonzero(equal & (self.lengths[a] > DENSE_BYTES))
        if len(long):
            equal[long] = pc.equal(self.values.take(pa.array(a[long])),
                                   self.values.take(pa.array(b[long]))).to_numpy(zero_copy_only=False)
        return equal


def _mix(h: np.ndarray) -> np.ndarray:
    h = h * _MIX
    return h ^ (h >> np.uint64(31))


def _hash_runs(h: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rows` ordered by the high bits of their hash, ascending row within equal bits (one
    sort of packed integers, no argsort), and for each sorted position where its run starts."""
    bits = max(int(len(h)).bit_length(), 1)
    packed = (h[rows] >> np.uint64(bits) << np.uint64(bits)) | rows.astype(np.uint64)
    packed.sort()
    order = (packed & np.uint64((1 << bits) - 1)).astype(np.int64)
    high = packed >> np.uint64(bits)
    starts = np.ones(len(order), bool)
    starts[1:] = high[1:] != high[:-1]
    run_start = np.flatnonzero(starts)[np.cumsum(starts) - 1] if len(order) else np.zeros(0, np.int64)
    return order, run_start


def positions(values: pa.Array | pa.ChunkedArray, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row in `keys` of each value (the first, if a key repeats), -1 when absent or null."""
    values, keys = string_array(values), string_array(keys)
    out = np.full(len(values), -1, np.int64)
    if not len(values) or not len(keys):
        return out
    both = _Encoded(pa.concat_arrays([keys, values]))
    order, run_start = _hash_runs(both.hash, np.flatnonzero(both.valid))
    first = order[run_start]  # a run lists its keys first: they have the lower rows
    hit = (order >= len(keys)) & (first < len(keys))
    rows, match = order[hit], first[hit]
    same = both.same(rows, match)
    out[rows[same] - len(keys)] = match[same]
    if not same.all():  # different strings that share their hash's high bits: decided exactly
        members = order[np.isin(run_start, np.unique(run_start[hit][~same]))]
        subset_values = members[members >= len(keys)] - len(keys)
        subset_keys = members[members < len(keys)]
        found = pc.index_in(values.take(pa.array(subset_values)), value_set=keys.take(pa.array(subset_keys)))
        found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        out[subset_values] = np.where(found >= 0, subset_keys[np.maximum(found, 0)], -1)
    return out


def first_rows(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each row, the first row holding the same string (itself when first); -1 for null."""
    encoded = _Encoded(string_array(values))
    order, run_start = _hash_runs(encoded.hash, np.flatnonzero(encoded.valid))
    out = np.full(len(encoded.values), -1, np.int64)
    out[order] = order[run_start]
    later = np.flatnonzero(run_start != np.arange(len(order)))
    same = encoded.same(order[later], order[run_start[later]])
    if not same.all():  # different strings that share their hash's high bits: decided exactly
        members = np.sort(order[np.isin(run_start, np.unique(run_start[later[~same]]))])
        dictionary = pc.dictionary_encode(encoded.values.take(pa.array(members)))
        ids = dictionary.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        first = np.full(len(dictionary.dictionary), len(encoded.values), np.int64)
        np.minimum.at(first, ids, members)
        out[members] = first[ids]
    return out


def sort_order(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row order sorting the strings bytewise (Unicode code point order), stable, nulls last."""
    values = string_array(values)
    encoded = _Encoded(values)
    if len(encoded.long):
        return pc.sort_indices(pa.table({"v": values}), [("v", "ascending", "at_end")]).to_numpy()
    return np.lexsort([encoded.lengths, *reversed(encoded.words), ~encoded.valid])
