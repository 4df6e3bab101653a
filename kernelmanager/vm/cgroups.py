"""One cgroup per QEMU process, in whichever hierarchy the host has.

cgroup v2 (a unified hierarchy mounted at ``/sys/fs/cgroup`` with ``cgroup.controllers``)
is used when present: ``/sys/fs/cgroup/vmkg/<name>`` with ``memory.max``, ``pids.max`` and
``cpu.max``. Otherwise cgroup v1: each controller (memory, cpu, pids) has its own mount,
and the VM gets ``<mount>/vmkg/<name>`` in each (``memory.limit_in_bytes``,
``pids.max``, ``cpu.cfs_quota_us``). A controller that is missing or not writable is
skipped with one WARNING naming it; the VM still starts.

The QEMU child joins its cgroups itself, between fork and exec, while it is still root
(it writes its pid into ``Cgroup.procs_files``), so no instruction of QEMU runs
outside its limits.

Names are ``<owner pid>-<owner start time>-<random>``: a later start reaps cgroups whose
owner process is gone (``reap``), killing what is left in them first, exactly like VM
directories (``kernelmanager.reaper``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(os.environ.get("VMKG_CGROUP_ROOT", "/sys/fs/cgroup"))
PARENT = "vmkg"
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpus: float                  # CPU quota in cores (1.0 = one full CPU)


def _v1_mounts() -> dict[str, Path]:
    """controller -> mount point of each cgroup v1 hierarchy (memory, cpu, pids)."""
    out: dict[str, Path] = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[2] == "cgroup":
                    for opt in fields[3].split(","):
                        if opt in ("memory", "cpu", "pids"):
                            out.setdefault(opt, Path(fields[1]))
    except OSError:
        pass
    return out


def hierarchy() -> tuple[str, dict[str, Path]]:
    """("v2", {"": root}) or ("v1", {controller: mount}) or ("none", {})."""
    if (ROOT / "cgroup.controllers").exists():
        return "v2", {"": ROOT}
    mounts = _v1_mounts()
    if mounts:
        return "v1", mounts
    return "none", {}


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Cgroup:
    """The cgroup directories of one VM (one per v1 controller, or one under v2)."""

    name: str
    dirs: list[Path] = field(default_factory=list)

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            try:
                out.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return sorted(out)

    def remove(self, kill: bool = True) -> None:
        """Remove the cgroup (killing what is left in it if ``kill``). Best effort."""
        _remove_dirs(self.dirs, kill)
        self.dirs = []


def _remove_dirs(dirs: list[Path], kill: bool) -> None:
    for d in dirs:
        for attempt in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if not kill:
                    break
                try:
                    pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    pids = []
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01 * min(attempt + 1, 10))
        else:
            log.warning("cgroup %s: could not be removed", d)


def _owner_tag() -> str:
    from .. import reaper
    return f"{os.getpid()}-{reaper.process_start_time(os.getpid())}"


def create(limits: Limits, label: str) -> Cgroup:
    """Make the VM's cgroup(s) with ``limits``; what the host lacks is skipped with a
    WARNING (``label`` names the VM in log lines)."""
    kind, mounts = hierarchy()
    cg = Cgroup(name=f"{_owner_tag()}-{uuid.uuid4().hex[:8]}")
    if kind == "none":
        _warn_once("none", "no cgroup hierarchy found under %s: VMs run without memory, "
                   "pids and CPU limits", ROOT)
        return cg
    try:
        if kind == "v2":
            parent = ROOT / PARENT
            parent.mkdir(exist_ok=True)
            wanted = {"memory", "pids", "cpu"}
            have = set((ROOT / "cgroup.controllers").read_text().split())
            for c in sorted(wanted - have):
                _warn_once(f"v2-{c}", "cgroup v2 controller %s is not available: VMs run without it", c)
            enable = " ".join(f"+{c}" for c in sorted(wanted & have))
            if enable:
                for d in (ROOT, parent):
                    try:
                        _write(d / "cgroup.subtree_control", enable)
                    except OSError as exc:
                        _warn_once(f"v2-subtree-{d}", "cannot enable cgroup controllers in %s: %s", d, exc)
            d = parent / cg.name
            d.mkdir()
            cg.dirs.append(d)
            _try_limit(d / "memory.max", str(limits.memory_bytes), label)
            _try_limit(d / "memory.swap.max", "0", label, quiet=True)
            _try_limit(d / "pids.max", str(limits.pids), label)
            _try_limit(d / "cpu.max", f"{int(limits.cpus * 100_000)} 100000", label)
        else:
            for c in ("memory", "pids", "cpu"):
                if c not in mounts:
                    _warn_once(f"v1-{c}", "cgroup v1 controller %s is not mounted: VMs run without it", c)
                    continue
                parent = mounts[c] / PARENT
                parent.mkdir(exist_ok=True)
                d = parent / cg.name
                d.mkdir()
                cg.dirs.append(d)
                if c == "memory":
                    _try_limit(d / "memory.limit_in_bytes", str(limits.memory_bytes), label)
                elif c == "pids":
                    _try_limit(d / "pids.max", str(limits.pids), label)
                else:
                    _try_limit(d / "cpu.cfs_period_us", "100000", label)
                    _try_limit(d / "cpu.cfs_quota_us", str(int(limits.cpus * 100_000)), label)
    except OSError as exc:
        _warn_once(f"create-{type(exc).__name__}", "%s: cannot create a cgroup (%s): VMs run "
                   "without cgroup limits", label, exc)
        cg.remove()
    return cg


def _try_limit(path: Path, value: str, label: str, quiet: bool = False) -> None:
    try:
        _write(path, value)
    except OSError as exc:
        if not quiet:
            _warn_once(f"limit-{path.name}", "%s: cannot set %s=%s: %s", label, path.name, value, exc)


def reap() -> list[str]:
    """Remove cgroups under every ``vmkg`` parent whose owner process is gone."""
    from .. import reaper
    _, mounts = hierarchy()
    reaped: list[str] = []
    for base in mounts.values():
        parent = base / PARENT
        if not parent.is_dir():
            continue
        for d in parent.iterdir():
            if not d.is_dir():
                continue
            try:
                pid_s, start_s, _ = d.name.split("-", 2)
                alive = reaper.is_alive(int(pid_s), int(start_s))
            except ValueError:
                alive = False
            if alive:
                continue
            if d.name not in reaped:
                reaped.append(d.name)
            _remove_dirs([d], kill=True)
    if reaped:
        log.info("reaped %d cgroups left by dead owners", len(reaped))
    return reaped
