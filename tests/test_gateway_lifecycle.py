"""Lifecycle of ``vmkg serve``: idle culling (cull_idle_timeout, cull_interval,
cull_connected, cull_busy), SIGTERM with live kernels, pooled kernels and open
websockets, and a SIGKILLed gateway whose successor reaps what it left."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from gateway_helpers import Channels, Gateway, qemu_pids
from jupyter_core.paths import jupyter_runtime_dir

pytestmark = pytest.mark.vm


def exists(gw: Gateway, kernel_id: str) -> bool:
    return gw.request("GET", f"/api/kernels/{kernel_id}").status_code == 200


async def test_idle_kernels_are_culled_but_not_connected_or_busy_ones(template: Any, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, "--pool-size=0", "--cull-idle-timeout=3", "--cull-interval=1")
    try:
        idle, connected, busy = (gw.start_kernel()["id"] for _ in range(3))
        ch = await Channels.open(gw, connected)
        b = await Channels.open(gw, busy)
        await b.send("execute_request", {"code": "import time; time.sleep(12)", "silent": False})
        await asyncio.sleep(1)
        await b.close()  # busy and no longer connected
        await asyncio.to_thread(gw.wait_for, lambda: not exists(gw, idle), 30, "the idle kernel to be culled")
        assert await asyncio.to_thread(exists, gw, connected)  # cull_connected is off
        assert await asyncio.to_thread(exists, gw, busy)  # cull_busy is off
        assert gw.metric("vmkg_kernels_culled_total") == 1
        assert (await ch.execute("1+1")).reply["status"] == "ok"
        await ch.close()
        assert "Culling 'idle' kernel" in gw.log()
    finally:
        gw.stop_clean()


async def test_cull_connected_and_cull_busy(template: Any, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, "--pool-size=0", "--cull-idle-timeout=3", "--cull-interval=1",
                 "--cull-connected", "--cull-busy")
    try:
        connected, busy = (gw.start_kernel()["id"] for _ in range(2))
        ch = await Channels.open(gw, connected)
        b = await Channels.open(gw, busy)
        await b.send("execute_request", {"code": "import time; time.sleep(60)", "silent": False})
        await asyncio.to_thread(gw.wait_for, lambda: not exists(gw, connected) and not exists(gw, busy),
                                30, "both kernels to be culled")
        for c in (ch, b):  # their websockets are closed by the shutdown
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(c.ws.recv(), 20)
    finally:
        gw.stop_clean()


async def test_sigterm_shuts_every_vm_down(template: Any, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, "--pool-size=1")
    try:
        kids = [gw.start_kernel()["id"] for _ in range(2)]
        await asyncio.to_thread(gw.wait_pool, 1)
        assert len(qemu_pids(gw.state_dir)) == 3
        ch = await Channels.open(gw, kids[0])
        await ch.send("execute_request", {"code": "import time; time.sleep(60)", "silent": False})
        await asyncio.sleep(0.5)
    except BaseException:
        gw.stop(signal.SIGKILL)
        raise
    t0 = time.monotonic()
    code = await asyncio.to_thread(gw.stop, signal.SIGTERM)
    assert code == 0, gw.log()[-3000:]
    assert time.monotonic() - t0 < 20
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ch.ws.recv(), 10)
    gw.assert_clean(timeout=1)
    assert "stopped" in gw.log()


def test_after_sigkill_the_next_start_reaps_the_orphans(template: Any, tmp_path: Path) -> None:
    first = Gateway(tmp_path, "--pool-size=1")
    try:
        kid = first.start_kernel()["id"]
        first.wait_pool(1)
        vms = first.state_dir / "vms"
        left = {p.name for p in vms.iterdir()}
        assert len(left) == 2
        conn_file = Path(jupyter_runtime_dir()) / f"kernel-{kid}.json"
        assert conn_file.exists()
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while qemu_pids(first.state_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_pids(first.state_dir), "QEMU outlived its SIGKILLed gateway"
    assert {p.name for p in vms.iterdir()} == left  # what a crash leaves behind ...
    second = Gateway(tmp_path, "--pool-size=0", state_dir=first.state_dir)
    try:
        assert not vms.exists() or not any(vms.iterdir())  # ... is reaped at the next start
        assert not conn_file.exists()
        assert second.request("GET", "/api/kernels").json() == []
    finally:
        second.stop_clean()
