"""gRPC channels end to end, against real ``grpc.aio`` servers on 127.0.0.1 (free ports,
started and stopped by each test; one test kills a server process).

The usual tree: ``hub`` serves gRPC streams and has ``below`` under it (in memory); ``edge``
(and sometimes ``edge2``) join the tree through a :class:`GrpcChannel` that is their
``router_channel``. Every message any gRPC stream carries is checked to be a
``google.protobuf.StringValue`` holding a valid spec-v1 message (the ``wire`` fixture).
Foreign peers are written by hand on grpcio's raw API, as a tonic or grpc-go client would
speak the wire with the well-known type. Every wait has a deadline; no test asserts a
duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import spec_support
from cmd_ipc import ChannelDisconnectedError, CommandError, CommandRegistry, NotFoundError
from cmd_ipc.channels.grpc import (
    FINAL_CODES,
    ID_METADATA,
    PATH,
    SERVER_METADATA,
    FrameError,
    GrpcChannel,
    GrpcServerChannel,
    _GrpcBase,
    decode_frame,
    encode_frame,
)
from cmd_ipc.server.grpc import GrpcHandler, GrpcServer, serve_grpc, server_options
from grpc import aio
from helpers import eventually, link, new_id, registries, settle

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]
Start = Callable[..., Awaitable[GrpcServer]]


class Wire:
    """What the gRPC channels of a test received: every frame decoded and validated."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.invalid: list[bytes] = []
        #: Set by a test that sends garbage on purpose.
        self.garbage_expected = False


@pytest.fixture(autouse=True)
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wire]:
    """Validates every frame a gRPC channel delivers (so everything that crossed between
    two of ours, whichever way); a test that sends garbage says so."""
    seen = Wire()
    original = _GrpcBase._deliver

    def deliver(self: _GrpcBase, frame: bytes) -> None:
        try:
            seen.seen.append(spec_support.validate_frame(frame, "json"))
        except Exception:
            seen.invalid.append(frame)
        original(self, frame)

    monkeypatch.setattr(_GrpcBase, "_deliver", deliver)
    yield seen
    if not seen.garbage_expected:
        assert seen.invalid == [], "a frame that is not a spec-v1 message crossed"


@pytest.fixture
async def start(registries: Make) -> AsyncIterator[Start]:
    """Starts gRPC servers on 127.0.0.1 (port 0 unless given); all closed at teardown,
    before the registries."""
    made: list[GrpcServer] = []

    async def start(registry: CommandRegistry, **kwargs: Any) -> GrpcServer:
        server = await serve_grpc(registry, "127.0.0.1", **kwargs)
        made.append(server)
        return server

    yield start
    for server in reversed(made):
        await server.close(grace=None)


def ids(reg: CommandRegistry) -> list[str]:
    return [c["id"] for c in reg.list_commands()]


async def join(
    make: Make, target: str, name: str = "edge", **channel_kw: Any
) -> tuple[CommandRegistry, GrpcChannel]:
    """A registry ``name`` whose router is the hub, through a gRPC channel."""
    reg = make(name, router_channel="hub")
    channel = GrpcChannel("hub", target, client_id=name, **channel_kw)
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
    return [r.getMessage() for r in caplog.records if r.name == "cmd_ipc.grpc"]


# --------------------------------------------------------------------------- a raw peer


class RawPeer:
    """A peer on grpcio's raw API: StringValue frames of JSON text, written by hand."""

    def __init__(self, call: aio.StreamStreamCall[bytes, bytes]) -> None:
        self.call = call

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        await self.call.write(encode_frame(text.encode()))

    async def recv(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.call.read(), 5)
        assert isinstance(raw, bytes), f"the stream ended: {raw!r}"
        msg: dict[str, Any] = spec_support.validate_frame(decode_frame(raw), "json")
        return msg

    async def recv_type(self, type_: str) -> dict[str, Any]:
        """The next message of ``type_``, skipping others."""
        while True:
            msg = await self.recv()
            if msg["type"] == type_:
                return msg

    async def answer_to(self, body: str, thid: str) -> dict[str, Any]:
        """Sends ``body`` (raw JSON text) and returns the answer whose ``thid`` is ``thid``."""
        await self.send(body)
        while True:
            msg = await self.recv()
            if msg.get("thid") == thid:
                return msg

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """Reads to the end of the stream; its status."""
        with contextlib.suppress(aio.AioRpcError):
            while await asyncio.wait_for(self.call.read(), 10) is not aio.EOF:
                pass
        return await self.call.code(), await self.call.details()


@contextlib.asynccontextmanager
async def raw_peer(
    target: str, client_id: str | None = None, token: str | None = None
) -> AsyncIterator[RawPeer]:
    metadata: list[tuple[str, str]] = []
    if client_id is not None:
        metadata.append((ID_METADATA, client_id))
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    async with aio.insecure_channel(target) as channel:
        call = channel.stream_stream(PATH)(metadata=tuple(metadata))
        try:
            yield RawPeer(call)
        finally:
            call.cancel()


# --------------------------------------------------------------------------- the frame


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2_000_000])
def test_frames_are_string_values(n: int) -> None:
    text = b"x" * n
    frame = encode_frame(text)
    assert decode_frame(frame) == text
    if n:
        # Field 1, wire type 2, then the length as a protobuf varint.
        assert frame[0] == 0x0A
        length, shift, i = 0, 0, 1
        while True:
            length |= (frame[i] & 0x7F) << shift
            i += 1
            if frame[i - 1] < 0x80:
                break
            shift += 7
        assert (length, frame[i:]) == (n, text)
    else:
        assert frame == b""  # proto3: the empty string is the empty message


def test_frame_of_utf8_text_round_trips() -> None:
    text = json.dumps({"s": "héllo 🌍"}, ensure_ascii=False).encode()
    assert decode_frame(encode_frame(text)) == text


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x01x",  # field 2
        b"\x0a",  # no length
        b"\x0a\x85",  # a cut varint
        b"\x0a\x05abc",  # shorter than it says
        b"\x0a\x01ab",  # longer than it says
        b"\x0a\x01x\x0a\x01y",  # field 1 twice
        b"\x0a\xff\xff\xff\xff\xff\x01x",  # a varint too long
        b"\x0a\x02\xc3\x28",  # not UTF-8
    ],
)
def test_invalid_frames_are_refused(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("cmd_ipc.server.grpc", "cmd_ipc.channels.grpc"):
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(ImportError, match=r"cmd-ipc\[grpc\]") as info:
        importlib.import_module("cmd_ipc.channels.grpc")
    assert "-e '.[grpc]'" in str(info.value)
    with pytest.raises(ImportError, match=r"cmd-ipc\[grpc\]"):
        importlib.import_module("cmd_ipc.server.grpc")


# --------------------------------------------------------------------------- the tree


async def test_remote_registry_is_a_member_of_the_tree(registries: Make, start: Start) -> None:
    hub, below, server = await hub_tree(registries, start)
    edge, channel = await join(registries, server.target)
    assert channel.connected and edge.channels["hub"] is channel
    assert isinstance(hub.channels["edge"], GrpcServerChannel)
    assert channel.call is not None
    assert (SERVER_METADATA, "hub") in tuple(await channel.call.initial_metadata())

    await edge.register_command("edge.echo", lambda text: f"edge:{text}")
    # Registered up the tree: the hub routes it to the gRPC channel, below escalates.
    assert hub.route_of("edge.echo") == "edge"
    assert await hub.execute_command("edge.echo", {"text": "hi"}) == "edge:hi"
    assert await below.execute_command("edge.echo", {"text": "lo"}) == "edge:lo"

    # The client calls the server's commands and those of the server's other members.
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    assert await edge.execute_command("below.mul", {"a": 3, "b": 4}) == 12

    # Two gRPC clients reach each other through the hub.
    edge2, _ = await join(registries, server.target, "edge2")
    await edge2.register_command("edge2.neg", lambda x: -x)
    assert await edge.execute_command("edge2.neg", {"x": 5}) == -5
    assert await edge2.execute_command("edge.echo", {"text": "yo"}) == "edge:yo"
    with pytest.raises(NotFoundError):
        await edge.execute_command("nobody.has.this")
    # Many calls in flight at once, both ways, each answered once and in full.
    sums = await asyncio.gather(
        *(edge.execute_command("hub.add", {"a": i, "b": 1}) for i in range(200)),
        *(hub.execute_command("edge.echo", {"text": str(i)}) for i in range(200)),
    )
    assert sums[:200] == [i + 1 for i in range(200)]
    assert sums[200:] == [f"edge:{i}" for i in range(200)]


async def test_grpc_peer_outside_the_tree(registries: Make, start: Start) -> None:
    # The channel is not the client's router: the two registries are mesh peers and learn
    # each other's commands from the command lists.
    hub, _, server = await hub_tree(registries, start)
    peer = registries("peer")
    await peer.register_command("peer.hello", lambda: "hello")
    await peer.register_channel(GrpcChannel("hub", server.target, client_id="peer"))
    assert peer.route_of("hub.add") == "hub"  # listed before register_channel returned
    assert await peer.execute_command("hub.add", {"a": 2, "b": 2}) == 4
    assert await hub.wait_listed("peer")
    assert await hub.execute_command("peer.hello") == "hello"


async def test_events_cross_both_ways_exactly_once(registries: Make, start: Start) -> None:
    hub, below, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.target)
    edge2, _ = await join(registries, server.target, "edge2")
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


async def test_private_ids_stay_private(registries: Make, start: Start, wire: Wire) -> None:
    hub, below, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.target)
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
    assert not [m for m in wire.seen if "_edge" in json.dumps(m)], "a private id on the wire"


# --------------------------------------------------------------------------- the wire


async def test_messages_on_the_wire_are_spec_v1_string_values(
    registries: Make, start: Start, wire: Wire
) -> None:
    hub, _, server = await hub_tree(registries, start)
    edge, _ = await join(registries, server.target)
    await edge.register_command("edge.fail", lambda: 1 / 0)
    edge.emit_event("edge.event", {"n": 1})
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    with pytest.raises(CommandError):
        await hub.execute_command("edge.fail")
    types = {m["type"] for m in wire.seen}
    assert {
        "list.commands.request",
        "list.commands.response",
        "register.command.request",
        "register.command.response",
        "execute.command.request",
        "execute.command.response",
        "event",
    } <= types


async def test_a_foreign_peer_speaks_string_values(registries: Make, start: Start) -> None:
    # A peer written by hand (as a tonic or grpc-go client would be, with the well-known
    # google.protobuf.StringValue): JSON text in field 1 of every message.
    hub, _, server = await hub_tree(registries, start)
    async with raw_peer(server.target, "rs") as peer:
        assert (SERVER_METADATA, "hub") in tuple(await peer.call.initial_metadata())
        list_request = await peer.recv_type("list.commands.request")
        await peer.send(
            {
                "id": new_id(),
                "type": "list.commands.response",
                "thid": list_request["id"],
                "commands": [{"id": "rs.hello", "description": "greets"}],
            }
        )
        call_id = new_id()
        await peer.send(
            {
                "id": call_id,
                "type": "execute.command.request",
                "commandId": "below.mul",
                "request": {"a": 6, "b": 7},
            }
        )
        response = await peer.recv_type("execute.command.response")
        assert response["thid"] == call_id
        assert response["response"] == {"ok": True, "result": 42}

        assert await hub.wait_listed("rs")
        call = asyncio.ensure_future(hub.execute_command("rs.hello", {"name": "py"}))
        request = await peer.recv_type("execute.command.request")
        assert (request["commandId"], request["request"]) == ("rs.hello", {"name": "py"})
        await peer.send(
            {
                "id": new_id(),
                "type": "execute.command.response",
                "thid": request["id"],
                "response": {"ok": True, "result": "hello py"},
            }
        )
        assert await asyncio.wait_for(call, 5) == "hello py"


async def test_a_message_that_is_not_a_string_value_ends_the_stream(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub, _, server = await hub_tree(registries, start)
    with caplog.at_level(logging.WARNING, logger="cmd_ipc.grpc"):
        async with raw_peer(server.target, "bad") as peer:
            await eventually(lambda: "bad" in hub.channels)
            await peer.call.write(b"\x12\x03abc")  # field 2: not a StringValue
            code, details = await peer.status()
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "StringValue" in details
        await eventually(lambda: "bad" not in hub.channels)
    assert any("StringValue" in m for m in messages(caplog))


async def test_a_string_value_that_is_not_spec_v1_is_dropped_as_over_websocket(
    registries: Make, start: Start, wire: Wire
) -> None:
    # As a WebSocket text message that is not a message: the registry drops it and
    # counts it; the stream goes on.
    wire.garbage_expected = True
    hub, _, server = await hub_tree(registries, start)
    async with raw_peer(server.target, "junk") as peer:
        await eventually(lambda: "junk" in hub.channels)
        dropped = hub.stats()["dropped"]
        await peer.send("this is not json")
        await peer.send('{"type": "no.such.type", "id": "x"}')
        call_id = new_id()
        answer = await peer.answer_to(
            json.dumps(
                {
                    "id": call_id,
                    "type": "execute.command.request",
                    "commandId": "hub.add",
                    "request": {"a": 1, "b": 2},
                }
            ),
            call_id,
        )
        assert answer["response"] == {"ok": True, "result": 3}
        assert hub.stats()["dropped"] == dropped + 2
        assert "junk" in hub.channels
    assert len(wire.invalid) == 2


@pytest.mark.parametrize("toward", ["server", "client"])
async def test_message_over_max_size_ends_the_stream(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture, toward: str
) -> None:
    hub, _, server = await hub_tree(
        registries, start, max_size=4096 if toward == "server" else None
    )
    await hub.register_command("hub.big", lambda n: "x" * n)
    await hub.register_command("hub.len", lambda blob: len(blob))
    edge, channel = await join(
        registries,
        server.target,
        max_size=4096 if toward == "client" else None,
        reconnect=False,
    )
    assert await edge.execute_command("hub.len", {"blob": "x" * 100}) == 100
    with caplog.at_level(logging.WARNING, logger="cmd_ipc.grpc"):
        with pytest.raises(ChannelDisconnectedError):
            if toward == "server":
                await asyncio.wait_for(edge.execute_command("hub.len", {"blob": "x" * 10_000}), 10)
            else:
                await asyncio.wait_for(edge.execute_command("hub.big", {"n": 10_000}), 10)
        await eventually(lambda: "edge" not in hub.channels and "hub" not in edge.channels)
    assert not channel.connected
    assert any("RESOURCE_EXHAUSTED" in m for m in messages(caplog)), messages(caplog)


async def test_a_peer_that_does_not_read_is_dropped_at_the_send_limit(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub, _, server = await hub_tree(registries, start, send_limit=256 * 1024)
    blob = "x" * 32 * 1024
    caplog.set_level(logging.WARNING, logger="cmd_ipc.grpc")
    async with raw_peer(server.target, "slow") as peer:
        await eventually(lambda: "slow" in hub.channels)
        side = hub.channels["slow"]
        # The peer reads nothing: HTTP/2 flow control holds the writes back, the queue
        # grows, and at the limit the stream ends instead of growing without bound.
        for _ in range(2000):
            hub.emit_event("hub.flood", {"blob": blob})
            await asyncio.sleep(0)
            if "slow" not in hub.channels:
                break
        await eventually(lambda: "slow" not in hub.channels, timeout=10)
        assert not side.connected
        code, details = await peer.status()
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert "send_limit" in details
    assert any("send_limit" in m for m in messages(caplog)), messages(caplog)


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_missing_or_bad_token_is_refused_with_unauthenticated(
    registries: Make, start: Start, token: str | None
) -> None:
    hub, _, server = await hub_tree(registries, start, token="s3cret")
    before = set(hub.channels)
    edge = registries("edge", router_channel="hub")
    channel = GrpcChannel("hub", server.target, client_id="edge", token=token)
    with pytest.raises(ChannelDisconnectedError, match="UNAUTHENTICATED"):
        await edge.register_channel(channel)
    assert set(hub.channels) == before and not server.handler.channels
    assert "hub" not in edge.channels and not channel.connected
    # Refused for good: it does not try again.
    assert not await channel.reconnect()
    async with raw_peer(server.target, "raw", token="s3cret ") as peer:
        # A raw peer with the token (and stray spaces) gets in.
        await peer.recv_type("list.commands.request")
    async with raw_peer(server.target, "raw2", token="") as peer:
        assert (await peer.status())[0] is grpc.StatusCode.UNAUTHENTICATED


async def test_good_token_is_accepted(registries: Make, start: Start) -> None:
    hub, _, server = await hub_tree(registries, start, token="s3cret")
    edge, _ = await join(registries, server.target, token="s3cret")
    await edge.register_command("edge.ok", lambda: "ok")
    assert await hub.execute_command("edge.ok") == "ok"
    assert await edge.execute_command("hub.add", {"a": 1, "b": 1}) == 2


async def test_handler_inside_an_existing_grpc_server(registries: Make) -> None:
    hub = registries("hub")
    await hub.register_command("hub.add", lambda a, b: a + b)
    server = aio.server(options=server_options())
    handler = GrpcHandler(hub, token="s3cret")
    handler.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        edge, channel = await join(registries, f"127.0.0.1:{port}", token="s3cret")
        assert await edge.execute_command("hub.add", {"a": 2, "b": 3}) == 5
        assert [c.id for c in handler.channels] == ["edge"]
        # Another method of that server is not ours.
        async with aio.insecure_channel(f"127.0.0.1:{port}") as other:
            with pytest.raises(aio.AioRpcError) as info:
                await other.unary_unary("/cmdipc.v1.Mesh/Other")(b"")
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        await handler.close()
        # Closed by the server (UNAVAILABLE): the client notices at once.
        await eventually(lambda: "edge" not in hub.channels and "hub" not in edge.channels)
        await channel.close()
    finally:
        await server.stop(None)


# --------------------------------------------------------------------------- disconnects

_KILLED_SERVER = """
import asyncio, sys
from cmd_ipc import CommandRegistry
from cmd_ipc.server.grpc import serve_grpc

async def main():
    async with CommandRegistry("hub") as hub:
        async def stuck():
            print("stuck", flush=True)
            await asyncio.Event().wait()
        await hub.register_command("hub.stuck", stuck)
        await hub.register_command("hub.add", lambda a, b: a + b)
        server = await serve_grpc(hub, "127.0.0.1", 0)
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


async def test_a_killed_server_fails_waiting_calls_at_once(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_SERVER,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        edge, channel = await join(
            registries, f"127.0.0.1:{port}", max_retries=1, backoff=(0.01, 0.01)
        )
        assert edge.request_ttl == 30.0
        assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
        calls = [asyncio.ensure_future(edge.execute_command("hub.stuck")) for _ in range(3)]
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"stuck\n"
        caplog.set_level(logging.WARNING, logger="cmd_ipc.grpc")
        proc.kill()
        # Failed by the broken stream, long before the 30 s request TTL.
        for call in calls:
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(call, 5)
        await eventually(lambda: "hub" not in edge.channels, timeout=5)
        assert any("lost" in m for m in messages(caplog)), messages(caplog)
        await eventually(lambda: any("gave up" in m for m in messages(caplog)), timeout=10)
        assert not channel.connected
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_server_restart_client_reconnects_and_re_registers(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub = registries("hub")
    await hub.register_command("hub.add", lambda a, b: a + b)
    server = await start(hub)
    port = server.port
    edge, channel = await join(registries, server.target, backoff=(0.05, 0.2))
    await edge.register_command("edge.echo", lambda text: f"edge:{text}")

    @edge.command("edge.typed")
    def typed(x: int) -> int:
        return x * 10

    assert await hub.execute_command("edge.echo", {"text": "1"}) == "edge:1"
    assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    stuck, started = stuck_handler()
    await hub.register_command("hub.stuck", stuck)
    call = asyncio.ensure_future(edge.execute_command("hub.stuck"))
    await asyncio.wait_for(started.wait(), 5)

    caplog.set_level(logging.INFO, logger="cmd_ipc.grpc")
    await server.close()
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 5)
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
    edge, channel = await join(registries, server.target, max_retries=3, backoff=(0.01, 0.02))
    caplog.set_level(logging.INFO, logger="cmd_ipc.grpc")
    await server.close()
    await eventually(lambda: any("gave up" in m for m in messages(caplog)), timeout=10)
    attempts = [m for m in messages(caplog) if "reconnection attempt" in m]
    assert len(attempts) == 3
    assert not channel.connected and "hub" not in edge.channels
    # Asked again, it tries max_retries times again and gives up: the server is still gone.
    assert not await asyncio.wait_for(channel.reconnect(), 10)
    assert len([m for m in messages(caplog) if "reconnection attempt" in m]) == 6
    assert not channel.connected


async def test_a_newer_stream_with_the_same_id_replaces_the_old_one(
    registries: Make, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    hub = registries("hub")
    server = await start(hub)
    old_edge, old = await join(registries, server.target, backoff=(0.01, 0.02))
    await old_edge.register_command("edge.who", lambda: "old")
    old_side = hub.channels["edge"]
    caplog.set_level(logging.INFO, logger="cmd_ipc.grpc")
    new_edge, new = await asyncio.wait_for(join(registries, server.target), 5)
    assert hub.channels["edge"] is not old_side
    await eventually(lambda: "hub" not in old_edge.channels)
    await new_edge.register_command("edge.who", lambda: "new")
    assert await hub.execute_command("edge.who") == "new"
    # Ended with ABORTED, the old client does not fight back.
    await eventually(lambda: any("not reconnecting" in m for m in messages(caplog)))
    assert not old.connected and new.connected
    assert any("ABORTED" in m for m in messages(caplog))


@pytest.mark.parametrize("taken", ["router", "worker", "pool member"])
async def test_a_client_may_not_take_an_id_the_registry_keeps(
    registries: Make, start: Start, monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    # The router channel "up" is detached: a client under its id would become the router
    # (every escalated call and every command, whatever expose= says).
    hub = registries("hub", router_channel="up")
    hub.command("admin.reset")(lambda: "reset!")  # deferred until the router attaches
    kept = {"router": "up", "worker": "w1", "pool member": "p-1"}[taken]
    member = type("Member", (), {"id": "p-1"})()
    if taken == "worker":
        monkeypatch.setattr(CommandRegistry, "workers", property(lambda r: {"w1": object()}))
    if taken == "pool member":
        pool = type("Pool", (), {"workers": [member]})()
        monkeypatch.setattr(CommandRegistry, "pools", property(lambda r: {"p": pool}))
    server = await start(hub, expose="api.*")
    evil = registries("evil")
    stolen: list[Any] = []
    await evil.register_command("secret.op", lambda **kw: stolen.append(kw), validate=False)
    channel = GrpcChannel("hub", server.target, client_id=kept, backoff=(0.01, 0.02))
    with pytest.raises(ChannelDisconnectedError, match="FAILED_PRECONDITION"):
        await evil.register_channel(channel)
    assert kept not in hub.channels and not server.handler.channels
    # The hub's escalations still find no router, rather than the client.
    with pytest.raises(ChannelDisconnectedError):
        await hub.execute_command("secret.op", {"password": "hunter2"})
    assert stolen == []
    # Refused for good: it does not try again.
    assert not await channel.reconnect()
    async with raw_peer(server.target, kept) as peer:
        code, details = await peer.status()
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "reserved" in details
    # Any other id gets in.
    async with raw_peer(server.target, "guest") as peer:
        await peer.recv_type("list.commands.request")


async def test_an_id_in_use_by_another_kind_of_channel_is_refused_for_good(
    registries: Make, start: Start
) -> None:
    hub, _, server = await hub_tree(registries, start)
    assert not isinstance(hub.channels["below"], GrpcServerChannel)
    edge = registries("edge")
    channel = GrpcChannel("hub", server.target, client_id="below", max_retries=20)
    with pytest.raises(ChannelDisconnectedError, match="ALREADY_EXISTS"):
        await edge.register_channel(channel)
    assert grpc.StatusCode.ALREADY_EXISTS in FINAL_CODES
    # No 20 retries of a refusal that cannot change: reconnect gives up at once.
    assert channel._final and not await channel.reconnect()
    assert not isinstance(hub.channels["below"], GrpcServerChannel)


async def test_a_stream_cancelled_while_it_attaches_leaves_no_channel(
    registries: Make, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = registries("hub")
    server = await start(hub)
    attached = asyncio.Event()
    rpcs: list[asyncio.Task[Any]] = []
    register = hub.register_channel

    async def slow_register(channel: Any) -> None:
        # The channel is attached and started; the registration has not returned yet.
        await register(channel)
        task = asyncio.current_task()
        assert task is not None
        rpcs.append(task)
        attached.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(hub, "register_channel", slow_register)
    async with raw_peer(server.target, "edge"):
        await asyncio.wait_for(attached.wait(), 5)
        assert isinstance(hub.channels["edge"], GrpcServerChannel)
        # The RPC is cancelled (as a server stopping cancels it) inside the registration:
        # the channel goes with it.
        rpcs[0].cancel()
        await eventually(lambda: "edge" not in hub.channels, timeout=5)
        await eventually(lambda: not server.handler.channels, timeout=5)


async def test_max_streams_bounds_the_streams_served_at_once(
    registries: Make, start: Start
) -> None:
    hub = registries("hub")
    await hub.register_command("hub.add", lambda a, b: a + b)
    server = await start(hub, max_streams=1)
    edge, _ = await join(registries, server.target, reconnect=False)
    edge2 = registries("edge2", router_channel="hub")
    second = GrpcChannel("hub", server.target, client_id="edge2", reconnect=False)
    with pytest.raises(ChannelDisconnectedError, match="RESOURCE_EXHAUSTED"):
        await edge2.register_channel(second)
    assert set(hub.channels) == {"edge"}
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in FINAL_CODES  # its client tries later
    await edge.close_channel("hub")
    await eventually(lambda: not server.handler.channels, timeout=5)
    # A stream ended, so one more is served.
    third = GrpcChannel("hub", server.target, client_id="edge2", reconnect=False)
    await edge2.register_channel(third)
    assert await edge2.execute_command("hub.add", {"a": 1, "b": 2}) == 3
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="max_streams"):
            await serve_grpc(hub, max_streams=bad)


class CountingProxy:
    """A TCP forwarder to ``port`` that counts the bytes crossing each way."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        tasks = [
            asyncio.ensure_future(self._pump(reader, up_writer, "up")),
            asyncio.ensure_future(self._pump(up_reader, writer, "down")),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        try:
            while data := await reader.read(65536):
                setattr(self, way, getattr(self, way) + len(data))
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_keepalive_pings_keep_an_idle_stream(registries: Make, start: Start) -> None:
    # The server allows pings every 10 s by default; a client pinging faster than the
    # server allows is told so by gRPC, so this server allows 0.1 s. Only the client
    # pings (the server's keepalive is off): the stream stays idle but for its pings.
    _hub, _, server = await hub_tree(
        registries,
        start,
        options=[
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
            ("grpc.http2.min_ping_interval_without_data_ms", 100),
        ],
        keepalive_time=None,
    )
    proxy = CountingProxy(server.port)
    target = await proxy.start()
    try:
        edge, channel = await join(
            registries, target, keepalive_time=0.2, keepalive_timeout=5.0, reconnect=False
        )
        assert await edge.execute_command("hub.add", {"a": 1, "b": 1}) == 2
        stream = channel._stream
        await settle()
        up, down = proxy.up, proxy.down
        # Idle but for pings: HTTP/2 PING frames (17 bytes each) and their acks cross, a
        # few rounds of them, and the server keeps the stream (no GOAWAY for them).
        await eventually(lambda: proxy.up >= up + 3 * 17 and proxy.down >= down + 3 * 17, 10)
        assert await edge.execute_command("hub.add", {"a": 1, "b": 2}) == 3
        assert channel.connected and channel._stream is stream
    finally:
        await proxy.close()


# --------------------------------------------------------------------------- the channel


async def test_channel_options_and_lifecycle(registries: Make, start: Start) -> None:
    for bad in (
        {"target": ""},
        {"client_id": "has space"},
        {"backoff": (0.0, 1.0)},
        {"max_retries": -1},
        {"max_size": 0},
        {"send_limit": 0},
        {"keepalive_time": 0},
        {"token": ""},
        {"private_key": b"k"},
        {"tls": False, "root_certificates": b"r"},
    ):
        kwargs: dict[str, Any] = {"target": "127.0.0.1:1", **bad}
        with pytest.raises(ValueError):
            GrpcChannel("hub", **kwargs)
    assert GrpcChannel("hub", "h:1", tls=True).secure
    assert GrpcChannel("hub", "h:1", root_certificates=b"pem").secure
    assert GrpcChannel("hub", "h:1").client_id.startswith("grpc-")
    with pytest.raises(ValueError):
        await serve_grpc(registries("x"), certificate_chain=b"c")
    with pytest.raises(TypeError, match="expose"):
        GrpcHandler(registries("y"), expose=3)  # type: ignore[arg-type]

    # Unreachable: refused at once, with the cause.
    lonely = registries("lonely", router_channel="hub")
    with pytest.raises(ChannelDisconnectedError, match="UNAVAILABLE"):
        await lonely.register_channel(GrpcChannel("hub", "127.0.0.1:1", reconnect=False))

    hub, _, server = await hub_tree(registries, start)
    edge, channel = await join(registries, server.target)
    assert "open" in repr(channel) and server.target in repr(channel)
    assert "streams=1" in repr(server)
    with pytest.raises(RuntimeError):
        await channel.start(lambda f: None, lambda r: None)
    await channel.close()
    await channel.close()  # idempotent
    assert channel.closed and not channel.connected and "closed" in repr(channel)
    assert "hub" not in edge.channels
    await eventually(lambda: "edge" not in hub.channels)
    assert not await channel.reconnect()
    with pytest.raises(ChannelDisconnectedError):
        await channel.start(lambda f: None, lambda r: None)


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=cmd-ipc test CA", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".pem", ".key")}


async def test_mutual_tls(registries: Make, start: Start, certificates: dict[str, bytes]) -> None:
    c = certificates
    hub, _, server = await hub_tree(
        registries,
        start,
        certificate_chain=c["server.pem"],
        private_key=c["server.key"],
        client_ca=c["ca.pem"],
        token="s3cret",
    )
    assert server.secure
    edge, channel = await join(
        registries,
        server.target,
        token="s3cret",
        root_certificates=c["ca.pem"],
        certificate_chain=c["client.pem"],
        private_key=c["client.key"],
    )
    assert channel.secure
    await edge.register_command("edge.ok", lambda: "ok")
    assert await hub.execute_command("edge.ok") == "ok"
    assert await edge.execute_command("below.mul", {"a": 2, "b": 3}) == 6
    # Without a client certificate, or trusting another CA, no stream opens.
    for kw in (
        {"root_certificates": c["ca.pem"]},
        {"tls": grpc.ssl_channel_credentials(c["server.pem"])},
        {},  # plain HTTP/2 to a TLS port
    ):
        other = registries("other", router_channel="hub")
        with pytest.raises(ChannelDisconnectedError, match="UNAVAILABLE"):
            await other.register_channel(
                GrpcChannel(
                    "hub", server.target, token="s3cret", open_timeout=5, reconnect=False, **kw
                )
            )
        await other.close()
    assert [ch.id for ch in server.handler.channels] == ["edge"]


# --------------------------------------------------------------------------- exposure


async def test_expose_limits_what_clients_list_and_call(registries: Make, start: Start) -> None:
    hub, below, server = await hub_tree(registries, start, expose=["hub.*"])
    runs: list[int] = []
    await below.register_command("below.reset", lambda: runs.append(1))
    edge, _ = await join(registries, server.target)
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


async def test_expose_is_not_bypassed_by_json_escapes(registries: Make, start: Start) -> None:
    """Frames are checked as the decoder reads them: a call of a hidden command spelled
    with JSON escapes is still answered not_found and never runs."""
    _hub, below, server = await hub_tree(registries, start, expose=["hub.*"])
    runs: list[int] = []
    await below.register_command("below.reset", lambda: runs.append(1))
    async with raw_peer(server.target, "esc") as peer:
        for n, body in enumerate(
            (
                r'{"id":"%s","type":"execute.command.requ\u0065st","commandId":"below.reset"}',
                r'{"id":"%s","type":"execute.command.request","commandId":"below\u002ereset"}',
            )
        ):
            thid = f"esc-{n}"
            answer = await peer.answer_to(body % thid, thid)
            assert answer["response"]["error"] == {
                "code": "not_found",
                "message": "command 'below.reset' is not registered anywhere registry 'hub' "
                "can reach",
            }, body
        body = r'{"id":"ok","type":"execute.command.requ\u0065st","commandId":"hub.add",'
        answer = await peer.answer_to(body + r'"request":{"a":1,"b":2}}', "ok")
        assert answer["response"] == {"ok": True, "result": 3}
    assert runs == []


async def test_registering_a_hidden_id_is_answered_as_for_a_free_one(
    registries: Make, start: Start
) -> None:
    hub, below, server = await hub_tree(registries, start, expose=["hub.*"])

    def register(thid: str, command_id: str) -> str:
        return json.dumps(
            {"id": thid, "type": "register.command.request", "command": {"id": command_id}}
        )

    async with raw_peer(server.target, "reg") as peer:
        free = await peer.answer_to(register("r1", "edge.free"), "r1")
        hidden = await peer.answer_to(register("r2", "below.mul"), "r2")
        shown = await peer.answer_to(register("r3", "hub.add"), "r3")
        spec_support.validator("register.command.response.json").validate(hidden)
    assert free["response"] == hidden["response"] == {"ok": True}
    assert shown["response"] == {"ok": False, "error": "duplicate_command"}
    assert await hub.execute_command("below.mul", {"a": 2, "b": 3}) == 6
    assert await below.execute_command("below.mul", {"a": 2, "b": 3}) == 6


async def test_expose_by_predicate(registries: Make, start: Start) -> None:
    _hub, _, server = await hub_tree(
        registries, start, expose=lambda command_id: command_id == "below.mul"
    )
    edge, _ = await join(registries, server.target)
    assert ids(edge) == ["below.mul"]
    assert await edge.execute_command("below.mul", {"a": 2, "b": 3}) == 6
    with pytest.raises(NotFoundError):
        await edge.execute_command("hub.add", {"a": 1, "b": 2})


async def test_a_token_that_is_not_ascii_is_refused_when_the_handler_is_made(
    registries: Make,
) -> None:
    # gRPC metadata carries ASCII only: such a token could never be sent.
    hub = registries("hub")
    for token in ("pässwörd", "токен"):
        with pytest.raises(ValueError, match="ASCII"):
            GrpcHandler(hub, token=token)
        with pytest.raises(ValueError, match="ASCII"):
            await serve_grpc(hub, token=token)
    GrpcHandler(hub, token="s3cret~!")
