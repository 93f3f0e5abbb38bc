"""The instructor workspace: an nbgrader course directory outside the repository.

    <workspace>/
      nbgrader_config.py     written by the grader (edits are overwritten)
      gradebook.db           nbgrader's SQLite gradebook
      source/<chapter>/      copy of solutions/<chapter> the grades are based on
      release/<chapter>/     what nbgrader generated from it (checksums of locked cells)
      submitted/<student>/<chapter>/<chapter>.ipynb   copies of the submissions (originals untouched)
      autograded/, feedback/ nbgrader's outputs
      logs/<chapter>/<student>.log   nbgrader's log of each student's grading
      status/<chapter>.json  what happened to each submission (graded / timeout / error + why)
      reports/<chapter>/     grades.csv, summary.md, pass_rates.png, feedback/<student>.html
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grader import GraderError
from grader.course import compare_trees

CONFIG_TEMPLATE = '''\
# Written by `python -m grader`; it is rewritten on every run, so edit the command's options instead.
from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (
    AssignLatePenalties, CheckCellMetadata, ClearHiddenTests, Execute, GetGrades, IgnorePattern,
    LimitOutput, SaveAutoGrades,
)

from grader.preprocessors import StderrIsNotAFailure

c = get_config()  # noqa: F821
c.CourseDirectory.course_id = "neurons-to-llms"
c.CourseDirectory.root = {root!r}
c.CourseDirectory.db_url = {db_url!r}
# Per-cell limit; the whole notebook is limited by the grader, which kills nbgrader past it.
c.Execute.timeout = {cell_timeout}
c.Execute.startup_timeout = 120
# A deleted test cell is put back and graded instead of silently scoring 0.
c.OverwriteCells.add_missing_cells = True
c.Autograde.autograde_preprocessors = [
    Execute, StderrIsNotAFailure, IgnorePattern, ClearMetadataPreprocessor, LimitOutput,
    SaveAutoGrades, AssignLatePenalties, CheckCellMetadata,
]
# Feedback never shows the hidden tests' source.
c.GenerateFeedback.preprocessors = [GetGrades, ClearHiddenTests, CSSHTMLHeaderPreprocessor]
'''


@dataclass
class Record:
    """What happened to one student's submission of one chapter."""

    student: str
    status: str  # "pending" | "graded" | "timeout" | "error" | "rejected"
    message: str = ""
    source: str = ""  # where the submission came from (path inside the folder or archive)
    sha256: str = ""
    seconds: float | None = None


@dataclass
class Status:
    chapter: str
    records: dict[str, Record] = field(default_factory=dict)
    rejected: list[Record] = field(default_factory=list)  # entries with no usable student id


class Workspace:
    def __init__(self, path: Path, repo_root: Path):
        self.path = Path(path).expanduser().resolve()
        self.repo_root = repo_root.resolve()
        if self.path == self.repo_root or self.repo_root in self.path.parents:
            raise GraderError(
                f"The workspace {self.path} is inside the course repository. Grading data (student "
                "work, the gradebook) must live outside it: pass e.g. --workspace ~/grading."
            )
        if self.path.exists() and not self.path.is_dir():
            raise GraderError(f"The workspace path {self.path} exists and is not a folder.")

    # -- layout ------------------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.path / 'gradebook.db'}"

    def submitted(self, student: str, chapter: str) -> Path:
        return self.path / "submitted" / student / chapter / f"{chapter}.ipynb"

    def autograded(self, student: str, chapter: str) -> Path:
        return self.path / "autograded" / student / chapter / f"{chapter}.ipynb"

    def feedback_html(self, student: str, chapter: str) -> Path:
        return self.path / "feedback" / student / chapter / f"{chapter}.html"

    def log(self, student: str, chapter: str) -> Path:
        return self.path / "logs" / chapter / f"{student}.log"

    def reports(self, chapter: str) -> Path:
        return self.path / "reports" / chapter

    # -- setup -------------------------------------------------------------------------------
    def write_config(self, cell_timeout: int = 600) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = CONFIG_TEMPLATE.format(root=str(self.path), db_url=self.db_url,
                                      cell_timeout=int(cell_timeout))
        (self.path / "nbgrader_config.py").write_text(text)

    def nbgrader(self, *args: str, timeout: float | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``python -m nbgrader ARGS`` in the workspace (so it reads our config)."""
        return subprocess.run([sys.executable, "-m", "grader.nbgrader_main", *args], cwd=self.path,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})

    def prepare(self, chapter: str, cell_timeout: int = 600) -> None:
        """Copy the chapter's source in (once) and register it in the gradebook.

        Refuses to mix tests: when the workspace already grades this chapter from a different
        source, the instructor must use a new workspace.
        """
        self.write_config(cell_timeout)
        source = self.repo_root / "solutions" / chapter
        copy = self.path / "source" / chapter
        if copy.exists():
            missing, extra, changed = compare_trees(source, copy)
            differences = [f"{n} changed" for n in changed] + [f"{n} added or removed"
                                                                for n in missing + extra]
            if differences:
                raise GraderError(
                    f"The workspace already grades {chapter} from a different version of its source "
                    f"(e.g. {differences[0]}). Grades from two versions of the tests must not mix: "
                    "use a new --workspace for the new version."
                )
        else:
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints",
                                                                        "__pycache__"))
        if not (self.path / "release" / chapter).exists():
            result = self.nbgrader("generate_assignment", chapter, "--force")
            if result.returncode != 0:
                raise GraderError(f"nbgrader could not register {chapter} in the workspace:\n"
                                  + (result.stderr or result.stdout)[-3000:])

    # -- status ------------------------------------------------------------------------------
    def status_path(self, chapter: str) -> Path:
        return self.path / "status" / f"{chapter}.json"

    def load_status(self, chapter: str) -> Status:
        path = self.status_path(chapter)
        status = Status(chapter)
        if path.exists():
            try:
                data = json.loads(path.read_text())
                status.records = {k: Record(**v) for k, v in data.get("records", {}).items()}
                status.rejected = [Record(**v) for v in data.get("rejected", [])]
            except (ValueError, TypeError) as error:
                raise GraderError(
                    f"{path} is damaged ({error}); delete it to grade everything again.") from None
        return status

    def save_status(self, status: Status) -> None:
        path = self.status_path(status.chapter)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"records": {k: asdict(v) for k, v in sorted(status.records.items())},
                "rejected": [asdict(r) for r in status.rejected]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a crash never leaves half a status file

