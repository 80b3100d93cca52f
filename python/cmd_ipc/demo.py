"""A three-level in-process tree, printed: ``python -m cmd_ipc demo``.

``main`` (root, ``app.*``) <- ``worker`` (``calc.*``) <- ``sub`` (``transform.*``), joined by
in-memory channels. Every registry calls a command of every other one, an event goes round,
and the routing counters show which way each call went.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cmd_ipc import CommandRegistry, InMemoryChannel, NotFoundError


async def _link(parent: CommandRegistry, child: CommandRegistry) -> None:
    to_child, to_parent = InMemoryChannel.pair(child.id, parent.id)
    await parent.register_channel(to_child)
    await child.register_channel(to_parent)


async def run_demo(out: Callable[[str], Any] = print) -> None:
    """Builds the tree, runs the calls and prints what happened."""
    async with (
        CommandRegistry("main") as main,
        CommandRegistry("worker", router_channel="main") as worker,
        CommandRegistry("sub", router_channel="worker") as sub,
    ):
        await _link(main, worker)
        await _link(worker, sub)

        @main.command("app.greet", description="Greets someone")
        def greet(name: str) -> str:
            return f"hello, {name}"

        @worker.command("calc.add", description="Adds two numbers")
        def add(a: float, b: float) -> float:
            return a + b

        async def upper(text: str) -> str:
            return text.upper()

        await sub.register_command("transform.upper", upper, "Upper-cases text")

        seen: list[str] = []

        def listener_of(reg: CommandRegistry) -> Callable[[Any], None]:
            return lambda payload: seen.append(f"{reg.id}:{payload['n']}")

        for r in (main, worker, sub):
            r.add_event_listener("demo.ping", listener_of(r))

        out("commands known at the root:")
        for c in main.list_commands():
            out(f"  {c['id']:<18} -> {main.route_of(c['id'])}")
        calls: list[tuple[CommandRegistry, str, dict[str, Any]]] = [
            (main, "transform.upper", {"text": "from the root"}),
            (sub, "app.greet", {"name": "leaf"}),
            (sub, "calc.add", {"a": 2, "b": 3}),
            (worker, "transform.upper", {"text": "one hop down"}),
        ]
        for reg, cmd, req in calls:
            result = await reg.execute_command(cmd, req)
            out(f"{reg.id:>6} calls {cmd:<16} {req} -> {result!r}")
        try:
            await sub.execute_command("calc.ad", {"a": 1, "b": 2})
        except NotFoundError as e:
            out(f"   sub calls calc.ad          -> {type(e).__name__}: {e.message}")
        sub.emit_event("demo.ping", {"n": 1})
        for _ in range(20):
            if len(seen) == 3:
                break
            await asyncio.sleep(0)
        out(f"event demo.ping delivered to: {', '.join(sorted(seen))}")
        for r in (main, worker, sub):
            s = r.stats()
            chans = ", ".join(
                f"{c}: sent {v['sent']} received {v['received']}" for c, v in s["channels"].items()
            )
            out(f"stats {r.id:<6} forwarded={s['forwarded']} dropped={s['dropped']} [{chans}]")


def main() -> None:
    """Entry point of ``python -m cmd_ipc demo``."""
    asyncio.run(run_demo())
