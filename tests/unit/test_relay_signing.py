"""The relay's HMAC (kernelmanager.relay.KernelRelay): it owns the kernel's key, verifies
what clients send (forged and replayed messages are dropped) and signs what the guest
sends.

The relay binds real ZMQ sockets on loopback (a real ``zmq.asyncio`` context); the client
is jupyter_client's ``Session``, as every Jupyter client signs. On the guest side the
relay is attached to a sink that records what would go into the VM: no VM here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from kernelmanager import relay as relay_module
from kernelmanager.channel import AgentChannel
from kernelmanager.relay import DELIM, KernelRelay

KEY = b"0123456789abcdef-test-key"


class Sink:
    """Stands in for the AgentChannel: records (channel, parts) sent toward the guest."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[bytes]]] = []
        # what KernelRelay.attach sets or appends to on a real channel
        self.on_failure: list[object] = []
        self.throttle: object = None
        self.on_violation: object = None

    async def send_jupyter(self, channel: str, parts: list[bytes]) -> None:
        self.got.append((channel, parts))


@asynccontextmanager
async def running_relay() -> AsyncIterator[tuple[KernelRelay, Sink, zmq.asyncio.Context]]:
    """A started relay attached to a Sink. (Not a fixture: its sockets' tasks must run on
    the test's own event loop.)"""
    ctx = zmq.asyncio.Context()
    r = KernelRelay(ctx, name="unit", key=KEY)
    r.start()
    sink = Sink()
    r.alive = lambda: True  # the kernel behind the channel is running (else input is held)
    r.attach(cast(AgentChannel, sink))
    try:
        yield r, sink, ctx
    finally:
        await r.close()
        ctx.term()


def client(ctx: zmq.asyncio.Context, r: KernelRelay, channel: str = "shell") -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{r.ip}:{r.ports[channel]}")
    return sock


def signed(session: Session, msg_type: str = "execute_request", **content: Any) -> list[bytes]:
    """The wire frames (delimiter, signature, four JSON parts) of a new message."""
    return cast(list[bytes], session.serialize(session.msg(msg_type, content=content)))


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- sign and verify, directly -----------------------------------------------------------------


def test_the_signature_is_the_jupyter_hmac_of_the_four_parts() -> None:
    r = KernelRelay(zmq.asyncio.Context.instance(), name="unit", key=KEY)
    parts = [b'{"msg_id": "1"}', b"{}", b"{}", b'{"code": "1"}']
    expected = hmac.new(KEY, b"".join(parts), hashlib.sha256).hexdigest().encode()
    assert r.sign(parts) == expected
    assert r.sign(parts) == Session(key=KEY).sign(parts)  # what clients compute


def test_the_signature_scheme_picks_the_digest() -> None:
    r = KernelRelay(zmq.asyncio.Context.instance(), name="unit", key=KEY, signature_scheme="hmac-sha512")
    parts = [b"a", b"b", b"c", b"d"]
    assert r.sign(parts) == Session(key=KEY, signature_scheme="hmac-sha512").sign(parts)
    assert len(r.sign(parts)) == 128


def test_verify_accepts_once_and_refuses_forgeries_and_replays() -> None:
    r = KernelRelay(zmq.asyncio.Context.instance(), name="unit", key=KEY)
    parts = [b'{"msg_id": "a"}', b"{}", b"{}", b"{}"]
    sig = r.sign(parts)
    assert r._verify(sig, parts)
    assert not r._verify(sig, parts)  # the same message again: a replay
    other = [b'{"msg_id": "b"}', b"{}", b"{}", b"{}"]
    assert not r._verify(sig, other)  # a signature of something else
    assert not r._verify(Session(key=b"another key").sign(other), other)  # the wrong key
    assert not r._verify(b"", other)
    assert r._verify(r.sign(other), other)  # the forgeries did not spoil the real one


def test_replay_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert relay_module.REPLAY_WINDOW >= 1 << 16  # the real window: 64Ki signatures
    window = 100  # made small here, so the test need not sign 64Ki messages
    monkeypatch.setattr(relay_module, "REPLAY_WINDOW", window)
    r = KernelRelay(zmq.asyncio.Context.instance(), name="unit", key=KEY)
    first = [b'{"msg_id": "0"}', b"{}", b"{}", b"{}"]
    assert r._verify(r.sign(first), first)
    for i in range(1, window + 1):
        p = [f'{{"msg_id": "{i}"}}'.encode(), b"{}", b"{}", b"{}"]
        assert r._verify(r.sign(p), p)
    assert not r._verify(r.sign(p), p)  # the newest is remembered
    assert len(r._seen) == window  # the oldest signature was forgotten ...
    assert r._verify(r.sign(first), first)  # ... so it passes again


def test_without_a_key_nothing_is_signed_or_checked() -> None:
    r = KernelRelay(zmq.asyncio.Context.instance(), name="unit", key=b"")
    parts = [b"{}", b"{}", b"{}", b"{}"]
    assert r.sign(parts) == b""
    assert r._verify(b"anything", parts) and r._verify(b"anything", parts)


# -- through real sockets ----------------------------------------------------------------------


async def test_a_signed_message_reaches_the_guest_unsigned() -> None:
    async with running_relay() as (r, sink, ctx):
        sock = client(ctx, r)
        try:
            frames = signed(Session(key=KEY), code="1+1")
            await sock.send_multipart(frames)
            await until(lambda: sink.got)
            ((channel, parts),) = sink.got
            assert channel == "shell"
            i = parts.index(DELIM)
            assert parts[i + 1] == b""  # the guest never sees signatures (nor learns the key)
            assert parts[i + 2:] == frames[2:]
            assert len(parts[:i]) == 1  # the ROUTER's identity of this client, for the reply
            assert r.dropped == 0
        finally:
            sock.close()


async def test_forged_replayed_and_malformed_messages_are_dropped() -> None:
    async with running_relay() as (r, sink, ctx):
        sock = client(ctx, r, "control")
        try:
            await sock.send_multipart(signed(Session(key=b"not the key")))  # forged
            good = signed(Session(key=KEY))
            await sock.send_multipart(good)
            await sock.send_multipart(good)  # replayed
            tampered = list(good)
            tampered[5] = b'{"code": "import os; os.system(\'evil\')"}'
            await sock.send_multipart(tampered)  # a valid signature over other content
            await sock.send_multipart([b"no delimiter", b"x"])
            await sock.send_multipart([DELIM, Session(key=KEY).sign([b"{}"] * 4), b"{}"])  # short
            await until(lambda: r.dropped >= 5)
            await asyncio.sleep(0.1)
            assert r.dropped == 5
            assert [parts[-4:] for _, parts in sink.got] == [good[-4:]]  # only the genuine one, once
        finally:
            sock.close()


async def test_what_the_guest_sends_reaches_the_client_signed() -> None:
    async with running_relay() as (r, sink, ctx):
        sock = client(ctx, r)
        try:
            session = Session(key=KEY)
            await sock.send_multipart(signed(session))  # the relay learns this client's identity
            await until(lambda: sink.got)
            identity = sink.got[0][1][0]
            reply = session.msg("execute_reply", content={"status": "ok"})
            body = session.serialize(reply)[2:]
            r.from_guest("shell", [identity, DELIM, b"", *body])  # the guest sends it unsigned
            frames = await asyncio.wait_for(sock.recv_multipart(), 5)
            i = frames.index(DELIM)
            msg = session.deserialize(frames[i + 1:])  # checks the signature
            assert msg["msg_type"] == "execute_reply" and msg["content"] == {"status": "ok"}
            with pytest.raises(ValueError, match="Invalid Signature"):
                Session(key=b"another key").deserialize(frames[i + 1:])
        finally:
            sock.close()
