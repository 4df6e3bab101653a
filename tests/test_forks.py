"""Forking a running kernel's VM (runtime level, through jupyter_client), real VMs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from fork_faults import BlockDeviceState
from jupyter_client.manager import AsyncKernelManager
from kernel_helpers import value

from kernelmanager import ForkSource, fork, forks, paths, reaper
from kernelmanager.exceptions import ConfigError, ForkError, KernelBusy, LimitExceeded
from kernelmanager.vm.qmp import QMPError

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("template")]
KERNEL = "python3-microvm"


async def wait_busy(kc: Any, msg_id: str) -> None:
    """Until the kernel reports it started ``msg_id`` (a request merely sent may still be
    queued at fork time; it then runs in the parent after the fork, in no branch)."""
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if (msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"]["execution_state"] == "busy"):
            return


async def start() -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    return km


async def shutdown(*kms: AsyncKernelManager) -> None:
    await asyncio.gather(*(k.shutdown_kernel(now=True) for k in kms), return_exceptions=True)


WARM = """
import os, sys, hashlib, random, json
import numpy as np
blob = os.urandom(100 * 2**20)
digest = hashlib.sha256(blob).hexdigest()
x = 41
with open('before-fork.txt', 'w') as f:
    f.write('parent')
"""

BRANCH = ("[x, hashlib.sha256(blob).hexdigest() == digest, 'numpy' in sys.modules, "
          "open('before-fork.txt').read(), os.urandom(16).hex(), random.random(), "
          "float(np.random.random()), __import__('time').time()]")


async def test_branches_continue_from_the_parent_and_stay_isolated() -> None:
    parent = await start()
    kids: list[AsyncKernelManager] = []
    try:
        digest = await value(parent, WARM, "digest")
        kids = await fork(parent, 3)
        results = await asyncio.gather(*(value(k, "", BRANCH) for k in kids))
        now = time.time()
        for x, same_blob, has_numpy, text, *_rest, clock in results:
            assert x == 41 and same_blob and has_numpy and text == "parent"
            assert abs(clock - now) < 5
        assert len({r[4] for r in results}) == 3, "branches share os.urandom"
        assert len({r[5] for r in results}) == 3, "branches share random.random()"
        assert len({r[6] for r in results}) == 3, "branches share numpy's global generator"
        # mutations, in memory and on disk, stay in their branch
        await value(kids[0], "x = 100; open('branch0.txt','w').write('0')")
        assert await value(kids[1], "", "[x, os.path.exists('branch0.txt')]") == [41, False]
        assert await value(parent, "", "[x, os.path.exists('branch0.txt'), digest]") == [41, False, digest]
        # the parent's own later writes don't reach the branches either
        await value(parent, "open('after-fork.txt','w').write('p')")
        assert await value(kids[2], "", "os.path.exists('after-fork.txt')") is False
    finally:
        await shutdown(parent, *kids)


async def test_reseed_false_keeps_identical_random_streams_but_fresh_urandom() -> None:
    parent = await start()
    kids: list[AsyncKernelManager] = []
    try:
        await value(parent, "import random, os; import numpy as np; random.seed(7); np.random.seed(7)")
        kids = await fork(parent, 2, reseed=False)
        code = "[random.random(), float(np.random.random()), os.urandom(8).hex()]"
        a, b = await asyncio.gather(*(value(k, "", code) for k in kids))
        assert a[:2] == b[:2]
        assert a[2] != b[2]
    finally:
        await shutdown(parent, *kids)


async def test_busy_parent_is_refused_after_the_timeout_and_keeps_running() -> None:
    parent = await start()
    try:
        await value(parent, "import time; y = 5")
        kc = parent.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            msg_id = kc.execute("time.sleep(8); y = 6")
            await wait_busy(kc, msg_id)
            t0 = time.monotonic()
            with pytest.raises(KernelBusy, match="busy"):
                await fork(parent, 1, idle_timeout=1.5)
            assert time.monotonic() - t0 < 6
            # the running cell was not disturbed and the parent keeps its state
            while True:
                reply = await kc.get_shell_msg(timeout=30)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
        assert await value(parent, "", "y") == 6
        # a fork that waits long enough succeeds, after the cell, never inside it
        kc = parent.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        await wait_busy(kc, kc.execute("time.sleep(2); y = 7"))
        kc.stop_channels()
        kids = await fork(parent, 1, idle_timeout=30)
        try:
            assert await value(kids[0], "", "y") == 7
        finally:
            await shutdown(*kids)
    finally:
        await shutdown(parent)


async def test_deleting_the_parent_keeps_branches_and_forks_of_forks_work() -> None:
    parent = await start()
    await value(parent, "z = ['gen0']; open('f0.txt','w').write('0')")
    kids = await fork(parent, 1)
    grandkids: list[AsyncKernelManager] = []
    try:
        await shutdown(parent)  # the branch must not depend on its parent's VM
        assert await value(kids[0], "z.append('gen1'); open('f1.txt','w').write('1')", "z") == ["gen0", "gen1"]
        grandkids = await fork(kids[0], 2)
        await shutdown(*kids)
        got = await asyncio.gather(*(value(g, "", "[z, open('f0.txt').read(), open('f1.txt').read()]")
                                     for g in grandkids))
        assert got == [[["gen0", "gen1"], "0", "1"]] * 2
    finally:
        await shutdown(*kids, *grandkids)
    assert not list(forks.forks_dir().iterdir()), "fork snapshots outlived their VMs"


async def test_branch_memory_is_shared_copy_on_write() -> None:
    """Branches map the fork image copy-on-write: a 100 MB object costs them nothing."""
    parent = await start()
    kids: list[AsyncKernelManager] = []
    try:
        await value(parent, WARM)
        kids = await fork(parent, 2)
        for k in kids:
            await value(k, "", "x")
            pid = k.provisioner.vm_kernel.vm.pid  # type: ignore[union-attr]
            anon = next(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup")
                        if line.startswith("Anonymous:"))
            assert anon < 100 * 1024, f"branch holds {anon // 1024} MB private: the blob was copied"
    finally:
        await shutdown(parent, *kids)


async def test_restarting_a_branch_gives_a_fresh_kernel_from_the_template() -> None:
    parent = await start()
    kids: list[AsyncKernelManager] = []
    try:
        await value(parent, "x = 41")
        kids = await fork(parent, 1)
        assert await value(kids[0], "", "x") == 41
        await kids[0].restart_kernel(now=True)
        assert await value(kids[0], "", "'x' in globals()") is False
        assert await value(parent, "", "x") == 41
    finally:
        await shutdown(parent, *kids)


def test_fork_leftovers_of_a_killed_owner_are_reaped(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, json, time
        from jupyter_client.manager import AsyncKernelManager
        from kernelmanager import fork
        async def main():
            km = AsyncKernelManager(kernel_name={KERNEL!r})
            await km.start_kernel()
            kids = await fork(km, 1)
            vk = kids[0].provisioner.vm_kernel
            print(json.dumps({{"fork": str(vk.snapshot.path), "mem": str(vk.snapshot.mem_file)}}), flush=True)
            time.sleep(600)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert Path(info["fork"]).exists() and Path(info["mem"]).exists()
    reaper.reap_orphans(forks.forks_dir())  # what the next start does
    reaper.reap_orphans(paths.vms_dir())
    assert not Path(info["fork"]).exists() and not Path(info["mem"]).exists()


async def test_a_fork_qemu_fails_is_a_fork_error_and_the_parent_carries_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A QMP command failing mid-fork (here: QEMU cannot write the device state) is a
    ForkError carrying QEMU's message, raised from the QMP error; the parent is thawed
    and resumed, no child and no fork directory is left, and the next fork works.

    Unjailed: a jailed QEMU writes the device state into a file the host made in the VM's
    own directory, which the host then moves into the fork directory, so the injected
    fault hits the host's move (an OS error: see test_gateway_forks for that path)."""
    monkeypatch.setenv("VMKG_JAIL", "0")
    parent = await start()
    kids: list[AsyncKernelManager] = []
    try:
        await value(parent, "x = 7")
        with BlockDeviceState(forks.forks_dir()) as fault:
            with pytest.raises(ForkError) as info:
                await fork(parent, 2)
        assert fault.blocked, "the fault was not injected"
        assert "xen-save-devices-state" in str(info.value), info.value
        assert isinstance(info.value.__cause__, QMPError)
        assert await value(parent, "x += 1", "x") == 8
        assert not list(forks.forks_dir().iterdir()), "a failed fork left its directory"
        kids = await fork(parent, 1)
        assert await value(kids[0], "", "x") == 8
    finally:
        await shutdown(parent, *kids)


async def test_a_failed_child_start_stops_the_started_ones_and_releases_the_snapshot() -> None:
    """The orchestrator undoes a partial fork: a child start that fails (here the
    caller's start_child refuses the second branch, as a limit would) stops the branches
    that did start, through the caller's stop_child, and the snapshot is released."""
    parent = await start()
    started: list[AsyncKernelManager] = []
    stopped: list[AsyncKernelManager] = []
    calls = 0

    async def start_child(source: ForkSource) -> AsyncKernelManager:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise LimitExceeded("no room for the second branch")
        child = AsyncKernelManager(kernel_name=KERNEL)
        await child.start_kernel(fork_source=source)
        started.append(child)
        return child

    async def stop_child(child: AsyncKernelManager) -> None:
        stopped.append(child)
        await child.shutdown_kernel(now=True)

    try:
        await value(parent, "x = 3")
        with pytest.raises(LimitExceeded, match="second branch"):
            await fork(parent, 2, start_child=start_child, stop_child=stop_child)
        assert len(started) == 1 and stopped == started
        assert not await started[0].is_alive()
        assert not list(forks.forks_dir().iterdir()), "the fork snapshot outlived a failed fork"
        assert await value(parent, "x += 1", "x") == 4
        with pytest.raises(ConfigError, match="fork_source"):
            await AsyncKernelManager(kernel_name=KERNEL).start_kernel(fork_source="not a source")
    finally:
        await shutdown(parent, *started)
