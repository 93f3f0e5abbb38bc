"""The sandbox every student's kernel runs in while it is graded (Linux, bubblewrap).

The executor (nbgrader, outside) talks to the kernel (inside) over ZMQ ``ipc`` sockets in one
folder that both can see; everything else the kernel sees is an allow-list of read-only mounts:

    /usr /etc (and the /bin, /lib symlinks)     the system, read-only
    <python home> <venv>                          the interpreter and the course's packages, read-only
    /opt/n2l/lib/course_lib                       the course package (PYTHONPATH), read-only
    <runtime>                                     connection file + sockets of this kernel only
    /home/student, /tmp                           size-limited tmpfs, the kernel's working dir

so hidden tests, the course source, the gradebook and other students' work are not there at all.
It has no network (its own empty network namespace), its own pid namespace (it cannot see or
signal the grader; when the sandbox ends every process in it ends), and resource limits (CPU
seconds, address space, processes, file size, open files). The kernel runs as an unprivileged
uid even when the grader runs as root: each parallel worker has its own uid, so one student's
fork bomb cannot starve the next. The grader kills the whole sandbox at the notebook time limit.

Memory (``Limits.memory_bytes``): where the grader can make a memory cgroup (root with a writable
memory controller, cgroup v1 or v2) each sandbox gets one of its own, and the launcher enters it
before it becomes bubblewrap, so the limit covers the whole sandbox: every process in it, and
the pages of its tmpfs (/tmp, /home/student, /dev/shm), which are charged to the cgroup that
writes them. Past it the kernel's OOM killer ends the sandbox's largest process (with cgroup
v2: all of them), usually the Jupyter kernel. Elsewhere only the per-process address-space limit
(RLIMIT_AS, ``Limits.address_space_bytes``) applies: several processes, or files in the tmpfs,
can together use more. ``Plan.memory_limit`` says which one is in force.

Root only ever touches, in the runtime folder the sandbox can write, the one connection file it
hands over to the sandbox's uid (opened without following links, checked to be a regular file
it owns with one link, chowned through that descriptor). The folder itself is root's (group:
the sandbox's uid), made fresh for every kernel, and removed with ``shutil.rmtree``, which does
not follow links.

Started as root, a private mount namespace is made first (``unshare``) and every mount source is
bind-mounted onto a staging folder there: the unprivileged bubblewrap can then mount it even when
the original lies in a folder that uid cannot enter (a Python under /root/.pyenv, a workspace in
~root). Nothing is mounted on the host.

``python -m grader.sandbox kernel -f CONNECTION_FILE`` is the kernelspec's command: it reads the
plan written by the grader (``COURSE_SANDBOX_PLAN``), applies it, and becomes bubblewrap.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KERNEL_NAME = "n2l-sandbox"
PLAN_ENV = "COURSE_SANDBOX_PLAN"
# The course settings a student may set (docs/architecture.md, "Environment variables"); the
# grader's own COURSE_* variables stay outside.
STUDENT_ENV = ("COURSE_QUICK", "COURSE_DEVICE", "COURSE_CACHE_DIR")
HOME = "/home/student"
LIB = "/opt/n2l/lib"
# Each parallel worker runs its kernels as its own uid (only when the grader is root).
FIRST_UID = 61000
# The trusted checks' sandboxes (grader/trusted.py) use slot + this: uids after every worker's.
TRUSTED_SLOT_OFFSET = 4000
CGROUP_PREFIX = "n2l-sandbox-"


@dataclass
class Limits:
    cpu_seconds: int = 7200
    # All the memory of one sandbox: its processes and its tmpfs pages (a memory cgroup, where the
    # grader can make one; see Plan.memory_limit). None: no such limit.
    memory_bytes: int | None = 16 * 2**30
    # Per process, always (RLIMIT_AS). None: no limit (CUDA needs a very large one).
    address_space_bytes: int | None = 16 * 2**30
    processes: int = 1024  # threads count too: torch and ipykernel start dozens
    file_bytes: int = 512 * 2**20
    open_files: int = 4096
    tmpfs_bytes: int = 1024 * 2**20  # each of /home/student and /tmp


@dataclass
class Plan:
    """Everything the launcher needs; written as JSON by the grader, read inside the kernelspec."""

    runtime_dir: str  # connection file and ipc sockets (read-write inside)
    stage_dir: str  # where a root launcher stages its mounts (removed by the grader afterwards)
    uid: int | None  # the unprivileged uid to become (None: not root, keep our own)
    ro_binds: list[tuple[str, str]] = field(default_factory=list)  # (host path, sandbox path)
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    gpu: bool = False
    # The memory cgroup the launcher enters (None: none could be made, see memory_note).
    cgroup: str | None = None
    # What limits memory: "sandbox" (Limits.memory_bytes for all the sandbox's processes and
    # tmpfs together), "process" (only each process's address space) or "none".
    memory_limit: str = "none"
    memory_note: str = ""  # why the whole-sandbox limit is not in force, when it is not
    # The command runs as the sandbox's pid 1 (bubblewrap's --as-pid-1): the kernel ignores
    # signals sent to it from inside, so the processes it starts cannot kill it.
    as_pid_1: bool = False

    @property
    def whole_sandbox_memory_limit(self) -> bool:
        return self.memory_limit == "sandbox"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str) -> Plan:
        data = json.loads(Path(path).read_text())
        data["limits"] = Limits(**data["limits"])
        data["ro_binds"] = [tuple(b) for b in data["ro_binds"]]
        return cls(**data)


class SandboxUnavailable(RuntimeError):
    """No sandbox can start here; the message says why and what to do."""


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SandboxUnavailable(f"the package {name} cannot be found")
    return str(Path(list(spec.submodule_search_locations)[0]).resolve())


_RESERVED: list = []  # open lock files: a slot stays ours until this process ends


def reserve_slots(count: int) -> list[int]:
    """``count`` sandbox slots (each one unprivileged uid) no other grader on this machine uses.

    Two graders at once (two instructors, parallel tests) must not share a uid: the end of one
    student's grading kills every process of its uid. A slot is held by an flock on a file in
    /tmp, released by the kernel when this process ends, even after a crash.
    """
    import fcntl

    slots = []
    for slot in range(TRUSTED_SLOT_OFFSET):
        if len(slots) == count:
            break
        try:
            handle = open(f"/tmp/n2l-sandbox-slot-{slot}.lock", "a")  # noqa: SIM115 - held on purpose
        except PermissionError:  # another account's lock file (root's, another instructor's): taken
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _RESERVED.append(handle)
        slots.append(slot)
    if len(slots) < count:
        raise SandboxUnavailable(f"only {len(slots)} free sandbox slots for {count} workers")
    return slots


def gpu_devices() -> list[str]:
    return sorted(glob.glob("/dev/nvidia*"))


# -- the memory cgroup of one sandbox -------------------------------------------------------------


class _NoCgroup(Exception):
    """No memory cgroup can be made here; the message says why."""


def _memory_controller() -> tuple[int, Path]:
    """(cgroup version, folder to make the sandbox's cgroup in) of the memory controller."""
    mounts, own = _cgroup_mounts(), _own_cgroups()
    for kind, root, mountpoint, options in mounts:
        if kind == "cgroup" and "memory" in options:
            path = next((p for c, p in own.items() if "memory" in c.split(",")), None)
            folder = _own_folder(root, mountpoint, path)
            return 1, folder if folder.is_dir() else mountpoint
    for kind, root, mountpoint, _ in mounts:
        try:
            available = (mountpoint / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if kind == "cgroup2" and "memory" in available:
            return 2, _memory_delegating_ancestor(_own_folder(root, mountpoint, own.get("v2")), mountpoint)
    raise _NoCgroup("no memory cgroup controller is mounted")


def _cgroup_mounts() -> list[tuple[str, str, Path, list[str]]]:
    """``(kind, root, mountpoint, super options)`` of each cgroup (v1) and cgroup2 mount."""
    mounts = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in {"cgroup", "cgroup2"}:
                mounts.append((tail[0], fields[3], Path(fields[4]), tail[2].split(",")))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 hierarchy (by its controllers, e.g. "memory") and "v2"."""
    own = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            own["v2" if hierarchy == "0" else controllers] = path
    return own


def _own_folder(root: str, mountpoint: Path, path: str | None) -> Path:
    """Our own cgroup as a folder of this mount (its root is "/" unless it is a container's)."""
    if path is not None and (root == "/" or path == root or path.startswith(root + "/")):
        return mountpoint / path[len(root.rstrip("/")):].lstrip("/")
    return mountpoint


def _memory_delegating_ancestor(own: Path, mountpoint: Path) -> Path:
    """A cgroup with processes cannot give controllers to its children: the sandbox's is made
    beside ours, in the nearest ancestor (``own`` included) that hands the memory controller down."""
    folder = own
    while True:
        try:
            if "memory" in (folder / "cgroup.subtree_control").read_text().split():
                return folder
        except OSError:
            pass
        if folder == mountpoint:
            break
        folder = folder.parent
    raise _NoCgroup(f"no cgroup above {own} enables the memory controller for its children")


def _make_memory_cgroup(slot: int, limit: int) -> str:
    """A new memory cgroup limited to ``limit`` bytes (memory and swap), for one sandbox."""
    if os.geteuid() != 0:
        raise _NoCgroup("the grader is not root")
    version, parent = _memory_controller()
    if not os.access(parent, os.W_OK):
        raise _NoCgroup(f"{parent} is not writable")
    _sweep_cgroups(parent)
    path = parent / f"{CGROUP_PREFIX}{slot}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir(mode=0o755)
    except OSError as error:
        raise _NoCgroup(f"cannot make a cgroup in {parent}: {error}") from None
    try:
        if version == 1:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            if (path / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit either
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
            written = int((path / "memory.limit_in_bytes").read_text())
        else:
            (path / "memory.max").write_text(str(limit))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            if (path / "memory.oom.group").exists():  # an OOM kill ends the whole sandbox
                (path / "memory.oom.group").write_text("1")
            written = int((path / "memory.max").read_text())
        if written > limit:
            raise OSError(f"the limit reads back as {written}")
    except (OSError, ValueError) as error:
        _remove_cgroup(str(path))
        raise _NoCgroup(f"cannot set a memory limit in {path}: {error}") from None
    return str(path)


def _sweep_cgroups(parent: Path) -> None:
    """Remove the empty cgroups of graders that were killed before they could (rmdir only: a
    cgroup that still has processes stays)."""
    for folder in parent.glob(f"{CGROUP_PREFIX}*"):
        pid = folder.name.split("-")[-2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                folder.rmdir()
            except OSError:
                pass


def _join_cgroup(cgroup: str) -> None:
    """Move this process (the launcher, before it becomes bubblewrap) into ``cgroup``."""
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
            fh.write(f"{os.getpid()}\n")
    except OSError as error:
        raise SystemExit(f"grader.sandbox: cannot enter the sandbox's memory cgroup {cgroup}: "
                         f"{error}") from None


def _cgroup_members(cgroup: str) -> list[int]:
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as fh:
            return [int(pid) for pid in fh.read().split()]
    except OSError:
        return []


def _kill_member(pid: int, cgroup: str) -> None:
    """SIGKILL ``pid`` if it is (still) in ``cgroup``: through a pidfd, so a recycled pid is safe."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            name = os.path.basename(cgroup)
            if any(line.rstrip("\n").split("/")[-1] == name for line in fh):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _remove_cgroup(cgroup: str, timeout: float = 10.0) -> bool:
    """Kill every process in ``cgroup``, then remove it; False if it could not be removed."""
    kill = os.path.join(cgroup, "cgroup.kill")  # cgroup v2, Linux >= 5.14
    if os.path.exists(kill):
        try:
            with open(kill, "w") as fh:
                fh.write("1")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        for pid in _cgroup_members(cgroup):
            _kill_member(pid, cgroup)
        try:
            os.rmdir(cgroup)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _share_runtime(runtime: Path, uid: int) -> None:
    """Let ``uid`` create its sockets in the runtime folder, which stays root's (group ``uid``,
    0770): the sandbox can neither rename it in /tmp nor open it to other users."""
    fd = os.open(runtime, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, 0, uid)
        os.fchmod(fd, 0o770)
    finally:
        os.close(fd)


def make_plan(*, slot: int, env: dict[str, str], limits: Limits,
              packages: dict[str, str] | None = None, files: dict[str, str] | None = None) -> Plan:
    """A plan for one kernel: a new, empty runtime folder and memory cgroup each time.

    :func:`remove_plan` removes the folders and the cgroup it makes. A plan is for one kernel
    only: a kernel that died may have left anything in the folder it could write.
    """
    # Both live in /tmp: the stage must be reachable by the unprivileged uid wherever the
    # workspace is, and a unix socket's path may not exceed 107 bytes.
    short = "/tmp" if os.path.isdir("/tmp") else None
    runtime = Path(tempfile.mkdtemp(prefix="n2l-run-", dir=short))
    stage = Path(tempfile.mkdtemp(prefix="n2l-stage-", dir=short))
    uid = FIRST_UID + slot if os.geteuid() == 0 else None
    if uid is not None:
        os.chmod(stage, 0o755)  # made by mkdtemp just now, root's, in sticky /tmp
        _share_runtime(runtime, uid)  # the kernel, as uid, creates its sockets here
    venv = Path(sys.prefix).resolve()
    python_home = Path(os.path.realpath(sys.executable)).parent.parent
    binds = [(str(python_home), str(python_home))]
    if venv != python_home:
        binds.append((str(venv), str(venv)))
    # Packages installed in editable mode live outside the venv: mount them where PYTHONPATH points.
    # The course packages (name -> host folder; default: course_lib as installed) go where
    # PYTHONPATH points, and single files (sandbox path -> host file) where they are asked for.
    packages = {"course_lib": _package_dir("course_lib")} if packages is None else packages
    binds += [(host, f"{LIB}/{name}") for name, host in packages.items()]
    binds += [(host, inside) for inside, host in (files or {}).items()]
    gpu = bool(gpu_devices())
    if gpu:
        limits = Limits(**{**asdict(limits), "address_space_bytes": None})
    cgroup, memory_note = None, ""
    if limits.memory_bytes is not None:
        try:
            cgroup = _make_memory_cgroup(slot, limits.memory_bytes)
        except _NoCgroup as error:
            memory_note = f"no memory cgroup ({error}): " + (
                "only each process's address space is limited" if limits.address_space_bytes is not None
                else "memory is not limited (no address-space limit either)")
    memory_limit = ("sandbox" if cgroup else "process" if limits.address_space_bytes is not None
                    else "none")
    threads = env.get("OMP_NUM_THREADS", "1")
    kernel_env = {
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "HOME": HOME,
        "LANG": "C.UTF-8",
        "PYTHONPATH": LIB,
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "IPYTHONDIR": "/tmp/ipython",
        "JUPYTER_CONFIG_DIR": "/tmp/jupyter",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TQDM_DISABLE": "0",
        **{k: v for k, v in env.items() if k in STUDENT_ENV},
    }
    return Plan(
        runtime_dir=str(runtime),
        stage_dir=str(stage),
        uid=uid,
        ro_binds=binds,
        env=kernel_env,
        limits=limits,
        gpu=gpu,
        cgroup=cgroup,
        memory_limit=memory_limit,
        memory_note=memory_note,
    )


def remove_plan(plan: Plan) -> None:
    """Remove what :func:`make_plan` created: kill every process left in the cgroup and remove
    it, then the folders (the mounts died with their namespace).

    ``shutil.rmtree`` works through directory descriptors here (``avoids_symlink_attacks``): a
    link the sandbox left in its runtime folder is removed, never followed.
    """
    if plan.cgroup:
        _remove_cgroup(plan.cgroup)
    shutil.rmtree(plan.stage_dir, ignore_errors=True)
    shutil.rmtree(plan.runtime_dir, ignore_errors=True)


def write_kernelspec(jupyter_path: Path) -> None:
    """The kernelspec nbgrader starts: our launcher, interrupted by message (a signal would kill
    bubblewrap instead of interrupting the cell)."""
    folder = jupyter_path / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "grader.sandbox", "kernel", "-f", "{connection_file}"],
        "display_name": "Python 3 (grading sandbox)",
        "language": "python",
        "interrupt_mode": "message",
    }
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))


# -- inside the kernelspec: apply the plan and become bubblewrap ---------------------------------


def _bwrap_argv(plan: Plan, binds: list[tuple[str, str]], command: list[str]) -> list[str]:
    bwrap = shutil.which("bwrap") or "bwrap"
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--hostname", "sandbox", *(["--as-pid-1"] if plan.as_pid_1 else []),
            "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    # tmpfs first: a bind below /tmp (a workspace in /tmp) must not be hidden by the new /tmp.
    size = str(plan.limits.tmpfs_bytes)
    argv += ["--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", HOME]
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"]:
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    for source, dest in binds:
        argv += ["--ro-bind", source, dest]
    argv += ["--bind", plan.runtime_dir, plan.runtime_dir, "--proc", "/proc", "--dev", "/dev",
             "--size", size, "--tmpfs", "/dev/shm"]
    if plan.gpu:
        for device in gpu_devices():
            argv += ["--dev-bind", device, device]
    argv += ["--chdir", HOME, "--", *command]
    return argv


def _stage_mounts(plan: Plan) -> list[tuple[str, str]]:
    """As root in a private mount namespace: bind each source onto the stage folder."""
    staged = []
    for i, (source, dest) in enumerate(plan.ro_binds):
        target = Path(plan.stage_dir) / str(i)
        if Path(source).is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.touch()
        subprocess.run(["mount", "--bind", "-o", "ro", source, str(target)], check=True)
        staged.append((str(target), dest))
    # The runtime folder may lie where the uid cannot reach it (a workspace under /root).
    runtime_stage = Path(plan.stage_dir) / "runtime"
    runtime_stage.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", plan.runtime_dir, str(runtime_stage)], check=True)
    return staged


def _set_limits(limits: Limits) -> None:
    import resource

    def cap(kind: int, value: int | None) -> None:
        if value is not None:
            resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_CPU, limits.cpu_seconds)
    cap(resource.RLIMIT_AS, limits.address_space_bytes)
    cap(resource.RLIMIT_NPROC, limits.processes)
    cap(resource.RLIMIT_FSIZE, limits.file_bytes)
    cap(resource.RLIMIT_NOFILE, limits.open_files)
    cap(resource.RLIMIT_CORE, 0)


def _hand_over(plan: Plan, connection_file: str) -> None:
    """Give the connection file that nbgrader wrote as root to the sandbox's uid, and nothing else.

    The runtime folder is writable by the sandbox, so any entry in it may be a link to anything:
    only this file's descriptor, opened without following links, is chowned, and only when it is
    a regular file of ours with a single link, directly in the runtime folder.
    """
    folder, name = os.path.split(os.path.abspath(connection_file))
    if folder != os.path.abspath(plan.runtime_dir) or name in {"", ".", ".."}:
        raise SystemExit(f"grader.sandbox: the connection file {connection_file} is not in the "
                         f"sandbox's runtime folder {plan.runtime_dir}")
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError as error:
            raise SystemExit(f"grader.sandbox: refusing the connection file {connection_file}: "
                             f"{error.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
                raise SystemExit(f"grader.sandbox: refusing the connection file {connection_file}: "
                                 "not a regular file the grader wrote (a link, or not ours)")
            os.fchown(fd, plan.uid, plan.uid)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def exec_in_sandbox(plan: Plan, command: list[str], staged: bool = False,
                    connection_file: str | None = None) -> None:
    """Replace this process by ``command`` inside the sandbox (never returns).

    ``connection_file``: the kernel's, handed over to the sandbox's uid (when root).
    """
    if plan.cgroup and not staged:
        # First of all: every process of the sandbox, bubblewrap included, starts in the cgroup.
        _join_cgroup(plan.cgroup)
    if plan.uid is not None and not staged:
        # Root: continue in a private mount namespace, where staging mounts touch nothing else.
        os.execvp(
            "unshare",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                "-m",
                "grader.sandbox",
                "--staged",
                *sys.argv[1:],
            ],
        )
    binds = plan.ro_binds
    if plan.uid is not None:
        binds = _stage_mounts(plan)
        if connection_file is not None:
            _hand_over(plan, connection_file)
        runtime_stage = str(Path(plan.stage_dir) / "runtime")
    argv = _bwrap_argv(plan, binds, command)
    if plan.uid is not None:
        # bubblewrap binds the staged runtime folder at the runtime path the client uses.
        i = argv.index("--bind")
        argv[i + 1] = runtime_stage
    _set_limits(plan.limits)
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
    # bubblewrap's own environment is all the sandbox gets (its /proc/1/environ is readable inside).
    os.execve(argv[0], argv, plan.env)


def _kernel_main(argv: list[str]) -> None:
    staged = argv[:1] == ["--staged"]
    if staged:
        argv = argv[1:]
    if argv[:1] != ["kernel"] or "-f" not in argv:
        raise SystemExit("usage: python -m grader.sandbox kernel -f CONNECTION_FILE")
    connection_file = argv[argv.index("-f") + 1]
    plan_path = os.environ.get(PLAN_ENV)
    if not plan_path:
        raise SystemExit(f"{PLAN_ENV} is not set: this kernel is started by the grader only")
    plan = Plan.load(plan_path)
    python = str(Path(sys.prefix) / "bin" / "python")
    exec_in_sandbox(plan, [python, "-m", "ipykernel_launcher", "-f", connection_file], staged=staged,
                    connection_file=connection_file)


# -- can a sandbox start here? -------------------------------------------------------------------


def check_available() -> None:
    """Raise SandboxUnavailable with the reason and the fix when no sandbox can start here."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the grading sandbox needs Linux (bubblewrap); this is {sys.platform}")
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed: `sudo apt-get install bubblewrap` (Debian/Ubuntu) or "
            "`sudo dnf install bubblewrap`"
        )
    if os.geteuid() == 0 and shutil.which("unshare") is None:
        raise SandboxUnavailable("util-linux's `unshare` is missing")
    with tempfile.TemporaryDirectory(prefix="n2l-sandbox-check-") as tmp:
        plan = make_plan(slot=0, env={}, limits=Limits(cpu_seconds=30))
        plan_path = Path(tmp) / "plan.json"
        plan.save(plan_path)
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grader.sandbox",
                    "run",
                    "--",
                    "python",
                    "-c",
                    "import os; print(len(os.listdir('/')))",
                ],
                env={**os.environ, PLAN_ENV: str(plan_path)},
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            remove_plan(plan)
    if result.returncode != 0 or not result.stdout.strip():
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SandboxUnavailable(
            f"bubblewrap could not start a sandbox here ({detail}). Unprivileged user namespaces "
            "may be disabled (sysctl kernel.unprivileged_userns_clone, or an AppArmor policy on "
            "Ubuntu >= 23.10: kernel.apparmor_restrict_unprivileged_userns=0)"
        )


def _run_main(argv: list[str]) -> None:
    """``run [--] CMD...``: run a command in the sandbox of the plan (used by the check and tests)."""
    staged = argv[:1] == ["--staged"]
    if staged:
        argv = argv[1:]
    command = argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    plan = Plan.load(os.environ[PLAN_ENV])
    if command and command[0] == "python":
        command = [str(Path(sys.prefix) / "bin" / "python"), *command[1:]]
    exec_in_sandbox(plan, command, staged=staged)


if __name__ == "__main__":
    args = sys.argv[1:]
    mode = args[1] if args[:1] == ["--staged"] else (args[0] if args else "")
    if mode == "run":
        _run_main(args)
    else:
        _kernel_main(args)
