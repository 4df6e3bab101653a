"""The one place where errors become HTTP status codes.

The runtime raises its own exception tree (``kernelmanager.exceptions``) and knows
nothing of HTTP; jupyter_client raises ``NoSuchKernel`` for an unknown kernelspec. Request
handlers wrap the work they delegate in :func:`translated`, which turns those into
``tornado.web.HTTPError`` with ``raise ... from exc``; :func:`error_body` is the JSON every
error response carries (``{"reason", "message"}``, which jupyter_server's GatewayClient
reads).

    ForkBudgetExceeded     507  the fork images' memory budget is spent
    LimitExceeded          403  a configured limit (max_kernels, max_kernels_per_user)
    NoSuchKernel           404  unknown kernelspec name
    CheckpointNotFound     404  the kernel has no checkpoint of that name
    DurableBudgetExceeded  507  (a ForkBudgetExceeded) durable images' disk budget or the disk is full
    KernelBusy, VMDied, NoNetwork
                           409  the kernel cannot do that in its current state (no NIC)
    ConfigError            400  a request asked for something that cannot work
    AgentError             by its ``kind``: forbidden 403, not_found 404, invalid 400,
                           no_space 507; any other kind 503
    TemplateError (TemplateIncompatible too), ImageError, VMStartError, VMError,
    ChannelError, ForkError
                           503  a template could not be baked, a VM restored, reached or
                                snapshotted for a fork now (the parent kernel is unaffected;
                                a retry may work)
    TimeoutError           504  a kernel did not answer in time
    any other VMKGError    500, with its message

The runtime translates QMP and OS errors into its own exceptions, so a fork or a bake
that fails reaches the client as one of the above, with the reason in ``message``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import responses
from typing import Any

from jupyter_client.kernelspec import NoSuchKernel
from tornado import web

from kernelmanager.exceptions import (
    AgentError,
    ChannelError,
    CheckpointNotFound,
    ConfigError,
    ForkBudgetExceeded,
    ForkError,
    ImageError,
    KernelBusy,
    LimitExceeded,
    NoNetwork,
    TemplateError,
    VMDied,
    VMError,
    VMKGError,
    VMStartError,
)

_STATUS: list[tuple[type[BaseException], int]] = [
    (ForkBudgetExceeded, 507),
    (LimitExceeded, 403),
    (NoSuchKernel, 404),
    (CheckpointNotFound, 404),
    (KernelBusy, 409),
    (VMDied, 409),
    (NoNetwork, 409),
    (ConfigError, 400),
    (TemplateError, 503),
    (ImageError, 503),
    (VMStartError, 503),
    (VMError, 503),
    (ChannelError, 503),
    (ForkError, 503),
    (AgentError, 503),
    (ForkError, 503),
    (TimeoutError, 504),
    (VMKGError, 500),
]


#: the guest agent's refusal kinds (guest/files.py) and what they mean over HTTP
AGENT_KIND_STATUS = {"forbidden": 403, "not_found": 404, "invalid": 400, "no_space": 507}


def status_for(exc: BaseException) -> int | None:
    """The HTTP status for a domain error, or None if it is not one we translate."""
    if isinstance(exc, AgentError) and exc.kind in AGENT_KIND_STATUS:
        return AGENT_KIND_STATUS[exc.kind]
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return None


def http_error(exc: BaseException) -> web.HTTPError | None:
    status = status_for(exc)
    if status is None:
        return None
    message = str(exc) or type(exc).__name__
    if isinstance(exc, NoSuchKernel):
        message = f"No such kernelspec: {exc.args[0] if exc.args else exc}"
    return web.HTTPError(status, "%s", message, reason=responses.get(status))


@contextmanager
def translated() -> Iterator[None]:
    """Run a block whose domain errors must reach the client as HTTP errors."""
    try:
        yield
    except web.HTTPError:
        raise
    except Exception as exc:
        err = http_error(exc)
        if err is None:
            raise
        raise err from exc


def error_body(status: int, exc: BaseException | None) -> dict[str, Any]:
    """The JSON body of an error response (Kernel Gateway's shape)."""
    reason = responses.get(status, "Unknown HTTP Error")
    message = reason
    if isinstance(exc, web.HTTPError):
        if exc.log_message:
            try:
                message = exc.log_message % exc.args
            except (TypeError, ValueError):
                message = exc.log_message
        reason = exc.reason or reason
    elif exc is not None:
        mapped = http_error(exc)
        message = mapped.log_message % mapped.args if mapped is not None and mapped.log_message else "Internal server error"
    return {"reason": reason, "message": message}


def dumps(status: int, exc: BaseException | None) -> str:
    return json.dumps(error_body(status, exc))
