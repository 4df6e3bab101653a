"""The ``%fork`` IPython magic: fork this kernel from one of its own cells.

Runs in the *kernel* process (user ``jovyan``), not in the agent: at bake time the agent
executes this module's source in the kernel (``install_code``), which registers the
magic, so every kernel restored from a template has it. Only the standard library and
IPython; nothing here trusts or needs the network.

``%fork [N] [--no-reseed] [--timeout SECONDS]`` asks for N branches (default 1). The
request goes over a Unix socket to the agent (``FORK_SOCKET``, in the kernel's private
run directory), which forwards it to the host over the host-guest channel (a
``fork_request`` event, see ``guest.protocol``). The host decides everything (limits,
budget, rate, owner) and answers with the branch ids or a refusal.

The cell running ``%fork`` is busy, so the host snapshots the kernel only once it is idle:
never mid-cell. Shell requests that reach the agent after ``%fork`` ran are held until the
snapshot, so the branches start from the state right after that cell; cells that were
already queued in ipykernel before it ran (Run All) run first and are in the branches
too. ``--timeout`` bounds how long the host waits for that idle moment. So the
magic returns at once with a display (with a ``display_id``) that a background thread
updates in place once the answer comes: the branch ids and how to open one.

In each branch ``__fork__`` is ``{"index": i, "parent_id": "<parent kernel id>"}`` (set by
the restore, see ``guest.identity``). A branch's copy of the waiting thread sees its
connection closed by the branch's agent and ends without output.
"""

from __future__ import annotations

import html
import json
import shlex
import socket
from typing import Any

#: where the agent listens for the magic's requests (inside the kernel's 0700 run directory)
FORK_SOCKET = "/run/vmkg/kernel/fork.sock"
#: the most branches one %fork may ask for (the host applies its own, usually lower, caps)
MAX_COUNT = 64
#: the longest wait for the parent to become idle that may be asked for, in seconds
MAX_TIMEOUT = 3600.0
#: the largest request or answer line, in bytes (both ends enforce it)
MAX_LINE = 64 << 10

USAGE = "usage: %fork [N] [--no-reseed] [--timeout SECONDS]   (N branches, 1 to 64; default 1)"


class ForkUsageError(ValueError):
    """A %fork line that cannot be understood."""


def parse_line(line: str) -> dict[str, Any]:
    """``%fork`` arguments -> the request ``{"count", "reseed", "timeout"}``."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ForkUsageError(f"{exc}; {USAGE}") from None
    count, reseed, timeout = None, True, 30.0
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("--no-reseed", "--reseed"):
            reseed = w == "--reseed"
        elif w in ("--timeout", "-t") or w.startswith("--timeout="):
            if "=" in w:
                value = w.split("=", 1)[1]
            else:
                i += 1
                if i == len(words):
                    raise ForkUsageError(f"{w} needs a number of seconds; {USAGE}")
                value = words[i]
            try:
                timeout = float(value)
            except ValueError:
                raise ForkUsageError(f"--timeout {value!r} is not a number of seconds; {USAGE}") from None
            if not 0 <= timeout <= MAX_TIMEOUT:
                raise ForkUsageError(f"--timeout must be from 0 to {MAX_TIMEOUT:g} seconds; {USAGE}")
        elif w in ("-h", "--help"):
            raise ForkUsageError(USAGE)
        elif count is None and w.isdigit():
            count = int(w)
            if not 1 <= count <= MAX_COUNT:
                raise ForkUsageError(f"N must be from 1 to {MAX_COUNT}; {USAGE}")
        else:
            raise ForkUsageError(f"unexpected argument {w!r}; {USAGE}")
        i += 1
    return {"count": count or 1, "reseed": reseed, "timeout": timeout}


class ForkStatus:
    """What the %fork display shows: pending, done (branch ids) or refused."""

    def __init__(self, request: dict[str, Any], *, kernels: list[str] | None = None,
                 parent_id: str = "", error: str = "") -> None:
        self.request = request
        self.kernels = kernels
        self.parent_id = parent_id
        self.error = error

    def _lines(self) -> list[str]:
        n = self.request["count"]
        if self.error:
            return [f"%fork {n}: refused: {self.error}"]
        if self.kernels is None:
            return [f"%fork {n}: forking once this cell finishes (the parent must be idle "
                    f"within {self.request['timeout']:g} s) ..."]
        lines = [f"%fork {n}: {len(self.kernels)} branch(es) of kernel {self.parent_id} are running:"]
        lines += [f"  branch {i}: {kid}" for i, kid in enumerate(self.kernels)]
        lines.append("Attach a notebook to one with Kernel > Change Kernel... (JupyterLab lists "
                     "the branches when it runs with --ServerApp.kernel_manager_class="
                     "vmkg_client.jupyter.GatewayKernelManager; otherwise open a session on the "
                     "branch's id, POST /api/sessions with \"kernel\": {\"id\": ...}). "
                     "In a branch, __fork__ says which one it is.")
        return lines

    def __repr__(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        lines = self._lines()
        head = html.escape(lines[0])
        if self.error:
            return f'<div class="vmkg-fork vmkg-fork-refused"><b>{head}</b></div>'
        if self.kernels is None:
            return f'<div class="vmkg-fork vmkg-fork-pending">{head}</div>'
        rows = "".join(f"<tr><td>branch {i}</td><td><code>{html.escape(k)}</code></td></tr>"
                       for i, k in enumerate(self.kernels))
        return (f'<div class="vmkg-fork vmkg-fork-done"><b>{head}</b><table>{rows}</table>'
                f"<p>{html.escape(lines[-1])}</p></div>")


def read_line(sock: socket.socket, limit: int = MAX_LINE) -> bytes:
    """One newline-terminated line (at most ``limit`` bytes); b"" if the peer closed first."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"answer longer than {limit} bytes")
    return bytes(buf.split(b"\n", 1)[0])


def request_fork(request: dict[str, Any], path: str = FORK_SOCKET) -> socket.socket:
    """Send the request to the agent; returns the connection the answer will come on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def answer_status(request: dict[str, Any], line: bytes) -> ForkStatus:
    """The display for the agent's answer line."""
    try:
        answer = json.loads(line)
    except ValueError:
        return ForkStatus(request, error="the agent sent an unreadable answer")
    if not isinstance(answer, dict):
        return ForkStatus(request, error="the agent sent an unreadable answer")
    if answer.get("ok"):
        kernels = [str(k) for k in answer.get("kernels") or []]
        return ForkStatus(request, kernels=kernels, parent_id=str(answer.get("parent_id", "")))
    return ForkStatus(request, error=str(answer.get("error") or "the host refused the fork"))


def register(ip: Any, path: str = FORK_SOCKET) -> None:
    """Register ``%fork`` in the IPython shell ``ip``."""
    import contextvars
    import threading

    from IPython.core.error import UsageError
    from IPython.display import display

    def fork(line: str) -> None:
        try:
            request = parse_line(line)
        except ForkUsageError as exc:
            raise UsageError(str(exc)) from None
        try:
            sock = request_fork(request, path)
        except OSError as exc:
            raise UsageError(f"%fork: cannot reach the vmkg agent ({exc}); this kernel "
                             "does not run under vmkg, or its template predates %fork") from None
        handle = display(ForkStatus(request), display_id=True)

        def wait() -> None:
            try:
                line = read_line(sock)
            except (OSError, ValueError) as exc:
                line = json.dumps({"ok": False, "error": f"lost the agent's answer: {exc}"}).encode()
            finally:
                sock.close()
            if line:  # b"": a branch's copy of this thread (its agent closed the connection)
                handle.update(answer_status(request, line))

        # the copied context keeps the cell's parent header for the update
        ctx = contextvars.copy_context()
        threading.Thread(target=ctx.run, args=(wait,), name="vmkg-fork-wait", daemon=True).start()

    fork.__doc__ = __doc__
    ip.register_magic_function(fork, "line", "fork")


def kernel_code(module: str, name: str, label: str, then: str) -> str:
    """Code the agent executes in the kernel: the source of the guest module ``module``,
    run in a namespace of its own (``__name__`` ``name``, tracebacks naming ``label``),
    then the statement ``then`` (which reaches that namespace as ``_vmkg_ns``)."""
    import inspect
    import sys

    source = inspect.getsource(sys.modules[module])
    return (f"_vmkg_ns = {{'__name__': {name!r}}}\n"
            f"exec(compile({source!r}, {label!r}, 'exec'), _vmkg_ns)\n"
            f"{then}\n"
            "del _vmkg_ns\n")


def install_code(path: str = FORK_SOCKET) -> str:
    """Code the agent executes in the kernel at bake time to register ``%fork``."""
    return kernel_code(__name__, "vmkg_fork_magic", "<vmkg %fork magic>",
                       f"_vmkg_ns['register'](get_ipython(), {path!r})")
