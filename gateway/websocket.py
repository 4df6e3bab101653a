"""The kernel channels websocket: jupyter_server's, with what a gateway needs on top.

jupyter_server's ``ZMQChannelsWebsocketConnection`` already negotiates the
``v1.kernel.websocket.jupyter.org`` subprotocol (binary, offsets) against the legacy JSON
protocol, and replays what its kernel manager buffered while the client was away. Here:

- **Nothing dropped.** The iopub rate limit (which drops output) is off by default.
  Instead, *backpressure*: when more than ``write_high_water`` bytes wait for a slow
  client, the connection holds that client's further messages (in order, counted in
  bytes) until half of it is flushed. Each websocket has its own ZMQ sockets on the
  kernel's relay, whose publisher never blocks, so holding one client's messages never
  stalls the kernel or delays its other clients. (Holding, not pausing the ZMQ sockets:
  a paused subscriber's backlog would sit in ZMQ, unmeasured, and be dropped silently
  at its high-water mark.) Stream messages larger than ``split_stream_size`` are split
  into several (same parent, consecutive text), so a 20 MB print reaches clients whose
  frame limit is 10 MiB (tornado's, used by GatewayClient).
- **Slow clients are cut off, not served forever.** A client for which more than
  ``max_client_buffer`` bytes wait is closed with code 4008 (``CLOSE_SLOW_CLIENT``) and
  a reason saying so (counted in ``vmkg_websocket_closed_total{reason="slow_client"}``).
  What it had not received is kept: the held messages go to its session's replay buffer
  (started for it even while other websockets of the kernel stay open), and the resume
  window of a client that asked for one (``vmkg_resume=``) stays, so reconnecting with
  the same ``session_id`` continues where it stopped (what is replayed to it then does
  not count against the bound until it has been written). A client that reads nothing at all
  sees the 4008 close frame only if it reads within tornado's 5 s close handshake;
  after that the connection is aborted (1006 on its side).
- **Keepalive.** jupyter_server's pinger (``ws_ping_interval``/``ws_ping_timeout`` of
  ``gateway.app``), whose timeout closes are counted; tornado's own pinger is turned off.
- **Bad frames get a clear answer.** A frame that is not a Jupyter message (bad JSON,
  bad v1 offsets, no header) or names an unknown channel closes that websocket with code
  1007 and a reason; the kernel and every other connection are untouched. Oversized
  frames are closed by tornado with 1009 (``websocket_max_message_size``).
- **Latency.** TCP_NODELAY on every channels socket: small replies go out at once
  instead of waiting out Nagle's algorithm against the peer's delayed ACK.
- **Output while no client is connected** (``gateway.replay``, ``ReconnectMixin``, a
  base of this class): nothing lost to a close, resume with ``?vmkg_resume=``, a busy
  kernel whose clients all left interrupted after a grace period.
- **Statuses the kernel does not publish.** :meth:`VMKGWebsocketConnection.announce`
  sends ``status: <state>`` to every open websocket of a kernel; the kernel manager calls
  it (``status_hooks``) after restarts and deaths (see ``gateway.kernels``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from tornado import ioloop, web
from tornado.websocket import WebSocketClosedError
from traitlets import Bool, Integer

from . import errors, internals, metrics, wire
from .envvars import env_trait
from .handlers import check_owner, unauthorized_message
from .replay import ReconnectMixin
from .wire import V1, BadFrame, parse_legacy, parse_v1

CLOSE_BAD_FRAME = 1007
#: an application close code (4000-4999): more than max_client_buffer bytes waited for the client
CLOSE_SLOW_CLIENT = 4008
#: the channels a client may send on (iopub only carries messages from the kernel)
CHANNELS = ("shell", "control", "stdin")


class VMKGWebsocketConnection(ReconnectMixin, ZMQChannelsWebsocketConnection):
    limit_rate = Bool(False, config=True,
                      help="Apply jupyter_server's iopub rate limits (which DROP output above "
                           "iopub_msg_rate_limit / iopub_data_rate_limit). Off: output is never "
                           "dropped; write_high_water applies backpressure instead.")
    write_high_water = Integer(4 * 1024 * 1024, config=True,
                               help="Bytes queued toward one websocket client before the gateway "
                                    "holds further messages for it (in the gateway, in order) "
                                    "until half of that is flushed.")
    max_client_buffer = env_trait(Integer, "VMKG_MAX_CLIENT_BUFFER", 64 * 1024 * 1024,
                                  zero_is_default=True,
                                  help="Bytes waiting for one websocket client (written but not yet "
                                       "flushed, plus held) above which that client is disconnected "
                                       "with close code 4008; what it missed stays in its session's "
                                       "replay buffer and resume window. The kernel and its other "
                                       "clients never wait for a slow one.")
    split_stream_size = Integer(1024 * 1024, config=True,
                                help="Stream (stdout/stderr) messages with more text than this are "
                                     "sent as several consecutive ones. 0: never split.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._queued = 0
        self._paused = False
        self._closed = False
        self._held: deque[tuple[Any, list[Any]]] = deque()  # (stream, msg) while paused
        self._held_bytes = 0
        self._slow_dropped = False

    # -- client -> kernel ------------------------------------------------------------------

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        self.heard_from_client()
        if not self.channels:
            self.log.debug("kernel %s: message on a closed websocket ignored", self.kernel_id)
            return
        msg_list: list[bytes] = []
        channel: str | None
        try:
            if self.subprotocol == V1:
                channel, header, msg_list = parse_v1(incoming_msg)
                msg: dict[str, Any] = {"header": header}
            else:
                channel, msg = parse_legacy(incoming_msg)
                header = msg["header"]
            if channel is None:
                channel = "shell"
            if channel not in CHANNELS or channel not in self.channels:
                raise BadFrame(f"unknown channel {channel[:40]!r}; use one of {', '.join(CHANNELS)}")
            if not isinstance(header.get("msg_type"), str):
                raise BadFrame("header has no msg_type")
        except BadFrame as exc:
            self.reject(str(exc))
            return
        allowed = self.multi_kernel_manager.allowed_message_types
        if allowed and header["msg_type"] not in allowed:
            self.log.warning("kernel %s: message type %r is not allowed; ignored", self.kernel_id,
                             header["msg_type"])
            return
        stream = self.channels[channel]
        if msg_list:
            self.session.send_raw(stream, msg_list)
        else:
            self.session.send(stream, msg)

    def reject(self, why: str) -> None:
        """Close this websocket because of a frame we cannot route (other clients unaffected)."""
        self.log.warning("kernel %s: closing a websocket after a bad frame: %s", self.kernel_id, why)
        metrics.WS_REJECTED.inc()
        metrics.ws_closed("bad_frame")
        reason = f"bad frame: {why}".encode()[:120].decode("utf-8", "ignore")
        self.websocket_handler.close(CLOSE_BAD_FRAME, reason)

    # -- kernel -> client ------------------------------------------------------------------

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
        if self._paused or self._held:
            self._hold(stream, outgoing_msg)
            return
        self._send(stream, channel, outgoing_msg)

    def _send(self, stream: Any, channel: str | None, outgoing_msg: list[Any]) -> None:
        for parts in self._split(channel, outgoing_msg):
            super().handle_outgoing_message(stream, parts)

    def _split(self, channel: str | None, msg_list: list[Any]) -> list[list[Any]]:
        size = self.split_stream_size
        if channel != "iopub" or size <= 0:
            return [msg_list]
        frames = wire.split(msg_list)
        if frames is None or len(frames.content) <= size:
            return [msg_list]
        header = self.session.unpack(frames.header)
        if header.get("msg_type") != "stream":
            return [msg_list]
        content = self.session.unpack(frames.content)
        text = content.get("text")
        if not isinstance(text, str) or len(text) <= size:
            return [msg_list]
        return [wire.join(frames._replace(
                    header=self.session.pack({**header, "msg_id": f"{header.get('msg_id')}-{n}"}),
                    content=self.session.pack({**content, "text": text[start:start + size]})),
                    self.session)
                for n, start in enumerate(range(0, len(text), size))]

    @property
    def write_message(self) -> Any:
        return self._write

    def _write(self, message: bytes | str, binary: bool = False) -> Any:
        try:
            fut = self.websocket_handler.write_message(message, binary=binary)
        except WebSocketClosedError:
            self.log.debug("kernel %s: websocket closed during a write", self.kernel_id)
            return None
        n = len(message)
        self._queued += n
        fut.add_done_callback(partial(self._written, n))
        if self._queued > self.write_high_water and not self._paused:
            self._pause()
        return fut

    def _written(self, n: int, fut: Any) -> None:
        if not fut.cancelled():
            fut.exception()  # a closed stream: nothing to do, but retrieve it
        self._queued -= n
        self.replay_allowance = max(0, self.replay_allowance - n)
        if self._paused and self._queued <= self.write_high_water // 2:
            self._resume()

    def _pause(self) -> None:
        self._paused = True
        metrics.WS_PAUSES.inc()
        self.log.debug("kernel %s: client is slow (%d bytes queued); holding its messages",
                       self.kernel_id, self._queued)

    def _hold(self, stream: Any, msg_list: list[Any]) -> None:
        self._held.append((stream, msg_list))
        self._held_bytes += sum(len(p) for p in msg_list)
        waiting = self._queued + self._held_bytes
        if waiting > self.max_client_buffer + self.replay_allowance:
            self.drop_slow_client(waiting)

    def _release_held(self) -> None:
        """Hand what is held to the undelivered list (kept for the session)."""
        self._undelivered.extend((getattr(s, "channel", s), m) for s, m in self._held)
        self._held.clear()
        self._held_bytes = 0

    def drop_slow_client(self, waiting: int) -> None:
        """Close a client that cannot keep up (its messages stay for its session)."""
        mib = 1024 * 1024
        self.log.warning("kernel %s: closing the websocket of session %s: %.1f MiB wait for it "
                         "(max_client_buffer %.1f MiB); what it missed is kept for its session",
                         self.kernel_id, getattr(self.session, "session", "?"), waiting / mib,
                         self.max_client_buffer / mib)
        metrics.ws_closed("slow_client")
        self._slow_dropped = True
        self._paused = False  # nothing more is written to this websocket
        self._release_held()
        self.websocket_handler.close(CLOSE_SLOW_CLIENT,
                                     f"slow client: more than {self.max_client_buffer} bytes waited; "
                                     "reconnect with the same session_id to continue")

    def _resume(self) -> None:
        self._paused = False
        while self._held and not self._paused and not self._closed:
            if self._ws_closed():
                self._release_held()
                break
            stream, msg_list = self._held.popleft()
            self._held_bytes -= sum(len(p) for p in msg_list)
            self._send(stream, getattr(stream, "channel", stream), msg_list)
        if not self._held:
            self._held_bytes = 0

    # -- connecting ----------------------------------------------------------------------

    def create_stream(self) -> None:
        super().create_stream()
        self._fresh_iopub = True

    def nudge(self) -> Any:
        """Resolve once this connection's iopub subscription is live.

        jupyter_server sends kernel_info requests until a reply and an iopub message come
        back; through a VM each is a round trip through emulated ipykernel, and the
        client's first request waits behind them. The relay greets every new iopub
        subscriber with ``iopub_welcome`` on the host, which proves the subscription just
        as well; if no welcome comes within a second, jupyter_server's nudge runs.

        Reused streams (a reconnect of the same session that gets its kept buffer: what
        JupyterLab does after every restart) are live already - subscribed, connected,
        and they kept receiving while the client was away - so there is nothing to prove:
        the connection is ready at once. jupyter_server's nudge there took 10-20 s on a
        loaded host right after a VM restore (the page's own messages wait for it).
        """
        if not getattr(self, "_fresh_iopub", False):
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ready.set_result(None)
            return ready
        self._fresh_iopub = False
        iopub = self.channels["iopub"]
        welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_iopub(_: Any) -> None:
            if not welcomed.done():
                iopub.stop_on_recv()
                welcomed.set_result(None)

        iopub.on_recv(on_iopub)

        async def wait() -> None:
            try:
                await asyncio.wait_for(asyncio.shield(welcomed), 1.0)
            except asyncio.TimeoutError:
                if not iopub.closed():
                    iopub.stop_on_recv()
                self.log.debug("kernel %s: no iopub welcome; nudging", self.kernel_id)
                await super(VMKGWebsocketConnection, self).nudge()

        return asyncio.ensure_future(wait())

    # -- lifecycle -----------------------------------------------------------------------

    def disconnect(self) -> None:  # type: ignore[override]  # sync in jupyter_server too
        self._closed = True
        self._release_held()
        mkm = self.multi_kernel_manager
        if (self._slow_dropped and self.channels and self.kernel_id in mkm
                and internals.connection_count(mkm, self.kernel_id) > 1
                and mkm.buffered_session(self.kernel_id) is None):
            # jupyter_server buffers only for a kernel's last websocket; a client cut off for
            # being slow while others stay gets its session's messages kept all the same
            # (until another session connects with nothing to replay, as jupyter_server does)
            channels, self.channels = self.channels, {}
            undelivered, self._undelivered = self._undelivered, []
            super().disconnect()
            mkm.start_buffering(self.kernel_id, self.session_key, channels)
            if undelivered:
                mkm.prepend_buffered(self.kernel_id, self.session_key, undelivered)
        else:
            super().disconnect()

    @classmethod
    def close_for_kernel(cls, kernel_id: str) -> None:
        """Close every websocket of a kernel that is gone (deleted, culled, died): clients
        learn it at once instead of talking to nothing."""
        for conn in internals.connections_of(kernel_id):
            if conn.websocket_handler is not None:
                metrics.ws_closed("kernel_gone")
                conn.websocket_handler.close(1001, f"kernel {kernel_id} was shut down")

    @classmethod
    def announce(cls, kernel_id: str, state: str) -> int:
        """Send ``status: <state>`` to every open websocket of ``kernel_id``."""
        n = 0
        for conn in internals.connections_of(kernel_id):
            if conn.websocket_handler is not None and conn.channels:
                try:
                    internals.send_status(conn, state)
                    n += 1
                except (WebSocketClosedError, OSError):
                    pass
        return n


class KernelChannelsHandler(KernelWebsocketHandler):
    """``/api/kernels/{id}/channels``: token auth answered with 401 JSON before the
    upgrade, the kernel-id credential for token-less clients, only the kernel's owner
    (``check_owner``), TCP_NODELAY."""

    def kernel_id_credential(self) -> bool:
        """True when no credential was presented, kernel-id auth is on and the kernel exists
        (see gateway.auth)."""
        if not self.settings.get("vmkg_kernel_id_ws_auth"):
            return False
        kernel_id = self.path_kwargs.get("kernel_id")
        return isinstance(kernel_id, str) and kernel_id in self.kernel_manager

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        user = await ensure_async(self.identity_provider.get_user(self))
        if user is None:
            message = unauthorized_message(self)
            if not self.settings["identity_provider"].presented_token(self) \
                    and not self.settings.get("vmkg_kernel_id_ws_auth"):
                message += (". Clients that send no credential on the channels websocket "
                            "(nbclient/papermill through jupyter_server's GatewayKernelClient) "
                            "need the gateway started with --ServeApp.kernel_id_ws_auth=True "
                            "($VMKG_KERNEL_ID_WS_AUTH=1)")
            raise web.HTTPError(401, "%s", message)
        await super().prepare(*args, **kwargs)
        # another user's kernel: the 404 of an unknown one, before the upgrade (gateway.users)
        check_owner(self, self.path_kwargs.get("kernel_id", ""))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.set_header("Content-Type", "application/json")
        self.finish(errors.dumps(status_code, exc))

    def open(self, kernel_id: str) -> Any:
        self.set_nodelay(True)
        return super().open(kernel_id)

    def get_websocket_protocol(self) -> Any:
        # jupyter_server's ping_interval/ping_timeout (milliseconds) shadow tornado's
        # (seconds), so tornado's own pinger would run too, with a 30 s interval read as
        # 30,000 s, and warn that the timeout exceeds it: one pinger, jupyter_server's
        protocol = super().get_websocket_protocol()
        params = getattr(protocol, "params", None)
        if params is not None:
            params.ping_interval = params.ping_timeout = None
        return protocol

    def send_ping(self) -> None:
        """jupyter_server's keepalive (ws_ping_interval, ws_ping_timeout), with its
        timeout close counted (``vmkg_websocket_closed_total{reason="ping_timeout"}``)."""
        conn = self.ws_connection
        if conn is not None and not conn.client_terminated and self.ping_interval > 0:
            now = ioloop.IOLoop.current().time()
            since_last_pong = 1e3 * (now - self.last_pong)
            since_last_ping = 1e3 * (now - self.last_ping)
            if since_last_ping < 2 * self.ping_interval and since_last_pong > self.ping_timeout:
                self.log.warning("kernel %s: closing a websocket whose peer answered no ping for "
                                 "%d ms (ws_ping_timeout %d ms)", self.kernel_id,
                                 since_last_pong, self.ping_timeout)
                metrics.ws_closed("ping_timeout")
                self.close(1001, "ping timeout")
                return
        super().send_ping()
