"""The synchronous face of the SDK (``vmkg_client.sdk``), for scripts and agent loops that
do not use asyncio:

    from vmkg_client.sync import Gateway

    with Gateway("http://127.0.0.1:8888", token) as gw, gw.start_kernel("python3") as kernel:
        print(kernel.run_code("1 + 1").text)

Not a second implementation: every method runs the async core's coroutine on one event
loop in a background thread shared by the whole process, and waits for it. Callbacks
given to :meth:`Kernel.run_code` are called in that thread; they must not call back into
this API (that would wait on the thread it runs in, so it raises instead).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from . import sdk
from .sdk import (  # noqa: F401 - re-exported: the sync API hands out the same objects
    DEFAULT_TIMEOUT,
    Callback,
    Execution,
    ExecutionError,
    ExecutionTimeout,
    FileInfo,
    GatewayError,
    GatewayUnreachable,
    IncompatibleGateway,
    KernelGone,
    Logs,
    Result,
    SDKError,
)

T = TypeVar("T")


class _LoopThread:
    """One event loop in one daemon thread, started on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._thread is None or not cls._thread.is_alive():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="vmkg-sdk-loop", daemon=True)
                thread.start()
                ready.wait()
                cls._loop, cls._thread = loop, thread
            return cls._loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine of the async SDK on the SDK's loop thread and return its result."""
    loop = _LoopThread.loop()
    if threading.current_thread() is _LoopThread._thread:
        coro.close()
        raise SDKError("the synchronous SDK was called from one of its own callbacks; use the "
                       "async API (vmkg_client.sdk) there, or act after run_code() returns")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise


class Gateway:
    """Synchronous :class:`vmkg_client.sdk.Gateway`; the same arguments."""

    def __init__(self, url: str | None = None, token: str | None = None, **kwargs: Any) -> None:
        self.aio = sdk.Gateway(url, token, **kwargs)

    def __repr__(self) -> str:
        return repr(self.aio)

    @property
    def url(self) -> str:
        return self.aio.url

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """See :meth:`vmkg_client.sdk.Gateway.close`."""
        run(self.aio.close())

    def start_kernel(self, template: str | None = None, *, env: dict[str, Any] | None = None,
                     kernel_name: str | None = None, egress: list[str] | None = None) -> Kernel:
        """See :meth:`vmkg_client.sdk.Gateway.start_kernel`."""
        return Kernel.of(run(self.aio.start_kernel(template, env=env, kernel_name=kernel_name, egress=egress)))

    def connect_kernel(self, kernel_id: str) -> Kernel:
        """See :meth:`vmkg_client.sdk.Gateway.connect_kernel`."""
        return Kernel.of(run(self.aio.connect_kernel(kernel_id)))

    def list_kernels(self) -> list[dict[str, Any]]:
        return run(self.aio.list_kernels())

    def templates(self) -> dict[str, str]:
        return run(self.aio.templates())

    def check_api(self) -> dict[str, Any]:
        """See :meth:`vmkg_client.sdk.Gateway.check_api`."""
        return run(self.aio.check_api())


class Kernel:
    """Synchronous :class:`vmkg_client.sdk.Kernel`; the same methods, blocking."""

    def __init__(self, aio: sdk.Kernel) -> None:
        self.aio = aio

    @classmethod
    def of(cls, aio: sdk.Kernel) -> Kernel:
        wrapper: Kernel | None = getattr(aio, "_sync_wrapper", None)
        if wrapper is None:
            wrapper = aio._sync_wrapper = cls(aio)  # type: ignore[attr-defined]
        return wrapper

    def __repr__(self) -> str:
        return repr(self.aio)

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def model(self) -> dict[str, Any]:
        return self.aio.model

    @property
    def parent_id(self) -> str | None:
        return self.aio.parent_id

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        run(self.aio.__aexit__(*exc))

    def run_code(self, code: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                 on_result: Callback | None = None, on_error: Callback | None = None) -> Execution:
        """See :meth:`vmkg_client.sdk.Kernel.run_code`."""
        return run(self.aio.run_code(code, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr,
                                     on_result=on_result, on_error=on_error))

    def interrupt(self) -> None:
        run(self.aio.interrupt())

    def restart(self) -> None:
        run(self.aio.restart())

    def fork(self, n: int = 1, *, reseed: bool = True, timeout: float = 30.0,
             checkpoint: str | None = None) -> list[Kernel]:
        """See :meth:`vmkg_client.sdk.Kernel.fork`."""
        return [Kernel.of(k) for k in run(self.aio.fork(n, reseed=reseed, timeout=timeout,
                                                        checkpoint=checkpoint))]

    def hibernate(self, *, timeout: float = 30.0) -> None:
        """See :meth:`vmkg_client.sdk.Kernel.hibernate`."""
        run(self.aio.hibernate(timeout=timeout))

    def wake(self) -> None:
        run(self.aio.wake())

    @property
    def hibernated(self) -> bool:
        return self.aio.hibernated

    def checkpoint(self, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """See :meth:`vmkg_client.sdk.Kernel.checkpoint`."""
        return run(self.aio.checkpoint(name, timeout=timeout))

    def checkpoints(self) -> list[dict[str, Any]]:
        return run(self.aio.checkpoints())

    def restore(self, name: str) -> None:
        """See :meth:`vmkg_client.sdk.Kernel.restore`."""
        run(self.aio.restore(name))

    def delete_checkpoint(self, name: str) -> None:
        run(self.aio.delete_checkpoint(name))

    def info(self) -> dict[str, Any]:
        return run(self.aio.info())

    def network(self) -> dict[str, Any]:
        """See :meth:`vmkg_client.sdk.Kernel.network`."""
        return run(self.aio.network())

    def set_egress(self, egress: list[str]) -> dict[str, Any]:
        """See :meth:`vmkg_client.sdk.Kernel.set_egress`."""
        return run(self.aio.set_egress(egress))

    def upload(self, path: str, data: Any) -> FileInfo:
        """See :meth:`vmkg_client.sdk.Kernel.upload`."""
        return run(self.aio.upload(path, data))

    def download(self, path: str) -> bytes:
        return run(self.aio.download(path))

    def list_files(self, path: str = "") -> list[FileInfo]:
        return run(self.aio.list_files(path))

    def remove_file(self, path: str) -> None:
        run(self.aio.remove_file(path))

    def detach(self) -> None:
        self.aio.detach()

    def close(self) -> None:
        run(self.aio.close())

    def shutdown(self) -> None:
        run(self.aio.shutdown())
