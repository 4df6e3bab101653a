#!/usr/bin/env python3
"""Benchmark durable kernels (``kernelmanager.durable``): hibernation, wake, restart, density.

Runtime level (jupyter_client ``AsyncKernelManager`` on the microVM kernelspec) except the
restart part, which runs ``vmkg serve`` twice:

1. **Hibernate vs dirty memory.** For each size W (MB): a fresh kernel writes W MB of its
   own (random bytes), is hibernated: seconds and bytes on disk; then one cell is sent to
   the sleeping kernel: wake -> first result (p50 over ``-r`` rounds). Target: the image
   grows with W (not with the VM's RAM), wake -> result <= 1.0 s up to 100 MB.
2. **Idle checkpoint** (the crash case): what one background checkpoint costs a kernel
   that wrote W MB (the cell-to-cell overhead when ``checkpoint_on_idle`` is on).
3. **Gateway restart** with ``--restart-kernels`` kernels (``VMKG_PERSIST_KERNELS``):
   SIGTERM -> stopped, start -> serving, and -> every kernel answered a cell with its state.
4. **Density** (``--density N``, ``--density-mb``): N kernels each holding 10 MB are
   hibernated; host memory and disk used while they sleep, then the wake -> result latency
   of ``--density-wakes`` random ones. The issue asks for 200; on a shared 2-core machine
   pass a smaller N and say so.

Run: ``python bench/bench_durable.py -r 3 --sizes 0,10,50,100 --restart-kernels 20 --density 40``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ensure_kernelspecs, pct
from jupyter_client.manager import AsyncKernelManager

from kernelmanager import vm_handle

KERNEL = "python3-microvm"


async def cell(km: AsyncKernelManager, code: str, timeout: float = 600) -> str:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
        out: list[str] = []
        reply = await kc.execute_interactive(
            code, timeout=timeout,
            output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)
    finally:
        kc.stop_channels()


def writer(mb: int) -> str:
    return f"import os\nmine = os.urandom({mb} * 2**20)\nprint(len(mine))"


async def start() -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    return km


async def timed_first_result(km: AsyncKernelManager) -> float:
    """Seconds from sending a cell to a sleeping kernel to its reply (channels open first)."""
    kc = km.client()
    kc.start_channels()
    try:
        t0 = time.monotonic()
        reply = await kc.execute_interactive("1 + 1", timeout=600, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
        return time.monotonic() - t0
    finally:
        kc.stop_channels()


async def baseline(rounds: int) -> float:
    """A fresh kernel's start -> first result p50 right now (the machine's speed, for scale)."""
    times = []
    for _ in range(rounds):
        t0 = time.monotonic()
        km = await start()
        try:
            await cell(km, "1 + 1")
            times.append(time.monotonic() - t0)
        finally:
            await km.shutdown_kernel(now=True)
    return statistics.median(times)


async def part_sizes(sizes: list[int], rounds: int) -> None:
    print(f"\nfor scale, a fresh kernel's start -> first result now: p50 {await baseline(rounds):.2f} s")
    print("\n== hibernate and wake vs what the kernel wrote")
    print(f"{'MB written':>10} {'hibernate s':>12} {'image MB':>9} {'wake->result p50 s':>19} "
          f"{'idle ckpt s':>12} {'ckpt MB':>8}")
    for mb in sizes:
        hib, size, wake, ck, cksize = [], [], [], [], []
        for _ in range(rounds):
            km = await start()
            try:
                await cell(km, writer(mb))
                h = vm_handle(km)
                assert h is not None
                t0 = time.monotonic()
                cksize.append(await h.idle_checkpoint(idle_timeout=30) or 0)
                ck.append(time.monotonic() - t0)
                t0 = time.monotonic()
                size.append(await h.hibernate(idle_timeout=30))
                hib.append(time.monotonic() - t0)
                wake.append(await timed_first_result(km))
            finally:
                await km.shutdown_kernel(now=True)
        print(f"{mb:>10} {statistics.median(hib):>12.2f} {statistics.median(size) / 2**20:>9.1f} "
              f"{statistics.median(wake):>19.2f} {statistics.median(ck):>12.2f} "
              f"{statistics.median(cksize) / 2**20:>8.1f}", flush=True)


def _serve(state: Path, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    log = open(work / f"gw-{time.monotonic_ns()}.log", "w")
    full = {**os.environ, "VMKG_STATE_DIR": str(state), "VMKG_AUTH_TOKEN": "bench", **env}
    proc = subprocess.Popen([sys.executable, "-c", "from gateway.app import main; main()", "serve",
                             "--ip=127.0.0.1", "--port=0", "--pool-size=0"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=full, cwd=work)
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vmkg serve exited; see {log.name}")
        m = re.search(r"serving on (http://\S+?)/? ", line)
        if m:
            return proc, m.group(1).rstrip("/")


async def part_restart(n: int) -> None:
    import requests
    from vmkg_client import sdk

    print(f"\n== gateway restart with {n} kernels (VMKG_PERSIST_KERNELS=1)")
    work = Path(tempfile.mkdtemp(prefix="vmkg-bench-durable-"))
    state = work / "state"
    env = {"VMKG_PERSIST_KERNELS": "1"}
    hdr = {"Authorization": "token bench"}
    proc, url = _serve(state, work, env)
    try:
        async with sdk.Gateway(url, "bench") as gw:
            kernels = []
            for i in range(n):
                k = await gw.start_kernel()
                k.detach()
                await k.run_code(f"mark = {i}")
                await k.close()
                kernels.append(k.id)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
        stop_s = time.monotonic() - t0
        t0 = time.monotonic()
        proc, url = _serve(state, work, env)
        serve_s = time.monotonic() - t0
        got = await asyncio.to_thread(requests.get, url + "/api/kernels", headers=hdr, timeout=60)
        listed = {k["id"] for k in got.json()}
        assert set(kernels) <= listed, "not every kernel came back"

        async def answer(kid: str, i: int) -> None:
            async with sdk.Gateway(url, "bench") as gw:
                k = await gw.connect_kernel(kid)
                r = await k.run_code("mark")
                assert r.text == str(i), (kid, r.text)
                await k.close()

        await asyncio.gather(*(answer(kid, i) for i, kid in enumerate(kernels)))
        all_s = time.monotonic() - t0
        print(f"SIGTERM -> stopped (all hibernated): {stop_s:.1f} s; start -> serving "
              f"(all {n} resumed): {serve_s:.1f} s; start -> all {n} answered with their state: "
              f"{all_s:.1f} s", flush=True)
        for kid in kernels:
            await asyncio.to_thread(requests.delete, f"{url}/api/kernels/{kid}", headers=hdr, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
        shutil.rmtree(work, ignore_errors=True)


def host_memory() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemTotal"] - info["MemAvailable"]


async def part_density(n: int, mb: int, wakes: int) -> None:
    from kernelmanager import durable_usage

    print(f"\n== density: {n} kernels holding {mb} MB each, hibernated")
    mem0 = host_memory()
    kms: list[AsyncKernelManager] = []
    try:
        for i in range(n):
            km = await start()
            await cell(km, writer(mb) + f"\nidx = {i}")
            h = vm_handle(km)
            assert h is not None
            await h.hibernate(idle_timeout=30)
            kms.append(km)
        await asyncio.sleep(5)
        cpu0 = os.times()
        t0 = time.monotonic()
        await asyncio.sleep(10)
        cpu = (sum(os.times()[:4]) - sum(cpu0[:4])) / (time.monotonic() - t0)
        mem = host_memory() - mem0
        disk = durable_usage()
        lat = []
        for i in random.sample(range(n), min(wakes, n)):
            t = time.monotonic()
            out = await cell(kms[i], "print(idx, len(mine))")
            lat.append(time.monotonic() - t)
            assert out.split() == [str(i), str(mb << 20)], out
        print(f"host memory added while {n} sleep: {mem / 2**20:.0f} MB ({mem / n / 2**20:.1f} MB each); "
              f"this process's CPU while idle: {cpu * 100:.1f}%; disk: {disk / 2**20:.0f} MB "
              f"({disk / n / 2**20:.1f} MB each); wake -> result of {len(lat)} random ones: "
              f"p50 {pct(lat, 50):.2f} s, max {max(lat):.2f} s (state intact)", flush=True)
    finally:
        await asyncio.gather(*(k.shutdown_kernel(now=True) for k in kms), return_exceptions=True)


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-r", "--rounds", type=int, default=3)
    p.add_argument("--sizes", default="0,10,50,100")
    p.add_argument("--restart-kernels", type=int, default=20)
    p.add_argument("--density", type=int, default=0, help="kernels for the density run (0: skip)")
    p.add_argument("--density-mb", type=int, default=10)
    p.add_argument("--density-wakes", type=int, default=20)
    args = p.parse_args(argv)
    ensure_kernelspecs()
    os.environ.setdefault("VMKG_STATE_DIR", tempfile.mkdtemp(prefix="vmkg-bench-state-"))
    print(f"state dir {os.environ['VMKG_STATE_DIR']} (on disk: {shutil.disk_usage(os.environ['VMKG_STATE_DIR']).total >> 30} GB fs)")
    if args.sizes:
        await part_sizes([int(x) for x in args.sizes.split(",")], args.rounds)
    if args.restart_kernels > 0:
        await part_restart(args.restart_kernels)
    if args.density > 0:
        await part_density(args.density, args.density_mb, args.density_wakes)


if __name__ == "__main__":
    asyncio.run(main())
    from kernelmanager.runtime import Runtime

    if Runtime._instance is not None:
        Runtime._instance.shutdown()

