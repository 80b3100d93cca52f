"""One channel conformance suite, run against every channel kind between two registries of
this process: in-memory (``InMemoryChannel.pair``), ``"pipe"`` and ``"shm"``
(``NativeChannel.pair``, both ends registered here).

Whatever carries the frames, a registry must behave the same: calls both ways with the same
results and error codes, concurrent calls answered right, events delivered once, registration
escalated, closes failing what is in flight and seen by the peer.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    DuplicateCommandError,
    InMemoryChannel,
    InternalError,
    InvalidRequestError,
    NativeChannel,
    NotFoundError,
)
from helpers import eventually, registries, settle

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]
KINDS = ["memory", "pipe", "shm"]


@dataclass
class Pair:
    kind: str
    main: CommandRegistry
    worker: CommandRegistry
    #: ``connect(parent, child)``: joins two more registries with a channel of this kind.
    connect: Callable[[CommandRegistry, CommandRegistry], Awaitable[None]]


def connector(kind: str) -> Callable[[CommandRegistry, CommandRegistry], Awaitable[None]]:
    async def connect(parent: CommandRegistry, child: CommandRegistry) -> None:
        ends: tuple[Any, Any]
        if kind == "memory":
            ends = InMemoryChannel.pair(child.id, parent.id)
        else:
            ends = NativeChannel.pair(child.id, parent.id, transport=kind)  # type: ignore[arg-type]
        await parent.register_channel(ends[0])
        await child.register_channel(ends[1])

    return connect


@pytest.fixture(params=KINDS)
async def pair(request: pytest.FixtureRequest, registries: Make) -> AsyncIterator[Pair]:
    kind = request.param
    main = registries("main")
    worker = registries("worker", router_channel="main")
    connect = connector(kind)
    await connect(main, worker)
    yield Pair(kind, main, worker, connect)


def ids(reg: CommandRegistry) -> list[str]:
    return [c["id"] for c in reg.list_commands()]


def stuck() -> tuple[Callable[..., Awaitable[str]], list[int]]:
    """An async handler that never answers; the list counts how many runs started."""
    runs: list[int] = []

    async def handler(**_: Any) -> str:
        runs.append(1)
        await asyncio.Event().wait()
        return "never"

    return handler, runs


# ---------------------------------------------------------------------------- calls


async def test_calls_both_ways(pair: Pair) -> None:
    main, worker = pair.main, pair.worker
    await worker.register_command("calc.add", lambda a, b: a + b)
    await main.register_command("app.greet", lambda name: f"hello, {name}")

    async def fail() -> None:
        raise ValueError("bad things")

    await worker.register_command("calc.fail", fail)
    await main.register_command("app.fail", fail)

    assert await main.execute_command("calc.add", {"a": 2, "b": 3}) == 5
    assert await worker.execute_command("app.greet", {"name": "w"}) == "hello, w"
    # Values survive the trip, bytes included.
    value = {
        "n": None,
        "t": True,
        "f": 1.5,
        "i": -(2**40),
        "s": "é😀",
        "l": [1, [2]],
        "b": b"\0\xff",
    }
    await worker.register_command("calc.echo", lambda v: v)
    await main.register_command("app.echo", lambda v: v)
    assert await main.execute_command("calc.echo", {"v": value}) == value
    assert await worker.execute_command("app.echo", {"v": value}) == value
    # Error codes cross the channel unchanged, both ways.
    for caller, prefix in ((main, "calc"), (worker, "app")):
        with pytest.raises(InternalError) as info:
            await caller.execute_command(f"{prefix}.fail")
        assert "bad things" in info.value.message
        with pytest.raises(InvalidRequestError):
            await caller.execute_command(f"{prefix}.echo", {"nope": 1})
    with pytest.raises(NotFoundError):
        await worker.execute_command("nobody.has.this")  # climbs to main, comes back
    with pytest.raises(NotFoundError):
        await main.execute_command("nobody.has.this")
    s = main.stats()
    assert s["pending"] == 0 and s["dropped"] == 0
    assert s["channels"]["worker"]["sent"] > 0 and s["channels"]["worker"]["received"] > 0


async def test_many_concurrent_calls_are_answered_in_order(pair: Pair) -> None:
    main, worker = pair.main, pair.worker
    arrived: dict[str, list[int]] = {"main": [], "worker": []}

    def recorder(where: str) -> Callable[[int], dict[str, int]]:
        def handle(i: int) -> dict[str, int]:
            arrived[where].append(i)
            return {"i": i, "sq": i * i}

        return handle

    async def slow_echo(i: int) -> int:
        for _ in range(i % 5):
            await asyncio.sleep(0)
        return i

    await worker.register_command("calc.sq", recorder("worker"))
    await main.register_command("app.sq", recorder("main"))
    await worker.register_command("calc.slow", slow_echo)
    n = 500
    down = [main.execute_command("calc.sq", {"i": i}) for i in range(n)]
    up = [worker.execute_command("app.sq", {"i": i}) for i in range(n)]
    mixed = [main.execute_command("calc.slow", {"i": i}) for i in range(n)]
    results = await asyncio.wait_for(asyncio.gather(*down, *up, *mixed), 30)
    assert results[:n] == [{"i": i, "sq": i * i} for i in range(n)]
    assert results[n : 2 * n] == [{"i": i, "sq": i * i} for i in range(n)]
    assert results[2 * n :] == list(range(n))
    # One channel is one ordered stream: requests ran in the order they were sent.
    assert arrived["worker"] == list(range(n))
    assert arrived["main"] == list(range(n))
    assert main.stats()["pending"] == 0 and worker.stats()["pending"] == 0


# ---------------------------------------------------------------------------- events


async def test_events_both_ways_exactly_once(pair: Pair) -> None:
    main, worker = pair.main, pair.worker
    got: dict[str, list[Any]] = {"main": [], "worker": []}
    main.add_event_listener("tick", got["main"].append)
    worker.add_event_listener("tick", got["worker"].append)
    n = 50
    for i in range(n):
        main.emit_event("tick", {"from": "main", "i": i})
        worker.emit_event("tick", {"from": "worker", "i": i})
    main.emit_event("tick", b"\x01bytes")
    await eventually(lambda: all(len(v) >= 2 * n + 1 for v in got.values()), timeout=10)
    # A round trip each way: anything still in the channel has been delivered after it.
    await main.register_command("app.noop", lambda: None)
    await worker.register_command("calc.noop", lambda: None)
    await worker.execute_command("app.noop")
    await main.execute_command("calc.noop")
    await settle()
    for where, events in got.items():
        assert len(events) == 2 * n + 1, (where, len(events))
        for src in ("main", "worker"):
            # Each event once, and in the order its registry emitted them.
            assert [e["i"] for e in events if isinstance(e, dict) and e["from"] == src] == list(
                range(n)
            ), where
        assert events.count(b"\x01bytes") == 1
    # A private event stays where it was emitted.
    main.emit_event("_private", 1)
    worker.add_event_listener("_private", got["worker"].append)
    await worker.execute_command("app.noop")
    await settle()
    assert 1 not in got["worker"]


# ---------------------------------------------------------------------------- registration


async def test_registration_escalates_over_the_channel(pair: Pair, registries: Make) -> None:
    main, worker = pair.main, pair.worker
    schema = {"request": {"type": "object"}, "response": {"type": "number"}}
    await worker.register_command("calc.mul", lambda a, b: a * b, "Multiplies", schema)
    # Acknowledged by the root: the route is known on both sides.
    assert {"id": "calc.mul", "description": "Multiplies", "schema": schema} in main.list_commands()
    assert main.route_of("calc.mul") == "worker"
    assert worker.route_of("calc.mul") == "local"
    assert await main.execute_command("calc.mul", {"a": 6, "b": 7}) == 42

    # A second owner elsewhere in the tree is rejected; the same channel may register again.
    await main.register_command("app.only", lambda: "main's")
    with pytest.raises(DuplicateCommandError):
        await worker.register_command("app.only", lambda: "worker's")
    assert main.route_of("app.only") == "local"
    assert await worker.execute_command("app.only") == "main's"
    with pytest.raises(DuplicateCommandError):  # a second local handler
        await worker.register_command("calc.mul", lambda a, b: 0)
    # Registered again from the same channel (as a restarted worker does): accepted.
    assert worker.unregister_command("calc.mul")
    await worker.register_command("calc.mul", lambda a, b: -a * b)
    assert main.route_of("calc.mul") == "worker"
    assert await main.execute_command("calc.mul", {"a": 6, "b": 7}) == -42

    # Private commands are never escalated.
    await worker.register_command("_calc.secret", lambda: "s")
    assert "_calc.secret" not in ids(main)
    assert await worker.execute_command("_calc.secret") == "s"
    with pytest.raises(NotFoundError):
        await main.execute_command("_calc.secret")

    # Three levels over this kind: a leaf's commands (declared before its channel existed)
    # reach the root; its calls climb to the root.
    leaf = registries("leaf", router_channel="worker")

    @leaf.command("leaf.hi", description="from the leaf")
    def hi() -> str:
        return "hi from leaf"

    await pair.connect(worker, leaf)
    await leaf.ready()
    assert main.route_of("leaf.hi") == "worker" and worker.route_of("leaf.hi") == "leaf"
    assert await main.execute_command("leaf.hi") == "hi from leaf"
    assert await leaf.execute_command("app.only") == "main's"
    assert await leaf.execute_command("calc.mul", {"a": 2, "b": 2}) == -4
    with pytest.raises(DuplicateCommandError):
        await leaf.register_command("calc.mul", lambda a, b: 0)


# ---------------------------------------------------------------------------- close


@pytest.mark.parametrize("closer", ["main", "worker"])
async def test_close_fails_calls_in_flight(
    pair: Pair, closer: str, caplog: pytest.LogCaptureFixture
) -> None:
    main, worker = pair.main, pair.worker
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    down_handler, down_runs = stuck()
    up_handler, up_runs = stuck()
    await worker.register_command("calc.stuck", down_handler)
    await main.register_command("app.stuck", up_handler)
    n = 50
    calls = [asyncio.ensure_future(main.execute_command("calc.stuck")) for _ in range(n)]
    calls += [asyncio.ensure_future(worker.execute_command("app.stuck")) for _ in range(n)]
    await eventually(lambda: len(down_runs) == n and len(up_runs) == n, timeout=10)
    assert not any(c.done() for c in calls)

    if closer == "main":
        await main.close_channel("worker")
    else:
        await worker.close_channel("main")
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert len(results) == 2 * n
    assert all(isinstance(r, ChannelDisconnectedError) for r in results), results
    assert main.stats()["pending"] == 0 and worker.stats()["pending"] == 0

    del calls, results
    gc.collect()
    await settle()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [c for c in loop_errors if "never retrieved" in str(c.get("message"))], loop_errors


@pytest.mark.parametrize("closer", ["main", "worker", "main-registry", "worker-registry"])
async def test_peer_sees_the_close(pair: Pair, closer: str) -> None:
    main, worker = pair.main, pair.worker
    await worker.register_command("calc.add", lambda a, b: a + b)
    await main.register_command("app.greet", lambda: "hi")
    assert "calc.add" in ids(main)

    if closer == "main":
        await main.close_channel("worker")
    elif closer == "worker":
        await worker.close_channel("main")
    elif closer == "main-registry":
        await main.close()
    else:
        await worker.close()

    # Both ends detach: the router channel is gone from the worker, the worker from main.
    await eventually(lambda: "main" not in worker.channels, timeout=5)
    await eventually(lambda: "worker" not in main.channels, timeout=5)
    if not main.closed:
        # The worker's commands are dropped from the root.
        assert "calc.add" not in ids(main)
        assert main.route_of("calc.add") is None
        with pytest.raises(NotFoundError):
            await main.execute_command("calc.add", {"a": 1, "b": 2})
        assert await main.execute_command("app.greet") == "hi"
    if not worker.closed:
        # Without its router, the worker's calls up fail as disconnected; its own still work.
        with pytest.raises(ChannelDisconnectedError):
            await worker.execute_command("app.greet")
        assert await worker.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    assert pair.kind in KINDS
