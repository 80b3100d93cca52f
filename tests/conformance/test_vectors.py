"""Runs the 13 behaviour and 9 encoding vectors of ../shared/spec-v1 (see its README).

Each vector is one test; a failure names ``<file>:<step index>``. Every message the registry
sends is validated against the spec schemas by :class:`spec_support.RecordingChannel`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cmd_ipc import CommandError, CommandRegistry, _core
from spec_support import (
    RecordingChannel,
    evaluate,
    match,
    spec_files,
    substitute,
    validate_frame,
    validator,
)

BEHAVIOR = spec_files("behavior")
ENCODING = spec_files("encoding")


def test_all_vectors_present() -> None:
    assert len(BEHAVIOR) == 13
    assert len(ENCODING) == 9


async def _settle() -> None:
    # Let call_soon callbacks and freshly created tasks run.
    for _ in range(5):
        await asyncio.sleep(0)


def _start_call(registry: CommandRegistry, trigger: dict[str, list[Any]]) -> asyncio.Task[Any]:
    ((api, args),) = trigger.items()

    async def run() -> Any:
        if api == "executeCommand":
            return await registry.execute_command(*args)
        if api == "emitEvent":
            registry.emit_event(*args)
            return None
        if api == "registerCommand":
            return await registry.register_command(args[0], lambda request, /: None)
        if api == "listCommands":
            return registry.list_commands()
        raise AssertionError(f"unknown trigger {api!r}")

    return asyncio.ensure_future(run())


async def _run_behavior(path: Path) -> None:
    vector = json.loads(path.read_text())
    setup = vector["setup"]
    cfg = setup["registry"]
    registry = CommandRegistry(cfg["id"], router_channel=cfg.get("routerChannel"))
    invocations: dict[str, list[Any]] = {}
    channels: dict[str, RecordingChannel] = {}
    captures: dict[str, Any] = {}
    last_call: asyncio.Task[Any] | None = None
    async with registry:
        for event_id in cfg.get("localEventListeners", []):
            invocations[event_id] = []
            registry.add_event_listener(event_id, invocations[event_id].append)
        for cmd in cfg.get("localCommands", []):
            returns = cmd.get("returns")

            def handler(request: Any, /, returns: Any = returns) -> Any:
                return evaluate(returns, request)

            await registry.register_command(cmd["id"], handler, cmd.get("description"))
        for peer in setup["peers"]:
            ch = RecordingChannel(peer["channelId"])
            channels[ch.id] = ch
            await registry.register_channel(ch)
            first = ch.pop()
            assert first["type"] == "list.commands.request", first
        steps = vector["steps"]
        for i, step in enumerate(steps):
            where = f"{path.name}:{i}"
            direction = step["direction"]
            try:
                if direction == "inbound":
                    channels[step["from"]].inject(substitute(step["message"], captures))
                    await _settle()
                elif direction == "outbound":
                    ch = channels[step["to"]]
                    assert ch.sent, f"expected a message on {ch.id!r}, none was sent"
                    match(step["expected"], ch.pop(), captures)
                elif direction == "assert-no-outbound":
                    ch = channels[step["to"]]
                    assert not ch.sent, f"unexpected message on {ch.id!r}: {ch.sent[0]!r}"
                elif direction == "local-call":
                    last_call = _start_call(registry, step["trigger"])
                    await _settle()
                elif direction == "local-result":
                    assert last_call is not None, "local-result without a local-call"
                    call, last_call = last_call, None
                    if "expectedError" in step:
                        with pytest.raises(CommandError) as info:
                            await asyncio.wait_for(call, 2)
                        err = info.value
                        match(
                            step["expectedError"],
                            {"code": err.code, "message": err.message},
                            captures,
                        )
                    else:
                        value = await asyncio.wait_for(call, 2)
                        if "expected" in step:
                            match(step["expected"], value, captures)
                elif direction == "assert-local-listener":
                    calls = invocations[step["eventId"]]
                    assert len(calls) == step["invocations"], (
                        f"listener of {step['eventId']!r} ran {len(calls)} times, "
                        f"expected {step['invocations']}"
                    )
                    if "lastPayload" in step:
                        match(step["lastPayload"], calls[-1], captures)
                elif direction == "close-channel":
                    channels[step["channel"]].peer_close()
                    await _settle()
                else:
                    raise AssertionError(f"unknown direction {direction!r}")
            except AssertionError as e:
                pytest.fail(f"{where} ({direction}): {e}", pytrace=False)
        if steps and steps[-1]["direction"] != "assert-no-outbound":
            for ch in channels.values():
                assert not ch.sent, f"{path.name}: unasserted message on {ch.id!r}: {ch.sent[0]!r}"


@pytest.mark.parametrize("path", BEHAVIOR, ids=[p.stem for p in BEHAVIOR])
async def test_behavior_vector(path: Path) -> None:
    await _run_behavior(path)


@pytest.mark.parametrize("codec", ["json", "msgpack"])
@pytest.mark.parametrize("path", ENCODING, ids=[p.stem for p in ENCODING])
def test_encoding_vector(path: Path, codec: str) -> None:
    vector = json.loads(path.read_text())
    message = vector["message"]
    # (1) the message is valid against its schema (and the union).
    errors = list(validator(vector["schema"]).iter_errors(message))
    assert not errors, f"{path.name}: {errors[0].message}"
    # (2) decoding the vector's JSON text gives the message.
    decoded = json.loads(_core.transcode(vector["json"].encode(), "json", "json"))
    assert decoded == message, f"{path.name}: decode({vector['json']}) = {decoded}"
    # (3) encode and decode back in this codec.
    wire = _core.transcode(json.dumps(message).encode(), "json", codec)
    validate_frame(wire, codec)
    if codec == "msgpack":
        envelope = msgpack.unpackb(wire, raw=False)
        assert envelope["type"] == message["type"] and envelope["id"] == message["id"]
    back = json.loads(_core.transcode(wire, codec, "json"))
    assert back == message, f"{path.name}: {codec} round trip gave {back}"
