"""A user's identity passed from a router (``vmkg router``) to a host (``vmkg serve``).

The router authenticates the client (same token and users file as the hosts) and forwards
the request with the user's name in ``X-Vmkg-User`` and an HMAC in ``X-Vmkg-Router-Signature``:
``t=<unix time>,s=<hex HMAC-SHA256(secret, time \\n user \\n method \\n path)>``. A host with
the same ``router_secret`` (``$VMKG_ROUTER_SECRET``) accepts that identity instead of a
token; one without a secret, a wrong signature, another method or path, or a signature
older than ``MAX_AGE`` seconds gets the 401 of a missing token. The path (without the query)
is signed so a captured header cannot be replayed against another kernel; the time bounds a
replay of the same request.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

USER_HEADER = "X-Vmkg-User"
SIGNATURE_HEADER = "X-Vmkg-Router-Signature"
MAX_AGE = 60.0


def _mac(secret: str, ts: str, user: str, method: str, path: str) -> str:
    msg = "\n".join((ts, user, method.upper(), path)).encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def sign(secret: str, user: str, method: str, path: str) -> dict[str, str]:
    """The headers a router adds to a request it forwards for ``user``."""
    ts = str(int(time.time()))
    return {USER_HEADER: user, SIGNATURE_HEADER: f"t={ts},s={_mac(secret, ts, user, method, path)}"}


def verify(secret: str, headers: Any, method: str, path: str) -> str | None:
    """The forwarded user name if the request carries a valid router signature, else None."""
    user, sig = headers.get(USER_HEADER), headers.get(SIGNATURE_HEADER)
    if not secret or not user or not sig:
        return None
    try:
        fields = dict(part.split("=", 1) for part in sig.split(","))
        ts, mac = fields["t"], fields["s"]
        age = abs(time.time() - int(ts))
    except (ValueError, KeyError):
        return None
    if age > MAX_AGE or not hmac.compare_digest(mac, _mac(secret, ts, user, method, path)):
        return None
    return str(user)


def forwarded_header_present(headers: Any) -> bool:
    return bool(headers.get(SIGNATURE_HEADER))
