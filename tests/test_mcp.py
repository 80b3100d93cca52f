"""MCP both ways, with the real SDK (``mcp``): the SDK's client against our server (streamable
HTTP in this process, stdio through ``cmd-ipc mcp serve``), in both protocol eras the SDK
speaks (``legacy``: the initialize handshake; ``auto``: 2026-07-28); our
:class:`MCPClientChannel` against a server written with the SDK's own server API
(tests/mcp_targets.py) and against our server. Every wait has a deadline; servers listen on
free ports of 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

mcp = pytest.importorskip("mcp")

import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from cmd_ipc import (  # noqa: E402
    ChannelDisconnectedError,
    CommandRegistry,
    InternalError,
    InvalidRequestError,
    NotFoundError,
)
from cmd_ipc.mcp import MCPClientChannel, MCPServer, command_tool, serve_http  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402
from mcp_types.version import MODERN_PROTOCOL_VERSIONS  # noqa: E402

TESTS = Path(__file__).resolve().parent
DEADLINE = 20.0
MODES = ["legacy", "auto"]

pytestmark = pytest.mark.timeout(120)


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


class Watched:
    """An SDK client and the ``tools/list_changed`` notifications it received."""

    def __init__(self, client: Client, changes: asyncio.Queue[None]) -> None:
        self.client = client
        self.changes = changes

    async def changed(self) -> None:
        """Waits for the next notification (with a deadline)."""
        await asyncio.wait_for(self.changes.get(), DEADLINE)

    async def names(self) -> list[str]:
        return [t.name for t in (await self.client.list_tools()).tools]


@contextlib.asynccontextmanager
async def sdk_client(server: Any, mode: str) -> AsyncIterator[Watched]:
    """The SDK's client of ``server`` (a URL, a transport or stdio parameters), told of tool
    list changes in either era (a 2026-07-28 client opens a ``subscriptions/listen``)."""
    changes: asyncio.Queue[None] = asyncio.Queue()

    async def handler(message: Any) -> None:
        if getattr(message, "method", None) == "notifications/tools/list_changed":
            changes.put_nowait(None)

    async with Client(server, mode=mode, message_handler=handler, cache=None) as client:
        watched = Watched(client, changes)
        if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
            assert mode == "auto"
            async with client.listen(tools_list_changed=True) as sub:

                async def drain() -> None:
                    async for _ in sub:
                        pass

                pump = asyncio.ensure_future(drain())
                try:
                    yield watched
                finally:
                    pump.cancel()
                    with contextlib.suppress(BaseException):
                        await pump
        else:
            assert mode == "legacy"
            yield watched


def setup_registry(registry: CommandRegistry) -> None:
    import mcp_targets

    mcp_targets.setup(registry)


# ------------------------------------------------------------------ schema mapping


def test_tools_of_commands() -> None:
    tool = command_tool(
        {
            "id": "users.get",
            "description": "d",
            "schema": {
                "request": {"type": "object", "properties": {"id": {"type": "integer"}}},
                "response": {"type": "object", "properties": {"id": {"type": "integer"}}},
            },
        }
    )
    assert tool.description == "d"
    assert tool.input_schema["properties"] == {"id": {"type": "integer"}}
    assert tool.output_schema == {"type": "object", "properties": {"id": {"type": "integer"}}}
    # A non-object response is wrapped, its $defs moved to the root where its refs point.
    wrapped = command_tool(
        {
            "id": "users.list",
            "schema": {
                "response": {"type": "array", "items": {"$ref": "#/$defs/U"}, "$defs": {"U": {}}}
            },
        }
    )
    assert wrapped.input_schema == {"type": "object"}
    assert wrapped.output_schema == {
        "type": "object",
        "$defs": {"U": {}},
        "properties": {"result": {"type": "array", "items": {"$ref": "#/$defs/U"}}},
        "required": ["result"],
    }
    # Without a response schema: any value, under "result".
    assert command_tool({"id": "x"}).output_schema == {
        "type": "object",
        "properties": {"result": {}},
        "required": ["result"],
    }


# ------------------------------------------------------------------ SDK client -> our server


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_client_over_http(mode: str) -> None:
    async with CommandRegistry("tools") as registry:
        setup_registry(registry)
        await registry.ready()
        async with (
            MCPServer(registry, timeout=0.5) as server,
            await serve_http(server) as http,
            sdk_client(http.url, mode) as watched,
        ):
            client = watched.client
            assert client.server_capabilities.tools is not None
            assert client.server_capabilities.tools.list_changed
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "_secret" not in tools
            assert {"calc.add", "users.get", "text.upper", "boom"} <= set(tools)
            assert tools["calc.add"].description == "Adds two numbers"
            assert tools["calc.add"].input_schema["required"] == ["a", "b"]
            assert tools["calc.add"].output_schema == {
                "type": "object",
                "properties": {"result": {"type": "integer"}},
                "required": ["result"],
            }
            assert tools["users.get"].output_schema is not None
            assert tools["users.get"].output_schema["type"] == "object"

            # Results: the SDK validates structuredContent against each outputSchema.
            r = await client.call_tool("calc.add", {"a": 1, "b": 2})
            assert not r.is_error
            assert r.structured_content == {"result": 3}
            assert isinstance(r.content[0], types.TextContent) and r.content[0].text == "3"
            r = await client.call_tool("users.get", {"user_id": 7})
            assert r.structured_content == {"id": 7, "name": "ada"}
            r = await client.call_tool("text.upper", {"text": "hi"})
            assert r.structured_content == {"result": "HI"}
            assert isinstance(r.content[0], types.TextContent) and r.content[0].text == "HI"

            # Errors keep their cmd-ipc code.
            r = await client.call_tool("boom", {})
            assert r.is_error and r.structured_content is not None
            assert r.structured_content["code"] == "internal_error"
            assert "it broke" in r.structured_content["message"]
            r = await client.call_tool("calc.div", {"a": 1, "b": 0})
            assert r.is_error and r.structured_content is not None
            assert r.structured_content["code"] == "invalid_request"
            r = await client.call_tool("calc.add", {"a": "x", "b": 2})
            assert r.is_error and r.structured_content is not None
            assert r.structured_content["code"] == "invalid_request"
            r = await client.call_tool("slow", {"seconds": 30})
            assert r.is_error and r.structured_content is not None
            assert r.structured_content["code"] == "timeout"
            for name in ("nope", "_secret"):
                with pytest.raises(MCPError) as info:
                    await client.call_tool(name, {})
                assert info.value.error.code == types.INVALID_PARAMS

            # list_changed: a worker registers, then dies.
            worker = await registry.spawn_worker("w1", "mcp_targets:worker")
            await watched.changed()
            assert "w1.echo" in await watched.names()
            r = await client.call_tool("w1.echo", {"value": [1, "a"]})
            assert r.structured_content == {"result": [1, "a"]}
            assert worker.pid is not None
            os.kill(worker.pid, 9)
            await watched.changed()
            assert "w1.echo" not in await watched.names()
            # A private command never makes a change an agent hears of: the next one heard
            # is the public one registered after it.
            await registry.register_command("_quiet", lambda: 1)
            await registry.register_command("late.one", lambda: 1)
            await watched.changed()
            assert "late.one" in await watched.names()
            assert watched.changes.empty()


async def test_http_token_and_expose() -> None:
    async with CommandRegistry("tools") as registry:
        setup_registry(registry)
        await registry.ready()
        async with await serve_http(registry, token="s3cret", expose="calc.*") as http:
            async with httpx2.AsyncClient() as raw:
                resp = await raw.post(http.url, json={})
                assert resp.status_code == 401
                assert resp.headers["www-authenticate"] == "Bearer"
            headers = {"Authorization": "Bearer s3cret"}
            async with httpx2.AsyncClient(headers=headers) as authed:
                transport = streamable_http_client(http.url, http_client=authed)
                async with sdk_client(transport, "legacy") as watched:
                    assert sorted(await watched.names()) == ["calc.add", "calc.div"]
                    with pytest.raises(MCPError):
                        await watched.client.call_tool("users.get", {"user_id": 1})


# ------------------------------------------------------------------ stdio: cmd-ipc mcp serve


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_client_over_stdio_round_trip_to_a_worker(mode: str, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cmd_ipc", "mcp", "serve", "mcp_targets:setup", "--id", "agent-tools"],
        env=_env(),
        cwd=str(tmp_path),
    )
    with open(tmp_path / "stderr.log", "w") as errlog:
        async with sdk_client(stdio_client(params, errlog=errlog), mode) as watched:
            client = watched.client
            names = await watched.names()
            assert "calc.add" in names and "_secret" not in names
            assert "w1.echo" not in names
            r = await client.call_tool("calc.add", {"a": 2, "b": 3})
            assert r.structured_content == {"result": 5}
            with pytest.raises(MCPError):
                await client.call_tool("_secret", {})
            # Through MCP, the server spawns a worker: agent -> MCP server -> worker -> back.
            r = await client.call_tool("workers.spawn", {})
            assert not r.is_error, r
            await watched.changed()
            assert "w1.echo" in await watched.names()
            r = await client.call_tool("w1.echo", {"value": {"deep": [1, 2]}})
            assert r.structured_content == {"result": {"deep": [1, 2]}}
            r = await client.call_tool("w1.pid", {})
            assert r.structured_content is not None
            assert r.structured_content["result"] not in (0, os.getpid())
            # Its death is heard too.
            r = await client.call_tool("workers.kill", {})
            assert not r.is_error
            await watched.changed()
            assert "w1.echo" not in await watched.names()
    log = (tmp_path / "stderr.log").read_text()
    assert "serving" in log  # the banner went to stderr, stdout carried MCP only


async def test_cli_over_http_with_token(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmd_ipc",
            "mcp",
            "serve",
            "mcp_targets:setup",
            "--http",
            "127.0.0.1:0",
            "--token",
            "t0ken",
            "--json",
        ],
        env={**os.environ, **_env()},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), DEADLINE)
        info = json.loads(line)
        assert info["url"].startswith("http://127.0.0.1:") and info["tools"] >= 5
        async with CommandRegistry("app") as app:
            channel = MCPClientChannel(
                "tools", info["url"], headers={"Authorization": "Bearer t0ken"}
            )
            await app.register_channel(channel)
            assert await app.execute_command("calc.add", {"a": 4, "b": 5}) == 9
            with pytest.raises(InvalidRequestError):
                await app.execute_command("calc.div", {"a": 1, "b": 0})
        async with CommandRegistry("app2") as app2:
            with pytest.raises(ChannelDisconnectedError):
                await app2.register_channel(MCPClientChannel("tools", info["url"], timeout=5))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=DEADLINE)  # closes the pipes
    assert proc.returncode == 0, err


def test_cli_mcp_usage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cmd_ipc", "mcp", "serve", "mcp_targets:setup", "--token", "x"],
        env={**os.environ, **_env()},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert out.returncode == 2
    assert "--http" in out.stderr


def test_missing_extra_names_it() -> None:
    code = (
        "import sys; sys.modules['mcp'] = None\n"
        "try:\n    import cmd_ipc.mcp\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE
    )
    assert "cmd-ipc[mcp]" in out.stdout, out


# ------------------------------------------------------------------ our client -> SDK server


@pytest.mark.parametrize("mode", MODES)
async def test_client_channel_against_an_sdk_server(mode: str, tmp_path: Path) -> None:
    errlog = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    try:
        async with CommandRegistry("app") as app:
            channel = MCPClientChannel(
                "sdk",
                [sys.executable, str(TESTS / "mcp_targets.py"), "sdk"],
                command_prefix="sdk",
                env=_env(),
                mode=mode,
                stderr=errlog,
                timeout=DEADLINE,
            )
            await app.register_channel(channel)
            assert channel.client is not None
            modern = channel.client.protocol_version in MODERN_PROTOCOL_VERSIONS
            assert modern == (mode == "auto")
            commands = {c["id"]: c for c in app.list_commands()}
            assert {"sdk.add", "sdk.fail", "sdk.slow", "sdk.grow", "sdk.die"} <= set(commands)
            add = commands["sdk.add"]
            assert add["description"] == "Adds two numbers."
            assert add["schema"]["request"]["required"] == ["a", "b"]
            assert add["schema"]["response"]["type"] == "integer"  # unwrapped from "result"
            assert app.route_of("sdk.add") == "sdk"

            assert await app.execute_command("sdk.add", {"a": 2, "b": 40}) == 42
            with pytest.raises(InternalError):
                await app.execute_command("sdk.fail", {"message": "nope"})

            changed = asyncio.Event()
            unsubscribe = app.on_commands_changed(changed.set)
            assert await app.execute_command("sdk.grow") == "grown"
            await asyncio.wait_for(changed.wait(), DEADLINE)
            assert "sdk.extra" in {c["id"] for c in app.list_commands()}
            assert await app.execute_command("sdk.extra", {"x": 4}) == 40

            changed.clear()
            assert await app.execute_command("sdk.shrink") == "shrunk"
            await asyncio.wait_for(changed.wait(), DEADLINE)
            while "sdk.extra" in {c["id"] for c in app.list_commands()}:
                changed.clear()  # the tool is unregistered once the channel re-attached
                await asyncio.wait_for(changed.wait(), DEADLINE)
            await asyncio.wait_for(app.wait_listed("sdk"), DEADLINE)
            with pytest.raises(NotFoundError):
                await app.execute_command("sdk.extra", {"x": 1})
            assert await app.execute_command("sdk.add", {"a": 1, "b": 1}) == 2
            unsubscribe()

            # The server's exit fails a waiting call at once, not at its TTL.
            slow = asyncio.ensure_future(app.execute_command("sdk.slow", {"seconds": 60}))
            await asyncio.sleep(0)  # the request is on its way (not a readiness wait)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with contextlib.suppress(Exception):
                await app.execute_command("sdk.die", timeout=DEADLINE)
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(slow, DEADLINE)
            assert loop.time() - started < DEADLINE / 2
            assert "sdk" not in app.channels
            assert app.route_of("sdk.add") is None
    finally:
        errlog.close()


async def test_client_channel_against_our_server_keeps_codes_and_hears_changes() -> None:
    async with CommandRegistry("tools") as tools, CommandRegistry("app") as app:
        setup_registry(tools)
        await tools.ready()
        async with await serve_http(tools) as http:
            channel = MCPClientChannel("remote", http.url, command_prefix="r")
            await app.register_channel(channel)
            ids = {c["id"] for c in app.list_commands()}
            assert "r.calc.add" in ids and "r._secret" not in ids
            assert await app.execute_command("r.calc.add", {"a": 1, "b": 2}) == 3
            assert await app.execute_command("r.users.get", {"user_id": 3}) == {
                "id": 3,
                "name": "ada",
            }
            assert await app.execute_command("r.text.upper", {"text": "x"}) == "X"
            schema = next(c for c in app.list_commands() if c["id"] == "r.calc.add")["schema"]
            assert schema["response"] == {"type": "integer"}
            with pytest.raises(InvalidRequestError):
                await app.execute_command("r.calc.div", {"a": 1, "b": 0})
            with pytest.raises(InternalError, match="it broke"):
                await app.execute_command("r.boom")
            changed = asyncio.Event()
            app.on_commands_changed(changed.set)
            await tools.register_command("fresh.cmd", lambda: "new")
            await asyncio.wait_for(changed.wait(), DEADLINE)
            assert await app.execute_command("r.fresh.cmd") == "new"
            await app.close_channel("remote")
