"""A hostile guest against the real host end: ``AgentChannel`` and ``KernelRelay``.

No VM: a fake guest listens on a Unix socket (as QEMU's chardev does), speaks the real
``guest.protocol`` for the handshake and then abuses it the ways kernel code that is
root in the guest could (it can replace the agent and write any bytes to the port).
A real ZMQ client (jupyter_client's Session, signed) talks to the relay as the gateway
does. Every test checks that the host's memory (tracemalloc peak) and CPU (thread time
of the loop) stay bounded, that the offender is cut off or marked dead with clients
told (a notice and a ``dead`` status on iopub, heartbeats unanswered) or its message
dropped with a notice, and that a well-behaved neighbour in the same process keeps
answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from guest.protocol import (
    ACK,
    DATA,
    FLAG_MORE,
    HELLO_ACK,
    MAGIC,
    MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
    Endpoint,
    Frame,
    JupyterMessage,
    decode_message,
    encode_control,
    encode_jupyter,
)
from kernelmanager.channel import BUDGET, AgentChannel, GuestLimits, UnixSocketTransport
from kernelmanager.relay import DELIM, KernelRelay

MiB = 1 << 20
LIMITS = GuestLimits(max_message=4 * MiB, max_header=64 * 1024, max_depth=64,
                     kernel_buffer=8 * MiB, total_buffer=64 * MiB)


# ---------------------------------------------------------------------------
# The fake guest: a thread with a listening Unix socket and blocking I/O


class FakeGuest(threading.Thread):
    """Accepts the host's connection, completes the real handshake, then runs ``script``.

    The default script is a well-behaved kernel: it answers every shell request with a
    reply on shell and a stream message on iopub.
    """

    def __init__(self, path: str, script: Callable[[FakeGuest], None] | None = None) -> None:
        super().__init__(daemon=True, name=f"fake-guest-{os.path.basename(path)}")
        self.path = path
        self.script = script or FakeGuest.echo
        self.endpoint = Endpoint(is_host=False)
        self.stop = threading.Event()
        self.go = threading.Event()  # set once the host end is attached and its client subscribed
        self.sock: socket.socket | None = None
        self.hello: dict[str, Any] = {}
        self.written = 0
        self.host_closed = threading.Event()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)

    def run(self) -> None:
        self.srv.settimeout(10)
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        self.sock = conn
        conn.settimeout(0.2)
        ep = self.endpoint
        ep.connection_made()
        buf = b""
        while not ep.established and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                ep.receive(data)
        self.hello = json.loads(buf[36:36 + struct.unpack_from("<I", buf, 24)[0]])
        self.send_raw(ep.outgoing())
        self.go.wait(10)
        try:
            self.script(self)
        except OSError:
            self.host_closed.set()
        finally:
            conn.close()

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        view = memoryview(data)
        while view and not self.stop.is_set():
            try:
                n = self.sock.send(view)
            except TimeoutError:
                continue
            self.written += n
            view = view[n:]

    def pump(self, timeout: float = 0.05) -> list[bytes]:
        """Read what the host sent (acks, messages); returns complete messages."""
        assert self.sock is not None
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return []
        data = self.sock.recv(1 << 20)
        if not data:
            self.host_closed.set()
            raise ConnectionResetError("host closed")
        return self.endpoint.receive(data)

    def send_message(self, message: bytes) -> None:
        """Send one message as DATA frames *without keeping them* for retransmission (a
        hostile guest need not; it also keeps this thread's memory out of the host's
        tracemalloc figures)."""
        self.send_virtual(message, b"", 0, b"")

    def send_virtual(self, head: bytes, fill: bytes, n: int, tail: bytes) -> None:
        """Send the message ``head + fill * n + tail``, built one frame at a time."""
        total = len(head) + n + len(tail)
        block = fill * min(n, MAX_FRAME_PAYLOAD)
        pos = 0
        while True:
            end = min(pos + MAX_FRAME_PAYLOAD, total)
            chunk = bytearray()
            if pos < len(head):
                chunk += head[pos:end]
            a, b = max(pos, len(head)), min(end, len(head) + n)
            if b > a:
                chunk += block[:b - a]
            if end > len(head) + n:
                chunk += tail[max(pos - len(head) - n, 0):end - len(head) - n]
            ep = self.endpoint
            frame = Frame(DATA, ep.next_seq, ep.recv_seq, bytes(chunk), FLAG_MORE if end < total else 0)
            ep.next_seq += 1
            self.send_raw(frame.encode())
            with contextlib.suppress(BlockingIOError):
                self.pump(0)  # read the host's acks, so it can always write
            pos = end
            if pos >= total:
                return

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Read (and discard) until the host closes the connection."""
        assert self.sock is not None
        sink = bytearray(1 << 16)  # no allocation per read: this thread's memory stays flat
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r, _, _ = select.select([self.sock], [], [], 0.05)
                if r and not self.sock.recv_into(sink):
                    break
            except OSError:
                break
        else:
            return False
        self.host_closed.set()
        return True

    @staticmethod
    def echo(g: FakeGuest) -> None:
        while not g.stop.is_set():
            for raw in g.pump():
                msg = decode_message(raw)
                if isinstance(msg, JupyterMessage) and msg.channel == "shell":
                    i = msg.parts.index(DELIM)
                    req = json.loads(msg.parts[i + 2])
                    header = json.dumps({"msg_id": uuid.uuid4().hex, "session": "fake",
                                         "msg_type": req["msg_type"].replace("_request", "_reply"),
                                         "username": "k", "date": "2026-01-01T00:00:00Z",
                                         "version": "5.4"}).encode()
                    reply = [*msg.parts[:i], DELIM, b"", header, msg.parts[i + 2], b"{}",
                             b'{"status": "ok"}']
                    stream = [b"kernel.fake.stream", DELIM, b"", header.replace(b"_reply", b"_out"),
                              msg.parts[i + 2], b"{}", b'{"name": "stdout", "text": "hi"}']
                    g.endpoint.send(encode_jupyter("iopub", stream))
                    g.endpoint.send(encode_jupyter("shell", reply))
            out = g.endpoint.outgoing()
            if out:
                g.send_raw(out)


def _header() -> bytes:
    return json.dumps({"msg_id": uuid.uuid4().hex, "msg_type": "stream", "session": "k",
                       "username": "k", "date": "2026-01-01T00:00:00Z", "version": "5.4"}).encode()


def iopub_message(content: bytes, *, header: bytes | None = None) -> bytes:
    return encode_jupyter("iopub", [b"kernel.k.stream", DELIM, b"", header or _header(), b"{}", b"{}", content])


def big_stream(n: int, fill: bytes = b"x") -> tuple[bytes, bytes, int, bytes]:
    """(head, fill, n, tail) of an iopub stream message with ``n`` characters of text."""
    parts = [b"kernel.k.stream", DELIM, b"", _header(), b"{}", b"{}"]
    prefix, suffix = b'{"name": "stdout", "text": "', b'"}'
    head = bytearray(encode_jupyter("iopub", parts))
    struct.pack_into("<H", head, 2, len(parts) + 1)
    head += struct.pack("<I", len(prefix) + n + len(suffix)) + prefix
    return bytes(head), fill, n, suffix


# ---------------------------------------------------------------------------
# One kernel on the host: channel + relay + a signed ZMQ client


class Client:
    def __init__(self, ctx: zmq.asyncio.Context, relay: KernelRelay) -> None:
        key = relay.key
        self.session = Session(key=key)
        url = "tcp://127.0.0.1:{}"
        self.shell = ctx.socket(zmq.DEALER)
        self.shell.linger = 0
        self.shell.connect(url.format(relay.ports["shell"]))
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.linger = 0
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(url.format(relay.ports["iopub"]))
        self.hb = ctx.socket(zmq.REQ)
        self.hb.linger = 0
        self.hb.connect(url.format(relay.ports["hb"]))
        self.seen: list[dict[str, Any]] = []

    async def welcomed(self) -> None:
        await self.next_iopub(lambda m: m["header"]["msg_type"] == "iopub_welcome", 5)

    async def next_iopub(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such iopub message; saw {[m['header']['msg_type'] for m in self.seen]}")
            if not await self.iopub.poll(left * 1000):
                continue
            parts = await self.iopub.recv_multipart()
            _, parts = self.session.feed_identities(parts)
            msg = self.session.deserialize(parts)  # checks the relay's signature
            self.seen.append(msg)
            if pred(msg):
                return msg

    async def round_trip(self, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        self.session.send(self.shell, "kernel_info_request", {})
        if not await self.shell.poll(timeout * 1000):
            raise TimeoutError("no shell reply")
        parts = await self.shell.recv_multipart()
        _, parts = self.session.feed_identities(parts)
        msg = self.session.deserialize(parts)
        assert msg["header"]["msg_type"] == "kernel_info_reply"
        return time.monotonic() - t0

    async def heartbeat(self, timeout: float) -> bool:
        await self.hb.send(b"ping")
        ok = bool(await self.hb.poll(timeout * 1000))
        if ok:
            await self.hb.recv()
        return ok

    def close(self) -> None:
        for s in (self.shell, self.iopub, self.hb):
            s.close(linger=0)


class Kernel:
    """A fake guest behind a real AgentChannel and KernelRelay, with a client."""

    def __init__(self, ctx: zmq.asyncio.Context, tmp: Path, name: str,
                 script: Callable[[FakeGuest], None] | None = None) -> None:
        self.name = name
        self.guest = FakeGuest(str(tmp / f"{name}.sock"), script)
        self.relay = KernelRelay(ctx, name=name, key=uuid.uuid4().hex.encode(), limits=LIMITS)
        self.channel = AgentChannel(UnixSocketTransport(Path(self.guest.path)), uuid.uuid4().hex,
                                    name=f"kernel {name}", on_jupyter=self.relay.from_guest,
                                    on_event=lambda e: None, limits=LIMITS)
        self.client: Client

    async def start(self, ctx: zmq.asyncio.Context) -> None:
        self.guest.start()
        self.relay.start()
        self.relay.alive = lambda: True
        await self.channel.connect(5)
        self.relay.attach(self.channel)
        self.client = Client(ctx, self.relay)
        await self.client.welcomed()
        self.guest.go.set()

    async def close(self) -> None:
        self.guest.stop.set()
        self.client.close()
        await self.channel.close()
        await self.relay.close()
        self.guest.join(5)
        self.guest.srv.close()

    async def told_dead(self) -> None:
        """Its clients were told: a notice on stderr, a dead status, no heartbeat."""
        notice = await self.client.next_iopub(
            lambda m: m["header"]["msg_type"] == "stream" and "kernel was stopped" in m["content"]["text"], 5)
        assert notice["content"]["name"] == "stderr"
        await self.client.next_iopub(
            lambda m: m["header"]["msg_type"] == "status" and m["content"]["execution_state"] == "dead", 5)
        assert self.relay.dead is not None
        assert not await self.client.heartbeat(1.5)


@pytest_asyncio.fixture(loop_scope="function")
async def env() -> AsyncIterator[Callable[..., Any]]:
    """Makes kernels; the first is the neighbour that must keep working."""
    ctx = zmq.asyncio.Context()
    tmp = Path(tempfile.mkdtemp(prefix="vmkg-hostile-"))
    kernels: list[Kernel] = []

    async def make(script: Callable[[FakeGuest], None] | None = None) -> Kernel:
        k = Kernel(ctx, tmp, f"k{len(kernels)}", script)
        kernels.append(k)
        await k.start(ctx)
        return k

    budget_before = BUDGET.used
    try:
        yield make
    finally:
        for k in kernels:
            await k.close()
        ctx.destroy(linger=0)
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    assert BUDGET.used == budget_before, "a closed channel or relay left bytes in the budget"


@contextlib.contextmanager
def bounded(max_bytes: int, max_cpu: float) -> Any:
    """Host memory (tracemalloc peak over the block) and CPU (this thread: the loop).

    tracemalloc sees the whole process, so the fake guest's own allocations count too;
    the guests send from small, reused buffers to keep that share small."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    cpu0 = time.thread_time()
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        result["cpu"] = time.thread_time() - cpu0
        result["peak"] = tracemalloc.get_traced_memory()[1] - base
        if os.environ.get("HOSTILE_DEBUG"):
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]:
                print("MEM", stat)
        tracemalloc.stop()
    assert result["peak"] <= max_bytes, f"host memory peak {result['peak'] / MiB:.1f} MiB"
    assert result["cpu"] <= max_cpu, f"host loop CPU {result['cpu']:.2f} s"


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


def hello_ack(g: FakeGuest) -> bytes:
    reply = {"session": g.endpoint.session, "recv": g.endpoint.recv_seq, "fresh": False,
             "version": PROTOCOL_VERSION, "conn": g.hello["conn"]}
    return Frame(HELLO_ACK, payload=json.dumps(reply).encode()).encode()


# ---------------------------------------------------------------------------
# The abuses


async def test_neighbour_round_trip(env: Callable[..., Any]) -> None:
    good = await env()
    assert await good.client.round_trip() < 2
    await good.client.next_iopub(lambda m: m["header"]["msg_type"] == "kernel_info_out", 2)
    assert await good.client.heartbeat(2)


async def test_hello_ack_storm_cuts_the_guest_off(env: Callable[..., Any]) -> None:
    """Today's bug: every HELLO_ACK re-queued every unacknowledged frame (1,860 guest bytes
    made the host queue 160 MiB). Now the first one after the handshake drops the link."""
    go = threading.Event()

    def storm(g: FakeGuest) -> None:
        go.wait(10)
        g.send_raw(hello_ack(g) * 1000)  # ~150 KB
        g.wait_closed()

    good = await env()
    bad = await env(storm)
    for _ in range(8):  # 8 MiB the guest never acknowledges
        await bad.channel.send_jupyter("shell", [DELIM, b"", b"{}", b"{}", b"{}", b"x" * MiB])
    # before the fix: 1,000 x 8 MiB re-queued. The bound leaves room for the transport
    # reshuffling the 8 MiB it already held (reallocations count in tracemalloc)
    with bounded(max_bytes=16 * MiB, max_cpu=0.5):
        go.set()
        await until(lambda: bad.channel.failure is not None)
        await bad.told_dead()
    assert "HELLO_ACK after the handshake" in str(bad.channel.failure)
    await until(bad.guest.host_closed.is_set)
    assert await good.client.round_trip() < 2


async def test_bad_payload_after_valid_header_drops_the_connection(env: Callable[..., Any]) -> None:
    """Today a bad payload CRC after a valid header made the decoder retry one byte further
    (~1 MiB of CRC work per 36 guest bytes). Now the first one drops the link."""

    def corrupt(g: FakeGuest) -> None:
        payload = b"\0" * MAX_FRAME_PAYLOAD
        frame = bytearray(Frame(DATA, 1, 0, payload).encode())
        frame[-1] ^= 1  # the payload no longer matches its CRC; the header does
        attack = bytes(frame[:36]) * 1800  # 64 KiB of valid headers (the old worst case) ...
        g.send_raw(bytes(frame) + attack + bytes(frame))  # ... behind a full bad frame
        g.wait_closed()

    good = await env()
    with bounded(max_bytes=12 * MiB, max_cpu=0.3):  # the fake guest's own ~5 MiB included
        bad = await env(corrupt)
        await until(lambda: bad.channel.failure is not None)
        await bad.told_dead()
    assert "checksum" in str(bad.channel.failure)
    assert await good.client.round_trip() < 2


@pytest.mark.parametrize("abuse", ["gap", "ack_unsent", "garbage", "huge_length"])
async def test_out_of_state_frames_drop_the_connection(env: Callable[..., Any], abuse: str) -> None:
    def script(g: FakeGuest) -> None:
        ep = g.endpoint
        if abuse == "gap":
            g.send_raw(Frame(DATA, ep.next_seq + 5, 0, b"\x02{}").encode())
        elif abuse == "ack_unsent":
            g.send_raw(Frame(ACK, 0, 10**9).encode())
        elif abuse == "garbage":
            g.send_raw(os.urandom(256 * 1024))
        else:
            head = struct.pack("<4sBBHQQII", MAGIC, DATA, 0, 0, ep.next_seq, 0, 1 << 31, 0)
            g.send_raw(head + struct.pack("<I", zlib.crc32(head)))
        g.wait_closed()

    good = await env()
    with bounded(max_bytes=4 * MiB, max_cpu=0.5):
        bad = await env(script)
        await until(lambda: bad.channel.failure is not None)
        await bad.told_dead()
    assert await good.client.round_trip() < 2


async def test_oversized_message_is_dropped_with_a_notice(env: Callable[..., Any]) -> None:
    """A message over max_message is discarded while it streams in (never held whole); the
    kernel's user sees why; the kernel keeps working."""
    sent = threading.Event()

    def big(g: FakeGuest) -> None:
        g.send_virtual(*big_stream(40 * MiB))
        g.send_message(iopub_message(b'{"name": "stdout", "text": "after"}'))
        sent.set()
        FakeGuest.echo(g)

    good = await env()
    with bounded(max_bytes=2 * LIMITS.max_message + 4 * MiB, max_cpu=2.0):
        bad = await env(big)
        notice = await bad.client.next_iopub(lambda m: m["header"]["msg_type"] == "stream"
                                             and m["content"]["name"] == "stderr", 30)
    assert "Output dropped" in notice["content"]["text"] and "exceeds the limit" in notice["content"]["text"]
    with contextlib.suppress(TimeoutError):
        await bad.client.next_iopub(lambda m: m["content"].get("text") == "after", 5)
    assert any(m["content"].get("text") == "after" for m in bad.client.seen)
    assert bad.relay.dead is None and bad.channel.failure is None
    assert await bad.client.round_trip() < 2 and await bad.client.heartbeat(2)
    assert await good.client.round_trip() < 2


async def test_oversized_header_and_deep_nesting_are_dropped_unparsed(env: Callable[..., Any]) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000

    def nasty(g: FakeGuest) -> None:
        g.send_message(iopub_message(b"{}", header=b'{"msg_type": "stream", "x": "' + b"h" * (128 * 1024) + b'"}'))
        g.send_message(iopub_message(deep))
        g.send_message(iopub_message(b'{"a": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001))
        g.send_message(encode_control({"event": "x"})[:1] + deep)  # a control message, too deep
        # brackets inside strings do not nest: this one passes
        g.send_message(iopub_message(b'{"name": "stdout", "text": "' + b"[" * 100_000 + b'"}'))
        FakeGuest.echo(g)

    good = await env()
    with bounded(max_bytes=8 * MiB, max_cpu=1.5):
        bad = await env(nasty)
        text = await bad.client.next_iopub(lambda m: m["header"]["msg_type"] == "stream"
                                           and m["content"].get("name") == "stdout", 10)
    assert text["content"]["text"] == "[" * 100_000
    notices = [m["content"]["text"] for m in bad.client.seen
               if m["header"]["msg_type"] == "stream" and m["content"]["name"] == "stderr"]
    assert notices and "Output dropped" in notices[0] and "header" in notices[0]
    assert bad.relay.dropped >= 3  # the header, two nestings (notices after the first are rate-limited)
    assert bad.relay.dead is None and bad.channel.failure is None
    assert await bad.client.round_trip() < 2
    assert await good.client.round_trip() < 2


async def test_output_flood_is_backpressured_into_the_guest(env: Callable[..., Any]) -> None:
    """A subscriber that does not read: the host holds at most kernel_buffer of output for
    the kernel, stops reading the guest, and the neighbour is unaffected."""
    flooding = threading.Event()

    def flood(g: FakeGuest) -> None:
        flooding.set()
        for _ in range(400):  # 400 MiB offered
            if g.stop.is_set():
                return
            g.send_virtual(*big_stream(MiB - 200, b"y"))

    good = await env()
    bad = await env(flood)
    # a second subscriber that never reads, with no room on its side either
    stuck = zmq.asyncio.Context.instance().socket(zmq.SUB)
    stuck.rcvhwm = 1
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(f"tcp://127.0.0.1:{bad.relay.ports['iopub']}")
    bad.client.iopub.close(linger=0)  # our own client does not read either
    try:
        with bounded(max_bytes=LIMITS.kernel_buffer + 3 * LIMITS.max_message + 8 * MiB, max_cpu=20):
            flooding.wait(5)
            await asyncio.sleep(3)
            rtts = [await good.client.round_trip() for _ in range(10)]
        assert max(rtts) < 1.0, rtts
        assert bad.relay.inflight_bytes <= LIMITS.kernel_buffer + LIMITS.max_message
        assert bad.guest.written < 4 * LIMITS.kernel_buffer, "the guest was not held back"
        assert bad.relay.dead is None
    finally:
        stuck.close(linger=0)


async def test_guest_that_never_reads_stalls_only_itself(env: Callable[..., Any]) -> None:
    """Input for a guest that never reads (nor acks): the host holds at most its window and
    write buffer, the client's sends wait, and the neighbour is unaffected."""

    def deaf(g: FakeGuest) -> None:
        g.stop.wait(60)

    good = await env()
    bad = await env(deaf)
    with bounded(max_bytes=LIMITS.kernel_buffer + 24 * MiB, max_cpu=10):
        for _ in range(60):  # 60 MiB of signed input
            bad.client.session.send(bad.client.shell, "execute_request", {"code": "x" * MiB})
            await asyncio.sleep(0)
        await asyncio.sleep(3)
        assert await good.client.round_trip() < 2
    assert bad.channel.endpoint.unacked_bytes <= LIMITS.kernel_buffer + 2 * MiB
    assert bad.relay.dead is None


async def test_exception_in_client_pump_marks_the_kernel_dead(env: Callable[..., Any]) -> None:
    """Issue 8: an exception in the relay's client pump used to end that pump silently."""
    good = await env()
    bad = await env()

    def broken_hook(channel: str, parts: list[bytes]) -> None:
        if channel == "shell":
            raise RuntimeError("activity hook broke")

    bad.relay.on_activity = broken_hook
    bad.client.session.send(bad.client.shell, "kernel_info_request", {})
    await bad.told_dead()
    assert "shell pump failed" in (bad.relay.dead or "")
    assert bad.channel.failure is not None  # the owner is told through the channel: it stops the VM
    assert await good.client.round_trip() < 2


async def test_exception_in_read_loop_marks_the_kernel_dead(env: Callable[..., Any]) -> None:
    good = await env()
    bad = await env()

    def broken_hook(channel: str, parts: list[bytes]) -> None:
        if channel == "iopub":
            raise RecursionError("maximum recursion depth exceeded")

    bad.relay.on_activity = broken_hook
    bad.client.session.send(bad.client.shell, "kernel_info_request", {})
    await bad.told_dead()
    assert isinstance(bad.channel.failure, RecursionError)
    assert await good.client.round_trip() < 2


async def test_fragment_flags_cannot_grow_a_message_without_bound(env: Callable[..., Any]) -> None:
    """Endless FLAG_MORE fragments: discarded past max_message, never buffered."""

    def endless(g: FakeGuest) -> None:
        chunk = b"z" * MAX_FRAME_PAYLOAD
        ep = g.endpoint
        for _ in range(64):  # 64 MiB of one never-ending message
            frame = Frame(DATA, ep.next_seq, ep.recv_seq, chunk, FLAG_MORE)
            ep.next_seq += 1
            g.send_raw(frame.encode())
            with contextlib.suppress(BlockingIOError):
                g.pump(0)
        g.stop.wait(60)

    good = await env()
    with bounded(max_bytes=LIMITS.max_message + 8 * MiB, max_cpu=3):
        bad = await env(endless)
        await until(lambda: bad.guest.written >= 64 * MAX_FRAME_PAYLOAD, 20)
        await asyncio.sleep(0.2)
    assert bad.channel.endpoint._partial_size >= 60 * MiB and not bad.channel.endpoint._partial
    assert await good.client.round_trip() < 2


# ---------------------------------------------------------------------------
# Real VMs: what any notebook user can do, no root needed


# ---------------------------------------------------------------------------
# The limits are settings of `vmkg serve` (no VM)


def test_guest_limits_come_from_the_command_line_config_file_or_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from traitlets import TraitError

    from gateway.app import ServeApp

    def serve_limits(*argv: str) -> GuestLimits:
        app = ServeApp()
        app.initialize(list(argv))
        assert GuestLimits in app.classes  # listed in `vmkg serve --help-all`
        limits = GuestLimits()
        limits.update_config(app.config)  # what ServeApp.serve does to the process's instance
        return limits

    for var in ("VMKG_GUEST_MAX_MESSAGE", "VMKG_GUEST_MAX_DEPTH", "VMKG_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    assert serve_limits().max_message == 32 * MiB
    monkeypatch.setenv("VMKG_GUEST_MAX_MESSAGE", str(8 * MiB))
    assert serve_limits().max_message == 8 * MiB
    config = tmp_path / "vmkg_config.py"
    config.write_text("c.GuestLimits.max_message = 2 * 1024 * 1024\nc.GuestLimits.max_depth = 20\n")
    limits = serve_limits(f"--config={config}")
    assert (limits.max_message, limits.max_depth) == (2 * MiB, 20)
    assert serve_limits(f"--config={config}", "--GuestLimits.max_message=12345").max_message == 12345
    monkeypatch.setenv("VMKG_GUEST_MAX_DEPTH", "deep")
    with pytest.raises(TraitError, match="VMKG_GUEST_MAX_DEPTH"):
        GuestLimits().max_depth  # noqa: B018 - reading the default parses the variable


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class VMKernel:
    def __init__(self) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3-microvm")
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 300) -> tuple[dict[str, list[str]], dict[str, Any]]:
        out: dict[str, list[str]] = {"stdout": [], "stderr": []}

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out[msg["content"]["name"]].append(msg["content"]["text"])

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return out, reply["content"]

    def rtt(self) -> float:
        t0 = time.monotonic()
        _, reply = self.run("1+1", timeout=60)
        assert reply["status"] == "ok"
        return time.monotonic() - t0

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


ATTACK = """
k = get_ipython().kernel
parent = k.get_parent("shell") if hasattr(k, "get_parent") else k._parent_header
k.session.send(k.iopub_socket, "stream", {"name": "stdout", "text": "x" * (40 << 20)}, parent=parent)
k.session.send(k.iopub_socket, "display_data", b"[" * 100000 + b"]" * 100000, parent=parent)
k.session.send(k.iopub_socket, "stream", b'{"name": "stdout", "text": "' + b"{" * 50000 + b'"}',
               parent=parent)
print("still here")
"""


@pytest.mark.vm
def test_vm_huge_and_nested_iopub_messages_are_dropped_with_a_notice(template: Any) -> None:
    a, b = VMKernel(), VMKernel()
    try:
        quiet = min(b.rtt() for _ in range(3))
        rss0 = _rss()
        out, reply = a.run(ATTACK)
        assert reply["status"] == "ok", reply
        assert "still here\n" in out["stdout"]
        assert "{" * 50000 in "".join(out["stdout"])  # brackets in text are not nesting
        notices = "".join(out["stderr"])
        assert "[vmkg] Output dropped" in notices and "over the limit" in notices, notices
        relay = a.km.provisioner._relay  # type: ignore[union-attr]
        assert relay is not None and relay.dropped >= 2 and relay.dead is None
        assert _rss() - rss0 < 200 << 20
        # the attacker's kernel still works, and so does its neighbour
        assert a.run("1+1")[1]["status"] == "ok"
        assert b.rtt() < max(5 * quiet, 2.0)
    finally:
        a.close()
        b.close()


@pytest.mark.vm
def test_vm_output_flood_keeps_host_bounded_and_neighbour_answering(template: Any) -> None:
    a, b = VMKernel(), VMKernel()
    try:
        quiet = sorted(b.rtt() for _ in range(5))[2]
        rss0 = _rss()
        got = [0]

        def count(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                got[0] += len(msg["content"]["text"])

        a.kc.execute("import time\nt = time.time()\nwhile time.time() - t < 15: print('y' * 10000)")
        deadline = time.monotonic() + 15
        rtts = []
        while time.monotonic() < deadline:
            while True:  # drain the flood as a client would
                try:
                    count(a.kc.get_iopub_msg(timeout=0.01))
                except Exception:  # noqa: BLE001 - queue.Empty
                    break
            rtts.append(b.rtt())
        loaded = sorted(rtts)[len(rtts) // 2]
        assert got[0] > 100_000, "the flood did not flow"  # TCG on a loaded host: ~25 KB/s and up
        assert _rss() - rss0 < 200 << 20
        assert loaded < max(5 * quiet, 2.0), (quiet, rtts)
        a.km.interrupt_kernel()
    finally:
        a.close()
        b.close()
