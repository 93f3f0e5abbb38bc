"""``autograde``: grade every submission of one chapter in the workspace.

For each submission:

1. Before any code runs, the notebook is read against the release: edited or deleted locked
   cells, changed metadata and suspicious constructs become flags (grader/flags.py).
2. Its own ``nbgrader autograde --student`` process runs it (forked from a server that imported
   nbgrader once per batch), with the kernel in a sandbox (grader/sandbox.py): the in-kernel
   tests. One notebook that hangs or crashes cannot take the batch down: past
   ``--notebook-timeout`` the process and its sandbox are killed and the student is reported as
   ``timeout`` (never as a silent 0).
3. The trusted checks (grader/trusted.py): a fresh sandbox that the kernel never touched loads
   the student's answer cells from the submitted file, with what each exercise forbids blocked,
   and calls each graded function on secret inputs sent only then. Back in this process, where
   no student code ever ran, its outputs are compared with the reference (grader/probes.py). A
   test cell keeps its points only when its in-kernel tests passed and its trusted check
   agrees; the gradebook is updated to match, and each disagreement or forbidden call is flagged.

Steps 2 and 3 run in a grading station (:func:`grade_submission`): a scratch workspace of its
own, with its own gradebook, that gets the submission's text and gives back plain results (the
graded notebook, the gradebook entries, the outcome, the log). On one machine the station is
``<workspace>/scratch/<chapter>`` and submissions run in parallel (``--jobs``, default: one per
CPU); with ``--scheduler`` each Dask worker has its own (grader/cluster.py). Either way the
coordinator (:class:`Recorder`) alone writes the instructor's workspace. Re-running the command
grades only submissions that are new, changed, or not graded yet; Ctrl-C or SIGTERM stops the
batch, kills what is running and keeps what was finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from grader import GraderError, database, ingest, nbgrader_main, preprocessors, probes, sandbox, trusted
from grader.flags import clean_submission, submission_flags, trust_flags
from grader.workspace import ChapterStatus, Record, Status, Workspace

# nbgrader processes running now (their pids), so that an interrupted batch can kill them all.
_RUNNING: set[int] = set()
_RUNNING_LOCK = threading.Lock()
_FORKSERVER_LOCK = threading.Lock()


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


def _kill_tree(pid: int) -> None:
    for victim in [pid, *_descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _nbgrader_context():
    """Processes forked from a server that imported nbgrader once (grader/nbgrader_main.py)."""
    context = multiprocessing.get_context("forkserver")
    with _FORKSERVER_LOCK:
        context.set_forkserver_preload(nbgrader_main.PRELOAD)
    return context


def _run_nbgrader(ws: Workspace, chapter: str, student: str, notebook_timeout: float,
                  env: dict[str, str], log_path: Path) -> int | None:
    """One ``nbgrader autograde --student`` run; its exit code, or None past the time limit."""
    argv = ["autograde", chapter, "--student", student, "--force"]
    full_env = {**os.environ, **database.nbgrader_env(ws.db_url), **env}
    proc = _nbgrader_context().Process(target=nbgrader_main.run_forked,
                                       args=(argv, str(ws.path), full_env, str(log_path)))
    with _FORKSERVER_LOCK:  # the first start launches the server; one at a time
        proc.start()
    with _RUNNING_LOCK:
        _RUNNING.add(proc.pid)
    try:
        proc.join(timeout=notebook_timeout)
        if proc.exitcode is None:
            _kill_tree(proc.pid)
            proc.join()
            return None
        return proc.exitcode
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc.pid)
        proc.close()


def kill_running() -> None:
    """Kill every nbgrader process of this batch and its kernel (Ctrl-C, SIGTERM)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for pid in running:
        _kill_tree(pid)


def _interrupted_cells(notebook: Path) -> list[str]:
    """Names of the errors in the graded notebook that mean a cell never finished."""
    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # an unreadable result is reported by the caller
        return []
    return [out.get("ename", "") for cell in nb.cells for out in cell.get("outputs", [])
            if out.get("output_type") == "error"
            and out.get("ename") in {"CellTimeoutError", "DeadKernelError"}]


@dataclass
class Settings:
    """What every submission of a batch is graded with."""

    notebook_timeout: float
    env: dict[str, str]
    use_sandbox: bool
    limits: sandbox.Limits
    probes: list[probes.Probe]
    release: nbformat.NotebookNode  # its setup cell and which cells are answers
    forbidden: dict[str, list[str]]  # test cell -> what its hidden tests forbid
    withheld: Path  # course_lib with this chapter's reference answers withheld (grader/trusted.py)
    slots: queue.Queue = field(default_factory=queue.Queue)
    cell_timeout: float = 600  # also each exercise's limit in the trusted checks


@dataclass
class Outcome:
    status: Status
    message: str
    seconds: float
    flags: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    seed: int | None = None


def _apply_verdicts(ws: Workspace, chapter: str, student: str, verdicts: dict[str, probes.Verdict],
                  already_flagged: set[str] = frozenset()) -> list[str]:
    """Make the gradebook's score of each test cell min(in-kernel, trusted); flags for the rest."""
    from nbgrader.api import Gradebook, MissingEntry

    flags = []
    with Gradebook(ws.db_url) as gb:
        try:
            notebook = gb.find_submission_notebook(chapter, chapter, student)
        except MissingEntry:
            return ["missing grades: the gradebook has no entry for this submission"]
        for grade in notebook.grades:
            if grade.auto_score is None:
                continue
            verdict = verdicts.get(grade.name)
            kernel_passed = grade.auto_score > 0
            if grade.auto_score > grade.max_score:
                flags.append(f"score above the maximum in {grade.name} ({grade.auto_score:g} > "
                              f"{grade.max_score:g}); capped")
            if verdict is None:
                grade.manual_score = min(grade.auto_score, grade.max_score)
                flags.append(f"no trusted check for {grade.name}: its score rests on in-kernel tests only")
            elif verdict.passed:
                grade.manual_score = min(grade.auto_score, grade.max_score)
                if not kernel_passed:
                    flags.append(f"note: {grade.name} failed in the kernel but its trusted check passed")
            else:
                grade.manual_score = 0.0
                if kernel_passed and grade.name not in already_flagged:
                    flags.append(f"trusted check overrules a pass in {grade.name}: {verdict.reason}; "
                                 "scored 0")
        gb.db.commit()
    return flags


def grade_one(ws: Workspace, chapter: str, student: str, settings: Settings) -> Outcome:
    """Grade one student (see the module docstring for the steps).

    A cell that hit the per-cell limit or a kernel that died is graded once more: both can be
    a glitch of the machine rather than the student's code (we have seen rare kernel message
    stalls), and a second run that fails the same way is the student's result.
    """
    start = time.monotonic()
    log_path = ws.log(student, chapter)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    work = ws.sandbox_dir(student, chapter)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seed = probes.new_seed()
    slot = settings.slots.get()
    runner, plan = None, None
    try:
        # The trusted checks' sandbox starts first: it imports torch and runs the setup cell while
        # the notebook runs (step 3 gets the answers once the notebook is graded).
        runner, plan = _start_trusted_checks(settings, slot, work)
        outcome = _run_notebook(ws, chapter, student, settings, slot, work, log_path)
        if outcome.status == Status.GRADED:
            inputs = probes.make_inputs(settings.probes, seed)
            submitted = nbformat.read(ws.submitted(student, chapter), as_version=4)
            result = runner.finish(trusted.answer_cells(submitted, settings.release), inputs,
                                   settings.notebook_timeout)
    finally:
        if runner is not None:
            runner.close()
        if plan is not None:
            _end_plan(plan)
        settings.slots.put(slot)
    outcome.seed = seed
    graded = ws.autograded(student, chapter)
    if outcome.status != Status.GRADED:
        outcome.seconds = time.monotonic() - start
        return outcome
    interrupted = _interrupted_cells(graded)
    if interrupted:
        outcome.flags.append(f"cells did not finish ({', '.join(sorted(set(interrupted)))})")
    outcome.flags += preprocessors.output_flags(graded)  # outputs capped or scrubbed
    verdicts = probes.decide(settings.probes, inputs, result.payload)
    for cell, calls in result.forbidden.items():
        verdicts[cell] = probes.Verdict(False, f"called {', '.join(calls)}, which this exercise forbids")
        outcome.flags.append(f"forbidden call in {cell}: {', '.join(calls)}; scored 0")
    if result.problem:
        outcome.flags.append(f"trusted checks: {result.problem}")
    outcome.flags += [f"note: answer cell {cell} raised in the trusted checks' process ({why})"
                      for cell, why in result.answer_errors.items()]
    outcome.checks = {name: "passed" if v.passed else v.reason for name, v in verdicts.items()}
    outcome.flags += _apply_verdicts(ws, chapter, student, verdicts, set(result.forbidden))
    outcome.seconds = time.monotonic() - start  # this student's whole grading, trusted checks included
    return outcome


def _run_notebook(ws: Workspace, chapter: str, student: str, settings: Settings, slot: int,
                  work: Path, log_path: Path) -> Outcome:
    """The notebook through nbgrader, its kernel in a sandbox (step 2 of the module docstring)."""
    sandboxed = None
    if settings.use_sandbox:
        sandboxed = functools.partial(_sandbox_attempt, ws, settings, slot, work)
    return _run_attempts(ws, chapter, student, settings.notebook_timeout, dict(settings.env), log_path,
                         sandboxed)


@contextlib.contextmanager
def _sandbox_attempt(ws: Workspace, settings: Settings, slot: int, work: Path, env: dict[str, str]):
    """The environment of one nbgrader run with a sandbox of its own: a new plan, so a new, empty
    runtime folder and memory cgroup (a kernel that died may have left links in the folder it
    could write); everything of it is killed and removed when the run ends."""
    plan = sandbox.make_plan(slot=slot, env=settings.env, limits=settings.limits)
    try:
        plan.save(work / "plan.json")
        # jupyter_client writes the connection file with tempfile (TMPDIR) and puts the ipc
        # sockets beside it: both must be in the one folder the sandbox shares.
        yield {**env, sandbox.PLAN_ENV: str(work / "plan.json"), "TMPDIR": plan.runtime_dir,
               "JUPYTER_RUNTIME_DIR": plan.runtime_dir, "JUPYTER_PATH": str(ws.path / "jupyter")}
    finally:
        _end_plan(plan)


def _start_trusted_checks(settings: Settings, slot: int,
                          work: Path) -> tuple[trusted.TrustedRun, sandbox.Plan | None]:
    """Step 3 begins: the trusted checks' runner in a fresh sandbox of its own (grader/trusted.py)."""
    job = trusted.build_job(settings.probes, trusted.setup_cell(settings.release), settings.forbidden,
                            trusted.answer_owners(settings.release),
                            threads=int(settings.env.get("OMP_NUM_THREADS", "1")),
                            child_timeout=settings.cell_timeout)
    if not settings.use_sandbox:
        job["course_lib"] = str(settings.withheld)
        return trusted.TrustedRun(job, command=trusted.runner_command(False),
                                  env={**os.environ, **settings.env}), None
    job.update({"course_lib": f"{sandbox.LIB}/course_lib", "isolated": True})
    # A uid of its own: the end of the notebook's sandbox kills every process of the kernel's uid.
    plan = sandbox.make_plan(slot=slot + sandbox.TRUSTED_SLOT_OFFSET, env=settings.env,
                             limits=settings.limits, packages={"course_lib": str(settings.withheld)},
                             files={trusted.RUNNER_INSIDE: trusted.trusted_runner.__file__})
    plan.as_pid_1 = True  # the runner: no student code in the sandbox can signal it
    plan.save(work / "trusted_plan.json")
    try:
        return trusted.TrustedRun(job, command=trusted.runner_command(True),
                                  env={**os.environ, sandbox.PLAN_ENV: str(work / "trusted_plan.json")}), plan
    except BaseException:
        _end_plan(plan)
        raise


def _end_plan(plan: sandbox.Plan) -> None:
    if plan.uid is not None:  # nothing of this student's may outlive its grading
        subprocess.run(["pkill", "-KILL", "-u", str(plan.uid)], capture_output=True)
    sandbox.remove_plan(plan)


def _run_attempts(ws: Workspace, chapter: str, student: str, notebook_timeout: float,
                  env: dict[str, str], log_path: Path, sandboxed=None) -> Outcome:
    """nbgrader once, or twice after a kernel death or a cell that could not be stopped.

    ``sandboxed(env)``: a context giving each run's environment with a sandbox of its own.
    """
    start = time.monotonic()
    for attempt in (1, 2):
        deadline = notebook_timeout - (time.monotonic() - start)
        log_start = log_path.stat().st_size
        with sandboxed(env) if sandboxed else contextlib.nullcontext(env) as attempt_env:
            code = _run_nbgrader(ws, chapter, student, max(deadline, 1.0), attempt_env, log_path)
        seconds = time.monotonic() - start
        if code is None:
            return Outcome(Status.TIMEOUT, f"the notebook ran longer than the {notebook_timeout:g} s limit "
                           "for a whole notebook; nothing was graded", seconds,
                           flags=[f"timeout: whole notebook over {notebook_timeout:g} s"])
        graded = ws.autograded(student, chapter)
        if code != 0 or not graded.exists():
            with open(log_path, errors="replace") as fh:
                fh.seek(log_start)
                text = fh.read()
            died = ""
            # nbgrader gives up on a notebook whose kernel died, or whose cell ran past the
            # per-cell limit and ignored the interrupt: once may be the machine (memory
            # pressure, a stall), twice is the notebook.
            if "DeadKernelError" in text or "Kernel died" in text:
                died = "the kernel died"
                why = ("the student's code ended its own Python process: os._exit, a crash, or a "
                       "resource limit")
            elif "CellTimeoutError" in text:
                died = "a cell could not be stopped"
                why = "a cell ran past the per-cell limit and did not stop when interrupted"
            if died and attempt == 1:
                continue
            if died:
                return Outcome(Status.ERROR, f"{died} while the notebook ran, on two runs ({why}); "
                               f"nothing was graded (log: {log_path})", seconds,
                               flags=[f"kernel death: {died}, on two runs"])
            lines = [ln for ln in text.splitlines() if "ERROR" in ln or "Error" in ln]
            detail = (lines or text.strip().splitlines() or ["no output"])[-1].strip()[:300]
            return Outcome(Status.ERROR, f"nbgrader failed (exit {code}): {detail} (log: {log_path})",
                           seconds)
        interrupted = _interrupted_cells(graded)
        if not interrupted:
            return Outcome(Status.GRADED, "" if attempt == 1 else "graded on a second run", seconds)
    kinds = ", ".join(sorted(set(interrupted)))
    return Outcome(Status.GRADED, f"cells did not finish ({kinds}: per-cell time limit or kernel death) on "
                   "two runs; those cells scored 0", seconds)


@dataclass
class Options:
    """How a batch is graded: what a grading station needs besides the course (plain data, so
    that it travels to Dask workers in each task)."""

    cell_timeout: int = 600
    notebook_timeout: float = 3600
    quick: bool = True
    use_sandbox: bool = True
    limits: dict = field(default_factory=lambda: asdict(sandbox.Limits()))

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def autograde(ws: Workspace, chapter: str, submissions_path: Path, *, jobs: int | None = None,
              cell_timeout: int = 600, notebook_timeout: float = 3600, quick: bool = True,
              force: bool = False, id_pattern: str = ingest.DEFAULT_ID_PATTERN,
              progress: bool = True, use_sandbox: bool = True,
              limits: sandbox.Limits | None = None,
              scheduler: str | None = None) -> tuple[dict[str, Record], list[str], dict[str, int]]:
    """Grade every submission in ``submissions_path``: here, ``jobs`` at a time, or on the Dask
    cluster whose scheduler is at ``scheduler`` (grader/cluster.py).

    Returns the status of each student, the students graded in this run (the others were
    unchanged since they were graded, or could not be read), and how many each worker graded.
    """
    options = Options(cell_timeout, notebook_timeout, quick, use_sandbox,
                      asdict(limits or sandbox.Limits()))
    # Read the submissions first: a wrong path or a corrupt archive fails before any setup.
    with ingest.opened(submissions_path) as folder:
        submissions, rejected = ingest.collect(folder, chapter, id_pattern)
    # Then whatever grades them: no sandbox here, or no cluster worker that may grade, fails
    # before anything is written to the workspace.
    cluster_pool = _connect(scheduler, ws, use_sandbox)
    try:
        _, release, forbidden = _prepare_chapter(ws, chapter, cell_timeout)
        status = ws.load_status(chapter)
        status.rejected = [Record(student="", status=Status.REJECTED, message=m) for m in rejected]
        todo, flags = _plan_batch(ws, chapter, submissions, status, release, forbidden, force=force,
                                  use_sandbox=use_sandbox)
        ws.save_status(status)
        recorder = Recorder(ws, chapter, status, flags, total=len(todo), progress=progress)
        with recorder, _sigterm_interrupts():
            if cluster_pool is not None:
                cluster_pool.grade(chapter, todo, options, recorder)
            else:
                _grade_here(ws, chapter, todo, options, recorder, jobs)
    finally:
        if cluster_pool is not None:
            cluster_pool.close()
    return status.records, todo, dict(recorder.by_worker)


def _connect(scheduler: str | None, ws: Workspace, use_sandbox: bool):
    """The checked Dask cluster (grader/cluster.py), or None to grade here (sandbox checked)."""
    if scheduler is None:
        if use_sandbox:
            _require_sandbox()
        return None
    if not use_sandbox:
        raise GraderError("--unsafe-no-sandbox grades on this machine only; a cluster's workers "
                          "always grade in the sandbox (leave out --scheduler)")
    from grader import cluster

    return cluster.connect(scheduler, ws.repo_root)


def _require_sandbox() -> None:
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable as error:
        raise GraderError(
            f"No grading sandbox can start here: {error}. Official grades need the sandbox "
            "(without it student code runs as you, next to the hidden tests and the gradebook). "
            "To grade anyway, pass --unsafe-no-sandbox; every submission is then flagged.") from None


def _prepare_chapter(ws: Workspace, chapter: str, cell_timeout: int
                     ) -> tuple[list[probes.Probe], nbformat.NotebookNode, dict[str, list[str]]]:
    """Set the workspace up for ``chapter``; its trusted checks, release notebook, and what each
    test cell forbids."""
    ws.prepare(chapter, cell_timeout=cell_timeout)
    if not ws.probes(chapter).exists():
        raise GraderError(f"{chapter} has no trusted checks (solutions/{chapter}/probes.py): every "
                          "autograded exercise needs one, see grader/probes.py.")
    chapter_probes = probes.load_probes(ws.probes(chapter))
    forbidden = trusted.chapter_forbidden(nbformat.read(ws.path / "source" / chapter / f"{chapter}.ipynb",
                                                        as_version=4))
    sandbox.write_kernelspec(ws.path / "jupyter")
    release = nbformat.read(ws.release_notebook(chapter), as_version=4)
    return chapter_probes, release, forbidden


def _plan_batch(ws: Workspace, chapter: str, submissions: list[ingest.Submission],
                status: ChapterStatus, release: nbformat.NotebookNode,
                forbidden: dict[str, list[str]], *, force: bool,
                use_sandbox: bool) -> tuple[list[str], dict[str, list[str]]]:
    """The students to grade now, and the flags of each read before any of its code runs (step 1).

    Their notebooks are copied into the workspace and their records set to pending; an unusable
    submission is recorded as an error, and one unchanged since it was graded is left alone
    (unless ``force``).
    """
    reference_modules = trusted.reference_modules([t for ts in forbidden.values() for t in ts])
    todo, flags = [], {}
    for sub in submissions:
        if sub.problem:
            status.records[sub.student] = Record(sub.student, Status.ERROR, sub.problem, sub.source,
                                                 sub.sha256)
            continue
        old = status.records.get(sub.student)
        unchanged = (old is not None and old.sha256 == sub.sha256 and old.status == Status.GRADED
                     and ws.autograded(sub.student, chapter).exists())
        if unchanged and not force:
            continue
        target = ws.submitted(sub.student, chapter)
        target.parent.mkdir(parents=True, exist_ok=True)
        notebook, cleaned = clean_submission(sub.notebook, release)  # malformed graded cells out
        nbformat.write(notebook, str(target))
        flags[sub.student] = (submission_flags(sub.notebook, release) + cleaned
                              + trust_flags(sub.notebook, release, reference_modules))
        if not use_sandbox:
            flags[sub.student].insert(0, "unsafe: graded without a sandbox (--unsafe-no-sandbox)")
        status.records[sub.student] = Record(sub.student, Status.PENDING, "", sub.source, sub.sha256)
        todo.append(sub.student)
    return todo, flags


def _kernel_env(quick: bool, threads: int) -> dict[str, str]:
    """The environment a student's notebook runs in: its mode and its share of the CPUs."""
    return {"COURSE_QUICK": "1" if quick else "0", "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}


def _batch_limits(limits: sandbox.Limits | None, notebook_timeout: float, threads: int) -> sandbox.Limits:
    """``limits`` (default: sandbox.Limits()) with CPU time for a whole notebook on ``threads``."""
    limits = limits or sandbox.Limits()
    return sandbox.Limits(**{**limits.__dict__,
                             "cpu_seconds": int(notebook_timeout * threads * 2 + 60)})


# -- the grading station: one function grades one submission, here or on a Dask worker ------------


@dataclass
class Station:
    """Where submissions are graded: a scratch workspace of its own (its gradebook, release,
    sandbox folders and logs; never the instructor's) and the settings of the batch. The local
    path opens one in ``<workspace>/scratch/<chapter>``, each Dask worker one in its own folder
    (grader/cluster.py); both grade through :func:`grade_submission`."""

    ws: Workspace
    chapter: str
    settings: Settings
    worker: str = "local"


@dataclass
class GradeResult:
    """One submission graded by :func:`grade_submission`: plain data only (strings, numbers),
    sent back from a Dask worker as JSON. The coordinator records it (:class:`Recorder`)."""

    student: str
    status: str
    message: str
    seconds: float
    flags: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    notebook: str | None = None  # the graded notebook (JSON text); None when nothing was graded
    gradebook: dict | None = None  # this submission's gradebook entries (_export_grades)
    log: str = ""  # nbgrader's log of this grading
    log_path: str = ""  # where the log was, where it was graded (messages name it)
    worker: str = "local"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GradeResult:
        return cls(**json.loads(text))


def open_station(root: Path, chapter: str, folder: Path, options: Options, jobs: int,
                 worker: str = "local") -> Station:
    """A station grading ``jobs`` submissions at once in the scratch workspace ``folder``, from the
    course at ``root``; the scratch is kept between batches and rebuilt when the course changed."""
    scratch = Workspace(folder, root)
    try:
        chapter_probes, release, forbidden = _prepare_chapter(scratch, chapter, options.cell_timeout)
    except GraderError:  # a scratch of an older version of the course: nothing in it to keep
        shutil.rmtree(folder, ignore_errors=True)
        scratch = Workspace(folder, root)
        chapter_probes, release, forbidden = _prepare_chapter(scratch, chapter, options.cell_timeout)
    threads = max(1, _usable_cpus() // jobs)
    withheld = trusted.withheld_course_lib(scratch.path / "trusted" / chapter,
                                           [t for targets in forbidden.values() for t in targets])
    limits = _batch_limits(sandbox.Limits(**options.limits), options.notebook_timeout, threads)
    settings = Settings(options.notebook_timeout, _kernel_env(options.quick, threads), options.use_sandbox,
                        limits, chapter_probes, release, forbidden, withheld,
                        cell_timeout=options.cell_timeout)
    for slot in sandbox.reserve_slots(jobs) if options.use_sandbox else range(jobs):
        settings.slots.put(slot)
    return Station(scratch, chapter, settings, worker)


def _usable_cpus() -> int:
    """The CPUs this process may run on (a Slurm job's share of a node, not the whole node)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def grade_submission(station: Station, student: str, notebook: str) -> GradeResult:
    """Grade one submission (``notebook``: the text of the notebook as the coordinator copied it)
    in the station's scratch workspace, and return plain results; nothing of it stays there."""
    ws, chapter = station.ws, station.chapter
    _clear_student(ws, chapter, student)
    path = ws.submitted(student, chapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(notebook, encoding="utf-8")
    try:
        outcome = grade_one(ws, chapter, student, station.settings)
        graded = ws.autograded(student, chapter)
        result = GradeResult(student, str(outcome.status), outcome.message, outcome.seconds,
                             outcome.flags, outcome.checks, outcome.seed,
                             log_path=str(ws.log(student, chapter)), worker=station.worker)
        if outcome.status == Status.GRADED:
            result.notebook = graded.read_text(encoding="utf-8")
        result.gradebook = _export_grades(ws, chapter, student, keep=outcome.status == Status.GRADED)
        if ws.log(student, chapter).exists():
            result.log = ws.log(student, chapter).read_text(encoding="utf-8", errors="replace")
        return result
    finally:
        _clear_student(ws, chapter, student)


def _clear_student(ws: Workspace, chapter: str, student: str) -> None:
    """Remove a student's files from a scratch workspace (before and after grading them)."""
    for folder in (ws.submitted(student, chapter).parent, ws.autograded(student, chapter).parent,
                   ws.sandbox_dir(student, chapter)):
        shutil.rmtree(folder, ignore_errors=True)
    ws.log(student, chapter).unlink(missing_ok=True)


# What the gradebook keeps of one graded submission, copied from the station's to the instructor's.
_GRADE_FIELDS = ("auto_score", "manual_score", "extra_credit", "needs_manual_grade")
_COMMENT_FIELDS = ("auto_comment", "manual_comment")
_NOTEBOOK_FIELDS = ("flagged", "late_submission_penalty")


def _export_grades(ws: Workspace, chapter: str, student: str, keep: bool) -> dict | None:
    """The gradebook entries of one submission as plain data (None unless ``keep``), then removed
    from the station's gradebook."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(ws.db_url) as gb:
        try:
            submission = gb.find_submission(chapter, student)
        except MissingEntry:
            return None
        data = {nb.name: {"notebook": {f: getattr(nb, f) for f in _NOTEBOOK_FIELDS},
                          "grades": {g.name: {f: getattr(g, f) for f in _GRADE_FIELDS} for g in nb.grades},
                          "comments": {c.name: {f: getattr(c, f) for f in _COMMENT_FIELDS}
                                       for c in nb.comments}}
                for nb in submission.notebooks}
        gb.remove_submission(chapter, student)
    return data if keep else None


def _import_grades(ws: Workspace, chapter: str, student: str, data: dict) -> None:
    """Write a submission's gradebook entries (from :func:`_export_grades`) into ``ws``'s gradebook,
    in one transaction."""
    from nbgrader.api import Gradebook
    from sqlalchemy.exc import SAWarning

    with Gradebook(ws.db_url) as gb, warnings.catch_warnings():
        # nbgrader's add_submission builds its rows before adding them to the session, which
        # SQLAlchemy warns about (harmlessly) on stderr; nbgrader's own autograde does the same.
        warnings.simplefilter("ignore", SAWarning)
        gb.update_or_create_student(student)
        submission = gb.update_or_create_submission(chapter, student)
        for nb in submission.notebooks:
            entries = data.get(nb.name, {})
            for name, value in entries.get("notebook", {}).items():
                setattr(nb, name, value)
            for rows, kind in ((nb.grades, "grades"), (nb.comments, "comments")):
                for row in rows:
                    for name, value in entries.get(kind, {}).get(row.name, {}).items():
                        setattr(row, name, value)
        gb.db.commit()


class Recorder:
    """The coordinator's side: records each graded submission exactly once, in the instructor's
    workspace only (gradebook, graded notebook, log, then its status record, so an interrupted
    batch never holds a half-recorded submission: its status stays pending and a rerun grades it),
    with a progress bar and a count per worker."""

    def __init__(self, ws: Workspace, chapter: str, status: ChapterStatus, flags: dict[str, list[str]],
                 *, total: int, progress: bool):
        self.ws, self.chapter, self.status, self.flags = ws, chapter, status, flags
        self.by_worker: Counter[str] = Counter()
        self.recorded: set[str] = set()
        self.bar = tqdm(total=total, desc=f"grading {chapter}", disable=not progress, unit="nb")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.ws.save_status(self.status)
        self.bar.close()

    def record(self, result: GradeResult) -> bool:
        """Record ``result``; False (and nothing written) when its student is already recorded."""
        if result.student in self.recorded:
            return False
        ws, chapter, student = self.ws, self.chapter, result.student
        graded = ws.autograded(student, chapter)
        if result.gradebook is not None and result.notebook is not None:
            _import_grades(ws, chapter, student, result.gradebook)
            _write_atomically(graded, result.notebook)
        else:
            graded.unlink(missing_ok=True)  # an earlier grading's notebook must not stand for this one
        _write_atomically(ws.log(student, chapter), result.log)
        old = self.status.records[student]
        message = result.message.replace(result.log_path, str(ws.log(student, chapter))) \
            if result.log_path else result.message
        self.status.records[student] = Record(
            student, Status(result.status), message, old.source, old.sha256, round(result.seconds, 2),
            self.flags.get(student, []) + result.flags, result.checks, result.seed)
        ws.save_status(self.status)  # after every student, so an interrupted batch resumes
        self.recorded.add(student)
        self.by_worker[result.worker] += 1
        if result.worker != "local":
            self.bar.set_postfix_str(", ".join(f"{w}: {n}" for w, n in sorted(self.by_worker.items())),
                                     refresh=False)
        self.bar.update(1)
        return True


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _grade_here(ws: Workspace, chapter: str, todo: list[str], options: Options, recorder: Recorder,
                jobs: int | None) -> None:
    """Grade the students in ``todo`` on this machine, ``jobs`` at a time."""
    jobs = max(1, jobs or os.cpu_count() or 1)
    if not todo:
        return
    station = open_station(ws.repo_root, chapter, ws.path / "scratch" / chapter, options, jobs)

    def run(student: str) -> GradeResult:
        return grade_submission(station, student, ws.submitted(student, chapter).read_text(encoding="utf-8"))

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for result in pool.map(run, todo):
            recorder.record(result)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        kill_running()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops the batch as Ctrl-C does (a KeyboardInterrupt in the main thread)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
