#!/usr/bin/env python3
"""Benchmark ``vmkg serve`` against Jupyter Kernel Gateway 3.0.1 running a local ipykernel,
both started by this script in the same run and driven by the same client code (REST with
``requests``, websockets with ``websockets``, legacy JSON protocol as jupyter_server's
GatewayClient speaks it), interleaved so both see the same machine noise:

* create-to-first-result: ``POST /api/kernels``, open the channels websocket, execute
  ``1+1``, until its ``execute_result``. Ours from the warm pool (the pool refilled between
  runs, as at steady state) and from an empty pool (a restore per request);
* warm execute round trip: ``1+1`` until its execute_reply and idle status, after warm-up
  (and ``x = 1``, which has no result to format); the kernel's share (busy to idle, by its
  own clock) and the gateway process's CPU time per round trip (jupyter_server, and for
  vmkg the relay: the gateway's own work, which load does not inflate);
* throughput of one cell printing 20 MB: bytes delivered and MB/s (Kernel Gateway with its
  iopub rate limit turned off, and once as shipped, to show what its limit drops), and the
  CPU time the vmkg gateway process itself spent on it;
* 10 concurrent creates: wall time until all ten have a first result, and the median; ours
  with the default pool of 1 and with a pool of 10;
* first data-science cells of a new kernel (create, websocket, cell, until its result): a
  pandas DataFrame describe(), a matplotlib plot saved to PNG;
* a burst of 8 back-to-back creates (each to its first result, kernels kept until the
  burst ends; the pool grows with demand, so the burst before the measured ones is the
  warm-up) and a sustained run of 30 creates (each to its first result, then deleted);
* a pooled kernel's first execute on a fresh websocket against that kernel's warm round trip;
* the issue's output loop (200,000 writes of 101 bytes) over both websocket protocols
  (legacy JSON and v1 binary), how long the kernel was busy with it, and the same loop
  writing to /dev/null inside the kernel (the ceiling the kernel's CPU - under TCG the
  emulated one - sets, with no output path at all);
* idle private memory (Private_Dirty of smaps_rollup) of a restored kernel's QEMU.

Prints medians (p50) and ratios ours/KG. Run: ``python bench/bench_gateway.py`` (``-n``
repetitions, ``--json FILE`` to keep the numbers, ``--quick`` for fewer repetitions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import pct  # noqa: E402

TOKEN = secrets.token_hex(16)
OUTPUT_BYTES = 20 * 1024 * 1024
V1 = "v1.kernel.websocket.jupyter.org"
PANDAS_CELL = "import numpy, pandas; pandas.DataFrame({'a': range(1000)}).describe().shape"
PLOT_CELL = ("import io, matplotlib.pyplot as plt\nfig, ax = plt.subplots(); ax.plot([1, 3, 2])\n"
             "buf = io.BytesIO(); fig.savefig(buf, format='png'); plt.close(fig); len(buf.getvalue()) > 0")
LOOP_LINES = 200000
#: extra environment of the vmkg servers (``--tcg-tb-mb``)
EXTRA_ENV: dict[str, str] = {}


def loop_cell(lines: int) -> str:
    """The issue's output loop: ``lines`` writes of 101 bytes (200,000: 20.2 MB)."""
    return f"import sys\nfor i in range({lines}): sys.stdout.write('x'*100 + '\\n')"


def loop_sink_cell(lines: int) -> str:
    """The same loop writing to /dev/null inside the kernel: what the kernel's CPU alone
    allows (under TCG, the emulated CPU), with no output path at all; its result is seconds."""
    return ("import os, time\n_f = open(os.devnull, 'w'); _t0 = time.perf_counter()\n"
            f"for i in range({lines}): _f.write('x'*100 + '\\n')\n"
            "_f.close(); time.perf_counter() - _t0")


class Server:
    def __init__(self, label: str, url: str, proc: subprocess.Popen[str], kernel: str) -> None:
        self.label, self.url, self.proc, self.kernel = label, url, proc, kernel
        self.state_dir: Path | None = None  # vmkg's (its VM directories)
        self.ws_url = url.replace("http://", "ws://")
        self.h = {"Authorization": f"token {TOKEN}"}

    def post_kernel(self) -> str:
        # GatewayClient always sends KERNEL_USERNAME (a pooled kernel must take it on)
        r = requests.post(self.url + "/api/kernels", timeout=120, headers=self.h,
                          json={"name": self.kernel, "env": {"KERNEL_USERNAME": "bench"}})
        r.raise_for_status()
        return str(r.json()["id"])

    def delete_kernel(self, kid: str) -> None:
        requests.delete(self.url + f"/api/kernels/{kid}", headers=self.h, timeout=120)

    def pooled(self) -> float:
        return self.pool_state()[0]

    def pool_state(self) -> tuple[float, float]:
        """(kernels pooled, QEMU processes of the gateway), from its /metrics."""
        text = requests.get(self.url + "/metrics", headers=self.h, timeout=30).text
        m = re.search(r'^vmkg_kernels\{state="pooled"\} (\S+)$', text, re.M)
        v = re.search(r'^vmkg_vms (\S+)$', text, re.M)
        return (float(m.group(1)) if m else 0.0), (float(v.group(1)) if v else 0.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/api", headers={"Authorization": f"token {TOKEN}"}, timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start_vmkg(workdir: Path, pool: int) -> Server:
    env = {**os.environ, "VMKG_AUTH_TOKEN": TOKEN, "VMKG_STATE_DIR": str(workdir / "state"),
           "PYTHONUNBUFFERED": "1", **EXTRA_ENV}
    log = open(workdir / f"vmkg-pool{pool}.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "from gateway.app import main; main()", "serve",
                             "--ip=127.0.0.1", "--port=0", f"--pool-size={pool}", "--log-level=WARN"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=workdir)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"serving on (http://\S+?)/? ", line)
    if not m:
        raise RuntimeError(f"vmkg serve did not start: {line!r}")
    url = m.group(1)
    wait_http(url, proc)
    srv = Server(f"vmkg (pool {pool})", url, proc, "python3-microvm")
    srv.state_dir = workdir / "state"
    return srv


def start_kg(workdir: Path, *extra: str, label: str = "Kernel Gateway") -> Server:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / f"kg-{port}.log", "w")
    proc = subprocess.Popen(["jupyter", "kernelgateway", "--KernelGatewayApp.ip=127.0.0.1",
                             f"--KernelGatewayApp.port={port}", f"--KernelGatewayApp.auth_token={TOKEN}",
                             "--KernelGatewayApp.port_retries=0", "--JupyterWebsocketPersonality.list_kernels=True",
                             "--log-level=WARN", *extra],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=workdir,
                            env={**os.environ, "JUPYTER_PATH": ""})
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc)
    return Server(label, url, proc, "python3")


# -- the websocket client ------------------------------------------------------------------------


def request(msg_type: str, content: dict[str, Any], session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    msg = {"header": {"msg_id": msg_id, "msg_type": msg_type, "username": "bench", "session": session,
                      "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
           "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}
    return msg_id, json.dumps(msg)


def execute_request(code: str, session: str) -> tuple[str, str]:
    return request("execute_request", {"code": code, "silent": False, "store_history": True,
                                       "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                   session)


async def connect(srv: Server, kid: str, v1: bool = False) -> Any:
    from websockets.typing import Subprotocol

    session = uuid.uuid4().hex
    ws = await websockets.connect(f"{srv.ws_url}/api/kernels/{kid}/channels?session_id={session}",
                                  additional_headers=srv.h, max_size=None, open_timeout=120,
                                  ping_interval=None, subprotocols=[Subprotocol(V1)] if v1 else None)
    ws.session = session  # type: ignore[attr-defined]
    ws.v1 = ws.subprotocol == V1  # type: ignore[attr-defined]
    if v1 and ws.subprotocol != V1:
        raise RuntimeError(f"{srv.label} did not accept the v1 websocket protocol")
    return ws


def v1_encode(frame: str) -> bytes:
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

    msg = json.loads(frame)
    parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
    return bytes(serialize_msg_to_ws_v1(parts, msg["channel"]))


def v1_decode(frame: bytes) -> dict[str, Any]:
    from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1

    _channel, parts = deserialize_msg_from_ws_v1(frame)
    h, p, _md, c = (json.loads(x) for x in parts[:4])
    return {"header": h, "parent_header": p, "content": c}


async def run_cell(ws: Any, code: str, until: str = "idle", timeout: float = 600) -> dict[str, Any]:
    """Execute ``code``; returns stdout bytes and what arrived, once ``until`` is seen
    ('result': the execute_result; 'idle': execute_reply and idle status)."""
    msg_id, frame = execute_request(code, ws.session)
    await ws.send(v1_encode(frame) if ws.v1 else frame)
    out = 0
    reply = idle = False
    busy_at = idle_at = None
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        m = v1_decode(raw) if ws.v1 else json.loads(raw)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        t = m["header"]["msg_type"]
        if t == "stream":
            out += len(m["content"]["text"])
        elif t == "execute_result" and until == "result":
            return {"stdout": out, "result": m["content"]["data"].get("text/plain")}
        elif t == "execute_reply":
            reply = True
            if m["content"].get("status") != "ok":
                raise RuntimeError(f"cell failed: {m['content'].get('ename')}: {m['content'].get('evalue')}")
        elif t == "status" and m["content"]["execution_state"] == "busy":
            busy_at = m["header"]["date"]
        elif t == "status" and m["content"]["execution_state"] == "idle":
            idle = True
            idle_at = m["header"]["date"]
        if reply and idle:
            return {"stdout": out, "kernel": kernel_seconds(busy_at, idle_at)}


def kernel_seconds(busy: str | None, idle: str | None) -> float | None:
    """Seconds between the kernel's busy and idle statuses, both stamped by the kernel's
    own clock: the share of a round trip spent in the kernel (not in the gateway, relay,
    guest agent, link or client)."""
    from datetime import datetime

    if not busy or not idle:
        return None
    return (datetime.fromisoformat(idle.replace("Z", "+00:00"))
            - datetime.fromisoformat(busy.replace("Z", "+00:00"))).total_seconds()


async def first_result(srv: Server, code: str = "1+1") -> tuple[float, str, Any]:
    """POST, websocket, ``code`` until its result: (seconds, kernel id, websocket)."""
    t0 = time.perf_counter()
    kid = await asyncio.to_thread(srv.post_kernel)
    ws = await connect(srv, kid)
    await run_cell(ws, code, until="result")
    return time.perf_counter() - t0, kid, ws


async def dispose(srv: Server, kid: str, ws: Any) -> None:
    await ws.close()
    await asyncio.to_thread(srv.delete_kernel, kid)


async def create_to_first_result(srv: Server, code: str = "1+1") -> float:
    took, kid, ws = await first_result(srv, code)
    await dispose(srv, kid, ws)
    return took


async def burst(srv: Server, n: int = 8) -> list[float]:
    """``n`` creates back to back, each to its first result; kernels kept until the end."""
    held = []
    for _ in range(n):
        held.append(await first_result(srv))
    await asyncio.gather(*(dispose(srv, kid, ws) for _, kid, ws in held))
    return [took for took, _, _ in held]


async def sustained(srv: Server, n: int = 30) -> tuple[float, list[float]]:
    """``n`` creates one after another, each to its first result, then deleted."""
    t0 = time.perf_counter()
    each = [await create_to_first_result(srv) for _ in range(n)]
    return time.perf_counter() - t0, each


async def pooled_first_execute(srv: Server, n: int) -> tuple[float, float, float, float]:
    """On a kernel from the pool, a fresh websocket: (its first ``x = 41; x + 1`` round
    trip, the median of the next ``n`` on the same websocket, and the CPU seconds the
    kernel side - the VM's QEMU - spent on the first and, median, on each warm one: CPU
    time is what load does not inflate)."""
    await asyncio.to_thread(wait_pool, srv)
    await asyncio.sleep(1.0)
    kid, procs = await asyncio.to_thread(post_kernel_procs, srv)
    ws = await connect(srv, kid)
    try:
        k0, t0 = cpu_of(procs), time.perf_counter()
        await run_cell(ws, "x = 41; x + 1")
        first, first_cpu = time.perf_counter() - t0, cpu_of(procs) - k0
        warm, warm_cpu = [], []
        for _ in range(n):
            k0, t0 = cpu_of(procs), time.perf_counter()
            await run_cell(ws, "x = 41; x + 1")
            warm.append(time.perf_counter() - t0)
            warm_cpu.append(cpu_of(procs) - k0)
        return first, statistics.median(warm), first_cpu, statistics.median(warm_cpu)
    finally:
        await dispose(srv, kid, ws)


async def loop_output(srv: Server, v1: bool, lines: int = LOOP_LINES
                      ) -> tuple[int, float, float | None, float, float, float]:
    """The issue's loop of 200,000 small writes: (bytes delivered, seconds, seconds the
    kernel was busy with it by its own clock, seconds the same loop takes writing to
    /dev/null inside the kernel, CPU seconds of the kernel side - QEMU or ipykernel - and
    of the gateway process during the loop)."""
    kid, procs = await asyncio.to_thread(post_kernel_procs, srv)
    ws = await connect(srv, kid, v1=v1)
    try:
        await settle(srv)
        await run_cell(ws, "1+1")
        k0, g0, t0 = cpu_of(procs), cpu_seconds(srv.proc.pid), time.perf_counter()
        r = await run_cell(ws, loop_cell(lines), timeout=3600)
        took = time.perf_counter() - t0
        kcpu, gcpu = cpu_of(procs) - k0, cpu_seconds(srv.proc.pid) - g0
        sink = float((await run_cell(ws, loop_sink_cell(lines), until="result", timeout=3600))["result"])
        return r["stdout"], took, r["kernel"], sink, kcpu, gcpu
    finally:
        await dispose(srv, kid, ws)


def qemu_pids(state_dir: Path) -> set[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{state_dir}"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def private_dirty_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Private_Dirty for {pid}")


async def idle_memory(srv: Server, state_dir: Path, idle: float = 10.0) -> float:
    """Private_Dirty (MB) of a freshly restored kernel's QEMU after its first cell and
    ``idle`` seconds idle (a pool-0 gateway: the only VM that appears is this one)."""
    before = qemu_pids(state_dir)
    took, kid, ws = await first_result(srv)
    try:
        new = qemu_pids(state_dir) - before
        if len(new) != 1:
            raise RuntimeError(f"expected one new QEMU process, found {sorted(new)}")
        await asyncio.sleep(idle)
        return private_dirty_mb(new.pop())
    finally:
        await dispose(srv, kid, ws)


async def settle(srv: Server) -> None:
    """Let a vmkg pool finish refilling (restore + warm-up), so it does not compete with
    what is measured next: the kernel about to be measured (taken from the pool) is
    the one VM allowed besides the pooled ones."""
    if srv.label.startswith("vmkg"):
        await asyncio.sleep(1.5)  # pool_refill_delay
        await asyncio.to_thread(wait_pool, srv, 1, 120, 1)


async def warm_rtt(srv: Server, n: int, code: str = "1+1",
                   kernel_share: list[float] | None = None,
                   gateway_cpu: list[float] | None = None,
                   kernel_cpu: list[float] | None = None) -> list[float]:
    """``n`` warm round trips; the kernel's own share of each goes to ``kernel_share``, and
    the CPU time the gateway process (vmkg: jupyter_server and the relay; Kernel Gateway:
    jupyter_server) spent per round trip to ``gateway_cpu`` (once, over all ``n``: CPU
    time, unlike wall time, does not grow with the machine's load)."""
    kid, procs = await asyncio.to_thread(post_kernel_procs, srv)
    ws = await connect(srv, kid)
    try:
        await settle(srv)
        for _ in range(8):
            await run_cell(ws, code)
        out = []
        c0, k0 = cpu_seconds(srv.proc.pid), cpu_of(procs)
        for _ in range(n):
            t0 = time.perf_counter()
            r = await run_cell(ws, code)
            out.append(time.perf_counter() - t0)
            if kernel_share is not None and r["kernel"] is not None:
                kernel_share.append(r["kernel"])
        if gateway_cpu is not None:
            gateway_cpu.append((cpu_seconds(srv.proc.pid) - c0) / n)
        if kernel_cpu is not None:
            kernel_cpu.append((cpu_of(procs) - k0) / n)
        return out
    finally:
        await ws.close()
        await asyncio.to_thread(srv.delete_kernel, kid)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kernel_procs(srv: Server) -> set[int]:
    """The kernel processes the server started: vmkg's QEMUs (the emulated guest with its
    kernel, agent and devices), Kernel Gateway's ipykernels."""
    out = set()
    for pid in descendants(srv.proc.pid):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("qemu") or not srv.label.startswith("vmkg"):
            out.add(pid)
    return out


def vmkg_qemu(srv: Server, kid: str) -> set[int]:
    """The QEMU of vmkg kernel ``kid``: its VM directory's owner record names the kernel and
    the QEMU pid (pooled or restored on demand alike)."""
    vms = srv.state_dir / "vms" if srv.state_dir is not None else None
    for owner in (vms.glob("*/owner.json") if vms is not None and vms.is_dir() else ()):
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue
        if info.get("kernel_id") == kid and isinstance(info.get("qemu_pid"), int):
            return {info["qemu_pid"]}
    return set()


def post_kernel_procs(srv: Server) -> tuple[str, set[int]]:
    """POST a kernel: (its id, the processes that are that kernel): vmkg's by the VM
    directory's owner record (a pooled VM ran before the POST, and the pool's refills
    start others meanwhile), Kernel Gateway's the process it started."""
    before = kernel_procs(srv)
    kid = srv.post_kernel()
    if srv.label.startswith("vmkg"):
        procs = vmkg_qemu(srv, kid)
        if not procs:
            raise RuntimeError(f"no VM directory of {srv.label} names kernel {kid}")
        return kid, procs
    return kid, kernel_procs(srv) - before


def cpu_of(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


async def throughput(srv: Server) -> tuple[int, float, float]:
    """(bytes delivered, seconds, CPU seconds of the gateway process)"""
    kid = await asyncio.to_thread(srv.post_kernel)
    ws = await connect(srv, kid)
    try:
        await settle(srv)
        await run_cell(ws, "1+1")
        c0, t0 = cpu_seconds(srv.proc.pid), time.perf_counter()
        got = (await run_cell(ws, f"print('x' * {OUTPUT_BYTES}, end='')"))["stdout"]
        return got, time.perf_counter() - t0, cpu_seconds(srv.proc.pid) - c0
    finally:
        await ws.close()
        await asyncio.to_thread(srv.delete_kernel, kid)


async def concurrent_creates(srv: Server, n: int) -> tuple[float, list[float], list[str]]:
    """(seconds until all ``n`` have a first result or failed, each successful one's
    create-to-first-result, why the others failed). A failure is recorded, not raised:
    Kernel Gateway's local kernels can collide on a port when started together."""
    t0 = time.perf_counter()
    each = await asyncio.gather(*(first_result(srv) for _ in range(n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    ok = [e for e in each if not isinstance(e, BaseException)]
    failed = [f"{type(e).__name__}: {e}" for e in each if isinstance(e, BaseException)]
    await asyncio.gather(*(dispose(srv, kid, ws) for _, kid, ws in ok), return_exceptions=True)
    return wall, [took for took, _, _ in ok], failed


def wait_pool(srv: Server, n: int = 1, timeout: float = 120, in_use: int = 0) -> None:
    """Until ``n`` kernels are pooled and the pool has settled: the gateway runs no VM
    besides the pooled ones and the ``in_use`` kernels the caller holds (no restore or
    warm-up in flight, no kernel of an earlier step still stopping), so a one-at-a-time
    measurement does not share the 2 cores with refills the previous steps' demand started
    (the burst, concurrent and sustained sections measure that load). Raises after
    ``timeout``: a measure must not start on an unsettled machine unnoticed."""
    deadline = time.monotonic() + timeout
    while True:
        pooled, vms = srv.pool_state()
        if pooled >= n and vms <= pooled + in_use:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{srv.label}: pool not settled after {timeout:.0f} s "
                               f"({pooled} pooled of {n}, {vms} VMs, {in_use} in use)")
        time.sleep(0.1)


@contextmanager
def servers(workdir: Path) -> Any:
    started: list[Server] = []
    try:
        yield started
    finally:
        for s in started:
            s.stop()


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:7.0f} ms (p90 {pct(xs, 90) * 1000:.0f})"


def wait_burst_pool(srv: Server, n: int, timeout: float = 600) -> None:
    wait_pool(srv, n, timeout)
    time.sleep(1.0)


class Results(dict[str, Any]):
    """The raw numbers, written to ``path`` (if any) as each section ends: a run that
    fails late keeps what it measured."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if self.path:
            Path(self.path).write_text(json.dumps(self, indent=1))


async def main_async(args: argparse.Namespace, results: Results) -> Results:
    workdir = Path(tempfile.mkdtemp(prefix="vmkg-bench-gw-"))
    n = args.n

    def want(section: str) -> bool:
        return not args.only or section in args.only.split(",")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with servers(workdir) as started:
        ours = start_vmkg(workdir, pool=1)
        started.append(ours)
        ours0 = start_vmkg(workdir, pool=0)
        started.append(ours0)
        kg = start_kg(workdir, "--ZMQChannelsWebsocketConnection.limit_rate=False",
                      label="Kernel Gateway (rate limit off)")
        started.append(kg)
        say(f"servers up: {ours.url} {ours0.url} {kg.url}; warming up")
        await asyncio.to_thread(wait_pool, ours)
        for srv in (ours0, kg):
            await create_to_first_result(srv)

        # 1. create to first result, interleaved
        if want("create"):
            pool_t, restore_t, kg_t = [], [], []
            for i in range(n):
                await asyncio.to_thread(wait_pool, ours)
                await asyncio.sleep(0.5)
                pool_t.append(await create_to_first_result(ours))
                restore_t.append(await create_to_first_result(ours0))
                kg_t.append(await create_to_first_result(kg))
                say(f"  create {i + 1}/{n}: pool {pool_t[-1] * 1000:.0f} ms, restore "
                    f"{restore_t[-1] * 1000:.0f} ms, KG {kg_t[-1] * 1000:.0f} ms")
            results["create_to_first_result"] = {"vmkg_pool": pool_t, "vmkg_restore": restore_t, "kg": kg_t}

        # 2. first data-science cells of a new kernel
        if want("cells"):
            for key, code in (("first_pandas_cell", PANDAS_CELL), ("first_plot_cell", PLOT_CELL)):
                o, r0, k = [], [], []
                for i in range(n):
                    await asyncio.to_thread(wait_pool, ours)
                    await asyncio.sleep(0.5)
                    o.append(await create_to_first_result(ours, code))
                    r0.append(await create_to_first_result(ours0, code))
                    k.append(await create_to_first_result(kg, code))
                    say(f"  {key} {i + 1}/{n}: pool {o[-1] * 1000:.0f} ms, restore {r0[-1] * 1000:.0f} ms, "
                        f"KG {k[-1] * 1000:.0f} ms")
                results[key] = {"vmkg_pool": o, "vmkg_restore": r0, "kg": k}

        # 3. a pooled kernel's first execute against its warm round trip
        if want("pooled"):
            pf = [await pooled_first_execute(ours, 10) for _ in range(max(3, n))]
            results["pooled_first_execute"] = {"first": [x[0] for x in pf], "warm": [x[1] for x in pf],
                                               "first_cpu": [x[2] for x in pf], "warm_cpu": [x[3] for x in pf]}
            say(f"  pooled first execute: {[round(x[0] * 1000) for x in pf]} ms, warm {[round(x[1] * 1000) for x in pf]} ms")

        # 4. warm round trip
        if want("rtt"):
            k_ours: list[float] = []
            k_kg: list[float] = []
            g_ours: list[float] = []
            g_kg: list[float] = []
            v_ours: list[float] = []
            v_kg: list[float] = []
            rtt_ours = await warm_rtt(ours, args.rtt, kernel_share=k_ours, gateway_cpu=g_ours, kernel_cpu=v_ours)
            rtt_kg = await warm_rtt(kg, args.rtt, kernel_share=k_kg, gateway_cpu=g_kg, kernel_cpu=v_kg)
            results["warm_rtt"] = {"vmkg": rtt_ours, "kg": rtt_kg}
            results["warm_rtt_kernel_share"] = {"vmkg": k_ours, "kg": k_kg}
            results["warm_rtt_gateway_cpu"] = {"vmkg": g_ours, "kg": g_kg}
            results["warm_rtt_kernel_cpu"] = {"vmkg": v_ours, "kg": v_kg}
            results["warm_rtt_no_result"] = {"vmkg": await warm_rtt(ours, args.rtt, "x = 1"),
                                             "kg": await warm_rtt(kg, args.rtt, "x = 1")}
            say("  warm rtt done")

        # 5. output: 20 MB in one print; the loop of small writes over both protocols
        if want("output"):
            tp_ours = [await throughput(ours) for _ in range(args.tp)]
            tp_kg = [await throughput(kg) for _ in range(args.tp)]
            kg_default = start_kg(workdir, label="Kernel Gateway (as shipped)")
            started.append(kg_default)
            tp_kg_default = await throughput(kg_default)
            kg_default.stop()
            results["throughput"] = {"vmkg": tp_ours, "kg": tp_kg, "kg_default": tp_kg_default}
            loops: dict[str, Any] = {}
            for proto, v1 in (("json", False), ("v1", True)):
                loops[f"vmkg_{proto}"] = [await loop_output(ours, v1, args.loop_lines) for _ in range(args.tp)]
                loops[f"kg_{proto}"] = [await loop_output(kg, v1, args.loop_lines) for _ in range(args.tp)]
                say(f"  loop output {proto}: vmkg {loops[f'vmkg_{proto}']}, KG {loops[f'kg_{proto}']}")
            results["loop_output"] = loops
            results["loop_lines"] = args.loop_lines

        # 6. bursts of 8 back-to-back: the first one raises the pool's target (warm-up)
        if want("burst"):
            await asyncio.to_thread(wait_pool, ours)
            first_burst = await burst(ours)
            b_ours, b_kg = [], []
            for i in range(args.bursts):
                await asyncio.to_thread(wait_burst_pool, ours, 8)
                b_ours += await burst(ours)
                b_kg += await burst(kg)
                say(f"  burst {i + 1}/{args.bursts}: vmkg p50 {statistics.median(b_ours) * 1000:.0f} ms, "
                    f"KG p50 {statistics.median(b_kg) * 1000:.0f} ms")
            results["burst_8"] = {"vmkg_first": first_burst, "vmkg": b_ours, "kg": b_kg}

        # 7. a sustained run of 30 creates
        if want("sustained"):
            await asyncio.to_thread(wait_burst_pool, ours, 8)
            results["sustained_30"] = {"vmkg": await sustained(ours, args.sustained),
                                           "kg": await sustained(kg, args.sustained)}
            say("  sustained done")

        # 8. idle private memory of a restored kernel
        if want("memory"):
            results["idle_private_mb"] = [await idle_memory(ours0, workdir / "state") for _ in range(3)]

        # 9. ten concurrent creates (the pool has grown with demand by now; then a pool of 10)
        if want("concurrent"):
            await asyncio.to_thread(wait_pool, ours)
            conc_ours = await concurrent_creates(ours, 10)
            conc_kg = await concurrent_creates(kg, 10)
            ours.stop()
            ours0.stop()
            ours10 = start_vmkg(workdir, pool=10)
            started.append(ours10)
            await asyncio.to_thread(wait_pool, ours10, 10, 600)
            await asyncio.sleep(2)
            conc_ours10 = await concurrent_creates(ours10, 10)
            results["concurrent_10"] = {"vmkg": conc_ours, "kg": conc_kg, "vmkg_pool10": conc_ours10}
    return results


def report(r: dict[str, Any]) -> None:
    def row(what: str, ours: str, kg: str, ratio: float | None = None) -> None:
        print(f"{what:48s} {ours:>24s} {kg:>24s}  " + (f"{ratio:.2f}x" if ratio is not None else ""))

    def p50(xs: list[float]) -> float:
        return statistics.median(xs)

    print("\nvmkg serve (microVM, QEMU TCG) vs Jupyter Kernel Gateway 3.0.1 (local ipykernel), same run")
    row("measure", "vmkg", "Kernel Gateway")
    def rate(runs: list[Any], total: int) -> tuple[float, int]:
        rates = [run[0] / run[1] / 1e6 for run in runs]
        return statistics.median(rates), int(min(run[0] for run in runs))

    if "create_to_first_result" in r:
        c = r["create_to_first_result"]
        row(f"create-to-first-result (1+1), pool (n={len(c['kg'])})", ms(c["vmkg_pool"]), ms(c["kg"]),
            p50(c["vmkg_pool"]) / p50(c["kg"]))
        row("create-to-first-result (1+1), pool empty", ms(c["vmkg_restore"]), ms(c["kg"]),
            p50(c["vmkg_restore"]) / p50(c["kg"]))
    if "first_pandas_cell" in r:
        for key, what in (("first_pandas_cell", "first pandas cell (new kernel)"),
                          ("first_plot_cell", "first matplotlib plot cell (new kernel)")):
            d = r[key]
            row(f"{what}, pool", ms(d["vmkg_pool"]), ms(d["kg"]), p50(d["vmkg_pool"]) / p50(d["kg"]))
            row(f"{what}, pool empty", ms(d["vmkg_restore"]), ms(d["kg"]), p50(d["vmkg_restore"]) / p50(d["kg"]))
    if "burst_8" in r:
        b = r["burst_8"]
        row(f"burst of 8 back-to-back creates, p50 (n={len(b['kg'])})", ms(b["vmkg"]), ms(b["kg"]),
            p50(b["vmkg"]) / p50(b["kg"]))
        row("  the first burst (pool still at 1)", ms(b["vmkg_first"]), "")
    if "sustained_30" in r:
        s_o, s_k = r["sustained_30"]["vmkg"], r["sustained_30"]["kg"]
        row("30 sustained creates: total", f"{s_o[0]:.1f} s", f"{s_k[0]:.1f} s", s_o[0] / s_k[0])
        row("30 sustained creates: p50 of each", ms(s_o[1]), ms(s_k[1]), p50(s_o[1]) / p50(s_k[1]))
    if "concurrent_10" in r:
        c = r["concurrent_10"]
        ck = c["kg"]
        for key, what in (("vmkg", "pool grown by demand"), ("vmkg_pool10", "pool 10")):
            co = c[key]
            row(f"10 concurrent creates, {what}: all answered", f"{co[0] * 1000:.0f} ms",
                f"{ck[0] * 1000:.0f} ms", co[0] / ck[0])
            for label, (_, took, failed) in (("vmkg", co), ("Kernel Gateway", ck)):
                if failed:
                    print(f"  {label}: {len(failed)} of {len(took) + len(failed)} failed: {failed[0]}")
            if co[1] and ck[1]:
                row(f"10 concurrent creates, {what}: p50 of each", ms(co[1]), ms(ck[1]), p50(co[1]) / p50(ck[1]))
    if "pooled_first_execute" in r:
        pf = r["pooled_first_execute"]
        row("pooled kernel: first execute (x = 41; x + 1)", ms(pf["first"]), "")
        row("  the same kernel's warm round trip", ms(pf["warm"]), "")
        row("  first minus warm, p50", f"{(p50(pf['first']) - p50(pf['warm'])) * 1000:.0f} ms", "")
        if pf.get("first_cpu"):
            row("  VM (QEMU) CPU: first / warm execute, p50",
                f"{p50(pf['first_cpu']) * 1000:.0f} / {p50(pf['warm_cpu']) * 1000:.0f} ms", "")
    if "warm_rtt" in r:
        for key, what in (("warm_rtt", "warm execute round trip, 1+1"),
                          ("warm_rtt_no_result", "warm execute round trip, x = 1")):
            w = r[key]
            row(what, ms(w["vmkg"]), ms(w["kg"]), p50(w["vmkg"]) / p50(w["kg"]))
        ks = r["warm_rtt_kernel_share"]
        if ks["vmkg"] and ks["kg"]:
            w = r["warm_rtt"]
            row("  of which in the kernel (busy to idle)", ms(ks["vmkg"]), ms(ks["kg"]))
            row("  outside the kernel (gateway, relay, agent, link)",
                f"{(p50(w['vmkg']) - p50(ks['vmkg'])) * 1000:.0f} ms",
                f"{(p50(w['kg']) - p50(ks['kg'])) * 1000:.0f} ms")
        gc = r.get("warm_rtt_gateway_cpu")
        if gc and gc["vmkg"] and gc["kg"]:
            row("  gateway process CPU per round trip", f"{p50(gc['vmkg']) * 1000:.1f} ms",
                f"{p50(gc['kg']) * 1000:.1f} ms", p50(gc["vmkg"]) / p50(gc["kg"]))
        kc = r.get("warm_rtt_kernel_cpu")
        if kc and kc["vmkg"] and kc["kg"]:
            row("  kernel side CPU per round trip (QEMU / ipykernel)", f"{p50(kc['vmkg']) * 1000:.1f} ms",
                f"{p50(kc['kg']) * 1000:.1f} ms", p50(kc["vmkg"]) / p50(kc["kg"]))
    if "throughput" in r:
        t = r["throughput"]

        ro, go = rate(t["vmkg"], OUTPUT_BYTES)
        rk, gk = rate(t["kg"], OUTPUT_BYTES)
        row("20 MB in one print: MB/s (delivered)", f"{ro:.1f} ({go / OUTPUT_BYTES:.0%})",
            f"{rk:.1f} ({gk / OUTPUT_BYTES:.0%})", ro / rk)
        cpu = statistics.median(run[2] for run in t["vmkg"])
        secs = statistics.median(run[1] for run in t["vmkg"])
        row("  of which the vmkg gateway process (CPU)", f"{cpu:.2f} s of {secs:.2f} s", "")
        row("  Kernel Gateway as shipped (rate limit on)", "", f"{t['kg_default'][0] / OUTPUT_BYTES:.0%} delivered")
    if "loop_output" in r:
        lo = r["loop_output"]
        lines = r.get("loop_lines", LOOP_LINES)
        loop_bytes = lines * 101
        for proto in ("json", "v1"):
            ro, go = rate(lo[f"vmkg_{proto}"], loop_bytes)
            rk, gk = rate(lo[f"kg_{proto}"], loop_bytes)
            row(f"{lines // 1000}k small writes, {proto} websocket: MB/s", f"{ro:.1f} ({go / loop_bytes:.0%})",
                f"{rk:.1f} ({gk / loop_bytes:.0%})", ro / rk)
            runs_o, runs_k = lo[f"vmkg_{proto}"], lo[f"kg_{proto}"]
            if all(len(run) >= 4 for run in runs_o + runs_k):
                def busy(runs: list[Any]) -> str:
                    known = [run[2] for run in runs if run[2] is not None]
                    return f"{p50(known):.2f} s of {p50([run[1] for run in runs]):.2f} s" if known else "?"

                def sink(runs: list[Any]) -> str:
                    t = p50([run[3] for run in runs])
                    return f"{t:.2f} s ({loop_bytes / t / 1e6:.1f} MB/s)"

                row("  the kernel busy with it (its own clock)", busy(runs_o), busy(runs_k))
                row("  the same loop to /dev/null in the kernel", sink(runs_o), sink(runs_k))
            if all(len(run) >= 6 for run in runs_o + runs_k):
                def cpu(runs: list[Any]) -> str:
                    k, g = p50([run[4] for run in runs]), p50([run[5] for run in runs])
                    return f"{k:.1f} s + {g:.1f} s"

                def per_cpu(runs: list[Any]) -> float:
                    return p50([run[0] / max(run[4], run[5], 1e-3) / 1e6 for run in runs])

                row("  CPU: kernel side (QEMU/ipykernel) + gateway", cpu(runs_o), cpu(runs_k))
                row("  MB/s if each side had its own core", f"{per_cpu(runs_o):.1f}", f"{per_cpu(runs_k):.1f}",
                    per_cpu(runs_o) / per_cpu(runs_k))
    if "idle_private_mb" in r:
        mem = r["idle_private_mb"]
        row("idle restored kernel: QEMU Private_Dirty", f"{p50(mem):.1f} MB (max {max(mem):.1f})", "")

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10, help="repetitions of the create and first-cell measures")
    ap.add_argument("--rtt", type=int, default=30, help="warm round trips per server")
    ap.add_argument("--tp", type=int, default=2, help="20 MB and output-loop runs per server")
    ap.add_argument("--loop-lines", type=int, default=LOOP_LINES,
                    help="lines of the output loop (the issue's: 200000; fewer on a loaded host, the rate is what counts)")
    ap.add_argument("--bursts", type=int, default=2, help="measured bursts of 8 per server")
    ap.add_argument("--sustained", type=int, default=30, help="creates in the sustained run")
    ap.add_argument("--only", default="", help="comma-separated sections: create, cells, pooled, rtt, "
                                               "output, burst, sustained, memory, concurrent (default all)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--tcg-tb-mb", type=int, default=0,
                    help="TCG translation cache of vmkg's VMs in MB ($VMKG_TCG_TB_MB; default: the gateway's)")
    args = ap.parse_args()
    if args.tcg_tb_mb:
        EXTRA_ENV["VMKG_TCG_TB_MB"] = str(args.tcg_tb_mb)
    results = Results(args.json)
    # a TERM (a timeout, a kill) ends the run as Ctrl-C does: through the finally blocks
    # that stop the servers it started, which would otherwise keep running with their VMs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        asyncio.run(main_async(args, results))
    finally:
        report(results)  # what was measured, also when a section failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
