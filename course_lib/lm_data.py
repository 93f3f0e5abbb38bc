"""From the Shakespeare corpus to batches of token ids (chapters 9-13).

The pipeline, one function per stage:

1. :func:`split_by_work` — which works are for training and which for validation. The split is
   made by *play*, not by line: neighbouring lines of one play are so alike that a line-level
   split would let the model be validated on text it has all but seen. The corpus also holds two
   editions of many plays (modern spelling ``*_gut`` and First Folio ``*_gut_f``); both editions
   of a play always land on the same side (:func:`play_of`).
2. :func:`train_tokenizer` — a character or byte-level BPE tokenizer, BPE trained on the
   training works only.
3. :func:`prepare_data` — every work cleaned (:func:`course_lib.data.shakespeare_clean`),
   encoded, joined with a separator and written once as a ``uint16`` file per split. Later runs
   map the file into memory (``np.memmap``) instead of re-encoding: a batch reads only the bytes
   it needs, and the corpus is never held twice in RAM.
4. :meth:`LMData.get_batch` — ``batch_size`` random windows of ``block_size + 1`` tokens; the
   input is the window without its last token, the target the window shifted by one. Offsets come
   from a ``torch.Generator`` you pass in, so a seeded run draws the same batches every time.

Caches (tokenizers, token files) live in ``~/.cache/neurons-to-llms`` or in the folder named by
the environment variable ``COURSE_CACHE_DIR``; they are rebuilt, never downloaded, and their
names carry a hash of everything they depend on (the split, the tokenizer, the cleaning code).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from course_lib import data as corpus
from course_lib import tokenizers
from course_lib.data_prep import grouped_split
from course_lib.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

CACHE_ENV = "COURSE_CACHE_DIR"
END_OF_TEXT = "<|endoftext|>"
TOKEN_DTYPE = np.uint16  # 2 bytes a token: enough for any vocabulary up to 65,536
_FORMAT_VERSION = 1  # bump when the cache layout or the joining rule changes

# First Folio editions whose file name does not simply add "_f" to the modern edition's.
FOLIO_TO_MODERN = {
    "all_is_well_that_ends_well_gut_f": "alls_well_that_ends_well_gut",
    "anthonie_and_cleopatra_gut_f": "antony_and_cleopatra_gut",
    "comedy_of_errours_gut_f": "comedy_of_errors_gut",
    "loves_labour_lost_gut_f": "loves_labours_lost_gut",
    "midsummer_nights_dreame_gut_f": "midsummer_nights_dream_gut",
    "titus_andronicus_gut_f": "tragedy_of_titus_andronicus_gut",
    "twelfe-night_gut_f": "twelfth_night_gut",
}


def cache_dir() -> Path:
    """The folder for token caches: ``$COURSE_CACHE_DIR`` or ``~/.cache/neurons-to-llms``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "neurons-to-llms"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# 1. Splitting by work
# ---------------------------------------------------------------------------------------------


def play_of(name: str) -> str:
    """The play a work belongs to, named by its modern edition: both editions map to one name.

    ``play_of("hamlet_gut_f") == play_of("hamlet_gut") == "hamlet_gut"``.
    """
    if name in FOLIO_TO_MODERN:
        return FOLIO_TO_MODERN[name]
    if name.endswith("_gut_f"):
        return name[: -len("_f")]
    return name


@dataclass(frozen=True)
class WorkSplit:
    """Names of the works in each split (sorted)."""

    train: tuple[str, ...]
    val: tuple[str, ...]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.train, self.val]).encode()).hexdigest()[:16]


def split_by_work(val_fraction: float = 0.1, include_folio: bool = False, seed: int = 0) -> WorkSplit:
    """Put whole plays into validation, in a seeded random order, until they hold at least
    ``val_fraction`` of the corpus's bytes; the rest is training.

    This is :func:`course_lib.data_prep.grouped_split` with each work grouped by its play
    (:func:`play_of`) and sized by its file's bytes. With ``include_folio`` both editions of each
    play are used, and always on the same side.
    """
    works = corpus.shakespeare_works(include_folio=include_folio)
    plays = [play_of(work.name) for work in works]
    sizes = [work.path.stat().st_size for work in works]
    train, val = grouped_split(plays, sizes, val_fraction=val_fraction, seed=seed)
    return WorkSplit(train=tuple(works[i].name for i in train), val=tuple(works[i].name for i in val))


@cache
def _cleaned(name: str) -> str:
    return corpus.shakespeare_clean(name)


def work_texts(names: Sequence[str]) -> list[str]:
    """The cleaned text of each named work (cleaned once per process: ~9 MB for all of them)."""
    return [_cleaned(name) for name in names]


def _cleaning_fingerprint() -> str:
    """A hash of the cleaning and tokenizer code and of the corpus files: a cache built by other
    code or from other text is stale."""
    digest = hashlib.sha256(Path(corpus.__file__).read_bytes())
    digest.update(Path(tokenizers.__file__).read_bytes())
    for work in corpus.shakespeare_works(include_folio=True):
        digest.update(f"{work.name}:{work.path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# 2. Tokenizers for the corpus
# ---------------------------------------------------------------------------------------------


def train_tokenizer(kind: str = "char", vocab_size: int = 2048, split: WorkSplit | None = None,
                    use_cache: bool = True) -> Tokenizer:
    """A tokenizer for the corpus.

    - ``"char"``: the characters of every work of the corpus (both editions). Knowing which
      characters exist says nothing about what the validation plays say, and it means every
      split can be encoded.
    - ``"bpe"``: byte-level BPE with ``vocab_size`` tokens (``<|endoftext|>`` included) learned
      from the *training* works of ``split`` only (default :func:`split_by_work`), cached.
    """
    if kind not in ("char", "bpe"):
        raise ValueError(f"unknown tokenizer kind {kind!r}: use 'char' or 'bpe'")
    split = split or split_by_work()
    if kind == "char":
        key = f"char-{_cleaning_fingerprint()}"
    else:
        key = f"bpe-{vocab_size}-{split.fingerprint()}-{_cleaning_fingerprint()}"
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if use_cache and path.exists():
        return load_tokenizer(path)
    if kind == "char":
        names = [w.name for w in corpus.shakespeare_works(include_folio=True)]
        tokenizer: Tokenizer = CharTokenizer.train("".join(work_texts(names)))
    else:
        tokenizer = BPETokenizer.train(work_texts(split.train), vocab_size, special_tokens=[END_OF_TEXT])
    if use_cache:
        tokenizer.save(path)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# 3. Token files
# ---------------------------------------------------------------------------------------------


def write_tokens(path: str | Path, ids: Sequence[int] | np.ndarray) -> Path:
    """Store token ids as a flat ``uint16`` file (written to a temporary name, then renamed)."""
    array = np.asarray(ids)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError("token ids must be in [0, 65535] to be stored as uint16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    array.astype(TOKEN_DTYPE).tofile(tmp)
    tmp.replace(path)
    return path


def read_tokens(path: str | Path) -> np.ndarray:
    """Map a file written by :func:`write_tokens` into memory (read-only, nothing loaded yet)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def encode_works(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Encode every text and join them with the separator (``<|endoftext|>`` when the tokenizer
    has it, else a blank line), so the model sees where one work ends and the next begins."""
    if END_OF_TEXT in tokenizer.special_tokens:
        separator = [tokenizer.special_tokens[END_OF_TEXT]]
    else:
        separator = tokenizer.encode("\n\n")
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.extend(separator)
        ids.extend(tokenizer.encode(text))
    return np.asarray(ids, dtype=TOKEN_DTYPE)


@dataclass
class LMData:
    """Token ids of both splits (memory-mapped when loaded from the cache) and their tokenizer."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    split: WorkSplit | None = None

    def tokens(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both ``int64`` of shape ``(batch_size, block_size)``."""
        return sample_batch(self.tokens(split), batch_size, block_size, generator, device)

    def describe(self) -> str:
        return (f"{type(self.tokenizer).__name__} (vocab {self.tokenizer.vocab_size}): "
                f"{len(self.train):,} training tokens, {len(self.val):,} validation tokens")


def sample_batch(tokens: np.ndarray, batch_size: int, block_size: int,
                 generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at random offsets of ``tokens``: ``x = w[:-1]``, ``y = w[1:]``.

    On CUDA the batch is copied from pinned memory without blocking, so the copy overlaps the
    GPU's work on the previous step instead of stalling it.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError("batch_size and block_size must be >= 1")
    if len(tokens) < block_size + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {block_size} + 1 tokens")
    offsets = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
    windows = np.asarray(tokens[offsets[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    batch = torch.from_numpy(windows)
    device = torch.device(device)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]


def iter_blocks(tokens: np.ndarray, batch_size: int, block_size: int,
                device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token once, in order: consecutive non-overlapping windows, ``batch_size`` at a time
    (the last batch may be smaller). For an exact validation loss instead of a sampled one."""
    starts = range(0, len(tokens) - block_size, block_size)
    for first in range(0, len(starts), batch_size):
        offsets = np.asarray(starts[first:first + batch_size])
        windows = np.asarray(tokens[offsets[:, None] + np.arange(block_size + 1)], dtype=np.int64)
        batch = torch.from_numpy(windows).to(device)
        yield batch[:, :-1], batch[:, 1:]


def prepare_data(tokenizer: str | Tokenizer = "char", vocab_size: int = 2048,
                 val_fraction: float = 0.1, include_folio: bool = False, seed: int = 0,
                 use_cache: bool = True) -> LMData:
    """The whole pipeline: split by work, tokenizer, token files; cached after the first call.

    ``tokenizer`` is ``"char"``, ``"bpe"`` (trained here with ``vocab_size`` tokens) or a
    tokenizer object. The first call cleans and encodes the corpus (seconds); later calls only
    map the cached files.
    """
    split = split_by_work(val_fraction=val_fraction, include_folio=include_folio, seed=seed)
    if isinstance(tokenizer, str):
        tokenizer = train_tokenizer(tokenizer, vocab_size=vocab_size, split=split, use_cache=use_cache)
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocabulary of {tokenizer.vocab_size} does not fit in uint16 token files")
    key = f"v{_FORMAT_VERSION}-{tokenizer.fingerprint()}-{split.fingerprint()}-{_cleaning_fingerprint()}"
    folder = cache_dir() / "tokens" / key
    meta_path = folder / "meta.json"
    if use_cache and meta_path.exists():
        return LMData(tokenizer, read_tokens(folder / "train.bin"), read_tokens(folder / "val.bin"), split)
    train = encode_works(tokenizer, work_texts(split.train))
    val = encode_works(tokenizer, work_texts(split.val))
    if not use_cache:
        return LMData(tokenizer, train, val, split)
    write_tokens(folder / "train.bin", train)
    write_tokens(folder / "val.bin", val)
    tokenizer.save(folder / "tokenizer.json")
    meta = {"train_works": split.train, "val_works": split.val, "train_tokens": len(train),
            "val_tokens": len(val), "vocab_size": tokenizer.vocab_size, "dtype": "uint16"}
    tmp = meta_path.with_name(f"meta.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.replace(meta_path)  # written last: its presence means the folder is complete
    return LMData(tokenizer, read_tokens(folder / "train.bin"), read_tokens(folder / "val.bin"), split)
