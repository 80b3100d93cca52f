"""Targets of the MCP tests (tests/test_mcp.py).

* :func:`setup` -- the setup of ``cmd-ipc mcp serve mcp_targets:setup``: typed commands of
  every result shape, a failing one, a slow one, a private one, and ``workers.spawn`` /
  ``workers.kill`` so that a test can make the serving process gain or lose a worker
  through MCP itself;
* :func:`worker` -- the target of that worker process (``w1.echo``, ``w1.pid``);
* ``python mcp_targets.py sdk`` -- an MCP server written with the SDK's own server API
  (``mcp.server.mcpserver.MCPServer``), for the tests of :class:`MCPClientChannel`: ``add``,
  ``fail``, ``slow``, ``grow`` / ``shrink`` (add or remove the tool ``extra`` and tell the
  client), ``die`` (the process exits).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from cmd_ipc import CommandRegistry, InvalidRequestError, Worker
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel


class User(BaseModel):
    id: int
    name: str


_workers: dict[str, Worker] = {}


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

    @registry.command("slow")
    async def slow(seconds: float = 60.0) -> None:
        await asyncio.sleep(seconds)

    @registry.command("_secret")
    def secret() -> str:
        return "hidden"

    @registry.command("workers.spawn")
    async def spawn() -> int:
        w = await registry.spawn_worker("w1", "mcp_targets:worker")
        _workers["w1"] = w
        return w.pid or 0

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


def _sdk_server() -> Any:
    app: Any = MCPServer("sdk-server")

    @app.tool()
    def add(a: int, b: int) -> int:
        """Adds two numbers."""
        return a + b

    @app.tool()
    def fail(message: str) -> str:
        raise ValueError(message)

    @app.tool()
    async def slow(seconds: float = 60.0) -> str:
        await asyncio.sleep(seconds)
        return "late"

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
