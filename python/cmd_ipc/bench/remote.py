"""Remote rows of ``cmd-ipc bench``: HTTPChannel, WebSocketChannel and GrpcChannel next to a
bare aiohttp POST, all against one server process on loopback.

The server (:func:`serve_main`, started by :func:`start_server`) is one aiohttp application
with:

* ``POST /bare``: the baseline, a plain aiohttp handler answering ``a + b`` as JSON;
* ``POST /cmd``: :func:`cmd_ipc.server.http.add_routes` on a registry with ``remote.add``;

and a WebSocket server (:func:`cmd_ipc.server.websocket.serve_websocket`) and, when grpcio
is installed, a gRPC server (:func:`cmd_ipc.server.grpc.serve_grpc`) on the same registry.
It prints ``{"http": URL, "ws": URL, "grpc": "host:port"}`` on one line (no ``"grpc"``
without grpcio) and serves until its stdin closes.

The client side times sequential calls (one in flight), each row on its own client: a
keep-alive ``aiohttp.ClientSession`` POST for the baseline, ``execute_command`` through a
registry holding an :class:`~cmd_ipc.HTTPChannel`, a :class:`~cmd_ipc.WebSocketChannel` or a
:class:`~cmd_ipc.GrpcChannel`. The rows are interleaved in blocks of calls, so that machine
noise weighs on them alike.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from cmd_ipc._procgroup import OWN_PROCESS_GROUP
from cmd_ipc.bench.children import reap
from cmd_ipc.bench.results import REQ
from cmd_ipc.bench.timing import time_async

__all__ = ["REQ", "has_grpc", "measure", "serve_main", "start_server", "stop_server"]

#: The server's entry point, run with ``python -c`` (``-m`` would import this module twice:
#: once as :mod:`cmd_ipc.bench.remote` through the package, once as ``__main__``).
_SERVER_CODE = "from cmd_ipc.bench.remote import serve_main; serve_main()"


async def _serve() -> None:
    from aiohttp import web

    from cmd_ipc.registry import CommandRegistry
    from cmd_ipc.server.http import add_routes
    from cmd_ipc.server.websocket import serve_websocket

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
        urls = {"http": f"http://127.0.0.1:{port}", "ws": ws.url}
        grpc_server = None
        if has_grpc():
            from cmd_ipc.server.grpc import serve_grpc

            grpc_server = await serve_grpc(registry, "127.0.0.1", 0)
            urls["grpc"] = grpc_server.target
        print(json.dumps(urls), flush=True)
        loop = asyncio.get_running_loop()
        # Serve until the bench closes our stdin.
        await loop.run_in_executor(None, sys.stdin.read)
        if grpc_server is not None:
            await grpc_server.close()
        await ws.close()
        await runner.cleanup()


def has_grpc() -> bool:
    """Whether grpcio is installed (the gRPC row needs it; the others do not)."""
    return importlib.util.find_spec("grpc") is not None


def start_server(cpu: int | None) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Starts the server process (pinned to ``cpu`` if given); returns it and its URLs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **OWN_PROCESS_GROUP,  # Ctrl-C reaches the bench only: it ends the child
    )
    try:
        if cpu is not None:
            import os

            os.sched_setaffinity(proc.pid, {cpu})
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench server exited with {proc.poll()} before serving")
        return proc, json.loads(line)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen[str]) -> None:
    """Ends the server process (closing its stdin ends it) and releases its pipes."""
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()
    reap(proc, 10)


BLOCK = 50


async def measure(
    urls: dict[str, str], n: int, warmup: int, stop: threading.Event | None = None
) -> dict[str, tuple[list[int], float]]:
    """All the rows: ``{"bare": (samples_ns, elapsed_s), "http": ..., "ws": ..., "grpc": ...}``
    (``"grpc"`` only when ``urls`` has a gRPC target).

    The rows are interleaved in blocks of :data:`BLOCK` calls (bare, HTTP, WebSocket, gRPC,
    bare, ...), so that a slower or faster moment of the machine weighs on all alike.

    Raises:
        InterruptedError: ``stop`` was set (checked between two blocks of calls): the
            clients close with no call in flight.
    """

    def check() -> None:
        if stop is not None and stop.is_set():
            raise InterruptedError("the bench was interrupted")

    import aiohttp

    from cmd_ipc.channels.http import HTTPChannel
    from cmd_ipc.channels.websocket import WebSocketChannel
    from cmd_ipc.registry import CommandRegistry

    base = urls["http"]
    async with (
        aiohttp.ClientSession() as session,
        CommandRegistry("bench-http") as http_client,
        CommandRegistry("bench-ws") as ws_client,
        CommandRegistry("bench-grpc") as grpc_client,
    ):
        await http_client.register_channel(HTTPChannel("server", base))
        await ws_client.register_channel(WebSocketChannel("server", urls["ws"], reconnect=False))
        if "grpc" in urls:
            from cmd_ipc.channels.grpc import GrpcChannel

            await grpc_client.register_channel(GrpcChannel("server", urls["grpc"], reconnect=False))

        async def bare() -> Any:
            async with session.post(base + "/bare", json=REQ) as resp:
                resp.raise_for_status()
                return await resp.json()

        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "bare": bare,
            "http": lambda: http_client.execute_command("remote.add", REQ),
            "ws": lambda: ws_client.execute_command("remote.add", REQ),
        }
        if "grpc" in urls:
            calls["grpc"] = lambda: grpc_client.execute_command("remote.add", REQ)
        for call in calls.values():
            for i in range(warmup):
                if i % BLOCK == 0:
                    check()
                if await call() != 3:
                    raise RuntimeError("the bench server answered a wrong sum")
        samples: dict[str, list[int]] = {k: [] for k in calls}
        elapsed = dict.fromkeys(calls, 0.0)
        done = 0
        while done < n:
            k = min(BLOCK, n - done)
            for name, call in calls.items():
                check()
                block, seconds = await time_async(call, k, 0)
                samples[name].extend(block)
                elapsed[name] += seconds
            done += k
        return {name: (samples[name], elapsed[name]) for name in calls}


def serve_main() -> None:
    """The server process: serves until its stdin closes."""
    asyncio.run(_serve())
