"""Shared test setup: draw with matplotlib's non-interactive backend (no display on CI), the
one-thread fixture the modules of small models use, and the count of kernel replies that
arrived late (grader/kernel_client.py), printed at the end of every run."""

import json
import os
import tempfile
from pathlib import Path

os.environ["MPLBACKEND"] = "Agg"

import pytest  # noqa: E402
import torch  # noqa: E402

from grader.kernel_client import LATE_S, STALL_LOG_ENV  # noqa: E402


def pytest_configure(config):
    # In the controller only: the xdist workers, the grader and its nbgrader runs inherit it.
    if not hasattr(config, "workerinput") and STALL_LOG_ENV not in os.environ:
        handle, path = tempfile.mkstemp(prefix="n2l-stalls-", suffix=".jsonl")
        os.close(handle)
        os.environ[STALL_LOG_ENV] = path
        config._n2l_stall_log = path


def pytest_terminal_summary(terminalreporter, config):
    path = getattr(config, "_n2l_stall_log", None)
    if not path:
        return
    lines = Path(path).read_text().splitlines()
    worst = max((json.loads(line)["delay_s"] for line in lines), default=0.0)
    terminalreporter.write_line(
        f"kernel replies read >= {LATE_S} s after they were sent (grader/kernel_client.py): {len(lines)}"
        + (f", worst {worst:.2f} s; log: {path}" if lines else ""))
    if not lines:
        os.unlink(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch on one thread. Tests of small models do thousands of tiny operations: a second
    intra-op thread only adds a wake-up to each, which costs far more than the work when the
    cores are shared with other test workers (measured: up to ten times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
