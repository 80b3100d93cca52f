"""The asyncio driver of a registry: carries out the Rust router's actions on an event loop.

The router (``_core.Node``) takes events in and gives actions out; this module is the loop
around it: it binds the registry to one event loop (and refuses a forked child), carries out
each action through a table ``{kind: handler}`` (the kinds are ``_core.ACTION_*``), arms the
router's timer, watches native channels' descriptors and reads them when they are ready, and
keeps the futures of calls waiting for a result.

Handlers for the actions that concern other collaborators (run a handler, deliver an event,
send on a Python channel, a channel closed...) are given to it with :meth:`Driver.on`; it
never imports or sees the registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cmd_ipc import _core
from cmd_ipc._payload import decode
from cmd_ipc.errors import InternalError, error_from_code

__all__ = ["FORK_GENERATION", "Driver", "Outcome", "settle"]

#: Completes a waiting call: ``(value, None)`` or ``(None, error)``.
Outcome = Callable[[Any, BaseException | None], None]
#: Carries out one action (the tuple as Rust built it, kind first).
ActionHandler = Callable[[tuple[Any, ...]], None]

#: Actions after which a native read may spin on for the next frame: nothing they do makes
#: other work runnable on the loop (a handler run inline that starts a task says so through
#: `spawn`). Every other action (a frame for a Python channel, a result for a waiting
#: caller, an event, a listed channel) usually schedules loop work that a spin would delay.
_QUIET = frozenset(
    {
        _core.ACTION_RUN,
        _core.ACTION_FAST_FAILED,
        _core.ACTION_FAST_UNENCODABLE,
        _core.ACTION_WANT_WRITE,
        _core.ACTION_DROPPED,
    }
)

#: Seconds the loop waits before watching again a native channel a blocking caller reads.
_RESUME_AFTER = 0.001

#: Its one item is bumped in a forked child, so registries inherited from the parent refuse
#: to work there (a list, so the hot path reads it without a call).
FORK_GENERATION = [0]


def _after_fork_in_child() -> None:
    FORK_GENERATION[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def settle(fut: asyncio.Future[Any]) -> Outcome:
    """An outcome that completes ``fut`` (unless it is done already)."""

    def outcome(value: Any, err: BaseException | None) -> None:
        if fut.done():
            return
        if err is None:
            fut.set_result(value)
        else:
            fut.set_exception(err)

    return outcome


class Driver:
    """Runs one registry's router on an asyncio event loop.

    Args:
        node: The registry's native node.
        owner: The registry's id, for error messages.
        spin_us: Microseconds a native read spins for the next frame before returning to
            the loop (0: never).
    """

    def __init__(self, node: _core.Node, owner: str, spin_us: int) -> None:
        self._node = node
        self._owner = owner
        self.spin_us = spin_us
        self.fork_generation = FORK_GENERATION[0]
        self.loop: asyncio.AbstractEventLoop | None = None
        #: The thread running :attr:`loop` (blocking callers must not be on it).
        self.loop_thread: int | None = None
        #: Set by the registry's close: nothing new may start.
        self.closed = False
        self._outcomes: dict[int, Outcome] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: Native channels watched, by id: their descriptor (``None``: no descriptor).
        self._native: dict[str, int | None] = {}
        self._spin_scheduled = False
        #: Calls waiting on each native channel (see :meth:`read_soon`), and the channel of
        #: each such call.
        self._waiting: dict[str, int] = {}
        self._sent_on: dict[int, str] = {}
        #: Set whenever an action made Python work runnable (a waiting caller resumed, a
        #: task started): a native read then returns to the loop instead of spinning.
        self._woke_loop = False
        self._table: dict[Any, ActionHandler] = {
            _core.ACTION_RESULT: self._on_result,
            _core.ACTION_ERROR: self._on_error,
            _core.ACTION_REGISTERED: self._on_error,
            _core.ACTION_WANT_WRITE: self._on_want_write,
        }

    # ------------------------------------------------------------------ loop binding

    def check_process(self) -> None:
        """Raises RuntimeError in a forked child of the process that made the registry."""
        if self.fork_generation != FORK_GENERATION[0]:
            raise RuntimeError(
                f"registry {self._owner!r} was created before os.fork(); a forked child cannot "
                "use it (its channels and threads belong to the parent): create a new registry "
                "in the child"
            )

    def bind(self) -> asyncio.AbstractEventLoop:
        """Binds to the running loop (the first time) and returns it.

        Raises:
            RuntimeError: Another loop is bound, the registry is closed, or this is a forked
                child.
        """
        self.check_process()
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
            self.loop_thread = threading.get_ident()
            loop.add_reader(self._node.wake_fd, self._on_wake)
        elif self.loop is not loop:
            raise RuntimeError(
                f"registry {self._owner!r} is bound to another event loop; "
                "use it only from the loop it started on"
            )
        if self.closed:
            raise RuntimeError(f"registry {self._owner!r} is closed")
        return loop

    def off_loop_thread(self) -> bool:
        """True when called from a thread other than the running loop's."""
        loop = self.loop
        return (
            loop is not None
            and self.loop_thread is not None
            and threading.get_ident() != self.loop_thread
            and loop.is_running()
        )

    def call_on_loop(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the loop's thread and returns its result (or raises its error)."""
        assert self.loop is not None
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result()

    def now(self) -> float:
        """The loop's clock (the router's time), or the monotonic clock before binding."""
        return self.loop.time() if self.loop is not None else time.monotonic()

    # ------------------------------------------------------------------ actions

    def on(self, kind: Any, handler: ActionHandler) -> None:
        """Carries out actions of ``kind`` (a ``_core.ACTION_*``) with ``handler``."""
        self._table[kind] = handler

    def apply(self, actions: list[Any]) -> None:
        """Carries out the router's actions, in order, then re-arms the router's timer."""
        table = self._table
        for act in actions:
            table[act[0]](act)
        self._arm_timer()

    def complete(self, fn: Callable[[], list[Any]]) -> None:
        """Runs a router call and carries out its actions; a ``KeyError`` (the job or
        channel it named is gone: its call timed out, or it closed) is ignored."""
        try:
            actions = fn()
        except KeyError:
            return
        if actions:
            self.apply(actions)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Runs ``coro`` as a task cancelled by :meth:`cancel_tasks`."""
        self._woke_loop = True
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        """Cancels every task started with :meth:`spawn` and waits for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ waiting calls

    def expect(self, call: int, outcome: Outcome) -> None:
        """``outcome`` receives the result of router call ``call``."""
        self._outcomes[call] = outcome

    def forget(self, call: int) -> None:
        """The caller of ``call`` gave up (cancelled): the router forgets it too."""
        self._outcomes.pop(call, None)
        self._answered(call)
        self._node.cancel_call(call)

    def fail_all(self, err: BaseException) -> None:
        """Fails every waiting call with ``err`` (the registry closed)."""
        outcomes, self._outcomes = self._outcomes, {}
        self._waiting.clear()
        self._sent_on.clear()
        for outcome in outcomes.values():
            outcome(None, err)

    def _on_result(self, act: tuple[Any, ...]) -> None:
        outcome = self._outcomes.pop(act[1], None)
        if self._sent_on:
            self._answered(act[1])
        if outcome is None:
            return
        self._woke_loop = True
        try:
            value = decode(act[2], act[3])
        except Exception as e:
            outcome(None, InternalError(f"undecodable result: {e}"))
        else:
            outcome(value, None)

    def _on_error(self, act: tuple[Any, ...]) -> None:
        # Also a registration's outcome: code None means accepted.
        outcome = self._outcomes.pop(act[1], None)
        if self._sent_on:
            self._answered(act[1])
        if outcome is not None:
            self._woke_loop = True
            outcome(None, None if act[2] is None else error_from_code(act[2], act[3]))

    # ------------------------------------------------------------------ the router's timer

    def _arm_timer(self) -> None:
        loop = self.loop
        if loop is None:
            return
        deadline = self._node.next_deadline()
        if deadline is None:
            self.stop_timer()
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
        if self.loop is None:
            return
        # call_at may fire up to one clock tick early: never tick before the deadline.
        self.apply(self._node.tick(max(self.loop.time(), at)))

    def stop_timer(self) -> None:
        """Cancels the router's timer (re-armed by the next :meth:`apply`)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def unbind(self) -> None:
        """Stops watching the wake-up descriptor and the timer (the registry closed)."""
        self.stop_timer()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self._node.wake_fd)

    # ------------------------------------------------------------------ native channels

    def watch(self, channel_id: str) -> None:
        """Starts reading a native channel the node just attached, and reads what waits."""
        fd = self._node.native_fd(channel_id)
        self._native[channel_id] = fd
        if fd is not None and self.loop is not None:
            self.loop.add_reader(fd, self._on_native, channel_id)

    def unwatch(self, channel_id: str) -> None:
        """Stops watching a native channel that closed."""
        fd = self._native.pop(channel_id, None)
        if fd is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)

    def is_native(self, channel_id: str | None) -> bool:
        """Whether ``channel_id`` is a native channel this driver reads."""
        return channel_id in self._native

    @property
    def has_native(self) -> bool:
        """Whether any native channel is attached."""
        return bool(self._native)

    def read_soon(self, channel_id: str, call: int) -> None:
        """Call ``call`` was just sent on ``channel_id``: when it is the only one waiting
        there, read its reply as soon as the loop is idle (spinning briefly) rather than
        after a doorbell wake-up. With others waiting on that channel, its reply comes
        behind theirs: the reads that take them spin on for the next (``follow_us``), and a
        spin for this one would mostly burn CPU that the peer could use (a pool member busy
        with a millisecond of work, say)."""
        waiting = self._waiting.get(channel_id, 0) + 1
        self._waiting[channel_id] = waiting
        self._sent_on[call] = channel_id
        if waiting > 1:
            return
        if not self._spin_scheduled and self.loop is not None:
            self._spin_scheduled = True
            self.loop.call_soon(self._spin_native, channel_id)

    def _answered(self, call: int) -> None:
        """Call ``call`` has its outcome: it no longer waits on its channel."""
        channel_id = self._sent_on.pop(call, None)
        if channel_id is not None:
            left = self._waiting[channel_id] - 1
            if left:
                self._waiting[channel_id] = left
            else:
                del self._waiting[channel_id]

    def read_now(self, channel_id: str) -> None:
        """Reads a native channel (frames may be waiting since before it was watched)."""
        self._on_native(channel_id)

    def _on_native(self, channel_id: str, expecting: bool = False) -> bool:
        """The channel's socket is readable: read and route in Rust, then carry out what
        Python must. A read spins briefly for a first frame only when one is expected (a
        reply to a call just sent: ``expecting``, from :meth:`read_soon`); once it read a
        frame, it spins for the next (Rust's ``follow_us``: the next request, or the reply
        to one it forwarded), so a bare doorbell costs no spin. Both stop once an action
        makes other work runnable on the loop (a resumed caller, a task, a frame for a
        Python channel, an event: anything but the actions of ``_QUIET``): a spin then
        would only delay it. (Decided from what this driver did, not from the loop's
        private queue, so it works under any event loop.) Returns whether the first read
        found anything."""
        spin = self.spin_us if expecting else 0
        follow = self.spin_us
        got: bool | None = None
        while channel_id in self._native:
            actions, again, want_write, busy = self._node.poll_native(channel_id, spin, 64, follow)
            if got is None:
                got = bool(actions) or again or busy
            if busy:
                # A blocking caller is reading this channel: step aside (a level-triggered
                # watch would spin on its bytes) and look again shortly. Frames that arrive
                # meanwhile are read and routed by that caller.
                fd = self._native.get(channel_id)
                if fd is not None and self.loop is not None:
                    self.loop.remove_reader(fd)
                    self.loop.call_later(_RESUME_AFTER, self._resume_native, channel_id)
                return True
            if actions:
                self._woke_loop = False
                self.apply(actions)
                quiet = not self._woke_loop and all(a[0] in _QUIET for a in actions)
                spin = follow = self.spin_us if quiet else 0
            if want_write:
                self._watch_writable(channel_id)
            if not again:
                break
            if not actions and self.loop is not None:
                # Rust read for a while, forwarding without Python: let the loop run (timers,
                # tasks, other channels), then read on.
                self.loop.call_soon(self._on_native, channel_id)
                break
        return bool(got)

    def _spin_native(self, channel_id: str) -> None:
        self._spin_scheduled = False
        if channel_id in self._native:
            self._on_native(channel_id, expecting=True)

    def _on_want_write(self, act: tuple[Any, ...]) -> None:
        self._watch_writable(act[1])

    def _watch_writable(self, channel_id: str) -> None:
        fd = self._native.get(channel_id)
        if fd is not None and self.loop is not None:
            self.loop.add_writer(fd, self._on_native_writable, channel_id)

    def _on_native_writable(self, channel_id: str) -> None:
        if not self._node.flush_native(channel_id) and self.loop is not None:
            fd = self._native.get(channel_id)
            if fd is not None:
                self.loop.remove_writer(fd)

    def _resume_native(self, channel_id: str) -> None:
        fd = self._native.get(channel_id)
        if fd is None or self.loop is None:
            return
        if self._node.native_busy(channel_id):
            self.loop.call_later(_RESUME_AFTER, self._resume_native, channel_id)
            return
        self.loop.add_reader(fd, self._on_native, channel_id)
        self._on_native(channel_id)

    def _on_wake(self) -> None:
        """Actions queued by another thread (a blocking caller that read a frame)."""
        self.apply(self._node.take_queued())
