"""How fast the grader grades: submissions per minute with 1 and 2 workers, and its overhead.

The overhead per submission is what grading adds beyond the notebook's own run time: nbgrader's
start, the sandbox, the trusted checks, the gradebook. The notebook's own time is the median of
three runs of the same solved notebook with a plain kernel (nbclient with the course's kernel
client), no grader. Two overheads are printed:
- ``overhead_median_s``: the median over submissions of the grader's time for one student (from
  the status file: sandbox, nbgrader, trusted checks, gradebook) minus the notebook's own time;
- ``overhead_mean_s``: the batch's wall time x workers / submissions minus the notebook's own time,
  which also spreads the batch's set-up (workspace, release, sandbox check) over the submissions.

Prints one JSON line per configuration. Measure on an idle machine. Usage:
    python benchmarks/grading_throughput.py [--chapter ch01] [--submissions 20]
        [--jobs 1 2] [--unsafe-no-sandbox]
Without --chapter it grades the grader tests' mini course (three one-line exercises), which
isolates the grader's own cost; with a chapter, real notebooks in quick mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def solved_submissions(tmp: Path, chapter: str | None, count: int
                       ) -> tuple[Path, str, nbformat.NotebookNode, Path]:
    """``(root, chapter, notebook, folder)``: ``count`` students' copies of the solved notebook in
    ``folder`` (one sub-folder each), for the named chapter of this course or, without one, for the
    released mini course of the tests, built in ``tmp``."""
    if chapter:
        from grader.course import resolve_chapter

        root, chapter = REPO, resolve_chapter(REPO, chapter)
    else:
        from tests.mini_course import CHAPTER, make_course

        root, chapter = make_course(tmp / "course"), CHAPTER
        subprocess.run([sys.executable, "-m", "grader", "--root", str(root), "release"], check=True,
                       capture_output=True)
    nb = solved_notebook(root, chapter)
    subs = tmp / "subs"
    for i in range(count):
        (subs / f"student{i:03d}").mkdir(parents=True)
        nbformat.write(nb, str(subs / f"student{i:03d}" / f"{chapter}.ipynb"))
    return root, chapter, nb, subs


def own_run_time(nb: nbformat.NotebookNode, folder: Path, runs: int = 3) -> float:
    """Median seconds of ``runs`` plain runs of the notebook, kernel start included."""
    import copy

    from grader.kernel_client import notebook_client

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        notebook_client(copy.deepcopy(nb), timeout=600, kernel_name="python3", allow_errors=True,
                        resources={"metadata": {"path": str(folder)}}).execute()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapter", default=None)
    parser.add_argument("--submissions", type=int, default=20)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--unsafe-no-sandbox", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("COURSE_QUICK", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")

    with tempfile.TemporaryDirectory(prefix="n2l-bench-") as tmp:
        tmp = Path(tmp)
        root, chapter, nb, subs = solved_submissions(tmp, args.chapter, args.submissions)
        own = own_run_time(nb, tmp)
        for jobs in args.jobs:
            workspace = tmp / f"ws-{jobs}"
            cmd = [sys.executable, "-m", "grader", "--root", str(root), "autograde", str(subs),
                   "--chapter", chapter, "--workspace", str(workspace), "--jobs", str(jobs)]
            if args.unsafe_no_sandbox:
                cmd.append("--unsafe-no-sandbox")
            start = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            records = json.loads((workspace / "status" / f"{chapter}.json").read_text())["records"] \
                if result.returncode == 0 else {}
            per_student = [r["seconds"] for r in records.values() if r.get("status") == "graded"]
            print(json.dumps({
                "benchmark": "grading_throughput", "chapter": chapter, "jobs": jobs,
                "sandbox": not args.unsafe_no_sandbox, "submissions": args.submissions,
                "graded": len(per_student), "cpus": os.cpu_count(), "seconds": round(seconds, 1),
                "submissions_per_minute": round(60 * args.submissions / seconds, 2),
                "notebook_own_s": round(own, 2),
                "per_submission_median_s": round(statistics.median(per_student), 2) if per_student else None,
                "overhead_median_s": round(statistics.median(per_student) - own, 2) if per_student else None,
                "overhead_mean_s": round(seconds * jobs / args.submissions - own, 2),
                "exit_code": result.returncode,
                "summary": (result.stdout.splitlines() or [""])[0] if result.returncode == 0
                else result.stderr[-300:],
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
