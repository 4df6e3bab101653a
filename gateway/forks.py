"""Forking kernels over HTTP: ``POST /api/kernels/{id}/fork`` and ``GET .../forks``.

A fork snapshots the parent's running VM (``MicroVMProvisioner.fork_snapshot``: waits
until the kernel is idle, pauses it for the dirty pages, resumes it) and starts ``count``
new kernels of the gateway from that snapshot. They are ordinary kernels in every way
(listed, websockets, interrupt, restart, delete, culling, limits), and their models
carry their lineage: ``parent_id`` and ``forked_at``.

Request body: ``{"count": N, "reseed": true, "timeout": 30}`` (all optional; count 1..
``max_fork_count``). Answers ``201 {"kernels": [model, ...]}``; 409 when the parent
stayed busy past ``timeout``; 403 when the new kernels would pass a limit.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import Any

from jupyter_server.base.handlers import APIHandler
from tornado import web

from kernelmanager.exceptions import LimitExceeded
from kernelmanager.provisioner import MicroVMProvisioner, release_snapshot

from . import errors
from .handlers import GatewayHandlerMixin, _finish_json

DEFAULT_MAX_FORK_COUNT = 64


def lineage(mkm: Any) -> dict[str, dict[str, Any]]:
    """kernel id -> {"parent_id", "forked_at"} for every kernel made by a fork."""
    if not hasattr(mkm, "_vmkg_lineage"):
        mkm._vmkg_lineage = {}
    return mkm._vmkg_lineage


def lineage_fields(mkm: Any, kernel_id: str) -> dict[str, Any]:
    rec = lineage(mkm).get(kernel_id)
    return {"parent_id": rec["parent_id"] if rec else None, "forked_at": rec["forked_at"] if rec else None}


def children_of(mkm: Any, kernel_id: str) -> list[str]:
    return [kid for kid, rec in lineage(mkm).items() if rec["parent_id"] == kernel_id and kid in mkm]


async def fork_kernel(mkm: Any, kernel_id: str, count: int, *, reseed: bool = True,
                      timeout: float = 30.0) -> list[str]:
    """Fork ``kernel_id`` into ``count`` new kernels of ``mkm``; returns their ids."""
    mkm._check_kernel_id(kernel_id)
    parent = mkm.get_kernel(kernel_id)
    prov = parent.provisioner
    if not isinstance(prov, MicroVMProvisioner):
        raise LimitExceeded("only microVM kernels can be forked")
    username = getattr(mkm, "usernames", {}).get(kernel_id, "")
    max_kernels = getattr(mkm, "max_kernels", None)
    if max_kernels is not None and mkm.client_kernel_count() + count > max_kernels:
        raise LimitExceeded(f"max_kernels: forking into {count} would exceed the limit of "
                            f"{max_kernels} kernels ({mkm.client_kernel_count()} running)")
    per_user = getattr(mkm, "max_kernels_per_user", None)
    if username and per_user is not None and mkm.client_kernel_count(username) + count > per_user:
        raise LimitExceeded(f"max_kernels_per_user: user {username!r} may hold at most {per_user} kernels")
    snap = await prov.fork_snapshot(idle_timeout=timeout)
    forked_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    env = {"KERNEL_USERNAME": username} if username else {}
    ids = [str(uuid.uuid4()) for _ in range(count)]
    try:
        results = await asyncio.gather(*(
            mkm.start_kernel(kernel_name=parent.kernel_name, kernel_id=kid, env=env,
                             vmkg_snapshot=snap, vmkg_reseed=reseed)
            for kid in ids), return_exceptions=True)
    finally:
        await release_snapshot(snap)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(mkm.shutdown_kernel(kid, now=True) for kid in ids if kid in mkm),
                             return_exceptions=True)
        raise failed[0]
    for kid in ids:
        lineage(mkm)[kid] = {"parent_id": kernel_id, "forked_at": forked_at}
        if hasattr(mkm, "sources"):
            mkm.sources[kid] = "fork"
    mkm.log.info("kernel %s: forked into %d (%s)", kernel_id, count, ", ".join(i[:8] for i in ids))
    return ids


class ForkHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def post(self, kernel_id: str) -> None:
        body = self.get_json_body() or {}
        if not isinstance(body, dict):
            raise web.HTTPError(400, 'The request body must be a JSON object like {"count": 4}')
        cap = int(self.settings.get("vmkg_max_fork_count", DEFAULT_MAX_FORK_COUNT))
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= cap:
            raise web.HTTPError(400, f"'count' must be an integer from 1 to {cap}")
        reseed = body.get("reseed", True)
        if not isinstance(reseed, bool):
            raise web.HTTPError(400, "'reseed' must be true or false")
        timeout = body.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise web.HTTPError(400, "'timeout' must be a number of seconds from 0 to 3600")
        km = self.kernel_manager
        with errors.translated():
            ids = await fork_kernel(km, kernel_id, count, reseed=reseed, timeout=float(timeout))
        _finish_json(self, {"kernels": [km.kernel_model(kid) for kid in ids if kid in km]}, 201)


class ForksListHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def get(self, kernel_id: str) -> None:
        km = self.kernel_manager
        km._check_kernel_id(kernel_id)
        _finish_json(self, {"kernel_id": kernel_id, **lineage_fields(km, kernel_id),
                            "kernels": [km.kernel_model(k) for k in children_of(km, kernel_id)]})

