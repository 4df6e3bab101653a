"""The gateway's activity watch (``gateway.kernels.activity_recorder``) against
jupyter_server's own (``MappingKernelManager.start_watching_activity``): the same messages
must leave the same ``execution_state`` and move ``last_activity`` at the same steps."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from jupyter_client.session import Session
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

from gateway.kernels import activity_recorder


class Stream:
    def __init__(self) -> None:
        self.callback: Any = None

    def on_recv(self, callback: Any) -> None:
        self.callback = callback


def kernel(session: Session) -> Any:
    stream = Stream()
    return SimpleNamespace(session=session, execution_state="starting", reason="", stream=stream,
                           last_activity=None, connect_iopub=lambda: stream)


def message(session: Session, msg_type: str, content: dict[str, Any], parent_type: str | None) -> list[bytes]:
    parent = session.msg(parent_type, {}) if parent_type else None
    return session.serialize(session.msg(msg_type, content, parent=parent))


#: a cell, a comm_info request (untracked) while idle, a kernel_info at start, a restart
SEQUENCE = [
    ("status", {"execution_state": "starting"}, None),
    ("status", {"execution_state": "busy"}, "kernel_info_request"),
    ("status", {"execution_state": "idle"}, "kernel_info_request"),
    ("status", {"execution_state": "busy"}, "execute_request"),
    ("execute_input", {"code": "print(1)", "execution_count": 1}, "execute_request"),
    ("stream", {"name": "stdout", "text": "2026-12-03T10:00:00Z\n" * 50}, "execute_request"),
    ("display_data", {"data": {"text/plain": "x"}, "metadata": {}}, "execute_request"),
    ("status", {"execution_state": "idle"}, "execute_request"),
    ("status", {"execution_state": "busy"}, "comm_info_request"),
    ("stream", {"name": "stdout", "text": "from a thread\n"}, None),
    ("status", {"execution_state": "idle"}, "comm_info_request"),
    ("comm_msg", {"comm_id": "c", "data": {}}, "comm_msg"),
    ("status", {"execution_state": "starting"}, None),
    ("status", {"execution_state": "idle"}, None),
]


@pytest.fixture
def mkm(tmp_path: Any) -> AsyncMappingKernelManager:
    return AsyncMappingKernelManager(connection_dir=str(tmp_path), root_dir=str(tmp_path))


def test_same_states_and_activity_as_jupyter_servers(mkm: AsyncMappingKernelManager) -> None:
    session = Session(key=b"kernel-key")
    theirs, ours = kernel(session), kernel(session)
    mkm._kernels["theirs"] = theirs
    AsyncMappingKernelManager.start_watching_activity(mkm, "theirs")
    record = activity_recorder(mkm, ours, "ours")
    steps = []
    for msg_type, content, parent_type in SEQUENCE:
        msg = message(session, msg_type, content, parent_type)
        before = (theirs.last_activity, ours.last_activity)
        time.sleep(0.001)  # so a moved last_activity differs
        theirs.stream.callback(list(msg))
        record(list(msg))
        steps.append((msg_type, parent_type, theirs.execution_state, ours.execution_state,
                      theirs.last_activity != before[0], ours.last_activity != before[1]))
    for step in steps:
        assert step[2] == step[3] and step[4] == step[5], step
    # the sequence does exercise each rule: tracked, untracked while idle, busy, after starting
    assert [s[2] for s in steps][:4] == ["starting", "idle", "idle", "busy"]
    assert any(not s[4] for s in steps) and any(s[4] for s in steps)


def test_skips_what_is_not_a_message_and_keeps_its_state(mkm: AsyncMappingKernelManager) -> None:
    session = Session(key=b"kernel-key")
    ours = kernel(session)
    record = activity_recorder(mkm, ours, "ours")
    record(message(session, "status", {"execution_state": "busy"}, "execute_request"))
    assert ours.execution_state == "busy"
    good = message(session, "status", {"execution_state": "idle"}, "execute_request")
    for bad in ([b"no delimiter"], [b"<IDS|MSG>", b"sig"], [*good[:2], b"{not json", *good[3:]],
                [*good[:2], b"[]", *good[3:]], [*good[:5], b'{"no": "state"}'],
                [*good[:5], b"\xff\xfe"]):
        record(bad)
        assert ours.execution_state == "busy", bad
    record(good)
    assert ours.execution_state == "idle"


def test_reads_no_content_but_a_status(mkm: AsyncMappingKernelManager) -> None:
    """A stream message's content (megabytes of output) is neither verified nor parsed: the
    subscription reads only the relay's own publisher. jupyter_server's watch would check
    the signature over it and fail on this message."""
    session = Session(key=b"kernel-key")
    ours = kernel(session)
    ours.execution_state = "busy"
    msg = message(session, "stream", {"name": "stdout", "text": "x"}, "execute_request")
    msg[-1] = b"not even JSON"
    record = activity_recorder(mkm, ours, "ours")
    record(msg)
    assert ours.last_activity is not None and ours.execution_state == "busy"
