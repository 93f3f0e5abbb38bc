"""Starting the ranks of a multi-process run, and getting their results back (chapter 11).

The plumbing behind :mod:`course_lib.parallel`'s demos; every rank joins a real
``torch.distributed`` process group. Two ways in:

- :func:`run_workers` forks ``world_size`` processes from the current one (a notebook's kernel
  included) and calls ``fn(rank, world_size, *args)`` in each, after joining a gloo process group.
  Fork, not spawn: the children inherit everything the parent defined, so a function written in a
  notebook cell (which lives in ``__main__`` and does not pickle for spawn) runs as it is, and
  there is no second ``import torch`` (seconds). Ranks meet through a :class:`FileStore` in a
  fresh temporary folder: no port to choose, so parallel test runs cannot collide. Fork and CUDA
  do not mix, so these children compute on the CPU (gloo) whatever the hardware: it is for small
  checks. The steps:

  1. :func:`_start_ranks` — fork the ranks (the loopback settings in their environment).
  2. :func:`_wait_for_ranks` — until every rank has exited; once one has failed, the others get
     a moment to finish, then are stopped (they are usually waiting for it in a collective).
  3. :func:`_read_results` — what each rank left behind: ``rank{r}.pt`` (its return value and
     printed output) when it succeeded, ``rank{r}.failed.pt`` (its traceback) when it raised.
  4. :func:`_raise_first_failure` — a rank failed when its exit code is not 0. The one reported is
     one that died without a word (a crash: peers never do that, they raise), else the first that
     raised: a failing rank claims the file ``first_failure`` before it tears anything down, so a
     rank that failed only because a peer went away comes too late to claim it.

- :func:`torchrun` starts a script with ``python -m torch.distributed.run`` (the ``torchrun``
  command), as on a real cluster: fresh processes, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and a
  rendezvous in the environment, NCCL on GPUs. :func:`torchrun_multinode` starts several
  launchers, one per "node", that meet at a rendezvous endpoint over loopback. A script sends
  results back with :func:`save_rank_result`, one file per rank: a rank without one failed, and
  a launcher's exit code says whether any rank did.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULT_ENV = "COURSE_RESULT_DIR"  # where a torchrun script writes its ranks' results
GRACE_SECONDS = 2.0  # after a rank fails, how long the others may take to finish on their own


class WorkerError(RuntimeError):
    """A rank of a multi-process run failed; the message holds its traceback or the launcher's output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment that keeps gloo on the loopback interface (as in the grading sandbox, where
    ``lo`` is the only network): gloo otherwise picks the interface its hostname resolves to."""
    env = {"MASTER_ADDR": "127.0.0.1"}
    # Interface names from the kernel, not /sys (the grading sandbox mounts no /sys).
    with contextlib.suppress(OSError, AttributeError):
        if "lo" in {name for _, name in socket.if_nameindex()}:
            env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


# ---------------------------------------------------------------------------------------------
# Forked ranks: run_workers
# ---------------------------------------------------------------------------------------------


def run_workers(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (),
                timeout: float = 120.0, show_output: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes that form a gloo
    process group; return the ``world_size`` return values, in rank order.

    A rank that raises makes this raise :class:`WorkerError` with its traceback (the other ranks
    are stopped). ``show_output`` prints what the ranks printed. Linux and macOS (fork).
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    folder = Path(tempfile.mkdtemp(prefix="n2l-ranks-"))
    processes: list[mp.Process] = []
    try:
        processes = _start_ranks(fn, world_size, tuple(args), folder, timeout)
        stopped = _wait_for_ranks(processes, timeout)
        results, first_failure = _read_results(folder, world_size)
        if show_output:
            for rank, result in enumerate(results):
                for line in result.get("log", "").splitlines():
                    print(f"[rank {rank}] {line}")
        _raise_first_failure(results, first_failure, processes, stopped)
        return [result["value"] for result in results]
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join(5)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _loopback_environment() -> Iterator[None]:
    """:func:`loopback_env` in ``os.environ`` (so forked children inherit it), restored after."""
    saved = {key: os.environ.get(key) for key in loopback_env()}
    os.environ.update(loopback_env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_ranks(fn: Callable, world_size: int, args: tuple, folder: Path,
                 timeout: float) -> list[mp.Process]:
    """Step 1: fork one process per rank, each running :func:`_rank_main`."""
    context = mp.get_context("fork")
    processes = []
    with _loopback_environment():
        for rank in range(world_size):
            p = context.Process(target=_rank_main, args=(rank, world_size, fn, args, folder, timeout),
                                daemon=True)
            p.start()
            processes.append(p)
    return processes


def _rank_main(rank: int, world_size: int, fn: Callable, args: tuple, folder: Path, timeout: float) -> None:
    """One rank, in its forked process: join the group, call ``fn``, leave a result file.

    Success: ``rank{r}.pt`` with the return value and what the rank printed, exit code 0.
    Failure (``fn`` raised, or its value does not pickle): ``rank{r}.failed.pt`` with the
    traceback, exit code 1.
    """
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_num_threads(1)  # world_size processes already share the cores
            store = dist.FileStore(str(folder / "store"), world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
            try:
                value = fn(rank, world_size, *args)
            except BaseException:
                # Claimed *before* the group is torn down: a peer that fails because of this
                # teardown necessarily comes later.
                _claim_first_failure(folder, rank)
                raise
            finally:
                dist.destroy_process_group()
        _save_whole({"value": value, "log": log.getvalue()}, folder / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        _claim_first_failure(folder, rank)  # if fn did not raise (the group, the pickling)
        _save_whole({"error": traceback.format_exc(), "log": log.getvalue()},
                    folder / f"rank{rank}.failed.pt")
        raise SystemExit(1) from None


def _claim_first_failure(folder: Path, rank: int) -> None:
    """Write ``rank`` to the file ``first_failure`` unless a rank already did: the operating
    system lets exactly one process create it (``O_EXCL``)."""
    try:
        fd = os.open(folder / "first_failure", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(rank))


def _save_whole(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a result file exists only when complete
    (a value that does not pickle leaves none)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _wait_for_ranks(processes: Sequence[mp.Process], timeout: float) -> set[int]:
    """Step 2: wait until every rank has exited. Once one has failed (exit code not 0), give the
    others :data:`GRACE_SECONDS` to end on their own, then stop them. Returns the ranks stopped."""
    deadline = time.monotonic() + timeout + 10  # the group's own timeout fires first
    failed_at = None
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"the {len(processes)} ranks did not finish within {timeout:.0f} s")
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = now
        if failed_at is not None and now - failed_at > GRACE_SECONDS:
            break  # the others are waiting for the failed rank in a collective
        time.sleep(0.01)
    stopped = {rank for rank, p in enumerate(processes) if p.is_alive()}
    for rank in stopped:
        processes[rank].kill()
        processes[rank].join(5)
    return stopped


def _read_results(folder: Path, world_size: int) -> tuple[list[dict], int | None]:
    """Step 3: each rank's result file (``{}`` for a rank that left none), and the rank that
    claimed the first failure (None if no rank raised)."""
    results = []
    for rank in range(world_size):
        for name in (f"rank{rank}.pt", f"rank{rank}.failed.pt"):
            if (folder / name).exists():
                results.append(torch.load(folder / name, weights_only=False))
                break
        else:
            results.append({})
    claim = folder / "first_failure"
    first = claim.read_text() if claim.exists() else ""
    return results, int(first) if first.isdigit() else None


def _raise_first_failure(results: Sequence[dict], first_failure: int | None, processes: Sequence[mp.Process],
                         stopped: set[int]) -> None:
    """Step 4: raise :class:`WorkerError` for the rank whose failure came first, if any failed.

    A rank failed when its exit code is not 0 (we stopped the ranks in ``stopped`` ourselves).
    One that ended without any result file (it crashed, or was killed) comes first: a rank never
    dies silently because of a peer, it raises. Else the rank that raised first.
    """
    world_size = len(processes)
    silent = [rank for rank, result in enumerate(results) if not result and rank not in stopped]
    if silent:
        rank = silent[0]
        raise WorkerError(f"rank {rank} of {world_size} ended without a result "
                          f"(exit code {processes[rank].exitcode})")
    raised = [rank for rank, result in enumerate(results) if "error" in result]
    if raised:
        rank = first_failure if first_failure in raised else raised[0]
        raise WorkerError(f"rank {rank} of {world_size} raised:\n{results[rank]['error']}")


# ---------------------------------------------------------------------------------------------
# Fresh processes: torchrun
# ---------------------------------------------------------------------------------------------


def save_rank_result(value: Any) -> None:
    """In a script started by :func:`torchrun`: send ``value`` back to the caller (one per rank)."""
    folder = os.environ.get(RESULT_ENV)
    if folder is None:
        raise RuntimeError(f"{RESULT_ENV} is not set: start the script with course_lib.launch.torchrun")
    torch.save(value, Path(folder) / f"rank{os.environ.get('RANK', '0')}.pt")


def torchrun_command(script: str | Path, nproc_per_node: int = 2, script_args: Sequence[str] = (),
                     nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                     local_addr: str | None = None) -> list[str]:
    """The command line :func:`torchrun` runs (``python -m torch.distributed.run`` is ``torchrun``).

    One node: ``--standalone`` (a rendezvous on a free local port). Several: every node's launcher
    gets the same ``--nnodes`` and ``--rdzv-endpoint host:port`` (the c10d rendezvous, hosted by
    the launcher on that host) and its own ``--node-rank``. ``local_addr`` (``--local-addr``) is
    the address the ranks of this node are reached at; without it torchrun uses the machine's
    hostname, which must then resolve (in the grading sandbox it does not: ``127.0.0.1``).
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and rdzv_endpoint is None:
        command.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need an rdzv_endpoint host:port")
        command += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=n2l"]
    if local_addr is not None:
        command.append(f"--local-addr={local_addr}")
    return [*command, str(script), *map(str, script_args)]


def _environment(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(loopback_env())
    env.pop("MASTER_ADDR", None)  # torchrun sets it
    env[RESULT_ENV] = str(folder)
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parent.parent)  # course_lib importable from the script
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    return env


def _collect(folder: Path, world_size: int, completed: list[subprocess.CompletedProcess]) -> list[Any]:
    """Every rank's result, in rank order. A launcher exits with a non-zero code when one of its
    ranks failed; the ranks without a result file are the ones that did not finish."""
    missing = [r for r in range(world_size) if not (folder / f"rank{r}.pt").exists()]
    for c in completed:
        if c.returncode != 0:
            raise WorkerError(f"torchrun exited with {c.returncode}; ranks without a result: {missing}\n"
                              f"{c.stdout[-4000:]}")
    if missing:
        raise WorkerError(f"ranks {missing} sent no result (call save_rank_result)")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def torchrun(script: str | Path, nproc_per_node: int = 2, script_args: Sequence[str] = (),
             timeout: float = 300.0) -> list[Any]:
    """Run ``script`` with ``torchrun --standalone --nproc-per-node N``; return what each rank
    passed to :func:`save_rank_result`, in rank order. Raises :class:`WorkerError` with the
    launcher's output when a rank fails."""
    folder = Path(tempfile.mkdtemp(prefix="n2l-torchrun-"))
    try:
        # All ranks are on this machine: reach them at 127.0.0.1, whatever the hostname resolves to.
        completed = subprocess.run(torchrun_command(script, nproc_per_node, script_args,
                                                    local_addr="127.0.0.1"),
                                   env=_environment(folder), capture_output=True, text=True,
                                   timeout=timeout, stdin=subprocess.DEVNULL)
        completed.stdout += completed.stderr
        return _collect(folder, nproc_per_node, [completed])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def torchrun_multinode(script: str | Path, nnodes: int = 2, nproc_per_node: int = 1,
                       script_args: Sequence[str] = (), timeout: float = 300.0) -> list[Any]:
    """Start ``nnodes`` torchrun launchers on this machine as if each were a separate node: they
    meet at the c10d rendezvous on ``127.0.0.1:<free port>`` (hosted by node 0's launcher) and
    form one group of ``nnodes * nproc_per_node`` ranks. Returns every rank's result."""
    folder = Path(tempfile.mkdtemp(prefix="n2l-torchrun-"))
    endpoint = f"127.0.0.1:{free_port()}"
    try:
        launchers = [subprocess.Popen(torchrun_command(script, nproc_per_node, script_args, nnodes, node,
                                                       endpoint, local_addr="127.0.0.1"),
                                      env=_environment(folder), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
                     for node in range(nnodes)]
        completed = _wait_for_launchers(launchers, deadline=time.monotonic() + timeout)
        return _collect(folder, nnodes * nproc_per_node, completed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_launchers(launchers: Sequence[subprocess.Popen], deadline: float
                        ) -> list[subprocess.CompletedProcess]:
    """Each launcher's exit code and output; all of them are killed if one outlives the deadline."""
    completed = []
    for launcher in launchers:
        try:
            out, _ = launcher.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in launchers:
                other.kill()
            raise
        completed.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, out))
    return completed
