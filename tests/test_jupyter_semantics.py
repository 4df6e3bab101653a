"""What a Jupyter client sees on restart, crash, interrupt, shutdown, culling and reconnect:
``vmkg serve`` compared, step for step, with jupyter_server's own local kernels.

The reference is Jupyter Kernel Gateway 3.0.1 (its kernel manager is jupyter_server's
``AsyncMappingKernelManager``) running a local ipykernel; the same steps run against both
servers through the same websocket client, and the iopub ``status`` sequences and the REST
model's ``execution_state`` are compared. Where this gateway deliberately differs (a
restored kernel is idle at once; a websocket of a kernel that is gone is closed rather
than left talking to nothing) the test says so next to the assertion.

Why it matters: JupyterLab reads ``status: restarting`` as "the kernel appears to have
died" and ends the cells in flight; a model stuck on ``busy`` leaves a notebook waiting.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websockets
from gateway_helpers import Channels, Gateway, Msg

pytestmark = pytest.mark.vm

# the pause lets ipykernel's IOPub thread send the cell's "busy" before the process exits
# (os._exit skips every flush: without it whether "busy" gets out is a race, on either side)
CRASH = "import os, time; time.sleep(0.5); os._exit(1)"
SPIN = "while True: pass"


class KernelGatewayRef:
    """Jupyter Kernel Gateway 3.0.1 with a local ipykernel: the reference. Offers what
    ``Channels.open`` and the tests use of ``Gateway``."""

    kernel_name = "python3"

    def __init__(self, workdir: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.token = "ref-token"
        self.log_path = workdir / f"kg-{port}.log"
        self._log = open(self.log_path, "w")
        # JUPYTER_PATH emptied: the venv's own python3 kernelspec (a local ipykernel)
        self.proc = subprocess.Popen(
            ["jupyter", "kernelgateway", "--KernelGatewayApp.ip=127.0.0.1",
             f"--KernelGatewayApp.port={port}", f"--KernelGatewayApp.auth_token={self.token}",
             "--KernelGatewayApp.port_retries=0", "--JupyterWebsocketPersonality.list_kernels=True",
             *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, "JUPYTER_PATH": ""})
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = self.url.replace("http://", "ws://")
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(self.url + "/api", headers=self.headers(), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()  # never leave it running
                raise RuntimeError(f"Kernel Gateway did not start:\n{self.log_path.read_text()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"token {self.token if token is None else token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, headers=self.headers(), timeout=120, **kwargs)

    def start_kernel(self) -> dict[str, Any]:
        r = self.request("POST", "/api/kernels", json={"name": self.kernel_name})
        assert r.status_code == 201, r.text
        model: dict[str, Any] = r.json()
        return model

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


Server = Any  # Gateway | KernelGatewayRef


def start_vmkg(workdir: Path, *args: str, **env: str) -> Gateway:
    # pings every second: a websocket must survive several of them
    return Gateway(workdir, "--pool-size=0", *args, env={"VMKG_WS_PING_INTERVAL": "1", **env})


@pytest.fixture(scope="module")
def servers(template: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    ref = KernelGatewayRef(tmp_path_factory.mktemp("kg"))
    try:
        gw = start_vmkg(tmp_path_factory.mktemp("gw"))
    except BaseException:
        ref.stop()
        raise
    try:
        yield {"jupyter": ref, "vmkg": gw}
    finally:
        ref.stop()
        assert gw.stop() == 0, gw.log()[-3000:]
        gw.assert_clean()


def kernel_name(srv: Server) -> str:
    return "python3" if isinstance(srv, KernelGatewayRef) else "python3-microvm"


def new_kernel(srv: Server) -> str:
    r = srv.request("POST", "/api/kernels", json={"name": kernel_name(srv)})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def delete_kernel(srv: Server, kid: str) -> None:
    srv.request("DELETE", f"/api/kernels/{kid}")


# -- recording -----------------------------------------------------------------------------------


def statuses(msgs: list[Msg]) -> list[tuple[str, str | None]]:
    """(execution_state, parent msg_type) of every iopub status, in order."""
    return [(m.content["execution_state"], m.parent.get("msg_type")) for m in msgs
            if m.channel == "iopub" and m.msg_type == "status"]


async def record(ch: Channels, until: Callable[[list[Msg]], bool], *, timeout: float = 90,
                 settle: float = 1.5) -> tuple[list[Msg], int | None]:
    """Messages until ``until(messages)`` holds, then ``settle`` s more (to catch anything
    extra); returns them and the close code if the websocket closed. ``until`` is asked
    again at least every half second, so it may also end on time (see restarted())."""
    msgs: list[Msg] = []
    deadline = time.monotonic() + timeout
    done_at: float | None = None
    while True:
        now = time.monotonic()
        if done_at is None and until(msgs):
            done_at = now + settle
        end = done_at if done_at is not None else deadline
        if now >= end:
            break
        try:
            msgs.append(await ch.recv(timeout=min(end - now, 0.5)))
        except (asyncio.TimeoutError, TimeoutError):
            continue
        except websockets.ConnectionClosed as exc:
            return msgs, exc.rcvd.code if exc.rcvd else 1006
    if done_at is None:
        raise AssertionError(f"timed out; statuses so far: {statuses(msgs)}")
    return msgs, None


class ModelWatch:
    """Polls ``GET /api/kernels/{id}`` in a thread; ``states`` holds each change of
    execution_state (an int when the answer was not 200)."""

    def __init__(self, srv: Server, kid: str) -> None:
        self.srv, self.kid = srv, kid
        self.states: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.srv.request("GET", f"/api/kernels/{self.kid}")
            state = r.json()["execution_state"] if r.status_code == 200 else r.status_code
            if not self.states or self.states[-1] != state:
                self.states.append(state)
            self._stop.wait(0.1)

    def __enter__(self) -> ModelWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def current(self) -> Any:
        r = self.srv.request("GET", f"/api/kernels/{self.kid}")
        return r.json()["execution_state"] if r.status_code == 200 else r.status_code


def seen(state: str, parent: str | None = None) -> Callable[[list[Msg]], bool]:
    return lambda msgs: any(s == state and (parent is None or p == parent) for s, p in statuses(msgs))


async def send_execute(ch: Channels, code: str) -> str:
    return await ch.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                             "user_expressions": {}, "allow_stdin": False,
                                             "stop_on_error": True})


# -- restart -------------------------------------------------------------------------------------


async def reference(measure: Callable[[Server], Awaitable[dict[str, Any]]], srv: Server,
                    looks_right: Callable[[dict[str, Any]], bool], tries: int = 3) -> dict[str, Any]:
    """What jupyter_server's own local kernel does, measured up to ``tries`` times until a
    run ``looks_right``: the reference has races of its own under load (its websocket's
    iopub joins the restarted kernel after ipykernel published ``starting``; a kernel_info
    sent while its auto-restarter swaps the kernel is lost), and a flaky instrument is
    measured again rather than failing the gateway it measures. The last run is returned
    whatever it looks like (the assertions then show it)."""
    result: dict[str, Any] = {}
    for i in range(tries):
        try:
            result = await measure(srv)
        except AssertionError as exc:
            if i == tries - 1:
                raise
            print(f"reference run {i + 1} failed ({exc}); measured again")
            continue
        if looks_right(result):
            return result
        print(f"reference run {i + 1} was off ({result}); measured again")
    return result


async def user_restart(srv: Server) -> dict[str, Any]:
    kid = new_kernel(srv)
    try:
        ch = await Channels.open(srv, kid)
        assert (await ch.execute("a = 1")).reply["status"] == "ok"
        with ModelWatch(srv, kid) as watch:
            rest = asyncio.ensure_future(asyncio.to_thread(srv.request, "POST", f"/api/kernels/{kid}/restart"))
            msgs, closed = await record(ch, lambda m: rest.done() and seen("idle", "kernel_info_request")(m))
            r = await rest
        after = await ch.execute("a")
        await ch.close()
        return {"statuses": statuses(msgs), "closed": closed, "rest": (r.status_code, r.json()["execution_state"]),
                "model": watch.states, "after": after.reply.get("ename")}
    finally:
        delete_kernel(srv, kid)


async def test_user_restart_looks_like_jupyters(servers: dict[str, Server]) -> None:
    expected = [("busy", "shutdown_request"), ("idle", "shutdown_request"), ("starting", None),
                ("busy", "kernel_info_request"), ("idle", "kernel_info_request")]
    ref = await reference(user_restart, servers["jupyter"], lambda r: r["statuses"] == expected)
    got = await user_restart(servers["vmkg"])
    print("jupyter:", ref, "\nvmkg:   ", got)
    # jupyter_server: the old kernel's shutdown, the new one's "starting", then the busy/idle
    # of the kernel_info request that jupyter_server's restart sends; never "restarting"
    assert ref["statuses"] == expected
    # Known gap, not the gateway's: the guest agent reports the old kernel's exit as soon as
    # it reaps it, which can overtake that kernel's last iopub messages (its shutdown_reply
    # and final idle), and the VM is then stopped. Everything from the new kernel on is exact.
    lost_tail = [s for s in expected if s != ("idle", "shutdown_request")]
    assert got["statuses"] in (expected, lost_tail)
    assert got["closed"] is None and ref["closed"] is None
    assert got["rest"] == ref["rest"] == (200, "idle")
    # the model never says busy or restarting: idle, starting (if a poll caught it), idle
    for model in (got["model"], ref["model"]):
        assert model in (["idle"], ["idle", "starting", "idle"]), model
    assert got["after"] == ref["after"] == "NameError"


# -- a kernel that dies --------------------------------------------------------------------------


def kill_qemu(srv: Gateway, kid: str) -> None:
    """SIGKILL the QEMU behind ``kid`` (its pid from the gateway's restore log line)."""
    pids = re.findall(rf"kernel {kid}: restored in \d+ ms \(vm \w+, pid (\d+)\)", srv.log())
    assert pids, f"no restore logged for {kid}"
    os.kill(int(pids[-1]), signal.SIGKILL)


def restarted(srv: Server, grace: float = 10) -> Callable[[list[Msg]], bool]:
    """Until the restarted kernel's "starting". A local kernel publishes that status itself
    as it starts, and jupyter_server's IOPub subscriber, reconnecting to the same ports, may
    join after it (ZMQ's slow joiner): for the reference, ``grace`` s after "restarting"
    without it is an end too. This gateway sends its own "starting" and must never miss it."""
    if not isinstance(srv, KernelGatewayRef):
        return seen("starting")
    restarting_at: list[float] = []

    def until(msgs: list[Msg]) -> bool:
        if seen("starting")(msgs):
            return True
        if not restarting_at and seen("restarting")(msgs):
            restarting_at.append(time.monotonic())
        return bool(restarting_at) and time.monotonic() - restarting_at[0] > grace
    return until


async def crash(srv: Server, how: str = "exit") -> dict[str, Any]:
    kid = new_kernel(srv)
    try:
        ch = await Channels.open(srv, kid)
        assert (await ch.execute("a = 1")).reply["status"] == "ok"
        with ModelWatch(srv, kid) as watch:
            t0 = time.monotonic()
            if how == "exit":
                cell = await send_execute(ch, CRASH)
            else:  # the VM itself dies, mid-cell
                cell = await send_execute(ch, "import time; time.sleep(60)")
                before, _ = await record(ch, seen("busy", "execute_request"), settle=0.5)
                kill_qemu(srv, kid)
            msgs, closed = await record(ch, restarted(srv), settle=3)
            if how != "exit":
                msgs = before + msgs
            told = time.monotonic() - t0
            await asyncio.sleep(0.5)
            final = watch.current()
        replies = [m for m in msgs if m.channel == "shell" and m.parent.get("msg_id") == cell]
        after = await ch.execute("a")
        await ch.close()
        return {"statuses": statuses(msgs), "closed": closed, "model": watch.states, "final": final,
                "replies": replies, "after": after.reply.get("ename"), "told_s": round(told, 1)}
    finally:
        delete_kernel(srv, kid)


async def test_kernel_death_looks_like_jupyters(servers: dict[str, Server]) -> None:
    ref = await crash(servers["jupyter"])
    got = await crash(servers["vmkg"])
    print("jupyter:", ref, "\nvmkg:   ", got)
    # jupyter_server's auto-restarter: "restarting", then the new kernel's "starting" (when
    # the subscriber rejoined in time, see restarted()); the cell that died gets no reply
    # (JupyterLab ends it on "restarting")
    died = [("busy", "execute_request"), ("restarting", None)]
    assert ref["statuses"] in (died, [*died, ("starting", None)]), ref["statuses"]
    # a restored kernel is idle at once (a local one says so at the first request) and
    # says so: no client waits for an idle that only a request of its own would bring
    assert got["statuses"] == [*died, ("starting", None), ("idle", None)]
    assert got["closed"] is None and ref["closed"] is None
    assert got["replies"] == ref["replies"] == []
    # jupyter_server's model follows the statuses its own IOPub subscriber sees: "starting"
    # until a request comes, or still "busy" when that subscriber rejoined the restarted
    # kernel's ports after its "starting" (the slow joiner of restarted()). This gateway's
    # model always leaves "busy"
    assert ref["model"][-1] in ("starting", "busy"), ref["model"]
    assert got["final"] == "idle", got["model"]
    assert got["model"][-2:] == ["busy", "idle"]
    assert got["after"] == ref["after"] == "NameError"


async def test_vm_killed_looks_like_a_kernel_death(servers: dict[str, Server]) -> None:
    got = await crash(servers["vmkg"], how="sigkill")
    print("vmkg:", got)
    assert got["statuses"] == [("busy", "execute_request"), ("restarting", None), ("starting", None),
                               ("idle", None)]
    assert got["closed"] is None and got["replies"] == []
    assert got["final"] == "idle" and got["after"] == "NameError"


async def died_for_good(srv: Server) -> dict[str, Any]:
    kid = new_kernel(srv)
    ch = await Channels.open(srv, kid)
    await send_execute(ch, CRASH)
    msgs, closed = await record(ch, seen("dead"), settle=3)
    await asyncio.sleep(0.5)
    code = srv.request("GET", f"/api/kernels/{kid}").status_code
    listed = [k["id"] for k in srv.request("GET", "/api/kernels").json()]
    # from the cell on; the statuses of the connection's own kernel_info nudges are left out:
    # their replies may come before or (on a loaded machine) after the cell's "busy"
    sts = [s for s in statuses(msgs) if s[1] != "kernel_info_request"]
    return {"statuses": sts[sts.index(("busy", "execute_request")):], "closed": closed, "get": code,
            "listed": kid in listed}


async def test_restart_budget_spent_says_dead(template: Any, tmp_path: Path) -> None:
    budget = "--KernelRestarter.restart_limit=0"
    ref = KernelGatewayRef(tmp_path, budget)
    try:
        r = await died_for_good(ref)
    finally:
        ref.stop()
    gw = start_vmkg(tmp_path, budget)
    try:
        g = await died_for_good(gw)
    finally:
        assert gw.stop() == 0, gw.log()[-3000:]
        gw.assert_clean()
    print("jupyter:", r, "\nvmkg:   ", g)
    assert r["statuses"] == g["statuses"] == [("busy", "execute_request"), ("dead", None)]
    assert r["get"] == g["get"] == 404 and not r["listed"] and not g["listed"]
    # jupyter_server leaves the websocket open to nothing; here it is closed (1001)
    assert g["closed"] == 1001


# -- interrupt, shutdown, culling ---------------------------------------------------------------


async def interrupt(srv: Server) -> dict[str, Any]:
    kid = new_kernel(srv)
    try:
        ch = await Channels.open(srv, kid)
        assert (await ch.execute("a = 1")).reply["status"] == "ok"
        cell = await send_execute(ch, SPIN)
        first, _ = await record(ch, seen("busy", "execute_request"), settle=1.0)
        r = await asyncio.to_thread(srv.request, "POST", f"/api/kernels/{kid}/interrupt")
        msgs, closed = await record(ch, seen("idle", "execute_request"))
        msgs = first + msgs
        reply = [m.content for m in msgs if m.channel == "shell" and m.parent.get("msg_id") == cell]
        errors = [m.content["ename"] for m in msgs if m.msg_type == "error"]
        kept = await ch.value("a")
        await ch.close()
        return {"status": r.status_code, "statuses": statuses(msgs), "closed": closed,
                "reply": [c["status"] for c in reply], "errors": errors, "kept": kept}
    finally:
        delete_kernel(srv, kid)


async def test_interrupt_looks_like_jupyters(servers: dict[str, Server]) -> None:
    ref = await interrupt(servers["jupyter"])
    got = await interrupt(servers["vmkg"])
    print("jupyter:", ref, "\nvmkg:   ", got)
    assert ref == got == {"status": 204, "statuses": [("busy", "execute_request"), ("idle", "execute_request")],
                          "closed": None, "reply": ["error"], "errors": ["KeyboardInterrupt"], "kept": 1}


async def shut_down(srv: Server) -> dict[str, Any]:
    kid = new_kernel(srv)
    ch = await Channels.open(srv, kid)
    assert (await ch.execute("1")).reply["status"] == "ok"
    r = await asyncio.to_thread(srv.request, "DELETE", f"/api/kernels/{kid}")
    msgs, closed = await record(ch, seen("busy", "shutdown_request"), settle=3)
    return {"status": r.status_code, "statuses": statuses(msgs), "closed": closed,
            "get": srv.request("GET", f"/api/kernels/{kid}").status_code}


async def test_shutdown_tells_connected_clients(servers: dict[str, Server]) -> None:
    ref = await shut_down(servers["jupyter"])
    got = await shut_down(servers["vmkg"])
    print("jupyter:", ref, "\nvmkg:   ", got)
    assert ref["status"] == got["status"] == 204 and ref["get"] == got["get"] == 404
    assert ref["statuses"][:1] == got["statuses"][:1] == [("busy", "shutdown_request")]
    assert "restarting" not in {s for s, _ in got["statuses"]}
    # jupyter_server leaves the websocket open to a kernel that is gone (a notebook learns it
    # only when it next reconnects); here it is closed at once with 1001
    assert got["closed"] == 1001


async def test_culled_kernel_tells_connected_clients(template: Any, tmp_path: Path) -> None:
    gw = start_vmkg(tmp_path, "--cull-idle-timeout=3", "--cull-interval=1", "--cull-connected")
    try:
        kid = new_kernel(gw)
        ch = await Channels.open(gw, kid)
        assert (await ch.execute("1")).reply["status"] == "ok"
        t0 = time.monotonic()
        try:
            while True:
                await ch.recv(timeout=30)
        except websockets.ConnectionClosed as exc:
            closed = exc.rcvd.code if exc.rcvd else 1006
            reason = exc.rcvd.reason if exc.rcvd else ""
        waited = time.monotonic() - t0
        assert gw.request("GET", f"/api/kernels/{kid}").status_code == 404
    finally:
        assert gw.stop() == 0, gw.log()[-3000:]
        gw.assert_clean()
    assert closed == 1001 and kid in reason, (closed, reason)
    assert waited < 20


# -- reconnect, keep-alive ----------------------------------------------------------------------


async def drop_and_resume(srv: Server) -> str:
    kid = new_kernel(srv)
    try:
        ch = await Channels.open(srv, kid)
        cell = await send_execute(ch, "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.4)")
        out = []
        while True:
            m = await ch.recv()
            if m.msg_type == "stream" and m.parent.get("msg_id") == cell:
                out.append(m.content["text"])
                break
        ch.ws.transport.abort()  # the network goes away: no close handshake
        await asyncio.sleep(2)
        again = await Channels.open(srv, kid, session=ch.session)
        res = await again.collect(cell, timeout=60)
        out.append(res.stdout)
        await again.close()
        return "".join(out)
    finally:
        delete_kernel(srv, kid)


async def test_reconnect_after_a_network_drop_keeps_output(servers: dict[str, Server]) -> None:
    expected = "".join(f"{i}\n" for i in range(8))
    assert await drop_and_resume(servers["jupyter"]) == expected
    assert await drop_and_resume(servers["vmkg"]) == expected


async def test_websocket_outlives_its_pings(servers: dict[str, Server]) -> None:
    """The gateway pings every second here; an idle notebook must stay connected."""
    gw = servers["vmkg"]
    kid = new_kernel(gw)
    try:
        ch = await Channels.open(gw, kid)
        await asyncio.sleep(5)
        assert (await ch.execute("print(41 + 1)")).stdout == "42\n"
        assert "ping timeout" not in gw.log()
        await ch.close()
    finally:
        delete_kernel(gw, kid)


# -- the SDK reads these statuses as Jupyter means them -------------------------------------------


async def test_sdk_cell_in_a_dying_kernel_fails_and_the_kernel_lives_on(servers: dict[str, Server]) -> None:
    from vmkg_client import sdk

    gw = servers["vmkg"]
    async with sdk.Gateway(gw.url, gw.token) as client:
        kernel = await client.start_kernel("python3")
        await kernel.run_code("x = 1")
        with pytest.raises(sdk.SDKError, match="died while the cell ran") as died:
            await kernel.run_code(CRASH, timeout=120)
        assert not isinstance(died.value, sdk.KernelGone)
        assert (await kernel.run_code("'x' in dir()")).text == "False"
        assert (await kernel.info())["execution_state"] == "idle"
        # a restart someone else asks for while a cell runs: the cell fails, the kernel works
        run = asyncio.ensure_future(kernel.run_code("import time; time.sleep(60)", timeout=120))
        while (await kernel.info())["execution_state"] != "busy":
            await asyncio.sleep(0.1)
        await asyncio.to_thread(gw.request, "POST", f"/api/kernels/{kernel.id}/restart")
        with pytest.raises(sdk.SDKError, match="was restarted while the cell ran"):
            await asyncio.wait_for(run, 60)
        assert (await kernel.run_code("6 * 7")).text == "42"


async def reconnect_on_restarting(srv: Server) -> dict[str, Any]:
    """What JupyterLab does on ``restarting``: reconnect its websocket (same session) at
    once, then ask kernel_info."""
    kid = new_kernel(srv)
    try:
        ch = await Channels.open(srv, kid)
        assert (await ch.execute("a = 1")).reply["status"] == "ok"
        await send_execute(ch, CRASH)
        await record(ch, seen("restarting"), settle=0)
        await ch.close()
        again = await Channels.open(srv, kid, session=ch.session)
        info = await again.send("kernel_info_request", {})
        msgs, closed = await record(again, lambda m: any(
            x.channel == "shell" and x.parent.get("msg_id") == info for x in m) and seen("idle")(m))
        after = await again.execute("a")
        await again.close()
        return {"statuses": statuses(msgs), "closed": closed, "after": after.reply.get("ename")}
    finally:
        delete_kernel(srv, kid)


async def test_reconnect_during_an_auto_restart(servers: dict[str, Server]) -> None:
    ref = await reference(reconnect_on_restarting, servers["jupyter"],
                          lambda r: ("starting", None) in r["statuses"])
    got = await reconnect_on_restarting(servers["vmkg"])
    print("jupyter:", ref, "\nvmkg:   ", got)
    assert got["closed"] is None and got["after"] == ref["after"] == "NameError"
    # the reconnected websocket hears the new kernel's "starting" (JupyterLab ignores the
    # statuses of kernel_info requests, so without it the page would stay "unknown")
    assert ("starting", None) in ref["statuses"] and ("starting", None) in got["statuses"]
    assert got["statuses"][-1] == ("idle", "kernel_info_request")


# -- output kept while no client was connected ---------------------------------------------------


async def printing_while_away(gw: Server, kid: str, lines: int) -> tuple[str, str, str]:
    """A client runs a cell that prints 0..lines-1, 0.3 s apart, reads the first line and
    leaves; returns once the cell has ended with nobody connected: (the cell's msg_id,
    what the client got, its session id)."""
    first = await Channels.open(gw, kid)
    cell = await send_execute(first, f"import time\nfor i in range({lines}):\n    print(i, flush=True)\n"
                                     "    time.sleep(0.3)")
    got = ""
    while not got:
        m = await first.recv()
        if m.msg_type == "stream" and m.parent.get("msg_id") == cell:
            got = m.content["text"]
    await first.close()
    await asyncio.sleep(0.3 * lines + 2)  # the cell finishes while nobody is connected
    return cell, got, first.session


async def test_kept_output_goes_to_the_next_client_whatever_its_session(servers: dict[str, Server]) -> None:
    """A reloaded JupyterLab page comes back with a new session id: it still gets, in order,
    what the kernel said while no page was connected, and the kernel stays usable."""
    gw = servers["vmkg"]
    kid = new_kernel(gw)
    try:
        cell, got, session = await printing_while_away(gw, kid, 12)
        second = await Channels.open(gw, kid)  # a new session id
        assert second.session != session
        rest = await second.collect(cell, timeout=60)
        assert got + rest.stdout == "".join(f"{i}\n" for i in range(12))
        assert rest.reply["status"] == "ok"
        assert (await second.execute("print('still', 'usable')")).stdout == "still usable\n"
        await second.close()
    finally:
        delete_kernel(gw, kid)


async def test_output_replayed_to_an_abandoned_websocket_reaches_its_replacement(
        servers: dict[str, Server]) -> None:
    """JupyterLab's gateway client leaves an abandoned websocket of the page's session
    beside the live one (see the next test). If the abandoned one opened first it is
    replayed what was kept for the kernel - a reloaded page's output - and never reads it;
    the live websocket of the same session, which replaces it, must get it all the same."""
    gw = servers["vmkg"]
    kid = new_kernel(gw)
    ghost = live = None
    try:
        cell, got, _ = await printing_while_away(gw, kid, 8)
        session = uuid.uuid4().hex
        replays = gw.log().count("Replaying")
        ghost = await Channels.open(gw, kid, session=session)  # opens, is replayed, never reads
        deadline = time.monotonic() + 30
        while gw.log().count("Replaying") == replays:
            assert time.monotonic() < deadline, "nothing was replayed to the first websocket"
            await asyncio.sleep(0.1)
        live = await Channels.open(gw, kid, session=session)
        rest = await live.collect(cell, timeout=60)
        assert got + rest.stdout == "".join(f"{i}\n" for i in range(8))
        assert rest.reply["status"] == "ok"
        assert "never spoke" in gw.log()
        assert (await live.execute("print('still', 'usable')")).stdout == "still usable\n"
    finally:
        for ch in (ghost, live):
            if ch is not None:
                await ch.close()
        delete_kernel(gw, kid)

# -- one websocket per session --------------------------------------------------------------------


async def superseded_while_connecting(gw: Gateway) -> tuple[bool, float]:
    """Two websockets of one session, the second opened while the first still waits for
    the kernel's first kernel_info reply; returns (whether the first was refused, how
    long the second took to get its kernel_info reply)."""
    kid = new_kernel(gw)  # nobody asked it kernel_info yet: the first websocket waits for it
    try:
        session = uuid.uuid4().hex
        first = asyncio.ensure_future(Channels.open(gw, kid, session=session))
        await asyncio.sleep(0.02)
        second = await Channels.open(gw, kid, session=session)
        refused = False
        try:
            stale = await first
        except websockets.InvalidStatus as exc:
            assert exc.response.status_code == 409, exc
            refused = True
        else:
            # it had opened before the second arrived: jupyter_server closes it as stale
            async def drained() -> None:
                while True:
                    await stale.recv(timeout=20)

            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(drained(), 20)
        t0 = time.monotonic()
        info = await second.send("kernel_info_request", {})
        msgs, closed = await record(second, lambda m: any(
            x.channel == "shell" and x.parent.get("msg_id") == info for x in m) and seen("idle")(m),
            timeout=30, settle=0)
        took = time.monotonic() - t0
        assert closed is None
        assert (await second.execute("print(6 * 7)", timeout=60)).stdout == "42\n"
        await second.close()
        return refused, took
    finally:
        delete_kernel(gw, kid)


async def test_a_websocket_replaced_while_connecting_never_opens(servers: dict[str, Server]) -> None:
    """jupyter_server's gateway client (JupyterLab with --gateway-url) opens a notebook's
    websocket, cancels it when the page reconnects at once with the same session id, and
    tornado completes the cancelled connection anyway, never read. If that one was still
    waiting for the kernel when the live one arrived, it must not open: both would carry
    the session id as their ZMQ identity, the kernel's replies to the live page (its
    kernel_info reply first) could go to the abandoned one, and the page's kernel would
    stay "Unknown". The live websocket gets its replies, every time."""
    gw = servers["vmkg"]
    results = [await superseded_while_connecting(gw) for _ in range(2)]
    print("refused, kernel_info reply (s):", results)
    assert any(refused for refused, _ in results), "the race was never hit; the test proves nothing"
    assert "refusing a websocket of session" in gw.log()
