"""The :class:`CommandRegistry`: the Python face of one registry in a cmd-ipc tree.

Every routing decision is taken by the Rust router (``cmd_ipc._core.Router``); this module
keeps what must be Python (handlers, listeners, waiting callers, channels written in Python)
and carries out the router's actions on an asyncio event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import msgpack

from cmd_ipc import _core
from cmd_ipc.channels.base import Channel
from cmd_ipc.channels.native import DEFAULT_RING_SIZE, NativeChannel, Transport
from cmd_ipc.commands import (
    Boundary,
    Prepared,
    caller_locals,
    listener_converter,
    prepare,
    service_commands,
    to_wire,
)
from cmd_ipc.errors import (
    ChannelDisconnectedError,
    CommandError,
    DuplicateCommandError,
    InternalError,
    error_from_code,
)
from cmd_ipc.workers import RestartPolicy, Worker
from cmd_ipc.workers import connect_workers as _connect_workers
from cmd_ipc.workers import spawn_worker as _spawn_worker

__all__ = ["CommandRegistry", "Handler", "Listener"]

logger = logging.getLogger("cmd_ipc")

#: A command handler: ``def``/``async def`` taking the request's fields as keyword arguments.
Handler = Callable[..., Any]
#: An event listener: ``def``/``async def`` taking the payload.
Listener = Callable[[Any], Any]
F = TypeVar("F", bound=Callable[..., Any])

_Outcome = Callable[[Any, BaseException | None], None]

#: Result types that are never awaitable (skips the slower ``inspect.isawaitable``).
_PLAIN = frozenset({int, float, str, bytes, bool, dict, list, tuple, type(None)})

#: Seconds the loop waits before watching again a native channel a blocking caller reads.
_RESUME_AFTER = 0.001

#: Bumped in a forked child, so registries inherited from the parent refuse to work there.
_FORK_GENERATION = [0]


def _after_fork_in_child() -> None:
    _FORK_GENERATION[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: What to do about a rejected registration (ids are unique in a tree).
_DUPLICATE_HINT = (
    "command ids are unique in a tree: choose another id, or unregister the other command first"
)

#: The error codes an execute response may carry (spec-v1).
_EXECUTE_CODES = frozenset(
    {"not_found", "invalid_request", "internal_error", "timeout", "channel_disconnected"}
)


def _unpack(data: bytes) -> Any:
    """msgpack decoding of a value (maps may have non-string keys)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _decode(data: bytes | None, encoding: str | None) -> Any:
    if data is None:
        return None
    if encoding == "json":
        return json.loads(data)
    value = _core.decode_plain(data, _NOT_PLAIN)
    return _unpack(data) if value is _NOT_PLAIN else value


_NOT_PLAIN = object()


def _many_results(
    values: list[Any], others: list[tuple[Any, ...]], return_exceptions: bool
) -> list[Any]:
    """A native batch's results: ``values`` with the results Rust could not decode decoded,
    and failures raised (the first) or put in place."""
    for i, kind, a, b in others:
        if kind == "result":
            values[i] = _decode(a, b)
        else:
            error = error_from_code(a, b)
            if not return_exceptions:
                raise error
            values[i] = error
    return values


_packers = threading.local()


def _encode(value: Any) -> bytes:
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


def _encode_request(command_id: str, request: Any) -> bytes | None:
    """The msgpack encoding of a call's request (``None`` for no request).

    Raises:
        TypeError: ``request`` is not a mapping, or cannot be serialised.
    """
    if request is None:
        return None
    if not isinstance(request, (dict, Mapping)):
        raise TypeError(f"request must be a mapping or None, not {type(request).__name__}")
    try:
        return _encode(request if isinstance(request, dict) else dict(request))
    except Exception as e:
        raise TypeError(f"request for {command_id!r} cannot be serialised: {e}") from e


#: Largest encoding after which a thread's packer is kept for reuse.
_KEEP_PACKER_UNDER = 1 << 20


@dataclass
class _HandlerEntry:
    command_id: str
    fn: Handler
    is_async: bool
    whole_request: bool
    signature: inspect.Signature | None
    #: Validates the request into the handler's arguments (typed commands only).
    check: Callable[[Any], Any] | None = None
    #: Serialises the result through the return annotation (typed commands only).
    dump: Callable[[Any], Any] | None = None

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


def _make_entry(command_id: str, fn: Handler, boundary: Boundary | None) -> _HandlerEntry:
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
    return _HandlerEntry(
        command_id=command_id,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        whole_request=whole,
        signature=sig,
        check=boundary.check if boundary is not None else None,
        dump=boundary.dump if boundary is not None else None,
    )


class CommandRegistry:
    """A registry: registers commands, calls commands anywhere in the tree, emits events.

    Handlers receive the request's fields as keyword arguments: ``def add(a, b)`` is called
    as ``add(a=1, b=2)`` for the request ``{"a": 1, "b": 2}``; a field the handler does not
    accept, or a missing required one, is answered ``invalid_request`` without running it.
    A handler that wants the whole request declares a single positional-only parameter,
    ``def handle(request, /)``, and gets the dict (``{}`` when the call had no request).
    Handlers registered with the :meth:`command` decorator (or :meth:`register_service`) are
    typed: their hints give the advertised schemas and every request is validated and
    converted before they run (see :mod:`cmd_ipc.commands`).
    ``def`` handlers run inline on the registry's event loop (keep them short or make them
    ``async def``); ``async def`` handlers run as tasks.

    Args:
        id: This registry's id (the name its peers give the channel to it).
        router_channel: Id of the channel to the parent registry; ``None`` for the root.
        request_ttl: Seconds a call (or a request forwarded for others) waits for its response.
        event_ttl: Seconds an event id is remembered to deliver each event once.
        max_pending: Maximum requests in flight (calls plus forwarded); beyond it calls fail
            with ``internal_error`` at once.
        max_dedup: Maximum event ids remembered.
        max_message_size: Maximum encoded size of a message, in bytes.
        max_depth: Maximum nesting depth of a message.
        spin_us: Microseconds a reader of a shared-memory channel spins on an empty ring
            before parking (0 disables spinning; on a single CPU spinning only delays the
            peer).

    Example:
        >>> import asyncio
        >>> async def main():
        ...     async with CommandRegistry("main") as registry:
        ...         @registry.command("calc.add")
        ...         def add(a: int, b: int) -> int:
        ...             return a + b
        ...         return await registry.execute_command("calc.add", {"a": 1, "b": 2})
        >>> asyncio.run(main())
        3
    """

    def __init__(
        self,
        id: str,
        router_channel: str | None = None,
        request_ttl: float = 30.0,
        event_ttl: float = 5.0,
        *,
        max_pending: int = 100_000,
        max_dedup: int = 100_000,
        max_message_size: int = 64 * 1024 * 1024,
        max_depth: int = 64,
        spin_us: int = 50,
    ) -> None:
        self._node = _core.Node(
            id,
            router_channel,
            request_ttl=request_ttl,
            event_ttl=event_ttl,
            max_pending=max_pending,
            max_dedup=max_dedup,
            max_message_size=max_message_size,
            max_depth=max_depth,
            spin_us=spin_us,
        )
        self.spin_us = spin_us
        self._node.set_fast_codec(
            _unpack,
            _encode,
        )
        self._fork_generation = _FORK_GENERATION[0]
        self._loop_thread: int | None = None
        self._background: threading.Thread | None = None
        self._native: dict[str, NativeChannel] = {}
        self._native_fds: dict[str, int] = {}
        self._close_listeners: list[Callable[[str, str], None]] = []
        self._pending_registrations: set[asyncio.Future[None]] = set()
        self._spin_scheduled = False
        #: Channels whose peer answered our command list request, and who waits for that.
        self._listed: set[str] = set()
        self._listed_waiters: dict[str, asyncio.Event] = {}
        #: Set in a worker process told to stop, so losing the parent is not a warning.
        self._stopping_worker = False
        #: In a worker: channels to sibling workers (connect_workers). A sibling that goes
        #: away is reported by the parent (stopped, or a WARNING for a death), not here.
        self._sibling_links: set[str] = set()
        self._workers: dict[str, Worker] = {}
        #: Whether the router channel was attached once (a second attach re-announces).
        self._router_seen = False
        self.id = id
        self.router_channel = router_channel
        self.request_ttl = request_ttl
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, Channel | NativeChannel] = {}
        self._handlers: dict[int, _HandlerEntry] = {}
        self._handler_of: dict[str, int] = {}
        #: Services by id(): the object (kept alive) and the handlers registered for it.
        self._services: dict[int, tuple[object, list[tuple[str, Handler]]]] = {}
        self._next_handler = 1
        self._outcomes: dict[int, _Outcome] = {}
        #: Listeners by event id, each with the converter of its typed payload (or None).
        self._listeners: dict[str, list[tuple[Listener, Callable[[Any], Any] | None]]] = {}
        self._deferred: dict[str, tuple[int, str | None, Mapping[str, Any] | None]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<CommandRegistry id={self.id!r} channels={sorted(self._channels)}>"

    # ------------------------------------------------------------------ loop and actions

    def _off_loop_thread(self) -> bool:
        loop = self._loop
        return (
            loop is not None
            and self._loop_thread is not None
            and threading.get_ident() != self._loop_thread
            and loop.is_running()
        )

    def _call_on_loop(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the loop's thread and returns its result (or raises its error)."""
        assert self._loop is not None
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return done.result()

    def _check_process(self) -> None:
        if self._fork_generation != _FORK_GENERATION[0]:
            raise RuntimeError(
                f"registry {self.id!r} was created before os.fork(); a forked child cannot use "
                "it (its channels and threads belong to the parent): create a new registry "
                "in the child"
            )

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._check_process()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            loop.add_reader(self._node.wake_fd, self._on_wake)
        elif self._loop is not loop:
            raise RuntimeError(
                f"registry {self.id!r} is bound to another event loop; "
                "use it only from the loop it started on"
            )
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")
        return loop

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _apply(self, actions: list[Any]) -> None:
        """Carries out the router's actions, in order."""
        for act in actions:
            kind = act[0]
            if kind == "send":
                channel = self._channels.get(act[1])
                if channel is not None and not isinstance(channel, NativeChannel):
                    channel.send(act[2])
            elif kind == "run":
                self._run(act[1], act[2], act[3], act[4], act[5])
            elif kind == "result":
                outcome = self._outcomes.pop(act[1], None)
                if outcome is not None:
                    try:
                        value = _decode(act[2], act[3])
                    except Exception as e:
                        outcome(None, InternalError(f"undecodable result: {e}"))
                    else:
                        outcome(value, None)
            elif kind in ("error", "registered"):
                outcome = self._outcomes.pop(act[1], None)
                if outcome is not None:
                    err = None if act[2] is None else error_from_code(act[2], act[3])
                    outcome(None, err)
            elif kind == "event":
                self._deliver_event(act[1], act[2], act[3])
            elif kind == "fast_failed" or kind == "fast_await" or kind == "fast_unencodable":
                self._finish_fast(kind, act[1], act[2], act[3], act[4])
            elif kind == "closed":
                self._native_closed(act[1], act[2])
            elif kind == "listed":
                self._listed.add(act[1])
                waiter = self._listed_waiters.pop(act[1], None)
                if waiter is not None:
                    waiter.set()
            elif kind == "want_write":
                fd = self._native_fds.get(act[1])
                if fd is not None and self._loop is not None:
                    self._loop.add_writer(fd, self._on_native_writable, act[1])
            elif kind == "dropped":
                quiet = act[2] == "duplicate_event" or (
                    act[2] == "undeliverable" and (self._closed or self._stopping_worker)
                )
                level = logging.DEBUG if quiet else logging.WARNING
                logger.log(
                    level, "registry %r dropped a message from %r: %s", self.id, act[1], act[3]
                )
        self._arm_timer()

    def _arm_timer(self) -> None:
        loop = self._loop
        if loop is None:
            return
        deadline = self._node.next_deadline()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        at = self._timer_at or 0.0
        self._timer = self._timer_at = None
        if self._loop is None:
            return
        # call_at may fire up to one clock tick early: never tick before the deadline.
        self._apply(self._node.tick(max(self._loop.time(), at)))

    def _finish_fast(self, kind: str, job: int, hid: int, request: Any, value: Any) -> None:
        """A handler the read loop called directly needs Python to finish: it raised, it
        returned an awaitable, or its result could not be serialised."""
        entry = self._handlers.get(hid)
        if entry is None:
            self._finish_err(job, "internal_error", "handler removed while running")
        elif kind == "fast_failed":
            self._handler_failed(job, entry, request, value)
        elif kind == "fast_await":
            self._spawn(self._await_result(job, entry, request, value))
        else:
            self._finish_err(
                job,
                "internal_error",
                f"result of {entry.command_id!r} cannot be serialised: {value}",
            )

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ handlers

    def _run(
        self, job: int, handler_id: int, command_id: str, data: bytes | None, enc: str | None
    ) -> None:
        entry = self._handlers.get(handler_id)
        if entry is None:
            self._finish_err(job, "not_found", f"command {command_id!r} is no longer registered")
            return
        try:
            request = _decode(data, enc)
        except Exception as e:
            self._finish_err(job, "invalid_request", f"undecodable request: {e}")
            return
        if entry.check is not None:
            try:
                request = entry.check(request)  # the handler never runs on a bad request
            except Exception as e:
                self._handler_failed(job, entry, request, e)
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
            self._handler_failed(job, entry, request, e)
            return
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            self._spawn(self._await_result(job, entry, request, result))
        else:
            self._finish_ok(job, entry, result)

    async def _run_async(self, job: int, entry: _HandlerEntry, request: Any) -> None:
        try:
            awaitable = entry.invoke(request)
        except Exception as e:
            self._handler_failed(job, entry, request, e)
            return
        await self._await_result(job, entry, request, awaitable)

    async def _await_result(
        self, job: int, entry: _HandlerEntry, request: Any, awaitable: Awaitable[Any]
    ) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            self._finish_err(job, "internal_error", f"handler of {entry.command_id!r} cancelled")
            raise
        except Exception as e:
            self._handler_failed(job, entry, request, e)
            return
        self._finish_ok(job, entry, result)

    def _handler_failed(self, job: int, entry: _HandlerEntry, request: Any, e: Exception) -> None:
        if isinstance(e, CommandError):
            if e.code in _EXECUTE_CODES:
                self._finish_err(job, e.code, e.message)
            else:
                # `duplicate_command` cannot travel in an execute response (so a remote caller
                # would see internal_error) and a user-defined code is unknown to the router:
                # answer internal_error here too, the same way locally and remotely.
                self._finish_err(job, "internal_error", f"{type(e).__name__}: {e}")
            return
        if isinstance(e, TypeError):
            why = entry.binding_error(request)
            if why is not None:
                self._finish_err(
                    job, "invalid_request", f"invalid request for {entry.command_id!r}: {why}"
                )
                return
        # exc_info=e: a handler the read loop called directly failed outside this frame.
        logger.error("handler of %r in registry %r failed", entry.command_id, self.id, exc_info=e)
        self._finish_err(job, "internal_error", f"{type(e).__name__}: {e}")

    def _finish_ok(self, job: int, entry: _HandlerEntry, result: Any) -> None:
        if result is None and entry.dump is None:
            data = None
        else:
            try:
                if entry.dump is not None:
                    result = entry.dump(result)
                data = None if result is None else _encode(result)
            except Exception as e:
                self._finish_err(
                    job,
                    "internal_error",
                    f"result of {entry.command_id!r} cannot be serialised: {e}",
                )
                return
        try:
            actions = self._node.complete_job_ok(job, data, "msgpack")
        except KeyError:
            return  # the job ended already (its call timed out or was cancelled)
        if actions:  # a reply over a native channel was sent by Rust: usually nothing left
            self._apply(actions)

    def _finish_err(self, job: int, code: str, message: str) -> None:
        self._complete(lambda: self._node.complete_job_err(job, code, message))

    def _complete(self, fn: Callable[[], list[Any]]) -> None:
        try:
            actions = fn()
        except KeyError:
            return  # the job ended already (its call timed out or was cancelled)
        self._apply(actions)

    # ------------------------------------------------------------------ registration

    def _add_handler(self, command_id: str, fn: Handler, boundary: Boundary | None = None) -> int:
        entry = _make_entry(command_id, fn, boundary)
        hid = self._next_handler
        self._next_handler += 1
        self._handlers[hid] = entry
        if not (entry.is_async or entry.whole_request or entry.check or entry.dump):
            # A plain sync handler: a native channel's read loop may call it directly.
            self._node.set_fast_handler(hid, fn)
        return hid

    def _drop_handler(self, hid: int) -> None:
        self._handlers.pop(hid, None)
        self._node.set_fast_handler(hid, None)

    def _start_registration(
        self,
        command_id: str,
        hid: int,
        description: str | None,
        schema: Mapping[str, Any] | None,
        outcome: _Outcome,
    ) -> None:
        if not isinstance(command_id, str) or not command_id:
            raise ValueError("a command id must be a non-empty string")
        req = resp = None
        if schema is not None:
            unknown = set(schema) - {"request", "response"}
            if unknown:
                raise ValueError(f"schema may only have 'request' and 'response', not {unknown}")
            if schema.get("request") is not None:
                req = json.dumps(schema["request"]).encode()
            if schema.get("response") is not None:
                resp = json.dumps(schema["response"]).encode()

        def done(value: Any, err: BaseException | None) -> None:
            if err is None:
                old = self._handler_of.get(command_id)
                if old is not None and old != hid:
                    self._drop_handler(old)
                self._handler_of[command_id] = hid
            else:
                self._drop_handler(hid)
                if isinstance(err, DuplicateCommandError):
                    err = DuplicateCommandError(f"{err.message}; {_DUPLICATE_HINT}")
            outcome(value, err)

        call, actions = self._node.register_local(
            command_id, hid, self._now(), description, req, resp
        )
        self._outcomes[call] = done
        self._apply(actions)

    def _router_missing(self) -> bool:
        return self.router_channel is not None and self.router_channel not in self._channels

    def command(
        self,
        command_id: str,
        *,
        description: str | None = None,
        schema: Mapping[str, Any] | None = None,
        validate: bool = True,
    ) -> Callable[[F], F]:
        """Decorator registering a function as the handler of ``command_id``.

        The handler's type hints give the JSON Schemas advertised for its request and response,
        and every request is validated before it runs (a mismatch is answered
        ``invalid_request`` with the field errors); the result is serialised through the
        return annotation (see :mod:`cmd_ipc.commands`).

        Without a router channel the command is registered at once (a duplicate raises
        :class:`DuplicateCommandError` here). With a router channel that is not attached yet,
        registration waits for :meth:`register_channel` of the router, which escalates it and
        reports failures; if the router is attached, the registration is escalated now and a
        rejection is logged.

        Args:
            command_id: Command id, e.g. ``"calc.add"``; a leading ``_`` makes it private.
            description: Human description, advertised to peers.
            schema: ``{"request": <JSON Schema>, "response": <JSON Schema>}``, advertised;
                each key given replaces the derived one.
            validate: ``False`` registers the handler untyped: nothing derived, no check and
                no conversion per call (the fastest path).

        Returns:
            The decorator, which returns the function unchanged.

        Raises:
            TypeError: The type hints cannot be resolved or described (at decoration).

        Example:
            >>> from pydantic import BaseModel
            >>> class User(BaseModel):
            ...     id: int
            ...     name: str
            >>> async def main():
            ...     async with CommandRegistry("main") as registry:
            ...         @registry.command("users.get")
            ...         def get(user_id: int, verbose: bool = False) -> User:
            ...             return User(id=user_id, name="ada")
            ...         return await registry.execute_command("users.get", {"user_id": "7"})
            >>> asyncio.run(main())
            {'id': 7, 'name': 'ada'}
        """
        localns = caller_locals() if validate else None

        def decorator(fn: F) -> F:
            self._check_process()
            if self._off_loop_thread():
                # Registration touches the loop's state: do it on the loop's thread.
                return cast(F, self._call_on_loop(lambda: decorator(fn)))
            typed = prepare(
                command_id,
                fn,
                description=description,
                schema=schema,
                validate=validate,
                localns=localns,
            )
            hid = self._add_handler(command_id, fn, typed.boundary)
            if self._router_missing() and not command_id.startswith("_"):
                self._deferred[command_id] = (hid, typed.description, typed.schema)
                return fn
            result: list[BaseException | None] = []
            later: list[asyncio.Future[None]] = []

            def done(_: Any, err: BaseException | None) -> None:
                if not result:
                    result.append(err)
                    return
                if err is not None:
                    logger.error("registration of %r failed: %s", command_id, err)
                if later and not later[0].done():
                    if err is None:
                        later[0].set_result(None)
                    else:
                        later[0].set_exception(err)

            self._start_registration(command_id, hid, typed.description, typed.schema, done)
            if result and result[0] is not None:
                raise result[0]
            if not result:
                # Escalated: the ack comes later; `ready()` waits for it.
                result.append(None)
                if self._loop is not None:
                    fut: asyncio.Future[None] = self._loop.create_future()
                    later.append(fut)
                    self._pending_registrations.add(fut)
                    fut.add_done_callback(self._pending_registrations.discard)
            return fn

        return decorator

    async def ready(self) -> None:
        """Waits until every registration started so far (with :meth:`command` too) was
        acknowledged by the tree.

        Raises:
            DuplicateCommandError: One of them was rejected (the first failure is raised).
        """
        self._bind_loop()
        if self._deferred and not self._router_missing():
            await self._flush_deferred()
        pending = list(self._pending_registrations)
        if not pending:
            return
        results = await asyncio.gather(*pending, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def register_command(
        self,
        command_id: str,
        handler: Handler,
        description: str | None = None,
        schema: Mapping[str, Any] | None = None,
        *,
        validate: bool | None = None,
    ) -> None:
        """Registers ``handler`` for ``command_id`` and waits until the tree accepted it.

        Unlike the :meth:`command` decorator, this registers a plain handler untyped (no
        derived schema, no validation) unless ``validate=True`` is passed or the handler
        carries the :func:`cmd_ipc.command` mark (whose arguments then serve as defaults).

        Args:
            command_id: Command id; a leading ``_`` makes it private (never escalated).
            handler: ``def`` or ``async def`` (see the class docstring for how it is called).
            description: Human description, advertised to peers.
            schema: ``{"request": ..., "response": ...}`` JSON Schemas, advertised (as given:
                they are not used to validate).
            validate: ``True`` derives schemas from the type hints and validates as
                :meth:`command` does; ``False`` never; ``None`` follows the handler's mark.

        Raises:
            DuplicateCommandError: Another owner holds the id somewhere in the tree.
            ChannelDisconnectedError: The router channel is not attached or went away.
            CommandTimeoutError: The router did not acknowledge within ``request_ttl``.
            TypeError: ``handler`` is not callable, or its type hints cannot be described.
        """
        self._bind_loop()
        typed = prepare(
            command_id,
            handler,
            description=description,
            schema=schema,
            validate=validate,
            localns=caller_locals(),
        )
        await self._register(command_id, handler, typed)

    async def _register(self, command_id: str, handler: Handler, typed: Prepared) -> None:
        loop = self._bind_loop()
        fut: asyncio.Future[None] = loop.create_future()
        hid = self._add_handler(command_id, handler, typed.boundary)
        self._start_registration(command_id, hid, typed.description, typed.schema, _settle(fut))
        await fut

    def unregister_command(self, command_id: str) -> bool:
        """Removes a local command; returns whether it was registered here.

        The spec has no unregister message: registries that learned the command keep routing
        to this one, which then answers ``not_found``.
        """
        self._check_process()
        if self._off_loop_thread():
            return cast(bool, self._call_on_loop(lambda: self.unregister_command(command_id)))
        self._deferred.pop(command_id, None)
        hid = self._handler_of.pop(command_id, None)
        if hid is not None:
            self._drop_handler(hid)
        return self._node.unregister_local(command_id)

    async def register_service(self, service: object) -> list[str]:
        """Registers every method of ``service`` marked with :func:`cmd_ipc.command`, bound
        to it, and waits until the tree accepted them all.

        Schemas are derived and requests validated as for :meth:`command` (``self`` is not a
        request field), unless a mark says ``validate=False``. If one registration fails,
        those that succeeded are unregistered again and the failure is raised.

        Returns:
            The command ids (methods of subclasses first, then in definition order).

        Raises:
            ValueError: ``service`` has no marked method, or is registered already.
            DuplicateCommandError: One of the ids has another owner in the tree.
            TypeError: A method's type hints cannot be described.

        Example:
            >>> from cmd_ipc import command
            >>> class Maths:
            ...     @command("math.add", description="Adds two numbers")
            ...     def add(self, a: int, b: int) -> int:
            ...         return a + b
            >>> async def main():
            ...     async with CommandRegistry("main") as registry:
            ...         print(await registry.register_service(Maths()))
            ...         return await registry.execute_command("math.add", {"a": 1, "b": 2})
            >>> asyncio.run(main())
            ['math.add']
            3
        """
        return await self._register_service(service, caller_locals())

    async def _register_service(self, service: object, localns: Mapping[str, Any]) -> list[str]:
        self._bind_loop()
        if id(service) in self._services:
            raise ValueError(f"{service!r} is already registered in registry {self.id!r}")
        methods = service_commands(service)
        if not methods:
            raise ValueError(
                f"{type(service).__qualname__} has no method marked with @cmd_ipc.command(...)"
            )
        # Derive every schema first: a method pydantic cannot describe registers nothing.
        typed = [
            (m.command_id, fn, prepare(m.command_id, fn, localns=localns)) for m, fn in methods
        ]
        results = await asyncio.gather(
            *(self._register(cid, fn, t) for cid, fn, t in typed), return_exceptions=True
        )
        ids = [cid for cid, _, _ in typed]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for cid, r in zip(ids, results, strict=True):
                if not isinstance(r, BaseException):
                    self.unregister_command(cid)
            raise failures[0]
        self._services[id(service)] = (service, [(cid, fn) for cid, fn, _ in typed])
        return ids

    def unregister_service(self, service: object) -> list[str]:
        """Unregisters the commands :meth:`register_service` registered for ``service``
        (those another handler has replaced since are left alone).

        Returns:
            The ids removed; empty if ``service`` was not registered here.
        """
        _, handlers = self._services.pop(id(service), (None, []))
        removed = []
        for cid, fn in handlers:
            entry = self._handlers.get(self._handler_of.get(cid, -1))
            if entry is not None and entry.fn is fn:
                self.unregister_command(cid)
                removed.append(cid)
        return removed

    # ------------------------------------------------------------------ calls

    async def execute_command(
        self,
        command_id: str,
        request: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Calls a command wherever it lives in the tree and returns its result.

        Args:
            command_id: The command to call.
            request: The request object (its fields become the handler's keyword arguments).
            timeout: Seconds to wait for the response; defaults to the registry's
                ``request_ttl``.

        Returns:
            The handler's result (``None`` when it returned nothing).

        Raises:
            NotFoundError: No registry on the path has the command.
            InvalidRequestError: The request was rejected before the handler ran.
            InternalError: The handler raised (message only; the traceback stays remote).
            CommandTimeoutError: No response within ``timeout``.
            ChannelDisconnectedError: A channel on the path closed.
            TypeError: ``request`` is not a mapping or cannot be serialised.
        """
        loop = self._bind_loop()
        data = _encode_request(command_id, request)
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        return await self._execute_encoded(loop, command_id, data, timeout)

    async def _execute_encoded(
        self,
        loop: asyncio.AbstractEventLoop,
        command_id: str,
        data: bytes | None,
        timeout: float | None,
    ) -> Any:
        """:meth:`execute_command` of a request already checked and encoded."""
        fut: asyncio.Future[Any] = loop.create_future()
        call, actions = self._node.execute(command_id, data, "msgpack", timeout, loop.time())
        self._outcomes[call] = _settle(fut)
        self._apply(actions)
        if self._native and not fut.done() and not self._spin_scheduled:
            # The reply will come back on a native channel: read it as soon as the loop is
            # idle (spinning briefly) rather than after a doorbell wake-up.
            route = self._node.route_of(command_id)
            if route in self._native:
                self._spin_scheduled = True
                loop.call_soon(self._spin_native, route)
        try:
            return await fut
        except asyncio.CancelledError:
            self._outcomes.pop(call, None)
            self._node.cancel_call(call)
            raise

    async def execute_many(
        self,
        command_id: str,
        requests: Iterable[Mapping[str, Any] | None],
        *,
        timeout: float | None = None,
        window: int = 256,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Calls one command once per request, with up to ``window`` calls in flight, and
        returns the results in request order: the fastest way to make many calls.

        When the command is reached through a native channel, one thread writes requests
        ahead of their replies and reads the replies itself, all in Rust (see
        :meth:`execute_many_sync`; here that thread is the loop's default executor, so the
        loop stays free). Otherwise the calls are made with :meth:`execute_command`.

        Args:
            command_id: The command to call.
            requests: One request per call (each a mapping or ``None``).
            timeout: Seconds each call may take; defaults to the registry's ``request_ttl``.
            window: How many calls may be in flight at once.
            return_exceptions: Put a failed call's :class:`CommandError` in its place in the
                list instead of raising the first one (like :func:`asyncio.gather`).

        Raises:
            CommandError: The first failed call (by position), unless
                ``return_exceptions``; every call has finished by then.
            TypeError: A request is not a mapping or cannot be serialised (nothing is sent).
        """
        loop = self._bind_loop()
        reqs = self._check_many(requests, timeout, window)
        if self._node.route_of(command_id) in self._native:
            out = await loop.run_in_executor(
                None, self._call_many_native, command_id, reqs, timeout, window
            )
            if out is not None:
                return _many_results(*out, return_exceptions)
        return await self._execute_many_loop(command_id, reqs, timeout, window, return_exceptions)

    def execute_many_sync(
        self,
        command_id: str,
        requests: Iterable[Mapping[str, Any] | None],
        *,
        timeout: float | None = None,
        window: int = 256,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Blocking :meth:`execute_many`.

        Over a native channel the calling thread writes up to ``window`` requests ahead of
        their replies and reads the replies itself (spinning, then parking with the GIL
        released), so a worker serves them back to back: this is the library's highest
        throughput. Other routes go through the registry's loop.

        Raises:
            RuntimeError: Called on the registry's own loop thread, or without a running loop.
        """
        # The checks of execute_command_sync, in the same order.
        if self._fork_generation != _FORK_GENERATION[0]:
            self._check_process()
        if self._loop_thread == threading.get_ident():
            raise RuntimeError(
                "execute_many_sync on the registry's own event loop thread would deadlock; "
                "use `await registry.execute_many(...)`"
            )
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")
        reqs = self._check_many(requests, timeout, window)
        if self._node.route_of(command_id) in self._native:
            out = self._call_many_native(command_id, reqs, timeout, window)
            if out is not None:
                return _many_results(*out, return_exceptions)
        return cast(
            "list[Any]",
            self._blocking(
                lambda: self._execute_many_loop(
                    command_id, reqs, timeout, window, return_exceptions
                )
            ),
        )

    def _check_many(
        self, requests: Iterable[Mapping[str, Any] | None], timeout: float | None, window: int
    ) -> list[Any]:
        """Checks a batch's arguments; returns its requests as a list."""
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if isinstance(requests, (Mapping, str, bytes)):
            raise TypeError(
                "requests must be an iterable of requests (one per call), not a single "
                f"{type(requests).__name__}"
            )
        return requests if type(requests) is list else list(requests)

    def _call_many_native(
        self, command_id: str, requests: list[Any], timeout: float | None, window: int
    ) -> tuple[list[Any], list[tuple[Any, ...]]] | None:
        """The pipelined batch over a native channel (Rust); ``None`` if not native."""
        kind, values, others = self._node.call_many_sync(command_id, requests, timeout, window)
        if kind == "encode":  # some request is not plain: encode them all here
            encoded = [_encode_request(command_id, r) for r in requests]
            kind, values, others = self._node.call_many_sync(
                command_id, encoded, timeout, window, True
            )
        if kind == "fallback":
            return None
        return values, others

    async def _execute_many_loop(
        self,
        command_id: str,
        requests: list[Any],
        timeout: float | None,
        window: int,
        return_exceptions: bool,
    ) -> list[Any]:
        """The batch through :meth:`execute_command`, ``window`` lanes at a time."""
        loop = self._bind_loop()
        # Every request is checked (encoded) before anything is sent.
        encoded = [_encode_request(command_id, r) for r in requests]
        results: list[Any] = [None] * len(requests)
        todo = iter(enumerate(encoded))

        async def lane() -> None:
            for i, data in todo:
                try:
                    results[i] = await self._execute_encoded(loop, command_id, data, timeout)
                except CommandError as e:
                    results[i] = e

        lanes = [asyncio.ensure_future(lane()) for _ in range(min(window, len(requests)))]
        try:
            await asyncio.gather(*lanes)
        except BaseException:
            for t in lanes:  # an unexpected failure (or a cancel) stops the other lanes too
                t.cancel()
            raise
        if not return_exceptions:
            for r in results:
                if isinstance(r, CommandError):
                    raise r
        return results

    def list_commands(self) -> list[dict[str, Any]]:
        """Every command this registry can route to, as spec command definitions.

        Returns:
            ``[{"id": ..., "description"?: ..., "schema"?: {"request"?, "response"?}}]``,
            sorted by id: local commands (private ones included, they are callable here),
            commands registered by child registries, and commands peers advertised.
        """
        out: list[dict[str, Any]] = []
        for cid, desc, req, resp in self._node.list_commands():
            d: dict[str, Any] = {"id": cid}
            if desc is not None:
                d["description"] = desc
            if req is not None or resp is not None:
                schema: dict[str, Any] = {}
                if req is not None:
                    schema["request"] = json.loads(req)
                if resp is not None:
                    schema["response"] = json.loads(resp)
                d["schema"] = schema
            out.append(d)
        return out

    def route_of(self, command_id: str) -> str | None:
        """Where a call of ``command_id`` would go from here: ``"local"``, a channel id, or
        ``None`` (``not_found``)."""
        return self._node.route_of(command_id)

    # ------------------------------------------------------------------ events

    def emit_event(self, event_id: str, payload: Any = None) -> None:
        """Emits an event: delivered to local listeners once, and to every registry of the
        tree once (unless ``event_id`` starts with ``_``, which keeps it local).

        Sync listeners run before this returns; async ones are scheduled. The payload may be
        (or contain) pydantic models, dataclasses, enums, datetimes...: they travel as
        JSON-compatible data (:func:`cmd_ipc.commands.to_wire`).
        """
        self._check_process()
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")
        if self._off_loop_thread():
            # Called from another thread while the loop runs (the blocking API): emit on
            # the loop's thread, where listeners and channels live.
            self._call_on_loop(lambda: self.emit_event(event_id, payload))
            return
        try:
            data = None if payload is None else _encode(payload)
        except Exception as e:
            raise TypeError(f"payload of {event_id!r} cannot be serialised: {e}") from e
        _, actions = self._node.emit_event(event_id, data, "msgpack", self._now())
        self._apply(actions)

    def add_event_listener(
        self, event_id: str, fn: Listener, *, validate: bool = False
    ) -> Callable[[], None]:
        """Calls ``fn(payload)`` for every ``event_id`` event; returns an unsubscribe callable.

        Args:
            event_id: The event to listen to.
            fn: ``def`` or ``async def`` taking the payload.
            validate: Validate and convert the payload to the annotation of ``fn``'s first
                parameter (a model, dataclass, TypedDict...), as :meth:`on` does by default; a
                payload that does not fit is logged as a warning and ``fn`` is not called.

        Raises:
            TypeError: ``fn`` is not callable, or its annotation cannot be resolved or
                described.
        """
        self._listen(event_id, fn, caller_locals() if validate else None)
        return functools.partial(self.remove_event_listener, event_id, fn)

    def _listen(self, event_id: str, fn: Listener, localns: dict[str, Any] | None) -> None:
        """Adds a listener; ``localns`` (the registering code's names) given: validated."""
        if not callable(fn):
            raise TypeError("listener must be callable")
        convert = listener_converter(event_id, fn, localns) if localns is not None else None
        self._listeners.setdefault(event_id, []).append((fn, convert))

    def remove_event_listener(self, event_id: str, fn: Listener) -> None:
        """Removes a listener added with :meth:`add_event_listener` (no error if absent)."""
        entries = self._listeners.get(event_id)
        if not entries:
            return
        for i, (listener, _) in enumerate(entries):
            if listener == fn:
                del entries[i]
                break
        if not entries:
            del self._listeners[event_id]

    def on(self, event_id: str, *, validate: bool = True) -> Callable[[F], F]:
        """Decorator form of :meth:`add_event_listener`, validating typed payloads by default.

        Example:
            >>> from pydantic import BaseModel
            >>> class UserUpdated(BaseModel):
            ...     id: int
            >>> async def main():
            ...     async with CommandRegistry("main") as registry:
            ...         @registry.on("user.updated")
            ...         def updated(event: UserUpdated) -> None:
            ...             print(repr(event))
            ...         registry.emit_event("user.updated", {"id": "7"})
            >>> asyncio.run(main())
            UserUpdated(id=7)
        """
        localns = caller_locals() if validate else None

        def decorator(fn: F) -> F:
            self._listen(event_id, fn, localns)
            return fn

        return decorator

    def _deliver_event(self, event_id: str, data: bytes | None, enc: str | None) -> None:
        fns = self._listeners.get(event_id)
        if not fns:
            return
        try:
            payload = _decode(data, enc)
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

    # ------------------------------------------------------------------ channels

    async def register_channel(self, channel: Channel | NativeChannel) -> None:
        """Attaches a channel and starts exchanging messages over it.

        The registry asks the peer for its commands. If this is the router channel, commands
        declared with :meth:`command` while it was missing are registered now, and this
        waits for their acknowledgements.

        Raises:
            ValueError: A channel with the same id is already attached.
            DuplicateCommandError: A deferred command was rejected by the tree.
        """
        loop = self._bind_loop()
        if channel.id in self._channels:
            raise ValueError(f"registry {self.id!r} already has a channel {channel.id!r}")
        if isinstance(channel, NativeChannel):
            self._attach_native(loop, channel)
            self._router_back(channel.id)
            if channel.id == self.router_channel and self._deferred:
                await self._flush_deferred()
            return
        actions = self._node.add_channel(channel.id, channel.encoding)
        self._channels[channel.id] = channel
        try:
            await channel.start(
                functools.partial(self._on_frame, channel.id, channel),
                functools.partial(self._on_close, channel.id, channel),
            )
        except BaseException:
            self._channels.pop(channel.id, None)
            if self._node.has_channel(channel.id):
                self._apply(self._node.close_channel(channel.id))
            raise
        self._apply(actions)
        self._router_back(channel.id)
        if channel.id == self.router_channel and self._deferred:
            await self._flush_deferred()
        if channel.wait_for_commands and not await self.wait_listed(
            channel.id, timeout=self.request_ttl
        ):
            if channel.id not in self._channels:
                raise ChannelDisconnectedError(
                    f"channel {channel.id!r} closed before its peer listed its commands"
                )
            logger.warning(
                "peer of channel %r did not list its commands within %ss",
                channel.id,
                self.request_ttl,
            )

    def _router_back(self, channel_id: str) -> None:
        """A router channel attached again after a disconnect forgot what this subtree had
        registered through it: announce it again (rejections are logged)."""
        if channel_id != self.router_channel:
            return
        if self._router_seen:
            n, actions = self._node.reannounce(self._now())
            if n:
                logger.info("registry %r re-registered %d commands with %r", self.id, n, channel_id)
            self._apply(actions)
        self._router_seen = True

    async def _flush_deferred(self) -> None:
        loop = self._bind_loop()
        waits: list[asyncio.Future[None]] = []
        deferred, self._deferred = self._deferred, {}
        for command_id, (hid, description, schema) in deferred.items():
            fut: asyncio.Future[None] = loop.create_future()
            self._start_registration(command_id, hid, description, schema, _settle(fut))
            waits.append(fut)
        results = await asyncio.gather(*waits, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors[1:]:
            logger.error("registration failed: %s", e)
        if errors:
            raise errors[0]

    def _on_frame(self, channel_id: str, channel: Channel, frame: bytes) -> None:
        if self._channels.get(channel_id) is not channel:
            return
        try:
            actions = self._node.handle_frame(channel_id, frame, self._now())
        except KeyError:
            return
        self._apply(actions)

    def _on_close(self, channel_id: str, channel: Channel, reason: str | None) -> None:
        if self._channels.get(channel_id) is not channel:
            return
        del self._channels[channel_id]
        self._listed.discard(channel_id)
        if reason:
            logger.info("channel %r of registry %r closed: %s", channel_id, self.id, reason)
        self._apply(self._node.close_channel(channel_id))
        self._notify_closed(channel_id, reason or "closed")
        if reason is not None and not self._closed and channel.reconnects:
            self._spawn(self._reattach(channel))

    async def _reattach(self, channel: Channel) -> None:
        """Waits for a reconnecting channel to connect again, then attaches it again (which
        re-registers this subtree's commands if it is the router channel)."""
        try:
            if not await channel.reconnect():
                return
            if self._closed or channel.id in self._channels:
                # Nobody to give the new connection to (or the id was taken meanwhile).
                await channel.close()
                return
            await self.register_channel(channel)
        except asyncio.CancelledError:
            # The registry is closing: the channel goes with it.
            await asyncio.shield(channel.close())
            raise
        except Exception as e:
            logger.warning(
                "registry %r could not re-attach channel %r (it stays closed): %s",
                self.id,
                channel.id,
                e,
            )
            await channel.close()

    def _attach_native(self, loop: asyncio.AbstractEventLoop, channel: NativeChannel) -> None:
        actions = self._node.add_native_channel(
            channel.id, channel.sock_fd, channel.encoding, channel.shm_fd, channel.side
        )
        # The node holds its own duplicates of the descriptors.
        channel.close_fds()
        fd = self._node.native_fd(channel.id)
        self._channels[channel.id] = channel
        self._native[channel.id] = channel
        if fd is not None:
            self._native_fds[channel.id] = fd
            loop.add_reader(fd, self._on_native, channel.id)
        self._apply(actions)
        # Frames may already be waiting (the peer may have spoken first).
        self._on_native(channel.id)

    def _on_native(self, channel_id: str) -> None:
        """The channel's socket is readable: read and route in Rust, then carry out what
        Python must (the poll spins briefly for the next frame before parking)."""
        ready = getattr(self._loop, "_ready", None)
        while channel_id in self._native:
            # Spin for the next frame only when the loop has nothing else to run: a spin
            # while a resumed caller waits would only delay it.
            spin = self.spin_us if ready is not None and not ready else 0
            actions, again, want_write, busy = self._node.poll_native(channel_id, spin)
            if busy:
                # A blocking caller is reading this channel: step aside (a level-triggered
                # watch would spin on its bytes) and look again shortly. Frames that arrive
                # meanwhile are read and routed by that caller.
                fd = self._native_fds.get(channel_id)
                if fd is not None and self._loop is not None:
                    self._loop.remove_reader(fd)
                    self._loop.call_later(_RESUME_AFTER, self._resume_native, channel_id)
                return
            if actions:
                self._apply(actions)
            if want_write and self._loop is not None:
                fd = self._native_fds.get(channel_id)
                if fd is not None:
                    self._loop.add_writer(fd, self._on_native_writable, channel_id)
            if not again:
                break

    def _spin_native(self, channel_id: str) -> None:
        self._spin_scheduled = False
        if channel_id in self._native:
            self._on_native(channel_id)

    def _on_native_writable(self, channel_id: str) -> None:
        if not self._node.flush_native(channel_id) and self._loop is not None:
            fd = self._native_fds.get(channel_id)
            if fd is not None:
                self._loop.remove_writer(fd)

    def _resume_native(self, channel_id: str) -> None:
        fd = self._native_fds.get(channel_id)
        if fd is None or self._loop is None:
            return
        if self._node.native_busy(channel_id):
            self._loop.call_later(_RESUME_AFTER, self._resume_native, channel_id)
            return
        self._loop.add_reader(fd, self._on_native, channel_id)
        self._on_native(channel_id)

    def _on_wake(self) -> None:
        """Actions queued by another thread (a blocking caller that read a frame)."""
        self._apply(self._node.take_queued())

    def _native_closed(self, channel_id: str, reason: str) -> None:
        channel = self._native.pop(channel_id, None)
        if channel is None:
            return
        self._channels.pop(channel_id, None)
        self._listed.discard(channel_id)
        fd = self._native_fds.pop(channel_id, None)
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        worker = self._workers.get(channel_id)
        expected = (
            reason == "closed locally"
            or self._closed
            or (worker is not None and worker._stopping)
            or (channel_id == self.router_channel and self._stopping_worker)
            or (channel_id in self._sibling_links and reason == "peer closed the channel")
        )
        self._sibling_links.discard(channel_id)
        level = logging.INFO if expected else logging.WARNING
        logger.log(level, "channel %r of registry %r closed: %s", channel_id, self.id, reason)
        self._notify_closed(channel_id, reason)

    def _notify_closed(self, channel_id: str, reason: str) -> None:
        waiter = self._listed_waiters.pop(channel_id, None)
        if waiter is not None:
            waiter.set()
        for fn in list(self._close_listeners):
            try:
                fn(channel_id, reason)
            except Exception:
                logger.exception("channel close listener failed")

    def add_close_listener(self, fn: Callable[[str, str], None]) -> Callable[[], None]:
        """Calls ``fn(channel_id, reason)`` when a channel closes (for whatever reason);
        returns an unsubscribe callable. (Worker supervision and reconnecting channels use
        it.)"""
        self._close_listeners.append(fn)
        return functools.partial(self._close_listeners.remove, fn)

    async def wait_listed(self, channel_id: str, timeout: float = 5.0) -> bool:
        """Waits until the peer behind ``channel_id`` answered the command list request sent
        when the channel was registered, so that its commands are routed directly; returns
        False if that did not happen within ``timeout`` seconds (the peer may not answer) or
        the channel closed first."""
        self._bind_loop()
        if channel_id in self._listed:
            return True
        if channel_id not in self._channels:
            return False
        waiter = self._listed_waiters.setdefault(channel_id, asyncio.Event())
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        # Woken by the list response, or by the channel's close.
        return channel_id in self._listed

    async def close_channel(self, channel_id: str) -> None:
        """Closes one channel by id; calls waiting on it fail with ``channel_disconnected``.

        Raises:
            KeyError: No channel of that id is attached.
        """
        self._bind_loop()
        channel = self._channels.get(channel_id)
        if channel is None:
            raise KeyError(f"registry {self.id!r} has no channel {channel_id!r}")
        if isinstance(channel, NativeChannel):
            self._apply(self._node.close_native(channel_id))
        else:
            await channel.close()

    @property
    def channels(self) -> dict[str, Channel | NativeChannel]:
        """The attached channels by id (a copy)."""
        return dict(self._channels)

    # ------------------------------------------------------------------ workers

    async def spawn_worker(
        self,
        worker_id: str,
        target: str,
        *,
        transport: Transport = "shm",
        ring_size: int = DEFAULT_RING_SIZE,
        restart: RestartPolicy | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        cpu: int | None = None,
    ) -> Worker:
        """Starts a worker process joined to this registry over a native channel.

        The child runs ``sys.executable``, builds ``CommandRegistry(worker_id,
        router_channel=self.id)`` connected to this registry, imports ``target``
        (``"package.module:function"``) and calls ``function(registry)`` (sync or async) to
        register commands. This returns once those registrations were acknowledged by the
        tree. The worker serves until :meth:`Worker.stop`, this registry's :meth:`close`, or
        this process's death.

        Args:
            worker_id: The worker's registry id, and this registry's channel id for it.
            target: ``"package.module:function"``, importable in the child.
            transport: ``"shm"`` (shared-memory rings, the fastest) or ``"pipe"`` (a Unix
                socket).
            ring_size: Capacity of each shared-memory ring, in bytes.
            restart: Restart the worker with backoff when it exits unasked; it re-registers
                its commands, which the tree accepts as they come from the same channel.
            env: The child's environment (default: this process's).
            ready_timeout: Seconds to wait for the worker to be ready.
            cpu: Pin the worker to this CPU.

        Raises:
            WorkerError: The target failed, or the child exited or stalled before ready.
        """
        self._bind_loop()
        worker = await _spawn_worker(
            self,
            worker_id,
            target,
            transport=transport,
            ring_size=ring_size,
            restart=restart,
            env=env,
            ready_timeout=ready_timeout,
            cpu=cpu,
        )
        self._workers[worker_id] = worker
        return worker

    async def connect_workers(
        self, worker_a: Worker, worker_b: Worker, *, ring_size: int = DEFAULT_RING_SIZE
    ) -> None:
        """Opens a direct shared-memory channel between two workers of this registry.

        Each learns the other's commands (and those of its sub-workers) and calls them
        directly from then on, instead of through this registry.
        """
        self._bind_loop()
        await _connect_workers(worker_a, worker_b, ring_size=ring_size)

    @property
    def workers(self) -> dict[str, Worker]:
        """Workers spawned by this registry and not stopped, by id (a copy)."""
        return dict(self._workers)

    # ------------------------------------------------------------------ blocking API

    def __enter__(self) -> CommandRegistry:
        """Runs the registry's event loop on a background thread, for the ``*_sync``
        methods: ``with CommandRegistry("main") as registry: ...``."""
        self._check_process()
        if self._loop is not None:
            raise RuntimeError(f"registry {self.id!r} already runs on an event loop")
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name=f"cmd-ipc-{self.id}", daemon=True)
        thread.start()
        started.wait()
        self._background = thread
        asyncio.run_coroutine_threadsafe(self.__aenter__(), loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        loop, thread = self._loop, self._background
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()
            self._background = None

    def _blocking(self, make: Callable[[], Awaitable[Any]], timeout: float | None = None) -> Any:
        self._check_process()
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError(
                f"registry {self.id!r} has no running event loop: use "
                "`with CommandRegistry(...) as registry:` for the blocking API"
            )
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "a blocking call on the registry's own event loop thread would deadlock; "
                "use the `await` form instead"
            )
        coro = make()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)  # type: ignore[arg-type]

    def execute_command_sync(
        self,
        command_id: str,
        request: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Blocking :meth:`execute_command`, for code without asyncio.

        Over a native channel this is the fastest call in the library: the calling thread
        writes the request and waits for its own reply on the channel (spinning briefly,
        then parking with the GIL released), with no hand-off to the loop thread. Other
        routes go through the registry's loop.

        Raises:
            RuntimeError: Called on the registry's own loop thread (it would deadlock), or
                without a running loop.
        """
        # The hot path of the library: the checks are written out (no helper calls).
        if self._fork_generation != _FORK_GENERATION[0]:
            self._check_process()
        if self._loop_thread == threading.get_ident():
            raise RuntimeError(
                "execute_command_sync on the registry's own event loop thread would deadlock; "
                "use `await registry.execute_command(...)`"
            )
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        # A dict of plain values is encoded, and a plain result decoded, in Rust.
        kind, value, extra = self._node.call_sync(command_id, request, timeout)
        if kind == "value":
            return value
        if kind == "encode":  # not a dict of plain values: checked and encoded here
            data = _encode_request(command_id, request)
            kind, value, extra = self._node.call_sync(command_id, data, timeout, True)
            if kind == "value":
                return value
        if kind == "result":
            return _decode(value, extra)
        if kind == "error":
            raise error_from_code(value, extra)
        return self._blocking(lambda: self.execute_command(command_id, request, timeout=timeout))

    def register_command_sync(
        self,
        command_id: str,
        handler: Handler,
        description: str | None = None,
        schema: Mapping[str, Any] | None = None,
        *,
        validate: bool | None = None,
    ) -> None:
        """Blocking :meth:`register_command`."""
        typed = prepare(
            command_id,
            handler,
            description=description,
            schema=schema,
            validate=validate,
            localns=caller_locals(),
        )
        self._blocking(lambda: self._register(command_id, handler, typed))

    def register_service_sync(self, service: object) -> list[str]:
        """Blocking :meth:`register_service`."""
        localns = caller_locals()
        return cast("list[str]", self._blocking(lambda: self._register_service(service, localns)))

    def register_channel_sync(self, channel: Channel | NativeChannel) -> None:
        """Blocking :meth:`register_channel`."""
        self._blocking(lambda: self.register_channel(channel))

    def spawn_worker_sync(self, worker_id: str, target: str, **kwargs: Any) -> Worker:
        """Blocking :meth:`spawn_worker` (same arguments)."""
        return cast(Worker, self._blocking(lambda: self.spawn_worker(worker_id, target, **kwargs)))

    def connect_workers_sync(self, worker_a: Worker, worker_b: Worker, **kwargs: Any) -> None:
        """Blocking :meth:`connect_workers`."""
        self._blocking(lambda: self.connect_workers(worker_a, worker_b, **kwargs))

    def stop_worker_sync(self, worker: Worker, timeout: float = 5.0) -> int | None:
        """Blocking :meth:`Worker.stop`."""
        return cast("int | None", self._blocking(lambda: worker.stop(timeout)))

    # ------------------------------------------------------------------ stats and lifecycle

    def stats(self) -> dict[str, Any]:
        """Counters that show which way messages went.

        Returns:
            ``{"channels": {channel_id: {"sent": n, "received": n}}, "forwarded": n,
            "pending": n, "pending_forwards": n, "dropped": n, "dedup_entries": n,
            "jobs": n}``:
            ``forwarded`` counts requests this registry forwarded for others, ``pending``
            calls of this registry waiting for a result, ``dropped`` messages dropped as
            invalid, spoofed, duplicate or undeliverable, ``jobs`` handler runs in
            progress.
        """
        return self._node.stats()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    async def close(self) -> None:
        """Closes every channel (failing calls waiting on them) and cancels running handlers.

        Idempotent. Calls still waiting fail with ``channel_disconnected``.
        """
        if self._closed:
            return
        workers = list(self._workers.values())
        if workers:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        self._closed = True
        if self._native:
            self._apply(self._node.close_all_native())
        for channel in list(self._channels.values()):
            if isinstance(channel, NativeChannel):
                continue
            try:
                await channel.close()
            except Exception:
                logger.exception("closing channel %r failed", channel.id)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        outcomes, self._outcomes = self._outcomes, {}
        for outcome in outcomes.values():
            outcome(None, ChannelDisconnectedError(f"registry {self.id!r} closed"))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._node.wake_fd)

    async def __aenter__(self) -> CommandRegistry:
        self._bind_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _settle(fut: asyncio.Future[Any]) -> _Outcome:
    def outcome(value: Any, err: BaseException | None) -> None:
        if fut.done():
            return
        if err is None:
            fut.set_result(value)
        else:
            fut.set_exception(err)

    return outcome


async def _log_failure(awaitable: Awaitable[Any], event_id: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("listener of event %r failed", event_id)
