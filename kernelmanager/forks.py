"""Forking a running kernel's VM: a snapshot of its whole state that N children restore.

What a fork snapshot is made of, and how it is made without copying what need not be:

* **RAM.** The parent maps its base RAM image (a template's, or its own parent fork's)
  ``MAP_PRIVATE``: the pages it changed are anonymous copy-on-write pages of the QEMU
  process, the rest still come from the base file. While the VM is paused we read
  ``/proc/PID/pagemap`` for the RAM mapping, copy only the *dirty* pages out of
  ``/proc/PID/mem``, and resume the parent. The fork image is then the base file
  (copied sparsely, on tmpfs) with the dirty pages written over it. Children map that
  image ``share=off`` too, so they share every page they don't write.
* **Disk.** The parent's qcow2 overlay is frozen with ``blockdev-snapshot-sync`` (the
  parent continues on a fresh overlay) and hard-linked into the fork directory, where
  children's overlays back onto it: deleting the parent never breaks its branches.
* **Devices.** ``xen-save-devices-state`` (all device state, no RAM), a few dozen KB.
* **Quiescence.** The agent first waits until the kernel is idle with no request
  pending, then holds new input until the snapshot is taken (``freeze``/``thaw``):
  a branch never starts in the middle of a cell, and the parent loses nothing.

Fork directories are reference counted by the VMs restored from them (and by forks
taken from those VMs, whose disks back onto them); the last release removes them. A
fork's RAM image is needed only by VMs restored from that fork itself (a fork's image
is complete: base + its own dirty pages), so it is deleted as soon as no holder of the
snapshot itself is left, even while descendants keep the directory for its disk: forks
of forks whose parents were deleted never accumulate RAM images.

Host files: fork directories are 0700, their files 0600 (the frozen disk and the RAM
image 0640 with the jail's group, so jailed children can read them through their
mount namespace). RAM images live in a private tmpfs directory (``paths.ensure_shm_dir``)
and are created O_EXCL|O_NOFOLLOW. Their total size has a budget
(``$VMKG_FORK_BUDGET_MB``, default half of the tmpfs): a fork that would exceed it raises
``ForkBudgetExceeded`` (HTTP 507) before the parent is paused.

Errors: a kernel that stays busy is ``KernelBusy``; anything else that goes wrong while
the snapshot is taken (a QMP command QEMU refuses, QEMU gone, an OS error writing the
snapshot, ``qemu-img`` failing) becomes one ``ForkError`` with its message, raised here
``from`` the original, and nothing of the half-made snapshot is left behind.

Dependencies run one way: ``vmkernel`` uses this module (the registry); this module
knows the kernel it snapshots only as a :class:`ForkableKernel`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from . import paths
from .exceptions import (
    AgentError,
    ConfigError,
    ForkBudgetExceeded,
    ForkError,
    KernelBusy,
    TemplateError,
)
from .snapshots import Snapshot, empty_overlay
from .vm.jail import share_with_jails
from .vm.qemu import QemuVM, write_owner
from .vm.qmp import QMPError

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")
_CHUNK = 8 << 20


def forks_dir() -> Path:
    paths.private_dir(paths.state_dir())
    return paths.private_dir(paths.state_dir() / "forks")


def fork_budget(shm: Path) -> int:
    """Bytes all fork RAM images together may take: ``$VMKG_FORK_BUDGET_MB``, else half
    of the tmpfs they live on."""
    raw = os.environ.get("VMKG_FORK_BUDGET_MB", "").strip()
    if raw:
        try:
            return int(raw) << 20
        except ValueError:
            log.warning("VMKG_FORK_BUDGET_MB=%r is not an integer; using half of %s", raw, shm)
    st = os.statvfs(shm)
    return st.f_blocks * st.f_frsize // 2


def images_usage(shm: Path) -> int:
    """Bytes the fork RAM images in ``shm`` take (allocated, not apparent, size)."""
    total = 0
    for f in shm.iterdir():
        if f.name.startswith("fork-"):
            try:
                total += f.lstat().st_blocks * 512
            except OSError:
                pass
    return total


def _check_budget(shm: Path, extra: int, kernel_id: str) -> None:
    budget, used = fork_budget(shm), images_usage(shm)
    if used + extra > budget:
        raise ForkBudgetExceeded(
            f"kernel {kernel_id}: cannot fork: fork images would take {(used + extra) >> 20} MB, "
            f"over the budget of {budget >> 20} MB ({used >> 20} MB in use by other forks; "
            "delete forked kernels or raise VMKG_FORK_BUDGET_MB)")


# ---------------------------------------------------------------------------
# Reference counting of fork directories


class ForkRegistry:
    """Which fork snapshots are in use in this process. Runtime loop only."""

    def __init__(self) -> None:
        self._refs: dict[Path, int] = {}
        self._direct: dict[Path, int] = {}   # holders of the snapshot itself (need its RAM)

    def acquire(self, snap: Snapshot) -> None:
        chain = self.chain(snap)
        if chain:
            self._direct[chain[0]] = self._direct.get(chain[0], 0) + 1
        for d in chain:
            self._refs[d] = self._refs.get(d, 0) + 1

    def release(self, snap: Snapshot) -> None:
        chain = self.chain(snap)
        if chain:
            n = self._direct.get(chain[0], 0) - 1
            if n > 0:
                self._direct[chain[0]] = n
            else:
                self._direct.pop(chain[0], None)
                remove_ram_image(chain[0])  # descendants need only its disk
        for d in chain:
            n = self._refs.get(d, 0) - 1
            if n > 0:
                self._refs[d] = n
                continue
            self._refs.pop(d, None)
            remove_fork_dir(d)

    @staticmethod
    def chain(snap: Snapshot) -> list[Path]:
        """The fork directories a VM restored from ``snap`` depends on (its own and ancestors')."""
        if snap.kind != "fork":
            return []
        return [snap.path, *(Path(p) for p in snap.info.get("ancestors", []))]

    def count(self, d: Path) -> int:
        return self._refs.get(d, 0)


registry = ForkRegistry()


def remove_ram_image(d: Path) -> None:
    """Delete the RAM image of fork directory ``d`` (if it still has one)."""
    rec = d / "mem.path"
    try:
        Path(rec.read_text()).unlink(missing_ok=True)
        rec.unlink()
    except OSError:
        pass


def remove_fork_dir(d: Path) -> None:
    remove_ram_image(d)
    shutil.rmtree(d, ignore_errors=True)
    log.info("fork %s: released", d.name)


# ---------------------------------------------------------------------------
# RAM: dirty pages out of a paused QEMU, and the image children map

_FLAGS = bytes((1 if (b & 0x80 and not b & 0x20) or b & 0x40 else 0) for b in range(256))
_RUNS = re.compile(rb"\x01+")


def ram_vmas(pid: int, mem_file: Path) -> list[tuple[int, int, int]]:
    """(start address, length, file offset) of every mapping of ``mem_file`` in ``pid``."""
    want = str(mem_file)
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == want:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi - lo, int(fields[2], 16)))
    if not out:
        raise ForkError(f"guest RAM ({mem_file}) is not mapped in QEMU process {pid}")
    return out


def dirty_runs(pid: int, vmas: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Runs (address, length, file offset) of pages the process changed (private, anonymous).

    pagemap bits: 63 present, 62 swapped, 61 file-backed or shared. A present page that
    is not file-backed is a copy-on-write copy: dirty. A swapped page is dirty too.
    """
    runs = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for start, length, offset in vmas:
            pm.seek(start // PAGE * 8)
            entries = pm.read(length // PAGE * 8)
            flags = entries[7::8].translate(_FLAGS)  # the top byte of each 64-bit entry
            for m in _RUNS.finditer(flags):
                a, b = m.start(), m.end()
                runs.append((start + a * PAGE, (b - a) * PAGE, offset + a * PAGE))
    return runs


def copy_dirty(pid: int, runs: list[tuple[int, int, int]], dest: Path, size: int) -> int:
    """Write the dirty pages into the (new, sparse) RAM image at their offsets. Returns bytes."""
    total = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for addr, length, offset in runs:
                done = 0
                while done < length:
                    n = min(_CHUNK, length - done)
                    mem.seek(addr + done)
                    data = mem.read(n)
                    if not data:  # the process exited: its memory reads as empty
                        raise ForkError(f"QEMU process {pid} exited while its RAM was copied")
                    os.pwrite(fd, data, offset + done)
                    done += len(data)
                total += length
    finally:
        os.close(fd)
    return total


def _copy_range(sfd: int, dfd: int, off: int, length: int, dest_off: int) -> None:
    """Copy bytes between files at given offsets (in the kernel; files may be on different fs)."""
    done = 0
    while done < length:
        n = min(_CHUNK, length - done)
        try:
            k = os.copy_file_range(sfd, dfd, n, off + done, dest_off + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.lseek(dfd, dest_off + done, os.SEEK_SET)
            k = os.sendfile(dfd, sfd, off + done, n)
        if k <= 0:
            raise ForkError("short copy while assembling the fork RAM image")
        done += k


def fill_from_base(base: Path, dest: Path, runs: list[tuple[int, int, int]], size: int) -> int:
    """Copy into ``dest`` every data range of ``base`` that no dirty run covers.

    ``dest`` already holds the dirty pages, so each byte is written once; holes in the
    base stay holes. Returns the bytes copied.
    """
    dirty = sorted((off, off + length) for _, length, off in runs)
    copied = 0
    with open(base, "rb") as src, open(os.open(dest, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), "r+b") as dst:
        sfd, dfd = src.fileno(), dst.fileno()
        pos, i = 0, 0
        while pos < size:
            try:
                data_at = os.lseek(sfd, pos, os.SEEK_DATA)
            except OSError:
                break  # only holes remain
            hole_at = min(os.lseek(sfd, data_at, os.SEEK_HOLE), size)
            cur = data_at
            while i < len(dirty) and dirty[i][1] <= cur:
                i += 1
            j = i
            while cur < hole_at:
                if j < len(dirty) and dirty[j][0] < hole_at:
                    start, end = dirty[j]
                    if start > cur:
                        _copy_range(sfd, dfd, cur, start - cur, cur)
                        copied += start - cur
                    cur = max(cur, end)
                    j += 1
                else:
                    _copy_range(sfd, dfd, cur, hole_at - cur, cur)
                    copied += hole_at - cur
                    cur = hole_at
            pos = hole_at
    return copied


# ---------------------------------------------------------------------------
# Taking the snapshot


class ForkableKernel(Protocol):
    """What :func:`snapshot_kernel` needs of a running kernel (``VMKernel`` is one)."""

    kernel_id: str
    snapshot: Snapshot
    vm: QemuVM
    workdir: Path
    disk_path: Path

    def poll(self) -> int | None: ...

    async def request(self, op: str, timeout: float = 30.0, **args: Any) -> Any: ...


async def snapshot_kernel(vk: ForkableKernel, *, idle_timeout: float = 30.0) -> Snapshot:
    """Snapshot a running kernel's VM for forking. The parent keeps running.

    Raises KernelBusy when the kernel does not become idle within ``idle_timeout``, and
    ForkError (from the QMP or OS error) when the snapshot cannot be taken.
    """
    if vk.poll() is not None:
        raise ForkError(f"kernel {vk.kernel_id}: the VM is not running")
    try:
        shm = paths.ensure_shm_dir()
    except ConfigError as exc:
        raise ForkError(f"kernel {vk.kernel_id}: unsafe fork-image directory: {exc}") from exc
    try:
        base_bytes_est = os.stat(vk.snapshot.mem_file).st_blocks * 512
    except OSError as exc:
        raise ForkError(f"kernel {vk.kernel_id}: the RAM image it runs on is gone: {exc}") from exc
    _check_budget(shm, base_bytes_est, vk.kernel_id)
    fork_id = uuid.uuid4().hex
    try:
        d = forks_dir() / fork_id
        d.mkdir(mode=0o700)
    except (OSError, ConfigError) as exc:
        raise ForkError(f"kernel {vk.kernel_id}: cannot make the fork directory: {exc}") from exc
    try:
        return await _snapshot(vk, d, shm, fork_id, idle_timeout)
    except (QMPError, OSError, TemplateError) as exc:  # OSError: ConnectionError (QEMU gone) too
        raise ForkError(f"kernel {vk.kernel_id}: fork snapshot failed: {exc}") from exc


async def _snapshot(vk: ForkableKernel, d: Path, shm: Path, fork_id: str,
                    idle_timeout: float) -> Snapshot:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        write_owner(d, kind="fork", parent_kernel=vk.kernel_id)
        mem = shm / f"fork-{fork_id}.mem"
        rec = os.open(d / "mem.path", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(rec, "w") as f:
            f.write(str(mem))
        try:
            await vk.request("freeze", timeout=idle_timeout + 10, wait=idle_timeout)
        except AgentError as exc:
            if exc.kind == "busy":
                raise KernelBusy(f"kernel {vk.kernel_id} is busy: {exc}") from exc
            raise
        timings["quiesce"] = time.monotonic() - t0
        vm = vk.vm
        pid = vm.pid
        if pid is None:
            raise ForkError(f"kernel {vk.kernel_id}: the VM has no process")
        size = vk.snapshot.machine.memory_mb << 20
        try:
            await vm.pause()
            t1 = time.monotonic()
            try:
                await vm.save_device_state(d / "state")
                new_disk = vk.workdir / f"disk-{fork_id[:8]}.qcow2"
                os.link(vk.disk_path, d / "disk.qcow2")
                await vm.snapshot_disk(new_disk)
                vk.disk_path = new_disk
                vmas = ram_vmas(pid, vk.snapshot.mem_file)
                runs = await asyncio.to_thread(dirty_runs, pid, vmas)
                copied = await asyncio.to_thread(copy_dirty, pid, runs, mem, size)
            finally:
                await vm.resume()
            timings["paused"] = time.monotonic() - t1
        finally:
            try:
                await vk.request("thaw", timeout=30)
            except Exception as exc:  # noqa: BLE001 - the parent must not stay frozen silently
                log.error("kernel %s: thaw after fork failed: %s", vk.kernel_id, exc)
        t2 = time.monotonic()
        base_bytes = await asyncio.to_thread(fill_from_base, vk.snapshot.mem_file, mem, runs, size)
        _check_budget(shm, 0, vk.kernel_id)  # the dirty pages may have taken it over
        await asyncio.to_thread(empty_overlay, d / "disk.qcow2", d / "overlay.qcow2")
        os.chmod(d / "overlay.qcow2", 0o600)
        share_with_jails(mem)                # children's QEMUs read these two
        share_with_jails(d / "disk.qcow2")   # (frozen: no longer the parent QEMU's)
        timings["image"] = time.monotonic() - t2
        ancestors = [str(p) for p in ForkRegistry.chain(vk.snapshot)]
        snap = dataclasses.replace(
            vk.snapshot, path=d, mem_file=mem, state_file=d / "state", disk=d / "disk.qcow2",
            created=time.time(), kind="fork", parent=vk.kernel_id,
            info={**{k: v for k, v in vk.snapshot.info.items() if k != "mem_delta"},  # in the image
                  "template_dir": str(vk.snapshot.info.get("template_dir") or (
                      vk.snapshot.path if vk.snapshot.kind == "template" else "")),
                  "ancestors": ancestors, "dirty_bytes": copied,
                  "base_bytes": base_bytes, "timings": timings,
                  "template": str(vk.snapshot.info.get("template", ""))},
        )
        snap.save()
        os.chmod(d / "snapshot.json", 0o600)
    except BaseException:
        remove_fork_dir(d)
        raise
    log.info("kernel %s: fork snapshot %s: %.0f MB dirty, quiesce %.0f ms, paused %.0f ms, image %.0f ms",
             vk.kernel_id, fork_id[:8], copied / 2**20, timings["quiesce"] * 1000,
             timings["paused"] * 1000, timings["image"] * 1000)
    return snap
