"""What the rest of vmkg uses of networking (re-exported by the package root).

* ``network_templates()``: the templates baked with a NIC.
* ``check_egress(template, egress)``: validate a create request's network before any VM
  work: ``ConfigError`` (400) on a template without a NIC (naming those with one),
  ``NetworkPolicyInvalid`` (400) / ``NetworkPolicyDenied`` (403) for the rules.
* ``guest_env()``: pip's settings in a networked kernel (the operator's index).
* ``launch_policy(provisioner, fork_parent)``: the policy a (re)started VM gets: the one
  set on this kernel last (kept across restarts), else its fork parent's, else the
  kernelspec's request (provisioner config ``egress``) on top of the operator default.
* ``set_egress(km, egress)``: replace a running kernel's rules at once (``NoNetwork``,
  409, for a kernel without a NIC). ``egress_info(km)``: the kernel's policy for its
  model; ``egress_stats(km)``: with the denied-connection and refused-name counts.

Policies of live networked VMs are kept here by kernel id (``_policies``) so a fork's
children start with their parent's.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ConfigError, NoNetwork
from .policy import NetSettings, Policy

_policies: dict[str, Policy] = {}


def network_templates() -> list[str]:
    from ..templates import catalog
    return sorted(n for n, s in catalog().items() if s.network)


def check_egress(template: str, egress: object) -> dict[str, Any]:
    from ..templates import get_spec
    spec = get_spec(template)
    if not spec.network:
        have = network_templates()
        raise ConfigError(f"template {template!r} has no network interface; templates with one: "
                          f"{', '.join(have) or 'none'}")
    return NetSettings.from_env().policy(egress).to_json()


def guest_env() -> dict[str, str]:
    """Environment a networked kernel starts with: pip pointed at the operator's index
    (``$VMKG_NET_PIP_INDEX``) and told to give up quickly when the network refuses it."""
    s = NetSettings.from_env()
    env = {"PIP_RETRIES": "1", "PIP_DEFAULT_TIMEOUT": "15", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           # a user install into the kernel's home: Debian's python is "externally managed"
           "PIP_USER": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1"}
    if s.pip_index:
        from urllib.parse import urlsplit
        env["PIP_INDEX_URL"] = s.pip_index
        if s.pip_index.startswith("http://"):
            env["PIP_TRUSTED_HOST"] = urlsplit(s.pip_index).hostname or ""
    return env


def launch_policy(provisioner: Any, fork_parent: str | None) -> Policy:
    own = getattr(provisioner, "_net_policy", None)
    if isinstance(own, Policy):
        return own
    if fork_parent and fork_parent in _policies:
        policy = _policies[fork_parent]
    else:
        policy = NetSettings.from_env().policy(list(getattr(provisioner, "egress", []) or []))
    provisioner._net_policy = policy
    return policy


def remember(kernel_id: str, policy: Policy | None) -> None:
    if policy is None:
        _policies.pop(kernel_id, None)
    else:
        _policies[kernel_id] = policy


def _vm(km: Any) -> Any:
    prov = getattr(km, "provisioner", None)
    kernel = getattr(prov, "vm_kernel", None)
    vm = getattr(kernel, "vm", None)
    if vm is None or not vm.networked:
        raise NoNetwork(f"kernel {getattr(km, 'kernel_id', '?')} has no network interface "
                        f"(its template has no 'network': templates with one: "
                        f"{', '.join(network_templates()) or 'none'})")
    return prov, vm


async def set_egress(km: Any, egress: object) -> dict[str, Any]:
    """Replace the kernel's egress rules (operator default + ``egress``) at once."""
    import asyncio

    from ..runtime import Runtime
    prov, vm = _vm(km)
    policy = NetSettings.from_env().policy(egress)

    async def apply() -> None:
        if vm.slot is None:
            raise NoNetwork(f"kernel {km.kernel_id}: its VM is not running")
        await asyncio.to_thread(vm.slot.apply, policy)

    await Runtime.instance().run(apply())
    prov._net_policy = policy
    vm.net_policy = policy
    remember(km.kernel_id, policy)
    return policy.to_json()


def egress_info(km: Any) -> dict[str, Any] | None:
    """The kernel's network for its model, or None without a NIC."""
    try:
        prov, vm = _vm(km)
    except NoNetwork:
        return None
    policy = vm.net_policy or getattr(prov, "_net_policy", None) or Policy()
    return policy.to_json()


async def egress_stats(km: Any) -> dict[str, Any]:
    import asyncio
    _, vm = _vm(km)
    slot = vm.slot
    info = (vm.net_policy or Policy()).to_json()
    if slot is not None:
        info["denied_connections"] = await asyncio.to_thread(slot.denied)
        info["refused_names"] = slot.resolver.refused if slot.resolver is not None else 0
    return info
