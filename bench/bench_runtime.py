#!/usr/bin/env python3
"""Benchmark the VM runtime against the local ipykernel a user would otherwise start.

In one run, interleaved so both see the same machine noise:

* start-to-first-result: ``KernelManager.start_kernel()`` then one ``execute_request``
  whose reply carries ``1+1`` (the reply is on the reliable shell channel, so no iopub
  slow-joiner skews it), for ``python3-microvm`` (a VM restored from the template) and
  ``python3`` (a local ipykernel process);
* the same through ``jupyter_client.start_new_kernel`` (which adds its wait_for_ready);
* warm execute round trip;
* the restore's own phases (QEMU spawn, link up, identity taken on);
* one restored kernel at idle: private memory of its QEMU process and CPU use.

Prints medians (p50) and p90 and the ratio ours/local. Run: ``python bench/bench_runtime.py -n 10``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import ensure_kernelspecs, pct
from jupyter_client.manager import KernelManager, start_new_kernel

VM, LOCAL = "python3-microvm", "python3"






def first_result(name: str) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.execute("", silent=True, user_expressions={"r": "1+1"})
        reply = kc.get_shell_msg(timeout=60)
        dt = time.perf_counter() - t0
        assert reply["content"]["user_expressions"]["r"]["data"]["text/plain"] == "2", reply
        phases: dict[str, float] = {}
        vk = getattr(km.provisioner, "vm_kernel", None)
        if vk is not None:
            phases = dict(vk.timings)
        return dt, phases
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def start_new(name: str) -> float:
    t0 = time.perf_counter()
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=60)
    try:
        kc.execute_interactive("1+1", timeout=60)
        return time.perf_counter() - t0
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def warm_rtt(name: str, n: int = 20) -> list[float]:
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=60)
    try:
        for _ in range(3):
            kc.execute_interactive("1+1", timeout=60)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            kc.execute_interactive("1+1", timeout=60)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def idle_footprint(seconds: float) -> dict[str, Any]:
    km, kc = start_new_kernel(kernel_name=VM, startup_timeout=60)
    try:
        kc.execute_interactive("x = sum(range(1000))", timeout=60)
        pid = km.provisioner.vm_kernel.vm.pid  # type: ignore[union-attr]
        time.sleep(2)

        def cpu() -> float:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu(), time.monotonic()
        mem = {}
        for line in open(f"/proc/{pid}/smaps_rollup"):
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Anonymous", "Private_Dirty", "Private_Clean", "Pss_File"):
                mem[k] = int(v.split()[0]) / 1024
        return {"cpu_percent": 100 * (c1 - c0) / (t1 - t0), **{f"{k}_MB": round(v, 1) for k, v in mem.items()}}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def row(label: str, ours: list[float], local: list[float]) -> None:
    o50, l50 = statistics.median(ours), statistics.median(local)
    print(f"{label:38s} ours p50 {o50 * 1000:7.0f} ms  p90 {pct(ours, 90) * 1000:7.0f} ms | "
          f"local p50 {l50 * 1000:7.0f} ms  p90 {pct(local, 90) * 1000:7.0f} ms | ratio {o50 / l50:5.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10, help="kernels per measurement and flavour")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    ensure_kernelspecs()
    print("warming up (template bake on first use may take minutes) ...", file=sys.stderr)
    first_result(VM)
    first_result(LOCAL)

    ours, local, phases = [], [], []
    for _ in range(args.n):
        dt, ph = first_result(VM)
        ours.append(dt)
        phases.append(ph)
        local.append(first_result(LOCAL)[0])
    ours_snk, local_snk = [], []
    for _ in range(args.n):
        ours_snk.append(start_new(VM))
        local_snk.append(start_new(LOCAL))
    rtt_ours, rtt_local = warm_rtt(VM), warm_rtt(LOCAL)
    idle = idle_footprint(args.idle_seconds)

    from kernelmanager import accel

    choice = accel.detect()
    print(f"\naccelerator: {choice.name} ({choice.reason}); n={args.n}; cores={os.cpu_count()}")
    row("start -> first result (execute reply)", ours, local)
    row("start_new_kernel -> first result", ours_snk, local_snk)
    row("warm execute round trip", rtt_ours, rtt_local)
    for key in ("spawn", "connected", "restored"):
        vals = [p[key] for p in phases if key in p]
        if vals:
            print(f"  restore phase {key:10s} p50 {statistics.median(vals) * 1000:6.0f} ms  "
                  f"p90 {pct(vals, 90) * 1000:6.0f} ms")
    print(f"idle restored kernel over {args.idle_seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "first_result": {"ours": ours, "local": local}, "start_new_kernel": {"ours": ours_snk, "local": local_snk},
            "warm_rtt": {"ours": rtt_ours, "local": rtt_local}, "phases": phases, "idle": idle,
            "accel": choice.name}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
