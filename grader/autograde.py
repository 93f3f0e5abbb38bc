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


def grade_one(ws: Workspace, chapter: str, student: str, notebook_timeout: float,
              env: dict[str, str]) -> tuple[str, str, float]:
    """Run nbgrader for one student; returns ``(status, message, seconds)``."""
    log_path = ws.log(student, chapter)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grader.nbgrader_main", "autograde", chapter,
             "--student", student, "--force"],
            cwd=ws.path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env},
        )
        try:
            code = proc.wait(timeout=notebook_timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            seconds = time.monotonic() - start
            return ("timeout", f"the notebook ran longer than the {notebook_timeout:g} s limit "
                    "for a whole notebook; nothing was graded", seconds)
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    if code != 0 or not ws.autograded(student, chapter).exists():
        lines = [ln for ln in text.splitlines() if "ERROR" in ln or "Error" in ln]
        detail = lines[-1] if lines else text.strip().splitlines()[-1:] or ["no output"]
        detail = detail if isinstance(detail, str) else detail[0]
        return "error", f"nbgrader failed (exit {code}): {detail.strip()[:300]} (log: {log_path})", seconds
    if "CellTimeoutError" in text or "Timeout waiting for execute reply" in text:
        return "graded", "a cell hit the per-cell time limit and scored 0", seconds
    if "Kernel died" in text or "DeadKernelError" in text:
        return "graded", "the kernel died while running the notebook; later cells scored 0", seconds
    return "graded", "", seconds


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
