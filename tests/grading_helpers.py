"""Helpers shared by the grader tests: run the CLI, read the grades CSV, the cells of a notebook,
the wrong-answer fixtures."""

from __future__ import annotations

import copy
import csv
import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

from grader.course import cell_source, cells_with_role, nbgrader_meta

REPO = Path(__file__).resolve().parents[1]


def run_grader(*args: str | Path, root: Path | None = None, timeout: float = 3600
               ) -> subprocess.CompletedProcess:
    """Run ``python -m grader`` as the instructor would, from the repository."""
    cmd = [sys.executable, "-m", "grader"]
    if root is not None:
        cmd += ["--root", str(root)]
    cmd += [str(a) for a in args]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def read_grades(workspace: Path, chapter: str) -> dict[str, dict[str, str]]:
    with open(workspace / "reports" / chapter / "grades.csv", newline="") as fh:
        return {row["student"]: row for row in csv.DictReader(fh)}


def tree_digest(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below ``folder``: to prove nothing was modified."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def once_per_session(tmp_path_factory, key: str, make: Callable[[Path], dict]) -> dict:
    """Run ``make(folder)`` once per test session, even across pytest-xdist workers.

    The first worker to get here computes the result under a file lock, in a folder all workers
    share, and stores it as JSON; the others wait for the lock and read it. (``--dist loadgroup``
    would be the tool for this, but it does not group tests with this pytest version.)
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder = shared / f"once-{key}"
    folder.mkdir(exist_ok=True)
    with open(shared / f"once-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / "result.json"
        if not done.exists():
            done.write_text(json.dumps(make(folder)))
        return json.loads(done.read_text())


def completed(result: subprocess.CompletedProcess) -> dict:
    """A CompletedProcess as plain JSON data."""
    return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}


def fill_answers(notebook: nbformat.NotebookNode, answers: dict[str, str]) -> nbformat.NotebookNode:
    """A copy of ``notebook`` with the cells whose nbgrader ``grade_id`` is in ``answers`` replaced."""
    filled = copy.deepcopy(notebook)
    for cell in filled.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return filled


def write_submissions(ws, chapter: str, release: nbformat.NotebookNode,
                      submissions: dict[str, dict[str, str]]) -> None:
    """Each student's copy of ``release`` with their answers, where the grader keeps submissions
    (``ws``: a grader.workspace.Workspace)."""
    for student, answers in submissions.items():
        path = ws.submitted(student, chapter)
        path.parent.mkdir(parents=True)
        nbformat.write(fill_answers(release, answers), path)


def cells_by_role(nb: dict) -> tuple[dict[str, str], dict[str, float]]:
    """(answer grade_id -> source, test grade_id -> points) of a notebook."""
    answers = {gid: cell_source(c) for gid, c in cells_with_role(nb, "answer").items()}
    tests = {gid: float(nbgrader_meta(c).get("points", 0)) for gid, c in cells_with_role(nb, "test").items()}
    return answers, tests


FIXTURES = REPO / "tests" / "fixtures" / "wrong_answers"


def _fixture_module(chapter: str):
    path = FIXTURES / f"{chapter}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"wrong_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrong_answers(chapter: str) -> list[dict]:
    """The chapter's wrong-answer fixtures: ``{"name", "answers": {cell: source}, "fails": [...]}``."""
    module = _fixture_module(chapter)
    return module.WRONG_ANSWERS if module else []


def correct_answers(chapter: str) -> list[dict]:
    """The chapter's other correct answers, which must score full marks: ``{"name", "answers"}``
    (``CORRECT_ANSWERS`` in the same fixture file; issue 19)."""
    module = _fixture_module(chapter)
    return list(getattr(module, "CORRECT_ANSWERS", [])) if module else []


def combined_wrong_answer(chapter: str, most: int = 3) -> dict:
    """One submission with several of the chapter's wrong answers, in different exercises.

    Taken in the fixtures' order: a wrong answer joins when it replaces other answer cells and
    fails other test cells than those already chosen, so the expected failures are their union.
    The in-process check grades this combination too, so an interaction the union misses shows
    up there first.
    """
    names, answers, fails = [], {}, set()
    for case in wrong_answers(chapter):
        if set(case["answers"]) & set(answers) or set(case["fails"]) & fails:
            continue
        names.append(case["name"])
        answers.update(case["answers"])
        fails |= set(case["fails"])
        if len(names) == most:
            break
    return {"name": "combined: " + " + ".join(names), "answers": answers, "fails": sorted(fails),
            "parts": names}
