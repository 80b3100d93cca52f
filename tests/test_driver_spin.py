"""When the asyncio driver spins for a reply on a native channel (tests/test_uvloop.py has
the rules about what stops a spin): only for a call that is the one waiting on its channel.
A pipelined batch or a pool's queue gets its replies through the reads that take the ones
before (which spin on for the next), and a spin per call would burn CPU the workers need."""

from __future__ import annotations

import asyncio
from typing import Any

from cmd_ipc import CommandRegistry
from helpers import registries

__all__ = ["registries"]


def count_spins(registry: CommandRegistry) -> list[str]:
    """Records the channel of every reply spin the registry's driver schedules."""
    driver = registry._driver
    spins: list[str] = []
    spin = driver._spin_native

    def recorded(channel_id: str) -> None:
        spins.append(channel_id)
        spin(channel_id)

    driver._spin_native = recorded  # type: ignore[method-assign]
    return spins


async def test_a_reply_spin_only_for_the_one_call_waiting_on_its_channel(
    registries: Any,
) -> None:
    main = registries("main")
    await main.spawn_worker("worker-1", "worker_targets:calc")
    await main.spawn_worker("worker-2", "worker_targets:data")
    spins = count_spins(main)
    # Sequential calls: each is alone on its channel, each spins.
    for i in range(10):
        assert await main.execute_command("calc.add", {"a": i, "b": 0}) == i
    assert spins.count("worker-1") == 10
    # A call that stays waiting on worker-2 does not stop worker-1's calls from spinning.
    started = asyncio.Event()
    main.add_event_listener("data.slow.started", lambda _: started.set())
    slow = asyncio.ensure_future(main.execute_command("data.slow", timeout=30))
    await asyncio.wait_for(started.wait(), 10)
    spins.clear()
    for i in range(10):
        assert await main.execute_command("calc.add", {"a": i, "b": 1}) == i + 1
    assert spins.count("worker-1") == 10
    slow.cancel()


async def test_no_reply_spin_for_calls_queued_behind_others(registries: Any) -> None:
    """Four lanes of 5 ms calls to one worker (as execute_many's lanes, or a pool's queue):
    each call is sent while three others wait there, so none but the first is spun for
    (a spin per call would burn 50 µs a call for replies milliseconds away)."""
    main = registries("main")
    await main.spawn_worker("spinner", "cmd_ipc.bench.pool:spin_worker")
    spins = count_spins(main)

    async def lane() -> None:
        for _ in range(10):
            await main.execute_command("pool.spin", {"ms": 5.0})

    await asyncio.gather(*(lane() for _ in range(4)))
    assert spins.count("spinner") <= 4, spins
