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
      reports/<chapter>/     grades.csv, summary.md, pass_rates.png, similarity.html,
                             canvas.csv (with --roster), feedback/<student>.html
      reports/all_grades.csv every chapter's grades in one long table (grader/lms.py)
      scratch/<chapter>/     the grading station of this machine: a workspace of its own where
                             submissions are graded (grader/autograde.py open_station); only the
                             grader's Recorder writes the folders above
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from grader import GraderError, database
from grader.course import compare_trees
from grader.kernel_client import CLIENT_CLASS
from grader.release import IGNORED_IN_RELEASE

CONFIG_TEMPLATE = '''\
# Written by `python -m grader`; it is rewritten on every run, so edit the command's options instead.
import os

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (
    AssignLatePenalties, CheckCellMetadata, ClearHiddenTests, Execute, GetGrades, IgnorePattern,
    LimitOutput, SaveAutoGrades,
)

from grader.preprocessors import (
    CapOutputs, SanitizeMarkdownCells, ScrubHiddenTests, StderrIsNotAFailure,
)

c = get_config()  # noqa: F821
c.CourseDirectory.course_id = "neurons-to-llms"
c.CourseDirectory.root = {root!r}
c.CourseDirectory.db_url = {db_url!r}
c.CourseDirectory.ignore = {ignore!r}
# Per-cell limit; the whole notebook is limited by the grader, which kills nbgrader past it.
c.Execute.timeout = {cell_timeout}
c.Execute.startup_timeout = 120
# After a cell is interrupted at its time limit, wait for the kernel to settle instead of
# abandoning the whole notebook after 4 s (a loaded machine is slower than that).
c.Execute.iopub_timeout = 30
c.Execute.raise_on_iopub_timeout = False
# nbclient can sleep through a kernel reply until the per-cell limit ends; see grader/kernel_client.py.
c.AsyncKernelManager.client_class = {client_class!r}
# A deleted test cell is put back and graded instead of silently scoring 0.
c.OverwriteCells.add_missing_cells = True
if os.environ.get("COURSE_SANDBOX_PLAN"):
    # The kernel runs in the grader's sandbox (grader/sandbox.py), reached over ipc sockets.
    c.Execute.kernel_name = "n2l-sandbox"
    c.KernelManager.transport = "ipc"
    # For ipc the "ip" is the sockets' path prefix; its default is relative to each side's cwd.
    c.KernelManager.ip = os.path.join(os.environ["JUPYTER_RUNTIME_DIR"], "kernel")
c.Autograde.autograde_preprocessors = [
    Execute, StderrIsNotAFailure, CapOutputs, ScrubHiddenTests, IgnorePattern, ClearMetadataPreprocessor,
    LimitOutput, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata,
]
# Feedback never shows the hidden tests' source, and student markup in it never runs: markdown
# cells are cleaned here (nbgrader's feedback template renders them raw), outputs by HTMLExporter.
c.GenerateFeedback.preprocessors = [GetGrades, ClearHiddenTests, SanitizeMarkdownCells,
                                    CSSHTMLHeaderPreprocessor]
# Outputs are capped in bytes per cell and per notebook before the graded notebook is saved
# (LimitOutput caps lines), and outputs holding hidden-test (or probes.py) lines are removed.
c.CapOutputs.max_cell_bytes = {max_cell_bytes}
c.CapOutputs.max_notebook_bytes = {max_notebook_bytes}
c.ScrubHiddenTests.secret_files = [os.path.join({root!r}, "source", "{{assignment}}", "probes.py")]
# Outputs in the feedback HTML: HTML and Markdown cleaned, JavaScript left out, SVG shown as an image.
c.HTMLExporter.sanitize_html = True
'''


class Status(str, Enum):
    """What became of one submission. A ``str`` enum whose members print as their lowercase
    string, so the status files, grades.csv and summary.md read exactly as when these were bare
    strings (``enum.StrEnum`` does the same but needs Python 3.11; the course supports 3.10)."""

    PENDING = "pending"  # copied into the workspace, not graded yet
    GRADED = "graded"
    TIMEOUT = "timeout"  # the whole notebook ran past --notebook-timeout
    ERROR = "error"  # unreadable, or nbgrader or the kernel failed
    REJECTED = "rejected"  # an entry of the submissions with no usable student id

    def __str__(self) -> str:
        return self.value


@dataclass
class Record:
    """What happened to one student's submission of one chapter."""

    student: str
    status: Status
    message: str = ""
    source: str = ""  # where the submission came from (path inside the folder or archive)
    sha256: str = ""
    seconds: float | None = None
    flags: list[str] = field(default_factory=list)  # see grader/flags.py and grader/autograde.py
    checks: dict[str, str] = field(default_factory=dict)  # test cell -> trusted verdict ("passed" or why not)
    seed: int | None = None  # the secret seed of the trusted checks' inputs (to reproduce them)

    def __post_init__(self):
        self.status = Status(self.status)  # a status file holds the plain string


@dataclass
class ChapterStatus:
    """``status/<chapter>.json``: a record per student."""

    chapter: str
    records: dict[str, Record] = field(default_factory=dict)
    rejected: list[Record] = field(default_factory=list)  # entries with no usable student id


class Workspace:
    # Bytes of output a graded notebook keeps per cell and in all (grader/preprocessors.py).
    max_cell_output_bytes = 100_000
    max_notebook_output_bytes = 2_000_000

    def __init__(self, path: Path, repo_root: Path, db_url: str | None = None):
        self.path = Path(path).expanduser().resolve()
        self.repo_root = repo_root.resolve()
        if self.path == self.repo_root or self.repo_root in self.path.parents:
            raise GraderError(
                f"The workspace {self.path} is inside the course repository. Grading data (student "
                "work, the gradebook) must live outside it: pass e.g. --workspace ~/grading."
            )
        if self.path.exists() and not self.path.is_dir():
            raise GraderError(f"The workspace path {self.path} exists and is not a folder.")
        # --db-url, or what this workspace used before, or <workspace>/gradebook.db
        self.db_url = database.resolve_url(self.path, db_url)

    # -- layout ------------------------------------------------------------------------------
    def submitted(self, student: str, chapter: str) -> Path:
        return self.path / "submitted" / student / chapter / f"{chapter}.ipynb"

    def autograded(self, student: str, chapter: str) -> Path:
        return self.path / "autograded" / student / chapter / f"{chapter}.ipynb"

    def feedback_html(self, student: str, chapter: str) -> Path:
        return self.path / "feedback" / student / chapter / f"{chapter}.html"

    def log(self, student: str, chapter: str) -> Path:
        return self.path / "logs" / chapter / f"{student}.log"

    def sandbox_dir(self, student: str, chapter: str) -> Path:
        return self.path / "sandbox" / chapter / student

    def probes(self, chapter: str) -> Path:
        return self.path / "source" / chapter / "probes.py"

    def release_notebook(self, chapter: str) -> Path:
        return self.path / "release" / chapter / f"{chapter}.ipynb"

    def reports(self, chapter: str) -> Path:
        return self.path / "reports" / chapter

    # -- setup -------------------------------------------------------------------------------
    def write_config(self, cell_timeout: int = 600) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        database.record_url(self.path, self.db_url)
        text = CONFIG_TEMPLATE.format(root=str(self.path), db_url=database.config_url(self.db_url),
                                      ignore=IGNORED_IN_RELEASE,
                                      cell_timeout=int(cell_timeout), client_class=CLIENT_CLASS,
                                      max_cell_bytes=int(self.max_cell_output_bytes),
                                      max_notebook_bytes=int(self.max_notebook_output_bytes))
        (self.path / "nbgrader_config.py").write_text(text)

    def nbgrader(self, *args: str, timeout: float | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``python -m nbgrader ARGS`` in the workspace (so it reads our config)."""
        return subprocess.run([sys.executable, "-m", "grader.nbgrader_main", *args], cwd=self.path,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **database.nbgrader_env(self.db_url), **(env or {})})

    def prepare(self, chapter: str, cell_timeout: int = 600) -> None:
        """Copy the chapter's source in (once) and register it in the gradebook.

        Refuses to mix tests: when the workspace already grades this chapter from a different
        source, the instructor must use a new workspace.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        source = self.repo_root / "solutions" / chapter
        copy = self.path / "source" / chapter
        # Before anything is written: a wrong URL or password fails here, in seconds.
        if chapter in database.check_database(self.db_url) and not copy.exists():
            raise GraderError(
                f"The gradebook {database.describe(self.db_url)} already holds grades of {chapter} "
                "from another workspace: give each workspace its own database.")
        self.write_config(cell_timeout)
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

    def load_status(self, chapter: str) -> ChapterStatus:
        path = self.status_path(chapter)
        status = ChapterStatus(chapter)
        if path.exists():
            try:
                data = json.loads(path.read_text())
                status.records = {k: Record(**v) for k, v in data.get("records", {}).items()}
                status.rejected = [Record(**v) for v in data.get("rejected", [])]
            except (ValueError, TypeError) as error:
                raise GraderError(
                    f"{path} is damaged ({error}); delete it to grade everything again.") from None
        return status

    def save_status(self, status: ChapterStatus) -> None:
        path = self.status_path(status.chapter)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"records": {k: asdict(v) for k, v in sorted(status.records.items())},
                "rejected": [asdict(r) for r in status.rejected]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a crash never leaves half a status file

