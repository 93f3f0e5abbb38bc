"""course_lib.lm_data: a leakage-free split by play, the uint16 token cache, and batches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import data, lm_data
from course_lib.lm_data import (
    END_OF_TEXT,
    FOLIO_TO_MODERN,
    LMData,
    iter_blocks,
    play_of,
    prepare_data,
    read_tokens,
    sample_batch,
    split_by_work,
    work_texts,
    write_tokens,
)
from course_lib.tokenizers import BPETokenizer, CharTokenizer


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, worker_id):
    """A cache of the test session's own: the tests never touch the user's cache. Parallel
    workers share it (writes are atomic renames), so the corpus is encoded once, not per worker."""
    if worker_id == "master":
        root = tmp_path_factory.mktemp("lm-cache")
    else:
        root = tmp_path_factory.getbasetemp().parent / "lm-cache"
        root.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(lm_data.CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def char_data(cache_root) -> LMData:
    return prepare_data("char")


# --- editions and the split ---------------------------------------------------------------------


def test_every_folio_edition_maps_to_its_most_similar_modern_edition():
    """The alias table is checked against the texts: by the overlap of their vocabularies, each
    Folio edition is closest to the modern edition ``play_of`` names, among all modern works."""
    works = data.shakespeare_works(include_folio=True)
    words = {w.name: set(re.findall(r"[a-z]+", data.shakespeare_raw(w.name).lower())) for w in works}
    modern = [w.name for w in works if not w.folio]
    folio = [w.name for w in works if w.folio]
    assert len(folio) == 35
    assert set(FOLIO_TO_MODERN) <= set(folio)
    for name in folio:
        target = play_of(name)
        assert target in modern, name
        jaccard = {m: len(words[name] & words[m]) / len(words[name] | words[m]) for m in modern}
        assert max(jaccard, key=jaccard.get) == target, name
    assert all(play_of(m) == m for m in modern)


@pytest.mark.parametrize("include_folio", [False, True])
def test_split_by_work_never_puts_a_play_on_both_sides(include_folio):
    split = split_by_work(val_fraction=0.1, include_folio=include_folio, seed=0)
    names = {w.name for w in data.shakespeare_works(include_folio=include_folio)}
    assert set(split.train) | set(split.val) == names
    assert not set(split.train) & set(split.val)
    assert not {play_of(n) for n in split.train} & {play_of(n) for n in split.val}
    size = {w.name: w.path.stat().st_size for w in data.shakespeare_works(include_folio=True)}
    fraction = sum(size[n] for n in split.val) / sum(size[n] for n in names)
    # at least the fraction asked for, overshooting by less than one (large) play
    assert 0.1 <= fraction < 0.1 + 2 * max(size.values()) / sum(size[n] for n in names)
    if include_folio:
        assert any(n.endswith("_gut_f") for n in split.val)


def test_split_is_deterministic_by_seed():
    assert split_by_work(seed=0) == split_by_work(seed=0)
    assert split_by_work(seed=0).val != split_by_work(seed=1).val
    assert split_by_work(seed=0).fingerprint() != split_by_work(seed=1).fingerprint()
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_work(val_fraction=1.0)
    # grouped_split's rule: however large the fraction, one play stays in training.
    assert split_by_work(val_fraction=0.999).train


def test_split_is_the_one_the_shipped_model_was_trained_on():
    """The shipped GPT was pretrained on split_by_work() (scripts/pretrain_gpt.py): a change to the
    splitting rule would let chapters 10-13 validate it on plays it has seen."""
    metrics = json.loads((Path(lm_data.__file__).parent / "checkpoints" / "shakespeare-gpt" /
                          "metrics.json").read_text())
    assert list(split_by_work().val) == metrics["val_works"]
    # The fingerprints name the token caches: these are the default split and chapter 9's.
    assert split_by_work().fingerprint() == "da6bff662b95aa9f"
    assert split_by_work(0.1, include_folio=True, seed=0).fingerprint() == "e8fb43001f35ec55"


# --- token files ---------------------------------------------------------------------------------


def test_write_and_read_tokens(tmp_path):
    ids = np.array([0, 1, 65535, 42], dtype=np.int64)
    path = write_tokens(tmp_path / "t.bin", ids)
    assert path.stat().st_size == 8  # two bytes a token
    back = read_tokens(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    assert back.tolist() == ids.tolist()
    with pytest.raises(ValueError, match="uint16"):
        write_tokens(tmp_path / "bad.bin", [65536])
    assert len(read_tokens(write_tokens(tmp_path / "empty.bin", []))) == 0


def test_char_data_decodes_back_to_the_cleaned_works(char_data, cache_root):
    split = char_data.split
    assert isinstance(char_data.tokenizer, CharTokenizer)
    assert isinstance(char_data.train, np.memmap) and char_data.train.dtype == np.uint16
    assert char_data.tokenizer.decode(char_data.train) == "\n\n".join(work_texts(split.train))
    assert char_data.tokenizer.decode(char_data.val) == "\n\n".join(work_texts(split.val))
    assert 4_000_000 < len(char_data.train) < 5_000_000  # the modern editions, ~4.9 M characters
    assert 0.08 < len(char_data.val) / (len(char_data.train) + len(char_data.val)) < 0.2
    # the files live in the cache named by the environment variable
    assert any(cache_root.glob("tokens/*/train.bin")) and any(cache_root.glob("tokens/*/meta.json"))
    assert "training tokens" in char_data.describe()


def test_second_prepare_reads_the_cache_without_encoding(char_data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the corpus was encoded again")

    monkeypatch.setattr(lm_data, "encode_works", refuse)
    again = prepare_data("char")
    assert isinstance(again.train, np.memmap)
    assert np.array_equal(again.train, char_data.train) and np.array_equal(again.val, char_data.val)
    assert again.tokenizer.fingerprint() == char_data.tokenizer.fingerprint()


def test_bpe_is_trained_on_the_training_works_only(tmp_path, monkeypatch):
    monkeypatch.setenv(lm_data.CACHE_ENV, str(tmp_path))  # an empty cache: training must happen
    seen = []
    original = BPETokenizer.train.__func__

    def spy(cls, texts, *args, **kwargs):
        texts = list(texts)
        seen.append(texts)
        return original(cls, texts, *args, **kwargs)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(spy))
    bpe = prepare_data("bpe", vocab_size=300)
    split = bpe.split
    assert seen == [work_texts(split.train)]
    assert isinstance(bpe.tokenizer, BPETokenizer) and bpe.tokenizer.vocab_size == 300
    eot = bpe.tokenizer.special_tokens[END_OF_TEXT]
    # works are separated by <|endoftext|>, which ordinary text never produces
    assert int((np.asarray(bpe.val) == eot).sum()) == len(split.val) - 1
    assert bpe.tokenizer.decode(bpe.val) == END_OF_TEXT.join(work_texts(split.val))
    assert len(bpe.train) < 0.75 * sum(len(t) for t in work_texts(split.train))  # 43 merges
    # the trained tokenizer is cached too: a second call trains nothing
    prepare_data("bpe", vocab_size=300)
    assert len(seen) == 1


# --- batches -------------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # in this token array, every window is consecutive numbers
    assert int(y.max()) <= 999 and int(x.min()) >= 0


def test_batches_are_deterministic_under_a_seed(char_data):
    a = char_data.get_batch("train", 4, 32, torch.Generator().manual_seed(7))
    b = char_data.get_batch("train", 4, 32, torch.Generator().manual_seed(7))
    c = char_data.get_batch("train", 4, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    x, _ = char_data.get_batch("val", 2, 64, torch.Generator().manual_seed(0))
    text = char_data.tokenizer.decode(x[0])
    assert text in char_data.tokenizer.decode(char_data.val)
    with pytest.raises(ValueError, match="split"):
        char_data.get_batch("test", 2, 8)


def test_batches_cover_the_whole_range_of_offsets():
    tokens = np.arange(20, dtype=np.uint16)
    x, _ = sample_batch(tokens, 2000, 4, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == set(range(16))  # every start 0..15 is drawn, none beyond
    with pytest.raises(ValueError, match="too few"):
        sample_batch(tokens, 1, 20)


def test_iter_blocks_visits_every_target_once():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(iter_blocks(tokens, batch_size=3, block_size=10))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    assert ys.flatten().tolist() == list(range(1, 101))
    assert torch.equal(xs + 1, ys)
