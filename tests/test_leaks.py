"""Leaks and unbounded outputs: hidden tests printed from IPython's history, huge outputs, student
markup in the feedback HTML, malformed graded cells, hostile student ids (see docs/trust-model.md).

One batch of the mini course (tests/mini_course.py: three exercises worth 1, 2 and 3 points)
goes through the real grader with the sandbox on, then ``report`` with feedback; each test
asserts the exact score and flags of one submission, and what the graded notebooks and the
feedback pages may hold. The unit tests at the end check the pieces on hand-made notebooks.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_output

from grader import preprocessors
from grader.flags import clean_submission, scan_source, submission_flags
from grader.lms import csv_text
from grader.preprocessors import CapOutputs, ScrubHiddenTests, output_flags
from grader.report import _md
from grader.workspace import CONFIG_TEMPLATE, Workspace
from tests.grading_helpers import once_per_session, read_grades, run_grader
from tests.mini_course import CHAPTER, MAX_SCORE, TESTS, make_course, solved, source_notebook

pytestmark = pytest.mark.grader  # the real grader: make test runs these, make check does not

MARKER = "SECRET-HIDDEN-TEST-ADD"
CELL_BYTES, NOTEBOOK_BYTES = Workspace.max_cell_output_bytes, Workspace.max_notebook_output_bytes


def _hidden_lines() -> list[str]:
    """The mini course's hidden-test lines, without white space."""
    lines = []
    for source, _points in TESTS.values():
        inside = False
        for line in source.splitlines():
            if "BEGIN HIDDEN TESTS" in line or "END HIDDEN TESTS" in line:
                inside = "BEGIN" in line
            elif inside:
                lines.append(re.sub(r"\s+", "", line))
    return lines


HIDDEN = _hidden_lines()

# -- the submissions ------------------------------------------------------------------------------

PRINT_IN = "print(In)\n"
MAGIC = "%history -n\n"
HTML_OUT = """\
import html as _html
from IPython.display import HTML, display
_src = "\\n".join(_ih)
display(HTML("<pre>" + _html.escape(_src).replace("(", "<b></b>(") + "</pre>"))
"""
JSON_OUT = """\
from IPython.display import JSON, display
display(JSON({"cells": list(_ih)}))
"""
ALT_OUT = """\
import base64
from IPython.display import Image, display
_png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
                        "hQGAhKmMIQAAAABJRU5ErkJggg==")
display(Image(data=_png, format="png", alt=_ih[2]))
"""
RAISE_OUT = "raise RuntimeError(_ih[2])\n"
MEAN_PRINTS_CALLER = """\
def mean(xs):
    print(globals().get("_ih", [""])[-1])  # the test cell calling it: hidden tests included
    return sum(xs) / len(xs)
"""
BIG_TEXT = "print('x' * 50_000_000)\n"
BIG_IMAGE = """\
import os
from IPython.display import Image, display
display(Image(data=b"\\x89PNG\\r\\n\\x1a\\n" + os.urandom(22_500_000), format="png"))
"""
MANY_CELLS = 25
MARKUP = [
    "from IPython.display import HTML, display\n"
    "display(HTML('<script>window.n2lpwned = 1</script><img src=x onerror=\"n2lpwned()\">'\n"
    "             '<a href=\"javascript:n2lpwned()\">click</a>'))\n",
    "from IPython.display import Markdown, display\n"
    "display(Markdown('[click](javascript:n2lpwned()) <img src=x onerror=n2lpwned()> '\n"
    "                 '<script>n2lpwned()</script>'))\n",
    "from IPython.display import SVG, display\n"
    "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"n2lpwned()\">'\n"
    "            '<script>n2lpwned()</script><a href=\"javascript:n2lpwned()\"><text>x</text></a></svg>'))\n",
    "from IPython.display import Javascript, display\ndisplay(Javascript('n2lpwned()'))\n",
]
MARKDOWN_CELL = ("My notes <script>n2lpwned()</script> <img src=x onerror=n2lpwned()> "
                 "[link](javascript:n2lpwned()) <svg onload=n2lpwned()></svg> "
                 "<iframe src=\"javascript:n2lpwned()\"></iframe>")
WRONG_HIDDEN_ADD = "def add(a, b):\n    return 1 if (a, b) == (-5, 5) else a + b\n"


def _hostile_markdown():
    cell = new_markdown_cell(MARKDOWN_CELL)
    cell["id"] = 'x" onmouseover="n2lpwned()'  # invalid, yet nbformat reads and writes it
    cell.metadata["tags"] = ['t" onclick="n2lpwned()']
    return cell


def _insert(nb, position: int, *cells):
    nb.cells[position:position] = list(cells)
    return nb


def _malformed(nb):
    """Several kinds of invalid nbgrader metadata, and hidden-test markers in a markdown cell."""
    def extra(meta, source="_extra = 1\n"):
        cell = new_code_cell(source)
        cell.metadata["nbgrader"] = meta
        nb.cells.append(cell)

    nb.cells[3].metadata["nbgrader"]["schema_version"] = 2  # ex2_square, the answer cell
    nb.cells[6].metadata["nbgrader"]["solution"] = True  # ex3_mean_tests turned into an answer
    extra({"grade": True, "solution": False, "locked": True, "points": 1, "schema_version": 3})
    extra({"grade": True, "solution": False, "locked": True, "points": "ten", "grade_id": "bonus",
           "schema_version": 3})
    extra({"grade": True, "solution": True, "locked": False, "points": 5, "grade_id": "bonus2",
           "schema_version": 3})
    duplicate = copy.deepcopy(nb.cells[2])  # ex1_add_tests once more, emptied
    duplicate.source = "pass\n"
    duplicate["id"] = "duplicated-test-cell"
    nb.cells.append(duplicate)
    extra("not a mapping")
    extra({"grade": False, "solution": True, "locked": False, "grade_id": "<b>x</b>", "schema_version": 3})
    nb.cells.append(new_markdown_cell("### BEGIN HIDDEN TESTS\nnothing here"))
    return nb


def _submissions(release) -> dict[str, nbformat.NotebookNode]:
    code = new_code_cell
    return {
        "honest": solved(release),
        # IPython's history, printed in a cell of its own (cell 4) and from a test cell
        "histin": _insert(solved(release, ex3_mean=MEAN_PRINTS_CALLER), 3, code(PRINT_IN)),
        "histmagic": _insert(solved(release), 5, code(MAGIC)),
        # the history disguised: escaped HTML with tags inside, JSON, an image's alt text, an error
        "histhidden": _insert(solved(release), 3, code(HTML_OUT), code(JSON_OUT), code(ALT_OUT),
                              code(RAISE_OUT)),
        "bigtext": _insert(solved(release), 3, code(BIG_TEXT)),
        "bigimage": _insert(solved(release), 3, code(BIG_IMAGE)),
        "manycells": _insert(solved(release), 7, *[code(f"print('y' * {CELL_BYTES - 5000})\n")
                                                   for _ in range(MANY_CELLS)]),
        "markup": _insert(solved(release), 1, _hostile_markdown(), *[code(s) for s in MARKUP]),
        "malformed": _malformed(solved(release)),
        "failshidden": solved(release, ex1_add=WRONG_HIDDEN_ADD),
        "a-b@uni.edu": solved(release),  # the characters an id may have
    }


HOSTILE_FILES = ['=HYPERLINK("evil")_a.ipynb', "<img src=x onerror=n2lpwned()>_b.ipynb",
                 "+1-2_c.ipynb"]


def _grade(folder: Path) -> dict:
    course = make_course(folder / "course")
    assert run_grader("release", root=course).returncode == 0
    release = nbformat.read(course / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    subs = folder / "subs"
    for student, nb in _submissions(release).items():
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, str(subs / student / f"{CHAPTER}.ipynb"))
    for name in HOSTILE_FILES:
        nbformat.write(solved(release), str(subs / name))
    workspace = folder / "grading"
    result = run_grader("autograde", subs, "--chapter", CHAPTER, "--workspace", workspace, "--jobs", "2",
                        "--cell-timeout", "60", "--notebook-timeout", "150", root=course)
    report = run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, root=course)
    status = json.loads((workspace / "status" / f"{CHAPTER}.json").read_text())
    graded, feedback = {}, {}
    for student in status["records"]:
        path = workspace / "autograded" / student / CHAPTER / f"{CHAPTER}.ipynb"
        if path.exists():
            nb = json.loads(path.read_text())
            graded[student] = {"bytes": path.stat().st_size,
                               "outputs": json.dumps([c.get("outputs", []) for c in nb["cells"]])}
        page = workspace / "reports" / CHAPTER / "feedback" / f"{student}.html"
        if page.exists():
            feedback[student] = {"bytes": page.stat().st_size, "html": page.read_text()}
    reports = workspace / "reports" / CHAPTER
    return {
        "stdout": result.stdout, "stderr": result.stderr[-3000:], "report": report.returncode,
        "report_stderr": report.stderr[-3000:],
        "grades": read_grades(workspace, CHAPTER),
        "csv": (reports / "grades.csv").read_text() if (reports / "grades.csv").exists() else "",
        "summary": (reports / "summary.md").read_text() if (reports / "summary.md").exists() else "",
        "flags": {k: v.get("flags", []) for k, v in status["records"].items()},
        "messages": {k: v.get("message", "") for k, v in status["records"].items()},
        "graded": graded, "feedback": feedback,
    }


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "leaks", _grade)


def _row(batch, student):
    return batch["grades"][student]


def _flags(batch, student) -> list[str]:
    return batch["flags"][student]


class _Markup(HTMLParser):
    """What in an HTML page could run when it is opened."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found, self._script = [], False

    def handle_starttag(self, tag, attrs):
        if tag in ("iframe", "object", "embed", "svg", "math", "base", "form"):
            self.found.append(f"<{tag}>")
        for name, value in attrs:
            value = re.sub(r"\s+", "", (value or "")).lower()
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=...>")
            if name in ("href", "src", "action", "formaction", "xlink:href", "data") and \
                    value.startswith(("javascript:", "vbscript:", "data:text/html")):
                self.found.append(f"<{tag} {name}={value[:30]}>")
        self._script = tag == "script"

    def handle_endtag(self, tag):
        self._script = False

    def handle_data(self, data):
        if self._script and "n2lpwned" in data:
            self.found.append(f"<script>{data[:40]}")


def executable_markup(page: str) -> list[str]:
    parser = _Markup()
    parser.feed(page)
    return parser.found


def _visible_text(page: str) -> str:
    """The page as a reader sees it, without white space: tags out, entities decoded."""
    return re.sub(r"\s+", "", html.unescape(re.sub(r"<[^>]*>", "", page)))


# -- the batch --------------------------------------------------------------------------------------

def test_batch_ran(batch):
    assert batch["report"] == 0, batch["report_stderr"]
    assert set(batch["grades"]) == {"honest", "histin", "histmagic", "histhidden", "bigtext", "bigimage",
                                    "manycells", "markup", "malformed", "failshidden", "a-b@uni.edu"}, \
        batch["stdout"]


@pytest.mark.parametrize("student", ["honest", "histin", "histmagic", "histhidden", "bigtext", "bigimage",
                                     "manycells", "markup", "malformed", "a-b@uni.edu"])
def test_full_marks(batch, student):
    """None of these attacks changes a score: the answers are right."""
    row = _row(batch, student)
    assert (row["status"], row["score"]) == ("graded", str(MAX_SCORE)), (row, _flags(batch, student))


@pytest.mark.parametrize("student", ["honest", "a-b@uni.edu"])
def test_no_flags(batch, student):
    assert _flags(batch, student) == []


def test_history_printed_in_a_cell_and_from_a_test_cell(batch):
    assert _flags(batch, "histin") == [
        "suspicious: reads input history in cell 4, line 1",
        "suspicious: reads input history in ex3_mean, line 2",
        "leak: cell 4 printed hidden-test source; output removed",
        "leak: cell ex3_mean_tests printed hidden-test source; output removed",
    ]


def test_history_magic(batch):
    assert _flags(batch, "histmagic") == [
        "suspicious: reads input history in cell 6, line 1",
        "suspicious: IPython hooks (get_ipython) in cell 6, line 1",
        "leak: cell 6 printed hidden-test source; output removed",
    ]


def test_disguised_history(batch):
    """Escaped HTML with tags between the characters, JSON, an image's alt text, an error message."""
    assert _flags(batch, "histhidden") == [
        "suspicious: reads input history in cell 4, line 3",
        "suspicious: reads input history in cell 5, line 2",
        "suspicious: reads input history in cell 6, line 5",
        "suspicious: reads input history in cell 7, line 1",
        *[f"leak: cell {n} printed hidden-test source; output removed" for n in (4, 5, 6, 7)],
    ]


def test_huge_outputs_are_truncated(batch):
    assert _flags(batch, "bigtext") == [f"output over {CELL_BYTES} bytes in cell 4; truncated"]
    assert _flags(batch, "bigimage") == [f"output over {CELL_BYTES} bytes in cell 4; truncated"]
    # 25 cells of 95 kB: the notebook's cap stops the 22nd, and every later one
    assert _flags(batch, "manycells") == [f"output over {NOTEBOOK_BYTES} bytes in the notebook; "
                                          "truncated from cell 29 on"]
    for student in ("bigtext", "bigimage"):
        assert batch["graded"][student]["bytes"] < 2 * CELL_BYTES, batch["graded"][student]["bytes"]
        assert batch["feedback"][student]["bytes"] < 2 * CELL_BYTES + 400_000
        assert "bytes of output removed: over the limit of" in batch["feedback"][student]["html"]


def test_every_graded_notebook_and_page_is_bounded(batch):
    for student, graded in batch["graded"].items():
        assert graded["bytes"] < NOTEBOOK_BYTES + 200_000, (student, graded["bytes"])
    for student, page in batch["feedback"].items():
        assert page["bytes"] < NOTEBOOK_BYTES + 600_000, (student, page["bytes"])


def test_no_hidden_test_in_any_output_or_page(batch):
    assert batch["graded"] and batch["feedback"]
    for student, graded in batch["graded"].items():
        outputs = graded["outputs"]
        assert MARKER not in outputs, student
        squeezed = re.sub(r"\s+", "", outputs)
        assert not [line for line in HIDDEN if line in squeezed], student
    for student, page in batch["feedback"].items():
        assert MARKER not in page["html"], student
        text = _visible_text(page["html"])
        assert not [line for line in HIDDEN if line in text], student


def test_failing_hidden_test_shows_its_error_not_its_source(batch):
    row = _row(batch, "failshidden")
    assert row["ex1_add_tests"] == "0" and row["score"] == str(MAX_SCORE - 1), row
    assert _flags(batch, "failshidden") == [
        "note: ex1_add_tests failed in the kernel but its trusted check passed"]
    page = batch["feedback"]["failshidden"]["html"]
    text = _visible_text(page)
    assert "CheckFailed" in text and "add(-5,5):expected0,got1" in text, "the student learns what failed"
    assert "[hiddentestline]" in text and MARKER not in page


def test_feedback_runs_no_student_markup(batch):
    # the forged cell id would stop nbgrader: it is replaced, and the markup is graded
    assert _flags(batch, "markup") == ["integrity: invalid cell id in cell 2 replaced"]
    for student, page in batch["feedback"].items():
        assert executable_markup(page["html"]) == [], student
    markup = batch["feedback"]["markup"]["html"]
    assert "n2lpwned" in html.unescape(markup), "the student's text is still shown, inert"


def test_malformed_graded_cells_are_dropped_and_the_rest_graded(batch):
    flags = _flags(batch, "malformed")
    cleaned = [f for f in flags if "malformed graded cell" in f or "hidden-test markers" in f]
    assert cleaned == [
        "integrity: malformed graded cell 4 (ex2_square) repaired from the release "
        "(Outdated schema version: 2 (expected 3))",
        "integrity: malformed graded cell 7 (ex3_mean_tests) repaired from the release "
        "(ex3_mean_tests marked as another kind of cell (grade/solution changed))",
        "integrity: malformed graded cell 8 dropped (nbgrader cell does not have a grade_id: _extra = 1); "
        "it runs as a plain cell",
        "integrity: malformed graded cell 9 dropped ('ten' is not of type 'number'); it runs as a plain cell",
        "integrity: malformed graded cell 10 dropped (grade_id 'bonus2' is not in the release); "
        "it runs as a plain cell",
        "integrity: malformed graded cell 11 dropped (grade_id ex1_add_tests repeated); "
        "it runs as a plain cell",
        "integrity: malformed graded cell 12 dropped (its nbgrader metadata is not a mapping); "
        "it runs as a plain cell",
        "integrity: malformed graded cell 13 dropped ('<b>x</b>' does not match '^[a-zA-Z0-9_\\\\-]*$'); "
        "it runs as a plain cell",
        "integrity: hidden-test markers in cell 14 (not a test cell) renamed",
    ]
    assert "integrity: nbgrader metadata of ex3_mean_tests changed (solution)" in flags
    assert "integrity: cell ex1_add_tests appears 2 times" in flags


def test_hostile_ids_are_rejected_and_escaped(batch):
    summary = batch["summary"]
    assert summary.count("has characters other than letters") == len(HOSTILE_FILES)
    assert "<img" not in summary and "&lt;img src=x onerror=n2lpwned()&gt;" in summary
    assert "=HYPERLINK" in summary  # named, as text
    for line in batch["csv"].splitlines()[1:]:
        assert not line.startswith(("=", "+", "-", "@")), line
    assert "a-b@uni.edu" in batch["grades"]


# -- unit tests (no grading) ----------------------------------------------------------------------

def _flags_of(nb) -> list[str]:
    return [f for flags in nb.metadata[preprocessors.OUTPUT_FLAGS_KEY].values() for f in flags]


def _test_cell(grade_id: str, source: str, points: int = 1):
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "points": points,
                                 "grade_id": grade_id, "schema_version": 3}
    return cell


SECRET_LINE = "check_equal(add(-5, 5), 0, name='add(-5, 5)')  # SECRET-HIDDEN-TEST-ADD"
TEST_SOURCE = ("check_equal(add(1, 2), 3, name='add(1, 2)')\n### BEGIN HIDDEN TESTS\n"
               f"{SECRET_LINE}\nx = 1\ntorch.manual_seed(1234)\n### END HIDDEN TESTS\n")


def _png_with_text(text: str) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
           + chunk(b"tEXt", b"Comment\0" + text.encode()) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _scrubbed(cells: list, secret_files: list[str] = ()):
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata[preprocessors.OUTPUT_FLAGS_KEY] = {"ScrubHiddenTests": ["forged"], "Other": ["forged"]}
    ScrubHiddenTests(secret_files=list(secret_files)).preprocess(nb, {"nbgrader": {"assignment": "a"}})
    return nb


def test_scrub_every_kind_of_output():
    answer = new_code_cell("torch.manual_seed(1234)\n")  # the student wrote this line too
    answer.outputs = [new_output("stream", name="stdout", text="seed set: torch.manual_seed(1234)\n")]
    cells = [answer, _test_cell("t", TEST_SOURCE)]
    kinds = {
        "stream": new_output("stream", name="stdout", text=f"history: {SECRET_LINE}\n"),
        "html": new_output("display_data", data={"text/html": "<pre>" + html.escape(SECRET_LINE).replace(
            "(", "<i></i>(") + "</pre>", "text/plain": "<HTML>"}),
        "json": new_output("display_data", data={"application/json": {"h": [SECRET_LINE]}}),
        "alt": new_output("display_data", data={"image/png": _png_with_text("x")},
                          metadata={"image/png": {"alt": SECRET_LINE}}),
        "png": new_output("display_data", data={"image/png": _png_with_text(SECRET_LINE)}),
        "ansi": new_output("stream", name="stdout", text="\x1b[31mcheck_equal(add(-5,\x1b[0m 5), 0, "
                                                         "name='add(-5, 5)')\n"),
        "result": new_output("execute_result", data={"text/plain": repr(SECRET_LINE)}, execution_count=3),
    }
    for output in kinds.values():
        cell = new_code_cell("print(In)")
        cell.outputs = [output]
        cells.append(cell)
    nb = _scrubbed(cells)
    assert nb.cells[0].outputs[0].text.startswith("seed set"), "a line the student wrote is no secret"
    assert _flags_of(nb) == [f"leak: cell {n} printed hidden-test source; output removed"
                             for n in range(3, 3 + len(kinds))]
    assert MARKER not in json.dumps([c.outputs for c in nb.cells])
    assert nb.cells[-1].outputs[0].output_type == "execute_result"  # nbgrader reads it
    assert nb.metadata[preprocessors.OUTPUT_FLAGS_KEY] == {"ScrubHiddenTests": _flags_of(nb)}


def _traceback(*lines: str) -> list[str]:
    return ["\x1b[31m----\x1b[0m", "\x1b[31mCheckFailed\x1b[0m   Traceback (most recent call last)",
            "\n".join(lines), "\x1b[31mCheckFailed\x1b[0m: add(-5, 5): expected 0, got 1"]


def test_scrub_tracebacks():
    frame = ("\x1b[36mCell\x1b[39m In[2], line 3",
             "\x1b[32m      1\x1b[39m check_equal(add(\x1b[32m1\x1b[39m, 2), 3, name='add(1, 2)')",
             "\x1b[32m      2\x1b[39m \x1b[38;5;66m### BEGIN HIDDEN TESTS\x1b[39m",
             f"\x1b[32m----> \x1b[39m\x1b[32m3\x1b[39m {SECRET_LINE}",
             "\x1b[32m      4\x1b[39m x = 1")
    test = _test_cell("t", TEST_SOURCE)
    test.outputs = [new_output("error", ename="CheckFailed", evalue="add(-5, 5): expected 0, got 1",
                               traceback=_traceback(*frame))]
    student = new_code_cell("f()")
    student.outputs = [new_output("error", ename="RuntimeError", evalue=SECRET_LINE,
                                  traceback=_traceback(*frame))]
    nb = _scrubbed([test, student])
    error = nb.cells[0].outputs[0]
    text = "\n".join(error.traceback)
    assert (error.ename, error.evalue) == ("CheckFailed", "add(-5, 5): expected 0, got 1")
    assert MARKER not in text and "HIDDEN TESTS" not in text and "x = 1" not in text
    assert "----> 3 [hidden test line]" in text and "name='add(1, 2)'" in text
    # the same traceback in a student's cell, with the hidden line as its message, is a leak
    assert nb.cells[1].outputs[0].output_type == "error"
    assert MARKER not in json.dumps(nb.cells[1].outputs)
    assert _flags_of(nb) == ["leak: cell 2 printed hidden-test source; output removed"]


def test_scrub_secret_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "probes.py").write_text("Probe('ex1_add_tests', run=lambda ns, x: x)\nimport torch\n")
    cell = new_code_cell("print(open('/opt/n2l/probes.py').read())")
    cell.outputs = [new_output("stream", name="stdout", text="Probe('ex1_add_tests', run=lambda ns, x: x)\n")]
    short = new_code_cell("print('import torch')")
    short.outputs = [new_output("stream", name="stdout", text="import torch\n")]
    nb = _scrubbed([cell, short], [str(tmp_path / "{assignment}" / "probes.py")])
    assert _flags_of(nb) == ["leak: cell 1 printed hidden-test source; output removed"]
    assert nb.cells[1].outputs[0].text == "import torch\n", "too short to be a secret"


def _outputs_cell(*outputs, grade=False):
    cell = _test_cell("t", "pass") if grade else new_code_cell("pass")
    cell.outputs = list(outputs)
    return cell


def test_cap_per_cell_and_per_notebook():
    big = new_output("stream", name="stdout", text="x" * 300_000)
    image = new_output("display_data", data={"image/png": "A" * 200_000, "text/plain": "<Figure>"})
    error = new_output("error", ename="E", evalue="v" * 50_000, traceback=["t" * 10_000] * 40)
    result = new_output("execute_result", data={"text/plain": "r" * 200_000, "text/html": "h"},
                        execution_count=1)
    small = new_output("stream", name="stdout", text="ok\n")
    cells = [_outputs_cell(big), _outputs_cell(image), _outputs_cell(small, error, error),
             _outputs_cell(result, grade=True), _outputs_cell(small)]
    nb = nbformat.v4.new_notebook(cells=copy.deepcopy(cells))
    CapOutputs(max_cell_bytes=10_000, max_notebook_bytes=1_000_000).preprocess(nb, {})
    sizes = [len(json.dumps(c.outputs)) for c in nb.cells]
    assert all(size < 10_000 + 3_000 for size in sizes), sizes
    assert nb.cells[0].outputs[0].text.startswith("x" * 9_000)
    assert "bytes of output removed" in nb.cells[0].outputs[-1].text
    assert [o.output_type for o in nb.cells[2].outputs] == ["stream", "error", "stream"], \
        "one error kept (it fails a test cell), the second dropped"
    assert nb.cells[3].outputs[0].output_type == "execute_result" and \
        list(nb.cells[3].outputs[0].data) == ["text/plain"]
    assert nb.cells[4].outputs == [small]
    assert _flags_of(nb) == [f"output over 10000 bytes in cell {n}; truncated" for n in (1, 2, 3)] + \
        ["output over 10000 bytes in cell t; truncated"]
    nbformat.validate(nb)

    nb = nbformat.v4.new_notebook(cells=[_outputs_cell(new_output("stream", name="stdout", text="y" * 9_000))
                                         for _ in range(8)])
    CapOutputs(max_cell_bytes=10_000, max_notebook_bytes=40_000).preprocess(nb, {})
    assert sum(len(json.dumps(c.outputs)) for c in nb.cells) < 40_000 + 8 * 300
    assert _flags_of(nb) == ["output over 40000 bytes in the notebook; truncated from cell 5 on"]


def test_output_flags_read_back(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[_outputs_cell(new_output("stream", name="stdout", text="z" * 500))])
    nb.metadata[preprocessors.OUTPUT_FLAGS_KEY] = {"ScrubHiddenTests": ["forged leak"], "Mine": ["x"]}
    CapOutputs(max_cell_bytes=100).preprocess(nb, {})
    ScrubHiddenTests().preprocess(nb, {})
    nbformat.write(nb, str(tmp_path / "g.ipynb"))
    assert output_flags(tmp_path / "g.ipynb") == ["output over 100 bytes in cell 1; truncated"]
    assert output_flags(tmp_path / "missing.ipynb") == []


def test_history_reads_are_flagged():
    for source in ["print(In)", "x = _ih[-1]", "Out[2]", "_i3", "%history -n", "%hist", "%recall 2",
                   "get_ipython().history_manager.get_range()", "globals()['_ih']",
                   "import sys\nsys.modules['__main__'].In"]:
        assert "reads input history" in [what for _, what in scan_source(source)], source
    for source in ["for _ in range(3):\n    pass", "history = {'loss': []}", "model.history",
                   "x = In_features"]:
        assert "reads input history" not in [what for _, what in scan_source(source)], source


def test_clean_submission():
    from nbgrader.nbgraderformat import MetadataValidator

    release = source_notebook()
    submitted = _malformed(copy.deepcopy(release))
    with pytest.raises(Exception):  # noqa: B017 - nbgrader would stop on it
        MetadataValidator().validate_nb(copy.deepcopy(submitted))
    cleaned, flags = clean_submission(submitted, release)
    MetadataValidator().validate_nb(cleaned)
    assert len(flags) == 9 and submitted.cells[3].metadata["nbgrader"]["schema_version"] == 2, \
        "the submission itself is left as it was"
    assert cleaned.cells[3].metadata["nbgrader"] == release.cells[3].metadata["nbgrader"]
    assert [c.source for c in cleaned.cells[7:13]] == [c.source for c in submitted.cells[7:13]], \
        "dropped cells still run"
    assert "BEGIN HIDDEN TESTS" not in cleaned.cells[13].source
    assert clean_submission(release, release) == (release, [])
    forged_id = copy.deepcopy(release)
    forged_id.cells[0]["id"] = 'x" onclick="f()'
    repaired, flags = clean_submission(forged_id, release)
    assert flags == ["integrity: invalid cell id in cell 1 replaced"]
    nbformat.validate(repaired)
    escaped = copy.deepcopy(release)
    escaped.cells[2].metadata["nbgrader"]["grade_id"] = "x\x1b[2J"  # a terminal escape
    flags = clean_submission(escaped, release)[1] + submission_flags(escaped, release)
    assert flags and not [f for f in flags if "\x1b" in f] and "x\\x1b[2J" in flags[0], flags
    escaped.cells[2].metadata["nbgrader"]["grade_id"] = ["not", "a", "string"]
    assert "not of type 'string'" in clean_submission(escaped, release)[1][0]
    assert submission_flags(escaped, release)  # reads it without failing
    forged = copy.deepcopy(release)
    forged.metadata[preprocessors.OUTPUT_FLAGS_KEY] = {"CapOutputs": ["x"]}
    assert preprocessors.OUTPUT_FLAGS_KEY not in clean_submission(forged, release)[0].metadata
    assert submission_flags(release, release) == []


def test_report_escapes():
    for text in ['=HYPERLINK("http://evil")', "+1", "-1", "@SUM(A1)", " =1", "\tx"]:
        assert csv_text(text).startswith("'"), text
    assert csv_text("alice") == "alice" and csv_text("integrity: x") == "integrity: x"
    assert _md("<img src=x onerror=f()> [a](javascript:f()) `x`\nnext") == \
        "&lt;img src=x onerror=f()&gt; \\[a\\](javascript:f()) \\`x\\` next"


def test_config_runs_the_output_preprocessors_after_execution_and_sanitises_feedback():
    order = re.search(r"autograde_preprocessors = \[(.*?)\]", CONFIG_TEMPLATE, re.S).group(1).split(",")
    order = [name.strip() for name in order if name.strip()]
    assert order.index("Execute") < order.index("CapOutputs") < order.index("ScrubHiddenTests") \
        < order.index("SaveAutoGrades")
    assert "c.HTMLExporter.sanitize_html = True" in CONFIG_TEMPLATE


def test_nbconvert_sanitises_the_feedback_template():
    """What the batch checks end to end, here on nbconvert alone (HTMLExporter.sanitize_html)."""
    from nbconvert import HTMLExporter

    cells = [new_markdown_cell(MARKDOWN_CELL)]
    for data in ({"text/html": "<script>n2lpwned()</script><img src=x onerror=n2lpwned()>"},
                 {"text/markdown": "[a](javascript:n2lpwned())"},
                 {"image/svg+xml": "<svg onload=n2lpwned()><script>n2lpwned()</script></svg>"},
                 {"application/javascript": "n2lpwned()"}):
        cells.append(_outputs_cell(new_output("display_data", data=data)))
    nb = nbformat.v4.new_notebook(cells=cells)
    page, _ = HTMLExporter(template_name="classic", sanitize_html=True).from_notebook_node(nb)
    assert executable_markup(page) == []
    unsafe, _ = HTMLExporter(template_name="classic").from_notebook_node(nb)
    assert executable_markup(unsafe), "the check itself finds markup that runs"
