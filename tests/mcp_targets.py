"""Targets of the MCP tests (tests/test_mcp.py).

* :func:`setup` -- the setup of ``cmd-ipc mcp serve mcp_targets:setup``: typed commands of
  every result shape, a failing one, a slow one (``slow.started`` answers once a call of
  it runs), a private one, ``workers.spawn`` / ``workers.kill`` so that a test can make
  the serving process gain or lose a worker through MCP itself, and ``noisy.grow``
  (prints to stdout every way it can, and registers the command ``grown.<n>``);
* :func:`worker` -- the target of that worker process (``w1.echo``, ``w1.pid``, ``w1.grow``
  registering ``w1.late``);
* ``python mcp_targets.py sdk`` -- an MCP server written with the SDK's own server API
  (``mcp.server.mcpserver.MCPServer``), for the tests of :class:`MCPClientChannel`: ``add``,
  ``fail``, ``slow`` (``slow_started`` answers once a ``slow`` call runs), ``grow`` /
  ``shrink`` (add or remove the tool ``extra`` and tell the client), ``die`` (the process
  exits).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

from cmd_ipc import CommandRegistry, InvalidRequestError, Worker
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel


class User(BaseModel):
    id: int
    name: str


_workers: dict[str, Worker] = {}
_grown: list[str] = []


def setup(registry: CommandRegistry) -> None:
    @registry.command("calc.add", description="Adds two numbers")
    def add(a: int, b: int) -> int:
        return a + b

    @registry.command("users.get", description="A user by id")
    def get(user_id: int) -> User:
        return User(id=user_id, name="ada")

    @registry.command("text.upper")
    def upper(text: str) -> str:
        return text.upper()

    @registry.command("calc.div")
    def div(a: float, b: float) -> float:
        if b == 0:
            raise InvalidRequestError("b must not be 0")
        return a / b

    @registry.command("boom")
    def boom() -> None:
        raise ValueError("it broke")

    slow_started = asyncio.Event()

    @registry.command("slow")
    async def slow(seconds: float = 60.0) -> None:
        slow_started.set()
        await asyncio.sleep(seconds)

    @registry.command("slow.started", description="Answers once a call of slow runs")
    async def started() -> bool:
        await slow_started.wait()
        return True

    @registry.command("_secret")
    def secret() -> str:
        return "hidden"

    @registry.command("workers.spawn")
    async def spawn() -> int:
        w = await registry.spawn_worker("w1", "mcp_targets:worker")
        _workers["w1"] = w
        return w.pid or 0

    @registry.command("noisy.grow")
    async def grow() -> str:
        # Stray output of a handler, of the process and of a child: none may reach the
        # MCP stream of `cmd-ipc mcp serve` over stdio.
        print("a handler's print")
        sys.stdout.flush()
        os.write(1, b"a raw write to fd 1\n")
        subprocess.run(["echo", "a child's echo"], check=False)
        name = f"grown.{len(_grown)}"
        _grown.append(name)
        await registry.register_command(name, lambda: 1)
        return name

    @registry.command("workers.kill")
    def kill() -> bool:
        w = _workers.pop("w1")
        if w.pid is not None:
            os.kill(w.pid, signal.SIGKILL)  # a death, not a stop
        return True


def worker(registry: CommandRegistry) -> None:
    @registry.command("w1.echo")
    def echo(value: Any) -> Any:
        return value

    @registry.command("w1.pid")
    def pid() -> int:
        return os.getpid()

    @registry.command("w1.grow")
    async def grow() -> bool:
        # Told to the root by the native channels only (its watch sees it late).
        await registry.register_command("w1.late", lambda: 1)
        return True


def _sdk_server() -> Any:
    app: Any = MCPServer("sdk-server")

    @app.tool()
    def add(a: int, b: int) -> int:
        """Adds two numbers."""
        return a + b

    @app.tool()
    def fail(message: str) -> str:
        raise ValueError(message)

    started = asyncio.Event()

    @app.tool()
    async def slow(seconds: float = 60.0) -> str:
        started.set()
        await asyncio.sleep(seconds)
        return "late"

    @app.tool()
    async def slow_started() -> str:
        await started.wait()
        return "started"

    def extra(x: int) -> int:
        """Appears with grow."""
        return x * 10

    async def changed(ctx: Context) -> None:
        # Handshake-era clients hear it on their connection, 2026-07-28 ones on their
        # subscriptions/listen stream (each call is a no-op in the other era).
        await ctx.session.send_tool_list_changed()
        await ctx.notify_tools_changed()

    @app.tool()
    async def grow(ctx: Context) -> str:
        app.add_tool(extra, name="extra")
        await changed(ctx)
        return "grown"

    @app.tool()
    async def shrink(ctx: Context) -> str:
        app.remove_tool("extra")
        await changed(ctx)
        return "shrunk"

    @app.tool()
    def die() -> str:
        os._exit(3)

    return app


if __name__ == "__main__" and sys.argv[1:] == ["sdk"]:
    _sdk_server().run()
