"""The gateway's route table: every URL ``vmkg serve`` answers, and which handler answers it.

The handlers live by topic - ``gateway.handlers`` (the Kernel Gateway REST API, metrics),
``gateway.forks``, ``gateway.files``, ``gateway.websocket`` (the channels websocket) - and
none of them registers itself: this table is the only list. Paths are relative to
``ServeApp.base_url``; the first match wins, and the last entry answers everything else
with a JSON 404 (after authentication, so it reveals nothing to strangers).

    GET    /api                                {"version", "vmkg"}
    GET    /api/kernelspecs                    one kernelspec per template
    GET    /api/kernelspecs/{name}
    GET    /kernelspecs/{name}/{path}          resources (logos)
    GET    /api/kernels                        (403 if list_kernels is off)
    POST   /api/kernels                        201 model (from the warm pool if it can)
    GET    /api/kernels/{id}
    DELETE /api/kernels/{id}                   204
    POST   /api/kernels/{id}/interrupt         204
    POST   /api/kernels/{id}/restart           200 model
    POST   /api/kernels/{id}/fork              201 {"kernels": [...]}
    GET    /api/kernels/{id}/forks             lineage and children
    GET|PUT|DELETE /api/kernels/{id}/files/{path}
    GET|PATCH /api/kernels/{id}/network        egress rules (gateway.network)
    POST   /api/kernels/{id}/hibernate|wake    200 model (gateway.hibernate)
    GET|POST /api/kernels/{id}/checkpoints     list; 201 new checkpoint
    DELETE /api/kernels/{id}/checkpoints/{name}          204
    POST   /api/kernels/{id}/checkpoints/{name}/restore  200 model
    WS     /api/kernels/{id}/channels
    GET    /metrics                            Prometheus text format
    GET    /                                   the dashboard (gateway.dashboard; ?token= signs in)
    GET    /dashboard/static/{file}            its script and stylesheet
    GET    /dashboard/api/kernels              its JSON (session cookie, not the API's token)
    POST   /dashboard/api/kernels/{id}/delete|fork   (cookie + CSRF header)
    GET    /api/vmkg/host                      this host's report to routers (admin)
    POST   /api/kernels/{id}/fork-export       cross-host fork, on the parent's host (router)
    POST   /api/vmkg/fork-import               cross-host fork, on a branch's host (router)
"""

from __future__ import annotations

from jupyter_server.services.kernelspecs.handlers import kernel_name_regex
from jupyter_server.utils import url_path_join

from . import dashboard, handlers
from .files import FileHandler
from .forks import ForkHandler, ForksListHandler
from .hibernate import (
    CheckpointHandler,
    CheckpointRestoreHandler,
    CheckpointsHandler,
    HibernateHandler,
)
from .network import NetworkHandler
from .router import ForkExportHandler, ForkImportHandler, HostStatusHandler
from .websocket import KernelChannelsHandler

KERNEL_ID = r"(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)"
KERNEL_NAME = kernel_name_regex


def route_table() -> list[tuple[str, type]]:
    """(path pattern relative to base_url, handler class), in matching order."""
    return [
        (r"/api", handlers.APIVersionHandler),
        (r"/api/kernelspecs", handlers.MainKernelSpecHandler),
        (rf"/api/kernelspecs/{KERNEL_NAME}", handlers.KernelSpecHandler),
        (rf"/kernelspecs/{KERNEL_NAME}/(?P<path>.*)", handlers.KernelSpecResourceHandler),
        (r"/api/kernels", handlers.MainKernelHandler),
        (rf"/api/kernels/{KERNEL_ID}", handlers.KernelHandler),
        (rf"/api/kernels/{KERNEL_ID}/(?P<action>restart|interrupt)", handlers.KernelActionHandler),
        (r"/metrics", handlers.MetricsHandler),
        (r"/api/vmkg/host", HostStatusHandler),   # what routers place kernels by (gateway.router)
        (r"/api/vmkg/fork-import", ForkImportHandler),          # cross-host forks (gateway.router)
        (rf"/api/kernels/{KERNEL_ID}/fork-export", ForkExportHandler),
        (rf"/api/kernels/{KERNEL_ID}/fork", ForkHandler),
        (rf"/api/kernels/{KERNEL_ID}/forks", ForksListHandler),
        (rf"/api/kernels/{KERNEL_ID}/files/(?P<path>.*)", FileHandler),
        (rf"/api/kernels/{KERNEL_ID}/network", NetworkHandler),
        (rf"/api/kernels/{KERNEL_ID}/(?P<action>hibernate|wake)", HibernateHandler),
        (rf"/api/kernels/{KERNEL_ID}/checkpoints", CheckpointsHandler),
        (rf"/api/kernels/{KERNEL_ID}/checkpoints/(?P<name>[^/]+)", CheckpointHandler),
        (rf"/api/kernels/{KERNEL_ID}/checkpoints/(?P<name>[^/]+)/restore", CheckpointRestoreHandler),
        (rf"/api/kernels/{KERNEL_ID}/channels", KernelChannelsHandler),
        (r"/", dashboard.DashboardPageHandler),
        (r"/dashboard/static/(?P<name>[\w.-]+)", dashboard.DashboardStaticHandler),
        (r"/dashboard/api/kernels", dashboard.DashboardKernelsHandler),
        (rf"/dashboard/api/kernels/{KERNEL_ID}/(?P<action>delete|fork)", dashboard.DashboardActionHandler),
        (r"/(.*)", handlers.NotFoundHandler),
    ]


def routes(base_url: str) -> list[tuple[str, type]]:
    """The route table with ``base_url`` prefixed: what ``tornado.web.Application`` takes."""
    return [(url_path_join(base_url, path), cls) for path, cls in route_table()]
