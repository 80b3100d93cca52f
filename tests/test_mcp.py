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
import gc
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

mcp = pytest.importorskip("mcp")

import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from cmd_ipc import (  # noqa: E402
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
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

    def mark(self) -> None:
        """Forgets the notifications received so far (call it before the change)."""
        while not self.changes.empty():
            self.changes.get_nowait()

    async def heard(self, condition: Callable[[list[str]], bool]) -> None:
        """Waits (with a deadline) until a notification came since :meth:`mark` after which
        the tool names satisfy ``condition`` (a change may take several notifications)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while True:
            await asyncio.wait_for(self.changes.get(), max(0.0, end - loop.time()))
            if condition(await self.names()):
                return

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
            watched.mark()
            worker = await registry.spawn_worker("w1", "mcp_targets:worker")
            await watched.heard(lambda names: "w1.echo" in names)
            r = await client.call_tool("w1.echo", {"value": [1, "a"]})
            assert r.structured_content == {"result": [1, "a"]}
            assert worker.pid is not None
            watched.mark()
            os.kill(worker.pid, 9)
            await watched.heard(lambda names: "w1.echo" not in names)

            # A private command changes nothing an agent sees: nothing is announced (in
            # either era, an announcement is one publish on the server's bus). The
            # registry calls its listeners in order, in one batch, and the server's
            # publish runs before this test resumes: `seen` is the barrier.
            published: list[object] = []
            unsubscribe = server._bus.subscribe(published.append)
            seen = asyncio.Event()
            unwatch = registry.on_commands_changed(seen.set)
            await registry.register_command("_quiet", lambda: 1)
            await asyncio.wait_for(seen.wait(), DEADLINE)
            assert published == []
            seen.clear()
            watched.mark()
            await registry.register_command("late.one", lambda: 1)
            await asyncio.wait_for(seen.wait(), DEADLINE)
            assert len(published) == 1
            await watched.heard(lambda names: "late.one" in names)
            unwatch()
            unsubscribe()


async def test_a_listing_first_does_not_swallow_the_change() -> None:
    """A client that lists the tools before the server's change watch ran (here: right
    after the call that changed them, with the change seen by the watch's backstop only)
    must not keep the change from the others."""
    async with CommandRegistry("tools") as registry:
        await registry.spawn_worker("w1", "mcp_targets:worker")
        async with (
            MCPServer(registry) as server,
            await serve_http(server) as http,
            sdk_client(http.url, "legacy") as a,
            sdk_client(http.url, "legacy") as b,
        ):
            b.mark()
            r = await a.client.call_tool("w1.grow", {})
            assert not r.is_error, r
            assert "w1.late" in await a.names()  # fresh: the listing refreshes the tools
            await b.heard(lambda names: "w1.late" in names)
            # The same, with the listing handled between the change and the watch's turn.
            b.mark()
            await registry.register_command("local.x", lambda: 1)
            await b.heard(lambda names: "local.x" in names)
            b.mark()
            assert registry.unregister_command("local.x")  # the watch runs at the next turn
            await server._on_list_tools(None, None)  # type: ignore[arg-type]
            await b.heard(lambda names: "local.x" not in names)


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
            watched.mark()
            r = await client.call_tool("workers.spawn", {})
            assert not r.is_error, r
            await watched.heard(lambda names: "w1.echo" in names)
            r = await client.call_tool("w1.echo", {"value": {"deep": [1, 2]}})
            assert r.structured_content == {"result": {"deep": [1, 2]}}
            r = await client.call_tool("w1.pid", {})
            assert r.structured_content is not None
            assert r.structured_content["result"] not in (0, os.getpid())
            # Its death is heard too.
            watched.mark()
            r = await client.call_tool("workers.kill", {})
            assert not r.is_error
            await watched.heard(lambda names: "w1.echo" not in names)
    log = (tmp_path / "stderr.log").read_text()
    assert "serving" in log  # the banner went to stderr (raw stdout: test_raw_stdio...)


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
            "--json",
        ],
        env={**os.environ, **_env(), "CMD_IPC_TOKEN": "t0ken"},  # read with --http
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


HANDSHAKE_REVISIONS = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"]


@pytest.mark.parametrize("version", HANDSHAKE_REVISIONS)
async def test_raw_stdio_in_every_handshake_revision(version: str, tmp_path: Path) -> None:
    """Raw JSON-RPC over ``cmd-ipc mcp serve``'s stdio: every handshake revision gets
    ``tools.listChanged`` and the notification; stdout carries JSON-RPC only while a
    handler (and a child of it) prints; a repeated ``initialized`` does not double the
    notifications; $CMD_IPC_TOKEN (for --http) does not stop a stdio server."""
    with open(tmp_path / "stderr.log", "w") as errlog:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cmd_ipc",
            "mcp",
            "serve",
            "mcp_targets:setup",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            env={**os.environ, **_env(), "CMD_IPC_TOKEN": "for-http-only"},
            cwd=tmp_path,
        )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    notified = 0

    async def send(message: dict[str, Any]) -> None:
        stdin.write(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")
        await stdin.drain()

    async def answer(request_id: int) -> dict[str, Any]:
        """Reads up to the response to ``request_id``, counting the notifications."""
        nonlocal notified
        while True:
            line = await asyncio.wait_for(stdout.readline(), DEADLINE)
            assert line, f"stdout ended; stderr: {(tmp_path / 'stderr.log').read_text()}"
            message = json.loads(line)  # every line of stdout is JSON-RPC
            if message.get("method") == "notifications/tools/list_changed":
                notified += 1
            elif message.get("id") == request_id:
                return dict(message)

    try:
        client = {"name": "raw", "version": "0"}
        params = {"protocolVersion": version, "capabilities": {}, "clientInfo": client}
        await send({"id": 1, "method": "initialize", "params": params})
        init = (await answer(1))["result"]
        assert init["protocolVersion"] == version
        assert init["capabilities"]["tools"]["listChanged"] is True
        await send({"method": "notifications/initialized"})
        await send({"method": "notifications/initialized"})  # a confused client
        params = {"name": "noisy.grow", "arguments": {}}
        await send({"id": 2, "method": "tools/call", "params": params})
        result = (await answer(2))["result"]
        assert result["structuredContent"] == {"result": "grown.0"}
        while notified == 0:
            await send({"id": 3, "method": "ping"})
            await answer(3)
        # Ordered after the notification: a second notification loop would have sent its
        # copy by then.
        await send({"id": 4, "method": "tools/list"})
        tools = [t["name"] for t in (await answer(4))["result"]["tools"]]
        assert "grown.0" in tools
        assert notified == 1
        stdin.close()
        rest = await asyncio.wait_for(stdout.read(), DEADLINE)
        for line in rest.splitlines():
            json.loads(line)
        assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = (tmp_path / "stderr.log").read_text()
    assert "a handler's print" in log and "a child's echo" in log


@pytest.mark.parametrize("mode", MODES)
async def test_client_channel_notices_a_vanished_http_server(mode: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *[sys.executable, "-m", "cmd_ipc", "mcp", "serve", "mcp_targets:setup"],
            *["--http", "127.0.0.1:0", "--json"],
        ],
        env={**os.environ, **_env()},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), DEADLINE)
        url = json.loads(line)["url"]
        async with CommandRegistry("app") as app:
            channel = MCPClientChannel("tools", url, mode=mode, timeout=DEADLINE)
            await app.register_channel(channel)
            assert channel.client is not None
            assert (channel.client.protocol_version in MODERN_PROTOCOL_VERSIONS) == (mode == "auto")
            closed = asyncio.Event()
            app.add_close_listener(lambda cid, _reason: cid == "tools" and closed.set())
            slow = asyncio.ensure_future(
                app.execute_command("slow", {"seconds": 600}, timeout=10 * DEADLINE)
            )
            assert await app.execute_command("slow.started") is True
            proc.kill()  # gone without a word: no graceful close of anything
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(slow, DEADLINE)
            await asyncio.wait_for(closed.wait(), DEADLINE)
            assert "tools" not in app.channels and app.route_of("calc.add") is None
    finally:
        proc.kill()
        proc.communicate(timeout=DEADLINE)


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

            # The server's exit fails a waiting call at once, not at its TTL (which is
            # beyond the deadline: a call failed by its TTL would be a timeout).
            slow = asyncio.ensure_future(
                app.execute_command("sdk.slow", {"seconds": 600}, timeout=10 * DEADLINE)
            )
            assert await app.execute_command("sdk.slow_started") == "started"
            with contextlib.suppress(Exception):
                await app.execute_command("sdk.die", timeout=DEADLINE)
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(slow, DEADLINE)
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


async def test_client_channel_reopens_a_lost_listen_stream() -> None:
    async with (
        CommandRegistry("tools") as tools,
        CommandRegistry("app") as app,
        MCPServer(tools) as server,
        await serve_http(server) as http,
    ):
        channel = MCPClientChannel("remote", http.url, command_prefix="r", mode="auto")
        await app.register_channel(channel)
        assert channel.client is not None
        assert channel.client.protocol_version in MODERN_PROTOCOL_VERSIONS
        changed = asyncio.Event()
        app.on_commands_changed(changed.set)

        async def until_listed(command_id: str) -> None:
            while command_id not in {c["id"] for c in app.list_commands()}:
                changed.clear()
                await asyncio.wait_for(changed.wait(), DEADLINE)

        # A change heard: the listen stream is open.
        await tools.register_command("first", lambda: 1)
        await until_listed("r.first")
        # The HTTP listen streams end (gracefully) while the server goes on, as behind
        # a proxy that drops long streams: the channel opens its stream again and lists
        # the tools again, so neither a change made meanwhile nor a later one is lost.
        server._http_listen.close()
        await tools.register_command("second", lambda: 2)
        await until_listed("r.second")
        await tools.register_command("third", lambda: 3)
        await until_listed("r.third")
        assert await app.execute_command("r.second") == 2


async def test_client_channel_call_timeout_is_timeout() -> None:
    async with CommandRegistry("tools") as tools, CommandRegistry("app") as app:
        setup_registry(tools)
        await tools.ready()
        async with await serve_http(tools) as http:
            channel = MCPClientChannel("remote", http.url, timeout=DEADLINE)
            await app.register_channel(channel)
            channel.timeout = 0.2  # each call's timeout, read at each call
            with pytest.raises(CommandTimeoutError):
                await app.execute_command("slow", {"seconds": 600}, timeout=DEADLINE)
            assert await app.execute_command("calc.add", {"a": 1, "b": 1}) == 2


async def test_connect_timeout_cancels_the_attempt() -> None:
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with CommandRegistry("app") as app:
            mute = [sys.executable, "-c", "import time; time.sleep(600)"]  # never answers
            for mode in MODES:
                channel = MCPClientChannel("mute", mute, mode=mode, timeout=0.5)
                with pytest.raises(ChannelDisconnectedError, match="did not answer"):
                    await asyncio.wait_for(app.register_channel(channel), DEADLINE)
                assert "mute" not in app.channels
        gc.collect()  # an abandoned future with an exception reports it when collected
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reported] == []


def test_client_channel_options() -> None:
    with pytest.raises(ValueError, match="env"):
        MCPClientChannel("x", "http://127.0.0.1:1/mcp", env={"A": "1"})
    with pytest.raises(ValueError, match="headers"):
        MCPClientChannel("x", ["server"], headers={"A": "1"})


async def test_result_and_request_shapes(caplog: pytest.LogCaptureFixture) -> None:
    async with CommandRegistry("shapes") as registry:
        # A result that contradicts the advertised object outputSchema is an error.
        await registry.register_command(
            "obj.none", lambda: None, schema={"response": {"type": "object"}}, validate=False
        )
        await registry.register_command(
            "obj.list", lambda: [1], schema={"response": {"type": "object"}}, validate=False
        )
        # A request schema that admits no object cannot be called: not a tool.
        await registry.register_command(
            "scalar.req", lambda: 1, schema={"request": {"type": "integer"}}, validate=False
        )
        # One that names no type (a $ref) is an object schema to MCP.
        defs = {"R": {"type": "object", "properties": {"x": {"type": "integer"}}}}
        await registry.register_command(
            "ref.req",
            lambda x=0: x,
            schema={"request": {"$ref": "#/$defs/R", "$defs": defs}},
            validate=False,
        )
        with caplog.at_level("WARNING", logger="cmd_ipc.mcp"):
            async with (
                await serve_http(registry) as http,
                sdk_client(http.url, "legacy") as watched,
            ):
                tools = {t.name: t for t in (await watched.client.list_tools()).tools}
                assert "scalar.req" not in tools
                assert tools["ref.req"].input_schema == {
                    "$ref": "#/$defs/R",
                    "$defs": defs,
                    "type": "object",
                }
                for name in ("obj.none", "obj.list"):
                    r = await watched.client.call_tool(name, {})
                    assert r.is_error and r.structured_content is not None
                    assert r.structured_content["code"] == "internal_error"
                    assert "response schema" in r.structured_content["message"]
                r = await watched.client.call_tool("ref.req", {"x": 4})
                assert r.structured_content == {"result": 4}
                with pytest.raises(MCPError):
                    await watched.client.call_tool("scalar.req", {})
        warned = [r.getMessage() for r in caplog.records if "scalar.req" in r.getMessage()]
        assert len(warned) == 1 and "admits no object" in warned[0]
    with pytest.raises(ValueError, match="admits no object"):
        command_tool({"id": "s", "schema": {"request": {"type": "integer"}}})


async def test_http_close_ends_sessions_and_leaves_a_given_server_open() -> None:
    async with CommandRegistry("tools") as tools, CommandRegistry("app") as app:
        setup_registry(tools)
        await tools.ready()
        async with MCPServer(tools) as server:
            for mode in MODES:
                http = await serve_http(server, shutdown_timeout=3 * DEADLINE)
                channel = MCPClientChannel("remote", http.url, mode=mode, timeout=DEADLINE)
                await app.register_channel(channel)
                slow = asyncio.ensure_future(
                    app.execute_command("slow", {"seconds": 600}, timeout=10 * DEADLINE)
                )
                assert await app.execute_command("slow.started") is True
                # A connected client and a call in flight: the server closes at once (it
                # ends the sessions, the streams and the call) instead of waiting out the
                # graceful timeout, beyond the deadline here.
                await asyncio.wait_for(http.close(), DEADLINE)
                with pytest.raises(ChannelDisconnectedError):
                    await asyncio.wait_for(slow, DEADLINE)
                with contextlib.suppress(KeyError):
                    await app.close_channel("remote")
                # The MCPServer was given: still following the registry.
                assert server._unsubscribe is not None
