"""Durable kernels (``kernelmanager.durable``): hibernate and wake, named checkpoints,
forks from checkpoints, the disk budget; at the runtime level (jupyter_client) and
through the gateway (persisting kernels across a SIGTERM). Real VMs."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from gateway_helpers import Channels, Gateway, qemu_pids, serving
from jupyter_client.manager import AsyncKernelManager
from kernel_helpers import value as kernel_value

from kernelmanager import vm_handle

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("template")]
KERNEL = "python3-microvm"


async def value(km: AsyncKernelManager, code: str, expr: str = "None") -> Any:
    """``kernel_helpers.value`` with the longer waits a wake from disk may need."""
    return await kernel_value(km, code, expr, ready_timeout=120, timeout=180)


WRITE = """
import os, sys, hashlib, json
import numpy as np
blob = os.urandom(100 * 2**20)
digest = hashlib.sha256(blob).hexdigest()
x = 41
with open('kept.txt', 'w') as f:
    f.write('on disk')
"""
CHECK = "[x, hashlib.sha256(blob).hexdigest() == digest, 'numpy' in sys.modules, open('kept.txt').read()]"


async def test_hibernate_and_wake_keep_state() -> None:
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    try:
        assert await value(km, WRITE, "x") == 41
        # count the identity handler's runs: a wake has nothing for the kernel process to
        # take on, so it must not interrupt it (a cold trip through it costs ~0.2 s of TCG)
        await value(km, "import signal\n_usr2 = []\n_old = signal.getsignal(signal.SIGUSR2)\n"
                        "signal.signal(signal.SIGUSR2, lambda *a: (_usr2.append(1), _old(*a)))")
        handle = vm_handle(km)
        assert handle is not None
        pid = handle.pid
        size = await handle.hibernate()
        assert handle.hibernated_since is not None and not handle.running
        assert pid is not None and not os.path.exists(f"/proc/{pid}/cmdline") or \
            "qemu" not in open(f"/proc/{pid}/cmdline").read()
        assert 100 << 20 <= size < 400 << 20, size
        assert await km.is_alive()
        # an execute on the kernel's own sockets wakes it; the state is there
        assert await value(km, "", CHECK) == [41, True, True, "on disk"]
        assert await value(km, "", "len(_usr2)") == 0
        assert handle.running and handle.hibernated_since is None
        assert handle.last_wake_seconds is not None
    finally:
        await km.shutdown_kernel(now=True)


async def test_a_kernel_restored_in_place_stays_alive_throughout() -> None:
    """jupyter_client's auto-restarter asks ``is_alive`` every few seconds; while a
    checkpoint restore swaps the VM the kernel must read as alive, or the restarter starts
    a fresh kernel beside the restore (seen: the websocket talked to the restored VM and
    the next hibernation saved the fresh one, so its fork came back with no variables)."""
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    try:
        assert await value(km, "x = 1", "x") == 1
        handle = vm_handle(km)
        assert handle is not None
        await handle.checkpoint("one")
        assert await value(km, "x = 2", "x") == 2
        restore = asyncio.ensure_future(handle.restore_checkpoint("one"))
        dead = 0
        polls = 0
        while not restore.done():
            polls += 1
            dead += not await km.is_alive()
            await asyncio.sleep(0.005)
        await restore
        assert polls > 10, polls  # the restore took long enough to have been watched
        assert dead == 0, f"is_alive said dead {dead} times of {polls} during the restore"
        assert await value(km, "", "x") == 1
    finally:
        await km.shutdown_kernel(now=True)


async def test_shutdown_during_a_checkpoint_waits_for_it(caplog: pytest.LogCaptureFixture) -> None:
    """A kernel shut down while its state is being captured (here an idle checkpoint of
    100 MB) lets the capture end first: it neither fails half-way (the VM killed under the
    page copy) nor leaves an error nobody retrieves; then the VM and the images go."""
    from kernelmanager import paths

    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    kdir = paths.state_dir() / "durable" / str(km.kernel_id)
    checkpoint = None
    try:
        await value(km, "import os\nblob = os.urandom(100 * 2**20)", "len(blob)")
        handle = vm_handle(km)
        assert handle is not None
        pid = handle.pid
        checkpoint = asyncio.ensure_future(handle.idle_checkpoint(idle_timeout=30))
        for _ in range(6000):  # until the capture is under way (its temporary directory)
            if kdir.is_dir() and any(p.name.startswith(".tmp-auto") for p in kdir.iterdir()):
                break
            assert not checkpoint.done(), checkpoint
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the checkpoint did not start")
    finally:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            # the kill itself (jupyter_client's shutdown interrupts first, which a frozen
            # agent answers only after the capture, so only a slow capture reaches this)
            assert km.provisioner is not None
            await asyncio.wait_for(km.provisioner.kill(), 120)
            await asyncio.wait_for(km.shutdown_kernel(now=True), 120)
    assert checkpoint is not None
    size = await checkpoint  # it ended well: the shutdown waited for it
    assert size is not None and size >= 100 << 20
    assert not os.path.exists(f"/proc/{pid}/cmdline") or "qemu" not in open(f"/proc/{pid}/cmdline").read()
    assert not kdir.exists()
    gc.collect()
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


# -- through the gateway ------------------------------------------------------------------------

async def gw_value(gw: Gateway, kernel_id: str, code: str, expr: str = "None") -> Any:
    ch = await Channels.open(gw, kernel_id)
    try:
        if code:
            r = await ch.execute(code, timeout=300)
            assert r.reply["status"] == "ok", r.reply
        return await ch.value(expr)
    finally:
        await ch.close()


def post(gw: Gateway, path: str, expect: int = 200, **body: Any) -> Any:
    r = gw.request("POST", path, json=body)
    assert r.status_code == expect, (r.status_code, r.text)
    return r.json() if r.text else None


async def test_websocket_across_hibernation_checkpoints_and_forks(gw: Gateway) -> None:
    kid = gw.start_kernel()["id"]
    ch = await Channels.open(gw, kid)
    try:
        r = await ch.execute("x = 1\nopen('f.txt', 'w').write('file')", timeout=300)
        assert r.reply["status"] == "ok", r.reply
        model = post(gw, f"/api/kernels/{kid}/hibernate")
        assert model["vmkg"]["hibernated"] is True and model["vmkg"]["since"], model
        assert model["execution_state"] == "idle"
        # the websocket stayed open: its next cell wakes the kernel and gets its result
        assert await ch.value("[x + 1, open('f.txt').read()]") == [2, "file"]
        model = gw.request("GET", f"/api/kernels/{kid}").json()
        assert model["vmkg"]["hibernated"] is False and model["vmkg"]["since"] is None
        # named checkpoint, change, restore in place (same id)
        ck = post(gw, f"/api/kernels/{kid}/checkpoints", 201, name="one")
        assert ck["name"] == "one" and ck["size"] > 0, ck
        r = await ch.execute("x = 100\nopen('f.txt', 'w').write('changed')")
        assert r.reply["status"] == "ok"
        listed = gw.request("GET", f"/api/kernels/{kid}/checkpoints").json()["checkpoints"]
        assert [c["name"] for c in listed] == ["one"]
        model = post(gw, f"/api/kernels/{kid}/checkpoints/one/restore")
        assert model["id"] == kid
        assert await ch.value("[x, open('f.txt').read()]") == [1, "file"]
        post(gw, f"/api/kernels/{kid}/checkpoints/missing/restore", 404)
        # a fork from the checkpoint, after the parent changed again
        await ch.execute("x = 7")
        kids = post(gw, f"/api/kernels/{kid}/fork", 201, count=1, checkpoint="one")["kernels"]
        child = kids[0]["id"]
        assert await gw_value(gw, child, "", "[x, open('f.txt').read()]") == [1, "file"]
        # deleting the checkpoint leaves the fork working
        assert gw.request("DELETE", f"/api/kernels/{kid}/checkpoints/one").status_code == 204
        assert gw.request("GET", f"/api/kernels/{kid}/checkpoints").json()["checkpoints"] == []
        assert await gw_value(gw, child, "", "x * 2") == 2
        gw.delete_kernel(child)
        # a hibernated kernel forks without waking
        post(gw, f"/api/kernels/{kid}/hibernate")
        kids = post(gw, f"/api/kernels/{kid}/fork", 201, count=1)["kernels"]
        assert gw.request("GET", f"/api/kernels/{kid}").json()["vmkg"]["hibernated"] is True
        assert await gw_value(gw, kids[0]["id"], "", "x") == 7
        gw.delete_kernel(kids[0]["id"])
        assert gw.metric("vmkg_hibernated_kernels") >= 0
    finally:
        await ch.close()
        gw.delete_kernel(kid)


async def test_budget_exhaustion_is_507_and_the_kernel_keeps_running(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with serving(tmp_path_factory.mktemp("gw-budget"), "--pool-size=0",
                 env={"VMKG_DURABLE_BUDGET_MB": "1"}) as g:
        kid = g.start_kernel()["id"]
        await gw_value(g, kid, "y = 5")
        r = g.request("POST", f"/api/kernels/{kid}/hibernate")
        assert r.status_code == 507, r.text
        assert "budget" in r.json()["message"]
        r = g.request("POST", f"/api/kernels/{kid}/checkpoints", json={"name": "big"})
        assert r.status_code == 507, r.text
        assert g.request("GET", f"/api/kernels/{kid}").json()["vmkg"]["hibernated"] is False
        assert await gw_value(g, kid, "", "y") == 5
        g.delete_kernel(kid)


async def test_cull_oldest_makes_room_in_the_budget_instead_of_507(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With VMKG_DURABLE_CULL_OLDEST a hibernation past the budget culls the oldest sleeping
    kernel (logged, gone, its images deleted) instead of 507 (without it: 507, above).
    Each kernel writes 200 MB, so its data rules its image's size: an image takes that plus
    what ipykernel and the guest dirtied besides, 13 MB on one template and 40-65 MB on
    another. Two images fit in 580 MB with that overhead up to 90 MB; three do not unless it
    is under -7 MB."""
    with serving(tmp_path_factory.mktemp("gw-cull"), "--pool-size=0", "--durable-cull-oldest",
                 env={"VMKG_DURABLE_BUDGET_MB": "580"}) as g:
        kids = [g.start_kernel()["id"] for _ in range(3)]
        for i, kid in enumerate(kids):
            await gw_value(g, kid, f"import os\nmine = os.urandom(200 * 2**20)\nmark = {i}")
        oldest, second, third = kids
        for kid in (oldest, second):
            assert post(g, f"/api/kernels/{kid}/hibernate")["vmkg"]["hibernated"] is True
        state = g.state_dir / "durable"
        assert (state / oldest).is_dir()
        model = post(g, f"/api/kernels/{third}/hibernate")  # over 580 MB: the oldest goes
        assert model["vmkg"]["hibernated"] is True, model
        assert g.request("GET", f"/api/kernels/{oldest}").status_code == 404
        assert not (state / oldest).exists()
        log = g.log()
        assert f"kernel {oldest}: culled, with its saved state" in log, log[-3000:]
        assert f"to make room in the durable budget for kernel {third}" in log
        assert g.metric("vmkg_durable_culled_total") == 1
        # the others sleep on and wake with their state
        assert g.request("GET", f"/api/kernels/{second}").json()["vmkg"]["hibernated"] is True
        assert await gw_value(g, second, "", "[mark, len(mine)]") == [1, 200 << 20]
        assert await gw_value(g, third, "", "[mark, len(mine)]") == [2, 200 << 20]
        for kid in (second, third):
            g.delete_kernel(kid)


async def test_sigterm_and_restart_bring_kernels_back(tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("gw-persist")
    # the websocket of jupyter_server's GatewayKernelClient carries no credential
    env = {"VMKG_PERSIST_KERNELS": "1", "VMKG_KERNEL_ID_WS_AUTH": "1"}
    a = Gateway(work, "--pool-size=0", env=env)
    try:
        ids = [a.start_kernel()["id"] for _ in range(2)]
        for i, kid in enumerate(ids):
            await gw_value(a, kid, f"import numpy\nz = {i} * 10\nopen('k.txt', 'w').write('{kid}')")
        assert a.stop() == 0
        a.assert_clean()
        assert "2 of 2 kernels hibernated and persisted" in a.log()
    finally:
        a.stop()
    b = Gateway(work, "--pool-size=0", env=env, state_dir=a.state_dir)
    try:
        models = {m["id"]: m for m in b.request("GET", "/api/kernels").json()}
        assert set(ids) <= set(models)
        for kid in ids:
            assert models[kid]["vmkg"]["hibernated"] is True, models[kid]
        got = [await gw_value(b, kid, "", "[z, open('k.txt').read(), 'numpy' in __import__('sys').modules]")
               for kid in ids]
        assert got == [[0, ids[0], True], [10, ids[1], True]]
        # jupyter_server's gateway path (GatewayKernelManager, what nbclient and JupyterLab's
        # server use) reconnecting to a resumed kernel, after hibernating it again
        post(b, f"/api/kernels/{ids[1]}/hibernate")
        script = textwrap.dedent(f"""
            import asyncio, json
            from jupyter_server.gateway.managers import GatewayKernelManager

            async def main():
                km = GatewayKernelManager()
                await km.start_kernel(kernel_id={ids[1]!r})  # an existing kernel: reconnect
                kc = km.client()
                await kc.start_channels()
                msg_id = kc.execute("z + 1")
                values, idle = [], False
                while not idle:  # GatewayKernelClient's queues have no execute_interactive
                    m = await kc.get_iopub_msg(timeout=300)
                    if m["parent_header"].get("msg_id") != msg_id:
                        continue
                    if m["msg_type"] == "execute_result":
                        values.append(m["content"]["data"]["text/plain"])
                    idle = m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                reply = await kc.get_shell_msg(timeout=300)
                kc.stop_channels()
                print(json.dumps([reply["content"]["status"]] + values))

            asyncio.run(main())
        """)
        p = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
            env={**os.environ, "JUPYTER_GATEWAY_URL": b.url, "JUPYTER_GATEWAY_AUTH_TOKEN": b.token},
            cwd=work)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout.strip().splitlines()[-1]) == ["ok", "11"]
        for kid in ids:
            b.delete_kernel(kid)
        assert not (a.state_dir / "durable" / ids[0]).exists()
    finally:
        b.stop_clean()


async def test_crash_brings_kernels_back_at_their_last_idle_checkpoint(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("gw-crash")
    env = {"VMKG_CHECKPOINT_ON_IDLE": "1", "VMKG_HIBERNATE_INTERVAL": "1"}
    a = Gateway(work, "--pool-size=0", env=env)
    try:
        kid = a.start_kernel()["id"]
        await gw_value(a, kid, "w = 5\nopen('c.txt', 'w').write('saved')")
        # one taken of the fresh kernel (idle before the cell arrived) does not count: the
        # kernel is frozen while it is taken, so the one that does is logged after the cell
        mark = f"kernel {kid}: idle checkpoint"
        before = a.log().count(mark)
        a.wait_for(lambda: a.log().count(mark) > before, 300, "an idle checkpoint after the cell")
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        a.wait_for(lambda: not qemu_pids(a.state_dir), 30, "QEMU to die with its gateway")
        # (its VM directory is the next start's reaper's to remove)
    finally:
        a.stop()
    with serving(work, "--pool-size=0", env=env, state_dir=a.state_dir) as b:
        model = b.request("GET", f"/api/kernels/{kid}").json()
        assert model["vmkg"]["hibernated"] is True, model
        assert await gw_value(b, kid, "", "[w, open('c.txt').read()]") == [5, "saved"]
        b.delete_kernel(kid)
