"""Durable kernels (``kernelmanager.durable``): hibernate and wake, named checkpoints,
forks from checkpoints, the disk budget; at the runtime level (jupyter_client) and
through the gateway (persisting kernels across a SIGTERM). Real VMs."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelmanager import fork, vm_handle
from kernelmanager.exceptions import DurableBudgetExceeded

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("template")]
KERNEL = "python3-microvm"


async def value(km: AsyncKernelManager, code: str, expr: str = "None") -> Any:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        out: list[str] = []
        reply = await kc.execute_interactive(
            f"{code}\nimport json as _j; print('@@' + _j.dumps({expr}))", timeout=180,
            output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        line = [x for x in "".join(out).splitlines() if x.startswith("@@")][-1]
        return json.loads(line[2:])
    finally:
        kc.stop_channels()


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
        assert handle.running and handle.hibernated_since is None
        assert handle.last_wake_seconds is not None
    finally:
        await km.shutdown_kernel(now=True)
