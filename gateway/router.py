"""``vmkg router``: one endpoint in front of several ``vmkg serve`` hosts, with the same API.

Stateless: any number of replicas, each knowing only the host list (``--host URL``
repeated, or ``--hosts-dns NAME:PORT``, re-resolved every poll: a Kubernetes headless
service), route any kernel. Nothing is shared between replicas and nothing is stored.

**Hosts' reports.** Every ``poll_interval`` the router asks each host ``GET
/api/vmkg/host`` (:class:`HostStatusHandler`, on the host): its id, kernels, ``max_kernels``,
pooled kernels, load. A host that does not answer is *down*; it is polled again and is up
as soon as it answers.

**Placement.** ``POST /api/kernels`` goes to the up host with the lowest load by its own
report: (kernels + starts this router has in flight there) / capacity, capacity
being its ``max_kernels`` (64 when unbounded); full hosts are skipped. If the chosen host
fails to answer, the next one is tried: new kernels go elsewhere when a host dies.

**How a kernel id is resolved** (no shared database): hosts make kernel ids (random UUID4s,
also for pooled kernels and fork branches, so they are unique across hosts), and the
router *asks the hosts*: an id it has not seen is looked up with ``GET /api/kernels/{id}``
on every up host at once; the one that answers 200 has it. The answer is cached (a bounded
LRU, also filled by starts, forks and listings): a cache, not state, since any replica can
rebuild it by asking. A cached kernel whose host is down answers 404 "its host ... is down",
an unknown one 404 naming any host that could not be asked.

**Forwarding.** REST calls are forwarded with httpx (a keep-alive pool per host,
TCP_NODELAY), websockets (``/channels``) are proxied frame for frame, text and binary
kept, the subprotocol (v1 or legacy) negotiated with the host, TCP_NODELAY on both
hops. ``GET /api/kernels`` merges every up host's list.

**Forks across hosts.** ``POST /api/kernels/{id}/fork {"count": N}`` places each branch
like a new kernel (least loaded by the hosts' reports, the branches already placed
counted; the parent's host wins ties, as its branches need no copy), among the hosts that
report a snapshot store. If every branch lands on the parent's host (or the request names
a ``checkpoint``, or ``spread_forks`` is off) the fork is forwarded as it is. Otherwise the
router asks the parent's host ``POST /api/kernels/{id}/fork-export {"local": n}``: it
captures the kernel once, pushes the snapshot to the store under its content address and
starts its own ``n`` branches from it (``kernelmanager.remote_fork``); then it asks each
other host ``POST /api/vmkg/fork-import {"fork_id", "count", ...}`` at once: each pulls the
snapshot (verified: a corrupt chunk is refused), checks it was taken on the very template
it runs, and starts its branches, owned by the same user (the requests carry the user's
identity), reseeded like any fork's. All or none: if a host fails, the branches already
started are deleted and its error is answered. The answer is the fork's, ``201
{"kernels": [model, ...]}``, each model with the ``host`` it runs on, plus ``fork_id``.
Fork snapshots stay in the store until ``vmkg store gc`` drops those older than a day.
``GET /api/kernels/{id}/forks`` lists the branches on every host (the parent's host
answers for the parent and its own; the others' lists add theirs), each with its ``host``.

**Identity.** The router authenticates clients exactly as the hosts do (the same
``TokenIdentityProvider``: ``auth_token``, ``users_file``) and forwards each request as
that user, signed with the shared ``router_secret`` (``gateway.forwarded``); hosts accept a
user from a request only with a valid signature, so the hosts' own owner checks and
per-user limits apply unchanged.

Routes: the hosts' (``gateway.routes``), plus ``GET /api/vmkg/hosts`` (the router's view
of its hosts, admin only) and its own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from jupyter_server.base.handlers import APIHandler
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import httpclient, httpserver, netutil, web, websocket
from traitlets import Bool, Float, Integer, List, Unicode
from traitlets.config import Application

from kernelmanager import export_fork, import_fork, kernelspec_name, store_configured

from . import errors, forwarded, logs, users
from .auth import TokenIdentityProvider
from .envvars import env_trait
from .forks import child_starters
from .handlers import GatewayHandlerMixin, _finish_json, unauthorized_message

log = logging.getLogger("vmkg.router")

KERNEL_ID = r"(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)"   # as gateway.routes (which imports this module)

#: this host process's id in its reports (a restarted host is a new host: its kernels are gone)
HOST_ID = secrets.token_hex(4)

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length", "authorization", "content-encoding",
        forwarded.USER_HEADER.lower(), forwarded.SIGNATURE_HEADER.lower()}

FORWARDED = Counter("vmkg_router_requests_total", "Requests the router forwarded, by kind and status",
                    ["kind", "code"])
FORWARD_SECONDS = Histogram("vmkg_router_forward_seconds", "Time to forward a REST call to its host",
                            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30))
HOSTS_UP = Gauge("vmkg_router_hosts_up", "Hosts answering their status poll")
HOSTS_KNOWN = Gauge("vmkg_router_hosts", "Hosts the router knows")
WEBSOCKETS = Gauge("vmkg_router_websockets", "Websockets proxied right now")


# -- the host side: its report --------------------------------------------------------------


class HostStatusHandler(GatewayHandlerMixin, APIHandler):
    """``GET /api/vmkg/host`` on a host: what routers place kernels by. Admin only (it counts
    every tenant's kernels)."""

    @web.authenticated
    def get(self) -> None:
        if not users.sees_all(self.current_user):
            raise web.HTTPError(403, "Only the admin (or a router) may read the host status")
        km: Any = self.kernel_manager
        pooled = km.pool.pooled() if getattr(km, "pool", None) is not None else {}
        self.finish(json.dumps({
            "host_id": HOST_ID, "kernels": len(km.list_kernel_ids()), "max_kernels": km.max_kernels,
            "pooled": sum(pooled.values()), "load1": os.getloadavg()[0], "cpus": os.cpu_count(),
            "store": store_configured(),
        }))


class _ForkBase(GatewayHandlerMixin, APIHandler):
    """What the two halves of a cross-host fork share: the body, and starting branches into
    this host's kernel map owned by the request's user (as ``gateway.forks``)."""

    def body(self) -> dict[str, Any]:
        body = self.get_json_body() or {}
        if not isinstance(body, dict):
            raise web.HTTPError(400, "The request body must be a JSON object")
        reseed = body.get("reseed", True)
        if not isinstance(reseed, bool):
            raise web.HTTPError(400, "'reseed' must be true or false")
        return body

    def count(self, body: dict[str, Any], key: str, low: int) -> int:
        cap = int(self.settings.get("vmkg_max_fork_count", 64))
        n = body.get(key, low)
        if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= cap:
            raise web.HTTPError(400, f"'{key}' must be an integer from {low} to {cap}")
        return n

    def starter(self, kernel_name: str, count: int) -> tuple[Any, Any]:
        mkm: Any = self.kernel_manager
        user = self.current_user
        username = users.tenant(user) or ""
        mkm._check_limits(username, count)   # before the snapshot: all fit, or none start
        return child_starters(mkm, kernel_name, user, username)


class ForkExportHandler(_ForkBase):
    """``POST /api/kernels/{id}/fork-export`` on the parent's host (a router's first step of
    a cross-host fork): body ``{"local": N, "reseed": true, "timeout": 30}``. Snapshots the
    kernel into the store and starts ``local`` (0..) branches here from the same snapshot.
    Answers ``201 {"fork_id", "template", "kernel_name", "forked_at", "kernels": [...]}``."""

    @web.authenticated
    async def post(self, kernel_id: str) -> None:
        body = self.body()
        local = self.count(body, "local", 0)
        timeout = body.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise web.HTTPError(400, "'timeout' must be a number of seconds from 0 to 3600")
        mkm: Any = self.kernel_manager
        with errors.translated():
            mkm.check_owner(kernel_id, self.current_user)
            mkm._check_kernel_id(kernel_id)
            parent = mkm.get_kernel(kernel_id)
            start_child, stop_child = self.starter(parent.kernel_name, local)
            t = time.time()
            out = await export_fork(parent, local=local, reseed=body.get("reseed", True),
                                    idle_timeout=float(timeout), start_child=start_child,
                                    owner=users.tenant(self.current_user) or "",
                                    stop_child=stop_child)
        log.info("kernel %s: fork exported (%s), %d branches here", kernel_id, out.fork_id[:12], local)
        _finish_json(self, {"fork_id": out.fork_id, "template": out.template,
                            "kernel_name": parent.kernel_name, "forked_at": t,
                            "seconds": out.seconds, "pushed_bytes": out.pushed_bytes,
                            "kernels": [mkm.kernel_model(k) for k in out.children if k in mkm]}, 201)


class ForkImportHandler(_ForkBase):
    """``POST /api/vmkg/fork-import`` on another host (a router's second step): body
    ``{"fork_id", "count", "template", "kernel_name", "parent_id", "forked_at", "reseed"}``.
    Pulls the fork snapshot (verified; only one the same user exported, unless the admin
    asks) and starts ``count`` branches of the request's user. Answers ``201 {"kernels": [...]}``."""

    @web.authenticated
    async def post(self) -> None:
        body = self.body()
        count = self.count(body, "count", 1)
        raw = {k: body.get(k) for k in ("fork_id", "template", "kernel_name", "parent_id")}
        bad = [k for k, v in raw.items() if not isinstance(v, str) or not v or len(v) > 200]
        if bad:
            raise web.HTTPError(400, f"fork-import needs {', '.join(bad)} (strings)")
        fields = {k: str(v) for k, v in raw.items()}
        if len(fields["fork_id"]) != 64 or fields["fork_id"].strip("0123456789abcdef"):
            raise web.HTTPError(400, "'fork_id' must be a fork snapshot id (64 hex digits)")
        forked_at = body.get("forked_at")
        if forked_at is not None and (isinstance(forked_at, bool) or not isinstance(forked_at, (int, float))):
            raise web.HTTPError(400, "'forked_at' must be a Unix time")
        if fields["kernel_name"] != kernelspec_name(fields["template"]):
            raise web.HTTPError(400, f"kernel {fields['kernel_name']!r} does not run template "
                                     f"{fields['template']!r}")
        mkm: Any = self.kernel_manager
        with errors.translated():
            start_child, stop_child = self.starter(fields["kernel_name"], count)
            ids = await import_fork(fields["fork_id"], count, template=fields["template"],
                                    parent_id=fields["parent_id"], forked_at=forked_at,
                                    reseed=body.get("reseed", True), start_child=start_child,
                                    stop_child=stop_child, owner=users.tenant(self.current_user))
        log.info("kernel %s: %d branches imported here (%s)", fields["parent_id"], count,
                 ", ".join(i[:8] for i in ids))
        _finish_json(self, {"kernels": [mkm.kernel_model(k) for k in ids if k in mkm]}, 201)


# -- the router's view of its hosts ---------------------------------------------------------


class HostDown(Exception):
    """The host that holds a kernel does not answer."""


@dataclass
class Host:
    url: str
    host_id: str = ""
    up: bool = False
    kernels: int = 0
    max_kernels: int | None = None
    pending: int = 0                 # kernel starts this router has in flight there
    store: bool = False              # it has a snapshot store: it can take part in cross-host forks
    error: str = "not polled yet"
    since: float = field(default_factory=time.time)

    def score(self) -> float:
        return (self.kernels + self.pending) / (self.max_kernels or 64)

    def full(self) -> bool:
        return self.max_kernels is not None and self.kernels + self.pending >= self.max_kernels

    def view(self) -> dict[str, Any]:
        return {"url": self.url, "host_id": self.host_id, "up": self.up, "kernels": self.kernels,
                "max_kernels": self.max_kernels, "pending": self.pending, "store": self.store,
                "error": None if self.up else self.error, "since": self.since}


class Hosts:
    """The hosts, their reports, the HTTP client to them and the kernel-location cache."""

    def __init__(self, urls: list[str], dns: str, secret: str, poll_interval: float,
                 request_timeout: float, spread_forks: bool = True) -> None:
        self.spread_forks = spread_forks
        self.hosts: dict[str, Host] = {u.rstrip("/"): Host(u.rstrip("/")) for u in urls}
        self.dns, self.secret, self.poll_interval = dns, secret, poll_interval
        self.locations: OrderedDict[str, str] = OrderedDict()   # kernel id -> host url (LRU)
        self.max_locations = 100_000
        transport = httpx.AsyncHTTPTransport(
            retries=0, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        self.client = httpx.AsyncClient(transport=transport, timeout=request_timeout)
        self.poll_timeout = min(5.0, request_timeout)
        self._ready = asyncio.Event()

    # -- polling -----------------------------------------------------------------------------

    async def _discover(self) -> None:
        if not self.dns:
            return
        name, _, port = self.dns.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.warning("hosts %s: cannot resolve: %s", self.dns, exc)
            return
        urls = set()
        for family, _, _, _, addr in infos:
            ip = str(addr[0])
            port_ = int(addr[1])
            urls.add(f"http://[{ip}]:{port_}" if family == socket.AF_INET6 else f"http://{ip}:{port_}")
        for url in sorted(urls - set(self.hosts)):
            log.info("host %s: discovered (%s)", url, self.dns)
            self.hosts[url] = Host(url)
        for url in set(self.hosts) - urls:
            host = self.hosts.pop(url)
            log.info("host %s: gone from %s", url, self.dns)
            host.up = False

    async def poll_once(self) -> None:
        await self._discover()
        await asyncio.gather(*(self._poll(h) for h in list(self.hosts.values())))
        HOSTS_KNOWN.set(len(self.hosts))
        HOSTS_UP.set(sum(h.up for h in self.hosts.values()))
        self._ready.set()

    async def _poll(self, host: Host) -> None:
        try:
            r = await self.request(host, "GET", "/api/vmkg/host", users.ADMIN, timeout=self.poll_timeout)
            if r.status_code != 200:
                raise HostDown(f"status {r.status_code}: {r.text[:200]}")
            report = r.json()
        except (httpx.HTTPError, HostDown, ValueError) as exc:
            if host.up or host.error == "not polled yet":
                log.warning("host %s: down: %s", host.url, exc or type(exc).__name__)
                host.since = time.time()
            host.up, host.error = False, str(exc) or type(exc).__name__
            return
        if not host.up:
            log.info("host %s: up (host id %s, %d kernels)", host.url, report.get("host_id"),
                     report.get("kernels", 0))
            host.since = time.time()
        if host.host_id and report.get("host_id") != host.host_id:
            log.warning("host %s: restarted (host id %s -> %s): its old kernels are gone", host.url,
                        host.host_id, report.get("host_id"))
            self.forget_host(host.url)
        host.up, host.error = True, ""
        host.host_id = str(report.get("host_id", ""))
        host.kernels = int(report.get("kernels", 0))
        host.store = bool(report.get("store"))
        mk = report.get("max_kernels")
        host.max_kernels = int(mk) if isinstance(mk, int) else None

    async def poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling whatever one round did
                log.exception("hosts: poll failed")
            await asyncio.sleep(self.poll_interval)

    async def ready(self) -> None:
        await self._ready.wait()

    # -- requests to hosts -------------------------------------------------------------------

    def signed(self, user: str, method: str, path: str) -> dict[str, str]:
        return forwarded.sign(self.secret, user, method, path)

    async def request(self, host: Host, method: str, path: str, user: str, *, query: str = "",
                      body: bytes | None = None, headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> httpx.Response:
        url = host.url + path + (f"?{query}" if query else "")
        hdrs = {**(headers or {}), **self.signed(user, method, path)}
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return await self.client.request(method, url, content=body, headers=hdrs, **kwargs)

    async def kernels_of(self, host: Host, user: str) -> httpx.Response | None:
        """``GET /api/kernels`` on ``host`` as ``user`` (the host filters it to the user);
        the ids of a 200 answer are remembered as that host's. None if the host failed."""
        try:
            r = await self.request(host, "GET", "/api/kernels", user)
        except httpx.HTTPError as exc:
            log.warning("host %s: cannot list kernels: %s", host.url, exc)
            return None
        if r.status_code == 200:
            for m in r.json():
                if isinstance(m, dict) and isinstance(m.get("id"), str):
                    self.remember(m["id"], host)
        return r

    def up(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.up]

    def any_up(self) -> Host:
        up = self.up()
        if not up:
            raise web.HTTPError(503, "No host is answering (%s)", self.describe_down())
        return min(up, key=Host.score)

    def placements(self) -> list[Host]:
        """Up hosts with room, least loaded first."""
        return sorted((h for h in self.up() if not h.full()), key=Host.score)

    def describe_down(self) -> str:
        down = [f"{h.url}: {h.error}" for h in self.hosts.values() if not h.up]
        return "; ".join(down) if down else "no hosts configured"

    # -- where kernels are -------------------------------------------------------------------

    def remember(self, kernel_id: str, host: Host) -> None:
        self.locations[kernel_id] = host.url
        self.locations.move_to_end(kernel_id)
        while len(self.locations) > self.max_locations:
            self.locations.popitem(last=False)

    def forget(self, kernel_id: str) -> None:
        self.locations.pop(kernel_id, None)

    def forget_host(self, url: str) -> None:
        for kid in [k for k, u in self.locations.items() if u == url]:
            del self.locations[kid]

    async def locate(self, kernel_id: str) -> Host:
        """The up host that has ``kernel_id``. 404 (web.HTTPError) when none has it, with the
        reason: its host is down, or hosts that could not be asked."""
        url = self.locations.get(kernel_id)
        if url is not None:
            host = self.hosts.get(url)
            if host is not None and host.up:
                return host
            raise web.HTTPError(404, "Kernel %s: its host %s is down (%s); the kernel is lost",
                                kernel_id, url, host.error if host else "removed from the host list")
        up = self.up()

        async def ask(host: Host) -> Host | None:
            try:
                r = await self.request(host, "GET", f"/api/kernels/{kernel_id}", users.ADMIN,
                                       timeout=self.poll_timeout)
            except httpx.HTTPError:
                return None
            return host if r.status_code == 200 else None

        for found in await asyncio.gather(*(ask(h) for h in up)):
            if found is not None:
                self.remember(kernel_id, found)
                return found
        down = [h.url for h in self.hosts.values() if not h.up]
        raise web.HTTPError(404, "Kernel does not exist: %s%s", kernel_id,
                            f" (on no host that answers; down: {', '.join(down)})" if down else "")

    async def close(self) -> None:
        await self.client.aclose()


# -- the router's handlers ------------------------------------------------------------------


def _hosts(handler: web.RequestHandler) -> Hosts:
    hosts: Hosts = handler.settings["vmkg_hosts"]
    return hosts


class RouterHandler(GatewayHandlerMixin, APIHandler):
    """Authenticates like a host (``GatewayHandlerMixin.prepare``), then forwards."""

    def check_xsrf_cookie(self) -> None:
        return None

    @property
    def user_name(self) -> str:
        return str(getattr(self.current_user, "username", users.ANONYMOUS))

    async def forward(self, host: Host, kind: str, kernel_id: str | None = None) -> httpx.Response | None:
        """Forward this request to ``host`` and write its answer; returns the answer (None if the
        host failed: a 502 was written)."""
        req = self.request
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
        query = urlencode([(k, v.decode()) for k, vs in req.query_arguments.items() if k != "token"
                           for v in vs])
        t0 = time.perf_counter()
        try:
            r = await _hosts(self).request(host, req.method or "GET", req.path, self.user_name,
                                           query=query, body=req.body or None, headers=headers)
        except httpx.HTTPError as exc:
            FORWARDED.labels(kind, "502").inc()
            host.up, host.error = False, f"{type(exc).__name__}: {exc}"
            raise web.HTTPError(502, "Host %s did not answer%s: %s", host.url,
                                f" for kernel {kernel_id}" if kernel_id else "", host.error) from exc
        FORWARD_SECONDS.observe(time.perf_counter() - t0)
        FORWARDED.labels(kind, str(r.status_code)).inc()
        self.set_status(r.status_code, r.reason_phrase or None)
        for k, v in r.headers.multi_items():
            if k.lower() in _HOP or k.lower() in ("date", "server"):
                continue
            if k.lower() == "set-cookie":
                self.add_header(k, v)
            else:
                self.set_header(k, v)
        if r.status_code in (204, 304):
            self.finish()
        else:
            self.finish(r.content)
        return r


class AnyHostHandler(RouterHandler):
    """What every host answers the same (API version, kernelspecs): any up host."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        await self.forward(_hosts(self).any_up(), "any")


class KernelsHandler(RouterHandler):
    async def get(self) -> None:
        """Every up host's list (each filtered to the user by the host), merged."""
        hosts = _hosts(self)
        up = hosts.up()

        async def one(host: Host) -> list[dict[str, Any]]:
            r = await hosts.kernels_of(host, self.user_name)
            if r is not None and r.status_code == 403:
                raise web.HTTPError(403, "%s", r.json().get("message", "listing kernels is disabled"))
            if r is None or r.status_code != 200:
                return []
            models: list[dict[str, Any]] = r.json()
            return models

        merged = [m for models in await asyncio.gather(*(one(h) for h in up)) for m in models]
        FORWARDED.labels("list", "200").inc()
        self.finish(json.dumps(merged))

    async def post(self) -> None:
        hosts = _hosts(self)
        tried = []
        for host in hosts.placements():
            host.pending += 1
            try:
                r = await hosts.request(host, "POST", self.request.path, self.user_name,
                                        body=self.request.body or None,
                                        headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                host.pending -= 1
                host.up, host.error = False, f"{type(exc).__name__}: {exc}"
                log.warning("host %s: did not answer a kernel start (%s); trying the next host",
                            host.url, host.error)
                tried.append(host.url)
                continue
            host.pending -= 1
            if r.status_code == 201:
                host.kernels += 1        # until its next report says so itself
                kid = r.json().get("id")
                if kid:
                    hosts.remember(kid, host)
                    log.info("kernel %s: placed on host %s", kid, host.url)
            FORWARDED.labels("start", str(r.status_code)).inc()
            self.set_status(r.status_code, r.reason_phrase or None)
            for k in ("Content-Type", "Location"):
                if k in r.headers:
                    self.set_header(k, r.headers[k])
            self.finish(r.content)
            return
        FORWARDED.labels("start", "503").inc()
        raise web.HTTPError(503, "No host can start a kernel now (%s%s)",
                            f"tried {', '.join(tried)}; " if tried else "", hosts.describe_down()
                            if not hosts.up() else "every host that answers is full")


class KernelHandler(RouterHandler):
    """Everything under ``/api/kernels/{id}`` but the channels websocket."""

    async def _any(self, kernel_id: str, rest: str = "") -> None:
        hosts = _hosts(self)
        host = await hosts.locate(kernel_id)
        if self.request.method == "POST" and rest == "/fork":
            plan = self._fork_plan(host)
            if plan is not None:
                await self._cross_host_fork(kernel_id, host, *plan)
                return
        if self.request.method == "GET" and rest == "/forks":
            await self._forks_everywhere(kernel_id, host)
            return
        r = await self.forward(host, "kernel", kernel_id)
        if r is None:
            return
        method = self.request.method
        if (method == "DELETE" and not rest and r.status_code == 204) or r.status_code == 404:
            hosts.forget(kernel_id)
        elif method == "POST" and rest == "/fork" and r.status_code == 201:
            for child in r.json().get("kernels", []):
                cid = child.get("id") if isinstance(child, dict) else child
                if isinstance(cid, str):
                    hosts.remember(cid, host)

    get = post = put = delete = patch = _any

    # -- forks across hosts ------------------------------------------------------------------

    def _fork_plan(self, parent: Host) -> tuple[dict[str, Any], dict[str, int]] | None:
        """(request body, branches per host url) when the fork's branches should not all
        stay on the parent's host; None: forward the fork to it as it is."""
        hosts = _hosts(self)
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            return None                     # the host answers the 400
        if not isinstance(body, dict) or body.get("checkpoint") is not None:
            return None                     # a checkpoint fork stays where the checkpoint is
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1024:
            return None
        if not parent.store or not hosts.spread_forks:
            return None
        others = [h for h in hosts.placements() if h.store and h is not parent]
        if not others:
            return None
        plan = place_branches(parent, others, count)
        return (body, plan) if set(plan) != {parent.url} else None

    async def _cross_host_fork(self, kernel_id: str, parent: Host, body: dict[str, Any],
                               plan: dict[str, int]) -> None:
        """Export on the parent's host (with its local branches), import on the others; all
        branches or none (those started are deleted when one host fails)."""
        hosts = _hosts(self)
        user = self.user_name
        t0 = time.perf_counter()
        common = {k: body[k] for k in ("reseed", "timeout") if k in body}
        local = plan.get(parent.url, 0)
        log.info("kernel %s: fork into %d across hosts: %s", kernel_id, sum(plan.values()),
                 ", ".join(f"{u} x{n}" for u, n in plan.items()))
        started: list[tuple[Host, str]] = []
        try:
            r = await hosts.request(parent, "POST", f"/api/kernels/{kernel_id}/fork-export", user,
                                    body=json.dumps({**common, "local": local}).encode(),
                                    headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            FORWARDED.labels("fork", "502").inc()
            raise web.HTTPError(502, "Host %s did not answer the fork of kernel %s: %s", parent.url,
                                kernel_id, exc) from exc
        if r.status_code != 201:
            FORWARDED.labels("fork", str(r.status_code)).inc()
            self._relay_error(r)
            return
        exported = r.json()
        branches: list[dict[str, Any]] = []
        for model in exported.get("kernels", []):
            started.append((parent, model["id"]))
            branches.append({**model, "host": parent.url})
        imports = {
            "fork_id": exported["fork_id"], "template": exported["template"],
            "kernel_name": exported["kernel_name"], "parent_id": kernel_id,
            "forked_at": exported.get("forked_at"), **{k: body[k] for k in ("reseed",) if k in body}}
        targets = [(hosts.hosts[u], n) for u, n in plan.items() if u != parent.url]

        async def one(host: Host, n: int) -> httpx.Response | Exception:
            host.pending += n
            try:
                return await hosts.request(host, "POST", "/api/vmkg/fork-import", user,
                                           body=json.dumps({**imports, "count": n}).encode(),
                                           headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                return exc
            finally:
                host.pending -= n

        results = await asyncio.gather(*(one(h, n) for h, n in targets))
        failure: tuple[Host, httpx.Response | Exception] | None = None
        for (host, n), res in zip(targets, results, strict=True):
            if isinstance(res, httpx.Response) and res.status_code == 201:
                host.kernels += n
                for model in res.json().get("kernels", []):
                    started.append((host, model["id"]))
                    branches.append({**model, "host": host.url})
            elif failure is None:
                failure = (host, res)
        if failure is not None:
            await asyncio.gather(*(hosts.request(h, "DELETE", f"/api/kernels/{k}", user)
                                   for h, k in started), return_exceptions=True)
            host, res = failure
            if isinstance(res, Exception):
                FORWARDED.labels("fork", "502").inc()
                raise web.HTTPError(502, "Host %s did not answer while starting branches of "
                                    "kernel %s: %s (no branch was kept)", host.url, kernel_id, res)
            FORWARDED.labels("fork", str(res.status_code)).inc()
            self._relay_error(res, prefix=f"branches on host {host.url} (no branch was kept): ")
            return
        for host, k in started:
            hosts.remember(k, host)
        FORWARDED.labels("fork", "201").inc()
        log.info("kernel %s: forked across hosts into %d in %.1f s (snapshot %s)", kernel_id,
                 len(branches), time.perf_counter() - t0, str(exported["fork_id"])[:12])
        self.set_status(201)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"kernels": branches, "fork_id": exported["fork_id"]}))

    async def _forks_everywhere(self, kernel_id: str, parent: Host) -> None:
        """``GET /api/kernels/{id}/forks``: the parent's host answers for the parent (owner
        check, lineage) and its local branches; the branches a cross-host fork put on other
        hosts are added from their lists (each filtered to the user by its host), every
        model with the ``host`` it runs on."""
        hosts = _hosts(self)
        try:
            r = await hosts.request(parent, "GET", self.request.path, self.user_name)
        except httpx.HTTPError as exc:
            FORWARDED.labels("forks", "502").inc()
            parent.up, parent.error = False, f"{type(exc).__name__}: {exc}"
            raise web.HTTPError(502, "Host %s did not answer for kernel %s: %s", parent.url,
                                kernel_id, parent.error) from exc
        if r.status_code != 200:
            FORWARDED.labels("forks", str(r.status_code)).inc()
            self._relay_error(r)
            return
        answer = r.json()
        branches = [{**m, "host": parent.url} for m in answer.get("kernels", [])]
        seen = {m["id"] for m in branches}

        async def elsewhere(host: Host) -> list[dict[str, Any]]:
            listed = await hosts.kernels_of(host, self.user_name)
            if listed is None or listed.status_code != 200:
                return []
            return [{**m, "host": host.url} for m in listed.json()
                    if isinstance(m, dict) and m.get("parent_id") == kernel_id]

        others = [h for h in hosts.up() if h is not parent]
        for models in await asyncio.gather(*(elsewhere(h) for h in others)):
            branches += [m for m in models if m["id"] not in seen]
            seen.update(m["id"] for m in models)
        FORWARDED.labels("forks", "200").inc()
        self.finish(json.dumps({**answer, "kernels": branches}))

    def _relay_error(self, r: httpx.Response, prefix: str = "") -> None:
        try:
            message = str(r.json().get("message") or r.text)
        except ValueError:
            message = r.text[:2000]
        self.set_status(r.status_code, r.reason_phrase or None)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": prefix + message, "reason": r.reason_phrase}))


def place_branches(parent: Host, others: list[Host], count: int) -> dict[str, int]:
    """Branches per host url: each branch goes to the least-loaded host by its report (the
    branches already placed counted), the parent's host winning ties (no copy through the
    store); hosts that would become full are skipped."""
    extra: dict[str, int] = {}
    candidates = [parent, *others]
    for _ in range(count):
        def score(h: Host) -> tuple[float, int]:
            return ((h.kernels + h.pending + extra.get(h.url, 0)) / (h.max_kernels or 64),
                    0 if h is parent else 1)

        room = [h for h in candidates if h.max_kernels is None
                or h.kernels + h.pending + extra.get(h.url, 0) < h.max_kernels]
        best = min(room, key=score) if room else parent   # the parent's host answers 403 if full
        extra[best.url] = extra.get(best.url, 0) + 1
    return extra


class HostsHandler(RouterHandler):
    @web.authenticated
    def get(self) -> None:
        if not users.sees_all(self.current_user):
            raise web.HTTPError(403, "Only the admin may read the router's host list")
        self.finish(json.dumps([h.view() for h in _hosts(self).hosts.values()]))


class MetricsHandler(RouterHandler):
    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        if self.settings.get("vmkg_authenticate_metrics", True):
            await super().prepare(*args, **kwargs)

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(REGISTRY))


class NotFoundHandler(RouterHandler):
    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        await super().prepare(*args, **kwargs)
        raise web.HTTPError(404, "No such resource: %s", self.request.path)


class ChannelsProxy(websocket.WebSocketHandler):
    """The kernel's channels websocket, proxied to its host frame by frame."""

    upstream: websocket.WebSocketClientConnection | None = None
    _pump: asyncio.Task[None] | None = None

    def kernel_id_credential(self) -> bool:
        # the host checks the kernel exists (and that the kernel-id user may act only on it)
        return bool(self.settings.get("vmkg_kernel_id_ws_auth"))

    def check_origin(self, origin: str) -> bool:
        allow = self.settings.get("allow_origin", "")
        return bool(allow == "*" or origin == allow or not allow and super().check_origin(origin))

    async def get(self, kernel_id: str, *args: Any, **kwargs: Any) -> None:
        ip = self.settings["identity_provider"]
        user = await ip.get_user(self)
        if user is None:
            raise web.HTTPError(401, "%s", unauthorized_message(self))
        hosts = _hosts(self)
        host = await hosts.locate(kernel_id)
        path = self.request.path
        query = urlencode([(k, v.decode()) for k, vs in self.request.query_arguments.items()
                           if k != "token" for v in vs])
        url = host.url.replace("http", "ws", 1) + path + (f"?{query}" if query else "")
        offered = self.request.headers.get("Sec-WebSocket-Protocol", "")
        subprotocols = [p.strip() for p in offered.split(",") if p.strip()] or None
        request = httpclient.HTTPRequest(
            url, headers=hosts.signed(str(user.username), "GET", path), connect_timeout=10,
            request_timeout=30)
        try:
            self.upstream = await websocket.websocket_connect(
                request, subprotocols=subprotocols,
                max_message_size=self.settings.get("websocket_max_message_size", 64 << 20))
        except httpclient.HTTPClientError as exc:
            FORWARDED.labels("websocket", str(exc.code)).inc()
            body = exc.response.body if exc.response is not None else b""
            try:
                message = json.loads(body or b"{}").get("message") or str(exc)
            except ValueError:
                message = str(exc)
            raise web.HTTPError(exc.code, "%s", message) from exc
        except OSError as exc:
            FORWARDED.labels("websocket", "502").inc()
            raise web.HTTPError(502, "Host %s did not answer for kernel %s: %s", host.url,
                                kernel_id, exc) from exc
        assert self.upstream.protocol is not None
        self.upstream.protocol.set_nodelay(True)
        FORWARDED.labels("websocket", "101").inc()
        await super().get(kernel_id, *args, **kwargs)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return self.upstream.selected_subprotocol if self.upstream is not None else None

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)
        WEBSOCKETS.inc()
        self._pump = asyncio.ensure_future(self._from_host())

    async def _from_host(self) -> None:
        up = self.upstream
        assert up is not None
        while True:
            msg = await up.read_message()
            if msg is None:
                break
            try:
                await self.write_message(msg, binary=isinstance(msg, bytes))
            except websocket.WebSocketClosedError:
                break
        code = up.close_code or 1011
        self.close(code if code != 1006 else 1011,
                   up.close_reason or "the kernel's host closed the connection")

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            try:
                await self.upstream.write_message(message, binary=isinstance(message, bytes))
            except websocket.WebSocketClosedError:
                self.close(1011, "the kernel's host closed the connection")

    def on_close(self) -> None:
        WEBSOCKETS.dec()
        if self.upstream is not None:
            self.upstream.close(self.close_code or 1000, self.close_reason)


def router_routes(base_url: str) -> list[tuple[str, type]]:
    from jupyter_server.services.kernelspecs.handlers import kernel_name_regex
    from jupyter_server.utils import url_path_join

    table: list[tuple[str, type]] = [
        (r"/api", AnyHostHandler),
        (r"/api/kernelspecs", AnyHostHandler),
        (rf"/api/kernelspecs/{kernel_name_regex}", AnyHostHandler),
        (rf"/kernelspecs/{kernel_name_regex}/(?P<path>.*)", AnyHostHandler),
        (r"/api/kernels", KernelsHandler),
        (rf"/api/kernels/{KERNEL_ID}/channels", ChannelsProxy),
        (rf"/api/kernels/{KERNEL_ID}(?P<rest>/.*)?", KernelHandler),
        (r"/api/vmkg/hosts", HostsHandler),
        (r"/metrics", MetricsHandler),
        (r"/(.*)", NotFoundHandler),
    ]
    return [(url_path_join(base_url, p), cls) for p, cls in table]


class RouterApp(Application):
    name = "vmkg router"
    description = ("Serve the gateway API in front of several `vmkg serve` hosts: new kernels go "
                   "to the least-loaded host, every call and websocket of a kernel to the host "
                   "that runs it. Stateless: run as many replicas as you like. Clients "
                   "authenticate as with a host (same token and users file); hosts must share "
                   "router_secret ($VMKG_ROUTER_SECRET) to accept the users it forwards.")
    classes = [TokenIdentityProvider]
    aliases = {
        "ip": "RouterApp.ip", "port": "RouterApp.port", "host": "RouterApp.hosts",
        "hosts-dns": "RouterApp.hosts_dns", "users-file": "TokenIdentityProvider.users_file",
        "poll-interval": "RouterApp.poll_interval", "log-level": "Application.log_level",
        "router-secret": "RouterApp.router_secret", "base-url": "RouterApp.base_url",
    }
    flags = {
        "no-auth": ({"RouterApp": {"auth_enabled": False}}, "Accept requests without a token."),
        "json-logs": ({"RouterApp": {"json_logs": True}}, "Log one JSON object per line."),
        "no-spread-forks": ({"RouterApp": {"spread_forks": False}},
                            "Keep every fork's branches on the parent's host."),
    }

    ip = env_trait(Unicode, "VMKG_IP", "127.0.0.1", help="Address to listen on.")
    port = env_trait(Integer, "VMKG_PORT", 8888, help="Port to listen on; 0 picks a free one.")
    base_url = env_trait(Unicode, "VMKG_BASE_URL", "/", help="Path prefix of every route.")
    hosts = env_trait(List, "VMKG_ROUTER_HOSTS", [], trait=Unicode(),
                      help="The hosts' URLs (http://IP:PORT of each `vmkg serve`); --host repeated.")
    hosts_dns = env_trait(Unicode, "VMKG_ROUTER_HOSTS_DNS", "",
                          help="NAME:PORT whose addresses are the hosts, re-resolved every poll "
                               "(a Kubernetes headless service).")
    router_secret = env_trait(Unicode, "VMKG_ROUTER_SECRET", "",
                              help="The secret shared with the hosts, signing the identity of "
                                   "every request forwarded (required).")
    auth_enabled = env_trait(Bool, "VMKG_AUTH_ENABLED", True, help="Require the token on every request.")
    auth_token = env_trait(Unicode, "VMKG_AUTH_TOKEN", "",
                           help="The admin token clients present (as on the hosts). Generated and "
                                "printed at start if empty.")
    kernel_id_ws_auth = env_trait(Bool, "VMKG_KERNEL_ID_WS_AUTH", False,
                                  help="As on the hosts: accept a channels websocket without a "
                                       "credential, the kernel id standing in (the host decides).")
    poll_interval = env_trait(Float, "VMKG_ROUTER_POLL_INTERVAL", 2.0, zero_is_default=True,
                              help="Seconds between two polls of the hosts' status.")
    request_timeout = env_trait(Float, "VMKG_ROUTER_REQUEST_TIMEOUT", 600.0, zero_is_default=True,
                                help="Seconds a forwarded REST call may take (a kernel start that "
                                     "bakes a template takes minutes).")
    spread_forks = env_trait(Bool, "VMKG_ROUTER_SPREAD_FORKS", True,
                             help="Place a fork's branches on the least-loaded hosts (the snapshot "
                                  "goes through the hosts' store); off: every branch stays on the "
                                  "parent's host.")
    max_body_size = env_trait(Integer, "VMKG_MAX_FILE_SIZE", 100 * 1024 * 1024,
                              help="Largest request body forwarded, in bytes (file uploads).")
    max_message_size = env_trait(Integer, "VMKG_MAX_MESSAGE_SIZE", 64 * 1024 * 1024,
                                 zero_is_default=True, help="Largest websocket message forwarded.")
    allow_origin = env_trait(Unicode, "VMKG_ALLOW_ORIGIN", "", help="Access-Control-Allow-Origin.")
    authenticate_metrics = env_trait(Bool, "VMKG_AUTHENTICATE_METRICS", True,
                                     help="Require the token for /metrics.")
    json_logs = env_trait(Bool, "VMKG_JSON_LOGS", False, help="Log one JSON object per line.")

    def start(self) -> None:
        logs.configure(self.log_level, self.json_logs)  # type: ignore[arg-type]
        if not self.hosts and not self.hosts_dns:
            print("vmkg router: error: no hosts: give --host=URL (repeated) or --hosts-dns=NAME:PORT",
                  file=__import__("sys").stderr)
            self.exit(2)
        if not self.router_secret:
            print("vmkg router: error: router_secret ($VMKG_ROUTER_SECRET) is required: the hosts "
                  "accept forwarded users only with it", file=__import__("sys").stderr)
            self.exit(2)
        try:
            asyncio.run(self.serve())
        except OSError as exc:
            log.critical("cannot listen on %s:%s: %s", self.ip, self.port, exc)
            self.exit(1)

    async def serve(self) -> None:
        token = self.auth_token if self.auth_enabled else ""
        generated = self.auth_enabled and not token
        if generated:
            token = secrets.token_urlsafe(24)
        identity = TokenIdentityProvider(parent=self, log=log, token=token, router_secret="")
        hosts = Hosts(list(self.hosts), self.hosts_dns, self.router_secret, self.poll_interval,
                      self.request_timeout, self.spread_forks)
        poller = asyncio.ensure_future(hosts.poll_forever())
        await asyncio.wait_for(hosts.ready(), 30)
        app = web.Application(
            router_routes(self.base_url), base_url=self.base_url, identity_provider=identity,
            vmkg_hosts=hosts, vmkg_kernel_id_ws_auth=self.kernel_id_ws_auth,
            vmkg_authenticate_metrics=self.authenticate_metrics, allow_origin=self.allow_origin,
            vmkg_allowed_hosts=[self.ip], websocket_max_message_size=self.max_message_size,
            disable_check_xsrf=True, allow_remote_access=True, config=self.config,
            authorizer=_allow_all(identity, self), kernel_manager=None)
        server = httpserver.HTTPServer(app, max_body_size=self.max_body_size,
                                       max_buffer_size=self.max_body_size + (1 << 20),
                                       idle_connection_timeout=60, decompress_request=False)
        sockets = netutil.bind_sockets(self.port, self.ip, family=socket.AF_UNSPEC)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        up = len(hosts.up())
        print(f"vmkg router: serving on http://{host}:{port}{self.base_url.rstrip('/')}/ "
              f"({up} of {len(hosts.hosts)} hosts up)", flush=True)
        if generated:
            print(f"vmkg router: no token configured ($VMKG_AUTH_TOKEN); generated for this run: "
                  f"{token}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            server.stop()
            poller.cancel()
            await hosts.close()
            log.info("router stopped")


def _allow_all(identity: Any, parent: Any) -> Any:
    from jupyter_server.auth.authorizer import AllowAllAuthorizer

    return AllowAllAuthorizer(parent=parent, identity_provider=identity)


def host_url(url: str) -> str:
    """``url`` checked as a host URL (http or https, a host part)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not a host URL (http://IP:PORT)")
    return url.rstrip("/")


__all__ = ["RouterApp", "HostStatusHandler", "Hosts", "Host"]
