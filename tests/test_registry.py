"""The Python API of :class:`cmd_ipc.CommandRegistry`: registration, calls, events, errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import cmd_ipc
import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandError,
    CommandRegistry,
    CommandTimeoutError,
    DuplicateCommandError,
    InMemoryChannel,
    InternalError,
    InvalidRequestError,
    NotFoundError,
)
from cmd_ipc.errors import error_from_code
from helpers import eventually, link, registries, settle

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]


async def pair(make: Make, *, encoding: str = "msgpack") -> tuple[CommandRegistry, CommandRegistry]:
    """A root ``main`` and a worker ``w`` under it."""
    root = make("main")
    worker = make("w", router_channel="main")
    await link(root, worker, encoding=encoding)
    return root, worker


# ---------------------------------------------------------------------------------- registering


async def test_decorator_registers_def_and_async_def(registries: Make) -> None:
    r = registries("main")

    @r.command("calc.add", description="Add two numbers")
    def add(a: int, b: int) -> int:
        return a + b

    @r.command("calc.mul")
    async def mul(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a * b

    # The decorator returns the function unchanged.
    assert add(1, 2) == 3
    assert await r.execute_command("calc.add", {"a": 2, "b": 3}) == 5
    assert await r.execute_command("calc.mul", {"a": 2, "b": 3}) == 6
    assert r.route_of("calc.add") == "local"


async def test_decorator_duplicate_on_root_raises_at_once(registries: Make) -> None:
    r = registries("main")
    r.command("x")(lambda: 1)
    with pytest.raises(DuplicateCommandError):
        r.command("x")(lambda: 2)
    # The first handler is still the one that runs.
    assert await r.execute_command("x") == 1


async def test_decorator_before_router_attached_is_registered_on_attach(registries: Make) -> None:
    root = registries("main")
    worker = registries("w", router_channel="main")

    @worker.command("late.cmd")
    def late() -> str:
        return "late"

    # Not escalated yet: the root cannot see it.
    assert "late.cmd" not in [c["id"] for c in root.list_commands()]
    await link(root, worker)  # register_channel of the router waits for the ack
    assert "late.cmd" in [c["id"] for c in root.list_commands()]
    assert await root.execute_command("late.cmd") == "late"


async def test_register_command_def_and_async_def(registries: Make) -> None:
    r = registries("main")

    def hello(name: str) -> str:
        return f"hello {name}"

    async def ahello(name: str) -> str:
        await asyncio.sleep(0)
        return f"ahello {name}"

    await r.register_command("hello", hello)
    await r.register_command("ahello", ahello)
    assert await r.execute_command("hello", {"name": "ada"}) == "hello ada"
    assert await r.execute_command("ahello", {"name": "bob"}) == "ahello bob"


async def test_register_command_rejects_non_callable(registries: Make) -> None:
    r = registries("main")
    with pytest.raises(TypeError):
        await r.register_command("x", 42)  # type: ignore[arg-type]


async def test_kwargs_passing_with_defaults_and_var_kwargs(registries: Make) -> None:
    r = registries("main")
    seen: list[Any] = []

    def greet(name: str, greeting: str = "hi") -> str:
        return f"{greeting} {name}"

    def anything(**kw: Any) -> int:
        seen.append(kw)
        return len(kw)

    await r.register_command("greet", greet)
    await r.register_command("anything", anything)
    assert await r.execute_command("greet", {"name": "ada"}) == "hi ada"
    assert await r.execute_command("greet", {"name": "ada", "greeting": "yo"}) == "yo ada"
    assert await r.execute_command("anything", {"p": 1, "q": [1, 2]}) == 2
    assert seen == [{"p": 1, "q": [1, 2]}]
    # No request at all: called with no arguments.
    assert await r.execute_command("anything") == 0


async def test_positional_only_handler_gets_whole_request(registries: Make) -> None:
    r = registries("main")
    got: list[Any] = []

    def whole(request, /):  # type: ignore[no-untyped-def]
        got.append(request)
        return sorted(request)

    async def awhole(request, /):  # type: ignore[no-untyped-def]
        return request

    await r.register_command("whole", whole)
    await r.register_command("awhole", awhole)
    assert await r.execute_command("whole", {"b": 1, "a": 2, "request": 3}) == ["a", "b", "request"]
    assert await r.execute_command("whole") == []
    assert got == [{"b": 1, "a": 2, "request": 3}, {}]
    assert await r.execute_command("awhole", {"k": "v"}) == {"k": "v"}


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize(
    "request_",
    [{"a": 1}, {"a": 1, "b": 2, "c": 3}, {"b": 2}, None],
    ids=["missing", "extra", "missing-first", "none"],
)
async def test_request_not_fitting_handler_is_invalid_request(
    registries: Make, is_async: bool, request_: Any
) -> None:
    r = registries("main")
    ran: list[Any] = []

    if is_async:

        async def add(a: int, b: int) -> int:
            ran.append((a, b))
            return a + b

    else:

        def add(a: int, b: int) -> int:  # type: ignore[misc]
            ran.append((a, b))
            return a + b

    await r.register_command("add", add)
    with pytest.raises(InvalidRequestError) as info:
        await r.execute_command("add", request_)
    assert info.value.code == "invalid_request"
    assert "add" in info.value.message
    assert ran == []


async def test_type_error_inside_handler_is_internal_not_invalid(registries: Make) -> None:
    # The arguments fit: a TypeError raised by the handler's body is the handler's failure.
    r = registries("main")

    def bad(a: int) -> int:
        return a + "x"  # type: ignore[operator,no-any-return]

    await r.register_command("bad", bad)
    with pytest.raises(InternalError) as info:
        await r.execute_command("bad", {"a": 1})
    assert "TypeError" in info.value.message


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("remote", [False, True])
async def test_handler_exception_is_internal_error_logged_not_sent(
    registries: Make, caplog: pytest.LogCaptureFixture, is_async: bool, remote: bool
) -> None:
    root, worker = await pair(registries)
    owner = worker if remote else root

    def boom() -> None:
        raise ValueError("kaboom 42")

    async def aboom() -> None:
        await asyncio.sleep(0)
        raise ValueError("kaboom 42")

    await owner.register_command("boom", aboom if is_async else boom)
    with caplog.at_level(logging.ERROR, logger="cmd_ipc"), pytest.raises(InternalError) as info:
        await root.execute_command("boom")
    err = info.value
    assert err.code == "internal_error"
    assert "ValueError" in err.message and "kaboom 42" in err.message
    assert "Traceback" not in err.message and "File " not in err.message
    assert "Traceback" not in str(err)
    logged = [rec for rec in caplog.records if rec.name == "cmd_ipc" and rec.exc_info]
    assert len(logged) == 1, caplog.records
    assert isinstance(logged[0].exc_info[1], ValueError)  # type: ignore[index]
    assert "boom" in logged[0].getMessage()


@pytest.mark.parametrize("remote", [False, True])
async def test_handler_raising_command_error_propagates_code(
    registries: Make, caplog: pytest.LogCaptureFixture, remote: bool
) -> None:
    root, worker = await pair(registries)
    owner = worker if remote else root

    def picky(x: int) -> int:
        if x < 0:
            raise InvalidRequestError("x must be >= 0")
        if x == 0:
            raise NotFoundError("no such x")
        return x

    await owner.register_command("picky", picky)
    with caplog.at_level(logging.ERROR, logger="cmd_ipc"):
        with pytest.raises(InvalidRequestError) as info:
            await root.execute_command("picky", {"x": -1})
        assert info.value.message == "x must be >= 0"
        with pytest.raises(NotFoundError) as info2:
            await root.execute_command("picky", {"x": 0})
        assert info2.value.message == "no such x"
    assert await root.execute_command("picky", {"x": 3}) == 3
    # A deliberate CommandError is an answer, not a crash: nothing logged with a traceback.
    assert not [rec for rec in caplog.records if rec.exc_info]


@pytest.mark.parametrize("remote", [False, True])
async def test_unserialisable_result_is_internal_error(registries: Make, remote: bool) -> None:
    root, worker = await pair(registries)
    owner = worker if remote else root
    await owner.register_command("obj", lambda: object())
    with pytest.raises(InternalError) as info:
        await asyncio.wait_for(root.execute_command("obj"), 5)
    assert "obj" in info.value.message


async def test_unregister_command(registries: Make) -> None:
    r = registries("main")
    await r.register_command("x", lambda: 1)
    assert r.unregister_command("x") is True
    assert r.unregister_command("x") is False
    with pytest.raises(NotFoundError):
        await r.execute_command("x")


# ---------------------------------------------------------------------------------- calling


async def test_execute_local_with_timeout_argument(registries: Make) -> None:
    r = registries("main")
    await r.register_command("fast", lambda: "ok")
    assert await r.execute_command("fast", timeout=0.5) == "ok"
    for bad in (0, -1.0):
        with pytest.raises(ValueError):
            await r.execute_command("fast", timeout=bad)


async def test_execute_local_slow_handler_times_out(registries: Make) -> None:
    # `timeout` is documented as "seconds to wait for the response" and CommandTimeoutError
    # as "no response within timeout": a local async handler that never answers must not
    # make the caller wait for ever.
    r = registries("main")
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    await r.register_command("stuck", stuck)
    with pytest.raises(CommandTimeoutError):
        await asyncio.wait_for(r.execute_command("stuck", timeout=0.2), 2)


async def test_execute_rejects_bad_requests(registries: Make) -> None:
    r = registries("main")
    await r.register_command("x", lambda request, /: request)
    with pytest.raises(TypeError):
        await r.execute_command("x", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await r.execute_command("x", {"o": object()})
    with pytest.raises(NotFoundError):
        await r.execute_command("nope")
    # A Mapping that is not a dict is accepted.
    from types import MappingProxyType

    assert await r.execute_command("x", MappingProxyType({"k": 1})) == {"k": 1}


async def test_list_commands(registries: Make) -> None:
    r = registries("main")
    schema = {"request": {"type": "object"}, "response": {"type": "number"}}
    await r.register_command("b.cmd", lambda: 1, description="B", schema=schema)
    await r.register_command("a.cmd", lambda: 1)
    await r.register_command("_private", lambda: 1)
    cmds = r.list_commands()
    assert cmds == [
        {"id": "_private"},
        {"id": "a.cmd"},
        {"id": "b.cmd", "description": "B", "schema": schema},
    ]
    with pytest.raises(ValueError):
        await r.register_command("c", lambda: 1, schema={"bogus": {}})


async def test_list_commands_includes_remote(registries: Make) -> None:
    root, worker = await pair(registries)
    await worker.register_command("w.cmd", lambda: 1, description="from w")
    assert {"id": "w.cmd", "description": "from w"} in root.list_commands()
    assert root.route_of("w.cmd") == "w"
    assert root.route_of("missing") is None
    # A worker routes anything it does not know to its router.
    assert worker.route_of("missing") == "main"


# ---------------------------------------------------------------------------------- events


async def test_events_sync_and_async_listeners(registries: Make) -> None:
    r = registries("main")
    got: list[tuple[str, Any]] = []
    async_done = asyncio.Event()

    def sync_listener(payload: Any) -> None:
        got.append(("sync", payload))

    async def async_listener(payload: Any) -> None:
        await asyncio.sleep(0)
        got.append(("async", payload))
        async_done.set()

    unsubscribe = r.add_event_listener("user.updated", sync_listener)
    r.add_event_listener("user.updated", async_listener)

    @r.on("user.updated")
    def decorated(payload: Any) -> None:
        got.append(("decorated", payload))

    assert callable(decorated)
    r.emit_event("user.updated", {"id": 1})
    # Sync listeners ran before emit_event returned; the async one is scheduled.
    assert got == [("sync", {"id": 1}), ("decorated", {"id": 1})]
    await asyncio.wait_for(async_done.wait(), 2)
    assert ("async", {"id": 1}) in got

    got.clear()
    async_done.clear()
    unsubscribe()
    r.remove_event_listener("user.updated", async_listener)
    r.remove_event_listener("user.updated", async_listener)  # absent: no error
    r.emit_event("user.updated")
    assert got == [("decorated", None)]
    await settle()
    assert not async_done.is_set()
    r.emit_event("other.event", 1)
    assert got == [("decorated", None)]


async def test_failing_listener_is_logged_and_others_still_run(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    r = registries("main")
    got: list[Any] = []
    afailed = asyncio.Event()

    def bad(_: Any) -> None:
        raise RuntimeError("listener broke")

    async def abad(_: Any) -> None:
        afailed.set()
        raise RuntimeError("async listener broke")

    r.add_event_listener("e", bad)
    r.add_event_listener("e", abad)
    r.add_event_listener("e", got.append)
    with caplog.at_level(logging.ERROR, logger="cmd_ipc"):
        r.emit_event("e", 7)
        await asyncio.wait_for(afailed.wait(), 2)
        await eventually(lambda: len([x for x in caplog.records if x.exc_info]) == 2)
    assert got == [7]


async def test_events_reach_other_registry(registries: Make) -> None:
    root, worker = await pair(registries)
    got: list[Any] = []
    arrived = asyncio.Event()

    def on_evt(payload: Any) -> None:
        got.append(payload)
        arrived.set()

    worker.add_event_listener("job.done", on_evt)
    root.emit_event("job.done", {"job": 7})
    await asyncio.wait_for(arrived.wait(), 2)
    assert got == [{"job": 7}]


async def test_emit_event_unserialisable_payload(registries: Make) -> None:
    r = registries("main")
    with pytest.raises(TypeError):
        r.emit_event("e", object())


# ---------------------------------------------------------------------------------- stats, life


async def test_stats_shape(registries: Make) -> None:
    root, worker = await pair(registries)
    await worker.register_command("w.cmd", lambda: 1)
    assert await root.execute_command("w.cmd") == 1
    s = root.stats()
    for key in ("channels", "forwarded", "pending", "pending_forwards", "dropped", "dedup_entries"):
        assert key in s, key
    for key in ("forwarded", "pending", "pending_forwards", "dropped", "dedup_entries"):
        assert isinstance(s[key], int) and s[key] >= 0, key
    assert set(s["channels"]) == {"w"}
    ch = s["channels"]["w"]
    # Sent: list request, list response, register ack, execute request. Received: list
    # request, list response, register request, execute response.
    assert ch == {"sent": 4, "received": 4, "requests": 1, "in_flight": 0, "dropped": 0}
    assert s["pending"] == 0 and s["forwarded"] == 0


async def test_async_with_closes() -> None:
    never = asyncio.Event()
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await never.wait()

    async with CommandRegistry("main") as root, CommandRegistry("w", router_channel="main") as w:
        to_w, to_main = InMemoryChannel.pair("w", "main")
        await root.register_channel(to_w)
        await w.register_channel(to_main)
        await w.register_command("stuck", stuck)
        call = asyncio.ensure_future(root.execute_command("stuck"))
        await asyncio.wait_for(started.wait(), 2)
        assert not root.closed
    assert root.closed and w.closed
    assert to_w.closed and to_main.closed
    assert root.channels == {} and w.channels == {}
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 2)
    with pytest.raises(RuntimeError):
        await root.execute_command("stuck")
    with pytest.raises(RuntimeError):
        root.emit_event("e")
    await root.close()  # idempotent


async def test_register_channel_twice_is_an_error(registries: Make) -> None:
    r = registries("main")
    a, _ = InMemoryChannel.pair("w", "main")
    b, _ = InMemoryChannel.pair("w", "main")
    await r.register_channel(a)
    with pytest.raises(ValueError):
        await r.register_channel(b)
    assert r.channels == {"w": a}


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (NotFoundError, "not_found"),
        (InvalidRequestError, "invalid_request"),
        (InternalError, "internal_error"),
        (CommandTimeoutError, "timeout"),
        (ChannelDisconnectedError, "channel_disconnected"),
        (DuplicateCommandError, "duplicate_command"),
    ],
)
def test_error_classes_and_codes(cls: type[CommandError], code: str) -> None:
    assert issubclass(cls, CommandError)
    assert cls.code == code
    e = cls("msg")
    assert e.code == code and e.message == "msg"
    assert str(e) == f"[{code}] msg"
    built = error_from_code(code, "m")
    assert type(built) is cls and built.message == "m"
    assert getattr(cmd_ipc, cls.__name__) is cls


def test_error_class_extra_bases() -> None:
    assert issubclass(CommandTimeoutError, TimeoutError)
    assert issubclass(ChannelDisconnectedError, ConnectionError)
    assert not issubclass(NotFoundError, TimeoutError)
    assert issubclass(cmd_ipc.ProtocolError, ValueError)
    unknown = error_from_code("no_such_code", "m")
    assert type(unknown) is InternalError and "no_such_code" in unknown.message


async def _failure(reg: CommandRegistry, command_id: str, request: Any = None) -> CommandError:
    try:
        await asyncio.wait_for(reg.execute_command(command_id, request), 5)
    except CommandError as e:
        return e
    raise AssertionError(f"{command_id} did not fail")


@pytest.mark.parametrize(
    ("command_id", "request_", "expected"),
    [
        ("nope", None, NotFoundError),
        ("add", {"a": 1}, InvalidRequestError),
        ("boom", None, InternalError),
        ("picky", None, InvalidRequestError),
        ("late", None, CommandTimeoutError),
        ("gone", None, ChannelDisconnectedError),
    ],
)
async def test_remote_failure_raises_same_class_as_local(
    registries: Make,
    caplog: pytest.LogCaptureFixture,
    command_id: str,
    request_: Any,
    expected: type[CommandError],
) -> None:
    root, worker = await pair(registries)
    local = registries("solo")

    def add(a: int, b: int) -> int:
        return a + b

    def boom() -> None:
        raise KeyError("k")

    def picky() -> None:
        raise InvalidRequestError("picky")

    def late() -> None:
        raise CommandTimeoutError("upstream was late")

    def gone() -> None:
        raise ChannelDisconnectedError("upstream went away")

    for reg in (worker, local):
        for cid, fn in (
            ("add", add),
            ("boom", boom),
            ("picky", picky),
            ("late", late),
            ("gone", gone),
        ):
            await reg.register_command(cid, fn)
    with caplog.at_level(logging.CRITICAL, logger="cmd_ipc"):
        here = await _failure(local, command_id, request_)
        # "nope" exists nowhere: the worker escalates the call and the root answers not_found.
        caller = worker if command_id == "nope" else root
        there = await _failure(caller, command_id, request_)
    assert type(here) is expected, here
    assert type(there) is expected, there
    assert here.code == there.code == expected.code


async def test_handler_raising_duplicate_command_error_same_local_and_remote(
    registries: Make,
) -> None:
    # `duplicate_command` cannot travel in an execute response (spec), so a remote caller sees
    # it as internal_error; a local caller must see the same class.
    root, worker = await pair(registries)
    local = registries("solo")

    def dup() -> None:
        raise DuplicateCommandError("already have one")

    await worker.register_command("dup", dup)
    await local.register_command("dup", dup)
    here = await _failure(local, "dup")
    there = await _failure(root, "dup")
    assert type(here) is type(there), (here, there)
    assert "already have one" in here.message and "already have one" in there.message


@pytest.mark.parametrize("remote", [False, True])
async def test_handler_raising_command_error_with_unknown_code(
    registries: Make, remote: bool
) -> None:
    # A user subclass of CommandError with a code of its own: the caller must get an
    # InternalError that mentions it, promptly -- not a ValueError out of execute_command
    # (local) nor an exception in a loop callback and a timeout (remote).
    class QuotaError(CommandError):
        code = "quota_exceeded"

    root, worker = await pair(registries)
    owner = worker if remote else root

    def limited() -> None:
        raise QuotaError("over quota")

    await owner.register_command("limited", limited)
    err = await _failure(root, "limited")
    assert type(err) is InternalError
    assert "over quota" in err.message
    # The registry is still healthy: nothing left pending.
    assert owner.stats()["pending"] == 0 and root.stats()["pending"] == 0


# ---------------------------------------------------------------------------------- payloads


async def test_bytes_round_trip_over_msgpack_channel(registries: Make) -> None:
    root, worker = await pair(registries, encoding="msgpack")
    blob = bytes(range(256)) * 4

    def echo(data: bytes, nested: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(data, bytes) and isinstance(nested["b"], bytes)
        return {"data": data + b"!", "nested": nested, "n": len(data)}

    await worker.register_command("echo", echo)
    result = await root.execute_command("echo", {"data": blob, "nested": {"b": b"\x00"}})
    assert result == {"data": blob + b"!", "nested": {"b": b"\x00"}, "n": 1024}
    assert isinstance(result["data"], bytes)

    got: list[Any] = []
    arrived = asyncio.Event()

    def on_blob(payload: Any) -> None:
        got.append(payload)
        arrived.set()

    worker.add_event_listener("blob", on_blob)
    root.emit_event("blob", {"b": b"\xff\x00"})
    await asyncio.wait_for(arrived.wait(), 2)
    assert got == [{"b": b"\xff\x00"}]


async def test_bytes_over_json_channel_never_change_type(registries: Make) -> None:
    # JSON cannot carry bytes. Either the call fails (TypeError / a CommandError), or the bytes
    # arrive as bytes; silently turning them into something else corrupts the caller's data.
    root, worker = await pair(registries, encoding="json")
    seen: list[Any] = []

    def echo(data: Any) -> Any:
        seen.append(data)
        return data

    await worker.register_command("echo", echo)
    try:
        result = await asyncio.wait_for(root.execute_command("echo", {"data": b"\x00\x01"}), 5)
    except (TypeError, CommandError):
        assert seen == [] or all(isinstance(s, bytes) for s in seen)
    else:
        assert seen == [b"\x00\x01"], seen
        assert result == b"\x00\x01", result


async def test_unencodable_request_over_json_channel_fails_promptly(registries: Make) -> None:
    # A map with a bytes key has no JSON form. The request cannot be sent, so the caller must
    # learn it at once (TypeError or a CommandError), not wait for the 30 s request TTL.
    root, worker = await pair(registries, encoding="json")
    await worker.register_command("echo", lambda m: m)
    with pytest.raises((TypeError, CommandError)) as info:
        await asyncio.wait_for(root.execute_command("echo", {"m": {b"k": 1}}), 2)
    assert not isinstance(info.value, CommandTimeoutError)
    assert root.stats()["pending"] == 0


def test_decorator_and_emit_from_another_thread_run_on_the_loop_thread() -> None:
    """With the blocking API the loop runs on its own thread: registering and emitting from
    the caller's thread is carried out on the loop's thread (listeners run there too)."""
    import threading

    from cmd_ipc import CommandRegistry

    seen: list[tuple[object, int]] = []
    with CommandRegistry("main") as registry:

        @registry.command("calc.add", validate=False)
        def add(a: int, b: int) -> int:
            return a + b

        registry.add_event_listener("ping", lambda p: seen.append((p, threading.get_ident())))
        assert registry.execute_command_sync("calc.add", {"a": 1, "b": 2}) == 3
        registry.emit_event("ping", 1)

        async def thread_of_loop() -> int:
            return threading.get_ident()

        loop_thread = registry.run_blocking(thread_of_loop)
        assert registry.unregister_command("calc.add")
    assert seen == [(1, loop_thread)]
    assert loop_thread != threading.get_ident()
