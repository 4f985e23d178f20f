"""Near-duplicate detection: MinHash signatures of character shingles and a banded LSH index.

A text's shingles are its character `size`-grams (a text shorter than that is one shingle), so
Chinese, which has no spaces, is compared the same way as English. Two texts are near-duplicates
when the Jaccard similarity of their shingle sets is at least the threshold.

Signatures are one-permutation hashes (Li, Owen & Zhang 2012): every shingle is hashed once, the
high bits pick one of `num_perm` bins and each bin keeps its smallest hash. The fraction of equal
non-empty bins estimates the Jaccard similarity. For the LSH index, bins left empty by a short text
are filled by rotation densification (Shrivastava & Li 2014: borrow the next non-empty bin to the
right, offset by the distance), so equal bands mean similar texts, not two empty ones.

Why not datasketch's MinHash and MinHashLSH on this path: measured on the 2-core machine,
`MinHash.bulk` took ~680 us per 240-character text and `MinHashLSH` query + insert ~200 us, with a
Python set per bucket (KBs per text): a million rows would take ~15 minutes and GBs. Here a whole
batch is hashed at once in numpy, and the index keeps each band's keys in a sorted array (12 bytes
per row and band) and each signature as 16-bit values (b-bit MinHash, Li & Koenig 2010: two
different 16-bit values collide once in 65536). datasketch still chooses the bands: `bands_for`
weighs false negatives over false positives because every candidate is verified on its signature.
"""

from __future__ import annotations

import numpy as np
from datasketch.lsh import _optimal_param

EMPTY = np.uint32(0xFFFFFFFF)  # an empty bin; real values are kept below it
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's constants
_STEP = np.uint64(0x100000001B3)  # FNV's 64-bit prime, to fold the next character into a shingle's hash
_ROTATE = np.uint64(0x9E3779B1)  # densification offset per bin of distance (an odd 32-bit constant)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit affects every output bit."""
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def shingle_hashes(texts: list[str], size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every character `size`-gram, index of the text it is from), all texts at once."""
    padded = [t if len(t) >= size else t + "\uffff" * (size - len(t)) for t in texts]
    lengths = np.fromiter((len(t) for t in padded), dtype=np.int64, count=len(padded))
    points = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(points) - size + 1
    # detail: in-place arithmetic; a million rows are hundreds of millions of shingles
    hashes = points[:count] + np.uint64(seed)
    for offset in range(1, size):
        hashes *= _STEP
        hashes ^= points[offset:offset + count]
    _mix(hashes)
    ends = np.cumsum(lengths)
    valid = np.ones(count, dtype=bool)
    for back in range(1, size):  # a shingle starting in a text's last size-1 characters runs into the next
        starts = ends - back
        valid[starts[starts < count]] = False
    owner = np.repeat(np.arange(len(padded)), lengths - size + 1)
    return hashes[valid], owner


def signatures(texts: list[str], num_perm: int, size: int, seed: int = 0) -> np.ndarray:
    """One-permutation MinHash of each text: uint32 [len(texts), num_perm], EMPTY where a bin got no shingle."""
    bits = num_perm.bit_length() - 1
    hashes, owner = shingle_hashes(texts, size, seed)
    bins = (hashes >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(hashes), np.int64)
    values = np.minimum((hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32), EMPTY - np.uint32(1))
    flat = np.full(len(texts) * num_perm, EMPTY, dtype=np.uint32)
    np.minimum.at(flat, owner * num_perm + bins, values)
    return flat.reshape(len(texts), num_perm)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of row pairs of two sparse signatures: equal bins over bins not
    empty in both (Li, Owen & Zhang 2012, the estimator that needs no densification)."""
    used = (a != EMPTY) | (b != EMPTY)
    return ((a == b) & used).sum(axis=-1) / np.maximum(used.sum(axis=-1), 1)


def densify(sparse: np.ndarray) -> np.ndarray:
    """Each empty bin takes the next non-empty bin to its right (circularly), plus an offset per step
    of distance (rotation densification); a row without any shingle cannot occur (see shingle_hashes)."""
    rows, k = sparse.shape
    column = np.arange(k)
    filled = sparse != EMPTY
    # index of the first non-empty bin at or after each bin, over the row written out twice
    nearest = np.where(np.concatenate([filled, filled], axis=1), np.arange(2 * k), 2 * k)
    nearest = np.minimum.accumulate(nearest[:, ::-1], axis=1)[:, ::-1][:, :k]
    distance = (nearest - column).astype(np.uint64)
    borrowed = sparse[np.arange(rows)[:, None], nearest % k].astype(np.uint64)
    return ((borrowed + distance * _ROTATE) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def bands_for(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH would use, weighted 9:1 against false
    negatives: a false candidate costs one signature comparison, a missed one is never found."""
    return _optimal_param(threshold, num_perm, 0.1, 0.9)


class NearDuplicateIndex:
    """The rows seen so far; `add` answers, for each new row, which earlier row it near-duplicates.

    A row is compared with every earlier row given to the index (its first row per band key), so a
    chain of near-duplicates collapses to its first row. Memory: 2 * num_perm bytes per row for the
    signature and 12 bytes per row and band for the keys."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows_per_band = bands_for(threshold, num_perm)
        self.keys = [np.empty(0, np.uint64) for _ in range(self.bands)]  # sorted band keys ...
        self.owners = [np.empty(0, np.int64) for _ in range(self.bands)]  # ... and the first row with each
        self.stored = np.empty((1024, num_perm), np.uint16)
        self.size = 0

    def _band_keys(self, dense: np.ndarray) -> np.ndarray:
        keys = np.zeros((len(dense), self.bands), np.uint64)
        for band in range(self.bands):
            start = band * self.rows_per_band
            key = np.full(len(dense), np.uint64(band) + _STEP, np.uint64)
            for column in range(start, start + self.rows_per_band):
                key ^= dense[:, column].astype(np.uint64)
                _mix(key)
            keys[:, band] = key
        return keys

    def add(self, sparse: np.ndarray) -> np.ndarray:
        """For each row of `sparse` (signatures, in stream order): the number of the earlier row it
        near-duplicates (rows are numbered from 0 in the order they were added), or -1."""
        dense = densify(sparse)
        low = (dense & np.uint32(0xFFFF)).astype(np.uint16)
        first, count = self.size, len(dense)
        self._store(low)
        keys = self._band_keys(dense)
        candidates = np.full((count, self.bands), -1, np.int64)
        own = np.arange(first, first + count)
        for band in range(self.bands):
            known, owners, key = self.keys[band], self.owners[band], keys[:, band]
            position = np.minimum(np.searchsorted(known, key), max(len(known) - 1, 0))
            seen = (known[position] == key) if len(known) else np.zeros(count, bool)
            # within the batch: the first row with the same key, when it comes earlier
            order = np.argsort(key, kind="stable")
            run_start = np.r_[True, key[order][1:] != key[order][:-1]]
            first_in_run = np.empty(count, np.int64)
            first_in_run[order] = order[np.maximum.accumulate(np.where(run_start, np.arange(count), 0))]
            local = np.where(first_in_run < np.arange(count), first + first_in_run, -1)
            candidates[:, band] = np.where(seen, owners[position] if len(known) else -1, local)
            fresh = ~seen & run_start[np.argsort(order)]  # a key's first row, not in the index yet
            new = np.argsort(key[fresh])  # detail: np.insert keeps the order only of sorted values
            new_keys, new_owners = key[fresh][new], own[fresh][new]
            merged_at = np.searchsorted(known, new_keys)
            self.keys[band] = np.insert(known, merged_at, new_keys)
            self.owners[band] = np.insert(owners, merged_at, new_owners)
        found = candidates >= 0
        compared = self.stored[np.where(found, candidates, 0)]  # [count, bands, num_perm]
        score = np.where(found, (compared == low[:, None, :]).mean(axis=-1), -1.0)
        best = score.argmax(axis=1)
        match = candidates[np.arange(count), best]
        return np.where(score[np.arange(count), best] >= self.threshold, match, -1)

    def _store(self, low: np.ndarray) -> None:
        needed = self.size + len(low)
        if needed > len(self.stored):
            grown = np.empty((max(needed, 2 * len(self.stored)), self.num_perm), np.uint16)
            grown[: self.size] = self.stored[: self.size]
            self.stored = grown
        self.stored[self.size: needed] = low
        self.size = needed
