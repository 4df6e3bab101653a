"""Error mapping (gateway.errors): every runtime exception reaches a client as a clear
status with a JSON {reason, message}; never a bare 500. No VMs."""

from __future__ import annotations

import pytest
from jupyter_client.kernelspec import NoSuchKernel
from tornado import web

from gateway import errors
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


@pytest.mark.parametrize(("exc", "status"), [
    (LimitExceeded("max_kernels reached"), 403),
    (NoSuchKernel("nope"), 404),
    (KernelBusy("kernel k is busy"), 409),
    (VMDied("kernel k: the VM is gone"), 409),
    (ConfigError("bad"), 400),
    (TemplateError("cannot bake python: QMP said no"), 503),
    (TemplateIncompatible("made by another QEMU"), 503),
    (ImageError("no image"), 503),
    (VMStartError("qemu exited"), 503),
    (VMError("the VM could not pause"), 503),
    (ChannelError("link broke"), 503),
    (ForkError("kernel k: short copy while assembling the fork RAM image"), 503),
    (AgentError("refused", kind="forbidden"), 403),
    (AgentError("missing", kind="not_found"), 404),
    (AgentError("bad path", kind="invalid"), 400),
    (AgentError("disk full", kind="no_space"), 507),
    (AgentError("odd", kind="other"), 503),
    (TimeoutError("no answer"), 504),
    (VMKGError("something else"), 500),
])
def test_domain_errors_get_a_status_and_their_message(exc: Exception, status: int) -> None:
    with pytest.raises(web.HTTPError) as info, errors.translated():
        raise exc
    assert info.value.status_code == status and info.value.__cause__ is exc
    body = errors.error_body(status, info.value)
    assert set(body) == {"reason", "message"} and body["reason"]
    expected = "No such kernelspec: nope" if isinstance(exc, NoSuchKernel) else str(exc)
    assert body["message"] == expected
    assert errors.error_body(status, exc) == body  # the same when a handler did not translate


def test_other_errors_pass_through_and_answer_without_internals() -> None:
    with pytest.raises(KeyError), errors.translated():
        raise KeyError("secret internals")
    assert errors.error_body(500, KeyError("secret internals")) == {
        "reason": "Internal Server Error", "message": "Internal server error"}
