"""Remote channels on loopback (pytest-benchmark): ``make bench`` or
``pytest benches --benchmark-only``; ``cmd-ipc bench`` measures the same rows with
percentiles.

One server child (:mod:`cmd_ipc.bench.remote`) serves a bare aiohttp ``POST /bare`` (the
baseline), the cmd-ipc HTTP endpoint and a WebSocket server on one registry. Each benchmark
round makes ``BATCH`` sequential calls of ``add({"a": 1, "b": 2})``:

* ``aiohttp_post``: a keep-alive ``aiohttp.ClientSession`` POST to ``/bare`` (baseline);
* ``http_channel``: ``await execute_command`` through an :class:`~cmd_ipc.HTTPChannel`;
* ``ws_channel``: the same through a :class:`~cmd_ipc.WebSocketChannel`.

Ratios are printed at the end of the run (``benches/conftest.py``): the HTTP channel against
the bare POST (target: calls/s >= 0.8x, i.e. time per call <= 1.25x) and the WebSocket channel
against the HTTP channel (target: <= 0.5x). ``CMD_IPC_BENCH_PIN=1`` pins this process to CPU 0
and the server to CPU 1.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from bench_support import per_call_us
from cmd_ipc import CommandRegistry, HTTPChannel, WebSocketChannel
from cmd_ipc.bench.remote import REQ, start_server, stop_server

BATCH = 200
PIN = os.environ.get("CMD_IPC_BENCH_PIN", "") not in ("", "0")
#: Per-call microseconds by row, read by the terminal summary in conftest.py.
RESULTS: dict[str, float] = {}
RATIOS = (("http_channel", "aiohttp_post"), ("ws_channel", "http_channel"))


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    if PIN:
        os.sched_setaffinity(0, {0})
    proc, urls = start_server(1 if PIN else None)
    try:
        yield urls
    finally:
        stop_server(proc)


def _bench(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    name: str,
    call: Callable[[], Awaitable[Any]],
) -> None:
    # The warm-up rounds of per_call_us also warm the connection pools.
    RESULTS[name] = per_call_us(benchmark, loop, call, BATCH)
    assert loop.run_until_complete(call()) == 3


def test_aiohttp_post(benchmark: Any, loop: asyncio.AbstractEventLoop, server: Any) -> None:
    session = loop.run_until_complete(_session())

    async def call() -> Any:
        async with session.post(server["http"] + "/bare", json=REQ) as resp:
            return await resp.json()

    try:
        _bench(benchmark, loop, "aiohttp_post", call)
    finally:
        loop.run_until_complete(session.close())


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


def _registry_with(loop: asyncio.AbstractEventLoop, channel: Any) -> CommandRegistry:
    async def make() -> CommandRegistry:
        registry = CommandRegistry("bench-client")
        await registry.register_channel(channel)
        return registry

    return loop.run_until_complete(make())


def test_http_channel(benchmark: Any, loop: asyncio.AbstractEventLoop, server: Any) -> None:
    registry = _registry_with(loop, HTTPChannel("server", server["http"]))
    try:
        _bench(benchmark, loop, "http_channel",
               lambda: registry.execute_command("remote.add", REQ))  # fmt: skip
    finally:
        loop.run_until_complete(registry.close())


def test_ws_channel(benchmark: Any, loop: asyncio.AbstractEventLoop, server: Any) -> None:
    registry = _registry_with(loop, WebSocketChannel("server", server["ws"], reconnect=False))
    try:
        _bench(benchmark, loop, "ws_channel",
               lambda: registry.execute_command("remote.add", REQ))  # fmt: skip
    finally:
        loop.run_until_complete(registry.close())
