"""Resource bounds against hostile or broken peers, as far as Python can reach them.

Each test feeds a registry (or the codec) what a hostile peer could send and checks that the
answer is a refusal with a stable code, that the registry's tables stay within their caps, and
that the registry keeps serving afterwards. docs/limits.md lists the limits these tests check.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import spec_support
from cmd_ipc import (
    CommandRegistry,
    CommandTimeoutError,
    InternalError,
    ProtocolError,
    _core,
)
from helpers import FakeChannel, eventually, new_id, registries

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]

DEEP = 100_000


@pytest.fixture(autouse=True)
def quiet_drops(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every dropped frame is logged at WARNING; thousands of them only slow the tests."""
    with caplog.at_level(logging.CRITICAL, logger="cmd_ipc"):
        yield


class MsgpackFakeChannel(FakeChannel):
    """:class:`FakeChannel` speaking our msgpack layout; :attr:`sent` holds decoded messages."""

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.encoding = "msgpack"

    def send(self, frame: bytes) -> None:
        if not self._closed:
            self.sent.append(spec_support.validate_frame(frame, "msgpack"))

    def inject(self, message: dict[str, Any]) -> None:
        self.inject_raw(_core.transcode(json.dumps(message).encode(), "json", "msgpack"))


def mp_message(fields: dict[str, Any], **values: bytes) -> bytes:
    """One of our msgpack frames: ``values`` (already msgpack-encoded) are wrapped as ``bin``."""
    return bytes(msgpack.packb({**fields, **values}, use_bin_type=True))


def mp_raw_field(fields: dict[str, Any], key: str, raw: bytes) -> bytes:
    """A msgpack map of ``fields`` plus ``key`` whose value is ``raw`` msgpack, not a ``bin``."""
    head = bytes(msgpack.packb(fields))
    assert 0x80 <= head[0] < 0x8F
    return bytes([head[0] + 1]) + head[1:] + bytes(msgpack.packb(key)) + raw


def deep_json(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "null" + "}" * depth


def deep_msgpack(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"\x91" * depth + b"\xc0"  # fixarray of 1, ... , nil
    return b"\x81\xa1a" * depth + b"\xc0"  # fixmap {"a": ...}, ... , nil


def json_event(payload_text: str, id: str = "m") -> bytes:
    return (
        '{"id":"' + id + '","type":"event","eventId":"e","payload":' + payload_text + "}"
    ).encode()


def json_execute(request_text: str, id: str) -> bytes:
    head = '{"id":"' + id + '","type":"execute.command.request","commandId":"echo"'
    return (head + ',"request":{"r":' + request_text + "}}").encode()


# ------------------------------------------------------------------------- defaults


def test_documented_defaults() -> None:
    params = inspect.signature(CommandRegistry).parameters
    assert params["max_message_size"].default == 64 * 1024 * 1024
    assert params["max_depth"].default == 64
    assert params["max_pending"].default == 100_000
    assert params["max_dedup"].default == 100_000
    assert params["request_ttl"].default == 30.0
    assert params["event_ttl"].default == 5.0
    tparams = inspect.signature(_core.transcode).parameters
    assert tparams["max_message_size"].default == 64 * 1024 * 1024
    assert tparams["max_depth"].default == 64


# ------------------------------------------------------------------------- size


@pytest.mark.parametrize("source", ["json", "msgpack"])
def test_message_size_limit_is_checked_first(source: str) -> None:
    ok = json_event(json.dumps("x" * 1000))
    if source == "msgpack":
        ok = _core.transcode(ok, "json", "msgpack")
    _core.transcode(ok, source, "json", max_message_size=len(ok))
    with pytest.raises(ProtocolError) as info:
        _core.transcode(ok, source, "json", max_message_size=len(ok) - 1)
    assert info.value.args[0] == "message_too_large"
    # Refused by size before being parsed: garbage of the same size gets the same answer.
    with pytest.raises(ProtocolError) as info:
        _core.transcode(b"\xc1" * len(ok), source, "json", max_message_size=len(ok) - 1)
    assert info.value.args[0] == "message_too_large"


# ------------------------------------------------------------------------- depth


@pytest.mark.parametrize("target", ["json", "msgpack"])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_100k_deep_json_is_refused(kind: str, target: str) -> None:
    for data in (
        json_event(deep_json(DEEP, kind)),
        json_execute(deep_json(DEEP, kind), "m"),
    ):
        with pytest.raises(ProtocolError) as info:
            _core.transcode(data, "json", target)
        assert info.value.args[0] == "message_too_deep", info.value.args


@pytest.mark.parametrize("target", ["json", "msgpack"])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_100k_deep_msgpack_is_refused(kind: str, target: str) -> None:
    fields = {"id": "m", "type": "event", "eventId": "e"}
    for frame in (
        # Inside an application value (a `bin` holding its own msgpack) ...
        mp_message(fields, payload=deep_msgpack(DEEP, kind)),
        # ... and in the envelope itself, where a `bin` was expected.
        mp_raw_field(fields, "payload", deep_msgpack(DEEP, kind)),
    ):
        with pytest.raises(ProtocolError) as info:
            _core.transcode(frame, "msgpack", target)
        assert info.value.args[0] == "message_too_deep", info.value.args


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_depth_limit_boundary(encoding: str) -> None:
    # The message object is level 1: a payload may nest max_depth - 1 levels.
    for depth, ok in ((63, True), (64, False)):
        data = json_event(deep_json(depth, "array"))
        if encoding == "msgpack":
            data = mp_message(
                {"id": "m", "type": "event", "eventId": "e"},
                payload=deep_msgpack(depth, "array"),
            )
        if ok:
            _core.transcode(data, encoding, encoding)
        else:
            with pytest.raises(ProtocolError) as info:
                _core.transcode(data, encoding, encoding)
            assert info.value.args[0] == "message_too_deep"


async def echo_registry(make: Make) -> tuple[CommandRegistry, list[Any]]:
    reg = make("main")
    runs: list[Any] = []

    def echo(request, /):  # type: ignore[no-untyped-def]
        runs.append(request)
        return "ok"

    await reg.register_command("echo", echo)
    return reg, runs


async def still_serves(reg: CommandRegistry, peer: FakeChannel) -> None:
    ok_id = new_id()
    peer.take()
    peer.inject(
        {"id": ok_id, "type": "execute.command.request", "commandId": "echo", "request": {}}
    )
    await eventually(lambda: peer.of_type("execute.command.response"))
    (answer,) = peer.take()
    assert answer["thid"] == ok_id and answer["response"] == {"ok": True, "result": "ok"}
    assert await reg.execute_command("echo", {"local": True}) == "ok"


@pytest.mark.parametrize("kind", ["array", "object"])
async def test_100k_deep_json_through_a_registry(registries: Make, kind: str) -> None:
    reg, runs = await echo_registry(registries)
    events: list[Any] = []
    reg.add_event_listener("e", events.append)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()
    d0 = reg.stats()["dropped"]

    peer.inject_raw(json_event(deep_json(DEEP, kind)))
    assert reg.stats()["dropped"] == d0 + 1
    assert peer.take() == []

    # An execute request whose id is readable is answered, so its caller does not wait.
    req_id = new_id()
    peer.inject_raw(json_execute(deep_json(DEEP, kind), req_id))
    assert reg.stats()["dropped"] == d0 + 2
    (answer,) = peer.take()
    assert answer["thid"] == req_id
    assert answer["response"]["ok"] is False
    assert answer["response"]["error"]["code"] == "invalid_request"
    assert runs == [] and events == []
    await still_serves(reg, peer)


@pytest.mark.parametrize("kind", ["array", "object"])
async def test_100k_deep_msgpack_through_a_registry(registries: Make, kind: str) -> None:
    reg, runs = await echo_registry(registries)
    events: list[Any] = []
    reg.add_event_listener("e", events.append)
    peer = MsgpackFakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()
    d0 = reg.stats()["dropped"]

    peer.inject_raw(
        mp_message(
            {"id": new_id(), "type": "event", "eventId": "e"}, payload=deep_msgpack(DEEP, kind)
        )
    )
    assert reg.stats()["dropped"] == d0 + 1
    assert peer.take() == []

    # The envelope is well-formed and its id readable; only the request value is too deep:
    # the caller is answered invalid_request (as for JSON) instead of waiting for its TTL.
    req_id = new_id()
    deep_request = b"\x81\xa1r" + deep_msgpack(DEEP, kind)
    peer.inject_raw(
        mp_message(
            {"id": req_id, "type": "execute.command.request", "commandId": "echo"},
            request=deep_request,
        )
    )
    assert reg.stats()["dropped"] == d0 + 2
    answers = peer.take()
    assert [a["thid"] for a in answers] == [req_id], answers
    assert answers[0]["response"]["error"]["code"] == "invalid_request"
    assert runs == [] and events == []
    await still_serves(reg, peer)


# ------------------------------------------------------------------------- msgpack bomb

# Run in a fresh interpreter, so that its peak resident memory measures only this; the bombs
# are built before the baseline is taken. Importing the package peaks ~15 MB above where it
# settles, and an allocation could hide under that stale peak, so the peak is first reset to
# the current RSS (Linux's clear_refs "5") and read back as VmHWM. (ru_maxrss is not reset by
# it: it also keeps the peak of threads that have exited.) Where the reset is refused, the
# growth of ru_maxrss over the current RSS is used, which can only overstate it. With the
# argument "control" the script also allocates 64 MiB, to show that the measurement sees it.
BOMB_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, resource, sys, msgpack
    from cmd_ipc import CommandRegistry, ProtocolError, _core
    from cmd_ipc.channels.base import Channel

    def nested(unit, n):
        return unit * n

    ARRAY16 = b"\\xdc\\xff\\xff"          # array16 declaring 65 535 elements
    MAP16 = b"\\xde\\xff\\xff"            # map16 declaring 65 535 pairs
    ARRAY32 = b"\\xdd\\xff\\xff\\xff\\xff"  # array32 declaring 2**32 - 1 elements
    bombs = {
        "array16": nested(ARRAY16, 24_000),
        "map16": nested(MAP16, 24_000),
        "mixed16": nested(ARRAY16 + MAP16, 12_000),
        "array32": nested(ARRAY32, 14_400),
        "shallow": nested(ARRAY16, 50),
    }
    fields = {"id": "m", "type": "event", "eventId": "e"}
    frames = {}
    for name, bomb in bombs.items():
        frames[name + "/payload"] = msgpack.packb({**fields, "payload": bomb}, use_bin_type=True)
        frames[name + "/envelope"] = (
            b"\\x84" + b"".join(msgpack.packb(x) for kv in fields.items() for x in kv)
            + msgpack.packb("payload") + bomb
        )
    sizes = {k: len(v) for k, v in frames.items()}

    class Peer(Channel):
        def __init__(self):
            super().__init__("peer", "msgpack")
        async def start(self, on_frame, on_close):
            self.on_frame = on_frame
        def send(self, frame):
            pass
        async def close(self):
            pass

    async def through_registry():
        reg = CommandRegistry("main")
        peer = Peer()
        await reg.register_channel(peer)
        for frame in frames.values():
            peer.on_frame(frame)
        dropped = reg.stats()["dropped"]
        await reg.close()
        return dropped

    def status_kib(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError("no " + key)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        def peak_kib():
            return status_kib("VmHWM")
    except OSError:
        def peak_kib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = status_kib("VmRSS")
    if sys.argv[1:] == ["control"]:
        ballast = bytearray(64 * 1024 * 1024)
        ballast[::4096] = b"x" * len(ballast[::4096])
        del ballast
    codes = {}
    for name, frame in frames.items():
        for max_depth in (64, 10_000_000):
            for target in ("json", "msgpack"):
                try:
                    _core.transcode(frame, "msgpack", target, max_depth=max_depth)
                    codes[f"{name}/{max_depth}/{target}"] = "accepted"
                except ProtocolError as e:
                    codes[f"{name}/{max_depth}/{target}"] = e.args[0]
    dropped = asyncio.run(through_registry())
    after = peak_kib()
    print(json.dumps({"delta_kib": after - before, "codes": codes, "dropped": dropped,
                      "frames": len(frames), "sizes": sizes}))
    """
)


def run_bomb_script(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, *args], capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_msgpack_bomb_is_refused_in_bounded_memory() -> None:
    assert sys.platform.startswith("linux"), "ru_maxrss is in KiB and VmRSS exists on Linux"
    out = run_bomb_script()
    assert 70_000 < out["sizes"]["array16/payload"] < 75_000  # the ~72 kB of the issue
    for where, code in out["codes"].items():
        assert code in ("message_too_deep", "malformed_message"), (where, code)
    assert out["dropped"] == out["frames"]
    assert out["delta_kib"] < 50 * 1024, f"peak memory grew by {out['delta_kib']} KiB"
    # The measurement is not blind: 64 MiB allocated in the same window shows.
    control = run_bomb_script("control")
    assert control["delta_kib"] > 50 * 1024, control["delta_kib"]


def test_wide_but_honest_containers_are_fine() -> None:
    # 65 535 real elements (not a bomb): accepted, and returned unchanged.
    value = [None] * 65_535
    frame = mp_message({"id": "m", "type": "event", "eventId": "e"}, payload=msgpack.packb(value))
    out = _core.transcode(frame, "msgpack", "json")
    assert json.loads(out)["payload"] == value


# ------------------------------------------------------------------------- dedup table

EVENTS = 1_000_000


async def test_a_million_event_ids_keep_dedup_at_its_cap(registries: Make) -> None:
    # The default max_dedup; a long event_ttl so that the cap alone bounds the table.
    reg = registries("main", event_ttl=3600.0)
    cap = inspect.signature(CommandRegistry).parameters["max_dedup"].default
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    delivered = 0

    def count(_: Any) -> None:
        nonlocal delivered
        delivered += 1

    reg.add_event_listener("tick", count)
    on_frame = peer.inject_raw
    stats = reg.stats
    peak = 0
    for start in range(0, EVENTS, 10_000):
        for i in range(start, start + 10_000):
            on_frame(b'{"id":"evt-%d","type":"event","eventId":"tick"}' % i)
        peak = max(peak, stats()["dedup_entries"])
    assert peak == cap
    s = stats()
    assert s["dedup_entries"] == cap
    assert s["dropped"] == 0 and delivered == EVENTS

    # The newest ids are remembered: a repeat is dropped, not delivered ...
    on_frame(b'{"id":"evt-%d","type":"event","eventId":"tick"}' % (EVENTS - 1))
    assert delivered == EVENTS and stats()["dropped"] == 1
    # ... the oldest were forgotten first: a repeat that old is delivered again.
    on_frame(b'{"id":"evt-0","type":"event","eventId":"tick"}')
    assert delivered == EVENTS + 1
    assert stats()["dedup_entries"] == cap


async def test_event_ids_are_forgotten_after_event_ttl(registries: Make) -> None:
    reg = registries("main", event_ttl=0.05)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    got: list[Any] = []
    reg.add_event_listener("tick", got.append)
    frame = b'{"id":"same","type":"event","eventId":"tick","payload":1}'
    peer.inject_raw(frame)
    peer.inject_raw(frame)
    assert got == [1] and reg.stats()["dropped"] == 1
    # Waiting for time to pass (the TTL), not for readiness.
    await asyncio.sleep(0.1)
    peer.inject_raw(frame)
    assert got == [1, 1]
    assert reg.stats()["dedup_entries"] == 1


# ------------------------------------------------------------------------- pending table

CALLS = 100_000
TTL = 1.0


async def test_100k_unanswered_requests_stay_bounded_and_all_time_out(registries: Make) -> None:
    reg = registries("main", router_channel="peer", request_ttl=TTL)
    cap = inspect.signature(CommandRegistry).parameters["max_pending"].default
    assert cap == CALLS
    peer = FakeChannel("peer")  # records every request and never answers
    await reg.register_channel(peer)
    peer.take()

    tasks = [asyncio.ensure_future(reg.execute_command("never.answered")) for _ in range(CALLS)]
    # The tasks all start in the next loop iteration, before any timer can fire; this
    # coroutine resumes after them.
    await asyncio.sleep(0)
    s = reg.stats()
    assert s["pending"] == CALLS <= cap
    assert len(peer.of_type("execute.command.request")) == CALLS

    # Over the cap a call is refused at once with internal_error (max_pending), before
    # anything is sent, rather than queued: the caller learns now, not after the TTL, and
    # the table never grows past the cap. (No await happens before the refusal, so no
    # timeout can have freed a slot in between.)
    with pytest.raises(InternalError, match="max_pending"):
        await reg.execute_command("never.answered")
    assert reg.stats()["pending"] == CALLS
    assert len(peer.sent) == CALLS

    # Every call ends with a timeout (the margin only catches a hang; nothing is timed).
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TTL + 50)
    kinds = {type(r) for r in results}
    assert kinds == {CommandTimeoutError}, kinds
    assert reg.stats()["pending"] == 0

    # A very late answer to one of them is dropped and counted.
    d0 = reg.stats()["dropped"]
    late = peer.sent[0]
    peer.inject(
        {
            "id": new_id(),
            "type": "execute.command.response",
            "thid": late["id"],
            "response": {"ok": True, "result": 1},
        }
    )
    assert reg.stats()["dropped"] == d0 + 1


async def test_max_pending_counts_forwards_and_refuses_at_once(registries: Make) -> None:
    # A small cap shows the same rule with forwarded requests: a peer's request beyond the
    # cap is answered internal_error at once instead of being forwarded.
    reg = registries(
        "mid", router_channel="up", request_ttl=30.0, max_pending=10, max_pending_per_channel=10
    )
    up, down = FakeChannel("up"), FakeChannel("down")
    await reg.register_channel(up)
    await reg.register_channel(down)
    up.take()
    down.take()
    ids = [new_id() for _ in range(12)]
    for i in ids:
        down.inject({"id": i, "type": "execute.command.request", "commandId": "far.away"})
    assert len(up.of_type("execute.command.request")) == 10
    assert reg.stats()["pending_forwards"] == 10
    refused = down.of_type("execute.command.response")
    assert [r["thid"] for r in refused] == ids[10:]
    assert {r["response"]["error"]["code"] for r in refused} == {"internal_error"}
    with pytest.raises(InternalError):
        await reg.execute_command("far.away")


# ------------------------------------------------------------------------- unknown thid


async def test_unknown_and_already_answered_thid_are_dropped_and_counted(
    registries: Make,
) -> None:
    reg = registries("main", router_channel="peer", request_ttl=30.0)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()

    call = asyncio.ensure_future(reg.execute_command("remote.cmd", {"a": 1}))
    await eventually(lambda: peer.of_type("execute.command.request"))
    (request,) = peer.take()
    answer = {
        "id": new_id(),
        "type": "execute.command.response",
        "thid": request["id"],
        "response": {"ok": True, "result": 42},
    }
    d0 = reg.stats()["dropped"]
    peer.inject(answer)
    assert await call == 42
    assert reg.stats()["dropped"] == d0

    # The same answer again: already answered.
    peer.inject({**answer, "id": new_id()})
    assert reg.stats()["dropped"] == d0 + 1
    # An answer to a request never sent.
    peer.inject({**answer, "id": new_id(), "thid": new_id()})
    assert reg.stats()["dropped"] == d0 + 2
    # An error answer to a request never sent.
    peer.inject(
        {
            "id": new_id(),
            "type": "execute.command.response",
            "thid": new_id(),
            "response": {"ok": False, "error": {"code": "timeout", "message": "late"}},
        }
    )
    assert reg.stats()["dropped"] == d0 + 3
    # A registration answer to a registration never made.
    peer.inject(
        {
            "id": new_id(),
            "type": "register.command.response",
            "thid": new_id(),
            "response": {"ok": True},
        }
    )
    assert reg.stats()["dropped"] == d0 + 4
    assert peer.take() == []  # nothing is answered to a stray answer
    assert reg.stats()["pending"] == 0

    # Still serving.
    call = asyncio.ensure_future(reg.execute_command("remote.cmd"))
    await eventually(lambda: peer.of_type("execute.command.request"))
    (request,) = peer.take()
    peer.inject({**answer, "id": new_id(), "thid": request["id"]})
    assert await call == 42


# ------------------------------------------------------------------------- found on the way


async def test_peer_requests_to_local_handlers_are_bounded(registries: Make) -> None:
    # A peer's requests for a local handler are requests in flight too: without a cap, a
    # hostile peer starts any number of concurrent handler runs (each a task and a job-table
    # entry). Beyond max_pending it should be answered at once, as a forward is.
    reg = registries("main", max_pending=10, max_pending_per_channel=10)
    release = asyncio.Event()
    running = 0

    async def slow(request, /):  # type: ignore[no-untyped-def]
        nonlocal running
        running += 1
        await release.wait()
        return "done"

    await reg.register_command("slow", slow)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()
    ids = [new_id() for _ in range(50)]
    for i in ids:
        peer.inject({"id": i, "type": "execute.command.request", "commandId": "slow"})
    await eventually(lambda: running + len(peer.of_type("execute.command.response")) >= 50, 5)
    try:
        assert running <= 10, f"{running} handler runs started by one peer with max_pending=10"
        refused = peer.of_type("execute.command.response")
        assert len(refused) == 40
        assert {r["response"]["error"]["code"] for r in refused} == {"internal_error"}
    finally:
        release.set()


async def test_result_over_the_size_limit_is_answered_not_sent(registries: Make) -> None:
    # A result larger than max_message_size would be dropped unread by a peer with the same
    # limit, and its caller would wait for the whole TTL. It should get an error now.
    reg = registries("main", max_message_size=10_000)
    await reg.register_command("big", lambda: "y" * 20_000)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()
    req_id = new_id()
    peer.inject({"id": req_id, "type": "execute.command.request", "commandId": "big"})
    await eventually(lambda: peer.of_type("execute.command.response"))
    (answer,) = peer.take()
    assert answer["thid"] == req_id
    assert answer["response"]["ok"] is False, "a 20 kB result was sent past a 10 kB limit"
    assert answer["response"]["error"]["code"] == "internal_error"


def test_local_event_payload_over_the_limits_is_refused_at_emit() -> None:
    async def main() -> None:
        async with CommandRegistry("main", max_message_size=10_000, max_depth=16) as reg:
            with pytest.raises(ProtocolError) as info:
                reg.emit_event("ev", {"s": "z" * 20_000})
            assert info.value.args[0] == "message_too_large"
            with pytest.raises(ProtocolError) as info:
                reg.emit_event("ev", json.loads("[" * 20 + "]" * 20))
            assert info.value.args[0] == "message_too_deep"

    asyncio.run(main())


async def test_one_peer_cannot_take_every_slot_of_max_pending(registries: Make) -> None:
    # A peer whose calls timed out on its side while the handlers still run here (or a
    # hostile one) holds at most max_pending_per_channel slots (default: half of
    # max_pending): every other caller is still served.
    reg = registries("svc", max_pending=10)
    release = asyncio.Event()
    running: list[str] = []

    async def slow(who: str) -> str:
        running.append(who)
        await release.wait()
        return who

    await reg.register_command("slow", slow, validate=False)
    greedy, other = FakeChannel("greedy"), FakeChannel("other")
    await reg.register_channel(greedy)
    await reg.register_channel(other)
    greedy.take()
    other.take()
    for _ in range(8):
        greedy.inject(
            {
                "id": new_id(),
                "type": "execute.command.request",
                "commandId": "slow",
                "request": {"who": "greedy"},
            }
        )
    await eventually(lambda: len(running) + len(greedy.of_type("execute.command.response")) >= 8)
    try:
        assert running.count("greedy") == 5
        refused = greedy.of_type("execute.command.response")
        assert len(refused) == 3
        assert {r["response"]["error"]["code"] for r in refused} == {"internal_error"}
        assert "max_pending_per_channel" in refused[0]["response"]["error"]["message"]
        other.inject(
            {
                "id": new_id(),
                "type": "execute.command.request",
                "commandId": "slow",
                "request": {"who": "other"},
            }
        )
        await eventually(lambda: "other" in running)
        # So is a local caller.
        call = asyncio.ensure_future(reg.execute_command("slow", {"who": "local"}))
        await eventually(lambda: "local" in running)
    finally:
        release.set()
    assert await call == "local"
    await eventually(lambda: len(greedy.of_type("execute.command.response")) == 8)


async def test_a_peer_registers_a_bounded_number_of_bounded_commands(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # spec-v1 has one registration error, so a refusal is `duplicate_command` on the wire,
    # with the real reason logged here.
    reg = registries("root", max_commands_per_channel=3, max_command_size=1000)
    peer = FakeChannel("peer")
    await reg.register_channel(peer)
    peer.take()

    def register(cmd: dict[str, Any]) -> dict[str, Any]:
        rid = new_id()
        peer.inject({"id": rid, "type": "register.command.request", "command": cmd})
        (answer,) = [m for m in peer.take() if m.get("thid") == rid]
        return answer["response"]

    with caplog.at_level(logging.WARNING, logger="cmd_ipc"):
        for i in range(3):
            assert register({"id": f"p.{i}"}) == {"ok": True}
        assert register({"id": "p.0"}) == {"ok": True}  # again: not one more
        assert register({"id": "p.3"}) == {"ok": False, "error": "duplicate_command"}
        assert register({"id": "q", "description": "x" * 2000}) == {
            "ok": False,
            "error": "duplicate_command",
        }
    assert "max_commands_per_channel" in caplog.text
    assert "max_command_size" in caplog.text
    assert sorted(c["id"] for c in reg.list_commands()) == ["p.0", "p.1", "p.2"]
