"""Grades back to the LMS (grader/lms.py): canvas.csv through a roster, reports/all_grades.csv,
formula neutralisation and roster errors.

No grading: ``report.collect_rows`` is replaced by rows built here (as in tests/test_similarity.py)."""

from __future__ import annotations

import csv
import re

import pytest

from grader import GraderError, lms, report
from grader.workspace import Workspace
from tests.grading_helpers import REPO, run_grader

CHAPTER = "ch03_losses"
OTHER = "ch01_neural_networks"
CELLS = [("ex1_tests", 2.0), ("ex2_tests", 3.0)]
# Canvas's gradebook export as it comes: an assignment column, the Points Possible row, a name
# that looks like a formula and a student with no SIS Login ID (Canvas's "Test Student").
CANVAS_EXPORT = """\ufeffStudent,ID,SIS User ID,SIS Login ID,Section,Quiz 1 (101)
    Points Possible,,,,,10
"Lovelace, Ada",1001,S-1,ada,Sec A,9
"Babbage, Charles",1002,S-2,charles,Sec A,8
"=HYPERLINK(""http://evil"")",1003,S-3,eve,@Sec B,7
"Hopper, Grace",1004,S-4,grace,Sec B,
Test Student,1005,,,Sec A,
"""


def rows_of(chapter: str) -> tuple[list[report.Row], list[tuple[str, float]]]:
    """A chapter's rows as collect_rows gives them: graded, an error, a missing manual grade,
    and a student not in the roster."""
    rows = [report.Row("ada", "graded", "", {"ex1_tests": 2.0, "ex2_tests": 1.5}),
            report.Row("charles", "error", "cannot read the file", flags=["=1+1 flag"]),
            report.Row("eve", report.NEEDS_MANUAL_GRADE, "not graded: ex2_tests",
                       {"ex1_tests": 2.0, "ex2_tests": None}),
            report.Row("mallory", "graded", "", {"ex1_tests": 0.0, "ex2_tests": 0.0})]
    if chapter == OTHER:
        rows = rows[:1]
    return rows, CELLS


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.setattr(report, "collect_rows", lambda _ws, chapter: rows_of(chapter))
    return Workspace(tmp_path / "ws", REPO)


@pytest.fixture
def roster_file(tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text(CANVAS_EXPORT, encoding="utf-8")
    return path


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def write(ws: Workspace, chapter: str = CHAPTER, roster: lms.Roster | None = None):
    return report.write_report(ws, chapter, feedback=False, similarity=None, roster=roster)


def test_canvas_csv(ws, roster_file):
    out = write(ws, roster=lms.read_roster(roster_file))
    assert read_csv(out / "canvas.csv") == [
        ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", CHAPTER],
        ["Points Possible", "", "", "", "", "5"],
        ["Lovelace, Ada", "1001", "S-1", "ada", "Sec A", "3.5"],
        ["Babbage, Charles", "1002", "S-2", "charles", "Sec A", ""],  # error: empty, not 0
        ["'=HYPERLINK(\"http://evil\")", "1003", "S-3", "eve", "'@Sec B", ""],  # manual grade missing
        ["Hopper, Grace", "1004", "S-4", "grace", "Sec B", ""],  # no submission
        ["Test Student", "1005", "", "", "Sec A", ""],
    ]
    summary = (out / "summary.md").read_text()
    assert "## Roster: 3 of 5 students matched by SIS Login ID (canvas.csv)" in summary
    assert "Submitted but not in the roster" in summary and "\n- mallory\n" in summary
    assert "- grace — Hopper, Grace" in summary
    assert "- (no SIS Login ID, row 7) — Test Student" in summary


def test_match_by_another_column(ws, tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("Student,ID,Section\nAda,ada,A\nMallory,mallory,B\nNobody,x9,B\n")
    roster = lms.read_roster(path, id_column="ID")
    out = write(ws, roster=roster)
    assert read_csv(out / "canvas.csv")[2:] == [["Ada", "ada", "", "", "A", "3.5"],
                                                ["Mallory", "mallory", "", "", "B", "0"],
                                                ["Nobody", "x9", "", "", "B", ""]]
    summary = (out / "summary.md").read_text()
    assert "matched by ID" in summary and "- charles\n- eve" in summary and "- x9 — Nobody" in summary


def test_without_roster_nothing_changes(ws, roster_file):
    out = write(ws)
    grades, summary = (out / "grades.csv").read_bytes(), (out / "summary.md").read_text()
    assert not (out / "canvas.csv").exists() and "Roster" not in summary
    write(ws, roster=lms.read_roster(roster_file))
    assert (out / "grades.csv").read_bytes() == grades
    assert (out / "summary.md").read_text().startswith(summary)
    write(ws)  # a canvas.csv from an earlier run would hold stale grades
    assert not (out / "canvas.csv").exists() and (out / "summary.md").read_text() == summary


def test_long_csv_over_two_chapters(ws):
    write(ws, CHAPTER)
    write(ws, OTHER)
    assert read_csv(ws.path / "reports" / "all_grades.csv") == [
        ["student", "chapter", "score", "max_score", "status", "flags"],
        ["ada", OTHER, "3.5", "5", "graded", ""],
        ["ada", CHAPTER, "3.5", "5", "graded", ""],
        ["charles", CHAPTER, "", "5", "error", "'=1+1 flag"],
        ["eve", CHAPTER, "", "5", "needs manual grade", ""],
        ["mallory", CHAPTER, "0", "5", "graded", ""],
    ]


def test_formulas_neutralised():
    for text in ['=HYPERLINK("x")', "+1", "-1", "@SUM(A1)", " =1", "\tx", "\rx"]:
        assert lms.csv_text(text) == "'" + text
        assert lms.csv_text(lms.csv_text(text)) == "'" + text  # read back and written again
    assert lms.csv_text("Lovelace, Ada") == "Lovelace, Ada" and lms.csv_number(None) == ""
    assert report.csv_text is lms.csv_text  # grades.csv uses the same (tests/test_leaks.py)


@pytest.mark.parametrize("text, id_column, message", [
    ("Student,ID,SIS User ID,Section\nAda,1,S-1,A\n", "SIS Login ID",
     "no column 'SIS Login ID' (its columns: Student, ID, SIS User ID, Section): pass --roster-id-column"),
    ("Student,ID,SIS Login ID\nAda,1,ada\nAda again,2, ada \n", "SIS Login ID",
     "'ada' twice (rows 2 and 3)"),
    ("Student,Login\nAda,ada\n", "Login", "none of the columns Canvas finds a student by"),
    ("", "SIS Login ID", "is empty"),
    ("Student,SIS Login ID,SIS Login ID\nAda,ada,ada\n", "SIS Login ID", "column 'SIS Login ID' twice"),
])
def test_roster_errors(tmp_path, text, id_column, message):
    path = tmp_path / "roster.csv"
    path.write_text(text)
    with pytest.raises(GraderError, match=re.escape(message)):
        lms.read_roster(path, id_column)


def test_unreadable_roster(tmp_path):
    for path in (tmp_path / "missing.csv", tmp_path):
        with pytest.raises(GraderError, match="cannot read the roster"):
            lms.read_roster(path)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("Student,SIS Login ID\nJosé,jose\n".encode("latin-1"))
    with pytest.raises(GraderError, match="UTF-8"):
        lms.read_roster(latin1)


def test_cli(ws, roster_file, capsys):
    from grader.cli import main

    base = ["--root", str(REPO), "report", "--chapter", "ch03", "--workspace", str(ws.path),
            "--no-feedback", "--no-similarity"]
    assert main([*base, "--roster", str(roster_file)]) == 0
    out = capsys.readouterr().out
    assert "\n- mallory\n" in out and "canvas.csv" in out and "all_grades.csv" in out
    assert main([*base, "--roster", str(roster_file), "--roster-id-column", "ID"]) == 0
    assert "0 of 5 students matched by ID" in capsys.readouterr().out
    assert main([*base, "--roster-id-column", "ID"]) == 2
    assert "pass --roster too" in capsys.readouterr().err


def test_cli_bad_roster(tmp_path):
    roster = tmp_path / "roster.csv"
    roster.write_text("Student,ID\nAda,1\n")
    result = run_grader("report", "--chapter", "ch03", "--workspace", tmp_path / "ws",
                        "--roster", roster, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "has no column 'SIS Login ID'" in result.stderr and "--roster-id-column" in result.stderr
