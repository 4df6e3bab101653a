"""The dashboard: ``GET /``, a small page that shows a user's kernels as a tree by lineage
and lets them delete a kernel or fork one.

Everything it needs is served here (``gateway/static/``: one HTML page, one script, one
stylesheet; no CDN, no inline script or style). The page polls
``GET dashboard/api/kernels`` every two seconds.

**How a browser signs in.** The REST API stays token-only (header or ``?token=``, no
cookie: ``gateway.auth``). The dashboard is opened once as ``/?token=TOKEN``; a valid
token (the admin's or a users-file user's) gets a signed session cookie (``vmkg-dashboard``:
HttpOnly, SameSite=Strict, Secure under TLS, path = base_url, ``COOKIE_DAYS`` days) and a
302 to the page without the token, so the token leaves the address bar and the history.
The cookie names the user and is accepted by the dashboard's own routes only
(``dashboard/...`` and ``/``), never by ``/api``; a user removed from the users file
loses the dashboard at their next request. Without auth (``--no-auth``) the page is open
like the API is (Host checked, ``gateway.auth.check_host``).

**Actions** (``POST dashboard/api/kernels/{id}/delete|fork``) need the CSRF token the
page carries in a ``<meta>`` tag, sent back as ``X-VMKG-CSRF``: an HMAC of the session
cookie under a per-process key, compared in constant time, so another site can neither
read nor forge it (besides SameSite=Strict); an ``Origin`` header, when sent, must be this
host. Each user sees and acts on their own kernels only (``visible_kernels``,
``check_owner``: another user's kernel is the 404 of an unknown one); the admin sees all.
A fork from the page is one branch, through ``gateway.forks.fork_kernel`` (the user's
limits, the fork-image budget).

**Headers** on every dashboard response: ``Content-Security-Policy: default-src 'self';
...; frame-ancestors 'none'`` (no inline script), ``X-Content-Type-Options: nosniff``,
``Referrer-Policy: no-referrer``, ``Cache-Control: no-store``.

Each kernel in the JSON: id, parent_id, execution_state, template, connections,
last_activity, ``vm_age`` (seconds since its current VM was restored: a restart starts
it again), ``memory`` (the VM's PSS and private bytes; None while it has no VM).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyter_server.auth.identity import User
from tornado import web

from kernelmanager import vm_handle

from . import errors, users
from .auth import ANONYMOUS, TOKEN_USER, check_host
from .forks import fork_kernel

STATIC = Path(__file__).parent / "static"
COOKIE = "vmkg-dashboard"
COOKIE_DAYS = 1
CSRF_HEADER = "X-VMKG-CSRF"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
#: per process: a CSRF token is valid for the life of the gateway process that made it
_CSRF_KEY = secrets.token_bytes(32)


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def vm_age(pid: int | None) -> float | None:
    """Seconds since process ``pid`` (a VM's QEMU) started; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / _clock_ticks())
    except (OSError, ValueError, IndexError):
        return None


class DashboardBase(web.RequestHandler):
    """Cookie sessions, the security headers, JSON errors for the JSON routes."""

    json_errors = True

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")

    @property
    def identity(self) -> Any:
        return self.settings["identity_provider"]

    @property
    def kernel_manager(self) -> Any:
        return self.settings["kernel_manager"]

    def cookie_path(self) -> str:
        return str(self.settings.get("base_url", "/") or "/")

    def session_user(self) -> Any:
        """The user the session cookie names (still a user), ANONYMOUS without auth, or None."""
        if not self.identity.auth_enabled:
            check_host(self)
            return ANONYMOUS
        raw = self.get_signed_cookie(COOKIE, max_age_days=COOKIE_DAYS)
        if not raw:
            return None
        try:
            name = json.loads(raw)["user"]
        except (ValueError, KeyError, TypeError):
            return None
        if name == users.ADMIN:
            return TOKEN_USER
        known = self.identity.users
        if known is None:
            return None
        known.reload()
        return User(name) if isinstance(name, str) and name in known.users else None

    def csrf_token(self) -> str:
        session = self.get_cookie(COOKIE) or "no-auth"
        return hmac.new(_CSRF_KEY, session.encode(), hashlib.sha256).hexdigest()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if self.json_errors:
            self.set_header("Content-Type", "application/json")
            self.finish(errors.dumps(status_code, exc))
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        message = errors.error_body(status_code, exc)["message"]
        self.finish(f"<!doctype html><title>vmkg</title><h1>{status_code}</h1>"
                    f"<p>{html.escape(message)}</p>")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, web.HTTPError) and value.status_code < 500:
            return  # the request log has it
        super().log_exception(typ, value, tb)


class DashboardPageHandler(DashboardBase):
    """``GET /``: sign in with ``?token=`` (cookie, then a redirect without it), or the page."""

    json_errors = False

    async def get(self) -> None:
        if self.get_query_argument("token", ""):
            user = await self.identity.get_user(self)  # reads ?token= like the API does
            if user is None:
                raise web.HTTPError(401, "That token is not valid for this gateway.")
            if self.identity.auth_enabled:
                name = users.tenant(user) or users.ADMIN
                self.set_signed_cookie(COOKIE, json.dumps({"user": name}), expires_days=COOKIE_DAYS,
                                       httponly=True, samesite="Strict", path=self.cookie_path(),
                                       secure=self.request.protocol == "https")
            self.redirect(self.cookie_path(), status=302)
            return
        if self.session_user() is None:
            raise web.HTTPError(401, "Open this page once as /?token=YOUR_TOKEN (the gateway's "
                                     "token or your own): it then remembers you in a cookie.")
        page = (STATIC / "dashboard.html").read_text()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page.replace("{{csrf}}", html.escape(self.csrf_token()))
                    .replace("{{user}}", html.escape(users.owner_name(self.session_user()))))


class DashboardStaticHandler(DashboardBase):
    """The page's script and stylesheet (a fixed list; no directory is served)."""

    FILES = {"dashboard.js": "application/javascript; charset=utf-8",
             "dashboard.css": "text/css; charset=utf-8"}

    def get(self, name: str) -> None:
        if name not in self.FILES:
            raise web.HTTPError(404, "Not found")
        self.set_header("Content-Type", self.FILES[name])
        self.finish((STATIC / name).read_bytes())


class DashboardAPIBase(DashboardBase):
    user: Any = None

    def prepare(self) -> None:
        self.user = self.session_user()
        if self.user is None:
            raise web.HTTPError(401, "No dashboard session: open / with ?token= first")
        if self.request.method == "POST":
            origin = self.request.headers.get("Origin")
            if origin and urlsplit(origin).netloc != self.request.host:
                raise web.HTTPError(403, "Cross-origin request refused")
            sent = self.request.headers.get(CSRF_HEADER, "")
            if not sent or not hmac.compare_digest(sent.encode(), self.csrf_token().encode()):
                raise web.HTTPError(403, "Missing or wrong CSRF token: reload the page")


class DashboardKernelsHandler(DashboardAPIBase):
    """``GET dashboard/api/kernels``: the user's kernels, with what the tree shows."""

    def get(self) -> None:
        km = self.kernel_manager
        now = time.time()
        out = []
        for model in km.visible_kernels(self.user):
            kid = model["id"]
            handle = vm_handle(km.get_kernel(kid)) if kid in km else None
            mem = handle.memory() if handle is not None else None
            out.append({
                "id": kid, "parent_id": model.get("parent_id"), "forked_at": model.get("forked_at"),
                "execution_state": model.get("execution_state"),
                "template": (model.get("vmkg") or {}).get("template"),
                "name": model.get("name"), "connections": model.get("connections", 0),
                "last_activity": model.get("last_activity"),
                "vm_age": vm_age(handle.pid if handle is not None else None),
                "memory": {"pss": mem.pss, "private": mem.private} if mem is not None else None,
            })
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"user": users.owner_name(self.user), "time": now, "kernels": out}))


class DashboardActionHandler(DashboardAPIBase):
    """``POST dashboard/api/kernels/{id}/delete`` (204) and ``.../fork`` (201, one branch)."""

    async def post(self, kernel_id: str, action: str) -> None:
        km = self.kernel_manager
        km.check_owner(kernel_id, self.user)
        with errors.translated():
            if action == "delete":
                await km.shutdown_kernel(kernel_id)
                self.set_status(204)
                self.finish()
                return
            user = None if users.sees_all(self.user) else self.user
            ids = await fork_kernel(km, kernel_id, 1, user=user)
        self.set_status(201)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"kernels": ids}))
