"""Code similarity: every student's answers against every other student's and course_lib's source.

``report`` runs this each time it writes a report (nothing is stored by ``autograde``); the
flags are leads for a human, like the other flags. The comparison is copydetect's
(https://github.com/blingenf/copydetect): code is tokenised (names become ``V``/``F``/``O``,
strings ``S``, comments and whitespace are dropped), so renamed variables, changed comments and
re-indentation do not hide a copy; then k-grams of the tokens are hashed and winnowed
(Schleimer, Wilkerson and Aiken, SIGMOD 2003) and two files share code where they share hashes.

1. **Answers.** Each student's answer cells (code cells whose nbgrader metadata has
   ``solution: true`` and ``grade: false``) are read from
   ``submitted/<student>/<chapter>/<chapter>.ipynb``. A notebook that cannot be read is left out
   (its status record already says why).
2. **Boilerplate.** The release's answer cells (the starter code: signatures, docstrings,
   ``raise NotImplementedError()``) go into copydetect's boilerplate folder: what every student
   was given never counts as shared, so two blank submissions have nothing in common.
3. **References.** Every top-level function and class of ``course_lib/*.py`` becomes one file,
   so that a match is named ``course_lib.<module>.<function>``. All of course_lib is used (about
   360 references, not only the chapter's module): for 300 submissions of ch03 it costs about
   5 s of 11 (benchmarks/similarity.py), and it also catches code pasted from another chapter's
   module.
4. **Comparison**, two ``CopyDetector`` runs in a temporary folder, whose files are named by
   position, never by student id (an id may hold any character):
   a. each student's answers, as one ``.py`` file, against every other student's;
   b. each answer cell, as one ``.py`` file, against every course_lib reference (a pasted
      function is most of one cell but a small part of a whole submission).
5. **Flags.** Two students are flagged ``similar to <student> (NN%)``, each on the other, when
   NN% (the larger of the two shares: how much of one student's answer code, starter code
   excluded, is also in the other's) reaches ``Thresholds.students`` and they have at least
   ``Thresholds.min_overlap`` characters of tokenised code in common. A student is flagged
   ``matches course_lib.<module>.<function> (NN%)`` when, for one answer cell, NN% (the larger
   of: the share of the cell found in the function, the share of the function found in the cell)
   reaches ``Thresholds.course_lib``, with the same minimum overlap. A student similar to many
   others keeps the ``most_per_student`` highest and one ``similar to N more students`` flag.
6. **Page.** ``reports/<chapter>/similarity.html`` shows each flagged pair with the passages
   they share highlighted, side by side; every student id and all code are escaped.

The minimum overlap is what keeps honest students apart: an exercise whose answer is three short
lines has one natural way to be written (``residual = pred - target`` ...), and everyone who
writes it matches everyone else and course_lib, whatever the share. Only code longer than that
(several statements, several exercises, a whole pasted function) can flag.
"""

from __future__ import annotations

import ast
import hashlib
import html
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from grader.course import cell_role, cell_source, nbgrader_meta

# copydetect's thresholds count characters of *tokenised* code, which is short: the solution of
# a three-line exercise (`residual = pred - target` ...) tokenises to 50-150 characters, e.g.
# `V=V-VV=V.V()V=V.V(V<=V,0.5*V**2,V*(V-0.5*V))returnV.V()`. copydetect's default noise
# threshold (25) would need a match of half such an answer before it sees anything, so
# NOISE_T = 15: a shared run of 15 tokenised characters is about one short statement
# (`V=V.V(V,V=V).V()`), long enough that `returnV+V` (`return a + b`) alone is never a match.
# Runs this short are common between honest answers; what flags a pair is the share and the
# minimum overlap in Thresholds, not a single k-gram. GUARANTEE_T = 20 (winnowing window 6):
# any shared run of 20 characters is always found, and with a window this small the files keep
# about 2 in 7 of their k-grams, which costs nothing at this size and keeps the shares precise.
NOISE_T = 15
GUARANTEE_T = 20


@dataclass(frozen=True)
class Thresholds:
    """When a similarity becomes a flag (see the module's docstring, step 5)."""

    # Measured on chapter 3 (tests/test_similarity.py: the solution, hand-written honest answers,
    # copies, pasted course_lib functions) and on every chapter's solution and wrong-answer
    # fixtures: a copy with renamed variables and new comments scores 100%, a pasted course_lib
    # function 100% with 140-400 characters in common. An honest submission of two short ch03
    # answers written the natural way scores 68% against the solution with 84 characters in
    # common, and two one-line answers (`return (counts + alpha) / ...`) 100% with 40-60.
    # Hence 70% and 120 characters (about eight short statements: more than two of ch03's short
    # answers, less than one pasted function). Two blank submissions share nothing.
    students: float = 0.7  # share of answer code in common between two students
    course_lib: float = 0.7  # share of one answer cell / of a course_lib function in common
    min_overlap: int = 120  # characters of tokenised code in common
    most_per_student: int = 3  # "similar to" flags per student before "... N more"

    def __post_init__(self) -> None:
        for name in ("students", "course_lib"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"the {name} similarity threshold must be in (0, 1]")
        if self.min_overlap < 0 or self.most_per_student < 1:
            raise ValueError("min_overlap must be >= 0 and most_per_student >= 1")


DEFAULT_THRESHOLDS = Thresholds()


@dataclass
class Match:
    """One flagged pair: a student and another student or a course_lib reference."""

    student: str
    other: str  # a student id, or "course_lib.<module>.<name>"
    kind: str  # "student" or "course_lib"
    similarity: float  # the flag's number (see the module's docstring)
    shares: tuple[float, float]  # share of the student's code, share of the other's
    overlap: int  # characters of tokenised code in common
    cell: str = ""  # for a course_lib match: the student's answer cell (grade_id)
    code: tuple[str, str] = ("", "")  # both sides as HTML, the matching passages highlighted


@dataclass
class Result:
    flags: dict[str, list[str]] = field(default_factory=dict)
    matches: list[Match] = field(default_factory=list)  # the pairs behind the flags
    students: int = 0  # submissions compared
    references: int = 0  # course_lib functions and classes compared
    pairs_above: int = 0  # student pairs over the thresholds, shown or not


# -- inputs ------------------------------------------------------------------------------------

def answer_cells(notebook: Path | nbformat.NotebookNode) -> dict[str, str]:
    """``{grade_id: source}`` of a notebook's answer cells, in notebook order. Not
    :func:`grader.course.cells_with_role`: a submitted answer cell whose grade_id is missing or
    not a string is still compared, as ``cell N`` or its grade_id's text."""
    nb = notebook if isinstance(notebook, nbformat.NotebookNode) else nbformat.read(
        notebook, as_version=4)
    cells = {}
    for i, cell in enumerate(nb.cells):
        if cell_role(cell) == "answer":
            cells[str(nbgrader_meta(cell).get("grade_id") or f"cell {i}")] = cell_source(cell)
    return cells


def _header(grade_id: str) -> str:
    """A comment naming an answer cell in the files compared (comments never match)."""
    return f"# ---- {' '.join(str(grade_id).split())} ----\n"


def as_file(cells: dict[str, str], starter: dict[str, str]) -> str:
    """Answer cells as one Python file, each after a comment naming it; cells left as the
    starter code are only named (they share nothing anyway, and the page stays short)."""
    return "".join(_header(grade_id) + ("# (starter code, unchanged)\n\n" if source == starter.get(grade_id)
                                        else f"{source}\n\n")
                   for grade_id, source in cells.items())


def course_lib_references(course_lib: Path) -> dict[str, str]:
    """``{"course_lib.<module>.<name>": source}`` for each top-level function and class."""
    refs = {}
    for path in sorted(Path(course_lib).glob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                refs[f"course_lib.{path.stem}.{node.name}"] = "".join(lines[start - 1:node.end_lineno])
    return refs


# -- comparison --------------------------------------------------------------------------------

def _stable_hashed_kgrams(string: str, k: int):
    """copydetect's ``utils.hashed_kgrams`` with a hash that is the same in every process.

    copydetect hashes k-grams with Python's ``hash()``, which is salted per process
    (PYTHONHASHSEED): winnowing then keeps other fingerprints on each run, and a pair near a
    threshold can be flagged by one report and not by the next. A 64-bit BLAKE2b of each k-gram
    makes the report reproducible; the winnowing and comparison stay copydetect's.
    """
    import numpy as np

    return np.array([int.from_bytes(hashlib.blake2b(string[i:i + k].encode(), digest_size=8).digest(),
                                    "little", signed=True) for i in range(len(string) - k + 1)],
                    dtype=np.int64)


@contextmanager
def _reproducible():
    from copydetect import utils

    original = getattr(utils, "hashed_kgrams", None)
    if original is None:  # another copydetect version: its own hashes (runs may differ slightly)
        yield
        return
    utils.hashed_kgrams = _stable_hashed_kgrams
    try:
        yield
    finally:
        utils.hashed_kgrams = original


def _detect(folder: Path, tests: dict, refs: dict, boilerplate: str):
    """Run copydetect on ``tests`` against ``refs`` (label -> code; the same dict for "each other").

    Returns the detector, the file path of each label and the label of each file path. Files are
    named by position; labels (student ids, course_lib names) never reach a path.
    """
    from copydetect import CopyDetector

    paths: dict = {}
    for kind, group in (("test", tests), ("ref", refs)):
        (folder / kind).mkdir(parents=True)
        for i, (name, code) in enumerate(group.items()):
            if name not in paths:
                path = folder / kind / f"{i:05d}.py"
                path.write_text(code, encoding="utf-8", errors="replace")  # copydetect reads UTF-8
                paths[name] = str(path)
    (folder / "boilerplate").mkdir()
    (folder / "boilerplate" / "release.py").write_text(boilerplate, encoding="utf-8", errors="replace")
    ref_dirs = [str(folder / "test")] if refs is tests else [str(folder / "ref")]
    detector = CopyDetector(test_dirs=[str(folder / "test")], ref_dirs=ref_dirs,
                            boilerplate_dirs=[str(folder / "boilerplate")], extensions=["py"],
                            noise_t=NOISE_T, guarantee_t=GUARANTEE_T, display_t=0.0, silent=True,
                            autoopen=False, out_file=str(folder / "unused.html"))
    detector.run()
    return detector, paths, {path: name for name, path in paths.items()}


def _pairs(detector, min_overlap: int):
    """``(test file, ref file, share of test, share of ref, overlap)`` of the pairs with at least
    ``min_overlap`` characters of tokenised code in common, each unordered pair once.

    The overlap is the smaller of the two sides' counts (share x the file's fingerprinted
    length): copydetect's own matrix holds the count of whichever file it compared first, and
    its file order changes from run to run.
    """
    sims, overlaps = detector.similarity_matrix, detector.token_overlap_matrix
    if len(sims) == 0:
        return
    done = set()
    rows, cols = (overlaps > 0).nonzero()  # -1 is a pair copydetect skipped (a file with itself)
    for i, j in zip(rows, cols, strict=True):
        test_f, ref_f = detector.test_files[i], detector.ref_files[j]
        if (ref_f, test_f) in done:
            continue
        done.add((test_f, ref_f))
        mine, theirs = float(sims[i, j, 0]), float(sims[i, j, 1])
        overlap = round(min(mine * detector.file_data[test_f].token_coverage,
                            theirs * detector.file_data[ref_f].token_coverage))
        if overlap >= min_overlap:
            yield test_f, ref_f, mine, theirs, overlap


def _highlighted(detector, test_f: str, ref_f: str) -> tuple[str, str]:
    """Both files as escaped HTML with the passages they share in ``<mark>``."""
    from copydetect.utils import highlight_overlap

    if (test_f, ref_f) in detector.slice_matrix:
        mine, theirs = detector.slice_matrix[(test_f, ref_f)]
    else:
        theirs, mine = detector.slice_matrix[(ref_f, test_f)]
    left, _ = highlight_overlap(detector.file_data[test_f].raw_code, mine, "<mark>", "</mark>",
                                escape_html=True)
    right, _ = highlight_overlap(detector.file_data[ref_f].raw_code, theirs, "<mark>", "</mark>",
                                 escape_html=True)
    return left, right


def compare(answers: dict[str, dict[str, str]], starter: dict[str, str], references: dict[str, str],
            thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Result:
    """Flags and matches for ``answers`` (student -> {grade_id: source}).

    ``starter`` is the release's answer cells (boilerplate), ``references`` the course_lib code
    (:func:`course_lib_references`). Two copydetect runs: every student's whole answers against
    every other student's; each answer cell on its own against every reference (a pasted
    function is most of one cell, but a small part of a whole submission).
    """
    result = Result(flags={s: [] for s in answers}, students=len(answers), references=len(references))
    if not answers:
        return result
    boilerplate = "".join(f"{source}\n\n" for source in starter.values())
    with tempfile.TemporaryDirectory(prefix="n2l-similarity-") as tmp, _reproducible():
        if len(answers) > 1:
            _compare_students(answers, starter, boilerplate, Path(tmp) / "students", thresholds, result)
        _compare_with_course_lib(answers, starter, references, boilerplate, Path(tmp) / "course_lib",
                                 thresholds, result)
    result.matches.sort(key=lambda m: (m.kind != "student", -m.similarity, m.student, m.other))
    return result


def _compare_students(answers: dict[str, dict[str, str]], starter: dict[str, str], boilerplate: str,
                      folder: Path, thresholds: Thresholds, result: Result) -> None:
    """Step 1: every student's answers, as one file, against every other student's. Adds the
    flags, the matches behind them and the count of pairs over the thresholds to ``result``."""
    files = {student: as_file(cells, starter) for student, cells in sorted(answers.items())}
    detector, paths, label = _detect(folder, files, files, boilerplate)
    pairs: dict[str, list[Match]] = {s: [] for s in answers}  # each pair under both students
    for test_f, ref_f, mine, theirs, overlap in _pairs(detector, thresholds.min_overlap):
        if max(mine, theirs) >= thresholds.students:
            (a, share_a), (b, share_b) = sorted([(label[test_f], mine), (label[ref_f], theirs)])
            match = Match(a, b, "student", max(mine, theirs), (share_a, share_b), overlap)
            pairs[a].append(match)
            pairs[b].append(match)
    result.pairs_above = sum(len(found) for found in pairs.values()) // 2
    shown: dict[int, Match] = {}  # a pair shown for either student is on the page once
    for student, found in pairs.items():
        for match in _flag_most_similar(student, found, thresholds.most_per_student, result.flags[student]):
            shown[id(match)] = match
    for match in shown.values():
        match.code = _highlighted(detector, paths[match.student], paths[match.other])
        result.matches.append(match)


def _flag_most_similar(student: str, found: list[Match], most: int, flags: list[str]) -> list[Match]:
    """Flag ``student``'s ``most`` most similar students (and how many more there are); the
    matches flagged."""
    def other_of(m: Match) -> str:
        return m.other if m.student == student else m.student

    found.sort(key=lambda m: (-m.similarity, -m.overlap, other_of(m)))
    for match in found[:most]:
        flags.append(f"similar to {other_of(match)} ({100 * match.similarity:.0f}%)")
    more = len(found) - most
    if more > 0:
        flags.append(f"similar to {more} more student{'s' * (more > 1)} (see similarity.html)")
    return found[:most]


def _compare_with_course_lib(answers: dict[str, dict[str, str]], starter: dict[str, str],
                             references: dict[str, str], boilerplate: str, folder: Path,
                             thresholds: Thresholds, result: Result) -> None:
    """Step 2: each answer cell, as one file, against every course_lib reference. Adds one flag
    and match per student and function (its best cell) to ``result``."""
    cells = {(student, grade_id): f"{_header(grade_id)}{source}\n"
             for student, found in sorted(answers.items()) for grade_id, source in found.items()
             if source.strip() and source != starter.get(grade_id)}  # cells left blank: none
    if not (references and cells):
        return
    detector, paths, label = _detect(folder, cells, references, boilerplate)
    found = []
    for test_f, ref_f, mine, theirs, overlap in _pairs(detector, thresholds.min_overlap):
        if max(mine, theirs) >= thresholds.course_lib:
            (student, grade_id), name = label[test_f], label[ref_f]
            found.append(Match(student, name, "course_lib", max(mine, theirs), (mine, theirs),
                               overlap, cell=grade_id))
    found.sort(key=lambda m: (m.student, -m.similarity, -m.overlap, m.other, m.cell))
    named = set()
    for match in found:  # one flag per student and function: its best cell
        if (match.student, match.other) not in named:
            named.add((match.student, match.other))
            match.code = _highlighted(detector, paths[(match.student, match.cell)], paths[match.other])
            result.flags[match.student].append(f"matches {match.other} ({100 * match.similarity:.0f}%)")
            result.matches.append(match)


def similarity_flags(ws, chapter: str, students: list[str], out: Path | None,
                     thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Result:
    """Compare the submitted notebooks of ``students``; write the page to ``out`` if given."""
    answers = {}
    for student in students:
        try:
            answers[student] = answer_cells(ws.submitted(student, chapter))
        except Exception:  # unreadable or missing: its status record already says why
            continue
    release = ws.release_notebook(chapter)
    starter = answer_cells(release) if release.exists() else {}
    result = compare(answers, starter, course_lib_references(ws.repo_root / "course_lib"), thresholds)
    if out is not None:
        write_html(result, out, chapter, thresholds)
    return result


# -- page --------------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.pair { border-top: 1px solid #ccc; margin-top: 1.2em; padding-top: .6em; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.sides > div { min-width: 0; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
mark { background: #ffd27a; }
td, th { padding: 0 .8em 0 0; text-align: left; }
"""


def _pair_html(m: Match, heading: str, shares: str) -> list[str]:
    """One flagged pair on the page: ``heading`` and ``shares`` (HTML, escaped by the caller),
    then both sides' code side by side (``Match.code``: escaped, with the shared passages marked)."""
    return ['<div class="pair">', f"<h3>{heading}</h3>",
            f"<p>{shares} {m.overlap} characters of tokenised code in common.</p>",
            '<div class="sides">',
            f"<div><b>{html.escape(m.student)}</b><pre>{m.code[0]}</pre></div>",
            f"<div><b>{html.escape(m.other)}</b><pre>{m.code[1]}</pre></div>",
            "</div></div>"]


def write_html(result: Result, path: Path, chapter: str, thresholds: Thresholds) -> None:
    """The flagged pairs with their matching passages side by side; everything escaped."""
    e = html.escape
    students = [m for m in result.matches if m.kind == "student"]
    refs = [m for m in result.matches if m.kind == "course_lib"]
    parts = [
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
        f"<title>{e(chapter)}: code similarity</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(chapter)}: code similarity</h1>",
        f"<p>{result.students} submissions compared with each other and with {result.references} "
        "functions and classes of course_lib (each answer cell on its own); the release's starter "
        "code is not counted. "
        "Highlighted: the passages found in both (copydetect, winnowing over tokenised code, so "
        "renamed variables and changed comments still match). A flag is a lead for a human, not "
        "a verdict: short, obvious answers can be alike by chance.</p>",
        "<table>",
        f"<tr><th>students</th><td>flagged at {100 * thresholds.students:.0f}% of one student's "
        "answer code also in the other's</td></tr>",
        f"<tr><th>course_lib</th><td>flagged at {100 * thresholds.course_lib:.0f}% of an answer "
        "cell's code in a course_lib function, or of the function's in the cell</td></tr>",
        f"<tr><th>both</th><td>and at least {thresholds.min_overlap} characters of tokenised "
        f"code in common (copydetect noise_t={NOISE_T}, guarantee_t={GUARANTEE_T})</td></tr>",
        "</table>",
        f"<h2>Similar students ({result.pairs_above} pairs over the thresholds"
        + (f"; the {len(students)} highest of each student shown" if len(students) < result.pairs_above
           else "") + ")</h2>",
    ]
    if not students:
        parts.append("<p>None.</p>")
    for m in students:
        parts += _pair_html(m, f"{e(m.student)} &harr; {e(m.other)}: {100 * m.similarity:.0f}%",
                            f"{100 * m.shares[0]:.0f}% of {e(m.student)}'s answer code is also in "
                            f"{e(m.other)}'s; {100 * m.shares[1]:.0f}% of {e(m.other)}'s is in "
                            f"{e(m.student)}'s;")
    parts.append(f"<h2>Answers that match course_lib ({len(refs)})</h2>")
    if not refs:
        parts.append("<p>None.</p>")
    for m in refs:
        parts += _pair_html(m, f"{e(m.student)}, {e(m.cell)} &rarr; {e(m.other)}: {100 * m.similarity:.0f}%",
                            f"{100 * m.shares[0]:.0f}% of {e(m.student)}'s answer cell {e(m.cell)} is in "
                            f"{e(m.other)}; {100 * m.shares[1]:.0f}% of {e(m.other)} is in that cell;")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8", errors="replace")
