"""The sandbox every student's kernel runs in while it is graded (Linux, bubblewrap).

The executor (nbgrader, outside) talks to the kernel (inside) over ZMQ ``ipc`` sockets in one
folder that both can see; everything else the kernel sees is an allow-list of read-only mounts:

    /usr /etc (and the /bin, /lib symlinks)     the system, read-only
    <python home> <venv>                          the interpreter and the course's packages, read-only
    /opt/n2l/lib/{course_lib,grader}              the course packages (PYTHONPATH), read-only
    /opt/n2l/probes.py                            the chapter's trusted-check specs, read-only
    <runtime>                                     connection file + sockets of this kernel only
    /home/student, /tmp                           size-limited tmpfs, the kernel's working dir

so hidden tests, the course source, the gradebook and other students' work are not there at all.
It has no network (its own empty network namespace), its own pid namespace (it cannot see or
signal the grader; when the sandbox ends every process in it ends), and resource limits (CPU
seconds, address space, processes, file size, open files). The kernel runs as an unprivileged
uid even when the grader runs as root: each parallel worker has its own uid, so one student's
fork bomb cannot starve the next. The grader kills the whole sandbox at the notebook time limit.

Started as root, a private mount namespace is made first (``unshare``) and every mount source is
bind-mounted onto a staging folder there: the unprivileged bubblewrap can then mount it even when
the original lies in a folder that uid cannot enter (a Python under /root/.pyenv, a workspace in
~root). Nothing is mounted on the host.

``python -m grader.sandbox kernel -f CONNECTION_FILE`` is the kernelspec's command: it reads the
plan written by the grader (``N2L_SANDBOX_PLAN``), applies it, and becomes bubblewrap.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

KERNEL_NAME = "n2l-sandbox"
PLAN_ENV = "N2L_SANDBOX_PLAN"
HOME = "/home/student"
LIB = "/opt/n2l/lib"
PROBES_PATH = "/opt/n2l/probes.py"
# Each parallel worker runs its kernels as its own uid (only when the grader is root).
FIRST_UID = 61000


@dataclass
class Limits:
    cpu_seconds: int = 7200
    address_space_bytes: int | None = 16 * 2**30  # None: no limit (CUDA needs a very large one)
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
    for slot in range(4000):
        if len(slots) == count:
            break
        handle = open(f"/tmp/n2l-sandbox-slot-{slot}.lock", "a")  # noqa: SIM115 - held on purpose
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


def make_plan(*, slot: int, env: dict[str, str], limits: Limits, probes_file: Path | None = None) -> Plan:
    """A plan for one kernel; :func:`remove_plan` removes the folders it makes."""
    # Both live in /tmp: the stage must be reachable by the unprivileged uid wherever the
    # workspace is, and a unix socket's path may not exceed 107 bytes.
    short = "/tmp" if os.path.isdir("/tmp") else None
    runtime = Path(tempfile.mkdtemp(prefix="n2l-run-", dir=short))
    stage = Path(tempfile.mkdtemp(prefix="n2l-stage-", dir=short))
    uid = FIRST_UID + slot if os.geteuid() == 0 else None
    if uid is not None:
        os.chmod(stage, 0o755)
        os.chown(runtime, uid, uid)  # the kernel, as uid, creates its sockets here
        os.chmod(runtime, 0o700)
    venv = Path(sys.prefix).resolve()
    python_home = Path(os.path.realpath(sys.executable)).parent.parent
    binds = [(str(python_home), str(python_home))]
    if venv != python_home:
        binds.append((str(venv), str(venv)))
    # Packages installed in editable mode live outside the venv: mount them where PYTHONPATH points.
    binds += [(_package_dir("course_lib"), f"{LIB}/course_lib"), (_package_dir("grader"), f"{LIB}/grader")]
    if probes_file is not None:
        binds.append((str(probes_file), PROBES_PATH))
    gpu = bool(gpu_devices())
    if gpu:
        limits = Limits(**{**asdict(limits), "address_space_bytes": None})
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
        **{k: v for k, v in env.items() if k.startswith("COURSE_")},
    }
    return Plan(
        runtime_dir=str(runtime),
        stage_dir=str(stage),
        uid=uid,
        ro_binds=binds,
        env=kernel_env,
        limits=limits,
        gpu=gpu,
    )


def remove_plan(plan: Plan) -> None:
    """Remove what :func:`make_plan` created (the mounts died with their namespace)."""
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
            "--new-session", "--hostname", "sandbox",
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


def exec_in_sandbox(plan: Plan, command: list[str], staged: bool = False) -> None:
    """Replace this process by ``command`` inside the sandbox (never returns)."""
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
    runtime = plan.runtime_dir
    if plan.uid is not None:
        binds = _stage_mounts(plan)
        for path in Path(runtime).iterdir():
            os.chown(path, plan.uid, plan.uid)  # the connection file nbgrader wrote as root
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
    exec_in_sandbox(plan, [python, "-m", "ipykernel_launcher", "-f", connection_file], staged=staged)


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
