"""``Runtime.run`` when its caller is cancelled: work on the runtime loop that then ends in
an exception (e.g. a checkpoint whose VM was stopped under it) ends as cancelled, not as a
"Task exception was never retrieved" error in the log. Pure logic (no VM)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings

import pytest

from kernelmanager.runtime import Runtime


async def test_a_cancelled_callers_work_does_not_log_a_lost_exception(
        caplog: pytest.LogCaptureFixture) -> None:
    rt = Runtime.instance()
    started, ended = threading.Event(), threading.Event()

    async def work() -> None:
        try:
            started.set()
            await asyncio.sleep(30)
        finally:
            ended.set()
            raise RuntimeError("the VM went away while its pages were copied")

    with warnings.catch_warnings():  # what earlier tests left for the collector is not ours
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    caller = asyncio.ensure_future(rt.run(work()))
    assert await asyncio.to_thread(started.wait, 10)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await asyncio.to_thread(ended.wait, 10)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await asyncio.sleep(0.2)
        await asyncio.to_thread(lambda: rt.run_sync(asyncio.sleep(0.05), 10))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()  # a lost task exception is logged when the task is collected
        await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


async def test_errors_still_reach_a_caller_that_waits() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await Runtime.instance().run(fail())
