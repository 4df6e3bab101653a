"""The REST API of the gateway: jupyter_server's handlers with token auth, CORS as Kernel
Gateway has it, JSON errors, input validation and the gateway's kernel semantics.

    GET    /api                           {"version": jupyter_server's, "vmkg": ours}
    GET    /api/kernelspecs               one kernelspec per template
    GET    /api/kernelspecs/{name}
    GET    /kernelspecs/{name}/{path}     resources (logos); no '..' anywhere
    GET    /api/kernels                   (403 if list_kernels is off)
    POST   /api/kernels                   {"name", "env", "network"} -> 201 model (from the warm pool if it can)
    GET    /api/kernels/{id}
    DELETE /api/kernels/{id}              204
    POST   /api/kernels/{id}/interrupt    204
    POST   /api/kernels/{id}/restart      200 model, once the new kernel answered kernel_info
    WS     /api/kernels/{id}/channels     (gateway.websocket)
    GET    /metrics                       Prometheus text format

The URL patterns are in ``gateway.routes`` (the one route table). Every error is JSON ``{"reason", "message"}``; domain errors get their status codes in
``gateway.errors`` only.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import jupyter_server
import jupyter_server.kernelspecs.handlers as ks_resources
import jupyter_server.services.kernels.handlers as km_handlers
import jupyter_server.services.kernelspecs.handlers as ks_handlers
from jupyter_client.jsonutil import json_default
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_escape, url_path_join
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import web

from . import errors

UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


#: the version of vmkg's API beyond Jupyter's (forks, files, resume), announced by GET /api
#: as "vmkg_api"; a client refuses one it does not know. Bump it on a breaking change.
VMKG_API_VERSION = 1


def vmkg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vm-kernel-gateway")
    except PackageNotFoundError:
        return "unknown"


def unauthorized_message(handler: web.RequestHandler) -> str:
    presented = handler.settings["identity_provider"].presented_token(handler)
    if presented:
        return "Invalid token"
    return ("Authentication required: send the gateway token as 'Authorization: token <token>', "
            "'Authorization: Bearer <token>' or '?token=<token>'")


def check_owner(handler: Any, kernel_id: str) -> None:
    """404, as for an unknown kernel, unless the request's user may act on ``kernel_id``
    (``VMMappingKernelManager.check_owner``; rules in ``gateway.users``)."""
    handler.kernel_manager.check_owner(kernel_id, handler.current_user)


class GatewayHandlerMixin:
    """Token auth (401 with a JSON body), Kernel Gateway's CORS headers, JSON errors."""

    settings: dict[str, Any]
    request: Any

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        if self.request.method != "OPTIONS":
            user = await self.settings["identity_provider"].get_user(self)
            if user is None:
                raise web.HTTPError(401, "%s", unauthorized_message(self))  # type: ignore[arg-type]
        result = super().prepare(*args, **kwargs)  # type: ignore[misc]
        if inspect.isawaitable(result):
            await result

    def set_cors_headers(self) -> None:
        super().set_cors_headers()  # type: ignore[misc]
        for header, value in self.settings.get("vmkg_cors_headers", {}).items():
            if value:
                self.set_header(header, value)  # type: ignore[attr-defined]
        self.clear_header("Content-Security-Policy")  # type: ignore[attr-defined]

    @allow_unauthenticated
    def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight: answered with the configured headers, no auth (browsers send none)."""
        self.finish()  # type: ignore[attr-defined]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(errors.dumps(status_code, exc))  # type: ignore[attr-defined]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # client errors are logged once, with their message, by the request log
        if isinstance(value, web.HTTPError) and value.status_code < 500:
            self.log.info("%s %s: %s", value.status_code, self.request.path,  # type: ignore[attr-defined]
                          errors.error_body(value.status_code, value)["message"])
            return
        super().log_exception(typ, value, tb)  # type: ignore[misc]


def _finish_json(handler: APIHandler, model: Any, status: int = 200) -> None:
    handler.set_status(status)
    handler.finish(json.dumps(model, default=json_default))


class APIVersionHandler(GatewayHandlerMixin, APIHandler):
    @web.authenticated
    def get(self) -> None:
        _finish_json(self, {"version": jupyter_server.__version__, "vmkg": vmkg_version(),
                           "vmkg_api": VMKG_API_VERSION})


class MainKernelHandler(GatewayHandlerMixin, km_handlers.MainKernelHandler):
    @web.authenticated
    async def get(self) -> None:
        if not self.settings.get("vmkg_list_kernels", True):
            raise web.HTTPError(403, "Listing kernels is disabled on this gateway (list_kernels)")
        km: Any = self.kernel_manager
        _finish_json(self, km.visible_kernels(self.current_user))  # only the user's own

    @web.authenticated
    async def post(self) -> None:
        model = self.get_json_body()  # 400 on malformed JSON
        if model is None:
            model = {}
        if not isinstance(model, dict):
            raise web.HTTPError(400, "The request body must be a JSON object like "
                                     "{\"name\": \"python3-microvm\", \"env\": {}}")
        name = model.get("name")
        if name is not None and not isinstance(name, str):
            raise web.HTTPError(400, "'name' must be a string (a kernelspec name)")
        env = model.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
            raise web.HTTPError(400, "'env' must be a JSON object of variable names to strings")
        bad = [k for k, v in env.items() if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise web.HTTPError(400, "'env' values must be strings; not for %s", ", ".join(sorted(bad)[:5]))
        kernel_id = model.get("kernel_id")
        if kernel_id is not None and (not isinstance(kernel_id, str) or not UUID.fullmatch(kernel_id)):
            raise web.HTTPError(400, "'kernel_id' must be a UUID")
        if kernel_id is not None and kernel_id in self.kernel_manager:
            raise web.HTTPError(400, "'kernel_id' %s is already in use: leave it out to get a "
                                     "fresh kernel", kernel_id)
        path = model.get("path")
        km: Any = self.kernel_manager
        with errors.translated():
            kid = await km.start_kernel(kernel_name=name or None, kernel_id=kernel_id, env=env,
                                        path=path if isinstance(path, str) else None,
                                        user=self.current_user, network=model.get("network"))
        self.set_header("Location", url_path_join(self.base_url, "api", "kernels", url_escape(kid)))
        _finish_json(self, km.kernel_model(kid), 201)


class KernelHandler(GatewayHandlerMixin, km_handlers.KernelHandler):
    @web.authenticated
    async def get(self, kernel_id: str) -> None:
        check_owner(self, kernel_id)
        _finish_json(self, self.kernel_manager.kernel_model(kernel_id))

    @web.authenticated
    async def delete(self, kernel_id: str) -> None:
        check_owner(self, kernel_id)
        with errors.translated():
            await self.kernel_manager.shutdown_kernel(kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(GatewayHandlerMixin, km_handlers.KernelActionHandler):
    @web.authenticated
    async def post(self, kernel_id: str, action: str) -> None:
        km: Any = self.kernel_manager
        check_owner(self, kernel_id)
        if action == "interrupt":
            with errors.translated():
                await ensure_async(km.interrupt_kernel(kernel_id))
            self.set_status(204)
            self.finish()
            return
        # restart: open websockets hear what a local kernel's would ("starting", never
        # "restarting", which JupyterLab reads as a crash; see gateway.kernels); answer once
        # the new kernel answered kernel_info
        with errors.translated():
            try:
                ready = await km.restart_kernel(kernel_id)
                await ready
            except TimeoutError as exc:
                raise TimeoutError(f"kernel {kernel_id}: the restarted kernel did not answer "
                                   "kernel_info in time") from exc
            except RuntimeError as exc:
                raise web.HTTPError(500, "kernel %s: restart failed: %s", kernel_id, exc) from exc
        _finish_json(self, km.kernel_model(kernel_id))


class MainKernelSpecHandler(GatewayHandlerMixin, ks_handlers.MainKernelSpecHandler):
    pass


class KernelSpecHandler(GatewayHandlerMixin, ks_handlers.KernelSpecHandler):
    pass


class KernelSpecResourceHandler(GatewayHandlerMixin, ks_resources.KernelSpecResourceHandler):
    @web.authenticated
    async def get(self, kernel_name: str, path: str, include_body: bool = True) -> Any:  # type: ignore[override]
        if not path or ".." in path.split("/") or "\\" in path or path.startswith("/"):
            raise web.HTTPError(400, "Invalid kernelspec resource path %r: use a file name such as "
                                     "'logo-64x64.png'", path)
        result = super().get(kernel_name, path, include_body=include_body)
        return await result if inspect.isawaitable(result) else result

    def compute_etag(self) -> str | None:
        return None if self.get_status() >= 400 else super().compute_etag()


class MetricsHandler(GatewayHandlerMixin, APIHandler):
    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        if not self.settings.get("vmkg_authenticate_metrics", True):
            return
        await super().prepare(*args, **kwargs)

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        JupyterHandler.finish(self, generate_latest(REGISTRY))


class NotFoundHandler(GatewayHandlerMixin, APIHandler):
    """Everything else: JSON 404 (after auth, so it reveals nothing to strangers)."""

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        async def check() -> None:
            await GatewayHandlerMixin.prepare(self, *args, **kwargs)
            raise web.HTTPError(404, "No such resource: %s", self.request.path)
        return check()
