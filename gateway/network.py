"""Kernels' network over HTTP: the ``network`` of a create request, ``/api/kernels/{id}/network``.

    POST  /api/kernels                 {"name": ..., "network": {"egress": [rules]}}
    GET   /api/kernels/{id}/network    {"egress": [...], "denied_connections", "refused_names", "answered_names"}
    PATCH /api/kernels/{id}/network    {"egress": [rules]} -> 200 {"egress": [...]}: at once

The rules and the enforcement are the runtime's (``kernelmanager``'s networking: a network
namespace per VM, nftables, a DNS resolver that answers only allowed names). Here: a
create request's ``network`` is checked before any VM work (400 on a template without a
NIC, naming those that have one; 400 naming a malformed rule; 403 with the reason for a
rule the operator does not let users ask for) and applied once the kernel is up (it ran
deny-all until then, so nothing leaks in between); PATCH is for the kernel's owner or an
admin (``check_owner``: 404 for someone else's kernel) and answers 409 for a kernel
without a NIC. A kernel's model carries its policy as ``vmkg.network`` (None without a
NIC). Networked templates are not pooled unless ``pool_sizes`` names them.

Metrics: ``vmkg_network_denied_connections_total{template}``, the connections the kernels'
firewalls refused (by template, not by kernel: bounded labels). Reading them costs one
``nft`` per networked kernel, so a scrape serves the totals of the last refresh (at most
``REFRESH`` seconds old) and starts the next one in a worker thread: never on the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from jupyter_server.base.handlers import APIHandler
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from tornado import web

from kernelmanager import (
    check_egress,
    denied_totals,
    egress_info,
    egress_stats,
    network_templates,
    set_egress,
)

from . import errors
from .handlers import GatewayHandlerMixin, _finish_json, check_owner

REFRESH = 5.0


class DeniedCollector(Collector):
    """``vmkg_network_denied_connections_total{template}`` (see the module docstring)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.at = float("-inf")
        self._lock = threading.Lock()
        self._refreshing = False

    def _refresh(self) -> None:
        try:
            values = denied_totals()
        except Exception:  # noqa: BLE001 - a metric must not break a scrape; retried next time
            values = None
        with self._lock:
            if values is not None:
                self.values = values
            self.at, self._refreshing = time.monotonic(), False

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            if not self._refreshing and time.monotonic() - self.at >= REFRESH:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="vmkg-net-metrics", daemon=True).start()
            values = dict(self.values)
        fam = CounterMetricFamily("vmkg_network_denied_connections",
                                  "Connections the networked kernels' firewalls refused, by template",
                                  labels=["template"])
        for template, n in sorted(values.items()):
            fam.add_metric([template or "unknown"], n)
        yield fam


DENIED = DeniedCollector()
REGISTRY.register(DENIED)


def template_of(mkm: Any, kernel_name: str) -> str:
    spec = mkm._specs().get_kernel_spec(kernel_name)
    return str((spec.metadata or {}).get("vmkg", {}).get("template") or "")


def is_networked_kernelspec(mkm: Any, kernel_name: str) -> bool:
    try:
        return template_of(mkm, kernel_name) in network_templates()
    except Exception:  # noqa: BLE001 - an unknown kernelspec: not ours to judge here
        return False


def parse_request(network: Any) -> list[Any] | None:
    """The egress rules of a create request's ``network`` (None: no network asked for)."""
    if network is None:
        return None
    if not isinstance(network, dict) or set(network) - {"egress"}:
        raise web.HTTPError(400, "'network' must be a JSON object like {\"egress\": [\"pypi\", \"10.0.0.0/8:443\"]}")
    egress = network.get("egress", [])
    if not isinstance(egress, list):
        raise web.HTTPError(400, "'network.egress' must be a list of rules")
    return egress


def check_request(mkm: Any, kernel_name: str, egress: list[Any] | None) -> None:
    """400/403 before any VM work (see the module docstring)."""
    if egress is None:
        return
    template = template_of(mkm, kernel_name)
    with errors.translated():
        check_egress(template, egress)


async def apply_request(mkm: Any, kernel_id: str, egress: list[Any] | None) -> None:
    if egress is None:
        return
    with errors.translated():
        await set_egress(mkm.get_kernel(kernel_id), egress)


def model_field(kernel: Any) -> dict[str, Any] | None:
    return egress_info(kernel)


class NetworkHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def get(self, kernel_id: str) -> None:
        check_owner(self, kernel_id)
        with errors.translated():
            info = await egress_stats(self.kernel_manager.get_kernel(kernel_id))
        _finish_json(self, info)

    @web.authenticated
    async def patch(self, kernel_id: str) -> None:
        check_owner(self, kernel_id)
        body = self.get_json_body()
        egress = parse_request(body if body is not None else {})
        with errors.translated():
            policy = await set_egress(self.kernel_manager.get_kernel(kernel_id), egress or [])
        self.log.info("kernel %s: egress set to %s", kernel_id, policy["egress"])
        _finish_json(self, policy)
