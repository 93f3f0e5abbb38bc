"""A tiny synthetic course (one chapter, three exercises) for fast tests of the grader itself.

The real chapters are graded in ``test_roundtrip.py``; this one exists so that bad inputs,
timeouts and the report can be tested in seconds. ``make_course(tmp)`` writes a folder that
looks like the repository (``pyproject.toml`` + ``solutions/ch99_mini/ch99_mini.ipynb``).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tests.grading_helpers import fill_answers

CHAPTER = "ch99_mini"


def _answer(grade_id: str, source: str) -> nbformat.NotebookNode:
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"solution": True, "grade": False, "locked": False,
                                 "grade_id": grade_id, "schema_version": 3}
    return cell


def _test(grade_id: str, source: str, points: int) -> nbformat.NotebookNode:
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"solution": False, "grade": True, "locked": True,
                                 "points": points, "grade_id": grade_id, "schema_version": 3}
    return cell


SOLUTIONS = {
    "ex1_add": "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION\n",
    "ex2_square": "def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION\n",
    "ex3_mean": "def mean(xs):\n    ### BEGIN SOLUTION\n    return sum(xs) / len(xs)\n    ### END SOLUTION\n",
}

TESTS = {
    "ex1_add_tests": ("from course_lib.checks import check_equal\n"
                      "check_equal(add(1, 2), 3, name='add(1, 2)')\n"
                      "### BEGIN HIDDEN TESTS\n"
                      "check_equal(add(-5, 5), 0, name='add(-5, 5)')  # SECRET-HIDDEN-TEST-ADD\n"
                      "### END HIDDEN TESTS\n", 1),
    # Prints a warning on stderr while passing: an honest student must not lose the point.
    "ex2_square_tests": ("import sys\nprint('just a warning', file=sys.stderr)\n"
                         "from course_lib.checks import check_equal\n"
                         "check_equal(square(3), 9, name='square(3)')\n"
                         "### BEGIN HIDDEN TESTS\n"
                         "check_equal(square(-4), 16, name='square(-4)')\n"
                         "### END HIDDEN TESTS\n", 2),
    "ex3_mean_tests": ("from course_lib.checks import check_close\n"
                       "check_close(mean([1, 2, 3]), 2.0, name='mean([1, 2, 3])')\n"
                       "### BEGIN HIDDEN TESTS\n"
                       "check_close(mean([0.5]), 0.5, name='mean([0.5])')\n"
                       "### END HIDDEN TESTS\n", 3),
}
MAX_SCORE = sum(points for _, points in TESTS.values())


def source_notebook() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(new_markdown_cell("# Chapter 99 — a mini chapter for grader tests"))
    for (answer_id, answer), (test_id, (test, points)) in zip(SOLUTIONS.items(), TESTS.items(),
                                                              strict=True):
        nb.cells.append(_answer(answer_id, answer))
        nb.cells.append(_test(test_id, test, points))
    return nb


# The trusted checks (grader/probes.py): each function again on secret inputs.
PROBES = """\
import torch

from grader.probes import Probe

PROBES = [
    Probe("ex1_add_tests",
          inputs=lambda g: {"a": torch.randn(50, generator=g), "b": torch.randn(50, generator=g)},
          run=lambda ns, x: torch.tensor([ns["add"](a, b) for a, b in zip(x["a"].tolist(), x["b"].tolist())]),
          expected=lambda x: x["a"] + x["b"], rtol=1e-5, atol=1e-6),
    Probe("ex2_square_tests", inputs=lambda g: {"x": torch.randn(50, generator=g)},
          run=lambda ns, x: torch.tensor([ns["square"](v) for v in x["x"].tolist()]),
          expected=lambda x: x["x"] ** 2, rtol=1e-5, atol=1e-6),
    Probe("ex3_mean_tests", inputs=lambda g: {"x": torch.rand(7, 9, generator=g)},
          run=lambda ns, x: torch.tensor([ns["mean"](row) for row in x["x"].tolist()]),
          expected=lambda x: x["x"].mean(dim=1), rtol=1e-5, atol=1e-6),
]
"""


def make_course(root: Path) -> Path:
    """Write a mini repository at ``root`` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'mini'\n")
    folder = root / "solutions" / CHAPTER
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(source_notebook(), str(folder / f"{CHAPTER}.ipynb"))
    (folder / "probes.py").write_text(PROBES)
    return root


def solved(release_nb: nbformat.NotebookNode, **overrides: str) -> nbformat.NotebookNode:
    """The release filled with the solutions (markers removed), except ``overrides``."""
    answers = {k: "\n".join(line for line in v.splitlines() if "### " not in line)
               for k, v in SOLUTIONS.items()}
    answers.update(overrides)
    return fill_answers(release_nb, answers)
