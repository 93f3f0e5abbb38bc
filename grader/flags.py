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
import copy
import re
from collections import Counter
from collections.abc import Iterator

import nbformat

from grader.course import nbgrader_meta

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
# IPython's input history holds every cell run so far: at grading time, the hidden tests too.
HISTORY_NAMES = {"In", "Out", "_ih", "_oh", "_i", "_ii", "_iii", "history_manager"}
HISTORY_NAME = re.compile(r"^_i?\d+$")  # _i3 (input 3), _3 (output 3)
HISTORY_MAGICS = {"history", "hist", "recall", "rerun", "save", "macro", "notebook", "pastebin", "edit",
                  "load", "logstart"}
HIDDEN_MARKER = re.compile(r"(BEGIN|END) HIDDEN TESTS")
CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")
PATCHED_MODULES = {"torch", "numpy", "np", "math", "builtins", "course_lib", "IPython", "sys", "os",
                   "nbgrader", "F", "nn", "random", "json", "checks"}


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


def _reads_history(node: ast.AST) -> bool:
    """``In``, ``_ih``, ``Out``, ``_i3``, ``x.history_manager``, ``ns["_ih"]``, ``%history``..."""
    if isinstance(node, ast.Name):
        return node.id in HISTORY_NAMES or bool(HISTORY_NAME.match(node.id))
    if isinstance(node, ast.Attribute):
        return node.attr in HISTORY_NAMES
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in HISTORY_NAMES or bool(HISTORY_NAME.match(node.value))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
            and node.func.attr in ("run_line_magic", "run_cell_magic", "magic") \
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        words = node.args[0].value.lstrip("%").split()
        return bool(words) and words[0] in HISTORY_MAGICS
    return False


def _import_aliases(tree: ast.AST) -> dict[str, str]:
    """Name bound by each import -> the dotted name it stands for (``np`` -> ``numpy``,
    ``getframe`` -> ``sys._getframe``), so that a call is matched whatever it is called here."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _suspicious_imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, what)`` for each import of a module in SUSPICIOUS_MODULES."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in SUSPICIOUS_MODULES:
                    yield node.lineno, SUSPICIOUS_MODULES[top]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in SUSPICIOUS_MODULES:
                yield node.lineno, SUSPICIOUS_MODULES[top]


def _suspicious_call(call: ast.Call, aliases: dict[str, str]) -> str | None:
    """What a call is, when it is in SUSPICIOUS_CALLS as written or once its import is resolved."""
    name = _dotted(call.func)
    if not name:
        return None
    head, _, rest = name.partition(".")
    full = ".".join(filter(None, [aliases.get(head, head), rest]))
    for candidate in (name, full):
        if candidate in SUSPICIOUS_CALLS:
            return SUSPICIOUS_CALLS[candidate]
    return None


def _library_patches(node: ast.stmt, patched: set[str]) -> Iterator[str]:
    """An assignment (or ``del``) to an attribute of a library module: ``torch.softmax = ...``."""
    targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
    for target in targets:
        name = _dotted(target) if isinstance(target, ast.Attribute) else None
        if name and name.split(".")[0] in patched:
            yield f"patches a library ({name} = ...)"


def _suspicious_node(node: ast.AST, aliases: dict[str, str], patched: set[str]) -> Iterator[str]:
    """What is suspicious about one node itself (calls, attributes, overrides, patches)."""
    if isinstance(node, ast.Call):
        what = _suspicious_call(node, aliases)
        if what:
            yield what
    elif isinstance(node, ast.Attribute) and node.attr in SUSPICIOUS_ATTRIBUTES:
        yield SUSPICIOUS_ATTRIBUTES[node.attr]
    elif isinstance(node, ast.Name) and node.id == "__builtins__":
        yield SUSPICIOUS_ATTRIBUTES["__builtins__"]
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in SUSPICIOUS_METHODS:
        yield f"defines {node.name} (comparison or conversion override)"
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        yield from _library_patches(node, patched)


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
    aliases = _import_aliases(tree)
    yield from _suspicious_imports(tree)
    # a library module under its own name or any name this cell imported it as
    patched = PATCHED_MODULES | {k for k, v in aliases.items() if v.split(".")[0] in PATCHED_MODULES}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 1)
        if _reads_history(node):
            yield line, "reads input history"
        for what in _suspicious_node(node, aliases, patched):
            yield line, what


def _cells_by_grade_id(cells: list) -> dict[str, nbformat.NotebookNode]:
    """grade_id -> cell, for every cell that has one (whatever its role: locked instructions
    too); a repeated grade_id names its last cell."""
    return {grade_id: cell for cell in cells
            if isinstance(grade_id := nbgrader_meta(cell).get("grade_id"), str) and grade_id}


def _is_graded_cell(meta: dict) -> bool:
    """Whether nbgrader keeps a cell with this nbgrader metadata in its gradebook by its grade_id:
    a test, an answer or a locked cell (so it must be the release's, once)."""
    return bool(meta.get("grade") or meta.get("solution") or meta.get("locked"))


def integrity_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[str]:
    """Locked cells edited or deleted, nbgrader metadata changed, graded cells duplicated."""
    flags = []
    released = _cells_by_grade_id(release.cells)
    seen: dict[str, int] = {}
    for cell in submitted.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id and isinstance(grade_id, str):  # anything else is dropped by clean_submission
            seen[grade_id] = seen.get(grade_id, 0) + 1
    for grade_id, count in seen.items():
        if count > 1:
            flags.append(f"integrity: cell {grade_id} appears {count} times")
        if grade_id not in released:
            flags.append(f"integrity: unknown graded cell {_printable(grade_id)} (not in the release)")
    by_id = _cells_by_grade_id(submitted.cells)
    for grade_id, original in released.items():
        meta = nbgrader_meta(original)
        cell = by_id.get(grade_id)
        kind = "locked cell" if meta.get("locked") else "answer cell"
        if cell is None:
            flags.append(f"integrity: {kind} {grade_id} deleted (or its metadata removed)")
            continue
        changed = [k for k in NBGRADER_KEYS if nbgrader_meta(cell).get(k) != meta.get(k)]
        if changed:
            flags.append(f"integrity: nbgrader metadata of {grade_id} changed ({', '.join(changed)})")
        if meta.get("locked") and cell.source.strip() != original.source.strip():
            flags.append(f"integrity: locked cell {grade_id} edited")
    return flags


def _student_code(submitted: nbformat.NotebookNode,
                  release: nbformat.NotebookNode) -> Iterator[tuple[str, nbformat.NotebookNode]]:
    """``(label, cell)`` of each code cell the student wrote or changed (not verbatim from the
    release); the label is its grade_id, else "cell N"."""
    given = {c.source.strip() for c in release.cells if c.cell_type == "code"}
    for index, cell in enumerate(submitted.cells):
        if cell.cell_type == "code" and cell.source.strip() not in given:
            yield nbgrader_meta(cell).get("grade_id") or f"cell {index + 1}", cell


def code_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[str]:
    """Suspicious constructs in the code the student wrote or changed."""
    flags = []
    for label, cell in _student_code(submitted, release):
        found: dict[str, int] = {}
        for line, what in scan_source(cell.source):
            found.setdefault(what, line)
        flags += [f"suspicious: {what} in {label}, line {line}" for what, line in found.items()]
    return flags


def submission_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode) -> list[str]:
    return integrity_flags(submitted, release) + code_flags(submitted, release)


def _printable(text) -> str:
    """Text from a submission, safe to print on a terminal: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _cell_of_type(cell: nbformat.NotebookNode, cell_type: str) -> nbformat.NotebookNode:
    """``cell`` turned into a ``cell_type`` cell (its source and metadata kept)."""
    if cell.cell_type == cell_type:
        return cell
    new = (nbformat.v4.new_code_cell if cell_type == "code" else nbformat.v4.new_markdown_cell)(cell.source)
    new.metadata = cell.metadata
    if "id" in cell:
        new["id"] = cell["id"]
    return new


def _metadata_problem(cell: nbformat.NotebookNode, released: dict, validator) -> str | None:
    """Why nbgrader would fail on this cell's nbgrader metadata, or None when it is fine."""
    meta = cell.metadata.get("nbgrader")
    if not isinstance(meta, dict):
        return "its nbgrader metadata is not a mapping"
    try:
        validator.validate_cell(copy.deepcopy(cell))
    except Exception as error:  # noqa: BLE001 - jsonschema, nbgrader and KeyError alike
        text = str(error).strip().splitlines()
        return _printable((text[0] if text else type(error).__name__)[:120])
    if not _is_graded_cell(meta):
        return None
    grade_id = meta.get("grade_id")
    original = released.get(grade_id)
    if original is None:
        return _printable(f"grade_id {grade_id!r} is not in the release")
    # flag by flag, not by cell_role: "other" would make a test cell and a cell both grade and
    # solution (a manually graded answer) the same kind
    kind, was = (bool(meta.get("grade")), bool(meta.get("solution"))), nbgrader_meta(original)
    if kind != (bool(was.get("grade")), bool(was.get("solution"))):
        return f"{grade_id} marked as another kind of cell (grade/solution changed)"
    return None


def clean_submission(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode
                     ) -> tuple[nbformat.NotebookNode, list[str]]:
    """A copy of ``submitted`` that nbgrader can grade, and an integrity flag per change.

    nbgrader stops with an error on a cell whose nbgrader metadata is invalid (missing or
    malformed keys, points not a number, a wrong schema_version), names a graded cell the
    release does not have, turns a test cell into an answer cell, or repeats a grade_id. Such a
    cell that stands for a cell of the release gets the release's metadata back (the first
    copy, when no valid one exists); any other loses its nbgrader metadata and runs as a plain
    cell. The rest is graded normally. Two more things that stop nbgrader are mended: a cell id
    that breaks nbformat's schema (replaced), and hidden-test markers outside a test cell, on
    which feedback generation fails (renamed).
    """
    from nbgrader.nbgraderformat import MetadataValidator  # nbgrader is slow to import

    nb = copy.deepcopy(submitted)
    nb.metadata.pop("n2l_output_flags", None)  # only the grader's preprocessors write it
    released = _cells_by_grade_id(release.cells)
    flags = _repair_or_drop_graded_cells(nb, _metadata_problems(nb, released, MetadataValidator()), released)
    for index, cell in enumerate(nb.cells):
        flags += _mend_what_stops_nbgrader(cell, index)
    return nb, flags


def _metadata_problems(nb: nbformat.NotebookNode, released: dict,
                       validator) -> list[tuple[int, str | None, str | None]]:
    """``(index, grade_id, problem)`` of every cell with nbgrader metadata; grade_id None when it
    is not a string, problem None when nbgrader can grade the cell as it is."""
    entries = []
    for index, cell in enumerate(nb.cells):
        if isinstance(cell.get("metadata"), dict) and "nbgrader" in cell.metadata:
            grade_id = nbgrader_meta(cell).get("grade_id")
            entries.append((index, grade_id if isinstance(grade_id, str) else None,
                            _metadata_problem(cell, released, validator)))
    return entries


def _repair_or_drop_graded_cells(nb: nbformat.NotebookNode, entries: list, released: dict) -> list[str]:
    """Give each graded cell of ``entries`` with a problem the release's metadata back, when it
    stands for a release cell no valid cell carries, or else take its nbgrader metadata away; a
    second valid cell with the same grade_id is dropped too. One flag per cell changed."""
    kept: dict[str, int] = {}  # grade_id -> the one cell that carries it: the first valid one
    for index, grade_id, problem in entries:
        if problem is None and grade_id and _is_graded_cell(nbgrader_meta(nb.cells[index])):
            kept.setdefault(grade_id, index)
    flags = []
    for index, grade_id, problem in entries:
        cell = nb.cells[index]
        if problem is None:
            if grade_id is None or kept.get(grade_id, index) == index:
                continue
            problem = f"grade_id {grade_id} repeated"
        elif grade_id in released and grade_id not in kept:
            original = released[grade_id]
            cell.metadata["nbgrader"] = copy.deepcopy(original.metadata["nbgrader"])
            nb.cells[index] = _cell_of_type(cell, original.cell_type)
            kept[grade_id] = index
            flags.append(f"integrity: malformed graded cell {index + 1} ({grade_id}) repaired from the "
                         f"release ({problem})")
            continue
        del cell.metadata["nbgrader"]
        flags.append(f"integrity: malformed graded cell {index + 1} dropped ({problem}); "
                     "it runs as a plain cell")
    return flags


def _mend_what_stops_nbgrader(cell: nbformat.NotebookNode, index: int) -> list[str]:
    """Mend, in place, the two things besides nbgrader metadata that stop nbgrader on a cell; a
    flag for each."""
    flags = []
    # nbgrader stops on a notebook that fails nbformat's schema, e.g. a forged cell id
    cell_id = cell.get("id")
    if cell_id is not None and not (isinstance(cell_id, str) and CELL_ID.fullmatch(cell_id)):
        cell["id"] = nbformat.v4.nbbase.random_cell_id()
        flags.append(f"integrity: invalid cell id in cell {index + 1} replaced")
    # nbgrader's feedback stops on hidden-test markers outside a test cell (ClearHiddenTests).
    # "Test cell" as ClearHiddenTests reads it (utils.is_grade): any grade cell, not cell_role's.
    source = cell.get("source", "")
    if not nbgrader_meta(cell).get("grade") and isinstance(source, str) and HIDDEN_MARKER.search(source):
        cell.source = HIDDEN_MARKER.sub(lambda m: m.group(0).replace(" ", "_"), source)
        flags.append(f"integrity: hidden-test markers in cell {index + 1} (not a test cell) renamed")
    return flags


def trust_flags(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode,
                reference_modules: set[str]) -> list[str]:
    """Code the student wrote that works against the tests themselves: rebinding a test helper the
    release's setup cell imports (``check_close``, ``forbidden``, ...), or importing a course_lib
    module that holds this chapter's reference answers (``reference_modules``, e.g.
    ``course_lib.losses``; the release's own ``import ... as ref`` is not the student's)."""
    helpers: set[str] = set()
    for cell in release.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_python_source(cell.source))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "course_lib.checks":
                helpers |= {a.asname or a.name for a in node.names}
        break  # the setup cell only
    release_code = [c for c in release.cells if c.cell_type == "code"]
    submitted_code = [c for c in submitted.cells if c.cell_type == "code"]
    flags = []
    for label, cell in _student_code(submitted, release):
        # An edited release cell (the setup cell, say) is flagged only for what the edit added.
        position = submitted_code.index(cell)
        original = release_code[position] if position < len(release_code) and \
            nbgrader_meta(release_code[position]).get("grade_id") == nbgrader_meta(cell).get("grade_id") \
            else None
        baseline = Counter(what for what, _ in _trust_findings(original.source, helpers, reference_modules)) \
            if original is not None else Counter()
        found: dict[str, int] = {}
        for what, line in _trust_findings(cell.source, helpers, reference_modules):
            if baseline[what] > 0:
                baseline[what] -= 1
            else:
                found.setdefault(what, line)
        flags += [f"suspicious: {what} in {label}, line {line}" for what, line in found.items()]
    return flags


def _trust_findings(source: str, helpers: set[str], reference_modules: set[str]) -> list[tuple[str, int]]:
    """``(what, line)`` for every binding of a test helper and import of a reference module."""
    try:
        tree = ast.parse(_python_source(source))
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        bound: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound = [node.name]
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound = [node.id]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = [(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"]
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(f"imports {m}, which holds this chapter's reference answers", node.lineno)
                      for m in modules if m in reference_modules]
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and \
                node.slice.value in helpers and isinstance(node.ctx, ast.Store):
            bound = [node.slice.value]  # globals()["forbidden"] = ...
        found += [(f"rebinds {name}, a helper the tests use", getattr(node, "lineno", 1))
                  for name in bound if name in helpers]
    return found
