"""``vmkg serve`` with real VMs, through the clients people use: raw REST, websockets with
the v1 subprotocol and the legacy protocol, jupyter_server in gateway mode (JupyterLab's
path) and nbclient through GatewayKernelManager.

One gateway serves this module (warm pool of 1, CORS and env allow-lists configured, a
1 MiB websocket frame limit); its teardown is a SIGTERM that must leave no QEMU behind.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websockets
from gateway_helpers import TOKEN, Channels, Gateway

pytestmark = pytest.mark.vm
KERNEL = "python3-microvm"
ORIGIN = "https://lab.example.org"


@pytest.fixture(scope="module")
def gateway_options() -> tuple[list[str], dict[str, str]]:
    return ["--pool-size=1"], {
        "VMKG_ALLOW_ORIGIN": ORIGIN, "VMKG_ALLOW_METHODS": "GET,POST,DELETE,OPTIONS",
        "VMKG_ALLOW_HEADERS": "Authorization,Content-Type", "VMKG_MAX_AGE": "600",
        "VMKG_ENV_ALLOWLIST": "MY_ALLOWED", "VMKG_ENV_PROCESS_ALLOWLIST": "VMKG_TEST_PROC_VAR",
        "VMKG_TEST_PROC_VAR": "from-the-gateway", "VMKG_TEST_NOT_ALLOWED": "secret",
        "VMKG_MAX_MESSAGE_SIZE": str(1024 * 1024),
        # nbclient through GatewayKernelManager opens the channels websocket with no
        # credential (jupyter_server's GatewayKernelClient): the allowance is off by default
        "VMKG_KERNEL_ID_WS_AUTH": "1"}


@pytest.fixture
def kernel(gw: Gateway) -> Iterator[str]:
    model = gw.start_kernel()
    yield model["id"]
    gw.delete_kernel(model["id"])


# -- REST basics, kernelspecs, auth, CORS -------------------------------------------------------


def test_api_and_one_kernelspec_per_template(gw: Gateway, template: Any) -> None:
    assert gw.request("GET", "/api").json()["version"]
    specs = gw.request("GET", "/api/kernelspecs").json()
    assert specs["default"] == KERNEL
    assert sorted(specs["kernelspecs"]) == [KERNEL, "python3-net-microvm"]  # the host's local python3 is not offered
    spec = specs["kernelspecs"][KERNEL]
    assert spec["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"] == "microvm"
    assert "logo-64x64" in spec["resources"]
    assert gw.request("GET", f"/api/kernelspecs/{KERNEL}").json()["name"] == KERNEL
    r = gw.request("GET", "/api/kernelspecs/nope")
    assert r.status_code == 404 and "nope" in r.json()["message"]
    logo = gw.request("GET", spec["resources"]["logo-64x64"])
    assert logo.status_code == 200 and logo.content.startswith(b"\x89PNG")


def raw_get(gw: Gateway, path: str) -> tuple[int, dict[str, Any]]:
    """A GET whose path is sent exactly as given (no client-side '..' normalisation)."""
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=gw.headers())
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, json.loads(body) if body else {}


@pytest.mark.parametrize("path", [
    f"/kernelspecs/{KERNEL}/../../../../etc/passwd",
    f"/kernelspecs/{KERNEL}/%2e%2e/%2e%2e/etc/passwd",
    f"/kernelspecs/{KERNEL}/..%2f..%2fetc%2fpasswd",
    f"/kernelspecs/{KERNEL}/",
])
def test_kernelspec_resource_paths_outside_the_spec_are_refused(gw: Gateway, path: str) -> None:
    status, body = raw_get(gw, path)
    assert status in (400, 404), (status, body)
    assert "root:" not in json.dumps(body)
    assert body["message"]


def test_auth_is_required_and_three_forms_are_accepted(gw: Gateway) -> None:
    r = gw.request("GET", "/api/kernels", auth=False)
    assert r.status_code == 401
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["reason"] == "Unauthorized" and "Authorization: token" in r.json()["message"]
    for path in ("/api", "/api/kernelspecs", "/metrics", "/api/kernels/00000000-0000-0000-0000-000000000000",
                 "/no/such/thing"):
        assert gw.request("GET", path, auth=False).status_code == 401, path
    r = gw.request("POST", "/api/kernels", auth=False, json={})
    assert r.status_code == 401
    r = gw.request("GET", "/api/kernels", token="wrong")
    assert r.status_code == 401 and r.json()["message"] == "Invalid token"
    assert gw.request("GET", "/api/kernels", headers={"Authorization": "Bearer wrong"}, auth=False).status_code == 401
    assert gw.request("GET", "/api/kernels?token=wrong", auth=False).status_code == 401
    # the three accepted forms
    assert gw.request("GET", "/api/kernels", auth=False,
                      headers={"Authorization": f"token {TOKEN}"}).status_code == 200
    assert gw.request("GET", "/api/kernels", auth=False,
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert gw.request("GET", f"/api/kernels?token={TOKEN}", auth=False).status_code == 200


async def test_websocket_auth(gw: Gateway, kernel: str) -> None:
    unknown = str(uuid.uuid4())
    for kid, kwargs in ((unknown, {"auth": False}), (kernel, {"token": "wrong"}), (unknown, {"token": "wrong"})):
        with pytest.raises(websockets.InvalidStatus) as exc:
            await Channels.open(gw, kid, **kwargs)
        assert exc.value.response.status_code == 401
        assert json.loads(exc.value.response.body)["reason"] == "Unauthorized"
    with pytest.raises(websockets.InvalidStatus) as exc:
        await Channels.open(gw, unknown)  # the right token, an unknown kernel
    assert exc.value.response.status_code == 404
    # ?token= works for websockets too
    ws = await websockets.connect(f"{gw.ws_url}/api/kernels/{kernel}/channels?token={TOKEN}")
    await ws.close()
    # no credential at all: the kernel id stands in (GatewayKernelClient sends none)
    ch = await Channels.open(gw, kernel, auth=False)
    assert (await ch.execute("1+1")).reply["status"] == "ok"
    await ch.close()


def test_cors_headers_as_kernel_gateway_has_them(gw: Gateway) -> None:
    r = gw.request("GET", "/api/kernelspecs", headers={"Origin": ORIGIN})
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert r.headers["Access-Control-Allow-Methods"] == "GET,POST,DELETE,OPTIONS"
    assert r.headers["Access-Control-Allow-Headers"] == "Authorization,Content-Type"
    assert r.headers["Access-Control-Max-Age"] == "600"
    # a preflight carries no credentials and must still be answered
    pre = requests.options(gw.url + "/api/kernels", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == ORIGIN


# -- kernels: pool, env, models ----------------------------------------------------------------


async def test_post_is_answered_from_the_warm_pool_and_env_still_arrives(gw: Gateway) -> None:
    gw.wait_pool(1)
    before = gw.metric("vmkg_kernel_create_seconds_count", source="pool")
    t0 = time.monotonic()
    model = gw.start_kernel(env={"KERNEL_USERNAME": "alice", "KERNEL_WORKING_DIR": "work/sub",
                                 "MY_ALLOWED": "yes", "NOT_ALLOWED": "no"})
    took = time.monotonic() - t0
    kid = model["id"]
    try:
        assert model["vmkg"]["source"] == "pool"
        assert gw.metric("vmkg_kernel_create_seconds_count", source="pool") == before + 1
        assert took < 5, took
        # the model jupyter_server's GatewayClient parses
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        time.strptime(model["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert model["name"] == KERNEL
        assert any(k["id"] == kid for k in gw.request("GET", "/api/kernels").json())
        ch = await Channels.open(gw, kid)
        r = await ch.execute("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
                             "['KERNEL_USERNAME', 'KERNEL_WORKING_DIR', 'MY_ALLOWED', 'NOT_ALLOWED', "
                             "'VMKG_TEST_PROC_VAR', 'VMKG_TEST_NOT_ALLOWED', 'VMKG_AUTH_TOKEN']}))")
        assert r.reply["execution_count"] == 1  # the pool's warm-up left no trace in the history
        env = json.loads(r.stdout)
        assert env == {"KERNEL_USERNAME": "alice", "KERNEL_WORKING_DIR": "work/sub", "MY_ALLOWED": "yes",
                       "NOT_ALLOWED": None, "VMKG_TEST_PROC_VAR": "from-the-gateway",
                       "VMKG_TEST_NOT_ALLOWED": None, "VMKG_AUTH_TOKEN": None}
        assert await ch.value("__import__('os').getcwd()") == "/home/jovyan/work/sub"
        # a restart keeps the request's env
        r2 = gw.request("POST", f"/api/kernels/{kid}/restart")
        assert r2.status_code == 200, r2.text
        await ch.close()
        ch = await Channels.open(gw, kid)
        assert await ch.value("__import__('os').environ.get('KERNEL_USERNAME')") == "alice"
        await ch.close()
    finally:
        gw.delete_kernel(kid)
    gw.wait_pool(1)  # refilled in the background


def test_kernel_lifecycle_over_rest(gw: Gateway) -> None:
    model = gw.start_kernel(name=None)  # the default kernel name
    kid = model["id"]
    assert model["name"] == KERNEL
    assert gw.request("GET", f"/api/kernels/{kid}").json()["id"] == kid
    assert gw.request("POST", f"/api/kernels/{kid}/interrupt").status_code == 204
    assert gw.request("DELETE", f"/api/kernels/{kid}").status_code == 204
    r = gw.request("GET", f"/api/kernels/{kid}")
    assert r.status_code == 404 and kid in r.json()["message"]
    assert all(k["id"] != kid for k in gw.request("GET", "/api/kernels").json())


# -- websocket protocols -----------------------------------------------------------------------


ECHO_TARGET = textwrap.dedent("""
    def _echo(comm, open_msg):
        @comm.on_msg
        def _(msg):
            comm.send({"echo": msg["content"]["data"]}, buffers=msg["buffers"])
    get_ipython().kernel.comm_manager.register_target("echo", _echo)
""")


async def test_v1_subprotocol_carries_binary_buffers_intact(gw: Gateway, kernel: str) -> None:
    ch = await Channels.open(gw, kernel, v1=True)
    assert ch.ws.subprotocol == "v1.kernel.websocket.jupyter.org"
    assert (await ch.execute(ECHO_TARGET)).reply["status"] == "ok"
    comm_id = uuid.uuid4().hex
    await ch.send("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
    blobs = [bytes(range(256)) * 4, os.urandom(300_000), b""]
    msg_id = await ch.send("comm_msg", {"comm_id": comm_id, "data": {"n": 3}}, buffers=blobs)
    while True:
        m = await ch.recv(60)
        if m.msg_type == "comm_msg" and m.parent.get("msg_id") == msg_id:
            break
    assert m.content["data"] == {"echo": {"n": 3}}
    assert m.buffers == blobs
    # and from the kernel on its own: a display with a binary buffer
    r = await ch.execute("from ipykernel.comm import Comm\n"
                         "c = Comm(target_name='x', data={'k': 1}, buffers=[bytes(range(256))])")
    opened = [m for m in r.messages if m.msg_type == "comm_open"]
    assert opened and opened[0].buffers == [bytes(range(256))]
    await ch.close()


async def test_legacy_protocol_when_no_subprotocol_is_offered(gw: Gateway, kernel: str) -> None:
    ch = await Channels.open(gw, kernel, v1=False)
    assert ch.ws.subprotocol is None
    frame = None
    msg_id = await ch.send("execute_request", {"code": "print('hi')", "silent": False})
    frame = await asyncio.wait_for(ch.ws.recv(), 60)
    assert isinstance(frame, str) and "channel" in json.loads(frame)
    r = await ch.collect(msg_id)
    assert r.reply["status"] == "ok"
    await ch.close()


# -- interrupt, restart, reconnect ---------------------------------------------------------------


async def test_interrupt_keeps_state_and_restart_clears_it(gw: Gateway, kernel: str) -> None:
    ch = await Channels.open(gw, kernel)
    assert (await ch.execute("x = 42")).reply["status"] == "ok"
    msg_id = await ch.send("execute_request", {"code": "import time\nwhile True: time.sleep(0.01)",
                                               "silent": False})
    await asyncio.sleep(1.0)
    assert gw.request("POST", f"/api/kernels/{kernel}/interrupt").status_code == 204
    r = await ch.collect(msg_id, 60)
    assert r.reply["status"] == "error" and r.reply["ename"] == "KeyboardInterrupt"
    await asyncio.sleep(0.5)
    assert await ch.value("x") == 42
    # restart: the open websocket hears "starting" as from a local kernel (never "restarting",
    # which JupyterLab reads as a crash); the answer comes once kernel_info is answered
    restart = asyncio.ensure_future(asyncio.to_thread(gw.request, "POST", f"/api/kernels/{kernel}/restart"))
    states = []
    deadline = time.monotonic() + 120
    # until the restart answered and "starting" came: the answer (HTTP) can overtake the
    # status (iopub, through the websocket), so stopping at the first status after the
    # answer raced (a busy/idle of the shutdown came first once in CI)
    while (not restart.done() or "starting" not in states) and time.monotonic() < deadline:
        try:
            m = await ch.recv(1)
        except asyncio.TimeoutError:
            continue
        if m.msg_type == "status":
            states.append(m.content["execution_state"])
    r = await restart
    assert r.status_code == 200 and r.json()["id"] == kernel
    assert "starting" in states and "restarting" not in states
    msg_id = await ch.send("kernel_info_request", {})
    t0 = time.monotonic()
    while True:
        m = await ch.recv(30)
        if m.channel == "shell" and m.parent.get("msg_id") == msg_id:
            break
    assert time.monotonic() - t0 < 5  # the restarted kernel was already answering
    r2 = await ch.execute("x")
    assert r2.reply["status"] == "error" and r2.reply["ename"] == "NameError"
    await ch.close()


async def test_reconnect_with_the_same_session_replays_what_was_missed(gw: Gateway, kernel: str) -> None:
    session = uuid.uuid4().hex
    ch = await Channels.open(gw, kernel, session=session)
    n = 60
    msg_id = await ch.send("execute_request", {
        "code": f"import time\nfor i in range({n}):\n    print(f'line {{i}}', flush=True)\n    time.sleep(0.05)",
        "silent": False})
    # the text, not each message's lines: ipykernel may flush between print's text and its
    # newline, so one stream message can end mid-line (split per message: a stray '')
    text = ""
    while text.count("\n") < 5:
        m = await ch.recv(60)
        if m.msg_type == "stream" and m.parent.get("msg_id") == msg_id:
            text += m.content["text"]
    await ch.close()  # away mid-output
    await asyncio.sleep(2.0)
    ch = await Channels.open(gw, kernel, session=session)
    r = await ch.collect(msg_id, 60)
    lines = (text + r.stdout).splitlines()
    assert lines == [f"line {i}" for i in range(n)], lines
    assert r.reply["status"] == "ok"
    await ch.close()


async def test_large_output_is_delivered_whole_to_a_slow_client(gw: Gateway, kernel: str) -> None:
    size = 20 * 1024 * 1024
    pauses = gw.metric("vmkg_websocket_backpressure_pauses_total")
    ch = await Channels.open(gw, kernel, v1=False)  # the legacy JSON protocol, like GatewayClient
    msg_id = await ch.send("execute_request", {"code": f"print('x' * {size}, end='')", "silent": False})
    await asyncio.sleep(3)  # a client that does not read for a while
    got = 0
    largest = 0
    deadline = time.monotonic() + 300
    done = reply = False
    while not (done and reply):
        frame = await asyncio.wait_for(ch.ws.recv(), max(1, deadline - time.monotonic()))
        largest = max(largest, len(frame))
        m = ch.decode(frame)
        if m.parent.get("msg_id") != msg_id:
            continue
        if m.msg_type == "stream":
            got += len(m.content["text"])
            await asyncio.sleep(0.02)  # and reads slowly
        elif m.msg_type == "status" and m.content["execution_state"] == "idle":
            done = True
        elif m.channel == "shell":
            reply = True
    assert got == size
    assert largest < 2 * 1024 * 1024  # split for clients with a 10 MiB frame limit
    assert gw.metric("vmkg_websocket_backpressure_pauses_total") > pauses
    await ch.close()


# -- bad input -------------------------------------------------------------------------------------


def test_bad_rest_input_gets_clear_errors(gw: Gateway) -> None:
    r = gw.request("POST", "/api/kernels", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "Invalid JSON" in r.json()["message"]
    r = gw.request("POST", "/api/kernels", json=["a list"])
    assert r.status_code == 400 and "JSON object" in r.json()["message"]
    r = gw.request("POST", "/api/kernels", json={"name": 3})
    assert r.status_code == 400 and "'name'" in r.json()["message"]
    r = gw.request("POST", "/api/kernels", json={"env": ["KERNEL_USERNAME"]})
    assert r.status_code == 400 and "'env'" in r.json()["message"]
    r = gw.request("POST", "/api/kernels", json={"env": {"KERNEL_X": {"nested": 1}}})
    assert r.status_code == 400
    r = gw.request("POST", "/api/kernels", json={"name": "no-such-kernel"})
    assert r.status_code == 404 and "no-such-kernel" in r.json()["message"]
    unknown = str(uuid.uuid4())
    for method, path in (("GET", f"/api/kernels/{unknown}"), ("DELETE", f"/api/kernels/{unknown}"),
                         ("POST", f"/api/kernels/{unknown}/interrupt"),
                         ("POST", f"/api/kernels/{unknown}/restart")):
        r = gw.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert unknown in r.json()["message"]
    r = gw.request("GET", "/api/kernels/not-a-kernel-id")
    assert r.status_code == 404 and r.json()["message"]


async def expect_close(ch: Channels, code: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    with pytest.raises(websockets.ConnectionClosed) as exc:
        while time.monotonic() < deadline:
            await asyncio.wait_for(ch.ws.recv(), deadline - time.monotonic())
    assert exc.value.rcvd is not None and exc.value.rcvd.code == code, exc.value
    return str(exc.value.rcvd.reason)


async def test_bad_frames_close_only_their_websocket(gw: Gateway, kernel: str) -> None:
    other = gw.start_kernel()["id"]
    try:
        bystander = await Channels.open(gw, other)
        cases: list[tuple[bool, Any, int, str]] = [
            (False, "{not json", 1007, "JSON"),
            (False, json.dumps({"channel": "shell", "content": {}}), 1007, "header"),
            (False, json.dumps({"channel": "bogus", "header": {"msg_type": "execute_request"},
                                "parent_header": {}, "metadata": {}, "content": {}}), 1007, "bogus"),
            (False, json.dumps({"channel": "iopub", "header": {"msg_type": "stream"},
                                "parent_header": {}, "metadata": {}, "content": {}}), 1007, "iopub"),
            (True, b"\x01\x02garbage", 1007, "v1"),
            (True, "text on v1", 1007, "binary"),
            (False, "x" * (2 * 1024 * 1024), 1009, ""),
        ]
        for v1, frame, code, words in cases:
            ch = await Channels.open(gw, kernel, v1=v1)
            try:
                await ch.ws.send(frame)
            except websockets.exceptions.ConnectionClosed as exc:
                # an oversized frame may be refused before the client has finished sending it
                assert exc.rcvd is not None and exc.rcvd.code == code, exc
                continue
            reason = await expect_close(ch, code)
            assert words in reason, (reason, words)
        ch = await Channels.open(gw, kernel, v1=True)
        m = {"header": {"msg_id": "1", "msg_type": "execute_request"}, "parent_header": {},
             "metadata": {}, "content": {}}
        await ch.ws.send(ch.encode(m, "bogus"))  # type: ignore[arg-type]
        assert "bogus" in await expect_close(ch, 1007)
        # the same kernel takes a new websocket, and the other kernel never noticed
        ch = await Channels.open(gw, kernel)
        assert (await ch.execute("1+1")).reply["status"] == "ok"
        await ch.close()
        assert (await bystander.execute("2+2")).reply["status"] == "ok"
        await bystander.close()
    finally:
        gw.delete_kernel(other)
    assert gw.metric("vmkg_websocket_frames_rejected_total") >= 7


# -- operations ----------------------------------------------------------------------------------


def test_metrics(gw: Gateway, kernel: str) -> None:
    text = gw.metrics()
    for name in ("vmkg_kernels{", "vmkg_kernel_create_seconds_bucket", "vmkg_vm_restore_seconds_bucket",
                 'vmkg_vm_memory_bytes{kind="private"}', "vmkg_vms ", "http_request_duration_seconds"):
        assert name in text, name
    assert gw.metric("vmkg_kernels", state="idle") >= 1
    assert gw.metric("vmkg_vm_memory_bytes", kind="rss") > 50e6
    assert gw.metric("vmkg_vm_restore_seconds_count") >= 1


def test_logs_name_the_kernel(gw: Gateway, kernel: str) -> None:
    assert re.search(rf"kernel {kernel}: started for a client from (pool|restore)", gw.log())


# -- the clients people use ------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def jupyter_server(gw: Gateway, tmp_path: Path) -> Iterator[str]:
    """jupyter_server in gateway mode pointing at our gateway, as JupyterLab runs it."""
    port = free_port()
    log = open(tmp_path / "jupyter-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--gateway-url={gw.url}",
         f"--GatewayClient.auth_token={gw.token}", "--GatewayClient.request_timeout=60",
         "--IdentityProvider.token=js-token", "--allow-root", f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
         "--ServerApp.port_retries=0", "--no-browser", f"--ServerApp.root_dir={tmp_path}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "JUPYTER_PATH": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url + "/api", timeout=5).ok:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "jupyter-server.log").read_text()
        time.sleep(0.3)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def test_jupyter_server_in_gateway_mode(gw: Gateway, jupyter_server: str) -> None:
    """JupyterLab's real path: its server's own REST API and websocket, forwarded to us."""
    url, h = jupyter_server, {"Authorization": "token js-token"}

    def js(method: str, path: str, **kwargs: Any) -> Any:
        return asyncio.to_thread(requests.request, method, url + path, headers=h, timeout=120, **kwargs)

    specs = (await js("GET", "/api/kernelspecs")).json()
    assert KERNEL in specs["kernelspecs"]
    r = await js("POST", "/api/kernels", json={"name": KERNEL})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    assert any(k["id"] == kid for k in gw.request("GET", "/api/kernels").json())  # it is ours
    ws_url = url.replace("http", "ws") + f"/api/kernels/{kid}/channels?session_id={uuid.uuid4().hex}"
    ws = await websockets.connect(ws_url, additional_headers=h, max_size=None)
    ch = Channels(ws, uuid.uuid4().hex)
    try:
        r1 = await ch.execute("x = 7\nimport platform; print(platform.release())")
        assert r1.reply["status"] == "ok" and r1.stdout.strip() != os.uname().release
        msg_id = await ch.send("execute_request", {"code": "import time; time.sleep(60)", "silent": False})
        await asyncio.sleep(1.0)
        ir = await js("POST", f"/api/kernels/{kid}/interrupt")
        assert ir.status_code == 204
        r2 = await ch.collect(msg_id, 60)
        assert r2.reply["ename"] == "KeyboardInterrupt"
        await asyncio.sleep(0.5)
        assert await ch.value("x") == 7
        rr = await js("POST", f"/api/kernels/{kid}/restart")
        assert rr.status_code == 200, rr.text
        await asyncio.sleep(0.5)
        r3 = await ch.execute("x")
        assert r3.reply["status"] == "error" and r3.reply["ename"] == "NameError"  # gone after restart
        listed = (await js("GET", "/api/kernels")).json()
        assert [k["id"] for k in listed] == [kid]
        assert listed[0]["execution_state"] in ("idle", "busy")
    finally:
        await ws.close()
        d = await js("DELETE", f"/api/kernels/{kid}")
        assert d.status_code == 204
    assert all(k["id"] != kid for k in gw.request("GET", "/api/kernels").json())


def test_nbclient_through_gateway_kernel_manager(gw: Gateway, tmp_path: Path, template: Any) -> None:
    script = textwrap.dedent(f"""
        import json, nbformat, nbclient
        from nbformat.v4 import new_code_cell, new_notebook
        from jupyter_server.gateway.managers import GatewayKernelManager
        nb = new_notebook(cells=[new_code_cell("import platform\\nprint(platform.release())"),
                                 new_code_cell("sum(range(10))")])
        client = nbclient.NotebookClient(nb, kernel_name={KERNEL!r}, timeout=120,
                                         kernel_manager_class=GatewayKernelManager)
        client.execute(kernel_name={KERNEL!r})  # GatewayKernelManager ignores NotebookClient's
        print(json.dumps([c.outputs for c in nb.cells]))
    """)
    env = {**os.environ, "JUPYTER_GATEWAY_URL": gw.url, "JUPYTER_GATEWAY_AUTH_TOKEN": gw.token}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    outputs = json.loads(p.stdout.strip().splitlines()[-1])
    assert outputs[0][0]["text"].strip() == template.info["kernel_release"]
    assert outputs[1][0]["data"]["text/plain"] == "45"


async def test_delete_stops_an_unwatched_vm_at_once_and_shuts_a_watched_kernel_down(gw: Gateway) -> None:
    """Nobody connected: DELETE stops the VM without asking ipykernel to exit (nobody would
    see its shutdown messages, and the VM is discarded whole). A connected client: ipykernel
    shuts down as in Jupyter (``test_jupyter_semantics`` checks what the client sees)."""
    exited = "kernel {}: kernel process exited in the guest"
    unwatched, watched = gw.start_kernel()["id"], gw.start_kernel()["id"]
    for kid in (unwatched, watched):
        ch = await Channels.open(gw, kid)
        assert (await ch.execute("x = 1")).reply["status"] == "ok"
        if kid == unwatched:
            await ch.close()
            gw.wait_for(lambda: gw.request("GET", f"/api/kernels/{unwatched}").json()["connections"] == 0,
                        what="the websocket's close")
        else:
            kept = ch
    try:
        for kid in (unwatched, watched):
            assert gw.request("DELETE", f"/api/kernels/{kid}").status_code == 204
            assert gw.request("GET", f"/api/kernels/{kid}").status_code == 404
        log = gw.log()
        assert exited.format(unwatched) not in log
        assert exited.format(watched) in log
    finally:
        await kept.close()
