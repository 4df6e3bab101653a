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
Its parts: ``system`` (PID 1 duties), ``link`` (the port to the host), ``identity``
(what a restore renews), ``files`` (file operations), ``protocol`` (the wire format).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from guest import files, magic, outstream
from guest.identity import RESTORE_FIFO, RESTORE_FILE, WARMUP_CODE, reseed_crng, set_clock
from guest.link import HostLink, find_port
from guest.protocol import (
    ControlMessage,
    Endpoint,
    JupyterMessage,
    ProtocolError,
    decode_message,
    encode_control,
    encode_jupyter,
)
from guest.system import init_system, log

RUN_DIR = "/run/vmkg"


def _kernel_uid(cmdline: str = "/proc/cmdline") -> int:
    """1000 (jovyan), or ``vmkg.kernel_uid=N`` from the kernel command line: a template can
    set it (``TemplateSpec.kernel_uid``; 0 only in hostile-guest tests, never by default)."""
    try:
        with open(cmdline) as f:
            m = re.search(r"(?:^|\s)vmkg\.kernel_uid=(\d+)(?:\s|$)", f.read())
    except OSError:
        return 1000
    return int(m.group(1)) if m else 1000


KERNEL_USER = _kernel_uid()
KERNEL_HOME = "/home/jovyan"
DELIM = b"<IDS|MSG>"
READ_SIZE = 1 << 20
#: requests served in order with the Jupyter messages around them
ORDERED_OPS = frozenset({"restore", "thaw"})
#: IPython's input history in memory, not in ~/.ipython's SQLite file: the file's writer
#: thread committed (journal, fsync) after every cell, on the VM's one emulated CPU, in the
#: middle of the cell's round trip; the VM's disk does not outlive the kernel anyway (a
#: durable kernel's memory, history included, does). ``%history`` and ``In`` still work.
KERNEL_ARGS = ("--HistoryManager.hist_file=:memory:",)
#: seconds the agent holds shell input for a %fork the host never answers, beyond its timeout
FORK_HOLD_GRACE = 120.0
#: after a template's warm-up cells (``ready``'s optional ``warmup``): drop their
#: variables, and freeze what survives so restores don't dirty pages by collecting it
WARMUP_CLEANUP = "get_ipython().reset(new_session=False)\nimport gc\ngc.collect()\ngc.freeze()\ndel gc"




class OpError(files.FileOpError):
    """A request the agent refuses; ``code`` tells the host which kind of refusal."""


#: frames of a kernel message from this size on (after its first five) are passed on as
#: views of ZMQ's memory instead of copied into bytes
ZERO_COPY_MIN = 1 << 16


def _load(part: bytes | memoryview) -> Any:
    """A frame of a kernel message as JSON (a view of a large one is copied first: the
    kernel's code chose its size)."""
    return json.loads(part if isinstance(part, bytes) else bytes(part))


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
    except OSError as exc:
        return f"({exc})"


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
        self._started: collections.deque[str] = collections.deque(maxlen=256)  # requests seen busy
        self._state_changed = asyncio.Event()
        self._pending: dict[str, float] = {}  # shell requests sent to the kernel, not yet answered
        self.frozen = False
        self._held: list[JupyterMessage] = []
        self._flush_scheduled = False
        #: a %fork is waiting for the kernel to go idle: shell input is held meanwhile
        self.hold_shell = False
        self._fork_ids = 0
        #: the %fork request forwarded to the host: (its number, the future of its answer)
        self._fork_wait: tuple[int, asyncio.Future[dict[str, Any] | None]] | None = None

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
            [sys.executable, "-m", "ipykernel_launcher", "-f", path, *KERNEL_ARGS],
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

    async def execute(self, code: str, timeout: float = 120.0,
                      expressions: dict[str, str] | None = None) -> dict[str, Any]:
        content = {"code": code, "silent": True, "store_history": False,
                   "allow_stdin": False, "stop_on_error": False, "user_expressions": expressions or {}}
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
            parent = _load(parts[i + 3])
        except (ValueError, IndexError):
            return False
        msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
        if msg_id not in self._own:
            return False
        if i == 0 and not self._own[msg_id].done():  # on shell: the reply itself
            self._own[msg_id].set_result(_load(parts[i + 5]))
        return True

    async def pump_kernel(self, channel: str) -> None:
        sock = self.sockets[channel]
        while True:
            frames = await sock.recv_multipart(copy=False)
            # a large content (or buffer) stays in ZMQ's memory until it is framed for the
            # link: copied once (encode_jupyter's join), not three times on an emulated CPU
            parts: list[Any] = [f.buffer if i >= 5 and len(f) >= ZERO_COPY_MIN else f.bytes
                                for i, f in enumerate(frames)]
            self._track(channel, parts)
            if self._own_reply(parts):
                continue
            if channel == "iopub" and len(parts) > 3 and b'"iopub_welcome"' in parts[2]:
                continue  # the welcome answers the agent's own subscription, not a client's
            if channel == "shell":
                await self._after_busy(parts)
            while not self.endpoint.can_send:
                self._window_open.clear()
                await self._window_open.wait()
            message = encode_jupyter(channel, parts)
            if len(message) > self.endpoint.peer_max_message:
                # the host would discard it anyway: spare the link, and let the host
                # tell the kernel's user why the output is missing
                self.send_control({"event": "dropped", "channel": channel, "size": len(message)})
                continue
            self.endpoint.send(message)
            self._flush_soon()

    def _flush_soon(self) -> None:
        """Write what the pumps queued once they have drained what ZMQ holds: a zmq.asyncio
        receive of a waiting message does not yield, so a burst of kernel messages leaves
        in one write (one exit to the VMM) instead of one per message."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        if self.link:
            self.link.flush()

    async def _after_busy(self, parts: list[bytes], wait: float = 2.0) -> None:
        """Hold a shell reply until its request's ``busy`` status went out on iopub.

        ipykernel publishes from a separate thread, so on a slow (emulated, loaded) guest
        the reply can overtake the ``busy`` it followed in the kernel. Clients such as
        jupyter_kernel_test expect ``busy`` first; waiting (bounded) restores that order.
        """
        try:
            msg_id = _load(parts[parts.index(DELIM) + 3]).get("msg_id")
        except (ValueError, IndexError, AttributeError):
            return
        deadline = time.monotonic() + wait
        while msg_id not in self._started:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._state_changed.clear()
            try:
                await asyncio.wait_for(self._state_changed.wait(), left)
            except asyncio.TimeoutError:
                return

    # -- kernel state, for forks ------------------------------------------------

    def _track(self, channel: str, parts: list[bytes]) -> None:
        """Follow the kernel's execution state and which shell requests await a reply."""
        if channel == "iopub":
            if parts and parts[0].endswith(b".status"):
                try:
                    i = parts.index(DELIM)
                    content = _load(parts[i + 5])
                    self.kernel_state = content.get("execution_state", self.kernel_state)
                    if self.kernel_state == "busy":
                        self._started.append(_load(parts[i + 3]).get("msg_id"))
                except (ValueError, IndexError):
                    return
                self._state_changed.set()
        elif channel == "shell" and self._pending:
            try:
                parent = _load(parts[parts.index(DELIM) + 3])
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
                if self.frozen or (self.hold_shell and msg.channel == "shell"):
                    # a fork is being taken (frozen), or a %fork waits for the kernel to be
                    # idle (hold_shell): nothing new may start now
                    self._held.append(msg)
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
        self.hold_shell = False
        self._held.clear()
        self._pending.clear()
        if self._fork_wait is not None:
            # a fork child: its copy of the %fork connection gets no answer (the magic's
            # thread in the branch then ends quietly); the parent gets the real one
            _, answer = self._fork_wait
            self._fork_wait = None
            if not answer.done():
                answer.set_result(None)

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
        cells = [c for c in body.get("warmup", []) if isinstance(c, str)]
        for i, cell in enumerate(cells, 1):
            try:
                await self.execute(cell, timeout=timeout)
            except (RuntimeError, asyncio.TimeoutError) as exc:
                why = str(exc) or f"no answer within {timeout:.0f} s"
                raise OpError("warmup", f"warm-up cell {i} of {len(cells)} failed: {why}") from None
        if cells:  # what the cells left in the namespace goes; what they warmed stays
            await self.execute(WARMUP_CLEANUP, timeout=timeout)
        await self.execute(magic.install_code(), timeout=timeout)  # %fork, in every template
        lean: dict[str, Any] = {}
        if body.get("lean_output", True):  # the template's fast_stdout
            compiled = os.path.join(os.path.dirname(os.path.abspath(outstream.__file__)), outstream.EXTENSION)
            reply = await self.execute(outstream.install_code(compiled), timeout=timeout,
                                       expressions={"lean": "get_ipython()._vmkg_lean_output"})
            lean = reply.get("user_expressions", {}).get("lean", {})
        return {"kernel_release": os.uname().release, "python": sys.version.split()[0],
                "kernel_pid": self.kernel.pid if self.kernel else None,
                # what got guest.outstream's lean write path (none: ipykernel's own)
                "lean_output": _literal(lean.get("data", {}).get("text/plain", lean.get("evalue", "[]")))}

    async def op_restore(self, body: dict[str, Any]) -> dict[str, Any]:
        reseed_crng(base64.b64decode(body["entropy"]))
        set_clock(int(body["time_ns"]))
        name = body.get("hostname")
        if name:
            socket.sethostname(name)
        req = {"env": {str(k): str(v) for k, v in (body.get("env") or {}).items()},
               "cwd": body.get("cwd") or "", "reseed": bool(body.get("reseed", True))}
        fork = body.get("fork")
        if isinstance(fork, dict):  # the first start of a fork child: it sets __fork__
            req["fork"] = {"index": int(fork.get("index", 0)), "parent_id": str(fork.get("parent_id", ""))}
        await self._ready.wait()
        assert self.kernel is not None
        if not req["env"] and not req["cwd"] and not req["reseed"] and "fork" not in req:
            # a wake (the same kernel, back from disk): nothing for the kernel process to
            # take on, and its first trip through the handler costs a cold TCG ~0.2 s
            return {"time_ns": time.time_ns()}
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
        self.hold_shell = False
        return {"released": await self._release_held()}

    async def _release_held(self) -> int:
        """Send the input held during a freeze or a %fork's wait, in order."""
        if self.frozen:
            return 0
        held, self._held = self._held, []
        for i, msg in enumerate(held):
            if self.frozen or (self.hold_shell and msg.channel == "shell"):
                self._held[:0] = held[i:]  # held again meanwhile: keep the rest, in order
                break
            self._note_request(msg)
            await self.sockets[msg.channel].send_multipart(msg.parts)
        return len(held)

    # -- %fork: requests from the kernel's own code ------------------------------------

    async def serve_fork_requests(self) -> None:
        """Listen for the ``%fork`` magic (``guest.magic``) on a socket only the kernel
        user can reach, and forward each request to the host as a ``fork_request`` event.

        The host decides (limits, budget, rate, owner) and answers with the
        ``fork_result`` op. Until then, or until the fork's snapshot is taken (``thaw``),
        shell input that arrives is held, so a cell sent after ``%fork`` ran is not in the
        branches (cells ipykernel had already queued are). One request at a time;
        whatever the kernel sends is bounded.
        """
        path = magic.FORK_SOCKET
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        server = await asyncio.start_unix_server(self._fork_client, path, limit=magic.MAX_LINE)
        os.chown(path, KERNEL_USER, KERNEL_USER)
        os.chmod(path, 0o600)
        async with server:
            await server.serve_forever()

    async def _fork_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._fork_answer(reader)
            if answer is not None:
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except Exception as exc:  # noqa: BLE001 - one bad client must not hurt the agent
            log("%%fork client: %s", exc)
        finally:
            writer.close()

    async def _fork_answer(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 10)
            req = json.loads(line)
            count, reseed, timeout = req["count"], req["reseed"], req["timeout"]
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= magic.MAX_COUNT:
                raise ValueError(f"count must be from 1 to {magic.MAX_COUNT}")
            if not isinstance(reseed, bool):
                raise ValueError("reseed must be true or false")
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                    or not 0 <= timeout <= magic.MAX_TIMEOUT:
                raise ValueError(f"timeout must be from 0 to {magic.MAX_TIMEOUT:g} s")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                ValueError, TypeError, KeyError) as exc:
            return {"ok": False, "error": f"bad %fork request: {str(exc)[:200] or type(exc).__name__}"}
        if self._fork_wait is not None:
            return {"ok": False, "error": "a %fork of this kernel is already under way; wait for its answer"}
        self._fork_ids += 1
        n = self._fork_ids
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._fork_wait = (n, fut)
        self.hold_shell = True
        asyncio.get_running_loop().call_later(timeout + FORK_HOLD_GRACE,
                                              lambda: self._spawn(self._stop_holding(n)))
        self.send_control({"event": "fork_request", "request": n, "count": count,
                           "reseed": reseed, "timeout": timeout})
        try:
            return await fut
        finally:
            if self._fork_wait is not None and self._fork_wait[0] == n:
                self._fork_wait = None
            await self._stop_holding(n)

    async def _stop_holding(self, n: int) -> None:
        """Release the shell input held for %fork request ``n`` (if it still is)."""
        if self.hold_shell and (self._fork_wait is None or self._fork_wait[0] == n):
            self.hold_shell = False
            await self._release_held()

    async def op_fork_result(self, body: dict[str, Any]) -> dict[str, Any]:
        """The host's answer to a ``fork_request``: branch ids, or why not."""
        wait = self._fork_wait
        if wait is None or wait[0] != body.get("request"):
            return {"delivered": False}
        self._fork_wait = None
        if body.get("ok"):
            answer = {"ok": True, "kernels": [str(k) for k in body.get("kernels") or []],
                      "parent_id": str(body.get("parent_id", ""))}
        else:
            answer = {"ok": False, "error": str(body.get("error") or "refused")[:2000]}
        if not wait[1].done():
            wait[1].set_result(answer)
        await self._stop_holding(wait[0])
        return {"delivered": True}

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
        self._spawn(self.serve_fork_requests())
        await asyncio.Event().wait()


def _literal(text: str) -> Any:
    """A Python literal the kernel displayed (its repr), as the value; else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


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
