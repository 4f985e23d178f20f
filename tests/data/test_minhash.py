"""MinHash signatures and the LSH index, against exact Jaccard similarities and datasketch's own MinHash."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash

from lightrlhf.data.minhash import EMPTY, NearDuplicateIndex, bands_for, densify, shingle_hashes, signatures, similarity


def shingles(text: str, size: int = 5) -> set[str]:
    return {text[i:i + size] for i in range(len(text) - size + 1)} or {text}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def test_shingles_stay_inside_their_text():
    hashes, owner = shingle_hashes(["abcdefg", "xy", "hijklmn"], 5)
    assert owner.tolist() == [0, 0, 0, 1, 2, 2, 2]  # 3 + 1 (a short text is one shingle) + 3
    again, _ = shingle_hashes(["hijklmn"], 5)
    assert hashes[4:].tolist() == again.tolist()  # the same shingle hashes the same wherever it is


def edited(rng: random.Random, text: str, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        chars[rng.randrange(len(chars))] = rng.choice("xyzqw")
    return "".join(chars)


def test_the_estimate_follows_the_exact_jaccard_like_datasketch():
    rng = random.Random(0)
    words = ["river", "stone", "light", "quiet", "garden", "window", "signal", "mirror"]
    base = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
    pairs = [(text, edited(rng, text, rng.randrange(1, 30))) for text in base]
    ours = signatures([t for pair in pairs for t in pair], 128, 5).reshape(len(pairs), 2, 128)
    estimates = similarity(ours[:, 0], ours[:, 1])
    exact = np.array([jaccard(a, b) for a, b in pairs])
    reference = []
    for a, b in pairs:
        m1, m2 = MinHash(num_perm=128), MinHash(num_perm=128)
        m1.update_batch([s.encode() for s in shingles(a)])
        m2.update_batch([s.encode() for s in shingles(b)])
        reference.append(m1.jaccard(m2))
    ours_error = np.abs(estimates - exact).mean()
    assert ours_error < 0.05
    assert ours_error < 1.5 * np.abs(np.array(reference) - exact).mean() + 0.01  # as good as datasketch's


def test_densified_bins_are_never_empty_and_equal_texts_agree():
    sparse = signatures(["short", "short", "a much longer text with many shingles in it"], 64, 5)
    assert (sparse[0] == EMPTY).sum() == 63  # one shingle, one bin
    dense = densify(sparse)
    assert (dense != EMPTY).all() and (dense[0] == dense[1]).all() and (dense[0] != dense[2]).mean() > 0.9


def test_the_index_finds_near_duplicates_and_only_them():
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdefghij ") for _ in range(300)) for _ in range(200)]
    planted = {200 + i: i * 7 for i in range(20)}  # row -> the earlier row it copies with one edit
    texts += [edited(rng, texts[original], 1) for original in planted.values()]
    index = NearDuplicateIndex(0.85, 64)
    found = np.concatenate([index.add(signatures(texts[i:i + 64], 64, 5)) for i in range(0, len(texts), 64)])
    assert {i: int(m) for i, m in enumerate(found) if m >= 0} == planted


def test_bands_come_from_datasketch():
    bands, rows = bands_for(0.85, 64)
    assert bands * rows <= 64 and (bands, rows) == (7, 9)


@pytest.mark.parametrize("num_perm", [8, 256])
def test_any_power_of_two(num_perm):
    assert signatures(["some text here"], num_perm, 5).shape == (1, num_perm)
