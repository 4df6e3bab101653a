"""Every use of jupyter_server's private attributes, in one place, each with the reason.

The gateway builds on jupyter_server's kernel manager and channels websocket, and uses
their public methods wherever there are some (``get_kernel``, ``list_kernel_ids``,
``kernel_model``, ``start_buffering``/``get_buffer``/``stop_buffering`` ...). What follows
has no public equivalent. When jupyter_server is upgraded, these functions are what to
check (its channels connection and ``MappingKernelManager`` are the modules they read);
no other gateway module touches an underscore attribute of jupyter_server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web


async def add_started_kernel(mkm: AsyncMappingKernelManager, km: Any) -> str:
    """Put a kernel manager that was started outside the map (a warm-pool kernel) into it,
    as ``MappingKernelManager.start_kernel`` does for a kernel it starts itself.

    Why private: jupyter_server can only add kernels it starts; it has no call to adopt a
    started one (``_kernels``, ``_kernel_connections``, ``_finish_kernel_start`` - activity
    watching and the dead-kernel callback - and ``_initialized_culler``).
    """
    kid: str = km.kernel_id
    mkm._kernels[kid] = km
    mkm._kernel_connections[kid] = 0
    km.execution_state = "idle"
    km.reason = ""
    km.last_activity = datetime.now(timezone.utc)
    await mkm._finish_kernel_start(kid)
    KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).inc()
    if not mkm._initialized_culler:
        mkm.initialize_culler()
    return kid


def watch_activity(km: Any, record: Callable[[list[bytes]], None]) -> None:
    """Subscribe ``record`` to a kernel's IOPub as jupyter_server's activity watch, in its
    place. Why private: ``MappingKernelManager.start_watching_activity`` keeps that
    subscription in ``KernelManager._activity_stream`` (``stop_watching_activity`` closes it
    from there) and offers no hook for what is done with each message."""
    km._activity_stream = km.connect_iopub()
    km._activity_stream.on_recv(record)


def connection_count(mkm: AsyncMappingKernelManager, kernel_id: str) -> int:
    """Open websockets of a kernel. Why private: only ``kernel_model`` exposes the count,
    and it builds the whole model (with our lineage and template lookups)."""
    return int(mkm._kernel_connections.get(kernel_id, 0))


def cache_kernel_info(km: Any, content: dict[str, Any]) -> None:
    """Give a kernel's first websocket the kernel_info reply we already have (a pooled
    kernel answered one while warming). Why private: jupyter_server's connection looks
    for a cached reply in ``KernelManager._kernel_info_future`` and asks the kernel
    otherwise - one more round trip through an emulated VM."""
    cached: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
    cached.set_result(content)
    km._kernel_info_future = cached


def open_connections() -> list[ZMQChannelsWebsocketConnection]:
    """Every open channels websocket connection. Why private: jupyter_server keeps them in
    ``ZMQChannelsWebsocketConnection._open_sockets`` (its own ``close_all`` uses it) and
    offers no accessor; a second registry of ours could only drift from it."""
    return list(ZMQChannelsWebsocketConnection._open_sockets)


def connections_of(kernel_id: str) -> Iterable[ZMQChannelsWebsocketConnection]:
    return [c for c in open_connections() if c.kernel_id == kernel_id]


def session_connection(kernel_id: str, session_id: str) -> Any:
    """The connection (if any) still registered for a websocket session, which
    jupyter_server is about to replace. Why private: ``_open_sessions`` is its registry."""
    handler = ZMQChannelsWebsocketConnection._open_sessions.get(f"{kernel_id}:{session_id}")
    return getattr(handler, "connection", None)


def open_session_keys() -> set[str]:
    """``kernel_id:session_id`` of every websocket session jupyter_server has open."""
    return set(ZMQChannelsWebsocketConnection._open_sessions)


def closed_future(conn: Any) -> asyncio.Future[Any]:
    """Resolves once ``conn`` has finished closing. Why private: ``_close_future``."""
    return asyncio.wrap_future(conn._close_future)


def send_status(conn: Any, state: str) -> None:
    """Send ``status: <state>`` on iopub to one connection's client, flushed in order
    after the kernel's own messages. Why private: ``_send_status_message`` is how
    jupyter_server announces restarts; reusing it keeps both protocols' framing."""
    conn._send_status_message(state)


def mark_token_authenticated(handler: web.RequestHandler) -> None:
    """Why private: jupyter_server's ``JupyterHandler.token_authenticated`` reads
    ``_token_authenticated``, which its own ``IdentityProvider`` sets the same way."""
    handler._token_authenticated = True  # type: ignore[attr-defined]
