"""grader.kernel_client: waiting for a kernel message in short polls, within the same deadline."""

from __future__ import annotations

import asyncio
import types
from queue import Empty

import pytest
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from grader import kernel_client
from grader.kernel_client import CLIENT_CLASS, SlicedPollChannel, SlicedPollKernelClient


@pytest.fixture
def polls(monkeypatch):
    """Replace the socket poll and the clock: each poll records its timeout and lets that much
    (fake) time pass; a message arrives on poll number ``deliver_on``."""
    record = {"timeouts": [], "deliver_on": None, "now": 100.0}

    async def fake_get_msg(self, timeout=None):
        record["timeouts"].append(timeout)
        if record["deliver_on"] is not None and len(record["timeouts"]) >= record["deliver_on"]:
            return {"msg_type": "execute_reply"}
        record["now"] += timeout
        raise Empty

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", fake_get_msg)
    # Only this module's clock: asyncio's own must stay real.
    monkeypatch.setattr(kernel_client, "time", types.SimpleNamespace(monotonic=lambda: record["now"]))
    return record


def channel():
    return SlicedPollChannel.__new__(SlicedPollChannel)  # no socket needed: the polls are faked


def test_a_message_is_found_at_the_next_slice(polls):
    polls["deliver_on"] = 3
    assert asyncio.run(channel().get_msg(timeout=10)) == {"msg_type": "execute_reply"}
    assert polls["timeouts"] == [0.5, 0.5, 0.5]  # short polls, never one of 10 s


def test_timeout_is_kept(polls):
    with pytest.raises(Empty):
        asyncio.run(channel().get_msg(timeout=1.2))
    assert polls["timeouts"] == pytest.approx([0.5, 0.5, 0.2])
    assert polls["now"] == pytest.approx(101.2)


def test_no_timeout_waits_in_slices(polls):
    polls["deliver_on"] = 5
    asyncio.run(channel().get_msg(timeout=None))
    assert polls["timeouts"] == [0.5] * 5


def test_zero_timeout_polls_once(polls):
    with pytest.raises(Empty):
        asyncio.run(channel().get_msg(timeout=0))
    assert polls["timeouts"] == [0]


def test_configured_kernel_managers_build_this_client():
    config = Config()
    config.AsyncKernelManager.client_class = CLIENT_CLASS
    manager = AsyncKernelManager(config=config)
    assert manager.client_factory is SlicedPollKernelClient
    client = SlicedPollKernelClient()
    assert client.shell_channel_class is SlicedPollChannel
    assert client.iopub_channel_class is SlicedPollChannel


def test_grader_and_student_configs_use_it(tmp_path):
    from grader.workspace import Workspace
    from tests.grading_helpers import REPO

    assert CLIENT_CLASS in (REPO / "chapters" / "nbgrader_config.py").read_text()
    workspace = Workspace(tmp_path / "ws", REPO)
    workspace.write_config()
    assert f"c.AsyncKernelManager.client_class = {CLIENT_CLASS!r}" in \
        (tmp_path / "ws" / "nbgrader_config.py").read_text()
