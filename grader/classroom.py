"""A class on one JupyterHub: nbgrader's exchange in front of the course's own grader.

Students fetch, validate and submit through nbgrader's assignment list; the instructor releases,
collects and hands feedback back through the exchange, and grades what was collected with the
course's grader (sandbox + trusted checks), never with nbgrader's own autograde. The guide is
docs/classroom.md; the hub's configuration is scripts/classroom/.

``python -m grader.classroom`` (run by the instructor, in their own account, with the course's venv):

- ``release  --chapter chNN --workspace WS --exchange DIR``: the student release of ``chapters/``
  (refused when it is out of sync with ``solutions/``) into the exchange's outbound folder;
- ``collect  --chapter chNN --workspace WS --exchange DIR``: each student's latest submission into
  ``WS/classroom/submitted/<student>/<chapter>/``, the folder ``python -m grader autograde`` then
  grades; a submission not owned by the student it names, or holding anything but plain files and
  folders, is refused and listed;
- ``feedback --chapter chNN --workspace WS --exchange DIR``: the report's feedback HTML (hidden
  tests removed, student markup cleaned: ``python -m grader report``) of every graded submission
  into the exchange, where only its student can fetch it;
- ``configure`` (root, from scripts/classroom/setup.sh): the exchange's folders and the hub's
  settings.

Who can read what (file permissions; tested with real users in tests/test_classroom.py): the
exchange's inbound folder is writable but not listable by students; each submission is made
readable by its student and the instructors' group only (:class:`PrivateSubmit`), so a student
cannot read another's even knowing its name; feedback files are named by a hash of a secret only
the submitting student (and the instructor) holds, in a folder students cannot list.

This module is imported by students' Jupyter servers (the exchange classes below): it imports only
nbgrader's exchange and the standard library at the top.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from nbgrader.exchange.default.collect import ExchangeCollect
from nbgrader.exchange.default.submit import ExchangeSubmit

COURSE_ID = "neurons-to-llms"  # the workspace's CourseDirectory.course_id (grader/workspace.py)
CLASSROOM_DIR = "classroom"  # WS/classroom: the exchange's side of the workspace (an nbgrader course dir)
INSTRUCTORS_GROUP = "n2l-instructors"  # the Unix group that may read submissions


class PrivateSubmit(ExchangeSubmit):
    """nbgrader's submit, then the submission closed to everyone but its student and the group of
    the inbound folder (the instructors: the folder is set-group-id, so the submission inherits its
    group). nbgrader leaves submissions world-readable, hidden only by an unlisted random name."""

    def copy_files(self):
        super().copy_files()
        dest = os.path.join(self.inbound_path, self.assignment_filename)
        # The submission's own folder is the gate: made in the set-group-id inbound folder it has
        # the instructors' group, and 0770 lets no other student in. What is inside may then be
        # readable by all: its group can be the student's own (copytree's copystat clears the
        # set-group-id bit before nbgrader writes timestamp.txt and the secret), which a student
        # cannot change to a group they are not in.
        self.set_perms(dest, fileperms=0o644, dirperms=0o755)
        os.chmod(dest, 0o770)


class VerifiedCollect(ExchangeCollect):
    """nbgrader's collect, keeping only submissions that are what they claim: a real folder owned
    by the student its name gives, holding only regular files and folders (a link could make the
    instructor's own files, e.g. the solutions, that student's submission). Refused ones are logged
    and kept in :attr:`refused`. Takes each student's latest verified submission (no due dates)."""

    def init_src(self):
        super().init_src()  # checks the course and the inbound folder
        student_id = self.coursedir.student_id or "*"
        pattern = os.path.join(self.inbound_path, f"{student_id}+{self.coursedir.assignment_id}+*")
        self.refused: list[str] = []
        latest: dict[str, dict] = {}
        for path in glob.glob(pattern):
            record = self._path_to_record(path)
            problem = submission_problem(path, record["username"])
            if problem:
                self.refused.append(f"{os.path.basename(path)}: {problem}")
                self.log.warning("refused %s: %s", path, problem)
                continue
            best = latest.get(record["username"])
            if best is None or record["timestamp"] > best["timestamp"]:
                latest[record["username"]] = record
        self.src_records = list(latest.values())

    def do_copy(self, src, dest, log=None):
        copy_plain_tree(src, dest)


def submission_problem(path: str, student: str) -> str:
    """Why the inbound entry ``path`` must not be collected as ``student``'s ("" when it may)."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        return "not a folder (a link or a file)"
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = f"uid {info.st_uid}"
    if owner != student:
        return f"named for {student} but owned by {owner}"
    if not os.access(path, os.R_OK | os.X_OK):
        return "not readable by you (submitted without the course's settings?)"
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return f"{os.path.relpath(os.path.join(folder, name), path)} is not a plain file or folder"
    return ""


def copy_plain_tree(src: str, dest: str) -> None:
    """Copy folder ``src`` to ``dest`` (new) without following any link, whatever ``src``'s owner
    changes meanwhile: every open is relative to an already opened folder, with O_NOFOLLOW."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    top = os.open(src, flags | os.O_DIRECTORY)
    try:
        _copy_dir(top, Path(dest))
    finally:
        os.close(top)


def _copy_dir(dir_fd: int, dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in os.listdir(dir_fd):
        if name in (".ipynb_checkpoints", "__pycache__"):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError:  # a link (ELOOP), or gone: not copied
            continue
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                _copy_dir(fd, dest / name)
            elif stat.S_ISREG(mode):
                with open(fd, "rb", closefd=False) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out)
        finally:
            os.close(fd)


# -- the instructor's commands --------------------------------------------------------------------

def classroom_dir(workspace: Path) -> Path:
    return Path(workspace).expanduser().resolve() / CLASSROOM_DIR


def nbgrader_exchange(command: str, chapter: str, workspace: Path, exchange: Path, *extra: str,
                      exchange_class: str = "") -> subprocess.CompletedProcess:
    """Run ``nbgrader COMMAND CHAPTER`` on the workspace's classroom folder and ``exchange``; its
    settings on the command line win over any nbgrader_config.py of the instructor's."""
    folder = classroom_dir(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "nbgrader", command, chapter, f"--Exchange.root={exchange}",
            f"--CourseDirectory.root={folder}", f"--CourseDirectory.course_id={COURSE_ID}", *extra]
    if exchange_class:
        args.append(f"--ExchangeFactory.{exchange_class}")
    # nbgrader runs the venv's `alembic` by name when it opens a gradebook.
    env = {**os.environ,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0:
        from grader import GraderError

        raise GraderError(f"nbgrader {command} {chapter} failed:\n{(result.stderr or result.stdout)[-3000:]}")
    return result


def release(root: Path, chapter: str, workspace: Path, exchange: Path, force: bool = False) -> Path:
    """Put the student release of ``chapter`` in the exchange; returns its outbound folder."""
    from grader import GraderError
    from grader import release as course_release

    problems = course_release.check(root, [chapter])
    if problems:
        raise GraderError(f"chapters/{chapter} is out of sync with solutions/ ({problems[0]}): run "
                          "`python -m grader release` first, so students get what the grader grades")
    staged = classroom_dir(workspace) / "release" / chapter
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(root / "chapters" / chapter, staged,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    nbgrader_exchange("release_assignment", chapter, workspace, exchange, *(["--force"] if force else []))
    return Path(exchange) / COURSE_ID / "outbound" / chapter


def collect(chapter: str, workspace: Path, exchange: Path) -> tuple[Path, list[str]]:
    """Each student's latest verified submission into WS/classroom/submitted; returns that folder
    and the refused entries (``name: why``)."""
    result = nbgrader_exchange("collect", chapter, workspace, exchange, "--update",
                               exchange_class="collect=grader.classroom.VerifiedCollect")
    refused = [line.split("refused ", 1)[1] for line in result.stderr.splitlines() if "refused " in line]
    return classroom_dir(workspace) / "submitted", refused


def stage_feedback(root: Path, chapter: str, workspace: Path) -> tuple[list[str], list[str]]:
    """Put each graded student's report feedback where nbgrader's release_feedback looks, beside
    the timestamp and secret of the submission it grades. Returns (students staged, skipped: why)."""
    from grader.workspace import Status, Workspace

    ws = Workspace(workspace, root)
    submitted = classroom_dir(workspace) / "submitted"
    staged, skipped = [], []
    for student, record in sorted(ws.load_status(chapter).records.items()):
        notebook = submitted / record.source
        html = ws.reports(chapter) / "feedback" / f"{student}.html"
        dest = classroom_dir(workspace) / "feedback" / student / chapter
        if dest.exists():  # feedback staged before belongs to an older grading
            shutil.rmtree(dest)
        why = _feedback_problem(record, notebook, html, submitted / student / chapter, Status.GRADED)
        if why:
            skipped.append(f"{student}: {why}")
            continue
        dest.mkdir(parents=True)
        shutil.copyfile(html, dest / f"{notebook.stem}.html")
        for name in ("timestamp.txt", "submission_secret.txt"):
            shutil.copyfile(notebook.parent / name, dest / name)
        staged.append(student)
    return staged, skipped


def _feedback_problem(record, notebook: Path, html: Path, collected: Path, graded) -> str:
    """Why ``record``'s feedback cannot go back through the exchange ("" when it can).
    ``collected``: WS/classroom/submitted/<student>/<chapter>, where nbgrader's fetch_feedback
    looks for the notebook (at its top level) and the secret the feedback's name derives from."""
    import hashlib

    if record.status != graded:
        return f"not graded ({record.status}: {record.message})"
    if notebook.parent != collected or not notebook.is_file():
        return "its graded notebook is not a collected submission (graded from another folder?)"
    if hashlib.sha256(notebook.read_bytes()).hexdigest() != record.sha256:
        return "collected again since it was graded: run autograde and report again"
    if not html.is_file():
        return f"no feedback HTML ({html}): run `python -m grader report` first"
    if not (collected / "submission_secret.txt").is_file() or not (collected / "timestamp.txt").is_file():
        found = ", ".join(sorted(p.name for p in collected.iterdir()))
        return (f"the submission has no submission_secret.txt or timestamp.txt (only {found}; "
                "an old nbgrader?)")
    return ""


def release_feedback(root: Path, chapter: str, workspace: Path, exchange: Path
                     ) -> tuple[list[str], list[str]]:
    staged, skipped = stage_feedback(root, chapter, workspace)
    if staged:
        nbgrader_exchange("release_feedback", chapter, workspace, exchange)
    return staged, skipped


# -- set-up (root) ---------------------------------------------------------------------------------

def make_exchange(exchange: Path, owner: str, group: str = INSTRUCTORS_GROUP) -> Path:
    """The exchange's folders for the course, as nbgrader expects them, owned by the instructor
    who releases (``owner``), submissions readable by ``group``. Idempotent; run as root."""
    import grp

    uid, gid = pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid
    exchange = Path(exchange)
    exchange.mkdir(parents=True, exist_ok=True)
    os.chmod(exchange, 0o1777)  # nbgrader checks that everyone may write here; sticky: not delete
    course = exchange / COURSE_ID
    # outbound: everyone reads; inbound: students write, cannot list, and what they make there
    # gets the instructors' group (set-group-id); feedback: read by exact name only.
    for folder, mode in [(course, 0o755), (course / "outbound", 0o755), (course / "inbound", 0o2733),
                         (course / "feedback", 0o711)]:
        folder.mkdir(exist_ok=True)
        os.chown(folder, uid, gid)
        os.chmod(folder, mode)
    return course


NBGRADER_ROLE_CONFIG = '''\
# Written by `python -m grader.classroom configure`; run it again rather than editing this file.
c = get_config()  # noqa: F821
c.CourseDirectory.course_id = {course_id!r}
c.Exchange.root = {exchange!r}
# Submissions readable by their student and the instructors only (grader/classroom.py).
c.ExchangeFactory.submit = "grader.classroom.PrivateSubmit"
# Validate: as in chapters/nbgrader_config.py.
c.Execute.timeout = 300
c.AsyncKernelManager.client_class = "grader.kernel_client.SlicedPollKernelClient"
'''

INSTRUCTOR_EXTRA = '''\
# The formgrader shows the course grader's workspace (its gradebook); grade with
# `python -m grader`, not with the formgrader's own autograde button (docs/classroom.md).
import os  # noqa: E402

c.CourseDirectory.root = os.path.expanduser("~/grading")
'''


def configure(state: Path, settings: dict) -> Path:
    """Write the hub's settings (``state/classroom.json``, read by
    scripts/classroom/jupyterhub_config.py run in ``state``) and each role's nbgrader config."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)  # the users' servers read their role's config here
    for role in ("student", "instructor"):
        folder = state / "jupyter" / role
        folder.mkdir(parents=True, exist_ok=True)
        text = NBGRADER_ROLE_CONFIG.format(course_id=COURSE_ID, exchange=str(settings["exchange"]))
        (folder / "nbgrader_config.py").write_text(text + (INSTRUCTOR_EXTRA if role == "instructor" else ""))
        os.chmod(folder / "nbgrader_config.py", 0o644)
        for path in (folder, folder.parent):
            os.chmod(path, 0o755)
    target = state / "classroom.json"
    target.write_text(json.dumps(settings, indent=1))
    os.chmod(target, 0o600)  # may hold an API token
    return target


# -- command line ---------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grader.classroom", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="the course repository (default: found from here)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("release", "release a chapter to the students through the exchange"),
                       ("collect", "collect the latest submissions into WS/classroom/submitted"),
                       ("feedback", "release the report's feedback HTML to each graded student")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--chapter", required=True)
        cmd.add_argument("--workspace", type=Path, required=True)
        cmd.add_argument("--exchange", type=Path, required=True, help="nbgrader's exchange root")
        if name == "release":
            cmd.add_argument("--force", action="store_true", help="replace a chapter already released")
    conf = sub.add_parser("configure", help="(root) the exchange's folders and the hub's settings")
    conf.add_argument("--state", type=Path, required=True, help="the hub's folder (its database, settings)")
    conf.add_argument("--exchange", type=Path, required=True)
    conf.add_argument("--owner", required=True, help="the instructor account that releases")
    conf.add_argument("--group", default=INSTRUCTORS_GROUP, help="the instructors' Unix group")
    conf.add_argument("--instructors", required=True, help="comma-separated accounts")
    conf.add_argument("--students", required=True, help="comma-separated accounts")
    conf.add_argument("--ip", default="127.0.0.1", help="the address the hub serves on")
    conf.add_argument("--port", type=int, default=8000)
    conf.add_argument("--hub-port", type=int, default=8081)
    conf.add_argument("--proxy-api-port", type=int, default=8001)
    conf.add_argument("--proxy", default="", help="configurable-http-proxy (default: the one "
                                                  "scripts/install_system_deps.sh installs)")
    return parser


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _configure(root: Path, args: argparse.Namespace) -> int:
    make_exchange(args.exchange, args.owner, args.group)
    settings = {"repo": str(root), "venv": sys.prefix, "exchange": str(args.exchange.resolve()),
                "instructors": _names(args.instructors), "students": _names(args.students),
                "ip": args.ip, "port": args.port, "hub_port": args.hub_port,
                "proxy_api_port": args.proxy_api_port,
                "proxy_command": args.proxy or str(root / "build" / "node" / "node_modules" / ".bin"
                                                   / "configurable-http-proxy")}
    print(f"wrote {configure(args.state, settings)}; exchange ready in {args.exchange}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from grader import GraderError
    from grader.course import find_root, resolve_chapter

    args = _parser().parse_args(argv)
    try:
        root = find_root(args.root)
        if args.command == "configure":
            return _configure(root, args)
        return _run(root, resolve_chapter(root, args.chapter), args)
    except GraderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(root: Path, chapter: str, args: argparse.Namespace) -> int:
    if args.command == "release":
        out = release(root, chapter, args.workspace, args.exchange, force=args.force)
        print(f"released {chapter} to {out}: students see it in their Assignments tab")
        return 0
    if args.command == "collect":
        folder, refused = collect(chapter, args.workspace, args.exchange)
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        print(f"collected {chapter}: {len(found)} student(s) in {folder}")
        for line in refused:
            print(f"  refused: {line}")
        print(f"next: python -m grader autograde {folder} --chapter {chapter} --workspace {args.workspace}")
        return 1 if refused else 0
    staged, skipped = release_feedback(root, chapter, args.workspace, args.exchange)
    print(f"feedback released for {len(staged)} student(s): {', '.join(staged) or '-'}")
    for line in skipped:
        print(f"  no feedback for {line}")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
