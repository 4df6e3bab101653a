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
VM behind it is a ``VMKernel``. A restart replaces the VM but keeps the relay, so
connected clients keep their ports and key. Interrupt is SIGINT delivered inside the
guest; kill/terminate stop the VM; ``poll()`` reports a VM that died.

All VM work runs on the process-wide runtime loop (``kernelmanager.runtime``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Float, List, Unicode

from . import accel as accel_mod
from . import forks
from .exceptions import VMDied, VMKGError
from .relay import KernelRelay
from .runtime import Runtime
from .snapshots import Snapshot
from .templates import ensure_template, get_spec
from .vm.qemu import qemu_version
from .vmkernel import VMKernel

log = logging.getLogger(__name__)

GUEST_HOME = "/home/jovyan"


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

    _kernel: VMKernel | None = None
    _relay: KernelRelay | None = None
    _env: dict[str, str] = {}
    _cwd: str = ""
    _launched = False
    _fork_source: Snapshot | None = None
    _fork_reseed: bool | None = None

    # -- process-like surface ------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self._kernel is not None

    async def poll(self) -> int | None:
        if self._kernel is None:
            return 0
        return self._kernel.poll()

    async def wait(self) -> int | None:
        if self._kernel is None:
            return 0
        kernel = self._kernel
        return await Runtime.instance().run(kernel.wait())

    async def send_signal(self, signum: int) -> None:
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
        kernel = self._kernel
        if kernel is None:
            return
        if self._relay is not None:
            self._relay.detach()
        await Runtime.instance().run(kernel.close())

    # -- launch ----------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # a fork child's first start restores from the fork snapshot; restarts from the template
        self._fork_source = kwargs.pop("vmkg_snapshot", None) if self._kernel is None and not self._launched else None
        self._fork_reseed = kwargs.pop("vmkg_reseed", None) if self._fork_source is not None else None
        kwargs.pop("vmkg_snapshot", None)
        kwargs.pop("vmkg_reseed", None)
        kwargs = await super().pre_launch(**kwargs)
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
            key = km.session.key if km is not None else os.urandom(32).hex().encode()
            ip = km.ip if km is not None and km.ip else "127.0.0.1"
            transport = km.transport if km is not None else "tcp"
            scheme = km.session.signature_scheme if km is not None else "hmac-sha256"

            async def start_relay() -> KernelRelay:
                assert rt.zmq_context is not None
                relay = KernelRelay(rt.zmq_context, name=self.kernel_id, ip=ip, transport=transport,
                                    key=key, signature_scheme=scheme)
                relay.start()
                return relay

            self._relay = await rt.run(start_relay())
        kwargs["cmd"] = list(self.kernel_spec.argv) if self.kernel_spec else []
        return kwargs

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

        source, self._fork_source = self._fork_source, None  # a fork's first launch only
        reseed = self.reseed if self._fork_reseed is None else self._fork_reseed

        async def launch() -> VMKernel:
            accel = accel_mod.detect(self.accel or None)
            snap = source or await ensure_template(get_spec(self.template), accel.name)
            snap.check_restorable(qemu_version(), accel.name)
            kernel = VMKernel(snap, kernel_id=self.kernel_id, env=self._env, cwd=self._cwd,
                              reseed=reseed, on_jupyter=relay.from_guest, connection_file=conn_file)
            rt.register(kernel)  # before starting: a shutdown also stops starts under way
            await kernel.start(timeout=self.launch_timeout)
            assert kernel.channel is not None
            relay.attach(kernel.channel)
            relay.alive = lambda: kernel.poll() is None
            return kernel

        self._kernel = await rt.run(launch())
        self._launched = True
        return cast(KernelConnectionInfo, relay.connection_info())  # the ports the relay bound

    async def cleanup(self, restart: bool = False) -> None:
        await self._stop_vm()
        self._kernel = None
        if not restart and self._relay is not None:
            relay, self._relay = self._relay, None
            await Runtime.instance().run(relay.close())

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
        """The VM behind this kernel (for the gateway's fork and file operations)."""
        return self._kernel

    async def fork_snapshot(self, idle_timeout: float = 30.0) -> Snapshot:
        """Snapshot this kernel's running VM for forking (waits for it to be idle).

        The snapshot is held for the caller: start the children with
        ``start_kernel(vmkg_snapshot=snap)``, then call :func:`release_snapshot`.
        """
        kernel = self._kernel
        if kernel is None or kernel.poll() is not None:
            raise VMDied(f"kernel {self.kernel_id}: the VM is not running")

        async def take() -> Snapshot:
            snap = await forks.snapshot_kernel(kernel, idle_timeout=idle_timeout)
            forks.registry.acquire(snap)
            return snap

        return await Runtime.instance().run(take())

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
        if kernel is None:
            raise VMDied(f"kernel {self.kernel_id}: the VM is not running")
        await Runtime.instance().run(kernel.adopt(guest, cwd, timeout=self.launch_timeout))


async def release_snapshot(snap: Snapshot) -> None:
    """Drop the caller's hold on a fork snapshot (children hold their own)."""

    async def rel() -> None:
        forks.registry.release(snap)

    await Runtime.instance().run(rel())


async def fork(km: Any, count: int, *, reseed: bool = True, idle_timeout: float = 30.0) -> list[Any]:
    """Fork the kernel of ``km`` (an AsyncKernelManager on a microVM kernelspec) into
    ``count`` new started kernel managers of the same class, each continuing from the
    parent's state at the moment of the fork. The parent keeps running."""
    prov = km.provisioner
    if not isinstance(prov, MicroVMProvisioner):
        raise VMKGError("only kernels of the microvm provisioner can be forked")
    snap = await prov.fork_snapshot(idle_timeout)
    try:
        children = [type(km)(kernel_name=km.kernel_name, parent=km.parent) for _ in range(count)]
        results = await asyncio.gather(
            *(c.start_kernel(vmkg_snapshot=snap, vmkg_reseed=reseed) for c in children),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for c, r in zip(children, results, strict=True):
                if not isinstance(r, BaseException):
                    await c.shutdown_kernel(now=True)
            raise failed[0]
        return children
    finally:
        await release_snapshot(snap)
