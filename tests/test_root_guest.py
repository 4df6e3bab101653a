"""A guest whose kernel code is root floods and garbles the host-guest port (issue 9, section 2).

The default templates run kernel code as ``jovyan``; the threat model says kernel code may
become root in the guest anyway, replace the agent and write any bytes to the port. This
module registers, through the template catalog (``$VMKG_TEMPLATES``), a test-only
template ``rootpy`` whose kernel runs as uid 0 (``TemplateSpec.kernel_uid``; the agent
reads ``vmkg.kernel_uid=`` from the guest's kernel command line). Kernel code there
duplicates the agent's open port with ``pidfd_getfd`` and writes to it directly:

- megabytes of random bytes (garbage after the handshake: the host drops the link),
- replayed HELLO_ACKs (out of state once established: a protocol error, no re-queueing),
- frames whose header checks out and whose payload does not (dropped, no byte-wise retry),
- a header announcing a 4 GiB frame (refused before any buffering),
- messages *in sequence* (the attacker learns the next sequence number from an ACK it
  steals from the host): one bigger than this gateway's ``--GuestLimits.max_message``
  (4 MiB here), discarded as it streams in, and one control object nested 100,000 deep,
  refused before parsing.

Each attack runs against a live ``vmkg serve`` with a neighbour kernel (default template)
beside it. Each expects: the offending kernel cut off (its clients get a notice saying
why and ``execution_state: dead``) or its message dropped with a notice; the violation
counted in ``vmkg_guest_violations_total``; the gateway process within its bounds (RSS
grows by less than 200 MB, CPU time under half the attack's wall time); and the
neighbour answering, about as fast as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from gateway_helpers import Channels, Gateway

pytestmark = pytest.mark.vm

ROOT_KERNEL = "rootpy-microvm"
NEIGHBOUR = "python3-microvm"
MAX_MESSAGE = 4 << 20


@pytest.fixture(scope="module")
def root_template(template: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The catalog file naming the test-only root template, baked here (minutes on first use)."""
    from kernelmanager.runtime import Runtime
    from kernelmanager.templates import ensure_template, get_spec

    path = tmp_path_factory.mktemp("rootguest") / "templates.json"
    path.write_text(json.dumps({"rootpy": {
        "display_name": "Python 3, root in the guest (hostile-guest tests only)", "kernel_uid": 0,
        "warmup": []}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMKG_TEMPLATES", str(path))
        Runtime.instance().run_sync(ensure_template(get_spec("rootpy")), timeout=3600)
    yield str(path)


@pytest.fixture(scope="module")
def gateway_options(root_template: str) -> tuple[list[str], dict[str, str]]:
    return (["--pool-size=0", f"--GuestLimits.max_message={MAX_MESSAGE}"],
            {"VMKG_TEMPLATES": root_template})


# -- what runs in the root kernel ---------------------------------------------------------------

PRELUDE = r'''
import ctypes, os, select, struct, time, zlib
MAGIC = b"\xf0VKG"
HELLO, HELLO_ACK, DATA, ACK = 1, 2, 3, 4
HEAD = struct.Struct("<4sBBHQQII")

def frame(ftype, payload=b"", seq=0, ack=0, flags=0, length=None, pcrc=None):
    head = HEAD.pack(MAGIC, ftype, flags, 0, seq, ack, len(payload) if length is None else length,
                     zlib.crc32(payload) if pcrc is None else pcrc)
    return head + struct.pack("<I", zlib.crc32(head)) + payload

def port():
    """The agent's open host-guest port, duplicated into this process (needs root)."""
    assert os.geteuid() == 0, "the rootpy template's kernel should run as root"
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in ["1"] + [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/vport"):
                got = libc.syscall(438, os.pidfd_open(int(pid)), int(fd), 0)  # pidfd_getfd
                if got < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                return got
    raise RuntimeError("no virtio-serial port open in the guest")

def send(fd, data, budget=20.0):
    deadline = time.monotonic() + budget
    view = memoryview(data)
    while view and time.monotonic() < deadline:
        select.select([], [fd], [], 0.2)
        try:
            view = view[os.write(fd, view[:1 << 16]):]
        except BlockingIOError:
            continue
        except OSError:  # the host hung up on us
            return False
    return not view

fd = port()
'''

GARBAGE = PRELUDE + r'''
block = os.urandom(1 << 16)
t = time.monotonic()
while time.monotonic() - t < 10 and send(fd, block, budget=2):
    pass
'''

HELLO_ACK_REPLAY = PRELUDE + r'''
import json
ack = frame(HELLO_ACK, json.dumps({"session": "x", "recv": 0, "fresh": False, "conn": 1,
                                   "version": 2}).encode())
send(fd, ack * 2000)
'''

BAD_PAYLOAD_CRC = PRELUDE + r'''
bad = frame(DATA, b"\0" * 1000, seq=1 << 40, pcrc=12345)
send(fd, bad * 64)
'''

HUGE_FRAME_HEADER = PRELUDE + r'''
send(fd, frame(DATA, b"", seq=1 << 40, length=0xFFFFFFFF) + b"\0" * (4 << 20))
'''

# Learn the next sequence number: make the agent send (a print), steal the host's ACK of it
# from the port (the agent reads the same port; retry until this process wins a read),
# then send in sequence: first an oversized Jupyter message in 1 MiB fragments, then a
# control object nested 100,000 deep.
IN_SEQUENCE = PRELUDE + r'''
import json, sys
def steal_ack(deadline):
    buf = b""
    while time.monotonic() < deadline:
        print("poke", flush=True)
        sys.stdout.flush()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                buf += os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            found = None
            i = buf.find(MAGIC)
            while 0 <= i and i + 36 <= len(buf):
                head = buf[i:i + 32]
                if zlib.crc32(head) == struct.unpack_from("<I", buf, i + 32)[0]:
                    _, ftype, _, _, _, ack, _, _ = HEAD.unpack(head)
                    if ftype in (DATA, ACK) and ack:
                        found = ack
                i = buf.find(MAGIC, i + 1)
            if found:
                return found
            buf = buf[-64:]
    raise RuntimeError("no ACK from the host seen")

time.sleep(2)  # the agent sends its 'busy' and the host acknowledges it
seq = steal_ack(time.monotonic() + 60) + 1
time.sleep(1.0)  # let the stream output of the pokes settle (it moves the sequence on)
seq = steal_ack(time.monotonic() + 60) + 1
chunk = 1 << 20
total = 6 << 20
head = struct.pack("<BBH", 1, 3, 1) + struct.pack("<I", total)  # KIND_JUPYTER, iopub, 1 part
data = head + b"x" * total
frames = []
for off in range(0, len(data), chunk):
    more = 1 if off + chunk < len(data) else 0
    frames.append(frame(DATA, data[off:off + chunk], seq=seq, flags=more))
    seq += 1
deep = bytes([2]) + b"[" * 100000 + b"]" * 100000  # KIND_CONTROL
frames.append(frame(DATA, deep[:chunk], seq=seq))
send(fd, b"".join(frames), budget=60)
'''


# -- the host side ------------------------------------------------------------------------------

@dataclass
class Usage:
    rss: int
    cpu: float
    at: float


def usage(pid: int) -> Usage:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return Usage(rss, (int(fields[11]) + int(fields[12])) / ticks, time.monotonic())


async def rtt(ch: Channels) -> float:
    t0 = time.monotonic()
    r = await ch.execute("1+1", timeout=60)
    assert r.reply["status"] == "ok", r.reply
    return time.monotonic() - t0


@dataclass
class Outcome:
    dead: bool
    notices: str
    quiet: float
    after: float


async def attack(gw: Gateway, code: str, *, until: Any = None, timeout: float = 120) -> Outcome:
    """Run ``code`` as root in a fresh rootpy kernel with a neighbour beside it, until the
    kernel is dead (or ``until()`` holds); check the gateway's bounds; return what the
    attacker's clients saw."""
    a = gw.start_kernel(ROOT_KERNEL)["id"]
    b = gw.start_kernel(NEIGHBOUR)["id"]
    ca, cb = await Channels.open(gw, a), await Channels.open(gw, b)
    try:
        assert (await ca.value("__import__('os').geteuid()")) == 0
        quiet = sorted([await rtt(cb) for _ in range(3)])[1]
        before = usage(gw.proc.pid)
        await ca.send("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        notices: list[str] = []
        dead = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                break
            try:
                m = await ca.recv(timeout=1)
            except (asyncio.TimeoutError, TimeoutError):
                continue
            except Exception:  # noqa: BLE001 - the websocket closed after the death notice
                break
            if m.channel == "iopub" and m.msg_type == "stream" and "[vmkg]" in m.content["text"]:
                notices.append(m.content["text"])
            if m.channel == "iopub" and m.msg_type == "status" and m.content["execution_state"] == "dead":
                dead = True
                break
        after_usage = usage(gw.proc.pid)
        wall = after_usage.at - before.at
        assert after_usage.rss - before.rss < 200 << 20, (before, after_usage)
        assert after_usage.cpu - before.cpu < 0.5 * wall + 2, (before, after_usage)
        after = await rtt(cb)
        assert after < max(5 * quiet, 2.0), (quiet, after)
        return Outcome(dead, "".join(notices), quiet, after)
    finally:
        await ca.close()
        await cb.close()
        gw.delete_kernel(a)
        gw.delete_kernel(b)


def cut_off(gw: Gateway, code: str, reason: str) -> None:
    violations = gw.metric("vmkg_guest_violations_total", kind="protocol")
    out = asyncio.run(attack(gw, code))
    assert out.dead, f"the attacker's kernel was not marked dead; notices: {out.notices!r}"
    assert "[vmkg] The kernel was stopped: the link to the VM failed" in out.notices, out.notices
    assert reason in out.notices, out.notices
    assert gw.metric("vmkg_guest_violations_total", kind="protocol") > violations
    assert "marked dead" in gw.log()


def test_garbage_flood_cuts_the_kernel_off(gw: Gateway) -> None:
    cut_off(gw, GARBAGE, "garbage after the handshake")
    # under TCG the operator is told at start that the jail is the boundary
    assert "TCG" not in gw.log() or "is the boundary" in gw.log()


def test_replayed_hello_acks_cut_the_kernel_off(gw: Gateway) -> None:
    cut_off(gw, HELLO_ACK_REPLAY, "HELLO_ACK after the handshake")


def test_bad_payload_checksum_cuts_the_kernel_off(gw: Gateway) -> None:
    cut_off(gw, BAD_PAYLOAD_CRC, "payload checksum mismatch")


def test_frame_header_announcing_4_gib_cuts_the_kernel_off(gw: Gateway) -> None:
    cut_off(gw, HUGE_FRAME_HEADER, "frame header announces")


def test_oversized_and_deeply_nested_messages_in_sequence(gw: Gateway) -> None:
    oversized = gw.metric("vmkg_guest_violations_total", kind="oversized")
    malformed = gw.metric("vmkg_guest_violations_total", kind="malformed")

    def both() -> bool:
        return (gw.metric("vmkg_guest_violations_total", kind="oversized") > oversized
                and gw.metric("vmkg_guest_violations_total", kind="malformed") > malformed)

    out = asyncio.run(attack(gw, IN_SEQUENCE, until=both, timeout=240))
    # the oversized message was discarded as it streamed in, the nested one refused unparsed
    # (both harm only the guest's own output: dropped, counted, and its user told why)
    assert both(), (out.notices, gw.log()[-3000:])
    assert f"limit of {MAX_MESSAGE} bytes" in out.notices, out.notices
    assert "nests deeper than" in gw.log()
