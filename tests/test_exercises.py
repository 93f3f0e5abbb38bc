"""course_lib.exercises: demos use the student's answer once written, the reference before."""

from __future__ import annotations

import types

import pytest

from course_lib.exercises import YoursOrReference

REFERENCE = types.ModuleType("reference")
REFERENCE.double = lambda x: 2 * x


class _RefCounter:
    def __init__(self, start):
        self.value = start

    def step(self):
        self.value += 1


REFERENCE.Counter = _RefCounter


def unwritten(*args, **kwargs):
    raise NotImplementedError()


def test_falls_back_once_announced_then_uses_the_answer(capsys):
    namespace = {"double": unwritten}
    call_yours = YoursOrReference(namespace, REFERENCE)
    assert call_yours("double", 3) == 6 and call_yours("double", 4) == 8
    assert capsys.readouterr().out.count("double is not written yet") == 1
    namespace["double"] = lambda x: 2 * x + 1  # the student writes it (wrongly): theirs is used
    assert call_yours("double", 3) == 7


def test_missing_name_uses_reference_and_unknown_reference_is_clear():
    call_yours = YoursOrReference({}, REFERENCE)
    assert call_yours("double", 5) == 10
    with pytest.raises(AttributeError, match="no reference for 'triple'"):
        call_yours("triple", 1)


def test_get_without_probe_follows_later_answers():
    namespace = {"double": unwritten}
    double = YoursOrReference(namespace, REFERENCE).get("double")
    assert double(2) == 4 and double.__name__ == "double"
    namespace["double"] = lambda x: x * 20
    assert double(2) == 40


def test_get_with_probe_picks_class():
    class Counter:
        def __init__(self, start):
            self.value = start

        def step(self):
            raise NotImplementedError()

    namespace = {"Counter": Counter}
    fallback = YoursOrReference(namespace, REFERENCE)
    assert fallback.get("Counter", probe=lambda cls: cls(0).step()) is _RefCounter

    class Written(Counter):
        def step(self):
            self.value += 1

    namespace["Counter"] = Written
    assert fallback.get("Counter", probe=lambda cls: cls(0).step()) is Written


def test_other_errors_are_not_hidden():
    def broken(x):
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        YoursOrReference({"double": broken}, REFERENCE)("double", 1)
