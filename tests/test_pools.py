"""Pools: several workers serving the same commands, chosen per call by the router.

Real worker processes (``tests/worker_targets.py:pooled``); every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from typing import Any

import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    NotFoundError,
    Pool,
    RestartPolicy,
    WorkerError,
)
from cmd_ipc.channels.native import Transport
from helpers import eventually, registries

__all__ = ["registries"]

TRANSPORTS: list[Transport] = ["shm", "pipe"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_calls_spread_over_the_members(registries: Any, transport: Transport) -> None:
    root: CommandRegistry = registries("main")
    pool = await root.spawn_pool("p", "worker_targets:pooled", size=2, transport=transport)
    assert isinstance(pool, Pool) and pool.size == 2
    assert [w.id for w in pool.workers] == ["p-1", "p-2"]
    assert root.pools == {"p": pool}
    served = collections.Counter([await root.execute_command("pool.whoami") for _ in range(20)])
    assert served == {"p-1": 10, "p-2": 10}  # equal load: they take turns
    # Concurrent calls go to the member with the fewest in flight.
    results = await asyncio.gather(
        *(root.execute_command("pool.add", {"a": i, "b": 1}) for i in range(40))
    )
    assert [r[0] for r in results] == [i + 1 for i in range(40)]
    assert {r[1] for r in results} == {"p-1", "p-2"}
    channels = root.stats()["channels"]
    assert channels["p-1"]["requests"] >= 30 and channels["p-2"]["requests"] >= 30
    assert channels["p-1"]["in_flight"] == channels["p-2"]["in_flight"] == 0
    # The command is registered once: one entry in the list.
    assert [c["id"] for c in root.list_commands()].count("pool.add") == 1


def test_blocking_calls_and_batches_spread_over_the_members() -> None:
    with CommandRegistry("main") as root:
        root.spawn_pool_sync("p", "worker_targets:pooled", size=2)
        # route_of names the member the next call goes to, without moving on.
        nexts = [root.route_of("pool.whoami") for _ in range(2)]
        assert nexts[0] == nexts[1] and nexts[0] in ("p-1", "p-2")
        assert root.execute_command_sync("pool.whoami") == nexts[0]
        assert root.route_of("pool.whoami") not in (None, nexts[0])
        got = [root.execute_command_sync("pool.whoami") for _ in range(10)]
        assert collections.Counter(got) == {"p-1": 5, "p-2": 5}
        many = root.execute_many_sync("pool.add", [{"a": i, "b": i} for i in range(200)])
        assert [m[0] for m in many] == [2 * i for i in range(200)]
        assert {m[1] for m in many} == {"p-1", "p-2"}


async def test_an_outsider_cannot_register_a_pool_command(registries: Any) -> None:
    root: CommandRegistry = registries("main")
    await root.spawn_pool("p", "worker_targets:pooled", size=1)
    with pytest.raises(WorkerError, match=r"duplicate_command|already"):
        await root.spawn_worker("solo", "worker_targets:pooled", ready_timeout=20)
    # A second pool of the same commands is an outsider too.
    with pytest.raises(WorkerError):
        await root.spawn_pool("q", "worker_targets:pooled", size=1)
    assert "q" not in root.pools
    assert await root.execute_command("pool.whoami") == "p-1"


async def test_a_dead_member_fails_only_its_calls_and_rejoins(registries: Any) -> None:
    root: CommandRegistry = registries("main")
    policy = RestartPolicy(max_restarts=3, backoff=0.05)
    pool = await root.spawn_pool("p", "worker_targets:pooled", size=2, restart=policy)
    started: list[str] = []
    root.add_event_listener("pool.slow.started", started.append)
    slow = [asyncio.ensure_future(root.execute_command("pool.slow", timeout=30)) for _ in range(4)]
    await eventually(lambda: len(started) == 4, timeout=10)
    assert collections.Counter(started) == {"p-1": 2, "p-2": 2}
    victim = pool.workers[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    await eventually(lambda: sum(t.done() for t in slow) == 2, timeout=10)
    failed = [t for t in slow if t.done()]
    assert all(isinstance(t.exception(), ChannelDisconnectedError) for t in failed)
    # The other member still serves (and still holds its two calls).
    assert await root.execute_command("pool.whoami") == "p-2"
    assert sum(not t.done() for t in slow) == 2
    # The dead member comes back and takes calls again.
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while seen != {"p-1", "p-2"} and loop.time() < deadline:
        seen.add(await root.execute_command("pool.whoami"))
    assert seen == {"p-1", "p-2"}
    for t in slow:
        t.cancel()
    await asyncio.gather(*slow, return_exceptions=True)


async def test_resize_and_stop(registries: Any) -> None:
    root: CommandRegistry = registries("main")
    pool = await root.spawn_pool("p", "worker_targets:pooled", size=1)
    await pool.resize(3)
    assert [w.id for w in pool.workers] == ["p-1", "p-2", "p-3"]
    served = {await root.execute_command("pool.whoami") for _ in range(6)}
    assert served == {"p-1", "p-2", "p-3"}
    await pool.resize(1)
    assert [w.id for w in pool.workers] == ["p-1"]
    assert {await root.execute_command("pool.whoami") for _ in range(4)} == {"p-1"}
    with pytest.raises(ValueError):
        await pool.resize(0)
    await pool.stop()
    assert root.pools == {} and pool.size == 0
    with pytest.raises(NotFoundError):
        await root.execute_command("pool.whoami")
    with pytest.raises(WorkerError):
        await pool.resize(2)


async def test_default_size_is_the_cpu_count(registries: Any) -> None:
    root: CommandRegistry = registries("main")
    pool = await root.spawn_pool("p", "worker_targets:pooled")
    assert pool.size == (os.cpu_count() or 1)
