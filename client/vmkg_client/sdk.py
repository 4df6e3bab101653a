"""The Python SDK for code-interpreter agents: run code in microVM kernels of a ``vmkg serve``.

    async with Gateway("http://127.0.0.1:8888", token) as gw:
        kernel = await gw.start_kernel(template="python3", env={"MODE": "test"})
        ex = await kernel.run_code("import math; math.pi", timeout=30)
        print(ex.text, ex.logs.stdout, ex.error)
        branches = await kernel.fork(3)

This is the async core; ``vmkg_client.sync`` wraps it for synchronous callers. It speaks
the gateway's REST API (``vmkg_client.http``, a small HTTP/1.1 client on asyncio) and the
``v1.kernel.websocket.jupyter.org`` websocket subprotocol (``websockets``), unsigned: the
gateway signs toward the kernel. Nothing of the server is imported: this package installs
on its own (``pip install vmkg-client``).

Before its first request a :class:`Gateway` asks ``GET /api`` which version of the vmkg
API the gateway speaks (``vmkg_api``) and refuses, with :class:`IncompatibleGateway`, one
it does not know (:data:`API_VERSIONS`). A gateway that announces none (older vmkg, a
plain Jupyter Kernel Gateway) is taken to speak version 1.

A :class:`Kernel` opens one websocket (``vmkg_client.websocket``), on first use. If it
breaks, it is reopened transparently and a running cell's output arrives complete; only
after ``reconnect_timeout`` seconds of failed attempts do waiting calls fail.

Errors are one tree, ``SDKError`` at its root (``vmkg_client.errors``, re-exported here):
``GatewayError(status, message)`` > ``KernelGone``, ``GatewayUnreachable``,
``IncompatibleGateway``, ``ExecutionTimeout``. An exception raised by the *code* is not one
of them: it is ``Execution.error``.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import os
import re
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import http
from ._version import __version__
from .errors import (
    ExecutionTimeout,
    GatewayError,
    GatewayUnreachable,
    IncompatibleGateway,
    KernelGone,
    SDKError,
    error_message,
)
from .websocket import KernelChannel, Message

__all__ = ["API_VERSIONS", "DEFAULT_TIMEOUT", "Execution", "ExecutionError", "ExecutionTimeout",
           "FileInfo", "Gateway", "GatewayError", "GatewayUnreachable", "IncompatibleGateway",
           "Kernel", "KernelGone", "Logs", "Result", "SDKError"]

log = logging.getLogger("vmkg.sdk")

#: the versions of the vmkg API (``GET /api``'s ``vmkg_api``) this client speaks
API_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_TIMEOUT = 300.0
#: redirects a REST call follows (within the gateway's origin)
MAX_REDIRECTS = 5
#: after a cell's idle status, how long its execute_reply may lag before we stop waiting
REPLY_AFTER_IDLE = 3.0
#: after a timeout, how long to wait for the interrupted cell to stop (interrupting twice)
INTERRUPT_WAIT = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

Callback = Callable[[Any], None | Awaitable[None]]


# -- what a cell produced ---------------------------------------------------------------------

#: Result attribute -> MIME type
FORMATS = {
    "text": "text/plain", "html": "text/html", "markdown": "text/markdown",
    "svg": "image/svg+xml", "png": "image/png", "jpeg": "image/jpeg", "pdf": "application/pdf",
    "latex": "text/latex", "json": "application/json", "javascript": "application/javascript",
}
_BASE64 = {"png", "jpeg", "pdf"}


@dataclass
class Result:
    """One rich output: an ``execute_result`` (``is_main_result``: the value of the cell's
    last expression) or a ``display_data`` (``display()``, a plot). Each attribute holds the
    format as Jupyter sends it: text for text/html/markdown/svg/latex/javascript, base64
    text for png/jpeg/pdf (:meth:`decoded` gives bytes), a parsed value for json. MIME
    types without an attribute are in ``extra``."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    is_main_result: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, data: dict[str, Any], metadata: dict[str, Any] | None = None,
                    is_main_result: bool = False) -> Result:
        by_mime = {mime: name for name, mime in FORMATS.items()}
        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for mime, value in data.items():
            if mime in by_mime:
                fields[by_mime[mime]] = "".join(value) if isinstance(value, list) else value
            else:
                extra[mime] = value
        return cls(**fields, extra=extra, is_main_result=is_main_result, metadata=metadata or {})

    def formats(self) -> list[str]:
        """The formats present: attribute names, then extra MIME types."""
        return [name for name in FORMATS if getattr(self, name) is not None] + list(self.extra)

    def decoded(self, fmt: str) -> bytes:
        """A format's bytes (base64 decoded for png/jpeg/pdf, UTF-8 for text, JSON for json)."""
        value = getattr(self, fmt) if fmt in FORMATS else self.extra.get(fmt)
        if value is None:
            raise KeyError(f"this result has no {fmt!r}; it has {', '.join(self.formats())}")
        if fmt in _BASE64:
            return base64.b64decode(value)
        if isinstance(value, str):
            return value.encode()
        return json.dumps(value).encode()

    def __str__(self) -> str:
        return self.text or ""

    # shown richly when an agent's own notebook displays a Result
    def _repr_html_(self) -> str | None:
        return self.html

    def _repr_markdown_(self) -> str | None:
        return self.markdown

    def _repr_svg_(self) -> str | None:
        return self.svg

    def _repr_png_(self) -> bytes | None:
        return self.decoded("png") if self.png else None

    def _repr_jpeg_(self) -> bytes | None:
        return self.decoded("jpeg") if self.jpeg else None

    def _repr_latex_(self) -> str | None:
        return self.latex


@dataclass
class Logs:
    """What the cell printed, in chunks as they arrived."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    """An exception the code raised: its class name, message and traceback (colour codes
    removed; ``raw_traceback`` has the kernel's lines as sent)."""

    name: str
    value: str
    traceback: str
    raw_traceback: list[str] = field(default_factory=list)

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> ExecutionError:
        raw = [str(line) for line in content.get("traceback") or []]
        return cls(str(content.get("ename", "")), str(content.get("evalue", "")),
                   _ANSI.sub("", "\n".join(raw)), raw)


@dataclass
class Execution:
    """The outcome of :meth:`Kernel.run_code`."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None

    @property
    def main_result(self) -> Result | None:
        return next((r for r in self.results if r.is_main_result), None)

    @property
    def text(self) -> str | None:
        """The text of the main result (the value of the cell's last expression), if any."""
        main = self.main_result
        return main.text if main is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileInfo:
    """An entry of a kernel's working directory."""

    name: str
    type: str  # "file", "directory" or "other"
    size: int
    mtime: float | None = None
    path: str = ""


# -- the gateway ------------------------------------------------------------------------------


class Gateway:
    """A ``vmkg serve`` (or any Jupyter Kernel Gateway with the vmkg extensions).

    ``url`` and ``token`` default to ``$VMKG_URL`` and ``$VMKG_TOKEN``. Kernels started or
    forked through this object are shut down when it is closed (``async with`` or
    :meth:`close`), except those :meth:`Kernel.detach`-ed; kernels reached with
    :meth:`connect_kernel` are only disconnected.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 request_timeout: float = 120.0, reconnect_timeout: float = 30.0,
                 max_download_size: int = 1 << 30, validate_cert: bool = True) -> None:
        url = url if url is not None else os.environ.get("VMKG_URL", "http://127.0.0.1:8888")
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SDKError(f"not a gateway URL: {url!r} (expected http://HOST:PORT or https://...)")
        self.ws_url = ("wss" if parts.scheme == "https" else "ws") + self.url[len(parts.scheme):]
        self.token = token if token is not None else os.environ.get("VMKG_TOKEN", "")
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self.max_download_size = max_download_size
        self.validate_cert = validate_cert
        self._ssl = http.ssl_context(validate_cert) if parts.scheme == "https" else None
        #: the gateway's ``GET /api`` answer, once checked (see :meth:`check_api`)
        self.api_info: dict[str, Any] | None = None
        self._kernels: set[Kernel] = set()  # every Kernel object made through this one
        self._kernelspecs: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<Gateway {self.url}>"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Shut down the kernels this object started or forked (unless detached), close
        every websocket. Errors on the way are logged, not raised."""
        kernels = list(self._kernels)
        await asyncio.gather(*(k._close_owned() for k in kernels), return_exceptions=True)
        self._kernels.clear()

    # -- REST ------------------------------------------------------------------------------

    async def request(self, method: str, path: str, *, json_body: Any = None, body: bytes | None = None,
                      timeout: float | None = None, kernel_id: str | None = None,
                      expect_continue: bool = False) -> tuple[int, bytes]:
        """One REST call; returns (status, body) of a 2xx answer, raises :class:`GatewayError`
        (:class:`KernelGone` for a 404 naming ``kernel_id``) or :class:`GatewayUnreachable`.
        The first call checks the gateway's API version (:meth:`check_api`)."""
        if self.api_info is None:
            await self.check_api()
        return await self._request(method, path, json_body=json_body, body=body, timeout=timeout,
                                   kernel_id=kernel_id, expect_continue=expect_continue)

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       body: bytes | None = None, timeout: float | None = None,
                       kernel_id: str | None = None, expect_continue: bool = False) -> tuple[int, bytes]:
        headers = dict(self.headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        url = self.url + path
        limit = timeout or self.request_timeout
        try:
            resp = await asyncio.wait_for(self._fetch(url, method, headers, body, expect_continue), limit)
        except asyncio.TimeoutError as exc:  # before OSError: TimeoutError is one since 3.11
            raise GatewayUnreachable(f"{method} {url}: no answer within {limit:g} s") from exc
        except http.BodyTooLarge as exc:
            raise SDKError(f"{method} {url}: {exc} (the Gateway's max_download_size)") from exc
        except (OSError, http.ProtocolError) as exc:
            raise GatewayUnreachable(f"cannot reach the gateway at {self.url}: {exc}") from exc
        if resp.status >= 400:
            message, reason = error_message(resp.body, resp.reason)
            if resp.status == 404 and kernel_id and kernel_id in message:
                raise KernelGone(kernel_id, message)
            raise GatewayError(resp.status, message, reason)
        return resp.status, resp.body

    async def _fetch(self, url: str, method: str, headers: dict[str, str], body: bytes | None,
                     expect_continue: bool) -> http.Response:
        """One request, following up to ``MAX_REDIRECTS`` redirects within the gateway (the
        token never goes to another origin)."""
        origin = urllib.parse.urlsplit(self.url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            resp = await http.fetch(url, method, headers=headers, body=body, connect_timeout=30,
                                    max_body_size=self.max_download_size,
                                    expect_continue=expect_continue, ssl_ctx=self._ssl,
                                    user_agent=f"vmkg-client/{__version__}")
            location = resp.headers.get("location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                return resp
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target)[:2] != origin:
                raise GatewayError(resp.status, f"{method} {url} redirects off the gateway, to "
                                                f"{target}; not followed", resp.reason)
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k != "Content-Type"}
            url = target
        raise GatewayError(resp.status, f"{method} {url}: more than {MAX_REDIRECTS} redirects",
                           resp.reason)

    async def check_api(self) -> dict[str, Any]:
        """``GET /api``: the gateway's versions (``vmkg``, ``vmkg_api``, ``version``), kept in
        :attr:`api_info`. Raises :class:`IncompatibleGateway` when the gateway announces a
        vmkg API version this client does not speak (:data:`API_VERSIONS`); none announced is
        taken as version 1. :meth:`request` calls it once, before its first request."""
        _, body = await self._request("GET", "/api")
        try:
            info = json.loads(body)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise SDKError(f"{self.url}/api did not answer a JSON object: is {self.url} a vmkg "
                           f"gateway? (it answered {body[:100]!r})")
        api = info.get("vmkg_api", 1)
        if isinstance(api, bool) or api not in API_VERSIONS:
            known = ", ".join(str(v) for v in API_VERSIONS)
            raise IncompatibleGateway(
                f"the gateway at {self.url} speaks vmkg API version {api!r} (vmkg "
                f"{info.get('vmkg', 'unknown')}), which this vmkg-client {__version__} does not "
                f"know (it speaks version {known}); install the vmkg-client release that matches "
                f"the gateway", api, API_VERSIONS)
        self.api_info = info
        return info

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        _, body = await self.request(method, path, **kwargs)
        return json.loads(body) if body else None

    # -- kernels ---------------------------------------------------------------------------

    async def kernelspecs(self) -> dict[str, Any]:
        """``GET /api/kernelspecs`` (cached)."""
        if self._kernelspecs is None:
            self._kernelspecs = await self.request_json("GET", "/api/kernelspecs")
        return self._kernelspecs

    async def templates(self) -> dict[str, str]:
        """Template name -> kernelspec name, for the templates this gateway serves."""
        out = {}
        for name, spec in (await self.kernelspecs()).get("kernelspecs", {}).items():
            template = ((spec.get("spec") or {}).get("metadata") or {}).get("vmkg", {}).get("template")
            out[template or name] = name
        return out

    async def start_kernel(self, template: str | None = None, *, env: dict[str, Any] | None = None,
                           kernel_name: str | None = None, egress: list[str] | None = None) -> Kernel:
        """Start a kernel from ``template`` (e.g. ``"python3"``; the gateway's default if
        neither it nor ``kernel_name`` is given), with ``env`` in its ``os.environ``.

        ``env`` goes with the start request, where the gateway applies ``KERNEL_*`` names and
        its allow-list before the kernel runs anything; the SDK sets the other names in the
        kernel right after (so they also reach subprocesses the code starts). They are set
        again after :meth:`Kernel.restart`.

        ``egress``: network rules for a template with a NIC (e.g. ``"python3-net"``):
        ``["pypi", "10.0.0.0/8:443", "*.example.org"]``; the gateway answers 400 for a
        template without one or a malformed rule, 403 for a rule its operator does not allow.
        """
        name = kernel_name
        if name is None and template is not None:
            name = (await self.templates()).get(template, template)
        env = {str(k): str(v) for k, v in (env or {}).items()}
        body: dict[str, Any] = {"env": env}
        if egress is not None:
            body["network"] = {"egress": list(egress)}
        if name:
            body["name"] = name
        model = await self.request_json("POST", "/api/kernels", json_body=body)
        kernel = Kernel(self, model, owned=True)
        kernel._client_env = {k: v for k, v in env.items() if not k.startswith("KERNEL_")}
        try:
            await kernel._apply_env()
        except BaseException:
            await kernel._close_owned()
            raise
        return kernel

    async def connect_kernel(self, kernel_id: str) -> Kernel:
        """A running kernel of the gateway, by id (not shut down when this object closes)."""
        model = await self.request_json("GET", f"/api/kernels/{_q(kernel_id)}", kernel_id=kernel_id)
        return Kernel(self, model, owned=False)

    async def list_kernels(self) -> list[dict[str, Any]]:
        """``GET /api/kernels``: every kernel's model."""
        models: list[dict[str, Any]] = await self.request_json("GET", "/api/kernels")
        return models


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _q_path(path: str) -> str:
    return urllib.parse.quote(path, safe="/")


async def _call(callback: Callback | None, arg: Any) -> None:
    if callback is not None:
        result = callback(arg)
        if inspect.isawaitable(result):
            await result


class _Deadline(Exception):
    pass


@dataclass
class _Progress:
    reply: dict[str, Any] | None = None
    idle: bool = False
    idle_at: float = 0.0


# -- a kernel ---------------------------------------------------------------------------------


class Kernel:
    """One kernel of a gateway. Obtained from :meth:`Gateway.start_kernel`,
    :meth:`Gateway.connect_kernel` or :meth:`fork`; ``async with kernel:`` shuts it down
    on exit (unless detached)."""

    def __init__(self, gateway: Gateway, model: dict[str, Any], *, owned: bool) -> None:
        self.gateway = gateway
        self.model = model
        self.id: str = model["id"]
        self.owned = owned
        self._client_env: dict[str, str] = {}
        self._conn: KernelChannel | None = None
        self._conn_lock = asyncio.Lock()
        self._shut_down = False
        gateway._kernels.add(self)

    def __repr__(self) -> str:
        return f"<Kernel {self.id} ({self.model.get('name')}) on {self.gateway.url}>"

    @property
    def name(self) -> str:
        return str(self.model.get("name", ""))

    @property
    def parent_id(self) -> str | None:
        """The kernel this one was forked from, if any."""
        return self.model.get("parent_id")

    async def __aenter__(self) -> Kernel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.owned:
            await self.shutdown()
        else:
            await self.close()

    def _path(self, suffix: str = "") -> str:
        return f"/api/kernels/{_q(self.id)}{suffix}"

    # -- code ------------------------------------------------------------------------------

    async def run_code(self, code: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                       on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                       on_result: Callback | None = None, on_error: Callback | None = None) -> Execution:
        """Run ``code`` as one cell and return what it produced.

        The callbacks (plain functions or coroutines) see each piece as it arrives: stdout
        and stderr text, every :class:`Result`, the :class:`ExecutionError`. An exception
        the code raises is ``Execution.error``, not raised here. Past ``timeout`` seconds
        (None: no limit) the cell is interrupted and :class:`ExecutionTimeout` raised; the
        kernel keeps its state. Cancelling this call does not stop the cell (use
        :meth:`interrupt`).
        """
        conn = await self._connection()
        msg_id = uuid.uuid4().hex
        queue = conn.register(msg_id)
        execution = Execution()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}
        loop = asyncio.get_running_loop()
        progress = _Progress()
        try:
            await conn.send("execute_request", {
                "code": code, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": True}, msg_id=msg_id)
            deadline = None if timeout is None else loop.time() + timeout
            try:
                await self._collect(queue, execution, progress, deadline, callbacks)
            except _Deadline:
                stopped = await self._stop_runaway(queue, execution, progress, callbacks)
                if stopped:
                    why = ("was interrupted; the kernel is usable and keeps its state")
                else:
                    why = ("did not stop when interrupted; the kernel may still be busy (restart() "
                           "recovers it, losing its state)")
                raise ExecutionTimeout(f"kernel {self.id}: the cell ran past its timeout of "
                                       f"{timeout:g} s and {why}", execution, float(timeout or 0),
                                       stopped) from None
        finally:
            conn.unregister(msg_id)
        return execution

    async def _collect(self, queue: asyncio.Queue[Any], execution: Execution, progress: _Progress,
                       deadline: float | None, callbacks: dict[str, Callback | None]) -> None:
        loop = asyncio.get_running_loop()
        while not (progress.reply is not None and progress.idle):
            now = loop.time()
            wait = None if deadline is None else deadline - now
            if wait is not None and wait <= 0:
                raise _Deadline()
            lagging = progress.idle and progress.reply is None
            if lagging:
                grace = progress.idle_at + REPLY_AFTER_IDLE - now
                if grace <= 0:
                    return  # the reply went astray (a websocket replaced mid-cell): done anyway
                wait = grace if wait is None else min(wait, grace)
            try:
                item = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                continue
            if isinstance(item, BaseException):
                raise item
            await self._apply(item, execution, progress, callbacks)

    async def _apply(self, msg: Message, execution: Execution, progress: _Progress,
                     callbacks: dict[str, Callback | None]) -> None:
        c = msg.content
        kind = msg.msg_type
        if msg.channel == "shell":
            if kind == "execute_reply":
                progress.reply = c
                if isinstance(c.get("execution_count"), int):
                    execution.execution_count = c["execution_count"]
                if c.get("status") == "error" and execution.error is None:
                    execution.error = ExecutionError.from_content(c)
                    await _call(callbacks["error"], execution.error)
                elif c.get("status") == "aborted" and execution.error is None:
                    execution.error = ExecutionError("Aborted", "the cell was not run: an earlier "
                                                     "cell raised while this one was queued", "")
            return
        if msg.channel != "iopub":
            return
        if kind == "stream":
            name = "stderr" if c.get("name") == "stderr" else "stdout"
            text = str(c.get("text", ""))
            getattr(execution.logs, name).append(text)
            await _call(callbacks[name], text)
        elif kind in ("execute_result", "display_data"):
            result = Result.from_bundle(c.get("data") or {}, c.get("metadata") or {},
                                        is_main_result=kind == "execute_result")
            if kind == "execute_result" and isinstance(c.get("execution_count"), int):
                execution.execution_count = c["execution_count"]
            execution.results.append(result)
            await _call(callbacks["result"], result)
        elif kind == "error":
            execution.error = ExecutionError.from_content(c)
            await _call(callbacks["error"], execution.error)
        elif kind == "execute_input" and isinstance(c.get("execution_count"), int):
            execution.execution_count = c["execution_count"]
        elif kind == "status" and c.get("execution_state") == "idle":
            progress.idle = True
            progress.idle_at = asyncio.get_running_loop().time()

    async def _stop_runaway(self, queue: asyncio.Queue[Any], execution: Execution, progress: _Progress,
                            callbacks: dict[str, Callback | None]) -> bool:
        """Interrupt a cell past its timeout (twice if need be); True once it stopped."""
        loop = asyncio.get_running_loop()
        for _ in range(2):
            try:
                await self.interrupt()
            except KernelGone:
                raise
            except SDKError as exc:
                log.warning("kernel %s: interrupt after a timeout failed: %s", self.id, exc)
            try:
                await self._collect(queue, execution, progress, loop.time() + INTERRUPT_WAIT / 2,
                                    callbacks)
                return True
            except _Deadline:
                continue
        return False

    async def _apply_env(self) -> None:
        if not self._client_env:
            return
        code = f"import os as _o, json as _j; _o.environ.update(_j.loads({json.dumps(self._client_env)!r})); del _o, _j"
        conn = await self._connection()
        msg_id = uuid.uuid4().hex
        queue = conn.register(msg_id)
        try:
            await conn.send("execute_request", {"code": code, "silent": True, "store_history": False,
                                                "user_expressions": {}, "allow_stdin": False,
                                                "stop_on_error": False}, msg_id=msg_id)
            execution = Execution()
            progress = _Progress()
            loop = asyncio.get_running_loop()
            none: dict[str, Callback | None] = {"stdout": None, "stderr": None, "result": None, "error": None}
            try:
                await self._collect(queue, execution, progress, loop.time() + 60, none)
            except _Deadline:
                raise SDKError(f"kernel {self.id}: setting its environment timed out") from None
            if execution.error is not None:
                raise SDKError(f"kernel {self.id}: setting its environment failed: "
                               f"{execution.error.name}: {execution.error.value}")
        finally:
            conn.unregister(msg_id)

    async def _connection(self) -> KernelChannel:
        if self._shut_down:
            raise KernelGone(self.id, f"kernel {self.id} was shut down")
        async with self._conn_lock:
            if self._conn is None or self._conn.failure is not None:
                if self._conn is not None:
                    await self._conn.close()
                conn = KernelChannel(self)
                await conn.start()
                self._conn = conn
            return self._conn

    # -- lifecycle -------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """The kernel's current model (``GET /api/kernels/{id}``): execution_state, connections..."""
        self.model = await self.gateway.request_json("GET", self._path(), kernel_id=self.id)
        return self.model

    async def interrupt(self) -> None:
        """Interrupt the running cell (it ends with KeyboardInterrupt; state is kept)."""
        await self.gateway.request("POST", self._path("/interrupt"), kernel_id=self.id)

    async def restart(self) -> None:
        """Restart the kernel: a fresh VM behind the same id, all state gone; returns once it
        answers. A cell running meanwhile fails with :class:`SDKError`."""
        self.model = await self.gateway.request_json("POST", self._path("/restart"), kernel_id=self.id)
        await self._apply_env()

    async def fork(self, n: int = 1, *, reseed: bool = True, timeout: float = 30.0,
                   checkpoint: str | None = None) -> list[Kernel]:
        """``n`` new kernels continuing from this one's exact state (memory and files), each
        isolated from the others. Waits up to ``timeout`` s for a running cell to finish
        (else :class:`GatewayError` 409). ``reseed``: give each branch fresh random
        generators. ``checkpoint``: start them from that named checkpoint instead. The
        branches belong to this kernel's :class:`Gateway`."""
        body: dict[str, Any] = {"count": n, "reseed": reseed, "timeout": timeout}
        if checkpoint is not None:
            body["checkpoint"] = checkpoint
        data = await self.gateway.request_json(
            "POST", self._path("/fork"), json_body=body,
            timeout=self.gateway.request_timeout + timeout, kernel_id=self.id)
        return [Kernel(self.gateway, model, owned=True) for model in data["kernels"]]

    async def network(self) -> dict[str, Any]:
        """The kernel's egress rules and denied counts (``GET .../network``)."""
        data: dict[str, Any] = await self.gateway.request_json("GET", self._path("/network"), kernel_id=self.id)
        return data

    async def set_egress(self, egress: list[str]) -> dict[str, Any]:
        """Replace the kernel's egress rules at once (409 for a kernel without a NIC)."""
        data: dict[str, Any] = await self.gateway.request_json(
            "PATCH", self._path("/network"), json_body={"egress": list(egress)}, kernel_id=self.id)
        return data

    # -- durable kernels --------------------------------------------------------------------

    async def hibernate(self, *, timeout: float = 30.0) -> None:
        """Save the kernel to the gateway's disk and stop its VM; the next cell (or any
        call that needs it) wakes it with its state. :class:`GatewayError` 409 if it stays
        busy ``timeout`` s, 507 when the gateway's disk budget is spent."""
        self.model = await self.gateway.request_json(
            "POST", self._path("/hibernate"), json_body={"timeout": timeout},
            timeout=self.gateway.request_timeout + timeout, kernel_id=self.id)

    async def wake(self) -> None:
        """Wake a hibernated kernel now (otherwise its next cell does)."""
        self.model = await self.gateway.request_json("POST", self._path("/wake"), kernel_id=self.id)

    @property
    def hibernated(self) -> bool:
        """Whether the last model fetched (:meth:`info`) said the kernel is hibernated."""
        return bool((self.model.get("vmkg") or {}).get("hibernated"))

    async def checkpoint(self, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """Save the kernel's whole state as checkpoint ``name`` (replacing one of that name):
        ``{"name", "created", "size"}``."""
        data: dict[str, Any] = await self.gateway.request_json(
            "POST", self._path("/checkpoints"), json_body={"name": name, "timeout": timeout},
            timeout=self.gateway.request_timeout + timeout, kernel_id=self.id)
        return data

    async def checkpoints(self) -> list[dict[str, Any]]:
        """The kernel's checkpoints, oldest first: name, created, size (bytes on disk)."""
        data = await self.gateway.request_json("GET", self._path("/checkpoints"), kernel_id=self.id)
        return list(data["checkpoints"])

    async def restore(self, name: str) -> None:
        """Put the kernel back to checkpoint ``name`` in place (same id; like a restart, but
        with that state)."""
        self.model = await self.gateway.request_json(
            "POST", self._path(f"/checkpoints/{urllib.parse.quote(name, safe='')}/restore"), kernel_id=self.id)

    async def delete_checkpoint(self, name: str) -> None:
        """Delete checkpoint ``name`` (kernels forked from it keep working)."""
        await self.gateway.request("DELETE", self._path(f"/checkpoints/{urllib.parse.quote(name, safe='')}"),
                                   kernel_id=self.id)

    def detach(self) -> None:
        """Keep the kernel running after this program: neither ``async with`` nor
        :meth:`Gateway.close` will shut it down."""
        self.owned = False

    async def close(self) -> None:
        """Close this object's websocket; the kernel keeps running."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def shutdown(self) -> None:
        """Shut the kernel down (its VM is gone). Idempotent."""
        await self.close()
        if not self._shut_down:
            self._shut_down = True
            try:
                await self.gateway.request("DELETE", self._path(), kernel_id=self.id)
            except KernelGone:
                pass
        self.gateway._kernels.discard(self)

    async def _close_owned(self) -> None:
        try:
            if self.owned:
                await self.shutdown()
            else:
                await self.close()
        except SDKError as exc:
            log.warning("kernel %s: could not shut down: %s", self.id, exc)

    # -- files -----------------------------------------------------------------------------

    async def upload(self, path: str, data: bytes | bytearray | memoryview | str | Any) -> FileInfo:
        """Write ``data`` (bytes, text, or a binary file object) to ``path``, relative to the
        kernel's working directory; parent directories are created."""
        if isinstance(data, str):
            payload = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
        elif hasattr(data, "read"):
            payload = data.read()
            payload = payload.encode() if isinstance(payload, str) else bytes(payload)
        else:
            raise TypeError(f"upload() takes bytes, str or a file object, not {type(data).__name__}")
        # a large body waits for the gateway's go-ahead, so a refusal (413) arrives cleanly
        answer = await self.gateway.request_json("PUT", self._path(f"/files/{_q_path(path)}"),
                                                 body=payload, kernel_id=self.id,
                                                 expect_continue=len(payload) > (1 << 20))
        return FileInfo(name=path.rstrip("/").rsplit("/", 1)[-1], type="file",
                        size=int(answer.get("size", len(payload))), path=answer.get("path", path))

    async def download(self, path: str) -> bytes:
        """The contents of the file at ``path`` (relative to the working directory)."""
        _, body = await self.gateway.request("GET", self._path(f"/files/{_q_path(path)}"), kernel_id=self.id)
        return body

    async def list_files(self, path: str = "") -> list[FileInfo]:
        """The entries of a directory (default: the working directory)."""
        url = self._path(f"/files/{_q_path(path)}" + ("" if not path or path.endswith("/") else "/"))
        data = await self.gateway.request_json("GET", url, kernel_id=self.id)
        prefix = path.rstrip("/") + "/" if path.rstrip("/") else ""
        return [FileInfo(name=e["name"], type=e.get("type", "file"), size=int(e.get("size", 0)),
                         mtime=e.get("mtime"), path=prefix + e["name"])
                for e in data.get("entries", [])]

    async def remove_file(self, path: str) -> None:
        """Delete a file (or an empty directory)."""
        await self.gateway.request("DELETE", self._path(f"/files/{_q_path(path)}"), kernel_id=self.id)
