"""Grade sets of answers to a chapter in plain Python processes: the same test code the grader
runs, without nbgrader, a kernel or a sandbox.

The wrong-answer fixtures only change one or two answer cells each, so running each one as a whole
notebook through the grader would mostly re-run the same demos. Instead, per chapter:

    python -m tests.answer_harness CHAPTER CASES.json RESULTS.json      (one fresh process)
      1. the setup cell (imports, seeds) runs once;
      2. for each case, a forked child runs, in notebook order, every answer cell (the solution's,
         or the case's replacement) and every test cell of the *source* notebook, hidden tests
         included (what ``nbgrader autograde`` runs), and records which test cells raised;
      3. before those cells, the child runs the chapter's trusted checks as the grader does
         (grader/trusted_runner.py: per probe, a child of its own with what the exercise forbids
         blocked, that loads the answer cells and calls the probe on the secret inputs) and
         sends back their outputs as plain tensors and any forbidden call;
    back in the caller, :func:`grade_cases` decides the trusted checks (grader.probes.decide) and
    combines both as the grader does: a test cell keeps its points only when it ran without an
    error *and* its trusted check agrees.

Demo cells (the other code cells) are skipped: no test cell reads a name they define (checked by
:func:`demo_names_read_by_tests`). The whole-notebook path, demos and all, is still exercised by
each chapter's round trip through the real grader (tests/test_roundtrip.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from grader.course import cell_role, cell_source, nbgrader_meta
from tests.grading_helpers import REPO

CASE_TIMEOUT_S = 180.0  # per case; a stuck case fails with "timed out", the others still run


# -- the cells of a chapter -----------------------------------------------------------------------


@dataclass
class Cell:
    kind: str  # "setup" (the first code cell, when not graded) | "answer" | "test" | "demo"
    grade_id: str
    source: str


def source_cells(chapter: str, root: Path = REPO) -> list[Cell]:
    """The code cells of the chapter's source notebook (solutions, hidden tests included)."""
    nb = json.loads((root / "solutions" / chapter / f"{chapter}.ipynb").read_text())
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        kind = {"other": "demo"}.get(cell_role(cell), cell_role(cell))
        if not cells and kind == "demo":
            kind = "setup"  # the first code cell: imports and seeds, run once per chapter
        cells.append(Cell(kind, nbgrader_meta(cell).get("grade_id", ""), cell_source(cell)))
    return cells


def demo_names_read_by_tests(chapter: str, root: Path = REPO) -> dict[str, list[str]]:
    """Test cell -> names it reads that only a demo cell defines (must be empty for the harness)."""
    import ast

    from grader.trusted import without_magics

    defined_by: dict[str, str] = {}
    found: dict[str, list[str]] = {}
    for cell in source_cells(chapter, root):
        tree = ast.parse(without_magics(cell.source))
        stored, loaded = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (stored if isinstance(node.ctx, ast.Store) else loaded).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stored.add(node.name)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stored.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                stored.update((a.asname or a.name).split(".")[0] for a in node.names)
        if cell.kind == "test":
            demo_only = sorted(n for n in loaded - stored if defined_by.get(n) == "demo")
            if demo_only:
                found[cell.grade_id] = demo_only
        for name in stored:
            defined_by[name] = cell.kind
    return found


# -- the caller's side ----------------------------------------------------------------------------


@dataclass
class CaseResult:
    name: str
    kernel_errors: dict[str, str]  # test cell -> the error it raised (absent: it passed)
    checks: dict[str, str]  # test cell -> "passed" or why its trusted check failed
    seconds: float
    output: str = ""  # what the cells printed (the end of it), for a failure message
    fails: set[str] = field(default_factory=set)  # test cells that score 0, as the grader decides

    def describe(self, cell: str) -> str:
        why = [f"the case's process: {self.kernel_errors['*']}"] if "*" in self.kernel_errors else []
        if cell in self.kernel_errors:
            why.append(f"in-kernel: {self.kernel_errors[cell]}")
        if self.checks.get(cell, "passed") != "passed":
            why.append(f"trusted check: {self.checks[cell]}")
        return "; ".join(why) or "passed"


def grade_cases(chapter: str, cases: list[dict], root: Path = REPO,
                timeout: float = CASE_TIMEOUT_S) -> list[CaseResult]:
    """Grade each case ``{"name", "answers": {answer cell: source}}`` of ``chapter``.

    One fresh Python process runs them all (see the module docstring); the trusted checks are
    decided here, on inputs from a new secret seed.
    """
    from grader import probes as P
    from grader.trusted import answer_owners

    checks = P.load_probes(root / "solutions" / chapter / "probes.py")
    inputs = P.make_inputs(checks, P.new_seed())
    with tempfile.TemporaryDirectory(prefix="n2l-harness-") as tmp:
        request, answer = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        request.write_text(json.dumps({"root": str(root), "inputs": P.encode(inputs), "timeout": timeout,
                                       "cases": [{"name": c["name"], "answers": c.get("answers", {})}
                                                 for c in cases]}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "COURSE_QUICK": os.environ.get("COURSE_QUICK", "1")}
        run = subprocess.run([sys.executable, "-m", "tests.answer_harness", chapter, str(request),
                              str(answer)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60 + timeout * (len(cases) + 1))
        if run.returncode != 0 or not answer.exists():
            raise RuntimeError(f"the answer harness for {chapter} failed (exit {run.returncode}):\n"
                               + (run.stdout + run.stderr)[-4000:])
        raw = json.loads(answer.read_text())
    results = []
    tests = [c.grade_id for c in source_cells(chapter, root) if c.kind == "test"]
    owners = answer_owners(nbformat.read(root / "solutions" / chapter / f"{chapter}.ipynb", as_version=4))
    for case in raw:
        verdicts = P.decide(checks, inputs, case["payload"])
        for where, calls in case.get("forbidden", {}).items():
            # A probe's index, or the answer cell that was loading: its exercise's test cell.
            for cell in owners.get(where, [checks[int(where)].test_cell] if where.isdigit() else []):
                verdicts[cell] = P.Verdict(False, f"called {', '.join(calls)}, which this exercise forbids")
        result = CaseResult(case["name"], case["kernel_errors"],
                            {k: "passed" if v.passed else v.reason for k, v in verdicts.items()},
                            case["seconds"], case["output"])
        broken = "*" in result.kernel_errors  # the case's process timed out or died: nothing passed
        result.fails = {t for t in tests if broken or t in result.kernel_errors
                        or result.checks.get(t) != "passed"}
        results.append(result)
    return results


# -- the chapter process --------------------------------------------------------------------------


def _run_case(cells: list[Cell], namespace: dict, answers: dict[str, str], inputs_text: str,
              probes_path: Path, forbidden: dict[str, list[str]], send) -> None:
    """In the forked child: the trusted checks first (from the set-up namespace, one child per
    probe with what it forbids blocked: grader/trusted_runner.py), then the answer and test cells
    in order; sends ``{"kernel_errors", "payload", "forbidden", "output"}`` through ``send``."""
    from grader import probes as P
    from grader import trusted_runner

    os.setpgrp()  # the trusted checks' children go with the case when it is killed
    kernel_errors, captured = {}, io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            probes = [{"run": p.run, "forbid": forbidden.get(p.test_cell, [])}
                      for p in P.load_probes(probes_path)]
            mine = [(c.grade_id, answers.get(c.grade_id, c.source)) for c in cells if c.kind == "answer"]
            trusted = trusted_runner.in_process(dict(namespace), probes, mine, P.decode(inputs_text))
        except Exception:  # noqa: BLE001 - probes.py itself is broken: say so, not "died"
            kernel_errors["*"], trusted = traceback.format_exc()[-2000:], {"payload": None, "forbidden": {}}
        for cell in cells:
            if cell.kind not in ("answer", "test"):
                continue
            source = answers.get(cell.grade_id, cell.source) if cell.kind == "answer" else cell.source
            try:
                exec(compile(source, f"<{cell.grade_id}>", "exec"), namespace)  # noqa: S102 - our notebook
            except BaseException as error:  # noqa: BLE001 - a cell's error fails the cell, as in a kernel
                if cell.kind == "test":
                    kernel_errors[cell.grade_id] = f"{type(error).__name__}: {error}"[:500]
                # An answer cell that raises leaves its names undefined; the tests then fail on them.
    send.send({"kernel_errors": kernel_errors, "output": captured.getvalue()[-3000:], **trusted})


def main(chapter: str, request_path: str, results_path: str) -> None:
    import torch

    torch.set_num_threads(1)  # before any parallel region: the children are forked from here
    # torch.optim imports torch._dynamo on an optimizer's first use (about 1.4 s): imported once here,
    # the forked cases and their trusted checks inherit it instead of each importing it again.
    import torch._dynamo  # noqa: F401
    request = json.loads(Path(request_path).read_text())
    root = Path(request["root"])
    probes_path = root / "solutions" / chapter / "probes.py"
    cells = source_cells(chapter, root)
    from IPython.display import display

    namespace: dict = {"__name__": "__main__", "display": display}  # display: a kernel's builtin
    if cells and cells[0].kind == "setup":
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(cells[0].source, "<setup>", "exec"), namespace)  # noqa: S102
    from grader.trusted import chapter_forbidden

    source_nb = root / "solutions" / chapter / f"{chapter}.ipynb"
    forbidden = chapter_forbidden(nbformat.read(source_nb, as_version=4))
    context = multiprocessing.get_context("fork")  # each case starts from the set-up namespace
    results = []
    for case in request["cases"]:
        start = time.monotonic()
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_run_case, args=(cells, namespace, case["answers"],
                                                        request["inputs"], probes_path, forbidden, send))
        child.start()
        send.close()
        try:
            result = receive.recv() if receive.poll(request["timeout"]) else "timed out"
        except EOFError:
            result = "died without a result"
        if isinstance(result, str):  # nothing of the case counts: every test cell fails
            try:
                os.killpg(child.pid, signal.SIGKILL)  # the case and the trusted checks it forked
            except OSError:
                child.kill()
            result = {"kernel_errors": {"*": f"the case {result} after {time.monotonic() - start:.0f} s"},
                      "payload": None, "forbidden": {}, "output": ""}
        child.join()
        receive.close()
        results.append({"name": case["name"], "seconds": round(time.monotonic() - start, 2), **result})
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
