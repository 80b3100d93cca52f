"""``registry.on_commands_changed``: told once per change of what ``list_commands`` returns
(local registrations, a peer's listing, a closed channel, unregistering), never for nothing."""

from __future__ import annotations

import asyncio

from cmd_ipc import CommandRegistry, InMemoryChannel

DEADLINE = 10.0


async def test_changes_are_told_and_unsubscribe_works() -> None:
    async with CommandRegistry("main") as main, CommandRegistry("peer") as peer:
        seen: list[list[str]] = []
        changed = asyncio.Event()

        def listener() -> None:
            seen.append([c["id"] for c in main.list_commands()])
            changed.set()

        unsubscribe = main.on_commands_changed(listener)

        async def next_change() -> list[str]:
            await asyncio.wait_for(changed.wait(), DEADLINE)
            changed.clear()
            return seen[-1]

        await main.register_command("a.one", lambda: 1)
        assert await next_change() == ["a.one"]

        await peer.register_command("p.two", lambda: 2)
        to_peer, to_main = InMemoryChannel.pair("peer", "main")
        await main.register_channel(to_peer)
        await peer.register_channel(to_main)
        assert await main.wait_listed("peer", DEADLINE)
        assert await next_change() == ["a.one", "p.two"]

        await main.close_channel("peer")
        assert await next_change() == ["a.one"]

        assert main.unregister_command("a.one")
        assert await next_change() == []

        # The barrier: listeners are called in one batch per change, so once this one ran
        # for a.three, an unsubscribed listener still called would have run too.
        barrier = asyncio.Event()
        main.on_commands_changed(barrier.set)
        count = len(seen)
        unsubscribe()
        unsubscribe()  # idempotent
        await main.register_command("a.three", lambda: 3)
        await asyncio.wait_for(barrier.wait(), DEADLINE)
        assert len(seen) == count


async def test_a_burst_is_one_call() -> None:
    async with CommandRegistry("main") as main:
        calls: list[list[str]] = []
        done = asyncio.Event()

        def listener() -> None:
            calls.append([c["id"] for c in main.list_commands()])
            done.set()

        main.on_commands_changed(listener)
        for i in range(5):

            @main.command(f"c.{i}", validate=False)
            def handler() -> int:
                return 0

        # The barrier: a later change, told after whatever the burst caused.
        await asyncio.wait_for(done.wait(), DEADLINE)
        done.clear()
        await main.register_command("z.after", lambda: 0)
        while not calls or "z.after" not in calls[-1]:
            await asyncio.wait_for(done.wait(), DEADLINE)
            done.clear()
        burst = [f"c.{i}" for i in range(5)]
        assert calls == [burst, [*burst, "z.after"]]
