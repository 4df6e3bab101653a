"""Durable kernels over HTTP, and the gateway's part in them (``kernelmanager.durable`` does
the saving and restoring).

Routes (owner checks as for every kernel route: another user's kernel is a 404)::

    POST   /api/kernels/{id}/hibernate                  200 model (vmkg.hibernated true)
    POST   /api/kernels/{id}/wake                       200 model
    GET    /api/kernels/{id}/checkpoints                {"checkpoints": [{name, created, size}]}
    POST   /api/kernels/{id}/checkpoints  {"name": n}   201 {name, created, size}
    DELETE /api/kernels/{id}/checkpoints/{name}         204
    POST   /api/kernels/{id}/checkpoints/{name}/restore 200 model (in place, same id)

and ``POST /api/kernels/{id}/fork {"count": N, "checkpoint": name}`` (``gateway.forks``).
A full budget or disk is 507 (the kernel keeps running), an unknown checkpoint 404, a
kernel that stays busy 409.

What the gateway adds (``Durability``, one per ``vmkg serve``):

* **Hibernate after idling.** ``hibernate_after`` seconds (``$VMKG_HIBERNATE_AFTER``, 0:
  never) after a kernel's last activity, an idle kernel is hibernated, websockets open
  or not; every ``hibernate_interval`` s the kernels are checked. With
  ``hibernate_instead_of_cull`` the culler hibernates instead of shutting down.
* **Surviving a restart** (``persist_kernels``, ``$VMKG_PERSIST_KERNELS``). On SIGTERM every
  kernel is recorded (kernelspec, connection file contents, env, owner and username) and
  hibernated, all in parallel, within ``persist_timeout`` s; kernels not saved by then are
  named in the log and shut down as before. The next ``vmkg serve`` with the same state
  directory brings each back under the same id, key, ipc endpoints (tcp ports when free)
  and owner, hibernated until used. Off by default: a gateway that does not ask for it
  leaves nothing behind, as before.
* **The crash case** (``checkpoint_on_idle``, ``$VMKG_CHECKPOINT_ON_IDLE``). QEMU dies with
  a killed gateway (the no-orphan rule), so whenever a kernel is idle after activity
  (checked every ``hibernate_interval`` s) its state is saved in the background as its
  ``auto`` image (the VM pauses as for a fork; the pages and disk written since the
  template, replacing the last) and the kernel recorded; the next start brings it back,
  hibernated, at that checkpoint (the newer of it and a hibernated image). Work done
  after the last idle checkpoint (a cell still running, or finished less than one
  interval before the crash) is lost.
* **Metrics**: ``vmkg_durable_culled_total``, ``vmkg_idle_checkpoint_seconds``, ``vmkg_hibernated_kernels``, ``vmkg_durable_bytes`` (images and checkpoints
  on disk), ``vmkg_wake_seconds`` (histogram), ``vmkg_hibernations_total{result}``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

from jupyter_server.base.handlers import APIHandler
from prometheus_client import Counter, Gauge, Histogram
from tornado import web

from kernelmanager import (
    CheckpointNotFound,
    DurableBudgetExceeded,
    KernelBusy,
    PersistedKernel,
    durable_usage,
    persisted_kernels,
    vm_handle,
)

from . import errors, metrics, users
from .handlers import GatewayHandlerMixin, _finish_json, check_owner

HIBERNATED = Gauge("vmkg_hibernated_kernels", "Kernels hibernated to disk (no VM running)")
DURABLE_BYTES = Gauge("vmkg_durable_bytes", "Bytes hibernated images and checkpoints take on disk")
WAKE_SECONDS = Histogram("vmkg_wake_seconds", "Time to wake a hibernated kernel (restore of its image)",
                         buckets=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0))
HIBERNATIONS = Counter("vmkg_hibernations", "Hibernations, by result", ["result"])
DURABLE_CULLED = Counter("vmkg_durable_culled", "Hibernated kernels culled to fit the durable "
                         "budget (durable_cull_oldest)")
IDLE_CHECKPOINT_SECONDS = Histogram("vmkg_idle_checkpoint_seconds",
                                    "Time one background idle checkpoint took (checkpoint_on_idle)",
                                    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0))


def hibernated_fields(mkm: Any, kernel_id: str) -> dict[str, Any]:
    """The model's ``vmkg.hibernated`` and ``vmkg.since`` (UTC ISO, or None)."""
    handle = vm_handle(mkm.get_kernel(kernel_id)) if kernel_id in mkm else None
    since = handle.hibernated_since if handle is not None else None
    return {"hibernated": since is not None,
            "since": since.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if since is not None else None}


def _handle(mkm: Any, kernel_id: str) -> Any:
    handle = vm_handle(mkm.get_kernel(kernel_id))
    if handle is None:
        raise web.HTTPError(400, "only microVM kernels can be hibernated or checkpointed")
    return handle


async def hibernate_kernel(mkm: Any, kernel_id: str, idle_timeout: float = 30.0) -> int:
    """Hibernate one kernel. Past the durable budget: 507, or with ``durable_cull_oldest``
    the oldest hibernated kernels are culled until it fits (see :func:`cull_oldest`)."""
    handle = _handle(mkm, kernel_id)
    try:
        for attempt in range(_CULL_ATTEMPTS + 1):
            try:
                size = int(await handle.hibernate(idle_timeout=idle_timeout))
                break
            except DurableBudgetExceeded as exc:
                if attempt == _CULL_ATTEMPTS or not getattr(mkm, "durable_cull_oldest", False) \
                        or not await cull_oldest(mkm, kernel_id, int(getattr(exc, "over", 0) or 1), str(exc)):
                    raise
    except BaseException:
        HIBERNATIONS.labels("failed").inc()
        raise
    HIBERNATIONS.labels("ok").inc()
    mkm.get_kernel(kernel_id).execution_state = "idle"
    return size


#: hibernations retried after culling (an image can grow between two tries)
_CULL_ATTEMPTS = 3
_cull_lock: asyncio.Lock | None = None


async def cull_oldest(mkm: Any, for_kernel: str, over: int, why: str) -> bool:
    """Shut down hibernated kernels, oldest sleep first, until ``over`` bytes of durable
    images are freed (or none is left). Each is logged with the reason; its websockets
    close and it is gone (404), its images and checkpoints deleted (forks keep what they
    use). Returns whether anything was culled."""
    global _cull_lock
    if _cull_lock is None:
        _cull_lock = asyncio.Lock()
    async with _cull_lock:  # two hibernations over the budget at once cull for one another
        sleeping = []
        for kid in list(mkm.list_kernel_ids()):
            if kid == for_kernel or kid not in mkm:
                continue
            handle = vm_handle(mkm.get_kernel(kid))
            if handle is not None and handle.hibernated_since is not None:
                sleeping.append((handle.hibernated_since, kid))
        sleeping.sort()
        before, culled = durable_usage(), 0
        for since, kid in sleeping:
            if culled and before - durable_usage() >= over:
                break
            if kid not in mkm:
                continue
            mkm.log.warning(
                "kernel %s: culled, with its saved state (hibernated since %s, the oldest), to "
                "make room in the durable budget for kernel %s (VMKG_DURABLE_CULL_OLDEST; %.1f MB "
                "over: %s)", kid, since.strftime("%Y-%m-%dT%H:%M:%SZ"), for_kernel, over / 2**20, why)
            try:
                await mkm.shutdown_kernel(kid, now=True)
            except Exception as exc:  # noqa: BLE001 - try the next one
                mkm.log.error("kernel %s: could not be culled: %s", kid, exc)
                continue
            culled += 1
            mkm.culled = getattr(mkm, "culled", 0) + 1
            metrics.KERNELS_CULLED.inc()
            DURABLE_CULLED.inc()
        if culled:
            mkm.log.info("durable budget: culled %d hibernated kernel(s), %.1f MB freed, for kernel %s",
                         culled, (before - durable_usage()) / 2**20, for_kernel)
        return culled > 0


async def wake_kernel(mkm: Any, kernel_id: str) -> None:
    handle = _handle(mkm, kernel_id)
    await handle.wake()


class Durability:
    """The gateway's durable-kernel duties (see the module docstring)."""

    def __init__(self, mkm: Any) -> None:
        self.mkm = mkm
        self._task: asyncio.Task[None] | None = None
        self._woken: dict[str, float] = {}
        self._checkpointed: dict[str, datetime] = {}  # kernel id -> activity its auto image has

    # -- resume at start, persist at stop ------------------------------------------------------

    async def resume_all(self) -> list[str]:
        """Bring back every kernel a previous gateway persisted, hibernated."""
        mkm, ids = self.mkm, []
        records = persisted_kernels()
        for rec in records:
            try:
                await self._resume(rec)
                ids.append(rec.kernel_id)
            except Exception as exc:  # noqa: BLE001 - the others still come back
                mkm.log.error("kernel %s: could not be resumed: %s", rec.kernel_id, exc)
        if records:
            mkm.log.info("resumed %d of %d persisted kernels (hibernated until used)",
                         len(ids), len(records))
        return ids

    async def _resume(self, rec: PersistedKernel) -> None:
        mkm = self.mkm
        from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

        kid = await AsyncMappingKernelManager.start_kernel(
            mkm, kernel_name=rec.kernel_name, kernel_id=rec.kernel_id, env=dict(rec.env),
            durable_resume=rec)
        km = mkm.get_kernel(kid)
        km.execution_state = "idle"
        mkm.usernames[kid] = str(rec.extra.get("username", ""))
        mkm.owners[kid] = str(rec.extra.get("owner", users.owner_name(None)))
        mkm.sources[kid] = "resumed"
        mkm.log.info("kernel %s: resumed for %s", kid, mkm.owners[kid] or "the admin")

    async def persist_all(self, timeout: float) -> None:
        """Record and hibernate every kernel in parallel within ``timeout`` seconds."""
        mkm = self.mkm
        ids = list(mkm.list_kernel_ids())
        if not ids:
            return
        t0 = time.monotonic()

        async def one(kid: str) -> None:
            km = mkm.get_kernel(kid)
            handle = vm_handle(km)
            if handle is None:
                return
            if handle.hibernated_since is None:
                await handle.hibernate(idle_timeout=max(1.0, timeout - 5))
            handle.persist(km.kernel_name, {"owner": mkm.owners.get(kid, ""),
                                            "username": mkm.usernames.get(kid, "")})

        tasks = {kid: asyncio.ensure_future(one(kid)) for kid in ids}
        done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        for t in pending:
            t.cancel()
        lost = []
        for kid, t in tasks.items():
            if t in pending:
                lost.append(f"{kid} (not saved within {timeout:.0f} s)")
            elif t.exception() is not None:
                lost.append(f"{kid} ({t.exception()})")
        saved = len(ids) - len(lost)
        mkm.log.info("shutdown: %d of %d kernels hibernated and persisted in %.1f s", saved,
                     len(ids), time.monotonic() - t0)
        for what in lost:
            mkm.log.error("shutdown: kernel %s is NOT persisted; it is shut down", what)

    # -- hibernate after idling ---------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        mkm = self.mkm
        while True:
            await asyncio.sleep(max(1.0, float(mkm.hibernate_interval)))
            try:
                self.observe()
                if mkm.checkpoint_on_idle:
                    await self.checkpoint_idle()
                if mkm.hibernate_after > 0:
                    await self.hibernate_idle()
            except Exception as exc:  # noqa: BLE001 - keep checking
                mkm.log.error("hibernate-after: %s", exc)

    async def hibernate_idle(self) -> None:
        mkm = self.mkm
        now = datetime.now(timezone.utc)
        due = []
        for kid in list(mkm.list_kernel_ids()):
            km = mkm.get_kernel(kid)
            handle = vm_handle(km)
            if handle is None or handle.hibernated_since is not None or not handle.running:
                continue
            if getattr(km, "execution_state", "") != "idle":
                continue
            idle = (now - km.last_activity).total_seconds()
            if idle >= mkm.hibernate_after:
                due.append(kid)
        for kid in due:
            await self.hibernate_quietly(kid, f"idle for {mkm.hibernate_after} s")

    async def checkpoint_idle(self) -> None:
        """The crash case: an idle checkpoint of every kernel active since its last one."""
        mkm = self.mkm
        for kid in list(mkm.list_kernel_ids()):
            if kid not in mkm:
                continue
            km = mkm.get_kernel(kid)
            handle = vm_handle(km)
            if handle is None or handle.hibernated_since is not None or not handle.running:
                continue
            if getattr(km, "execution_state", "") != "idle":
                continue
            activity = km.last_activity
            if self._checkpointed.get(kid) == activity:
                continue
            t0 = time.monotonic()
            try:
                size = await handle.idle_checkpoint(idle_timeout=1.0)
                handle.persist(km.kernel_name, {"owner": mkm.owners.get(kid, ""),
                                                "username": mkm.usernames.get(kid, "")}, keep=False)
            except KernelBusy:
                continue
            except Exception as exc:  # noqa: BLE001 - keep the others going; retried next round
                mkm.log.warning("kernel %s: idle checkpoint failed: %s", kid, exc)
                continue
            self._checkpointed[kid] = activity
            IDLE_CHECKPOINT_SECONDS.observe(time.monotonic() - t0)
            mkm.log.info("kernel %s: idle checkpoint, %.1f MB on disk, %.0f ms", kid,
                         (size or 0) / 2**20, (time.monotonic() - t0) * 1000)
        for kid in set(self._checkpointed) - set(mkm.list_kernel_ids()):
            del self._checkpointed[kid]

    async def hibernate_quietly(self, kid: str, why: str) -> bool:
        mkm = self.mkm
        try:
            size = await hibernate_kernel(mkm, kid, idle_timeout=1.0)
        except KernelBusy:
            return False
        except Exception as exc:  # noqa: BLE001 - it keeps running; say why
            mkm.log.warning("kernel %s: not hibernated (%s): %s", kid, why, exc)
            return False
        mkm.log.info("kernel %s: hibernated (%s), %.1f MB on disk", kid, why, size / 2**20)
        return True

    # -- metrics ---------------------------------------------------------------------------

    def observe(self) -> None:
        mkm = self.mkm
        n = 0
        for kid in list(mkm.list_kernel_ids()):
            handle = vm_handle(mkm.get_kernel(kid))
            if handle is None:
                continue
            if handle.hibernated_since is not None:
                n += 1
            elif handle.last_wake_seconds is not None and self._woken.get(kid) != handle.last_wake_seconds:
                self._woken[kid] = handle.last_wake_seconds
                WAKE_SECONDS.observe(handle.last_wake_seconds)
        HIBERNATED.set(n)
        DURABLE_BYTES.set(durable_usage())


# ---------------------------------------------------------------------------
# Handlers


def _durability(handler: Any) -> Durability | None:
    return getattr(handler.kernel_manager, "durability", None)


class HibernateHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def post(self, kernel_id: str, action: str) -> None:
        km: Any = self.kernel_manager
        check_owner(self, kernel_id)
        body = self.get_json_body() or {}
        timeout = body.get("timeout", 30) if isinstance(body, dict) else 30
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise web.HTTPError(400, "'timeout' must be a number of seconds from 0 to 3600")
        with errors.translated():
            if action == "hibernate":
                await hibernate_kernel(km, kernel_id, idle_timeout=float(timeout))
            else:
                await wake_kernel(km, kernel_id)
        d = _durability(self)
        if d is not None:
            d.observe()
        _finish_json(self, km.kernel_model(kernel_id))


class CheckpointsHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def get(self, kernel_id: str) -> None:
        check_owner(self, kernel_id)
        handle = _handle(self.kernel_manager, kernel_id)
        _finish_json(self, {"kernel_id": kernel_id, "checkpoints": handle.checkpoints()})

    @web.authenticated
    async def post(self, kernel_id: str) -> None:
        check_owner(self, kernel_id)
        body = self.get_json_body() or {}
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise web.HTTPError(400, 'The request body must be a JSON object like {"name": "before-training"}')
        timeout = body.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise web.HTTPError(400, "'timeout' must be a number of seconds from 0 to 3600")
        handle = _handle(self.kernel_manager, kernel_id)
        with errors.translated():
            model = await handle.checkpoint(name, idle_timeout=float(timeout))
        _finish_json(self, model, 201)


class CheckpointHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def delete(self, kernel_id: str, name: str) -> None:
        check_owner(self, kernel_id)
        handle = _handle(self.kernel_manager, kernel_id)
        with errors.translated():
            handle.delete_checkpoint(name)
        self.set_status(204)
        self.finish()


class CheckpointRestoreHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def post(self, kernel_id: str, name: str) -> None:
        km: Any = self.kernel_manager
        check_owner(self, kernel_id)
        handle = _handle(km, kernel_id)
        with errors.translated():
            await handle.restore_checkpoint(name)
        km.get_kernel(kernel_id).execution_state = "idle"
        km.log.info("kernel %s: restored to checkpoint %s", kernel_id, name)
        _finish_json(self, km.kernel_model(kernel_id))


__all__ = ["CheckpointHandler", "CheckpointNotFound", "CheckpointRestoreHandler", "CheckpointsHandler",
           "Durability", "HibernateHandler", "hibernated_fields"]
