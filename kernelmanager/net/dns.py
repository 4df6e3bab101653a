"""The slot's DNS resolver: answers only allowed names, opens the firewall for their answers.

The guest's ``/etc/resolv.conf`` names the slot's gateway address; this resolver listens
there (its UDP socket is made inside the namespace, then served on the host's runtime
loop). A query (one question, at most 512 bytes) for a name no rule of the kernel's
policy matches is answered ``REFUSED`` at once (the guest's resolver then fails in
milliseconds, not after a timeout) and counted; an allowed ``A`` query is forwarded to
the operator's upstream resolver (``$VMKG_NET_DNS_UPSTREAM``, from the host's network
namespace), and before the answer goes back, every address in it is added to the
slot's ``dyn_*`` sets for its TTL (clamped to 30 s .. 1 h), on the ports the matching
rules name. ``AAAA`` queries get an empty answer (slots are IPv4 only). At most
``MAX_INFLIGHT`` forwarded queries per slot; an upstream that does not answer in
``UPSTREAM_TIMEOUT`` gets ``SERVFAIL``. The resolver remembers which name each opened
address was returned for, until it expires (``opened``, at most ``MAX_OPENED``
addresses), so a policy change keeps what was opened for names it still allows
(``still_open``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any

log = logging.getLogger(__name__)

MAX_QUERY = 512
MAX_INFLIGHT = 32
UPSTREAM_TIMEOUT = 3.0
TTL_MIN, TTL_MAX = 30, 3600
MAX_OPENED = 4096
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5
QTYPE_A, QTYPE_AAAA = 1, 28


class DNSFormatError(ValueError):
    pass


def _read_name(msg: bytes, off: int, depth: int = 0) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        if off >= len(msg) or depth > 16:
            raise DNSFormatError("truncated name")
        n = msg[off]
        if n == 0:
            return ".".join(labels), off + 1
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise DNSFormatError("truncated pointer")
            ptr = ((n & 0x3F) << 8) | msg[off + 1]
            rest, _ = _read_name(msg, ptr, depth + 1)
            return ".".join([*labels, rest] if rest else labels), off + 2
        if n > 63:
            raise DNSFormatError("bad label")
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "replace").lower())
        off += 1 + n


def parse_query(msg: bytes) -> tuple[int, str, int, int]:
    """``(id, name, qtype, end of question)`` of a one-question query."""
    if len(msg) < 12:
        raise DNSFormatError("short header")
    qid, flags, qd = struct.unpack("!HHH", msg[:6])
    if flags & 0x8000 or qd != 1:
        raise DNSFormatError("not a one-question query")
    name, off = _read_name(msg, 12)
    if off + 4 > len(msg):
        raise DNSFormatError("truncated question")
    qtype, _qclass = struct.unpack("!HH", msg[off:off + 4])
    return qid, name, qtype, off + 4


def answer_addresses(msg: bytes) -> list[tuple[str, int]]:
    """The A records (address, TTL) of a response."""
    if len(msg) < 12:
        return []
    qd, an = struct.unpack("!HH", msg[4:8])
    off = 12
    for _ in range(qd):
        _, off = _read_name(msg, off)
        off += 4
    out = []
    for _ in range(an):
        _, off = _read_name(msg, off)
        if off + 10 > len(msg):
            break
        rtype, _rclass, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        if rtype == QTYPE_A and rdlen == 4 and off + 4 <= len(msg):
            out.append((socket.inet_ntoa(msg[off:off + 4]), ttl))
        off += rdlen
    return out


def reply(query: bytes, qend: int, rcode: int) -> bytes:
    """An answerless response to ``query`` (its question echoed) with ``rcode``."""
    qid, flags = struct.unpack("!HH", query[:4])
    flags = 0x8000 | (flags & 0x0100) | 0x0080 | rcode  # QR, RD copied, RA
    return struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0) + query[12:qend]


class Resolver(asyncio.DatagramProtocol):
    """One slot's resolver. ``slot`` gives ``policy``, ``open_dynamic`` and ``kernel_id``."""

    def __init__(self, slot: Any, upstream: tuple[str, int]) -> None:
        self.slot = slot
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None
        self.inflight = 0
        self.refused = 0
        self.answered = 0
        self._last_log = 0.0
        self._suppressed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.opened: dict[str, dict[str, float]] = {}  # address -> {name: expiry (monotonic)}

    @classmethod
    async def start(cls, slot: Any, sock: socket.socket, upstream: tuple[str, int]) -> Resolver:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: cls(slot, upstream), sock=sock)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.transport is not None:
            self.transport.close()

    def _log_refused(self, name: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 10:
            extra = f" (and {self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning("kernel %s: DNS query for %r refused by its egress policy%s",
                        self.slot.kernel_id or "-", name, extra)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is None or len(data) > MAX_QUERY:
            return
        try:
            _qid, name, qtype, qend = parse_query(data)
        except DNSFormatError:
            return
        ports = self.slot.policy.name_ports(name)
        if ports is None:
            self.refused += 1
            self._log_refused(name)
            self.transport.sendto(reply(data, qend, REFUSED), addr)
            return
        if qtype != QTYPE_A:
            self.transport.sendto(reply(data, qend, NOERROR), addr)
            return
        if self.inflight >= MAX_INFLIGHT or not self.upstream[0]:
            self.transport.sendto(reply(data, qend, SERVFAIL), addr)
            return
        task = asyncio.ensure_future(self._forward(data, qend, ports, addr, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _remember(self, name: str, addrs: list[str], ttl: int) -> None:
        now = time.monotonic()
        if len(self.opened) >= MAX_OPENED:
            self.opened = {a: live for a, names in self.opened.items()
                           if (live := {n: t for n, t in names.items() if t > now})}
        for a in addrs:
            if a in self.opened or len(self.opened) < MAX_OPENED:
                self.opened.setdefault(a, {})[name] = now + ttl

    def still_open(self, policy: Any) -> list[tuple[str, list[int | None], int]]:
        """``(address, ports, seconds left)`` of what this resolver opened for names
        ``policy`` allows (the ports are ``policy``'s for those names)."""
        now, out = time.monotonic(), []
        for a, names in self.opened.items():
            ports: set[int | None] = set()
            left = 0.0
            for n, t in names.items():
                allowed = policy.name_ports(n) if t > now else None
                if allowed is not None:
                    ports.update(allowed)
                    left = max(left, t - now)
            if ports and left >= 1:
                out.append((a, sorted(ports, key=lambda p: -1 if p is None else p), int(left)))
        return out

    async def _forward(self, data: bytes, qend: int, ports: list[int | None], addr: tuple[str, int],
                       name: str = "") -> None:
        self.inflight += 1
        try:
            try:
                resp = await asyncio.wait_for(_ask(self.upstream, data), UPSTREAM_TIMEOUT)
                found = answer_addresses(resp)
            except (OSError, asyncio.TimeoutError, DNSFormatError) as exc:
                log.warning("kernel %s: upstream DNS %s:%d failed: %s", self.slot.kernel_id or "-",
                            *self.upstream, exc or type(exc).__name__)
                resp, found = reply(data, qend, SERVFAIL), []
            if found:
                ttl = max(TTL_MIN, min(TTL_MAX, max(t for _, t in found)))
                addrs = [a for a, _ in found]
                try:
                    await asyncio.to_thread(self.slot.open_dynamic, addrs, ports, ttl)
                except Exception as exc:  # noqa: BLE001 - an answer it could not reach is no answer
                    log.warning("kernel %s: cannot open the firewall for %r: %s",
                                self.slot.kernel_id or "-", name, exc)
                    resp = reply(data, qend, SERVFAIL)
                else:
                    self._remember(name, addrs, ttl)
            self.answered += 1
            if self.transport is not None:
                self.transport.sendto(resp, addr)
        finally:
            self.inflight -= 1


async def _ask(upstream: tuple[str, int], data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class Once(asyncio.DatagramProtocol):
        def datagram_received(self, d: bytes, a: tuple[str, int]) -> None:
            if not fut.done() and d[:2] == data[:2]:
                fut.set_result(d)

        def error_received(self, exc: Exception) -> None:
            if not fut.done():
                fut.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Once, remote_addr=upstream)
    try:
        transport.sendto(data)
        return await fut
    finally:
        transport.close()
