"""The SDK's exceptions: one tree, raised by ``vmkg_client.sdk`` (and so ``vmkg_client.sync``).

Lower-level errors (``vmkg_client.http``, ``websockets``, OS errors) are translated into
these where they occur, with ``raise ... from`` the original::

    SDKError
     +-- GatewayError(status, message)   the gateway answered an HTTP error
     |    +-- KernelGone                 the kernel no longer exists (shut down, culled, died)
     +-- GatewayUnreachable              no answer: refused, reset, timed out (a ConnectionError)
     +-- IncompatibleGateway             the gateway speaks a vmkg API version this client
                                         does not know (``GET /api``'s ``vmkg_api``)
     +-- ExecutionTimeout                a cell ran past its timeout (a TimeoutError); it was
                                         interrupted, ``.execution`` holds what it produced

An exception raised by the *code* is not an SDK exception: it is ``Execution.error``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sdk import Execution


class SDKError(Exception):
    """Base of every error this SDK raises."""


class GatewayError(SDKError):
    """The gateway answered with an HTTP error; ``status`` and its JSON ``message``."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


class KernelGone(GatewayError):
    """The kernel no longer exists on the gateway (shut down, culled, died)."""

    def __init__(self, kernel_id: str, message: str = "", status: int = 404) -> None:
        super().__init__(status, message or f"kernel {kernel_id} no longer exists", "Not Found")
        self.kernel_id = kernel_id


class GatewayUnreachable(SDKError, ConnectionError):
    """The gateway could not be reached, or the connection broke and could not be reopened."""


class IncompatibleGateway(SDKError):
    """The gateway speaks a version of the vmkg API this client does not know (``api``:
    the version it announced, ``supported``: the versions this client speaks)."""

    def __init__(self, message: str, api: object, supported: tuple[int, ...]) -> None:
        super().__init__(message)
        self.api = api
        self.supported = supported


class ExecutionTimeout(SDKError, TimeoutError):
    """A cell ran past its timeout. It was interrupted (``interrupted``: whether it stopped);
    ``execution`` holds its output so far, usually ending in a KeyboardInterrupt error."""

    def __init__(self, message: str, execution: Execution, timeout: float, interrupted: bool) -> None:
        super().__init__(message)
        self.execution = execution
        self.timeout = timeout
        self.interrupted = interrupted


def error_message(body: bytes | bytearray, fallback: str) -> tuple[str, str]:
    try:
        data = json.loads(body)
        return str(data.get("message") or fallback), str(data.get("reason") or "")
    except (ValueError, AttributeError):
        return (body.decode("utf-8", "replace").strip()[:500] or fallback), ""
