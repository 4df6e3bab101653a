"""The jail every QEMU runs in (what Firecracker's jailer does, for QEMU).

Threat model: code in a kernel is hostile and may be root in its guest. Under TCG,
QEMU's own security policy promises no isolation, so a guest that finds a QEMU bug
runs code as the QEMU process. The jail is what that code then holds:

* **A uid of its own.** ``uid_base + <QEMU's pid>`` (pids are unique among live
  processes, so two live QEMUs never share a uid and cannot signal or ptrace each
  other), never root, with the one supplementary group ``gid`` (= ``uid_base``) that
  lets it read the frozen fork disks and RAM images its mount namespace shows it.
* **No privileges.** The capability bounding set is emptied before the uid change, so
  CapEff/CapPrm/CapBnd/CapAmb are all 0; ``PR_SET_NO_NEW_PRIVS``; QEMU's own seccomp
  filter (``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
  resourcecontrol=deny``).
* **Its own mount namespace.** ``unshare(CLONE_NEWNS)``, a 1 MB tmpfs as the new root
  (``pivot_root``, the old root detached, the tmpfs remounted read-only), holding
  only: the QEMU binary, the system libraries and firmware (``/usr/lib*``,
  ``/usr/share/qemu``, ``/usr/share/seabios``), ``/dev/null``, ``/dev/zero``,
  ``/dev/urandom``, ``/dev/random`` (``/dev/kvm`` under KVM), the guest kernel and
  initrd, the RAM image and every file of the disk's backing chain (read-only bind
  mounts at their host paths, so the absolute backing names in qcow2 headers
  resolve), and its VM directory. The VM directory is root-owned ``0710`` (QEMU may
  open what is in it, not create, rename or delete), and only the files QEMU must
  write (its overlay; a state file the host creates for it) are chowned to its uid. So
  nothing the host later trusts (``owner.json``, the reaper's input) is writable by it.
* **A cgroup** (``cgroups.py``): memory = the template's memory + ``mem_overhead_mb``,
  a pids limit, a CPU quota. **rlimits**: ``RLIMIT_FSIZE`` (the disk cap: no file QEMU
  writes grows past it; SIGXFSZ is ignored so the write fails as an I/O error in the
  guest instead of killing the VM), ``RLIMIT_NOFILE``, no core dumps.
* **It dies with its owner**: ``PR_SET_PDEATHSIG`` is set *after* the uid change
  (changing credentials clears it), then the parent is checked still to be there.
* **A minimal environment**: nothing of the gateway's (tokens) is inherited.

The RAM image is the one subtle part: QEMU 7.2 opens a ``memory-backend-file`` O_RDWR
even with ``share=off``, and a writable descriptor on a file every VM maps
copy-on-write would let one QEMU rewrite the memory of all the others. A tiny
LD_PRELOAD shim (``ro_open.c``, built on first use with the host's C compiler)
opens exactly that path O_RDONLY instead; the private mapping stays writable.

Where the host lacks something the jail degrades with one WARNING rather than
failing: not root (no uid change, namespaces or cgroups), no C compiler (no shim:
then the whole jail is off, because the alternative is a writable shared RAM image),
a missing cgroup controller. ``VMKG_JAIL=0`` turns it off (developers); it is on by
default. Settings are environment variables, read at each VM start (see
``JailSettings.from_env``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..net.slots import enter_netns
from . import cgroups

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.signal.restype = ctypes.c_void_p

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_pivot_root = 155  # x86_64
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_THP_DISABLE = 1, 24, 38, 41
SIG_IGN = 1

JAIL_ROOT = Path(os.environ.get("VMKG_JAIL_ROOT", "/run/vmkg-jail"))
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SYSTEM_RO = ("/usr/lib", "/usr/lib64", "/usr/share/qemu", "/usr/share/seabios", "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_warned: set[str] = set()


def warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        warn_once(f"env-{name}", "%s=%r is not an integer; using %s", name, raw, default)
        return default


@dataclass(frozen=True)
class JailSettings:
    """How each QEMU is contained. Every field is an environment variable."""

    enabled: bool = True          # $VMKG_JAIL (0 turns the jail off: developers only)
    uid_base: int = 1_000_000_000  # $VMKG_JAIL_UID_BASE: QEMU runs as uid_base + its pid; gid = uid_base
    mem_overhead_mb: int = 384    # $VMKG_JAIL_MEM_OVERHEAD_MB: cgroup memory = VM memory + this
    cpus: float = 0.0             # $VMKG_JAIL_CPUS: CPU quota in cores per VM; 0 = one per vCPU
    pids: int = 256               # $VMKG_JAIL_PIDS: threads QEMU may have
    nofile: int = 1024            # $VMKG_JAIL_NOFILE: open files QEMU may have
    disk_cap_mb: int = 0          # $VMKG_DISK_CAP_MB: RLIMIT_FSIZE; 0 = disk's virtual size + 10% + 64 MB
    log_cap: int = 1 << 20        # $VMKG_LOG_CAP_BYTES: console / QEMU stderr log size (each)

    @property
    def gid(self) -> int:
        return self.uid_base

    @classmethod
    def from_env(cls) -> JailSettings:
        d = cls()
        raw_cpus = os.environ.get("VMKG_JAIL_CPUS", "").strip()
        try:
            cpus = float(raw_cpus) if raw_cpus else d.cpus
        except ValueError:
            cpus = d.cpus
        return cls(
            enabled=os.environ.get("VMKG_JAIL", "1").strip().lower() not in ("0", "false", "no", "off"),
            uid_base=_env_int("VMKG_JAIL_UID_BASE", d.uid_base),
            mem_overhead_mb=_env_int("VMKG_JAIL_MEM_OVERHEAD_MB", d.mem_overhead_mb),
            cpus=cpus,
            pids=_env_int("VMKG_JAIL_PIDS", d.pids),
            nofile=_env_int("VMKG_JAIL_NOFILE", d.nofile),
            disk_cap_mb=_env_int("VMKG_DISK_CAP_MB", d.disk_cap_mb),
            log_cap=max(4096, _env_int("VMKG_LOG_CAP_BYTES", d.log_cap)),
        )


def jail_gid() -> int | None:
    """The group jailed QEMUs run in (files they must read are group-readable by it),
    or None when the jail is off."""
    s = JailSettings.from_env()
    return s.gid if s.enabled and os.geteuid() == 0 else None


def share_with_jails(path: Path, mode: int = 0o640) -> None:
    """Make a root-owned file readable by jailed QEMUs only (group = the jail gid)."""
    gid = jail_gid()
    if gid is not None:
        os.chown(path, 0, gid)
        os.chmod(path, mode)
    else:
        os.chmod(path, 0o600)


# ---------------------------------------------------------------------------
# The read-only-open shim


def shim_path() -> Path | None:
    """The built LD_PRELOAD shim (building it on first use), or None if it cannot be."""
    from .. import paths
    src = Path(__file__).with_name("ro_open.c")
    try:
        code = src.read_bytes()
    except OSError as exc:
        warn_once("shim-src", "jail: %s is missing (%s)", src, exc)
        return None
    out = paths.cache_dir() / "jail" / f"ro_open-{hashlib.sha256(code).hexdigest()[:12]}.so"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warn_once("shim-cc", "jail: no C compiler (apt-get install gcc libc6-dev) to build the "
                  "read-only RAM shim; QEMU runs UNJAILED")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warn_once("shim-build", "jail: cannot build the read-only RAM shim (%s); QEMU runs UNJAILED", detail)
        tmp.unlink(missing_ok=True)
        return None
    return out


# ---------------------------------------------------------------------------
# qcow2 backing chains


def backing_chain(disk: Path, limit: int = 256) -> list[Path]:
    """Every file a qcow2 image backs onto, transitively (not ``disk`` itself)."""
    out: list[Path] = []
    cur = disk
    for _ in range(limit):
        try:
            with open(cur, "rb") as f:
                hdr = f.read(20)
                if len(hdr) < 20 or hdr[:4] != b"QFI\xfb":
                    return out
                off = int.from_bytes(hdr[8:16], "big")
                size = int.from_bytes(hdr[16:20], "big")
                if not off or not size or size > 1023:
                    return out
                f.seek(off)
                name = f.read(size).decode()
        except (OSError, UnicodeDecodeError):
            return out
        nxt = Path(name) if name.startswith("/") else cur.parent / name
        out.append(nxt)
        cur = nxt
    return out


def virtual_size(disk: Path) -> int | None:
    """A qcow2 image's virtual size from its header (None if not qcow2)."""
    try:
        with open(disk, "rb") as f:
            hdr = f.read(32)
    except OSError:
        return None
    if len(hdr) < 32 or hdr[:4] != b"QFI\xfb":
        return None
    return int.from_bytes(hdr[24:32], "big")


# ---------------------------------------------------------------------------
# The jail of one QEMU process


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


class Jail:
    """Everything one QEMU's jail needs, prepared in the parent; ``preexec`` applies it
    in the child between fork and exec. ``uid`` is known once the child exists."""

    def __init__(self, settings: JailSettings, label: str, *, binary: str,
                 ro: Sequence[Path], rw_dirs: Sequence[Path], owned: Sequence[Path],
                 ro_open: Path | None, shim: Path, limits: cgroups.Limits, fsize: int,
                 devices: Sequence[str] = DEVICES, netns: str = "") -> None:
        self.settings = settings
        self.netns = netns  # a networked VM's slot (kernelmanager.net.slots): QEMU runs inside it
        self.label = label
        self.binary = binary
        self.owned = [str(p) for p in owned]
        self.rw_dirs = [str(p) for p in rw_dirs]
        self.fsize = fsize
        self.shim = shim
        self.ro_open = ro_open
        self.limits = limits
        binds: list[tuple[str, bool, bool]] = []  # (path, read-only, device)
        seen: set[str] = set()

        def add(p: str, ro_: bool, dev: bool = False) -> None:
            p = os.path.normpath(p)
            if p not in seen and os.path.exists(p):
                seen.add(p)
                binds.append((p, ro_, dev))

        for p in (binary, os.path.realpath(binary), *SYSTEM_RO, str(shim), *(str(x) for x in ro)):
            add(p, True)
        for d in devices:
            add(d, False, True)
        for d in self.rw_dirs:
            add(d, False)
        for f in self.owned:
            if not any(f.startswith(d + "/") for d in self.rw_dirs):
                add(f, False)
        self.binds = binds
        self.links = [(p, os.readlink(p)) for p in ("/lib", "/lib64", "/bin", "/sbin") if os.path.islink(p)]
        try:
            self.last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        except (OSError, ValueError):
            self.last_cap = 63
        # a device QEMU opens (/dev/kvm: root:kvm 0660) is reached through its group
        self.groups = sorted({settings.gid, *(os.stat(d).st_gid for d in devices
                                              if d == "/dev/kvm" and os.path.exists(d))})
        self.parent_pid = os.getpid()
        self.uid: int | None = None
        JAIL_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cgroup = cgroups.create(limits, label)  # last: nothing after it can fail
        self.procs_files = self.cgroup.procs_files

    def uid_for(self, pid: int) -> int:
        return self.settings.uid_base + pid

    def env(self) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(self.shim)}
        if self.ro_open is not None:
            env["VMKG_RO_OPEN"] = str(self.ro_open)
        return env

    def started(self, pid: int) -> None:
        self.uid = self.uid_for(pid)

    def give(self, path: Path) -> None:
        """Hand a file the host made to the jailed QEMU (it may then write it)."""
        assert self.uid is not None
        os.chown(path, self.uid, self.settings.gid)
        os.chmod(path, 0o600)

    def take_back(self, path: Path, mode: int = 0o600) -> None:
        """Make a file QEMU wrote root's again (QEMU can no longer change it)."""
        os.chown(path, 0, self.settings.gid if mode & 0o040 else 0)
        os.chmod(path, mode)

    def close(self) -> None:
        self.cgroup.remove()

    # -- in the child, between fork and exec ------------------------------------------

    def preexec(self) -> None:
        try:
            self._preexec()
        except BaseException as exc:  # noqa: BLE001 - report on QEMU's stderr and die
            try:
                os.write(2, f"vmkg jail: {exc}\n".encode(errors="replace"))
            finally:
                os._exit(126)

    def _preexec(self) -> None:
        pid = os.getpid()
        uid, gid = self.uid_for(pid), self.settings.gid
        if self.netns:  # while /run/netns is still visible and we still may
            enter_netns(self.netns)
        for f in self.procs_files:
            with open(f, "w") as fh:
                fh.write(str(pid))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize, self.fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _libc.signal(signal.SIGXFSZ, SIG_IGN)  # a write past the cap fails (EFBIG), QEMU lives
        for d in self.rw_dirs:
            os.chown(d, 0, gid)
            os.chmod(d, 0o710)
        for f in self.owned:
            os.chown(f, uid, gid)
            os.chmod(f, 0o600)

        root = str(JAIL_ROOT)
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        _check(_libc.mount(b"vmkg-jail", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                           b"size=1m,nr_inodes=4096,mode=0755"), "mount tmpfs")
        for path, ro, dev in self.binds:
            target = root + path
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if stat.S_ISDIR(os.stat(path).st_mode):
                os.makedirs(target, exist_ok=True)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
            _check(_libc.mount(path.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
            flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if dev else MS_NODEV) | (MS_RDONLY if ro else 0)
            _check(_libc.mount(None, target.encode(), None, flags, None), f"remount {path}")
        for link, dest in self.links:
            if not os.path.lexists(root + link):
                os.symlink(dest, root + link)
        os.mkdir(root + "/.old")
        _check(_libc.syscall(SYS_pivot_root, root.encode(), (root + "/.old").encode()), "pivot_root")
        os.chdir("/")
        _check(_libc.umount2(b"/.old", MNT_DETACH), "umount old root")
        os.rmdir("/.old")
        _check(_libc.mount(None, b"/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
               "remount / read-only")

        for cap in range(self.last_cap + 1):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                _check(-1, f"drop capability {cap}")
        os.setgroups(self.groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # after the uid change, which clears it; then make sure the owner did not die first
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        if os.getppid() != self.parent_pid:
            os._exit(1)
        _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        # last: until exec closes them this child holds every fd of its parent, and a gateway
        # with many kernels (relay sockets) holds more than nofile, so no open would succeed
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.settings.nofile, self.settings.nofile))
