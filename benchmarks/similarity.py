"""How long `report`'s code-similarity step takes for many submissions of one real chapter.

Writes N submitted notebooks of the chapter into a temporary workspace, then times
``grader.similarity.similarity_flags`` (reading the notebooks, splitting course_lib, both
copydetect runs, the HTML page) as ``report`` runs it. The submissions, drawn from a seed:
- about half: the solution's answers, each cell answered with probability 0.85 (else left as
  the starter code), with the local variables renamed at random and the comments changed;
- a quarter: the same with one of the chapter's wrong-answer fixtures
  (tests/fixtures/wrong_answers/<chapter>.py) in place of the solution's cells;
- a tenth: blank (the release as it is);
- a few: one course_lib function pasted into the answer cell of the same name (renamed);
- the rest: the first one or two exercises only.
Prints one JSON line: chapter, submissions, seconds, and what was flagged. Usage:
    python benchmarks/similarity.py [--chapter ch03_losses] [--submissions 300] [--seed 0]
        [--no-course-lib]
--no-course-lib compares the students with each other only (the cost of the course_lib corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grader import similarity  # noqa: E402
from grader.workspace import Workspace  # noqa: E402
from tests.grading_helpers import write_submissions, wrong_answers  # noqa: E402


def strip_markers(source: str) -> str:
    return "\n".join(line for line in source.splitlines()
                     if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)


def local_names(source: str) -> set[str]:
    """Names the code assigns to (not the parameters: the signature is the starter code's)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.id for node in ast.walk(tree)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def disguise(source: str, rng: random.Random) -> str:
    """Rename the local variables and change the comments, as a student hiding a copy would."""
    for name in sorted(local_names(source)):
        new = rng.choice(["tmp", "val", "res", "out", "acc", "z", "q", "buf"]) + f"_{rng.randrange(99)}"
        source = re.sub(rf"(?<![.\w]){re.escape(name)}\b", new, source)
    lines = [re.sub(r"\s+#.*$", "", line) for line in source.splitlines()]
    if lines and rng.random() < 0.5:
        lines.insert(rng.randrange(1, len(lines) + 1) if len(lines) > 1 else 1,
                     "    # " + rng.choice(["my own approach", "see lecture", "works now", "TODO tidy"]))
    return "\n".join(lines) + "\n"


def submissions(chapter: str, n: int, seed: int) -> dict[str, dict[str, str]]:
    """``{student: {grade_id: source}}`` for ``n`` made-up students."""
    rng = random.Random(seed)
    source = nbformat.read(REPO / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    release = nbformat.read(REPO / "chapters" / chapter / f"{chapter}.ipynb", as_version=4)
    starter = similarity.answer_cells(release)
    solution = {k: strip_markers(v) for k, v in similarity.answer_cells(source).items()}
    wrong = wrong_answers(chapter)
    refs = similarity.course_lib_references(REPO / "course_lib")
    pastable = {}  # answer cell -> course_lib function of the same name
    for grade_id, code in starter.items():
        match = re.search(r"^(?:def|class)\s+(\w+)", code, re.M)
        for name, ref in refs.items():
            if match and name.rsplit(".", 1)[1] == match.group(1):
                pastable[grade_id] = ref
    out = {}
    for i in range(n):
        roll = rng.random()
        cells = dict(starter)
        if roll < 0.5:
            cells.update({k: disguise(v, rng) for k, v in solution.items() if rng.random() < 0.85})
        elif roll < 0.75 and wrong:
            cells.update({k: disguise(v, rng) for k, v in solution.items()})
            cells.update({k: disguise(v, rng) for k, v in rng.choice(wrong)["answers"].items()})
        elif roll < 0.85:
            pass  # blank
        elif roll < 0.9 and pastable:
            grade_id = rng.choice(sorted(pastable))
            cells[grade_id] = disguise(pastable[grade_id], rng)
        else:
            first = list(solution)[:rng.choice([1, 2])]
            cells.update({k: disguise(solution[k], rng) for k in first})
        out[f"student{i:03d}"] = cells
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapter", default="ch03_losses")
    parser.add_argument("--submissions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-course-lib", action="store_true")
    args = parser.parse_args()
    chapter = args.chapter
    release_path = REPO / "chapters" / chapter / f"{chapter}.ipynb"
    release = nbformat.read(release_path, as_version=4)
    made = submissions(chapter, args.submissions, args.seed)

    with tempfile.TemporaryDirectory(prefix="n2l-similarity-bench-") as tmp:
        ws = Workspace(Path(tmp) / "ws", REPO)
        ws.release_notebook(chapter).parent.mkdir(parents=True)
        shutil.copyfile(release_path, ws.release_notebook(chapter))
        write_submissions(ws, chapter, release, made)
        if args.no_course_lib:
            similarity.course_lib_references = lambda _path: {}
        out = ws.reports(chapter) / "similarity.html"
        start = time.perf_counter()
        result = similarity.similarity_flags(ws, chapter, sorted(made), out)
        seconds = time.perf_counter() - start
        flagged = {kind: sum(1 for flags in result.flags.values()
                             if any(f.startswith(kind) for f in flags))
                   for kind in ("similar to", "matches course_lib")}
        print(json.dumps({
            "chapter": chapter, "submissions": len(made), "seconds": round(seconds, 2),
            "course_lib_references": result.references, "students_flagged_similar": flagged["similar to"],
            "students_flagged_course_lib": flagged["matches course_lib"],
            "student_pairs_above": result.pairs_above,
            "html_bytes": out.stat().st_size, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
