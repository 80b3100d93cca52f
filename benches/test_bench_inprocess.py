"""In-process call latency (pytest-benchmark): ``make bench`` or
``pytest benches --benchmark-only``.

Each benchmark round runs a batch of ``BATCH`` sequential awaited calls inside one event loop,
so the figure per round divided by ``BATCH`` is the cost of one call. Baselines measured in
the same run:

* ``baseline_direct``: awaiting the handler coroutine directly (the floor for a local call);
* ``baseline_future_hop``: a request and a response each handed over with ``call_soon`` and
  an ``asyncio.Future`` (the floor for any in-loop channel between two registries).

The ratios of the registry rows to these baselines are printed at the end of the run
(``benches/conftest.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from bench_support import BATCH, per_call_us
from cmd_ipc import CommandRegistry, InMemoryChannel

#: Per-call microseconds by row, read by the terminal summary in conftest.py.
RESULTS: dict[str, float] = {}
RATIOS = (("local", "baseline_direct"), ("one_hop", "baseline_future_hop"))


def _add(a: int, b: int) -> int:
    return a + b


async def _add_async(a: int, b: int) -> int:
    return a + b


def test_baseline_direct(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    RESULTS["baseline_direct"] = per_call_us(benchmark, loop, lambda: _add_async(a=1, b=2))


def test_baseline_future_hop(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    def one_call() -> Awaitable[int]:
        fut: asyncio.Future[int] = loop.create_future()

        def serve() -> None:
            loop.call_soon(fut.set_result, _add(a=1, b=2))

        loop.call_soon(serve)
        return fut

    RESULTS["baseline_future_hop"] = per_call_us(benchmark, loop, one_call)


def test_local_execute(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    registry = CommandRegistry("main")

    async def setup() -> None:
        await registry.register_command("calc.add", _add)

    loop.run_until_complete(setup())
    req = {"a": 1, "b": 2}
    RESULTS["local"] = per_call_us(
        benchmark, loop, lambda: registry.execute_command("calc.add", req)
    )
    loop.run_until_complete(registry.close())


def test_one_in_memory_hop(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    main = CommandRegistry("main")
    worker = CommandRegistry("worker", router_channel="main")

    async def setup() -> None:
        to_worker, to_main = InMemoryChannel.pair("worker", "main")
        await main.register_channel(to_worker)
        await worker.register_channel(to_main)
        await worker.register_command("calc.add", _add)

    loop.run_until_complete(setup())
    req = {"a": 1, "b": 2}
    RESULTS["one_hop"] = per_call_us(benchmark, loop, lambda: main.execute_command("calc.add", req))
    assert main.stats()["channels"]["worker"]["sent"] >= BATCH

    async def teardown() -> None:
        await main.close()
        await worker.close()

    loop.run_until_complete(teardown())
