"""The warm pool: kernels restored and warmed ahead of time, handed to ``POST /api/kernels``.

(Moved out of ``gateway.kernels``; a base of ``VMMappingKernelManager``.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from typing import Any

from jupyter_server._tz import utcnow
from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL


class WarmPoolMixin:
    def pool_target(self, kernel_name: str) -> int:
        if self.force_kernel_name and kernel_name != self.force_kernel_name:
            return 0
        return max(0, self.pool_sizes.get(kernel_name, self.pool_size))

    def pooled(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._pool.items()}

    def pooled_managers(self) -> list[Any]:
        return [km for q in self._pool.values() for km in q]

    def refill_pool(self) -> None:
        """Bring every kernelspec's pool up to its target, one restore at a time, in the
        background. Called at gateway start and after every hand-out."""
        if self._closing or (self._refill_task is not None and not self._refill_task.done()):
            return
        self._refill_task = asyncio.ensure_future(self._refill())

    def _next_to_fill(self) -> str | None:
        total = len(self._kernels) + sum(self._reserved.values()) + sum(self.pooled().values())
        if self.max_kernels is not None and total >= self.max_kernels:
            return None
        for name in self.kernel_spec_manager.find_kernel_specs():
            if len(self._pool.get(name, ())) < self.pool_target(name):
                return name
        return None

    async def _refill(self) -> None:
        failures = 0
        while not self._closing:
            quiet = self._last_request + self.pool_refill_delay - time.monotonic()
            if quiet > 0 or sum(self._reserved.values()):
                await asyncio.sleep(max(quiet, 0.05))
                continue
            name = self._next_to_fill()
            if name is None:
                return
            self._pool_starting[name] += 1
            try:
                km = await self._start_pooled(name)
            except Exception as exc:  # noqa: BLE001 - keep serving; retry with backoff
                self._pool_starting[name] -= 1
                self._release_waiters(name, None)
                failures += 1
                delay = min(60.0, 2.0 ** failures)
                self.log.error("pool %s: could not restore a kernel (%s); retrying in %.0f s", name, exc, delay)
                await asyncio.sleep(delay)
                continue
            self._pool_starting[name] -= 1
            failures = 0
            if self._closing:
                await self._discard(km)
                return
            if self._release_waiters(name, km):
                continue  # a request was waiting for exactly this kernel
            total = len(self._kernels) + sum(self._reserved.values()) + sum(self.pooled().values())
            if self.max_kernels is not None and total >= self.max_kernels:
                self.log.info("kernel %s: no room left under max_kernels; not pooled", km.kernel_id)
                await self._discard(km)
                continue
            self._pool.setdefault(name, deque()).append(km)
            self.log.info("pool %s: kernel %s ready (%d pooled)", name, km.kernel_id, len(self._pool[name]))

    def _release_waiters(self, name: str, km: Any) -> bool:
        """Give ``km`` to the first request waiting for a pool start of ``name`` (True if one
        took it); with ``km=None`` tell every waiter to restore a kernel of its own."""
        waiters = self._pool_waiters.get(name, [])
        while waiters:
            fut = waiters.pop(0)
            if fut.done():
                continue
            fut.set_result(km)
            if km is not None:
                return True
        return False

    async def _start_pooled(self, kernel_name: str) -> Any:
        kwargs: dict[str, Any] = {}
        km, _, kid = self.pre_start_kernel(kernel_name, kwargs)
        try:
            await km.start_kernel(kernel_id=kid, env=self.kernel_env({}))
            self._observe_restore(km)
            await self._warm(km)
        except BaseException:
            await self._discard(km)
            raise
        return km

    async def _warm(self, km: Any) -> None:
        """Run the paths a client's first requests take once, so they are warm when it comes
        (under TCG a restored VM starts with an empty translation cache)."""
        kc = km.client()
        kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
        try:
            info = await kc.kernel_info(reply=True, timeout=30)
            if self.pool_warmup_code:
                for _ in range(2):
                    await kc.execute(self.pool_warmup_code, reply=True, timeout=30)
                reply = await kc.execute("get_ipython().reset(new_session=True)", silent=True,
                                         store_history=False, reply=True, timeout=30)
                if reply["content"]["status"] != "ok":
                    raise RuntimeError(f"warm-up reset failed: {reply['content'].get('evalue')}")
        finally:
            kc.stop_channels()
        # the first websocket asks for kernel_info; jupyter_server keeps the answer here
        cached: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        cached.set_result(info["content"])
        km._kernel_info_future = cached

    async def _discard(self, km: Any) -> None:
        try:
            await km.shutdown_kernel(now=True)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("kernel %s: pooled kernel did not shut down cleanly: %s", km.kernel_id, exc)

    async def _take(self, kernel_name: str) -> Any:
        """A pooled kernel manager: a ready one, else the one a refill is restoring right now
        (sooner than a restore of our own, and no VM beyond the pool's), else None."""
        pool = self._pool.get(kernel_name)
        if pool:
            return pool.popleft()
        waiters = self._pool_waiters.setdefault(kernel_name, [])
        if self._pool_starting[kernel_name] > len(waiters):
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            return await fut
        return None

    async def _hand_out(self, kernel_name: str, env: dict[str, str]) -> str | None:
        """Move a pooled kernel into the kernel map for a client; None if none is ready."""
        while True:
            km = await self._take(kernel_name)
            if km is None:
                return None
            if not await km.is_alive():
                self.log.warning("kernel %s: pooled kernel died; discarding it", km.kernel_id)
                asyncio.ensure_future(self._discard(km))
                continue
            try:
                await km.provisioner.adopt(env)
            except Exception as exc:  # noqa: BLE001 - fall back to the next one, or a fresh restore
                self.log.warning("kernel %s: pooled kernel could not take on the request's env: %s",
                                 km.kernel_id, exc)
                asyncio.ensure_future(self._discard(km))
                continue
            km.update_env(env=env)  # restarts restore with the same env
            kid: str = km.kernel_id
            # what MappingKernelManager.start_kernel does for a kernel it started itself
            self._kernels[kid] = km
            self._kernel_connections[kid] = 0
            km.execution_state = "idle"
            km.reason = ""
            km.last_activity = utcnow()
            await self._finish_kernel_start(kid)
            KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).inc()
            if not self._initialized_culler:
                self.initialize_culler()
            return kid

