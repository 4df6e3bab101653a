"""The warm pool's demand-driven target (gateway.pool): raised to the largest burst of
start requests, capped at pool_max, never below pool_size, forgotten after a while."""

from __future__ import annotations

import logging
from typing import Any

from gateway import pool as pool_mod
from gateway.pool import WarmPool


class Owner:
    log = logging.getLogger("test")
    max_kernels = None
    pool_refill_delay = 1.0
    pool_warmup_code = "1+1"

    def __init__(self, size: int, ceiling: int) -> None:
        self.size, self.pool_max = size, ceiling

    def pool_target(self, kernel_name: str) -> int:
        return self.size

    def kernelspec_names(self) -> list[str]:
        return ["k"]

    def client_kernel_count(self) -> int:
        return 0

    def starts_in_flight(self) -> int:
        return 0

    async def start_unlisted_kernel(self, kernel_name: str) -> Any:
        raise AssertionError("not started here")


def test_target_follows_the_largest_burst_up_to_the_ceiling(monkeypatch: Any) -> None:
    now = [1000.0]
    monkeypatch.setattr(pool_mod.time, "monotonic", lambda: now[0])
    p = WarmPool(Owner(size=1, ceiling=8))
    assert p.target("k") == 1
    for _ in range(5):  # a burst of 5, then single requests a minute apart
        p.note_request()
        now[0] += 0.5
    for _ in range(3):
        now[0] += 60
        p.note_request()
    assert p.demand() == 5 and p.target("k") == 5
    for _ in range(20):
        p.note_request()
    assert p.target("k") == 8  # capped at pool_max
    now[0] += pool_mod.DEMAND_MEMORY + 1
    assert p.demand() == 0 and p.target("k") == 1  # forgotten: back to pool_size


def test_pool_size_zero_stays_off_and_pool_size_is_a_floor(monkeypatch: Any) -> None:
    off = WarmPool(Owner(size=0, ceiling=8))
    big = WarmPool(Owner(size=10, ceiling=8))
    for p in (off, big):
        for _ in range(4):
            p.note_request()
    assert off.target("k") == 0
    assert big.target("k") == 10


class Client:
    """What the pool's warming asks of a kernel client, recorded."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def start_channels(self, **kwargs: Any) -> None:
        pass

    def stop_channels(self) -> None:
        pass

    async def kernel_info(self, reply: bool, timeout: float) -> dict[str, Any]:
        self.calls.append("kernel_info")
        return {"content": {"status": "ok", "implementation": "ipython"}}

    async def execute(self, code: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(code)
        return {"content": {"status": "ok"}}

    async def get_iopub_msg(self, timeout: float) -> Any:
        raise TimeoutError


class Manager:
    def __init__(self, n: int) -> None:
        self.kernel_id, self.calls = f"k{n}", []  # type: list[str]

    def client(self) -> Client:
        return Client(self.calls)


async def test_warming_in_full_and_lightly() -> None:
    p = WarmPool(Owner(size=1, ceiling=8))
    full, light = Manager(0), Manager(1)
    await p._warm(full)
    await p._warm(light, light=True)
    assert full.calls[0] == "kernel_info" and full.calls[1] == pool_mod.IOPUB_WARMUP
    assert full.calls.count("1+1") == 2 and full.calls[-1] == "kernel_info"
    assert any("reset(new_session=True)" in c for c in full.calls)
    assert light.calls == ["kernel_info"]
    assert light._kernel_info_future.result()["implementation"] == "ipython"  # type: ignore[attr-defined]


async def test_an_empty_pool_under_repeated_requests_refills_lightly_first() -> None:
    """Requests keep coming and the pool is empty: the kernel being made is wanted now, so
    it skips the warm-up cells; once one is pooled again, refills warm in full."""
    made: list[Manager] = []

    class Starting(Owner):
        pool_refill_delay = 0.2

        async def start_unlisted_kernel(self, kernel_name: str) -> Any:
            made.append(Manager(len(made)))
            return made[-1]

    p = WarmPool(Starting(size=1, ceiling=8))
    for _ in range(3):
        p.note_request()
    await p._refill()  # fills up to the demand (3), then returns
    assert [m.calls == ["kernel_info"] for m in made] == [True, False, False]
    assert p.pooled() == {"k": 3}
