"""Property tests (hypothesis) of the codecs and of trees of registries.

* Round trips: any spec-v1 message survives JSON -> JSON, JSON -> msgpack -> JSON unchanged,
  and every frame our codec emits is valid against the spec schemas.
* Parser differential: for JSON built by Python's ``json`` module, our codec either rejects
  the message with :class:`ProtocolError` or hands on exactly what ``json.loads`` reads; the
  inputs where JSON parsers usually disagree each have one pinned behaviour below.
* Trees: random trees of in-memory registries under random registrations, calls, events and
  channel closes: every call ends by its deadline, no event is delivered twice to one registry,
  no command has two owners in one connected tree.

Comparisons are type-strict (``1`` is not ``1.0``, ``0.0`` is not ``-0.0``): a value that
changes type on the way is a differential even when Python's ``==`` would not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import spec_support
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandError,
    CommandRegistry,
    CommandTimeoutError,
    InternalError,
    NotFoundError,
    ProtocolError,
    _core,
)
from helpers import eventually, link, settle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The autouse fixture of conftest.py (schema validation of every in-memory frame) is function
# scoped on purpose: it stays installed for every example of a test.
_BASE = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FAST = settings(_BASE, max_examples=150)
TREES = settings(_BASE, max_examples=60)
SLOW = settings(_BASE, max_examples=2000)
SLOW_TREES = settings(_BASE, max_examples=400)

INT64 = (-(2**63), 2**63 - 1)


# ------------------------------------------------------------------------- strict equality


def same(a: Any, b: Any) -> bool:
    """Deep equality that also compares types and the sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def assert_same(expected: Any, actual: Any) -> None:
    assert same(expected, actual), f"value changed:\n  expected {expected!r}\n  got      {actual!r}"


# ------------------------------------------------------------------------- message strategies

# Every finite double, drawn from 64 random bits: hypothesis' own floats (and integers) favour
# short decimals and small values, which any float parser gets right.
doubles = (
    st.randoms(use_true_random=False)
    .map(lambda r: struct.unpack("<d", struct.pack("<Q", r.getrandbits(64)))[0])
    .filter(math.isfinite)
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(*INT64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | doubles
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
ids = st.text(min_size=1, max_size=16)
ERROR_CODES = ["not_found", "invalid_request", "internal_error", "timeout", "channel_disconnected"]


def _with_optional(base: dict[str, Any], **optional: st.SearchStrategy[Any]) -> Any:
    """A strategy of ``base`` plus any subset of the ``optional`` keys."""
    return st.fixed_dictionaries(base, optional=optional)


command_defs = _with_optional(
    {"id": ids},
    description=st.text(max_size=20),
    schema=_with_optional({}, request=json_values, response=json_values),
)


def _message_strategy(values: st.SearchStrategy[Any], objects: st.SearchStrategy[Any]) -> Any:
    return st.one_of(
        st.fixed_dictionaries(
            {"id": ids, "type": st.just("register.command.request"), "command": command_defs}
        ),
        st.fixed_dictionaries(
            {
                "id": ids,
                "type": st.just("register.command.response"),
                "thid": ids,
                "response": st.sampled_from(
                    [{"ok": True}, {"ok": False, "error": "duplicate_command"}]
                ),
            }
        ),
        st.fixed_dictionaries({"id": ids, "type": st.just("list.commands.request")}),
        st.fixed_dictionaries(
            {
                "id": ids,
                "type": st.just("list.commands.response"),
                "thid": ids,
                "commands": st.lists(command_defs, max_size=3),
            }
        ),
        _with_optional(
            {"id": ids, "type": st.just("execute.command.request"), "commandId": ids},
            request=objects,
        ),
        st.fixed_dictionaries(
            {
                "id": ids,
                "type": st.just("execute.command.response"),
                "thid": ids,
                "response": st.one_of(
                    _with_optional({"ok": st.just(True)}, result=values),
                    st.fixed_dictionaries(
                        {
                            "ok": st.just(False),
                            "error": st.fixed_dictionaries(
                                {"code": st.sampled_from(ERROR_CODES), "message": st.text()}
                            ),
                        }
                    ),
                ),
            }
        ),
        _with_optional(
            {"id": ids, "type": st.just("event"), "eventId": ids},
            payload=values,
        ),
    )


messages = _message_strategy(json_values, json_objects)


def transcode(data: bytes, source: str, target: str) -> bytes:
    out = _core.transcode(data, source, target)
    spec_support.validate_frame(out, target)
    return out


def dumps(msg: Any, ensure_ascii: bool) -> bytes:
    return json.dumps(msg, ensure_ascii=ensure_ascii).encode()


# ------------------------------------------------------------------------- a. round trips


def check_round_trip(msg: dict[str, Any], ensure_ascii: bool) -> None:
    spec_support.validate_message(msg)
    text = dumps(msg, ensure_ascii)
    # JSON -> JSON: what a registry forwarding between two JSON channels sends on.
    assert_same(msg, json.loads(transcode(text, "json", "json")))
    # JSON -> msgpack, read independently by the msgpack package ...
    mp = transcode(text, "json", "msgpack")
    assert_same(msg, spec_support.msgpack_frame_to_message(mp))
    # ... -> msgpack (a forward between msgpack channels copies values) -> JSON.
    mp2 = transcode(mp, "msgpack", "msgpack")
    assert_same(msg, spec_support.msgpack_frame_to_message(mp2))
    assert_same(msg, json.loads(transcode(mp2, "msgpack", "json")))


@FAST
@given(messages, st.booleans())
def test_round_trip_every_message_type(msg: dict[str, Any], ensure_ascii: bool) -> None:
    check_round_trip(msg, ensure_ascii)


@pytest.mark.slow
@SLOW
@given(messages, st.booleans())
def test_round_trip_every_message_type_long(msg: dict[str, Any], ensure_ascii: bool) -> None:
    check_round_trip(msg, ensure_ascii)


@FAST
@given(st.lists(doubles, min_size=1, max_size=16))
def test_round_trip_random_doubles(values: list[float]) -> None:
    check_round_trip({"id": "m", "type": "event", "eventId": "e", "payload": values}, True)


# Doubles that hypothesis and random sampling found changing by one unit in the last place on
# JSON -> msgpack (a float parser that is not correctly rounded), plus edge values.
FLOATS = [
    2.7715077941825975e-163,
    2.2790121708605243e274,
    -2.9205048131065683e-196,
    0.1,
    5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    -0.0,
    1e16,
    123456789.12345679,
]


@pytest.mark.parametrize("value", FLOATS, ids=repr)
def test_floats_survive_every_path_exactly(value: float) -> None:
    msg = {"id": "m", "type": "event", "eventId": "e", "payload": [value, {"v": value}]}
    check_round_trip(msg, True)


# ------------------------------------------------------------------------- b. differential

# What Python's json module can produce and other parsers disagree on: integers of any size,
# NaN and infinities, lone surrogates, and every formatting option.
py_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 1)
    | st.floats()
    | st.text(st.characters(codec=None), max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00"])
)
py_values = st.recursive(
    py_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
py_messages = _message_strategy(
    py_values, st.dictionaries(st.text(max_size=6), py_values, max_size=4)
)
dump_options = st.fixed_dictionaries(
    {
        "ensure_ascii": st.booleans(),
        "indent": st.sampled_from([None, 0, 2, "\t"]),
        "sort_keys": st.booleans(),
        "separators": st.sampled_from([None, (",", ":"), (" , ", " : ")]),
    }
)

_REJECTED = object()


def python_reads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # includes UnicodeDecodeError
        return _REJECTED


def check_differential(msg: dict[str, Any], options: dict[str, Any], target: str) -> None:
    data = json.dumps(msg, **options).encode("utf-8", "surrogatepass")
    expected = python_reads(data)
    try:
        out = _core.transcode(data, "json", target)
    except ProtocolError:
        return  # rejecting is always allowed
    assert expected is not _REJECTED, f"we accept what Python's json refuses: {data!r}"
    got = spec_support.validate_frame(out, target)
    assert same(expected, got), f"differential on {data!r}:\n  json: {expected!r}\n  ours: {got!r}"


@FAST
@given(py_messages, dump_options)
def test_json_to_json_reads_as_pythons_json(msg: dict[str, Any], options: dict[str, Any]) -> None:
    check_differential(msg, options, "json")


@FAST
@given(py_messages, dump_options)
def test_json_to_msgpack_reads_as_pythons_json(
    msg: dict[str, Any], options: dict[str, Any]
) -> None:
    check_differential(msg, options, "msgpack")


@pytest.mark.slow
@SLOW
@given(py_messages, dump_options, st.sampled_from(["json", "msgpack"]))
def test_differential_long(msg: dict[str, Any], options: dict[str, Any], target: str) -> None:
    check_differential(msg, options, target)


# One documented behaviour for each input JSON parsers disagree on (docs/limits.md):
#
# * duplicate keys in the envelope (any level of it): rejected, `invalid_message`;
# * duplicate keys inside an application value: carried as they are; every reader we talk to
#   (Python's json and msgpack, JavaScript's JSON.parse, serde_json) keeps the last one;
# * lone surrogates (`"\ud800"`): rejected, `malformed_message`, wherever they are -- msgpack
#   strings are UTF-8 and cannot carry them, and the envelope already refuses them;
# * integers beyond int64/uint64: JSON -> JSON keeps the digits exactly; JSON -> msgpack
#   (which cannot carry them) rejects the message -- never turned into a float;
# * `-0` is the integer 0 (as Python reads it), `-0.0` the float -0.0, on every path;
# * `NaN`, `Infinity`, `-Infinity` (emitted by Python's json by default, not JSON): rejected.

ENV = '{"id":"m","type":"event","eventId":"e","payload":%s}'


def event_with(payload_text: str) -> bytes:
    return (ENV % payload_text).encode()


REJECTED_JSON = {
    "duplicate id": b'{"id":"a","id":"b","type":"list.commands.request"}',
    "duplicate type": b'{"id":"a","type":"list.commands.request","type":"list.commands.request"}',
    "duplicate response.ok": (
        b'{"id":"a","type":"execute.command.response","thid":"t","response":{"ok":true,"ok":false}}'
    ),
    "duplicate command.id": (
        b'{"id":"a","type":"register.command.request","command":{"id":"x","id":"y"}}'
    ),
    "lone surrogate in id": b'{"id":"\\ud800","type":"list.commands.request"}',
    "lone surrogate in payload": event_with('"\\ud800"'),
    "lone low surrogate in payload": event_with('["a\\udfffb"]'),
    "lone surrogate in payload key": event_with('{"\\ud800":1}'),
    "lone surrogate in request": (
        b'{"id":"a","type":"execute.command.request","commandId":"c","request":{"s":"\\udbff"}}'
    ),
    "NaN": event_with("NaN"),
    "Infinity": event_with("Infinity"),
    "-Infinity": event_with("-Infinity"),
    "NaN in a list": event_with("[1, NaN]"),
    "Infinity in a request": (
        b'{"id":"a","type":"execute.command.request","commandId":"c","request":{"x":Infinity}}'
    ),
}


@pytest.mark.parametrize("target", ["json", "msgpack"])
@pytest.mark.parametrize("name", list(REJECTED_JSON))
def test_pinned_rejections(name: str, target: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _core.transcode(REJECTED_JSON[name], "json", target)
    code = info.value.args[0]
    assert code in ("invalid_message", "malformed_message"), info.value.args


def test_python_json_emits_nan_and_we_refuse_it() -> None:
    data = json.dumps({"id": "m", "type": "event", "eventId": "e", "payload": math.nan}).encode()
    assert b"NaN" in data  # Python's default, allow_nan=True
    with pytest.raises(ProtocolError):
        _core.transcode(data, "json", "json")


def test_duplicate_keys_in_msgpack_envelope_are_rejected() -> None:
    pack = msgpack.packb
    frame = b"\x83" + pack("id") + pack("a") + pack("id") + pack("b")
    frame += pack("type") + pack("list.commands.request")
    with pytest.raises(ProtocolError) as info:
        _core.transcode(frame, "msgpack", "json")
    assert info.value.args[0] == "invalid_message"


@pytest.mark.parametrize("target", ["json", "msgpack"])
def test_duplicate_keys_in_a_payload_last_wins(target: str) -> None:
    out = transcode(event_with('{"a":1,"b":0,"a":2}'), "json", target)
    for got in (
        json.loads(out) if target == "json" else spec_support.msgpack_frame_to_message(out),
        json.loads(transcode(out, target, "json")),
    ):
        assert_same({"a": 2, "b": 0}, got["payload"])


def test_valid_surrogate_pair_is_one_character() -> None:
    data = event_with('"\\ud83d\\ude00"')
    assert json.loads(transcode(data, "json", "json"))["payload"] == "\U0001f600"
    mp = transcode(data, "json", "msgpack")
    assert spec_support.msgpack_frame_to_message(mp)["payload"] == "\U0001f600"


BIG_INTS = [2**64, -(2**63) - 1, 10**30, -(10**30)]


@pytest.mark.parametrize("value", BIG_INTS)
def test_big_integer_json_is_refused_even_json_to_json(value: int) -> None:
    # No peer of the protocol carries integers beyond 64 bits (msgpack, the Rust and the
    # TypeScript implementations): refused wherever JSON enters, so a handler never runs on
    # a value that would fail on its way back.
    with pytest.raises(ProtocolError, match="out of range"):
        transcode(event_with(str(value)), "json", "json")


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 10**18])
def test_integers_at_the_64_bit_edges_are_exact(value: int) -> None:
    out = transcode(event_with(str(value)), "json", "json")
    assert_same(value, json.loads(out)["payload"])


@pytest.mark.parametrize("value", BIG_INTS)
def test_big_integer_json_to_msgpack_is_rejected_not_rounded(value: int) -> None:
    # msgpack integers stop at uint64 / int64: the only lossless answers are an exact value
    # (impossible) or a refusal. A float that happens to be near is a silent change of both
    # value and type.
    data = event_with(str(value))
    try:
        out = _core.transcode(data, "json", "msgpack")
    except ProtocolError:
        return
    got = spec_support.msgpack_frame_to_message(out)["payload"]
    raise AssertionError(f"{value} became {got!r} instead of being rejected")


@pytest.mark.parametrize("value", [2**64 - 1, 2**63, -(2**63), 2**63 - 1, 0, -1])
def test_integers_at_the_msgpack_range_edges_are_exact(value: int) -> None:
    data = event_with(str(value))
    mp = transcode(data, "json", "msgpack")
    assert_same(value, spec_support.msgpack_frame_to_message(mp)["payload"])
    assert_same(value, json.loads(transcode(mp, "msgpack", "json"))["payload"])


@pytest.mark.parametrize(
    ("text", "value"),
    [("-0.0", -0.0), ("-0", 0), ("[-0, -0.0, 0, 0.0]", [0, -0.0, 0, 0.0]), ("-0e0", -0.0)],
)
def test_negative_zero(text: str, value: Any) -> None:
    data = event_with(text)
    assert_same(value, json.loads(data)["payload"])  # what Python's json reads
    assert_same(value, json.loads(transcode(data, "json", "json"))["payload"])
    mp = transcode(data, "json", "msgpack")
    assert_same(value, spec_support.msgpack_frame_to_message(mp)["payload"])
    assert_same(value, json.loads(transcode(mp, "msgpack", "json"))["payload"])


# ------------------------------------------------------------------------- c. random trees

TTL = 0.25
MARGIN = 3.0  # a hang shows as a wait_for TimeoutError; no duration is ever asserted
COMMANDS = ["c0", "c1", "c2", "_p"]
CALLABLE = [*COMMANDS, "missing"]
EVENTS = ["e0", "e1", "_e"]


@dataclass
class Scenario:
    parents: list[int]  # parents[i] for registry i + 1
    encodings: list[str]
    ops: list[tuple[Any, ...]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(2, 6))
    parents = [draw(st.integers(0, i - 1)) for i in range(1, n)]
    encodings = [draw(st.sampled_from(["msgpack", "json"])) for _ in range(1, n)]
    reg = st.integers(0, n - 1)
    register = st.tuples(
        st.just("register"),
        reg,
        st.sampled_from(COMMANDS),
        st.sampled_from(["ok", "ok", "ok", "fail", "slow"]),
    )
    op = st.one_of(
        register,
        st.tuples(st.just("call"), reg, st.sampled_from(CALLABLE)),
        st.tuples(st.just("call"), reg, st.sampled_from(CALLABLE)),
        st.tuples(st.just("emit"), reg, st.sampled_from(EVENTS)),
        st.tuples(st.just("close"), st.integers(0, n - 2), st.booleans()),
        st.tuples(st.just("yield"), st.integers(1, 20)),
        # Wait for everything started so far: registrations land before later calls.
        st.tuples(st.just("barrier")),
    )
    # Some registrations settle first, so that calls find owners; more race with the rest.
    modes = st.sampled_from(["ok", "ok", "ok", "fail", "slow"])
    setup = [("register", draw(reg), cmd, draw(modes)) for cmd in COMMANDS]
    setup += draw(st.lists(register, max_size=4))
    ops = draw(st.lists(op, min_size=1, max_size=30))
    return Scenario(parents, encodings, [*setup, ("barrier",), *ops])


@dataclass
class Run:
    regs: list[CommandRegistry]
    parent_of: list[int]  # parent_of[i] for i >= 1; parent_of[0] unused
    links: list[tuple[Any, Any]] = field(default_factory=list)
    registrations: list[tuple[int, str, BaseException | None]] = field(default_factory=list)
    calls: list[tuple[int, str, int, Any]] = field(default_factory=list)
    received: list[list[tuple[str, int]]] = field(default_factory=list)
    emitted: list[tuple[int, str, int]] = field(default_factory=list)
    closed_any: bool = False


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Handlers that raise on purpose log tracebacks; keep the examples fast and quiet."""
    logger = logging.getLogger("cmd_ipc")
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)


def make_handler(owner: str, mode: str) -> Any:
    if mode == "slow":

        async def slow(nonce: int) -> list[Any]:
            await asyncio.sleep(TTL * 4)
            return [owner, nonce]

        return slow

    def handler(nonce: int) -> list[Any]:
        if mode == "fail":
            raise ValueError("handler failed on purpose")
        return [owner, nonce]

    return handler


def components(run: Run) -> list[set[int]]:
    """Registries still connected by open links, as sets of indexes."""
    n = len(run.regs)
    root = list(range(n))

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    for child, (parent_end, child_end) in enumerate(run.links, start=1):
        if not (parent_end.closed or child_end.closed):
            root[find(child)] = find(run.parent_of[child])
    groups: dict[int, set[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), set()).add(i)
    return list(groups.values())


async def play(scn: Scenario) -> None:
    n = len(scn.parents) + 1
    regs = [CommandRegistry("r0", request_ttl=TTL, event_ttl=60.0)]
    regs += [
        CommandRegistry(f"r{i}", router_channel=f"r{scn.parents[i - 1]}", request_ttl=TTL)
        for i in range(1, n)
    ]
    run = Run(regs, [0, *scn.parents], received=[[] for _ in range(n)])
    nonces = itertools.count()
    tasks: list[asyncio.Task[Any]] = []
    try:
        for i in range(1, n):
            run.links.append(
                await link(regs[scn.parents[i - 1]], regs[i], encoding=scn.encodings[i - 1])
            )

        def recorder(i: int, ev: str) -> Callable[[Any], None]:
            return lambda payload: run.received[i].append((ev, payload["nonce"]))

        for i, r in enumerate(regs):
            for ev in EVENTS:
                r.add_event_listener(ev, recorder(i, ev))

        async def register(i: int, cmd: str, mode: str) -> None:
            coro = regs[i].register_command(cmd, make_handler(regs[i].id, mode))
            try:
                await asyncio.wait_for(coro, TTL + MARGIN)
            except CommandError as e:
                run.registrations.append((i, cmd, e))
            else:
                run.registrations.append((i, cmd, None))

        async def call(i: int, cmd: str, nonce: int) -> None:
            coro = regs[i].execute_command(cmd, {"nonce": nonce})
            try:
                result: Any = await asyncio.wait_for(coro, TTL + MARGIN)
            except CommandError as e:
                result = e
            run.calls.append((i, cmd, nonce, result))

        for op in scn.ops:
            kind = op[0]
            if kind == "register":
                tasks.append(asyncio.ensure_future(register(op[1], op[2], op[3])))
            elif kind == "call":
                tasks.append(asyncio.ensure_future(call(op[1], op[2], next(nonces))))
            elif kind == "emit":
                i, ev, nonce = op[1], op[2], next(nonces)
                regs[i].emit_event(ev, {"nonce": nonce})
                run.emitted.append((i, ev, nonce))
                # Local listeners run before emit_event returns, exactly once.
                assert run.received[i].count((ev, nonce)) == 1
            elif kind == "close":
                end = run.links[op[1]][0 if op[2] else 1]
                await end.close()
                run.closed_any = True
            elif kind == "barrier":
                await asyncio.gather(*tasks)
            else:
                for _ in range(op[1]):
                    await asyncio.sleep(0)
        # Every call and registration ends (a hang raises TimeoutError out of wait_for,
        # which is not a CommandError and fails the example).
        await asyncio.gather(*tasks)
        await settle()
        check_invariants(run)
        # The tables empty once the slow handlers' forwards expire.
        await eventually(
            lambda: all(
                r.stats()["pending"] == 0 and r.stats()["pending_forwards"] == 0 for r in regs
            ),
            timeout=TTL + MARGIN,
        )
        if not run.closed_any:
            # Nothing was cut: every public event reached every registry.
            want = {(ev, nonce) for _, ev, nonce in run.emitted if not ev.startswith("_")}
            await eventually(lambda: all(want <= set(got) for got in run.received), MARGIN)
            check_invariants(run)
    finally:
        for t in tasks:
            t.cancel()
        for r in reversed(regs):
            await r.close()


def check_invariants(run: Run) -> None:
    regs = run.regs
    # Events: never twice in one registry; private events only where emitted.
    for i, got in enumerate(run.received):
        assert len(got) == len(set(got)), f"{regs[i].id} got an event twice: {got}"
    for i, ev, nonce in run.emitted:
        if ev.startswith("_"):
            where = [j for j, got in enumerate(run.received) if (ev, nonce) in got]
            assert where == [i], f"private event from r{i} delivered to {where}"

    # Commands: at most one owner per connected tree; an owner routes its command locally.
    owners: dict[str, set[int]] = {}
    for i, cmd, err in run.registrations:
        assert err is None or isinstance(err, CommandError), err
        if err is None:
            owners.setdefault(cmd, set()).add(i)
    for cmd, who in owners.items():
        for i in who:
            assert regs[i].route_of(cmd) == "local", (
                f"r{i} registered {cmd!r} successfully but routes it to {regs[i].route_of(cmd)!r}"
            )
        if cmd.startswith("_"):
            continue  # private: one per registry, never tree-wide
        for comp in components(run):
            both = sorted(who & comp)
            assert len(both) <= 1, f"{cmd!r} has owners {both} in one connected tree {comp}"
    for comp in components(run):
        for cmd in COMMANDS:
            if cmd.startswith("_"):
                continue
            local = sorted(i for i in comp if regs[i].route_of(cmd) == "local")
            assert len(local) <= 1, f"{cmd!r} is local in {local}, all connected"

    # Calls: a result from an owner, echoing this call's nonce, or a typed error.
    for i, cmd, nonce, result in run.calls:
        if isinstance(result, CommandError):
            if cmd == "missing":
                # (a timeout only if the machine stalled for a whole TTL)
                assert isinstance(
                    result, (NotFoundError, ChannelDisconnectedError, CommandTimeoutError)
                ), result
            elif cmd.startswith("_") and i not in owners.get(cmd, ()):
                assert isinstance(result, NotFoundError), result
            else:
                assert isinstance(
                    result,
                    (NotFoundError, InternalError, CommandTimeoutError, ChannelDisconnectedError),
                ), result
            continue
        assert cmd != "missing", f"a call of a command nobody has returned {result!r}"
        owner, echoed = result
        assert echoed == nonce, f"r{i} got the answer to another call: {result!r} for {nonce}"
        assert int(owner[1:]) in owners.get(cmd, set()), f"{owner} never owned {cmd!r}"
        if cmd.startswith("_"):
            assert owner == regs[i].id


@TREES
@given(scenarios())
def test_random_trees(scn: Scenario) -> None:
    with quiet_logs():
        asyncio.run(play(scn))


@pytest.mark.slow
@SLOW_TREES
@given(scenarios())
def test_random_trees_long(scn: Scenario) -> None:
    with quiet_logs():
        asyncio.run(play(scn))
