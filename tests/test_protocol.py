"""The host-guest wire protocol, sans-IO: framing, resync, exactly-once across reconnects.

These drive both real ``Endpoint`` objects through a simulated link that loses and
truncates bytes the way a QEMU chardev reconnect does. The same property on a real
VM is tested in test_vm_runtime.py.
"""

from __future__ import annotations

import json
import random

import pytest

from guest.protocol import (
    ACK,
    DATA,
    HELLO,
    MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
    ControlMessage,
    Endpoint,
    Frame,
    FrameDecoder,
    JupyterMessage,
    ProtocolError,
    decode_message,
    encode_control,
    encode_jupyter,
    json_depth_exceeds,
)


def handshake(host: Endpoint, guest: Endpoint) -> None:
    host.connection_made()
    guest.connection_made()
    guest.receive(host.outgoing())
    host.receive(guest.outgoing())
    assert host.established and guest.established


def test_message_roundtrip() -> None:
    parts = [b"ident", b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}", b"\x00" * 10]
    msg = decode_message(encode_jupyter("shell", parts))
    assert isinstance(msg, JupyterMessage) and msg.channel == "shell" and msg.parts == parts
    ctl = decode_message(encode_control({"op": "ping", "id": 3}))
    assert isinstance(ctl, ControlMessage) and ctl.body == {"op": "ping", "id": 3}


@pytest.mark.parametrize("bad", [b"", b"\x09", b"\x01\x09\x01\x00", b"\x01\x00\x01\x00\xff\xff\xff\x00", b"\x02[1]"])
def test_malformed_messages_rejected(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(bad)


def test_decoder_resyncs_after_garbage_and_cut_frames() -> None:
    a = Frame(DATA, 1, 0, b"hello").encode()
    b = Frame(DATA, 2, 0, b"world" * 1000).encode()
    stream = b"junk" + a[:20] + b"\xf0VKG" + b + a
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), 7):  # arbitrary chunking
        got += dec.feed(stream[i:i + 7])
    assert [f.payload for f in got] == [b"world" * 1000, b"hello"]
    assert dec.skipped > 0


def test_fragmentation_of_large_messages() -> None:
    host, guest = Endpoint(is_host=True, session="s"), Endpoint(is_host=False)
    handshake(host, guest)
    big = bytes(random.Random(1).randbytes(3 * MAX_FRAME_PAYLOAD + 123))
    guest.send(big)
    assert host.receive(guest.outgoing()) == [big]


def test_exactly_once_in_order_across_lossy_reconnects() -> None:
    rng = random.Random(42)
    host, guest = Endpoint(is_host=True, session="s1"), Endpoint(is_host=False)
    handshake(host, guest)
    sent_by_guest: list[bytes] = []
    sent_by_host: list[bytes] = []
    got_host: list[bytes] = []
    got_guest: list[bytes] = []
    reconnects = 0

    def gsend(m: bytes) -> None:
        sent_by_guest.append(m)
        guest.send(m)

    for i in range(3000):
        gsend(f"g{i}:".encode() * rng.randint(1, 50))
        sent_by_host.append(f"h{i}".encode())
        host.send(sent_by_host[-1])
        if rng.random() < 0.3:
            g_out, h_out = guest.outgoing(), host.outgoing()
            if rng.random() < 0.05:
                reconnects += 1
                # the host end is torn down: bytes in flight are partly delivered, then lost
                got_host += host.receive(g_out[: rng.randint(0, len(g_out))])
                got_guest += guest.receive(h_out[: rng.randint(0, len(h_out))])
                host.connection_lost()
                # the guest writes before it notices: QEMU drops these bytes
                gsend(f"away{reconnects}".encode())
                guest.outgoing()
                guest.connection_lost()
                host.connection_made()
                guest.connection_made()
                got_guest += guest.receive(host.outgoing())
                got_host += host.receive(guest.outgoing())
                got_guest += guest.receive(host.outgoing())
            else:
                got_host += host.receive(g_out)
                got_guest += guest.receive(h_out)
    for _ in range(3):
        got_host += host.receive(guest.outgoing())
        got_guest += guest.receive(host.outgoing())
    assert reconnects >= 5
    assert got_guest == sent_by_host  # every message exactly once, in order
    assert got_host == sent_by_guest
    assert not host.unacked and not guest.unacked  # and everything acknowledged


def test_new_session_resets_guest_state() -> None:
    guest = Endpoint(is_host=False)
    h1 = Endpoint(is_host=True, session="a")
    handshake(h1, guest)
    guest.send(b"old output")  # never acknowledged: the VM is snapshotted now
    # a restore: a new host session meets the same guest state
    h2 = Endpoint(is_host=True, session="b")
    h2.connection_made()
    guest.connection_made()
    guest.receive(h2.outgoing())
    assert guest.fresh_session and guest.session == "b"
    assert h2.receive(guest.outgoing()) == []  # the old session's output is not replayed
    guest.send(b"new")
    assert h2.receive(guest.outgoing()) == [b"new"]


def test_version_mismatch_is_reported() -> None:
    host, guest = Endpoint(is_host=True, session="s"), Endpoint(is_host=False)
    host.connection_made()
    hello = host.outgoing()
    import guest.protocol as p
    old = p.PROTOCOL_VERSION
    p.PROTOCOL_VERSION = old + 1  # the guest runs a newer agent
    try:
        guest.receive(hello)
        reply = guest.outgoing()
    finally:
        p.PROTOCOL_VERSION = old
    with pytest.raises(ProtocolError, match="protocol"):
        host.receive(reply)


# ---------------------------------------------------------------------------
# A hostile peer (the guest may be root and write anything): the host end is strict


def test_strict_decoder_refuses_bad_payload_after_valid_header() -> None:
    frame = bytearray(Frame(DATA, 1, 0, b"x" * 1000).encode())
    frame[-1] ^= 1
    lenient, strict = FrameDecoder(), FrameDecoder(strict=True)
    good = Frame(DATA, 2, 0, b"ok").encode()
    assert [f.payload for f in lenient.feed(bytes(frame) + good)] == [b"ok"]  # the guest resyncs
    with pytest.raises(ProtocolError, match="checksum"):
        strict.feed(bytes(frame) + good)


def test_host_refuses_out_of_state_frames() -> None:
    host, guest = Endpoint(is_host=True, session="s"), Endpoint(is_host=False)
    handshake(host, guest)
    host.send(b"unacked" * 1000)
    host.outgoing()
    # a HELLO_ACK after the handshake used to re-queue every unacknowledged frame
    guest.connection_made()
    guest.receive(Frame(HELLO, payload=json.dumps(
        {"session": "s", "recv": 0, "version": PROTOCOL_VERSION, "conn": 1}).encode()).encode())
    with pytest.raises(ProtocolError, match="after the handshake"):
        host.receive(guest.outgoing())


@pytest.mark.parametrize("frame", [Frame(DATA, 5, 0, b"\x02{}"), Frame(ACK, 0, 99)])
def test_host_refuses_gaps_and_acks_for_frames_never_sent(frame: Frame) -> None:
    host, guest = Endpoint(is_host=True, session="s"), Endpoint(is_host=False)
    handshake(host, guest)
    with pytest.raises(ProtocolError):
        host.receive(frame.encode())


def test_stale_hello_ack_of_an_earlier_connection_is_ignored() -> None:
    host, guest = Endpoint(is_host=True, session="s"), Endpoint(is_host=False)
    host.connection_made()
    guest.connection_made()
    guest.receive(host.outgoing())
    stale = guest.outgoing()  # answers connection 1; the host reconnects before reading it
    host.connection_lost()
    host.connection_made()
    guest.connection_made()
    guest.receive(host.outgoing())
    assert host.receive(stale + guest.outgoing()) == [] and host.established


def test_oversized_message_discarded_while_streaming() -> None:
    host, guest = Endpoint(is_host=True, session="s", max_message=3 * MAX_FRAME_PAYLOAD), Endpoint(is_host=False)
    handshake(host, guest)
    guest.send(b"a" * (10 * MAX_FRAME_PAYLOAD))
    guest.send(b"after")
    data = guest.outgoing()
    got = []
    for i in range(0, len(data), 1 << 16):
        got += host.receive(data[i:i + (1 << 16)])
        assert host._partial_size <= 10 * MAX_FRAME_PAYLOAD
        assert sum(len(p) for p in host._partial) <= 3 * MAX_FRAME_PAYLOAD
    assert got == [b"after"] and host.oversized == [10 * MAX_FRAME_PAYLOAD]


def test_json_depth_checked_without_recursion() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert json_depth_exceeds(deep, 64)
    assert not json_depth_exceeds(b'{"a": "' + b"[{" * 10_000 + b'"}', 64)  # brackets in a string
    assert not json_depth_exceeds(b'{"a": [[1, {"b": "\\"[["}]]}', 4)
    with pytest.raises(ProtocolError, match="deeper"):
        decode_message(b"\x02" + deep)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_message(b"\x02{}", max_control=1)
