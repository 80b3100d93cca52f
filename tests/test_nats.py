"""The NATS mesh (:mod:`cmd_ipc.channels.nats`) end to end, against a NATS server of the
session's own (see :mod:`nats_support`).

In-process tests join several root registries to one namespace, each with its own NATS
connection (as separate machines would be). The machine tests start root registries in
processes of their own, each with its own workers, connected only through NATS. Every frame
a NatsChannel hands to its registry is validated against the spec-v1 schemas. Every wait has
a deadline; no test asserts a duration.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
import spec_support
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
    DuplicateCommandError,
    InMemoryChannel,
    InternalError,
    InvalidRequestError,
    NotFoundError,
)
from cmd_ipc.channels.nats import (
    NatsChannel,
    NatsServer,
    decode_id,
    encode_id,
    server_binary,
)
from helpers import eventually, settle
from hypothesis import given
from hypothesis import strategies as st
from nats.micro.service import ServiceInfo
from nats_support import FAST, machines, mesh, namespace, nats_url, until

__all__ = ["machines", "mesh", "namespace", "nats_url"]  # fixtures


def _have_binary() -> bool:
    try:
        server_binary()
    except FileNotFoundError:
        return False
    return True


#: Tests that start NATS servers of their own (stopped, restarted, with auth): they need the
#: nats-server binary even when ``$NATS_URL`` names the session's server.
own_server = pytest.mark.skipif(not _have_binary(), reason="no nats-server binary")


@pytest.fixture(autouse=True)
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Validates every frame a NatsChannel delivers to its registry (what came over NATS,
    and what the channel made itself); yields them."""
    seen: list[dict[str, Any]] = []
    original = NatsChannel._deliver

    def deliver(self: NatsChannel, frame: bytes) -> None:
        seen.append(spec_support.validate_frame(frame, "json"))
        original(self, frame)

    monkeypatch.setattr(NatsChannel, "_deliver", deliver)
    yield seen


# ---------------------------------------------------------------------- subjects


@given(st.text(min_size=1, max_size=80))
def test_ids_round_trip_through_subject_tokens(command_id: str) -> None:
    token = encode_id(command_id)
    assert decode_id(token) == command_id
    assert token and not any(c in token for c in " \t\r\n*>")
    for part in token.split("."):
        assert part  # never an empty subject token


@pytest.mark.parametrize(
    ("command_id", "token"),
    [
        ("calc.add", "calc.add"),
        ("users.get_by-id", "users.get_by-id"),
        ("calc add", "=Y2FsYyBhZGQ"),
        ("a..b", "=YS4uYg"),
        (".a", "=LmE"),
        ("x.*", "=eC4q"),
        ("x.>", "=eC4-"),
        ("=a", "=PWE"),
        ("ça", "=w6dh"),
    ],
)
def test_subject_forms(command_id: str, token: str) -> None:
    assert encode_id(command_id) == token
    assert decode_id(token) == command_id


@pytest.mark.parametrize("token", ["a b", "a..b", "=a b", "=Y2FsYyBhZGQ=", "=Y", "=_w", ""])
def test_decode_rejects_what_encode_never_makes(token: str) -> None:
    with pytest.raises(ValueError):
        decode_id(token)


def test_subjects_of_a_channel() -> None:
    ch = NatsChannel("mesh", namespace="shop")
    assert ch.command_subject("calc.add") == "cmdipc.shop.cmd.calc.add"
    assert ch.event_subject("user updated") == "cmdipc.shop.evt.=dXNlciB1cGRhdGVk"


@pytest.mark.parametrize(
    "options",
    [
        {"namespace": "a.b"},
        {"namespace": ""},
        {"mode": "shared"},
        {"max_pending": 0},
        {"request_ttl": 0},
        {"servers": []},
    ],
)
def test_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NatsChannel("mesh", **options)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    monkeypatch.delitem(sys.modules, "cmd_ipc.channels.nats")
    with pytest.raises(ImportError, match=r"cmd-ipc\[nats\]") as info:
        importlib.import_module("cmd_ipc.channels.nats")
    assert "-e '.[nats]'" in str(info.value)


# ---------------------------------------------------------------------- in-process mesh


async def test_call_a_command_of_another_machine(mesh: Any) -> None:
    a, _ = await mesh("a")
    b, cb = await mesh("b")

    @a.command("calc.add", description="Adds two ints")
    def add(x: int, y: int) -> int:
        return x + y

    await a.ready()
    await cb.wait_available("calc.add")
    assert await b.execute_command("calc.add", {"x": 2, "y": "3"}) == 5
    # Schemas travel: b lists the command with a's description and schemas.
    (listed,) = [c for c in b.list_commands() if c["id"] == "calc.add"]
    assert listed["description"] == "Adds two ints"
    assert listed["schema"]["request"]["properties"]["x"]["type"] == "integer"
    with pytest.raises(InvalidRequestError):
        await b.execute_command("calc.add", {"x": "not an int", "y": 1})


async def test_a_child_of_a_machine_calls_through_the_mesh(mesh: Any) -> None:
    a, _ = await mesh("a")
    b, cb = await mesh("b")
    child = CommandRegistry("b-child", router_channel="b")
    try:
        to_child, to_b = InMemoryChannel.pair("b-child", "b")
        await b.register_channel(to_child)
        await child.register_channel(to_b)
        await child.register_command("child.hello", lambda name: f"hello {name}")
        await a.register_command("a.twice", lambda n: 2 * n)
        # The child's command escalated to b's root, and from there to the mesh.
        assert "child.hello" in cb.served()
        assert await a.execute_command("child.hello", {"name": "ada"}) == "hello ada"
        assert await child.execute_command("a.twice", {"n": 21}) == 42
    finally:
        await child.close()


async def test_no_responders_is_not_found_at_once(mesh: Any) -> None:
    a, ca = await mesh("a")
    with pytest.raises(NotFoundError, match="no responders"):
        await a.execute_command("nobody.serves.this", {}, timeout=5)
    assert ca.stats()["no_responders"] == 1


async def test_a_slow_command_times_out(mesh: Any) -> None:
    a, _ = await mesh("a")
    b, cb = await mesh("b")
    never = asyncio.Event()

    async def slow() -> None:
        await never.wait()

    await a.register_command("slow.op", slow)
    await cb.wait_available("slow.op")
    with pytest.raises(CommandTimeoutError):
        await b.execute_command("slow.op", timeout=0.3)
    never.set()


async def test_payloads_larger_than_max_payload(
    mesh: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ca = await mesh("a")
    b, cb = await mesh("b")
    await a.register_command("big.echo", lambda text: text)
    await a.register_command("big.make", lambda n: "x" * n)
    await cb.wait_available("big.echo", "big.make")
    limit = cb.max_payload
    assert limit is not None
    with pytest.raises(InvalidRequestError, match="max_payload"):
        await b.execute_command("big.echo", {"text": "x" * (limit + 1)})
    with pytest.raises(InternalError, match="max_payload"):
        await b.execute_command("big.make", {"n": limit + 1})
    assert await b.execute_command("big.echo", {"text": "small"}) == "small"
    got: list[Any] = []
    a.add_event_listener("big.event", got.append)
    a.add_event_listener("small.event", got.append)
    with caplog.at_level(logging.WARNING, "cmd_ipc.nats"):
        b.emit_event("big.event", "x" * (limit + 1))
    assert "max_payload" in caplog.text
    # One connection publishes in order: once the marker arrived, the big one would have.
    b.emit_event("small.event", "marker")
    await eventually(lambda: "marker" in got, 5)
    assert got == ["marker"]


async def test_events_reach_every_machine_once(mesh: Any) -> None:
    roots = [await mesh(name) for name in ("a", "b", "c")]
    seen: dict[str, list[Any]] = {}
    for root, _ in roots:
        bucket = seen.setdefault(root.id, [])
        root.add_event_listener("user.updated", bucket.append)
        root.add_event_listener("done", bucket.append)
        root.add_event_listener("_private", bucket.append)
    a = roots[0][0]
    a.emit_event("user.updated", {"id": 1})
    a.emit_event("_private", "never published")
    a.emit_event("done", "marker")
    # One connection publishes both in order: once the marker arrived, so had the event.
    await eventually(lambda: all("marker" in seen[r.id] for r, _ in roots), 5)
    await settle()
    assert seen["a"] == [{"id": 1}, "never published", "marker"]
    for name in ("b", "c"):
        assert seen[name] == [{"id": 1}, "marker"]
    assert roots[1][1].stats()["events_in"] == 2


async def test_exclusive_ownership(mesh: Any) -> None:
    a, ca = await mesh("a", mode="exclusive", claim_ttl=5.0)
    b, cb = await mesh("b", mode="exclusive", claim_ttl=5.0)
    r, cr = await mesh("r")  # replicas
    await a.register_command("excl.job", lambda: "a")
    await cb.wait_available("excl.job")
    await cr.wait_available("excl.job")
    with pytest.raises(DuplicateCommandError):
        await b.register_command("excl.job", lambda: "b")
    with pytest.raises(DuplicateCommandError):  # a replica of an exclusive command
        await r.register_command("excl.job", lambda: "r")
    # The claim is in the KV bucket, and a refresh keeps it.
    kv = await ca.client.jetstream().key_value(f"cmdipc-{ca.namespace}-claims")  # type: ignore[union-attr]
    entry = await kv.get("excl.job")
    assert json.loads(entry.value or b"")["name"] == "a"
    await r.register_command("shared.job", lambda: "r")
    await cb.wait_available("shared.job")
    with pytest.raises(DuplicateCommandError):  # exclusive while replicas serve it
        await b.register_command("shared.job", lambda: "b")
    # The owner leaves: its claim is released, and another may claim (once it heard).
    await a.close()
    await eventually(lambda: "excl.job" not in cb.mesh_commands(), 5)
    await b.register_command("excl.job", lambda: "b")
    assert await r.execute_command("excl.job") == "b"


async def test_discovery_sees_commands_come_and_go(mesh: Any) -> None:
    a, _ca = await mesh("a")
    b, cb = await mesh("b")
    await a.register_command("late.one", lambda: 1)
    await cb.wait_available("late.one", timeout=5)
    await eventually(lambda: "late.one" in {c["id"] for c in b.list_commands()}, 5)
    assert cb.mesh_commands()["late.one"] == ["a"]
    await a.close()
    await eventually(lambda: "late.one" not in cb.mesh_commands(), 5)


async def test_list_commands_forgets_commands_that_left(mesh: Any) -> None:
    a, _ = await mesh("a")
    b, cb = await mesh("b")
    await a.register_command("gone.soon", lambda: 1)
    await eventually(lambda: "gone.soon" in {c["id"] for c in b.list_commands()}, 5)
    await a.close()
    await eventually(lambda: "gone.soon" not in cb.mesh_commands(), 5)
    await eventually(lambda: "gone.soon" not in {c["id"] for c in b.list_commands()}, 2)


async def test_a_command_that_left_a_machine_goes_to_another(mesh: Any) -> None:
    a, ca = await mesh("a")
    c, _cc = await mesh("c")
    b, cb = await mesh("b")
    child = CommandRegistry("a-child", router_channel="a")
    to_child, to_a = InMemoryChannel.pair("a-child", "a")
    await a.register_channel(to_child)
    await child.register_channel(to_a)
    await child.register_command("job.run", lambda: "a-child")
    await c.register_command("job.run", lambda: "c")
    await eventually(lambda: cb.mesh_commands().get("job.run") == ["a", "c"], 5)
    await child.close()  # a's worker died: a still subscribes until it notices
    await settle()
    # Every call is answered by c: a request that reaches a first is handed on.
    results = [await b.execute_command("job.run") for _ in range(10)]
    assert results == ["c"] * 10
    await eventually(lambda: "job.run" not in ca.served(), 5)
    await c.close()
    with pytest.raises(NotFoundError):
        await b.execute_command("job.run", timeout=5)


async def test_services_api_lists_the_machine(mesh: Any, nats_url: str, namespace: str) -> None:
    a, ca = await mesh("a")
    await a.register_command("calc.add", lambda x, y: x + y, description="adds")
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(f"$SRV.INFO.cmdipc-{namespace}", b"", timeout=5)
        info = ServiceInfo.from_dict(json.loads(msg.data))
        assert info.id == ca.instance_id and info.metadata["cmd_ipc.name"] == "a"
        (endpoint,) = info.endpoints
        assert endpoint.subject == f"cmdipc.{namespace}.cmd.calc.add"
        assert endpoint.queue_group == "cmdipc"
        assert json.loads(endpoint.metadata["cmd_ipc.command"]) == {
            "id": "calc.add",
            "description": "adds",
        }
        msg = await nc.request(f"$SRV.PING.cmdipc-{namespace}.{ca.instance_id}", timeout=5)
        assert json.loads(msg.data)["type"] == "io.nats.micro.v1.ping_response"
        # A spec-v1 request straight over NATS, as any client may send it.
        request = {"id": "r-1", "type": "execute.command.request", "commandId": "calc.add"}
        request["request"] = {"x": 1, "y": 2}  # type: ignore[assignment]
        msg = await nc.request(endpoint.subject, json.dumps(request).encode(), timeout=5)
        reply = spec_support.validate_frame(msg.data, "json")
        assert reply["thid"] == "r-1" and reply["response"] == {"ok": True, "result": 3}
        msg = await nc.request(f"$SRV.STATS.cmdipc-{namespace}", timeout=5)
        assert json.loads(msg.data)["endpoints"][0]["num_requests"] == 1
    finally:
        await nc.close()


@own_server
async def test_unreachable_server_fails_to_attach() -> None:
    with NatsServer(jetstream=False) as server:
        url = server.url
    root = CommandRegistry("lonely", router_channel="mesh")
    try:
        with pytest.raises(ChannelDisconnectedError, match="could not connect"):
            await root.register_channel(NatsChannel("mesh", url, open_timeout=0.5))
        # Calls fail fast: the router channel is missing.
        with pytest.raises(ChannelDisconnectedError):
            await root.execute_command("x.y", timeout=5)
    finally:
        await root.close()


@own_server
async def test_auth_options_reach_nats(namespace: str) -> None:
    with NatsServer(jetstream=False, args=["--auth", "s3cret"]) as server:
        root = CommandRegistry("secure", router_channel="mesh")
        try:
            with pytest.raises(ChannelDisconnectedError):
                await root.register_channel(
                    NatsChannel("mesh", server.url, namespace=namespace, open_timeout=1.0)
                )
            channel = NatsChannel("mesh", server.url, namespace=namespace, token="s3cret")
            await root.register_channel(channel)
            assert channel.connected
        finally:
            await root.close()


async def claim_of(channel: NatsChannel, command_id: str) -> Any:
    """The entry of ``command_id`` in the claims bucket of ``channel``'s namespace (``None``
    when there is none, or no bucket)."""
    js = channel.client.jetstream()  # type: ignore[union-attr]
    try:
        kv = await js.key_value(f"cmdipc-{channel.namespace}-claims")
        return await kv.get(encode_id(command_id))
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return None


@own_server
@pytest.mark.parametrize("keep_store", [True, False], ids=["with-store", "store-lost"])
async def test_server_restart(namespace: str, keep_store: bool) -> None:
    """Calls fail fast while the server is down, and work again once it is back (the
    subscriptions, the claims and the root's commands restored), also when the server
    lost its JetStream data (the claims bucket is made and claimed again)."""
    with NatsServer() as server:
        a = CommandRegistry("a", router_channel="mesh", request_ttl=10.0)
        b = CommandRegistry("b", router_channel="mesh", request_ttl=10.0)
        try:
            opts = {**FAST, "namespace": namespace}
            ca = NatsChannel("mesh", server.url, name="a", mode="exclusive", **opts)
            cb = NatsChannel("mesh", server.url, name="b", **opts)
            await a.register_channel(ca)
            await b.register_channel(cb)
            await a.register_command("calc.add", lambda x, y: x + y)
            await cb.wait_available("calc.add")
            assert await b.execute_command("calc.add", {"x": 1, "y": 2}) == 3
            before = await claim_of(ca, "calc.add")
            assert before is not None and json.loads(before.value)["name"] == "a"

            never = asyncio.Event()

            async def slow() -> None:
                await never.wait()

            await a.register_command("slow.op", slow)
            await cb.wait_available("slow.op")
            waiting = asyncio.ensure_future(b.execute_command("slow.op", timeout=30))
            await eventually(lambda: ca.stats()["pending_in"] == 1, 5)
            server.kill()
            if not keep_store:
                shutil.rmtree(server.store_dir)
            # The call waiting on the mesh fails with channel_disconnected at once...
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(waiting, 10)
            await eventually(lambda: not cb.connected, 5)
            # ... and new calls fail fast while the server is down.
            with pytest.raises(ChannelDisconnectedError):
                await b.execute_command("calc.add", {"x": 1, "y": 2}, timeout=30)

            server.start()
            await cb.wait_connected(15)
            await ca.wait_connected(15)
            assert await b.execute_command("calc.add", {"x": 2, "y": 2}, timeout=10) == 4
            await eventually(lambda: "calc.add" in {c["id"] for c in b.list_commands()}, 5)
            # The exclusive claim is in the bucket again: a's, claimed again after the
            # reconnection (a later revision; a new bucket counts from 1 again).
            after = await until(
                lambda: claim_of(ca, "calc.add"),
                lambda e: (
                    e is not None
                    and json.loads(e.value)["instance"] == ca.instance_id
                    and (e.revision > before.revision or not keep_store)
                ),
                10,
            )
            assert json.loads(after.value)["name"] == "a"
            # A re-registration by another machine fails.
            c = CommandRegistry("c", router_channel="mesh")
            try:
                await c.register_channel(
                    NatsChannel("mesh", server.url, name="c", mode="exclusive", **opts)
                )
                with pytest.raises(DuplicateCommandError):
                    await c.register_command("calc.add", lambda x, y: 0)
            finally:
                await c.close()
            assert ca.stats()["reconnects"] == 1
            never.set()
        finally:
            await b.close()
            await a.close()


@own_server
async def test_wait_connected_waits_out_a_lost_connection(namespace: str) -> None:
    """Attached while nats-py knows the connection is lost (the moment between the loss
    and its report): wait_connected waits until connected again, it does not give up."""
    with NatsServer(jetstream=False) as server:
        root = CommandRegistry("a", router_channel="mesh")
        channel = NatsChannel("mesh", server.url, namespace=namespace, name="a", **FAST)
        try:
            await root.register_channel(channel)
            # The report of the loss is held back, as if nats-py had not called back yet.
            channel._lost = lambda reason: None  # type: ignore[method-assign]
            server.kill()
            await eventually(lambda: not channel.client.is_connected, 5)  # type: ignore[union-attr]
            server.start()
            await channel.wait_connected(15)
            assert channel.connected
        finally:
            channel.__dict__.pop("_lost", None)
            await root.close()


async def test_a_reply_after_the_channels_request_ttl_reaches_a_caller_still_waiting(
    mesh: Any,
) -> None:
    """The caller's timeout, longer than the channel's request_ttl, decides."""
    a, _ = await mesh("a")
    b, cb = await mesh("b", request_ttl=0.2)
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "done"

    await a.register_command("slow.op", slow)
    await cb.wait_available("slow.op")
    call = asyncio.ensure_future(b.execute_command("slow.op", timeout=10))
    await eventually(lambda: cb.stats()["pending_out"] == 1, 5)
    # The channel forgot the call (request_ttl passed); its caller still waits.
    await eventually(lambda: cb.stats()["pending_out"] == 0, 5)
    release.set()
    assert await asyncio.wait_for(call, 10) == "done"


async def test_a_reply_made_across_a_reconnection_of_the_serving_machine(mesh: Any) -> None:
    """The serving machine's connection drops and comes back while a handler runs: its
    reply is still published, and the caller (whose connection stayed) gets it."""
    a, ca = await mesh("a")
    b, cb = await mesh("b")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "done"

    await a.register_command("slow.op", slow)
    await cb.wait_available("slow.op")
    call = asyncio.ensure_future(b.execute_command("slow.op", timeout=20))
    await asyncio.wait_for(started.wait(), 5)
    ca.client._transport._io_writer.transport.abort()  # type: ignore[union-attr]
    await eventually(lambda: ca.stats()["reconnects"] == 1, 10)
    await ca.wait_connected(15)
    release.set()
    assert await asyncio.wait_for(call, 20) == "done"


async def test_closing_refuses_what_the_drain_did_not_answer(mesh: Any) -> None:
    a, _ = await mesh("a", drain_timeout=0.2)
    b, cb = await mesh("b")
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    await a.register_command("stuck.op", stuck)
    await cb.wait_available("stuck.op")
    call = asyncio.ensure_future(b.execute_command("stuck.op", timeout=20))
    await asyncio.wait_for(started.wait(), 5)
    await a.close()
    with pytest.raises(ChannelDisconnectedError, match="closed before"):
        await asyncio.wait_for(call, 10)


async def test_requests_that_are_not_execute_requests_are_refused(mesh: Any, nats_url: str) -> None:
    a, ca = await mesh("a")
    await a.register_command("calc.add", lambda x, y: x + y)
    nc = await nats.connect(nats_url)
    try:
        subject = ca.command_subject("calc.add")
        for payload, thid in (
            (b"not json", "?"),
            (b'{"id":"r-1","type":"execute.command.request"}', "r-1"),  # no commandId
            (json.dumps({"id": "e-1", "type": "event", "eventId": "x"}).encode(), "e-1"),
        ):
            msg = await nc.request(subject, payload, timeout=5)
            reply = spec_support.validate_frame(msg.data, "json")
            assert reply["thid"] == thid, payload
            assert reply["response"]["error"]["code"] == "invalid_request", payload
    finally:
        await nc.close()


async def test_discovery_keeps_a_machine_that_answers_late(
    mesh: Any, nats_url: str, namespace: str
) -> None:
    """A loaded machine answers a scan later than the others, though within the window:
    it is not forgotten."""
    a, _ = await mesh("a")
    await a.register_command("quick.op", lambda: 1)
    nc = await nats.connect(nats_url)
    loop = asyncio.get_running_loop()
    scans = []
    info = {
        "type": "io.nats.micro.v1.info_response",
        "name": f"cmdipc-{namespace}",
        "id": "slowpoke-instance",
        "version": "0",
        "metadata": {"cmd_ipc.namespace": namespace, "cmd_ipc.name": "slowpoke"},
        "endpoints": [
            {
                "name": "slow_op",
                "subject": f"cmdipc.{namespace}.cmd.slow.op",
                "queue_group": "cmdipc",
                "metadata": {"cmd_ipc.command": json.dumps({"id": "slow.op"})},
            }
        ],
    }

    async def answer_late(msg: Any) -> None:
        scans.append(msg)
        # Answered a third of the window later: after the others, before the window ends.
        loop.call_later(
            FAST["discovery_window"] / 3,
            lambda: asyncio.ensure_future(nc.publish(msg.reply, json.dumps(info).encode())),
        )

    try:
        await nc.subscribe(f"$SRV.INFO.cmdipc-{namespace}", cb=answer_late)
        await nc.flush()
        _b, cb = await mesh("b")
        await cb.wait_available("quick.op", "slow.op")
        # b's first scan, and three more: a machine missed by two is forgotten.
        await eventually(lambda: sum(m.reply.startswith(cb._inbox) for m in scans) >= 4, 10)
        assert cb.mesh_commands()["slow.op"] == ["slowpoke"]
    finally:
        await nc.close()


async def test_two_exclusive_claimants_race_for_one_id(mesh: Any) -> None:
    """Neither has heard of the other serving it: JetStream's atomic create decides."""
    a, _ = await mesh("a", mode="exclusive")
    b, _ = await mesh("b", mode="exclusive")
    results = await asyncio.gather(
        a.register_command("race.job", lambda: "a"),
        b.register_command("race.job", lambda: "b"),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], DuplicateCommandError), results


@own_server
async def test_an_info_document_over_max_payload_is_warned_of(
    namespace: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 2048\n")
    with NatsServer(jetstream=False, args=["-c", str(config)]) as server:
        root = CommandRegistry("a", router_channel="mesh")
        try:
            channel = NatsChannel("mesh", server.url, namespace=namespace, name="a", **FAST)
            await root.register_channel(channel)
            with caplog.at_level(logging.WARNING, "cmd_ipc.nats"):
                for n in range(40):
                    await root.register_command(f"command.number.{n:03}", lambda: None)
                await eventually(lambda: "cannot discover" in caplog.text, 5)
        finally:
            await root.close()


async def test_a_held_request_is_counted_once(mesh: Any, nats_url: str, namespace: str) -> None:
    a, ca = await mesh("a")
    await a.register_command("calc.add", lambda x, y: x + y)
    nc = await nats.connect(nats_url)
    try:
        # Between a reconnection and the re-attachment: the request is held, then served.
        ca._attached = False
        request = {"id": "h-1", "type": "execute.command.request", "commandId": "calc.add"}
        request["request"] = {"x": 1, "y": 2}  # type: ignore[assignment]
        reply = asyncio.ensure_future(
            nc.request(ca.command_subject("calc.add"), json.dumps(request).encode(), timeout=5)
        )
        await eventually(lambda: ca.stats()["held"] == 1, 5)
        await ca.start(ca._on_frame, ca._on_close)  # type: ignore[arg-type]
        assert json.loads((await reply).data)["response"] == {"ok": True, "result": 3}
        msg = await nc.request(f"$SRV.STATS.cmdipc-{namespace}", timeout=5)
        assert json.loads(msg.data)["endpoints"][0]["num_requests"] == 1
    finally:
        await nc.close()


# ---------------------------------------------------------------------- machines


async def test_three_machines_call_each_other(machines: Any, mesh: Any) -> None:
    """The seed topology spread over three machines (root processes with their workers):
    calc on m1, image and its sub-worker transform on m2, data on m3."""
    machines(
        ("m1", [("worker-1", "worker_targets:calc")]),
        ("m2", [("worker-2", "worker_targets:image")]),
        ("m3", [("worker-3", "worker_targets:data")]),
    )
    client, channel = await mesh("client")
    await channel.wait_available("calc.add", "image.resize", "transform.upper", "data.query")
    assert await client.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    assert await client.execute_command("transform.upper", {"text": "x"}) == "X"
    # A worker of each machine calls workers of the others (worker -> root -> NATS -> root
    # -> worker), sub-workers included.
    calls = [
        ("calc.call", "image.resize", {"w": 8, "h": 4}, {"w": 4, "h": 2}),
        ("image.call", "data.query", {"q": "q"}, {"q": "q", "rows": ["Q"], "by": "worker-3"}),
        ("data.call", "transform.upper", {"text": "up"}, "UP"),
        ("transform.call", "calc.add", {"a": 2, "b": 3}, 5),
        ("data.call", "nobody.home", {}, None),
    ]
    for via, target, request, expected in calls:
        got = await client.execute_command(via, {"command_id": target, "request": request})
        if expected is None:
            assert got["code"] == "not_found"
        else:
            assert got == expected, (via, target, got)
    ids = {(await client.execute_command(f"{ns}.whoami"))["id"] for ns in ("calc", "image", "data")}
    assert ids == {"worker-1", "worker-2", "worker-3"}
    # Events: emitted by one worker, received once by every process of every machine.
    await client.execute_command("calc.emit", {"event_id": "topo.ping", "payload": {"n": 1}})
    await client.execute_command("calc.emit", {"event_id": "topo.ping", "payload": "marker"})

    for ns in ("calc", "image", "transform", "data"):

        async def seen(ns: str = ns) -> list[Any]:
            return list(await client.execute_command(f"{ns}.seen"))

        got = await until(seen, lambda got: "marker" in got, 10)
        assert got == [{"n": 1}, "marker"], ns


async def test_load_balanced_and_surviving_a_killed_machine(machines: Any, mesh: Any) -> None:
    _m_a, m_b = machines(
        ("ma", [("pool-a", "worker_targets:pooled")]),
        ("mb", [("pool-b", "worker_targets:pooled")]),
    )
    client, channel = await mesh("client")
    await eventually(lambda: channel.mesh_commands().get("pool.add") == ["ma", "mb"], 10)
    served = [(await client.execute_command("pool.add", {"a": i, "b": 1}))[1] for i in range(40)]
    assert set(served) == {"pool-a", "pool-b"}
    m_b.kill()
    # Discovery forgets mb after two scans it did not answer; the server dropped the dead
    # connection's subscriptions long before: every call goes to ma now.
    await eventually(lambda: channel.mesh_commands().get("pool.add") == ["ma"], 10)
    served = [(await client.execute_command("pool.add", {"a": i, "b": 1}))[1] for i in range(20)]
    assert served == ["pool-a"] * 20
    stats = await client.execute_command("ma.mesh_stats")
    assert stats["calls_in"] >= 20
