"""Jupyter message framing on the gateway side (gateway.wire): ZMQ multipart messages split
and re-signed with jupyter_client's Session, websocket frames validated. No VMs."""

from __future__ import annotations

import json

import pytest
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

from gateway import wire


def test_split_join_round_trip_and_signature() -> None:
    session = Session(key=b"secret")
    msg = session.msg("stream", content={"name": "stdout", "text": "hi"})
    parts = session.serialize(msg, ident=[b"ident"])
    frames = wire.split(parts)
    assert frames is not None and frames.identities == [b"ident"] and frames.buffers == []
    assert wire.msg_id(parts) == msg["header"]["msg_id"]
    assert wire.header(parts)["msg_type"] == "stream"  # type: ignore[index]
    assert wire.join(frames, session) == parts  # same bytes, same HMAC
    changed = wire.join(frames._replace(content=session.pack({"name": "stdout", "text": "yo"})), session)
    _, rest = session.feed_identities(changed)
    assert session.deserialize(rest)["content"]["text"] == "yo"  # verifies the new signature
    with pytest.raises(ValueError, match="Invalid Signature"):
        Session(key=b"other").deserialize(rest)


@pytest.mark.parametrize("parts", [[], [b"x", b"y"], [wire.DELIM, b"sig", b"{}"],
                                   [wire.DELIM, b"", b"not json", b"{}", b"{}", b"{}"]])
def test_not_a_message_has_no_header(parts: list[bytes]) -> None:
    assert wire.msg_id(parts) is None


def v1(channel: str, *parts: bytes) -> bytes:
    return serialize_msg_to_ws_v1(list(parts), channel)


def test_parse_v1_accepts_a_message_and_refuses_what_is_not_one() -> None:
    header = json.dumps({"msg_id": "1", "msg_type": "execute_request"}).encode()
    channel, hdr, msg_list = wire.parse_v1(v1("shell", header, b"{}", b"{}", b"{}", b"buf"))
    assert channel == "shell" and hdr["msg_id"] == "1" and msg_list[-1] == b"buf"
    for frame, why in [("text", "binary frames"), (b"\x01", "too short"),
                       (v1("shell", b"[]", b"{}", b"{}", b"{}"), "header is not a JSON object"),
                       (v1("shell", header, b"{", b"{}", b"{}"), "parent_header is not valid JSON"),
                       ((99).to_bytes(8, "little") + b"\0" * 16, "bad v1 offset table")]:
        with pytest.raises(wire.BadFrame, match=why):
            wire.parse_v1(frame)


def test_parse_legacy() -> None:
    channel, msg = wire.parse_legacy(json.dumps({"channel": "control", "header": {"msg_type": "x"}}))
    assert channel == "control" and msg["content"] == {} and msg["buffers"] == []
    with pytest.raises(wire.BadFrame, match="no header"):
        wire.parse_legacy(json.dumps({"content": {}}))
    with pytest.raises(wire.BadFrame, match="not valid JSON"):
        wire.parse_legacy("{")
