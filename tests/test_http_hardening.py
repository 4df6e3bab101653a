"""The HTTP side of issue 9, and the relay hop: what a stranger reaching the gateway (or a
local user of its host) can make it do.

Fast tests (no VM) run gateways with ``--pool-size=0``, which start no kernel for the
requests they make: limits applied before authentication (body size -> 413 with the body
unread, a slow-header client closed by the header timeout, a connection cap answering
503), the Host check of ``--no-auth`` (DNS rebinding), the malformed client-chosen kernel
id, and the reaper removing a dead kernel's ipc sockets.

VM tests (marker ``vm``) share one gateway (the module's ``gw``, kernel-id websocket auth
at its default: off) and one kernel: an uploaded HTML file bigger than one transfer
chunk comes back as an attachment with a restrictive CSP; a token-less channels websocket
is refused with a message naming the setting (that it is accepted with the setting on is
``test_gateway.py::test_websocket_auth``, whose gateway turns it on); an id in use is
refused; the kernel's relay sockets are ipc files in a 0700 directory that another uid
cannot connect to, while the gateway's own websocket reaches the kernel through them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websockets
from gateway_helpers import Channels, Gateway

KERNEL = "python3-microvm"


@pytest.fixture(scope="module")
def gateway_options() -> tuple[list[str], dict[str, str]]:
    return ["--pool-size=0"], {}


# -- fast: a gateway that starts no VM ---------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("limited"), "--pool-size=0",
                env={"VMKG_MAX_BODY_SIZE": "1000", "VMKG_IDLE_CONNECTION_TIMEOUT": "1",
                     "VMKG_MAX_CONNECTIONS": "4"})
    try:
        yield g
    finally:
        g.stop_clean()


def _addr(g: Gateway) -> tuple[str, int]:
    host, port = g.url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _raw(g: Gateway, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; everything the gateway answers until it closes."""
    with socket.create_connection(_addr(g), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_body_over_the_limit_is_413_before_auth(limited: Gateway) -> None:
    # no token, a declared body of 2 MiB that is never sent: refused on the headers alone
    t0 = time.monotonic()
    out = _raw(limited, b"POST /api/kernels HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 2097152\r\n\r\n")
    assert time.monotonic() - t0 < 5
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), out[:200]
    assert "max_body_size" in json.loads(body)["message"]
    # under the limit the request goes on to authentication
    assert limited.request("POST", "/api/kernels", auth=False, json={}).status_code == 401
    # a chunked body past the limit is cut off too (tornado closes the connection)
    chunk = b"x" * 900
    out = _raw(limited, b"POST /api/kernels HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3 + b"0\r\n\r\n")
    assert not out.startswith(b"HTTP/1.1 2") and b" 401 " not in out.split(b"\r\n", 1)[0], out[:200]


def test_file_upload_keeps_its_own_limit(limited: Gateway) -> None:
    # 5 MiB is over max_body_size but under max_file_size: the files PUT is not refused for
    # its size, it reaches authentication (401) / the kernel lookup (404)
    kid = str(uuid.uuid4())
    head = (f"PUT /api/kernels/{kid}/files/a.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Length: 5242880\r\nExpect: 100-continue\r\n").encode()
    out = _raw(limited, head + b"\r\n")
    assert out.startswith(b"HTTP/1.1 401"), out[:200]
    with socket.create_connection(_addr(limited), timeout=10) as s:
        s.sendall(head + f"Authorization: token {limited.token}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 100"), "not invited to send the body"
    # over max_file_size (100 MiB by default): 413 from the files API
    r = limited.request("PUT", f"/api/kernels/{kid}/files/a.bin",
                        headers={"Content-Length": str(200 << 20), "Expect": "100-continue"}, data=b"")
    assert r.status_code in (404, 413), r.text


def test_slow_headers_are_cut_off(limited: Gateway) -> None:
    with socket.create_connection(_addr(limited), timeout=15) as s:
        s.sendall(b"GET /api HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed, without an answer
        assert time.monotonic() - t0 < 8  # idle_connection_timeout=1 (+ a loaded machine)


def test_connection_cap(limited: Gateway) -> None:
    held = [socket.create_connection(_addr(limited), timeout=10) for _ in range(4)]
    try:
        for s in held:
            s.sendall(b"GET /api HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # open, not finished
        time.sleep(0.3)
        t0 = time.monotonic()
        # answered on accept, before any request is read (a client that already sent one may
        # see the connection reset instead: refused either way)
        out = _raw(limited, b"")
        assert out.startswith(b"HTTP/1.1 503"), out[:200]
        assert time.monotonic() - t0 < 2
    finally:
        for s in held:
            s.close()
    # the held ones are gone: room again
    deadline = time.monotonic() + 10
    while True:
        try:
            r = limited.request("GET", "/api")
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert r.status_code == 200


def test_client_chosen_kernel_id_must_be_a_uuid(limited: Gateway) -> None:
    for bad in ("not-a-uuid", "../../x", 5, "a-b-c-d-e"):
        r = limited.request("POST", "/api/kernels", json={"kernel_id": bad})
        assert r.status_code == 400, r.text
        assert "UUID" in r.json()["message"]


def test_host_header_checked_without_auth(tmp_path: Path) -> None:
    g = Gateway(tmp_path, "--pool-size=0", "--no-auth", token="",
                env={"VMKG_ALLOWED_HOSTS": "gw.example"})
    try:
        port = _addr(g)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil"):
            r = g.request("GET", "/api", auth=False, headers={"Host": host})
            assert r.status_code == 403, (host, r.text)
            assert "DNS rebinding" in r.json()["message"]
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]:80", "gw.example:1"):
            assert g.request("GET", "/api", auth=False, headers={"Host": host}).status_code == 200, host
        # the channels websocket is checked too (before the kernel lookup)
        r = g.request("GET", f"/api/kernels/{uuid.uuid4()}/channels", auth=False,
                      headers={"Host": "evil.example", "Upgrade": "websocket", "Connection": "Upgrade",
                               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert r.status_code == 403, r.text
    finally:
        g.stop_clean()


def test_reaper_removes_a_dead_kernels_ipc_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelmanager import paths
    from kernelmanager.reaper import reap_orphans

    short = Path(tempfile.mkdtemp(prefix="vmkg-ipc-"))  # tmp_path is too long for sun_path
    monkeypatch.setenv("VMKG_STATE_DIR", str(short / "state"))
    kid = str(uuid.uuid4())
    base = paths.private_dir(paths.state_dir() / "ipc") / kid
    ports = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
    socks = []
    for port in ports.values():
        s = socket.socket(socket.AF_UNIX)
        s.bind(f"{base}-{port}")
        socks.append(s)
    for s in socks:
        s.close()  # a crashed relay leaves its socket files behind
    conn = tmp_path / f"kernel-{kid}.json"
    conn.write_text(json.dumps({**ports, "ip": str(base), "transport": "ipc", "key": "k"}))
    other = tmp_path / "elsewhere-1"  # a file outside the ipc directory is never touched
    other.write_text("keep")
    vm = paths.vms_dir() / "vm-1"
    vm.mkdir()
    (vm / "owner.json").write_text(json.dumps({"owner_pid": 2 ** 22 + 1, "owner_start": 1,
                                               "connection_file": str(conn)}))
    assert reap_orphans(paths.vms_dir()) == ["vm-1"]
    assert not list((paths.state_dir() / "ipc").iterdir())
    assert not conn.exists()
    # a connection file naming sockets outside the ipc directory removes nothing
    conn.write_text(json.dumps({"shell_port": 1, "ip": str(tmp_path / "elsewhere"), "transport": "ipc"}))
    vm.mkdir()
    (vm / "owner.json").write_text(json.dumps({"owner_pid": 2 ** 22 + 1, "owner_start": 1,
                                               "connection_file": str(conn)}))
    reap_orphans(paths.vms_dir())
    assert other.read_text() == "keep"
    shutil.rmtree(short)


# -- VM: one gateway (kernel-id websocket auth off, the default), one kernel --------------------


@pytest.fixture(scope="module")
def kernel(gw: Gateway) -> Iterator[str]:
    kid = gw.start_kernel(KERNEL)["id"]
    yield kid
    gw.delete_kernel(kid)
    # its relay's socket files went with it (ZMQ itself leaves them behind)
    gw.wait_for(lambda: not list((gw.state_dir / "ipc").glob(f"{kid}-*")), 30, "ipc files removed")


@pytest.mark.vm
def test_downloads_are_attachments(gw: Gateway, kernel: str) -> None:
    page = b"<html><script>fetch('/api/kernels?token='+location.search)</script></html>"
    big = page + b" " * (5 << 20)  # bigger than one transfer chunk (4 MiB): streamed
    for name, data in (("x.html", page), ("big.html", big), ("odd \"name\";.svg", page)):
        r = gw.request("PUT", f"/api/kernels/{kernel}/files/{requests.utils.quote(name)}", data=data)
        assert r.status_code == 201, r.text
        r = gw.request("GET", f"/api/kernels/{kernel}/files/{requests.utils.quote(name)}")
        assert r.status_code == 200 and r.content == data
        assert r.headers["Content-Type"] == "application/octet-stream", (name, r.headers)
        assert r.headers["Content-Disposition"].startswith("attachment; filename="), r.headers
        assert '";.svg' not in r.headers["Content-Disposition"].split(";", 2)[1]  # quoted safely
        assert r.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.vm
async def test_tokenless_websocket_refused_by_default(gw: Gateway, kernel: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as exc:
        await Channels.open(gw, kernel, auth=False)
    assert exc.value.response.status_code == 401
    message = json.loads(exc.value.response.body)["message"]
    assert "kernel_id_ws_auth" in message and "VMKG_KERNEL_ID_WS_AUTH" in message, message
    ch = await Channels.open(gw, kernel)  # with the token: fine
    assert (await ch.execute("1+1")).reply["status"] == "ok"
    await ch.close()


@pytest.mark.vm
def test_kernel_id_in_use_is_refused(gw: Gateway, kernel: str) -> None:
    r = gw.request("POST", "/api/kernels", json={"name": KERNEL, "kernel_id": kernel})
    assert r.status_code == 400 and "in use" in r.json()["message"], r.text


def _connection_info(gw: Gateway, kernel: str) -> dict[str, Any]:
    for owner in (gw.state_dir / "vms").glob("*/owner.json"):
        info = json.loads(owner.read_text())
        if info.get("kernel_id") == kernel and info.get("connection_file"):
            return dict(json.loads(Path(info["connection_file"]).read_text()))
    raise AssertionError(f"no connection file recorded for kernel {kernel}")


NOBODY_CONNECT = """
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except PermissionError:
        print("denied")
    else:
        print("connected")
"""


@pytest.mark.vm
async def test_relay_sockets_are_private_ipc(gw: Gateway, kernel: str) -> None:
    info = _connection_info(gw, kernel)
    assert info["transport"] == "ipc", info
    ipc_dir = Path(info["ip"]).parent
    assert ipc_dir == gw.state_dir / "ipc"
    st = os.lstat(ipc_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    names = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
    sockets = [f"{info['ip']}-{info[n]}" for n in names]
    assert all(stat.S_ISSOCK(os.lstat(p).st_mode) for p in sockets)
    # we (the gateway's uid) can connect; nobody (uid 65534) cannot
    out = await asyncio.to_thread(subprocess.run, ["/usr/bin/python3", "-c", NOBODY_CONNECT, *sockets],
                                  capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["connected"] * 5, out
    out = await asyncio.to_thread(subprocess.run, ["setpriv", "--reuid=65534", "--regid=65534",
                                                   "--clear-groups", "/usr/bin/python3", "-c", NOBODY_CONNECT,
                                                   *sockets],
                                  capture_output=True, text=True, timeout=30, cwd="/")
    assert out.stdout.split() == ["denied"] * 5, out
    # and the gateway itself talks to the kernel through them
    ch = await Channels.open(gw, kernel)
    assert (await ch.execute("print(6*7)")).stdout == "42\n"
    await ch.close()
