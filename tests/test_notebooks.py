"""Static checks of every chapter: format, no outputs, release in sync with the source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from grader.course import list_chapters
from tests.grading_helpers import REPO, run_grader

CHAPTERS = list_chapters(REPO)
NOTEBOOKS = sorted(REPO.glob("solutions/ch*/*.ipynb")) + sorted(REPO.glob("chapters/ch*/*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_format(chapter):
    cells = _cells(REPO / "solutions" / chapter / f"{chapter}.ipynb")
    intro = _src(cells[0])
    for heading in ("Learning goals", "Prerequisites", "Run time"):
        assert heading in intro, f"{chapter}: the first cell must have a '{heading}' section"
    assert re.match(r"#\s*Chapter\s+\d+", intro), f"{chapter}: title must read '# Chapter N — ...'"
    tests = [c for c in cells if c["metadata"].get("nbgrader", {}).get("grade")
             and not c["metadata"]["nbgrader"].get("solution")]
    answers = [c for c in cells if c["metadata"].get("nbgrader", {}).get("solution")]
    assert len(tests) >= 4, f"{chapter}: at least 4 autograded test cells"
    assert len(answers) >= 4
    for cell in tests:
        meta = cell["metadata"]["nbgrader"]
        assert meta.get("locked") and meta.get("points", 0) > 0, meta["grade_id"]
        assert "### BEGIN HIDDEN TESTS" in _src(cell), f"{meta['grade_id']}: no hidden tests"
        visible = _src(cell).split("### BEGIN HIDDEN TESTS")[0]
        assert not re.search(r"^\s*assert\b", visible, re.M), \
            f"{meta['grade_id']}: visible tests must use course_lib.checks, not bare assert"
    for cell in answers:
        assert "### BEGIN SOLUTION" in _src(cell)
    assert "ipywidgets" in json.dumps(cells) or "interact" in json.dumps(cells), \
        f"{chapter}: no widget"
    assert "summary" in _src(cells[-1]).lower(), f"{chapter}: the last cell must be a summary"


def test_release_in_sync_with_solutions():
    result = run_grader("release", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
