"""nbgrader preprocessors the course adds to autograding."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Integer, List, Unicode

from grader.course import nbgrader_meta


class StderrIsNotAFailure(NbGraderPreprocessor):
    """Keep text a cell wrote to stderr, but as stdout, so it cannot cost points.

    nbgrader scores a test cell 0 when it printed *anything* on stderr, so a harmless PyTorch
    ``UserWarning`` or a tqdm progress bar would fail an honest student. Exceptions are
    ``error`` outputs, not stderr, and still fail the cell. Runs right after execution.
    """

    def preprocess_cell(self, cell: NotebookNode, resources: dict, index: int):
        if cell.cell_type == "code":
            for output in cell.get("outputs", []):
                if output.get("output_type") == "stream" and output.get("name") == "stderr":
                    output["name"] = "stdout"
                    output["text"] = "".join(
                        f"[stderr] {line}" for line in output.get("text", "").splitlines(True)
                    )
        return cell, resources


# -- outputs: byte caps and hidden-test scrubbing (after Execute) -------------------------------
#
# Both run inside the nbgrader process, before nbgrader saves the graded notebook, and record
# what they did in the graded notebook's metadata (OUTPUT_FLAGS_KEY), which the grader reads
# back with :func:`output_flags`.

OUTPUT_FLAGS_KEY = "n2l_output_flags"
HIDDEN_BEGIN, HIDDEN_END = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
TAG = re.compile(r"<[^<>]*>")
SPACE = re.compile(r"\s+")
BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
# A traceback line that shows source: "----> 4 code", "      5 code" (IPython).
SOURCE_LINE = re.compile(r"^(\s*(?:-*>\s*)?\d+\s)(.*)$")
HIDDEN_LINE_NOTE = "[hidden test line]"
LEAK_NOTE = "[output removed: it contained hidden-test source]"


def _record(nb: NotebookNode, name: str, flags: list[str]) -> None:
    """Store one preprocessor's flags in the notebook (replacing whatever the submission had)."""
    store = nb.metadata.get(OUTPUT_FLAGS_KEY)
    store = {k: v for k, v in store.items() if k in _RECORDERS} if isinstance(store, dict) else {}
    store[name] = list(flags)
    nb.metadata[OUTPUT_FLAGS_KEY] = store


def output_flags(graded_notebook_path) -> list[str]:
    """The flags :class:`CapOutputs` and :class:`ScrubHiddenTests` left in a graded notebook."""
    try:
        metadata = json.loads(Path(graded_notebook_path).read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return []
    store = metadata.get(OUTPUT_FLAGS_KEY) if isinstance(metadata, dict) else None
    if not isinstance(store, dict):
        return []
    flags = []
    for name in _RECORDERS:
        found = store.get(name, [])
        flags += [str(f) for f in found] if isinstance(found, list) else []
    return flags


def _label(cell: NotebookNode, index: int) -> str:
    grade_id = nbgrader_meta(cell).get("grade_id")
    return f"cell {grade_id}" if isinstance(grade_id, str) and grade_id else f"cell {index + 1}"


def _is_grade_cell(cell: NotebookNode) -> bool:
    """Whether nbgrader scores a cell (its own ``utils.is_grade``): a test cell, and also a cell
    both grade and solution, which :func:`grader.course.cell_role` calls "other". nbgrader reads
    the ``text/plain`` of any such cell's result, and its hidden lines are its own."""
    return bool(nbgrader_meta(cell).get("grade"))


def _strings(value) -> Iterator[str]:
    """Every string inside an output (texts, mime bundles, JSON data, metadata such as alt text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _nbytes(value) -> int:
    return sum(len(s.encode("utf-8", "surrogatepass")) for s in _strings(value))


def _truncate(text: str, limit: int) -> str:
    """At most ``limit`` bytes of ``text`` (UTF-8), cut on a character boundary."""
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= limit else data[:max(limit, 0)].decode("utf-8", "ignore")


def _note(text: str) -> NotebookNode:
    return NotebookNode({"output_type": "stream", "name": "stdout", "text": text})


class CapOutputs(NbGraderPreprocessor):
    """Cap the bytes of output kept per cell and per notebook.

    Counted over everything an output holds (text, every mime type of a bundle, images as their
    base64 text, metadata). What is over a cap is cut: text is truncated, other mime types are
    dropped, and a note in the cell says how much; an error is kept (shortened), since an error
    is what fails a test cell, and an ``execute_result`` keeps a ``text/plain`` (nbgrader reads
    it for partial credit). Runs right after execution, before the notebook is saved.
    """

    max_cell_bytes = Integer(100_000, help="bytes of output kept per cell").tag(config=True)
    max_notebook_bytes = Integer(2_000_000, help="bytes of output kept per notebook").tag(config=True)

    def preprocess(self, nb: NotebookNode, resources: dict):
        used_notebook, flags, notebook_flagged = 0, [], False
        for index, cell in enumerate(nb.cells):
            if cell.get("cell_type") != "code" or not cell.get("outputs"):
                continue
            budget = max(0, min(self.max_cell_bytes, self.max_notebook_bytes - used_notebook))
            kept, used, dropped, has_error = [], 0, 0, False
            for output in cell.outputs:
                size = _nbytes(output)
                is_error = output.get("output_type") == "error"
                if used + size <= budget:
                    kept.append(output)
                    used += size
                    has_error |= is_error
                    continue
                # one error is enough to fail a test cell: more are dropped like other outputs
                small = None if is_error and has_error else self._shrink(output, budget - used,
                                                                         _is_grade_cell(cell))
                has_error |= is_error
                dropped += size - (_nbytes(small) if small is not None else 0)
                if small is not None:
                    kept.append(small)
                    used += _nbytes(small)
            if dropped > 0:
                over_notebook = budget < self.max_cell_bytes
                limit = (f"{self.max_notebook_bytes} bytes per notebook" if over_notebook
                         else f"{self.max_cell_bytes} bytes per cell")
                kept.append(_note(f"\n[{dropped} bytes of output removed: over the limit of {limit}]\n"))
                if not over_notebook:
                    flags.append(f"output over {self.max_cell_bytes} bytes in {_label(cell, index)}; "
                                 "truncated")
                elif not notebook_flagged:  # once: every later cell with output is cut too
                    flags.append(f"output over {self.max_notebook_bytes} bytes in the notebook; "
                                 f"truncated from {_label(cell, index)} on")
                    notebook_flagged = True
            cell.outputs = kept
            used_notebook += used
        _record(nb, type(self).__name__, flags)
        return nb, resources

    @staticmethod
    def _shrink(output: NotebookNode, room: int, grade_cell: bool) -> NotebookNode | None:
        """What fits of ``output`` in ``room`` bytes; None to drop it. An error is always kept."""
        kind = output.get("output_type")
        if kind == "error":
            tail = [_truncate(str(line), 1000) for line in output.get("traceback", [])[-3:]]
            return NotebookNode({"output_type": "error",
                                 "ename": _truncate(str(output.get("ename", "")), 200),
                                 "evalue": _truncate(str(output.get("evalue", "")), 1000),
                                 "traceback": ["[traceback truncated]", *tail]})
        if kind == "stream":
            if room < 200:
                return None
            return NotebookNode({"output_type": "stream", "name": output.get("name", "stdout"),
                                 "text": _truncate(str(output.get("text", "")), room - 100)})
        if kind in ("display_data", "execute_result"):
            if room < 200 and not (grade_cell and kind == "execute_result"):
                return None
            data = output.get("data", {})
            plain = data.get("text/plain", "") if isinstance(data, dict) else ""
            plain = "".join(plain) if isinstance(plain, list) else str(plain)
            text = _truncate(plain, room - 100) if room >= 200 else ""
            shrunk = NotebookNode({"output_type": kind, "metadata": {},
                                   "data": {"text/plain": text or "[output removed]"}})
            if kind == "execute_result":
                shrunk["execution_count"] = output.get("execution_count")
            return shrunk
        return None


def _normalised(text: str) -> list[str]:
    """``text`` as it may show: without ANSI colours or white space, and with HTML decoded."""
    plain = ANSI.sub("", text)
    variants = [SPACE.sub("", plain)]
    if "&" in plain or "<" in plain:
        variants.append(SPACE.sub("", html.unescape(plain)))
        variants.append(SPACE.sub("", html.unescape(TAG.sub("", plain))))
    if len(text) >= 64 and BASE64.fullmatch(text):  # base64 (images): PNG text chunks, say
        try:
            variants.append(SPACE.sub("", base64.b64decode(text).decode("latin-1")))
        except (ValueError, TypeError):
            pass
    return variants


def hidden_test_lines(nb: NotebookNode) -> tuple[list[str], set[str]]:
    """``(hidden lines of the test cells, every other line without white space)``.

    A line that is also visible somewhere (a visible test, the student's own code) is no secret:
    printing it leaks nothing, and a traceback through the student's code keeps it.
    """
    hidden, visible = [], set()
    for cell in nb.cells:
        grade, inside = _is_grade_cell(cell), False
        for line in cell.get("source", "").splitlines():
            if grade and HIDDEN_BEGIN in line:
                inside = True
            elif grade and HIDDEN_END in line:
                inside = False
            elif inside:
                hidden.append(line)
            else:
                visible.add(SPACE.sub("", line))
    return hidden, visible


class ScrubHiddenTests(NbGraderPreprocessor):
    """Remove hidden-test source (and other secret files' lines) from every output.

    nbgrader has put the hidden tests back into the notebook it runs, so a cell can print them
    (IPython's ``In``/``_ih``, ``%history``, a traceback). An output holding one of their lines
    (``min_length`` characters or more without white space; ANSI colours, HTML tags and
    entities, base64 are seen through) is replaced with a note and the cell is flagged. The one
    natural case is a traceback in a test cell, which shows the failing hidden line: such lines
    become ``[hidden test line]`` with no flag, and the error's name and message stay.
    """

    min_length = Integer(16, help="shortest secret line (without white space) searched for"
                         ).tag(config=True)
    secret_files = List(Unicode(), help="more files whose lines are secret; '{assignment}' is "
                        "replaced with the assignment's name").tag(config=True)

    def preprocess(self, nb: NotebookNode, resources: dict):
        hidden, visible = hidden_test_lines(nb)
        assignment = str((resources.get("nbgrader") or {}).get("assignment", ""))
        secret = list(hidden)
        for pattern in self.secret_files:
            try:
                secret += Path(pattern.replace("{assignment}", assignment)).read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                pass
        self.scrub(nb, secret, hidden, visible)
        return nb, resources

    def scrub(self, nb: NotebookNode, secret: list[str], hidden: list[str], visible: set[str]) -> None:
        self._needles = self._secret_needles(secret, visible)
        # in tracebacks every hidden line goes, however short, and the markers too
        self._exact = {SPACE.sub("", line) for line in hidden} - visible - {""}
        flags = []
        for index, cell in enumerate(nb.cells):
            if cell.get("cell_type") == "code" and cell.get("outputs") and self._scrub_outputs(cell):
                flags.append(f"leak: {_label(cell, index)} printed hidden-test source; output removed")
        _record(nb, type(self).__name__, flags)

    def _secret_needles(self, secret: list[str], visible: set[str]) -> list[str]:
        """What is searched for in outputs: each secret line, its code and its comment, without
        white space, when ``min_length`` long and not visible elsewhere."""
        needles = set()
        for line in secret:
            for part in (line, *line.split("#", 1)):  # a line, its code and its comment
                squeezed = SPACE.sub("", part)
                if len(squeezed) >= self.min_length and squeezed not in visible:
                    needles.add(squeezed)
        return sorted(needles)

    def _scrub_outputs(self, cell: NotebookNode) -> bool:
        """Scrub one code cell's outputs in place; True when one of them leaked."""
        leaked, outputs = False, []
        for output in cell.outputs:
            if output.get("output_type") == "error":
                output, leak = self._scrub_error(output, _is_grade_cell(cell))
                leaked |= leak
            elif self._contains_secret(output):
                leaked = True
                output = self._replacement(output)
            outputs.append(output)
        cell.outputs = outputs
        return leaked

    def _contains_secret(self, value) -> bool:
        return bool(self._needles) and any(
            needle in variant for text in _strings(value) for variant in _normalised(text)
            for needle in self._needles)

    def _scrub_error(self, output: NotebookNode, grade_cell: bool) -> tuple[NotebookNode, bool]:
        """Hidden lines out of a traceback; True when that is a leak (not a test cell's own)."""
        leaked = False
        markers = (HIDDEN_BEGIN.replace(" ", ""), HIDDEN_END.replace(" ", ""))
        traceback = []
        for entry in output.get("traceback", []):
            lines = []
            for line in str(entry).split("\n"):
                plain = ANSI.sub("", line)
                match = SOURCE_LINE.match(plain)
                code = SPACE.sub("", match.group(2) if match else plain)
                secret = self._contains_secret(plain)
                if secret or (code and (code in self._exact or any(m in code for m in markers))):
                    leaked |= secret and not grade_cell
                    line = (match.group(1) if match else "") + HIDDEN_LINE_NOTE
                lines.append(line)
            traceback.append("\n".join(lines))
        output["traceback"] = traceback
        for key in ("ename", "evalue"):
            if self._contains_secret(str(output.get(key, ""))):
                output[key] = LEAK_NOTE
                leaked = True
        return output, leaked

    @staticmethod
    def _replacement(output: NotebookNode) -> NotebookNode:
        if output.get("output_type") == "execute_result":  # nbgrader reads its text/plain
            return NotebookNode({"output_type": "execute_result", "data": {"text/plain": LEAK_NOTE},
                                 "metadata": {}, "execution_count": output.get("execution_count")})
        return _note(LEAK_NOTE + "\n")


_RECORDERS = (CapOutputs.__name__, ScrubHiddenTests.__name__)


# -- feedback: markdown cells -------------------------------------------------------------------

MARKDOWN_TAGS = {"a", "abbr", "b", "blockquote", "br", "caption", "code", "dd", "del", "div", "dl", "dt",
                 "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre",
                 "s", "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
                 "ul"}
SAFE_IMAGE = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*$")


def _markdown_attribute(tag: str, name: str, value: str) -> bool:
    if name in ("class", "title", "alt", "align", "colspan", "rowspan", "width", "height"):
        return True
    if name == "id":
        return tag in ("h1", "h2", "h3", "h4", "h5", "h6")
    if tag == "a" and name == "href":
        return value.startswith(("http://", "https://", "mailto:", "#"))
    if tag == "img" and name == "src":
        return value.startswith(("http://", "https://")) or bool(SAFE_IMAGE.match(value))
    return False


def clean_markdown_html(text: str) -> str:
    """HTML rendered from Markdown, with nothing left that runs: an allow-list of tags (headings,
    lists, tables, code, images, links) and attributes; links only to http(s), mailto and
    anchors, images only from http(s) or inline PNG/JPEG/GIF/WebP. Anything else is escaped."""
    import bleach

    return bleach.clean(text, tags=MARKDOWN_TAGS, attributes=_markdown_attribute,
                        protocols=["http", "https", "mailto", "data"], strip_comments=True)


class SanitizeMarkdownCells(NbGraderPreprocessor):
    """Feedback: markdown cells as cleaned HTML (nbgrader's feedback template renders them raw,
    whatever ``HTMLExporter.sanitize_html`` says; it cleans only outputs).

    Each markdown cell is rendered here as the template would (same renderer, attachments
    inlined), cleaned (:func:`clean_markdown_html`), and put back as one line of HTML in a
    ``<div>``: a Markdown HTML block, which the template's renderer passes through untouched.
    """

    def preprocess_cell(self, cell: NotebookNode, resources: dict, index: int):
        if cell.get("cell_type") == "markdown":
            from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

            renderer = IPythonRenderer(escape=False, allow_harmful_protocols=False,
                                       attachments=cell.get("attachments", {}))
            rendered = MarkdownWithMath(renderer=renderer).render(cell.get("source", ""))
            clean = clean_markdown_html(rendered).replace("\r", "").replace("\n", "&#10;")
            cell.source = f"<div>{clean}</div>"
            cell.pop("attachments", None)
        return cell, resources
