"""The in-VM agent: PID 1 of the guest's root filesystem.

It prepares the guest (mounts, loopback), starts ipykernel as the unprivileged user
``jovyan`` on guest-local IPC sockets with an empty HMAC key (the guest's ZMQ sockets
are reachable from nothing but this VM; the host relay signs and verifies with the
kernel's real key), and carries the kernel's shell, control, stdin and iopub channels
to the host over the host-guest port using ``guest.protocol``. Heartbeats are answered
on the host, so an idle kernel costs the guest no wake-ups.

After every restore from a snapshot the host opens a new protocol session; its first
message is a ``restore`` request, which the agent serves before anything else: reseed
the kernel CRNG, set the wall clock, take on the new kernel's identity (hostname,
environment, working directory, Python/NumPy random state).

Runs on the guest's Python (Debian 12: 3.11) with pyzmq and jupyter_client installed.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ctypes
import errno
import fcntl
import glob
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from guest import files
from guest.protocol import (
    PORT_NAME,
    ControlMessage,
    Endpoint,
    JupyterMessage,
    ProtocolError,
    decode_message,
    encode_control,
    encode_jupyter,
)

RUN_DIR = "/run/vmkg"
KERNEL_USER = 1000
KERNEL_HOME = "/home/jovyan"
DELIM = b"<IDS|MSG>"
READ_SIZE = 1 << 20
#: requests served in order with the Jupyter messages around them
ORDERED_OPS = frozenset({"restore", "thaw"})

_libc = ctypes.CDLL(None, use_errno=True)


def log(msg: str, *args: object) -> None:
    print("vmkg-agent: " + (msg % args if args else msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# PID 1 duties


def _mount(src: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target):
        return
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        log("mount %s on %s failed: %s", fstype, target, os.strerror(err))


def _loopback_up() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))  # SIOCSIFFLAGS, IFF_UP
    finally:
        s.close()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        log("cannot write %s: %s", path, exc)


def init_system() -> None:
    """Mounts and settings an init would do. Only when we are PID 1."""
    MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    _mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    try:
        _loopback_up()
    except OSError as exc:
        log("loopback: %s", exc)
    socket.sethostname("vmkg")
    # fewer periodic wake-ups: under emulation every guest timer costs host CPU
    _write("/proc/sys/vm/dirty_writeback_centisecs", "3000")
    _write("/proc/sys/vm/stat_interval", "60")
    _write("/proc/sys/kernel/printk", "3 4 1 3")


class OpError(files.FileOpError):
    """A request the agent refuses; ``code`` tells the host which kind of refusal."""


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
    except OSError as exc:
        return f"({exc})"


# ---------------------------------------------------------------------------
# Restore-time identity


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed_crng(entropy: bytes) -> None:
    """Mix host entropy into the CRNG and force a reseed (no VMGENID in the guest kernel)."""
    buf = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    with open("/dev/urandom", "wb") as f:
        fcntl.ioctl(f, RNDADDENTROPY, buf)
        fcntl.ioctl(f, RNDRESEEDCRNG)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def set_clock(time_ns: int) -> None:
    ts = _Timespec(time_ns // 1_000_000_000, time_ns % 1_000_000_000)
    if _libc.clock_settime(0, ctypes.byref(ts)) != 0:  # CLOCK_REALTIME
        raise OSError(ctypes.get_errno(), "clock_settime")


# Installed in the kernel process at bake time. After a restore the agent writes the
# new identity to RESTORE_FILE and sends SIGUSR2; the handler runs in the kernel's main
# thread (idle in its event loop, since snapshots are only taken of idle kernels) and
# reports on RESTORE_FIFO. That takes a millisecond where an execute_request takes
# a hundred under emulation.
RESTORE_FILE = "/run/vmkg/kernel/restore.json"
RESTORE_FIFO = "/run/vmkg/kernel/restore.done"

WARMUP_CODE = """\
def _vmkg_warmup(preload, restore_file, restore_fifo):
    import gc, json, os, random, signal, sys, uuid

    def on_restore(signum, frame):
        try:
            with open(restore_file) as f:
                req = json.load(f)
            os.environ.update(req["env"])
            if req["cwd"]:
                os.makedirs(req["cwd"], exist_ok=True)
                os.chdir(req["cwd"])
            if req["reseed"]:
                random.seed()
                np = sys.modules.get("numpy")
                if np is not None:
                    np.random.seed()
            get_ipython().kernel.session.session = str(uuid.uuid4())
            result = "ok"
        except Exception as exc:
            result = "error: %s: %s" % (type(exc).__name__, exc)
        fd = os.open(restore_fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, result.encode() + b"\\n")
        finally:
            os.close(fd)

    signal.signal(signal.SIGUSR2, on_restore)
    for name in preload:
        __import__(name)
    gc.collect()
    gc.freeze()  # clones and forks then don't dirty pages by collecting old objects
_vmkg_warmup({preload!r}, {restore_file!r}, {restore_fifo!r})
del _vmkg_warmup
"""


# ---------------------------------------------------------------------------
# The port to the host


def find_port() -> str:
    for name_file in glob.glob("/sys/class/virtio-ports/vport*/name"):
        with open(name_file) as f:
            if f.read().strip() == PORT_NAME:
                return "/dev/" + name_file.split("/")[-2]
    raise FileNotFoundError(f"no virtio-serial port named {PORT_NAME}")


class HostLink:
    """The guest end of the link over a virtio-serial port.

    While the host end is away the port reports HUP and reads return EOF; the kernel
    then signals SIGIO when the host comes back (we enable O_ASYNC only meanwhile).
    """

    def __init__(self, agent: Agent, path: str) -> None:
        self.agent = agent
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.loop = asyncio.get_running_loop()
        self.out = bytearray()
        self.connected = False
        self._writing = False

    def start(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        self.loop.add_signal_handler(signal.SIGIO, self._check_connected)
        self._check_connected()

    def _host_present(self) -> bool:
        p = select.poll()
        p.register(self.fd, select.POLLIN | select.POLLOUT)
        return not any(ev & select.POLLHUP for _, ev in p.poll(0))

    def _set_async(self, on: bool) -> None:
        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, (fl | os.O_ASYNC) if on else (fl & ~os.O_ASYNC))

    def _check_connected(self) -> None:
        if self.connected or not self._host_present():
            return
        self._set_async(False)
        self.connected = True
        self.agent.endpoint.connection_made()
        self.loop.add_reader(self.fd, self._on_readable)
        self.flush()

    def _lost(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self.out.clear()
        self.agent.endpoint.connection_lost()
        self._set_async(True)
        # the host may have come back before O_ASYNC was on: look once more, and
        # keep a slow fallback poll for as long as we are disconnected
        self.loop.call_soon(self._check_connected)
        self.loop.call_later(1.0, self._fallback_poll)

    def _fallback_poll(self) -> None:
        if not self.connected:
            self._check_connected()
            if not self.connected:
                self.loop.call_later(1.0, self._fallback_poll)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log("port read: %s", exc)
            data = b""
        if not data:
            self._lost()
            return
        self.agent.on_bytes(data)

    def flush(self) -> None:
        if not self.connected:
            return
        self.out += self.agent.endpoint.outgoing()
        if self.out and not self._writing:
            self._on_writable()

    def _on_writable(self) -> None:
        while self.out:
            try:
                n = os.write(self.fd, self.out[:READ_SIZE])
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ENODEV, errno.EIO):
                    self._lost()
                    return
                raise
            del self.out[:n]
        if self.out and not self._writing:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writing = True
        elif not self.out and self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
            self.agent.on_drained()


# ---------------------------------------------------------------------------
# The agent


class Agent:
    def __init__(self) -> None:
        self.endpoint = Endpoint(is_host=False)
        self.ctx = zmq.asyncio.Context()
        self.session = Session(key=b"", username="vmkg-agent")
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.kernel: subprocess.Popen[bytes] | None = None
        self.link: HostLink | None = None
        self._own: dict[str, asyncio.Future[dict[str, Any]]] = {}  # agent's msg_id -> reply
        self._own_order: collections.deque[str] = collections.deque()
        self.ready_attempts = 0
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: asyncio.Queue[JupyterMessage | ControlMessage] = asyncio.Queue()
        self.kernel_state = "idle"
        self._state_changed = asyncio.Event()
        self._pending: dict[str, float] = {}  # shell requests sent to the kernel, not yet answered
        self.frozen = False
        self._held: list[JupyterMessage] = []

    # -- kernel process ---------------------------------------------------------

    def start_kernel(self) -> None:
        kdir = os.path.join(RUN_DIR, "kernel")
        os.makedirs(kdir, mode=0o700, exist_ok=True)
        os.chown(kdir, KERNEL_USER, KERNEL_USER)
        conn = {
            "transport": "ipc", "ip": os.path.join(kdir, "k"),
            "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5,
            "key": "", "signature_scheme": "hmac-sha256", "kernel_name": "python3",
        }
        path = os.path.join(kdir, "connection.json")
        with open(path, "w") as f:
            json.dump(conn, f)
        os.chown(path, KERNEL_USER, KERNEL_USER)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": KERNEL_HOME, "USER": "jovyan",
            "LANG": "C.UTF-8", "SHELL": "/bin/sh", "TERM": "xterm-256color",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYTHONUNBUFFERED": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
        logf = open(os.path.join(RUN_DIR, "kernel.log"), "ab")  # noqa: SIM115 (child owns it)
        self.kernel = subprocess.Popen(
            [sys.executable, "-m", "ipykernel_launcher", "-f", path],
            env=env, cwd=KERNEL_HOME, user=KERNEL_USER, group=KERNEL_USER, extra_groups=[],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
        )
        logf.close()
        base = conn["ip"]
        for name, kind, port in (("shell", zmq.DEALER, 1), ("control", zmq.DEALER, 4),
                                 ("stdin", zmq.DEALER, 3), ("iopub", zmq.SUB, 2)):
            sock = self.ctx.socket(kind)
            sock.linger = 0
            if kind == zmq.DEALER:
                # one identity on shell and stdin, so input_request finds its way back
                sock.setsockopt(zmq.IDENTITY, b"vmkg-agent")
            else:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(f"ipc://{base}-{port}")
            self.sockets[name] = sock

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.kernel is not None and pid == self.kernel.pid:
                code = os.waitstatus_to_exitcode(status)
                self.kernel.returncode = code
                log("kernel exited with %s", code)
                self.send_control({"event": "kernel_exit", "status": code})

    async def _kernel_request(self, msg_type: str, content: dict[str, Any], timeout: float) -> dict[str, Any]:
        msg = self.session.msg(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._own[msg_id] = fut
        # the id stays known after a timeout, so a late reply is still recognised as ours
        self._own_order.append(msg_id)
        while len(self._own_order) > 1000:
            self._own.pop(self._own_order.popleft(), None)
        await self.sockets["shell"].send_multipart(self.session.serialize(msg))
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def wait_kernel_ready(self) -> None:
        attempts: list[asyncio.Future[dict[str, Any]]] = []
        while True:
            if self.kernel is not None and self.kernel.returncode is not None:
                log("kernel exited with %s before it was ready: %s", self.kernel.returncode,
                    _tail(os.path.join(RUN_DIR, "kernel.log")))
                return
            self.ready_attempts += 1
            attempts.append(asyncio.ensure_future(
                self._kernel_request("kernel_info_request", {}, timeout=3600)))
            done, _ = await asyncio.wait(attempts, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            if any(not d.cancelled() and d.exception() is None for d in done):
                break
            attempts = [a for a in attempts if not a.done()]
        for a in attempts:
            a.cancel()
        self._ready.set()

    async def execute(self, code: str, timeout: float = 120.0) -> dict[str, Any]:
        content = {"code": code, "silent": True, "store_history": False,
                   "allow_stdin": False, "stop_on_error": False, "user_expressions": {}}
        reply = await self._kernel_request("execute_request", content, timeout)
        if reply.get("status") != "ok":
            raise RuntimeError(f"{reply.get('ename')}: {reply.get('evalue')}")
        return reply

    # -- kernel -> host ---------------------------------------------------------

    def _own_reply(self, parts: list[bytes]) -> bool:
        """True if this message answers (or reports on) one of the agent's own requests."""
        if not self._own:
            return False
        try:
            i = parts.index(DELIM)
            parent = json.loads(parts[i + 3])
        except (ValueError, IndexError):
            return False
        msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
        if msg_id not in self._own:
            return False
        if i == 0 and not self._own[msg_id].done():  # on shell: the reply itself
            self._own[msg_id].set_result(json.loads(parts[i + 5]))
        return True

    async def pump_kernel(self, channel: str) -> None:
        sock = self.sockets[channel]
        while True:
            parts = await sock.recv_multipart(copy=True)
            self._track(channel, parts)
            if self._own_reply(parts):
                continue
            if channel == "iopub" and len(parts) > 3 and b'"iopub_welcome"' in parts[2]:
                continue  # the welcome answers the agent's own subscription, not a client's
            while not self.endpoint.can_send:
                self._window_open.clear()
                await self._window_open.wait()
            self.endpoint.send(encode_jupyter(channel, parts))
            if self.link:
                self.link.flush()

    # -- kernel state, for forks ------------------------------------------------

    def _track(self, channel: str, parts: list[bytes]) -> None:
        """Follow the kernel's execution state and which shell requests await a reply."""
        if channel == "iopub":
            if parts and parts[0].endswith(b".status"):
                try:
                    content = json.loads(parts[parts.index(DELIM) + 5])
                    self.kernel_state = content.get("execution_state", self.kernel_state)
                except (ValueError, IndexError):
                    return
                self._state_changed.set()
        elif channel == "shell" and self._pending:
            try:
                parent = json.loads(parts[parts.index(DELIM) + 3])
            except (ValueError, IndexError):
                return
            if self._pending.pop(parent.get("msg_id"), None) is not None:
                self._state_changed.set()

    def _note_request(self, msg: JupyterMessage) -> None:
        if msg.channel != "shell":
            return
        try:
            header = json.loads(msg.parts[msg.parts.index(DELIM) + 2])
        except (ValueError, IndexError):
            return
        if str(header.get("msg_type", "")).endswith("_request"):
            self._pending[header.get("msg_id")] = time.monotonic()

    def quiescent(self) -> bool:
        return self.kernel_state == "idle" and not self._pending

    # -- host -> agent ----------------------------------------------------------

    def on_bytes(self, data: bytes) -> None:
        try:
            messages = self.endpoint.receive(data)
        except (ProtocolError, ValueError) as exc:
            log("protocol error from host: %s", exc)
            messages = []
        if self.endpoint.fresh_session:
            self.endpoint.fresh_session = False
            self._fresh_session()
        for raw in messages:
            try:
                msg = decode_message(raw)
            except ProtocolError as exc:
                log("dropping bad message: %s", exc)
                continue
            if isinstance(msg, ControlMessage) and msg.body.get("op") not in ORDERED_OPS:
                self._spawn(self.on_control(msg))
            else:
                self._inbox.put_nowait(msg)
        if self.endpoint.can_send:
            self._window_open.set()
        if self.link:
            self.link.flush()

    async def inbox_loop(self) -> None:
        """Deliver the host's Jupyter messages and ordered requests strictly in order.

        A ``restore`` must finish (CRNG reseeded, clock set, kernel state renewed)
        before the first message of the new session reaches the kernel.
        """
        while True:
            msg = await self._inbox.get()
            if isinstance(msg, JupyterMessage):
                if msg.channel == "iopub":
                    continue
                if self.frozen:
                    self._held.append(msg)  # a fork is being taken: nothing may start now
                    continue
                self._note_request(msg)
                await self.sockets[msg.channel].send_multipart(msg.parts)
            else:
                await self.on_control(msg)

    def on_drained(self) -> None:
        if self.endpoint.can_send:
            self._window_open.set()

    def _fresh_session(self) -> None:
        # A new host session: requests the old one left half-done are void, and so is
        # whatever the old session had queued (a fork child must not run its parent's input).
        for fut in self._own.values():
            if not fut.done():
                fut.cancel()
        self.frozen = False
        self._held.clear()
        self._pending.clear()

    def send_control(self, body: dict[str, Any]) -> None:
        self.endpoint.send(encode_control(body))
        if self.link:
            self.link.flush()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def on_control(self, msg: ControlMessage) -> None:
        body = msg.body
        op = body.get("op")
        rid = body.get("id")
        try:
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            result = await handler(body)
            reply: dict[str, Any] = {"id": rid, "ok": True, "result": result}
        except Exception as exc:  # every failure goes back to the host as an answer
            reply = {"id": rid, "ok": False, "error": str(exc) or type(exc).__name__,
                     "kind": getattr(exc, "code", None) or type(exc).__name__,
                     "errno": getattr(exc, "errno", None)}
            if not isinstance(exc, (OSError, ValueError, files.FileOpError)):
                reply["traceback"] = traceback.format_exc()
        self.send_control(reply)

    # -- operations (the host's requests) ---------------------------------------

    async def op_ready(self, body: dict[str, Any]) -> dict[str, Any]:
        timeout = float(body.get("wait", 300))
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"ipykernel did not answer kernel_info within {timeout:.0f} s "
                               f"(exit status {self.kernel.returncode if self.kernel else None}); "
                               f"kernel log: {_tail(os.path.join(RUN_DIR, 'kernel.log'))}") from None
        preload = [m for m in body.get("preload", []) if isinstance(m, str)]
        if not os.path.exists(RESTORE_FIFO):
            os.mkfifo(RESTORE_FIFO, 0o600)
            os.chown(RESTORE_FIFO, KERNEL_USER, KERNEL_USER)
        await self.execute(WARMUP_CODE.format(preload=preload, restore_file=RESTORE_FILE,
                                              restore_fifo=RESTORE_FIFO), timeout=timeout)
        return {"kernel_release": os.uname().release, "python": sys.version.split()[0],
                "kernel_pid": self.kernel.pid if self.kernel else None}

    async def op_restore(self, body: dict[str, Any]) -> dict[str, Any]:
        reseed_crng(base64.b64decode(body["entropy"]))
        set_clock(int(body["time_ns"]))
        name = body.get("hostname")
        if name:
            socket.sethostname(name)
        req = {"env": {str(k): str(v) for k, v in (body.get("env") or {}).items()},
               "cwd": body.get("cwd") or "", "reseed": bool(body.get("reseed", True))}
        await self._ready.wait()
        assert self.kernel is not None
        with open(RESTORE_FILE + ".tmp", "w") as f:
            json.dump(req, f)
        os.chown(RESTORE_FILE + ".tmp", KERNEL_USER, KERNEL_USER)
        os.replace(RESTORE_FILE + ".tmp", RESTORE_FILE)
        # open our end first so the handler's non-blocking open finds a reader
        fd = os.open(RESTORE_FIFO, os.O_RDONLY | os.O_NONBLOCK)
        try:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[bytes] = loop.create_future()
            buf = bytearray()

            def readable() -> None:
                try:
                    buf.extend(os.read(fd, 4096))
                except BlockingIOError:
                    return
                if buf.endswith(b"\n") and not done.done():
                    done.set_result(bytes(buf))

            loop.add_reader(fd, readable)
            try:
                os.kill(self.kernel.pid, signal.SIGUSR2)
                result = (await asyncio.wait_for(done, 10.0)).decode().strip()
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        if result != "ok":
            raise RuntimeError(f"kernel could not take on its new identity: {result}")
        return {"time_ns": time.time_ns()}

    async def op_freeze(self, body: dict[str, Any]) -> dict[str, Any]:
        """Wait until the kernel is idle with nothing queued, then hold new input.

        The host pauses and snapshots the VM while frozen, so a fork never starts in the
        middle of a cell. ``thaw`` (ordered with the held input) releases it.
        """
        wait = float(body.get("wait", 30))
        deadline = time.monotonic() + wait
        while not self.quiescent():
            left = deadline - time.monotonic()
            if left <= 0:
                raise OpError("busy", f"the kernel is still busy after {wait:g} s "
                                        f"({len(self._pending)} request(s) unanswered)")
            self._state_changed.clear()
            try:
                await asyncio.wait_for(self._state_changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        self.frozen = True
        return {"state": self.kernel_state}

    async def op_thaw(self, body: dict[str, Any]) -> dict[str, Any]:
        self.frozen = False
        held, self._held = self._held, []
        for msg in held:
            self._note_request(msg)
            await self.sockets[msg.channel].send_multipart(msg.parts)
        return {"released": len(held)}

    async def op_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        alive = self.kernel is not None and self.kernel.returncode is None
        return {"kernel_alive": alive, "time_ns": time.time_ns()}

    async def op_diag(self, body: dict[str, Any]) -> dict[str, Any]:
        """What an operator needs when a kernel misbehaves: its process and its log."""
        return {
            "kernel_pid": self.kernel.pid if self.kernel else None,
            "kernel_status": self.kernel.returncode if self.kernel else None,
            "ready": self._ready.is_set(), "ready_attempts": self.ready_attempts,
            "kernel_log": _tail(os.path.join(RUN_DIR, "kernel.log"), 40),
            "uptime": _tail("/proc/uptime", 1), "loadavg": _tail("/proc/loadavg", 1),
        }

    async def op_signal(self, body: dict[str, Any]) -> None:
        if self.kernel is None or self.kernel.returncode is not None:
            raise ProcessLookupError("kernel is not running")
        os.kill(self.kernel.pid, int(body.get("signum", signal.SIGINT)))

    async def op_sync(self, body: dict[str, Any]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, os.sync)

    async def op_file(self, body: dict[str, Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, files.handle, body)

    # -- main -------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap_children)
        self.start_kernel()
        self.link = HostLink(self, find_port())
        self.link.start()
        for channel in ("shell", "control", "stdin", "iopub"):
            self._spawn(self.pump_kernel(channel))
        self._spawn(self.wait_kernel_ready())
        self._spawn(self.inbox_loop())
        await asyncio.Event().wait()


def main() -> None:
    if os.getpid() == 1:
        init_system()
    os.makedirs(RUN_DIR, exist_ok=True)
    try:
        asyncio.run(Agent().run())
    except BaseException:
        traceback.print_exc()
        if os.getpid() == 1:
            time.sleep(0.5)
            # reboot, not power off: on microvm a reboot makes QEMU exit (-no-reboot)
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("b")
        raise


if __name__ == "__main__":
    main()
