"""One kernel in one microVM restored from a snapshot.

``VMKernel`` is an async context manager: ``start()`` restores the VM (RAM mapped
copy-on-write from the snapshot, disk overlay, device state), opens a fresh protocol
session with the agent and asks it to take on this kernel's identity (CRNG reseed,
wall clock, hostname, environment, working directory, Python random state).
``close()`` always releases everything: the channel, the QEMU process and the VM
directory, in reverse order, even after a failed start.

Callers: ``kernelmanager.provisioner`` (one per kernel start or restart) and, through
the provisioner's ``VMHandle``, everything else; ``kernelmanager.forks`` snapshots one
for forking. Runs on the runtime loop (``kernelmanager.runtime``). Not part of the
package's interface: code outside ``kernelmanager`` never sees a ``VMKernel``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import forks, paths, reaper
from .channel import AgentChannel, UnixSocketTransport
from .exceptions import ChannelError, VMDied, VMStartError
from .snapshots import Snapshot
from .vm.qemu import QemuVM, write_owner

log = logging.getLogger(__name__)


class VMKernel:
    def __init__(self, snapshot: Snapshot, *, kernel_id: str, env: dict[str, str] | None = None,
                 cwd: str | None = None, reseed: bool = True,
                 on_jupyter: Callable[[str, list[bytes]], None] = lambda c, p: None,
                 connection_file: str | None = None, fork: dict[str, Any] | None = None,
                 on_fork_request: Callable[[VMKernel, dict[str, Any]], None] | None = None) -> None:
        self.snapshot = snapshot
        self.kernel_id = kernel_id
        self.env = dict(env or {})
        self.cwd = cwd
        self.reseed = reseed
        self.on_jupyter = on_jupyter
        self.connection_file = connection_file
        #: a fork child's first start: {"index", "parent_id"}, sent with ``restore`` (__fork__)
        self.fork = fork
        #: the guest's ``fork_request`` events (the %fork magic), unvalidated: the
        #: provisioner checks them
        self.on_fork_request = on_fork_request
        self.vm_id = uuid.uuid4().hex
        self.workdir = paths.vms_dir() / self.vm_id
        self.vm = QemuVM(self.workdir, snapshot.machine)
        self.channel: AgentChannel | None = None
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self.timings: dict[str, float] = {}
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self._crashed = False
        self._acquired = False
        self._release_lock = asyncio.Lock()
        self.disk_path = self.workdir / "disk.qcow2"  # the active overlay; a fork moves it on

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> VMKernel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        try:
            await self._start(timeout)
            if self._closing:
                # closed while starting (a shutdown): release what the start made afterwards
                raise VMStartError(f"kernel {self.kernel_id}: closed while starting")
        except BaseException:
            await self._release()
            raise
        self.timings["start"] = time.monotonic() - t0
        log.info("kernel %s: restored in %.0f ms (vm %s, pid %s)", self.kernel_id,
                 self.timings["start"] * 1000, self.vm_id[:8], self.vm.pid)

    async def _start(self, timeout: float) -> None:
        snap = self.snapshot
        self.workdir.mkdir(parents=True)
        write_owner(self.workdir, kernel_id=self.kernel_id, connection_file=self.connection_file)
        forks.registry.acquire(snap)
        self._acquired = True
        disk = self.disk_path
        shutil.copyfile(snap.path / "overlay.qcow2", disk)
        t0 = time.monotonic()
        delta = snap.info.get("mem_delta")
        before_load = None
        if delta:  # a durable image (kernelmanager.durable): its pages before the devices
            from .durable import load_delta

            async def before_load() -> None:
                t = time.monotonic()
                self.timings["delta_bytes"] = await load_delta(self.vm, snap.mem_file, Path(str(delta)))
                self.timings["delta"] = time.monotonic() - t

        await self.vm.restore(snap.mem_file, snap.state_file, disk, before_load=before_load)
        self.timings["spawn"] = time.monotonic() - t0
        assert self.vm.pid is not None
        write_owner(self.workdir, kernel_id=self.kernel_id, connection_file=self.connection_file,
                    qemu_pid=self.vm.pid, qemu_start=reaper.process_start_time(self.vm.pid))
        self.channel = AgentChannel(
            UnixSocketTransport(self.vm.agent_socket), uuid.uuid4().hex,
            name=f"kernel {self.kernel_id}", on_jupyter=self.on_jupyter, on_event=self._on_event)
        self.channel.on_failure.append(self._channel_failed)
        self._watch = asyncio.ensure_future(self._watch_process())
        connect = asyncio.ensure_future(self.channel.connect(timeout))
        await asyncio.wait({connect, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        if not connect.done():
            connect.cancel()
            raise VMStartError(f"kernel {self.kernel_id}: QEMU exited during restore "
                               f"(status {self.vm.returncode}): {self.vm.failure_detail()}")
        try:
            connect.result()
        except ChannelError as exc:
            raise VMStartError(f"{exc}; {self.vm.failure_detail()}") from exc
        self.timings["connected"] = time.monotonic() - t0
        await self._take_identity(self.channel, timeout)
        self.timings["restored"] = time.monotonic() - t0

    async def _watch_process(self) -> None:
        code = await self.vm.wait()
        if self.exit_code is None:
            self.exit_code = code if code != 0 or self._closing else 1
        if not self._closing:
            self._crashed = True
            log.warning("kernel %s: VM exited unexpectedly (status %s): %s", self.kernel_id, code,
                        self.vm.failure_detail())
        self.exited.set()

    def _channel_failed(self, exc: BaseException) -> None:
        """The link to the guest failed for good (a protocol violation, a dead relay):
        the kernel is dead; stop its VM, keeping its logs."""
        if self._closing:
            return
        log.error("kernel %s: the link to the guest failed; stopping the VM", self.kernel_id)
        if self.exit_code is None:
            self.exit_code = 1
        self._crashed = True
        asyncio.ensure_future(self.close())

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "kernel_exit":
            status = event.get("status")
            log.info("kernel %s: kernel process exited in the guest (status %s)", self.kernel_id, status)
            self.exit_code = status if isinstance(status, int) else 1
            asyncio.ensure_future(self.close())
        elif event.get("event") == "fork_request" and self.on_fork_request is not None:
            self.on_fork_request(self, event)

    def poll(self) -> int | None:
        if self.exited.is_set() or self.exit_code is not None:
            return self.exit_code if self.exit_code is not None else 1
        return None

    async def wait(self) -> int:
        await self.exited.wait()
        return self.exit_code if self.exit_code is not None else 1

    async def close(self) -> None:
        """Release everything; safe to call more than once, concurrently, and while a
        start is still under way (the start then releases what it made after this)."""
        self._closing = True
        await self._release()

    async def _release(self) -> None:
        self._closing = True
        async with self._release_lock:
            await self._release_unlocked()

    async def _release_unlocked(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.vm.close()
        if self._watch is not None:
            await self._watch
        else:
            self.exited.set()
        if self.exit_code is None:
            self.exit_code = self.vm.returncode if self.vm.returncode is not None else 0
        if self._crashed:
            self._keep_evidence()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._acquired:
            self._acquired = False
            forks.registry.release(self.snapshot)

    def _keep_evidence(self) -> None:
        """Keep the console and QEMU log of a VM that died on its own (the last 20)."""
        out = paths.state_dir() / "crashed"
        try:
            out.mkdir(parents=True, exist_ok=True)
            for src in (self.vm.console_log, self.vm.stderr_log):
                if src.exists():
                    shutil.copyfile(src, out / f"{self.kernel_id}.{src.name}")
            for old in sorted(out.iterdir(), key=lambda p: p.stat().st_mtime)[:-40]:
                old.unlink()
            log.warning("kernel %s: VM logs kept in %s", self.kernel_id, out)
        except OSError as exc:
            log.warning("kernel %s: could not keep VM logs: %s", self.kernel_id, exc)

    # -- operations ----------------------------------------------------------------------

    def _require_channel(self) -> AgentChannel:
        if self.channel is None or self.poll() is not None:
            raise VMDied(f"kernel {self.kernel_id}: the VM is not running")
        return self.channel

    async def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel process inside the guest (SIGINT = interrupt)."""
        if signum in (signal.SIGKILL, signal.SIGTERM):
            await self.close()
            return
        if signum == 0:
            if self.poll() is not None:
                raise VMDied(f"kernel {self.kernel_id}: the VM is not running")
            return
        await self._require_channel().request("signal", signum=int(signum), timeout=10)

    async def request(self, op: str, timeout: float = 30.0, **args: Any) -> Any:
        return await self._require_channel().request(op, timeout=timeout, **args)


    # -- handing a pooled kernel to a client (gateway) ------------------------------------

    async def adopt(self, env: dict[str, str], cwd: str | None = None, timeout: float = 30.0) -> None:
        """Take on a client's environment (and working directory) after the restore.

        Called (through ``VMHandle.apply_env``) when the gateway hands a kernel it
        restored ahead of time (its warm pool) to a client whose ``POST /api/kernels`` brought ``KERNEL_*`` variables.
        Re-sends the agent's ``restore`` op, which is idempotent: fresh entropy and clock,
        ``env`` added to the kernel's ``os.environ``, ``cwd`` made and entered. The kernel
        must be idle (a pooled kernel is: nobody has talked to it yet).
        """
        self.env.update(env)
        if cwd:
            self.cwd = cwd
        await self._take_identity(self._require_channel(), timeout)

    async def _take_identity(self, channel: AgentChannel, timeout: float) -> None:
        """The agent's ``restore`` op: fresh entropy, clock, hostname, env, cwd, random state.
        Idempotent, so adopt() can send it again with a merged environment."""
        await channel.request(
            "restore", timeout=timeout,
            entropy=base64.b64encode(os.urandom(64)).decode(), time_ns=time.time_ns(),
            hostname=f"vmkg-{self.kernel_id[:8]}", env=self.env, cwd=self.cwd or "", reseed=self.reseed,
            **({"fork": self.fork} if self.fork is not None else {}),
        )
