"""Grading on a real Dask cluster on loopback (grader/cluster.py): a ``dask scheduler`` and
``dask worker`` processes (each its own process, one thread, under a nanny, as on a cluster),
the coordinator being ``python -m grader autograde --scheduler``.

- a batch graded on two workers gets the grades, flags and trusted verdicts of the same batch
  graded on one machine;
- a worker killed while it grades: every submission is graded exactly once (status file,
  gradebook, per-worker counts);
- a worker whose course_lib differs and a worker where no sandbox can start (bubblewrap not on its
  PATH) are refused with the reason, never get a task, and with no other worker nothing is written;
- the coordinator stopped by SIGTERM keeps what it recorded, and the same command grades the rest;
  a result that arrives twice is recorded once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tests import test_grader
from tests.grading_helpers import REPO, read_grades, run_grader
from tests.mini_course import CHAPTER, MAX_SCORE, solved

pytestmark = [
    pytest.mark.grader,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed "
                       "(scripts/install_system_deps.sh)"),
]
distributed = pytest.importorskip("distributed")

DASK = Path(sys.executable).parent / "dask"
STARTUP_S = 120  # a worker on a busy 2-core machine imports torch and distributed


class LoopbackCluster:
    """A scheduler and workers on 127.0.0.1, each in a session of its own so that a test can kill a
    worker with its nanny and its grading processes; everything is killed at teardown."""

    def __init__(self, folder: Path, course: Path):
        self.folder, self.course = folder, course
        self.processes: dict[str, subprocess.Popen] = {}
        self.scheduler_file = folder / "scheduler.json"
        self.address = ""

    def start(self) -> None:
        self._start("scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(self.scheduler_file)], {})
        deadline = time.monotonic() + STARTUP_S
        while not self.scheduler_file.exists():
            assert time.monotonic() < deadline, self.log("scheduler")
            assert self.processes["scheduler"].poll() is None, self.log("scheduler")
            time.sleep(0.2)
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - the process writes it
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder,
            env={**os.environ, "COURSE_ROOT": str(self.course), "MPLBACKEND": "Agg", **env})
        log.close()

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()[-3000:]

    def start_worker(self, name: str, **env: str) -> None:
        self._start(name, [str(DASK), "worker", "--scheduler-file", str(self.scheduler_file),
                           "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--name", name,
                           "--local-directory", str(self.folder / f"{name}-local")], env)

    def wait_for(self, *names: str) -> dict[str, str]:
        """Wait until the named workers are connected; their addresses by name."""
        from distributed import Client

        with Client(self.address, timeout=STARTUP_S, set_as_default=False) as client:
            deadline = time.monotonic() + STARTUP_S
            while True:
                workers = client.scheduler_info(n_workers=-1)["workers"]
                by_name = {info["name"]: address for address, info in workers.items()}
                if set(names) <= set(by_name):
                    return {name: by_name[name] for name in names}
                for name in names:
                    assert self.processes[name].poll() is None, self.log(name)
                assert time.monotonic() < deadline, {n: self.log(n) for n in names}
                time.sleep(0.5)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            self.kill(name)


# The mini course and its release: test_grader.py's fixtures (one course per test session).
course, release_nb = test_grader.course, test_grader.release_nb


@pytest.fixture
def cluster(tmp_path, course):
    """A scheduler on a port the OS picks; the test starts the workers. Every process of it is
    killed at the end, whatever the test did."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    made = LoopbackCluster(folder, course)
    try:
        made.start()
        yield made
    finally:
        made.close()


def _autograde(course: Path, subs: Path, workspace: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_grader("autograde", subs, "--chapter", CHAPTER, "--workspace", workspace, *extra,
                      root=course, timeout=600)


def _per_worker(stdout: str) -> dict[str, int]:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("graded per worker: ")), "")
    return {worker: int(count) for worker, _, count in
            (part.rpartition(": ") for part in line.removeprefix("graded per worker: ").split(", ") if part)}


def _without_numbers(data) -> str:
    """``data`` as JSON with every number in its text replaced: a trusted check's reason quotes
    outputs on secret inputs, which differ between two gradings (a new seed each time)."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", json.dumps(data, sort_keys=True))


def _gradebook_submissions(workspace: Path) -> dict[str, int]:
    """How many submissions of the chapter the gradebook holds per student."""
    with sqlite3.connect(workspace / "gradebook.db") as db:
        rows = db.execute("SELECT student_id, COUNT(*) FROM submitted_assignment GROUP BY student_id")
        return dict(rows.fetchall())


def _start_coordinator(course: Path, subs: Path, workspace: Path, address: str) -> subprocess.Popen:
    """``autograde --scheduler`` in the background (the test decides when it ends)."""
    return subprocess.Popen(
        [sys.executable, "-m", "grader", "--root", str(course), "autograde", str(subs), "--chapter",
         CHAPTER, "--workspace", str(workspace), "--scheduler", address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MPLBACKEND": "Agg"})


def _wait_for_a_result(coordinator: subprocess.Popen, status: Path) -> None:
    """Until the coordinator has recorded one graded submission in ``status``."""
    deadline = time.monotonic() + 300
    while not (status.exists() and '"status": "graded"' in status.read_text()):
        assert coordinator.poll() is None and time.monotonic() < deadline, coordinator.communicate()
        time.sleep(0.2)


def test_cluster_grades_as_one_machine_does(cluster, course, release_nb, tmp_path):
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    subs = tmp_path / "subs"
    subs.mkdir()
    nbformat.write(solved(release_nb), str(subs / "alice.ipynb"))
    nbformat.write(release_nb, str(subs / "bob.ipynb"))  # blank
    wrong_mean = "def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n"
    nbformat.write(solved(release_nb, ex3_mean=wrong_mean), str(subs / "carol.ipynb"))
    # A faked pass: the test helpers silenced, the wrong answer caught by the trusted check only.
    fake = ("import course_lib.checks as c\nc.check_equal = lambda *a, **k: None\n"
            "def add(a, b):\n    return a - b\n")
    nbformat.write(solved(release_nb, ex1_add=fake), str(subs / "dan.ipynb"))
    (subs / "erin.ipynb").write_text('{"cells": [')  # unreadable: an error before any grading
    local = _autograde(course, subs, tmp_path / "local", "--jobs", "2")
    addresses = cluster.wait_for("w1", "w2")
    remote = _autograde(course, subs, tmp_path / "remote", "--scheduler", cluster.address)
    assert remote.returncode == local.returncode == 1, remote.stdout + remote.stderr  # erin
    counts = _per_worker(remote.stdout)
    assert set(counts) <= set(addresses.values()) and sum(counts.values()) == 4, remote.stdout
    for ws, feedback in (("local", ["--no-feedback"]), ("remote", [])):  # the remote's feedback read below
        assert run_grader("report", "--chapter", CHAPTER, "--workspace", tmp_path / ws, *feedback,
                          "--no-similarity", root=course).returncode == 0
    here, there = read_grades(tmp_path / "local", CHAPTER), read_grades(tmp_path / "remote", CHAPTER)
    assert _without_numbers(here) == _without_numbers(there)
    assert there["alice"]["score"] == str(MAX_SCORE) and there["bob"]["score"] == "0"
    assert there["carol"]["score"] == str(MAX_SCORE - 3) and there["erin"]["status"] == "error"
    assert there["dan"]["ex1_add_tests"] == "0" and "trusted check overrules" in there["dan"]["flags"]
    assert "SECRET-HIDDEN-TEST-ADD" not in (tmp_path / "remote" / "reports" / CHAPTER / "feedback"
                                            / "alice.html").read_text()
    records = {ws: json.loads((tmp_path / ws / "status" / f"{CHAPTER}.json").read_text())["records"]
               for ws in ("local", "remote")}
    for student, record in records["remote"].items():
        mine = records["local"][student]
        assert _without_numbers([record["status"], record["flags"]]) == \
            _without_numbers([mine["status"], mine["flags"]]), student
        assert {k: v == "passed" for k, v in record["checks"].items()} == \
            {k: v == "passed" for k, v in mine["checks"].items()}, student
        assert str(tmp_path / "remote" / "logs") in record["message"] or "log:" not in record["message"]
    assert (tmp_path / "remote" / "logs" / CHAPTER / "alice.log").read_text()
    # Unchanged submissions are not graded again: the rerun sends no task.
    again = _autograde(course, subs, tmp_path / "remote", "--scheduler", cluster.address)
    assert "(0 graded in this run" in again.stdout, again.stdout + again.stderr


def test_a_worker_lost_mid_batch(cluster, course, release_nb, tmp_path):
    """One worker is killed (with its nanny and its grading) while it grades; Dask runs its task
    again on the other, and every submission is recorded exactly once."""
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    subs = tmp_path / "subs"
    subs.mkdir()
    # Each notebook takes a few seconds more, so both workers are busy when the first result arrives.
    slow = "import time\ntime.sleep(4)\ndef add(a, b):\n    return a + b\n"
    students = [f"s{i}" for i in range(4)]
    for student in students:
        nbformat.write(solved(release_nb, ex1_add=slow), str(subs / f"{student}.ipynb"))
    addresses = cluster.wait_for("w1", "w2")
    workspace = tmp_path / "ws"
    coordinator = _start_coordinator(course, subs, workspace, cluster.address)
    try:
        victim = _kill_a_busy_worker(cluster, addresses, workspace / "status" / f"{CHAPTER}.json")
        stdout, stderr = coordinator.communicate(timeout=600)
    finally:
        coordinator.kill()
    assert coordinator.returncode == 0, stdout + stderr
    records = json.loads((workspace / "status" / f"{CHAPTER}.json").read_text())["records"]
    assert sorted(records) == students and {r["status"] for r in records.values()} == {"graded"}
    assert _gradebook_submissions(workspace) == dict.fromkeys(students, 1)
    counts = _per_worker(stdout)
    assert sum(counts.values()) == len(students), stdout
    assert counts.get(addresses["w2" if victim == "w1" else "w1"], 0) >= 1, stdout
    assert run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, "--no-feedback",
                      "--no-similarity", root=course).returncode == 0
    assert {row["score"] for row in read_grades(workspace, CHAPTER).values()} == {str(MAX_SCORE)}


def test_the_scheduler_lost_mid_batch(cluster, course, release_nb, tmp_path):
    """The scheduler dies while its worker grades: the coordinator stops with one message that says
    what was recorded and what to do (no traceback), and the rest stays pending for a rerun."""
    cluster.start_worker("w1")
    subs = tmp_path / "subs"
    subs.mkdir()
    slow = "import time\ntime.sleep(5)\ndef add(a, b):\n    return a + b\n"
    students = [f"s{i}" for i in range(4)]
    for student in students:
        nbformat.write(solved(release_nb, ex1_add=slow), str(subs / f"{student}.ipynb"))
    cluster.wait_for("w1")
    workspace = tmp_path / "ws"
    coordinator = _start_coordinator(course, subs, workspace, cluster.address)
    status = workspace / "status" / f"{CHAPTER}.json"
    try:
        _wait_for_a_result(coordinator, status)
        cluster.kill("scheduler")
        stdout, stderr = coordinator.communicate(timeout=180)
    finally:
        coordinator.kill()
    assert coordinator.returncode == 2, stdout + stderr
    assert "Lost the Dask scheduler" in stderr and "run the same command again" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    records = json.loads(status.read_text())["records"]
    graded = [s for s, r in records.items() if r["status"] == "graded"]
    assert graded and len(graded) < len(students), records
    assert {r["status"] for s, r in records.items() if s not in graded} == {"pending"}, records


def _kill_a_busy_worker(cluster: LoopbackCluster, addresses: dict[str, str], status_file: Path) -> str:
    """Once the first result is recorded, kill a worker that holds an unfinished task; its name."""
    from distributed import Client

    deadline = time.monotonic() + 300
    with Client(cluster.address, timeout=60, set_as_default=False) as client:
        while True:
            assert time.monotonic() < deadline, "no result arrived"
            records = json.loads(status_file.read_text())["records"] if status_file.exists() else {}
            processing = client.processing()
            busy = [name for name, address in addresses.items() if processing.get(address)]
            if any(r["status"] == "graded" for r in records.values()) and busy:
                cluster.kill(busy[0])
                return busy[0]
            time.sleep(0.2)


def test_workers_that_cannot_grade_are_refused(cluster, course, release_nb, tmp_path):
    lib = tmp_path / "other-lib"
    shutil.copytree(REPO / "course_lib", lib / "course_lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(lib / "course_lib" / "checks.py", "a") as fh:
        fh.write("\n# one line more than the coordinator's course\n")
    cluster.start_worker("other-course", PYTHONPATH=str(lib))
    # No bubblewrap on its PATH: sandbox.check_available fails there as on a machine without it.
    cluster.start_worker("no-sandbox", PATH=str(Path(sys.executable).parent))
    refused = cluster.wait_for("other-course", "no-sandbox")
    subs = tmp_path / "subs"
    subs.mkdir()
    for student in ("alice", "bob"):
        nbformat.write(solved(release_nb), str(subs / f"{student}.ipynb"))
    workspace = tmp_path / "ws"
    result = _autograde(course, subs, workspace, "--scheduler", cluster.address)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"refused worker {refused['other-course']}" in result.stderr
    assert "its course differs from this machine's (course_lib)" in result.stderr
    assert f"refused worker {refused['no-sandbox']}" in result.stderr
    assert "no grading sandbox can start there: bubblewrap is not installed" in result.stderr
    assert "No worker of the Dask cluster" in result.stderr and "Traceback" not in result.stderr
    assert not workspace.exists(), "nothing may be written when no worker may grade"
    # A worker that may grade joins: it alone gets the work; the others are refused again. The
    # coordinator is stopped (SIGTERM) once the first result is recorded: the rerun grades the rest.
    slow = "import time\ntime.sleep(6)\ndef add(a, b):\n    return a + b\n"
    nbformat.write(solved(release_nb, ex1_add=slow), str(subs / "bob.ipynb"))
    cluster.start_worker("good")
    good = cluster.wait_for("good")["good"]
    stopped = _stop_after_first_result(course, subs, workspace, cluster.address)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert stopped.stderr.count("refused worker") == 2, stopped.stderr
    records = json.loads((workspace / "status" / f"{CHAPTER}.json").read_text())["records"]
    assert (records["alice"]["status"], records["bob"]["status"]) == ("graded", "pending")
    assert not (workspace / "autograded" / "bob").exists()
    result = _autograde(course, subs, workspace, "--scheduler", cluster.address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(1 graded in this run" in result.stdout and _per_worker(result.stdout) == {good: 1}, result.stdout
    assert _gradebook_submissions(workspace) == {"alice": 1, "bob": 1}


def _stop_after_first_result(course: Path, subs: Path, workspace: Path, address: str):
    """Run the coordinator and send it SIGTERM once it has recorded one submission."""
    coordinator = _start_coordinator(course, subs, workspace, address)
    status = workspace / "status" / f"{CHAPTER}.json"
    try:
        _wait_for_a_result(coordinator, status)
        coordinator.send_signal(signal.SIGTERM)
        stdout, stderr = coordinator.communicate(timeout=120)
    finally:
        coordinator.kill()
    return subprocess.CompletedProcess(coordinator.args, coordinator.returncode, stdout, stderr)


def test_a_result_arriving_twice_is_recorded_once(tmp_path):
    """The coordinator's side of exactly-once, without a cluster: a second result for a student
    already recorded changes nothing."""
    from grader.autograde import GradeResult, Recorder
    from grader.workspace import ChapterStatus, Record, Status, Workspace

    ws = Workspace(tmp_path / "ws", REPO)
    status = ChapterStatus(CHAPTER, {"ann": Record("ann", Status.PENDING, sha256="ab")})
    first = GradeResult("ann", "error", "the first", 1.0, log="first log", worker="tcp://a:1")
    second = GradeResult("ann", "error", "the second", 2.0, log="second log", worker="tcp://b:2")
    with Recorder(ws, CHAPTER, status, {"ann": ["static flag"]}, total=1, progress=False) as recorder:
        assert recorder.record(GradeResult.from_json(first.to_json()))
        assert not recorder.record(second)
    saved = ws.load_status(CHAPTER).records["ann"]
    assert (saved.message, saved.flags, saved.sha256) == ("the first", ["static flag"], "ab")
    assert ws.log("ann", CHAPTER).read_text() == "first log"
    assert dict(recorder.by_worker) == {"tcp://a:1": 1}


def test_a_scheduler_that_cannot_be_reached(course, tmp_path):
    """A wrong address, or one where nothing listens: a clear error at once, nothing written."""
    with socket.socket() as probe:  # a port the OS gives, closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subs = tmp_path / "subs"
    subs.mkdir()
    for address, words in ((f"tcp://127.0.0.1:{port}", "Cannot reach the Dask scheduler"),
                           ("127.0.0.1", "is not a Dask scheduler's address")):
        result = _autograde(course, subs, tmp_path / "ws", "--scheduler", address)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "ws").exists()
