#!/usr/bin/env python3
"""Benchmark ``vmkg serve`` against Jupyter Kernel Gateway 3.0.1 running a local ipykernel,
both started by this script in the same run and driven by the same client code (REST with
``requests``, websockets with ``websockets``, legacy JSON protocol as jupyter_server's
GatewayClient speaks it), interleaved so both see the same machine noise:

* create-to-first-result: ``POST /api/kernels``, open the channels websocket, execute
  ``1+1``, until its ``execute_result``. Ours from the warm pool (the pool refilled between
  runs, as at steady state) and from an empty pool (a restore per request);
* warm execute round trip: ``1+1`` until its execute_reply and idle status, after warm-up
  (and ``x = 1``, which has no result to format);
* throughput of one cell printing 20 MB: bytes delivered and MB/s (Kernel Gateway with its
  iopub rate limit turned off, and once as shipped, to show what its limit drops), and the
  CPU time the vmkg gateway process itself spent on it;
* 10 concurrent creates: wall time until all ten have a first result, and the median; ours
  with the default pool of 1 and with a pool of 10.

Prints medians (p50) and ratios ours/KG. Run: ``python bench/bench_gateway.py`` (``-n``
repetitions, ``--json FILE`` to keep the numbers).
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


class Server:
    def __init__(self, label: str, url: str, proc: subprocess.Popen[str], kernel: str) -> None:
        self.label, self.url, self.proc, self.kernel = label, url, proc, kernel
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
        text = requests.get(self.url + "/metrics", headers=self.h, timeout=30).text
        m = re.search(r'^vmkg_kernels\{state="pooled"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

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
           "PYTHONUNBUFFERED": "1"}
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
    return Server(f"vmkg (pool {pool})", url, proc, "python3-microvm")


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


async def connect(srv: Server, kid: str) -> Any:
    session = uuid.uuid4().hex
    ws = await websockets.connect(f"{srv.ws_url}/api/kernels/{kid}/channels?session_id={session}",
                                  additional_headers=srv.h, max_size=None, open_timeout=120,
                                  ping_interval=None)
    ws.session = session  # type: ignore[attr-defined]
    return ws


async def run_cell(ws: Any, code: str, until: str = "idle", timeout: float = 600) -> dict[str, Any]:
    """Execute ``code``; returns stdout bytes and what arrived, once ``until`` is seen
    ('result': the execute_result; 'idle': execute_reply and idle status)."""
    msg_id, frame = execute_request(code, ws.session)
    await ws.send(frame)
    out = 0
    reply = idle = False
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        m = json.loads(raw)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        t = m["header"]["msg_type"]
        if t == "stream":
            out += len(m["content"]["text"])
        elif t == "execute_result" and until == "result":
            return {"stdout": out}
        elif t == "execute_reply":
            reply = True
        elif t == "status" and m["content"]["execution_state"] == "idle":
            idle = True
        if reply and idle:
            return {"stdout": out}


async def first_result(srv: Server) -> tuple[float, str, Any]:
    """POST, websocket, ``1+1`` until its result: (seconds, kernel id, websocket)."""
    t0 = time.perf_counter()
    kid = await asyncio.to_thread(srv.post_kernel)
    ws = await connect(srv, kid)
    await run_cell(ws, "1+1", until="result")
    return time.perf_counter() - t0, kid, ws


async def dispose(srv: Server, kid: str, ws: Any) -> None:
    await ws.close()
    await asyncio.to_thread(srv.delete_kernel, kid)


async def create_to_first_result(srv: Server) -> float:
    took, kid, ws = await first_result(srv)
    await dispose(srv, kid, ws)
    return took


async def settle(srv: Server) -> None:
    """Let a vmkg pool finish refilling (restore + warm-up), so it does not compete with
    what is measured next."""
    if srv.label.startswith("vmkg"):
        await asyncio.sleep(1.5)  # pool_refill_delay
        await asyncio.to_thread(wait_pool, srv)


async def warm_rtt(srv: Server, n: int, code: str = "1+1") -> list[float]:
    kid = await asyncio.to_thread(srv.post_kernel)
    ws = await connect(srv, kid)
    try:
        await settle(srv)
        for _ in range(8):
            await run_cell(ws, code)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await run_cell(ws, code)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        await ws.close()
        await asyncio.to_thread(srv.delete_kernel, kid)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def concurrent_creates(srv: Server, n: int) -> tuple[float, list[float]]:
    """(seconds until all ``n`` have a first result, each one's create-to-first-result)"""
    t0 = time.perf_counter()
    each = await asyncio.gather(*(first_result(srv) for _ in range(n)))
    wall = time.perf_counter() - t0
    await asyncio.gather(*(dispose(srv, kid, ws) for _, kid, ws in each))
    return wall, [took for took, _, _ in each]


def wait_pool(srv: Server, n: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while srv.pooled() < n and time.monotonic() < deadline:
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


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="vmkg-bench-gw-"))
    results: dict[str, Any] = {}
    with servers(workdir) as started:
        ours = start_vmkg(workdir, pool=1)
        started.append(ours)
        ours0 = start_vmkg(workdir, pool=0)
        started.append(ours0)
        kg = start_kg(workdir, "--ZMQChannelsWebsocketConnection.limit_rate=False",
                      label="Kernel Gateway (rate limit off)")
        started.append(kg)
        print(f"servers up: {ours.url} {ours0.url} {kg.url}; warming up", file=sys.stderr)
        await asyncio.to_thread(wait_pool, ours)
        for srv in (ours0, kg):
            await create_to_first_result(srv)

        # 1. create to first result, interleaved
        pool_t, restore_t, kg_t = [], [], []
        for i in range(args.n):
            await asyncio.to_thread(wait_pool, ours)
            await asyncio.sleep(0.5)
            pool_t.append(await create_to_first_result(ours))
            restore_t.append(await create_to_first_result(ours0))
            kg_t.append(await create_to_first_result(kg))
            print(f"  create {i + 1}/{args.n}: pool {pool_t[-1] * 1000:.0f} ms, restore "
                  f"{restore_t[-1] * 1000:.0f} ms, KG {kg_t[-1] * 1000:.0f} ms", file=sys.stderr)
        results["create_to_first_result"] = {"vmkg_pool": pool_t, "vmkg_restore": restore_t, "kg": kg_t}

        # 2. warm round trip
        rtt_ours = await warm_rtt(ours, args.rtt)
        rtt_kg = await warm_rtt(kg, args.rtt)
        results["warm_rtt"] = {"vmkg": rtt_ours, "kg": rtt_kg}
        results["warm_rtt_no_result"] = {"vmkg": await warm_rtt(ours, args.rtt, "x = 1"),
                                         "kg": await warm_rtt(kg, args.rtt, "x = 1")}

        # 3. 20 MB of output
        tp_ours = [await throughput(ours) for _ in range(args.tp)]
        tp_kg = [await throughput(kg) for _ in range(args.tp)]
        kg_default = start_kg(workdir, label="Kernel Gateway (as shipped)")
        started.append(kg_default)
        tp_kg_default = await throughput(kg_default)
        kg_default.stop()
        results["throughput"] = {"vmkg": tp_ours, "kg": tp_kg, "kg_default": tp_kg_default}

        # 4. ten concurrent creates
        await asyncio.to_thread(wait_pool, ours)
        conc_ours = await concurrent_creates(ours, 10)
        conc_kg = await concurrent_creates(kg, 10)
        ours.stop()
        ours0.stop()
        ours10 = start_vmkg(workdir, pool=10)
        started.append(ours10)
        await asyncio.to_thread(wait_pool, ours10, 10, 300)
        await asyncio.sleep(2)
        conc_ours10 = await concurrent_creates(ours10, 10)
        results["concurrent_10"] = {"vmkg": conc_ours, "kg": conc_kg, "vmkg_pool10": conc_ours10}
    return results


def report(r: dict[str, Any]) -> None:
    c = r["create_to_first_result"]
    p50 = {k: statistics.median(v) for k, v in c.items()}
    print("\nvmkg serve (microVM, QEMU TCG) vs Jupyter Kernel Gateway 3.0.1 (local ipykernel), same run")
    print(f"{'measure':44s} {'vmkg':>24s} {'Kernel Gateway':>24s}  ratio")
    print(f"{'create-to-first-result p50, from the pool':44s} {ms(c['vmkg_pool']):>24s} {ms(c['kg']):>24s}  "
          f"{p50['vmkg_pool'] / p50['kg']:.2f}x")
    print(f"{'create-to-first-result p50, pool empty':44s} {ms(c['vmkg_restore']):>24s} {ms(c['kg']):>24s}  "
          f"{p50['vmkg_restore'] / p50['kg']:.2f}x")
    for key, what in (("warm_rtt", "warm execute round trip p50, 1+1"),
                      ("warm_rtt_no_result", "warm execute round trip p50, x = 1")):
        w = r[key]
        print(f"{what:44s} {ms(w['vmkg']):>24s} {ms(w['kg']):>24s}  "
              f"{statistics.median(w['vmkg']) / statistics.median(w['kg']):.2f}x")
    t = r["throughput"]

    def rate(runs: list[list[float]]) -> tuple[float, int]:
        rates = [run[0] / run[1] / 1e6 for run in runs]
        return statistics.median(rates), int(min(run[0] for run in runs))

    ro, go = rate(t["vmkg"])
    rk, gk = rate(t["kg"])
    print(f"{'20 MB print: MB/s (delivered of 20 MiB)':44s} {f'{ro:.1f} ({go / OUTPUT_BYTES:.0%})':>24s} "
          f"{f'{rk:.1f} ({gk / OUTPUT_BYTES:.0%})':>24s}  {ro / rk:.2f}x")
    cpu = statistics.median(run[2] for run in t["vmkg"])
    secs = statistics.median(run[1] for run in t["vmkg"])
    print(f"{'  of which the vmkg gateway process (CPU)':44s} {f'{cpu:.2f} s of {secs:.2f} s':>24s}")
    got_default = t["kg_default"][0]
    print(f"{'  Kernel Gateway as shipped (rate limit on)':44s} {'':>24s} "
          f"{f'{got_default / OUTPUT_BYTES:.0%} delivered':>24s}")
    c = r["concurrent_10"]
    ck = c["kg"]
    for key, what in (("vmkg", "pool 1"), ("vmkg_pool10", "pool 10")):
        co = c[key]
        print(f"{f'10 concurrent creates, {what}: all answered':44s} {f'{co[0] * 1000:.0f} ms':>24s} "
              f"{f'{ck[0] * 1000:.0f} ms':>24s}  {co[0] / ck[0]:.2f}x")
        print(f"{f'10 concurrent creates, {what}: p50 of each':44s} {ms(co[1]):>24s} {ms(ck[1]):>24s}  "
              f"{statistics.median(co[1]) / statistics.median(ck[1]):.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=8, help="create-to-first-result repetitions")
    ap.add_argument("--rtt", type=int, default=30, help="warm round trips per server")
    ap.add_argument("--tp", type=int, default=2, help="20 MB runs per server")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
