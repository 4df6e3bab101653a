"""The kernel's ZMQ face on the host.

A ``KernelRelay`` binds the five sockets a connection file names (shell, control,
stdin ROUTERs, iopub PUB, heartbeat REP) and carries messages to and from the guest
agent over an ``AgentChannel``. It owns the kernel's HMAC key: messages from clients
are verified (bad signatures and replays are dropped) and go to the guest unsigned;
messages from the guest are signed here. The guest never learns the key, and one
kernel's key opens nothing of another's.

The relay outlives the VM behind it: a restart swaps the VM (``attach``/``detach``)
while clients stay connected to the same ports with the same key, as they would to a
restarted local kernel. Heartbeats are answered here while the VM is alive, so idle
kernels cost the guest no wake-ups.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import zmq
import zmq.asyncio

from .channel import AgentChannel

log = logging.getLogger(__name__)

DELIM = b"<IDS|MSG>"
PORT_NAMES = {"shell": "shell_port", "control": "control_port", "stdin": "stdin_port",
              "iopub": "iopub_port", "hb": "hb_port"}
#: messages held while no VM is attached (between the two halves of a restart)
HOLD_LIMIT = 1000
REPLAY_WINDOW = 1 << 16


class KernelRelay:
    def __init__(self, ctx: zmq.asyncio.Context, *, name: str, ip: str = "127.0.0.1",
                 transport: str = "tcp", key: bytes, signature_scheme: str = "hmac-sha256",
                 ports: dict[str, int] | None = None) -> None:
        self.ctx = ctx
        self.name = name
        self.ip = ip
        self.transport = transport
        self.key = key
        self.signature_scheme = signature_scheme
        algo = signature_scheme.split("-", 1)[1] if "-" in signature_scheme else "sha256"
        self._digestmod = getattr(hashlib, algo)
        self.ports: dict[str, int] = dict(ports or {})
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: AgentChannel | None = None
        self._held: deque[tuple[str, list[bytes]]] = deque()
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()
        self.alive: Callable[[], bool] = lambda: False
        self.on_activity: Callable[[str, list[bytes]], None] | None = None
        self.dropped = 0
        self._session_id = uuid.uuid4().hex

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Bind the sockets (ports given or ephemeral) and return the connection info."""
        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER,
                 "iopub": zmq.XPUB, "hb": zmq.REP}
        for name, kind in kinds.items():
            sock = self.ctx.socket(kind)
            sock.linger = 0
            if name == "iopub":
                sock.sndhwm = 100_000
                sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # hear every subscriber, not just the first
            elif kind == zmq.ROUTER:
                sock.router_handover = 1  # a client reconnecting with its identity takes over
            sock.rcvhwm = 0 if name != "hb" else 1000
            port = self.ports.get(name, 0)
            if self.transport == "tcp":
                if port:
                    sock.bind(f"tcp://{self.ip}:{port}")
                else:
                    port = sock.bind_to_random_port(f"tcp://{self.ip}")
            else:
                port = port or (len(self.sockets) + 1)
                sock.bind(f"ipc://{self.ip}-{port}")
            self.ports[name] = port
            self.sockets[name] = sock
        for name in ("shell", "control", "stdin"):
            self._tasks.append(asyncio.ensure_future(self._pump_client(name)))
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))
        self._tasks.append(asyncio.ensure_future(self._welcome_subscribers()))
        return self.connection_info()

    def connection_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {PORT_NAMES[n]: p for n, p in self.ports.items()}
        info.update(ip=self.ip, transport=self.transport, key=self.key,
                    signature_scheme=self.signature_scheme)
        return info

    def attach(self, channel: AgentChannel) -> None:
        self._channel = channel
        held, self._held = self._held, deque()
        for name, parts in held:
            asyncio.ensure_future(channel.send_jupyter(name, parts))

    def detach(self) -> None:
        self._channel = None

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks.clear()
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()

    # -- signing ------------------------------------------------------------------------

    def sign(self, parts: list[bytes]) -> bytes:
        if not self.key:
            return b""
        h = hmac.new(self.key, digestmod=self._digestmod)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def _verify(self, sig: bytes, parts: list[bytes]) -> bool:
        if not self.key:
            return True
        if not hmac.compare_digest(sig, self.sign(parts)):
            return False
        if sig in self._seen:
            return False  # a replayed message
        self._seen.add(sig)
        self._seen_order.append(sig)
        if len(self._seen_order) > REPLAY_WINDOW:
            self._seen.discard(self._seen_order.popleft())
        return True

    # -- client -> guest ------------------------------------------------------------------

    async def _pump_client(self, name: str) -> None:
        sock = self.sockets[name]
        while True:
            parts = await sock.recv_multipart(copy=True)
            try:
                i = parts.index(DELIM)
            except ValueError:
                self._drop(name, "no delimiter")
                continue
            if len(parts) < i + 6 or not self._verify(parts[i + 1], parts[i + 2:i + 6]):
                self._drop(name, "bad signature or short message")
                continue
            parts[i + 1] = b""
            if self.on_activity:
                self.on_activity(name, parts)
            # held, not sent, also while the kernel behind the channel is dead (its process
            # exited, the VM is about to be replaced): a local kernel's client would have the
            # message wait in its socket for the restarted kernel, not vanish
            if self._channel is None or not self.alive():
                if len(self._held) < HOLD_LIMIT:
                    self._held.append((name, parts))
                continue
            await self._channel.send_jupyter(name, parts)

    def _drop(self, name: str, why: str) -> None:
        self.dropped += 1
        log.warning("kernel %s: dropped a %s message from a client: %s", self.name, name, why)

    async def _heartbeat(self) -> None:
        sock = self.sockets["hb"]
        while True:
            msg = await sock.recv_multipart()
            while not self.alive():
                await asyncio.sleep(0.5)  # a dead VM's heart does not beat
            await sock.send_multipart(msg)

    async def _welcome_subscribers(self) -> None:
        """Greet each new iopub subscriber with ``iopub_welcome``, as ipykernel 7 does.

        The kernel's own welcome went to the agent's subscription inside the VM; clients
        need theirs from here. It also lets jupyter_client's wait_for_ready see iopub
        traffic at once instead of retrying after a missed status message.
        """
        sock = self.sockets["iopub"]
        while True:
            frame = await sock.recv()
            if not frame or frame[0] != 1:
                continue
            topic = frame[1:]
            header = {"msg_id": uuid.uuid4().hex, "msg_type": "iopub_welcome", "username": "vmkg",
                      "session": self._session_id, "version": "5.4",
                      "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
            body = [json.dumps(header).encode(), b"{}", b"{}",
                    json.dumps({"subscription": topic.decode("utf-8", "replace")}).encode()]
            parts = ([topic] if topic else []) + [DELIM, self.sign(body), *body]
            await sock.send_multipart(parts)

    # -- guest -> client ------------------------------------------------------------------

    def from_guest(self, channel: str, parts: list[bytes]) -> None:
        """Called by the AgentChannel for every Jupyter message the kernel sent."""
        try:
            i = parts.index(DELIM)
        except ValueError:
            log.warning("kernel %s: malformed %s message from guest dropped", self.name, channel)
            return
        if len(parts) < i + 6:
            log.warning("kernel %s: short %s message from guest dropped", self.name, channel)
            return
        parts[i + 1] = self.sign(parts[i + 2:i + 6])
        if self.on_activity:
            self.on_activity(channel, parts)
        sock = self.sockets.get(channel)
        if sock is None:
            return
        sock.send_multipart(parts, copy=False)
