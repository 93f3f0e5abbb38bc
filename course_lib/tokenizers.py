"""Tokenizers: text to integer ids and back (chapters 7-10).

A language model never sees text, only integer ids from a fixed vocabulary. Two tokenizers:

- :class:`CharTokenizer` — one id per character seen in the training text. Tiny vocabulary,
  long sequences, nothing to learn. The corpus's characters are all it can encode.
- :class:`BPETokenizer` — byte-level byte-pair encoding, trained from scratch. It starts from
  the 256 byte values (so *any* text can be encoded, even characters never seen in training) and
  learns merges: the most frequent adjacent pair of ids becomes a new id, again and again, until
  the vocabulary has the requested size. Common words end up as one token, rare ones as a few.

Both share one interface: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``save(path)`` / :func:`load_tokenizer`, and optional *special tokens* (such as
``<|endoftext|>``) whose ids come after the ordinary vocabulary. Special tokens are only produced
from text when ``encode(..., allowed_special=...)`` says so: a document that happens to contain
the string ``<|endoftext|>`` must not be able to end a sequence by itself.

Conventions of the BPE (so any correct implementation agrees with this one):

- Text is first split into *chunks* by :data:`CHUNK_PATTERN` (words with their leading space,
  runs of digits, runs of punctuation, runs of whitespace). Merges never cross a chunk boundary.
- Training counts pairs inside chunks weighted by how often each chunk occurs; the most frequent
  pair is merged next; ties go to the smallest pair ``(first id, second id)``.
- A merged pair gets the next free id: 256, 257, ...
- Encoding a chunk repeatedly merges the adjacent pair with the *earliest learned* merge, all its
  occurrences left to right, until no learned pair is left.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

# Word chunks keep their leading space (" thou" is one chunk): a space almost always precedes a
# word, so merging it into the word saves a token per word. A run of spaces before a word leaves
# its last space to the word (the lookahead), so indentation does not change how the word is cut.
# Every character falls into exactly one class (letters, digits, other, whitespace), so
# ``"".join(chunks(text)) == text`` for any text: nothing is ever dropped.
CHUNK_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
_CHUNK_RE = re.compile(CHUNK_PATTERN)

AllowedSpecial = str | Iterable[str]


def split_chunks(text: str) -> list[str]:
    """Pre-tokenize ``text`` into the chunks BPE works inside (see :data:`CHUNK_PATTERN`)."""
    return _CHUNK_RE.findall(text)


class Tokenizer:
    """What every tokenizer offers. Subclasses fill in the ordinary vocabulary."""

    kind = "base"

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {special_tokens!r}")
        self.special_tokens: dict[str, int] = {
            token: self.base_vocab_size + i for i, token in enumerate(special_tokens)}
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        # Longest first, so that "<|end|>" inside "<|endoftext|>" can never win.
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None

    # -- to implement --------------------------------------------------------------------------
    @property
    def base_vocab_size(self) -> int:
        raise NotImplementedError

    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        raise NotImplementedError

    def _payload(self) -> dict:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ordinary tokens plus special tokens: the size the model's embedding table needs."""
        return self.base_vocab_size + len(self.special_tokens)

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}; "
                             f"it has {sorted(self.special_tokens)}")
        return allowed

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Token ids of ``text``.

        ``allowed_special`` is ``"none"`` (default: special-token strings in the text are encoded
        as ordinary text), ``"all"``, or the special tokens to recognise.
        """
        allowed = self._allowed(allowed_special)
        if not allowed or self._special_re is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.group() not in allowed:
                continue
            ids.extend(self._encode_ordinary(text[start:match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of ``ids``. Byte sequences that are not valid UTF-8 (a token sequence cut in
        the middle of a character) become U+FFFD with the default ``errors="replace"``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors, arrays, iterables
        if not ids:
            return ""
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            raise ValueError(f"ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
        if high < self.base_vocab_size:  # no special token: one join, the fast path
            return self._decode_bytes(ids).decode("utf-8", errors=errors)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_by_id:
                parts.append(self._decode_bytes(run).decode("utf-8", errors=errors))
                parts.append(self._special_by_id[i])
                run = []
            else:
                run.append(i)
        parts.append(self._decode_bytes(run).decode("utf-8", errors=errors))
        return "".join(parts)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its UTF-8 string)."""
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode("utf-8")
        return self._decode_bytes([token_id])

    def to_dict(self) -> dict:
        return {"type": self.kind, "version": 1, "special_tokens": list(self.special_tokens),
                **self._payload()}

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's content: caches of token ids are keyed by it."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON (read it back with :func:`load_tokenizer`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: parallel writers
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=True), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special={list(self.special_tokens)})"


class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is the sorted set of characters of the training text."""

    kind = "char"

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = ()) -> None:
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        super().__init__(special_tokens)

    @classmethod
    def train(cls, text: str, special_tokens: Sequence[str] = ()) -> CharTokenizer:
        """The tokenizer whose vocabulary is every distinct character of ``text``, sorted."""
        return cls(sorted(set(text)), special_tokens)

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars)

    def _encode_ordinary(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in this character vocabulary "
                             f"({len(self.chars)} characters from the training text)") from None

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        return "".join(map(self.chars.__getitem__, ids)).encode("utf-8")

    def _payload(self) -> dict:
        return {"chars": "".join(self.chars)}


class BPETokenizer(Tokenizer):
    """Byte-level BPE: 256 byte tokens, then one token per learned merge, then special tokens."""

    kind = "bpe"

    def __init__(self, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str] = (),
                 pattern: str = CHUNK_PATTERN) -> None:
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self._chunk_re = re.compile(pattern)
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        # The bytes of every token, built up merge by merge.
        self._vocab: list[bytes] = [bytes([b]) for b in range(256)]
        for rank, (a, b) in enumerate(self.merges):
            if not (a < 256 + rank and b < 256 + rank):
                raise ValueError(f"merge {rank} {(a, b)} uses an id that does not exist yet")
            self._vocab.append(self._vocab[a] + self._vocab[b])
        # Chunks repeat a lot in real text ("the", " and", "\n"), so each distinct chunk is merged
        # once and looked up afterwards: this is what makes encoding a whole corpus fast.
        self._chunk_cache: dict[str, tuple[int, ...]] = {}
        super().__init__(special_tokens)

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
              pattern: str = CHUNK_PATTERN) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text`` (a string or an
        iterable of documents). If every chunk becomes a single token first, training stops
        early and the vocabulary is smaller than asked for."""
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + "
                             f"{len(special_tokens)} special tokens")
        chunk_re = re.compile(pattern)
        docs = [text] if isinstance(text, str) else text
        counts: Counter[str] = Counter()
        for doc in docs:
            counts.update(chunk_re.findall(doc))
        return cls(learn_merges(counts, num_merges), special_tokens, pattern)

    @property
    def base_vocab_size(self) -> int:
        return 256 + len(self.merges)

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        ids = list(chunk.encode("utf-8"))
        ranks = self._ranks
        while len(ids) >= 2:
            best = min(zip(ids, ids[1:], strict=False), key=lambda p: ranks.get(p, 1 << 62))
            rank = ranks.get(best)
            if rank is None:
                break
            ids = merge_pair(ids, best, 256 + rank)
        return tuple(ids)

    def _encode_ordinary(self, text: str) -> list[int]:
        cache = self._chunk_cache
        if len(cache) > 500_000:  # bound memory on endless streams of new chunks
            cache.clear()
        chunks = self._chunk_re.findall(text)
        for chunk in set(chunks).difference(cache):
            cache[chunk] = self._encode_chunk(chunk)
        # map + chain keep the per-chunk loop in C: a whole corpus is millions of chunks.
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(map(self._vocab.__getitem__, ids))

    def _payload(self) -> dict:
        return {"pattern": self.pattern, "merges": [list(m) for m in self.merges]}


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, scanning left to right, by ``new_id``.

    ``merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]``: occurrences do not overlap.
    """
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_merges(chunk_counts: dict[str, int] | Counter[str], num_merges: int) -> list[tuple[int, int]]:
    """The BPE merges learned from chunk frequencies, in the order they are learned.

    Recounting every pair after every merge is quadratic; instead we keep, for each pair, its
    count and the chunks it occurs in, and after a merge only revisit the chunks that held the
    merged pair. A heap gives the most frequent pair; its stale entries (a count that has since
    changed) are skipped when popped.
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts, where = _count_pairs(words, freqs)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        pair = _pop_most_frequent(heap, pair_counts)
        if pair is None:
            break  # no pair left anywhere: every chunk is a single token
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = _merge_in_chunks(words, freqs, where, pair, new_id)
        for changed_pair, delta in changed.items():
            if delta:
                count = pair_counts[changed_pair] + delta
                pair_counts[changed_pair] = count
                if count > 0:
                    heapq.heappush(heap, (-count, changed_pair))
        pair_counts.pop(pair, None)
    return merges


def _count_pairs(words: list[list[int]], freqs: list[int]
                 ) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], set[int]]]:
    """How often each adjacent pair occurs (weighted by its chunk's frequency), and in which chunks."""
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += freq
            where[pair].add(index)
    return pair_counts, where


def _pop_most_frequent(heap: list[tuple[int, tuple[int, int]]],
                       pair_counts: dict[tuple[int, int], int]) -> tuple[int, int] | None:
    """The most frequent pair (the smallest on ties: the heap orders ``(-count, pair)``), skipping
    stale entries; None when no pair is left."""
    while heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) == -negative:
            return pair
    return None


def _merge_in_chunks(words: list[list[int]], freqs: list[int], where: dict[tuple[int, int], set[int]],
                     pair: tuple[int, int], new_id: int) -> dict[tuple[int, int], int]:
    """Merge ``pair`` into ``new_id`` in every chunk that holds it (``words`` and ``where`` updated
    in place); return how much each pair's count changed."""
    changed: dict[tuple[int, int], int] = defaultdict(int)
    for index in where.pop(pair):
        word, freq = words[index], freqs[index]
        merged = merge_pair(word, pair, new_id)
        if len(merged) == len(word):
            continue  # an index left over from before an earlier merge changed this chunk
        for old in zip(word, word[1:], strict=False):
            changed[old] -= freq
        for new in zip(merged, merged[1:], strict=False):
            changed[new] += freq
            where[new].add(index)
        words[index] = merged
    return changed


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by ``save``."""
    return tokenizer_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def tokenizer_from_dict(blob: dict) -> Tokenizer:
    kind = blob.get("type")
    special = blob.get("special_tokens", [])
    if kind == "char":
        return CharTokenizer(list(blob["chars"]), special)
    if kind == "bpe":
        return BPETokenizer([tuple(m) for m in blob["merges"]], special, blob.get("pattern", CHUNK_PATTERN))
    raise ValueError(f"unknown tokenizer type {kind!r} (expected 'char' or 'bpe')")
