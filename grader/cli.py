"""Command line: ``python -m grader {release,autograde,report}`` (also ``course-grader``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from grader import GraderError, database
from grader.course import ensure_scripts_on_path, find_root, list_chapters, resolve_chapter
from grader.ingest import DEFAULT_ID_PATTERN

if TYPE_CHECKING:  # imported where used: `release` needs none of the grading machinery
    from grader.lms import Roster
    from grader.workspace import Record, Workspace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grader",
        description="Build the student release, autograde submissions, and report grades.")
    parser.add_argument("--root", type=Path, default=None,
                        help="the course repository (default: found from here)")
    sub = parser.add_subparsers(dest="command", required=True)

    rel = sub.add_parser("release", help="regenerate chapters/ from solutions/")
    rel.add_argument("--chapter", action="append", default=None,
                     help="only this chapter (repeatable; default: all)")
    rel.add_argument("--check", action="store_true",
                     help="change nothing; fail if chapters/ differs from a fresh generation")

    auto = sub.add_parser("autograde", help="grade a folder or .zip of submitted notebooks")
    auto.add_argument("submissions", type=Path, help="folder or .zip of submissions")
    auto.add_argument("--chapter", required=True, help="e.g. ch01 or ch01_neural_networks")
    auto.add_argument("--db-url", default=None, metavar="URL", help=database.CLI_HELP)
    auto.add_argument("--workspace", type=Path, required=True,
                      help="instructor workspace outside the repository (created if missing)")
    auto.add_argument("--jobs", type=int, default=None,
                      help="submissions graded in parallel (default: one per CPU)")
    auto.add_argument("--cell-timeout", type=int, default=600,
                      help="seconds one cell may run (training cells need minutes)")
    auto.add_argument("--notebook-timeout", type=float, default=3600,
                      help="seconds a whole notebook may run before it is stopped")
    auto.add_argument("--full", action="store_true",
                      help="run chapters in full mode (default: quick mode, COURSE_QUICK=1)")
    auto.add_argument("--force", action="store_true",
                      help="grade again even submissions that are unchanged and already graded")
    auto.add_argument("--id-pattern", default=DEFAULT_ID_PATTERN,
                      help="regex with (?P<student>...) reading the id from flat file names")
    auto.add_argument("--memory-limit", type=float, default=16,
                      help="GiB of memory one student's sandbox may use: all its processes and its "
                           "tmpfs (/tmp, home, /dev/shm) together, through a memory cgroup when "
                           "grading as root with a writable memory controller. Each process's address "
                           "space is also limited to it (CPU grading only: CUDA needs a very large one); "
                           "without cgroups that per-process limit is the only one")
    auto.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                      help="grade on the Dask cluster whose scheduler is at this address: each "
                           "submission is a task for one of its workers (same course checkout and venv, "
                           "bubblewrap; a worker that differs or has no sandbox is refused); gradebook, "
                           "status and reports stay here. --jobs is then ignored: each worker grades "
                           "as many at once as its threads (see docs/instructor-guide.md)")
    auto.add_argument("--unsafe-no-sandbox", action="store_true",
                      help="grade even where no sandbox can start: student code then runs as you, "
                           "with your files, and every submission is flagged. Never for official grades.")

    rep = sub.add_parser("report", help="grades CSV, feedback HTML, pass-rate summary")
    rep.add_argument("--chapter", required=True)
    rep.add_argument("--db-url", default=None, metavar="URL", help=database.CLI_HELP)
    rep.add_argument("--workspace", type=Path, required=True)
    rep.add_argument("--no-feedback", action="store_true", help="skip the feedback HTML")
    from grader.similarity import DEFAULT_THRESHOLDS as similar  # see grader/similarity.py

    rep.add_argument("--no-similarity", action="store_true",
                     help="skip the code-similarity flags and similarity.html")
    rep.add_argument("--similarity-threshold", type=float, default=100 * similar.students,
                     metavar="PCT", help="flag two students when PCT%% of one's answer code is also "
                                         "in the other's (default %(default)g)")
    rep.add_argument("--course-lib-threshold", type=float, default=100 * similar.course_lib,
                     metavar="PCT", help="flag an answer cell when PCT%% of it is in a course_lib "
                                         "function, or PCT%% of the function in it (default %(default)g)")
    rep.add_argument("--similarity-min-overlap", type=int, default=similar.min_overlap, metavar="N",
                     help="and only when at least N characters of tokenised code are in common "
                          "(default %(default)s: short, obvious answers are alike by chance)")
    from grader import lms

    rep.add_argument("--roster", type=Path, default=None, metavar="CSV",
                     help="also write canvas.csv for Canvas's gradebook import, matching students "
                          "through this roster (Canvas's gradebook export will do; see "
                          "docs/instructor-guide.md, \"Grades back to the LMS\")")
    rep.add_argument("--roster-id-column", default=None, metavar="NAME",
                     help="the roster column holding the student ids the grader read from the "
                          f"submissions (default {lms.DEFAULT_ROSTER_ID_COLUMN!r})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ensure_scripts_on_path()
    try:
        return _run(args)
    except GraderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped",
              file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    root = find_root(args.root)
    if args.command == "release":
        return _release(root, args)

    from grader.workspace import Workspace

    chapter = resolve_chapter(root, args.chapter)
    ws = Workspace(args.workspace, root, db_url=args.db_url)
    if args.command == "autograde":
        return _autograde(ws, chapter, args)
    return _report(ws, chapter, args)


def _release(root: Path, args: argparse.Namespace) -> int:
    from grader import release

    chapters = ([resolve_chapter(root, c) for c in args.chapter] if args.chapter
                else list_chapters(root))
    if not chapters:
        raise GraderError(f"no chapters with a source notebook under {root / 'solutions'}")
    if args.check:
        problems = release.check(root, chapters)
        for problem in problems:
            print(problem)
        if problems:
            print(f"chapters/ is out of sync with solutions/ ({len(problems)} problem(s)); "
                  "run `python -m grader release` and commit the result", file=sys.stderr)
            return 1
        print(f"chapters/ is in sync with solutions/ ({len(chapters)} chapter(s))")
        return 0
    written = release.release(root, chapters)
    print(f"wrote {len(written)} file(s) for {len(chapters)} chapter(s)")
    return 0


def _autograde(ws: Workspace, chapter: str, args: argparse.Namespace) -> int:
    from grader.autograde import autograde
    from grader.sandbox import Limits
    from grader.workspace import Status

    if args.jobs is not None and args.jobs < 1:
        raise GraderError("--jobs must be at least 1")
    if args.memory_limit <= 0:
        raise GraderError("--memory-limit must be a positive number of GiB")
    records, graded_now, by_worker = autograde(ws, chapter, args.submissions, jobs=args.jobs,
                        cell_timeout=args.cell_timeout, notebook_timeout=args.notebook_timeout,
                        quick=not args.full, force=args.force, id_pattern=args.id_pattern,
                        progress=sys.stderr.isatty() or bool(os.environ.get("COURSE_PROGRESS")),
                        use_sandbox=not args.unsafe_no_sandbox,
                        limits=Limits(memory_bytes=int(args.memory_limit * 2**30),
                                      address_space_bytes=int(args.memory_limit * 2**30)),
                        scheduler=args.scheduler)
    rejected = ws.load_status(chapter).rejected
    _print_batch(ws, chapter, records, graded_now, rejected)
    if set(by_worker) - {"local"}:
        print("graded per worker: " + ", ".join(f"{w}: {n}" for w, n in sorted(by_worker.items())))
    # Exit 1 when anything needs the instructor's attention.
    bad = sum(1 for r in records.values() if r.status != Status.GRADED)
    return 1 if bad or rejected else 0


def _print_batch(ws: Workspace, chapter: str, records: dict[str, Record], graded_now: list[str],
                 rejected: list[Record]) -> None:
    """Counts per status, then each submission that was not simply graded, each flag, and each
    entry skipped in the submissions."""
    from grader.workspace import Status

    counts: dict[Status, int] = {}
    for record in records.values():
        counts[record.status] = counts.get(record.status, 0) + 1
    print(f"{chapter}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f" ({len(graded_now)} graded in this run; unchanged submissions are not graded again)")
    for record in sorted(records.values(), key=lambda r: r.student):
        if record.status != Status.GRADED or record.message:
            print(f"  {record.student}: {record.status}: {record.message}")
        for flag in record.flags:
            print(f"  {record.student}: flag: {flag}")
    for entry in rejected:
        print(f"  skipped: {entry.message}")
    print(f"next: python -m grader report --chapter {chapter} --workspace {ws.path}")


def _report(ws: Workspace, chapter: str, args: argparse.Namespace) -> int:
    from grader.report import write_report
    from grader.similarity import Thresholds

    if database.is_postgres(ws.db_url):  # a clear message for a wrong URL or password
        database.check_database(ws.db_url)
    try:
        similarity = None if args.no_similarity else Thresholds(
            students=args.similarity_threshold / 100, course_lib=args.course_lib_threshold / 100,
            min_overlap=args.similarity_min_overlap)
    except ValueError:
        raise GraderError("--similarity-threshold and --course-lib-threshold must be percentages in "
                          "(0, 100], --similarity-min-overlap at least 0") from None
    roster = _roster(args)  # read before the report: a bad roster fails in a second
    out = write_report(ws, chapter, feedback=not args.no_feedback, similarity=similarity,
                       roster=roster)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'grades.csv'}, {out / 'summary.md'}, {out / 'pass_rates.png'}"
          + ("" if args.no_feedback else f", {out / 'feedback'}/")
          + ("" if args.no_similarity else f", {out / 'similarity.html'}")
          + ("" if roster is None else f", {out / 'canvas.csv'}")
          + f", {out.parent / 'all_grades.csv'}")
    return 0


def _roster(args: argparse.Namespace) -> Roster | None:
    """The ``--roster`` (grader/lms.py), or None."""
    from grader import lms

    if args.roster is None:
        if args.roster_id_column is not None:
            raise GraderError("--roster-id-column names a column of --roster: pass --roster too")
        return None
    return lms.read_roster(args.roster, args.roster_id_column or lms.DEFAULT_ROSTER_ID_COLUMN)
