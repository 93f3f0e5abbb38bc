"""Trust, through the real grader and its sandbox, on chapter 3: forbidden routes (class 1) and
forged trusted checks (class 2) cost exactly the points they did not earn and are flagged; the
solution and an honest alternative keep full marks with no flags.

One batch, graded once per test session. The many routes to a forbidden function are checked
one by one, faster, in test_trust.py; here a few of them go through everything an instructor
runs: the kernel sandbox, the trusted checks' own sandbox, the gradebook and the flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from tests.grading_helpers import REPO, cells_by_role, fill_answers, once_per_session, read_grades, run_grader
from tests.test_trust import HONEST, ROUTES

pytestmark = pytest.mark.grader

CHAPTER = "ch03_losses"
ALL_TESTS = ["ex1_huber_tests", "ex2_bce_tests", "ex3_log_softmax_tests", "ex4_cross_entropy_tests",
             "ex5_fit_categorical_tests"]

# The check the in-kernel tests call, replaced through an obfuscated route: every in-kernel test
# now passes, whatever the answers return.
_SILENCE_CHECKS = """\
import sys as _s
_ns = vars(_s.modules["__main__"])
for _name in [n for n in _ns if n.startswith("check" + "_")]:
    _ns[_name] = lambda *a, **k: None
"""

# A display output shaped like the payload the old in-kernel trusted cell published, computed with
# the reference: a grader that trusted anything the kernel sent would take it.
_FORGED_PAYLOAD = """\
from IPython.display import publish_display_data as _pub
_pub({"application/vnd.n2l.probe-outputs+json": {"outputs": "", "errors": {}},
      "text/plain": "trusted checks done, 0 raised"})
"""

WRONG_HUBER = "def huber_loss(pred, target, delta=1.0):\n    return (pred - target).abs().mean()\n"
WRONG_BCE = "def bce_with_logits(logits, targets, pos_weight=None):\n    return logits.sum() * 0\n"


def _submissions(solutions: dict[str, str]) -> dict[str, dict]:
    """student -> {"answers": {...}, "extra": [cells appended at the end], "setup": text added to
    the setup cell}."""
    route = {name: {"answers": {cell: source}} for name, (cell, source, _, _) in ROUTES.items()
             if name in ("default_argument", "private_c_entry_point", "rebound_forbidden", "function_copy")}
    return {
        "solution": {"answers": {}},
        "honest": {"answers": HONEST},
        **route,
        # Class 1: the unlocked setup cell edited to switch off `forbidden` for the kernel's tests.
        "edited_setup": {"answers": {"ex3_log_softmax": "def log_softmax(logits, dim=-1):\n"
                                                        "    return torch.log_softmax(logits, dim=dim)\n"},
                         "setup": "\nimport contextlib\n"
                                  "forbidden = lambda *a, **k: contextlib.nullcontext()\n"},
        # Class 2: in-kernel checks silenced and a forged payload published; the answers are wrong.
        "forged_checks": {"answers": {"ex1_huber": WRONG_HUBER + _SILENCE_CHECKS + _FORGED_PAYLOAD}},
        # Class 2: a wrong answer, and a trailing cell that rebinds the name to a right one.
        "trailing_rebind": {"answers": {"ex2_bce": WRONG_BCE},
                            "extra": ["bce_with_logits = __import__('course_lib.losses', fromlist=['x'])"
                                      ".bce_with_logits\n"]},
    }


def _grade(folder: Path) -> dict:
    source = nbformat.read(REPO / "solutions" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    release = nbformat.read(REPO / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    solutions, _ = cells_by_role(source)
    subs = folder / "submissions"
    for name, case in _submissions(solutions).items():
        student = name.replace("_", "-")
        nb = fill_answers(release, {**solutions, **case["answers"]})
        if case.get("setup"):
            first = next(c for c in nb.cells if c.cell_type == "code")
            first.source += case["setup"]
        nb.cells += [new_code_cell(text) for text in case.get("extra", [])]
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, str(subs / student / f"{CHAPTER}.ipynb"))
    workspace = folder / "workspace"
    auto = run_grader("autograde", subs, "--chapter", CHAPTER, "--workspace", workspace, "--jobs", "2",
                      "--notebook-timeout", "600", "--cell-timeout", "120")
    run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, "--no-feedback", "--no-similarity")
    status = json.loads((workspace / "status" / f"{CHAPTER}.json").read_text())
    return {"stdout": auto.stdout, "stderr": auto.stderr, "grades": read_grades(workspace, CHAPTER),
            "records": status["records"]}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "trust-ch03", _grade)


def _zero(batch, student) -> set[str]:
    student = student.replace("_", "-")  # the default id pattern ends a student id at "_"
    row = batch["grades"][student]
    assert batch["records"][student]["status"] == "graded", batch["records"][student]
    return {cell for cell in ALL_TESTS if float(row[cell]) == 0}


def _flags(batch, student) -> str:
    student = student.replace("_", "-")
    return "\n".join(batch["records"][student]["flags"])


@pytest.mark.parametrize("student", ["solution", "honest"])
def test_honest_submissions_keep_full_marks_without_flags(batch, student):
    assert _zero(batch, student) == set(), batch["records"][student]
    assert _flags(batch, student) == ""


@pytest.mark.parametrize("student, zero, call", [
    ("default_argument", {"ex4_cross_entropy_tests"}, "torch.nn.functional.cross_entropy"),
    ("function_copy", {"ex1_huber_tests"}, "huber_loss"),
    ("private_c_entry_point", {"ex3_log_softmax_tests", "ex4_cross_entropy_tests"}, "aten::_log_softmax"),
    ("rebound_forbidden", {"ex3_log_softmax_tests", "ex4_cross_entropy_tests"}, "log_softmax"),
    ("edited_setup", {"ex3_log_softmax_tests", "ex4_cross_entropy_tests"}, "log_softmax"),
])
def test_forbidden_calls_score_zero_with_a_flag_naming_them(batch, student, zero, call):
    assert _zero(batch, student) == zero, batch["records"][student]
    flags = _flags(batch, student)
    first = sorted(zero)[0]
    assert f"forbidden call in {first}:" in flags and call in flags, flags


def test_edited_setup_cell_is_flagged_for_rebinding_a_test_helper(batch):
    assert "rebinds forbidden, a helper the tests use" in _flags(batch, "edited_setup")


def test_silenced_checks_and_a_forged_payload_earn_nothing(batch):
    assert _zero(batch, "forged_checks") == {"ex1_huber_tests"}
    assert "trusted check overrules a pass in ex1_huber_tests" in _flags(batch, "forged_checks")


def test_a_trailing_rebind_does_not_change_the_answer_graded(batch):
    assert _zero(batch, "trailing_rebind") == {"ex2_bce_tests"}
