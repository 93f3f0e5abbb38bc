"""A Jupyter kernel client that never sleeps through a reply that has already arrived.

nbclient (which nbgrader's autograde and JupyterLab's Validate button run on) waits for a cell's
execute_reply with *one* asyncio poll of the shell socket, as long as the whole per-cell limit.
We saw that poll miss its wake-up: the kernel had replied and was idle, yet nbclient slept until
the limit ran out (after a cell that opens many ipywidgets, about one Validate in three here;
see jupyter/nbclient#312). When the limit ends, pyzmq checks the socket once more, finds the
reply and carries on, so nothing fails: the notebook is just late by the whole limit (5 minutes
for Validate, 10 for the grader), with JupyterLab's server frozen meanwhile.

Polling in short slices turns each slice's end into that same check, so a missed wake-up costs
at most ``POLL_SLICE_S``. Use it through configuration (nbclient builds its own clients)::

    c.AsyncKernelManager.client_class = "grader.kernel_client.SlicedPollKernelClient"
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import Type

POLL_SLICE_S = 0.5
CLIENT_CLASS = "grader.kernel_client.SlicedPollKernelClient"


class SlicedPollChannel(AsyncZMQSocketChannel):
    """``get_msg(timeout)`` as a series of polls of at most ``POLL_SLICE_S`` each."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await super().get_msg(timeout=min(POLL_SLICE_S, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class SlicedPollKernelClient(AsyncKernelClient):
    """An AsyncKernelClient whose shell, iopub and control channels poll in short slices."""

    shell_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    control_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
