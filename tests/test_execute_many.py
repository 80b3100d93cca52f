"""``execute_many`` / ``execute_many_sync``: one command, many requests, pipelined."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
)
from cmd_ipc.channels.native import Transport
from helpers import registries

__all__ = ["registries"]  # the fixture is imported from helpers

TRANSPORTS: list[Transport] = ["shm", "pipe"]

Make = Callable[..., CommandRegistry]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_results_in_order_whatever_the_window(transport: Transport) -> None:
    with CommandRegistry("main") as r:
        r.spawn_worker_sync("worker-1", "worker_targets:calc", transport=transport)
        requests = [{"a": i, "b": 1000} for i in range(3000)]
        expected = [i + 1000 for i in range(3000)]
        for window in (1, 7, 256, 10_000):
            assert r.execute_many_sync("calc.add", requests, window=window) == expected
        # Any iterable; an empty one makes no call.
        assert r.execute_many_sync("calc.add", ({"a": i, "b": i} for i in range(5))) == [
            0,
            2,
            4,
            6,
            8,
        ]
        assert r.execute_many_sync("calc.add", []) == []
        # Requests that are not plain values (encoded in Python) and results that are not
        # plain either, mixed with plain ones; `None` for a command without arguments.
        when = datetime.datetime(2026, 11, 26, 1, 2, 3)
        got = r.execute_many_sync("calc.echo", [{"value": 1}, {"value": when}, {"value": b"x"}])
        assert got == [1, when.isoformat(), b"x"]
        assert r.execute_many_sync("calc.whoami", [None, None])[1]["id"] == "worker-1"
        # The single-call path still works between batches.
        assert r.execute_command_sync("calc.add", {"a": 1, "b": 2}) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failures_raise_the_first_or_stay_in_place(transport: Transport) -> None:
    with CommandRegistry("main") as r:
        r.spawn_worker_sync("worker-1", "worker_targets:calc", transport=transport)
        requests: list[dict[str, Any]] = [{"message": f"boom-{i}"} for i in range(10)]
        with pytest.raises(InternalError, match="boom-0"):
            r.execute_many_sync("calc.fail", requests, window=3)
        got = r.execute_many_sync(
            "calc.echo",
            [{"value": 1}, {"wrong": 2}, {"value": 3}],
            return_exceptions=True,
        )
        assert got[0] == 1 and got[2] == 3
        assert isinstance(got[1], InvalidRequestError)
        with pytest.raises(NotFoundError):
            r.execute_many_sync("calc.nope", [{"a": 1}])
        missing = r.execute_many_sync("calc.nope", [None, None], return_exceptions=True)
        assert [type(e) for e in missing] == [NotFoundError, NotFoundError]
        # A bad request is refused before anything is sent.
        with pytest.raises(TypeError, match="mapping"):
            r.execute_many_sync("calc.add", [{"a": 1, "b": 2}, [1, 2]])  # type: ignore[list-item]
        # bytes are not a request, whatever the route (msgpack bytes included).
        with pytest.raises(TypeError, match="mapping"):
            r.execute_many_sync("calc.add", [b"\x82\xa1a\x01\xa1b\x02"])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="mapping"):
            r.execute_command_sync("calc.add", b"\x82\xa1a\x01\xa1b\x02")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="iterable of requests"):
            r.execute_many_sync("calc.add", {"a": 1, "b": 2})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="window"):
            r.execute_many_sync("calc.add", [{"a": 1, "b": 2}], window=0)
        with pytest.raises(ValueError, match="timeout"):
            r.execute_many_sync("calc.add", [{"a": 1, "b": 2}], timeout=0)
        assert r.execute_many_sync("calc.add", [{"a": 1, "b": 2}]) == [3]


def test_timeouts_apply_to_each_call() -> None:
    with CommandRegistry("main") as r:
        r.spawn_worker_sync("worker-1", "worker_targets:calc")
        got = r.execute_many_sync("calc.slow", [None] * 3, timeout=0.2, return_exceptions=True)
        assert [type(e) for e in got] == [CommandTimeoutError] * 3
        assert r.execute_many_sync("calc.add", [{"a": 1, "b": 1}]) == [2]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_killed_mid_batch_fails_what_was_waiting(transport: Transport) -> None:
    with CommandRegistry("main") as r:
        closed: list[str] = []
        r.add_close_listener(lambda channel_id, _reason: closed.append(channel_id))
        worker = r.spawn_worker_sync("worker-1", "worker_targets:calc", transport=transport)
        assert worker.pid is not None
        pid = worker.pid
        threading.Timer(0.3, lambda: os.kill(pid, signal.SIGKILL)).start()
        start = time.monotonic()
        # Two quick calls, then calls that never finish: the kill ends them.
        got = r.execute_many_sync(
            "calc.add",
            [{"a": 1, "b": 1}, {"a": 2, "b": 2}],
        )
        assert got == [2, 4]
        got = r.execute_many_sync("calc.slow", [None] * 20, window=5, return_exceptions=True)
        assert time.monotonic() - start < 10  # bounded: the kill came at 0.3 s
        # The five in flight when the channel died fail with channel_disconnected; the
        # rest find no route any more.
        assert all(isinstance(e, (ChannelDisconnectedError, NotFoundError)) for e in got), got
        assert sum(isinstance(e, ChannelDisconnectedError) for e in got) >= 5
        # The channel's end is reported once, not once per call the batch still had.
        assert closed == ["worker-1"]


async def test_await_form_native_and_in_process(registries: Make) -> None:
    main = registries("main")
    await main.spawn_worker("worker-1", "worker_targets:calc")

    @main.command("app.mul", validate=False)
    def mul(a: int, b: int) -> int:
        return a * b

    requests = [{"a": i, "b": 3} for i in range(500)]
    native, local = await asyncio.gather(
        main.execute_many("calc.add", requests, window=16),
        main.execute_many("app.mul", requests, window=16),
    )
    assert native == [i + 3 for i in range(500)]
    assert local == [i * 3 for i in range(500)]
    got = await main.execute_many(
        "app.nope", [None, None], return_exceptions=True
    )  # in-process route: the asyncio lanes
    assert [type(e) for e in got] == [NotFoundError, NotFoundError]
    with pytest.raises(TypeError):
        await main.execute_many("app.mul", [{"a": 1, "b": 1}, 5])  # type: ignore[list-item]


def test_blocking_batch_on_the_loop_thread_is_refused() -> None:
    with CommandRegistry("main") as r:

        @r.command("app.inner", validate=False)
        def inner() -> str:
            try:
                r.execute_many_sync("app.inner", [None])
            except RuntimeError as e:
                return str(e)
            return "no error"

        assert "deadlock" in r.execute_command_sync("app.inner")
