"""Grades back to the LMS: a CSV for Canvas's gradebook import, and one long CSV of all chapters.

**The roster** (``report --roster roster.csv``) is a CSV with a header row. Its columns are those
of Canvas's gradebook export (Grades → Export), so that export can be passed as it is:

    Student, ID, SIS User ID, SIS Login ID, Section

``Student`` is the name, ``ID`` Canvas's own user id, ``SIS User ID`` and ``SIS Login ID`` the
institution's ids, ``Section`` the section. Other columns (the export's assignments and totals)
are ignored, and so is its "Points Possible" row (the second row, ``Student`` = Points Possible).
Only the column that holds the grader's student ids is required (see below) and at least one of
``ID``, ``SIS User ID`` and ``SIS Login ID`` (Canvas needs one to find the student); a missing
column is written empty.

**Matching.** The grader's student id is the one read from the submissions' names or folders
(``autograde --id-pattern``). It is compared with one roster column, ``SIS Login ID`` unless
``--roster-id-column`` names another (e.g. ``ID`` when the ids come from Canvas's own download
names), exactly after trimming spaces; an id that appears twice in that column is an error.
Nobody is dropped: students who submitted but are not in the roster, and students in the roster with no
submission, are listed in summary.md and on stdout.

**canvas.csv** follows the layout of Canvas's gradebook export, which its import reads back:
the header ``Student, ID, SIS User ID, SIS Login ID, Section, <chapter>`` (the assignment column
is named by the chapter, e.g. ``ch03_losses``; an import with a new column name creates that
assignment), then a "Points Possible" row with the chapter's maximum score, then one row per
roster student in roster order. A score is a plain number; a student with no score (no
submission, not gradable, a manual grade missing) has an **empty** cell, never 0. Followed:
the columns of Canvas's own gradebook export and the import rules institutions' Canvas guides
give (e.g. Ohio State's "Import a CSV file to Carmen Grades": a student is found by ID, SIS User
ID or SIS Login ID, then Section, then one column per assignment; a new column name makes a new
assignment).

**all_grades.csv** (``reports/all_grades.csv``, rewritten each time ``report`` runs) gathers the
``grades.csv`` of every chapter reported in the workspace in long format, one row per student
and chapter: ``student, chapter, score, max_score, status, flags``, for any other LMS or a
spreadsheet.

Every text cell of every CSV the grader writes goes through :func:`csv_text`, so an id, name or
flag that starts like a formula is never run by a spreadsheet.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from grader import GraderError

if TYPE_CHECKING:  # report imports this module: no import back at run time
    from grader.report import Row

# Canvas's gradebook export and import: the student columns before the assignments.
CANVAS_STUDENT_COLUMNS = ("Student", "ID", "SIS User ID", "SIS Login ID", "Section")
# The columns Canvas can find a student by (a name alone is not enough).
CANVAS_ID_COLUMNS = ("ID", "SIS User ID", "SIS Login ID")
POINTS_POSSIBLE = "Points Possible"
DEFAULT_ROSTER_ID_COLUMN = "SIS Login ID"
LONG_COLUMNS = ("student", "chapter", "score", "max_score", "status", "flags")
ALL_GRADES = "all_grades.csv"


def csv_text(text: object) -> str:
    """A text cell that no spreadsheet runs as a formula (CSV injection): text starting with
    = + - @ (after spaces), a tab or a carriage return gets a leading apostrophe."""
    text = str(text)
    return "'" + text if text.lstrip()[:1] in ("=", "+", "-", "@") or text[:1] in ("\t", "\r") else text


def csv_number(value: float | None) -> str:
    """A score cell: the number, or empty when there is none (never 0)."""
    return "" if value is None else f"{value:g}"


@dataclass(frozen=True)
class RosterStudent:
    row: int  # row of the roster file (the header is row 1), for messages
    key: str  # the value of the roster's id column, compared with the grader's student id
    columns: dict[str, str]  # CANVAS_STUDENT_COLUMNS -> value ("" when the roster lacks it)


@dataclass
class Roster:
    path: Path
    id_column: str
    students: list[RosterStudent]

    def by_key(self) -> dict[str, RosterStudent]:
        return {s.key: s for s in self.students if s.key}


def read_roster(path: Path, id_column: str = DEFAULT_ROSTER_ID_COLUMN) -> Roster:
    """Read and check the roster; a :class:`GraderError` says what is wrong and what to do."""
    path = Path(path)
    try:
        # utf-8-sig: a spreadsheet saving CSV often starts it with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise GraderError(f"cannot read the roster {path} ({error}): pass a CSV file in UTF-8, e.g. "
                          "Canvas's gradebook export (Grades → Export)") from None
    header = [name.strip() for name in lines[0]] if lines else []
    _check_header(path, header, id_column)
    students: list[RosterStudent] = []
    seen: dict[str, int] = {}
    for number, values in enumerate(lines[1:], start=2):
        # A short row lacks its last columns; cells past the header are nobody's column.
        cells = dict(zip(header, (v.strip() for v in values), strict=False))
        if not any(cells.values()) or cells.get("Student") == POINTS_POSSIBLE:
            continue  # a blank line, or the Points Possible row of Canvas's export
        key = cells.get(id_column, "")
        if key in seen:
            raise GraderError(f"the roster {path} has {id_column} {key!r} twice (rows {seen[key]} and "
                              f"{number}): one row per student, so each grade goes to one student")
        if key:
            seen[key] = number
        students.append(RosterStudent(number, key, {c: cells.get(c, "") for c in CANVAS_STUDENT_COLUMNS}))
    return Roster(path, id_column, students)


def _check_header(path: Path, header: list[str], id_column: str) -> None:
    if not header:
        raise GraderError(f"the roster {path} is empty: it needs a header row, e.g. "
                          + ", ".join(CANVAS_STUDENT_COLUMNS))
    if id_column not in header:
        raise GraderError(
            f"the roster {path} has no column {id_column!r} (its columns: {', '.join(header)}): "
            "pass --roster-id-column with the column that holds the students' ids as the grader "
            "reads them from the submissions")
    if not set(CANVAS_ID_COLUMNS) & set(header):
        raise GraderError(f"the roster {path} has none of the columns Canvas finds a student by "
                          f"({', '.join(CANVAS_ID_COLUMNS)}): use Canvas's gradebook export as roster")
    # Only the columns read here: an export may repeat an assignment's name, which is harmless.
    duplicated = [name for name in (*CANVAS_STUDENT_COLUMNS, id_column) if header.count(name) > 1]
    if duplicated:
        raise GraderError(f"the roster {path} has the column {duplicated[0]!r} twice: keep one")


@dataclass
class Matching:
    """The roster and one chapter's rows side by side."""

    scores: list[tuple[RosterStudent, float | None]]  # every roster student, in roster order
    not_in_roster: list[str] = field(default_factory=list)  # submitted, no roster row
    no_submission: list[RosterStudent] = field(default_factory=list)  # roster row, nothing submitted


def match(roster: Roster, rows: list[Row]) -> Matching:
    by_student = {row.student: row for row in rows}
    keys = roster.by_key()
    matching = Matching([(s, by_student[s.key].score if s.key in by_student else None)
                         for s in roster.students])
    matching.not_in_roster = sorted(s for s in by_student if s not in keys)
    matching.no_submission = [s for s in roster.students if s.key not in by_student]
    return matching


def write_canvas_csv(path: Path, chapter: str, matching: Matching, max_score: float) -> None:
    """Canvas's gradebook layout (module docstring): header, Points Possible row, one row per
    roster student."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CANVAS_STUDENT_COLUMNS, csv_text(chapter)])
        writer.writerow([POINTS_POSSIBLE, "", "", "", "", csv_number(max_score)])
        for student, score in matching.scores:
            writer.writerow([*(csv_text(student.columns[c]) for c in CANVAS_STUDENT_COLUMNS),
                             csv_number(score)])


def matching_summary(roster: Roster, matching: Matching, md: Callable[[str], str]) -> list[str]:
    """Lines for summary.md (and so stdout): who could not be matched, both ways. ``md`` makes a
    text inert Markdown (report._md)."""
    matched = len(matching.scores) - len(matching.no_submission)
    lines = ["", f"## Roster: {matched} of {len(matching.scores)} students matched by "
                 f"{md(roster.id_column)} (canvas.csv)", ""]
    if not (matching.not_in_roster or matching.no_submission):
        return lines + ["Every submission and every roster student matched."]
    if matching.not_in_roster:
        lines += [f"Submitted but not in the roster (not in canvas.csv: add them to the roster or "
                  f"fix the id; {len(matching.not_in_roster)}):", ""]
        lines += [f"- {md(student)}" for student in matching.not_in_roster]
        lines.append("")
    if matching.no_submission:
        lines += [f"In the roster with no submission (empty cell in canvas.csv; "
                  f"{len(matching.no_submission)}):", ""]
        lines += [f"- {md(s.key) if s.key else f'(no {md(roster.id_column)}, row {s.row})'}"
                  + (f" — {md(s.columns['Student'])}" if s.columns["Student"] else "")
                  for s in matching.no_submission]
    return lines


def write_long_csv(reports: Path) -> Path:
    """``reports/all_grades.csv`` from every ``reports/<chapter>/grades.csv``: one row per student
    and chapter (columns LONG_COLUMNS), chapters in name order."""
    out = reports / ALL_GRADES
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LONG_COLUMNS)
        for grades in sorted(reports.glob("*/grades.csv")):
            for row in _read_grades(grades):
                writer.writerow([csv_text(row["student"]), csv_text(grades.parent.name),
                                 _number(grades, row["score"]), _number(grades, row["max_score"]),
                                 csv_text(row["status"]), csv_text(row["flags"])])
    return out


def _read_grades(grades: Path) -> list[dict[str, str]]:
    with open(grades, newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"student", "status", "score", "max_score", "flags"}
    if rows and not needed <= rows[0].keys():
        raise GraderError(f"{grades} lacks the columns {', '.join(sorted(needed - rows[0].keys()))}: "
                          f"run report for {grades.parent.name} again")
    return rows


def _number(grades: Path, text: str) -> str:
    """A score read back from grades.csv, checked to be a number (or empty)."""
    try:
        return csv_number(float(text)) if text.strip() else ""
    except ValueError:
        raise GraderError(f"{grades} has the score {text!r}, not a number: run report for "
                          f"{grades.parent.name} again") from None
