"""Flags raised by reading a submission, before any of its code runs.

Two kinds:

- **integrity**: a locked cell (tests, instructions) edited or deleted, nbgrader metadata changed
  (points, cell kind, grade_id), a graded cell duplicated or unknown. nbgrader restores locked
  cells from the gradebook before grading, so these cost no points by themselves; they tell
  the instructor someone tried.
- **suspicious constructs** in code the student wrote (every code cell whose source is not
  verbatim from the release): IPython hooks, patched builtins or library functions, frame and
  gc introspection, process control, ctypes, sqlite, sockets, reading environment variables,
  always-true comparisons. These are leads for a human to read, not verdicts: the score is
  decided by the tests and the trusted checks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import nbformat

NBGRADER_KEYS = ("grade", "solution", "locked", "points", "grade_id")

# Attribute or name -> what it is. Matched on dotted names as written (after import aliases).
SUSPICIOUS_CALLS = {
    "get_ipython": "IPython hooks (get_ipython)",
    "sys._getframe": "frame introspection (sys._getframe)",
    "inspect.currentframe": "frame introspection (inspect.currentframe)",
    "inspect.stack": "frame introspection (inspect.stack)",
    "inspect.getouterframes": "frame introspection (inspect.getouterframes)",
    "gc.get_objects": "gc introspection (gc.get_objects)",
    "gc.get_referrers": "gc introspection (gc.get_referrers)",
    "gc.get_referents": "gc introspection (gc.get_referents)",
    "sys.settrace": "tracing hooks (sys.settrace)",
    "sys.setprofile": "tracing hooks (sys.setprofile)",
    "sys.addaudithook": "audit hooks (sys.addaudithook)",
    "os.system": "process control (os.system)",
    "os.popen": "process control (os.popen)",
    "os.fork": "process control (os.fork)",
    "os.kill": "process control (os.kill)",
    "os.killpg": "process control (os.killpg)",
    "os._exit": "process control (os._exit)",
    "os.getenv": "reads environment variables (os.getenv)",
    "os.getppid": "process control (os.getppid)",
    "signal.signal": "signal handlers (signal.signal)",
    "exec": "dynamic code (exec)",
    "eval": "dynamic code (eval)",
    "compile": "dynamic code (compile)",
    "__import__": "dynamic import (__import__)",
    "importlib.import_module": "dynamic import (importlib.import_module)",
    "setattr": "setattr (may patch a library)",
}
SUSPICIOUS_ATTRIBUTES = {
    "f_back": "frame introspection (f_back)", "f_globals": "frame introspection (f_globals)",
    "f_locals": "frame introspection (f_locals)", "tb_frame": "frame introspection (tb_frame)",
    "gi_frame": "frame introspection (gi_frame)", "environ": "reads environment variables (os.environ)",
    "input_transformers_cleanup": "IPython hooks (input transformers)",
    "input_transformers_post": "IPython hooks (input transformers)",
    "ast_transformers": "IPython hooks (AST transformers)", "events": "IPython hooks (events)",
    "set_custom_exc": "IPython hooks (custom exception handler)", "excepthook": "exception hooks",
    "showtraceback": "traceback suppression (showtraceback)", "_showtraceback": "traceback suppression",
    "__builtins__": "builtins patching (__builtins__)", "__class__": "class swapping (__class__)",
    "__code__": "code object patching (__code__)", "__globals__": "function globals (__globals__)",
    "__subclasses__": "object graph introspection (__subclasses__)",
}
SUSPICIOUS_MODULES = {
    "builtins": "builtins patching (import builtins)", "subprocess": "process control (subprocess)",
    "pty": "process control (pty)", "multiprocessing": "process control (multiprocessing)",
    "ctypes": "ctypes", "cffi": "ctypes-like (cffi)", "sqlite3": "sqlite", "sqlalchemy": "database access",
    "socket": "network (socket)", "urllib": "network (urllib)", "http": "network (http)",
    "requests": "network (requests)", "gc": "gc introspection (import gc)",
    "inspect": "introspection (inspect)",
    "nbgrader": "imports nbgrader", "grader": "imports the grader", "traceback": "traceback handling",
    "signal": "signal handlers", "resource": "resource limits (resource)",
}
# Comparison dunders a student has no reason to write in this course.
SUSPICIOUS_METHODS = {"__eq__", "__ne__", "__bool__", "__lt__", "__le__", "__gt__", "__ge__",
                      "__instancecheck__", "__float__", "__index__", "__array__", "__torch_function__"}
PATCHED_MODULES = {"torch", "numpy", "np", "math", "builtins", "course_lib", "IPython", "sys", "os",
                   "nbgrader", "F", "nn", "random", "json", "checks"}


def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def _python_source(source: str) -> str:
    """IPython syntax (magics, ``!cmd``) as the Python it runs."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001 - fall back to the raw text
        return source


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def scan_source(source: str) -> Iterator[tuple[int, str]]:
    """``(line, what)`` for each suspicious construct in one cell."""
    text = _python_source(source)
    if "run_line_magic('system'" in text or "getoutput(" in text:
        yield 1, "process control (shell escape)"
    try:
        tree = ast.parse(text)
    except SyntaxError as error:
        yield error.lineno or 1, "code that does not parse"
        return
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
                top = alias.name.split(".")[0]
                if top in SUSPICIOUS_MODULES:
                    yield node.lineno, SUSPICIOUS_MODULES[top]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if top in SUSPICIOUS_MODULES:
                yield node.lineno, SUSPICIOUS_MODULES[top]
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 1)
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name:
                head, _, rest = name.partition(".")
                full = ".".join(filter(None, [aliases.get(head, head), rest]))
                for candidate in (name, full):
                    if candidate in SUSPICIOUS_CALLS:
                        yield line, SUSPICIOUS_CALLS[candidate]
                        break
        elif isinstance(node, ast.Attribute) and node.attr in SUSPICIOUS_ATTRIBUTES:
            yield line, SUSPICIOUS_ATTRIBUTES[node.attr]
        elif isinstance(node, ast.Name) and node.id == "__builtins__":
            yield line, SUSPICIOUS_ATTRIBUTES["__builtins__"]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in SUSPICIOUS_METHODS:
            yield line, f"defines {node.name} (comparison or conversion override)"
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                name = _dotted(target) if isinstance(target, ast.Attribute) else None
                if name and name.split(".")[0] in PATCHED_MODULES | {
                        k for k, v in aliases.items() if v.split(".")[0] in PATCHED_MODULES}:
                    yield line, f"patches a library ({name} = ...)"


def integrity_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[str]:
    """Locked cells edited or deleted, nbgrader metadata changed, graded cells duplicated."""
    flags = []
    released = {_meta(c)["grade_id"]: c for c in release.cells if _meta(c).get("grade_id")}
    seen: dict[str, int] = {}
    for cell in submitted.cells:
        grade_id = _meta(cell).get("grade_id")
        if grade_id:
            seen[grade_id] = seen.get(grade_id, 0) + 1
    for grade_id, count in seen.items():
        if count > 1:
            flags.append(f"integrity: cell {grade_id} appears {count} times")
        if grade_id not in released:
            flags.append(f"integrity: unknown graded cell {grade_id} (not in the release)")
    by_id = {_meta(c)["grade_id"]: c for c in submitted.cells if _meta(c).get("grade_id")}
    for grade_id, original in released.items():
        meta = _meta(original)
        cell = by_id.get(grade_id)
        kind = "locked cell" if meta.get("locked") else "answer cell"
        if cell is None:
            flags.append(f"integrity: {kind} {grade_id} deleted (or its metadata removed)")
            continue
        changed = [k for k in NBGRADER_KEYS if _meta(cell).get(k) != meta.get(k)]
        if changed:
            flags.append(f"integrity: nbgrader metadata of {grade_id} changed ({', '.join(changed)})")
        if meta.get("locked") and cell.source.strip() != original.source.strip():
            flags.append(f"integrity: locked cell {grade_id} edited")
    return flags


def code_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[str]:
    """Suspicious constructs in the code the student wrote or changed."""
    given = {c.source.strip() for c in release.cells if c.cell_type == "code"}
    flags = []
    for index, cell in enumerate(submitted.cells):
        if cell.cell_type != "code" or cell.source.strip() in given:
            continue
        label = _meta(cell).get("grade_id") or f"cell {index + 1}"
        found: dict[str, int] = {}
        for line, what in scan_source(cell.source):
            found.setdefault(what, line)
        flags += [f"suspicious: {what} in {label}, line {line}" for what, line in found.items()]
    return flags


def submission_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[str]:
    return integrity_flags(submitted, release) + code_flags(submitted, release)
