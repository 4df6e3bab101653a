"""Who may talk to the gateway: one shared token, as Kernel Gateway has it.

The token is accepted as ``Authorization: token X``, ``Authorization: Bearer X`` or
``?token=X`` (jupyter_server's ``IdentityProvider.get_token`` reads all three) and compared
in constant time. No cookies, no login page: this is an API for programs.

One exception, for the kernel channels websocket only and only when no credential at all
is presented (``kernel_id_ws_auth``): jupyter_server's ``GatewayKernelClient`` - what
nbclient and papermill use through a gateway - opens that websocket without any
Authorization header. There the kernel's id, a random UUID4 the gateway only ever gives
to token-authenticated clients, serves as the credential for that kernel alone. A wrong
token is still refused.
"""

from __future__ import annotations

import hmac
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

from .internals import mark_token_authenticated

TOKEN_USER = User("gateway", display_name="Gateway client")
KERNEL_USER = User("kernel-id", display_name="Kernel-id websocket client")
ANONYMOUS = User("anonymous", display_name="Anonymous (auth disabled)")


class TokenIdentityProvider(IdentityProvider):
    """Token-only identity for ``vmkg serve``; the app sets ``token`` ("" disables auth)."""

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token)

    @property
    def login_available(self) -> bool:
        return False

    def presented_token(self, handler: web.RequestHandler) -> str:
        return str(self.get_token(handler) or "")

    async def get_user(self, handler: web.RequestHandler) -> User | None:
        if not self.token:
            return ANONYMOUS
        presented = self.presented_token(handler)
        if presented:
            if hmac.compare_digest(presented.encode(), str(self.token).encode()):
                mark_token_authenticated(handler)
                return TOKEN_USER
            return None
        capability = getattr(handler, "kernel_id_credential", None)
        if capability is not None and capability():
            return KERNEL_USER
        return None

    def is_token_authenticated(self, handler: web.RequestHandler) -> bool:
        # every request that got this far presented the token (or auth is off): no XSRF
        # cookies to check, as in Kernel Gateway
        return True

    def should_check_origin(self, handler: Any) -> bool:
        return bool(handler.settings.get("allow_origin") != "*")

    def get_handlers(self) -> list[tuple[str, object]]:
        return []
