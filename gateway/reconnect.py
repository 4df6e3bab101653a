"""When a client's websocket goes away: it may come back, or it may not.

jupyter_server already keeps a kernel's messages while no websocket is connected and
replays them to the next websocket of the same session. Two gaps remain, closed here by
:class:`ReconnectMixin`, a base of ``gateway.websocket.VMKGWebsocketConnection``:

**Coming back without a gap (resume).** Messages written to a websocket just before its
connection broke are gone: they sat in socket buffers, or the gateway wrote them before it
noticed the break. A client that opens its websocket with ``?vmkg_resume=`` asks the
gateway to keep the last messages it sent to that session (``resume_window``); when it
reconnects with ``?session_id=<same>&vmkg_resume=<msg_id of the last message it got>``,
what was sent after that message is written again first, then what was buffered while it
was away. An unknown or empty id resends the whole window, so a resuming client drops
messages whose ``msg_id`` it has already seen (the vmkg SDK does). Clients that do not ask
see no change. A reconnect that finds the old websocket of its session still open (the
gateway had not noticed the break yet) waits, briefly, until that one is closed, so the
kernel's replies are not split between the two.

**Not coming back (interrupt on disconnect).** A client that dies mid-cell would leave
its kernel busy forever (idle culling spares busy kernels). With ``interrupt_on_disconnect``
(default on), when the last websocket of a busy kernel closes and none reconnects within
``disconnect_grace`` seconds, the kernel is interrupted (again every grace period while it
stays busy and alone, for cells that swallow one KeyboardInterrupt). Its state is kept;
the interrupted cell's error waits in the replay buffer for whoever connects next.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, ClassVar

from jupyter_core.utils import ensure_async
from prometheus_client import Counter
from traitlets import Bool, Float, Integer, default
from traitlets.config import LoggingConfigurable

from .envvars import env_bool, env_float

DELIM = b"<IDS|MSG>"
RESUME_ARG = "vmkg_resume"
RINGS_PER_KERNEL = 4
#: a resumable session's kept messages are dropped after this long without a connection
RING_TTL = 600.0
STALE_CLOSE_WAIT = 10.0

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
        msg_id = _msg_id(msg_list)
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


def _msg_id(msg_list: list[Any]) -> str | None:
    try:
        i = msg_list.index(DELIM)
        header = json.loads(bytes(msg_list[i + 2]))
        return str(header["msg_id"])
    except (ValueError, IndexError, KeyError, TypeError):
        return None


class ReconnectMixin(LoggingConfigurable):
    """Resume and interrupt-on-disconnect for a ``ZMQChannelsWebsocketConnection``
    (put it first among the bases). Everything here runs on the gateway's event loop."""

    interrupt_on_disconnect = Bool(True, config=True,
                                   help="Interrupt a busy kernel when its last websocket has been "
                                        "gone for disconnect_grace seconds, so a client that died "
                                        "mid-cell does not leave the kernel busy forever (its state "
                                        "is kept). ($VMKG_INTERRUPT_ON_DISCONNECT)")

    @default("interrupt_on_disconnect")
    def _interrupt_on_disconnect_default(self) -> bool:
        return env_bool("VMKG_INTERRUPT_ON_DISCONNECT", True)

    # 10 minutes: long enough that a JupyterLab user who closes the laptop during a long
    # cell is not interrupted by a short walk, short enough that a crashed agent's runaway
    # cell does not hold a VM busy for good. Agent platforms may want 30 s.
    disconnect_grace = Float(600.0, config=True,
                             help="Seconds a busy kernel may stay without any websocket before it is "
                                  "interrupted (a client reconnecting within them keeps its cell "
                                  "running). ($VMKG_DISCONNECT_GRACE)")

    @default("disconnect_grace")
    def _disconnect_grace_default(self) -> float:
        return env_float("VMKG_DISCONNECT_GRACE", 600.0)

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
    _open_sessions: ClassVar[dict[str, Any]]

    # -- resume ------------------------------------------------------------------------

    def _resume_arg(self) -> str | None:
        try:
            value: str | None = self.websocket_handler.get_argument(RESUME_ARG, None)
            return value
        except Exception:  # noqa: BLE001 - no request (tests, shutdown)
            return None

    async def prepare(self) -> None:
        stale = None
        if self._resume_arg() is not None:
            handler = self._open_sessions.get(f"{self.kernel_id}:{self.session.session}")
            stale = getattr(handler, "connection", None)
        await super().prepare()  # type: ignore[misc]  # closes a stale websocket of the session
        if stale is not None and stale is not self:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(stale._close_future)),
                                       STALE_CLOSE_WAIT)
            except asyncio.TimeoutError:
                self.log.warning("kernel %s: the previous websocket of session %s is still closing",
                                 self.kernel_id, self.session.session)

    def _ring(self, create: bool) -> _Ring | None:
        ring = self._rings.get(self.session_key)
        if ring is None and create:
            mkm = self.multi_kernel_manager
            stale = time.monotonic() - RING_TTL
            live = set(self._open_sessions)
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
        last = self._resume_arg()
        self._resumable = last is not None
        if last is None:
            return super().connect()  # type: ignore[misc]
        ring = self._ring(create=True)
        lost = ring.after(last) if ring is not None else []
        mkm = self.multi_kernel_manager
        info = mkm._kernel_buffers.get(self.kernel_id) or {}
        into_buffer = bool(lost) and info.get("session_key") == self.session_key
        if into_buffer:
            # what a closed connection never wrote is in the buffer already (not twice)
            queued = {_msg_id(parts) for _, parts in info.get("buffer") or ()}
            lost = [(channel, parts) for channel, parts in lost if _msg_id(parts) not in queued]
            mkm.prepend_buffered(self.kernel_id, self.session_key, lost)
        if lost:
            self.log.info("kernel %s: resuming session %s: resending %d messages", self.kernel_id,
                          self.session.session, len(lost))
        connected = super().connect()  # type: ignore[misc]
        if lost and not into_buffer and connected is not None:
            connected.add_done_callback(lambda _: self._resend(lost))
        return connected

    def _resend(self, messages: list[tuple[str, list[Any]]]) -> None:
        for channel, parts in messages:
            if channel in getattr(self, "channels", {}):
                self.handle_outgoing_message(self.channels[channel], parts)  # type: ignore[attr-defined]

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        if getattr(self, "_resumable", False):
            ring = self._ring(create=False)
            channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
            if ring is not None and channel:
                ring.add(channel, outgoing_msg)
        super().handle_outgoing_message(stream, outgoing_msg)  # type: ignore[misc]

    # -- interrupt on disconnect -------------------------------------------------------

    def disconnect(self) -> None:
        super().disconnect()  # type: ignore[misc]
        if self.interrupt_on_disconnect:
            self._arm_interrupt(self.multi_kernel_manager, self.kernel_id, self.disconnect_grace, self.log)

    @classmethod
    def _arm_interrupt(cls, mkm: Any, kernel_id: str, grace: float, log: Any) -> None:
        if kernel_id not in mkm or mkm._kernel_connections.get(kernel_id, 0) > 0:
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
        if kernel_id not in mkm or mkm._kernel_connections.get(kernel_id, 0) > 0:
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
