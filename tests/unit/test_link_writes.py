"""The guest link's writer (``guest.link.HostLink``) without a VM: a FIFO stands in for the
virtio-serial port. What the protocol hands over as pieces (frame headers, views of big
payloads, many small frames) must come out whole and in order, through partial writes
and a full port, with small pieces gathered so they do not cost a write each."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from guest import link as link_mod
from guest.link import GATHER_BELOW, WRITE_SIZE, HostLink


class Endpoint:
    def __init__(self) -> None:
        self.parts: list[Any] = []

    def outgoing_parts(self) -> list[Any]:
        parts, self.parts = self.parts, []
        return parts


class Agent:
    def __init__(self) -> None:
        self.endpoint = Endpoint()
        self.drained = asyncio.Event()

    def on_drained(self) -> None:
        self.drained.set()


async def test_pieces_leave_whole_in_order_and_small_ones_gathered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    agent = Agent()
    link = HostLink(agent, str(fifo))  # type: ignore[arg-type]
    link.connected = True
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        n = real_write(fd, data)
        if fd == link.fd:
            writes.append(n)
        return n

    monkeypatch.setattr(link_mod.os, "write", counting_write)
    small = [f"small frame {i:05d};".encode() for i in range(3000)]  # ~60 KB in all
    big = bytes(range(256)) * (5 * (1 << 20) // 256)  # 5 MiB, handed over as views
    parts: list[Any] = [*small[:1500], memoryview(big)[: 3 << 20], b"hdr", memoryview(big)[3 << 20:], *small[1500:]]
    want = b"".join(bytes(p) for p in parts)

    got = bytearray()
    done = threading.Event()

    def drain() -> None:  # the host end, slower than the writer: the port fills up
        fd = os.open(fifo, os.O_RDONLY)
        try:
            while len(got) < len(want):
                chunk = os.read(fd, 16 << 10)
                if not chunk:
                    break
                got.extend(chunk)
        finally:
            os.close(fd)
            done.set()

    os.close(reader)
    # queued while the port is busy: big pieces stay views of the caller's bytes, small
    # ones are gathered into a few buffers
    link._writing = True
    agent.endpoint.parts = list(parts)
    link.flush()
    assert sum(len(p) for p in link.out) == len(want)
    views = [p for p in link.out if isinstance(p, memoryview)]
    assert len(views) == 2 and all(v.obj is big for v in views)
    gathered = [p for p in link.out if isinstance(p, bytearray)]
    assert len(gathered) <= 4 and all(len(g) < GATHER_BELOW + 32 for g in gathered)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    link._writing = False
    link._on_writable()
    await asyncio.wait_for(agent.drained.wait(), 60)
    await asyncio.to_thread(done.wait, 60)
    assert bytes(got) == want
    assert not link.out
    assert writes and max(writes) <= WRITE_SIZE
    os.close(link.fd)
