"""Pool scaling (pytest-benchmark): a CPU-bound command (about 1 ms of pure-Python work per
call) served by a pool of 2 members vs 1, measured in the same run; the ratio of the two
throughputs is printed (target on this 2-CPU machine: >= 1.8x). ``cmd-ipc bench`` reports
the same row (``pool scaling``)."""

from __future__ import annotations

from typing import Any

import pytest
from cmd_ipc import CommandRegistry

CALLS = 400
REQUEST = {"ms": 1.0}
THROUGHPUT: dict[int, float] = {}


@pytest.fixture(scope="module")
def registry() -> Any:
    with CommandRegistry("bench-pool") as r:
        yield r


@pytest.mark.parametrize("size", [1, 2])
def test_pool_throughput(benchmark: Any, registry: CommandRegistry, size: int) -> None:
    pool = registry.spawn_pool_sync(f"p{size}", "cmd_ipc.bench.pool:spin_worker", size=size)
    try:
        batch = [REQUEST] * CALLS
        registry.execute_many_sync("pool.spin", batch[: 4 * size])
        benchmark.pedantic(
            lambda: registry.execute_many_sync("pool.spin", batch, window=2 * size),
            rounds=3,
            warmup_rounds=1,
        )
        THROUGHPUT[size] = CALLS / float(benchmark.stats.stats.median)
        benchmark.extra_info["calls_per_s"] = THROUGHPUT[size]
        if size == 2 and 1 in THROUGHPUT:
            ratio = THROUGHPUT[2] / THROUGHPUT[1]
            benchmark.extra_info["scaling_vs_1"] = ratio
            print(f"\npool scaling: 2 members {ratio:.2f}x 1 member (target >= 1.8x)")
    finally:
        registry.run_blocking(pool.stop)
