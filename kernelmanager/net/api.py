"""What the rest of vmkg uses of networking (re-exported by the package root).

* ``network_templates()``: the templates baked with a NIC.
* ``check_egress(template, egress)``: validate a create request's network before any VM
  work: ``ConfigError`` (400) on a template without a NIC (naming those with one),
  ``NetworkPolicyInvalid`` (400) / ``NetworkPolicyDenied`` (403) for the rules.
* ``guest_env()``: pip's settings in a networked kernel (the operator's index).
* ``launch_policy(provisioner, fork_parent, recorded)``: the policy a (re)started VM gets:
  the one set on this kernel last (kept across restarts, hibernation and in-place
  checkpoint restores), else its live fork parent's, else the one ``recorded`` in the
  snapshot it starts from (a durable image: a kernel woken after a gateway restart, or
  a fork from a checkpoint of a sleeping kernel; ``NetSettings.restore``), else the
  kernelspec's request (provisioner config ``egress``) on top of the operator default.
* ``record(vm)``: what a durable image keeps of a VM's network (``{"network": policy}``,
  empty without a NIC), so the policy travels with the saved kernel.
* ``set_egress(km, egress)``: replace a running kernel's rules at once (``NoNetwork``,
  409, for a kernel without a NIC). ``egress_info(km)``: the kernel's policy for its
  model; ``egress_stats(km)``: with the denied-connection and refused-name counts.
* ``denied_totals()``: refused connections of this process by template (the metric).

Policies of live networked VMs are kept here by kernel id (``_policies``) so a fork's
children start with their parent's.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ConfigError, NoNetwork
from .policy import NetSettings, Policy

_policies: dict[str, Policy] = {}
_templates: dict[str, str] = {}  # kernel id -> template (labels of the denied-connections metric)
MAX_TEMPLATES = 4096


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
    (``$VMKG_NET_PIP_INDEX``), told to give up at once when the network refuses it and
    to skip work that is slow under TCG and useless in a kernel (the version check, a
    network request of its own; the cache). One retry, not none: the slot's firewall
    refuses rather than drops, so it costs milliseconds, and only a retry makes pip print
    the refusal (without one it reports just "No matching distribution found"); a short
    timeout for what does get dropped upstream."""
    s = NetSettings.from_env()
    env = {"PIP_RETRIES": "1", "PIP_DEFAULT_TIMEOUT": "10", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_CACHE_DIR": "1", "PIP_NO_INPUT": "1", "PIP_PROGRESS_BAR": "off",
           # a user install into the kernel's home: Debian's python is "externally managed"
           "PIP_USER": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1"}
    if s.pip_index:
        from urllib.parse import urlsplit
        env["PIP_INDEX_URL"] = s.pip_index
        if s.pip_index.startswith("http://"):
            env["PIP_TRUSTED_HOST"] = urlsplit(s.pip_index).hostname or ""
    return env


def template_of(kernel_id: str) -> str:
    return _templates.get(kernel_id, "")


def launch_policy(provisioner: Any, fork_parent: str | None, recorded: object = None) -> Policy:
    kid = str(getattr(provisioner, "kernel_id", "") or "")
    if kid and (kid in _templates or len(_templates) < MAX_TEMPLATES):
        _templates[kid] = str(getattr(provisioner, "template", "") or "")
    own = getattr(provisioner, "_net_policy", None)
    if isinstance(own, Policy):
        return own
    if fork_parent and fork_parent in _policies:
        policy = _policies[fork_parent]
    elif isinstance(recorded, dict) and "egress" in recorded:
        policy = NetSettings.from_env().restore(recorded["egress"])
    else:
        policy = NetSettings.from_env().policy(list(getattr(provisioner, "egress", []) or []))
    provisioner._net_policy = policy
    return policy


def record(vm: Any) -> dict[str, Any]:
    if not getattr(vm, "networked", False):
        return {}
    return {"network": (vm.net_policy or Policy()).to_json()}


def remember(kernel_id: str, policy: Policy | None) -> None:
    if policy is None:
        _policies.pop(kernel_id, None)
        _templates.pop(kernel_id, None)
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


def denied_totals() -> dict[str, int]:
    """Connections refused by this process's slots since it started, by template
    (a monotonic counter; blocking: one ``nft`` per live slot)."""
    from .slots import denied_totals as totals
    return totals()


def egress_info(km: Any) -> dict[str, Any] | None:
    """The kernel's network for its model, or None without a NIC (a hibernated kernel:
    the policy it will wake with)."""
    try:
        prov, vm = _vm(km)
    except NoNetwork:
        prov = getattr(km, "provisioner", None)
        image = getattr(prov, "_hibernated", None)
        if image is None:
            return None
        own = getattr(prov, "_net_policy", None)
        if isinstance(own, Policy):
            return own.to_json()
        rec = image.info.get("network")
        return {"egress": list(rec.get("egress", []))} if isinstance(rec, dict) else None
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
        info["answered_names"] = slot.resolver.answered if slot.resolver is not None else 0
    return info
