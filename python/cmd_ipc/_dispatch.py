"""The handler table and the job runner of a registry.

The Rust router decides that a local handler must run (a ``run`` action naming a job and a
handler id); this module holds the Python callables behind those ids, runs them, and reports
each job's outcome back to the router. A plain synchronous handler behind a native channel
is usually called by Rust itself (``_core.Node.set_fast_handler``): what that fast path
cannot finish (the handler raised, returned an awaitable, or returned something Rust cannot
encode) comes back here through :meth:`Dispatcher.finish_fast`, so the rules for a
failure or a result are written once, here, and the awaitable test once, in Rust.

It gets what it needs injected (the native node, a ``complete`` sink that carries out the
actions a router call returns, a ``spawn`` function for tasks) and never sees the registry.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cmd_ipc import _core
from cmd_ipc._payload import Handler, decode, encode
from cmd_ipc.commands import Boundary
from cmd_ipc.errors import CommandError

__all__ = ["Complete", "Dispatcher", "HandlerEntry", "Spawn"]

logger = logging.getLogger("cmd_ipc")

#: Runs a router call (returning actions) and carries out its actions; a job that ended
#: already (``KeyError`` from the router) is ignored.
Complete = Callable[[Callable[[], list[Any]]], None]
#: Runs a coroutine as a task the registry tracks (and cancels on close).
Spawn = Callable[[Awaitable[Any]], None]


@dataclass
class HandlerEntry:
    """One registered handler and how to call it."""

    command_id: str
    fn: Handler
    is_async: bool
    whole_request: bool
    signature: inspect.Signature | None
    #: Validates the request into the handler's arguments (typed commands only).
    check: Callable[[Any], Any] | None = None
    #: Serialises the result through the return annotation (typed commands only).
    dump: Callable[[Any], Any] | None = None

    @classmethod
    def make(cls, command_id: str, fn: Handler, boundary: Boundary | None) -> HandlerEntry:
        """The entry of ``fn``, from its signature and its typed boundary (if any).

        Raises:
            TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"handler for {command_id!r} must be callable, got {fn!r}")
        try:
            sig: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        whole = False
        if sig is not None:
            params = list(sig.parameters.values())
            whole = len(params) == 1 and params[0].kind is inspect.Parameter.POSITIONAL_ONLY
        return cls(
            command_id=command_id,
            fn=fn,
            is_async=inspect.iscoroutinefunction(fn),
            whole_request=whole,
            signature=sig,
            check=boundary.check if boundary is not None else None,
            dump=boundary.dump if boundary is not None else None,
        )

    @property
    def plain(self) -> bool:
        """A synchronous handler taking keyword arguments, untyped: Rust may call it."""
        return not (self.is_async or self.whole_request or self.check or self.dump)

    def invoke(self, request: Any) -> Any:
        if self.whole_request:
            return self.fn({} if request is None else request)
        if request is None:
            return self.fn()
        return self.fn(**request)

    def binding_error(self, request: Any) -> str | None:
        """Why ``request`` does not fit the handler's parameters, if it does not."""
        if self.signature is None or self.whole_request:
            return None
        try:
            self.signature.bind(**(request or {}))
        except TypeError as e:
            return str(e)
        return None


class Dispatcher:
    """The handlers of one registry by id, and the runs of those handlers (jobs).

    Args:
        node: The registry's native node (job completions and the fast-handler table).
        owner: The registry's id, for log messages.
        complete: See :data:`Complete`.
        spawn: See :data:`Spawn`.
    """

    def __init__(self, node: _core.Node, owner: str, *, complete: Complete, spawn: Spawn) -> None:
        self._node = node
        self._owner = owner
        self._complete = complete
        self._spawn = spawn
        self._entries: dict[int, HandlerEntry] = {}
        self._by_command: dict[str, int] = {}
        self._next = 1

    # ------------------------------------------------------------------ the table

    def add(self, command_id: str, fn: Handler, boundary: Boundary | None = None) -> int:
        """Adds a handler (not yet bound to its command id); returns its handler id."""
        entry = HandlerEntry.make(command_id, fn, boundary)
        hid = self._next
        self._next += 1
        self._entries[hid] = entry
        if entry.plain:
            # A native channel's read loop may call it directly.
            self._node.set_fast_handler(hid, fn)
        return hid

    def drop(self, hid: int) -> None:
        """Forgets a handler id (a run that finds it gone answers ``not_found``)."""
        self._entries.pop(hid, None)
        self._node.set_fast_handler(hid, None)

    def bind(self, command_id: str, hid: int) -> None:
        """The tree accepted ``hid`` for ``command_id``: it replaces an earlier handler."""
        old = self._by_command.get(command_id)
        if old is not None and old != hid:
            self.drop(old)
        self._by_command[command_id] = hid

    def unbind(self, command_id: str) -> None:
        """Drops the handler bound to ``command_id``, if any."""
        hid = self._by_command.pop(command_id, None)
        if hid is not None:
            self.drop(hid)

    def entry_for(self, command_id: str) -> HandlerEntry | None:
        """The handler bound to ``command_id``."""
        hid = self._by_command.get(command_id)
        return None if hid is None else self._entries.get(hid)

    def clear(self) -> None:
        """Forgets every handler (the registry closed): Rust's table lets go of them too."""
        self._entries.clear()
        self._by_command.clear()
        self._node.clear_handlers()

    # ------------------------------------------------------------------ runs

    def run(self, job: int, hid: int, command_id: str, data: bytes | None, enc: str | None) -> None:
        """Runs handler ``hid`` for ``job`` with the encoded request ``data``."""
        entry = self._entries.get(hid)
        if entry is None:
            self.finish_err(job, "not_found", f"command {command_id!r} is no longer registered")
            return
        try:
            request = decode(data, enc)
        except Exception as e:
            self.finish_err(job, "invalid_request", f"undecodable request: {e}")
            return
        if entry.check is not None:
            try:
                request = entry.check(request)  # the handler never runs on a bad request
            except Exception as e:
                self.failed(job, entry, request, e)
                return
        if entry.is_async:
            self._spawn(self._run_async(job, entry, request))
            return
        try:
            if type(request) is dict and not entry.whole_request:
                result = entry.fn(**request)
            else:
                result = entry.invoke(request)
        except Exception as e:
            self.failed(job, entry, request, e)
            return
        if _core.needs_await(result):
            self._spawn(self._await_result(job, entry, request, result))
        else:
            self.finish_ok(job, entry, result)

    def finish_fast(self, kind: Any, job: int, hid: int, request: Any, value: Any) -> None:
        """A handler the read loop called directly needs Python to finish: it raised
        (``value`` is the exception), returned an awaitable, or returned something Rust
        could not serialise (``value`` is the serialisation error)."""
        entry = self._entries.get(hid)
        if entry is None:
            self.finish_err(job, "internal_error", "handler removed while running")
        elif kind == _core.ACTION_FAST_FAILED:
            self.failed(job, entry, request, value)
        elif kind == _core.ACTION_FAST_AWAIT:
            self._spawn(self._await_result(job, entry, request, value))
        else:
            self._unserialisable(job, entry, value)

    async def _run_async(self, job: int, entry: HandlerEntry, request: Any) -> None:
        try:
            awaitable = entry.invoke(request)
        except Exception as e:
            self.failed(job, entry, request, e)
            return
        await self._await_result(job, entry, request, awaitable)

    async def _await_result(
        self, job: int, entry: HandlerEntry, request: Any, awaitable: Awaitable[Any]
    ) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            self.finish_err(job, "internal_error", f"handler of {entry.command_id!r} cancelled")
            raise
        except Exception as e:
            self.failed(job, entry, request, e)
            return
        self.finish_ok(job, entry, result)

    def failed(self, job: int, entry: HandlerEntry, request: Any, e: BaseException) -> None:
        """Answers ``job`` for a handler (or its request check) that raised ``e``."""
        if isinstance(e, CommandError):
            if e.code in _core.EXECUTE_ERROR_CODES:
                self.finish_err(job, e.code, e.message)
            else:
                # `duplicate_command` cannot travel in an execute response (so a remote caller
                # would see internal_error) and a user-defined code is unknown to the router:
                # answer internal_error here too, the same way locally and remotely.
                self.finish_err(job, "internal_error", f"{type(e).__name__}: {e}")
            return
        if isinstance(e, TypeError):
            why = entry.binding_error(request)
            if why is not None:
                self.finish_err(
                    job, "invalid_request", f"invalid request for {entry.command_id!r}: {why}"
                )
                return
        # exc_info=e: a handler the read loop called directly failed outside this frame.
        logger.error(
            "handler of %r in registry %r failed", entry.command_id, self._owner, exc_info=e
        )
        self.finish_err(job, "internal_error", f"{type(e).__name__}: {e}")

    def finish_ok(self, job: int, entry: HandlerEntry, result: Any) -> None:
        """Answers ``job`` with the handler's ``result`` (serialised here)."""
        if result is None and entry.dump is None:
            data = None
        else:
            try:
                if entry.dump is not None:
                    result = entry.dump(result)
                data = None if result is None else encode(result)
            except Exception as e:
                self._unserialisable(job, entry, e)
                return
        self._complete(lambda: self._node.complete_job_ok(job, data, "msgpack"))

    def finish_err(self, job: int, code: str, message: str) -> None:
        """Answers ``job`` with an error."""
        self._complete(lambda: self._node.complete_job_err(job, code, message))

    def _unserialisable(self, job: int, entry: HandlerEntry, e: object) -> None:
        self.finish_err(
            job, "internal_error", f"result of {entry.command_id!r} cannot be serialised: {e}"
        )
