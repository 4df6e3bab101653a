"""PID 1 duties inside the guest: mounts, loopback, quieter kernel timers.

Only the standard library: it runs on the guest's Python before anything else.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)


def log(msg: str, *args: object) -> None:
    print("vmkg-agent: " + (msg % args if args else msg), file=sys.stderr, flush=True)



def _mount(src: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target):
        return
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        log("mount %s on %s failed: %s", fstype, target, os.strerror(err))


def _loopback_up() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))  # SIOCSIFFLAGS, IFF_UP
    finally:
        s.close()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        log("cannot write %s: %s", path, exc)


def init_system() -> None:
    """Mounts and settings an init would do. Only when we are PID 1."""
    MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    _mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    try:
        _loopback_up()
    except OSError as exc:
        log("loopback: %s", exc)
    socket.sethostname("vmkg")
    from guest.net import configure_from_cmdline  # a NIC, for templates baked with one
    if (done := configure_from_cmdline()) is not None:
        log("%s", done)
    # fewer periodic wake-ups: under emulation every guest timer costs host CPU
    _write("/proc/sys/vm/dirty_writeback_centisecs", "3000")
    _write("/proc/sys/vm/stat_interval", "60")
    _write("/proc/sys/kernel/printk", "3 4 1 3")
