"""The guest's NIC, for templates baked with one (``network: true``).

The host puts ``vmkg.net=ADDRESS/PREFIX,GATEWAY`` on the kernel command line of such a
template; at boot (PID 1, before the agent serves) this gives the first non-loopback
interface that address, a default route through the gateway, and points
``/etc/resolv.conf`` at the gateway, where the host runs the slot's DNS resolver. The
address is the same in every VM (the host's slot does the rest), so a restored snapshot
or a fork keeps it without any re-addressing. It also makes the kernel user's
site-packages directory, so a ``%pip install`` imports at once. Standard library only
(ioctls, no iproute2).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

SIOCSIFFLAGS, SIOCGIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = 0x8914, 0x8913, 0x8916, 0x891C, 0x890B
IFF_UP, RTF_UP, RTF_GATEWAY = 0x1, 0x1, 0x2


def _sockaddr(ip: str) -> bytes:
    return struct.pack("H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(ip))


def parse_cmdline(cmdline: str) -> tuple[str, int, str] | None:
    """``(address, prefix, gateway)`` from ``vmkg.net=``, or None."""
    for arg in cmdline.split():
        if arg.startswith("vmkg.net="):
            addr, _, gw = arg[len("vmkg.net="):].partition(",")
            ip, _, prefix = addr.partition("/")
            socket.inet_aton(ip)
            socket.inet_aton(gw)
            return ip, int(prefix or 24), gw
    return None


def _interface() -> str | None:
    try:
        names = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    except OSError:
        return None
    return names[0] if names else None


def configure(ip: str, prefix: int, gateway: str, ifname: str) -> None:
    name = ifname.encode()
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s, SIOCSIFADDR, struct.pack("16s", name) + _sockaddr(ip))
        fcntl.ioctl(s, SIOCSIFNETMASK, struct.pack("16s", name) + _sockaddr(mask))
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", name, 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name, flags | IFF_UP))
        # struct rtentry (x86_64): default route through the gateway
        rt = struct.pack("Q16s16s16sHhQPhPQQH6x", 0, _sockaddr("0.0.0.0"), _sockaddr(gateway),
                         _sockaddr("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
        fcntl.ioctl(s, SIOCADDRT, rt)
    finally:
        s.close()
    if os.path.islink("/etc/resolv.conf"):
        os.unlink("/etc/resolv.conf")
    with open("/etc/resolv.conf", "w") as f:
        f.write(f"nameserver {gateway}\noptions timeout:2 attempts:2\n")


def configure_from_cmdline(log: object = None) -> str | None:
    """Configure the NIC if the command line asks for it; returns what was done."""
    try:
        with open("/proc/cmdline") as f:
            want = parse_cmdline(f.read())
    except (OSError, ValueError) as exc:
        return f"network: bad vmkg.net= ({exc})"
    if want is None:
        return None
    ifname = _interface()
    if ifname is None:
        return "network: vmkg.net= given but there is no network interface"
    try:
        configure(*want, ifname)
    except OSError as exc:
        return f"network: cannot configure {ifname}: {exc}"
    _user_site()
    return f"network: {ifname} {want[0]}/{want[1]} via {want[2]}"


def _user_site(uid: int = 1000, home: str = "/home/jovyan") -> None:
    """Make the kernel user's site-packages exist before the kernel starts, so what
    ``%pip install`` puts there (a user install) imports without a restart."""
    import sys
    rel = [".local", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages"]
    path = home
    try:
        for part in rel:
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path, 0o755)
                os.chown(path, uid, uid)
    except OSError:
        pass
