"""Typed commands (cmd_ipc.commands): schemas derived from type hints, validation of requests
and results, typed events, service classes, and the messages of the errors a user meets."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import enum
import logging
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional, Union

import cmd_ipc
import jsonschema
import pytest
from cmd_ipc import (
    CommandRegistry,
    DuplicateCommandError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    command,
)
from cmd_ipc.commands import to_wire
from helpers import link, registries, settle
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]


# ---------------------------------------------------------------------------------- types


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    zip: str


class User(BaseModel):
    id: int
    name: str
    address: Address | None = None
    tags: list[str] = []


@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0


class Span(TypedDict):
    start: int
    end: int


class Record(BaseModel):
    when: datetime.datetime
    color: Color
    ref: uuid.UUID
    amount: decimal.Decimal
    blob: bytes
    point: Point


WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
REF = uuid.UUID("12345678-1234-5678-1234-567812345678")


def record() -> Record:
    return Record(
        when=WHEN,
        color=Color.GREEN,
        ref=REF,
        amount=decimal.Decimal("1.50"),
        blob=b"\x00\xff",
        point=Point(1.0, 2.0),
    )


#: What ``record()`` is on the wire: JSON-compatible, bytes kept.
RECORD_WIRE = {
    "when": "2024-05-06T07:08:09Z",
    "color": "green",
    "ref": str(REF),
    "amount": "1.50",
    "blob": b"\x00\xff",
    "point": {"x": 1.0, "y": 2.0},
}


async def pair(make: Make, *, encoding: str = "msgpack") -> tuple[CommandRegistry, CommandRegistry]:
    """A root ``main`` and a worker ``w`` under it, joined by an in-memory channel."""
    root = make("main")
    worker = make("w", router_channel="main")
    await link(root, worker, encoding=encoding)
    return root, worker


def schema_of(registry: CommandRegistry, command_id: str) -> dict[str, Any] | None:
    for c in registry.list_commands():
        if c["id"] == command_id:
            return c.get("schema")
    raise AssertionError(f"{command_id!r} not listed")


def valid(schema: dict[str, Any], value: Any) -> bool:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema).is_valid(value)


# ---------------------------------------------------------------------------------- 1. schemas


async def test_schema_from_type_hints(registries: Make) -> None:
    r = registries("main")

    @r.command("users.get", description="Gets a user")
    def get(user_id: int, verbose: bool = False) -> User:
        return User(id=user_id, name="ada")

    listed = [c for c in r.list_commands() if c["id"] == "users.get"]
    assert listed[0]["description"] == "Gets a user"
    schema = listed[0]["schema"]
    request, response = schema["request"], schema["response"]
    assert request["type"] == "object"
    assert request["title"] == "UsersGetRequest"
    assert set(request["properties"]) == {"user_id", "verbose"}
    assert request["properties"]["user_id"]["type"] == "integer"
    assert request["properties"]["verbose"] == {
        "type": "boolean",
        "title": "Verbose",
        "default": False,
    }
    assert request["required"] == ["user_id"]
    assert request["additionalProperties"] is False
    assert response["title"] == "User" and set(response["required"]) == {"id", "name"}
    # Both are valid JSON Schemas that describe what travels.
    assert valid(request, {"user_id": 1}) and valid(request, {"user_id": 1, "verbose": True})
    assert not valid(request, {"verbose": True}) and not valid(request, {"user_id": 1, "x": 0})
    assert valid(response, await r.execute_command("users.get", {"user_id": 3}))


@pytest.mark.parametrize(
    ("annotation", "good", "converted", "bad"),
    [
        (User, {"id": "1", "name": "a"}, User(id=1, name="a"), {"id": "x"}),
        (Point, {"x": 1}, Point(1.0, 0.0), {"y": 1}),
        (Span, {"start": "1", "end": 2}, {"start": 1, "end": 2}, {"start": 1}),
        (Color, "red", Color.RED, "blue"),
        (Optional[int], None, None, "x"),  # noqa: UP045 (the typing form is tested)
        (Union[int, str], "a", "a", [1]),  # noqa: UP007 (the typing form is tested)
        (list[int], [1, "2"], [1, 2], [1, "x"]),
        (dict[str, float], {"a": 1}, {"a": 1.0}, {"a": "x"}),
        (datetime.datetime, "2024-05-06T07:08:09Z", WHEN, "not a date"),
        (bytes, b"\x00\x01", b"\x00\x01", 3),
        (Literal["a", "b"], "b", "b", "c"),
        (Annotated[int, Field(gt=0, description="positive")], 3, 3, 0),
    ],
    ids=[
        "model",
        "dataclass",
        "typeddict",
        "enum",
        "optional",
        "union",
        "list",
        "dict",
        "datetime",
        "bytes",
        "literal",
        "annotated",
    ],
)
async def test_each_kind_of_type_is_described_and_validated(
    registries: Make, annotation: Any, good: Any, converted: Any, bad: Any
) -> None:
    r = registries("main")
    got: list[Any] = []

    def handler(value: Any) -> None:
        got.append(value)

    handler.__annotations__ = {"value": annotation, "return": "None"}
    r.command("typed")(handler)
    request_schema = schema_of(r, "typed")["request"]  # type: ignore[index]
    jsonschema.Draft202012Validator.check_schema(request_schema)
    assert "value" in request_schema["properties"]

    assert await r.execute_command("typed", {"value": good}) is None
    assert got == [converted]
    assert type(got[0]) is type(converted)
    with pytest.raises(InvalidRequestError) as info:
        await r.execute_command("typed", {"value": bad})
    assert "value" in info.value.message
    assert got == [converted]  # the handler did not run


async def test_response_schemas(registries: Make) -> None:
    r = registries("main")

    @r.command("a")
    async def a() -> list[Point]:
        return []

    @r.command("b")
    def b() -> None:
        return None

    @r.command("c")
    def c():  # type: ignore[no-untyped-def]
        return 1

    @r.command("d")
    def d() -> Any:
        return 1

    assert schema_of(r, "a")["response"]["type"] == "array"  # type: ignore[index]
    assert schema_of(r, "b")["response"] == {"type": "null"}  # type: ignore[index]
    # Unannotated or Any: only the request is described.
    assert set(schema_of(r, "c")) == set(schema_of(r, "d")) == {"request"}  # type: ignore[arg-type]


async def test_whole_request_form_and_var_kwargs(registries: Make) -> None:
    r = registries("main")
    got: list[Any] = []

    @r.command("whole.raw")
    def raw(request, /) -> int:  # type: ignore[no-untyped-def]
        got.append(request)
        return len(request)

    @r.command("whole.typed")
    def typed(user: User, /) -> str:
        got.append(user)
        return user.name

    @r.command("kwargs")
    def kwargs(**fields: Any) -> int:
        got.append(fields)
        return len(fields)

    # Unannotated whole request, **kwargs: no request schema, nothing checked.
    assert set(schema_of(r, "whole.raw")) == {"response"}  # type: ignore[arg-type]
    assert set(schema_of(r, "kwargs")) == {"response"}  # type: ignore[arg-type]
    assert await r.execute_command("whole.raw", {"anything": 1}) == 1
    assert await r.execute_command("kwargs", {"p": 1, "q": 2}) == 2
    # Annotated with a model: the model is the request.
    assert schema_of(r, "whole.typed")["request"]["title"] == "User"  # type: ignore[index]
    assert await r.execute_command("whole.typed", {"id": 1, "name": "ada"}) == "ada"
    assert got[-1] == User(id=1, name="ada")
    with pytest.raises(InvalidRequestError) as info:
        await r.execute_command("whole.typed")
    assert "id: Field required" in info.value.message
    assert "name: Field required" in info.value.message


async def test_explicit_schema_wins_key_by_key(registries: Make) -> None:
    r = registries("main")
    custom = {"type": "object", "description": "mine"}

    @r.command("both", schema={"request": custom, "response": {"type": "integer"}})
    def both(a: int) -> int:
        return a

    @r.command("resp", schema={"response": {"type": "number"}})
    def resp(a: int) -> int:
        return a

    assert schema_of(r, "both") == {"request": custom, "response": {"type": "integer"}}
    derived = schema_of(r, "resp")
    assert derived is not None
    assert derived["response"] == {"type": "number"}
    assert derived["request"]["properties"]["a"]["type"] == "integer"
    # Validation still follows the type hints.
    with pytest.raises(InvalidRequestError):
        await r.execute_command("both", {"a": "x"})


async def test_types_defined_in_a_function_are_resolved(registries: Make) -> None:
    # This module uses `from __future__ import annotations`: "Local" is a string that only the
    # registering function's locals can resolve.
    r = registries("main")

    class Local(BaseModel):
        n: int

    @r.command("local.decorated")
    def decorated(item: Local) -> Local:
        return Local(n=item.n + 1)

    def registered(item: Local) -> Local:
        return Local(n=item.n * 10)

    await r.register_command("local.registered", registered, validate=True)
    assert await r.execute_command("local.decorated", {"item": {"n": 1}}) == {"n": 2}
    assert await r.execute_command("local.registered", {"item": {"n": 2}}) == {"n": 20}


async def test_types_that_cannot_be_described_fail_at_registration(registries: Make) -> None:
    r = registries("main")

    class Opaque:  # not something pydantic can validate or describe
        pass

    def takes(thing: Opaque) -> int:
        return 1

    with pytest.raises(TypeError) as info:
        r.command("opaque")(takes)
    msg = str(info.value)
    assert "'thing'" in msg and "opaque" in msg and "validate=False" in msg
    with pytest.raises(TypeError, match="cannot resolve the type hints"):

        @r.command("unresolved")
        def unresolved(x: NoSuchType) -> int:  # type: ignore[name-defined]  # noqa: F821
            return 1

    with pytest.raises(TypeError, match="positional-only"):

        @r.command("posonly")
        def posonly(a: int, b: int, /) -> int:
            return a + b

    # Nothing was registered; with validation off the same handler registers untyped.
    assert r.list_commands() == []
    r.command("opaque", validate=False)(takes)
    assert await r.execute_command("opaque", {"thing": 1}) == 1


# ---------------------------------------------------------------------------------- 2. validation


@pytest.mark.parametrize("is_async", [False, True])
async def test_invalid_request_answered_with_field_errors_handler_not_run(
    registries: Make, is_async: bool
) -> None:
    r = registries("main")
    ran: list[Any] = []

    if is_async:

        @r.command("users.create")
        async def create(user: User, notify: bool = False) -> int:
            ran.append(user)
            return user.id

    else:

        @r.command("users.create")
        def create(user: User, notify: bool = False) -> int:  # type: ignore[misc]
            ran.append(user)
            return user.id

    bad = {
        "user": {"id": "x", "address": {"street": "s"}, "tags": ["a", 2]},
        "notify": "maybe",
        "extra": 1,
    }
    with pytest.raises(InvalidRequestError) as info:
        await r.execute_command("users.create", bad)
    msg = info.value.message
    assert msg.startswith("invalid request for 'users.create': 6 field errors: ")
    for part in (
        "user.id: Input should be a valid integer, unable to parse string as an integer (got 'x')",
        "user.name: Field required",
        "user.address.zip: Field required",
        "user.tags[1]: Input should be a valid string (got 2)",
        "notify: Input should be a valid boolean",
        "extra: Unexpected field",
    ):
        assert part in msg, msg
    for missing in (None, {}):
        with pytest.raises(InvalidRequestError, match="user: Field required"):
            await r.execute_command("users.create", missing)
    assert ran == []
    # Lax conversion: strings to numbers, dicts to models.
    assert await r.execute_command("users.create", {"user": {"id": "7", "name": "n"}}) == 7
    assert ran == [User(id=7, name="n")]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_validation_across_an_in_memory_hop(registries: Make, encoding: str) -> None:
    root, worker = await pair(registries, encoding=encoding)
    ran: list[Any] = []

    @worker.command("geo.move")
    def move(point: Point, dx: float) -> Point:
        ran.append(point)
        return Point(point.x + dx, point.y)

    await worker.ready()
    with pytest.raises(InvalidRequestError) as info:
        await root.execute_command("geo.move", {"point": {"y": 1}, "dx": "far"})
    assert "point.x: Field required" in info.value.message
    assert "dx: Input should be a valid number" in info.value.message
    assert ran == []
    assert await root.execute_command("geo.move", {"point": {"x": 1}, "dx": 2}) == {
        "x": 3.0,
        "y": 0.0,
    }
    assert ran == [Point(1.0, 0.0)]
    # The schema registered over the channel is what the root lists.
    assert schema_of(root, "geo.move") == schema_of(worker, "geo.move")
    assert schema_of(root, "geo.move")["request"]["required"] == ["point", "dx"]  # type: ignore[index]


class Stamp(BaseModel):
    when: datetime.datetime
    color: Color
    ref: uuid.UUID
    point: Point


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_result_models_arrive_as_json_compatible_data(
    registries: Make, encoding: str
) -> None:
    root, worker = await pair(registries, encoding=encoding)

    @worker.command("stamp.get")
    async def stamp() -> Stamp:
        return Stamp(when=WHEN, color=Color.RED, ref=REF, point=Point(1, 2))

    @worker.command("rec.many")
    def many() -> list[Record]:
        return [record(), record()]

    @root.command("rec.local")
    def local() -> Record:
        return record()

    await worker.ready()
    assert await root.execute_command("rec.local") == RECORD_WIRE
    assert await root.execute_command("stamp.get") == {
        "when": "2024-05-06T07:08:09Z",
        "color": "red",
        "ref": str(REF),
        "point": {"x": 1.0, "y": 2.0},
    }
    if encoding == "msgpack":  # bytes stay bytes (JSON cannot carry them at all)
        assert await root.execute_command("rec.many") == [RECORD_WIRE, RECORD_WIRE]
    response = schema_of(root, "rec.local")["response"]  # type: ignore[index]
    assert valid(response, {**RECORD_WIRE, "blob": ""})


async def test_results_are_checked_against_the_return_type(registries: Make) -> None:
    r = registries("main")

    @r.command("wrong")
    def wrong() -> int:
        return "many"  # type: ignore[return-value]

    @r.command("coerced")
    def coerced() -> User:
        return {"id": "1", "name": "from a dict"}  # type: ignore[return-value]

    @r.command("tuple")
    def as_tuple() -> list[int]:
        return (1, 2)  # type: ignore[return-value]

    @r.command("none")
    def none() -> User | None:
        return None

    with pytest.raises(InternalError) as info:
        await r.execute_command("wrong")
    assert "'wrong'" in info.value.message
    assert "does not match the return type int" in info.value.message
    assert "(got 'many')" in info.value.message
    assert await r.execute_command("coerced") == {
        "id": 1,
        "name": "from a dict",
        "address": None,
        "tags": [],
    }
    assert await r.execute_command("tuple") == [1, 2]
    assert await r.execute_command("none") is None


async def test_validate_false_and_untyped_register_command(registries: Make) -> None:
    r = registries("main")
    got: list[Any] = []

    def add(a: int, b: int) -> int:
        got.append((a, b))
        return a + b

    @r.command("off", validate=False)
    def off(a: int, b: int) -> int:
        return add(a, b)

    await r.register_command("plain", add)
    await r.register_command("plain.schema", add, schema={"response": {"type": "integer"}})
    await r.register_command("opted.in", add, validate=True)
    # Nothing derived, nothing checked: the strings reach the handler as they are.
    assert schema_of(r, "off") is None and schema_of(r, "plain") is None
    assert schema_of(r, "plain.schema") == {"response": {"type": "integer"}}
    assert await r.execute_command("off", {"a": "1", "b": "2"}) == "12"
    assert await r.execute_command("plain", {"a": "1", "b": "2"}) == "12"
    assert await r.execute_command("plain.schema", {"a": "1", "b": "2"}) == "12"
    # A missing field is still refused by the plain path (the handler's signature).
    with pytest.raises(InvalidRequestError):
        await r.execute_command("plain", {"a": 1})
    assert await r.execute_command("opted.in", {"a": "1", "b": "2"}) == 3
    assert got == [("1", "2"), ("1", "2"), ("1", "2"), (1, 2)]
    assert schema_of(r, "opted.in")["request"]["required"] == ["a", "b"]  # type: ignore[index]


async def test_register_command_honours_the_command_mark(registries: Make) -> None:
    r = registries("main")

    @command("marked", description="from the mark")
    def marked(n: int) -> int:
        return n * 2

    @command("marked.off", validate=False)
    def marked_off(n: int) -> int:
        return n * 2

    await r.register_command("marked", marked)
    await r.register_command("marked.off", marked_off)
    assert await r.execute_command("marked", {"n": "2"}) == 4
    assert await r.execute_command("marked.off", {"n": "2"}) == "22"
    listed = {c["id"]: c for c in r.list_commands()}
    assert listed["marked"]["description"] == "from the mark"
    assert "schema" in listed["marked"] and "schema" not in listed["marked.off"]


async def test_requests_and_results_may_hold_models_without_validation(
    registries: Make,
) -> None:
    # The encoder's fallback (to_wire) makes models, dataclasses, enums and datetimes travel as
    # JSON-compatible data even on the untyped path.
    root, worker = await pair(registries)
    await worker.register_command("echo", lambda value: value)
    await worker.register_command("rec", record)
    sent = {"value": {"user": User(id=1, name="a"), "at": WHEN, "c": Color.RED, "p": Point(1, 2)}}
    assert await root.execute_command("echo", sent) == {
        "user": {"id": 1, "name": "a", "address": None, "tags": []},
        "at": "2024-05-06T07:08:09Z",
        "c": "red",
        "p": {"x": 1, "y": 2},
    }
    assert await root.execute_command("rec") == RECORD_WIRE
    with pytest.raises(TypeError, match="cannot be serialised"):
        await root.execute_command("echo", {"value": object()})


def test_to_wire() -> None:
    assert to_wire(Color.GREEN) == "green"
    assert to_wire(WHEN) == "2024-05-06T07:08:09Z"
    assert to_wire(datetime.date(2024, 1, 2)) == "2024-01-02"
    assert to_wire(REF) == str(REF)
    assert sorted(to_wire({3, 1})) == [1, 3]
    assert to_wire(Point(1, 2)) == {"x": 1, "y": 2}
    assert to_wire(record()) == {
        **RECORD_WIRE,
        "when": WHEN,
        "color": Color.GREEN,
        "ref": REF,
        "amount": decimal.Decimal("1.50"),
    }
    with pytest.raises(TypeError, match="object"):
        to_wire(object())


# ---------------------------------------------------------------------------------- 3. events


async def test_typed_listener_converts_and_skips_invalid_payloads(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    r = registries("main")
    typed: list[Any] = []
    raw: list[Any] = []

    @r.on("user.updated")
    def on_user(user: User) -> None:
        typed.append(user)

    @r.on("user.updated")
    async def on_user_async(user: User) -> None:
        typed.append(("async", user))

    r.add_event_listener("user.updated", raw.append)

    r.emit_event("user.updated", {"id": "1", "name": "a"})
    with caplog.at_level(logging.WARNING, logger="cmd_ipc"):
        r.emit_event("user.updated", {"id": "x"})
    await settle()
    assert typed == [User(id=1, name="a"), ("async", User(id=1, name="a"))]
    assert raw == [{"id": "1", "name": "a"}, {"id": "x"}]  # untyped listeners see it all
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "on_user" in warnings[0] and "'user.updated'" in warnings[0]
    assert "id: Input should be a valid integer" in warnings[0]
    assert "name: Field required" in warnings[0]


async def test_typed_events_across_a_hop_and_model_payloads(registries: Make) -> None:
    root, worker = await pair(registries)
    got: list[Any] = []
    raw: list[Any] = []
    arrived = asyncio.Event()

    @root.on("rec.made")
    def on_record(rec: Record) -> None:
        got.append(rec)
        arrived.set()

    root.add_event_listener("rec.made", raw.append)
    worker.emit_event("rec.made", record())  # a model payload
    await asyncio.wait_for(arrived.wait(), 5)
    assert got == [record()]
    assert raw == [RECORD_WIRE]

    points: list[Any] = []
    root.add_event_listener("point", points.append, validate=True)  # untyped: no conversion
    unsubscribe = root.add_event_listener("point", lambda p: points.append(("l", p)))

    def as_point(p: Point) -> None:
        points.append(p)

    root.add_event_listener("point", as_point, validate=True)
    root.emit_event("point", Point(1, 2))
    assert points == [{"x": 1, "y": 2}, ("l", {"x": 1, "y": 2}), Point(1, 2)]
    unsubscribe()
    root.remove_event_listener("point", as_point)
    root.emit_event("point", Point(3, 4))
    assert points[3:] == [{"x": 3, "y": 4}]

    @root.on("off", validate=False)
    def off(p: Point) -> None:
        points.append(p)

    root.emit_event("off", {"x": "nope"})
    assert points[-1] == {"x": "nope"}


# ---------------------------------------------------------------------------------- 4. services


class Maths:
    """A service: its marked methods become commands bound to the instance."""

    def __init__(self, scale: int = 1) -> None:
        self.scale = scale
        self.calls = 0

    @command("math.add", description="Adds two numbers")
    def add(self, a: int, b: int) -> int:
        self.calls += 1
        return (a + b) * self.scale

    @command("math.mean")
    async def mean(self, values: list[float]) -> float:
        await asyncio.sleep(0)
        return sum(values) / len(values)

    @command("math.raw", validate=False)
    def raw(self, a: Any) -> Any:
        return a

    @staticmethod
    @command("math.pi")
    def pi() -> float:
        return 3.14

    def helper(self) -> None:
        """Not marked: not a command."""


class MoreMaths(Maths):
    def add(self, a: int, b: int) -> int:  # overridden without the mark: no longer a command
        return 0

    @command("math.neg")
    def neg(self, a: int) -> int:
        return -a


async def test_service_register_call_unregister(registries: Make) -> None:
    root, worker = await pair(registries)
    service = Maths(scale=10)
    ids = await worker.register_service(service)
    assert sorted(ids) == ["math.add", "math.mean", "math.pi", "math.raw"]
    assert await root.execute_command("math.add", {"a": "1", "b": 2}) == 30
    assert service.calls == 1
    assert await root.execute_command("math.mean", {"values": [1, 2]}) == 1.5
    assert await root.execute_command("math.pi") == 3.14
    assert await root.execute_command("math.raw", {"a": "1"}) == "1"
    with pytest.raises(InvalidRequestError, match="values: Field required"):
        await root.execute_command("math.mean", {})
    listed = {c["id"]: c for c in root.list_commands()}
    assert listed["math.add"]["description"] == "Adds two numbers"
    # `self` is not part of the request.
    assert set(listed["math.add"]["schema"]["request"]["properties"]) == {"a", "b"}
    assert "schema" not in listed["math.raw"]

    assert sorted(worker.unregister_service(service)) == sorted(ids)
    for cid in ids:
        with pytest.raises(NotFoundError):
            await worker.execute_command(cid)
    assert worker.unregister_service(service) == []
    # Registered again (a restart): accepted, from the same channel.
    assert sorted(await worker.register_service(service)) == sorted(ids)


async def test_service_subclass_and_errors(registries: Make) -> None:
    r = registries("main")
    more = MoreMaths()
    assert sorted(await r.register_service(more)) == [
        "math.mean",
        "math.neg",
        "math.pi",
        "math.raw",
    ]
    with pytest.raises(ValueError, match="already registered"):
        await r.register_service(more)
    with pytest.raises(ValueError, match="no method marked"):
        await r.register_service(object())
    # A second instance collides on every id but math.add: nothing of it stays registered.
    with pytest.raises(DuplicateCommandError):
        await r.register_service(Maths())
    with pytest.raises(NotFoundError):
        await r.execute_command("math.add", {"a": 1, "b": 2})
    assert await r.execute_command("math.neg", {"a": 2}) == -2
    # unregister_service leaves alone a command another handler took over since.
    r.unregister_command("math.pi")
    await r.register_command("math.pi", lambda: 3.0)
    assert "math.pi" not in r.unregister_service(more)
    assert await r.execute_command("math.pi") == 3.0


def test_service_blocking_twin() -> None:
    with CommandRegistry("main") as r:
        ids = r.register_service_sync(Maths(scale=2))
        assert "math.add" in ids
        assert r.execute_command_sync("math.add", {"a": 1, "b": 2}) == 6
        with pytest.raises(InvalidRequestError):
            r.execute_command_sync("math.add", {"a": "one", "b": 2})
        r.register_command_sync("sync.typed", lambda: 1)
        assert r.execute_command_sync("sync.typed") == 1


def test_command_is_exported() -> None:
    assert cmd_ipc.command is command
    assert "command" in cmd_ipc.__all__
    with pytest.raises(ValueError):
        command("")


# ---------------------------------------------------------------------------------- workers


async def test_typed_worker_over_a_native_channel(registries: Make) -> None:
    main = registries("main")
    await main.spawn_worker("typed-worker", "worker_targets:typed")
    schema = schema_of(main, "typed.make_item")
    assert schema is not None
    assert schema["request"]["required"] == ["name"]
    assert schema["response"]["title"] == "Item"
    item = await main.execute_command("typed.make_item", {"name": "bolt", "qty": "3"})
    assert item == {"name": "bolt", "qty": 3, "made": "2024-05-06T07:08:09Z", "blob": b"bolt"}
    with pytest.raises(InvalidRequestError) as info:
        await main.execute_command("typed.make_item", {"qty": "many"})
    assert "name: Field required" in info.value.message
    assert "qty: Input should be a valid integer" in info.value.message
    assert await main.execute_command("typed.calls") == 1


# ---------------------------------------------------------------------------------- 8. messages


async def test_error_messages_say_what_to_do(registries: Make) -> None:
    root, worker = await pair(registries)

    @worker.command("users.get")
    def get(user_id: int) -> int:
        return user_id

    await worker.ready()
    with pytest.raises(NotFoundError) as nf:
        await root.execute_command("users.gte", {"user_id": 1})
    assert "'users.gte'" in nf.value.message and "did you mean users.get" in nf.value.message

    with pytest.raises(DuplicateCommandError) as dup:
        await root.register_command("users.get", lambda: 0)
    assert "channel 'w'" in dup.value.message  # the owner, where the registry knows it
    assert "choose another id" in dup.value.message

    with pytest.raises(DuplicateCommandError) as local:
        worker.command("users.get")(lambda: 0)
    assert "unregister" in local.value.message

    with pytest.raises(InvalidRequestError) as bad:
        await root.execute_command("users.get", {"user_id": "me"})
    assert bad.value.message == (
        "invalid request for 'users.get': 1 field error: user_id: Input should be a valid "
        "integer, unable to parse string as an integer (got 'me')"
    )
