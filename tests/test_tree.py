"""Several registries together: escalation, timeouts, closes, spoofing, loops, limits, mesh."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
    DuplicateCommandError,
    InvalidRequestError,
    NotFoundError,
)
from helpers import FakeChannel, eventually, link, new_id, registries, settle

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]


def ids(reg: CommandRegistry) -> list[str]:
    return [c["id"] for c in reg.list_commands()]


def stuck_handler() -> tuple[Callable[..., Any], asyncio.Event, asyncio.Event]:
    """An async handler that never answers until ``release`` is set; ``started`` counts runs."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def stuck(**_: Any) -> str:
        started.set()
        await release.wait()
        return "late"

    return stuck, started, release


async def three_levels(make: Make, **mid_kw: Any) -> tuple[Any, ...]:
    """root <- mid <- leaf. Returns (root, mid, leaf, root_to_mid, mid_to_root, mid_to_leaf,
    leaf_to_mid)."""
    root = make("root")
    mid = make("mid", router_channel="root", **mid_kw)
    leaf = make("leaf", router_channel="mid")
    root_to_mid, mid_to_root = await link(root, mid)
    mid_to_leaf, leaf_to_mid = await link(mid, leaf)
    return root, mid, leaf, root_to_mid, mid_to_root, mid_to_leaf, leaf_to_mid


def execute_request(command_id: str, request: Any = None, id: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"id": id or new_id(), "type": "execute.command.request"}
    m["commandId"] = command_id
    if request is not None:
        m["request"] = request
    return m


def execute_response(thid: str, result: Any) -> dict[str, Any]:
    return {
        "id": new_id(),
        "type": "execute.command.response",
        "thid": thid,
        "response": {"ok": True, "result": result},
    }


def event(event_id: str, payload: Any = None, id: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"id": id or new_id(), "type": "event", "eventId": event_id}
    if payload is not None:
        m["payload"] = payload
    return m


def responses(ch: FakeChannel) -> list[dict[str, Any]]:
    return ch.of_type("execute.command.response")


# --- 1. three-level escalation


async def test_children_registered_before_the_router_attached_are_escalated(
    registries: Make,
) -> None:
    """mid's router channel attaches after a leaf registered with mid: the leaf's command
    reaches the root then, and a request for an unknown command meanwhile is
    ``channel_disconnected`` (the command may exist above), not ``not_found``."""
    root = registries("root")
    mid = registries("mid", router_channel="root")
    leaf = registries("leaf", router_channel="mid")
    await link(mid, leaf)
    await leaf.register_command("leaf.early", lambda: "early")
    with pytest.raises(ChannelDisconnectedError):
        await leaf.execute_command("root.only", timeout=5)
    await root.register_command("root.only", lambda: "root")
    await link(root, mid)
    await eventually(lambda: "leaf.early" in ids(root), 5)
    assert root.route_of("leaf.early") == "mid"
    assert await root.execute_command("leaf.early") == "early"
    assert await leaf.execute_command("root.only") == "root"


async def test_three_level_escalation_and_routing(registries: Make) -> None:
    root, mid, leaf, *_ = await three_levels(registries)

    def echo(x: int) -> dict[str, Any]:
        return {"x": x, "by": "leaf"}

    await leaf.register_command("leaf.echo", echo, description="echo from leaf")
    # register_command returned: the root acknowledged, so every level knows the route.
    assert "leaf.echo" in ids(root) and "leaf.echo" in ids(mid)
    assert root.route_of("leaf.echo") == "mid"
    assert mid.route_of("leaf.echo") == "leaf"
    assert {"id": "leaf.echo", "description": "echo from leaf"} in root.list_commands()

    await root.register_command("root.time", lambda: "root-time")
    await mid.register_command("mid.cmd", lambda: "mid")
    assert "mid.cmd" in ids(root)

    assert mid.stats()["forwarded"] == 0
    assert await root.execute_command("leaf.echo", {"x": 1}) == {"x": 1, "by": "leaf"}
    assert mid.stats()["forwarded"] == 1
    # Escalation: the leaf does not know root.time; mid does not either, so it goes up.
    assert await leaf.execute_command("root.time") == "root-time"
    assert mid.stats()["forwarded"] == 2
    # mid runs its own command: nothing forwarded.
    assert await leaf.execute_command("mid.cmd") == "mid"
    assert await root.execute_command("mid.cmd") == "mid"
    assert mid.stats()["forwarded"] == 2
    # Responses of concurrent calls go back to the right caller.
    results = await asyncio.wait_for(
        asyncio.gather(*(root.execute_command("leaf.echo", {"x": i}) for i in range(20))), 5
    )
    assert results == [{"x": i, "by": "leaf"} for i in range(20)]
    assert mid.stats()["forwarded"] == 22
    s = mid.stats()
    assert s["pending"] == 0 and s["pending_forwards"] == 0 and s["dropped"] == 0
    # A command nobody has: the leaf's call climbs to the root, which answers not_found.
    with pytest.raises(NotFoundError) as info:
        await leaf.execute_command("nobody.has.it")
    assert "root" in info.value.message


async def test_events_travel_the_tree_both_ways(registries: Make) -> None:
    root, mid, leaf, *_ = await three_levels(registries)
    got: dict[str, list[Any]] = {"root": [], "mid": [], "leaf": []}
    for reg in (root, mid, leaf):
        reg.add_event_listener("ping", got[reg.id].append)
    leaf.emit_event("ping", "from leaf")
    root.emit_event("ping", "from root")
    await eventually(lambda: all(len(v) == 2 for v in got.values()))
    await settle()
    for v in got.values():
        assert sorted(v) == ["from leaf", "from root"]


# --- 2. timeouts while idle


async def test_call_timeout_argument_fires_while_idle(registries: Make) -> None:
    root = registries("main")
    worker = registries("w", router_channel="main")
    await link(root, worker)
    stuck, started, release = stuck_handler()
    await worker.register_command("never", stuck)

    with pytest.raises(CommandTimeoutError) as info:
        await asyncio.wait_for(root.execute_command("never", timeout=0.3), 5)
    assert isinstance(info.value, TimeoutError)
    assert started.is_set()
    assert root.stats()["pending"] == 0

    # The answer that finally comes is dropped (already answered), and counted.
    dropped = root.stats()["dropped"]
    release.set()
    await eventually(lambda: root.stats()["dropped"] == dropped + 1)


async def test_request_ttl_fires_while_idle(registries: Make) -> None:
    root = registries("main", request_ttl=0.3)
    worker = registries("w", router_channel="main")
    await link(root, worker)
    stuck, started, _ = stuck_handler()
    await worker.register_command("never", stuck)
    with pytest.raises(CommandTimeoutError):
        await asyncio.wait_for(root.execute_command("never"), 5)
    assert started.is_set()


async def test_forwarded_request_times_out_in_the_middle(registries: Make) -> None:
    # root waits 30 s, mid only 0.3 s: mid answers the root with `timeout`.
    root, mid, leaf, *_ = await three_levels(registries, request_ttl=0.3)
    stuck, _started, _ = stuck_handler()
    await leaf.register_command("never", stuck)
    with pytest.raises(CommandTimeoutError) as info:
        await asyncio.wait_for(root.execute_command("never"), 5)
    assert "mid" in info.value.message
    assert mid.stats()["pending_forwards"] == 0


async def test_registration_times_out_when_router_never_acks(registries: Make) -> None:
    worker = registries("w", router_channel="main", request_ttl=0.3)
    silent = FakeChannel("main")
    await worker.register_channel(silent)
    with pytest.raises(CommandTimeoutError):
        await asyncio.wait_for(worker.register_command("cmd", lambda: 1), 5)
    assert len(silent.of_type("register.command.request")) == 1
    # The handler was not installed.
    assert "cmd" not in ids(worker)


# --- 3. close with calls in flight


@pytest.mark.parametrize("side", ["caller", "peer"])
async def test_close_fails_every_call_in_flight(
    registries: Make, caplog: pytest.LogCaptureFixture, side: str
) -> None:
    root = registries("main")
    worker = registries("w", router_channel="main")
    to_worker, to_main = await link(root, worker)
    stuck, _, _ = stuck_handler()
    await worker.register_command("slow", stuck)

    calls = [asyncio.ensure_future(root.execute_command("slow", {"i": i})) for i in range(50)]
    await eventually(lambda: root.stats()["pending"] == 50)
    await (to_worker if side == "caller" else to_main).close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert len(results) == 50
    for r in results:
        assert isinstance(r, ChannelDisconnectedError), r
        assert isinstance(r, ConnectionError)
        assert "'w'" in r.message
    assert root.stats()["pending"] == 0
    assert root.channels == {}
    # Nothing was left for asyncio to complain about ("exception was never retrieved" is
    # reported when an unawaited failed future is collected).
    del calls, results
    gc.collect()
    await settle()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    # The command went away with its channel.
    assert "slow" not in ids(root)
    with pytest.raises(NotFoundError):
        await root.execute_command("slow")


async def test_registry_close_fails_calls_in_flight(registries: Make) -> None:
    root = registries("main")
    worker = registries("w", router_channel="main")
    await link(root, worker)
    stuck, _, _ = stuck_handler()
    await worker.register_command("slow", stuck)
    calls = [asyncio.ensure_future(root.execute_command("slow")) for _ in range(5)]
    await eventually(lambda: root.stats()["pending"] == 5)
    await root.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(r, ChannelDisconnectedError) for r in results), results
    # The worker noticed its router went away.
    await eventually(lambda: worker.channels == {})


# --- 4. close with forwards in flight


async def test_close_below_a_forward_fails_the_origin(registries: Make) -> None:
    root, mid, leaf, _, _, mid_to_leaf, _ = await three_levels(registries)
    stuck, started, _ = stuck_handler()
    await leaf.register_command("slow", stuck)
    call = asyncio.ensure_future(root.execute_command("slow"))
    await asyncio.wait_for(started.wait(), 5)
    assert mid.stats()["pending_forwards"] == 1

    await mid_to_leaf.close()
    with pytest.raises(ChannelDisconnectedError) as info:
        await asyncio.wait_for(call, 5)
    assert "leaf" in info.value.message
    assert mid.stats()["pending_forwards"] == 0
    await eventually(lambda: leaf.channels == {})

    # mid dropped the leaf's command with the channel. The spec has no unregister message, so
    # the root still lists it as registered through mid; a call now reaches mid, which has no
    # route and (loop guard) never sends it back to the root: not_found, promptly.
    assert "slow" not in ids(mid)
    assert "slow" in ids(root)
    assert root.route_of("slow") == "mid"
    with pytest.raises(NotFoundError):
        await asyncio.wait_for(root.execute_command("slow"), 5)


# --- 5. spoofed and duplicate responses


async def test_spoofed_and_duplicate_responses_to_a_call_are_dropped(registries: Make) -> None:
    main = registries("main")
    a, b = FakeChannel("a"), FakeChannel("b")
    await main.register_channel(a)
    await main.register_channel(b)
    list_req = a.of_type("list.commands.request")[0]
    a.inject(
        {
            "id": new_id(),
            "type": "list.commands.response",
            "thid": list_req["id"],
            "commands": [{"id": "remote.cmd"}],
        }
    )
    assert main.route_of("remote.cmd") == "a"

    call = asyncio.ensure_future(main.execute_command("remote.cmd", {"x": 1}))
    await eventually(lambda: a.of_type("execute.command.request"))
    req = a.of_type("execute.command.request")[0]
    assert req["commandId"] == "remote.cmd" and req["request"] == {"x": 1}
    assert b.of_type("execute.command.request") == []

    dropped = main.stats()["dropped"]
    b.inject(execute_response(req["id"], 666))  # wrong channel
    assert main.stats()["dropped"] == dropped + 1
    await settle()
    assert not call.done()

    a.inject(execute_response(req["id"], 42))
    assert await asyncio.wait_for(call, 2) == 42
    assert main.stats()["dropped"] == dropped + 1

    a.inject(execute_response(req["id"], 43))  # second answer
    assert main.stats()["dropped"] == dropped + 2
    a.inject(execute_response(new_id(), 44))  # never asked
    assert main.stats()["dropped"] == dropped + 3
    assert main.stats()["pending"] == 0


async def test_spoofed_and_duplicate_responses_to_a_forward_are_dropped(registries: Make) -> None:
    main = registries("main")
    a, b = FakeChannel("a"), FakeChannel("b")
    await main.register_channel(a)
    await main.register_channel(b)
    a.inject(
        {
            "id": new_id(),
            "type": "list.commands.response",
            "thid": new_id(),
            "commands": [{"id": "remote.cmd"}],
        }
    )
    b.take()
    origin_id = new_id()
    b.inject(execute_request("remote.cmd", {"x": 2}, id=origin_id))
    forwarded = a.of_type("execute.command.request")
    assert len(forwarded) == 1
    out_id = forwarded[0]["id"]
    assert out_id != origin_id  # a forwarded request gets a fresh id
    assert main.stats()["forwarded"] == 1 and main.stats()["pending_forwards"] == 1

    dropped = main.stats()["dropped"]
    b.inject(execute_response(out_id, "spoofed by the origin"))
    assert main.stats()["dropped"] == dropped + 1
    assert responses(b) == []

    a.inject(execute_response(out_id, "real"))
    a.inject(execute_response(out_id, "again"))
    assert main.stats()["dropped"] == dropped + 2
    got = responses(b)
    assert len(got) == 1
    assert got[0]["thid"] == origin_id
    assert got[0]["response"] == {"ok": True, "result": "real"}
    assert main.stats()["pending_forwards"] == 0


# --- 6. loop guard


async def test_loop_guard_never_sends_a_request_back_to_the_router(registries: Make) -> None:
    worker = registries("w", router_channel="main")
    main, peer = FakeChannel("main"), FakeChannel("peer")
    await worker.register_channel(main)
    await worker.register_channel(peer)
    # The router advertises a command: the worker would route it to the router...
    main.inject(
        {
            "id": new_id(),
            "type": "list.commands.response",
            "thid": new_id(),
            "commands": [{"id": "router.cmd"}],
        }
    )
    assert worker.route_of("router.cmd") == "main"
    main.take()
    peer.take()

    for command_id in ("unknown.cmd", "router.cmd"):
        req_id = new_id()
        main.inject(execute_request(command_id, {"k": 1}, id=req_id))
        sent = main.take()
        # ...but not when the request came from the router itself.
        assert [m["type"] for m in sent] == ["execute.command.response"], sent
        assert sent[0]["thid"] == req_id
        assert sent[0]["response"]["ok"] is False
        assert sent[0]["response"]["error"]["code"] == "not_found"
        assert peer.take() == []
    assert worker.stats()["forwarded"] == 0
    assert worker.stats()["pending_forwards"] == 0


# --- 7. dedup table bounded


async def test_dedup_table_is_bounded(registries: Make) -> None:
    reg = registries("main", max_dedup=1000)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    delivered = 0

    def count(_: Any) -> None:
        nonlocal delivered
        delivered += 1

    reg.add_event_listener("tick", count)
    on_frame = peer.inject_raw
    dumps = json.dumps
    n = 100_000
    for i in range(n):
        on_frame(dumps({"id": f"evt-{i}", "type": "event", "eventId": "tick"}).encode())
    s = reg.stats()
    assert 0 < s["dedup_entries"] <= 1000
    assert delivered == n
    assert s["dropped"] == 0
    # The most recent ids are still remembered: a repeat is dropped, not delivered.
    on_frame(dumps({"id": f"evt-{n - 1}", "type": "event", "eventId": "tick"}).encode())
    assert delivered == n
    assert reg.stats()["dropped"] == 1
    assert reg.stats()["dedup_entries"] <= 1000


# --- 8. size and depth limits


def nested(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        d = {"n": d}
    return d


async def test_oversized_and_too_deep_messages(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    reg = registries("main", max_message_size=10_000, max_depth=16)
    runs: list[Any] = []

    def echo(request, /):  # type: ignore[no-untyped-def]
        runs.append(request)
        return "ok"

    await reg.register_command("echo", echo)
    events: list[Any] = []
    reg.add_event_listener("big", events.append)

    # Local calls are checked before the handler runs.
    with pytest.raises(InvalidRequestError):
        await reg.execute_command("echo", {"s": "x" * 20_000})
    with pytest.raises(InvalidRequestError):
        await reg.execute_command("echo", nested(40))
    assert runs == []
    assert await reg.execute_command("echo", nested(5)) == "ok"
    assert await reg.execute_command("echo", {"s": "x" * 1000}) == "ok"
    runs.clear()

    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()
    with caplog.at_level(logging.CRITICAL, logger="cmd_ipc"):
        # An oversized frame is dropped unread (not even its id is parsed: no answer).
        d0 = reg.stats()["dropped"]
        peer.inject(event("big", {"s": "x" * 20_000}))
        assert reg.stats()["dropped"] == d0 + 1
        big_req = execute_request("echo", {"s": "x" * 20_000})
        peer.inject(big_req)
        assert reg.stats()["dropped"] == d0 + 2
        assert responses(peer) == []

        # A too-deep execute request that is still valid JSON is answered invalid_request.
        deep_id = new_id()
        peer.inject(execute_request("echo", nested(20), id=deep_id))
        assert reg.stats()["dropped"] == d0 + 3
        got = peer.take()
        assert len(got) == 1 and got[0]["thid"] == deep_id
        assert got[0]["response"]["error"]["code"] == "invalid_request"

        # A hostile depth (4000 levels, still under the size limit) is refused the same way
        # by a linear scan; the process survives.
        hostile_id = new_id()
        hostile = (
            '{"id":"'
            + hostile_id
            + '","type":"execute.command.request","commandId":"echo",'
            + '"request":{"a":'
            + "[" * 4000
            + "]" * 4000
            + "}}"
        ).encode()
        assert len(hostile) < 10_000
        peer.inject_raw(hostile)
        assert reg.stats()["dropped"] == d0 + 4
        got = peer.take()
        assert len(got) == 1 and got[0]["thid"] == hostile_id
        assert got[0]["response"]["error"]["code"] == "invalid_request"
        # Garbage: dropped, nothing to answer.
        peer.inject_raw(b"\x00not json at all")
        assert reg.stats()["dropped"] == d0 + 5
        assert peer.take() == []
    assert runs == [] and events == []

    # Still serving: a normal call from the peer and a local one.
    ok_id = new_id()
    peer.take()
    peer.inject(execute_request("echo", {"s": "fine"}, id=ok_id))
    await eventually(lambda: responses(peer))
    assert responses(peer)[0]["thid"] == ok_id
    assert responses(peer)[0]["response"] == {"ok": True, "result": "ok"}
    assert await reg.execute_command("echo", {"a": 1}) == "ok"
    assert runs == [{"s": "fine"}, {"a": 1}]


# --- 9. events in a mesh with a cycle


async def test_events_in_a_cycle_are_delivered_once_per_registry(registries: Make) -> None:
    a, b, c = registries("A"), registries("B"), registries("C")
    await link(a, b)
    await link(b, c)
    await link(c, a, encoding="json")  # one JSON edge: transcoding on the way
    got: dict[str, list[Any]] = {"A": [], "B": [], "C": []}
    private: dict[str, list[Any]] = {"A": [], "B": [], "C": []}
    for reg in (a, b, c):
        reg.add_event_listener("tick", got[reg.id].append)
        reg.add_event_listener("_x", private[reg.id].append)

    for reg in (a, b, c):
        reg.emit_event("tick", {"from": reg.id})
    await eventually(lambda: all(len(v) == 3 for v in got.values()))
    # Every registry receives each event from both neighbours: one copy delivered, one dropped.
    await eventually(lambda: sum(r.stats()["dropped"] for r in (a, b, c)) == 6)
    await settle()
    for v in got.values():
        assert sorted(p["from"] for p in v) == ["A", "B", "C"]

    sent_before = {ch: s["sent"] for ch, s in a.stats()["channels"].items()}
    a.emit_event("_x", 1)
    assert private["A"] == [1]
    assert {ch: s["sent"] for ch, s in a.stats()["channels"].items()} == sent_before
    await settle()
    assert private["B"] == [] and private["C"] == []


async def test_private_event_from_a_peer_is_delivered_but_not_flooded(registries: Make) -> None:
    # A peer that breaks the rule and sends a private event: it stays in this registry.
    reg = registries("main")
    p1, p2 = FakeChannel("p1"), FakeChannel("p2")
    await reg.register_channel(p1)
    await reg.register_channel(p2)
    p2.take()
    got: list[Any] = []
    reg.add_event_listener("_x", got.append)
    reg.add_event_listener("pub", got.append)
    p1.inject(event("_x", 1))
    p1.inject(event("pub", 2))
    assert got == [1, 2]
    assert [(m["type"], m["eventId"]) for m in p2.take()] == [("event", "pub")]
    assert p1.of_type("event") == []  # never back to where it came from


# --- 10. private commands


async def test_private_commands_stay_in_their_registry(registries: Make) -> None:
    root = registries("main")
    worker = registries("w", router_channel="main")
    await link(root, worker)
    await worker.register_command("_secret", lambda: "s3cr3t")

    @worker.command("_also_secret")
    def also() -> str:
        return "also"

    await worker.register_command("public", lambda: "pub")
    assert "_secret" not in ids(root) and "_also_secret" not in ids(root)
    assert "public" in ids(root)
    assert "_secret" in ids(worker)  # callable here, so listed here
    with pytest.raises(NotFoundError):
        await root.execute_command("_secret")
    assert await worker.execute_command("_secret") == "s3cr3t"
    assert await worker.execute_command("_also_secret") == "also"


async def test_private_commands_on_the_wire(registries: Make) -> None:
    worker = registries("w", router_channel="main")
    router = FakeChannel("main")
    await worker.register_channel(router)
    await worker.register_command("_secret", lambda: "s3cr3t")
    reg = asyncio.ensure_future(worker.register_command("public", lambda: "pub"))
    await eventually(lambda: router.of_type("register.command.request"))
    regs = router.of_type("register.command.request")
    assert [m["command"]["id"] for m in regs] == ["public"]  # _secret never escalated
    router.inject(
        {
            "id": new_id(),
            "type": "register.command.response",
            "thid": regs[0]["id"],
            "response": {"ok": True},
        }
    )
    await asyncio.wait_for(reg, 2)
    router.take()

    list_id = new_id()
    router.inject({"id": list_id, "type": "list.commands.request"})
    (listed,) = router.of_type("list.commands.response")
    assert listed["thid"] == list_id
    assert [c["id"] for c in listed["commands"]] == ["public"]

    router.take()
    secret_call = new_id()
    router.inject(execute_request("_secret", id=secret_call))
    (resp,) = responses(router)
    assert resp["thid"] == secret_call
    assert resp["response"]["error"]["code"] == "not_found"


# --- 11. duplicate_command


async def test_duplicate_command_across_workers(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    root = registries("main")
    w1 = registries("w1", router_channel="main")
    w2 = registries("w2", router_channel="main")
    root_to_w1, _ = await link(root, w1)
    await link(root, w2)

    await w1.register_command("job.run", lambda: "w1")
    with pytest.raises(DuplicateCommandError) as info:
        await w2.register_command("job.run", lambda: "w2")
    # The wire's register error carries only the code, so w2 can only name the channel its
    # rejection came through (its router); the root itself names the owning channel.
    assert "job.run" in info.value.message and "'main'" in info.value.message
    with pytest.raises(DuplicateCommandError) as info2:
        await root.register_command("job.run", lambda: "root")
    assert "'w1'" in info2.value.message

    # Nothing was hijacked: everyone still reaches w1.
    assert await root.execute_command("job.run") == "w1"
    assert await w2.execute_command("job.run") == "w1"
    assert w2.route_of("job.run") == "main"

    # The decorator form with the router attached: the rejection arrives later and is logged.
    with caplog.at_level(logging.ERROR, logger="cmd_ipc"):
        w2.command("job.run")(lambda: "w2 again")
        await eventually(
            lambda: any(
                "job.run" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
            )
        )
    assert await w2.execute_command("job.run") == "w1"

    # Same channel re-registers (after unregistering): accepted, and the new handler runs.
    assert w1.unregister_command("job.run")
    await w1.register_command("job.run", lambda: "w1 v2")
    assert await root.execute_command("job.run") == "w1 v2"

    # A restarted worker: new registry, same channel name, after the old channel closed.
    await root_to_w1.close()
    await w1.close()
    w1b = registries("w1", router_channel="main")
    await link(root, w1b)
    await w1b.register_command("job.run", lambda: "w1b")
    assert await root.execute_command("job.run") == "w1b"


async def test_duplicate_command_deeper_in_the_tree(registries: Make) -> None:
    root, mid, leaf, *_ = await three_levels(registries)
    leaf2 = registries("leaf2", router_channel="mid")
    sibling = registries("sibling", router_channel="root")
    await link(mid, leaf2)
    await link(root, sibling)
    await leaf.register_command("deep.cmd", lambda: "leaf")
    with pytest.raises(DuplicateCommandError):
        await sibling.register_command("deep.cmd", lambda: "sibling")
    with pytest.raises(DuplicateCommandError) as info:
        await leaf2.register_command("deep.cmd", lambda: "leaf2")
    assert "'mid'" in info.value.message
    with pytest.raises(DuplicateCommandError):
        await mid.register_command("deep.cmd", lambda: "mid")
    assert await root.execute_command("deep.cmd") == "leaf"
    assert await sibling.execute_command("deep.cmd") == "leaf"
    assert await leaf2.execute_command("deep.cmd") == "leaf"


async def test_same_channel_may_register_again_on_the_wire(registries: Make) -> None:
    root = registries("main")
    w1, w2 = FakeChannel("w1"), FakeChannel("w2")
    await root.register_channel(w1)
    await root.register_channel(w2)

    def register(ch: FakeChannel, command_id: str) -> dict[str, Any]:
        rid = new_id()
        ch.take()
        ch.inject({"id": rid, "type": "register.command.request", "command": {"id": command_id}})
        (resp,) = ch.of_type("register.command.response")
        assert resp["thid"] == rid
        return resp["response"]  # type: ignore[no-any-return]

    assert register(w1, "math.add") == {"ok": True}
    assert register(w1, "math.add") == {"ok": True}  # a restarted worker, same channel
    assert register(w2, "math.add") == {"ok": False, "error": "duplicate_command"}
    assert root.route_of("math.add") == "w1"
