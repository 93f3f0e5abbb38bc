"""How many students' kernels one server holds: a smoke test (docs/classroom.md, "Limits").

Starts the course's kernels (the venv's ``python3``) in steps of ``--step`` up to ``--max``; each
one does what a student's kernel does in a light chapter: imports torch, numpy, matplotlib and
course_lib, loads the digits and trains a small MLP for a few steps. After each step every kernel
runs one more training step at the same moment (all students pressing Shift-Enter together) and
the time until each replies is measured. Stops early when the memory left falls under
``--reserve-gib`` or a kernel dies or does not reply in ``--reply-timeout`` seconds.

    .venv/bin/python scripts/classroom/kernel_smoke.py --max 40 --step 5

Prints one line per step: kernels, the memory of their processes (PSS, shared pages split
between them), the machine's available memory used since the start (other processes count too),
and the reply times (median and slowest) of the simultaneous cell. First, the memory of one
user's Jupyter server without a kernel (a student's JupyterLab, as the hub starts it): a user
costs that plus a kernel.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from jupyter_client.manager import start_new_kernel

SETUP = """
import numpy as np, torch, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from course_lib.data import load_digits
torch.set_num_threads(1)
digits = load_digits()
X, y = digits.train.x, digits.train.y
model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
def step():
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(model(X), y); loss.backward(); opt.step()
    return float(loss.detach())
for _ in range(20):
    step()
fig = plt.figure(); plt.plot(range(10)); plt.close(fig)
"""


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pss(pid: int) -> int:
    """Proportional set size of a process (bytes): its own pages plus its share of shared ones
    (torch's libraries are shared by every kernel), so kernels add up to what they really use."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))


def server_rss(timeout: float = 120) -> int:
    """Resident memory (bytes) of one student's JupyterLab server, idle, once it answers."""
    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home, "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
               "JUPYTER_CONFIG_PATH": str(repo / "scripts" / "classroom" / "jupyter" / "student")}
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={home}"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/lab",
                                                     headers={"Authorization": f"token {token}"})
                    urllib.request.urlopen(request, timeout=10).read()
                    break
                except OSError:
                    time.sleep(0.5)
            with open(f"/proc/{server.pid}/status") as fh:
                return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        finally:
            server.terminate()
            server.wait(timeout=30)


def run(client, code: str, timeout: float) -> str:
    reply = client.execute_interactive(code, timeout=timeout, store_history=False,
                                       output_hook=lambda msg: None)
    return reply["content"]["status"]


def simultaneous(clients, timeout: float) -> list[float]:
    """Send one training step to every kernel at once; seconds until each replied."""
    start = time.perf_counter()
    ids = {client.execute("step()", store_history=False): client for client in clients}
    times = []
    for msg_id, client in ids.items():
        while True:
            msg = client.get_shell_msg(timeout=max(0.1, timeout - (time.perf_counter() - start)))
            if msg["parent_header"].get("msg_id") == msg_id:
                if msg["content"]["status"] != "ok":
                    raise RuntimeError(f"a kernel failed the step: {msg['content']}")
                times.append(time.perf_counter() - start)
                break
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max", type=int, default=40)
    parser.add_argument("--step", type=int, default=5)
    parser.add_argument("--reserve-gib", type=float, default=1.0)
    parser.add_argument("--reply-timeout", type=float, default=120)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"one student's JupyterLab server, idle: {server_rss() / 2**20:.0f} MiB resident", flush=True)
    before = mem_available()
    print(f"{os.cpu_count()} CPUs, {before / 2**30:.1f} GiB available before any kernel", flush=True)
    kernels = []
    try:
        while len(kernels) < args.max:
            for _ in range(args.step):
                manager, client = start_new_kernel(kernel_name="python3", startup_timeout=args.reply_timeout)
                kernels.append((manager, client))
                if run(client, SETUP, args.reply_timeout) != "ok":
                    raise RuntimeError("the setup cell failed in a kernel")
            used = before - mem_available()
            own = sum(pss(m.provisioner.process.pid) for m, _ in kernels)
            times = simultaneous([c for _, c in kernels], args.reply_timeout)
            print(f"{len(kernels):3d} kernels: {own / 2**30:5.1f} GiB in their processes (PSS, "
                  f"{own / len(kernels) / 2**20:4.0f} MiB each); machine's MemAvailable down "
                  f"{used / 2**30:5.1f} GiB; one cell in all at once: "
                  f"median reply {statistics.median(times):5.2f} s, slowest {max(times):5.2f} s", flush=True)
            if mem_available() < args.reserve_gib * 2**30:
                print(f"stopped: under {args.reserve_gib} GiB left")
                break
    except Exception as error:  # noqa: BLE001 - the failure is the result: print it
        print(f"stopped at {len(kernels)} kernels: {type(error).__name__}: {error}")
    finally:
        for manager, client in kernels:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
