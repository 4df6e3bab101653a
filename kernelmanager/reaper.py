"""Reaping what a crashed owner left behind.

Every VM directory (and every fork snapshot directory) holds ``owner.json``: the owner's pid and start time, QEMU's pid and
start time, and the connection file written for the kernel (whose ipc socket files, when
the relay bound ipc, are removed with it). QEMU runs with
PR_SET_PDEATHSIG, so it normally dies with its owner, but the directory, its sockets
and the connection file stay. At the next start of any runtime, directories whose
owner is gone are reaped: a still-running QEMU of theirs is killed (after checking
pid *and* start time, so a recycled pid is never hit) and everything is removed.
Each jailed QEMU's cgroup is named after its owner's pid and start time; cgroups of
dead owners are reaped at the same time (``kernelmanager.vm.cgroups.reap``), killing
anything still in them, and so are their network namespace slots (named after the owner
the same way: ``kernelmanager.net.slots.reap``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it doesn't exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and start is not None and process_start_time(pid) == start  # type: ignore[arg-type]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _reap_ipc_sockets(connection_file: str | None) -> None:
    """Remove the ipc socket files a dead kernel's relay bound (named by its connection
    file; only ever inside the state directory's ``ipc`` directory)."""
    if not connection_file:
        return
    try:
        info = json.loads(Path(connection_file).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(info, dict) or info.get("transport") != "ipc":
        return
    from .paths import state_dir
    ipc_dir = os.path.realpath(state_dir() / "ipc")
    base = str(info.get("ip", ""))
    if os.path.dirname(os.path.realpath(base)) != ipc_dir:
        return
    for key in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        port = info.get(key)
        if isinstance(port, int):
            try:
                os.unlink(f"{base}-{port}")
            except OSError:
                pass


def reap_orphans(vms_dir: Path, min_age: float = 30.0) -> list[str]:
    """Remove VM directories whose owner process is gone. Returns the names reaped.

    Directories without ``owner.json`` are removed once older than ``min_age`` seconds
    (a start that died before writing it).
    """
    reaped: list[str] = []
    try:
        from .vm import cgroups
        cgroups.reap()
    except OSError as exc:
        log.warning("cannot reap cgroups: %s", exc)
    try:
        from .net import slots
        slots.reap()
    except OSError as exc:
        log.warning("cannot reap network slots: %s", exc)
    if not vms_dir.is_dir():
        return reaped
    for d in vms_dir.iterdir():
        if not d.is_dir():
            continue
        try:
            info = json.loads((d / "owner.json").read_text())
        except FileNotFoundError:
            try:
                if time.time() - d.stat().st_mtime < min_age:
                    continue
            except FileNotFoundError:
                continue
            info = {}
        except (OSError, ValueError):
            info = {}
        if info and is_alive(info.get("owner_pid"), info.get("owner_start")):
            continue
        qpid, qstart = info.get("qemu_pid"), info.get("qemu_start")
        if is_alive(qpid, qstart):
            log.warning("vm %s: killing QEMU %s left by dead owner %s", d.name, qpid, info.get("owner_pid"))
            try:
                os.kill(qpid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap_ipc_sockets(info.get("connection_file"))
        for leftover in (info.get("connection_file"), _read(d / "mem.path")):
            if leftover:  # a kernel's connection file; a fork's RAM image on tmpfs
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d.name)
    if reaped:
        log.info("reaped %d VM directories left by dead owners", len(reaped))
    return reaped
