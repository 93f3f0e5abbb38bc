"""Preparing a text corpus for a language model: de-duplication and leakage-free splits (chapter 9).

What :mod:`course_lib.tokenizers` does not already provide (:mod:`course_lib.lm_data` builds on it):

- :func:`shingles` / :func:`jaccard` — a text as the set of its word n-grams, and the overlap of
  two such sets. Two editions of one play share far more n-grams than two different plays.
- :func:`near_duplicate_pairs` — every pair of texts whose exact Jaccard similarity reaches a
  threshold (all pairs, exact: fine for a few hundred documents).
- :func:`shingle_hashes` — the same shingles as sorted 64-bit hashes, computed in NumPy: fast set
  operations on whole plays.
- :func:`minhash_signatures` / :func:`minhash_similarity` — MinHash: a short signature per text
  whose agreement estimates the Jaccard similarity, so millions of documents can be compared
  without ever intersecting their shingle sets.
- :func:`grouped_split` — a train/validation split that keeps every group (a play, with all its
  editions) on one side. :func:`course_lib.lm_data.split_by_work` applies it to the corpus.
- :func:`contamination` — the share of a validation text's n-grams already seen in training:
  what a leaky split costs.
- :func:`train_bpe`, :func:`bpe_encode`, :func:`bpe_decode` — the chapter's BPE exercises as
  plain functions, answered by :mod:`course_lib.tokenizers` (one implementation serves both).

Conventions (so that any correct implementation agrees with these):

- words are ``re.findall(r"\\w+", text.lower())``; the shingles of a text are the *set* of tuples
  of ``n`` consecutive words; a text with fewer than ``n`` words has none;
- ``jaccard(a, b) = |a & b| / |a | b|``, and 0.0 when both sets are empty.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from functools import lru_cache

import numpy as np

from course_lib.tokenizers import BPETokenizer, learn_merges, split_chunks

_WORD_RE = re.compile(r"\w+")
# Shingle hashes combine the crc32 of their words with a multiplier, modulo 2^64; MinHash keeps
# the top 32 bits of a random affine map of them, so 2^32 is above every hash (an empty document).
_EMPTY = 1 << 32
_ROLL = 0x9E3779B97F4A7C15  # an odd 64-bit multiplier (the golden ratio's)
_MASK64 = (1 << 64) - 1


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (runs of letters, digits or underscores)."""
    return _WORD_RE.findall(text.lower())


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """The set of word ``n``-grams of ``text`` (empty when it has fewer than ``n`` words)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = words(text)
    return set(zip(*(w[i:] for i in range(n)), strict=False))


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|``; 0.0 for two empty sets."""
    if not a and not b:
        return 0.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.1,
                         n: int = 3) -> list[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, whose word ``n``-gram Jaccard similarity is at least
    ``threshold``, sorted."""
    sets = [shingles(t, n) for t in texts]
    return [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
            if jaccard(sets[i], sets[j]) >= threshold]


def jaccard_matrix(texts: Sequence[str], n: int = 3) -> np.ndarray:
    """Exact pairwise Jaccard similarities (ones on the diagonal), ``float64`` ``(len, len)``."""
    sets = [shingles(t, n) for t in texts]
    out = np.eye(len(sets))
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            out[i, j] = out[j, i] = jaccard(sets[i], sets[j])
    return out


# ---------------------------------------------------------------------------------------------
# MinHash
# ---------------------------------------------------------------------------------------------


def _hash_shingles(items: Iterable[tuple[str, ...]]) -> np.ndarray:
    """A stable 64-bit hash of each shingle of a set, combined from its words' hashes exactly as
    :func:`shingle_hashes` combines them (Python's ``hash`` changes from run to run)."""
    hashes = []
    for shingle in items:
        h = 0
        for word in shingle:
            h = (h * _ROLL + zlib.crc32(word.encode("utf-8"))) & _MASK64
        hashes.append(h)
    return np.unique(np.array(hashes, dtype=np.uint64))


@lru_cache(maxsize=512)
def _word_hashes(text: str) -> np.ndarray:
    """The crc32 of each word of ``text``, ``uint64`` (each distinct word hashed once)."""
    table: dict[str, int] = {}
    codes = [table.setdefault(w, len(table)) for w in words(text)]
    distinct = np.array([zlib.crc32(w.encode("utf-8")) for w in table], dtype=np.uint64)
    return distinct[np.asarray(codes, dtype=np.int64)] if codes else np.zeros(0, dtype=np.uint64)


@lru_cache(maxsize=512)
def shingle_hashes(text: str, n: int = 3) -> np.ndarray:
    """The distinct word ``n``-grams of ``text`` as sorted 64-bit hashes (``uint64``).

    The same shingles as :func:`shingles`, but computed in NumPy: each word is hashed once and an
    n-gram's hash is ``((h1 * B + h2) * B + h3) mod 2^64``. Two different n-grams of a corpus
    this size collide with negligible probability, so set operations on these arrays
    (``np.intersect1d``, ``np.isin``) stand in for set operations on the shingles, much faster.
    Cached: the corpus's works are hashed once per process.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = _word_hashes(text)
    if len(w) < n:
        return np.zeros(0, dtype=np.uint64)
    length = len(w) - n + 1
    h = np.zeros(length, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(_ROLL) + w[k:k + length]
    out = np.unique(h)
    out.flags.writeable = False  # cached: nobody may change it in place
    return out


def minhash_signatures(docs: Sequence[set[tuple[str, ...]] | np.ndarray], num_perm: int = 128,
                       seed: int = 0) -> np.ndarray:
    """MinHash signatures, ``int64`` of shape ``(len(docs), num_perm)``.

    Each document is a set of shingles or the array :func:`shingle_hashes` returns. Entry ``k`` of
    a signature is the smallest value of the random hash function ``h_k`` over the document's
    shingles, here *multiply-shift* hashing: the top 32 bits of ``a_k x + b_k mod 2^64`` for a
    random odd ``a_k``. Two sets have the same minimum under ``h_k`` with probability (very
    nearly) equal to their Jaccard similarity, so the fraction of agreeing entries estimates it
    (standard error ``sqrt(J (1 - J) / num_perm)``). An empty document gets ``2^32`` everywhere.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    out = np.full((len(docs), num_perm), _EMPTY, dtype=np.int64)
    for row, doc in enumerate(docs):
        hashes = doc if isinstance(doc, np.ndarray) else _hash_shingles(doc)
        for start in range(0, len(hashes), 8192):  # bounded memory: 8192 x num_perm at a time
            block = (hashes[start:start + 8192, None] * a + b) >> np.uint64(32)  # mod 2^64, top bits
            out[row] = np.minimum(out[row], block.min(axis=0).astype(np.int64))
    return out


def minhash_similarity(signatures: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of every pair of rows: the fraction of equal entries."""
    sig = np.asarray(signatures)
    return (sig[:, None, :] == sig[None, :, :]).mean(axis=2)


# ---------------------------------------------------------------------------------------------
# Splitting without leakage
# ---------------------------------------------------------------------------------------------


def grouped_split(groups: Sequence[Hashable], sizes: Sequence[float], val_fraction: float = 0.1,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` (each sorted) of a split that never separates a group.

    The distinct groups are sorted and shuffled with ``np.random.default_rng(seed)``; whole groups
    go to validation in that order until it holds at least ``val_fraction`` of the total size.
    So the validation share overshoots the target by less than one group, and the same seed gives
    the same split. At least one group is left for training.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(groups) != len(sizes):
        raise ValueError(f"{len(groups)} groups but {len(sizes)} sizes")
    size_of: dict[Hashable, float] = {}
    for group, size in zip(groups, sizes, strict=True):
        size_of[group] = size_of.get(group, 0) + size
    names = sorted(size_of)
    if len(names) < 2:
        raise ValueError("a split needs at least two groups")
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(size_of.values())
    val_groups: set[Hashable] = set()
    val_size = 0.0
    for i in order:
        if val_size >= val_fraction * total or len(val_groups) == len(names) - 1:
            break
        val_groups.add(names[i])
        val_size += size_of[names[i]]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    return train, val


def leaked_groups(groups: Sequence[Hashable], train: Iterable[int], val: Iterable[int]) -> set:
    """The groups that have members on both sides of a split."""
    return {groups[i] for i in train} & {groups[i] for i in val}


def contamination(train_texts: Iterable[str], val_texts: Iterable[str], n: int = 8) -> float:
    """The fraction of the validation texts' distinct word ``n``-grams that also occur in training.

    Long n-grams (8 words) are almost never shared by chance between different plays, so this
    measures how much of the validation set the model could have memorised.
    """
    train = [shingle_hashes(t, n) for t in train_texts]
    val = [shingle_hashes(t, n) for t in val_texts]
    seen = np.unique(np.concatenate(train)) if train else np.zeros(0, dtype=np.uint64)
    held = np.unique(np.concatenate(val)) if val else np.zeros(0, dtype=np.uint64)
    return float(np.isin(held, seen, assume_unique=True).mean()) if len(held) else 0.0


# ---------------------------------------------------------------------------------------------
# BPE in the exercises' shapes (the reference answers; the work is done by course_lib.tokenizers)
# ---------------------------------------------------------------------------------------------


def train_bpe(text: str, num_merges: int) -> list[tuple[int, int]]:
    """The merges :class:`course_lib.tokenizers.BPETokenizer` learns from ``text``."""
    return learn_merges(Counter(split_chunks(text)), num_merges)


def bpe_encode(text: str, merges: Sequence[tuple[int, int]]) -> list[int]:
    """The ids of ``text`` under the learned ``merges``."""
    return BPETokenizer(merges).encode(text)


def bpe_decode(ids: Iterable[int], merges: Sequence[tuple[int, int]]) -> str:
    """The text of ``ids`` (bytes that are not valid UTF-8 become U+FFFD)."""
    return BPETokenizer(merges).decode(ids)
