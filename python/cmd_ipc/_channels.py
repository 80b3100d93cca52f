"""The channels of a registry: attaching them, frames in, closes, reconnects.

One table per registry holds its channels by id (Python channels and native ones), the close
listeners, which closes were asked for (so they are logged at INFO, not as a warning), and
which peers have listed their commands. Python channels hand their frames to the router
here; native channels are read by the driver (:mod:`cmd_ipc._driver`). It gets the node, the
driver and an ``on_router`` hook (run each time the router channel is attached) injected,
and never sees the registry.

The table also owns the :class:`CommandWatch` of its registry (``table.watch``): what tells
listeners that the set of commands the registry can route to changed. Channels are where
that set changes most (a peer listed its commands, a child registered one, a channel
closed); the registrations and the worker table poke the same watch for local commands and
workers that became ready.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cmd_ipc import _core
from cmd_ipc._driver import Driver
from cmd_ipc.channels.base import Channel
from cmd_ipc.channels.native import NativeChannel
from cmd_ipc.errors import ChannelDisconnectedError

__all__ = ["ChannelTable", "CloseListener", "CommandWatch", "CommandsListener"]

logger = logging.getLogger("cmd_ipc")

#: Called with ``(channel_id, reason)`` when a channel closes.
CloseListener = Callable[[str, str], None]
#: Called with no argument when the set of routable commands changed.
CommandsListener = Callable[[], None]

#: The message types whose sending means a registration was escalated or acknowledged.
_REGISTRATION_TYPES = frozenset({"register.command.request", "register.command.response"})


class CommandWatch:
    """Tells listeners when the set of commands a registry can route to changed.

    "The set" is what :meth:`CommandRegistry.list_commands` returns: ids with their
    descriptions and schemas, local (private ones included), registered by children,
    advertised by peers. Everything that may change it calls :meth:`poke`; the watch then
    compares the list once, at the loop's next turn (a burst of pokes costs one
    comparison), and calls every listener if it differs from the last one seen. Pokes come
    from what Python sees: local registrations, frames of channels written in Python, a
    peer's command list, closes, workers that became ready. A registration that travels
    only between native channels (a worker's sub-worker registering after its worker was
    ready) is seen by a backstop comparison every ``interval`` seconds, made only while
    someone listens.

    Args:
        node: The registry's native node.
        driver: The registry's driver (its loop).
        interval: Seconds between two backstop comparisons while someone listens.
    """

    def __init__(self, node: _core.Node, driver: Driver, *, interval: float = 2.0) -> None:
        self._node = node
        self._driver = driver
        self._interval = interval
        self._listeners: dict[int, CommandsListener] = {}
        self._next_key = 0
        self._last: list[Any] | None = None
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def add(self, fn: CommandsListener) -> Callable[[], None]:
        """Calls ``fn()`` after each change; returns an idempotent unsubscribe callable."""
        if not callable(fn):
            raise TypeError("a commands listener must be callable")
        key = self._next_key
        self._next_key += 1
        if not self._listeners:
            self._last = self._node.list_commands()
        self._listeners[key] = fn
        self._arm()

        def unsubscribe() -> None:
            self._listeners.pop(key, None)
            if not self._listeners:
                self._disarm()

        return unsubscribe

    def poke(self) -> None:
        """Something may have changed the set: compare it soon (coalesced)."""
        if not self._listeners or self._scheduled or self._stopped:
            return
        loop = self._driver.loop
        if loop is None:
            return
        self._scheduled = True
        loop.call_soon(self._check)
        self._arm()  # listening started before the registry had a loop

    def stop(self) -> None:
        """Stops watching (the registry closes); listeners are forgotten."""
        self._stopped = True
        self._listeners.clear()
        self._disarm()

    def _arm(self) -> None:
        loop = self._driver.loop
        if self._timer is None and loop is not None and not self._stopped:
            self._timer = loop.call_later(self._interval, self._backstop)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _backstop(self) -> None:
        self._timer = None
        self._check()
        if self._listeners:
            self._arm()

    def _check(self) -> None:
        self._scheduled = False
        if not self._listeners or self._stopped:
            return
        now = self._node.list_commands()
        if now == self._last:
            return
        self._last = now
        for fn in list(self._listeners.values()):
            try:
                fn()
            except Exception:
                logger.exception("commands listener failed")


class ChannelTable:
    """The channels of one registry.

    Args:
        node: The registry's native node.
        driver: The registry's driver (actions, native reads, tasks).
        owner: The registry's id (log and error messages).
        router_channel: The id of the registry's router channel, if any.
        request_ttl: How long :meth:`attach` waits for a remote peer's command list.
        on_router: Awaited each time the router channel is attached.
    """

    def __init__(
        self,
        node: _core.Node,
        driver: Driver,
        owner: str,
        *,
        router_channel: str | None,
        request_ttl: float,
        on_router: Callable[[], Awaitable[None]],
    ) -> None:
        self._node = node
        self._driver = driver
        self._owner = owner
        self._router_channel = router_channel
        self._request_ttl = request_ttl
        self._on_router = on_router
        #: Every attached channel by id.
        self.by_id: dict[str, Channel | NativeChannel] = {}
        self._native: dict[str, NativeChannel] = {}
        self._close_listeners: list[CloseListener] = []
        #: Channels whose close was asked for, and for which reason only (``None``: any).
        self._expected: dict[str, str | None] = {}
        #: Channels whose peer answered our command list request, and who waits for that.
        self._listed: set[str] = set()
        self._listed_waiters: dict[str, asyncio.Event] = {}
        #: Set when the registry closes: nothing is re-attached any more.
        self.closed = False
        #: Tells listeners when the set of routable commands changed.
        self.watch = CommandWatch(node, driver)
        driver.on(_core.ACTION_SEND, self._send)
        driver.on(_core.ACTION_CLOSED, self._native_closed)
        driver.on(_core.ACTION_LISTED, self._mark_listed)

    def _send(self, act: tuple[Any, ...]) -> None:
        channel = self.by_id.get(act[1])
        if channel is not None and not isinstance(channel, NativeChannel):
            channel.send_with_head(act[2], act[3], act[4], act[5])
            if act[3] in _REGISTRATION_TYPES:
                # A child's registration was accepted (or escalated) on its way.
                self.watch.poke()

    def expected(self, channel_id: str | None) -> bool:
        """Whether a close of ``channel_id`` (for any reason) was asked for."""
        return channel_id in self._expected and self._expected[channel_id] is None

    async def attach(self, channel: Channel | NativeChannel) -> None:
        """See :meth:`CommandRegistry.register_channel`."""
        if channel.id in self.by_id:
            raise ValueError(f"registry {self._owner!r} already has a channel {channel.id!r}")
        if isinstance(channel, NativeChannel):
            self._attach_native(channel)
            if channel.id == self._router_channel:
                await self._on_router()
            return
        actions = self._node.add_channel(channel.id, channel.encoding)
        self.by_id[channel.id] = channel
        try:
            await channel.start(
                functools.partial(self._on_frame, channel.id, channel),
                functools.partial(self._on_close, channel.id, channel),
            )
        except BaseException:
            self.by_id.pop(channel.id, None)
            if self._node.has_channel(channel.id):
                self._driver.apply(self._node.close_channel(channel.id))
            raise
        self._driver.apply(actions)
        self.watch.poke()
        if channel.id == self._router_channel:
            await self._on_router()
        if channel.wait_for_commands and not await self.wait_listed(
            channel.id, timeout=self._request_ttl
        ):
            if channel.id not in self.by_id:
                raise ChannelDisconnectedError(
                    f"channel {channel.id!r} closed before its peer listed its commands"
                )
            logger.warning(
                "peer of channel %r did not list its commands within %ss",
                channel.id,
                self._request_ttl,
            )

    def _on_frame(self, channel_id: str, channel: Channel, frame: bytes) -> None:
        if self.by_id.get(channel_id) is not channel:
            return
        try:
            actions = self._node.handle_frame(channel_id, frame, self._driver.now())
        except KeyError:
            return
        self._driver.apply(actions)

    def _on_close(self, channel_id: str, channel: Channel, reason: str | None) -> None:
        if self.by_id.get(channel_id) is not channel:
            return
        del self.by_id[channel_id]
        self._listed.discard(channel_id)
        if reason:
            logger.info("channel %r of registry %r closed: %s", channel_id, self._owner, reason)
        self._driver.apply(self._node.close_channel(channel_id))
        self._notify_closed(channel_id, reason or "closed")
        if reason is not None and not self.closed and channel.reconnects:
            self._driver.spawn(self._reattach(channel))

    async def _reattach(self, channel: Channel) -> None:
        """Waits for a reconnecting channel to connect again, then attaches it again (which
        re-registers this subtree's commands if it is the router channel)."""
        try:
            if not await channel.reconnect():
                return
            if self.closed or channel.id in self.by_id:
                # Nobody to give the new connection to (or the id was taken meanwhile).
                await channel.close()
                return
            await self.attach(channel)
        except asyncio.CancelledError:
            # The registry is closing: the channel goes with it.
            await asyncio.shield(channel.close())
            raise
        except Exception as e:
            logger.warning(
                "registry %r could not re-attach channel %r (it stays closed): %s",
                self._owner,
                channel.id,
                e,
            )
            await channel.close()

    def _attach_native(self, channel: NativeChannel) -> None:
        actions = self._node.add_native_channel(
            channel.id, channel.sock_fd, channel.encoding, channel.shm_fd, channel.side
        )
        # The node holds its own duplicates of the descriptors.
        channel.close_fds()
        self._expected.pop(channel.id, None)  # a new connection: nothing is asked of it yet
        self.by_id[channel.id] = channel
        self._native[channel.id] = channel
        self._driver.watch(channel.id)
        self._driver.apply(actions)
        # Frames may already be waiting (the peer may have spoken first).
        self._driver.read_now(channel.id)

    def _native_closed(self, act: tuple[Any, ...]) -> None:
        channel_id, reason, fd = act[1], act[2], act[3]
        try:
            if self._native.pop(channel_id, None) is None:
                return
            self.by_id.pop(channel_id, None)
            self._listed.discard(channel_id)
            try:
                # The node keeps the descriptor open until it is released below: the loop
                # stops watching a live descriptor (one closed under a watch for writing,
                # a peer that stopped reading, made this fail with EBADF).
                self._driver.unwatch(channel_id)
            except (OSError, ValueError, RuntimeError):
                logger.exception("could not stop watching channel %r", channel_id)
        finally:
            self._node.release_native(fd)
        expected = (
            reason == "closed locally" or self.closed or self._is_expected(channel_id, reason)
        )
        level = logging.INFO if expected else logging.WARNING
        logger.log(level, "channel %r of registry %r closed: %s", channel_id, self._owner, reason)
        self._notify_closed(channel_id, reason)

    def _is_expected(self, channel_id: str, reason: str) -> bool:
        """Whether this close was asked for with :meth:`expect_close`."""
        if channel_id not in self._expected:
            return False
        wanted = self._expected[channel_id]
        return wanted is None or wanted == reason

    def expect_close(self, channel_id: str, reason: str | None = None) -> None:
        """See :meth:`CommandRegistry.expect_close`."""
        if channel_id in self.by_id:
            self._expected[channel_id] = reason

    def unexpect_close(self, channel_id: str) -> None:
        """Withdraws :meth:`expect_close` for ``channel_id``."""
        self._expected.pop(channel_id, None)

    def _notify_closed(self, channel_id: str, reason: str) -> None:
        # Its commands left the route table with it.
        self.watch.poke()
        waiter = self._listed_waiters.pop(channel_id, None)
        if waiter is not None:
            waiter.set()
        for fn in list(self._close_listeners):
            try:
                fn(channel_id, reason)
            except Exception:
                logger.exception("channel close listener failed")

    def add_close_listener(self, fn: Callable[[str, str], None]) -> Callable[[], None]:
        """See :meth:`CommandRegistry.add_close_listener`."""
        self._close_listeners.append(fn)
        return functools.partial(self._close_listeners.remove, fn)

    def _mark_listed(self, act: tuple[Any, ...]) -> None:
        channel_id = act[1]
        self._listed.add(channel_id)
        self.watch.poke()
        waiter = self._listed_waiters.pop(channel_id, None)
        if waiter is not None:
            waiter.set()

    async def wait_listed(self, channel_id: str, timeout: float = 5.0) -> bool:
        """See :meth:`CommandRegistry.wait_listed`."""
        if channel_id in self._listed:
            return True
        if channel_id not in self.by_id:
            return False
        waiter = self._listed_waiters.setdefault(channel_id, asyncio.Event())
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        # Woken by the list response, or by the channel's close.
        return channel_id in self._listed

    async def close_channel(self, channel_id: str) -> None:
        """See :meth:`CommandRegistry.close_channel`."""
        channel = self.by_id.get(channel_id)
        if channel is None:
            raise KeyError(f"registry {self._owner!r} has no channel {channel_id!r}")
        if isinstance(channel, NativeChannel):
            self._driver.apply(self._node.close_native(channel_id))
        else:
            await channel.close()

    async def close_all(self) -> None:
        """Closes every channel (the registry closes). Never raises: whatever fails is
        logged, and every other channel is still closed (and every call waiting on one
        failed)."""
        self.closed = True
        self.watch.stop()
        if self._native:
            try:
                actions = self._node.close_all_native()
            except Exception:
                logger.exception("closing the native channels failed")
                actions = []
            # One by one: an action that fails does not keep the others (calls waiting on
            # other channels failed, their close listeners told) from being carried out.
            for act in actions:
                try:
                    self._driver.apply([act])
                except Exception:
                    logger.exception("carrying out %r while closing failed", act[:2])
        for channel in list(self.by_id.values()):
            if isinstance(channel, NativeChannel):
                continue
            try:
                await channel.close()
            except Exception:
                logger.exception("closing channel %r failed", channel.id)
