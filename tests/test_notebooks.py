"""Static checks of every chapter: format, no outputs, release in sync with the source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from grader.course import cell_role, cell_source, list_chapters, nbgrader_meta
from tests.grading_helpers import REPO, run_grader

CHAPTERS = list_chapters(REPO)
NOTEBOOKS = sorted(REPO.glob("solutions/ch*/*.ipynb")) + sorted(REPO.glob("chapters/ch*/*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_format(chapter):
    cells = _cells(REPO / "solutions" / chapter / f"{chapter}.ipynb")
    intro = cell_source(cells[0])
    for heading in ("Learning goals", "Prerequisites", "Run time"):
        assert heading in intro, f"{chapter}: the first cell must have a '{heading}' section"
    assert re.match(r"#\s*Chapter\s+\d+", intro), f"{chapter}: title must read '# Chapter N — ...'"
    tests = [c for c in cells if cell_role(c) == "test"]
    answers = [c for c in cells if cell_role(c) == "answer"]
    assert len(tests) >= 4, f"{chapter}: at least 4 autograded test cells"
    assert len(answers) >= 4
    for cell in tests:
        meta = nbgrader_meta(cell)
        assert meta.get("locked") and meta.get("points", 0) > 0, meta["grade_id"]
        assert "### BEGIN HIDDEN TESTS" in cell_source(cell), f"{meta['grade_id']}: no hidden tests"
        visible = cell_source(cell).split("### BEGIN HIDDEN TESTS")[0]
        assert not re.search(r"^\s*assert\b", visible, re.M), \
            f"{meta['grade_id']}: visible tests must use course_lib.checks, not bare assert"
    for cell in answers:
        assert "### BEGIN SOLUTION" in cell_source(cell)
    assert "ipywidgets" in json.dumps(cells) or "interact" in json.dumps(cells), \
        f"{chapter}: no widget"
    assert "summary" in cell_source(cells[-1]).lower(), f"{chapter}: the last cell must be a summary"


def test_release_in_sync_with_solutions():
    result = run_grader("release", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
