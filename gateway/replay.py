"""Output while no client is connected: kept, replayed, resumed - and a kernel left alone.

A kernel's messages do not stop when its client's websocket does. Everything the gateway
does about that is here, in two mixins over jupyter_server's classes:

:class:`ReplayBufferMixin`, a base of ``gateway.kernels.VMMappingKernelManager``:

- **Bounded buffering.** When a kernel's last websocket closes, jupyter_server calls
  ``start_buffering``: from then on the kernel's messages for that session are kept, at
  most ``max_buffered_messages`` / ``max_buffered_bytes`` (oldest dropped first).
- **Replay, with the drop notice.** The next websocket of the *same* session gets them
  (``get_buffer``, called by jupyter_server's ``connect``), preceded by an iopub stderr
  message saying how many were dropped, if any; a websocket of another session discards
  them (``stop_buffering``). The buffers are ours (``self._replay``), not jupyter_server's.

:class:`ReconnectMixin`, a base of ``gateway.websocket.VMKGWebsocketConnection``:

- **Nothing lost to a close.** Messages that arrive while a websocket is closing are kept
  (``_undelivered``) and put in front of the replay buffer when it has closed, instead of
  being written into a dead socket.
- **Resume without a gap.** Messages written to a websocket just before its connection
  broke are gone: they sat in socket buffers, or the gateway wrote them before it noticed
  the break. A client that opens its websocket with ``?vmkg_resume=`` asks the gateway to
  keep the last messages it sent to that session (``resume_window``); when it reconnects
  with ``?session_id=<same>&vmkg_resume=<msg_id of the last message it got>``, what was
  sent after that message is written again first, then what was buffered while it was
  away. An unknown or empty id resends the whole window, so a resuming client drops
  messages whose ``msg_id`` it has already seen (the vmkg SDK does). Clients that do not
  ask see no change. A reconnect that finds the old websocket of its session still open
  (the gateway had not noticed the break yet) waits, briefly, until that one is closed,
  so the kernel's replies are not split between the two.
- **One websocket per session.** A websocket whose session a newer one took over while it
  was still connecting (waiting for the kernel's kernel_info reply) is refused with 409
  instead of opening beside it: both would carry the session id as their ZMQ identity
  and the kernel's replies could go to the abandoned one (``_superseded``).
- **Replayed to a ghost.** The abandoned websocket of such a pair may have opened before
  the live one arrived, and taken what was kept for the kernel (a reloaded page's output).
  A connection whose client has not sent anything yet keeps what it was written for
  ``HANDOVER_SECONDS`` (at most ``max_buffered_bytes``); a newer websocket of the same
  session that replaces it gets that again first (``handover``). A client that has spoken
  is alive and keeps nothing: a real reconnect of one gets what was kept for it, as before.
- **Not coming back: interrupt on disconnect.** A client that dies mid-cell would leave
  its kernel busy forever (idle culling spares busy kernels). With
  ``interrupt_on_disconnect`` (default on), when the last websocket of a busy kernel
  closes and none reconnects within ``disconnect_grace`` seconds, the kernel is
  interrupted (again every grace period while it stays busy and alone, for cells that
  swallow one KeyboardInterrupt). Its state is kept; the interrupted cell's error waits
  in the replay buffer for whoever connects next.

Everything here runs on the gateway's event loop. Message framing is ``gateway.wire``;
jupyter_server internals (open sessions, connection counts) come from ``gateway.internals``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from functools import partial
from typing import Any, ClassVar

from jupyter_core.utils import ensure_async
from prometheus_client import Counter
from tornado import web
from traitlets import Bool, Float, Integer
from traitlets.config import LoggingConfigurable

from . import wire
from .envvars import env_trait
from .internals import closed_future, connection_count, open_session_keys, session_connection

RESUME_ARG = "vmkg_resume"
RINGS_PER_KERNEL = 4
#: a resumable session's kept messages are dropped after this long without a connection
RING_TTL = 600.0
STALE_CLOSE_WAIT = 10.0
#: how long a connection whose client never spoke keeps what it was written, for a newer
#: websocket of its session to get again (see "Replayed to a ghost")
HANDOVER_SECONDS = 30.0

DISCONNECT_INTERRUPTS = Counter("vmkg_disconnect_interrupts_total",
                                "Busy kernels interrupted because no client stayed connected")


class _Ring:
    """The last messages sent to one session, in order, bounded by count and bytes."""

    def __init__(self, kernel_id: str, max_messages: int, max_bytes: int) -> None:
        self.kernel_id = kernel_id
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.items: deque[tuple[str, str, list[Any]]] = deque()  # (msg_id, channel, msg_list)
        self.bytes = 0
        self.used = time.monotonic()

    def add(self, channel: str, msg_list: list[Any]) -> None:
        msg_id = wire.msg_id(msg_list)
        if msg_id is None:
            return
        self.used = time.monotonic()
        self.items.append((msg_id, channel, msg_list))
        self.bytes += sum(len(p) for p in msg_list)
        while self.items and (len(self.items) > self.max_messages or self.bytes > self.max_bytes):
            _, _, old = self.items.popleft()
            self.bytes -= sum(len(p) for p in old)

    def after(self, msg_id: str) -> list[tuple[str, list[Any]]]:
        """What was sent after ``msg_id`` (its last occurrence); everything if unknown."""
        items = list(self.items)
        start = 0
        if msg_id:
            for i in range(len(items) - 1, -1, -1):
                if items[i][0] == msg_id:
                    start = i + 1
                    break
        return [(channel, parts) for _, channel, parts in items[start:]]


class ReconnectMixin(LoggingConfigurable):
    """Undelivered messages, resume and interrupt-on-disconnect for a
    ``ZMQChannelsWebsocketConnection`` (put it first among the bases)."""

    interrupt_on_disconnect = env_trait(
        Bool, "VMKG_INTERRUPT_ON_DISCONNECT", True,
        help="Interrupt a busy kernel when its last websocket has been gone for disconnect_grace "
             "seconds, so a client that died mid-cell does not leave the kernel busy forever (its "
             "state is kept).")

    # 10 minutes: long enough that a JupyterLab user who closes the laptop during a long
    # cell is not interrupted by a short walk, short enough that a crashed agent's runaway
    # cell does not hold a VM busy for good. Agent platforms may want 30 s.
    disconnect_grace = env_trait(Float, "VMKG_DISCONNECT_GRACE", 600.0,
                                 help="Seconds a busy kernel may stay without any websocket before "
                                      "it is interrupted (a client reconnecting within them keeps "
                                      "its cell running).")

    resume_window = Integer(1000, config=True,
                            help="Messages kept after sending, per session of a client that asked "
                                 "(?vmkg_resume=), to resend what a broken connection lost.")
    resume_window_bytes = Integer(8 * 1024 * 1024, config=True,
                                  help="Bytes kept per resumable session (see resume_window); "
                                       "more than write_high_water plus what socket buffers hold.")

    _rings: ClassVar[dict[str, _Ring]] = {}  # session key -> ring
    _interrupt_timers: ClassVar[dict[str, asyncio.TimerHandle]] = {}  # kernel id -> timer

    # the attributes of ZMQChannelsWebsocketConnection used here
    kernel_id: str
    session: Any
    session_key: str
    websocket_handler: Any
    multi_kernel_manager: Any
    channels: dict[str, Any]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._undelivered: list[tuple[str | None, list[Any]]] = []
        #: bytes replayed to this connection when it connected (a resume window, a kept
        #: buffer): they were held already, so they do not count as the client falling behind
        self.replay_allowance = 0
        #: written while the client had not spoken yet (see "Replayed to a ghost")
        self._unheard: list[tuple[str, list[Any]]] | None = []
        self._unheard_bytes = 0
        self._unheard_until = time.monotonic() + HANDOVER_SECONDS
        self._inherited: list[tuple[str, list[Any]]] = []

    # -- resume ------------------------------------------------------------------------

    def _resume_arg(self) -> str | None:
        try:
            value: str | None = self.websocket_handler.get_argument(RESUME_ARG, None)
            return value
        except Exception:  # noqa: BLE001 - no request (tests, shutdown)
            return None

    async def prepare(self) -> None:
        previous = session_connection(self.kernel_id, self.session.session)
        if previous is not None and previous is not self and hasattr(previous, "handover"):
            self._inherited = previous.handover()
        stale = previous if self._resume_arg() is not None else None
        await super().prepare()  # type: ignore[misc]  # closes a stale websocket of the session
        newer = session_connection(self.kernel_id, self.session.session)
        if newer is not None and newer is not self:
            self._superseded()
        if stale is not None and stale is not self:
            try:
                await asyncio.wait_for(asyncio.shield(closed_future(stale)), STALE_CLOSE_WAIT)
            except asyncio.TimeoutError:
                self.log.warning("kernel %s: the previous websocket of session %s is still closing",
                                 self.kernel_id, self.session.session)

    # -- a websocket whose client never spoke (see "Replayed to a ghost") ----------------

    def _forget_unheard(self) -> None:
        self._unheard = None

    def heard_from_client(self) -> None:
        """The client sent a message: it is alive; what it was written is its own."""
        self._unheard = None

    def _note_unheard(self, channel: str | None, parts: list[Any]) -> None:
        if self._unheard is None or not channel:
            return
        size = sum(len(p) for p in parts)
        if (time.monotonic() > self._unheard_until
                or self._unheard_bytes + size > self.multi_kernel_manager.max_buffered_bytes):
            self._unheard = None  # past the window or the bound: a handover would be partial
            return
        self._unheard.append((channel, parts))
        self._unheard_bytes += size

    def handover(self) -> list[tuple[str, list[Any]]]:
        """What this connection was written, if its client never sent anything within
        ``HANDOVER_SECONDS``: for the newer websocket of its session that replaces it."""
        unheard, self._unheard = self._unheard, None
        if not unheard or time.monotonic() > self._unheard_until:
            return []
        self.log.info("kernel %s: session %s: a newer websocket takes over %d messages written "
                      "to one whose client never spoke", self.kernel_id, self.session.session,
                      len(unheard))
        return unheard

    def _superseded(self) -> None:
        """Refuse this websocket: a newer one of the same session registered while this one
        was still preparing (waiting for the kernel's kernel_info reply, or for a kernel
        that is restarting).

        jupyter_server replaces a stale websocket of a session by closing its handler, but
        a handler that has not been upgraded yet has nothing to close: both would open, both
        with the session id as their ZMQ identity, and the relay's ROUTER gives that
        identity to whichever connected last - the shell replies of the live client
        (kernel_info_reply first) could go to the abandoned one. That is what jupyter_server's
        gateway client leaves behind on every JupyterLab notebook open: it cancels a pending
        websocket_connect when the browser reconnects at once with the same session id, and
        tornado completes the cancelled connection all the same, never read. The page then
        waits for a kernel_info reply that never comes and its kernel stays "Unknown".
        """
        channel = getattr(self, "kernel_info_channel", None)
        if channel is not None and not channel.closed():
            channel.close()
        self.log.info("kernel %s: refusing a websocket of session %s: a newer one of the "
                      "same session replaced it while it was connecting", self.kernel_id,
                      self.session.session)
        raise web.HTTPError(409, "a newer websocket of session %s replaced this one while it was "
                                 "connecting", self.session.session)

    def _ring(self, create: bool) -> _Ring | None:
        ring = self._rings.get(self.session_key)
        if ring is None and create:
            mkm = self.multi_kernel_manager
            stale = time.monotonic() - RING_TTL
            live = open_session_keys()
            for key, other in list(self._rings.items()):
                if other.kernel_id not in mkm or (other.used < stale and key not in live):
                    del self._rings[key]
            mine = [k for k, r in self._rings.items() if r.kernel_id == self.kernel_id]
            for key in mine[:max(0, len(mine) - RINGS_PER_KERNEL + 1)]:
                del self._rings[key]
            ring = self._rings[self.session_key] = _Ring(self.kernel_id, self.resume_window,
                                                         self.resume_window_bytes)
            hooks = getattr(mkm, "removal_hooks", None)
            if hooks is not None and self._forget_kernel not in hooks:
                hooks.append(self._forget_kernel)
        return ring

    @classmethod
    def _forget_kernel(cls, kernel_id: str) -> None:
        """Drop what was kept for a kernel that left the gateway (a removal hook)."""
        for key in [k for k, r in cls._rings.items() if r.kernel_id == kernel_id]:
            del cls._rings[key]
        timer = cls._interrupt_timers.pop(kernel_id, None)
        if timer is not None:
            timer.cancel()

    def connect(self) -> Any:
        asyncio.get_running_loop().call_later(HANDOVER_SECONDS, self._forget_unheard)
        last = self._resume_arg()
        self._resumable = last is not None
        mkm = self.multi_kernel_manager
        self.replay_allowance = mkm.buffered_bytes(self.kernel_id)
        inherited, self._inherited = self._inherited, []
        if last is None and not inherited:
            return super().connect()  # type: ignore[misc]
        ring = self._ring(create=True) if last is not None else None
        lost = ring.after(last) if ring is not None and last is not None else []
        if inherited:  # older than what the ring kept after the client's last message
            resent = {wire.msg_id(parts) for _, parts in lost}
            lost = [(c, p) for c, p in inherited if wire.msg_id(p) not in resent] + lost
        self.replay_allowance += sum(len(p) for _, parts in lost for p in parts)
        into_buffer = bool(lost) and mkm.buffered_session(self.kernel_id) == self.session_key
        if into_buffer:
            mkm.prepend_buffered(self.kernel_id, self.session_key, lost)
        if lost:
            self.log.info("kernel %s: %s session %s: resending %d messages", self.kernel_id,
                          "resuming" if last is not None else "taking over", self.session.session,
                          len(lost))
        connected = super().connect()  # type: ignore[misc]
        if lost and not into_buffer and connected is not None:
            connected.add_done_callback(lambda _: self._resend(lost))
        return connected

    def _resend(self, messages: list[tuple[str, list[Any]]]) -> None:
        for channel, parts in messages:
            if channel in getattr(self, "channels", {}):
                self.handle_outgoing_message(self.channels[channel], parts)

    # -- kernel -> client: undelivered, kept for resume ----------------------------------

    def _ws_closed(self) -> bool:
        conn = self.websocket_handler.ws_connection
        return conn is None or bool(conn.is_closing())

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
        if self._ws_closed():
            if len(self._undelivered) < self.multi_kernel_manager.max_buffered_messages:
                self._undelivered.append((channel, outgoing_msg))
            return
        self._note_unheard(channel, outgoing_msg)
        if getattr(self, "_resumable", False):
            ring = self._ring(create=False)
            if ring is not None and channel:
                ring.add(channel, outgoing_msg)
        super().handle_outgoing_message(stream, outgoing_msg)  # type: ignore[misc]

    # -- closing: undelivered messages to the buffer, interrupt on disconnect ----------

    def disconnect(self) -> None:
        self._unheard = None
        undelivered, self._undelivered = self._undelivered, []
        super().disconnect()  # type: ignore[misc]
        if undelivered:
            self.multi_kernel_manager.prepend_buffered(self.kernel_id, self.session_key, undelivered)
        if self.interrupt_on_disconnect:
            self._arm_interrupt(self.multi_kernel_manager, self.kernel_id, self.disconnect_grace, self.log)

    @classmethod
    def _arm_interrupt(cls, mkm: Any, kernel_id: str, grace: float, log: Any) -> None:
        if kernel_id not in mkm or connection_count(mkm, kernel_id) > 0:
            return
        old = cls._interrupt_timers.pop(kernel_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_event_loop()
        cls._interrupt_timers[kernel_id] = loop.call_later(
            max(0.0, grace), cls._interrupt_if_abandoned, mkm, kernel_id, grace, log)

    @classmethod
    def _interrupt_if_abandoned(cls, mkm: Any, kernel_id: str, grace: float, log: Any) -> None:
        cls._interrupt_timers.pop(kernel_id, None)
        if kernel_id not in mkm or connection_count(mkm, kernel_id) > 0:
            return
        if getattr(mkm.get_kernel(kernel_id), "execution_state", None) != "busy":
            return
        log.warning("kernel %s: busy with no client connected for %.0f s; interrupting it "
                    "(interrupt_on_disconnect)", kernel_id, grace)
        DISCONNECT_INTERRUPTS.inc()

        async def interrupt() -> None:
            try:
                await ensure_async(mkm.interrupt_kernel(kernel_id))
            except Exception as exc:  # noqa: BLE001 - the kernel may be going away
                log.warning("kernel %s: interrupt after disconnect failed: %s", kernel_id, exc)

        asyncio.ensure_future(interrupt())
        cls._arm_interrupt(mkm, kernel_id, grace, log)  # again, while it stays busy and alone


class ReplayBufferMixin(LoggingConfigurable):
    max_buffered_messages = env_trait(Integer, "VMKG_MAX_BUFFERED_MESSAGES", 10_000,
                                      help="Messages kept per kernel while no websocket is "
                                           "connected, replayed on reconnect; the oldest go first.")
    max_buffered_bytes = env_trait(Integer, "VMKG_MAX_BUFFERED_BYTES", 256 * 1024 * 1024,
                                   help="Bytes kept per kernel while no websocket is connected.")

    # jupyter_server's, for the attributes used here
    buffer_offline_messages: bool

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: kernel id -> {"session_key", "buffer", "channels", "bytes", "dropped"}
        self._replay: dict[str, dict[str, Any]] = {}

    def start_buffering(self, kernel_id: str, session_key: str, channels: dict[str, Any]) -> None:
        """Called by jupyter_server when the last websocket of ``kernel_id`` closed."""
        if not self.buffer_offline_messages:
            for stream in channels.values():
                stream.close()
            return
        self.log.info("kernel %s: buffering messages for session %s", kernel_id, session_key)
        self._check_kernel_id(kernel_id)  # type: ignore[attr-defined]
        self.stop_buffering(kernel_id)
        buf: deque[tuple[str, list[bytes]]] = deque()
        info = self._replay[kernel_id] = dict(session_key=session_key, buffer=buf, channels=channels,
                                              bytes=0, dropped=0)
        for channel, stream in channels.items():
            stream.on_recv(partial(self._buffer_msg, info, channel))

    def _buffer_msg(self, info: dict[str, Any], channel: str, parts: list[Any]) -> None:
        buf = info["buffer"]
        buf.append((channel, parts))
        info["bytes"] += sum(len(p) for p in parts)
        while len(buf) > 1 and (len(buf) > self.max_buffered_messages
                                or info["bytes"] > self.max_buffered_bytes):
            _, old = buf.popleft()
            info["bytes"] -= sum(len(p) for p in old)
            info["dropped"] += 1

    def buffered_session(self, kernel_id: str) -> str | None:
        """The session whose messages are being buffered for ``kernel_id``, if any."""
        info = self._replay.get(kernel_id)
        return info["session_key"] if info else None

    def buffered_bytes(self, kernel_id: str) -> int:
        """Bytes kept for ``kernel_id`` (what the next client connecting is replayed)."""
        info = self._replay.get(kernel_id)
        return int(info["bytes"]) if info else 0

    def prepend_buffered(self, kernel_id: str, session_key: str, messages: list[tuple[str | None, list[Any]]]) -> None:
        """Put messages a closing websocket could not deliver in front of the buffer."""
        info = self._replay.get(kernel_id)
        if not info or info.get("session_key") != session_key:
            return
        # what a closed connection never wrote may be in the buffer already: not twice
        queued = {wire.msg_id(parts) for _, parts in info["buffer"]}
        queued.discard(None)
        messages = [(c, parts) for c, parts in messages if wire.msg_id(parts) not in queued]
        for channel, parts in reversed(messages):
            info["buffer"].appendleft((channel, parts))
            info["bytes"] = info.get("bytes", 0) + sum(len(p) for p in parts)

    def get_buffer(self, kernel_id: str, session_key: str) -> Any:
        """Called by jupyter_server when a websocket connects: what was kept for the kernel,
        which this session then owns, whichever session it was kept for; None if nothing."""
        info = self._replay.get(kernel_id)
        if info is None:
            return None
        if info["session_key"] != session_key:
            if not info["buffer"]:
                self.stop_buffering(kernel_id)
                return None
            # What was kept goes to the next client of the kernel whatever its session id:
            # JupyterLab reconnects after a page reload with a new session id, and
            # jupyter_server would discard the output of the cell that kept printing
            # meanwhile. The newcomer takes the buffered session over (its streams too, so
            # replies to the old session's requests reach it).
            self.log.info("kernel %s: session %s takes over %d messages kept for session %s",
                          kernel_id, session_key, len(info["buffer"]), info["session_key"])
            info["session_key"] = session_key
        del self._replay[kernel_id]
        if info.get("dropped"):
            notice = self._notice(kernel_id, (
                f"[vmkg] {info['dropped']} messages of this kernel were dropped while no client "
                f"was connected (replay buffer limit: {self.max_buffered_messages} messages, "
                f"{self.max_buffered_bytes} bytes)\n"))
            if notice is not None:
                info["buffer"].appendleft(("iopub", notice))
        return info

    def stop_buffering(self, kernel_id: str) -> None:
        """Drop a kernel's buffer and close its streams (jupyter_server calls this when the
        kernel shuts down; a new buffer or another session's websocket does too)."""
        self._check_kernel_id(kernel_id)  # type: ignore[attr-defined]
        info = self._replay.pop(kernel_id, None)
        if info is None:
            return
        for stream in info["channels"].values():
            if not stream.socket.closed:
                stream.on_recv(None)
                stream.close()
        if info["buffer"]:
            self.log.info("kernel %s: discarding %d buffered messages of session %s", kernel_id,
                          len(info["buffer"]), info["session_key"])

    def buffer_status(self, kernel_id: str, state: str) -> None:
        """Keep a ``status: <state>`` (said for the kernel by the gateway) for the client
        that is away right now, if messages are being kept for one: JupyterLab closes its
        websocket on ``restarting`` and reconnects while the kernel restarts; without this
        its reconnected page would wait in "unknown" (it ignores the statuses of its
        kernel_info requests) where a local kernel's page gets the new kernel's statuses."""
        info = self._replay.get(kernel_id)
        if info is None or kernel_id not in self:  # type: ignore[operator]
            return
        session = self.get_kernel(kernel_id).session  # type: ignore[attr-defined]
        msg = session.msg("status", content={"execution_state": state})
        self._buffer_msg(info, "iopub", session.serialize(msg))

    def _notice(self, kernel_id: str, text: str) -> list[bytes] | None:
        """A signed iopub stderr message, as if from the kernel (for the replay buffer)."""
        if kernel_id not in self:  # type: ignore[operator]
            return None
        session = self.get_kernel(kernel_id).session  # type: ignore[attr-defined]
        msg = session.msg("stream", content={"name": "stderr", "text": text})
        parts: list[bytes] = session.serialize(msg)
        return parts
