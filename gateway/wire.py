"""Jupyter message framing on the gateway side, in one place.

Two layouts meet in the gateway:

**ZMQ multipart** (kernel <-> gateway, as jupyter_client's ``Session`` serializes it)::

    [*identities, b"<IDS|MSG>", signature, header, parent_header, metadata, content, *buffers]

:func:`split` finds the parts (:class:`Frames`), :func:`header` / :func:`msg_id` read the
header, :func:`join` reassembles a message and signs it with the kernel's ``Session``
(``Session.sign``: HMAC over header, parent, metadata and content). Building a message
from scratch is ``Session.msg`` + ``Session.serialize``; nothing here re-implements them.

**Websocket frames** (client -> gateway): the ``v1.kernel.websocket.jupyter.org``
subprotocol (binary: an offset table, then channel, header, parent, metadata, content,
buffers) or the legacy protocol (JSON text, or jupyter_server's legacy binary layout).
:func:`parse_v1` and :func:`parse_legacy` validate a frame and raise :class:`BadFrame`
(which closes that websocket with 1007) for anything that is not a routable message.
Frames toward clients are built by jupyter_server (``serialize_msg_to_ws_v1``).

The guest agent (``guest/agent.py``) and the host relay (``kernelmanager/relay.py``) have
their own copies of the delimiter logic: they may not import the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from jupyter_server.services.kernels.connection.base import deserialize_binary_message

V1 = "v1.kernel.websocket.jupyter.org"
DELIM = b"<IDS|MSG>"


class Frames(NamedTuple):
    """A ZMQ multipart Jupyter message, split at the delimiter (parts still packed)."""

    identities: list[Any]
    signature: bytes
    header: bytes
    parent_header: bytes
    metadata: bytes
    content: bytes
    buffers: list[Any]


def split(msg_list: Sequence[Any]) -> Frames | None:
    """The parts of ``msg_list``; None if it has no delimiter or too few parts after it."""
    try:
        i = list(msg_list).index(DELIM)
    except ValueError:
        return None
    if len(msg_list) < i + 6:
        return None
    sig, hdr, parent, metadata, content = (bytes(p) for p in msg_list[i + 1:i + 6])
    return Frames(list(msg_list[:i]), sig, hdr, parent, metadata, content, list(msg_list[i + 6:]))


def join(frames: Frames, session: Any) -> list[Any]:
    """``frames`` as a ZMQ multipart message, signed by ``session`` (a jupyter_client
    ``Session`` with the kernel's key)."""
    body = [frames.header, frames.parent_header, frames.metadata, frames.content]
    return [*frames.identities, DELIM, session.sign(body), *body, *frames.buffers]


def header(msg_list: Sequence[Any]) -> dict[str, Any] | None:
    """The unpacked header of a ZMQ multipart message; None if it has none."""
    frames = split(msg_list)
    if frames is None:
        return None
    try:
        value = json.loads(frames.header)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def msg_id(msg_list: Sequence[Any]) -> str | None:
    hdr = header(msg_list)
    return str(hdr["msg_id"]) if hdr is not None and "msg_id" in hdr else None


class BadFrame(ValueError):
    """A websocket frame that is not a Jupyter message this gateway can route."""


def _json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadFrame(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise BadFrame(f"{what} is not a JSON object")
    return value


def parse_v1(frame: bytes | str) -> tuple[str, dict[str, Any], list[bytes]]:
    """(channel, header, msg_list) of a v1 frame; raises BadFrame."""
    if not isinstance(frame, bytes):
        raise BadFrame(f"{V1} carries binary frames, got text")
    if len(frame) < 8:
        raise BadFrame("frame too short for a v1 offset table")
    n = int.from_bytes(frame[:8], "little")
    if n < 6 or 8 * (n + 1) > len(frame):
        raise BadFrame("bad v1 offset table")
    offsets = [int.from_bytes(frame[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
    if offsets[0] != 8 * (n + 1) or offsets != sorted(offsets) or offsets[-1] > len(frame):
        raise BadFrame("bad v1 offsets")
    try:
        channel = frame[offsets[0]:offsets[1]].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFrame("channel name is not UTF-8") from exc
    msg_list = [frame[offsets[i]:offsets[i + 1]] for i in range(1, n - 1)]
    header = _json_object(msg_list[0], "header")
    for part, what in zip(msg_list[1:4], ("parent_header", "metadata", "content"), strict=False):
        _json_object(part, what)
    return channel, header, msg_list


def parse_legacy(frame: bytes | str) -> tuple[str | None, dict[str, Any]]:
    """(channel, msg) of a legacy frame (JSON text, or the legacy binary layout)."""
    if isinstance(frame, bytes):
        try:
            msg = deserialize_binary_message(frame)
        except Exception as exc:  # noqa: BLE001 - any failure means a malformed frame
            raise BadFrame("malformed binary message") from exc
    else:
        msg = _json_object(frame, "message")
    channel = msg.pop("channel", None)
    for key in ("parent_header", "metadata", "content"):
        msg.setdefault(key, {})
    for key in ("header", "parent_header", "metadata", "content"):
        if not isinstance(msg.get(key), dict):
            raise BadFrame(f"message has no {key} object")
    msg.setdefault("buffers", [])
    return channel, msg
