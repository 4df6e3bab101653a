"""Forks whose branches run on other hosts: the snapshot goes through the store.

A local fork (``kernelmanager.forks``) hands its children a RAM image on this host's tmpfs
and a disk layer in this host's state directory; neither exists elsewhere. A fork that
crosses hosts is made of what the durable kernels already write (``kernelmanager.durable``):
an image that depends only on the template, which any host with that template restores.

**Export** (:func:`export_fork`, on the parent's host): the parent is captured once as a
short-lived checkpoint (paused as long as for a fork; it runs on), the image is pushed to
the store as a ``fork`` manifest named by its content (``kernelmanager.store.forks``), and
the ``local`` branches that stay on this host start from that same checkpoint (so every
branch, wherever it runs, starts from one state); then the checkpoint is deleted (the
local branches keep the hard links they restored from). Returns the fork id.

**Import** (:func:`import_fork`, on each other host): the template the parent ran on must
be the one this host restores that template from (same template id and facts, pulled
from the store if this host lacks it; otherwise ``TemplateIncompatible`` naming what
differs). The fork snapshot is pulled and verified (a corrupt chunk: ``StoreCorrupt``,
nothing started), brought back as a fork-kind snapshot (``durable.materialize``) and held
as a :class:`ForkSource` with the parent's lineage; the branches start from it through
the caller's ``start_child`` (as a local fork's: the gateway's kernel manager, owner and
limits), concurrently, all or none. The snapshot records its ``owner`` (the user who
forked; "" for the admin) and an import for another user (``owner=``; None: the admin)
finds none. The downloaded copy is removed once the branches hold their hard links.

Clone safety is that of every fork: each branch's restore gives the guest fresh CRNG
entropy and the clock, and with ``reseed`` Python's and NumPy's global random state.
Kernel ids are the caller's (random UUID4s: unique across hosts).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from . import accel as accel_mod
from . import durable, forks, paths
from .exceptions import ConfigError
from .handle import ForkSource, Lineage
from .provisioner import _error, _stop_started, fork, vm_handle
from .runtime import Runtime
from .snapshots import Snapshot
from .templates import ensure_template, get_spec

log = logging.getLogger(__name__)

Child = TypeVar("Child")


@dataclass
class ExportedFork:
    """A fork snapshot in the store: its id, the template it needs, the local branches."""

    fork_id: str
    template: str
    children: list[Any]
    pushed_bytes: int
    seconds: float


def store_configured() -> bool:
    """Whether this host has a snapshot store (and so can take part in cross-host forks)."""
    from . import store

    return store.current() is not None


def _store() -> Any:
    from . import store

    shared = store.current()
    if shared is None:
        raise ConfigError("no snapshot store is configured (--store or $VMKG_STORE): a fork "
                               "cannot put branches on other hosts without one")
    return shared


async def export_fork(km: Any, *, local: int = 0, reseed: bool = True, idle_timeout: float = 30.0,
                      owner: str = "",
                      start_child: Callable[[ForkSource], Awaitable[Child]] | None = None,
                      stop_child: Callable[[Child], Awaitable[object]] | None = None) -> ExportedFork:
    """Snapshot the kernel of ``km`` into the store and start ``local`` branches here from
    the same snapshot (see the module docstring). Raises KernelBusy, DurableError,
    StoreError, ConfigError (no store), or what a child start raised (the others are stopped)."""
    from .store.forks import push_fork

    handle = vm_handle(km)
    if handle is None:
        raise ConfigError("only kernels of the microvm provisioner can be forked")
    shared = _store()
    template_name = str(getattr(km.provisioner, "template", "")) or "python3"
    t0 = time.monotonic()
    name = f"xfork-{uuid.uuid4().hex[:12]}"
    await handle.checkpoint(name, idle_timeout=idle_timeout)
    try:
        image = durable.find_image(handle.kernel_id, f"ckpt-{name}")
        if image is None:
            raise durable.DurableError(f"kernel {handle.kernel_id}: its fork checkpoint vanished")
        template = Snapshot.load(image.template)
        stats = await asyncio.to_thread(push_fork, shared, image, template,
                                        parent_id=handle.kernel_id, template_name=template_name,
                                        owner=owner)
        children: list[Any] = []
        if local:
            children = await fork(km, local, reseed=reseed, checkpoint=name,
                                  start_child=start_child, stop_child=stop_child)
    finally:
        try:
            handle.delete_checkpoint(name)
        except durable.CheckpointNotFound:
            pass
    seconds = time.monotonic() - t0
    log.info("kernel %s: fork exported as %s (%d local branches, %.1f s)", handle.kernel_id,
             stats.id[:12], local, seconds)
    return ExportedFork(stats.id, template_name, children, stats.bytes, seconds)


async def import_fork(fork_id: str, count: int, *, template: str, parent_id: str,
                      forked_at: float | None = None, reseed: bool = True, owner: str | None = None,
                      start_child: Callable[[ForkSource], Awaitable[Child]],
                      stop_child: Callable[[Child], Awaitable[object]]) -> list[Child]:
    """Start ``count`` branches on this host from fork snapshot ``fork_id`` in the store
    (see the module docstring). Raises StoreError/StoreCorrupt, TemplateIncompatible,
    ConfigError (no store), or what a child start raised (the others are stopped)."""
    from .store.forks import pull_fork

    if count < 1:
        raise ConfigError(f"a fork needs at least one branch, not {count}")
    shared = _store()
    spec = get_spec(template)
    tsnap = await Runtime.instance().run(ensure_template(spec, accel_mod.detect(None).name))
    root = paths.private_dir(paths.state_dir() / "imports")
    dest = root / f"{fork_id[:16]}-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    try:
        image = await asyncio.to_thread(pull_fork, shared, fork_id, tsnap, dest, None, owner)

        async def hold() -> Snapshot:
            snap = await asyncio.to_thread(durable.materialize, image)
            forks.registry.acquire(snap)
            return snap

        snap = await Runtime.instance().run(hold())
    finally:
        shutil.rmtree(dest, ignore_errors=True)   # the held snapshot has its hard links
        (root / f"{dest.name}.lock").unlink(missing_ok=True)
    pulled = time.monotonic() - t0
    when = datetime.fromtimestamp(forked_at if forked_at is not None else time.time(), timezone.utc)
    source = ForkSource(snap, reseed=reseed, lineage=Lineage(parent_id, when))
    async with source:
        tasks = [asyncio.ensure_future(start_child(source)) for _ in range(count)]
        try:
            await asyncio.wait(tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.shield(_stop_started(tasks, stop_child, log_prefix=parent_id))
            raise
        failed = [e for e in map(_error, tasks) if e is not None]
        if failed:
            await asyncio.shield(_stop_started(tasks, stop_child, log_prefix=parent_id))
            raise failed[0]
    log.info("kernel %s: %d branches imported from fork snapshot %s (pull %.1f s, total %.1f s)",
             parent_id, count, fork_id[:12], pulled, time.monotonic() - t0)
    return [t.result() for t in tasks]


__all__ = ["ExportedFork", "export_fork", "import_fork", "store_configured"]
