"""Unit tests of course_lib.data_prep: shingles, Jaccard, MinHash, grouped splits, contamination."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from course_lib import data_prep as dp
from course_lib import lm_data


def test_words_and_shingles():
    assert dp.words("To be, or NOT to_be 2!") == ["to", "be", "or", "not", "to_be", "2"]
    assert dp.shingles("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert dp.shingles("a b a b a", 2) == {("a", "b"), ("b", "a")}  # a set: repeats count once
    assert dp.shingles("a b", 3) == set()
    assert dp.shingles("", 1) == set()
    with pytest.raises(ValueError):
        dp.shingles("a b", 0)


def test_jaccard_values():
    assert dp.jaccard(set(), set()) == 0.0
    assert dp.jaccard({1}, set()) == 0.0
    assert dp.jaccard({1, 2}, {1, 2}) == 1.0
    assert dp.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5, abs=1e-15)
    assert dp.jaccard({1, 2, 3, 4}, {4, 5}) == pytest.approx(0.2, abs=1e-15)


def test_near_duplicate_pairs_threshold_is_inclusive_and_sorted():
    texts = ["a b c d e", "b c d e f", "x y z w v", "a b c d e"]
    # texts 0 and 1 share 2 of 4 trigrams: exactly 0.5; 0 and 3 are identical.
    assert dp.near_duplicate_pairs(texts, threshold=0.5, n=3) == [(0, 1), (0, 3), (1, 3)]
    assert dp.near_duplicate_pairs(texts, threshold=0.51, n=3) == [(0, 3)]
    m = dp.jaccard_matrix(texts, n=3)
    assert m.shape == (4, 4) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(0.5, abs=1e-15) and m[0, 2] == 0


def test_editions_of_a_play_are_near_duplicates_and_other_plays_are_not():
    names = ["hamlet_gut", "macbeth_gut", "hamlet_gut_f", "macbeth_gut_f", "sonnets_gut"]
    texts = lm_data.work_texts(names)
    m = dp.jaccard_matrix(texts, n=3)
    assert m[0, 2] > 0.2 and m[1, 3] > 0.2, m  # measured: 0.30 and 0.28
    others = [m[i, j] for i in range(5) for j in range(i + 1, 5) if (i, j) not in ((0, 2), (1, 3))]
    assert max(others) < 0.05, m  # measured: at most 0.012
    assert dp.near_duplicate_pairs(texts, threshold=0.1) == [(0, 2), (1, 3)]


def test_minhash_estimates_jaccard_within_its_standard_error():
    rng = random.Random(0)
    num_perm = 256
    errors = []
    for overlap in (0, 100, 500, 900, 1000):
        a = {(f"w{i}",) for i in range(1000)}
        b = {(f"w{i}",) for i in range(1000 - overlap, 2000 - overlap)}
        exact = dp.jaccard(a, b)
        sig = dp.minhash_signatures([a, b], num_perm=num_perm, seed=rng.randrange(1000))
        assert sig.shape == (2, num_perm) and sig.dtype == np.int64
        estimate = dp.minhash_similarity(sig)[0, 1]
        se = math.sqrt(exact * (1 - exact) / num_perm)
        assert abs(estimate - exact) <= 4 * se + 1e-12, (overlap, exact, estimate)
        errors.append(abs(estimate - exact))
    assert max(errors[1:4]) > 0  # an estimate, not a copy of the exact value


def test_shingle_hashes_are_the_shingles():
    text = "Who's there? Nay, answer me: stand, and unfold yourself. Who's there? " * 3
    for n in (1, 3, 5):
        hashes = dp.shingle_hashes(text, n)
        assert hashes.dtype == np.uint64 and np.all(np.diff(hashes.astype(np.float64)) >= 0)
        assert len(hashes) == len(dp.shingles(text, n))  # no collisions among a handful
        assert np.array_equal(dp.minhash_signatures([dp.shingles(text, n)], 32),
                              dp.minhash_signatures([hashes], 32))
    assert len(dp.shingle_hashes("a b", 3)) == 0
    a, b = lm_data.work_texts(["hamlet_gut", "hamlet_gut_f"])
    exact = dp.jaccard(dp.shingles(a), dp.shingles(b))
    ha, hb = dp.shingle_hashes(a), dp.shingle_hashes(b)
    common = len(np.intersect1d(ha, hb, assume_unique=True))
    assert common / (len(ha) + len(hb) - common) == pytest.approx(exact, abs=1e-4)


def test_minhash_is_deterministic_and_diagonal_is_one():
    sets = [dp.shingles("the cat sat on the mat"), dp.shingles("the cat sat on a hat"), set()]
    s1, s2 = dp.minhash_signatures(sets, 64, seed=3), dp.minhash_signatures(sets, 64, seed=3)
    assert np.array_equal(s1, s2)
    assert not np.array_equal(s1, dp.minhash_signatures(sets, 64, seed=4))
    sim = dp.minhash_similarity(s1)
    assert np.allclose(np.diag(sim), 1.0) and np.allclose(sim, sim.T)
    assert sim[0, 2] == 0.0


def _check_split(groups, sizes, fraction, train, val):
    assert sorted(train + val) == list(range(len(groups)))
    assert train == sorted(train) and val == sorted(val)
    assert not dp.leaked_groups(groups, train, val)
    share = sum(sizes[i] for i in val) / sum(sizes)
    biggest = max(sum(s for g2, s in zip(groups, sizes, strict=True) if g2 == g) for g in set(groups))
    assert fraction - 1e-12 <= share <= fraction + biggest / sum(sizes) + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_grouped_split_keeps_groups_together(seed):
    rng = np.random.default_rng(100 + seed)
    groups = [f"g{int(k)}" for k in rng.integers(0, 30, 200)]
    sizes = [float(s) for s in rng.uniform(1, 10, 200)]
    train, val = dp.grouped_split(groups, sizes, 0.2, seed=seed)
    _check_split(groups, sizes, 0.2, train, val)
    assert (train, val) == dp.grouped_split(groups, sizes, 0.2, seed=seed)


def test_grouped_split_seeds_differ_and_errors():
    groups = [i // 2 for i in range(40)]
    splits = {tuple(dp.grouped_split(groups, [1] * 40, 0.25, seed=s)[1]) for s in range(6)}
    assert len(splits) > 1
    with pytest.raises(ValueError):
        dp.grouped_split(groups, [1] * 40, 1.0)
    with pytest.raises(ValueError):
        dp.grouped_split(["a", "a"], [1, 1], 0.5)
    train, val = dp.grouped_split(["a", "b"], [1, 100], 0.99)
    assert train and val  # one group always stays in training


def test_contamination():
    assert dp.contamination(["a b c d e f"], ["a b c d e f"], n=3) == 1.0
    assert dp.contamination(["a b c d e f"], ["x y z"], n=3) == 0.0
    assert dp.contamination(["a b c d"], ["a b c x"], n=3) == pytest.approx(0.5, abs=1e-15)
    assert dp.contamination([], [], n=3) == 0.0


def test_bpe_wrappers_agree_with_the_tokenizer():
    text = "To be, or not to be: that is the question. Ay, there's the rub — naïve café 😀\n"
    merges = dp.train_bpe(text * 3, 40)
    assert len(merges) == 40 and merges[0][0] < 256 + 0 + 256
    ids = dp.bpe_encode(text, merges)
    assert len(ids) < len(text.encode("utf-8"))
    assert dp.bpe_decode(ids, merges) == text
    assert dp.bpe_decode([0xC3], merges) == "\ufffd"  # half of a character
    assert dp.train_bpe("a.a.a.", 3) == []  # merges never cross chunks
    assert dp.train_bpe("ab ba", 1) == [(32, 98)]  # a three-way tie: the smallest pair
