"""A shutdown that meets a restart waits for the whole restart (gateway.kernels.ready_settled).

With a real jupyter_client kernel manager and a local ipykernel: a restart goes through two
pending states, its shutdown's and its start's, each with a ``ready`` future of its own,
the second made in the same loop step as the first is resolved. A DELETE that arrived
during the first phase and waited only for the future it saw went on into jupyter_client's
shutdown with the second still pending, which asks it for its exception: a 500
(``InvalidStateError``), seen in CI for a kernel the auto-restarter was reviving.
"""

from __future__ import annotations

import asyncio

from jupyter_client.manager import AsyncKernelManager

from gateway.kernels import ready_settled


async def restart_caught_in_its_shutdown_phase() -> tuple[AsyncKernelManager, asyncio.Task[None]]:
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    await km.ready
    first = km.ready
    restart = asyncio.ensure_future(km.restart_kernel(now=True))
    while km.ready is first:  # the restart's shutdown phase has begun
        await asyncio.sleep(0.005)
    assert not km.ready.done()
    return km, restart


async def test_waiting_for_the_future_first_seen_is_not_enough() -> None:
    km, restart = await restart_caught_in_its_shutdown_phase()
    try:
        await asyncio.wait([km.ready])  # what the gateway used to do
        assert not km.ready.done()  # the start phase's own future, pending
    finally:
        await restart
        await km.shutdown_kernel(now=True)


async def test_ready_settled_waits_for_the_whole_restart() -> None:
    km, restart = await restart_caught_in_its_shutdown_phase()
    try:
        await ready_settled(km)
        assert km.ready.done() and km.ready.exception() is None
        assert await km.is_alive()
    finally:
        await restart
        await km.shutdown_kernel(now=True)
