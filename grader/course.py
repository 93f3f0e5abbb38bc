"""Where the course lives: the repository root, its chapters and their names, and what each
notebook cell is to nbgrader (its role)."""

from __future__ import annotations

import filecmp
import os
import re
import sys
from pathlib import Path

from grader import GraderError

CHAPTER_NAME = re.compile(r"^ch\d\d_[a-z0-9_]+$")


def find_root(start: Path | None = None) -> Path:
    """The course repository root: the nearest folder above ``start`` (default: this package)
    that holds both ``solutions/`` and ``pyproject.toml``."""
    candidates = []
    if start is not None:
        candidates.append(Path(start).resolve())
    candidates.append(Path(__file__).resolve().parent)
    for base in candidates:
        for folder in (base, *base.parents):
            if (folder / "solutions").is_dir() and (folder / "pyproject.toml").is_file():
                return folder
    raise GraderError(
        "Cannot find the course repository (a folder with solutions/ and pyproject.toml). "
        "Run the command inside the course folder or pass --root PATH."
    )


def list_chapters(root: Path) -> list[str]:
    """Chapter names (``chNN_topic``) that have a source notebook in ``solutions/``."""
    names = []
    for folder in sorted((root / "solutions").iterdir()):
        if folder.is_dir() and CHAPTER_NAME.match(folder.name):
            if (folder / f"{folder.name}.ipynb").is_file():
                names.append(folder.name)
    return names


def resolve_chapter(root: Path, name: str) -> str:
    """Turn ``ch01``, ``1`` or ``ch01_neural_networks`` into the full chapter name."""
    chapters = list_chapters(root)
    if name in chapters:
        return name
    key = name.strip().lower()
    if key.isdigit():
        key = f"ch{int(key):02d}"
    matches = [c for c in chapters if c.startswith(key + "_") or c == key]
    if len(matches) == 1:
        return matches[0]
    raise GraderError(
        f"Unknown chapter {name!r}. Chapters with a source notebook: {', '.join(chapters) or 'none'}."
    )


def ensure_scripts_on_path() -> None:
    """Put this Python's scripts folder first on PATH.

    nbgrader runs the ``alembic`` command (and Jupyter finds kernels) through PATH, so a
    virtualenv used without activating it (``.venv/bin/python -m grader``) would otherwise fail.
    """
    scripts = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [scripts]:
        os.environ["PATH"] = os.pathsep.join([scripts, *[p for p in parts if p != scripts]])


def files_under(folder: Path) -> dict[str, Path]:
    """Every file below ``folder`` by relative path, without Jupyter checkpoints or bytecode."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()
            and ".ipynb_checkpoints" not in p.parts and "__pycache__" not in p.parts}


def compare_trees(expected: Path, actual: Path) -> tuple[list[str], list[str], list[str]]:
    """Relative paths ``(missing from actual, extra in actual, different)`` between two folders."""
    want, have = files_under(expected), files_under(actual)
    changed = [name for name in sorted(set(want) & set(have))
               if not filecmp.cmp(want[name], have[name], shallow=False)]
    return sorted(set(want) - set(have)), sorted(set(have) - set(want)), changed


# -- a cell's role, as nbgrader reads its metadata (the one place this rule is written) -----------
#
#   role      nbgrader metadata             what it is
#   "answer"  solution and not grade        code the student writes (BEGIN/END SOLUTION)
#   "test"    grade and not solution        a locked, autograded test cell worth `points`
#   "other"   anything else                 prose, demos, setup; a manually graded cell
#
# Markdown cells are "other" whatever their metadata says: this course grades code only.


def nbgrader_meta(cell) -> dict:
    """A cell's ``metadata.nbgrader`` (``{}`` when absent or not a dict)."""
    meta = (cell.get("metadata") or {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def cell_role(cell) -> str:
    """``"answer"``, ``"test"`` or ``"other"`` for a notebook cell (a dict or NotebookNode)."""
    if cell.get("cell_type") != "code":
        return "other"
    meta = nbgrader_meta(cell)
    if meta.get("solution") and not meta.get("grade"):
        return "answer"
    if meta.get("grade") and not meta.get("solution"):
        return "test"
    return "other"


def cell_source(cell) -> str:
    """A cell's source as one string (nbformat allows a list of lines on disk)."""
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def cells_with_role(nb, role: str) -> dict[str, dict]:
    """``grade_id -> cell`` for the notebook's cells of ``role``, in notebook order."""
    return {nbgrader_meta(c)["grade_id"]: c for c in nb["cells"]
            if cell_role(c) == role and isinstance(nbgrader_meta(c).get("grade_id"), str)}
