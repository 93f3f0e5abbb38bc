"""How fast the grader grades: submissions per minute with 1 and 2 workers, and its overhead.

The overhead per submission is what grading adds beyond the notebook's own run time: nbgrader's
start, the sandbox, the trusted checks, the gradebook. The notebook's own time is measured by
running the same solved notebook with a plain kernel (nbclient), no grader.

Prints one JSON line per configuration. Usage:
    python benchmarks/grading_throughput.py [--chapter ch00_big_picture] [--submissions 6]
        [--jobs 1 2] [--unsafe-no-sandbox]
Without --chapter it grades the grader tests' mini course (three one-line exercises), which
isolates the grader's own cost; with a chapter, real notebooks in quick mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def solved_notebook(root: Path, chapter: str) -> nbformat.NotebookNode:
    """The chapter's release notebook with the solutions filled in."""
    source = nbformat.read(root / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    release = nbformat.read(root / "chapters" / chapter / f"{chapter}.ipynb", as_version=4)
    answers = {}
    for cell in source.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and not meta.get("grade"):
            answers[meta["grade_id"]] = "\n".join(
                line for line in cell.source.splitlines() if "### BEGIN SOLUTION" not in line
                and "### END SOLUTION" not in line)
    from tests.grading_helpers import fill_answers

    return fill_answers(release, answers)


def own_run_time(nb: nbformat.NotebookNode, folder: Path) -> float:
    from nbclient import NotebookClient

    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapter", default=None)
    parser.add_argument("--submissions", type=int, default=6)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--unsafe-no-sandbox", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("COURSE_QUICK", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")

    with tempfile.TemporaryDirectory(prefix="n2l-bench-") as tmp:
        tmp = Path(tmp)
        if args.chapter:
            from grader.course import resolve_chapter

            root, chapter = REPO, resolve_chapter(REPO, args.chapter)
        else:
            from tests.mini_course import CHAPTER, make_course

            root, chapter = make_course(tmp / "course"), CHAPTER
            subprocess.run([sys.executable, "-m", "grader", "--root", str(root), "release"], check=True,
                           capture_output=True)
        nb = solved_notebook(root, chapter)
        own = own_run_time(nb, tmp)
        subs = tmp / "subs"
        for i in range(args.submissions):
            (subs / f"student{i:03d}").mkdir(parents=True)
            nbformat.write(nb, str(subs / f"student{i:03d}" / f"{chapter}.ipynb"))
        for jobs in args.jobs:
            workspace = tmp / f"ws-{jobs}"
            cmd = [sys.executable, "-m", "grader", "--root", str(root), "autograde", str(subs),
                   "--chapter", chapter, "--workspace", str(workspace), "--jobs", str(jobs)]
            if args.unsafe_no_sandbox:
                cmd.append("--unsafe-no-sandbox")
            start = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            graded = result.stdout.count("graded")  # summary line counts
            per_submission = seconds * jobs / args.submissions
            print(json.dumps({
                "benchmark": "grading_throughput", "chapter": chapter, "jobs": jobs,
                "sandbox": not args.unsafe_no_sandbox, "submissions": args.submissions,
                "cpus": os.cpu_count(), "seconds": round(seconds, 1),
                "submissions_per_minute": round(60 * args.submissions / seconds, 2),
                "notebook_own_seconds": round(own, 2),
                "overhead_seconds_per_submission": round(per_submission - own, 2),
                "exit_code": result.returncode, "summary": result.stdout.splitlines()[0] if graded else
                result.stderr[-300:],
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
