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
        for j, word in enumerate(self.words):  # only a string's own words: the hash does not depend on `width`
            h = np.where(self.lengths > 8 * j, _mix(h ^ word), h)
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

    def same(self, rows: np.ndarray, other: _Encoded, other_rows: np.ndarray) -> np.ndarray:
        """Whether the strings at `rows` equal those at `other_rows` of `other` (pairwise)."""
        equal = self.lengths[rows] == other.lengths[other_rows]
        for word, other_word in zip(self.words, other.words):  # equal lengths: missing words are zero
            equal &= word[rows] == other_word[other_rows]
        long = np.flatnonzero(equal & (self.lengths[rows] > DENSE_BYTES))
        if len(long):
            equal[long] = pc.equal(self.values.take(pa.array(rows[long])),
                                   other.values.take(pa.array(other_rows[long]))).to_numpy(zero_copy_only=False)
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


class StringKeys:
    """A string column prepared once for many exact lookups and its sort order."""

    def __init__(self, keys: pa.Array | pa.ChunkedArray):
        self.keys = string_array(keys)
        self._encoded = _Encoded(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, values: pa.Array | pa.ChunkedArray, *, among: np.ndarray | None = None) -> np.ndarray:
        """Row of each value among the keys (the first, if a key repeats; only rows where
        `among` is true count), -1 when absent or null."""
        values = string_array(values)
        out = np.full(len(values), -1, np.int64)
        n = len(self.keys)
        if not len(values) or not n:
            return out
        keys, asked = self._encoded, _Encoded(values)
        usable = keys.valid if among is None else keys.valid & among
        rows = np.concatenate([np.flatnonzero(usable), n + np.flatnonzero(asked.valid)])
        order, run_start = _hash_runs(np.concatenate([keys.hash, asked.hash]), rows)
        first = order[run_start]  # a run lists its keys first: they have the lower rows
        hit = np.flatnonzero((order >= n) & (first < n))
        out[order[hit] - n] = first[hit]
        value_rows = np.flatnonzero(out >= 0)  # checked in row order: fewer scattered reads
        same = asked.same(value_rows, keys, out[value_rows])
        if not same.all():  # different strings that share their hash's high bits: decided exactly
            sorted_at = np.empty(len(values), np.int64)
            sorted_at[order[hit] - n] = hit
            out[value_rows[~same]] = -1
            members = order[np.isin(run_start, np.unique(run_start[sorted_at[value_rows[~same]]]))]
            subset_values, subset_keys = members[members >= n] - n, members[members < n]
            found = pc.index_in(values.take(pa.array(subset_values)), value_set=self.keys.take(pa.array(subset_keys)))
            found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
            out[subset_values] = np.where(found >= 0, subset_keys[np.maximum(found, 0)], -1)
        return out

    def first_rows(self, *, among: np.ndarray | None = None) -> np.ndarray:
        """For each row, the first row holding the same string (itself when first); -1 for
        null rows and rows outside `among`."""
        encoded = self._encoded
        usable = encoded.valid if among is None else encoded.valid & among
        order, run_start = _hash_runs(encoded.hash, np.flatnonzero(usable))
        out = np.full(len(self.keys), -1, np.int64)
        out[order] = order[run_start]
        later = np.flatnonzero(run_start != np.arange(len(order)))
        same = encoded.same(order[later], encoded, order[run_start[later]])
        if not same.all():  # different strings that share their hash's high bits: decided exactly
            members = np.sort(order[np.isin(run_start, np.unique(run_start[later[~same]]))])
            dictionary = pc.dictionary_encode(self.keys.take(pa.array(members)))
            ids = dictionary.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            first = np.full(len(dictionary.dictionary), len(self.keys), np.int64)
            np.minimum.at(first, ids, members)
            out[members] = first[ids]
        return out

    def order(self) -> np.ndarray:
        """Row order sorting the strings bytewise (Unicode code point order), stable, nulls last."""
        encoded = self._encoded
        if len(encoded.long):
            return pc.sort_indices(pa.table({"v": self.keys}), [("v", "ascending", "at_end")]).to_numpy()
        keys = [encoded.lengths, *reversed(encoded.words), ~encoded.valid]  # last key sorts first
        if encoded.valid.all():
            keys.pop()
        if len(keys) > 1 and (encoded.lengths == encoded.lengths[0]).all():
            keys.pop(0)  # strings of one length: the words decide
        return np.lexsort(keys) if keys else np.arange(len(self.keys))


def positions(values: pa.Array | pa.ChunkedArray, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row in `keys` of each value (the first, if a key repeats), -1 when absent or null."""
    return StringKeys(keys).positions(values)


def first_rows(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each row, the first row holding the same string (itself when first); -1 for null."""
    return StringKeys(values).first_rows()


def sort_order(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row order sorting the strings bytewise (Unicode code point order), stable, nulls last."""
    return StringKeys(values).order()
