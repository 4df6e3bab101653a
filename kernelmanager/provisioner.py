"""``MicroVMProvisioner``: jupyter_client's way in. Every kernel it launches is a
microVM restored from a warm template snapshot.

Select it from a kernelspec::

    "metadata": {"kernel_provisioner": {"provisioner_name": "microvm",
                                        "config": {"template": "python3"}}}

(``vmkg kernelspec install`` writes ``python3-microvm``.) Any jupyter_client user then
gets VM kernels: ``KernelManager``, ``jupyter console --kernel python3-microvm``,
nbclient, jupyter_server.

How the pieces map: the kernel's ZMQ sockets are bound on the host by a
``KernelRelay`` holding the kernel's own key (from the KernelManager's session); the
VM behind it is a ``VMKernel``. Where a kernel manager asks for tcp on loopback (the
default, and what the gateway does), the relay binds ipc sockets in a 0700 directory
instead (``relay_transport``): a loopback port is open to every local user, who could
subscribe to the kernel's iopub; the connection file then names ipc endpoints, which
jupyter_client and jupyter_server connect to as they would to ports. A restart replaces the VM but keeps the relay, so
connected clients keep their ports and key. Interrupt is SIGINT delivered inside the
guest; kill/terminate stop the VM; ``poll()`` reports a VM that died.

What it adds to jupyter_client's surface, and nothing else:

* ``start_kernel(fork_source=src)``: the one extra keyword argument. ``src`` is a
  :class:`~kernelmanager.handle.ForkSource`; the kernel's first start restores from that
  fork snapshot instead of the template (its restarts restore from the template) and
  records the source's :class:`~kernelmanager.handle.Lineage`.
* :attr:`MicroVMProvisioner.handle`: the kernel's :class:`~kernelmanager.handle.VMHandle`
  (files, env, fork snapshots, timings, process and memory).
* :func:`fork`: the one fork orchestrator (snapshot, start N children, release, clean up).
* :func:`set_fork_request_handler`: who serves forks asked for from *inside* a kernel
  (the ``%fork`` magic, ``guest.magic``). The guest's ``fork_request`` event is validated
  here (types, ``count`` 1..64, ``timeout`` 0..3600; one request per kernel at a time,
  extra or malformed ones dropped and counted as guest violations), becomes a
  :class:`ForkRequest`, and goes to the handler on the loop that started the kernel (the
  gateway's); its answer (branch ids, or the refusal's text) goes back to the guest as the
  ``fork_result`` op. Policy (owner, limits, rate) is the handler's; without a handler
  every request is refused. ``kernelmanager`` never imports its caller: this is the
  whole interface.

All VM work runs on the process-wide runtime loop (``kernelmanager.runtime``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import posixpath
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Float, List, Unicode

from . import accel as accel_mod
from . import durable, forks, paths
from .channel import GUEST_VIOLATIONS, clip
from .exceptions import ConfigError, DurableError, VMDied, VMKGError
from .handle import ForkSource, Lineage, VMHandle
from .relay import DELIM, KernelRelay
from .runtime import Runtime
from .templates import ensure_template, get_spec
from .vm.qemu import qemu_version
from .vmkernel import VMKernel

log = logging.getLogger(__name__)

GUEST_HOME = "/home/jovyan"
#: longest Unix socket path (sun_path is 108 bytes with its NUL)
IPC_PATH_MAX = 107
#: most children one fork request from a guest may ask for (the handler's caps apply too)
MAX_GUEST_FORK_COUNT = 64
#: longest idle wait a fork request from a guest may ask for, in seconds
MAX_GUEST_FORK_TIMEOUT = 3600.0


@dataclass(frozen=True)
class ForkRequest:
    """A fork asked for by code inside kernel ``kernel_id`` (the ``%fork`` magic),
    validated: ``count`` children (1..64), ``reseed`` their random generators, wait up to
    ``timeout`` seconds for the kernel to be idle. The requester is the guest: the
    handler decides whether it may (owner, limits, rate)."""

    kernel_id: str
    count: int
    reseed: bool
    timeout: float


#: serves a ForkRequest: returns the children's kernel ids in branch order, or raises an
#: exception whose text is the refusal shown in the kernel
ForkRequestHandler = Callable[[ForkRequest], Awaitable[Sequence[str]]]
_fork_request_handler: ForkRequestHandler | None = None


def set_fork_request_handler(handler: ForkRequestHandler | None) -> None:
    """Install the process's handler of fork requests from guests (None: refuse them all).

    The handler runs on the event loop that started the requesting kernel (the loop of
    its kernel manager), one request per kernel at a time."""
    global _fork_request_handler
    _fork_request_handler = handler


def parse_fork_request(kernel_id: str, body: dict[str, Any]) -> ForkRequest:
    """Validate a guest's ``fork_request`` event; ValueError says what is wrong."""
    count, reseed, timeout = body.get("count"), body.get("reseed"), body.get("timeout")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_GUEST_FORK_COUNT:
        raise ValueError(f"count must be an integer from 1 to {MAX_GUEST_FORK_COUNT}, not {clip(count, 30)}")
    if not isinstance(reseed, bool):
        raise ValueError(f"reseed must be true or false, not {clip(reseed, 30)}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 <= timeout <= MAX_GUEST_FORK_TIMEOUT:
        raise ValueError(f"timeout must be from 0 to {MAX_GUEST_FORK_TIMEOUT:g} s, not {clip(timeout, 30)}")
    return ForkRequest(kernel_id, count, reseed, float(timeout))


#: seconds a shutdown waits for a checkpoint or hibernation under way (see ``_stop_vm_rt``)
CAPTURE_GRACE = 20.0


class MicroVMProvisioner(KernelProvisionerBase):
    template = Unicode("python3", config=True,
                       help="Name of the template (see kernelmanager.templates) the kernel restores from.")
    accel = Unicode("", config=True,
                    help="auto, kvm or tcg. Empty: $VMKG_ACCEL, else auto (KVM only where it can boot the guest).")
    env_allowlist = List(Unicode(), default_value=["JPY_SESSION_NAME", "LANG"], config=True,
                         help="Host environment variables passed into the VM besides KERNEL_* and the "
                              "kernelspec's own env. Nothing else of the host's environment enters the VM.")
    launch_timeout = Float(60.0, config=True, help="Seconds a restore may take before it fails.")
    reseed = Bool(True, config=True,
                  help="Reseed Python's and NumPy's global random generators in every restored kernel.")
    egress = List(Unicode(), default_value=[], config=True,
                  help="Egress rules this kernelspec's kernels ask for on a template with a NIC "
                       "(kernelmanager.net.policy), on top of $VMKG_NET_DEFAULT_EGRESS.")

    relay_transport = Unicode(
        "ipc", config=True,
        help="How the kernel's relay binds its five ZMQ sockets when the kernel manager asks for "
             "tcp on a loopback address: 'ipc' (default) binds Unix sockets in a 0700 directory "
             "of the state directory (state_dir/ipc/<kernel id>-N), so no other local user can "
             "connect (on 127.0.0.1 any local user could subscribe to the kernel's iopub); "
             "'tcp' keeps loopback ports, for clients that cannot use ipc. A non-loopback ip or "
             "an explicit ipc transport is always used as asked.")

    _kernel: VMKernel | None = None
    _relay: KernelRelay | None = None
    _env: dict[str, str] = {}
    _cwd: str = ""
    _launched = False
    _fork_source: ForkSource | None = None
    _lineage: Lineage | None = None
    _handle: VMHandle | None = None
    _client_loop: asyncio.AbstractEventLoop | None = None
    _fork_request_busy = False
    # durable kernels (kernelmanager.durable): the image a hibernated kernel sleeps in
    _hibernated: durable.DurableImage | None = None
    _hibernated_since: float | None = None
    _durable_lock: asyncio.Lock | None = None
    _resume: durable.PersistedKernel | None = None
    _keep_durable = False
    _swapping = False  # an in-place restore is replacing the VM: alive, not dead
    _wake_tasks: set[asyncio.Future[None]] | None = None
    last_wake_seconds: float | None = None

    # -- process-like surface ------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        # jupyter_client's is_alive asks this before poll(): a kernel whose VM an in-place
        # restore is swapping has one (the auto-restarter raced a restore and won otherwise)
        return self._kernel is not None or self._hibernated is not None or self._swapping

    async def poll(self) -> int | None:
        if self._hibernated is not None or self._swapping:
            return None  # asleep (or being restored), not dead: the restarter must leave it alone
        if self._kernel is None:
            return 0
        return self._kernel.poll()

    async def wait(self) -> int | None:
        if self._kernel is None:
            return 0
        kernel = self._kernel
        return await Runtime.instance().run(kernel.wait())

    async def send_signal(self, signum: int) -> None:
        if self._hibernated is not None:
            if signum in (0, signal.SIGKILL, signal.SIGTERM):
                if signum:
                    await self._stop_vm()
                return
            if getattr(self.parent, "shutting_down", False):
                return  # jupyter_client interrupts before a shutdown: no wake for that
            await self.wake()  # an interrupt is activity
        if self._kernel is None:
            return
        kernel = self._kernel
        try:
            await Runtime.instance().run(kernel.signal(signum))
        except VMKGError as exc:
            log.warning("kernel %s: signal %s not delivered: %s", self.kernel_id, signum, exc)

    async def kill(self, restart: bool = False) -> None:
        await self._stop_vm()

    async def terminate(self, restart: bool = False) -> None:
        await self._stop_vm()

    async def _stop_vm(self) -> None:
        await Runtime.instance().run(self._stop_vm_rt())

    async def _stop_vm_rt(self) -> None:
        """Stop the VM (runtime loop). A hibernated kernel's image goes (a wake under way
        undoes itself). A capture under way (a checkpoint, an idle checkpoint, a
        hibernation: the VM paused, its pages being copied) is given ``CAPTURE_GRACE`` s to
        end first, so it neither fails half-way nor leaves a paused VM behind; then the VM
        (or, if the capture was a hibernation, its image) goes."""
        if self._hibernated is not None:
            self._drop_hibernated()
        lock = self._lock()
        if self._kernel is not None and lock.locked():
            log.info("kernel %s: shutting down; waiting for its state capture to end", self.kernel_id)
            try:
                await asyncio.wait_for(lock.acquire(), CAPTURE_GRACE)
                lock.release()
            except asyncio.TimeoutError:
                log.warning("kernel %s: its state capture did not end within %.0f s; the VM is "
                            "stopped under it", self.kernel_id, CAPTURE_GRACE)
            if self._hibernated is not None:  # it was a hibernation: the VM is gone already
                self._drop_hibernated()
        kernel = self._kernel
        if kernel is None:
            return
        if self._relay is not None:
            self._relay.detach()
        await kernel.close()

    # -- launch ----------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """jupyter_client's hook before a (re)start; takes ``fork_source`` out of the
        start_kernel arguments (jupyter_client keeps them for restarts, which restore
        from the template: only the first start uses it)."""
        source = kwargs.pop("fork_source", None)
        resume = kwargs.pop("durable_resume", None)
        if resume is not None and not isinstance(resume, durable.PersistedKernel):
            raise ConfigError("durable_resume must be a kernelmanager.PersistedKernel")
        self._resume = resume if self._kernel is None and not self._launched else None
        if source is not None and not isinstance(source, ForkSource):
            raise ConfigError(f"fork_source must be a kernelmanager.ForkSource, not {type(source).__name__}")
        if source is not None and self._kernel is None and not self._launched:
            self._fork_source = source
            self._lineage = source._child_lineage()
        else:
            self._fork_source = None
        kwargs = await super().pre_launch(**kwargs)
        self._client_loop = asyncio.get_running_loop()  # where guest fork requests are served
        self._env = self._guest_env(kwargs.get("env") or {})
        self._cwd = self._guest_cwd(self._env.get("KERNEL_WORKING_DIR", ""))
        km = self.parent
        if km is not None and not km.connection_file:
            # name it now, so the VM's owner record can point the reaper at it
            from jupyter_core.paths import jupyter_runtime_dir
            os.makedirs(jupyter_runtime_dir(), exist_ok=True)
            km.connection_file = os.path.join(jupyter_runtime_dir(), f"kernel-{self.kernel_id}.json")
        if self._relay is None:
            rt = Runtime.instance()
            resumed = self._resume.connection if self._resume is not None else None
            if resumed is not None and km is not None:  # the same key the clients hold
                km.session.key = str(resumed["key"]).encode()
            key = km.session.key if km is not None else os.urandom(32).hex().encode()
            ip = km.ip if km is not None and km.ip else "127.0.0.1"
            transport = km.transport if km is not None else "tcp"
            ip, transport = self._relay_endpoint(ip, transport)
            scheme = km.session.signature_scheme if km is not None else "hmac-sha256"

            async def start_relay() -> KernelRelay:
                assert rt.zmq_context is not None
                ports = None
                if resumed is not None and resumed.get("transport") == transport:
                    ports = {n: int(resumed[p]) for n, p in
                             (("shell", "shell_port"), ("control", "control_port"),
                              ("stdin", "stdin_port"), ("iopub", "iopub_port"), ("hb", "hb_port"))}
                relay = KernelRelay(rt.zmq_context, name=self.kernel_id, ip=ip, transport=transport,
                                    key=key, signature_scheme=scheme, ports=ports)
                try:
                    relay.start()
                except zmq.ZMQError:  # a tcp port taken meanwhile: new ones (a new connection file)
                    await relay.close()
                    relay = KernelRelay(rt.zmq_context, name=self.kernel_id, ip=ip, transport=transport,
                                        key=key, signature_scheme=scheme)
                    relay.start()
                relay.on_held = self._on_held
                return relay

            self._relay = await rt.run(start_relay())
        elif self._relay.transport == "ipc":
            # a restart: jupyter_client's cleanup_resources removed the ipc files of the
            # sockets the relay keeps bound, so new clients could no longer connect
            await Runtime.instance().run(_rebind_ipc(self._relay))
        kwargs["cmd"] = list(self.kernel_spec.argv) if self.kernel_spec else []
        return kwargs

    def _relay_endpoint(self, ip: str, transport: str) -> tuple[str, str]:
        """Where the relay binds: ipc in a private directory instead of loopback tcp
        (``relay_transport``)."""
        if self.relay_transport not in ("ipc", "tcp"):
            raise ConfigError(f"relay_transport must be 'ipc' or 'tcp', not {self.relay_transport!r}")
        if transport != "tcp" or self.relay_transport != "ipc":
            return ip, transport
        try:
            loopback = ipaddress.ip_address(ip).is_loopback
        except ValueError:
            loopback = ip == "localhost"
        if not loopback:
            return ip, transport
        base = str(paths.private_dir(paths.state_dir() / "ipc") / self.kernel_id)
        if len(base) + len("-5") > IPC_PATH_MAX:
            raise ConfigError(f"kernel {self.kernel_id}: the relay's ipc socket path {base}-N is "
                              f"longer than a Unix socket allows ({IPC_PATH_MAX}); use a shorter "
                              "$VMKG_STATE_DIR or MicroVMProvisioner.relay_transport='tcp'")
        return base, "ipc"

    def _guest_env(self, env: dict[str, str]) -> dict[str, str]:
        allowed = set(self.env_allowlist) | set((self.kernel_spec.env or {}) if self.kernel_spec else {})
        return {k: str(v) for k, v in env.items() if k.startswith("KERNEL_") or k in allowed}

    @staticmethod
    def _guest_cwd(requested: str) -> str:
        """KERNEL_WORKING_DIR names a client-side path; inside the VM only a relative one
        (under the kernel's home) is honoured."""
        if not requested or posixpath.isabs(requested):
            return GUEST_HOME
        norm = posixpath.normpath(requested)
        if norm.startswith(".."):
            return GUEST_HOME
        return posixpath.join(GUEST_HOME, norm)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        assert self._relay is not None
        relay = self._relay
        rt = Runtime.instance()
        km = self.parent
        conn_file = getattr(km, "connection_file", None) if km is not None else None

        if self._resume is not None:  # back from a gateway restart: asleep until used
            resume, self._resume = self._resume, None
            image = durable.latest_image(str(self.kernel_id))
            if image is None:
                raise DurableError(f"kernel {self.kernel_id}: no durable image to resume from")
            self._env, self._cwd = dict(resume.env), resume.cwd
            self._hibernated, self._hibernated_since = image, image.created
            relay.alive = lambda: True
            self._launched = True
            log.info("kernel %s: resumed hibernated (%s image of %.0f s ago)", self.kernel_id,
                     image.name, time.time() - image.created)
            return cast(KernelConnectionInfo, relay.connection_info())
        fork_source, self._fork_source = self._fork_source, None  # a fork's first launch only
        source = fork_source._held if fork_source is not None else None
        reseed = self.reseed if fork_source is None else fork_source.reseed
        lineage = self._lineage
        fork_info = ({"index": lineage.index, "parent_id": lineage.parent_id}
                     if fork_source is not None and lineage is not None else None)

        async def launch() -> VMKernel:
            accel = accel_mod.detect(self.accel or None)
            snap = source or await ensure_template(get_spec(self.template), accel.name)
            snap.check_restorable(qemu_version(), accel.name)
            kernel = VMKernel(snap, kernel_id=self.kernel_id, env=self._env, cwd=self._cwd,
                              reseed=reseed, on_jupyter=relay.from_guest, connection_file=conn_file,
                              fork=fork_info, on_fork_request=self._guest_fork_request)
            if kernel.vm.networked:  # its slot gets this policy (kernelmanager.net)
                from .net.api import guest_env, launch_policy
                kernel.env = {**guest_env(), **kernel.env}
                kernel.vm.net_label = self.kernel_id
                kernel.vm.net_policy = launch_policy(
                    self, fork_source.lineage.parent_id if fork_source is not None else None,
                    snap.info.get("network"))
            rt.register(kernel)  # before starting: a shutdown also stops starts under way
            await kernel.start(timeout=self.launch_timeout)
            assert kernel.channel is not None
            relay.alive = lambda: kernel.poll() is None  # before attach: the pumps read it
            relay.attach(kernel.channel)
            return kernel

        self._kernel = await rt.run(launch())
        self._launched = True
        return cast(KernelConnectionInfo, relay.connection_info())  # the ports the relay bound

    async def cleanup(self, restart: bool = False) -> None:
        await self._stop_vm()
        self._kernel = None
        if not restart and not self._keep_durable:
            durable.remove_kernel(str(self.kernel_id))  # forks keep what they use (hard links)
        if not restart and self._relay is not None:
            relay, self._relay = self._relay, None
            await Runtime.instance().run(relay.close())
            if relay.transport == "ipc" and relay.ip.startswith(str(paths.state_dir() / "ipc") + "/"):
                for port in relay.ports.values():  # ZMQ leaves the socket files behind
                    try:
                        os.unlink(f"{relay.ip}-{port}")
                    except OSError:
                        pass

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 3.0)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        if self._kernel is not None:
            info.update(vm_id=self._kernel.vm_id, template=self.template)
        return info

    # -- vmkg extras --------------------------------------------------------------------------

    @property
    def vm_kernel(self) -> VMKernel | None:
        """The VM behind this kernel (inside ``kernelmanager`` and its tests only; other
        code uses :attr:`handle`)."""
        return self._kernel

    @property
    def handle(self) -> VMHandle:
        """This kernel's VM handle (one per provisioner; it follows restarts)."""
        if self._handle is None:
            self._handle = VMHandle(self)
        return self._handle

    @property
    def lineage(self) -> Lineage | None:
        """Set when the kernel was first started from a fork source; kept across restarts."""
        return self._lineage

    def _guest_fork_request(self, kernel: VMKernel, body: dict[str, Any]) -> None:
        """A ``fork_request`` event from the guest (runtime loop): validate it, hand it to
        the handler on the kernel's client loop, answer with ``fork_result``."""
        rid = body.get("request")
        if isinstance(rid, bool) or not isinstance(rid, int) or not 0 < rid < 2**53:
            GUEST_VIOLATIONS.labels("fork_request").inc()
            log.warning("kernel %s: dropped a fork request with a bad request number", self.kernel_id)
            return
        if self._fork_request_busy:
            # the agent sends one at a time: more is a guest misbehaving; no answer, no work
            GUEST_VIOLATIONS.labels("fork_request").inc()
            log.warning("kernel %s: dropped a fork request while another is under way", self.kernel_id)
            return
        try:
            req = parse_fork_request(self.kernel_id, body)
        except ValueError as exc:
            GUEST_VIOLATIONS.labels("fork_request").inc()
            log.warning("kernel %s: refused a malformed fork request: %s", self.kernel_id, exc)
            asyncio.ensure_future(self._answer_fork(kernel, rid, error=f"bad fork request: {exc}"))
            return
        handler, loop = _fork_request_handler, self._client_loop
        if handler is None or loop is None or not loop.is_running():
            asyncio.ensure_future(self._answer_fork(
                kernel, rid, error="forking from inside a kernel is not available here "
                                   "(no gateway serves fork requests)"))
            return
        self._fork_request_busy = True
        log.info("kernel %s: the kernel asks for %d fork(s)", self.kernel_id, req.count)
        served = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_call(handler, req), loop))

        async def serve() -> None:
            try:
                ids = [str(k) for k in await served]
            except Exception as exc:  # noqa: BLE001 - every refusal goes back into the cell
                if not isinstance(exc, VMKGError):
                    log.warning("kernel %s: fork request failed: %s: %s", self.kernel_id,
                                type(exc).__name__, exc)
                await self._answer_fork(kernel, rid, error=str(exc) or type(exc).__name__)
            else:
                await self._answer_fork(kernel, rid, kernels=ids)
            finally:
                self._fork_request_busy = False

        asyncio.ensure_future(serve())

    async def _answer_fork(self, kernel: VMKernel, rid: int, *, kernels: list[str] | None = None,
                           error: str = "") -> None:
        answer: dict[str, Any] = ({"ok": True, "kernels": kernels, "parent_id": self.kernel_id}
                                  if kernels is not None else {"ok": False, "error": clip(error, 2000)})
        try:
            await kernel.request("fork_result", timeout=30, request=rid, **answer)
        except VMKGError as exc:  # the kernel went away (restart, shutdown) meanwhile
            log.info("kernel %s: fork answer not delivered: %s", self.kernel_id, exc)

    async def adopt(self, env: dict[str, str]) -> None:
        """Apply a client's environment to a kernel that was started before the client
        asked for it (the gateway's warm pool): the same filter as at launch (``KERNEL_*``,
        ``env_allowlist``, the kernelspec's env), ``KERNEL_WORKING_DIR`` as at launch.
        Also kept for this kernel's restarts."""
        guest = self._guest_env(env)
        self._env = {**self._env, **guest}
        cwd = self._guest_cwd(guest["KERNEL_WORKING_DIR"]) if "KERNEL_WORKING_DIR" in guest else None
        if cwd:
            self._cwd = cwd
        kernel = self._kernel
        if kernel is None or kernel.poll() is not None:
            raise VMDied(f"kernel {self.kernel_id}: the VM is not running")
        await Runtime.instance().run(kernel.adopt(guest, cwd, timeout=self.launch_timeout))


    # -- durable kernels (kernelmanager.durable) ------------------------------------------------

    @property
    def hibernated_since(self) -> float | None:
        """When the kernel went to sleep (epoch seconds), or None while it is awake."""
        return self._hibernated_since if self._hibernated is not None else None

    def _lock(self) -> asyncio.Lock:
        if self._durable_lock is None:  # made on the runtime loop, used only there
            self._durable_lock = asyncio.Lock()
        return self._durable_lock

    def _drop_hibernated(self) -> None:
        image, self._hibernated, self._hibernated_since = self._hibernated, None, None
        if image is not None and not self._keep_durable:
            durable.remove_image(image)

    def _on_held(self, name: str, parts: list[bytes]) -> bool:
        """The relay's hook (runtime loop) for a client message while no VM is attached."""
        if self._hibernated is None:
            return False
        try:
            header = json.loads(parts[parts.index(DELIM) + 2])
            msg_type = header.get("msg_type") if isinstance(header, dict) else None
        except (ValueError, IndexError):
            msg_type = None
        if msg_type == "shutdown_request":
            # a sleeping kernel is not woken to be shut down: it is gone now
            log.info("kernel %s: shut down while hibernated", self.kernel_id)
            self._drop_hibernated()
            return True
        self._spawn_wake()
        return False

    def _spawn_wake(self) -> None:
        """Start a wake in the background, holding the task (asyncio keeps only weak
        references: an unheld task can be collected mid-wake)."""
        if self._wake_tasks is None:
            self._wake_tasks = set()
        task = asyncio.ensure_future(self._wake_logged())
        self._wake_tasks.add(task)
        task.add_done_callback(self._wake_tasks.discard)

    async def _wake_logged(self) -> None:
        try:
            await self._wake_rt()
        except Exception as exc:  # noqa: BLE001 - the clients hear it through the relay
            log.error("kernel %s: wake failed: %s", self.kernel_id, exc)
            if self._relay is not None and self._relay._held:
                self._relay.mark_dead(f"the kernel could not be woken from hibernation: {exc}")

    async def hibernate(self, idle_timeout: float = 30.0) -> durable.DurableImage:
        """Save the kernel to disk and stop its VM; the relay (ports, key, clients) stays.
        Raises KernelBusy, DurableBudgetExceeded (the kernel keeps running) or VMDied."""
        return await Runtime.instance().run(self._hibernate_rt(idle_timeout))

    async def _hibernate_rt(self, idle_timeout: float) -> durable.DurableImage:
        async with self._lock():
            if self._hibernated is not None:
                return self._hibernated
            kernel, relay = self._kernel, self._relay
            if kernel is None or kernel.poll() is not None or relay is None or kernel.channel is None:
                raise VMDied(f"kernel {self.kernel_id}: the VM is not running")
            relay.detach()  # client input is held in the relay from here on
            dest = durable.kernel_dir(str(self.kernel_id)) / durable.HIBERNATED
            try:
                image = await durable.capture(kernel, dest, name=durable.HIBERNATED, stop=True,
                                              idle_timeout=idle_timeout)
            except BaseException:
                relay.attach(kernel.channel)
                raise
            self._hibernated, self._hibernated_since = image, time.time()
            relay.alive = lambda: True
            self._kernel = None
            await kernel.close()
            log.info("kernel %s: hibernated (%.1f MB on disk)", self.kernel_id, image.size / 2**20)
        if relay._held:  # input came while it was being saved
            self._spawn_wake()
        return image

    async def wake(self) -> None:
        """Bring a hibernated kernel back (no-op when awake); from any event loop."""
        if self._hibernated is None:
            return
        await Runtime.instance().run(self._wake_rt())

    async def _wake_rt(self) -> None:
        async with self._lock():
            image = self._hibernated
            if image is None:
                return
            t0 = time.monotonic()
            phases: dict[str, float] = {}
            kernel = await self._start_from(image, reseed=False, phases=phases)
            if self._hibernated is None:  # shut down while it was waking: undo the wake
                self._kernel = None
                if self._relay is not None:
                    self._relay.detach()
                await kernel.close()
                return
            self._hibernated, self._hibernated_since = None, None
            self.last_wake_seconds = time.monotonic() - t0
            log.info("kernel %s: woken in %.0f ms (%s)", self.kernel_id, self.last_wake_seconds * 1000,
                     _phases_text(phases))

    async def _start_from(self, image: durable.DurableImage, *, reseed: bool,
                          phases: dict[str, float] | None = None) -> VMKernel:
        """Restore ``image`` into a new VM and attach it to the relay (runtime loop).
        Clients see ``starting`` then ``idle``, as for a user's restart. ``phases`` gets
        the seconds each step took (materialize, spawn, delta, device state + agent,
        identity, attach) and the delta's bytes."""
        relay = self._relay
        assert relay is not None
        km = self.parent
        t0 = time.monotonic()
        snap = await asyncio.to_thread(durable.materialize, image)
        t1 = time.monotonic()
        kernel = VMKernel(snap, kernel_id=self.kernel_id, env={} if not reseed else self._env,
                          cwd=None, reseed=reseed, on_jupyter=relay.from_guest,
                          connection_file=getattr(km, "connection_file", None) if km is not None else None)
        if kernel.vm.networked:  # a new slot (the old one went with the old VM), the same policy
            from .net.api import launch_policy
            kernel.vm.net_label = self.kernel_id
            kernel.vm.net_policy = launch_policy(self, None, snap.info.get("network"))
        Runtime.instance().register(kernel)
        try:
            await kernel.start(timeout=self.launch_timeout)
        except BaseException:
            if (snap.path / "snapshot.json").exists() and forks.registry.count(snap.path) == 0:
                forks.remove_fork_dir(snap.path)
            raise
        assert kernel.channel is not None
        self._kernel = kernel
        relay.publish_status("starting")
        relay.publish_status("idle")
        relay.alive = lambda: kernel.poll() is None
        relay.attach(kernel.channel)
        if phases is not None:
            t = kernel.timings
            phases.update(materialize=t1 - t0, prepare=t.get("start", 0.0) - t.get("restored", 0.0),
                          spawn=t.get("spawn", 0.0) - t.get("delta", 0.0), delta=t.get("delta", 0.0),
                          delta_mb=t.get("delta_bytes", 0.0) / 2**20,
                          agent=t.get("connected", 0.0) - t.get("spawn", 0.0),
                          identity=t.get("restored", 0.0) - t.get("connected", 0.0),
                          attach=time.monotonic() - t1 - t.get("start", 0.0))
        return kernel

    async def ensure_awake(self) -> None:
        await self.wake()

    async def checkpoint(self, name: str, idle_timeout: float = 30.0) -> durable.DurableImage:
        """Save the running kernel's whole state as checkpoint ``name`` (replacing one of
        that name); the kernel pauses only as long as for a fork. Wakes a hibernated one."""
        dest = durable.checkpoint_path(str(self.kernel_id), name)
        if self._hibernated is not None:
            return await Runtime.instance().run(self._copy_hibernated(name, dest))
        kernel = self._kernel
        if kernel is None or kernel.poll() is not None:
            raise VMDied(f"kernel {self.kernel_id}: the VM is not running")

        async def take() -> durable.DurableImage:
            async with self._lock():
                return await durable.capture(kernel, dest, name=name, stop=False, idle_timeout=idle_timeout)

        return await Runtime.instance().run(take())

    async def _copy_hibernated(self, name: str, dest: os.PathLike[str]) -> durable.DurableImage:
        """A checkpoint of a sleeping kernel: hard links to its hibernated image."""
        async with self._lock():
            image = self._hibernated
            if image is None:
                raise VMDied(f"kernel {self.kernel_id}: woke meanwhile; try again")
            return await asyncio.to_thread(durable.link_image, image, name, dest)

    async def restore_checkpoint(self, name: str) -> None:
        """Put the kernel back to checkpoint ``name`` in place (same id, relay, clients)."""
        image = durable.find_image(str(self.kernel_id), f"ckpt-{durable.check_name(name)}")
        if image is None:
            raise durable.CheckpointNotFound(f"kernel {self.kernel_id} has no checkpoint {name!r}")

        async def restore() -> None:
            async with self._lock():
                old, relay = self._kernel, self._relay
                assert relay is not None
                relay.detach()
                self._swapping = True  # poll() says alive while the VM is swapped
                try:
                    if old is not None:
                        self._kernel = None
                        await old.close()
                    if self._hibernated is not None:
                        self._drop_hibernated()
                    await self._start_from(image, reseed=self.reseed)
                finally:
                    self._swapping = False
                log.info("kernel %s: restored checkpoint %s", self.kernel_id, name)

        await Runtime.instance().run(restore())

    async def idle_checkpoint(self, idle_timeout: float = 1.0) -> durable.DurableImage | None:
        """The background checkpoint of the crash case: the running kernel's state saved as
        its ``auto`` image (replacing the last). None when it is asleep or not running."""
        kernel = self._kernel
        if self._hibernated is not None or kernel is None or kernel.poll() is not None:
            return None
        dest = durable.kernel_dir(str(self.kernel_id)) / durable.AUTO

        async def take() -> durable.DurableImage:
            async with self._lock():
                return await durable.capture(kernel, dest, name=durable.AUTO, stop=False,
                                             idle_timeout=idle_timeout)

        return await Runtime.instance().run(take())

    def persist(self, kernel_name: str, extra: dict[str, object], keep: bool = True) -> None:
        """Record this kernel for the next start (``kernelmanager.durable.persisted_kernels``);
        ``keep``: its images are kept when it is shut down from now on (a gateway stopping
        with durable kernels); otherwise a shutdown still deletes them (the crash case)."""
        relay = self._relay
        if relay is None:
            raise VMDied(f"kernel {self.kernel_id}: not started")
        info = relay.connection_info()
        info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else str(info["key"])
        durable.PersistedKernel(kernel_id=str(self.kernel_id), kernel_name=kernel_name,
                                connection=info, env=dict(self._env), cwd=self._cwd,
                                extra=dict(extra)).save()
        self._keep_durable = self._keep_durable or keep


def _phases_text(phases: dict[str, float]) -> str:
    """``materialize 12 ms, spawn 80 ms, delta 95 ms (100.0 MB), ...`` for a wake's log line."""
    parts = []
    for name, secs in phases.items():
        if name == "delta_mb":
            continue
        text = f"{name} {secs * 1000:.0f} ms"
        if name == "delta":
            text += f" ({phases.get('delta_mb', 0.0):.1f} MB)"
        parts.append(text)
    return ", ".join(parts)


async def _rebind_ipc(relay: KernelRelay) -> None:
    """Bind again the relay's ipc endpoints whose socket files are gone (same paths, same
    sockets: connected clients stay connected)."""
    for name, sock in relay.sockets.items():
        path = f"{relay.ip}-{relay.ports[name]}"
        if os.path.exists(path):
            continue
        try:
            sock.unbind(f"ipc://{path}")
        except zmq.ZMQError:
            pass
        sock.bind(f"ipc://{path}")


async def _call(handler: ForkRequestHandler, req: ForkRequest) -> Sequence[str]:
    return await handler(req)


def vm_handle(km: Any) -> VMHandle | None:
    """The VM handle of a jupyter_client kernel manager, or None when its kernel is not a
    microVM (another provisioner) or was never started."""
    prov = getattr(km, "provisioner", None)
    return prov.handle if isinstance(prov, MicroVMProvisioner) else None


Child = TypeVar("Child")


async def fork(km: Any, count: int, *, reseed: bool = True, idle_timeout: float = 30.0,
               checkpoint: str | None = None,
               start_child: Callable[[ForkSource], Awaitable[Child]] | None = None,
               stop_child: Callable[[Child], Awaitable[object]] | None = None) -> list[Child]:
    """Fork the running kernel of ``km`` into ``count`` children that continue from its
    state at the moment of the fork (memory and disk, copy-on-write). The parent keeps
    running. This is the one fork orchestrator: it takes the snapshot (waiting up to
    ``idle_timeout`` for the kernel to be idle), starts the children concurrently,
    releases its hold on the snapshot whatever happens, and if any child fails stops the
    ones that started and raises the first error.

    ``start_child(source)`` starts one child from the held source and returns it; it must
    pass ``fork_source=source`` to a ``start_kernel`` of a microVM kernel manager, and
    leave nothing behind when it raises. The default makes a new kernel manager of
    ``km``'s class (``type(km)(kernel_name=..., parent=km.parent)``), so the result is a
    list of started kernel managers. ``stop_child`` undoes one successful
    ``start_child`` (default: ``child.shutdown_kernel(now=True)``). The gateway passes its
    own pair so the children enter its kernel map.

    ``checkpoint``: the children start from that named checkpoint of the kernel (a
    hibernated kernel's start from its saved image without waking it).

    Raises ``ConfigError`` for a kernel that is not a microVM, ``KernelBusy`` when it
    stays busy, ``ForkError`` when the snapshot fails, and whatever a child start raised.
    Limits (how many kernels may exist) are the caller's: check them before calling.
    """
    handle = vm_handle(km)
    if handle is None:
        raise ConfigError("only kernels of the microvm provisioner can be forked")
    if count < 1:
        raise ConfigError(f"a fork needs at least one child, not {count}")

    async def default_start(source: ForkSource) -> Any:
        child = type(km)(kernel_name=km.kernel_name, parent=km.parent)
        try:
            await child.start_kernel(fork_source=source)
        except BaseException:
            if child.provisioner is not None:  # the relay it bound, and any VM
                await asyncio.shield(child.provisioner.cleanup(restart=False))
            raise
        return child

    async def default_stop(child: Any) -> None:
        await child.shutdown_kernel(now=True)

    start = start_child or cast(Callable[[ForkSource], Awaitable[Child]], default_start)
    stop = stop_child or default_stop
    async with await handle.fork_snapshot(idle_timeout=idle_timeout, reseed=reseed,
                                          checkpoint=checkpoint) as source:
        tasks = [asyncio.ensure_future(start(source)) for _ in range(count)]
        try:
            await asyncio.wait(tasks)
        except BaseException:  # cancelled: the children that started must not outlive us
            for t in tasks:
                t.cancel()
            await asyncio.shield(_stop_started(tasks, stop, log_prefix=handle.kernel_id))
            raise
        failed = [e for e in map(_error, tasks) if e is not None]
        if failed:
            await asyncio.shield(_stop_started(tasks, stop, log_prefix=handle.kernel_id))
            raise failed[0]
        return [t.result() for t in tasks]


def _error(task: asyncio.Future[Any]) -> BaseException | None:
    return asyncio.CancelledError() if task.cancelled() else task.exception()


async def _stop_started(tasks: Sequence[asyncio.Future[Any]], stop: Callable[[Any], Awaitable[object]],
                        log_prefix: str) -> None:
    """Undo the child starts that succeeded (after another failed, or a cancellation)."""
    await asyncio.wait(tasks)
    started = [t.result() for t in tasks if _error(t) is None]
    results = await asyncio.gather(*(stop(c) for c in started), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            log.warning("kernel %s: a fork child could not be stopped after a failed fork: %s", log_prefix, r)
