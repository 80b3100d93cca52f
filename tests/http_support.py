"""What the HTTP tests share: messages, raw HTTP, the ``api`` registry they serve, and
aiohttp fixtures (``apps`` serves a plain aiohttp application, ``session`` is a client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cmd_ipc import CommandRegistry
from helpers import new_id

__all__ = [
    "JSON_HEADERS",
    "Make",
    "StartApp",
    "api_with_commands",
    "apps",
    "execute",
    "free_port",
    "in_flight",
    "ndjson_lines",
    "raw",
    "recorder_app",
    "session",
    "status_of",
    "untouched",
]

Make = Callable[..., CommandRegistry]
StartApp = Callable[..., Awaitable[str]]

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


@pytest.fixture
async def apps() -> AsyncIterator[StartApp]:
    """``await apps(app, handler_cancellation=...)`` -> the base URL of a plain aiohttp
    application served on a free port, stopped at teardown."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, *, handler_cancellation: bool = True) -> str:
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def execute(command_id: str, request: Any = None, id: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"id": id or new_id(), "type": "execute.command.request"}
    m["commandId"] = command_id
    if request is not None:
        m["request"] = request
    return m


def ndjson_lines(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n"), body
    return [json.loads(line) for line in body.split(b"\n") if line.strip()]


async def raw(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Sends ``data`` on a fresh TCP connection and reads until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def status_of(response: bytes) -> int:
    return int(response.split(b"\r\n", 1)[0].split()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_flight(registry: CommandRegistry) -> tuple[set[str], int]:
    """The registry's channels other than HTTP endpoints', and the requests its endpoints
    still wait on (both should be back to normal once the HTTP traffic is over)."""
    endpoints = [c for c in registry.channels.values() if c.id.startswith("http:")]
    others = set(registry.channels) - {c.id for c in endpoints}
    return others, sum(len(c.pending) for c in endpoints)  # type: ignore[attr-defined]


def untouched(registry: CommandRegistry) -> bool:
    """Nothing reached ``registry`` through HTTP: it has no channel but the endpoints', and
    they never delivered a message (an ASGI server attaches its endpoint at startup)."""
    stats = registry.stats()["channels"]
    return all(c.startswith("http:") for c in registry.channels) and all(
        s["received"] == 0 for c, s in stats.items() if c.startswith("http:")
    )


async def api_with_commands(make: Make, **kw: Any) -> tuple[CommandRegistry, dict[str, int]]:
    """A server registry ``api`` with ``calc.add``, a typed ``typed.add``, a private
    ``_secret`` and a ``stuck`` command; returns it and the count of handler runs."""
    api = make("api", **kw)
    runs = {"calc.add": 0, "typed.add": 0, "_secret": 0, "stuck": 0}

    def add(a: Any, b: Any) -> Any:
        runs["calc.add"] += 1
        return a + b

    await api.register_command("calc.add", add, description="Adds two numbers")

    @api.command("typed.add", description="Adds two integers")
    def typed_add(a: int, b: int) -> int:
        runs["typed.add"] += 1
        return a + b

    def secret() -> str:
        runs["_secret"] += 1
        return "secret"

    await api.register_command("_secret", secret)

    async def stuck() -> None:
        runs["stuck"] += 1
        await asyncio.Event().wait()

    await api.register_command("stuck", stuck)
    await api.ready()
    return api, runs


def recorder_app(target: str, seen: list[tuple[dict[str, str], bytes]]) -> web.Application:
    """A proxy that records every request's headers and body, then forwards it to
    ``target`` (a base URL) and returns its answer."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((dict(request.headers), body))
        forward = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", "accept", "authorization")
        }
        async with (
            aiohttp.ClientSession() as s,
            s.post(target + "/cmd", data=body, headers=forward) as r,
        ):
            return web.Response(
                status=r.status,
                body=await r.read(),
                headers={"Content-Type": r.headers.get("Content-Type", "")},
            )

    app = web.Application()
    app.router.add_post("/cmd", handle)
    return app
