"""Application values on the wire: msgpack (between our processes) or JSON (other peers).

Plain values (None, bool, 64-bit int, float, str, bytes, list, tuple, dict) are converted in
Rust (``_core.encode_plain`` / ``decode_plain``); anything else (models, datetimes, enums,
ints beyond 64 bits...) goes through msgpack-python with :func:`cmd_ipc.commands.to_wire`.
Nothing here knows about registries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import msgpack

from cmd_ipc import _core
from cmd_ipc.commands import to_wire
from cmd_ipc.errors import CommandError, error_from_code

__all__ = [
    "Handler",
    "Listener",
    "command_def",
    "decode",
    "encode",
    "encode_request",
    "many_results",
    "unpack",
]

#: A command handler: ``def``/``async def`` taking the request's fields as keyword arguments.
Handler = Callable[..., Any]
#: An event listener: ``def``/``async def`` taking the payload.
Listener = Callable[[Any], Any]

#: Largest encoding after which a thread's packer is kept for reuse.
_KEEP_PACKER_UNDER = 1 << 20

_NOT_PLAIN = object()
_packers = threading.local()


def unpack(data: bytes) -> Any:
    """msgpack decoding of a value (maps may have non-string keys)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode(data: bytes | None, encoding: str | None) -> Any:
    """The value of an encoded payload (``None`` for no payload)."""
    if data is None:
        return None
    if encoding == "json":
        return json.loads(data)
    value = _core.decode_plain(data, _NOT_PLAIN)
    return unpack(data) if value is _NOT_PLAIN else value


def encode(value: Any) -> bytes:
    """msgpack encoding of a value: plain values in Rust, others with one reusable packer
    per thread (``packb`` builds a new packer per call, which costs more than the packing of
    a small request)."""
    data = _core.encode_plain(value)
    if data is not None:
        return data
    # Taken out while packing: `to_wire` may run user code (pydantic serializers) that
    # encodes again on this thread; such a nested call gets a packer of its own.
    packer = _packers.__dict__.pop("packer", None)
    if packer is None:
        # `to_wire` only sees what msgpack cannot carry (models, datetimes, enums...). A
        # failed pack leaves the packer empty (autoreset), ready for the next value.
        packer = msgpack.Packer(use_bin_type=True, default=to_wire, autoreset=True)
    data = cast(bytes, packer.pack(value))
    if len(data) <= _KEEP_PACKER_UNDER:
        # A packer keeps its buffer at its largest: one that packed a big value is dropped.
        _packers.packer = packer
    return data


def encode_request(command_id: str, request: Any) -> bytes | None:
    """The msgpack encoding of a call's request (``None`` for no request).

    Raises:
        TypeError: ``request`` is not a mapping, or cannot be serialised.
    """
    if request is None:
        return None
    if not isinstance(request, (dict, Mapping)):
        raise TypeError(f"request must be a mapping or None, not {type(request).__name__}")
    try:
        return encode(request if isinstance(request, dict) else dict(request))
    except Exception as e:
        raise TypeError(f"request for {command_id!r} cannot be serialised: {e}") from e


def many_results(
    values: list[Any], others: list[tuple[Any, ...]], return_exceptions: bool
) -> list[Any]:
    """A batch's results: ``values`` with the results Rust could not decode decoded (listed
    in ``others``), and failures (there, or in place in ``values``) raised (the first, by
    position) or left in place."""
    if not return_exceptions:
        first = next((v for v in values if isinstance(v, CommandError)), None)
        if first is not None:
            raise first
    for i, kind, a, b in others:
        if kind == _core.OUTCOME_RESULT:
            values[i] = decode(a, b)
        else:
            error: CommandError = error_from_code(a, b)
            if not return_exceptions:
                raise error
            values[i] = error
    return values


def command_def(
    command_id: str, description: str | None, request: bytes | None, response: bytes | None
) -> dict[str, Any]:
    """A spec command definition from the router's listing (schemas as JSON text)."""
    d: dict[str, Any] = {"id": command_id}
    if description is not None:
        d["description"] = description
    if request is not None or response is not None:
        schema: dict[str, Any] = {}
        if request is not None:
            schema["request"] = json.loads(request)
        if response is not None:
            schema["response"] = json.loads(response)
        d["schema"] = schema
    return d
