"""Runtime exceptions -> HTTP status and JSON body (gateway.errors), the one place where
that choice is made.

Each exception of ``kernelmanager.exceptions`` (and jupyter_client's ``NoSuchKernel``)
must come out of ``translated()`` as a ``tornado.web.HTTPError`` with its status, chained
to the original, and the JSON body a client reads must carry the status's reason and the
runtime's message. Anything else passes through untouched and, if it reaches the error
page, says only "Internal server error" (no internals leak).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from jupyter_client.kernelspec import NoSuchKernel
from tornado import web

from gateway.errors import dumps, error_body, translated
from kernelmanager.exceptions import (
    AgentError,
    ChannelError,
    ConfigError,
    ForkError,
    ImageError,
    KernelBusy,
    LimitExceeded,
    TemplateError,
    TemplateIncompatible,
    VMDied,
    VMError,
    VMKGError,
    VMStartError,
)

CASES = [
    (LimitExceeded("max_kernels (3) reached"), 403, "Forbidden"),
    (KernelBusy("kernel k is busy"), 409, "Conflict"),
    (VMDied("kernel k: the VM died"), 409, "Conflict"),
    (ConfigError("count must be 1..64"), 400, "Bad Request"),
    (TemplateError("no template python3"), 503, "Service Unavailable"),
    (TemplateIncompatible("made by QEMU 7.2"), 503, "Service Unavailable"),
    (ImageError("no guest image"), 503, "Service Unavailable"),
    (VMStartError("QEMU exited with 1"), 503, "Service Unavailable"),
    (ChannelError("the link broke"), 503, "Service Unavailable"),
    (AgentError("no space left", kind="disk_full"), 503, "Service Unavailable"),
    (AgentError("refused", kind="forbidden"), 403, "Forbidden"),
    (AgentError("missing", kind="not_found"), 404, "Not Found"),
    (AgentError("bad path", kind="invalid"), 400, "Bad Request"),
    (AgentError("disk full", kind="no_space"), 507, "Insufficient Storage"),
    (TimeoutError("kernel k did not answer"), 504, "Gateway Timeout"),
    (asyncio.TimeoutError("kernel k did not answer"), 504, "Gateway Timeout"),
    (ForkError("snapshot failed"), 503, "Service Unavailable"),
    (VMError("the VM could not"), 503, "Service Unavailable"),
    (VMKGError("something of ours"), 500, "Internal Server Error"),
]


def translate(exc: BaseException) -> BaseException:
    """What leaves a ``translated()`` block that raised ``exc``."""
    with pytest.raises(BaseException) as info:
        with translated():
            raise exc
    return info.value


@pytest.mark.parametrize(("exc", "status", "reason"), CASES, ids=lambda c: type(c).__name__ if isinstance(c, BaseException) else None)
def test_runtime_errors_become_their_status_with_the_message(exc: BaseException, status: int, reason: str) -> None:
    err = translate(exc)
    assert isinstance(err, web.HTTPError) and err.status_code == status
    assert err.__cause__ is exc  # raise ... from exc: the log keeps the runtime's traceback
    assert error_body(status, err) == {"reason": reason, "message": str(exc)}
    # the handlers' write_error sees either the translated or the original exception
    assert error_body(status, exc) == {"reason": reason, "message": str(exc)}
    assert json.loads(dumps(status, err)) == {"reason": reason, "message": str(exc)}


def test_an_unknown_kernelspec_is_404_naming_it() -> None:
    err = translate(NoSuchKernel("python9"))
    assert isinstance(err, web.HTTPError) and err.status_code == 404
    assert error_body(404, err) == {"reason": "Not Found", "message": "No such kernelspec: python9"}


def test_an_error_without_a_message_is_named_by_its_type() -> None:
    err = translate(KernelBusy())
    assert error_body(409, err)["message"] == "KernelBusy"


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("k"), OSError(5, "I/O error"), RuntimeError()])
def test_other_exceptions_pass_through_untranslated(exc: BaseException) -> None:
    assert translate(exc) is exc


def test_an_unexpected_error_says_only_internal_server_error() -> None:
    body = error_body(500, RuntimeError("secret path /var/lib/vmkg/x"))
    assert body == {"reason": "Internal Server Error", "message": "Internal server error"}


def test_http_errors_pass_through_with_their_own_reason_and_message() -> None:
    original = web.HTTPError(413, "file of %d bytes exceeds %d", 10, 5, reason="Payload Too Large")
    assert translate(original) is original
    assert error_body(413, original) == {"reason": "Payload Too Large", "message": "file of 10 bytes exceeds 5"}


def test_a_bad_format_in_an_http_error_message_is_shown_as_is() -> None:
    err = web.HTTPError(400, "100%% sure %d", "not a number")
    assert error_body(400, err)["message"] == "100%% sure %d"


def test_no_exception_gives_the_status_reason() -> None:
    assert error_body(404, None) == {"reason": "Not Found", "message": "Not Found"}
    assert error_body(599, None) == {"reason": "Unknown HTTP Error", "message": "Unknown HTTP Error"}
