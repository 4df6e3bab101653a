"""A small asyncio HTTP/1.1 client on the standard library, for the SDK's REST calls.

The client must install without the server's stack (no tornado, no aiohttp), and
``urllib`` blocks a thread and cannot hold back a request body until the server agreed to
take it. So this module speaks just the HTTP the gateway's REST API needs, on
``asyncio.open_connection``:

- one connection per request (``Connection: close``): REST calls are few next to the
  websocket, which carries the traffic;
- ``Expect: 100-continue`` on request: the headers go first and the body only after the
  gateway's ``100 Continue``; a refusal (a 413 for a file over the limit, a 401) arrives
  without the body ever being sent;
- answers with ``Content-Length``, chunked, or delimited by the close; ``gzip`` decoded;
- bounded: at most ``MAX_HEAD`` bytes of status line and headers, at most
  ``max_body_size`` bytes of (decoded) body, else :class:`BodyTooLarge`.

Errors are left to the caller (``vmkg_client.sdk.Gateway.request`` maps them into the SDK's
tree): ``OSError`` (refused, reset, TLS), ``asyncio.TimeoutError``, :class:`ProtocolError`
(the peer does not speak HTTP/1.1 as expected, or closed mid-answer) and :class:`BodyTooLarge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
import zlib
from dataclasses import dataclass, field

#: bytes of status line plus headers an answer may have
MAX_HEAD = 64 << 10
#: interim (1xx) answers skipped before giving up
MAX_INTERIM = 10


class ProtocolError(Exception):
    """The answer is not well-formed HTTP/1.1, or the connection closed in its middle."""


class BodyTooLarge(Exception):
    """The answer's body is larger than the limit the caller set."""


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""


def ssl_context(validate_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if not validate_cert:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def fetch(url: str, method: str = "GET", *, headers: dict[str, str] | None = None,
                body: bytes | None = None, connect_timeout: float = 30.0,
                max_body_size: int = 1 << 30, expect_continue: bool = False,
                ssl_ctx: ssl.SSLContext | None = None, user_agent: str = "vmkg-client") -> Response:
    """One request, one answer. ``body`` None sends no body (and no Content-Length unless
    the method is POST/PUT/PATCH). The caller bounds the whole call's time."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    head = {"Host": host if parts.port is None else f"{host}:{port}", "User-Agent": user_agent,
            "Accept-Encoding": "gzip", "Connection": "close"}
    head.update(headers or {})
    if body is not None:
        head["Content-Length"] = str(len(body))
    expect_continue = expect_continue and bool(body)
    if expect_continue:
        head["Expect"] = "100-continue"
    for name, value in head.items():
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} contains a line break")
    request = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, port, limit=MAX_HEAD,
                                ssl=(ssl_ctx or ssl_context()) if tls else None,
                                server_hostname=parts.hostname if tls else None),
        connect_timeout)
    try:
        writer.write(request.encode("latin-1"))
        if body and not expect_continue:
            writer.write(body)
        await writer.drain()
        status, reason, resp_headers = await _read_head(reader)
        if expect_continue and status == 100:
            writer.write(body or b"")
            await writer.drain()
        interim = 0
        while 100 <= status < 200:
            interim += 1
            if interim > MAX_INTERIM:
                raise ProtocolError("too many interim (1xx) answers")
            status, reason, resp_headers = await _read_head(reader)
        data = await _read_body(reader, method, status, resp_headers, max_body_size)
        return Response(status, reason, resp_headers, data)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the connection closed before the answer was complete") from exc
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError(f"an answer line longer than {MAX_HEAD} bytes") from exc


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    line = await _read_line(reader)
    size = len(line)
    try:
        version, code, *rest = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        status = int(code)
    except ValueError:
        raise ProtocolError(f"not an HTTP status line: {line[:100]!r}") from None
    if not version.startswith("HTTP/1.") or not 100 <= status <= 999:
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:100]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await _read_line(reader)
        size += len(line)
        if size > MAX_HEAD:
            raise ProtocolError(f"the answer's headers exceed {MAX_HEAD} bytes")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep:
            raise ProtocolError(f"a malformed header line: {text[:100]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return status, (rest[0] if rest else ""), headers


async def _read_body(reader: asyncio.StreamReader, method: str, status: int,
                     headers: dict[str, str], limit: int) -> bytes:
    if method == "HEAD" or status in (204, 304):
        return b""
    gzip = headers.get("content-encoding", "").strip().lower() == "gzip"
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
    out = bytearray()

    def take(chunk: bytes) -> None:
        if decoder is not None:
            chunk = decoder.decompress(chunk, limit + 1 - len(out))
        out.extend(chunk)
        if len(out) > limit:
            raise BodyTooLarge(f"the answer is larger than {limit} bytes")

    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await _read_line(reader)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"a malformed chunk size: {size_line[:40]!r}") from None
                if size == 0:
                    while (await _read_line(reader)).strip():  # trailers
                        pass
                    break
                if decoder is None and len(out) + size > limit:
                    raise BodyTooLarge(f"the answer is larger than {limit} bytes")
                take(await reader.readexactly(size))
                await reader.readexactly(2)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise ProtocolError(f"a malformed Content-Length: {headers['content-length']!r}") from None
            if length < 0:
                raise ProtocolError(f"a negative Content-Length: {length}")
            if decoder is None and length > limit:
                raise BodyTooLarge(f"the answer has {length} bytes, more than the limit of {limit}")
            remaining = length
            while remaining:
                chunk = await reader.readexactly(min(remaining, 1 << 20))
                remaining -= len(chunk)
                take(chunk)
        else:
            while chunk := await reader.read(1 << 20):
                take(chunk)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the connection closed before the answer was complete") from exc
    if decoder is not None:
        take(decoder.flush())
    return bytes(out)
