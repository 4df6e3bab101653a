"""Jupyter message framing on the gateway side: websocket frames in (v1 and legacy).

(Moved out of ``gateway.websocket``.)
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.services.kernels.connection.base import deserialize_binary_message

V1 = "v1.kernel.websocket.jupyter.org"
DELIM = b"<IDS|MSG>"


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
