"""``autograde``: grade every submission of one chapter in the workspace.

Each student is graded by its own ``nbgrader autograde --student`` process, so one notebook that
hangs or crashes cannot take the batch down: past ``--notebook-timeout`` the process and the
kernel it started are killed and the student is reported as ``timeout`` (never as a silent 0).
Re-running the command grades only submissions that are new, changed, or not graded yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from grader import ingest
from grader.workspace import Record, Workspace


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc; empty elsewhere)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    children = [int(c) for c in fh.read().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    victims = _descendants(proc.pid)
    for pid in [proc.pid, *victims]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _run_nbgrader(ws: Workspace, chapter: str, student: str, notebook_timeout: float,
                  env: dict[str, str], log_path: Path) -> int | None:
    """One ``nbgrader autograde --student`` run; its exit code, or None past the time limit."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grader.nbgrader_main", "autograde", chapter,
             "--student", student, "--force"],
            cwd=ws.path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env},
        )
        try:
            return proc.wait(timeout=notebook_timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            return None


def _interrupted_cells(notebook: Path) -> list[str]:
    """Names of the errors in the graded notebook that mean a cell never finished."""
    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # an unreadable result is reported by the caller
        return []
    return [out.get("ename", "") for cell in nb.cells for out in cell.get("outputs", [])
            if out.get("output_type") == "error"
            and out.get("ename") in {"CellTimeoutError", "DeadKernelError"}]


def grade_one(ws: Workspace, chapter: str, student: str, notebook_timeout: float,
              env: dict[str, str]) -> tuple[str, str, float]:
    """Grade one student; returns ``(status, message, seconds)``.

    A cell that hit the per-cell limit or a kernel that died is graded once more: both can be
    a glitch of the machine rather than the student's code (we have seen rare kernel message
    stalls), and a second run that fails the same way is the student's result.
    """
    log_path = ws.log(student, chapter)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    start = time.monotonic()
    for attempt in (1, 2):
        deadline = notebook_timeout - (time.monotonic() - start)
        code = _run_nbgrader(ws, chapter, student, max(deadline, 1.0), env, log_path)
        seconds = time.monotonic() - start
        if code is None:
            return ("timeout", f"the notebook ran longer than the {notebook_timeout:g} s limit "
                    "for a whole notebook; nothing was graded", seconds)
        graded = ws.autograded(student, chapter)
        if code != 0 or not graded.exists():
            text = log_path.read_text(errors="replace")
            lines = [ln for ln in text.splitlines() if "ERROR" in ln or "Error" in ln]
            detail = (lines or text.strip().splitlines() or ["no output"])[-1].strip()[:300]
            return "error", f"nbgrader failed (exit {code}): {detail} (log: {log_path})", seconds
        interrupted = _interrupted_cells(graded)
        if not interrupted:
            return "graded", "" if attempt == 1 else "graded on a second run", seconds
    kinds = ", ".join(sorted(set(interrupted)))
    return ("graded", f"cells did not finish ({kinds}: per-cell time limit or kernel death) on "
            "two runs; those cells scored 0", seconds)


def autograde(ws: Workspace, chapter: str, submissions_path: Path, *, jobs: int = 1,
              cell_timeout: int = 600, notebook_timeout: float = 3600, quick: bool = True,
              force: bool = False, id_pattern: str = ingest.DEFAULT_ID_PATTERN,
              progress: bool = True) -> tuple[dict[str, Record], list[str]]:
    """Grade every submission in ``submissions_path``.

    Returns the status of each student and the students graded in this run (the others were
    unchanged since they were graded, or could not be read).
    """
    # Read the submissions first: a wrong path or a corrupt archive fails before any setup.
    with ingest.opened(submissions_path) as folder:
        submissions, rejected = ingest.collect(folder, chapter, id_pattern)
    ws.prepare(chapter, cell_timeout=cell_timeout)
    status = ws.load_status(chapter)
    status.rejected = [Record(student="", status="rejected", message=m) for m in rejected]

    todo = []
    for sub in submissions:
        old = status.records.get(sub.student)
        if sub.problem:
            status.records[sub.student] = Record(sub.student, "error", sub.problem, sub.source,
                                                 sub.sha256)
            continue
        target = ws.submitted(sub.student, chapter)
        unchanged = (old is not None and old.sha256 == sub.sha256 and old.status == "graded"
                     and ws.autograded(sub.student, chapter).exists())
        if unchanged and not force:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(sub.notebook, str(target))
        status.records[sub.student] = Record(sub.student, "pending", "", sub.source, sub.sha256)
        todo.append(sub.student)
    ws.save_status(status)

    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    env = {"COURSE_QUICK": "1" if quick else "0", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}
    bar = tqdm(total=len(todo), desc=f"grading {chapter}", disable=not progress, unit="nb")

    def run(student: str) -> tuple[str, tuple[str, str, float]]:
        return student, grade_one(ws, chapter, student, notebook_timeout, env)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for student, (state, message, seconds) in pool.map(run, todo):
            record = status.records[student]
            record.status, record.message, record.seconds = state, message, round(seconds, 2)
            ws.save_status(status)  # after every student, so an interrupted batch resumes
            bar.update(1)
    bar.close()
    return status.records, todo
