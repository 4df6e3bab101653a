"""The process-wide runtime: an event loop in a background thread that owns every VM,
agent channel and relay of this process.

Why a thread: a kernel's relay must keep forwarding between calls, but synchronous
jupyter_client users (``start_new_kernel``, ``jupyter_kernel_test``, nbclient's sync
paths) run each provisioner coroutine in a loop that stops when the call returns.
The runtime loop never stops, so kernels keep working however they are driven.

Callers from any loop use :meth:`Runtime.run` (awaitable) and from plain threads
:meth:`Runtime.run_sync`. At start the runtime reaps VM directories left by dead
owners; at interpreter exit it closes every VM it still holds.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import zmq.asyncio

from . import paths, reaper

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runtime:
    _instance: Runtime | None = None
    _lock = threading.Lock()

    @classmethod
    def instance(cls) -> Runtime:
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="vmkg-runtime", daemon=True)
        self.closers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.zmq_context: zmq.asyncio.Context | None = None
        reaper.reap_orphans(paths.vms_dir())
        reaper.reap_orphans(paths.state_dir() / "forks")
        self.thread.start()
        self._ready.wait()
        atexit.register(self.shutdown)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.zmq_context = zmq.asyncio.Context()
        self._ready.set()
        self.loop.run_forever()

    def in_runtime(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the runtime loop and await its result from the caller's loop."""
        if self.in_runtime():
            return await coro

        async def guarded() -> T:
            try:
                return await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    raise
                # cancelled by its caller, which reads no result: end as cancelled (an error
                # here would be logged as "Task exception was never retrieved")
                log.debug("work abandoned by a cancelled caller ended with: %r", exc)
                raise asyncio.CancelledError() from exc

        fut = asyncio.run_coroutine_threadsafe(guarded(), self.loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self.in_runtime():
            raise RuntimeError("run_sync called from the runtime loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def register(self, obj: Any) -> None:
        """Keep ``obj`` (anything with ``async close()``) to close at interpreter exit."""
        self.closers.add(obj)

    def shutdown(self, timeout: float = 10.0) -> None:
        if not self.thread.is_alive():
            return

        async def close_all() -> None:
            objs = list(self.closers)
            await asyncio.gather(*(o.close() for o in objs), return_exceptions=True)

        try:
            self.run_sync(close_all(), timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("runtime shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
