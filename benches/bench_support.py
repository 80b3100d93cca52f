"""Shared by the in-process bench modules: one benchmark round is a batch of sequential
awaited calls run to completion on a loop, reported as the median cost of one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

#: Calls per benchmark round.
BATCH = 2000


def per_call_us(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    one_call: Callable[[], Awaitable[Any]],
    batch: int = BATCH,
) -> float:
    """Benchmarks ``batch`` sequential awaits of ``one_call()``; returns µs per call."""

    async def run() -> None:
        for _ in range(batch):
            await one_call()

    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=15, warmup_rounds=2)
    us = float(benchmark.stats.stats.median) / batch * 1e6
    benchmark.extra_info["per_call_us"] = us
    return us
