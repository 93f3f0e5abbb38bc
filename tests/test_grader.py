"""The grader end to end on a tiny synthetic chapter: release, autograde, report, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import nbformat
import pytest

from grader import sandbox
from grader.workspace import Status, Workspace
from tests.grading_helpers import REPO, completed, once_per_session, read_grades, run_grader, tree_digest
from tests.mini_course import CHAPTER, MAX_SCORE, make_course, solved

pytestmark = pytest.mark.grader  # the real grader: make test runs these, make check does not


@pytest.fixture
def course(tmp_path_factory) -> Path:
    def make(folder: Path) -> dict:
        root = make_course(folder / "course")
        result = run_grader("release", root=root)
        assert result.returncode == 0, result.stderr
        return {"root": str(root)}

    return Path(once_per_session(tmp_path_factory, "mini-course", make)["root"])


@pytest.fixture
def release_nb(course) -> nbformat.NotebookNode:
    return nbformat.read(course / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)


@pytest.fixture
def graded(course, release_nb, tmp_path_factory) -> dict:
    """One batch of honest, wrong and broken submissions, graded once for the tests below."""
    data = once_per_session(tmp_path_factory, "mini-batch",
                            lambda folder: _grade_batch(course, release_nb, folder))
    return {**data, "subs": Path(data["subs"]), "workspace": Path(data["workspace"]),
            "before": {k: tuple(v) for k, v in data["before"].items()}}


def _grade_batch(course: Path, release_nb: nbformat.NotebookNode, folder: Path) -> dict:
    subs = folder / "subs"
    subs.mkdir()
    nbformat.write(solved(release_nb), str(subs / "alice_1234_ch99.ipynb"))  # Canvas-style name
    nbformat.write(release_nb, str(subs / "bob.ipynb"))  # blank
    (subs / "carol").mkdir()  # folder per student, renamed notebook
    wrong_mean = "def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n"
    nbformat.write(solved(release_nb, ex3_mean=wrong_mean), str(subs / "carol" / "Untitled 3.ipynb"))
    (subs / "dave.ipynb").write_text('{"cells": [')  # corrupt JSON
    (subs / "erin.ipynb").write_text("")  # empty file
    (subs / "frank.ipynb").write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5}))  # no cells
    # An older nbformat (3) with a correct answer in every cell.
    (subs / "gina.ipynb").write_text(nbformat.writes(nbformat.convert(solved(release_nb), 3)))
    before = tree_digest(subs)
    workspace = folder / "grading"
    result = run_grader("autograde", subs, "--chapter", "ch99", "--workspace", workspace,
                        "--jobs", "2", root=course)
    report = run_grader("report", "--chapter", "ch99", "--workspace", workspace, root=course)
    return {"subs": str(subs), "before": before, "workspace": str(workspace),
            "autograde": completed(result), "report": completed(report)}


def test_release_check_detects_drift(course, tmp_path):
    copy = tmp_path / "course"
    shutil.copytree(course, copy)
    assert run_grader("release", "--check", root=copy).returncode == 0
    path = copy / "chapters" / CHAPTER / f"{CHAPTER}.ipynb"
    path.write_bytes(path.read_bytes().replace(b"a mini chapter", b"an edited chapter"))
    result = run_grader("release", "--check", root=copy)
    assert result.returncode == 1
    assert "differs from a fresh generation" in result.stdout
    (copy / "chapters" / "ch98_orphan").mkdir()
    assert "has no source in solutions/" in run_grader("release", "--check", root=copy).stdout


def test_release_strips_solutions_and_hidden_tests(release_nb):
    text = json.dumps(release_nb)
    assert "BEGIN SOLUTION" not in text and "SECRET-HIDDEN-TEST-ADD" not in text
    assert "raise NotImplementedError()" in text


def test_scores(graded):
    grades = read_grades(graded["workspace"], CHAPTER)
    assert grades["alice"]["score"] == str(MAX_SCORE)  # stderr output in a test cell costs nothing
    assert grades["bob"]["score"] == "0"
    assert grades["carol"]["score"] == str(MAX_SCORE - 3)
    assert grades["carol"]["ex3_mean_tests"] == "0" and grades["carol"]["ex1_add_tests"] == "1"
    assert grades["gina"]["score"] == str(MAX_SCORE)  # an nbformat 3 submission is graded too


def test_bad_notebooks_are_errors_not_zeros(graded):
    grades = read_grades(graded["workspace"], CHAPTER)
    for student, words in {"dave": "not a readable Jupyter notebook",
                           "erin": "empty", "frank": "not a readable Jupyter notebook"}.items():
        row = grades[student]
        assert row["status"] == "error", row
        assert row["score"] == "", "an ungradable submission must not show a score"
        assert words in row["message"]
    assert graded["autograde"]["returncode"] == 1  # something needs the instructor's attention
    assert "dave: error" in graded["autograde"]["stdout"]


def test_submissions_never_modified(graded):
    assert tree_digest(graded["subs"]) == graded["before"]


def test_report_outputs(graded):
    assert graded["report"]["returncode"] == 0, graded["report"]["stderr"]
    out = graded["workspace"] / "reports" / CHAPTER
    summary = (out / "summary.md").read_text()
    assert "| ex3_mean_tests | 3 |" in summary
    assert (out / "pass_rates.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "feedback" / "alice.html").read_text()
    assert "SECRET-HIDDEN-TEST-ADD" not in html, "feedback must not reveal hidden tests"
    assert "add(1, 2)" in html  # visible tests stay


def test_regrading_skips_unchanged(graded, course):
    log = graded["workspace"] / "logs" / CHAPTER / "alice.log"
    mtime = log.stat().st_mtime_ns
    result = run_grader("autograde", graded["subs"], "--chapter", CHAPTER, "--workspace",
                        graded["workspace"], root=course)
    assert "(0 graded in this run" in result.stdout, result.stdout
    assert log.stat().st_mtime_ns == mtime


def test_zip_with_unsafe_entries(course, release_nb, tmp_path):
    archive = tmp_path / "export.zip"
    good = nbformat.writes(solved(release_nb))
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("hana/ch99_mini.ipynb", good)
        zf.writestr("../evil_ch99.ipynb", good)
        zf.writestr("/abs/path.ipynb", good)
        zf.writestr("__MACOSX/hana/._ch99_mini.ipynb", "junk")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    workspace = tmp_path / "ws"
    result = run_grader("autograde", archive, "--chapter", CHAPTER, "--workspace", workspace,
                        root=course)
    assert "unsafe path" in result.stdout
    assert not (tmp_path / "evil_ch99.ipynb").exists()
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == digest
    assert run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, "--no-feedback",
                      root=course).returncode == 0
    assert read_grades(workspace, CHAPTER)["hana"]["score"] == str(MAX_SCORE)


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p.with_suffix(".zip").write_bytes(b"PK\x03\x04 not really a zip"), "corrupt"),
    (lambda p: None, "does not exist"),
])
def test_bad_submission_paths(course, tmp_path, make_bad, message):
    target = tmp_path / "subs"
    make_bad(target)
    path = target.with_suffix(".zip") if target.with_suffix(".zip").exists() else target
    result = run_grader("autograde", path, "--chapter", CHAPTER, "--workspace", tmp_path / "ws",
                        root=course)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_workspace_inside_repository_refused(course, tmp_path):
    result = run_grader("autograde", tmp_path, "--chapter", CHAPTER, "--workspace",
                        course / "grading", root=course)
    assert result.returncode == 2 and "outside" in result.stderr


def test_unknown_chapter(course, tmp_path):
    result = run_grader("autograde", tmp_path, "--chapter", "ch42", "--workspace", tmp_path / "w",
                        root=course)
    assert result.returncode == 2 and "Unknown chapter" in result.stderr


def _grade_sleeper(course, release_nb, tmp_path, student: str, *limits: str):
    """Grade one student whose first answer cell sleeps; returns (autograde result, CSV row)."""
    subs = tmp_path / "subs"
    subs.mkdir()
    sleeper = "import time\ntime.sleep(600)\ndef add(a, b):\n    return a + b\n"
    nbformat.write(solved(release_nb, ex1_add=sleeper), str(subs / f"{student}.ipynb"))
    workspace = tmp_path / "ws"
    result = run_grader("autograde", subs, "--chapter", CHAPTER, "--workspace", workspace, *limits,
                        root=course)
    run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, "--no-feedback", root=course)
    return result, read_grades(workspace, CHAPTER)[student]


def test_notebook_timeout(course, release_nb, tmp_path):
    result, row = _grade_sleeper(course, release_nb, tmp_path, "ivan", "--notebook-timeout", "25")
    assert "ivan: timeout" in result.stdout
    assert row["status"] == "timeout" and row["score"] == ""


def test_cell_timeout_interrupts_that_cell_only(course, release_nb, tmp_path):
    """A cell past the per-cell limit is interrupted inside the sandbox: that exercise scores 0,
    the rest of the notebook is still graded, and the report says why (never a silent 0)."""
    # 30 s, not less: the next cell's first `import torch` takes several seconds on a busy machine,
    # and an import cut short by the limit's interrupt leaves torch broken for every later cell.
    result, row = _grade_sleeper(course, release_nb, tmp_path, "judy", "--cell-timeout", "30")
    assert "judy: graded" in result.stdout and "did not finish" in result.stdout, result.stdout
    assert row["status"] == "graded", row
    assert row["ex1_add_tests"] == "0", row  # the sleeping answer never defined add()
    assert row["ex2_square_tests"] == "2" and row["ex3_mean_tests"] == "3", row
    assert row["score"] == "5" and "CellTimeoutError" in row["flags"], row


# A status file as the grader wrote it when a record's status was a bare string.
OLD_STATUS_FILE = """{
 "records": {
  "alice": {
   "student": "alice",
   "status": "graded",
   "message": "",
   "source": "alice_1234_ch99.ipynb",
   "sha256": "ab12",
   "seconds": 12.5,
   "flags": [
    "note: something"
   ],
   "checks": {
    "ex1_add_tests": "passed"
   },
   "seed": 7
  },
  "bob": {
   "student": "bob",
   "status": "timeout",
   "message": "too slow",
   "source": "bob.ipynb",
   "sha256": "cd34",
   "seconds": null,
   "flags": [],
   "checks": {},
   "seed": null
  }
 },
 "rejected": [
  {
   "student": "",
   "status": "rejected",
   "message": "x.ipynb: no id",
   "source": "",
   "sha256": "",
   "seconds": null,
   "flags": [],
   "checks": {},
   "seed": null
  }
 ]
}"""


def test_status_file_of_the_string_era_loads_and_saves_unchanged(tmp_path):
    ws = Workspace(tmp_path / "ws", REPO)
    path = ws.status_path(CHAPTER)
    path.parent.mkdir(parents=True)
    path.write_text(OLD_STATUS_FILE)
    status = ws.load_status(CHAPTER)
    assert status.records["alice"].status is Status.GRADED
    assert status.records["bob"].status is Status.TIMEOUT
    assert status.rejected[0].status is Status.REJECTED
    assert status.records["bob"].status == "timeout" and f"{status.rejected[0].status}" == "rejected"
    ws.save_status(status)
    assert path.read_text() == OLD_STATUS_FILE


def test_cgroup2_parent_is_the_nearest_that_hands_memory_down(tmp_path):
    mount = tmp_path / "cgroup"
    own = mount / "machine.slice" / "job.scope"
    own.mkdir(parents=True)
    (mount / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (mount / "machine.slice" / "cgroup.subtree_control").write_text("memory\n")
    (own / "cgroup.subtree_control").write_text("\n")
    assert sandbox._own_folder("/", mount, "/machine.slice/job.scope") == own
    assert sandbox._own_folder("/machine.slice", mount, "/machine.slice/job.scope") == mount / "job.scope"
    assert sandbox._own_folder("/other", mount, "/machine.slice/job.scope") == mount
    assert sandbox._memory_delegating_ancestor(own, mount) == mount / "machine.slice"
    (mount / "machine.slice" / "cgroup.subtree_control").write_text("cpu\n")
    assert sandbox._memory_delegating_ancestor(own, mount) == mount
    (mount / "cgroup.subtree_control").write_text("cpu\n")
    with pytest.raises(sandbox._NoCgroup, match="no cgroup above"):
        sandbox._memory_delegating_ancestor(own, mount)
