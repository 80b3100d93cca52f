"""Spec-v1 JSON lines over a child process's stdin/stdout: peers in any language.

Each message is one line of JSON (no newline inside: JSON escapes them). The parent side
spawns the peer with :meth:`StdioChannel.spawn`; a Python child uses
:meth:`StdioChannel.from_stdio`. The child's stderr is left alone for its logs.

Example (parent side; ``peer`` is any program that speaks cmd-ipc JSON lines and uses the
channel id ``"main"`` as its router)::

    channel = await StdioChannel.spawn("peer", ["./peer", "main"])
    await registry.register_channel(channel)
    await registry.execute_command("peer.add", {"a": 1, "b": 2})

A line that is not a JSON object (a stray ``print`` in the child, a banner) is logged and
skipped, or closes the channel when ``strict=True``. A JSON line that is not a valid spec-v1
message is dropped by the registry's router with a logged reason (an execute request among
them is answered ``invalid_request``). A line longer than ``max_line`` bytes is skipped
whole, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from cmd_ipc.channels.base import Channel, OnClose, OnFrame

__all__ = ["StdioChannel"]

logger = logging.getLogger("cmd_ipc.stdio")

_CHUNK = 1 << 16


class StdioChannel(Channel):
    """One end of a JSON-lines channel over a pair of pipes.

    Build it with :meth:`spawn` (parent side) or :meth:`from_stdio` (inside the child), not
    directly.

    Attributes:
        process: The child process, on the parent side (``None`` in the child).
        strict: Whether a line that is not a JSON object closes the channel.
        max_line: Longest accepted line, in bytes.
        rejected: How many lines were skipped (not JSON objects, or too long).
    """

    def __init__(
        self,
        id: str,
        *,
        read_fd: int | None = None,
        write_fd: int | None = None,
        process: asyncio.subprocess.Process | None = None,
        strict: bool = False,
        max_line: int = 16 * 1024 * 1024,
        max_buffer: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(id, "json")
        if max_line <= 0 or max_buffer <= 0:
            raise ValueError("max_line and max_buffer must be positive")
        self.process = process
        self.strict = strict
        self.max_line = max_line
        self.max_buffer = max_buffer
        self.rejected = 0
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._reader: asyncio.StreamReader | None = None
        self._write: asyncio.WriteTransport | None = None
        self._read_transport: asyncio.ReadTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._restore_blocking: list[int] = []
        self._closed = False
        self._close_reported = False

    # ------------------------------------------------------------------ construction

    @classmethod
    async def spawn(
        cls,
        channel_id: str,
        argv: Sequence[str],
        *,
        strict: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stderr: int | None = None,
        max_line: int = 16 * 1024 * 1024,
    ) -> StdioChannel:
        """Starts ``argv`` as a child process whose stdin/stdout carry the channel.

        Args:
            channel_id: The id under which this registry knows the child.
            argv: Program and arguments.
            strict: Close the channel on a line that is not a JSON object.
            env: Environment of the child (default: this process's).
            cwd: Working directory of the child.
            stderr: Where the child's stderr goes (default: inherited, for its logs).
            max_line: Longest accepted line, in bytes.

        Returns:
            The channel, ready for :meth:`CommandRegistry.register_channel`.

        Raises:
            OSError: The program could not be started.
        """
        if not argv:
            raise ValueError("argv must name a program")
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=cwd,
            limit=_CHUNK,
        )
        return cls(channel_id, process=process, strict=strict, max_line=max_line)

    @classmethod
    def from_stdio(
        cls,
        channel_id: str,
        *,
        strict: bool = False,
        redirect_stdout: bool = True,
        max_line: int = 16 * 1024 * 1024,
    ) -> StdioChannel:
        """The child side: this process's stdin and stdout carry the channel.

        Args:
            channel_id: The id under which this registry knows its parent.
            strict: Close the channel on a line that is not a JSON object.
            redirect_stdout: Point file descriptor 1 (and ``sys.stdout``) at stderr and file
                descriptor 0 at ``/dev/null``, so that a stray ``print`` or ``input()`` (or a
                grandchild inheriting them) cannot touch the channel; the channel uses private
                duplicates of the original descriptors. Without it, the parent only sees the
                channel close when this process exits.
            max_line: Longest accepted line, in bytes.
        """
        read_fd = os.dup(0)
        write_fd = os.dup(1)
        if redirect_stdout:
            # fd 1 now goes to stderr, and fd 0 reads nothing: a stray print, input() or a
            # grandchild inheriting the descriptors cannot touch the channel's pipes (and
            # when the channel closes its duplicates, the parent sees end-of-file at once).
            sys.stdout.flush()
            os.dup2(2, 1)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
        channel = cls(
            channel_id, read_fd=read_fd, write_fd=write_fd, strict=strict, max_line=max_line
        )
        # asyncio makes the descriptions non-blocking; they may be shared with a terminal
        # (run by hand), which must be left as it was: blocking again once the channel ends.
        channel._restore_blocking = [os.dup(read_fd), os.dup(write_fd)]
        return channel

    @property
    def pid(self) -> int | None:
        """The child's process id (parent side), else ``None``."""
        return self.process.pid if self.process is not None else None

    # ------------------------------------------------------------------ channel

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        if self._on_frame is not None:
            raise RuntimeError(f"channel {self.id!r} was already started")
        if self._closed:
            raise RuntimeError(f"channel {self.id!r} is closed")
        self._on_frame, self._on_close = on_frame, on_close
        loop = asyncio.get_running_loop()
        if self.process is not None:
            assert self.process.stdout is not None and self.process.stdin is not None
            self._reader = self.process.stdout
            self._write = self.process.stdin.transport
        else:
            assert self._read_fd is not None and self._write_fd is not None
            reader = asyncio.StreamReader(limit=_CHUNK)
            self._read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader),
                os.fdopen(self._read_fd, "rb", buffering=0),
            )
            self._write, _ = await loop.connect_write_pipe(
                asyncio.Protocol, os.fdopen(self._write_fd, "wb", buffering=0)
            )
            self._reader = reader
        self._task = loop.create_task(self._read_loop())

    def send(self, frame: bytes) -> None:
        w = self._write
        if self._closed or w is None or w.is_closing():
            return
        if w.get_write_buffer_size() > self.max_buffer:
            self._fail(f"peer is not reading: over {self.max_buffer} bytes queued")
            return
        w.write(frame + b"\n" if not frame.endswith(b"\n") else frame)

    async def close(self) -> None:
        if self._closed:
            if self._shutdown_task is not None:
                # The channel failed on its own: finish ending the child before returning.
                await asyncio.shield(self._shutdown_task)
            return
        self._closed = True
        self._restore_modes()
        self._report_close(None)
        await self._shutdown()

    # ------------------------------------------------------------------ internals

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        buf = bytearray()
        skipping = False
        reason = "peer closed its output"
        try:
            while not self._closed:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    break
                start = 0
                while True:
                    nl = chunk.find(b"\n", start)
                    if not skipping:
                        buf += chunk[start : nl if nl >= 0 else len(chunk)]
                        if len(buf) > self.max_line:
                            # Rejected once; the rest of the line, up to its newline, is
                            # skipped.
                            self._reject(f"line longer than {self.max_line} bytes")
                            buf.clear()
                            skipping = True
                    if nl < 0:
                        break
                    if not skipping:
                        self._line(bytes(buf))
                    buf.clear()
                    skipping = False
                    start = nl + 1
                    if self._closed:
                        return
        except Exception as e:  # a broken pipe, a closed descriptor
            reason = f"reading failed: {e}"
        if not self._closed:
            code = await self._exit_code()
            if code is not None:
                reason = f"peer exited with code {code}"
            self._fail(reason)

    def _line(self, line: bytes) -> None:
        text = line.strip()
        if not text:
            return
        if not text.startswith(b"{"):
            self._reject(f"not a JSON object: {text[:80]!r}")
            return
        if self._on_frame is not None and not self._closed:
            self._on_frame(text)

    def _reject(self, why: str) -> None:
        self.rejected += 1
        if self.strict:
            logger.warning("channel %r: %s; closing (strict)", self.id, why)
            self._fail(f"strict channel got a bad line: {why}")
        else:
            logger.warning("channel %r skipped a line: %s", self.id, why)

    async def _exit_code(self) -> int | None:
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), 0.2)
        except asyncio.TimeoutError:
            return None

    def _restore_modes(self) -> None:
        """Makes this process's stdin/stdout blocking again (at once, not in a task that the
        end of the event loop could cancel)."""
        restore, self._restore_blocking = self._restore_blocking, []
        for fd in restore:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
            os.close(fd)

    def _fail(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._restore_modes()
        self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())
        self._report_close(reason)

    async def _shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._write is not None:
            self._write.close()
        if self._read_transport is not None:
            self._read_transport.close()
        proc = self.process
        if proc is not None and proc.returncode is None:
            # The child sees end of input and should exit; if it does not, end it.
            try:
                for step in (proc.terminate, proc.kill):
                    try:
                        await asyncio.wait_for(proc.wait(), 2.0)
                        break
                    except asyncio.TimeoutError:
                        try:
                            step()
                        except ProcessLookupError:
                            break
                else:
                    await proc.wait()
            except asyncio.CancelledError:
                # Interrupted (the loop is ending): no orphan is left behind.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
        if proc is not None:
            # Let the subprocess transport release its pipes before the loop closes.
            transport: Any = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
