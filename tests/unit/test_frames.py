"""Host-guest frames and the reliable session, the cases tests/test_protocol.py leaves out:
each kind of corruption a decoder must skip (header CRC, payload CRC, length, type), the
acknowledgement bookkeeping (piggybacked acks, bare ACKs only when owed, the send window),
and what a session refuses (data before the handshake, out-of-order data, a HELLO from
the wrong side, a guest that forgot the session).

Both endpoints are real ``guest.protocol.Endpoint`` objects; bytes move by hand.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from guest import protocol
from guest.protocol import (
    ACK,
    DATA,
    FLAG_MORE,
    HEADER_SIZE,
    HELLO,
    HELLO_ACK,
    MAGIC,
    MAX_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
    Endpoint,
    Frame,
    FrameDecoder,
    JupyterMessage,
    ProtocolError,
    decode_message,
    encode_jupyter,
)


def connected() -> tuple[Endpoint, Endpoint]:
    host, guest = Endpoint(is_host=True, session="s"), Endpoint(is_host=False)
    host.connection_made()
    guest.connection_made()
    guest.receive(host.outgoing())
    host.receive(guest.outgoing())
    assert host.established and guest.established
    return host, guest


def frames(data: bytes) -> list[Frame]:
    return FrameDecoder().feed(data)


# -- frame encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    Frame(HELLO, payload=b'{"session": "x"}'),
    Frame(HELLO_ACK, payload=b"{}"),
    Frame(DATA, seq=7, ack=3, payload=b"\x00\xff" * 100, flags=FLAG_MORE),
    Frame(DATA, seq=2**64 - 1, ack=2**64 - 2, payload=b""),
    Frame(ACK, ack=42),
    Frame(DATA, seq=1, payload=bytes(MAX_FRAME_PAYLOAD)),
])
def test_every_frame_round_trips(frame: Frame) -> None:
    raw = frame.encode()
    assert raw.startswith(MAGIC) and len(raw) == HEADER_SIZE + len(frame.payload)
    assert frames(raw) == [frame]


def test_a_frame_fed_byte_by_byte_comes_out_once_at_its_last_byte() -> None:
    raw = Frame(DATA, 1, 0, b"payload").encode()
    dec = FrameDecoder()
    for b in raw[:-1]:
        assert dec.feed(bytes([b])) == []
    assert dec.feed(raw[-1:]) == [Frame(DATA, 1, 0, b"payload")]
    assert dec.skipped == 0


def corrupt(raw: bytes, offset: int) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ 0x01]) + raw[offset + 1:]


@pytest.mark.parametrize(("what", "offset"), [
    ("type", 4), ("flags", 5), ("seq", 8), ("ack", 16), ("length", 24), ("payload crc", 28),
    ("header crc", 32), ("payload", HEADER_SIZE + 3),
])
def test_a_corrupted_frame_is_skipped_and_the_next_one_found(what: str, offset: int) -> None:
    bad = corrupt(Frame(DATA, 1, 0, b"first frame").encode(), offset)
    good = Frame(DATA, 2, 0, b"second").encode()
    dec = FrameDecoder()
    assert dec.feed(bad + good) == [Frame(DATA, 2, 0, b"second")], what
    assert dec.skipped >= 1


def forged(ftype: int, length: int, payload: bytes = b"") -> bytes:
    """A frame with a valid header CRC but fields a decoder must refuse."""
    head = struct.pack("<4sBBHQQII", MAGIC, ftype, 0, 0, 1, 0, length, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


@pytest.mark.parametrize("raw", [
    forged(0, 0), forged(ACK + 1, 0), forged(DATA, MAX_FRAME_PAYLOAD + 1),
])
def test_unknown_types_and_oversized_lengths_are_not_frames(raw: bytes) -> None:
    dec = FrameDecoder()
    good = Frame(ACK, ack=5).encode()
    # an oversized length must not make the decoder wait for a megabyte that never comes
    assert dec.feed(raw + good) == [Frame(ACK, ack=5)]
    assert dec.skipped >= 1


def test_garbage_without_magic_is_dropped_but_a_split_magic_is_kept() -> None:
    dec = FrameDecoder()
    raw = Frame(DATA, 1, 0, b"x").encode()
    assert dec.feed(b"\x00" * 1000 + raw[:2]) == []  # half a magic at the end: kept
    assert dec.skipped >= 997  # at most 3 bytes (a possible magic's start) wait for more
    assert dec.feed(raw[2:]) == [Frame(DATA, 1, 0, b"x")]
    assert dec.skipped == 1000


def test_reset_forgets_a_partial_frame() -> None:
    dec = FrameDecoder()
    raw = Frame(DATA, 1, 0, b"abc").encode()
    dec.feed(raw[:10])
    dec.reset()
    assert dec.feed(raw) == [Frame(DATA, 1, 0, b"abc")]


# -- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["shell", "control", "stdin", "iopub"])
def test_jupyter_messages_keep_their_channel_and_empty_parts(channel: str) -> None:
    parts = [b"", b"<IDS|MSG>", b"", b"{}", b"", b"{}", b"{}"]
    msg = decode_message(encode_jupyter(channel, parts))
    assert msg == JupyterMessage(channel, parts)


def test_jupyter_message_parts_may_be_views() -> None:
    """The agent passes a large frame on as a view of ZMQ's memory; its length is its byte
    count whatever the view's item size."""
    big = bytes(range(256)) * 1000
    words = memoryview(b"\x01\x00\x02\x00").cast("H")
    parts = [b"topic", b"<IDS|MSG>", memoryview(big), words]
    msg = decode_message(encode_jupyter("iopub", parts))
    assert msg == JupyterMessage("iopub", [b"topic", b"<IDS|MSG>", big, b"\x01\x00\x02\x00"])


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_truncated_and_padded_jupyter_messages_are_refused(cut: int) -> None:
    raw = encode_jupyter("shell", [b"abcd", b"efgh"])
    with pytest.raises(ProtocolError, match="truncated"):
        decode_message(raw[:-cut])
    with pytest.raises(ProtocolError, match="trailing"):
        decode_message(raw + b"x" * cut)


def test_control_messages_must_be_json_objects() -> None:
    with pytest.raises(ProtocolError, match="bad control"):
        decode_message(b"\x02{not json")
    with pytest.raises(ProtocolError, match="not an object"):
        decode_message(b'\x02"text"')


# -- the session: sequence numbers and acknowledgements ------------------------------------------


def test_data_piggybacks_the_ack_and_a_bare_ack_is_sent_only_when_owed() -> None:
    host, guest = connected()
    host.send(b"request")
    assert guest.receive(host.outgoing()) == [b"request"]
    assert guest.recv_seq == 1 and guest.acked_sent == 0
    guest.send(b"reply")  # the reply carries the ack of the request
    (reply,) = frames(guest.outgoing())
    assert reply.type == DATA and reply.seq == 1 and reply.ack == 1
    assert guest.acked_sent == 1
    assert guest.outgoing() == b""  # nothing owed: no bare ACK
    host.receive(reply.encode())
    assert not host.unacked and host.unacked_bytes == 0  # the request is acknowledged
    (ack,) = frames(host.outgoing())  # the host owes an ack for the reply and has no data
    assert ack.type == ACK and ack.ack == 1 and ack.payload == b""
    guest.receive(ack.encode())
    assert not guest.unacked
    assert host.outgoing() == b"" and guest.outgoing() == b""


def test_unacknowledged_bytes_close_the_window_until_acked() -> None:
    host, guest = Endpoint(is_host=True, session="s", window=100), Endpoint(is_host=False)
    host.connection_made()
    guest.connection_made()
    guest.receive(host.outgoing())
    host.receive(guest.outgoing())
    host.send(b"x" * 60)
    assert host.can_send
    host.send(b"y" * 60)
    assert not host.can_send and host.unacked_bytes == 120
    guest.receive(host.outgoing())
    host.receive(guest.outgoing())  # the guest's bare ACK
    assert host.can_send and host.unacked_bytes == 0


def test_fragments_use_consecutive_sequence_numbers_and_are_acked_together() -> None:
    host, guest = connected()
    msg = bytes(2 * MAX_FRAME_PAYLOAD + 1)
    guest.send(msg)
    sent = frames(guest.outgoing())
    assert [f.seq for f in sent] == [1, 2, 3]
    assert [f.flags & FLAG_MORE for f in sent] == [FLAG_MORE, FLAG_MORE, 0]
    assert host.receive(b"".join(f.encode() for f in sent[:2])) == []  # not complete yet
    assert host.receive(sent[2].encode()) == [msg]
    guest.receive(host.outgoing())
    assert not guest.unacked


def test_duplicates_are_ignored_a_gap_drops_the_link_and_the_retransmission_fills_in() -> None:
    host, guest = connected()
    for m in (b"one", b"two", b"three"):
        guest.send(m)
    one, two, three = frames(guest.outgoing())
    assert host.receive(one.encode()) == [b"one"]
    assert host.receive(one.encode()) == []  # duplicate
    # within one connection nothing is lost, so a gap is a lie: the host drops the link
    with pytest.raises(ProtocolError, match="DATA frame 3 after 1"):
        host.receive(three.encode())
    assert host.recv_seq == 1
    # a reconnect: the guest retransmits everything not acknowledged, in order
    host.connection_lost()
    guest.connection_lost()
    host.connection_made()
    guest.connection_made()
    guest.receive(host.outgoing())
    assert host.receive(guest.outgoing()) == [b"two", b"three"]


def test_nothing_is_written_before_the_handshake_and_everything_after_it() -> None:
    host = Endpoint(is_host=True, session="s")
    host.send(b"early")
    assert host.outgoing() == b""  # not connected yet
    host.connection_made()
    (hello,) = frames(host.outgoing())
    assert hello.type == HELLO
    assert json.loads(hello.payload) == {"session": "s", "recv": 0, "version": PROTOCOL_VERSION,
                                         "conn": 1, "max_message": host.max_message}
    guest = Endpoint(is_host=False)
    guest.connection_made()
    guest.receive(hello.encode())
    assert host.receive(guest.outgoing()) == []
    (data,) = frames(host.outgoing())
    assert data.type == DATA and data.payload == b"early"


def test_data_before_the_handshake_is_dropped() -> None:
    guest = Endpoint(is_host=False)
    guest.connection_made()
    assert guest.receive(Frame(DATA, 1, 0, b"stale").encode()) == []
    assert guest.recv_seq == 0


def test_hellos_from_the_wrong_side_are_protocol_errors() -> None:
    host = Endpoint(is_host=True, session="s")
    with pytest.raises(ProtocolError, match="guest sent HELLO"):
        host.receive(Frame(HELLO, payload=b"{}").encode())
    guest = Endpoint(is_host=False)
    with pytest.raises(ProtocolError, match="host sent HELLO_ACK"):
        guest.receive(Frame(HELLO_ACK, payload=b"{}").encode())


def test_an_answer_for_another_session_is_refused() -> None:
    host = Endpoint(is_host=True, session="mine")
    host.connection_made()
    reply = {"session": "other", "recv": 0, "fresh": True, "version": PROTOCOL_VERSION, "conn": 1}
    with pytest.raises(ProtocolError, match="another session"):
        host.receive(Frame(HELLO_ACK, payload=json.dumps(reply).encode()).encode())


def test_a_guest_that_forgot_a_session_with_traffic_is_refused() -> None:
    host, guest = connected()
    guest.send(b"output")
    host.receive(guest.outgoing())
    host.outgoing()  # the host acknowledged something of this session
    host.connection_lost()
    fresh_guest = Endpoint(is_host=False)  # restored behind the host's back
    host.connection_made()
    fresh_guest.connection_made()
    fresh_guest.receive(host.outgoing())
    with pytest.raises(ProtocolError, match="forgot the session"):
        host.receive(fresh_guest.outgoing())


def test_the_same_host_coming_back_keeps_the_session() -> None:
    host, guest = connected()
    guest.send(b"a")
    host.receive(guest.outgoing())
    host.connection_lost()
    guest.connection_lost()
    host.connection_made()
    guest.connection_made()
    guest.fresh_session = False
    guest.receive(host.outgoing())
    assert not guest.fresh_session and guest.session == "s"
    assert not guest.unacked  # the HELLO's recv acknowledged "a"
    host.receive(guest.outgoing())
    guest.send(b"b")
    (b,) = frames(guest.outgoing())
    assert b.seq == 2 and host.receive(b.encode()) == [b"b"]


def test_oversized_messages_are_refused_by_the_sender_and_discarded_by_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the limit made small (4 frames) so the test need not allocate 256 MiB
    monkeypatch.setattr(protocol, "MAX_MESSAGE", 4 * MAX_FRAME_PAYLOAD)
    host, guest = connected()
    host.max_message = 4 * MAX_FRAME_PAYLOAD
    host.send(bytes(4 * MAX_FRAME_PAYLOAD))  # exactly the limit is fine
    with pytest.raises(ProtocolError, match="exceeds"):
        host.send(bytes(4 * MAX_FRAME_PAYLOAD + 1))
    # a peer's message over the limit is discarded as it streams in, never held whole,
    # and its size is reported once it ends
    chunk = bytes(MAX_FRAME_PAYLOAD)
    for seq in range(1, 6):
        assert host.receive(Frame(DATA, seq, 0, chunk, FLAG_MORE).encode()) == []
        assert sum(len(p) for p in host._partial) <= 4 * MAX_FRAME_PAYLOAD
    assert host.receive(Frame(DATA, 6, 0, b"end").encode()) == []
    assert host.oversized == [5 * MAX_FRAME_PAYLOAD + 3]
