"""A class on JupyterHub, for real on loopback (docs/classroom.md, scripts/classroom/).

One hub (configurable-http-proxy from npm, scripts/classroom/jupyterhub_config.py as a class
uses it) with three local Unix accounts made for the test: an instructor and two students, each
server run as its user by LocalProcessSpawner from the course's venv. The instructor releases
chapter 0 through nbgrader's exchange; each student fetches it, answers (one right, one with a
wrong answer from the fixtures) and submits through their own server's REST API, with a hub
token of their own; one validates. The instructor, as their own account, collects, grades with
the course's grader (sandbox and trusted checks), writes the report and releases its feedback;
each student fetches feedback and gets exactly their own report HTML, with no hidden test.
As the other student, reading a submission, the inbound folder, the feedback folder, a home folder
or the gradebook is refused by the file system. Students see the assignment list and Validate
but not the formgrader, the course list or create assignment; instructors see all of them.

Needs root (it makes the accounts, removed at the end with everything they wrote, even on
failure), bubblewrap and configurable-http-proxy (scripts/install_system_deps.sh installs it).
"""

from __future__ import annotations

import glob
import html
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

from grader import classroom
from tests.grading_helpers import REPO, cells_by_role, fill_answers, read_grades, wrong_answers

CHAPTER = "ch00_big_picture"
PROXY = REPO / "build" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
VENV = Path(sys.prefix)
HUB_START_S = 90  # bounded waits: a busy 2-core machine imports JupyterLab slowly
SERVER_START_S = 150
# JupyterLab's page settings, and what a student's must disable: nbgrader's instructor tools, news.
PAGE_CONFIG = r'<script id="jupyter-config-data" type="application/json">(.*?)</script>'
NBGRADER_TOOLS = {"@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:course-list",
                  "@jupyter/nbgrader:create-assignment"}
NEWS = "@jupyterlab/apputils-extension:announcements"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {result.stderr or result.stdout}")
    return result


@dataclass
class Classroom:
    base: Path
    names: dict[str, str]  # role (instructor, ana, ben) -> Unix account
    group: str
    exchange: Path
    state: Path
    url: str = ""
    admin_token: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    hub: subprocess.Popen | None = None
    opened: list[tuple[Path, int]] = field(default_factory=list)  # modes to restore

    @property
    def log(self) -> Path:
        return self.state / "hub.log"

    def home(self, role: str) -> Path:
        return Path(pwd.getpwnam(self.names[role]).pw_dir)

    def as_user(self, role: str, *cmd: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``cmd`` as that account (its uid, its groups, its home), as it would in a terminal."""
        entry = pwd.getpwnam(self.names[role])
        env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
               "PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        # Dropped in the child before exec, as JupyterHub's spawner does (setpriv keeps root's
        # capabilities through its exec, so a path only root can search would still work).
        return subprocess.run([str(c) for c in cmd], cwd=entry.pw_dir, env=env, user=entry.pw_uid,
                              group=entry.pw_gid, extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
                              capture_output=True, text=True, timeout=timeout)

    def hub_tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no hub log)"
        return "\n".join(text.splitlines()[-lines:])


# -- accounts and the hub --------------------------------------------------------------------------

def _make_accounts(room: Classroom) -> None:
    _run("groupadd", room.group)
    for name in room.names.values():
        home = room.base / "home" / name
        _run("useradd", "--create-home", "--home-dir", home, "--shell", "/bin/bash", "--user-group", name)
        home.chmod(0o700)
    _run("usermod", "-a", "-G", room.group, room.names["instructor"])


def _open_checkout(room: Classroom) -> None:
    """The users' servers run the course's venv as them: give others search permission on the
    folders above the checkout and the venv's Python where they lack it (a clone or a pyenv Python
    under /root), for the test only (restored at the end)."""
    python_home = Path(os.path.realpath(sys.executable)).parent
    for leaf in (REPO, python_home):
        for folder in reversed([leaf, *leaf.parents]):
            mode = folder.stat().st_mode & 0o7777
            if not mode & 0o001:
                room.opened.append((folder, mode))
                folder.chmod(mode | 0o001)


def _remove_accounts(room: Classroom) -> None:
    uids = set()
    for name in room.names.values():
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    _kill_uids(uids)
    for name in room.names.values():
        _run("userdel", "--remove", name, check=False)
    _run("groupdel", room.group, check=False)
    for folder, mode in reversed(room.opened):
        folder.chmod(mode)
    shutil.rmtree(room.base, ignore_errors=True)


def _kill_uids(uids: set[int]) -> None:
    """SIGKILL every process the test's accounts still run, each by its pid."""
    for _ in range(3):
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid in uids:
                        found.append(int(entry.name))
                except OSError:
                    continue
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not found:
            return
        time.sleep(0.5)


def _start_hub(room: Classroom) -> None:
    import httpx

    port = _free_port()
    room.admin_token = secrets.token_hex(24)
    settings = {"repo": str(REPO), "venv": str(VENV), "exchange": str(room.exchange),
                "instructors": [room.names["instructor"]],
                "students": [room.names["ana"], room.names["ben"]],
                "ip": "127.0.0.1", "port": port, "hub_port": _free_port(),
                "proxy_api_port": _free_port(), "proxy_command": str(PROXY),
                "api_token": room.admin_token,
                "environment": {"COURSE_QUICK": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    classroom.make_exchange(room.exchange, room.names["instructor"], room.group)
    classroom.configure(room.state, settings)
    room.url = f"http://127.0.0.1:{port}"
    with open(room.log, "wb") as log:
        room.hub = subprocess.Popen(
            [VENV / "bin" / "jupyterhub", "-f", REPO / "scripts" / "classroom" / "jupyterhub_config.py"],
            cwd=room.state, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + HUB_START_S
    while time.monotonic() < deadline:
        if room.hub.poll() is not None:
            raise RuntimeError(f"jupyterhub exited with {room.hub.returncode}:\n{room.hub_tail()}")
        try:
            if httpx.get(f"{room.url}/hub/api/", timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"jupyterhub did not answer in {HUB_START_S} s:\n{room.hub_tail()}")


def _stop_hub(room: Classroom) -> None:
    if room.hub is not None and room.hub.poll() is None:
        room.hub.send_signal(signal.SIGTERM)  # the hub stops every user's server, then the proxy
        try:
            room.hub.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(room.hub.pid, signal.SIGKILL)
            room.hub.wait(timeout=10)
    pid_file = room.state / "jupyterhub-proxy.pid"  # the proxy outlives a hub that was killed
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


@pytest.fixture
def room():
    if os.geteuid() != 0:
        pytest.skip("makes local Unix accounts for the class: run as root (CI does)")
    assert PROXY.is_file(), f"no {PROXY}: run scripts/install_system_deps.sh (it installs it from npm)"
    prefix = "n2lt" + secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix="n2l-classroom-", dir="/tmp"))
    base.chmod(0o755)
    (base / "home").mkdir(mode=0o755)
    room = Classroom(base=base, group=f"{prefix}-grp", exchange=base / "exchange", state=base / "hub",
                     names={"instructor": f"{prefix}-prof", "ana": f"{prefix}-ana", "ben": f"{prefix}-ben"})
    try:
        _make_accounts(room)
        _open_checkout(room)
        probe = room.as_user("ana", VENV / "bin" / "python", "-c", "import grader.classroom, nbgrader")
        assert probe.returncode == 0, f"a student account cannot run the course's venv: {probe.stderr}"
        _start_hub(room)
        _start_servers(room)
        yield room
    finally:
        print(f"--- hub log (last lines) ---\n{room.hub_tail(200)}")
        _stop_hub(room)
        _remove_accounts(room)


# -- the hub's and the servers' REST APIs --------------------------------------------------------

def _hub_api(room: Classroom, method: str, path: str, **kwargs):
    import httpx

    response = httpx.request(method, f"{room.url}/hub/api{path}", timeout=60, trust_env=False,
                             headers={"Authorization": f"token {room.admin_token}"}, **kwargs)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
    return response.json() if response.content else None


def _start_servers(room: Classroom) -> None:
    for role, name in room.names.items():
        room.tokens[role] = _hub_api(room, "POST", f"/users/{name}/tokens",
                                     json={"note": "classroom test", "expires_in": 3600,
                                           "scopes": [f"access:servers!user={name}"]})["token"]
        _hub_api(room, "POST", f"/users/{name}/server")
    deadline = time.monotonic() + SERVER_START_S
    waiting = set(room.names.values())
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            server = _hub_api(room, "GET", f"/users/{name}")["servers"].get("", {})
            if server.get("ready"):
                waiting.discard(name)
        time.sleep(1)
    assert not waiting, f"servers not ready after {SERVER_START_S} s: {waiting}\n{room.hub_tail()}"


def _user_api(room: Classroom, role: str, method: str, path: str, expect: int | None = 200,
              timeout: float = 120, **kwargs):
    """A request to that user's own server, through the proxy, with that user's hub token."""
    import httpx

    response = httpx.request(method, f"{room.url}/user/{room.names[role]}{path}", timeout=timeout,
                             trust_env=False,
                             headers={"Authorization": f"token {room.tokens[role]}"}, **kwargs)
    if expect is not None:
        assert response.status_code == expect, (f"{role}: {method} {path}: {response.status_code} "
                                                f"{response.text[:2000]}\n{room.hub_tail()}")
    return response


def _assignment_action(room: Classroom, role: str, action: str) -> dict:
    reply = _user_api(room, role, "POST", f"/assignments/{action}", timeout=300,
                      data={"course_id": classroom.COURSE_ID, "assignment_id": CHAPTER}).json()
    assert reply.get("success"), f"{role}: {action}: {reply}"
    return reply


def _statuses(reply: dict) -> set[str]:
    return {a["status"] for a in reply["value"] if a["assignment_id"] == CHAPTER}


# -- the tests ---------------------------------------------------------------------------------

def _page_config(room: Classroom, role: str) -> dict:
    page = _user_api(room, role, "GET", "/lab").text
    match = re.search(PAGE_CONFIG, page, re.S)
    assert match, f"{role}: no page config in /lab"
    return json.loads(match.group(1))


def _check_roles(room):
    """Students: the assignment list and Validate, no instructor tool and no news prompt (server
    extensions and JupyterLab plugins); instructors: every nbgrader tool."""
    nbgrader_tools, news = NBGRADER_TOOLS, NEWS
    for student in ("ana", "ben"):
        disabled = set(_page_config(room, student)["disabledExtensions"])
        assert nbgrader_tools | {news} <= disabled, disabled
        assert not {"@jupyter/nbgrader:assignment-list", "@jupyter/nbgrader:validate-assignment"} & disabled
        _user_api(room, student, "GET", "/formgrader", expect=404)
        _user_api(room, student, "GET", "/formgraders", expect=404)  # the course list
        _user_api(room, student, "GET", "/formgrader/api/status", expect=404)
        _user_api(room, student, "GET", "/assignments", params={"course_id": classroom.COURSE_ID})
    disabled = set(_page_config(room, "instructor")["disabledExtensions"])
    assert news in disabled and not nbgrader_tools & disabled, disabled
    _user_api(room, "instructor", "GET", "/formgraders")
    formgrader = _user_api(room, "instructor", "GET", "/formgrader", expect=None)
    assert formgrader.status_code != 404, "the instructor's server has no formgrader"


def _answer(room: Classroom, role: str, answers: dict[str, str]) -> None:
    path = f"/api/contents/{CHAPTER}/{CHAPTER}.ipynb"
    model = _user_api(room, role, "GET", path).json()
    notebook = fill_answers(nbformat.from_dict(model["content"]), answers)
    _user_api(room, role, "PUT", path, json={"type": "notebook", "format": "json", "content": notebook})


def _refusals(room: Classroom, paths: dict[str, Path]) -> dict[str, str]:
    """As ben, try to read each path (list a folder, read a file): "refused" or "allowed"."""
    script = ("import json, os, sys\nout = {}\n"
              "for key, path in json.loads(sys.argv[1]).items():\n"
              "    try:\n"
              "        os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read(1)\n"
              "        out[key] = 'allowed'\n"
              "    except PermissionError:\n"
              "        out[key] = 'refused'\n"
              "print(json.dumps(out))\n")
    result = room.as_user("ben", VENV / "bin" / "python", "-c", script,
                          json.dumps({k: str(v) for k, v in paths.items()}))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _grade_as_instructor(room: Classroom, workspace: Path) -> None:
    python = VENV / "bin" / "python"
    common = ["--chapter", CHAPTER, "--workspace", workspace]
    collect = room.as_user("instructor", python, "-m", "grader.classroom", "collect", *common,
                           "--exchange", room.exchange)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    auto = room.as_user("instructor", python, "-m", "grader", "autograde",
                        workspace / "classroom" / "submitted", *common,
                        "--jobs", "2", "--cell-timeout", "120", "--notebook-timeout", "600")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    report = room.as_user("instructor", python, "-m", "grader", "report", *common, "--no-similarity")
    assert report.returncode == 0, report.stdout + report.stderr
    feedback = room.as_user("instructor", python, "-m", "grader.classroom", "feedback", *common,
                            "--exchange", room.exchange)
    inbound = room.exchange / classroom.COURSE_ID / "inbound"
    listing = subprocess.run(["ls", "-laR", inbound, workspace / "classroom"], capture_output=True, text=True)
    assert feedback.returncode == 0, feedback.stdout + feedback.stderr + listing.stdout + collect.stderr


def _hidden_lines(source: nbformat.NotebookNode) -> list[str]:
    """Distinctive lines of the chapter's hidden tests (they must not reach a student)."""
    lines = []
    for cell in source.cells:
        text = "".join(cell.source)
        for block in re.findall(r"### BEGIN HIDDEN TESTS\n(.*?)### END HIDDEN TESTS", text, re.S):
            lines += [line.strip() for line in block.splitlines() if len(line.strip()) > 25]
    return lines


@pytest.mark.grader
def test_class_on_jupyterhub(room):
    """One test, one hub: xdist would give each test of a module its own hub and accounts."""
    _check_roles(room)
    source = nbformat.read(REPO / "solutions" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    solutions, points = cells_by_role(source)
    wrong = wrong_answers(CHAPTER)[0]
    workspace = room.home("instructor") / "grading"
    python = VENV / "bin" / "python"

    released = room.as_user("instructor", python, "-m", "grader.classroom", "release", "--chapter", CHAPTER,
                            "--workspace", workspace, "--exchange", room.exchange)
    assert released.returncode == 0, released.stdout + released.stderr

    for role, answers in [("ana", solutions), ("ben", {**solutions, **wrong["answers"]})]:
        listed = _user_api(room, role, "GET", "/assignments",
                           params={"course_id": classroom.COURSE_ID}).json()
        assert _statuses(listed) == {"released"}, listed
        assert _statuses(_assignment_action(room, role, "fetch")) == {"fetched"}
        _answer(room, role, answers)
    validated = _user_api(room, "ben", "POST", "/assignments/validate", timeout=300,
                          data={"path": f"{CHAPTER}/{CHAPTER}.ipynb"}).json()
    assert validated["success"] and validated["value"].get("failed"), validated
    for role in ("ana", "ben"):
        assert "submitted" in _statuses(_assignment_action(room, role, "submit"))

    inbound = room.exchange / classroom.COURSE_ID / "inbound"
    ana_sub = Path(glob.glob(str(inbound / f"{room.names['ana']}+{CHAPTER}+*"))[0])
    ben_sub = Path(glob.glob(str(inbound / f"{room.names['ben']}+{CHAPTER}+*"))[0])
    assert ana_sub.stat().st_mode & 0o007 == 0, oct(ana_sub.stat().st_mode)

    _grade_as_instructor(room, workspace)
    grades = read_grades(workspace, CHAPTER)
    total = sum(points.values())
    ana, ben = room.names["ana"], room.names["ben"]
    assert float(grades[ana]["score"]) == total, grades[ana]
    assert float(grades[ben]["score"]) == total - sum(points[g] for g in wrong["fails"]), grades[ben]

    hidden = _hidden_lines(source)
    assert hidden, "chapter 0 has hidden tests to look for"
    for role, student in [("ana", ana), ("ben", ben)]:
        _assignment_action(room, role, "fetch_feedback")
        listing = _user_api(room, role, "GET", f"/api/contents/{CHAPTER}/feedback").json()["content"]
        assert len(listing) == 1, listing  # one submission, one timestamp folder
        folder = urllib.parse.quote(listing[0]["path"])  # a timestamp: spaces and colons
        fetched = _user_api(room, role, "GET", f"/api/contents/{folder}/{CHAPTER}.html",
                            params={"format": "text"}).json()["content"]
        report_html = (workspace / "reports" / CHAPTER / "feedback" / f"{student}.html").read_text()
        assert fetched == report_html, f"{role} did not get their own report feedback"
        assert "HIDDEN TESTS" not in fetched
        assert not [line for line in hidden if html.escape(line) in fetched or line in fetched]
    other = (workspace / "reports" / CHAPTER / "feedback" / f"{ben}.html").read_text()
    assert other != (workspace / "reports" / CHAPTER / "feedback" / f"{ana}.html").read_text()

    outcome = _refusals(room, {
        "inbound folder": inbound, "ana's submission folder": ana_sub,
        "ana's submitted notebook": ana_sub / f"{CHAPTER}.ipynb",
        "ana's submission secret": ana_sub / "submission_secret.txt",
        "the feedback folder": room.exchange / classroom.COURSE_ID / "feedback",
        "ana's home": room.home("ana") / CHAPTER / f"{CHAPTER}.ipynb",
        "the gradebook": workspace / "gradebook.db",
        "ben's own submission": ben_sub / f"{CHAPTER}.ipynb",  # control: the check can see access
    })
    expected = {key: "refused" for key in outcome} | {"ben's own submission": "allowed"}
    assert outcome == expected


@pytest.mark.grader
def test_make_lab_is_a_student_lab(tmp_path):
    """`make lab` (its recipe as make prints it, run as it is) starts a student's JupyterLab: the
    assignment list and Validate, no formgrader, course list, create assignment or news prompt."""
    import httpx

    port, token = _free_port(), secrets.token_hex(16)
    printed = subprocess.run(["make", "-n", "lab", f"LAB_ARGS=--no-browser --ServerApp.ip=127.0.0.1 "
                              f"--ServerApp.port={port} --IdentityProvider.token={token}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    recipe = printed.stdout[printed.stdout.index("cd chapters"):]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        env[name] = str(tmp_path / name.lower())  # not the settings of whoever runs the test
    with open(tmp_path / "lab.log", "wb") as log:
        lab = subprocess.Popen(["bash", "-c", recipe], cwd=REPO, env={**env, "HOME": str(tmp_path)},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and lab.poll() is None:
            try:
                if httpx.get(f"{url}/api/status", headers=headers, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        log_text = (tmp_path / "lab.log").read_text(errors="replace")[-3000:]
        assert lab.poll() is None, f"make lab's server exited:\n{log_text}"

        def get(path: str, **kwargs) -> httpx.Response:
            return httpx.get(f"{url}{path}", headers=headers, trust_env=False, timeout=60, **kwargs)

        assert get("/formgrader").status_code == 404
        assert get("/formgraders").status_code == 404  # the course list
        assert get("/formgrader/api/status").status_code == 404
        assert get("/assignments", params={"course_id": classroom.COURSE_ID}).status_code == 200
        page = get("/lab").text
        config = json.loads(re.search(PAGE_CONFIG, page, re.S).group(1))
        disabled = set(config["disabledExtensions"])
        assert {*NBGRADER_TOOLS, NEWS} <= disabled
        assert "@jupyter/nbgrader:validate-assignment" not in disabled
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)


# -- what collect refuses (no accounts needed) -------------------------------------------------------

def test_collect_refuses_links_and_other_owners(tmp_path):
    """A submission must be a real folder owned by the account it names, holding only plain files:
    a link could make one of the instructor's files (the solutions) a student's submission."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    secret = tmp_path / "solutions.ipynb"
    secret.write_text("the answers")
    honest = tmp_path / f"{me}+ch00+2026-12-07 10:00:00 UTC+abc"
    honest.mkdir()
    (honest / "ch00.ipynb").write_text("{}")
    assert classroom.submission_problem(str(honest), me) == ""
    assert "owned by" in classroom.submission_problem(str(honest), "someone-else")
    linked = tmp_path / f"{me}+ch00+2026-12-07 11:00:00 UTC+def"
    linked.symlink_to(honest)
    assert "not a folder" in classroom.submission_problem(str(linked), me)
    inner = tmp_path / f"{me}+ch00+2026-12-07 12:00:00 UTC+ghi"
    inner.mkdir()
    (inner / "ch00.ipynb").symlink_to(secret)
    assert "not a plain file" in classroom.submission_problem(str(inner), me)


def test_copy_plain_tree_never_follows_a_link(tmp_path):
    """Even a link that appears after the check is not followed: it is left out of the copy."""
    secret = tmp_path / "solutions.ipynb"
    secret.write_text("the answers")
    src = tmp_path / "submission"
    (src / "sub").mkdir(parents=True)
    (src / "ch00.ipynb").write_text("mine")
    (src / "sub" / "notes.txt").write_text("notes")
    (src / "stolen.ipynb").symlink_to(secret)
    (src / "stolen_dir").symlink_to(tmp_path)
    classroom.copy_plain_tree(str(src), str(tmp_path / "copy"))
    copied = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*"))
    assert copied == ["ch00.ipynb", "sub", "sub/notes.txt"]
    assert (tmp_path / "copy" / "ch00.ipynb").read_text() == "mine"
    with pytest.raises(OSError):
        classroom.copy_plain_tree(str(tmp_path / "link-to-submission"), str(tmp_path / "copy2"))
    (tmp_path / "link-to-submission").symlink_to(src)
    with pytest.raises(OSError):  # the submission folder itself swapped for a link
        classroom.copy_plain_tree(str(tmp_path / "link-to-submission"), str(tmp_path / "copy3"))
