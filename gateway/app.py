"""``vmkg``: the command line entry point (a traitlets Application).

Subcommands: ``serve`` (the gateway), ``image``, ``template``, ``kernelspec``.

``vmkg serve`` is a Jupyter Kernel Gateway (websocket mode) built from jupyter_server's
handlers and kernel manager, whose kernels are microVMs restored from warm templates.
Settings come, in rising priority, from ``VMKG_*`` environment variables, a config file
(``--config=FILE``, Python or JSON, or ``$VMKG_CONFIG``) and the command line; ``vmkg
serve --help-all`` lists them all. Each is a trait; those with a variable are made by
``gateway.envvars.env_trait``, which also explains the precedence.

Crash safety: every VM directory records its owner process; when the gateway starts it
first reaps what a crashed or SIGKILLed predecessor left (QEMU processes, VM directories,
connection files), so a restart after a crash finds no orphans. SIGTERM or SIGINT stops it
cleanly: websockets are closed, then every kernel (pooled ones too) is shut down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from typing import Any, cast

from jupyter_events import EventLogger
from jupyter_server.auth.authorizer import AllowAllAuthorizer
from jupyter_server.log import log_request
from tornado import httpserver, httputil, netutil, web
from tornado.http1connection import HTTP1Connection
from traitlets import Bool, Float, Integer, List, TraitError, Type, Unicode, default
from traitlets.config import Application

from kernelmanager import (
    GuestLimits,
    MicroVMProvisioner,
    bake_template,
    catalog,
    configure_store,
    kernelspec_name,
    set_fork_request_handler,
    start_runtime,
    stop_runtime,
)

from . import cli, internals, logs, metrics
from .auth import TokenIdentityProvider
from .envvars import env_trait
from .forks import GuestForks
from .kernels import VMMappingKernelManager
from .kernelspecs import TemplateKernelSpecManager
from .routes import routes
from .users import UserApp, UsersFileError
from .websocket import VMKGWebsocketConnection

_FILES_PATH = re.compile(r"/api/kernels/[^/]+/files/")


class _BodyLimit(httputil.HTTPMessageDelegate):
    """Checks a request's declared body size before anything else sees the request (auth
    included): too big gets a JSON 413 and the connection closed unread."""

    def __init__(self, server: LimitedHTTPServer, inner: httputil.HTTPMessageDelegate,
                 conn: httputil.HTTPConnection) -> None:
        self.server, self.inner, self.conn = server, inner, conn

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        path = getattr(start_line, "path", "").split("?", 1)[0]
        upload = start_line.method == "PUT" and _FILES_PATH.search(path) is not None
        if not upload:  # an upload's own limit (max_file_size) is the server's, and checked again
            limit = self.server.body_limit
            length = headers.get("Content-Length", "")
            if length.strip().isdigit() and int(length) > limit:
                self._refuse(f"a request body of {int(length)} bytes exceeds the limit of "
                             f"{limit} bytes (max_body_size)")
                return None
            if isinstance(self.conn, HTTP1Connection):
                self.conn.set_max_body_size(limit)
        return self.inner.headers_received(start_line, headers)

    def _refuse(self, message: str) -> None:
        assert isinstance(self.conn, HTTP1Connection)
        stream = self.conn.detach()
        body = json.dumps({"reason": "Payload Too Large", "message": message}).encode()
        head = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        stream.write(head + body).add_done_callback(lambda _: stream.close())

    def data_received(self, chunk: bytes) -> Any:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class LimitedHTTPServer(httpserver.HTTPServer):
    """tornado's HTTPServer with the limits that apply before authentication: the request
    body size (:class:`_BodyLimit`) and a cap on open connections (HTTP and websockets
    alike): one past ``max_connections`` is answered 503 and closed before its request is
    read. Header and body timeouts are tornado's own (``idle_connection_timeout``,
    ``body_timeout``)."""

    body_limit = 1024 * 1024
    max_connections = 0
    base_url = "/"
    _streams: set[Any]

    def handle_stream(self, stream: Any, address: Any) -> None:
        if not hasattr(self, "_streams"):
            self._streams = set()
        self._streams = {s for s in self._streams if not s.closed()}
        if self.max_connections and len(self._streams) >= self.max_connections:
            metrics_refused()
            stream.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                         b"Content-Type: text/plain\r\nContent-Length: 47\r\n\r\n"
                         b"too many connections to this gateway: retry\r\n\r\n"
                         ).add_done_callback(lambda _: stream.close())
            return
        self._streams.add(stream)
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection
                      ) -> httputil.HTTPMessageDelegate:
        inner = super().start_request(server_conn, request_conn)
        return _BodyLimit(self, inner, request_conn)


_last_refusal_log = [0.0, 0]


def metrics_refused() -> None:
    """Log refused connections at most once a minute (a flood must not flood the log)."""
    now = time.monotonic()
    _last_refusal_log[1] += 1
    if now - _last_refusal_log[0] >= 60:
        logging.getLogger("vmkg.gateway").warning(
            "refused %d connection(s): max_connections reached", _last_refusal_log[1])
        _last_refusal_log[:] = [now, 0]


class ServeApp(Application):
    name = "vmkg serve"
    description = ("Run the gateway: the Jupyter Kernel Gateway API (REST + websocket, legacy and "
                   "v1 protocols) where every kernel is a microVM restored from a warm snapshot. "
                   "Point JupyterLab at it with `jupyter lab --gateway-url=http://IP:PORT "
                   "--GatewayClient.auth_token=TOKEN`.\n\n"
                   "At start it reaps VMs a crashed predecessor left behind; SIGTERM shuts every "
                   "VM down cleanly.")
    classes = [VMMappingKernelManager, VMKGWebsocketConnection, TemplateKernelSpecManager,
               TokenIdentityProvider, MicroVMProvisioner, GuestLimits]
    aliases = {
        "ip": "ServeApp.ip",
        "port": "ServeApp.port",
        "base-url": "ServeApp.base_url",
        "config": "ServeApp.config_file",
        "log-level": "Application.log_level",
        "max-kernels": "VMMappingKernelManager.max_kernels",
        "max-kernels-per-user": "VMMappingKernelManager.max_kernels_per_user",
        "users-file": "TokenIdentityProvider.users_file",
        "pool-size": "VMMappingKernelManager.pool_size",
        "max-fork-count": "ServeApp.max_fork_count",
        "default-kernel-name": "VMMappingKernelManager.default_kernel_name",
        "force-kernel-name": "VMMappingKernelManager.force_kernel_name",
        "cull-idle-timeout": "VMMappingKernelManager.cull_idle_timeout",
        "cull-interval": "VMMappingKernelManager.cull_interval",
        "allow-origin": "ServeApp.allow_origin",
        "certfile": "ServeApp.certfile",
        "keyfile": "ServeApp.keyfile",
        "ws-ping-interval": "ServeApp.ws_ping_interval",
        "ws-ping-timeout": "ServeApp.ws_ping_timeout",
        "store": "ServeApp.store",
        "router-secret": "TokenIdentityProvider.router_secret",
    }
    flags = {
        "cull-connected": ({"VMMappingKernelManager": {"cull_connected": True}},
                           "Cull idle kernels even while a client is connected."),
        "cull-busy": ({"VMMappingKernelManager": {"cull_busy": True}}, "Cull busy kernels too."),
        "no-auth": ({"ServeApp": {"auth_enabled": False}},
                    "Accept requests without a token (only behind something that authenticates)."),
        "json-logs": ({"ServeApp": {"json_logs": True}}, "Log one JSON object per line."),
        "durable-cull-oldest": ({"VMMappingKernelManager": {"durable_cull_oldest": True}},
                                "Cull the oldest hibernated kernels when a hibernation would "
                                "exceed the durable disk budget (instead of 507)."),
        "debug": ({"Application": {"log_level": logging.DEBUG}}, "Log at DEBUG level."),
    }

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    config_file = env_trait(Unicode, "VMKG_CONFIG", "",
                            help="A config file (vmkg_config.py or .json) to load.")
    ip = env_trait(Unicode, "VMKG_IP", "127.0.0.1", help="Address to listen on.")
    port = env_trait(Integer, "VMKG_PORT", 8888, help="Port to listen on; 0 picks a free one.")
    base_url = env_trait(Unicode, "VMKG_BASE_URL", "/", help="Path prefix of every route.")
    auth_enabled = env_trait(Bool, "VMKG_AUTH_ENABLED", True,
                             help="Require the token on every request.")
    auth_token = env_trait(Unicode, "VMKG_AUTH_TOKEN", "",
                           help="The token clients must present (Authorization: token|Bearer X, or "
                                "?token=X). Generated and printed at start if empty.")
    kernel_id_ws_auth = env_trait(
        Bool, "VMKG_KERNEL_ID_WS_AUTH", False,
        help="Accept a kernel's channels websocket that presents no credential at all, the "
             "kernel's id (a random UUID only token holders learn) standing in for the token. "
             "Off by default: a kernel id leaks easily (logs, URLs, proxies). Turn it on for "
             "nbclient and papermill through a gateway: jupyter_server's GatewayKernelClient "
             "sends no Authorization header there. A wrong token is still refused.")
    allowed_hosts = env_trait(
        List, "VMKG_ALLOWED_HOSTS", [], trait=Unicode(),
        help="With --no-auth only: Host header names (no port) requests may carry, besides "
             "localhost names and IP addresses (always allowed); '*' allows any. Another Host "
             "gets 403: a web page whose name was rebound to this address (DNS rebinding) "
             "cannot drive the gateway.")
    max_body_size = env_trait(
        Integer, "VMKG_MAX_BODY_SIZE", 1024 * 1024, zero_is_default=True,
        help="Largest request body accepted, in bytes, checked before authentication: a "
             "larger Content-Length gets 413 and the connection is closed without reading "
             "the body (a chunked body past it is cut off). File uploads (PUT "
             "/api/kernels/{id}/files/...) have max_file_size instead.")
    idle_connection_timeout = env_trait(
        Float, "VMKG_IDLE_CONNECTION_TIMEOUT", 60.0, zero_is_default=True,
        help="Seconds a connection may take to send a request's headers, and may sit idle "
             "between requests, before it is closed (slow-header clients hold nothing long).")
    body_timeout = env_trait(
        Float, "VMKG_BODY_TIMEOUT", 600.0, zero_is_default=True,
        help="Seconds a request's body may take to arrive before the connection is closed.")
    max_connections = env_trait(
        Integer, "VMKG_MAX_CONNECTIONS", 1000,
        help="Most client connections open at once (HTTP and websockets); one more is "
             "answered 503 and closed at once, before its request is read. 0: no limit.")
    allow_origin = env_trait(Unicode, "VMKG_ALLOW_ORIGIN", "", help="Access-Control-Allow-Origin.")
    allow_credentials = env_trait(Unicode, "VMKG_ALLOW_CREDENTIALS", "",
                                  help="Access-Control-Allow-Credentials.")
    allow_headers = env_trait(Unicode, "VMKG_ALLOW_HEADERS", "", help="Access-Control-Allow-Headers.")
    allow_methods = env_trait(Unicode, "VMKG_ALLOW_METHODS", "", help="Access-Control-Allow-Methods.")
    expose_headers = env_trait(Unicode, "VMKG_EXPOSE_HEADERS", "",
                               help="Access-Control-Expose-Headers.")
    max_age = env_trait(Unicode, "VMKG_MAX_AGE", "", help="Access-Control-Max-Age.")
    trust_xheaders = env_trait(Bool, "VMKG_TRUST_XHEADERS", False,
                               help="Take the client address from X-Real-Ip/X-Forwarded-For (behind "
                                    "a proxy).")
    list_kernels = env_trait(Bool, "VMKG_LIST_KERNELS", True,
                             help="Allow GET /api/kernels (JupyterLab's GatewayClient polls it).")
    ws_ping_interval = env_trait(Integer, "VMKG_WS_PING_INTERVAL", 30,
                                 help="Seconds between websocket pings; 0 disables them.")
    # not env_trait: its default is derived from ws_ping_interval
    ws_ping_timeout = Float(config=True,
                            help="Seconds without a pong after which a websocket is closed as dead "
                                 "(checked when each ping is sent). Default: three ws_ping_interval, "
                                 "as jupyter_server's; one interval would close live clients whenever "
                                 "a busy event loop delays the ping timer. ($VMKG_WS_PING_TIMEOUT)")

    @default("ws_ping_timeout")
    def _ws_ping_timeout_default(self) -> float:
        text = os.environ.get("VMKG_WS_PING_TIMEOUT", "")
        try:
            return float(text) if text else 3.0 * self.ws_ping_interval
        except ValueError:
            raise TraitError(f"$VMKG_WS_PING_TIMEOUT: {text!r} is not a number of seconds") from None

    max_message_size = env_trait(Integer, "VMKG_MAX_MESSAGE_SIZE", 64 * 1024 * 1024,
                                 zero_is_default=True,
                                 help="Largest websocket message accepted from a client, in bytes; "
                                      "a larger one closes that websocket with code 1009.")
    max_file_size = env_trait(Integer, "VMKG_MAX_FILE_SIZE", 100 * 1024 * 1024,
                              help="Largest file PUT /api/kernels/{id}/files/{path} accepts, in "
                                   "bytes; a larger one gets 413.")
    max_fork_count = env_trait(Integer, "VMKG_MAX_FORK_COUNT", 64, zero_is_default=True,
                               help="Most branches one POST /api/kernels/{id}/fork may ask for "
                                    "(400 beyond it); max_kernels still bounds the total.")
    guest_forks_per_minute = env_trait(
        Integer, "VMKG_GUEST_FORKS_PER_MINUTE", 6,
        help="How often a kernel may ask for forks from inside (the %fork magic), per minute and "
             "kernel; more are refused with a message in the cell. Its branches count against "
             "the kernel owner's limits and the fork-image budget like any fork.")
    authenticate_metrics = env_trait(Bool, "VMKG_AUTHENTICATE_METRICS", True,
                                     help="Require the token for /metrics.")
    json_logs = env_trait(Bool, "VMKG_JSON_LOGS", False, help="Log one JSON object per line.")
    store = env_trait(Unicode, "VMKG_STORE", "",
                      help="Where templates are shared between hosts: s3://BUCKET/PREFIX (endpoint "
                           "and credentials from the standard AWS settings, e.g. AWS_ENDPOINT_URL) "
                           "or a directory. A template this host lacks is pulled from it instead of "
                           "built; one it bakes is pushed. Empty: none.")
    certfile = env_trait(Unicode, "VMKG_CERTFILE", "", help="TLS certificate file (serve https/wss).")
    keyfile = env_trait(Unicode, "VMKG_KEYFILE", "", help="TLS private key file.")

    kernel_manager_class = Type(VMMappingKernelManager, klass=VMMappingKernelManager, config=True,
                                help="The kernel manager class.")
    kernel_spec_manager_class = Type(TemplateKernelSpecManager, config=True,
                                     help="The kernelspec manager class (default: one kernelspec "
                                          "per template).")
    kernel_websocket_connection_class = Type(VMKGWebsocketConnection, klass=VMKGWebsocketConnection,
                                             config=True, help="The kernel websocket connection class.")
    identity_provider_class = Type(TokenIdentityProvider, klass=TokenIdentityProvider, config=True,
                                   help="The identity provider class.")

    kernel_manager: Any = None
    kernel_spec_manager: Any = None
    http_server: Any = None
    event_logger: Any = None  # ServerKernelManager looks for its grandparent's

    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        if self.config_file:
            path = os.path.abspath(self.config_file)
            if not os.path.exists(path):
                print(f"vmkg: error: config file {path} not found", file=sys.stderr)
                self.exit(1)
            self.load_config_file(os.path.basename(path), path=os.path.dirname(path))
            self.update_config(self.cli_config)  # the command line wins over the file

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        level = cast(int | str, self.log_level)
        logs.configure(level, self.json_logs)
        self.log = logging.getLogger("vmkg.gateway")
        if self.parent is not None:
            self.parent.log = self.log  # jupyter_server's request log uses the root app's
        try:
            asyncio.run(self.serve())
        except OSError as exc:
            self.log.critical("cannot listen on %s:%s: %s", self.ip, self.port, exc)
            self.exit(1)

    def web_settings(self) -> dict[str, Any]:
        cors = {
            "Access-Control-Allow-Origin": self.allow_origin,
            "Access-Control-Allow-Credentials": self.allow_credentials,
            "Access-Control-Allow-Headers": self.allow_headers,
            "Access-Control-Allow-Methods": self.allow_methods,
            "Access-Control-Expose-Headers": self.expose_headers,
            "Access-Control-Max-Age": self.max_age,
        }
        return dict(
            base_url=self.base_url,
            kernel_manager=self.kernel_manager,
            kernel_spec_manager=self.kernel_spec_manager,
            contents_manager=None,
            session_manager=None,
            config=self.config,
            identity_provider=self.identity_provider,
            authorizer=AllowAllAuthorizer(parent=self, identity_provider=self.identity_provider),
            kernel_websocket_connection_class=self.kernel_websocket_connection_class,
            allow_origin=self.allow_origin,
            allow_remote_access=True,
            disable_check_xsrf=True,
            ws_ping_interval=self.ws_ping_interval * 1000,
            ws_ping_timeout=self.ws_ping_timeout * 1000,
            websocket_max_message_size=self.max_message_size,
            log_function=log_request,
            cookie_secret=secrets.token_bytes(32),
            vmkg_cors_headers=cors,
            vmkg_list_kernels=self.list_kernels,
            vmkg_kernel_id_ws_auth=self.kernel_id_ws_auth,
            vmkg_allowed_hosts=list(self.allowed_hosts) + ([self.ip] if self.ip else []),
            vmkg_authenticate_metrics=self.authenticate_metrics,
            vmkg_max_file_size=self.max_file_size,
            vmkg_max_fork_count=self.max_fork_count,
        )

    async def serve(self) -> None:
        start_runtime()  # reaps what a crashed predecessor left, first of all
        GuestLimits.instance().update_config(self.config)  # --GuestLimits.* and c.GuestLimits
        configure_store(self.store)
        token = self.auth_token if self.auth_enabled else ""
        generated = self.auth_enabled and not token
        if generated:
            token = secrets.token_urlsafe(24)
        self.event_logger = EventLogger(parent=self)
        self.kernel_spec_manager = self.kernel_spec_manager_class(parent=self, log=self.log)
        self.kernel_manager = self.kernel_manager_class(parent=self, log=self.log,
                                                        kernel_spec_manager=self.kernel_spec_manager)
        km = self.kernel_manager
        km.removal_hooks.append(self.kernel_websocket_connection_class.close_for_kernel)
        km.status_hooks.append(self.kernel_websocket_connection_class.announce)
        set_fork_request_handler(GuestForks(km, per_minute=self.guest_forks_per_minute,
                                            max_count=self.max_fork_count))
        names = sorted(self.kernel_spec_manager.find_kernel_specs())
        for name in filter(None, {km.default_kernel_name, km.force_kernel_name}):
            if name not in names:
                self.log.critical("kernelspec %r (default/forced kernel name) is not one of %s",
                                  name, ", ".join(names))
                self.exit(1)
        try:
            self.identity_provider = self.identity_provider_class(parent=self, log=self.log, token=token)
        except UsersFileError as exc:
            self.log.critical("%s", exc)
            self.exit(1)
        metrics.register(lambda: self.kernel_manager)
        # kernels a previous gateway persisted (gateway.hibernate), before the first request
        await km.durability.resume_all()
        lag_monitor = metrics.start_loop_lag_monitor()
        app = web.Application(routes(self.base_url), **self.web_settings())
        ssl_options = None
        if self.certfile:
            ssl_options = {"certfile": self.certfile, "keyfile": self.keyfile or None}
        self.http_server = LimitedHTTPServer(
            app, xheaders=self.trust_xheaders, ssl_options=ssl_options,
            max_body_size=max(self.max_body_size, self.max_file_size),
            max_buffer_size=max(self.max_body_size, self.max_message_size) + (1 << 20),
            idle_connection_timeout=self.idle_connection_timeout, body_timeout=self.body_timeout,
            decompress_request=False)
        self.http_server.body_limit = self.max_body_size
        self.http_server.max_connections = self.max_connections
        self.http_server.base_url = self.base_url
        sockets = netutil.bind_sockets(self.port, self.ip, family=socket.AF_UNSPEC)
        self.http_server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        scheme = "https" if ssl_options else "http"
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        url = f"{scheme}://{host}:{port}{self.base_url.rstrip('/')}"
        print(f"vmkg: serving on {url}/ (kernelspecs: {', '.join(names)}; default {km.default_kernel_name}; "
              f"pool {km.pool_size} per kernelspec)", flush=True)
        if generated:
            print(f"vmkg: no token configured ($VMKG_AUTH_TOKEN); generated for this run: {token}", flush=True)
            print(f"vmkg:   jupyter lab --gateway-url={url} --GatewayClient.auth_token={token}", flush=True)
        elif not token:
            self.log.warning("authentication is disabled (--no-auth): anyone who can reach %s can "
                             "run code", url)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        prepare = asyncio.ensure_future(self._prepare_templates())
        km.durability.start()
        try:
            await stop.wait()
        finally:
            prepare.cancel()
            lag_monitor.cancel()
            await self.shutdown()

    async def _prepare_templates(self) -> None:
        """Bake (first run only: minutes) or load the templates the pool restores from, then
        fill the pool. Other templates are baked on first use."""
        for spec in catalog().values():
            if self.kernel_manager.pool_target(kernelspec_name(spec.name)) <= 0:
                continue
            try:
                path = await bake_template(spec.name)
                self.log.info("template %s: ready (%s)", spec.name, path)
            except Exception as exc:  # noqa: BLE001 - keep serving the other templates
                self.log.error("template %s: unavailable: %s", spec.name, exc)
        self.kernel_manager.pool.refill()

    async def shutdown(self) -> None:
        """Stop accepting, close websockets, shut every kernel down (pooled ones too)."""
        km = self.kernel_manager
        self.log.info("shutting down: %d kernels, %d pooled", len(km.list_kernel_ids()),
                      sum(km.pool.pooled().values()))
        set_fork_request_handler(None)
        self.http_server.stop()
        for conn in internals.open_connections():
            try:
                metrics.ws_closed("shutdown")
                conn.websocket_handler.close(1001, "gateway shutting down")
            except Exception:  # noqa: BLE001
                pass
        km.durability.stop()
        if km.persist_kernels:
            try:
                await km.durability.persist_all(km.persist_timeout)
            except Exception as exc:  # noqa: BLE001 - the kernels are shut down below anyway
                self.log.error("shutdown: persisting kernels failed: %s", exc)
        try:
            await asyncio.wait_for(km.shutdown_all(now=True), 30)
        except Exception as exc:  # noqa: BLE001 - the runtime below still closes every VM
            self.log.error("shutdown: %s", exc)
        self.kernel_spec_manager.close()
        await asyncio.to_thread(stop_runtime)
        self.log.info("stopped")


class VMKGApp(Application):
    name = "vmkg"
    description = ("vm-kernel-gateway: Jupyter kernels in snapshot-restored microVMs.\n\n"
                   "Every kernel runs in its own QEMU microVM restored from a snapshot of a VM whose "
                   "ipykernel was already warm. Start with `vmkg serve`; the guest image and the "
                   "template are built on first use (or ahead of time with `vmkg template bake`).")
    subcommands = {
        "serve": (ServeApp, ServeApp.description.split("\n")[0]),
        "image": (cli.ImageApp, cli.ImageApp.description),
        "template": (cli.TemplateApp, cli.TemplateApp.description),
        "kernelspec": (cli.KernelspecApp, cli.KernelspecApp.description),
        "fork": (cli.ForkApp, cli.ForkApp.description.split(":")[0] + "."),
        "run": (cli.RunApp, cli.RunApp.description.split(":")[0] + "."),
        "hibernate": (cli.HibernateApp, cli.HibernateApp.description.split(":")[0] + "."),
        "wake": (cli.WakeApp, cli.WakeApp.description.split(":")[0] + "."),
        "checkpoint": (cli.CheckpointApp, cli.CheckpointApp.description.split(":")[0] + "."),
        "cache": (cli.CacheApp, cli.CacheApp.description),
        "user": (UserApp, UserApp.description.split(":")[0] + "."),
        "store": (cli.StoreApp, cli.StoreApp.description),
        "router": ("gateway.router.RouterApp", "Serve one endpoint in front of several hosts."),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_help()
            self.exit(2)
        assert self.subapp is not None
        self.subapp.start()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = VMKGApp.instance()
    app.initialize(argv if argv is not None else sys.argv[1:])
    app.start()


if __name__ == "__main__":
    main()
