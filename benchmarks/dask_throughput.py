"""How fast the grader grades on a Dask cluster: submissions per minute with 1 and 2 workers.

Starts a local ``dask scheduler`` and N ``dask worker`` processes (one thread each, on loopback,
as grader/cluster.py's tests do), then grades M copies of a chapter's solved notebook through
``python -m grader autograde --scheduler`` in a fresh workspace, and prints one JSON line per
number of workers. The batch's wall time includes the coordinator's set-up (reading the
submissions, the workspace, checking the workers) and each worker's first station (a scratch
workspace and its ``nbgrader generate_assignment``), as a real first batch would. Measure on an
idle machine: the workers, their notebooks and the coordinator share its cores. Usage:
    python benchmarks/dask_throughput.py [--chapter ch01] [--submissions 20] [--workers 1 2]
Without --chapter it grades the grader tests' mini course (three one-line exercises), which
isolates the grader's own cost; with a chapter, real notebooks in quick mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DASK = Path(sys.executable).parent / "dask"


def start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env})


def stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def wait_for_cluster(scheduler_file: Path, workers: int, timeout: float = 300) -> str:
    """The scheduler's address once ``workers`` workers are connected."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    while not scheduler_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the scheduler did not start")
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    with Client(address, timeout=timeout, set_as_default=False) as client:
        client.wait_for_workers(workers, timeout=timeout)
    return address


def grade_on_cluster(root: Path, chapter: str, subs: Path, folder: Path, workers: int) -> dict:
    """Grade ``subs`` on a fresh loopback cluster of ``workers`` workers; the figures."""
    folder.mkdir()
    env = {"COURSE_ROOT": str(root), "MPLBACKEND": "Agg"}
    processes = [start([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", str(folder / "scheduler.json")], folder / "scheduler.log", env)]
    try:
        for i in range(workers):
            processes.append(start([str(DASK), "worker", "--scheduler-file", str(folder / "scheduler.json"),
                                    "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                                    "--local-directory", str(folder / f"worker{i}")],
                                   folder / f"worker{i}.log", env))
        address = wait_for_cluster(folder / "scheduler.json", workers)
        cmd = [sys.executable, "-m", "grader", "--root", str(root), "autograde", str(subs), "--chapter",
               chapter, "--workspace", str(folder / "ws"), "--scheduler", address]
        begin = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - begin
    finally:
        stop(processes)
    status = folder / "ws" / "status" / f"{chapter}.json"
    records = json.loads(status.read_text())["records"] if status.exists() else {}
    per_worker = next((ln for ln in result.stdout.splitlines() if ln.startswith("graded per worker")), "")
    return {"seconds": round(seconds, 1), "graded": sum(r["status"] == "graded" for r in records.values()),
            "exit_code": result.returncode, "per_worker": per_worker,
            "error": "" if result.returncode == 0 else result.stderr[-300:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapter", default=None)
    parser.add_argument("--submissions", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    from benchmarks.grading_throughput import solved_submissions

    with tempfile.TemporaryDirectory(prefix="n2l-dask-bench-") as tmp:
        tmp = Path(tmp)
        root, chapter, _, subs = solved_submissions(tmp, args.chapter, args.submissions)
        for workers in args.workers:
            figures = grade_on_cluster(root, chapter, subs, tmp / f"cluster-{workers}", workers)
            print(json.dumps({
                "benchmark": "dask_throughput", "chapter": chapter, "workers": workers,
                "threads_per_worker": 1, "submissions": args.submissions, "cpus": os.cpu_count(),
                **figures, "submissions_per_minute": round(60 * args.submissions / figures["seconds"], 2),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
