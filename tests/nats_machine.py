"""A "machine" of the NATS mesh tests: one root registry, joined to the mesh through a
:class:`~cmd_ipc.channels.nats.NatsChannel` (its router channel), with its own workers.

Run as ``python nats_machine.py '<json>'`` with ``{"url", "namespace", "id", "workers":
[[worker_id, target], ...], "options": {...}}``. The root registers ``<id>.mesh_stats`` (the
channel's counters) and ``<id>.served`` (what it serves on NATS); the workers' commands come
from :mod:`worker_targets`. It prints ``ready`` once its workers are ready, and serves until
its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from cmd_ipc import CommandRegistry
from cmd_ipc.channels.nats import NatsChannel


async def main(config: dict[str, Any]) -> None:
    mid = config["id"]
    async with CommandRegistry(mid, router_channel="mesh", request_ttl=10.0) as root:
        channel = NatsChannel(
            "mesh", config["url"], namespace=config["namespace"], name=mid, **config["options"]
        )
        # The mesh first: the workers' registrations then escalate to it.
        await root.register_channel(channel)

        @root.command(f"{mid}.mesh_stats", validate=False)
        def mesh_stats() -> dict[str, int]:
            return channel.stats()

        @root.command(f"{mid}.served", validate=False)
        def served() -> list[str]:
            return channel.served()

        await root.ready()
        for worker_id, target in config["workers"]:
            await root.spawn_worker(worker_id, target, transport="pipe")
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
