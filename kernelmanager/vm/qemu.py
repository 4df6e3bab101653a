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
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guest.protocol import PORT_NAME

from ..exceptions import VMStartError
from .qmp import QMPClient

log = logging.getLogger(__name__)

QEMU = os.environ.get("VMKG_QEMU", "qemu-system-x86_64")


def _child_setup() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None)
    PR_SET_PDEATHSIG, PR_SET_THP_DISABLE = 1, 41
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # QEMU dies with its owner
    # No transparent huge pages: QEMU asks for them on its TCG code buffer, and a 2 MB
    # page for every few KB of translated code costs an idle VM 30 MB of private memory.
    libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def tcg_tb_mb() -> int:
    """TCG's translation cache (MB): more keeps a warm kernel's code translated (faster
    cells, no retranslation after the pool's warm-up), less keeps an idle VM's private
    memory down (it fills as code runs). ``$VMKG_TCG_TB_MB``; not part of a snapshot."""
    return int(os.environ.get("VMKG_TCG_TB_MB", "24"))


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
        return "host" if self.accel == "kvm" else "max"


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

    # -- construction -----------------------------------------------------------

    def _args(self, mem_file: Path, share: bool, disk: Path, disk_format: str,
              agent_fd: int, qmp_fd: int) -> list[str]:
        s = self.spec
        accel = "kvm" if s.accel == "kvm" else f"tcg,tb-size={tcg_tb_mb()}"
        # werror/rerror=report: a full host disk is an I/O error inside the guest (the
        # kernel's write fails, the VM keeps running) rather than QEMU's default of
        # silently pausing the whole VM.
        return [
            QEMU, "-name", "vmkg",
            "-machine", "microvm,memory-backend=mem,x-option-roms=off",
            "-accel", accel, "-cpu", s.cpu(),
            "-m", f"{s.memory_mb}M", "-smp", str(s.vcpus),
            "-object", f"memory-backend-file,id=mem,size={s.memory_mb}M,mem-path={mem_file},"
                       f"share={'on' if share else 'off'}",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console_log}",
            "-kernel", s.kernel, "-initrd", s.initrd, "-append", s.cmdline,
            "-drive", f"id=root,file={disk},format={disk_format},if=none,cache=unsafe,discard=unmap,werror=report,rerror=report",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=agent,fd={agent_fd},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}",
            "-mon", "chardev=qmp,mode=control",
        ]

    async def _spawn(self, mem_file: Path, share: bool, disk: Path, disk_format: str,
                     extra_args: Sequence[str] = (), extra_fds: Sequence[int] = ()) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mem_file = mem_file
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_qemu = socket.socketpair()
        stderr = open(self.stderr_log, "ab")  # noqa: SIM115
        try:
            if self.agent_socket.exists():
                self.agent_socket.unlink()
            listener.bind(str(self.agent_socket))
            listener.listen(4)
            args = self._args(mem_file, share, disk, disk_format, listener.fileno(), qmp_qemu.fileno())
            self.started_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *args, *extra_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(listener.fileno(), qmp_qemu.fileno(), *extra_fds),
                preexec_fn=_child_setup, start_new_session=True,
            )
        except OSError as exc:
            qmp_host.close()
            raise VMStartError(f"cannot start {QEMU}: {exc}") from exc
        finally:
            listener.close()
            qmp_qemu.close()
            stderr.close()
        self.qmp = QMPClient(qmp_host)

    async def boot(self, mem_file: Path, disk: Path, disk_format: str = "qcow2") -> None:
        """Cold boot with RAM shared into ``mem_file`` (the future template RAM image)."""
        await self._spawn(mem_file, True, disk, disk_format)

    async def restore(self, mem_file: Path, state_file: Path, disk: Path) -> None:
        """Start from a snapshot: RAM mapped copy-on-write, device state loaded, then run."""
        state_fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            extra = ["-global", "migration.send-configuration=off", "-incoming", f"fd:{state_fd}"]
            await self._spawn(mem_file, False, disk, "qcow2", extra, extra_fds=(state_fd,))
        finally:
            os.close(state_fd)

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
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
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
        await self.qmp.execute("xen-save-devices-state", filename=str(path), live=False)

    async def snapshot_disk(self, new_overlay: Path) -> None:
        """Switch the running VM to a fresh overlay; its old overlay becomes immutable."""
        assert self.qmp is not None
        await self.qmp.execute("blockdev-snapshot-sync", device="root",
                               **{"snapshot-file": str(new_overlay), "format": "qcow2"})

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
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()


def write_owner(workdir: Path, **extra: object) -> None:
    """Record who owns this VM directory, so a later start can reap it if we die."""
    from .. import reaper
    info = {"owner_pid": os.getpid(), "owner_start": reaper.process_start_time(os.getpid()), **extra}
    tmp = workdir / "owner.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, workdir / "owner.json")
