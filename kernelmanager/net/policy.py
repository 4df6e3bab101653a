"""Egress policy: which destinations a networked kernel may reach (pure logic, no I/O).

A policy is a list of rules, each one of

* ``CIDR`` or ``CIDR:port`` (an address alone is a /32): ``10.0.0.0/8``, ``192.0.2.7:443``;
* a host name, exact or one wildcard label deep and below, optionally with a port:
  ``pypi.org``, ``*.example.org``, ``files.pythonhosted.org:443``. Names are reached
  through the slot's DNS resolver, which answers only names a rule allows and opens the
  firewall for exactly the addresses it returned (``kernelmanager.net.dns``);
* a preset: a bare word the operator defines as a list of rules
  (``$VMKG_NET_PRESETS``). ``pypi`` is built in: the configured package index
  (``$VMKG_NET_PIP_INDEX``, its host and port) or, without one, ``pypi.org`` and
  ``files.pythonhosted.org`` on 443.

Whatever a policy says, the firewall drops the never-reachable ranges first
(``FORBIDDEN``: loopback, link-local with 169.254.169.254, the slots' uplink range, the
guest's own subnet, multicast, the host's own addresses), so ``0.0.0.0/0`` means "the
outside world", never the host or another VM.

The operator decides the default policy (``$VMKG_NET_DEFAULT_EGRESS``, default none:
deny all) and what users may ask for on top (``$VMKG_NET_USER_EGRESS``, default
``pypi``; ``*`` allows anything). A requested rule is permitted when an allowed rule
*covers* it (a CIDR inside an allowed CIDR with the same port or the allowed rule
having none; a name equal to or under an allowed wildcard; a preset named in the
allowed list or all of whose rules are covered). A request beyond that raises
``NetworkPolicyDenied`` (HTTP 403) with the reason; a malformed rule raises
``NetworkPolicyInvalid`` (HTTP 400) naming it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import ConfigError, NetworkPolicyDenied, NetworkPolicyInvalid

#: limits on what a client may send
MAX_RULES = 64
MAX_RULE_LEN = 260

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)+{_LABEL}$")
_PRESET_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

#: the guest side of every slot (the same in every VM: snapshots need no re-addressing)
GUEST_ADDRESS = "172.29.0.2"
GUEST_GATEWAY = "172.29.0.1"
GUEST_PREFIX = 30
GUEST_MAC = "52:54:00:76:6d:01"

BUILTIN_PRESETS: dict[str, tuple[str, ...]] = {
    "pypi": ("pypi.org:443", "files.pythonhosted.org:443"),
}


def forbidden_networks(uplink: str) -> tuple[ipaddress.IPv4Network, ...]:
    """Destinations no rule ever opens (the host's own addresses are added at run time)."""
    return tuple(ipaddress.IPv4Network(n, strict=False) for n in (
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        f"{GUEST_GATEWAY}/{GUEST_PREFIX}", uplink))


@dataclass(frozen=True)
class Rule:
    """One parsed rule. Exactly one of ``net`` / ``name`` / ``preset`` is set."""

    text: str
    net: ipaddress.IPv4Network | None = None
    name: str | None = None          # lower case; "*.x.y" for a wildcard
    port: int | None = None
    preset: str | None = None

    @property
    def wildcard(self) -> bool:
        return bool(self.name and self.name.startswith("*."))

    def matches_name(self, qname: str) -> bool:
        """Does a queried DNS name fall under this name rule?"""
        if self.name is None:
            return False
        q = qname.lower().rstrip(".")
        if self.wildcard:
            return q.endswith(self.name[1:])
        return q == self.name

    def covers(self, other: Rule) -> bool:
        """Does this (allowed) rule permit everything ``other`` asks for?"""
        if self.port is not None and other.port != self.port:
            return False
        if self.net is not None and other.net is not None:
            return other.net.subnet_of(self.net)
        if self.name is not None and other.name is not None:
            if self.wildcard:
                return other.name.endswith(self.name[1:])
            return other.name == self.name
        return False


def _port(text: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise NetworkPolicyInvalid(f"egress rule {text!r}: port {raw!r} is not 1-65535")
    return int(raw)


def parse_rule(text: object) -> Rule:
    """One rule from its text; ``NetworkPolicyInvalid`` names a malformed one."""
    if not isinstance(text, str):
        raise NetworkPolicyInvalid(f"egress rule {text!r}: not a string")
    t = text.strip().lower()
    if not t or len(t) > MAX_RULE_LEN:
        raise NetworkPolicyInvalid(f"egress rule {text[:64]!r}: empty or longer than {MAX_RULE_LEN}")
    port: int | None = None
    host = t
    if t.count(":") == 1:
        host, raw = t.split(":")
        port = _port(text, raw)
    elif ":" in t:
        raise NetworkPolicyInvalid(f"egress rule {text!r}: IPv6 is not supported (IPv4 CIDR, "
                                   f"CIDR:port, host name or preset)")
    if re.fullmatch(r"[0-9./]+", host):
        try:
            net = ipaddress.IPv4Network(host, strict=False)
        except ValueError as exc:
            raise NetworkPolicyInvalid(f"egress rule {text!r}: {exc}") from None
        return Rule(text=t, net=net, port=port)
    if _PRESET_RE.fullmatch(host):
        if port is not None:
            raise NetworkPolicyInvalid(f"egress rule {text!r}: a preset takes no port")
        return Rule(text=t, preset=host)
    if len(host) <= 253 and _NAME_RE.fullmatch(host):
        return Rule(text=t, name=host, port=port)
    raise NetworkPolicyInvalid(f"egress rule {text!r}: not a CIDR, CIDR:port, host name "
                               f"(exact or *.domain, optional :port) or preset name")


def parse_rules(rules: object) -> tuple[Rule, ...]:
    if rules is None:
        return ()
    if isinstance(rules, str):
        rules = [r for r in re.split(r"[\s,]+", rules) if r]
    if not isinstance(rules, (list, tuple)):
        raise NetworkPolicyInvalid(f"egress: expected a list of rules, got {type(rules).__name__}")
    if len(rules) > MAX_RULES:
        raise NetworkPolicyInvalid(f"egress: {len(rules)} rules, at most {MAX_RULES}")
    out: list[Rule] = []
    for r in rules:
        rule = parse_rule(r)
        if rule.text not in {x.text for x in out}:
            out.append(rule)
    return tuple(out)


@dataclass(frozen=True)
class Policy:
    """A kernel's egress policy: its rules as asked (presets unexpanded) and expanded."""

    rules: tuple[Rule, ...] = ()
    expanded: tuple[Rule, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"egress": [r.text for r in self.rules]}

    @property
    def nets(self) -> list[tuple[ipaddress.IPv4Network, int | None]]:
        return [(r.net, r.port) for r in self.expanded if r.net is not None]

    @property
    def names(self) -> list[Rule]:
        return [r for r in self.expanded if r.name is not None]

    def name_ports(self, qname: str) -> list[int | None] | None:
        """The ports a DNS name is allowed on (None in the list = all), or None if denied."""
        hits = [r.port for r in self.names if r.matches_name(qname)]
        return hits or None


@dataclass(frozen=True)
class NetSettings:
    """The operator's network settings; each field is an environment variable."""

    default_egress: tuple[Rule, ...] = ()      # $VMKG_NET_DEFAULT_EGRESS
    user_egress: tuple[Rule, ...] = ()          # $VMKG_NET_USER_EGRESS ("*" = anything)
    user_any: bool = False
    presets: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)  # $VMKG_NET_PRESETS
    pip_index: str = ""                         # $VMKG_NET_PIP_INDEX
    dns_upstream: tuple[str, int] = ("", 53)    # $VMKG_NET_DNS_UPSTREAM
    uplink: str = "10.213.0.0/16"               # $VMKG_NET_UPLINK_CIDR
    bandwidth_mbit: int = 100                   # $VMKG_NET_BANDWIDTH_MBIT (each direction)
    max_connections: int = 256                  # $VMKG_NET_MAX_CONNECTIONS
    pool: int = 2                               # $VMKG_NET_POOL

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NetSettings:
        e = os.environ if env is None else env
        presets: dict[str, tuple[str, ...]] = dict(BUILTIN_PRESETS)
        pip_index = e.get("VMKG_NET_PIP_INDEX", "").strip()
        if pip_index:
            u = urlsplit(pip_index)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ConfigError(f"$VMKG_NET_PIP_INDEX={pip_index!r} is not an http(s) URL")
            port = u.port or (443 if u.scheme == "https" else 80)
            presets["pypi"] = (f"{u.hostname}:{port}",)
        raw = e.get("VMKG_NET_PRESETS", "").strip()
        if raw:
            try:
                extra = json.loads(raw)
                assert isinstance(extra, dict)
            except (ValueError, AssertionError):
                raise ConfigError("$VMKG_NET_PRESETS is not a JSON object {name: [rules]}") from None
            for k, v in extra.items():
                if not _PRESET_RE.fullmatch(str(k)):
                    raise ConfigError(f"$VMKG_NET_PRESETS: {k!r} is not a preset name")
                presets[str(k)] = tuple(v) if isinstance(v, list) else (str(v),)
        parsed: dict[str, tuple[Rule, ...]] = {}
        for k, v in presets.items():
            rules = parse_rules(list(v))
            if any(r.preset for r in rules):
                raise ConfigError(f"preset {k!r}: presets cannot name presets")
            parsed[k] = rules
        user_raw = e.get("VMKG_NET_USER_EGRESS", "pypi").strip()
        dns = e.get("VMKG_NET_DNS_UPSTREAM", "").strip() or _system_resolver()
        host, _, dport = dns.partition(":")
        d = cls()
        s = cls(
            default_egress=parse_rules(e.get("VMKG_NET_DEFAULT_EGRESS", "")),
            user_egress=() if user_raw == "*" else parse_rules(user_raw),
            user_any=user_raw == "*",
            presets=parsed, pip_index=pip_index,
            dns_upstream=(host, int(dport) if dport.isdigit() else 53),
            uplink=str(ipaddress.IPv4Network(e.get("VMKG_NET_UPLINK_CIDR", d.uplink))),
            bandwidth_mbit=int(e.get("VMKG_NET_BANDWIDTH_MBIT", d.bandwidth_mbit)),
            max_connections=int(e.get("VMKG_NET_MAX_CONNECTIONS", d.max_connections)),
            pool=int(e.get("VMKG_NET_POOL", d.pool)),
        )
        for r in (*s.default_egress, *s.user_egress):
            if r.preset and r.preset not in s.presets:
                raise ConfigError(f"egress settings name an unknown preset {r.preset!r}")
        return s

    # -- building policies -------------------------------------------------------

    def expand(self, rules: Iterable[Rule]) -> tuple[Rule, ...]:
        out: list[Rule] = []
        for r in rules:
            if r.preset is not None:
                if r.preset not in self.presets:
                    raise NetworkPolicyInvalid(
                        f"egress rule {r.text!r}: no such preset (known: {', '.join(sorted(self.presets))})")
                out.extend(self.presets[r.preset])
            else:
                out.append(r)
        return tuple(out)

    def check_requested(self, rules: Iterable[Rule]) -> None:
        """Raise ``NetworkPolicyDenied`` for the first rule users may not ask for."""
        if self.user_any:
            for r in rules:
                self.expand([r])  # an unknown preset is still malformed
            return
        allowed_presets = {r.preset for r in self.user_egress if r.preset}
        allowed = self.expand(r for r in self.user_egress)
        for r in rules:
            if r.preset is not None:
                if r.preset in allowed_presets:
                    continue
                parts = self.expand([r])
            else:
                parts = (r,)
            for p in parts:
                if not any(a.covers(p) for a in allowed):
                    what = ", ".join(x.text for x in self.user_egress) or "nothing"
                    raise NetworkPolicyDenied(
                        f"egress rule {r.text!r} is not allowed here: users may ask for {what}")

    def policy(self, requested: object = None, base: Iterable[Rule] | None = None) -> Policy:
        """The policy of a kernel: ``base`` (the operator's default, or a template's)
        plus what the client asked for, checked against what users may request."""
        asked = parse_rules(requested)
        self.check_requested(asked)
        rules = tuple(base if base is not None else self.default_egress)
        for r in asked:
            if r.text not in {x.text for x in rules}:
                rules += (r,)
        return Policy(rules=rules, expanded=self.expand(rules))

    def restore(self, recorded: object) -> Policy:
        """A policy carried by a saved kernel (``Policy.to_json()``'s ``egress``) back into
        force on a wake, a restore or a fork: not checked against what users may ask for
        (it was when it was set, and the kernel keeps it), but a preset this host does not
        define is dropped (denied), never guessed."""
        rules = parse_rules(recorded)
        kept = tuple(r for r in rules if r.preset is None or r.preset in self.presets)
        return Policy(rules=kept, expanded=self.expand(kept))

    def replace(self, requested: object) -> Policy:
        """A running kernel's new policy (PATCH): the operator default plus the request."""
        return self.policy(requested)


def _system_resolver() -> str:
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                    return parts[1]
    except OSError:
        pass
    return ""
