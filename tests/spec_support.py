"""Shared test support: the spec-v1 directory, schema validation, vector matchers, and a
recording channel that lets a test play the peer."""

from __future__ import annotations

import json
import os
import re
from collections import deque
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
from cmd_ipc import _core
from cmd_ipc.channels.base import Channel, Encoding, OnClose, OnFrame
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = Path(os.environ.get("CMD_IPC_SPEC_DIR", ROOT.parent / "shared" / "spec-v1")).resolve()


def spec_files(kind: str) -> list[Path]:
    """The vector files of ``conformance/<kind>``; an error (not a skip) if they are missing."""
    d = SPEC_DIR / "conformance" / kind
    files = sorted(d.glob("*.json"))
    if not files:
        raise RuntimeError(
            f"no spec-v1 vectors in {d}: put the spec beside the project (../shared/spec-v1) "
            "or point CMD_IPC_SPEC_DIR at it"
        )
    return files


def _schema_registry() -> tuple[Registry, dict[str, dict[str, Any]]]:
    by_name: dict[str, dict[str, Any]] = {}
    resources = []
    for f in sorted((SPEC_DIR / "schemas").glob("*.json")):
        schema = json.loads(f.read_text())
        by_name[f.name] = schema
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources), by_name


_REGISTRY: Registry | None = None
_SCHEMAS: dict[str, dict[str, Any]] = {}


def validator(schema_file: str = "message.json") -> jsonschema.protocols.Validator:
    """A draft 2020-12 validator for one spec schema, with cross-file ``$ref`` resolved."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY, by_name = _schema_registry()
        _SCHEMAS.update(by_name)
    return jsonschema.Draft202012Validator(_SCHEMAS[schema_file], registry=_REGISTRY)


_MESSAGE_VALIDATOR: jsonschema.protocols.Validator | None = None
validated_count = 0


def validate_message(msg: Any) -> None:
    """Asserts that ``msg`` (a decoded JSON message) is valid against ``message.json``."""
    global _MESSAGE_VALIDATOR, validated_count
    if _MESSAGE_VALIDATOR is None:
        _MESSAGE_VALIDATOR = validator("message.json")
    errors = list(_MESSAGE_VALIDATOR.iter_errors(msg))
    if errors:
        raise AssertionError(f"message violates the spec schema: {errors[0].message}: {msg!r}")
    validated_count += 1


def _unwrap(value: bytes) -> Any:
    return msgpack.unpackb(value, raw=False, strict_map_key=False)


def msgpack_frame_to_message(frame: bytes) -> Any:
    """Reads one of our msgpack frames with the ``msgpack`` package (independently of our
    codec): a map with the spec's field names whose application values are ``bin`` holding
    their own msgpack encoding."""
    msg = msgpack.unpackb(frame, raw=False)
    assert isinstance(msg, dict), f"msgpack frame is not a map: {msg!r}"
    for key in ("request", "payload"):
        if key in msg:
            assert isinstance(msg[key], bytes), f"{key} is not bin"
            msg[key] = _unwrap(msg[key])
    response = msg.get("response")
    if isinstance(response, dict) and "result" in response:
        response["result"] = _unwrap(response["result"])
    commands = list(msg.get("commands") or [])
    if isinstance(msg.get("command"), dict):
        commands.append(msg["command"])
    for c in commands:
        schema = c.get("schema") if isinstance(c, dict) else None
        if isinstance(schema, dict):
            for key in ("request", "response"):
                if key in schema:
                    schema[key] = _unwrap(schema[key])
    return msg


def validate_frame(frame: bytes, encoding: str) -> Any:
    """Decodes a frame our codec emitted and validates it; returns the decoded message."""
    msg = json.loads(frame) if encoding == "json" else msgpack_frame_to_message(frame)
    validate_message(msg)
    return msg


# ------------------------------------------------------------------------------ matchers

_UUID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I
)


def match(expected: Any, actual: Any, captures: dict[str, Any], path: str = "$") -> None:
    """Matches ``actual`` against a vector's ``expected`` (subset objects, full arrays,
    ``$match``/``$capture``/``$ref``/``$unordered``); raises AssertionError with the path."""
    if isinstance(expected, dict):
        if "$match" in expected:
            kind = expected["$match"]
            if kind == "uuid":
                assert isinstance(actual, str) and _UUID.match(actual), (
                    f"{path}: {actual!r} not a UUID"
                )
            elif kind == "any-string":
                assert isinstance(actual, str) and actual, (
                    f"{path}: {actual!r} not a non-empty string"
                )
            else:
                raise AssertionError(f"{path}: unknown matcher {kind!r}")
            return
        if "$capture" in expected:
            captures[expected["$capture"]] = actual
            return
        if "$ref" in expected:
            want = captures[expected["$ref"]]
            assert actual == want, f"{path}: {actual!r} != captured {want!r}"
            return
        if "$unordered" in expected:
            items = expected["$unordered"]
            assert isinstance(actual, list), f"{path}: expected a list, got {actual!r}"
            assert len(actual) == len(items), f"{path}: {len(actual)} items, expected {len(items)}"
            remaining = list(actual)
            for i, item in enumerate(items):
                for j, candidate in enumerate(remaining):
                    try:
                        match(item, candidate, dict(captures), f"{path}[~{i}]")
                    except AssertionError:
                        continue
                    match(item, candidate, captures, f"{path}[~{i}]")
                    del remaining[j]
                    break
                else:
                    raise AssertionError(f"{path}: no element matches {item!r} in {actual!r}")
            return
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for k, v in expected.items():
            assert k in actual, f"{path}: missing key {k!r} in {actual!r}"
            match(v, actual[k], captures, f"{path}.{k}")
        return
    if isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), (
            f"{path}: {len(actual)} items, expected {len(expected)}"
        )
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            match(e, a, captures, f"{path}[{i}]")
        return
    assert type(expected) is type(actual) or (
        isinstance(expected, (int, float))
        and isinstance(actual, (int, float))
        and not isinstance(expected, bool)
        and not isinstance(actual, bool)
    ), f"{path}: {actual!r} is not {expected!r}"
    assert expected == actual, f"{path}: {actual!r} != {expected!r}"


def substitute(value: Any, captures: dict[str, Any]) -> Any:
    """Replaces ``{"$ref": name}`` values by what was captured."""
    if isinstance(value, dict):
        if set(value) == {"$ref"}:
            return captures[value["$ref"]]
        return {k: substitute(v, captures) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, captures) for v in value]
    return value


def evaluate(returns: Any, request: dict[str, Any] | None) -> Any:
    """Evaluates a ``localCommands[].returns`` value (``{"$expr": "request.a + request.b"}``)."""
    if not (isinstance(returns, dict) and "$expr" in returns):
        return returns
    tokens = returns["$expr"].split()

    def operand(tok: str) -> Any:
        if tok.startswith("request."):
            return (request or {})[tok[len("request.") :]]
        return float(tok) if "." in tok else int(tok)

    acc = operand(tokens[0])
    for op, tok in zip(tokens[1::2], tokens[2::2], strict=False):
        val = operand(tok)
        if op == "+":
            acc = acc + val
        elif op == "-":
            acc = acc - val
        elif op == "*":
            acc = acc * val
        else:
            raise ValueError(f"unknown operator {op!r}")
    return acc


# ------------------------------------------------------------------------------ channels


class RecordingChannel(Channel):
    """A channel whose peer is the test: it records what the registry sends (validating each
    frame against the spec schemas) and lets the test inject frames or close it."""

    def __init__(self, id: str, encoding: Encoding = "json") -> None:
        super().__init__(id, encoding)
        self.sent: deque[Any] = deque()
        self.raw: list[bytes] = []
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self.closed = False

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        self._on_frame, self._on_close = on_frame, on_close

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        self.raw.append(frame)
        self.sent.append(validate_frame(frame, self.encoding))

    def inject(self, message: Any) -> None:
        """Delivers a message (a dict, or raw bytes) as if the peer had sent it."""
        assert self._on_frame is not None, "channel not started"
        if isinstance(message, (bytes, bytearray)):
            frame = bytes(message)
        elif self.encoding == "json":
            frame = json.dumps(message).encode()
        else:
            frame = _core.transcode(json.dumps(message).encode(), "json", "msgpack")
        self._on_frame(frame)

    def peer_close(self, reason: str = "peer went away") -> None:
        """Closes the channel as if the peer had gone away."""
        if not self.closed:
            self.closed = True
            assert self._on_close is not None
            self._on_close(reason)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close(None)

    def pop(self) -> Any:
        """The oldest message sent and not yet examined."""
        assert self.sent, f"nothing was sent on channel {self.id!r}"
        return self.sent.popleft()
