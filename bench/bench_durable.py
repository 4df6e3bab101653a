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
4. **Density** (``--density N``, default 200; ``--density-mb`` 10): N kernels each hold
   10 MB of their own random bytes; all but ``--density-awake`` (10) are hibernated. While
   they sit idle: how much lower MemAvailable is, the RSS of the awake QEMUs, CPU (the
   awake QEMUs, this process, the whole host), disk used; then ``--density-wakes`` (20)
   random sleeping ones are woken one by one: wake -> result latency, each answering the
   SHA-256 of its data computed before it slept. Runtime level (no gateway, so no per-user
   limits). A smaller N on a busy machine: say so.

Run: ``python bench/bench_durable.py -r 3 --sizes 0,10,50,100 --restart-kernels 20``;
the density run alone: ``python bench/bench_durable.py --sizes '' --restart-kernels 0``.
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


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def rss(pid: int | None) -> int:
    """Resident bytes of a process (0 when gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, TypeError):
        pass
    return 0


def cpu_ticks(pid: int | None) -> int:
    """utime + stime of a process, in clock ticks (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, TypeError, IndexError, ValueError):
        return 0


def host_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


DENSITY_CELL = """import os, hashlib
mine = os.urandom({mb} * 2**20)
idx = {i}
print(hashlib.sha256(mine).hexdigest())"""


async def part_density(n: int, mb: int, wakes: int, awake: int, parallel: int) -> None:
    """N kernels each holding ``mb`` MB of their own random bytes; all but ``awake`` of
    them hibernated. Host memory (MemAvailable drop, QEMU RSS), CPU while they sit idle,
    disk, then ``wakes`` random sleeping ones woken one by one: wake -> result latency,
    each answering with the SHA-256 of its data as computed before it slept."""
    from kernelmanager import durable_usage

    print(f"\n== density: {n} kernels holding {mb} MB each ({n - min(awake, n)} hibernated, "
          f"{min(awake, n)} awake); {parallel} created at a time; load {os.getloadavg()}", flush=True)
    avail0 = meminfo()["MemAvailable"]
    kms: list[AsyncKernelManager | None] = [None] * n
    digests: list[str] = [""] * n
    sem = asyncio.Semaphore(parallel)
    t_start = time.monotonic()
    created = 0

    async def make(i: int) -> None:
        nonlocal created
        async with sem:
            km = await start()
            kms[i] = km
            digests[i] = (await cell(km, DENSITY_CELL.format(mb=mb, i=i))).strip()
            if i >= awake:
                h = vm_handle(km)
                assert h is not None
                await h.hibernate(idle_timeout=60)
            created += 1
            if created % 10 == 0 or created == n:
                print(f"  {created}/{n} made in {time.monotonic() - t_start:.0f} s "
                      f"(load {os.getloadavg()[0]:.1f}, MemAvailable {meminfo()['MemAvailable'] >> 20} MB)",
                      flush=True)

    try:
        results = await asyncio.gather(*(make(i) for i in range(n)), return_exceptions=True)
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        for i, r in failed[:5]:
            print(f"  kernel {i} failed: {r!r}", flush=True)
        ok = [i for i in range(n) if not isinstance(results[i], BaseException)]
        make_s = time.monotonic() - t_start
        await asyncio.sleep(5)
        pids = []
        for i in ok:
            h = vm_handle(kms[i])
            if h is not None and h.hibernated_since is None and h.pid is not None:
                pids.append(h.pid)
        avail = meminfo()["MemAvailable"]
        qemu_rss = sum(rss(p) for p in pids)
        me = os.getpid()
        ticks0 = {p: cpu_ticks(p) for p in [*pids, me]}
        busy0, total0 = host_busy()
        t0 = time.monotonic()
        await asyncio.sleep(20)
        dt = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        qemu_cpu = sum(cpu_ticks(p) - ticks0[p] for p in pids) / hz / dt
        my_cpu = (cpu_ticks(me) - ticks0[me]) / hz / dt
        busy1, total1 = host_busy()
        host_cpu = (busy1 - busy0) / max(1, total1 - total0)
        load_idle = os.getloadavg()
        disk = durable_usage()
        sleeping = [i for i in ok if i >= awake]
        print(f"made {len(ok)} of {n} kernels in {make_s:.0f} s ({len(failed)} failed)")
        print(f"while they sat idle: MemAvailable {(avail0 - avail) / 2**20:.0f} MB lower than before "
              f"({(avail0 - avail) / max(1, len(ok)) / 2**20:.1f} MB a kernel); RSS of the "
              f"{len(pids)} awake QEMUs {qemu_rss / 2**20:.0f} MB; no QEMU for the "
              f"{len(ok) - len(pids)} hibernated")
        print(f"CPU over {dt:.0f} s idle: awake QEMUs {qemu_cpu * 100:.1f}% of a core, this process "
              f"(the runtime) {my_cpu * 100:.1f}%, whole host {host_cpu * 100:.0f}% of 2 cores "
              f"(other jobs included; load {load_idle[0]:.1f} {load_idle[1]:.1f} {load_idle[2]:.1f})")
        print(f"disk: {disk / 2**20:.0f} MB of durable images ({disk / max(1, len(sleeping)) / 2**20:.1f} MB "
              f"per hibernated kernel)", flush=True)
        lat, restore = [], []
        for i in random.sample(sleeping, min(wakes, len(sleeping))):
            km = kms[i]
            assert km is not None
            t = time.monotonic()
            out = await cell(km, "print(idx, hashlib.sha256(mine).hexdigest())")
            lat.append(time.monotonic() - t)
            assert out.split() == [str(i), digests[i]], (i, out)
            h = vm_handle(km)
            if h is not None and h.last_wake_seconds is not None:
                restore.append(h.last_wake_seconds)
        if lat:
            print(f"wake -> result of {len(lat)} random hibernated ones (SHA-256 of the {mb} MB checked): "
                  f"p50 {pct(lat, 50):.2f} s, p90 {pct(lat, 90):.2f} s, max {max(lat):.2f} s (of which "
                  f"the wake itself, image -> VM attached, p50 {pct(restore or [0.0], 50):.2f} s); "
                  f"load {os.getloadavg()}", flush=True)
    finally:
        live = [k for k in kms if k is not None]
        for j in range(0, len(live), 20):
            await asyncio.gather(*(k.shutdown_kernel(now=True) for k in live[j:j + 20]),
                                 return_exceptions=True)


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-r", "--rounds", type=int, default=3)
    p.add_argument("--sizes", default="0,10,50,100")
    p.add_argument("--restart-kernels", type=int, default=20)
    p.add_argument("--density", type=int, default=200, help="kernels for the density run (0: skip)")
    p.add_argument("--density-mb", type=int, default=10, help="MB of its own data each kernel holds")
    p.add_argument("--density-wakes", type=int, default=20, help="random hibernated ones woken")
    p.add_argument("--density-awake", type=int, default=10, help="kernels left running (the rest sleep)")
    p.add_argument("--density-parallel", type=int, default=2, help="kernels made at a time")
    args = p.parse_args(argv)
    ensure_kernelspecs()
    os.environ.setdefault("VMKG_STATE_DIR", tempfile.mkdtemp(prefix="vmkg-bench-state-"))
    print(f"state dir {os.environ['VMKG_STATE_DIR']} (on disk: {shutil.disk_usage(os.environ['VMKG_STATE_DIR']).total >> 30} GB fs)")
    if args.sizes:
        await part_sizes([int(x) for x in args.sizes.split(",")], args.rounds)
    if args.restart_kernels > 0:
        await part_restart(args.restart_kernels)
    if args.density > 0:
        await part_density(args.density, args.density_mb, args.density_wakes, args.density_awake,
                           args.density_parallel)


if __name__ == "__main__":
    asyncio.run(main())
    from kernelmanager.runtime import Runtime

    if Runtime._instance is not None:
        Runtime._instance.shutdown()

