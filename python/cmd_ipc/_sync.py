"""The blocking side of a registry: its background loop and the native blocking calls.

``with CommandRegistry(...)`` runs the registry's event loop on a background thread
(:class:`BackgroundLoop`); ``*_sync`` methods either hand a coroutine to that loop
(:func:`run_blocking`) or, when the command lives behind a native channel, make the call on
the calling thread entirely in Rust (:func:`call_native`, :func:`call_many_native`), with
the GIL released while they wait. Nothing here knows about registries.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from cmd_ipc import _core
from cmd_ipc._payload import decode, encode_request
from cmd_ipc.errors import CommandError, error_from_code

__all__ = [
    "FALLBACK",
    "BackgroundLoop",
    "call_many_native",
    "call_native",
    "check_many",
    "check_timeout",
    "in_lanes",
    "run_blocking",
]

#: Returned by :func:`call_native` when the command is not behind a native channel.
FALLBACK: Any = object()


class BackgroundLoop:
    """An event loop running on a daemon thread of its own.

    Args:
        name: The thread's name.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start(self) -> None:
        """Starts the thread and returns once its loop runs."""
        self._thread.start()
        self._started.wait()

    def run(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Runs ``coro`` on the loop and returns its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the loop, joins the thread and closes the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self.loop.close()


def run_blocking(
    loop: asyncio.AbstractEventLoop | None,
    on_loop_thread: bool,
    owner: str,
    make: Callable[[], Awaitable[Any]],
    timeout: float | None = None,
) -> Any:
    """Runs the coroutine ``make()`` on ``loop`` from another thread and returns its result.

    Raises:
        RuntimeError: No running loop, or called on the loop's own thread (a deadlock).
    """
    if loop is None or loop.is_closed():
        raise RuntimeError(
            f"registry {owner!r} has no running event loop: use "
            "`with CommandRegistry(...) as registry:` for the blocking API"
        )
    if on_loop_thread:
        raise RuntimeError(
            "a blocking call on the registry's own event loop thread would deadlock; "
            "use the `await` form instead"
        )
    return asyncio.run_coroutine_threadsafe(make(), loop).result(timeout)  # type: ignore[arg-type]


def check_timeout(timeout: float | None) -> None:
    """Raises ValueError unless ``timeout`` is ``None`` or a positive number."""
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")


def call_native(
    node: _core.Node, command_id: str, request: Mapping[str, Any] | None, timeout: float | None
) -> Any:
    """A blocking call made by this thread over a native channel (GIL released while it
    waits); :data:`FALLBACK` when the command is not behind one.

    Raises:
        CommandError: The call failed.
        TypeError: ``request`` is not a mapping or cannot be serialised.
    """
    # A dict of plain values is encoded, and a plain result decoded, in Rust.
    kind, value, extra = node.call_sync(command_id, request, timeout)
    if kind == _core.OUTCOME_VALUE:
        return value
    if kind == _core.OUTCOME_ENCODE:  # not a dict of plain values: checked and encoded here
        data = encode_request(command_id, request)
        kind, value, extra = node.call_sync(command_id, data, timeout, True)
        if kind == _core.OUTCOME_VALUE:
            return value
    if kind == _core.OUTCOME_RESULT:
        return decode(value, extra)
    if kind == _core.OUTCOME_ERROR:
        raise error_from_code(value, extra)
    return FALLBACK


def check_many(
    requests: Iterable[Mapping[str, Any] | None], timeout: float | None, window: int
) -> list[Any]:
    """Checks a batch's arguments; returns its requests as a list.

    Raises:
        ValueError: A bad ``timeout`` or ``window``.
        TypeError: ``requests`` is a single request rather than an iterable of them.
    """
    check_timeout(timeout)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if isinstance(requests, (Mapping, str, bytes)):
        raise TypeError(
            "requests must be an iterable of requests (one per call), not a single "
            f"{type(requests).__name__}"
        )
    return requests if type(requests) is list else list(requests)


def call_many_native(
    node: _core.Node, command_id: str, requests: list[Any], timeout: float | None, window: int
) -> tuple[list[Any], list[tuple[Any, ...]]] | None:
    """The pipelined batch over a native channel, made by this thread in Rust: ``(values,
    others)`` for :func:`cmd_ipc._payload.many_results`; ``None`` if not native."""
    kind, values, others = node.call_many_sync(command_id, requests, timeout, window)
    if kind == _core.OUTCOME_ENCODE:  # some request is not plain: encode them all here
        encoded = [encode_request(command_id, r) for r in requests]
        kind, values, others = node.call_many_sync(command_id, encoded, timeout, window, True)
    if kind == _core.OUTCOME_FALLBACK:
        return None
    return values, others


async def in_lanes(
    call: Callable[[Any], Awaitable[Any]], items: list[Any], window: int
) -> list[Any]:
    """``call(item)`` for every item, up to ``window`` at once, results in item order (a
    :class:`CommandError` in its place): the batch of a command not behind a native
    channel, on the loop."""
    results: list[Any] = [None] * len(items)
    todo = iter(enumerate(items))

    async def lane() -> None:
        for i, item in todo:
            try:
                results[i] = await call(item)
            except CommandError as e:
                results[i] = e

    lanes = [asyncio.ensure_future(lane()) for _ in range(min(window, len(items)))]
    try:
        await asyncio.gather(*lanes)
    except BaseException:
        for t in lanes:  # an unexpected failure (or a cancel) stops the other lanes too
            t.cancel()
        raise
    return results
