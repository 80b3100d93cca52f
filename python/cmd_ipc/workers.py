"""Worker processes: children that join the registry tree over a native channel.

A worker is ``sys.executable -m cmd_ipc._worker`` (nothing is pickled). It builds a
:class:`~cmd_ipc.CommandRegistry` whose id is the worker id and whose ``router_channel`` is
the parent's id, connects it to the parent over a shared-memory (or pipe) channel, imports
``target`` (``"package.module:function"``) and calls ``function(registry)`` (sync or async)
to register commands, then serves until it is told to stop or its parent goes away. It runs
in a process group of its own (:mod:`cmd_ipc._procgroup`): a terminal's Ctrl-C reaches the
parent only, which stops its workers in order; a SIGINT or SIGTERM sent to the worker itself
makes it exit quietly. A target the child cannot import (one in ``__main__``, or a module
that spawns workers when imported) is refused with an error that says what to change.

Besides the data channel, each worker has a control socket (``AF_UNIX``/``SOCK_SEQPACKET``)
carrying small JSON messages and, for :meth:`CommandRegistry.connect_workers`, the
descriptors of new direct channels (``SCM_RIGHTS``):

* child to parent: ``{"op": "ready"}`` once ``function(registry)`` returned and every
  registration was acknowledged by the tree, or ``{"op": "failed", "error": ...}``;
* parent to child: ``{"op": "stop", "seq": n}``, ``{"op": "connect", "seq": n, "channel": ...}``
  (with descriptors); the child answers ``{"seq": n, "ok": true}`` or
  ``{"seq": n, "ok": false, "error": ...}``. The child reads them from the start: a
  ``stop`` that comes while it starts (its parent is closing) ends the start quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from cmd_ipc._procgroup import OWN_PROCESS_GROUP
from cmd_ipc.channels.native import DEFAULT_RING_SIZE, NativeChannel, Transport
from cmd_ipc.errors import WorkerError

__all__ = ["Pool", "RestartPolicy", "Worker", "WorkerError", "WorkerHost", "WorkerTable"]

logger = logging.getLogger("cmd_ipc")

BOOT_ENV = "CMD_IPC_WORKER_BOOT"
_MAX_CONTROL = 65536
#: Seconds a restart waits for the dead worker's channel to be detached.
_DETACH_TIMEOUT = 5.0


@dataclass(frozen=True)
class WorkerHost:
    """What workers need of the registry that spawns them, given by that registry (workers
    never see the registry itself).

    Attributes:
        id: The parent registry's id (the workers' ``router_channel``).
        request_ttl: The parent's request TTL, inherited by workers.
        spin_us: The parent's native read spin, inherited by workers.
        limits: The parent's limits (``CommandRegistry`` keywords: ``max_message_size``,
            ``max_depth``, ``max_pending``...), inherited by workers, so that a worker never
            sends what its parent would refuse (a result over the parent's message size is
            answered ``internal_error`` in the worker, not a frame that closes the channel).
        register_channel: Attaches a worker's channel.
        close_channel: Closes a channel by id.
        has_channel: Whether a channel of that id is attached.
        is_closed: Whether the registry closed.
        expect_close: Marks a channel's coming close as asked for (logged at INFO).
        unexpect_close: Withdraws that mark.
        add_close_listener: ``fn(channel_id, reason)`` on every close; returns an
            unsubscribe callable.
        set_pool: Declares a channel a member of a pool (``None``: of none).
        commands_changed: Told each time a worker process became ready (its commands
            joined the tree: a spawn, a restart).
    """

    id: str
    request_ttl: float
    spin_us: int
    limits: Mapping[str, Any]
    register_channel: Callable[[NativeChannel], Coroutine[Any, Any, None]]
    close_channel: Callable[[str], Coroutine[Any, Any, None]]
    has_channel: Callable[[str], bool]
    is_closed: Callable[[], bool]
    expect_close: Callable[[str], None]
    unexpect_close: Callable[[str], None]
    add_close_listener: Callable[[Callable[[str, str], None]], Callable[[], None]]
    set_pool: Callable[[str, str | None], None]
    commands_changed: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a worker that exits without being asked to.

    Attributes:
        max_restarts: Restarts allowed in total (``None``: unlimited).
        backoff: Seconds before the first restart; doubled after each, up to ``max_backoff``.
        max_backoff: Upper bound of the delay.
    """

    max_restarts: int | None = 5
    backoff: float = 0.1
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (0-based)."""
        return float(min(self.max_backoff, self.backoff * (2**attempt)))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Marks a future's exception as seen (no "Future exception was never retrieved")."""
    if not fut.cancelled():
        fut.exception()


def _send_control(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _recv_control(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One control message (None at end-of-file); raises BlockingIOError if none waits."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_CONTROL, 8)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


class Worker:
    """A worker process of a registry, as returned by
    :meth:`CommandRegistry.spawn_worker` (made by its :class:`WorkerTable`).

    Attributes:
        id: The worker's registry id (and the channel id under which the parent knows it).
        target: ``"package.module:function"`` run in the child.
        transport: ``"shm"`` or ``"pipe"``.
        restarts: How many times the restart policy restarted it.
    """

    def __init__(
        self,
        table: WorkerTable,
        worker_id: str,
        target: str,
        *,
        transport: Transport,
        ring_size: int,
        restart: RestartPolicy | None,
        env: dict[str, str] | None,
        ready_timeout: float,
        cpu: int | None,
    ) -> None:
        self.id = worker_id
        self.target = target
        self.transport: Transport = transport
        self.restart = restart
        self.restarts = 0
        self._table = table
        self._host = table.host
        self._ring_size = ring_size
        self._env = env
        self._ready_timeout = ready_timeout
        self._cpu = cpu
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._ctl: socket.socket | None = None
        self._seq = 0
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[None] | None = None
        self._exited: asyncio.Event = asyncio.Event()
        self._stopping = False
        #: Set by stop(): no restart will follow (``_stopping`` also marks the internal end
        #: of a failed start, after which the policy may restart it).
        self._stop_asked = False
        self._restart_task: asyncio.Task[None] | None = None
        #: Set while the current process is ready (cleared when it exits).
        self._up = asyncio.Event()
        #: Why the worker will not be ready again (stopped, gave up...), once that is known.
        self._down: str | None = None
        #: Futures of :meth:`ready` callers, settled whenever the state above changes.
        self._watchers: set[asyncio.Future[None]] = set()
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<Worker id={self.id!r} pid={self.pid} alive={self.alive}>"

    @property
    def pid(self) -> int | None:
        """The current process id (changes after a restart)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    # ------------------------------------------------------------------ start

    async def _start(self) -> None:
        host = self._host
        parent_end, child_end = NativeChannel.pair(
            self.id, host.id, transport=self.transport, ring_size=self._ring_size
        )
        ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = {
            "id": self.id,
            "parent": host.id,
            "target": self.target,
            "channel": child_end.describe(),
            "control_fd": ctl_child.fileno(),
            "request_ttl": host.request_ttl,
            "spin_us": host.spin_us,
            "limits": dict(host.limits),
            "cpu": self._cpu,
        }
        env = dict(os.environ if self._env is None else self._env)
        env[BOOT_ENV] = json.dumps(boot)
        # Like multiprocessing's spawn: the child sees this process's import path, so the
        # target imports in the child exactly as it would here (and so does this package).
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = [pkg_root, *(p for p in sys.path if p), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cmd_ipc._worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=[*child_end.fds(), ctl_child.fileno()],
                # Ctrl-C reaches this process only: it stops the worker in order.
                **OWN_PROCESS_GROUP,
            )
        finally:
            child_end.close_fds()
            ctl_child.close()
        self._exited = asyncio.Event()
        self._ctl = ctl_parent
        ctl_parent.setblocking(False)
        ready = self._ready = self._loop.create_future()
        # Whoever waited may be gone (cancelled, timed out) when the child fails later.
        ready.add_done_callback(_retrieve)
        self._loop.add_reader(ctl_parent.fileno(), self._on_control)
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
            self._loop.add_reader(self._pidfd, self._on_exit)
        except (AttributeError, OSError):  # pragma: no cover - Linux < 5.3
            self._pidfd = None
            self._loop.create_task(self._poll_exit())
        try:
            await host.register_channel(parent_end)
            # Until ready, a close of the channel is reported by this start's failure.
            host.expect_close(self.id)
            await asyncio.wait_for(asyncio.shield(ready), self._ready_timeout)
        except asyncio.TimeoutError:
            await self._kill()
            raise WorkerError(
                f"worker {self.id!r} did not become ready within {self._ready_timeout}s"
            ) from None
        except BaseException:
            # Cancelled (Ctrl-C), or the child failed: told to stop rather than killed, so
            # that its own starting sub-workers end quietly too.
            await self._abandon(2.0)
            raise
        host.unexpect_close(self.id)
        self._down = None
        self._up.set()
        self._notify()

    async def _poll_exit(self) -> None:  # pragma: no cover - fallback without pidfd
        while self.alive:
            await asyncio.sleep(0.1)
        self._on_exit()

    # ------------------------------------------------------------------ control

    def _on_control(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        while True:
            try:
                msg, fds = _recv_control(ctl)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError:  # the worker died (reset): the same as end-of-file
                msg, fds = None, []
            except (OSError, ValueError) as e:
                logger.warning("bad control message from worker %r: %s", self.id, e)
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                self._control_closed()
                return
            self._handle_control(msg)

    def _handle_control(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            self._host.commands_changed()
        elif op == "failed":
            if self._ready is not None and not self._ready.done():
                # The spawn raises: the channel's coming close is no news of its own.
                self._stop_expected()
                # The child says what failed, without naming a type for a WorkerError (a
                # sub-worker that failed), so causes chain as "worker 'a' failed to start:
                # worker 'b' failed to start: ...".
                self._ready.set_exception(
                    WorkerError(f"worker {self.id!r} failed to start: {msg.get('error')}")
                )
        elif "seq" in msg:
            fut = self._replies.pop(int(msg["seq"]), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _control_closed(self) -> None:
        if self._ctl is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        err = WorkerError(f"worker {self.id!r} closed its control channel")
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(err)
        self._replies.clear()
        if self._ready is not None and not self._ready.done():
            self._stop_expected()  # the spawn raises, saying so
            self._ready.set_exception(
                WorkerError(
                    f"worker {self.id!r} exited before it was ready "
                    f"(exit status {self.returncode}; its stderr is above)"
                )
            )

    async def _request(
        self, msg: dict[str, Any], fds: list[int] | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        if self._ctl is None:
            raise WorkerError(f"worker {self.id!r} is not running")
        self._seq += 1
        msg = {**msg, "seq": self._seq}
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._replies[self._seq] = fut
        _send_control(self._ctl, msg, fds)
        reply = await asyncio.wait_for(fut, timeout)
        if not reply.get("ok"):
            raise WorkerError(f"worker {self.id!r}: {reply.get('error')}")
        return reply

    async def _connect(self, channel: NativeChannel) -> None:
        desc = channel.describe()
        fds = channel.fds()
        try:
            await self._request({"op": "connect", "channel": desc}, fds)
        finally:
            channel.close_fds()

    # ------------------------------------------------------------------ exit and stop

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._proc is not None:
            self._proc.poll()
        if self._ctl is not None:
            self._control_closed()
        self._exited.set()
        self._up.clear()
        code = self.returncode
        try:
            if self._stopping:
                self._down = f"worker {self.id!r} was stopped"
                return
            logger.warning("worker %r (pid %s) exited with status %s", self.id, self.pid, code)
            # The data channel saw end-of-file already; make sure it is gone before a restart.
            if self._host.has_channel(self.id):
                self._loop.create_task(self._host.close_channel(self.id))
            self._apply_policy(f"worker {self.id!r} exited with status {code}")
        finally:
            self._notify()

    def _apply_policy(self, down: str) -> None:
        """The worker is down (``down`` says why): restart it if its policy allows."""
        policy = self.restart
        if policy is None or self._host.is_closed():
            self._down = down + " and has no restart policy" if policy is None else down
            return
        if policy.max_restarts is not None and self.restarts >= policy.max_restarts:
            logger.error("worker %r: giving up after %d restarts", self.id, self.restarts)
            self._down = f"{down}; gave up after {self.restarts} restarts"
            return
        delay = policy.delay(self.restarts)
        self._down = None  # not down for good: ready() waits for the restart
        self._restart_task = self._loop.create_task(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)  # the policy's backoff
        if self._stopping or self._host.is_closed():
            return
        self.restarts += 1
        # Wait for the old channel to be detached, then start afresh under the same id.
        await self._detached()
        try:
            await self._start()
            logger.info("worker %r restarted (pid %s)", self.id, self.pid)
        except Exception as e:
            # (stop() cancels this task: a failure here is never a stop asked for.)
            logger.error("restart of worker %r failed: %s", self.id, e)
            if self._host.is_closed():
                return
            # A restart that fails (killed while it started, its setup raised) is one more
            # exit: the policy decides again (its backoff keeps a failing setup from
            # spinning). The failed start marked its own end as expected; the next is not.
            self._stopping = False
            self._apply_policy(f"the restart of worker {self.id!r} failed: {e}")
            self._notify()

    async def _detached(self) -> None:
        """Returns once no channel of this worker's id is attached (bounded)."""
        gone = asyncio.Event()

        def on_close(channel_id: str, _reason: str) -> None:
            if channel_id == self.id:
                gone.set()

        unsubscribe = self._host.add_close_listener(on_close)
        try:
            if self._host.has_channel(self.id):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), _DETACH_TIMEOUT)
        finally:
            unsubscribe()

    def _stop_expected(self) -> None:
        """From now on this worker's exit and its channel's close are asked for."""
        self._stopping = True
        self._host.expect_close(self.id)
        self._notify()

    def _notify(self) -> None:
        watchers, self._watchers = self._watchers, set()
        for fut in watchers:
            if not fut.done():
                fut.set_result(None)

    async def wait(self) -> int | None:
        """Waits until the current process exits; returns its exit status."""
        await self._exited.wait()
        return self.returncode

    async def ready(self, timeout: float | None = None) -> None:
        """Waits until the worker serves: returns at once while its process is ready, and
        after an exit that its restart policy answers, once the restarted process is ready
        (its commands registered again).

        Args:
            timeout: Seconds to wait at most (``None``: no limit).

        Raises:
            WorkerError: The worker will not be ready again: it was stopped, it exited
                without a restart policy, or the policy gave up (a restart that fails is
                one more exit for the policy).
            TimeoutError: Not ready within ``timeout`` seconds.

        Example::

            os.kill(worker.pid, signal.SIGKILL)
            await worker.wait()    # the exit status
            await worker.ready(5)  # restarted: its commands are callable again
        """
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            restarting = self._restart_task is not None and not self._restart_task.done()
            if self._stop_asked or (self._stopping and not restarting):
                raise WorkerError(self._down or f"worker {self.id!r} was stopped")
            if self._up.is_set() and self.alive:
                return
            if self._down is not None and self._exited.is_set() and not restarting:
                raise WorkerError(self._down)
            fut: asyncio.Future[None] = loop.create_future()
            self._watchers.add(fut)
            remaining = None if deadline is None else deadline - loop.time()
            try:
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                raise TimeoutError(f"worker {self.id!r} was not ready within {timeout}s") from None
            finally:
                self._watchers.discard(fut)

    async def _abandon(self, timeout: float = 5.0) -> None:
        """Stops a worker that is still starting (its parent is closing, or the spawn was
        cancelled): told to stop, the child ends its start (and those of its own
        sub-workers) and exits; killed if it has not after ``timeout`` seconds. Its
        channel is closed last, so the child never sees its parent vanish."""
        self._stop_expected()
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                _send_control(self._ctl, {"op": "stop", "seq": 0})  # no answer awaited
        if self._proc is not None and not self._exited.is_set():
            try:
                await asyncio.wait_for(self._exited.wait(), timeout)
            except asyncio.TimeoutError:
                await self._kill()
        if self._host.has_channel(self.id):
            with contextlib.suppress(Exception):
                await self._host.close_channel(self.id)

    async def _kill(self) -> None:
        self._stop_expected()
        if self.alive and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        if self._proc is not None:
            await self._exited.wait()

    async def stop(self, timeout: float = 5.0) -> int | None:
        """Stops the worker: asks it to exit (it closes its own sub-workers first), then
        kills it if it has not exited after ``timeout`` seconds. Disables restarts.

        Returns:
            The exit status.
        """
        self._stop_asked = True
        self._stop_expected()
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.alive:
            with contextlib.suppress(Exception):
                await self._request({"op": "stop"}, timeout=timeout)
            try:
                await asyncio.wait_for(self._exited.wait(), timeout)
            except asyncio.TimeoutError:
                logger.warning("worker %r did not stop in %.1fs: killing it", self.id, timeout)
                await self._kill()
        elif self._proc is not None and not self._exited.is_set():
            await self._exited.wait()
        if self._host.has_channel(self.id):
            await self._host.close_channel(self.id)
        self._table.discard(self)
        return self.returncode


class WorkerTable:
    """The workers of one registry: spawns, connects and stops them.

    Args:
        host: What the workers need of their registry.
    """

    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        self._workers: dict[str, Worker] = {}
        self._pools: dict[str, Pool] = {}
        #: Workers whose :meth:`spawn` has not returned yet.
        self._starting: set[Worker] = set()

    def pools(self) -> dict[str, Pool]:
        """Pools spawned and not stopped, by id (a copy)."""
        return dict(self._pools)

    async def spawn_pool(self, pool_id: str, target: str, size: int, **options: Any) -> Pool:
        """Starts a pool (see :meth:`CommandRegistry.spawn_pool`)."""
        if not isinstance(pool_id, str) or not pool_id:
            raise ValueError("pool_id must be a non-empty string")
        if pool_id in self._pools:
            raise ValueError(f"registry {self.host.id!r} already has a pool {pool_id!r}")
        pool = Pool(self, pool_id, target, options)
        self._pools[pool_id] = pool
        try:
            await pool.resize(size)
        except BaseException:
            await pool.stop()
            raise
        return pool

    def snapshot(self) -> dict[str, Worker]:
        """Workers spawned and not stopped, by id (a copy)."""
        return dict(self._workers)

    def discard(self, worker: Worker) -> None:
        """Forgets a stopped worker."""
        if self._workers.get(worker.id) is worker:
            del self._workers[worker.id]

    async def spawn(
        self,
        worker_id: str,
        target: str,
        *,
        transport: Transport,
        ring_size: int,
        restart: RestartPolicy | None,
        env: dict[str, str] | None,
        ready_timeout: float,
        cpu: int | None,
    ) -> Worker:
        """Starts a worker (see :meth:`CommandRegistry.spawn_worker`)."""
        if not isinstance(worker_id, str) or not worker_id:
            raise ValueError("worker_id must be a non-empty string")
        if ":" not in target:
            raise ValueError(f"target must look like 'package.module:function', got {target!r}")
        _check_target(target)
        _refuse_import_time_spawn(worker_id)
        if transport not in ("shm", "pipe"):
            raise ValueError(f"unknown transport {transport!r}: expected 'shm' or 'pipe'")
        if self.host.has_channel(worker_id):
            raise ValueError(f"registry {self.host.id!r} already has a channel {worker_id!r}")
        worker = Worker(
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
        self._starting.add(worker)
        try:
            await worker._start()
        finally:
            self._starting.discard(worker)
        self._workers[worker_id] = worker
        return worker

    async def stop_all(self) -> None:
        """Stops every worker, and those still starting (failures are not raised: the
        workers are gone either way)."""
        self._pools.clear()
        stops = [w.stop() for w in self._workers.values()]
        stops += [w._abandon() for w in self._starting]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)

    @staticmethod
    async def connect(a: Worker, b: Worker, *, ring_size: int = DEFAULT_RING_SIZE) -> None:
        """Opens a direct channel between two workers (see
        :meth:`CommandRegistry.connect_workers`)."""
        if a is b:
            raise ValueError("cannot connect a worker to itself")
        if not (a.alive and b.alive):
            raise WorkerError("both workers must be running")
        # a's end is named after b (the peer it reaches), and the reverse.
        end_a, end_b = NativeChannel.pair(b.id, a.id, transport="shm", ring_size=ring_size)
        try:
            await asyncio.gather(a._connect(end_a), b._connect(end_b))
        finally:
            end_a.close_fds()
            end_b.close_fds()


class Pool:
    """Workers of one registry that all run the same target and share its commands: each
    call goes to the member with the fewest calls in flight (ties in turn), and the
    commands are registered upward once. As returned by
    :meth:`CommandRegistry.spawn_pool`.

    Members are workers named ``"<pool id>-<n>"``; a member that dies fails only the calls
    in flight on it (nothing is retried: calls are not assumed idempotent) and, with a
    restart policy, rejoins when it is back.

    Attributes:
        id: The pool's id.
        target: ``"package.module:function"`` every member runs.
    """

    def __init__(self, table: WorkerTable, pool_id: str, target: str, options: dict[str, Any]):
        self.id = pool_id
        self.target = target
        self._table = table
        self._options = options
        self._members: list[Worker] = []
        self._next = 1
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Pool id={self.id!r} size={self.size} target={self.target!r}>"

    @property
    def workers(self) -> list[Worker]:
        """The members, oldest first (a copy)."""
        return list(self._members)

    @property
    def size(self) -> int:
        """How many members the pool has."""
        return len(self._members)

    async def resize(self, size: int) -> None:
        """Starts or stops members until the pool has ``size`` (the newest stop first;
        calls in flight on a stopped member fail with ``channel_disconnected``).

        Raises:
            ValueError: ``size`` is not a positive int.
            WorkerError: A new member failed to start (the members started by this call are
                stopped again).
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a pool's size must be a positive int, got {size!r}")
        async with self._lock:
            if self._table._pools.get(self.id) is not self:
                raise WorkerError(f"pool {self.id!r} was stopped")
            while len(self._members) > size:
                await self._stop_member(self._members[-1])
            if len(self._members) < size:
                ids = [f"{self.id}-{self._next + i}" for i in range(size - len(self._members))]
                self._next += len(ids)
                for worker_id in ids:
                    self._table.host.set_pool(worker_id, self.id)
                results = await asyncio.gather(
                    *(self._table.spawn(w, self.target, **self._options) for w in ids),
                    return_exceptions=True,
                )
                started = [r for r in results if isinstance(r, Worker)]
                failures = [r for r in results if isinstance(r, BaseException)]
                if failures:
                    for worker in started:
                        await worker.stop()
                    for worker_id in ids:
                        self._table.host.set_pool(worker_id, None)
                    raise failures[0]
                self._members.extend(started)

    async def _stop_member(self, worker: Worker) -> None:
        self._members.remove(worker)
        await worker.stop()
        self._table.host.set_pool(worker.id, None)

    async def stop(self) -> None:
        """Stops every member; the pool's commands are gone with them."""
        if self._table._pools.get(self.id) is self:
            del self._table._pools[self.id]
        async with self._lock:
            for worker in list(self._members):
                await self._stop_member(worker)


# ---------------------------------------------------------------------------- targets


def _check_target(target: str) -> None:
    """Refuses a target that no worker can import: one in ``__main__``.

    Raises:
        ValueError: Saying why, and what to pass instead.
    """
    module_name, _, attr = target.partition(":")
    if module_name != "__main__":
        return
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        named = spec.name  # python -m package.module
    elif path:
        named = os.path.splitext(os.path.basename(path))[0]
    else:
        named = "yourmodule"
    raise ValueError(
        f"target {target!r} cannot be imported by a worker: a worker is a new interpreter "
        "that imports its target's module by name, and its __main__ is not your script. "
        "Move the function to a module (e.g. myapp/workers.py, target "
        f"'myapp.workers:{attr}'), or name this module ('{named}:{attr}') and put the code "
        'that spawns workers under `if __name__ == "__main__":`'
    )


#: The module a worker process is importing as its target, while it does (else ``None``).
_importing_target: str | None = None


def _refuse_import_time_spawn(worker_id: str) -> None:
    """Refuses a spawn made while a worker imports its target's module: a module that
    spawns workers when imported would make every worker spawn another, without end.

    Raises:
        WorkerError: This is such a spawn; the message says what to change.
    """
    module = _importing_target
    if module is None:
        return
    raise WorkerError(
        f"module {module!r} spawns a worker ({worker_id!r}) when it is imported, and a "
        "worker imports its target's module: each worker would spawn another. Put the code "
        f'of {module!r} that spawns workers under `if __name__ == "__main__":`, or move '
        "the target function to a module that spawns nothing when imported"
    )


# ---------------------------------------------------------------------------- child side


def _load_target(target: str) -> Callable[[Any], Any]:
    """Imports a worker's target, refusing spawns made while its module is imported.

    Raises:
        WorkerError: No such module or function, not callable, or a module that spawns
            workers when imported; the message says what to do.
        Exception: Whatever the module raised while it was imported.
    """
    import importlib

    global _importing_target
    module_name, _, attr = target.partition(":")
    _importing_target = module_name
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name + ".").startswith(e.name + "."):
            raise  # a module the target's module imports is missing: its own error
        raise WorkerError(
            f"cannot import {module_name!r} (target {target!r}): no module of that name on "
            "the worker's import path (it is the parent's sys.path)"
        ) from e
    finally:
        _importing_target = None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise WorkerError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise WorkerError(f"{target!r} is not callable")
    return fn  # type: ignore[no-any-return]
