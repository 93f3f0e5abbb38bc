"""Grading on a Dask cluster: ``autograde --scheduler tcp://HOST:PORT`` (docs/instructor-guide.md,
"Grading on a cluster (Dask)").

The machine that runs ``autograde`` is the coordinator: it reads the submissions, computes the
static flags, and alone writes the workspace (gradebook, graded notebooks, logs, status file,
reports later). Each submission becomes one task for a worker of the cluster: the task carries the
notebook's text and the batch's options (no path of the coordinator's), the worker grades it with
:func:`grader.autograde.grade_submission` in a scratch workspace of its own, in the same sandbox
as on one machine, and sends back one JSON document (:class:`grader.autograde.GradeResult`), which
the coordinator records once (:class:`grader.autograde.Recorder`).

Before a worker gets any task it is checked (:func:`worker_identity`, run on it): a grading
sandbox must start there (``sandbox.check_available``, the check ``autograde`` runs on one machine)
and its course must be the coordinator's: the same solutions (notebooks and probes.py), course_lib,
grader, torch and nbgrader (:func:`course_parts`). A worker that fails either is refused, with
the reason; tasks are restricted to accepted workers. Workers that join later are checked too.
A worker lost mid-batch: Dask runs its tasks again elsewhere; a task whose accepted workers are
all gone is submitted again to those still there. Ctrl-C or SIGTERM cancels what is not finished
(tasks already running on a worker finish there and their results are dropped) and keeps what was
recorded; the same command resumes.

A worker finds its course in ``COURSE_ROOT`` when set, else in the checkout its ``grader``
package is imported from.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import CancelledError
from pathlib import Path

from grader import GraderError
from grader.autograde import GradeResult, Options, Recorder, Station, grade_submission, open_station

ROOT_ENV = "COURSE_ROOT"
CONNECT_TIMEOUT = 30  # seconds to reach the scheduler and to wait for a first worker
WATCH_EVERY = 2.0  # seconds between looks at the cluster's workers while grading
ORPHAN_GRACE = 300  # seconds the batch waits for an accepted worker when none is left


# -- what a worker is: its course and whether a sandbox starts there --------------------------------


def course_root() -> Path:
    """The course this process grades: ``$COURSE_ROOT``, else the checkout of its grader package."""
    from grader.course import find_root

    given = os.environ.get(ROOT_ENV)
    return find_root(Path(given)) if given else find_root()


def _package_dir(name: str) -> Path:
    import importlib

    return Path(importlib.import_module(name).__file__).resolve().parent


def _digest(folder: Path, names: tuple[str, ...] | None = None) -> str:
    """A hash of the files below ``folder`` (only those whose name ends with one of ``names``),
    their relative paths included; bytecode and notebook checkpoints left out."""
    from grader.course import files_under

    digest = hashlib.sha256()
    for relative, path in files_under(folder).items():
        if names is None or relative.endswith(names):
            digest.update(f"{relative}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def course_parts(root: Path) -> dict[str, str]:
    """What must be the same on every machine that grades: each part's hash or version."""
    import nbgrader
    import torch

    return {"solutions": _digest(root / "solutions", (".ipynb", "probes.py")),
            "course_lib": _digest(_package_dir("course_lib")),
            "grader": _digest(_package_dir("grader")),
            "torch": torch.__version__, "nbgrader": nbgrader.__version__}


def worker_identity() -> dict:
    """Run on each worker before it gets work: its host, its course and whether a sandbox starts
    there (the message of ``sandbox.check_available``, or None)."""
    from grader import sandbox

    info: dict = {"host": socket.gethostname(), "python": sys.executable, "problem": None,
                  "sandbox": None, "course": {}}
    try:
        info["course"] = course_parts(course_root())
    except Exception as error:  # reported to the coordinator, which refuses the worker
        info["problem"] = f"{type(error).__name__}: {error}"
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable as error:
        info["sandbox"] = str(error)
    return info


def refusal(info, expected: dict[str, str]) -> str | None:
    """Why a worker (its :func:`worker_identity`, or the error running it) may not grade; None if
    it may."""
    if isinstance(info, BaseException):
        return (f"the check could not run there ({type(info).__name__}: {info}); start the worker "
                "with the course's venv (its Python must import grader and course_lib)")
    if info["problem"]:
        return (f"its course could not be read ({info['problem']}); start the worker in the course "
                f"folder or set {ROOT_ENV} there")
    if info["sandbox"]:
        return (f"no grading sandbox can start there: {info['sandbox']}. Install bubblewrap and allow "
                "unprivileged user namespaces on that machine (or let the pod run them), then "
                "restart the worker; it never grades without the sandbox")
    differ = [part if part in ("solutions", "course_lib", "grader") else
              f"{part} {info['course'].get(part)} there, {value} here"
              for part, value in expected.items() if info["course"].get(part) != value]
    if differ:
        return (f"its course differs from this machine's ({', '.join(differ)}): give it the same "
                "checkout of the course and the same venv, then restart the worker")
    return None


# -- the coordinator's side ---------------------------------------------------------------------------


def connect(address: str, root: Path, timeout: float = CONNECT_TIMEOUT) -> ClusterPool:
    """The cluster at ``address`` with its workers checked; GraderError when it cannot be reached
    or none of its workers may grade."""
    from distributed import Client

    _check_address(address)
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise GraderError(f"Cannot reach the Dask scheduler at {address} ({error}). Is `dask "
                          "scheduler` running there, and is its port open from here?") from None
    try:
        pool = ClusterPool(client, address, course_parts(root))
        pool.check_workers(wait=timeout)
    except BaseException:
        client.close()
        raise
    return pool


def _check_address(address: str) -> None:
    """A clear error, fast, for an address that is not one or where nothing listens (before a
    Dask client retries for ``CONNECT_TIMEOUT`` seconds and leaves noise on stderr)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location) if scheme in ("tcp", "tls") else (None, None)
    except ValueError as error:
        raise GraderError(f"--scheduler {address!r} is not a Dask scheduler's address ({error}); "
                          "write tcp://HOST:PORT") from None
    if host is not None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
        except OSError as error:
            raise GraderError(f"Cannot reach the Dask scheduler at {address} ({error}). Is `dask "
                              "scheduler` running there, and is its port open from here?") from None


class ClusterPool:
    """A Dask client and the workers it has checked: ``accepted`` (address -> host) get tasks,
    ``refused`` (address -> why) never do."""

    def __init__(self, client, address: str, expected: dict[str, str]):
        self.client, self.address, self.expected = client, address, expected
        self.accepted: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.threads: dict[str, int] = {}

    def close(self) -> None:
        self.client.close()

    def _current(self) -> dict[str, dict]:
        """The workers connected now (asked of the scheduler itself: the client's cached
        ``scheduler_info`` is refreshed in the background without the workers)."""
        identity = self.client.sync(self.client.scheduler.identity, n_workers=-1)
        return {address: info for address, info in identity.get("workers", {}).items()
                if info.get("status", "running") == "running"}

    def check_workers(self, wait: float = 0) -> None:
        """Check the workers not checked yet (forget those that left); with ``wait``, wait that
        long for a first worker and fail when none may grade."""
        if wait:
            try:
                self.client.wait_for_workers(1, timeout=wait)
            except TimeoutError:
                raise GraderError(f"The Dask scheduler at {self.address} has no worker (waited "
                                  f"{wait:g} s): start some with `dask worker {self.address}`.") from None
        current = self._current()
        for gone in (set(self.accepted) | set(self.refused)) - set(current):
            self.accepted.pop(gone, None)
            self.refused.pop(gone, None)
        new = [a for a in current if a not in self.accepted and a not in self.refused]
        if new:
            self._judge(self.client.run(worker_identity, workers=new, on_error="return"), current)
        if wait and not self.accepted:
            reasons = "; ".join(f"{a}: {why}" for a, why in sorted(self.refused.items()))
            raise GraderError(f"No worker of the Dask cluster at {self.address} may grade ({reasons}). "
                              "Nothing was graded or written.")

    def _judge(self, infos: dict, current: dict[str, dict]) -> None:
        for address, info in sorted(infos.items()):
            why = refusal(info, self.expected)
            host = info.get("host", "?") if isinstance(info, dict) else "?"
            if why is None:
                self.accepted[address] = host
                self.threads[address] = int(current.get(address, {}).get("nthreads", 1))
            else:
                self.refused[address] = why
                print(f"refused worker {address} ({host}): {why}", file=sys.stderr, flush=True)

    def alive(self) -> set[str]:
        return set(self.accepted) & set(self._current())

    def grade(self, chapter: str, todo: list[str], options: Options, recorder: Recorder) -> None:
        """Grade the students in ``todo`` (their copies are in the coordinator's workspace) on the
        accepted workers; each result is recorded by ``recorder`` as it arrives."""
        Batch(self, chapter, options, recorder).run(todo)


class Batch:
    """One batch on the cluster: a bounded number of tasks in flight (each worker's threads, twice),
    so workers that join later get work and a lost worker strands little."""

    def __init__(self, pool: ClusterPool, chapter: str, options: Options, recorder: Recorder):
        self.pool, self.chapter, self.options, self.recorder = pool, chapter, options, recorder
        self.pending: deque[str] = deque()
        self.inflight: dict = {}  # future -> (student, the workers it may run on)
        self.orphaned_since: float | None = None

    def run(self, todo: list[str]) -> None:
        self.pending.extend(todo)
        try:
            self._loop()
        except (OSError, TimeoutError, CancelledError) as error:  # OSError includes CommClosedError
            if self.pool.client.status == "running":
                raise  # not the connection: a bug, shown as one
            # Closing the client cancels its reconnection, which Dask logs with a traceback; the
            # message below says all there is to say.
            logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
            raise GraderError(
                f"Lost the Dask scheduler at {self.pool.address} while grading ({type(error).__name__}). "
                f"Every result that arrived before is recorded; {len(self.pending) + len(self.inflight)} "
                "submissions are not graded (still pending): restart the scheduler and its workers, "
                "then run the same command again.") from None
        finally:
            if self.inflight and self.pool.client.status == "running":
                # Interrupted: what is not recorded stays pending for a rerun.
                self.pool.client.cancel(list(self.inflight))

    def _loop(self) -> None:
        last_look = time.monotonic()
        while self.pending or self.inflight:
            self._top_up()
            for future in self._wait(WATCH_EVERY):
                self._finish(future)
            if time.monotonic() - last_look >= WATCH_EVERY:
                self._watch()
                last_look = time.monotonic()

    def _job(self, student: str) -> dict:
        ws = self.recorder.ws
        return {"chapter": self.chapter, "student": student, "options": self.options.__dict__,
                "notebook": ws.submitted(student, self.chapter).read_text(encoding="utf-8"),
                "expected": self.pool.expected}

    def _top_up(self) -> None:
        workers = self.pool.alive()
        capacity = 2 * sum(self.pool.threads.get(w, 1) for w in workers)
        while self.pending and workers and len(self.inflight) < capacity:
            student = self.pending.popleft()
            future = self.pool.client.submit(
                grade_task, self._job(student), key=f"grade-{self.chapter}-{student}-{uuid.uuid4().hex[:8]}",
                workers=sorted(workers), allow_other_workers=False, pure=False)
            self.inflight[future] = (student, frozenset(workers))

    def _wait(self, timeout: float) -> list:
        from distributed import wait

        if not self.inflight:
            time.sleep(min(timeout, 0.5))
            return []
        try:
            with self.pool.client.as_current():  # wait() uses the current client
                done, _ = wait(list(self.inflight), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        return list(done)

    def _finish(self, future) -> None:
        from distributed import KilledWorker

        student, allowed = self.inflight.pop(future)
        if future.cancelled():  # only a lost scheduler cancels a task still in flight (_watch removes
            self.inflight[future] = (student, allowed)  # its own first): not the student's doing
            raise CancelledError(f"the task grading {student} was cancelled")
        try:
            result = GradeResult.from_json(future.result())
        except KilledWorker as error:
            result = _failed(student, f"the workers grading it died ({error}); it may crash its "
                                      "grader: read it, then grade it again")
        except Exception as error:  # the worker could not grade: not the student's doing
            result = _failed(student, f"a worker failed to grade it ({type(error).__name__}: "
                                      f"{error}); grade it again")
        self.recorder.record(result)  # a second result for the same student is ignored

    def _watch(self) -> None:
        """Check workers that joined; send again tasks whose workers are all gone; give up when no
        accepted worker has been left for ORPHAN_GRACE seconds."""
        self.pool.check_workers()
        alive = self.pool.alive()
        for future, (student, allowed) in list(self.inflight.items()):
            if not allowed & alive:
                del self.inflight[future]
                future.cancel()
                self.pending.appendleft(student)
        if alive or not (self.pending or self.inflight):
            self.orphaned_since = None
            return
        if self.orphaned_since is None:
            self.orphaned_since = time.monotonic()
            print(f"no accepted worker left in the cluster at {self.pool.address}: waiting up to "
                  f"{ORPHAN_GRACE} s for one", file=sys.stderr, flush=True)
        if time.monotonic() - self.orphaned_since > ORPHAN_GRACE:
            raise GraderError(f"No accepted worker has been in the cluster for {ORPHAN_GRACE} s; "
                              f"{len(self.pending) + len(self.inflight)} submissions are not graded "
                              "(still pending): start workers and run the same command again.")


def _failed(student: str, message: str) -> GradeResult:
    return GradeResult(student, "error", message, 0.0, worker="(failed)")


# -- the worker's side --------------------------------------------------------------------------------

_STATIONS: dict[str, Station] = {}
_STATIONS_LOCK = threading.Lock()


def grade_task(job: dict) -> str:
    """A Dask task: grade one submission on this worker; the result as one JSON document."""
    station = _station(job["chapter"], Options(**job["options"]), job["expected"])
    return grade_submission(station, job["student"], job["notebook"]).to_json()


def _station(chapter: str, options: Options, expected: dict[str, str]) -> Station:
    """This worker's station for a chapter and options, opened once (its scratch workspace lives in
    the worker's local folder, which Dask removes when the worker stops)."""
    from distributed import get_worker

    from grader.course import ensure_scripts_on_path

    key = f"{chapter} {options.key()}"
    with _STATIONS_LOCK:
        if key in _STATIONS:
            return _STATIONS[key]
        root = course_root()
        differ = [part for part, value in course_parts(root).items() if expected.get(part) != value]
        if differ:  # changed since the check (a checkout updated under a running worker)
            raise RuntimeError("the course on this worker changed since it was checked "
                               f"({', '.join(differ)})")
        ensure_scripts_on_path()  # nbgrader runs alembic through PATH
        # nbgrader runs in processes of its own; a worker under a nanny is a daemonic process,
        # which multiprocessing would not let start them.
        multiprocessing.current_process().daemon = False
        worker = get_worker()
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        folder = Path(worker.local_directory) / "n2l-grading" / f"{chapter}-{digest}"
        jobs = max(1, int(worker.state.nthreads))
        _STATIONS[key] = open_station(root, chapter, folder, options, jobs, worker=worker.address)
        return _STATIONS[key]
