"""The relay answers control-channel kernel_info requests with the VM's own reply.

No VM: the fake guest of ``test_hostile_guest`` (a real ``AgentChannel`` and
``KernelRelay``, a signed ZMQ client). That guest answers shell requests only, so a
control request answered at all was answered by the relay.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from test_hostile_guest import env  # noqa: F401 - the fixture

from kernelmanager.relay import DELIM

CONTROL_TIMEOUT_MS = 1500


async def control_kernel_info(k: Any, ctx: zmq.asyncio.Context) -> tuple[dict[str, Any] | None, str]:
    """(the reply to a kernel_info_request on control, or None; the request's msg_id)"""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://127.0.0.1:{k.relay.ports['control']}")
    try:
        msg = k.client.session.send(sock, "kernel_info_request", {})
        if not await sock.poll(CONTROL_TIMEOUT_MS):
            return None, msg["header"]["msg_id"]
        parts = await sock.recv_multipart()
        _, parts = k.client.session.feed_identities(parts)
        return k.client.session.deserialize(parts), msg["header"]["msg_id"]  # checks the signature
    finally:
        sock.close(linger=0)


async def test_control_kernel_info_is_answered_from_the_vms_reply(env: Callable[..., Any]) -> None:  # noqa: F811
    k = await env()
    ctx = zmq.asyncio.Context.instance()
    # nothing known yet: the request goes to the guest (which ignores control)
    reply, _ = await control_kernel_info(k, ctx)
    assert reply is None and k.relay.kernel_info_answered == 0
    await k.client.round_trip()  # the VM answers one kernel_info on shell
    reply, msg_id = await control_kernel_info(k, ctx)
    assert reply is not None, "the relay did not answer kernel_info on control"
    assert reply["header"]["msg_type"] == "kernel_info_reply"
    assert reply["header"]["session"] == "fake"  # the kernel's session, as its own reply had
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"] == {"status": "ok"}
    # as ipykernel does on control: busy, then idle, parented to the request
    states = []
    while len(states) < 2:
        m = await k.client.next_iopub(lambda m: m["header"]["msg_type"] == "status"
                                      and m["parent_header"].get("msg_id") == msg_id, 5)
        states.append(m["content"]["execution_state"])
    assert states == ["busy", "idle"]
    assert k.relay.kernel_info_answered == 1


async def test_a_new_vm_answers_its_own_first_kernel_info(env: Callable[..., Any]) -> None:  # noqa: F811
    k = await env()
    ctx = zmq.asyncio.Context.instance()
    await k.client.round_trip()
    assert (await control_kernel_info(k, ctx))[0] is not None
    k.relay.detach()  # a restart swaps the VM
    k.relay.attach(k.channel)
    assert (await control_kernel_info(k, ctx))[0] is None
    # nor is a failed or oversized reply kept
    parts = [b"", DELIM, b"", json.dumps({"msg_type": "kernel_info_reply", "session": "s",
                                          "msg_id": uuid.uuid4().hex}).encode(),
             b"{}", b"{}", b'{"status": "error"}']
    k.relay.from_guest("shell", parts)
    assert k.relay._kernel_info is None
    big = [*parts[:6], json.dumps({"status": "ok", "banner": "x" * (1 << 17)}).encode()]
    k.relay.from_guest("shell", big)
    assert k.relay._kernel_info is None
