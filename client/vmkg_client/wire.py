"""Frames of the ``v1.kernel.websocket.jupyter.org`` websocket subprotocol.

One binary frame carries one Jupyter message: a little-endian uint64 count ``n`` of the
offsets that follow, ``n`` uint64 offsets from the frame's start, then the channel name
(UTF-8) and the message's parts (header, parent header, metadata, content, buffers...),
each ending where the next offset begins; the last offset is the frame's end. It is what
``jupyter_server``'s ``serialize_msg_to_ws_v1``/``deserialize_msg_from_ws_v1`` do, written
out here so the client does not depend on the server. Decoding checks every offset: a
malformed frame is a ``ValueError``, never a slice past the end.
"""

from __future__ import annotations

import itertools

V1 = "v1.kernel.websocket.jupyter.org"
#: parts of a frame beyond which it is refused (4 for the message, the rest buffers)
MAX_PARTS = 1024


def encode_v1(parts: list[bytes], channel: str) -> bytes:
    """One frame from a message's parts (header, parent, metadata, content, *buffers)."""
    name = channel.encode("utf-8")
    offsets = [8 * (len(parts) + 3)]
    offsets.append(offsets[-1] + len(name))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return b"".join([len(offsets).to_bytes(8, "little"),
                     *(o.to_bytes(8, "little") for o in offsets), name, *parts])


def decode_v1(frame: bytes) -> tuple[str, list[bytes]]:
    """(channel, parts) of a frame; ``ValueError`` if the frame is malformed."""
    if len(frame) < 8:
        raise ValueError(f"a v1 frame of {len(frame)} bytes has no offset count")
    count = int.from_bytes(frame[:8], "little")
    if not 2 <= count <= MAX_PARTS + 2 or len(frame) < 8 * (count + 1):
        raise ValueError(f"a v1 frame of {len(frame)} bytes cannot hold {count} offsets")
    offsets = [int.from_bytes(frame[8 * (i + 1):8 * (i + 2)], "little") for i in range(count)]
    if offsets[0] < 8 * (count + 1) or offsets[-1] > len(frame) or any(
            b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError("a v1 frame's offsets are out of order or past its end")
    channel = frame[offsets[0]:offsets[1]].decode("utf-8")
    return channel, [frame[offsets[i]:offsets[i + 1]] for i in range(1, count - 1)]
