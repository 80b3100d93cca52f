"""Remote rows of ``cmd-ipc bench``: HTTPChannel and WebSocketChannel next to a bare aiohttp
POST, all against one server process on loopback.

The server (``python -m cmd_ipc._bench_remote``) is one aiohttp application with:

* ``POST /bare``: the baseline, a plain aiohttp handler answering ``a + b`` as JSON;
* ``POST /cmd``: :func:`cmd_ipc.http.add_routes` on a registry with ``remote.add``;

and a WebSocket server (:func:`cmd_ipc.websocket.serve_websocket`) on the same registry. It
prints ``{"http": URL, "ws": URL}`` on one line and serves until its stdin closes.

The client side times sequential calls (one in flight), each row on its own fresh client:
a keep-alive ``aiohttp.ClientSession`` POST for the baseline, ``execute_command`` through a
registry holding an :class:`~cmd_ipc.HTTPChannel` or a :class:`~cmd_ipc.WebSocketChannel`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable
from typing import Any, Callable

__all__ = ["measure", "start_server", "stop_server"]

REQ = {"a": 1, "b": 2}


async def _serve() -> None:
    from aiohttp import web

    from cmd_ipc.http import add_routes
    from cmd_ipc.registry import CommandRegistry
    from cmd_ipc.websocket import serve_websocket

    async def bare(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(body["a"] + body["b"])

    async with CommandRegistry("bench-server") as registry:
        await registry.register_command("remote.add", lambda a, b: a + b)
        app = web.Application()
        app.router.add_post("/bare", bare)
        add_routes(app, registry)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        ws = await serve_websocket(registry, "127.0.0.1", 0)
        print(json.dumps({"http": f"http://127.0.0.1:{port}", "ws": ws.url}), flush=True)
        loop = asyncio.get_running_loop()
        # Serve until the bench closes our stdin.
        await loop.run_in_executor(None, sys.stdin.read)
        await ws.close()
        await runner.cleanup()


def start_server(cpu: int | None) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Starts the server process (pinned to ``cpu`` if given); returns it and its URLs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmd_ipc._bench_remote"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if cpu is not None:
        import os

        os.sched_setaffinity(proc.pid, {cpu})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"bench server exited with {proc.returncode} before serving")
    return proc, json.loads(line)


def stop_server(proc: subprocess.Popen[str]) -> None:
    """Ends the server process (closing its stdin ends it) and releases its pipes."""
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _timed(
    call: Callable[[], Awaitable[Any]], n: int, warmup: int
) -> tuple[list[int], float]:
    for _ in range(warmup):
        assert await call() == 3
    clock = time.perf_counter_ns
    out = [0] * n
    t_start = clock()
    for i in range(n):
        t0 = clock()
        await call()
        out[i] = clock() - t0
    return out, (clock() - t_start) / 1e9


async def measure_bare(url: str, n: int, warmup: int) -> tuple[list[int], float]:
    """A keep-alive aiohttp POST of the payload to ``/bare``, JSON answer read."""
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def call() -> Any:
            async with session.post(url + "/bare", json=REQ) as resp:
                resp.raise_for_status()
                return await resp.json()

        return await _timed(call, n, warmup)


async def measure_http(url: str, n: int, warmup: int) -> tuple[list[int], float]:
    """``execute_command("remote.add")`` through an :class:`HTTPChannel`."""
    from cmd_ipc.http import HTTPChannel
    from cmd_ipc.registry import CommandRegistry

    async with CommandRegistry("bench-http") as client:
        await client.register_channel(HTTPChannel("server", url))
        return await _timed(lambda: client.execute_command("remote.add", REQ), n, warmup)


async def measure_ws(url: str, n: int, warmup: int) -> tuple[list[int], float]:
    """``execute_command("remote.add")`` through a :class:`WebSocketChannel`."""
    from cmd_ipc.registry import CommandRegistry
    from cmd_ipc.websocket import WebSocketChannel

    async with CommandRegistry("bench-ws") as client:
        await client.register_channel(WebSocketChannel("server", url, reconnect=False))
        return await _timed(lambda: client.execute_command("remote.add", REQ), n, warmup)


async def measure(urls: dict[str, str], n: int, warmup: int) -> dict[str, tuple[list[int], float]]:
    """All three rows, baseline first: ``{"bare": ..., "http": ..., "ws": ...}``."""
    return {
        "bare": await measure_bare(urls["http"], n, warmup),
        "http": await measure_http(urls["http"], n, warmup),
        "ws": await measure_ws(urls["ws"], n, warmup),
    }


if __name__ == "__main__":
    asyncio.run(_serve())
