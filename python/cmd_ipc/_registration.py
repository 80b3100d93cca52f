"""Registration of a registry's commands with the tree: started, deferred, acknowledged.

A registration adds the handler to the handler table (:mod:`cmd_ipc._dispatch`) under a new
handler id, then asks the router to register the id; the router answers at once (a root, or
a private id) or escalates to the router channel and answers when the tree acknowledged it.
Only then is the handler bound to its command id (a rejected one is dropped). Commands
declared with the decorator while the router channel is missing wait here until it is
attached. It gets the node, the driver, the handler table and an ``on_change`` hook (told
when a local command was added or removed) injected, and never sees the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from cmd_ipc import _core
from cmd_ipc._dispatch import Dispatcher
from cmd_ipc._driver import Driver, Outcome, settle
from cmd_ipc._payload import Handler
from cmd_ipc.commands import Prepared, prepare, service_commands
from cmd_ipc.errors import DuplicateCommandError

__all__ = ["Registrations"]

logger = logging.getLogger("cmd_ipc")

#: What to do about a rejected registration (ids are unique in a tree).
_DUPLICATE_HINT = (
    "command ids are unique in a tree: choose another id, or unregister the other command first"
)


def _schema_json(schema: Mapping[str, Any] | None) -> tuple[bytes | None, bytes | None]:
    """The request and response schemas of a registration, as JSON."""
    if schema is None:
        return None, None
    unknown = set(schema) - {"request", "response"}
    if unknown:
        raise ValueError(f"schema may only have 'request' and 'response', not {unknown}")
    req, resp = schema.get("request"), schema.get("response")
    return (
        None if req is None else json.dumps(req).encode(),
        None if resp is None else json.dumps(resp).encode(),
    )


class Registrations:
    """The registrations of one registry.

    Args:
        node: The registry's native node.
        driver: The registry's driver.
        dispatch: The registry's handler table.
        owner: The registry's id (error messages).
        router_missing: Whether the registry has a router channel that is not attached.
        on_change: Called when a local command was registered or unregistered.
    """

    def __init__(
        self,
        node: _core.Node,
        driver: Driver,
        dispatch: Dispatcher,
        owner: str,
        *,
        router_missing: Callable[[], bool],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._node = node
        self._driver = driver
        self._dispatch = dispatch
        self._owner = owner
        self._router_missing = router_missing
        self._on_change = on_change
        #: Declared while the router channel was missing: (handler id, description, schema).
        self._deferred: dict[str, tuple[int, str | None, Mapping[str, Any] | None]] = {}
        #: Escalated by the decorator and not acknowledged yet (what `ready` waits for).
        self._pending: set[asyncio.Future[None]] = set()
        #: Services by id(): the object (kept alive) and the handlers registered for it.
        self._services: dict[int, tuple[object, list[tuple[str, Handler]]]] = {}

    def _start(
        self,
        command_id: str,
        hid: int,
        description: str | None,
        schema: Mapping[str, Any] | None,
        outcome: Outcome,
    ) -> None:
        if not isinstance(command_id, str) or not command_id:
            raise ValueError("a command id must be a non-empty string")
        req, resp = _schema_json(schema)

        def done(value: Any, err: BaseException | None) -> None:
            if err is None:
                self._dispatch.bind(command_id, hid)
                self._on_change()
            else:
                self._dispatch.drop(hid)
                if isinstance(err, DuplicateCommandError):
                    err = DuplicateCommandError(f"{err.message}; {_DUPLICATE_HINT}")
            outcome(value, err)

        call, actions = self._node.register_local(
            command_id, hid, self._driver.now(), description, req, resp
        )
        self._driver.expect(call, done)
        self._driver.apply(actions)

    def declare(self, command_id: str, fn: Handler, typed: Prepared) -> None:
        """The decorator's registration: deferred while the router channel is missing, at
        once otherwise (a rejection known at once is raised; a later one is logged, and
        raised by :meth:`ready`)."""
        hid = self._dispatch.add(command_id, fn, typed.boundary)
        if self._router_missing() and not _core.is_private(command_id):
            self._deferred[command_id] = (hid, typed.description, typed.schema)
            return
        result: list[BaseException | None] = []
        later: list[asyncio.Future[None]] = []

        def done(_: Any, err: BaseException | None) -> None:
            if not result:
                result.append(err)
                return
            if err is not None:
                logger.error("registration of %r failed: %s", command_id, err)
            if later:
                settle(later[0])(None, err)

        self._start(command_id, hid, typed.description, typed.schema, done)
        if result and result[0] is not None:
            raise result[0]
        if not result:
            # Escalated: the ack comes later; `ready()` waits for it.
            result.append(None)
            if self._driver.loop is not None:
                fut: asyncio.Future[None] = self._driver.loop.create_future()
                later.append(fut)
                self._pending.add(fut)
                fut.add_done_callback(self._pending.discard)

    async def register(self, command_id: str, handler: Handler, typed: Prepared) -> None:
        """Registers ``handler`` and waits for the tree's answer."""
        loop = self._driver.bind()
        fut: asyncio.Future[None] = loop.create_future()
        hid = self._dispatch.add(command_id, handler, typed.boundary)
        self._start(command_id, hid, typed.description, typed.schema, settle(fut))
        await fut

    async def flush_deferred(self) -> None:
        """Registers what was declared while the router channel was missing (the first
        failure is raised, the others logged)."""
        if not self._deferred:
            return
        loop = self._driver.bind()
        waits: list[asyncio.Future[None]] = []
        deferred, self._deferred = self._deferred, {}
        for command_id, (hid, description, schema) in deferred.items():
            fut: asyncio.Future[None] = loop.create_future()
            self._start(command_id, hid, description, schema, settle(fut))
            waits.append(fut)
        results = await asyncio.gather(*waits, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors[1:]:
            logger.error("registration failed: %s", e)
        if errors:
            raise errors[0]

    async def ready(self) -> None:
        """See :meth:`CommandRegistry.ready`."""
        if self._deferred and not self._router_missing():
            await self.flush_deferred()
        pending = list(self._pending)
        if not pending:
            return
        for r in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(r, BaseException):
                raise r

    def unregister(self, command_id: str) -> bool:
        """See :meth:`CommandRegistry.unregister_command`."""
        self._deferred.pop(command_id, None)
        self._dispatch.unbind(command_id)
        removed = self._node.unregister_local(command_id)
        if removed:
            self._on_change()
        return removed

    async def register_service(self, service: object, localns: Mapping[str, Any]) -> list[str]:
        """See :meth:`CommandRegistry.register_service`."""
        if id(service) in self._services:
            raise ValueError(f"{service!r} is already registered in registry {self._owner!r}")
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
            *(self.register(cid, fn, t) for cid, fn, t in typed), return_exceptions=True
        )
        ids = [cid for cid, _, _ in typed]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for cid, r in zip(ids, results, strict=True):
                if not isinstance(r, BaseException):
                    self.unregister(cid)
            raise failures[0]
        self._services[id(service)] = (service, [(cid, fn) for cid, fn, _ in typed])
        return ids

    def unregister_service(self, service: object) -> list[str]:
        """See :meth:`CommandRegistry.unregister_service`."""
        _, handlers = self._services.pop(id(service), (None, []))
        removed = []
        for cid, fn in handlers:
            entry = self._dispatch.entry_for(cid)
            if entry is not None and entry.fn is fn:
                self.unregister(cid)
                removed.append(cid)
        return removed

    def clear(self) -> None:
        """Forgets deferred registrations and services (the registry closed)."""
        self._deferred.clear()
        self._services.clear()
