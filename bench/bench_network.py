#!/usr/bin/env python3
"""Benchmark networking by policy (``kernelmanager.net``). As root, with nftables.

* slot setup: one namespace slot made from nothing (namespace, veth, tap, nftables,
  resolver socket) and destroyed; what the pool hides from a create;
* create -> first result: ``KernelManager.start_kernel()`` then one ``execute_request``
  answered, for ``python3-microvm`` (no NIC) and ``python3-net-microvm`` (a NIC, a slot
  from the pool, a policy applied), interleaved; target: networked <= plain + 50 ms;
* a 100 MB download by the kernel (``urllib``) from an HTTP server in an "outside"
  namespace this script makes (tests/test_network_vm.py's), with the default bandwidth
  cap and without one.

Prints medians (p50) and the difference / ratio, and the host's load average (the numbers
are only comparable at a similar load). Run: ``python bench/bench_network.py -n 5``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import bench_runtime
from common import ensure_kernelspecs
from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def first_result(name: str) -> float:
    """create -> first result, measured as bench_runtime measures it (one definition)."""
    return bench_runtime.first_result(name)[0]


def download(out: str, mb: int) -> float:
    import asyncio

    import kernelmanager
    km = KernelManager(kernel_name="python3-net-microvm")
    km.start_kernel()
    asyncio.run(kernelmanager.set_egress(km, [f"{out}/32:8080"]))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        code = (f"import time, urllib.request\nt=time.monotonic()\nn=0\n"
                f"with urllib.request.urlopen('http://{out}:8080/bytes/{mb << 20}', timeout=30) as r:\n"
                f"    while (b := r.read(1 << 20)):\n        n += len(b)\n"
                f"assert n == {mb << 20}, n\n")
        mid = kc.execute(code + "dt = time.monotonic() - t", silent=True, user_expressions={"dt": "dt"})
        reply = kc.get_shell_msg(timeout=900)
        while reply["parent_header"].get("msg_id") != mid:
            reply = kc.get_shell_msg(timeout=900)
        content = reply["content"]
        assert content["status"] == "ok", content
        return float(content["user_expressions"]["dt"]["data"]["text/plain"])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--mb", type=int, default=100, help="download size in MB (default 100)")
    ap.add_argument("--download-only", action="store_true", help="only the download")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_network: needs root (network namespaces)")
    os.environ.setdefault("VMKG_TEST_OUTSIDE_NET", "98")  # not the tests' subnet: both may run
    import test_network_vm as tn  # the outside namespace of the tests
    os.environ.update(tn.ENV)
    os.environ["VMKG_NET_POOL"] = "2"
    ensure_kernelspecs()
    from kernelmanager.net import slots
    from kernelmanager.net.policy import NetSettings

    settings = NetSettings.from_env()
    slots.host_setup(settings)
    setup = []
    for _ in range(max(3, args.n)):
        t = time.perf_counter()
        s = slots._allocate(settings)
        setup.append(time.perf_counter() - t)
        s.destroy()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"slot setup (namespace, veth, tap, nftables, resolver socket): p50 {statistics.median(setup) * 1000:.0f} ms")

    outside = tn.Outside()
    outside.up()
    try:
        if not args.download_only:
            first_result("python3-microvm")  # warm-up: templates baked, pool of slots filled
            first_result("python3-net-microvm")
            time.sleep(3)
        plain: list[float] = []
        net: list[float] = []
        for _ in range(0 if args.download_only else args.n):
            plain.append(first_result("python3-microvm"))
            net.append(first_result("python3-net-microvm"))
            time.sleep(1.5)  # let the pool refill, as between creates on a gateway
        p, q = (statistics.median(plain), statistics.median(net)) if plain else (1.0, 1.0)
        if plain:
            print(f"create -> first result: plain p50 {p * 1000:.0f} ms, networked p50 {q * 1000:.0f} ms, "
                  f"+{(q - p) * 1000:.0f} ms (ratio {q / p:.2f})")
        results: dict[str, Any] = {}
        for label, cap in (("capped at $VMKG_NET_BANDWIDTH_MBIT=100", "100"), ("uncapped", "0")):
            os.environ["VMKG_NET_BANDWIDTH_MBIT"] = cap
            slots.close_pool()  # new slots with the new cap
            dt = download(tn.OUT, args.mb)
            results[label] = dt
            print(f"download {args.mb} MB ({label}): {dt:.1f} s, {args.mb / dt:.1f} MB/s")
    finally:
        outside.down()
        slots.close_pool()
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
