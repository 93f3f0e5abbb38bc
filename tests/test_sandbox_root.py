"""The grading sandbox when the grader runs as root (as CI does): what root does in the folder the
sandbox can write, and the memory limit of the whole sandbox.

- The launcher hands over to the sandbox's uid only the connection file nbgrader wrote, through
  a descriptor opened without following links: links planted in the runtime folder (to a
  root-only file, to a root-owned folder, in place of the connection file, a hardlink) change
  nothing outside, and ``remove_plan`` removes them without following them.
- A kernel that dies is graded again in a new, empty runtime folder (the real grader).
- The memory cgroup stops several processes plus files in /dev/shm and /tmp that together exceed
  the limit while each process stays under the per-process (address space) limit.
- The honest path: a kernel starts and runs code as the unprivileged uid.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest

from grader import sandbox
from tests.grading_helpers import REPO, read_grades, run_grader
from tests.mini_course import CHAPTER, MAX_SCORE, make_course, solved

pytestmark = [
    pytest.mark.grader,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only"),
    pytest.mark.skipif(os.geteuid() != 0, reason="these tests are about grading as root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed "
                       "(scripts/install_system_deps.sh)"),
]

MiB = 2**20


@pytest.fixture(scope="module")
def slot() -> int:
    """A sandbox slot (uid) no other grader or test worker on this machine uses."""
    return sandbox.reserve_slots(1)[0]


def _make_secret(folder: Path) -> tuple[Path, Path, str]:
    """A root-only folder (0700) holding a root-only file (0600), and the file's content."""
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    content = f"N2L-SECRET-{os.urandom(8).hex()}"
    path = folder / "secret.txt"
    path.write_text(content)
    os.chmod(path, 0o600)
    return folder, path, content


@pytest.fixture
def secret(tmp_path):
    return _make_secret(tmp_path / "root-only")


def _snapshot(*paths: Path) -> dict[str, tuple[int, int, int, int]]:
    """(mode, uid, gid, links) of each path, without following links."""
    return {str(p): (st.st_mode, st.st_uid, st.st_gid, st.st_nlink) for p in paths for st in [os.lstat(p)]}


def _save(plan: sandbox.Plan, folder: Path) -> Path:
    path = folder / "plan.json"
    path.write_text(json.dumps(asdict(plan)))
    return path


def _launcher(command: list[str], plan_path: Path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "grader.sandbox", *command], cwd=REPO,
                            env={**os.environ, sandbox.PLAN_ENV: str(plan_path)}, **kwargs)


def _connection_file(plan: sandbox.Plan, name: str) -> str:
    """A connection file as nbgrader's jupyter_client writes it (as root, 0600, ipc sockets)."""
    from jupyter_client.connect import write_connection_file

    path, _ = write_connection_file(os.path.join(plan.runtime_dir, name), transport="ipc",
                                    ip=os.path.join(plan.runtime_dir, "kernel"))
    return path


@pytest.mark.parametrize("planted", ["symlink to a root-only file", "symlink to a root-owned folder",
                                     "hardlink to a root-only file", "fifo"])
def test_launcher_refuses_a_planted_connection_file(slot, secret, tmp_path, planted):
    """The connection file replaced by a link: the launcher refuses to start, chowns nothing."""
    folder, path, content = secret
    plan = sandbox.make_plan(slot=slot, env={}, limits=sandbox.Limits(cpu_seconds=30))
    try:
        connection = Path(plan.runtime_dir) / "kernel-planted.json"
        if planted.startswith("symlink"):
            connection.symlink_to(path if "file" in planted else folder)
        elif planted.startswith("hardlink"):
            os.link(path, connection)  # the runtime folder and tmp_path are both in /tmp
        else:
            os.mkfifo(connection)
        before = _snapshot(folder, path, connection)
        proc = _launcher(["kernel", "-f", str(connection)], _save(plan, tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "refusing the connection file" in err, (out, err)
        assert _snapshot(folder, path, connection) == before
        assert content not in out + err
    finally:
        sandbox.remove_plan(plan)
    assert path.read_text() == content and not os.path.exists(plan.runtime_dir)


def _execute(client, code: str, timeout: float = 60) -> str:
    """Run ``code`` in the kernel; everything it printed (and its error, if any)."""
    msg_id = client.execute(code)
    texts = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        content = msg["content"]
        if msg["msg_type"] == "stream":
            texts.append(content["text"])
        elif msg["msg_type"] == "error":
            texts.append(f"{content['ename']}: {content['evalue']}")
        elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
            return "".join(texts)
    raise AssertionError(f"no reply in {timeout} s; so far: {''.join(texts)!r}")


PLANT = """\
import os, stat
from ipykernel.connect import get_connection_file
cf = get_connection_file()
run = os.path.dirname(cf)
print("uid", os.getuid(), os.getgid(), "groups", os.getgroups())
for p in [SECRET, os.path.join(run, "planted-file"), os.path.join(run, "planted-dir", "secret.txt")]:
    try:
        print("LEAK", open(p).read())
    except OSError as e:
        print("blocked", p, type(e).__name__)
os.symlink(SECRET, os.path.join(run, "inside-file"))
os.symlink(SECRET_DIR, os.path.join(run, "inside-dir"))
try:
    os.link(SECRET, os.path.join(run, "inside-hard"))
except OSError as e:
    print("no hardlink", type(e).__name__)
os.rename(cf, cf + ".old")
os.symlink(SECRET, cf)
st = os.stat(run)
print("runtime", oct(stat.S_IMODE(st.st_mode)), "chmod:", end=" ")
try:
    os.chmod(run, 0o777)
    print("allowed")
except OSError as e:
    print(type(e).__name__)
"""


def test_kernel_runs_as_the_sandbox_uid_and_root_follows_no_planted_link(slot, secret, tmp_path):
    """The honest path (a kernel starts, runs code as the unprivileged uid), with links to a
    root-only file and folder planted in its runtime folder, before it starts and from inside;
    then a second kernel started in that same dirty folder (what a retry used to do). Nothing
    outside changes owner or mode, nothing reads the secret, and removing the plan follows no link."""
    from jupyter_client import BlockingKernelClient

    folder, path, content = secret
    plan = sandbox.make_plan(slot=slot, env={}, limits=sandbox.Limits(cpu_seconds=60))
    # The secret at the same path inside as outside, like a file under /etc or the venv would be.
    plan.ro_binds.append((str(folder), str(folder)))
    plan_path = _save(plan, tmp_path)
    runtime = Path(plan.runtime_dir)
    (runtime / "planted-file").symlink_to(path)
    (runtime / "planted-dir").symlink_to(folder)
    before = _snapshot(folder, path)
    outputs = []
    try:
        for attempt in (1, 2):
            connection = _connection_file(plan, f"kernel-attempt{attempt}.json")
            kernel = _launcher(["kernel", "-f", connection], plan_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            client = BlockingKernelClient(connection_file=connection)
            client.load_connection_file()
            client.start_channels()
            try:
                client.wait_for_ready(timeout=60)
                code = f"SECRET = {str(path)!r}\nSECRET_DIR = {str(folder)!r}\n" + PLANT
                if attempt == 2:  # the names are taken now
                    code = code.replace('"inside-', '"inside2-')
                outputs.append(_execute(client, code))
            finally:
                client.stop_channels()
                kernel.kill()
                outputs.append(kernel.communicate(timeout=30)[0])
            assert _snapshot(folder, path) == before, outputs
        printed = outputs[0] + outputs[2]
        assert f"uid {sandbox.FIRST_UID + slot} {sandbox.FIRST_UID + slot} groups []" in printed, outputs
        assert "LEAK" not in printed and "blocked" in printed, outputs
        # Root's folder, group-writable (jupyter_client adds the sticky bit): the kernel cannot
        # chmod it, nor (sticky /tmp) rename it.
        assert "770 chmod: PermissionError" in printed, outputs
        planted = {p.name for p in runtime.iterdir()}
        assert {"planted-file", "inside-file", "inside-dir", "inside2-file"} <= planted, planted
    finally:
        sandbox.remove_plan(plan)
    assert not runtime.exists() and not (plan.cgroup and os.path.exists(plan.cgroup))
    assert _snapshot(folder, path) == before and path.read_text() == content
    assert content not in "".join(outputs)


def _memory_workload(processes: int, each: int, files: int) -> str:
    """Code that writes ``files`` bytes to each of /dev/shm and /tmp, then starts ``processes``
    Pythons that each fill ``each`` bytes and wait; prints ALL-ALLOCATED if everything succeeded."""
    return f"""\
import subprocess, sys
for folder in ("/dev/shm", "/tmp"):
    with open(folder + "/fill", "wb") as f:
        for _ in range({files // MiB}):
            f.write(b"x" * {MiB})
print("files written", flush=True)
child = "import time; b = b'x' * {each}; print('filled', flush=True); time.sleep(1)"
kids = [subprocess.Popen([sys.executable, "-c", child]) for _ in range({processes})]
codes = [k.wait() for k in kids]
print("children", codes, flush=True)
if codes == [0] * {processes}:
    print("ALL-ALLOCATED")
"""


def _cgroup_stats(cgroup: str) -> dict[str, int]:
    """Peak usage and OOM kills of a cgroup (v1 or v2)."""
    folder = Path(cgroup)
    if (folder / "memory.max_usage_in_bytes").exists():
        peak = int((folder / "memory.max_usage_in_bytes").read_text())
        events = (folder / "memory.oom_control").read_text()
    else:
        peak = int((folder / "memory.peak").read_text()) if (folder / "memory.peak").exists() else 0
        events = (folder / "memory.events").read_text()
    kills = dict(line.split() for line in events.splitlines()).get("oom_kill", "0")
    return {"peak": peak, "oom_kills": int(kills)}


def test_memory_limit_covers_the_whole_sandbox(slot, tmp_path):
    """Four processes of 96 MiB and 2 x 64 MiB in /dev/shm and /tmp: each process is far under the
    per-process limit (1 GiB of address space), together they exceed the sandbox's 256 MiB."""
    code = _memory_workload(processes=4, each=96 * MiB, files=64 * MiB)
    results = {}
    for memory in (256 * MiB, None):  # None: the per-process limit only, the control
        limits = sandbox.Limits(cpu_seconds=60, memory_bytes=memory, address_space_bytes=1024 * MiB)
        plan = sandbox.make_plan(slot=slot, env={}, limits=limits)
        try:
            if memory is not None:
                assert plan.memory_limit == "sandbox" and plan.whole_sandbox_memory_limit, plan.memory_note
            else:
                assert plan.memory_limit == "process" and plan.cgroup is None
            proc = _launcher(["run", "--", "python", "-c", code], _save(plan, tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate(timeout=60)
            stats = _cgroup_stats(plan.cgroup) if plan.cgroup else {}
            results[memory] = (proc.returncode, out, err, stats)
        finally:
            sandbox.remove_plan(plan)
        assert not (plan.cgroup and os.path.exists(plan.cgroup)), "the cgroup was not removed"
    code_, out, err, _ = results[None]
    assert "ALL-ALLOCATED" in out, (code_, out, err)  # the workload fits the per-process limit
    code_, out, err, stats = results[256 * MiB]
    assert "ALL-ALLOCATED" not in out, (code_, out, err)
    assert stats["oom_kills"] >= 1 and stats["peak"] <= 256 * MiB, stats
    print(f"whole-sandbox limit 256 MiB: peak {stats['peak'] / MiB:.0f} MiB, "
          f"{stats['oom_kills']} OOM kill(s), exit {code_}; output: {out.strip()!r}")


def _planter(secret_dir: Path, secret_file: Path) -> str:
    """An answer cell that plants links to the secret in its runtime folder and kills its kernel;
    in a runtime folder a dead kernel left behind (the old retry), it reads them instead."""
    return f"""\
import os
from ipykernel.connect import get_connection_file
_cf = get_connection_file()
_run = os.path.dirname(_cf)
_planted = sorted(n for n in os.listdir(_run) if n.startswith("planted-"))
for _p in [os.path.join(_run, "planted-file"), os.path.join(_run, "planted-dir", "secret.txt"),
           {str(secret_file)!r}]:
    try:
        print("LEAK", open(_p).read())
    except OSError as _e:
        print("blocked", _p, type(_e).__name__)
if not _planted:
    os.symlink({str(secret_file)!r}, os.path.join(_run, "planted-file"))
    os.symlink({str(secret_dir)!r}, os.path.join(_run, "planted-dir"))
    try:
        os.link({str(secret_file)!r}, os.path.join(_run, "planted-hard"))
    except OSError as _e:
        print("no hardlink", type(_e).__name__)
    os.rename(_cf, _cf + ".old")
    os.symlink({str(secret_file)!r}, _cf)
    os._exit(1)


def add(a, b):
    return a + b
"""


def test_retry_after_a_kernel_death_gets_a_fresh_runtime_folder(tmp_path):
    """Through the real grader: a student plants links to a root-only file and folder (visible in
    the sandbox at the same path, as under /etc) and ends the kernel; the retry runs in a new,
    empty folder, so the submission dies twice and is an error; nothing outside changed owner or
    mode and the secret is in no output, log or file of the workspace. An honest student in the
    same batch is graded in full."""
    if not os.access("/etc", os.W_OK):
        pytest.skip("/etc is not writable: the secret must be at a path the sandbox also sees")
    folder = Path(tempfile.mkdtemp(prefix="n2l-test-secret-", dir="/etc"))
    try:
        os.chmod(folder, 0o700)
        path = folder / "secret.txt"
        content = f"N2L-SECRET-{os.urandom(8).hex()}"
        path.write_text(content)
        os.chmod(path, 0o600)
        before = _snapshot(folder, path)
        course = make_course(tmp_path / "course")
        assert run_grader("release", root=course).returncode == 0
        release = nbformat.read(course / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
        subs, workspace = tmp_path / "subs", tmp_path / "grading"
        for student, answers in {"planter": {"ex1_add": _planter(folder, path)}, "honest": {}}.items():
            (subs / student).mkdir(parents=True)
            nbformat.write(solved(release, **answers), str(subs / student / f"{CHAPTER}.ipynb"))
        result = run_grader("autograde", subs, "--chapter", CHAPTER, "--workspace", workspace,
                            "--jobs", "2", "--cell-timeout", "30", "--notebook-timeout", "120",
                            root=course, timeout=300)
        after = _snapshot(folder, path)
        status = json.loads((workspace / "status" / f"{CHAPTER}.json").read_text())["records"]
        report = run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, root=course)
        # Everything the grader wrote: graded notebooks, logs, status, gradebook, feedback, reports.
        leaked = [str(p) for p in workspace.rglob("*") if p.is_file() and content.encode() in p.read_bytes()]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert after == before
    outputs = result.stdout + result.stderr + report.stdout + report.stderr
    assert content not in outputs and leaked == [], leaked
    planter, honest = status["planter"], status["honest"]
    assert planter["status"] == "error" and "on two runs" in planter["message"], (planter, result.stdout)
    assert honest["status"] == "graded" and not honest["flags"], honest
    assert report.returncode == 0, report.stderr
    assert read_grades(workspace, CHAPTER)["honest"]["score"] == str(MAX_SCORE)
