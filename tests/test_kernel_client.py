"""grader.kernel_client: waiting for a kernel message in short polls, within the same deadline."""

from __future__ import annotations

import asyncio
import time
from queue import Empty

import pytest
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from grader import kernel_client
from grader.kernel_client import CLIENT_CLASS, SlicedPollChannel, SlicedPollKernelClient


@pytest.fixture
def polls(monkeypatch):
    """Replace the real socket poll: record each poll's timeout; deliver a message on poll ``n``."""
    record = {"timeouts": [], "deliver_on": None}

    async def fake_get_msg(self, timeout=None):
        record["timeouts"].append(timeout)
        if record["deliver_on"] is not None and len(record["timeouts"]) >= record["deliver_on"]:
            return {"msg_type": "execute_reply"}
        await asyncio.sleep(timeout)
        raise Empty

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", fake_get_msg)
    monkeypatch.setattr(kernel_client, "POLL_SLICE_S", 0.05)
    return record


def test_a_message_is_found_at_the_next_slice(polls):
    polls["deliver_on"] = 3
    channel = SlicedPollChannel.__new__(SlicedPollChannel)  # no socket needed: polls are faked
    msg = asyncio.run(channel.get_msg(timeout=10))
    assert msg == {"msg_type": "execute_reply"}
    assert polls["timeouts"][:2] == [0.05, 0.05]  # short polls, never one of 10 s


def test_timeout_is_kept(polls):
    channel = SlicedPollChannel.__new__(SlicedPollChannel)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0.2))
    assert 0.15 <= time.monotonic() - start < 2
    assert all(t <= 0.05 for t in polls["timeouts"]) and len(polls["timeouts"]) >= 3


def test_zero_timeout_polls_once(polls):
    channel = SlicedPollChannel.__new__(SlicedPollChannel)
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0))
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
