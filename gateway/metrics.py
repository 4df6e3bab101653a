"""Prometheus metrics of the gateway, served at ``/metrics`` next to jupyter_server's own
(``http_request_duration_seconds``, ``kernel_currently_running_total``) and the process
collector's.

    vmkg_kernels{state}                  kernels by state: idle, busy, starting, pooled, dead...
    vmkg_kernel_create_seconds{source}   POST /api/kernels to a running kernel; source=pool|restore
    vmkg_vm_restore_seconds              one VM restore (QEMU start to the agent's new identity)
    vmkg_kernels_culled_total            kernels shut down by the idle culler
    vmkg_websocket_backpressure_pauses_total   a slow client made the gateway stop reading
    vmkg_websocket_frames_rejected_total       malformed frames (their websocket was closed)
    vmkg_vms                             QEMU processes of this gateway
    vmkg_vm_memory_bytes{kind}           their memory: rss, pss, private (not shared with the
                                         template or other VMs)
    vmkg_websocket_closed_total{reason}  websockets the gateway itself closed: ping_timeout (no
                                         pong: a dead peer), slow_client (more than
                                         max_client_buffer waiting for it), bad_frame,
                                         kernel_gone (deleted, culled, died), shutdown.
                                         Closes a client starts are not counted.
    vmkg_event_loop_lag_seconds          how late the gateway's event loop runs a timer (measured
                                         every LAG_PERIOD s); a histogram, and
    vmkg_event_loop_lag_max_seconds      the worst lag of the last LAG_WINDOW s (a gauge)

The event loop's lag is the first thing to look at when clients see latency or websockets
time out: everything (websockets, ZMQ, REST) shares that one loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

KERNEL_CREATE_SECONDS = Histogram(
    "vmkg_kernel_create_seconds", "Time from a kernel start request to a running kernel",
    ["source"], buckets=_BUCKETS)
VM_RESTORE_SECONDS = Histogram(
    "vmkg_vm_restore_seconds", "Time to restore one VM from its template snapshot", buckets=_BUCKETS)
KERNELS_CULLED = Counter("vmkg_kernels_culled", "Kernels shut down by the idle culler")
WS_PAUSES = Counter("vmkg_websocket_backpressure_pauses",
                    "Times a slow websocket client made the gateway stop reading a kernel's messages")
WS_REJECTED = Counter("vmkg_websocket_frames_rejected", "Websocket frames refused as malformed")
#: the reasons vmkg_websocket_closed_total is broken down by (all exported from the start, at 0)
CLOSE_REASONS = ("ping_timeout", "slow_client", "bad_frame", "kernel_gone", "shutdown")
WS_CLOSED = Counter("vmkg_websocket_closed", "Websockets closed by the gateway itself, by reason",
                    ["reason"])
for _reason in CLOSE_REASONS:
    WS_CLOSED.labels(_reason)
LOOP_LAG = Histogram("vmkg_event_loop_lag_seconds",
                     "How late the gateway's event loop ran a periodic timer",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
LOOP_LAG_MAX = Gauge("vmkg_event_loop_lag_max_seconds",
                     "The worst event loop lag seen over the last LAG_WINDOW seconds")
LAG_PERIOD = 0.25
LAG_WINDOW = 10.0


def ws_closed(reason: str) -> None:
    """Count a websocket the gateway closes (``reason``: one of CLOSE_REASONS)."""
    WS_CLOSED.labels(reason).inc()


async def measure_loop_lag(period: float = LAG_PERIOD, window: float = LAG_WINDOW) -> None:
    """Forever: sleep ``period`` and record how much later than asked the loop woke us."""
    loop = asyncio.get_running_loop()
    recent: deque[tuple[float, float]] = deque()  # (when, lag)
    while True:
        start = loop.time()
        await asyncio.sleep(period)
        now = loop.time()
        lag = max(0.0, now - start - period)
        LOOP_LAG.observe(lag)
        recent.append((now, lag))
        while recent and recent[0][0] < now - window:
            recent.popleft()
        LOOP_LAG_MAX.set(max(v for _, v in recent))


def start_loop_lag_monitor() -> asyncio.Task[None]:
    """Start :func:`measure_loop_lag` on the running loop (cancel the task to stop it)."""
    return asyncio.ensure_future(measure_loop_lag())


def vm_memory(pid: int) -> dict[str, int]:
    """RSS, PSS and private bytes of one QEMU process (from /proc/PID/smaps_rollup)."""
    out = {"rss": 0, "pss": 0, "private": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if not fields or not fields[0].isdigit():
                    continue
                kb = int(fields[0]) * 1024
                if key == "Rss":
                    out["rss"] += kb
                elif key == "Pss":
                    out["pss"] += kb
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["private"] += kb
    except OSError:
        pass
    return out


class GatewayCollector(Collector):
    """Gauges computed at scrape time from the kernel manager."""

    def __init__(self, kernel_manager: Callable[[], Any]) -> None:
        self._km = kernel_manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        km = self._km()
        if km is None:
            return
        states = GaugeMetricFamily("vmkg_kernels", "Kernels of this gateway by state", labels=["state"])
        counts = km.states()
        for state in ("starting", "idle", "busy", "pooled", "dead"):
            counts.setdefault(state, 0)
        for state, n in sorted(counts.items()):
            states.add_metric([state], n)
        yield states
        pids = km.vm_pids()
        yield GaugeMetricFamily("vmkg_vms", "QEMU processes of this gateway", value=len(pids))
        mem = GaugeMetricFamily("vmkg_vm_memory_bytes", "Memory of this gateway's VMs", labels=["kind"])
        totals = {"rss": 0, "pss": 0, "private": 0}
        for pid in pids:
            for kind, value in vm_memory(pid).items():
                totals[kind] += value
        for kind, value in totals.items():
            mem.add_metric([kind], value)
        yield mem


_collector: GatewayCollector | None = None


def register(kernel_manager: Callable[[], Any]) -> None:
    """Register the scrape-time gauges (once per process)."""
    global _collector
    if _collector is None:
        _collector = GatewayCollector(kernel_manager)
        REGISTRY.register(_collector)
    else:
        _collector._km = kernel_manager
