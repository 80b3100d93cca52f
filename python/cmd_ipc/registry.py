"""The :class:`CommandRegistry`: the Python face of one registry in a cmd-ipc tree.

Every routing decision is taken by the Rust router (``cmd_ipc._core.Node``). This module is a
facade over collaborators that each get what they need injected and never see the registry:

* :mod:`cmd_ipc._driver` -- the event loop side: actions, timers, native reads, waiting calls;
* :mod:`cmd_ipc._dispatch` -- the handler table and the runs of handlers (jobs);
* :mod:`cmd_ipc._registration` -- registrations with the tree (deferred, acknowledged);
* :mod:`cmd_ipc._channels` -- the attached channels: attach, frames in, closes, reconnects;
* :mod:`cmd_ipc._events` -- the listener table and event delivery;
* :mod:`cmd_ipc._sync` -- the background loop and the blocking (native) calls;
* :mod:`cmd_ipc._payload` -- encoding of application values;
* :mod:`cmd_ipc.workers` -- the worker table (spawn, connect, stop, restart).

What stays here is the public API (with its documentation) and the calls.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from cmd_ipc import _core
from cmd_ipc._channels import ChannelTable
from cmd_ipc._dispatch import Dispatcher
from cmd_ipc._driver import FORK_GENERATION, Driver, settle
from cmd_ipc._events import EventlessChannels, Listeners
from cmd_ipc._payload import (
    Handler,
    Listener,
    command_def,
    encode,
    encode_request,
    many_results,
    unpack,
)
from cmd_ipc._registration import Registrations
from cmd_ipc._sync import (
    FALLBACK,
    BackgroundLoop,
    call_many_native,
    call_native,
    check_many,
    check_timeout,
    in_lanes,
    run_blocking,
)
from cmd_ipc.channels.base import Channel
from cmd_ipc.channels.native import DEFAULT_RING_SIZE, NativeChannel, Transport
from cmd_ipc.commands import caller_locals, prepare
from cmd_ipc.errors import ChannelDisconnectedError
from cmd_ipc.workers import Pool, RestartPolicy, Worker, WorkerHost, WorkerTable

__all__ = ["CommandRegistry", "Handler", "Listener"]

logger = logging.getLogger("cmd_ipc")

F = TypeVar("F", bound=Callable[..., Any])


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
        max_pending_per_channel: Maximum requests of one channel served here at once
            (handler runs plus forwards; default: half of ``max_pending``, so one peer never
            takes every slot); beyond it that channel's requests are answered
            ``internal_error`` at once.
        max_commands_per_channel: Maximum commands one channel may register (or list) here.
        max_command_size: Maximum bytes of one command definition a peer registers or lists
            (id, description and schemas).
        max_dedup: Maximum event ids remembered.
        max_message_size: Maximum encoded size of a message, in bytes.
        max_depth: Maximum nesting depth of a message.
        max_outbox: Maximum bytes waiting in this registry to be written to one native
            channel whose peer does not read (a stopped worker); beyond it messages to that
            peer are refused: events and replies dropped and counted in its
            ``stats()["channels"][id]["dropped"]``, calls failed at once with
            ``internal_error``.
        slow_consumer_timeout: Seconds a native channel's outbox may stay full before the
            channel is closed (reason ``slow_consumer``; its waiting calls fail with
            ``channel_disconnected``).
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
        max_pending_per_channel: int | None = None,
        max_commands_per_channel: int = 10_000,
        max_command_size: int = 256 * 1024,
        max_outbox: int = 64 * 1024 * 1024,
        slow_consumer_timeout: float = 10.0,
    ) -> None:
        # Workers spawned here get the same limits (see WorkerHost.limits).
        limits: dict[str, Any] = {
            "max_pending": max_pending,
            "max_dedup": max_dedup,
            "max_message_size": max_message_size,
            "max_depth": max_depth,
            "max_pending_per_channel": max_pending_per_channel,
            "max_commands_per_channel": max_commands_per_channel,
            "max_command_size": max_command_size,
            "max_outbox": max_outbox,
            "slow_consumer_timeout": slow_consumer_timeout,
        }
        self._node = _core.Node(
            id,
            router_channel,
            request_ttl=request_ttl,
            event_ttl=event_ttl,
            spin_us=spin_us,
            **limits,
        )
        self._node.set_fast_codec(unpack, encode)
        self._id = id
        self._router_channel = router_channel
        self._request_ttl = request_ttl
        self._spin_us = spin_us
        driver = self._driver = Driver(self._node, id, spin_us)
        self._dispatch = Dispatcher(self._node, id, complete=driver.complete, spawn=driver.spawn)
        self._listeners = Listeners(driver.spawn)
        self._eventless = EventlessChannels(id)
        self._workers = WorkerTable(
            WorkerHost(
                id=id,
                request_ttl=request_ttl,
                spin_us=spin_us,
                limits=limits,
                register_channel=self.register_channel,
                close_channel=self.close_channel,
                has_channel=lambda channel_id: channel_id in self._channels.by_id,
                is_closed=lambda: self.closed,
                expect_close=self.expect_close,
                unexpect_close=lambda channel_id: self._channels.unexpect_close(channel_id),
                add_close_listener=self.add_close_listener,
                set_pool=self._node.set_pool,
                commands_changed=lambda: self._channels.watch.poke(),
            )
        )
        self._background: BackgroundLoop | None = None
        self._channels = ChannelTable(
            self._node,
            driver,
            id,
            router_channel=router_channel,
            request_ttl=request_ttl,
            on_router=self._router_attached,
        )
        self._registrations = Registrations(
            self._node,
            driver,
            self._dispatch,
            id,
            router_missing=self._router_missing,
            on_change=self._channels.watch.poke,
        )
        #: Whether the router channel was attached once (a second attach re-announces).
        self._router_seen = False
        self._closed = False
        dispatch, listeners = self._dispatch, self._listeners
        driver.on(_core.ACTION_RUN, lambda a: dispatch.run(a[1], a[2], a[3], a[4], a[5]))
        driver.on(_core.ACTION_EVENT, lambda a: listeners.deliver(a[1], a[2], a[3]))
        fast = lambda a: dispatch.finish_fast(a[0], a[1], a[2], a[3], a[4])  # noqa: E731
        for kind in (
            _core.ACTION_FAST_FAILED,
            _core.ACTION_FAST_AWAIT,
            _core.ACTION_FAST_UNENCODABLE,
        ):
            driver.on(kind, fast)
        driver.on(_core.ACTION_DROPPED, self._log_dropped)

    @property
    def id(self) -> str:
        """This registry's id."""
        return self._id

    @property
    def router_channel(self) -> str | None:
        """The id of the channel to the parent registry (``None`` for a root)."""
        return self._router_channel

    @property
    def request_ttl(self) -> float:
        """Seconds a call waits for its response unless it says otherwise."""
        return self._request_ttl

    @property
    def limits(self) -> dict[str, Any]:
        """The limits this registry was made with, by keyword (``max_message_size``,
        ``max_depth``, ``max_pending``, ``max_pending_per_channel`` (``None``: half of
        ``max_pending``)...), a copy: servers in front of it check what they accept alike."""
        return dict(self._workers.host.limits)

    @property
    def spin_us(self) -> int:
        """Microseconds a native read spins for the next frame before parking."""
        return self._spin_us

    def __repr__(self) -> str:
        return f"<CommandRegistry id={self.id!r} channels={sorted(self._channels.by_id)}>"

    # ------------------------------------------------------------------ actions of the facade

    def _log_dropped(self, act: tuple[Any, ...]) -> None:
        _, channel_id, kind, reason = act
        quiet = kind == "duplicate_event" or (
            kind == "undeliverable"
            and (self._closed or self._channels.expected(self.router_channel))
        )
        level = logging.DEBUG if quiet else logging.WARNING
        logger.log(level, "registry %r dropped a message from %r: %s", self.id, channel_id, reason)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        return self._driver.bind()

    # ------------------------------------------------------------------ registration

    def _router_missing(self) -> bool:
        return self.router_channel is not None and self.router_channel not in self._channels.by_id

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
            self._driver.check_process()
            if self._closed:
                raise RuntimeError(f"registry {self.id!r} is closed")
            if self._driver.off_loop_thread():
                # Registration touches the loop's state: do it on the loop's thread.
                return cast(F, self._driver.call_on_loop(lambda: decorator(fn)))
            typed = prepare(
                command_id,
                fn,
                description=description,
                schema=schema,
                validate=validate,
                localns=localns,
            )
            self._registrations.declare(command_id, fn, typed)
            return fn

        return decorator

    async def ready(self) -> None:
        """Waits until every registration started so far (with :meth:`command` too) was
        acknowledged by the tree.

        Raises:
            DuplicateCommandError: One of them was rejected (the first failure is raised).
        """
        self._bind_loop()
        await self._registrations.ready()

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
        await self._registrations.register(command_id, handler, typed)

    def unregister_command(self, command_id: str) -> bool:
        """Removes a local command; returns whether it was registered here.

        The spec has no unregister message: registries that learned the command keep routing
        to this one, which then answers ``not_found``.
        """
        self._driver.check_process()
        if self._driver.off_loop_thread():
            return cast(
                bool, self._driver.call_on_loop(lambda: self.unregister_command(command_id))
            )
        return self._registrations.unregister(command_id)

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
        self._bind_loop()
        return await self._registrations.register_service(service, caller_locals())

    def unregister_service(self, service: object) -> list[str]:
        """Unregisters the commands :meth:`register_service` registered for ``service``
        (those another handler has replaced since are left alone).

        Returns:
            The ids removed; empty if ``service`` was not registered here.
        """
        self._driver.check_process()
        if self._driver.off_loop_thread():
            return cast(
                "list[str]", self._driver.call_on_loop(lambda: self.unregister_service(service))
            )
        return self._registrations.unregister_service(service)

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
        data = encode_request(command_id, request)
        check_timeout(timeout)
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
        driver = self._driver
        driver.expect(call, settle(fut))
        driver.apply(actions)
        if driver.has_native and not fut.done():
            # The reply will come back on a native channel: read it as soon as the loop is
            # idle (spinning briefly) rather than after a doorbell wake-up.
            route = self._node.route_of(command_id)
            if route is not None and driver.is_native(route):
                driver.read_soon(route, call)
        try:
            return await fut
        except asyncio.CancelledError:
            driver.forget(call)
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
        reqs = check_many(requests, timeout, window)
        if self._driver.is_native(self._node.route_of(command_id)):
            out = await loop.run_in_executor(
                None, call_many_native, self._node, command_id, reqs, timeout, window
            )
            if out is not None:
                return many_results(*out, return_exceptions)
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
        self._check_blocking_call("execute_many_sync", "execute_many")
        reqs = check_many(requests, timeout, window)
        if self._driver.is_native(self._node.route_of(command_id)):
            out = call_many_native(self._node, command_id, reqs, timeout, window)
            if out is not None:
                return many_results(*out, return_exceptions)
        return cast(
            "list[Any]",
            self.run_blocking(
                lambda: self._execute_many_loop(
                    command_id, reqs, timeout, window, return_exceptions
                )
            ),
        )

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
        encoded = [encode_request(command_id, r) for r in requests]
        results = await in_lanes(
            lambda data: self._execute_encoded(loop, command_id, data, timeout), encoded, window
        )
        return many_results(results, [], return_exceptions)

    def list_commands(self) -> list[dict[str, Any]]:
        """Every command this registry can route to, as spec command definitions.

        Returns:
            ``[{"id": ..., "description"?: ..., "schema"?: {"request"?, "response"?}}]``,
            sorted by id: local commands (private ones included, they are callable here),
            commands registered by child registries, and commands peers advertised.
        """
        return [command_def(*row) for row in self._node.list_commands()]

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
        self._driver.check_process()
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")
        if self._driver.off_loop_thread():
            # Called from another thread while the loop runs (the blocking API): emit on
            # the loop's thread, where listeners and channels live.
            self._driver.call_on_loop(lambda: self.emit_event(event_id, payload))
            return
        try:
            data = None if payload is None else encode(payload)
        except Exception as e:
            raise TypeError(f"payload of {event_id!r} cannot be serialised: {e}") from e
        _, actions = self._node.emit_event(event_id, data, "msgpack", self._driver.now())
        self._driver.apply(actions)
        self._eventless.emitted(event_id, self._channels.by_id)

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
        self._listeners.add(event_id, fn, caller_locals() if validate else None)
        return functools.partial(self.remove_event_listener, event_id, fn)

    def remove_event_listener(self, event_id: str, fn: Listener) -> None:
        """Removes a listener added with :meth:`add_event_listener` (no error if absent)."""
        self._listeners.remove(event_id, fn)

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
            self._listeners.add(event_id, fn, localns)
            return fn

        return decorator

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
        self._bind_loop()
        await self._channels.attach(channel)
        self._eventless.attached(channel.id, channel, self._listeners.listening())

    async def _router_attached(self) -> None:
        """The router channel attached: announce to it what this subtree registered while it
        was missing (children that registered before its first attach, and everything again
        after a disconnect, which made the router forget; rejections are logged). Commands
        declared here while it was missing are registered now."""
        n, actions = self._node.reannounce(self._driver.now())
        if n:
            logger.info(
                "registry %r %s %d commands with %r",
                self.id,
                "re-registered" if self._router_seen else "registered its children's",
                n,
                self.router_channel,
            )
        self._driver.apply(actions)
        self._router_seen = True
        await self._registrations.flush_deferred()

    def expect_close(self, channel_id: str, reason: str | None = None) -> None:
        """Marks the coming close of ``channel_id`` as asked for, so it is logged at INFO
        rather than as a WARNING (workers being stopped, a parent that told this worker to
        stop). With ``reason``, only a close for that reason is expected (a sibling link
        whose peer goes away: the parent reports that death). Holds until a channel of that
        id is attached again; no-op for an unknown channel."""
        self._channels.expect_close(channel_id, reason)

    def on_commands_changed(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Calls ``fn()`` whenever the set of commands this registry can route to changed
        (what :meth:`list_commands` returns: a command registered here or by a child, a
        worker that became ready, a peer that listed its commands, a channel or a worker
        that went away, a description or schema that changed); returns an idempotent
        unsubscribe callable.

        ``fn`` runs on the registry's loop thread, once per turn of the loop however many
        changes that turn saw, and only when the list differs from the one it last saw
        (read it with :meth:`list_commands`). Changes seen only between native channels (a
        worker's sub-worker registering after its worker was ready) are caught by a check
        every 2 s made while someone listens. The MCP server (:mod:`cmd_ipc.mcp`) sends
        ``notifications/tools/list_changed`` from it.

        Example:
            >>> async def main():
            ...     async with CommandRegistry("main") as registry:
            ...         changed = asyncio.Event()
            ...         registry.on_commands_changed(changed.set)
            ...         await registry.register_command("calc.add", lambda a, b: a + b)
            ...         await asyncio.wait_for(changed.wait(), 5)
            ...         return [c["id"] for c in registry.list_commands()]
            >>> asyncio.run(main())
            ['calc.add']
        """
        self._driver.check_process()
        if self._driver.off_loop_thread():
            return cast(
                "Callable[[], None]",
                self._driver.call_on_loop(lambda: self.on_commands_changed(fn)),
            )
        return self._channels.watch.add(fn)

    def add_close_listener(self, fn: Callable[[str, str], None]) -> Callable[[], None]:
        """Calls ``fn(channel_id, reason)`` when a channel closes (for whatever reason);
        returns an unsubscribe callable. (Worker supervision and reconnecting channels use
        it.)"""
        return self._channels.add_close_listener(fn)

    async def wait_listed(self, channel_id: str, timeout: float = 5.0) -> bool:
        """Waits until the peer behind ``channel_id`` answered the command list request sent
        when the channel was registered, so that its commands are routed directly; returns
        False if that did not happen within ``timeout`` seconds (the peer may not answer) or
        the channel closed first."""
        self._bind_loop()
        return await self._channels.wait_listed(channel_id, timeout)

    async def close_channel(self, channel_id: str) -> None:
        """Closes one channel by id; calls waiting on it fail with ``channel_disconnected``.

        Raises:
            KeyError: No channel of that id is attached.
        """
        self._bind_loop()
        await self._channels.close_channel(channel_id)

    @property
    def channels(self) -> dict[str, Channel | NativeChannel]:
        """The attached channels by id (a copy)."""
        return dict(self._channels.by_id)

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
            WorkerError: The target failed (its module or function is missing, it raised,
                or its module spawns workers when imported: no ``if __name__ ==
                "__main__":`` guard), or the child exited or stalled before ready.
            ValueError: A malformed target, or one in ``__main__`` (which the child cannot
                import: the message says what to pass instead).
        """
        self._bind_loop()
        return await self._workers.spawn(
            worker_id,
            target,
            transport=transport,
            ring_size=ring_size,
            restart=restart,
            env=env,
            ready_timeout=ready_timeout,
            cpu=cpu,
        )

    async def spawn_pool(
        self,
        pool_id: str,
        target: str,
        *,
        size: int | None = None,
        transport: Transport = "shm",
        ring_size: int = DEFAULT_RING_SIZE,
        restart: RestartPolicy | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> Pool:
        """Starts ``size`` workers that all run ``target`` and share its commands: a pool.

        Calls need no change: ``execute_command``, ``execute_command_sync`` and
        ``execute_many`` spread over the members, each call going to the member with the
        fewest calls in flight (ties in turn). The pool registers its commands upward once;
        another provider of one of them outside the pool is still ``duplicate_command``. A
        member that dies fails only the calls in flight on it (nothing is retried), the
        others keep serving, and with ``restart`` it rejoins. Members are named
        ``"<pool_id>-<n>"``: ``stats()["channels"]`` shows each one's ``requests`` and
        ``in_flight``, and :meth:`route_of` names the member the next call goes to.

        Args:
            pool_id: The pool's id (its members are ``"<pool_id>-1"``, ``"<pool_id>-2"``...).
            target: ``"package.module:function"``, run by every member (see
                :meth:`spawn_worker`).
            size: How many members (default: ``os.cpu_count()``).
            transport, ring_size, restart, env, ready_timeout: As for :meth:`spawn_worker`.

        Raises:
            WorkerError: A member failed to start (the others are stopped again).
            ValueError: A bad ``size``, or a pool of that id exists.

        Example::

            pool = await registry.spawn_pool("calc", "myapp.workers:setup", size=4)
            await registry.execute_command("calc.add", {"a": 1, "b": 2})  # on any member
            await pool.resize(2)
        """
        self._bind_loop()
        return await self._workers.spawn_pool(
            pool_id,
            target,
            os.cpu_count() or 1 if size is None else size,
            transport=transport,
            ring_size=ring_size,
            restart=restart,
            env=env,
            ready_timeout=ready_timeout,
            cpu=None,
        )

    @property
    def pools(self) -> dict[str, Pool]:
        """Pools spawned by this registry and not stopped, by id (a copy)."""
        return self._workers.pools()

    async def connect_workers(
        self, worker_a: Worker, worker_b: Worker, *, ring_size: int = DEFAULT_RING_SIZE
    ) -> None:
        """Opens a direct shared-memory channel between two workers of this registry.

        Each learns the other's commands (and those of its sub-workers) and calls them
        directly from then on, instead of through this registry.
        """
        self._bind_loop()
        await self._workers.connect(worker_a, worker_b, ring_size=ring_size)

    @property
    def workers(self) -> dict[str, Worker]:
        """Workers spawned by this registry and not stopped, by id (a copy)."""
        return self._workers.snapshot()

    # ------------------------------------------------------------------ blocking API

    def __enter__(self) -> CommandRegistry:
        """Runs the registry's event loop on a background thread, for the ``*_sync``
        methods: ``with CommandRegistry("main") as registry: ...``."""
        self._driver.check_process()
        if self._driver.loop is not None:
            raise RuntimeError(f"registry {self.id!r} already runs on an event loop")
        background = BackgroundLoop(f"cmd-ipc-{self.id}")
        background.start()
        self._background = background
        background.run(self.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        background = self._background
        if background is None:
            return
        try:
            background.run(self.close(), 30)
        finally:
            background.stop(30)
            self._background = None

    def run_blocking(self, make: Callable[[], Awaitable[Any]], timeout: float | None = None) -> Any:
        """Runs the coroutine ``make()`` on the registry's loop from another thread and
        returns its result: the building block of the ``*_sync`` methods, for your own
        coroutines that use the registry too.

        Raises:
            RuntimeError: No running loop (use ``with CommandRegistry(...)``), or called on
                the loop's own thread (it would deadlock).
        """
        driver = self._driver
        driver.check_process()
        on_loop = threading.get_ident() == driver.loop_thread
        return run_blocking(driver.loop, on_loop, self.id, make, timeout)

    def _check_blocking_call(self, name: str, async_name: str) -> None:
        """The checks of a native blocking call, written for its hot path."""
        driver = self._driver
        if driver.fork_generation != FORK_GENERATION[0]:
            driver.check_process()
        if driver.loop_thread == threading.get_ident():
            raise RuntimeError(
                f"{name} on the registry's own event loop thread would deadlock; "
                f"use `await registry.{async_name}(...)`"
            )
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")

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
        # The hot path of the library: the checks of _check_blocking_call, written out.
        driver = self._driver
        if driver.fork_generation != FORK_GENERATION[0]:
            driver.check_process()
        if driver.loop_thread == threading.get_ident():
            raise RuntimeError(
                "execute_command_sync on the registry's own event loop thread would deadlock; "
                "use `await registry.execute_command(...)`"
            )
        if self._closed:
            raise RuntimeError(f"registry {self.id!r} is closed")
        if timeout is not None and not timeout > 0:
            check_timeout(timeout)
        value = call_native(self._node, command_id, request, timeout)
        if value is not FALLBACK:
            return value
        return self.run_blocking(lambda: self.execute_command(command_id, request, timeout=timeout))

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
        self.run_blocking(lambda: self._registrations.register(command_id, handler, typed))

    def register_service_sync(self, service: object) -> list[str]:
        """Blocking :meth:`register_service`."""
        localns = caller_locals()
        return cast(
            "list[str]",
            self.run_blocking(lambda: self._registrations.register_service(service, localns)),
        )

    def register_channel_sync(self, channel: Channel | NativeChannel) -> None:
        """Blocking :meth:`register_channel`."""
        self.run_blocking(lambda: self.register_channel(channel))

    def spawn_pool_sync(self, pool_id: str, target: str, **kwargs: Any) -> Pool:
        """Blocking :meth:`spawn_pool` (same arguments)."""
        return cast(Pool, self.run_blocking(lambda: self.spawn_pool(pool_id, target, **kwargs)))

    def spawn_worker_sync(self, worker_id: str, target: str, **kwargs: Any) -> Worker:
        """Blocking :meth:`spawn_worker` (same arguments)."""
        return cast(
            Worker, self.run_blocking(lambda: self.spawn_worker(worker_id, target, **kwargs))
        )

    def connect_workers_sync(self, worker_a: Worker, worker_b: Worker, **kwargs: Any) -> None:
        """Blocking :meth:`connect_workers`."""
        self.run_blocking(lambda: self.connect_workers(worker_a, worker_b, **kwargs))

    def stop_worker_sync(self, worker: Worker, timeout: float = 5.0) -> int | None:
        """Blocking :meth:`Worker.stop`."""
        return cast("int | None", self.run_blocking(lambda: worker.stop(timeout)))

    # ------------------------------------------------------------------ stats and lifecycle

    def stats(self) -> dict[str, Any]:
        """Counters that show which way messages went.

        Returns:
            ``{"channels": {channel_id: {"sent": n, "received": n, "requests": n,
            "in_flight": n, "dropped": n}}, "forwarded": n, "pending": n,
            "pending_forwards": n, "dropped": n, "dedup_entries": n, "jobs": n}``: per
            channel, ``requests`` counts the execute requests sent on it (for a pool member:
            the calls it was given), ``in_flight`` those unanswered, ``dropped`` the
            messages for it not sent (its outbox was full, or they broke the limits); a
            native channel also has ``outbox`` and ``outbox_peak``, the bytes waiting to be
            written to it now and at most (see ``max_outbox``); ``forwarded`` counts
            requests this registry forwarded for others, ``pending`` calls of this registry
            waiting for a result, ``dropped`` messages dropped as invalid, spoofed,
            duplicate, undeliverable or unsent, ``jobs`` handler runs in progress.
        """
        return self._node.stats()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    async def close(self) -> None:
        """Closes every channel (failing calls waiting on them), stops the workers, and
        cancels running handlers.

        Idempotent. Calls still waiting fail with ``channel_disconnected``.
        """
        if self._closed:
            return
        await self._workers.stop_all()
        self._closed = self._driver.closed = True
        await self._channels.close_all()
        await self._driver.cancel_tasks()
        self._driver.fail_all(ChannelDisconnectedError(f"registry {self.id!r} closed"))
        self._driver.unbind()
        # Handlers may close over this registry: let them go (and the registry with them).
        self._dispatch.clear()
        self._registrations.clear()

    async def __aenter__(self) -> CommandRegistry:
        self._bind_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
