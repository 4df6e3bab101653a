"""Snapshots (immutable records of a warm VM) and templates (named, baked snapshots).

A ``Snapshot`` is everything a restore needs: a RAM image (mapped copy-on-write by
every restore), the device state, a qcow2 disk the restore's overlay backs onto, and
the machine spec that must match. It is a frozen record; operations return new ones.

A template is the snapshot of a VM that cold-booted a guest image and waited until
ipykernel answered (``bake_template``). Templates live in ``<cache>/templates/<id>/``,
keyed by a hash of everything that shapes them (image, QEMU version, protocol
version, machine spec, preloads), so a changed recipe bakes a new one and an
unchanged one is reused across runs.

A bake that fails raises ``TemplateError`` with the reason (the agent's or QEMU's
error, a QMP command QEMU refused, an OS error writing the template), ``from`` the
original, keeps the guest console and QEMU log under ``templates/logs`` and leaves no
partial template behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guest.protocol import PROTOCOL_VERSION

from . import paths
from .channel import AgentChannel, UnixSocketTransport
from .exceptions import AgentError, ChannelError, TemplateError, TemplateIncompatible, VMError
from .image import GuestImage
from .vm.qemu import MachineSpec, QemuVM, qemu_version
from .vm.qmp import QMPError

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class Snapshot:
    path: Path
    mem_file: Path
    state_file: Path
    disk: Path                       # the qcow2 a restore's overlay backs onto
    machine: MachineSpec
    qemu_version: str
    protocol_version: int
    image_id: str
    created: float
    kind: str = "template"           # "template" or "fork"
    parent: str | None = None        # the kernel a fork was taken from
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def check_restorable(self, current_qemu: str, accel: str) -> None:
        """Refuse, with a clear message, a snapshot this host cannot restore."""
        if self.protocol_version != PROTOCOL_VERSION:
            raise TemplateIncompatible(
                f"snapshot {self.path.name} was made by guest agent protocol {self.protocol_version}, "
                f"this vmkg speaks {PROTOCOL_VERSION}: bake it again (vmkg template bake)")
        if self.qemu_version != current_qemu:
            raise TemplateIncompatible(
                f"snapshot {self.path.name} was made by QEMU {self.qemu_version}, this host has "
                f"QEMU {current_qemu}; snapshots don't load across QEMU versions: bake it again")
        if self.machine.accel != accel:
            raise TemplateIncompatible(
                f"snapshot {self.path.name} was made under {self.machine.accel}, this host runs "
                f"{accel}; bake a template for {accel}")
        for f in (self.mem_file, self.state_file, self.disk):
            if not f.exists():
                raise TemplateError(f"snapshot {self.path.name} is incomplete: {f.name} is missing")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("path", "mem_file", "state_file", "disk"):
            d[k] = str(d[k])
        return {"format": SNAPSHOT_FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Snapshot:
        if d.get("format") != SNAPSHOT_FORMAT:
            raise TemplateIncompatible(f"snapshot record format {d.get('format')} is not {SNAPSHOT_FORMAT}")
        d = {k: v for k, v in d.items() if k != "format"}
        for k in ("path", "mem_file", "state_file", "disk"):
            d[k] = Path(d[k])
        d["machine"] = MachineSpec(**d["machine"])
        return cls(**d)

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        try:
            return cls.from_json(json.loads((path / "snapshot.json").read_text()))
        except FileNotFoundError as exc:
            raise TemplateError(f"no snapshot at {path}") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise TemplateError(f"unreadable snapshot record in {path}: {exc}") from exc

    def save(self) -> None:
        tmp = self.path / "snapshot.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, self.path / "snapshot.json")


def template_id(image: GuestImage, machine: MachineSpec, qemu: str, preload: tuple[str, ...],
                warmup: tuple[str, ...] = (), lean_output: bool = True) -> str:
    extra: dict[str, Any] = {"warmup": list(warmup)} if warmup else {}  # none: the same id as before
    if not lean_output:
        extra["plain_output"] = True
    key = json.dumps({**extra,
        "image": image.id, "qemu": qemu, "protocol": PROTOCOL_VERSION,
        "memory": machine.memory_mb, "vcpus": machine.vcpus, "accel": machine.accel, "cpu": machine.cpu(),
        "cmdline": machine.cmdline, "preload": list(preload), "format": SNAPSHOT_FORMAT,
    }, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def qemu_img(*args: str) -> None:
    try:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise TemplateError("qemu-img not found: apt-get install qemu-utils") from exc
    except subprocess.CalledProcessError as exc:
        raise TemplateError(f"qemu-img {' '.join(args)} failed: {exc.stderr.strip()}") from exc


def empty_overlay(backing: Path, dest: Path, backing_format: str = "qcow2") -> None:
    """A qcow2 overlay over ``backing`` (absolute path; the backing is not opened)."""
    qemu_img("create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing), "-u",
             "-o", "cluster_size=65536,lazy_refcounts=on", str(dest), f"{_virtual_size(backing)}")


def _virtual_size(path: Path) -> int:
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                             check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise TemplateError(f"cannot read disk image {path}: {exc.stderr.strip()}") from exc
    return int(json.loads(out)["virtual-size"])


def find_template(template_id_: str) -> Snapshot | None:
    path = paths.templates_dir() / template_id_
    if (path / "snapshot.json").exists():
        return Snapshot.load(path)
    return None


async def bake_template(image: GuestImage, machine: MachineSpec, *, preload: tuple[str, ...] = (),
                        warmup: tuple[str, ...] = (), lean_output: bool = True, name: str | None = None,
                        boot_timeout: float = 600.0, progress: Any = None) -> Snapshot:
    """Cold-boot ``image``, wait for a warm ipykernel, import ``preload``, run the ``warmup``
    cells, install ``guest.outstream`` unless ``lean_output`` is off, and snapshot it as a
    template (``name`` is for error messages).

    Returns the cached template when one with the same recipe exists. Concurrent bakes
    of one recipe serialize on a lock file; a failed bake leaves nothing behind. A
    warm-up cell that fails raises ``TemplateError`` naming the template and the cell.
    """
    qemu = await asyncio.to_thread(qemu_version)
    tid = template_id(image, machine, qemu, preload, warmup, lean_output)
    root = paths.templates_dir()
    final = root / tid
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / f"{tid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TemplateError(f"template {tid}: cannot write the template cache {root}: {exc}") from exc
    try:
        await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        if (final / "snapshot.json").exists():
            return Snapshot.load(final)
        tmp = root / f".tmp-{tid}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            snap = await _bake(image, machine, preload, warmup, name or tid, qemu, tmp, final,
                               boot_timeout, progress, lean_output)
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TemplateError(f"template {tid}: bake failed: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            # the clone overlay must name the final path of the template disk
            empty_overlay(final / "disk.qcow2", final / "overlay.qcow2")
            snap.save()
        except (OSError, TemplateError) as exc:
            shutil.rmtree(final, ignore_errors=True)
            raise TemplateError(f"template {tid}: bake failed: {exc}") from exc
        return snap
    finally:
        os.close(lock_fd)


def _keep_evidence(vm: QemuVM, tid: str) -> None:
    """Copy the guest console and QEMU's stderr of a failed bake where people can read them."""
    logs = paths.templates_dir() / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        for src in (vm.console_log, vm.stderr_log):
            if src.exists():
                shutil.copyfile(src, logs / f"{tid}.{src.name}")
    except OSError as exc:  # the bake's own error matters more
        log.error("template %s: bake failed; its logs could not be kept: %s", tid, exc)
        return
    log.error("template %s: bake failed; guest console and QEMU log kept in %s", tid, logs)


def _say(progress: Any, msg: str) -> None:
    log.info("%s", msg)
    if progress:
        progress(msg)


def warmup_failure(name: str, warmup: tuple[str, ...], exc: AgentError) -> TemplateError:
    """The bake error for a failed warm-up cell: the template, the cell, the exception."""
    msg = str(exc)
    cell = ""
    try:  # the agent says "warm-up cell <i> of <n> failed: ..."
        i = int(msg.split("warm-up cell ", 1)[1].split()[0])
        lines = [ln for ln in warmup[i - 1].splitlines() if ln.strip() and not ln.startswith("#")]
        cell = f" (cell begins {lines[0][:80]!r})" if lines else ""
    except (IndexError, ValueError):
        pass
    return TemplateError(f"template {name!r}: {msg}{cell}; fix the template's warmup cells or "
                         f"opt out with \"warmup\": [] in its catalog entry ($VMKG_TEMPLATES)")


async def _bake(image: GuestImage, machine: MachineSpec, preload: tuple[str, ...],
                warmup: tuple[str, ...], name: str, qemu: str, tmp: Path, final: Path,
                boot_timeout: float, progress: Any, lean_output: bool = True) -> Snapshot:
    machine = dataclasses.replace(machine, kernel=str(image.kernel), initrd=str(image.initrd))
    empty_overlay(image.rootfs, tmp / "disk.qcow2", backing_format="raw")
    vm = QemuVM(tmp / "vm", machine)
    t0 = time.monotonic()
    _say(progress, f"template: cold-booting image {image.id} under {machine.accel} "
                   f"({machine.memory_mb} MB, {machine.vcpus} vCPU)")
    await vm.boot(mem_file=tmp / "mem", disk=tmp / "disk.qcow2")
    channel = AgentChannel(UnixSocketTransport(vm.agent_socket), uuid.uuid4().hex, name="bake",
                           on_jupyter=lambda c, p: None, on_event=lambda e: None)
    try:
        waiter = asyncio.ensure_future(vm.wait())
        connect = asyncio.ensure_future(channel.connect(timeout=boot_timeout))
        done, _ = await asyncio.wait({waiter, connect}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            connect.cancel()
            raise VMError(f"the guest stopped while booting (exit {vm.returncode}): {vm.failure_detail()}")
        waiter.cancel()
        connect.result()
        _say(progress, f"template: agent up after {time.monotonic() - t0:.1f} s, waiting for ipykernel")
        extra = {"warmup": list(warmup)} if warmup else {}
        # the agent allows each step (ipykernel up, the preloads, each warm-up cell) up to
        # boot_timeout; on a loaded host under TCG the whole can take many minutes
        steps = 2 + len(warmup)
        try:
            info = await channel.request("ready", timeout=boot_timeout * steps + 5, preload=list(preload),
                                         wait=boot_timeout, lean_output=lean_output, **extra)
        except AgentError as exc:
            if exc.kind != "warmup":
                raise
            raise warmup_failure(name, warmup, exc) from exc
        _say(progress, f"template: kernel warm after {time.monotonic() - t0:.1f} s; snapshotting")
        await channel.request("sync", timeout=60)
        await vm.pause()
        await vm.save_device_state(tmp / "state")
    except (ChannelError, AgentError, QMPError, OSError) as exc:  # OSError: QEMU gone mid-QMP too
        _keep_evidence(vm, final.name)
        raise TemplateError(f"bake failed: {exc}; {vm.failure_detail()}") from exc
    except BaseException:
        _keep_evidence(vm, final.name)
        raise
    finally:
        await channel.close()
        await vm.close()
    shutil.rmtree(tmp / "vm", ignore_errors=True)
    _say(progress, f"template: baked in {time.monotonic() - t0:.1f} s")
    return Snapshot(
        path=final, mem_file=final / "mem", state_file=final / "state", disk=final / "disk.qcow2",
        machine=machine, qemu_version=qemu, protocol_version=PROTOCOL_VERSION, image_id=image.id,
        created=time.time(), kind="template", info={**(info or {}), "preload": list(preload), "warmup_cells": len(warmup)},
    )
