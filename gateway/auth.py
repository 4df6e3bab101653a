"""Who may talk to the gateway: one shared token, as Kernel Gateway has it.

The token is accepted as ``Authorization: token X``, ``Authorization: Bearer X`` or
``?token=X`` (jupyter_server's ``IdentityProvider.get_token`` reads all three) and compared
in constant time. No cookies, no login page: this is an API for programs.

One exception, for the kernel channels websocket only and only when no credential at all
is presented (``kernel_id_ws_auth``): jupyter_server's ``GatewayKernelClient`` - what
nbclient and papermill use through a gateway - opens that websocket without any
Authorization header. There the kernel's id, a random UUID4 the gateway only ever gives
to token-authenticated clients, serves as the credential for that kernel alone (its user
is ``kernel-id:<id>``, which ``gateway.users.may_act`` lets act on that kernel and no
other). A wrong token is still refused. Off by default (``VMKG_KERNEL_ID_WS_AUTH``): an
id leaks easily.

**Users.** With a users file (``users_file``, ``$VMKG_USERS_FILE``; format and ownership
rules in ``gateway.users``) a token may also be a user's: the request's user is then that
user name, and the kernel manager's ``check_owner`` limits them to their own kernels. The
gateway's token (``auth_token``) is the admin's (user ``gateway``), who sees every kernel.

With auth disabled (``--no-auth``) the Host header must be a localhost name, an IP
address or one of ``allowed_hosts`` (:func:`check_host`, 403 otherwise), against DNS
rebinding.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web
from traitlets import Unicode

from . import forwarded, users
from .envvars import env_trait
from .internals import mark_token_authenticated

TOKEN_USER = User(users.ADMIN, display_name="Gateway client (admin)")
ANONYMOUS = User(users.ANONYMOUS, display_name="Anonymous (auth disabled)")


LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def check_host(handler: web.RequestHandler) -> None:
    """Without a token, refuse (403) a Host header that is not a localhost name, an IP
    address or one of ``allowed_hosts``: a page whose DNS name an attacker rebound to this
    address would otherwise drive the gateway from a victim's browser."""
    host = handler.request.headers.get("Host", "")
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    allowed = {h.lower() for h in handler.settings.get("vmkg_allowed_hosts", [])}
    if "*" in allowed or name in LOCAL_NAMES or name in allowed or name.endswith(".localhost"):
        return
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    raise web.HTTPError(403, "Host %r is not allowed: with --no-auth only localhost names, IP "
                             "addresses and allowed_hosts ($VMKG_ALLOWED_HOSTS) are "
                             "(DNS rebinding protection)", host[:100])


class TokenIdentityProvider(IdentityProvider):
    """Token-only identity for ``vmkg serve``; the app sets ``token`` ("" disables auth)."""

    users_file = env_trait(Unicode, "VMKG_USERS_FILE", "",
                           help="A JSON file mapping user names to the SHA-256 of their tokens, "
                                "{\"alice\": \"sha256:<hex>\"} (`vmkg user add NAME` makes an entry). "
                                "Each user sees and acts on only the kernels they started or "
                                "forked; the gateway's own token (auth_token) is the admin's, who "
                                "sees all. Re-read when it changes.")

    router_secret = env_trait(Unicode, "VMKG_ROUTER_SECRET", "",
                              help="Shared with the routers (vmkg router): a request signed with it "
                                   "acts as the user the router names (gateway.forwarded). Empty: "
                                   "only tokens are accepted.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: raises users.UsersFileError (a clear message) if the file cannot be used
        self.users = users.UsersFile(self.users_file) if self.users_file else None
        if self.users is not None and not self.token:
            self.log.warning("users file %s is ignored: authentication is disabled (--no-auth), "
                             "so every client acts as the admin", self.users_file)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token)

    @property
    def login_available(self) -> bool:
        return False

    def presented_token(self, handler: web.RequestHandler) -> str:
        return str(self.get_token(handler) or "")

    async def get_user(self, handler: web.RequestHandler) -> User | None:
        if forwarded.forwarded_header_present(handler.request.headers):
            name = forwarded.verify(self.router_secret, handler.request.headers,
                                    handler.request.method or "", handler.request.path)
            if name is None:
                return None
            mark_token_authenticated(handler)
            return TOKEN_USER if name == users.ADMIN else User(name)
        if not self.token:
            check_host(handler)
            return ANONYMOUS
        presented = self.presented_token(handler)
        if presented:
            if hmac.compare_digest(presented.encode(), str(self.token).encode()):
                mark_token_authenticated(handler)
                return TOKEN_USER
            name = self.users.lookup(presented) if self.users is not None else None
            if name is not None:
                mark_token_authenticated(handler)
                return User(name)
            return None
        capability = getattr(handler, "kernel_id_credential", None)
        if capability is not None and capability():
            kernel_id = handler.path_kwargs.get("kernel_id", "")
            return User(users.KERNEL_ID_PREFIX + kernel_id, display_name="Kernel-id websocket client")
        return None

    def is_token_authenticated(self, handler: web.RequestHandler) -> bool:
        # every request that got this far presented the token (or auth is off): no XSRF
        # cookies to check, as in Kernel Gateway
        return True

    def should_check_origin(self, handler: Any) -> bool:
        return bool(handler.settings.get("allow_origin") != "*")

    def get_handlers(self) -> list[tuple[str, object]]:
        return []
