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

A receiver that meets bad bytes (the tail of a frame cut by a reconnect) searches for
the next magic, so a stream always resynchronises. A frame whose *header* checks out
but whose payload does not is another matter: within one connection the stream loses
nothing, so a payload failure after a valid header is corruption or malice, never a
cut. The host (``strict``) then drops the connection instead of retrying one byte
further (which let 36 guest bytes cost ~1 MiB of CRC work), and after the handshake it
accepts no garbage at all.

Sessions: the host opens every connection with HELLO{session, recv, conn, max_message}. A guest that
sees a *new* session id (after a restore from a snapshot, or in a fork child) drops
everything of the old session and starts counting from zero; a known session id
means "the same host came back": both sides drop what the other acknowledged and
retransmit the rest, in order. Duplicates are recognised by sequence number.
The guest answers HELLO_ACK{session, recv, fresh, conn}; the host sends no DATA before it.
``conn`` numbers the host's connections, so a HELLO_ACK left over from an earlier
connection is recognised and ignored; a HELLO_ACK once established, an ack for a frame
never sent, or a DATA frame out of sequence is a protocol error that drops the
connection (the host then marks the kernel dead): a peer cannot make the other side
re-queue its unacknowledged frames at will. ``max_message`` tells the guest the largest
message the host accepts, so the agent drops (and reports) bigger ones at the source.

Messages: a DATA payload (reassembled from fragments) is one message, whose first
byte is its kind: KIND_JUPYTER (a channel byte and the ZMQ multipart frames) or
KIND_CONTROL (a JSON object: requests, replies and events between host and agent).

Bump PROTOCOL_VERSION on any incompatible change: templates record it, and a
template baked with another version is refused instead of restored. Version 3 added
the guest's ``fork_request`` event (the ``%fork`` magic: ``{"event": "fork_request",
"request": n, "count", "reseed", "timeout"}``), the host's ``fork_result`` op that
answers it (``{"op": "fork_result", "request": n, "ok", "kernels", "parent_id",
"error"}``) and the ``fork`` field of ``restore`` (``{"index", "parent_id"}``: the child
sets ``__fork__``). The host validates every field of a ``fork_request``
(``kernelmanager.provisioner``): it comes from code in the guest.

Bounds: a frame payload is at most MAX_FRAME_PAYLOAD; a receiver buffers at most one
frame beyond what it was fed; a reassembled message is at most ``Endpoint.max_message``
bytes: a bigger one is *discarded fragment by fragment as it arrives* (never
buffered) and reported in ``Endpoint.oversized``; a control object's JSON is at most
MAX_CONTROL bytes and MAX_DEPTH deep before it is parsed.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 3

MAGIC = b"\xf0VKG"
HELLO, HELLO_ACK, DATA, ACK = 1, 2, 3, 4
FLAG_MORE = 0x01

_HEAD = struct.Struct("<4sBBHQQII")
_HCRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HCRC.size

MAX_FRAME_PAYLOAD = 1 << 20
#: the largest message (a Jupyter message with all its buffers) either side accepts
MAX_MESSAGE = 256 << 20
#: the largest control message (JSON) and handshake payload accepted
MAX_CONTROL = 64 << 20
MAX_HANDSHAKE = 4096
#: the deepest JSON nesting parsed (deeper is refused before parsing, no RecursionError)
MAX_DEPTH = 64
#: stale HELLO_ACKs (of earlier connections) tolerated before the handshake completes
MAX_STALE_HELLO_ACKS = 8

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
    #: bytes, or (frames being sent) a view of the message they are cut from: no copy
    #: (``bytes(payload)`` of a received frame is the payload itself, not a copy)
    payload: bytes | memoryview = b""
    flags: int = 0

    def head(self) -> bytes:
        """The frame's header (with its checksum), which precedes ``payload`` on the wire."""
        head = _HEAD.pack(
            MAGIC, self.type, self.flags, 0, self.seq, self.ack, len(self.payload),
            zlib.crc32(self.payload),
        )
        return head + _HCRC.pack(zlib.crc32(head))

    def encode(self) -> bytes:
        return self.head() + bytes(self.payload)


class FrameDecoder:
    """Turns a byte stream into frames, skipping garbage. Sans-IO.

    ``strict`` (the host): a frame with a valid header and a bad payload, or a valid
    header announcing an impossible frame, raises ProtocolError instead of resyncing.
    """

    def __init__(self, strict: bool = False) -> None:
        self._buf = bytearray()
        self.strict = strict
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
            if zlib.crc32(head) != hcrc:
                self.skipped += 1
                pos += 1
                continue
            _, ftype, flags, _, seq, ack, length, pcrc = _HEAD.unpack(head)
            if length > MAX_FRAME_PAYLOAD or not HELLO <= ftype <= ACK:
                if self.strict:
                    del buf[:pos]
                    raise ProtocolError(f"frame header announces type {ftype}, {length} bytes")
                self.skipped += 1
                pos += 1
                continue
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + HEADER_SIZE:end])
            if zlib.crc32(payload) != pcrc:
                if self.strict:
                    del buf[:end]
                    raise ProtocolError(f"payload checksum mismatch in a {length}-byte frame "
                                        "after a valid header")
                self.skipped += 1
                pos += 1
                continue
            frames.append(Frame(ftype, seq, ack, payload, flags))
            pos = end
        del buf[:pos]
        return frames


# ---------------------------------------------------------------------------
# Messages


def encode_jupyter(channel: str, parts: Iterable[bytes | memoryview]) -> bytes:
    """One KIND_JUPYTER message of ``parts`` (bytes or views of them: the join is the only
    copy, which is what a large output costs the guest)."""
    parts = list(parts)
    out: list[bytes | memoryview] = [struct.pack("<BBH", KIND_JUPYTER, CHANNEL_IDS[channel], len(parts))]
    for p in parts:
        out.append(struct.pack("<I", p.nbytes if isinstance(p, memoryview) else len(p)))
        out.append(p)
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


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
#: keeps brackets only, as "[" and "]"
_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]"), bytes(b for b in range(256) if b not in b"[]{}")
#: rounds of removing innermost pairs before what is left must be small enough to scan
DEPTH_ROUNDS = 16
DEPTH_SCAN = 1 << 16


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """True if the JSON text ``data`` nests deeper than ``limit``, or its brackets do not
    pair up, or it is too intricate to check cheaply. No parsing, no recursion, and the
    work is C loops over the bytes, a bounded number of times.

    Fewer opening brackets than ``limit`` settles it with two counts. Otherwise strings
    are cut out (brackets inside text do not nest) and only brackets kept; a run of
    ``limit + 1`` openers means too deep; else every innermost pair is removed (one
    level less everywhere) and the run check repeats. Once at most DEPTH_SCAN brackets
    are left they are scanned one by one; if DEPTH_ROUNDS rounds leave more, the text
    counts as too deep (ordinary output - tables, plots, GeoJSON - is a few levels deep
    and empties in a few rounds).
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(*_BRACKETS_ONLY)
    too_deep = b"[" * (limit + 1)
    for _ in range(DEPTH_ROUNDS):
        if len(brackets) <= DEPTH_SCAN:
            depth = 0
            for b in brackets:
                depth += 1 if b == 91 else -1
                if depth > limit or depth < 0:
                    return True
            return depth != 0
        if too_deep in brackets:
            return True
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return True  # nothing pairs up: not JSON
        brackets = shorter
    return True


def parse_json(data: bytes, what: str, *, max_size: int = MAX_CONTROL, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for bytes from a peer: size and depth checked first, every failure
    (including a RecursionError) a ProtocolError."""
    if len(data) > max_size:
        raise ProtocolError(f"{what} of {len(data)} bytes exceeds {max_size}")
    if json_depth_exceeds(data, max_depth):
        raise ProtocolError(f"{what} nests deeper than {max_depth}")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"bad {what}: {str(exc)[:200]}") from exc


def decode_message(data: bytes, *, max_control: int = MAX_CONTROL) -> JupyterMessage | ControlMessage:
    """Parse one reassembled message; raises ProtocolError on anything malformed."""
    if not data:
        raise ProtocolError("empty message")
    kind = data[0]
    if kind == KIND_CONTROL:
        body = parse_json(data[1:], "control message", max_size=max_control)
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

    The host's endpoint trusts nothing the guest sends: its decoder is strict, every
    frame must fit the state of the session (see the module docstring), and messages
    over ``max_message`` are discarded as they stream in and counted in
    :attr:`oversized` (sizes the caller drains and reports).
    """

    is_host: bool
    session: str | None = None
    #: the sender holds back new messages while this many bytes are unacknowledged
    window: int = 32 << 20
    #: the largest message accepted from the peer (bigger ones are discarded, see oversized)
    max_message: int = MAX_MESSAGE

    next_seq: int = 1
    recv_seq: int = 0
    acked_sent: int = 0  # the recv_seq value we last told the peer
    unacked: deque[_Sent] = field(default_factory=deque)
    unacked_bytes: int = 0
    established: bool = False
    #: guest: the largest message the host said it accepts (from its HELLO)
    peer_max_message: int = MAX_MESSAGE
    #: sizes of messages from the peer discarded for exceeding max_message (caller drains)
    oversized: list[int] = field(default_factory=list)
    _out: list[bytes | memoryview] = field(default_factory=list)
    _decoder: FrameDecoder = field(default_factory=FrameDecoder)
    _partial: list[bytes] = field(default_factory=list)
    _partial_size: int = 0
    _discarding: bool = False
    _delivered: list[bytes] = field(default_factory=list)
    _conn: int = 0  # host: number of this connection, echoed in HELLO_ACK
    _stale_acks: int = 0
    fresh_session: bool = False  # guest: set when a HELLO started a new session

    def __post_init__(self) -> None:
        self._decoder.strict = self.is_host

    # -- connection lifecycle -------------------------------------------------

    def connection_made(self) -> None:
        """The stream is (re)connected. The host speaks first."""
        self._out.clear()  # everything unacknowledged is resent after the handshake
        self._reset_receiver()
        self.established = False
        if self.is_host:
            self._conn += 1
            self._stale_acks = 0
            hello = {"session": self.session, "recv": self.recv_seq, "version": PROTOCOL_VERSION,
                     "conn": self._conn, "max_message": self.max_message}
            self._out.append(Frame(HELLO, payload=json.dumps(hello).encode()).encode())

    def connection_lost(self) -> None:
        self.established = False
        self._reset_receiver()

    def _reset_receiver(self) -> None:
        self._decoder.reset()
        self._decoder.skipped = 0
        self._partial.clear()
        self._partial_size = 0
        self._discarding = False

    # -- sending ----------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """False while the window is full: stop reading from the source until acks come."""
        return self.unacked_bytes < self.window

    def send(self, message: bytes) -> None:
        """Queue one message (fragmented into frames); it is kept until acknowledged."""
        if len(message) > MAX_MESSAGE:
            raise ProtocolError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        # frames hold views of the (immutable) message until acknowledged: a 20 MB output
        # is copied once, into the outgoing bytes, not three times on an emulated CPU
        view = memoryview(message if isinstance(message, bytes) else bytes(message))
        chunks = [view[i:i + MAX_FRAME_PAYLOAD] for i in range(0, len(message), MAX_FRAME_PAYLOAD)] or [view]
        for i, chunk in enumerate(chunks):
            flags = FLAG_MORE if i < len(chunks) - 1 else 0
            frame = Frame(DATA, self.next_seq, 0, chunk, flags)
            self.unacked.append(_Sent(self.next_seq, frame))
            self.unacked_bytes += len(chunk)
            self.next_seq += 1
            if self.established:
                self._emit(frame)

    def _emit(self, frame: Frame) -> None:
        # every frame carries our cumulative ack, so acks ride on data for free
        out = Frame(frame.type, frame.seq, self.recv_seq, frame.payload, frame.flags)
        self._out += (out.head(), out.payload)
        self.acked_sent = self.recv_seq

    def outgoing(self) -> bytes:
        """Bytes to write now (possibly empty). Adds an ACK if data arrived unacknowledged."""
        return b"".join(self.outgoing_parts())

    def outgoing_parts(self) -> list[bytes | memoryview]:
        """``outgoing()`` as the pieces it joins (frame headers, views of payloads), for a
        writer that can take them one by one without copying them into one."""
        if self.established and self.recv_seq != self.acked_sent:
            self._out.append(Frame(ACK, ack=self.recv_seq).encode())
            self.acked_sent = self.recv_seq
        parts, self._out = self._out, []
        return parts

    # -- receiving --------------------------------------------------------------

    def receive(self, data: bytes) -> list[bytes]:
        """Feed received bytes; returns the complete messages now deliverable, in order.

        Raises ProtocolError (host: the connection must be dropped) on a violation;
        messages completed before it are kept for the next call's return value.
        """
        for frame in self._decoder.feed(data):
            self._on_frame(frame)
        if self.is_host and self.established and self._decoder.skipped:
            raise ProtocolError(f"{self._decoder.skipped} bytes of garbage after the handshake")
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
            if self.is_host and frame.seq > self.recv_seq + 1:
                # within one connection nothing is lost: a gap is a lie
                raise ProtocolError(f"DATA frame {frame.seq} after {self.recv_seq}")
            return  # a duplicate (a retransmission after a reconnect)
        self.recv_seq = frame.seq
        self._partial_size += len(frame.payload)
        if self._partial_size > self.max_message:
            # discard as it streams in: an oversized message is never buffered whole
            self._discarding = True
            self._partial.clear()
        if not self._discarding:
            self._partial.append(bytes(frame.payload))
        if not frame.flags & FLAG_MORE:
            if self._discarding:
                self.oversized.append(self._partial_size)
            else:
                self._delivered.append(b"".join(self._partial))
            self._partial.clear()
            self._partial_size = 0
            self._discarding = False

    def _on_ack(self, ack: int) -> None:
        if self.is_host and ack >= self.next_seq:
            raise ProtocolError(f"ack {ack} for a frame never sent (last sent {self.next_seq - 1})")
        while self.unacked and self.unacked[0].seq <= ack:
            self.unacked_bytes -= len(self.unacked.popleft().frame.payload)

    def _on_hello(self, frame: Frame) -> None:
        if self.is_host:
            raise ProtocolError("guest sent HELLO")
        hello = json.loads(bytes(frame.payload))
        max_message = hello.get("max_message")
        if isinstance(max_message, int) and max_message > 0:
            self.peer_max_message = max_message
        reply: dict[str, Any] = {"session": hello.get("session"), "recv": 0, "fresh": True,
                                 "version": PROTOCOL_VERSION, "conn": hello.get("conn")}
        if hello.get("version") != PROTOCOL_VERSION:
            # answer anyway so the host can report the mismatch clearly
            self._out.append(Frame(HELLO_ACK, payload=json.dumps(reply).encode()).encode())
            return
        fresh = hello["session"] != self.session
        if fresh:
            self._new_session(hello["session"])
            self.fresh_session = True
        else:
            self._on_ack(int(hello["recv"]))
        reply.update(session=self.session, recv=self.recv_seq, fresh=fresh)
        self._out.append(Frame(HELLO_ACK, payload=json.dumps(reply).encode()).encode())
        self._establish()

    def _on_hello_ack(self, frame: Frame) -> None:
        if not self.is_host:
            raise ProtocolError("host sent HELLO_ACK")
        if self.established:
            raise ProtocolError("HELLO_ACK after the handshake")
        reply = parse_json(bytes(frame.payload), "HELLO_ACK", max_size=MAX_HANDSHAKE)
        if not isinstance(reply, dict):
            raise ProtocolError("HELLO_ACK is not an object")
        if reply.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"guest agent speaks protocol {str(reply.get('version'))[:20]}, host speaks {PROTOCOL_VERSION}"
            )
        if reply.get("conn") != self._conn:
            # left over from an earlier connection of this session: ignore a few
            self._stale_acks += 1
            if self._stale_acks > MAX_STALE_HELLO_ACKS:
                raise ProtocolError("too many HELLO_ACKs for other connections")
            return
        if reply.get("session") != self.session:
            raise ProtocolError("guest answered for another session")
        recv, fresh = reply.get("recv"), reply.get("fresh")
        if not isinstance(recv, int) or isinstance(recv, bool) or recv < 0 or not isinstance(fresh, bool):
            raise ProtocolError("malformed HELLO_ACK")
        if fresh and (self.recv_seq or self.acked_sent):
            # The guest lost our session (it was restored behind our back): nothing it
            # sent before can be trusted to line up with our counters.
            raise ProtocolError("guest forgot the session; it was reset or restored")
        self._on_ack(recv)
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
        self._decoder.skipped = 0  # stale bytes before the handshake are expected; after it, none
        for sent in self.unacked:  # retransmit, in order, whatever the peer has not got
            self._emit(sent.frame)
