"""Mutation testing of the exercises: how many small wrong changes to each solution do its test cell
and its trusted check catch?

    .venv/bin/python -m tests.mutants --chapter ch03 [--exercise ex2] [--limit N] [--jobs 2]
                                      [--timeout 20] [--json PATH]

For each answer cell, the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` is parsed and
every mutation operator (:data:`OPERATORS`) proposes one change at one place: an arithmetic or
comparison operator swapped, a boundary moved, a constant +-1, a ``dim=`` or a reduction or a dtype
swapped, an in-place call made a copy (or the reverse), a statement dropped... Each mutant is the
cell's source with that one span of text replaced (so its diff is one line or a few), kept only when
it still parses and differs from every other mutant.

Each mutant is graded like tests/answer_harness.py grades a wrong answer, but only for its own
exercise: after the chapter's setup cell has run once in this process, a forked child (its own
process group, an address-space limit, a timeout) runs the exercise's trusted check
(grader.trusted_runner.in_process, then grader.probes.decide), then the answer cells up to the
exercise's (the mutated one in place of the solution) and the exercise's test cell. The mutant is
*killed* when the test cell raised, or the trusted check failed, or the child timed out or died.

Survivors are either mutants the tests should catch, or equivalent ones (the same behaviour); the
latter are recorded with a reason in ``tests/mutants/<chapter>.toml`` and left out of the score::

    [[equivalent]]
    exercise = "ex1"                       # the exercise (its ``exN`` prefix)
    id = "ex1_huber:14:4:drop:pass"        # the mutant's id, as the report prints it; or
    snippet = "size = residual.abs()"      # the mutated line, stripped (any mutant producing it)
    reason = "why it behaves like the solution"

docs/mutation-testing.md has the operators, the scoreboard and how to read it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import hashlib
import io
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the course supports it): pytest brings tomli there
    import tomli as tomllib

from tests.grading_helpers import REPO

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
DEFAULT_TIMEOUT_S = 20.0
EQUIVALENTS_DIR = REPO / "tests" / "mutants"


# -- mutants: one edit of the solution's text ------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """Replace ``source[start:end]`` with ``text``; ``operator`` names the kind of change."""

    operator: str
    start: int
    end: int
    text: str


@dataclass
class Mutant:
    id: str  # cell:line:col:operator:replacement (line and col of the change, 1-based line)
    exercise: str  # "ex2"
    cell: str  # the answer cell's grade_id
    operator: str
    source: str  # the whole mutated cell
    diff: str  # unified diff of the mutated line(s) against the solution
    snippet: str  # the first mutated line, stripped: what an equivalents entry may name


class _Positions:
    """Character offsets of (lineno, col_offset) positions; ast gives columns in UTF-8 bytes."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col_bytes: int) -> int:
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode()[:col_bytes].decode(errors="replace"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset))

    def text(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.source[start:end]


ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
              ast.Pow: "**", ast.MatMult: "@", ast.Mod: "%"}
ARITHMETIC_SWAPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div],
                    ast.Div: [ast.Mult, ast.FloorDiv], ast.FloorDiv: [ast.Div], ast.Pow: [ast.Mult],
                    ast.MatMult: [ast.Mult], ast.Mod: [ast.FloorDiv]}
COMPARISON = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
              ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
BOUNDARY_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
COMPARISON_SWAPS = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE,
                    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
                    ast.In: ast.NotIn, ast.NotIn: ast.In}
REDUCTION_SWAPS = {"sum": "mean", "mean": "sum", "max": "min", "min": "max", "amax": "amin", "amin": "amax",
                   "argmax": "argmin", "argmin": "argmax", "any": "all", "all": "any", "nansum": "nanmean",
                   "logsumexp": "amax"}
DTYPE_SWAPS = {"float64": "float32", "float32": "float64", "double": "float", "float": "double",
               "int64": "int32", "int32": "int64", "long": "int", "int": "long"}
DIM_SWAPS = {0: 1, 1: 0, -1: -2, -2: -1}
# Methods whose first positional argument is a dimension (torch.<name>(x, dim): the second).
DIM_METHODS = {"sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "softmax", "log_softmax",
               "logsumexp", "cumsum", "cumprod", "std", "var", "prod", "norm", "all", "any", "unsqueeze",
               "squeeze", "cat", "stack", "flip", "topk", "sort", "argsort", "gather", "chunk", "split"}
# Copies that have an in-place twin (name + "_"): x.add(y) <-> x.add_(y).
IN_PLACE_TWINS = {"add", "sub", "mul", "div", "clamp", "clamp_min", "clamp_max", "masked_fill", "exp", "log",
                  "abs", "neg", "sqrt", "pow", "addcmul", "addcdiv", "lerp", "scatter", "scatter_add",
                  "index_fill", "index_add", "copy", "fill", "zero", "tanh", "sigmoid", "relu", "t",
                  "transpose", "squeeze", "unsqueeze", "uniform", "normal", "bernoulli", "random"}
DROPPED_CALLS = {"clone", "copy", "detach", "contiguous"}  # x.clone() -> x


def _with_op(gap: str, old: str, new: str) -> str | None:
    """``gap`` (the text between two operands) with the operator ``old`` replaced by ``new``."""
    code = "\n".join(line.split("#")[0] for line in gap.split("\n"))  # no comment text
    at = code.find(old)
    return None if at < 0 else gap[:at] + new + gap[at + len(old):]


def _paren(text: str) -> str:
    return f"({text})"


class _Collector(ast.NodeVisitor):
    """Walk a cell's tree and propose :class:`Edit` s for the nodes inside the solution lines."""

    def __init__(self, source: str, regions: list[tuple[int, int]]) -> None:
        self.at = _Positions(source)
        self.regions = regions  # (first line, last line) of each solution part
        self.edits: list[Edit] = []

    def inside(self, node: ast.AST) -> bool:
        return any(first <= node.lineno and node.end_lineno <= last for first, last in self.regions)

    def add(self, operator: str, node: ast.AST, text: str) -> None:
        start, end = self.at.span(node)
        self.edits.append(Edit(operator, start, end, text))

    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.JoinedStr):
            return  # f-strings: messages, and their inner positions are unreliable
        if hasattr(node, "lineno") and self.inside(node):
            for propose in PROPOSERS:
                propose(self, node)
        super().generic_visit(node)

    # the operators, each from one node


def _arithmetic(c: _Collector, node: ast.AST) -> None:
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC_SWAPS:
        start, _ = c.at.span(node)
        gap_start, gap_end = c.at.span(node.left)[1], c.at.span(node.right)[0]
        gap = c.at.source[gap_start:gap_end]
        for new in ARITHMETIC_SWAPS[type(node.op)]:
            changed = _with_op(gap, ARITHMETIC[type(node.op)], ARITHMETIC[new])
            if changed is not None:  # parentheses: ** binds tighter than what replaces it
                whole = c.at.text(node)
                cut = gap_start - start
                c.add("arithmetic", node, _paren(whole[:cut] + changed + whole[cut + len(gap):]))
    if isinstance(node, ast.AugAssign) and type(node.op) in ARITHMETIC_SWAPS:
        gap = c.at.source[c.at.span(node.target)[1]:c.at.span(node.value)[0]]
        for new in ARITHMETIC_SWAPS[type(node.op)]:
            changed = _with_op(gap, ARITHMETIC[type(node.op)] + "=", ARITHMETIC[new] + "=")
            if changed is not None:
                c.add("arithmetic", node, c.at.text(node.target) + changed + c.at.text(node.value))


def _comparison(c: _Collector, node: ast.AST) -> None:
    if not isinstance(node, ast.Compare):
        return
    operands = [node.left, *node.comparators]
    for i, op in enumerate(node.ops):
        gap_start, gap_end = c.at.span(operands[i])[1], c.at.span(operands[i + 1])[0]
        gap = c.at.source[gap_start:gap_end]
        swaps = [("boundary", BOUNDARY_SWAPS.get(type(op))), ("comparison", COMPARISON_SWAPS.get(type(op)))]
        for operator, new in swaps:
            changed = new and _with_op(gap, COMPARISON[type(op)], COMPARISON[new])
            if changed:
                padded = f" {changed.strip()} " if new in (ast.Is, ast.IsNot, ast.In, ast.NotIn) else changed
                c.edits.append(Edit(operator, gap_start, gap_end, padded))


def _constant(c: _Collector, node: ast.AST) -> None:
    if not isinstance(node, ast.Constant):
        return
    value = node.value
    if isinstance(value, bool):
        c.add("constant", node, str(not value))
    elif isinstance(value, (int, float)):
        for new in (value + 1, value - 1):
            text = repr(new)
            c.add("constant", node, _paren(text) if new < 0 else text)


def _unary(c: _Collector, node: ast.AST) -> None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        c.add("unary", node, _paren(c.at.text(node.operand)))


def _dim_argument(c: _Collector, node: ast.AST) -> None:
    """dim=/axis= 0<->1, -1<->-2 (keyword, or the positional dim of a known method), keepdim toggled."""
    if not isinstance(node, ast.Call):
        return
    keywords = {k.arg: k.value for k in node.keywords}
    dims = [keywords[k] for k in ("dim", "axis") if k in keywords]
    name = node.func.attr if isinstance(node.func, ast.Attribute) else ""
    if name in DIM_METHODS:
        is_module_call = isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "F")
        position = 1 if is_module_call else 0
        dims += node.args[position:position + 1]
    for dim in [e for d in dims for e in (d.elts if isinstance(d, ast.Tuple) else [d])]:  # dim=(-2, -1)
        value = _int_value(dim)
        if value in DIM_SWAPS:
            c.add("dim", dim, _paren(str(DIM_SWAPS[value])))
    if "keepdim" in keywords and isinstance(keywords["keepdim"], ast.Constant):
        c.add("keepdim", keywords["keepdim"], str(not keywords["keepdim"].value))
    elif dims and name in REDUCTION_SWAPS and c.at.source[c.at.span(node)[1] - 1] == ")":
        end = c.at.span(node)[1] - 1
        c.edits.append(Edit("keepdim", end, end, ", keepdim=True"))


def _int_value(node: ast.AST) -> int | None:
    """The int a node spells (``1``, ``-1``), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_value(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _rename_attribute(c: _Collector, node: ast.Attribute, operator: str, new_name: str) -> None:
    """Replace the attribute's name (the last characters of its text) with ``new_name``."""
    end = c.at.span(node)[1]
    c.edits.append(Edit(operator, end - len(node.attr), end, new_name))


def _reduction_and_dtype(c: _Collector, node: ast.AST) -> None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
        c.add("reduction", node.func, REDUCTION_SWAPS[node.func.id])  # the builtins
    if not isinstance(node, ast.Attribute):
        return
    called = isinstance(getattr(node, "parent", None), ast.Call) and node.parent.func is node
    if called and node.attr in REDUCTION_SWAPS:
        _rename_attribute(c, node, "reduction", REDUCTION_SWAPS[node.attr])
    torch_dtype = isinstance(node.value, ast.Name) and node.value.id == "torch" and not called
    dtype_method = called and node.attr in ("double", "float", "long", "int") and not node.parent.args
    if node.attr in DTYPE_SWAPS and (torch_dtype or dtype_method):
        _rename_attribute(c, node, "dtype", DTYPE_SWAPS[node.attr])


def _in_place(c: _Collector, node: ast.AST) -> None:
    """x.add_(y) <-> x.add(y); x += y <-> x = x + y; x.clone() -> x."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        attr = node.func.attr
        if attr.endswith("_") and not attr.startswith("_") and attr[:-1] in IN_PLACE_TWINS:
            _rename_attribute(c, node.func, "in-place", attr[:-1])
        elif attr in IN_PLACE_TWINS and _changes_a_variable(node):
            _rename_attribute(c, node.func, "in-place", attr + "_")
        if attr in DROPPED_CALLS and not node.args and not node.keywords:
            c.add("in-place", node, _paren(c.at.text(node.func.value)))
    if isinstance(node, ast.AugAssign) and type(node.op) in ARITHMETIC:
        target = c.at.text(node.target)
        c.add("in-place", node, f"{target} = {target} {ARITHMETIC[type(node.op)]} ({c.at.text(node.value)})")
    if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.BinOp)
            and type(node.value.op) in ARITHMETIC and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value.left, ast.Name) and node.value.left.id == node.targets[0].id):
        op = ARITHMETIC[type(node.value.op)]
        c.add("in-place", node, f"{node.targets[0].id} {op}= ({c.at.text(node.value.right)})")


def _changes_a_variable(call: ast.Call) -> bool:
    """Whether making ``call`` in place would change a tensor some name holds: torch.f(x) and x.f()
    with x a name, attribute or item; on a temporary (torch.exp(-x)) the mutant is equivalent."""
    module_call = isinstance(call.func.value, ast.Name) and call.func.value.id in ("torch", "F")
    tensor = (call.args[0] if call.args else None) if module_call else call.func.value
    return isinstance(tensor, (ast.Name, ast.Attribute, ast.Subscript))


def _dropped_statement(c: _Collector, node: ast.AST) -> None:
    kept = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Pass)
    if not isinstance(node, ast.stmt) or isinstance(node, kept):
        return
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return  # a docstring
    c.add("drop", node, "pass")


def _slice_bound(c: _Collector, node: ast.AST) -> None:
    """x[a:n] -> x[a:n+1], x[a:n-1] for bounds that are not plain numbers (those are constants)."""
    if not isinstance(node, ast.Slice):
        return
    for bound in (node.lower, node.upper):
        if bound is not None and _int_value(bound) is None:
            for delta in ("+ 1", "- 1"):
                c.add("slice", bound, _paren(f"{c.at.text(bound)} {delta}"))


PROPOSERS = [_arithmetic, _comparison, _constant, _unary, _dim_argument, _reduction_and_dtype, _in_place,
             _dropped_statement, _slice_bound]
OPERATORS = ["arithmetic", "comparison", "boundary", "constant", "unary", "dim", "keepdim", "reduction",
             "dtype", "in-place", "drop", "slice"]


def solution_lines(source: str) -> list[tuple[int, int]]:
    """The 1-based (first, last) lines strictly between each pair of solution markers (a cell can
    have several: a class's methods); the whole cell when it has none."""
    lines = source.splitlines()
    begins = [i + 2 for i, line in enumerate(lines) if BEGIN in line]
    ends = [i for i, line in enumerate(lines) if END in line]
    if not begins or len(begins) != len(ends):
        return [(1, len(lines))]
    return list(zip(begins, ends, strict=True))


def _with_parents(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    return tree


def _mutated_line(source: str, edit: Edit) -> tuple[int, int]:
    """1-based line and 0-based column (characters) of the edit."""
    before = source[:edit.start]
    return before.count("\n") + 1, edit.start - (before.rfind("\n") + 1)


def _diff(old: str, new: str, cell: str) -> str:
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), f"{cell} (solution)", f"{cell} (mutant)",
                                 n=0, lineterm="")
    return "\n".join(lines)


def mutants_of(cell: str, source: str) -> list[Mutant]:
    """Every valid, distinct one-edit mutant of the solution part of answer cell ``cell``."""
    collector = _Collector(source, solution_lines(source))
    collector.visit(_with_parents(ast.parse(source)))
    exercise = cell.split("_")[0]
    seen, mutants = {source}, []
    for edit in collector.edits:
        mutated = source[:edit.start] + edit.text + source[edit.end:]
        if mutated in seen or not _parses(mutated):
            continue
        seen.add(mutated)
        line, col = _mutated_line(source, edit)
        replacement = " ".join(edit.text.split())[:40]
        changed = mutated.splitlines()[line - 1].strip() if line <= len(mutated.splitlines()) else ""
        mutants.append(Mutant(f"{cell}:{line}:{col}:{edit.operator}:{replacement}", exercise, cell,
                              edit.operator, mutated, _diff(source, mutated, cell), changed))
    return mutants


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def sample(mutants: list[Mutant], limit: int | None) -> list[Mutant]:
    """At most ``limit`` mutants, chosen by a hash of their ids: the same ones whatever the order."""
    if limit is None or len(mutants) <= limit:
        return mutants
    return sorted(mutants, key=lambda m: hashlib.sha1(m.id.encode()).hexdigest())[:limit]


# -- equivalents ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Equivalent:
    exercise: str
    reason: str
    id: str = ""
    snippet: str = ""

    def matches(self, mutant: Mutant) -> bool:
        if mutant.exercise != self.exercise:
            return False
        return mutant.id == self.id if self.id else mutant.snippet == self.snippet.strip()


def load_equivalents(chapter: str, folder: Path = EQUIVALENTS_DIR) -> list[Equivalent]:
    """The chapter's recorded equivalent mutants (none when it has no file)."""
    path = folder / f"{chapter}.toml"
    if not path.exists():
        return []
    entries = tomllib.loads(path.read_text()).get("equivalent", [])
    for entry in entries:
        if not entry.get("reason") or not (entry.get("id") or entry.get("snippet")):
            raise ValueError(f"{path}: each equivalent needs a reason and an id or a snippet: {entry}")
    return [Equivalent(e["exercise"], e["reason"], e.get("id", ""), e.get("snippet", "")) for e in entries]


# -- grading a mutant in a forked child -----------------------------------------------------------


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # "test" | "check" | "timeout" | "crash" (killed), "equivalent" | "survived"
    detail: str = ""
    seconds: float = 0.0
    check_failed: bool = False  # the trusted check failed it (whatever the test cell did)


@dataclass
class Chapter:
    """A chapter loaded in this process: its cells, the setup cell's namespace, its probes."""

    name: str
    cells: list  # answer_harness.Cell
    namespace: dict
    probes: list
    inputs: dict
    forbidden: dict[str, list[str]]

    def exercise_cells(self, exercise: str) -> tuple[list, list]:
        """The answer cells up to the exercise's (in order), and the exercise's test cells."""
        answers, tests, own = [], [], f"{exercise}_"
        for cell in self.cells:
            if cell.kind == "answer" and not _after(answers, own):
                answers.append(cell)
            elif cell.kind == "test" and cell.grade_id.startswith(own):
                tests.append(cell)
        return answers, tests

    def exercise_probes(self, tests: list) -> tuple[list, dict]:
        """The probes of those test cells, and their inputs under their new indices."""
        names = {t.grade_id for t in tests}
        chosen = [(i, p) for i, p in enumerate(self.probes) if p.test_cell in names]
        return [p for _, p in chosen], {str(j): self.inputs[str(i)] for j, (i, _) in enumerate(chosen)}


def _after(answers: list, own: str) -> bool:
    """True once the exercise's own answer cell was taken (later answer cells are not needed)."""
    return any(a.grade_id.startswith(own) for a in answers)


def load_chapter(chapter: str, seed: int) -> Chapter:
    """Run the chapter's setup cell in this process (the children fork from here)."""
    import nbformat
    import torch
    from IPython.display import display

    from grader import probes as P
    from grader.trusted import chapter_forbidden
    from tests.answer_harness import source_cells

    torch.set_num_threads(1)  # before any parallel region: the children are forked from here
    cells = source_cells(chapter)
    namespace: dict = {"__name__": "__main__", "display": display}
    if cells and cells[0].kind == "setup":
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(cells[0].source, "<setup>", "exec"), namespace)  # noqa: S102 - our notebook
    probes = P.load_probes(REPO / "solutions" / chapter / "probes.py")
    notebook = nbformat.read(REPO / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    inputs = P.make_inputs(probes, seed)
    return Chapter(chapter, cells, namespace, probes, inputs, chapter_forbidden(notebook))


def _limit_memory(extra_gib: float) -> None:
    """Cap this process's address space at what it uses now plus ``extra_gib``."""
    with open("/proc/self/status") as status:
        vm_kib = next((int(line.split()[1]) for line in status if line.startswith("VmSize:")), 0)
    limit = (vm_kib << 10) + int(extra_gib * (1 << 30))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _grade_in_child(chapter: Chapter, mutant: Mutant | None, exercise: str, extra_gib: float) -> dict:
    """In the forked child: the exercise's trusted check, then its answer and test cells."""
    from grader import probes as P
    from grader import trusted_runner

    _limit_memory(extra_gib)
    answers, tests = chapter.exercise_cells(exercise)
    probes, inputs = chapter.exercise_probes(tests)
    sources = [(a.grade_id, mutant.source if mutant and a.grade_id == mutant.cell else a.source)
               for a in answers]
    runnable = [{"run": p.run, "forbid": chapter.forbidden.get(p.test_cell, [])} for p in probes]
    trusted = trusted_runner.in_process(dict(chapter.namespace), runnable, sources, inputs)
    verdicts = P.decide(probes, inputs, trusted["payload"])
    failed_checks = {cell: v.reason for cell, v in verdicts.items() if not v.passed}
    if trusted["forbidden"]:
        failed_checks["forbidden"] = f"called {trusted['forbidden']}"
    namespace, failed_tests = chapter.namespace, {}
    for grade_id, source in sources:
        with contextlib.suppress(BaseException):  # an answer that raises leaves its names undefined
            exec(compile(source, f"<{grade_id}>", "exec"), namespace)  # noqa: S102
    for test in tests:
        try:
            exec(compile(test.source, f"<{test.grade_id}>", "exec"), namespace)  # noqa: S102
        except BaseException as error:  # noqa: BLE001 - a failing test cell kills the mutant
            failed_tests[test.grade_id] = f"{type(error).__name__}: {error}"[:300]
    return {"tests": failed_tests, "checks": failed_checks}


def _child_main(chapter: Chapter, mutant: Mutant | None, exercise: str, extra_gib: float,
                write_fd: int) -> None:
    os.setpgrp()  # the trusted checks' children go with this one when it is killed
    result: dict
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = _grade_in_child(chapter, mutant, exercise, extra_gib)
    except BaseException as error:  # noqa: BLE001 - e.g. MemoryError: the mutant is killed
        result = {"crash": f"{type(error).__name__}: {error}"[:300]}
    with os.fdopen(write_fd, "w") as out:
        out.write(json.dumps(result))
    os._exit(0)


@dataclass
class _Running:
    mutant: Mutant | None
    pid: int
    read_fd: int
    started: float
    chunks: list[bytes] = field(default_factory=list)


def _start(chapter: Chapter, mutant: Mutant | None, exercise: str, extra_gib: float) -> _Running:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_main(chapter, mutant, exercise, extra_gib, write_fd)
    os.close(write_fd)
    return _Running(mutant, pid, read_fd, time.monotonic())


def _classify(result: dict | None, timed_out: bool) -> tuple[str, str]:
    """(status, detail) of a finished child: what killed the mutant, or "survived"."""
    if timed_out:
        return "timeout", "timed out"
    if result is None:
        return "crash", "the child died without a result"
    if "crash" in result:
        return "crash", result["crash"]
    if result["tests"]:
        return "test", "; ".join(f"{k}: {v}" for k, v in result["tests"].items())
    if result["checks"]:
        return "check", "; ".join(f"{k}: {v}" for k, v in result["checks"].items())
    return "survived", ""


def _finish(job: _Running, timed_out: bool) -> tuple[str, str, float, bool]:
    """(status, detail, seconds, whether the trusted check failed) of a finished or stuck child."""
    if timed_out:
        with contextlib.suppress(OSError):
            os.killpg(job.pid, signal.SIGKILL)
    os.waitpid(job.pid, 0)
    os.close(job.read_fd)
    try:
        result = None if timed_out else json.loads(b"".join(job.chunks).decode())
    except ValueError:
        result = None
    check_failed = bool(result and result.get("checks"))
    return (*_classify(result, timed_out), time.monotonic() - job.started, check_failed)


def _poll(job: _Running) -> bool:
    """Read what the child wrote so far; True once it closed its end."""
    import select

    while select.select([job.read_fd], [], [], 0)[0]:
        chunk = os.read(job.read_fd, 1 << 16)
        if not chunk:
            return True
        job.chunks.append(chunk)
    return False


def grade_all(chapter: Chapter, exercise: str, mutants: list, jobs: int, timeout: float,
              extra_gib: float) -> list[tuple[Mutant | None, str, str, float]]:
    """Grade each mutant (None: the solution itself) with at most ``jobs`` children at a time."""
    waiting, running, done = list(mutants), [], []
    while waiting or running:
        while waiting and len(running) < jobs:
            running.append(_start(chapter, waiting.pop(0), exercise, extra_gib))
        time.sleep(0.02)
        for job in list(running):
            timed_out = time.monotonic() - job.started > timeout
            if timed_out or _poll(job):
                running.remove(job)
                done.append((job.mutant, *_finish(job, timed_out)))
    return done


# -- per exercise ---------------------------------------------------------------------------------


@dataclass
class ExerciseReport:
    exercise: str
    cell: str
    outcomes: list[Outcome] = field(default_factory=list)
    baseline: str = "passed"  # the unmutated solution's result on this subset

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)

    def summary(self) -> dict:
        mutants, equivalent = len(self.outcomes), self.count("equivalent")
        killed = self.count("test", "check", "timeout", "crash")
        scored = mutants - equivalent
        return {"exercise": self.exercise, "cell": self.cell, "baseline": self.baseline, "mutants": mutants,
                "killed": killed, "killed_by_test": self.count("test"),
                "killed_by_check_only": self.count("check"),
                "caught_by_check": sum(o.check_failed for o in self.outcomes),
                "timeout": self.count("timeout"), "crash": self.count("crash"), "equivalent": equivalent,
                "survivors": self.count("survived"), "score": round(killed / scored, 3) if scored else None}


def run_exercise(chapter: Chapter, cell, equivalents: list[Equivalent], limit: int | None, jobs: int,
                 timeout: float, extra_gib: float) -> ExerciseReport:
    exercise = cell.grade_id.split("_")[0]
    report = ExerciseReport(exercise, cell.grade_id)
    (_, status, detail, seconds, _), = grade_all(chapter, exercise, [None], 1, max(timeout, 600.0), extra_gib)
    if status != "survived":  # the solution must pass its own tests, else nothing here means anything
        report.baseline = f"{status}: {detail}"
        return report
    per_mutant = max(timeout, 3 * seconds + 5)  # slow exercises (training) get more time
    chosen = sample(mutants_of(cell.grade_id, cell.source), limit)
    todo = [m for m in chosen if not any(e.matches(m) for e in equivalents)]
    report.outcomes = [Outcome(m, "equivalent", next(e.reason for e in equivalents if e.matches(m)))
                       for m in chosen if m not in todo]
    for mutant, status, detail, seconds, check_failed in grade_all(chapter, exercise, todo, jobs, per_mutant,
                                                                   extra_gib):
        report.outcomes.append(Outcome(mutant, status, detail, round(seconds, 2), check_failed))
    report.outcomes.sort(key=lambda o: o.mutant.id)
    return report


# -- the report -----------------------------------------------------------------------------------


def format_text(chapter: str, reports: list[ExerciseReport]) -> str:
    """One line per exercise, then each survivor with its id and diff."""
    lines = [f"mutation testing of {chapter}",
             f"{'exercise':<28} {'mutants':>7} {'killed':>6} {'test':>5} {'check':>5} {'timeout':>7} "
             f"{'equiv':>5} {'survive':>7} {'score':>6} {'trusted':>7}"]
    for report in reports:
        s = report.summary()
        if report.baseline != "passed":
            lines.append(f"{s['cell']:<28} the solution itself fails here: {report.baseline[:200]}")
            continue
        score = "-" if s["score"] is None else f"{s['score']:.0%}"
        lines.append(f"{s['cell']:<28} {s['mutants']:>7} {s['killed']:>6} {s['killed_by_test']:>5} "
                     f"{s['killed_by_check_only']:>5} {s['timeout'] + s['crash']:>7} {s['equivalent']:>5} "
                     f"{s['survivors']:>7} {score:>6} {s['caught_by_check']:>7}")
    for report in reports:
        for outcome in (o for o in report.outcomes if o.status == "survived"):
            lines += ["", f"survivor {outcome.mutant.id}", outcome.mutant.diff]
    return "\n".join(lines) + "\n"


def to_json(chapter: str, reports: list[ExerciseReport]) -> dict:
    return {"chapter": chapter, "exercises": [
        {**r.summary(), "mutants_graded": [
            {"id": o.mutant.id, "operator": o.mutant.operator, "status": o.status, "detail": o.detail[:300],
             "check_failed": o.check_failed, "seconds": o.seconds, "diff": o.mutant.diff}
            for o in r.outcomes]} for r in reports]}


# -- the command ----------------------------------------------------------------------------------


def chapter_named(short: str) -> str:
    """``ch03`` -> ``ch03_losses`` (a full name is returned as it is)."""
    from grader.course import list_chapters

    matches = [c for c in list_chapters(REPO) if c == short or c.startswith(short + "_")]
    if len(matches) != 1:
        raise SystemExit(f"no single chapter named {short!r}")
    return matches[0]


def _answer_cells(chapter: Chapter, exercise: str | None) -> Iterator:
    for cell in chapter.cells:
        if cell.kind == "answer" and (exercise is None or cell.grade_id.split("_")[0] == exercise):
            yield cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n")[0])
    parser.add_argument("--chapter", required=True, help="ch03 or ch03_losses")
    parser.add_argument("--exercise", help="only this exercise (ex2)")
    parser.add_argument("--limit", type=int, help="at most N mutants per exercise (a fixed, hashed sample)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants graded at once (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds per mutant (at least; 3x the solution's time + 5 s when more)")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="address space a mutant may add")
    parser.add_argument("--seed", type=int, default=1, help="the trusted checks' inputs")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    args = parser.parse_args(argv)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("COURSE_QUICK", "1")
    name = chapter_named(args.chapter)
    chapter, equivalents = load_chapter(name, args.seed), load_equivalents(name)
    reports = []
    for cell in _answer_cells(chapter, args.exercise):
        reports.append(run_exercise(chapter, cell, equivalents, args.limit, args.jobs, args.timeout,
                                    args.memory_gib))
        print(format_text(name, reports[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    print(format_text(name, reports))
    if args.json:
        args.json.write_text(json.dumps(to_json(name, reports), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

