"""The HTTP wire of cmd-ipc, shared by the client channel and the servers (no I/O, and no
dependency on any HTTP library).

Every message is one ``POST {base_url}/cmd`` whose body is the JSON message; the answer is
NDJSON whose first line is the response message. Only ``list.commands.request`` and
``execute.command.request`` cross (:data:`_ANSWER_TYPE` gives the answer each one gets).
"""

from __future__ import annotations

import json
from typing import Any

from cmd_ipc import _core

__all__: list[str] = []

_LIST_REQUEST = "list.commands.request"
_LIST_RESPONSE = "list.commands.response"
_EXECUTE_REQUEST = "execute.command.request"
_EXECUTE_RESPONSE = "execute.command.response"
#: The answer each message type that may cross HTTP gets.
_ANSWER_TYPE = {_LIST_REQUEST: _LIST_RESPONSE, _EXECUTE_REQUEST: _EXECUTE_RESPONSE}
#: The message types that carry a ``thid``.
_RESPONSES = frozenset({"register.command.response", _LIST_RESPONSE, _EXECUTE_RESPONSE})
_NDJSON = "application/x-ndjson"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _head(frame: bytes) -> tuple[str, str, str | None]:
    """``(type, id, reference)`` of a frame the registry encoded, for a caller of
    :meth:`Channel.send` (the registry itself gives them to :meth:`Channel.send_with_head`).

    Raises:
        ValueError: Never for the registry's own frames.
    """
    msg = json.loads(frame)
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    kind = str(msg.get("type"))
    ref = msg.get(
        "thid" if kind in _RESPONSES else "commandId" if kind == _EXECUTE_REQUEST else "eventId"
    )
    if kind == "register.command.request":
        ref = (msg.get("command") or {}).get("id")
    return kind, str(msg.get("id")), None if ref is None else str(ref)


def _error_response(thid: str, code: str, message: str) -> dict[str, Any]:
    """An ``execute.command.response`` failing the request ``thid`` (valid per spec-v1)."""
    return {
        "id": _core.new_id(),
        "type": _EXECUTE_RESPONSE,
        "thid": thid,
        "response": {"ok": False, "error": {"code": code, "message": message}},
    }
