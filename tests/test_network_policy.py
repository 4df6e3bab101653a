"""The egress policy model (pure logic): parsing, presets, what users may ask for."""

from __future__ import annotations

import ipaddress

import pytest

from kernelmanager.exceptions import ConfigError, NetworkPolicyDenied, NetworkPolicyInvalid
from kernelmanager.net.policy import NetSettings, parse_rule, parse_rules


def settings(**env: str) -> NetSettings:
    return NetSettings.from_env({"VMKG_NET_DNS_UPSTREAM": "192.0.2.53", **env})


def test_rule_forms() -> None:
    r = parse_rule("10.0.0.0/8")
    assert r.net == ipaddress.IPv4Network("10.0.0.0/8") and r.port is None
    r = parse_rule("192.0.2.7:443")
    assert r.net == ipaddress.IPv4Network("192.0.2.7/32") and r.port == 443
    r = parse_rule("10.1.2.3/16:8080")  # host bits are dropped
    assert r.net == ipaddress.IPv4Network("10.1.0.0/16") and r.port == 8080
    r = parse_rule("Files.PythonHosted.org:443")
    assert r.name == "files.pythonhosted.org" and r.port == 443
    r = parse_rule("*.example.org")
    assert r.wildcard and r.matches_name("a.b.example.org.") and not r.matches_name("example.org")
    assert parse_rule("pypi").preset == "pypi"


@pytest.mark.parametrize("bad", ["", "10.0.0.0/33", "10.0.0.1:0", "10.0.0.1:70000", "host:port",
                                 "a..b", "*.*.org", "-x.org", "::1", "foo.org:1:2", "x" * 300,
                                 "http://pypi.org", "pypi:80", 5, None])
def test_malformed_rules_are_named(bad: object) -> None:
    with pytest.raises(NetworkPolicyInvalid) as e:
        parse_rule(bad)
    assert "egress rule" in str(e.value)


def test_too_many_rules() -> None:
    with pytest.raises(NetworkPolicyInvalid):
        parse_rules([f"10.0.0.{i}" for i in range(100)])
    with pytest.raises(NetworkPolicyInvalid):
        parse_rules({"a": 1})


def test_default_is_deny_all_and_users_may_ask_for_pypi() -> None:
    s = settings()
    p = s.policy(None)
    assert p.rules == () and p.expanded == ()
    p = s.policy(["pypi"])
    assert p.to_json() == {"egress": ["pypi"]}
    assert {r.text for r in p.expanded} == {"pypi.org:443", "files.pythonhosted.org:443"}
    assert p.name_ports("pypi.org") == [443] and p.name_ports("evil.org") is None
    with pytest.raises(NetworkPolicyDenied) as e:
        s.policy(["10.0.0.0/8"])
    assert "10.0.0.0/8" in str(e.value) and "pypi" in str(e.value)
    with pytest.raises(NetworkPolicyInvalid):
        s.policy(["nosuchpreset"])


def test_pip_index_defines_the_pypi_preset() -> None:
    s = settings(VMKG_NET_PIP_INDEX="http://10.99.0.2:8080/simple")
    assert s.policy(["pypi"]).nets == [(ipaddress.IPv4Network("10.99.0.2/32"), 8080)]
    with pytest.raises(ConfigError):
        settings(VMKG_NET_PIP_INDEX="ftp://x")


def test_covering() -> None:
    s = settings(VMKG_NET_USER_EGRESS="10.0.0.0/8, *.example.org, 192.0.2.1:80, data",
                 VMKG_NET_PRESETS='{"data": ["198.51.100.0/24:443"], "both": ["10.1.0.0/16", "a.example.org"]}')
    s.policy(["10.2.0.0/16", "10.9.9.9:22", "x.example.org", "*.y.example.org", "192.0.2.1:80",
              "data", "both"])
    for denied in ("11.0.0.0/8", "0.0.0.0/0", "example.org", "192.0.2.1:81", "192.0.2.1",
                   "198.51.100.0/24:80"):
        with pytest.raises(NetworkPolicyDenied):
            s.policy([denied])


def test_operator_default_and_any() -> None:
    s = settings(VMKG_NET_DEFAULT_EGRESS="192.0.2.0/24:443", VMKG_NET_USER_EGRESS="*")
    p = s.policy(["0.0.0.0/0"])
    assert [r.text for r in p.rules] == ["192.0.2.0/24:443", "0.0.0.0/0"]
    with pytest.raises(ConfigError):
        settings(VMKG_NET_USER_EGRESS="nopreset")
    with pytest.raises(ConfigError):
        settings(VMKG_NET_PRESETS="[1]")


def test_guest_reads_its_address_from_the_command_line() -> None:
    from guest.net import parse_cmdline
    from kernelmanager.templates import get_spec

    cmdline = get_spec("python3-net").machine("tcg").cmdline
    assert parse_cmdline(cmdline) == ("172.29.0.2", 30, "172.29.0.1")
    assert parse_cmdline(get_spec("python3").machine("tcg").cmdline) is None
    with pytest.raises(OSError):
        parse_cmdline("vmkg.net=1.2.3/30,x")


def test_a_saved_policy_is_restored_as_it_was() -> None:
    """A policy carried by a durable image comes back without the user check (it was
    checked when set), and a preset this host does not define is dropped (denied)."""
    s = NetSettings.from_env({"VMKG_NET_USER_EGRESS": "pypi", "VMKG_NET_PRESETS": '{"corp": ["10.1.0.0/16"]}'})
    p = s.restore(["10.0.0.0/8:443", "pypi", "corp"])
    assert p.to_json() == {"egress": ["10.0.0.0/8:443", "pypi", "corp"]}
    assert (ipaddress.IPv4Network("10.1.0.0/16"), None) in p.nets
    other = NetSettings.from_env({})
    assert other.restore(["10.0.0.0/8:443", "corp"]).to_json() == {"egress": ["10.0.0.0/8:443"]}
    with pytest.raises(NetworkPolicyInvalid):
        other.restore(["10.0.0.0/33"])
