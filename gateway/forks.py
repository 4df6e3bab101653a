"""Forking kernels over HTTP: ``POST /api/kernels/{id}/fork`` and ``GET .../forks``.

A fork snapshots the parent's running VM (waits until the kernel is idle, pauses it for
the dirty pages, resumes it) and starts ``count`` new kernels of the gateway from that
snapshot. The orchestration is ``kernelmanager.fork``'s (the only one): this module
checks the limits, gives it a ``start_child`` that starts each child through the
gateway's kernel manager (so the children enter its map, with the parent's user), and
maps errors to HTTP. The children belong to the user who forked (``gateway.users``). The children are ordinary kernels in every way (listed, websockets,
interrupt, restart, delete, culling, limits), and their models carry their lineage,
which the runtime records (``kernelmanager.Lineage``): ``parent_id`` and ``forked_at``.

Request body: ``{"count": N, "reseed": true, "timeout": 30, "checkpoint": name}`` (all
optional; ``checkpoint``: the children start from that checkpoint (``gateway.hibernate``),
a hibernated parent's from its saved image without waking it; count 1..
``max_fork_count``). Answers ``201 {"kernels": [model, ...]}``; 409 when the parent
stayed busy past ``timeout``; 403 when the new kernels would pass a limit; 503 when the
snapshot failed (``ForkError``: QEMU or the host refused; the parent keeps running).

**Forks from inside a kernel** (the ``%fork`` magic, ``guest.magic``): ``GuestForks`` is
this gateway's ``kernelmanager.set_fork_request_handler`` handler. The request comes
from code in the guest, so it gets no more than its kernel's owner would over HTTP: the
branches belong to the parent's owner and count against the owner's kernel limits
(``max_kernels``, ``max_kernels_per_user``) and the fork-image budget, a request may ask
for at most ``max_fork_count`` branches, and each kernel may ask at most
``guest_forks_per_minute`` times a minute (sliding window). Every refusal's text goes
back into the cell that ran ``%fork``. The answer lists the branch ids in branch order
(``__fork__["index"]`` in each).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from tornado import web

from kernelmanager import ForkRequest, ForkSource, Lineage, fork, vm_handle
from kernelmanager.exceptions import LimitExceeded

from . import errors, users
from .handlers import GatewayHandlerMixin, _finish_json, check_owner

DEFAULT_MAX_FORK_COUNT = 64
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # what jupyter_server's GatewayClient parses


def lineage_of(mkm: Any, kernel_id: str) -> Lineage | None:
    """The lineage of a kernel of ``mkm`` (None unless it was started from a fork)."""
    handle = vm_handle(mkm.get_kernel(kernel_id)) if kernel_id in mkm else None
    return handle.lineage if handle is not None else None


def lineage_fields(mkm: Any, kernel_id: str) -> dict[str, Any]:
    """``parent_id`` and ``forked_at`` of a kernel model (both None unless forked)."""
    rec = lineage_of(mkm, kernel_id)
    if rec is None:
        return {"parent_id": None, "forked_at": None}
    return {"parent_id": rec.parent_id, "forked_at": rec.forked_at.strftime(STAMP_FORMAT)}


def children_of(mkm: Any, kernel_id: str, user: Any = None) -> list[str]:
    """The running kernels forked from ``kernel_id`` (those ``user`` may see, if given)."""
    return [kid for kid in mkm.list_kernel_ids()
            if (rec := lineage_of(mkm, kid)) is not None and rec.parent_id == kernel_id
            and (user is None or users.may_act(user, kid, mkm.owners.get(kid)))]


def child_starters(mkm: Any, kernel_name: str, user: Any, username: str
                   ) -> tuple[Callable[[ForkSource], Awaitable[str]], Callable[[str], Awaitable[None]]]:
    """``(start_child, stop_child)`` for ``kernelmanager.fork`` and the cross-host fork:
    each branch a kernel of ``mkm`` owned by ``user`` (tenant ``username``), started from
    a fork source; one that fails to start is shut down before the error goes on."""
    env = {"KERNEL_USERNAME": username} if username else {}

    async def start_child(source: ForkSource) -> str:
        kid = str(uuid.uuid4())
        try:
            await mkm.start_kernel(kernel_name=kernel_name, kernel_id=kid, env=env,
                                   user=user, fork_source=source)
        except BaseException:
            if kid in mkm:
                await mkm.shutdown_kernel(kid, now=True)
            raise
        mkm.sources[kid] = "fork"
        return kid

    async def stop_child(kid: str) -> None:
        if kid in mkm:
            await mkm.shutdown_kernel(kid, now=True)

    return start_child, stop_child


async def fork_kernel(mkm: Any, kernel_id: str, count: int, *, reseed: bool = True,
                      timeout: float = 30.0, user: Any = None, checkpoint: str | None = None) -> list[str]:
    """Fork ``kernel_id`` into ``count`` new kernels of ``mkm`` owned by ``user`` (None: the
    admin); returns their ids."""
    if user is not None:
        mkm.check_owner(kernel_id, user)
    mkm._check_kernel_id(kernel_id)
    parent = mkm.get_kernel(kernel_id)
    username = users.tenant(user) or mkm.usernames.get(kernel_id, "")
    mkm._check_limits(username, count)  # before the snapshot: all the children fit, or none start
    start_child, stop_child = child_starters(mkm, parent.kernel_name, user, username)
    ids: list[str] = await fork(parent, count, reseed=reseed, idle_timeout=timeout,
                                checkpoint=checkpoint, start_child=start_child, stop_child=stop_child)
    mkm.log.info("kernel %s: forked into %d (%s)", kernel_id, count, ", ".join(i[:8] for i in ids))
    return ids


class GuestForks:
    """Serves ``%fork`` requests for the kernels of ``mkm`` (see the module docstring)."""

    def __init__(self, mkm: Any, *, per_minute: int = 6, max_count: int = DEFAULT_MAX_FORK_COUNT,
                 window: float = 60.0) -> None:
        self.mkm = mkm
        self.per_minute = per_minute
        self.max_count = max_count
        self.window = window
        self._recent: dict[str, deque[float]] = {}  # kernel id -> times of its last requests
        mkm.removal_hooks.append(lambda kid: self._recent.pop(kid, None))

    def _check_rate(self, kernel_id: str) -> None:
        now = time.monotonic()
        recent = self._recent.setdefault(kernel_id, deque())
        while recent and now - recent[0] >= self.window:
            recent.popleft()
        if len(recent) >= self.per_minute:
            wait = self.window - (now - recent[0])
            raise LimitExceeded(f"rate limit: a kernel may ask for forks at most {self.per_minute} "
                                f"times a minute; try again in {wait:.0f} s")
        recent.append(now)

    async def __call__(self, req: ForkRequest) -> list[str]:
        mkm, kid = self.mkm, req.kernel_id
        if kid not in mkm:
            raise LimitExceeded(f"kernel {kid} is not a client kernel of this gateway (a warm-pool "
                                "kernel cannot fork)")
        if req.count > self.max_count:
            raise LimitExceeded(f"at most {self.max_count} branches per fork (max_fork_count), "
                                f"not {req.count}")
        self._check_rate(kid)
        owner = mkm.owners.get(kid)
        user = User(owner) if owner and users.tenant(User(owner)) else None  # None: the admin
        mkm.log.info("kernel %s: %%fork %d asked from inside the kernel (owner %s)", kid, req.count,
                     owner or users.ADMIN)
        ids = await fork_kernel(mkm, kid, req.count, reseed=req.reseed, timeout=req.timeout, user=user)

        def index(k: str) -> int:
            rec = lineage_of(mkm, k)
            return rec.index if rec is not None else 0

        return sorted(ids, key=index)


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
        checkpoint = body.get("checkpoint")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise web.HTTPError(400, "'checkpoint' must be the name of one of the kernel's checkpoints")
        km = self.kernel_manager
        with errors.translated():
            ids = await fork_kernel(km, kernel_id, count, reseed=reseed, timeout=float(timeout),
                                    user=self.current_user, checkpoint=checkpoint)
        _finish_json(self, {"kernels": [km.kernel_model(kid) for kid in ids if kid in km]}, 201)


class ForksListHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    async def get(self, kernel_id: str) -> None:
        km = self.kernel_manager
        check_owner(self, kernel_id)
        _finish_json(self, {"kernel_id": kernel_id, **lineage_fields(km, kernel_id),
                            "kernels": [km.kernel_model(k)
                                        for k in children_of(km, kernel_id, self.current_user)]})

