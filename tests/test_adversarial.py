"""Adversarial submissions: one per threat of the grader's threat model (see docs/trust-model.md).

All of them are graded in one batch of the mini course (tests/mini_course.py: three exercises
worth 1, 2 and 3 points). Each test asserts the exact score and the flags of one submission;
the last ones assert that nothing outside the student's sandbox changed: the course tree, the
workspace's source, release and config, a file beside the workspace, and no process survived.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import nbformat
import pytest

from grader.sandbox import FIRST_UID, STUDENT_ENV, TRUSTED_SLOT_OFFSET
from tests.grading_helpers import once_per_session, read_grades, run_grader, tree_digest
from tests.mini_course import CHAPTER, MAX_SCORE, make_course, solved

pytestmark = pytest.mark.grader  # the real grader: make test runs these, make check does not

CORRECT_ADD = "def add(a, b):\n    return a + b\n"


def _cases(paths: dict[str, str]) -> dict[str, dict]:
    """student -> {"answers": {...}} or {"edit": callable}; ``paths`` are the secrets to try."""
    reader = f"""\
import os
_leaks = []
for _p in {list(paths["secrets"])!r}:
    try:
        with open(_p, "rb") as _f:
            _leaks.append(_p)
    except OSError:
        pass
_leaks += [k for k in os.environ if k.startswith(("COURSE_", "PG", "NBGRADER", "JUPYTER_RUNTIME"))
           and k not in {STUDENT_ENV!r}]
print("leaks:", _leaks)


def add(a, b):
    return a + b if not _leaks else a - b
"""
    writer = f"""\
import subprocess
for _p in {list(paths["targets"])!r}:
    try:
        with open(_p, "w") as _f:
            _f.write("overwritten by a student")
    except OSError as _e:
        print("blocked:", _p, type(_e).__name__)
try:
    subprocess.Popen(["sleep", "{paths["sleep"]}"], start_new_session=True)
except OSError as _e:
    print("no sleep:", _e)


def add(a, b):
    return a + b
"""
    network = f"""\
import socket
try:
    socket.create_connection(("127.0.0.1", {paths["port"]}), timeout=3).sendall(b"leak")
    _open = True
except OSError:
    _open = False


def add(a, b):
    return a + b if not _open else a - b
"""
    forker = """\
import os
import time
_children = 0
try:
    while _children < 100_000:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        _children += 1
except OSError as _e:
    print("fork stopped after", _children, type(_e).__name__)
for _ in range(_children):  # reap them, so that the tests can start threads again
    os.wait()


def add(a, b):
    return a + b
"""
    memory = """\
try:
    _hog = bytearray(64 * 2**30)
except MemoryError:
    print("64 GiB refused")


def add(a, b):
    return a + b
"""
    disk = """\
print("x" * 30_000_000)  # a giant output
try:
    with open("big.bin", "wb") as _f:
        for _ in range(4096):
            _f.write(b"\\0" * 2**20)
except OSError as _e:
    print("big file stopped:", type(_e).__name__)
try:
    for _i in range(10_000):
        with open(f"many_{_i}.bin", "wb") as _f:
            _f.write(b"\\0" * 2**20 * 8)
except OSError as _e:
    print("many files stopped:", type(_e).__name__)


def add(a, b):
    return a + b
"""
    always_equal = """\
class Yes(float):
    def __eq__(self, other):
        return True

    def __sub__(self, other):
        return 0.0

    def __rsub__(self, other):
        return 0.0

    def __abs__(self):
        return 0.0


def add(a, b):
    return Yes(0)
"""
    patcher = """\
import course_lib.checks as _checks

_checks.check_equal = lambda *args, **kwargs: None


def add(a, b):
    return a - b
"""
    hooker = """\
get_ipython().input_transformers_cleanup.append(lambda lines: ["pass\\n"])


def add(a, b):
    return a + b
"""
    silencer = """\
get_ipython().showtraceback = lambda *args, **kwargs: None


def add(a, b):
    return a - b
"""
    loop = """\
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    pass
"""
    killer = """\
import os
import signal

for _pid in (os.getppid(), 1):
    try:
        os.kill(_pid, signal.SIGKILL)
    except OSError as _e:
        print("cannot kill", _pid, _e)


def add(a, b):
    return a + b
"""
    honest = """\
import sys
import time
import warnings

warnings.warn("this API is deprecated")
print("training...", file=sys.stderr)
time.sleep(2)


def add(a, b):
    return a + b
"""

    def delete_and_edit(nb):
        nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") != "ex1_add_tests"]
        for cell in nb.cells:
            if cell.metadata.get("nbgrader", {}).get("grade_id") == "ex2_square_tests":
                cell.source = "pass\n"
        return nb

    def change_points(nb):
        for cell in nb.cells:
            if cell.metadata.get("nbgrader", {}).get("grade_id") == "ex1_add_tests":
                cell.metadata["nbgrader"]["points"] = 100
        return nb

    return {
        "reader": {"answers": {"ex1_add": reader}},
        "writer": {"answers": {"ex1_add": writer}},
        "network": {"answers": {"ex1_add": network}},
        "forker": {"answers": {"ex1_add": forker}},
        "memory": {"answers": {"ex1_add": memory}},
        "disk": {"answers": {"ex1_add": disk}},
        "exiter": {"answers": {"ex1_add": "import os\nos._exit(1)\n" + CORRECT_ADD}},
        "killer": {"answers": {"ex1_add": killer}},
        "loop": {"answers": {"ex1_add": loop}},
        "alwayseq": {"answers": {"ex1_add": always_equal}},
        "patcher": {"answers": {"ex1_add": patcher}},
        # The hook turns every later cell into `pass`, the wrong square's tests included.
        "hooker": {"answers": {"ex1_add": hooker, "ex2_square": "def square(x):\n    return x + x\n"}},
        "silencer": {"answers": {"ex1_add": silencer}},
        "celleditor": {"answers": {"ex2_square": "def square(x):\n    return x + x\n"},
                       "edit": delete_and_edit},
        "metaeditor": {"answers": {}, "edit": change_points},
        "honest": {"answers": {"ex1_add": honest}},
    }


def _processes_of_sandbox_uids() -> list[str]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        uid = int(next(line for line in text.splitlines() if line.startswith("Uid:")).split()[1])
        if FIRST_UID <= uid < FIRST_UID + TRUSTED_SLOT_OFFSET + 1000:  # kernels' and trusted checks
            found.append(f"{status.parent.name} uid {uid}")
    return found


def _grade(folder: Path) -> dict:
    course = make_course(folder / "course")
    assert run_grader("release", root=course).returncode == 0
    release = nbformat.read(course / "chapters" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    workspace = folder / "grading"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(1)
    connections = []

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0].recv(16).decode(errors="replace"))
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    outside = folder / "outside.txt"
    outside.write_text("instructor's file")
    sleep_marker = "317"
    paths = {
        "secrets": [str(course / "solutions" / CHAPTER / f"{CHAPTER}.ipynb"), str(workspace / "gradebook.db"),
                    str(workspace / "source" / CHAPTER / f"{CHAPTER}.ipynb"),
                    str(workspace / "autograded" / "reader" / CHAPTER / f"{CHAPTER}.ipynb"),
                    str(workspace / "nbgrader_config.py"), "/root/.bash_history", "/etc/shadow",
                    # where the trusted checks' specs used to be mounted, and the grader's package
                    "/opt/n2l/probes.py", "/opt/n2l/lib/grader/probes.py"],
        "targets": [str(outside), str(workspace / "gradebook.db"), str(workspace / "nbgrader_config.py"),
                    str(workspace / "submitted" / "honest" / CHAPTER / f"{CHAPTER}.ipynb"),
                    str(course / "solutions" / CHAPTER / f"{CHAPTER}.ipynb")],
        "port": listener.getsockname()[1],
        "sleep": sleep_marker,
    }
    subs = folder / "subs"
    for student, case in _cases(paths).items():
        nb = solved(release, **case["answers"])
        if "edit" in case:
            nb = case["edit"](nb)
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, str(subs / student / f"{CHAPTER}.ipynb"))
    course_before = tree_digest(course)
    outside_before = outside.read_text()
    result = run_grader("autograde", subs, "--chapter", CHAPTER, "--workspace", workspace, "--jobs", "2",
                        "--cell-timeout", "60", "--notebook-timeout", "150", root=course)
    config = (workspace / "nbgrader_config.py").read_text()
    report = run_grader("report", "--chapter", CHAPTER, "--workspace", workspace, "--no-feedback",
                        root=course)
    stop.set()
    thread.join()
    listener.close()
    leftovers = subprocess.run(["pgrep", "-f", f"sleep {sleep_marker}"], capture_output=True, text=True)
    status = json.loads((workspace / "status" / f"{CHAPTER}.json").read_text())
    return {
        "stdout": result.stdout, "stderr": result.stderr, "report": report.returncode,
        "grades": read_grades(workspace, CHAPTER),
        "flags": {k: v.get("flags", []) for k, v in status["records"].items()},
        "course_changed": course_before != tree_digest(course),
        "outside": outside.read_text() == outside_before,
        "config_rewritten_only_by_grader": "overwritten" not in config,
        "gradebook_ok": b"overwritten" not in (workspace / "gradebook.db").read_bytes(),
        "connections": connections, "leftover_sleep": leftovers.stdout.split(),
        "sandbox_processes": _processes_of_sandbox_uids(),
    }


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    return once_per_session(tmp_path_factory, "adversarial", _grade)


def _row(batch, student):
    return batch["grades"][student]


def _flags(batch, student) -> str:
    return "\n".join(batch["flags"][student])


@pytest.mark.parametrize("student", ["reader", "writer", "network", "forker", "memory", "disk", "killer",
                                     "honest"])
def test_contained_attacks_cost_nothing_and_change_nothing(batch, student):
    """Reading secrets, writing outside, the network, fork/memory/disk bombs, killing the parent:
    all blocked by the sandbox, so the (otherwise correct) submission gets full marks."""
    row = _row(batch, student)
    assert (row["status"], row["score"]) == ("graded", str(MAX_SCORE)), (row, _flags(batch, student))


def test_honest_student_is_not_flagged(batch):
    assert batch["flags"]["honest"] == []


@pytest.mark.parametrize("student, words", [
    ("reader", "reads environment variables"), ("writer", "process control (subprocess)"),
    ("network", "network (socket)"), ("forker", "process control (os.fork)"),
    ("killer", "process control (os.kill)"),
])
def test_suspicious_constructs_are_flagged(batch, student, words):
    assert words in _flags(batch, student)


def test_faked_pass_is_overruled_by_the_trusted_check(batch):
    row = _row(batch, "patcher")
    assert row["ex1_add_tests"] == "0" and row["score"] == str(MAX_SCORE - 1), row
    flags = _flags(batch, "patcher")
    assert "trusted check overrules a pass in ex1_add_tests" in flags, flags
    assert "patches a library (_checks.check_equal" in flags, flags


def test_always_equal_object_scores_nothing(batch):
    """Whether or not it fools the in-kernel test, the trusted check compares plain numbers."""
    row = _row(batch, "alwayseq")
    assert row["ex1_add_tests"] == "0" and row["score"] == str(MAX_SCORE - 1), row
    assert "defines __eq__" in _flags(batch, "alwayseq")


def test_suppressed_tracebacks_still_fail(batch):
    row = _row(batch, "silencer")
    assert row["ex1_add_tests"] == "0" and row["score"] == str(MAX_SCORE - 1), row
    assert "traceback suppression" in _flags(batch, "silencer")


def test_rewriting_later_cells_earns_nothing(batch):
    """Every in-kernel test passes (rewritten to `pass`); the trusted checks, which never ran in
    that kernel, grade the answers themselves: the right ones keep their points, the wrong one
    scores 0."""
    row = _row(batch, "hooker")
    assert row["ex2_square_tests"] == "0" and row["score"] == str(MAX_SCORE - 2), row
    flags = _flags(batch, "hooker")
    assert flags.count("trusted check overrules") == 1 and "IPython hooks" in flags, flags


def test_kernel_suicide_is_an_error_not_a_zero(batch):
    row = _row(batch, "exiter")
    assert row["status"] == "error" and row["score"] == "", row
    assert "the kernel died" in row["message"] and "kernel death" in _flags(batch, "exiter")


def test_uninterruptible_loop_is_an_error_not_a_zero(batch):
    row = _row(batch, "loop")
    assert row["status"] in {"error", "timeout"} and row["score"] == "", row
    assert "kernel death" in _flags(batch, "loop") or "timeout" in _flags(batch, "loop")


def test_locked_cells_restored_and_flagged(batch):
    row = _row(batch, "celleditor")
    # The deleted test cell is put back and graded; the edited one is restored and fails.
    assert row["ex1_add_tests"] == "1" and row["ex2_square_tests"] == "0", row
    flags = _flags(batch, "celleditor")
    assert "locked cell ex1_add_tests deleted" in flags and "locked cell ex2_square_tests edited" in flags


def test_changed_points_are_flagged_and_ignored(batch):
    row = _row(batch, "metaeditor")
    assert row["score"] == str(MAX_SCORE), row
    assert "metadata of ex1_add_tests changed (points)" in _flags(batch, "metaeditor")


def test_nothing_outside_the_sandbox_changed(batch):
    assert not batch["course_changed"]
    assert batch["outside"]
    assert batch["config_rewritten_only_by_grader"]
    assert batch["gradebook_ok"]
    assert batch["connections"] == []


def test_no_process_survives(batch):
    assert batch["leftover_sleep"] == []
    assert batch["report"] == 0
