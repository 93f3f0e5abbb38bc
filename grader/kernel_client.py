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

To count missed wake-ups, set ``COURSE_STALL_LOG`` to a file: every reply read ``LATE_S`` or more
after the kernel sent it (by the timestamp in its header) is appended there as one JSON line.
The test suite does this and prints the count at its end.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from queue import Empty
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import Type

POLL_SLICE_S = 0.5
CLIENT_CLASS = "grader.kernel_client.SlicedPollKernelClient"
STALL_LOG_ENV = "COURSE_STALL_LOG"
LATE_S = 0.4  # far above a reply's usual delivery (milliseconds), just under one slice


def note_if_late(msg: dict[str, Any]) -> None:
    """Append a reply that sat unread for ``LATE_S`` or more to the stall log (when one is set)."""
    path = os.environ.get(STALL_LOG_ENV)
    header = msg.get("header") if isinstance(msg, dict) else None
    sent = header.get("date") if isinstance(header, dict) else None
    if not path or not isinstance(sent, datetime) or not header.get("msg_type", "").endswith("_reply"):
        return
    if sent.tzinfo is None:
        sent = sent.replace(tzinfo=timezone.utc)
    delay = (datetime.now(timezone.utc) - sent).total_seconds()
    if delay >= LATE_S:
        with open(path, "a") as log:
            log.write(json.dumps({"msg_type": header["msg_type"], "delay_s": round(delay, 3),
                                  "pid": os.getpid(), "at": time.time()}) + "\n")


class SlicedPollChannel(AsyncZMQSocketChannel):
    """``get_msg(timeout)`` as a series of polls of at most ``POLL_SLICE_S`` each."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await super().get_msg(timeout=min(POLL_SLICE_S, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue
            note_if_late(msg)
            return msg


class SlicedPollKernelClient(AsyncKernelClient):
    """An AsyncKernelClient whose shell, iopub and control channels poll in short slices."""

    shell_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]
    control_channel_class = Type(SlicedPollChannel)  # type: ignore[assignment]


def notebook_client(nb, **options):
    """An ``nbclient.NotebookClient`` for ``nb`` whose kernel client is this one: for every
    notebook the course runs outside nbgrader (benchmarks, tools); options go to NotebookClient."""
    from nbclient import NotebookClient
    from traitlets.config import Config

    config = Config()
    config.AsyncKernelManager.client_class = CLIENT_CLASS
    return NotebookClient(nb, config=config, **options)
