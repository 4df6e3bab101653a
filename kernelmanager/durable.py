"""Durable kernels: a kernel's whole state saved to disk (hibernation, checkpoints) and
brought back into a fresh VM, under the same kernel id.

What a *durable image* is (one directory, 0700, files 0600, under
``<state dir>/durable/<kernel id>/<name>/``; never on tmpfs):

* ``mem.delta``: a sparse file the size of guest RAM holding only the pages that differ
  from the kernel's **template** RAM image, at their offsets. It is made as a fork
  snapshot is (``kernelmanager.forks``): with the VM paused, ``/proc/PID/pagemap`` names
  the pages QEMU's private mapping of its RAM file copied on write, and only those are
  copied out of ``/proc/PID/mem``. Its allocated size is what the kernel wrote, not the
  VM's size. For a fork child (whose RAM file is a fork image, not the template), the
  pages of that image that differ from the template are added (compared chunk by chunk).
* ``state``: the device state (``xen-save-devices-state``).
* ``disk.qcow2``: the kernel's disk as one qcow2 layer over the template's disk: the
  overlay is frozen (``blockdev-snapshot-sync``, as for a fork) and its chain down to the
  template is committed into one layer (``qemu-img commit`` on copies; QEMU 7.2's
  ``convert -B`` drops intermediate layers), so an image depends on nothing but its
  template, survives the gateway, and outlives the forks it was taken through.
* ``image.json``: kernel id, name, time, the template snapshot's directory, sizes, and
  a networked kernel's egress policy (``info["network"]``: it travels with the image and
  is in force again wherever the image is brought back; ``kernelmanager.net.api``).

Bringing an image back (a wake, a checkpoint restore, a fork from a checkpoint):
:func:`materialize` makes a *fork-kind* snapshot directory (``forks_dir()``; reference
counted by ``forks.registry`` like any fork, so it goes when its last VM and its forks'
disks are gone) holding hard links to the image's files, whose RAM file is the template's
own and whose ``info["mem_delta"]`` names the delta. ``VMKernel`` restores such a
snapshot paused (``-S``), writes the delta's pages into QEMU's private RAM mapping through
``/proc/PID/mem`` (copy-on-write breaks, so the pages are private to this VM, exactly as
they were in the original) and only then lets the guest run. No RAM image is assembled on
tmpfs, so a woken kernel costs the memory it wrote, shares the rest with every other
kernel of its template, and a wake costs copying only the delta. Clone safety is the
restore op's (fresh CRNG entropy, clock); a wake does not reseed Python's random state,
a checkpoint restore and a fork do.

Disk budget: the images under ``durable/`` together may take ``$VMKG_DURABLE_BUDGET_MB``
(unset or 0: no budget of their own); whatever the budget, an image is refused while the
file system would keep less than ``RESERVE`` free. A refusal is ``DurableBudgetExceeded``
(HTTP 507) raised before anything is written where possible, and a disk that fills up
while writing gives the same error; either way the kernel keeps running unchanged (the
VM is resumed, the half-made image removed).

How much a refusal is over the budget travels with it (``OverBudget.over``): with
``$VMKG_DURABLE_CULL_OLDEST`` the gateway (``gateway.hibernate``) then shuts down the
oldest hibernated kernels until that much is freed and hibernates again.

Persisted kernels: :func:`persist_kernel` writes ``kernel.json`` beside the images (the
kernel's connection info, key included, kernelspec name, environment, and whatever the
caller adds, e.g. the gateway's owner record); :func:`persisted_kernels` lists them for
the next start. Files are 0600 in 0700 directories: the key is a secret.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import errno
import json
import logging
import mmap
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .exceptions import (
    AgentError,
    CheckpointNotFound,
    ConfigError,
    DurableBudgetExceeded,
    DurableError,
    KernelBusy,
    TemplateError,
    VMKGError,
)
from .forks import PAGE, ForkableKernel, copy_dirty, dirty_runs, forks_dir, ram_vmas
from .net.api import record as net_record
from .snapshots import Snapshot, empty_overlay, qemu_img
from .vm.jail import backing_chain, share_with_jails
from .vm.qemu import QemuVM, write_owner
from .vm.qmp import QMPError

log = logging.getLogger(__name__)

DELTA = "mem.delta"
HIBERNATED = "hibernated"
#: the last idle checkpoint taken in the background (the crash case)
AUTO = "auto"
#: bytes the file system must keep free whatever the budget
RESERVE = 256 << 20
_CHUNK = 4 << 20
#: deltas larger than this are written into guest RAM by two threads
_PARALLEL = 32 << 20
_MAX_NAME = 64


def durable_root() -> Path:
    paths.private_dir(paths.state_dir())
    return paths.private_dir(paths.state_dir() / "durable")


def kernel_dir(kernel_id: str, create: bool = True) -> Path:
    d = durable_root() / kernel_id
    if create:
        paths.private_dir(d)
    return d


def check_name(name: str) -> str:
    """A checkpoint name: 1-64 of [A-Za-z0-9_.-], not starting with a dot."""
    ok = 0 < len(name) <= _MAX_NAME and not name.startswith(".") and \
        all(c.isalnum() and c.isascii() or c in "-_." for c in name)
    if not ok or name in (HIBERNATED, AUTO):
        raise ConfigError(f"invalid checkpoint name {name!r}: 1-{_MAX_NAME} letters, digits, "
                          f"'-', '_' or '.', not starting with '.', not {HIBERNATED!r} or {AUTO!r}")
    return name


def checkpoint_path(kernel_id: str, name: str) -> Path:
    return kernel_dir(kernel_id) / f"ckpt-{check_name(name)}"


# ---------------------------------------------------------------------------
# Budget


def budget() -> int | None:
    raw = os.environ.get("VMKG_DURABLE_BUDGET_MB", "").strip()
    if not raw:
        return None
    try:
        mb = int(raw)
    except ValueError:
        log.warning("VMKG_DURABLE_BUDGET_MB=%r is not an integer; no durable budget", raw)
        return None
    return (mb << 20) if mb > 0 else None


def allocated(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (a hard-linked inode counted once)."""
    total, seen = 0, set()
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def usage() -> int:
    root = paths.state_dir() / "durable"
    return allocated(root) if root.is_dir() else 0


class OverBudget(DurableBudgetExceeded):
    """A refusal that says by how many bytes (``over``): what would have to be freed (the
    gateway's ``durable_cull_oldest`` culls the oldest hibernated kernels until it is)."""

    def __init__(self, message: str, over: int) -> None:
        super().__init__(message)
        self.over = over


def check_budget(extra: int, kernel_id: str) -> None:
    limit = budget()
    used = usage()
    if limit is not None and used + extra > limit:
        raise OverBudget(
            f"kernel {kernel_id}: durable images would take {(used + extra) >> 20} MB, over the "
            f"budget of {limit >> 20} MB (VMKG_DURABLE_BUDGET_MB); delete checkpoints or "
            "hibernated kernels, or raise the budget", used + extra - limit)
    st = os.statvfs(paths.state_dir())
    free = st.f_bavail * st.f_frsize
    if free < extra + RESERVE:
        raise OverBudget(
            f"kernel {kernel_id}: the disk of {paths.state_dir()} is full "
            f"({free >> 20} MB free, {extra >> 20} MB needed + {RESERVE >> 20} MB reserve)",
            extra + RESERVE - free)


# ---------------------------------------------------------------------------
# Images


@dataclass
class DurableImage:
    path: Path
    kernel_id: str
    name: str
    created: float
    template: Path                       # the template snapshot's directory
    delta_bytes: int = 0                 # RAM pages that differ from the template
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return allocated(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"kernel_id": self.kernel_id, "name": self.name, "created": self.created,
                "template": str(self.template), "delta_bytes": self.delta_bytes, "info": self.info}

    def save(self) -> None:
        _write_private(self.path / "image.json", json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> DurableImage:
        try:
            d = json.loads((path / "image.json").read_text())
            return cls(path=path, kernel_id=str(d["kernel_id"]), name=str(d["name"]),
                       created=float(d["created"]), template=Path(d["template"]),
                       delta_bytes=int(d.get("delta_bytes", 0)), info=dict(d.get("info") or {}))
        except FileNotFoundError as exc:
            raise DurableError(f"no durable image at {path}") from exc
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DurableError(f"unreadable durable image record in {path}: {exc}") from exc


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def find_image(kernel_id: str, name: str) -> DurableImage | None:
    d = durable_root() / kernel_id / name
    if not (d / "image.json").exists():
        return None
    return DurableImage.load(d)


def latest_image(kernel_id: str) -> DurableImage | None:
    """The newer of the kernel's hibernated image and its last idle checkpoint."""
    found = [i for i in (find_image(kernel_id, HIBERNATED), find_image(kernel_id, AUTO)) if i is not None]
    return max(found, key=lambda i: i.created) if found else None


def list_checkpoints(kernel_id: str) -> list[DurableImage]:
    d = durable_root() / kernel_id
    if not d.is_dir():
        return []
    out = []
    for sub in sorted(d.iterdir()):
        if sub.name.startswith("ckpt-") and (sub / "image.json").exists():
            try:
                out.append(DurableImage.load(sub))
            except DurableError as exc:
                log.warning("kernel %s: %s", kernel_id, exc)
    return sorted(out, key=lambda i: i.created)


def link_image(image: DurableImage, name: str, dest: os.PathLike[str]) -> DurableImage:
    """A copy of ``image`` named ``name`` at ``dest`` made of hard links (costs no disk)."""
    dest = Path(dest)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700)
    try:
        for f in ("state", "disk.qcow2", DELTA):
            os.link(image.path / f, tmp / f)
        new = dataclasses.replace(image, path=tmp, name=name, created=time.time())
        new.save()
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    new.path = dest
    return new


def remove_image(image: DurableImage | Path) -> None:
    path = image.path if isinstance(image, DurableImage) else image
    shutil.rmtree(path, ignore_errors=True)


def remove_kernel(kernel_id: str) -> None:
    """Delete every durable image and the record of ``kernel_id``. VMs running from them
    keep their hard links (their fork-kind snapshot directories)."""
    d = durable_root() / kernel_id
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        log.info("kernel %s: durable images removed", kernel_id)


def _template_of(snap: Snapshot) -> tuple[Path, Path, Path]:
    """(template dir, template RAM file, template disk) a kernel's snapshot derives from."""
    if snap.kind == "template":
        return snap.path, snap.mem_file, snap.disk
    tdir = snap.info.get("template_dir")
    if not tdir:
        raise DurableError(f"snapshot {snap.path.name} does not name its template")
    t = Snapshot.load(Path(tdir))
    return t.path, t.mem_file, t.disk


# ---------------------------------------------------------------------------
# RAM: the delta against the template


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data (non-hole) ranges of a file, up to ``size``."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def fill_diff(image: Path, template: Path, dest: Path, runs: list[tuple[int, int, int]],
              size: int) -> int:
    """Write into ``dest`` the pages of ``image`` that differ from ``template``, except
    those a dirty run (already in ``dest``) covers. Returns the bytes written."""
    dirty = sorted((off, off + length) for _, length, off in runs)
    starts = [s for s, _ in dirty]
    written = 0

    def covered(off: int) -> bool:
        i = bisect.bisect_right(starts, off) - 1
        return i >= 0 and dirty[i][0] <= off < dirty[i][1]

    with open(image, "rb", buffering=0) as a, open(template, "rb", buffering=0) as t:
        dfd = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for start, end in data_ranges(a.fileno(), size):
                for cs in range(start, end, _CHUNK):
                    n = min(_CHUNK, end - cs)
                    x = os.pread(a.fileno(), n, cs)
                    y = os.pread(t.fileno(), n, cs)
                    if x == y:
                        continue
                    for p in range(0, len(x), PAGE):
                        if x[p:p + PAGE] != y[p:p + PAGE] and not covered(cs + p):
                            os.pwrite(dfd, x[p:p + PAGE], cs + p)
                            written += PAGE
        finally:
            os.close(dfd)
    return written


async def load_delta(vm: QemuVM, mem_file: Path, delta: Path) -> int:
    """Write the pages of ``delta`` into the guest RAM of a VM started with its incoming
    device state deferred (before the devices, which check their rings against RAM, are
    loaded). Returns the bytes written."""
    assert vm.pid is not None and vm.qmp is not None
    await vm.qmp.execute("query-status")  # QEMU answers once its machine (and RAM) is set up
    pid = vm.pid
    vmas = ram_vmas(pid, mem_file)
    return await asyncio.to_thread(_write_delta, pid, vmas, delta)


def _write_delta(pid: int, vmas: list[tuple[int, int, int]], delta: Path) -> int:
    """Copy the data ranges of ``delta`` into the guest RAM mappings ``vmas`` of ``pid``.

    The delta is mapped (no read copy, no buffer per chunk) and its ranges are written
    through ``/proc/PID/mem``; the cost is the kernel's copy-on-write break of each page.
    Deltas past ``_PARALLEL`` are split between two threads (``pwrite`` releases the GIL;
    the page faults of the two halves run on two cores)."""
    with open(delta, "rb", buffering=0) as src:
        size = os.fstat(src.fileno()).st_size
        ranges = data_ranges(src.fileno(), size)
        if not ranges:
            return 0
        pieces = []  # (guest address, delta offset, length): ranges cut at mapping borders
        for start, end in ranges:
            pos = start
            while pos < end:
                for addr, length, offset in vmas:
                    if offset <= pos < offset + length:
                        k = min(end, offset + length) - pos
                        pieces.append((addr + pos - offset, pos, k))
                        pos += k
                        break
                else:
                    raise DurableError(f"delta offset {pos} is outside guest RAM")
        total = sum(p[2] for p in pieces)
        with mmap.mmap(src.fileno(), size, prot=mmap.PROT_READ) as mm:
            view = memoryview(mm)
            try:
                if total <= _PARALLEL:
                    _write_pieces(pid, view, pieces)
                else:
                    halves = _split(pieces, total // 2)
                    with concurrent.futures.ThreadPoolExecutor(2) as pool:
                        for f in [pool.submit(_write_pieces, pid, view, h) for h in halves]:
                            f.result()
            finally:
                view.release()
    return total


def _split(pieces: list[tuple[int, int, int]], first: int) -> list[list[tuple[int, int, int]]]:
    """``pieces`` cut in two lists, the first holding ``first`` bytes (page aligned)."""
    a: list[tuple[int, int, int]] = []
    b: list[tuple[int, int, int]] = []
    need = first - first % PAGE
    for addr, off, n in pieces:
        if need >= n:
            a.append((addr, off, n))
            need -= n
        elif need > 0:
            a.append((addr, off, need))
            b.append((addr + need, off + need, n - need))
            need = 0
        else:
            b.append((addr, off, n))
    return [a, b]


def _write_pieces(pid: int, view: memoryview, pieces: list[tuple[int, int, int]]) -> None:
    mem = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        for addr, off, n in pieces:
            done = 0
            while done < n:
                k = min(_CHUNK, n - done)
                w = os.pwrite(mem, view[off + done:off + done + k], addr + done)
                if w <= 0:
                    raise DurableError(f"QEMU process {pid} exited while its RAM was written")
                done += w
    finally:
        os.close(mem)


# ---------------------------------------------------------------------------
# Disk: one layer over the template's disk


def flatten_disk(top: Path, template_disk: Path, dest: Path) -> None:
    """Write ``dest``: a qcow2 over ``template_disk`` with the content of ``top``'s chain."""
    chain = [top, *backing_chain(top)]
    resolved = [os.path.realpath(p) for p in chain]
    try:
        idx = resolved.index(os.path.realpath(template_disk))
    except ValueError as exc:
        raise DurableError(f"disk {top.name} does not back onto its template's disk") from exc
    layers = chain[:idx]
    work = dest.parent
    copies = []
    try:
        for i, layer in enumerate(layers):
            c = work / f".layer-{i}.qcow2"
            subprocess.run(["cp", "--sparse=always", str(layer), str(c)], check=True,
                           capture_output=True, text=True)
            os.chmod(c, 0o600)
            copies.append(c)
        for upper, lower in zip(copies, copies[1:], strict=False):
            qemu_img("rebase", "-u", "-F", "qcow2", "-b", str(lower), str(upper))
        if len(copies) > 1:
            qemu_img("commit", "-q", "-b", str(copies[-1]), str(copies[0]))
        os.replace(copies[-1], dest)
    except subprocess.CalledProcessError as exc:
        raise DurableError(f"cannot copy disk layer: {exc.stderr.strip()}") from exc
    finally:
        for c in copies:
            c.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Capture (hibernate, checkpoint)


async def capture(vk: ForkableKernel, dest: Path, *, name: str, stop: bool,
                  idle_timeout: float = 30.0) -> DurableImage:
    """Save the kernel's whole state to ``dest`` (replaced atomically when it exists).

    ``stop``: the VM is left paused and frozen for the caller to close (a hibernation);
    otherwise it runs on after a pause as long as a fork's. On any failure the kernel
    keeps running unchanged and nothing of the new image is left. Raises ``KernelBusy``,
    ``DurableBudgetExceeded`` (507) or ``DurableError``.
    """
    if vk.poll() is not None:
        raise DurableError(f"kernel {vk.kernel_id}: the VM is not running")
    tdir, tmem, tdisk = _template_of(vk.snapshot)
    check_budget(0, vk.kernel_id)
    paths.private_dir(dest.parent)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700)
    try:
        image = await _capture(vk, tmp, name, stop, idle_timeout, tdir, tmem, tdisk)
        trash = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.rename(dest, trash)
        os.rename(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
        image.path = dest
        return image
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DurableBudgetExceeded(f"kernel {vk.kernel_id}: disk full while saving: {exc}") from exc
        raise DurableError(f"kernel {vk.kernel_id}: cannot save its state: {exc}") from exc
    except (QMPError, TemplateError) as exc:
        raise DurableError(f"kernel {vk.kernel_id}: cannot save its state: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _capture(vk: ForkableKernel, tmp: Path, name: str, stop: bool, idle_timeout: float,
                   tdir: Path, tmem: Path, tdisk: Path) -> DurableImage:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        await vk.request("freeze", timeout=idle_timeout + 10, wait=idle_timeout)
    except AgentError as exc:
        if exc.kind == "busy":
            raise KernelBusy(f"kernel {vk.kernel_id} is busy: {exc}") from exc
        raise DurableError(f"kernel {vk.kernel_id}: {exc}") from exc
    timings["quiesce"] = time.monotonic() - t0
    vm = vk.vm
    pid = vm.pid
    size = vk.snapshot.machine.memory_mb << 20
    ok = False
    try:
        if pid is None:
            raise DurableError(f"kernel {vk.kernel_id}: the VM has no process")
        await vm.pause()
        t1 = time.monotonic()
        try:
            await vm.save_device_state(tmp / "state")
            os.link(vk.disk_path, tmp / "disk.top")
            new_disk = vk.workdir / f"disk-{uuid.uuid4().hex[:8]}.qcow2"
            await vm.snapshot_disk(new_disk)
            vk.disk_path = new_disk
            vmas = ram_vmas(pid, vk.snapshot.mem_file)
            runs = await asyncio.to_thread(dirty_runs, pid, vmas)
            check_budget(sum(r[1] for r in runs), vk.kernel_id)
            copied = await asyncio.to_thread(copy_dirty, pid, runs, tmp / DELTA, size)
            ok = True
        finally:
            if not (ok and stop):
                await vm.resume()
        timings["paused"] = time.monotonic() - t1
    finally:
        if not (ok and stop):
            try:
                await vk.request("thaw", timeout=30)
            except VMKGError as exc:
                log.error("kernel %s: thaw after a checkpoint failed: %s", vk.kernel_id, exc)
    t2 = time.monotonic()
    if os.path.realpath(vk.snapshot.mem_file) != os.path.realpath(tmem):
        copied += await asyncio.to_thread(fill_diff, vk.snapshot.mem_file, tmem, tmp / DELTA, runs, size)
    await asyncio.to_thread(flatten_disk, tmp / "disk.top", tdisk, tmp / "disk.qcow2")
    if not stop:  # the frozen layer stays in the running kernel's chain: a later fork's children read it
        share_with_jails(tmp / "disk.top")
    (tmp / "disk.top").unlink()
    timings["write"] = time.monotonic() - t2
    image = DurableImage(path=tmp, kernel_id=vk.kernel_id, name=name, created=time.time(),
                         template=tdir, delta_bytes=copied, info={"timings": timings, **net_record(vm)})
    image.save()
    log.info("kernel %s: %s saved: %.1f MB of RAM delta, %.1f MB on disk, quiesce %.0f ms, "
             "paused %.0f ms, write %.0f ms", vk.kernel_id, name, copied / 2**20,
             allocated(tmp) / 2**20, timings["quiesce"] * 1000, timings["paused"] * 1000,
             timings["write"] * 1000)
    return image


# ---------------------------------------------------------------------------
# Bringing an image back


def _prefetch(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def materialize(image: DurableImage) -> Snapshot:
    """A fork-kind snapshot to restore ``image`` from (see the module docstring); the
    caller hands it to ``VMKernel`` or holds it in ``forks.registry``."""
    tsnap = Snapshot.load(image.template)
    d = forks_dir() / uuid.uuid4().hex
    d.mkdir(mode=0o700)
    try:
        write_owner(d, kind="durable", parent_kernel=image.kernel_id)
        for f in ("state", "disk.qcow2", DELTA):
            os.link(image.path / f, d / f)
        _prefetch(d / DELTA)  # read ahead while QEMU starts (a wake long after its hibernation)
        empty_overlay(d / "disk.qcow2", d / "overlay.qcow2")
        os.chmod(d / "overlay.qcow2", 0o600)
        share_with_jails(d / "disk.qcow2")
        snap = dataclasses.replace(
            tsnap, path=d, state_file=d / "state", disk=d / "disk.qcow2", created=image.created,
            kind="fork", parent=image.kernel_id,
            info={**tsnap.info, "ancestors": [], "mem_delta": str(d / DELTA),
                  "template_dir": str(tsnap.path), "durable": image.name,
                  **{k: image.info[k] for k in ("network",) if k in image.info}})
        snap.save()
        os.chmod(d / "snapshot.json", 0o600)
    except OSError as exc:
        shutil.rmtree(d, ignore_errors=True)
        raise DurableError(f"kernel {image.kernel_id}: cannot prepare {image.name} for restore: {exc}") from exc
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return snap


# ---------------------------------------------------------------------------
# Kernels persisted across gateway restarts


@dataclass
class PersistedKernel:
    """A kernel saved for the next start: its id, kernelspec, connection info (key
    included), environment, and ``extra`` (the caller's, e.g. owner and username)."""

    kernel_id: str
    kernel_name: str
    connection: dict[str, Any]
    env: dict[str, str]
    cwd: str
    extra: dict[str, Any]

    def save(self) -> None:
        d = kernel_dir(self.kernel_id)
        _write_private(d / "kernel.json", json.dumps(dataclasses.asdict(self)))


def persisted_kernels() -> list[PersistedKernel]:
    """Every kernel with a record and a hibernated image (others are skipped, logged)."""
    root = paths.state_dir() / "durable"
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        rec = d / "kernel.json"
        if not rec.exists():
            continue
        try:
            pk = PersistedKernel(**json.loads(rec.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("kernel %s: unreadable durable record: %s", d.name, exc)
            continue
        if latest_image(pk.kernel_id) is None:
            log.warning("kernel %s: durable record without an image; not restored", pk.kernel_id)
            continue
        out.append(pk)
    return out


def forget_persisted(kernel_id: str) -> None:
    (durable_root() / kernel_id / "kernel.json").unlink(missing_ok=True)


__all__ = ["CheckpointNotFound", "DurableImage", "PersistedKernel", "capture", "materialize",
           "persisted_kernels", "list_checkpoints", "find_image", "remove_kernel"]
