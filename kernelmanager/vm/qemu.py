"""The QEMU ``microvm`` backend.

One ``QemuVM`` is one QEMU process. It is booted cold (to bake a template) or
restored from a snapshot: the guest RAM is a ``memory-backend-file`` mapped with
``share=off`` (MAP_PRIVATE) on the snapshot's RAM image, so every restored VM shares
the unchanged pages with every other one, and the device state (a few dozen KB) is
loaded with ``-incoming fd:N``. The disk is a qcow2 overlay on the snapshot's disk.

Snapshots hold device state only (``xen-save-devices-state``: all device state, no
RAM), because the RAM is already a file: the template's RAM file for a template, or
a RAM image assembled from the parent's dirty pages for a fork (see
``kernelmanager.forks``). Loading such a stream needs
``migration.send-configuration=off``, as it has no configuration section.

The agent's virtio-serial chardev listens on a socket we bind and pass in as a file
descriptor (no path race, reconnectable); QMP runs over a socketpair. QEMU gets
PR_SET_PDEATHSIG, so it dies with the process that started it.

Each QEMU runs in a jail (``jail.py``: own uid, no capabilities, seccomp, own mount
namespace, a cgroup, rlimits) unless ``$VMKG_JAIL=0``. The jailed QEMU cannot create
files in its VM directory, so what it must write by path is made by the host and handed
to it: the state file of ``save_device_state`` and the new overlay of ``snapshot_disk``
(``mode=existing``).

The serial console and QEMU's stderr reach the host over a socketpair and a pipe and
are written by the host into ``console.log`` / ``qemu.log``, each bounded
(``$VMKG_LOG_CAP_BYTES``, default 1 MiB; past it the older half is dropped, so the file
keeps the latest output): a guest printing without end costs the host at most that.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest.protocol import PORT_NAME

from ..exceptions import VMStartError
from ..net.slots import enter_netns
from . import cgroups
from .jail import (
    DEVICES,
    SANDBOX,
    Jail,
    JailSettings,
    backing_chain,
    shim_path,
    virtual_size,
    warn_once,
)
from .qmp import QMPClient

log = logging.getLogger(__name__)

QEMU = os.environ.get("VMKG_QEMU", "qemu-system-x86_64")


def _child_setup(netns: str = "") -> None:  # in the child between fork and exec (unjailed QEMU)
    libc = ctypes.CDLL(None)
    PR_SET_PDEATHSIG, PR_SET_THP_DISABLE = 1, 41
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # QEMU dies with its owner
    if netns:
        enter_netns(netns)
    # No transparent huge pages: QEMU asks for them on its TCG code buffer, and a 2 MB
    # page for every few KB of translated code costs an idle VM 30 MB of private memory.
    libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def tcg_tb_mb() -> int:
    """TCG's translation cache (MB): more keeps a warm kernel's code translated (faster
    cells, no retranslation after the pool's warm-up), less keeps an idle VM's private
    memory down (it fills as code runs). ``$VMKG_TCG_TB_MB``; not part of a snapshot.

    128 by default: with 24 the pool's data-science warm-up filled the cache, TCG flushed
    it whole, and a client's first cells were translated again (bench_gateway, same run:
    pooled first execute 156 ms over a warm one with 24, 13 ms with 128; first pandas cell
    525 ms vs 122 ms; first plot 1.76 s vs 1.00 s), for ~2 MB more private memory in an
    idle restored VM (the cache is touched only as it fills; the cgroup's overhead
    allowance, ``VMKG_JAIL_MEM_OVERHEAD_MB``, covers all of it)."""
    return int(os.environ.get("VMKG_TCG_TB_MB", "128"))


class BoundedLog:
    """An append-only log file that never exceeds ``cap`` bytes: when full, it keeps the
    latest half (``[earlier output dropped]`` marks the cut). Written by the host only."""

    MARK = b"[vmkg: earlier output dropped]\n"

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.dropped = 0

    def write(self, data: bytes) -> None:
        half = self.cap // 2
        if len(data) > half:
            self.dropped += len(data) - half
            data = data[-half:]
        if self.size + len(data) > self.cap:
            keep = max(0, half - len(data) - len(self.MARK))
            tail = os.pread(self.fd, keep, max(0, self.size - keep)) if keep else b""
            self.dropped += self.size - len(tail)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, self.MARK + tail)
            self.size = len(self.MARK) + len(tail)
        os.write(self.fd, data)
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def tail(path: Path, nbytes: int = 8192) -> str:
    """The last ``nbytes`` of a file (never the whole file), decoded leniently."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - nbytes))
            return f.read(nbytes).decode(errors="replace")
    except OSError:
        return ""


def _resolved_qemu() -> str:
    return shutil.which(QEMU) or QEMU


_tcg_warned = False


def _warn_tcg(accel: str, jailed: bool) -> None:
    global _tcg_warned
    if accel != "kvm" and not _tcg_warned:
        _tcg_warned = True
        log.warning("VMs run under TCG (software emulation), which QEMU does not treat as a "
                    "security boundary: the jail (%s) is the boundary between a hostile guest "
                    "and this host", "uid, seccomp, mount namespace, cgroup" if jailed else
                    "OFF: $VMKG_JAIL=0 or unavailable, so there is none")


@dataclass(frozen=True)
class MachineSpec:
    """What must be identical between the VM that made a snapshot and its restores."""

    memory_mb: int = 1024
    vcpus: int = 1
    accel: str = "tcg"            # "kvm" or "tcg"
    kernel: str = ""              # guest kernel path
    initrd: str = ""
    cmdline: str = "console=ttyS0 quiet panic=-1"

    def cpu(self) -> str:
        return "host" if self.accel == "kvm" else TCG_CPU


#: The CPU a guest sees under TCG: QEMU's "max" without what TCG (QEMU 7.2) runs slowly.
#:
#: * ERMS and FSRM ("enhanced" and "fast short" REP MOVSB/STOSB): a guest kernel that sees
#:   them copies to and from user memory, and clears every page it faults in, with ``rep
#:   movsb``/``rep stosb``, which TCG runs as one pass of translated code per byte; without
#:   them it uses ``rep movsq``/``rep stosq`` (8 bytes a pass) and glibc its vector loops.
#:   In a guest (MB/s, with -> without): two kernel copies through a pipe 92 -> 390,
#:   clearing user memory 310 -> 1,690, faulting in fresh memory 400 -> 3,700; a 20 MB
#:   print reached the client at 7.9 -> 18-25 MB/s.
#: * AVX and AVX2 (and so FMA, F16C, which software uses only with AVX): new in 7.2's TCG,
#:   where they run slower than the SSE paths libraries then pick. In a guest (ms, medians
#:   of 3, two runs each): numpy sort of 10^6 floats 3,270 -> 760-1,030, Pillow PNG of an
#:   800x600 image 960-995 -> 760-820, a matplotlib plot to PNG 1,920-2,090 -> 1,590-1,810;
#:   pure Python unchanged.
#: * LA57 (5-level paging): every TLB miss of TCG's soft MMU walks one level less; a 1 GB
#:   guest needs none of it. (With the guest's ``mitigations=off``, see ``templates``: a
#:   pure-Python loop 410-510 -> 330-440 ms.)
#:
#: QEMU 10.0's TCG (bookworm-backports) measured the same on these steps. Under KVM the
#: guest runs on the host's own CPU model. ``$VMKG_TCG_CPU`` replaces this (a QEMU -cpu
#: value); it is part of a template's id.
TCG_CPU = os.environ.get("VMKG_TCG_CPU") or "max,-erms,-fsrm,-avx,-avx2,-la57"


@functools.cache
def qemu_version() -> str:
    """The installed QEMU's version; snapshots load only into the version that made them."""
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].split("version", 1)[1].split()[0]


class QemuVM:
    """A QEMU process. Use :meth:`boot` or :meth:`restore`; always ``await close()``.

    Callers: ``kernelmanager.snapshots`` (bake) and ``kernelmanager.vmkernel`` (restore).
    """

    def __init__(self, workdir: Path, spec: MachineSpec) -> None:
        self.workdir = workdir
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.agent_socket = workdir / "agent.sock"
        self.console_log = workdir / "console.log"
        self.stderr_log = workdir / "qemu.log"
        self.started_at = 0.0
        self.mem_file = Path()
        self.disk = Path()
        self.jail: Jail | None = None
        self.jail_settings = JailSettings.from_env()
        self._given: list[Path] = []    # a bake's RAM and disk, made root's 0644 at the end
        self._pumps: list[asyncio.Task[None]] = []
        # networked machines (``vmkg.net=`` on the command line, a ``network: true``
        # template): QEMU runs in a slot's namespace with a tap NIC (kernelmanager.net);
        # ``net_policy`` (a net.policy.Policy; None = deny all) is applied before it runs
        self.net_policy: Any = None
        self.net_label = ""
        self.slot: Any = None

    @property
    def networked(self) -> bool:
        return "vmkg.net=" in self.spec.cmdline

    # -- construction -----------------------------------------------------------

    def _args(self, mem_file: Path, share: bool, disk: Path, disk_format: str,
              agent_fd: int, qmp_fd: int, console_fd: int) -> list[str]:
        s = self.spec
        accel = "kvm" if s.accel == "kvm" else f"tcg,tb-size={tcg_tb_mb()}"
        # werror/rerror=report: a full host disk is an I/O error inside the guest (the
        # kernel's write fails, the VM keeps running) rather than QEMU's default of
        # silently pausing the whole VM.
        return [
            _resolved_qemu(), "-name", "vmkg",
            "-machine", "microvm,memory-backend=mem,x-option-roms=off",
            "-accel", accel, "-cpu", s.cpu(),
            "-m", f"{s.memory_mb}M", "-smp", str(s.vcpus),
            "-object", f"memory-backend-file,id=mem,size={s.memory_mb}M,mem-path={mem_file},"
                       f"share={'on' if share else 'off'}",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"socket,id=console,fd={console_fd}", "-serial", "chardev:console",
            "-sandbox", SANDBOX,
            "-kernel", s.kernel, "-initrd", s.initrd, "-append", s.cmdline,
            "-drive", f"id=root,file={disk},format={disk_format},if=none,cache=unsafe,discard=unmap,werror=report,rerror=report",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=agent,fd={agent_fd},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}",
            "-mon", "chardev=qmp,mode=control",
            *self._nic_args(),
        ]

    def _nic_args(self) -> list[str]:
        if self.slot is None:
            return []
        from ..net.policy import GUEST_MAC
        return ["-netdev", f"tap,id=net0,fd={self.slot.tap_fd},vhost=off",
                "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}"]

    async def _take_slot(self) -> None:
        """A networked VM's slot, its policy applied and its resolver serving."""
        from ..net import slots
        from ..net.policy import Policy
        try:
            self.slot = await slots.take_slot()
            await self.slot.start(self.net_label or self.workdir.name, self.net_policy or Policy())
            if self.net_label:
                from ..net.api import remember
                remember(self.net_label, self.net_policy or Policy())
        except (OSError, ImportError) as exc:
            await self._release_slot()
            raise VMStartError(f"vm {self.workdir.name}: cannot prepare its network slot: {exc}") from exc
        except BaseException:
            await self._release_slot()
            raise

    async def _release_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            from ..net import slots
            from ..net.api import remember
            if self.net_label:
                remember(self.net_label, None)
            await slots.release_slot(slot)

    def _make_jail(self, mem_file: Path, share: bool, disk: Path) -> Jail | None:
        st = self.jail_settings
        if not st.enabled:
            warn_once("jail-off", "$VMKG_JAIL=0: QEMU runs UNJAILED (as this process's user, "
                      "no namespaces, no cgroup); for development only")
            return None
        if os.geteuid() != 0:
            warn_once("jail-root", "not running as root: QEMU cannot be jailed (no uid change, "
                      "namespaces or cgroups) and runs as this user")
            return None
        shim = shim_path()
        if shim is None:
            return None
        chain = backing_chain(disk)
        if st.disk_cap_mb > 0:
            fsize = st.disk_cap_mb << 20
        else:
            vsize = virtual_size(disk) or (8 << 30)
            fsize = vsize + vsize // 10 + (64 << 20)
        owned = [disk] + ([mem_file] if share else [])
        devices = (*DEVICES, *(("/dev/kvm",) if self.spec.accel == "kvm" else ()))
        limits = cgroups.Limits(
            memory_bytes=(self.spec.memory_mb + st.mem_overhead_mb) << 20,
            pids=st.pids, cpus=st.cpus or float(self.spec.vcpus))
        ro = [Path(self.spec.kernel), Path(self.spec.initrd), *chain] + ([] if share else [mem_file])
        return Jail(st, f"vm {self.workdir.name}", binary=_resolved_qemu(), ro=ro, rw_dirs=[self.workdir],
                    owned=owned, ro_open=None if share else mem_file, shim=shim, limits=limits,
                    fsize=fsize, devices=devices, netns=self.slot.name if self.slot else "")

    async def _spawn(self, mem_file: Path, share: bool, disk: Path, disk_format: str,
                     extra_args: Sequence[str] = (), extra_fds: Sequence[int] = ()) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.networked and self.slot is None:
            await self._take_slot()
        self.mem_file = mem_file
        self.disk = disk
        if share and not mem_file.exists():  # a bake: the jailed QEMU cannot create it
            fd = os.open(mem_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, self.spec.memory_mb << 20)
            finally:
                os.close(fd)
        try:
            self.jail = self._make_jail(mem_file, share, disk)
        except OSError as exc:
            raise VMStartError(f"vm {self.workdir.name}: cannot prepare the jail: {exc}") from exc
        _warn_tcg(self.spec.accel, self.jail is not None)
        # a bake's RAM and disk become template files: every later (jailed) restore reads them
        self._given = [disk, mem_file] if share else []
        if self.jail is None:
            os.chmod(disk, 0o600)
        cap = self.jail_settings.log_cap
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_qemu = socket.socketpair()
        con_host, con_qemu = socket.socketpair()
        try:
            if self.agent_socket.exists():
                self.agent_socket.unlink()
            listener.bind(str(self.agent_socket))
            listener.listen(4)
            args = self._args(mem_file, share, disk, disk_format, listener.fileno(), qmp_qemu.fileno(),
                              con_qemu.fileno())
            self.started_at = time.monotonic()
            jail = self.jail
            self.proc = await asyncio.create_subprocess_exec(
                *args, *extra_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(listener.fileno(), qmp_qemu.fileno(), con_qemu.fileno(), *extra_fds,
                          *((self.slot.tap_fd,) if self.slot else ())),
                preexec_fn=jail.preexec if jail else functools.partial(
                    _child_setup, self.slot.name if self.slot else ""), start_new_session=True,
                env=jail.env() if jail else None,
            )
            if jail is not None:
                jail.started(self.proc.pid)
        except OSError as exc:
            qmp_host.close()
            con_host.close()
            if self.jail is not None:
                self.jail.close()
            await self._release_slot()
            raise VMStartError(f"cannot start {QEMU}: {exc}") from exc
        finally:
            listener.close()
            qmp_qemu.close()
            con_qemu.close()
        self.qmp = QMPClient(qmp_host)
        assert self.proc.stderr is not None
        self._pumps = [
            asyncio.ensure_future(_pump(self.proc.stderr, BoundedLog(self.stderr_log, cap))),
            asyncio.ensure_future(_pump_socket(con_host, BoundedLog(self.console_log, cap))),
        ]

    async def boot(self, mem_file: Path, disk: Path, disk_format: str = "qcow2") -> None:
        """Cold boot with RAM shared into ``mem_file`` (the future template RAM image)."""
        await self._spawn(mem_file, True, disk, disk_format)

    async def restore(self, mem_file: Path, state_file: Path, disk: Path,
                      before_load: Callable[[], Awaitable[object]] | None = None) -> None:
        """Start from a snapshot: RAM mapped copy-on-write, device state loaded, then run.
        ``before_load`` runs once the RAM is mapped, before the device state is loaded (a
        durable image writes its pages into guest RAM there)."""
        state_fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            incoming = "defer" if before_load is not None else f"fd:{state_fd}"
            extra = ["-global", "migration.send-configuration=off", "-incoming", incoming]
            await self._spawn(mem_file, False, disk, "qcow2", extra, extra_fds=(state_fd,))
        finally:
            os.close(state_fd)
        if before_load is not None:
            assert self.qmp is not None
            await before_load()
            await self.qmp.execute("migrate-incoming", uri=f"fd:{state_fd}")

    # -- state --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def failure_detail(self) -> str:
        """The tail of QEMU's stderr and the guest console, for error messages."""
        parts = []
        for label, path in (("qemu", self.stderr_log), ("console", self.console_log)):
            text = tail(path).strip()
            if text:
                parts.append(f"{label}: " + " | ".join(text.splitlines()[-6:]))
        return "; ".join(parts)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    # -- control ------------------------------------------------------------------

    async def pause(self) -> None:
        assert self.qmp is not None
        await self.qmp.execute("stop")

    async def resume(self) -> None:
        assert self.qmp is not None
        await self.qmp.execute("cont")

    async def save_device_state(self, path: Path) -> None:
        """Write all device state but no RAM to ``path``. The VM must be paused."""
        assert self.qmp is not None
        if self.jail is None:
            await self.qmp.execute("xen-save-devices-state", filename=str(path), live=False)
            os.chmod(path, 0o600)
            return
        # the jailed QEMU can write only a file the host made and gave it, in its directory
        tmp = self.workdir / f"state-{os.urandom(4).hex()}"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        try:
            self.jail.give(tmp)
            await self.qmp.execute("xen-save-devices-state", filename=str(tmp), live=False)
            self.jail.take_back(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    async def snapshot_disk(self, new_overlay: Path) -> None:
        """Switch the running VM to a fresh overlay; its old overlay becomes immutable."""
        assert self.qmp is not None
        if self.jail is None:
            await self.qmp.execute("blockdev-snapshot-sync", device="root",
                                   **{"snapshot-file": str(new_overlay), "format": "qcow2"})
            os.chmod(new_overlay, 0o600)
        else:
            # made by the host (the jailed QEMU cannot create files), then handed over; the
            # size comes from the header, so the pause costs one qemu-img, not two
            from ..snapshots import empty_overlay, qemu_img
            size = virtual_size(self.disk)
            if size is None:
                await asyncio.to_thread(empty_overlay, self.disk, new_overlay)
            else:
                await asyncio.to_thread(qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2",
                                        "-b", str(self.disk), "-u", "-o",
                                        "cluster_size=65536,lazy_refcounts=on", str(new_overlay), str(size))
            self.jail.give(new_overlay)
            await self.qmp.execute("blockdev-snapshot-sync", device="root", mode="existing",
                                   **{"snapshot-file": str(new_overlay), "format": "qcow2"})
        self.disk = new_overlay

    async def close(self, timeout: float = 2.0) -> int | None:
        """Stop QEMU: ``quit`` over QMP, then SIGKILL. Always leaves no process behind."""
        if self.proc is None:
            return None
        if self.proc.returncode is None and self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), timeout)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001 - kill follows
                pass
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        await self.kill()
        if self.qmp is not None:
            self.qmp.close()
        await self._finish()
        return self.proc.returncode

    async def _finish(self) -> None:
        """After QEMU is gone: drain the log pumps, remove the cgroup, make the files it
        was given outside its directory (a bake's RAM and disk) root's again."""
        pumps, self._pumps = self._pumps, []
        if pumps:
            _, pending = await asyncio.wait(pumps, timeout=2)
            for t in pending:
                t.cancel()
        if self.jail is not None:
            self.jail.close()
        await self._release_slot()
        for p in self._given:
            try:
                if self.jail is not None:
                    self.jail.take_back(p, 0o644)
                else:
                    os.chmod(p, 0o644)
            except OSError as exc:
                log.warning("vm %s: cannot make %s readable to other VMs: %s", self.workdir.name, p, exc)
        self._given = []

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()


async def _pump(reader: asyncio.StreamReader, out: BoundedLog) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            out.write(chunk)
    except (OSError, ValueError):
        pass
    finally:
        out.close()


async def _pump_socket(sock: socket.socket, out: BoundedLog) -> None:
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError:
        sock.close()
        out.close()
        return
    try:
        await _pump(reader, out)
    finally:
        writer.close()


def write_owner(workdir: Path, **extra: object) -> None:
    """Record who owns this VM directory, so a later start can reap it if we die.
    Root's, 0600, in a directory QEMU cannot write: the reaper trusts it."""
    from .. import reaper
    info = {"owner_pid": os.getpid(), "owner_start": reaper.process_start_time(os.getpid()), **extra}
    tmp = workdir / "owner.json.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    os.replace(tmp, workdir / "owner.json")
