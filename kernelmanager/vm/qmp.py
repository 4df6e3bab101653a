"""A minimal asyncio QMP client over an already-connected stream socket.

QEMU gets the other end of a socketpair (``-chardev socket,fd=N``), so there is no
socket path to race on and nothing to clean up. The greeting and capability
negotiation happen lazily on the first command: a restore that never needs QMP
pays nothing for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)


class QMPError(Exception):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class QMPClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []

    async def _ensure(self) -> None:
        if self._writer is not None:
            return
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=1 << 24)
        greeting = await self._read()
        if "QMP" not in greeting:
            raise QMPError("greeting", {"class": "Protocol", "desc": str(greeting)})
        await self._command("qmp_capabilities", {})

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return json.loads(line)

    async def _command(self, name: str, args: dict[str, Any]) -> Any:
        assert self._writer is not None
        self._writer.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        await self._writer.drain()
        while True:
            msg = await self._read()
            if "event" in msg:
                self.events.append(msg)
                del self.events[:-100]
                continue
            if "error" in msg:
                raise QMPError(name, msg["error"])
            return msg.get("return")

    async def execute(self, name: str, **args: Any) -> Any:
        """Run one QMP command; raises QMPError or ConnectionError."""
        async with self._lock:
            await self._ensure()
            return await self._command(name, args)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
