"""``release``: generate the student notebooks in ``chapters/`` from the sources in ``solutions/``.

nbgrader's ``generate_assignment`` strips solutions and hidden tests, locks test cells and records
checksums. We run it in a throw-away course directory so the repository never holds a gradebook,
then copy the result into ``chapters/`` (or, with ``--check``, compare it byte for byte).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from traitlets.config import Config

from grader import GraderError
from grader.course import compare_trees, files_under

IGNORED_IN_RELEASE = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "probes.py"]


@contextmanager
def _fresh_release(root: Path, chapters: list[str]) -> Iterator[Path]:
    """Generate the chapters' releases into a temporary folder and yield it."""
    with tempfile.TemporaryDirectory(prefix="n2l-release-out-") as out:
        _generate(root, chapters, Path(out))
        yield Path(out)


def _generate(root: Path, chapters: list[str], out_dir: Path) -> None:
    from grader.nbgrader_main import speed_up_nbgrader

    speed_up_nbgrader()
    from nbgrader.apps import NbGraderAPI

    with tempfile.TemporaryDirectory(prefix="n2l-release-") as tmp:
        config = Config()
        config.CourseDirectory.root = tmp
        config.CourseDirectory.course_id = "neurons-to-llms"
        config.CourseDirectory.source_directory = str(root / "solutions")
        config.CourseDirectory.release_directory = str(out_dir)
        config.CourseDirectory.db_url = f"sqlite:///{Path(tmp) / 'gradebook.db'}"
        # The trusted-check specs stay with the instructor (grader/probes.py explains them).
        config.CourseDirectory.ignore = [*IGNORED_IN_RELEASE]
        config.NbGraderAPI.log_level = logging.WARNING
        api = NbGraderAPI(config=config)
        for chapter in chapters:
            result = api.generate_assignment(chapter, force=True, create=True)
            if not result.get("success"):
                detail = (result.get("error") or result.get("log") or "").strip()
                raise GraderError(f"nbgrader could not generate the release of {chapter}:\n{detail}")


def release(root: Path, chapters: list[str]) -> list[str]:
    """Regenerate ``chapters/<name>/`` for each chapter; returns the files written."""
    written = []
    with _fresh_release(root, chapters) as out_dir:
        for chapter in chapters:
            target = root / "chapters" / chapter
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(out_dir / chapter, target)
            written += [f"chapters/{chapter}/{name}" for name in files_under(target)]
    return written


def check(root: Path, chapters: list[str]) -> list[str]:
    """Differences between ``chapters/`` and a fresh generation; empty when in sync."""
    problems = []
    with _fresh_release(root, chapters) as out_dir:
        for chapter in chapters:
            missing, extra, changed = compare_trees(out_dir / chapter, root / "chapters" / chapter)
            problems += [f"chapters/{chapter}/{name}: missing (run `python -m grader release`)"
                         for name in missing]
            problems += [f"chapters/{chapter}/{name}: not generated from solutions/ (remove it)"
                         for name in extra]
            problems += [f"chapters/{chapter}/{name}: differs from a fresh generation of "
                         f"solutions/{chapter} (run `python -m grader release`)" for name in changed]
        released = root / "chapters"
        if released.is_dir():
            for folder in sorted(released.iterdir()):
                if (folder.is_dir() and folder.name.startswith("ch")
                        and not (root / "solutions" / folder.name).is_dir()):
                    problems.append(f"chapters/{folder.name}: has no source in solutions/")
    return problems
