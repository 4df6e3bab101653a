"""The host <-> guest wire protocol. Both ends import this one module.

The link is a byte stream (a virtio-serial port on QEMU, a vsock connection on VMMs
that can snapshot vsock). It is *not* reliable across reconnects: every restore
tears the host end down, and bytes written while the host end is away are dropped
by QEMU. So the stream carries frames with sequence numbers and cumulative
acknowledgements, and each side keeps what it sent until the peer acknowledged it.

Frame layout (little endian)::

    magic  4s   b"\\xf0VKG"
    type   B    HELLO | HELLO_ACK | DATA | ACK
    flags  B    FLAG_MORE: this DATA frame is a fragment, more follow
    _      H    reserved (0)
    seq    Q    DATA: sequence number (1, 2, ...); others 0
    ack    Q    cumulative: highest sequence number received in order
    length I    payload length (<= MAX_FRAME_PAYLOAD)
    pcrc   I    crc32 of the payload
    hcrc   I    crc32 of the 32 bytes before it

A receiver that meets bad bytes (the tail of a frame cut by a reconnect) drops one
byte and searches for the next magic, so a stream always resynchronises.

Sessions: the host opens every connection with HELLO{session, recv}. A guest that
sees a *new* session id (after a restore from a snapshot, or in a fork child) drops
everything of the old session and starts counting from zero; a known session id
means "the same host came back": both sides drop what the other acknowledged and
retransmit the rest, in order. Duplicates are recognised by sequence number.
The guest answers HELLO_ACK{session, recv, fresh}; the host sends no DATA before it.

Messages: a DATA payload (reassembled from fragments) is one message, whose first
byte is its kind: KIND_JUPYTER (a channel byte and the ZMQ multipart frames) or
KIND_CONTROL (a JSON object: requests, replies and events between host and agent).

Bump PROTOCOL_VERSION on any incompatible change: templates record it, and a
template baked with another version is refused instead of restored.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

MAGIC = b"\xf0VKG"
HELLO, HELLO_ACK, DATA, ACK = 1, 2, 3, 4
FLAG_MORE = 0x01

_HEAD = struct.Struct("<4sBBHQQII")
_HCRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HCRC.size

MAX_FRAME_PAYLOAD = 1 << 20
#: the largest message (a Jupyter message with all its buffers) either side accepts
MAX_MESSAGE = 256 << 20

KIND_JUPYTER, KIND_CONTROL = 1, 2
CHANNELS = ("shell", "control", "stdin", "iopub")
CHANNEL_IDS = {name: i for i, name in enumerate(CHANNELS)}

#: the name of the virtio-serial port (and the vsock port the agent listens on)
PORT_NAME = "vmkg.agent"
VSOCK_PORT = 1024


class ProtocolError(Exception):
    """The peer sent something this protocol cannot accept."""


@dataclass(frozen=True)
class Frame:
    type: int
    seq: int = 0
    ack: int = 0
    payload: bytes = b""
    flags: int = 0

    def encode(self) -> bytes:
        head = _HEAD.pack(
            MAGIC, self.type, self.flags, 0, self.seq, self.ack, len(self.payload),
            zlib.crc32(self.payload),
        )
        return head + _HCRC.pack(zlib.crc32(head)) + self.payload


class FrameDecoder:
    """Turns a byte stream into frames, skipping garbage. Sans-IO."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0  # bytes dropped while resynchronising, for diagnostics

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while True:
            if len(buf) - pos < HEADER_SIZE:
                break
            if buf[pos:pos + 4] != MAGIC:
                nxt = buf.find(MAGIC, pos + 1)
                cut = nxt if nxt >= 0 else max(pos, len(buf) - 3)
                self.skipped += cut - pos
                pos = cut
                continue
            head = bytes(buf[pos:pos + _HEAD.size])
            (hcrc,) = _HCRC.unpack_from(buf, pos + _HEAD.size)
            _, ftype, flags, _, seq, ack, length, pcrc = _HEAD.unpack(head)
            if zlib.crc32(head) != hcrc or length > MAX_FRAME_PAYLOAD or not HELLO <= ftype <= ACK:
                self.skipped += 1
                pos += 1
                continue
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + HEADER_SIZE:end])
            if zlib.crc32(payload) != pcrc:
                self.skipped += 1
                pos += 1
                continue
            frames.append(Frame(ftype, seq, ack, payload, flags))
            pos = end
        del buf[:pos]
        return frames


# ---------------------------------------------------------------------------
# Messages


def encode_jupyter(channel: str, parts: Iterable[bytes]) -> bytes:
    parts = list(parts)
    out = [struct.pack("<BBH", KIND_JUPYTER, CHANNEL_IDS[channel], len(parts))]
    for p in parts:
        out.append(struct.pack("<I", len(p)))
        out.append(bytes(p))
    return b"".join(out)


def encode_control(obj: dict[str, Any]) -> bytes:
    return bytes([KIND_CONTROL]) + json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class JupyterMessage:
    channel: str
    parts: list[bytes]


@dataclass(frozen=True)
class ControlMessage:
    body: dict[str, Any]


def decode_message(data: bytes) -> JupyterMessage | ControlMessage:
    """Parse one reassembled message; raises ProtocolError on anything malformed."""
    if not data:
        raise ProtocolError("empty message")
    kind = data[0]
    if kind == KIND_CONTROL:
        try:
            body = json.loads(data[1:])
        except ValueError as exc:
            raise ProtocolError(f"bad control message: {exc}") from exc
        if not isinstance(body, dict):
            raise ProtocolError("control message is not an object")
        return ControlMessage(body)
    if kind != KIND_JUPYTER or len(data) < 4:
        raise ProtocolError(f"unknown message kind {kind}")
    _, chan, n = struct.unpack_from("<BBH", data)
    if chan >= len(CHANNELS):
        raise ProtocolError(f"unknown channel {chan}")
    parts: list[bytes] = []
    pos = 4
    for _ in range(n):
        if pos + 4 > len(data):
            raise ProtocolError("truncated jupyter message")
        (ln,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + ln > len(data):
            raise ProtocolError("truncated jupyter message")
        parts.append(data[pos:pos + ln])
        pos += ln
    if pos != len(data):
        raise ProtocolError("trailing bytes in jupyter message")
    return JupyterMessage(CHANNELS[chan], parts)


# ---------------------------------------------------------------------------
# The reliable session (sans-IO: callers move the bytes)


@dataclass
class _Sent:
    seq: int
    frame: Frame


@dataclass
class Endpoint:
    """One side of a reliable session.

    Callers: the host's ``kernelmanager.channel`` and the guest's ``agent``. They feed
    received bytes to :meth:`receive`, write whatever :meth:`outgoing` returns, and
    call :meth:`connection_lost` when the stream breaks. The endpoint never does I/O.
    """

    is_host: bool
    session: str | None = None
    #: the sender holds back new messages while this many bytes are unacknowledged
    window: int = 32 << 20

    next_seq: int = 1
    recv_seq: int = 0
    acked_sent: int = 0  # the recv_seq value we last told the peer
    unacked: deque[_Sent] = field(default_factory=deque)
    unacked_bytes: int = 0
    established: bool = False
    _out: list[bytes] = field(default_factory=list)
    _decoder: FrameDecoder = field(default_factory=FrameDecoder)
    _partial: list[bytes] = field(default_factory=list)
    _partial_size: int = 0
    _delivered: list[bytes] = field(default_factory=list)
    fresh_session: bool = False  # guest: set when a HELLO started a new session

    # -- connection lifecycle -------------------------------------------------

    def connection_made(self) -> None:
        """The stream is (re)connected. The host speaks first."""
        self._out.clear()  # everything unacknowledged is resent after the handshake
        self._decoder.reset()
        self._partial.clear()
        self._partial_size = 0
        self.established = False
        if self.is_host:
            hello = {"session": self.session, "recv": self.recv_seq, "version": PROTOCOL_VERSION}
            self._out.append(Frame(HELLO, payload=json.dumps(hello).encode()).encode())

    def connection_lost(self) -> None:
        self.established = False
        self._decoder.reset()
        self._partial.clear()
        self._partial_size = 0

    # -- sending ----------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """False while the window is full: stop reading from the source until acks come."""
        return self.unacked_bytes < self.window

    def send(self, message: bytes) -> None:
        """Queue one message (fragmented into frames); it is kept until acknowledged."""
        if len(message) > MAX_MESSAGE:
            raise ProtocolError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        view = memoryview(message)
        chunks = [view[i:i + MAX_FRAME_PAYLOAD] for i in range(0, len(message), MAX_FRAME_PAYLOAD)] or [view]
        for i, chunk in enumerate(chunks):
            flags = FLAG_MORE if i < len(chunks) - 1 else 0
            frame = Frame(DATA, self.next_seq, 0, bytes(chunk), flags)
            self.unacked.append(_Sent(self.next_seq, frame))
            self.unacked_bytes += len(chunk)
            self.next_seq += 1
            if self.established:
                self._emit(frame)

    def _emit(self, frame: Frame) -> None:
        # every frame carries our cumulative ack, so acks ride on data for free
        self._out.append(Frame(frame.type, frame.seq, self.recv_seq, frame.payload, frame.flags).encode())
        self.acked_sent = self.recv_seq

    def outgoing(self) -> bytes:
        """Bytes to write now (possibly empty). Adds an ACK if data arrived unacknowledged."""
        if self.established and self.recv_seq != self.acked_sent:
            self._out.append(Frame(ACK, ack=self.recv_seq).encode())
            self.acked_sent = self.recv_seq
        data = b"".join(self._out)
        self._out.clear()
        return data

    # -- receiving --------------------------------------------------------------

    def receive(self, data: bytes) -> list[bytes]:
        """Feed received bytes; returns the complete messages now deliverable, in order."""
        for frame in self._decoder.feed(data):
            self._on_frame(frame)
        out, self._delivered = self._delivered, []
        return out

    def _on_frame(self, frame: Frame) -> None:
        if frame.type == HELLO:
            self._on_hello(frame)
            return
        if frame.type == HELLO_ACK:
            self._on_hello_ack(frame)
            return
        if not self.established:
            return  # stale bytes from before the handshake
        self._on_ack(frame.ack)
        if frame.type != DATA:
            return
        if frame.seq != self.recv_seq + 1:
            return  # duplicate (<=) or a gap after a loss (>): the handshake resends in order
        self.recv_seq = frame.seq
        self._partial.append(frame.payload)
        self._partial_size += len(frame.payload)
        if self._partial_size > MAX_MESSAGE:
            raise ProtocolError(f"peer message exceeds {MAX_MESSAGE} bytes")
        if not frame.flags & FLAG_MORE:
            self._delivered.append(b"".join(self._partial))
            self._partial.clear()
            self._partial_size = 0

    def _on_ack(self, ack: int) -> None:
        while self.unacked and self.unacked[0].seq <= ack:
            self.unacked_bytes -= len(self.unacked.popleft().frame.payload)

    def _on_hello(self, frame: Frame) -> None:
        if self.is_host:
            raise ProtocolError("guest sent HELLO")
        hello = json.loads(frame.payload)
        if hello.get("version") != PROTOCOL_VERSION:
            # answer anyway so the host can report the mismatch clearly
            reply = {"session": hello.get("session"), "recv": 0, "fresh": True, "version": PROTOCOL_VERSION}
            self._out.append(Frame(HELLO_ACK, payload=json.dumps(reply).encode()).encode())
            return
        fresh = hello["session"] != self.session
        if fresh:
            self._new_session(hello["session"])
            self.fresh_session = True
        else:
            self._on_ack(int(hello["recv"]))
        reply = {"session": self.session, "recv": self.recv_seq, "fresh": fresh, "version": PROTOCOL_VERSION}
        self._out.append(Frame(HELLO_ACK, payload=json.dumps(reply).encode()).encode())
        self._establish()

    def _on_hello_ack(self, frame: Frame) -> None:
        if not self.is_host:
            raise ProtocolError("host sent HELLO_ACK")
        reply = json.loads(frame.payload)
        if reply.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"guest agent speaks protocol {reply.get('version')}, host speaks {PROTOCOL_VERSION}"
            )
        if reply["session"] != self.session:
            raise ProtocolError("guest answered for another session")
        if reply["fresh"] and (self.recv_seq or self.acked_sent):
            # The guest lost our session (it was restored behind our back): nothing it
            # sent before can be trusted to line up with our counters.
            raise ProtocolError("guest forgot the session; it was reset or restored")
        self._on_ack(int(reply["recv"]))
        self._establish()

    def _new_session(self, session: str) -> None:
        self.session = session
        self.next_seq = 1
        self.recv_seq = 0
        self.acked_sent = 0
        self.unacked.clear()
        self.unacked_bytes = 0

    def _establish(self) -> None:
        self.established = True
        for sent in self.unacked:  # retransmit, in order, whatever the peer has not got
            self._emit(sent.frame)

