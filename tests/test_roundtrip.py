"""The grading round trip of every chapter, through the real CLI, as an instructor runs it.

For each chapter: the solution notebook as a submission scores full marks; the blank release
scores 0 on every autograded cell; each wrong answer in ``tests/fixtures/wrong_answers/<chapter>.py``
fails exactly the test cells it lists and passes all the others.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

from grader.course import list_chapters
from tests.grading_helpers import REPO, fill_answers, read_grades, run_grader

CHAPTERS = list_chapters(REPO)
FIXTURES = REPO / "tests" / "fixtures" / "wrong_answers"


def wrong_answers(chapter: str) -> list[dict]:
    path = FIXTURES / f"{chapter}.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location(f"wrong_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WRONG_ANSWERS


def cells_by_role(nb: nbformat.NotebookNode) -> tuple[dict[str, str], dict[str, float]]:
    """(answer grade_id -> source, test grade_id -> points)."""
    answers, tests = {}, {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and not meta.get("grade"):
            answers[meta["grade_id"]] = cell.source
        elif meta.get("grade") and not meta.get("solution"):
            tests[meta["grade_id"]] = float(meta.get("points", 0))
    return answers, tests


def graded(chapter: str, base: Path) -> dict:
    source = nbformat.read(REPO / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    release = nbformat.read(REPO / "chapters" / chapter / f"{chapter}.ipynb", as_version=4)
    solutions, tests = cells_by_role(source)
    subs = base / "submissions"
    expected: dict[str, set[str]] = {"solution": set(), "blank": set(tests)}
    # The solution as a student would hand it in: the release with every answer filled (the
    # source notebook itself holds hidden tests, so its locked cells differ from the release).
    (subs / "solution").mkdir(parents=True)
    nbformat.write(fill_answers(release, solutions), str(subs / "solution" / f"{chapter}.ipynb"))
    (subs / "blank").mkdir()
    shutil.copy(REPO / "chapters" / chapter / f"{chapter}.ipynb", subs / "blank")
    for i, wrong in enumerate(wrong_answers(chapter), start=1):
        unknown = (set(wrong["answers"]) - set(solutions)) | (set(wrong["fails"]) - set(tests))
        assert not unknown, f"{chapter} fixture {wrong['name']!r} names unknown cells {unknown}"
        student = f"wrong{i}"
        (subs / student).mkdir()
        nbformat.write(fill_answers(release, {**solutions, **wrong["answers"]}),
                       str(subs / student / f"{chapter}.ipynb"))
        expected[student] = set(wrong["fails"])
    workspace = base / "workspace"
    auto = run_grader("autograde", subs, "--chapter", chapter, "--workspace", workspace,
                      "--jobs", "2", "--notebook-timeout", "600",
                      # No quick-mode cell needs 2 minutes; a stalled kernel is retried sooner.
                      "--cell-timeout", "120")
    report = run_grader("report", "--chapter", chapter, "--workspace", workspace, "--no-feedback")
    assert report.returncode == 0, report.stderr
    return {"grades": read_grades(workspace, chapter), "tests": tests, "expected": expected,
            "autograde": auto}


@pytest.mark.roundtrip
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_has_enough_wrong_answers(chapter):
    assert len(wrong_answers(chapter)) >= 3, f"{chapter} needs >= 3 wrong-answer fixtures"


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
    names = {f"wrong{i}": w["name"] for i, w in enumerate(wrong_answers(chapter), start=1)}
    assert not problems, "\n".join(f"{p} ({names.get(p.split(':')[0], '')})" for p in problems)


def test_chapters_found():
    assert len(CHAPTERS) >= 2, f"expected chapters 0 and 1 at least, found {CHAPTERS}"
