"""Helpers for the gateway tests: a real ``vmkg serve`` subprocess and real clients.

``Gateway`` starts ``vmkg serve --ip=127.0.0.1 --port=0`` with its own state directory
under the test session's (so conftest's leak check covers it too), reads the port it
printed, and on ``stop()`` sends SIGTERM and checks the exit was clean and no QEMU or VM
directory of it is left. Its log is kept in the pytest temp dir (the evidence when a test
fails, and conftest adds what each gateway logged during a failed test to its report:
``LIVE``). ``serving()`` wraps a Gateway whose exit must be clean; conftest's ``gw`` fixture
serves one per test module through it. ``Channels`` is a websocket client (``websockets``)
speaking either the v1 subprotocol or the legacy JSON protocol.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import websockets
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from websockets.typing import Subprotocol

V1 = "v1.kernel.websocket.jupyter.org"
TOKEN = "test-token-" + uuid.uuid4().hex[:8]
REPO = Path(__file__).resolve().parents[1]
#: the gateways of this session not yet collected (conftest reads their logs on a failure)
LIVE: weakref.WeakSet[Gateway] = weakref.WeakSet()


def qemu_pids(state_dir: Path) -> set[int]:
    """QEMU processes whose arguments name ``state_dir`` (the VMs of one gateway or session)."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{state_dir}"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


class Gateway:
    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 token: str | None = TOKEN, state_dir: Path | None = None) -> None:
        """``token=None``: let the gateway generate one (read from what it prints)."""
        self.workdir = workdir
        base_state = Path(os.environ["VMKG_STATE_DIR"])
        self.state_dir = state_dir or base_state / f"gw-{uuid.uuid4().hex[:8]}"
        self.log_path = workdir / f"gateway-{uuid.uuid4().hex[:6]}.log"
        full_env = {**os.environ, "VMKG_STATE_DIR": str(self.state_dir), "PYTHONUNBUFFERED": "1"}
        full_env.pop("VMKG_AUTH_TOKEN", None)
        if token is not None:
            full_env["VMKG_AUTH_TOKEN"] = token
        full_env.update(env or {})
        self._log = open(self.log_path, "w")
        LIVE.add(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from gateway.app import main; main()", "serve", "--ip=127.0.0.1",
             "--port=0", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=full_env, cwd=workdir)
        self.url = self._wait_for_url()
        self.ws_url = self.url.replace("http://", "ws://")
        if token is None:
            assert self.proc.stdout is not None
            m = re.search(r"generated for this run: (\S+)", self.proc.stdout.readline())
            assert m, "no generated token printed"
            token = m.group(1)
        self.token = token
        atexit.register(self._kill_if_running)

    def _kill_if_running(self) -> None:
        if self.proc.poll() is None:  # a test that failed before stop(): do not leak it
            self.proc.kill()

    def _wait_for_url(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vmkg serve exited ({self.proc.poll()}); log:\n{self.log()}")
            m = re.search(r"serving on (http://\S+?)/? ", line)
            if m:
                return m.group(1).rstrip("/")
        raise RuntimeError(f"vmkg serve did not start; log:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"token {self.token if token is None else token}"}

    def request(self, method: str, path: str, *, token: str | None = None, auth: bool = True,
                **kwargs: Any) -> requests.Response:
        headers = {**(self.headers(token) if auth else {}), **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def start_kernel(self, name: str | None = "python3-microvm", env: dict[str, str] | None = None,
                     expect: int = 201) -> dict[str, Any]:
        body: dict[str, Any] = {"env": env or {}}
        if name:
            body["name"] = name
        r = self.request("POST", "/api/kernels", json=body)
        assert r.status_code == expect, (r.status_code, r.text)
        model: dict[str, Any] = r.json()
        return model

    def kernel_ids(self) -> set[str]:
        """The ids GET /api/kernels lists."""
        return {k["id"] for k in self.request("GET", "/api/kernels").json()}

    def client_env(self) -> dict[str, str]:
        """The environment of a client process (``vmkg run``/``fork``, the SDK) aimed at this
        gateway: VMKG_URL, VMKG_TOKEN, and the repository importable from any directory."""
        return {**os.environ, "VMKG_URL": self.url, "VMKG_TOKEN": self.token,
                "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "client"),
                                               os.environ.get("PYTHONPATH", "")])}

    def delete_kernel(self, kernel_id: str) -> None:
        r = self.request("DELETE", f"/api/kernels/{kernel_id}")
        assert r.status_code in (204, 404), r.text

    def metrics(self) -> str:
        r = self.request("GET", "/metrics")
        assert r.status_code == 200, r.text
        return r.text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            m = re.fullmatch(r'(\w+)(?:\{(.*)\})? (\S+)', line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def wait_for(self, predicate: Any, timeout: float = 60, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; gateway log:\n{self.log()[-4000:]}")

    def wait_pool(self, n: int = 1, timeout: float = 120) -> None:
        self.wait_for(lambda: self.metric("vmkg_kernels", state="pooled") >= n, timeout, "a pooled kernel")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"vmkg serve did not stop on {sig}; log:\n{self.log()[-4000:]}") from None
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def stop_clean(self) -> None:
        """SIGTERM, which must exit 0 and leave no QEMU nor VM directory behind."""
        code = self.stop()
        assert code == 0, self.log()[-3000:]
        self.assert_clean()

    def assert_clean(self, timeout: float = 15) -> None:
        """No QEMU process nor VM directory of this gateway remains."""
        deadline = time.monotonic() + timeout
        while qemu_pids(self.state_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not qemu_pids(self.state_dir), f"QEMU left behind by the gateway; log:\n{self.log()[-3000:]}"
        vms = self.state_dir / "vms"
        left = list(vms.iterdir()) if vms.exists() else []
        assert not left, f"VM directories left behind: {left}"


@contextmanager
def serving(workdir: Path, *args: str, **kwargs: Any) -> Iterator[Gateway]:
    """A ``Gateway`` (same arguments) stopped cleanly on exit (``stop_clean``)."""
    g = Gateway(workdir, *args, **kwargs)
    try:
        yield g
    finally:
        g.stop_clean()


# -- websocket client -------------------------------------------------------------------------


@dataclass
class Msg:
    channel: str
    header: dict[str, Any]
    parent: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type"))


@dataclass
class Result:
    stdout: str
    reply: dict[str, Any]
    messages: list[Msg]


def new_msg(msg_type: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "test",
                       "session": session, "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": content}


class Channels:
    """One websocket to /api/kernels/{id}/channels."""

    def __init__(self, ws: Any, session: str) -> None:
        self.ws = ws
        self.session = session
        self.v1 = ws.subprotocol == V1
        self.pending: list[Msg] = []

    @classmethod
    async def open(cls, gw: Gateway, kernel_id: str, *, v1: bool = True, session: str | None = None,
                   token: str | None = None, auth: bool = True, **kwargs: Any) -> Channels:
        session = session or uuid.uuid4().hex
        headers = gw.headers(token) if auth else {}
        ws = await websockets.connect(
            f"{gw.ws_url}/api/kernels/{kernel_id}/channels?session_id={session}",
            subprotocols=[Subprotocol(V1)] if v1 else None, additional_headers=headers, max_size=None,
            open_timeout=60, **kwargs)
        return cls(ws, session)

    def encode(self, msg: dict[str, Any], channel: str, buffers: list[bytes] = ()) -> bytes | str:  # type: ignore[assignment]
        if self.v1:
            parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
            return serialize_msg_to_ws_v1([*parts, *buffers], channel)
        assert not buffers, "legacy JSON frames carry no buffers here"
        return json.dumps({**msg, "channel": channel})

    def decode(self, frame: bytes | str) -> Msg:
        if self.v1:
            assert isinstance(frame, bytes), "v1 frames are binary"
            channel, parts = deserialize_msg_from_ws_v1(frame)
            h, p, _md, c = (json.loads(x) for x in parts[:4])
            return Msg(channel, h, p, c, [bytes(b) for b in parts[4:]])
        if isinstance(frame, bytes):
            d = deserialize_binary_message(frame)
            return Msg(d.get("channel"), d["header"], d["parent_header"], d["content"], list(d["buffers"]))
        d = json.loads(frame)
        return Msg(d.get("channel"), d["header"], d["parent_header"], d["content"], [])

    async def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell",
                   buffers: list[bytes] = ()) -> str:  # type: ignore[assignment]
        msg = new_msg(msg_type, content, self.session)
        await self.ws.send(self.encode(msg, channel, list(buffers)))
        return str(msg["header"]["msg_id"])

    async def recv(self, timeout: float = 60) -> Msg:
        return self.decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def execute(self, code: str, timeout: float = 120) -> Result:
        msg_id = await self.send("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        return await self.collect(msg_id, timeout)

    async def collect(self, msg_id: str, timeout: float = 120) -> Result:
        """Messages of one request until its reply and its idle status have both arrived."""
        deadline = time.monotonic() + timeout
        out: list[str] = []
        msgs: list[Msg] = []
        reply: dict[str, Any] | None = None
        idle = False
        while reply is None or not idle:
            m = await self.recv(max(0.1, deadline - time.monotonic()))
            if m.parent.get("msg_id") != msg_id:
                continue
            msgs.append(m)
            if m.channel == "iopub" and m.msg_type == "stream":
                out.append(m.content["text"])
            elif m.channel == "iopub" and m.msg_type == "status" and m.content["execution_state"] == "idle":
                idle = True
            elif m.channel == "shell":
                reply = m.content
        return Result("".join(out), reply, msgs)

    async def value(self, expr: str) -> Any:
        r = await self.execute(f"import json as _j; print(_j.dumps({expr}))")
        assert r.reply["status"] == "ok", r.reply
        return json.loads(r.stdout)

    async def close(self) -> None:
        await self.ws.close()
