"""Shared test setup: draw with matplotlib's non-interactive backend (no display on CI), and the
one-thread fixture the modules of small models use."""

import os

os.environ["MPLBACKEND"] = "Agg"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch on one thread. Tests of small models do thousands of tiny operations: a second
    intra-op thread only adds a wake-up to each, which costs far more than the work when the
    cores are shared with other test workers (measured: up to ten times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
