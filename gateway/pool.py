"""The warm pool: kernels restored and warmed ahead of time, handed to ``POST /api/kernels``.

``VMMappingKernelManager.pool_size`` kernels per kernelspec (``pool_sizes`` per name) are
restored from their template, *warmed* - kernel_info, the ``pool_warmup_code`` cell run
twice, then ``get_ipython().reset(new_session=True)``, so under TCG the execute, display
and history paths are already translated when a client comes, and no trace is left - and
kept outside the kernel map, invisible to the REST API.

Who calls what: the kernel manager owns one :class:`WarmPool`. Its ``start_kernel`` calls
:meth:`WarmPool.note_request` and :meth:`WarmPool.take` (a live pooled kernel that has
taken on the request's environment, or None: restore one instead), then puts the kernel
into its map; after every start and at gateway start :meth:`WarmPool.refill` tops the
pool up in the background, one restore at a time, after ``pool_refill_delay`` seconds
without start requests (a burst of clients gets the CPU first). A request that finds the
pool empty while a refill is restoring its kernelspec waits for that kernel rather than
restoring a second one. Pool kernels only fill spare room: with ``max_kernels`` set, the
pool never makes the total of client kernels, starts in flight and pooled kernels exceed
it. A failed restore is retried with exponential backoff (up to a minute).
:meth:`WarmPool.close` (gateway shutdown) stops refilling and shuts pooled kernels down.

Growing with demand: the pool's target for a kernelspec is its ``pool_size``, raised to
the largest burst of start requests seen within ``BURST_WINDOW`` seconds over the last
``DEMAND_MEMORY`` seconds, capped at ``pool_max`` (a burst of 8 back-to-back creates
makes the next burst find 8 pooled kernels). When demand falls away the target falls
back and surplus pooled kernels are shut down. Each pooled kernel holds what an idle
restored kernel holds (about 85 MB private memory of its QEMU under TCG), so the default
ceiling of 8 costs about 0.7 GB when full. While the pool is *empty* and requests come
repeatedly (demand above 1), a refill does not wait for ``pool_refill_delay`` (only for
starts in flight), and warms its kernel lightly (kernel_info only): under sustained
creates the next request then finds (or waits for) a kernel already being restored,
instead of restoring one of its own, and does not wait for warm-up cells run for it.

Warming (``_warm``): besides ``pool_warmup_code`` on shell, the iopub channel is
subscribed and ``IOPUB_WARMUP`` is run (print, display, a result, a pandas describe()
and a matplotlib PNG where the template has them), so the paths a client's first cells
take have run once in this VM - under TCG, translated - before the kernel is handed out.
``IOPUB_WARMUP`` runs first and ``pool_warmup_code`` after it: TCG flushes its whole
translation cache when it fills (``$VMKG_TCG_TB_MB``), and the heavy cells can fill it, so
the light execute path a client's first cell takes is translated last.

What the pool needs from its owner is :class:`PoolOwner`; nothing else of the kernel
manager is touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any, Protocol

from .internals import cache_kernel_info


class PoolOwner(Protocol):
    """The kernel manager as the warm pool sees it (``gateway.kernels.VMMappingKernelManager``)."""

    log: logging.Logger | logging.LoggerAdapter[Any]
    max_kernels: int | None
    pool_refill_delay: float
    pool_warmup_code: str
    pool_max: int

    def pool_target(self, kernel_name: str) -> int:
        """How many kernels of this kernelspec the pool should hold."""

    def kernelspec_names(self) -> Iterable[str]:
        """Every kernelspec served."""

    def client_kernel_count(self) -> int:
        """Kernels clients hold plus starts in flight (what max_kernels bounds)."""

    def starts_in_flight(self) -> int:
        """Client start requests not finished yet (the pool waits for them)."""

    async def start_unlisted_kernel(self, kernel_name: str) -> Any:
        """Start a kernel manager outside the kernel map; returns it once it runs."""


#: seconds each warming step may take: no client waits for a pooled kernel, and on a
#: loaded TCG host a fresh restore's first cells take minutes (30 s failed every warm-up
#: there, so the pool never filled)
WARM_TIMEOUT = 300.0
#: seconds within which start requests count as one burst (the pool's demand)
BURST_WINDOW = 10.0
#: seconds a burst keeps the pool's target raised
DEMAND_MEMORY = 600.0
#: what a client's first cells do, run once more (iopub subscribed) while warming: print,
#: display, a result, and - where the template has them - a pandas describe() and a
#: matplotlib PNG. A restored VM starts with an empty TCG translation cache (it is QEMU's
#: memory, not the guest's, so no snapshot carries it): this translates those paths in
#: the pooled VM before a client comes. What the cell binds goes with the reset after it.
IOPUB_WARMUP = """\
print('warm')
from IPython.display import display as _d
_d('warm')
try:
    import pandas as _pd
    _pd.DataFrame({'a': range(1000)}).describe().shape
except ImportError:
    pass
try:
    import io as _io
    import matplotlib.pyplot as _plt
    _f, _a = _plt.subplots(); _a.plot([1, 3, 2]); _f.savefig(_io.BytesIO(), format='png'); _plt.close('all')
except ImportError:
    pass
1+1
"""


class WarmPool:
    """Pooled kernel managers by kernelspec name; see the module docstring."""

    def __init__(self, owner: PoolOwner) -> None:
        self.owner = owner
        self._pool: dict[str, deque[Any]] = {}
        self._pool_starting: Counter[str] = Counter()
        self._pool_waiters: dict[str, list[asyncio.Future[Any]]] = {}
        self._refill_task: asyncio.Task[None] | None = None
        self._last_request = 0.0
        self._closing = False
        self._requests: deque[float] = deque(maxlen=1000)  # start request times, for demand

    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        return self.owner.log

    def pooled(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._pool.items()}

    def pooled_managers(self) -> list[Any]:
        return [km for q in self._pool.values() for km in q]

    def starting(self) -> int:
        """Pool restores in progress."""
        return sum(self._pool_starting.values())

    def note_request(self) -> None:
        """A client asked for a kernel: refills wait ``pool_refill_delay`` from now."""
        self._last_request = time.monotonic()
        self._requests.append(self._last_request)

    def demand(self, now: float | None = None) -> int:
        """The largest number of start requests within ``BURST_WINDOW`` seconds over the
        last ``DEMAND_MEMORY`` seconds."""
        now = time.monotonic() if now is None else now
        while self._requests and self._requests[0] < now - DEMAND_MEMORY:
            self._requests.popleft()
        times = list(self._requests)
        best = lo = 0
        for hi, t in enumerate(times):
            while t - times[lo] > BURST_WINDOW:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def target(self, kernel_name: str) -> int:
        """How many kernels of ``kernel_name`` to keep pooled: ``pool_size``, raised to the
        demand, capped at ``pool_max`` (never below ``pool_size``; 0 stays 0)."""
        base = self.owner.pool_target(kernel_name)
        if base <= 0:
            return 0
        return max(base, min(self.demand(), self.owner.pool_max))

    def refill(self) -> None:
        """Bring every kernelspec's pool up to its target, one restore at a time, in the
        background. Called at gateway start and after every hand-out."""
        if self._closing or (self._refill_task is not None and not self._refill_task.done()):
            return
        self._refill_task = asyncio.ensure_future(self._refill())

    def _next_to_fill(self) -> str | None:
        if not self._room():
            return None
        for name in self.owner.kernelspec_names():
            if len(self._pool.get(name, ())) < self.target(name):
                return name
        return None

    async def _trim(self) -> None:
        """Shut down pooled kernels beyond the (fallen) target, newest first."""
        for name, q in self._pool.items():
            while len(q) > self.target(name):
                km = q.pop()
                self.log.info("pool %s: demand fell; kernel %s leaves the pool", name, km.kernel_id)
                await self._discard(km)

    def _wanted_now(self) -> bool:
        """The pool is empty under repeated requests: the kernel a refill makes is wanted
        as soon as it exists."""
        return not any(self._pool.values()) and self.demand() > 1

    async def _refill(self) -> None:
        failures = 0
        while not self._closing:
            quiet = self._last_request + self.owner.pool_refill_delay - time.monotonic()
            if self._wanted_now():
                quiet = 0.0  # the next request would restore its own
            if quiet > 0 or self.owner.starts_in_flight():
                await asyncio.sleep(max(quiet, 0.05))
                continue
            await self._trim()
            name = self._next_to_fill()
            if name is None:
                if any(len(q) > self.owner.pool_target(n) for n, q in self._pool.items()):
                    # raised by demand: look again when that demand is forgotten
                    asyncio.get_running_loop().call_later(DEMAND_MEMORY + 1, self.refill)
                return
            # wanted now: handed out after kernel_info alone (the heavy warm-up cells would
            # double its making)
            hurry = self._wanted_now()
            self._pool_starting[name] += 1
            try:
                km = await self._start_pooled(name, light=hurry)
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
            if not self._room():
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

    async def _start_pooled(self, kernel_name: str, light: bool = False) -> Any:
        km = await self.owner.start_unlisted_kernel(kernel_name)
        try:
            await self._warm(km, light=light)
        except BaseException:
            await self._discard(km)
            raise
        return km

    async def _warm(self, km: Any, light: bool = False) -> None:
        """Run the paths a client's first requests take once, so they are warm when it comes
        (under TCG a restored VM starts with an empty translation cache). ``light``: only
        kernel_info, for a kernel a client will take at once (its first cell pays the
        translation, ~0.2 s under TCG, instead of waiting ~1.5 s for the warm-up cells)."""
        kc = km.client()
        kc.start_channels(iopub=True, stdin=False, hb=False, control=False)
        try:
            info = await kc.kernel_info(reply=True, timeout=WARM_TIMEOUT)
            if self.owner.pool_warmup_code and not light:
                # the heavy cells first: their code can overflow TCG's translation cache,
                # which is then flushed whole; the light cells after them translate the
                # execute path again, last, so a client's first cell finds it translated
                await kc.execute(IOPUB_WARMUP, reply=True, timeout=WARM_TIMEOUT)
                for _ in range(2):
                    await kc.execute(self.owner.pool_warmup_code, reply=True, timeout=WARM_TIMEOUT)
                await self._drain_iopub(kc)
                reply = await kc.execute("get_ipython().reset(new_session=True)", silent=True,
                                         store_history=False, reply=True, timeout=WARM_TIMEOUT)
                if reply["content"]["status"] != "ok":
                    raise RuntimeError(f"warm-up reset failed: {reply['content'].get('evalue')}")
                # and kernel_info once more, last, for the same reason: a client's first
                # request is one (jupyter_client's wait_for_ready gives it 1 s before it asks
                # the kernel manager whether the kernel lives, which jupyter_server's gateway
                # kernel manager cannot answer: nbclient through --gateway-url failed)
                info = await kc.kernel_info(reply=True, timeout=WARM_TIMEOUT)
        finally:
            kc.stop_channels()
        cache_kernel_info(km, info["content"])  # the first websocket asks for it

    @staticmethod
    async def _drain_iopub(kc: Any, quiet: float = 0.05, limit: int = 1000) -> None:
        """Read what the warm-up published on iopub (until a short silence; bounded)."""
        for _ in range(limit):
            try:
                await kc.get_iopub_msg(timeout=quiet)
            except Exception:  # noqa: BLE001 - queue.Empty: nothing more
                return

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

    async def take(self, kernel_name: str, env: dict[str, str]) -> Any:
        """A pooled kernel manager, alive and with ``env`` applied in its guest (and kept for
        restarts), for a client; None if none is ready (the caller restores one). The
        caller puts it into the kernel map."""
        while True:
            km = await self._take(kernel_name)
            if km is None:
                return None
            if not await km.is_alive():
                self.log.warning("kernel %s: pooled kernel died; discarding it", km.kernel_id)
                asyncio.ensure_future(self._discard(km))
                continue
            try:
                await km.provisioner.handle.apply_env(env)
            except Exception as exc:  # noqa: BLE001 - fall back to the next one, or a fresh restore
                self.log.warning("kernel %s: pooled kernel could not take on the request's env: %s",
                                 km.kernel_id, exc)
                asyncio.ensure_future(self._discard(km))
                continue
            km.update_env(env=env)  # restarts restore with the same env
            return km

    async def close(self) -> None:
        """Stop refilling, release waiting requests, shut every pooled kernel down."""
        self._closing = True
        if self._refill_task is not None and not self._refill_task.done():
            self._refill_task.cancel()
            try:
                await self._refill_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for name in list(self._pool_waiters):
            self._release_waiters(name, None)
        pooled = self.pooled_managers()
        self._pool.clear()
        await asyncio.gather(*(self._discard(km) for km in pooled))

    def _room(self) -> bool:
        """Whether one more VM fits under max_kernels (client kernels, starts, pooled)."""
        limit = self.owner.max_kernels
        return limit is None or self.owner.client_kernel_count() + sum(self.pooled().values()) < limit
