"""HTTP: HTTPChannel (the client) against misbehaving servers, and what is the aiohttp
server's own (serve()'s options, mounting with add_routes/add_subapp). What every server of
cmd-ipc answers is tested against each of them in test_http_servers.py."""

from __future__ import annotations

import asyncio
import json
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
    ProtocolError,
    _core,
)
from cmd_ipc.http import HTTPChannel, add_routes, create_app, serve
from helpers import eventually, new_id, registries
from http_support import (
    JSON_HEADERS,
    Make,
    StartApp,
    api_with_commands,
    apps,
    execute,
    free_port,
    in_flight,
    raw,
    session,
)

__all__ = ["apps", "registries", "session"]  # fixtures imported from helpers, http_support


# ------------------------------------------------------------------------------ the aiohttp server


async def test_half_sent_headers_are_dropped(registries: Make) -> None:
    api, _ = await api_with_commands(registries)
    async with await serve(api, keepalive_timeout=0.3, shutdown_timeout=0.1) as server:
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


# ------------------------------------------------------------------------------ wire


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


# ------------------------------------------------------------------------------ exposure


# ------------------------------------------------------------------------------ events
