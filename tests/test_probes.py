"""The trusted checks of every chapter (solutions/<chapter>/probes.py), without nbgrader.

The answer cells of the source notebook run in a namespace the way the notebook would run
them; then each probe runs on fresh secret inputs and the grader-side verdict is taken:
the solution must pass every probe and the blank release must fail every one. Every graded
test cell must have exactly one probe.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from grader import probes as P
from tests.grading_helpers import REPO

CHAPTERS = sorted(p.parent.name for p in REPO.glob("solutions/ch*/ch*.ipynb")
                  if p.stem == p.parent.name)


def _cells(chapter):
    return json.loads((REPO / "solutions" / chapter / f"{chapter}.ipynb").read_text())["cells"]


def _meta(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def namespace(chapter: str, answers: dict[str, str] | None = None) -> dict:
    """Run the setup cell and every answer cell (or its replacement) in a fresh namespace."""
    ns: dict = {"__name__": "__main__"}
    code = [c for c in _cells(chapter) if c["cell_type"] == "code"]
    exec(compile("".join(code[0]["source"]), "setup", "exec"), ns)  # noqa: S102 - our own notebook
    for cell in code:
        meta = _meta(cell)
        if meta.get("solution") and not meta.get("grade"):
            source = (answers or {}).get(meta["grade_id"], "".join(cell["source"]))
            exec(compile(source, meta["grade_id"], "exec"), ns)  # noqa: S102
    return ns


def blank(source: str) -> str:
    return re.sub(r"### BEGIN SOLUTION.*?### END SOLUTION", "raise NotImplementedError()", source,
                  flags=re.S)


def verdicts(chapter: str, ns: dict) -> dict[str, P.Verdict]:
    """What the grader decides for a kernel whose namespace is ``ns`` (kernel side run here)."""
    probes = P.load_probes(REPO / "solutions" / chapter / "probes.py")
    inputs = P.make_inputs(probes, P.new_seed())
    outputs, errors = {}, {}
    for i, probe in enumerate(probes):
        try:
            outputs[str(i)] = P.as_tensors(probe.run(ns, P.decode(P.encode({"x": inputs[str(i)]}))["x"]))
        except Exception as error:  # noqa: BLE001
            errors[str(i)] = repr(error)
    return P.decide(probes, inputs, {"outputs": P.encode(outputs), "errors": errors})


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_test_cell_has_one_probe(chapter):
    graded = [_meta(c)["grade_id"] for c in _cells(chapter) if _meta(c).get("grade")]
    probes = P.load_probes(REPO / "solutions" / chapter / "probes.py")
    assert sorted(p.test_cell for p in probes) == sorted(graded)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solution_passes_every_probe(chapter):
    result = verdicts(chapter, namespace(chapter))
    assert {k: v.reason for k, v in result.items() if not v.passed} == {}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_blank_release_fails_every_probe(chapter):
    answers = {_meta(c)["grade_id"]: blank("".join(c["source"])) for c in _cells(chapter)
               if _meta(c).get("solution") and not _meta(c).get("grade")}
    result = verdicts(chapter, namespace(chapter, answers))
    assert [k for k, v in result.items() if v.passed] == []


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_wrong_answers_never_pass_where_they_should_fail_everywhere(chapter):
    """A wrong answer may slip past a probe only where the in-kernel tests still catch it; every
    probe of a cell it must *pass* must pass (no false alarms against correct code)."""
    path = REPO / "tests" / "fixtures" / "wrong_answers" / f"{chapter}.py"
    spec = importlib.util.spec_from_file_location(f"wrong_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    caught = 0
    for case in module.WRONG_ANSWERS:
        result = verdicts(chapter, namespace(chapter, case["answers"]))
        false_alarms = [k for k, v in result.items() if not v.passed and k not in case["fails"]]
        assert false_alarms == [], f"{case['name']}: probes failed correct cells {false_alarms}"
        caught += any(not result[k].passed for k in case["fails"])
    # Most wrong answers must also be caught outside the kernel (the rest by hidden tests).
    assert caught >= len(module.WRONG_ANSWERS) // 2, f"probes caught only {caught} wrong answers"


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
