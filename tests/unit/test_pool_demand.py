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
