"""The host end of the host <-> guest link.

A ``Transport`` opens a byte stream to the guest agent: on QEMU, a connection to the
virtio-serial chardev's Unix socket; on Firecracker-style VMMs, the hybrid vsock Unix
socket (``CONNECT <port>\\n`` answered by ``OK <n>\\n``). ``AgentChannel`` runs the
reliable session of ``guest.protocol`` over it: Jupyter messages both ways, and
request/reply control operations (restore, signal, files, ...).

The stream can be torn down and reopened at any time (every restore does it; so can
:meth:`AgentChannel.reconnect`): unacknowledged messages are retransmitted and
duplicates dropped, so no Jupyter message is lost or delivered twice.

The guest is not trusted (kernel code may be root in it and write anything to the
port), and every channel of a process shares one event loop, so everything a guest
can make this end hold or do is bounded (``GuestLimits``):

- bytes held per kernel: what the guest has not acknowledged (the send window,
  ``kernel_buffer``), the socket's write buffer (``HIGH_WATER``: past it the read loop
  stops reading the guest until the guest reads, so a guest that floods without
  reading is simply stalled), one frame being decoded, one message of at most
  ``max_message`` being reassembled (bigger ones are discarded while they stream in),
  and what the relay has handed to ZMQ (it throttles the read loop, see
  ``KernelRelay``). All kernels together: ``total_buffer`` (``BUDGET``).
- work per guest byte: constant (no retry after a payload checksum failure, no
  re-queuing on a HELLO_ACK, JSON only after size and depth checks).
- a protocol violation drops the connection and *fails* the channel: ``failure`` is
  set and ``on_failure`` callbacks run (the kernel is then marked dead, the relay stops
  answering heartbeats and tells its clients). So does any other exception in the read
  loop: a read loop never dies silently. Violations that harm nobody but the guest's
  own output (an oversized message) are dropped and reported through ``on_violation``.
- every violation counts in the ``vmkg_guest_violations_total{kind}`` metric and is
  logged at most once per ``LOG_INTERVAL`` per kernel and kind, guest text truncated.

Small stream messages are coalesced (``coalesce_streams``): within what one read from
the guest delivered, a run of *adjacent* iopub ``stream`` messages with the same topic,
parent header, metadata and stream name, each frame under ``COALESCE_BELOW`` bytes,
becomes one message (the first one's header, the texts concatenated in order), up to
``COALESCE_MAX`` bytes of text. A kernel that flushes after every line (``print(...,
flush=True)``) then costs the gateway and its clients one message per read instead of
one per line; nothing waits for more, so no latency is added, and bigger messages
(ipykernel's own 0.2 s batches) pass untouched, without being parsed.

Acknowledgements of what the guest sent are delayed (``ACK_DELAY``, or until
``ACK_BYTES`` arrived unacknowledged) unless host data carries them sooner: a standalone
ACK wakes the guest agent, and under emulation every wake-up is CPU taken from the kernel
on the VM's one vCPU. A round trip's four or five guest writes (status, input, result,
reply, status) then cost the guest one ACK, or none when the next request carries it.
Nothing waits on these acks but the guest's send window (32 MiB) and its copies kept for
retransmission.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from traitlets import Integer
from traitlets.config import SingletonConfigurable

from guest.protocol import (
    ControlMessage,
    Endpoint,
    JupyterMessage,
    ProtocolError,
    decode_message,
    encode_control,
    encode_jupyter,
    json_depth_exceeds,
)

from .envvars import env_trait
from .exceptions import AgentError, ChannelError

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
#: the write buffer towards one guest: past it, stop reading that guest until it reads
HIGH_WATER = 8 << 20
#: a kernel may always hold this much, even when all kernels together are at their total
FAIR_SHARE = 1 << 20
#: seconds between two log lines of one kind about one kernel
LOG_INTERVAL = 10.0
#: how much guest-supplied text a log line or notice quotes
QUOTE = 200

#: an acknowledgement of what the guest sent waits this long for host data to ride on
ACK_DELAY = 0.05
#: ... unless this many bytes arrived unacknowledged (the guest's window is 32 MiB)
ACK_BYTES = 1 << 20
#: stream messages all of whose frames are smaller than this may be coalesced
COALESCE_BELOW = 4096
#: the most text one coalesced stream message carries
COALESCE_MAX = 64 << 10
DELIM = b"<IDS|MSG>"


def _stream_text(msg: JupyterMessage) -> tuple[tuple[Any, ...], str] | None:
    """(what must match for two messages to merge, the text) of a small iopub stream
    message; None for anything else. JSON is parsed only after size and depth checks."""
    if msg.channel != "iopub":
        return None
    parts = msg.parts
    try:
        i = parts.index(DELIM)
    except ValueError:
        return None
    if len(parts) != i + 6 or any(len(p) >= COALESCE_BELOW for p in parts):
        return None
    header, parent, metadata, content = parts[i + 2:i + 6]
    if b'"stream"' not in header or json_depth_exceeds(header, 3) or json_depth_exceeds(content, 2):
        return None
    try:
        h, c = json.loads(header), json.loads(content)
    except (ValueError, RecursionError):
        return None
    if (not isinstance(h, dict) or h.get("msg_type") != "stream" or not isinstance(c, dict)
            or set(c) != {"name", "text"} or not isinstance(c["name"], str)
            or not isinstance(c["text"], str)):
        return None
    return (tuple(parts[:i]), parent, metadata, c["name"]), c["text"]


def coalesce_streams(messages: list[JupyterMessage]) -> list[JupyterMessage]:
    """``messages`` with each run of adjacent, mergeable small stream messages (see the
    module docstring) replaced by one; everything else unchanged and in order."""
    out: list[JupyterMessage] = []
    run: list[Any] = []  # [key, first message, texts, size]

    def close_run() -> None:
        if not run:
            return
        key, first, texts, _ = run
        if len(texts) == 1:
            out.append(first)
        else:
            parts = list(first.parts)
            parts[-1] = json.dumps({"name": key[3], "text": "".join(texts)}).encode()
            out.append(JupyterMessage(first.channel, parts))
        run.clear()

    for msg in messages:
        st = _stream_text(msg)
        if st is not None and run and st[0] == run[0] and run[3] + len(st[1]) <= COALESCE_MAX:
            run[2].append(st[1])
            run[3] += len(st[1])
            continue
        close_run()
        if st is None:
            out.append(msg)
        else:
            run.extend([st[0], msg, [st[1]], len(st[1])])
    close_run()
    return out


GUEST_VIOLATIONS = Counter(
    "vmkg_guest_violations", "Messages or connections from guests refused for breaking a bound "
    "or the protocol", ["kind"])


class GuestLimits(SingletonConfigurable):
    """What the host accepts from a guest and holds for it. One instance per process
    (``GuestLimits.instance()``); ``vmkg serve`` configures it from its command line and
    config file (``--GuestLimits.max_message=...``, ``c.GuestLimits.max_message = ...``),
    else each limit's ``$VMKG_*`` variable."""

    max_message = env_trait(Integer, "VMKG_GUEST_MAX_MESSAGE", 32 << 20, zero_is_default=True,
                            help="Largest Jupyter message (all frames and buffers) a kernel may send, "
                                 "in bytes; bigger ones are dropped with a notice in the kernel's "
                                 "output.")
    max_header = env_trait(Integer, "VMKG_GUEST_MAX_HEADER", 1 << 20, zero_is_default=True,
                           help="Largest header, parent header or metadata frame of a kernel's "
                                "message, in bytes, checked before anything parses it.")
    max_depth = env_trait(Integer, "VMKG_GUEST_MAX_DEPTH", 64, zero_is_default=True,
                          help="Deepest JSON nesting accepted in a kernel's message; deeper ones are "
                               "dropped unparsed.")
    kernel_buffer = env_trait(Integer, "VMKG_KERNEL_BUFFER", 64 << 20, zero_is_default=True,
                              help="Bytes the host holds for one kernel in each direction "
                                   "(unacknowledged input for the guest; output not yet written to "
                                   "clients); past it the sender waits.")
    total_buffer = env_trait(Integer, "VMKG_TOTAL_BUFFER", 1 << 30, zero_is_default=True,
                             help="Bytes held for all kernels of this process together; past it a "
                                  "kernel holding more than 1 MiB waits.")


class ByteBudget:
    """Bytes held for all kernels of the process (both directions), against a limit.

    Holders add and subtract their own bytes; :meth:`allows` lets a holder grow while the
    total is under the limit, or while it holds less than its fair share, so one kernel
    filling the total does not stall the others.
    """

    def __init__(self) -> None:
        self.used = 0

    def allows(self, own: int, limit: int | None = None) -> bool:
        limit = GuestLimits.instance().total_buffer if limit is None else limit
        return own < FAIR_SHARE or self.used < limit


BUDGET = ByteBudget()


def clip(text: object, n: int = QUOTE) -> str:
    """Guest-supplied text, cut to ``n`` characters and with control characters escaped."""
    s = str(text)
    s = s if len(s) <= n else s[:n] + f"... ({len(s) - n} more characters)"
    return s.encode("unicode_escape", "backslashreplace").decode("ascii", "replace")


class RateLimitedLog:
    """One log line per kind per ``interval`` for one subject; the rest are counted and
    the count is told in the next line."""

    def __init__(self, subject: str, interval: float = LOG_INTERVAL) -> None:
        self.subject = subject
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.log(level, "%s: %s%s", self.subject, msg, f" ({more} more like it since the last report)" if more else "")


class Transport(ABC):
    """How to open a stream to the agent. Chosen per VM backend."""

    @abstractmethod
    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class UnixSocketTransport(Transport):
    """QEMU virtio-serial: the chardev listens on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.path), limit=READ_SIZE)


class HybridVsockTransport(Transport):
    """Firecracker's hybrid vsock: a Unix socket, then ``CONNECT <port>`` to the guest port."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.port = port

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=READ_SIZE)
        writer.write(f"CONNECT {self.port}\n".encode())
        await writer.drain()
        line = await reader.readline()
        if not line.startswith(b"OK "):
            writer.close()
            raise ConnectionError(f"vsock CONNECT {self.port} refused: {line!r}")
        return reader, writer


JupyterHandler = Callable[[str, list[bytes]], None]
EventHandler = Callable[[dict[str, Any]], None]
FailureHandler = Callable[[BaseException], None]
ViolationHandler = Callable[[str, str], None]


class AgentChannel:
    """One reliable session with one guest agent.

    Callers: ``kernelmanager.vmkernel`` creates it after starting/restoring a VM; the
    relay sends Jupyter messages with :meth:`send_jupyter` and receives them through
    ``on_jupyter``. Unsolicited agent events (``kernel_exit``) go to ``on_event``.

    Hooks the relay sets when it attaches: ``throttle`` (awaited by the read loop after
    each batch: the relay's output backpressure), ``on_violation(kind, detail)`` (a
    message was dropped) and callbacks in ``on_failure`` (the channel failed for good).
    """

    def __init__(self, transport: Transport, session: str, *, name: str,
                 on_jupyter: JupyterHandler, on_event: EventHandler,
                 limits: GuestLimits | None = None) -> None:
        self.transport = transport
        self.name = name
        self.limits = limits or GuestLimits.instance()
        self.endpoint = Endpoint(is_host=True, session=session, window=self.limits.kernel_buffer,
                                 max_message=self.limits.max_message)
        self.on_jupyter = on_jupyter
        self.on_event = on_event
        self.on_failure: list[FailureHandler] = []
        self.on_violation: ViolationHandler | None = None
        self.throttle: Callable[[], Awaitable[None]] | None = None
        self.log = RateLimitedLog(name)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._established = asyncio.Event()
        self._window = asyncio.Event()
        self._window.set()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closed = False
        self._accounted = 0  # our share of BUDGET.used
        self.failure: BaseException | None = None
        self.lost = asyncio.Event()  # set when the stream broke and was not reopened by us
        self._ack_timer: asyncio.TimerHandle | None = None
        self._unacked_in = 0  # bytes read from the guest since we last wrote to it

    # -- connection -----------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Open the stream and complete the handshake (the guest must be running)."""
        try:
            reader, writer = await asyncio.wait_for(self.transport.open(), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ChannelError(f"{self.name}: cannot reach the guest agent: {exc}") from exc
        writer.transport.set_write_buffer_limits(high=HIGH_WATER)
        self._writer = writer
        self._established.clear()
        self.lost.clear()
        self.endpoint.connection_made()
        self._reader_task = asyncio.ensure_future(self._read_loop(reader, writer))
        self._flush()
        established = asyncio.ensure_future(self._established.wait())
        try:
            await asyncio.wait({established, self._reader_task}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            established.cancel()
        if not self._established.is_set():
            ended = self._reader_task is not None and self._reader_task.done()
            await self._drop_stream()
            if self.failure:
                raise ChannelError(f"{self.name}: {clip(self.failure)}") from self.failure
            if ended:
                raise ChannelError(f"{self.name}: the guest end closed the connection during the handshake")
            raise ChannelError(f"{self.name}: guest agent did not answer the handshake in {timeout:.0f} s")

    async def reconnect(self, timeout: float = 10.0) -> None:
        """Tear the stream down and open it again, as a restore does. Nothing is lost."""
        await self._drop_stream()
        await self.connect(timeout)

    async def _drop_stream(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        task, self._reader_task = self._reader_task, None
        writer, self._writer = self._writer, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if writer is not None:
            writer.close()
        self.endpoint.connection_lost()

    async def close(self) -> None:
        self._closed = True
        await self._drop_stream()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelError(f"{self.name}: channel closed"))
        self._pending.clear()
        self._window.set()  # senders waiting for the window wake up and see the channel closed
        self._release_budget()

    # -- I/O --------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                was_established = self.endpoint.established
                try:
                    messages = self.endpoint.receive(data)
                finally:
                    self._account()
                if self.endpoint.established and not self._established.is_set():
                    self._established.set()
                self._dispatch_all(messages)
                if self.endpoint.oversized:
                    sizes, self.endpoint.oversized = self.endpoint.oversized, []
                    for size in sizes:
                        self.violation("oversized", f"a message of {size} bytes exceeds the limit of "
                                                    f"{self.limits.max_message} bytes")
                if was_established and self.endpoint.established:
                    # established before and after: receive() queued nothing but an ACK
                    self._ack_soon(len(data))
                else:
                    self._flush()  # the handshake's answer, retransmissions
                if self.endpoint.can_send:
                    self._window.set()
                if writer.transport.get_write_buffer_size() > HIGH_WATER:
                    await writer.drain()  # the guest does not read: stop reading it too
                if self.throttle is not None:
                    await self.throttle()
        except ProtocolError as exc:
            GUEST_VIOLATIONS.labels("protocol").inc()
            self.fail(exc, f"protocol error, connection dropped: {clip(exc)}")
        except (ConnectionError, OSError) as exc:
            log.debug("%s: stream error: %s", self.name, exc)
        except Exception as exc:  # noqa: BLE001 - a read loop never dies silently
            GUEST_VIOLATIONS.labels("read_loop_error").inc()
            log.exception("%s: the read loop failed", self.name)
            self.fail(exc, f"read loop failed: {type(exc).__name__}: {clip(exc)}")
        if self._writer is writer:
            self._writer = None
            writer.close()
            self.endpoint.connection_lost()
            self.lost.set()

    def fail(self, exc: BaseException, why: str) -> None:
        """The channel is unusable for good: tell whoever registered (relay, VM owner).
        Called by the read loop, and by the relay when it found the kernel dead."""
        if self.failure is not None or self._closed:
            return
        self.failure = exc.with_traceback(None)  # its frames may hold a guest's megabytes
        log.error("%s: %s", self.name, why)
        self._window.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelError(f"{self.name}: {why}"))
        self._pending.clear()
        for callback in list(self.on_failure):
            try:
                callback(exc)
            except Exception:  # noqa: BLE001 - one failing observer must not hide the others
                log.exception("%s: failure callback raised", self.name)

    def violation(self, kind: str, detail: str) -> None:
        """A message from the guest was dropped: count it, log it (rate-limited), and let
        the relay tell the kernel's user."""
        GUEST_VIOLATIONS.labels(kind).inc()
        self.log(logging.WARNING, kind, f"dropped a message from the guest: {detail}")
        if self.on_violation is not None:
            self.on_violation(kind, detail)

    def _dispatch_all(self, raws: list[bytes]) -> None:
        """Decode and hand on, in order, what one read delivered; runs of Jupyter messages
        go through ``coalesce_streams`` first."""
        run: list[JupyterMessage] = []
        for raw in raws:
            try:
                msg = decode_message(raw, max_control=self.limits.max_message)
            except ProtocolError as exc:
                self.violation("malformed", clip(exc))
                continue
            if isinstance(msg, JupyterMessage):
                run.append(msg)
                continue
            for jm in coalesce_streams(run) if len(run) > 1 else run:
                self.on_jupyter(jm.channel, jm.parts)
            run = []
            self._control(msg)
        for jm in coalesce_streams(run) if len(run) > 1 else run:
            self.on_jupyter(jm.channel, jm.parts)

    def _control(self, msg: ControlMessage) -> None:
        body = msg.body
        rid = body.get("id")
        if rid is not None:
            fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                if body.get("ok"):
                    fut.set_result(body.get("result"))
                else:
                    kind = body.get("kind")
                    fut.set_exception(AgentError(clip(body.get("error"), 2000),
                                                 kind[:100] if isinstance(kind, str) else None))
            return
        if body.get("event") == "dropped":
            # the agent refused a kernel message over our max_message before sending it
            self.violation("oversized", f"the kernel sent a {clip(body.get('channel'), 20)} message of "
                                        f"{clip(body.get('size'), 20)} bytes, over the limit of "
                                        f"{self.limits.max_message} bytes")
            return
        if "event" in body:
            self.on_event(body)

    def _ack_soon(self, n: int) -> None:
        """Acknowledge ``n`` more bytes from the guest: at once past ACK_BYTES, else within
        ACK_DELAY (or sooner, with the next host data)."""
        self._unacked_in += n
        if self._unacked_in >= ACK_BYTES:
            self._flush()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        self._flush()

    def _flush(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._unacked_in = 0
        if self._writer is None:
            return
        data = self.endpoint.outgoing()
        if data:
            self._writer.write(data)

    def _account(self) -> None:
        """Keep BUDGET.used in step with what this channel holds unacknowledged."""
        now = self.endpoint.unacked_bytes
        BUDGET.used += now - self._accounted
        self._accounted = now

    def _release_budget(self) -> None:
        BUDGET.used -= self._accounted
        self._accounted = 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and self.endpoint.established

    def _check_usable(self) -> None:
        if self._closed:
            raise ChannelError(f"{self.name}: channel closed")
        if self.failure is not None:
            raise ChannelError(f"{self.name}: channel failed: {clip(self.failure)}")

    async def _wait_window(self) -> None:
        """Wait while the guest has not acknowledged kernel_buffer bytes, while all kernels
        together hold total_buffer (and this one more than its fair share), and while the
        write buffer is past its high-water mark."""
        while True:
            self._check_usable()
            if not self.endpoint.can_send:
                self._window.clear()
                await self._window.wait()
                continue
            if not BUDGET.allows(self.endpoint.unacked_bytes):
                await asyncio.sleep(0.01)  # other kernels' acks free the total: poll
                continue
            break
        if self._writer is not None and self._writer.transport.get_write_buffer_size() > HIGH_WATER:
            try:
                await self._writer.drain()
            except ConnectionError:
                pass

    # -- API ----------------------------------------------------------------------------

    async def send_jupyter(self, channel: str, parts: list[bytes]) -> None:
        """Queue a Jupyter message for the kernel; waits while the guest is behind."""
        await self._wait_window()
        self.endpoint.send(encode_jupyter(channel, parts))
        self._account()
        self._flush()

    async def request(self, op: str, timeout: float | None = 30.0, **args: Any) -> Any:
        """Ask the agent to do ``op``; returns its result or raises AgentError/ChannelError."""
        self._check_usable()
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._wait_window()
            self.endpoint.send(encode_control({"op": op, "id": rid, **args}))
            self._account()
            self._flush()
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as exc:
            raise ChannelError(f"{self.name}: agent did not answer {op!r} within {timeout} s") from exc
        finally:
            self._pending.pop(rid, None)


__all__ = ["AgentChannel", "Transport", "UnixSocketTransport", "HybridVsockTransport", "ControlMessage",
           "GuestLimits", "BUDGET"]
