"""The trusted checks of every chapter (solutions/<chapter>/probes.py) and the comparison they use.

Every graded test cell must have exactly one probe. Whether the probes pass the solution, fail the
blank release and catch the wrong answers is checked with the in-kernel tests, in
tests/test_answers.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from grader import probes as P
from grader.course import list_chapters
from tests.grading_helpers import REPO, cells_by_role

CHAPTERS = list_chapters(REPO)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_test_cell_has_one_probe(chapter):
    _, tests = cells_by_role(json.loads((REPO / "solutions" / chapter / f"{chapter}.ipynb").read_text()))
    probes = P.load_probes(REPO / "solutions" / chapter / "probes.py")
    assert sorted(p.test_cell for p in probes) == sorted(tests)


# -- the shared comparison the grader and the chapters' checks use -------------------------------


def _t(*values, dtype=None):
    return torch.tensor(values, dtype=dtype or torch.float64)


def test_compare_outputs_accepts_agreement_within_tolerance():
    want = {"out": _t(1.0, -2.0, float("nan"), float("inf")), "aux": _t(1e3)}
    got = {"out": _t(1.0 + 1e-10, -2.0, float("nan"), float("inf")), "aux": _t(1e3 + 1e-4)}
    assert P.compare_outputs(want, got, {"aux": (1e-6, 0)}, (1e-9, 1e-12)) is None


@pytest.mark.parametrize("got, reason", [
    ({"out": _t(1.0, 2.0)}, "returned"),  # a missing key
    ({"out": _t(1.0, 2.0), "aux": _t(1.0, 2.0, 3.0)}, "shape"),
    ({"out": _t(1.0, 2.0, dtype=torch.float32), "aux": _t(0.0, 0.0)}, "dtype"),
    ({"out": _t(1.0, float("nan")), "aux": _t(0.0, 0.0)}, "NaN"),
    ({"out": _t(1.0, 2.0), "aux": _t(float("inf"), 0.0)}, "not finite"),
    ({"out": _t(1.0, 2.001), "aux": _t(0.0, 0.0)}, "max abs difference 0.001"),
])
def test_compare_outputs_names_what_differs(got, reason):
    want = {"out": _t(1.0, 2.0), "aux": _t(0.0, 0.0)}
    found = P.compare_outputs(want, got, default=(1e-6, 1e-9))
    assert found is not None and reason in found, found


def test_compare_outputs_infinities_and_normwise():
    assert "infinite" in P.compare_outputs({"x": _t(float("inf"))}, {"x": _t(-float("inf"))})
    want, got = {"x": _t(1000.0, 1e-6)}, {"x": _t(1000.0, 2e-6)}
    assert P.compare_outputs(want, got, default=(1e-6, 0)) is not None  # elementwise: too far
    assert P.compare_outputs(want, got, default=(1e-6, 0), normwise=True) is None  # 1e-6 * 1000
