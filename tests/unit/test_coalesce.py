"""Coalescing of small stream messages from the guest (kernelmanager.channel): only
adjacent iopub stream messages with the same topic, parent, metadata and name merge,
texts in order; anything else passes untouched and in order."""

from __future__ import annotations

import json

from guest.protocol import JupyterMessage
from kernelmanager.channel import COALESCE_BELOW, DELIM, coalesce_streams


def msg(text: str, *, name: str = "stdout", parent: str = "p1", msg_type: str = "stream",
        channel: str = "iopub", msg_id: str = "") -> JupyterMessage:
    header = {"msg_id": msg_id or f"id-{text}", "msg_type": msg_type, "session": "s", "username": "u",
              "date": "2026-01-01T00:00:00Z", "version": "5.3"}
    content = {"name": name, "text": text} if msg_type == "stream" else {"execution_state": text}
    return JupyterMessage(channel, [f"kernel.{msg_type}".encode(), DELIM, b"", json.dumps(header).encode(),
                                    json.dumps({"msg_id": parent}).encode(), b"{}", json.dumps(content).encode()])


def texts(msgs: list[JupyterMessage]) -> list[tuple[str, str]]:
    out = []
    for m in msgs:
        h, c = json.loads(m.parts[3]), json.loads(m.parts[6])
        out.append((h["msg_type"], c.get("text", c.get("execution_state"))))
    return out


def test_adjacent_streams_of_one_parent_and_name_merge_in_order() -> None:
    batch = [msg("a\n", msg_id="first"), msg("b\n"), msg("c"), msg("x", name="stderr"), msg("d"),
             msg("busy", msg_type="status"), msg("e"), msg("f", parent="p2"), msg("g", parent="p2")]
    out = coalesce_streams(batch)
    assert texts(out) == [("stream", "a\nb\nc"), ("stream", "x"), ("stream", "d"), ("status", "busy"),
                          ("stream", "e"), ("stream", "fg")]
    assert json.loads(out[0].parts[3])["msg_id"] == "first"  # the first one's header
    assert out[1] is batch[3]  # a lone message is passed on as it was


def test_big_or_non_iopub_or_odd_messages_pass_untouched() -> None:
    big = msg("x" * COALESCE_BELOW)
    shell = msg("a", channel="shell")
    extra = msg("b")
    extra = JupyterMessage("iopub", [*extra.parts, b"buffer"])
    odd = msg("c")
    odd.parts[6] = json.dumps({"name": "stdout", "text": "c", "more": 1}).encode()
    batch = [msg("1"), big, msg("2"), shell, msg("3"), extra, msg("4"), odd, msg("5")]
    assert coalesce_streams(batch) == batch


def test_unicode_and_escapes_survive_exactly() -> None:
    parts = ["é\n", "\"quoted\"\t", "\\back\\", "日本\u2028", "\x00end"]
    out = coalesce_streams([msg(t) for t in parts])
    assert len(out) == 1 and json.loads(out[0].parts[6]) == {"name": "stdout", "text": "".join(parts)}
