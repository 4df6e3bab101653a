#!/usr/bin/env python3
"""Benchmark forking a warm kernel against what a user would do without forks.

A parent kernel (a microVM) warms up by building ~150 MB of Python objects. Then, for
N = 1 and 4, repeatedly:

* fork: ``kernelmanager.fork(parent, N)`` until every branch has answered a
  cell showing the parent's state;
* per-branch private memory (anonymous pages of its QEMU process) right after that, and
  after the branch writes 20 MB of its own, to show it grows only with what it writes;
* the alternative, in the same run: N new kernels of Jupyter Kernel Gateway 3.0.1 (local
  ipykernels), each re-running the warm-up.

Prints medians and ratios. Run: ``python bench/bench_fork.py -r 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_gateway import connect, run_cell, start_kg
from common import ensure_kernelspecs
from jupyter_client.manager import AsyncKernelManager

from kernelmanager import fork

WARMUP = """
import os, hashlib
data = {i: ('%08d' % i) * 12 for i in range(1_100_000)}
digest = hashlib.sha256(repr(len(data)).encode()).hexdigest()
"""
CHECK = "assert len(data) == 1_100_000; 'ok'"
WRITE_MB = 20
RESTORED: dict[int, list[float]] = {}




async def run(km: AsyncKernelManager, code: str) -> None:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        reply = await kc.execute_interactive(code, timeout=600, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()


def anon_mb(km: AsyncKernelManager) -> float:
    pid = km.provisioner.vm_kernel.vm.pid  # type: ignore[union-attr]
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def fork_once(parent: AsyncKernelManager, n: int) -> tuple[float, list[float], list[float]]:
    t0 = time.perf_counter()
    kids = await fork(parent, n)
    restored = time.perf_counter() - t0
    try:
        await asyncio.gather(*(run(k, CHECK) for k in kids))
        dt = time.perf_counter() - t0
        RESTORED.setdefault(n, []).append(restored)
        before = [anon_mb(k) for k in kids]
        await asyncio.gather(*(run(k, f"w = os.urandom({WRITE_MB} * 2**20)") for k in kids))
        after = [anon_mb(k) for k in kids]
        return dt, before, after
    finally:
        await asyncio.gather(*(k.shutdown_kernel(now=True) for k in kids))


async def fresh_once(kg: Any, n: int) -> float:
    """What a user does without forks: N new Kernel Gateway kernels, each re-running the warm-up."""

    async def one() -> str:
        kid = await asyncio.to_thread(kg.post_kernel)
        ws = await connect(kg, kid)
        try:
            await run_cell(ws, WARMUP + "\n" + CHECK)
        finally:
            await ws.close()
        return kid

    t0 = time.perf_counter()
    kids = await asyncio.gather(*(one() for _ in range(n)))
    took = time.perf_counter() - t0
    await asyncio.gather(*(asyncio.to_thread(kg.delete_kernel, k) for k in kids))
    return took


async def main_async(args: argparse.Namespace) -> None:
    ensure_kernelspecs()
    kg = start_kg(Path(tempfile.mkdtemp(prefix="vmkg-bench-kg-")))
    try:
        await bench(args, kg)
    finally:
        kg.proc.send_signal(signal.SIGTERM)
        kg.proc.wait(30)


async def bench(args: argparse.Namespace, kg: Any) -> None:
    parent = AsyncKernelManager(kernel_name="python3-microvm")
    await parent.start_kernel()
    try:
        t0 = time.perf_counter()
        await run(parent, WARMUP)
        warm = time.perf_counter() - t0
        print(f"parent warm-up in the VM: {warm:.1f} s; parent private memory {anon_mb(parent):.0f} MB")
        for n in (1, 4):
            forks, fresh, before, grown = [], [], [], []
            for _ in range(args.r):
                dt, b, a = await fork_once(parent, n)
                forks.append(dt)
                before += b
                grown += [y - x for x, y in zip(b, a, strict=True)]
                fresh.append(await fresh_once(kg, n))
            f50, l50 = statistics.median(forks), statistics.median(fresh)
            print(f"N={n}: fork -> all answered p50 {f50:.2f} s (min {min(forks):.2f}) | "
                  f"{n} new Kernel Gateway kernels + warm-up p50 {l50:.2f} s | ratio {f50 / l50:.2f}x")
            print(f"      of which fork -> all branches restored p50 {statistics.median(RESTORED[n]):.2f} s")
            print(f"      branch private memory p50 {statistics.median(before):.0f} MB idle; "
                  f"after writing {WRITE_MB} MB it grew {statistics.median(grown):.1f} MB "
                  f"({statistics.median(grown) / WRITE_MB:.2f}x what it wrote)")
    finally:
        await parent.shutdown_kernel(now=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-r", type=int, default=3, help="repetitions per N")
    asyncio.run(main_async(ap.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
