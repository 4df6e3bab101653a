"""What code outside ``kernelmanager`` may do with one kernel's VM: ``VMHandle``.

The gateway (or any jupyter_client user) gets a handle from a kernel manager whose
kernelspec selects the microVM provisioner (:func:`vm_handle`); it never sees the
objects behind it (``VMKernel``, ``QemuVM``, ``Snapshot``) nor the runtime loop they
live on. A handle follows its kernel across restarts (a restart replaces the VM, not the
handle), and every coroutine it offers hops to the runtime loop by itself, so it may be
awaited from any event loop.

    files             read_file / write_file / list_files / remove_file, confined by
                      the guest agent to the kernel user's home; a refusal is an
                      ``AgentError`` whose ``kind`` says why (forbidden, not_found,
                      invalid, no_space)
    environment       apply_env: a client's ``KERNEL_*`` variables (and allowed names)
                      taken on by a kernel restored before the client asked (warm pool)
    fork snapshots    fork_snapshot: an opaque, held ``ForkSource`` that children are
                      started from (``start_kernel(fork_source=...)``); see
                      :func:`kernelmanager.fork`, which is the one orchestrator
    observation       restore_timings, pid, memory(), running, lineage, hibernated_since
    durable           hibernate / wake (a woken kernel has its state; any file call or
                      fork wakes it too, a fork of a sleeping kernel doesn't), checkpoint /
                      checkpoints / restore_checkpoint / delete_checkpoint, fork_snapshot
                      (checkpoint=name), persist (kept across a gateway restart); see
                      ``kernelmanager.durable``

A handle whose VM is not running raises ``VMDied``.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from . import forks
from .exceptions import ForkError, VMDied
from .runtime import Runtime

if TYPE_CHECKING:
    from .durable import DurableImage
    from .snapshots import Snapshot
    from .vmkernel import VMKernel

#: bytes one read_file call returns at most (the agent's own cap is 8 MiB)
FILE_CHUNK = 4 << 20


@dataclass(frozen=True)
class Lineage:
    """Where a forked kernel came from: the kernel it was forked from, and when (UTC).

    Kept by the kernel across restarts (a restarted branch is a fresh kernel from the
    template, but still a branch of its parent). ``index`` numbers the children of one
    fork 0, 1, ... in the order they were started; the child's first start sets
    ``__fork__ = {"index": index, "parent_id": parent_id}`` in its namespace."""

    parent_id: str
    forked_at: datetime
    index: int = 0


@dataclass(frozen=True)
class MemoryStats:
    """Memory of one VM's QEMU process, in bytes (from ``/proc/PID/smaps_rollup``).

    ``private`` is what this VM alone costs: pages not shared with other VMs restored
    from the same snapshot."""

    rss: int
    pss: int
    private: int


@dataclass(frozen=True)
class FileChunk:
    """Part of a file read from the guest: ``data`` from the requested offset, and the
    file's whole ``size`` (more reads are needed while offset + len(data) < size)."""

    data: bytes
    size: int


class ForkSource:
    """A held fork snapshot of a running kernel: what fork children are started from.

    Opaque on purpose: pass it to ``start_kernel(fork_source=src)`` of a kernel manager
    on a microVM kernelspec, as many times as there are children (each child holds the
    snapshot for itself while it lives). The holder releases its own hold with
    :meth:`release` (idempotent) or by using the source as an async context manager;
    the snapshot's files go when the last child is gone. :func:`kernelmanager.fork`
    does all of this; code that only forks should call that.
    """

    __slots__ = ("_snapshot", "_released", "_children", "reseed", "lineage")

    def __init__(self, snapshot: Snapshot, *, reseed: bool, lineage: Lineage) -> None:
        self._snapshot = snapshot
        self._released = False
        self._children = 0
        self.reseed = reseed
        """Whether children reseed Python's and NumPy's global random generators."""
        self.lineage = lineage
        """The lineage every child started from this source records."""

    @property
    def _held(self) -> Snapshot:
        """The snapshot (for the provisioner that restores a child from it)."""
        if self._released:
            raise ForkError(f"fork source of kernel {self.lineage.parent_id} was already released")
        return self._snapshot

    def _child_lineage(self) -> Lineage:
        """The lineage of the next child started from this source (its index counts up)."""
        index, self._children = self._children, self._children + 1
        return Lineage(self.lineage.parent_id, self.lineage.forked_at, index)

    def __repr__(self) -> str:
        return f"<ForkSource of kernel {self.lineage.parent_id} ({self._snapshot.path.name[:8]})>"

    async def release(self) -> None:
        """Drop the holder's hold on the snapshot (children hold their own)."""
        if self._released:
            return
        self._released = True
        snap = self._snapshot

        async def rel() -> None:
            forks.registry.release(snap)

        await Runtime.instance().run(rel())

    async def __aenter__(self) -> ForkSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class KernelOwner(Protocol):
    """What a handle needs of the one who holds the kernel (``MicroVMProvisioner``)."""

    @property
    def kernel_id(self) -> Any: ...

    @property
    def vm_kernel(self) -> VMKernel | None: ...

    @property
    def lineage(self) -> Lineage | None: ...

    async def adopt(self, env: dict[str, str]) -> None: ...

    @property
    def hibernated_since(self) -> float | None: ...

    @property
    def last_wake_seconds(self) -> float | None: ...

    async def hibernate(self, idle_timeout: float = 30.0) -> DurableImage: ...

    async def wake(self) -> None: ...

    async def checkpoint(self, name: str, idle_timeout: float = 30.0) -> DurableImage: ...

    async def restore_checkpoint(self, name: str) -> None: ...

    def persist(self, kernel_name: str, extra: dict[str, object], keep: bool = True) -> None: ...

    async def idle_checkpoint(self, idle_timeout: float = 1.0) -> DurableImage | None: ...


class VMHandle:
    """One kernel's VM, as the world outside ``kernelmanager`` may use it.

    Made by :meth:`MicroVMProvisioner.handle` (through :func:`vm_handle`); cheap, and
    valid as long as its kernel manager is: a restart swaps the VM behind it."""

    def __init__(self, provisioner: KernelOwner) -> None:
        self._prov = provisioner

    @property
    def kernel_id(self) -> str:
        return str(self._prov.kernel_id)

    def _kernel(self) -> VMKernel:
        kernel = self._prov.vm_kernel
        if kernel is None or kernel.poll() is not None:
            raise VMDied(f"kernel {self.kernel_id}: the VM is not running")
        return kernel

    # -- observation -------------------------------------------------------------------

    @property
    def hibernated_since(self) -> datetime | None:
        """When the kernel was hibernated (UTC), or None while it is awake."""
        t = self._prov.hibernated_since
        return datetime.fromtimestamp(t, timezone.utc) if t is not None else None

    @property
    def last_wake_seconds(self) -> float | None:
        """Seconds the last wake took (restore of the saved image), or None."""
        return self._prov.last_wake_seconds

    @property
    def running(self) -> bool:
        """True while the kernel's VM is up."""
        kernel = self._prov.vm_kernel
        return kernel is not None and kernel.poll() is None

    @property
    def pid(self) -> int | None:
        """The QEMU process of the VM, or None when there is none."""
        kernel = self._prov.vm_kernel
        return kernel.vm.pid if kernel is not None else None

    @property
    def restore_timings(self) -> dict[str, float]:
        """Seconds the last restore took: ``spawn`` (QEMU up), ``connected`` (agent
        answered), ``restored`` (identity taken on), ``start`` (all of it). Empty while
        no VM has been restored."""
        kernel = self._prov.vm_kernel
        return dict(kernel.timings) if kernel is not None else {}

    @property
    def lineage(self) -> Lineage | None:
        """The kernel's lineage if it was started from a fork, else None."""
        return self._prov.lineage

    def memory(self) -> MemoryStats | None:
        """The VM process's memory now, or None when it has no process (or it just went)."""
        pid = self.pid
        if pid is None:
            return None
        values = {"Rss:": 0, "Pss:": 0, "Private_Clean:": 0, "Private_Dirty:": 0}
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(" ")
                    if key in values:
                        values[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return MemoryStats(rss=values["Rss:"], pss=values["Pss:"],
                           private=values["Private_Clean:"] + values["Private_Dirty:"])

    # -- files ---------------------------------------------------------------------------

    async def _file_op(self, timeout: float = 120.0, **body: Any) -> Any:
        await self._prov.wake()
        kernel = self._kernel()
        return await Runtime.instance().run(kernel.request("file", timeout=timeout, **body))

    async def read_file(self, path: str, offset: int = 0, length: int = FILE_CHUNK) -> FileChunk:
        """Up to ``length`` bytes of ``path`` (relative to the kernel's home) from ``offset``."""
        reply = await self._file_op(action="read", path=path, offset=offset, length=min(length, FILE_CHUNK))
        return FileChunk(data=base64.b64decode(reply["data"]), size=int(reply["size"]))

    async def write_file(self, path: str, data: bytes, *, offset: int = 0, truncate: bool = True) -> int:
        """Write ``data`` at ``offset`` of ``path`` (parents made, truncated first unless
        ``truncate`` is false); returns the file's size afterwards."""
        reply = await self._file_op(action="write", path=path, offset=offset, truncate=truncate,
                                    data=base64.b64encode(data).decode())
        return int(reply.get("size", offset + len(data)))

    async def list_files(self, path: str = "") -> list[dict[str, Any]]:
        """The entries of a directory (the home for ``""``): name, type, size, mtime."""
        reply = await self._file_op(action="list", path=path)
        return list(reply.get("entries", []))

    async def remove_file(self, path: str) -> None:
        """Remove a file, or an empty directory."""
        await self._file_op(action="delete", path=path)

    # -- environment and forks --------------------------------------------------------------

    async def apply_env(self, env: dict[str, str]) -> None:
        """Take on a client's environment in the running kernel (see
        :meth:`MicroVMProvisioner.adopt`); also kept for the kernel's restarts."""
        await self._prov.wake()
        await self._prov.adopt(env)

    async def fork_snapshot(self, *, idle_timeout: float = 30.0, reseed: bool = True,
                            checkpoint: str | None = None) -> ForkSource:
        """Snapshot the running VM for forking; the parent keeps running.

        Waits up to ``idle_timeout`` seconds for the kernel to be idle (``KernelBusy``
        after that); a failure of QEMU or of the host is a ``ForkError``. The source is
        held for the caller, who must release it. ``checkpoint``: the children start from
        that checkpoint instead (``CheckpointNotFound``); a hibernated kernel's children
        start from its saved image, and it sleeps on."""
        from . import durable

        image = None
        if checkpoint is not None:
            image = durable.find_image(self.kernel_id, f"ckpt-{durable.check_name(checkpoint)}")
            if image is None:
                raise durable.CheckpointNotFound(f"kernel {self.kernel_id} has no checkpoint {checkpoint!r}")
        elif self._prov.hibernated_since is not None:
            image = durable.find_image(self.kernel_id, durable.HIBERNATED)
        if image is not None:
            held = image

            async def from_image() -> Snapshot:
                snap = await asyncio.to_thread(durable.materialize, held)
                forks.registry.acquire(snap)
                return snap

            snap = await Runtime.instance().run(from_image())
            forked_at = datetime.fromtimestamp(time.time(), timezone.utc)
            return ForkSource(snap, reseed=reseed, lineage=Lineage(self.kernel_id, forked_at))
        kernel = self._kernel()

        async def take() -> Snapshot:
            snap = await forks.snapshot_kernel(kernel, idle_timeout=idle_timeout)
            forks.registry.acquire(snap)
            return snap

        snap = await Runtime.instance().run(take())
        forked_at = datetime.fromtimestamp(snap.created, timezone.utc)
        return ForkSource(snap, reseed=reseed, lineage=Lineage(self.kernel_id, forked_at))


    # -- durable kernels ------------------------------------------------------------------------

    async def hibernate(self, *, idle_timeout: float = 30.0) -> int:
        """Save the kernel to disk and stop its VM (see ``kernelmanager.durable``); its id,
        connection file and clients stay. Returns the bytes the image takes on disk.
        ``KernelBusy`` when it stays busy, ``DurableBudgetExceeded`` when the budget or the
        disk is full (the kernel keeps running then)."""
        image = await self._prov.hibernate(idle_timeout)
        return image.size

    async def wake(self) -> None:
        """Bring a hibernated kernel back now (anything that needs the VM does this)."""
        await self._prov.wake()

    async def checkpoint(self, name: str, *, idle_timeout: float = 30.0) -> dict[str, Any]:
        """Save the kernel's whole state as checkpoint ``name`` (replacing one of that name)."""
        image = await self._prov.checkpoint(name, idle_timeout)
        return _ckpt_model(image)

    def checkpoints(self) -> list[dict[str, Any]]:
        """The kernel's checkpoints: name, created (UTC ISO), size (bytes on disk)."""
        from . import durable

        return [_ckpt_model(i) for i in durable.list_checkpoints(self.kernel_id)]

    async def restore_checkpoint(self, name: str) -> None:
        """Put the kernel back to checkpoint ``name`` in place (same id; clients see a
        restart's ``starting``, ``idle``)."""
        await self._prov.restore_checkpoint(name)

    def delete_checkpoint(self, name: str) -> None:
        """Delete checkpoint ``name``; kernels forked from it keep what they use."""
        from . import durable

        image = durable.find_image(self.kernel_id, f"ckpt-{durable.check_name(name)}")
        if image is None:
            raise durable.CheckpointNotFound(f"kernel {self.kernel_id} has no checkpoint {name!r}")
        durable.remove_image(image)

    def persist(self, kernel_name: str, extra: dict[str, object], *, keep: bool = True) -> None:
        """Record the kernel (connection info, env, ``extra``) for the next start; ``keep``:
        keep its images when it is shut down (a gateway stopping with durable kernels)."""
        self._prov.persist(kernel_name, extra, keep)

    async def idle_checkpoint(self, *, idle_timeout: float = 1.0) -> int | None:
        """Save the running kernel as its last idle checkpoint (what the next start brings
        back after a crash); bytes on disk, or None when it is not running."""
        image = await self._prov.idle_checkpoint(idle_timeout)
        return image.size if image is not None else None


def _ckpt_model(image: DurableImage) -> dict[str, Any]:
    return {"name": image.name, "size": image.size,
            "created": datetime.fromtimestamp(image.created, timezone.utc).isoformat().replace("+00:00", "Z")}
