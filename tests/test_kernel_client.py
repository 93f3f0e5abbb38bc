"""grader.kernel_client: waiting for a kernel message in short polls, within the same deadline."""

from __future__ import annotations

import asyncio
import json
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


def _reply(seconds_ago: float, msg_type: str = "execute_reply") -> dict:
    from datetime import datetime, timedelta, timezone

    sent = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return {"header": {"msg_type": msg_type, "date": sent}}


def test_late_replies_are_logged(tmp_path, monkeypatch):
    log = tmp_path / "stalls.jsonl"
    monkeypatch.setenv(kernel_client.STALL_LOG_ENV, str(log))
    kernel_client.note_if_late(_reply(0.01))  # delivered at once
    kernel_client.note_if_late(_reply(2.0, "stream"))  # output, not a reply
    assert not log.exists()
    kernel_client.note_if_late(_reply(0.45))
    kernel_client.note_if_late(_reply(3.0, "kernel_info_reply"))
    lines = log.read_text().splitlines()
    assert [json.loads(line)["msg_type"] for line in lines] == ["execute_reply", "kernel_info_reply"]
    assert json.loads(lines[1])["delay_s"] >= 3.0


def test_no_log_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(kernel_client.STALL_LOG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    kernel_client.note_if_late(_reply(5.0))
    assert list(tmp_path.iterdir()) == []


def test_notebook_client_uses_it():
    import nbformat

    client = kernel_client.notebook_client(nbformat.v4.new_notebook(), kernel_name="python3")
    assert client.create_kernel_manager().client_factory is SlicedPollKernelClient
