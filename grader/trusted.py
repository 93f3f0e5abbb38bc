"""The grader's side of the trusted checks: what the runner gets, and how its answers are read.

After a submission's notebook has run (in-kernel tests), the grader:

1. starts grader/trusted_runner.py in a fresh sandbox that mounts only that file, the Python
   packages and :func:`withheld_course_lib` (course_lib with the chapter's reference answers
   replaced by stubs), never the grader or probes.py (:class:`TrustedRun`), while the notebook
   still runs in a sandbox of its own; it gets the release's setup cell, each probe's call pickled
   with cloudpickle (the instructor's code, never its ``expected`` side) and what each exercise
   forbids, read from its hidden tests' ``forbidden(...)`` calls (:func:`build_job`,
   :func:`forbidden_targets`: the hidden tests stay their one home);
2. once the notebook is graded, sends the student's answer cells, taken from the submitted file
   (:func:`answer_cells`);
3. sends each probe's secret inputs only after the runner says the answers are loaded, and reads
   back outputs (plain tensors), errors and forbidden calls: the payload
   :func:`grader.probes.decide` judges, outside any student code.

    grader ──job, inputs──▶ stdin ┐
           ◀──data──────── stdout ├ runner parent ─fork─▶ one child per probe (student code)
           ◀──control───── fd N ──┘  (children close it before any student code runs)

Only the runner's parent can write the control pipe, so the order of probes, and which child
a message came from, cannot be forged by the student's code.
"""

from __future__ import annotations

import ast
import os
import selectors
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from grader import trusted_runner
from grader.course import cell_role, cell_source, cells_with_role, nbgrader_meta
from grader.probes import Probe, Tensors, encode

RUNNER_INSIDE = "/opt/n2l/trusted_runner.py"


# -- what each exercise forbids (read from its hidden tests) ---------------------------------------


def without_magics(source: str) -> str:
    """A cell's source without its IPython lines (``%magic``, ``!command``), so ``ast`` reads it."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))


def _string_tuples(tree: ast.AST) -> dict[str, list[str]]:
    """Variable -> the strings of the tuple or list literal assigned to it (``t_forbidden = (...)``)."""
    tuples: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            strings = [e.value for e in node.value.elts
                       if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for target in node.targets:
                if isinstance(target, ast.Name):
                    tuples[target.id] = strings
    return tuples


def _is_forbidden_call(node: ast.AST) -> bool:
    """``forbidden(...)`` or ``checks.forbidden(...)``."""
    func = getattr(node, "func", None)
    return isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "forbidden"


def forbidden_targets(test_source: str) -> list[str]:
    """The dotted names a test cell passes to ``forbidden(...)``, directly or through a tuple
    variable of the same cell (``t_forbidden = (...)``; ``forbidden(*t_forbidden)``)."""
    try:
        tree = ast.parse(without_magics(test_source))
    except SyntaxError:
        return []
    tuples = _string_tuples(tree)
    found: list[str] = []
    for node in filter(_is_forbidden_call, ast.walk(tree)):
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(arg.value)
            elif isinstance(arg, ast.Starred) and isinstance(arg.value, ast.Name):
                found += tuples.get(arg.value.id, [])
    return list(dict.fromkeys(found))


def chapter_forbidden(source_nb: nbformat.NotebookNode) -> dict[str, list[str]]:
    """Test cell -> what its hidden tests forbid, for every test cell of the source notebook."""
    return {grade_id: forbidden_targets(cell_source(cell))
            for grade_id, cell in cells_with_role(source_nb, "test").items()}


# -- course_lib with the chapter's reference answers withheld ------------------------------------


class _Withhold(ast.NodeTransformer):
    """Replace the bodies of the named functions, methods and classes by ``raise``."""

    def __init__(self, module: str, names: set[str]) -> None:
        self.module, self.names, self.scope = module, names, []

    def _stub(self, qualname: str) -> list[ast.stmt]:
        message = f"{self.module}.{qualname} is withheld while grading"
        return ast.parse(f"raise NotImplementedError({message!r})").body

    def visit_FunctionDef(self, node):
        qualname = ".".join([*self.scope, node.name])
        if qualname in self.names or ".".join(self.scope) in self.names:
            node.body = self._stub(qualname)
            return node
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        return node


def _course_lib_dir() -> Path:
    import importlib.util

    return Path(list(importlib.util.find_spec("course_lib").submodule_search_locations)[0])


def _split_target(target: str, package: Path) -> tuple[str, str] | None:
    """``course_lib.regularization.EarlyStopping.step`` -> ("regularization", "EarlyStopping.step")."""
    parts = target.split(".")
    if parts[0] != "course_lib":
        return None
    for cut in range(len(parts) - 1, 1, -1):
        if package.joinpath(*parts[1:cut]).with_suffix(".py").exists():
            return ".".join(parts[1:cut]), ".".join(parts[cut:])
    return None


def reference_modules(targets: list[str]) -> set[str]:
    """The course_lib modules that hold the reference answers among ``targets``."""
    package = _course_lib_dir()
    return {f"course_lib.{split[0]}" for t in targets if (split := _split_target(t, package))}


def withheld_course_lib(dest: Path, targets: list[str]) -> Path:
    """A copy of course_lib at ``dest/course_lib`` where each ``course_lib.…`` target (function,
    method or class) raises NotImplementedError: re-importing or re-running its file inside the
    trusted checks' sandbox cannot bring the reference answer back. Returns the package folder."""
    source = _course_lib_dir()
    package = dest / "course_lib"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    by_module: dict[str, set[str]] = {}
    for target in targets:
        split = _split_target(target, package)
        if split is not None:
            by_module.setdefault(split[0], set()).add(split[1])
    for module, names in by_module.items():
        path = package.joinpath(*module.split(".")).with_suffix(".py")
        tree = _Withhold(f"course_lib.{module}", names).visit(ast.parse(path.read_text()))
        path.write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n")
    import compileall

    compileall.compile_dir(package, quiet=1)  # once per batch: the sandbox may not write bytecode
    return package


# -- the job ----------------------------------------------------------------------------------------


def answer_cells(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """``(grade_id, source)`` of the student's answer cells, in the release's order: only cells
    whose grade_id is an answer cell of the release (an answer missing from the submission is
    left out, so its names stay undefined). A submitted code cell counts by its grade_id alone,
    whatever its nbgrader flags say: the release decides what is an answer."""
    wanted = list(cells_with_role(release, "answer"))  # a list: a submitted grade_id may be unhashable
    found: dict[str, str] = {}
    for cell in submitted.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if cell.cell_type == "code" and grade_id in wanted and grade_id not in found:
            found[grade_id] = cell.source
    return [(g, found[g]) for g in wanted if g in found]


def setup_cell(release: nbformat.NotebookNode) -> str:
    """The release's first code cell when it is not graded (imports, seeds): its own text, never
    the student's edit of it."""
    for cell in release.cells:
        if cell.cell_type == "code":
            # neither flag, not cell_role's "other": a cell both grade and solution is graded too
            meta = nbgrader_meta(cell)
            return "" if meta.get("grade") or meta.get("solution") else cell.source
    return ""


def answer_owners(release: nbformat.NotebookNode) -> dict[str, list[str]]:
    """Answer cell -> the test cell that grades it: the first test cell after it."""
    owners, waiting = {}, []
    for cell in release.cells:
        role, grade_id = cell_role(cell), nbgrader_meta(cell).get("grade_id")
        if role == "answer" and grade_id:
            waiting.append(grade_id)
        elif role == "test" and grade_id:
            owners.update({answer: [grade_id] for answer in waiting})
            waiting = []
    return owners


def build_job(probes: list[Probe], setup: str, forbidden: dict[str, list[str]],
              owners: dict[str, list[str]], threads: int = 1, child_timeout: float = 600) -> dict:
    """What the runner gets first (see the module docstring); ``owners`` from
    :func:`answer_owners`. The answer cells follow in :meth:`TrustedRun.finish`."""
    import base64

    import cloudpickle

    return {
        "setup": setup,
        "owners": owners,
        "child_timeout": child_timeout,  # per exercise: loading the answers and the call
        "threads": threads,
        "probes": [{"test_cell": p.test_cell, "forbid": forbidden.get(p.test_cell, []),
                    "run": base64.b64encode(cloudpickle.dumps(p.run)).decode("ascii")} for p in probes],
    }


# -- running it ------------------------------------------------------------------------------------


@dataclass
class TrustedResult:
    payload: dict  # {"outputs": encoded tensors, "errors": {probe index: why}}, for probes.decide
    forbidden: dict[str, list[str]] = field(default_factory=dict)  # test cell -> forbidden calls made
    answer_errors: dict[str, str] = field(default_factory=dict)  # answer cell -> what it raised
    problem: str = ""  # the whole run failed (setup cell, time limit, crash): why


class _Session:
    """Reads the runner's two pipes; answers "loaded" with the current probe's inputs."""

    def __init__(self, proc: subprocess.Popen, control_fd: int, job: dict,
                 inputs: dict[str, Tensors]) -> None:
        self.proc, self.job, self.inputs = proc, job, inputs
        self.buffers = {proc.stdout.fileno(): b"", control_fd: b""}
        self.control_fd, self.data_fd = control_fd, proc.stdout.fileno()
        self.current: int | None = None
        self.outputs: dict[str, Tensors] = {}
        self.errors: dict[str, str] = {}
        self.forbidden: dict[str, list[str]] = {}
        self.answer_errors: dict[str, str] = {}
        self.sent: set[int] = set()
        self.pending: list[dict] = []  # data read before the control pipe announced its probe
        self.finished = False
        self.problem = ""

    def _send(self, message: dict) -> None:
        import json

        body = json.dumps(message).encode()
        try:
            self.proc.stdin.write(len(body).to_bytes(8, "big") + body)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def _messages(self, fd: int, chunk: bytes) -> list[dict]:
        import json

        self.buffers[fd] += chunk
        out = []
        while len(self.buffers[fd]) >= 8:
            size = int.from_bytes(self.buffers[fd][:8], "big")
            if size > trusted_runner.MAX_MESSAGE:  # ends the checks (see run)
                self.problem = "the trusted checks sent a message over the size limit"
                self.buffers[fd] = b""
                return out
            if len(self.buffers[fd]) < 8 + size:
                break
            body, self.buffers[fd] = self.buffers[fd][8:8 + size], self.buffers[fd][8 + size:]
            try:
                message = json.loads(body)
            except ValueError:
                continue
            if isinstance(message, dict):
                out.append(message)
        return out

    def on_control(self, message: dict) -> None:
        if "probe" in message:  # a probe starts, or starts again without an answer cell that hung
            self.current = int(message["probe"])
            self.sent.discard(self.current)
            self.outputs.pop(str(self.current), None)
            self.errors.pop(str(self.current), None)
            for cell in message.get("skipped") or []:
                self.answer_errors[str(cell)[:100]] = ("ran past the per-cell time limit while loading; "
                                                       "left out of the trusted checks")
            waiting, self.pending = self.pending, []
            for early in waiting:
                self.on_data(early)
        elif "done" in message:
            self._drain_data()  # the child has exited: everything it sent is in the pipe
            index = str(message["done"])
            if index not in self.outputs and index not in self.errors:
                timed_out = message.get("status") == "timed out"
                self.errors[index] = ("ran past the per-cell time limit" if timed_out else
                                      "the answer's process ended without a result (it crashed or exited)")
            self.current = None
        elif "fatal" in message:
            self.problem = f"the trusted checks could not run: {str(message['fatal'])[:500]}"
        elif "finished" in message:
            self.finished = True

    def on_data(self, message: dict) -> None:
        """A message of probe ``message["index"]``'s child: a forbidden call, the answers loaded,
        or the probe's result (the first one only)."""
        if not self._is_current(message):
            return
        i = self.current
        if "forbidden" in message:
            self._record_forbidden(message)
        elif "loaded" in message and i not in self.sent:
            self._answers_loaded(message)
        elif i in self.sent and str(i) not in self.outputs and str(i) not in self.errors:
            self._record_result(message)

    def _is_current(self, message: dict) -> bool:
        """Whether a child's message is the current probe's. The two pipes are read in turn, so a
        child's first message can be read before the control pipe's "probe" that preceded it:
        such a message waits for it (in ``pending``). Messages of finished probes are dropped."""
        try:
            claimed = int(message.get("index"))
        except (TypeError, ValueError):
            return False
        if self.current is None or claimed > self.current:
            if len(self.pending) < 100:
                self.pending.append(message)
            return False
        return claimed == self.current

    def _record_forbidden(self, message: dict) -> None:
        what = f"{message['forbidden']}"[:200]
        # While the answers load, the call belongs to the exercise of the cell that made it.
        cell = self.job["probes"][self.current]["test_cell"]
        for owner in self.job["owners"].get(str(message.get("cell")), [cell]):
            if what not in self.forbidden.setdefault(owner, []):
                self.forbidden[owner].append(what)

    def _answers_loaded(self, message: dict) -> None:
        """Keep what the answer cells raised while loading; send the probe's secret inputs."""
        self.sent.add(self.current)
        for key, value in (message.get("answer_errors") or {}).items():
            self.answer_errors.setdefault(str(key)[:100], str(value)[:300])
        self._send({"inputs": encode({"0": self.inputs.get(str(self.current), {})})})

    def _record_result(self, message: dict) -> None:
        """The probe's outputs (plain tensors) or the error its call raised."""
        index = str(self.current)
        if "outputs" in message:
            try:
                self.outputs[index] = trusted_runner.decode(str(message["outputs"])).get("0", {})
            except Exception as error:  # noqa: BLE001 - damaged outputs fail this check
                self.errors[index] = f"unreadable outputs ({error})"
        elif "error" in message:
            self.errors[index] = f"{message['error']}"[:500]

    def _drain_data(self) -> None:
        """Handle whatever the data pipe holds now, without waiting."""
        os.set_blocking(self.data_fd, False)
        try:
            while True:
                try:
                    chunk = os.read(self.data_fd, 1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                for message in self._messages(self.data_fd, chunk):
                    self.on_data(message)
        finally:
            os.set_blocking(self.data_fd, True)

    def run(self, deadline: float) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.data_fd, selectors.EVENT_READ, self.on_data)
        selector.register(self.control_fd, selectors.EVENT_READ, self.on_control)
        open_fds = 2
        while open_fds and not self.finished and not self.problem:
            left = deadline - time.monotonic()
            if left <= 0:
                self.problem = "the trusted checks ran past their time limit"
                break
            for key, _ in selector.select(timeout=min(left, 1.0)):
                chunk = os.read(key.fd, 1 << 20)
                if not chunk:
                    selector.unregister(key.fd)
                    open_fds -= 1
                    continue
                for message in self._messages(key.fd, chunk):
                    key.data(message)
        selector.close()


class TrustedRun:
    """The runner, started ahead: it imports torch and runs the release's setup cell while the
    notebook still runs in its own sandbox; :meth:`finish` then sends the student's answers."""

    def __init__(self, job: dict, *, command: list[str], env: dict[str, str]) -> None:
        self.job = job
        self.read_control, write_control = os.pipe()
        try:
            # The control pipe's descriptor number is appended to the command.
            self.proc = subprocess.Popen([*command, str(write_control)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                         start_new_session=True, pass_fds=(write_control,))
        except BaseException:
            os.close(self.read_control)
            raise
        finally:
            os.close(write_control)
        self.session = _Session(self.proc, self.read_control, job, {})
        self.session._send(job)

    def finish(self, answers: list[tuple[str, str]], inputs: dict[str, Tensors],
               timeout: float) -> TrustedResult:
        """Send the answer cells, run every probe on ``inputs`` (sent one by one, each after its
        answers loaded), stop the runner, and return what it found."""
        session = self.session
        session.inputs = inputs
        session._send({"answers": answers})
        try:
            session.run(time.monotonic() + timeout)
        finally:
            self.close()
        errors = dict(session.errors)
        for i in range(len(self.job["probes"])):
            if str(i) not in session.outputs and str(i) not in errors:
                errors[str(i)] = session.problem or "no result"
        return TrustedResult({"outputs": encode(session.outputs), "errors": errors}, session.forbidden,
                             session.answer_errors, session.problem)

    def close(self) -> None:
        if self.proc.returncode is None:
            _stop(self.proc)
        if self.read_control >= 0:
            os.close(self.read_control)
            self.read_control = -1


def run_trusted(job: dict, answers: list[tuple[str, str]], inputs: dict[str, Tensors], *,
                command: list[str], env: dict[str, str], timeout: float) -> TrustedResult:
    """Start the runner and finish it at once (see :class:`TrustedRun`)."""
    return TrustedRun(job, command=command, env=env).finish(answers, inputs, timeout)


def _stop(proc: subprocess.Popen) -> None:
    import signal

    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def runner_command(sandboxed: bool) -> list[str]:
    """How the runner is started: inside a sandbox through grader.sandbox's launcher, or (tests,
    --unsafe-no-sandbox) as a plain process."""
    if sandboxed:
        return [sys.executable, "-m", "grader.sandbox", "run", "--", "python", RUNNER_INSIDE]
    return [sys.executable, str(Path(trusted_runner.__file__))]
