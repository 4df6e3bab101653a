"""The nftables rules of a slot's namespace, and the host's few rules (text only).

In the slot (``table inet vmkg``), for traffic from the guest (``iifname tap0``), in order:

1. a source other than the guest's own address is dropped (no spoofing);
2. bandwidth over the cap is dropped (each direction), new connections over the
   connection cap are refused;
3. replies to the guest of its connections pass; from the guest, packets of a
   connection accepted under the *current* policy pass (chain ``allowed``: its
   conntrack mark is the policy's generation);
4. the forbidden ranges (``policy.forbidden_networks`` + the host's own addresses) are
   refused, whatever the policy says;
5. the policy's CIDRs (``allow_any``, ``allow_port``) and what the DNS resolver opened
   (``dyn_any``, ``dyn_port``, with timeouts) pass, and the connection is marked with
   the generation;
6. a packet of an established connection that the policy no longer allows (a PATCH
   removed its rule) is answered with a TCP reset (other protocols: dropped), so the
   connection is cut at the guest's next packet (an ACK of data from the outside is
   one) and counted (``cut``);
7. everything else is counted (the ``denied`` counter), logged (rate-limited) and
   refused at once (TCP reset / ICMP admin-prohibited), so a client fails in
   milliseconds rather than waiting for a timeout.

Input to the namespace itself: only the guest's DNS queries to the resolver on the
gateway address. Output from the namespace (what a process in it, QEMU included, sends):
only to the guest and replies. Then the guest's traffic is masqueraded behind the slot's
uplink address. A policy change rewrites the four allow sets and the ``allowed`` chain
(with the next generation) in one ``nft -f`` transaction: a connection opened before
it passes step 3 no more and is judged again by step 5 (kept if the new policy allows
it, re-marked; cut by step 6 if not). The DNS-opened entries whose names the new policy
still allows are kept (the resolver remembers what it opened for which name).

On the host (``table inet vmkg_host``): nothing from a slot's veth reaches the host itself
(its loopback, the gateway's port, its services), slots cannot reach each other, and
slot traffic leaving the host is masqueraded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .policy import GUEST_ADDRESS, GUEST_GATEWAY, Policy

TABLE = "vmkg"
TAP = "tap0"
UPLINK = "up0"
HOST_PREFIX = "vkh"


def _elements(items: Iterable[str]) -> str:
    items = list(items)
    return "{ " + ", ".join(items) + " }" if items else ""


def _collapse(nets: Iterable[ipaddress.IPv4Network]) -> list[ipaddress.IPv4Network]:
    return list(ipaddress.collapse_addresses(nets))


def allowed_rules(generation: int) -> list[str]:
    """The ``allowed`` chain of policy ``generation`` (steps 3 to 5 of the module docstring)."""
    g = int(generation)
    return [f'iifname "{TAP}" ct state established,related ct mark {g} accept',
            f'iifname "{TAP}" ip daddr @forbid counter name "denied" reject with icmpx admin-prohibited',
            f'iifname "{TAP}" oifname "{UPLINK}" ip daddr @allow_any ct mark set {g} accept',
            f'iifname "{TAP}" oifname "{UPLINK}" meta l4proto {{ tcp, udp }} ip daddr . th dport @allow_port '
            f'ct mark set {g} accept',
            f'iifname "{TAP}" oifname "{UPLINK}" ip daddr @dyn_any ct mark set {g} accept',
            f'iifname "{TAP}" oifname "{UPLINK}" meta l4proto {{ tcp, udp }} ip daddr . th dport @dyn_port '
            f'ct mark set {g} accept']


def policy_sets(policy: Policy, generation: int = 1, keep_dynamic: str = "") -> str:
    """Replace the allow sets (static and DNS-opened) with ``policy``'s and the ``allowed``
    chain with ``generation``'s, in one transaction; ``keep_dynamic``: ``dyn_elements``
    lines put back (what the resolver opened for names ``policy`` still allows)."""
    any_nets = _collapse(n for n, p in policy.nets if p is None)
    port_nets = sorted({(n, p) for n, p in policy.nets if p is not None}, key=str)
    lines = [f"flush set inet {TABLE} {s}" for s in ("allow_any", "allow_port", "dyn_any", "dyn_port")]
    if any_nets:
        lines.append(f"add element inet {TABLE} allow_any {_elements(str(n) for n in any_nets)}")
    if port_nets:
        lines.append(f"add element inet {TABLE} allow_port {_elements(f'{n} . {p}' for n, p in port_nets)}")
    lines.append(f"flush chain inet {TABLE} allowed")
    lines += [f"add rule inet {TABLE} allowed {r}" for r in allowed_rules(generation)]
    return "\n".join(lines) + "\n" + keep_dynamic


def slot_ruleset(*, forbidden: Iterable[ipaddress.IPv4Network], bandwidth_mbit: int,
                 max_connections: int) -> str:
    """The whole table of a fresh slot (deny-all until ``policy_sets`` fills it)."""
    forbid = _elements(str(n) for n in _collapse(forbidden))
    bw = ""
    if bandwidth_mbit > 0:
        kbytes = bandwidth_mbit * 125
        burst = max(256, kbytes // 4)
        bw = (f'    iifname "{TAP}" limit rate over {kbytes} kbytes/second burst {burst} kbytes drop\n'
              f'    oifname "{TAP}" limit rate over {kbytes} kbytes/second burst {burst} kbytes drop\n')
    conn = (f'    iifname "{TAP}" ct state new ct count over {max_connections} counter name "denied" '
            f'reject with icmpx admin-prohibited\n') if max_connections > 0 else ""
    return f"""table inet {TABLE} {{
  counter denied {{ }}
  counter spoofed {{ }}
  counter cut {{ }}
  set allow_any {{ type ipv4_addr; flags interval; }}
  set allow_port {{ type ipv4_addr . inet_service; flags interval; }}
  set dyn_any {{ type ipv4_addr; flags timeout; }}
  set dyn_port {{ type ipv4_addr . inet_service; flags timeout; }}
  set forbid {{ type ipv4_addr; flags interval; {'elements = ' + forbid + ';' if forbid else ''} }}
  chain allowed {{
  }}
  chain guest_fwd {{
    type filter hook forward priority 0; policy drop;
    iifname "{TAP}" ip saddr != {GUEST_ADDRESS} counter name "spoofed" drop
    iifname "{TAP}" meta protocol != ip counter name "spoofed" drop
{bw}{conn}    oifname "{TAP}" ct state established,related accept
    jump allowed
    iifname "{TAP}" ct state established,related meta l4proto tcp counter name "cut" reject with tcp reset
    iifname "{TAP}" ct state established,related counter name "cut" drop
    iifname "{TAP}" limit rate 2/second burst 5 packets log prefix "vmkg-egress-denied: " level info
    iifname "{TAP}" meta l4proto tcp counter name "denied" reject with tcp reset
    iifname "{TAP}" counter name "denied" reject with icmpx admin-prohibited
  }}
  chain guest_in {{
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    iifname "{TAP}" ip saddr {GUEST_ADDRESS} ip daddr {GUEST_GATEWAY} udp dport 53 accept
    iifname "{TAP}" ip saddr {GUEST_ADDRESS} ip daddr {GUEST_GATEWAY} icmp type echo-request accept
    iifname "{TAP}" meta l4proto tcp counter name "denied" reject with tcp reset
    iifname "{TAP}" counter name "denied" reject with icmpx admin-prohibited
  }}
  chain ns_out {{
    type filter hook output priority 0; policy drop;
    oif lo accept
    oifname "{TAP}" accept
    ct state established,related accept
  }}
  chain nat_out {{
    type nat hook postrouting priority 100;
    oifname "{UPLINK}" masquerade
  }}
}}
"""


def host_ruleset(uplink: str) -> str:
    """The host's table (shared by every slot of every vmkg process; same text each time)."""
    return f"""table inet vmkg_host {{
}}
delete table inet vmkg_host
table inet vmkg_host {{
  chain slot_in {{
    type filter hook input priority -10; policy accept;
    iifname "{HOST_PREFIX}*" ct state established,related accept
    iifname "{HOST_PREFIX}*" drop
  }}
  chain slot_fwd {{
    type filter hook forward priority -10; policy accept;
    iifname "{HOST_PREFIX}*" oifname "{HOST_PREFIX}*" drop
    oifname "{HOST_PREFIX}*" ip saddr != {uplink} ct state new drop
  }}
  chain slot_nat {{
    type nat hook postrouting priority 100;
    ip saddr {uplink} oifname != "{HOST_PREFIX}*" masquerade
  }}
}}
"""


def dyn_elements(addrs: Iterable[str], ports: Iterable[int | None], ttl: int) -> str:
    """Open the firewall for addresses the resolver returned (for ``ttl`` seconds)."""
    ps = list(ports)
    lines = []
    for a in addrs:
        if None in ps:
            lines.append(f"add element inet {TABLE} dyn_any {{ {a} timeout {ttl}s }}")
        for p in ps:
            if p is not None:
                lines.append(f"add element inet {TABLE} dyn_port {{ {a} . {p} timeout {ttl}s }}")
    return "\n".join(lines) + "\n"
