"""Helpers shared by the grader tests: run the CLI, read the grades CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_grader(*args: str | Path, root: Path | None = None, timeout: float = 900
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
