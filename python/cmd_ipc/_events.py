"""The listener table of a registry: who hears which event, and delivery to them.

The Rust router decides that an event reaches this registry (once, deduplicated by id); this
module decodes its payload, converts it for typed listeners, and calls them. It gets a
``spawn`` function for async listeners and never sees the registry. It also tells, once, of
a channel attached to the registry that carries no events (:class:`EventlessChannels`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cmd_ipc import _core
from cmd_ipc._payload import Listener, decode
from cmd_ipc.commands import listener_converter

__all__ = ["EventlessChannels", "Listeners"]

logger = logging.getLogger("cmd_ipc")


class Listeners:
    """Listeners by event id, each with the converter of its typed payload (or ``None``).

    Args:
        spawn: Runs a coroutine as a task the registry tracks (async listeners).
    """

    def __init__(self, spawn: Callable[[Awaitable[Any]], None]) -> None:
        self._spawn = spawn
        self._by_event: dict[str, list[tuple[Listener, Callable[[Any], Any] | None]]] = {}

    def add(self, event_id: str, fn: Listener, localns: dict[str, Any] | None) -> None:
        """Adds a listener; with ``localns`` (the registering code's names), its payload is
        validated and converted to the annotation of its first parameter.

        Raises:
            TypeError: ``fn`` is not callable, or its annotation cannot be described.
        """
        if not callable(fn):
            raise TypeError("listener must be callable")
        convert = listener_converter(event_id, fn, localns) if localns is not None else None
        self._by_event.setdefault(event_id, []).append((fn, convert))

    def listening(self) -> bool:
        """Whether a listener waits for an event that crosses channels (a public id)."""
        return any(not _core.is_private(event_id) for event_id in self._by_event)

    def remove(self, event_id: str, fn: Listener) -> None:
        """Removes the first registration of ``fn`` for ``event_id`` (no error if absent)."""
        entries = self._by_event.get(event_id)
        if not entries:
            return
        for i, (listener, _) in enumerate(entries):
            if listener == fn:
                del entries[i]
                break
        if not entries:
            del self._by_event[event_id]

    def deliver(self, event_id: str, data: bytes | None, enc: str | None) -> None:
        """Calls every listener of ``event_id`` with the decoded payload; a listener that
        fails (or a payload that does not fit its type) is logged and the others still run."""
        fns = self._by_event.get(event_id)
        if not fns:
            return
        try:
            payload = decode(data, enc)
        except Exception as e:
            logger.warning("undecodable payload for event %r: %s", event_id, e)
            return
        for fn, convert in list(fns):
            arg = payload
            if convert is not None:
                try:
                    arg = convert(payload)
                except Exception as e:  # a ValueError with the field errors, usually
                    name = getattr(fn, "__qualname__", repr(fn))
                    logger.warning(
                        "listener %s of event %r not called: the payload does not match its "
                        "type: %s",
                        name,
                        event_id,
                        e,
                    )
                    continue
            try:
                result = fn(arg)
                if inspect.isawaitable(result):
                    self._spawn(_log_failure(result, event_id))
            except Exception:
                logger.exception("listener of event %r failed", event_id)


async def _log_failure(awaitable: Awaitable[Any], event_id: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("listener of event %r failed", event_id)


class EventlessChannels:
    """Channels that carry no events (an HTTPChannel: ``carries_events = False``), each told
    about once, at INFO: when it is attached to a registry with event listeners, or at the
    first event emitted while it is attached. Events silently not arriving are otherwise a
    puzzle.

    Args:
        owner: The registry's id, for the message.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        #: Attached channels not told about yet, by id.
        self._untold: dict[str, object] = {}

    def attached(self, channel_id: str, channel: object, listening: bool) -> None:
        """A channel was attached (``listening``: the registry has event listeners)."""
        if getattr(channel, "carries_events", True):
            return
        if listening:
            self._tell(channel_id, channel)
        else:
            self._untold[channel_id] = channel

    def emitted(self, event_id: str, attached: Mapping[str, object]) -> None:
        """An event was emitted; ``attached`` are the registry's channels by id."""
        if not self._untold or _core.is_private(event_id):
            return
        untold, self._untold = self._untold, {}
        for channel_id, channel in untold.items():
            if attached.get(channel_id) is channel:
                self._tell(channel_id, channel)

    def _tell(self, channel_id: str, channel: object) -> None:
        logger.info(
            "%s %r of registry %r carries no events: events emitted on either side do not "
            "cross it (HTTP only carries calls to its server); a WebSocketChannel carries "
            "them",
            type(channel).__name__,
            channel_id,
            self._owner,
        )
