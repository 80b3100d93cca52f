"""Which commands a server shows its clients (the ``expose=`` of the HTTP and WebSocket servers).

A server answers for its registry, which can reach every public command of its tree: its
own, its workers' (internal ones included), its router's. ``expose`` narrows that to what
clients may see, for listing and for calling alike: a command left out is never listed, and
calling it is answered ``not_found`` exactly as for a command that does not exist (and the
"did you mean" hints of such answers are dropped, so they cannot name one).

``expose`` is ``None`` (every public command, the default), a glob pattern or several
(:func:`fnmatch.fnmatchcase`: ``*`` matches any characters, dots included, so ``"api.*"``
takes ``api.users.get`` too), or a predicate ``fn(command_id) -> bool``. Private ``_`` ids
are never exposed, whatever it says.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

from cmd_ipc import _core

__all__ = ["Expose", "Exposure", "PeerFilter"]

logger = logging.getLogger("cmd_ipc")

#: What ``expose=`` accepts: ``None`` (everything public), a glob pattern, patterns, or a
#: predicate on the command id.
Expose = str | Iterable[str] | Callable[[str], bool] | None

_NOT_FOUND = "not_found"


class Exposure:
    """The compiled ``expose`` of one server.

    Args:
        expose: ``None``, a glob pattern, an iterable of them, or ``fn(command_id) -> bool``.
        owner: The id of the serving registry, named in ``not_found`` answers.

    Raises:
        TypeError: ``expose`` is none of these.

    Example:
        >>> e = Exposure(["api.*", "health"])
        >>> [e.allows(c) for c in ("api.users.get", "health", "admin.reset", "_api.x")]
        [True, True, False, False]
    """

    def __init__(self, expose: Expose = None, owner: str = "") -> None:
        self.restricted = expose is not None
        self.owner = owner
        self._predicate: Callable[[str], bool] | None = None
        self._pattern: re.Pattern[str] | None = None
        if expose is None:
            return
        if isinstance(expose, str):
            patterns = [expose]
        elif callable(expose):
            self._predicate = expose
            return
        elif isinstance(expose, Iterable):
            patterns = list(expose)
            if not all(isinstance(p, str) for p in patterns):
                raise TypeError("expose patterns must be strings")
        else:
            raise TypeError(
                "expose must be None, a glob pattern, patterns, or a predicate on the "
                f"command id, not {type(expose).__name__}"
            )
        # One regex for all the patterns (an empty list exposes nothing).
        joined = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or r"(?!)"
        self._pattern = re.compile(joined)

    def allows(self, command_id: str) -> bool:
        """Whether clients may see and call ``command_id``."""
        if _core.is_private(command_id):
            return False
        if not self.restricted:
            return True
        if self._pattern is not None:
            return self._pattern.match(command_id) is not None
        assert self._predicate is not None
        try:
            return bool(self._predicate(command_id))
        except Exception:
            logger.exception("the expose predicate failed on %r: the command is hidden", command_id)
            return False

    def commands(self, commands: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The command definitions of ``commands`` that clients may see."""
        return [c for c in commands if self.allows(str(c.get("id", "")))]

    def list_answer(self, frame: bytes) -> bytes:
        """A ``list.commands.response`` frame (JSON) with the hidden commands left out."""
        if not self.restricted:
            return frame
        answer = json.loads(frame)
        answer["commands"] = self.commands(answer.get("commands") or [])
        return _dumps(answer)

    def hidden_call(self, frame: bytes, kind: str) -> str | None:
        """The command id of an ``execute.command.request`` frame (JSON) for a command
        clients may not call; ``None`` when it may be called, or for any other ``kind``.

        ``kind`` is the type the native decoder read (:func:`cmd_ipc._core.inspect_message`),
        never a guess from the raw bytes: JSON escapes (``"requ\\u0065st"``) spell the same
        type with other bytes. The frame is one the decoder accepted; should it not read the
        same here, the call is hidden (refused) rather than let through.
        """
        if not self.restricted or kind != "execute.command.request":
            return None
        command_id = _field(frame, "commandId")
        if command_id is None:
            return ""  # unreadable here although the decoder took it: refuse, never pass
        return None if self.allows(command_id) else command_id

    def command_of(self, frame: bytes) -> str | None:
        """The id of the command a ``register.command.request`` frame (JSON) announces, or
        ``None`` if it cannot be read."""
        try:
            msg = json.loads(frame)
            command_id = msg["command"]["id"]
        except (ValueError, KeyError, TypeError):
            return None
        return command_id if _is_text(command_id) else None

    @staticmethod
    def head(frame: bytes) -> tuple[str, str]:
        """``(type, id)`` of a frame (JSON) as the native decoder reads them, for a channel
        that gets frames the registry decodes later (WebSocket). A frame the decoder
        refuses with the default limits is read here instead (its registry may allow
        deeper nesting); ``""`` for what neither can read (the registry refuses it too)."""
        try:
            kind, message_id, _ = _core.inspect_message(
                frame, "json", max_message_size=len(frame) + 1
            )
        except ValueError:  # ProtocolError is one
            return _field(frame, "type") or "", _field(frame, "id") or ""
        return kind, message_id

    @staticmethod
    def registration_answer(frame: bytes) -> bytes:
        """A ``register.command.response`` frame (JSON) to a client's registration of a
        hidden command id, with a ``duplicate_command`` refusal turned into ``ok``: the
        client is answered as if the id were free, so the answer cannot tell it the hidden
        command exists. Its registration stays refused (the tree never calls it there)."""
        try:
            msg = json.loads(frame)
            refused = msg["response"].get("error") == "duplicate_command"
        except (ValueError, KeyError, TypeError, AttributeError):
            return frame
        if not refused:
            return frame
        msg["response"] = {"ok": True}
        return _dumps(msg)

    def not_found(self, thid: str, command_id: str) -> bytes:
        """The ``execute.command.response`` (JSON) to a call of a hidden command: the
        registry's own ``not_found`` answer, without a hint."""
        return _dumps(
            {
                "id": _core.new_id(),
                "type": "execute.command.response",
                "thid": thid,
                "response": {
                    "ok": False,
                    "error": {"code": _NOT_FOUND, "message": _not_found(command_id, self.owner)},
                },
            }
        )

    def answer(self, frame: bytes) -> bytes:
        """An ``execute.command.response`` frame (JSON) with the "did you mean" hint of a
        ``not_found`` error removed (it could name a hidden command)."""
        if not self.restricted or b'"not_found"' not in frame or b"did you mean" not in frame:
            return frame
        try:
            msg = json.loads(frame)
            error = msg["response"]["error"]
            if error.get("code") == _NOT_FOUND:
                error["message"] = str(error.get("message", "")).split("; did you mean", 1)[0]
                return _dumps(msg)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return frame


#: At most this many registrations of hidden ids wait for their answer on one connection.
_MAX_HIDDEN_REGISTRATIONS = 1024


class PeerFilter:
    """What one connection of a server (a channel to one client) lets through under an
    :class:`Exposure`: the frames a streaming server channel (gRPC) sends and receives go
    through it, in both directions.

    Toward the client, command lists leave out hidden commands, and ``not_found`` answers
    lose their "did you mean" hints. From the client, a call of a hidden command is
    answered here, ``not_found`` as for a command that does not exist (it never reaches the
    registry), and the client's registration of a hidden id is answered ``ok`` as for a
    free one (not ``duplicate_command``, which would tell it the id exists) though it stays
    refused. Every incoming frame is decoded to decide (a type spelled with JSON escapes
    is the same type), never judged by its raw bytes.

    Args:
        exposure: The server's exposure (it should be restricted: an unrestricted one
            needs no filter).

    Example:
        >>> f = PeerFilter(Exposure("api.*", "hub"))
        >>> call = b'{"id":"1","type":"execute.command.request","commandId":"admin.x"}'
        >>> json.loads(f.incoming(call))["response"]["error"]["code"]
        'not_found'
    """

    __slots__ = ("_hidden_registrations", "exposure")

    def __init__(self, exposure: Exposure) -> None:
        self.exposure = exposure
        # Message id -> hidden command id, of the client's registrations not yet answered.
        self._hidden_registrations: dict[str, str] = {}

    def outgoing(self, frame: bytes, kind: str, reference: str | None) -> bytes:
        """The frame to send the client instead of ``frame`` (often ``frame`` itself);
        ``kind`` and ``reference`` are what the registry gives ``send_with_head``."""
        exposure = self.exposure
        if kind == "list.commands.response":
            return exposure.list_answer(frame)
        if kind == "execute.command.response":
            return exposure.answer(frame)
        if (
            kind == "register.command.response"
            and self._hidden_registrations.pop(reference or "", None) is not None
        ):
            return exposure.registration_answer(frame)
        return frame

    def incoming(self, frame: bytes) -> bytes | None:
        """``None`` when the client's ``frame`` goes on to the registry; else the answer to
        send the client instead (a call of a hidden command)."""
        exposure = self.exposure
        kind, message_id = exposure.head(frame)
        hidden = exposure.hidden_call(frame, kind)
        if hidden is not None:
            logger.debug("%r is not exposed", hidden)
            return exposure.not_found(message_id, hidden)
        if kind == "register.command.request":
            command_id = exposure.command_of(frame)
            if command_id is not None and not exposure.allows(command_id):
                pending = self._hidden_registrations
                if len(pending) >= _MAX_HIDDEN_REGISTRATIONS:
                    del pending[next(iter(pending))]  # the oldest: answered long ago or never
                pending[message_id] = command_id
        return None


def _field(frame: bytes, name: str) -> str | None:
    """The string field ``name`` of the JSON object ``frame``, or ``None``."""
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    value = msg.get(name) if isinstance(msg, dict) else None
    return value if _is_text(value) else None


def _is_text(value: object) -> TypeGuard[str]:
    """A ``str`` that is valid Unicode (no lone surrogate from a ``\\ud800`` escape)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_found(command_id: str, registry_id: str) -> str:
    return f"command '{command_id}' is not registered anywhere registry '{registry_id}' can reach"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
