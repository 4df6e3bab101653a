"""The gateway's kernel manager: jupyter_server's ``AsyncMappingKernelManager`` (culling,
activity tracking, message buffering across websocket reconnects) plus what a shared
gateway needs.

- **Limits.** ``max_kernels`` and ``max_kernels_per_user`` (by the authenticated user, or
  for the admin and in no-auth mode by ``KERNEL_USERNAME``: ``gateway.users.limit_name``)
  are checked, and a slot reserved, before a start begins, so concurrent requests cannot
  overshoot; a refusal is ``LimitExceeded`` (403 at the web layer).
- **Owners.** Each kernel records who started or forked it (``owners``); every handler
  that names a kernel calls :meth:`VMMappingKernelManager.check_owner`, which answers
  another user's kernel with the 404 of an unknown one (rules in ``gateway.users``).
- **Environment.** A kernel gets ``KERNEL_*`` variables and the names in ``env_allowlist``
  from the request, and the names in ``env_process_allowlist`` from the gateway's own
  environment; nothing else of the gateway's environment.
- **Kernel names.** ``default_kernel_name`` when a request names none; ``force_kernel_name``
  overrides whatever a request names.
- **Warm pool** (``gateway.pool``). ``pool_size`` kernels per kernelspec are restored and
  warmed ahead of time, outside the kernel map; ``start_kernel`` hands one out when it
  can (the request's env applied in the guest) and puts it into the map. The pool's
  settings are traits here; what it needs of this class is ``gateway.pool.PoolOwner``.
- **Output while no client is connected** (``gateway.replay``): the bounded replay
  buffer is ``ReplayBufferMixin``, a base of this class.
- jupyter_server private attributes are touched only through ``gateway.internals``.
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
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, cast

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server.services.kernels.kernelmanager import (
    AsyncMappingKernelManager,
    ServerKernelManager,
)
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default

from kernelmanager import vm_handle
from kernelmanager.exceptions import LimitExceeded

from . import metrics, users, wire
from . import network as net
from .envvars import env_trait, inherited_help
from .internals import add_started_kernel, watch_activity
from .pool import WarmPool
from .replay import ReplayBufferMixin


async def ready_settled(km: Any) -> None:
    """Return once ``km.ready`` is done, as read when this returns (no await after it).

    A restart replaces ``ready`` once per phase: jupyter_client's shutdown and start are
    each in a pending state of their own, and the start's future is made in the same loop
    step as the shutdown's is resolved. A waiter that took the first future for the whole
    restart would resume to the second, still pending."""
    while not (ready := km.ready).done():
        await asyncio.wait([ready if asyncio.isfuture(ready) else asyncio.wrap_future(ready)])


def activity_recorder(mkm: Any, km: Any, kernel_id: str) -> Callable[[list[bytes]], None]:
    """What jupyter_server's activity watch does with each IOPub message of a kernel
    (``MappingKernelManager.start_watching_activity``), reading only what that uses: the
    header's and parent header's ``msg_type``, and a status message's ``execution_state``.

    jupyter_server deserializes each message whole: its signature (an HMAC over the whole
    content, 20 MB of it for a 20 MB print), then header, parent and metadata with every
    string matched against a date pattern and parsed by dateutil. That was a third of the
    gateway's CPU per round trip. The signature proves nothing here: this subscription
    reads the relay's publisher, which signed the message itself, and a subscriber
    receives only from the publisher it connects to. A message that is not a Jupyter
    message is logged and skipped, as jupyter_server's callback would fail on it."""
    tracked = mkm.track_message_type
    log = mkm.log

    def record(msg_list: list[bytes]) -> None:
        frames = wire.split(msg_list)
        try:
            if frames is None:
                raise ValueError("not a Jupyter message")
            header, parent = json.loads(frames.header), json.loads(frames.parent_header)
            msg_type = header.get("msg_type") if isinstance(header, dict) else None
            if msg_type is None:
                raise ValueError("no msg_type in its header")
            parent_msg_type = parent.get("msg_type") if isinstance(parent, dict) else None
            if tracked(msg_type) or tracked(parent_msg_type) or km.execution_state == "busy":
                mkm.last_kernel_activity = km.last_activity = datetime.now(timezone.utc)
            if msg_type != "status":
                return
            state = json.loads(frames.content)["execution_state"]
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            log.debug("kernel %s: activity watch skipped a message: %s", kernel_id, exc)
            return
        if tracked(parent_msg_type):
            km.execution_state = state
        elif km.execution_state == "starting" and state != "starting":
            # jupyter_server: after "starting", a status not caused by a tracked message
            # makes the kernel idle
            km.execution_state = "idle"

    return record


class VMServerKernelManager(ServerKernelManager):
    """One kernel's manager: jupyter_server's, telling its mapping manager when a restart is
    done. Both restart paths come through here: the mapping manager's (a user's restart)
    and the auto-restarter's (after the kernel died)."""

    async def restart_kernel(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        await super().restart_kernel(*args, **kwargs)
        parent = self.parent
        if isinstance(parent, VMMappingKernelManager):
            parent.kernel_restarted(self.kernel_id)


class VMMappingKernelManager(ReplayBufferMixin, AsyncMappingKernelManager):
    max_kernels = env_trait(Integer, "VMKG_MAX_KERNELS", None, allow_none=True,
                            help="Most kernels clients may hold at once; a start beyond it is "
                                 "refused with 403. Unbounded if unset.")
    max_kernels_per_user = env_trait(Integer, "VMKG_MAX_KERNELS_PER_USER", None, allow_none=True,
                                     help="Most kernels one user may hold at once; beyond it "
                                          "403. A users-file user is counted as authenticated; for "
                                          "the admin token and --no-auth, by KERNEL_USERNAME "
                                          "(requests without it are not counted per user).")
    force_kernel_name = env_trait(Unicode, "VMKG_FORCE_KERNEL_NAME", "",
                                  help="Start this kernelspec whatever a request names.")
    default_kernel_name = env_trait(Unicode, "VMKG_DEFAULT_KERNEL_NAME", "python3-microvm",
                                    help=inherited_help(AsyncMappingKernelManager,
                                                        "default_kernel_name"))

    kernel_name_aliases = Dict(key_trait=Unicode(), value_trait=Unicode(),
                               default_value={"python3": "python3-microvm"}, config=True,
                               help="Kernel names a request may use for one of this gateway's "
                                    "kernelspecs. jupyter_server's GatewayKernelManager (nbclient, "
                                    "papermill) asks for 'python3' unless given a name; here that "
                                    "is a microVM too. Names not served and not aliased get 404.")

    env_allowlist = env_trait(List, "VMKG_ENV_ALLOWLIST", [], trait=Unicode(),
                              help="Variables a request's 'env' may set in the kernel besides "
                                   "KERNEL_*.")
    env_process_allowlist = env_trait(List, "VMKG_ENV_PROCESS_ALLOWLIST", [], trait=Unicode(),
                                      help="Variables of the gateway's own environment passed into "
                                           "every kernel.")

    # the warm pool's settings (gateway.pool reads them through its PoolOwner interface)
    pool_size = env_trait(Integer, "VMKG_POOL_SIZE", 1,
                          help="Kernels per kernelspec restored and warmed ahead of time and handed "
                               "to POST /api/kernels. 0 disables the pool.")

    pool_sizes = Dict(key_trait=Unicode(), value_trait=Integer(), config=True,
                      help="Per-kernelspec pool sizes overriding pool_size, e.g. "
                           "{'data-microvm': 0}.")

    pool_max = env_trait(Integer, "VMKG_POOL_MAX", 8,
                         help="Ceiling up to which a kernelspec's pool grows with demand (the largest "
                              "burst of creates within 10 s over the last 10 minutes); each pooled "
                              "kernel holds ~85 MB under TCG. Never below pool_size.")

    graceful_shutdown_unwatched = Bool(False, config=True, help=(
        "Shut a kernel down through ipykernel (shutdown_request, then up to "
        "shutdown_wait_time for it to exit) even when no websocket is connected to it. "
        "Off: such a kernel's VM is stopped at once - nobody is there to see its shutdown "
        "messages, the VM and its disk are discarded whole, and under TCG ipykernel's own "
        "exit costs ~0.8 s per DELETE. Kernels with a connected client, and restarts, "
        "always go through ipykernel."))
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

    # culling: jupyter_server's traits, settable from the environment too
    cull_idle_timeout = env_trait(Integer, "VMKG_CULL_IDLE_TIMEOUT", 0,
                                  help=inherited_help(AsyncMappingKernelManager, "cull_idle_timeout"))
    cull_interval = env_trait(Integer, "VMKG_CULL_INTERVAL",
                              AsyncMappingKernelManager.cull_interval_default, zero_is_default=True,
                              help=inherited_help(AsyncMappingKernelManager, "cull_interval"))
    cull_connected = env_trait(Bool, "VMKG_CULL_CONNECTED", False,
                               help=inherited_help(AsyncMappingKernelManager, "cull_connected"))
    cull_busy = env_trait(Bool, "VMKG_CULL_BUSY", False,
                          help=inherited_help(AsyncMappingKernelManager, "cull_busy"))

    # durable kernels (gateway.hibernate)
    hibernate_after = env_trait(Integer, "VMKG_HIBERNATE_AFTER", 0,
                                help="Seconds an idle kernel waits before it is hibernated to disk "
                                     "(its VM stops; the next message wakes it with its state). "
                                     "0: never.")
    hibernate_interval = env_trait(Integer, "VMKG_HIBERNATE_INTERVAL", 10,
                                   help="Seconds between checks for kernels to hibernate.")
    hibernate_instead_of_cull = env_trait(Bool, "VMKG_HIBERNATE_INSTEAD_OF_CULL", False,
                                          help="The idle culler hibernates kernels instead of "
                                               "shutting them down (their state is kept on disk).")
    persist_kernels = env_trait(Bool, "VMKG_PERSIST_KERNELS", False,
                                help="On SIGTERM hibernate every kernel and bring them all back, "
                                     "hibernated, at the next start with the same state directory "
                                     "(same ids, connection files and owners).")
    persist_timeout = env_trait(Float, "VMKG_PERSIST_TIMEOUT", 60.0,
                                help="Seconds the shutdown may spend hibernating kernels (in "
                                     "parallel) with persist_kernels; kernels not saved by then "
                                     "are named in the log and shut down.")
    checkpoint_on_idle = env_trait(Bool, "VMKG_CHECKPOINT_ON_IDLE", False,
                                   help="The crash case: whenever a kernel is idle after activity "
                                        "(checked every hibernate_interval s), its state is saved in "
                                        "the background (what changed since the last one), and the "
                                        "next start after a crash (SIGKILL) brings every kernel back "
                                        "at its last idle checkpoint, hibernated.")
    durable_budget_mb = env_trait(Integer, "VMKG_DURABLE_BUDGET_MB", 0,
                                  help="Megabytes hibernated images and checkpoints may take on disk "
                                       "together; past it a hibernation or checkpoint is refused with "
                                       "507 (the kernel keeps running). 0: only the disk's free "
                                       "space (256 MB kept free) limits them.")
    durable_cull_oldest = env_trait(Bool, "VMKG_DURABLE_CULL_OLDEST", False,
                                    help="A hibernation past the durable budget (or a full disk) "
                                         "shuts down the oldest hibernated kernels, their saved "
                                         "state with them, until it fits (each one logged), "
                                         "instead of answering 507. Off: 507.")

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
        self._reserved: Counter[str] = Counter()  # starts in flight, by username
        self.pool = WarmPool(self)
        self.usernames: dict[str, str] = {}  # kernel id -> whom max_kernels_per_user counts
        self.owners: dict[str, str] = {}  # kernel id -> who started or forked it (gateway.users)
        self.sources: dict[str, str] = {}  # kernel id -> "pool" | "restore"
        self.culled = 0
        #: called with the id of every kernel leaving the map (shut down, culled, died)
        self.removal_hooks: list[Callable[[str], None]] = []
        #: called with (kernel id, execution_state) to tell the kernel's open websockets a
        #: status the kernel itself does not publish (see "Restart and death" above)
        self.status_hooks: list[Callable[[str, str], None]] = []
        self._user_restarts: set[str] = set()
        self._share_allowlist_with_provisioner()
        from .hibernate import Durability

        if self.durable_budget_mb > 0:  # the runtime reads it from the environment
            os.environ["VMKG_DURABLE_BUDGET_MB"] = str(self.durable_budget_mb)
        self.durability = Durability(self)

    def _share_allowlist_with_provisioner(self) -> None:
        """The provisioner filters the env again (KERNEL_* plus its own allow-list); names
        this gateway allows must pass there too."""
        from kernelmanager import MicroVMProvisioner

        prov = self.config.MicroVMProvisioner
        current = list(prov.env_allowlist) if "env_allowlist" in prov else \
            list(MicroVMProvisioner.class_traits()["env_allowlist"].default() or [])
        prov.env_allowlist = sorted(set(current) | set(self.env_allowlist) | set(self.env_process_allowlist))

    # -- what the warm pool needs (gateway.pool.PoolOwner) ----------------------------------

    def pool_target(self, kernel_name: str) -> int:
        if self.force_kernel_name and kernel_name != self.force_kernel_name:
            return 0
        if kernel_name not in self.pool_sizes and net.is_networked_kernelspec(self, kernel_name):
            return 0  # networked templates are pooled only where pool_sizes asks for them
        return max(0, int(self.pool_sizes.get(kernel_name, self.pool_size) or 0))

    def kernelspec_names(self) -> list[str]:
        return list(self._specs().find_kernel_specs())

    def _specs(self) -> Any:
        specs = self.kernel_spec_manager
        assert specs is not None, "the app gives every kernel manager a kernelspec manager"
        return specs

    def starts_in_flight(self) -> int:
        return sum(self._reserved.values())

    async def start_unlisted_kernel(self, kernel_name: str) -> Any:
        """Start a kernel manager outside the kernel map (for the warm pool)."""
        kwargs: dict[str, Any] = {}
        km: Any
        km, _, kid = self.pre_start_kernel(kernel_name, kwargs)
        try:
            await km.start_kernel(kernel_id=kid, env=self.kernel_env({}))
        except BaseException:
            try:
                await km.shutdown_kernel(now=True)
            except Exception as exc:  # noqa: BLE001
                self.log.warning("kernel %s: did not shut down cleanly: %s", kid, exc)
            raise
        self._observe_restore(km)
        return km

    def _client_kernels(self) -> list[Any]:
        return [self.get_kernel(kid) for kid in self.list_kernel_ids()]

    # -- owners (gateway.users) ------------------------------------------------------------

    def check_owner(self, kernel_id: str, user: Any) -> None:
        """Raise the 404 of an unknown kernel unless ``user`` may act on ``kernel_id`` (its
        owner, the admin, no-auth mode, or the kernel-id credential of that kernel)."""
        if kernel_id not in self or not users.may_act(user, kernel_id, self.owners.get(kernel_id)):
            raise web.HTTPError(404, "Kernel does not exist: %s", kernel_id)  # jupyter_server's words

    def visible_kernels(self, user: Any) -> list[dict[str, Any]]:
        """GET /api/kernels for ``user``: the models of the kernels it may act on."""
        return [m for m in self.list_kernels()
                if users.may_act(user, m["id"], self.owners.get(m["id"]))]

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
            return len(self) + self.starts_in_flight()
        held = sum(1 for kid, user in self.usernames.items() if user == username and kid in self)
        return held + self._reserved[username]

    def _check_limits(self, username: str, count: int = 1) -> None:
        """Room for ``count`` more kernels (a start: 1; a fork: its children)?"""
        more = f" (asked for {count} more)" if count > 1 else ""
        if self.max_kernels is not None and self.client_kernel_count() + count > self.max_kernels:
            raise LimitExceeded(
                f"max_kernels reached: this gateway runs at most {self.max_kernels} kernels and "
                f"{self.client_kernel_count()} are running or starting{more}; shut one down first")
        if username and self.max_kernels_per_user is not None \
                and self.client_kernel_count(username) + count > self.max_kernels_per_user:
            raise LimitExceeded(
                f"max_kernels_per_user reached: user {username!r} may hold at most "
                f"{self.max_kernels_per_user} kernels{more}; shut one down first")

    async def start_kernel(  # type: ignore[override]  # async, as in jupyter_server
            self, *, kernel_name: str | None = None, kernel_id: str | None = None,
            path: str | None = None, env: dict[str, str] | None = None, user: Any = None,
            network: Any = None, **kwargs: Any) -> str:
        """Start (or take from the pool) a kernel for a client; returns its id.

        ``env`` is what the request brought; it is filtered by :meth:`kernel_env`. ``user``
        (the request's, None: the admin's) becomes the kernel's owner; a users-file user is
        also its ``KERNEL_USERNAME``, whatever the request said.
        Raises ``NoSuchKernel`` for an unknown kernelspec and ``LimitExceeded`` at a limit.
        """
        if kernel_id is not None and kernel_id in self:
            if user is not None:  # a client's: only its own kernel (None: the gateway's own call)
                self.check_owner(kernel_id, user)
            return kernel_id
        kernel_name = self.resolve_kernel_name(kernel_name)
        self._specs().get_kernel_spec(kernel_name)  # NoSuchKernel before anything else
        egress = net.parse_request(network)  # 400/403 before any VM work (gateway.network)
        net.check_request(self, kernel_name, egress)
        kernel_env = self.kernel_env(env or {})
        username = users.limit_name(user, kernel_env)
        if username and users.tenant(user):
            kernel_env["KERNEL_USERNAME"] = username
        self._check_limits(username)
        self._reserved[username] += 1
        self.pool.note_request()
        t0 = time.monotonic()
        try:
            pooled = await self.pool.take(kernel_name, kernel_env) if kernel_id is None else None
            source = "pool"
            if pooled is not None:
                kid = await add_started_kernel(self, pooled)
            else:
                source = "restore"
                kid = await super().start_kernel(kernel_name=kernel_name, kernel_id=kernel_id,
                                                 path=cast(Any, path), env=kernel_env, **kwargs)
                km: Any = self.get_kernel(kid)
                if km.execution_state == "starting":
                    # restored from a snapshot of an idle kernel, identity taken on: it is idle
                    # (jupyter_server would say "starting" until a websocket nudged it)
                    km.execution_state = "idle"
            try:
                await net.apply_request(self, kid, egress)
            except BaseException:
                await self.shutdown_kernel(kid, now=True)
                raise
        finally:
            self._reserved[username] -= 1
        elapsed = time.monotonic() - t0
        self.usernames[kid] = username
        self.owners[kid] = users.owner_name(user)
        self.sources[kid] = source
        metrics.KERNEL_CREATE_SECONDS.labels(source=source).observe(elapsed)
        if source == "restore":
            self._observe_restore(self.get_kernel(kid))
        self.log.info("kernel %s: started for %s from %s in %.0f ms (%s)", kid,
                      f"user {username!r}" if username else "a client", source, elapsed * 1000,
                      kernel_name)
        self.pool.refill()
        return kid

    @staticmethod
    def _observe_restore(km: Any) -> None:
        handle = vm_handle(km)
        timings = handle.restore_timings if handle is not None else {}
        if "start" in timings:
            metrics.VM_RESTORE_SECONDS.observe(timings["start"])

    async def restart_kernel(self, kernel_id: str, now: bool = False) -> Any:  # type: ignore[override]  # async, as in jupyter_server
        """A user's restart (REST). Resolves, like jupyter_server's, to a future of the new
        kernel's kernel_info reply."""
        self._user_restarts.add(kernel_id)
        try:
            future = await super().restart_kernel(kernel_id, now=now)
        finally:
            self._user_restarts.discard(kernel_id)

        def observe(_: Any) -> None:
            if kernel_id in self:
                self._observe_restore(self.get_kernel(kernel_id))

        future.add_done_callback(observe)
        return future

    def _announce(self, kernel_id: str, state: str) -> None:
        for hook in self.status_hooks:
            hook(kernel_id, state)
        self.buffer_status(kernel_id, state)  # and to the client that is away right now

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

    def start_watching_activity(self, kernel_id: str) -> None:
        """jupyter_server's activity watch (``last_activity``, the model's ``execution_state``)
        with :func:`activity_recorder`, which reads only the parts it needs."""
        km = self._kernels[kernel_id]
        km.reason = ""
        km.last_activity = datetime.now(timezone.utc)
        watch_activity(km, activity_recorder(self, km, kernel_id))

    def remove_kernel(self, kernel_id: str) -> Any:
        self.usernames.pop(kernel_id, None)
        self.owners.pop(kernel_id, None)
        self.sources.pop(kernel_id, None)
        km = super().remove_kernel(kernel_id)
        for hook in self.removal_hooks:
            hook(kernel_id)
        return km

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        model: dict[str, Any] = super().kernel_model(kernel_id)
        kernel: Any = self.get_kernel(kernel_id)
        # GatewayClient parses '%Y-%m-%dT%H:%M:%S.%fZ'; isoformat() drops '.%f' when it is 0
        model["last_activity"] = kernel.last_activity.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        from .forks import lineage_fields  # lineage: parent_id, forked_at (None unless forked)

        model.update(lineage_fields(self, kernel_id))
        model["vmkg"] = {"source": self.sources.get(kernel_id, "restore"),
                         "template": kernel.kernel_spec.metadata.get("vmkg", {}).get("template")
                         if kernel.kernel_spec else None,
                         "network": net.model_field(kernel)}
        from .hibernate import hibernated_fields

        model["vmkg"].update(hibernated_fields(self, kernel_id))
        if model["vmkg"]["hibernated"]:
            model["execution_state"] = "idle"
        return model

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        if self.hibernate_instead_of_cull:
            handle = vm_handle(self.get_kernel(kernel_id)) if kernel_id in self else None
            if handle is not None and handle.hibernated_since is not None:
                return  # asleep already: nothing to cull
            if handle is not None and self._cull_due(kernel_id):
                await self.durability.hibernate_quietly(kernel_id, "culled")
                return
        await super().cull_kernel_if_idle(kernel_id)
        if kernel_id not in self:
            self.culled += 1
            metrics.KERNELS_CULLED.inc()

    async def _async_shutdown_kernel(self, kernel_id: str, now: bool | None = False,
                                     restart: bool | None = False) -> None:
        """jupyter_client's, once an auto-restart in progress is over: during one the
        kernel's ``ready`` future is pending, and jupyter_client's shutdown asks it for its
        exception (``InvalidStateError``: a 500 for the DELETE of a kernel that just died,
        e.g. cut off for breaking the guest protocol, and a failed gateway shutdown). A
        kernel nobody is connected to is stopped at once (``graceful_shutdown_unwatched``)."""
        km = self._kernels.get(kernel_id)
        if km is not None and kernel_id not in self._pending_kernels:
            await ready_settled(km)
        if not restart and not self.graceful_shutdown_unwatched and not self._kernel_connections.get(kernel_id):
            now = True  # graceful_shutdown_unwatched's help says why
        await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)

    shutdown_kernel = _async_shutdown_kernel  # type: ignore[assignment]  # both paths: DELETE and shutdown_all

    def _cull_due(self, kernel_id: str) -> bool:
        """jupyter_server's culling rule (idle, connections, busy) for ``kernel_id``."""
        km: Any = self.get_kernel(kernel_id)
        idle = (datetime.now(timezone.utc) - km.last_activity).total_seconds()
        connected = self._kernel_connections.get(kernel_id, 0) > 0
        busy = km.execution_state == "busy"
        return bool(idle > self.cull_idle_timeout and (self.cull_connected or not connected)
                    and (self.cull_busy or not busy))

    async def shutdown_all(self, now: bool = False) -> None:  # type: ignore[override]  # async, as in jupyter_server
        """Stop every kernel, pooled ones included (gateway shutdown)."""
        await asyncio.gather(self.pool.close(), super().shutdown_all(now=now))

    # -- for metrics ---------------------------------------------------------------------

    def states(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for km in self._client_kernels():
            counts[getattr(km, "execution_state", None) or "unknown"] += 1
        counts["pooled"] = sum(self.pool.pooled().values())
        counts["starting"] += self.starts_in_flight() + self.pool.starting()
        return counts

    def vm_pids(self) -> list[int]:
        pids = []
        for km in [*self._client_kernels(), *self.pool.pooled_managers()]:
            handle = vm_handle(km)
            pid = handle.pid if handle is not None else None
            if pid:
                pids.append(pid)
        return pids

