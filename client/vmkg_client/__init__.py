"""vmkg-client: the client of vm-kernel-gateway (``vmkg serve``), installable on its own.

- :mod:`vmkg_client.sdk`: the async SDK for code-interpreter agents (its names are
  re-exported here: ``from vmkg_client import Gateway``);
- :mod:`vmkg_client.sync`: the same API, blocking (one background event-loop thread);
- :mod:`vmkg_client.cli`: the ``vmkg-client`` command (``run``, ``fork``), which the
  server's ``vmkg run``/``vmkg fork`` also call;
- :mod:`vmkg_client.errors`, :mod:`vmkg_client.websocket`, :mod:`vmkg_client.http`,
  :mod:`vmkg_client.wire`: the error tree, the kernel websocket, the REST client and the
  v1 websocket frames underneath.

It depends on ``websockets`` and the standard library only: nothing of the server
(jupyter_server, tornado, pyzmq, ipykernel, traitlets) is imported.
"""

from ._version import __version__
from .sdk import (
    API_VERSIONS,
    DEFAULT_TIMEOUT,
    Execution,
    ExecutionError,
    ExecutionTimeout,
    FileInfo,
    Gateway,
    GatewayError,
    GatewayUnreachable,
    IncompatibleGateway,
    Kernel,
    KernelGone,
    Logs,
    Result,
    SDKError,
)

__all__ = ["API_VERSIONS", "DEFAULT_TIMEOUT", "Execution", "ExecutionError", "ExecutionTimeout",
           "FileInfo", "Gateway", "GatewayError", "GatewayUnreachable", "IncompatibleGateway",
           "Kernel", "KernelGone", "Logs", "Result", "SDKError", "__version__"]
