"""The guest end of the host link: the virtio-serial port the agent talks over.

Only the standard library and guest.protocol: it runs on the guest's Python.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import glob
import os
import select
import signal
from typing import TYPE_CHECKING

from guest.protocol import PORT_NAME
from guest.system import log

if TYPE_CHECKING:
    from guest.agent import Agent

READ_SIZE = 1 << 20
#: bytes handed to one write(): Linux's virtio_console takes at most 32 KiB per write, so
#: offering more only made every write copy up to READ_SIZE bytes out of ``out`` (a 20 MB
#: output copied ~32 times over); a view of 64 KiB costs no copy and loses nothing
WRITE_SIZE = 64 << 10
#: pieces of the outgoing stream at least this big are written from a view of the
#: protocol's buffer (no copy); smaller ones are gathered into one buffer, so a burst of
#: small frames still leaves in few writes (each write is an exit to the VMM)
GATHER_BELOW = 64 << 10


def find_port() -> str:
    for name_file in glob.glob("/sys/class/virtio-ports/vport*/name"):
        with open(name_file) as f:
            if f.read().strip() == PORT_NAME:
                return "/dev/" + name_file.split("/")[-2]
    raise FileNotFoundError(f"no virtio-serial port named {PORT_NAME}")


class HostLink:
    """The guest end of the link over a virtio-serial port.

    While the host end is away the port reports HUP and reads return EOF; the kernel
    then signals SIGIO when the host comes back (we enable O_ASYNC only meanwhile).
    """

    def __init__(self, agent: Agent, path: str) -> None:
        self.agent = agent
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.loop = asyncio.get_running_loop()
        #: what is to be written, in order: views of big pieces, buffers of gathered small ones
        self.out: collections.deque[memoryview | bytearray] = collections.deque()
        self.connected = False
        self._writing = False

    def start(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        self.loop.add_signal_handler(signal.SIGIO, self._check_connected)
        self._check_connected()

    def _host_present(self) -> bool:
        p = select.poll()
        p.register(self.fd, select.POLLIN | select.POLLOUT)
        return not any(ev & select.POLLHUP for _, ev in p.poll(0))

    def _set_async(self, on: bool) -> None:
        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, (fl | os.O_ASYNC) if on else (fl & ~os.O_ASYNC))

    def _check_connected(self) -> None:
        if self.connected or not self._host_present():
            return
        self._set_async(False)
        self.connected = True
        self.agent.endpoint.connection_made()
        self.loop.add_reader(self.fd, self._on_readable)
        self.flush()

    def _lost(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self.out.clear()
        self.agent.endpoint.connection_lost()
        self._set_async(True)
        # the host may have come back before O_ASYNC was on: look once more, and
        # keep a slow fallback poll for as long as we are disconnected
        self.loop.call_soon(self._check_connected)
        self.loop.call_later(1.0, self._fallback_poll)

    def _fallback_poll(self) -> None:
        if not self.connected:
            self._check_connected()
            if not self.connected:
                self.loop.call_later(1.0, self._fallback_poll)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log("port read: %s", exc)
            data = b""
        if not data:
            self._lost()
            return
        self.agent.on_bytes(data)

    def flush(self) -> None:
        if not self.connected:
            return
        out = self.out
        for part in self.agent.endpoint.outgoing_parts():
            if len(part) >= GATHER_BELOW:
                out.append(memoryview(part))
            elif out and isinstance(out[-1], bytearray) and len(out[-1]) < GATHER_BELOW:
                out[-1] += part
            elif part:
                out.append(bytearray(part))
        if out and not self._writing:
            self._on_writable()

    def _on_writable(self) -> None:
        while self.out:
            head = self.out[0]
            view = memoryview(head)
            chunk = view[:WRITE_SIZE]
            try:
                n = os.write(self.fd, chunk)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ENODEV, errno.EIO):
                    chunk.release()
                    view.release()
                    self._lost()
                    return
                raise
            finally:
                chunk.release()
                view.release()
            if n == len(head):
                self.out.popleft()
            elif isinstance(head, bytearray):
                del head[:n]  # O(1) at the front of a bytearray
            else:
                self.out[0] = head[n:]
        if self.out and not self._writing:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writing = True
        elif not self.out and self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
            self.agent.on_drained()

