#!/usr/bin/env python3
"""One hostile kernel against its neighbour, through ``vmkg serve``.

The attacker does the worst of issue 9 section 2 that needs no root in the guest: in a
loop, an iopub message over the size limit (``kernel.session.send`` with 33 MiB of
text), a deeply nested one (``[`` x 100,000), and an output flood (``print`` as fast as
the kernel can). Its websocket is read (and discarded) as a client would. Meanwhile the
neighbour kernel's warm round trip (``1+1`` to execute_reply and idle over its own
websocket) is measured and compared with the same measure while the attacker is quiet.

Targets (issue 9): neighbour p50 within 1.5x of quiet, p99 within 3x; the gateway's RSS
grows by at most 200 MB. Under TCG the attacker's VM competes for the same CPUs as
everything else; the jail's CPU quota (another change) caps that share.

Run: ``python bench/bench_hostile.py`` (``-n`` samples per phase, ``--json FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_gateway import connect, execute_request, run_cell, start_vmkg  # noqa: E402
from bench.common import pct  # noqa: E402

ATTACK = """
import sys, time
k = get_ipython().kernel
parent = k.get_parent("shell") if hasattr(k, "get_parent") else k._parent_header
t_end = time.time() + {seconds}
n = 0
while time.time() < t_end:
    k.session.send(k.iopub_socket, "stream", {{"name": "stdout", "text": "x" * (33 << 20)}}, parent=parent)
    k.session.send(k.iopub_socket, "display_data", b"[" * 100000 + b"]" * 100000, parent=parent)
    t = time.time() + 2
    while time.time() < t:
        print("y" * 10000)
        n += 1
print("attack done", n)
"""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def rtts(ws: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await run_cell(ws, "1+1")
        out.append(time.perf_counter() - t0)
    return out


async def drain(ws: Any, stats: dict[str, int]) -> None:
    """Read the attacker's websocket as a client would; count bytes and notices."""
    while True:
        raw = await ws.recv()
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        stats["bytes"] += len(raw)
        if "[vmkg] Output dropped" in raw:
            stats["notices"] += 1
        if "attack done" in raw:
            stats["done"] = 1


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="vmkg-bench-hostile-"))
    os.environ["VMKG_WS_PING_INTERVAL"] = "0"  # latency is measured here, not liveness
    srv = start_vmkg(workdir, pool=0)
    try:
        kid_n = await asyncio.to_thread(srv.post_kernel)
        kid_a = await asyncio.to_thread(srv.post_kernel)
        ws_n, ws_a = await connect(srv, kid_n), await connect(srv, kid_a)
        for _ in range(8):
            await run_cell(ws_n, "1+1")
        await run_cell(ws_a, "1+1")
        stats = {"bytes": 0, "notices": 0, "done": 0}
        reader = asyncio.ensure_future(drain(ws_a, stats))  # the attacker's client always reads
        quiet = await rtts(ws_n, args.n)
        rss0 = rss(srv.proc.pid)
        peak = [rss0]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], rss(srv.proc.pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.ensure_future(sample())
        _, frame = execute_request(ATTACK.format(seconds=args.seconds), ws_a.session)
        await ws_a.send(frame)
        t0 = time.monotonic()  # measure once the attack is under way: its first notice is in
        while not stats["notices"] and not reader.done() and time.monotonic() - t0 < 300:
            await asyncio.sleep(0.5)
        if reader.done():
            raise RuntimeError(f"the attacker's websocket failed: {reader.exception()!r}")
        print(f"attack under way after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        attacked = await rtts(ws_n, args.n)
        sampler.cancel()
        reader.cancel()
        await ws_n.close()
        await ws_a.close()
        await asyncio.to_thread(srv.delete_kernel, kid_a)
        await asyncio.to_thread(srv.delete_kernel, kid_n)
        return {"quiet": quiet, "attack": attacked, "rss_before": rss0, "rss_peak": peak[0],
                "attacker_bytes_read": stats["bytes"], "notices": stats["notices"]}
    finally:
        srv.stop()


def report(r: dict[str, Any]) -> None:
    q, a = r["quiet"], r["attack"]
    q50, q99, a50, a99 = pct(q, 50), pct(q, 99), pct(a, 50), pct(a, 99)
    growth = (r["rss_peak"] - r["rss_before"]) / 1e6
    print(f"neighbour warm round trip, {len(q)} samples per phase (ms):")
    print(f"  quiet   p50 {q50 * 1000:8.1f}  p99 {q99 * 1000:8.1f}")
    print(f"  attack  p50 {a50 * 1000:8.1f}  p99 {a99 * 1000:8.1f}")
    print(f"  ratio   p50 {a50 / q50:8.2f}x (target <= 1.5x)  p99 {a99 / q99:8.2f}x (target <= 3x)")
    print(f"gateway RSS: {r['rss_before'] / 1e6:.0f} MB before, peak {r['rss_peak'] / 1e6:.0f} MB "
          f"during the attack: +{growth:.0f} MB (target <= 200 MB)")
    print(f"attacker's websocket: {r['attacker_bytes_read'] / 1e6:.1f} MB read, "
          f"{r['notices']} '[vmkg] Output dropped' notices")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=30, help="round trips per phase")
    ap.add_argument("--seconds", type=int, default=120, help="how long the attacker keeps going at most")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    r = asyncio.run(main_async(args))
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
