"""Network slots without a VM: namespace, veth, tap, nftables, resolver parsing, reaping.

Needs root (namespaces) and ``nft``; creates only namespaces of its own (``vmkg-*`` slots
of this process) and never sends traffic anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kernelmanager.net import dns, nft
from kernelmanager.net.policy import GUEST_GATEWAY, NetSettings

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                reason="needs root and nft (apt-get install nftables)")
ENV = {"VMKG_NET_DNS_UPSTREAM": "127.0.0.1:9", "VMKG_NET_USER_EGRESS": "*", "VMKG_NET_POOL": "0"}


def query(name: str, qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def test_dns_parsing_and_replies() -> None:
    q = query("Files.Example.org")
    qid, name, qtype, end = dns.parse_query(q)
    assert (qid, name, qtype, end) == (0x1234, "files.example.org", 1, len(q))
    r = dns.reply(q, end, dns.REFUSED)
    assert r[:2] == q[:2] and r[3] & 0xF == dns.REFUSED and r[2] & 0x80
    # a response with a compressed A record
    ans = r[:6] + b"\x00\x01" + r[8:] + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 77, 4) + socket.inet_aton("10.9.8.7")
    assert dns.answer_addresses(ans) == [("10.9.8.7", 77)]
    for bad in (b"", b"\0" * 11, r, q[:-3], q[:12] + b"\xc0\x0c" + q[-4:]):
        with pytest.raises(dns.DNSFormatError):
            dns.parse_query(bad)


def test_rulesets_render() -> None:
    s = NetSettings.from_env(ENV)
    text = nft.policy_sets(s.policy(["10.0.0.0/8", "10.1.0.0/16", "192.0.2.1:443", "x.example.org"]))
    assert "allow_any { 10.0.0.0/8 }" in text and "192.0.2.1/32 . 443" in text
    assert "dyn_any" in text  # the resolver's entries go with a policy change
    assert 'ct count over 7' in nft.slot_ruleset(forbidden=[], bandwidth_mbit=8, max_connections=7)
    # a policy change is a new generation: connections are judged again by their mark
    text = nft.policy_sets(s.policy(["10.0.0.0/8"]), 7, "add element inet vmkg dyn_any { 192.0.2.9 timeout 60s }\n")
    assert "flush chain inet vmkg allowed" in text and "ct mark 7 accept" in text and "ct mark set 7" in text
    assert text.index("flush set inet vmkg dyn_any") < text.index("add element inet vmkg dyn_any")
    fwd = nft.slot_ruleset(forbidden=[], bandwidth_mbit=0, max_connections=0)
    assert fwd.index("jump allowed") < fwd.index('ct state established,related meta l4proto tcp counter name "cut" '
                                                 'reject with tcp reset')


def test_resolver_keeps_what_it_opened_for_names_still_allowed() -> None:
    class FakeSlot:
        kernel_id = "k"
    r = dns.Resolver(FakeSlot(), ("192.0.2.53", 53))
    r._remember("a.example.org", ["192.0.2.1", "192.0.2.2"], 60)
    r._remember("b.example.org", ["192.0.2.2"], 60)
    s = NetSettings.from_env(ENV)
    got = {a: (ports, left) for a, ports, left in r.still_open(s.policy(["a.example.org:443"]))}
    assert set(got) == {"192.0.2.1", "192.0.2.2"} and got["192.0.2.1"][0] == [443] and 55 <= got["192.0.2.1"][1] <= 60
    got = {a: ports for a, ports, _ in r.still_open(s.policy(["*.example.org", "b.example.org:80"]))}
    assert got == {"192.0.2.1": [None], "192.0.2.2": [None, 80]}
    assert r.still_open(s.policy(["c.example.org"])) == []
    for i in range(dns.MAX_OPENED + 10):  # bounded
        r._remember("a.example.org", [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"], 60)
    assert len(r.opened) <= dns.MAX_OPENED


def test_resolver_answers_even_when_it_cannot_open_the_firewall() -> None:
    """Loopback only: an upstream answering A records, a resolver in front of it, a client.
    An answer whose address the slot's firewall could not open is a SERVFAIL, at once (not
    silence the guest's resolver waits out), and the next query is served normally."""
    def answer(q: bytes) -> bytes:
        _, _, _, qend = dns.parse_query(q)
        head = dns.reply(q, qend, dns.NOERROR)
        return (head[:6] + b"\x00\x01" + head[8:] + b"\xc0\x0c" +
                struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("192.0.2.7"))

    class Upstream(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(answer(data), addr)

    class Policy:
        def name_ports(self, name: str) -> list[int | None] | None:
            return [None] if name.endswith(".example.org") else None

    class Slot:
        kernel_id, policy, fail = "k", Policy(), True
        opened: list[list[str]] = []

        def open_dynamic(self, addrs: list[str], ports: list[int | None], ttl: int) -> None:
            if self.fail:
                raise RuntimeError("nft: no such set")
            self.opened.append(addrs)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        up, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        slot = Slot()
        resolver = await dns.Resolver.start(slot, sock, up.get_extra_info("sockname"))
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        rcodes = []
        try:
            for fail in (True, False):
                slot.fail = fail
                await loop.sock_sendto(client, query("files.example.org"), sock.getsockname())
                resp = await asyncio.wait_for(loop.sock_recv(client, 512), 5)
                rcodes.append(resp[3] & 0xF)
                if not fail:
                    assert dns.answer_addresses(resp) == [("192.0.2.7", 60)]
        finally:
            client.close()
            resolver.close()
            up.close()
        assert slot.opened == [["192.0.2.7"]]
        return rcodes
    assert asyncio.run(main()) == [dns.SERVFAIL, dns.NOERROR]


@needs_root
def test_slot_lifecycle_and_rules() -> None:
    from kernelmanager.net import slots
    s = NetSettings.from_env(ENV)
    slots.host_setup(s)
    slot = slots._allocate(s)
    try:
        assert slot.path.exists() and Path(f"/sys/class/net/{slot.host_if}").exists()
        assert slot.tap_fd >= 0 and slot.dns_sock is not None
        assert slot.dns_sock.getsockname() == (GUEST_GATEWAY, 53)
        ruleset = subprocess.run(["ip", "netns", "exec", slot.name, "nft", "list", "table", "inet", "vmkg"],
                                 capture_output=True, text=True, check=True).stdout
        assert "policy drop" in ruleset and "169.254.0.0/16" in ruleset and "127.0.0.0/8" in ruleset
        assert "ip saddr != 172.29.0.2" in ruleset
        slot.apply(s.policy(["198.51.100.0/24:8080"]))
        sets = subprocess.run(["ip", "netns", "exec", slot.name, "nft", "list", "set", "inet", "vmkg", "allow_port"],
                              capture_output=True, text=True, check=True).stdout
        assert "198.51.100.0/24 . 8080" in sets
        slot.open_dynamic(["203.0.113.9"], [443, None], 60)
        dyn = subprocess.run(["ip", "netns", "exec", slot.name, "nft", "list", "set", "inet", "vmkg", "dyn_port"],
                             capture_output=True, text=True, check=True).stdout
        assert "203.0.113.9 . 443" in dyn
        assert slot.denied() == 0
    finally:
        slot.destroy()
    assert not slot.path.exists() and not Path(f"/sys/class/net/{slot.host_if}").exists()


@needs_root
def test_slots_of_a_dead_owner_are_reaped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kernelmanager.net import slots
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import os
        os.environ.update({ENV!r})
        from kernelmanager.net import slots
        from kernelmanager.net.policy import NetSettings
        s = NetSettings.from_env()
        slots.host_setup(s)
        slot = slots._allocate(s)
        print(slot.name, flush=True)
        os._exit(0)  # as after kill -9: nothing cleaned up
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=os.environ).stdout.split()
    assert out, "the owner printed no slot"
    name = out[-1]
    assert (slots.NETNS_DIR / name).exists()
    host_if = f"{nft.HOST_PREFIX}{name.split('-')[1]}"
    # a process still in the namespace (say a QEMU that outlived its gateway) keeps it, and
    # with it the veth pair, after `ip netns del`: the host end is removed by name
    holder = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        time.sleep(0.3)

        async def at_gateway_start() -> list[str]:  # the reaper runs on the gateway's loop
            return slots.reap()
        with caplog.at_level(logging.WARNING, logger="kernelmanager.net.slots"):
            assert name in asyncio.run(at_gateway_start())
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        assert not (slots.NETNS_DIR / name).exists()
        assert not Path(f"/sys/class/net/{host_if}").exists()
    finally:
        holder.kill()
        holder.wait()
