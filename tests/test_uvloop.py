"""The registry under uvloop: the asyncio driver relies on public loop API only.

The native read spins briefly for the next frame when nothing else is runnable; that decision
used to read a private attribute of asyncio's own loop (``loop._ready``), which uvloop does
not have, so under uvloop reads never spun. These tests run real workers under uvloop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from cmd_ipc import CommandRegistry, InMemoryChannel, NotFoundError, _core
from cmd_ipc.channels.native import Transport


def run_uvloop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()


class SpinRecorder:
    """Stands in for a registry's native node and records the spin of every native read."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self.spins: list[int] = []
        #: (spin of the read, kinds of the actions it returned)
        self.reads: list[tuple[int, list[int]]] = []
        #: The follow-on spin (after a frame was read) of every native read.
        self.follows: list[int] = []

    def poll_native(
        self, channel_id: str, spin_us: int = 0, budget: int = 64, follow_us: int = 0
    ) -> Any:
        self.spins.append(spin_us)
        self.follows.append(follow_us)
        out = self._node.poll_native(channel_id, spin_us, budget, follow_us)
        self.reads.append((spin_us, [a[0] for a in out[0]]))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)


@pytest.mark.parametrize("transport", ["shm", "pipe"])
def test_calls_to_a_worker_under_uvloop(transport: Transport) -> None:
    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with CommandRegistry("main") as registry:
            await registry.spawn_worker("worker-1", "worker_targets:calc", transport=transport)
            results = [
                await registry.execute_command("calc.add", {"a": i, "b": 1}) for i in range(50)
            ]
            assert results == [i + 1 for i in range(50)]
            many = await registry.execute_many("calc.add", [{"a": i, "b": i} for i in range(300)])
            assert many == [2 * i for i in range(300)]
            got: list[Any] = []
            # A blocking caller on another thread while the loop serves awaited calls.
            thread = threading.Thread(
                target=lambda: got.extend(
                    registry.execute_command_sync("calc.add", {"a": 2, "b": i}) for i in range(50)
                )
            )
            thread.start()
            while thread.is_alive():
                assert await registry.execute_command("calc.add", {"a": 0, "b": 0}) == 0
            thread.join()
            assert got == [2 + i for i in range(50)]
            with pytest.raises(NotFoundError):
                await registry.execute_command("calc.nope")

    run_uvloop(main)


def test_native_reads_spin_under_uvloop() -> None:
    async def main() -> None:
        async with CommandRegistry("main", spin_us=50) as registry:
            await registry.spawn_worker("worker-1", "worker_targets:calc")
            recorder = SpinRecorder(registry._driver._node)
            registry._driver._node = recorder  # type: ignore[assignment]
            for i in range(20):
                assert await registry.execute_command("calc.add", {"a": i, "b": 0}) == i
            # Each awaited call reads its reply with a spin (the loop had nothing else to run).
            assert recorder.spins.count(50) >= 20, recorder.spins

    run_uvloop(main)


def test_no_spin_after_a_frame_for_a_python_channel() -> None:
    """A worker's reply forwarded to a client on an in-memory channel is delivered by the
    loop: the read that routed it must not spin on (it would delay that delivery)."""

    async def main() -> None:
        async with (
            CommandRegistry("hub", spin_us=50) as hub,
            CommandRegistry("client", router_channel="hub") as client,
        ):
            await hub.spawn_worker("worker-1", "worker_targets:calc")
            to_client, to_hub = InMemoryChannel.pair("client", "hub")
            await hub.register_channel(to_client)
            await client.register_channel(to_hub)
            recorder = SpinRecorder(hub._driver._node)
            hub._driver._node = recorder  # type: ignore[assignment]
            for i in range(10):
                assert await client.execute_command("calc.add", {"a": i, "b": 0}) == i
            after_send = [
                (recorder.reads[k + 1][0], recorder.follows[k + 1])
                for k, (_, kinds) in enumerate(recorder.reads[:-1])
                if _core.ACTION_SEND in kinds
            ]
            assert len(after_send) >= 10, recorder.reads
            # Neither a spin for a first frame nor one after a frame read.
            assert set(after_send) == {(0, 0)}, recorder.reads

    run_uvloop(main)
