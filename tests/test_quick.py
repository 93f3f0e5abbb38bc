"""course_lib.quick: the COURSE_QUICK switch and pick()."""

import pytest

from course_lib.quick import QUICK_ENV, is_quick, pick


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true_values(monkeypatch, value):
    monkeypatch.setenv(QUICK_ENV, value)
    assert is_quick() is True


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off", "OFF"])
def test_false_values(monkeypatch, value):
    monkeypatch.setenv(QUICK_ENV, value)
    assert is_quick() is False


def test_unset_is_full_mode(monkeypatch):
    monkeypatch.delenv(QUICK_ENV, raising=False)
    assert is_quick() is False


@pytest.mark.parametrize("value", ["ture", "2", "quick", "y"])
def test_typo_raises_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(QUICK_ENV, value)
    with pytest.raises(ValueError, match=QUICK_ENV) as info:
        is_quick()
    assert repr(value) in str(info.value)


def test_env_name():
    assert QUICK_ENV == "COURSE_QUICK"


def test_pick(monkeypatch):
    monkeypatch.setenv(QUICK_ENV, "1")
    assert pick(full=30, quick=2) == 2
    monkeypatch.setenv(QUICK_ENV, "0")
    assert pick(full=30, quick=2) == 30
    monkeypatch.delenv(QUICK_ENV)
    assert pick(full=[1, 2], quick=None) == [1, 2]


def test_pick_propagates_typo(monkeypatch):
    monkeypatch.setenv(QUICK_ENV, "maybe")
    with pytest.raises(ValueError):
        pick(full=1, quick=0)
