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
