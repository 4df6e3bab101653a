"""Network namespace slots: one per networked VM, prepared ahead in a small pool.

A slot is a network namespace ``vmkg-<n>-<owner pid>-<owner start>`` (``/run/netns``):

* a veth pair: ``vkh<n>`` on the host with ``U+1/30`` and ``up0`` in the slot with
  ``U+2/30``, where ``U`` is the n-th /30 of ``$VMKG_NET_UPLINK_CIDR`` (default
  10.213.0.0/16), the slot's default route through it;
* ``tap0`` with the gateway address ``policy.GUEST_GATEWAY`` and a fixed MAC (so a guest
  restored from a snapshot finds its gateway's MAC in its ARP cache unchanged); the host
  opens it inside the namespace and hands the fd to QEMU, which itself runs inside the
  namespace (``jail.py``), so even a QEMU taken over by its guest is behind the slot's
  firewall (its output chain allows only traffic to the guest);
* the nftables table of ``nft.py``, deny-all until the kernel's policy is applied;
* the DNS resolver (``dns.py``) on the gateway address.

Slots are never reused: a kernel's slot is destroyed with it (removing the namespace
removes both veth ends, the tap and every rule) and the pool refills in a worker
thread, so a networked create only takes a prepared slot, applies its policy and
opens the tap (a few milliseconds). The owner's pid and start time in the name let
``reap()`` remove the slots of a dead owner (called by ``kernelmanager.reaper``).
Indexes are allocated under an flock, so several vmkg processes share the range.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..exceptions import ConfigError, VMStartError
from . import nft
from .policy import GUEST_GATEWAY, GUEST_PREFIX, NetSettings, Policy, forbidden_networks

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
PREFIX = "vmkg-"
LOCK = Path("/run/vmkg-net.lock")
TAP_MAC = "52:54:00:76:6d:fe"
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
MAX_SLOTS = 16384

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
_host_ready: set[str] = set()
_host_lock = threading.Lock()
_denied_gone: dict[str, int] = {}  # template -> connections refused in slots since destroyed
_totals_lock = threading.Lock()


def _owner_tag() -> str:
    from ..reaper import process_start_time
    return f"{os.getpid()}-{process_start_time(os.getpid())}"


def enter_netns(name: str) -> None:
    """Move the calling thread (a child before exec: the whole process) into ``name``."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {name}: {os.strerror(e)}")
    finally:
        os.close(fd)


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has entered namespace ``name`` (setns is per
    thread; the thread ends with it, the caller's namespace is untouched). ``name`` None:
    the caller's namespace, still in a fresh thread (pyroute2's synchronous API refuses
    to run in a thread whose event loop is running: the gateway's, at its start)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            if name is not None:
                enter_netns(name)
            box["r"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["e"] = exc

    t = threading.Thread(target=run, name=f"netns-{name}")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["r"]


def nft_run(netns: str | None, script: str, timeout: float = 10.0) -> str:
    cmd = ["nft", "-f", "-"] if netns is None else ["ip", "netns", "exec", netns, "nft", "-f", "-"]
    try:
        r = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ConfigError("nft not found: apt-get install nftables (networked templates need it)") from exc
    if r.returncode != 0:
        raise VMStartError(f"nft in {netns or 'host'} failed: {r.stderr.strip()[:2000]}")
    return r.stdout


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()[:500]}")


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def _ensure_sysctl(path: str, value: str, *, required: bool) -> None:
    """Set a sysctl of the current network namespace unless it already has ``value``
    (a new namespace inherits IPv4 forwarding from the host's initial one, so a container
    whose /proc/sys is read-only - Kubernetes - still works when the node forwards).
    ``required``: a value that cannot be set is an error naming what to do; otherwise a
    warning (defence in depth the slot's rules already give)."""
    try:
        if Path(f"/proc/sys/{path}").read_text().strip() == value:
            return
        _sysctl(path, value)
    except OSError as exc:
        if required:
            raise VMStartError(f"network: cannot set {path.replace('/', '.')}={value} in a slot's "
                               f"namespace ({exc}); enable it on the host (a container: in its "
                               "namespace or the node's, e.g. a pod sysctl)") from exc
        log.warning("network: cannot set %s=%s in a slot's namespace (%s); the slot's rules "
                    "drop that traffic anyway", path.replace("/", "."), value, exc)


def host_setup(settings: NetSettings) -> None:
    """Once per process: forwarding on, the host table (idempotent, shared)."""
    with _host_lock:
        if settings.uplink in _host_ready:
            return
        try:
            if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
                log.warning("network: enabling IPv4 forwarding on the host (networked kernels "
                            "reach the outside through NAT on this host)")
                _sysctl("net/ipv4/ip_forward", "1")
        except OSError as exc:
            raise VMStartError(f"network: cannot enable IPv4 forwarding: {exc}") from exc
        nft_run(None, nft.host_ruleset(settings.uplink))
        _host_ready.add(settings.uplink)


class Slot:
    """One prepared namespace. ``apply`` sets its policy, ``open_tap`` gives QEMU its NIC."""

    def __init__(self, index: int, settings: NetSettings) -> None:
        self.index = index
        self.settings = settings
        self.name = f"{PREFIX}{index}-{_owner_tag()}"
        self.host_if = f"{nft.HOST_PREFIX}{index}"
        base = ipaddress.IPv4Network(settings.uplink).network_address + 4 * index
        self.host_addr, self.ns_addr = str(base + 1), str(base + 2)
        self.kernel_id = ""
        self.policy = Policy()
        self.resolver: Any = None
        self.dns_sock: socket.socket | None = None
        self.tap_fd = -1
        self.setup_seconds = 0.0
        self.destroyed = False
        self.generation = 0  # of the policy in force (conntrack marks; nft.py)
        self.template = ""   # of the kernel it was given to (the denied-connections metric)

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def __repr__(self) -> str:
        return f"<Slot {self.name}>"

    # -- setup (worker thread) ------------------------------------------------------------

    def create(self) -> None:
        # pyroute2's own namespace helpers (netns.create, NetNS) fork the calling process: in
        # a server whose event loop has a signal wakeup fd, the forked helper's signals reach
        # the server's loop (a SIGTERM there shut the gateway down). So: `ip netns add`, and
        # plain netlink sockets (IPRoute), made inside the namespace by a thread that entered it.
        from pyroute2 import IPRoute  # slow to import: only where networking is used
        t0 = time.monotonic()
        _ip("netns", "add", self.name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_if, kind="veth",
                         peer={"ifname": nft.UPLINK, "net_ns_fd": str(self.path)})
                idx = ipr.link_lookup(ifname=self.host_if)[0]
                ipr.addr("add", index=idx, address=self.host_addr, prefixlen=30)
                ipr.link("set", index=idx, state="up")

            def inside() -> None:
                with IPRoute() as ns:
                    lo = ns.link_lookup(ifname="lo")[0]
                    ns.link("set", index=lo, state="up")
                    up = ns.link_lookup(ifname=nft.UPLINK)[0]
                    ns.addr("add", index=up, address=self.ns_addr, prefixlen=30)
                    ns.link("set", index=up, state="up")
                    ns.link("add", ifname=nft.TAP, kind="tuntap", mode="tap")
                    tap = ns.link_lookup(ifname=nft.TAP)[0]
                    ns.link("set", index=tap, address=TAP_MAC)
                    ns.addr("add", index=tap, address=GUEST_GATEWAY, prefixlen=GUEST_PREFIX)
                    ns.link("set", index=tap, state="up")
                    ns.route("add", dst="default", gateway=self.host_addr)
                _ensure_sysctl("net/ipv4/ip_forward", "1", required=True)
                _ensure_sysctl("net/ipv6/conf/all/disable_ipv6", "1", required=False)
                _ensure_sysctl("net/ipv6/conf/default/disable_ipv6", "1", required=False)
            in_netns(self.name, inside)
            forbidden = [*forbidden_networks(self.settings.uplink), *_host_addresses()]
            nft_run(self.name, nft.slot_ruleset(forbidden=forbidden,
                                                bandwidth_mbit=self.settings.bandwidth_mbit,
                                                max_connections=self.settings.max_connections))
            self.tap_fd = self.open_tap()
            self.dns_sock = in_netns(self.name, _dns_socket)
        except BaseException:
            self.destroy()
            raise
        self.setup_seconds = time.monotonic() - t0

    def open_tap(self) -> int:
        """A file descriptor on the slot's tap (for QEMU's ``-netdev tap,fd=``)."""
        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", nft.TAP.encode(),
                                                       IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            except OSError:
                os.close(fd)
                raise
            return fd
        return in_netns(self.name, attach)

    async def start(self, kernel_id: str, policy: Policy) -> None:
        """Give the slot to a VM: its policy, then the resolver (on the running loop)."""
        from .dns import Resolver
        self.kernel_id = kernel_id
        from .api import template_of
        self.template = template_of(kernel_id)
        await asyncio.to_thread(self.apply, policy)
        if self.dns_sock is not None:
            sock, self.dns_sock = self.dns_sock, None
            self.resolver = await Resolver.start(self, sock, self.settings.dns_upstream)

    def apply(self, policy: Policy) -> None:
        """Make ``policy`` the slot's (one nft transaction): a new generation, so that
        connections the new policy does not allow are cut; the DNS-opened entries of
        names it no longer allows dropped, the others kept."""
        keep = ""
        if self.resolver is not None:
            keep = "".join(nft.dyn_elements([a], ports, left)
                           for a, ports, left in self.resolver.still_open(policy))
        generation = self.generation + 1
        nft_run(self.name, nft.policy_sets(policy, generation, keep))
        self.policy, self.generation = policy, generation

    def open_dynamic(self, addrs: list[str], ports: list[int | None], ttl: int) -> None:
        if addrs and not self.destroyed:
            nft_run(self.name, nft.dyn_elements(addrs, ports, ttl))

    def denied(self) -> int:
        """Connections the firewall refused (packets counted by the ``denied`` counter)."""
        if self.destroyed:
            return 0
        cmd = ["ip", "netns", "exec", self.name, "nft", "list", "counter", "inet", nft.TABLE, "denied"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        for line in r.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["packets"]:
                return int(parts[1])
        return 0

    def destroy(self) -> None:
        if self.destroyed:
            return
        if self.kernel_id:  # its refusals stay in the process-wide totals
            try:
                n = self.denied()
            except (OSError, subprocess.SubprocessError, ValueError):
                n = 0
            with _totals_lock:
                _denied_gone[self.template] = _denied_gone.get(self.template, 0) + n
        self.destroyed = True
        if self.resolver is not None:
            self.resolver.close()
            self.resolver = None
        if self.dns_sock is not None:
            self.dns_sock.close()
            self.dns_sock = None
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
        remove_netns(self.name, self.host_if)


def _dns_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((GUEST_GATEWAY, 53))
    except OSError:
        sock.close()
        raise
    return sock


def remove_netns(name: str, host_if: str | None = None) -> None:
    try:
        from pyroute2 import IPRoute
        if (NETNS_DIR / name).exists():
            _ip("netns", "del", name)
        if host_if:  # gone with its peer, unless the namespace is still held by a process
            def unlink() -> None:
                with IPRoute() as ipr:
                    idx = ipr.link_lookup(ifname=host_if)
                    if idx:
                        try:
                            ipr.link("del", index=idx[0])
                        except Exception as exc:  # noqa: BLE001 - went with its peer meanwhile
                            if getattr(exc, "code", None) != errno.ENODEV:
                                raise
            _off_loop(unlink)
    except Exception as exc:  # noqa: BLE001 - reaping is best effort
        log.warning("network: cannot remove namespace %s: %s", name, exc)


def _off_loop(fn: Callable[[], T]) -> T:
    """``fn()``, in a fresh thread when this one runs an event loop (see ``in_netns``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    return in_netns(None, fn)


def _host_addresses() -> list[ipaddress.IPv4Network]:
    from pyroute2 import IPRoute

    def read() -> list[ipaddress.IPv4Network]:
        out = []
        with IPRoute() as ipr:
            for a in ipr.get_addr(family=2):
                addr = a.get_attr("IFA_ADDRESS")
                if addr:
                    out.append(ipaddress.IPv4Network(f"{addr}/32"))
        return out
    return _off_loop(read)


def _allocate(settings: NetSettings) -> Slot:
    """A fresh slot with the lowest free index (under an flock shared by all vmkg processes)."""
    capacity = min(MAX_SLOTS, ipaddress.IPv4Network(settings.uplink).num_addresses // 4)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        used = {int(n.name.split("-")[1]) for n in NETNS_DIR.glob(f"{PREFIX}*")
                if n.name.split("-")[1].isdigit()} if NETNS_DIR.is_dir() else set()
        used |= {int(p.name[len(nft.HOST_PREFIX):]) for p in Path("/sys/class/net").glob(f"{nft.HOST_PREFIX}*")
                 if p.name[len(nft.HOST_PREFIX):].isdigit()}
        for i in range(capacity):
            if i not in used:
                slot = Slot(i, settings)
                slot.create()
                return slot
        raise VMStartError(f"network: all {capacity} slots of {settings.uplink} are in use")
    finally:
        os.close(fd)


class SlotPool:
    """Slots prepared ahead (``$VMKG_NET_POOL``); ``take`` never waits for a refill."""

    _instance: SlotPool | None = None

    def __init__(self, settings: NetSettings) -> None:
        self.settings = settings
        self.ready: list[Slot] = []
        self.live: set[Slot] = set()
        self._lock = threading.Lock()
        self._filling = False
        self.closed = False

    @classmethod
    def instance(cls) -> SlotPool:
        if cls._instance is None or cls._instance.closed:
            cls._instance = SlotPool(NetSettings.from_env())
        return cls._instance

    def _create(self) -> Slot:
        host_setup(self.settings)
        return _allocate(self.settings)

    def take(self) -> Slot:
        """A prepared slot (or a new one, in the calling thread); starts a refill."""
        with self._lock:
            slot = self.ready.pop() if self.ready else None
        if slot is None:
            slot = self._create()
        with self._lock:
            self.live.add(slot)
        self.refill()
        return slot

    def refill(self) -> None:
        with self._lock:
            if self._filling or self.closed or len(self.ready) >= self.settings.pool:
                return
            self._filling = True
        threading.Thread(target=self._fill, name="vmkg-net-pool", daemon=True).start()

    def _fill(self) -> None:
        try:
            while True:
                with self._lock:
                    if self.closed or len(self.ready) >= self.settings.pool:
                        return
                try:
                    slot = self._create()
                except Exception as exc:  # noqa: BLE001 - a later take() reports it
                    log.warning("network: cannot prepare a slot: %s", exc)
                    return
                with self._lock:
                    if self.closed:
                        slot.destroy()
                        return
                    self.ready.append(slot)
        finally:
            with self._lock:
                self._filling = False

    def release(self, slot: Slot) -> None:
        with self._lock:
            self.live.discard(slot)
        slot.destroy()

    def close(self) -> None:
        """Destroy every slot of this pool (the runtime's stop)."""
        with self._lock:
            self.closed = True
            slots, self.ready = [*self.ready, *self.live], []
            self.live = set()
        for s in slots:
            s.destroy()


def prewarm() -> bool:
    """Start preparing the pool's slots in the background, where networking can work here
    (root, ``nft`` installed, a template with a NIC, ``$VMKG_NET_POOL`` > 0)."""
    import shutil

    from ..templates import catalog
    try:
        if os.geteuid() != 0 or shutil.which("nft") is None or not any(s.network for s in catalog().values()):
            return False
        pool = SlotPool.instance()
    except (ConfigError, OSError, ValueError) as exc:
        log.warning("network: slots not prepared: %s", exc)
        return False
    if pool.settings.pool <= 0:
        return False
    pool.refill()
    return True


async def take_slot() -> Slot:
    return await asyncio.to_thread(SlotPool.instance().take)


async def release_slot(slot: Slot) -> None:
    if slot.resolver is not None:  # its transport belongs to this loop
        slot.resolver.close()
        slot.resolver = None
    await asyncio.to_thread(SlotPool.instance().release, slot)


def denied_totals() -> dict[str, int]:
    """Connections refused by the slots of this process since it started, by template
    (destroyed slots' last counts plus the live ones'; a monotonic counter). Runs one
    ``nft`` per live slot: call it from a worker thread."""
    pool = SlotPool._instance
    live = list(pool.live) if pool is not None else []
    with _totals_lock:
        out = dict(_denied_gone)
    for slot in live:
        if slot.kernel_id and not slot.destroyed:
            try:
                n = slot.denied()
            except (OSError, subprocess.SubprocessError, ValueError):
                continue
            out[slot.template] = out.get(slot.template, 0) + n
    return out


def close_pool() -> None:
    if SlotPool._instance is not None:
        SlotPool._instance.close()


def reap() -> list[str]:
    """Remove the slots whose owner process is gone (after a crash or kill -9)."""
    from ..reaper import is_alive
    reaped: list[str] = []
    if not NETNS_DIR.is_dir():
        return reaped
    for p in NETNS_DIR.glob(f"{PREFIX}*"):
        parts = p.name.split("-")
        if len(parts) != 4 or not all(x.isdigit() for x in parts[1:3]) or not parts[3].lstrip("-").isdigit():
            continue
        if is_alive(int(parts[2]), int(parts[3])):
            continue
        remove_netns(p.name, f"{nft.HOST_PREFIX}{parts[1]}")
        reaped.append(p.name)
    if reaped:
        log.info("network: reaped %d namespace slots left by dead owners", len(reaped))
    return reaped
