"""HTTP: HTTPChannel (client) and create_app/add_routes/serve (server), against real servers
on 127.0.0.1 (free ports, started and stopped by each test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import spec_support
from aiohttp import web
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
    InMemoryChannel,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    _core,
)
from cmd_ipc.http import HTTPChannel, HTTPServer, add_routes, create_app, serve
from helpers import eventually, link, new_id, registries, settle

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]
Serve = Callable[..., Awaitable[HTTPServer]]
StartApp = Callable[..., Awaitable[str]]

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
async def servers() -> AsyncIterator[Serve]:
    """``await servers(registry, **options)`` -> a running :class:`HTTPServer`, closed at
    teardown."""
    made: list[HTTPServer] = []

    async def start(registry: CommandRegistry, **options: Any) -> HTTPServer:
        options.setdefault("shutdown_timeout", 0.1)
        server = await serve(registry, **options)
        made.append(server)
        return server

    yield start
    for server in reversed(made):
        await server.close()


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


# ------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------ calls


async def test_call_server_command_and_child_command(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    child = registries("child", router_channel="api")
    await link(api, child)
    await child.register_command("child.echo", lambda text: {"echo": text, "by": "child"})
    server = await servers(api)

    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url))
    # register_channel returned: the server's commands are routable through the channel.
    assert client.route_of("calc.add") == "api"
    assert client.route_of("child.echo") == "api"
    assert client.route_of("_secret") is None
    assert await client.execute_command("calc.add", {"a": 2, "b": 3}) == 5
    assert runs["calc.add"] == 1
    # A command of the server's child: routed by the server's registry down its tree.
    assert await client.execute_command("child.echo", {"text": "hi"}) == {
        "echo": "hi",
        "by": "child",
    }
    # Concurrent calls share the connection pool and each gets its own answer.
    results = await asyncio.gather(
        *(client.execute_command("calc.add", {"a": i, "b": 1}) for i in range(20))
    )
    assert results == [i + 1 for i in range(20)]
    # Nothing is left waiting at the server.
    assert in_flight(api) == ({"child"}, 0)
    stats = api.stats()
    assert [c for c in stats["channels"] if c.startswith("http:")] == ["http:/cmd"]
    assert stats["dropped"] == 0 and stats["pending_forwards"] == 0


async def test_command_prefix(registries: Make, servers: Serve, apps: StartApp) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    seen: list[tuple[dict[str, str], bytes]] = []
    proxy = await apps(recorder_app(server.url, seen))

    client = registries("client")
    await client.register_channel(HTTPChannel("api", proxy, command_prefix="remote"))
    ids = [c["id"] for c in client.list_commands()]
    assert ids == ["remote.calc.add", "remote.stuck", "remote.typed.add"]
    described = next(c for c in client.list_commands() if c["id"] == "remote.typed.add")
    assert described["description"] == "Adds two integers"
    assert described["schema"]["request"]["properties"]["a"]["type"] == "integer"
    assert await client.execute_command("remote.calc.add", {"a": 1, "b": 2}) == 3
    with pytest.raises(NotFoundError):
        await client.execute_command("calc.add", {"a": 1, "b": 2})
    # On the wire the prefix is gone.
    wire = [json.loads(body) for _, body in seen]
    executes = [m for m in wire if m["type"] == "execute.command.request"]
    assert [m["commandId"] for m in executes] == ["calc.add"]
    assert runs["calc.add"] == 1


async def test_typed_command_rejects_invalid_request(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url))
    assert await client.execute_command("typed.add", {"a": "2", "b": 3}) == 5
    with pytest.raises(InvalidRequestError) as info:
        await client.execute_command("typed.add", {"a": "two", "b": 3})
    assert "a" in info.value.message
    assert runs["typed.add"] == 1  # the handler never ran for the invalid one


async def test_private_command_is_not_found_over_http(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    # Raw: an execute of a private id is answered not_found, the handler never runs.
    msg = execute("_secret")
    async with session.post(server.url + "/cmd", json=msg, headers=JSON_HEADERS) as r:
        assert r.status == 200
        (answer,) = ndjson_lines(await r.read())
    spec_support.validate_message(answer)
    assert answer["thid"] == msg["id"]
    assert answer["response"]["ok"] is False
    assert answer["response"]["error"]["code"] == "not_found"
    # Through an HTTPChannel driven by hand (a registry would not even route it).
    frames: list[bytes] = []
    closes: list[str | None] = []
    channel = HTTPChannel("api", server.url)
    await channel.start(frames.append, closes.append)
    try:
        channel.send(json.dumps(execute("_secret", id="p-1")).encode())
        await eventually(lambda: frames, timeout=5)
        reply = spec_support.validate_frame(frames[0], "json")
        assert reply["thid"] == "p-1"
        assert reply["response"]["error"]["code"] == "not_found"
    finally:
        await channel.close()
    assert closes == [None]
    # And through a registry: not advertised, so not found.
    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url))
    with pytest.raises(NotFoundError):
        await client.execute_command("_secret")
    assert runs["_secret"] == 0


# ------------------------------------------------------------------------------ auth


async def test_token_required(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api, token="s3cret-token")
    body = json.dumps(execute("calc.add", {"a": 1, "b": 2}))
    url = server.url + "/cmd"

    async with session.post(url, data=body, headers=JSON_HEADERS) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for bad in ("Bearer wrong", "Bearer s3cret-token-but-longer", "Basic s3cret-token", "Bearer"):
        async with session.post(
            url, data=body, headers={**JSON_HEADERS, "Authorization": bad}
        ) as r:
            assert r.status == 401, bad
    assert runs["calc.add"] == 0
    assert not api.channels  # nothing reached the registry

    good = {**JSON_HEADERS, "Authorization": "Bearer s3cret-token"}
    async with session.post(url, data=body, headers=good) as r:
        assert r.status == 200
        (answer,) = ndjson_lines(await r.read())
    assert answer["response"] == {"ok": True, "result": 3}
    assert runs["calc.add"] == 1

    # An HTTPChannel with a bad token cannot be registered, and says why.
    client = registries("client")
    with pytest.raises(ChannelDisconnectedError) as info:
        await client.register_channel(HTTPChannel("api", server.url, token="wrong"))
    assert "401" in info.value.message
    assert isinstance(info.value.__cause__, aiohttp.ClientResponseError)
    assert info.value.__cause__.status == 401
    assert not client.channels
    # With the right one it works.
    await client.register_channel(HTTPChannel("api", server.url, token="s3cret-token"))
    assert await client.execute_command("calc.add", {"a": 2, "b": 2}) == 4


async def test_token_checked_before_the_body_is_read(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api, token="s3cret-token")
    # Headers only, announcing a body that never comes: the 401 still arrives, and the
    # server closes the connection instead of waiting for the body.
    head = (
        b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    response = await raw(server.port, head)
    assert status_of(response) == 401
    assert runs == {"calc.add": 0, "typed.add": 0, "_secret": 0, "stuck": 0}


async def test_schema_document_needs_the_token_unless_opted_out(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, _ = await api_with_commands(registries)
    # With a token, the command list is protected like the commands themselves...
    closed_server = await servers(api, token="t0ken")
    async with session.get(closed_server.url + "/cmds.json") as r:
        assert r.status == 401
    async with session.get(
        closed_server.url + "/cmds.json", headers={"Authorization": "Bearer wrong"}
    ) as r:
        assert r.status == 401
    async with session.get(
        closed_server.url + "/cmds.json", headers={"Authorization": "Bearer t0ken"}
    ) as r:
        assert r.status == 200
    # ...unless the server says explicitly that it is public; the calls stay protected.
    open_server = await servers(api, token="t0ken", schema_auth=False)
    async with session.get(open_server.url + "/cmds.json") as r:
        assert r.status == 200
    async with session.post(
        open_server.url + "/cmd", json=execute("calc.add"), headers=JSON_HEADERS
    ) as r:
        assert r.status == 401
    # Without a token there is nothing to require.
    async with session.get((await servers(api)).url + "/cmds.json") as r:
        assert r.status == 200
    with pytest.raises(ValueError, match="needs a token"):
        create_app(api, schema_auth=True)


# ------------------------------------------------------------------------------ what may cross


@pytest.mark.parametrize(
    "message",
    [
        {"id": "r-1", "type": "register.command.request", "command": {"id": "evil.cmd"}},
        {"id": "r-2", "type": "register.command.request", "command": {"id": "calc.add"}},
        {"id": "e-1", "type": "event", "eventId": "ping", "payload": {"x": 1}},
        {"id": "s-1", "type": "register.command.response", "thid": "x", "response": {"ok": True}},
        {
            "id": "s-2",
            "type": "execute.command.response",
            "thid": "x",
            "response": {"ok": True, "result": 1},
        },
        {"id": "s-3", "type": "list.commands.response", "thid": "x", "commands": []},
    ],
    ids=lambda m: m["type"] + ":" + m["id"],
)
async def test_messages_that_may_not_cross_are_forbidden(
    registries: Make, servers: Serve, session: aiohttp.ClientSession, message: dict[str, Any]
) -> None:
    api, _ = await api_with_commands(registries)
    got: list[Any] = []
    api.add_event_listener("ping", got.append)
    before = api.list_commands()
    server = await servers(api)
    async with session.post(server.url + "/cmd", json=message, headers=JSON_HEADERS) as r:
        assert r.status == 403
        error = await r.json()
    assert error == {"error": f"Message type {message['type']} is not allowed"}
    await settle()
    assert api.list_commands() == before
    assert api.route_of("evil.cmd") is None
    assert api.route_of("calc.add") == "local"
    assert got == []
    assert not api.channels
    assert api.stats()["dropped"] == 0
    assert await api.execute_command("calc.add", {"a": 1, "b": 1}) == 2


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        b'{"type": "execute.command.request", "commandId": "calc.add"}',
        b'{"id": "x", "type": "execute.command.request"}',
        b'{"id": "x", "type": "execute.command.request", "commandId": "calc.add", "extra": 1}',
        b'{"id": "x", "type": "execute.command.request", "commandId": "calc.add", "request": 1}',
        b'{"id": "", "type": "list.commands.request"}',
        b'{"id": "x", "type": "no.such.type"}',
    ],
)
async def test_invalid_messages_are_bad_requests(
    registries: Make, servers: Serve, session: aiohttp.ClientSession, body: bytes
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    async with session.post(server.url + "/cmd", data=body, headers=JSON_HEADERS) as r:
        assert r.status == 400
        error = await r.json()
    assert error["error"] == "Invalid message format"
    assert error["issues"] and all(isinstance(i, str) for i in error["issues"])
    assert runs["calc.add"] == 0
    assert not api.channels


# ------------------------------------------------------------------------------ limits


async def test_body_over_the_limit_is_refused_unread(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api, max_body=1000)
    # A declared length of 10 GB: the 413 arrives at once and the connection is closed
    # (raw() reads until EOF) without one byte of the body having been sent.
    head = (
        b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000000\r\n\r\n"
    )
    response = await raw(server.port, head)
    assert status_of(response) == 413
    assert b"Connection: close" in response
    # With Expect: 100-continue the client is told before it sends anything (no 100).
    response = await raw(server.port, head[:-2] + b"Expect: 100-continue\r\n\r\n")
    assert status_of(response) == 413
    assert b"100 Continue" not in response
    assert runs["calc.add"] == 0
    assert not api.channels
    # Under the limit, the client gets its 100 Continue, sends the body, gets its answer.
    body = json.dumps(execute("calc.add", {"a": 1, "b": 2})).encode()
    head = (
        b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert status_of(response) == 200
    assert ndjson_lines(response.split(b"\r\n\r\n", 1)[1])[0]["response"]["result"] == 3
    assert runs["calc.add"] == 1


async def test_chunked_body_is_cut_off_at_the_limit(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api, max_body=1000)
    head = (
        b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 600
    chunks = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2  # 1200 bytes, never terminated
    response = await raw(server.port, head + chunks)
    assert status_of(response) == 413
    # Under the limit, a chunked message is fine.
    body = json.dumps(execute("calc.add", {"a": 1, "b": 2})).encode()
    ok = head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    response = await raw(
        server.port, ok.replace(b"chunked\r\n", b"chunked\r\nConnection: close\r\n")
    )
    assert status_of(response) == 200
    assert runs["calc.add"] == 1


async def test_slow_sender_is_dropped_while_others_are_served(
    registries: Make, servers: Serve
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api, read_timeout=1.0)
    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url))
    body = json.dumps(execute("calc.add", {"a": 1, "b": 2})).encode()
    head = (
        b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    # Half the body, then silence.
    slow = asyncio.ensure_future(raw(server.port, head + body[: len(body) // 2]))
    await asyncio.sleep(0)  # let it connect
    for i in range(5):
        assert await client.execute_command("calc.add", {"a": i, "b": 1}) == i + 1
    assert not slow.done()  # the slow request is still waiting: others were served meanwhile
    response = await asyncio.wait_for(slow, 10)
    assert status_of(response) == 408  # then answered and its connection dropped
    assert runs["calc.add"] == 5
    assert in_flight(api) == (set(), 0)


async def test_half_sent_headers_are_dropped(registries: Make, servers: Serve) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api, keepalive_timeout=0.3)
    response = await raw(server.port, b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert response == b""  # closed without an answer


# ------------------------------------------------------------------------------ failures


def fake_server_app(calls: list[str]) -> web.Application:
    """A misbehaving server: lists ``x.*`` commands, and answers each execute as its id says."""

    def line(msg: dict[str, Any]) -> bytes:
        return json.dumps(msg).encode() + b"\n"

    def ok(thid: str, result: Any) -> dict[str, Any]:
        return {
            "id": new_id(),
            "type": "execute.command.response",
            "thid": thid,
            "response": {"ok": True, "result": result},
        }

    commands = ["x.500", "x.garbage", "x.wrongthid", "x.empty", "x.slow", "x.two", "x.bare"]

    async def handle(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        if msg["type"] == "list.commands.request":
            listed = {
                "id": new_id(),
                "type": "list.commands.response",
                "thid": msg["id"],
                "commands": [{"id": c} for c in commands],
            }
            return web.Response(body=line(listed), content_type="application/x-ndjson")
        how = msg["commandId"]
        calls.append(how)
        if how == "x.500":
            return web.Response(status=500, text="boom")
        if how == "x.garbage":
            return web.Response(text="this is not json\n")
        if how == "x.wrongthid":
            return web.Response(body=line(ok("someone-else", 1)))
        if how == "x.empty":
            return web.Response(body=b"")
        if how == "x.slow":
            await asyncio.sleep(30)
        if how == "x.two":
            return web.Response(body=line(ok(msg["id"], "first")) + line(ok(msg["id"], "second")))
        # x.bare: one line without its newline (accepted)
        return web.Response(body=json.dumps(ok(msg["id"], "bare")).encode())

    app = web.Application()
    app.router.add_post("/cmd", handle)
    return app


@pytest.mark.parametrize(
    ("command", "error", "fragment"),
    [
        ("x.500", InternalError, "HTTP 500"),
        ("x.garbage", InternalError, "invalid answer"),
        ("x.wrongthid", InternalError, "someone-else"),
        ("x.empty", InternalError, "empty answer"),
        ("x.slow", CommandTimeoutError, "within 0.5s"),
    ],
)
async def test_bad_answers_fail_the_call_at_once(
    registries: Make, apps: StartApp, command: str, error: type[Exception], fragment: str
) -> None:
    calls: list[str] = []
    url = await apps(fake_server_app(calls))
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("x", url, timeout=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(error) as info:
        await client.execute_command(command)
    assert loop.time() - started < 10.0  # well under the request TTL
    assert fragment in str(info.value)
    assert calls == [command]
    # The channel is still there and works for good answers.
    assert await client.execute_command("x.two") == "first"
    assert await client.execute_command("x.bare") == "bare"


async def test_synthesized_failures_are_valid_messages(apps: StartApp) -> None:
    url = await apps(fake_server_app([]))
    frames: list[bytes] = []
    channel = HTTPChannel("x", url, timeout=0.5)
    await channel.start(frames.append, lambda reason: None)
    try:
        for i, command in enumerate(["x.500", "x.garbage", "x.slow"]):
            channel.send(json.dumps(execute(command, id=f"req-{i}")).encode())
        await eventually(lambda: len(frames) == 3, timeout=10)
    finally:
        await channel.close()
    replies = {m["thid"]: m for m in (spec_support.validate_frame(f, "json") for f in frames)}
    assert replies["req-0"]["response"]["error"]["code"] == "internal_error"
    assert replies["req-1"]["response"]["error"]["code"] == "internal_error"
    assert replies["req-2"]["response"]["error"]["code"] == "timeout"
    for reply in replies.values():
        spec_support.validator("execute.command.response.json").validate(reply)


async def test_failed_listing_closes_the_channel(registries: Make, apps: StartApp) -> None:
    lists = {"n": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        lists["n"] += 1
        if lists["n"] > 1:  # the probe passes, the registry's own listing fails
            return web.Response(status=502)
        listed = {"id": new_id(), "type": "list.commands.response", "thid": msg["id"]}
        return web.Response(body=json.dumps({**listed, "commands": []}).encode() + b"\n")

    app = web.Application()
    app.router.add_post("/cmd", handle)
    url = await apps(app)
    client = registries("client", request_ttl=0.5)
    with pytest.raises(ChannelDisconnectedError):
        await client.register_channel(HTTPChannel("api", url))
    assert not client.channels
    assert lists["n"] == 2


async def test_unreachable_server(registries: Make) -> None:
    client = registries("client")
    with pytest.raises(ChannelDisconnectedError) as info:
        await client.register_channel(HTTPChannel("api", f"http://127.0.0.1:{free_port()}"))
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)
    assert not client.channels


async def test_server_stopped_mid_session(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    assert await client.execute_command("calc.add", {"a": 1, "b": 1}) == 2
    await server.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ChannelDisconnectedError):
        await client.execute_command("calc.add", {"a": 1, "b": 2})
    assert loop.time() - started < 10.0
    # Nothing is lost for good: HTTP is stateless, a server back on the port answers.
    await servers(api, port=server.port)
    assert await client.execute_command("calc.add", {"a": 1, "b": 3}) == 4
    assert runs["calc.add"] == 2


async def test_call_in_flight_when_the_server_dies(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    call = asyncio.ensure_future(client.execute_command("stuck"))
    await eventually(lambda: runs["stuck"] == 1, timeout=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.close()
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 10)
    assert loop.time() - started < 10.0
    # The endpoint's channel was detached with the server.
    assert not api.channels


async def test_closing_the_channel_fails_calls_in_flight(registries: Make, servers: Serve) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    call = asyncio.ensure_future(client.execute_command("stuck"))
    await eventually(lambda: runs["stuck"] == 1, timeout=5)
    await client.close_channel("api")
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 5)
    assert client.route_of("calc.add") is None
    # The server notices the client went away and stops waiting for its answer.
    await eventually(lambda: in_flight(api) == (set(), 0), timeout=5)


async def test_answer_timeout(registries: Make, servers: Serve) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api, answer_timeout=0.3)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    with pytest.raises(CommandTimeoutError):
        await asyncio.wait_for(client.execute_command("stuck"), 10)
    assert in_flight(api) == (set(), 0)


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_gone_before_the_answer_leaks_nothing(
    registries: Make,
    apps: StartApp,
    session: aiohttp.ClientSession,
    handler_cancellation: bool,
) -> None:
    api, runs = await api_with_commands(registries)
    # Mounted by hand; without handler_cancellation the endpoint notices by itself.
    app = web.Application()
    add_routes(app, api)
    url = await apps(app, handler_cancellation=handler_cancellation)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            url + "/cmd",
            json=execute("stuck"),
            headers=JSON_HEADERS,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as r:
            await r.read()
    assert runs["stuck"] == 1
    await eventually(lambda: in_flight(api) == (set(), 0), timeout=5)


# ------------------------------------------------------------------------------ hooks


async def test_headers_hook_and_middleware_are_applied(
    registries: Make, servers: Serve, apps: StartApp
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api, token="tok")
    seen: list[tuple[dict[str, str], bytes]] = []
    proxy = await apps(recorder_app(server.url, seen))
    generation = {"n": 0}

    async def headers() -> dict[str, str]:
        generation["n"] += 1
        return {"X-Generation": str(generation["n"])}

    through: list[str] = []

    async def middleware(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        request.headers["X-Middleware"] = "yes"
        through.append(str(request.url))
        return await handler(request)

    client = registries("client")
    channel = HTTPChannel("api", proxy, token="tok", headers=headers, middlewares=[middleware])
    await client.register_channel(channel)
    assert await client.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    # probe list + registry list + execute
    assert len(seen) == 3
    assert [h["X-Generation"] for h, _ in seen] == ["1", "2", "3"]
    assert all(h["X-Middleware"] == "yes" for h, _ in seen)
    assert all(h["Authorization"] == "Bearer tok" for h, _ in seen)
    assert through == [proxy + "/cmd"] * 3


async def test_middleware_retries(registries: Make, servers: Serve, apps: StartApp) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    failures = {"left": 2}

    async def flaky(request: web.Request) -> web.StreamResponse:
        if failures["left"]:
            failures["left"] -= 1
            return web.Response(status=503)
        body = await request.read()
        async with (
            aiohttp.ClientSession() as s,
            s.post(server.url + "/cmd", data=body, headers=JSON_HEADERS) as r,
        ):
            return web.Response(body=await r.read(), content_type="application/x-ndjson")

    app = web.Application()
    app.router.add_post("/cmd", flaky)
    url = await apps(app)

    async def retry(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        for _ in range(5):
            response = await handler(request)
            if response.status != 503:
                return response
            response.release()
        return response

    client = registries("client")
    await client.register_channel(HTTPChannel("api", url, middlewares=[retry]))
    assert await client.execute_command("calc.add", {"a": 2, "b": 2}) == 4
    assert failures["left"] == 0


async def test_events_and_registrations_do_not_cross(
    registries: Make, servers: Serve, apps: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    api, _ = await api_with_commands(registries)
    got: list[Any] = []
    api.add_event_listener("ping", got.append)
    server = await servers(api)
    seen: list[tuple[dict[str, str], bytes]] = []
    proxy = await apps(recorder_app(server.url, seen))
    leaf = registries("leaf", router_channel="api", request_ttl=0.5)
    await leaf.register_channel(HTTPChannel("api", proxy))
    leaf.emit_event("ping", {"x": 1})
    with (
        caplog.at_level(logging.WARNING, logger="cmd_ipc.http"),
        pytest.raises(CommandTimeoutError),
    ):
        await leaf.register_command("leaf.cmd", lambda: None)
    assert "router_channel" in caplog.text
    await settle()
    assert got == []
    assert {json.loads(body)["type"] for _, body in seen} == {"list.commands.request"}
    assert api.route_of("leaf.cmd") is None


# ------------------------------------------------------------------------------ wire


async def test_typescript_client_bytes(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    # What JSON.stringify gives for the TS client's messages (its key order, no spaces).
    ts_execute = (
        b'{"type":"execute.command.request","id":"request-123",'
        b'"commandId":"calc.add","request":{"a":1,"b":2}}'
    )
    ts_list = b'{"id":"c1a7c1e0-6a52-4f0e-9d0b-2b8b4b7f0a11","type":"list.commands.request"}'
    for body, schema in (
        (ts_execute, "execute.command.response.json"),
        (ts_list, "list.commands.response.json"),
    ):
        async with session.post(server.url + "/cmd", data=body, headers=JSON_HEADERS) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/x-ndjson"
            raw_body = await r.read()
        lines = ndjson_lines(raw_body)
        assert len(lines) == 1
        spec_support.validator(schema).validate(lines[0])
        assert lines[0]["thid"] == json.loads(body)["id"]
    assert lines[0]["commands"][0] == {"id": "calc.add", "description": "Adds two numbers"}


async def test_client_bodies_follow_the_spec(
    registries: Make, servers: Serve, apps: StartApp
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    seen: list[tuple[dict[str, str], bytes]] = []
    proxy = await apps(recorder_app(server.url, seen))
    client = registries("client")
    await client.register_channel(HTTPChannel("api", proxy, command_prefix="p"))
    await client.execute_command("p.calc.add", {"a": 1, "b": 2})
    await client.execute_command("p.typed.add", {"a": 1, "b": 2})
    client.emit_event("ping")
    await settle()
    assert len(seen) == 4
    for headers, body in seen:
        assert headers["Content-Type"] == "application/json"
        assert headers["Accept"] == "application/x-ndjson"
        msg = json.loads(body)
        spec_support.validate_message(msg)
        assert msg["type"] in ("list.commands.request", "execute.command.request")


async def test_cmds_json(registries: Make, servers: Serve, session: aiohttp.ClientSession) -> None:
    api, _ = await api_with_commands(registries)
    child = registries("child", router_channel="api")
    await link(api, child)
    await child.register_command("child.echo", lambda text: text)
    server = await servers(api, token="tok")
    async with session.get(server.url + "/cmds.json", headers={"Authorization": "Bearer tok"}) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["cmdschema"] == "1.0.0"
    by_id = {c["id"]: c for c in doc["commands"]}
    assert sorted(by_id) == ["calc.add", "child.echo", "stuck", "typed.add"]
    check = spec_support.validator("command-definition.json")
    for c in doc["commands"]:
        check.validate(c)
    assert by_id["typed.add"]["description"] == "Adds two integers"
    assert by_id["typed.add"]["schema"]["request"]["required"] == ["a", "b"]
    assert by_id["typed.add"]["schema"]["response"]["type"] == "integer"
    assert in_flight(api) == ({"child"}, 0)


async def test_mounting(registries: Make, apps: StartApp, session: aiohttp.ClientSession) -> None:
    api, _ = await api_with_commands(registries)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    # add_routes on an existing app, at another path...
    app = web.Application()
    app.router.add_get("/health", health)
    add_routes(app, api, path="/rpc/cmd", schema_path="/rpc/cmds.json")
    # ...and create_app as a sub-application.
    app.add_subapp("/v1", create_app(api))
    url = await apps(app)
    async with session.get(url + "/health") as r:
        assert await r.text() == "ok"
    async with session.get(url + "/rpc/cmds.json") as r:
        assert r.status == 200
    client = registries("client")
    await client.register_channel(HTTPChannel("a", url, path="/rpc/cmd", command_prefix="a"))
    await client.register_channel(HTTPChannel("b", url + "/v1/", command_prefix="b"))
    assert await client.execute_command("a.calc.add", {"a": 1, "b": 2}) == 3
    assert await client.execute_command("b.calc.add", {"a": 2, "b": 2}) == 4


async def test_shared_session_stays_open(registries: Make, servers: Serve) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    async with aiohttp.ClientSession() as shared:
        client = registries("client")
        await client.register_channel(HTTPChannel("api", server.url, session=shared))
        assert await client.execute_command("calc.add", {"a": 1, "b": 2}) == 3
        await client.close_channel("api")
        assert not shared.closed
        async with shared.get(server.url + "/cmds.json") as r:
            assert r.status == 200


async def test_closed_registry_is_unavailable(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    await api.close()
    async with session.post(
        server.url + "/cmd", json=execute("calc.add"), headers=JSON_HEADERS
    ) as r:
        assert r.status == 503
    async with session.get(server.url + "/cmds.json") as r:
        assert r.status == 503


def test_channel_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        HTTPChannel("api", "ftp://example.com")
    with pytest.raises(ValueError):
        HTTPChannel("api", "http://example.com", timeout=0)
    with pytest.raises(ValueError):
        HTTPChannel("api", "http://example.com", command_prefix="")
    channel = HTTPChannel("api", "http://example.com/base/", command_prefix="p")
    assert channel.url == "http://example.com/base/cmd"
    with pytest.raises(ValueError):
        create_app(CommandRegistry("x"), max_body=0)


async def test_same_id_twice_in_flight_is_refused_and_answers_never_cross(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api, answer_timeout=5.0)
    first = asyncio.ensure_future(
        session.post(server.url + "/cmd", json=execute("stuck", id="same"), headers=JSON_HEADERS)
    )
    await eventually(lambda: runs["stuck"] == 1, timeout=5)
    async with session.post(
        server.url + "/cmd", json=execute("calc.add", {"a": 1, "b": 2}, id="same"),
        headers=JSON_HEADERS,
    ) as resp:  # fmt: skip
        assert resp.status == 409
        assert "already in flight" in (await resp.json())["error"]
    assert runs["calc.add"] == 0
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await eventually(lambda: in_flight(api) == (set(), 0), timeout=5)


@pytest.mark.parametrize("message_id", ['q"uote', "back\\slash", "ünï\u2028code", "x" * 300])
async def test_any_string_id_gets_its_own_answer(
    registries: Make, servers: Serve, session: aiohttp.ClientSession, message_id: str
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    body = execute("calc.add", {"a": 40, "b": 2}, id=message_id)
    async with session.post(server.url + "/cmd", json=body, headers=JSON_HEADERS) as resp:
        assert resp.status == 200
        answer = json.loads((await resp.read()).split(b"\n")[0])
    assert answer["thid"] == message_id
    assert answer["response"] == {"ok": True, "result": 42}


async def test_events_do_not_reach_http_clients_and_do_not_disturb_answers(
    registries: Make, servers: Serve
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url))
    heard: list[Any] = []
    client.add_event_listener("news", heard.append)
    for i in range(3):
        # An event whose payload imitates an answer is still just an event.
        api.emit_event("news", {"type": "execute.command.response", "thid": "x", "i": i})
        assert await client.execute_command("calc.add", {"a": i, "b": 0}) == i
    assert heard == []


# ------------------------------------------------------------------------------ decoding once


class HeadRecorder(InMemoryChannel):
    """An in-memory channel that records the head the registry gives with each frame."""

    heads: list[tuple[bytes, tuple[str, str, str | None]]]

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        self.heads.append((frame, (kind, message_id, reference)))
        super().send_with_head(frame, kind, message_id, reference)


async def test_the_registry_gives_each_frame_its_head(registries: Make) -> None:
    """What Rust reads of a message before encoding it is what the frame says, for every
    kind a channel is sent (so HTTP routes frames without parsing them again)."""
    from cmd_ipc.channels.http import _head

    root, child = registries("root"), registries("child", router_channel="root")
    HeadRecorder.heads = []
    to_child, to_root = HeadRecorder.pair("child", "root")
    await root.register_channel(to_child)
    await child.register_channel(to_root)
    await child.register_command("calc.add", lambda a, b: a + b)
    await root.register_command("root.echo", lambda v: v)
    assert await root.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    assert await child.execute_command("root.echo", {"v": "x"}) == "x"
    root.emit_event("news", {"n": 1})  # sent (and recorded) before emit_event returns
    kinds = {head[0] for _, head in HeadRecorder.heads}
    assert kinds >= {
        "list.commands.request",
        "list.commands.response",
        "register.command.request",
        "register.command.response",
        "execute.command.request",
        "execute.command.response",
        "event",
    }
    for frame, head in HeadRecorder.heads:
        json_frame = _core.transcode(frame, "msgpack", "json")
        assert head == _head(json_frame), json.loads(json_frame)


def test_with_command_id_renames_an_execute_request_only() -> None:
    request = {"id": "q", "type": "execute.command.request", "commandId": "api.calc"}
    request["request"] = {"x": 1.5e300, "s": "api.calc"}
    frame = _core.transcode(json.dumps(request).encode(), "json", "json")
    renamed = json.loads(_core.with_command_id(frame, "json", "calc"))
    assert renamed == {**request, "commandId": "calc"}
    event = _core.transcode(b'{"id":"e","type":"event","eventId":"api.x"}', "json", "json")
    assert _core.with_command_id(event, "json", "calc") == event
    with pytest.raises(ProtocolError):
        _core.with_command_id(b"{", "json", "calc")


@pytest.mark.parametrize("prefix", [None, "remote", 'we"ird'])
async def test_each_message_is_decoded_once_by_the_http_layer(
    registries: Make, servers: Serve, monkeypatch: pytest.MonkeyPatch, prefix: str | None
) -> None:
    """A call validates the POSTed body (server) and the answer line (client), once each: the
    frames the registries encoded are not decoded again (their registries decode what
    reaches them, in Rust, once)."""
    from cmd_ipc import _core

    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url, command_prefix=prefix))
    inspected: list[bytes] = []
    inspect = _core.inspect_message

    def counting(data: bytes, *args: Any, **kwargs: Any) -> Any:
        inspected.append(bytes(data))
        return inspect(data, *args, **kwargs)

    monkeypatch.setattr(_core, "inspect_message", counting)
    command = "calc.add" if prefix is None else f"{prefix}.calc.add"
    assert await client.execute_command(command, {"a": 1, "b": 2}) == 3
    assert runs["calc.add"] == 1
    kinds = [json.loads(data)["type"] for data in inspected]
    assert kinds == ["execute.command.request", "execute.command.response"]


# ------------------------------------------------------------------------------ exposure


async def _post(
    session: aiohttp.ClientSession, url: str, message: dict[str, Any], token: str = "tok"
) -> dict[str, Any]:
    headers = {**JSON_HEADERS, "Authorization": f"Bearer {token}"}
    async with session.post(url + "/cmd", json=message, headers=headers) as r:
        assert r.status == 200, await r.text()
        (answer,) = ndjson_lines(await r.read())
        return answer


async def test_expose_limits_listing_and_calling_alike(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, runs = await api_with_commands(registries)
    # A worker below the served registry, with an internal command.
    worker = registries("worker", router_channel="api")
    await link(api, worker)
    resets: list[int] = []
    await worker.register_command("worker.reset", lambda: resets.append(1))
    await worker.register_command("calc.mul", lambda a, b: a * b)
    server = await servers(api, token="tok", expose=["calc.*", "typed.add"])

    # Listed: only what is exposed, by GET /cmds.json and by a list request alike.
    auth = {"Authorization": "Bearer tok"}
    async with session.get(server.url + "/cmds.json", headers=auth) as r:
        listed = sorted(c["id"] for c in (await r.json())["commands"])
    assert listed == ["calc.add", "calc.mul", "typed.add"]
    answer = await _post(session, server.url, {"id": new_id(), "type": "list.commands.request"})
    assert sorted(c["id"] for c in answer["commands"]) == listed
    spec_support.validator("list.commands.response.json").validate(answer)

    # A hidden command is not_found, exactly like a missing one, and never runs.
    for command_id in ("worker.reset", "stuck", "_secret", "no.such"):
        message = execute(command_id)
        answer = await _post(session, server.url, message)
        assert answer["thid"] == message["id"]
        spec_support.validator("execute.command.response.json").validate(answer)
        error = answer["response"]["error"]
        assert error == {
            "code": "not_found",
            "message": f"command '{command_id}' is not registered anywhere registry 'api' can "
            "reach",
        }, command_id
    assert resets == [] and runs["stuck"] == runs["_secret"] == 0
    # An exposed id that does not exist gets no "did you mean" (it could name a hidden one).
    answer = await _post(session, server.url, execute("calc.ad", {"a": 1, "b": 2}))
    assert answer["response"]["error"]["code"] == "not_found"
    assert "did you mean" not in answer["response"]["error"]["message"]
    answer = await _post(session, server.url, execute("calc.mul", {"a": 6, "b": 7}))
    assert answer["response"] == {"ok": True, "result": 42}

    # Through an HTTPChannel: the same set, and the same answers.
    client = registries("client")
    await client.register_channel(HTTPChannel("api", server.url, token="tok"))
    assert sorted(c["id"] for c in client.list_commands()) == listed
    assert await client.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    with pytest.raises(NotFoundError):
        await client.execute_command("worker.reset")
    assert resets == []


async def test_expose_is_not_bypassed_by_json_escapes(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    """The type and the command id are checked as the decoder reads them: spelled with
    JSON escapes, a call of a hidden command is still not_found and never runs."""
    api, runs = await api_with_commands(registries)
    server = await servers(api, expose="calc.*")
    for body in (
        r'{"id":"e1","type":"execute.command.requ\u0065st","commandId":"stuck"}',
        r'{"id":"e2","type":"\u0065xecute.command.request","commandId":"st\u0075ck"}',
        r'{"id":"e3","type":"execute.command.request","commandId":"\u0073tuck"}',
    ):
        async with session.post(server.url + "/cmd", data=body, headers=JSON_HEADERS) as r:
            assert r.status == 200, await r.text()
            (answer,) = ndjson_lines(await r.read())
        assert answer["thid"] == json.loads(body)["id"]
        assert answer["response"]["error"] == {
            "code": "not_found",
            "message": "command 'stuck' is not registered anywhere registry 'api' can reach",
        }, body
    assert runs["stuck"] == 0
    # An exposed command spelled with escapes is still called.
    body = r'{"id":"e4","type":"execute.command.requ\u0065st","commandId":"calc.add",'
    body += r'"request":{"a":1,"b":2}}'
    async with session.post(server.url + "/cmd", data=body, headers=JSON_HEADERS) as r:
        (answer,) = ndjson_lines(await r.read())
    assert answer["response"] == {"ok": True, "result": 3}


async def test_expose_takes_a_predicate_or_a_pattern(
    registries: Make, servers: Serve, session: aiohttp.ClientSession
) -> None:
    api, _ = await api_with_commands(registries)
    by_predicate = await servers(api, expose=lambda command_id: command_id.startswith("typed."))
    everything = await servers(api, expose="*")  # still never a private command
    for server, want in (
        (by_predicate, ["typed.add"]),
        (everything, ["calc.add", "stuck", "typed.add"]),
    ):
        async with session.get(server.url + "/cmds.json") as r:
            assert sorted(c["id"] for c in (await r.json())["commands"]) == want
    answer = await _post(session, by_predicate.url, execute("calc.add", {"a": 1, "b": 2}))
    assert answer["response"]["error"]["code"] == "not_found"
    answer = await _post(session, everything.url, execute("_secret"))
    assert answer["response"]["error"]["code"] == "not_found"
    with pytest.raises(TypeError, match="expose"):
        create_app(api, expose=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ events


async def test_events_do_not_cross_http_and_the_registry_says_so_once(
    registries: Make, servers: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if "carries no events" in r.getMessage()]

    caplog.set_level(logging.INFO, logger="cmd_ipc")
    # Attached to a registry that listens to events: told at once, and only once.
    listening = registries("listening")
    listening.add_event_listener("job.done", lambda payload: None)
    await listening.register_channel(HTTPChannel("api", server.url))
    assert told() == [
        "HTTPChannel 'api' of registry 'listening' carries no events: events emitted on "
        "either side do not cross it (HTTP only carries calls to its server); a "
        "WebSocketChannel carries them"
    ]
    listening.emit_event("job.done", {"id": 1})
    assert len(told()) == 1
    [record] = [r for r in caplog.records if "carries no events" in r.getMessage()]
    assert record.levelno == logging.INFO
    # Attached to a registry without listeners: told at its first emit (not a private one).
    caplog.clear()
    emitter = registries("emitter")
    await emitter.register_channel(HTTPChannel("api", server.url))
    assert told() == []
    emitter.emit_event("_local.only")
    assert told() == []
    emitter.emit_event("job.done", {"id": 2})
    emitter.emit_event("job.done", {"id": 3})
    assert len(told()) == 1 and "registry 'emitter'" in told()[0]
