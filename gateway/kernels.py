"""The gateway's kernel manager: jupyter_server's ``AsyncMappingKernelManager`` (culling,
activity tracking, message buffering across websocket reconnects) plus what a shared
gateway needs.

- **Limits.** ``max_kernels`` and ``max_kernels_per_user`` (by ``KERNEL_USERNAME``) are
  checked, and a slot reserved, before a start begins, so concurrent requests cannot
  overshoot; a refusal is ``LimitExceeded`` (403 at the web layer).
- **Environment.** A kernel gets ``KERNEL_*`` variables and the names in ``env_allowlist``
  from the request, and the names in ``env_process_allowlist`` from the gateway's own
  environment; nothing else of the gateway's environment.
- **Kernel names.** ``default_kernel_name`` when a request names none; ``force_kernel_name``
  overrides whatever a request names.
- **Warm pool.** ``pool_size`` kernels per kernelspec are restored ahead of time, warmed
  (one silent execute, so the TCG translation cache already holds the execute path) and
  kept outside the kernel map, invisible to the REST API. ``start_kernel`` hands one out
  when it can: the request's env is applied in the guest (``MicroVMProvisioner.adopt``)
  and kept for restarts, the kernel enters the map, and a refill starts in the background.
  Pool kernels only fill spare room: the pool never grows past ``max_kernels``.
- **Bounded replay buffer.** While no websocket is connected, a kernel's messages for the
  last session are kept (at most ``max_buffered_messages`` / ``max_buffered_bytes``,
  oldest dropped first, and the client told how many) and replayed on reconnect.
- **Restart and death, as Jupyter shows them.** A restored kernel's ipykernel started long
  before its snapshot, so after a restart it publishes no ``status: starting`` the way a
  freshly launched local ipykernel does, and the REST model would keep whatever state the
  old kernel left (``busy`` forever after a crash mid-cell). ``VMServerKernelManager`` tells
  the mapping manager when any restart is done, which then speaks for the kernel on open
  websockets (``status_hooks``), matching jupyter_server's local kernels: a user's restart
  shows ``starting`` (then the ``busy``/``idle`` of jupyter_server's own kernel_info), never
  ``restarting``; a death revived by the auto-restarter shows jupyter_server's
  ``restarting`` then ``starting`` and ``idle`` (nobody asks kernel_info there, and a restored
  kernel is idle); a death past the restart budget shows ``dead`` before the websockets close.

Called by the request handlers (``gateway.handlers``) on the tornado loop; the VM work
itself hops to the runtime loop inside the provisioner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server._tz import utcnow
from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL
from jupyter_server.services.kernels.kernelmanager import (
    AsyncMappingKernelManager,
    ServerKernelManager,
)
from traitlets import Dict, Float, Integer, List, Unicode, default

from kernelmanager.exceptions import LimitExceeded

from . import metrics
from .envvars import env_bool, env_int, env_list

DELIM = b"<IDS|MSG>"


class VMServerKernelManager(ServerKernelManager):
    """One kernel's manager: jupyter_server's, telling its mapping manager when a restart is
    done. Both restart paths come through here: the mapping manager's (a user's restart)
    and the auto-restarter's (after the kernel died)."""

    async def restart_kernel(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        await super().restart_kernel(*args, **kwargs)
        parent = self.parent
        if isinstance(parent, VMMappingKernelManager):
            parent.kernel_restarted(self.kernel_id)


class VMMappingKernelManager(AsyncMappingKernelManager):
    max_kernels = Integer(None, allow_none=True, config=True,
                          help="Most kernels clients may hold at once; a start beyond it is "
                               "refused with 403. Unbounded if unset. ($VMKG_MAX_KERNELS)")

    @default("max_kernels")
    def _max_kernels_default(self) -> int | None:
        return env_int("VMKG_MAX_KERNELS", None)

    max_kernels_per_user = Integer(None, allow_none=True, config=True,
                                   help="Most kernels one KERNEL_USERNAME may hold at once; beyond it "
                                        "403. Requests without KERNEL_USERNAME are not counted per "
                                        "user. ($VMKG_MAX_KERNELS_PER_USER)")

    @default("max_kernels_per_user")
    def _max_per_user_default(self) -> int | None:
        return env_int("VMKG_MAX_KERNELS_PER_USER", None)

    force_kernel_name = Unicode("", config=True,
                                help="Start this kernelspec whatever a request names. "
                                     "($VMKG_FORCE_KERNEL_NAME)")

    @default("force_kernel_name")
    def _force_default(self) -> str:
        return os.environ.get("VMKG_FORCE_KERNEL_NAME", "")

    @default("default_kernel_name")
    def _default_name_default(self) -> str:
        return os.environ.get("VMKG_DEFAULT_KERNEL_NAME", "python3-microvm")

    kernel_name_aliases = Dict(key_trait=Unicode(), value_trait=Unicode(),
                               default_value={"python3": "python3-microvm"}, config=True,
                               help="Kernel names a request may use for one of this gateway's "
                                    "kernelspecs. jupyter_server's GatewayKernelManager (nbclient, "
                                    "papermill) asks for 'python3' unless given a name; here that "
                                    "is a microVM too. Names not served and not aliased get 404.")

    env_allowlist = List(Unicode(), config=True,
                         help="Variables a request's 'env' may set in the kernel besides KERNEL_*. "
                              "($VMKG_ENV_ALLOWLIST, comma-separated)")

    @default("env_allowlist")
    def _env_allowlist_default(self) -> list[str]:
        return env_list("VMKG_ENV_ALLOWLIST")

    env_process_allowlist = List(Unicode(), config=True,
                                 help="Variables of the gateway's own environment passed into every "
                                      "kernel. ($VMKG_ENV_PROCESS_ALLOWLIST, comma-separated)")

    @default("env_process_allowlist")
    def _env_process_allowlist_default(self) -> list[str]:
        return env_list("VMKG_ENV_PROCESS_ALLOWLIST")

    pool_size = Integer(1, config=True,
                        help="Kernels per kernelspec restored and warmed ahead of time and handed to "
                             "POST /api/kernels. 0 disables the pool. ($VMKG_POOL_SIZE)")

    @default("pool_size")
    def _pool_size_default(self) -> int:
        return env_int("VMKG_POOL_SIZE", 1) or 0

    pool_sizes = Dict(key_trait=Unicode(), value_trait=Integer(), config=True,
                      help="Per-kernelspec pool sizes overriding pool_size, e.g. "
                           "{'data-microvm': 0}.")

    pool_refill_delay = Float(1.0, config=True,
                              help="Seconds a refill waits after the last kernel start request, so "
                                   "a burst of clients gets the CPU for its first cells before the "
                                   "pool restores (and warms) replacements.")

    pool_warmup_code = Unicode("1+1", config=True,
                               help="Code each pooled kernel runs (twice, as an ordinary cell) before "
                                    "it is handed out, so a client's first cells find the execute, "
                                    "display and history paths warm; then the kernel is reset (new "
                                    "history session, empty namespace, execution count 1), so no "
                                    "trace is left. Empty: only kernel_info.")

    max_buffered_messages = Integer(10_000, config=True,
                                    help="Messages kept per kernel while no websocket is connected, "
                                         "replayed on reconnect; the oldest go first. "
                                         "($VMKG_MAX_BUFFERED_MESSAGES)")

    @default("max_buffered_messages")
    def _max_buffered_messages_default(self) -> int:
        return env_int("VMKG_MAX_BUFFERED_MESSAGES", 10_000) or 0

    max_buffered_bytes = Integer(256 * 1024 * 1024, config=True,
                                 help="Bytes kept per kernel while no websocket is connected. "
                                      "($VMKG_MAX_BUFFERED_BYTES)")

    @default("max_buffered_bytes")
    def _max_buffered_bytes_default(self) -> int:
        return env_int("VMKG_MAX_BUFFERED_BYTES", 256 * 1024 * 1024) or 0

    # culling: jupyter_server's traits, settable from the environment too

    @default("cull_idle_timeout")
    def _cull_idle_timeout_default(self) -> int:
        return env_int("VMKG_CULL_IDLE_TIMEOUT", 0) or 0

    @default("cull_interval")
    def _cull_interval_default(self) -> int:
        return env_int("VMKG_CULL_INTERVAL", self.cull_interval_default) or self.cull_interval_default

    @default("cull_connected")
    def _cull_connected_default(self) -> bool:
        return env_bool("VMKG_CULL_CONNECTED", False)

    @default("cull_busy")
    def _cull_busy_default(self) -> bool:
        return env_bool("VMKG_CULL_BUSY", False)

    @default("kernel_manager_class")
    def _kernel_manager_class_default(self) -> str:
        return "gateway.kernels.VMServerKernelManager"

    @default("root_dir")
    def _root_dir_default(self) -> str:
        return os.getcwd()

    @default("connection_dir")
    def _connection_dir_default(self) -> str:
        # where the reaper looks for a crashed gateway's leftovers (not the working directory)
        d = jupyter_runtime_dir()
        os.makedirs(d, mode=0o700, exist_ok=True)
        return d

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool: dict[str, deque[Any]] = {}
        self._pool_starting: Counter[str] = Counter()
        self._pool_waiters: dict[str, list[asyncio.Future[Any]]] = {}
        self._refill_task: asyncio.Task[None] | None = None
        self._reserved: Counter[str] = Counter()  # starts in flight, by username
        self._last_request = 0.0
        self._closing = False
        self.usernames: dict[str, str] = {}
        self.sources: dict[str, str] = {}  # kernel id -> "pool" | "restore"
        self.culled = 0
        #: called with the id of every kernel leaving the map (shut down, culled, died)
        self.removal_hooks: list[Callable[[str], None]] = []
        #: called with (kernel id, execution_state) to tell the kernel's open websockets a
        #: status the kernel itself does not publish (see "Restart and death" above)
        self.status_hooks: list[Callable[[str, str], None]] = []
        self._user_restarts: set[str] = set()
        self._share_allowlist_with_provisioner()

    def _share_allowlist_with_provisioner(self) -> None:
        """The provisioner filters the env again (KERNEL_* plus its own allow-list); names
        this gateway allows must pass there too."""
        from kernelmanager.provisioner import MicroVMProvisioner

        prov = self.config.MicroVMProvisioner
        current = list(prov.env_allowlist) if "env_allowlist" in prov else \
            list(MicroVMProvisioner.class_traits()["env_allowlist"].default())
        prov.env_allowlist = sorted(set(current) | set(self.env_allowlist) | set(self.env_process_allowlist))

    # -- starting kernels ----------------------------------------------------------------

    def kernel_env(self, requested: dict[str, str]) -> dict[str, str]:
        """The environment a kernel gets for a request that brought ``requested``."""
        env = {k: os.environ[k] for k in self.env_process_allowlist if k in os.environ}
        env.update({k: str(v) for k, v in requested.items()
                    if k.startswith("KERNEL_") or k in self.env_allowlist})
        return env

    def resolve_kernel_name(self, requested: str | None) -> str:
        name = self.force_kernel_name or requested or self.default_kernel_name
        return self.kernel_name_aliases.get(name, name)

    def client_kernel_count(self, username: str | None = None) -> int:
        if username is None:
            return len(self._kernels) + sum(self._reserved.values())
        held = sum(1 for kid, user in self.usernames.items() if user == username and kid in self._kernels)
        return held + self._reserved[username]

    def _check_limits(self, username: str) -> None:
        if self.max_kernels is not None and self.client_kernel_count() >= self.max_kernels:
            raise LimitExceeded(
                f"max_kernels reached: this gateway runs at most {self.max_kernels} kernels and "
                f"{self.client_kernel_count()} are running or starting; shut one down first")
        if username and self.max_kernels_per_user is not None \
                and self.client_kernel_count(username) >= self.max_kernels_per_user:
            raise LimitExceeded(
                f"max_kernels_per_user reached: user {username!r} may hold at most "
                f"{self.max_kernels_per_user} kernels; shut one down first")

    async def start_kernel(self, *, kernel_name: str | None = None, kernel_id: str | None = None,
                           path: str | None = None, env: dict[str, str] | None = None,
                           **kwargs: Any) -> str:
        """Start (or take from the pool) a kernel for a client; returns its id.

        ``env`` is what the request brought; it is filtered by :meth:`kernel_env`.
        Raises ``NoSuchKernel`` for an unknown kernelspec and ``LimitExceeded`` at a limit.
        """
        if kernel_id is not None and kernel_id in self:
            return kernel_id
        kernel_name = self.resolve_kernel_name(kernel_name)
        self.kernel_spec_manager.get_kernel_spec(kernel_name)  # NoSuchKernel before anything else
        kernel_env = self.kernel_env(env or {})
        username = kernel_env.get("KERNEL_USERNAME", "")
        self._check_limits(username)
        self._reserved[username] += 1
        self._last_request = time.monotonic()
        t0 = time.monotonic()
        try:
            kid = await self._hand_out(kernel_name, kernel_env) if kernel_id is None else None
            source = "pool"
            if kid is None:
                source = "restore"
                kid = await super().start_kernel(kernel_name=kernel_name, kernel_id=kernel_id,
                                                 path=path, env=kernel_env, **kwargs)
                km = self._kernels[kid]
                if km.execution_state == "starting":
                    # restored from a snapshot of an idle kernel, identity taken on: it is idle
                    # (jupyter_server would say "starting" until a websocket nudged it)
                    km.execution_state = "idle"
        finally:
            self._reserved[username] -= 1
        elapsed = time.monotonic() - t0
        self.usernames[kid] = username
        self.sources[kid] = source
        metrics.KERNEL_CREATE_SECONDS.labels(source=source).observe(elapsed)
        if source == "restore":
            self._observe_restore(self._kernels.get(kid))
        self.log.info("kernel %s: started for %s from %s in %.0f ms (%s)", kid,
                      f"user {username!r}" if username else "a client", source, elapsed * 1000,
                      kernel_name)
        self.refill_pool()
        return kid

    @staticmethod
    def _observe_restore(km: Any) -> None:
        vk = getattr(getattr(km, "provisioner", None), "vm_kernel", None)
        if vk is not None and "start" in vk.timings:
            metrics.VM_RESTORE_SECONDS.observe(vk.timings["start"])

    async def restart_kernel(self, kernel_id: str, now: bool = False) -> Any:
        """A user's restart (REST). Resolves, like jupyter_server's, to a future of the new
        kernel's kernel_info reply."""
        self._user_restarts.add(kernel_id)
        try:
            future = await super().restart_kernel(kernel_id, now=now)
        finally:
            self._user_restarts.discard(kernel_id)

        def observe(_: Any) -> None:
            if kernel_id in self:
                self._observe_restore(self._kernels[kernel_id])

        future.add_done_callback(observe)
        return future

    def _announce(self, kernel_id: str, state: str) -> None:
        for hook in self.status_hooks:
            hook(kernel_id, state)
        # and to the client that is away right now: JupyterLab closes its websocket on
        # "restarting" and reconnects (same session) while the kernel restarts; without
        # this its reconnected page would wait in "unknown" (it ignores the statuses of
        # kernel_info requests) where a local kernel's page gets the new kernel's "starting"
        info = self._kernel_buffers.get(kernel_id) if kernel_id in self._kernel_buffers else None
        km = self._kernels.get(kernel_id)
        if info and info.get("buffer") is not None and km is not None:
            msg = km.session.msg("status", content={"execution_state": state})
            info["buffer"].append(("iopub", km.session.serialize(msg)))

    def kernel_restarted(self, kernel_id: str) -> None:
        """Called by ``VMServerKernelManager`` once a restart of ``kernel_id`` is done (the new
        VM is up), before anything is asked of the new kernel."""
        km = self._kernels.get(kernel_id)
        if km is None:
            return
        self._announce(kernel_id, "starting")  # what a local ipykernel publishes when it starts
        if kernel_id in self._user_restarts:
            # jupyter_server's restart_kernel asks kernel_info next: its busy/idle take the
            # model from starting to idle, as for a local kernel
            km.execution_state = "starting"
            self.log.info("kernel %s: restarted on request", kernel_id)
        else:
            # the auto-restarter revived a kernel that died: nobody asks kernel_info, and the
            # restored kernel is idle (otherwise the model would say "busy" from the cell
            # that was running when it died, and clients would wait for an idle that never comes)
            km.execution_state = "idle"
            self._announce(kernel_id, "idle")
            self.log.warning("kernel %s: died and was restarted (its state is gone)", kernel_id)

    def _handle_kernel_died(self, kernel_id: str) -> None:
        """The restart budget is spent: clients hear ``dead`` before their websockets close."""
        km = self._kernels.get(kernel_id)
        if km is not None:
            km.execution_state = "dead"
        self._announce(kernel_id, "dead")
        super()._handle_kernel_died(kernel_id)

    def remove_kernel(self, kernel_id: str) -> Any:
        self.usernames.pop(kernel_id, None)
        self.sources.pop(kernel_id, None)
        km = super().remove_kernel(kernel_id)
        for hook in self.removal_hooks:
            hook(kernel_id)
        return km

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        model: dict[str, Any] = super().kernel_model(kernel_id)
        kernel = self._kernels[kernel_id]
        # GatewayClient parses '%Y-%m-%dT%H:%M:%S.%fZ'; isoformat() drops '.%f' when it is 0
        model["last_activity"] = kernel.last_activity.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        from .forks import lineage_fields  # lineage: parent_id, forked_at (None unless forked)

        model.update(lineage_fields(self, kernel_id))
        model["vmkg"] = {"source": self.sources.get(kernel_id, "restore"),
                         "template": kernel.kernel_spec.metadata.get("vmkg", {}).get("template")
                         if kernel.kernel_spec else None}
        return model

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        await super().cull_kernel_if_idle(kernel_id)
        if kernel_id not in self:
            self.culled += 1
            metrics.KERNELS_CULLED.inc()

    # -- the warm pool -------------------------------------------------------------------

    def pool_target(self, kernel_name: str) -> int:
        if self.force_kernel_name and kernel_name != self.force_kernel_name:
            return 0
        return max(0, self.pool_sizes.get(kernel_name, self.pool_size))

    def pooled(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._pool.items()}

    def pooled_managers(self) -> list[Any]:
        return [km for q in self._pool.values() for km in q]

    def refill_pool(self) -> None:
        """Bring every kernelspec's pool up to its target, one restore at a time, in the
        background. Called at gateway start and after every hand-out."""
        if self._closing or (self._refill_task is not None and not self._refill_task.done()):
            return
        self._refill_task = asyncio.ensure_future(self._refill())

    def _next_to_fill(self) -> str | None:
        total = len(self._kernels) + sum(self._reserved.values()) + sum(self.pooled().values())
        if self.max_kernels is not None and total >= self.max_kernels:
            return None
        for name in self.kernel_spec_manager.find_kernel_specs():
            if len(self._pool.get(name, ())) < self.pool_target(name):
                return name
        return None

    async def _refill(self) -> None:
        failures = 0
        while not self._closing:
            quiet = self._last_request + self.pool_refill_delay - time.monotonic()
            if quiet > 0 or sum(self._reserved.values()):
                await asyncio.sleep(max(quiet, 0.05))
                continue
            name = self._next_to_fill()
            if name is None:
                return
            self._pool_starting[name] += 1
            try:
                km = await self._start_pooled(name)
            except Exception as exc:  # noqa: BLE001 - keep serving; retry with backoff
                self._pool_starting[name] -= 1
                self._release_waiters(name, None)
                failures += 1
                delay = min(60.0, 2.0 ** failures)
                self.log.error("pool %s: could not restore a kernel (%s); retrying in %.0f s", name, exc, delay)
                await asyncio.sleep(delay)
                continue
            self._pool_starting[name] -= 1
            failures = 0
            if self._closing:
                await self._discard(km)
                return
            if self._release_waiters(name, km):
                continue  # a request was waiting for exactly this kernel
            total = len(self._kernels) + sum(self._reserved.values()) + sum(self.pooled().values())
            if self.max_kernels is not None and total >= self.max_kernels:
                self.log.info("kernel %s: no room left under max_kernels; not pooled", km.kernel_id)
                await self._discard(km)
                continue
            self._pool.setdefault(name, deque()).append(km)
            self.log.info("pool %s: kernel %s ready (%d pooled)", name, km.kernel_id, len(self._pool[name]))

    def _release_waiters(self, name: str, km: Any) -> bool:
        """Give ``km`` to the first request waiting for a pool start of ``name`` (True if one
        took it); with ``km=None`` tell every waiter to restore a kernel of its own."""
        waiters = self._pool_waiters.get(name, [])
        while waiters:
            fut = waiters.pop(0)
            if fut.done():
                continue
            fut.set_result(km)
            if km is not None:
                return True
        return False

    async def _start_pooled(self, kernel_name: str) -> Any:
        kwargs: dict[str, Any] = {}
        km, _, kid = self.pre_start_kernel(kernel_name, kwargs)
        try:
            await km.start_kernel(kernel_id=kid, env=self.kernel_env({}))
            self._observe_restore(km)
            await self._warm(km)
        except BaseException:
            await self._discard(km)
            raise
        return km

    async def _warm(self, km: Any) -> None:
        """Run the paths a client's first requests take once, so they are warm when it comes
        (under TCG a restored VM starts with an empty translation cache)."""
        kc = km.client()
        kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
        try:
            info = await kc.kernel_info(reply=True, timeout=30)
            if self.pool_warmup_code:
                for _ in range(2):
                    await kc.execute(self.pool_warmup_code, reply=True, timeout=30)
                reply = await kc.execute("get_ipython().reset(new_session=True)", silent=True,
                                         store_history=False, reply=True, timeout=30)
                if reply["content"]["status"] != "ok":
                    raise RuntimeError(f"warm-up reset failed: {reply['content'].get('evalue')}")
        finally:
            kc.stop_channels()
        # the first websocket asks for kernel_info; jupyter_server keeps the answer here
        cached: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        cached.set_result(info["content"])
        km._kernel_info_future = cached

    async def _discard(self, km: Any) -> None:
        try:
            await km.shutdown_kernel(now=True)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("kernel %s: pooled kernel did not shut down cleanly: %s", km.kernel_id, exc)

    async def _take(self, kernel_name: str) -> Any:
        """A pooled kernel manager: a ready one, else the one a refill is restoring right now
        (sooner than a restore of our own, and no VM beyond the pool's), else None."""
        pool = self._pool.get(kernel_name)
        if pool:
            return pool.popleft()
        waiters = self._pool_waiters.setdefault(kernel_name, [])
        if self._pool_starting[kernel_name] > len(waiters):
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            return await fut
        return None

    async def _hand_out(self, kernel_name: str, env: dict[str, str]) -> str | None:
        """Move a pooled kernel into the kernel map for a client; None if none is ready."""
        while True:
            km = await self._take(kernel_name)
            if km is None:
                return None
            if not await km.is_alive():
                self.log.warning("kernel %s: pooled kernel died; discarding it", km.kernel_id)
                asyncio.ensure_future(self._discard(km))
                continue
            try:
                await km.provisioner.adopt(env)
            except Exception as exc:  # noqa: BLE001 - fall back to the next one, or a fresh restore
                self.log.warning("kernel %s: pooled kernel could not take on the request's env: %s",
                                 km.kernel_id, exc)
                asyncio.ensure_future(self._discard(km))
                continue
            km.update_env(env=env)  # restarts restore with the same env
            kid: str = km.kernel_id
            # what MappingKernelManager.start_kernel does for a kernel it started itself
            self._kernels[kid] = km
            self._kernel_connections[kid] = 0
            km.execution_state = "idle"
            km.reason = ""
            km.last_activity = utcnow()
            await self._finish_kernel_start(kid)
            KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).inc()
            if not self._initialized_culler:
                self.initialize_culler()
            return kid

    async def shutdown_all(self, now: bool = False) -> None:
        """Stop every kernel, pooled ones included (gateway shutdown)."""
        self._closing = True
        if self._refill_task is not None and not self._refill_task.done():
            self._refill_task.cancel()
            try:
                await self._refill_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for name in list(self._pool_waiters):
            self._release_waiters(name, None)
        pooled = self.pooled_managers()
        self._pool.clear()
        await asyncio.gather(*(self._discard(km) for km in pooled), super().shutdown_all(now=now))

    # -- bounded buffering while no websocket is connected ---------------------------------

    def start_buffering(self, kernel_id: str, session_key: str, channels: dict[str, Any]) -> None:
        if not self.buffer_offline_messages:
            for stream in channels.values():
                stream.close()
            return
        self.log.info("kernel %s: buffering messages for session %s", kernel_id, session_key)
        self._check_kernel_id(kernel_id)
        self.stop_buffering(kernel_id)
        info = self._kernel_buffers[kernel_id]
        buf: deque[tuple[str, list[bytes]]] = deque()
        info.update(session_key=session_key, buffer=buf, channels=channels, bytes=0, dropped=0)
        for channel, stream in channels.items():
            stream.on_recv(partial(self._buffer_msg, info, channel))

    def _buffer_msg(self, info: dict[str, Any], channel: str, parts: list[Any]) -> None:
        buf = info["buffer"]
        buf.append((channel, parts))
        info["bytes"] += sum(len(p) for p in parts)
        while len(buf) > 1 and (len(buf) > self.max_buffered_messages
                                or info["bytes"] > self.max_buffered_bytes):
            _, old = buf.popleft()
            info["bytes"] -= sum(len(p) for p in old)
            info["dropped"] += 1

    def prepend_buffered(self, kernel_id: str, session_key: str, messages: list[tuple[str, list[Any]]]) -> None:
        """Put messages a closing websocket could not deliver in front of the buffer."""
        info = self._kernel_buffers.get(kernel_id) if kernel_id in self._kernel_buffers else None
        if not info or info.get("session_key") != session_key:
            return
        for channel, parts in reversed(messages):
            info["buffer"].appendleft((channel, parts))
            info["bytes"] = info.get("bytes", 0) + sum(len(p) for p in parts)

    def get_buffer(self, kernel_id: str, session_key: str) -> Any:
        # What was kept goes to the next client of the kernel whatever its session id:
        # JupyterLab reconnects after a page reload with a new session id, and jupyter_server
        # would discard the output of the cell that kept printing meanwhile. The newcomer
        # takes the buffered session over (its streams too, so replies to the old session's
        # requests reach it). (Small on purpose: the buffering moves to gateway/replay.py.)
        kept = self._kernel_buffers.get(kernel_id) if kernel_id in self._kernel_buffers else None
        if kept and kept.get("buffer") and kept.get("session_key") != session_key:
            self.log.info("kernel %s: session %s takes over %d messages kept for session %s", kernel_id,
                          session_key, len(kept["buffer"]), kept.get("session_key"))
            kept["session_key"] = session_key
        info = super().get_buffer(kernel_id, session_key)
        if info and info.get("dropped"):
            notice = self._notice(kernel_id, (
                f"[vmkg] {info['dropped']} messages of this kernel were dropped while no client "
                f"was connected (replay buffer limit: {self.max_buffered_messages} messages, "
                f"{self.max_buffered_bytes} bytes)\n"))
            if notice is not None:
                info["buffer"].appendleft(("iopub", notice))
        return info

    def _notice(self, kernel_id: str, text: str) -> list[bytes] | None:
        """A signed iopub stderr message, as if from the kernel (for the replay buffer)."""
        km = self._kernels.get(kernel_id)
        if km is None:
            return None
        session = km.session
        msg = session.msg("stream", content={"name": "stderr", "text": text})
        parts: list[bytes] = session.serialize(msg)
        return parts

    # -- for metrics ---------------------------------------------------------------------

    def states(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for km in self._kernels.values():
            counts[getattr(km, "execution_state", None) or "unknown"] += 1
        counts["pooled"] = sum(self.pooled().values())
        counts["starting"] += sum(self._reserved.values()) + sum(self._pool_starting.values())
        return counts

    def vm_pids(self) -> list[int]:
        pids = []
        for km in [*self._kernels.values(), *self.pooled_managers()]:
            vk = getattr(getattr(km, "provisioner", None), "vm_kernel", None)
            pid = getattr(getattr(vk, "vm", None), "pid", None)
            if pid:
                pids.append(pid)
        return pids

