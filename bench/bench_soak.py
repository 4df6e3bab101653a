#!/usr/bin/env python3
"""The soak's load (``tests/test_soak.py``, without its faults) against ``vmkg serve`` and
against Jupyter Kernel Gateway 3.0.1 running local ipykernels, both started by this script
in the same run (``bench/bench_gateway.py`` starts them), one after the other per run.

Load: 4 kernels, 12 clients (3 per kernel: the v1 websocket protocol, the legacy JSON
protocol, and the vmkg SDK, which speaks v1), each running cells that print 1 to 4,000
numbered lines of 0 to 120 padding characters, for ``--seconds``; every cell's output is
checked line by line (lost, duplicated or reordered lines count as bad cells).

Printed side by side: cells per second, cell latency (request to idle) p50/p99, websocket
closes (seen by clients; for vmkg also the gateway's own count by reason), bad cells, and
the gateway process's RSS over time (for Kernel Gateway: its server process; its kernels
are separate processes, as vmkg's QEMUs are). With ``-n`` > 1, medians over the runs.

Run: ``python bench/bench_soak.py [--seconds 60] [-n 1] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from gateway_helpers import Channels  # noqa: E402

from bench.bench_gateway import TOKEN, Server, servers, start_kg, start_vmkg, wait_pool  # noqa: E402
from bench.common import pct  # noqa: E402

N_KERNELS = 4
CLIENTS_PER_KERNEL = 3
SIZES = (1, 10, 100, 1000, 4000)
WIDTHS = (0, 20, 120)
CELL_TIMEOUT = 240.0
MB = 1024 * 1024


def lines_code(tag: str, n: int, width: int) -> str:
    return (f"import sys\n_pad = 'x' * {width}\n"
            f"for _s in range(0, {n}, 4000):\n"
            f"    sys.stdout.write(''.join(f'{tag}:{{_i}} {{_pad}}\\n' for _i in range(_s, min({n}, _s + 4000))))\n"
            f"sys.stdout.flush()")


def good(text: str, tag: str, n: int, width: int) -> bool:
    return text.splitlines() == [f"{tag}:{i} " + "x" * width for i in range(n)]


class _Target:
    """What ``Channels.open`` needs of a gateway."""

    def __init__(self, srv: Server) -> None:
        self.ws_url = srv.ws_url

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"token {TOKEN}"}


@dataclass
class ClientStats:
    cells: int = 0
    bad: int = 0
    closes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def collect(ch: Channels, msg_id: str) -> str:
    deadline = time.monotonic() + CELL_TIMEOUT
    out: list[str] = []
    reply = idle = False
    while not (reply and idle):
        m = await ch.recv(max(0.1, deadline - time.monotonic()))
        if m.parent.get("msg_id") != msg_id:
            continue
        if m.channel == "iopub" and m.msg_type == "stream":
            out.append(m.content["text"])
        elif m.channel == "iopub" and m.msg_type == "status" and m.content["execution_state"] == "idle":
            idle = True
        elif m.channel == "shell":
            reply = True
    return "".join(out)


async def client(srv: Server, kernel_id: str, kind: str, seed: int, stop_at: float,
                 stats: ClientStats) -> None:
    rng = random.Random(seed)
    ch = sdk_gw = sdk_kernel = None
    if kind == "sdk":
        from vmkg_client import sdk

        sdk_gw = sdk.Gateway(srv.url, TOKEN)
        sdk_kernel = await sdk_gw.connect_kernel(kernel_id)
    else:
        ch = await Channels.open(_Target(srv), kernel_id, v1=(kind == "v1"),  # type: ignore[arg-type]
                                 ping_interval=None)
    try:
        i = 0
        while time.monotonic() < stop_at:
            n, width = rng.choice(SIZES), rng.choice(WIDTHS)
            tag = f"{kind}{seed}-{i}"
            i += 1
            t0 = time.monotonic()
            try:
                if sdk_kernel is not None:
                    ex = await sdk_kernel.run_code(lines_code(tag, n, width), timeout=CELL_TIMEOUT)
                    text = "".join(ex.logs.stdout)
                else:
                    assert ch is not None
                    msg_id = await ch.send("execute_request", {"code": lines_code(tag, n, width),
                                                               "silent": False, "store_history": True})
                    text = await collect(ch, msg_id)
            except websockets.ConnectionClosed as exc:
                stats.closes.append(f"{kind}: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                stats.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                if "closed" in str(exc).lower():
                    stats.closes.append(f"{kind}: {exc}")
                continue
            stats.latencies.append(time.monotonic() - t0)
            stats.cells += 1
            if not good(text, tag, n, width):
                stats.bad += 1
            await asyncio.sleep(rng.uniform(0, 0.3))
    finally:
        if ch is not None:
            await ch.close()
        if sdk_gw is not None:
            await sdk_gw.close()


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gateway_closes(srv: Server) -> dict[str, float]:
    """vmkg_websocket_closed_total by reason ({} for Kernel Gateway)."""
    try:
        text = requests.get(srv.url + "/metrics", headers=srv.h, timeout=30).text
    except requests.RequestException:
        return {}
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^vmkg_websocket_closed_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


async def one_run(srv: Server, seconds: float, seed: int) -> dict[str, Any]:
    kernels = [await asyncio.to_thread(srv.post_kernel) for _ in range(N_KERNELS)]
    try:
        for kid in kernels:  # warm: one cell each
            ch = await Channels.open(_Target(srv), kid)  # type: ignore[arg-type]
            await ch.execute("1")
            await ch.close()
        closes_before = gateway_closes(srv)
        start = time.monotonic()
        stop_at = start + seconds
        kinds = ("v1", "legacy", "sdk")
        stats = [ClientStats() for _ in range(N_KERNELS * CLIENTS_PER_KERNEL)]
        samples: list[tuple[float, int]] = []

        async def sample() -> None:
            while time.monotonic() < stop_at:
                samples.append((time.monotonic() - start, rss(srv.proc.pid)))
                await asyncio.sleep(5)
            samples.append((time.monotonic() - start, rss(srv.proc.pid)))

        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(
            client(srv, kernels[i // CLIENTS_PER_KERNEL], kinds[i % 3], seed * 100 + i, stop_at, s)
            for i, s in enumerate(stats)))
        elapsed = time.monotonic() - start
        await sampler
        after = gateway_closes(srv)
        lat = sorted(x for s in stats for x in s.latencies)
        cells = sum(s.cells for s in stats)
        return {
            "cells": cells, "seconds": elapsed, "cells_per_s": cells / elapsed,
            "p50": pct(lat, 50) if lat else float("nan"), "p99": pct(lat, 99) if lat else float("nan"),
            "bad_cells": sum(s.bad for s in stats),
            "client_closes": sum(len(s.closes) for s in stats),
            "errors": [e for s in stats for e in s.errors][:10],
            "gateway_closes": {k: v - closes_before.get(k, 0) for k, v in after.items()},
            "rss": samples,
        }
    finally:
        for kid in kernels:
            await asyncio.to_thread(srv.delete_kernel, kid)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="vmkg-bench-soak-"))
    results: dict[str, list[dict[str, Any]]] = {"vmkg": [], "kg": []}
    with servers(workdir) as started:
        ours = start_vmkg(workdir, pool=1)
        started.append(ours)
        kg = start_kg(workdir, "--ZMQChannelsWebsocketConnection.limit_rate=False",
                      label="Kernel Gateway (rate limit off)")
        started.append(kg)
        await asyncio.to_thread(wait_pool, ours)
        for run in range(args.n):
            for key, srv in (("vmkg", ours), ("kg", kg)):
                print(f"run {run + 1}/{args.n}: {srv.label}, {args.seconds:.0f} s of load",
                      file=sys.stderr, flush=True)
                results[key].append(await one_run(srv, args.seconds, seed=run + 1))
    return results


def report(r: dict[str, list[dict[str, Any]]]) -> None:
    def med(key: str, what: str) -> float:
        return statistics.median(run[what] for run in r[key])

    print(f"\nsoak load: {N_KERNELS} kernels x {CLIENTS_PER_KERNEL} clients (v1, legacy, SDK), "
          f"cells of 1-4,000 numbered lines; medians of {len(r['vmkg'])} run(s)")
    print(f"{'measure':34s} {'vmkg (microVM, TCG)':>22s} {'Kernel Gateway 3.0.1':>22s}")
    print(f"{'cells per second':34s} {med('vmkg', 'cells_per_s'):>22.2f} {med('kg', 'cells_per_s'):>22.2f}")
    for p in ("p50", "p99"):
        print(f"{'cell latency ' + p:34s} {med('vmkg', p) * 1000:>19.0f} ms {med('kg', p) * 1000:>19.0f} ms")
    print(f"{'cells run (all runs)':34s} {sum(x['cells'] for x in r['vmkg']):>22d} "
          f"{sum(x['cells'] for x in r['kg']):>22d}")
    print(f"{'bad cells (lost/dup/reordered)':34s} {sum(x['bad_cells'] for x in r['vmkg']):>22d} "
          f"{sum(x['bad_cells'] for x in r['kg']):>22d}")
    print(f"{'websocket closes seen by clients':34s} {sum(x['client_closes'] for x in r['vmkg']):>22d} "
          f"{sum(x['client_closes'] for x in r['kg']):>22d}")
    gw: dict[str, float] = {}
    for x in r["vmkg"]:
        for k, v in x["gateway_closes"].items():
            gw[k] = gw.get(k, 0) + v
    print(f"{'  closed by the vmkg gateway':34s} {json.dumps({k: int(v) for k, v in gw.items() if v}) or '{}':>22s}")
    for key, label in (("vmkg", "vmkg"), ("kg", "Kernel Gateway")):
        for i, run in enumerate(r[key]):
            series = " ".join(f"{t:.0f}s:{v / MB:.0f}" for t, v in run["rss"])
            print(f"RSS over time, {label} run {i + 1} (MB): {series}")
            if run["errors"]:
                print(f"  errors ({label}): {run['errors'][:3]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="seconds of load per server and run")
    ap.add_argument("-n", type=int, default=1, help="runs (medians are printed)")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
