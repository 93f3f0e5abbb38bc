"""``report``: grades CSV, feedback HTML per student, and pass rates per exercise.

The CSV never shows a silent 0: a submission that could not be graded (unreadable, timed out,
crashed) has an empty score and its status and message say why; a cell that needs a manual grade
is left empty and named in the message. With a roster, canvas.csv for Canvas's gradebook import;
every run also rewrites reports/all_grades.csv, all chapters in one long CSV (grader/lms.py).
"""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from grader import GraderError, lms
from grader.course import nbgrader_meta
from grader.lms import csv_number as _fmt  # one home for CSV cells: grader/lms.py
from grader.lms import csv_text  # formula neutralisation, one rule for every CSV the grader writes
from grader.similarity import DEFAULT_THRESHOLDS, Thresholds, similarity_flags
from grader.workspace import Record, Status, Workspace

# A row's status beyond the records' (grader/workspace.py Status): graded, but a cell has no score.
NEEDS_MANUAL_GRADE = "needs manual grade"


@dataclass
class Row:
    student: str
    status: Status | str  # a record's Status, or NEEDS_MANUAL_GRADE
    message: str
    cells: dict[str, float | None] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        if self.status != Status.GRADED or any(v is None for v in self.cells.values()):
            return None
        return sum(self.cells.values())


def test_cells(ws: Workspace, chapter: str) -> list[tuple[str, float]]:
    """``(grade_id, points)`` of each graded cell, in notebook order."""
    path = ws.path / "source" / chapter / f"{chapter}.ipynb"
    if not path.exists():
        raise GraderError(f"The workspace {ws.path} has not graded {chapter} yet: run autograde first.")
    cells = json.loads(path.read_text())["cells"]
    out = []
    for cell in cells:
        # Every cell nbgrader keeps a grade for, not only the "test" role of grader/course.py:
        # a manually graded cell (solution and grade, or markdown) is listed too, so that a
        # missing manual score leaves the total empty instead of silently 0.
        meta = nbgrader_meta(cell)
        if meta.get("grade"):
            out.append((meta["grade_id"], float(meta.get("points", 0))))
    return out


def collect_rows(ws: Workspace, chapter: str) -> tuple[list[Row], list[tuple[str, float]]]:
    from nbgrader.api import Gradebook, MissingEntry

    cells = test_cells(ws, chapter)
    status = ws.load_status(chapter)
    rows = []
    with Gradebook(ws.db_url) as gb:
        for student, record in sorted(status.records.items()):
            row = Row(student, record.status, record.message, flags=list(record.flags))
            if record.status == Status.GRADED:
                try:
                    nb = gb.find_submission_notebook(chapter, chapter, student)
                except MissingEntry:
                    row.status = Status.ERROR
                    row.message = "graded but missing from the gradebook; grade again"
                    rows.append(row)
                    continue
                grades = {g.name: g for g in nb.grades}
                manual = []
                for name, _points in cells:
                    grade = grades.get(name)
                    if grade is None or (grade.needs_manual_grade and grade.manual_score is None):
                        row.cells[name] = None
                        manual.append(name)
                    else:
                        row.cells[name] = float(grade.score)
                if manual:
                    row.status = NEEDS_MANUAL_GRADE
                    row.message = "; ".join(filter(None, [row.message, "not graded: " + ", ".join(manual)]))
            rows.append(row)
    return rows, cells


def _md(text: str) -> str:
    """Text from a submission (ids, file names, messages, flags) as inert Markdown: one line, no
    HTML, no links or images, no code spans."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`\[\]])", r"\\\1", text)


def write_report(ws: Workspace, chapter: str, feedback: bool = True,
                 similarity: Thresholds | None = DEFAULT_THRESHOLDS,
                 roster: lms.Roster | None = None) -> Path:
    """Write ``reports/<chapter>/`` and ``reports/all_grades.csv``; returns the chapter's folder.
    ``similarity=None``: no similarity flags. With a ``roster`` (grader/lms.py), also canvas.csv
    and the unmatched students in summary.md."""
    rows, cells = collect_rows(ws, chapter)
    out = ws.reports(chapter)
    out.mkdir(parents=True, exist_ok=True)
    # Code similarity (grader/similarity.py): computed from the submissions now, never stored.
    (out / "similarity.html").unlink(missing_ok=True)
    if similarity is not None:
        found = similarity_flags(ws, chapter, [r.student for r in rows], out / "similarity.html",
                                 similarity)
        for row in rows:
            row.flags += found.flags.get(row.student, [])
    _write_grades_csv(out / "grades.csv", rows, cells)
    lms.write_long_csv(out.parent)  # every chapter's grades.csv, this one's new
    graded = [r for r in rows if r.status == Status.GRADED]
    rates = _pass_rates(graded, cells)
    summary = _summary(chapter, rows, cells, rates, ws.load_status(chapter).rejected)
    # A canvas.csv left from an earlier run with a roster would hold stale grades.
    (out / "canvas.csv").unlink(missing_ok=True)
    if roster is not None:
        matching = lms.match(roster, rows)
        lms.write_canvas_csv(out / "canvas.csv", chapter, matching, sum(p for _, p in cells))
        summary += lms.matching_summary(roster, matching, _md)
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    _plot(rates, chapter, out / "pass_rates.png")
    if feedback and graded:
        _feedback(ws, chapter, [r.student for r in graded], out / "feedback")
    return out


def _write_grades_csv(path: Path, rows: list[Row], cells: list[tuple[str, float]]) -> None:
    max_score = sum(p for _, p in cells)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["student", "status", "score", "max_score", *[n for n, _ in cells], "flags",
                         "message"])
        for row in rows:
            writer.writerow([csv_text(row.student), csv_text(row.status), _fmt(row.score),
                             _fmt(max_score), *[_fmt(row.cells.get(n)) for n, _ in cells],
                             csv_text(" | ".join(row.flags)), csv_text(row.message)])


def _pass_rates(graded: list[Row], cells: list[tuple[str, float]]) -> dict[str, float | None]:
    """The fraction of graded submissions with full points, per cell (None when none is graded)."""
    return {name: (sum(1 for r in graded if r.cells.get(name) == points) / len(graded)
                   if graded else None) for name, points in cells}


def _summary(chapter: str, rows: list[Row], cells: list[tuple[str, float]],
             rates: dict[str, float | None], rejected: list[Record]) -> list[str]:
    """The lines of summary.md: scores, pass rates, what was not graded, flags, skipped entries."""
    max_score = sum(p for _, p in cells)
    graded = [r for r in rows if r.status == Status.GRADED]
    lines = [f"# {chapter}: {len(rows)} submissions, {len(graded)} graded", ""]
    scores = [r.score for r in graded]
    if scores:
        mean = sum(scores) / len(scores)
        lines += [f"Mean score {mean:.2f} / {max_score:g}; full marks: "
                  f"{sum(1 for s in scores if s == max_score)}", ""]
    lines += ["| test cell | points | passed (full points) |", "|---|---:|---:|"]
    for name, points in cells:
        rate = rates[name]
        lines.append(f"| {name} | {points:g} | {'-' if rate is None else f'{100 * rate:.0f}%'} |")
    problems = [r for r in rows if r.status != Status.GRADED]
    if problems:
        lines += ["", "## Not graded automatically", ""]
        lines += [f"- {_md(r.student)}: {_md(r.status)} — {_md(r.message)}" for r in problems]
    flagged = [r for r in rows if r.flags]
    if flagged:
        lines += ["", f"## Flags ({len(flagged)} submissions; see docs/instructor-guide.md, \"Flags\")", ""]
        for row in flagged:
            lines.append(f"- {_md(row.student)}:")
            lines += [f"  - {_md(flag)}" for flag in row.flags]
    if rejected:
        lines += ["", "## Entries skipped in the submissions", ""]
        lines += [f"- {_md(r.message)}" for r in rejected]
    return lines


def _plot(rates: dict[str, float | None], chapter: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rates)
    values = [100 * (rates[n] or 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of graded submissions\nwith full points")
    ax.set_title(f"{chapter}: pass rate per test cell")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _feedback(ws: Workspace, chapter: str, students: list[str], dest: Path) -> None:
    result = ws.nbgrader("generate_feedback", chapter, "--force")
    if result.returncode != 0:
        raise GraderError("nbgrader could not generate feedback:\n"
                          + (result.stderr or result.stdout)[-3000:])
    dest.mkdir(parents=True, exist_ok=True)
    for student in students:
        html = ws.feedback_html(student, chapter)
        if html.exists():
            shutil.copyfile(html, dest / f"{student}.html")
