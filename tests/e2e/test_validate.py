"""nbgrader's Validate button, pressed in JupyterLab on a student notebook, says pass or fail.

This is what a student does before handing in: type the answers into the release notebook (a
copy, never the repository's file), press Validate in the notebook toolbar (nbgrader's lab
extension: it saves the notebook and runs it in a fresh kernel on the server), and read the
verdict. With every answer right the dialog must say the notebook passes; with one wrong answer
(the chapter's first wrong-answer fixture) it must say that answer's test cell failed.
"""

from __future__ import annotations

import re
import shutil

import nbformat
import pytest

from grader.course import cell_source, cells_with_role
from tests.e2e.lab import REPO
from tests.e2e.notebook import LabNotebook
from tests.grading_helpers import wrong_answers

# The lightest chapter: Validate runs the whole notebook, twice in this file.
CHAPTER = "ch00_big_picture"
# Below the 300 s per-cell limit of chapters/nbgrader_config.py on purpose: a kernel reply that
# nbclient sleeps through only surfaces when that limit ends (grader/kernel_client.py), so a wait
# shorter than the limit catches that bug. Validating ch00 takes under 30 s even on a busy machine.
VALIDATE_TIMEOUT_S = 240


def answer_cell_indexes(nb: nbformat.NotebookNode) -> dict[str, int]:
    """Answer cell grade_id -> its position in the notebook (where the lab types it)."""
    position = {id(cell): index for index, cell in enumerate(nb.cells)}
    return {grade_id: position[id(cell)] for grade_id, cell in cells_with_role(nb, "answer").items()}


def solution_answers() -> dict[str, str]:
    source = nbformat.read(REPO / "solutions" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    return {grade_id: cell_source(cell) for grade_id, cell in cells_with_role(source, "answer").items()}


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture
def student_notebook(lab_server, request) -> str:
    """A fresh copy of the student release, served by the lab; its path below the lab's root."""
    folder = lab_server.root / "students" / request.node.name / CHAPTER
    shutil.copytree(REPO / "chapters" / CHAPTER, folder)
    return str((folder / f"{CHAPTER}.ipynb").relative_to(lab_server.root))


def answer_and_validate(page, lab_server, path: str, answers: dict[str, str]) -> dict:
    """Type ``answers`` into their cells, press Validate; the verdict the dialog shows."""
    notebook = LabNotebook(page)
    notebook.open(lab_server.lab_url(path, workspace=re.sub(r"\W+", "-", path)), path)
    release = nbformat.read(lab_server.root / path, as_version=4)
    answer_cells = answer_cell_indexes(release)
    assert set(answers) == set(answer_cells), "the answers must fill every answer cell"
    for grade_id, index in answer_cells.items():
        notebook.type_source(index, answers[grade_id])

    button = page.locator(".jp-NotebookPanel-toolbar .validate-button")
    assert button.is_visible(), "nbgrader's Validate button is not in the notebook toolbar"
    message = page.locator(".jp-Dialog #validation-message")
    button.click()
    message.wait_for(timeout=VALIDATE_TIMEOUT_S * 1000)
    sources_and_errors = [pre.inner_text() for pre in message.locator(".jp-RenderedText pre").all()]
    return {
        "classes": (message.get_attribute("class") or "").split(),
        "text": message.inner_text(),
        "failed_sources": sources_and_errors[0::2],  # each failure: the cell, then its error
        "errors": sources_and_errors[1::2],
        "saved": nbformat.read(lab_server.root / path, as_version=4),
        "answer_cells": answer_cells,
    }


def test_validate_passes_with_correct_answers(page, lab_server, student_notebook):
    answers = solution_answers()
    verdict = answer_and_validate(page, lab_server, student_notebook, answers)
    assert "validation-success" in verdict["classes"], verdict["text"][:3000]
    assert "Success! Your notebook passes all the tests." in verdict["text"]
    # Validate saved what was typed: the file on disk holds the answers.
    for grade_id, index in verdict["answer_cells"].items():
        assert verdict["saved"].cells[index].source == answers[grade_id]


def test_validate_fails_with_a_wrong_answer(page, lab_server, student_notebook):
    wrong = wrong_answers(CHAPTER)[0]  # the chapter's first wrong-answer fixture
    answers = {**solution_answers(), **wrong["answers"]}
    verdict = answer_and_validate(page, lab_server, student_notebook, answers)
    assert "validation-failed" in verdict["classes"], verdict["text"][:3000]
    assert verdict["text"].count("The following cell failed:") == len(verdict["failed_sources"]) >= 1

    # The failures are the test cells of the wrong answer, and nothing else; the error is the
    # course's check message, not a crash.
    release = nbformat.read(REPO / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    tests = {normalised(cell_source(cell)): grade_id
             for grade_id, cell in cells_with_role(release, "test").items()}
    failed = [tests.get(normalised(source), f"<not a test cell: {source[:80]!r}>")
              for source in verdict["failed_sources"]]
    assert set(failed) <= set(wrong["fails"]), (
        f"{wrong['name']!r} should fail only {wrong['fails']}, Validate reported {failed}")
    assert all("CheckFailed" in error for error in verdict["errors"]), verdict["errors"]
