"""The HTTP servers, aiohttp (:mod:`cmd_ipc.server.http`) and ASGI (:mod:`cmd_ipc.asgi`,
served by uvicorn): one suite, run against each, so they answer alike. Every server runs on
a free port of 127.0.0.1, started and stopped by its test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import cmd_ipc.asgi
import pytest
import spec_support
import uvicorn
from aiohttp import web
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
    InvalidRequestError,
    NotFoundError,
)
from cmd_ipc.http import HTTPChannel, serve
from cmd_ipc.server._endpoint import Endpoint, EndpointChannel
from helpers import eventually, link, new_id, registries, settle
from http_support import (
    JSON_HEADERS,
    Make,
    StartApp,
    api_with_commands,
    apps,
    execute,
    in_flight,
    ndjson_lines,
    raw,
    recorder_app,
    session,
    status_of,
    untouched,
)

__all__ = ["apps", "registries", "session"]  # fixtures imported from helpers, http_support

SERVERS = ["aiohttp", "asgi"]


# ------------------------------------------------------------------------------ fixtures


class Running(Protocol):
    """A running server of either kind."""

    url: str
    port: int

    async def close(self) -> None: ...


class UvicornServer:
    """An ASGI application served by uvicorn on 127.0.0.1 (``port=0``: a free one)."""

    def __init__(self, app: Any, port: int = 0) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            http="h11",
            ws="none",
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            # Requests still waiting when the server stops are cancelled at once.
            timeout_graceful_shutdown=0.1,
        )
        self.server = uvicorn.Server(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> UvicornServer:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self._sock]))
        await eventually(lambda: self.server.started or self._task.done(), timeout=10)
        if self._task.done():
            self._task.result()
            raise AssertionError("uvicorn stopped before it started")
        return self

    async def close(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            task, self._task = self._task, None
            await task


class Servers:
    """``await servers(registry, **options)`` -> a running server of the kind the test is
    parametrized with, stopped at teardown; ``servers.build(registry, **options)`` makes the
    application without serving it (for the checks of the options)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.made: list[Running] = []

    def build(self, registry: CommandRegistry, **options: Any) -> object:
        if self.kind == "aiohttp":
            from cmd_ipc.http import create_app

            return create_app(registry, **options)
        return cmd_ipc.asgi.app(registry, **options)

    async def __call__(self, registry: CommandRegistry, **options: Any) -> Running:
        server: Running
        if self.kind == "aiohttp":
            options.setdefault("shutdown_timeout", 0.1)
            server = await serve(registry, **options)
        else:
            port = options.pop("port", 0)
            server = await UvicornServer(cmd_ipc.asgi.app(registry, **options), port).start()
        self.made.append(server)
        return server


@pytest.fixture(params=SERVERS)
async def servers(request: pytest.FixtureRequest) -> AsyncIterator[Servers]:
    made = Servers(request.param)
    yield made
    for server in reversed(made.made):
        await server.close()


# ------------------------------------------------------------------------------ calls


async def test_call_server_command_and_child_command(registries: Make, servers: Servers) -> None:
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


async def test_command_prefix(registries: Make, servers: Servers, apps: StartApp) -> None:
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


async def test_typed_command_rejects_invalid_request(registries: Make, servers: Servers) -> None:
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
    assert untouched(api)  # nothing reached the registry

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


async def test_a_token_that_is_not_ascii_is_refused_when_the_server_is_made(
    registries: Make, servers: Servers
) -> None:
    # It could never match on one server or the other: ASGI servers hand headers over as
    # latin-1, aiohttp as UTF-8.
    api, _ = await api_with_commands(registries)
    for token in ("pässwörd", "s3cret\u2028", "токен"):
        with pytest.raises(ValueError, match="ASCII"):
            servers.build(api, token=token)
    servers.build(api, token="s3cret-token~!")


async def test_token_checked_before_the_body_is_read(registries: Make, servers: Servers) -> None:
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
        servers.build(api, schema_auth=True)


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
    registries: Make, servers: Servers, session: aiohttp.ClientSession, message: dict[str, Any]
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
    assert untouched(api)
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession, body: bytes
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    async with session.post(server.url + "/cmd", data=body, headers=JSON_HEADERS) as r:
        assert r.status == 400
        error = await r.json()
    assert error["error"] == "Invalid message format"
    assert error["issues"] and all(isinstance(i, str) for i in error["issues"])
    assert runs["calc.add"] == 0
    assert untouched(api)


# ------------------------------------------------------------------------------ limits


async def test_body_over_the_limit_is_refused_unread(registries: Make, servers: Servers) -> None:
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
    assert b"connection: close" in response.lower()
    # With Expect: 100-continue the client is told before it sends anything (no 100).
    response = await raw(server.port, head[:-2] + b"Expect: 100-continue\r\n\r\n")
    assert status_of(response) == 413
    assert b"100 Continue" not in response
    assert runs["calc.add"] == 0
    assert untouched(api)
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


async def test_chunked_body_is_cut_off_at_the_limit(registries: Make, servers: Servers) -> None:
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
    registries: Make, servers: Servers, monkeypatch: pytest.MonkeyPatch
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
    reading = asyncio.Event()
    read_body = Endpoint.read_body

    async def noted(self: Endpoint, *args: Any, **kwargs: Any) -> bytes:
        reading.set()
        return await read_body(self, *args, **kwargs)

    monkeypatch.setattr(Endpoint, "read_body", noted)
    # Half the body, then silence.
    slow = asyncio.ensure_future(raw(server.port, head + body[: len(body) // 2]))
    await asyncio.wait_for(reading.wait(), 5)  # the server reads the slow request's body
    for i in range(5):
        assert await client.execute_command("calc.add", {"a": i, "b": 1}) == i + 1
    assert not slow.done()  # the slow request is still waiting: others were served meanwhile
    response = await asyncio.wait_for(slow, 10)
    assert status_of(response) == 408  # then answered and its connection dropped
    assert runs["calc.add"] == 5
    assert in_flight(api) == (set(), 0)


# ------------------------------------------------------------------------------ failures


async def test_server_stopped_mid_session(registries: Make, servers: Servers) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    assert await client.execute_command("calc.add", {"a": 1, "b": 1}) == 2
    await server.close()
    # Failed by the refused connection, long before the 30 s request TTL.
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(client.execute_command("calc.add", {"a": 1, "b": 2}), 10)
    # Nothing is lost for good: HTTP is stateless, a server back on the port answers.
    await servers(api, port=server.port)
    assert await client.execute_command("calc.add", {"a": 1, "b": 3}) == 4
    assert runs["calc.add"] == 2


async def test_call_in_flight_when_the_server_dies(registries: Make, servers: Servers) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    call = asyncio.ensure_future(client.execute_command("stuck"))
    await eventually(lambda: runs["stuck"] == 1, timeout=5)
    await server.close()
    # Failed by the broken connection, long before the 30 s request TTL.
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 10)
    # The endpoint's channel was detached with the server.
    assert not api.channels


async def test_closing_the_channel_fails_calls_in_flight(
    registries: Make, servers: Servers
) -> None:
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


async def test_answer_timeout(registries: Make, servers: Servers) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api, answer_timeout=0.3)
    client = registries("client", request_ttl=30.0)
    await client.register_channel(HTTPChannel("api", server.url))
    with pytest.raises(CommandTimeoutError):
        await asyncio.wait_for(client.execute_command("stuck"), 10)
    assert in_flight(api) == (set(), 0)


# ------------------------------------------------------------------------------ hooks


async def test_headers_hook_and_middleware_are_applied(
    registries: Make, servers: Servers, apps: StartApp
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


async def test_middleware_retries(registries: Make, servers: Servers, apps: StartApp) -> None:
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
    registries: Make, servers: Servers, apps: StartApp, caplog: pytest.LogCaptureFixture
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
    registries: Make, servers: Servers, apps: StartApp
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


async def test_cmds_json(
    registries: Make, servers: Servers, session: aiohttp.ClientSession
) -> None:
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


async def test_shared_session_stays_open(registries: Make, servers: Servers) -> None:
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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


async def test_same_id_twice_in_flight_is_refused_and_answers_never_cross(
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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


@pytest.mark.parametrize("way", ["answer timeout", "client gone"])
async def test_an_id_given_up_on_stays_taken_until_its_answer_comes(
    registries: Make, servers: Servers, session: aiohttp.ClientSession, way: str
) -> None:
    api, runs = await api_with_commands(registries)
    started, release = asyncio.Event(), asyncio.Event()

    async def gated(n: int) -> dict[str, int]:
        started.set()
        await release.wait()
        return {"n": n}

    await api.register_command("gated", gated, validate=False)
    server = await servers(api, answer_timeout=0.2 if way == "answer timeout" else 30.0)
    first = execute("gated", {"n": 1}, id="same")
    if way == "answer timeout":
        async with session.post(server.url + "/cmd", json=first, headers=JSON_HEADERS) as r:
            answer = ndjson_lines(await r.read())[0]
        assert answer["response"]["error"]["code"] == "timeout"
    else:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = json.dumps(first).encode()
        writer.write(
            b"POST /cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await asyncio.wait_for(started.wait(), 5)
        writer.close()  # the client goes away before its answer
    endpoint = api.channels["http:/cmd"]
    assert isinstance(endpoint, EndpointChannel)
    await eventually(lambda: "same" in endpoint.abandoned and not endpoint.pending, timeout=5)
    assert runs["calc.add"] == 0
    # The router still runs the first request: a new one with its id is refused, rather
    # than given the first one's answer.
    second = execute("calc.add", {"a": 1, "b": 2}, id="same")
    async with session.post(server.url + "/cmd", json=second, headers=JSON_HEADERS) as r:
        assert r.status == 409
        assert "already in flight" in (await r.json())["error"]
    assert runs["calc.add"] == 0
    # Its answer comes (and goes nowhere): the id is free again.
    release.set()
    await eventually(lambda: not endpoint.abandoned, timeout=5)
    async with session.post(server.url + "/cmd", json=second, headers=JSON_HEADERS) as r:
        assert r.status == 200
        assert ndjson_lines(await r.read())[0]["response"] == {"ok": True, "result": 3}
    assert in_flight(api) == (set(), 0)


def test_ids_given_up_on_are_bounded_and_expire() -> None:
    channel = EndpointChannel("http:/cmd")
    for n, message_id in enumerate("abc"):
        channel.abandon(message_id, 10.0 + n, limit=2)
    # At most `limit` (the requests the router runs at once for one channel): the oldest
    # goes first.
    assert list(channel.abandoned) == ["b", "c"]
    assert not channel.reserved("a", 0.0)
    assert channel.reserved("b", 0.0) and channel.reserved("c", 11.0)
    # Past its request TTL an id is free, whether or not its answer came.
    assert not channel.reserved("b", 11.0) and channel.reserved("c", 11.5)
    assert not channel.reserved("c", 12.0) and not channel.abandoned


async def test_the_registry_limits_apply_to_http_messages(
    registries: Make, servers: Servers, session: aiohttp.ClientSession
) -> None:
    def depth(x: Any) -> int:
        n = 0
        while isinstance(x, list) and x:
            x, n = x[0], n + 1
        return n

    def nested(n: int) -> Any:
        value: Any = []
        for _ in range(n):
            value = [value]
        return value

    deep = registries("deep", max_depth=200)
    await deep.register_command("depth", depth, validate=False)
    server = await servers(deep, answer_timeout=5.0)
    # Deeper than the default 64, within the registry's 200: answered.
    body = execute("depth", {"x": nested(100)})
    async with session.post(server.url + "/cmd", json=body, headers=JSON_HEADERS) as r:
        assert r.status == 200
        assert ndjson_lines(await r.read())[0]["response"] == {"ok": True, "result": 100}
    # A registry with lower limits: what it would drop is refused up front.
    shallow = registries("shallow", max_depth=16, max_message_size=4096)
    await shallow.register_command("depth", depth, validate=False)
    server = await servers(shallow, answer_timeout=5.0)
    for body in (execute("depth", {"x": nested(20)}), execute("depth", {"x": "y" * 5000})):
        async with session.post(server.url + "/cmd", json=body, headers=JSON_HEADERS) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "Invalid message format"


async def test_a_registry_closing_while_the_endpoint_attaches_is_unavailable(
    registries: Make,
    servers: Servers,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, _ = await api_with_commands(registries)
    server = await servers(api)
    async with session.post(
        server.url + "/cmd", json=execute("calc.add", {"a": 1, "b": 2}), headers=JSON_HEADERS
    ) as r:
        assert r.status == 200
    await api.close_channel("http:/cmd")

    async def closing(channel: Any) -> None:
        # What a registry closing right after the endpoint looked does.
        raise RuntimeError(f"registry {api.id!r} is closed")

    monkeypatch.setattr(api, "register_channel", closing)
    async with session.post(
        server.url + "/cmd", json=execute("calc.add", {"a": 1, "b": 2}), headers=JSON_HEADERS
    ) as r:
        assert r.status == 503
        assert "closed" in (await r.json())["error"]
    async with session.get(server.url + "/cmds.json") as r:
        assert r.status == 503


@pytest.mark.parametrize("message_id", ['q"uote', "back\\slash", "ünï\u2028code", "x" * 300])
async def test_any_string_id_gets_its_own_answer(
    registries: Make, servers: Servers, session: aiohttp.ClientSession, message_id: str
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
    registries: Make, servers: Servers
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


@pytest.mark.parametrize("prefix", [None, "remote", 'we"ird'])
async def test_each_message_is_decoded_once_by_the_http_layer(
    registries: Make, servers: Servers, monkeypatch: pytest.MonkeyPatch, prefix: str | None
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
    registries: Make, servers: Servers, session: aiohttp.ClientSession
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
        servers.build(api, expose=3)


# ------------------------------------------------------------------------------ events


async def test_events_do_not_cross_http_and_the_registry_says_so_once(
    registries: Make, servers: Servers, caplog: pytest.LogCaptureFixture
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


# ------------------------------------------------------------------------------ both alike


async def test_ndjson_bodies_and_other_routes(
    registries: Make, servers: Servers, session: aiohttp.ClientSession
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    ndjson = {"Content-Type": "application/x-ndjson", "Accept": "application/x-ndjson"}
    # A body sent as one NDJSON line (its newline and all) is one message...
    line = json.dumps(execute("calc.add", {"a": 1, "b": 2})).encode() + b"\n"
    async with session.post(server.url + "/cmd", data=line, headers=ndjson) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        (answer,) = ndjson_lines(await r.read())
    assert answer["response"] == {"ok": True, "result": 3}
    # ...and two lines are not: one message per request.
    async with session.post(server.url + "/cmd", data=line + line, headers=ndjson) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "Invalid message format"
    assert runs["calc.add"] == 1
    # Other methods and paths get what aiohttp gives them.
    for method, path, status, allow in (
        ("GET", "/cmd", 405, "POST"),
        ("PUT", "/cmd", 405, "POST"),
        ("POST", "/cmds.json", 405, "GET,HEAD"),
        ("GET", "/nothing", 404, None),
        ("GET", "/cmd/", 404, None),
    ):
        async with session.request(method, server.url + path) as r:
            assert r.status == status, (method, path)
            assert r.headers.get("Allow") == allow
    async with session.head(server.url + "/cmds.json") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"


async def test_client_gone_before_its_answer_leaks_nothing(
    registries: Make, servers: Servers, session: aiohttp.ClientSession
) -> None:
    api, runs = await api_with_commands(registries)
    server = await servers(api)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            server.url + "/cmd",
            json=execute("stuck"),
            headers=JSON_HEADERS,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as r:
            await r.read()
    assert runs["stuck"] == 1
    # The server stops waiting at once (not at the answer timeout).
    await eventually(lambda: in_flight(api) == (set(), 0), timeout=5)
    assert await api.execute_command("calc.add", {"a": 1, "b": 1}) == 2


def _normalized(body: bytes) -> Any:
    """A body with the fresh ids of its messages taken out (each answer makes its own)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "id" or "type" not in value}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    try:
        return [strip(json.loads(line)) for line in body.splitlines() if line.strip()]
    except ValueError:
        return body


async def test_both_servers_answer_alike(registries: Make) -> None:
    """The same requests to an aiohttp and an ASGI server of one registry get the same
    status, Content-Type, WWW-Authenticate and body (its fresh message ids aside)."""
    api, _ = await api_with_commands(registries)
    options: dict[str, Any] = {"token": "tok", "expose": ["calc.*", "typed.*"], "max_body": 300}
    aio = await serve(api, shutdown_timeout=0.1, **options)
    asgi = await UvicornServer(cmd_ipc.asgi.app(api, **options)).start()
    good = {**JSON_HEADERS, "Authorization": "Bearer tok"}
    cases: list[tuple[str, str, dict[str, str], bytes]] = [
        ("POST", "/cmd", good, json.dumps(execute("calc.add", {"a": 1, "b": 2})).encode()),
        ("POST", "/cmd", good, json.dumps(execute("typed.add", {"a": "x", "b": 2})).encode()),
        ("POST", "/cmd", good, json.dumps(execute("calc.ad", {"a": 1})).encode()),
        ("POST", "/cmd", good, json.dumps(execute("stuck")).encode()),
        ("POST", "/cmd", good, json.dumps(execute("_secret")).encode()),
        ("POST", "/cmd", good, b'{"id":"l","type":"list.commands.request"}'),
        ("POST", "/cmd", good, b'{"id":"e","type":"event","eventId":"x"}'),
        ("POST", "/cmd", good, b"{not json"),
        ("POST", "/cmd", good, b'{"id":"x","type":"execute.command.request"}'),
        ("POST", "/cmd", good, b'{"id":"x","type":"event","eventId":"' + b"x" * 400 + b'"}'),
        ("POST", "/cmd", JSON_HEADERS, b"{}"),
        ("POST", "/cmd", {**JSON_HEADERS, "Authorization": "Bearer nope"}, b"{}"),
        ("GET", "/cmds.json", {}, b""),
        ("GET", "/cmds.json", {"Authorization": "Bearer tok"}, b""),
        ("GET", "/cmd", good, b""),
        ("GET", "/elsewhere", good, b""),
    ]
    try:
        async with aiohttp.ClientSession() as s:
            for method, path, headers, body in cases:
                seen = []
                for server in (aio, asgi):
                    async with s.request(
                        method, server.url + path, data=body or None, headers=headers
                    ) as r:
                        seen.append(
                            (
                                r.status,
                                r.headers.get("Content-Type"),
                                r.headers.get("WWW-Authenticate"),
                                r.headers.get("Allow"),
                                _normalized(await r.read()),
                            )
                        )
                assert seen[0] == seen[1], (method, path, body)
    finally:
        await asgi.close()
        await aio.close()


# ------------------------------------------------------------------------------ ASGI


async def test_asgi_lifespan_attaches_and_detaches_the_endpoint(registries: Make) -> None:
    api, _ = await api_with_commands(registries)
    app = cmd_ipc.asgi.app(api)
    server = await UvicornServer(app).start()
    try:
        assert list(api.channels) == ["http:/cmd"]  # attached at the lifespan startup
        client = registries("client")
        await client.register_channel(HTTPChannel("api", server.url))
        assert await client.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    finally:
        await server.close()
    assert not api.channels  # detached at the lifespan shutdown


async def test_asgi_app_mounted_in_starlette(registries: Make) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    api, runs = await api_with_commands(registries)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    endpoint = cmd_ipc.asgi.app(api, token="tok", expose="calc.*")
    web_app = Starlette(routes=[Route("/health", health)])
    web_app.mount("/cmd-ipc", endpoint)
    server = await UvicornServer(web_app).start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/health") as r:
                assert await r.text() == "ok"
            auth = {"Authorization": "Bearer tok"}
            async with s.get(server.url + "/cmd-ipc/cmds.json", headers=auth) as r:
                assert r.status == 200
                assert [c["id"] for c in (await r.json())["commands"]] == ["calc.add"]
            async with s.get(server.url + "/cmd-ipc/cmds.json") as r:
                assert r.status == 401
            async with s.post(server.url + "/cmd-ipc/nothing", headers=auth) as r:
                assert r.status == 404
            async with s.post(server.url + "/cmd", headers=auth) as r:
                assert r.status == 404  # not mounted there
        client = registries("client")
        await client.register_channel(
            HTTPChannel("api", server.url + "/cmd-ipc", token="tok", command_prefix="api")
        )
        assert [c["id"] for c in client.list_commands()] == ["api.calc.add"]
        assert await client.execute_command("api.calc.add", {"a": 2, "b": 3}) == 5
        with pytest.raises(NotFoundError):
            await client.execute_command("api.stuck")
        assert runs == {"calc.add": 1, "typed.add": 0, "_secret": 0, "stuck": 0}
        # Starlette keeps the lifespan to itself: attached at the first request, detached
        # by aclose().
        assert list(api.channels) == ["http:/cmd"]
    finally:
        await server.close()
    await endpoint.aclose()
    assert not api.channels


def test_asgi_options_are_checked() -> None:
    registry = CommandRegistry("x")
    for bad in (
        {"max_body": 0},
        {"token": ""},
        {"token": "pässwörd"},
        {"path": "cmd"},
        {"read_timeout": 0},
    ):
        with pytest.raises(ValueError):
            cmd_ipc.asgi.app(registry, **bad)
    with pytest.raises(TypeError, match="expose"):
        cmd_ipc.asgi.app(registry, expose=3)  # type: ignore[arg-type]
    app = cmd_ipc.asgi.app(registry, path="/rpc", schema_path=None)
    assert (app.path, app.schema_path) == ("/rpc", None)
    assert repr(app) == "<ASGIApp registry='x' path='/rpc'>"


ASGI_WITHOUT_AIOHTTP = """
import asyncio, json, sys
sys.modules["aiohttp"] = None  # any import of it fails
import cmd_ipc.asgi
from cmd_ipc import CommandRegistry

async def call(app, scope, body=b""):
    events = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []
    async def receive():
        return events.pop(0) if events else await asyncio.Event().wait()
    async def send(message):
        sent.append(message)
    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]

async def main():
    async with CommandRegistry("api") as api:
        await api.register_command("calc.add", lambda a, b: a + b)
        app = cmd_ipc.asgi.app(api)
        lifespan = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        said = []
        async def receive():
            return lifespan.pop(0)
        async def send(message):
            said.append(message["type"])
        scope = {"type": "http", "method": "POST", "path": "/x/cmd", "root_path": "/x",
                 "headers": [(b"content-type", b"application/json")]}
        msg = {"id": "1", "type": "execute.command.request", "commandId": "calc.add",
               "request": {"a": 1, "b": 2}}
        status, body = await call(app, scope, json.dumps(msg).encode())
        print(status, json.loads(body)["response"])
        await app({"type": "lifespan"}, receive, send)
        print(said, list(api.channels))
    print("aiohttp" in sys.modules and sys.modules["aiohttp"] is not None)

asyncio.run(main())
"""


def test_the_asgi_app_needs_no_aiohttp() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ASGI_WITHOUT_AIOHTTP],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "200 {'ok': True, 'result': 3}",
        "['lifespan.startup.complete', 'lifespan.shutdown.complete'] []",
        "False",
    ]
