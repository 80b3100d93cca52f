"""Plain sync handlers behind a native channel are called straight from the read loop; every
unusual outcome still ends exactly as on the Python path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cmd_ipc import (
    CommandRegistry,
    InternalError,
    InvalidRequestError,
    NativeChannel,
    NotFoundError,
)


@pytest.fixture(params=["shm", "pipe"])
async def pair(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[CommandRegistry, CommandRegistry]]:
    root = CommandRegistry("main", request_ttl=5.0)
    worker = CommandRegistry("worker", router_channel="main", request_ttl=5.0)
    a, b = NativeChannel.pair("worker", "main", transport=request.param)
    await root.register_channel(a)
    await worker.register_channel(b)
    try:
        yield root, worker
    finally:
        await root.close()
        await worker.close()


async def test_plain_handler_is_dispatched_without_the_python_action_loop(
    pair: tuple[CommandRegistry, CommandRegistry],
) -> None:
    root, worker = pair
    await worker.register_command("calc.add", lambda a, b: a + b)
    runs: list[Any] = []
    original = worker._dispatch.run

    def spy(*args: Any) -> None:
        runs.append(args)
        original(*args)

    worker._dispatch.run = spy  # type: ignore[method-assign]
    assert await root.execute_command("calc.add", {"a": 2, "b": 3}) == 5
    assert await root.execute_command("calc.add", {"a": b"x", "b": b"y"}) == b"xy"
    assert runs == []


async def test_fast_path_outcomes_match_the_python_path(
    pair: tuple[CommandRegistry, CommandRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    root, worker = pair

    def boom() -> None:
        raise ValueError("broken")

    def lazy() -> Any:
        async def later() -> int:
            await asyncio.sleep(0)
            return 7

        return later()

    def unserialisable() -> object:
        return object()

    def missing(a: int) -> int:
        return a

    def nothing() -> None:
        return None

    for cid, fn in [
        ("t.boom", boom),
        ("t.lazy", lazy),
        ("t.obj", unserialisable),
        ("t.missing", missing),
        ("t.none", nothing),
    ]:
        await worker.register_command(cid, fn)
    with (
        caplog.at_level(logging.ERROR, logger="cmd_ipc"),
        pytest.raises(InternalError, match="ValueError: broken"),
    ):
        await root.execute_command("t.boom")
    assert any("t.boom" in r.getMessage() for r in caplog.records)
    assert await root.execute_command("t.lazy") == 7
    with pytest.raises(InternalError, match="cannot be serialised"):
        await root.execute_command("t.obj")
    with pytest.raises(InvalidRequestError, match="missing a required argument"):
        await root.execute_command("t.missing", {})
    assert await root.execute_command("t.none") is None
    # Replaced and removed handlers are never called through a stale entry.
    assert worker.unregister_command("t.none")
    with pytest.raises(NotFoundError):
        await root.execute_command("t.none")


def test_needs_await_follows_inspect_isawaitable() -> None:
    import inspect
    import types

    from cmd_ipc import _core

    @types.coroutine
    def legacy() -> Any:
        yield

    async def modern() -> None:
        pass

    def plain_generator() -> Any:
        yield 1

    coro = modern()
    values: list[Any] = [legacy(), coro, plain_generator(), 1, "x", {}, [], None, object()]
    try:
        for v in values:
            assert _core.needs_await(v) == inspect.isawaitable(v), v
    finally:
        coro.close()
