"""The host end of the host <-> guest link.

A ``Transport`` opens a byte stream to the guest agent: on QEMU, a connection to the
virtio-serial chardev's Unix socket; on Firecracker-style VMMs, the hybrid vsock Unix
socket (``CONNECT <port>\\n`` answered by ``OK <n>\\n``). ``AgentChannel`` runs the
reliable session of ``guest.protocol`` over it: Jupyter messages both ways, and
request/reply control operations (restore, signal, files, ...).

The stream can be torn down and reopened at any time (every restore does it; so can
:meth:`AgentChannel.reconnect`): unacknowledged messages are retransmitted and
duplicates dropped, so no Jupyter message is lost or delivered twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guest.protocol import (
    ControlMessage,
    Endpoint,
    JupyterMessage,
    ProtocolError,
    decode_message,
    encode_control,
    encode_jupyter,
)

from .exceptions import AgentError, ChannelError

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
HIGH_WATER = 8 << 20


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


class AgentChannel:
    """One reliable session with one guest agent.

    Callers: ``kernelmanager.vmkernel`` creates it after starting/restoring a VM; the
    relay sends Jupyter messages with :meth:`send_jupyter` and receives them through
    ``on_jupyter``. Unsolicited agent events (``kernel_exit``) go to ``on_event``.
    """

    def __init__(self, transport: Transport, session: str, *, name: str,
                 on_jupyter: JupyterHandler, on_event: EventHandler) -> None:
        self.transport = transport
        self.name = name
        self.endpoint = Endpoint(is_host=True, session=session)
        self.on_jupyter = on_jupyter
        self.on_event = on_event
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._established = asyncio.Event()
        self._window = asyncio.Event()
        self._window.set()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closed = False
        self.failure: BaseException | None = None
        self.lost = asyncio.Event()  # set when the stream broke and was not reopened by us

    # -- connection -----------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Open the stream and complete the handshake (the guest must be running)."""
        try:
            reader, writer = await asyncio.wait_for(self.transport.open(), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ChannelError(f"{self.name}: cannot reach the guest agent: {exc}") from exc
        self._writer = writer
        self._established.clear()
        self.lost.clear()
        self.endpoint.connection_made()
        self._reader_task = asyncio.ensure_future(self._read_loop(reader, writer))
        self._flush()
        try:
            await asyncio.wait_for(self._established.wait(), timeout)
        except asyncio.TimeoutError as exc:
            await self._drop_stream()
            if self.failure:
                raise ChannelError(f"{self.name}: {self.failure}") from self.failure
            raise ChannelError(f"{self.name}: guest agent did not answer the handshake in {timeout:.0f} s") from exc

    async def reconnect(self, timeout: float = 10.0) -> None:
        """Tear the stream down and open it again, as a restore does. Nothing is lost."""
        await self._drop_stream()
        await self.connect(timeout)

    async def _drop_stream(self) -> None:
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

    # -- I/O --------------------------------------------------------------------------

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                messages = self.endpoint.receive(data)
                if self.endpoint.established and not self._established.is_set():
                    self._established.set()
                for raw in messages:
                    self._dispatch(raw)
                self._flush()
                if self.endpoint.can_send:
                    self._window.set()
        except ProtocolError as exc:
            log.error("%s: protocol error: %s", self.name, exc)
            self.failure = exc
        except (ConnectionError, OSError) as exc:
            log.debug("%s: stream error: %s", self.name, exc)
        if self._writer is writer:
            self._writer = None
            writer.close()
            self.endpoint.connection_lost()
            self.lost.set()

    def _dispatch(self, raw: bytes) -> None:
        try:
            msg = decode_message(raw)
        except ProtocolError as exc:
            log.warning("%s: dropping malformed message from guest: %s", self.name, exc)
            return
        if isinstance(msg, JupyterMessage):
            self.on_jupyter(msg.channel, msg.parts)
            return
        body = msg.body
        rid = body.get("id")
        if rid is not None:
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                if body.get("ok"):
                    fut.set_result(body.get("result"))
                else:
                    fut.set_exception(AgentError(str(body.get("error")), body.get("kind")))
            return
        if "event" in body:
            self.on_event(body)

    def _flush(self) -> None:
        if self._writer is None:
            return
        data = self.endpoint.outgoing()
        if data:
            self._writer.write(data)

    @property
    def connected(self) -> bool:
        return self._writer is not None and self.endpoint.established

    async def _wait_window(self) -> None:
        while not self.endpoint.can_send:
            self._window.clear()
            await self._window.wait()
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
        self._flush()

    async def request(self, op: str, timeout: float | None = 30.0, **args: Any) -> Any:
        """Ask the agent to do ``op``; returns its result or raises AgentError/ChannelError."""
        if self._closed:
            raise ChannelError(f"{self.name}: channel closed")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self._wait_window()
        self.endpoint.send(encode_control({"op": op, "id": rid, **args}))
        self._flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as exc:
            raise ChannelError(f"{self.name}: agent did not answer {op!r} within {timeout} s") from exc
        finally:
            self._pending.pop(rid, None)


__all__ = ["AgentChannel", "Transport", "UnixSocketTransport", "HybridVsockTransport", "ControlMessage"]
