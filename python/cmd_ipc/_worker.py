"""Bootstrap of a worker process: ``python -m cmd_ipc._worker`` (see :mod:`cmd_ipc.workers`).

Reads its instructions from the environment (removed at once so that sub-workers do not
inherit them), joins the parent's tree, runs the target, reports ready, and serves until
the parent says stop or goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Any

from cmd_ipc.channels.native import NativeChannel
from cmd_ipc.errors import WorkerError
from cmd_ipc.registry import CommandRegistry
from cmd_ipc.workers import BOOT_ENV, _load_target, _recv_control, _send_control

logger = logging.getLogger("cmd_ipc")


async def serve(boot: dict[str, Any]) -> int:
    """Runs the worker described by ``boot``; returns the exit status."""
    loop = asyncio.get_running_loop()
    if boot.get("cpu") is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {int(boot["cpu"])})
    ctl = socket.socket(fileno=int(boot["control_fd"]))
    ctl.setblocking(False)
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    registry = CommandRegistry(
        boot["id"],
        router_channel=boot["parent"],
        request_ttl=float(boot.get("request_ttl", 30.0)),
        spin_us=int(boot.get("spin_us", 50)),
        # The parent's limits: nothing sent up is refused there for its size or depth.
        **boot.get("limits", {}),
    )
    parent = boot["parent"]

    def on_close(channel_id: str, reason: str) -> None:
        if channel_id == parent:
            stop.set()  # the parent went away (or closed us): nothing left to serve

    registry.add_close_listener(on_close)

    async def handle(msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "stop":
            registry.expect_close(parent)
            stop.set()
            return {"ok": True}
        if op == "connect":
            desc = dict(msg["channel"])
            desc["sock_fd"] = fds[0]
            desc["shm_fd"] = fds[1] if len(fds) > 1 else None
            channel = NativeChannel.from_description(desc)
            await registry.register_channel(channel)
            # A sibling that goes away is reported by the parent (stopped, or a WARNING
            # for a death), not here.
            registry.expect_close(channel.id, "peer closed the channel")
            # Answer once the peer's commands are known here: calls go direct from then on.
            await registry.wait_listed(channel.id)
            return {"ok": True}
        for fd in fds:
            os.close(fd)
        return {"ok": False, "error": f"unknown op {op!r}"}

    def on_control() -> None:
        while True:
            try:
                msg, fds = _recv_control(ctl)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, ValueError):
                msg, fds = None, []
            if msg is None:
                loop.remove_reader(ctl.fileno())
                stop.set()
                return
            task = loop.create_task(reply(msg, fds))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def reply(msg: dict[str, Any], fds: list[int]) -> None:
        try:
            answer = await handle(msg, fds)
        except Exception as e:
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answer["seq"] = msg.get("seq")
        with contextlib.suppress(OSError):
            _send_control(ctl, answer)

    # A worker runs in a process group of its own, so a terminal's Ctrl-C reaches its
    # parent only, which stops it. A SIGINT or SIGTERM sent to the worker itself stops it
    # the same way: quietly (its parent reports the unasked exit).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def start() -> None:
        await registry.register_channel(NativeChannel.from_description(boot["channel"]))
        fn = _load_target(boot["target"])
        result = fn(registry)
        if inspect.isawaitable(result):
            await result
        await registry.ready()

    async with registry:
        # Control messages are read from the start: a parent that closes while this worker
        # starts says "stop" (and this worker then ends its start quietly).
        loop.add_reader(ctl.fileno(), on_control)
        starting = loop.create_task(start())
        stopping = loop.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if stop.is_set():
            # The parent went away or said stop (or a signal came) while this started.
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            return 0
        error = _start_error(boot["id"], starting)
        if error is not None:
            with contextlib.suppress(OSError):
                _send_control(ctl, {"op": "failed", "error": error})
            return 1
        _send_control(ctl, {"op": "ready"})
        await stop.wait()
        with contextlib.suppress(Exception):
            loop.remove_reader(ctl.fileno())
    ctl.close()
    return 0


def _start_error(worker_id: str, starting: asyncio.Task[None]) -> str | None:
    """What to tell the parent about a start that failed (logged here), or None."""
    e = starting.exception()
    if e is None:
        return None
    if isinstance(e, WorkerError):
        # It says what failed and what to do (a sub-worker that failed, a target that cannot
        # be imported): no type name, and no traceback of cmd-ipc's own frames.
        logger.error("worker %r failed to start: %s", worker_id, e)
        return str(e)
    trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    logger.error("worker %r failed to start:\n%s", worker_id, trace)
    return f"{type(e).__name__}: {e}"


def main() -> None:
    """Entry point of the worker process."""
    raw = os.environ.pop(BOOT_ENV, None)
    if raw is None:
        sys.exit("cmd_ipc._worker is started by CommandRegistry.spawn_worker, not by hand")
    logging.basicConfig(
        level=logging.WARNING, format="[worker %(process)d] %(levelname)s %(name)s: %(message)s"
    )
    try:
        sys.exit(asyncio.run(serve(json.loads(raw))))
    except KeyboardInterrupt:  # a SIGINT before the loop's handler was installed
        sys.exit(130)


if __name__ == "__main__":
    main()
