"""Exact and near-duplicate detection: MinHash estimates, LSH candidates, first occurrence kept."""

import random

import numpy as np
import pytest

from sb2.prompts.dedup import (
    candidate_pairs,
    estimated_jaccard,
    exact_duplicates,
    minhash_signatures,
    near_duplicates,
)


def _words(rng, k, vocab):
    return [rng.choice(vocab) for _ in range(k)]


def _jaccard(a, b, n):
    def sh(w):
        return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}

    x, y = sh(a.split()), sh(b.split())
    return len(x & y) / len(x | y)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_minhash_estimates_jaccard(n):
    rng = random.Random(n)
    vocab = [f"w{i}" for i in range(3000)]
    a, b, truth = [], [], []
    for _ in range(400):
        x = _words(rng, rng.randint(4, 30), vocab)
        y = list(x)
        for _ in range(rng.randint(0, len(x) // 2)):
            y[rng.randrange(len(y))] = rng.choice(vocab)
        a.append(" ".join(x))
        b.append(" ".join(y))
        truth.append(_jaccard(a[-1], b[-1], n))
    est = estimated_jaccard(minhash_signatures(a, n, 128), minhash_signatures(b, n, 128))
    err = est - np.array(truth)
    assert abs(err.mean()) < 0.01 and np.abs(err).mean() < 0.04  # sd of the estimate is sqrt(J(1-J)/128) <= 0.044


def test_signatures_are_deterministic_and_equal_for_equal_keys():
    keys = ["a red fox in the snow", "a red fox in the snow", "", "one"]
    s1, s2 = minhash_signatures(keys, 2, 64), minhash_signatures(keys, 2, 64)
    assert s1.dtype == np.uint16 and s1.shape == (4, 64)
    assert np.array_equal(s1, s2) and np.array_equal(s1[0], s1[1])
    assert estimated_jaccard(s1[0], s1[3]) < 0.2
    assert minhash_signatures([], 2, 64).shape == (0, 64)


def test_candidate_pairs_link_each_member_to_first_and_previous():
    keys = np.array([5, 7, 5, 9, 5, 7, 5], dtype=np.uint64)
    earlier, later = candidate_pairs(keys)
    assert sorted(zip(earlier.tolist(), later.tolist())) == [(0, 2), (0, 4), (0, 6), (1, 5), (2, 4), (4, 6)]
    assert len(candidate_pairs(np.arange(5, dtype=np.uint64))[0]) == 0


def test_exact_duplicates_keep_the_first():
    h = np.array([3, 1, 3, 2, 1, 3], dtype=np.uint64)
    assert exact_duplicates(h).tolist() == [False, False, True, False, True, True]


def test_planted_near_duplicates_are_found_and_nothing_else():
    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(20000)]
    originals = [" ".join(_words(rng, rng.randint(15, 25), vocab)) for _ in range(3000)]  # one edit: J >= 0.87
    keys, planted = list(originals), set()
    for i in range(300):
        w = originals[i * 7].split()
        edit = i % 3
        if edit == 0:
            w[rng.randrange(len(w))] = rng.choice(vocab)
        elif edit == 1:
            w.insert(rng.randrange(len(w)), "extra")
        else:
            w.append("8k")
        keys.append(" ".join(w))
        planted.add(len(keys) - 1)
    keys.append(originals[5])  # an exact copy is a near duplicate too
    planted.add(len(keys) - 1)
    dup = near_duplicates(minhash_signatures(keys, 1, 64), bands=16, threshold=0.7)
    found = set(np.flatnonzero(dup).tolist())
    assert found == planted


def test_near_duplicate_threshold_is_respected():
    base = " ".join(f"t{i}" for i in range(10))
    far = " ".join(f"t{i}" for i in range(5)) + " " + " ".join(f"u{i}" for i in range(5))  # J = 5/15
    sig = minhash_signatures([base, far, base], 1, 64)
    assert near_duplicates(sig, 16, 0.7).tolist() == [False, False, True]
    assert near_duplicates(sig, 64, 0.2).tolist() == [False, True, True]  # one row a band: every shared value


def test_exact_jaccard_of_shingle_sets():
    from sb2.prompts.dedup import exact_jaccard, shingle_sets

    keys = ["a b c d", "a b c e", "a a a", "x", "a b c d"]
    flat, offsets = shingle_sets(keys, 1)
    assert np.diff(offsets).tolist() == [4, 4, 1, 1, 4]  # sets: "a a a" has one shingle
    a, b = np.array([0, 0, 2, 3, 0]), np.array([1, 2, 3, 3, 4])
    assert exact_jaccard(flat, offsets, a, b).tolist() == pytest.approx([3 / 5, 1 / 4, 0.0, 1.0, 1.0])
    flat, offsets = shingle_sets(keys, 2)
    assert exact_jaccard(flat, offsets, np.array([0]), np.array([1])).tolist() == pytest.approx([2 / 4])


def test_the_estimate_nominates_and_the_exact_similarity_decides():
    from sb2.prompts.dedup import exact_jaccard, shingle_sets, similar_pairs

    keys = ["a dragon digital art", "a lighthouse digital art", "a dragon digital art 4k"]
    sig = minhash_signatures(keys, 1, 64)
    earlier, later = similar_pairs(sig, 64, 0.0)  # one row a band: every pair sharing a value
    assert sorted(zip(earlier.tolist(), later.tolist())) == [(0, 1), (0, 2), (1, 2)]
    earlier, later = similar_pairs(sig, 16, 0.7)
    # (0, 1) has J = 3/5 but an estimate above 0.7 by chance, as short templated prompts often do
    assert list(zip(earlier.tolist(), later.tolist())) == [(0, 1), (0, 2)]
    flat, offsets = shingle_sets(keys, 1)
    assert exact_jaccard(flat, offsets, earlier, later).tolist() == pytest.approx([3 / 5, 4 / 5])
