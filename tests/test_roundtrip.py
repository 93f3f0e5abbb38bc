"""The grading round trip of every chapter, through the real CLI and the sandbox, as an instructor
runs it.

For each chapter, three submissions in one batch:
- the solution, as a student would hand it in: full marks, no flags, and no cell of the graded
  notebook (demos included) raised. This is also where each solution notebook runs top to
  bottom, hidden tests and all, in a fresh kernel;
- the blank release: 0 on every test cell;
- several wrong answers in different exercises at once (``combined_wrong_answer``): exactly the
  points of the test cells they do not fail.

Each wrong answer on its own is checked against the same hidden tests and trusted checks in
tests/test_answers.py, without a kernel per fixture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from grader.course import list_chapters
from tests.grading_helpers import (
    REPO,
    cells_by_role,
    combined_wrong_answer,
    fill_answers,
    read_grades,
    run_grader,
)

CHAPTERS = list_chapters(REPO)


def graded(chapter: str, base: Path) -> dict:
    source = nbformat.read(REPO / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    release = nbformat.read(REPO / "chapters" / chapter / f"{chapter}.ipynb", as_version=4)
    solutions, tests = cells_by_role(source)
    combined = combined_wrong_answer(chapter)
    subs = base / "submissions"
    expected: dict[str, set[str]] = {"solution": set(), "blank": set(tests), "wrong": set(combined["fails"])}
    # The release with every answer filled (the source notebook itself holds hidden tests, so its
    # locked cells differ from the release).
    for student, answers in [("solution", solutions), ("wrong", {**solutions, **combined["answers"]})]:
        (subs / student).mkdir(parents=True)
        nbformat.write(fill_answers(release, answers), str(subs / student / f"{chapter}.ipynb"))
    (subs / "blank").mkdir()
    shutil.copy(REPO / "chapters" / chapter / f"{chapter}.ipynb", subs / "blank")
    workspace = base / "workspace"
    auto = run_grader("autograde", subs, "--chapter", chapter, "--workspace", workspace,
                      "--jobs", "2", "--notebook-timeout", "600",
                      # No quick-mode cell needs 2 minutes; a stalled kernel is retried sooner.
                      "--cell-timeout", "120")
    # Similarity is tested in test_similarity.py: the solution is like its own "wrong" submission.
    report = run_grader("report", "--chapter", chapter, "--workspace", workspace, "--no-feedback",
                        "--no-similarity")
    assert report.returncode == 0, report.stderr
    return {"grades": read_grades(workspace, chapter), "tests": tests, "expected": expected,
            "autograde": auto, "combined": combined["name"],
            "solution_notebook": workspace / "autograded" / "solution" / chapter / f"{chapter}.ipynb"}


def cell_errors(path: Path) -> list[str]:
    """``cell N: Ename: message`` for every error output of a notebook."""
    nb = nbformat.read(path, as_version=4)
    return [f"cell {i}: {out.get('ename')}: {str(out.get('evalue'))[:200]}"
            for i, cell in enumerate(nb.cells) for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]


@pytest.mark.roundtrip
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_round_trip(chapter, tmp_path_factory):
    result = graded(chapter, tmp_path_factory.mktemp(f"rt-{chapter}"))
    assert result["autograde"].returncode == 0, result["autograde"].stdout + result["autograde"].stderr
    tests, grades = result["tests"], result["grades"]
    problems = []
    for student, fails in result["expected"].items():
        row = grades[student]
        if row["status"] != "graded":
            problems.append(f"{student}: {row['status']} {row['message']}")
            continue
        for test_id, points in tests.items():
            want = 0.0 if test_id in fails else points
            got = float(row[test_id])
            if got != want:
                problems.append(f"{student}: {test_id} scored {got:g}, expected {want:g}")
        want_total = sum(p for t, p in tests.items() if t not in fails)
        if float(row["score"]) != want_total:
            problems.append(f"{student}: total {row['score']}, expected {want_total:g}")
        if student == "solution" and row["flags"]:
            problems.append(f"{student}: flagged {row['flags']!r}, expected no flags")
    if grades["solution"]["status"] == "graded":
        problems += [f"solution: {e}" for e in cell_errors(result["solution_notebook"])]
    assert not problems, "\n".join(problems) + f"\n(wrong = {result['combined']})"


def test_chapters_found():
    assert len(CHAPTERS) >= 2, f"expected chapters 0 and 1 at least, found {CHAPTERS}"
