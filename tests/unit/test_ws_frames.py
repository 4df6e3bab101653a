"""Parsing what a client sends on a kernel's channels websocket (gateway.websocket).

Good frames are built with jupyter_server's own serializers (what JupyterLab and
GatewayClient send); bad ones byte by byte. Every bad frame must raise ``BadFrame`` (the
connection closes that websocket with 1007 and this message as the reason), never
another exception that would reach tornado as a server error.
"""

from __future__ import annotations

import json

import pytest
from jupyter_server.services.kernels.connection.base import (
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from gateway.websocket import BadFrame, parse_legacy, parse_v1

HEADER = {"msg_id": "m1", "msg_type": "execute_request", "session": "s", "username": "u",
          "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"}
CONTENT = {"code": "1+1", "silent": False}


def parts(header: object = HEADER, parent: object = None, metadata: object = None,
          content: object = CONTENT) -> list[bytes]:
    return [json.dumps(x).encode() for x in (header, parent or {}, metadata or {}, content)]


def v1(chunks: list[bytes], offsets: list[int] | None = None) -> bytes:
    """A v1 frame of ``chunks`` (channel first); ``offsets`` overrides the computed table."""
    if offsets is None:
        offsets = [8 * (len(chunks) + 2)]
        for c in chunks:
            offsets.append(offsets[-1] + len(c))
    table = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return table + b"".join(chunks)


# -- v1.kernel.websocket.jupyter.org -----------------------------------------------------------


@pytest.mark.parametrize("buffers", [[], [b""], [b"\x00\x01\xff" * 1000, b"second"]])
def test_v1_frames_from_jupyter_server_parse(buffers: list[bytes]) -> None:
    frame = serialize_msg_to_ws_v1([*parts(), *buffers], "shell")
    channel, header, msg_list = parse_v1(frame)
    assert channel == "shell" and header == HEADER
    assert msg_list == [*parts(), *buffers]  # forwarded to the kernel as they are


def test_v1_frame_built_here_matches_jupyter_servers() -> None:
    assert v1([b"control", *parts()]) == serialize_msg_to_ws_v1(parts(), "control")


def test_v1_channel_names_are_returned_as_text_even_when_unknown() -> None:
    # routing (and refusing unknown channels) is the connection's job, not the parser's
    channel, _, _ = parse_v1(v1(["iopüb".encode(), *parts()]))
    assert channel == "iopüb"


def good_offsets() -> list[int]:
    chunks = [b"shell", *parts()]
    offsets = [8 * (len(chunks) + 2)]
    for c in chunks:
        offsets.append(offsets[-1] + len(c))
    return offsets


def with_offsets(change: dict[int, int]) -> bytes:
    offsets = good_offsets()
    for i, value in change.items():
        offsets[i] = value
    return v1([b"shell", *parts()], offsets)


@pytest.mark.parametrize(("frame", "message"), [
    ('{"header": {}}', "binary frames, got text"),
    (b"", "too short"),
    (b"\x06\x00\x00", "too short"),
    ((5).to_bytes(8, "little") + bytes(200), "bad v1 offset table"),  # fewer than 6 offsets
    ((10**6).to_bytes(8, "little") + bytes(200), "bad v1 offset table"),  # table past the end
    ((2**64 - 1).to_bytes(8, "little") + bytes(64), "bad v1 offset table"),
    (with_offsets({0: 0}), "bad v1 offsets"),  # the first part must start after the table
    (with_offsets({2: 10**9}), "bad v1 offsets"),  # not ascending
    (with_offsets({5: 10**9}), "bad v1 offsets"),  # past the end
    (v1([b"\xff\xfe", *parts()]), "channel name is not UTF-8"),
    (v1([b"shell", b"{not json", *parts()[1:]]), "header is not valid JSON"),
    (v1([b"shell", b"\xff", *parts()[1:]]), "header is not valid JSON"),
    (v1([b"shell", b"[1, 2]", *parts()[1:]]), "header is not a JSON object"),
    (v1([b"shell", *parts(parent=[1])[:1], b"[1]", *parts()[2:]]), "parent_header is not a JSON object"),
    (v1([b"shell", *parts()[:2], b"nope", parts()[3]]), "metadata is not valid JSON"),
    (v1([b"shell", *parts()[:3], b"null"]), "content is not a JSON object"),
])
def test_malformed_v1_frames_are_bad_frames(frame: bytes | str, message: str) -> None:
    with pytest.raises(BadFrame, match=message):
        parse_v1(frame)


# -- the legacy protocol -----------------------------------------------------------------------


def test_legacy_json_text_gets_its_channel_and_defaults() -> None:
    channel, msg = parse_legacy(json.dumps({"header": HEADER, "content": CONTENT, "channel": "control"}))
    assert channel == "control"
    assert msg == {"header": HEADER, "parent_header": {}, "metadata": {}, "content": CONTENT,
                   "buffers": []}


def test_legacy_json_without_a_channel_leaves_the_choice_to_the_connection() -> None:
    channel, msg = parse_legacy(json.dumps({"header": HEADER, "parent_header": {}, "content": {}}))
    assert channel is None and msg["header"] == HEADER


def test_legacy_binary_frames_keep_their_buffers() -> None:
    msg = {"header": HEADER, "parent_header": {}, "metadata": {}, "content": CONTENT,
           "channel": "shell", "buffers": [b"\x00" * 10, b"abc"]}
    channel, parsed = parse_legacy(serialize_binary_message(msg))
    assert channel == "shell"
    assert parsed["content"] == CONTENT and [bytes(b) for b in parsed["buffers"]] == [b"\x00" * 10, b"abc"]


@pytest.mark.parametrize(("frame", "message"), [
    ("{", "message is not valid JSON"),
    ("[]", "message is not a JSON object"),
    ('"header"', "message is not a JSON object"),
    ("{}", "message has no header object"),
    ('{"header": "x"}', "message has no header object"),
    ('{"header": {}, "content": []}', "message has no content object"),
    ('{"header": {}, "metadata": null}', "message has no metadata object"),
    (b"\x00\x00\x00\x01", "malformed binary message"),
    (b"\xff" * 12, "malformed binary message"),
    (serialize_binary_message({"buffers": []})[:-1] + b"{", "malformed binary message"),
])
def test_malformed_legacy_frames_are_bad_frames(frame: bytes | str, message: str) -> None:
    with pytest.raises(BadFrame, match=message):
        parse_legacy(frame)
