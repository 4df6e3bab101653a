"""The client distribution (``client/``, ``vmkg_client``) without VMs: what it says to a
gateway whose API version it does not know, its websocket frames against jupyter_server's,
the deprecated ``gateway.sdk*`` modules, and that it loads nothing of the server.

The gateway here is a tiny HTTP server on 127.0.0.1 (the client speaks plain HTTP to it,
as to ``vmkg serve``) answering ``GET /api`` with a chosen document; the live-gateway and
clean-venv tests are in ``test_client_venv.py`` and ``test_sdk.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from vmkg_client import sdk, sync
from vmkg_client.wire import decode_v1, encode_v1

REPO = Path(__file__).resolve().parents[1]
SERVER_PACKAGES = ["gateway", "kernelmanager", "guest", "jupyter_server", "jupyter_client", "tornado",
                   "zmq", "ipykernel", "traitlets"]


class FakeGateway:
    """Answers ``GET /api`` with ``api`` (a JSON document, or raw bytes) and every other
    path with ``[]``; records the paths asked for."""

    def __init__(self, api: Any, redirects: dict[str, str] | None = None) -> None:
        self.api = api
        self.redirects = redirects or {}
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.paths.append(self.path)
                if self.path in owner.redirects:
                    self.send_response(301)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.api if self.path == "/api" else b"[]"
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def future_gateway() -> Iterator[FakeGateway]:
    g = FakeGateway({"version": "9.0.0", "vmkg": "9.0.0", "vmkg_api": 99})
    yield g
    g.close()


def client_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "client")]), **extra}


# -- the API version --------------------------------------------------------------------------


async def test_an_unknown_api_version_is_refused_before_anything_else(future_gateway: FakeGateway) -> None:
    async with sdk.Gateway(future_gateway.url, "t") as gw:
        with pytest.raises(sdk.IncompatibleGateway) as exc:
            await gw.start_kernel("python3")
    assert isinstance(exc.value, sdk.SDKError)
    assert exc.value.api == 99 and exc.value.supported == sdk.API_VERSIONS
    message = str(exc.value)
    assert f"the gateway at {future_gateway.url} speaks vmkg API version 99 (vmkg 9.0.0)" in message
    assert "vmkg-client" in message and "speaks version 1" in message
    assert future_gateway.paths == ["/api"]  # no kernel was asked for
    with pytest.raises(sdk.IncompatibleGateway):  # the synchronous face says the same
        sync.Gateway(future_gateway.url, "t").list_kernels()


@pytest.mark.parametrize("command", [["-m", "vmkg_client"], ["-m", "gateway.app"]],
                         ids=["vmkg-client", "vmkg"])
def test_the_commands_exit_2_with_the_reason(future_gateway: FakeGateway, command: list[str]) -> None:
    run = subprocess.run([sys.executable, *command, "run", "--url", future_gateway.url, "1"],
                         capture_output=True, text=True, env=client_env(), timeout=60)
    assert run.returncode == 2, run.stderr
    assert "error: the gateway at" in run.stderr and "vmkg API version 99" in run.stderr
    assert "Traceback" not in run.stderr
    if command[1] == "gateway.app":
        return  # the same code as below (importing the server takes seconds: once is enough)
    fork = subprocess.run([sys.executable, *command, "fork", "--url", future_gateway.url,
                           "0000-kernel"], capture_output=True, text=True, env=client_env(), timeout=60)
    assert fork.returncode == 1 and "vmkg API version 99" in fork.stderr, fork.stderr
    assert all(p == "/api" for p in future_gateway.paths)


async def test_known_or_unannounced_versions_are_accepted() -> None:
    for api, info in (({"version": "2.14", "vmkg": "0.1.0", "vmkg_api": 1}, 1),
                      ({"version": "2.14"}, None)):  # a plain Jupyter (Kernel) Gateway
        g = FakeGateway(api)
        try:
            async with sdk.Gateway(g.url, "t") as gw:
                assert await gw.list_kernels() == []
                assert gw.api_info is not None and gw.api_info.get("vmkg_api") == info
                assert await gw.list_kernels() == []
            assert g.paths == ["/api", "/api/kernels", "/api/kernels"]  # checked once
        finally:
            g.close()


async def test_something_else_than_a_gateway_is_a_clear_error() -> None:
    cases = [(b"<html>hello</html>", sdk.SDKError, "did not answer a JSON object"),
             ([1], sdk.SDKError, "did not answer a JSON object"),
             ({"vmkg_api": True}, sdk.IncompatibleGateway, "speaks vmkg API version True"),
             ({"vmkg_api": "1"}, sdk.IncompatibleGateway, "speaks vmkg API version '1'")]
    for api, error, text in cases:
        g = FakeGateway(api)
        try:
            async with sdk.Gateway(g.url, "t") as gw:
                with pytest.raises(error) as exc:
                    await gw.list_kernels()
            assert text in str(exc.value), exc.value
        finally:
            g.close()


async def test_redirects_are_followed_within_the_gateway_only() -> None:
    g = FakeGateway({"vmkg_api": 1}, {"/api/old": "/api/kernels", "/api/away": "http://127.0.0.2:1/x",
                                      "/api/loop": "/api/loop"})
    try:
        async with sdk.Gateway(g.url, "t") as gw:
            assert await gw.request_json("GET", "/api/old") == []
            with pytest.raises(sdk.GatewayError, match="redirects off the gateway"):
                await gw.request("GET", "/api/away")
            with pytest.raises(sdk.GatewayError, match="more than 5 redirects"):
                await gw.request("GET", "/api/loop")
        assert g.paths[:3] == ["/api", "/api/old", "/api/kernels"]
        assert g.paths.count("/api/loop") == 6
    finally:
        g.close()


async def test_a_refused_upload_is_answered_before_its_body_is_sent() -> None:
    """``Expect: 100-continue``: the headers go first; a gateway that refuses at once (413)
    never receives the body; one that says 100 gets it."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"Content-Length: (\d+)", head)
        length = int(found.group(1)) if found else 0
        if b"/api" == head.split()[1]:
            answer = b'{"vmkg_api": 1}'
        elif b"big" in head.split()[1]:
            assert b"Expect: 100-continue" in head
            try:  # nothing may follow the headers
                received.append(await asyncio.wait_for(reader.read(1), 0.5))
            except asyncio.TimeoutError:
                pass
            answer = b'{"message": "too big"}'
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()
            writer.close()
            return
        else:
            if b"Expect: 100-continue" in head:
                writer.write(b"HTTP/1.1 100 (Continue)\r\n\r\n")
            received.append(await reader.readexactly(length))
            answer = b'{"size": %d}' % length
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with sdk.Gateway(url, "t") as gw:
            with pytest.raises(sdk.GatewayError) as exc:
                await gw.request("PUT", "/big", body=b"x" * (4 << 20), expect_continue=True)
            assert exc.value.status == 413 and exc.value.message == "too big"
            assert received == []  # the 4 MiB were never sent
            for expect in (True, False):
                assert await gw.request_json("PUT", "/ok", body=b"y" * 300_000,
                                             expect_continue=expect) == {"size": 300_000}
            assert received == [b"y" * 300_000] * 2
    finally:
        server.close()
        await server.wait_closed()


# -- websocket frames -------------------------------------------------------------------------


def test_v1_frames_match_jupyter_servers_and_malformed_ones_are_refused() -> None:
    from jupyter_server.services.kernels.connection.base import (
        deserialize_msg_from_ws_v1,
        serialize_msg_to_ws_v1,
    )

    for parts, channel in (([b'{"msg_id": "a"}', b"{}", b"{}", b'{"code": "1"}'], "shell"),
                           ([b"h", b"p", b"m", b"c", b"\x00buffer", b""], "iopub"),
                           ([b"", b"", b"", b""], "contrôle")):
        frame = encode_v1(parts, channel)
        assert frame == serialize_msg_to_ws_v1(parts, channel)
        assert decode_v1(frame) == (channel, parts)
        got_channel, got_parts = deserialize_msg_from_ws_v1(frame)
        assert (got_channel, list(got_parts)) == (channel, parts)
    good = encode_v1([b"h", b"p", b"m", b"c"], "shell")
    count = (1 << 40).to_bytes(8, "little")
    past_end = good[:48] + (len(good) + 1).to_bytes(8, "little") + good[56:]
    backwards = good[:16] + (5).to_bytes(8, "little") + good[24:]
    for bad in (b"", b"\x01", count + good[8:], good[:20], past_end, backwards):
        with pytest.raises(ValueError):
            decode_v1(bad)


# -- the deprecated modules, and what the client loads --------------------------------------------

OLD_IMPORTS = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from gateway import sdk, sdk_errors, sdk_sync, sdk_websocket
import vmkg_client
from vmkg_client import errors, sync, websocket
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught],
    "same": [sdk.Gateway is vmkg_client.Gateway, sdk_sync.Gateway is sync.Gateway,
             sdk.INTERRUPT_WAIT == vmkg_client.sdk.INTERRUPT_WAIT,
             sdk_errors.KernelGone is errors.KernelGone, sdk_sync.run is sync.run,
             sdk_websocket.KernelChannel is websocket.KernelChannel],
}))
"""


def test_the_old_gateway_sdk_modules_still_work_and_warn(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", OLD_IMPORTS], capture_output=True, text=True,
                         env=client_env(), cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert all(doc["same"]), doc["same"]
    got = {message.split(" ", 1)[0]: (category, message, filename)
           for category, message, filename in doc["warnings"]}
    assert set(got) == {"gateway.sdk", "gateway.sdk_errors", "gateway.sdk_sync", "gateway.sdk_websocket"}
    for old, (category, message, filename) in got.items():
        new = "vmkg_client." + {"sdk": "sdk", "sdk_errors": "errors", "sdk_sync": "sync",
                                "sdk_websocket": "websocket"}[old.split(".")[1]]
        assert category == "DeprecationWarning" and f"import {new} instead" in message
        assert filename == "<string>", filename  # the importing line, not importlib
    # Python's default filters show it to a script that imports the old name
    script = tmp_path / "agent.py"
    script.write_text("from gateway.sdk_sync import Gateway\n")
    shown = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env=client_env(), cwd=tmp_path, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"{script}:1: DeprecationWarning: gateway.sdk_sync is deprecated" in shown.stderr


def test_the_client_loads_nothing_of_the_server() -> None:
    code = ("import sys, json, vmkg_client, vmkg_client.sync, vmkg_client.cli\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(SERVER_PACKAGES)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=client_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []  # all of them are installed here, none is loaded


def test_the_client_is_type_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "vmkg_client"], cwd=REPO / "client",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
