"""WebSocket channels end to end, against real servers on 127.0.0.1 (free ports, started and
stopped by each test).

The usual tree: ``hub`` serves WebSocket connections and has ``below`` under it (in memory);
``edge`` (and sometimes ``edge2``) join the tree through a :class:`WebSocketChannel` that is
their ``router_channel``. Every text message any WebSocket connection sends is validated
against the spec-v1 schemas (the ``wire`` fixture). Every wait has a deadline; no test
asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import spec_support
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandError,
    CommandRegistry,
    NotFoundError,
    WebSocketChannel,
)
from cmd_ipc.websocket import (
    CLOSE_REPLACED,
    ID_HEADER,
    WebSocketHandler,
    WebSocketServer,
    WebSocketServerChannel,
    serve_websocket,
)
from helpers import eventually, link, new_id, registries, settle
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]
Start = Callable[..., Awaitable[WebSocketServer]]

#: Every spec-v1 message type.
ALL_TYPES = {
    "register.command.request",
    "register.command.response",
    "list.commands.request",
    "list.commands.response",
    "execute.command.request",
    "execute.command.response",
    "event",
}


@pytest.fixture(autouse=True)
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Validates every text message a WebSocket channel receives (so everything that
    crossed between two of ours, whichever way it was written or read); yields them."""
    from cmd_ipc.channels.websocket import _WebSocketBase

    seen: list[dict[str, Any]] = []
    original = _WebSocketBase._deliver

    def deliver(self: _WebSocketBase, frame: bytes) -> None:
        seen.append(spec_support.validate_frame(frame, "json"))
        original(self, frame)

    monkeypatch.setattr(_WebSocketBase, "_deliver", deliver)
    yield seen


@pytest.fixture
async def start(registries: Make) -> AsyncIterator[Start]:
    """Starts WebSocket servers on 127.0.0.1 (port 0 unless given); all closed at teardown,
    before the registries."""
    made: list[WebSocketServer] = []

    async def start(registry: CommandRegistry, **kwargs: Any) -> WebSocketServer:
        server = await serve_websocket(registry, "127.0.0.1", **kwargs)
        made.append(server)
        return server

    yield start
    for server in reversed(made):
        await server.close()


def ids(reg: CommandRegistry) -> list[str]:
    return [c["id"] for c in reg.list_commands()]


async def join(
    make: Make, url: str, name: str = "edge", **channel_kw: Any
) -> tuple[CommandRegistry, WebSocketChannel]:
    """A registry ``name`` whose router is the hub, through a WebSocket channel."""
    reg = make(name, router_channel="hub")
    channel = WebSocketChannel("hub", url, client_id=name, **channel_kw)
    await reg.register_channel(channel)
    return reg, channel


async def hub_tree(make: Make, start: Start, **server_kw: Any) -> tuple[Any, ...]:
    """hub (served) <- below (in memory). Returns (hub, below, server)."""
    hub = make("hub")
    below = make("below", router_channel="hub")
    await link(hub, below)
    await hub.register_command("hub.add", lambda a, b: a + b)
    await below.register_command("below.mul", lambda a, b: a * b)
    server = await start(hub, **server_kw)
    return hub, below, server


def stuck_handler() -> tuple[Callable[..., Any], asyncio.Event]:
    started = asyncio.Event()

    async def stuck(**_: Any) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    return stuck, started


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cmd_ipc.websocket"]


# --------------------------------------------------------------------------- the tree


async def test_remote_registry_is_a_member_of_the_tree(registries: Make, start: Start) -> None:
    hub, below, server = await hub_tree(registries, start)
    edge, channel = await join(registries, server.url)
    assert channel.connected and edge.channels["hub"] is channel
    assert isinstance(hub.channels["edge"], WebSocketServerChannel)

    await edge.register_command("edge.echo", lambda text: f"edge:{text}")
    # Registered up the tree: the hub routes it to the WebSocket channel, below escalates.
    assert hub.route_of("edge.echo") == "edge"
    assert await hub.execute_command("edge.echo", {"text": "hi"}) == "edge:hi"
    assert await below.execute_command("edge.echo", {"text": "lo"}) == "edge:lo"

    # The client calls the server's commands and those of the server's other members.
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    assert await edge.execute_command("below.mul", {"a": 3, "b": 4}) == 12

    # Two WebSocket clients reach each other through the hub.
    edge2, _ = await join(registries, server.url, "edge2")
    await edge2.register_command("edge2.neg", lambda x: -x)
    assert await edge.execute_command("edge2.neg", {"x": 5}) == -5
    assert await edge2.execute_command("edge.echo", {"text": "yo"}) == "edge:yo"
    with pytest.raises(NotFoundError):
        await edge.execute_command("nobody.has.this")


async def test_websocket_peer_outside_the_tree(registries: Make, start: Start) -> None:
    # The channel is not the client's router: the two registries are mesh peers and learn
    # each other's commands from the command lists.
    hub, _, server = await hub_tree(registries, start)
    peer = registries("peer")
    await peer.register_command("peer.hello", lambda: "hello")
    await peer.register_channel(WebSocketChannel("hub", server.url, client_id="peer"))
    assert peer.route_of("hub.add") == "hub"  # listed before register_channel returned
    assert await peer.execute_command("hub.add", {"a": 2, "b": 2}) == 4
    assert await hub.wait_listed("peer")
    assert await hub.execute_command("peer.hello") == "hello"


async def test_events_cross_both_ways_exactly_once(registries: Make, start: Start) -> None:
    hub, below, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.url)
    edge2, _ = await join(registries, server.url, "edge2")
    await edge.register_command("edge.ping", lambda: "pong")
    await edge2.register_command("edge2.ping", lambda: "pong")
    regs = {"hub": hub, "below": below, "edge": edge, "edge2": edge2}
    got: dict[str, list[str]] = {name: [] for name in regs}
    for name, reg in regs.items():
        reg.add_event_listener("tick", lambda p, name=name: got[name].append(p["from"]))

    for name, reg in regs.items():
        reg.emit_event("tick", {"from": name})
    await eventually(lambda: all(len(v) >= 3 for v in got.values()), timeout=5)
    # Barriers: a round trip along every path an event took, behind the events.
    assert await hub.execute_command("edge.ping") == "pong"
    assert await hub.execute_command("edge2.ping") == "pong"
    assert await edge.execute_command("edge2.ping") == "pong"
    assert await edge2.execute_command("edge.ping") == "pong"
    assert await edge.execute_command("below.mul", {"a": 1, "b": 1}) == 1
    await settle()
    for name, senders in got.items():
        others = sorted(n for n in regs if n != name)
        assert sorted(s for s in senders if s != name) == others, name


async def test_private_ids_stay_private(
    registries: Make, start: Start, wire: list[dict[str, Any]]
) -> None:
    hub, below, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.url)
    await edge.register_command("_edge.secret", lambda: "s3cr3t")
    await edge.register_command("edge.public", lambda: "pub")
    await hub.register_command("_hub.secret", lambda: "hidden")
    got: list[Any] = []
    hub.add_event_listener("_edge.private", got.append)
    below.add_event_listener("_edge.private", got.append)
    edge.emit_event("_edge.private", 1)
    edge.emit_event("edge.public", 2)

    assert await hub.execute_command("edge.public") == "pub"  # a barrier behind the events
    assert await edge.execute_command("_edge.secret") == "s3cr3t"
    assert "_edge.secret" not in ids(hub) and "_edge.secret" not in ids(below)
    with pytest.raises(NotFoundError):
        await hub.execute_command("_edge.secret")
    with pytest.raises(NotFoundError):
        await edge.execute_command("_hub.secret")
    await settle()
    assert got == []
    assert not [m for m in wire if "_edge" in json.dumps(m)], "a private id went on the wire"


# --------------------------------------------------------------------------- the wire


async def test_messages_on_the_wire_are_spec_v1_json_text(
    registries: Make, start: Start, wire: list[dict[str, Any]]
) -> None:
    hub, _, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.url)
    await edge.register_command("edge.fail", lambda: 1 / 0)
    edge.emit_event("edge.event", {"n": 1})
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    with pytest.raises(CommandError):
        await hub.execute_command("edge.fail")
    # Every message the ``wire`` fixture saw was validated; all seven types crossed.
    assert {m["type"] for m in wire} == ALL_TYPES


async def recv_json(ws: ClientConnection, type_: str) -> dict[str, Any]:
    """The next message of ``type_`` (a text message, valid spec-v1), skipping others."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(raw, str), "a binary message on the wire"
        msg: dict[str, Any] = spec_support.validate_frame(raw.encode(), "json")
        if msg["type"] == type_:
            return msg


async def test_a_foreign_peer_speaks_plain_json_text(registries: Make, start: Start) -> None:
    # A peer written by hand (as a TypeScript client would be): JSON text messages only.
    hub, _, server = await hub_tree(registries, start)
    async with connect(server.url, additional_headers={ID_HEADER: "ts"}) as ws:
        list_request = await recv_json(ws, "list.commands.request")
        await ws.send(
            json.dumps(
                {
                    "id": new_id(),
                    "type": "list.commands.response",
                    "thid": list_request["id"],
                    "commands": [{"id": "ts.hello", "description": "greets"}],
                }
            )
        )
        call_id = new_id()
        await ws.send(
            json.dumps(
                {
                    "id": call_id,
                    "type": "execute.command.request",
                    "commandId": "below.mul",
                    "request": {"a": 6, "b": 7},
                }
            )
        )
        response = await recv_json(ws, "execute.command.response")
        assert response["thid"] == call_id
        assert response["response"] == {"ok": True, "result": 42}

        assert await hub.wait_listed("ts")
        call = asyncio.ensure_future(hub.execute_command("ts.hello", {"name": "py"}))
        request = await recv_json(ws, "execute.command.request")
        assert (request["commandId"], request["request"]) == ("ts.hello", {"name": "py"})
        await ws.send(
            json.dumps(
                {
                    "id": new_id(),
                    "type": "execute.command.response",
                    "thid": request["id"],
                    "response": {"ok": True, "result": "hello py"},
                }
            )
        )
        assert await asyncio.wait_for(call, 5) == "hello py"


async def test_binary_message_closes_the_connection(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub, _, server = await hub_tree(registries, start)
    with caplog.at_level(logging.WARNING, logger="cmd_ipc.websocket"):
        async with connect(server.url, additional_headers={ID_HEADER: "bin"}) as ws:
            await eventually(lambda: "bin" in hub.channels)
            await ws.send(b'{"id": "1", "type": "list.commands.request"}')
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1003
        await eventually(lambda: "bin" not in hub.channels)
    assert any("binary" in m for m in messages(caplog))


@pytest.mark.parametrize("toward", ["server", "client"])
async def test_message_over_max_size_closes_the_connection(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture, toward: str
) -> None:
    hub, _, server = await hub_tree(
        registries, start, max_size=4096 if toward == "server" else None
    )
    await hub.register_command("hub.big", lambda n: "x" * n)
    await hub.register_command("hub.len", lambda blob: len(blob))
    edge, channel = await join(
        registries,
        server.url,
        max_size=4096 if toward == "client" else None,
        reconnect=False,
    )
    assert await edge.execute_command("hub.len", {"blob": "x" * 100}) == 100
    with caplog.at_level(logging.WARNING, logger="cmd_ipc.websocket"):
        with pytest.raises(ChannelDisconnectedError):
            if toward == "server":
                await asyncio.wait_for(edge.execute_command("hub.len", {"blob": "x" * 10_000}), 10)
            else:
                await asyncio.wait_for(edge.execute_command("hub.big", {"n": 10_000}), 10)
        await eventually(lambda: "edge" not in hub.channels and "hub" not in edge.channels)
    assert not channel.connected
    assert any("1009" in m for m in messages(caplog)), messages(caplog)


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("token", [None, "wrong", ""])
async def test_missing_or_bad_token_is_refused_at_the_handshake(
    registries: Make, start: Start, token: str | None
) -> None:
    hub, _, server = await hub_tree(registries, start, token="s3cret")
    before = set(hub.channels)
    edge = registries("edge", router_channel="hub")
    channel = WebSocketChannel("hub", server.url, client_id="edge", token=token)
    with pytest.raises(ChannelDisconnectedError, match="401") as info:
        await edge.register_channel(channel)
    assert isinstance(info.value.__cause__, InvalidStatus)
    assert set(hub.channels) == before and not server.handler.channels
    assert "hub" not in edge.channels and not channel.connected


async def test_good_token_is_accepted(registries: Make, start: Start) -> None:
    hub, _, server = await hub_tree(registries, start, token="s3cret")
    edge, _ = await join(registries, server.url, token="s3cret")
    await edge.register_command("edge.ok", lambda: "ok")
    assert await hub.execute_command("edge.ok") == "ok"
    assert await edge.execute_command("hub.add", {"a": 1, "b": 1}) == 2


async def test_handler_inside_an_existing_websockets_server(registries: Make) -> None:
    hub = registries("hub")
    await hub.register_command("hub.add", lambda a, b: a + b)
    handler = WebSocketHandler(hub, token="s3cret", path="/cmd-ipc")
    with_hook = serve(handler, "127.0.0.1", 0, process_request=handler.process_request)
    without_hook = serve(handler, "127.0.0.1", 0)  # the handler checks the token itself
    async with with_hook as s1, without_hook as s2:
        url1 = f"ws://127.0.0.1:{s1.sockets[0].getsockname()[1]}/cmd-ipc"
        url2 = f"ws://127.0.0.1:{s2.sockets[0].getsockname()[1]}/cmd-ipc"
        edge, _ = await join(registries, url1, token="s3cret")
        assert await edge.execute_command("hub.add", {"a": 2, "b": 3}) == 5
        with pytest.raises(InvalidStatus) as refused:
            await connect(url1.replace("/cmd-ipc", "/other"))
        assert refused.value.response.status_code == 404
        async with connect(url2, additional_headers={ID_HEADER: "intruder"}) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "intruder" not in hub.channels
        # Our client, refused after the handshake (1008), fails and does not retry.
        intruder = registries("intruder", router_channel="hub", request_ttl=1.0)
        channel = WebSocketChannel("hub", url2, client_id="intruder", token="wrong")
        with pytest.raises(ChannelDisconnectedError):
            await intruder.register_channel(channel)
        assert not channel.connected and not await channel.reconnect()
        assert "intruder" not in hub.channels
        await handler.close()
        await eventually(lambda: "edge" not in hub.channels)


@pytest.mark.parametrize("taken", ["router", "worker", "pool member", "in use"])
async def test_a_client_may_not_take_an_id_the_registry_keeps(
    registries: Make, monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    # The router channel "up" is detached: a client under its id would become the router
    # (every escalated call and every command, whatever expose= says).
    hub = registries("hub", router_channel="up")
    hub.command("admin.reset")(lambda: "reset!")  # deferred until the router attaches
    kept = {"router": "up", "worker": "w1", "pool member": "p-1", "in use": "below"}[taken]
    if taken == "worker":
        monkeypatch.setattr(CommandRegistry, "workers", property(lambda r: {"w1": object()}))
    if taken == "pool member":
        pool = type("Pool", (), {"workers": [type("Member", (), {"id": "p-1"})()]})()
        monkeypatch.setattr(CommandRegistry, "pools", property(lambda r: {"p": pool}))
    if taken == "in use":
        await link(hub, registries("below"))
    handler = WebSocketHandler(hub, expose="api.*")
    with_hook = serve(handler, "127.0.0.1", 0, process_request=handler.process_request)
    without_hook = serve(handler, "127.0.0.1", 0)  # the handler checks the id itself
    evil = registries("evil")
    stolen: list[Any] = []
    await evil.register_command("secret.op", lambda **kw: stolen.append(kw), validate=False)
    async with with_hook as s1, without_hook as s2:
        url1 = f"ws://127.0.0.1:{s1.sockets[0].getsockname()[1]}/"
        url2 = f"ws://127.0.0.1:{s2.sockets[0].getsockname()[1]}/"
        # At the handshake: HTTP 409.
        with pytest.raises(InvalidStatus) as refused:
            await connect(url1, additional_headers={ID_HEADER: kept})
        assert refused.value.response.status_code == 409
        channel = WebSocketChannel("hub", url1, client_id=kept, reconnect=False)
        with pytest.raises(ChannelDisconnectedError, match="409"):
            await evil.register_channel(channel)
        # Without the hook: closed with 1008, and our client does not retry.
        async with connect(url2, additional_headers={ID_HEADER: kept}) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        channel = WebSocketChannel("hub", url2, client_id=kept, backoff=(0.01, 0.02))
        with pytest.raises(ChannelDisconnectedError):
            await evil.register_channel(channel)
        assert not channel.connected and not await channel.reconnect()
        assert not handler.channels
        assert not isinstance(hub.channels.get(kept), WebSocketServerChannel)
        if taken != "in use":
            # The hub's escalations still find no router, rather than the client.
            with pytest.raises(ChannelDisconnectedError):
                await hub.execute_command("secret.op", {"password": "hunter2"})
        assert stolen == []
        # Any other id gets in.
        await join(registries, url2, "guest")
        assert isinstance(hub.channels["guest"], WebSocketServerChannel)
        await handler.close()


# --------------------------------------------------------------------------- disconnects


async def test_call_in_flight_fails_at_once_when_the_server_registry_closes(
    registries: Make, start: Start
) -> None:
    hub, _, server = await hub_tree(registries, start)
    stuck, started = stuck_handler()
    await hub.register_command("hub.stuck", stuck)
    edge, channel = await join(registries, server.url, max_retries=1, backoff=(0.01, 0.01))
    assert edge.request_ttl == 30.0
    call = asyncio.ensure_future(edge.execute_command("hub.stuck"))
    await asyncio.wait_for(started.wait(), 5)
    await hub.close()
    # Failed by the disconnect, long before the 30 s request TTL.
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 5)
    # The server still listens but its registry is closed: reconnecting is refused (503).
    await eventually(lambda: not channel.connected, timeout=5)


async def test_server_restart_client_reconnects_and_re_registers(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub = registries("hub")
    await hub.register_command("hub.add", lambda a, b: a + b)
    server = await start(hub)
    port = server.port
    edge, channel = await join(registries, server.url, backoff=(0.05, 0.2))
    await edge.register_command("edge.echo", lambda text: f"edge:{text}")

    @edge.command("edge.typed")
    def typed(x: int) -> int:
        return x * 10

    assert await hub.execute_command("edge.echo", {"text": "1"}) == "edge:1"
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3

    caplog.set_level(logging.INFO, logger="cmd_ipc.websocket")
    await server.close()
    await hub.close()
    await eventually(lambda: "hub" not in edge.channels, timeout=5)
    with pytest.raises(CommandError):
        await edge.execute_command("hub.add", {"a": 1, "b": 2})

    # A new server and registry on the same port: the client comes back by itself.
    hub2 = registries("hub")
    await hub2.register_command("hub.add", lambda a, b: a + b)
    await start(hub2, port=port)
    await eventually(
        lambda: hub2.route_of("edge.echo") == "edge" and hub2.route_of("edge.typed") == "edge",
        timeout=10,
    )
    assert channel.connected and edge.channels["hub"] is channel
    assert await hub2.execute_command("edge.echo", {"text": "2"}) == "edge:2"
    assert await hub2.execute_command("edge.typed", {"x": 4}) == 40
    assert await edge.execute_command("hub.add", {"a": 2, "b": 3}) == 5
    assert any("reconnected" in m for m in messages(caplog))


async def test_reconnect_gives_up_after_max_retries(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub = registries("hub")
    server = await start(hub)
    port = server.port
    edge, channel = await join(registries, server.url, max_retries=3, backoff=(0.01, 0.02))
    caplog.set_level(logging.INFO, logger="cmd_ipc.websocket")
    await server.close()
    await eventually(lambda: any("gave up" in m for m in messages(caplog)), timeout=10)
    attempts = [m for m in messages(caplog) if "reconnection attempt" in m]
    assert len(attempts) == 3
    assert not channel.connected and "hub" not in edge.channels

    # It stays closed: a server on that port later gets no connection.
    hub2 = registries("hub")
    await start(hub2, port=port)
    await asyncio.sleep(0.3)  # many times the backoff: an absence, not a readiness wait
    assert hub2.channels == {}
    assert not channel.connected


async def test_a_newer_connection_with_the_same_id_replaces_the_old_one(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub = registries("hub")
    server = await start(hub)
    old_edge, old = await join(registries, server.url, backoff=(0.01, 0.02))
    await old_edge.register_command("edge.who", lambda: "old")
    old_side = hub.channels["edge"]
    caplog.set_level(logging.INFO, logger="cmd_ipc.websocket")
    # The old client is half dead (it reads nothing): the new one is attached at once all
    # the same, not after the old connection's closing handshake times out.
    assert old.connection is not None
    old_transport = old.connection.transport
    old_transport.pause_reading()
    try:
        new_edge, new = await asyncio.wait_for(join(registries, server.url), 3)
        assert hub.channels["edge"] is not old_side
    finally:
        old_transport.resume_reading()
    await eventually(lambda: "hub" not in old_edge.channels)
    await new_edge.register_command("edge.who", lambda: "new")
    assert await hub.execute_command("edge.who") == "new"
    # Closed with CLOSE_REPLACED, the old client does not fight back.
    await eventually(lambda: any("not reconnecting" in m for m in messages(caplog)))
    assert not old.connected and new.connected
    assert CLOSE_REPLACED == 4000


async def test_a_peer_that_stops_answering_pings_is_dropped(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub = registries("hub")
    stuck, started = stuck_handler()
    await hub.register_command("hub.stuck", stuck)
    server = await start(hub)
    edge, channel = await join(
        registries,
        server.url,
        ping_interval=0.1,
        ping_timeout=0.2,
        close_timeout=0.2,
        reconnect=False,
    )
    call = asyncio.ensure_future(edge.execute_command("hub.stuck"))
    await asyncio.wait_for(started.wait(), 5)
    server_side = hub.channels["edge"]
    assert isinstance(server_side, WebSocketServerChannel)
    assert server_side.connection is not None
    transport = server_side.connection.transport
    caplog.set_level(logging.WARNING, logger="cmd_ipc.websocket")
    transport.pause_reading()  # the server goes silent: no more pongs
    try:
        with pytest.raises(ChannelDisconnectedError):
            await asyncio.wait_for(call, 10)
        assert not channel.connected and "hub" not in edge.channels
        assert any("keepalive ping timeout" in m for m in messages(caplog)), messages(caplog)
    finally:
        transport.resume_reading()
    await eventually(lambda: "edge" not in hub.channels, timeout=5)


# --------------------------------------------------------------------------- the channel


async def test_channel_options_and_lifecycle(registries: Make, start: Start) -> None:
    with pytest.raises(ValueError):
        WebSocketChannel("hub", "http://127.0.0.1:1")
    with pytest.raises(ValueError):
        WebSocketChannel("hub", "ws://127.0.0.1:1", client_id="has space")
    with pytest.raises(ValueError):
        WebSocketChannel("hub", "ws://127.0.0.1:1", backoff=(1.0, 0.5))
    ch = WebSocketChannel("hub", "ws://127.0.0.1:1", reconnect=False)
    assert ch.client_id.startswith("ws-") and ch.reconnects is False and ch.encoding == "json"

    hub = registries("hub")
    server = await start(hub)
    assert server.url == f"ws://127.0.0.1:{server.port}/"
    edge, channel = await join(registries, server.url)
    assert channel.connected
    await channel.close()
    await channel.close()  # idempotent
    assert channel.closed and not channel.connected and "hub" not in edge.channels
    await eventually(lambda: "edge" not in hub.channels)
    channel.send(b"{}")  # dropped silently after close
    assert not await channel.reconnect()
    with pytest.raises(ChannelDisconnectedError):
        await edge.register_channel(channel)


async def test_bursts_keep_their_order_across_direct_and_queued_writes(
    registries: Make, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame is written at once while nothing waits to be written, else queued for the
    writer task (a full socket). Order holds across both: here the first 100 frames are
    forced through the queue, and those sent right after must wait behind them."""
    import cmd_ipc.channels.websocket as ws_module

    hub, _, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.url)
    got: list[int] = []
    done = asyncio.Event()

    def heard(payload: Any) -> None:
        got.append(payload["n"])
        if payload["n"] == 399:
            done.set()

    hub.add_event_listener("burst", heard)
    queued = 0
    put = asyncio.Queue.put_nowait

    def counting_put(self: asyncio.Queue[Any], item: Any) -> None:
        nonlocal queued
        queued += item is not None
        put(self, item)

    monkeypatch.setattr(asyncio.Queue, "put_nowait", counting_put)
    monkeypatch.setattr(ws_module, "_DIRECT_WRITE_LIMIT", 0)  # as if the socket were full
    for n in range(100):
        edge.emit_event("burst", {"n": n, "blob": "x" * 1024})
    monkeypatch.setattr(ws_module, "_DIRECT_WRITE_LIMIT", 64 * 1024)
    for n in range(100, 400):
        edge.emit_event("burst", {"n": n, "blob": "x" * 1024})
    # The queue was not empty: the later frames queued behind the first ones.
    assert queued == 400
    calls = [edge.execute_command("hub.add", {"a": n, "b": 1}) for n in range(50)]
    assert await asyncio.gather(*calls) == [n + 1 for n in range(50)]
    await asyncio.wait_for(done.wait(), 20)
    assert got == list(range(400))
    # Once the writer has drained the queue, frames are written at once again.
    before = queued
    assert await edge.execute_command("hub.add", {"a": 1, "b": 1}) == 2
    assert queued == before


async def test_fragmented_and_early_messages_are_reassembled_in_order(
    registries: Make, start: Start
) -> None:
    """A peer may fragment a message and may speak before the server attached its channel:
    the server's channel reassembles fragments and takes early messages first, in order."""
    _hub, _, server = await hub_tree(registries, start)
    async with connect(server.url, additional_headers={ID_HEADER: "frag"}) as ws:
        ids = [new_id() for _ in range(3)]
        # Sent at once after the handshake: the server may not have attached its channel.
        for i, call_id in enumerate(ids[:2]):
            await ws.send(json.dumps(execute_msg(call_id, "hub.add", {"a": i, "b": 10})))
        text = json.dumps(execute_msg(ids[2], "below.mul", {"a": 6, "b": 7}))
        await ws.send([text[:10], text[10:25], text[25:]])  # three frames, one message
        answers: dict[str, Any] = {}
        while len(answers) < 3:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] == "execute.command.response":
                answers[msg["thid"]] = msg["response"]["result"]
        assert [answers[i] for i in ids] == [10, 11, 42]


def execute_msg(call_id: str, command_id: str, request: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "execute.command.request",
        "commandId": command_id,
        "request": request,
    }


# --------------------------------------------------------------------------- exposure


async def test_expose_limits_what_clients_list_and_call(registries: Make, start: Start) -> None:
    hub, below, server = await hub_tree(registries, start, expose=["hub.*"])
    runs: list[int] = []
    await below.register_command("below.reset", lambda: runs.append(1))
    edge, _ = await join(registries, server.url)
    # The client's view: only the exposed commands (its own are its own).
    await edge.register_command("edge.read", lambda: "edge")
    assert sorted(ids(edge)) == ["edge.read", "hub.add"]
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    # A hidden command is not_found, as a missing one: answered by the server, never run.
    for command_id in ("below.mul", "below.reset", "no.such"):
        with pytest.raises(NotFoundError) as e:
            await edge.execute_command(command_id, {"a": 2, "b": 3})
        assert e.value.message == (
            f"command '{command_id}' is not registered anywhere registry 'hub' can reach"
        )
    # An exposed id that does not exist gets no "did you mean" (it could name a hidden one).
    with pytest.raises(NotFoundError) as e:
        await edge.execute_command("hub.ad", {"a": 1, "b": 2})
    assert "did you mean" not in e.value.message
    assert runs == []
    # The tree behind the server is not limited: the hub and its members call the client.
    assert await hub.execute_command("edge.read") == "edge"
    assert await below.execute_command("edge.read") == "edge"
    assert await below.execute_command("below.mul", {"a": 2, "b": 3}) == 6


async def answer_to(ws: ClientConnection, body: str, thid: str) -> dict[str, Any]:
    """Sends ``body`` (raw JSON text) and returns the answer whose ``thid`` is ``thid``."""
    await ws.send(body)
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if msg.get("thid") == thid:
            return msg


async def test_expose_is_not_bypassed_by_json_escapes(registries: Make, start: Start) -> None:
    """Frames are checked as the decoder reads them: a call of a hidden command spelled
    with JSON escapes is still answered not_found and never runs."""
    _hub, below, server = await hub_tree(registries, start, expose=["hub.*"])
    runs: list[int] = []
    await below.register_command("below.reset", lambda: runs.append(1))
    async with connect(server.url, additional_headers={ID_HEADER: "esc"}) as ws:
        for n, body in enumerate(
            (
                r'{"id":"%s","type":"execute.command.requ\u0065st","commandId":"below.reset"}',
                r'{"id":"%s","type":"execute.command.request","commandId":"below\u002ereset"}',
            )
        ):
            thid = f"esc-{n}"
            answer = await answer_to(ws, body % thid, thid)
            assert answer["response"]["error"] == {
                "code": "not_found",
                "message": "command 'below.reset' is not registered anywhere registry 'hub' "
                "can reach",
            }, body
        body = r'{"id":"ok","type":"execute.command.requ\u0065st","commandId":"hub.add",'
        answer = await answer_to(ws, body + r'"request":{"a":1,"b":2}}', "ok")
        assert answer["response"] == {"ok": True, "result": 3}
    assert runs == []


async def test_registering_a_hidden_id_is_answered_as_for_a_free_one(
    registries: Make, start: Start
) -> None:
    """A client that registers the id of a hidden command is not told it exists: it gets
    ``ok`` as for a free id, and the hidden command stays the one the tree calls."""
    hub, below, server = await hub_tree(registries, start, expose=["hub.*"])

    def register(thid: str, command_id: str) -> str:
        return json.dumps(
            {"id": thid, "type": "register.command.request", "command": {"id": command_id}}
        )

    async with connect(server.url, additional_headers={ID_HEADER: "reg"}) as ws:
        free = await answer_to(ws, register("r1", "edge.free"), "r1")
        hidden = await answer_to(ws, register("r2", "below.mul"), "r2")
        shown = await answer_to(ws, register("r3", "hub.add"), "r3")
        spec_support.validator("register.command.response.json").validate(hidden)
    assert free["response"] == hidden["response"] == {"ok": True}
    # An exposed command the client can list anyway: refused as ever.
    assert shown["response"] == {"ok": False, "error": "duplicate_command"}
    assert await hub.execute_command("below.mul", {"a": 2, "b": 3}) == 6
    assert await below.execute_command("below.mul", {"a": 2, "b": 3}) == 6


async def test_expose_by_predicate_and_handler(registries: Make, start: Start) -> None:
    hub, _, server = await hub_tree(
        registries, start, expose=lambda command_id: command_id == "below.mul"
    )
    edge, _ = await join(registries, server.url)
    assert ids(edge) == ["below.mul"]
    assert await edge.execute_command("below.mul", {"a": 2, "b": 3}) == 6
    with pytest.raises(NotFoundError):
        await edge.execute_command("hub.add", {"a": 1, "b": 2})
    with pytest.raises(TypeError, match="expose"):
        WebSocketHandler(hub, expose=3)  # type: ignore[arg-type]


async def test_a_token_that_is_not_ascii_is_refused_when_the_handler_is_made(
    registries: Make,
) -> None:
    hub = registries("hub")
    for token in ("pässwörd", "токен"):
        with pytest.raises(ValueError, match="ASCII"):
            WebSocketHandler(hub, token=token)
        with pytest.raises(ValueError, match="ASCII"):
            await serve_websocket(hub, token=token)
    WebSocketHandler(hub, token="s3cret~!")
