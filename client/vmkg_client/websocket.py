"""The websocket of one SDK ``Kernel`` (``vmkg_client.sdk``): the v1 subprotocol
(frames in ``vmkg_client.wire``), routing of replies to the calls waiting for them, and
transparent reconnection.

A :class:`KernelChannel` is opened by its Kernel on first use, with a session id of its
own, and read by one task. Messages are routed by their parent's msg_id to the queue a
call registered before sending its request. When the websocket breaks, the reader reopens
it with the same session and ``?vmkg_resume=<id of the last message received>`` (the
gateway's ``reconnect`` module): the gateway resends what was in flight and replays what it
kept meanwhile; messages already seen are dropped by msg_id. After ``reconnect_timeout``
seconds of failed attempts, or a 404 (the kernel is gone), every waiting call gets the
error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import websockets

from .errors import GatewayError, GatewayUnreachable, KernelGone, SDKError, error_message
from .wire import V1, decode_v1, encode_v1

log = logging.getLogger("vmkg.sdk")

#: msg_ids remembered to drop what a reconnect resends
SEEN_WINDOW = 20_000


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


@dataclass
class Message:
    channel: str
    header: dict[str, Any]
    parent: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes]

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))


class KernelChannel:
    """A Kernel's websocket: opened by :meth:`start`, read by one task that routes messages
    to the calls waiting for them (by parent msg_id), reopened when it breaks. ``kernel``
    is the SDK Kernel (its ``id`` and ``gateway`` are used)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.session = uuid.uuid4().hex
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.changed = asyncio.Condition()
        self.failure: BaseException | None = None
        self.pending: dict[str, asyncio.Queue[Any]] = {}
        self.last_msg_id = ""
        self.seen: OrderedDict[str, None] = OrderedDict()
        #: a "restarting" came (the kernel died): its "starting" ends that, not a new restart
        self.reviving = False
        self.closing = False
        self.reconnects = 0

    async def start(self) -> None:
        self.ws = await self._open()
        self.reader = asyncio.create_task(self._read_loop(), name=f"vmkg-sdk-{self.kernel.id[:8]}")

    async def _open(self) -> Any:
        gw = self.kernel.gateway
        query = urllib.parse.urlencode({"session_id": self.session, "vmkg_resume": self.last_msg_id})
        url = f"{gw.ws_url}/api/kernels/{_q(self.kernel.id)}/channels?{query}"
        try:
            ws = await websockets.connect(url, subprotocols=[V1], additional_headers=gw.headers,  # type: ignore[list-item]
                                          max_size=None, open_timeout=gw.request_timeout,
                                          ping_interval=20, ping_timeout=20, compression=None)
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            message, reason = error_message(exc.response.body or b"", "websocket refused")
            if status == 404:
                raise KernelGone(self.kernel.id, message) from exc
            raise GatewayError(status, message, reason) from exc
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
            raise GatewayUnreachable(f"cannot open kernel {self.kernel.id}'s websocket at "
                                     f"{gw.ws_url}: {exc}") from exc
        if ws.subprotocol != V1:
            await ws.close()
            raise SDKError(f"the gateway at {gw.url} does not speak the {V1} websocket subprotocol")
        return ws

    # -- sending ---------------------------------------------------------------------------

    def register(self, msg_id: str) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.pending[msg_id] = queue
        return queue

    def unregister(self, msg_id: str) -> None:
        self.pending.pop(msg_id, None)

    async def send(self, msg_type: str, content: dict[str, Any], *, channel: str = "shell",
                   msg_id: str | None = None) -> str:
        msg_id = msg_id or uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "username": "vmkg-sdk", "session": self.session,
                  "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), "version": "5.3"}
        frame = encode_v1([json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()],
                          channel)
        ws = None
        for _ in range(3):
            ws = await self._usable(not_this=ws)
            try:
                await ws.send(frame)
                return msg_id
            except websockets.ConnectionClosed:
                continue  # not sent: once the reader has reopened the websocket, send again
        raise GatewayUnreachable(f"kernel {self.kernel.id}: the websocket kept breaking")

    async def _usable(self, not_this: Any = None) -> Any:
        timeout = self.kernel.gateway.reconnect_timeout + self.kernel.gateway.request_timeout
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(
                    lambda: self.failure is not None or (self.ws is not None and self.ws is not not_this)),
                    timeout)
            except asyncio.TimeoutError:
                raise GatewayUnreachable(f"kernel {self.kernel.id}: no websocket after {timeout:.0f} s") from None
        if self.failure is not None:
            raise self.failure
        return self.ws

    # -- receiving -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            ws = self.ws
            try:
                async for frame in ws:
                    try:
                        self._dispatch(frame)
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        log.warning("kernel %s: dropped a malformed message: %s", self.kernel.id, exc)
            except websockets.ConnectionClosed:
                pass
            if self.closing:
                return
            log.info("kernel %s: websocket closed (%s); reconnecting", self.kernel.id,
                     ws.close_reason or ws.close_code)
            async with self.changed:
                self.ws = None
            try:
                new = await self._reopen()
            except SDKError as exc:
                await self._fail(exc)
                return
            async with self.changed:
                self.ws = new
                self.changed.notify_all()

    async def _reopen(self) -> Any:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.kernel.gateway.reconnect_timeout
        delay = 0.05
        while True:
            try:
                ws = await self._open()
                self.reconnects += 1
                return ws
            except (KernelGone, GatewayError) as exc:
                if isinstance(exc, KernelGone) or exc.status in (401, 403):
                    raise
                last: SDKError = exc
            except GatewayUnreachable as exc:
                last = exc
            if self.closing or loop.time() + delay > give_up:
                raise GatewayUnreachable(f"kernel {self.kernel.id}: the websocket broke and could "
                                         f"not be reopened: {last}") from last
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _fail(self, exc: BaseException) -> None:
        log.info("kernel %s: giving up the websocket: %s", self.kernel.id, exc)
        async with self.changed:
            self.failure = exc
            self.changed.notify_all()
        for queue in self.pending.values():
            queue.put_nowait(exc)

    def _dispatch(self, frame: bytes | str) -> None:
        if not isinstance(frame, bytes):
            return  # the v1 protocol carries binary frames only
        channel, parts = decode_v1(frame)
        header = json.loads(parts[0])
        msg_id = str(header.get("msg_id", ""))
        if msg_id:
            if msg_id in self.seen:
                return  # resent after a reconnect, already had it
            self.seen[msg_id] = None
            if len(self.seen) > SEEN_WINDOW:
                self.seen.popitem(last=False)
            self.last_msg_id = msg_id
        parent = json.loads(parts[1]) if len(parts) > 1 else {}
        msg = Message(channel, header, parent or {}, json.loads(parts[3]) if len(parts) > 3 else {},
                   [bytes(b) for b in parts[4:]])
        if msg.msg_type == "status" and not msg.parent.get("msg_id"):
            # Statuses of the kernel itself, as Jupyter sends them: "restarting" = it died and
            # is being restarted (the cells in flight are lost; the kernel lives on, empty);
            # "starting" = a new kernel process (a restart someone asked for): the same for
            # cells in flight; "dead" = died past its restart budget, gone
            state = msg.content.get("execution_state")
            kid = self.kernel.id
            if state == "starting" and self.reviving:
                self.reviving = False  # the kernel that died is back: cells sent since then run
                return
            self.reviving = state == "restarting"
            why: SDKError | None = {
                "dead": KernelGone(kid, f"kernel {kid} died and could not be restarted"),
                "restarting": SDKError(f"kernel {kid} died while the cell ran; it is being "
                                       "restarted with its state gone"),
                "starting": SDKError(f"kernel {kid} was restarted while the cell ran; its state is gone"),
            }.get(str(state))
            if why is not None:
                for queue in self.pending.values():
                    queue.put_nowait(why)
            return
        if msg.msg_type == "shutdown_reply" and msg.channel == "iopub":
            # ipykernel tells every client of a shutdown on iopub. It ends the cell that was
            # running with an idle status and no reply, which alone would read as a cell done
            kid = self.kernel.id
            gone: SDKError = (
                SDKError(f"kernel {kid} was restarted while the cell ran; its state is gone")
                if msg.content.get("restart") else
                KernelGone(kid, f"kernel {kid} was shut down while the cell ran"))
            for queue in self.pending.values():
                queue.put_nowait(gone)
            return
        waiting = self.pending.get(str(msg.parent.get("msg_id", "")))
        if waiting is not None:
            waiting.put_nowait(msg)

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except (asyncio.TimeoutError, OSError, websockets.WebSocketException):
                pass
        if self.reader is not None:
            self.reader.cancel()
            try:
                await self.reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        async with self.changed:
            if self.failure is None:
                self.failure = SDKError(f"kernel {self.kernel.id}: this connection was closed")
            self.changed.notify_all()
        for queue in self.pending.values():
            queue.put_nowait(self.failure)
